"""Open-loop Poisson load against one gateway, REST (aiohttp) and gRPC (grpc.aio), in its own process.

The schedule is a seeded Poisson process (exponential gaps), and which request of the mix each arrival
sends is drawn from the same seeded generator, so every policy of a benchmark replays the same trace. A mix
entry with its own ``rate_rps`` is instead a Poisson stream of its own (seeded too), optionally only between
``start_s`` and ``stop_s``: phases of a load, such as an overload that starts and stops.
Latency is measured from each request's *intended* send time, not from when it was actually sent: a
generator that falls behind must not hide the queueing it caused (coordinated omission). How far behind it
fell (actual - intended send time) is measured for every request and reported next to the latencies.

A mix entry may carry extra request headers and a client deadline (``deadline_s``, counted from the
intended send time): gRPC sends it as the call's timeout (``grpc-timeout``), REST as
``x-triton-timeout-ms``, and the client gives up at the deadline (status ``deadline``). Refusals record the
response's ``retry-after``.

Request bodies are built once per mix entry before the clock starts (REST: JSON; gRPC: a serialised
``ModelInferRequest`` sent through a pass-through serialiser), so the hot loop only schedules sends.

``python -m benchmarks.routing`` runs this module as a child process (``python -m benchmarks.loadgen SPEC OUT``)
so the generator has an event loop (and, on a 2-core machine, a scheduler slot) of its own; it prints a
progress line every second on stderr and writes the per-request records to ``OUT`` as JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import resource
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import aiohttp
import grpc
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from extproc.datapath.headers import TIER_HINT_HEADER, TIMEOUT_HEADER, UPSTREAM_HOST_HEADER

MODEL_INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
# Status of a request that got no answer within the load's timeout, and prefixes of the other outcomes.
TIMEOUT = "timeout"
# Status of a request of an entry with a deadline that got no answer by its deadline (the client gave up).
DEADLINE = "deadline"
HTTP_OK = "http 200"
GRPC_OK = "grpc OK"
OK_STATUSES = frozenset({HTTP_OK, GRPC_OK})
_GRPC_DEADLINE = f"grpc {grpc.StatusCode.DEADLINE_EXCEEDED.name}"
# The generator is "behind" when its p99 send lag exceeds this: latencies are then still honest (measured
# from the intended time) but the offered load arrived burstier than Poisson.
LAG_BEHIND_MS = 5.0
# A REST client's deadline, in whole milliseconds (gRPC clients send the standard grpc-timeout).
REST_DEADLINE_HEADER = TIMEOUT_HEADER
RETRY_AFTER_HEADER = "retry-after"
# A gRPC DEADLINE_EXCEEDED this close to the client's own deadline is the client giving up, not an answer.
_DEADLINE_SLACK_S = 0.005

Dim = Annotated[int, Field(ge=1, le=1_000_000)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MixEntry(_Strict):
    """One kind of request in the load: a model, a protocol, an input shape, a relative weight."""

    model: str = Field(min_length=1, max_length=256)
    protocol: Literal["http", "grpc"] = "http"
    weight: float = Field(default=1.0, gt=0)
    # The request's single FP32 input tensor; the first dimension is the batch.
    input: str = Field(default="INPUT0", min_length=1)
    shape: tuple[Dim, ...] = Field(default=(1, 4), min_length=1, max_length=8)
    # Sent as x-triton-tier-hint when set.
    tier_hint: Literal["cpu", "gpu"] | None = None
    # A short name for tables; default model/protocol/shape.
    name: str | None = Field(default=None, min_length=1, max_length=64)
    # Extra headers on every request of the entry (gRPC metadata keys are sent lowercased).
    headers: dict[str, str] = Field(default_factory=dict)
    # The client's deadline, from the intended send time; None: the load's timeout_s, and no deadline sent.
    deadline_s: float | None = Field(default=None, gt=0, le=300)
    # A Poisson stream of its own at this rate, between start_s and stop_s (default: the end of the load);
    # None: a share (by weight) of the load's rate_rps, for the whole load.
    rate_rps: float | None = Field(default=None, gt=0, le=5000)
    start_s: float = Field(default=0.0, ge=0)
    stop_s: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _stream(self) -> MixEntry:
        if self.rate_rps is None and (self.start_s != 0.0 or self.stop_s is not None):
            raise ValueError("start_s and stop_s need the entry's own rate_rps")
        if self.stop_s is not None and self.stop_s <= self.start_s:
            raise ValueError(f"stop_s ({self.stop_s:g}) must be after start_s ({self.start_s:g})")
        if any(not k or k != k.strip() for k in self.headers):
            raise ValueError(f"header names must be non-empty, without spaces: {sorted(self.headers)}")
        return self

    @property
    def label(self) -> str:
        if self.name is not None:
            return self.name
        return f"{self.model}/{self.protocol}/{'x'.join(str(d) for d in self.shape)}"


class LoadSpec(_Strict):
    """The offered load: an open-loop Poisson process at ``rate_rps`` for ``warmup_s + duration_s``.

    ``rate_rps`` is shared by the mix entries without a rate of their own (unused when every entry has one).
    """

    rate_rps: float = Field(gt=0, le=5000)
    duration_s: float = Field(gt=0, le=600)
    # Requests whose intended send time falls in the first ``warmup_s`` are sent but not measured.
    warmup_s: float = Field(default=2.0, ge=0, le=120)
    seed: int = Field(default=1, ge=0)
    # Per-request timeout; a request without an answer by then counts as an error ("timeout").
    timeout_s: float = Field(default=10.0, gt=0, le=300)
    mix: tuple[MixEntry, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_labels(self) -> LoadSpec:
        labels = [m.label for m in self.mix]
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        if dupes:
            raise ValueError(f"mix entries need distinct names (set name:), repeated: {dupes}")
        return self

    @property
    def total_s(self) -> float:
        return self.warmup_s + self.duration_s


@dataclass(frozen=True)
class Trace:
    """Intended send times (seconds from the start) and the mix entry of each request."""

    offsets: tuple[float, ...]
    entries: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.offsets)


def poisson_offsets(rate_rps: float, total_s: float, rng: np.random.Generator) -> list[float]:
    """Arrival times of a Poisson process of ``rate_rps`` on ``[0, total_s)``."""
    out: list[float] = []
    t = 0.0
    # Draw in blocks: one numpy call per ~second of schedule rather than per arrival.
    block = max(16, int(rate_rps) + 16)
    while True:
        for gap in rng.exponential(1.0 / rate_rps, size=block):
            t += float(gap)
            if t >= total_s:
                return out
            out.append(t)


def build_trace(load: LoadSpec) -> Trace:
    """The seeded trace: the same ``load`` always gives the same times and the same request kinds."""
    shared = [k for k, m in enumerate(load.mix) if m.rate_rps is None]
    arrivals: list[tuple[float, int]] = []
    if shared:
        rng = np.random.default_rng(load.seed)
        offsets = poisson_offsets(load.rate_rps, load.total_s, rng)
        weights = np.array([load.mix[k].weight for k in shared], dtype=np.float64)
        picks = rng.choice(len(shared), size=len(offsets), p=weights / weights.sum())
        arrivals = [(t, shared[int(p)]) for t, p in zip(offsets, picks, strict=True)]
    for k, entry in enumerate(load.mix):
        if entry.rate_rps is None:
            continue
        stop = min(load.total_s, entry.stop_s if entry.stop_s is not None else load.total_s)
        if stop <= entry.start_s:
            continue
        # Seeded per entry: adding or changing one entry leaves the others' streams as they were.
        own = poisson_offsets(entry.rate_rps, stop - entry.start_s, np.random.default_rng([load.seed, k]))
        arrivals += [(entry.start_s + t, k) for t in own]
    arrivals.sort(key=lambda a: a[0])
    return Trace(tuple(t for t, _ in arrivals), tuple(k for _, k in arrivals))


def input_tensor(entry: MixEntry, index: int, seed: int) -> np.ndarray[Any, np.dtype[np.float32]]:
    """The (fixed) input data of one mix entry."""
    return np.random.default_rng([seed, index]).standard_normal(entry.shape).astype(np.float32)


def rest_body(entry: MixEntry, data: np.ndarray[Any, np.dtype[np.float32]]) -> bytes:
    tensor = {"name": entry.input, "shape": list(entry.shape), "datatype": "FP32", "data": data.ravel().tolist()}
    return json.dumps({"inputs": [tensor]}, separators=(",", ":")).encode()


def grpc_body(entry: MixEntry, data: np.ndarray[Any, np.dtype[np.float32]]) -> bytes:
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(
        model_name=entry.model,
        inputs=[service_pb2.ModelInferRequest.InferInputTensor(name=entry.input, datatype="FP32", shape=entry.shape)],
        raw_input_contents=[data.tobytes()],
    )
    return bytes(request.SerializeToString())


def request_bodies(load: LoadSpec) -> list[bytes]:
    bodies = []
    for i, entry in enumerate(load.mix):
        data = input_tensor(entry, i, load.seed)
        bodies.append(rest_body(entry, data) if entry.protocol == "http" else grpc_body(entry, data))
    return bodies


# ----------------------------------------------------------------------------------------------- running


class RunSpec(_Strict):
    """What the child process is told: where to send the load, and a label for its progress lines."""

    label: str
    http_base: str  # http://127.0.0.1:PORT
    grpc_target: str  # 127.0.0.1:PORT
    load: LoadSpec
    progress: bool = True


@dataclass
class Records:
    """Per-request outcomes, as columns (index = position in the trace). Times in seconds from the start."""

    intended: list[float]
    entry: list[int]
    sent: list[float] = field(default_factory=list)
    done: list[float] = field(default_factory=list)
    status: list[str] = field(default_factory=list)
    host: list[str] = field(default_factory=list)
    # The response's retry-after header ("" when absent).
    retry_after: list[str] = field(default_factory=list)

    @classmethod
    def for_trace(cls, trace: Trace) -> Records:
        n = len(trace)
        return cls(
            intended=list(trace.offsets),
            entry=list(trace.entries),
            sent=[math.nan] * n,
            done=[math.nan] * n,
            status=[""] * n,
            host=[""] * n,
            retry_after=[""] * n,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "intended": self.intended,
            "entry": self.entry,
            "sent": self.sent,
            "done": self.done,
            "status": self.status,
            "host": self.host,
            "retry_after": self.retry_after,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Records:
        return cls(
            intended=[float(x) for x in data["intended"]],
            entry=[int(x) for x in data["entry"]],
            sent=[float(x) for x in data["sent"]],
            done=[float(x) for x in data["done"]],
            status=[str(x) for x in data["status"]],
            host=[str(x) for x in data["host"]],
            retry_after=[str(x) for x in data.get("retry_after", [""] * len(data["host"]))],
        )


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in [0, 100]) of an ascending sequence; NaN when empty."""
    if not ordered:
        return math.nan
    if q <= 0:
        return ordered[0]
    rank = math.ceil(q / 100.0 * len(ordered))
    return ordered[min(len(ordered), max(1, rank)) - 1]


