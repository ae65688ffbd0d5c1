"""``python -m benchmarks.placement``: the scenario, the loads, and the report (windows, back under the SLO,
the controller's changes from its log lines, changes per cool-down window, copies over time, the budget
check, the comparison) on synthetic records and log lines. No server is started; no timing is asserted."""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import pytest
import yaml

from benchmarks import placement
from benchmarks.loadgen import Records
from benchmarks.placement import (
    Change,
    Sample,
    back_under_s,
    budget_check,
    compare,
    controller_changes,
    controller_notes,
    copies_timeline,
    excursions,
    most_changes_per_window,
    parse_placement_scenario,
    reversals,
    shift_load,
    steady_load,
    windows,
)
from benchmarks.routing import ScenarioError

START = 1_700_000_000.0


def scenario_data(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(placement.DEFAULT_SCENARIO.read_text(encoding="utf-8"))
    data.update(overrides)
    return data


def records(rows: Sequence[tuple[float, float, str, str]]) -> Records:
    """Records of one mix entry from (intended, done, status, host) rows."""
    n = len(rows)
    return Records(
        intended=[r[0] for r in rows],
        entry=[0] * n,
        sent=[r[0] for r in rows],
        done=[r[1] for r in rows],
        status=[r[2] for r in rows],
        host=[r[3] for r in rows],
        retry_after=[""] * n,
    )


def log_line(event: str, at: float, **fields: Any) -> str:
    stamp = dt.datetime.fromtimestamp(START + at, dt.UTC).isoformat().replace("+00:00", "Z")
    return json.dumps({"event": event, "timestamp": stamp, "level": "info", **fields})


def action(at: float, kind: str, model: str, host: str) -> str:
    reason = f"{kind} {model} on {host}"
    return log_line("placement_action", at, action=kind, model=model, host=host, outcome="done", reason=reason)


# ------------------------------------------------------------------------------------------ the scenario


def test_shipped_scenario_is_valid_and_b_starts_on_one_host() -> None:
    scenario = placement.load_placement_scenario(placement.DEFAULT_SCENARIO)
    b_hosts = [h["name"] for h in scenario.fleet["hosts"] if scenario.model_b.model in h["launch"]["models"]]
    assert b_hosts == ["g1"]
    assert scenario.budget_host == "g3"
    assert scenario.fleet["placement"]["host_memory_bytes"] == {"g3": "2GiB"}


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"model_b": {"model": "mlp_classifier"}}, "key model_b.model: 'mlp_classifier' is not under"),
        ({"model_b": {"model": "embed_normalize"}}, "model_a and model_b must be different models"),
        ({"budget_host": "nope"}, "key budget_host: 'nope' is not a host of the fleet"),
        ({"rate_rps": 0}, "key rate_rps: Input should be greater than 0"),
    ],
)
def test_scenario_errors_name_the_key(overrides: dict[str, Any], expected: str) -> None:
    with pytest.raises(ScenarioError) as info:
        parse_placement_scenario(scenario_data(**overrides), "s.yaml")
    assert expected in str(info.value)


def test_b_must_start_on_exactly_one_host() -> None:
    data = scenario_data()
    data["fleet"]["hosts"][1]["launch"]["models"].append("timed_batch")
    with pytest.raises(ScenarioError, match="must be launched on exactly one host, not \\['g1', 'g2'\\]"):
        parse_placement_scenario(data, "s.yaml")


def test_shift_load_moves_the_rate_from_a_to_b_at_the_shift() -> None:
    scenario = parse_placement_scenario(scenario_data(shift_s=10, after_s=30, b_before_rps=2), "s.yaml")
    load = shift_load(scenario)
    spans = {e.label: (e.model, e.rate_rps, e.start_s, e.stop_s) for e in load.mix}
    assert spans == {
        "a": ("embed_normalize", scenario.rate_rps, 0.0, 10.0),
        "b": ("timed_batch", scenario.rate_rps, 10.0, 40.0),
        "b-before": ("timed_batch", 2.0, 0.0, 10.0),
    }
    assert load.warmup_s == 0 and load.total_s == 40
    steady = steady_load(scenario, 300)
    assert [(e.label, e.rate_rps, e.start_s, e.stop_s) for e in steady.mix] == [
        ("b", scenario.rate_rps, 10.0, None),
        ("b-before", 2.0, 0.0, 10.0),
    ]
    assert steady.total_s == 310


# --------------------------------------------------------------------------------------------- the report


