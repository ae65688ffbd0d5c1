"""The alert rules and the Grafana dashboard against a real Prometheus (Debian's ``prometheus`` package, which
``make test`` installs when missing: tests/tools/ensure-prometheus.sh).

``promtool`` checks and unit-tests deploy/prometheus/alerts.yaml; then a Prometheus on loopback scrapes the
local stack (the picker, Envoy's admin /stats/prometheus, the Triton hosts) every second while requests go
through the gateway, and every query of every dashboard panel must return data.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from benchmarks.ports import free_ports
from tests.dns_server import dns_server
from tests.stack import (
    REPO,
    ProcessSpec,
    Stack,
    http_status,
    launch,
    local_fleet,
    start_stack,
    stop_processes,
    stop_stack,
    wait_for,
)

RULES_DIR = REPO / "deploy" / "prometheus"
RULES = RULES_DIR / "alerts.yaml"
DASHBOARD = REPO / "deploy" / "grafana" / "extproc-dashboard.json"
INSTALL = "tests/tools/ensure-prometheus.sh"
# Grafana's own variables, as Grafana would expand them for a short time range at a 1 s scrape interval.
GRAFANA_VARIABLES = {"__rate_interval": "30s", "__interval": "5s", "__range": "5m"}
# A pool whose name resolves to no address: the picker still reports it (extproc_pool_hosts 0), so the
# dashboard's discovery panel has a series on the otherwise static local fleet.
POOL_DNS = "spare.pool.test"
# Triton exports nv_gpu_* only for the GPUs it sees.
HAS_GPU = Path("/dev/nvidia0").exists()


def tool(name: str) -> str:
    """The path of ``name`` from Debian's prometheus package; a missing one fails (it is not a skip)."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run {INSTALL} (`make test` does) or apt-get install prometheus")
    return path


def promtool(*args: str) -> str:
    result = subprocess.run(
        [tool("promtool"), *args], capture_output=True, text=True, timeout=60, cwd=RULES_DIR, check=False
    )
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"
    return result.stdout


def test_alert_rules_are_valid() -> None:
    promtool("check", "rules", RULES.name)
    promtool("check", "config", "prometheus.yml")


def test_alert_rules_unit_tests_pass() -> None:
    """Every alert fires on its condition and stays quiet otherwise (deploy/prometheus/alerts_test.yaml)."""
    out = promtool("test", "rules", "alerts_test.yaml")
    assert "SUCCESS" in out, out
    tested = set(re.findall(r"alertname: (\w+)", (RULES_DIR / "alerts_test.yaml").read_text()))
    assert tested == set(alert_names()), "every alert needs a case in alerts_test.yaml"


def alert_names() -> list[str]:
    return [rule["alert"] for group in rule_groups() for rule in group["rules"] if "alert" in rule]


def rule_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(RULES.read_text())["groups"]
    return groups


# ------------------------------------------------------------------------------------ the dashboard's queries


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside (collapsed) rows included."""
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel, Grafana's variables expanded."""
    dashboard = json.loads(DASHBOARD.read_text())
    variables = dict(GRAFANA_VARIABLES)
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable["type"] in ("custom", "constant", "textbox"):
            variables[variable["name"]] = str(variable["current"]["value"])
        elif variable["type"] == "query":
            variables[variable["name"]] = ".*"

    def expand(expr: str) -> str:
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m.group(1) or m.group(2), m.group(0)), expr)

    queries = []
    for panel in panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            if "expr" in target:
                expr = expand(target["expr"])
                assert "$" not in expr, f"{panel['title']}: unknown variable in {expr}"
                queries.append((str(panel["title"]), expr))
    return queries


