"""``python -m benchmarks.capacity --scenario NAME --slo-ms 100``: each policy's capacity at a p99 SLO, on a real fleet.

The capacity of a policy is the highest offered rate (open-loop Poisson, the scenario's request mix) at which
the p99 latency, from each request's intended send time, stays within the SLO with no error (both measured
after each probe's warm-up, as ``benchmarks.routing`` measures; warm-up errors are reported apart). It is found by a
search over the rate, per policy: from the scenario's rate (or ``--start-rps``) up by ``--growth`` while the
probes pass, down while they fail, until a passing rate and a failing one bracket it; then bisection until the
bracket is narrower than ``--resolution`` (relative). Each step is one short run of the load at that rate
(``--warmup-s`` then ``--duration-s`` measured).

It reuses :mod:`benchmarks.routing`'s stack: the scenario's Triton hosts are started once, and each policy's
gateway (Envoy, and the picker or the baseline processor) once, for the whole search, paused (SIGSTOP) while
another policy's probe runs so that its polling takes no CPU from it. The probes go through
:mod:`benchmarks.loadgen` in a child process. The policies take turns at every step (the order rotates each
round), so drift in the machine's other load hits them alike; Triton's queues drain after every probe.

A probe in which the load generator fell behind its schedule (send lag p99 over ``--max-lag-ms``, by default
a tenth of the SLO and at least :data:`benchmarks.loadgen.LAG_BEHIND_MS`) measured the machine, not the
policy: it is repeated once (the machine's other load comes and goes) and, if the generator falls behind
again, the rate is an upper bound on what this machine can measure, not a pass; the report says so
(``limited by: generator``). Each probe also records the CPU cores its stack, the processes at normal
priority and the whole machine used while it ran, so that a probe failed on a saturated machine
(``machine_saturated``) is told apart from one the policy failed on its own.

Output: progress lines on stderr, a table on stdout, and a JSON file (default
``results/capacity-NAME-TIME.json``) with every probe.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from benchmarks import RESULTS_DIR, SCENARIOS_DIR, quiet_logs, revision, shown
from benchmarks.loadgen import LAG_BEHIND_MS, OK_STATUSES, LoadSpec, Records, percentile
from benchmarks.routing import (
    SETTLE_S,
    Front,
    Policy,
    RoutingBench,
    Scenario,
    ScenarioError,
    _raise_stop,
    _Stop,
    find_scenario,
    fleet_description,
    json_safe,
    load_scenario,
    stat_table,
)
from extproc.build import compiled
from extproc.runtime.stack import StartupError

DEFAULT_SLO_MS = 100.0
# A probe during which processes at normal priority (nice <= 0: ours and whoever else competes with them as
# equals) used at least this share of the machine's cores ran on a saturated machine. Niced processes are
# left out: they soak up idle cores but yield them.
SATURATED_SHARE = 0.9

PASS = "pass"
OVER_SLO = "over_slo"
ERRORS = "errors"
GENERATOR = "generator"
_VERDICT_TEXT = {PASS: "pass", OVER_SLO: "p99 over the SLO", ERRORS: "errors", GENERATOR: "generator behind"}


class SearchSettings(BaseModel):
    """How the search probes: the SLO, where it starts, its bounds and steps, and each probe's length."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    slo_ms: float = Field(default=DEFAULT_SLO_MS, gt=0)
    # None: the scenario's rate.
    start_rps: float | None = Field(default=None, gt=0, le=5000)
    min_rps: float = Field(default=10.0, gt=0)
    max_rps: float = Field(default=2000.0, gt=0, le=5000)
    growth: float = Field(default=1.5, gt=1, le=10)
    resolution: float = Field(default=0.05, gt=0, le=1)
    max_probes: int = Field(default=12, ge=1, le=100)
    warmup_s: float = Field(default=3.0, ge=0, le=120)
    duration_s: float = Field(default=10.0, gt=0, le=600)
    # None: the scenario's timeout_s.
    timeout_s: float | None = Field(default=None, gt=0, le=300)
    # A probe whose send lag p99 exceeds this measured the generator's machine, not the policy. None: a tenth
    # of the SLO, at least LAG_BEHIND_MS (latencies count from the intended send time, so a lag this small
    # is in them; more, and the machine rather than the policy decides the verdict).
    max_lag_ms: float | None = Field(default=None, gt=0)

    @property
    def lag_limit_ms(self) -> float:
        return self.max_lag_ms if self.max_lag_ms is not None else max(LAG_BEHIND_MS, self.slo_ms / 10)

    @model_validator(mode="after")
    def _bounds(self) -> SearchSettings:
        if self.min_rps >= self.max_rps:
            raise ValueError(f"min_rps ({self.min_rps:g}) must be below max_rps ({self.max_rps:g})")
        if self.start_rps is not None and not self.min_rps <= self.start_rps <= self.max_rps:
            raise ValueError(f"start_rps ({self.start_rps:g}) must be within [{self.min_rps:g}, {self.max_rps:g}]")
        return self


