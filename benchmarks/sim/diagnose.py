"""``python -m benchmarks.sim.diagnose``: what the picker believed at its decisions, against the simulated fleet.

Runs the picker policy with one gateway (or ``--pickers N``, each with its own) over a scenario's trace
(the same run as ``benchmarks.sim``'s ``picker xN``: observing reads, never writes) and reports, for the
first picker's decisions, per host group and model:

- where the requests and their rows went (shares of the model's requests and rows, rows per request);
- the in-flight estimate each decision read (:meth:`~extproc.datapath.datastore.HostState.in_flight`)
  against Envoy's count at that moment, every gateway's, which it estimates (mean, bias, mean absolute
  error), and the excess work of the picker's own picks
  (:meth:`~extproc.datapath.datastore.HostState.drained`);
- the work the expected-completion scorer sees (in-flight plus excess, in requests of the model's mean
  size) against the rows the host really held (queued and executing) over the model's mean rows;
- the fitted batch cost per row against the simulated one (``fixed_ms`` and ``per_row_ms`` times the host's
  factor; the execution jitter's mean adds to the fixed part);
- the rows per execution that Triton's counters give the fit (``nv_inference_count /
  nv_inference_exec_count``) against the request-weighted mean that its summed batch time follows (each
  request adds its whole batch's time): where the two differ, the fit is biased.

Decisions before the warm-up are not sampled; on large fleets every k-th decision is (see ``--samples``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from benchmarks import shown
from benchmarks.sim.engine import Batcher, Sim
from benchmarks.sim.policies import Picker
from benchmarks.sim.scenario import (
    SIM_SCENARIOS_DIR,
    SimScenario,
    SimScenarioError,
    find_sim_scenario,
    load_sim_scenario,
    with_fleet_settings,
)
from benchmarks.sim.trace import Trace, build_trace

# About how many (decision, host) samples a run takes by default.
_SAMPLES: Final = 200_000


@dataclass(slots=True)
class GroupModel:
    """Sums over one host group's hosts for one model (see the module docstring for what each is)."""

    hosts: int = 0
    requests: int = 0
    rows: int = 0
    samples: int = 0
    estimate: float = 0.0
    envoy: float = 0.0
    abs_error: float = 0.0
    excess: float = 0.0
    true_work: float = 0.0
    fits: int = 0
    fixed_ms: float = 0.0
    per_row_ms: float = 0.0
    true_fixed_ms: float = 0.0
    true_per_row_ms: float = 0.0
    batches: int = 0
    batch_requests: int = 0
    batch_rows: int = 0
    weighted_rows: int = 0  # sum over executions of requests x rows


