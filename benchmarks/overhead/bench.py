"""The run: :class:`OverheadBench` starts the upstream, the processors and one gateway per variant once, then
runs the phases (warm-up, maximum throughput, fixed rates, soak), measuring each run."""

from __future__ import annotations

import math
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml

from benchmarks import child_env
from benchmarks.overhead.load import (
    WRK_INSTALL_HINT,
    OpenLoop,
    OpenLoopRecords,
    post,
    request_bytes,
    run_wrk,
    summarize_open_loop,
    wrk_script,
)
from benchmarks.overhead.measure import (
    REACHABLE_FRACTION,
    constant_rate_offsets,
    counter_delta,
    cpu_seconds,
    cpu_us_per_request,
    envoy_counters,
    gateway_stat_prefix,
    gateway_summary,
    http_get,
    machine_busy_seconds,
    own_cpu_seconds,
    reachable,
    rotated,
    rss_bytes,
)
from benchmarks.overhead.report import growth_per_request, summarize_max, summarize_rate
from benchmarks.overhead.stack import (
    ECHO_DESTINATION_HEADER,
    ECHO_HEADER,
    EPP_VARIANT,
    PROCESSOR_VARIANTS,
    READY_LINE,
    START_TIMEOUT_S,
    VARIANTS,
    BenchError,
    Settings,
    bench_fleet,
    epp_bootstrap,
    find_envoy,
    progress,
    upstream_bootstrap,
    variant_bootstrap,
)
from benchmarks.ports import free_ports
from extproc.runtime.process import Child, Supervisor

SOAK_SAMPLE_EVERY: Final = 50_000


@dataclass
class Processes:
    """The pids whose CPU time is measured, by role."""

    upstream: int
    gateways: dict[str, int]
    processors: dict[str, int]

    def cpu(self) -> dict[str, float]:
        out = {"upstream": cpu_seconds(self.upstream)}
        for name, pid in self.gateways.items():
            out[f"gateway_{name}"] = cpu_seconds(pid)
        for name, pid in self.processors.items():
            out[f"processor_{name}"] = cpu_seconds(pid)
        return out


