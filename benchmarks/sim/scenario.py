"""Simulator scenarios: a fleet of simulated Triton hosts, its models' batch timings, a load and events.

A scenario file (``benchmarks/scenarios/sim/*.yaml``) is either written for the simulator (``hosts`` as groups,
``models`` with their batch timing, ``load``) or names a real-process scenario (``routing_scenario``, a file of
``benchmarks/scenarios/``) whose fleet and load it takes over, adding only what the simulator cannot read from
it: the models' batch timings (``models``) and the gateway's own latency (``envoy``). Either way the embedded
fleet is validated by the real fleet-file schema (:func:`extproc.config.parse_fleet`): the picker's poll
intervals, profiles and saturation limits come from it, as in production.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from benchmarks import SCENARIOS_DIR
from extproc.config import ConfigError, Fleet, Tier, key_path, parse_fleet

SIM_SCENARIOS_DIR = SCENARIOS_DIR / "sim"

POLICIES: tuple[str, ...] = ("round_robin", "least_request", "expected_completion_baseline", "picker", "oracle")
# Short names accepted on the command line and in scenario files.
POLICY_ALIASES = {"baseline": "expected_completion_baseline", "rr": "round_robin", "lr": "least_request"}


class SimScenarioError(Exception):
    """An invalid simulator scenario; ``str()`` names the file, the key and the problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelTiming(_Strict):
    """How one model executes on a host of factor 1: Triton's dynamic batcher and the batch time."""

    max_batch: int = Field(default=8, ge=1, le=4096)  # max_batch_size: rows per execution
    queue_delay_us: float = Field(default=500.0, ge=0)  # dynamic_batching max_queue_delay_microseconds
    instances: int = Field(default=1, ge=1, le=64)  # instance_group count
    fixed_ms: float = Field(ge=0)  # one execution takes fixed_ms + per_row_ms x rows
    per_row_ms: float = Field(ge=0)
    # Whether the host's factor multiplies the batch time (a device-speed model); else every host is alike.
    scaled: bool = True
    # Mean of an exponential delay added to each execution: what a real host adds to the batch time it
    # means to take (a sleep that overshoots, the python backend's IPC, a core shared with other processes).
    # The real_* scenarios set it from one real run (see benchmarks.sim.validate); 0 elsewhere.
    jitter_ms: float = Field(default=0.0, ge=0)

    @model_validator(mode="after")
    def _positive(self) -> ModelTiming:
        if self.fixed_ms + self.per_row_ms <= 0:
            raise ValueError("fixed_ms + per_row_ms must be above 0")
        return self

    def exec_s(self, rows: float, factor: float = 1.0) -> float:
        return (self.fixed_ms + self.per_row_ms * rows) * (factor if self.scaled else 1.0) / 1000.0


class HostGroup(_Strict):
    """``count`` hosts named ``NAME-0`` … (or ``NAME`` for one host)."""

    name: str = Field(pattern=r"^[a-z0-9]([a-z0-9-]{0,40}[a-z0-9])?$")
    count: int = Field(default=1, ge=1, le=10000)
    # Multiplies the batch time of the models whose timing is ``scaled``: 4 is a device four times slower.
    factor: float = Field(default=1.0, gt=0, le=1000)
    models: tuple[str, ...] = Field(min_length=1)
    tier: Tier = Tier.GPU

    def host_names(self) -> list[str]:
        return [self.name] if self.count == 1 else [f"{self.name}-{i}" for i in range(self.count)]


class Rows(_Strict):
    """A request's rows (its batch dimension): fixed, uniform, bimodal or heavy-tailed (bounded Pareto)."""

    dist: Literal["fixed", "uniform", "bimodal", "heavy"] = "fixed"
    value: int = Field(default=1, ge=1)  # fixed
    min: int = Field(default=1, ge=1)  # uniform, heavy
    max: int = Field(default=1, ge=1)  # uniform, heavy
    small: int = Field(default=1, ge=1)  # bimodal
    large: int = Field(default=1, ge=1)  # bimodal
    p_large: float = Field(default=0.0, ge=0, le=1)  # bimodal
    alpha: float = Field(default=1.5, gt=0)  # heavy: P(rows >= k) = (min / k) ** alpha, up to max

    @model_validator(mode="after")
    def _ranges(self) -> Rows:
        if self.dist in ("uniform", "heavy") and self.min > self.max:
            raise ValueError(f"min ({self.min}) is above max ({self.max})")
        return self

    @property
    def largest(self) -> int:
        return {"fixed": self.value, "uniform": self.max, "bimodal": max(self.small, self.large), "heavy": self.max}[
            self.dist
        ]

    def mean(self) -> float:
        if self.dist == "fixed":
            return float(self.value)
        if self.dist == "uniform":
            return (self.min + self.max) / 2
        if self.dist == "bimodal":
            return self.small * (1 - self.p_large) + self.large * self.p_large
        # E[rows] = sum over k >= 1 of P(rows >= k)
        tail: float = sum((self.min / k) ** self.alpha for k in range(self.min + 1, self.max + 1))
        return self.min + tail