def test_every_dashboard_query_expands() -> None:
    queries = dashboard_queries()
    assert len(queries) > 20, queries


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (not its label names nor functions)."""
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    return set(re.findall(r"\b(?:up|(?:extproc|envoy|nv)_\w+)\b(?!\s*\()", expr))


def test_metric_names_of_a_query() -> None:
    expr = 'sum by (envoy_cluster_name) (rate(envoy_x_total{envoy_cluster_name=~"a"}[1m])) / ignoring (e) up'
    assert metric_names(expr) == {"envoy_x_total", "up"}


# ------------------------------------------------------------------------------------- a real Prometheus


class Prometheus:
    """A Prometheus on loopback with its own storage; ``query`` is its HTTP API."""

    def __init__(self, work_dir: Path, scrape: dict[str, list[str] | tuple[str, list[str]]]) -> None:
        port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{port}"
        jobs = []
        for job, targets in scrape.items():
            path, addresses = targets if isinstance(targets, tuple) else ("/metrics", targets)
            jobs.append({"job_name": job, "metrics_path": path, "static_configs": [{"targets": addresses}]})
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": jobs,
        }
        work_dir.mkdir(parents=True, exist_ok=True)
        config_file = work_dir / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        argv = (
            tool("prometheus"),
            f"--config.file={config_file}",
            f"--storage.tsdb.path={work_dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        )
        self.log = work_dir / "prometheus.log"
        self.process = launch(ProcessSpec(argv, dict(os.environ), str(work_dir)), self.log)
        try:
            wait_for(
                lambda: self.process.poll() is not None or http_status(f"{self.url}/-/ready") == 200, 60, "Prometheus"
            )
        except AssertionError:
            self.stop()
            raise
        assert self.process.poll() is None, self.log.read_text(errors="replace")[-3000:]

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                answer = json.load(response)
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{path} {params}: HTTP {exc.code}: {exc.read()[:500]!r}") from exc
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        result: list[dict[str, Any]] = data["result"]
        return result

    def stop(self) -> None:
        stop_processes([self.process])


def finite(result: list[dict[str, Any]]) -> bool:
    """Whether any series has a number (Grafana draws NaN, e.g. 0/0, as a gap: no data)."""
    return any(math.isfinite(float(sample["value"][1])) for sample in result)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The local stack, plus an empty DNS pool and a model for the placement controller to plan."""
    run_dir = tmp_path_factory.mktemp("prometheus-stack")
    with dns_server({POOL_DNS: []}) as dns:
        fleet = local_fleet(run_dir)
        http, grpc, metrics = free_ports(3)
        pool = {"name": "spare", "dns": POOL_DNS, "tier": "cpu", "refresh_s": 1.0}
        fleet["pools"] = [{**pool, "http_port": http, "grpc_port": grpc, "metrics_port": metrics}]
        fleet["dns_resolvers"] = [dns.address]
        # A managed model (placement stays off): the controller's per-model series have data.
        fleet["placement"] = {"models": {"embed_normalize": {}}}
        stack = start_stack(run_dir, fleet)
        try:
            yield stack
        finally:
            stop_stack(stack)