def test_windows_count_failures_as_the_timeout_and_count_serving_hosts() -> None:
    rows = [(10.0 + k * 0.1, 10.05 + k * 0.1, "http 200", "h1" if k % 2 else "h2") for k in range(40)]
    rows += [(15.5, 15.6, "timeout", ""), (16.0, 16.2, "http 200", "h1")]
    out = windows(records(rows), range(len(rows)), 10.0, 20.0, 5.0, timeout_s=30.0)
    assert [(w["start_s"], w["end_s"], w["requests"], w["failed"], w["hosts"]) for w in out] == [
        (0.0, 5.0, 40, 0, 2),
        (5.0, 10.0, 2, 1, 1),
    ]
    assert out[0]["p99_ms"] == pytest.approx(50.0)
    assert out[1]["p99_ms"] == 30_000.0


def test_back_under_the_slo_is_the_first_window_that_stays_under_for_hold_s() -> None:
    def w(start: float, p99: float, n: int = 10) -> dict[str, Any]:
        return {"start_s": start, "end_s": start + 5, "requests": n, "p99_ms": p99}

    series = [w(0, 900), w(5, 300), w(10, 800), w(15, 200), w(20, 100), w(25, 150), w(30, 700), w(35, 100)]
    assert back_under_s(series, 500, hold_s=15) == 15.0
    assert excursions(series, 15.0, 500) == 1  # the window at 30 s
    assert back_under_s(series, 500, hold_s=0) == 5.0
    assert back_under_s(series, 500, hold_s=25) is None  # 15-40 holds a window over it
    assert back_under_s([w(0, 100), w(5, 200)], 500, hold_s=10) == 0.0
    assert back_under_s([w(0, 900), w(5, 100)], 500, hold_s=10) is None  # not observed for 10 s
    # An empty window proves nothing either way.
    assert back_under_s([w(0, 900), w(5, math.nan, 0), w(10, 100)], 500, hold_s=5) == 10.0
    assert back_under_s([], 500, hold_s=0) is None
    assert excursions(series, None, 500) == 0


def test_controller_changes_group_one_rounds_actions_per_model() -> None:
    lines = [
        log_line("placement_round", 1.0, actions=0),
        action(12.0, "load", "b", "g2"),
        action(12.1, "load", "b", "g3"),
        action(12.2, "unload", "a", "g1"),
        "not json",
        log_line("placement_round", 12.5, actions=3),
        action(30.0, "unload", "b", "g3"),
        log_line("placement_round", 30.5, actions=1),
        action(40.0, "load", "b", "g3"),  # its round never ended: the controller was stopped
    ]
    changes = controller_changes(lines, START)
    assert changes == [
        Change(12.2, "a", "unload", ("g1",), ("done",), "unload a on g1"),
        Change(12.0, "b", "load", ("g2", "g3"), ("done", "done"), "load b on g2"),
        Change(30.0, "b", "unload", ("g3",), ("done",), "unload b on g3"),
    ]
    assert most_changes_per_window(changes, 60.0) == {"a": 1, "b": 2}
    assert most_changes_per_window(changes, 18.0) == {"a": 1, "b": 1}
    assert reversals(changes, 60.0) == 1
    assert reversals(changes, 18.0) == 0


def test_controller_notes_count_waiting_scale_downs_and_list_footprints() -> None:
    lines = [
        log_line("placement_scale_down_waiting", 1.0, model="b", low_for_s=0.0),
        log_line("placement_scale_down_waiting", 2.0, model="b", low_for_s=1.0),
        log_line("placement_scale_down_waiting", 9.0, model="b", low_for_s=0.0),
        "not json",
        log_line(
            "placement_footprint", 10.0, model="b", host="g2", counted=True, delta_bytes=5, memory="cpu", why="learned"
        ),
    ]
    assert controller_notes(lines) == {
        "scale_downs_waiting": {"b": {"rounds": 3, "longest_low_s": 1.0}},
        "footprints": [
            {"model": "b", "host": "g2", "counted": True, "delta_bytes": 5, "memory": "cpu", "why": "learned"}
        ],
    }


def test_copies_timeline_keeps_the_samples_where_a_count_changed() -> None:
    samples = [
        Sample(START - 1, {"g1": ["a", "b"], "g2": ["a"]}),
        Sample(START + 5, {"g1": ["a", "b"], "g2": ["a"]}),
        Sample(START + 12, {"g1": ["a", "b"], "g2": ["a", "b"]}),
        Sample(START + 15, {"g1": ["b"], "g2": ["a", "b"]}),
        Sample(START + 20, {"g1": ["b"], "g2": ["a", "b"]}),
    ]
    assert copies_timeline(samples, START, ["a", "b"]) == [
        {"t_s": -1.0, "a": 2, "b": 1},
        {"t_s": 12.0, "a": 2, "b": 2},
        {"t_s": 15.0, "a": 1, "b": 2},
        {"t_s": 20.0, "a": 1, "b": 2},
    ]


