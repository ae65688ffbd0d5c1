"""What a simulated run reports: latency percentiles, errors, throughput, and the ratios between policies."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from benchmarks.loadgen import percentile
from benchmarks.routing import latency_summary
from benchmarks.sim.engine import OK, STATUS_NAMES, Sim


def summarize(sim: Sim, policy: str, pickers: int, wall_s: float) -> dict[str, Any]:
    """One policy's numbers over the measured window (requests that arrived after the warm-up)."""
    scenario, trace = sim.scenario, sim.trace
    warmup = scenario.load.warmup_s
    measured = [r for r in range(len(trace)) if trace.arrival[r] >= warmup]
    ok = [r for r in measured if sim.status[r] == OK]
    latencies = [(sim.done[r] - trace.arrival[r]) * 1e3 for r in ok]
    errors = Counter(STATUS_NAMES[sim.status[r]] for r in measured if sim.status[r] != OK)
    last_done = max((sim.done[r] for r in ok), default=warmup)
    first = trace.arrival[measured[0]] if measured else warmup
    last = trace.arrival[measured[-1]] if measured else warmup
    offered_span = max(last - first, 1e-9)
    span = max(offered_span, last_done - first)
    group_served: Counter[str] = Counter()
    for r in ok:
        group_served[sim.host_group[sim.host_of[r]]] += 1
    per_entry: dict[str, Any] = {}
    mix = scenario.load.mix
    if len(mix) > 1:
        by_entry: defaultdict[int, list[float]] = defaultdict(list)
        for r, lat in zip(ok, latencies, strict=True):
            by_entry[trace.entry[r]].append(lat)
        for k, e in enumerate(mix):
            lat_k = sorted(by_entry.get(k, []))
            per_entry[e.label] = {
                "ok": len(lat_k),
                "p50_ms": percentile(lat_k, 50),
                "p99_ms": percentile(lat_k, 99),
            }
    return {
        "policy": policy,
        "pickers": pickers,
        "requests": len(measured),
        "ok": len(ok),
        "latency": latency_summary(latencies),
        "errors": dict(sorted(errors.items())),
        "offered_rps": len(measured) / offered_span,
        "achieved_rps": len(ok) / span,
        "retries": sim.retries,
        "group_share": {g: n / len(ok) for g, n in sorted(group_served.items())} if ok else {},
        "per_entry": per_entry,
        "sim": {
            "wall_s": round(wall_s, 3),
            "decisions": sim.decisions,
            "decisions_per_s": round(sim.decisions / wall_s) if wall_s > 0 else None,
        },
    }


def p99(run: Mapping[str, Any]) -> float:
    return float(run["latency"]["p99_ms"])


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 and a == a and b == b else math.nan


def comparisons(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per picker count, each policy's p99 over the baseline's and over the oracle's (the oracle decides
    globally: its one run is the reference for every picker count)."""
    oracle = next((r for r in runs if r["policy"] == "oracle"), None)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for count in sorted({r["pickers"] for r in runs}):
        group = [r for r in runs if r["pickers"] == count]
        base = next((r for r in group if r["policy"] == "expected_completion_baseline"), None)
        cell: dict[str, dict[str, float]] = {}
        for run in group:
            if run["policy"] == "oracle" and count != 1:
                continue
            values: dict[str, float] = {}
            if base is not None:
                values["p99_over_baseline"] = ratio(p99(run), p99(base))
            if oracle is not None:
                values["p99_over_oracle"] = ratio(p99(run), p99(oracle))
            cell[run["policy"]] = values
        out[str(count)] = cell
    pickers = {r["pickers"]: r for r in runs if r["policy"] == "picker"}
    if 1 in pickers and len(pickers) > 1:
        out["picker_p99_over_one_picker"] = {
            str(k): {"ratio": ratio(p99(v), p99(pickers[1]))} for k, v in sorted(pickers.items()) if k != 1
        }
    return out


def _fmt(value: float, digits: int = 1) -> str:
    return "-" if value != value else f"{value:.{digits}f}"


def format_runs(runs: Sequence[Mapping[str, Any]]) -> str:
    header = (
        f"{'policy':<30} {'pickers':>7} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8} {'req/s':>8}"
        f" {'ok':>7} {'errors':>7} {'retries':>7} {'sim s':>6}"
    )
    lines = [header + "   (latency in ms)", "-" * len(header)]
    for run in runs:
        lat = run["latency"]
        lines.append(
            f"{run['policy']:<30} {run['pickers']:>7} {_fmt(lat['p50_ms']):>8} {_fmt(lat['p90_ms']):>8}"
            f" {_fmt(lat['p99_ms']):>8} {_fmt(lat['max_ms']):>8} {_fmt(run['achieved_rps']):>8} {run['ok']:>7}"
            f" {sum(run['errors'].values()):>7} {run['retries']:>7} {run['sim']['wall_s']:>6.1f}"
        )
    for run in runs:
        if run["errors"]:
            detail = ", ".join(f"{k}: {v}" for k, v in run["errors"].items())
            lines.append(f"  {run['policy']} x{run['pickers']} errors: {detail}")
    return "\n".join(lines)


# Column order and short names of the family table.
_SHORT = {
    "round_robin": "rr",
    "least_request": "lr",
    "expected_completion_baseline": "base",
    "picker": "picker",
    "oracle": "oracle",
}


def format_family(reports: Sequence[Mapping[str, Any]]) -> str:
    """One row per scenario: each policy's p99 with one picker, picker/baseline, picker/oracle, and the
    p99 of the most pickers the scenario ran over that of one."""
    policies = list(_SHORT)
    header = (
        f"{'scenario':<26} {'hosts':>5} {'load':>5} "
        + " ".join(f"{_SHORT[p] + ' p99':>11}" for p in policies)
        + f" {'pick/base':>9} {'pick/orcl':>9} {'pickN/1':>8} {'errors (pol:n)':<20}"
    )
    lines = [header + "   (p99 in ms, one picker)", "-" * len(header)]
    for rep in reports:
        runs = [r for r in rep["runs"] if r["pickers"] == 1]
        by = {r["policy"]: r for r in runs}
        cells = [f"{_fmt(p99(by[p])) if p in by else '-':>11}" for p in policies]
        pick = by.get("picker")
        base = by.get("expected_completion_baseline")
        orcl = by.get("oracle")
        vs_base = ratio(p99(pick), p99(base)) if pick and base else math.nan
        vs_orcl = ratio(p99(pick), p99(orcl)) if pick and orcl else math.nan
        many = [r for r in rep["runs"] if r["policy"] == "picker" and r["pickers"] > 1]
        scale = f"x{many[-1]['pickers']} {ratio(p99(many[-1]), p99(pick)):.2f}" if many and pick else "-"
        errs = " ".join(f"{_SHORT[r['policy']]}:{sum(r['errors'].values())}" for r in runs if sum(r["errors"].values()))
        load = rep["trace"]["load_fraction"]
        lines.append(
            f"{rep['scenario']['name']:<26} {rep['trace']['hosts']:>5} {_fmt(load * 100, 0) + '%':>5} "
            + " ".join(cells)
            + f" {_fmt(vs_base, 2):>9} {_fmt(vs_orcl, 2):>9} {scale:>8} {errs:<20}"
        )
    return "\n".join(lines)