class Traffic:
    """Requests through the gateway in a thread, a few a second: both tiers, and one the picker refuses."""

    REQUESTS = (
        ("embed_normalize", {"name": "INPUT", "shape": [1, 4], "datatype": "FP32", "data": [3, 4, 0, 0]}),
        ("mlp_classifier", {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 16}),
        ("no_such_model", {"name": "INPUT", "shape": [1, 1], "datatype": "FP32", "data": [0]}),
    )

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.statuses: dict[str, set[int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for model, tensor in self.REQUESTS:
                url = f"http://{self.stack.http_url}/v2/models/{model}/infer"
                body = json.dumps({"inputs": [tensor]}).encode()
                request = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
                try:
                    with urllib.request.urlopen(request, timeout=10) as response:
                        status = int(response.status)
                except urllib.error.HTTPError as exc:
                    status = int(exc.code)
                except OSError:
                    status = 0
                self.statuses.setdefault(model, set()).add(status)
            self._stop.wait(0.2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


@pytest.fixture
def placement(stack: Stack, tmp_path: Path) -> Iterator[str]:
    """The placement controller on the stack's fleet file (its placement is off: it plans and exports only),
    serving its metrics; yields their address."""
    (port,) = free_ports(1)
    argv = (
        sys.executable, "-m", "extproc", "placement", "run", "--config", str(stack.run_dir / "fleet.yaml"),
        "--metrics-port", str(port), "--window", "1",
    )  # fmt: skip
    process = launch(ProcessSpec(argv, dict(os.environ), str(REPO)), tmp_path / "placement.log")
    try:
        yield f"127.0.0.1:{port}"
    finally:
        stop_processes([process])


@pytest.fixture
def prometheus(stack: Stack, placement: str, tmp_path: Path) -> Iterator[Prometheus]:
    """A Prometheus scraping the stack's picker, Envoy, Triton hosts and the placement controller every
    second, with the alert rules."""
    fleet = stack.fleet
    scrape: dict[str, list[str] | tuple[str, list[str]]] = {
        "extproc-picker": [f"127.0.0.1:{fleet['picker']['metrics_port']}"],
        "envoy": ("/stats/prometheus", [f"127.0.0.1:{fleet['envoy']['admin']['port']}"]),
        "triton": [f"{h['address']}:{h['metrics_port']}" for h in fleet["hosts"]],
        "extproc-placement": [placement],
    }
    prometheus = Prometheus(tmp_path / "prometheus", scrape)
    try:
        yield prometheus
    finally:
        prometheus.stop()


@pytest.fixture
def traffic(stack: Stack) -> Iterator[Traffic]:
    traffic = Traffic(stack)
    try:
        yield traffic
    finally:
        traffic.stop()


@pytest.mark.e2e
def test_every_dashboard_panel_and_alert_rule_has_data_on_the_local_stack(
    prometheus: Prometheus, traffic: Traffic
) -> None:
    queries = dashboard_queries()
    # Triton has no GPU metrics without a GPU; the queries must still be valid PromQL.
    gpu_only = {
        expr for _, expr in queries if metric_names(expr) and all(n.startswith("nv_gpu_") for n in metric_names(expr))
    }
    empty: list[str] = []

    def every_panel_has_data() -> bool:
        empty[:] = [
            f"{title}: {expr}"
            for title, expr in queries
            if not finite(prometheus.query(expr)) and (HAS_GPU or expr not in gpu_only)
        ]
        return not empty

    try:
        wait_for(every_panel_has_data, 60, "every dashboard query to return data", interval_s=1.0)
    except AssertionError:
        targets = prometheus.api("targets")["activeTargets"]
        health = {t["scrapeUrl"]: (t["health"], t["lastError"]) for t in targets}
        pytest.fail("no data for:\n  " + "\n  ".join(empty) + f"\ntargets: {health}\nrequests: {traffic.statuses}")
    assert traffic.statuses["embed_normalize"] == {200}, traffic.statuses
    assert traffic.statuses["mlp_classifier"] == {200}, traffic.statuses
    assert traffic.statuses["no_such_model"] == {404}, traffic.statuses

    # The alert rules: every metric they read is one the stack exports (with samples, or announced by its
    # HELP/TYPE lines when no labelled child exists yet), and every rule evaluates without error.
    exported = set(prometheus.api("label/__name__/values")) | set(prometheus.api("metadata"))
    for group in rule_groups():
        for rule in group["rules"]:
            missing = metric_names(rule["expr"]) - exported
            assert not missing, f"{rule['alert']} reads metrics nobody exports: {sorted(missing)}"

    def rules_evaluated() -> bool:
        loaded = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
        return len(loaded) == len(alert_names()) and all(r["lastEvaluation"][:4] != "0001" for r in loaded)

    wait_for(rules_evaluated, 30, "Prometheus to evaluate every alert rule", interval_s=0.5)
    for group in prometheus.api("rules")["groups"]:
        for rule in group["rules"]:
            assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"
            # A healthy stack trips nothing, not even a pending alert; except, on a busy machine, the decision
            # time's p99 (with a few requests a second, the slowest of them).
            if rule["name"] != "ExtprocDecisionLatencyHigh":
                assert rule["state"] == "inactive", rule
