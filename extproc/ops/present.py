"""What ``extproc models`` prints: the per-model summary and the model x host table (and their JSON), plans and
results."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from extproc.config import Fleet, Tier
from extproc.ops.execute import HostResult, Timeouts
from extproc.ops.plans import LoadPlan, RollPlan, allowed_tiers, tiers_text
from extproc.ops.status import DEFAULT_WIDTH, fit_lines, fit_list, format_table
from extproc.ops.triton_api import ABSENT, LOADING, NOT_LOADED, READY, UNAVAILABLE, UNKNOWN, UNLOADING, HostIndex

__all__ = [
    "ModelSummary",
    "format_load_plan",
    "format_model_summary",
    "format_models",
    "format_results",
    "format_roll_plan",
    "model_names",
    "model_summary_json",
    "models_json",
    "summarize_models",
]


def model_names(fleet: Fleet, indexes: Mapping[str, HostIndex]) -> list[str]:
    """Models of the fleet file first (in file order), then every other model any host lists, sorted."""
    listed = [m.name for m in fleet.models]
    others = sorted({name for index in indexes.values() for name in index.models()} - set(listed))
    return listed + others


@dataclass(frozen=True, slots=True)
class ModelSummary:
    """One model over the fleet's hosts: where it is READY (per tier), with which versions, what else."""

    model: str
    tiers: tuple[Tier, ...] | None  # allowed (None: any)
    ready: int
    # Of the hosts it may run on (its tiers), plus any other where it is READY anyway.
    of: int
    by_tier: dict[str, tuple[int, int]]  # tier → (READY on, hosts)
    versions: dict[str, int]  # READY version set ("1", "1,2") → hosts
    states: dict[str, int]  # LOADING, UNLOADING, UNAVAILABLE → hosts
    unavailable: dict[str, list[str]]  # a failed load's reason → hosts


def summarize_models(fleet: Fleet, indexes: Mapping[str, HostIndex], models: Sequence[str] = ()) -> list[ModelSummary]:
    """Each of ``models`` (default: every model of the fleet file or of some host) over the hosts that
    ``indexes`` has."""
    hosts = [indexes[h.name] for h in fleet.hosts if h.name in indexes]
    tiers = [t.value for t in fleet.tiers]
    out = []
    for model in list(models) or model_names(fleet, indexes):
        allowed = allowed_tiers(fleet, model)
        ready = [h for h in hosts if h.state(model) == READY]
        home = {h.name for h in hosts if allowed is None or h.host.tier in allowed} | {h.name for h in ready}
        versions = Counter(",".join(h.ready_versions(model)) for h in ready)
        states = Counter(s for h in hosts if (s := h.state(model)) in {LOADING, UNLOADING, UNAVAILABLE})
        unavailable: dict[str, list[str]] = {}
        for h in hosts:
            if (reason := h.reason(model)) and h.error is None:
                unavailable.setdefault(reason, []).append(h.name)
        out.append(
            ModelSummary(
                model=model,
                tiers=allowed,
                ready=len(ready),
                of=len(home),
                by_tier={
                    t: (sum(h.host.tier.value == t for h in ready), sum(h.host.tier.value == t for h in hosts))
                    for t in tiers
                },
                versions=dict(sorted(versions.items(), key=lambda vn: (-vn[1], vn[0]))),
                states=dict(sorted(states.items())),
                unavailable=unavailable,
            )
        )
    return out


def format_model_summary(
    fleet: Fleet, indexes: Mapping[str, HostIndex], models: Sequence[str] = (), width: int = DEFAULT_WIDTH
) -> str:
    """``extproc models list``: a line per model, READY on k of the N hosts of its tiers, per tier, its
    versions and other states; then the hosts that did not answer and the failed loads, grouped. The same
    size at 1,000 hosts as at 3: the model x host table is for a few hosts (``--hosts``)."""
    hosts = [indexes[h.name] for h in fleet.hosts if h.name in indexes]
    tiers = [t.value for t in fleet.tiers]
    per_tier = ", ".join(f"{t} {sum(h.host.tier.value == t for h in hosts)}" for t in tiers)
    down = [h for h in hosts if h.error is not None]
    lines = [f"{len(hosts)} hosts ({per_tier}), {len(hosts) - len(down)} answered"]
    summaries = summarize_models(fleet, indexes, models)
    rows = []
    for s in summaries:
        allowed = {t.value for t in s.tiers} if s.tiers is not None else set(tiers)
        cells = [f"{k}/{n}" if t in allowed or k else "-" for t, (k, n) in s.by_tier.items()]
        versions = (
            next(iter(s.versions), "-")
            if len(s.versions) <= 1
            else ", ".join(f"{v} ({n})" for v, n in s.versions.items())
        )
        states = ", ".join(f"{state} {n}" for state, n in s.states.items())
        rows.append([s.model, tiers_text(s.tiers), f"{s.ready}/{s.of}", *cells, versions, states])
    headers = ["MODEL", "TIERS", "READY", *tiers, "VERSIONS (hosts)", "NOT READY"]
    lines.extend(format_table(headers, rows, frozenset(range(2, 3 + len(tiers)))))
    lines.append("")
    lines.append("READY k/N: on k of the N hosts of the model's tiers; --hosts A,B for the model x host table")
    if down:
        names = fit_list([h.name for h in down], width - 40, ", ")
        lines.append(f"{len(down)} hosts did not answer: {names}")
        # One error as an example: they differ by host only; --json (or --hosts) has each.
        lines.append(f"  e.g. {down[0].error}")
    for s in summaries:
        for reason, on in s.unavailable.items():
            names = fit_list(on, 40, ", ")
            lines.append(f"{s.model} UNAVAILABLE on {len(on)} hosts ({names}): {reason}")
    return "\n".join(fit_lines(lines, width)) + "\n"


def model_summary_json(fleet: Fleet, indexes: Mapping[str, HostIndex], models: Sequence[str] = ()) -> dict[str, Any]:
    """``extproc models list --json``: the summary per model, and each host's tier and error."""
    hosts = [indexes[h.name] for h in fleet.hosts if h.name in indexes]
    return {
        "hosts": {h.name: {"tier": h.host.tier.value, "error": h.error} for h in hosts},
        "models": {
            s.model: {
                "tiers": None if s.tiers is None else [t.value for t in s.tiers],
                "ready": s.ready,
                "of": s.of,
                "by_tier": {t: {"ready": k, "hosts": n} for t, (k, n) in s.by_tier.items()},
                "versions": s.versions,
                "states": s.states,
                "unavailable": s.unavailable,
            }
            for s in summarize_models(fleet, indexes, models)
        },
    }


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
        rows.append([model, tiers_text(allowed_tiers(fleet, model)), *cells])
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


def format_results(results: Sequence[HostResult]) -> str:
    if not results:
        return ""
    ok = sum(r.ok for r in results)
    lines = [f"{ok} of {len(results)} host{'s' if len(results) != 1 else ''} done"]
    lines.extend(f"  {r.host}: {'ok' if r.ok else 'FAILED'}: {r.message} ({r.seconds:.1f} s)" for r in results)
    return "\n".join(lines) + "\n"
