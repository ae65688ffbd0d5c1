"""A query of death on the real stack: a request that kills the Triton host running it.

``crash_probe`` (triton_models/) kills its tritonserver when a request holds the value 13.0; here it is
loaded on both GPU-tier hosts. Sent once through the gateway while other traffic runs at 100 req/s, it
must kill at most one host, once (Envoy does not replay a request whose connection reset after it was
sent); its client gets a 5xx; once the picker has seen the host go down, the identical request is refused
by the picker without reaching any host; other traffic keeps being served (only the requests that host had
already received when it died fail); ``extproc up`` restarts the host and it is back in rotation.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator

import pytest

from tests.stack import (
    Load,
    MixEntry,
    Stack,
    alive,
    local_fleet,
    pid_of,
    routable,
    start_stack,
    stop_stack,
    wait_for,
)

pytestmark = pytest.mark.e2e

GPU_HOSTS = ("triton-a", "triton-b")
MAGIC = [1.0, 2.0, 13.0, 4.0]
MIX = (
    MixEntry("http", "timed_batch", "INPUT0", (1, 4)),
    MixEntry("grpc", "timed_batch", "INPUT0", (1, 4)),
    MixEntry("http", "crash_probe", "INPUT0", (1, 4)),
    MixEntry("grpc", "crash_probe", "INPUT0", (1, 4)),
)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    run_dir = tmp_path_factory.mktemp("query_of_death")
    fleet = local_fleet(run_dir)
    for host in fleet["hosts"]:
        if host["name"] in GPU_HOSTS:
            host["launch"]["models"] = ["timed_batch", "crash_probe"]
    fleet["models"].append({"name": "crash_probe", "tiers": ["gpu"]})
    stack = start_stack(run_dir, fleet)
    try:
        yield stack
    finally:
        stop_stack(stack)


def probe(stack: Stack, data: list[float]) -> tuple[int, str, str]:
    """One crash_probe request: status, the host that served it (x-triton-host) and the body."""
    body = json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": data}]})
    host, port = stack.http_url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("POST", "/v2/models/crash_probe/infer", body, {"content-type": "application/json"})
        response = conn.getresponse()
        return response.status, response.getheader("x-triton-host") or "", response.read().decode()
    finally:
        conn.close()


def test_a_query_of_death_kills_one_host_once(stack: Stack) -> None:
    pids = {name: pid_of(stack, name) for name in GPU_HOSTS}
    load = Load(stack, MIX, 100, duration_s=16)
    try:
        load.sleep_until(3)
        sent_at = time.time()
        status, _, answer = probe(stack, MAGIC)
        assert 500 <= status < 600, (status, answer)
        time.sleep(1.0)
        dead = [name for name in GPU_HOSTS if not alive(pids[name])]
        assert len(dead) == 1, f"the query of death killed {dead}"
        (victim,) = dead
        (survivor,) = [name for name in GPU_HOSTS if name != victim]

        wait_for(lambda: not routable(stack, victim), 10, f"the picker to see {victim} down")
        time.sleep(0.5)  # the picker notices on its next Envoy poll
        for _ in range(3):
            status, served, answer = probe(stack, MAGIC)
            assert status == 503 and "identical request" in json.loads(answer)["error"], (status, answer)
            assert served == "", "the picker answered itself"
        assert alive(pid_of(stack, survivor)), "the identical request reached the other host"
        # Another request to the same model is served, by the host that is left.
        status, served, _ = probe(stack, [1.0, 2.0, 3.0, 4.0])
        assert status == 200 and served.endswith(str(stack.host(survivor)["http_port"]))

        wait_for(
            lambda: pid_of(stack, victim) != pids[victim] and routable(stack, victim, ["crash_probe"]),
            60,
            f"{victim} restarted by extproc up and routable again",
            interval_s=0.5,
        )
        result = load.result()
    finally:
        load.kill()
    assert pid_of(stack, survivor) == pids[survivor]
    # Other traffic: only what the dying host had already received failed, and nothing was lost.
    bad = result.not_ok()
    assert result.lost == 0, result.describe()
    assert all(o.sent < sent_at + 1.0 and o.status in {"http 503", "grpc UNAVAILABLE"} for o in bad), result.describe()
    assert len(bad) < 20, result.describe()
    assert result.sent - len(bad) > 1400
    # The restarted host serves again.
    hosts = {probe(stack, [5.0, 6.0, 7.0, float(i)])[1] for i in range(40)}
    assert any(h.endswith(str(stack.host(victim)["http_port"])) for h in hosts), hosts
    assert '"host_down_requests_quarantined"' in stack.log("picker")
