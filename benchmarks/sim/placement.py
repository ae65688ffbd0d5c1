"""``python -m benchmarks.sim.placement``: the placement controller's real decisions over a simulated fleet of
100 hosts whose demand shifts between models.

The decisions are :func:`extproc.placement.plan.plan`'s, every ``interval_s``, on inputs built by
:func:`extproc.placement.inputs.build_inputs` from a picker's ``/status`` and counters that the simulation
writes (:meth:`Run._status`): each host's READY models, repository, in-flight requests and drain, the
requests routed per model and tier (demand, through :class:`~extproc.placement.inputs.DemandMeter`), each
READY copy's batch-cost fit (capacity per copy), and the fleet file's declared budgets and footprints. The
actions are carried out as ``extproc placement run`` carries them out
(:class:`extproc.placement.command.Controller`): a round acts before the next one starts, loads at once per
model (a copy takes traffic only once READY, ``load_s`` later), then unloads host by host through a drain
(the host takes no new request, its in-flight ones finish, the model is unloaded, the host is undrained),
refused where it would strand a model's only routable copy. A request for a model without a READY copy is
held as the picker's ``scale_from_zero: hold`` holds it: the picker loads the model on the host that
:func:`plan` chooses for it (:class:`extproc.placement.wake.Waker`), and the request fails (503) if it has
waited ``hold_s``.

Why its own event loop rather than :mod:`benchmarks.sim.engine`: the engine's hosts, batchers and the
picker policy's repository views are fixed when a run starts, and loads and unloads would mean editing it.
Here each copy is a queue with ``instances`` executors that take up to ``max_batch`` requests at once (no
queue delay), and a request goes to the less busy of two random READY copies of its model on undrained
hosts (Envoy's least request over the hosts the picker routes the model to), not through the scheduler.

Each run is replayed with the controller off (scale from zero stays on: it is the picker's) on the same
seeded arrivals, for the ratio.
"""

from __future__ import annotations

import argparse
import bisect
import datetime as dt
import heapq
import itertools
import json
import math
import random
import shlex
import sys
import time
from collections import deque
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from benchmarks import RESULTS_DIR, shown
from extproc.config import Fleet, HostSpec, ModelSpec, PlacementSpec
from extproc.config.common import Tier
from extproc.config.placement import ModelPlacement
from extproc.ops.plans import merged_view
from extproc.ops.status import ModelBatching, ModelLoad, PickerHost, PickerStatus
from extproc.placement.inputs import DemandMeter, build_inputs
from extproc.placement.plan import plan

GIB: Final = 2**30
_DONE: Final = 0
_CALL: Final = 1


@dataclass(frozen=True, slots=True)
class Demand:
    """Requests per second at 100 hosts over the run (``at``: a fraction of the duration)."""

    before: float
    after: float = 0.0
    at: float = 1.0  # the step from ``before`` to ``after``
    ramp_s: float = 0.0  # the step takes this long
    diurnal: float = 0.0  # plus this x sin^2(pi t / duration): a day's ramp up and down

    def rate(self, t: float, duration: float) -> float:
        shift = self.at * duration
        if t < shift:
            base = self.before
        elif t >= shift + self.ramp_s:
            base = self.after
        else:
            base = self.before + (self.after - self.before) * (t - shift) / self.ramp_s
        return base + self.diurnal * math.sin(math.pi * t / duration) ** 2

    def peak(self) -> float:
        return max(self.before, self.after) + self.diurnal


@dataclass(frozen=True, slots=True)
class SimModel:
    name: str
    fixed_ms: float
    per_row_ms: float
    max_batch: int
    footprint_gib: float
    load_s: float
    slo_ms: float
    tiers: tuple[str, ...]  # allowed, the default first
    repo_share: float  # of the hosts of its tiers, those whose repository holds it
    initial: int  # READY copies at the start, at 100 hosts
    demand: Demand
    instances: int = 1
    min_copies: int = 1  # placement.models.NAME.min_copies

    def exec_s(self, rows: int) -> float:
        return (self.fixed_ms + self.per_row_ms * rows) / 1000.0

    def capacity_rps(self) -> float:
        """The batch fit of :func:`extproc.placement.inputs.copy_capacity`, from the simulated batch time."""
        return self.instances * self.max_batch / self.exec_s(self.max_batch)


