"""The picker process's three roles, each one composition of the parts it runs.

- :class:`Single` (``picker.workers: 1``): the HTTP endpoint, telemetry collected from the hosts, discovery
  of the pools and the ext_proc gRPC server.
- :class:`Leader` (``picker.workers > 1``): the HTTP endpoint, the telemetry and the discovery, shared with
  its worker processes (:class:`WorkerPool`), which serve ext_proc; its own metrics leave the decisions to them.

A single picker or a leader also publishes its telemetry to other picker replicas, or follows another
replica's (``picker.replicas``, :mod:`extproc.replicas`); a leader that follows shares what it follows with
its workers.
- :class:`Worker`: the ext_proc gRPC server on its own listen address, routing on the leader's telemetry
  (and the pools' hosts it discovered); its decisions go to the multiprocess directory the leader reads.

:class:`~extproc.app.Picker` runs whatever parts its role gives it (:class:`Part`: start in order, react to
a reload and a switch of fleet, stop in reverse order); it never asks which role it has.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal, Protocol

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from extproc.admin_key import read_admin_key
from extproc.config import ConfigError, Fleet
from extproc.control import AUTHORIZATION, SCHEME, authorized, read_control_token
from extproc.datapath.datastore import BEAT_S, Datastore
from extproc.datapath.shared_picks import LEADER_READ_S, RelayReads, SharedPicks, rows
from extproc.discovery import Discovery
from extproc.edges import GRPC_OPTIONS, edges, epp_certificate
from extproc.parts import Part, cancel
from extproc.replicas import ReplicaFollower, ReplicaPublisher, read_replica_token
from extproc.sharing import Publisher, Subscriber
from extproc.telemetry.collector import TelemetryCollector
from extproc.telemetry.tls import read_triton_tls

if TYPE_CHECKING:
    from extproc.app import Picker

__all__ = [
    "GRPC_OPTIONS",
    "Leader",
    "Part",
    "Role",
    "RoleName",
    "Single",
    "Worker",
    "WorkerPool",
    "cancel",
    "make_worker_picks",
    "role_for",
    "role_named",
    "worker_picks_path",
]

log = structlog.get_logger(__name__)

RoleName = Literal["single", "leader", "worker"]

# How long a new worker waits for the leader's first telemetry before serving (on empty data: 503s).
_FIRST_SNAPSHOT_S = 10.0
# How often a worker adds its decisions to the multiprocess directory the leader's /metrics reads.
_WORKER_METRICS_FLUSH_S = 1.0
# --- parts -------------------------------------------------------------------------------------------------


class _Http(Part):
    """The HTTP endpoint: metrics (with the workers' decisions), readiness, status, drain and undrain."""

    def __init__(self, picker: Picker) -> None:
        self._picker = picker
        self._web: web.AppRunner | None = None
        # A bad token file refuses the start, as a bad admin key file does, before anything listens.
        read_control_token(picker.config)
        # Where it binds: a reload keeps the address, so this holds for the process's life.
        self._on_loopback = picker.config.picker.metrics_on_loopback

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics_page)
        app.router.add_get("/ready", self._ready_page)
        app.router.add_get("/status", self._status_page)
        app.router.add_post("/hosts/{name}/drain", self._drain)
        app.router.add_post("/hosts/{name}/undrain", self._drain)
        self._web = web.AppRunner(app, access_log=None)
        await self._web.setup()
        picker = self._picker.fleet.picker
        await web.TCPSite(self._web, picker.metrics_address, picker.metrics_port).start()

    async def stop(self) -> None:
        if self._web is not None:
            await self._web.cleanup()

    async def _metrics_page(self, _: web.Request) -> web.Response:
        self._picker.metrics.flush()
        body = generate_latest(self._picker.metrics.registry)
        if self._picker.workers is not None:
            body += self._picker.workers.metrics()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _ready_page(self, _: web.Request) -> web.Response:
        ready = self._picker.is_ready()
        return web.Response(status=200 if ready else 503, text="ready\n" if ready else "starting\n")

    async def _status_page(self, _: web.Request) -> web.Response:
        return web.json_response({"ready": self._picker.is_ready(), "hosts": self._picker.datastore.status()})

    async def _drain(self, request: web.Request) -> web.Response:
        """Stop (or resume) sending new requests to a host; sequences pinned there move. Workers learn it
        from the next snapshot."""
        refused = self._refuse(request)
        if refused is not None:
            return refused
        name = request.match_info["name"]
        datastore = self._picker.datastore
        host = datastore.hosts.get(name)
        if host is None:
            return web.json_response({"error": f"no host named {name!r} in this fleet"}, status=404)
        datastore.set_draining(host, request.path.endswith("/drain"))
        log.info("host_draining" if host.draining else "host_undrained", host=name)
        return web.json_response({"host": name, "draining": host.draining})

    def _refuse(self, request: web.Request) -> web.Response | None:
        """Why a state-changing call is refused (see :mod:`extproc.control`), or None to go ahead."""
        try:
            token = read_control_token(self._picker.config)
        except ConfigError as exc:
            # Fail closed: the file was valid at start, so it went missing or bad since (a broken rotation).
            log.error("control_token_unreadable", problem=str(exc))
            return web.json_response({"error": "the picker cannot read its control token"}, status=503)
        if token is None:
            if self._on_loopback:
                return None
            # A reload dropped control_token_file while the endpoint still listens beyond loopback.
            return web.json_response(
                {"error": "this picker listens beyond loopback and its fleet file names no picker.control_token_file"},
                status=403,
            )
        if authorized(request.headers.get(AUTHORIZATION), token):
            return None
        log.warning("control_unauthorized", path=request.path, peer=request.remote)
        return web.json_response(
            {"error": "needs Authorization: Bearer <the token in picker.control_token_file>"},
            status=401,
            headers={"WWW-Authenticate": SCHEME},
        )


