"""``python -m benchmarks.overload``: demand above capacity through the real gateway (Envoy, picker, Triton).

A scenario file (``benchmarks/scenarios/overload/*.yaml``) embeds a fleet (as :mod:`benchmarks.routing`'s do),
names the overloaded model and a second model on the same hosts, and lists the modes to compare: each mode
patches the fleet (e.g. ``picker.overload.admission: false``, the behaviour before admission control), and
every mode runs in the same run, against the same Triton processes, each with a fresh picker and Envoy.

The run:

1. **Capacity.** Open-loop load well above capacity sent straight to each Triton host that loads the
   overloaded model (no gateway, generous timeout): the copies' capacity is the answers per second while
   their queues never empty. Every rate below is a multiple of it.
2. **Per mode, one load (one seeded trace) in phases**, every client with the scenario's deadline:

   - *unloaded* (``unloaded_s``): a low-rate probe of the overloaded model, the second model at its normal
     rate and ``critical`` requests at a modest rate; their unloaded p99 and goodput;
   - *overload* (``--duration``): default-priority requests at ``factor`` x capacity in all (probe and
     critical included), half REST and half gRPC; per ``window_s`` window: offered, goodput (answered OK
     within the deadline, by answer time) against capacity, refusals (429/503, RESOURCE_EXHAUSTED/
     UNAVAILABLE: count, p99 time to refusal, share with ``retry-after``), answers after the deadline, and
     requests with no answer by their deadline;
   - *recovery* (``recovery_s``): the probe alone again; how long until the p99 over a sliding 1 s window
     (by intended send time; an unanswered or refused probe counts as infinitely slow) is back within
     ``recovery_ratio`` x the same statistic unloaded (its worst window) and stays there for
     ``recovery_hold_s``;
   - *fairness* (``fairness.duration_s``): two clients (``fairness.header`` values) at ``fairness.weights``
     rates, together ``factor`` x capacity; each one's share answered within the deadline.

   The second model runs through every phase; its p99 during the overload is compared with its unloaded p99.

Latencies are from each request's intended send time (:mod:`benchmarks.loadgen`). Output: a table per mode
and a comparison on stdout, progress on stderr, and a JSON file (default ``results/overload.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import json
import math
import os
import shutil
import signal
import sys
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from benchmarks import RESULTS_DIR, SCENARIOS_DIR, quiet_logs, revision, shown
from benchmarks.loadgen import DEADLINE, OK_STATUSES, TIMEOUT, LoadSpec, MixEntry, Records, percentile
from benchmarks.routing import (
    FleetBench,
    Policy,
    ScenarioError,
    _raise_stop,
    _Stop,
    _validate_fleet,
    fleet_description,
    json_safe,
    localize_hosts,
    read_scenario_yaml,
    validate_scenario,
)
from extproc.build import compiled
from extproc.datapath.headers import PRIORITY_HEADER
from extproc.runtime.stack import StartupError

DEFAULT_SCENARIO = SCENARIOS_DIR / "overload" / "timed_batch.yaml"
DEFAULT_OUTPUT = RESULTS_DIR / "overload.json"
# Statuses that mean "overloaded, come back later": what admission control answers instead of queueing.
REFUSALS = frozenset({"http 429", "http 503", "grpc RESOURCE_EXHAUSTED", "grpc UNAVAILABLE"})
NO_ANSWER = frozenset({DEADLINE, TIMEOUT})
# Requests sent in the first seconds of the unloaded phase warm the connections and are not measured.
WARMUP_S = 2.0
# The sliding window of the recovery p99, and how far it slides per step.
RECOVERY_WINDOW_S = 1.0
RECOVERY_STEP_S = 0.1

# The issue's "done when" thresholds, reported as checks next to the numbers.
GOODPUT_MIN = 0.9
REFUSAL_P99_MAX_MS = 50.0
RECOVERY_MAX_S = 5.0
SECOND_P99_MAX_RATIO = 1.2
FAIR_MIN = 0.95
CRITICAL_MIN_RATIO = 0.95


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Target(_Strict):
    """A model and the one FP32 input tensor its requests carry."""

    model: str = Field(min_length=1, max_length=256)
    input: str = Field(default="INPUT0", min_length=1)
    shape: tuple[int, ...] = Field(default=(1, 4), min_length=1, max_length=8)


class SecondModel(Target):
    rate_rps: float = Field(gt=0, le=2000)


class CapacityProbe(_Strict):
    """The capacity measurement: ``rate_rps`` (well above capacity) for ``duration_s`` straight to each copy;
    answers counted from ``skip_s`` (the queue is filling before) to the end of sending."""

    rate_rps: float = Field(default=200.0, gt=0, le=5000)
    duration_s: float = Field(default=6.0, gt=0, le=120)
    skip_s: float = Field(default=1.0, ge=0)

    @model_validator(mode="after")
    def _skip_within(self) -> CapacityProbe:
        if self.skip_s >= self.duration_s:
            raise ValueError(f"skip_s ({self.skip_s:g}) must be below duration_s ({self.duration_s:g})")
        return self


class Fairness(_Strict):
    header: str = Field(default="x-tenant", pattern=r"^[a-z0-9-]{1,64}$")
    weights: tuple[float, float] = (4.0, 1.0)
    duration_s: float = Field(default=20.0, gt=0, le=600)

    @field_validator("weights")
    @classmethod
    def _positive(cls, value: tuple[float, float]) -> tuple[float, float]:
        if min(value) <= 0:
            raise ValueError("fairness weights must be above 0")
        return value


class Mode(_Strict):
    """One variant of the gateway: ``fleet`` is merged into the scenario's fleet (mappings key by key)."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")
    fleet: dict[str, Any] = Field(default_factory=dict)