# A popular model goes cold as another heats up (from one copy) at 0.4 of the run; a new model starts from
# zero at 0.6; an embedding model follows a day's ramp; a CPU-tier model stays steady.
MODELS: Final = (
    SimModel("chat", 60, 15, 4, 20, 20, 1000, ("gpu",), 0.9, 20, Demand(300, 15, at=0.4, ramp_s=30)),
    SimModel("code", 50, 12.5, 4, 16, 20, 800, ("gpu",), 0.5, 1, Demand(5, 300, at=0.4, ramp_s=120)),
    SimModel("rerank", 20, 5, 8, 4, 5, 300, ("gpu",), 0.4, 0, Demand(0, 150, at=0.6), min_copies=0),
    SimModel("embed", 10, 2.5, 8, 2, 5, 200, ("cpu", "gpu"), 1.0, 2, Demand(100, 100, diurnal=300)),
    SimModel("vision", 30, 10, 2, 8, 10, 500, ("cpu",), 1.0, 3, Demand(60, 60)),
)
BUDGET_GIB: Final = {"gpu": 40.0, "cpu": 16.0}
GPU_SHARE: Final = 0.8


@dataclass(frozen=True, slots=True)
class Options:
    hosts: int = 100
    duration_s: float = 600.0
    seed: int = 1
    # The controller's settings of benchmarks.placement (the real-process demand shift), with more changes
    # per round for a fleet of 100.
    interval_s: float = 5.0
    up_cooldown_s: float = 10.0
    cooldown_s: float = 60.0
    target_utilization: float = 0.5
    scale_down_utilization: float = 0.2
    max_changes: int = 8
    unload_s: float = 2.0
    hold_s: float = 8.0  # scale from zero's bounded wait (placement.scale_from_zero.hold_ms)
    timeout_s: float = 60.0  # a request answered later than this failed (Envoy's route timeout)
    window_s: float = 10.0  # p99 windows
    jitter: float = 0.1  # a batch takes up to this fraction longer, at random

    @property
    def scale(self) -> float:
        return self.hosts / 100.0

    def settings(self) -> PlacementSpec:
        return PlacementSpec(
            enabled=True,
            interval_s=self.interval_s,
            cooldown_s=self.cooldown_s,
            up_cooldown_s=self.up_cooldown_s,
            max_concurrent_changes=self.max_changes,
            tier_memory_bytes={Tier(tier): int(gib * GIB) for tier, gib in BUDGET_GIB.items()},  # type: ignore[misc]
            target_utilization=self.target_utilization,
            scale_down_utilization=self.scale_down_utilization,
            models={
                m.name: ModelPlacement(min_copies=m.min_copies, footprint_bytes=int(m.footprint_gib * GIB))  # type: ignore[arg-type]
                for m in MODELS
            },
        )


class Copy:
    __slots__ = ("busy", "free", "host", "model", "queue", "ready")

    def __init__(self, host: Host, model: int, instances: int) -> None:
        self.host = host
        self.model = model
        self.queue: deque[int] = deque()
        self.free = instances
        self.busy = 0  # requests queued or executing
        self.ready = False


class Host:
    __slots__ = ("budget", "copies", "draining", "inflight", "name", "repo", "tier", "used", "waiter")

    def __init__(self, name: str, tier: str, budget: int, repo: frozenset[int]) -> None:
        self.name = name
        self.tier = tier
        self.budget = budget
        self.repo = repo
        self.copies: dict[int, Copy] = {}
        self.used = 0  # footprints of every copy here: loading, READY or draining
        self.draining = False
        self.inflight = 0
        self.waiter: Callable[[], None] | None = None  # an unload waiting for the drain to end


