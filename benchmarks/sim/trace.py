"""The seeded request trace of a scenario: arrival times, request kinds and sizes, and a gateway draw.

Every policy (and every number of pickers) replays the same trace: the same seed always gives the same
times, kinds and sizes. Which gateway a request enters is a uniform draw stored with it, so a run with K
gateways sends request ``i`` to gateway ``int(gate[i] * K)``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from benchmarks.sim.scenario import Arrival, Rows, SimScenario


@dataclass(frozen=True, slots=True)
class Trace:
    arrival: list[float]  # seconds from the start, ascending
    entry: list[int]  # index into the scenario's load.mix
    rows: list[int]
    gate: list[float]  # uniform in [0, 1): which gateway the request enters

    def __len__(self) -> int:
        return len(self.arrival)


def _arrivals(rate: float, total_s: float, arrival: Arrival, limit: int | None, rng: random.Random) -> list[float]:
    out: list[float] = []
    expo = rng.expovariate
    if arrival.process == "poisson":
        t = 0.0
        while True:
            t += expo(rate)
            if t >= total_s or (limit is not None and len(out) >= limit):
                return out
            out.append(t)
    # On/off: piecewise Poisson with the mean rate ``rate``. Exponential gaps are memoryless, so a gap that
    # crosses a phase boundary is redrawn from the boundary at the next phase's rate.
    period = arrival.on_s + arrival.off_s
    on_rate = rate * period / (arrival.on_s + arrival.off_fraction * arrival.off_s)
    off_rate = on_rate * arrival.off_fraction
    cycle = 0
    while (limit is None or len(out) < limit) and cycle * period < total_s:
        for begin, end, r in (
            (cycle * period, cycle * period + arrival.on_s, on_rate),
            (cycle * period + arrival.on_s, (cycle + 1) * period, off_rate),
        ):
            t = begin
            while r > 0:
                t += expo(r)
                if t >= end or t >= total_s:
                    break
                out.append(t)
        cycle += 1
    return out[:limit] if limit is not None else out


def draw_rows(rows: Rows, rng: random.Random) -> int:
    if rows.dist == "fixed":
        return rows.value
    if rows.dist == "uniform":
        return rng.randint(rows.min, rows.max)
    if rows.dist == "bimodal":
        return rows.large if rng.random() < rows.p_large else rows.small
    u = 1.0 - rng.random()  # (0, 1]
    return min(rows.max, int(rows.min * u ** (-1.0 / rows.alpha)))


def build_trace(scenario: SimScenario) -> Trace:
    load = scenario.load
    rate = scenario.rate_rps()
    # A number of requests: as many as asked for, however long they take to arrive.
    total = math.inf if load.requests is not None else scenario.total_s()
    arrival_rng = random.Random(f"{scenario.seed}/arrivals")
    kind_rng = random.Random(f"{scenario.seed}/kinds")
    gate_rng = random.Random(f"{scenario.seed}/gateways")
    times = _arrivals(rate, total, load.arrival, load.requests, arrival_rng)
    weights = [e.weight for e in load.mix]
    cumulative = []
    acc = 0.0
    for w in weights:
        acc += w
        cumulative.append(acc)
    entries: list[int] = []
    rows: list[int] = []
    for _ in times:
        x = kind_rng.random() * acc
        k = 0
        while k < len(cumulative) - 1 and x >= cumulative[k]:
            k += 1
        entries.append(k)
        rows.append(draw_rows(load.mix[k].rows, kind_rng))
    gates = [gate_rng.random() for _ in times]
    return Trace(times, entries, rows, gates)
