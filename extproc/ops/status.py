"""The fleet as the picker and Envoy see it: clients for the picker's HTTP endpoint (``/status``, drain,
undrain) and Envoy's admin ``/clusters``, and ``extproc status``, a table of hosts refreshed in place.

The clients are small interfaces (:class:`PickerApi`, :class:`EnvoyApi`) so that the operations in
:mod:`extproc.ops.plans` and :mod:`extproc.ops.execute` can be tested against fakes; :class:`HttpPicker`
and :class:`HttpEnvoyAdmin` are the real ones (``urllib``, with timeouts).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, TextIO

from extproc.config import Fleet, HostSpec
from extproc.ops import OpsError
from extproc.telemetry.envoy_admin import EndpointStatus, EnvoyAdminError, parse_clusters

DEFAULT_HTTP_TIMEOUT_S = 3.0
# ANSI: cursor home, clear screen. Written before each refresh of ``extproc status --watch``.
CLEAR = "\x1b[H\x1b[2J"


class PickerError(OpsError):
    """A picker did not answer, or answered something else than expected."""


class EnvoyError(OpsError):
    """Envoy's admin endpoint did not answer, or not with ``/clusters?format=json``."""


# --- the picker's /status --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PickerHost:
    """One host in the picker's ``/status`` (see :func:`extproc.datastore.host_status`)."""

    name: str
    tier: str
    fresh: bool = False
    routable: bool = False
    ready: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # model → READY versions
    in_flight: float = 0.0
    pending: int = 0
    service_ms: float | None = None
    queue_ms: float | None = None
    gpu_memory_used: int | None = None
    gpu_memory_total: int | None = None
    draining: bool = False
    ejected: bool = False
    unhealthy: bool = False
    age_s: Mapping[str, float | None] = field(default_factory=dict)

    @property
    def gpu_memory_free(self) -> int | None:
        if self.gpu_memory_used is None or not self.gpu_memory_total:
            return None
        return max(0, self.gpu_memory_total - self.gpu_memory_used)

    @property
    def gpu_memory_percent(self) -> float | None:
        if self.gpu_memory_used is None or not self.gpu_memory_total:
            return None
        return 100.0 * self.gpu_memory_used / self.gpu_memory_total


@dataclass(frozen=True, slots=True)
class PickerStatus:
    url: str
    ready: bool
    hosts: Mapping[str, PickerHost]