def build_hosts(opts: Options) -> list[Host]:
    """The fleet: tiers, budgets, which models each repository holds and the initial copies (seeded)."""
    rng = random.Random(f"{opts.seed}/hosts")
    n_gpu = max(1, round(opts.hosts * GPU_SHARE))
    hosts: list[Host] = []
    for i in range(opts.hosts):
        tier = "gpu" if i < n_gpu else "cpu"
        repo = frozenset(k for k, m in enumerate(MODELS) if tier in m.tiers and rng.random() < m.repo_share)
        hosts.append(Host(f"{tier}{i:03d}", tier, int(BUDGET_GIB[tier] * GIB), repo))
    for k, m in enumerate(MODELS):
        want = 0 if m.initial == 0 else max(1, round(m.initial * opts.scale))
        eligible = [h for h in hosts if h.tier == m.tiers[0]]
        for h in eligible:
            if want == 0:
                break
            size = int(m.footprint_gib * GIB)
            if h.used + size > h.budget:
                continue
            h.repo = h.repo | {k}  # the initial copies' hosts hold the model
            c = Copy(h, k, m.instances)
            c.ready = True
            h.copies[k] = c
            h.used += size
            want -= 1
    return hosts


def build_fleet(opts: Options, hosts: Sequence[Host]) -> Fleet:
    """The fleet file of the simulated fleet: its hosts, the models' tiers and the placement settings."""
    return Fleet(
        hosts=tuple(
            HostSpec(name=h.name, address=f"10.0.{i // 250}.{i % 250 + 1}", tier=Tier(h.tier))
            for i, h in enumerate(hosts)
        ),
        models=tuple(ModelSpec(name=m.name, tiers=tuple(Tier(t) for t in m.tiers)) for m in MODELS),
        placement=opts.settings(),
    )


def build_arrivals(opts: Options) -> tuple[list[float], list[int]]:
    """Poisson arrivals per model at its demand (thinning), merged in time order."""
    merged: list[tuple[float, int]] = []
    for k, m in enumerate(MODELS):
        rng = random.Random(f"{opts.seed}/arrivals/{m.name}")
        top = m.demand.peak() * opts.scale
        if top <= 0:
            continue
        t = 0.0
        while True:
            t += rng.expovariate(top)
            if t >= opts.duration_s:
                break
            if rng.random() * top < m.demand.rate(t, opts.duration_s) * opts.scale:
                merged.append((t, k))
    merged.sort()
    return [t for t, _ in merged], [k for _, k in merged]


