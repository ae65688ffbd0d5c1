"""The fleet file: one typed, validated object, loaded once and passed down.

A fleet file (YAML) names the Triton hosts, the models and how to classify their requests, the picker's
settings and Envoy's listeners. :func:`load_fleet` refuses an invalid file with a :class:`ConfigError` that
names the file, the key and the problem, so every command can refuse to start with a useful message.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Self

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from extproc.scheduling import registry

Port = Annotated[int, Field(ge=1, le=65535)]
PositiveMs = Annotated[int, Field(gt=0, le=3_600_000)]


class Tier(StrEnum):
    CPU = "cpu"
    GPU = "gpu"


class _Strict(BaseModel):
    """Unknown keys are errors: a typo in a fleet file must not be silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class LaunchSpec(_Strict):
    """How ``extproc up`` starts this host locally; absent for Triton hosts that run elsewhere."""

    models: tuple[str, ...] = Field(min_length=1)
    # Multiplies the service time of models that emulate hardware speed (see triton_models/).
    service_time_factor: float = Field(default=1.0, gt=0, le=100)
    # Restart the host when it exits (with backoff; left down after repeated crashes). Off: a crash is
    # only reported, e.g. to keep a crashed host's state for a post-mortem.
    restart: bool = True


class _Ports(_Strict):
    """What a static host and a pool's hosts have in common: their tier, ports and labels."""

    http_port: Port = 8000
    grpc_port: Port = 8001
    metrics_port: Port = 8002
    tier: Tier
    labels: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _distinct_ports(self) -> Self:
        if len(set(self.ports)) != 3:
            raise ValueError(f"http_port, grpc_port and metrics_port must differ, got {self.ports}")
        return self

    @property
    def ports(self) -> tuple[int, int, int]:
        return self.http_port, self.grpc_port, self.metrics_port


