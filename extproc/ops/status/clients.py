"""Clients for the picker's HTTP endpoint (``/status``, drain, undrain) and Envoy's admin ``/clusters``.

The clients are small interfaces (:class:`PickerApi`, :class:`EnvoyApi`) so that the operations in
:mod:`extproc.ops.plans` and :mod:`extproc.ops.execute` can be tested against fakes; :class:`HttpPicker`
and :class:`HttpEnvoyAdmin` are the real ones (``urllib``, with timeouts).
"""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, Protocol

from prometheus_client.parser import text_string_to_metric_families

from extproc.config import Fleet, HostSpec
from extproc.control import AUTHORIZATION, SCHEME
from extproc.ops import OpsError
from extproc.telemetry.envoy_admin import EndpointStatus, EnvoyAdminError, parse_clusters

__all__ = [
    "DEFAULT_HTTP_TIMEOUT_S",
    "OVERLOADED_S",
    "EnvoyApi",
    "EnvoyError",
    "EnvoyHost",
    "HttpEnvoyAdmin",
    "HttpPicker",
    "ModelBatching",
    "ModelLoad",
    "PickerApi",
    "PickerError",
    "PickerHost",
    "PickerStatus",
    "default_envoy_admin_url",
    "default_picker_url",
    "envoy_hosts",
    "parse_overload",
    "parse_picker_status",
]

DEFAULT_HTTP_TIMEOUT_S = 3.0


class PickerError(OpsError):
    """A picker did not answer, or answered something else than expected."""


class EnvoyError(OpsError):
    """Envoy's admin endpoint did not answer, or not with ``/clusters?format=json``."""


# --- the picker's /status --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelBatching:
    """How one model batches on one host (``batching`` and ``batch_cost_ms`` of ``/status``): what a copy
    can serve at full load."""

    max_batch: int = 1
    instances: int = 1
    fixed_ms: float | None = None  # the fitted exec(rows) = fixed_ms + item_ms x rows; None until fitted
    item_ms: float | None = None


@dataclass(frozen=True, slots=True)
class PickerHost:
    """One host in the picker's ``/status`` (see :func:`extproc.datapath.datastore.host_status`)."""

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
    known: frozenset[str] = frozenset()  # every model the host's repository index lists, ready or not
    batching: Mapping[str, ModelBatching] = field(default_factory=dict)
    exec_ms: float | None = None

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
    routed: float = 0.0  # requests routed (extproc_decisions_total), inference or not
    # The same by the tier they were routed to (where they ran), and those of them that spilled over there
    # from the tier they were classified to (reason spillover): the placement controller's demand per tier.
    routed_by_tier: Mapping[str, float] = field(default_factory=dict)
    spilled_by_tier: Mapping[str, float] = field(default_factory=dict)


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
    """``extproc_admissions_total``, ``extproc_overload_refused_at_seconds`` and ``extproc_decisions_total``
    of a picker's ``/metrics`` text, per model (summed over the other labels but the decisions' tier; the
    text of a leader already sums its workers)."""
    admitted: dict[str, float] = {}
    refused: dict[str, float] = {}
    refused_at: dict[str, float] = {}
    routed: dict[str, dict[str, float]] = {}
    spilled: dict[str, dict[str, float]] = {}
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
            elif sample.name == "extproc_decisions_total":
                tier = sample.labels.get("tier", "")
                into_tier = routed.setdefault(model, {})
                into_tier[tier] = into_tier.get(tier, 0.0) + sample.value
                if sample.labels.get("reason") == "spillover":
                    into_tier = spilled.setdefault(model, {})
                    into_tier[tier] = into_tier.get(tier, 0.0) + sample.value
    models = set(admitted) | set(refused) | set(refused_at) | set(routed)
    return {
        m: ModelLoad(
            admitted.get(m, 0.0),
            refused.get(m, 0.0),
            refused_at.get(m),
            sum(routed.get(m, {}).values()),
            routed.get(m, {}),
            spilled.get(m, {}),
        )
        for m in sorted(models)
    }


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _batching(raw: dict[str, Any]) -> dict[str, ModelBatching]:
    shapes, costs = _dict(raw.get("batching")), _dict(raw.get("batch_cost_ms"))
    out: dict[str, ModelBatching] = {}
    for model in {*shapes, *costs}:
        shape, cost = _dict(shapes.get(model)), _dict(costs.get(model))
        out[str(model)] = ModelBatching(
            max_batch=max(1, _opt_int(shape.get("max_batch")) or 1),
            instances=max(1, _opt_int(shape.get("instances")) or 1),
            fixed_ms=_opt_float(cost.get("fixed")),
            item_ms=_opt_float(cost.get("per_item")),
        )
    return out


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
            known=frozenset(str(m) for m in raw.get("known") or () if isinstance(m, str)),
            batching=_batching(raw),
            exec_ms=_opt_float(raw.get("exec_ms")),
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
