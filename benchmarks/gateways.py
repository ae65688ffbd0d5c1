"""``python -m benchmarks.gateways``: one routing scenario through several gateways at once, their pickers
sharing their loads or not.

Real processes, as ``benchmarks.routing`` runs them (the scenario's Triton hosts started once), the picker
policy only, in three variants, alternately for ``--rounds`` rounds:

- ``one``: one gateway (Envoy and its picker) takes the scenario's whole load;
- ``alone``: ``--gateways N`` gateways each take 1/N of it (its own Poisson stream), their pickers replicas
  of one another (``picker.replicas``: the first publishes the hosts' telemetry, the others follow it), each
  scaling its own Envoy's counts and picks by its share of each host's traffic;
- ``sharing``: the same, with ``picker.replicas.share_load``: each tells the others its picks and counts.

It reports, per variant and round, the latency percentiles of every gateway's requests together (from
their intended send times, after the warm-up), the errors, and where the requests went.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import json
import os
import shlex
import shutil
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from benchmarks import RESULTS_DIR, quiet_logs, revision, shown
from benchmarks.loadgen import OK_STATUSES, LoadSpec, Records
from benchmarks.ports import free_ports
from benchmarks.routing import (
    FleetBench,
    Front,
    Policy,
    Scenario,
    ScenarioError,
    find_scenario,
    json_safe,
    latency_summary,
    load_scenario,
)
from extproc.build import compiled, stale_compiled_modules
from extproc.runtime.stack import StartupError

VARIANTS: Final = ("one", "alone", "sharing")
_TOKEN: Final = "a-secret-the-benchmark-replicas-share"


def split_load(load: LoadSpec, gateways: int, index: int) -> LoadSpec:
    """Gateway ``index``'s part of ``load``: 1/``gateways`` of every rate, its own seed."""
    mix = tuple(m if m.rate_rps is None else m.model_copy(update={"rate_rps": m.rate_rps / gateways}) for m in load.mix)
    return load.model_copy(update={"rate_rps": load.rate_rps / gateways, "seed": load.seed + index, "mix": mix})


def replica_fleets(
    fleet: Mapping[str, Any], gateways: int, share_load: bool, token_file: Path, publish_port: int
) -> list[dict[str, Any]]:
    """The fleet file of each of ``gateways`` picker replicas: the first publishes, the others follow it."""
    out = []
    for i in range(gateways):
        data = copy.deepcopy(dict(fleet))
        side = {"publish": f"127.0.0.1:{publish_port}"} if i == 0 else {"follow": f"127.0.0.1:{publish_port}"}
        data.setdefault("picker", {})["replicas"] = {**side, "token_file": str(token_file), "share_load": share_load}
        out.append(data)
    return out


def merged(records: Sequence[Records], warmup_s: float) -> tuple[list[float], Counter[str], Counter[str]]:
    """Every gateway's measured requests together: latencies in ms (from the intended send time) of those
    answered OK, the other outcomes counted, and the hosts that served."""
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    hosts: Counter[str] = Counter()
    for rec in records:
        for i, intended in enumerate(rec.intended):
            if intended < warmup_s:
                continue
            if rec.status[i] in OK_STATUSES:
                latencies.append((rec.done[i] - intended) * 1e3)
                hosts[rec.host[i]] += 1
            else:
                errors[rec.status[i] or "unsent"] += 1
    return latencies, errors, hosts