class _Collecting(Part):
    """Telemetry collected from the hosts; rebuilt on each switch of fleet (with the current admin key)."""

    def __init__(self, picker: Picker, scraping: bool = True) -> None:
        """``scraping`` off: Envoy alone is polled (a follower replica, until :meth:`scrape`)."""
        self._picker = picker
        # Read here and on reload, as the admin key is: a change of the pools' hosts rebuilds the collector
        # and must not fail on a file. A bad file refuses the start.
        self._tls = read_triton_tls(picker.config)
        self._collector = self._new(picker.fleet, picker.datastore, scraping)
        self._task: asyncio.Task[None] | None = None
        self._retiring: list[tuple[TelemetryCollector, asyncio.Task[None] | None]] = []

    def _new(self, fleet: Fleet, datastore: Datastore, scraping: bool) -> TelemetryCollector:
        return TelemetryCollector(
            fleet,
            datastore,
            admin_key=self._picker.admin_key,
            tls=self._tls,
            scraping=scraping,
            on_envoy_poll=self._picker.envoy_polled_now,
        )

    async def start(self) -> None:
        await self._collector.refresh_once()
        self._task = asyncio.create_task(self._collector.run(), name="telemetry")

    async def reload(self, config: Fleet) -> None:
        try:
            self._tls = read_triton_tls(config)
        except ConfigError as exc:
            log.error("telemetry_tls_unreadable", problem=str(exc), note="scraping with the previous TLS files")

    async def scrape(self, scraping: bool) -> None:
        """Start (at once: a round of every poll) or stop scraping the hosts; Envoy is polled throughout."""
        self._collector.set_scraping(scraping)
        if scraping:
            await self._collector.refresh_once()

    def switch(self, fleet: Fleet, datastore: Datastore) -> None:
        self._retiring.append((self._collector, self._task))
        self._collector = self._new(fleet, datastore, self._collector.scraping)
        self._task = asyncio.create_task(self._collector.run(), name="telemetry")

    async def settle(self) -> None:
        while self._retiring:
            collector, task = self._retiring.pop(0)
            await cancel(task)
            await collector.aclose()

    async def stop(self) -> None:
        await self.settle()
        await cancel(self._task)
        await self._collector.aclose()


