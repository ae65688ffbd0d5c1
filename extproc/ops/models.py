"""``extproc models``: Triton's repository API (explicit model control) across the fleet.

- :func:`read_index` asks every host for its repository index at once (a thread pool); a host that does
  not answer is reported in its :class:`HostIndex`, never raised.
- ``plan_*`` functions are pure: from the fleet file, the hosts' indexes and the picker's ``/status`` they
  decide which hosts to act on, in which order, and what would go wrong (:class:`LoadPlan`,
  :class:`RollPlan`). ``--dry-run`` prints a plan and stops there.
- ``execute_*`` functions carry a plan out through the small client interfaces (:class:`TritonApi` here,
  :class:`~extproc.ops.status.PickerApi` and :class:`~extproc.ops.status.EnvoyApi`), reporting progress.

Unloading a model from a host that serves requests for it must not fail any of them. The picker can only
drain a whole host, so each host is taken out one at a time: drain it in every picker, wait until no
request is in flight to it (the pickers' counts and, where reachable, Envoy's live ``rq_active``), unload
(and for a reload, load again and wait until the pickers see it READY), wait until every picker's view
matches Triton's, then undrain. A plan refuses (unless forced) to drain a host that is the only routable
home of one of its models, since that model's requests would fail meanwhile.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal, Protocol, TextIO

from extproc.admin_key import GRPC_HEADER, read_admin_key
from extproc.config import Fleet, HostSpec, Tier
from extproc.ops import OpsError
from extproc.ops.status import EnvoyApi, PickerApi, PickerHost, PickerStatus, envoy_hosts, format_table

# Triton's model states (RepositoryIndex), and ours for the table.
READY: Final = "READY"
LOADING: Final = "LOADING"
UNLOADING: Final = "UNLOADING"
UNAVAILABLE: Final = "UNAVAILABLE"  # a load failed (the reason says why)
NOT_LOADED: Final = "-"  # in the host's repository, not loaded (never loaded, or unloaded)
ABSENT: Final = "n/a"  # not in the host's repository
UNKNOWN: Final = "?"  # the host did not answer

_STATE_ORDER: Final = (READY, LOADING, UNLOADING, UNAVAILABLE)

# Keep retrying a host that restarts; the sync client otherwise backs off for up to 2 minutes.
_CHANNEL_ARGS: Final[list[tuple[str, int]]] = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


class TritonError(OpsError):
    """One Triton host refused or did not answer a repository call."""

    def __init__(self, host: str, message: str) -> None:
        super().__init__(f"{host}: {message}")
        self.host = host


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One row of Triton's repository index: a model version (or a never-loaded model: no version)."""

    name: str
    version: str = ""
    state: str = ""
    reason: str = ""


class TritonApi(Protocol):
    """Triton's repository API on any host of the fleet. Raises :class:`TritonError`."""

    def index(self, host: HostSpec, timeout_s: float) -> Sequence[IndexEntry]: ...

    def load(self, host: HostSpec, model: str, timeout_s: float) -> None:
        """Load (or reload) ``model``; returns once Triton has it READY, raises if it failed."""
        ...

    def unload(self, host: HostSpec, model: str, timeout_s: float) -> None:
        """Ask Triton to unload ``model``; Triton finishes the model's in-flight requests first and may
        return before the model has left UNLOADING."""
        ...


class GrpcTriton:
    """:class:`TritonApi` over ``tritonclient.grpc`` (sync), one client per host, safe across threads.
    ``admin_key``: the fleet's key, which every call here (model-repository APIs) needs on restricted hosts."""

    def __init__(self, admin_key: str | None = None) -> None:
        self._headers = {GRPC_HEADER: admin_key} if admin_key is not None else None
        self._clients: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _client(self, host: HostSpec) -> Any:
        import tritonclient.grpc as grpcclient

        with self._lock:
            client = self._clients.get(host.grpc_endpoint)
            if client is None:
                client = grpcclient.InferenceServerClient(url=host.grpc_endpoint, channel_args=_CHANNEL_ARGS)
                self._clients[host.grpc_endpoint] = client
            return client

    def _call(self, host: HostSpec, what: str, call: Callable[[Any], Any]) -> Any:
        from tritonclient.utils import InferenceServerException

        try:
            return call(self._client(host))
        except InferenceServerException as exc:
            raise TritonError(host.name, f"{what} failed ({host.grpc_endpoint}): {_describe(exc)}") from None

    def index(self, host: HostSpec, timeout_s: float) -> Sequence[IndexEntry]:
        response = self._call(
            host,
            "repository index",
            lambda c: c.get_model_repository_index(headers=self._headers, client_timeout=timeout_s),
        )
        return [IndexEntry(m.name, m.version, m.state, m.reason) for m in response.models]

    def load(self, host: HostSpec, model: str, timeout_s: float) -> None:
        self._call(
            host, f"load {model}", lambda c: c.load_model(model, headers=self._headers, client_timeout=timeout_s)
        )

    def unload(self, host: HostSpec, model: str, timeout_s: float) -> None:
        self._call(
            host, f"unload {model}", lambda c: c.unload_model(model, headers=self._headers, client_timeout=timeout_s)
        )

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()


def _describe(exc: Any) -> str:
    status = str(exc.status() or "").removeprefix("StatusCode.")
    message = str(exc.message() or exc).strip().splitlines()
    text = message[0] if message else ""
    if status == "UNAVAILABLE":
        return f"unreachable ({text})"
    if status == "DEADLINE_EXCEEDED":
        return "timed out"
    return f"{status}: {text}" if status else text