@dataclass
class Run:
    """One run's simulation: the fleet, the requests and what the controller did."""

    opts: Options
    controller: bool
    progress: Callable[[str], None] | None = None
    now: float = 0.0
    heap: list[tuple[float, int, int, Any, Any]] = field(default_factory=list)
    seq: int = 0
    actions: list[dict[str, Any]] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    copies_over_time: list[dict[str, Any]] = field(default_factory=list)
    overshoot: int = 0  # the most bytes any host held over its budget
    refused: int = 0  # unloads refused: they would strand a model's only routable copy
    lost: int = 0  # requests on a copy when it was unloaded (the drain must make this 0)
    held: int = 0
    outstanding: int = 0
    from_zero: int = 0
    duplicate_loads: int = 0  # loads asked of a host already loading the model
    scale_from_zero_loads: int = 0

    def __post_init__(self) -> None:
        self.hosts = build_hosts(self.opts)
        self.fleet = build_fleet(self.opts, self.hosts)
        self.arrival, self.model = build_arrivals(self.opts)
        n = len(self.arrival)
        self.latency = [math.nan] * n
        self.status = [""] * n  # "" pending, ok, timeout, 503
        self.rng = random.Random(f"{self.opts.seed}/route")
        self.jitter_rng = random.Random(f"{self.opts.seed}/jitter")
        self.routable: list[list[Copy]] = [[] for _ in MODELS]
        self.waiting: list[deque[int]] = [deque() for _ in MODELS]
        self.routed: list[dict[str, int]] = [{} for _ in MODELS]  # by the tier of the host routed to
        # As the controller keeps them, by (model, tier).
        self.last_change: dict[tuple[str, str], float] = {}
        self.low: dict[tuple[str, str], tuple[float, int]] = {}
        for k in range(len(MODELS)):
            self._reroute(k)

    # ------------------------------------------------------------------------------------------ events

    def push(self, t: float, code: int, a: Any, b: Any = None) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, code, a, b))

    def start(self, process: Generator[float | Host, None, None]) -> None:
        """Run ``process`` until it yields: a float sleeps that long, a Host waits for its drain to end."""

        def resume(_: float) -> None:
            try:
                item = next(process)
            except StopIteration:
                return
            if isinstance(item, Host):
                if item.inflight == 0:
                    self.push(self.now, _CALL, resume)
                else:
                    item.waiter = lambda: self.push(self.now, _CALL, resume)
            else:
                self.push(self.now + item, _CALL, resume)

        self.push(self.now, _CALL, resume)

    def every(self, period_s: float, fn: Callable[[float], None]) -> None:
        def tick(now: float) -> None:
            fn(now)
            self.push(now + period_s, _CALL, tick)

        self.push(0.0, _CALL, tick)

    def run(self) -> None:
        opts = self.opts
        if self.controller:
            self.start(self._controller())
        self.every(opts.interval_s, self._sample)
        self.every(60.0, self._report)
        arrivals, heap = self.arrival, self.heap
        n, i = len(arrivals), 0
        end = opts.duration_s + opts.timeout_s
        while True:
            next_arrival = arrivals[i] if i < n else math.inf
            if heap and heap[0][0] <= next_arrival:
                t, _, code, a, b = heapq.heappop(heap)
                if t > end:
                    break
                self.now = t
                if code == _DONE:
                    self._done(a, b, t)
                else:
                    a(t)
            elif i < n:
                self.now = next_arrival
                self._arrive(i, next_arrival)
                i += 1
            else:
                break
            if i >= n and self.outstanding == 0:
                break
        for r, s in enumerate(self.status):
            if not s:
                self.status[r] = "timeout"

    # ---------------------------------------------------------------------------------------- requests

    def _reroute(self, k: int) -> None:
        self.routable[k] = [h.copies[k] for h in self.hosts if k in h.copies and h.copies[k].ready and not h.draining]

    def _arrive(self, r: int, now: float) -> None:
        k = self.model[r]
        self.outstanding += 1
        if not self.routable[k]:
            self.held += 1
            self.waiting[k].append(r)
            if not any(k in h.copies for h in self.hosts):
                self._scale_from_zero(k)
            return
        self._route(r, k, now)

    def _route(self, r: int, k: int, now: float) -> None:
        pool = self.routable[k]
        a = pool[int(self.rng.random() * len(pool))]
        b = pool[int(self.rng.random() * len(pool))]
        c = b if b.busy < a.busy else a
        tiers = self.routed[k]
        tiers[c.host.tier] = tiers.get(c.host.tier, 0) + 1
        c.queue.append(r)
        c.busy += 1
        c.host.inflight += 1
        if c.free:
            self._dispatch(c, now)

    def _dispatch(self, c: Copy, now: float) -> None:
        m = MODELS[c.model]
        while c.free and c.queue:
            batch = [c.queue.popleft() for _ in range(min(m.max_batch, len(c.queue)))]
            c.free -= 1
            took = m.exec_s(len(batch)) * (1.0 + self.opts.jitter * self.jitter_rng.random())
            self.push(now + took, _DONE, c, batch)

    def _done(self, c: Copy, batch: list[int], now: float) -> None:
        c.free += 1
        c.busy -= len(batch)
        h = c.host
        h.inflight -= len(batch)
        if c.host.copies.get(c.model) is not c:
            self.lost += len(batch)
        timeout = self.opts.timeout_s
        for r in batch:
            waited = now - self.arrival[r]
            self.latency[r] = waited
            self.status[r] = "ok" if waited <= timeout else "timeout"
        self.outstanding -= len(batch)
        if c.queue:
            self._dispatch(c, now)
        if h.draining and h.inflight == 0 and h.waiter is not None:
            waiter, h.waiter = h.waiter, None
            waiter()

    def _flush(self, k: int, now: float) -> None:
        waiting = self.waiting[k]
        while waiting and self.routable[k]:
            r = waiting.popleft()
            if now - self.arrival[r] > self.opts.hold_s:
                self.status[r] = "503"
                self.outstanding -= 1
            else:
                self._route(r, k, now)

    # ------------------------------------------------------------------------------------ loads, unloads

    def _begin_load(self, k: int, host: Host) -> Copy | None:
        """Start loading model ``k`` on ``host``; None where the host has it already (loading): Triton loads
        a model once however many calls ask."""
        if k in host.copies:
            self.duplicate_loads += 1
            return None
        m = MODELS[k]
        c = Copy(host, k, m.instances)
        host.copies[k] = c
        host.used += int(m.footprint_gib * GIB)
        self.overshoot = max(self.overshoot, host.used - host.budget)
        return c

    def _ready(self, c: Copy) -> None:
        c.ready = True
        self._reroute(c.model)
        self._flush(c.model, self.now)

    def _status(self) -> PickerStatus:
        """The picker's ``/status`` and counters as :mod:`extproc.ops.status` parses them: each host's READY
        models, repository, in-flight requests and drain, each READY copy's batch-cost fit (the simulated
        batch time itself: the fit a picker makes from Triton's counters, without its error), and the
        requests routed per model."""
        hosts: dict[str, PickerHost] = {}
        for h in self.hosts:
            ready = [MODELS[k] for k, c in h.copies.items() if c.ready]
            hosts[h.name] = PickerHost(
                name=h.name,
                tier=h.tier,
                fresh=True,
                routable=not h.draining,
                ready={m.name: ("1",) for m in ready},
                in_flight=float(h.inflight),
                draining=h.draining,
                known=frozenset(MODELS[k].name for k in h.repo),
                batching={m.name: ModelBatching(m.max_batch, m.instances, m.fixed_ms, m.per_row_ms) for m in ready},
            )
        overload = {
            m.name: ModelLoad(
                routed=float(sum(self.routed[k].values())),
                routed_by_tier={t: float(n) for t, n in self.routed[k].items()},
            )
            for k, m in enumerate(MODELS)
        }
        return PickerStatus("sim", True, hosts, overload)

    def _scale_from_zero(self, k: int) -> None:
        """The picker's scale from zero (:class:`extproc.placement.wake.Waker`): one load, on the host that
        :func:`plan` chooses over the picker's view for the model at 1 req/s."""
        m = MODELS[k]
        models, hosts = build_inputs(self.fleet, self._status().hosts, [], {m.name: 1.0}, now_unix=self.now)
        decided = plan([x for x in models if x.name == m.name], hosts, self.fleet.placement, self.now)
        loads = [a for a in decided.actions if a.kind == "load"]
        if not loads:
            return
        host = next(h for h in self.hosts if h.name == loads[0].host)
        c = self._begin_load(k, host)
        if c is None:
            return
        self.scale_from_zero_loads += 1
        self.from_zero -= 1  # each its own change, apart from the controller's rounds
        decided_at = (self.from_zero, self.now)

        def loading() -> Generator[float | Host, None, None]:
            yield m.load_s
            self._ready(c)
            self._log("load", m.name, host.name, "scale from zero", decided_at)

        self.start(loading())

    def _controller(self) -> Generator[float | Host, None, None]:
        """``extproc placement run``'s rounds (:class:`extproc.placement.command.Controller`): look, plan,
        act (loads at once per model until READY, then unloads host by host through a drain), sleep."""
        meter = DemandMeter()
        meter.update([self._status()], self.now)
        yield self.opts.interval_s
        while True:
            now = self.now
            statuses = [self._status()]
            rates = meter.update(statuses, now)
            models, hosts = build_inputs(
                self.fleet, merged_view(statuses), statuses, rates, now_unix=now, last_change=self.last_change,
                low=self.low,
            )  # fmt: skip
            result = plan(models, hosts, self.fleet.placement, now, {})
            self.low = {
                (d.model, d.tier): (d.low_since, d.low_most)
                for d in result.decisions
                if d.low_since is not None and d.low_most is not None
            }
            self.rounds.append({
                "t": round(now, 2),
                "models": {f"{d.model}/{d.tier}": {"rate_rps": round(d.rate_rps or 0.0, 1), "current": d.current,
                                     "desired": d.desired, "held": d.held, "unplaced": d.unplaced}
                           for d in result.decisions},
                "actions": len(result.actions), "deferred": len(result.deferred),
            })  # fmt: skip
            by_name = {h.name: h for h in self.hosts}
            index = {m.name: k for k, m in enumerate(MODELS)}
            decided = (len(self.rounds), now)
            for model in sorted({a.model for a in result.actions if a.kind == "load"}):
                k = index[model]
                chosen = [a for a in result.actions if a.kind == "load" and a.model == model]
                started = [(c, a) for a in chosen if (c := self._begin_load(k, by_name[a.host])) is not None]
                yield MODELS[k].load_s
                for c, a in started:
                    self._ready(c)
                    self._log(a.kind, model, a.host, a.reason, decided)
                for a in chosen:
                    self.last_change[(model, by_name[a.host].tier)] = self.now
            for model in sorted({a.model for a in result.actions if a.kind == "unload"}):
                k = index[model]
                chosen = [a for a in result.actions if a.kind == "unload" and a.model == model]
                for a in chosen:
                    yield from self._unload(k, by_name[a.host], a.reason, decided)
                for a in chosen:
                    self.last_change[(model, by_name[a.host].tier)] = self.now
            yield self.opts.interval_s

    def _unload(
        self, k: int, host: Host, reason: str, decided: tuple[int, float]
    ) -> Generator[float | Host, None, None]:
        """Drain the host, unload the model, undrain: refused where it would strand a model's only copy."""
        for other in host.copies:
            if len(self.routable[other]) <= 1 and host.copies[other] in self.routable[other]:
                self.refused += 1
                return
        host.draining = True
        for other in host.copies:
            self._reroute(other)
        yield host
        yield self.opts.unload_s
        c = host.copies.pop(k)
        self.lost += c.busy
        host.used -= int(MODELS[k].footprint_gib * GIB)
        host.draining = False
        for other in [*host.copies, k]:
            self._reroute(other)
            self._flush(other, self.now)
        self._log("unload", MODELS[k].name, host.name, reason, decided)

    def _log(self, kind: str, model: str, host: str, reason: str, decided: tuple[int, float]) -> None:
        """An action done, with the round that decided it (its number and time)."""
        self.actions.append({"t": round(self.now, 2), "kind": kind, "model": model, "host": host, "reason": reason,
                             "round": decided[0], "round_t": round(decided[1], 2)})  # fmt: skip

    # ------------------------------------------------------------------------------------------ records

    def _sample(self, now: float) -> None:
        if now > self.opts.duration_s:
            return
        copies = {m.name: len(self.routable[k]) for k, m in enumerate(MODELS)}
        self.copies_over_time.append({"t": round(now, 2), **copies})

    def _report(self, now: float) -> None:
        if self.progress is None or now == 0 or now > self.opts.duration_s:
            return
        done = bisect.bisect_left(self.arrival, now)
        copies = " ".join(f"{m.name}={len(self.routable[k])}" for k, m in enumerate(MODELS))
        self.progress(f"{'on ' if self.controller else 'off'} t={now:.0f}s requests={done} copies {copies}")


