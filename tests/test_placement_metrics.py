"""The placement controller's Prometheus series (extproc/placement/metrics.py) without Triton: the copies no
host can take, the per-tier autoscaling signal computed from them, the desired copies split by tier, the
exposition a scrape reads, and the counters a controller round adds."""

from __future__ import annotations

import argparse
import threading
import urllib.request
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from benchmarks.ports import free_ports
from extproc.config import PlacementSpec, parse_fleet
from extproc.ops import OpsError
from extproc.ops.execute import Ops
from extproc.ops.triton_api import READY
from extproc.placement.command import _run_loop, _serve_metrics
from extproc.placement.explain import explain_json, format_explain
from extproc.placement.metrics import PlacementMetrics, tier_signals
from extproc.placement.plan import HostInput, ModelInput, Plan, TierInput, home_tier, plan
from tests.test_models_ops import FLEET, world
from tests.test_placement import controller, model, with_copies

GIB = 2**30


def settings(**kw: Any) -> PlacementSpec:
    return PlacementSpec.model_validate({"enabled": True, "max_concurrent_changes": 10, **kw})


def tier_hosts(tier: str, n: int, **kw: Any) -> list[HostInput]:
    defaults: dict[str, Any] = {"available": frozenset({"m", "n", "o"})}
    return [HostInput(name=f"{tier}{i}", tier=tier, **(defaults | kw)) for i in range(n)]