class _Publishing(Part):
    """The leader's telemetry (and the pools' hosts) pushed to its workers."""

    def __init__(self, picker: Picker) -> None:
        self._publisher = Publisher(
            picker.datastore, _share(picker.fleet), picker.discovered, picker.envoy_polled, picker.peer_load
        )
        self._picker = picker

    async def start(self) -> None:
        await self._publisher.start()

    def switch(self, fleet: Fleet, datastore: Datastore) -> None:
        self._publisher.datastore, self._publisher.discovered = datastore, self._picker.discovered

    async def stop(self) -> None:
        await self._publisher.stop()


class _RelayingWorkerPicks(Part):
    """A leader's part of ``picker.replicas.share_load``: the other replicas' picks written where its workers
    read each other's, and its workers' picks told to the other replicas (see
    :mod:`extproc.datapath.shared_picks`)."""

    def __init__(self, picker: Picker) -> None:
        assert picker.peer_load is not None
        self._peer_load = picker.peer_load
        self._fleet = picker.fleet
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        fleet = self._fleet
        picks = map_worker_picks(fleet, fleet.picker.workers, "the workers' and the other replicas' picks not relayed")
        if picks is None:
            return
        self._peer_load.on_pick = picks.append
        self._task = asyncio.create_task(self._tell_forever(picks), name="worker-picks-to-replicas")

    async def _tell_forever(self, picks: SharedPicks) -> None:
        loop = asyncio.get_running_loop()
        reads = RelayReads(picks, self._peer_load.picked_keys, loop.time())
        wait_s = LEADER_READ_S
        while True:
            await asyncio.sleep(wait_s)
            wait_s = reads.read(loop.time())

    async def stop(self) -> None:
        self._peer_load.on_pick = None
        await cancel(self._task)


class _Subscribing(Part):
    """A worker's telemetry: the leader's snapshots, waited for (a while) before serving."""

    def __init__(self, picker: Picker) -> None:
        self._subscriber = Subscriber(
            picker.datastore, _share(picker.fleet), picker.use_discovered, picker.shared_picks
        )
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._subscriber.run(), name="telemetry-subscriber")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._subscriber.received.wait(), timeout=_FIRST_SNAPSHOT_S)

    def switch(self, fleet: Fleet, datastore: Datastore) -> None:
        self._subscriber.datastore = datastore

    async def stop(self) -> None:
        await cancel(self._task)


class _PublishingToReplicas(Part):
    """This replica's telemetry pushed, over TCP, to the picker replicas that follow it
    (``picker.replicas.publish``)."""

    def __init__(self, picker: Picker, address: str, secret: bytes) -> None:
        relay = picker.fleet.picker.replicas.relay_loads
        self._publisher = ReplicaPublisher(picker.datastore, address, secret, picker.peer_load, relay)

    async def start(self) -> None:
        await self._publisher.start()

    def switch(self, fleet: Fleet, datastore: Datastore) -> None:
        self._publisher.datastore = datastore

    async def stop(self) -> None:
        await self._publisher.stop()


class _FollowingReplica(Part):
    """The hosts' telemetry taken from the replica this one follows (``picker.replicas.follow``), its own
    Envoy polled meanwhile; scraping the hosts itself while that replica is silent."""

    def __init__(self, picker: Picker, collecting: _Collecting, address: str, secret: bytes) -> None:
        replicas = picker.fleet.picker.replicas
        self._takeover_s = replicas.takeover_after_ms / 1000
        self._collecting = collecting
        self._metrics = picker.metrics
        self._follower = ReplicaFollower(
            picker.datastore, address, secret, self._takeover_s, self._following, picker.peer_load
        )
        self._task: asyncio.Task[None] | None = None
        self._metrics.following(True)

    async def _following(self, following: bool) -> None:
        self._metrics.following(following)
        await self._collecting.scrape(not following)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._follower.run(), name="replica-follower")
        # The first snapshot, or the takeover (whose scrapes then filled the datastore), before serving.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._follower.received.wait(), timeout=self._takeover_s + _FIRST_SNAPSHOT_S)

    def switch(self, fleet: Fleet, datastore: Datastore) -> None:
        self._follower.datastore = datastore

    async def stop(self) -> None:
        await cancel(self._task)


