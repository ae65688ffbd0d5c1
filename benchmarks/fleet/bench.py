"""The fleet benchmark's run: the emulator, optional real Triton hosts, the picker and Envoy, then the phases.

1. Starts the emulator (:mod:`benchmarks.fleet.emulator`, one process) for the emulated hosts and, with
   ``real > 0``, real ``tritonserver`` processes (:mod:`extproc.runtime.triton`, as ``extproc up`` does).
2. Writes a fleet file (every host in the ``gpu`` tier serving the recorded models, the picker's default
   poll settings unless given) and starts the real picker (``python -m extproc serve --config``) and a
   real Envoy rendered from it (:func:`extproc.envoy_config.render_yaml`), as ``extproc up`` does; Envoy
   health-checks every host (REST and gRPC) and serves the admin pages the picker polls.
3. Waits until the picker sees every host fresh, then measures three phases of ``duration`` seconds: idle
   (counters still), load (each emulated host's counters advance at ``rate`` requests/s; no request goes
   through Envoy or the picker) and requests (``request_rate`` REST inference requests/s for
   ``mlp_classifier`` sent open loop through Envoy, so through the picker, to the emulated hosts, which
   count them). Per phase: the CPU (cores) of the picker, Envoy and the emulator from /proc, the picker's
   RSS, the requests each emulated host saw per second by kind; in the requests phase also the requests'
   latency and errors and the picker's decision time (``extproc_decision_seconds``, bucket bounds).
4. After each phase, samples the picker's ``/status`` (age of each host's metrics, index and Envoy view:
   p50/p99/max per source) and times one fetch and parse of Envoy's per-endpoint stats and of its
   ``/clusters?format=json``; the picker's polls over the phase are Envoy's count of admin requests.
"""

from __future__ import annotations

import json
import os
import platform
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

from benchmarks import REPO_ROOT, child_env, stop_process
from benchmarks.ports import envoy_base_id

_TICK: Final = os.sysconf("SC_CLK_TCK")
_START_TIMEOUT_S: Final = 240.0
_REAL_BATCH: Final = 10  # real Triton hosts started together
REAL_MODELS: Final = ("embed_normalize", "mlp_classifier")
MODELS: Final = ("embed_normalize", "mlp_classifier", "seq_accumulate", "timed_batch")


class FleetBenchError(RuntimeError):
    pass


def progress(message: str) -> None:
    print(f"[bench fleet] {message}", file=sys.stderr, flush=True)


@dataclass
class Settings:
    hosts: int = 50
    real: int = 0
    rate: float = 20.0
    duration_s: float = 10.0
    gpu_share: float = 0.5
    status_samples: int = 5
    fresh_timeout_s: float = 60.0  # how long to wait for every host fresh before measuring anyway
    request_rate: float = 100.0  # requests/s through Envoy in the requests phase (0: no such phase)
    poll: dict[str, int] | None = None  # picker.poll overrides
    profile: str | None = None  # run the picker under cProfile, its stats (pstats) written to this file at exit
    replicas: int = 1  # > 1: the picker publishes its telemetry and replicas - 1 followers join for a phase
    # Every decision's time, read from the picker's debug log ("routed", decision_us), besides the histogram.
    decision_samples: bool = False
    picker: str | None = None  # the default profile's picker (picker.profile.picker; None: the fleet default)
    workers: int = 1  # picker.workers: > 1, a leader process collects telemetry and the workers decide
    compiled: bool = False  # the picker runs the compiled modules (else plain Python, as the emulator)


def _stat_fields(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (the picker's workers)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int(_stat_fields(int(entry.name))[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
    return out


def cpu_seconds(pid: int) -> float:
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / _TICK


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _get(url: str, timeout_s: float = 10.0, data: bytes | None = None) -> bytes:
    with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=timeout_s) as response:
        return bytes(response.read())


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "max": None, "n": 0}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

    return {"p50": at(0.5), "p99": at(0.99), "max": round(ordered[-1], 3), "n": len(ordered)}


