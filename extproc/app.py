"""``extproc serve``: the picker process. Wires config → datastore → telemetry → scheduler → gRPC edge; what
runs besides (HTTP endpoint, telemetry collected or received, pool discovery, gRPC server, worker processes)
is the process's role (:mod:`extproc.roles`)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
from pathlib import Path
from typing import Final

import structlog
import uvloop

from extproc.build import compiled
from extproc.config import ConfigError, Fleet, HostSpec, file_stamp, load_fleet
from extproc.datapath.datastore import Datastore
from extproc.datapath.metrics import PickerMetrics
from extproc.datapath.peer_load import PeerLoad, silent_after_s
from extproc.datapath.scheduling.scheduler import Scheduler
from extproc.discovery import Discovery, effective_fleet
from extproc.handlers.server import Processor
from extproc.placement.wake import Waker
from extproc.roles import GRPC_OPTIONS, Role, RoleName, role_for, role_named

__all__ = ["GRPC_OPTIONS", "Picker", "Role", "RoleName", "run", "serve"]

log = structlog.get_logger(__name__)

# Allocations between two young collections (see run).
_GC_YOUNG: Final = 50_000

# How often the picker looks at its fleet file's modification time.
_CONFIG_POLL_S = 1.0


class Picker:
    """One picker process: the fleet it routes over (the file's hosts plus the pools' current hosts), its
    datastore, scheduler, metrics and ext_proc processor, and the parts its role runs (:mod:`extproc.roles`).
    ``single``: the ext_proc gRPC server, its telemetry and its HTTP endpoint (metrics, readiness, status,
    drain). With ``picker.workers > 1`` a ``leader`` keeps the telemetry and the HTTP endpoint and shares the
    telemetry with ``worker`` processes, which serve ext_proc."""

    def __init__(
        self, config: Fleet, role: RoleName | Role = "single", worker: int = 0, discovery: Discovery | None = None
    ) -> None:
        """``config``: the fleet file. ``role``: a :class:`~extproc.roles.Role`, or its name (``worker``: the
        worker's index). ``discovery`` (not for a worker, which learns the pools' hosts from its leader)
        resolves its pools; the picker routes over the file's hosts plus the pools' current hosts."""
        self.role = role_named(role, worker) if isinstance(role, str) else role
        self.config = config
        self.discovery = discovery
        self.discovered = discovery.hosts if discovery is not None else ()
        self.fleet = fleet = effective_fleet(self.config, self.discovered)
        self.datastore = Datastore(fleet)
        self.metrics = PickerMetrics(self.datastore, decisions=self.role.counts_decisions)
        self.metrics.use_discovery(discovery)
        # Set by each Envoy poll of a leader's collector, which its publisher then pushes to the workers.
        self.envoy_polled = asyncio.Event()
        # One for the process's life: a reload keeps picker.workers and picker.share_worker_picks.
        self.shared_picks = self.role.shared_picks(fleet)
        self.metrics.use_shared_picks(self.shared_picks)
        # The other replicas' loads (picker.replicas.share_load, fixed at start like picker.replicas), which
        # the replica channel carries.
        self.peer_load = (
            PeerLoad(self.datastore, silent_after_s(fleet))
            if fleet.picker.replicas.share_load and self.role.holds_replica_channel
            else None
        )
        self.metrics.use_peer_load(self.peer_load)
        self.scheduler = self._scheduler(fleet, self.datastore)
        # Read at start and on reload, not by each collector: a change of the pools' hosts rebuilds the
        # collector, and that must not fail on a key file.
        self.admin_key = self.role.admin_key(config)
        # One switch of fleet at a time: a config reload and a change of the pools' hosts may race.
        self._switching = asyncio.Lock()
        self.processor = Processor(fleet, self.scheduler, self.metrics, Waker(fleet, self.metrics))
        self.workers = self.role.workers(fleet)
        self._parts = self.role.parts(self)
        self.ready = False

    def _scheduler(self, fleet: Fleet, datastore: Datastore) -> Scheduler:
        return Scheduler(
            fleet,
            datastore,
            pick_weight=self.role.pick_weight(fleet),
            shared_picks=self.shared_picks,
            peer_load=self.peer_load,
        )

    def envoy_polled_now(self) -> None:
        """An Envoy poll is in the datastore: a leader's publisher pushes it to the workers, and the other
        replicas that share loads are told its counts."""
        self.envoy_polled.set()
        if self.peer_load is not None:
            self.peer_load.polled()
            self.peer_load.expire(self.datastore.now())

    async def start(self) -> None:
        for part in self._parts:
            await part.start()
        self.ready = True
        log.info(
            "picker_started",
            role=self.role.name,
            listen=self.fleet.picker.listen,
            workers=self.fleet.picker.workers,
            metrics=f"http://{self.fleet.picker.metrics_address}:{self.fleet.picker.metrics_port}/metrics",
            hosts=len(self.fleet.hosts),
            pools=len(self.config.pools),
            compiled=compiled(),
        )

    def is_ready(self) -> bool:
        return self.ready and (self.workers is None or self.workers.ready())

    async def reload(self, fleet: Fleet) -> None:
        """Apply a new fleet file without dropping a request; the pools keep their hosts (see :meth:`_switch`)."""
        fixed = ("listen", "workers", "share_worker_picks", "metrics_address", "metrics_port", "replicas")
        needs_restart = [
            f"picker.{key}" for key in fixed if getattr(fleet.picker, key) != getattr(self.config.picker, key)
        ]
        if needs_restart:
            log.warning("config_reload_needs_restart", keys=needs_restart, note="kept the running values")
            fleet = fleet.model_copy(
                update={"picker": fleet.picker.model_copy(update={k: getattr(self.config.picker, k) for k in fixed})}
            )
        try:
            admin_key = self.role.admin_key(fleet)
        except ConfigError as exc:
            log.warning(
                "config_reload_rejected", problems=str(exc).splitlines(), note="still serving the previous config"
            )
            return
        async with self._switching:
            self.config, self.admin_key = fleet, admin_key
            for part in self._parts:
                await part.reload(fleet)
            await self._switch()
        log.info("config_reloaded", source=fleet.source, hosts=len(self.fleet.hosts), models=len(fleet.models))

    async def rediscovered(self) -> None:
        """The pools' hosts changed (discovery, in a single picker or a leader)."""
        assert self.discovery is not None
        async with self._switching:
            self.discovered = self.discovery.hosts
            await self._switch()

    async def use_discovered(self, hosts: tuple[HostSpec, ...]) -> None:
        """The leader's pools' hosts, with each snapshot (a worker)."""
        if hosts == self.discovered:
            return
        async with self._switching:
            self.discovered = hosts
            await self._switch()

    async def _switch(self) -> None:
        """Route over the current config and discovered hosts: build the new datastore (keeping the live state
        of unchanged hosts), scheduler and telemetry, then switch over between two requests."""
        fleet = effective_fleet(self.config, self.discovered)
        datastore = Datastore(fleet)
        datastore.adopt(self.datastore)
        scheduler = self._scheduler(fleet, datastore)
        self.fleet, self.datastore, self.scheduler = fleet, datastore, scheduler
        if self.peer_load is not None:
            self.peer_load.store = datastore
        self.processor.configure(fleet, scheduler)
        self.metrics.use(datastore)
        for part in self._parts:
            part.switch(fleet, datastore)
        for part in self._parts:
            await part.settle()

    async def stop(self) -> None:
        self.ready = False
        for part in reversed(self._parts):
            await part.stop()
        self.metrics.flush()


