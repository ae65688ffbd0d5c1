"""Demand-driven placement: the decision (extproc/placement/plan.py) without Triton, its inputs from a
picker's status and metrics, the ``placement`` settings, and the controller acting through the model
operations against the fakes of tests/test_models_ops.py."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from extproc.cli import _parser
from extproc.config import ConfigError, Fleet, HostSpec, PlacementSpec, Tier, parse_fleet
from extproc.ops.status import ModelBatching, ModelLoad, PickerHost, PickerStatus, parse_overload, parse_picker_status
from extproc.ops.triton_api import READY
from extproc.placement.command import Controller, pause_reason
from extproc.placement.explain import explain_json, format_explain
from extproc.placement.footprints import KEEP, SETTLE_S, Footprints, MemoryReading, Outcome, parse_memory
from extproc.placement.inputs import Demand, DemandMeter, build_inputs, copy_capacity
from extproc.placement.metrics import PlacementMetrics
from extproc.placement.plan import HostInput, ModelInput, Plan, TierInput, footprint, plan
from tests.test_models_ops import FLEET, REPOSITORY, FakePicker, World, ops_for, world

GIB = 2**30


def settings(**kw: Any) -> PlacementSpec:
    return PlacementSpec.model_validate({"enabled": True, **kw})


def hosts(n: int = 4, tier: str = "gpu", **kw: Any) -> list[HostInput]:
    defaults: dict[str, Any] = {"available": frozenset({"m", "n", "o"})}
    return [HostInput(name=f"h{i}", tier=tier, **(defaults | kw)) for i in range(n)]


def model(
    copies: Sequence[str] = ("h0",), rate: float | None = 10.0, cap: float | None = 10.0, **kw: Any
) -> ModelInput:
    """A model whose demand has been low for long already, unless ``low_since`` says otherwise: the tests of
    what a scale-down does start where its window (scale_down_after_s) has passed."""
    kw.setdefault("low_since", -1e9)
    kw.setdefault("low_most", 0)
    return ModelInput(name=kw.pop("name", "m"), rate_rps=rate, capacity_rps=cap, copies=tuple(copies), **kw)


def with_copies(hs: list[HostInput], name: str, copies: Sequence[str]) -> list[HostInput]:
    return [replace(h, models=h.models | {name}) if h.name in copies else h for h in hs]


def loads(p: Plan) -> list[str]:
    return [a.host for a in p.actions if a.kind == "load"]


def unloads(p: Plan) -> list[str]:
    return [a.host for a in p.actions if a.kind == "unload"]


# --- the decision ---------------------------------------------------------------------------------------


def test_scales_up_to_demand_over_capacity_at_target() -> None:
    hs = with_copies(hosts(), "m", ["h0"])
    # 20 req/s, 10 req/s per copy at 0.7: ceil(20 / 7) = 3 copies.
    p = plan([model(rate=20.0)], hs, settings(max_concurrent_changes=5), now=0.0)
    d = p.decisions[0]
    assert (d.current, d.desired) == (1, 3)
    assert len(loads(p)) == 2 and "h0" not in loads(p)
    assert "20.0 req/s / (10.0 x 0.7) = 3" in p.actions[0].reason


def test_hysteresis_and_cool_down_keep_a_steady_load_from_flapping() -> None:
    s = settings(max_concurrent_changes=5)
    copies = ["h0", "h1", "h2"]
    hs = with_copies(hosts(), "m", copies)
    # 3 copies at 5 req/s each 10 req/s: utilization 0.5 is between 0.35 and 0.7: hold.
    for _ in range(10):
        assert plan([model(copies, rate=15.0)], hs, s, now=0.0).actions == ()
    # Below the lower bound, but within the cool-down of the last change: held.
    m = model(copies, rate=8.0, last_change=100.0)
    held = plan([m], hs, s, now=200.0)
    assert held.actions == () and held.decisions[0].desired == 2 and "cool-down" in (held.decisions[0].held or "")
    # After the cool-down: one copy goes (ceil(8 / 7) = 2).
    after = plan([m], hs, s, now=100.0 + s.cooldown_s + 1)
    assert len(unloads(after)) == 1
    # With the copy gone and the load unchanged (8 req/s on 2 copies, 0.4): nothing more, ever.
    left = [c for c in copies if c not in unloads(after)]
    hs2 = with_copies(hosts(), "m", left)
    for t in range(10):
        assert plan([model(left, rate=8.0, last_change=1000.0)], hs2, s, now=1000.0 + 1000 * t).actions == ()


def test_scale_up_waits_for_its_shorter_cool_down() -> None:
    s = settings(up_cooldown_s=30, cooldown_s=300)
    hs = with_copies(hosts(), "m", ["h0"])
    assert plan([model(rate=20.0, last_change=0.0)], hs, s, now=10.0).actions == ()
    assert loads(plan([model(rate=20.0, last_change=0.0)], hs, s, now=31.0))


def test_never_unloads_the_last_copy_of_a_model_with_traffic() -> None:
    s = settings(models={"m": {"min_copies": 0}}, cooldown_s=0)
    hs = with_copies(hosts(), "m", ["h0"])
    kept = plan([model(rate=0.01, cap=1000.0)], hs, s, now=0.0)
    assert kept.actions == () and kept.decisions[0].desired == 1
    # Unknown demand counts as traffic too.
    assert plan([model(rate=None)], hs, s, now=0.0).actions == ()
    # No traffic at all and min_copies 0: the last copy may go.
    assert unloads(plan([model(rate=0.0)], hs, s, now=0.0)) == ["h0"]


def test_no_demand_scales_down_without_a_measured_capacity() -> None:
    s = settings(cooldown_s=0)
    hs = with_copies(hosts(), "m", ["h0", "h1"])
    idle = plan([model(["h0", "h1"], rate=0.0, cap=None)], hs, s, now=0.0)
    assert idle.decisions[0].desired == 1 and len(unloads(idle)) == 1
    assert idle.decisions[0].reason.startswith("no demand: below 0.35 utilization; low for ")
    assert idle.decisions[0].reason.endswith("at most 0 wanted; min 1 over its tiers")
    # Unknown demand, or a controller told never to scale down (scale_down_utilization 0): kept.
    assert plan([model(["h0", "h1"], rate=None, cap=None)], hs, s, now=0.0).actions == ()
    assert (
        plan([model(["h0", "h1"], rate=0.0, cap=None)], hs, settings(scale_down_utilization=0), now=0.0).actions == ()
    )


def test_min_copies_over_tiers_keep_the_default_tiers_copy() -> None:
    s = settings(cooldown_s=0)
    # Neither tier has demand; min_copies 1 over its tiers: the copy of its default tier (cpu) stays.
    hs = [
        HostInput("c", "cpu", models=frozenset({"m"}), in_flight=0.0),
        HostInput("g", "gpu", models=frozenset({"m"}), in_flight=5.0),
    ]
    p = plan([model(["c", "g"], rate=0.0, tiers=("cpu", "gpu"))], hs, s, now=0.0)
    assert unloads(p) == ["g"] and p.actions[0].reason.startswith("gpu: 1 -> 0 copies (no demand")
    assert {d.tier: d.desired for d in p.decisions} == {"cpu": 1, "gpu": 0}
    assert unloads(plan([model(["c", "g"], rate=0.0, tiers=("gpu", "cpu"))], hs, s, now=0.0)) == ["c"]


def test_a_memory_budget_for_two_models_never_gets_a_third() -> None:
    s = settings(default_footprint_bytes=GIB, max_concurrent_changes=10)
    # h0 has room for two 1 GiB models and holds one; h1 is full.
    hs = [
        HostInput("h0", "gpu", budget_bytes=2 * GIB, used_bytes=GIB, memory_source="declared",
                  models=frozenset({"m"}), available=frozenset({"m", "n", "o"})),
        HostInput("h1", "gpu", budget_bytes=2 * GIB, used_bytes=2 * GIB, memory_source="declared",
                  models=frozenset({"m", "x"}), available=frozenset({"m", "n", "o"})),
    ]  # fmt: skip
    busy = [model(name="n", copies=(), rate=50.0), model(name="o", copies=(), rate=50.0)]
    p = plan(busy, hs, s, now=0.0)
    assert [(a.model, a.host) for a in p.actions] == [("n", "h0")]  # the second would be h0's third
    assert "over memory budget" in (p.decisions[1].held or "")


def test_loads_go_to_the_most_headroom_of_the_tier() -> None:
    s = settings(max_concurrent_changes=10)
    hs = [
        HostInput("c0", "cpu", budget_bytes=64 * GIB, available=frozenset({"m"})),
        HostInput("g0", "gpu", budget_bytes=8 * GIB, used_bytes=6 * GIB, available=frozenset({"m"})),
        HostInput("g1", "gpu", budget_bytes=8 * GIB, used_bytes=2 * GIB, available=frozenset({"m"})),
        HostInput("g2", "gpu", budget_bytes=8 * GIB, available=frozenset()),  # not in its repository
    ]
    p = plan([model(copies=(), rate=100.0, tiers=("gpu",))], hs, s, now=0.0)
    assert loads(p) == ["g1", "g0"]  # never the cpu tier, never where the repository lacks it
    # Demand of its default tier (no copy: all of it) loads on that tier only, however much more it wants.
    p = plan([model(copies=(), rate=100.0, tiers=("gpu", "cpu"))], hs, s, now=0.0)
    assert loads(p) == ["g1", "g0"] and p.decisions[0].unplaced == 13


def test_labels_and_routability_limit_where_it_loads() -> None:
    s = settings(models={"m": {"labels": {"speed": "fast"}}}, max_concurrent_changes=10)
    hs = [
        HostInput("a", "gpu", labels={"speed": "fast"}, available=frozenset({"m"})),
        HostInput("b", "gpu", labels={"speed": "slow"}, available=frozenset({"m"})),
        HostInput("c", "gpu", labels={"speed": "fast"}, available=frozenset({"m"}), routable=False),
    ]
    assert loads(plan([model(copies=(), rate=100.0)], hs, s, now=0.0)) == ["a"]


def test_pinned_copies_are_never_unloaded() -> None:
    s = settings(models={"m": {"min_copies": 1, "pinned": ["h0", "h1"]}}, cooldown_s=0)
    hs = with_copies(hosts(), "m", ["h0", "h1", "h2"])
    p = plan([model(["h0", "h1", "h2"], rate=0.5)], hs, s, now=0.0)
    assert unloads(p) == ["h2"]
    assert "pinned" in (p.decisions[0].held or "")


def test_unloads_the_least_loaded_then_slowest_copy() -> None:
    s = settings(cooldown_s=0)
    hs = [
        HostInput("a", "gpu", models=frozenset({"m"}), in_flight=3.0, service_ms=1.0),
        HostInput("b", "gpu", models=frozenset({"m"}), in_flight=0.0, service_ms=1.0),
        HostInput("c", "gpu", models=frozenset({"m"}), in_flight=0.0, service_ms=5.0),
    ]
    assert unloads(plan([model(["a", "b", "c"], rate=1.0)], hs, s, now=0.0)) == ["c", "b"]


def test_a_saturated_copy_of_unknown_capacity_still_gets_another() -> None:
    """Saturated from its first request, a copy never shows the batch sizes a capacity fit needs; the
    picker refusing requests for load (or a long queue, with queue_ms) still adds a copy."""
    hs = with_copies(hosts(), "m", ["h0"])
    assert loads(plan([model(rate=100.0, cap=None, overloaded=True)], hs, settings(), now=0.0)) == ["h1"]
    queued = model(rate=100.0, cap=None, queue_ms=900.0)
    assert loads(plan([queued], hs, settings(queue_ms=500), now=0.0)) == ["h1"]
    assert loads(plan([model(rate=100.0, cap=None)], hs, settings(), now=0.0)) == []


def test_an_unload_spares_a_host_with_another_models_only_copy() -> None:
    """Unloading drains the host for every model there, and the model operations refuse to strand one:
    the host that holds another model's only routable copy goes last, whatever its load."""
    s = settings(cooldown_s=0)
    hs = [
        HostInput("a", "gpu", models=frozenset({"m", "n"}), in_flight=0.0, service_ms=9.0),
        HostInput("b", "gpu", models=frozenset({"m"}), in_flight=3.0, service_ms=1.0),
    ]
    assert unloads(plan([model(["a", "b"], rate=0.0)], hs, s, now=0.0)) == ["b"]


