"""The picker's settings (``picker``): where it listens, how often it polls, how it schedules and when it
refuses requests."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Final, Self

from pydantic import Field, field_validator, model_validator

from extproc.config.common import Port, PositiveMs, Strict, Tier
from extproc.config.models import Profile

__all__ = [
    "DeadlineShares",
    "EppSpec",
    "HeaderName",
    "OverloadSpec",
    "PickerSpec",
    "PollSpec",
    "QuarantineSpec",
    "ReplicasSpec",
    "SaturationSpec",
]


# The range of the Envoy read interval that PollSpec.envoy_admin_s chooses by the fleet's size.
_FASTEST_ENVOY_MS: Final = 20
_SLOWEST_ENVOY_MS: Final = 200


class PollSpec(Strict):
    triton_metrics_ms: PositiveMs = 250
    # An idle host (nothing in flight, its counters still at its last scrape) is scraped this often instead.
    idle_metrics_ms: PositiveMs = 1000
    repository_ms: PositiveMs = 1000
    # While a host's metrics page lists exactly the model versions its index has READY, each scrape
    # confirms the index, and the index itself is read this often instead (a change on the page is read
    # at once).
    confirmed_repository_ms: PositiveMs = 10_000
    # How often Envoy's /clusters is read while requests are in flight: its counts of each host's requests
    # are the picker's most perishable input. Absent: by the fleet's size (see envoy_admin_s).
    envoy_admin_ms: PositiveMs | None = None
    # While Envoy reported nothing in flight and no new request at its last two polls, and the picker
    # sees nothing in flight and no host's counters moving, Envoy's /clusters is read this often instead.
    idle_envoy_admin_ms: PositiveMs = 1000
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
        if self.envoy_admin_ms is not None and self.idle_envoy_admin_ms < self.envoy_admin_ms:
            raise ValueError("idle_envoy_admin_ms is shorter than envoy_admin_ms")
        # An idle host must still be fresh between two scrapes, with a poll's timeout to spare.
        if self.idle_metrics_ms + self.request_timeout_ms > self.stale_after_ms:
            raise ValueError(
                f"idle_metrics_ms + request_timeout_ms ({self.idle_metrics_ms + self.request_timeout_ms}) exceed "
                f"stale_after_ms ({self.stale_after_ms}): idle hosts would go stale between scrapes"
            )
        if self.idle_envoy_admin_ms + self.request_timeout_ms > self.stale_after_ms:
            raise ValueError(
                f"idle_envoy_admin_ms + request_timeout_ms ({self.idle_envoy_admin_ms + self.request_timeout_ms}) "
                f"exceed stale_after_ms ({self.stale_after_ms}): Envoy's view would go stale between polls"
            )
        return self

    def envoy_admin_s(self, hosts: int) -> float:
        """The interval of Envoy's reads under traffic, in seconds, for a fleet of ``hosts``:
        ``envoy_admin_ms``, else 0.5 ms a host, from 20 to 200 ms (and not above ``idle_envoy_admin_ms``).
        A read's cost grows with the fleet (docs/reference/fleet-file.md), so the interval does too: the
        counts stay fresh at a cost that stays a few percent of a core up to 400 hosts; a larger fleet pays
        more for the same 200 ms."""
        if self.envoy_admin_ms is not None:
            return self.envoy_admin_ms / 1000
        return min(max(hosts // 2, _FASTEST_ENVOY_MS), _SLOWEST_ENVOY_MS, self.idle_envoy_admin_ms) / 1000


class SaturationSpec(Strict):
    """When every candidate of a tier is this busy, the tier is saturated: spill over if allowed, else
    refuse standard and sheddable requests (429; critical ones only by their deadline, see OverloadSpec)."""

    max_in_flight: int = Field(default=64, ge=1)  # per host
    max_queue_ms: float = Field(default=1000.0, gt=0)  # expected completion time, per host


class DeadlineShares(Strict):
    """How much of its deadline a request of each priority may expect to spend (its expected completion on
    the best host, queue included) for the picker to send it; above that it is refused at once. Lower
    classes get less, so that under overload the queue they may build leaves room for the higher ones."""

    critical: float = Field(default=0.9, gt=0, le=1)
    standard: float = Field(default=0.5, gt=0, le=1)
    sheddable: float = Field(default=0.25, gt=0, le=1)


# A header name as HTTP/2 allows it (lowercase token characters), for the ones the fleet file names.
HeaderName = Annotated[str, Field(pattern=r"^[a-z0-9!#$%&'*+.^_`|~-]{1,128}$")]


class OverloadSpec(Strict):
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


class QuarantineSpec(Strict):
    """Requests in flight on a host that went down (possible queries of death): see
    extproc/datapath/scheduling/quarantine.py."""

    # How long such a request is refused (503, retry-after); 0: never refused.
    hold_s: float = Field(default=60.0, ge=0, le=86_400)
    # How far back from a host going down a request counts as in flight there: Envoy's health checks need
    # about 2 s to report a dead host, and its admin poll adds poll.envoy_admin_ms.
    window_s: float = Field(default=5.0, gt=0, le=600)


class EppSpec(Strict):
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
        return _host_port(value)


def _host_port(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT")
    return value


class ReplicasSpec(Strict):
    """Telemetry shared between picker replicas (several pods or gateways routing to the same hosts): one
    replica scrapes the hosts and publishes its snapshots, the others follow it over TCP and scrape only
    their own Envoy, until its snapshots stop (extproc/replicas.py, docs/operations.md)."""

    # HOST:PORT where this replica serves its telemetry to followers (it scrapes, as a lone picker does).
    publish: str | None = None
    # HOST:PORT of the replica that publishes: this one takes the hosts' telemetry from there.
    follow: str | None = None
    # A file holding the secret every replica shares (16 to 4096 visible ASCII characters): it
    # authenticates each end and every snapshot. Required with publish or follow; read at start.
    token_file: str | None = Field(default=None, min_length=1)
    # A follower without a valid snapshot for this long scrapes the hosts itself; it follows again once the
    # publisher's snapshots have come for as long again.
    takeover_after_ms: int = Field(default=2000, ge=500, le=60_000)
    # Whether the replicas tell each other every pick and their Envoys' in-flight counts (through the
    # publisher, extproc/datapath/peer_load.py), so that each decides on every replica's requests rather
    # than scaling its own by its traffic share. Every replica must be the only picker of its own Envoy.
    share_load: bool = False
    # A publisher that routes nothing (a telemetry publisher of its own, beside replicas that each route
    # for their own Envoy) relays its followers' loads to one another without telling any of its own: the
    # Envoy it polls is some replica's, whose counts that replica tells.
    relay_loads: bool = False

    @field_validator("publish", "follow")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        return None if value is None else _host_port(value)

    @model_validator(mode="after")
    def _one_side(self) -> Self:
        if self.publish is not None and self.follow is not None:
            raise ValueError("publish and follow exclude each other: a replica either publishes or follows")
        if (self.publish is not None or self.follow is not None) and self.token_file is None:
            raise ValueError("publish and follow need token_file: the secret that authenticates the snapshots")
        if self.share_load and not self.enabled:
            raise ValueError("share_load needs publish or follow: the replicas share their loads through the publisher")
        if self.relay_loads and self.publish is None:
            raise ValueError("relay_loads needs publish: the publisher relays its followers' loads")
        if self.relay_loads and self.share_load:
            raise ValueError(
                "relay_loads and share_load exclude each other: a publisher that shares its loads relays its "
                "followers' too; relay_loads is for one that routes nothing"
            )
        return self

    @property
    def enabled(self) -> bool:
        return self.publish is not None or self.follow is not None


class PickerSpec(Strict):
    # gRPC listen address of the ext_proc service: ``unix:PATH`` (default; not reachable from the network)
    # or ``HOST:PORT``.
    listen: str = "unix:.run/picker.sock"
    # Processes answering ext_proc streams. With more than one, a leader process gathers telemetry once and
    # shares it; on a Unix socket each worker listens on ``PATH.N`` and Envoy balances over them, on TCP
    # they share the port (SO_REUSEPORT).
    workers: int = Field(default=1, ge=1, le=64)
    # Whether workers tell each other every pick as they make it (through a buffer they all map, see
    # extproc/datapath/shared_picks.py), so that each decides on all picks since Envoy's last count, as one
    # process would. Off: each worker counts its own picks ``workers`` times instead.
    share_worker_picks: bool = True
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
    # Telemetry shared with (or taken from) other picker replicas; the default shares nothing.
    replicas: ReplicasSpec = ReplicasSpec()

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        if value.startswith("unix:"):
            if len(value) <= len("unix:"):
                raise ValueError("unix: needs a socket path")
            return value
        try:
            return _host_port(value)
        except ValueError:
            raise ValueError(f"{value!r} is neither unix:PATH nor HOST:PORT") from None

    @model_validator(mode="after")
    def _control_token_beyond_loopback(self) -> Self:
        if self.control_token_file is None and not self.metrics_on_loopback:
            raise ValueError(
                f"metrics_address {self.metrics_address!r} listens beyond loopback: set control_token_file to a "
                "file holding the token that drain and undrain require"
            )
        return self

    @model_validator(mode="after")
    def _load_shared_by_one_process(self) -> Self:
        if self.replicas.share_load and self.workers > 1 and not self.share_worker_picks:
            raise ValueError(
                f"replicas.share_load with workers: {self.workers} needs share_worker_picks: the other replicas' "
                "picks reach the workers through the buffer of the workers' picks"
            )
        return self

    @model_validator(mode="after")
    def _takeover_before_stale(self) -> Self:
        # A follower that lost its publisher must have scraped the hosts before their telemetry turns stale.
        spare = self.poll.stale_after_ms - self.poll.request_timeout_ms
        if self.replicas.follow is not None and self.replicas.takeover_after_ms > spare:
            raise ValueError(
                f"replicas.takeover_after_ms ({self.replicas.takeover_after_ms}) exceeds poll.stale_after_ms - "
                f"poll.request_timeout_ms ({spare}): the hosts would turn stale before a follower that lost its "
                "publisher had scraped them"
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
