"""``extproc bench overhead``: what the picker costs a request, against plain Envoy and a bare processor.

In one run, with one load generator, three variants of the gateway Envoy are measured side by side against
the same trivial upstream:

``plain``
    The gateway without the ext_proc filter (and without the picker cluster). Everything else stays,
    including the ``header_mutation`` filter, so the variants differ only by ext_proc.
``bare``
    The gateway + a bare grpc.aio processor that answers every request with a constant, precomputed
    ProcessingResponse (see :mod:`extproc.bench.overhead_server`): the floor for any Python ext_proc service.
    ``--bare-answer routing`` makes that answer the picker's kind (tier and hosts headers, route cache
    cleared, naming every upstream host), so the bare gateway Envoy does the picker's routing work too and
    only the processor differs.
``picker``
    The gateway + the real picker request path (Processor, Scheduler, PickerMetrics, a Datastore of the
    upstream hosts whose telemetry is kept fresh; the telemetry collector's polling is off the request path
    and excluded, as there is no Triton behind the benchmark).

The gateway configuration is rendered from a fleet of ``--hosts`` hosts by
:func:`extproc.envoy_config.render_bootstrap` and transformed per variant (:func:`variant_bootstrap`). The
upstream is a second Envoy answering every request with a ``direct_response`` 200 on one loopback port per
host (:func:`upstream_bootstrap`); it echoes the ``x-triton-lb-hosts`` header back, which start-up uses to
check that the picker really routes. Every process (the four Envoys, both processors) starts once and stays
up; the phases alternate the variants in rotating order, so machine noise hits all three alike, and every
ratio is quoted from the same run.

Phases:

1. **Maximum sustained req/s**: ``wrk`` (closed loop, ``--connections`` connections, one thread) posting a
   small REST inference request to ``/v2/models/<model>/infer``, ``--rounds`` rounds of ``--max-duration``
   seconds per variant. Reported: the median over rounds, and the picker/bare ratio (median of the per-round
   ratios: a round's runs are back to back, seconds apart). Skipped, with a hint, when ``wrk`` is missing.
2. **Latency at fixed rates** (``--rates``, default 200, 500 and 1000 req/s): an open-loop, constant-rate
   generator (:class:`OpenLoop`: a sender thread with precise sleeps, a receiver thread on epoll, raw
   HTTP/1.1 keep-alive connections) measuring each request's latency from its *intended* send time, so a
   stalled system cannot hide queueing (coordinated omission). The generator's own scheduling lag (actual -
   intended send time) is reported next to the latencies. Per variant the headline p50/p99 is the median
   over rounds of each round's percentile; added latency is the median over rounds of (variant - plain) in
   the same round (a noise burst spoils one pair, not the result); pooled percentiles are in the JSON too.
   A rate above 95 % of a variant's best maximum-throughput round is not run for it ("not reachable"), and
   a run that fell behind (errors, fail-open, achieved rate < 95 % of the offered rate) is flagged "not
   sustained".
3. **CPU per request**: ``utime + stime`` of each process from ``/proc/<pid>/stat`` (all threads) over each
   phase, divided by the requests completed in it; the processor's is the "picker CPU µs/request". Each
   phase also records how many cores the machine spent on work that is not this benchmark (``/proc/stat``
   minus our processes): the "other" column, to judge how noisy a shared machine was.

Fail-open is watched: the gateway's ``http.ingress.ext_proc.*`` counters are read before and after every
phase, and a phase where the processor timed out or failed (Envoy then routes without it) is reported.

``--soak N`` runs a different mode: only the real picker's gateway (``--soak-variant bare`` for the bare
processor's), N requests (wrk at full speed, or the open-loop generator at ``--soak-rate`` without wrk), the
processor's RSS sampled about every 50k requests; prints the series, its max/min ratio and the growth in
bytes per request (least squares).

Progress goes to stderr, the table to stdout, the JSON to ``--output``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import json
import math
import os
import platform
import re
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

# Light imports only: the CLI imports this module to build its parser. envoy_config (envoy-data-plane) and
# the runtime are imported where they are used.
from extproc.build import compiled
from extproc.config import Fleet, parse_fleet
from extproc.headers import HOSTS_HEADER, PICKER_CLUSTER
from extproc.runtime.ports import free_ports
from extproc.runtime.process import Child, Supervisor

VARIANTS: Final = ("plain", "bare", "picker")
# What a processor prints on stdout once it serves (see extproc.bench.overhead_server).
READY_LINE: Final = "READY"
PROCESSOR_VARIANTS: Final = ("bare", "picker")
DEFAULT_OUTPUT: Final = Path("bench-results/overhead.json")
DEFAULT_SOAK_OUTPUT: Final = Path("bench-results/overhead-soak.json")
DEFAULT_RATES: Final = (200.0, 500.0, 1000.0)
MODEL: Final = "mlp"
# A 1x4 FP32 REST inference request, as a small real client would send it.
REQUEST_BODY: Final = b'{"inputs":[{"name":"INPUT0","shape":[1,4],"datatype":"FP32","data":[0.5,-1.25,2.0,0.125]}]}'
# The upstream's answer and the header it echoes (what the picker set), for the start-up check.
UPSTREAM_BODY: Final = '{"outputs":[]}'
ECHO_HEADER: Final = "x-bench-echo-hosts"
WRK_INSTALL_HINT: Final = (
    "wrk is not installed: `apt-get install -y wrk` (Debian/Ubuntu), `brew install wrk` (macOS), "
    "or build it from https://github.com/wg/wrk"
)
# A variant does not get a fixed rate above this fraction of its maximum sustained req/s.
REACHABLE_FRACTION: Final = 0.95
# A fixed-rate run is "sustained" when it completed at least this fraction of the offered rate, without
# errors and without fail-open.
SUSTAINED_FRACTION: Final = 0.95
SOAK_SAMPLE_EVERY: Final = 50_000
START_TIMEOUT_S: Final = 60.0
# Targets the benchmark reports against (from the issue).
TARGET_THROUGHPUT_RATIO: Final = 0.9
TARGET_RATE: Final = 500.0
TARGET_ADDED_P50_MS: Final = 0.3
TARGET_ADDED_P99_MS: Final = 1.5


class BenchError(RuntimeError):
    """The benchmark could not start or run its stack."""


def _find_envoy() -> str:
    from extproc.runtime.stack import find_envoy

    return find_envoy()


def _progress(message: str) -> None:
    print(f"[bench overhead] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ configuration


def bench_fleet(
    upstream_ports: Sequence[int], spare_ports: Sequence[int], picker_listen: str, gateway_port: int, admin_port: int
) -> Fleet:
    """The gateway's fleet: one GPU-tier host per upstream port, all serving :data:`MODEL`.

    A host's REST port is an upstream listener; its gRPC and metrics ports (``spare_ports``, two per host)
    are free ports nobody serves: no gRPC is sent, and there is no telemetry to scrape.
    """
    if len(spare_ports) < 2 * len(upstream_ports):
        raise ValueError("need two spare ports per host")
    hosts = [
        {
            "name": f"up{i}",
            "address": "127.0.0.1",
            "http_port": port,
            "grpc_port": spare_ports[2 * i],
            "metrics_port": spare_ports[2 * i + 1],
            "tier": "gpu",
        }
        for i, port in enumerate(upstream_ports)
    ]
    return parse_fleet(
        {
            "hosts": hosts,
            "models": [{"name": MODEL, "tiers": ["gpu"]}],
            "picker": {"listen": picker_listen},
            "envoy": {
                "listener": {"address": "127.0.0.1", "port": gateway_port},
                "admin": {"address": "127.0.0.1", "port": admin_port},
                "tls": None,
            },
        },
        "<bench overhead>",
    )


def _managers(boot: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    for listener in boot["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                yield network_filter["typed_config"]


def strip_ext_proc(boot: dict[str, Any]) -> None:
    """In place: remove the ext_proc filter, its per-route configs and the picker cluster."""
    from extproc.envoy_config import EXT_PROC_FILTER

    for manager in _managers(boot):
        manager["http_filters"] = [f for f in manager["http_filters"] if f["name"] != EXT_PROC_FILTER]
        for vhost in manager["route_config"]["virtual_hosts"]:
            for route in vhost["routes"]:
                per_filter = route.get("typed_per_filter_config")
                if per_filter is not None:
                    per_filter.pop(EXT_PROC_FILTER, None)
                    if not per_filter:
                        del route["typed_per_filter_config"]
    resources = boot["static_resources"]
    resources["clusters"] = [c for c in resources["clusters"] if c["name"] != PICKER_CLUSTER]


def listen_address(listen: str) -> dict[str, Any]:
    """Envoy's address message (proto JSON) for a picker ``listen`` value: ``unix:PATH`` or ``IP:PORT``."""
    if listen.startswith("unix:"):
        return {"pipe": {"path": listen.removeprefix("unix:")}}
    host, _, port = listen.rpartition(":")
    return {"socket_address": {"address": host.strip("[]"), "port_value": int(port)}}