# --------------------------------------------------------------------------------------------- the search


@dataclass
class RateSearch:
    """One policy's search: bracket the capacity between a passing rate (``low``) and a failing one (``high``),
    then bisect. Rates are whole requests per second."""

    start: float
    min_rps: float
    max_rps: float
    growth: float
    resolution: float
    max_probes: int
    low: float | None = None
    high: float | None = None
    high_verdict: str = ""
    probes: int = 0
    lagged: set[float] = field(default_factory=set)

    def next_rate(self) -> float | None:
        """The next rate to probe, or None when the search is over."""
        return None if self.probes >= self.max_probes else self._next()

    def _next(self) -> float | None:
        if self.low is None and self.high is None:
            return float(round(self.start))
        if self.high is None:
            assert self.low is not None
            return None if self.low >= self.max_rps else float(min(self.max_rps, round(self.low * self.growth)))
        if self.low is None:
            return None if self.high <= self.min_rps else float(max(self.min_rps, round(self.high / self.growth)))
        middle = float(round((self.low + self.high) / 2))
        if self.high - self.low <= self.resolution * self.low or not self.low < middle < self.high:
            return None
        return middle

    def record(self, rate: float, verdict: str) -> None:
        """A probe's verdict. A generator that fell behind measured the machine, not the policy, and the
        machine's other load comes and goes: the first time at a rate the probe is repeated (the bounds stay
        as they were, so :meth:`next_rate` gives the same rate); the second time the rate is an upper bound."""
        self.probes += 1
        if verdict == GENERATOR and rate not in self.lagged:
            self.lagged.add(rate)
            return
        if verdict == PASS:
            self.low = rate if self.low is None else max(self.low, rate)
        elif self.high is None or rate <= self.high:
            self.high, self.high_verdict = rate, verdict

    @property
    def capacity_rps(self) -> float:
        return self.low if self.low is not None else 0.0

    @property
    def limited_by(self) -> str:
        """Why the capacity is not higher: the lowest failing probe's verdict (``over_slo``, ``errors``,
        ``generator``), ``max_rps`` (passed at the top of the range), ``min_rps`` (failed at the bottom) or
        ``max_probes`` (stopped before the bracket was narrow enough)."""
        if self._next() is not None:
            return "max_probes"
        if self.high is None:
            return "max_rps"
        if self.low is None:
            return "min_rps"
        return self.high_verdict


def rotated(items: Sequence[Policy], step: int) -> list[Policy]:
    """``items`` starting at position ``step`` (modulo): who goes first changes every round."""
    k = step % len(items) if items else 0
    return [*items[k:], *items[:k]]


# ------------------------------------------------------------------------------------------------ a probe


@dataclass(frozen=True)
class Probe:
    """One short run of one policy at one rate: its verdict and the machine's CPU use while it ran."""

    policy: str
    step: int
    rate_rps: float
    result: Verdict
    # CPU cores while the load ran: the whole machine, the processes at normal priority (this policy's stack
    # and any other), and this policy's stack alone (Tritons, gateway, generator).
    machine_cores: float
    normal_priority_cores: float
    stack_cores: float
    machine_saturated: bool
    drained_s: float

    @property
    def verdict(self) -> str:
        return self.result.verdict

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        return {**data.pop("result"), **data}


def probe_load(load: LoadSpec, rate_rps: float, settings: SearchSettings) -> LoadSpec:
    """The scenario's load at ``rate_rps`` (entries with a rate of their own scaled alike), with the probe's
    warm-up, duration and timeout."""
    scale = rate_rps / load.rate_rps
    data = load.model_dump(mode="json")
    for entry in data["mix"]:
        if entry["rate_rps"] is not None:
            entry["rate_rps"] *= scale
    data.update(rate_rps=rate_rps, warmup_s=settings.warmup_s, duration_s=settings.duration_s)
    if settings.timeout_s is not None:
        data["timeout_s"] = settings.timeout_s
    return LoadSpec.model_validate(data)


