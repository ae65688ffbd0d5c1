"""Model footprints learned from the memory change at load: where ``placement.models.NAME.footprint_bytes``
is not declared, the controller reads the host's memory before each load it makes and again once Triton's
memory series have caught up, and keeps the difference as what one copy of the model takes.

Why these readings: the host's GPU memory (``nv_gpu_memory_used_bytes``, summed over its GPUs) is what a
GPU model fills and what the budget from GPU telemetry counts; a host without GPU series (a CPU build, or
no visible GPU) still exports ``nv_cpu_memory_used_bytes``, the machine's used memory, which a CPU model's
weights and its backend's processes fill. Both are read from the host's own metrics page, not through the
picker, whose view is as old as its last scrape.

Why robust this way: the machine's memory moves for reasons of its own, and the page is refreshed only every
``--metrics-interval-ms``. So a reading is taken at least :data:`SETTLE_S` after the load ended; a load
whose window (from :data:`SETTLE_S` before it to the second reading) holds another change of the
controller's on the same host, or after which the host's READY models are not those before plus this one,
is not counted; a difference that is not positive is not counted; and the footprint is the largest of a
model's last :data:`KEEP` observations, so that a load measured while something else freed memory does not
make it look small.

The controller keeps what it learned while it runs (as it keeps its cool-downs); loads made by
``extproc models load`` or by the picker's scale from zero are not measured.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

from extproc.config import Fleet, HostSpec
from extproc.telemetry.http import HttpError, PageClient, Target
from extproc.telemetry.tls import read_triton_tls

__all__ = ["KEEP", "SETTLE_S", "Footprints", "MemoryReading", "Outcome", "parse_memory", "read_memory"]

# Triton refreshes its memory series every --metrics-interval-ms (2 s by default): two refreshes and a margin.
SETTLE_S: Final = 5.0
# Observations kept per model: the footprint is the largest of these.
KEEP: Final = 5

GPU_USED: Final = "nv_gpu_memory_used_bytes"
CPU_USED: Final = "nv_cpu_memory_used_bytes"


@dataclass(frozen=True, slots=True)
class MemoryReading:
    """A host's used memory from its metrics page (None: the page has no such series)."""

    gpu_used: int | None = None  # summed over the host's GPUs
    cpu_used: int | None = None

    def used(self) -> tuple[int, Literal["gpu", "cpu"]] | None:
        if self.gpu_used is not None:
            return self.gpu_used, "gpu"
        if self.cpu_used is not None:
            return self.cpu_used, "cpu"
        return None


def parse_memory(text: str) -> MemoryReading:
    """The memory series of a Triton metrics page (Prometheus text format)."""
    gpu: int | None = None
    cpu: int | None = None
    for line in text.splitlines():
        if not line.startswith(("nv_gpu_memory_used_bytes", "nv_cpu_memory_used_bytes")):
            continue
        labelled = "{" in line
        name = line.partition("{")[0] if labelled else line.partition(" ")[0]
        rest = line.rpartition("}")[2] if labelled else line.partition(" ")[2]
        try:
            value = int(float(rest.split()[0]))
        except (ValueError, IndexError):
            continue
        if name == GPU_USED:
            gpu = (gpu or 0) + value
        elif name == CPU_USED:
            cpu = value
    return MemoryReading(gpu, cpu)


def read_memory(fleet: Fleet, host: HostSpec, timeout_s: float = 5.0) -> MemoryReading | None:
    """``host``'s memory from its metrics page (over TLS where ``envoy.upstream_tls`` says so); None where
    the page cannot be read."""
    tls = read_triton_tls(fleet)
    target = (
        Target.parse(host.metrics_url)
        if tls is None
        else Target.parse(tls.metrics_url(host), tls.context, tls.server_name)
    )

    async def get() -> bytes:
        client = PageClient()
        try:
            async with asyncio.timeout(timeout_s):
                return await client.get(target)
        finally:
            await client.aclose()

    try:
        return parse_memory(asyncio.run(get()).decode("utf-8", errors="replace"))
    except (HttpError, OSError, TimeoutError, ValueError, asyncio.IncompleteReadError):
        return None