def _telemetry(picker: Picker) -> list[Part]:
    """The telemetry parts of a process that talks to the hosts (single, leader): collected, and published
    to or followed from other replicas where ``picker.replicas`` says so."""
    replicas = picker.fleet.picker.replicas
    # A bad token file refuses the start, naming the file, before anything listens.
    secret = read_replica_token(picker.config)
    if secret is None:
        return [_Collecting(picker)]
    if replicas.follow is not None:
        collecting = _Collecting(picker, scraping=False)
        return [collecting, _FollowingReplica(picker, collecting, replicas.follow, secret)]
    assert replicas.publish is not None
    return [_Collecting(picker), _PublishingToReplicas(picker, replicas.publish, secret)]


def _share(fleet: Fleet) -> Path:
    return Path(fleet.runtime_dir) / "telemetry.sock"


class _Discovering(Part):
    """The pools re-resolved in the background (the picker switches fleet when their hosts change); a new
    fleet file brings a new :class:`~extproc.discovery.Discovery`, whose pools keep their hosts meanwhile."""

    def __init__(self, picker: Picker) -> None:
        self._picker = picker
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        discovery = self._picker.discovery
        if discovery is not None:
            self._task = asyncio.create_task(discovery.run(self._picker.rediscovered), name="discovery")

    async def reload(self, config: Fleet) -> None:
        picker = self._picker
        await cancel(self._task)
        self._task = None
        picker.discovery = Discovery(config, picker.discovery) if config.pools else None
        picker.metrics.use_discovery(picker.discovery)
        picker.discovered = picker.discovery.hosts if picker.discovery is not None else ()
        await self.start()

    async def stop(self) -> None:
        await cancel(self._task)


class _Periodic(Part):
    """Calls ``tick`` every ``interval_s`` while the process serves."""

    def __init__(self, name: str, interval_s: float, tick: Callable[[], None]) -> None:
        self._name = name
        self._interval_s = interval_s
        self._tick = tick
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self._name)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            self._tick()

    async def stop(self) -> None:
        await cancel(self._task)


def _flushing_metrics(picker: Picker) -> Part:
    """A worker's decisions, added to the multiprocess directory the leader's ``/metrics`` reads."""
    return _Periodic("metrics-flush", _WORKER_METRICS_FLUSH_S, lambda: picker.metrics.flush())


def _beating(picker: Picker) -> Part:
    """A process that decides beats (:meth:`~extproc.datapath.datastore.Datastore.beat`), so that the time
    it spends not running is not taken for hosts that stopped answering. The current fleet's datastore,
    after a reload too."""
    return _Periodic("beat", BEAT_S, lambda: picker.metrics.beat(picker.datastore))


# --- roles -------------------------------------------------------------------------------------------------


class Role(Protocol):
    """What differs between the picker's roles."""

    @property
    def name(self) -> RoleName: ...

    @property
    def counts_decisions(self) -> bool:
        """Whether this process's own metrics count its decisions (a leader's come from its workers)."""
        ...

    @property
    def holds_replica_channel(self) -> bool:
        """Whether this process talks to the other picker replicas (``picker.replicas``): not a worker, whose
        leader does, and relays what they share (see :class:`_RelayingWorkerPicks`)."""
        ...

    def pick_weight(self, fleet: Fleet) -> int:
        """How many requests one pick stands for in the scheduler's optimistic in-flight count."""
        ...

    def shared_picks(self, fleet: Fleet) -> SharedPicks | None:
        """The other workers' picks, for a worker that shares them (see :mod:`extproc.datapath.shared_picks`)."""
        ...

    def admin_key(self, config: Fleet) -> str | None:
        """The fleet's admin key, for a process that talks to the hosts itself; raises ConfigError."""
        ...

    def discovery(self, config: Fleet) -> Discovery | None:
        """A discovery of the fleet file's pools, for a process that resolves them itself (not yet run)."""
        ...

    def workers(self, fleet: Fleet) -> WorkerPool | None:
        """The worker processes this one starts (before starting the picker) and supervises."""
        ...

    def sockets(self, fleet: Fleet) -> list[Path]:
        """The Unix sockets this process listens on (made before it starts, removed after it stops)."""
        ...

    def parts(self, picker: Picker) -> list[Part]:
        """The parts to run, in starting order; called once, when ``picker`` has its first fleet."""
        ...


