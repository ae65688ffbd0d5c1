"""Open-loop Poisson load against one gateway, REST (aiohttp) and gRPC (grpc.aio), in its own process.

The schedule is a seeded Poisson process (exponential gaps), and which request of the mix each arrival
sends is drawn from the same seeded generator, so every policy of a benchmark replays the same trace.
Latency is measured from each request's *intended* send time, not from when it was actually sent: a
generator that falls behind must not hide the queueing it caused (coordinated omission). How far behind it
fell (actual - intended send time) is measured for every request and reported next to the latencies.

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

from extproc.headers import TIER_HINT_HEADER, UPSTREAM_HOST_HEADER

MODEL_INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
# Status of a request that got no answer within the load's timeout, and prefixes of the other outcomes.
TIMEOUT = "timeout"
HTTP_OK = "http 200"
GRPC_OK = "grpc OK"
OK_STATUSES = frozenset({HTTP_OK, GRPC_OK})
# The generator is "behind" when its p99 send lag exceeds this: latencies are then still honest (measured
# from the intended time) but the offered load arrived burstier than Poisson.
LAG_BEHIND_MS = 5.0

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

    @property
    def label(self) -> str:
        if self.name is not None:
            return self.name
        return f"{self.model}/{self.protocol}/{'x'.join(str(d) for d in self.shape)}"


class LoadSpec(_Strict):
    """The offered load: an open-loop Poisson process at ``rate_rps`` for ``warmup_s + duration_s``."""

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
    rng = np.random.default_rng(load.seed)
    offsets = poisson_offsets(load.rate_rps, load.total_s, rng)
    weights = np.array([m.weight for m in load.mix], dtype=np.float64)
    entries = rng.choice(len(load.mix), size=len(offsets), p=weights / weights.sum())
    return Trace(tuple(offsets), tuple(int(e) for e in entries))


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
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "intended": self.intended,
            "entry": self.entry,
            "sent": self.sent,
            "done": self.done,
            "status": self.status,
            "host": self.host,
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


async def _passthrough(
    call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes],
    body: bytes,
    timeout_s: float,
    metadata: tuple[tuple[str, str], ...],
) -> tuple[str, str]:
    rpc = call(body, timeout=timeout_s, metadata=metadata)
    host = ""
    try:
        await rpc
        code = grpc.StatusCode.OK
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            return TIMEOUT, host
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
        md = await rpc.initial_metadata()
        if md is not None:
            for key, value in md:
                if key == UPSTREAM_HOST_HEADER:
                    host = value if isinstance(value, str) else value.decode()
    return f"grpc {code.name}", host


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
        {"content-type": "application/json", **({TIER_HINT_HEADER: m.tier_hint} if m.tier_hint else {})}
        for m in load.mix
    ]
    rest_urls = [f"{spec.http_base}/v2/models/{m.model}/infer" for m in load.mix]
    grpc_metadata = [((TIER_HINT_HEADER, m.tier_hint),) if m.tier_hint else () for m in load.mix]
    channel = grpc.aio.insecure_channel(
        spec.grpc_target,
        options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)],
    )
    # request_serializer/response_deserializer None: the bytes go out as they are, the reply is not parsed.
    model_infer: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(MODEL_INFER_METHOD)
    loop = asyncio.get_running_loop()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session:

        async def one(i: int, start: float) -> None:
            entry_index = trace.entries[i]
            entry = load.mix[entry_index]
            records.sent[i] = loop.time() - start
            progress.sent += 1
            host = ""
            try:
                if entry.protocol == "http":
                    async with session.post(
                        rest_urls[entry_index], data=bodies[entry_index], headers=rest_headers[entry_index]
                    ) as response:
                        await response.read()
                        status = f"http {response.status}"
                        host = response.headers.get(UPSTREAM_HOST_HEADER, "")
                else:
                    status, host = await _passthrough(
                        model_infer, bodies[entry_index], load.timeout_s, grpc_metadata[entry_index]
                    )
            except TimeoutError:
                status = TIMEOUT
            except (aiohttp.ClientError, OSError) as exc:
                status = f"client {type(exc).__name__}"
            done = loop.time() - start
            records.done[i] = done
            records.status[i] = status
            records.host[i] = host
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
