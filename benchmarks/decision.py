"""``python -m benchmarks.decision``: the picker's in-process decision time over synthetic fleets.

Times three things per fleet size, in one process, side by side: ``Scheduler.decide`` alone; the same
right after a telemetry change (the datastore told of a write before every decision, so the scheduler
prepares the model's candidates again each time, as it does for the first request after each poll); and the
whole per-request path of the ext_proc edge (parse Envoy's ProcessingRequest bytes, decide, build and
serialise the ProcessingResponse), which is what one request costs the picker apart from gRPC itself.

The requests are inference requests, admission checked, as the edge makes them. Nothing answers the
picks, so every ``POLL_EVERY`` decisions (untimed) each host's in-flight estimate restarts from its
synthetic Envoy count, as the picker's reads of Envoy do: without that the picks would pile up until every
inference request was refused as overloaded, and the benchmark would time the refusal.

``--workers N``: also as one of N workers sharing their picks (``picker.share_worker_picks``), each other
worker making one pick between two of this one's decisions (Envoy hands each worker 1/N of the requests):
the decision then applies the others' picks and publishes its own.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import sys
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from pathlib import Path
from typing import Any, Final

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from benchmarks import quiet_logs
from extproc.config import Fleet, parse_fleet
from extproc.datapath.datastore import Datastore
from extproc.datapath.metrics import PickerMetrics
from extproc.datapath.scheduling.scheduler import Scheduler
from extproc.datapath.scheduling.types import InferenceRequest, Protocol, Route
from extproc.datapath.shared_picks import SharedPicks
from extproc.handlers.server import Processor

MODELS = ("resnet", "bert", "mlp", "embed")
# Decisions between two reads of the synthetic fleet's Envoy counts (the picker reads Envoy every 20 ms; at
# 500 requests a second that is 10 of them).
POLL_EVERY: Final = 10
# The models other than mlp, the one the requests name, in the order --models adds them.
_OTHERS = tuple(m for m in MODELS if m != "mlp")


def synthetic_fleet(n_hosts: int, picker: str = "argmax") -> tuple[Fleet, Datastore]:
    """``n_hosts`` GPU hosts, each with three of the four models READY and some load, scheduled with the
    ``picker`` of the default profile."""
    hosts = [
        {"name": f"h{i}", "address": f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", "tier": "gpu"}
        for i in range(n_hosts)
    ]
    fleet = parse_fleet(
        {"hosts": hosts, "models": [{"name": m} for m in MODELS], "picker": {"profile": {"picker": picker}}}
    )
    store = Datastore(fleet)
    now = store.now()
    for i, host in enumerate(store.hosts.values()):
        ready = {m: frozenset({"1"}) for j, m in enumerate(MODELS) if (i + j) % 4}
        store.update_index(host, ready, frozenset(ready), now + 3600)
        host.metrics_at = host.envoy_at = now + 3600  # stays fresh for the whole run
        host.envoy.active = i % 7
        host.load.service_ms = 2.0 + i % 3
        host.load.queue_ms = float(i % 5)
        host.load.gpu_memory_used, host.load.gpu_memory_total = (i % 10) * 10**9, 80 * 10**9
    store.changed()
    return fleet, store


def poll_envoy(store: Datastore) -> None:
    """Envoy's counts read again: each host's in-flight estimate restarts from its synthetic count (see the
    module docstring)."""
    now = store.now()
    for host in store.hosts.values():
        host.reset_estimate(host.envoy_count(host.envoy.active), now)


def every(n: int, action: Callable[[], None]) -> Callable[[], None]:
    """A function that runs ``action`` on its first call and every ``n`` calls after."""
    calls = itertools.count()
    return lambda: action() if next(calls) % n == 0 else None


def _percentiles(samples_ns: list[int]) -> dict[str, float]:
    ordered = sorted(samples_ns)
    n = len(ordered)
    return {
        "p50_us": ordered[n // 2] / 1e3,
        "p99_us": ordered[min(n - 1, int(n * 0.99))] / 1e3,
        "mean_us": statistics.fmean(ordered) / 1e3,
    }


def _time(fn: Callable[[], object], iterations: int, before: Callable[[], None] | None = None) -> list[int]:
    """``fn``'s time, ``iterations`` times (``before`` runs ahead of each, untimed)."""
    clock = time.perf_counter_ns
    samples = []
    for _ in range(iterations):
        if before is not None:
            before()
        start = clock()
        fn()
        samples.append(clock() - start)
    return samples


