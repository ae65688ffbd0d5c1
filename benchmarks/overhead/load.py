"""Load generation: the request, the open-loop constant-rate generator (:class:`OpenLoop`) and ``wrk``
(closed loop, for the maximum throughput)."""

from __future__ import annotations

import contextlib
import json
import math
import select
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from benchmarks.loadgen import percentile
from benchmarks.overhead.measure import latency_summary
from benchmarks.overhead.stack import MODEL, REQUEST_BODY

WRK_INSTALL_HINT: Final = (
    "wrk is not installed: `apt-get install -y wrk` (Debian/Ubuntu), `brew install wrk` (macOS), "
    "or build it from https://github.com/wg/wrk"
)


# ----------------------------------------------------------------------------------------------- the request


def post(port: int, timeout_s: float = 2.0) -> tuple[int, dict[str, str]]:
    """One inference POST through a gateway: its status and (lower-cased) response headers."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v2/models/{MODEL}/infer",
        data=REQUEST_BODY,
        headers={"content-type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            response.read()
            return int(response.status), {k.lower(): v for k, v in response.headers.items()}
    except urllib.error.HTTPError as exc:
        return int(exc.code), {}
    except (urllib.error.URLError, OSError):
        return 0, {}


def request_bytes(port: int) -> bytes:
    """The raw HTTP/1.1 request the open-loop generator sends (the same request wrk sends)."""
    head = (
        f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(REQUEST_BODY)}\r\n\r\n"
    )
    return head.encode("ascii") + REQUEST_BODY


def parse_response(buf: bytes | bytearray) -> tuple[int, int] | None:
    """``(status, length)`` of the first complete HTTP/1.1 response in ``buf``, None if incomplete.

    ``content-length`` framing (what Envoy sends for these answers) and ``chunked`` (what it sends when
    ext_proc streams the response body, as the ``epp`` variant's gateway does: the processor may change the
    body, so Envoy drops the length).
    """
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise ValueError(f"not an HTTP response: {lines[0]!r}")
    status = int(parts[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value.strip())
        elif name == "transfer-encoding" and "chunked" in value.lower():
            total = _chunked_end(buf, end + 4)
            return None if total is None else (status, total)
    total = end + 4 + length
    return (status, total) if len(buf) >= total else None


def _chunked_end(buf: bytes | bytearray, at: int) -> int | None:
    """Where the chunked body starting at ``at`` ends (after its trailers), None if incomplete."""
    while True:
        eol = buf.find(b"\r\n", at)
        if eol < 0:
            return None
        size = int(bytes(buf[at:eol]).partition(b";")[0].strip(), 16)
        at = eol + 2
        if size == 0:
            break
        at += size + 2  # the chunk and its CRLF
        if len(buf) < at:
            return None
    # The trailer section: header lines up to an empty one.
    while True:
        eol = buf.find(b"\r\n", at)
        if eol < 0:
            return None
        if eol == at:
            return at + 2
        at = eol + 2


# --------------------------------------------------------------------------------- open-loop generator

# Status recorded for a request that got no (valid) answer.
NO_ANSWER: Final = 0


@dataclass
class OpenLoopRecords:
    """Per request (index = position in the schedule), times in seconds on ``time.perf_counter``'s clock."""

    intended: list[float]
    sent: list[float]
    done: list[float]
    status: list[int]
    generator_cpu_s: float = 0.0
    connections: int = 0

    def measured(self, warmup_s: float) -> list[int]:
        start = self.intended[0] if self.intended else 0.0
        return [i for i, t in enumerate(self.intended) if t - start >= warmup_s]


