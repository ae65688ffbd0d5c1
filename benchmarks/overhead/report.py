"""The report: the phases' runs summarised (medians over rounds, paired differences), the targets judged,
the tables printed and the JSON made safe."""

from __future__ import annotations

import datetime as dt
import math
import os
import platform
import re
import statistics
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any, Final

from benchmarks.loadgen import percentile
from benchmarks.overhead.measure import (
    GATEWAY_STATS,
    added_latency,
    cpu_us_per_request,
    latency_summary,
    median,
    round_ratios,
)
from benchmarks.overhead.stack import (
    ALL_VARIANTS,
    EPP_VARIANT,
    MODEL,
    PROCESSOR_VARIANTS,
    REQUEST_BODY,
    Settings,
    find_envoy,
)
from extproc.build import compiled

# A fixed-rate run is "sustained" when it completed at least this fraction of the offered rate, without
# errors and without fail-open.
SUSTAINED_FRACTION: Final = 0.95
# Targets the benchmark reports against (from the issue).
TARGET_THROUGHPUT_RATIO: Final = 0.9
TARGET_RATE: Final = 500.0
TARGET_ADDED_P50_MS: Final = 0.3
TARGET_ADDED_P99_MS: Final = 1.5


def growth_per_request(series: Sequence[Mapping[str, Any]]) -> float:
    """Least-squares slope of RSS (bytes) over requests; NaN with fewer than two distinct points."""
    xs = [float(p["requests"]) for p in series]
    ys = [float(p["rss_bytes"]) for p in series]
    if len(set(xs)) < 2:
        return math.nan
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def _sum_cpu(runs: Sequence[Mapping[str, Any]], key: str) -> float:
    return float(sum(r["cpu_s"].get(key, 0.0) for r in runs))