class _Resolving:
    """The hooks of a process that talks to the hosts itself and resolves the pools (single, leader)."""

    def admin_key(self, config: Fleet) -> str | None:
        return read_admin_key(config)

    def shared_picks(self, fleet: Fleet) -> SharedPicks | None:
        return None

    def discovery(self, config: Fleet) -> Discovery | None:
        return Discovery(config) if config.pools else None


class Single(_Resolving):
    """The only picker process: collects telemetry and serves ext_proc."""

    name: Final = "single"
    counts_decisions: Final = True
    holds_replica_channel: Final = True

    def pick_weight(self, fleet: Fleet) -> int:
        return 1

    def workers(self, fleet: Fleet) -> WorkerPool | None:
        return None

    def sockets(self, fleet: Fleet) -> list[Path]:
        return _unix_sockets(fleet.picker.listen_addresses[:1])

    def parts(self, picker: Picker) -> list[Part]:
        address = picker.fleet.picker.listen_addresses[0]
        return [_Http(picker), *_telemetry(picker), _Discovering(picker), _beating(picker), *edges(picker, address)]


class Leader(_Resolving):
    """Collects telemetry and shares it with its workers; ``config_path`` (the fleet file, to start them
    with): without it, no worker is started (a leader in a test)."""

    name: Final = "leader"
    counts_decisions: Final = False
    holds_replica_channel: Final = True

    def __init__(self, config_path: Path | None = None, log_format: str = "auto") -> None:
        self._config_path = config_path
        self._log_format = log_format

    def pick_weight(self, fleet: Fleet) -> int:
        return 1

    def workers(self, fleet: Fleet) -> WorkerPool | None:
        return None if self._config_path is None else WorkerPool(fleet, self._config_path, self._log_format)

    def sockets(self, fleet: Fleet) -> list[Path]:
        return []  # each worker owns its socket

    def parts(self, picker: Picker) -> list[Part]:
        if picker.fleet.picker.epp is not None:
            epp_certificate(picker.fleet.picker.epp)
        relaying = [_RelayingWorkerPicks(picker)] if picker.peer_load is not None else []
        return [_Http(picker), *_telemetry(picker), _Publishing(picker), *relaying, _Discovering(picker)]


class Worker:
    """Worker ``index`` of a leader: serves ext_proc on its own listen address, on the leader's telemetry."""

    name: Final = "worker"
    counts_decisions: Final = True
    holds_replica_channel: Final = False

    def __init__(self, index: int) -> None:
        self.index = index
        self._shared_picks: SharedPicks | None = None

    def pick_weight(self, fleet: Fleet) -> int:
        # A worker sees 1/N of the picks between two Envoy polls; count each as N (see Scheduler).
        return fleet.picker.workers

    def shared_picks(self, fleet: Fleet) -> SharedPicks | None:
        """The buffer its leader made (see :meth:`WorkerPool.start`), mapped once for the process's life."""
        if not fleet.picker.share_worker_picks:
            return None
        if self._shared_picks is None:
            self._shared_picks = map_worker_picks(fleet, self.index, "counting own picks N times")
        return self._shared_picks

    def admin_key(self, config: Fleet) -> str | None:
        return None

    def discovery(self, config: Fleet) -> Discovery | None:
        return None  # the leader's snapshots carry the pools' hosts

    def workers(self, fleet: Fleet) -> WorkerPool | None:
        return None

    def sockets(self, fleet: Fleet) -> list[Path]:
        return _unix_sockets(fleet.picker.listen_addresses[self.index : self.index + 1])

    def parts(self, picker: Picker) -> list[Part]:
        address = picker.fleet.picker.listen_addresses[self.index]
        return [_Subscribing(picker), _flushing_metrics(picker), _beating(picker), *edges(picker, address)]


def worker_picks_path(fleet: Fleet) -> Path:
    """The buffer through which a leader's workers share their picks."""
    return Path(fleet.runtime_dir) / "worker-picks"


def _worker_picks_rows(fleet: Fleet) -> int:
    return rows(fleet.picker.workers, fleet.picker.replicas.share_load)


def make_worker_picks(fleet: Fleet) -> None:
    """A fresh, zeroed buffer for the workers' picks, readable by this user only, before any worker maps it
    (a restarted worker maps the same one)."""
    path = worker_picks_path(fleet)
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(descriptor, SharedPicks.size(_worker_picks_rows(fleet)))
    finally:
        os.close(descriptor)


