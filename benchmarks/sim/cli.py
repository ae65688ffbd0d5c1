"""``python -m benchmarks.sim``: run one scenario (or the whole family) through the fleet simulator."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import RESULTS_DIR, revision, shown
from benchmarks.sim.engine import Sim
from benchmarks.sim.policies import FACTORIES
from benchmarks.sim.report import comparisons, format_family, format_runs, summarize
from benchmarks.sim.scenario import (
    POLICIES,
    POLICY_ALIASES,
    SIM_SCENARIOS_DIR,
    SimScenario,
    SimScenarioError,
    family,
    find_sim_scenario,
    load_sim_scenario,
    with_fleet_settings,
)
from benchmarks.sim.trace import Trace, build_trace


def _progress(message: str) -> None:
    print(f"[sim] {message}", file=sys.stderr, flush=True)


def simulate(scenario: SimScenario, trace: Trace, policy: str, pickers: int = 1) -> tuple[Sim, dict[str, Any]]:
    """One policy with ``pickers`` gateways over the trace: the finished simulation and its summary."""
    started = time.perf_counter()
    sim = Sim(scenario, trace, FACTORIES[policy], n_gateways=pickers, seed_label=f"{policy}/{pickers}")
    sim.run()
    return sim, summarize(sim, policy, pickers, time.perf_counter() - started)


def run_scenario(
    scenario: SimScenario,
    policies: Sequence[str] | None = None,
    pickers: Sequence[int] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Every policy (each picker count; the oracle once, it decides globally) over one trace."""
    chosen = list(policies or scenario.policies)
    counts = list(pickers or scenario.pickers)
    trace = build_trace(scenario)
    runs = []
    for count in counts:
        for policy in chosen:
            if policy == "oracle" and count != counts[0]:
                continue
            _, summary = simulate(scenario, trace, policy, 1 if policy == "oracle" else count)
            runs.append(summary)
            if progress:
                _progress(
                    f"{scenario.name}: {policy} x{summary['pickers']}: p99 {summary['latency']['p99_ms']:.1f} ms,"
                    f" {sum(summary['errors'].values())} errors ({summary['sim']['wall_s']:.1f} s)"
                )
    capacity = scenario.capacity_rps()
    rate = scenario.rate_rps()
    return {
        "scenario": {
            "name": scenario.name,
            "description": scenario.description,
            "source": scenario.source,
            "seed": scenario.seed,
            "resolved": scenario.model_dump(mode="json"),
        },
        "trace": {
            "requests": len(trace),
            "hosts": sum(g.count for g in scenario.hosts),
            "rate_rps": rate,
            "capacity_rps": capacity,
            "load_fraction": rate / capacity,
            "total_s": scenario.total_s(),
        },
        "runs": runs,
        "comparisons": comparisons(runs),
    }


def _policies(values: Sequence[str] | None) -> list[str] | None:
    if not values:
        return None
    out = []
    for v in values:
        name = POLICY_ALIASES.get(v, v)
        if name not in POLICIES:
            raise ValueError(f"unknown policy {v!r}")
        out.append(name)
    return out


def _write(path: Path, data: Any) -> None:
    from benchmarks.routing import json_safe

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(data), indent=1, allow_nan=False) + "\n", encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sim", description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--scenario", "-s", help=f"scenario file, or the name of one in {shown(SIM_SCENARIOS_DIR)}/")
    which.add_argument("--all", action="store_true", help=f"every scenario in {shown(SIM_SCENARIOS_DIR)}/")
    parser.add_argument("--seed", type=int, help="replace the scenario's seed")
    parser.add_argument(
        "--policies", nargs="+", help=f"run only these (default: the scenario's; {', '.join(POLICIES)})"
    )
    parser.add_argument("--pickers", type=int, nargs="+", help="numbers of independent pickers/gateways (e.g. 1 2 4 8)")
    parser.add_argument(
        "--fleet",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a fleet-file key for every scenario run (dotted, e.g. picker.poll.triton_metrics_ms=50)",
    )
    parser.add_argument(
        "--replica-lag-ms",
        type=float,
        help="replace the scenarios' telemetry.replica_lag_ms: how late replicas that share their loads hear "
        "each other (picker.replicas.share_load)",
    )
    parser.add_argument("--output", "-o", type=Path, help="JSON results (default results/sim-NAME.json)")
    args = parser.parse_args(argv)
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    command = "python -m benchmarks.sim " + shlex.join(raw_argv)
    try:
        policies = _policies(args.policies)
        paths = family() if args.all else [find_sim_scenario(args.scenario)]
        scenarios = [with_fleet_settings(load_sim_scenario(p), args.fleet) for p in paths]
    except (SimScenarioError, ValueError) as exc:
        print(f"benchmarks.sim: {exc}", file=sys.stderr)
        return 2
    if args.seed is not None:
        scenarios = [s.model_copy(update={"seed": args.seed}) for s in scenarios]
    if args.replica_lag_ms is not None:
        if args.replica_lag_ms < 0:
            print("benchmarks.sim: --replica-lag-ms below 0", file=sys.stderr)
            return 2
        lag = {"replica_lag_ms": args.replica_lag_ms}
        scenarios = [s.model_copy(update={"telemetry": s.telemetry.model_copy(update=lag)}) for s in scenarios]
    started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    reports = []
    for scenario in scenarios:
        report = run_scenario(scenario, policies, args.pickers)
        report["command"] = command
        reports.append(report)
        if not args.all:
            t = report["trace"]
            print(
                f"scenario {scenario.name} (seed {scenario.seed}): {t['hosts']} hosts, {t['requests']} requests,"
                f" {t['rate_rps']:.0f} req/s = {t['load_fraction'] * 100:.0f}% of capacity"
            )
            print(format_runs(report["runs"]))
            for count, cell in report["comparisons"].items():
                for policy, values in cell.items():
                    shown_values = ", ".join(f"{k} {v:.3f}" for k, v in values.items())
                    print(f"  x{count} {policy}: {shown_values}")
    machine = {"cpus": os.cpu_count(), "pure_python": os.environ.get("EXTPROC_PURE_PYTHON") == "1"}
    measured = revision()
    if args.all:
        print(format_family(reports))
        out = args.output or RESULTS_DIR / "sim-family.json"
        _write(
            out,
            {
                "command": command,
                "revision": measured,
                "seed": args.seed,
                "started_at": started_at,
                "machine": machine,
                "table": format_family(reports).splitlines(),
                "scenarios": reports,
            },
        )
    else:
        report = reports[0]
        out = args.output or RESULTS_DIR / f"sim-{scenarios[0].name}.json"
        _write(
            out,
            {
                "command": command,
                "revision": measured,
                "seed": scenarios[0].seed,
                "started_at": started_at,
                "machine": machine,
                **report,
            },
        )
    print(f"results: {out}")
    return 0
