"""Compare what the gateway (Envoy + the picker) costs a REST inference request at two revisions.

Given two worktrees of this repository (``--before`` and ``--after``), each with its own ``.venv`` built as
the Makefile builds it (``make install``: compiled with mypyc), this runs each one's
overhead benchmark alternately (before, after, before, after, ...), ``--pairs`` times, on this machine,
and writes one JSON file with every run's own results embedded, the machine's core count and load, the
commit ids and the exact commands. It prints a table: for the ``picker`` variant, the maximum req/s and the
p50/p99 latency added over plain Envoy at each fixed rate, before vs after, with the after/before ratios;
and the ``plain`` (and ``bare``) Envoy numbers next to them, so the reader can see the noise.

Two kinds of comparison are printed:

* absolute numbers: per revision, the median over its runs of each run's own summary (each run's summary
  is itself a median over its ``--rounds`` rounds);
* same-run ratios: picker/plain throughput inside each run (the benchmark alternates its variants inside
  a run, so machine noise hits both alike), compared between the two runs of a pair (which run back to
  back), then the median over pairs.

Before measuring, each revision gets a probe (:data:`PROBE`): its picker gateway is started with the
benchmark's own code, a few requests are posted, and Envoy's ext_proc counters say how many messages each
request exchanged with the picker (2 or more per request: the body is streamed to it) and which hosts the
picker named. The request each revision's benchmark sends (model, body) is read from its own module and
must be the same in both.

``--wait-for-pytest`` waits (polling every 30 s, up to 40 minutes) while a pytest run is active on the
machine, before the probes and before every run: the machine is shared and a test suite is a lot of noise.

Usage (from the repository root; the worktrees are e.g. ``git worktree add /tmp/bench-before ca49126``)::

    .venv/bin/python -m benchmarks.compare_revisions --before /tmp/bench-before --after /tmp/bench-after

A revision's benchmark is ``python -m benchmarks.overhead`` where its worktree has it, else (revisions from
before the benchmarks left the ``extproc`` package) ``extproc bench overhead``; the probe imports the module
from either place.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

if not __package__:  # run as a file (python benchmarks/compare_revisions.py): the repository is not on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.overhead import json_safe

REVISIONS: Final = ("before", "after")
DEFAULT_OUTPUT: Final = Path(__file__).resolve().parent / "results" / "hardening-overhead.json"
# Short settings: 3 pairs of runs of about 2 minutes each.
DEFAULT_PAIRS: Final = 3
DEFAULT_ROUNDS: Final = 3
DEFAULT_MAX_DURATION_S: Final = 4
DEFAULT_DURATION_S: Final = 3.0
DEFAULT_RATES: Final = (200.0, 500.0)
PYTEST_POLL_S: Final = 30.0
PYTEST_WAIT_MAX_S: Final = 40 * 60.0
RUN_TIMEOUT_S: Final = 900.0
# The budget the team set: the hardening may cost at most this fraction of req/s or of p99 added.
BUDGET: Final = 0.05
PROBE_REQUESTS: Final = 50

# Runs inside a worktree's venv (cwd = the worktree): starts plain + picker gateways with the benchmark's own
# code (start-up includes its routing check), posts PROBE_REQUESTS requests through the picker gateway and
# reports Envoy's ext_proc counters per request, the hosts the picker named, the request sent, and the
# picker gateway's processing mode on the route the request takes.
PROBE: Final = r"""
import json, re, sys, tempfile
from pathlib import Path
try:
    from benchmarks import overhead as o
except ImportError:  # a revision from before the benchmarks left the extproc package
    from extproc.bench import overhead as o
from extproc.build import compiled

n = int(sys.argv[1])
out = {
    "model": o.MODEL,
    "request_body": o.REQUEST_BODY.decode(),
    "request_head": o.request_bytes(0)[: -len(o.REQUEST_BODY)].decode().replace("127.0.0.1:0", "<host>"),
    "compiled": compiled(),
}
with tempfile.TemporaryDirectory(prefix="cmp-probe-") as tmp:
    bench = o.OverheadBench(o.Settings(), Path(tmp), ("plain", "picker"))
    try:
        bench.start()
        port, admin = bench.gateway_ports["picker"], bench.admin_ports["picker"]
        prefix = o.gateway_stat_prefix() + "ext_proc."
        c0 = o.envoy_counters(admin, "^" + prefix.replace(".", "[.]"))
        statuses, named = {}, {}
        for _ in range(n):
            status, headers = o.post(port)
            statuses[status] = statuses.get(status, 0) + 1
            for host in filter(None, headers.get(o.ECHO_HEADER, "").split(",")):
                named[host] = named.get(host, 0) + 1
        c1 = o.envoy_counters(admin, "^" + prefix.replace(".", "[.]"))
    finally:
        bench.stop()
    boot = o.variant_bootstrap(
        bench.base_bootstrap, "picker", listen_port=port, admin_port=admin, picker_listen="unix:/x"
    )


