"""Executing ``extproc models`` plans through the small client interfaces (:class:`TritonApi`,
:class:`~extproc.ops.status.PickerApi` and :class:`~extproc.ops.status.EnvoyApi`), reporting progress.

Unloading a model from a host that serves requests for it must not fail any of them. The picker can only
drain a whole host, so each host is taken out one at a time: drain it in every picker, wait until no
request is in flight to it (the pickers' counts and, where reachable, Envoy's live ``rq_active``), unload
(and for a reload, load again and wait until the pickers see it READY), wait until every picker's view
matches Triton's, then undrain.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from extproc.config import Fleet, HostSpec
from extproc.ops import OpsError
from extproc.ops.plans import (
    LoadPlan,
    RollPlan,
    Target,
    merged_view,
    others_serving,
    picker_statuses,
    unroutable_reason,
)
from extproc.ops.status import EnvoyApi, PickerApi, envoy_hosts
from extproc.ops.triton_api import READY, UNKNOWN, UNLOADING, HostIndex, TritonApi

__all__ = ["HostResult", "Ops", "Timeouts", "execute_load", "execute_roll"]

# --- operations context ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Timeouts:
    index_s: float = 5.0  # one repository index call
    load_s: float = 300.0  # one load (Triton returns when the model is READY)
    unload_s: float = 120.0  # one unload call, and then until the model has left UNLOADING
    drain_s: float = 60.0  # until no request is in flight to a drained host
    picker_s: float = 30.0  # until every picker's view matches Triton's (READY or gone)
    settle_s: float = 1.0  # after draining, before in-flight counts are trusted (picks already made land)
    poll_s: float = 0.2  # between two looks while waiting
    quiet_reads: int = 2  # consecutive looks with nothing in flight before unloading


@dataclass
class Ops:
    """What the executors act through. ``clock`` and ``sleep`` are injectable so tests run instantly."""

    fleet: Fleet
    triton: TritonApi
    pickers: Sequence[PickerApi] = ()
    envoys: Sequence[EnvoyApi] = ()
    timeouts: Timeouts = field(default_factory=Timeouts)
    progress: Callable[[str], None] = lambda _: None
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep


# --- executors ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HostResult:
    host: str
    ok: bool
    message: str
    seconds: float = 0.0


def _wait(ops: Ops, timeout_s: float, check: Callable[[], str | None], what: str) -> float:
    """Poll ``check`` (None: done; a string: what is still missing) until done or ``timeout_s``."""
    start = ops.clock()
    while True:
        missing = check()
        if missing is None:
            return ops.clock() - start
        if ops.clock() - start >= timeout_s:
            raise OpsError(f"{what}: still {missing} after {timeout_s:g} s")
        ops.sleep(ops.timeouts.poll_s)


def _picker_sees(ops: Ops, host: str, model: str, ready: bool) -> Callable[[], str | None]:
    """A check: every picker sees ``model`` READY on ``host`` (fresh), or no longer READY."""

    def check() -> str | None:
        for picker in ops.pickers:
            try:
                view = picker.status().hosts.get(host)
            except OpsError as exc:
                return f"no answer from {picker.url} ({exc})"
            if view is None:
                return f"{host} unknown to {picker.url}"
            listed = model in view.ready
            if ready and not (listed and view.fresh):
                return f"not READY in {picker.url}" + ("" if view.fresh else " (stale)")
            if not ready and listed and view.fresh:
                return f"READY in {picker.url}"
        return None

    return check


def _triton_state(ops: Ops, host: HostSpec, model: str) -> str:
    try:
        return HostIndex(host, tuple(ops.triton.index(host, ops.timeouts.index_s))).state(model)
    except OpsError:
        return UNKNOWN


def _triton_left(ops: Ops, host: HostSpec, model: str) -> Callable[[], str | None]:
    """A check: Triton no longer has ``model`` READY or UNLOADING on ``host``."""

    def check() -> str | None:
        state = _triton_state(ops, host, model)
        return state if state in {READY, UNLOADING, UNKNOWN} else None

    return check


def _in_flight(ops: Ops, host: HostSpec) -> str | None:
    """None when no picker and no reachable Envoy has a request in flight to ``host``."""
    for picker in ops.pickers:
        try:
            view = picker.status().hosts.get(host.name)
        except OpsError as exc:
            return f"no answer from {picker.url} ({exc})"
        if view is not None and (view.in_flight > 0 or view.pending > 0):
            return f"{view.in_flight:g} in flight, {view.pending} queued per {picker.url}"
    for envoy in ops.envoys:
        try:
            seen = envoy_hosts([host], envoy.endpoints())[host.name]
        except OpsError:
            continue  # Envoy's admin is a second opinion; the pickers' counts include its rq_active
        if seen.active:
            return f"{seen.active} in flight per Envoy {envoy.url}"
    return None


def _wait_quiet(ops: Ops, host: HostSpec) -> float:
    """After a drain: let picks already made reach Envoy, then wait for ``quiet_reads`` quiet looks in a row."""
    start = ops.clock()
    ops.sleep(ops.timeouts.settle_s)
    quiet = 0

    def check() -> str | None:
        nonlocal quiet
        busy = _in_flight(ops, host)
        quiet = 0 if busy is not None else quiet + 1
        if busy is not None:
            return busy
        return None if quiet >= ops.timeouts.quiet_reads else "settling"

    _wait(ops, ops.timeouts.drain_s, check, f"{host.name}: waiting for in-flight requests to finish")
    return ops.clock() - start


class _Drain:
    """Drain one host in every picker; restore only what this operation changed."""

    def __init__(self, ops: Ops, host: HostSpec) -> None:
        self.ops = ops
        self.host = host
        self.drained: list[PickerApi] = []
        self.already: list[str] = []

    def start(self) -> None:
        for picker in self.ops.pickers:
            view = picker.status().hosts.get(self.host.name)
            if view is None:
                raise OpsError(f"{self.host.name}: not a host of the picker at {picker.url}")
            if view.draining:
                self.already.append(picker.url)
                continue
            if not picker.drain(self.host.name):
                raise OpsError(f"{self.host.name}: the picker at {picker.url} did not drain it")
            self.drained.append(picker)

    def undrain(self) -> list[str]:
        """Undrain where we drained; returns the failures."""
        failures = []
        for picker in self.drained:
            try:
                picker.undrain(self.host.name)
            except OpsError as exc:
                failures.append(str(exc))
        self.drained = []
        return failures


def _finish_host(ops: Ops, host: HostSpec, model: str, drain: _Drain, *, expect_ready: bool | None) -> str | None:
    """Undrain once that is safe: no picker may still list the model READY where Triton does not have it.

    ``expect_ready``: what Triton should show now (None: ask Triton). Returns a problem, or None.
    """
    if not drain.drained:
        return None
    if expect_ready is None:
        expect_ready = _triton_state(ops, host, model) == READY
    if not expect_ready:
        try:
            _wait(ops, ops.timeouts.picker_s, _picker_sees(ops, host.name, model, ready=False), f"{host.name}")
        except OpsError as exc:
            drain.drained = []  # leave it drained: never undrain while a picker may still route there
            return (
                f"{exc}; left {host.name} drained so no request reaches it for {model}: undrain it with "
                f"`curl -X POST {ops.pickers[0].url}/hosts/{host.name}/undrain` once the picker has caught up"
            )
    failures = drain.undrain()
    return "; ".join(failures) or None


def _stranded_now(ops: Ops, plan: RollPlan, host: HostSpec, gone: set[str]) -> list[str]:
    """Models on ``host`` that no other routable host would serve if it were drained now (live views)."""
    view = merged_view(picker_statuses(ops.pickers))
    me = view.get(host.name)
    if me is None or not me.routable:
        return []
    return [
        m for m in sorted(me.ready) if not others_serving(ops.fleet, m, host, view, gone if m == plan.model else set())
    ]


def execute_roll(ops: Ops, plan: RollPlan, *, drain: bool = True, force: bool = False) -> list[HostResult]:
    """Carry out an unload or reload plan host by host; stops at the first host that fails.

    Before each drain the pickers' live views are checked again: a host that became the only routable home
    of one of its models since the plan was made stops the operation (unless ``force``).
    """
    results: list[HostResult] = []
    total = len(plan.steps)
    gone: set[str] = set()
    for i, step in enumerate(plan.steps, 1):
        host = step.host
        prefix = f"[{i}/{total}] {host.name}: "
        start = ops.clock()
        handle = _Drain(ops, host)
        triton_ready: bool | None = True  # whether Triton has the model READY now; None: not sure
        try:
            if drain:
                stranded = _stranded_now(ops, plan, host, gone)
                if stranded and not force:
                    raise OpsError(
                        f"draining it now would leave {', '.join(stranded)} with no routable host (--force to go on)"
                    )
                handle.start()
                if handle.already:
                    ops.progress(prefix + f"already draining in {', '.join(handle.already)}; left drained")
                ops.progress(prefix + f"draining in {len(handle.drained)} picker(s), waiting for in-flight requests")
                waited = _wait_quiet(ops, host)
                ops.progress(prefix + f"nothing in flight ({waited:.1f} s)")
            ops.progress(prefix + f"unloading {plan.model}")
            triton_ready = None
            ops.triton.unload(host, plan.model, ops.timeouts.unload_s)
            _wait(
                ops,
                ops.timeouts.unload_s,
                _triton_left(ops, host, plan.model),
                f"{host.name}: unloading {plan.model}",
            )
            triton_ready = False
            ops.progress(prefix + f"unloaded {plan.model}")
            if plan.action == "reload":
                ops.progress(prefix + f"loading {plan.model}")
                triton_ready = None
                ops.triton.load(host, plan.model, ops.timeouts.load_s)
                index = HostIndex(host, tuple(ops.triton.index(host, ops.timeouts.index_s)))
                if index.state(plan.model) != READY:
                    raise OpsError(
                        f"{plan.model} is {index.state(plan.model)} after loading {index.reason(plan.model)}"
                    )
                triton_ready = True
                if ops.pickers:
                    waited = _wait(
                        ops,
                        ops.timeouts.picker_s,
                        _picker_sees(ops, host.name, plan.model, ready=True),
                        f"waiting for the picker to see {plan.model} READY",
                    )
                    ops.progress(prefix + f"{plan.model} READY in the picker ({waited:.1f} s)")
                else:
                    ops.progress(prefix + f"{plan.model} READY")
            elif drain:
                ops.progress(prefix + "waiting for the picker to see it gone")
            undrained = bool(handle.drained)
            problem = _finish_host(ops, host, plan.model, handle, expect_ready=triton_ready)
            if problem is not None:
                raise OpsError(problem)
            if undrained and i < total:
                # Never take the next host out before this one is back in every picker.
                _wait(ops, ops.timeouts.picker_s, _routable(ops, host.name), "waiting until it is routable again")
            elapsed = ops.clock() - start
            ops.progress(prefix + ("undrained, done" if undrained else "done") + f" ({elapsed:.1f} s)")
            results.append(HostResult(host.name, True, f"{plan.action}ed", elapsed))
            if plan.action == "unload":
                gone.add(host.name)
        except (OpsError, KeyboardInterrupt) as exc:
            message = str(exc) or "interrupted"
            had_drained = bool(handle.drained)
            try:
                problem = _finish_host(ops, host, plan.model, handle, expect_ready=triton_ready)
            except OpsError as again:
                problem = str(again)
            if problem is not None:
                message += f"; {problem}"
            elif had_drained:
                message += " (undrained)"
            ops.progress(prefix + f"FAILED: {message}")
            results.append(HostResult(host.name, False, message, ops.clock() - start))
            if isinstance(exc, KeyboardInterrupt):
                raise
            break
    return results


def _routable(ops: Ops, host: str) -> Callable[[], str | None]:
    def check() -> str | None:
        for picker in ops.pickers:
            try:
                view = picker.status().hosts.get(host)
            except OpsError as exc:
                return f"no answer from {picker.url} ({exc})"
            reason = unroutable_reason(view)
            if reason is not None:
                return f"{reason} in {picker.url}"
        return None

    return check


def execute_load(ops: Ops, plan: LoadPlan, *, wait_picker: bool = True) -> list[HostResult]:
    """Load on every target at once; then wait until every picker sees the model READY there."""
    if not plan.targets:
        return []

    def one(target: Target) -> HostResult:
        host = target.host
        start = ops.clock()
        ops.progress(f"{host.name}: loading {plan.model}")
        try:
            ops.triton.load(host, plan.model, ops.timeouts.load_s)
            state = _triton_state(ops, host, plan.model)
            if state not in {READY, UNKNOWN}:
                raise OpsError(f"{host.name}: {plan.model} is {state} after loading")
        except OpsError as exc:
            ops.progress(f"{host.name}: FAILED: {exc}")
            return HostResult(host.name, False, str(exc), ops.clock() - start)
        ops.progress(f"{host.name}: {plan.model} READY in Triton ({ops.clock() - start:.1f} s)")
        return HostResult(host.name, True, "loaded", ops.clock() - start)

    with ThreadPoolExecutor(max_workers=min(8, len(plan.targets))) as pool:
        results = list(pool.map(one, plan.targets))
    if wait_picker and ops.pickers:
        for i, result in enumerate(results):
            if not result.ok:
                continue
            try:
                waited = _wait(
                    ops,
                    ops.timeouts.picker_s,
                    _picker_sees(ops, result.host, plan.model, ready=True),
                    f"{result.host}: waiting for the picker to see {plan.model} READY",
                )
            except OpsError as exc:
                ops.progress(f"{result.host}: {exc}")
                results[i] = HostResult(result.host, False, str(exc), result.seconds)
                continue
            ops.progress(f"{result.host}: READY in the picker ({waited:.1f} s)")
    return results
