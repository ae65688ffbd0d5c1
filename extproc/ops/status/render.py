"""What ``extproc status`` prints of a snapshot: the text (a summary line per tier and a table of hosts, per
picker) and the JSON (``--json``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from extproc.ops import STATE_FLAGS
from extproc.ops.status.clients import OVERLOADED_S, EnvoyHost, PickerHost, PickerStatus
from extproc.ops.status.rows import DEFAULT_VIEW, HostRow, View, host_rows, oldest_age_s, select, summaries
from extproc.ops.status.snapshot import Snapshot
from extproc.ops.status.text import fit_lines, fit_list, format_table

__all__ = ["render", "snapshot_json"]


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _age(host: PickerHost) -> str:
    age = oldest_age_s(host)
    return "never" if age is None else f"{age:.1f}"


def _summary_lines(sums: Mapping[str, Mapping[str, Any]]) -> list[str]:
    headers = ["TIER", "HOSTS", "OK", *(f.upper() for f in STATE_FLAGS), "OTHER", "IN-FLIGHT", "ENVOY", "PENDING"]
    headers += ["QUEUE max", "GPU MEM", "MODELS"]
    rows = []
    for tier, s in sums.items():
        in_flight = float(s["in_flight"])
        rows.append(
            [
                tier,
                *(str(s[k]) for k in ("hosts", "ok", *STATE_FLAGS, "other")),
                _num(in_flight, 0 if in_flight.is_integer() else 2),
                "-" if s["envoy_active"] is None else str(s["envoy_active"]),
                str(s["pending"]),
                _num(s["queue_ms_max"]),
                "-" if s["gpu_memory_percent"] is None else f"{s['gpu_memory_percent']:.0f}%",
                str(s["models_ready"]),
            ]
        )
    return format_table(headers, rows, frozenset(range(1, len(headers))))


_HOST_HEADERS: Final = ("HOST", "TIER", "STATE", "AGE s", "IN-FL", "ENVOY", "PEND", "SVC ms", "QUEUE ms", "GPU")
_MODELS_HEADER: Final = "MODELS READY"


def _host_lines(rows: Sequence[HostRow], width: int) -> list[str]:
    cells: list[list[str]] = []
    for row in rows:
        host = row.host
        gpu = host.gpu_memory_percent if host is not None else None
        cells.append(
            [
                row.name,
                row.tier,
                row.state,
                _age(host) if host is not None else "-",
                _num(host.in_flight, 0 if host.in_flight.is_integer() else 2) if host is not None else "-",
                str(row.envoy.active) if row.envoy is not None else "-",
                str(host.pending) if host is not None else "-",
                _num(host.service_ms) if host is not None else "-",
                _num(host.queue_ms) if host is not None else "-",
                f"{gpu:.0f}%" if gpu is not None else "-",
            ]
        )
    # The models column takes what the others leave of the width, at least its header's width.
    used = sum(max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(_HOST_HEADERS))
    room = max(len(_MODELS_HEADER), width - used - 2 * len(_HOST_HEADERS))
    for row, line in zip(rows, cells, strict=True):
        line.append(_models(row.host, room))
    return format_table([*_HOST_HEADERS, _MODELS_HEADER], cells, frozenset({3, 4, 5, 6, 7, 8, 9}))


def _models(host: PickerHost | None, width: int) -> str:
    if host is None:
        return "-"
    parts = [m if v == ("1",) else f"{m}:{','.join(v)}" for m, v in sorted(host.ready.items())]
    return fit_list(parts, width) or "(none)"


def render(snapshot: Snapshot, view: View = DEFAULT_VIEW) -> str:
    """The ``extproc status`` text: per picker, a summary line per tier and the hosts ``view`` selects; a
    line per unreachable picker or Envoy. No line is wider than ``view.width``."""
    lines: list[str] = [f"extproc status  {snapshot.taken_at.astimezone():%Y-%m-%d %H:%M:%S}"]
    for url, envoy in snapshot.envoys:
        lines.append(f"envoy admin {url}: " + (envoy if isinstance(envoy, str) else "ok"))
    pickers = snapshot.pickers or (("(no picker)", "no picker given"),)
    for url, status in pickers:
        lines.append("")
        rows = host_rows(snapshot, status)
        chosen = select(rows, view)
        head = f"picker {url}: " + (
            f"UNREACHABLE: {status}"
            if isinstance(status, str)
            else f"{'ready' if status.ready else 'NOT READY'}, {len(status.hosts)} hosts"
        )
        if view.filtered:
            head += f"; {len(chosen)} of {len(rows)} match {view.describe()}"
        lines.append(head)
        if not isinstance(status, str):
            lines.extend(_overload_lines(status, snapshot.taken_at.timestamp()))
        lines.extend(_summary_lines(summaries(chosen)))
        shown = chosen if view.top is None else chosen[: view.top]
        if shown:
            lines.append("")
            lines.extend(_host_lines(shown, view.width))
        if len(shown) < len(chosen):
            lines.append(f"... {len(chosen) - len(shown)} more hosts (--top N, --sort KEY, --tier/--state/--model)")
    return "\n".join(fit_lines(lines, view.width)) + "\n"


def _overload_lines(status: PickerStatus, now: float) -> list[str]:
    """A line naming the models that refused requests for load lately, with their counts since start."""
    overloaded = status.overloaded(now)
    if not overloaded:
        return []
    parts = []
    for model in overloaded:
        load = status.overload[model]
        parts.append(f"{model} (refused {load.refused:,.0f} of {load.refused + load.admitted:,.0f} since start)")
    return [f"overloaded (refusing in the last {OVERLOADED_S:.0f} s): " + ", ".join(parts)]


def snapshot_json(snapshot: Snapshot, view: View = DEFAULT_VIEW) -> dict[str, Any]:
    """``--json``: per picker, the summary per tier and the hosts ``view`` selects (in its order)."""

    def picker(status: PickerStatus | str) -> dict[str, Any]:
        if isinstance(status, str):
            return {"error": status}
        chosen = select(host_rows(snapshot, status), view)
        shown = chosen if view.top is None else chosen[: view.top]
        now = snapshot.taken_at.timestamp()
        return {
            "ready": status.ready,
            "overloaded": status.overloaded(now),
            "admissions": {
                m: {"admitted": load.admitted, "refused": load.refused, "refused_at": load.refused_at}
                for m, load in status.overload.items()
            },
            "summary": summaries(chosen),
            "hosts": {
                row.name: {
                    "tier": h.tier,
                    "state": row.state,
                    "fresh": h.fresh,
                    "routable": h.routable,
                    "draining": h.draining,
                    "ejected": h.ejected,
                    "unhealthy": h.unhealthy,
                    "in_flight": h.in_flight,
                    "pending": h.pending,
                    "service_ms": h.service_ms,
                    "queue_ms": h.queue_ms,
                    "gpu_memory_used": h.gpu_memory_used,
                    "gpu_memory_total": h.gpu_memory_total,
                    "ready": {m: list(v) for m, v in h.ready.items()},
                    "age_s": dict(h.age_s),
                }
                for row in shown
                if (h := row.host) is not None
            },
        }

    def envoy(view: Mapping[str, EnvoyHost] | str) -> dict[str, Any]:
        if isinstance(view, str):
            return {"error": view}
        return {
            "hosts": {
                n: {"active": e.active, "ejected": e.ejected, "unhealthy": e.unhealthy, "listed": e.listed}
                for n, e in view.items()
            }
        }

    return {
        "taken_at": snapshot.taken_at.isoformat(),
        "pickers": {url: picker(s) for url, s in snapshot.pickers},
        "envoys": {url: envoy(v) for url, v in snapshot.envoys},
    }