class DiagnosedSim(Sim):
    """The picker's run, sampling what the picker believed and what the fleet held at its decisions."""

    def __init__(self, scenario: SimScenario, trace: Trace, samples: int = _SAMPLES, pickers: int = 1) -> None:
        # The seed label of benchmarks.sim's picker xN run, so that this is that run.
        super().__init__(scenario, trace, Picker, n_gateways=pickers, seed_label=f"picker/{pickers}")
        self.stats: dict[tuple[str, str], GroupModel] = {}
        for i, host in enumerate(self.hosts):
            for m in host.batchers:
                self._stats(i, m).hosts += 1
        # Only the first picker's decisions are read: a 1/pickers share of them.
        self.sample_every = max(1, len(trace) * len(self.hosts) // max(1, samples * pickers))
        self.warmup_s = scenario.load.warmup_s

    def _stats(self, host: int, model: int) -> GroupModel:
        key = (self.host_group[host], self.model_names[model])
        stats = self.stats.get(key)
        if stats is None:
            stats = self.stats[key] = GroupModel()
        return stats

    def _arrive(self, r: int, now: float) -> None:
        if now >= self.warmup_s and r % self.sample_every == 0 and self.gw_of[r] == 0:
            self._observe(r, now)
        super()._arrive(r, now)

    def _observe(self, r: int, now: float) -> None:
        policy = self.policy
        assert isinstance(policy, Picker)
        view = policy.views[0]
        m = self.model[r]
        name = self.model_names[m]
        timing = self.scenario.models[name]
        mean_rows = self.scenario.mean_rows(name)
        gateways = self.gateways
        for i in self.serving[m]:
            state = view.states[i]
            host = self.hosts[i]
            b = host.batchers[m]
            stats = self._stats(i, m)
            estimate = state.in_flight(now)
            stats.samples += 1
            stats.estimate += estimate
            # The estimate stands for every gateway's requests (each picker scales its own by its share).
            counted = sum(g.inflight[i] for g in gateways)
            stats.envoy += counted
            stats.abs_error += abs(estimate - counted)
            count, work = state.drained(now)
            stats.excess += work - count
            stats.true_work += _rows_held(self, b) / mean_rows
            times = state.load.models.get(name)
            if times is not None and times.cost is not None:
                factor = host.factor if timing.scaled else 1.0
                stats.fits += 1
                stats.fixed_ms += times.cost.fixed_ms
                stats.per_row_ms += times.cost.item_ms
                stats.true_fixed_ms += timing.fixed_ms * factor + timing.jitter_ms
                stats.true_per_row_ms += timing.per_row_ms * factor

    def _done(self, b: Batcher, info: tuple[int, float, float, list[int], int], now: float) -> None:
        epoch, _, _, batch, rows = info
        if epoch == b.host.epoch:
            stats = self._stats(b.host.index, b.model)
            stats.batches += 1
            stats.batch_requests += len(batch)
            stats.batch_rows += rows
            stats.weighted_rows += len(batch) * rows
        super()._done(b, info, now)

    def report(self) -> list[dict[str, Any]]:
        """One row per (host group, model), after :meth:`run`."""
        trace = self.trace
        for r in range(len(trace)):
            if trace.arrival[r] >= self.warmup_s and self.host_of[r] >= 0:
                stats = self._stats(self.host_of[r], self.model[r])
                stats.requests += 1
                stats.rows += self.rows[r]
        totals: dict[str, tuple[int, int]] = {}
        for (_, model), s in self.stats.items():
            requests, rows = totals.get(model, (0, 0))
            totals[model] = (requests + s.requests, rows + s.rows)
        out = []
        for (group, model), s in sorted(self.stats.items()):
            requests, rows = totals[model]
            n, fits = s.samples or 1, s.fits or 1
            out.append(
                {
                    "group": group,
                    "model": model,
                    "hosts": s.hosts,
                    "request_share": s.requests / requests if requests else 0.0,
                    "row_share": s.rows / rows if rows else 0.0,
                    "rows_per_request": s.rows / s.requests if s.requests else None,
                    "in_flight_estimate": s.estimate / n,
                    "in_flight_envoy": s.envoy / n,
                    "in_flight_bias": (s.estimate - s.envoy) / n,
                    "in_flight_mae": s.abs_error / n,
                    "excess": s.excess / n,
                    "work_estimate": (s.estimate + s.excess) / n,
                    "work_true": s.true_work / n,
                    "fit_fixed_ms": s.fixed_ms / fits if s.fits else None,
                    "true_fixed_ms": s.true_fixed_ms / fits if s.fits else None,
                    "fit_per_row_ms": s.per_row_ms / fits if s.fits else None,
                    "true_per_row_ms": s.true_per_row_ms / fits if s.fits else None,
                    "rows_per_batch": s.batch_rows / s.batches if s.batches else None,
                    "request_weighted_rows_per_batch": s.weighted_rows / s.batch_requests if s.batches else None,
                }
            )
        return out


def _rows_held(sim: Sim, b: Batcher) -> int:
    """The rows queued in and executing on a batcher now."""
    rows = sim.rows
    return b.queued_rows + sum(rows[q] for _, batch in b.running for q in batch)


def diagnose(
    scenario: SimScenario, samples: int = _SAMPLES, pickers: int = 1
) -> tuple[DiagnosedSim, list[dict[str, Any]]]:
    sim = DiagnosedSim(scenario, build_trace(scenario), samples, pickers)
    sim.run()
    return sim, sim.report()


def _cell(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_report(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| group | model | hosts | requests | rows | rows/req | in flight: est / Envoy (MAE) | excess |"
        " work: est / true | fit fixed ms: fit / true | per row ms: fit / true | rows per batch: counted /"
        " request-weighted |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['group']} | {r['model']} | {r['hosts']} | {r['request_share']:.1%} | {r['row_share']:.1%}"
            f" | {_cell(r['rows_per_request'])}"
            f" | {r['in_flight_estimate']:.2f} / {r['in_flight_envoy']:.2f} ({r['in_flight_mae']:.2f})"
            f" | {r['excess']:.2f} | {r['work_estimate']:.2f} / {r['work_true']:.2f}"
            f" | {_cell(r['fit_fixed_ms'])} / {_cell(r['true_fixed_ms'])}"
            f" | {_cell(r['fit_per_row_ms'])} / {_cell(r['true_per_row_ms'])}"
            f" | {_cell(r['rows_per_batch'])} / {_cell(r['request_weighted_rows_per_batch'])} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sim.diagnose", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scenario", "-s", required=True, help=f"scenario file, or a name in {shown(SIM_SCENARIOS_DIR)}/"
    )
    parser.add_argument("--seed", type=int, help="replace the scenario's seed")
    parser.add_argument("--samples", type=int, default=_SAMPLES, help="about how many (decision, host) samples")
    parser.add_argument(
        "--pickers", type=int, default=1, help="independent pickers (gateways); the first one's decisions are read"
    )
    parser.add_argument(
        "--fleet",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a fleet-file key (dotted, e.g. picker.workers=2), as benchmarks.sim's --fleet",
    )
    parser.add_argument("--output", "-o", type=Path, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    try:
        scenario = with_fleet_settings(load_sim_scenario(find_sim_scenario(args.scenario)), args.fleet)
    except SimScenarioError as exc:
        print(f"benchmarks.sim.diagnose: {exc}", file=sys.stderr)
        return 2
    if args.seed is not None:
        scenario = scenario.model_copy(update={"seed": args.seed})
    if args.pickers < 1:
        print("benchmarks.sim.diagnose: --pickers must be at least 1", file=sys.stderr)
        return 2
    _, rows = diagnose(scenario, args.samples, args.pickers)
    who = "the picker with one gateway" if args.pickers == 1 else f"the first of {args.pickers} pickers"
    print(f"scenario {scenario.name} (seed {scenario.seed}), {who}:")
    print(format_report(rows))
    if args.output is not None:
        from benchmarks.routing import json_safe

        data = {"scenario": scenario.name, "seed": scenario.seed, "pickers": args.pickers, "groups": rows}
        args.output.write_text(json.dumps(json_safe(data), indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