class HostSpec(_Ports):
    name: str = Field(pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
    address: str
    launch: LaunchSpec | None = None

    @field_validator("address")
    @classmethod
    def _ip_literal(cls, value: str) -> str:
        # Envoy's override_host matches the header against the cluster members' resolved addresses, so the
        # picker must name hosts exactly as Envoy sees them: an IP literal. DNS names go in ``pools``.
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address (for a DNS name, use pools)") from None

    @property
    def http_endpoint(self) -> str:
        return _endpoint(self.address, self.http_port)

    @property
    def grpc_endpoint(self) -> str:
        return _endpoint(self.address, self.grpc_port)

    @property
    def metrics_url(self) -> str:
        return f"http://{_endpoint(self.address, self.metrics_port)}/metrics"


# A DNS name: dot-separated labels of letters, digits, '-' and '_' (SRV-style names), at most 253 characters;
# a trailing dot makes it absolute (no search domains).
_LABEL = r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_DNS_NAME = re.compile(rf"^(?=.{{1,253}}\.?$){_LABEL}(\.{_LABEL})*\.?$")


class PoolSpec(_Ports):
    """Hosts discovered by DNS: every A record of ``dns`` is a host of ``tier`` with these ports and labels,
    named ``<name>-<address with dashes>`` (e.g. ``gpu-10-0-0-7``). Envoy and the picker both re-resolve the
    name every ``refresh_s``: a Kubernetes headless Service's name gives its ready pods."""

    # Short enough that the longest host name (``-255-255-255-255`` appended) is still a valid host name.
    name: str = Field(pattern=r"^[a-z0-9]([a-z0-9-]{0,45}[a-z0-9])?$")
    dns: str
    refresh_s: float = Field(default=5.0, ge=0.1, le=3600)

    @field_validator("dns")
    @classmethod
    def _dns_name(cls, value: str) -> str:
        if is_ip(value):
            raise ValueError(f"{value!r} is an IP address: list it under hosts")
        if not _DNS_NAME.match(value) or value.replace(".", "").isdigit():
            raise ValueError(f"{value!r} is not a DNS name")
        return value

    def host(self, address: str) -> HostSpec:
        """The host of one A record."""
        return HostSpec(
            name=f"{self.name}-{address.replace('.', '-')}",
            address=address,
            http_port=self.http_port,
            grpc_port=self.grpc_port,
            metrics_port=self.metrics_port,
            tier=self.tier,
            labels=self.labels,
        )

    def named(self, host: str) -> bool:
        """Whether ``host`` has the form of a name this pool gives its hosts."""
        return re.fullmatch(rf"{re.escape(self.name)}(-\d{{1,3}}){{4}}", host) is not None


def is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _endpoint(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


class TierRule(_Strict):
    """Send a request to ``tier`` when every condition given here holds."""

    tier: Tier
    min_bytes: int | None = Field(default=None, ge=0)
    max_bytes: int | None = Field(default=None, ge=0)
    protocol: str | None = Field(default=None, pattern=r"^(http|grpc)$")

    @model_validator(mode="after")
    def _range(self) -> Self:
        if self.min_bytes is not None and self.max_bytes is not None and self.min_bytes > self.max_bytes:
            raise ValueError(f"min_bytes ({self.min_bytes}) is above max_bytes ({self.max_bytes})")
        return self


class ModelSpec(_Strict):
    name: str = Field(min_length=1, max_length=256)
    # Tiers this model may be served from; the first is its default tier.
    tiers: tuple[Tier, ...] = Field(default=(Tier.GPU,), min_length=1)
    # First matching rule wins; no match → the default tier.
    rules: tuple[TierRule, ...] = ()
    # Whether a client's tier hint header may choose among ``tiers``.
    allow_hint: bool = True
    # Overrides the picker's (and the tier's) scheduling profile for this model.
    profile: Profile | None = None
    # A sequence-batched model: Envoy streams its REST bodies to the picker, which reads the correlation id
    # from the JSON ``parameters`` (gRPC requests are read for every model).
    sequence: bool = False
    # The longest this model's inference requests may take (else picker.overload.deadline_ms); clients may
    # ask for less.
    deadline_ms: PositiveMs | None = None

    @model_validator(mode="after")
    def _rules_within_tiers(self) -> Self:
        if len(set(self.tiers)) != len(self.tiers):
            raise ValueError(f"tiers repeat a tier: {[t.value for t in self.tiers]}")
        for i, rule in enumerate(self.rules):
            if rule.tier not in self.tiers:
                raise ValueError(f"rules[{i}] sends to tier {rule.tier.value!r}, which is not in tiers")
        return self

    @property
    def default_tier(self) -> Tier:
        return self.tiers[0]


class PollSpec(_Strict):
    triton_metrics_ms: PositiveMs = 250
    # An idle host (nothing in flight, its counters still at its last scrape) is scraped this often instead.
    idle_metrics_ms: PositiveMs = 1000
    repository_ms: PositiveMs = 1000
    # While a host's metrics page lists exactly the model versions its index has READY, each scrape
    # confirms the index, and the index itself is read this often instead (a change on the page is read
    # at once).
    confirmed_repository_ms: PositiveMs = 10_000
    envoy_admin_ms: PositiveMs = 200
    nvml_ms: PositiveMs = 500
    # Telemetry older than this makes its host a non-candidate.
    stale_after_ms: PositiveMs = 3000
    request_timeout_ms: PositiveMs = 1000

    @model_validator(mode="after")
    def _intervals(self) -> Self:
        if self.idle_metrics_ms < self.triton_metrics_ms:
            raise ValueError("idle_metrics_ms is shorter than triton_metrics_ms")
        if self.confirmed_repository_ms < self.repository_ms:
            raise ValueError("confirmed_repository_ms is shorter than repository_ms")
        # An idle host must still be fresh between two scrapes, with a poll's timeout to spare.
        if self.idle_metrics_ms + self.request_timeout_ms > self.stale_after_ms:
            raise ValueError(
                f"idle_metrics_ms + request_timeout_ms ({self.idle_metrics_ms + self.request_timeout_ms}) exceed "
                f"stale_after_ms ({self.stale_after_ms}): idle hosts would go stale between scrapes"
            )
        return self


def _registered(units: registry.Registry[Any]) -> AfterValidator:
    """Refuses a name that no unit of ``units`` is registered under (extproc/scheduling/registry.py)."""

    def check(name: str) -> str:
        names = units.names()
        if name not in names:
            quoted = [repr(n) for n in names]
            expected = f"{', '.join(quoted[:-1])} or {quoted[-1]}" if len(quoted) > 1 else "".join(quoted)
            raise PydanticCustomError("enum", "Input should be {expected}", {"expected": expected})
        return name

    return AfterValidator(check)


# The names of the scheduling units: see extproc/scheduling/{filters,scorers,pickers}.py for what each does.
FilterName = Annotated[str, _registered(registry.FILTERS)]
ScorerName = Annotated[str, _registered(registry.SCORERS)]
PickerName = Annotated[str, _registered(registry.PICKERS)]


class Profile(_Strict):
    """How one model's (or tier's) candidates are filtered, scored and picked."""

    filters: tuple[FilterName, ...] = ("model_ready", "healthy", "fresh")
    scorers: dict[ScorerName, Annotated[float, Field(ge=0)]] = Field(
        default_factory=lambda: {"expected_completion": 1.0, "gpu_memory": 0.2}
    )
    picker: PickerName = "argmax"
    # When the classified tier has no candidate (or is saturated), try the model's other tiers.
    spillover: bool = True

    @model_validator(mode="after")
    def _sound(self) -> Self:
        if "model_ready" not in self.filters:
            raise ValueError("filters must include model_ready: a request must never reach a host without its model")
        if len(set(self.filters)) != len(self.filters):
            raise ValueError("filters repeat a filter")
        # (in this order: the default profile is built as this module loads, before the units can be)
        if not any(self.scorers.values()) and registry.PICKERS.unit(self.picker).uses_scores:
            raise ValueError("at least one scorer weight must be above 0")
        return self


class SaturationSpec(_Strict):
    """When every candidate of a tier is this busy, the tier is saturated: spill over if allowed, else
    refuse standard and sheddable requests (429; critical ones only by their deadline, see OverloadSpec)."""

    max_in_flight: int = Field(default=64, ge=1)  # per host
    max_queue_ms: float = Field(default=1000.0, gt=0)  # expected completion time, per host


class DeadlineShares(_Strict):
    """How much of its deadline a request of each priority may expect to spend (its expected completion on
    the best host, queue included) for the picker to send it; above that it is refused at once. Lower
    classes get less, so that under overload the queue they may build leaves room for the higher ones."""

    critical: float = Field(default=0.9, gt=0, le=1)
    standard: float = Field(default=0.5, gt=0, le=1)
    sheddable: float = Field(default=0.25, gt=0, le=1)


# A header name as HTTP/2 allows it (lowercase token characters), for the ones the fleet file names.
HeaderName = Annotated[str, Field(pattern=r"^[a-z0-9!#$%&'*+.^_`|~-]{1,128}$")]


class OverloadSpec(_Strict):
    """Admission control: what the picker refuses, and when, so that demand above capacity is answered fast
    instead of queueing past its callers' deadlines (docs/operations.md, "Overload")."""

    # Off: no deadlines (Envoy's route timeout only) and only sheddable requests are refused (429) when
    # their tiers are saturated; the others go to the least-busy host however long its queue.
    admission: bool = True
    # The longest an inference request may take, unless its model says otherwise (models[].deadline_ms); a
    # client may ask for less (gRPC grpc-timeout, REST x-triton-timeout-ms), never more.
    deadline_ms: PositiveMs = 60_000
    deadline_shares: DeadlineShares = DeadlineShares()
    # Whose share of a model's capacity a request counts against under overload: the value of this request
    # header (say a tenant or API key that an authenticating proxy in front sets), else the client's
    # address. Requests without the header share one key.
    fairness_header: HeaderName | None = None
    # Keys remembered per model; keys beyond this (a client minting new ones) share one.
    max_fairness_keys: int = Field(default=1024, ge=1, le=1_000_000)
    # Of a host's sequence slots for a model, the most one client key may hold: a new sequence beyond it
    # gets 429, so that a client that starts sequences and never ends them cannot take every slot. 1: no
    # per-client limit (e.g. behind a proxy that hides client addresses, without fairness_header).
    max_sequence_share: float = Field(default=0.5, gt=0, le=1)
    # The most retry-after (seconds) a refusal asks for; it is otherwise the predicted drain time.
    max_retry_after_s: int = Field(default=30, ge=1, le=3600)


class QuarantineSpec(_Strict):
    """Requests in flight on a host that went down (possible queries of death): see
    extproc/scheduling/quarantine.py."""

    # How long such a request is refused (503, retry-after); 0: never refused.
    hold_s: float = Field(default=60.0, ge=0, le=86_400)
    # How far back from a host going down a request counts as in flight there: Envoy's health checks need
    # about 2 s to report a dead host, and its admin poll adds poll.envoy_admin_ms.
    window_s: float = Field(default=5.0, gt=0, le=600)


class EppSpec(_Strict):
    """The picker as a Gateway API Inference Extension endpoint picker (docs/gateway-api.md): a second
    ext_proc listener, for gateways (Istio, Envoy Gateway, ...) that an InferencePool points at it."""

    # HOST:PORT of the ext_proc listener; 9002 is the port InferencePools name by convention.
    listen: str = "0.0.0.0:9002"
    # Plaintext port serving only the gRPC health service: Kubernetes' gRPC probes cannot speak TLS.
    # null: health is served on ``listen`` only.
    health_port: Port | None = 9003
    # GIE gateways connect to their picker over TLS (most without verifying it): false serves plaintext.
    tls: bool = True
    cert_file: str = ".run/tls/epp.crt"
    key_file: str = ".run/tls/epp.key"
    # Generate a self-signed certificate at start-up when the files do not exist.
    self_signed: bool = True

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"{value!r} is not HOST:PORT")
        return value


class PickerSpec(_Strict):
    # gRPC listen address of the ext_proc service: ``unix:PATH`` (default; not reachable from the network)
    # or ``HOST:PORT``.
    listen: str = "unix:.run/picker.sock"
    # Processes answering ext_proc streams. With more than one, a leader process gathers telemetry once and
    # shares it; on a Unix socket each worker listens on ``PATH.N`` and Envoy balances over them, on TCP
    # they share the port (SO_REUSEPORT).
    workers: int = Field(default=1, ge=1, le=64)
    metrics_address: str = "127.0.0.1"
    metrics_port: Port = 9090
    # A file holding the bearer token that the HTTP endpoint's drain and undrain require (and ``extproc
    # models`` sends). Required when metrics_address is beyond loopback: anyone who reaches the port could
    # otherwise take hosts out of routing. Read when the picker starts and on each such call (a rotated
    # Secret applies without a restart), never here (see extproc/control.py).
    control_token_file: str | None = Field(default=None, min_length=1)
    poll: PollSpec = PollSpec()
    # The default scheduling profile; ``tiers`` and each model's ``profile`` override it.
    profile: Profile = Profile()
    tiers: dict[Tier, Profile] = Field(default_factory=dict)
    saturation: SaturationSpec = SaturationSpec()
    overload: OverloadSpec = OverloadSpec()
    # How many ranked hosts the picker hands to Envoy for retries.
    max_hosts: int = Field(default=3, ge=1, le=8)
    # Envoy waits this long for the picker before failing open to the fallback load balancer.
    message_timeout_ms: PositiveMs = 100
    # Whether requests whose body the picker checks (REST inference, gRPC) fail open too while the picker
    # does not answer, without those checks. Off: they are refused then (the rest still fails open), for
    # fleets whose clients may send requests that crash Triton.
    fail_open_checked: bool = True
    # How long Envoy waits for a request body's first bytes when the picker must read them to route (gRPC,
    # REST inference). The picker extends message_timeout_ms up to this only for a request whose body is
    # late, so a slow client is routed by the picker instead of failing open onto a host that may lack the
    # model.
    body_timeout_ms: PositiveMs = 10_000
    # Most tensor elements one inference request may carry (all inputs together); the picker answers 400
    # above it, before any host sees the request.
    max_tensor_elements: int = Field(default=64 * 1024 * 1024, ge=1)
    # Read every REST inference body's tensor headers and refuse what cannot be valid before Triton has it
    # (Triton 2.51 aborts on some such requests). Off: the picker reads only sequence models' bodies, which
    # spares an ext_proc message and its answer per REST request; for fleets whose REST clients are trusted.
    check_rest_bodies: bool = True
    quarantine: QuarantineSpec = QuarantineSpec()
    # gRPC ModelStreamInfer streams one client key may hold open at once (each holds memory in Envoy, the
    # picker and Triton for as long as it is open); beyond it a new stream gets RESOURCE_EXHAUSTED.
    max_streams_per_client: int = Field(default=100, ge=1, le=1_000_000)
    # Seconds a client should wait before retrying a 503/429 from the picker.
    retry_after_s: int = Field(default=1, ge=1, le=3600)
    log_level: str = Field(default="info", pattern=r"^(debug|info|warning|error)$")
    # Sidecar mode: the host whose GPUs this picker reads through NVML (it runs beside that Triton).
    nvml_host: str | None = None
    # Also serve the Endpoint Picker Protocol (EppSpec); null: only the picker's own dialect.
    epp: EppSpec | None = None

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        if value.startswith("unix:"):
            if len(value) <= len("unix:"):
                raise ValueError("unix: needs a socket path")
            return value
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"{value!r} is neither unix:PATH nor HOST:PORT")
        return value

    @model_validator(mode="after")
    def _control_token_beyond_loopback(self) -> Self:
        if self.control_token_file is None and not self.metrics_on_loopback:
            raise ValueError(
                f"metrics_address {self.metrics_address!r} listens beyond loopback: set control_token_file to a "
                "file holding the token that drain and undrain require"
            )
        return self

    @property
    def metrics_on_loopback(self) -> bool:
        """Whether the HTTP endpoint is reachable from this machine only (a name other than localhost may
        resolve to anything, so it counts as beyond loopback)."""
        if self.metrics_address == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.metrics_address).is_loopback
        except ValueError:
            return False

    @property
    def unix_socket(self) -> Path | None:
        return Path(self.listen.removeprefix("unix:")) if self.listen.startswith("unix:") else None

    @property
    def listen_addresses(self) -> tuple[str, ...]:
        """Where each worker listens (index = worker number); Envoy's picker cluster lists each once."""
        if self.workers == 1 or not self.listen.startswith("unix:"):
            return (self.listen,) * self.workers
        return tuple(f"{self.listen}.{i}" for i in range(self.workers))