def path_matches(match, path):
    # Whether a route's path condition (not its header conditions) takes path.
    if "prefix" in match:
        return path.startswith(match["prefix"])
    if "path" in match:
        return path == match["path"]
    if "path_separated_prefix" in match:
        p = match["path_separated_prefix"]
        return path == p or path.startswith(p + "/")
    if "safe_regex" in match:
        return re.fullmatch(match["safe_regex"]["regex"], path) is not None
    return False


# Every route's request body mode towards the picker: its ext_proc override, else the filter's default.
routes = []
# http_managers was _managers before the benchmarks left the extproc package
managers = getattr(o, "http_managers", None) or o._managers
for manager in managers(boot):
    default = "NONE"
    for f in manager["http_filters"]:
        if f["name"] == "envoy.filters.http.ext_proc":
            default = f["typed_config"].get("processing_mode", {}).get("request_body_mode", "NONE")
    for vhost in manager["route_config"]["virtual_hosts"]:
        for route in vhost["routes"]:
            per = (route.get("typed_per_filter_config") or {}).get("envoy.filters.http.ext_proc") or {}
            mode = (per.get("overrides") or {}).get("processing_mode", {}).get("request_body_mode")
            body = "disabled" if per.get("disabled") else mode or f"{default} (filter default)"
            routes.append(
                {
                    "name": route.get("name"),
                    "match": route["match"],
                    "request_body_mode": body,
                    "path_matches_request": path_matches(route["match"], "/v2/models/" + o.MODEL + "/infer"),
                }
            )
