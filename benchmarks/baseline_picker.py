"""The simple expected-completion picker of issue 18, as a real ext_proc processor: ``benchmarks.routing``'s
``baseline`` policy, the bar a routing change has to clear besides Envoy's own balancers.

It does what :mod:`benchmarks.sim.policies`' ``expected_completion_baseline`` does in simulation, and nothing
more: every 20 ms it reads Envoy's ``rq_active`` per host from the admin API and counts its own picks since;
every ``picker.poll.triton_metrics_ms`` it reads each host's Triton counters and smooths each (host, model)'s
mean execution time per request (``Δcompute_infer / Δrequest_success``); each request goes to the hosts that
serve its model (the fleet file's ``launch.models``), ranked by ``(in_flight / max_batch + 1) x
mean_batch_time`` (``max_batch`` from the model's config). It answers the way the picker does (tier and hosts
headers), on the picker's socket, behind the same rendered Envoy, so only the decision differs.

    python -m benchmarks.baseline_picker --config FLEET.yaml
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import urllib.request
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from aiohttp import web
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

from extproc.config import Fleet, HostSpec, load_fleet
from extproc.datapath.protocol.parse import grpc_method, parse_rest_path
from extproc.datapath.protocol.response import routing_answer
from extproc.telemetry.envoy_admin import parse_clusters
from extproc.telemetry.triton_metrics import Counters, TritonSnapshot, model_deltas, parse_metrics

ENVOY_POLL_S = 0.02
SMOOTHING = 0.5  # the weight of a new sample, as the simulator's baseline
_DEFAULT_BATCH_MS = 1.0


class Baseline:
    """The telemetry and the ranking."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.hosts = list(fleet.hosts)
        self.serving = {m.name: [h for h in self.hosts if h.launch and m.name in h.launch.models] for m in fleet.models}
        self.polled = {h.name: 0 for h in self.hosts}  # Envoy's rq_active at the last poll
        self.picks = {h.name: 0 for h in self.hosts}  # own picks since
        self.batch_ms: dict[tuple[str, str], float] = {}
        self.max_batch: dict[str, float] = {}
        self._last: dict[str, TritonSnapshot] = {}
        self._endpoints = {e: h.name for h in self.hosts for e in (h.http_endpoint, h.grpc_endpoint)}
        self.ready = False  # after the first read of Envoy's counts

    def rank(self, model: str | None) -> list[HostSpec]:
        hosts = self.serving.get(model, self.hosts) if model is not None else self.hosts
        max_batch = self.max_batch.get(model or "", 1.0)

        def cost(h: HostSpec) -> float:
            times = [v for (name, m), v in self.batch_ms.items() if name == h.name and (model is None or m == model)]
            batch_ms = sum(times) / len(times) if times else _DEFAULT_BATCH_MS
            return ((self.polled[h.name] + self.picks[h.name]) / max_batch + 1.0) * batch_ms

        ranked = sorted(hosts, key=cost)[: self.fleet.picker.max_hosts]
        if ranked:
            self.picks[ranked[0].name] += 1
        return ranked

    def apply_envoy(self, doc: Any) -> None:
        active = dict.fromkeys(self.polled, 0)
        for endpoint, status in parse_clusters(doc).items():
            name = self._endpoints.get(endpoint)
            if name is not None:
                active[name] += status.rq_active
        self.polled = active
        self.picks = dict.fromkeys(self.picks, 0)
        self.ready = True

    def apply_metrics(self, host: HostSpec, text: str) -> None:
        current = parse_metrics(text)
        previous = self._last.get(host.name)
        self._last[host.name] = current
        if previous is None:
            return
        for model, delta in model_deltas(previous, current).items():
            _smooth(self.batch_ms, (host.name, model), delta)


def _smooth(batch_ms: dict[tuple[str, str], float], key: tuple[str, str], delta: Counters) -> None:
    if delta.request_success <= 0:
        return
    sample = delta.compute_infer_us / delta.request_success / 1000.0
    old = batch_ms.get(key)
    batch_ms[key] = sample if old is None else SMOOTHING * sample + (1 - SMOOTHING) * old


class Processor(ep_grpc.ExternalProcessorServicer):  # type: ignore[misc]  # xds-protos ships no stubs
    def __init__(self, baseline: Baseline) -> None:
        self.baseline = baseline

    async def Process(
        self, request_iterator: AsyncIterator[ep.ProcessingRequest], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[ep.ProcessingResponse]:
        async for message in request_iterator:
            path = next((h.raw_value.decode() for h in message.request_headers.headers.headers if h.key == ":path"), "")
            grpc_call = grpc_method(path) is not None
            # gRPC names its model in the body: the baseline ranks by every model's times there.
            ranked = self.baseline.rank(None if grpc_call else parse_rest_path(path).model)
            if not ranked:
                return
            endpoints = ",".join(h.grpc_endpoint if grpc_call else h.http_endpoint for h in ranked)
            yield routing_answer(ranked[0].tier, endpoints)
            # Only the headers are needed: ending the stream lets Envoy pass the body on without asking.
            return


def _get(url: str, timeout_s: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        data: bytes = response.read()
        return data


async def _poll_envoy(baseline: Baseline) -> None:
    admin = baseline.fleet.envoy.admin
    url = f"http://{admin.address}:{admin.port}/clusters?format=json"
    while True:
        with contextlib.suppress(OSError, ValueError):
            baseline.apply_envoy(json.loads(await asyncio.to_thread(_get, url, 1.0)))
        await asyncio.sleep(ENVOY_POLL_S)


async def _scrape(baseline: Baseline, host: HostSpec) -> None:
    every_s = baseline.fleet.picker.poll.triton_metrics_ms / 1000.0
    while True:
        with contextlib.suppress(OSError, ValueError):
            baseline.apply_metrics(host, (await asyncio.to_thread(_get, host.metrics_url, 1.0)).decode())
        await asyncio.sleep(every_s)


def _max_batch(baseline: Baseline) -> None:
    for model, hosts in baseline.serving.items():
        for host in hosts:
            with contextlib.suppress(OSError, ValueError):
                config = json.loads(_get(f"http://{host.http_endpoint}/v2/models/{model}/config", 2.0))
                baseline.max_batch[model] = float(max(1, int(config.get("max_batch_size", 0))))
                break


async def serve(fleet: Fleet) -> None:
    baseline = Baseline(fleet)
    await asyncio.to_thread(_max_batch, baseline)
    server = grpc.aio.server()
    ep_grpc.add_ExternalProcessorServicer_to_server(Processor(baseline), server)
    for address in fleet.picker.listen_addresses[:1]:
        server.add_insecure_port(address)
    await server.start()
    tasks = [asyncio.create_task(_poll_envoy(baseline))]
    tasks += [asyncio.create_task(_scrape(baseline, h)) for h in fleet.hosts]
    app = web.Application()

    async def ready(_: web.Request) -> web.Response:
        return web.Response(status=200 if baseline.ready else 503)

    app.router.add_get("/ready", ready)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, fleet.picker.metrics_address, fleet.picker.metrics_port).start()
    try:
        await server.wait_for_termination()
    finally:
        for task in tasks:
            task.cancel()
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.baseline_picker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the fleet file (as benchmarks.routing writes it per policy)")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(load_fleet(args.config)))


if __name__ == "__main__":
    main()