@dataclass(frozen=True)
class Verdict:
    """What a probe's records say: the verdict; requests and answers in the measured window (after the
    warm-up); errors there and in the warm-up; latency percentiles (ms) measured; the send lag p99 (ms)."""

    verdict: str
    requests: int
    ok: int
    errors: dict[str, int]
    warmup_errors: dict[str, int]
    p50_ms: float
    p99_ms: float
    max_ms: float
    lag_p99_ms: float


def judge(records: Records, warmup_s: float, slo_ms: float, max_lag_ms: float) -> Verdict:
    """A probe's verdict. Errors count in the measured window, as ``benchmarks.routing``'s do."""
    measured = [i for i, t in enumerate(records.intended) if t >= warmup_s]
    ok = [i for i in measured if records.status[i] in OK_STATUSES]
    latencies = sorted((records.done[i] - records.intended[i]) * 1e3 for i in ok)
    errors = Counter(records.status[i] for i in measured if records.status[i] not in OK_STATUSES)
    warmup_errors = Counter(
        s for s, t in zip(records.status, records.intended, strict=True) if t < warmup_s and s not in OK_STATUSES
    )
    lags = sorted((s - t) * 1e3 for s, t in zip(records.sent, records.intended, strict=True) if not math.isnan(s))
    lag_p99 = percentile(lags, 99)
    p99 = percentile(latencies, 99)
    if lag_p99 > max_lag_ms:
        verdict = GENERATOR
    elif errors:
        verdict = ERRORS
    elif not latencies or not p99 <= slo_ms:
        verdict = OVER_SLO
    else:
        verdict = PASS
    return Verdict(
        verdict=verdict,
        requests=len(measured),
        ok=len(ok),
        errors=dict(sorted(errors.items())),
        warmup_errors=dict(sorted(warmup_errors.items())),
        p50_ms=percentile(latencies, 50),
        p99_ms=p99,
        max_ms=latencies[-1] if latencies else math.nan,
        lag_p99_ms=lag_p99,
    )


def priority_table() -> dict[int, tuple[int, float]]:
    """Every process: pid → (nice, CPU seconds used so far), from ``/proc``."""
    return stat_table(16)


def normal_priority_cpu_s(before: Mapping[int, tuple[int, float]], after: Mapping[int, tuple[int, float]]) -> float:
    """CPU seconds processes at nice <= 0 used between two :func:`priority_table` s (of those alive at the
    second)."""
    return sum(cpu - before.get(pid, (0, 0.0))[1] for pid, (nice, cpu) in after.items() if nice <= 0)


def run_probe(
    bench: RoutingBench, front: Front, policy: Policy, step: int, rate_rps: float, settings: SearchSettings
) -> Probe:
    load = probe_load(bench.scenario.load, rate_rps, settings)
    label = f"{policy.value}-{step:02d}-{rate_rps:g}rps"
    table_before, started = priority_table(), time.monotonic()
    records, _, cores, _ = bench.run_loadgen(
        label, load, front.gateway, front.work_dir, front.supervisor, progress=False
    )
    normal = normal_priority_cpu_s(table_before, priority_table()) / max(1e-9, time.monotonic() - started)
    drained = bench.drain()
    return Probe(
        policy=policy.value,
        step=step,
        rate_rps=rate_rps,
        result=judge(records, load.warmup_s, settings.slo_ms, settings.lag_limit_ms),
        machine_cores=cores.get("machine", math.nan),
        normal_priority_cores=normal,
        stack_cores=sum(v for k, v in cores.items() if k != "machine"),
        machine_saturated=bool(normal >= SATURATED_SHARE * (os.cpu_count() or 1)),
        drained_s=drained,
    )


def _fmt(value: float, digits: int = 1) -> str:
    return "-" if value != value else f"{value:.{digits}f}"  # NaN → "-"


def _bracket(search: RateSearch) -> str:
    low = "-" if search.low is None else f"{search.low:g}"
    high = "-" if search.high is None else f"{search.high:g}"
    return f"[{low}, {high})"