# --- the fleet's repository indexes ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HostIndex:
    """One host's repository index, or why it could not be read."""

    host: HostSpec
    entries: tuple[IndexEntry, ...] = ()
    error: str | None = None

    @property
    def name(self) -> str:
        return self.host.name

    def state(self, model: str) -> str:
        """The model's state on this host: the most advanced of its versions' states."""
        if self.error is not None:
            return UNKNOWN
        states = [e for e in self.entries if e.name == model]
        if not states:
            return ABSENT
        for state in _STATE_ORDER:
            if any(e.state == state and not (state == UNAVAILABLE and _unloaded(e)) for e in states):
                return state
        return NOT_LOADED

    def ready_versions(self, model: str) -> tuple[str, ...]:
        return tuple(sorted(e.version for e in self.entries if e.name == model and e.state == READY and e.version))

    def reason(self, model: str) -> str:
        return "; ".join(
            e.reason for e in self.entries if e.name == model and e.state == UNAVAILABLE and not _unloaded(e)
        )

    def models(self) -> set[str]:
        return {e.name for e in self.entries}

    def ready_models(self) -> set[str]:
        return {e.name for e in self.entries if e.state == READY}


def _unloaded(entry: IndexEntry) -> bool:
    # Triton lists a model it has unloaded as UNAVAILABLE with the reason "unloaded": not an error.
    return entry.reason.strip().lower() == "unloaded"


def read_index(triton: TritonApi, hosts: Sequence[HostSpec], timeout_s: float) -> dict[str, HostIndex]:
    """Every host's index, in parallel; a host that fails has ``error`` set."""

    def one(host: HostSpec) -> HostIndex:
        try:
            return HostIndex(host, tuple(triton.index(host, timeout_s)))
        except OpsError as exc:
            return HostIndex(host, error=str(exc))

    if not hosts:
        return {}
    with ThreadPoolExecutor(max_workers=min(32, len(hosts))) as pool:
        return {index.name: index for index in pool.map(one, hosts)}


def allowed_tiers(fleet: Fleet, model: str) -> tuple[Tier, ...] | None:
    """The model's tiers from the fleet file (default first), or None: not listed, any tier serves it."""
    spec = fleet.model(model)
    return None if spec is None else spec.tiers


def _tiers_text(tiers: tuple[Tier, ...] | None) -> str:
    return "any" if tiers is None else ",".join(t.value for t in tiers)


def model_names(fleet: Fleet, indexes: Mapping[str, HostIndex]) -> list[str]:
    """Models of the fleet file first (in file order), then every other model any host lists, sorted."""
    listed = [m.name for m in fleet.models]
    others = sorted({name for index in indexes.values() for name in index.models()} - set(listed))
    return listed + others


def format_models(fleet: Fleet, indexes: Mapping[str, HostIndex], models: Sequence[str] = ()) -> str:
    """The model x host table: rows are models (with their allowed tiers), columns hosts (with tiers)."""
    hosts = [indexes[h.name] for h in fleet.hosts if h.name in indexes]
    names = list(models) or model_names(fleet, indexes)
    headers = ["MODEL", "TIERS", *(f"{h.name} ({h.host.tier.value})" for h in hosts)]
    rows: list[list[str]] = []
    for model in names:
        cells = []
        for h in hosts:
            state = h.state(model)
            versions = h.ready_versions(model)
            if state == READY and versions != ("1",):
                state = f"READY:{','.join(versions)}"
            cells.append(state)
        rows.append([model, _tiers_text(allowed_tiers(fleet, model)), *cells])
    lines = format_table(headers, rows)
    legend = f"{NOT_LOADED} not loaded   {ABSENT} not in the host's repository   {UNKNOWN} host did not answer"
    lines.append("")
    lines.append(legend)
    for h in hosts:
        if h.error is not None:
            lines.append(f"{h.name}: {h.error}")
        for model in names:
            reason = h.reason(model) if h.error is None else ""
            if reason:
                lines.append(f"{h.name}: {model} UNAVAILABLE: {reason}")
    return "\n".join(lines) + "\n"


def models_json(fleet: Fleet, indexes: Mapping[str, HostIndex], models: Sequence[str] = ()) -> dict[str, Any]:
    hosts = [indexes[h.name] for h in fleet.hosts if h.name in indexes]
    names = list(models) or model_names(fleet, indexes)
    return {
        "hosts": {h.name: {"tier": h.host.tier.value, "error": h.error} for h in hosts},
        "models": {
            model: {
                "tiers": None if (t := allowed_tiers(fleet, model)) is None else [x.value for x in t],
                "hosts": {
                    h.name: {
                        "state": h.state(model),
                        "ready_versions": list(h.ready_versions(model)),
                        "reason": h.reason(model) or None,
                    }
                    for h in hosts
                },
            }
            for model in names
        },
    }


# --- operations context ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Timeouts:
    index_s: float = 5.0  # one repository index call
    load_s: float = 300.0  # one load (Triton returns when the model is READY)
    unload_s: float = 120.0  # one unload call, and then until the model has left UNLOADING
    drain_s: float = 60.0  # until no request is in flight to a drained host
    picker_s: float = 30.0  # until every picker's view matches Triton's (READY or gone)
    settle_s: float = 1.0  # after draining, before in-flight counts are trusted (picks already made land)
    poll_s: float = 0.2  # between two looks while waiting
    quiet_reads: int = 2  # consecutive looks with nothing in flight before unloading


@dataclass
class Ops:
    """What the executors act through. ``clock`` and ``sleep`` are injectable so tests run instantly."""

    fleet: Fleet
    triton: TritonApi
    pickers: Sequence[PickerApi] = ()
    envoys: Sequence[EnvoyApi] = ()
    timeouts: Timeouts = field(default_factory=Timeouts)
    progress: Callable[[str], None] = lambda _: None
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep


