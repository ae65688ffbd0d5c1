"""``python -m benchmarks.capacity``: the rate search, a probe's verdict, the probe's load, the report, and one
tiny end-to-end search over real Triton hosts, Envoy and the picker."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from benchmarks import capacity, loadgen
from benchmarks.capacity import ERRORS, GENERATOR, OVER_SLO, PASS, RateSearch, SearchSettings, judge, probe_load
from benchmarks.loadgen import LoadSpec, Records
from benchmarks.routing import Policy

REPO = Path(__file__).resolve().parent.parent


def new_search(**overrides: float) -> RateSearch:
    values = {"start": 300, "min_rps": 10, "max_rps": 2000, "growth": 1.5, "resolution": 0.05, "max_probes": 30}
    values.update(overrides)
    return RateSearch(
        values["start"],
        values["min_rps"],
        values["max_rps"],
        values["growth"],
        values["resolution"],
        int(values["max_probes"]),
    )


def drive(search: RateSearch, capacity_rps: float) -> list[float]:
    """Run the search against a policy that passes at and below ``capacity_rps``; the rates probed."""
    rates = []
    while (rate := search.next_rate()) is not None:
        rates.append(rate)
        search.record(rate, PASS if rate <= capacity_rps else OVER_SLO)
    return rates


@pytest.mark.parametrize("true_capacity", [12.0, 140.0, 300.0, 517.0, 1800.0])
def test_search_brackets_then_bisects_to_the_resolution(true_capacity: float) -> None:
    search = new_search()
    rates = drive(search, true_capacity)
    assert rates[0] == 300
    assert len(set(rates)) == len(rates)
    assert search.low is not None and search.high is not None
    assert search.low <= true_capacity < search.high
    assert search.high - search.low <= max(0.05 * search.low, 1.0)
    assert search.capacity_rps == search.low
    assert search.limited_by == OVER_SLO


def test_search_ends_at_its_bounds() -> None:
    top = new_search(max_rps=500)
    assert drive(top, 10_000) == [300, 450, 500]
    assert (top.capacity_rps, top.limited_by) == (500, "max_rps")
    bottom = new_search(min_rps=100)
    assert drive(bottom, 0) == [300, 200, 133, 100]
    assert (bottom.capacity_rps, bottom.limited_by) == (0.0, "min_rps")
    short = new_search(max_probes=3)
    drive(short, 517)
    assert short.probes == 3 and short.limited_by == "max_probes"


def test_a_lagging_generator_is_retried_once_then_bounds_the_search() -> None:
    search = new_search()
    search.record(300, PASS)
    assert search.next_rate() == 450
    search.record(450, GENERATOR)
    # Once: the same rate again, the bounds unchanged.
    assert (search.low, search.high, search.next_rate()) == (300, None, 450)
    search.record(450, GENERATOR)
    assert (search.low, search.high, search.high_verdict) == (300, 450, GENERATOR)
    assert search.next_rate() == 375
    search.record(375, ERRORS)
    assert search.high_verdict == ERRORS


def test_policies_take_turns() -> None:
    policies = [Policy.LEAST_REQUEST, Policy.BASELINE, Policy.PICKER]
    assert [capacity.rotated(policies, k)[0] for k in range(4)] == [*policies, policies[0]]


def records(latencies_ms: list[float], statuses: list[str] | None = None, lag_ms: float = 0.0) -> Records:
    n = len(latencies_ms)
    intended = [1.0 + i * 0.01 for i in range(n)]
    return Records(
        intended=intended,
        entry=[0] * n,
        sent=[t + lag_ms / 1e3 for t in intended],
        done=[t + lat / 1e3 for t, lat in zip(intended, latencies_ms, strict=True)],
        status=statuses or ["http 200"] * n,
        host=[""] * n,
        retry_after=[""] * n,
    )


def test_judge() -> None:
    fast = [10.0] * 99 + [90.0]
    assert judge(records(fast), 0.0, 100.0, 10.0).verdict == PASS
    slow = judge(records([10.0] * 98 + [150.0, 160.0]), 0.0, 100.0, 10.0)
    assert (slow.verdict, slow.requests, slow.ok, slow.errors) == (OVER_SLO, 100, 100, {})
    assert slow.p99_ms == pytest.approx(150.0) and slow.max_ms == pytest.approx(160.0)
    assert slow.lag_p99_ms == pytest.approx(0.0, abs=1e-6)
    # Errors count after the warm-up, as latencies do; the warm-up's are reported apart.
    statuses = ["http 429"] + ["http 200"] * 98 + ["timeout"]
    failed = judge(records(fast, statuses), 1.005, 100.0, 10.0)
    assert (failed.verdict, failed.requests, failed.ok) == (ERRORS, 99, 98)
    assert (failed.errors, failed.warmup_errors) == ({"timeout": 1}, {"http 429": 1})
    warm = judge(records(fast, ["http 429"] + ["http 200"] * 99), 1.005, 100.0, 10.0)
    assert (warm.verdict, warm.errors, warm.warmup_errors) == (PASS, {}, {"http 429": 1})
    assert judge(records(fast, lag_ms=20.0), 0.0, 100.0, 10.0).verdict == GENERATOR
    assert judge(records(fast, lag_ms=20.0), 0.0, 100.0, 30.0).verdict == PASS


def test_lag_limit_follows_the_slo() -> None:
    assert SearchSettings(slo_ms=100).lag_limit_ms == 10
    assert SearchSettings(slo_ms=20).lag_limit_ms == loadgen.LAG_BEHIND_MS
    assert SearchSettings(slo_ms=100, max_lag_ms=3).lag_limit_ms == 3


def test_probe_load_scales_the_scenario_load() -> None:
    load = LoadSpec.model_validate(
        {
            "rate_rps": 300,
            "duration_s": 25,
            "warmup_s": 5,
            "seed": 4,
            "mix": [
                {"model": "m", "weight": 3},
                {"model": "m", "name": "side", "rate_rps": 30},
            ],
        }
    )
    probe = probe_load(load, 450, SearchSettings(warmup_s=1, duration_s=4, timeout_s=2))
    assert (probe.rate_rps, probe.warmup_s, probe.duration_s, probe.timeout_s, probe.seed) == (450, 1, 4, 2, 4)
    assert probe.mix[0] == load.mix[0]
    assert probe.mix[1].rate_rps == pytest.approx(45)
    assert probe_load(load, 450, SearchSettings()).timeout_s == load.timeout_s


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="min_rps"):
        SearchSettings(min_rps=100, max_rps=50)
    with pytest.raises(ValueError, match="start_rps"):
        SearchSettings(start_rps=5000, max_rps=1000)


def test_bad_options_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert capacity.main(["-s", "heterogeneous", "--growth", "1"]) == 2
    assert "growth" in capsys.readouterr().err
    assert capacity.main(["-s", "slowdown"]) == 2
    assert "key slowdowns" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- end to end


@pytest.mark.e2e
def test_capacity_search_end_to_end(tmp_path: Path) -> None:
    fleet = {
        "model_repository": str(REPO / "triton_models"),
        "hosts": [
            {"name": "fast", "address": "127.0.0.1", "tier": "gpu", "launch": {"models": ["timed_batch"]}},
            {
                "name": "slow",
                "address": "127.0.0.1",
                "tier": "gpu",
                "launch": {"models": ["timed_batch"], "service_time_factor": 2},
            },
        ],
        "models": [{"name": "timed_batch", "tiers": ["gpu"]}],
    }
    load = {"rate_rps": 20, "duration_s": 3, "seed": 5, "mix": [{"model": "timed_batch", "shape": [1, 4]}]}
    scenario_file = tmp_path / "smoke.yaml"
    scenario_file.write_text(yaml.safe_dump({"name": "smoke", "fleet": fleet, "load": load}))
    out = tmp_path / "results" / "capacity.json"
    # A generous SLO and lag limit and a two-step range: the search ends at --max-rps whatever the machine's
    # other load.
    command = [
        *("-s", str(scenario_file), "--policies", "least_request", "picker", "--slo-ms", "5000"),
        *("--max-lag-ms", "1000", "--start-rps", "20", "--max-rps", "30", "--warmup-s", "0.5"),
        *("--duration-s", "1", "-o", str(out)),
    ]
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.capacity", *command],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    assert "[bench capacity] step 0: least_request 20 req/s" in result.stderr  # progress lines
    assert "picker_capacity_over_least_request: 1.00" in result.stdout
    assert "p99 (ms) of each probe" in result.stdout
    report = json.loads(out.read_text())
    assert report["command"].startswith("python -m benchmarks.capacity -s ")
    assert report["build"] in ("compiled", "pure")
    assert report["machine"]["cpus"] and len(report["machine"]["loadavg_after"]) == 3
    assert [p["policy"] for p in report["policies"]] == ["least_request", "picker"]
    for policy in report["policies"]:
        assert [p["rate_rps"] for p in policy["probes"]] == [20, 30]
        assert (policy["capacity_rps"], policy["limited_by"]) == (30, "max_rps")
        assert policy["bracket_rps"] == [30, None]
        for probe in policy["probes"]:
            assert probe["requests"] > 0 and probe["errors"] == {} and probe["verdict"] == PASS
            assert probe["p99_ms"] > 0 and not math.isnan(probe["stack_cores"])


def test_report_table() -> None:
    def probe(rate: float, p99: float, verdict: str) -> dict[str, object]:
        return {"rate_rps": rate, "p99_ms": p99, "verdict": verdict}

    report = {
        "scenario": "s",
        "build": "pure",
        "machine": {"cpus": 2},
        "settings": {"slo_ms": 100, "duration_s": 10, "warmup_s": 3},
        "policies": [
            {
                "policy": "least_request",
                "capacity_rps": 50,
                "limited_by": "max_probes",
                "bracket_rps": [50, 60],
                "p99_at_capacity_ms": 90.0,
                "ceiling_machine_saturated": False,
                "probes": [probe(300, 150.0, OVER_SLO), probe(60, 400.0, GENERATOR), probe(60, 101.0, OVER_SLO)],
            },
            {
                "policy": "picker",
                "capacity_rps": 300,
                "limited_by": OVER_SLO,
                "bracket_rps": [300, 450],
                "p99_at_capacity_ms": 50.0,
                "ceiling_machine_saturated": True,
                "probes": [probe(300, 50.0, PASS), probe(450, 120.0, OVER_SLO)],
            },
        ],
        "comparisons": capacity.comparisons(
            [{"policy": "least_request", "capacity_rps": 50}, {"policy": "picker", "capacity_rps": 300}]
        ),
    }
    text = capacity.format_report(report)
    assert "capacity in [50, 60)" in text
    assert "p99 over the SLO at 450 req/s, on a saturated machine" in text
    assert "picker_capacity_over_least_request: 6.00" in text
    assert "400.0 lag, 101.0 x" in text
