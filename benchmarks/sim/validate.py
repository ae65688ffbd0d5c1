"""``python -m benchmarks.sim.validate RESULTS.json ...``: the simulator against real runs.

For each results file of ``benchmarks.routing`` (a real fleet, real Envoy and processors), it simulates the
same scenario (``real_NAME`` in ``benchmarks/scenarios/sim/``, which reads the real scenario's hosts, load and
slowdowns) with the same policies, and prints each policy's p99 in both and their ratio; a ratio outside
``1 +/- --tolerance`` (0.25) is marked. It writes the table as JSON (``--output``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import RESULTS_DIR
from benchmarks.sim.cli import run_scenario
from benchmarks.sim.scenario import find_sim_scenario, load_sim_scenario

# The real benchmark's policy names, in the simulator's terms.
_POLICIES = {
    "round_robin": "round_robin",
    "least_request": "least_request",
    "baseline": "expected_completion_baseline",
    "picker": "picker",
}


def compare(real: dict[str, Any], tolerance: float) -> list[dict[str, Any]]:
    """One row per policy of the real run ``real`` (a ``benchmarks.routing`` results document)."""
    scenario = load_sim_scenario(find_sim_scenario(f"real_{real['scenario']}"))
    by_policy = {p["policy"]: p for p in real["policies"] if p["policy"] in _POLICIES}
    simulated = run_scenario(scenario, [_POLICIES[p] for p in by_policy], [1], progress=False)
    sim_p99 = {r["policy"]: float(r["latency"]["p99_ms"]) for r in simulated["runs"]}
    rows = []
    for name, run in by_policy.items():
        real_p99 = float(run["latency"]["p99_ms"])
        sim = sim_p99[_POLICIES[name]]
        ratio = sim / real_p99 if real_p99 > 0 else math.nan
        rows.append(
            {
                "scenario": real["scenario"],
                "policy": name,
                "real_p99_ms": real_p99,
                "sim_p99_ms": sim,
                "sim_over_real": ratio,
                "within": abs(ratio - 1.0) <= tolerance,
            }
        )
    return rows


def format_rows(rows: Sequence[dict[str, Any]], tolerance: float) -> str:
    lines = [f"{'scenario':<20} {'policy':<14} {'real p99':>9} {'sim p99':>9} {'sim/real':>9}"]
    for r in rows:
        mark = "" if r["within"] else f"  outside +/-{tolerance:.0%}"
        lines.append(
            f"{r['scenario']:<20} {r['policy']:<14} {r['real_p99_ms']:>9.1f} {r['sim_p99_ms']:>9.1f}"
            f" {r['sim_over_real']:>9.2f}{mark}"
        )
    within = sum(r["within"] for r in rows)
    lines.append(f"{within} of {len(rows)} within +/-{tolerance:.0%}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sim.validate", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="benchmarks.routing results files (JSON)")
    parser.add_argument("--tolerance", type=float, default=0.25, help="largest |sim/real - 1| that passes")
    parser.add_argument("--output", "-o", type=Path, default=RESULTS_DIR / "sim-validation.json")
    args = parser.parse_args(argv)
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    rows: list[dict[str, Any]] = []
    for path in args.results:
        print(f"[sim validate] {path}", file=sys.stderr, flush=True)
        rows += compare(json.loads(path.read_text(encoding="utf-8")), args.tolerance)
    print(format_rows(rows, args.tolerance))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "command": "python -m benchmarks.sim.validate " + shlex.join(raw_argv),
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "tolerance": args.tolerance,
        "real_results": [str(p) for p in args.results],
        "rows": rows,
    }
    args.output.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    print(f"results: {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