def _cpu_summary(variant: str, runs: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    requests = sum(int(r["completed"]) for r in runs)
    processor = f"processor_{variant}"
    return {
        "processor": cpu_us_per_request(_sum_cpu(runs, processor), requests)
        if any(processor in r["cpu_s"] for r in runs)
        else None,
        "gateway": cpu_us_per_request(_sum_cpu(runs, f"gateway_{variant}"), requests),
        "upstream": cpu_us_per_request(_sum_cpu(runs, "upstream"), requests),
    }


def _gateway_totals(runs: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    keys = GATEWAY_STATS.keys()
    return {k: int(sum(r["gateway"].get(k, 0) for r in runs)) for k in keys}


def summarize_max(runs: Mapping[str, Sequence[Mapping[str, Any]]], settings: Settings) -> dict[str, Any]:
    variants: dict[str, Any] = {}
    for variant, rs in runs.items():
        rps = [float(r["rps"]) for r in rs]
        variants[variant] = {
            "rps": median(rps),
            "rps_rounds": rps,
            "rps_best": max(rps, default=math.nan),
            "latency_p50_ms": median([r["latency"]["p50_ms"] for r in rs]),
            "latency_p99_ms": median([r["latency"]["p99_ms"] for r in rs]),
            "errors": int(sum(r["error_count"] for r in rs)),
            "gateway": _gateway_totals(rs),
            "cpu_us_per_request": _cpu_summary(variant, rs),
            "other_load_cores": median([float(r.get("machine", {}).get("other_cores", math.nan)) for r in rs]),
            "upstream_share": rs[-1]["upstream_share"] if rs else {},
        }
    ratios: dict[str, Any] = {}
    for num, den in (("picker", "bare"), ("picker", "plain"), ("bare", "plain"), (EPP_VARIANT, "picker")):
        if num in variants and den in variants:
            per_round = round_ratios(variants[num]["rps_rounds"], variants[den]["rps_rounds"])
            ratios[f"{num}/{den}"] = {"median": median(per_round), "rounds": per_round}
    return {
        "generator": f"wrk -t1 -c{settings.connections} -d{settings.max_duration_s}s (closed loop)",
        "rounds": settings.rounds,
        "variants": variants,
        "ratios": ratios,
        "runs": {v: [_public(r) for r in rs] for v, rs in runs.items()},
    }


def _public(result: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if not k.startswith("_")}


def _sustained(summary: Mapping[str, Any], gateway: Mapping[str, int], rate: float) -> bool:
    return bool(
        summary["error_count"] == 0
        and gateway.get("ext_proc_fail_open", 0) == 0
        and summary["achieved_rps"] >= SUSTAINED_FRACTION * rate
    )


def paired_added(
    variant_runs: Sequence[Mapping[str, Any]], plain_runs: Sequence[Mapping[str, Any]], key: str
) -> tuple[float, list[float]]:
    """Median over rounds of (variant - plain) for latency percentile ``key``, pairing runs by round.

    A round's runs of all variants are back to back, so a burst of machine noise that hits one round hits
    one pair; the median over pairs drops it, where pooled percentiles would keep it.
    """
    plain_by_round = {int(r["round"]): float(r["latency"][key]) for r in plain_runs}
    diffs = [
        float(r["latency"][key]) - plain_by_round[int(r["round"])]
        for r in variant_runs
        if int(r["round"]) in plain_by_round
    ]
    return median(diffs), diffs


def summarize_rate(
    rate: float, runs: Mapping[str, Sequence[Mapping[str, Any]]], skipped: Mapping[str, str], settings: Settings
) -> dict[str, Any]:
    """Per variant: the median over rounds of each round's percentiles (the headline), the percentiles of all
    rounds pooled, errors, lag and CPU; added latency over plain as the median of per-round differences."""
    variants: dict[str, Any] = {}
    for variant, rs in runs.items():
        if variant in skipped or not rs:
            continue
        latencies = [x for r in rs for x in r["_latencies_s"]]
        lags = sorted(x for r in rs for x in r["_lags_s"])
        errors = int(sum(r["error_count"] for r in rs))
        gateway = _gateway_totals(rs)
        achieved = median([float(r["achieved_rps"]) for r in rs])
        pooled = {"error_count": errors, "achieved_rps": achieved}
        variants[variant] = {
            "requests": int(sum(r["requests"] for r in rs)),
            "errors": errors,
            "achieved_rps": achieved,
            "latency": {key: median([float(r["latency"][key]) for r in rs]) for key in _LATENCY_KEYS},
            "latency_pooled": latency_summary(latencies),
            "latency_rounds_ms": {key: [r["latency"][key] for r in rs] for key in ("p50_ms", "p99_ms")},
            "lag": {
                "p50_ms": percentile(lags, 50) * 1e3,
                "p99_ms": percentile(lags, 99) * 1e3,
                "max_ms": lags[-1] * 1e3 if lags else math.nan,
            },
            "generator_cpu_us_per_request": median([float(r["generator_cpu_us_per_request"]) for r in rs]),
            "gateway": gateway,
            "cpu_us_per_request": _cpu_summary(variant, rs),
            "other_load_cores": median([float(r.get("machine", {}).get("other_cores", math.nan)) for r in rs]),
            "upstream_share": rs[-1]["upstream_share"],
            "sustained": _sustained(pooled, gateway, rate),
        }
    added: dict[str, Any] = {}
    added_pooled: dict[str, Any] = {}
    if "plain" in variants:
        for variant in PROCESSOR_VARIANTS:
            if variant in variants:
                added[variant] = {}
                for key in _LATENCY_KEYS:
                    value, diffs = paired_added(runs[variant], runs["plain"], key)
                    added[variant][key] = value
                    if key in ("p50_ms", "p99_ms"):
                        added[variant][f"{key.removesuffix('_ms')}_rounds_ms"] = diffs
                added_pooled[variant] = added_latency(
                    variants[variant]["latency_pooled"], variants["plain"]["latency_pooled"]
                )
    return {
        "rate_rps": rate,
        "duration_s": settings.duration_s,
        "rounds": settings.rounds,
        "variants": variants,
        "not_reachable": dict(skipped),
        "added_over_plain_ms": added,
        "added_over_plain_pooled_ms": added_pooled,
        "runs": {v: [_public(r) for r in rs] for v, rs in runs.items()},
    }


_LATENCY_KEYS: Final = ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "mean_ms")


def evaluate_targets(report: Mapping[str, Any]) -> dict[str, Any]:
    """The issue's targets, each with the measured value and pass/fail (None when not measured)."""
    out: dict[str, Any] = {}
    ratio = report.get("max_throughput", {}).get("ratios", {}).get("picker/bare", {}).get("median")
    out["throughput_picker_over_bare"] = {
        "target": f">= {TARGET_THROUGHPUT_RATIO}",
        "value": ratio,
        "pass": None if ratio is None or not math.isfinite(ratio) else bool(ratio >= TARGET_THROUGHPUT_RATIO),
    }
    at = next((r for r in report.get("fixed_rate", []) if r["rate_rps"] == TARGET_RATE), None)
    added = at["added_over_plain_ms"].get("picker") if at else None
    for key, limit in (("p50_ms", TARGET_ADDED_P50_MS), ("p99_ms", TARGET_ADDED_P99_MS)):
        value = added[key] if added else None
        out[f"added_{key.removesuffix('_ms')}_at_{TARGET_RATE:g}_rps_ms"] = {
            "target": f"<= {limit}",
            "value": value,
            "pass": None if value is None else bool(value <= limit),
        }
    return out


# ------------------------------------------------------------------------------------------------ output


def _f(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def _verdict(target: Mapping[str, Any]) -> str:
    return {True: "PASS", False: "FAIL", None: "n/a"}[target["pass"]]


def format_report(report: Mapping[str, Any]) -> str:
    lines: list[str] = []
    env = report["environment"]
    lines.append(
        f"overhead benchmark: {env['cpus']} CPUs, Envoy {env['envoy_version']}, {report['settings']['hosts']}"
        f" upstream hosts, {report['settings']['rounds']} rounds per variant (alternating), load avg at start"
        f" {env['loadavg_start']}, at end {env.get('loadavg_end', '?')}"
    )
    mx = report["max_throughput"]
    lines.append("")
    if "skipped" in mx:
        lines.append(f"maximum sustained req/s: skipped ({mx['skipped']})")
    else:
        lines.append(f"maximum sustained req/s ({mx['generator']}, median of {mx['rounds']} rounds)")
        header = (
            f"{'variant':<8} {'req/s':>8} {'rounds':<22} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6}"
            f" {'fail-open':>9} {'other':>5} {'proc CPU µs/req':>15} {'envoy CPU µs/req':>16}"
        )
        lines += [header, "-" * len(header)]
        for variant, v in mx["variants"].items():
            rounds = " ".join(f"{x:.0f}" for x in v["rps_rounds"])
            lines.append(
                f"{variant:<8} {v['rps']:>8.0f} {rounds:<22} {v['latency_p50_ms']:>7.2f} {v['latency_p99_ms']:>7.2f}"
                f" {v['errors']:>6} {v['gateway']['ext_proc_fail_open']:>9} {_f(v['other_load_cores'], 2):>5}"
                f" {_f(v['cpu_us_per_request']['processor']):>15} {_f(v['cpu_us_per_request']['gateway']):>16}"
            )
        for name, ratio in mx["ratios"].items():
            rounds = " ".join(_f(x, 3) for x in ratio["rounds"])
            lines.append(f"ratio {name}: {_f(ratio['median'], 3)} (per round: {rounds})")
    lines.append("")
    lines.append(
        "latency at fixed rates (open loop, constant rate, from the intended send time; per round p50/p99, then the"
    )
    lines.append(
        "median over rounds; +p50/+p99 = median over rounds of (variant - plain) in the same round; pooled = all"
    )
    lines.append("rounds' requests together; other = CPU cores busy with work outside this benchmark)")
    header = (
        f"{'rate':>6} {'variant':<8} {'achieved':>8} {'p50 ms':>7} {'p99 ms':>7} {'+p50 ms':>8} {'+p99 ms':>8}"
        f" {'pooled p99':>10} {'errors':>6} {'fail-open':>9} {'lag p99':>7} {'other':>5} {'proc CPU µs/req':>15}"
        f" {'envoy CPU µs/req':>16}"
    )
    lines += [header, "-" * len(header)]
    for r in report["fixed_rate"]:
        for variant in ALL_VARIANTS:
            if variant in r["not_reachable"]:
                lines.append(f"{r['rate_rps']:>6.0f} {variant:<8} {r['not_reachable'][variant]}")
                continue
            v = r["variants"].get(variant)
            if v is None:
                continue
            add = r["added_over_plain_ms"].get(variant)
            flag = "" if v["sustained"] else "  NOT SUSTAINED"
            lines.append(
                f"{r['rate_rps']:>6.0f} {variant:<8} {v['achieved_rps']:>8.0f} {v['latency']['p50_ms']:>7.3f}"
                f" {v['latency']['p99_ms']:>7.3f}"
                f" {_f(add['p50_ms'] if add else None, 3):>8} {_f(add['p99_ms'] if add else None, 3):>8}"
                f" {v['latency_pooled']['p99_ms']:>10.3f}"
                f" {v['errors']:>6} {v['gateway']['ext_proc_fail_open']:>9} {v['lag']['p99_ms']:>7.3f}"
                f" {_f(v['other_load_cores'], 2):>5}"
                f" {_f(v['cpu_us_per_request']['processor']):>15} {_f(v['cpu_us_per_request']['gateway']):>16}{flag}"
            )
    lines.append("")
    lines.append("targets:")
    for name, t in report["targets"].items():
        lines.append(f"  {name}: {_f(t['value'], 3)} (target {t['target']}) {_verdict(t)}")
    return "\n".join(lines)


def format_soak(soak: Mapping[str, Any]) -> str:
    variant = soak.get("variant", "picker")
    lines = [f"soak: {soak['requests']} requests through the {variant} ({soak['generator']}), {variant} RSS:"]
    for p in soak["series"]:
        lines.append(f"  {p['requests']:>9} requests  {p['rss_bytes'] / 2**20:8.2f} MiB  at {p['elapsed_s']:7.1f} s")
    lines.append(
        f"RSS max/min (after the first requests): {soak['rss_max_over_min']:.3f}  "
        f"(including the idle start: {soak['rss_max_over_min_including_cold']:.3f}); "
        f"last/first: {soak['rss_last_over_first_warm']:.3f}; errors {soak['errors']}, fail-open {soak['fail_open']}, "
        f"{variant} CPU {_f(soak['processor_cpu_us_per_request'])} µs/request"
    )
    lines.append(
        f"RSS growth (least squares, after the first requests): {_f(soak['growth_bytes_per_request'])} bytes/request"
    )
    lines.append(f"target RSS flat within ±10%: {'PASS' if soak['rss_max_over_min'] <= 1.10 else 'FAIL'}")
    return "\n".join(lines)


def json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def _envoy_version() -> str:
    try:
        out = subprocess.run([find_envoy(), "--version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, RuntimeError, subprocess.TimeoutExpired):
        return "?"
    match = re.search(r"/(\d+\.\d+\.\d+)/", out.stdout)
    return match.group(1) if match else "?"


def environment() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "loadavg_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "python": platform.python_version(),
        "compiled": compiled(),
        "envoy_version": _envoy_version(),
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


NOTES: Final = [
    "The picker variant runs the real request path (Processor, Scheduler, PickerMetrics) over a Datastore of "
    "the upstream hosts whose telemetry is kept fresh by a small task; the telemetry collector's HTTP polling "
    "(off the request path, a few polls per second) is excluded.",
    "Fixed-rate latency is measured from each request's intended send time (no coordinated omission); 'lag' is "
    "the generator's own actual-minus-intended send time, included in every variant's latency alike.",
    "CPU per request is utime+stime from /proc/<pid>/stat (all threads) over each phase divided by the requests "
    "completed in it; at low rates it includes the process's idle wake-ups.",
    "All processes share the machine (load generator, four Envoys, two processors; with --epp five and three): "
    "ratios from the same run are meaningful, absolute numbers depend on the machine.",
    "The epp variant (--epp) is the same picker in the Endpoint Picker Protocol, reached in plaintext over a Unix "
    "socket as the others are, behind a gateway-shaped Envoy (benchmarks/gateway.py): both bodies "
    "FULL_DUPLEX_STREAMED through the picker, the response phases sent to it, override_host routing. Its gateway "
    "is not the rendered one, so its gateway CPU and added latency include that Envoy's different work.",
]


def settings_json(s: Settings) -> dict[str, Any]:
    return {
        "rates": list(s.rates),
        "duration_s": s.duration_s,
        "max_duration_s": s.max_duration_s,
        "rounds": s.rounds,
        "connections": s.connections,
        "hosts": s.hosts,
        "warmup_s": s.warmup_s,
        "wrk": s.wrk,
        "soak": s.soak,
        "soak_rate": s.soak_rate if s.soak and s.wrk is None else None,
        "soak_variant": s.soak_variant if s.soak else None,
        "bare_answer": s.bare_answer,
        "check_rest_bodies": s.check_rest_bodies,
        "epp": s.epp,
        "model": MODEL,
        "request_bytes": len(REQUEST_BODY),
    }
