"""The fleet as the picker and Envoy see it: clients for the picker's HTTP endpoint (``/status``, drain,
undrain) and Envoy's admin ``/clusters``, and ``extproc status``, a table of hosts refreshed in place.

The clients are small interfaces (:class:`PickerApi`, :class:`EnvoyApi`) so that the operations in
:mod:`extproc.ops.plans` and :mod:`extproc.ops.execute` can be tested against fakes; :class:`HttpPicker`
and :class:`HttpEnvoyAdmin` are the real ones (``urllib``, with timeouts).
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Final, Protocol, TextIO

from prometheus_client.parser import text_string_to_metric_families

from extproc.config import Fleet, HostSpec
from extproc.control import AUTHORIZATION, SCHEME
from extproc.ops import STATE_FLAGS, OpsError
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
class ModelLoad:
    """One model's admission counts from the picker's ``/metrics``, since the picker started."""

    admitted: float = 0.0
    refused: float = 0.0  # for load: overloaded or over its client's fair share
    refused_at: float | None = None  # Unix time of the last such refusal


@dataclass(frozen=True, slots=True)
class PickerStatus:
    url: str
    ready: bool
    hosts: Mapping[str, PickerHost]
    overload: Mapping[str, ModelLoad] = field(default_factory=dict)

    def overloaded(self, now: float) -> list[str]:
        """The models that refused requests for load within the last :data:`OVERLOADED_S` seconds."""
        recent = now - OVERLOADED_S
        return sorted(m for m, load in self.overload.items() if load.refused_at and load.refused_at >= recent)


# A model that refused a request for load this recently is shown as overloaded.
OVERLOADED_S: Final = 10.0


def parse_overload(text: str) -> dict[str, ModelLoad]:
    """``extproc_admissions_total`` and ``extproc_overload_refused_at_seconds`` of a picker's ``/metrics``
    text, per model (summed over priorities; the text of a leader already sums its workers)."""
    admitted: dict[str, float] = {}
    refused: dict[str, float] = {}
    refused_at: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            model = sample.labels.get("model")
            if model is None:
                continue
            if sample.name == "extproc_admissions_total":
                into = admitted if sample.labels.get("outcome") == "admitted" else refused
                into[model] = into.get(model, 0.0) + sample.value
            elif sample.name == "extproc_overload_refused_at_seconds":
                refused_at[model] = max(refused_at.get(model, 0.0), sample.value)
    models = set(admitted) | set(refused) | set(refused_at)
    return {m: ModelLoad(admitted.get(m, 0.0), refused.get(m, 0.0), refused_at.get(m)) for m in sorted(models)}


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


def _http_json(url: str, method: str, timeout_s: float, headers: Mapping[str, str] | None = None) -> Any:
    request = urllib.request.Request(
        url, method=method, data=b"" if method == "POST" else None, headers=dict(headers or {})
    )
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
    """The picker's HTTP endpoint at ``url`` (``http://metrics_address:metrics_port``). ``control_token``:
    sent with drain and undrain (see :mod:`extproc.control`); reads need none."""

    def __init__(self, url: str, timeout_s: float = DEFAULT_HTTP_TIMEOUT_S, control_token: str | None = None) -> None:
        self._url = url.rstrip("/")
        self.timeout_s = timeout_s
        self._control = {} if control_token is None else {AUTHORIZATION: f"{SCHEME} {control_token}"}

    @property
    def url(self) -> str:
        return self._url

    def status(self) -> PickerStatus:
        try:
            doc = _http_json(f"{self._url}/status", "GET", self.timeout_s)
        except OpsError as exc:
            raise PickerError(f"picker {exc}") from None
        status = parse_picker_status(doc, self._url)
        # Admissions come from /metrics; without them the rest of the status still stands.
        try:
            with urllib.request.urlopen(f"{self._url}/metrics", timeout=self.timeout_s) as response:
                text = response.read().decode(errors="replace")
        except (urllib.error.URLError, OSError):
            return status
        return replace(status, overload=parse_overload(text))

    def _set(self, host: str, action: str) -> bool:
        try:
            doc = _http_json(f"{self._url}/hosts/{host}/{action}", "POST", self.timeout_s, self._control)
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


def fit_list(items: Sequence[str], width: int, sep: str = " ") -> str:
    """``items`` joined, as many as fit in ``width`` characters, then ``+N`` for the rest."""
    text = ""
    for i, item in enumerate(items):
        candidate = f"{text}{sep}{item}" if text else item
        rest = len(items) - i - 1
        if len(candidate) + (len(f"{sep}+{rest}") if rest else 0) > width:
            more = len(items) - i
            return f"{text}{sep}+{more}" if text else f"+{more}"
        text = candidate
    return text


def fit_lines(lines: Sequence[str], width: int) -> list[str]:
    """Lines no wider than ``width``: a message is wrapped (indented), a table row (columns are two spaces
    apart) cut, since wrapping it would break its columns."""
    out: list[str] = []
    for line in lines:
        if len(line) <= width:
            out.append(line)
        elif "  " in line.strip():
            out.append(line[:width])
        else:
            out.extend(textwrap.wrap(line, width, subsequent_indent="    ", break_on_hyphens=False))
    return out


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


def _age_s(host: PickerHost) -> float | None:
    """The older of the host's metrics and index ages; None: one of them never arrived."""
    ages = [a for k, a in host.age_s.items() if k in {"metrics", "index"}]
    if not ages or any(a is None for a in ages):
        return None
    return max(a for a in ages if a is not None)


