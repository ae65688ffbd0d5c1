"""``python -m benchmarks.overhead``: the options, and the whole run (or the soak) from them."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from benchmarks import RESULTS_DIR, shown
from benchmarks.overhead.bench import OverheadBench
from benchmarks.overhead.load import WRK_INSTALL_HINT, find_wrk
from benchmarks.overhead.report import (
    NOTES,
    environment,
    evaluate_targets,
    format_report,
    format_soak,
    json_safe,
    settings_json,
)
from benchmarks.overhead.stack import DEFAULT_RATES, EPP_VARIANT, PROCESSOR_VARIANTS, Settings, progress

DEFAULT_OUTPUT: Final = RESULTS_DIR / "overhead.json"
DEFAULT_SOAK_OUTPUT: Final = RESULTS_DIR / "overhead-soak.json"
_DESCRIPTION: Final = (
    "What the picker costs a request, against plain Envoy and a bare ext_proc processor"
    " (the phases, what is measured and how: benchmarks/overhead/__init__.py)."
)


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n", encoding="utf-8")


def run(settings: Settings, output: Path, keep_dir: Path | None = None) -> int:
    """The whole benchmark (or the soak); prints the table, writes the JSON. Returns an exit status."""
    if settings.wrk is None and settings.wrk_missing == WRK_INSTALL_HINT:
        progress(
            WRK_INSTALL_HINT
            + (
                "; the soak uses the open-loop generator"
                if settings.soak
                else "; the maximum-throughput phase is skipped"
            )
        )
    if keep_dir is not None:
        keep_dir.mkdir(parents=True, exist_ok=True)
        run_dir = keep_dir.resolve()
        cleanup = None
    else:
        # Short path: a Unix socket path must stay under 108 bytes.
        cleanup = tempfile.TemporaryDirectory(prefix="extproc-ovh-")
        run_dir = Path(cleanup.name)
    variants = (settings.soak_variant,) if settings.soak else settings.variants
    bench = OverheadBench(settings, run_dir, variants)
    report: dict[str, Any] = {"environment": environment(), "settings": settings_json(settings)}
    try:
        bench.start()
        if settings.soak:
            report["soak"] = bench.soak(settings.soak, settings.soak_variant)
        else:
            bench.warm_up()
            report["max_throughput"] = bench.max_phase()
            # Noise only ever lowers a round's throughput: the best round bounds what a variant can sustain.
            max_rps = {v: d["rps_best"] for v, d in report["max_throughput"].get("variants", {}).items()}
            report["fixed_rate"] = bench.rate_phase(max_rps)
            report["targets"] = evaluate_targets(report)
        report["environment"]["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except (RuntimeError, OSError) as exc:  # BenchError, find_envoy's StartupError, wrk failures
        print(f"benchmarks.overhead: {exc}", file=sys.stderr)
        return 1
    finally:
        progress("stopping")
        bench.stop()
        if cleanup is not None:
            cleanup.cleanup()
    report["notes"] = NOTES
    _write_json(output, report)
    print(format_soak(report["soak"]) if settings.soak else format_report(report))
    print(f"results: {output}")
    return 0


# ---------------------------------------------------------------------------------------------- the CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m benchmarks.overhead`` (see :func:`run_from_args`)."""
    parser.add_argument(
        "--output",
        "-o",
        type=Path,
        help=f"JSON results (default {shown(DEFAULT_OUTPUT)}, {shown(DEFAULT_SOAK_OUTPUT)} with --soak)",
    )
    parser.add_argument("--rates", type=float, nargs="+", default=list(DEFAULT_RATES), help="fixed rates, req/s")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per fixed-rate run (default 6)")
    parser.add_argument("--max-duration", type=int, default=6, help="seconds per wrk run (default 6)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per variant (default 5)")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections (default 16)")
    parser.add_argument("--hosts", type=int, default=3, help="upstream hosts in the fleet (default 3)")
    parser.add_argument("--wrk", help="the wrk binary (default: wrk on PATH)")
    parser.add_argument("--no-wrk", action="store_true", help="skip the maximum-throughput phase")
    parser.add_argument(
        "--soak",
        type=int,
        default=0,
        metavar="N",
        help="instead: send N requests through the picker and sample its RSS every ~50k",
    )
    parser.add_argument(
        "--soak-rate",
        type=float,
        default=1000.0,
        help="open-loop rate of the soak when wrk is missing (default 1000 req/s)",
    )
    parser.add_argument(
        "--soak-variant",
        choices=PROCESSOR_VARIANTS,
        default="picker",
        help="the processor the soak goes through (bare: is a growth grpc's or the picker's? epp: the picker in"
        " the Endpoint Picker Protocol)",
    )
    parser.add_argument(
        "--bare-answer",
        choices=("empty", "routing"),
        default="empty",
        help="the bare processor's constant answer: change nothing (default), or route as the picker does,"
        " naming every upstream host (then only the processor differs between bare and picker)",
    )
    parser.add_argument(
        "--no-rest-body-check",
        action="store_true",
        help="render the gateway with picker.check_rest_bodies: false (REST inference routed on headers only)",
    )
    parser.add_argument(
        "--epp",
        action="store_true",
        help=f"also measure the {EPP_VARIANT!r} variant: the picker in the Endpoint Picker Protocol, behind a"
        " gateway-shaped Envoy (FULL_DUPLEX_STREAMED bodies, override_host), as a GIE gateway sends it requests",
    )
    parser.add_argument("--keep-dir", type=Path, help="keep configs and logs here instead of a deleted temp dir")


def settings_from_args(args: argparse.Namespace) -> Settings:
    if args.rounds < 1 or args.duration <= 0 or args.max_duration < 1 or args.connections < 1 or args.hosts < 1:
        raise ValueError("--rounds, --duration, --max-duration, --connections and --hosts must be positive")
    if any(r <= 0 for r in args.rates) or args.soak < 0 or args.soak_rate <= 0:
        raise ValueError("--rates, --soak and --soak-rate must be positive")
    wrk = None if args.no_wrk else find_wrk(args.wrk)
    return Settings(
        wrk_missing=None if wrk is not None else ("--no-wrk given" if args.no_wrk else WRK_INSTALL_HINT),
        rates=tuple(args.rates),
        duration_s=args.duration,
        max_duration_s=args.max_duration,
        rounds=args.rounds,
        connections=args.connections,
        hosts=args.hosts,
        wrk=wrk,
        soak=args.soak,
        soak_rate=args.soak_rate,
        soak_variant=args.soak_variant,
        bare_answer=args.bare_answer,
        check_rest_bodies=not args.no_rest_body_check,
        epp=args.epp,
    )


def run_from_args(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        print(f"benchmarks.overhead: {exc}", file=sys.stderr)
        return 2
    output = args.output or (DEFAULT_SOAK_OUTPUT if settings.soak else DEFAULT_OUTPUT)
    return run(settings, output, args.keep_dir)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=_DESCRIPTION)
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))
