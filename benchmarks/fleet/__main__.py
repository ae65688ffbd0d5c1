"""``python -m benchmarks.fleet``: the picker's telemetry cost at fleet size (see benchmarks/fleet/__init__.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from benchmarks import RESULTS_DIR, shown
from benchmarks.fleet.bench import FleetBenchError, Settings, progress, run
from extproc.build import PACKAGE, stale_compiled_modules

DEFAULT_OUTPUT = RESULTS_DIR / "fleet.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.fleet",
        description="The picker's telemetry cost with N emulated Triton hosts (and K real ones).",
    )
    parser.add_argument("--hosts", type=int, default=50, help="emulated Triton hosts (default 50)")
    parser.add_argument("--real", type=int, default=0, help="real Triton hosts beside them (default 0)")
    parser.add_argument(
        "--rate",
        type=float,
        default=20.0,
        help="requests/s each emulated host serves in the load phase (default 20; 0: idle only)",
    )
    parser.add_argument(
        "--request-rate",
        type=float,
        default=100.0,
        help="inference requests/s sent through Envoy in the requests phase (default 100; 0: no such phase)",
    )
    parser.add_argument(
        "--poll",
        action="append",
        default=[],
        metavar="KEY=MS",
        help="a picker.poll setting of the fleet file, e.g. repository_ms=5000 (repeatable; default: the picker's)",
    )
    parser.add_argument(
        "--fresh-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for every host fresh before measuring anyway (default 60)",
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per phase (default 10)")
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="> 1: the picker publishes its telemetry; after the idle phase, replicas - 1 followers join and "
        "an idle phase measures the scrapes each host sees with them (default 1)",
    )
    parser.add_argument(
        "--decision-samples",
        action="store_true",
        help="the picker logs at debug level, and the requests phase reports every decision's time from its "
        "log (decision_us: p50/p99/max), besides the histogram's bucket bounds",
    )
    parser.add_argument(
        "--picker",
        default=None,
        help="the default scheduling profile's picker (picker.profile.picker, e.g. power_of_two; default: the "
        "picker's)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="picker.workers (default 1): > 1, a leader process collects the telemetry and that many worker "
        "processes decide on its snapshots",
    )
    parser.add_argument(
        "--compiled",
        action="store_true",
        help="the picker runs the compiled per-request modules, as `make install` builds them (default: plain "
        "Python, as EXTPROC_PURE_PYTHON=1)",
    )
    parser.add_argument("--gpu-share", type=float, default=0.5, help="share of hosts serving the GPU-shaped page")
    parser.add_argument(
        "--output", type=Path, default=DEFAULT_OUTPUT, help=f"JSON results (default {shown(DEFAULT_OUTPUT)})"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="FILE",
        help="run the picker under cProfile and write its stats (pstats) here when it exits",
    )
    parser.add_argument("--keep-dir", type=Path, default=None, help="keep the run directory (logs, fleet file) here")
    args = parser.parse_args(argv)
    try:
        args.poll = {key: int(ms) for key, _, ms in (item.partition("=") for item in args.poll)}
    except ValueError:
        parser.error("--poll takes KEY=MS, e.g. repository_ms=5000")
    if args.hosts < 0 or args.real < 0 or args.hosts + args.real < 1:
        parser.error("need at least one host")
    return args


def summary(report: dict[str, Any]) -> str:
    lines = []
    n = report["settings"]["hosts"] + report["settings"]["real"]
    for phase in ("idle", "load", "requests"):
        p = report.get(phase)
        if p is None:
            continue
        ages = p["telemetry_age_s"]
        age = ", ".join(
            f"{s} p50/p99/max {a['p50']}/{a['p99']}/{a['max']} s"
            + (f" ({a['never_polled']} never polled)" if a["never_polled"] else "")
            for s, a in ages.items()
            if isinstance(a, dict)
        )
        scrapes = ", ".join(f"{k} {v['mean']}" for k, v in sorted(p["scrapes_per_host_s"].items()))
        cpu, admin = p["cpu_cores"], p["envoy_admin"]
        lines += [
            f"{phase} ({n} hosts): picker {cpu['picker']:.3f} cores"
            f" ({p['picker_cpu_ms_per_host_second']:.3f} ms per host-second), RSS {p['picker_rss_mib']} MiB;"
            f" envoy {cpu.get('envoy', 0):.3f}, emulator {cpu.get('emulator', 0):.3f} cores",
            f"  telemetry age: {age}; fresh hosts (min) {ages['fresh_hosts_min']}/{n}",
            f"  envoy admin, {admin['polls_per_s']} polls/s: endpoint stats {admin['stats_bytes']} bytes, fetch"
            f" {admin['stats_fetch_ms']} ms, parse {admin['stats_parse_ms']} ms; /clusters (with a host out)"
            f" {admin['clusters_json_bytes']} bytes, fetch {admin['fetch_ms']} ms, parse {admin['parse_ms']} ms",
            f"  requests per emulated host per s: {scrapes}",
        ]
        probe = p.get("emulator_answer_ms") or {}
        if probe:
            lines.append(
                f"  the emulator answers another client in: /metrics p50/max {probe['metrics']['p50']}/"
                f"{probe['metrics']['max']} ms, RepositoryIndex (new channel) p50/max"
                f" {probe['repository_index']['p50']}/{probe['repository_index']['max']} ms"
            )
        if "requests" in p:
            r, d = p["requests"], p["decision_s"]
            lines.append(
                f"  sent {r['requests']} at {r['rate_rps']:g}/s: ok {r['ok']}, errors {r['errors']},"
                f" latency p50/p99 {r['latency']['p50_ms']:.2f}/{r['latency']['p99_ms']:.2f} ms;"
                f" decision p50/p99 <= {d['p50_le']}/{d['p99_le']} s ({d['count']:g} decisions)"
            )
            logged = p.get("decision_us")
            if logged:
                ready = logged["answer"]
                lines.append(
                    f"  decision time (logged): p50/p99/max {logged['p50']}/{logged['p99']}/{logged['max']} us"
                    f" ({logged['n']} decisions); the answer ready in p50/p99 {ready['p50']}/{ready['p99']} us"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings(
        hosts=args.hosts,
        real=args.real,
        rate=args.rate,
        duration_s=args.duration,
        fresh_timeout_s=args.fresh_timeout,
        poll=args.poll or None,
        request_rate=args.request_rate,
        gpu_share=args.gpu_share,
        profile=None if args.profile is None else str(args.profile),
        replicas=args.replicas,
        decision_samples=args.decision_samples,
        picker=args.picker,
        workers=args.workers,
        compiled=args.compiled,
    )
    if settings.compiled and (next(PACKAGE.rglob("*.so"), None) is None or stale_compiled_modules()):
        print("benchmarks.fleet: --compiled needs the compiled modules current: run `make install`", file=sys.stderr)
        return 2
    try:
        report = run(settings, args.keep_dir)
    except (FleetBenchError, OSError) as exc:
        print(f"benchmarks.fleet: {exc}", file=sys.stderr)
        return 1
    report["notes"] = [
        "CPU is measured idle, with the emulated hosts' counters advancing at --rate (no request through Envoy: "
        "the picker's CPU is telemetry only), and with --request-rate inference requests/s through Envoy.",
        "decision_s: bucket upper bounds of the picker's extproc_decision_seconds histogram over the phase; "
        "decision_us (--decision-samples): the same times as the picker logged each (routed, decision_us), "
        "from the request reaching the picker to its answer written; answer: to the answer ready, before gRPC "
        "sent it (the rest is sending it and waiting for the process's turn on a busy machine).",
        "One grpc.aio server answers every emulated host's gRPC port: gRPC calls per host are the total / hosts.",
        "Envoy is real (rendered from the fleet file) and health-checks every host (http_health, grpc_HealthCheck).",
        "envoy_admin.polls_per_s: the picker's admin requests over the phase (Envoy's "
        "http.admin.downstream_rq_total); stats_*: one GET of the per-endpoint stats the picker polls and its "
        "parse, timed in the benchmark process; fetch_ms/parse_ms/clusters_json_bytes: the same of /clusters, "
        "which the picker reads besides while a host is out of rotation; picker_parse_cores_est: the stats "
        "parse times the poll rate.",
    ]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    print(summary(report))
    progress(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