def _age(host: PickerHost) -> str:
    age = _age_s(host)
    return "never" if age is None else f"{age:.1f}"


# What ``extproc status`` can show of a fleet of any size: filters, an order, a count, a width.

DEFAULT_WIDTH: Final = 120


@dataclass(frozen=True, slots=True)
class View:
    """Which hosts ``extproc status`` shows of each picker (every filter given must hold), in which order
    (``name``: the fleet file's; a number: largest first), how many (``top``), within ``width`` columns."""

    tiers: frozenset[str] = frozenset()
    states: frozenset[str] = frozenset()
    models: frozenset[str] = frozenset()
    sort: str = "name"
    top: int | None = None
    width: int = DEFAULT_WIDTH

    @property
    def filtered(self) -> bool:
        return bool(self.tiers or self.states or self.models)

    def describe(self) -> str:
        parts = [f"--tier {t}" for t in sorted(self.tiers)] + [f"--state {s}" for s in sorted(self.states)]
        return " ".join(parts + [f"--model {m}" for m in sorted(self.models)])


@dataclass(frozen=True, slots=True)
class HostRow:
    """One host as one picker (and every Envoy, merged) sees it."""

    name: str
    tier: str
    host: PickerHost | None
    envoy: EnvoyHost | None
    state: str

    def matches(self, view: View) -> bool:
        if view.tiers and self.tier not in view.tiers:
            return False
        if view.models and (self.host is None or not view.models & set(self.host.ready)):
            return False
        if not view.states:
            return True
        flags = set(self.state.split(","))
        return any((s == "not-ok" and self.state != "ok") or s in flags for s in view.states)


def _sort_value(row: HostRow, key: str) -> float | None:
    host, envoy = row.host, row.envoy
    if key == "envoy":
        return None if envoy is None else float(envoy.active)
    if host is None:
        return None
    if key == "age":
        age = _age_s(host)
        return math.inf if age is None else age  # never heard from: the oldest
    values = {
        "in-flight": host.in_flight,
        "pending": float(host.pending),
        "queue": host.queue_ms,
        "service": host.service_ms,
        "gpu": host.gpu_memory_percent,
    }
    return values[key]


def select(rows: Sequence[HostRow], view: View) -> list[HostRow]:
    """The rows ``view`` shows, in its order (before ``top``)."""
    chosen = [r for r in rows if r.matches(view)]
    if view.sort == "state":
        return sorted(chosen, key=lambda r: r.state == "ok")
    if view.sort != "name":
        # Largest first; hosts without the number last (sorted is stable: fleet order among equals).
        keyed = [(r, _sort_value(r, view.sort)) for r in chosen]
        keyed.sort(key=lambda rv: (rv[1] is None, -(rv[1] or 0.0)))
        return [r for r, _ in keyed]
    return chosen


