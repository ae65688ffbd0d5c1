"""What ``extproc models`` prints: the model x host table (and its JSON), plans and results."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from extproc.config import Fleet
from extproc.ops.execute import HostResult, Timeouts
from extproc.ops.plans import LoadPlan, RollPlan, allowed_tiers, tiers_text
from extproc.ops.status import format_table
from extproc.ops.triton_api import ABSENT, NOT_LOADED, READY, UNKNOWN, HostIndex

__all__ = ["format_load_plan", "format_models", "format_results", "format_roll_plan", "model_names", "models_json"]


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