# ---------------------------------------------------------------------------------------------- report


def _p99(values: list[float]) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, math.ceil(0.99 * len(values)) - 1)]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000.0, 1)


def windowed_p99(run: Run) -> dict[str, list[float | None]]:
    """p99 per model per ``window_s`` window of arrival time; a request that failed counts as the timeout."""
    opts = run.opts
    n_windows = math.ceil(opts.duration_s / opts.window_s)
    groups: list[list[list[float]]] = [[[] for _ in range(n_windows)] for _ in MODELS]
    for r, t in enumerate(run.arrival):
        latency = run.latency[r] if run.status[r] == "ok" else opts.timeout_s
        groups[run.model[r]][min(n_windows - 1, int(t / opts.window_s))].append(latency)
    return {m.name: [_ms(_p99(w)) for w in groups[k]] for k, m in enumerate(MODELS)}


def recovery_s(
    p99s: Sequence[float | None], slo_ms: float, shift_s: float, opts: Options, hold: int = 3
) -> float | None:
    """From the shift to the end of the first window after which ``hold`` windows in a row are under the SLO."""
    first = int(shift_s / opts.window_s)
    for w in range(first, len(p99s) - hold + 1):
        if all(v is None or v <= slo_ms for v in p99s[w : w + hold]):
            return round((w + 1) * opts.window_s - shift_s, 1) if w > first else 0.0
    return None