class _Progress:
    def __init__(self, label: str, total: int) -> None:
        self.label = label
        self.total = total
        self.sent = 0
        self.done = 0
        self.errors = 0
        self.window: list[float] = []  # latencies (s) completed since the last line

    def line(self, elapsed: float) -> str:
        window = sorted(self.window)
        self.window = []
        p99 = f"{percentile(window, 99) * 1e3:7.1f} ms" if window else "      - ms"
        return (
            f"[bench {self.label}] {elapsed:5.1f}s sent {self.sent}/{self.total} done {self.done} "
            f"in-flight {self.sent - self.done} errors {self.errors} p99(last 1s) {p99}"
        )


def _metadata_value(metadata: Any, name: str) -> str:
    for key, value in metadata or ():
        if key == name:
            return value if isinstance(value, str) else bytes(value).decode(errors="replace")
    return ""


async def _passthrough(
    call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes],
    body: bytes,
    timeout_s: float,
    metadata: tuple[tuple[str, str], ...],
) -> tuple[str, str, str]:
    """One call: its status (``grpc CODE``), the host that served it and, for errors, its retry-after."""
    rpc = call(body, timeout=timeout_s, metadata=metadata)
    retry_after = ""
    try:
        await rpc
        code = grpc.StatusCode.OK
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            return f"grpc {code.name}", "", ""
        # A refusal without a body comes trailers-only: its headers arrive as trailing metadata.
        retry_after = _metadata_value(exc.initial_metadata(), RETRY_AFTER_HEADER) or _metadata_value(
            exc.trailing_metadata(), RETRY_AFTER_HEADER
        )
    host = ""
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
        host = _metadata_value(await rpc.initial_metadata(), UPSTREAM_HOST_HEADER)
    return f"grpc {code.name}", host, retry_after


