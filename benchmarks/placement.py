"""``python -m benchmarks.placement``: demand-driven placement on a real fleet, with the controller off and on.

The scenario (``benchmarks/scenarios/placement/shift.yaml``) embeds a fleet with ``placement:`` settings, two
models and a load: ``rate_rps`` to model A until ``shift_s``, then to model B (READY on one host only, with
a trickle of ``b_before_rps`` before the shift), for ``after_s`` more seconds. Each mode starts its own
Triton hosts (so both start from the same placement), the picker and Envoy (as ``extproc up`` runs them,
:class:`benchmarks.routing.FleetBench`), and replays the same seeded trace (:mod:`benchmarks.loadgen`):

- ``controller-off``: ``placement.enabled: false``, no controller;
- ``controller-on``: ``extproc placement run`` beside the stack, its log lines (``placement_action``) and
  its Prometheus series (``--metrics-port``) recorded.

Every second the benchmark reads the picker's ``/status`` (which hosts have which model READY) and, with
the controller, its ``/metrics``: copies over time. Reported: B's p99 per ``window_s`` window after the
shift (a request without an OK answer counts as ``timeout_s``: a lower bound of what it cost its caller),
when B's p99 is back under ``slo_ms`` for good, failed requests, copies over time, the controller's actions,
the ratio of B's p99 after the shift off / on, and the budget check: the controller never loads a model on
``budget_host`` (whose declared memory budget its models fill) although demand asks for more copies.

``--steady S`` instead runs the no-flapping check: B at ``rate_rps`` for S seconds (after the same trickle
as before the shift) with the controller on;
the controller's changes per model (one round's actions for one model are one change) are counted in every
``placement.cooldown_s`` window.

Output: tables on stdout and a JSON file (``results/placement-shift.json``, ``results/placement-steady.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, ConfigDict, Field, model_validator

from benchmarks import REPO_ROOT, RESULTS_DIR, SCENARIOS_DIR, child_env, quiet_logs, revision, shown, stop_process
from benchmarks.loadgen import OK_STATUSES, LoadSpec, MixEntry, Records, percentile
from benchmarks.overload import merged
from benchmarks.ports import free_ports
from benchmarks.routing import (
    FleetBench,
    Front,
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
from extproc.config import Fleet
from extproc.runtime.stack import StartupError

DEFAULT_SCENARIO = SCENARIOS_DIR / "placement" / "shift.yaml"
SHIFT_OUTPUT = RESULTS_DIR / "placement-shift.json"
STEADY_OUTPUT = RESULTS_DIR / "placement-steady.json"
MODES = ("controller-off", "controller-on")
POLL_S = 1.0


class Request(BaseModel):
    """What a request for one model carries: a single FP32 input of this shape."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1)
    input: str = "INPUT0"
    shape: tuple[int, ...] = (1, 4)


