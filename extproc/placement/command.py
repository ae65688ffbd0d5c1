"""``extproc placement explain|run``: the placement controller from the command line (arguments are
defined in extproc/cli.py).

Why it acts through :mod:`extproc.ops`: loading on chosen hosts and unloading host by host through the
drain path are what ``extproc models load`` and ``extproc models unload`` already do without failing a
request, with the same refusals (never strand a model's last routable copy). The controller only decides
which hosts, and when; while it runs it remembers its own changes (for the cool-down), how long each
model's demand has been low (for the scale-down window) and the footprints it measured at its loads
(:mod:`extproc.placement.footprints`).

``run`` re-reads the fleet file every round: ``placement.enabled: false`` or the pause file pauses it (it
keeps planning and logging what it would do), and a changed setting applies at the next round; it resolves
the ``dns+`` names of ``--picker`` and ``--envoy`` again each round, so it drains on every replica there is
(:mod:`extproc.ops.endpoints`). With ``--metrics-port`` (or ``placement.metrics_port``) it serves its
Prometheus series (:mod:`extproc.placement.metrics`) for as long as it runs. SIGTERM or SIGINT stops it
between rounds: a round that has started its loads and unloads finishes them (an unload ends with the host
undrained), since a controller killed halfway through one would leave the host drained on every picker.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO
from wsgiref.simple_server import WSGIServer

import structlog
from prometheus_client import start_http_server

from extproc.admin_key import read_admin_key
from extproc.config import ConfigError, Fleet, HostSpec, load_fleet
from extproc.ops import OpsError
from extproc.ops.execute import HostResult, Ops, execute_load, execute_roll
from extproc.ops.models import make_ops, with_endpoints
from extproc.ops.plans import merged_view, picker_statuses, plan_load, plan_roll
from extproc.ops.status import PickerHost, PickerStatus
from extproc.ops.triton_api import GrpcTriton, read_index
from extproc.placement.explain import explain_json, format_explain
from extproc.placement.footprints import Footprints, MemoryReading, read_memory
from extproc.placement.inputs import Demand, DemandMeter, build_inputs
from extproc.placement.metrics import PlacementMetrics
from extproc.placement.plan import Action, HostInput, ModelInput, Plan, plan

__all__ = ["Controller", "Round", "pause_reason", "run_cli"]

log = structlog.get_logger(__name__)


def pause_reason(fleet: Fleet) -> str | None:
    """Why the controller must not change anything now, or None."""
    if not fleet.placement.enabled:
        return "placement.enabled is false"
    path = Path(fleet.placement.pause_file or "placement.pause")
    if not path.is_absolute():
        path = Path(fleet.runtime_dir) / path
    return f"{path} exists" if path.exists() else None


@dataclass(frozen=True, slots=True)
class Round:
    """One look at the fleet and what the plan made of it."""

    plan: Plan
    hosts: tuple[HostInput, ...]
    view: dict[str, PickerHost]
    models: tuple[ModelInput, ...]
    window_s: float


@dataclass
class Controller:
    """Looks at the pickers, plans, and carries the plan out through ``ops``. ``clock`` (monotonic, for
    rates and cool-downs), ``wall`` (Unix time, for the pickers' refusal times) and ``sleep`` are
    injectable for tests."""

    ops: Ops
    meter: DemandMeter = field(default_factory=DemandMeter)
    last_change: dict[tuple[str, str], float] = field(default_factory=dict)  # (model, tier) -> when
    # (model, tier) -> (since when every round has wanted fewer copies, the most copies they wanted): the window a
    # scale-down waits for (PlacementSpec.scale_down_after_s), carried from each plan to the next.
    low: dict[tuple[str, str], tuple[float, int]] = field(default_factory=dict)
    footprints: Footprints = field(default_factory=Footprints)
    memory: Callable[[Fleet, HostSpec], MemoryReading | None] = read_memory  # a host's, from its metrics page
    # The pickers and Envoys to act through, looked up again at the start of each round of ``run`` (their
    # dns+ names); None: ``ops`` keeps its own.
    endpoints: Callable[[Ops], Ops] | None = None
    clock: Callable[[], float] = time.monotonic
    wall: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep
    _looked_at: float | None = None

    def _look(self) -> tuple[list[PickerStatus], Demand | None]:
        statuses = picker_statuses(self.ops.pickers)
        return statuses, self.meter.update(statuses, self.clock())

    def decide(self, window_s: float) -> Round:
        """Plan from the demand since the last look, or over ``window_s`` from now at the first one."""
        start = self._looked_at
        statuses, rates = self._look()
        if rates is None:
            start = self.clock()
            self.sleep(window_s)
            statuses, rates = self._look()
        now = self.clock()
        self._looked_at = now
        fleet = self.ops.fleet
        view = merged_view(statuses)
        self._settle(view, now)
        learned = self.footprints.learned()
        models, hosts = build_inputs(
            fleet, view, statuses, rates, now_unix=self.wall(), last_change=self.last_change, low=self.low,
            learned=learned,
        )  # fmt: skip
        result = plan(models, hosts, fleet.placement, now, learned)
        self.low = {
            (d.model, d.tier): (d.low_since, d.low_most)
            for d in result.decisions
            if d.low_since is not None and d.low_most is not None
        }
        return Round(result, tuple(hosts), view, tuple(models), now - (start if start is not None else now))

    def _settle(self, view: dict[str, PickerHost], now: float) -> None:
        """Finish the footprint measurements of loads that ended long enough ago."""
        specs = {h.name: h for h in self.ops.fleet.hosts}

        def read(host: str) -> MemoryReading | None:
            spec = specs.get(host)
            return None if spec is None else self.memory(self.ops.fleet, spec)

        ready = {name: frozenset(h.ready) for name, h in view.items()}
        learned = self.footprints.learned()
        for o in self.footprints.settle(now, read, ready):
            log.info(
                "placement_footprint",
                model=o.model,
                host=o.host,
                counted=o.learned,
                delta_bytes=o.delta_bytes,
                memory=o.source,
                why=o.why,
                before_bytes=learned.get(o.model),
                footprint_bytes=self.footprints.learned().get(o.model),
            )

    def _measure(self, model: str, hosts: list[str], view: dict[str, PickerHost]) -> None:
        """Read the hosts' memory before a load of ``model`` there, where its footprint is not declared."""
        spec = self.ops.fleet.placement.models.get(model)
        if spec is not None and spec.footprint_bytes is not None:
            return
        specs = {h.name: h for h in self.ops.fleet.hosts}
        for host in hosts:
            if host in specs:
                before = self.memory(self.ops.fleet, specs[host])
                ready = frozenset(view[host].ready) if host in view else frozenset()
                self.footprints.loading(model, host, before, ready, self.clock())

    def act(self, decided: Round) -> list[tuple[Action, HostResult]]:
        """Carry out the round's actions: loads at once per model, then unloads host by host (drained)."""
        fleet = self.ops.fleet
        actions = decided.plan.actions
        if not actions:
            return []
        indexes = read_index(self.ops.triton, fleet.hosts, self.ops.timeouts.index_s)
        done: list[tuple[Action, HostResult]] = []
        for kind in ("load", "unload"):
            for model in sorted({a.model for a in actions if a.kind == kind}):
                chosen = [a for a in actions if a.kind == kind and a.model == model]
                hosts = [a.host for a in chosen]
                if kind == "load":
                    self._measure(model, hosts, decided.view)
                started = self.clock()
                results: list[HostResult] = []
                try:
                    results = self._carry_out(kind, model, hosts, indexes, decided.view)
                finally:
                    # Also when it raised: a load left unmeasured must not wait for its end forever.
                    ended = self.clock()
                    by_host = {r.host: r for r in results}
                    for host in hosts:
                        ok = host in by_host and by_host[host].ok
                        self.footprints.changed(kind, model, host, started, ended, ok)
                tier_of = {h.name: h.tier.value for h in fleet.hosts}
                for host in hosts:
                    self.last_change[(model, tier_of.get(host, ""))] = ended
                for a in chosen:
                    done.append(
                        (a, by_host.get(a.host, HostResult(a.host, False, "not reached (an earlier host failed)")))
                    )
        return done

    def _carry_out(
        self, kind: str, model: str, hosts: list[str], indexes: Any, view: dict[str, PickerHost]
    ) -> list[HostResult]:
        fleet = self.ops.fleet
        if kind == "load":
            load = plan_load(fleet, model, indexes, view, hosts=hosts)
            if load.problems:
                return [HostResult(h, False, "refused: " + "; ".join(load.problems)) for h in hosts]
            return execute_load(self.ops, load)
        roll = plan_roll("unload", fleet, model, indexes, view, hosts=hosts, drain=True)
        if roll.problems:
            return [HostResult(h, False, "refused: " + "; ".join(roll.problems)) for h in hosts]
        return execute_roll(self.ops, roll, drain=True)


def _log_actions(
    decided: Round, outcome: str, window_s: float, done: list[tuple[Action, HostResult]] | None = None
) -> None:
    results = dict((a, r) for a, r in done or [])
    for d in decided.plan.decisions:
        if d.low_for_s is not None and d.low_for_s < window_s and not d.actions:
            log.info(
                "placement_scale_down_waiting",
                model=d.model,
                tier=d.tier,
                demand_rps=None if d.rate_rps is None else round(d.rate_rps, 2),
                capacity_rps=None if d.capacity_rps is None else round(d.capacity_rps, 2),
                current=d.current,
                desired=d.desired,
                low_for_s=round(d.low_for_s, 1),
                window_s=window_s,
                reason=d.reason,
                held=d.held,
            )
        for a in d.actions:
            r = results.get(a)
            log.info(
                "placement_action",
                action=a.kind,
                model=a.model,
                tier=d.tier,
                host=a.host,
                reason=a.reason,
                demand_rps=None if d.rate_rps is None else round(d.rate_rps, 2),
                capacity_rps=None if d.capacity_rps is None else round(d.capacity_rps, 2),
                current=d.current,
                desired=d.desired,
                outcome=outcome if r is None else ("done" if r.ok else "failed"),
                message=None if r is None else r.message,
                seconds=None if r is None else round(r.seconds, 2),
            )


def _reload(path: Path, fleet: Fleet) -> Fleet:
    from extproc.discovery import resolve_pools

    try:
        fresh = load_fleet(path)
    except ConfigError as exc:
        log.warning("placement_config_rejected", error=str(exc))
        return fleet
    return asyncio.run(resolve_pools(fresh))


def _serve_metrics(args: Any, fleet: Fleet, metrics: PlacementMetrics) -> WSGIServer | None:
    """Serve /metrics from a daemon thread, where a port is set; the caller shuts the server down."""
    port = args.metrics_port if args.metrics_port is not None else fleet.placement.metrics_port
    if port is None:
        return None
    # The address and port bind once: a changed setting applies at the next start, as the picker's do.
    server, _ = start_http_server(port, fleet.placement.metrics_address, metrics.registry)
    log.info("placement_metrics", address=fleet.placement.metrics_address, port=port)
    return server


def _count(metrics: PlacementMetrics, decided: Round, outcome: str, done: list[tuple[Action, HostResult]]) -> None:
    results = dict(done)
    for a in decided.plan.actions:
        r = results.get(a)
        metrics.acted(a, outcome if r is None else ("done" if r.ok else "failed"))


def _stoppable_sleep(stopping: threading.Event) -> Callable[[float], None]:
    """A sleep that ends early once ``stopping`` is set."""

    def sleep(seconds: float) -> None:
        stopping.wait(seconds)

    return sleep


def _run_loop(
    args: Any, controller: Controller, metrics: PlacementMetrics, stopping: threading.Event | None = None
) -> int:
    stopping = stopping or threading.Event()
    server = _serve_metrics(args, controller.ops.fleet, metrics)
    # Python's default for SIGTERM ends the process wherever it is; the handlers only ask the loop to stop.
    handled = (signal.SIGTERM, signal.SIGINT) if threading.current_thread() is threading.main_thread() else ()
    before = {sig: signal.signal(sig, lambda *_: stopping.set()) for sig in handled}
    try:
        return _rounds(args, controller, metrics, stopping)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
        if server is not None:
            server.shutdown()
            server.server_close()


def _rounds(args: Any, controller: Controller, metrics: PlacementMetrics, stopping: threading.Event) -> int:
    failed = False
    while not stopping.is_set():
        fleet = controller.ops.fleet
        paused = pause_reason(fleet)
        try:
            if controller.endpoints is not None:
                controller.ops = controller.endpoints(controller.ops)
            decided = controller.decide(args.window)
            if stopping.is_set():
                break  # before acting on a round cut short
            metrics.planned(
                decided.plan,
                decided.hosts,
                fleet.placement,
                paused=args.dry_run or paused is not None,
                at=controller.wall(),
            )
            if args.dry_run or paused is not None:
                outcome = "dry_run" if args.dry_run else "paused"
                _log_actions(decided, outcome, fleet.placement.scale_down_window_s)
                done: list[tuple[Action, HostResult]] = []
            else:
                outcome = "done"
                done = controller.act(decided)
                _log_actions(decided, "done", fleet.placement.scale_down_window_s, done)
            _count(metrics, decided, outcome, done)
            failed = any(not r.ok for _, r in done)
            log.info(
                "placement_round",
                paused=paused,
                dry_run=args.dry_run,
                window_s=round(decided.window_s, 1),
                models=len(decided.plan.decisions),
                actions=len(decided.plan.actions),
                deferred=len(decided.plan.deferred),
                failed=sum(1 for _, r in done if not r.ok),
            )
        except OpsError as exc:
            log.warning("placement_round_failed", error=str(exc))
            failed = True
        metrics.round_ended(not failed)
        if args.once:
            return 1 if failed else 0
        controller.sleep(fleet.placement.interval_s)
        controller.ops = replace(controller.ops, fleet=_reload(args.config, fleet))
    log.info("placement_stopped")
    return 0


def run_cli(args: Any, fleet: Fleet, out: TextIO | None = None) -> int:
    """``extproc placement explain|run``. Exit status: 0 done, 1 an action failed (``run --once``) or a
    picker did not answer, 2 the command could not start."""
    out = out or sys.stdout
    triton = GrpcTriton(read_admin_key(fleet))
    try:
        running = args.placement_command == "run"
        ops = make_ops(
            args,
            fleet,
            triton,
            lambda m: log.debug("placement_progress", message=m),
            drain=running,
            # run looks them up at each round, so that it waits for pickers that are not up yet
            endpoints=not running,
        )
        if running:
            stopping = threading.Event()
            controller = Controller(
                ops,
                endpoints=lambda current: with_endpoints(current, args, drain=True),
                sleep=_stoppable_sleep(stopping),
            )
            return _run_loop(args, controller, PlacementMetrics(), stopping)
        controller = Controller(ops)
        try:
            decided = controller.decide(args.window)
        except OpsError as exc:
            print(f"extproc placement: {exc}", file=sys.stderr)
            return 1
        paused = pause_reason(fleet)
        hosts, result = decided.hosts, decided.plan
        if args.json:
            doc = explain_json(result, hosts, fleet.placement, window_s=decided.window_s, paused=paused)
            out.write(json.dumps(doc, indent=2) + "\n")
        else:
            out.write(format_explain(result, hosts, fleet.placement, window_s=decided.window_s, paused=paused))
        return 0
    except OpsError as exc:
        print(f"extproc placement: {exc}", file=sys.stderr)
        return 2
    finally:
        triton.close()