def picker_statuses(pickers: Sequence[PickerApi]) -> list[PickerStatus]:
    """Every picker's ``/status``; raises the first failure (operations need all of them)."""
    return [p.status() for p in pickers]


def merged_view(statuses: Sequence[PickerStatus]) -> dict[str, PickerHost]:
    """One conservative view over several picker replicas: a host is routable only if every replica may
    route to it, and a model READY there only if every replica sees it READY."""
    if not statuses:
        return {}
    out = dict(statuses[0].hosts)
    for status in statuses[1:]:
        for name, host in list(out.items()):
            other = status.hosts.get(name)
            if other is None:
                del out[name]
                continue
            out[name] = PickerHost(
                name=name,
                tier=host.tier,
                fresh=host.fresh and other.fresh,
                routable=host.routable and other.routable,
                ready={m: v for m, v in host.ready.items() if m in other.ready},
                in_flight=host.in_flight + other.in_flight,
                pending=max(host.pending, other.pending),
                service_ms=host.service_ms,
                queue_ms=host.queue_ms,
                gpu_memory_used=host.gpu_memory_used,
                gpu_memory_total=host.gpu_memory_total,
                draining=host.draining or other.draining,
                ejected=host.ejected or other.ejected,
                unhealthy=host.unhealthy or other.unhealthy,
                age_s=host.age_s,
            )
    return out


def _unroutable_reason(host: PickerHost | None) -> str | None:
    if host is None:
        return "unknown to the picker"
    for flag, on in (
        ("draining", host.draining),
        ("ejected by Envoy", host.ejected),
        ("failing Envoy's health check", host.unhealthy),
        ("stale telemetry", not host.fresh),
    ):
        if on:
            return flag
    return None if host.routable else "not routable"


# --- load and place: plans ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Skip:
    host: str
    reason: str


@dataclass(frozen=True, slots=True)
class Target:
    host: HostSpec
    gpu_free: int | None  # bytes of GPU memory free per the picker, None where unknown (or no GPU)
    gpu_percent: float | None
    loaded: int  # models READY on the host now

    def describe(self) -> str:
        if self.gpu_free is None:
            gpu = "GPU memory unknown"
        else:
            gpu = f"{self.gpu_free / 2**30:.1f} GiB GPU memory free ({self.gpu_percent or 0:.0f}% used)"
        return f"{self.host.name} ({self.host.tier.value}): {gpu}, {self.loaded} models loaded"


@dataclass(frozen=True, slots=True)
class LoadPlan:
    model: str
    targets: tuple[Target, ...]  # in the order they were chosen
    present: tuple[str, ...]  # hosts asked about where the model is READY (or LOADING) already
    ready_on: tuple[str, ...] = ()  # every host of the fleet where it is READY
    skipped: tuple[Skip, ...] = ()
    notes: tuple[str, ...] = ()
    wanted: int | None = None  # ``place``: hosts the model should be READY on in all
    problems: tuple[str, ...] = ()  # why the plan cannot be carried out as asked

    @property
    def short(self) -> int:
        """Hosts missing to reach ``wanted`` after this plan."""
        return 0 if self.wanted is None else max(0, self.wanted - len(self.present) - len(self.targets))


def _rank_key(target: Target, tiers: tuple[Tier, ...] | None) -> tuple[int, int, int, int, str]:
    tier_rank = tiers.index(target.host.tier) if tiers is not None and target.host.tier in tiers else 0
    free = target.gpu_free
    return (tier_rank, 0 if free is not None else 1, -(free or 0), target.loaded, target.host.name)


def rank(targets: Iterable[Target], tiers: tuple[Tier, ...] | None) -> list[Target]:
    """Best first: the model's default tier first, then most GPU memory free (hosts that report it before
    those that do not), then fewest models loaded, then name."""
    return sorted(targets, key=lambda t: _rank_key(t, tiers))


def _target(index: HostIndex, view: PickerHost | None) -> Target:
    return Target(
        host=index.host,
        gpu_free=None if view is None else view.gpu_memory_free,
        gpu_percent=None if view is None else view.gpu_memory_percent,
        loaded=len(index.ready_models()),
    )


def _pool(
    fleet: Fleet,
    model: str,
    indexes: Mapping[str, HostIndex],
    view: Mapping[str, PickerHost],
    hosts: Sequence[HostSpec],
    *,
    tiers: tuple[Tier, ...] | None,
    need_routable: bool,
    force: bool,
) -> tuple[list[Target], list[str], list[Skip]]:
    """Split ``hosts`` into load candidates, hosts that have the model already, and skipped hosts."""
    candidates: list[Target] = []
    present: list[str] = []
    skipped: list[Skip] = []
    for host in hosts:
        index = indexes.get(host.name)
        if index is None:
            skipped.append(Skip(host.name, "not asked"))
            continue
        if index.error is not None:
            skipped.append(Skip(host.name, index.error))
            continue
        state = index.state(model)
        if state in {READY, LOADING}:
            present.append(host.name)
            continue
        if state == ABSENT:
            skipped.append(Skip(host.name, f"{model} is not in its model repository"))
            continue
        if tiers is not None and host.tier not in tiers and not force:
            skipped.append(Skip(host.name, f"tier {host.tier.value} is not allowed for {model} ({_tiers_text(tiers)})"))
            continue
        if need_routable and view:
            reason = _unroutable_reason(view.get(host.name))
            if reason is not None:
                skipped.append(Skip(host.name, reason))
                continue
        candidates.append(_target(index, view.get(host.name)))
    return candidates, present, skipped


def _ready_on(indexes: Mapping[str, HostIndex], model: str) -> tuple[str, ...]:
    return tuple(name for name, index in indexes.items() if index.state(model) == READY)