def point_picker_cluster(boot: dict[str, Any], listen: str) -> None:
    """In place: the picker cluster's one endpoint becomes ``listen``."""
    for cluster in boot["static_resources"]["clusters"]:
        if cluster["name"] == PICKER_CLUSTER:
            cluster["load_assignment"]["endpoints"] = [
                {"lb_endpoints": [{"endpoint": {"address": listen_address(listen)}}]}
            ]
            return
    raise ValueError(f"the bootstrap has no {PICKER_CLUSTER} cluster")


def variant_bootstrap(
    base: Mapping[str, Any], variant: str, *, listen_port: int, admin_port: int, picker_listen: str | None
) -> dict[str, Any]:
    """A copy of the rendered gateway bootstrap for one variant, on its own listener and admin ports.

    ``plain`` loses ext_proc (filter, per-route configs, picker cluster); ``bare`` and ``picker`` keep the
    rendered config and point the picker cluster at ``picker_listen``. TLS is not rendered (the fleet has
    none), so the config has exactly one listener.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}")
    boot = copy.deepcopy(dict(base))
    listeners = boot["static_resources"]["listeners"]
    if len(listeners) != 1:
        raise ValueError(f"expected one listener (no TLS), got {len(listeners)}")
    listeners[0]["address"]["socket_address"]["port_value"] = listen_port
    boot["admin"]["address"]["socket_address"]["port_value"] = admin_port
    if variant == "plain":
        strip_ext_proc(boot)
    else:
        if picker_listen is None:
            raise ValueError(f"variant {variant!r} needs the processor's listen address")
        point_picker_cluster(boot, picker_listen)
    return boot


def http_filter_names(boot: Mapping[str, Any]) -> list[str]:
    return [f["name"] for manager in _managers(boot) for f in manager["http_filters"]]


def upstream_bootstrap(ports: Sequence[int], admin_port: int) -> dict[str, Any]:
    """The trivial upstream: one listener per port, each answering 200 with a small JSON body at once.

    Listener ``i`` has stat prefix ``up<i>``, so ``http.up<i>.downstream_rq_total`` counts what each host
    got. The response echoes the routing header the gateway sent (``x-bench-echo-hosts``).
    """
    router = {
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
    }
    listeners = []
    for i, port in enumerate(ports):
        manager = {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
            ".HttpConnectionManager",
            "stat_prefix": f"up{i}",
            "route_config": {
                "name": "upstream",
                "virtual_hosts": [
                    {
                        "name": "all",
                        "domains": ["*"],
                        "routes": [
                            {
                                "match": {"prefix": "/"},
                                "direct_response": {"status": 200, "body": {"inline_string": UPSTREAM_BODY}},
                                "response_headers_to_add": [
                                    {"header": {"key": ECHO_HEADER, "value": f"%REQ({HOSTS_HEADER})%"}},
                                    {"header": {"key": "content-type", "value": "application/json"}},
                                ],
                            }
                        ],
                    }
                ],
            },
            "http_filters": [router],
        }
        listeners.append(
            {
                "name": f"up{i}",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                "filter_chains": [
                    {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}]}
                ],
            }
        )
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {"listeners": listeners},
    }


# ------------------------------------------------------------------------------------ /proc accounting


def parse_proc_stat(text: str) -> tuple[int, int]:
    """``(utime, stime)`` in clock ticks from the text of ``/proc/<pid>/stat``.

    The command name (field 2) is in parentheses and may itself contain spaces and parentheses, so fields
    are counted from the *last* ``)``: utime and stime are fields 14 and 15, i.e. the 12th and 13th after it.
    """
    end = text.rfind(")")
    if end < 0:
        raise ValueError("not a /proc/<pid>/stat line")
    fields = text[end + 1 :].split()
    return int(fields[11]), int(fields[12])


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) the process has used so far."""
    utime, stime = parse_proc_stat(Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace"))
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def parse_statm_rss(text: str, page_size: int) -> int:
    """Resident set size in bytes from the text of ``/proc/<pid>/statm`` (field 2, in pages)."""
    return int(text.split()[1]) * page_size


def rss_bytes(pid: int) -> int:
    return parse_statm_rss(Path(f"/proc/{pid}/statm").read_text(encoding="ascii"), os.sysconf("SC_PAGE_SIZE"))


def parse_machine_cpu(text: str) -> tuple[int, int]:
    """``(busy, total)`` clock ticks over all CPUs from the text of ``/proc/stat`` (its ``cpu`` line).

    Idle is ``idle + iowait``; total is the first eight fields (user .. steal; guest time is inside user).
    """
    for line in text.splitlines():
        if line.startswith("cpu "):
            values = [int(x) for x in line.split()[1:9]]
            total = sum(values)
            idle = values[3] + (values[4] if len(values) > 4 else 0)
            return total - idle, total
    raise ValueError("no cpu line in /proc/stat")


def machine_busy_seconds() -> float:
    busy, _ = parse_machine_cpu(Path("/proc/stat").read_text(encoding="ascii"))
    return busy / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """This process (the generator) and its waited-for children (wrk)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def cpu_us_per_request(cpu_s: float, requests: int) -> float:
    return cpu_s * 1e6 / requests if requests > 0 else math.nan


# ------------------------------------------------------------------------------------------- statistics


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in [0, 100]) of an ascending sequence; NaN when empty."""
    if not ordered:
        return math.nan
    if q <= 0:
        return ordered[0]
    rank = math.ceil(q / 100.0 * len(ordered))
    return ordered[min(len(ordered), max(1, rank)) - 1]


def latency_summary(samples_s: Sequence[float]) -> dict[str, float]:
    """Percentiles (ms) of latencies given in seconds."""
    ordered = sorted(samples_s)
    out = {f"{name}_ms": percentile(ordered, q) * 1e3 for name, q in (("p50", 50), ("p90", 90), ("p99", 99))}
    out["p999_ms"] = percentile(ordered, 99.9) * 1e3
    out["mean_ms"] = statistics.fmean(ordered) * 1e3 if ordered else math.nan
    out["max_ms"] = ordered[-1] * 1e3 if ordered else math.nan
    return out


def added_latency(variant: Mapping[str, float], plain: Mapping[str, float]) -> dict[str, float]:
    """Per percentile, the variant's latency minus plain Envoy's (ms)."""
    return {key: variant[key] - plain[key] for key in ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "mean_ms")}