class OverloadScenario(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    description: str = ""
    # A fleet file's content; ports, runtime_dir and the picker's and Envoy's addresses are replaced.
    fleet: dict[str, Any]
    overloaded: Target
    second: SecondModel
    # Offered load on the overloaded model during the overload, as a multiple of the measured capacity.
    factor: float = Field(default=2.0, gt=1, le=10)
    deadline_s: float = Field(default=2.0, gt=0, le=60)
    capacity: CapacityProbe = CapacityProbe()
    unloaded_s: float = Field(default=10.0, gt=WARMUP_S, le=120)
    overload_s: float = Field(default=60.0, gt=0, le=600)
    recovery_s: float = Field(default=15.0, gt=RECOVERY_WINDOW_S, le=120)
    # How long the probe's p99 must stay within the limit to count as recovered.
    recovery_hold_s: float = Field(default=3.0, ge=0, le=60)
    # The probe of the overloaded model (unloaded, overload and recovery phases), req/s.
    probe_rps: float = Field(default=20.0, gt=0, le=1000)
    # Critical requests (unloaded, overload and recovery phases), as a fraction of capacity.
    critical_share: float = Field(default=0.1, gt=0, lt=1)
    fairness: Fairness = Fairness()
    window_s: float = Field(default=10.0, gt=0, le=60)
    recovery_ratio: float = Field(default=1.2, gt=1)
    seed: int = Field(default=7, ge=0)
    modes: tuple[Mode, ...] = Field(min_length=1)
    drain_timeout_s: float = Field(default=180.0, gt=0, le=900)
    source: str = Field(default="<memory>", exclude=True)

    @model_validator(mode="after")
    def _hold_observable(self) -> OverloadScenario:
        if self.recovery_hold_s > self.recovery_s - RECOVERY_WINDOW_S:
            raise ValueError(
                f"recovery_hold_s ({self.recovery_hold_s:g}) must leave room in recovery_s ({self.recovery_s:g}) "
                f"for a {RECOVERY_WINDOW_S:g} s window"
            )
        return self

    @field_validator("modes")
    @classmethod
    def _distinct(cls, value: tuple[Mode, ...]) -> tuple[Mode, ...]:
        names = [m.name for m in value]
        if len(set(names)) != len(names):
            raise ValueError(f"modes repeat a name: {names}")
        return value

    def mode_fleet(self, mode: Mode, fleet: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """``fleet`` (default the scenario's) with ``mode``'s changes merged in."""
        return merged(self.fleet if fleet is None else fleet, mode.fleet)


def merged(base: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of ``base`` with ``patch`` merged in: mappings key by key, anything else replaced."""
    out = copy.deepcopy(dict(base))
    for key, value in patch.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_overload_scenario(data: Any, source: str = "<memory>") -> OverloadScenario:
    """Validate a scenario (already parsed YAML): its schema, and each mode's fleet as a fleet file."""
    scenario = validate_scenario(OverloadScenario, data, source)
    placeholder = localize_hosts(scenario.fleet, iter(range(20000, 60000)))
    fleets = [_validate_fleet(scenario.mode_fleet(m, placeholder), source) for m in scenario.modes]
    problems = []
    for mode, fleet in zip(scenario.modes, fleets, strict=True):
        loaded = {m for h in fleet.hosts if h.launch is not None for m in h.launch.models}
        if any(h.launch is None for h in fleet.hosts) or fleet.pools:
            problems.append(f"{source}: key fleet.hosts: the benchmark starts every host itself (launch: on each)")
        for key, target in (("overloaded", scenario.overloaded), ("second", scenario.second)):
            if target.model not in loaded:
                problems.append(f"{source}: key {key}.model: {target.model!r} is loaded on no host (mode {mode.name})")
    if problems:
        raise ScenarioError("\n".join(sorted(set(problems))))
    return scenario


def load_overload_scenario(path: str | Path) -> OverloadScenario:
    path = Path(path)
    return parse_overload_scenario(read_scenario_yaml(path, ScenarioError), str(path))


# ------------------------------------------------------------------------------------------------ loads


@dataclass(frozen=True)
class Phases:
    """Phase boundaries, in seconds from the start of a mode's load."""

    unloaded_end: float
    overload_end: float
    recovery_end: float
    fairness_end: float


def phases(scenario: OverloadScenario) -> Phases:
    unloaded = scenario.unloaded_s
    overload = unloaded + scenario.overload_s
    recovery = overload + scenario.recovery_s
    return Phases(unloaded, overload, recovery, recovery + scenario.fairness.duration_s)


def _entries(
    stream: str,
    target: Target,
    rate_rps: float,
    start_s: float,
    stop_s: float,
    deadline_s: float,
    headers: Mapping[str, str] | None = None,
) -> list[MixEntry]:
    """A stream of requests, half REST and half gRPC, each half a Poisson stream of its own."""
    return [
        MixEntry(
            model=target.model,
            protocol=protocol,
            input=target.input,
            shape=target.shape,
            name=f"{stream}/{protocol}",
            headers=dict(headers or {}),
            deadline_s=deadline_s,
            rate_rps=rate_rps / 2,
            start_s=start_s,
            stop_s=stop_s,
        )
        for protocol in ("http", "grpc")
    ]


def mode_load(scenario: OverloadScenario, capacity_rps: float) -> LoadSpec:
    """The load of one mode, every phase in one trace (the same for every mode of a run)."""
    ph = phases(scenario)
    deadline = scenario.deadline_s
    critical_rps = scenario.critical_share * capacity_rps
    offered = scenario.factor * capacity_rps
    standard_rps = offered - scenario.probe_rps - critical_rps
    if standard_rps <= 0:
        raise ValueError(
            f"the probe ({scenario.probe_rps:g} req/s) and critical requests ({critical_rps:.1f} req/s) exceed "
            f"{scenario.factor:g} x the measured capacity ({capacity_rps:.1f} req/s)"
        )
    weights = scenario.fairness.weights
    header = scenario.fairness.header
    mix = [
        *_entries("probe", scenario.overloaded, scenario.probe_rps, 0.0, ph.recovery_end, deadline),
        *_entries("second", scenario.second, scenario.second.rate_rps, 0.0, ph.fairness_end, deadline),
        *_entries(
            "critical",
            scenario.overloaded,
            critical_rps,
            0.0,
            ph.recovery_end,
            deadline,
            {PRIORITY_HEADER: "critical"},
        ),
        *_entries("standard", scenario.overloaded, standard_rps, ph.unloaded_end, ph.overload_end, deadline),
        *(
            entry
            for client, weight in zip(("client-a", "client-b"), weights, strict=True)
            for entry in _entries(
                client,
                scenario.overloaded,
                offered * weight / sum(weights),
                ph.recovery_end,
                ph.fairness_end,
                deadline,
                {header: client},
            )
        ),
    ]
    return LoadSpec(
        rate_rps=offered,  # the rate entries without their own would share: none here
        duration_s=ph.fairness_end,
        warmup_s=0.0,
        seed=scenario.seed,
        timeout_s=deadline,
        mix=tuple(mix),
    )


def capacity_load(scenario: OverloadScenario) -> LoadSpec:
    probe = scenario.capacity
    entry = MixEntry(
        model=scenario.overloaded.model,
        input=scenario.overloaded.input,
        shape=scenario.overloaded.shape,
        name="capacity",
    )
    return LoadSpec(
        rate_rps=probe.rate_rps,
        duration_s=probe.duration_s,
        warmup_s=0.0,
        seed=scenario.seed,
        # Long enough for the backlog to drain (duration x (rate / capacity - 1)): a request abandoned by
        # the client would still be computed by Triton, after the load, when the next phase has started.
        timeout_s=min(300.0, probe.duration_s * 4 + 10),
        mix=(entry,),
    )


# ------------------------------------------------------------------------------------------- analysis


def measured_capacity(records: Records, skip_s: float, stop_s: float) -> float:
    """Answers per second between ``skip_s`` and ``stop_s`` (load end) of a load above capacity."""
    answered = sum(
        1 for s, d in zip(records.status, records.done, strict=True) if s in OK_STATUSES and skip_s <= d < stop_s
    )
    return answered / (stop_s - skip_s)


def latency_s(records: Records, i: int) -> float:
    return records.done[i] - records.intended[i]


def outcome(records: Records, i: int, deadline_s: float) -> str:
    """``good`` (OK within the deadline), ``late`` (answered after it), ``refused``, ``no_answer`` or ``error``."""
    status = records.status[i]
    if status in NO_ANSWER:
        return "no_answer"
    if latency_s(records, i) > deadline_s and not status.startswith("client "):
        return "late"
    if status in OK_STATUSES:
        return "good"
    if status in REFUSALS:
        return "refused"
    return "error"


def _p(values: Sequence[float], q: float) -> float:
    return percentile(sorted(values), q)


def outcome_summary(records: Records, idx: Sequence[int], deadline_s: float) -> dict[str, Any]:
    """Counts of each outcome over requests ``idx``, goodput fraction, OK latencies and refusal times."""
    counts = dict.fromkeys(("good", "late", "refused", "no_answer", "error"), 0)
    refusal_ms: list[float] = []
    ok_ms: list[float] = []
    with_retry_after = 0
    for i in idx:
        kind = outcome(records, i, deadline_s)
        counts[kind] += 1
        if kind == "refused":
            refusal_ms.append(latency_s(records, i) * 1e3)
            with_retry_after += bool(records.retry_after[i])
        if records.status[i] in OK_STATUSES:
            ok_ms.append(latency_s(records, i) * 1e3)
    n = len(idx)
    return {
        "requests": n,
        **counts,
        "good_fraction": counts["good"] / n if n else math.nan,
        "p50_ms": _p(ok_ms, 50),
        "p99_ms": _p(ok_ms, 99),
        "p99_all_ms": _p(ok_ms + [math.inf] * (n - len(ok_ms)), 99),
        "refusal_p99_ms": _p(refusal_ms, 99),
        "refusal_retry_after_fraction": with_retry_after / counts["refused"] if counts["refused"] else math.nan,
        "statuses": dict(sorted(Counter(records.status[i] for i in idx).items())),
    }


def windows(
    records: Records,
    idx: Sequence[int],
    start_s: float,
    stop_s: float,
    width_s: float,
    capacity_rps: float,
    deadline_s: float,
) -> list[dict[str, Any]]:
    """Per ``width_s`` window of [start_s, stop_s): requests sent (by intended time) and their outcomes;
    goodput is counted by answer time, so it is what the copies delivered in that window."""
    out = []
    t = start_s
    while t < stop_s - 1e-9:
        end = min(stop_s, t + width_s)
        span = end - t
        sent = [i for i in idx if t <= records.intended[i] < end]
        good_done = sum(1 for i in idx if t <= records.done[i] < end and outcome(records, i, deadline_s) == "good")
        summary = outcome_summary(records, sent, deadline_s)
        goodput = good_done / span
        out.append(
            {
                "start_s": t - start_s,
                "end_s": end - start_s,
                "offered_rps": len(sent) / span,
                "goodput_rps": goodput,
                "goodput_over_capacity": goodput / capacity_rps if capacity_rps > 0 else math.nan,
                **{k: summary[k] for k in ("refused", "refusal_p99_ms", "refusal_retry_after_fraction")},
                "late": summary["late"],
                "no_answer": summary["no_answer"],
                "error": summary["error"],
            }
        )
        t = end
    return out


def sliding_p99(
    records: Records,
    idx: Sequence[int],
    start_s: float,
    end_s: float,
    window_s: float = RECOVERY_WINDOW_S,
    step_s: float = RECOVERY_STEP_S,
) -> list[tuple[float, float]]:
    """(window start, p99 ms) of every ``window_s`` window of requests ``idx`` (by intended send time)
    starting every ``step_s`` in [start_s, end_s - window_s]; windows with no request are left out.

    A request not answered OK within any time counts as infinitely slow: a refused probe is not a fast one.
    """
    out: list[tuple[float, float]] = []
    t = start_s
    while t + window_s <= end_s + 1e-9:
        lat = [
            latency_s(records, i) * 1e3 if records.status[i] in OK_STATUSES else math.inf
            for i in idx
            if t <= records.intended[i] < t + window_s
        ]
        if lat:
            out.append((t, _p(lat, 99)))
        t += step_s
    return out


def recovery_time(series: Sequence[tuple[float, float]], stop_s: float, limit_ms: float, hold_s: float) -> float | None:
    """Seconds after ``stop_s`` until the window p99 of ``series`` (:func:`sliding_p99` from ``stop_s`` on)
    is within ``limit_ms`` and stays there for ``hold_s``; None if it never does while observed.

    Held for a while rather than until the end: with a few dozen probes per window, each window's p99 is
    nearly their maximum, and over a long enough tail chance alone puts one window above any limit.
    """
    for k, (t, _) in enumerate(series):
        if series[-1][0] < t + hold_s - 1e-9:
            return None
        if all(p99 <= limit_ms for u, p99 in series[k:] if u <= t + hold_s + 1e-9):
            return t - stop_s
    return None


def excursions(series: Sequence[tuple[float, float]], after_s: float, limit_ms: float) -> int:
    """Windows of ``series`` starting after ``after_s`` whose p99 is above ``limit_ms``."""
    return sum(1 for t, p99 in series if t > after_s and p99 > limit_ms)


def streams_of(load: LoadSpec, records: Records) -> dict[str, list[int]]:
    """Request indexes by stream (``probe``, ``second``, ...: the mix entry's name before ``/``) and by
    stream and protocol (``probe/http``)."""
    out: dict[str, list[int]] = {}
    for i, k in enumerate(records.entry):
        label = load.mix[k].label
        out.setdefault(label.split("/", 1)[0], []).append(i)
        out.setdefault(label, []).append(i)
    return out


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) else math.nan


def _between(records: Records, idx: Sequence[int], start_s: float, stop_s: float) -> list[int]:
    return [i for i in idx if start_s <= records.intended[i] < stop_s]


def analyse_mode(scenario: OverloadScenario, load: LoadSpec, records: Records, capacity_rps: float) -> dict[str, Any]:
    """Every number of one mode, and the issue's checks on them."""
    ph = phases(scenario)
    deadline = scenario.deadline_s
    by = streams_of(load, records)

    def phase(stream: str, start: float, stop: float) -> dict[str, Any]:
        return outcome_summary(records, _between(records, by.get(stream, []), start, stop), deadline)

    model_idx = sorted(i for s in ("probe", "critical", "standard") for i in by.get(s, []))
    unloaded = {s: phase(s, WARMUP_S, ph.unloaded_end) for s in ("probe", "second", "critical")}
    during = {s: phase(s, ph.unloaded_end, ph.overload_end) for s in ("probe", "second", "critical", "standard")}
    per_protocol = {p: phase(f"standard/{p}", ph.unloaded_end, ph.overload_end) for p in ("http", "grpc")}
    win = windows(records, model_idx, ph.unloaded_end, ph.overload_end, scenario.window_s, capacity_rps, deadline)
    # A 1 s window holds a few dozen probes, so its p99 is close to their maximum: the unloaded value it is
    # compared with is the same statistic unloaded (the worst window), not the p99 of the whole phase, which
    # chance alone would make a window exceed every few seconds.
    probes = by.get("probe", [])
    unloaded_windows = sliding_p99(records, probes, WARMUP_S, ph.unloaded_end)
    unloaded_window_p99 = max((p99 for _, p99 in unloaded_windows), default=math.nan)
    limit_ms = scenario.recovery_ratio * unloaded_window_p99
    after = sliding_p99(records, probes, ph.overload_end, ph.recovery_end)
    recovery = recovery_time(after, ph.overload_end, limit_ms, scenario.recovery_hold_s)
    fairness = {c: phase(c, ph.recovery_end, ph.fairness_end) for c in ("client-a", "client-b")}
    fairness_protocols = {
        f"{c}/{p}": phase(f"{c}/{p}", ph.recovery_end, ph.fairness_end)
        for c in ("client-a", "client-b")
        for p in ("http", "grpc")
    }
    overload_all = outcome_summary(records, _between(records, model_idx, ph.unloaded_end, ph.overload_end), deadline)
    # The second model's callers see refusals too: over all its requests, one not answered OK counts as
    # infinitely slow, so a p99 that only looks at the answered ones cannot hide them.
    second_ratio = _ratio(during["second"]["p99_all_ms"], unloaded["second"]["p99_all_ms"])
    critical_ratio = _ratio(during["critical"]["good_fraction"], unloaded["critical"]["good_fraction"])
    light = "client-a" if scenario.fairness.weights[0] < scenario.fairness.weights[1] else "client-b"
    after_first = [w["goodput_over_capacity"] for w in win[1:]]
    checks = {
        "goodput_every_window_after_first": bool(after_first) and min(after_first) >= GOODPUT_MIN,
        "refusals_fast": not overload_all["refused"] or overload_all["refusal_p99_ms"] <= REFUSAL_P99_MAX_MS,
        "refusals_with_retry_after": not overload_all["refused"] or overload_all["refusal_retry_after_fraction"] >= 1.0,
        "none_answered_after_deadline": overload_all["late"] == 0,
        "recovered": recovery is not None and recovery <= RECOVERY_MAX_S,
        "second_model_p99": second_ratio <= SECOND_P99_MAX_RATIO,
        "light_client_served": fairness[light]["good_fraction"] >= FAIR_MIN,
        "critical_goodput": critical_ratio >= CRITICAL_MIN_RATIO,
    }
    return {
        "unloaded": unloaded,
        "overload": {**during, "all": overload_all, "standard_by_protocol": per_protocol},
        "windows": win,
        "min_goodput_over_capacity_after_first_window": min(after_first) if after_first else math.nan,
        "recovery": {
            "unloaded_window_p99_ms": unloaded_window_p99,
            "limit_ms": limit_ms,
            "seconds": recovery,
            "hold_s": scenario.recovery_hold_s,
            "observed_s": scenario.recovery_s,
            # Windows over the limit after the recovery was held: how noisy the probe's p99 is.
            "windows_over_limit_after": (
                excursions(after, ph.overload_end + recovery + scenario.recovery_hold_s, limit_ms)
                if recovery is not None
                else None
            ),
        },
        "second_p99_ratio": second_ratio,
        "critical_goodput_ratio": critical_ratio,
        "fairness": {**fairness, "by_protocol": fairness_protocols, "light_client": light},
        "checks": checks,
    }


# ----------------------------------------------------------------------------------------------- output


def _f(value: Any, spec: str = ".1f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, spec)


def format_mode(name: str, result: Mapping[str, Any]) -> str:
    lines = [
        f"mode {name}: overload windows (overloaded model, all its requests; goodput by answer time)",
        f"{'window':>10} {'offered/s':>9} {'goodput/s':>9} {'x cap':>6} {'refused':>7} {'ref p99':>8}"
        f" {'retry-af':>8} {'late':>6} {'no ans':>6} {'errors':>6}",
    ]
    for w in result["windows"]:
        lines.append(
            f"{_f(w['start_s'], '.0f'):>4}-{_f(w['end_s'], '.0f'):<3} s {_f(w['offered_rps']):>9}"
            f" {_f(w['goodput_rps']):>9} {_f(w['goodput_over_capacity'], '.2f'):>6} {w['refused']:>7}"
            f" {_f(w['refusal_p99_ms']):>8} {_f(w['refusal_retry_after_fraction'], '.2f'):>8}"
            f" {w['late']:>6} {w['no_answer']:>6} {w['error']:>6}"
        )
    return "\n".join(lines)


def _row_cells(r: Mapping[str, Any]) -> dict[str, str]:
    """One mode's cells of the comparison table, by row label."""
    over, unl, fair = r["overload"], r["unloaded"], r["fairness"]
    recovered = r["recovery"]["seconds"]
    cells = {
        "goodput / capacity, min after 1st window": _f(r["min_goodput_over_capacity_after_first_window"], ".2f"),
    }
    for p in ("http", "grpc"):
        cells[f"standard {p}: good / late / refused / no answer"] = "{good} / {late} / {refused} / {no_answer}".format(
            **over["standard_by_protocol"][p]
        )
    cells |= {
        "refusal p99 ms (share with retry-after)": (
            f"{_f(over['all']['refusal_p99_ms'])} ({_f(over['all']['refusal_retry_after_fraction'], '.2f')})"
        ),
        "answered after the deadline": str(over["all"]["late"]),
        "probe p99 unloaded ms (worst 1 s window)": (
            f"{_f(unl['probe']['p99_ms'])} ({_f(r['recovery']['unloaded_window_p99_ms'])})"
        ),
        "recovery (p99 back within ratio x worst unloaded window), s": (
            _f(recovered) if recovered is not None else f">{r['recovery']['observed_s']:g}"
        ),
        "second model p99 unloaded / overload ms": f"{_f(unl['second']['p99_ms'])} / {_f(over['second']['p99_ms'])}",
        "second model good unloaded / overload": (
            f"{_f(unl['second']['good_fraction'], '.3f')} / {_f(over['second']['good_fraction'], '.3f')}"
        ),
        "second model p99 ratio (unanswered = inf)": _f(r["second_p99_ratio"], ".2f"),
        "critical goodput unloaded / overload": (
            f"{_f(unl['critical']['good_fraction'], '.3f')} / {_f(over['critical']['good_fraction'], '.3f')}"
        ),
        "fairness: client-a / client-b good": (
            f"{_f(fair['client-a']['good_fraction'], '.3f')} / {_f(fair['client-b']['good_fraction'], '.3f')}"
        ),
    }
    for check, passed in r["checks"].items():
        cells[f"check {check}"] = "pass" if passed else "FAIL"
    return cells


def format_comparison(results: Mapping[str, Mapping[str, Any]]) -> str:
    per_mode = [_row_cells(r) for r in results.values()]
    rows = [(label, [cells[label] for cells in per_mode]) for label in per_mode[0]]
    width = max(len(label) for label, _ in rows)
    cols = [max(len(name), *(len(cells[k]) for _, cells in rows)) for k, name in enumerate(results)]
    header = f"{'':<{width}}  " + "  ".join(f"{n:>{c}}" for n, c in zip(results, cols, strict=True))
    lines = [header, "-" * len(header)]
    for label, cells in rows:
        lines.append(f"{label:<{width}}  " + "  ".join(f"{v:>{c}}" for v, c in zip(cells, cols, strict=True)))
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- the run


def measure_capacity(bench: FleetBench, scenario: OverloadScenario) -> dict[str, Any]:
    """Each copy of the overloaded model in turn, straight at its Triton host; their capacities summed."""
    load = capacity_load(scenario)
    per_host: dict[str, float] = {}
    for host in bench.fleet.hosts:
        if host.launch is None or scenario.overloaded.model not in host.launch.models:
            continue
        bench.say(
            f"capacity of {scenario.overloaded.model} on {host.name}: {load.rate_rps:g} req/s for {load.duration_s:g} s"
        )
        records, _, _, _ = bench.run_loadgen(
            f"capacity-{host.name}", load, f"http://{host.http_endpoint}", bench.run_dir / "capacity"
        )
        per_host[host.name] = measured_capacity(records, scenario.capacity.skip_s, load.duration_s)
        bench.say(f"capacity on {host.name}: {per_host[host.name]:.1f} req/s")
        bench.drain()
    return {"rps": sum(per_host.values()), "per_host": per_host, "probe": load.model_dump(mode="json")}


def run_scenario(
    scenario: OverloadScenario, modes: Sequence[str] | None = None, keep_dir: Path | None = None
) -> dict[str, Any]:
    chosen = [m for m in scenario.modes if modes is None or m.name in modes]
    run_dir = keep_dir or Path(tempfile.mkdtemp(prefix="extproc-overload-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    bench = FleetBench(scenario.fleet, scenario.source, run_dir, scenario.drain_timeout_s, "overload")
    started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    bench.say(f"scenario {scenario.name}: run directory {run_dir}")
    results: dict[str, Any] = {}
    generators: dict[str, Any] = {}
    try:
        bench.start_tritons()
        capacity = measure_capacity(bench, scenario)
        load = mode_load(scenario, capacity["rps"])
        ph = phases(scenario)
        for mode in chosen:
            with bench.front(Policy.PICKER, mode.name, scenario.mode_fleet(mode, bench.fleet_data)) as front:
                bench.say(
                    f"{mode.name}: {ph.fairness_end:g} s: unloaded until {ph.unloaded_end:g} s, overload "
                    f"({scenario.factor:g} x {capacity['rps']:.1f} req/s) until {ph.overload_end:g} s, recovery "
                    f"until {ph.recovery_end:g} s, fairness until {ph.fairness_end:g} s"
                )
                records, generator, cores, _ = bench.run_loadgen(
                    mode.name, load, front.gateway, front.work_dir, front.supervisor
                )
                notes = [
                    f"{c.name} exited during the run (code {c.process.returncode})" for c in front.supervisor.exited()
                ]
            drained = bench.drain()
            results[mode.name] = analyse_mode(scenario, load, records, capacity["rps"])
            generators[mode.name] = {**generator, "cpu_cores": cores, "drained_s": drained, "notes": notes}
            bench.say(f"{mode.name}: done; Triton drained in {drained:.1f} s")
    finally:
        bench.stop()
        if keep_dir is None:
            shutil.rmtree(run_dir, ignore_errors=True)
    return {
        "scenario": scenario.name,
        "description": scenario.description,
        "source": scenario.source,
        "started_at": started_at,
        "machine": {"cpus": os.cpu_count()},
        "command": " ".join(["python", "-m", "benchmarks.overload", *sys.argv[1:]]),
        "revision": revision(),
        # Whether the picker's compiled modules ran (see extproc/build.py), as in the other benchmarks.
        "compiled": compiled(),
        "hosts": fleet_description(bench.fleet),
        "settings": scenario.model_dump(mode="json", exclude={"fleet"}),
        "phases": asdict(ph),
        "capacity": capacity,
        "modes": results,
        "generator": generators,
    }


def find_scenario(value: str | Path) -> Path:
    path = Path(value)
    if path.exists() or path.parent != Path():
        return path
    named = SCENARIOS_DIR / "overload" / (path.name if path.suffix else f"{path.name}.yaml")
    return named if named.is_file() else path


def run(
    scenario: str | Path = DEFAULT_SCENARIO,
    output: str | Path = DEFAULT_OUTPUT,
    duration_s: float | None = None,
    modes: Sequence[str] | None = None,
    keep_dir: str | Path | None = None,
) -> int:
    """Run the scenario, print the tables, write the JSON. 0, or 2 for an invalid scenario, 1 when the stack
    could not be started."""
    try:
        parsed = load_overload_scenario(find_scenario(scenario))
        if duration_s is not None:
            parsed = parse_overload_scenario(
                {**parsed.model_dump(mode="json"), "overload_s": duration_s}, parsed.source
            )
        unknown = sorted(set(modes or ()) - {m.name for m in parsed.modes})
        if unknown:
            raise ScenarioError(f"{parsed.source}: no mode {unknown}; modes: {[m.name for m in parsed.modes]}")
    except ScenarioError as exc:
        print(f"benchmarks.overload: invalid scenario:\n{exc}", file=sys.stderr)
        return 2
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        report = run_scenario(parsed, modes, Path(keep_dir) if keep_dir else None)
    except (StartupError, OSError, ValueError) as exc:
        print(f"benchmarks.overload: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, _Stop):
        print("benchmarks.overload: interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    cap = report["capacity"]
    print(
        f"scenario {parsed.name}: {parsed.overloaded.model} at {parsed.factor:g} x its measured capacity "
        f"{cap['rps']:.1f} req/s for {parsed.overload_s:g} s, deadline {parsed.deadline_s:g} s, REST and gRPC; "
        f"second model {parsed.second.model} at {parsed.second.rate_rps:g} req/s"
    )
    for name, result in report["modes"].items():
        print()
        print(format_mode(name, result))
    print()
    print(format_comparison(report["modes"]))
    # On a small machine the parts compete for cores: a second model's p99 moves with that, not only with
    # the gateway's decisions.
    for name, gen in report["generator"].items():
        cores = gen["cpu_cores"]
        parts = ", ".join(f"{k} {v:.2f}" for k, v in cores.items() if k != "machine")
        print(
            f"CPU cores used, {name}: {parts}; whole machine {cores.get('machine', math.nan):.2f} of {os.cpu_count()}"
        )
        for note in gen["notes"]:
            print(f"  {name}: {note}")
    print(f"results: {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overload", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scenario",
        "-s",
        type=Path,
        default=DEFAULT_SCENARIO,
        help=f"scenario file, or a name in {shown(SCENARIOS_DIR / 'overload')}/ (default {shown(DEFAULT_SCENARIO)})",
    )
    parser.add_argument("--duration", type=float, help="seconds of overload (default: the scenario's, 60)")
    parser.add_argument(
        "--output", "-o", type=Path, default=DEFAULT_OUTPUT, help=f"JSON results (default {shown(DEFAULT_OUTPUT)})"
    )
    parser.add_argument("--modes", nargs="+", help="run only these of the scenario's modes")
    parser.add_argument("--keep-dir", type=Path, help="keep logs and configs here instead of a deleted temp dir")
    args = parser.parse_args(argv)
    return run(args.scenario, args.output, args.duration, args.modes, args.keep_dir)


if __name__ == "__main__":  # pragma: no cover
    quiet_logs()
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