async def _watch_config(picker: Picker, path: Path, reload_now: asyncio.Event) -> None:
    """Reload on SIGHUP (``reload_now``) or when the file changes; an invalid file keeps the running config."""
    seen = file_stamp(path)
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(reload_now.wait(), timeout=_CONFIG_POLL_S)
        current = file_stamp(path)
        if not reload_now.is_set() and current == seen:
            continue
        reload_now.clear()
        seen = current
        try:
            fleet = load_fleet(path)
        except ConfigError as exc:
            log.error(
                "config_reload_rejected", problems=str(exc).splitlines(), note="still serving the previous config"
            )
            continue
        await picker.reload(fleet)


async def serve(fleet: Fleet, role: Role, config_path: Path | None = None) -> None:
    """Run the picker until SIGTERM or SIGINT; reload ``config_path`` on SIGHUP or change."""
    discovery = role.discovery(fleet)
    if discovery is not None:
        # Before serving, so the first requests are routed over the pools' hosts too.
        await discovery.refresh_once()
    picker = Picker(fleet, role, discovery=discovery)
    stop, reload_now = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload_now.set)
    if picker.workers is not None:
        # Before our own gRPC clients start threads: forking then makes gRPC skip its fork handlers.
        await picker.workers.start()
    await picker.start()
    # What exists now (modules, config, the first telemetry) lives as long as the process: the collector
    # need never walk it again.
    gc.freeze()
    watcher = asyncio.create_task(_watch_config(picker, config_path, reload_now)) if config_path else None
    try:
        await stop.wait()
    finally:
        log.info("picker_stopping", role=role.name)
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        if picker.workers is not None:
            await picker.workers.stop()
        await picker.stop()


def run(fleet: Fleet, config_path: Path | None = None, worker: int | None = None, log_format: str = "auto") -> None:
    """The ``extproc serve`` process: a single picker, a leader (``picker.workers > 1``), or worker ``worker``."""
    role = role_for(fleet, worker, config_path, log_format)
    sockets = role.sockets(fleet)
    for path in sockets:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A socket file left by a previous run would make bind fail.
        path.unlink(missing_ok=True)
    # Each scrape replaces its host's telemetry, which then lives until the next scrape: at the default
    # threshold (700 allocations) the young collections come often enough to promote it before it dies, and
    # full collections then walk every host's telemetry, holding the event loop meanwhile. Collections every
    # _GC_YOUNG allocations let it die by its reference count first; only cycles need the collector.
    gc.set_threshold(_GC_YOUNG, 10, 10)
    # Only this user (and so the local Envoy) may connect: sockets inherit the umask.
    old_umask = os.umask(0o077)
    try:
        # uvloop: ~20% more ext_proc streams per second than the default loop (facts file).
        uvloop.run(serve(fleet, role, config_path))
    finally:
        os.umask(old_umask)
        for path in sockets:
            path.unlink(missing_ok=True)
