"""The ``extproc`` command line."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from extproc.config import ConfigError, Fleet, load_fleet
from extproc.logs import configure
from extproc.ops import SORT_KEYS, STATE_FILTERS

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
    # Internal: a leader (picker.workers > 1) starts its workers with their index.
    serve.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    render = command("envoy-config", "Render the Envoy bootstrap for the fleet file.")
    render.add_argument("--output", "-o", type=Path, help="write here instead of stdout")
    command("check", "Validate the fleet file and exit.")
    _ops_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        fleet = load_fleet(args.config)
    except ConfigError as exc:
        print(f"extproc: refusing to start, invalid fleet file:\n{exc}", file=sys.stderr)
        return 2
    level = getattr(args, "log_level", None) or fleet.picker.log_level
    configure(level, args.log_format)
    try:
        return _run(args, fleet)
    except ConfigError as exc:
        # Files the fleet file names (admin_key_file) are read when a command starts, not with the file.
        print(f"extproc: refusing to start:\n{exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, fleet: Fleet) -> int:
    if args.command in {"models", "status", "placement"}:
        return _ops(args, fleet)
    if args.command == "serve":
        from extproc import app

        if args.log_level:
            fleet = fleet.model_copy(update={"picker": fleet.picker.model_copy(update={"log_level": args.log_level})})
        app.run(fleet, args.config, args.worker, args.log_format)
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
    print(f"{args.config}: valid ({len(fleet.hosts)} hosts, {len(fleet.pools)} pools, {len(fleet.models)} models)")
    return 0


def _ops_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``extproc models {list,load,unload,place,reload}``, ``extproc status`` (extproc/ops/) and
    ``extproc placement {explain,run}`` (extproc/placement/)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", type=Path, default=Path(DEFAULT_CONFIG), help="fleet file (YAML)")
    common.add_argument(
        "--picker",
        action="append",
        metavar="URL",
        help="picker HTTP endpoint (repeat for replicas; dns+http://NAME:PORT: every address NAME resolves to)",
    )
    common.add_argument(
        "--envoy",
        action="append",
        metavar="URL",
        help="Envoy admin endpoint (repeatable; dns+http://NAME:PORT: every address NAME resolves to)",
    )
    common.add_argument("--timeout", type=float, default=5.0, help="seconds per repository/status call")
    models = sub.add_parser("models", help="Triton model repository operations across the fleet.")
    models_sub = models.add_subparsers(dest="models_command", required=True)

    def op(name: str, help_text: str) -> argparse.ArgumentParser:
        return models_sub.add_parser(name, help=help_text, description=help_text, parents=[common])

    listing = op("list", "Which model is READY where: per model, on how many hosts (asks every Triton host).")
    listing.add_argument("model", nargs="*", help="only these models")
    listing.add_argument(
        "--hosts", action="append", metavar="A,B", help="the model x host table of these hosts (names or globs)"
    )
    listing.add_argument("--json", action="store_true")
    load = op("load", "Load a model on hosts (by name, by tier, or the best --count of them).")
    place = op("place", "Make a model READY on --count hosts of its tiers, choosing by GPU memory headroom.")
    unload = op("unload", "Unload a model host by host, draining each host in the picker first.")
    reload = op("reload", "Rolling reload: per host drain, wait, unload, load, wait READY, undrain.")
    for p in (load, place, unload, reload):
        p.add_argument("model")
        p.add_argument("--tier", choices=["cpu", "gpu"])
        p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
        p.add_argument("--force", action="store_true", help="go ahead despite the plan's problems")
    for p in (load, unload, reload):
        p.add_argument("--hosts", action="append", metavar="A,B", help="these hosts")
        p.add_argument("--all", action="store_true", help="every host of the model's tiers (load) or with it")
    for p in (load, place, reload):
        p.add_argument("--load-timeout", type=float, metavar="S", help="seconds per load (default 300)")
    for p in (load, place):
        p.add_argument("--no-wait", action="store_true", help="do not wait until the picker sees it READY")
    load.add_argument("--count", type=int, help="only the best N hosts")
    place.add_argument("--count", type=int, required=True, help="hosts the model should be READY on in all")
    for p in (unload, reload):
        p.add_argument("--drain-timeout", type=float, metavar="S", help="seconds to wait for in-flight (60)")
        p.add_argument("--no-drain", action="store_true", help="do not drain first (requests may fail)")
    status = sub.add_parser(
        "status", help="Live table of hosts, tiers, models, queues, GPU memory and ejections.", parents=[common]
    )
    status.add_argument("--watch", nargs="?", type=float, const=2.0, metavar="SECONDS", help="refresh (default 2 s)")
    status.add_argument("--once", action="store_true", help="print once (the default when not on a terminal)")
    status.add_argument("--json", action="store_true")
    status.add_argument("--no-envoy", action="store_true", help="do not ask Envoy's admin endpoint")
    status.add_argument("--tier", action="append", choices=["cpu", "gpu"], help="only this tier's hosts (repeatable)")
    status.add_argument(
        "--state", action="append", choices=STATE_FILTERS, help="only hosts in this state (repeatable: any of them)"
    )
    status.add_argument("--model", action="append", metavar="MODEL", help="only hosts with MODEL READY (repeatable)")
    status.add_argument("--sort", choices=SORT_KEYS, default="name", help="order of the hosts (numbers: largest first)")
    status.add_argument("--top", type=int, metavar="N", help="only the first N hosts (after --sort)")
    placement = sub.add_parser("placement", help="Demand-driven model placement (preview): explain or run it.")
    placement_sub = placement.add_subparsers(dest="placement_command", required=True)
    explain = placement_sub.add_parser(
        "explain", help="Per model: demand, capacity, copies and the actions it would take, with reasons.",
        parents=[common],
    )  # fmt: skip
    explain.add_argument("--json", action="store_true")
    run = placement_sub.add_parser(
        "run", help="Every placement.interval_s: decide and load/unload models (through drain).", parents=[common]
    )
    run.add_argument("--dry-run", action="store_true", help="log the actions, change nothing")
    run.add_argument("--once", action="store_true", help="one round, then exit (1 if an action failed)")
    run.add_argument("--load-timeout", type=float, metavar="S", help="seconds per load (default 300)")
    run.add_argument("--drain-timeout", type=float, metavar="S", help="seconds to wait for in-flight (60)")
    run.add_argument(
        "--metrics-port", type=int, metavar="PORT", help="serve Prometheus /metrics here (placement.metrics_port)"
    )
    for p in (explain, run):
        p.add_argument(
            "--window", type=float, default=5.0, metavar="S", help="seconds to measure demand over at the first look"
        )


def _ops(args: argparse.Namespace, fleet: Fleet) -> int:
    from extproc.discovery import resolve_pools

    # The pools' hosts as they resolve now: these commands talk to every host themselves.
    fleet = asyncio.run(resolve_pools(fleet))
    if args.command == "status":
        from extproc.ops import status

        return status.run_cli(args, fleet)
    if args.command == "placement":
        from extproc.placement import command

        return command.run_cli(args, fleet)
    from extproc.ops import models

    return models.run_cli(args, fleet)
