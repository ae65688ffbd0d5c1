"""The two ext_proc processors of ``python -m benchmarks.overhead``, each run as its own process.

``python -m benchmarks.overhead.server bare --listen unix:PATH [--config FLEET]``
    The floor: the same grpc.aio server (options, uvloop) as the picker, whose servicer answers every
    request-headers message with one constant, precomputed ProcessingResponse and does nothing else. No
    Python-level ext_proc service can be much cheaper than this. The answer is an empty CommonResponse;
    with ``--config``, the routing answer the picker gives, naming the fleet's hosts (so Envoy does the same
    work with it as with the picker's: header mutation, route-cache clearing, override_host).

``python -m benchmarks.overhead.server picker --listen unix:PATH --config FLEET``
    The real picker's request path: :class:`~extproc.handlers.server.Processor` +
    :class:`~extproc.datapath.scheduling.scheduler.Scheduler` + :class:`~extproc.datapath.metrics.PickerMetrics` over a
    :class:`~extproc.datapath.datastore.Datastore`, wired as :class:`extproc.app.Picker` wires them, on the same
    grpc.aio server under uvloop. Every request gets a real decision: classify, filter (READY, healthy,
    fresh), score (expected wait, GPU memory) and rank over the fleet's hosts.

``python -m benchmarks.overhead.server epp --listen unix:PATH --config FLEET``
    The same picker, serving the Endpoint Picker Protocol as its ``picker.epp`` listener does (the same
    Processor behind ``add_to_server(..., epp=True)``), in plaintext: the gateway-shaped Envoy of
    :mod:`benchmarks.gateway` streams it both bodies and the response phases.

    There is no Triton behind the benchmark, so there is no telemetry collector: a small task plays its
    part, stamping every host's telemetry fresh and restarting the in-flight estimates (as each Envoy admin poll
    does) every :data:`TOUCH_INTERVAL_S`. The real collector's HTTP scrapes run on the same loop in
    production, but off the request path and at a fixed rate (a few per second), not per request; their
    cost is excluded from this benchmark.

Both print ``READY`` on stdout once they serve, and stop on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import uvloop
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

# The picker's own server options, so both processors run on exactly the server `extproc serve` runs.
from benchmarks.overhead.stack import READY_LINE
from extproc.app import GRPC_OPTIONS
from extproc.config import Fleet, load_fleet
from extproc.datapath.datastore import Datastore
from extproc.datapath.metrics import PickerMetrics
from extproc.datapath.protocol.response import routing_answer
from extproc.datapath.scheduling.scheduler import Scheduler
from extproc.handlers.server import Processor, add_to_server
from extproc.logs import configure

# How often the stand-in for the telemetry collector refreshes the datastore (the Envoy admin poll's
# default period, the fastest of the real poll loops).
TOUCH_INTERVAL_S = 0.2

# The bare processor's one answer: continue, change nothing.
CONSTANT_RESPONSE = ep.ProcessingResponse(request_headers=ep.HeadersResponse(response=ep.CommonResponse()))


class BareProcessor(ep_grpc.ExternalProcessorServicer):  # type: ignore[misc]  # xds-protos ships no stubs
    """Answers the request-headers message with ``answer`` and ends the stream, as the real processor does on
    routes that stream no body to it (reading on to Envoy's half-close would cost the floor another read per
    request that the picker does not pay)."""

    def __init__(self, answer: ep.ProcessingResponse = CONSTANT_RESPONSE) -> None:
        self._answer = answer

    async def Process(
        self, request_iterator: AsyncIterator[ep.ProcessingRequest], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[ep.ProcessingResponse]:
        async for _ in request_iterator:
            yield self._answer
            return


def fleet_routing_answer(fleet: Fleet) -> ep.ProcessingResponse:
    """The picker's kind of answer, constant: the first host's tier, every host of the fleet in order."""
    return routing_answer(fleet.hosts[0].tier, ",".join(h.http_endpoint for h in fleet.hosts))


def fill_datastore(store: Datastore, now: float) -> None:
    """Every host serves every model of the fleet (version 1), with some load and fresh telemetry.

    Hosts differ in service time (2, 3, 4 ms, ...) and GPU memory use, so scoring has something to rank.
    """
    models = [m.name for m in store.fleet.models]
    for i, host in enumerate(store.hosts.values()):
        store.update_index(host, {m: frozenset({"1"}) for m in models}, frozenset(models), now)
        host.load.service_ms = 2.0 + i % 3
        host.load.queue_ms = float(i % 2)
        host.load.pending = 0
        host.load.gpu_memory_used, host.load.gpu_memory_total = (1 + i % 5) * 10**9, 80 * 10**9
        host.envoy.active = 0
    touch_datastore(store, now)


def touch_datastore(store: Datastore, now: float) -> None:
    """What a successful round of telemetry polls leaves behind: fresh timestamps, picks counted afresh."""
    for host in store.hosts.values():
        host.metrics_at = host.index_at = host.envoy_at = now
        host.reset_estimate(host.envoy.active, now)
    store.changed()


async def _keep_fresh(store: Datastore) -> None:
    while True:
        await asyncio.sleep(TOUCH_INTERVAL_S)
        touch_datastore(store, store.now())


def picker_servicer(fleet: Fleet) -> tuple[Processor, Datastore]:
    store = Datastore(fleet)
    fill_datastore(store, store.now())
    processor = Processor(fleet, Scheduler(fleet, store), PickerMetrics(store))
    return processor, store


async def serve(mode: str, listen: str, config: Path | None) -> None:
    server = grpc.aio.server(options=GRPC_OPTIONS)
    refresher: asyncio.Task[None] | None = None
    if mode in ("picker", "epp"):
        if config is None:
            raise SystemExit(f"{mode} mode needs --config")
        processor, store = picker_servicer(load_fleet(config))
        add_to_server(processor, server, epp=mode == "epp")
        refresher = asyncio.create_task(_keep_fresh(store), name="keep-fresh")
    else:
        answer = CONSTANT_RESPONSE if config is None else fleet_routing_answer(load_fleet(config))
        ep_grpc.add_ExternalProcessorServicer_to_server(BareProcessor(answer), server)
    server.add_insecure_port(listen)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(READY_LINE, flush=True)
    try:
        await stop.wait()
    finally:
        if refresher is not None:
            refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresher
        await server.stop(grace=0.5)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overhead.server", description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["bare", "picker", "epp"])
    parser.add_argument("--listen", required=True, help="unix:PATH or HOST:PORT")
    parser.add_argument("--config", type=Path, help="fleet file (picker, epp; bare: answer with its hosts)")
    args = parser.parse_args(argv)
    # As `extproc serve` at its default level: routed requests log nothing.
    configure("info", "json")
    socket_path = Path(args.listen.removeprefix("unix:")) if args.listen.startswith("unix:") else None
    if socket_path is not None:
        socket_path.unlink(missing_ok=True)
        os.umask(0o077)  # owner-only socket, as the picker's
    try:
        uvloop.run(serve(args.mode, args.listen, args.config))
    finally:
        if socket_path is not None:
            socket_path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