def changes(run: Run) -> dict[str, dict[str, int]]:
    """Per model: changes (one round's actions, or one scale from zero's load), the most that started in any
    cool-down window, and how many went the opposite way of the one before within a cool-down."""
    out: dict[str, dict[str, int]] = {}
    window = run.opts.cooldown_s
    for m in MODELS:
        starts: dict[tuple[int, str], tuple[float, str]] = {}
        for a in run.actions:
            if a["model"] == m.name:
                starts.setdefault((a["round"], a["kind"]), (a["round_t"], a["kind"]))
        merged = sorted(starts.values())
        most = max((sum(1 for u, _ in merged if t <= u < t + window) for t, _ in merged), default=0)
        flips = sum(1 for (t0, k0), (t1, k1) in itertools.pairwise(merged) if k0 != k1 and t1 - t0 < window)
        out[m.name] = {"changes": len(merged), "most_in_cooldown": most, "opposite_within_cooldown": flips}
    return out


def summarize(run: Run, wall_s: float) -> dict[str, Any]:
    opts = run.opts
    p99s = windowed_p99(run)
    failed: dict[str, int] = {}
    for s in run.status:
        if s != "ok":
            failed[s] = failed.get(s, 0) + 1
    shifts = {m.name: m.demand.at * opts.duration_s for m in MODELS if m.demand.after > m.demand.before}
    after: dict[str, float | None] = {}
    for name, shift in shifts.items():
        k = next(i for i, m in enumerate(MODELS) if m.name == name)
        values = [
            run.latency[r] if run.status[r] == "ok" else opts.timeout_s
            for r, t in enumerate(run.arrival)
            if run.model[r] == k and t >= shift
        ]
        after[name] = _ms(_p99(values))
    return {
        "controller": run.controller,
        "wall_s": round(wall_s, 2),
        "requests": len(run.arrival),
        "failed": sum(failed.values()),
        "failed_by_kind": failed,
        "lost_on_unload": run.lost,
        "held_for_a_copy": run.held,
        "loads": sum(1 for a in run.actions if a["kind"] == "load"),
        "unloads": sum(1 for a in run.actions if a["kind"] == "unload"),
        "scale_from_zero_loads": run.scale_from_zero_loads,
        "unloads_refused": run.refused,
        "loads_of_a_model_loading_there": run.duplicate_loads,
        "budget_overshoot_bytes": max(0, run.overshoot),
        "changes": changes(run),
        "p99_after_shift_ms": after,
        "recovery_s": {
            name: recovery_s(p99s[name], next(m.slo_ms for m in MODELS if m.name == name), shift, opts)
            for name, shift in shifts.items()
        },
        "p99_ms_by_window": p99s,
        "copies_over_time": run.copies_over_time,
        "actions": run.actions,
        "rounds": run.rounds,
    }


