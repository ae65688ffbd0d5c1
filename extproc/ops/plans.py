"""Planning ``extproc models`` operations: pure functions from the fleet file, the hosts' repository
indexes and the pickers' merged view to a plan (:class:`LoadPlan`, :class:`RollPlan`) that says which hosts
to act on, in which order, and what would go wrong.

A plan refuses (unless forced) to drain a host that is the only routable home of one of its models, since
that model's requests would fail meanwhile.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from extproc.config import Fleet, HostSpec, Tier
from extproc.ops import OpsError
from extproc.ops.status import PickerApi, PickerHost, PickerStatus
from extproc.ops.triton_api import ABSENT, LOADING, READY, UNAVAILABLE, HostIndex

__all__ = [
    "HostStep",
    "LoadPlan",
    "RollPlan",
    "Skip",
    "Target",
    "allowed_tiers",
    "merged_view",
    "others_serving",
    "picker_statuses",
    "plan_load",
    "plan_place",
    "plan_roll",
    "rank",
    "tiers_text",
    "unroutable_reason",
]

# --- the fleet file and the pickers' view ---------------------------------------------------------------


def allowed_tiers(fleet: Fleet, model: str) -> tuple[Tier, ...] | None:
    """The model's tiers from the fleet file (default first), or None: not listed, any tier serves it."""
    spec = fleet.model(model)
    return None if spec is None else spec.tiers


def tiers_text(tiers: tuple[Tier, ...] | None) -> str:
    return "any" if tiers is None else ",".join(t.value for t in tiers)


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
                known=host.known & other.known,
                batching=host.batching,
                exec_ms=host.exec_ms,
            )
    return out


def unroutable_reason(host: PickerHost | None) -> str | None:
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
            skipped.append(Skip(host.name, f"tier {host.tier.value} is not allowed for {model} ({tiers_text(tiers)})"))
            continue
        if need_routable and view:
            reason = unroutable_reason(view.get(host.name))
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
        return [f"{model} may only run on tiers {tiers_text(tiers)} (fleet file), not {tier.value}"]
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
        where = f"tier {tier.value}" if tier is not None else f"tiers {tiers_text(tiers)}"
        possible = len(present) + len(plan.targets)
        plan = replace(plan, problems=(*plan.problems, f"only {possible} of {count} hosts possible in {where}"))
    return plan


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


def others_serving(
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
                others = others_serving(fleet, other_model, host, view, gone if other_model == model else set())
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