def _check_tier(fleet: Fleet, model: str, tier: Tier | None, force: bool) -> list[str]:
    tiers = allowed_tiers(fleet, model)
    if tier is not None and tiers is not None and tier not in tiers and not force:
        return [f"{model} may only run on tiers {_tiers_text(tiers)} (fleet file), not {tier.value}"]
    return []


def _fleet_notes(fleet: Fleet, model: str, view: Mapping[str, PickerHost]) -> list[str]:
    notes = []
    if fleet.model(model) is None:
        notes.append(f"{model} is not in the fleet file: the picker serves it from any tier where it is READY")
    if not view:
        notes.append("no picker status: GPU memory unknown, ranking by models loaded")
    return notes


def plan_load(
    fleet: Fleet,
    model: str,
    indexes: Mapping[str, HostIndex],
    view: Mapping[str, PickerHost],
    *,
    hosts: Sequence[str] = (),
    tier: Tier | None = None,
    count: int | None = None,
    force: bool = False,
) -> LoadPlan:
    """Load ``model`` on the named hosts, or on the hosts of ``tier``, or on every host of its allowed tiers;
    ``count`` keeps the best ``count`` of those (see :func:`rank`). Hosts that have it READY are left alone."""
    by_name = {h.name: h for h in fleet.hosts}
    unknown = [n for n in hosts if n not in by_name]
    if unknown:
        raise OpsError(f"no host named {', '.join(map(repr, unknown))} in {fleet.source}")
    tiers = allowed_tiers(fleet, model)
    problems = _check_tier(fleet, model, tier, force)
    if hosts:
        pool = [by_name[n] for n in hosts]
    elif tier is not None:
        pool = [h for h in fleet.hosts if h.tier is tier]
    else:
        pool = [h for h in fleet.hosts if tiers is None or h.tier in tiers]
    candidates, present, skipped = _pool(
        fleet, model, indexes, view, pool, tiers=tiers, need_routable=False, force=force
    )
    ranked = rank(candidates, tiers)
    if count is not None:
        for extra in ranked[count:]:
            skipped.append(Skip(extra.host.name, f"--count {count}: ranked below the chosen hosts"))
        ranked = ranked[:count]
    if hosts and not force:
        problems += [
            f"{s.host}: {s.reason} (--force to load it anyway)" for s in skipped if "is not allowed for" in s.reason
        ]
    return LoadPlan(
        model=model,
        targets=tuple(ranked),
        present=tuple(present),
        ready_on=_ready_on(indexes, model),
        skipped=tuple(skipped),
        notes=tuple(_fleet_notes(fleet, model, view)),
        problems=tuple(problems),
    )


def plan_place(
    fleet: Fleet,
    model: str,
    indexes: Mapping[str, HostIndex],
    view: Mapping[str, PickerHost],
    *,
    count: int,
    tier: Tier | None = None,
    force: bool = False,
) -> LoadPlan:
    """Make ``model`` READY on ``count`` hosts in all (of ``tier``, else of its allowed tiers): keep the hosts
    that have it, add the best-ranked routable ones. Never unloads."""
    if count < 1:
        raise OpsError("--count must be at least 1")
    tiers = allowed_tiers(fleet, model)
    problems = _check_tier(fleet, model, tier, force)
    pool = [h for h in fleet.hosts if (h.tier is tier if tier is not None else tiers is None or h.tier in tiers)]
    candidates, present, skipped = _pool(
        fleet, model, indexes, view, pool, tiers=tiers, need_routable=True, force=force
    )
    ranked = rank(candidates, tiers)
    missing = max(0, count - len(present))
    for extra in ranked[missing:]:
        skipped.append(Skip(extra.host.name, f"not needed: {count} hosts reached"))
    plan = LoadPlan(
        model=model,
        targets=tuple(ranked[:missing]),
        present=tuple(present),
        ready_on=_ready_on(indexes, model),
        skipped=tuple(skipped),
        notes=tuple(_fleet_notes(fleet, model, view)),
        wanted=count,
        problems=tuple(problems),
    )
    if plan.short:
        where = f"tier {tier.value}" if tier is not None else f"tiers {_tiers_text(tiers)}"
        possible = len(present) + len(plan.targets)
        plan = replace(plan, problems=(*plan.problems, f"only {possible} of {count} hosts possible in {where}"))
    return plan


def format_load_plan(plan: LoadPlan, action: str = "load") -> str:
    lines: list[str] = []
    head = f"{action} {plan.model}"
    if plan.wanted is not None:
        head += f" on {plan.wanted} hosts in all"
    lines.append(f"{head}: READY now on {', '.join(plan.ready_on) or 'no host'}")
    if plan.targets:
        lines.append(f"will load on {len(plan.targets)} host{'s' if len(plan.targets) != 1 else ''}:")
        lines.extend(f"  {i}. {t.describe()}" for i, t in enumerate(plan.targets, 1))
    else:
        lines.append("nothing to load")
    if plan.skipped:
        lines.append("not on:")
        lines.extend(f"  {s.host}: {s.reason}" for s in plan.skipped)
    lines.extend(f"note: {n}" for n in plan.notes)
    lines.extend(f"problem: {p}" for p in plan.problems)
    return "\n".join(lines) + "\n"


# --- unload and reload: plans ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HostStep:
    host: HostSpec
    # What the drain would cost: models READY on the host that no other routable host would serve meanwhile.
    stranded: tuple[str, ...] = ()
    # Where the host's models go while it is drained: model → other hosts.
    elsewhere: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RollPlan:
    action: Literal["unload", "reload"]
    model: str
    steps: tuple[HostStep, ...]
    skipped: tuple[Skip, ...] = ()
    notes: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()  # refusals; ``--force`` goes ahead anyway