class FleetBench:
    def __init__(self, settings: Settings, run_dir: Path) -> None:
        self.settings = settings
        self.run_dir = run_dir
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: list[IO[bytes]] = []
        self.status_url = ""
        self.admin_url = ""
        self.stats_url = ""
        self.stale_after_s = 3.0
        self.listener_port = 0
        self.picker_metrics_url = ""
        self.emulated: list[dict[str, Any]] = []
        self.fleet_doc: dict[str, Any] = {}
        self.replica_ports: list[int] = []

    # -- start/stop --------------------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str], env: dict[str, str], stdout: int | None = None) -> None:
        log = (self.run_dir / f"{name}.log").open("wb")
        self.logs.append(log)
        self.children[name] = subprocess.Popen(
            argv, env=env, stdout=stdout if stdout is not None else log, stderr=log, cwd=REPO_ROOT
        )

    def _wait(self, what: str, ok: Any, timeout_s: float = _START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not ok():
            for name, child in self.children.items():
                if child.poll() is not None:
                    raise FleetBenchError(f"{name} exited ({child.returncode}); log: {self.run_dir}/{name}.log")
            if time.monotonic() > deadline:
                raise FleetBenchError(f"{what} not ready after {timeout_s:.0f} s (logs: {self.run_dir})")
            time.sleep(0.3)

    def start(self) -> None:
        from benchmarks.ports import free_ports
        from extproc.config import load_fleet
        from extproc.envoy_config import render_yaml
        from extproc.runtime.stack import find_envoy

        s = self.settings
        total = s.hosts + s.real
        # From one allocator: the emulator binds its ports once it starts, and a port chosen free for Envoy
        # before that could be one of them.
        ports = free_ports(3 * total + 3)
        listener_port, admin_port, picker_port = ports[-3:]
        # The publisher's snapshot port and each follower's metrics port.
        replica_ports = free_ports(s.replicas) if s.replicas > 1 else []
        hosts = [
            {"http_port": ports[3 * i], "grpc_port": ports[3 * i + 1], "metrics_port": ports[3 * i + 2]}
            for i in range(total)
        ]
        emulated = self.emulated = hosts[: s.hosts]
        every = round(1 / s.gpu_share) if s.gpu_share > 0 else 0
        for i, host in enumerate(emulated):
            host["gpu"] = bool(every) and i % every == 0
        spec = self.run_dir / "emulator.json"
        spec.write_text(json.dumps({"rate": 0.0, "hosts": emulated}), encoding="utf-8")
        env = child_env()
        env["EXTPROC_PURE_PYTHON"] = "1"
        if s.hosts:
            progress(f"starting the emulator: {s.hosts} hosts ({sum(h['gpu'] for h in emulated)} GPU-shaped pages)")
            self._spawn(
                "emulator", [sys.executable, "-m", "benchmarks.fleet.emulator", str(spec)], env, subprocess.PIPE
            )
            emulator = self.children["emulator"]
            assert emulator.stdout is not None
            line = emulator.stdout.readline().decode().strip()
            if line != "READY":
                raise FleetBenchError(f"the emulator did not start (log: {self.run_dir}/emulator.log)")
            self.stats_url = f"http://127.0.0.1:{emulated[0]['http_port']}/emulator"
        real = list(enumerate(hosts[s.hosts :]))
        for first in range(0, len(real), _REAL_BATCH):
            # A batch at a time: a hundred Tritons starting their python-backend stubs at once on a busy
            # machine can lose one (boost::interprocess::lock_exception) before it serves.
            batch = real[first : first + _REAL_BATCH]
            for i, host in batch:
                self._start_triton(f"real{i}", host, env)
            self._wait(f"real Triton hosts {first} to {first + len(batch) - 1}", lambda b=batch: self._ready(b))
        fleet_doc: dict[str, Any] = {
            "model_repository": str(REPO_ROOT / "triton_models"),
            "runtime_dir": str(self.run_dir),
            "hosts": [
                {
                    "name": f"emu{i:04d}" if i < s.hosts else f"real{i - s.hosts}",
                    "address": "127.0.0.1",
                    "http_port": h["http_port"],
                    "grpc_port": h["grpc_port"],
                    "metrics_port": h["metrics_port"],
                    "tier": "gpu",
                }
                for i, h in enumerate(hosts)
            ],
            "models": [
                {"name": m, "tiers": ["gpu"], **({"sequence": True} if m == "seq_accumulate" else {})} for m in MODELS
            ],
            "picker": {
                "listen": f"unix:{self.run_dir}/picker.sock",
                "metrics_port": picker_port,
                "log_level": "debug" if s.decision_samples else "warning",
                **({"poll": s.poll} if s.poll else {}),
                **({"profile": {"picker": s.picker}} if s.picker else {}),
                **({"workers": s.workers} if s.workers > 1 else {}),
                **self._publishing(replica_ports),
            },
            "envoy": {
                "listener": {"address": "127.0.0.1", "port": listener_port},
                "admin": {"address": "127.0.0.1", "port": admin_port},
                "tls": None,
                "base_id": envoy_base_id(),
            },
        }
        fleet_path = self.run_dir / "fleet.yaml"
        fleet_path.write_text(json.dumps(fleet_doc, indent=1), encoding="utf-8")
        self.fleet_doc = fleet_doc
        self.replica_ports = replica_ports
        fleet = load_fleet(fleet_path)
        self.stale_after_s = fleet.picker.poll.stale_after_ms / 1000
        self.fleet_poll = fleet.picker.poll.model_dump()
        progress(f"starting the picker ({total} hosts, {'compiled' if s.compiled else 'plain Python'})")
        profiler = ["-m", "cProfile", "-o", str(Path(s.profile).resolve())] if s.profile is not None else []
        picker_env = {k: v for k, v in env.items() if k != "EXTPROC_PURE_PYTHON"} if s.compiled else env
        argv = [sys.executable, *profiler, "-m", "extproc", "serve", "--config", str(fleet_path)]
        self._spawn("picker", argv, picker_env)
        envoy_yaml = self.run_dir / "envoy.yaml"
        envoy_yaml.write_text(render_yaml(fleet), encoding="utf-8")
        progress("starting Envoy")
        self._spawn(
            "envoy",
            [find_envoy(), "-c", str(envoy_yaml), "--disable-hot-restart", "--concurrency", "1", "--log-level", "warn"],
            env,
        )
        self.status_url = f"http://127.0.0.1:{picker_port}/status"
        self.picker_metrics_url = f"http://127.0.0.1:{picker_port}/metrics"
        self.listener_port = listener_port
        self.admin_url = f"http://127.0.0.1:{admin_port}/clusters?format=json"
        self._wait("Envoy admin", lambda: self._ok(f"http://127.0.0.1:{admin_port}/ready"))
        self._wait("the picker's /status", lambda: self._ok(self.status_url))
        progress("waiting until the picker sees every host fresh")
        started = time.monotonic()
        last_report = started
        while (fresh := self.fresh_hosts()) < total:
            now = time.monotonic()
            if now - started > s.fresh_timeout_s:
                # The picker cannot keep this fleet fresh: measure it anyway (the ages say how stale).
                progress(f"{fresh}/{total} hosts fresh after {s.fresh_timeout_s:.0f} s; measuring anyway")
                break
            if now - last_report >= 5:
                progress(f"{fresh}/{total} hosts fresh")
                last_report = now
            time.sleep(1.0)  # /status of a large fleet is not free for the picker

    def _publishing(self, ports: list[int]) -> dict[str, Any]:
        """The picker's ``replicas`` section where followers will join: it publishes on the first port."""
        if not ports:
            return {}
        token = self.run_dir / "replica.token"
        token.write_text(secrets.token_urlsafe(32), encoding="ascii")
        return {"replicas": {"publish": f"127.0.0.1:{ports[0]}", "token_file": str(token)}}

    def start_followers(self) -> None:
        """Start ``replicas - 1`` more pickers that follow the first (each with its own socket and metrics
        port, polling the same Envoy), and wait until each serves its /status."""
        publisher = self.fleet_doc["picker"]["replicas"]
        env = child_env()
        env["EXTPROC_PURE_PYTHON"] = "1"
        for i, port in enumerate(self.replica_ports[1:], start=1):
            doc = json.loads(json.dumps(self.fleet_doc))
            doc["picker"].update(
                listen=f"unix:{self.run_dir}/picker-{i}.sock",
                metrics_port=port,
                replicas={"follow": publisher["publish"], "token_file": publisher["token_file"]},
            )
            path = self.run_dir / f"fleet-follower-{i}.yaml"
            path.write_text(json.dumps(doc, indent=1), encoding="utf-8")
            progress(f"starting follower {i}")
            self._spawn(f"follower{i}", [sys.executable, "-m", "extproc", "serve", "--config", str(path)], env)
            self._wait(f"follower {i}'s /status", lambda port=port: self._ok(f"http://127.0.0.1:{port}/status"))

    def _start_triton(self, name: str, host: dict[str, Any], env: dict[str, str]) -> None:
        from extproc.runtime.triton import prepare_backend_dir, triton_command, triton_env

        progress(f"starting real Triton {name} on :{host['http_port']}")
        argv = triton_command(
            model_repository=REPO_ROOT / "triton_models",
            backend_dir=prepare_backend_dir(self.run_dir),
            http_port=host["http_port"],
            grpc_port=host["grpc_port"],
            metrics_port=host["metrics_port"],
            models=REAL_MODELS,
        )
        self._spawn(name, argv, triton_env(1.0) | {"PYTHONPATH": env["PYTHONPATH"]})

    def _ready(self, hosts: list[tuple[int, dict[str, Any]]]) -> bool:
        return all(self._ok(f"http://127.0.0.1:{host['http_port']}/v2/health/ready") for _, host in hosts)

    @staticmethod
    def _ok(url: str) -> bool:
        try:
            _get(url, 2.0)
        except OSError:
            return False
        return True

    def stop(self) -> None:
        # Envoy and the picker first, one at a time, so that the picker logs no poll failures of hosts
        # that stopped before it.
        for child in reversed(list(self.children.values())):
            stop_process(child, 15)
        for log in self.logs:
            log.close()

    # -- measuring ----------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return dict(json.loads(_get(self.status_url)))

    def fresh_hosts(self) -> int:
        try:
            return sum(1 for h in self.status()["hosts"].values() if h["fresh"])
        except OSError:
            return 0

    def emulator_stats(self) -> dict[str, Any]:
        return dict(json.loads(_get(self.stats_url + "/stats"))) if self.stats_url else {"hosts": [], "grpc": {}}

    def set_rate(self, rate: float) -> None:
        if self.stats_url:
            _get(f"{self.stats_url}/rate?r={rate}", data=b"")

    def phase(self, name: str, rate: float, request_rate: float = 0.0) -> dict[str, Any]:
        """One measured phase: the emulated hosts at ``rate`` requests/s each, and with ``request_rate``,
        that many inference requests/s sent through Envoy (and so through the picker) meanwhile."""
        from benchmarks.overhead.load import OpenLoop, summarize_open_loop

        s = self.settings
        self.set_rate(rate)
        time.sleep(min(3.0, s.duration_s / 3))  # the picker's derived load settles
        pids = {n: c.pid for n, c in self.children.items()}
        # A leader's workers decide; the leader collects telemetry (CPU reported apart and summed as "picker").
        pids |= {f"picker_worker{i}": pid for i, pid in enumerate(sorted(children(pids["picker"])))}
        before_stats = self.emulator_stats()
        decisions0 = self.decision_buckets()
        records: list[Any] = []
        sender: threading.Thread | None = None
        if request_rate > 0:
            generator = OpenLoop(self.listener_port, inference_request(self.listener_port), initial_connections=8)
            offsets = [i / request_rate for i in range(int(request_rate * s.duration_s))]
            sender = threading.Thread(target=lambda: records.append(generator.run(offsets)), daemon=True)
        admin0 = self.admin_requests()
        log_at = self.picker_log.stat().st_size
        cpu0 = {n: cpu_seconds(p) for n, p in pids.items()}
        t0 = time.monotonic()
        if sender is not None:
            sender.start()
        end = t0 + s.duration_s
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(5.0, left))
            elapsed = time.monotonic() - t0
            picker = (cpu_seconds(pids["picker"]) - cpu0["picker"]) / elapsed
            progress(f"{name}: {elapsed:.0f}/{s.duration_s:.0f} s, picker {picker:.3f} cores")
        if sender is not None:
            sender.join(30)
        wall = time.monotonic() - t0
        cpu = {n: round((cpu_seconds(p) - cpu0[n]) / wall, 4) for n, p in pids.items()}
        if s.workers > 1:
            cpu["picker_leader"] = cpu["picker"]
            cpu["picker"] = round(sum(v for n, v in cpu.items() if n.startswith("picker_")), 4)
        # Only the picker asks Envoy's admin during the phase (the benchmark's own request comes after).
        admin_polls = (self.admin_requests() - admin0 - 1) / wall
        after_stats = self.emulator_stats()
        total = s.hosts + s.real
        result: dict[str, Any] = {
            "emulated_rate_per_host": rate,
            "wall_s": round(wall, 2),
            "cpu_cores": cpu,
            "picker_cpu_ms_per_host_second": round(cpu["picker"] * 1000 / total, 4),
            "picker_rss_mib": round(rss_bytes(pids["picker"]) / 2**20, 1),
            "scrapes_per_host_s": self._scrape_load(before_stats, after_stats, wall),
        }
        if records:
            summary = summarize_open_loop(records[0], request_rate, 0.0)
            result["requests"] = {
                k: summary[k] for k in ("rate_rps", "requests", "ok", "errors", "achieved_rps", "latency")
            }
            result["decision_s"] = histogram_quantiles(decisions0, self.decision_buckets())
            if s.decision_samples:
                result["decision_us"] = decision_times(self.picker_log, log_at)
        result["emulator_answer_ms"] = self.probe_emulator()
        result["telemetry_age_s"] = self.ages()
        result["envoy_admin"] = self.envoy_admin_cost(admin_polls)
        return result

    @property
    def picker_log(self) -> Path:
        return self.run_dir / "picker.log"

    def probe_emulator(self, samples: int = 10) -> dict[str, Any]:
        """How fast the emulator answers a client other than the picker (so that a stale picker is not the
        emulator's doing): ``/metrics`` over a new connection and ``RepositoryIndex`` on a new channel."""
        import tritonclient.grpc as grpcclient

        if not self.emulated:
            return {}
        metrics, index = [], []
        for host in random.sample(self.emulated, min(samples, len(self.emulated))):
            t0 = time.perf_counter()
            _get(f"http://127.0.0.1:{host['metrics_port']}/metrics")
            t1 = time.perf_counter()
            client = grpcclient.InferenceServerClient(f"127.0.0.1:{host['grpc_port']}")
            try:
                client.get_model_repository_index(client_timeout=10.0)
            finally:
                client.close()
            metrics.append((t1 - t0) * 1000)
            index.append((time.perf_counter() - t1) * 1000)
        return {"metrics": percentiles(metrics), "repository_index": percentiles(index)}

    def decision_buckets(self) -> dict[float, float]:
        """The picker's ``extproc_decision_seconds`` histogram, summed over labels: bound → count."""
        buckets: dict[float, float] = {}
        for line in _get(self.picker_metrics_url).decode().splitlines():
            if line.startswith("extproc_decision_seconds_bucket{"):
                labels, _, value = line.rpartition("} ")
                bound = labels.partition('le="')[2].partition('"')[0]
                key = float("inf") if bound == "+Inf" else float(bound)
                buckets[key] = buckets.get(key, 0.0) + float(value)
        return buckets

    def _scrape_load(self, before: dict[str, Any], after: dict[str, Any], wall: float) -> dict[str, Any]:
        n = max(1, len(after["hosts"]))
        kinds: dict[str, list[float]] = {}
        for b, a in zip(before["hosts"], after["hosts"], strict=True):
            for kind in set(a) | set(b):
                kinds.setdefault(kind, []).append((a.get(kind, 0) - b.get(kind, 0)) / wall)
        load: dict[str, Any] = {
            f"http_{k}": {"mean": round(sum(v) / n, 3), "max": round(max(v), 3)} for k, v in kinds.items()
        }
        # One gRPC server answers every emulated host's port: per host is the total over the hosts.
        for method in set(after["grpc"]) | set(before["grpc"]):
            count = after["grpc"].get(method, 0) - before["grpc"].get(method, 0)
            load[f"grpc_{method}"] = {"mean": round(count / wall / n, 3)}
        return load

    def ages(self, status_url: str | None = None) -> dict[str, Any]:
        """Telemetry age per source over a few samples of the picker's /status (or another replica's)."""
        samples: dict[str, list[float]] = {}
        never: dict[str, int] = {}  # per source, host samples with no successful poll yet
        fresh, loaded = [], []
        for _ in range(self.settings.status_samples):
            hosts = json.loads(_get(status_url or self.status_url))["hosts"]
            fresh.append(sum(1 for h in hosts.values() if h["fresh"]))
            # Hosts whose derived load shows requests executing (the counters advance).
            loaded.append(sum(1 for h in hosts.values() if h.get("exec_ms")))
            for h in hosts.values():
                for source, age in h["age_s"].items():
                    samples.setdefault(source, [])
                    if age is None:
                        never[source] = never.get(source, 0) + 1
                    else:
                        samples[source].append(age)
            time.sleep(0.37)
        out: dict[str, Any] = {
            source: percentiles(v) | {"never_polled": never.get(source, 0)} for source, v in samples.items()
        }
        out["fresh_hosts_min"] = min(fresh)
        out["hosts_with_exec_ms_min"] = min(loaded)
        out["stale_after_s"] = self.stale_after_s
        return out

    def admin_requests(self) -> int:
        """Requests Envoy's admin endpoint has answered (this one not counted)."""
        url = self.admin_url.replace("/clusters?format=json", "/stats?filter=^http.admin.downstream_rq_total$")
        return int(_get(url).decode().partition(":")[2])

    def envoy_admin_cost(self, polls: float) -> dict[str, Any]:
        """The size, fetch and parse time of one read of Envoy's per-endpoint stats (what the picker polls
        while every host is in rotation) and of one ``/clusters`` (what it reads besides while one is not);
        ``polls``: the picker's polls per second, as counted."""
        from extproc.telemetry.envoy_admin import STATS_QUERY, parse_clusters, parse_endpoint_stats

        stats_url = self.admin_url.replace("/clusters?format=json", STATS_QUERY)
        costs = {}
        for name, url, parse in (
            ("stats", stats_url, lambda body: parse_endpoint_stats(body.decode())),
            ("clusters", self.admin_url, lambda body: parse_clusters(json.loads(body))),
        ):
            fetch, parsed, size = [], [], 0
            for _ in range(3):
                t0 = time.perf_counter()
                body = _get(url)
                t1 = time.perf_counter()
                parse(body)
                t2 = time.perf_counter()
                fetch.append(t1 - t0)
                parsed.append(t2 - t1)
                size = len(body)
            costs[name] = (size, round(min(fetch) * 1000, 2), round(min(parsed) * 1000, 2))
        return {
            "stats_bytes": costs["stats"][0],
            "stats_fetch_ms": costs["stats"][1],
            "stats_parse_ms": costs["stats"][2],
            "clusters_json_bytes": costs["clusters"][0],
            "fetch_ms": costs["clusters"][1],
            "parse_ms": costs["clusters"][2],
            "polls_per_s": round(polls, 2),
            "picker_parse_cores_est": round(costs["stats"][2] * polls / 1000, 4),
        }