def simulate(opts: Options, controller: bool, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    run = Run(opts, controller, progress)
    run.run()
    return summarize(run, time.perf_counter() - started)


def compare(opts: Options, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The controller on, then off, over the same arrivals; the off / on ratio of each shifted model's p99."""
    on = simulate(opts, True, progress)
    off = simulate(opts, False, progress)
    ratio = {
        name: None
        if not v or off["p99_after_shift_ms"][name] is None
        else round(off["p99_after_shift_ms"][name] / v, 2)
        for name, v in on["p99_after_shift_ms"].items()
    }
    return {
        "options": {k: getattr(opts, k) for k in opts.__dataclass_fields__},
        "models": [
            {
                "name": m.name,
                "capacity_rps": round(m.capacity_rps(), 1),
                "footprint_gib": m.footprint_gib,
                "load_s": m.load_s,
                "slo_ms": m.slo_ms,
                "tiers": list(m.tiers),
                "demand_at_100_hosts": {
                    "before": m.demand.before,
                    "after": m.demand.after,
                    "at": m.demand.at,
                    "diurnal": m.demand.diurnal,
                },
            }
            for m in MODELS
        ],
        "budget_gib": BUDGET_GIB,
        "on": on,
        "off": off,
        "p99_after_shift_off_over_on": ratio,
    }


def format_result(result: dict[str, Any]) -> str:
    on, off = result["on"], result["off"]
    lines = [f"{'':28}{'controller on':>16}{'controller off':>16}"]
    for key in ("requests", "failed", "loads", "unloads", "budget_overshoot_bytes", "wall_s"):
        lines.append(f"{key:28}{on[key]:>16}{off[key]:>16}")
    for name, v in on["p99_after_shift_ms"].items():
        lines.append(f"{name + ' p99 after shift (ms)':28}{v!s:>16}{off['p99_after_shift_ms'][name]!s:>16}")
        lines.append(f"{name + ' back under SLO (s)':28}{on['recovery_s'][name]!s:>16}{off['recovery_s'][name]!s:>16}")
    for name, c in on["changes"].items():
        lines.append(f"{name + ' changes / most per cool-down':28}{c['changes']:>10} / {c['most_in_cooldown']}")
    lines.append(f"p99 after shift, off / on: {result['p99_after_shift_off_over_on']}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sim.placement", description=__doc__.split("\n\n")[0])
    defaults = Options()
    parser.add_argument("--hosts", type=int, default=defaults.hosts, help="hosts (demand scales with them)")
    parser.add_argument("--duration", type=float, default=defaults.duration_s, help="simulated seconds")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--interval", type=float, default=defaults.interval_s, help="placement.interval_s")
    parser.add_argument("-o", "--output", type=Path, help="write the results JSON here")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    if args.hosts < 5 or args.duration < 60:
        parser.error("at least 5 hosts and 60 s")
    opts = Options(hosts=args.hosts, duration_s=args.duration, seed=args.seed, interval_s=args.interval)

    def progress(message: str) -> None:
        print(f"[sim.placement] {message}", file=sys.stderr, flush=True)

    result = compare(opts, None if args.quiet else progress)
    result["command"] = "python -m benchmarks.sim.placement " + shlex.join(sys.argv[1:] if argv is None else argv)
    result["date"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    sys.stdout.write(format_result(result))
    if args.output is not None:
        path = args.output if args.output.is_absolute() or args.output.parent != Path() else RESULTS_DIR / args.output
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {shown(path)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