def probe_line(probe: Probe, search: RateSearch) -> str:
    r = probe.result
    errors = sum(r.errors.values())
    warmup = f" (+{sum(r.warmup_errors.values())} in the warm-up)" if r.warmup_errors else ""
    busy = " (saturated)" if probe.machine_saturated else ""
    return (
        f"{probe.policy} {probe.rate_rps:g} req/s: p99 {_fmt(r.p99_ms)} ms, {errors} errors{warmup}, "
        f"lag p99 {_fmt(r.lag_p99_ms)} ms, cores: this stack {_fmt(probe.stack_cores, 2)}, "
        f"nice<=0 {_fmt(probe.normal_priority_cores, 2)}{busy}, all {_fmt(probe.machine_cores, 2)}: "
        f"{_VERDICT_TEXT[probe.verdict]}; capacity in {_bracket(search)}"
    )


# -------------------------------------------------------------------------------------------- the run


def signal_front(front: Front, sig: signal.Signals) -> None:
    """``sig`` to each process group of ``front`` (Envoy, and the picker with any workers)."""
    for child in front.supervisor.children:
        if not child.has_exited():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.process.pid, sig)


@contextlib.contextmanager
def fronts(bench: RoutingBench, policies: Sequence[Policy]) -> Iterator[dict[Policy, Front]]:
    """Every policy's gateway, started once for the whole search and paused (SIGSTOP) but while it serves a
    probe (:func:`serving`): an idle picker still polls Triton and Envoy, and on two cores that CPU would be
    taken from the policy being probed."""
    with contextlib.ExitStack() as stack:
        started = {
            p: stack.enter_context(bench.front(p, p.value, baseline_pool=bench.scenario.baseline_pool))
            for p in policies
        }
        for front in started.values():
            signal_front(front, signal.SIGSTOP)
        try:
            yield started
        finally:
            # A stopped process would not act on the SIGTERM that stops it.
            for front in started.values():
                signal_front(front, signal.SIGCONT)


@contextlib.contextmanager
def serving(front: Front) -> Iterator[Front]:
    """``front`` running, after :data:`benchmarks.routing.SETTLE_S` to catch up with Triton and Envoy
    (polls, health checks); paused again on leaving."""
    signal_front(front, signal.SIGCONT)
    try:
        time.sleep(SETTLE_S)
        yield front
    finally:
        signal_front(front, signal.SIGSTOP)


def search(
    bench: RoutingBench, policies: Sequence[Policy], settings: SearchSettings
) -> tuple[dict[Policy, RateSearch], dict[Policy, list[Probe]]]:
    """Each policy's search and its probes, the policies taking turns at every step."""
    start = settings.start_rps if settings.start_rps is not None else bench.scenario.load.rate_rps
    start = min(settings.max_rps, max(settings.min_rps, start))
    searches = {
        p: RateSearch(
            start, settings.min_rps, settings.max_rps, settings.growth, settings.resolution, settings.max_probes
        )
        for p in policies
    }
    probes: dict[Policy, list[Probe]] = {p: [] for p in policies}
    with fronts(bench, policies) as gateways:
        step = 0
        while True:
            turn = [(p, rate) for p in rotated(policies, step) if (rate := searches[p].next_rate()) is not None]
            if not turn:
                break
            for policy, rate in turn:
                with serving(gateways[policy]) as front:
                    probe = run_probe(bench, front, policy, step, rate, settings)
                searches[policy].record(rate, probe.verdict)
                probes[policy].append(probe)
                bench.say(f"step {step}: {probe_line(probe, searches[policy])}")
            step += 1
    return searches, probes


def policy_report(policy: Policy, result: RateSearch, probes: Sequence[Probe]) -> dict[str, Any]:
    at_capacity = [p for p in probes if p.rate_rps == result.capacity_rps and p.verdict == PASS]
    ceiling = [p for p in probes if p.rate_rps == result.high]
    return {
        "policy": policy.value,
        "capacity_rps": result.capacity_rps,
        "limited_by": result.limited_by,
        "bracket_rps": [result.low, result.high],
        "p99_at_capacity_ms": at_capacity[-1].result.p99_ms if at_capacity else None,
        # The probe that bounds the capacity from above ran on a machine using nearly all its cores.
        "ceiling_machine_saturated": bool(ceiling and ceiling[-1].machine_saturated),
        "probes": [p.to_json() for p in probes],
    }


