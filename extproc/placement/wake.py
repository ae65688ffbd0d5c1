"""Scale from zero (``placement.scale_from_zero``): a request for a managed model that no host has READY
makes the picker that sees it load the model.

Why in the picker and not only in ``extproc placement run``: the controller looks every ``interval_s`` and
needs two looks to measure demand, so a model with no copy would wait for it for tens of seconds; the
picker sees the first request. It chooses the host as the controller would (:func:`plan` over the same
inputs: the model's tiers and labels, memory budgets, the most headroom first), loads through Triton's
repository API with the fleet's admin key, and starts one load per model however many requests ask. The
model is then READY in the picker's next repository poll; Triton runs a model's ``model_warmup`` before it
reports it READY, so the first request routed there does not pay for the warm-up.

Only models listed in ``placement.models`` are loaded so: a client can make the fleet load what the
operator chose to manage, and nothing else of the repositories.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

import structlog

from extproc.admin_key import read_admin_key
from extproc.config import Fleet, HostSpec
from extproc.datapath.datastore import Datastore, routable
from extproc.datapath.metrics import PickerMetrics
from extproc.ops.status import parse_picker_status
from extproc.parts import cancel
from extproc.placement.inputs import build_inputs
from extproc.placement.plan import HostInput, ModelInput, home_tier, plan
from extproc.telemetry.repository import RepositoryClient
from extproc.telemetry.tls import read_triton_tls

__all__ = ["Loader", "Waker", "Waking", "load_from_repository"]

log = structlog.get_logger(__name__)

# How often a model's held requests are looked at: whether a host has it READY yet (the repository poll
# writes it).
_POLL_S: Final = 0.05

# Loads ``model`` on a host of the fleet; raises on failure (after at most the timeout, in seconds).
Loader = Callable[[Fleet, HostSpec, str, float], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Waking:
    """A load under way, just done or just failed: where, since when."""

    host: str
    started: float
    done_at: float | None = None
    failed_at: float | None = None


class Waker:
    """The picker's scale-from-zero loads: at most one per model at a time."""

    def __init__(self, fleet: Fleet, metrics: PickerMetrics | None = None, loader: Loader | None = None) -> None:
        """``metrics``: where loads are counted; ``loader``: how to load (default: :func:`load_from_repository`)."""
        self._fleet = fleet
        self._metrics = metrics
        self._loader = loader or load_from_repository
        self._loads: dict[str, Waking] = {}
        # model → set when a held request may stop waiting (see ready)
        self._watched: dict[str, asyncio.Event] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def configure(self, fleet: Fleet) -> None:
        """Use a new fleet from the next request on (config reload); loads in progress go on."""
        self._fleet = fleet

    @property
    def mode(self) -> str:
        return self._fleet.placement.scale_from_zero.mode

    @property
    def hold_s(self) -> float:
        return self._fleet.placement.scale_from_zero.hold_ms / 1000

    def wake(self, model: str, datastore: Datastore) -> Waking | None:
        """Start loading ``model`` if it is managed, no host has it READY and no load of it is under way or
        just failed; the load under way (new or not), or None where nothing will make the model READY."""
        settings = self._fleet.placement.scale_from_zero
        if settings.mode == "off" or model not in self._fleet.placement.models or datastore.tiers_serving(model, None):
            return None
        now = time.monotonic()
        current = self._loads.get(model)
        if current is not None:
            if current.failed_at is not None:
                if now - current.failed_at < settings.retry_after_failure_s:
                    return None
            elif current.done_at is None or now - current.done_at < self._index_lag_s():
                # Loaded, but not READY in the picker's view until a repository poll sees it: loading it
                # again would make Triton reload a model it just loaded.
                return current
        host = self._choose(model, datastore)
        if host is None:
            return None
        waking = Waking(host.name, now)
        self._loads[model] = waking
        self._start(self._load(model, host, settings.load_timeout_s), f"scale-from-zero-{model}")
        log.info("scale_from_zero_load", model=model, host=host.name)
        self._count(model, "started")
        return waking

    def _index_lag_s(self) -> float:
        """How long after a load the picker's repository poll may take to see it (three polls)."""
        return 3 * self._fleet.picker.poll.repository_ms / 1000

    async def ready(self, model: str, datastore: Callable[[], Datastore], timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for a routable host to have ``model`` READY (``datastore``: the picker's
        current one, which a config reload replaces) or for its load to fail; whether one has. (A host just
        done loading may not be routable for a moment: its metrics scrape may have timed out meanwhile.)
        However many requests wait, one task per model looks."""
        if _served(datastore(), model):
            return True
        event = self._watched.get(model)
        if event is None:
            event = self._watched[model] = asyncio.Event()
            self._start(self._watch(model, datastore, event), f"scale-from-zero-watch-{model}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout_s)
        return _served(datastore(), model)

    async def _watch(self, model: str, datastore: Callable[[], Datastore], event: asyncio.Event) -> None:
        """Set ``event`` once a routable host has ``model`` READY, or its load failed or is over and the
        picker's view had time to show it."""
        try:
            while not _served(datastore(), model):
                waking = self._loads.get(model)
                if waking is None or waking.failed_at is not None:
                    return
                if waking.done_at is not None and time.monotonic() - waking.done_at > self._index_lag_s():
                    return
                await asyncio.sleep(_POLL_S)
        finally:
            event.set()
            self._watched.pop(model, None)

    def _start(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _choose(self, model: str, datastore: Datastore) -> HostSpec | None:
        """The host the placement controller would load ``model`` on now, or None (logged) where none can
        take it: none of its tiers and labels holds it in its repository and is routable, or memory is full."""
        view = parse_picker_status({"ready": True, "hosts": datastore.status()}).hosts
        models, hosts = build_inputs(self._fleet, view, [], {model: 1.0}, now_unix=time.time())
        wanted = [m for m in models if m.name == model]
        held: list[str] = []
        # Its default tier first; where that has no room, each of its other tiers in turn, as its requests
        # would spill there.
        tried = [*wanted, *(replace(w, tiers=(t,)) for w in wanted for t in _other_tiers(w, hosts))]
        for m in tried:
            decided = plan([m], hosts, self._fleet.placement, time.time())
            loads = [a for a in decided.actions if a.kind == "load"]
            if loads:
                return next(h for h in self._fleet.hosts if h.name == loads[0].host)
            held += [d.held for d in decided.decisions if d.held]
        log.warning("scale_from_zero_no_host", model=model, reason=held[0] if held else "no host can load it")
        return None

    async def _load(self, model: str, host: HostSpec, timeout_s: float) -> None:
        started = time.monotonic()
        try:
            await self._loader(self._fleet, host, model, timeout_s)
        except Exception as exc:  # any failure of the host or the network is the load's outcome, logged
            self._loads[model] = Waking(host.name, started, failed_at=time.monotonic())
            error = f"{type(exc).__name__}: {exc}"[:300]
            log.warning("scale_from_zero_load_failed", model=model, host=host.name, error=error)
            self._count(model, "failed")
            return
        # Done: the next repository poll shows the copy; a later unload and request wake it again.
        self._loads[model] = Waking(host.name, started, done_at=time.monotonic())
        log.info("scale_from_zero_loaded", model=model, host=host.name, seconds=round(time.monotonic() - started, 2))
        self._count(model, "done")

    def _count(self, model: str, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.scale_from_zero.labels(model, outcome).inc()

    async def aclose(self) -> None:
        for task in list(self._tasks):
            await cancel(task)


async def load_from_repository(fleet: Fleet, host: HostSpec, model: str, timeout_s: float) -> None:
    """Load through the host's gRPC repository API with the fleet's admin key (and TLS where the hosts speak
    it), read now: a worker process, which never talks to the hosts otherwise, holds neither. On a channel
    of its own: loads are rare."""
    client = RepositoryClient(host.grpc_endpoint, read_admin_key(fleet), read_triton_tls(fleet))
    try:
        await client.load(model, timeout_s)
    finally:
        await client.aclose()


def _served(store: Datastore, model: str) -> bool:
    now = store.now()
    return any(model in h.ready and routable(h, now, store.stale_after_s) for h in store.hosts.values())


def _other_tiers(m: ModelInput, hosts: Sequence[HostInput]) -> list[str]:
    """The tiers ``m`` may run on besides its home tier: its other allowed tiers, or (any tier allowed) those
    of the hosts that have it in their repository."""
    home = home_tier(m, hosts)
    tiers = m.tiers[1:] if m.tiers else sorted({h.tier for h in hosts if m.name in h.available})
    return [t for t in tiers if t != home]