class Listener(_Strict):
    address: str = "127.0.0.1"
    port: Port


class TlsSpec(_Strict):
    port: Port = 8443
    cert_file: str = ".run/tls/server.crt"
    key_file: str = ".run/tls/server.key"
    # Generate a self-signed certificate at start-up when the files do not exist (local use only).
    self_signed: bool = True
    # PEM bundle of the CAs whose client certificates are accepted. Set alone: a client may present a
    # certificate (it must then verify); with require_client_certificate: every client must (mutual TLS).
    client_ca_file: str | None = None
    require_client_certificate: bool = False

    @model_validator(mode="after")
    def _client_ca(self) -> Self:
        if self.require_client_certificate and self.client_ca_file is None:
            raise ValueError("require_client_certificate needs client_ca_file (the CAs that sign client certificates)")
        return self


class UpstreamTlsSpec(_Strict):
    """TLS from Envoy to the Triton hosts (their HTTP and gRPC ports; health checks included)."""

    # PEM bundle of the CAs that sign the Triton hosts' certificates: an unverifiable host gets no requests.
    ca_file: str
    # Sent as SNI, and every host's certificate must carry it as a DNS subjectAltName (hosts are addressed
    # by IP, so the name cannot come from the address).
    server_name: str = Field(min_length=1, max_length=253)
    # Envoy's client certificate, for Triton hosts (or their TLS sidecars) that require mutual TLS.
    cert_file: str | None = None
    key_file: str | None = None

    @model_validator(mode="after")
    def _pair(self) -> Self:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class EnvoySpec(_Strict):
    listener: Listener = Listener(port=8080)
    tls: TlsSpec | None = TlsSpec()
    admin: Listener = Listener(port=9901)
    # Adds ``x-triton-host: ip:port`` to responses so a person can see the routing. Off in production.
    expose_upstream_host: bool = False
    # The tier Envoy uses when the picker is unreachable and answers nothing (fail open).
    fallback_tier: Tier = Tier.GPU
    # Route timeout for inference; 0 disables it (Envoy's 15 s default is wrong for inference).
    route_timeout_s: float = Field(default=0, ge=0)
    # A try that takes longer is answered 504 (gRPC UNAVAILABLE) rather than left waiting on a stalled
    # host; it is not sent elsewhere, since the request may be what stalls the host. 0 disables it.
    per_try_timeout_s: float = Field(default=0, ge=0)
    # Largest request body Envoy accepts (bytes). A larger content-length is answered 413 before the body is
    # read; a REST body without content-length (chunked) is buffered up to this size, then 413.
    max_request_bytes: int = Field(default=64 * 1024 * 1024, ge=1024, le=2**32 - 1)
    # Request line plus headers (KiB); over it Envoy answers 431. Triton's HTTP server drops the connection
    # without an answer once a request line or header passes ~16 KiB, which Envoy would count against the
    # host (outlier ejection), so the cap stays below that.
    max_request_headers_kb: int = Field(default=8, ge=1, le=15)
    # Concurrent HTTP/2 streams per client connection (Envoy's default is 1024): every open stream holds
    # memory in Envoy, the picker and Triton.
    max_streams_per_connection: int = Field(default=100, ge=1, le=1024)
    # Envoy's heap (MiB): at 95 % it stops accepting requests, from 90 % it resets the streams that buffer
    # the most, so no client can grow the gateway until the kernel kills it.
    max_heap_mb: int = Field(default=1024, ge=64)
    # Serve Triton's statistics (REST /v2/models[/NAME]/stats, gRPC ModelStatistics) to clients. Off by
    # default: they tell a client every model of the fleet and its traffic.
    allow_statistics: bool = False
    # Accept compressed gRPC messages (grpc-encoding gzip or deflate). Off by default: Triton inflates a
    # message whole and without a limit, so the picker inflates each one first, in bounded steps, to refuse
    # those over max_request_bytes; several such messages at once can keep the picker past
    # picker.message_timeout_ms, and a request Envoy then lets through unchecked (failing open) reaches Triton.
    allow_grpc_compression: bool = False
    # TLS to the Triton hosts; null: plaintext (a trusted network). The picker's own telemetry (metrics,
    # repository index) still connects in plaintext.
    upstream_tls: UpstreamTlsSpec | None = None
    concurrency: int = Field(default=1, ge=1, le=256)
    base_id: int = Field(default=0, ge=0)