def summarize(rows: Sequence[HostRow]) -> dict[str, Any]:
    """Counts and sums over ``rows``: what one line of the per-tier summary shows."""
    hosts = [r.host for r in rows if r.host is not None]
    flags = [set(r.state.split(",")) for r in rows]
    envoys = [r.envoy.active for r in rows if r.envoy is not None]
    queues = [h.queue_ms for h in hosts if h.queue_ms is not None]
    gpus = [h for h in hosts if h.gpu_memory_used is not None and h.gpu_memory_total]
    gpu_total = sum(h.gpu_memory_total or 0 for h in gpus)
    return {
        "hosts": len(rows),
        "ok": sum(r.state == "ok" for r in rows),
        **{flag: sum(flag in f for f in flags) for flag in STATE_FLAGS},
        # Not ok for another reason: the picker does not list the host, or has no Envoy view of it.
        "other": sum(r.state != "ok" and not f.intersection(STATE_FLAGS) for r, f in zip(rows, flags, strict=True)),
        "in_flight": round(sum(h.in_flight for h in hosts), 2),
        "envoy_active": sum(envoys) if envoys else None,
        "pending": sum(h.pending for h in hosts),
        "queue_ms_max": max(queues) if queues else None,
        "gpu_memory_percent": (
            round(100.0 * sum(h.gpu_memory_used or 0 for h in gpus) / gpu_total, 1) if gpu_total else None
        ),
        "models_ready": len({m for h in hosts for m in h.ready}),
    }


def summaries(rows: Sequence[HostRow]) -> dict[str, dict[str, Any]]:
    """One summary per tier (in the fleet's order), and ``all`` where there are several tiers."""
    tiers = list(dict.fromkeys(r.tier for r in rows))
    out = {tier: summarize([r for r in rows if r.tier == tier]) for tier in tiers}
    if len(tiers) > 1:
        out["all"] = summarize(rows)
    return out


def _merged_envoys(snapshot: Snapshot) -> dict[str, EnvoyHost] | None:
    """Every Envoy's view summed (each has its own requests in flight); None: no Envoy answered."""
    views = [view for _, view in snapshot.envoys if not isinstance(view, str)]
    if not views:
        return None
    merged: dict[str, EnvoyHost] = {}
    for view in views:
        for name, e in view.items():
            seen = merged.get(name)
            merged[name] = (
                e
                if seen is None
                else EnvoyHost(
                    active=seen.active + e.active,
                    ejected=seen.ejected or e.ejected,
                    unhealthy=seen.unhealthy or e.unhealthy,
                    listed=seen.listed or e.listed,
                )
            )
    return merged


def host_rows(snapshot: Snapshot, status: PickerStatus | str) -> list[HostRow]:
    """Every host of the fleet file, then any other the picker lists (discovered), in that order."""
    envoys = _merged_envoys(snapshot)
    picker_hosts: Mapping[str, PickerHost] = {} if isinstance(status, str) else status.hosts
    known = {h.name for h in snapshot.hosts}
    tiers = {h.name: h.tier.value for h in snapshot.hosts}
    rows = []
    for name in [h.name for h in snapshot.hosts] + sorted(set(picker_hosts) - known):
        host = picker_hosts.get(name)
        envoy = envoys.get(name) if envoys is not None else None
        tier = host.tier if host is not None else tiers.get(name, "?")
        rows.append(HostRow(name, tier, host, envoy, host_state(host, envoy)))
    return rows


