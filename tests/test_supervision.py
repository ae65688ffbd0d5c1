"""``extproc up`` restarts a Triton host that dies: the restart policy alone, the process plumbing on
``sh`` and ``sleep``, and a real host SIGKILLed under the real stack.

The tests that start a server (a lone Envoy, the stack) carry the e2e mark."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from structlog.testing import capture_logs

from benchmarks.ports import free_ports
from extproc.config import load_fleet
from extproc.datapath.headers import UPSTREAM_HOST_HEADER
from extproc.runtime import stack as runtime
from extproc.runtime.process import RestartPolicy, Supervisor, describe_exit, end_group, group_members
from tests.stack import (
    ProcessSpec,
    Stack,
    StackDidNotStart,
    alive,
    children,
    follow_until_ready,
    http_status,
    launch,
    local_fleet,
    routable,
    start_stack,
    stop_processes,
    stop_stack,
    triton_shm_regions,
    wait_for,
)

# ---------------------------------------------------------------------------------------- the restart policy


def test_backoff_doubles_then_gives_up() -> None:
    policy = RestartPolicy(first_delay_s=1.0, max_delay_s=30.0, max_exits=5, window_s=300.0)
    assert [policy.on_exit(float(t)) for t in range(6)] == [1.0, 2.0, 4.0, 8.0, 16.0, None]


def test_backoff_is_capped() -> None:
    policy = RestartPolicy(first_delay_s=1.0, max_delay_s=5.0, max_exits=10, window_s=300.0)
    assert [policy.on_exit(float(t)) for t in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_exits_older_than_the_window_are_forgotten() -> None:
    policy = RestartPolicy(first_delay_s=1.0, max_delay_s=30.0, max_exits=2, window_s=60.0)
    assert policy.on_exit(0.0) == 1.0
    assert policy.on_exit(30.0) == 2.0
    # The exit at 0 s is out of the window: two exits in it, not three, so not given up.
    assert policy.on_exit(60.0) == 2.0
    assert policy.on_exit(200.0) == 1.0


def test_exit_descriptions() -> None:
    assert describe_exit(0) == "code 0"
    assert describe_exit(1) == "code 1"
    assert describe_exit(-signal.SIGKILL) == "signal SIGKILL"
    assert describe_exit(-signal.SIGABRT) == "signal SIGABRT"


# ------------------------------------------------------------------------------------- the process plumbing


def test_exited_child_is_cleared_then_restarted_in_place(tmp_path: Path) -> None:
    """A group leader that exits leaving a process behind (as Triton leaves its python-backend stubs): the
    exit is seen without reaping it, the leftover is killed, and the restart takes the child's place."""
    supervisor = Supervisor(tmp_path)
    try:
        first = supervisor.start("first", ["sleep", "60"])
        child = supervisor.start("leader", ["sh", "-c", "sleep 60 & exit 3"])
        last = supervisor.start("last", ["sleep", "60"])
        pid = child.process.pid
        wait_for(child.has_exited, 10, "the leader to exit")
        assert child.process.returncode is None, "has_exited() must not reap"
        leftovers = group_members(pid)
        assert len(leftovers) == 1 and leftovers != [pid]
        assert end_group(pid) == []
        assert not alive(leftovers[0])
        assert describe_exit(child.process.wait()) == "code 3"
        restarted = supervisor.restart(child)
        assert restarted.process.pid != pid
        assert (restarted.name, restarted.argv, restarted.env) == (child.name, child.argv, child.env)
        assert supervisor.children == [first, restarted, last]
    finally:
        supervisor.stop(timeout_s=5)


def test_a_running_child_is_not_restarted(tmp_path: Path) -> None:
    supervisor = Supervisor(tmp_path)
    try:
        child = supervisor.start("running", ["sleep", "60"])
        assert not child.has_exited()
        with pytest.raises(ValueError, match="not been reaped"):
            supervisor.restart(child)
    finally:
        supervisor.stop(timeout_s=5)