def inference_request(port: int) -> bytes:
    """A REST inference request for mlp_classifier (1x16 FP32), as raw HTTP/1.1."""
    body = (
        '{"inputs":[{"name":"INPUT0","shape":[1,16],"datatype":"FP32","data":[' + ",".join(["0.5"] * 16) + "]}]}"
    ).encode()
    head = (
        "POST /v2/models/mlp_classifier/infer HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("ascii") + body


def decision_times(log: Path, offset: int) -> dict[str, Any]:
    """p50/p99/max of the decision times (µs) the picker logged ("routed", at debug) past ``offset``, and
    (``answer``) of the part until the answer was ready, before gRPC sent it."""
    times, answers = [], []
    with log.open("rb") as lines:
        lines.seek(offset)
        for line in lines:
            if b'"routed"' in line:
                event = json.loads(line)
                if event.get("event") == "routed":
                    times.append(float(event["decision_us"]))
                    answers.append(float(event["answer_us"]))
    return {**percentiles(times), "answer": percentiles(answers)}


def histogram_quantiles(before: dict[float, float], after: dict[float, float]) -> dict[str, Any]:
    """p50/p99 (the upper bound of the bucket holding the quantile, seconds; "+Inf" past the last bound) of
    what ``after`` added."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]  # cumulative
    total = counts[-1] if counts else 0.0
    out: dict[str, Any] = {"count": total}
    for name, q in (("p50_le", 0.5), ("p99_le", 0.99)):
        bound = next((b for b, c in zip(bounds, counts, strict=True) if total and c >= q * total), None)
        out[name] = "+Inf" if bound == float("inf") else bound
    return out


def environment() -> dict[str, Any]:
    return {
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.fleet", *sys.argv[1:]]),
        "machine": platform.machine(),
        "node": platform.node(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # runs the finally clauses: the children are stopped


def run(settings: Settings, keep_dir: Path | None = None) -> dict[str, Any]:
    report: dict[str, Any] = {"environment": environment(), "settings": vars(settings).copy()}
    holder = tempfile.TemporaryDirectory(prefix="extproc-fleet-") if keep_dir is None else None
    run_dir = Path(holder.name) if holder is not None else keep_dir
    assert run_dir is not None
    run_dir.mkdir(parents=True, exist_ok=True)
    bench = FleetBench(settings, run_dir)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        t0 = time.monotonic()
        bench.start()
        report["startup_s"] = round(time.monotonic() - t0, 1)
        report["poll"] = bench.fleet_poll
        report["idle"] = bench.phase("idle", 0.0)
        if settings.rate > 0 and settings.hosts:
            report["load"] = bench.phase(f"load {settings.rate:g}/s/host", settings.rate)
        if settings.replicas > 1:
            bench.start_followers()
            # What each Triton host sees from the scrapes, with followers beside the publisher: compare
            # with the idle phase's, the publisher alone.
            report["replicas"] = bench.phase(f"idle, {settings.replicas} replicas", 0.0)
            # The followers' view of the hosts: as fresh as the publisher's, from its snapshots.
            report["replicas"]["followers_telemetry_age_s"] = {
                f"follower{i}": bench.ages(f"http://127.0.0.1:{port}/status")
                for i, port in enumerate(bench.replica_ports[1:], start=1)
            }
        if settings.request_rate > 0:
            # The counters advance with the requests Envoy sends, not with the emulated rate.
            report["requests"] = bench.phase(
                f"{settings.request_rate:g} requests/s through Envoy", 0.0, settings.request_rate
            )
        report["environment"]["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    finally:
        progress("stopping")
        bench.stop()
        if holder is not None:
            holder.cleanup()
    return report