def _summary_lines(sums: Mapping[str, Mapping[str, Any]]) -> list[str]:
    headers = ["TIER", "HOSTS", "OK", *(f.upper() for f in STATE_FLAGS), "OTHER", "IN-FLIGHT", "ENVOY", "PENDING"]
    headers += ["QUEUE max", "GPU MEM", "MODELS"]
    rows = []
    for tier, s in sums.items():
        in_flight = float(s["in_flight"])
        rows.append(
            [
                tier,
                *(str(s[k]) for k in ("hosts", "ok", *STATE_FLAGS, "other")),
                _num(in_flight, 0 if in_flight.is_integer() else 2),
                "-" if s["envoy_active"] is None else str(s["envoy_active"]),
                str(s["pending"]),
                _num(s["queue_ms_max"]),
                "-" if s["gpu_memory_percent"] is None else f"{s['gpu_memory_percent']:.0f}%",
                str(s["models_ready"]),
            ]
        )
    return format_table(headers, rows, frozenset(range(1, len(headers))))


_HOST_HEADERS: Final = ("HOST", "TIER", "STATE", "AGE s", "IN-FL", "ENVOY", "PEND", "SVC ms", "QUEUE ms", "GPU")
_MODELS_HEADER: Final = "MODELS READY"


def _host_lines(rows: Sequence[HostRow], width: int) -> list[str]:
    cells: list[list[str]] = []
    for row in rows:
        host = row.host
        gpu = host.gpu_memory_percent if host is not None else None
        cells.append(
            [
                row.name,
                row.tier,
                row.state,
                _age(host) if host is not None else "-",
                _num(host.in_flight, 0 if host.in_flight.is_integer() else 2) if host is not None else "-",
                str(row.envoy.active) if row.envoy is not None else "-",
                str(host.pending) if host is not None else "-",
                _num(host.service_ms) if host is not None else "-",
                _num(host.queue_ms) if host is not None else "-",
                f"{gpu:.0f}%" if gpu is not None else "-",
            ]
        )
    # The models column takes what the others leave of the width, at least its header's width.
    used = sum(max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(_HOST_HEADERS))
    room = max(len(_MODELS_HEADER), width - used - 2 * len(_HOST_HEADERS))
    for row, line in zip(rows, cells, strict=True):
        line.append(_models(row.host, room))
    return format_table([*_HOST_HEADERS, _MODELS_HEADER], cells, frozenset({3, 4, 5, 6, 7, 8, 9}))


def _models(host: PickerHost | None, width: int) -> str:
    if host is None:
        return "-"
    parts = [m if v == ("1",) else f"{m}:{','.join(v)}" for m, v in sorted(host.ready.items())]
    return fit_list(parts, width) or "(none)"


def render(snapshot: Snapshot, view: View = View()) -> str:
    """The ``extproc status`` text: per picker, a summary line per tier and the hosts ``view`` selects; a
    line per unreachable picker or Envoy. No line is wider than ``view.width``."""
    lines: list[str] = [f"extproc status  {snapshot.taken_at.astimezone():%Y-%m-%d %H:%M:%S}"]
    for url, envoy in snapshot.envoys:
        lines.append(f"envoy admin {url}: " + (envoy if isinstance(envoy, str) else "ok"))
    pickers = snapshot.pickers or (("(no picker)", "no picker given"),)
    for url, status in pickers:
        lines.append("")
        rows = host_rows(snapshot, status)
        chosen = select(rows, view)
        head = f"picker {url}: " + (
            f"UNREACHABLE: {status}"
            if isinstance(status, str)
            else f"{'ready' if status.ready else 'NOT READY'}, {len(status.hosts)} hosts"
        )
        if view.filtered:
            head += f"; {len(chosen)} of {len(rows)} match {view.describe()}"
        lines.append(head)
        if not isinstance(status, str):
            lines.extend(_overload_lines(status, snapshot.taken_at.timestamp()))
        lines.extend(_summary_lines(summaries(chosen)))
        shown = chosen if view.top is None else chosen[: view.top]
        if shown:
            lines.append("")
            lines.extend(_host_lines(shown, view.width))
        if len(shown) < len(chosen):
            lines.append(f"... {len(chosen) - len(shown)} more hosts (--top N, --sort KEY, --tier/--state/--model)")
    return "\n".join(fit_lines(lines, view.width)) + "\n"


