"""A snapshot as rows, one per host and picker, and what ``extproc status`` shows of them: a host's state,
the view's filters and order (:class:`View`), and the per-tier sums."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from extproc.ops import STATE_FLAGS
from extproc.ops.status.clients import EnvoyHost, PickerHost, PickerStatus
from extproc.ops.status.snapshot import Snapshot

__all__ = [
    "DEFAULT_VIEW",
    "DEFAULT_WIDTH",
    "HostRow",
    "View",
    "host_rows",
    "host_state",
    "oldest_age_s",
    "select",
    "summaries",
    "summarize",
]


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


def oldest_age_s(host: PickerHost) -> float | None:
    """The older of the host's metrics and index ages; None: one of them never arrived."""
    ages = [a for k, a in host.age_s.items() if k in {"metrics", "index"}]
    if not ages or any(a is None for a in ages):
        return None
    return max(a for a in ages if a is not None)


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


# The view without options: every host, in the fleet file's order, DEFAULT_WIDTH columns wide.
DEFAULT_VIEW: Final = View()


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
        age = oldest_age_s(host)
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
