"""``extproc models``: Triton's repository API (explicit model control) across the fleet, from the
command line (arguments are defined in extproc/cli.py).

This module is the command's glue; the work is done by layer:

- :mod:`extproc.ops.triton_api`: the Triton client and the fleet's repository indexes;
- :mod:`extproc.ops.plans`: pure planning (which hosts, in which order, what would go wrong);
  ``--dry-run`` prints a plan and stops there;
- :mod:`extproc.ops.execute`: carrying a plan out (drain, unload/load, wait, undrain);
- :mod:`extproc.ops.present`: the tables and reports printed.
"""

from __future__ import annotations

import fnmatch
import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TextIO

from extproc.admin_key import read_admin_key
from extproc.config import Fleet, HostSpec, Tier
from extproc.control import read_control_token
from extproc.ops import OpsError
from extproc.ops.endpoints import expand
from extproc.ops.execute import Ops, Timeouts, execute_load, execute_roll
from extproc.ops.plans import merged_view, picker_statuses, plan_load, plan_place, plan_roll
from extproc.ops.present import (
    format_load_plan,
    format_model_summary,
    format_models,
    format_results,
    format_roll_plan,
    model_summary_json,
    models_json,
)
from extproc.ops.status import EnvoyApi, PickerApi
from extproc.ops.triton_api import GrpcTriton, read_index

__all__ = ["make_ops", "printer", "run_cli", "with_endpoints"]


def _pickers(urls: list[str] | None, fleet: Fleet, drain: bool) -> list[PickerApi]:
    from extproc.ops.status import HttpPicker, default_picker_url

    # Only what drains needs the control token; the rest works where the token file is not at hand.
    token = read_control_token(fleet) if drain else None
    return [HttpPicker(url, control_token=token) for url in expand(urls or [default_picker_url(fleet)])]


def _envoys(urls: list[str] | None, fleet: Fleet) -> list[EnvoyApi]:
    from extproc.ops.status import HttpEnvoyAdmin, default_envoy_admin_url

    return [HttpEnvoyAdmin(url) for url in expand(urls or [default_envoy_admin_url(fleet)])]


def with_endpoints(ops: Ops, args: Any, *, drain: bool) -> Ops:
    """``ops`` acting through the pickers and Envoys that ``--picker`` and ``--envoy`` name now: their
    ``dns+`` names resolved again (see :mod:`extproc.ops.endpoints`)."""
    return replace(ops, pickers=_pickers(args.picker, ops.fleet, drain), envoys=_envoys(args.envoy, ops.fleet))


def make_ops(
    args: Any, fleet: Fleet, triton: GrpcTriton, progress: Callable[[str], None], *, drain: bool, endpoints: bool = True
) -> Ops:
    """The operations context for the common options (``--picker``, ``--envoy``, ``--timeout``, and
    ``--load-timeout``, ``--drain-timeout`` where the command has them); ``drain``: it may drain hosts;
    ``endpoints`` false: no picker or Envoy yet (see :func:`with_endpoints`)."""
    # Picks made just before the drain reach Envoy's rq_active within an admin poll or two.
    settle_s = max(1.0, 3 * fleet.picker.poll.envoy_admin_s(len(fleet.hosts)))
    timeouts = Timeouts(index_s=args.timeout, settle_s=settle_s)
    if getattr(args, "load_timeout", None) is not None:
        timeouts = replace(timeouts, load_s=args.load_timeout)
    if getattr(args, "drain_timeout", None) is not None:
        timeouts = replace(timeouts, drain_s=args.drain_timeout)
    ops = Ops(fleet, triton, timeouts=timeouts, progress=progress)
    return with_endpoints(ops, args, drain=drain) if endpoints else ops


def printer(out: TextIO, clock: Callable[[], float]) -> Callable[[str], None]:
    """Progress lines, each with the seconds since the command started."""
    start = clock()
    lock = threading.Lock()

    def progress(message: str) -> None:
        with lock:
            out.write(f"[{clock() - start:6.1f}s] {message}\n")
            out.flush()

    return progress