def _overload_lines(status: PickerStatus, now: float) -> list[str]:
    """A line naming the models that refused requests for load lately, with their counts since start."""
    overloaded = status.overloaded(now)
    if not overloaded:
        return []
    parts = []
    for model in overloaded:
        load = status.overload[model]
        parts.append(f"{model} (refused {load.refused:,.0f} of {load.refused + load.admitted:,.0f} since start)")
    return [f"overloaded (refusing in the last {OVERLOADED_S:.0f} s): " + ", ".join(parts)]


def snapshot_json(snapshot: Snapshot, view: View = View()) -> dict[str, Any]:
    """``--json``: per picker, the summary per tier and the hosts ``view`` selects (in its order)."""

    def picker(status: PickerStatus | str) -> dict[str, Any]:
        if isinstance(status, str):
            return {"error": status}
        chosen = select(host_rows(snapshot, status), view)
        shown = chosen if view.top is None else chosen[: view.top]
        now = snapshot.taken_at.timestamp()
        return {
            "ready": status.ready,
            "overloaded": status.overloaded(now),
            "admissions": {
                m: {"admitted": load.admitted, "refused": load.refused, "refused_at": load.refused_at}
                for m, load in status.overload.items()
            },
            "summary": summaries(chosen),
            "hosts": {
                row.name: {
                    "tier": h.tier,
                    "state": row.state,
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
                for row in shown
                if (h := row.host) is not None
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


def _fit(text: str, columns: int, rows: int) -> str:
    """Cut the frame to the terminal so a refresh never wraps or scrolls the screen; the last line (how to
    stop) stays."""
    lines = [line[:columns] for line in text.splitlines()]
    if len(lines) >= rows:
        cut = len(lines) - rows + 2
        lines = [*lines[: rows - 3], f"... {cut} more lines (--top N, --tier/--state/--model)", lines[-1]]
    return "\n".join(lines) + "\n"


def snapshot_ok(snapshot: Snapshot) -> bool:
    return bool(snapshot.pickers) and all(not isinstance(s, str) for _, s in snapshot.pickers)


def run_status(
    hosts: Sequence[HostSpec],
    pickers: Sequence[PickerApi],
    envoys: Sequence[EnvoyApi],
    *,
    watch_s: float | None,
    as_json: bool = False,
    view: View = View(),
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
        out.write(json.dumps(snapshot_json(snapshot, view), indent=2) + "\n" if as_json else render(snapshot, view))
        out.flush()
        return 0 if snapshot_ok(snapshot) else 1
    try:
        for n in frames():
            if n:
                sleep(watch_s)
            snapshot = collect(hosts, pickers, envoys)
            if as_json:
                out.write(json.dumps(snapshot_json(snapshot, view)) + "\n")
            else:
                size = shutil.get_terminal_size((view.width, 50))
                footer = f"\nrefreshing every {watch_s:g} s; Ctrl-C to stop\n"
                frame = render(snapshot, replace(view, width=size.columns)) + footer
                out.write(CLEAR + _fit(frame, size.columns, size.lines))
            out.flush()
    except KeyboardInterrupt:
        out.write("\n")
    return 0


def run_cli(args: Any, fleet: Fleet, out: TextIO | None = None) -> int:
    """``extproc status``: ``--once``, ``--watch [SECONDS]`` (the default on a terminal), ``--json``, and
    the view: ``--tier``, ``--state``, ``--model``, ``--sort``, ``--top``."""
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
    if args.top is not None and args.top < 1:
        print("extproc status: --top needs a positive number of hosts", file=sys.stderr)
        return 2
    view = View(
        tiers=frozenset(args.tier or ()),
        states=frozenset(args.state or ()),
        models=frozenset(args.model or ()),
        sort=args.sort,
        top=args.top,
        width=shutil.get_terminal_size((DEFAULT_WIDTH, 50)).columns if out.isatty() else DEFAULT_WIDTH,
    )
    return run_status(fleet.hosts, pickers, envoys, watch_s=watch_s, as_json=args.json, view=view, out=out)