def test_max_concurrent_changes_defers_the_rest_scale_ups_first() -> None:
    s = settings(max_concurrent_changes=2, cooldown_s=0)
    hs = with_copies(with_copies(hosts(6), "m", ["h0"]), "n", ["h0", "h1", "h2"])
    p = plan([model(rate=40.0), model(name="n", copies=["h0", "h1", "h2"], rate=0.1)], hs, s, now=0.0)
    assert len(p.actions) == 2 and {a.kind for a in p.actions} == {"load"}
    assert p.deferred and all(a.model == "m" for a in p.deferred[:3])


def test_min_and_max_copies_bound_the_desired_copies() -> None:
    s = settings(models={"m": {"min_copies": 2, "max_copies": 3}}, max_concurrent_changes=10)
    hs = with_copies(hosts(), "m", ["h0"])
    assert plan([model(rate=0.0)], hs, s, now=0.0).decisions[0].desired == 2
    assert plan([model(rate=1000.0)], hs, s, now=0.0).decisions[0].desired == 3


def test_overload_and_queue_signals_add_a_copy() -> None:
    hs = with_copies(hosts(), "m", ["h0"])
    assert plan([model(rate=5.0, overloaded=True)], hs, settings(), now=0.0).decisions[0].desired == 2
    queued = model(rate=5.0, queue_ms=500.0)
    assert plan([queued], hs, settings(queue_ms=200), now=0.0).decisions[0].desired == 2
    assert plan([queued], hs, settings(), now=0.0).decisions[0].desired == 1