@dataclass(frozen=True, slots=True)
class Observation:
    bytes: int
    source: Literal["gpu", "cpu"]
    host: str


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one measured load (logged by the controller)."""

    model: str
    host: str
    learned: bool
    delta_bytes: int | None
    source: str | None
    why: str  # "learned", or why it was not counted


@dataclass
class _Pending:
    model: str
    host: str
    before: MemoryReading
    models_before: frozenset[str]
    started: float
    done: float | None = None


@dataclass
class Footprints:
    """The footprints the controller learned, and the loads it is still measuring."""

    observations: dict[str, deque[Observation]] = field(default_factory=dict)
    _pending: list[_Pending] = field(default_factory=list)
    # host -> (start, end, kind, model) of each of the controller's changes there, for the overlap check
    _changes: dict[str, list[tuple[float, float, str, str]]] = field(default_factory=dict)

    def learned(self) -> dict[str, int]:
        """Model -> its learned footprint (bytes): the largest recent observation."""
        return {m: max(o.bytes for o in seen) for m, seen in self.observations.items() if seen}

    def loading(self, model: str, host: str, before: MemoryReading | None, models: frozenset[str], at: float) -> None:
        """A load of ``model`` on ``host`` starts; ``before``: the host's memory just now (None: unreadable,
        not measured); ``models``: READY there now."""
        if before is not None and before.used() is not None:
            self._pending.append(_Pending(model, host, before, models, at))

    def changed(self, kind: str, model: str, host: str, started: float, ended: float, ok: bool) -> None:
        """One of the controller's changes on ``host`` ended (a load's measurement waits from here)."""
        self._changes.setdefault(host, []).append((started, ended, kind, model))
        if kind != "load":
            return
        for p in self._pending:
            if p.model == model and p.host == host and p.done is None:
                p.done = ended
        if not ok:
            self._pending = [p for p in self._pending if not (p.model == model and p.host == host and p.done == ended)]

    def settle(
        self, now: float, read: Callable[[str], MemoryReading | None], ready: Mapping[str, frozenset[str]]
    ) -> list[Outcome]:
        """Finish the measurements whose loads ended at least :data:`SETTLE_S` ago: ``read`` a host's memory
        now, ``ready``: each host's READY models now."""
        outcomes: list[Outcome] = []
        waiting: list[_Pending] = []
        for p in self._pending:
            if p.done is None or now - p.done < SETTLE_S:
                waiting.append(p)
                continue
            outcomes.append(self._measure(p, now, read(p.host), ready.get(p.host)))
        self._pending = waiting
        # Changes older than any window still open, and than a settle time, no longer matter.
        horizon = min([p.started for p in waiting], default=now) - SETTLE_S
        for host, spans in list(self._changes.items()):
            self._changes[host] = [s for s in spans if s[1] >= horizon]
        return outcomes

    def _measure(self, p: _Pending, now: float, after: MemoryReading | None, ready: frozenset[str] | None) -> Outcome:
        def skipped(why: str, delta: int | None = None, source: str | None = None) -> Outcome:
            return Outcome(p.model, p.host, False, delta, source, why)

        others = [
            (start, end)
            for start, end, kind, model in self._changes.get(p.host, [])
            if end >= p.started - SETTLE_S and start <= now and not (kind == "load" and model == p.model)
        ]
        if others:
            return skipped(f"{len(others)} other change(s) on the host meanwhile")
        if ready is None or ready != p.models_before | {p.model}:
            return skipped("the host's READY models changed otherwise meanwhile")
        before = p.before.used()
        used = None if after is None else after.used()
        if before is None or used is None or used[1] != before[1]:
            return skipped("memory not readable after the load")
        delta = used[0] - before[0]
        if delta <= 0:
            return skipped("memory did not grow", delta, used[1])
        seen = self.observations.setdefault(p.model, deque(maxlen=KEEP))
        seen.append(Observation(delta, used[1], p.host))
        return Outcome(p.model, p.host, True, delta, used[1], "learned")
