"""Start the real local stack (Triton hosts, picker, Envoy) with ``extproc up`` on free loopback ports."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import datetime as dt
import functools
import json
import math
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from benchmarks.ports import envoy_base_id, free_ports

REPO = Path(__file__).resolve().parent.parent
REPOSITORY = REPO / "triton_models"
# Above `extproc up`'s own start-up limit, so that its message says what did not start and why, and below
# pytest's limit for a test (pyproject.toml), so that this message is the one shown.
READY_TIMEOUT_S = 240.0


class _E2EGuard:
    """Whether the test being set up, run or torn down is marked ``e2e`` (set by tests/conftest.py)."""

    e2e = True  # outside a test (collection, session fixtures)


E2E_GUARD = _E2EGuard()


def require_e2e(what: str) -> None:
    """Refuse to start a server for a test not marked e2e (see tests/conftest.py)."""
    if not E2E_GUARD.e2e:
        raise RuntimeError(f"a test not marked e2e starts a server ({what}); mark it pytest.mark.e2e")


# How long Envoy waits for the picker in the tests' stacks, instead of the 100 ms default: the suite runs
# several modules at once on a small machine, where a picker process can be off the CPU for longer than
# 100 ms, and a request that fails open then goes where the picker did not send it. The tests of late
# messages (test_edge_security.py's H3 tests) send theirs later than this.
TEST_MESSAGE_TIMEOUT_MS = 1000


def local_fleet(run_dir: Path, **picker: Any) -> dict[str, Any]:
    """The local fleet (deploy/local/fleet.yaml) moved to free ports and a private run directory; ``picker``
    keys override its picker section."""
    data: dict[str, Any] = yaml.safe_load((REPO / "deploy" / "local" / "fleet.yaml").read_text())
    ports = iter(free_ports(3 * len(data["hosts"]) + 4))
    for host in data["hosts"]:
        host.update(http_port=next(ports), grpc_port=next(ports), metrics_port=next(ports))
    data["model_repository"] = str(REPOSITORY)
    data["runtime_dir"] = str(run_dir)
    data["picker"].update(
        listen=f"unix:{run_dir}/picker.sock",
        metrics_port=next(ports),
        log_level="debug",
        message_timeout_ms=TEST_MESSAGE_TIMEOUT_MS,
    )
    data["picker"].update(picker)
    envoy = data["envoy"]
    envoy["listener"]["port"] = next(ports)
    envoy["admin"]["port"] = next(ports)
    tls = {"cert_file": str(run_dir / "tls/server.crt"), "key_file": str(run_dir / "tls/server.key")}
    envoy["tls"].update(port=next(ports), **tls)
    # Distinct from `make run`'s Envoy, so tests can run beside it.
    envoy["base_id"] = envoy_base_id()
    return data


@dataclass
class Stack:
    fleet: dict[str, Any]
    run_dir: Path
    process: subprocess.Popen[str]
    output: list[str] = field(default_factory=list)
    # Processes the test started itself (restarts, hosts outside `extproc up`), by name; see spawn().
    spawned: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.fleet['envoy']['listener']['port']}"

    @property
    def tls_url(self) -> str:
        return f"127.0.0.1:{self.fleet['envoy']['tls']['port']}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.fleet['envoy']['admin']['port']}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.fleet['picker']['metrics_port']}/metrics"

    @property
    def cert_file(self) -> str:
        return str(self.fleet["envoy"]["tls"]["cert_file"])

    def host(self, name: str) -> dict[str, Any]:
        for host in self.fleet["hosts"]:
            if host["name"] == name:
                return dict(host)
        raise KeyError(name)

    def host_by_http_endpoint(self) -> dict[str, str]:
        return {f"127.0.0.1:{h['http_port']}": h["name"] for h in self.fleet["hosts"]}

    def pids(self) -> dict[str, int]:
        data = json.loads((self.run_dir / "processes.json").read_text())
        return {str(k): int(v) for k, v in data.items()}

    def picker_status(self) -> dict[str, Any]:
        """The picker's own view of the fleet (``/status``), for failure messages."""
        url = self.metrics_url.replace("/metrics", "/status")
        with urllib.request.urlopen(url, timeout=5) as response:
            status: dict[str, Any] = json.load(response)
        return status

    def log(self, name: str) -> str:
        return (self.run_dir / "logs" / f"{name}.log").read_text(errors="replace")

    def admin_headers(self) -> dict[str, str]:
        """The REST header that Triton's control APIs (model repository, logging, ...) need on this stack's hosts."""
        from extproc.admin_key import HEADER

        key = admin_key(self.run_dir)
        assert key is not None, "extproc up generated no admin key"
        return {HEADER: key}