class OverheadBench:
    """Starts the upstream, the processors and one gateway per variant once; runs the phases."""

    def __init__(self, settings: Settings, run_dir: Path, variants: Sequence[str] = VARIANTS) -> None:
        self.settings = settings
        self.run_dir = run_dir
        self.variants = tuple(variants)
        self.supervisor = Supervisor(run_dir / "logs")
        n = settings.hosts
        ports = iter(free_ports(n + 1 + 3 * n + 2 * len(self.variants)))
        self.upstream_ports = [next(ports) for _ in range(n)]
        self.upstream_admin = next(ports)
        spare = [next(ports) for _ in range(2 * n)]
        self.gateway_ports = {v: next(ports) for v in self.variants}
        self.admin_ports = {v: next(ports) for v in self.variants}
        self.sockets: dict[str, str] = {v: f"unix:{run_dir}/{v}.sock" for v in PROCESSOR_VARIANTS if v in self.variants}
        # Rendered once; the variants are transformations of it.
        first = self.variants[0]
        self.fleet = bench_fleet(
            self.upstream_ports,
            spare,
            self.sockets.get("picker", f"unix:{run_dir}/picker.sock"),
            self.gateway_ports[first],
            self.admin_ports[first],
            check_rest_bodies=settings.check_rest_bodies,
        )
        from extproc.envoy_config import render_bootstrap

        self.base_bootstrap = render_bootstrap(self.fleet)
        self.base_id = 20_000 + (os.getpid() % 5_000) * 8
        self.children: dict[str, Child] = {}
        self.processes: Processes | None = None

    # -- start and stop

    def _envoy(self, name: str, boot: Mapping[str, Any], base_id: int) -> Child:
        path = self.run_dir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(dict(boot), sort_keys=False), encoding="utf-8")
        argv = [
            find_envoy(),
            "-c",
            str(path),
            "--concurrency",
            "1",
            # Distinct base ids and no hot-restart shared memory: several Envoys (ours and anybody else's)
            # can run on one machine.
            "--base-id",
            str(base_id),
            "--disable-hot-restart",
            "--log-level",
            "warn",
        ]
        return self.supervisor.start(name, argv)

    def _wait(self, what: str, check: Callable[[], bool]) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not check():
            for child in self.supervisor.exited():
                raise BenchError(
                    f"{child.name} exited with code {child.process.returncode} during start-up; "
                    f"last lines of {child.log_file}:\n{child.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise BenchError(f"{what} did not become ready within {START_TIMEOUT_S:.0f} s")
            time.sleep(0.1)

    def start(self) -> None:
        progress(f"starting the upstream Envoy ({self.settings.hosts} hosts: ports {self.upstream_ports})")
        self.children["upstream"] = self._envoy(
            "upstream", upstream_bootstrap(self.upstream_ports, self.upstream_admin), self.base_id
        )
        fleet_path = self.run_dir / "fleet.yaml"
        fleet_path.write_text(yaml.safe_dump(self.fleet.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
        for variant, listen in self.sockets.items():
            progress(f"starting the {variant} processor on {listen}")
            argv = [sys.executable, "-m", "benchmarks.overhead.server", variant, "--listen", listen]
            if self._routes(variant):
                argv += ["--config", str(fleet_path)]
            self.children[variant] = self.supervisor.start(f"processor-{variant}", argv, child_env())
        for k, variant in enumerate(self.variants, start=1):
            boot = self._gateway_bootstrap(variant)
            progress(f"starting the {variant} gateway Envoy on 127.0.0.1:{self.gateway_ports[variant]}")
            self.children[f"gateway-{variant}"] = self._envoy(f"gateway-{variant}", boot, self.base_id + k)
        self._wait("the upstream Envoy", lambda: http_get(f"http://127.0.0.1:{self.upstream_admin}/ready")[0] == 200)
        for variant in self.sockets:
            child = self.children[variant]
            self._wait(f"the {variant} processor", lambda c=child: READY_LINE in c.log_tail(50))  # type: ignore[misc]
        for variant in self.variants:
            port = self.gateway_ports[variant]
            self._wait(f"the {variant} gateway", lambda p=port: post(p)[0] == 200)  # type: ignore[misc]
        self._check_routing()
        self.processes = Processes(
            upstream=self.children["upstream"].process.pid,
            gateways={v: self.children[f"gateway-{v}"].process.pid for v in self.variants},
            processors={v: self.children[v].process.pid for v in self.sockets},
        )

    def _gateway_bootstrap(self, variant: str) -> dict[str, Any]:
        port, admin = self.gateway_ports[variant], self.admin_ports[variant]
        if variant == EPP_VARIANT:
            return epp_bootstrap(self.fleet, listen_port=port, admin_port=admin, picker_listen=self.sockets[variant])
        return variant_bootstrap(
            self.base_bootstrap, variant, listen_port=port, admin_port=admin, picker_listen=self.sockets.get(variant)
        )

    def _routes(self, variant: str) -> bool:
        """Whether ``variant``'s processor names upstream hosts: the picker's (in either dialect), and the bare
        one's routing answer."""
        return variant in ("picker", EPP_VARIANT) or (variant == "bare" and self.settings.bare_answer == "routing")

    def _check_routing(self) -> None:
        """The picker (and a bare processor with the routing answer) names upstream hosts (echoed back by the
        upstream, from the header of its dialect); the others name none."""
        endpoints = {f"127.0.0.1:{p}" for p in self.upstream_ports}
        for variant in self.variants:
            status, headers = post(self.gateway_ports[variant])
            echo = ECHO_DESTINATION_HEADER if variant == EPP_VARIANT else ECHO_HEADER
            named = [h for h in headers.get(echo, "").split(",") if h]
            if self._routes(variant):
                if status != 200 or not named or not set(named) <= endpoints:
                    raise BenchError(f"the {variant} processor did not route (status {status}, hosts {named!r})")
            elif named:
                raise BenchError(f"the {variant} gateway sent a hosts header {named!r}")
        progress("all gateways answer; the picker routes to the upstream hosts")

    def stop(self) -> None:
        self.supervisor.stop(timeout_s=5.0)

    # -- one measured run

    def _snapshot(self, variant: str) -> tuple[dict[str, float], dict[str, int], dict[str, int]]:
        assert self.processes is not None
        gateway = envoy_counters(self.admin_ports[variant], "^" + re.escape(gateway_stat_prefix()))
        upstream = envoy_counters(self.upstream_admin, r"^http\.up[0-9]+\.downstream_rq_total$")
        return self.processes.cpu(), gateway, upstream

    def _measure(self, variant: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        cpu0, gw0, up0 = self._snapshot(variant)
        machine0, own0 = machine_busy_seconds(), own_cpu_seconds()
        wall0 = time.monotonic()
        result = run()
        wall = time.monotonic() - wall0
        machine1, own1 = machine_busy_seconds(), own_cpu_seconds()
        cpu1, gw1, up1 = self._snapshot(variant)
        requests = int(result["completed"])
        cpu = {k: cpu1[k] - cpu0[k] for k in cpu0}
        result["wall_s"] = wall
        # How busy the machine was, and how much of that was not this benchmark (other users' work).
        bench_s = sum(cpu.values()) + own1 - own0
        busy_s = machine1 - machine0
        result["machine"] = {
            "busy_cores": busy_s / wall,
            "bench_cores": bench_s / wall,
            "other_cores": max(0.0, busy_s - bench_s) / wall,
        }
        result["gateway"] = gateway_summary(counter_delta(gw0, gw1))
        upstream = counter_delta(up0, up1)
        total_up = sum(upstream.values())
        result["upstream_share"] = {
            f"up{i}": (upstream.get(f"http.up{i}.downstream_rq_total", 0) / total_up if total_up else 0.0)
            for i in range(self.settings.hosts)
        }
        result["cpu_s"] = cpu
        result["cpu_us_per_request"] = {
            "processor": cpu_us_per_request(cpu[f"processor_{variant}"], requests)
            if f"processor_{variant}" in cpu
            else None,
            "gateway": cpu_us_per_request(cpu[f"gateway_{variant}"], requests),
            "upstream": cpu_us_per_request(cpu["upstream"], requests),
        }
        return result

    def run_wrk(self, variant: str, script: Path, duration_s: int) -> dict[str, Any]:
        assert self.settings.wrk is not None
        wrk = self.settings.wrk

        def go() -> dict[str, Any]:
            out = run_wrk(wrk, script, self.gateway_ports[variant], self.settings.connections, duration_s)
            out["completed"] = out["requests"]
            return out

        return self._measure(variant, go)

    def run_rate(self, variant: str, rate: float, duration_s: float) -> dict[str, Any]:
        port = self.gateway_ports[variant]
        records: list[OpenLoopRecords] = []

        def go() -> dict[str, Any]:
            loop = OpenLoop(port, request_bytes(port), initial_connections=8)
            rec = loop.run(constant_rate_offsets(rate, duration_s))
            records.append(rec)
            out = summarize_open_loop(rec, rate, self.settings.warmup_s)
            out["completed"] = sum(1 for s in rec.status if s == 200)
            out["generator_cpu_us_per_request"] = cpu_us_per_request(rec.generator_cpu_s, len(rec.intended))
            out["connections"] = rec.connections
            return out

        result = self._measure(variant, go)
        rec = records[0]
        idx = rec.measured(self.settings.warmup_s)
        result["_latencies_s"] = [rec.done[i] - rec.intended[i] for i in idx if rec.status[i] == 200]
        result["_lags_s"] = [rec.sent[i] - rec.intended[i] for i in idx if math.isfinite(rec.sent[i])]
        return result

    # -- phases

    def warm_up(self) -> None:
        progress("warm-up: 1 s at 200 req/s per variant")
        for variant in self.variants:
            self.run_rate(variant, 200.0, 1.0)

    def max_phase(self) -> dict[str, Any]:
        s = self.settings
        if s.wrk is None:
            reason = s.wrk_missing or WRK_INSTALL_HINT
            progress(f"maximum throughput: skipped. {reason}")
            return {"skipped": reason}
        script = self.run_dir / "post.lua"
        script.write_text(wrk_script(), encoding="utf-8")
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in self.variants}
        for r in range(s.rounds):
            for variant in rotated(self.variants, r):
                progress(
                    f"max throughput, round {r + 1}/{s.rounds}: {variant} "
                    f"(wrk, {s.connections} connections, {s.max_duration_s} s)"
                )
                result = self.run_wrk(variant, script, s.max_duration_s)
                result["round"] = r
                runs[variant].append(result)
                progress(
                    f"  {variant}: {result['rps']:.0f} req/s, p99 {result['latency']['p99_ms']:.2f} ms, "
                    f"errors {result['error_count']}, fail-open {result['gateway']['ext_proc_fail_open']}, "
                    f"other load {result['machine']['other_cores']:.2f} cores"
                )
                time.sleep(0.5)
        return summarize_max(runs, s)

    def rate_phase(self, max_rps: Mapping[str, float]) -> list[dict[str, Any]]:
        s = self.settings
        out = []
        for rate in s.rates:
            runs: dict[str, list[dict[str, Any]]] = {v: [] for v in self.variants}
            skipped: dict[str, str] = {}
            for variant in self.variants:
                if not reachable(rate, max_rps.get(variant)):
                    skipped[variant] = (
                        f"not reachable: best maximum-throughput round {max_rps[variant]:.0f} req/s "
                        f"(a rate above {REACHABLE_FRACTION:.0%} of it is not offered)"
                    )
                    progress(f"{rate:g} req/s: {variant} {skipped[variant]}")
            active = [v for v in self.variants if v not in skipped]
            for r in range(s.rounds):
                for variant in rotated(active, r):
                    progress(f"{rate:g} req/s, round {r + 1}/{s.rounds}: {variant} ({s.duration_s:g} s, open loop)")
                    result = self.run_rate(variant, rate, s.duration_s)
                    result["round"] = r
                    runs[variant].append(result)
                    lat = result["latency"]
                    progress(
                        f"  {variant}: p50 {lat['p50_ms']:.3f} ms, p99 {lat['p99_ms']:.3f} ms, "
                        f"achieved {result['achieved_rps']:.0f} req/s, errors {result['error_count']}, "
                        f"lag p99 {result['lag']['p99_ms']:.3f} ms, "
                        f"fail-open {result['gateway']['ext_proc_fail_open']}, "
                        f"other load {result['machine']['other_cores']:.2f} cores"
                    )
                    time.sleep(0.3)
            out.append(summarize_rate(rate, runs, skipped, s))
        return out

    def soak(self, total: int, variant: str = "picker") -> dict[str, Any]:
        """N requests through one processor variant's gateway, its RSS sampled every ~50k requests."""
        assert self.processes is not None
        s = self.settings
        pid = self.processes.processors[variant]
        script = self.run_dir / "post.lua"
        script.write_text(wrk_script(), encoding="utf-8")
        series: list[dict[str, Any]] = [{"requests": 0, "rss_bytes": rss_bytes(pid), "elapsed_s": 0.0}]
        sent = 0
        chunk_s = 10
        cpu0 = cpu_seconds(pid)
        fail_open = 0
        errors = 0
        started = time.monotonic()
        progress(f"soak: {total} requests through the {variant}, RSS every ~{SOAK_SAMPLE_EVERY} requests")
        while sent < total:
            want = min(SOAK_SAMPLE_EVERY, total - sent)
            if s.wrk is not None:
                result = self.run_wrk(variant, script, chunk_s)
                done_now = int(result["completed"])
                errors += int(result["error_count"])
                # The next chunk's duration aims at SOAK_SAMPLE_EVERY requests at the measured rate.
                rate = max(1.0, result["rps"])
                chunk_s = max(1, min(120, round(min(SOAK_SAMPLE_EVERY, total - sent - done_now) / rate)))
            else:
                result = self.run_rate(variant, s.soak_rate, want / s.soak_rate)
                done_now = int(result["completed"])
                errors += int(result["error_count"])
            fail_open += int(result["gateway"]["ext_proc_fail_open"])
            sent += done_now
            sample = {"requests": sent, "rss_bytes": rss_bytes(pid), "elapsed_s": time.monotonic() - started}
            series.append(sample)
            progress(
                f"  soak: {sent}/{total} requests, {variant} RSS {sample['rss_bytes'] / 2**20:.1f} MiB, "
                f"{done_now / max(result['wall_s'], 1e-9):.0f} req/s"
            )
        rss = [p["rss_bytes"] for p in series]
        # The first sample is before any request (imports only); flatness is judged from the first sample
        # after traffic started, when pools and caches exist.
        warm = rss[1:] if len(rss) > 2 else rss
        return {
            "variant": variant,
            "requests": sent,
            "generator": "wrk" if s.wrk is not None else f"open loop at {s.soak_rate:g} req/s",
            "series": series,
            "rss_max_over_min": max(warm) / min(warm),
            "rss_max_over_min_including_cold": max(rss) / min(rss),
            "rss_last_over_first_warm": warm[-1] / warm[0],
            "growth_bytes_per_request": growth_per_request(series[1:] if len(series) > 2 else series),
            "errors": errors,
            "fail_open": fail_open,
            "processor_cpu_us_per_request": cpu_us_per_request(cpu_seconds(pid) - cpu0, sent),
            "elapsed_s": time.monotonic() - started,
        }
