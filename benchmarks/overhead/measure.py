"""Measurement: CPU time and memory from ``/proc``, Envoy's admin counters, and the statistics the report
is made of (percentiles, medians over rounds, per-round ratios)."""

from __future__ import annotations

import json
import math
import os
import statistics
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from benchmarks.loadgen import percentile

# A variant does not get a fixed rate above this fraction of its maximum sustained req/s.
REACHABLE_FRACTION: Final = 0.95


# ------------------------------------------------------------------------------------ /proc accounting


def parse_proc_stat(text: str) -> tuple[int, int]:
    """``(utime, stime)`` in clock ticks from the text of ``/proc/<pid>/stat``.

    The command name (field 2) is in parentheses and may itself contain spaces and parentheses, so fields
    are counted from the *last* ``)``: utime and stime are fields 14 and 15, i.e. the 12th and 13th after it.
    """
    end = text.rfind(")")
    if end < 0:
        raise ValueError("not a /proc/<pid>/stat line")
    fields = text[end + 1 :].split()
    return int(fields[11]), int(fields[12])


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) the process has used so far."""
    utime, stime = parse_proc_stat(Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace"))
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def parse_statm_rss(text: str, page_size: int) -> int:
    """Resident set size in bytes from the text of ``/proc/<pid>/statm`` (field 2, in pages)."""
    return int(text.split()[1]) * page_size


def rss_bytes(pid: int) -> int:
    return parse_statm_rss(Path(f"/proc/{pid}/statm").read_text(encoding="ascii"), os.sysconf("SC_PAGE_SIZE"))


def parse_machine_cpu(text: str) -> tuple[int, int]:
    """``(busy, total)`` clock ticks over all CPUs from the text of ``/proc/stat`` (its ``cpu`` line).

    Idle is ``idle + iowait``; total is the first eight fields (user .. steal; guest time is inside user).
    """
    for line in text.splitlines():
        if line.startswith("cpu "):
            values = [int(x) for x in line.split()[1:9]]
            total = sum(values)
            idle = values[3] + (values[4] if len(values) > 4 else 0)
            return total - idle, total
    raise ValueError("no cpu line in /proc/stat")


def machine_busy_seconds() -> float:
    busy, _ = parse_machine_cpu(Path("/proc/stat").read_text(encoding="ascii"))
    return busy / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """This process (the generator) and its waited-for children (wrk)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def cpu_us_per_request(cpu_s: float, requests: int) -> float:
    return cpu_s * 1e6 / requests if requests > 0 else math.nan


# ------------------------------------------------------------------------------------------- statistics


def latency_summary(samples_s: Sequence[float]) -> dict[str, float]:
    """Percentiles (ms) of latencies given in seconds."""
    ordered = sorted(samples_s)
    out = {f"{name}_ms": percentile(ordered, q) * 1e3 for name, q in (("p50", 50), ("p90", 90), ("p99", 99))}
    out["p999_ms"] = percentile(ordered, 99.9) * 1e3
    out["mean_ms"] = statistics.fmean(ordered) * 1e3 if ordered else math.nan
    out["max_ms"] = ordered[-1] * 1e3 if ordered else math.nan
    return out


def added_latency(variant: Mapping[str, float], plain: Mapping[str, float]) -> dict[str, float]:
    """Per percentile, the variant's latency minus plain Envoy's (ms)."""
    return {key: variant[key] - plain[key] for key in ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "mean_ms")}


def median(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def round_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """Per round, ``numerator / denominator`` (NaN where the denominator is not positive)."""
    return [n / d if d > 0 else math.nan for n, d in zip(numerator, denominator, strict=True)]


def rotated(items: Sequence[str], shift: int) -> list[str]:
    """``items`` rotated left by ``shift``: round r starts with a different variant each time."""
    if not items:
        return []
    k = shift % len(items)
    return [*items[k:], *items[:k]]


def reachable(rate: float, max_rps: float | None) -> bool:
    """Whether a fixed ``rate`` is worth offering to a variant whose maximum is ``max_rps`` (None: unknown)."""
    return max_rps is None or not math.isfinite(max_rps) or rate <= REACHABLE_FRACTION * max_rps


def constant_rate_offsets(rate: float, duration_s: float) -> list[float]:
    """Intended send times (s from the start) of a constant-rate schedule: ``i / rate`` for ``[0, duration)``."""
    n = math.floor(rate * duration_s + 1e-9)
    return [i / rate for i in range(n)]


# ---------------------------------------------------------------------------------- Envoy admin and HTTP


def http_get(url: str, timeout_s: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), b""
    except (urllib.error.URLError, OSError):
        return 0, b""


def parse_envoy_counters(stats_json: Mapping[str, Any]) -> dict[str, int]:
    """Counters and gauges (name → int) from Envoy admin ``/stats?format=json``; histograms are skipped."""
    out: dict[str, int] = {}
    for entry in stats_json.get("stats", []):
        if isinstance(entry, dict) and "name" in entry and isinstance(entry.get("value"), int | float):
            out[str(entry["name"])] = int(entry["value"])
    return out


def envoy_counters(admin_port: int, pattern: str) -> dict[str, int]:
    query = urllib.parse.urlencode({"format": "json", "filter": pattern})
    status, body = http_get(f"http://127.0.0.1:{admin_port}/stats?{query}")
    if status != 200:
        return {}
    return parse_envoy_counters(json.loads(body))


def counter_delta(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in sorted(set(before) | set(after))}


# Gateway counters watched per phase: requests, their outcome, and whether ext_proc failed open.
# (Names under ``http.<stat prefix>.``.)
GATEWAY_STATS: Final = {
    "rq_total": "downstream_rq_total",
    "rq_2xx": "downstream_rq_2xx",
    "rq_5xx": "downstream_rq_5xx",
    "ext_proc_streams": "ext_proc.streams_started",
    "ext_proc_failed": "ext_proc.streams_failed",
    "ext_proc_timeouts": "ext_proc.message_timeouts",
    "ext_proc_fail_open": "ext_proc.failure_mode_allowed",
}


def gateway_stat_prefix() -> str:
    from extproc.envoy_config import STAT_PREFIX

    return f"http.{STAT_PREFIX}."


def gateway_summary(delta: Mapping[str, int]) -> dict[str, int]:
    prefix = gateway_stat_prefix()
    return {key: delta.get(prefix + name, 0) for key, name in GATEWAY_STATS.items()}