def test_budget_check_holds_only_without_actions_or_changes_there() -> None:
    key = 'extproc_placement_unplaced_copies{model="b",tier="gpu"}'
    samples = [
        Sample(START, {"g1": ["b"], "g3": ["x", "y"]}, {key: 0.0}),
        Sample(START + 1, {"g1": ["b"], "g3": ["x", "y"]}, {key: 1.0}),
    ]
    elsewhere = [Change(1.0, "b", "load", ("g2",), ("done",))]
    held = budget_check(samples, elsewhere, "g3", "b")
    assert held == {
        "host": "g3",
        "models_seen": [["x", "y"]],
        "actions_there": [],
        "most_unplaced_copies": 1.0,
        "held": True,
        "tested": True,
    }
    assert budget_check(samples[:1], elsewhere, "g3", "b")["tested"] is False  # no demand beyond the others
    there = [Change(1.0, "b", "load", ("g2", "g3"), ("done", "done"))]
    assert budget_check(samples, there, "g3", "b")["held"] is False
    changed = [*samples, Sample(START + 2, {"g3": ["b", "x", "y"]})]
    assert budget_check(changed, elsewhere, "g3", "b")["held"] is False


def test_compare_checks_the_issues_targets() -> None:
    off = {"b_p99_after_shift_ms": 30_000.0, "b_back_under_slo_s": None, "failed": 0}
    budget = {"held": True, "tested": True}
    on = {"b_p99_after_shift_ms": 1_500.0, "b_back_under_slo_s": 10.0, "failed": 0, "budget": budget}
    out = compare({"controller-off": off, "controller-on": on}, 500.0)
    assert out["b_p99_ratio_off_over_on"] == 20.0
    assert out["checks"] == {
        "ratio_at_least_3": True,
        "back_under_500_ms_within_30_s": True,
        "no_failed_request_with_controller": True,
        "budget_held_under_demand": True,
    }
    slow = {
        **on, "b_p99_after_shift_ms": 12_000.0, "b_back_under_slo_s": 35.0, "failed": 2,
        "budget": {"held": True, "tested": False},
    }  # fmt: skip
    failed = compare({"controller-off": off, "controller-on": slow}, 500.0)["checks"]
    assert not any(failed.values())


def test_the_tables_show_each_window_change_and_check() -> None:
    window = {"start_s": 0.0, "end_s": 5.0, "requests": 10, "failed": 0, "hosts": 2}
    mode = {
        "b_windows": [{**window, "p99_ms": 900.0}, {**window, "start_s": 5.0, "end_s": 10.0, "p99_ms": 120.0}],
        "b_p99_after_shift_ms": 800.0,
        "b_p50_after_shift_ms": 70.0,
        "b_back_under_slo_s": 5.0,
        "b_windows_over_slo_after": 0,
        "failed": 0,
        "requests": 20,
        "changes": [asdict(Change(23.2, "b", "load", ("g2",), ("done",)))],
        "copies": [{"t_s": -1.0, "a": 2, "b": 1}],
        "budget": {"host": "g3", "models_seen": [["x", "y"]], "actions_there": [], "most_unplaced_copies": 1.0},
    }
    comparison = {"b_p99_ratio_off_over_on": 17.8, "checks": {"ratio_at_least_3": True}}
    text = placement.format_shift({"controller-on": mode}, comparison)
    assert "      900        120" in text
    assert "t=  23.2 s  load   b                g2  ('done',)" in text
    assert "budget host g3: models [['x', 'y']], actions there 0, most unplaced copies of B 1" in text
    assert "off / on: 17.8x" in text and "ratio_at_least_3: True" in text
    steady = {
        "requests": 20, "failed": 0, "b_p99_ms": 100.0, "cooldown_s": 60.0,
        "most_changes_per_cooldown_window": {"b": 1}, "reversals_within_cooldown": 0,
        "changes_after_first_cooldown": 0, "changes": mode["changes"], "copies": mode["copies"],
        "budget": mode["budget"], "checks": {"at_most_one_change_per_model_per_cooldown": True},
    }  # fmt: skip
    text = placement.format_steady(steady)
    assert "most changes per model in any 60 s window: {'b': 1}" in text
    assert "copies: t_s -1.0, a 2, b 1" in text and "actions there 0" in text