def median(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def round_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """Per round, ``numerator / denominator`` (NaN where the denominator is not positive)."""
    return [n / d if d > 0 else math.nan for n, d in zip(numerator, denominator, strict=True)]


def rotated(items: Sequence[str], shift: int) -> list[str]:
    """``items`` rotated left by ``shift``: round r starts with a different variant each time."""
    if not items:
        return []
    k = shift % len(items)
    return [*items[k:], *items[:k]]


def reachable(rate: float, max_rps: float | None) -> bool:
    """Whether a fixed ``rate`` is worth offering to a variant whose maximum is ``max_rps`` (None: unknown)."""
    return max_rps is None or not math.isfinite(max_rps) or rate <= REACHABLE_FRACTION * max_rps


def constant_rate_offsets(rate: float, duration_s: float) -> list[float]:
    """Intended send times (s from the start) of a constant-rate schedule: ``i / rate`` for ``[0, duration)``."""
    n = math.floor(rate * duration_s + 1e-9)
    return [i / rate for i in range(n)]


# ---------------------------------------------------------------------------------- Envoy admin and HTTP


def _http_get(url: str, timeout_s: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), b""
    except (urllib.error.URLError, OSError):
        return 0, b""


def parse_envoy_counters(stats_json: Mapping[str, Any]) -> dict[str, int]:
    """Counters and gauges (name → int) from Envoy admin ``/stats?format=json``; histograms are skipped."""
    out: dict[str, int] = {}
    for entry in stats_json.get("stats", []):
        if isinstance(entry, dict) and "name" in entry and isinstance(entry.get("value"), int | float):
            out[str(entry["name"])] = int(entry["value"])
    return out


def envoy_counters(admin_port: int, pattern: str) -> dict[str, int]:
    query = urllib.parse.urlencode({"format": "json", "filter": pattern})
    status, body = _http_get(f"http://127.0.0.1:{admin_port}/stats?{query}")
    if status != 200:
        return {}
    return parse_envoy_counters(json.loads(body))


def counter_delta(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in sorted(set(before) | set(after))}


# Gateway counters watched per phase: requests, their outcome, and whether ext_proc failed open.
# (Names under ``http.<stat prefix>.``.)
GATEWAY_STATS: Final = {
    "rq_total": "downstream_rq_total",
    "rq_2xx": "downstream_rq_2xx",
    "rq_5xx": "downstream_rq_5xx",
    "ext_proc_streams": "ext_proc.streams_started",
    "ext_proc_failed": "ext_proc.streams_failed",
    "ext_proc_timeouts": "ext_proc.message_timeouts",
    "ext_proc_fail_open": "ext_proc.failure_mode_allowed",
}


def gateway_stat_prefix() -> str:
    from extproc.envoy_config import STAT_PREFIX

    return f"http.{STAT_PREFIX}."


def gateway_summary(delta: Mapping[str, int]) -> dict[str, int]:
    prefix = gateway_stat_prefix()
    return {key: delta.get(prefix + name, 0) for key, name in GATEWAY_STATS.items()}


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

    Only ``content-length`` framing is supported (what Envoy sends for these answers); a chunked response
    raises ValueError.
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
            raise ValueError("chunked responses are not supported")
    total = end + 4 + length
    return (status, total) if len(buf) >= total else None


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
-- Written by extproc bench overhead: POST a small inference request, print a JSON summary at the end.
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


# ---------------------------------------------------------------------------------------------- the run


@dataclass
class Processes:
    """The pids whose CPU time is measured, by role."""

    upstream: int
    gateways: dict[str, int]
    processors: dict[str, int]

    def cpu(self) -> dict[str, float]:
        out = {"upstream": cpu_seconds(self.upstream)}
        for name, pid in self.gateways.items():
            out[f"gateway_{name}"] = cpu_seconds(pid)
        for name, pid in self.processors.items():
            out[f"processor_{name}"] = cpu_seconds(pid)
        return out


@dataclass
class Settings:
    rates: tuple[float, ...] = DEFAULT_RATES
    duration_s: float = 6.0
    max_duration_s: int = 6
    rounds: int = 5
    connections: int = 16
    hosts: int = 3
    warmup_s: float = 0.5
    wrk: str | None = None
    soak: int = 0
    soak_rate: float = 1000.0
    soak_variant: str = "picker"
    # What the bare processor answers: "empty" (change nothing) or "routing" (the picker's kind of answer).
    bare_answer: str = "empty"
    # Why there is no wrk (None: it was found).
    wrk_missing: str | None = None


class OverheadBench:
    """Starts the upstream, the processors and one gateway per variant once; runs the phases."""

    def __init__(self, settings: Settings, run_dir: Path, variants: Sequence[str] = VARIANTS) -> None:
        self.settings = settings
        self.run_dir = run_dir
        self.variants = tuple(variants)
        self.supervisor = Supervisor(run_dir / "logs")
        n = settings.hosts
        ports = iter(free_ports(n + 1 + 3 * n + 2 * len(self.variants)))
        self.upstream_ports = [next(ports) for _ in range(n)]
        self.upstream_admin = next(ports)
        spare = [next(ports) for _ in range(2 * n)]
        self.gateway_ports = {v: next(ports) for v in self.variants}
        self.admin_ports = {v: next(ports) for v in self.variants}
        self.sockets: dict[str, str] = {v: f"unix:{run_dir}/{v}.sock" for v in PROCESSOR_VARIANTS if v in self.variants}
        # Rendered once; the variants are transformations of it.
        first = self.variants[0]
        self.fleet = bench_fleet(
            self.upstream_ports,
            spare,
            self.sockets.get("picker", f"unix:{run_dir}/picker.sock"),
            self.gateway_ports[first],
            self.admin_ports[first],
        )
        from extproc.envoy_config import render_bootstrap

        self.base_bootstrap = render_bootstrap(self.fleet)
        self.base_id = 20_000 + (os.getpid() % 5_000) * 8
        self.children: dict[str, Child] = {}
        self.processes: Processes | None = None

    # -- start and stop

    def _envoy(self, name: str, boot: Mapping[str, Any], base_id: int) -> Child:
        path = self.run_dir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(dict(boot), sort_keys=False), encoding="utf-8")
        argv = [
            _find_envoy(),
            "-c",
            str(path),
            "--concurrency",
            "1",
            # Distinct base ids and no hot-restart shared memory: several Envoys (ours and anybody else's)
            # can run on one machine.
            "--base-id",
            str(base_id),
            "--disable-hot-restart",
            "--log-level",
            "warn",
        ]
        return self.supervisor.start(name, argv)

    def _wait(self, what: str, check: Callable[[], bool]) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not check():
            for child in self.supervisor.exited():
                raise BenchError(
                    f"{child.name} exited with code {child.process.returncode} during start-up; "
                    f"last lines of {child.log_file}:\n{child.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise BenchError(f"{what} did not become ready within {START_TIMEOUT_S:.0f} s")
            time.sleep(0.1)

    def start(self) -> None:
        _progress(f"starting the upstream Envoy ({self.settings.hosts} hosts: ports {self.upstream_ports})")
        self.children["upstream"] = self._envoy(
            "upstream", upstream_bootstrap(self.upstream_ports, self.upstream_admin), self.base_id
        )
        fleet_path = self.run_dir / "fleet.yaml"
        fleet_path.write_text(yaml.safe_dump(self.fleet.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
        for variant, listen in self.sockets.items():
            _progress(f"starting the {variant} processor on {listen}")
            argv = [sys.executable, "-m", "extproc.bench.overhead_server", variant, "--listen", listen]
            if self._routes(variant):
                argv += ["--config", str(fleet_path)]
            self.children[variant] = self.supervisor.start(f"processor-{variant}", argv)
        for k, variant in enumerate(self.variants, start=1):
            boot = variant_bootstrap(
                self.base_bootstrap,
                variant,
                listen_port=self.gateway_ports[variant],
                admin_port=self.admin_ports[variant],
                picker_listen=self.sockets.get(variant),
            )
            _progress(f"starting the {variant} gateway Envoy on 127.0.0.1:{self.gateway_ports[variant]}")
            self.children[f"gateway-{variant}"] = self._envoy(f"gateway-{variant}", boot, self.base_id + k)
        self._wait("the upstream Envoy", lambda: _http_get(f"http://127.0.0.1:{self.upstream_admin}/ready")[0] == 200)
        for variant in self.sockets:
            child = self.children[variant]
            self._wait(f"the {variant} processor", lambda c=child: READY_LINE in c.log_tail(50))  # type: ignore[misc]
        for variant in self.variants:
            port = self.gateway_ports[variant]
            self._wait(f"the {variant} gateway", lambda p=port: post(p)[0] == 200)  # type: ignore[misc]
        self._check_routing()
        self.processes = Processes(
            upstream=self.children["upstream"].process.pid,
            gateways={v: self.children[f"gateway-{v}"].process.pid for v in self.variants},
            processors={v: self.children[v].process.pid for v in self.sockets},
        )

    def _routes(self, variant: str) -> bool:
        """Whether ``variant``'s processor names upstream hosts: the picker's, and the bare one's routing answer."""
        return variant == "picker" or (variant == "bare" and self.settings.bare_answer == "routing")

    def _check_routing(self) -> None:
        """The picker (and a bare processor with the routing answer) names upstream hosts (echoed back by the
        upstream); the others name none."""
        endpoints = {f"127.0.0.1:{p}" for p in self.upstream_ports}
        for variant in self.variants:
            status, headers = post(self.gateway_ports[variant])
            named = [h for h in headers.get(ECHO_HEADER, "").split(",") if h]
            if self._routes(variant):
                if status != 200 or not named or not set(named) <= endpoints:
                    raise BenchError(f"the {variant} processor did not route (status {status}, hosts {named!r})")
            elif named:
                raise BenchError(f"the {variant} gateway sent a hosts header {named!r}")
        _progress("all gateways answer; the picker routes to the upstream hosts")

    def stop(self) -> None:
        self.supervisor.stop(timeout_s=5.0)

    # -- one measured run

    def _snapshot(self, variant: str) -> tuple[dict[str, float], dict[str, int], dict[str, int]]:
        assert self.processes is not None
        gateway = envoy_counters(self.admin_ports[variant], "^" + re.escape(gateway_stat_prefix()))
        upstream = envoy_counters(self.upstream_admin, r"^http\.up[0-9]+\.downstream_rq_total$")
        return self.processes.cpu(), gateway, upstream

    def _measure(self, variant: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        cpu0, gw0, up0 = self._snapshot(variant)
        machine0, own0 = machine_busy_seconds(), own_cpu_seconds()
        wall0 = time.monotonic()
        result = run()
        wall = time.monotonic() - wall0
        machine1, own1 = machine_busy_seconds(), own_cpu_seconds()
        cpu1, gw1, up1 = self._snapshot(variant)
        requests = int(result["completed"])
        cpu = {k: cpu1[k] - cpu0[k] for k in cpu0}
        result["wall_s"] = wall
        # How busy the machine was, and how much of that was not this benchmark (other users' work).
        bench_s = sum(cpu.values()) + own1 - own0
        busy_s = machine1 - machine0
        result["machine"] = {
            "busy_cores": busy_s / wall,
            "bench_cores": bench_s / wall,
            "other_cores": max(0.0, busy_s - bench_s) / wall,
        }
        result["gateway"] = gateway_summary(counter_delta(gw0, gw1))
        upstream = counter_delta(up0, up1)
        total_up = sum(upstream.values())
        result["upstream_share"] = {
            f"up{i}": (upstream.get(f"http.up{i}.downstream_rq_total", 0) / total_up if total_up else 0.0)
            for i in range(self.settings.hosts)
        }
        result["cpu_s"] = cpu
        result["cpu_us_per_request"] = {
            "processor": cpu_us_per_request(cpu[f"processor_{variant}"], requests)
            if f"processor_{variant}" in cpu
            else None,
            "gateway": cpu_us_per_request(cpu[f"gateway_{variant}"], requests),
            "upstream": cpu_us_per_request(cpu["upstream"], requests),
        }
        return result

    def run_wrk(self, variant: str, script: Path, duration_s: int) -> dict[str, Any]:
        assert self.settings.wrk is not None
        wrk = self.settings.wrk

        def go() -> dict[str, Any]:
            out = run_wrk(wrk, script, self.gateway_ports[variant], self.settings.connections, duration_s)
            out["completed"] = out["requests"]
            return out

        return self._measure(variant, go)

    def run_rate(self, variant: str, rate: float, duration_s: float) -> dict[str, Any]:
        port = self.gateway_ports[variant]
        records: list[OpenLoopRecords] = []

        def go() -> dict[str, Any]:
            loop = OpenLoop(port, request_bytes(port), initial_connections=8)
            rec = loop.run(constant_rate_offsets(rate, duration_s))
            records.append(rec)
            out = summarize_open_loop(rec, rate, self.settings.warmup_s)
            out["completed"] = sum(1 for s in rec.status if s == 200)
            out["generator_cpu_us_per_request"] = cpu_us_per_request(rec.generator_cpu_s, len(rec.intended))
            out["connections"] = rec.connections
            return out

        result = self._measure(variant, go)
        rec = records[0]
        idx = rec.measured(self.settings.warmup_s)
        result["_latencies_s"] = [rec.done[i] - rec.intended[i] for i in idx if rec.status[i] == 200]
        result["_lags_s"] = [rec.sent[i] - rec.intended[i] for i in idx if math.isfinite(rec.sent[i])]
        return result

    # -- phases

    def warm_up(self) -> None:
        _progress("warm-up: 1 s at 200 req/s per variant")
        for variant in self.variants:
            self.run_rate(variant, 200.0, 1.0)

    def max_phase(self) -> dict[str, Any]:
        s = self.settings
        if s.wrk is None:
            reason = s.wrk_missing or WRK_INSTALL_HINT
            _progress(f"maximum throughput: skipped. {reason}")
            return {"skipped": reason}
        script = self.run_dir / "post.lua"
        script.write_text(wrk_script(), encoding="utf-8")
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in self.variants}
        for r in range(s.rounds):
            for variant in rotated(self.variants, r):
                _progress(
                    f"max throughput, round {r + 1}/{s.rounds}: {variant} "
                    f"(wrk, {s.connections} connections, {s.max_duration_s} s)"
                )
                result = self.run_wrk(variant, script, s.max_duration_s)
                result["round"] = r
                runs[variant].append(result)
                _progress(
                    f"  {variant}: {result['rps']:.0f} req/s, p99 {result['latency']['p99_ms']:.2f} ms, "
                    f"errors {result['error_count']}, fail-open {result['gateway']['ext_proc_fail_open']}, "
                    f"other load {result['machine']['other_cores']:.2f} cores"
                )
                time.sleep(0.5)
        return summarize_max(runs, s)

    def rate_phase(self, max_rps: Mapping[str, float]) -> list[dict[str, Any]]:
        s = self.settings
        out = []
        for rate in s.rates:
            runs: dict[str, list[dict[str, Any]]] = {v: [] for v in self.variants}
            skipped: dict[str, str] = {}
            for variant in self.variants:
                if not reachable(rate, max_rps.get(variant)):
                    skipped[variant] = (
                        f"not reachable: best maximum-throughput round {max_rps[variant]:.0f} req/s "
                        f"(a rate above {REACHABLE_FRACTION:.0%} of it is not offered)"
                    )
                    _progress(f"{rate:g} req/s: {variant} {skipped[variant]}")
            active = [v for v in self.variants if v not in skipped]
            for r in range(s.rounds):
                for variant in rotated(active, r):
                    _progress(f"{rate:g} req/s, round {r + 1}/{s.rounds}: {variant} ({s.duration_s:g} s, open loop)")
                    result = self.run_rate(variant, rate, s.duration_s)
                    result["round"] = r
                    runs[variant].append(result)
                    lat = result["latency"]
                    _progress(
                        f"  {variant}: p50 {lat['p50_ms']:.3f} ms, p99 {lat['p99_ms']:.3f} ms, "
                        f"achieved {result['achieved_rps']:.0f} req/s, errors {result['error_count']}, "
                        f"lag p99 {result['lag']['p99_ms']:.3f} ms, "
                        f"fail-open {result['gateway']['ext_proc_fail_open']}, "
                        f"other load {result['machine']['other_cores']:.2f} cores"
                    )
                    time.sleep(0.3)
            out.append(summarize_rate(rate, runs, skipped, s))
        return out

    def soak(self, total: int, variant: str = "picker") -> dict[str, Any]:
        """N requests through one processor variant's gateway, its RSS sampled every ~50k requests."""
        assert self.processes is not None
        s = self.settings
        pid = self.processes.processors[variant]
        script = self.run_dir / "post.lua"
        script.write_text(wrk_script(), encoding="utf-8")
        series: list[dict[str, Any]] = [{"requests": 0, "rss_bytes": rss_bytes(pid), "elapsed_s": 0.0}]
        sent = 0
        chunk_s = 10
        cpu0 = cpu_seconds(pid)
        fail_open = 0
        errors = 0
        started = time.monotonic()
        _progress(f"soak: {total} requests through the {variant}, RSS every ~{SOAK_SAMPLE_EVERY} requests")
        while sent < total:
            want = min(SOAK_SAMPLE_EVERY, total - sent)
            if s.wrk is not None:
                result = self.run_wrk(variant, script, chunk_s)
                done_now = int(result["completed"])
                errors += int(result["error_count"])
                # The next chunk's duration aims at SOAK_SAMPLE_EVERY requests at the measured rate.
                rate = max(1.0, result["rps"])
                chunk_s = max(1, min(120, round(min(SOAK_SAMPLE_EVERY, total - sent - done_now) / rate)))
            else:
                result = self.run_rate(variant, s.soak_rate, want / s.soak_rate)
                done_now = int(result["completed"])
                errors += int(result["error_count"])
            fail_open += int(result["gateway"]["ext_proc_fail_open"])
            sent += done_now
            sample = {"requests": sent, "rss_bytes": rss_bytes(pid), "elapsed_s": time.monotonic() - started}
            series.append(sample)
            _progress(
                f"  soak: {sent}/{total} requests, {variant} RSS {sample['rss_bytes'] / 2**20:.1f} MiB, "
                f"{done_now / max(result['wall_s'], 1e-9):.0f} req/s"
            )
        rss = [p["rss_bytes"] for p in series]
        # The first sample is before any request (imports only); flatness is judged from the first sample
        # after traffic started, when pools and caches exist.
        warm = rss[1:] if len(rss) > 2 else rss
        return {
            "variant": variant,
            "requests": sent,
            "generator": "wrk" if s.wrk is not None else f"open loop at {s.soak_rate:g} req/s",
            "series": series,
            "rss_max_over_min": max(warm) / min(warm),
            "rss_max_over_min_including_cold": max(rss) / min(rss),
            "rss_last_over_first_warm": warm[-1] / warm[0],
            "growth_bytes_per_request": growth_per_request(series[1:] if len(series) > 2 else series),
            "errors": errors,
            "fail_open": fail_open,
            "processor_cpu_us_per_request": cpu_us_per_request(cpu_seconds(pid) - cpu0, sent),
            "elapsed_s": time.monotonic() - started,
        }


def growth_per_request(series: Sequence[Mapping[str, Any]]) -> float:
    """Least-squares slope of RSS (bytes) over requests; NaN with fewer than two distinct points."""
    xs = [float(p["requests"]) for p in series]
    ys = [float(p["rss_bytes"]) for p in series]
    if len(set(xs)) < 2:
        return math.nan
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def _sum_cpu(runs: Sequence[Mapping[str, Any]], key: str) -> float:
    return float(sum(r["cpu_s"].get(key, 0.0) for r in runs))


def _cpu_summary(variant: str, runs: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    requests = sum(int(r["completed"]) for r in runs)
    processor = f"processor_{variant}"
    return {
        "processor": cpu_us_per_request(_sum_cpu(runs, processor), requests)
        if any(processor in r["cpu_s"] for r in runs)
        else None,
        "gateway": cpu_us_per_request(_sum_cpu(runs, f"gateway_{variant}"), requests),
        "upstream": cpu_us_per_request(_sum_cpu(runs, "upstream"), requests),
    }


def _gateway_totals(runs: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    keys = GATEWAY_STATS.keys()
    return {k: int(sum(r["gateway"].get(k, 0) for r in runs)) for k in keys}


def summarize_max(runs: Mapping[str, Sequence[Mapping[str, Any]]], settings: Settings) -> dict[str, Any]:
    variants: dict[str, Any] = {}
    for variant, rs in runs.items():
        rps = [float(r["rps"]) for r in rs]
        variants[variant] = {
            "rps": median(rps),
            "rps_rounds": rps,
            "rps_best": max(rps, default=math.nan),
            "latency_p50_ms": median([r["latency"]["p50_ms"] for r in rs]),
            "latency_p99_ms": median([r["latency"]["p99_ms"] for r in rs]),
            "errors": int(sum(r["error_count"] for r in rs)),
            "gateway": _gateway_totals(rs),
            "cpu_us_per_request": _cpu_summary(variant, rs),
            "other_load_cores": median([float(r.get("machine", {}).get("other_cores", math.nan)) for r in rs]),
            "upstream_share": rs[-1]["upstream_share"] if rs else {},
        }
    ratios: dict[str, Any] = {}
    for num, den in (("picker", "bare"), ("picker", "plain"), ("bare", "plain")):
        if num in variants and den in variants:
            per_round = round_ratios(variants[num]["rps_rounds"], variants[den]["rps_rounds"])
            ratios[f"{num}/{den}"] = {"median": median(per_round), "rounds": per_round}
    return {
        "generator": f"wrk -t1 -c{settings.connections} -d{settings.max_duration_s}s (closed loop)",
        "rounds": settings.rounds,
        "variants": variants,
        "ratios": ratios,
        "runs": {v: [_public(r) for r in rs] for v, rs in runs.items()},
    }


def _public(result: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if not k.startswith("_")}


def _sustained(summary: Mapping[str, Any], gateway: Mapping[str, int], rate: float) -> bool:
    return bool(
        summary["error_count"] == 0
        and gateway.get("ext_proc_fail_open", 0) == 0
        and summary["achieved_rps"] >= SUSTAINED_FRACTION * rate
    )


def paired_added(
    variant_runs: Sequence[Mapping[str, Any]], plain_runs: Sequence[Mapping[str, Any]], key: str
) -> tuple[float, list[float]]:
    """Median over rounds of (variant - plain) for latency percentile ``key``, pairing runs by round.

    A round's runs of all variants are back to back, so a burst of machine noise that hits one round hits
    one pair; the median over pairs drops it, where pooled percentiles would keep it.
    """
    plain_by_round = {int(r["round"]): float(r["latency"][key]) for r in plain_runs}
    diffs = [
        float(r["latency"][key]) - plain_by_round[int(r["round"])]
        for r in variant_runs
        if int(r["round"]) in plain_by_round
    ]
    return median(diffs), diffs


def summarize_rate(
    rate: float, runs: Mapping[str, Sequence[Mapping[str, Any]]], skipped: Mapping[str, str], settings: Settings
) -> dict[str, Any]:
    """Per variant: the median over rounds of each round's percentiles (the headline), the percentiles of all
    rounds pooled, errors, lag and CPU; added latency over plain as the median of per-round differences."""
    variants: dict[str, Any] = {}
    for variant, rs in runs.items():
        if variant in skipped or not rs:
            continue
        latencies = [x for r in rs for x in r["_latencies_s"]]
        lags = sorted(x for r in rs for x in r["_lags_s"])
        errors = int(sum(r["error_count"] for r in rs))
        gateway = _gateway_totals(rs)
        achieved = median([float(r["achieved_rps"]) for r in rs])
        pooled = {"error_count": errors, "achieved_rps": achieved}
        variants[variant] = {
            "requests": int(sum(r["requests"] for r in rs)),
            "errors": errors,
            "achieved_rps": achieved,
            "latency": {key: median([float(r["latency"][key]) for r in rs]) for key in _LATENCY_KEYS},
            "latency_pooled": latency_summary(latencies),
            "latency_rounds_ms": {key: [r["latency"][key] for r in rs] for key in ("p50_ms", "p99_ms")},
            "lag": {
                "p50_ms": percentile(lags, 50) * 1e3,
                "p99_ms": percentile(lags, 99) * 1e3,
                "max_ms": lags[-1] * 1e3 if lags else math.nan,
            },
            "generator_cpu_us_per_request": median([float(r["generator_cpu_us_per_request"]) for r in rs]),
            "gateway": gateway,
            "cpu_us_per_request": _cpu_summary(variant, rs),
            "other_load_cores": median([float(r.get("machine", {}).get("other_cores", math.nan)) for r in rs]),
            "upstream_share": rs[-1]["upstream_share"],
            "sustained": _sustained(pooled, gateway, rate),
        }
    added: dict[str, Any] = {}
    added_pooled: dict[str, Any] = {}
    if "plain" in variants:
        for variant in PROCESSOR_VARIANTS:
            if variant in variants:
                added[variant] = {}
                for key in _LATENCY_KEYS:
                    value, diffs = paired_added(runs[variant], runs["plain"], key)
                    added[variant][key] = value
                    if key in ("p50_ms", "p99_ms"):
                        added[variant][f"{key.removesuffix('_ms')}_rounds_ms"] = diffs
                added_pooled[variant] = added_latency(
                    variants[variant]["latency_pooled"], variants["plain"]["latency_pooled"]
                )
    return {
        "rate_rps": rate,
        "duration_s": settings.duration_s,
        "rounds": settings.rounds,
        "variants": variants,
        "not_reachable": dict(skipped),
        "added_over_plain_ms": added,
        "added_over_plain_pooled_ms": added_pooled,
        "runs": {v: [_public(r) for r in rs] for v, rs in runs.items()},
    }


_LATENCY_KEYS: Final = ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "mean_ms")


def evaluate_targets(report: Mapping[str, Any]) -> dict[str, Any]:
    """The issue's targets, each with the measured value and pass/fail (None when not measured)."""
    out: dict[str, Any] = {}
    ratio = report.get("max_throughput", {}).get("ratios", {}).get("picker/bare", {}).get("median")
    out["throughput_picker_over_bare"] = {
        "target": f">= {TARGET_THROUGHPUT_RATIO}",
        "value": ratio,
        "pass": None if ratio is None or not math.isfinite(ratio) else bool(ratio >= TARGET_THROUGHPUT_RATIO),
    }
    at = next((r for r in report.get("fixed_rate", []) if r["rate_rps"] == TARGET_RATE), None)
    added = at["added_over_plain_ms"].get("picker") if at else None
    for key, limit in (("p50_ms", TARGET_ADDED_P50_MS), ("p99_ms", TARGET_ADDED_P99_MS)):
        value = added[key] if added else None
        out[f"added_{key.removesuffix('_ms')}_at_{TARGET_RATE:g}_rps_ms"] = {
            "target": f"<= {limit}",
            "value": value,
            "pass": None if value is None else bool(value <= limit),
        }
    return out


# ------------------------------------------------------------------------------------------------ output


def _f(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def _verdict(target: Mapping[str, Any]) -> str:
    return {True: "PASS", False: "FAIL", None: "n/a"}[target["pass"]]


def format_report(report: Mapping[str, Any]) -> str:
    lines: list[str] = []
    env = report["environment"]
    lines.append(
        f"extproc bench overhead: {env['cpus']} CPUs, Envoy {env['envoy_version']}, {report['settings']['hosts']}"
        f" upstream hosts, {report['settings']['rounds']} rounds per variant (alternating), load avg at start"
        f" {env['loadavg_start']}, at end {env.get('loadavg_end', '?')}"
    )
    mx = report["max_throughput"]
    lines.append("")
    if "skipped" in mx:
        lines.append(f"maximum sustained req/s: skipped ({mx['skipped']})")
    else:
        lines.append(f"maximum sustained req/s ({mx['generator']}, median of {mx['rounds']} rounds)")
        header = (
            f"{'variant':<8} {'req/s':>8} {'rounds':<22} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6}"
            f" {'fail-open':>9} {'other':>5} {'proc CPU µs/req':>15} {'envoy CPU µs/req':>16}"
        )
        lines += [header, "-" * len(header)]
        for variant, v in mx["variants"].items():
            rounds = " ".join(f"{x:.0f}" for x in v["rps_rounds"])
            lines.append(
                f"{variant:<8} {v['rps']:>8.0f} {rounds:<22} {v['latency_p50_ms']:>7.2f} {v['latency_p99_ms']:>7.2f}"
                f" {v['errors']:>6} {v['gateway']['ext_proc_fail_open']:>9} {_f(v['other_load_cores'], 2):>5}"
                f" {_f(v['cpu_us_per_request']['processor']):>15} {_f(v['cpu_us_per_request']['gateway']):>16}"
            )
        for name, ratio in mx["ratios"].items():
            rounds = " ".join(_f(x, 3) for x in ratio["rounds"])
            lines.append(f"ratio {name}: {_f(ratio['median'], 3)} (per round: {rounds})")
    lines.append("")
    lines.append(
        "latency at fixed rates (open loop, constant rate, from the intended send time; per round p50/p99, then the"
    )
    lines.append(
        "median over rounds; +p50/+p99 = median over rounds of (variant - plain) in the same round; pooled = all"
    )
    lines.append("rounds' requests together; other = CPU cores busy with work outside this benchmark)")
    header = (
        f"{'rate':>6} {'variant':<8} {'achieved':>8} {'p50 ms':>7} {'p99 ms':>7} {'+p50 ms':>8} {'+p99 ms':>8}"
        f" {'pooled p99':>10} {'errors':>6} {'fail-open':>9} {'lag p99':>7} {'other':>5} {'proc CPU µs/req':>15}"
        f" {'envoy CPU µs/req':>16}"
    )
    lines += [header, "-" * len(header)]
    for r in report["fixed_rate"]:
        for variant in VARIANTS:
            if variant in r["not_reachable"]:
                lines.append(f"{r['rate_rps']:>6.0f} {variant:<8} {r['not_reachable'][variant]}")
                continue
            v = r["variants"].get(variant)
            if v is None:
                continue
            add = r["added_over_plain_ms"].get(variant)
            flag = "" if v["sustained"] else "  NOT SUSTAINED"
            lines.append(
                f"{r['rate_rps']:>6.0f} {variant:<8} {v['achieved_rps']:>8.0f} {v['latency']['p50_ms']:>7.3f}"
                f" {v['latency']['p99_ms']:>7.3f}"
                f" {_f(add['p50_ms'] if add else None, 3):>8} {_f(add['p99_ms'] if add else None, 3):>8}"
                f" {v['latency_pooled']['p99_ms']:>10.3f}"
                f" {v['errors']:>6} {v['gateway']['ext_proc_fail_open']:>9} {v['lag']['p99_ms']:>7.3f}"
                f" {_f(v['other_load_cores'], 2):>5}"
                f" {_f(v['cpu_us_per_request']['processor']):>15} {_f(v['cpu_us_per_request']['gateway']):>16}{flag}"
            )
    lines.append("")
    lines.append("targets:")
    for name, t in report["targets"].items():
        lines.append(f"  {name}: {_f(t['value'], 3)} (target {t['target']}) {_verdict(t)}")
    return "\n".join(lines)


def format_soak(soak: Mapping[str, Any]) -> str:
    variant = soak.get("variant", "picker")
    lines = [f"soak: {soak['requests']} requests through the {variant} ({soak['generator']}), {variant} RSS:"]
    for p in soak["series"]:
        lines.append(f"  {p['requests']:>9} requests  {p['rss_bytes'] / 2**20:8.2f} MiB  at {p['elapsed_s']:7.1f} s")
    lines.append(
        f"RSS max/min (after the first requests): {soak['rss_max_over_min']:.3f}  "
        f"(including the idle start: {soak['rss_max_over_min_including_cold']:.3f}); "
        f"last/first: {soak['rss_last_over_first_warm']:.3f}; errors {soak['errors']}, fail-open {soak['fail_open']}, "
        f"{variant} CPU {_f(soak['processor_cpu_us_per_request'])} µs/request"
    )
    lines.append(
        f"RSS growth (least squares, after the first requests): {_f(soak['growth_bytes_per_request'])} bytes/request"
    )
    lines.append(f"target RSS flat within ±10%: {'PASS' if soak['rss_max_over_min'] <= 1.10 else 'FAIL'}")
    return "\n".join(lines)


def json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def _envoy_version() -> str:
    try:
        out = subprocess.run([_find_envoy(), "--version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, RuntimeError, subprocess.TimeoutExpired):
        return "?"
    match = re.search(r"/(\d+\.\d+\.\d+)/", out.stdout)
    return match.group(1) if match else "?"


def environment() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "loadavg_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "python": platform.python_version(),
        "compiled": compiled(),
        "envoy_version": _envoy_version(),
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n", encoding="utf-8")


def run(settings: Settings, output: Path, keep_dir: Path | None = None) -> int:
    """The whole benchmark (or the soak); prints the table, writes the JSON. Returns an exit status."""
    if settings.wrk is None and settings.wrk_missing == WRK_INSTALL_HINT:
        _progress(
            WRK_INSTALL_HINT
            + (
                "; the soak uses the open-loop generator"
                if settings.soak
                else "; the maximum-throughput phase is skipped"
            )
        )
    if keep_dir is not None:
        keep_dir.mkdir(parents=True, exist_ok=True)
        run_dir = keep_dir.resolve()
        cleanup = None
    else:
        # Short path: a Unix socket path must stay under 108 bytes.
        cleanup = tempfile.TemporaryDirectory(prefix="extproc-ovh-")
        run_dir = Path(cleanup.name)
    variants = (settings.soak_variant,) if settings.soak else VARIANTS
    bench = OverheadBench(settings, run_dir, variants)
    report: dict[str, Any] = {"environment": environment(), "settings": _settings_json(settings)}
    try:
        bench.start()
        if settings.soak:
            report["soak"] = bench.soak(settings.soak, settings.soak_variant)
        else:
            bench.warm_up()
            report["max_throughput"] = bench.max_phase()
            # Noise only ever lowers a round's throughput: the best round bounds what a variant can sustain.
            max_rps = {v: d["rps_best"] for v, d in report["max_throughput"].get("variants", {}).items()}
            report["fixed_rate"] = bench.rate_phase(max_rps)
            report["targets"] = evaluate_targets(report)
        report["environment"]["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except (RuntimeError, OSError) as exc:  # BenchError, find_envoy's StartupError, wrk failures
        print(f"extproc bench overhead: {exc}", file=sys.stderr)
        return 1
    finally:
        _progress("stopping")
        bench.stop()
        if cleanup is not None:
            cleanup.cleanup()
    report["notes"] = NOTES
    _write_json(output, report)
    print(format_soak(report["soak"]) if settings.soak else format_report(report))
    print(f"results: {output}")
    return 0


NOTES: Final = [
    "The picker variant runs the real request path (Processor, Scheduler, PickerMetrics) over a Datastore of "
    "the upstream hosts whose telemetry is kept fresh by a small task; the telemetry collector's HTTP polling "
    "(off the request path, a few polls per second) is excluded.",
    "Fixed-rate latency is measured from each request's intended send time (no coordinated omission); 'lag' is "
    "the generator's own actual-minus-intended send time, included in every variant's latency alike.",
    "CPU per request is utime+stime from /proc/<pid>/stat (all threads) over each phase divided by the requests "
    "completed in it; at low rates it includes the process's idle wake-ups.",
    "All processes share the machine (load generator, four Envoys, two processors): ratios from the same run are "
    "meaningful, absolute numbers depend on the machine.",
]


def _settings_json(s: Settings) -> dict[str, Any]:
    return {
        "rates": list(s.rates),
        "duration_s": s.duration_s,
        "max_duration_s": s.max_duration_s,
        "rounds": s.rounds,
        "connections": s.connections,
        "hosts": s.hosts,
        "warmup_s": s.warmup_s,
        "wrk": s.wrk,
        "soak": s.soak,
        "soak_rate": s.soak_rate if s.soak and s.wrk is None else None,
        "soak_variant": s.soak_variant if s.soak else None,
        "bare_answer": s.bare_answer,
        "model": MODEL,
        "request_bytes": len(REQUEST_BODY),
    }


# ---------------------------------------------------------------------------------------------- the CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``extproc bench overhead`` (see :func:`run_from_args`)."""
    parser.add_argument(
        "--output", "-o", type=Path, help=f"JSON results (default {DEFAULT_OUTPUT}, {DEFAULT_SOAK_OUTPUT} with --soak)"
    )
    parser.add_argument("--rates", type=float, nargs="+", default=list(DEFAULT_RATES), help="fixed rates, req/s")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per fixed-rate run (default 6)")
    parser.add_argument("--max-duration", type=int, default=6, help="seconds per wrk run (default 6)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per variant (default 5)")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections (default 16)")
    parser.add_argument("--hosts", type=int, default=3, help="upstream hosts in the fleet (default 3)")
    parser.add_argument("--wrk", help="the wrk binary (default: wrk on PATH)")
    parser.add_argument("--no-wrk", action="store_true", help="skip the maximum-throughput phase")
    parser.add_argument(
        "--soak",
        type=int,
        default=0,
        metavar="N",
        help="instead: send N requests through the picker and sample its RSS every ~50k",
    )
    parser.add_argument(
        "--soak-rate",
        type=float,
        default=1000.0,
        help="open-loop rate of the soak when wrk is missing (default 1000 req/s)",
    )
    parser.add_argument(
        "--soak-variant",
        choices=PROCESSOR_VARIANTS,
        default="picker",
        help="the processor the soak goes through (bare: is a growth grpc's or the picker's?)",
    )
    parser.add_argument(
        "--bare-answer",
        choices=("empty", "routing"),
        default="empty",
        help="the bare processor's constant answer: change nothing (default), or route as the picker does,"
        " naming every upstream host (then only the processor differs between bare and picker)",
    )
    parser.add_argument("--keep-dir", type=Path, help="keep configs and logs here instead of a deleted temp dir")


def settings_from_args(args: argparse.Namespace) -> Settings:
    if args.rounds < 1 or args.duration <= 0 or args.max_duration < 1 or args.connections < 1 or args.hosts < 1:
        raise ValueError("--rounds, --duration, --max-duration, --connections and --hosts must be positive")
    if any(r <= 0 for r in args.rates) or args.soak < 0 or args.soak_rate <= 0:
        raise ValueError("--rates, --soak and --soak-rate must be positive")
    wrk = None if args.no_wrk else find_wrk(args.wrk)
    return Settings(
        wrk_missing=None if wrk is not None else ("--no-wrk given" if args.no_wrk else WRK_INSTALL_HINT),
        rates=tuple(args.rates),
        duration_s=args.duration,
        max_duration_s=args.max_duration,
        rounds=args.rounds,
        connections=args.connections,
        hosts=args.hosts,
        wrk=wrk,
        soak=args.soak,
        soak_rate=args.soak_rate,
        soak_variant=args.soak_variant,
        bare_answer=args.bare_answer,
    )


def run_from_args(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        print(f"extproc bench overhead: {exc}", file=sys.stderr)
        return 2
    output = args.output or (DEFAULT_SOAK_OUTPUT if settings.soak else DEFAULT_OUTPUT)
    return run(settings, output, args.keep_dir)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="extproc bench overhead", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