def rounds(
    demands: Sequence[float], copies: Sequence[str], s: PlacementSpec, interval: float = 1.0
) -> list[tuple[float, Plan]]:
    """One plan per demand, ``interval`` seconds apart, each round's low-demand state carried to the next
    as the controller does; copies unloaded or loaded are gone or there at the next round."""
    held = list(copies)
    low: tuple[float | None, int | None] = (None, None)
    out = []
    for k, rate in enumerate(demands):
        now = k * interval
        hs = with_copies(hosts(6), "m", held)
        p = plan([model(held, rate=rate, low_since=low[0], low_most=low[1])], hs, s, now=now)
        d = p.decisions[0]
        low = (d.low_since, d.low_most)
        held = [h for h in held if h not in unloads(p)] + loads(p)
        out.append((now, p))
    return out


def test_one_round_of_low_demand_never_unloads_a_copy() -> None:
    # interval_s 1: a round in which a stalled machine saw no demand, among rounds at 0.5 utilization.
    s = settings(interval_s=1, cooldown_s=0, scale_down_after_s=10)
    seen = rounds([15.0] * 5 + [0.0] + [15.0] * 20, ["h0", "h1", "h2"], s)
    assert [a for _, p in seen for a in p.actions] == []
    stalled = seen[5][1].decisions[0]
    assert (stalled.desired, stalled.held, stalled.low_for_s) == (
        1,
        "scale-down after 10 s of low demand: low for 0 s",
        0.0,
    )
    assert seen[6][1].decisions[0].low_since is None  # demand back: the window starts afresh next time


def test_scale_down_waits_for_its_window_then_goes_to_the_most_any_round_wanted() -> None:
    s = settings(interval_s=1, cooldown_s=0, scale_down_after_s=10, max_concurrent_changes=5)
    # 4 copies of 10 req/s: 8 req/s wants 2 (utilization 0.2), 0 req/s wants 1; both below 0.35.
    seen = rounds([8.0, 0.0] * 5 + [0.0] * 5, ["h0", "h1", "h2", "h3"], s)
    waiting = [p for now, p in seen if now < 10]
    assert all(p.actions == () for p in waiting)
    assert waiting[7].decisions[0].held == "scale-down after 10 s of low demand: low for 7 s"
    now, due = seen[10]
    d = due.decisions[0]
    assert (d.current, d.desired, len(unloads(due))) == (4, 2, 2)
    assert "low for 10 s, at most 2 wanted" in d.reason and d.low_since is None
    # The next scale-down (to 1) waits for a window of its own.
    later = [p for t, p in seen if t > now]
    assert all(p.actions == () for p in later) and later[-1].decisions[0].low_for_s == 3.0


def test_scale_up_stays_immediate_within_a_low_window() -> None:
    s = settings(interval_s=1, up_cooldown_s=0, cooldown_s=0, scale_down_after_s=60)
    seen = rounds([0.0, 0.0, 30.0], ["h0", "h1"], s)
    assert seen[1][1].actions == () and len(loads(seen[2][1])) == 2  # ceil(30 / 7) = 5 wanted, 4 hosts left


def test_the_scale_down_window_defaults_to_four_rounds_and_at_least_a_minute() -> None:
    assert settings().scale_down_window_s == 60.0
    assert settings(interval_s=1).scale_down_window_s == 60.0
    assert settings(interval_s=30).scale_down_window_s == 120.0
    assert settings(interval_s=30, scale_down_after_s=30).scale_down_window_s == 30.0