delta = {k.removeprefix(prefix): c1.get(k, 0) - c0.get(k, 0) for k in sorted(set(c0) | set(c1))}
out.update(
    requests=n,
    statuses={str(k): v for k, v in statuses.items()},
    hosts_named=named,
    ext_proc_counters=delta,
    ext_proc_msgs_sent_per_request=delta.get("stream_msgs_sent", 0) / n,
    ext_proc_msgs_received_per_request=delta.get("stream_msgs_received", 0) / n,
    route_body_modes=routes,
)
print("PROBE " + json.dumps(out))
"""


def log(message: str) -> None:
    print(f"[compare] {message}", file=sys.stderr, flush=True)


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def is_pytest(argv: Sequence[str]) -> bool:
    """Whether a command line runs pytest (``.../pytest ...``, ``python -m pytest``), not merely mentions it
    (a Triton started by a test has ``/tmp/pytest-of-...`` in its arguments)."""
    names = [Path(a).name for a in argv[:3]]
    return any(n in ("pytest", "py.test") for n in names) or any(
        a == "-m" and b == "pytest" for a, b in itertools.pairwise(argv)
    )


def pytest_running() -> list[str]:
    """Command lines of pytest runs on the machine."""
    done = subprocess.run(["pgrep", "-af", "pytest"], capture_output=True, text=True, check=False)
    found = []
    for line in done.stdout.splitlines():
        pid, _, command = line.partition(" ")
        if pid != str(os.getpid()) and is_pytest(command.split()):
            found.append(command)
    return found


def wait_for_pytest(enabled: bool) -> float:
    """Seconds waited for running pytest processes to finish (0 when none ran or waiting is off)."""
    if not enabled:
        return 0.0
    started = time.monotonic()
    while True:
        running = pytest_running()
        if not running:
            return time.monotonic() - started
        waited = time.monotonic() - started
        if waited > PYTEST_WAIT_MAX_S:
            log(f"pytest still running after {waited / 60:.0f} min; measuring anyway: {running[0][:120]}")
            return waited
        log(f"pytest is running ({len(running)} processes), waiting {PYTEST_POLL_S:.0f} s: {running[0][:100]}")
        time.sleep(PYTEST_POLL_S)


@dataclass(frozen=True)
class Revision:
    label: str
    worktree: Path
    # More options for this side's overhead benchmark (e.g. --no-rest-body-check: one build, two settings).
    bench_args: tuple[str, ...] = ()

    @property
    def extproc(self) -> Path:
        return self.worktree / ".venv" / "bin" / "extproc"

    @property
    def python(self) -> Path:
        return self.worktree / ".venv" / "bin" / "python"

    @property
    def has_benchmarks_package(self) -> bool:
        """Whether the revision runs its overhead benchmark as ``python -m benchmarks.overhead`` (else as
        ``extproc bench overhead``)."""
        return (self.worktree / "benchmarks" / "overhead" / "__main__.py").is_file()

    def git(self, *args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(self.worktree), *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    def describe(self) -> dict[str, Any]:
        return {
            "worktree": str(self.worktree),
            "bench_args": list(self.bench_args),
            "commit": self.git("rev-parse", "HEAD"),
            "subject": self.git("log", "-1", "--format=%s"),
            # Tracked changes only: build outputs (.venv, compiled modules) are ignored files.
            "uncommitted_changes": self.git("status", "--porcelain", "--untracked-files=no"),
        }


def probe(rev: Revision) -> dict[str, Any]:
    argv = [str(rev.python), "-c", PROBE, str(PROBE_REQUESTS)]
    done = subprocess.run(argv, cwd=rev.worktree, capture_output=True, text=True, timeout=180, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("PROBE "):
            result: dict[str, Any] = json.loads(line.removeprefix("PROBE "))
            return result
    raise RuntimeError(f"the {rev.label} probe failed ({done.returncode}):\n{done.stderr[-3000:]}")


def bench_command(rev: Revision, args: argparse.Namespace, output: Path) -> list[str]:
    if rev.has_benchmarks_package:
        program = [str(rev.python), "-m", "benchmarks.overhead"]
    else:
        program = [str(rev.extproc), "bench", "overhead"]
    return [
        *program,
        "--rounds",
        str(args.rounds),
        "--max-duration",
        str(args.max_duration),
        "--duration",
        f"{args.duration:g}",
        "--rates",
        *(f"{r:g}" for r in args.rates),
        "--output",
        str(output),
        *rev.bench_args,
    ]


def run_one(rev: Revision, pair: int, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """One overhead benchmark run in ``rev``'s worktree; its progress lines are passed on."""
    output = scratch / f"{rev.label}-{pair}.json"
    argv = bench_command(rev, args, output)
    waited = wait_for_pytest(args.wait_for_pytest)
    record: dict[str, Any] = {
        "revision": rev.label,
        "pair": pair,
        "command": shlex.join(argv),
        "cwd": str(rev.worktree),
        "waited_for_pytest_s": round(waited, 1),
        "loadavg_before": loadavg(),
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    log(f"pair {pair}/{args.pairs}: {rev.label} run starts (load {record['loadavg_before']})")
    started = time.monotonic()
    process = subprocess.Popen(
        argv, cwd=rev.worktree, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    assert process.stdout is not None
    tail: list[str] = []
    for line in process.stdout:
        line = line.rstrip("\n")
        tail = [*tail[-80:], line]
        if line.startswith("[bench overhead]"):
            log(f"  {rev.label} {pair}: {line.removeprefix('[bench overhead] ')}")
    rc = process.wait(timeout=RUN_TIMEOUT_S)
    record["wall_s"] = round(time.monotonic() - started, 1)
    record["rc"] = rc
    record["loadavg_after"] = loadavg()
    if rc != 0 or not output.is_file():
        record["error"] = "\n".join(tail[-30:])
        log(f"pair {pair}: {rev.label} run FAILED (rc {rc})")
        return record
    record["report"] = json.loads(output.read_text(encoding="utf-8"))
    s = run_summary(record["report"])
    rates = ", ".join(
        f"{rate}: +p50 {_f(v.get('picker_added_p50_ms'), 3)} +p99 {_f(v.get('picker_added_p99_ms'), 3)} ms"
        for rate, v in s["rates"].items()
    )
    log(
        f"pair {pair}: {rev.label} done in {record['wall_s']:.0f} s: picker {_f(s['picker_rps'], 0)} req/s, "
        f"plain {_f(s['plain_rps'], 0)} req/s, picker/plain {_f(s['picker_over_plain'], 3)}; {rates}"
    )
    return record


# ------------------------------------------------------------------------------------------- summaries


def _num(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else math.nan


def _median(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def _span(values: Sequence[float]) -> list[float]:
    finite = [v for v in values if math.isfinite(v)]
    return [min(finite), max(finite)] if finite else []


def _ratio(num: float, den: float) -> float:
    """``num / den``; NaN unless both are finite and ``den`` is positive (an added latency below plain's,
    which noise can give, has no meaningful ratio)."""
    return num / den if math.isfinite(num) and math.isfinite(den) and den > 0 else math.nan


def run_summary(report: Mapping[str, Any]) -> dict[str, Any]:
    """The numbers compared, from one run's own JSON."""
    mx = report.get("max_throughput", {})
    variants = mx.get("variants", {})
    out: dict[str, Any] = {f"{v}_rps": _num(variants.get(v, {}).get("rps")) for v in ("plain", "bare", "picker")}
    out["picker_over_plain"] = _num(mx.get("ratios", {}).get("picker/plain", {}).get("median"))
    out["picker_cpu_us_per_request"] = _num(variants.get("picker", {}).get("cpu_us_per_request", {}).get("processor"))
    out["picker_gateway_cpu_us_per_request"] = _num(
        variants.get("picker", {}).get("cpu_us_per_request", {}).get("gateway")
    )
    out["plain_gateway_cpu_us_per_request"] = _num(
        variants.get("plain", {}).get("cpu_us_per_request", {}).get("gateway")
    )
    out["other_load_cores"] = _median(
        [_num(v.get("other_load_cores")) for v in variants.values() if isinstance(v, Mapping)]
    )
    out["errors"] = sum(int(v.get("errors", 0)) for v in variants.values() if isinstance(v, Mapping))
    out["fail_open"] = sum(
        int(v.get("gateway", {}).get("ext_proc_fail_open", 0)) for v in variants.values() if isinstance(v, Mapping)
    )
    rates: dict[str, Any] = {}
    for entry in report.get("fixed_rate", []):
        rv = entry.get("variants", {})
        added = entry.get("added_over_plain_ms", {}).get("picker", {})
        row: dict[str, Any] = {
            "picker_added_p50_ms": _num(added.get("p50_ms")),
            "picker_added_p99_ms": _num(added.get("p99_ms")),
            "not_reachable": sorted(entry.get("not_reachable", {})),
            "not_sustained": sorted(v for v, d in rv.items() if not d.get("sustained", True)),
        }
        for variant in ("plain", "bare", "picker"):
            latency = rv.get(variant, {}).get("latency", {})
            row[f"{variant}_p50_ms"] = _num(latency.get("p50_ms"))
            row[f"{variant}_p99_ms"] = _num(latency.get("p99_ms"))
        row["errors"] = sum(int(d.get("errors", 0)) for d in rv.values())
        row["fail_open"] = sum(int(d.get("gateway", {}).get("ext_proc_fail_open", 0)) for d in rv.values())
        rates[f"{float(entry['rate_rps']):g}"] = row
    out["rates"] = rates
    return out


def _scalar_keys(summary: Mapping[str, Any]) -> list[str]:
    return [k for k, v in summary.items() if isinstance(v, float)]


def compare(runs: Sequence[Mapping[str, Any]], rates: Sequence[float], pairs: int) -> dict[str, Any]:
    """Per revision the median (and span) over runs of each run's numbers; after/before ratios of the
    medians; and per pair the after/before ratio of same-run ratios, with their median over pairs."""
    ok = [r for r in runs if "report" in r]
    per_run = {label: [run_summary(r["report"]) for r in ok if r["revision"] == label] for label in REVISIONS}
    revisions: dict[str, Any] = {}
    for label, summaries in per_run.items():
        agg: dict[str, Any] = {"runs": len(summaries)}
        keys = _scalar_keys(summaries[0]) if summaries else []
        for key in keys:
            values = [float(s[key]) for s in summaries]
            agg[key] = {"median": _median(values), "span": _span(values), "runs": values}
        agg["rates"] = {}
        for rate in rates:
            name = f"{rate:g}"
            rows = [s["rates"][name] for s in summaries if name in s["rates"]]
            agg["rates"][name] = {
                key: {
                    "median": _median([float(r[key]) for r in rows]),
                    "span": _span([float(r[key]) for r in rows]),
                    "runs": [r[key] for r in rows],
                }
                for key in (rows[0] if rows else {})
                if isinstance(rows[0][key], float)
            }
            agg["rates"][name]["not_reachable"] = sorted({v for r in rows for v in r["not_reachable"]})
            agg["rates"][name]["not_sustained"] = sorted({v for r in rows for v in r["not_sustained"]})
        revisions[label] = agg

    def med(label: str, key: str, rate: str | None = None) -> float:
        src = revisions.get(label, {})
        if rate is not None:
            src = src.get("rates", {}).get(rate, {})
        return float(src.get(key, {}).get("median", math.nan))

    ratios: dict[str, Any] = {}
    if per_run["before"]:
        for key in _scalar_keys(per_run["before"][0]):
            ratios[key] = _ratio(med("after", key), med("before", key))
        for rate in rates:
            name = f"{rate:g}"
            for key in (
                "picker_added_p50_ms",
                "picker_added_p99_ms",
                "picker_p50_ms",
                "picker_p99_ms",
                "plain_p50_ms",
                "plain_p99_ms",
            ):
                ratios[f"{key}@{name}"] = _ratio(med("after", key, name), med("before", key, name))
    # Same-pair comparison: the two runs of a pair ran back to back.
    by_pair: dict[int, dict[str, dict[str, Any]]] = {}
    for r in ok:
        by_pair.setdefault(int(r["pair"]), {})[str(r["revision"])] = run_summary(r["report"])
    paired: dict[str, list[float]] = {"picker_over_plain": [], "picker_rps": [], "picker_cpu_us_per_request": []}
    for rate in rates:
        paired[f"picker_added_p99_ms@{rate:g}"] = []
        paired[f"picker_added_p50_ms@{rate:g}"] = []
    for pair in range(1, pairs + 1):
        both = by_pair.get(pair, {})
        if set(both) != set(REVISIONS):
            continue
        for key in ("picker_over_plain", "picker_rps", "picker_cpu_us_per_request"):
            paired[key].append(_ratio(both["after"][key], both["before"][key]))
        for rate in rates:
            name = f"{rate:g}"
            for key in ("picker_added_p50_ms", "picker_added_p99_ms"):
                a = both["after"]["rates"].get(name, {}).get(key, math.nan)
                b = both["before"]["rates"].get(name, {}).get(key, math.nan)
                paired[f"{key}@{name}"].append(_ratio(a, b))
    return {
        "revisions": revisions,
        "after_over_before": ratios,
        "paired_after_over_before": {k: {"median": _median(v), "pairs": v} for k, v in paired.items()},
    }


def verdicts(comparison: Mapping[str, Any], rates: Sequence[float]) -> dict[str, Any]:
    """The budget check: req/s may fall, and p99 added may grow, by at most BUDGET (after/before)."""
    r = comparison["after_over_before"]
    paired = comparison["paired_after_over_before"]
    out: dict[str, Any] = {}
    for name, value, lower in (
        ("picker max req/s (medians)", r.get("picker_rps", math.nan), True),
        ("picker/plain max req/s (same-run, paired)", paired["picker_over_plain"]["median"], True),
        *(
            (f"picker p99 added at {rate:g} req/s (medians)", r.get(f"picker_added_p99_ms@{rate:g}", math.nan), False)
            for rate in rates
        ),
    ):
        limit = 1 - BUDGET if lower else 1 + BUDGET
        ok = (value >= limit) if lower else (value <= limit)
        out[name] = {
            "after_over_before": value,
            "limit": f"{'>=' if lower else '<='} {limit:.2f}",
            "within": None if not math.isfinite(value) else bool(ok),
        }
    return out


# ---------------------------------------------------------------------------------------------- output


def _f(value: Any, digits: int = 2) -> str:
    if not isinstance(value, int | float) or not math.isfinite(value):
        return "-"
    return f"{value:.{digits}f}"


def _cell(agg: Mapping[str, Any], key: str, digits: int) -> str:
    entry = agg.get(key, {})
    span = entry.get("span", [])
    spread = f" [{_f(span[0], digits)}-{_f(span[1], digits)}]" if len(span) == 2 else ""
    return f"{_f(entry.get('median'), digits)}{spread}"


def format_table(result: Mapping[str, Any]) -> str:
    cmp = result["comparison"]
    revs = cmp["revisions"]
    ratio = cmp["after_over_before"]
    paired = cmp["paired_after_over_before"]
    rates = result["settings"]["rates"]
    b, a = revs.get("before", {}), revs.get("after", {})
    lines = [
        f"gateway cost of a REST inference request, before {result['revisions']['before']['commit'][:7]} vs after "
        f"{result['revisions']['after']['commit'][:7]}: {b.get('runs', 0)} + {a.get('runs', 0)} runs alternated, "
        f"{result['machine']['cpus']} CPUs, load at start {result['machine']['loadavg_start']}",
        "(median over runs [min-max of the runs]; each run's number is itself its median over "
        f"{result['settings']['rounds']} rounds)",
        "",
    ]
    w = 26
    header = f"{'':<44} {'before':>{w}} {'after':>{w}} {'after/before':>12}"
    lines += [header, "-" * len(header)]

    def row(name: str, key: str, digits: int, rate: str | None = None) -> None:
        src_b = b.get("rates", {}).get(rate, {}) if rate else b
        src_a = a.get("rates", {}).get(rate, {}) if rate else a
        rkey = f"{key}@{rate}" if rate else key
        lines.append(
            f"{name:<44} {_cell(src_b, key, digits):>{w}} {_cell(src_a, key, digits):>{w}} {_f(ratio.get(rkey), 3):>12}"
        )

    lines.append("max throughput (wrk, closed loop)")
    row("  picker req/s", "picker_rps", 0)
    row("  plain req/s (Envoy alone: noise)", "plain_rps", 0)
    row("  bare req/s (floor processor)", "bare_rps", 0)
    row("  picker/plain (same run)", "picker_over_plain", 3)
    row("  picker processor CPU us/req", "picker_cpu_us_per_request", 0)
    row("  picker gateway Envoy CPU us/req", "picker_gateway_cpu_us_per_request", 0)
    row("  plain gateway Envoy CPU us/req", "plain_gateway_cpu_us_per_request", 0)
    row("  other load (cores, not the benchmark)", "other_load_cores", 2)
    for rate in rates:
        name = f"{rate:g}"
        lines.append(f"fixed rate {name} req/s (open loop; ms)")
        row("  picker p50 added over plain", "picker_added_p50_ms", 3, name)
        row("  picker p99 added over plain", "picker_added_p99_ms", 3, name)
        row("  picker p50", "picker_p50_ms", 3, name)
        row("  picker p99", "picker_p99_ms", 3, name)
        row("  plain p50 (noise)", "plain_p50_ms", 3, name)
        row("  plain p99 (noise)", "plain_p99_ms", 3, name)
        for label, agg in (("before", b), ("after", a)):
            info = agg.get("rates", {}).get(name, {})
            if info.get("not_reachable") or info.get("not_sustained"):
                lines.append(
                    f"  {label}: not reachable {info.get('not_reachable')}, not sustained {info.get('not_sustained')}"
                )
    lines += ["", "same-pair after/before (the two runs of a pair back to back; median over pairs [pairs])"]
    for key, entry in paired.items():
        pairs = " ".join(_f(x, 3) for x in entry["pairs"])
        lines.append(f"  {key:<42} {_f(entry['median'], 3):>8}   [{pairs}]")
    lines += ["", f"budget: the hardening may cost at most {BUDGET:.0%} (after/before)"]
    for name, v in result["verdicts"].items():
        verdict = {True: "within", False: "OVER", None: "n/a"}[v["within"]]
        lines.append(f"  {name:<50} {_f(v['after_over_before'], 3):>7} (limit {v['limit']}) {verdict}")
    lines += ["", "probe (picker gateway, benchmark's own start-up + routing check, then requests):"]
    for label in REVISIONS:
        p = result["probes"].get(label, {})
        # The routes whose path condition takes this benchmark's request (/v2/models/<model>/infer), in order.
        modes = [
            f"{m['name']}={m['request_body_mode']}" for m in p.get("route_body_modes", []) if m["path_matches_request"]
        ]
        lines.append(
            f"  {label}: ext_proc messages per request sent {_f(p.get('ext_proc_msgs_sent_per_request'), 2)}, "
            f"received {_f(p.get('ext_proc_msgs_received_per_request'), 2)}; statuses {p.get('statuses')}; "
            f"hosts named {len(p.get('hosts_named', {}))}; routes taking the request's path: {', '.join(modes)}"
        )
    same = result["request_same"]
    lines.append(f"  request sent identical in both (model, head, body): {same}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="worktree of the earlier revision (with .venv)")
    parser.add_argument("--after", type=Path, required=True, help="worktree of the later revision (with .venv)")
    parser.add_argument(
        "--pairs", type=int, default=DEFAULT_PAIRS, help=f"before/after pairs (default {DEFAULT_PAIRS})"
    )
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="bench overhead --rounds")
    parser.add_argument(
        "--max-duration", type=int, default=DEFAULT_MAX_DURATION_S, help="bench overhead --max-duration"
    )
    parser.add_argument("--duration", type=float, default=DEFAULT_DURATION_S, help="bench overhead --duration")
    parser.add_argument("--rates", type=float, nargs="+", default=list(DEFAULT_RATES), help="bench overhead --rates")
    parser.add_argument("--output", "-o", type=Path, default=DEFAULT_OUTPUT, help="combined JSON results")
    for side in ("before", "after"):
        parser.add_argument(
            f"--{side}-args",
            default="",
            metavar="ARGS",
            help=f"more options for the {side} side's overhead benchmark, one string (e.g. '--no-rest-body-check')",
        )
    parser.add_argument(
        "--wait-for-pytest", action="store_true", help="wait while a pytest run is active (poll 30 s, up to 40 min)"
    )
    args = parser.parse_args(argv)
    if args.pairs < 1 or args.rounds < 1 or args.max_duration < 1 or args.duration <= 0:
        parser.error("--pairs, --rounds, --max-duration and --duration must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    revs = {
        label: Revision(label, path.resolve(), tuple(shlex.split(extra)))
        for label, path, extra in (
            ("before", args.before, args.before_args),
            ("after", args.after, args.after_args),
        )
    }
    for rev in revs.values():
        if not rev.extproc.is_file():
            print(f"{rev.extproc} is missing: run `make install` in {rev.worktree}", file=sys.stderr)
            return 2
    started = time.monotonic()
    result: dict[str, Any] = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "loadavg_start": loadavg()},
        "settings": {
            "pairs": args.pairs,
            "rounds": args.rounds,
            "max_duration_s": args.max_duration,
            "duration_s": args.duration,
            "rates": list(args.rates),
            "order": "before, after alternately, one pair after the other",
        },
        "revisions": {label: rev.describe() for label, rev in revs.items()},
    }
    for label, info in result["revisions"].items():
        log(f"{label}: {info['commit'][:10]} {info['subject'][:70]} ({revs[label].worktree})")
        if info["uncommitted_changes"]:
            log(f"  WARNING: {label} worktree has uncommitted changes:\n{info['uncommitted_changes']}")
    result["machine"]["waited_for_pytest_s"] = round(wait_for_pytest(args.wait_for_pytest), 1)
    result["machine"]["loadavg_before_measuring"] = loadavg()
    probes: dict[str, Any] = {}
    for label, rev in revs.items():
        log(f"probe: {label} picker gateway, {PROBE_REQUESTS} requests")
        probes[label] = probe(rev)
        p = probes[label]
        log(
            f"  {label}: compiled {p['compiled']}, statuses {p['statuses']}, ext_proc messages/request sent "
            f"{p['ext_proc_msgs_sent_per_request']:.2f} received {p['ext_proc_msgs_received_per_request']:.2f}, "
            f"hosts named {sorted(p['hosts_named'])}"
        )
    result["probes"] = probes
    keys = ("model", "request_body", "request_head")
    result["request_same"] = all(probes["before"][k] == probes["after"][k] for k in keys)
    if not result["request_same"]:
        log("WARNING: the two revisions' benchmarks send different requests")
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="compare-revisions-") as scratch:
        for pair in range(1, args.pairs + 1):
            for label in REVISIONS:
                runs.append(run_one(revs[label], pair, args, Path(scratch)))
    result["machine"]["loadavg_end"] = loadavg()
    result["wall_s"] = round(time.monotonic() - started, 1)
    result["runs"] = runs
    result["failed_runs"] = [f"{r['revision']} {r['pair']}" for r in runs if "report" not in r]
    result["comparison"] = compare(runs, args.rates, args.pairs)
    result["verdicts"] = verdicts(result["comparison"], args.rates)
    table = format_table(result)
    result["table"] = table.splitlines()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(json_safe(result), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    print(table)
    print(f"results: {args.output}")
    return 1 if result["failed_runs"] else 0


if __name__ == "__main__":
    sys.exit(main())