class MixEntry(_Strict):
    """One kind of request: a model, its size, a protocol and a relative weight."""

    model: str = Field(min_length=1)
    weight: float = Field(default=1.0, gt=0)
    rows: Rows = Rows()
    protocol: Literal["http", "grpc"] = "http"
    # The request's size as the picker sees it (content-length, or the gRPC message): base + rows x per row.
    base_bytes: int = Field(default=120, ge=0)
    bytes_per_row: int = Field(default=48, ge=0)
    name: str | None = None

    @property
    def label(self) -> str:
        return self.name or f"{self.model}/{self.protocol}/{self.rows.dist}"


class Arrival(_Strict):
    """Poisson arrivals, or on/off bursts: ``on_s`` at a high rate, then ``off_s`` at ``off_fraction`` of it,
    with the mean rate the load asks for."""

    process: Literal["poisson", "onoff"] = "poisson"
    on_s: float = Field(default=0.5, gt=0)
    off_s: float = Field(default=1.5, gt=0)
    off_fraction: float = Field(default=0.1, ge=0, le=1)


class Load(_Strict):
    # Either a rate or a fraction of the fleet's capacity (see :func:`capacity_rps`).
    rate_rps: float | None = Field(default=None, gt=0)
    load: float | None = Field(default=None, gt=0, le=2)
    # Either a duration (measured, after warm-up) or a number of requests (warm-up included).
    duration_s: float | None = Field(default=None, gt=0)
    requests: int | None = Field(default=None, ge=1)
    warmup_s: float = Field(default=2.0, ge=0)
    timeout_s: float = Field(default=10.0, gt=0)
    arrival: Arrival = Arrival()
    mix: tuple[MixEntry, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_of(self) -> Load:
        if (self.rate_rps is None) == (self.load is None):
            raise ValueError("give exactly one of rate_rps and load")
        if (self.duration_s is None) == (self.requests is None):
            raise ValueError("give exactly one of duration_s and requests")
        return self


class HostEvent(_Strict):
    """At ``at_s``, a host (or every host of a group) dies, comes back, or changes its factor."""

    at_s: float = Field(ge=0)
    host: str
    action: Literal["die", "revive", "factor"]
    factor: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _factor(self) -> HostEvent:
        if (self.action == "factor") != (self.factor is not None):
            raise ValueError("factor goes with action: factor, and only with it")
        return self


class EnvoyModel(_Strict):
    """The gateway: latency it adds, and the retry and health settings of the rendered bootstrap
    (:mod:`extproc.envoy_config`)."""

    gateway_ms: float = Field(default=0.0, ge=0)  # Envoy's own time per request, split between both ways
    ext_proc_ms: float = Field(default=0.0, ge=0)  # the picker's round trip (picker and baseline policies)
    connect_fail_ms: float = Field(default=0.5, ge=0)  # a refused connection to a dead host
    reject_ms: float = Field(default=0.5, ge=0)  # Triton answering 400 (model not loaded there)
    num_retries: int = Field(default=2, ge=0)
    retry_base_ms: float = Field(default=25.0, ge=0)  # Envoy's default retry back-off base interval
    health_interval_s: float = Field(default=1.0, gt=0)
    unhealthy_threshold: int = Field(default=2, ge=1)
    outlier_failures: int = Field(default=3, ge=1)  # consecutive local-origin failures that eject
    ejection_s: float = Field(default=5.0, gt=0)
    max_ejection_s: float = Field(default=30.0, gt=0)


class TelemetryModel(_Strict):
    # Scrapes and polls fall on a grid of this step (each picker's are applied together per step): a
    # 1,000-host fleet would otherwise change the picker's datastore every 0.25 ms of simulated time.
    tick_ms: float = Field(default=5.0, gt=0, le=100)
    # The simple expected-completion picker polls Envoy's in-flight counts this often.
    baseline_envoy_ms: float = Field(default=20.0, gt=0)
    # EWMA weight of a new scrape interval in the baseline's mean batch time.
    baseline_smoothing: float = Field(default=0.5, gt=0, le=1)
    # Picker replicas that share their loads (picker.replicas.share_load) hear each other's picks and
    # counts this late: two hops, through the publisher.
    replica_lag_ms: float = Field(default=2.0, ge=0)


class SimScenario(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    description: str = ""
    seed: int = Field(default=1, ge=0)
    # A real-process scenario (benchmarks/scenarios/NAME.yaml) whose fleet and load this one simulates.
    routing_scenario: str | None = None
    hosts: tuple[HostGroup, ...] = Field(min_length=1)
    models: dict[str, ModelTiming] = Field(min_length=1)
    # Fleet-file keys besides hosts (models with tiers/rules/profile, picker, envoy); hosts are generated.
    fleet: dict[str, Any] = Field(default_factory=dict)
    load: Load
    events: tuple[HostEvent, ...] = ()
    pickers: tuple[int, ...] = Field(default=(1,), min_length=1)
    policies: tuple[str, ...] = POLICIES
    # Which hosts Envoy's own balancers (round_robin, least_request) spread over: every host (a plain Envoy
    # in front of the fleet) or only the hosts of the request's model (the ideal placement-aware Envoy).
    baseline_pool: Literal["all_hosts", "model_hosts"] = "all_hosts"
    envoy: EnvoyModel = EnvoyModel()
    telemetry: TelemetryModel = TelemetryModel()
    source: str = Field(default="<memory>", exclude=True)

    @model_validator(mode="after")
    def _consistent(self) -> SimScenario:
        names = [n for g in self.hosts for n in g.host_names()]
        if len(set(names)) != len(names):
            raise ValueError("host names repeat (groups with overlapping names)")
        groups = {g.name for g in self.hosts}
        for group in self.hosts:
            for m in group.models:
                if m not in self.models:
                    raise ValueError(f"host group {group.name!r} loads {m!r}, which has no timing under models")
        loaded = {m for g in self.hosts for m in g.models}
        for entry in self.load.mix:
            if entry.model not in loaded:
                raise ValueError(f"load.mix: {entry.model!r} is loaded on no host")
            if entry.rows.largest > self.models[entry.model].max_batch:
                raise ValueError(
                    f"load.mix: {entry.label} has up to {entry.rows.largest} rows, above {entry.model}'s max_batch"
                )
        for event in self.events:
            if event.host not in groups and event.host not in names:
                raise ValueError(f"events: no host or group {event.host!r}")
        for p in self.policies:
            if p not in POLICIES:
                raise ValueError(f"policies: unknown policy {p!r} (known: {', '.join(POLICIES)})")
        if any(k < 1 or k > 64 for k in self.pickers):
            raise ValueError("pickers: each count must be 1 to 64")
        return self

    # ------------------------------------------------------------------------------------------ derived

    def host_specs(self) -> list[tuple[str, HostGroup]]:
        return [(name, g) for g in self.hosts for name in g.host_names()]

    def event_hosts(self, event: HostEvent) -> list[str]:
        for g in self.hosts:
            if g.name == event.host:
                return g.host_names()
        return [event.host]

    def real_fleet(self) -> Fleet:
        """The real fleet file of this scenario: its hosts with made-up addresses, the ``fleet`` keys."""
        data = dict(self.fleet)
        hosts = []
        for i, (name, group) in enumerate(self.host_specs()):
            n = i + 1
            address = f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"
            hosts.append({"name": name, "address": address, "tier": group.tier.value})
        data["hosts"] = hosts
        if "models" not in data:
            tiers = sorted({g.tier.value for g in self.hosts})
            data["models"] = [{"name": m, "tiers": tiers} for m in self.models]
        envoy = dict(data.get("envoy") or {})
        if "fallback_tier" not in envoy:
            present = {g.tier for g in self.hosts}
            envoy["fallback_tier"] = (Tier.GPU if Tier.GPU in present else Tier.CPU).value
        data["envoy"] = envoy
        try:
            return parse_fleet(data, self.source)
        except ConfigError as exc:
            raise SimScenarioError(str(exc).replace(f"{self.source}: key ", f"{self.source}: key fleet.")) from None

    def model_share(self) -> dict[str, float]:
        total = sum(e.weight for e in self.load.mix)
        out: dict[str, float] = {}
        for e in self.load.mix:
            out[e.model] = out.get(e.model, 0.0) + e.weight / total
        return out

    def mean_rows(self, model: str) -> float:
        entries = [e for e in self.load.mix if e.model == model]
        total = sum(e.weight for e in entries)
        return sum(e.weight * e.rows.mean() for e in entries) / total

    def capacity_rps(self) -> float:
        """The highest request rate of this mix the fleet serves at full batches, each model on its hosts'
        own instances: min over models of (its hosts' requests/s) / (its share of the requests)."""
        out = math.inf
        for model, share in self.model_share().items():
            t = self.models[model]
            rows_per_s = sum(
                g.count * t.instances * t.max_batch / t.exec_s(t.max_batch, g.factor)
                for g in self.hosts
                if model in g.models
            )
            out = min(out, rows_per_s / self.mean_rows(model) / share)
        return out

    def rate_rps(self) -> float:
        load = self.load
        return load.rate_rps if load.rate_rps is not None else (load.load or 0.0) * self.capacity_rps()

    def total_s(self) -> float:
        """Warm-up plus measured time."""
        load = self.load
        if load.duration_s is not None:
            return load.warmup_s + load.duration_s
        return (load.requests or 0) / self.rate_rps()


# ------------------------------------------------------------------------------------------------ loading


def _from_routing(name: str, source: str) -> dict[str, Any]:
    """The hosts, fleet and load of a real-process scenario, in the simulator's terms."""
    from benchmarks.loadgen import request_bodies
    from benchmarks.routing import ScenarioError, find_scenario, load_scenario

    try:
        real = load_scenario(find_scenario(name))
    except ScenarioError as exc:
        raise SimScenarioError(f"{source}: key routing_scenario: {exc}") from None
    hosts = []
    for h in real.fleet["hosts"]:
        launch = h.get("launch") or {}
        hosts.append(
            {
                "name": h["name"],
                "tier": h["tier"],
                "models": list(launch.get("models", ())),
                "factor": launch.get("service_time_factor", 1.0),
            }
        )
    fleet = {k: v for k, v in real.fleet.items() if k in ("models", "picker", "envoy", "dns_resolvers")}
    bodies = request_bodies(real.load)
    mix = [
        {
            "model": e.model,
            "weight": e.weight,
            "rows": {"dist": "fixed", "value": e.shape[0]},
            "protocol": e.protocol,
            # The exact size of the body the real load generator sends.
            "base_bytes": len(body),
            "bytes_per_row": 0,
            "name": e.label,
        }
        for e, body in zip(real.load.mix, bodies, strict=True)
    ]
    load = {
        "rate_rps": real.load.rate_rps,
        "duration_s": real.load.duration_s,
        "warmup_s": real.load.warmup_s,
        "timeout_s": real.load.timeout_s,
        "mix": mix,
    }
    # The real benchmark's baseline processor is the simulator's expected_completion_baseline.
    names = {"baseline": "expected_completion_baseline"}
    policies = [names.get(p.value, p.value) for p in real.policies]
    factors = {h["name"]: h["factor"] for h in hosts}
    return {
        "description": real.description,
        "seed": real.load.seed,
        "hosts": hosts,
        "fleet": fleet,
        "load": load,
        "baseline_pool": "all_hosts" if real.baseline_pool == "all_hosts" else "model_hosts",
        "policies": list(dict.fromkeys([*policies, "expected_completion_baseline", "oracle"])),
        # A real slowdown multiplies the host's launch factor; the simulator's event sets the factor.
        "events": [
            {"at_s": s.at_s, "host": s.host, "action": "factor", "factor": s.factor * factors[s.host]}
            for s in real.slowdowns
        ],
    }


def parse_sim_scenario(data: Any, source: str = "<memory>") -> SimScenario:
    if not isinstance(data, dict):
        raise SimScenarioError(f"{source}: a scenario must be a mapping at the top level")
    data = dict(data)
    if data.get("routing_scenario"):
        imported = _from_routing(str(data["routing_scenario"]), source)
        load = {**imported.pop("load"), **(data.pop("load", None) or {})}
        data = {**imported, **data, "load": load}
    try:
        scenario = SimScenario.model_validate({**data, "source": source})
    except ValidationError as exc:
        problems = [f"{source}: key {key_path(err['loc'])}: {err['msg']}" for err in exc.errors()]
        raise SimScenarioError("\n".join(problems)) from None
    scenario.real_fleet()  # validates the embedded fleet
    return scenario


def with_fleet_settings(scenario: SimScenario, settings: list[str]) -> SimScenario:
    """``scenario`` with fleet-file keys set, each ``KEY=VALUE`` (a dotted key under ``fleet``, e.g.
    ``picker.poll.triton_metrics_ms=50``; the value read as YAML): the same workload under other settings.
    A malformed setting, or one the fleet-file schema refuses, is a :class:`SimScenarioError` naming it."""
    from benchmarks.routing import with_fleet_keys

    changed = scenario.model_copy(update={"fleet": with_fleet_keys(scenario.fleet, settings, SimScenarioError)})
    changed.real_fleet()  # refuses what the fleet-file schema refuses, naming the key
    return changed


def load_sim_scenario(path: str | Path) -> SimScenario:
    from benchmarks.routing import read_scenario_yaml

    path = Path(path)
    return parse_sim_scenario(read_scenario_yaml(path, SimScenarioError), str(path))


def find_sim_scenario(value: str | Path) -> Path:
    """``value`` itself when it is a file, else the scenario of that name in ``scenarios/sim/``."""
    path = Path(value)
    if path.exists() or path.parent != Path():
        return path
    named = SIM_SCENARIOS_DIR / (path.name if path.suffix else f"{path.name}.yaml")
    return named if named.is_file() else path


def family() -> list[Path]:
    return sorted(SIM_SCENARIOS_DIR.glob("*.yaml"))