def _others_serving(
    fleet: Fleet, model: str, host: HostSpec, view: Mapping[str, PickerHost], gone: set[str]
) -> tuple[str, ...]:
    """Routable hosts other than ``host`` (and ``gone``) where the picker would send ``model``'s requests
    while ``host`` is drained: same tier, or another allowed tier when the profile spills over."""
    spec = fleet.model(model)
    tiers = None if spec is None else spec.tiers
    spill = fleet.profile(spec, host.tier).spillover
    out = []
    for other in fleet.hosts:
        if other.name == host.name or other.name in gone:
            continue
        o = view.get(other.name)
        if o is None or not o.routable or model not in o.ready:
            continue
        if other.tier is not host.tier and (not spill or (tiers is not None and other.tier not in tiers)):
            continue
        out.append(other.name)
    return tuple(out)


def plan_roll(
    action: Literal["unload", "reload"],
    fleet: Fleet,
    model: str,
    indexes: Mapping[str, HostIndex],
    view: Mapping[str, PickerHost],
    *,
    hosts: Sequence[str] = (),
    tier: Tier | None = None,
    drain: bool = True,
) -> RollPlan:
    """Hosts to take out one at a time (fleet-file order) to unload or reload ``model``.

    Problems (refusals): a host or the picker that cannot be asked; a drain that would leave one of the
    host's models with no routable host elsewhere (its requests would fail until the host is back).
    """
    by_name = {h.name: h for h in fleet.hosts}
    unknown = [n for n in hosts if n not in by_name]
    if unknown:
        raise OpsError(f"no host named {', '.join(map(repr, unknown))} in {fleet.source}")
    pool = [by_name[n] for n in hosts] if hosts else [h for h in fleet.hosts if tier is None or h.tier is tier]
    steps: list[HostStep] = []
    skipped: list[Skip] = []
    problems: list[str] = []
    notes: list[str] = []
    if drain and not view:
        problems.append("no picker status: cannot drain hosts before unloading (--no-drain accepts failed requests)")
    gone: set[str] = set()  # for unload: hosts the model will have left by the time a later step drains
    for host in pool:
        index = indexes.get(host.name)
        if index is None or index.error is not None:
            reason = "not asked" if index is None else index.error or ""
            skipped.append(Skip(host.name, reason))
            if hosts:
                problems.append(reason if index is not None else f"{host.name}: {reason}")
            continue
        state = index.state(model)
        if state not in {READY, LOADING, UNAVAILABLE}:
            skipped.append(Skip(host.name, f"{model} is not loaded there ({state})"))
            continue
        stranded: list[str] = []
        elsewhere: dict[str, tuple[str, ...]] = {}
        if drain and view:
            me = view.get(host.name)
            models_here = sorted(set(me.ready) if me is not None else index.ready_models())
            for other_model in models_here:
                others = _others_serving(fleet, other_model, host, view, gone if other_model == model else set())
                elsewhere[other_model] = others
                # Draining a host the picker does not route to anyway (ejected, stale, drained) costs nothing.
                if not others and (me is None or me.routable):
                    stranded.append(other_model)
        step = HostStep(host, tuple(stranded), elsewhere)
        for m in step.stranded:
            if m == model and action == "unload":
                problems.append(
                    f"{host.name}: unloading the last routable copy of {model}: its requests will fail "
                    "(load it elsewhere first, or --force)"
                )
            else:
                problems.append(
                    f"{host.name}: while it drains, {m} has no other routable host and its requests would fail "
                    f"(`extproc models place {m} --count 2` first, or --force)"
                )
        steps.append(step)
        if action == "unload":
            gone.add(host.name)
    if not steps:
        notes.append(f"{model} is not loaded on any of the hosts asked: nothing to do")
    if not drain:
        notes.append("--no-drain: requests for the model that reach a host while it unloads will fail")
    return RollPlan(action, model, tuple(steps), tuple(skipped), tuple(notes), tuple(problems))


def format_roll_plan(plan: RollPlan, pickers: int, timeouts: Timeouts, drain: bool = True) -> str:
    work = "unload" if plan.action == "unload" else "unload, load"
    agree = "sees it gone" if plan.action == "unload" else "sees it READY"
    lines = [
        f"{plan.action} {plan.model} on {len(plan.steps)} host{'s' if len(plan.steps) != 1 else ''}, one at a time:"
    ]
    for i, step in enumerate(plan.steps, 1):
        if drain:
            what = (
                f"drain in {pickers} picker{'s' if pickers != 1 else ''}, wait until nothing is in flight "
                f"(up to {timeouts.drain_s:g} s), {work}, wait until the picker {agree}, undrain"
            )
        else:
            what = work
        lines.append(f"  {i}. {step.host.name} ({step.host.tier.value}): {what}")
        if step.elsewhere:
            moves = "; ".join(f"{m} → {', '.join(o) or 'NOWHERE'}" for m, o in step.elsewhere.items())
            lines.append(f"     meanwhile: {moves}")
    if plan.skipped:
        lines.append("not on:")
        lines.extend(f"  {s.host}: {s.reason}" for s in plan.skipped)
    lines.extend(f"note: {n}" for n in plan.notes)
    lines.extend(f"problem: {p}" for p in plan.problems)
    return "\n".join(lines) + "\n"


# --- executors ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HostResult:
    host: str
    ok: bool
    message: str
    seconds: float = 0.0