def envoy_stat(stack: Stack, suffix: str) -> int:
    """The sum of Envoy's counters whose name ends with ``suffix``."""
    with urllib.request.urlopen(f"{stack.admin_url}/stats?filter={suffix}", timeout=5) as response:
        text = response.read().decode()
    return sum(int(line.rsplit(":", 1)[1]) for line in text.splitlines() if line.split(":")[0].endswith(suffix))


def admin_key(run_dir: Path) -> str | None:
    """The key ``extproc up`` generated in ``run_dir`` for its Triton hosts, None before it did."""
    from extproc.admin_key import generated_key_file

    path = generated_key_file(run_dir)
    return path.read_text().strip() if path.exists() else None


def start_stack(run_dir: Path, fleet: dict[str, Any]) -> Stack:
    """`extproc up` on ``fleet``, returned once it printed READY; raises StackDidNotStart with its output and
    the tail of each of its children's logs if it exits first or prints no READY in time."""
    require_e2e("extproc up")
    config = run_dir / "fleet.yaml"
    config.write_text(yaml.safe_dump(fleet, sort_keys=False))
    process = subprocess.Popen(
        [sys.executable, "-m", "extproc", "up", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
    )
    stack = Stack(fleet, run_dir, process)
    if not follow_until_ready(process, stack.output, READY_TIMEOUT_S):
        stop_stack(stack)
        logs = [
            f"--- last lines of {log}:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            for log in sorted((run_dir / "logs").glob("*.log"))
        ]
        raise StackDidNotStart("\n".join(["extproc up did not print READY:", *stack.output[-40:], *logs]))
    return stack


def follow_until_ready(process: subprocess.Popen[str], output: list[str], timeout_s: float) -> bool:
    """Whether ``process`` printed a line starting ``READY `` within ``timeout_s`` (False once it exits
    without one). Every line it prints is appended to ``output`` by a thread that reads to the end, so the
    process never blocks on a full pipe and tests can see its progress. (Waiting on the pipe's descriptor,
    then reading a line, loses lines: the read takes all that arrived into the file object's buffer, and the
    descriptor shows nothing more to read while READY sits there.)"""
    ready, ended = threading.Event(), threading.Event()
    threading.Thread(target=_collect, args=(process, output, ready, ended), daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not ready.wait(timeout=0.25):
        if ended.is_set() or time.monotonic() > deadline:
            return ready.is_set()
    return True


class StackDidNotStart(RuntimeError):
    """`extproc up` exited, or printed no READY in time; the message has its output and its children's logs."""


def _collect(process: subprocess.Popen[str], output: list[str], ready: threading.Event, ended: threading.Event) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        output.append(line.rstrip())
        if line.startswith("READY "):
            ready.set()
    ended.set()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def module_stack(factory: pytest.TempPathFactory, name: str, max_request_bytes: int, **envoy: Any) -> Iterator[Stack]:
    """A module's own local stack with ``envoy.max_request_bytes`` (and any other ``envoy`` keys) set,
    stopped when the module is done (the body of a module-scoped fixture: ``yield from module_stack(...)``)."""
    run_dir = factory.mktemp(name)
    fleet = local_fleet(run_dir)
    fleet["envoy"].update(max_request_bytes=max_request_bytes, **envoy)
    stack = start_stack(run_dir, fleet)
    try:
        yield stack
    finally:
        stop_stack(stack)


def stop_stack(stack: Stack) -> int:
    if stack.process.poll() is None:
        stack.process.send_signal(signal.SIGTERM)
    try:
        return stack.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        stack.process.kill()
        return stack.process.wait()
    finally:
        stop_spawned(stack)


# ------------------------------------------------------------------------------------------------------------
# Fault injection: restarting a process with its own command line, test-launched Triton hosts, a TCP proxy
# that can be cut, an open-loop load in a child process, and the picker's decisions from its debug log.


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.1) -> float:
    """Poll ``predicate`` until it holds; returns the seconds it took. Raises AssertionError naming ``what``."""
    started = time.monotonic()
    deadline = started + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)
    return time.monotonic() - started


@dataclass(frozen=True)
class ProcessSpec:
    """How a process was started, read back from /proc: enough to start it again the same way."""

    argv: tuple[str, ...]
    env: dict[str, str]
    cwd: str


