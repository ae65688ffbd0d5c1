"""Demand-driven placement on the real stack: a model READY on one host only gets more traffic than one copy
serves (``capacity_rps`` is declared low, so modest test traffic is demand); ``extproc placement run --once``
loads it on the second host through the model operations, and the picker routes to both afterwards, with no
request failing throughout."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.ports import free_ports
from tests.stack import REPO, Stack, local_fleet, routable, start_stack, stop_stack, wait_for

pytestmark = pytest.mark.e2e

MODEL = "timed_batch"


class Traffic:
    """REST requests for one model through Envoy from a few threads (so that some overlap), recording when
    each was sent, how it ended and which host answered it (``x-triton-host``)."""

    def __init__(self, stack: Stack, model: str, rate: float, threads: int = 4) -> None:
        self.url = f"http://{stack.http_url}/v2/models/{model}/infer"
        self.body = json.dumps(
            {"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
        )
        self.period = threads / rate
        self.answers: list[tuple[float, str]] = []  # (sent, x-triton-host) of each success
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        body = self.body.encode()
        while not self._stop.is_set():
            sent = time.time()
            request = urllib.request.Request(self.url, data=body, headers={"content-type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=15) as response:
                    response.read()
                    self.answers.append((sent, response.headers.get("x-triton-host", "")))
            except urllib.error.HTTPError as exc:
                self.failures.append(f"HTTP {exc.code}: {exc.read()[:200]!r}")
            except OSError as exc:
                self.failures.append(repr(exc))
            self._stop.wait(max(0.0, self.period - (time.time() - sent)))

    def hosts(self, since: float) -> set[str]:
        return {host for sent, host in list(self.answers) if sent >= since}

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=20)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """Two GPU-tier hosts: triton-a has MODEL, triton-b only embed_normalize; the controller manages MODEL
    with a declared capacity of 4 req/s a copy, at most two copies, and no cool-down before a scale-up; the
    picker picks round robin."""
    fleet = local_fleet(tmp_path)
    hosts = {h["name"]: h for h in fleet["hosts"]}
    hosts["triton-a"]["launch"]["models"] = [MODEL]
    hosts["triton-b"]["launch"]["models"] = ["embed_normalize"]
    fleet["hosts"] = [hosts["triton-a"], hosts["triton-b"]]
    fleet["models"] = [m for m in fleet["models"] if m["name"] in {MODEL, "embed_normalize"}]
    # Round robin: whether the new copy takes traffic is then up to placement alone. Under argmax on
    # expected completion, light traffic may rightly stay on the warm copy for a while: the new copy's
    # first (cold) requests are slow, and its service time is only measured again when it gets some.
    fleet["picker"]["profile"]["picker"] = "round_robin"
    fleet["placement"] = {
        "enabled": True,
        "up_cooldown_s": 0,
        "tier_memory_bytes": {"gpu": "4GiB"},
        "models": {MODEL: {"capacity_rps": 4, "max_copies": 2}},
    }
    stack = start_stack(tmp_path, fleet)
    yield stack
    stop_stack(stack)


def placement(stack: Stack, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "extproc", "placement", *argv, "--config", str(stack.run_dir / "fleet.yaml")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


def log_records(output: str) -> list[dict[str, Any]]:
    """The JSON log lines of an ``extproc`` command's output."""
    records = []
    for line in output.splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict):
                records.append(record)
    return records