class GatewaysBench(FleetBench):
    def __init__(self, scenario: Scenario, run_dir: Path, gateways: int) -> None:
        super().__init__(scenario.fleet, scenario.source, run_dir, scenario.drain_timeout_s, name="gateways")
        self.scenario = scenario
        self.gateways = gateways
        self.token_file = run_dir / "replicas.token"
        self.token_file.write_text(_TOKEN + "\n", encoding="utf-8")
        self.token_file.chmod(0o600)

    def run_variant(self, variant: str, round_: int) -> dict[str, Any]:
        n = 1 if variant == "one" else self.gateways
        if n == 1:
            fleets = [dict(self.fleet_data)]
        else:
            (port,) = free_ports(1)
            fleets = replica_fleets(self.fleet_data, n, variant == "sharing", self.token_file, port)
        load = self.scenario.load
        self.say(f"round {round_}, {variant}: {n} gateway(s), {load.rate_rps:g} req/s in all")
        with contextlib.ExitStack() as stack:
            fronts: list[Front] = [
                stack.enter_context(self.front(Policy.PICKER, f"{variant}-{round_}-{i}", data))
                for i, data in enumerate(fleets)
            ]
            results: list[Records | BaseException] = [StartupError("no result")] * n

            def drive(i: int) -> None:
                # The generator of each gateway in its own thread; what it raises is raised below.
                try:
                    front, part = fronts[i], split_load(load, n, i)
                    label = f"{variant}-{round_}-{i}"
                    records = self.run_loadgen(label, part, front.gateway, front.work_dir, front.supervisor, i == 0)
                    results[i] = records[0]
                except BaseException as exc:
                    results[i] = exc

            threads = [threading.Thread(target=drive, args=(i,)) for i in range(n)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            self.drain()
            exited = [f"{c.name} exited (code {c.process.returncode})" for f in fronts for c in f.supervisor.exited()]
        records: list[Records] = []
        for result in results:
            if isinstance(result, BaseException):
                raise result
            records.append(result)
        latencies, errors, served = merged(records, load.warmup_s)
        hosts: Counter[str] = Counter()
        for endpoint, count in served.items():  # a host's REST and gRPC endpoints together
            hosts[self.endpoint_names.get(endpoint, endpoint)] += count
        summary = latency_summary(latencies)
        self.say(f"round {round_}, {variant}: p99 {summary['p99_ms']:.1f} ms, {sum(errors.values())} errors")
        return {
            "variant": variant,
            "round": round_,
            "gateways": n,
            "latency": summary,
            "ok": len(latencies),
            "errors": dict(errors),
            "hosts": dict(hosts),
            "notes": exited,
        }


def format_runs(runs: Sequence[Mapping[str, Any]]) -> str:
    lines = [f"{'round':>5} {'variant':<8} {'gateways':>8} {'p50':>8} {'p90':>8} {'p99':>8} {'ok':>7} {'errors':>6}"]
    for r in runs:
        lat = r["latency"]
        lines.append(
            f"{r['round']:>5} {r['variant']:<8} {r['gateways']:>8} {lat['p50_ms']:>8.1f} {lat['p90_ms']:>8.1f} "
            f"{lat['p99_ms']:>8.1f} {r['ok']:>7} {sum(r['errors'].values()):>6}"
        )
    return "\n".join(lines)


def run(
    scenario_path: Path,
    gateways: int,
    rounds: int,
    variants: Sequence[str],
    output: Path | None,
    fleet: Sequence[str],
    command: str,
) -> int:
    """Run the variants for ``rounds`` rounds, print the table and write the JSON (recording ``command``).
    Returns 0, 2 for an invalid scenario, 1 when the stack could not be started."""
    try:
        scenario = load_scenario(find_scenario(scenario_path), fleet)
    except (ScenarioError, ValueError) as exc:
        print(f"benchmarks.gateways: {exc}", file=sys.stderr)
        return 2
    # The build the pickers start with, as they start.
    build = {"compiled": compiled(), "stale_compiled_modules": stale_compiled_modules(), "revision": revision()}
    run_dir = Path(tempfile.mkdtemp(prefix="extproc-gateways-"))
    bench = GatewaysBench(scenario, run_dir, gateways)
    started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    runs: list[dict[str, Any]] = []
    try:
        bench.start_tritons()
        for round_ in range(1, rounds + 1):
            for variant in variants:
                runs.append(bench.run_variant(variant, round_))
    except StartupError as exc:
        print(f"benchmarks.gateways: {exc}", file=sys.stderr)
        return 1
    finally:
        bench.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
    out = output or RESULTS_DIR / f"gateways-{scenario.name}-{gateways}.json"
    report = {
        "command": command,
        "scenario": scenario.name,
        "started_at": started_at,
        **build,
        "machine": {"cpus": os.cpu_count(), "loadavg": os.getloadavg()},
        "gateways": gateways,
        "load": scenario.load.model_dump(mode="json"),
        "runs": runs,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(json_safe(report), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    print(format_runs(runs))
    print(f"results: {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gateways", description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", "-s", type=Path, required=True, help="a routing scenario file or name")
    parser.add_argument("--gateways", type=int, default=2, help="gateways in the alone and sharing variants")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of every variant, alternately")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="run only these")
    parser.add_argument(
        "--fleet", action="append", default=[], metavar="KEY=VALUE", help="set a fleet-file key (dotted); repeatable"
    )
    default_output = f"{shown(RESULTS_DIR)}/gateways-NAME-N.json"
    parser.add_argument("--output", "-o", type=Path, help=f"JSON results (default {default_output})")
    args = parser.parse_args(argv)
    if not 2 <= args.gateways <= 8 or args.rounds < 1:
        parser.error("--gateways is 2 to 8 and --rounds at least 1")
    command = "python -m benchmarks.gateways " + shlex.join(sys.argv[1:] if argv is None else argv)
    return run(args.scenario, args.gateways, args.rounds, args.variants, args.output, args.fleet, command)


if __name__ == "__main__":  # pragma: no cover
    quiet_logs()
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())


__all__ = ["VARIANTS", "GatewaysBench", "main", "merged", "replica_fleets", "split_load"]