# --- settings ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("placement", "key", "problem"),
    [
        ({"target_utilization": 0.3}, "placement", "must be below target_utilization"),
        ({"models": {"solo": {"min_copies": 3, "max_copies": 2}}}, "placement.models.solo", "below min_copies"),
        ({"models": {"solo": {"pinned": ["zz"]}}}, "(top level)", "placement.models.solo.pinned: 'zz' is not"),
        ({"models": {"solo": {"pinned": ["c"]}}}, "(top level)", "of tier 'cpu', not one of the model's tiers"),
        ({"host_memory_bytes": {"zz": "1GiB"}}, "(top level)", "placement.host_memory_bytes: 'zz'"),
        ({"tier_memory_bytes": {"tpu": 1}}, "placement.tier_memory_bytes.tpu", "'cpu' or 'gpu'"),
        ({"models": {"solo": {"footprint_bytes": "lots"}}}, "placement.models.solo.footprint_bytes", "value and unit"),
        ({"interval_s": 0}, "placement.interval_s", "greater than or equal to 1"),
        (
            {"interval_s": 10, "scale_down_after_s": 5},
            "placement.scale_down_after_s",
            "5 s is shorter than interval_s (10 s)",
        ),
        ({"bogus": 1}, "placement.bogus", "Extra inputs"),
    ],
)
def test_invalid_placement_settings_name_the_key(placement: dict[str, Any], key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_fleet({**FLEET, "placement": placement}, "fleet.yaml")
    assert f"fleet.yaml: key {key}: " in str(err.value) and problem in str(err.value)


def test_placement_defaults_off_and_byte_sizes_parse() -> None:
    assert parse_fleet(FLEET).placement.enabled is False
    s = parse_fleet({**FLEET, "placement": {"tier_memory_bytes": {"gpu": "8GiB"}, "host_memory_bytes": {"a": "4GiB"},
                                            "models": {"solo": {"footprint_bytes": "512MiB"}}}}).placement  # fmt: skip
    assert s.budget("a", Tier.GPU) == 4 * GIB and s.budget("b", Tier.GPU) == 8 * GIB and s.budget("c", Tier.CPU) is None
    assert footprint(s, {}, "solo") == (GIB // 2, "declared") and footprint(s, {}, "other") == (GIB, "default")
    assert footprint(s, {"solo": GIB, "other": 3 * GIB}, "other") == (3 * GIB, "learned")
    assert footprint(s, {"solo": GIB}, "solo") == (GIB // 2, "declared")  # declared wins over learned


# --- per (model, tier) -----------------------------------------------------------------------------------


def two_tiers(*copies: str) -> list[HostInput]:
    hs = [HostInput(f"{t}{i}", t, available=frozenset({"m"})) for t in ("gpu", "cpu") for i in range(3)]
    return with_copies(hs, "m", copies)


def tier(name: str, rate: float | None, cap: float | None = 10.0, **kw: Any) -> TierInput:
    """A tier whose demand has been low for long already (as :func:`model`)."""
    kw.setdefault("low_since", -1e9)
    kw.setdefault("low_most", 0)
    return TierInput(name, rate, cap, **kw)


def tiered(copies: Sequence[str], *tiers: TierInput) -> ModelInput:
    return ModelInput("m", None, None, copies=tuple(copies), tiers=("gpu", "cpu"), by_tier=tiers)


def by_tier(p: Plan) -> dict[str, tuple[int, int]]:
    return {d.tier: (d.current, d.desired) for d in p.decisions}


def test_demand_on_the_cpu_tier_only_gets_a_cpu_copy() -> None:
    # gpu is its default tier, but every request was classified to cpu: 14 req/s / (10 x 0.7) = 2 cpu copies.
    s = settings(max_concurrent_changes=5)
    p = plan([tiered(["cpu0"], tier("gpu", 0.0), tier("cpu", 14.0))], two_tiers("cpu0"), s, now=0.0)
    assert loads(p) == ["cpu1"] and by_tier(p) == {"gpu": (0, 0), "cpu": (1, 2)}
    assert p.actions[0].reason.startswith("cpu: 1 -> 2 copies (above target: 14.0 req/s / (10.0 x 0.7) = 2)")


def test_each_tier_scales_from_its_own_capacity_per_copy() -> None:
    # The same 60 req/s: 3 gpu copies at 30 a copy, 9 cpu copies at 10 (only 3 cpu hosts: 6 unplaced).
    s = settings(max_concurrent_changes=10)
    m = tiered(["gpu0", "cpu0"], tier("gpu", 60.0, 30.0), tier("cpu", 60.0, 10.0))
    p = plan([m], two_tiers("gpu0", "cpu0"), s, now=0.0)
    assert by_tier(p) == {"gpu": (1, 3), "cpu": (1, 3)}
    assert {d.tier: d.unplaced for d in p.decisions} == {"gpu": 0, "cpu": 6}


def test_a_tiers_scale_down_leaves_the_other_tiers_copy() -> None:
    # gpu's demand fell to one copy's worth; cpu's copy is as busy as ever: only gpu copies go.
    s = settings(cooldown_s=0, max_concurrent_changes=5)
    hs = two_tiers("gpu0", "gpu1", "gpu2", "cpu0")
    m = tiered(["cpu0", "gpu0", "gpu1", "gpu2"], tier("gpu", 5.0), tier("cpu", 5.0))
    p = plan([m], hs, s, now=0.0)
    assert sorted(unloads(p)) == ["gpu0", "gpu1"]
    assert "cpu0" not in unloads(p) and by_tier(p) == {"gpu": (3, 1), "cpu": (1, 1)}
    # No demand left on gpu at all: gpu goes to none, the cpu copy with its traffic stays.
    p = plan([tiered(["cpu0", "gpu0"], tier("gpu", 0.0), tier("cpu", 5.0))], two_tiers("gpu0", "cpu0"), s, now=0.0)
    assert unloads(p) == ["gpu0"] and by_tier(p) == {"gpu": (1, 0), "cpu": (1, 1)}


def test_cool_down_and_scale_down_window_are_per_tier() -> None:
    s = settings(cooldown_s=300, up_cooldown_s=30, scale_down_after_s=60)
    # gpu just changed (cool-down), cpu did not: cpu scales up.
    m = tiered(["gpu0", "cpu0"], tier("gpu", 20.0, last_change=0.0), tier("cpu", 14.0))
    p = plan([m], two_tiers("gpu0", "cpu0"), s, now=10.0)
    assert loads(p) == ["cpu1"]
    assert next(d for d in p.decisions if d.tier == "gpu").held == "cool-down: 20 s left"
    # gpu has been low for long, cpu only since now: gpu scales down, cpu waits for its window.
    m = tiered(["gpu0", "gpu1", "cpu0", "cpu1"], tier("gpu", 5.0), tier("cpu", 5.0, low_since=None, low_most=None))
    p = plan([m], two_tiers("gpu0", "gpu1", "cpu0", "cpu1"), s, now=1000.0)
    assert unloads(p) == ["gpu0"]
    cpu = next(d for d in p.decisions if d.tier == "cpu")
    assert (cpu.desired, cpu.low_since, cpu.held) == (1, 1000.0, "scale-down after 60 s of low demand: low for 0 s")


def test_min_copies_count_over_all_tiers() -> None:
    s = settings(cooldown_s=0, max_concurrent_changes=5, models={"m": {"min_copies": 2}})
    idle = (tier("gpu", 0.0), tier("cpu", 0.0))
    # One copy on each tier: two over its tiers, none goes.
    p = plan([tiered(["gpu0", "cpu0"], *idle)], two_tiers("gpu0", "cpu0"), s, now=0.0)
    assert p.actions == () and by_tier(p) == {"gpu": (1, 1), "cpu": (1, 1)}
    # Three: the least preferred tier's copy goes.
    p = plan([tiered(["gpu0", "gpu1", "cpu0"], *idle)], two_tiers("gpu0", "gpu1", "cpu0"), s, now=0.0)
    assert unloads(p) == ["cpu0"] and by_tier(p) == {"gpu": (2, 2), "cpu": (1, 0)}
    # One: the second goes to its default tier.
    p = plan([tiered(["cpu0"], *idle)], two_tiers("cpu0"), s, now=0.0)
    assert loads(p) == ["gpu0"] and by_tier(p) == {"gpu": (0, 1), "cpu": (1, 1)}
    # max_copies over its tiers too: the least preferred tier gives up its share first.
    capped = settings(max_concurrent_changes=10, models={"m": {"max_copies": 3}})
    m = tiered(["gpu0", "cpu0"], tier("gpu", 14.0), tier("cpu", 14.0))
    assert by_tier(plan([m], two_tiers("gpu0", "cpu0"), capped, now=0.0)) == {"gpu": (1, 2), "cpu": (1, 1)}


def test_a_tier_the_bounds_keep_waits_for_no_scale_down_window() -> None:
    s = settings(scale_down_after_s=60)
    fresh = {"low_since": None, "low_most": None}
    p = plan(
        [tiered(["gpu0", "cpu0"], tier("gpu", 0.0, **fresh), tier("cpu", 0.0, **fresh))],
        two_tiers("gpu0", "cpu0"),
        s,
        now=0.0,
    )
    gpu, cpu = (next(d for d in p.decisions if d.tier == t) for t in ("gpu", "cpu"))
    assert (gpu.desired, gpu.held, gpu.low_since) == (1, None, None)  # min_copies 1 keeps its default tier's
    assert (cpu.desired, cpu.held, cpu.low_since) == (0, "scale-down after 60 s of low demand: low for 0 s", 0.0)


def test_the_last_copy_with_traffic_is_never_unloaded() -> None:
    s = settings(cooldown_s=0, models={"m": {"min_copies": 0}})
    # Refused for load (counted on gpu, its home tier, which has no copy yet) and no demand on cpu: the
    # gpu copy loads, and the cpu copy stays until one is READY elsewhere.
    m = tiered(["cpu0"], tier("gpu", 0.0, overloaded=True), tier("cpu", 0.0))
    p = plan([m], two_tiers("cpu0"), s, now=0.0)
    assert loads(p) == ["gpu0"] and unloads(p) == []
    assert by_tier(p) == {"gpu": (0, 1), "cpu": (1, 1)}
    # The same with demand not measured on a tier: it may have traffic.
    m = tiered(["cpu0", "gpu0"], tier("gpu", 0.0), tier("cpu", None))
    assert unloads(plan([m], two_tiers("cpu0", "gpu0"), s, now=0.0)) == ["gpu0"]
    m = tiered(["gpu0"], tier("gpu", 0.0), tier("cpu", None))
    assert unloads(plan([m], two_tiers("gpu0"), s, now=0.0)) == []
    # Without traffic on any tier, min_copies 0 lets the last copy go.
    m = tiered(["gpu0"], tier("gpu", 0.0), tier("cpu", 0.0))
    assert unloads(plan([m], two_tiers("gpu0"), s, now=0.0)) == ["gpu0"]


def test_spilled_requests_count_where_they_ran_and_ask_for_the_tier_they_were_meant_for() -> None:
    # 7 req/s meant for gpu ran on cpu (gpu saturated): cpu keeps what serves them, gpu gets one more copy.
    s = settings(cooldown_s=0, max_concurrent_changes=5)
    m = tiered(["gpu0", "cpu0"], tier("gpu", 7.0, spilled_rps=7.0), tier("cpu", 7.0))
    p = plan([m], two_tiers("gpu0", "cpu0"), s, now=0.0)
    assert loads(p) == ["gpu1"] and by_tier(p) == {"gpu": (1, 2), "cpu": (1, 1)}
    assert "7.0 req/s spilled over to other tiers: one more copy" in p.actions[0].reason


def test_inputs_per_tier_from_the_pickers_counters() -> None:
    # mlp: tiers cpu (default), gpu; a and b are gpu hosts, c the cpu one.
    fleet = parse_fleet(
        {**FLEET, "placement": {"models": {"mlp": {"capacity_rps": {"gpu": 40}}, "embed": {"capacity_rps": 5}}}}
    )
    view = {
        "a": PickerHost("a", "gpu", fresh=True, routable=True, ready={"mlp": ("1",)}, known=frozenset({"mlp"})),
        "c": PickerHost("c", "cpu", fresh=True, routable=True, ready={"mlp": ("1",)}, known=frozenset({"mlp"}),
                        service_ms=100.0),
    }  # fmt: skip
    demand = Demand({("mlp", "gpu"): 9.0, ("mlp", "cpu"): 2.0}, {("mlp", "gpu"): 4.0}, {"mlp": 1.0})
    models, _ = build_inputs(fleet, view, [], demand, now_unix=0.0, last_change={("mlp", "gpu"): 5.0})
    mlp = next(m for m in models if m.name == "mlp")
    got = {t.tier: (t.rate_rps, t.capacity_rps, t.capacity_source, t.spilled_rps, t.last_change) for t in mlp.by_tier}
    # The refusal counts on cpu (its default tier), and so do the requests that spilled over to gpu.
    assert got == {"cpu": (3.0, 10.0, "service time", 4.0, None), "gpu": (9.0, 40.0, "declared", 0.0, 5.0)}
    assert mlp.rate_rps == 12.0
    embed = next(m for m in models if m.name == "embed")
    assert [(t.tier, t.capacity_rps) for t in embed.by_tier] == [("gpu", 5.0)]


def test_capacity_rps_is_one_number_or_one_per_tier() -> None:
    s = settings(models={"a": {"capacity_rps": 5}, "b": {"capacity_rps": {"gpu": 100, "cpu": 4}}})
    assert (s.models["a"].capacity("gpu"), s.models["a"].capacity("cpu")) == (5.0, 5.0)
    assert (s.models["b"].capacity("gpu"), s.models["b"].capacity("cpu")) == (100.0, 4.0)
    assert settings(models={"c": {"capacity_rps": {"gpu": 100}}}).models["c"].capacity("cpu") is None
    with pytest.raises(ValueError, match="greater than 0"):
        settings(models={"b": {"capacity_rps": {"gpu": 0}}})


def test_explain_has_a_row_per_model_and_tier() -> None:
    s = settings()
    hs = two_tiers("gpu0", "cpu0")
    p = plan([tiered(["gpu0", "cpu0"], tier("gpu", 5.0), tier("cpu", 1.0, None))], hs, s, now=0.0)
    rows = [line.split()[:2] for line in format_explain(p, hs, s, window_s=5.0, paused=None).splitlines()[2:4]]
    assert rows == [["m", "cpu"], ["m", "gpu"]]
    doc = explain_json(p, hs, s, window_s=5.0, paused=None)
    assert [(d["tier"], d["current"], d["desired"]) for d in doc["models"]] == [("cpu", 1, 1), ("gpu", 1, 1)]


# --- inputs from a picker ---------------------------------------------------------------------------------


def test_status_and_metrics_give_batching_known_models_and_routed_counts() -> None:
    raw = {"tier": "gpu", "known": ["m", "n"], "batching": {"m": {"max_batch": 8, "instances": 2}},
           "batch_cost_ms": {"m": {"fixed": 2.0, "per_item": 0.75}}}  # fmt: skip
    host = parse_picker_status({"ready": True, "hosts": {"a": raw}}).hosts["a"]
    assert host.known == {"m", "n"} and host.batching["m"] == ModelBatching(8, 2, 2.0, 0.75)
    # 2 instances x 8 requests / (2 + 0.75 x 8) ms = 2000 req/s.
    assert copy_capacity("m", host) == (2000.0, "batch fit")
    alone = replace(host, service_ms=4.0, ready={"n": ("1",)})
    assert copy_capacity("n", alone) == (250.0, "service time")
    # The host's service time is over all its models: with another READY there, it is not n's.
    assert copy_capacity("n", replace(alone, ready={"n": ("1",), "m": ("1",)})) == (None, "unknown")
    text = (
        'extproc_decisions_total{model="m",tier="gpu",host="a",reason="classified"} 7\n'
        'extproc_decisions_total{model="m",tier="cpu",host="c",reason="classified"} 2\n'
        'extproc_decisions_total{model="m",tier="cpu",host="d",reason="spillover"} 3\n'
    )
    load = parse_overload(text)["m"]
    assert load.routed == 12.0 and load.routed_by_tier == {"gpu": 7.0, "cpu": 5.0}
    assert load.spilled_by_tier == {"cpu": 3.0}


def test_demand_meter_rates_over_pickers_and_restarts() -> None:
    def status(url: str, gpu: float, cpu: float = 0.0, spilled: float = 0.0, refused: float = 0.0) -> PickerStatus:
        load = ModelLoad(refused=refused, routed_by_tier={"gpu": gpu, "cpu": cpu}, spilled_by_tier={"cpu": spilled})
        return PickerStatus(url, True, {}, {"m": load})

    meter = DemandMeter()
    assert meter.update([status("p1", 100), status("p2", 50)], 0.0) is None
    rates = meter.update([status("p1", 150, cpu=20, spilled=10, refused=5), status("p2", 60)], 10.0)
    assert rates == Demand({("m", "gpu"): 6.0, ("m", "cpu"): 2.0}, {("m", "cpu"): 1.0}, {"m": 0.5})
    later = meter.update([status("p1", 20, cpu=20, spilled=10, refused=5), status("p2", 60)], 20.0)  # p1 restarted
    assert later is not None and later.routed == {("m", "gpu"): 2.0, ("m", "cpu"): 0.0}


def test_build_inputs_uses_gpu_memory_where_known_else_declared() -> None:
    fleet = parse_fleet({**FLEET, "placement": {"tier_memory_bytes": {"gpu": "4GiB"}, "models": {"embed": {}}}})
    view = {
        "a": PickerHost("a", "gpu", fresh=True, routable=True, ready={"embed": ("1",)}, known=frozenset({"embed"}),
                        gpu_memory_used=3 * GIB, gpu_memory_total=16 * GIB, service_ms=10.0),
        "b": PickerHost("b", "gpu", fresh=True, routable=True, ready={"solo": ("1",)}, known=frozenset({"embed"})),
    }  # fmt: skip
    models, hs = build_inputs(fleet, view, [], {"embed": 3.0}, now_unix=0.0)
    by = {h.name: h for h in hs}
    assert (by["a"].memory_source, by["a"].budget_bytes, by["a"].used_bytes) == ("gpu", 16 * GIB, 3 * GIB)
    assert (by["b"].memory_source, by["b"].budget_bytes, by["b"].used_bytes) == ("declared", 4 * GIB, GIB)
    assert by["c"].memory_source == "none" and not by["c"].routable
    [embed] = models
    assert embed.copies == ("a",) and embed.tiers == ("gpu",)
    assert [(t.tier, t.rate_rps, t.capacity_rps, t.capacity_source) for t in embed.by_tier] == [
        ("gpu", 3.0, 100.0, "service time")
    ]  # demand of no known tier counts on its home tier


# --- the controller through the model operations ----------------------------------------------------------


class CountingPicker(FakePicker):
    """The fakes' picker, with the repository's models and a routed counter per model."""

    def __init__(self, w: World, routed: dict[str, float]) -> None:
        super().__init__(w)
        self.routed = routed

    def status(self) -> PickerStatus:
        base = super().status()
        hosts = {n: replace(h, known=frozenset(REPOSITORY), service_ms=100.0) for n, h in base.hosts.items()}
        # The models of these tests run on gpu hosts: the picker counts them on that tier.
        loads = {m: ModelLoad(routed=c, routed_by_tier={"gpu": c}) for m, c in self.routed.items()}
        return replace(base, hosts=hosts, overload=loads)


def controller(w: World, placement: dict[str, Any]) -> tuple[Controller, dict[str, float]]:
    w.fleet = parse_fleet({**FLEET, "placement": {"enabled": True, **placement}})
    routed: dict[str, float] = {}
    ops, _ = ops_for(w, [CountingPicker(w, routed)], settle_s=0.0)
    # No host's metrics page is reachable (the hosts are fakes): no footprint is measured unless a test
    # gives pages (FakeGpuPages).
    return Controller(ops, clock=w.clock, wall=lambda: 0.0, sleep=w.sleep, memory=lambda fleet, host: None), routed


def test_controller_loads_a_second_copy_under_demand_then_unloads_it_through_drain() -> None:
    w = world(a={"embed": READY})
    c, routed = controller(w, {"models": {"embed": {"capacity_rps": 10}}, "cooldown_s": 60})
    routed["embed"] = 0.0

    def traffic(rps: float, window: float) -> None:
        routed["embed"] += rps * window

    traffic(12.0, 5.0)  # the first look measures over --window
    w.sleep(0.0)
    first = c.decide(5.0)  # counts grew before the first look: 0 req/s in its window
    assert first.plan.actions == ()
    traffic(12.0, 15.0)
    w.sleep(15.0)
    decided = c.decide(5.0)
    assert [(a.kind, a.host) for a in decided.plan.actions] == [("load", "b")]
    done = c.act(decided)
    assert [r.ok for _, r in done] == [True] and "load b embed" in w.events
    # Demand gone: held by the cool-down, then one copy is unloaded through a drain.
    w.sleep(15.0)
    assert c.decide(5.0).plan.actions == ()
    w.sleep(60.0)
    decided = c.decide(5.0)
    assert [a.kind for a in decided.plan.actions] == ["unload"]
    c.act(decided)
    victim = decided.plan.actions[0].host
    assert f"drain {victim} http://picker-1" in w.events and f"unload {victim} embed" in w.events


def test_pause_switch(tmp_path: Any) -> None:
    fleet = parse_fleet({**FLEET, "runtime_dir": str(tmp_path), "placement": {"enabled": True}})
    assert pause_reason(fleet) is None
    (tmp_path / "placement.pause").touch()
    assert pause_reason(fleet) == f"{tmp_path}/placement.pause exists"
    assert pause_reason(parse_fleet(FLEET)) == "placement.enabled is false"


def test_explain_is_one_line_per_model_then_actions_and_json() -> None:
    s = settings(max_concurrent_changes=1)
    hs = with_copies(hosts(), "m", ["h0"])
    p = plan([model(rate=20.0), model(name="n", copies=["h0"], rate=1.0)], hs, s, now=0.0)
    text = format_explain(p, hs, s, window_s=5.0, paused=None)
    lines = text.splitlines()
    assert lines[1].split()[:8] == ["MODEL", "TIER", "DEMAND", "CAP/COPY", "FROM", "UTIL", "FOOTPRINT", "COPIES"]
    assert lines[2].startswith("m ") and lines[3].startswith("n ")
    assert "actions: 1 (1 deferred)" in text and "  load   m on h" in text
    doc = explain_json(p, hs, s, window_s=5.0, paused=None)
    assert json.loads(json.dumps(doc))["models"][0]["desired"] == 3


def test_cli_parses_the_placement_commands() -> None:
    args = _parser().parse_args(["placement", "run", "--dry-run", "--once", "--window", "2"])
    assert (args.placement_command, args.dry_run, args.once, args.window) == ("run", True, True, 2.0)
    assert _parser().parse_args(["placement", "explain", "--json"]).json is True


# --- learned footprints -------------------------------------------------------------------------------------

# A fake of the lowest layer the controller reads memory from: Triton's metrics page. The page is the
# recorded-shape GPU page of tests/data (two GPUs, as a GPU build of Triton writes them), its first GPU's
# nv_gpu_memory_used_bytes set from the models READY on the host in the fake world.
GPU_PAGE = (Path(__file__).parent / "data" / "triton_metrics_gpu.txt").read_text(encoding="utf-8")
CPU_PAGE = (Path(__file__).parent / "data" / "triton_metrics_cpu_t0.txt").read_text(encoding="utf-8")
FIRST_GPU_USED = 'nv_gpu_memory_used_bytes{gpu_uuid="GPU-5e9c3b1a-7f4d-2c8e-91a0-6b3d4e5f7a81"} '


class FakeGpuPages:
    """Each host's metrics page: the recorded GPU page with its first GPU's used memory at ``base`` plus
    the ``sizes`` of the models READY there."""

    def __init__(self, w: World, sizes: dict[str, int], base: int = 2 * GIB) -> None:
        self.w, self.sizes, self.base = w, sizes, base
        self.reads: list[str] = []

    def page(self, host: str) -> str:
        used = self.base + sum(self.sizes.get(m, 0) for m, (state, _) in self.w.states[host].items() if state == READY)
        return "\n".join(
            FIRST_GPU_USED + str(used) if line.startswith(FIRST_GPU_USED) else line for line in GPU_PAGE.splitlines()
        )

    def read(self, fleet: Fleet, host: HostSpec) -> MemoryReading | None:
        self.reads.append(host.name)
        return parse_memory(self.page(host.name))


def test_memory_readings_sum_the_gpus_else_read_cpu_memory() -> None:
    assert parse_memory(GPU_PAGE) == MemoryReading(gpu_used=21474836480 + 8589934592, cpu_used=41875931136)
    assert parse_memory(GPU_PAGE).used() == (21474836480 + 8589934592, "gpu")
    assert parse_memory(CPU_PAGE).used() == (422858752, "cpu")  # a real CPU-only Triton's page
    assert parse_memory("").used() is None


def reading(gib: float) -> MemoryReading:
    return MemoryReading(gpu_used=int(gib * GIB))


def test_footprints_keep_the_largest_recent_load_and_skip_overlapped_ones() -> None:
    f = Footprints()

    def measure(model: str, host: str, before: float, after: float, ready: set[str], at: float) -> list[Outcome]:
        f.loading(model, host, reading(before), frozenset({"x"}), at)
        f.changed("load", model, host, at, at + 1.0, ok=True)
        assert f.settle(at + 2.0, lambda h: reading(after), {host: frozenset(ready)}) == []  # not settled yet
        return f.settle(at + 1.0 + SETTLE_S, lambda h: reading(after), {host: frozenset(ready)})

    (o,) = measure("m", "h0", 10.0, 12.0, {"x", "m"}, at=0.0)
    assert (o.learned, o.delta_bytes, o.source) == (True, 2 * GIB, "gpu") and f.learned() == {"m": 2 * GIB}
    measure("m", "h1", 10.0, 11.5, {"x", "m"}, at=100.0)
    assert f.learned() == {"m": 2 * GIB}  # the largest of the recent ones
    # Another model appeared on the host meanwhile (an operator's load): not counted.
    (o,) = measure("m", "h2", 10.0, 15.0, {"x", "m", "y"}, at=200.0)
    assert not o.learned and "READY models changed" in o.why
    # Memory went down (something else freed more): not counted.
    (o,) = measure("m", "h3", 10.0, 9.0, {"x", "m"}, at=300.0)
    assert not o.learned and o.why == "memory did not grow"
    # The controller unloaded another model on the host just before: not counted.
    f.changed("unload", "y", "h4", 398.0, 399.0, ok=True)
    (o,) = measure("m", "h4", 10.0, 20.0, {"x", "m"}, at=400.0)
    assert not o.learned and "1 other change" in o.why
    # A failed load is not measured; unreadable memory is not measured.
    f.loading("n", "h0", reading(1.0), frozenset(), 500.0)
    f.changed("load", "n", "h0", 500.0, 501.0, ok=False)
    f.loading("n", "h1", None, frozenset(), 500.0)
    assert f.settle(600.0, lambda h: reading(5.0), {"h0": frozenset({"n"})}) == []
    # The largest of the last KEEP observations: older, larger ones age out.
    for k in range(KEEP):
        measure("m", "h5", 10.0, 11.0, {"x", "m"}, at=1000.0 + 100 * k)
    assert f.learned() == {"m": GIB}


def test_a_learned_footprint_counts_in_the_budget_where_none_is_declared() -> None:
    hs = [HostInput("h0", "gpu", budget_bytes=4 * GIB, used_bytes=2 * GIB, available=frozenset({"m"}))]
    wanted = [model(copies=(), rate=50.0)]
    assert loads(plan(wanted, hs, settings(), now=0.0)) == ["h0"]  # the default 1 GiB fits
    refused = plan(wanted, hs, settings(), now=0.0, learned={"m": 3 * GIB})
    assert refused.actions == () and "over memory budget" in (refused.decisions[0].held or "")
    assert (refused.decisions[0].footprint_bytes, refused.decisions[0].footprint_source) == (3 * GIB, "learned")
    declared = settings(models={"m": {"footprint_bytes": "1GiB"}})
    assert loads(plan(wanted, hs, declared, now=0.0, learned={"m": 3 * GIB})) == ["h0"]


def test_controller_learns_a_footprint_at_its_load_and_shows_it() -> None:
    w = world(a={"embed": READY})
    c, routed = controller(
        w, {"models": {"embed": {"capacity_rps": 10}}, "up_cooldown_s": 0, "tier_memory_bytes": {"gpu": "8GiB"}}
    )
    pages = FakeGpuPages(w, {"embed": 3 * GIB})
    c.memory = pages.read
    routed["embed"] = 0.0
    c.decide(5.0)
    routed["embed"] += 12.0 * 15.0
    w.sleep(15.0)
    decided = c.decide(5.0)
    assert decided.plan.decisions[0].footprint_source == "default"
    assert [(a.kind, a.host) for a in decided.plan.actions] == [("load", "b")]
    c.act(decided)
    assert pages.reads == ["b"]  # before the load
    w.sleep(SETTLE_S)
    with capture_logs() as logs:
        after = c.decide(5.0)
    (line,) = [r for r in logs if r["event"] == "placement_footprint"]
    assert (line["model"], line["host"], line["counted"], line["delta_bytes"]) == ("embed", "b", True, 3 * GIB)
    d = after.plan.decisions[0]
    assert (d.footprint_bytes, d.footprint_source) == (3 * GIB, "learned")
    # Where the budget is declared, the copies READY there count at their learned footprint.
    assert {h.name: h.used_bytes for h in after.hosts if h.tier == "gpu"} == {"a": 3 * GIB, "b": 3 * GIB}
    assert "3.0 GiB learned" in format_explain(
        after.plan, after.hosts, c.ops.fleet.placement, window_s=5.0, paused=None
    )
    doc = explain_json(after.plan, after.hosts, c.ops.fleet.placement, window_s=5.0, paused=None)
    assert (doc["models"][0]["footprint_bytes"], doc["models"][0]["footprint_source"]) == (3 * GIB, "learned")
    metrics = PlacementMetrics()
    metrics.planned(after.plan, after.hosts, c.ops.fleet.placement, paused=False, at=0.0)
    series = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
        for s in family.samples
    }
    assert series[("extproc_placement_model_footprint_bytes", (("model", "embed"), ("source", "learned")))] == 3 * GIB