def map_worker_picks(fleet: Fleet, row: int, without: str) -> SharedPicks | None:
    """Row ``row`` of the buffer its leader made (:func:`make_worker_picks`); None, logged with what goes on
    ``without`` it, where there is none or not for this fleet."""
    path = worker_picks_path(fleet)
    try:
        with path.open("r+b") as file:
            buffer = mmap.mmap(file.fileno(), 0)
        return SharedPicks(memoryview(buffer), _worker_picks_rows(fleet), row)
    except (OSError, ValueError) as exc:  # no leader made it (a worker started by hand), or not for us
        log.warning("worker_picks_not_shared", path=str(path), error=str(exc), note=without)
        return None


def _unix_sockets(addresses: Sequence[str]) -> list[Path]:
    return [Path(a.removeprefix("unix:")) for a in addresses if a.startswith("unix:")]


def role_named(name: RoleName, worker: int = 0) -> Role:
    """The role by name (a leader without workers to start)."""
    roles: dict[str, Role] = {"single": Single(), "leader": Leader(), "worker": Worker(worker)}
    return roles[name]


def role_for(fleet: Fleet, worker: int | None, config_path: Path | None, log_format: str = "auto") -> Role:
    """The role of an ``extproc serve`` process: single (``picker.workers: 1``), worker ``worker``, or the
    leader that starts the workers with ``config_path``."""
    if fleet.picker.workers == 1:
        return Single()
    if worker is not None:
        return Worker(worker)
    if config_path is None:
        raise ValueError("several workers need the fleet file's path, to start them with it")
    return Leader(config_path, log_format)


# --- the leader's workers ----------------------------------------------------------------------------------


class WorkerPool:
    """The leader's worker processes: started with the same fleet file, restarted if one dies, and sharing a
    Prometheus multiprocess directory so the leader's ``/metrics`` sums their decisions."""

    def __init__(self, fleet: Fleet, config_path: Path, log_format: str) -> None:
        self._fleet = fleet
        self._config_path = config_path
        self._log_format = log_format
        self._metrics_dir = Path(fleet.runtime_dir) / "picker-metrics"
        self._processes: list[asyncio.subprocess.Process | None] = [None] * fleet.picker.workers
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> None:
        shutil.rmtree(self._metrics_dir, ignore_errors=True)
        self._metrics_dir.mkdir(parents=True)
        if self._fleet.picker.share_worker_picks:
            make_worker_picks(self._fleet)
        for index in range(len(self._processes)):
            await self._spawn(index)
        self._task = asyncio.create_task(self._supervise(), name="workers")

    async def _spawn(self, index: int) -> None:
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(self._metrics_dir)}
        argv = ["-m", "extproc", "--log-format", self._log_format, "serve", "--config", str(self._config_path)]
        self._processes[index] = await asyncio.create_subprocess_exec(
            sys.executable, *argv, "--worker", str(index), env=env
        )

    async def _supervise(self) -> None:
        while not self._stopping:
            await asyncio.sleep(0.5)
            for index, process in enumerate(self._processes):
                if process is not None and process.returncode is not None and not self._stopping:
                    log.warning("picker_worker_exited", worker=index, code=process.returncode, note="restarting")
                    await self._spawn(index)

    def ready(self) -> bool:
        """Every worker runs and, on Unix sockets, listens."""
        addresses = self._fleet.picker.listen_addresses
        for index, process in enumerate(self._processes):
            if process is None or process.returncode is not None:
                return False
            if addresses[index].startswith("unix:") and not Path(addresses[index].removeprefix("unix:")).exists():
                return False
        return True

    def metrics(self) -> bytes:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self._metrics_dir))  # type: ignore[no-untyped-call]
        return generate_latest(registry)

    async def stop(self) -> None:
        self._stopping = True
        await cancel(self._task)
        for process in self._processes:
            if process is not None and process.returncode is None:
                process.terminate()
        for process in self._processes:
            if process is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(process.wait(), timeout=10)
                if process.returncode is None:
                    process.kill()
                    await process.wait()
        worker_picks_path(self._fleet).unlink(missing_ok=True)