def _wait(ops: Ops, timeout_s: float, check: Callable[[], str | None], what: str) -> float:
    """Poll ``check`` (None: done; a string: what is still missing) until done or ``timeout_s``."""
    start = ops.clock()
    while True:
        missing = check()
        if missing is None:
            return ops.clock() - start
        if ops.clock() - start >= timeout_s:
            raise OpsError(f"{what}: still {missing} after {timeout_s:g} s")
        ops.sleep(ops.timeouts.poll_s)


def _picker_sees(ops: Ops, host: str, model: str, ready: bool) -> Callable[[], str | None]:
    """A check: every picker sees ``model`` READY on ``host`` (fresh), or no longer READY."""

    def check() -> str | None:
        for picker in ops.pickers:
            try:
                view = picker.status().hosts.get(host)
            except OpsError as exc:
                return f"no answer from {picker.url} ({exc})"
            if view is None:
                return f"{host} unknown to {picker.url}"
            listed = model in view.ready
            if ready and not (listed and view.fresh):
                return f"not READY in {picker.url}" + ("" if view.fresh else " (stale)")
            if not ready and listed and view.fresh:
                return f"READY in {picker.url}"
        return None

    return check


def _triton_state(ops: Ops, host: HostSpec, model: str) -> str:
    try:
        return HostIndex(host, tuple(ops.triton.index(host, ops.timeouts.index_s))).state(model)
    except OpsError:
        return UNKNOWN


def _triton_left(ops: Ops, host: HostSpec, model: str) -> Callable[[], str | None]:
    """A check: Triton no longer has ``model`` READY or UNLOADING on ``host``."""

    def check() -> str | None:
        state = _triton_state(ops, host, model)
        return state if state in {READY, UNLOADING, UNKNOWN} else None

    return check


def _in_flight(ops: Ops, host: HostSpec) -> str | None:
    """None when no picker and no reachable Envoy has a request in flight to ``host``."""
    for picker in ops.pickers:
        try:
            view = picker.status().hosts.get(host.name)
        except OpsError as exc:
            return f"no answer from {picker.url} ({exc})"
        if view is not None and (view.in_flight > 0 or view.pending > 0):
            return f"{view.in_flight:g} in flight, {view.pending} queued per {picker.url}"
    for envoy in ops.envoys:
        try:
            seen = envoy_hosts([host], envoy.endpoints())[host.name]
        except OpsError:
            continue  # Envoy's admin is a second opinion; the pickers' counts include its rq_active
        if seen.active:
            return f"{seen.active} in flight per Envoy {envoy.url}"
    return None


def _wait_quiet(ops: Ops, host: HostSpec) -> float:
    """After a drain: let picks already made reach Envoy, then wait for ``quiet_reads`` quiet looks in a row."""
    start = ops.clock()
    ops.sleep(ops.timeouts.settle_s)
    quiet = 0

    def check() -> str | None:
        nonlocal quiet
        busy = _in_flight(ops, host)
        quiet = 0 if busy is not None else quiet + 1
        if busy is not None:
            return busy
        return None if quiet >= ops.timeouts.quiet_reads else "settling"

    _wait(ops, ops.timeouts.drain_s, check, f"{host.name}: waiting for in-flight requests to finish")
    return ops.clock() - start


class _Drain:
    """Drain one host in every picker; restore only what this operation changed."""

    def __init__(self, ops: Ops, host: HostSpec) -> None:
        self.ops = ops
        self.host = host
        self.drained: list[PickerApi] = []
        self.already: list[str] = []

    def start(self) -> None:
        for picker in self.ops.pickers:
            view = picker.status().hosts.get(self.host.name)
            if view is None:
                raise OpsError(f"{self.host.name}: not a host of the picker at {picker.url}")
            if view.draining:
                self.already.append(picker.url)
                continue
            if not picker.drain(self.host.name):
                raise OpsError(f"{self.host.name}: the picker at {picker.url} did not drain it")
            self.drained.append(picker)

    def undrain(self) -> list[str]:
        """Undrain where we drained; returns the failures."""
        failures = []
        for picker in self.drained:
            try:
                picker.undrain(self.host.name)
            except OpsError as exc:
                failures.append(str(exc))
        self.drained = []
        return failures


def _finish_host(ops: Ops, host: HostSpec, model: str, drain: _Drain, *, expect_ready: bool | None) -> str | None:
    """Undrain once that is safe: no picker may still list the model READY where Triton does not have it.

    ``expect_ready``: what Triton should show now (None: ask Triton). Returns a problem, or None.
    """
    if not drain.drained:
        return None
    if expect_ready is None:
        expect_ready = _triton_state(ops, host, model) == READY
    if not expect_ready:
        try:
            _wait(ops, ops.timeouts.picker_s, _picker_sees(ops, host.name, model, ready=False), f"{host.name}")
        except OpsError as exc:
            drain.drained = []  # leave it drained: never undrain while a picker may still route there
            return (
                f"{exc}; left {host.name} drained so no request reaches it for {model}: undrain it with "
                f"`curl -X POST {ops.pickers[0].url}/hosts/{host.name}/undrain` once the picker has caught up"
            )
    failures = drain.undrain()
    return "; ".join(failures) or None


def _stranded_now(ops: Ops, plan: RollPlan, host: HostSpec, gone: set[str]) -> list[str]:
    """Models on ``host`` that no other routable host would serve if it were drained now (live views)."""
    view = merged_view(picker_statuses(ops.pickers))
    me = view.get(host.name)
    if me is None or not me.routable:
        return []
    return [
        m for m in sorted(me.ready) if not _others_serving(ops.fleet, m, host, view, gone if m == plan.model else set())
    ]