# The request-headers message of a small REST inference request as Envoy sends it to the picker: the
# ext_proc filter's forward_rules pass only the headers the picker reads (READ_HEADERS), and a client
# sends none of the optional ones (hint, priority, sequence id) here.
REST_REQUEST_HEADERS = (
    (":path", "/v2/models/{model}/infer"),
    ("content-length", "512"),
    ("x-request-id", "8d3e2f0c-5a0e-4a53-9d0b-3c2b8e1f4a77"),
)


def rest_request_bytes(model: str) -> bytes:
    headers = [(k, v.format(model=model)) for k, v in REST_REQUEST_HEADERS]
    message = ep.ProcessingRequest(
        request_headers=ep.HttpHeaders(
            headers=base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers])
        )
    )
    return bytes(message.SerializeToString())


async def one_stream(processor: Processor, payload: bytes) -> bytes:
    """One ext_proc stream of the request-headers message ``payload`` through ``processor``, as gRPC runs it
    (see :func:`extproc.handlers.server.add_to_server`): the bytes in, the answer serialised."""

    async def requests() -> AsyncGenerator[bytes, None]:
        yield payload

    out = b""
    incoming = requests()
    async for response in processor.Process(incoming, None):  # type: ignore[arg-type]
        out = response.SerializeToString()
    # The processor ends the stream after its answer, as it does with Envoy; closing the request side here
    # keeps asyncio from finalising it later (and warning about the pending task at exit).
    await incoming.aclose()
    return out


def _measure(
    n_hosts: int,
    iterations: int,
    picker: str,
    loop: asyncio.AbstractEventLoop,
    workers: int = 1,
    models: int = 1,
) -> dict[str, Any]:
    fleet, store = synthetic_fleet(n_hosts, picker)
    hosts = list(store.hosts.values())
    others: list[SharedPicks] = []
    shared: SharedPicks | None = None
    if workers > 1:
        buffer = memoryview(bytearray(SharedPicks.size(workers)))
        shared = SharedPicks(buffer, workers, 0)
        others = [SharedPicks(buffer, workers, k) for k in range(1, workers)]
    scheduler = Scheduler(fleet, store, pick_weight=workers, shared_picks=shared)
    picks = 0

    def others_pick() -> None:
        """Each other worker's pick since this one's last decision (made after the fleet's Envoy polls,
        which synthetic_fleet dates an hour ahead, so that they count)."""
        nonlocal picks
        for other in others:
            picks += 1
            other.publish(hosts[picks * 7919 % len(hosts)], "mlp", 1.0, store.now() + 7200)

    processor = Processor(fleet, scheduler, PickerMetrics(store))
    request = InferenceRequest(Protocol.HTTP, "mlp", size_bytes=512, infer=True)
    # With several models the requests take turns among them, so that the hosts' in-flight estimates hold
    # picks of several models, as on a fleet whose hosts serve several (the scorer then reads each model's
    # part of a host's count).
    others_turns = (InferenceRequest(Protocol.HTTP, m, size_bytes=512, infer=True) for m in _OTHERS)
    turns = itertools.cycle([request, *others_turns][:models])

    def decide_one() -> None:
        scheduler.decide(next(turns))

    poll = every(POLL_EVERY, lambda: poll_envoy(store))

    def before() -> None:
        poll()
        others_pick()

    payload = rest_request_bytes("mlp")
    for _ in range(200):  # warm-up
        poll()
        decide_one()
        loop.run_until_complete(one_stream(processor, payload))
    _check_routes(scheduler, request, n_hosts)

    def after_change() -> None:
        store.changed()
        decide_one()

    # One model: the same call as without --models, so that its timings compare with earlier results.
    decide = _time(decide_one if models > 1 else lambda: scheduler.decide(request), iterations, before)
    changed = _time(after_change, iterations, before)
    # What the edge runs once it has answered such a decision, off the decision's time (a plan of more
    # than INLINE_PREPARE_HOSTS hosts, prepared again; nothing for a smaller one).
    refresh = []
    for _ in range(iterations):
        poll()
        after_change()
        refresh += _time(scheduler.refresh, 1)
    edge = _time(lambda: loop.run_until_complete(one_stream(processor, payload)), iterations, poll)
    # Still routing: what was timed was the decision, not the refusal of an overloaded fleet.
    _check_routes(scheduler, request, n_hosts)
    return {
        "hosts": n_hosts,
        "picker": picker,
        "workers": workers,
        "models": models,
        # Hosts whose in-flight estimate holds picks of several models at the end (the path --models times).
        "hosts_with_several_models": sum(len(h.model_estimates) > 1 for h in hosts),
        # The other workers' picks the decisions applied (none lost, none skipped: the benchmark's premise).
        "picks_applied": shared.taken()[0] if shared is not None else 0,
        "decide": _percentiles(decide),
        "decide_after_change": _percentiles(changed),
        "refresh_after_answer": _percentiles(refresh),
        "edge": _percentiles(edge),
    }


