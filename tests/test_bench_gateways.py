"""``benchmarks.gateways``: a scenario through several gateways, their pickers sharing their loads or not."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from benchmarks.gateways import main, merged, replica_fleets, split_load
from benchmarks.loadgen import GRPC_OK, HTTP_OK, LoadSpec, MixEntry, Records
from benchmarks.routing import localize_hosts
from extproc.config import parse_fleet
from tests.test_bench_routing import REPO, scenario_data


def test_each_gateway_takes_its_share_of_every_rate_on_its_own_stream() -> None:
    load = LoadSpec(
        rate_rps=90,
        duration_s=5,
        seed=4,
        mix=(MixEntry(model="m"), MixEntry(model="n", rate_rps=30, name="own")),
    )
    parts = [split_load(load, 3, i) for i in range(3)]
    assert [p.rate_rps for p in parts] == [30, 30, 30] and [p.mix[1].rate_rps for p in parts] == [10, 10, 10]
    assert [p.seed for p in parts] == [4, 5, 6] and parts[0].mix[0].rate_rps is None


def test_the_first_replica_publishes_and_the_others_follow_it(tmp_path: Path) -> None:
    token = tmp_path / "token"
    fleet = localize_hosts(scenario_data()["fleet"], iter(range(20000, 20100)))  # as the bench gets it
    fleets = replica_fleets(fleet, 3, True, token, 9100)
    sides = [f["picker"]["replicas"] for f in fleets]
    assert sides[0]["publish"] == "127.0.0.1:9100" and all(s["follow"] == "127.0.0.1:9100" for s in sides[1:])
    assert all(s["share_load"] and s["token_file"] == str(token) for s in sides)
    assert all(parse_fleet(data).picker.replicas.share_load for data in fleets)  # each a valid fleet file
    assert "picker" not in fleet  # the scenario's own fleet is left as it was


def test_every_gateways_measured_requests_count_together() -> None:
    done = [0.51, 1.53, math.nan]
    a = Records([0.5, 1.5, 2.0], [0, 0, 0], [0.5, 1.5, 2.0], done, [HTTP_OK, GRPC_OK, "timeout"], ["x", "y", ""])
    b = Records([1.2], [0], [1.2], [1.21], [HTTP_OK], ["x"])
    latencies, errors, hosts = merged([a, b], warmup_s=1.0)
    assert latencies == pytest.approx([30.0, 10.0])
    assert errors == {"timeout": 1} and hosts == {"y": 1, "x": 1}


def test_invalid_arguments_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["-s", "mixed_sizes", "--gateways", "1"])
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(scenario_data(fleet={**scenario_data()["fleet"], "picker": {"workers": 0}})))
    assert main(["-s", str(path)]) == 2
    assert "workers" in capsys.readouterr().err


@pytest.mark.e2e
def test_the_gateways_bench_runs_two_gateways_sharing_their_loads(tmp_path: Path) -> None:
    data = scenario_data(name="smoke", fleet={**scenario_data()["fleet"], "models": [{"name": "timed_batch"}]})
    data["load"]["mix"] = [{"model": "timed_batch", "shape": [1, 4]}]
    scenario_file = tmp_path / "smoke.yaml"
    scenario_file.write_text(yaml.safe_dump(data))
    out = tmp_path / "gateways.json"
    argv = ["-m", "benchmarks.gateways", "-s", str(scenario_file), "--variants", "sharing", "-o", str(out)]
    result = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=240, check=False)
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    (run,) = json.loads(out.read_text())["runs"]
    assert run["variant"] == "sharing" and run["gateways"] == 2 and run["errors"] == {}
    assert run["ok"] > 80 and run["notes"] == []