def run_cli(args: Any, fleet: Fleet, out: TextIO | None = None) -> int:
    """``extproc models list|load|unload|place|reload``. Exit status: 0 done (or nothing to do), 1 a host
    failed or a goal was not reached, 2 the plan was refused (problems, without ``--force``)."""
    out = out or sys.stdout
    triton = GrpcTriton(read_admin_key(fleet))
    try:
        drain = args.models_command in {"unload", "reload"}
        ops = make_ops(args, fleet, triton, printer(out, time.monotonic), drain=drain)
        return _run(args, ops, out)
    except OpsError as exc:
        out.flush()
        print(f"extproc models: {exc}", file=sys.stderr)
        return 2
    finally:
        triton.close()


def _selected_hosts(fleet: Fleet, patterns: list[str]) -> list[HostSpec]:
    """The hosts named by ``--hosts`` (names or shell globs, e.g. ``triton-gpu-*``), in fleet order."""
    chosen = [h for h in fleet.hosts if any(fnmatch.fnmatchcase(h.name, p) for p in patterns)]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(h.name, p) for h in fleet.hosts)]
    if unmatched:
        raise OpsError(f"no host of the fleet matches {', '.join(unmatched)}")
    return chosen


def _list(args: Any, ops: Ops, out: TextIO) -> int:
    """The summary per model by default; the model x host table for the hosts ``--hosts`` names."""
    fleet = ops.fleet
    wanted = list(args.model or ())
    patterns = [h for part in (args.hosts or ()) for h in part.split(",") if h]
    hosts = _selected_hosts(fleet, patterns) if patterns else list(fleet.hosts)
    indexes = read_index(ops.triton, hosts, ops.timeouts.index_s)
    if patterns:
        doc, text = models_json, format_models
    else:
        doc, text = model_summary_json, format_model_summary
    if args.json:
        out.write(json.dumps(doc(fleet, indexes, wanted), indent=2) + "\n")
    else:
        out.write(text(fleet, indexes, wanted))
    return 1 if any(i.error for i in indexes.values()) else 0


def _run(args: Any, ops: Ops, out: TextIO) -> int:
    if args.models_command == "list":
        return _list(args, ops, out)
    fleet = ops.fleet
    indexes = read_index(ops.triton, fleet.hosts, ops.timeouts.index_s)
    model: str = args.model
    tier = Tier(args.tier) if getattr(args, "tier", None) else None
    hosts = [h for part in (getattr(args, "hosts", None) or ()) for h in part.split(",") if h]
    drain = not getattr(args, "no_drain", False)
    need_pickers = args.models_command in {"unload", "reload"} and drain
    try:
        view = merged_view(picker_statuses(ops.pickers))
    except OpsError as exc:
        if need_pickers:
            raise OpsError(f"{exc}: cannot drain hosts without every picker (--no-drain to go on anyway)") from None
        out.write(f"note: {exc}\n")
        ops = replace(ops, pickers=())
        view = {}
    if args.models_command in {"load", "place"}:
        if args.models_command == "load":
            if not hosts and tier is None and not args.all:
                raise OpsError("say where: --hosts a,b, --tier TIER or --all (the model's allowed tiers)")
            plan = plan_load(fleet, model, indexes, view, hosts=hosts, tier=tier, count=args.count, force=args.force)
        else:
            plan = plan_place(fleet, model, indexes, view, count=args.count, tier=tier, force=args.force)
        out.write(format_load_plan(plan, args.models_command))
        refused = plan.problems and not (args.force and args.models_command == "load")
        if args.dry_run:
            out.write("dry run: nothing changed\n")
            return 2 if refused else 0
        if refused and args.models_command == "load":
            out.write("refused: nothing changed (--force to go ahead)\n")
            return 2
        results = execute_load(ops, plan, wait_picker=not args.no_wait)
        out.write(format_results(results))
        return 0 if all(r.ok for r in results) and not plan.short else 1
    if not hosts and tier is None and not args.all:
        raise OpsError("say where: --hosts a,b, --tier TIER or --all (every host that has it)")
    roll = plan_roll(args.models_command, fleet, model, indexes, view, hosts=hosts, tier=tier, drain=drain)
    out.write(format_roll_plan(roll, len(ops.pickers), ops.timeouts, drain))
    if args.dry_run:
        out.write("dry run: nothing changed\n")
        return 2 if roll.problems and not args.force else 0
    if roll.problems and not args.force:
        out.write("refused: nothing changed (--force to go ahead)\n")
        return 2
    results = execute_roll(ops, roll, drain=drain, force=args.force)
    out.write(format_results(results))
    return 0 if len(results) == len(roll.steps) and all(r.ok for r in results) else 1