def _check_routes(scheduler: Scheduler, request: InferenceRequest, n_hosts: int) -> None:
    if not isinstance(scheduler.decide(request), Route):
        raise RuntimeError(f"the synthetic fleet of {n_hosts} hosts does not route {request.model!r}")


def run(
    sizes: Sequence[int], iterations: int, pickers: Sequence[str], workers: Sequence[int] = (1,), models: int = 1
) -> list[dict[str, Any]]:
    results = []
    loop = asyncio.new_event_loop()
    try:
        for picker in pickers:
            for n in sizes:
                for count in workers:  # side by side, per fleet size
                    results.append(_measure(n, iterations, picker, loop, count, models))
                    print(f"  {picker}: {n} hosts, {count} worker(s) done", file=sys.stderr, flush=True)
    finally:
        loop.close()
    return results


def report(
    sizes: Sequence[int],
    iterations: int,
    pickers: Sequence[str],
    json_out: str | None,
    workers: Sequence[int] = (1,),
    models: int = 1,
) -> int:
    """Runs the benchmark, prints its table and the p99 ratios between fleet sizes, writes the JSON if asked."""
    print(
        f"decision benchmark: {iterations} decisions per fleet size and picker, requests of {models} model(s)",
        file=sys.stderr,
    )
    results = run(sizes, iterations, pickers, workers, models)
    print(
        f"{'picker':>13} {'hosts':>6} {'workers':>7} | {'decide p50':>10} {'p99':>8} |"
        f" {'after change p50':>16} {'p99':>8} | {'then refresh p50':>16} {'p99':>8} | {'edge p50':>9} {'p99':>8}  (µs)"
    )
    for r in results:
        d, c, f, e = r["decide"], r["decide_after_change"], r["refresh_after_answer"], r["edge"]
        print(
            f"{r['picker']:>13} {r['hosts']:>6} {r['workers']:>7} | {d['p50_us']:>10.1f} {d['p99_us']:>8.1f} |"
            f" {c['p50_us']:>16.1f} {c['p99_us']:>8.1f} | {f['p50_us']:>16.1f} {f['p99_us']:>8.1f} |"
            f" {e['p50_us']:>9.1f} {e['p99_us']:>8.1f}"
        )
    for picker in pickers:
        for count in workers:
            rows = [r for r in results if r["picker"] == picker and r["workers"] == count]
            base = rows[0]
            for r in rows[1:]:
                ratio = r["decide"]["p99_us"] / base["decide"]["p99_us"]
                print(
                    f"{picker}, {count} worker(s): decide p99 at {r['hosts']} hosts / at {base['hosts']} hosts:"
                    f" {ratio:.2f}x"
                )
    if json_out:
        Path(json_out).write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.decision", description="In-process decision time over synthetic fleets."
    )
    parser.add_argument("--hosts", type=int, nargs="+", default=[10, 100, 1000], help="fleet sizes")
    parser.add_argument("--iterations", type=int, default=20000, help="decisions per fleet size and picker")
    parser.add_argument("--pickers", nargs="+", default=["argmax", "power_of_two"], help="profiles to time")
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[1], help="also as one of N workers sharing picks, e.g. 1 4"
    )
    parser.add_argument(
        "--models",
        type=int,
        choices=range(1, len(MODELS) + 1),
        default=1,
        help="requests take turns among this many models (1: mlp only)",
    )
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if any(n < 1 for n in args.workers):
        parser.error("--workers: each count must be at least 1")
    return report(args.hosts, args.iterations, args.pickers, args.json, args.workers, args.models)


if __name__ == "__main__":  # pragma: no cover
    quiet_logs()
    sys.exit(main())