def test_a_host_that_keeps_exiting_is_left_down(tmp_path: Path) -> None:
    """The supervision loop on a stand-in for Triton that exits at once: restarted (its new pid written to
    processes.json) until the policy gives up, then one error line, and it stays down."""
    config = tmp_path / "fleet.yaml"
    hosts = [{"name": "a", "address": "127.0.0.1", "tier": "gpu"}]
    config.write_text(yaml.safe_dump({"hosts": hosts, "runtime_dir": str(tmp_path)}))
    stack = runtime.Stack(load_fleet(config), config)
    stack.supervisor.start("crashing", ["sh", "-c", "exit 3"])
    # What _start_triton registers for a launched host, with a policy that gives up after two restarts.
    stack._restarts["crashing"] = runtime._Restarts(RestartPolicy(first_delay_s=0.01, max_exits=2))
    stop = threading.Event()
    supervising = threading.Thread(target=stack.supervise, args=(stop,))
    with capture_logs() as logs:
        supervising.start()
        try:
            wait_for(lambda: any(e["event"] == "triton_left_down" for e in logs), 15, "the host to be left down")
            time.sleep(1.0)  # two more rounds of the loop: nothing more happens to it
        finally:
            stop.set()
            supervising.join(timeout=5)
    assert [e["event"] for e in logs] == [
        "triton_exited",
        "triton_restarted",
        "triton_exited",
        "triton_restarted",
        "triton_left_down",
    ]
    assert [e["restarts"] for e in logs] == [0, 1, 1, 2, 2]
    assert {e["exit"] for e in logs if "exit" in e} == {"code 3"}
    left_down = logs[-1]
    assert left_down["log_level"] == "error"
    assert left_down["reason"].startswith("exited 3 times within 300 s")
    (last,) = stack.supervisor.children
    assert json.loads((tmp_path / "processes.json").read_text()) == {"crashing": last.process.pid}
    assert left_down["pid"] == last.process.pid and last.process.returncode == 3


# ------------------------------------------------------------------------------- a start-up that stalls


def test_ready_is_seen_when_it_arrives_with_other_lines() -> None:
    """The harness's wait for READY, on a process that prints its progress and READY in one write and then
    stays: READY is seen at once, and every line is kept."""
    process = subprocess.Popen(
        ["sh", "-c", "printf 'waiting for Envoy\\nwaiting for the gateway\\nREADY http://x\\n'; sleep 30"],
        stdout=subprocess.PIPE,
        text=True,
    )
    output: list[str] = []
    try:
        assert follow_until_ready(process, output, timeout_s=10)
    finally:
        process.kill()
        process.wait()
    assert output == ["waiting for Envoy", "waiting for the gateway", "READY http://x"]


def test_a_process_that_exits_without_ready_is_not_waited_for() -> None:
    process = subprocess.Popen(["sh", "-c", "echo 'start-up failed'; exit 1"], stdout=subprocess.PIPE, text=True)
    output: list[str] = []
    assert not follow_until_ready(process, output, timeout_s=60)
    assert process.wait(timeout=5) == 1 and output == ["start-up failed"]


@pytest.mark.e2e
def test_a_stack_that_cannot_start_is_reported_with_why(tmp_path: Path) -> None:
    """The test harness's start: a refused fleet file ends `extproc up` at once, and the error carries the
    refusal."""
    fleet = local_fleet(tmp_path)
    fleet["picker"]["no_such_key"] = 1
    started = time.monotonic()
    with pytest.raises(StackDidNotStart, match=r"(?s)did not print READY.*no_such_key"):
        start_stack(tmp_path, fleet)
    assert time.monotonic() - started < 60, "the harness waited for READY from a process that had exited"


