"""The ``extproc`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from extproc.config import ConfigError, Fleet, load_fleet
from extproc.logs import configure

DEFAULT_CONFIG = "deploy/local/fleet.yaml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="extproc", description="ML-aware load balancer for Triton fleets.")
    parser.add_argument("--log-format", choices=["auto", "json", "console"], default="auto")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", "-c", type=Path, default=Path(DEFAULT_CONFIG), help="fleet file (YAML)")
        return p

    command("up", "Start the Triton hosts the fleet file launches, the picker and Envoy; print READY.")
    serve = command("serve", "Run the picker (the ext_proc gRPC service).")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="overrides the file")
    render = command("envoy-config", "Render the Envoy bootstrap for the fleet file.")
    render.add_argument("--output", "-o", type=Path, help="write here instead of stdout")
    command("check", "Validate the fleet file and exit.")
    bench = sub.add_parser("bench", help="On-demand benchmarks that print numbers.")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    decision = bench_sub.add_parser("decision", help="In-process decision time over synthetic fleets.")
    decision.add_argument("--hosts", type=int, nargs="+", default=[10, 100, 1000])
    decision.add_argument("--iterations", type=int, default=20000)
    decision.add_argument("--json", help="also write the results here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "bench":
        return _bench(args)
    try:
        fleet = load_fleet(args.config)
    except ConfigError as exc:
        print(f"extproc: refusing to start, invalid fleet file:\n{exc}", file=sys.stderr)
        return 2
    level = getattr(args, "log_level", None) or fleet.picker.log_level
    configure(level, args.log_format)
    return _run(args, fleet)


def _bench(args: argparse.Namespace) -> int:
    configure("warning", args.log_format)
    from extproc.bench import decision

    return decision.main(args.hosts, args.iterations, args.json)


def _run(args: argparse.Namespace, fleet: Fleet) -> int:
    if args.command == "serve":
        from extproc import app

        if args.log_level:
            fleet = fleet.model_copy(update={"picker": fleet.picker.model_copy(update={"log_level": args.log_level})})
        app.run(fleet, args.config)
        return 0
    if args.command == "up":
        from extproc.runtime.stack import up

        return up(fleet, args.config)
    if args.command == "envoy-config":
        from extproc.envoy_config import render_yaml

        text = render_yaml(fleet)
        if args.output is None:
            sys.stdout.write(text)
        else:
            args.output.write_text(text, encoding="utf-8")
        return 0
    print(f"{args.config}: valid ({len(fleet.hosts)} hosts, {len(fleet.models)} models)")
    return 0