def execute_roll(ops: Ops, plan: RollPlan, *, drain: bool = True, force: bool = False) -> list[HostResult]:
    """Carry out an unload or reload plan host by host; stops at the first host that fails.

    Before each drain the pickers' live views are checked again: a host that became the only routable home
    of one of its models since the plan was made stops the operation (unless ``force``).
    """
    results: list[HostResult] = []
    total = len(plan.steps)
    gone: set[str] = set()
    for i, step in enumerate(plan.steps, 1):
        host = step.host
        prefix = f"[{i}/{total}] {host.name}: "
        start = ops.clock()
        handle = _Drain(ops, host)
        triton_ready: bool | None = True  # whether Triton has the model READY now; None: not sure
        try:
            if drain:
                stranded = _stranded_now(ops, plan, host, gone)
                if stranded and not force:
                    raise OpsError(
                        f"draining it now would leave {', '.join(stranded)} with no routable host (--force to go on)"
                    )
                handle.start()
                if handle.already:
                    ops.progress(prefix + f"already draining in {', '.join(handle.already)}; left drained")
                ops.progress(prefix + f"draining in {len(handle.drained)} picker(s), waiting for in-flight requests")
                waited = _wait_quiet(ops, host)
                ops.progress(prefix + f"nothing in flight ({waited:.1f} s)")
            ops.progress(prefix + f"unloading {plan.model}")
            triton_ready = None
            ops.triton.unload(host, plan.model, ops.timeouts.unload_s)
            _wait(
                ops,
                ops.timeouts.unload_s,
                _triton_left(ops, host, plan.model),
                f"{host.name}: unloading {plan.model}",
            )
            triton_ready = False
            ops.progress(prefix + f"unloaded {plan.model}")
            if plan.action == "reload":
                ops.progress(prefix + f"loading {plan.model}")
                triton_ready = None
                ops.triton.load(host, plan.model, ops.timeouts.load_s)
                index = HostIndex(host, tuple(ops.triton.index(host, ops.timeouts.index_s)))
                if index.state(plan.model) != READY:
                    raise OpsError(
                        f"{plan.model} is {index.state(plan.model)} after loading {index.reason(plan.model)}"
                    )
                triton_ready = True
                if ops.pickers:
                    waited = _wait(
                        ops,
                        ops.timeouts.picker_s,
                        _picker_sees(ops, host.name, plan.model, ready=True),
                        f"waiting for the picker to see {plan.model} READY",
                    )
                    ops.progress(prefix + f"{plan.model} READY in the picker ({waited:.1f} s)")
                else:
                    ops.progress(prefix + f"{plan.model} READY")
            elif drain:
                ops.progress(prefix + "waiting for the picker to see it gone")
            undrained = bool(handle.drained)
            problem = _finish_host(ops, host, plan.model, handle, expect_ready=triton_ready)
            if problem is not None:
                raise OpsError(problem)
            if undrained and i < total:
                # Never take the next host out before this one is back in every picker.
                _wait(ops, ops.timeouts.picker_s, _routable(ops, host.name), "waiting until it is routable again")
            elapsed = ops.clock() - start
            ops.progress(prefix + ("undrained, done" if undrained else "done") + f" ({elapsed:.1f} s)")
            results.append(HostResult(host.name, True, f"{plan.action}ed", elapsed))
            if plan.action == "unload":
                gone.add(host.name)
        except (OpsError, KeyboardInterrupt) as exc:
            message = str(exc) or "interrupted"
            had_drained = bool(handle.drained)
            try:
                problem = _finish_host(ops, host, plan.model, handle, expect_ready=triton_ready)
            except OpsError as again:
                problem = str(again)
            if problem is not None:
                message += f"; {problem}"
            elif had_drained:
                message += " (undrained)"
            ops.progress(prefix + f"FAILED: {message}")
            results.append(HostResult(host.name, False, message, ops.clock() - start))
            if isinstance(exc, KeyboardInterrupt):
                raise
            break
    return results


def _routable(ops: Ops, host: str) -> Callable[[], str | None]:
    def check() -> str | None:
        for picker in ops.pickers:
            try:
                view = picker.status().hosts.get(host)
            except OpsError as exc:
                return f"no answer from {picker.url} ({exc})"
            reason = _unroutable_reason(view)
            if reason is not None:
                return f"{reason} in {picker.url}"
        return None

    return check


def execute_load(ops: Ops, plan: LoadPlan, *, wait_picker: bool = True) -> list[HostResult]:
    """Load on every target at once; then wait until every picker sees the model READY there."""
    if not plan.targets:
        return []

    def one(target: Target) -> HostResult:
        host = target.host
        start = ops.clock()
        ops.progress(f"{host.name}: loading {plan.model}")
        try:
            ops.triton.load(host, plan.model, ops.timeouts.load_s)
            state = _triton_state(ops, host, plan.model)
            if state not in {READY, UNKNOWN}:
                raise OpsError(f"{host.name}: {plan.model} is {state} after loading")
        except OpsError as exc:
            ops.progress(f"{host.name}: FAILED: {exc}")
            return HostResult(host.name, False, str(exc), ops.clock() - start)
        ops.progress(f"{host.name}: {plan.model} READY in Triton ({ops.clock() - start:.1f} s)")
        return HostResult(host.name, True, "loaded", ops.clock() - start)

    with ThreadPoolExecutor(max_workers=min(8, len(plan.targets))) as pool:
        results = list(pool.map(one, plan.targets))
    if wait_picker and ops.pickers:
        for i, result in enumerate(results):
            if not result.ok:
                continue
            try:
                waited = _wait(
                    ops,
                    ops.timeouts.picker_s,
                    _picker_sees(ops, result.host, plan.model, ready=True),
                    f"{result.host}: waiting for the picker to see {plan.model} READY",
                )
            except OpsError as exc:
                ops.progress(f"{result.host}: {exc}")
                results[i] = HostResult(result.host, False, str(exc), result.seconds)
                continue
            ops.progress(f"{result.host}: READY in the picker ({waited:.1f} s)")
    return results