@pytest.mark.e2e
def test_an_envoy_that_never_initialises_is_explained(tmp_path: Path) -> None:
    """A real Envoy waiting for its cluster discovery from a server that is not there: the timeout message of
    `extproc up` carries Envoy's server state and the initialisation target it waits for."""
    admin, xds = free_ports(2)
    bootstrap = {
        "node": {"id": "stalled", "cluster": "stalled"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "dynamic_resources": {
            "cds_config": {
                "resource_api_version": "V3",
                # No initial fetch timeout: initialisation waits for the absent server for ever.
                "initial_fetch_timeout": "0s",
                "api_config_source": {
                    "api_type": "GRPC",
                    "transport_api_version": "V3",
                    "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}],
                },
            }
        },
        "static_resources": {
            "clusters": [
                {
                    "name": "xds",
                    "type": "STATIC",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            "explicit_http_config": {"http2_protocol_options": {}},
                        }
                    },
                    "load_assignment": {
                        "cluster_name": "xds",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {"socket_address": {"address": "127.0.0.1", "port_value": xds}}
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ]
        },
    }
    config = tmp_path / "envoy.yaml"
    config.write_text(yaml.safe_dump(bootstrap))
    argv = (runtime.find_envoy(), "-c", str(config), "--disable-hot-restart", "--concurrency", "1")
    envoy = launch(ProcessSpec(argv, dict(os.environ), str(tmp_path)), tmp_path / "envoy.log")
    url = f"http://127.0.0.1:{admin}"
    try:
        wait_for(lambda: envoy.poll() is not None or http_status(url + "/ready") == 503, 30, "Envoy's admin")
        assert envoy.poll() is None, (tmp_path / "envoy.log").read_text()[-2000:]
        state = runtime._envoy_init_state(url)
    finally:
        stop_processes([envoy])
    assert "/ready: 503 INITIALIZING" in state or "/ready: 503 PRE_INITIALIZING" in state, state
    assert "cluster_manager.warming_clusters" in state, state
    assert "no answer" in runtime._envoy_init_state(url), "Envoy is stopped: its admin cannot answer"


# -------------------------------------------------------------------------------------- the real stack

HOST = "triton-a"
MODEL = "embed_normalize"  # served by triton-a alone in this fleet
EMBED_BODY = {"inputs": [{"name": "INPUT", "shape": [1, 4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}]}


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """Two hosts with one model each: a small stack that starts quickly."""
    fleet = local_fleet(tmp_path)
    hosts = {h["name"]: h for h in fleet["hosts"]}
    hosts["triton-a"]["launch"]["models"] = [MODEL]
    hosts["triton-c"]["launch"]["models"] = ["mlp_classifier"]
    fleet["hosts"] = [hosts["triton-a"], hosts["triton-c"]]
    stack = start_stack(tmp_path, fleet)
    try:
        yield stack
    finally:
        stop_stack(stack)


def infer(stack: Stack) -> tuple[int, str]:
    """Status and ``x-triton-host`` of one inference request for MODEL through the gateway."""
    request = urllib.request.Request(
        f"http://{stack.http_url}/v2/models/{MODEL}/infer", data=json.dumps(EMBED_BODY).encode()
    )
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return response.status, response.headers.get(UPSTREAM_HOST_HEADER, "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get(UPSTREAM_HOST_HEADER, "")


def events(stack: Stack, name: str) -> list[dict[str, Any]]:
    """The structured log records ``name`` that ``extproc up`` printed (JSON lines: its stderr is a pipe)."""
    found = []
    for line in list(stack.output):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == name:
            found.append(record)
    return found


@pytest.mark.e2e
def test_killed_triton_host_is_restarted(stack: Stack) -> None:
    """SIGKILL a Triton server alone, as a crash does: ``extproc up`` kills the python-backend stubs it
    left, removes their shared memory, starts the host again with the same command after 1 s, and writes
    the new pid to processes.json; the picker routes to it again once its telemetry says it is ready."""
    endpoint = f"127.0.0.1:{stack.host(HOST)['http_port']}"
    assert infer(stack) == (200, endpoint)
    old = stack.pids()[HOST]
    stubs = children(old)
    regions = triton_shm_regions(old)
    assert stubs and regions, "the host's python-backend stubs should be running"
    killed_at = time.monotonic()
    os.kill(old, signal.SIGKILL)
    # Else the wait for it to be routable again below could pass on the picker's view from before the kill.
    wait_for(lambda: not routable(stack, HOST), 10, f"the picker to see {HOST} gone")

    wait_for(lambda: stack.pids()[HOST] != old, 15, f"a new pid for {HOST} in processes.json")
    restarted_after = time.monotonic() - killed_at
    new = stack.pids()[HOST]
    assert alive(new)
    assert not [pid for pid in stubs if alive(pid)], "the dead server's stubs should be gone"
    assert not [region for region in regions if region.exists()], "its shared memory should be removed"

    wait_for(lambda: routable(stack, HOST, [MODEL]), 60, f"{HOST} routable again: {stack.picker_status()}")
    assert [infer(stack) for _ in range(5)] == [(200, endpoint)] * 5
    assert stack.pids()[HOST] == new and alive(new)

    wait_for(lambda: bool(events(stack, "triton_restarted")), 10, "the triton_restarted log line")
    (exited,) = events(stack, "triton_exited")
    assert (exited["host"], exited["pid"], exited["exit"]) == (HOST, old, "signal SIGKILL")
    assert (exited["restarts"], exited["restart_in_s"]) == (0, 1.0)
    (restarted,) = events(stack, "triton_restarted")
    assert (restarted["host"], restarted["pid"], restarted["restarts"]) == (HOST, new, 1)
    assert 1.0 <= restarted_after < 10.0, restarted_after
    assert stack.process.poll() is None, "extproc up should still be running"
