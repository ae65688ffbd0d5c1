"""What ``extproc placement explain`` prints: one line per (model, tier) (demand, capacity per copy,
utilization, footprint, current and desired copies, why), then the planned actions with their reasons, then
a summary of the hosts' memory; or the same as JSON. One line per (model, tier) and a summary of hosts keep
it readable at hundreds of hosts; the actions are few by construction (``max_concurrent_changes``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from extproc.config import PlacementSpec
from extproc.ops.status import format_table
from extproc.placement.plan import Action, HostInput, Plan

__all__ = ["explain_json", "format_explain"]


def _rate(value: float | None) -> str:
    return "?" if value is None else f"{value:.1f}/s"


def _bytes(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _action(a: Action) -> str:
    return f"  {a.kind:<6} {a.model} on {a.host}: {a.reason}"


def _hosts_line(hosts: Sequence[HostInput], settings: PlacementSpec) -> str:
    sources = {s: sum(1 for h in hosts if h.memory_source == s) for s in ("gpu", "declared", "none")}
    full = sum(1 for h in hosts if h.headroom is not None and h.headroom < settings.default_footprint_bytes)
    unroutable = sum(1 for h in hosts if not h.routable)
    return (
        f"hosts: {len(hosts)} ({unroutable} not routable); memory budget from GPU telemetry on {sources['gpu']}, "
        f"declared on {sources['declared']}, none on {sources['none']}; {full} without room for a default "
        f"footprint ({settings.default_footprint_bytes / 2**30:.1f} GiB)"
    )


def format_explain(
    result: Plan, hosts: Sequence[HostInput], settings: PlacementSpec, *, window_s: float, paused: str | None
) -> str:
    state = "enabled" if settings.enabled else "disabled (placement.enabled: false)"
    if paused is not None:
        state = f"paused ({paused})"
    lines = [
        f"placement {state}: target utilization {settings.target_utilization:g}, scale down below "
        f"{settings.scale_down_utilization:g} for {settings.scale_down_window_s:g} s, cool-down "
        f"{settings.cooldown_s:g} s (up {settings.up_cooldown_s:g} s), "
        f"at most {settings.max_concurrent_changes} changes a round; demand over {window_s:.1f} s",
    ]
    if not result.decisions:
        lines.append("no model is managed: list models under placement.models")
    rows = [
        [
            d.model,
            d.tier or "-",
            _rate(d.rate_rps),
            _rate(d.capacity_rps),
            d.capacity_source,
            "?" if d.utilization is None else f"{100 * d.utilization:.0f}%",
            f"{_bytes(d.footprint_bytes)} {d.footprint_source}",
            str(d.current),
            str(d.desired),
            d.reason
            + (f" [held: {d.held}]" if d.held else "")
            + (f" [unplaced: {d.unplaced}, the fleet needs more hosts]" if d.unplaced else ""),
        ]
        for d in result.decisions
    ]
    if rows:
        headers = ["MODEL", "TIER", "DEMAND", "CAP/COPY", "FROM", "UTIL", "FOOTPRINT", "COPIES", "DESIRED", "WHY"]
        lines += format_table(headers, rows, right=frozenset({2, 3, 5, 7, 8}))
    actions = result.actions
    lines.append(f"actions: {len(actions)}" + (f" ({len(result.deferred)} deferred)" if result.deferred else ""))
    lines += [_action(a) for a in actions]
    if result.deferred:
        lines.append("deferred to later rounds:")
        lines += [_action(a) for a in result.deferred]
    lines.append(_hosts_line(hosts, settings))
    return "\n".join(lines) + "\n"


def explain_json(
    result: Plan, hosts: Sequence[HostInput], settings: PlacementSpec, *, window_s: float, paused: str | None
) -> dict[str, Any]:
    def action(a: Action) -> dict[str, str]:
        return {"kind": a.kind, "model": a.model, "host": a.host, "reason": a.reason}

    return {
        "enabled": settings.enabled,
        "paused": paused,
        "window_s": round(window_s, 3),
        "scale_down_after_s": settings.scale_down_window_s,
        "models": [
            {
                "model": d.model,
                "tier": d.tier,
                "demand_rps": d.rate_rps,
                "capacity_per_copy_rps": d.capacity_rps,
                "capacity_source": d.capacity_source,
                "utilization": d.utilization,
                "current": d.current,
                "desired": d.desired,
                "reason": d.reason,
                "held": d.held,
                "unplaced": d.unplaced,
                "low_for_s": None if d.low_for_s is None else round(d.low_for_s, 3),
                "footprint_bytes": d.footprint_bytes,
                "footprint_source": d.footprint_source,
                "actions": [action(a) for a in d.actions],
            }
            for d in result.decisions
        ],
        "deferred": [action(a) for a in result.deferred],
        "hosts": [
            {
                "host": h.name,
                "tier": h.tier,
                "routable": h.routable,
                "memory_source": h.memory_source,
                "budget_bytes": h.budget_bytes,
                "used_bytes": h.used_bytes,
                "models": sorted(h.models),
            }
            for h in hosts
        ],
    }