def test_e2e_placement_run_loads_a_second_copy_and_the_picker_routes_to_both(stack: Stack) -> None:
    endpoint = {name: f"127.0.0.1:{stack.host(name)['http_port']}" for name in ("triton-a", "triton-b")}
    wait_for(lambda: routable(stack, "triton-a", [MODEL]) and routable(stack, "triton-b"), 60, "both hosts routable")
    assert MODEL not in stack.picker_status()["hosts"]["triton-b"]["ready"]
    with Traffic(stack, MODEL, rate=20.0) as traffic:
        wait_for(lambda: len(traffic.answers) >= 20, 30, "traffic to be answered")
        assert traffic.hosts(0.0) == {endpoint["triton-a"]}  # the only copy
        result = placement(stack, "run", "--once", "--window", "3")
        output = result.stdout + result.stderr
        assert result.returncode == 0, output
        actions = [r for r in log_records(output) if r.get("event") == "placement_action"]
        assert [(r["action"], r["model"], r["host"], r["outcome"]) for r in actions] == [
            ("load", MODEL, "triton-b", "done")
        ], output
        assert actions[0]["current"] == 1 and actions[0]["desired"] == 2 and actions[0]["demand_rps"] > 4, output
        loaded_at = time.time()
        # The load waited until the picker saw the model READY; on a loaded machine the host was once seen
        # not yet routable just then (for a moment after the load): wait for that too.
        try:
            wait_for(lambda: routable(stack, "triton-b", [MODEL]), 30, "triton-b routable with the model")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {json.dumps(stack.picker_status()['hosts']['triton-b'])}") from None
        try:
            wait_for(lambda: traffic.hosts(loaded_at) == set(endpoint.values()), 30, "answers from both hosts")
        except AssertionError as exc:
            served = Counter(host for sent, host in list(traffic.answers) if sent >= loaded_at)
            raise AssertionError(f"{exc}: served since the load: {dict(served)}; {stack.picker_status()}") from None
    assert traffic.failures == [], traffic.failures[:5]
    explain = placement(stack, "explain", "--json", "--window", "1")
    assert explain.returncode == 0, explain.stdout + explain.stderr
    (decision,) = json.loads(explain.stdout)["models"]
    assert (decision["model"], decision["current"]) == (MODEL, 2), decision
    # The controller's series, from a running controller (dry run: it changes nothing).
    (port,) = free_ports(1)
    argv = [sys.executable, "-m", "extproc", "placement", "run", "--dry-run", "--window", "1"]
    argv += ["--config", str(stack.run_dir / "fleet.yaml"), "--metrics-port", str(port)]
    with (stack.run_dir / "placement-run.log").open("wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        series: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

        def scraped() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
                    text = response.read().decode()
            except OSError:
                return False
            series.clear()
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    series[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
            return ("extproc_placement_paused", ()) in series

        wait_for(scraped, 60, "the controller's first round on /metrics")
    finally:
        process.terminate()
        code = process.wait(timeout=30)
    # SIGTERM stops it between rounds (a pod being stopped), not halfway through one.
    assert code == 0, (stack.run_dir / "placement-run.log").read_text()[-2000:]
    assert "placement_stopped" in (stack.run_dir / "placement-run.log").read_text()
    key = (("model", MODEL), ("tier", "gpu"))
    assert series[("extproc_placement_copies", key)] == 2.0, series
    assert series[("extproc_placement_desired_copies", key)] in {1.0, 2.0}, series  # no demand now: may scale down
    assert series[("extproc_placement_capacity_per_copy_rps", key)] == 4.0, series
    assert series[("extproc_placement_tier_hosts", (("tier", "gpu"),))] == 2.0, series
    assert series[("extproc_placement_tier_hosts_wanted", (("tier", "gpu"),))] == 2.0, series


def test_e2e_the_controller_learns_a_footprint_from_the_memory_change_at_its_load(stack: Stack) -> None:
    """The CPU build of Triton exports ``nv_cpu_memory_used_bytes`` (no GPU series): the controller reads it
    from the host's metrics page before its load of MODEL (no footprint declared) and again after, and
    serves what it learned."""
    wait_for(lambda: routable(stack, "triton-a", [MODEL]) and routable(stack, "triton-b"), 60, "both hosts routable")
    fleet = yaml.safe_load((stack.run_dir / "fleet.yaml").read_text())
    fleet["placement"]["interval_s"] = 1
    config = stack.run_dir / "fleet-1s.yaml"
    config.write_text(yaml.safe_dump(fleet))
    (port,) = free_ports(1)
    argv = [sys.executable, "-m", "extproc", "--log-format", "json", "placement", "run", "--window", "1"]
    argv += ["--config", str(config), "--metrics-port", str(port)]
    log_path = stack.run_dir / "placement-learn.log"
    with Traffic(stack, MODEL, rate=20.0), log_path.open("wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        try:

            def learned() -> float | None:
                try:
                    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
                except OSError:
                    return None
                for family in text_string_to_metric_families(text):
                    for s in family.samples:
                        labels = {"model": MODEL, "source": "learned"}
                        if s.name == "extproc_placement_model_footprint_bytes" and s.labels == labels:
                            return s.value
                return None

            def measured() -> bool:
                records = log_records(log_path.read_text(encoding="utf-8", errors="replace"))
                return any(r.get("event") == "placement_footprint" for r in records)

            wait_for(measured, 60, "the controller to measure its load")
            wait_for(lambda: learned() is not None or not _counted(log_path), 10, "the learned footprint's series")
            served = learned()
        finally:
            process.terminate()
            process.wait(timeout=30)
    records = log_records(log_path.read_text(encoding="utf-8", errors="replace"))
    (load,) = [r for r in records if r.get("event") == "placement_action"]
    assert (load["action"], load["host"], load["outcome"]) == ("load", "triton-b", "done"), load
    (footprint, *_) = [r for r in records if r.get("event") == "placement_footprint"]
    # Read before and after the load, from the CPU build's nv_cpu_memory_used_bytes.
    assert footprint["memory"] == "cpu" and footprint["delta_bytes"] is not None, footprint
    if not footprint["counted"] and footprint["why"] == "memory did not grow":
        # The machine's used memory: other processes on a shared machine freed more than the load took.
        pytest.skip(f"the machine's memory changed by {footprint['delta_bytes']} bytes over the load: not counted")
    assert footprint["counted"] and footprint["delta_bytes"] > 0, footprint
    assert served == footprint["delta_bytes"], (served, footprint)


def _counted(log_path: Path) -> bool:
    records = log_records(log_path.read_text(encoding="utf-8", errors="replace"))
    return any(r.get("event") == "placement_footprint" and r.get("counted") for r in records)