def format_results(results: Sequence[HostResult]) -> str:
    if not results:
        return ""
    ok = sum(r.ok for r in results)
    lines = [f"{ok} of {len(results)} host{'s' if len(results) != 1 else ''} done"]
    lines.extend(f"  {r.host}: {'ok' if r.ok else 'FAILED'}: {r.message} ({r.seconds:.1f} s)" for r in results)
    return "\n".join(lines) + "\n"


# --- the command line (``extproc models …``; arguments are defined in extproc/cli.py) ---------------------


def _pickers(args: Any, fleet: Fleet) -> list[PickerApi]:
    from extproc.ops.status import HttpPicker, default_picker_url

    urls = args.picker or [default_picker_url(fleet)]
    return [HttpPicker(url) for url in urls]


def _envoys(args: Any, fleet: Fleet) -> list[EnvoyApi]:
    from extproc.ops.status import HttpEnvoyAdmin, default_envoy_admin_url

    urls = args.envoy or [default_envoy_admin_url(fleet)]
    return [HttpEnvoyAdmin(url) for url in urls]


def _printer(out: TextIO, clock: Callable[[], float]) -> Callable[[str], None]:
    start = clock()
    lock = threading.Lock()

    def progress(message: str) -> None:
        with lock:
            out.write(f"[{clock() - start:6.1f}s] {message}\n")
            out.flush()

    return progress


def run_cli(args: Any, fleet: Fleet, out: TextIO | None = None) -> int:
    """``extproc models list|load|unload|place|reload``. Exit status: 0 done (or nothing to do), 1 a host
    failed or a goal was not reached, 2 the plan was refused (problems, without ``--force``)."""
    out = out or sys.stdout
    triton = GrpcTriton(read_admin_key(fleet))
    # Picks made just before the drain reach Envoy's rq_active within an admin poll or two.
    settle_s = max(1.0, 3 * fleet.picker.poll.envoy_admin_ms / 1000)
    timeouts = Timeouts(index_s=args.timeout, settle_s=settle_s)
    if getattr(args, "load_timeout", None) is not None:
        timeouts = replace(timeouts, load_s=args.load_timeout)
    if getattr(args, "drain_timeout", None) is not None:
        timeouts = replace(timeouts, drain_s=args.drain_timeout)
    try:
        ops = Ops(fleet, triton, _pickers(args, fleet), _envoys(args, fleet), timeouts, _printer(out, time.monotonic))
        return _run(args, ops, out)
    except OpsError as exc:
        out.flush()
        print(f"extproc models: {exc}", file=sys.stderr)
        return 2
    finally:
        triton.close()


def _run(args: Any, ops: Ops, out: TextIO) -> int:
    fleet = ops.fleet
    indexes = read_index(ops.triton, fleet.hosts, ops.timeouts.index_s)
    if args.models_command == "list":
        wanted = list(args.model or ())
        if args.json:
            out.write(json.dumps(models_json(fleet, indexes, wanted), indent=2) + "\n")
        else:
            out.write(format_models(fleet, indexes, wanted))
        return 1 if any(i.error for i in indexes.values()) else 0
    model: str = args.model
    tier = Tier(args.tier) if getattr(args, "tier", None) else None
    hosts = [h for part in (getattr(args, "hosts", None) or ()) for h in part.split(",") if h]
    drain = not getattr(args, "no_drain", False)
    need_pickers = args.models_command in {"unload", "reload"} and drain
    try:
        view = merged_view(picker_statuses(ops.pickers))
    except OpsError as exc:
        if need_pickers:
            raise OpsError(f"{exc}: cannot drain hosts without every picker (--no-drain to go on anyway)") from None
        out.write(f"note: {exc}\n")
        ops = replace(ops, pickers=())
        view = {}
    if args.models_command in {"load", "place"}:
        if args.models_command == "load":
            if not hosts and tier is None and not args.all:
                raise OpsError("say where: --hosts a,b, --tier TIER or --all (the model's allowed tiers)")
            plan = plan_load(fleet, model, indexes, view, hosts=hosts, tier=tier, count=args.count, force=args.force)
        else:
            plan = plan_place(fleet, model, indexes, view, count=args.count, tier=tier, force=args.force)
        out.write(format_load_plan(plan, args.models_command))
        refused = plan.problems and not (args.force and args.models_command == "load")
        if args.dry_run:
            out.write("dry run: nothing changed\n")
            return 2 if refused else 0
        if refused and args.models_command == "load":
            out.write("refused: nothing changed (--force to go ahead)\n")
            return 2
        results = execute_load(ops, plan, wait_picker=not args.no_wait)
        out.write(format_results(results))
        return 0 if all(r.ok for r in results) and not plan.short else 1
    if not hosts and tier is None and not args.all:
        raise OpsError("say where: --hosts a,b, --tier TIER or --all (every host that has it)")
    roll = plan_roll(args.models_command, fleet, model, indexes, view, hosts=hosts, tier=tier, drain=drain)
    out.write(format_roll_plan(roll, len(ops.pickers), ops.timeouts, drain))
    if args.dry_run:
        out.write("dry run: nothing changed\n")
        return 2 if roll.problems and not args.force else 0
    if roll.problems and not args.force:
        out.write("refused: nothing changed (--force to go ahead)\n")
        return 2
    results = execute_roll(ops, roll, drain=drain, force=args.force)
    out.write(format_results(results))
    return 0 if len(results) == len(roll.steps) and all(r.ok for r in results) else 1