def samples(metrics: PlacementMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def signal(models: Sequence[ModelInput], hs: list[HostInput], s: PlacementSpec) -> tuple[Plan, dict[str, Any]]:
    p = plan(models, hs, s, now=0.0)
    return p, {t.tier: t for t in tier_signals(p, hs, s)}


# --- copies no host can take, and the hosts a tier needs ----------------------------------------------------


def test_demand_beyond_the_tiers_hosts_asks_for_that_many_more_hosts() -> None:
    hs = with_copies(tier_hosts("gpu", 2), "m", ["gpu0", "gpu1"])
    # 35 req/s at 10 a copy x 0.7: 5 copies; two hosts hold it already.
    p, tiers = signal([model(copies=["gpu0", "gpu1"], rate=35.0)], hs, settings())
    (d,) = p.decisions
    assert (d.current, d.desired, d.unplaced) == (2, 2, 3)
    gpu = tiers["gpu"]
    assert (gpu.hosts, gpu.unplaced, gpu.hosts_wanted, gpu.hosts_needed) == (2, 3, 5, 3)
    assert gpu.demand_rps == 35.0 and gpu.capacity_rps == 20.0


def test_max_copies_caps_what_more_hosts_would_get() -> None:
    hs = with_copies(tier_hosts("gpu", 2), "m", ["gpu0", "gpu1"])
    s = settings(models={"m": {"max_copies": 3}})
    p, tiers = signal([model(copies=["gpu0", "gpu1"], rate=35.0)], hs, s)
    assert p.decisions[0].unplaced == 1 and tiers["gpu"].hosts_wanted == 3


def test_a_tier_with_room_needs_no_host() -> None:
    hs = with_copies(tier_hosts("gpu", 4), "m", ["gpu0"])
    p, tiers = signal([model(copies=["gpu0"], rate=20.0)], hs, settings())
    assert [a.host for a in p.actions] == ["gpu1", "gpu2"]
    assert p.decisions[0].unplaced == 0
    assert (tiers["gpu"].unplaced, tiers["gpu"].hosts_wanted) == (0, 4)


def test_full_hosts_count_and_the_memory_unplaced_copies_need() -> None:
    # Three hosts of 4 GiB, each full with two 2 GiB models: no third model fits anywhere.
    s = settings(default_footprint_bytes=2 * GIB, tier_memory_bytes={"gpu": 4 * GIB})
    hs = tier_hosts("gpu", 3, budget_bytes=4 * GIB, used_bytes=4 * GIB, available=frozenset({"m", "n", "o", "x"}))
    models = [
        model(name=name, copies=[], rate=14.0, cap=10.0) for name in ("m", "n", "o")
    ]  # each: ceil(14 / 7) = 2 copies
    p, tiers = signal(models, hs, s)
    assert p.actions == () and [d.unplaced for d in p.decisions] == [2, 2, 2]
    gpu = tiers["gpu"]
    assert gpu.full_hosts == 3 and gpu.unplaced == 6
    # 6 copies x 2 GiB over 4 GiB a host: 3 more hosts (more than any one model's 2).
    assert gpu.hosts_wanted == 6


def test_unplaced_copies_belong_to_the_tier_whose_demand_asks_for_them() -> None:
    hs = tier_hosts("gpu", 1) + tier_hosts("cpu", 1)
    hs = with_copies(hs, "m", ["gpu0"])
    # gpu's demand wants 5 gpu copies: 4 more gpu hosts, none of the cpu tier (which has no demand).
    p, tiers = signal([model(copies=["gpu0"], rate=35.0, tiers=("gpu", "cpu"))], hs, settings())
    assert p.actions == () and [(d.tier, d.unplaced) for d in p.decisions] == [("gpu", 4)]
    assert (tiers["gpu"].unplaced, tiers["cpu"].unplaced) == (4, 0)
    assert (tiers["gpu"].hosts_wanted, tiers["cpu"].hosts_wanted) == (5, 1)
    # Without declared tiers: the tier most hosts with it in their repository are of.
    free = model(copies=[], rate=1.0)
    assert home_tier(free, tier_hosts("gpu", 1) + tier_hosts("cpu", 2)) == "cpu"
    assert home_tier(free, tier_hosts("gpu", 1, available=frozenset())) is None


def test_demand_and_capacity_per_tier_come_from_the_decisions() -> None:
    hs = with_copies(tier_hosts("gpu", 3) + tier_hosts("cpu", 1), "m", ["gpu0", "gpu1", "cpu0"])
    models = [
        model(copies=["cpu0", "gpu0", "gpu1"], rate=6.0, cap=10.0, tiers=("gpu", "cpu")),
        model(name="n", copies=[], rate=2.0, cap=None, tiers=("cpu",)),
    ]
    _, tiers = signal(models, hs, settings())
    assert (tiers["gpu"].demand_rps, tiers["cpu"].demand_rps) == (4.0, 2.0 + 2.0)
    assert (tiers["gpu"].capacity_rps, tiers["cpu"].capacity_rps) == (20.0, 10.0)


# --- desired copies per tier ------------------------------------------------------------------------------


def test_desired_and_current_copies_per_tier_are_the_decisions() -> None:
    hs = with_copies(tier_hosts("gpu", 2) + tier_hosts("cpu", 2), "m", ["gpu0", "cpu0"])
    m = ModelInput(
        "m", None, None, copies=("cpu0", "gpu0"), tiers=("gpu", "cpu"),
        by_tier=(TierInput("gpu", 28.0, 10.0), TierInput("cpu", 0.0, 10.0, last_change=0.0)),
    )  # fmt: skip
    s = settings(max_concurrent_changes=1)
    p = plan([m], hs, s, now=10.0)  # gpu: 1 -> 4, 2 hosts; cpu: 1 -> 0, held by its cool-down
    assert len(p.actions) == 1 and len(p.deferred) == 0
    metrics = PlacementMetrics()
    metrics.planned(p, hs, s, paused=False, at=0.0)
    got = samples(metrics)
    assert {t: got[("extproc_placement_desired_copies", (("model", "m"), ("tier", t)))] for t in ("gpu", "cpu")} == {
        "gpu": 2.0,
        "cpu": 0.0,
    }
    assert {t: got[("extproc_placement_copies", (("model", "m"), ("tier", t)))] for t in ("gpu", "cpu")} == {
        "gpu": 1.0,
        "cpu": 1.0,
    }
    assert got[("extproc_placement_unplaced_copies", (("model", "m"), ("tier", "gpu")))] == 2.0
    assert got[("extproc_placement_demand_rps", (("model", "m"), ("tier", "cpu")))] == 0.0


# --- the exposition and the controller's counters ---------------------------------------------------------


def test_the_exposition_shows_the_last_round_only() -> None:
    metrics = PlacementMetrics()
    assert not any(name.startswith("extproc_placement_tier") for name, _ in samples(metrics))
    hs = with_copies(tier_hosts("gpu", 2), "m", ["gpu0", "gpu1"])
    s = settings()
    models = [model(copies=["gpu0", "gpu1"], rate=35.0), model(name="n", copies=["gpu0"], rate=None)]
    p = plan(models, hs, s, now=0.0)
    metrics.planned(p, hs, s, paused=True, at=1234.0)
    got = samples(metrics)
    assert got[("extproc_placement_paused", ())] == 1.0
    assert got[("extproc_placement_last_round_timestamp_seconds", ())] == 1234.0
    assert got[("extproc_placement_demand_rps", (("model", "m"), ("tier", "gpu")))] == 35.0
    assert ("extproc_placement_demand_rps", (("model", "n"), ("tier", "gpu"))) not in got  # not measured: absent
    assert got[("extproc_placement_capacity_per_copy_rps", (("model", "m"), ("tier", "gpu")))] == 10.0
    assert got[("extproc_placement_copies", (("model", "m"), ("tier", "gpu")))] == 2.0
    assert got[("extproc_placement_desired_copies", (("model", "m"), ("tier", "gpu")))] == 2.0
    assert got[("extproc_placement_unplaced_copies", (("model", "m"), ("tier", "gpu")))] == 3.0
    assert got[("extproc_placement_tier_hosts_wanted", (("tier", "gpu"),))] == 5.0
    assert got[("extproc_placement_tier_hosts", (("tier", "gpu"),))] == 2.0
    assert got[("extproc_placement_tier_demand_rps", (("tier", "gpu"),))] == 35.0
    # The next round without model m: its series are gone.
    p = plan(models[1:], hs, s, now=1.0)
    metrics.planned(p, hs, s, paused=False, at=1235.0)
    got = samples(metrics)
    assert got[("extproc_placement_paused", ())] == 0.0
    assert not [key for key in got if ("model", "m") in key[1]]
    assert got[("extproc_placement_tier_hosts_wanted", (("tier", "gpu"),))] == 2.0


def test_a_controller_round_counts_its_actions_and_serves_metrics(tmp_path: Path) -> None:
    w = world(a={"embed": READY})
    c, routed = controller(w, {"models": {"embed": {"capacity_rps": 10}}})
    routed["embed"] = 0.0
    c.decide(5.0)
    routed["embed"] += 12.0 * 15.0
    w.sleep(15.0)
    metrics = PlacementMetrics()
    args = argparse.Namespace(dry_run=False, once=True, window=5.0, metrics_port=None, config=tmp_path / "f.yaml")
    assert _run_loop(args, c, metrics) == 0
    got = samples(metrics)
    assert got[("extproc_placement_actions_total", (("action", "load"), ("model", "embed"), ("outcome", "done")))] == 1
    assert got[("extproc_placement_rounds_total", (("outcome", "ok"),))] == 1
    assert got[("extproc_placement_copies", (("model", "embed"), ("tier", "gpu")))] == 1.0  # when it planned
    assert got[("extproc_placement_desired_copies", (("model", "embed"), ("tier", "gpu")))] == 2.0
    # Paused (placement.enabled false), demand gone past the cool-down and for the scale-down window (two
    # rounds 60 s apart): the unload is counted, not done.
    c.ops = replace(c.ops, fleet=parse_fleet({**FLEET, "placement": {"models": {"embed": {"capacity_rps": 10}}}}))
    w.sleep(301.0)
    events = len(w.events)
    assert _run_loop(args, c, metrics) == 0
    assert not samples(metrics).get(
        ("extproc_placement_actions_total", (("action", "unload"), ("model", "embed"), ("outcome", "paused")))
    )
    w.sleep(60.0)
    assert _run_loop(args, c, metrics) == 0
    got = samples(metrics)
    assert got[("extproc_placement_paused", ())] == 1.0
    assert got[("extproc_placement_copies", (("model", "embed"), ("tier", "gpu")))] == 2.0
    assert got[("extproc_placement_desired_copies", (("model", "embed"), ("tier", "gpu")))] == 1.0
    assert got[("extproc_placement_actions_total", (("action", "unload"), ("model", "embed"), ("outcome", "paused")))]
    assert got[("extproc_placement_rounds_total", (("outcome", "ok"),))] == 3
    assert len(w.events) == events


def test_a_stalled_round_logs_the_scale_down_it_waits_for_and_changes_nothing(tmp_path: Path) -> None:
    w = world(a={"embed": READY}, b={"embed": READY})
    placement = {"models": {"embed": {"capacity_rps": 10}}, "interval_s": 1, "cooldown_s": 0, "scale_down_after_s": 5}
    c, routed = controller(w, placement)
    routed["embed"] = 0.0
    c.decide(1.0)  # its first look, over a second without requests: low from here
    args = argparse.Namespace(dry_run=False, once=True, window=1.0, metrics_port=None, config=tmp_path / "f.yaml")
    events = len(w.events)
    for second in (1, 2, 3):  # three more stalled rounds
        w.sleep(1.0)
        with capture_logs() as logs:
            assert _run_loop(args, c, PlacementMetrics()) == 0
        waiting = [r for r in logs if r["event"] == "placement_scale_down_waiting"]
        assert [(r["model"], r["current"], r["desired"], r["low_for_s"], r["window_s"]) for r in waiting] == [
            ("embed", 2, 1, float(second), 5.0)
        ]
        assert waiting[0]["held"] == f"scale-down after 5 s of low demand: low for {second} s"
    routed["embed"] += 8.0  # a second at 8 req/s (0.4 utilization): the window starts afresh
    w.sleep(1.0)
    with capture_logs() as logs:
        _run_loop(args, c, PlacementMetrics())
    assert not [r for r in logs if r["event"].startswith("placement_scale_down")] and c.low == {}
    assert len(w.events) == events


def test_metrics_are_served_where_a_port_is_set() -> None:
    metrics = PlacementMetrics()
    metrics.round_ended(False)
    fleet = parse_fleet(FLEET)
    assert _serve_metrics(argparse.Namespace(metrics_port=None), fleet, metrics) is None
    (port,) = free_ports(1)
    server = _serve_metrics(argparse.Namespace(metrics_port=port), fleet, metrics)
    assert server is not None
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            body = response.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    assert 'extproc_placement_rounds_total{outcome="failed"} 1.0' in body


def test_explain_says_which_copies_need_more_hosts() -> None:
    hs = with_copies(tier_hosts("gpu", 2), "m", ["gpu0", "gpu1"])
    s = settings()
    p = plan([model(copies=["gpu0", "gpu1"], rate=35.0)], hs, s, now=0.0)
    assert "[unplaced: 3, the fleet needs more hosts]" in format_explain(p, hs, s, window_s=5.0, paused=None)
    assert explain_json(p, hs, s, window_s=5.0, paused=None)["models"][0]["unplaced"] == 3


def test_a_stop_ends_the_loop_between_rounds(tmp_path: Path) -> None:
    """SIGTERM sets ``stopping``: the round in flight ends, no other starts."""
    w = world(a={"embed": READY})
    c, routed = controller(w, {"models": {"embed": {"capacity_rps": 10}}, "interval_s": 5})
    routed["embed"] = 0.0
    stopping = threading.Event()
    rounds: list[float] = []

    def sleep(seconds: float) -> None:  # between rounds, then the stop arrives
        rounds.append(seconds)
        routed["embed"] += 12.0 * seconds
        w.sleep(seconds)
        if len(rounds) == 2:
            stopping.set()

    c.sleep = sleep
    args = argparse.Namespace(dry_run=False, once=False, window=5.0, metrics_port=None, config=tmp_path / "f.yaml")
    c.ops = replace(c.ops, fleet=parse_fleet({**FLEET, "placement": {"enabled": True, "interval_s": 5}}))
    (tmp_path / "f.yaml").write_text(yaml.safe_dump({**FLEET, "placement": {"enabled": True, "interval_s": 5}}))
    events = len(w.events)
    with capture_logs() as logs:
        assert _run_loop(args, c, PlacementMetrics(), stopping) == 0
    # The first look's window (5 s), then its next round's pause (5 s) with the stop: no third round.
    assert rounds == [5.0, 5.0]
    assert [r["event"] for r in logs if r["event"] in {"placement_round", "placement_stopped"}] == [
        "placement_round",
        "placement_stopped",
    ]
    assert len(w.events) == events


def test_a_stop_during_the_first_look_acts_on_nothing(tmp_path: Path) -> None:
    w = world(a={"embed": READY})
    c, routed = controller(w, {"models": {"embed": {"capacity_rps": 10}}})
    routed["embed"] = 0.0
    stopping = threading.Event()

    def sleep(seconds: float) -> None:  # the stop comes while the first look measures its window
        routed["embed"] += 50.0 * seconds
        w.sleep(seconds)
        stopping.set()

    c.sleep = sleep
    args = argparse.Namespace(dry_run=False, once=False, window=5.0, metrics_port=None, config=tmp_path / "f.yaml")
    events = len(w.events)
    with capture_logs() as logs:
        assert _run_loop(args, c, PlacementMetrics(), stopping) == 0
    assert [r["event"] for r in logs if r["event"].startswith("placement_")] == ["placement_stopped"]
    assert len(w.events) == events


def test_each_round_looks_up_the_pickers_and_envoys_again(tmp_path: Path) -> None:
    w = world(a={"embed": READY})
    c, routed = controller(w, {"models": {"embed": {"capacity_rps": 10}}})
    routed["embed"] = 0.0
    looked: list[int] = []

    def endpoints(ops: Ops) -> Ops:
        looked.append(len(looked))
        return ops

    c.endpoints = endpoints
    args = argparse.Namespace(dry_run=True, once=True, window=1.0, metrics_port=None, config=tmp_path / "f.yaml")
    for _ in range(3):
        w.sleep(15.0)
        assert _run_loop(args, c, PlacementMetrics()) == 0
    assert looked == [0, 1, 2]


def test_a_lookup_that_fails_makes_a_failed_round_that_changes_nothing(tmp_path: Path) -> None:
    w = world(a={"embed": READY})
    c, routed = controller(w, {"models": {"embed": {"capacity_rps": 10}}})
    routed["embed"] = 0.0

    def endpoints(ops: Ops) -> Ops:
        raise OpsError("dns+http://extproc-picker:9090: extproc-picker resolves to no address")

    c.endpoints = endpoints
    metrics = PlacementMetrics()
    args = argparse.Namespace(dry_run=False, once=True, window=1.0, metrics_port=None, config=tmp_path / "f.yaml")
    events = len(w.events)
    with capture_logs() as logs:
        assert _run_loop(args, c, metrics) == 1
    assert [r["error"] for r in logs if r["event"] == "placement_round_failed"] == [
        "dns+http://extproc-picker:9090: extproc-picker resolves to no address"
    ]
    assert samples(metrics)[("extproc_placement_rounds_total", (("outcome", "failed"),))] == 1
    assert len(w.events) == events