class PlacementScenario(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    description: str = ""
    fleet: dict[str, Any]  # its ports and directories are replaced at run time, as in benchmarks.routing
    model_a: Request
    model_b: Request
    rate_rps: float = Field(gt=0, le=2000)
    b_before_rps: float = Field(default=0.0, ge=0)
    shift_s: float = Field(gt=0, le=600)
    after_s: float = Field(gt=0, le=600)
    window_s: float = Field(default=5.0, gt=0)
    slo_ms: float = Field(gt=0)
    # How long B's window p99 must stay within slo_ms to count as back under it.
    hold_s: float = Field(default=15.0, ge=0)
    timeout_s: float = Field(default=30.0, gt=0, le=300)
    budget_host: str | None = None
    seed: int = Field(default=1, ge=0)
    drain_timeout_s: float = Field(default=90.0, gt=0, le=600)
    source: str = Field(default="<memory>", exclude=True)

    @model_validator(mode="after")
    def _distinct(self) -> PlacementScenario:
        if self.model_a.model == self.model_b.model:
            raise ValueError("model_a and model_b must be different models")
        return self


def parse_placement_scenario(data: Any, source: str = "<memory>") -> PlacementScenario:
    """Validate a scenario: schema, the embedded fleet (with placeholder ports), and their consistency."""
    scenario = validate_scenario(PlacementScenario, data, source)
    fleet = _validate_fleet(localize_hosts(scenario.fleet, iter(range(20000, 60000))), source)
    problems = []
    managed = set(fleet.placement.models)
    for key, request in (("model_a", scenario.model_a), ("model_b", scenario.model_b)):
        if request.model not in managed:
            problems.append(f"{source}: key {key}.model: {request.model!r} is not under fleet.placement.models")
    b_hosts = [h.name for h in fleet.hosts if h.launch is not None and scenario.model_b.model in h.launch.models]
    if len(b_hosts) != 1:
        problems.append(f"{source}: key model_b.model: must be launched on exactly one host, not {b_hosts}")
    if scenario.budget_host is not None and scenario.budget_host not in {h.name for h in fleet.hosts}:
        problems.append(f"{source}: key budget_host: {scenario.budget_host!r} is not a host of the fleet")
    if problems:
        raise ScenarioError("\n".join(problems))
    return scenario


def load_placement_scenario(path: str | Path) -> PlacementScenario:
    return parse_placement_scenario(read_scenario_yaml(Path(path), ScenarioError), str(path))


# ------------------------------------------------------------------------------------------------ loads


def _entry(request: Request, name: str, rate: float, start_s: float, stop_s: float | None) -> MixEntry:
    return MixEntry(
        model=request.model, input=request.input, shape=request.shape, name=name, rate_rps=rate,
        start_s=start_s, stop_s=stop_s,
    )  # fmt: skip


def shift_load(scenario: PlacementScenario) -> LoadSpec:
    """A at ``rate_rps`` until the shift, B (a trickle until then) at ``rate_rps`` after it; no warm-up, so
    that intended send times are seconds from the start of the load."""
    s = scenario
    mix = [
        _entry(s.model_a, "a", s.rate_rps, 0.0, s.shift_s),
        _entry(s.model_b, "b", s.rate_rps, s.shift_s, s.shift_s + s.after_s),
    ]
    if s.b_before_rps > 0:
        mix.append(_entry(s.model_b, "b-before", s.b_before_rps, 0.0, s.shift_s))
    return LoadSpec(
        rate_rps=s.rate_rps, duration_s=s.shift_s + s.after_s, warmup_s=0.0, seed=s.seed, timeout_s=s.timeout_s,
        mix=tuple(mix),
    )  # fmt: skip


def steady_load(scenario: PlacementScenario, duration_s: float) -> LoadSpec:
    """B alone: ``b_before_rps`` for ``shift_s``, as before the shift, then ``rate_rps`` for ``duration_s``.

    Why the trickle first: capacity per copy comes from the batch-cost fit, which needs batches of
    different sizes; a copy saturated from its first request only ever runs full batches, so its capacity
    stays unknown and the controller keeps the copies it has (see docs/operations.md)."""
    s = scenario
    mix = [_entry(s.model_b, "b", s.rate_rps, s.shift_s, None)]
    if s.b_before_rps > 0:
        mix.append(_entry(s.model_b, "b-before", s.b_before_rps, 0.0, s.shift_s))
    return LoadSpec(
        rate_rps=s.rate_rps, duration_s=s.shift_s + duration_s, warmup_s=0.0, seed=s.seed, timeout_s=s.timeout_s,
        mix=tuple(mix),
    )  # fmt: skip


# ------------------------------------------------------------------------------------------- the report


def latency_ms(records: Records, i: int, timeout_s: float) -> float:
    """An OK request's latency from its intended send time; any other outcome counts as ``timeout_s``."""
    if records.status[i] in OK_STATUSES:
        return (records.done[i] - records.intended[i]) * 1e3
    return timeout_s * 1e3


def requests_of(load: LoadSpec, records: Records, names: Sequence[str]) -> list[int]:
    wanted = {k for k, entry in enumerate(load.mix) if entry.label in names}
    return [i for i, k in enumerate(records.entry) if k in wanted]


def p99_ms(records: Records, idx: Sequence[int], timeout_s: float) -> float:
    return percentile(sorted(latency_ms(records, i, timeout_s) for i in idx), 99)


def windows(
    records: Records, idx: Sequence[int], start_s: float, stop_s: float, width_s: float, timeout_s: float
) -> list[dict[str, Any]]:
    """Per ``width_s`` window of [start_s, stop_s), times from ``start_s``: requests ``idx`` sent in it (by
    intended time), how many failed, their p99 and the hosts that answered them."""
    out = []
    t = start_s
    while t < stop_s - 1e-9:
        end = min(stop_s, t + width_s)
        sent = [i for i in idx if t <= records.intended[i] < end]
        out.append(
            {
                "start_s": round(t - start_s, 3),
                "end_s": round(end - start_s, 3),
                "requests": len(sent),
                "failed": sum(1 for i in sent if records.status[i] not in OK_STATUSES),
                "p99_ms": p99_ms(records, sent, timeout_s),
                "hosts": len({records.host[i] for i in sent if records.status[i] in OK_STATUSES}),
            }
        )
        t = end
    return out


def back_under_s(series: Sequence[Mapping[str, Any]], slo_ms: float, hold_s: float) -> float | None:
    """The start of the first window from which the windows with requests have their p99 within ``slo_ms``
    for ``hold_s``; None if none does while observed.

    Held for a while rather than to the end, as in benchmarks.overload: on a shared 2-core machine a single
    window (a few hundred requests, so its p99 is nearly their maximum) now and then goes over any limit;
    :func:`excursions` counts those after the return."""
    timed = [w for w in series if w["requests"]]
    for k, w in enumerate(timed):
        start = float(w["start_s"])
        if float(timed[-1]["end_s"]) < start + hold_s - 1e-9:
            return None
        held = [v for v in timed[k:] if float(v["start_s"]) < start + max(hold_s, 1e-6) - 1e-9]  # w at least
        if all(v["p99_ms"] <= slo_ms for v in held):
            return start
    return None


def excursions(series: Sequence[Mapping[str, Any]], after_s: float | None, slo_ms: float) -> int:
    """Windows starting at or after ``after_s`` whose p99 is above ``slo_ms`` (0 when ``after_s`` is None)."""
    if after_s is None:
        return 0
    return sum(1 for w in series if w["requests"] and w["start_s"] >= after_s and not w["p99_ms"] <= slo_ms)


@dataclass(frozen=True)
class Change:
    """One round's actions for one model."""

    at: float  # seconds from the start of the load
    model: str
    kind: str  # load, unload, or both
    hosts: tuple[str, ...]
    outcomes: tuple[str, ...]
    # The controller's reason for the first action, with its numbers (demand, capacity per copy, copies).
    reason: str = ""


def parse_time(stamp: str) -> float:
    return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def log_records(lines: Sequence[str]) -> Iterator[dict[str, Any]]:
    """The JSON objects among structured log lines; other lines are skipped."""
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            yield record


def controller_changes(lines: Sequence[str], load_start: float) -> list[Change]:
    """The controller's changes from its JSON log lines (``placement_action``, each round closed by a
    ``placement_round`` line), times in seconds from ``load_start`` (Unix time)."""
    changes: list[Change] = []
    pending: dict[str, list[dict[str, Any]]] = {}
    for record in log_records(lines):
        if record.get("event") == "placement_action":
            pending.setdefault(str(record["model"]), []).append(record)
        elif record.get("event") == "placement_round":
            for model, actions in sorted(pending.items()):
                kinds = {str(a["action"]) for a in actions}
                changes.append(
                    Change(
                        at=round(parse_time(str(actions[0]["timestamp"])) - load_start, 3),
                        model=model,
                        kind=kinds.pop() if len(kinds) == 1 else "both",
                        hosts=tuple(str(a["host"]) for a in actions),
                        outcomes=tuple(str(a["outcome"]) for a in actions),
                        reason=str(actions[0].get("reason", "")),
                    )
                )
            pending.clear()
    return changes


def controller_notes(lines: Sequence[str]) -> dict[str, Any]:
    """From the controller's JSON log lines: per model, the rounds that wanted fewer copies but waited for
    ``scale_down_after_s`` (``placement_scale_down_waiting``) and the longest low demand among them; and
    the footprints it measured at its loads (``placement_footprint``)."""
    waiting: dict[str, dict[str, float]] = {}
    footprints: list[dict[str, Any]] = []
    for record in log_records(lines):
        if record.get("event") == "placement_scale_down_waiting":
            seen = waiting.setdefault(str(record["model"]), {"rounds": 0, "longest_low_s": 0.0})
            seen["rounds"] += 1
            seen["longest_low_s"] = max(seen["longest_low_s"], float(record.get("low_for_s") or 0.0))
        elif record.get("event") == "placement_footprint":
            keys = ("model", "host", "counted", "delta_bytes", "memory", "why")
            footprints.append({k: record.get(k) for k in keys})
    return {"scale_downs_waiting": dict(sorted(waiting.items())), "footprints": footprints}


def most_changes_per_window(changes: Sequence[Change], window_s: float) -> dict[str, int]:
    """Per model, the most changes that fall in any ``window_s`` long interval."""
    out: dict[str, int] = {}
    for model in sorted({c.model for c in changes}):
        times = sorted(c.at for c in changes if c.model == model)
        out[model] = max(sum(1 for u in times if t <= u < t + window_s) for t in times)
    return out


def reversals(changes: Sequence[Change], window_s: float) -> int:
    """Changes of a model the opposite way of its previous one, within ``window_s`` of it: flapping."""
    count = 0
    last: dict[str, Change] = {}
    for c in sorted(changes, key=lambda c: c.at):
        before = last.get(c.model)
        if before is not None and {before.kind, c.kind} == {"load", "unload"} and c.at - before.at < window_s:
            count += 1
        last[c.model] = c
    return count


@dataclass
class Sample:
    """One look at the picker (and the controller) during a run; ``at`` in Unix time."""

    at: float
    ready: dict[str, list[str]]  # host -> models READY
    series: dict[str, float] = field(default_factory=dict)  # the controller's, "name{label=value}" -> value


def copies_timeline(samples: Sequence[Sample], load_start: float, models: Sequence[str]) -> list[dict[str, Any]]:
    """Per sample: seconds from ``load_start`` and each model's READY copies; only samples where a count
    changed (and the first and last)."""
    out: list[dict[str, Any]] = []
    previous: dict[str, int] | None = None
    for k, s in enumerate(samples):
        counts = {m: sum(1 for ready in s.ready.values() if m in ready) for m in models}
        if counts != previous or k == len(samples) - 1:
            out.append({"t_s": round(s.at - load_start, 1), **counts})
        previous = counts
    return out


def budget_check(samples: Sequence[Sample], changes: Sequence[Change], host: str, model: str) -> dict[str, Any]:
    """Whether the controller kept off ``host``: no action of it there, the host's models the same in every
    sample; and whether demand asked for a copy of ``model`` that no host could take meanwhile."""
    models = {tuple(sorted(s.ready.get(host, []))) for s in samples if host in s.ready}
    tiers = f'extproc_placement_unplaced_copies{{model="{model}",'  # one series per tier: their sum
    unplaced = max((sum(v for k, v in s.series.items() if k.startswith(tiers)) for s in samples), default=0.0)
    acted = [asdict(c) for c in changes if host in c.hosts]
    return {
        "host": host,
        "models_seen": [list(m) for m in sorted(models)],
        "actions_there": acted,
        "most_unplaced_copies": unplaced,
        "held": not acted and len(models) == 1,
        # Without demand beyond the other hosts, keeping off the host proves nothing about its budget.
        "tested": unplaced > 0,
    }


# ---------------------------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class Watched:
    """What one mode's run saw beside its records."""

    controller: bool
    load_start: float  # Unix time of the load generator's time 0
    samples: list[Sample]
    changes: list[Change]
    generator: dict[str, Any]
    fleet: Fleet
    notes: dict[str, Any] = field(default_factory=dict)  # controller_notes of its log


class Watcher:
    """Reads the picker's /status (and the controller's /metrics) every ``POLL_S`` in a thread."""

    def __init__(self, status_url: str, metrics_url: str | None) -> None:
        self.status_url = status_url
        self.metrics_url = metrics_url
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _get(self, url: str) -> str | None:
        try:
            with urllib.request.urlopen(url, timeout=2.0) as response:
                return str(response.read().decode())
        except (urllib.error.URLError, OSError):
            return None

    def _run(self) -> None:
        while not self._stop.is_set():
            at = time.time()
            text = self._get(self.status_url)
            if text is not None:
                # A look that cannot be read is skipped, not the rest of the run's.
                with contextlib.suppress(ValueError):
                    self.samples.append(self._sample(at, text))
            self._stop.wait(max(0.0, POLL_S - (time.time() - at)))

    def _sample(self, at: float, status: str) -> Sample:
        hosts = json.loads(status).get("hosts", {})
        ready = {name: sorted(view.get("ready", {})) for name, view in hosts.items()}
        series: dict[str, float] = {}
        metrics = self._get(self.metrics_url) if self.metrics_url else None
        for family in text_string_to_metric_families(metrics or ""):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                series[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return Sample(at, ready, series)

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


@contextlib.contextmanager
def controller(front: Front, metrics_port: int) -> Iterator[Path]:
    """``extproc placement run`` against ``front``'s picker; yields its log file. A controller that exited
    before the end is an error: the run would otherwise read as one where it chose to do nothing."""
    log_path = front.work_dir / "placement-run.log"
    argv = [sys.executable, "-m", "extproc", "--log-format", "json", "placement", "run"]
    argv += ["--config", str(front.work_dir / "fleet.yaml"), "--window", "1", "--metrics-port", str(metrics_port)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=child_env())
    try:
        yield log_path
        if process.poll() is not None:
            tail = log_path.read_text(encoding="utf-8", errors="replace")[-2000:]
            raise StartupError(f"extproc placement run exited with code {process.returncode} during the run:\n{tail}")
    finally:
        stop_process(process, 30)


def run_mode(scenario: PlacementScenario, mode: str, load: LoadSpec, run_dir: Path) -> tuple[Records, Watched]:
    """One mode on fresh Triton hosts: its records, and what was watched meanwhile."""
    on = mode != "controller-off"
    bench = FleetBench(scenario.fleet, scenario.source, run_dir / mode, scenario.drain_timeout_s, "placement")
    (run_dir / mode).mkdir(parents=True, exist_ok=True)
    fleet_data = merged(bench.fleet_data, {"placement": {"enabled": on}})
    try:
        bench.start_tritons()
        with bench.front(Policy.PICKER, mode, fleet_data) as front:
            picker = front.fleet.picker
            status_url = f"http://{picker.metrics_address}:{picker.metrics_port}/status"
            (port,) = free_ports(1)
            with contextlib.ExitStack() as stack:
                log_path = stack.enter_context(controller(front, port)) if on else None
                watcher = stack.enter_context(Watcher(status_url, f"http://127.0.0.1:{port}/metrics" if on else None))
                bench.say(f"{mode}: {load.total_s:g} s of load")
                records, generator, cores, _ = bench.run_loadgen(
                    mode, load, front.gateway, front.work_dir, front.supervisor
                )
                # The generator's clock starts wall_s before it wrote its records (its own start-up excluded).
                out = front.work_dir / f"{mode}-loadgen-out.json"
                load_start = out.stat().st_mtime - generator["wall_s"]
                notes = [
                    f"{c.name} exited during the run (code {c.process.returncode})" for c in front.supervisor.exited()
                ]
        lines = log_path.read_text(encoding="utf-8").splitlines() if log_path is not None else []
        bench.say(f"{mode}: done")
    finally:
        bench.stop()
    return records, Watched(
        on, load_start, watcher.samples, controller_changes(lines, load_start),
        {**generator, "cpu_cores": cores, "notes": notes}, bench.fleet, controller_notes(lines),
    )  # fmt: skip


def analyse_shift(scenario: PlacementScenario, load: LoadSpec, records: Records, watched: Watched) -> dict[str, Any]:
    """Every number of one mode of the demand shift."""
    s = scenario
    b = requests_of(load, records, ["b"])
    everything = list(range(len(records.status)))
    series = windows(records, b, s.shift_s, s.shift_s + s.after_s, s.window_s, s.timeout_s)
    back = back_under_s(series, s.slo_ms, s.hold_s)
    changes = watched.changes
    result: dict[str, Any] = {
        "b_p99_after_shift_ms": p99_ms(records, b, s.timeout_s),
        "b_p50_after_shift_ms": percentile(sorted(latency_ms(records, i, s.timeout_s) for i in b), 50),
        "b_back_under_slo_s": back,
        "b_windows_over_slo_after": excursions(series, back, s.slo_ms),
        "b_windows": series,
        "requests": len(everything),
        "failed": sum(1 for i in everything if records.status[i] not in OK_STATUSES),
        "statuses": _statuses(records, everything),
        "copies": copies_timeline(watched.samples, watched.load_start, [s.model_a.model, s.model_b.model]),
        "changes": [asdict(c) for c in changes],
    }
    if s.budget_host is not None and watched.controller:
        result["budget"] = budget_check(watched.samples, changes, s.budget_host, s.model_b.model)
    if watched.controller:
        result["controller_log"] = watched.notes
    return result


def _statuses(records: Records, idx: Sequence[int]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for i in idx:
        counts[records.status[i]] = counts.get(records.status[i], 0) + 1
    return dict(sorted(counts.items()))


def compare(results: Mapping[str, Mapping[str, Any]], slo_ms: float) -> dict[str, Any]:
    """The issue's checks: B's p99 after the shift off / on (at least 3), B back under its SLO within 30 s
    with the controller, no failed request with it, and the budget held."""
    off, on = results["controller-off"], results["controller-on"]
    ratio = off["b_p99_after_shift_ms"] / on["b_p99_after_shift_ms"] if on["b_p99_after_shift_ms"] > 0 else math.nan
    back = on["b_back_under_slo_s"]
    budget = on.get("budget")
    return {
        "b_p99_ratio_off_over_on": ratio,
        "checks": {
            "ratio_at_least_3": ratio >= 3.0,
            f"back_under_{slo_ms:g}_ms_within_30_s": back is not None and back <= 30.0,
            "no_failed_request_with_controller": on["failed"] == 0,
            "budget_held_under_demand": None if budget is None else bool(budget["held"] and budget["tested"]),
        },
    }


def analyse_steady(
    scenario: PlacementScenario, records: Records, watched: Watched, cooldown_s: float
) -> dict[str, Any]:
    changes = watched.changes
    everything = list(range(len(records.status)))
    most = most_changes_per_window(changes, cooldown_s)
    result: dict[str, Any] = {
        "cooldown_s": cooldown_s,
        "changes": [asdict(c) for c in changes],
        "most_changes_per_cooldown_window": most,
        "reversals_within_cooldown": reversals(changes, cooldown_s),
        # After the load's first cool-down window at full rate: the controller should have settled.
        "changes_after_first_cooldown": sum(1 for c in changes if c.at >= scenario.shift_s + cooldown_s),
        "b_p99_ms": p99_ms(records, everything, scenario.timeout_s),
        "requests": len(everything),
        "failed": sum(1 for i in everything if records.status[i] not in OK_STATUSES),
        "statuses": _statuses(records, everything),
        "copies": copies_timeline(
            watched.samples, watched.load_start, [scenario.model_a.model, scenario.model_b.model]
        ),
        "checks": {"at_most_one_change_per_model_per_cooldown": all(n <= 1 for n in most.values())},
    }
    if scenario.budget_host is not None:
        result["budget"] = budget_check(watched.samples, changes, scenario.budget_host, scenario.model_b.model)
    result["controller_log"] = watched.notes
    return result


# ------------------------------------------------------------------------------------------------ output


def _f(value: Any, spec: str = ".0f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def format_shift(results: Mapping[str, Mapping[str, Any]], comparison: Mapping[str, Any]) -> str:
    lines = []
    first = next(iter(results.values()))
    header = "B p99 (ms) per window after the shift".ljust(40) + "  ".join(
        f"{w['start_s']:>4g}-{w['end_s']:<4g}" for w in first["b_windows"]
    )
    lines.append(header)
    for mode, r in results.items():
        lines.append(mode.ljust(40) + "  ".join(f"{_f(w['p99_ms']):>9}" for w in r["b_windows"]))
        lines.append("  hosts serving B".ljust(40) + "  ".join(f"{w['hosts']:>9}" for w in r["b_windows"]))
    lines.append("")
    for mode, r in results.items():
        lines.append(
            f"{mode}: B p99 after the shift {_f(r['b_p99_after_shift_ms'])} ms (p50 {_f(r['b_p50_after_shift_ms'])}),"
            f" back under the SLO after {_f(r['b_back_under_slo_s'], 'g')} s ({r['b_windows_over_slo_after']} windows"
            f" over it later), failed {r['failed']} of {r['requests']}"
        )
        for c in r["changes"]:
            lines.append(_change_line(c))
        lines.append("  copies: " + "; ".join(", ".join(f"{k} {v}" for k, v in row.items()) for row in r["copies"]))
        lines += _notes_lines(r.get("controller_log", {}))
        if "budget" in r:
            lines.append(_budget_line(r["budget"]))
    lines.append("")
    lines.append(f"B p99 after the shift, off / on: {_f(comparison['b_p99_ratio_off_over_on'], '.1f')}x")
    lines += [f"  {name}: {ok}" for name, ok in comparison["checks"].items()]
    return "\n".join(lines)


def format_steady(r: Mapping[str, Any]) -> str:
    lines = [
        f"steady: {r['requests']} requests, failed {r['failed']}, p99 {_f(r['b_p99_ms'])} ms",
        f"most changes per model in any {r['cooldown_s']:g} s window: {r['most_changes_per_cooldown_window']}",
        f"reversals within a cool-down: {r['reversals_within_cooldown']}; changes after the first cool-down: "
        f"{r['changes_after_first_cooldown']}",
    ]
    for c in r["changes"]:
        lines.append(_change_line(c))
    lines.append("copies: " + "; ".join(", ".join(f"{k} {v}" for k, v in row.items()) for row in r["copies"]))
    lines += _notes_lines(r.get("controller_log", {}))
    if "budget" in r:
        lines.append(_budget_line(r["budget"]))
    lines += [f"  {name}: {ok}" for name, ok in r["checks"].items()]
    return "\n".join(lines)


def _change_line(c: Mapping[str, Any]) -> str:
    line = f"  t={c['at']:6.1f} s  {c['kind']:<6} {c['model']:<16} {','.join(c['hosts'])}  {c['outcomes']}"
    return line + (f"  {c['reason']}" if c.get("reason") else "")


def _notes_lines(notes: Mapping[str, Any]) -> list[str]:
    lines = [
        f"  scale-down of {model} waiting for its window in {int(w['rounds'])} rounds"
        f" (longest low demand {w['longest_low_s']:g} s)"
        for model, w in notes.get("scale_downs_waiting", {}).items()
    ]
    lines += [
        f"  footprint of {f['model']} on {f['host']}: {f['delta_bytes']} bytes ({f['memory']}), {f['why']}"
        for f in notes.get("footprints", [])
    ]
    return lines


def _budget_line(b: Mapping[str, Any]) -> str:
    return (
        f"  budget host {b['host']}: models {b['models_seen']}, actions there {len(b['actions_there'])}, "
        f"most unplaced copies of B {b['most_unplaced_copies']:g}"
    )


def _header(scenario: PlacementScenario, fleet: Fleet, started_at: str) -> dict[str, Any]:
    return {
        "scenario": scenario.name,
        "description": scenario.description,
        "source": scenario.source,
        "started_at": started_at,
        "command": " ".join(["python", "-m", "benchmarks.placement", *sys.argv[1:]]),
        "compiled": compiled(),
        "build": "compiled" if compiled() else "EXTPROC_PURE_PYTHON=1",
        # The load average when the run ended: others' work on a shared machine shows in the latencies.
        "machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "revision": revision(),
        "hosts": fleet_description(fleet),
        "placement": fleet.placement.model_dump(mode="json"),
        "settings": scenario.model_dump(mode="json", exclude={"fleet"}),
    }


def run(
    scenario_path: str | Path = DEFAULT_SCENARIO,
    output: str | Path | None = None,
    steady_s: float | None = None,
    keep_dir: str | Path | None = None,
) -> int:
    """Run the demand shift (both modes) or, with ``steady_s``, the steady load; print, write the JSON.
    0 when every check passed, 1 when one did not or the stack could not start, 2 for an invalid scenario."""
    try:
        scenario = load_placement_scenario(scenario_path)
    except ScenarioError as exc:
        print(f"benchmarks.placement: invalid scenario:\n{exc}", file=sys.stderr)
        return 2
    run_dir = Path(keep_dir) if keep_dir else Path(tempfile.mkdtemp(prefix="extproc-placement-"))
    started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    report: dict[str, Any]
    try:
        if steady_s is not None:
            load = steady_load(scenario, steady_s)
            records, watched = run_mode(scenario, "steady", load, run_dir)
            fleet = watched.fleet
            result = analyse_steady(scenario, records, watched, fleet.placement.cooldown_s)
            report = {**_header(scenario, fleet, started_at), "steady_s": steady_s, "steady": result}
            text = format_steady(result)
            budget = result.get("budget", {"held": True, "tested": True})
            passed = all(result["checks"].values()) and budget["held"] and budget["tested"]
        else:
            load = shift_load(scenario)
            results: dict[str, Any] = {}
            generators: dict[str, Any] = {}
            for mode in MODES:
                records, watched = run_mode(scenario, mode, load, run_dir)
                results[mode] = analyse_shift(scenario, load, records, watched)
                generators[mode] = watched.generator
            comparison = compare(results, scenario.slo_ms)
            report = {**_header(scenario, watched.fleet, started_at), "modes": results, "comparison": comparison}
            report["generator"] = generators
            text = format_shift(results, comparison)
            passed = all(v is not False for v in comparison["checks"].values())
    except (StartupError, OSError, ValueError) as exc:
        print(f"benchmarks.placement: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, _Stop):
        print("benchmarks.placement: interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        if keep_dir is None:
            shutil.rmtree(run_dir, ignore_errors=True)
    out = Path(output) if output is not None else (STEADY_OUTPUT if steady_s is not None else SHIFT_OUTPUT)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    print(text)
    print(f"results: {out}")
    return 0 if passed else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.placement", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scenario", "-s", type=Path, default=DEFAULT_SCENARIO, help=f"default {shown(DEFAULT_SCENARIO)}"
    )
    parser.add_argument(
        "--steady", type=float, metavar="S", help="the no-flapping check: steady load for S seconds, controller on"
    )
    parser.add_argument(
        "--output", "-o", type=Path,
        help=f"JSON results (default {shown(SHIFT_OUTPUT)}, with --steady {shown(STEADY_OUTPUT)})",
    )  # fmt: skip
    parser.add_argument("--keep-dir", type=Path, help="keep logs and configs here instead of a deleted temp dir")
    args = parser.parse_args(argv)
    return run(args.scenario, args.output, args.steady, args.keep_dir)


if __name__ == "__main__":  # pragma: no cover
    quiet_logs()
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
