"""The placement simulator (benchmarks/sim/placement.py) at 10 hosts over 4 simulated minutes: the real plan()
on inputs built by the real build_inputs(), structure and invariants only (its numbers are the benchmark's)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks.sim.placement import MODELS, Options, compare, main

TINY = Options(hosts=10, duration_s=240.0, seed=3)


@pytest.fixture(scope="module")
def result() -> dict[str, Any]:
    return compare(TINY)


def test_no_request_fails_and_no_budget_is_exceeded(result: dict[str, Any]) -> None:
    on = result["on"]
    assert on["requests"] > 1000
    assert on["failed"] == 0, on["failed_by_kind"]
    assert on["lost_on_unload"] == 0
    assert on["budget_overshoot_bytes"] == 0
    assert result["off"]["requests"] == on["requests"]  # the same arrivals


def test_the_controller_loads_the_hot_model_and_unloads_the_cold_one(result: dict[str, Any]) -> None:
    on, off = result["on"], result["off"]
    rounds = [a for a in on["actions"] if a["round"] > 0]  # the controller's, not scale from zero's
    assert any(a["kind"] == "load" and a["model"] == "code" for a in rounds)
    assert any(a["kind"] == "unload" and a["model"] == "chat" for a in rounds)
    assert on["copies_over_time"][-1]["code"] > on["copies_over_time"][0]["code"]
    # Off: only the picker's scale from zero loads (the model that starts from zero), nothing is unloaded.
    assert {a["model"] for a in off["actions"]} <= {"rerank"}
    assert off["unloads"] == 0


def test_changes_do_not_flap(result: dict[str, Any]) -> None:
    for name, counts in result["on"]["changes"].items():
        assert counts["opposite_within_cooldown"] == 0, name


def test_report_structure(result: dict[str, Any]) -> None:
    on = result["on"]
    names = {m.name for m in MODELS}
    assert set(on["p99_ms_by_window"]) == names
    windows = int(TINY.duration_s / TINY.window_s)
    assert all(len(v) == windows for v in on["p99_ms_by_window"].values())
    assert all(names <= set(sample) for sample in on["copies_over_time"])
    assert set(on["recovery_s"]) == set(result["p99_after_shift_off_over_on"]) == {"code", "rerank"}
    assert on["rounds"] and all("t" in r and r["models"] for r in on["rounds"])


def test_a_seed_repeats_exactly(result: dict[str, Any]) -> None:
    again = compare(TINY)
    for mode in ("on", "off"):
        a = {k: v for k, v in result[mode].items() if k != "wall_s"}
        b = {k: v for k, v in again[mode].items() if k != "wall_s"}
        assert a == b


def test_main_writes_the_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sim-placement.json"
    assert main(["--hosts", "10", "--duration", "120", "--quiet", "-o", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["command"].startswith("python -m benchmarks.sim.placement --hosts 10")
    assert written["on"]["failed"] == 0
    assert "controller on" in capsys.readouterr().out
