"""Scale from zero on the real stack: ``crash_probe`` is in every host's repository and loaded on none; the
fleet file lets placement manage it with ``placement.scale_from_zero``. In ``hold`` the first request waits
while the picker loads it and is served; in ``refuse`` (after an unload, and a reload of the fleet file)
the first requests get 503 with retry-after and a later one is served. Readiness probes load nothing."""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.stack import Stack, local_fleet, picker_view, routable, start_stack, stop_stack, wait_for

pytestmark = pytest.mark.e2e

MODEL = "crash_probe"  # harmless unless a request holds 13.0 (triton_models/crash_probe)
BODY = json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]})
HOSTS = ("triton-a", "triton-b")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    run_dir = tmp_path_factory.mktemp("scale-from-zero")
    fleet = local_fleet(run_dir)
    fleet["models"].append({"name": MODEL, "tiers": ["gpu"]})
    fleet["placement"] = {
        "scale_from_zero": {"mode": "hold", "hold_ms": 9000},
        "models": {MODEL: {"min_copies": 0}},
    }
    stack = start_stack(run_dir, fleet)
    yield stack
    stop_stack(stack)


def infer(stack: Stack) -> tuple[int, dict[str, str], str]:
    request = urllib.request.Request(
        f"http://{stack.http_url}/v2/models/{MODEL}/infer",
        data=BODY.encode(),
        headers={"content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


def ready_on(stack: Stack) -> list[str]:
    return [h for h in HOSTS if MODEL in picker_view(stack, h).get("ready", {})]


def set_mode(stack: Stack, mode: str) -> None:
    """Rewrite the fleet file; the picker reloads it within a second of the change."""
    path = stack.run_dir / "fleet.yaml"
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    data["placement"]["scale_from_zero"]["mode"] = mode
    path.write_text(yaml.safe_dump(data))


def unload(stack: Stack, host: str) -> None:
    """Through the host's own repository API, with the fleet's admin key (the gateway refuses it)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{stack.host(host)['http_port']}/v2/repository/models/{MODEL}/unload",
        data=b"{}",
        headers=stack.admin_headers(),
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200


def test_hold_serves_the_first_request_of_a_model_no_host_has_loaded(stack: Stack) -> None:
    wait_for(lambda: all(routable(stack, h) for h in HOSTS), 60, "both GPU-tier hosts routable")
    assert ready_on(stack) == []
    # A readiness probe is answered (not ready), and loads nothing.
    probe = urllib.request.Request(f"http://{stack.http_url}/v2/models/{MODEL}/ready")
    with pytest.raises(urllib.error.HTTPError) as not_ready:
        urllib.request.urlopen(probe, timeout=10)
    assert not_ready.value.code == 400
    time.sleep(1.5)
    assert ready_on(stack) == [], "a readiness probe loaded the model"
    started = time.monotonic()
    status, headers, body = infer(stack)
    assert status == 200, (status, body, stack.log("picker")[-3000:])
    assert json.loads(body)["outputs"][0]["data"] == [1.0, 2.0, 3.0, 4.0]
    assert time.monotonic() - started < 9.5
    wait_for(lambda: len(ready_on(stack)) == 1, 10, "the copy in the picker's view")
    (loaded,) = ready_on(stack)
    assert headers.get("x-triton-host") == f"127.0.0.1:{stack.host(loaded)['http_port']}"
    assert stack.log("picker").count('"scale_from_zero_load"') == 1
    with urllib.request.urlopen(stack.metrics_url, timeout=5) as response:
        metrics = response.read().decode()
    assert f'extproc_scale_from_zero_loads_total{{model="{MODEL}",outcome="done"}} 1.0' in metrics


def test_hold_outlasts_a_body_sent_after_the_load_began(stack: Stack) -> None:
    """Envoy gives each body chunk it sends the picker a new message timeout, also while the picker holds the
    request's headers: a body that reaches the gateway after the load began is waited for again, so the
    request is still held and served, not sent on without the picker to a host that lacks the model."""
    for host in ready_on(stack):
        unload(stack, host)
    wait_for(lambda: ready_on(stack) == [], 15, "the model unloaded in the picker's view")
    # For three repository polls after a load the picker takes the model for loaded and not yet seen READY,
    # and answers 503 (loading) instead of loading it again.
    time.sleep(3 * stack.fleet["picker"]["poll"]["repository_ms"] / 1000)
    loads = stack.log("picker").count('"scale_from_zero_load"')
    address, port = stack.http_url.rsplit(":", 1)
    connection = http.client.HTTPConnection(address, int(port), timeout=30)
    connection.putrequest("POST", f"/v2/models/{MODEL}/infer")
    connection.putheader("content-type", "application/json")
    connection.putheader("content-length", str(len(BODY)))
    connection.endheaders()
    wait_for(lambda: stack.log("picker").count('"scale_from_zero_load"') > loads, 15, "the picker to start a load")
    # Loading the model takes longer than what is left of the message timeout after this.
    time.sleep(0.2)
    connection.send(BODY.encode())
    response = connection.getresponse()
    body = response.read().decode()
    assert response.status == 200, (response.status, body)
    assert json.loads(body)["outputs"][0]["data"] == [1.0, 2.0, 3.0, 4.0]
    connection.close()


def test_refuse_answers_503_with_retry_after_until_the_copy_is_ready(stack: Stack) -> None:
    for host in ready_on(stack):
        unload(stack, host)
    wait_for(lambda: ready_on(stack) == [], 15, "the model unloaded in the picker's view")
    set_mode(stack, "refuse")
    wait_for(lambda: "config_reloaded" in stack.log("picker"), 15, "the picker to reload its fleet file")
    status, headers, body = infer(stack)
    assert status == 503, (status, body)
    assert int(headers["retry-after"]) >= 1
    assert "loading it" in json.loads(body)["error"]
    served = wait_for(lambda: infer(stack)[0] == 200, 60, "a request served once the copy is READY")
    assert served < 60
    assert stack.log("picker").count('"scale_from_zero_load"') == 3