def summarize_open_loop(records: OpenLoopRecords, rate: float, warmup_s: float) -> dict[str, Any]:
    """Latency from the intended send time (ms), errors, achieved rate and the generator's lag."""
    idx = records.measured(warmup_s)
    ok = [i for i in idx if records.status[i] == 200]
    latencies = [records.done[i] - records.intended[i] for i in ok]
    service = [records.done[i] - records.sent[i] for i in ok]
    lags = sorted(records.sent[i] - records.intended[i] for i in idx if math.isfinite(records.sent[i]))
    errors: dict[str, int] = {}
    for i in idx:
        if records.status[i] != 200:
            key = "no_answer" if records.status[i] == NO_ANSWER else f"http_{records.status[i]}"
            errors[key] = errors.get(key, 0) + 1
    span = max(records.done[i] for i in ok) - records.intended[idx[0]] if ok else math.nan
    offered_span = len(idx) / rate if rate > 0 else math.nan
    return {
        "rate_rps": rate,
        "requests": len(idx),
        "ok": len(ok),
        "errors": errors,
        "error_count": sum(errors.values()),
        # Completed requests over the time from the first measured intended send to the last answer.
        "achieved_rps": len(ok) / max(span, offered_span) if ok and span > 0 else 0.0,
        "latency": latency_summary(latencies),
        # From the actual send time: what the system took, without the generator's own lag.
        "service": latency_summary(service),
        "lag": {
            "p50_ms": percentile(lags, 50) * 1e3,
            "p99_ms": percentile(lags, 99) * 1e3,
            "max_ms": (lags[-1] * 1e3) if lags else math.nan,
        },
    }


@dataclass
class _Conn:
    sock: socket.socket
    buf: bytearray = field(default_factory=bytearray)
    index: int = -1  # the request in flight on this connection, -1 when idle


class OpenLoop:
    """Sends ``request`` at the given offsets over HTTP/1.1 keep-alive connections, open loop.

    The calling thread is the sender: it sleeps until each intended time (``time.sleep``: µs resolution,
    unlike an event loop's millisecond timers) and writes the request on an idle connection, opening a new
    one when none is idle, so a slow answer never delays the next send. A receiver thread reads answers
    (epoll) and timestamps them. One request per connection at a time (no pipelining).
    """

    def __init__(self, port: int, request: bytes, *, initial_connections: int = 8, timeout_s: float = 10.0) -> None:
        self.port = port
        self.request = request
        self.initial_connections = initial_connections
        self.timeout_s = timeout_s

    def _connect(self) -> _Conn:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5.0)
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _Conn(sock)

    def run(self, offsets: Sequence[float]) -> OpenLoopRecords:
        n = len(offsets)
        sent = [math.nan] * n
        done = [math.nan] * n
        status = [NO_ANSWER] * n
        poller = select.epoll()
        conns: dict[int, _Conn] = {}
        idle: deque[_Conn] = deque()
        completed = [0]
        stop = threading.Event()

        def add_connection() -> _Conn:
            conn = self._connect()
            conns[conn.sock.fileno()] = conn
            poller.register(conn.sock.fileno(), select.EPOLLIN)
            return conn

        def drop(conn: _Conn, now: float) -> None:
            fd = conn.sock.fileno()
            with contextlib.suppress(OSError, ValueError):
                poller.unregister(fd)
            conns.pop(fd, None)
            conn.sock.close()
            if conn.index >= 0:
                done[conn.index] = now
                completed[0] += 1
                conn.index = -1

        def receive() -> None:
            while not stop.is_set():
                for fd, _ in poller.poll(0.05):
                    conn = conns.get(fd)
                    if conn is None:
                        continue
                    try:
                        data = conn.sock.recv(65536)
                    except OSError:
                        data = b""
                    now = time.perf_counter()
                    if not data:
                        drop(conn, now)
                        continue
                    conn.buf += data
                    while True:
                        try:
                            parsed = parse_response(conn.buf)
                        except ValueError:
                            drop(conn, now)
                            break
                        if parsed is None:
                            break
                        code, length = parsed
                        del conn.buf[:length]
                        i = conn.index
                        if i >= 0:
                            done[i] = now
                            status[i] = code
                            completed[0] += 1
                            conn.index = -1
                            idle.append(conn)

        for _ in range(self.initial_connections):
            idle.append(add_connection())
        receiver = threading.Thread(target=receive, name="openloop-receiver", daemon=True)
        cpu0 = time.process_time()
        receiver.start()
        sent_count = 0
        start = time.perf_counter() + 0.02
        intended = [start + off for off in offsets]
        try:
            for i, target in enumerate(intended):
                delay = target - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                try:
                    conn = idle.pop()  # LIFO: the most recently used connection, as a client pool would
                except IndexError:
                    conn = add_connection()
                conn.index = i
                sent[i] = time.perf_counter()
                sent_count += 1
                try:
                    conn.sock.sendall(self.request)
                except OSError:
                    drop(conn, time.perf_counter())
            deadline = time.perf_counter() + self.timeout_s
            while completed[0] < sent_count and time.perf_counter() < deadline:
                time.sleep(0.005)
        finally:
            stop.set()
            receiver.join()
            for conn in list(conns.values()):
                conn.sock.close()
            poller.close()
        return OpenLoopRecords(
            intended=intended,
            sent=sent,
            done=done,
            status=status,
            generator_cpu_s=time.process_time() - cpu0,
            connections=len(conns),
        )