def comparisons(reports: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    by = {r["policy"]: r["capacity_rps"] for r in reports}
    out: dict[str, float] = {}
    if by.get("picker"):
        for base in ("least_request", "round_robin", "baseline"):
            if by.get(base):
                out[f"picker_capacity_over_{base}"] = by["picker"] / by[base]
    return out


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "?"


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_search(
    scenario: Scenario,
    policies: Sequence[Policy],
    settings: SearchSettings,
    keep_dir: Path | None = None,
    note: str = "",
    command: str = "",
) -> dict[str, Any]:
    """Start the fleet, search every policy's capacity, and return the JSON report."""
    run_dir = keep_dir or Path(tempfile.mkdtemp(prefix="extproc-capacity-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    bench = RoutingBench(scenario, run_dir)
    bench.name = "capacity"
    started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    loadavg_before = _loadavg()
    bench.say(
        f"scenario {scenario.name}: p99 SLO {settings.slo_ms:g} ms, policies {', '.join(p.value for p in policies)}, "
        f"{'compiled' if compiled() else 'pure-Python'} picker, run directory {run_dir}"
    )
    try:
        bench.start_tritons()
        searches, probes = search(bench, policies, settings)
    finally:
        bench.stop()
        if keep_dir is None:
            shutil.rmtree(run_dir, ignore_errors=True)
    reports = [policy_report(p, searches[p], probes[p]) for p in policies]
    return {
        "benchmark": "capacity",
        "scenario": scenario.name,
        "description": scenario.description,
        "source": scenario.source,
        "command": command,
        "revision": revision(),
        "build": "compiled" if compiled() else "pure",
        "started_at": started_at,
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "cpu_model": _cpu_model(),
            "loadavg_before": loadavg_before,
            "loadavg_after": _loadavg(),
        },
        "load_note": note,
        "settings": {**settings.model_dump(mode="json"), "lag_limit_ms": settings.lag_limit_ms},
        "load": scenario.load.model_dump(mode="json"),
        "baseline_pool": scenario.baseline_pool,
        "hosts": fleet_description(bench.fleet),
        "policies": reports,
        "comparisons": comparisons(reports),
    }


_LIMIT_TEXT = {
    OVER_SLO: "p99 over the SLO at {high:g} req/s",
    ERRORS: "errors at {high:g} req/s",
    GENERATOR: "the load generator fell behind at {high:g} req/s (this machine's limit)",
    "max_rps": "passed at --max-rps",
    "min_rps": "failed at --min-rps",
    "max_probes": "--max-probes reached, capacity in [{low:g}, {high:g})",
}


def format_report(report: Mapping[str, Any]) -> str:
    """The capacity table and, below it, the p99 (ms) of every probe, by rate and policy."""
    settings = report["settings"]
    lines = [
        f"scenario {report['scenario']}: capacity at p99 <= {settings['slo_ms']:g} ms with 0 errors "
        f"({settings['duration_s']:g} s probes after {settings['warmup_s']:g} s warm-up, "
        f"{report['build']} build, {report['machine']['cpus']} CPUs)",
        f"{'policy':<14} {'capacity':>10} {'p99 there':>10}  limited by",
    ]
    for r in report["policies"]:
        low, high = (math.nan if b is None else b for b in r["bracket_rps"])
        limit = _LIMIT_TEXT.get(r["limited_by"], r["limited_by"]).format(low=low, high=high)
        if r["ceiling_machine_saturated"] and r["limited_by"] in (OVER_SLO, ERRORS):
            limit += ", on a saturated machine"
        p99 = r["p99_at_capacity_ms"]
        lines.append(
            f"{r['policy']:<14} {r['capacity_rps']:>6g} r/s {_fmt(p99 if p99 is not None else math.nan):>10}  {limit}"
        )
    for key, value in report["comparisons"].items():
        lines.append(f"{key}: {value:.2f}")
    names = [r["policy"] for r in report["policies"]]
    cells: dict[float, dict[str, list[str]]] = {}
    for r in report["policies"]:
        for p in r["probes"]:
            mark = {PASS: "", OVER_SLO: " x", ERRORS: " E", GENERATOR: " lag"}[p["verdict"]]
            cells.setdefault(p["rate_rps"], {}).setdefault(r["policy"], []).append(_fmt(p["p99_ms"]) + mark)
    lines.append("")
    lines.append("p99 (ms) of each probe, in order (x: over the SLO, E: errors, lag: the generator fell behind)")
    lines.append(f"{'req/s':>7} " + " ".join(f"{n:>24}" for n in names))
    for rate in sorted(cells):
        lines.append(f"{rate:>7g} " + " ".join(f"{', '.join(cells[rate].get(n, [])):>24}" for n in names))
    return "\n".join(lines)


def run(
    scenario: str | Path,
    settings: SearchSettings,
    policies: Sequence[str] | None = None,
    output: str | Path | None = None,
    keep_dir: str | Path | None = None,
    note: str = "",
    command: str = "",
) -> int:
    """Search, print the table, write the JSON. 0; 2 for an invalid scenario or option; 1 when the stack could
    not be started."""
    try:
        parsed = load_scenario(find_scenario(scenario))
        chosen = [Policy(p) for p in policies] if policies else list(parsed.policies)
    except ScenarioError as exc:
        print(f"benchmarks.capacity: invalid scenario:\n{exc}", file=sys.stderr)
        return 2
    if parsed.slowdowns:
        print(
            f"benchmarks.capacity: {parsed.source}: key slowdowns: a capacity search does not replay slowdowns",
            file=sys.stderr,
        )
        return 2
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path = Path(output) if output else RESULTS_DIR / f"capacity-{parsed.name}-{stamp}.json"
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        report = run_search(parsed, chosen, settings, Path(keep_dir) if keep_dir else None, note, command)
    except (StartupError, OSError) as exc:
        print(f"benchmarks.capacity: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, _Stop):
        print("benchmarks.capacity: interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    print(format_report(report))
    print(f"results: {json_path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.capacity", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scenario",
        "-s",
        type=Path,
        required=True,
        help=f"scenario file, or the name of one in {shown(SCENARIOS_DIR)}/ (e.g. heterogeneous)",
    )
    parser.add_argument("--slo-ms", type=float, default=DEFAULT_SLO_MS, help="the p99 SLO (default %(default)g ms)")
    parser.add_argument(
        "--policies", nargs="+", choices=[p.value for p in Policy], help="search only these (default: the scenario's)"
    )
    parser.add_argument("--start-rps", type=float, help="the first rate probed (default: the scenario's rate)")
    parser.add_argument("--min-rps", type=float, default=10.0, help="lowest rate probed (default %(default)g)")
    parser.add_argument("--max-rps", type=float, default=2000.0, help="highest rate probed (default %(default)g)")
    parser.add_argument(
        "--growth", type=float, default=1.5, help="factor between bracketing steps (default %(default)g)"
    )
    parser.add_argument(
        "--resolution",
        type=float,
        default=0.05,
        help="stop when the bracket is this narrow, relative (default %(default)g)",
    )
    parser.add_argument("--max-probes", type=int, default=12, help="probes per policy at most (default %(default)d)")
    parser.add_argument("--warmup-s", type=float, default=3.0, help="each probe's warm-up (default %(default)g s)")
    parser.add_argument(
        "--duration-s", type=float, default=10.0, help="each probe's measured run (default %(default)g s)"
    )
    parser.add_argument("--timeout-s", type=float, help="per-request timeout (default: the scenario's)")
    parser.add_argument(
        "--max-lag-ms",
        type=float,
        help=f"a probe whose load generator's send lag p99 is over this is invalid (default: a tenth of the SLO, "
        f"at least {LAG_BEHIND_MS:g} ms)",
    )
    default_output = f"{shown(RESULTS_DIR)}/capacity-NAME-TIME.json"
    parser.add_argument("--output", "-o", type=Path, help=f"JSON results (default {default_output})")
    parser.add_argument("--keep-dir", type=Path, help="keep logs and configs here instead of a deleted temp dir")
    parser.add_argument("--note", default="", help="a note on the machine's other load, kept in the JSON")
    args = parser.parse_args(args_list)
    try:
        settings = SearchSettings(
            slo_ms=args.slo_ms,
            start_rps=args.start_rps,
            min_rps=args.min_rps,
            max_rps=args.max_rps,
            growth=args.growth,
            resolution=args.resolution,
            max_probes=args.max_probes,
            warmup_s=args.warmup_s,
            duration_s=args.duration_s,
            timeout_s=args.timeout_s,
            max_lag_ms=args.max_lag_ms,
        )
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or 'options'}: {e['msg']}" for e in exc.errors())
        print(f"benchmarks.capacity: {problems}", file=sys.stderr)
        return 2
    command = shlex.join(["python", "-m", "benchmarks.capacity", *args_list])
    return run(args.scenario, settings, args.policies, args.output, args.keep_dir, args.note, command)


if __name__ == "__main__":  # pragma: no cover
    quiet_logs()
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