class Fleet(_Strict):
    """The whole fleet file. ``source`` is the file it came from, for messages."""

    hosts: tuple[HostSpec, ...] = ()
    # Hosts discovered by DNS, re-resolved while running (see PoolSpec).
    pools: tuple[PoolSpec, ...] = ()
    # ``ip[:port]`` of the DNS servers that Envoy and the picker ask for the pools' names; absent: the
    # system's resolver (/etc/resolv.conf, with its search domains).
    dns_resolvers: tuple[str, ...] | None = Field(default=None, min_length=1)
    models: tuple[ModelSpec, ...] = ()
    picker: PickerSpec = PickerSpec()
    envoy: EnvoySpec = EnvoySpec()
    # Where ``extproc up`` finds the model repository for hosts it launches, and keeps run-time files.
    model_repository: str = "triton_models"
    runtime_dir: str = ".run"
    # A file holding the key that Triton's control APIs (model repository, shared memory, logging, trace)
    # require; null: ``extproc up`` generates one into <runtime_dir>/admin.key. Read when a command starts,
    # not here, so that rendering Envoy's config needs no secret (see extproc/admin_key.py).
    admin_key_file: str | None = Field(default=None, min_length=1)
    source: str = Field(default="<memory>", exclude=True)

    @field_validator("dns_resolvers")
    @classmethod
    def _resolvers(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return None if value is None else tuple(_endpoint(*resolver_address(r)) for r in value)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if not self.hosts and not self.pools:
            raise ValueError("the fleet has neither hosts nor pools")
        _unique("hosts", [h.name for h in self.hosts])
        _check_pools(self.pools, self.hosts)
        _unique("models", [m.name for m in self.models])
        seen: dict[tuple[str, int], str] = {}
        for host in self.hosts:
            for port in host.ports:
                other = seen.setdefault((host.address, port), host.name)
                if other != host.name:
                    raise ValueError(f"hosts {other!r} and {host.name!r} both use {host.address}:{port}")
        if self.picker.nvml_host is not None and self.picker.nvml_host not in {h.name for h in self.hosts}:
            raise ValueError(f"picker.nvml_host {self.picker.nvml_host!r} is not a host of this fleet")
        if self.envoy.fallback_tier not in self.tiers:
            raise ValueError(f"envoy.fallback_tier {self.envoy.fallback_tier.value!r} has no hosts and no pools")
        return self

    def profile(self, model: ModelSpec | None, tier: Tier) -> Profile:
        """The scheduling profile for ``model`` on ``tier``: the model's, else the tier's, else the default."""
        if model is not None and model.profile is not None:
            return model.profile
        return self.picker.tiers.get(tier, self.picker.profile)

    def model(self, name: str) -> ModelSpec | None:
        for spec in self.models:
            if spec.name == name:
                return spec
        return None

    @property
    def tiers(self) -> tuple[Tier, ...]:
        """The tiers that have hosts or pools, in a stable order."""
        present = {h.tier for h in (*self.hosts, *self.pools)}
        return tuple(t for t in Tier if t in present)


def resolver_address(value: str) -> tuple[str, int]:
    """``ip``, ``ip:port`` or ``[ipv6]:port`` of a DNS server → (ip, port); port 53 when not given."""
    host, port = value, "53"
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        if not sep:
            host, port = host.removesuffix("]"), "53"
    elif value.count(":") == 1:
        host, port = value.split(":")
    if not is_ip(host) or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not IP[:PORT]")
    return str(ipaddress.ip_address(host)), int(port)


def _check_pools(pools: tuple[PoolSpec, ...], hosts: tuple[HostSpec, ...]) -> None:
    _unique("pools", [p.name for p in pools])
    for i, pool in enumerate(pools):
        clash = [h.name for h in hosts if pool.named(h.name)]
        if clash:
            raise ValueError(f"hosts {clash} are named like the hosts of pool {pool.name!r} ({pool.name}-A-B-C-D)")
        for other in pools[:i]:
            shared = set(pool.ports) & set(other.ports)
            if other.dns.rstrip(".") == pool.dns.rstrip(".") and shared:
                raise ValueError(f"pools {other.name!r} and {pool.name!r} both use {pool.dns} port {min(shared)}")


def _unique(what: str, names: list[str]) -> None:
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{what}: names must be unique, repeated: {dupes}")


class ConfigError(Exception):
    """An invalid fleet file. ``str()`` names the file, the key and the problem."""


def parse_fleet(data: Any, source: str = "<memory>") -> Fleet:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the fleet file must be a mapping at the top level")
    try:
        return Fleet.model_validate({**data, "source": source})
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = key_path(err["loc"])
            problems.append(f"{source}: key {key}: {err['msg']}")
        raise ConfigError("\n".join(problems)) from None


def key_path(loc: Sequence[int | str]) -> str:
    """A pydantic error location as the fleet file's key (``hosts[2].tier``)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in {"function-after", "function-before"} or "[" in str(part):
            continue  # pydantic's validator frames, not keys of the file
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def load_fleet(path: str | Path) -> Fleet:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the fleet file: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_fleet(data, str(path))


def file_stamp(path: Path) -> tuple[float, int] | None:
    """Modification time and size of a fleet file, to notice edits (None while it is missing)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime, st.st_size
