"""Overload on the real stack: deadlines reach Envoy, demand above a copy's capacity is refused at once with
a retry-after instead of queueing past its callers' deadlines, critical requests still get through, one
tenant cannot crowd out another, and a client cannot lift its deadline. The numbers (goodput per window, refusal
latency, recovery) are the overload benchmark's: ``python -m benchmarks.overload``."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from typing import Any

import aiohttp
import grpc
import pytest
from tritonclient.grpc import service_pb2

from extproc.ops.status import HttpPicker
from tests.stack import Stack, local_fleet, pid_of, start_stack, stop_stack, wait_for

pytestmark = pytest.mark.e2e

DEADLINE_MS = 2000
BODY = json.dumps(
    {"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}]}
).encode()
GRPC_INFER = "/inference.GRPCInferenceService/ModelInfer"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One copy of timed_batch, four times slower than the default (a full batch of 8 takes 96 ms: about
    80 requests a second), with a 2 s deadline; fair shares by the x-tenant header."""
    run_dir = tmp_path_factory.mktemp("overload")
    data = local_fleet(run_dir, overload={"fairness_header": "x-tenant"})
    hosts = {h["name"]: h for h in data["hosts"]}
    hosts["triton-a"]["launch"].update(models=["timed_batch"], service_time_factor=4.0)
    data["hosts"] = [hosts["triton-a"], hosts["triton-c"]]
    data["models"] = [
        {"name": "timed_batch", "tiers": ["gpu"], "deadline_ms": DEADLINE_MS},
        {"name": "mlp_classifier", "tiers": ["cpu"]},
    ]
    stack = start_stack(run_dir, data)
    try:
        yield stack
    finally:
        stop_stack(stack)


def envoy_stat(stack: Stack, name: str) -> int:
    with urllib.request.urlopen(f"{stack.admin_url}/stats?filter={name}", timeout=5) as response:
        text = response.read().decode()
    return sum(int(line.rsplit(":", 1)[1]) for line in text.splitlines() if ":" in line)