def _opt_float(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _opt_int(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def parse_picker_status(doc: Any, url: str = "") -> PickerStatus:
    """The decoded JSON of ``GET /status``. Tolerant of missing fields (older or newer pickers)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("hosts"), dict):
        raise PickerError(f"picker {url}: /status is not {{'ready': …, 'hosts': {{…}}}}")
    hosts: dict[str, PickerHost] = {}
    for name, raw in doc["hosts"].items():
        if not isinstance(raw, dict):
            raise PickerError(f"picker {url}: /status host {name!r} is not an object")
        ready_raw = raw.get("ready") or {}
        ready = {
            str(model): tuple(str(v) for v in versions)
            for model, versions in ready_raw.items()
            if isinstance(versions, list)
        }
        age_raw = raw.get("age_s") or {}
        hosts[str(name)] = PickerHost(
            name=str(name),
            tier=str(raw.get("tier", "?")),
            fresh=bool(raw.get("fresh", False)),
            routable=bool(raw.get("routable", False)),
            ready=ready,
            in_flight=_opt_float(raw.get("in_flight")) or 0.0,
            pending=_opt_int(raw.get("pending")) or 0,
            service_ms=_opt_float(raw.get("service_ms")),
            queue_ms=_opt_float(raw.get("queue_ms")),
            gpu_memory_used=_opt_int(raw.get("gpu_memory_used")),
            gpu_memory_total=_opt_int(raw.get("gpu_memory_total")),
            draining=bool(raw.get("draining", False)),
            ejected=bool(raw.get("ejected", False)),
            unhealthy=bool(raw.get("unhealthy", False)),
            age_s={str(k): _opt_float(v) for k, v in age_raw.items()} if isinstance(age_raw, dict) else {},
        )
    return PickerStatus(url=url, ready=bool(doc.get("ready", False)), hosts=hosts)


class PickerApi(Protocol):
    """One picker replica's HTTP endpoint."""

    @property
    def url(self) -> str: ...

    def status(self) -> PickerStatus: ...

    def drain(self, host: str) -> bool:
        """Stop routing new requests to ``host``; returns the host's ``draining`` flag afterwards."""
        ...

    def undrain(self, host: str) -> bool: ...


def _http_json(url: str, method: str, timeout_s: float) -> Any:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace").strip()
        with contextlib.suppress(ValueError, AttributeError):
            detail = json.loads(detail)["error"]
        raise OpsError(f"{method} {url}: HTTP {exc.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise OpsError(f"{method} {url}: {reason}") from None
    except ValueError as exc:
        raise OpsError(f"{method} {url}: not JSON: {exc}") from None


class HttpPicker:
    """The picker's HTTP endpoint at ``url`` (``http://metrics_address:metrics_port``)."""

    def __init__(self, url: str, timeout_s: float = DEFAULT_HTTP_TIMEOUT_S) -> None:
        self._url = url.rstrip("/")
        self.timeout_s = timeout_s

    @property
    def url(self) -> str:
        return self._url

    def status(self) -> PickerStatus:
        try:
            doc = _http_json(f"{self._url}/status", "GET", self.timeout_s)
        except OpsError as exc:
            raise PickerError(f"picker {exc}") from None
        return parse_picker_status(doc, self._url)

    def _set(self, host: str, action: str) -> bool:
        try:
            doc = _http_json(f"{self._url}/hosts/{host}/{action}", "POST", self.timeout_s)
        except OpsError as exc:
            raise PickerError(f"picker {exc}") from None
        return bool(doc.get("draining")) if isinstance(doc, dict) else False

    def drain(self, host: str) -> bool:
        return self._set(host, "drain")

    def undrain(self, host: str) -> bool:
        return self._set(host, "undrain")


def _url_host(address: str) -> str:
    if address in {"0.0.0.0", ""}:
        return "127.0.0.1"
    if address == "::":
        return "[::1]"
    return f"[{address}]" if ":" in address else address


def default_picker_url(fleet: Fleet) -> str:
    """The picker's HTTP endpoint as the fleet file sets it (a wildcard address is reached on loopback)."""
    return f"http://{_url_host(fleet.picker.metrics_address)}:{fleet.picker.metrics_port}"


def default_envoy_admin_url(fleet: Fleet) -> str:
    admin = fleet.envoy.admin
    return f"http://{_url_host(admin.address)}:{admin.port}"


# --- Envoy's admin /clusters ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EnvoyHost:
    """One host as one Envoy sees it, summed over its REST and gRPC endpoints."""

    active: int = 0  # rq_active + rq_pending_active: requests this Envoy has for the host right now
    ejected: bool = False
    unhealthy: bool = False
    listed: bool = False  # the host is a member of some triton_* cluster


class EnvoyApi(Protocol):
    @property
    def url(self) -> str: ...

    def endpoints(self) -> Mapping[str, EndpointStatus]:
        """``ip:port`` → status over the ``triton_*`` clusters."""
        ...


class HttpEnvoyAdmin:
    def __init__(self, url: str, timeout_s: float = DEFAULT_HTTP_TIMEOUT_S) -> None:
        self._url = url.rstrip("/")
        self.timeout_s = timeout_s

    @property
    def url(self) -> str:
        return self._url

    def endpoints(self) -> Mapping[str, EndpointStatus]:
        try:
            doc = _http_json(f"{self._url}/clusters?format=json", "GET", self.timeout_s)
            return parse_clusters(doc)
        except (OpsError, EnvoyAdminError) as exc:
            raise EnvoyError(f"envoy admin {exc}") from None


def envoy_hosts(hosts: Sequence[HostSpec], endpoints: Mapping[str, EndpointStatus]) -> dict[str, EnvoyHost]:
    out: dict[str, EnvoyHost] = {}
    for host in hosts:
        found = [s for key in (host.http_endpoint, host.grpc_endpoint) if (s := endpoints.get(key)) is not None]
        out[host.name] = EnvoyHost(
            active=sum(s.rq_active + s.rq_pending_active for s in found),
            ejected=any(s.failed_outlier_check for s in found),
            unhealthy=any(s.failed_active_health_check for s in found),
            listed=bool(found),
        )
    return out


# --- extproc status -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What ``extproc status`` shows: each picker's ``/status`` (or why not) and each Envoy's view."""

    hosts: tuple[HostSpec, ...]
    pickers: tuple[tuple[str, PickerStatus | str], ...]  # url → status, or the error message
    envoys: tuple[tuple[str, Mapping[str, EnvoyHost] | str], ...]
    taken_at: datetime


def collect(hosts: Sequence[HostSpec], pickers: Sequence[PickerApi], envoys: Sequence[EnvoyApi]) -> Snapshot:
    """Ask every picker and Envoy at once; an unreachable one is reported in the snapshot, not raised."""

    def picker_view(picker: PickerApi) -> PickerStatus | str:
        try:
            return picker.status()
        except OpsError as exc:
            return str(exc)

    def envoy_view(envoy: EnvoyApi) -> Mapping[str, EnvoyHost] | str:
        try:
            return envoy_hosts(hosts, envoy.endpoints())
        except OpsError as exc:
            return str(exc)

    with ThreadPoolExecutor(max_workers=max(1, len(pickers) + len(envoys))) as pool:
        picker_futures = [pool.submit(picker_view, p) for p in pickers]
        envoy_futures = [pool.submit(envoy_view, e) for e in envoys]
        return Snapshot(
            hosts=tuple(hosts),
            pickers=tuple((p.url, f.result()) for p, f in zip(pickers, picker_futures, strict=True)),
            envoys=tuple((e.url, f.result()) for e, f in zip(envoys, envoy_futures, strict=True)),
            taken_at=datetime.now(UTC),
        )


def format_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], right: frozenset[int] = frozenset()
) -> list[str]:
    """Plain text columns, two spaces apart; columns in ``right`` are right-aligned."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        parts = [c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(cells)]
        return "  ".join(parts).rstrip()

    return [line(headers), *(line(r) for r in rows)]


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def host_state(host: PickerHost | None, envoy: EnvoyHost | None) -> str:
    """One word or a few: ``ok`` when the picker may route to the host, else every reason it may not."""
    if host is None:
        if envoy is None:
            return "unknown"
        flags = [f for f, on in (("ejected", envoy.ejected), ("unhealthy", envoy.unhealthy)) if on]
        return ",".join(flags) or ("up (envoy)" if envoy.listed else "not in envoy")
    flags = [
        f
        for f, on in (
            ("draining", host.draining),
            ("ejected", host.ejected),
            ("unhealthy", host.unhealthy),
            ("stale", not host.fresh),
        )
        if on
    ]
    if not flags and not host.routable:
        flags.append("no-envoy-view")
    return ",".join(flags) or "ok"


def _age(host: PickerHost) -> str:
    ages = [a for k, a in host.age_s.items() if k in {"metrics", "index"}]
    if not ages or any(a is None for a in ages):
        return "never"
    return f"{max(a for a in ages if a is not None):.1f}"


def render(snapshot: Snapshot) -> str:
    """The ``extproc status`` text: per picker, a table of hosts; a line per unreachable picker or Envoy."""
    lines: list[str] = [f"extproc status  {snapshot.taken_at.astimezone():%Y-%m-%d %H:%M:%S}"]
    envoy_views = [view for _, view in snapshot.envoys if not isinstance(view, str)]
    for url, view in snapshot.envoys:
        lines.append(f"envoy admin {url}: " + (view if isinstance(view, str) else "ok"))
    envoy_merged: dict[str, EnvoyHost] = {}
    for view in envoy_views:
        for name, e in view.items():
            seen = envoy_merged.get(name)
            envoy_merged[name] = (
                e
                if seen is None
                else EnvoyHost(
                    active=seen.active + e.active,
                    ejected=seen.ejected or e.ejected,
                    unhealthy=seen.unhealthy or e.unhealthy,
                    listed=seen.listed or e.listed,
                )
            )
    headers = [
        "HOST",
        "TIER",
        "STATE",
        "AGE s",
        "IN-FLIGHT",
        "ENVOY",
        "PENDING",
        "SERVICE ms",
        "QUEUE ms",
        "GPU MEM",
        "MODELS READY",
    ]
    right = frozenset({3, 4, 5, 6, 7, 8, 9})
    pickers = snapshot.pickers or (("(no picker)", "no picker given"),)
    for url, status in pickers:
        lines.append("")
        if isinstance(status, str):
            lines.append(f"picker {url}: UNREACHABLE: {status}")
        else:
            lines.append(f"picker {url}: {'ready' if status.ready else 'NOT READY'}, {len(status.hosts)} hosts")
        rows: list[list[str]] = []
        picker_hosts: Mapping[str, PickerHost] = {} if isinstance(status, str) else status.hosts
        names = [h.name for h in snapshot.hosts] + sorted(set(picker_hosts) - {h.name for h in snapshot.hosts})
        tiers = {h.name: h.tier.value for h in snapshot.hosts}
        for name in names:
            host = picker_hosts.get(name)
            envoy = envoy_merged.get(name) if envoy_views else None
            gpu = host.gpu_memory_percent if host is not None else None
            rows.append(
                [
                    name,
                    host.tier if host is not None else tiers.get(name, "?"),
                    host_state(host, envoy),
                    _age(host) if host is not None else "-",
                    _num(host.in_flight, 0 if host.in_flight.is_integer() else 2) if host is not None else "-",
                    str(envoy.active) if envoy is not None else "-",
                    str(host.pending) if host is not None else "-",
                    _num(host.service_ms) if host is not None else "-",
                    _num(host.queue_ms) if host is not None else "-",
                    f"{gpu:.0f}%" if gpu is not None else "-",
                    _models(host),
                ]
            )
        lines.extend(format_table(headers, rows, right))
    return "\n".join(lines) + "\n"


def _models(host: PickerHost | None) -> str:
    if host is None:
        return "-"
    parts = []
    for model, versions in sorted(host.ready.items()):
        parts.append(model if versions == ("1",) else f"{model}:{','.join(versions)}")
    return " ".join(parts) or "(none)"


def snapshot_json(snapshot: Snapshot) -> dict[str, Any]:
    def picker(status: PickerStatus | str) -> dict[str, Any]:
        if isinstance(status, str):
            return {"error": status}
        return {
            "ready": status.ready,
            "hosts": {
                name: {
                    "tier": h.tier,
                    "state": host_state(h, None),
                    "fresh": h.fresh,
                    "routable": h.routable,
                    "draining": h.draining,
                    "ejected": h.ejected,
                    "unhealthy": h.unhealthy,
                    "in_flight": h.in_flight,
                    "pending": h.pending,
                    "service_ms": h.service_ms,
                    "queue_ms": h.queue_ms,
                    "gpu_memory_used": h.gpu_memory_used,
                    "gpu_memory_total": h.gpu_memory_total,
                    "ready": {m: list(v) for m, v in h.ready.items()},
                    "age_s": dict(h.age_s),
                }
                for name, h in status.hosts.items()
            },
        }

    def envoy(view: Mapping[str, EnvoyHost] | str) -> dict[str, Any]:
        if isinstance(view, str):
            return {"error": view}
        return {
            "hosts": {
                n: {"active": e.active, "ejected": e.ejected, "unhealthy": e.unhealthy, "listed": e.listed}
                for n, e in view.items()
            }
        }

    return {
        "taken_at": snapshot.taken_at.isoformat(),
        "pickers": {url: picker(s) for url, s in snapshot.pickers},
        "envoys": {url: envoy(v) for url, v in snapshot.envoys},
    }


def _fit(text: str, columns: int) -> str:
    """Cut lines to the terminal's width so a refresh never wraps (and scrolls) the screen."""
    return "\n".join(line[:columns] for line in text.splitlines()) + "\n"


def snapshot_ok(snapshot: Snapshot) -> bool:
    return bool(snapshot.pickers) and all(not isinstance(s, str) for _, s in snapshot.pickers)


def run_status(
    hosts: Sequence[HostSpec],
    pickers: Sequence[PickerApi],
    envoys: Sequence[EnvoyApi],
    *,
    watch_s: float | None,
    as_json: bool = False,
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
        out.write(json.dumps(snapshot_json(snapshot), indent=2) + "\n" if as_json else render(snapshot))
        out.flush()
        return 0 if snapshot_ok(snapshot) else 1
    try:
        for n in frames():
            if n:
                sleep(watch_s)
            snapshot = collect(hosts, pickers, envoys)
            if as_json:
                out.write(json.dumps(snapshot_json(snapshot)) + "\n")
            else:
                columns = shutil.get_terminal_size((200, 50)).columns
                footer = f"\nrefreshing every {watch_s:g} s; Ctrl-C to stop\n"
                out.write(CLEAR + _fit(render(snapshot) + footer, columns))
            out.flush()
    except KeyboardInterrupt:
        out.write("\n")
    return 0


def run_cli(args: Any, fleet: Fleet, out: TextIO | None = None) -> int:
    """``extproc status``: ``--once``, ``--watch [SECONDS]`` (the default on a terminal), ``--json``."""
    out = out or sys.stdout
    pickers = [HttpPicker(url, args.timeout) for url in (args.picker or [default_picker_url(fleet)])]
    envoys = (
        []
        if args.no_envoy
        else [HttpEnvoyAdmin(url, args.timeout) for url in (args.envoy or [default_envoy_admin_url(fleet)])]
    )
    watch_s: float | None = args.watch
    if watch_s is None and not args.once and not args.json and out.isatty():
        watch_s = 2.0
    if args.once:
        watch_s = None
    if watch_s is not None and watch_s <= 0:
        print("extproc status: --watch needs a positive number of seconds", file=sys.stderr)
        return 2
    return run_status(fleet.hosts, pickers, envoys, watch_s=watch_s, as_json=args.json, out=out)