def process_spec(pid: int) -> ProcessSpec:
    proc = Path(f"/proc/{pid}")
    argv = tuple(a.decode() for a in proc.joinpath("cmdline").read_bytes().split(b"\0") if a)
    env: dict[str, str] = {}
    for item in proc.joinpath("environ").read_bytes().split(b"\0"):
        key, sep, value = item.decode(errors="surrogateescape").partition("=")
        if sep:
            env[key] = value
    return ProcessSpec(argv, env, str(proc.joinpath("cwd").readlink()))


_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here, not between fork and exec


def _die_with_test() -> None:
    """In the child before exec: SIGTERM when the test process dies, as ``extproc up`` does for its children."""
    _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def launch(spec: ProcessSpec, log_file: Path) -> subprocess.Popen[bytes]:
    """Start ``spec`` in its own process group, its output appended to ``log_file``; it gets SIGTERM if the
    test process dies. The caller stops it (:func:`stop_processes`)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as log:
        return subprocess.Popen(
            list(spec.argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=spec.env,
            cwd=spec.cwd,
            start_new_session=True,
            preexec_fn=_die_with_test,
        )


def spawn(stack: Stack, name: str, spec: ProcessSpec) -> subprocess.Popen[bytes]:
    """Start ``spec`` as ``name`` (its log appended to the stack's ``logs/NAME.log``), in its own process group.

    The process belongs to the test, not to ``extproc up``: :func:`stop_stack` stops it."""
    process = launch(spec, stack.run_dir / "logs" / f"{name}.log")
    stack.spawned[name] = process
    return process


def pid_of(stack: Stack, name: str) -> int:
    """The live process of ``name``: the test's own restart of it if there is one, else ``extproc up``'s."""
    process = stack.spawned.get(name)
    if process is not None and process.poll() is None:
        return process.pid
    return stack.pids()[name]


def kill_and_wait(pid: int, sig: int = signal.SIGKILL, timeout_s: float = 10.0) -> None:
    os.kill(pid, sig)
    wait_for(lambda: not alive(pid), timeout_s, f"process {pid} to die", interval_s=0.02)


def kill_triton_host(pid: int) -> float:
    """SIGKILL Triton ``pid`` and then its python-backend stubs, as a host going down takes them all; returns
    the wall-clock time of the server's SIGKILL. A stub whose server was killed alone usually exits by
    itself, but once in CI one outlived the test run."""
    stubs = children(pid)  # a scan of /proc: on a busy machine it takes a while, so the time is taken after
    killed_at = time.time()
    kill_and_wait(pid)
    for stub in stubs:
        with contextlib.suppress(ProcessLookupError):
            kill_and_wait(stub)
    return killed_at


def children(pid: int) -> list[int]:
    """The live (not zombie) child processes of ``pid``."""
    found = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(") ", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(stat_file.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


_SHM_PREFIX = "triton_python_backend_shm_region_"


def triton_shm_regions(pid: int) -> list[Path]:
    """The shared-memory regions of Triton ``pid``'s python-backend stubs (named on their command lines).
    A Triton that dies by SIGKILL or abort leaves them in /dev/shm."""
    regions = []
    for child in children(pid):
        try:
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        regions += [Path("/dev/shm", a.decode()) for a in argv if a.startswith(_SHM_PREFIX.encode())]
    return regions


def remove_orphaned(regions: Sequence[Path]) -> None:
    """Unlink those of ``regions`` that no live process maps any more."""
    for region in regions:
        try:
            wait_for(functools.partial(_unmapped, region), 10, f"{region} to be unmapped", interval_s=0.2)
        except AssertionError:
            continue
        region.unlink(missing_ok=True)


def _unmapped(region: Path) -> bool:
    return not _mapped(region)


def _mapped(region: Path) -> bool:
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            if str(region) in maps.read_text():
                return True
        except OSError:
            continue
    return False


def stop_spawned(stack: Stack) -> None:
    """Stop the processes the test started itself."""
    stop_processes(stack.spawned.values())


def stop_processes(processes: Iterable[subprocess.Popen[bytes]]) -> None:
    """Stop processes started by :func:`launch` (their whole process groups: Triton's backend stubs)."""
    processes = list(processes)
    for process in processes:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGCONT)  # a stopped process cannot act on SIGTERM
                os.killpg(process.pid, signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)


def triton_spec(stack_run_dir: Path, host: dict[str, Any], models: Sequence[str], metrics_port: int) -> ProcessSpec:
    """The command line ``extproc up`` would use for ``host``, but with its metrics on ``metrics_port``."""
    from extproc.runtime.triton import prepare_backend_dir, triton_command, triton_env

    argv = triton_command(
        model_repository=REPOSITORY,
        backend_dir=prepare_backend_dir(stack_run_dir),
        http_port=int(host["http_port"]),
        grpc_port=int(host["grpc_port"]),
        metrics_port=metrics_port,
        models=list(models),
        address=str(host["address"]),
        admin_key=admin_key(stack_run_dir),
    )
    return ProcessSpec(tuple(argv), triton_env(1.0), str(REPO))


def http_status(
    url: str, timeout_s: float = 2.0, method: str = "GET", headers: Mapping[str, str] | None = None
) -> int | None:
    """The HTTP status of ``url`` (None when there is no answer)."""
    data = b"{}" if method == "POST" else None
    request = urllib.request.Request(url, method=method, data=data, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return None


class TcpProxy:
    """A loopback TCP forwarder that a test can cut (listener closed, connections reset) and restore. With
    ``tls`` (a server-side context) it terminates TLS in front of the target, like a TLS sidecar."""

    def __init__(self, listen_port: int, target_port: int, tls: ssl.SSLContext | None = None) -> None:
        self.listen_port = listen_port
        self.target_port = target_port
        self.tls = tls
        self.handshakes = 0  # TLS handshakes completed
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        with self._lock:
            assert self._listener is None
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self.listen_port))
            listener.listen(64)
            listener.settimeout(0.2)
            self._listener = listener
            self._stop.clear()
            self._thread = threading.Thread(target=self._accept, args=(listener,), daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Close the listener and every forwarded connection: connects are refused from now on."""
        with self._lock:
            self._stop.set()
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if self._thread is not None:
            self._thread.join(timeout=5)
        if listener is not None:
            listener.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def _accept(self, listener: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        try:
            if self.tls is not None:
                client.settimeout(5)
                client = self.tls.wrap_socket(client, server_side=True)
                self.handshakes += 1
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=2)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        client.settimeout(None)
        with self._lock:
            self._conns += [client, upstream]
        for src, dst in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)


# ---------------------------------------------------------------------------------------- the picker's view


def picker_view(stack: Stack, host: str) -> dict[str, Any]:
    try:
        view: dict[str, Any] = stack.picker_status()["hosts"][host]
    except (OSError, ValueError, KeyError):
        return {}
    return view


def routable(stack: Stack, host: str, models: Sequence[str] = ()) -> bool:
    """The picker would route to ``host`` now (fresh, healthy, not ejected) and has ``models`` READY there."""
    view = picker_view(stack, host)
    return bool(view.get("routable")) and set(models) <= set(view.get("ready", {}))


@dataclass(frozen=True)
class Pick:
    at: float  # wall-clock seconds (the picker's log timestamp)
    model: str
    hosts: tuple[str, ...]


def picks(stack: Stack, since: float = 0.0) -> list[Pick]:
    """The picker's routing decisions from its debug log (``picker.log_level: debug``), at or after ``since``."""
    out = []
    for line in stack.log("picker").splitlines():
        if '"routed"' not in line:
            continue
        try:
            record = json.loads(line)
            at = dt.datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00")).timestamp()
        except (ValueError, KeyError, TypeError):
            continue
        if record.get("event") == "routed" and at >= since:
            out.append(Pick(at, str(record.get("model") or ""), tuple(record.get("hosts") or ())))
    return out


# ----------------------------------------------------------------------------------------------- the load


@dataclass(frozen=True)
class MixEntry:
    """One kind of request in a load: a model over REST (``http``) or gRPC with one FP32 input."""

    protocol: str
    model: str
    input: str
    shape: tuple[int, ...]
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        return f"{self.model}/{self.protocol}"


OK_STATUSES = frozenset({"http 200", "grpc OK"})


@dataclass(frozen=True)
class Outcome:
    entry: int  # index into the mix
    sent: float  # wall-clock seconds
    done: float
    status: str  # "http 200", "grpc UNAVAILABLE", "lost: ..." (no answer at all)
    host: str  # x-triton-host of the answer, "" if none
    detail: str = ""  # for an answer other than success: the start of its body, or the gRPC details

    @property
    def ok(self) -> bool:
        return self.status in OK_STATUSES

    @property
    def lost(self) -> bool:
        return self.status.startswith("lost")


@dataclass
class LoadResult:
    mix: tuple[MixEntry, ...]
    start: float
    outcomes: list[Outcome]

    @property
    def sent(self) -> int:
        return len(self.outcomes)

    @property
    def failed(self) -> int:
        """Requests that got an answer other than success."""
        return sum(1 for o in self.outcomes if not o.ok and not o.lost)

    @property
    def lost(self) -> int:
        """Requests that got no answer at all (client timeout, connection closed without a response)."""
        return sum(1 for o in self.outcomes if o.lost)

    @property
    def rate(self) -> float:
        times = [o.sent for o in self.outcomes]
        return len(times) / (max(times) - min(times)) if len(times) > 1 else 0.0

    def not_ok(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]

    def statuses(self) -> Counter[str]:
        return Counter(o.status for o in self.outcomes)

    def served(self, since: float = 0.0, until: float = math.inf) -> Counter[str]:
        """Which upstream (``ip:port``) served the requests sent in [since, until)."""
        return Counter(o.host for o in self.outcomes if since <= o.sent < until and o.ok)

    def row(self, fault: str, note: str = "") -> str:
        """A row of the fault table (docs/faults.md): fault | sent | failed | lost | what else was measured."""
        protocols = Counter(self.mix[o.entry].protocol for o in self.outcomes)
        return (
            f"| {fault} | {self.sent} ({protocols['http']} REST, {protocols['grpc']} gRPC, {self.rate:.0f}/s) "
            f"| {self.failed} | {self.lost} | {note} |"
        )

    def describe(self, limit: int = 10) -> str:
        bad = self.not_ok()
        lines = [f"sent {self.sent} failed {self.failed} lost {self.lost}: {dict(self.statuses())}"]
        lines += [
            f"  {self.mix[o.entry].label} sent at +{o.sent - self.start:.2f}s: {o.status} ({o.host}) {o.detail}"
            for o in bad[:limit]
        ]
        return "\n".join(lines)


class Load:
    """An open-loop load at a fixed rate, in a child process (its own interpreter and event loop), cycling
    through ``mix``. Each request has ``timeout_s`` to be answered."""

    def __init__(
        self,
        stack: Stack,
        mix: Sequence[MixEntry],
        rate_rps: float,
        duration_s: float,
        timeout_s: float = 15.0,
    ) -> None:
        self.mix = tuple(mix)
        self._out = stack.run_dir / f"load-{time.monotonic_ns()}.json"
        spec = {
            "http": f"http://{stack.http_url}",
            "grpc": stack.http_url,
            "rate": rate_rps,
            "duration": duration_s,
            "timeout": timeout_s,
            "mix": [
                {"protocol": m.protocol, "model": m.model, "input": m.input, "shape": m.shape, "headers": m.headers}
                for m in self.mix
            ],
        }
        spec_file = self._out.with_suffix(".spec.json")
        spec_file.write_text(json.dumps(spec))
        self._process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys, tests.stack as s; sys.exit(s.load_main(sys.argv[1:]))",
                str(spec_file),
                str(self._out),
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line.startswith("START "):
            self._process.kill()
            raise RuntimeError(f"the load generator did not start: {line!r}")
        self.start = float(line.split()[1])
        self.end = self.start + duration_s

    def sleep_until(self, offset_s: float) -> None:
        """Sleep until ``offset_s`` seconds after the load started."""
        delay = self.start + offset_s - time.time()
        if delay > 0:
            time.sleep(delay)

    def result(self, timeout_s: float = 120.0) -> LoadResult:
        try:
            self._process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self._process.kill()
            raise
        assert self._process.returncode == 0, f"load generator exited with {self._process.returncode}"
        data = json.loads(self._out.read_text())
        return LoadResult(self.mix, data["start"], [Outcome(*r) for r in data["outcomes"]])

    def kill(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()


def _request_bodies(mix: list[dict[str, Any]]) -> list[bytes]:
    import numpy as np
    from tritonclient.grpc import service_pb2

    bodies = []
    for i, m in enumerate(mix):
        data = np.random.default_rng(i).standard_normal(m["shape"]).astype(np.float32)
        if m["protocol"] == "http":
            tensor = {"name": m["input"], "shape": m["shape"], "datatype": "FP32", "data": data.ravel().tolist()}
            bodies.append(json.dumps({"inputs": [tensor]}).encode())
        else:
            request = service_pb2.ModelInferRequest(model_name=m["model"])
            request.inputs.add(name=m["input"], datatype="FP32", shape=m["shape"])
            request.raw_input_contents.append(data.tobytes())
            bodies.append(bytes(request.SerializeToString()))
    return bodies


async def _run_load(spec: dict[str, Any]) -> tuple[float, list[tuple[int, float, float, str, str, str]]]:
    import aiohttp
    import grpc

    mix: list[dict[str, Any]] = spec["mix"]
    bodies = _request_bodies(mix)
    timeout_s = float(spec["timeout"])
    count = int(spec["rate"] * spec["duration"])
    gap = 1.0 / float(spec["rate"])
    outcomes: list[tuple[int, float, float, str, str, str]] = []
    channel = grpc.aio.insecure_channel(spec["grpc"])
    infer: Any = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:

        async def one(k: int) -> None:
            m = mix[k]
            sent = time.time()
            host = detail = ""
            try:
                if m["protocol"] == "http":
                    headers = {"content-type": "application/json", **dict(m["headers"])}
                    url = f"{spec['http']}/v2/models/{m['model']}/infer"
                    async with session.post(url, data=bodies[k], headers=headers) as response:
                        answer = await response.read()
                        status = f"http {response.status}"
                        host = response.headers.get("x-triton-host", "")
                        if response.status != 200:
                            detail = answer[:200].decode(errors="replace")
                else:
                    call = infer(bodies[k], timeout=timeout_s, metadata=tuple(map(tuple, m["headers"])))
                    try:
                        await call
                        code = grpc.StatusCode.OK
                    except grpc.aio.AioRpcError as exc:
                        code = exc.code()
                        detail = str(exc.details())[:200]
                    status = "lost: deadline" if code is grpc.StatusCode.DEADLINE_EXCEEDED else f"grpc {code.name}"
                    with contextlib.suppress(Exception):
                        host = dict(await call.initial_metadata() or ()).get("x-triton-host", "")
            except TimeoutError:
                status = "lost: timeout"
            except aiohttp.ClientError as exc:
                status = f"lost: {type(exc).__name__}"
            outcomes.append((k, sent, time.time(), status, str(host), detail))

        loop = asyncio.get_running_loop()
        start_wall = time.time() + 0.1
        start = loop.time() + 0.1
        print(f"START {start_wall}", flush=True)
        tasks = set()
        for i in range(count):
            delay = start + i * gap - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(i % len(mix)))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(set(tasks))
    await channel.close()
    return start_wall, outcomes


def load_main(argv: Sequence[str]) -> int:
    """``python -c 'import tests.stack as s; s.load_main([SPEC, OUT])'``: run one load, write its outcomes."""
    import uvloop

    spec = json.loads(Path(argv[0]).read_text())
    start, outcomes = uvloop.run(_run_load(spec))
    Path(argv[1]).write_text(json.dumps({"start": start, "outcomes": outcomes}))
    return 0


# ------------------------------------------------------------------------------------------ a lone Envoy


def start_envoy(run_dir: Path, fleet: dict[str, Any]) -> subprocess.Popen[bytes]:
    """Envoy alone (no picker, no Triton of its own) on the bootstrap ``extproc envoy-config`` renders for
    ``fleet``; returns once its admin endpoint says it is live. The caller stops it."""
    from extproc.config import parse_fleet
    from extproc.envoy_config import render_yaml

    run_dir.mkdir(parents=True, exist_ok=True)
    config = run_dir / "envoy.yaml"
    config.write_text(render_yaml(parse_fleet(fleet, str(run_dir / "fleet.yaml"))))
    envoy = fleet["envoy"]
    return run_envoy(run_dir, config, envoy["base_id"], envoy["admin"]["port"])


def run_envoy(run_dir: Path, config: Path, base_id: int, admin_port: int) -> subprocess.Popen[bytes]:
    """Envoy on the bootstrap file ``config`` (its admin on loopback ``admin_port``), logging to
    ``run_dir/envoy.log``; returns once its admin endpoint says it is live. The caller stops it."""
    from extproc.runtime.stack import find_envoy

    argv = (find_envoy(), "-c", str(config), "--base-id", str(base_id), "--concurrency", "1")
    process = launch(ProcessSpec(argv, dict(os.environ), str(Path.cwd())), run_dir / "envoy.log")
    admin = f"http://127.0.0.1:{admin_port}/ready"
    try:
        wait_for(lambda: process.poll() is not None or http_status(admin) == 200, 60, "a lone Envoy to start")
    except AssertionError:
        process.kill()
        raise
    assert process.poll() is None, (run_dir / "envoy.log").read_text(errors="replace")[-3000:]
    return process
