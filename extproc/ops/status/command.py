"""``extproc status``: the command line's options to a view, printed once or refreshed in place."""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any, TextIO

from extproc.config import Fleet, HostSpec
from extproc.ops import OpsError
from extproc.ops.endpoints import expand
from extproc.ops.status.clients import (
    EnvoyApi,
    HttpEnvoyAdmin,
    HttpPicker,
    PickerApi,
    default_envoy_admin_url,
    default_picker_url,
)
from extproc.ops.status.render import render, snapshot_json
from extproc.ops.status.rows import DEFAULT_VIEW, DEFAULT_WIDTH, View
from extproc.ops.status.snapshot import collect, snapshot_ok
from extproc.ops.status.text import fit_frame

__all__ = ["CLEAR", "run_cli", "run_status"]

# ANSI: cursor home, clear screen. Written before each refresh of ``extproc status --watch``.
CLEAR = "\x1b[H\x1b[2J"


def run_status(
    hosts: Sequence[HostSpec],
    pickers: Sequence[PickerApi],
    envoys: Sequence[EnvoyApi],
    *,
    watch_s: float | None,
    as_json: bool = False,
    view: View = DEFAULT_VIEW,
    out: TextIO = sys.stdout,
    sleep: Callable[[float], None] = time.sleep,
    iterations: int | None = None,
) -> int:
    """Print once (``watch_s`` None) or refresh in place every ``watch_s`` seconds until Ctrl-C.

    Exit status (single print): 0 when every picker answered, 1 otherwise.
    """

    def frames() -> Iterator[int]:
        n = 0
        while iterations is None or n < iterations:
            yield n
            n += 1

    if watch_s is None:
        snapshot = collect(hosts, pickers, envoys)
        out.write(json.dumps(snapshot_json(snapshot, view), indent=2) + "\n" if as_json else render(snapshot, view))
        out.flush()
        return 0 if snapshot_ok(snapshot) else 1
    try:
        for n in frames():
            if n:
                sleep(watch_s)
            snapshot = collect(hosts, pickers, envoys)
            if as_json:
                out.write(json.dumps(snapshot_json(snapshot, view)) + "\n")
            else:
                size = shutil.get_terminal_size((view.width, 50))
                footer = f"\nrefreshing every {watch_s:g} s; Ctrl-C to stop\n"
                frame = render(snapshot, replace(view, width=size.columns)) + footer
                out.write(CLEAR + fit_frame(frame, size.columns, size.lines))
            out.flush()
    except KeyboardInterrupt:
        out.write("\n")
    return 0


def run_cli(args: Any, fleet: Fleet, out: TextIO | None = None) -> int:
    """``extproc status``: ``--once``, ``--watch [SECONDS]`` (the default on a terminal), ``--json``, and
    the view: ``--tier``, ``--state``, ``--model``, ``--sort``, ``--top``."""
    out = out or sys.stdout
    try:
        picker_urls = expand(args.picker or [default_picker_url(fleet)])
        envoy_urls = [] if args.no_envoy else expand(args.envoy or [default_envoy_admin_url(fleet)])
    except OpsError as exc:
        print(f"extproc status: {exc}", file=sys.stderr)
        return 2
    pickers = [HttpPicker(url, args.timeout) for url in picker_urls]
    envoys = [HttpEnvoyAdmin(url, args.timeout) for url in envoy_urls]
    watch_s: float | None = args.watch
    if watch_s is None and not args.once and not args.json and out.isatty():
        watch_s = 2.0
    if args.once:
        watch_s = None
    if watch_s is not None and watch_s <= 0:
        print("extproc status: --watch needs a positive number of seconds", file=sys.stderr)
        return 2
    if args.top is not None and args.top < 1:
        print("extproc status: --top needs a positive number of hosts", file=sys.stderr)
        return 2
    view = View(
        tiers=frozenset(args.tier or ()),
        states=frozenset(args.state or ()),
        models=frozenset(args.model or ()),
        sort=args.sort,
        top=args.top,
        width=shutil.get_terminal_size((DEFAULT_WIDTH, 50)).columns if out.isatty() else DEFAULT_WIDTH,
    )
    return run_status(fleet.hosts, pickers, envoys, watch_s=watch_s, as_json=args.json, view=view, out=out)
