"""Demand-driven placement: the decision (extproc/placement/plan.py) without Triton, its inputs from a
picker's status and metrics, the ``placement`` settings, and the controller acting through the model
operations against the fakes of tests/test_models_ops.py."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pytest

from extproc.cli import _parser
from extproc.config import ConfigError, PlacementSpec, Tier, parse_fleet
from extproc.ops.status import ModelBatching, ModelLoad, PickerHost, PickerStatus, parse_overload, parse_picker_status
from extproc.ops.triton_api import READY
from extproc.placement.command import Controller, pause_reason
from extproc.placement.explain import explain_json, format_explain
from extproc.placement.inputs import DemandMeter, build_inputs, copy_capacity
from extproc.placement.plan import HostInput, ModelInput, Plan, plan
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
    assert idle.decisions[0].reason == "no demand: below 0.35 utilization; min 1"
    # Unknown demand, or a controller told never to scale down (scale_down_utilization 0): kept.
    assert plan([model(["h0", "h1"], rate=None, cap=None)], hs, s, now=0.0).actions == ()
    assert (
        plan([model(["h0", "h1"], rate=0.0, cap=None)], hs, settings(scale_down_utilization=0), now=0.0).actions == ()
    )


def test_unloads_leave_the_default_tier_its_copies() -> None:
    s = settings(cooldown_s=0)
    # The gpu copy is busier (another model's traffic), but cpu is the model's default tier: gpu's goes.
    hs = [
        HostInput("c", "cpu", models=frozenset({"m"}), in_flight=0.0),
        HostInput("g", "gpu", models=frozenset({"m"}), in_flight=5.0),
    ]
    p = plan([model(["c", "g"], rate=0.0, tiers=("cpu", "gpu"))], hs, s, now=0.0)
    assert unloads(p) == ["g"] and "a copy outside its default tier (cpu)" in p.actions[0].reason
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


def test_loads_go_to_the_most_headroom_in_the_default_tier_first() -> None:
    s = settings(max_concurrent_changes=10)
    hs = [
        HostInput("c0", "cpu", budget_bytes=64 * GIB, available=frozenset({"m"})),
        HostInput("g0", "gpu", budget_bytes=8 * GIB, used_bytes=6 * GIB, available=frozenset({"m"})),
        HostInput("g1", "gpu", budget_bytes=8 * GIB, used_bytes=2 * GIB, available=frozenset({"m"})),
        HostInput("g2", "gpu", budget_bytes=8 * GIB, available=frozenset()),  # not in its repository
    ]
    p = plan([model(copies=(), rate=100.0, tiers=("gpu",))], hs, s, now=0.0)
    assert loads(p) == ["g1", "g0"]  # never the cpu tier, never where the repository lacks it
    p = plan([model(copies=(), rate=100.0, tiers=("gpu", "cpu"))], hs, s, now=0.0)
    assert loads(p) == ["g1", "g0", "c0"]


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
    assert s.footprint("solo") == GIB // 2 and s.footprint("other") == GIB


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
    text = 'extproc_decisions_total{model="m",tier="gpu",host="a",reason="best"} 7\n'
    assert parse_overload(text)["m"].routed == 7.0


def test_demand_meter_rates_over_pickers_and_restarts() -> None:
    def status(url: str, **counts: float) -> PickerStatus:
        return PickerStatus(url, True, {}, {m: ModelLoad(routed=c) for m, c in counts.items()})

    meter = DemandMeter()
    assert meter.update([status("p1", m=100), status("p2", m=50)], 0.0) is None
    rates = meter.update([status("p1", m=150), status("p2", m=60)], 10.0)
    assert rates == {"m": 6.0}
    assert meter.update([status("p1", m=20), status("p2", m=60)], 20.0) == {"m": 2.0}  # p1 restarted


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
    assert embed.copies == ("a",) and embed.capacity_rps == 100.0 and embed.tiers == ("gpu",)


# --- the controller through the model operations ----------------------------------------------------------


class CountingPicker(FakePicker):
    """The fakes' picker, with the repository's models and a routed counter per model."""

    def __init__(self, w: World, routed: dict[str, float]) -> None:
        super().__init__(w)
        self.routed = routed

    def status(self) -> PickerStatus:
        base = super().status()
        hosts = {n: replace(h, known=frozenset(REPOSITORY), service_ms=100.0) for n, h in base.hosts.items()}
        return replace(base, hosts=hosts, overload={m: ModelLoad(routed=c) for m, c in self.routed.items()})


def controller(w: World, placement: dict[str, Any]) -> tuple[Controller, dict[str, float]]:
    w.fleet = parse_fleet({**FLEET, "placement": {"enabled": True, **placement}})
    routed: dict[str, float] = {}
    ops, _ = ops_for(w, [CountingPicker(w, routed)], settle_s=0.0)
    return Controller(ops, clock=w.clock, wall=lambda: 0.0, sleep=w.sleep), routed


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
    assert lines[1].split()[:7] == ["MODEL", "DEMAND", "CAP/COPY", "FROM", "UTIL", "COPIES", "DESIRED"]
    assert lines[2].startswith("m ") and lines[3].startswith("n ")
    assert "actions: 1 (1 deferred)" in text and "  load   m on h" in text
    doc = explain_json(p, hs, s, window_s=5.0, paused=None)
    assert json.loads(json.dumps(doc))["models"][0]["desired"] == 3


def test_cli_parses_the_placement_commands() -> None:
    args = _parser().parse_args(["placement", "run", "--dry-run", "--once", "--window", "2"])
    assert (args.placement_command, args.dry_run, args.once, args.window) == ("run", True, True, 2.0)
    assert _parser().parse_args(["placement", "explain", "--json"]).json is True