async def _post(
    session: aiohttp.ClientSession, stack: Stack, headers: dict[str, str], at: float
) -> tuple[int, float, str | None]:
    """One REST inference sent at ``at`` (loop time): status, seconds from ``at`` to the answer, retry-after."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, at - loop.time()))
    async with session.post(f"http://{stack.http_url}/v2/models/timed_batch/infer", data=BODY, headers=headers) as r:
        await r.read()
        return r.status, loop.time() - at, r.headers.get("retry-after")


async def _burst(stack: Stack, kinds: list[dict[str, str]], rate_rps: float, duration_s: float) -> list[Any]:
    """Requests at a steady ``rate_rps`` for ``duration_s``, cycling through ``kinds`` of headers."""
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        start = asyncio.get_running_loop().time() + 0.1
        n = int(rate_rps * duration_s)
        sends = [_post(session, stack, kinds[i % len(kinds)], start + i / rate_rps) for i in range(n)]
        results = await asyncio.gather(*sends)
    return [(kinds[i % len(kinds)], *result) for i, result in enumerate(results)]


@pytest.fixture(autouse=True)
def settled(stack: Stack) -> None:
    """Each test starts once the queue an earlier one left (at most a deadline's worth) has drained and
    its clients are forgotten (extproc.datapath.scheduling.fairness)."""
    time.sleep(DEADLINE_MS / 1000 + 6.0)


def test_demand_above_capacity_is_refused_at_once_and_critical_requests_get_through(stack: Stack) -> None:
    """About 2.5 times the copy's capacity for 4 s, one request in five critical: the standard ones beyond
    capacity are refused (429 with a retry-after) instead of queueing; every request admitted is answered,
    none by Envoy's deadline (the queue never grew past it), and critical requests are served."""
    standard = {"x-triton-timeout-ms": str(DEADLINE_MS)}
    critical = {**standard, "x-triton-priority": "critical"}
    timeouts_before = envoy_stat(stack, "cluster.triton_gpu_http.upstream_rq_timeout")
    results = asyncio.run(_burst(stack, [standard] * 4 + [critical], rate_rps=200, duration_s=4))
    by_kind = Counter((kind.get("x-triton-priority", "standard"), status) for kind, status, _, _ in results)
    refusals = [(took, retry) for _, status, took, retry in results if status == 429]
    assert by_kind["standard", 429] > 0.3 * len(results), by_kind
    assert by_kind["standard", 200] > 0, by_kind
    critical_sent = sum(n for (k, _), n in by_kind.items() if k == "critical")
    standard_sent = sum(n for (k, _), n in by_kind.items() if k == "standard")
    # The benchmark holds critical requests to 0.95 served on a quiet machine. Here the suite shares the
    # machine with other stacks, the host's measured times grow with it, and the picker refuses a critical
    # request whose expected completion passes its share of the deadline: fewer are served, but each class
    # keeps its place, critical refused far less often than standard.
    assert by_kind["critical", 200] >= 0.8 * critical_sent, by_kind
    assert by_kind["critical", 429] / critical_sent <= 0.25 * by_kind["standard", 429] / standard_sent, by_kind
    assert {status for _, status in by_kind} <= {200, 429}, by_kind
    assert all(retry is not None and int(retry) >= 1 for _, retry in refusals)
    assert envoy_stat(stack, "cluster.triton_gpu_http.upstream_rq_timeout") == timeouts_before
    # `extproc status` names the model as overloaded (the picker flushes its counts before each scrape).
    status = HttpPicker(stack.metrics_url.removesuffix("/metrics")).status()
    assert status.overloaded(time.time()) == ["timed_batch"]
    assert status.overload["timed_batch"].refused >= by_kind["standard", 429]


def test_fair_shares_by_the_named_header(stack: Stack) -> None:
    """Two tenants at 4:1, together about 2.5 times capacity: the lighter one, below an equal share, is
    served; the heavier one gets the refusals."""
    heavy = {"x-triton-timeout-ms": str(DEADLINE_MS), "x-tenant": "heavy"}
    light = {"x-triton-timeout-ms": str(DEADLINE_MS), "x-tenant": "light"}
    results = asyncio.run(_burst(stack, [heavy] * 4 + [light], rate_rps=200, duration_s=4))
    served = Counter((kind["x-tenant"], status == 200) for kind, status, _, _ in results)
    assert served["light", True] >= 0.9 * (served["light", True] + served["light", False]), served
    assert served["heavy", False] > 0, served


def test_the_deadline_travels_to_envoy_and_a_client_cannot_lift_it(stack: Stack) -> None:
    """With the copy's host stopped, a request admitted a moment before is answered 504 by Envoy at its
    model's 2 s deadline (the client asked for 1.5 s, which only admission uses, and sent Envoy's own header
    for 10 min), and so is a gRPC call, instead of waiting for a host that does not answer."""
    pid = pid_of(stack, "triton-a")
    os.kill(pid, signal.SIGSTOP)
    try:
        rest_headers = {"x-triton-timeout-ms": "1500", "x-envoy-upstream-rq-timeout-ms": "600000"}
        status, took, _ = asyncio.run(_burst(stack, [rest_headers], rate_rps=1, duration_s=1))[0][1:]
        # At the model's 2 s, not the client's 1.5 s (its own deadline is the client's to keep).
        assert status == 504 and DEADLINE_MS / 1000 - 0.05 <= took < 10, (status, took)
        request = service_pb2.ModelInferRequest(model_name="timed_batch")
        request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4])
        request.raw_input_contents.append(b"\0" * 16)
        with grpc.insecure_channel(stack.http_url) as channel:
            call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(GRPC_INFER)
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as failure:
                call(request.SerializeToString(), timeout=30, metadata=(("x-envoy-upstream-rq-timeout-ms", "600000"),))
            took = time.monotonic() - started
        assert isinstance(failure.value, grpc.Call)
        assert failure.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        assert took < 10, took
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: stack.picker_status() is not None, 10, "picker")