# ------------------------------------------------------------------------------------------------- wrk

WRK_RESULT_PREFIX: Final = "WRK_RESULT "

_WRK_SCRIPT: Final = """\
-- Written by benchmarks.overhead: POST a small inference request, print a JSON summary at the end.
wrk.method = "POST"
wrk.body = [==[{body}]==]
wrk.headers["Content-Type"] = "application/json"

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "{prefix}" ..
    '{{"requests":%.0f,"duration_us":%.0f,"connect":%.0f,"read":%.0f,"write":%.0f,"status":%.0f,' ..
    '"timeout":%.0f,"p50_us":%.1f,"p90_us":%.1f,"p99_us":%.1f,"p999_us":%.1f,"mean_us":%.1f,"max_us":%.1f}}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    latency.mean, latency.max))
end
"""


def wrk_script(body: bytes = REQUEST_BODY) -> str:
    text = body.decode("ascii")
    if "]==]" in text:
        raise ValueError("the request body cannot be quoted for Lua")
    return _WRK_SCRIPT.format(body=text, prefix=WRK_RESULT_PREFIX)


def parse_wrk_output(stdout: str) -> dict[str, Any]:
    """The summary line our Lua ``done`` hook prints, as numbers: req/s, errors, latency (ms)."""
    for line in stdout.splitlines():
        if line.startswith(WRK_RESULT_PREFIX):
            raw = json.loads(line[len(WRK_RESULT_PREFIX) :])
            break
    else:
        raise ValueError(f"no {WRK_RESULT_PREFIX.strip()} line in wrk's output:\n{stdout[-2000:]}")
    requests = int(raw["requests"])
    duration_s = float(raw["duration_us"]) / 1e6
    errors = {k: int(raw[k]) for k in ("connect", "read", "write", "status", "timeout")}
    return {
        "requests": requests,
        "duration_s": duration_s,
        "rps": requests / duration_s if duration_s > 0 else 0.0,
        "errors": errors,
        "error_count": sum(errors.values()),
        "latency": {
            "p50_ms": raw["p50_us"] / 1e3,
            "p90_ms": raw["p90_us"] / 1e3,
            "p99_ms": raw["p99_us"] / 1e3,
            "p999_ms": raw["p999_us"] / 1e3,
            "mean_ms": raw["mean_us"] / 1e3,
            "max_ms": raw["max_us"] / 1e3,
        },
    }


def find_wrk(explicit: str | None = None) -> str | None:
    if explicit:
        return explicit if Path(explicit).is_file() else shutil.which(explicit)
    return shutil.which("wrk")


def run_wrk(wrk: str, script: Path, port: int, connections: int, duration_s: int) -> dict[str, Any]:
    argv = [
        wrk,
        "-t1",
        f"-c{connections}",
        f"-d{max(1, duration_s)}s",
        "--timeout",
        "5s",
        "-s",
        str(script),
        f"http://127.0.0.1:{port}/v2/models/{MODEL}/infer",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk exited with {done.returncode}: {done.stderr.strip() or done.stdout.strip()}")
    return parse_wrk_output(done.stdout)