async def run_load(spec: RunSpec) -> tuple[Records, dict[str, float]]:
    """Send the trace of ``spec.load`` to the gateway; returns the records and the generator's own stats."""
    load = spec.load
    trace = build_trace(load)
    bodies = request_bodies(load)
    records = Records.for_trace(trace)
    progress = _Progress(spec.label, len(trace))
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=load.timeout_s)
    rest_headers = [
        {
            "content-type": "application/json",
            **({TIER_HINT_HEADER: m.tier_hint} if m.tier_hint else {}),
            **m.headers,
        }
        for m in load.mix
    ]
    rest_urls = [f"{spec.http_base}/v2/models/{m.model}/infer" for m in load.mix]
    grpc_metadata = [
        (
            *(((TIER_HINT_HEADER, m.tier_hint),) if m.tier_hint else ()),
            *((k.lower(), v) for k, v in m.headers.items()),
        )
        for m in load.mix
    ]
    channel = grpc.aio.insecure_channel(
        spec.grpc_target,
        options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)],
    )
    # request_serializer/response_deserializer None: the bytes go out as they are, the reply is not parsed.
    model_infer: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(MODEL_INFER_METHOD)
    loop = asyncio.get_running_loop()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session:

        async def send(entry_index: int, budget_s: float) -> tuple[str, str, str]:
            """The request; ``budget_s``: seconds left until its deadline, or the load's timeout."""
            entry = load.mix[entry_index]
            if entry.protocol == "grpc":
                return await _passthrough(model_infer, bodies[entry_index], budget_s, grpc_metadata[entry_index])
            headers = rest_headers[entry_index]
            if entry.deadline_s is not None:
                headers = {**headers, REST_DEADLINE_HEADER: str(max(1, int(budget_s * 1e3)))}
            async with session.post(
                rest_urls[entry_index],
                data=bodies[entry_index],
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=budget_s),
            ) as response:
                await response.read()
                return (
                    f"http {response.status}",
                    response.headers.get(UPSTREAM_HOST_HEADER, ""),
                    response.headers.get(RETRY_AFTER_HEADER, "") if response.status >= 400 else "",
                )

        async def one(i: int, start: float) -> None:
            entry_index = trace.entries[i]
            deadline_s = load.mix[entry_index].deadline_s
            sent = loop.time() - start
            records.sent[i] = sent
            progress.sent += 1
            # A deadline runs from the intended send time: time the generator lost is the client's loss.
            budget_s = load.timeout_s if deadline_s is None else deadline_s - (sent - trace.offsets[i])
            gave_up = TIMEOUT if deadline_s is None else DEADLINE
            host = retry_after = ""
            try:
                if budget_s <= 0:
                    status = gave_up
                else:
                    status, host, retry_after = await send(entry_index, budget_s)
            except TimeoutError:
                status = gave_up
            except (aiohttp.ClientError, OSError) as exc:
                status = f"client {type(exc).__name__}"
            done = loop.time() - start
            if status == _GRPC_DEADLINE and (
                deadline_s is None or done - trace.offsets[i] >= deadline_s - _DEADLINE_SLACK_S
            ):
                status = gave_up
            records.done[i] = done
            records.status[i] = status
            records.host[i] = host
            records.retry_after[i] = retry_after
            progress.done += 1
            if status in OK_STATUSES:
                progress.window.append(done - trace.offsets[i])
            else:
                progress.errors += 1

        async def report(start: float) -> None:
            while True:
                await asyncio.sleep(1.0)
                print(progress.line(loop.time() - start), file=sys.stderr, flush=True)

        start = loop.time() + 0.05
        reporter = asyncio.create_task(report(start)) if spec.progress else None
        tasks: set[asyncio.Task[None]] = set()
        for i, offset in enumerate(trace.offsets):
            delay = start + offset - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(i, start))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(set(tasks))
        if reporter is not None:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
            print(progress.line(loop.time() - start), file=sys.stderr, flush=True)
        wall = loop.time() - start
    await channel.close()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return records, {"wall_s": wall, "cpu_s": cpu_s, "cpu_share": cpu_s / wall if wall > 0 else 0.0}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.loadgen SPEC.json OUT.json``: run one load, write records and stats."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: python -m benchmarks.loadgen SPEC.json OUT.json", file=sys.stderr)
        return 2
    spec = RunSpec.model_validate_json(Path(args[0]).read_text(encoding="utf-8"))
    try:
        import uvloop

        records, stats = uvloop.run(run_load(spec))
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        records, stats = asyncio.run(run_load(spec))
    out = {"records": records.to_json(), "generator": stats}
    Path(args[1]).write_text(json.dumps(out), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
