"""The fleet simulator (``python -m benchmarks.sim``): its scenarios, its queueing against theory, Envoy's
retries, the oracle, and the real scheduler making the picker's decisions."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from benchmarks.routing import find_scenario, load_scenario
from benchmarks.sim import cli, diagnose
from benchmarks.sim.engine import OK, RESET, Sim
from benchmarks.sim.policies import FACTORIES, Picker, buckets
from benchmarks.sim.scenario import (
    SimScenario,
    SimScenarioError,
    family,
    load_sim_scenario,
    parse_sim_scenario,
    with_fleet_settings,
)
from benchmarks.sim.trace import build_trace
from extproc.datapath.scheduling.scheduler import Scheduler
from extproc.telemetry.triton_metrics import parse_metrics


def scenario(**overrides: Any) -> SimScenario:
    data: dict[str, Any] = {
        "name": "unit",
        "seed": 7,
        "hosts": [
            {"name": "fast", "count": 2, "models": ["m"]},
            {"name": "slow", "count": 1, "factor": 4.0, "models": ["m"]},
        ],
        "models": {"m": {"max_batch": 8, "queue_delay_us": 500, "fixed_ms": 8, "per_row_ms": 2}},
        "load": {"load": 0.5, "requests": 2000, "warmup_s": 0.5, "mix": [{"model": "m"}]},
    }
    data.update(overrides)
    return parse_sim_scenario(data)


def run(s: SimScenario, policy: str, pickers: int = 1) -> tuple[Sim, dict[str, Any]]:
    return cli.simulate(s, build_trace(s), policy, pickers)


# ---------------------------------------------------------------------------------------------- scenarios


def test_the_family_loads_and_spans_what_issue_18_asks() -> None:
    scenarios = [load_sim_scenario(p) for p in family()]
    assert len(scenarios) >= 30
    hosts = [sum(g.count for g in s.hosts) for s in scenarios]
    assert min(hosts) == 3 and max(hosts) == 1000
    loads = [s.rate_rps() / s.capacity_rps() for s in scenarios if s.routing_scenario is None]
    assert min(loads) <= 0.3 + 1e-9 and max(loads) >= 0.9 - 1e-9
    spreads = [max(g.factor for g in s.hosts) / min(g.factor for g in s.hosts) for s in scenarios]
    assert 1.0 in spreads and 8.0 in spreads
    dists = {e.rows.dist for s in scenarios for e in s.load.mix}
    assert {"fixed", "uniform", "bimodal", "heavy"} <= dists
    assert any(s.load.arrival.process == "onoff" for s in scenarios)
    actions = {e.action for s in scenarios for e in s.events}
    assert {"die", "factor", "revive"} <= actions
    assert any(max(s.pickers) >= 8 for s in scenarios)
    assert {s.routing_scenario for s in scenarios} >= {
        "heterogeneous",
        "homogeneous",
        "mixed_tiers",
        "partial_placement",
        "mixed_sizes",
        "wide_spread",
        "slowdown",
    }


def test_a_real_scenarios_version_takes_its_hosts_and_load() -> None:
    sim = load_sim_scenario(next(p for p in family() if p.stem == "real_heterogeneous"))
    real = load_scenario(find_scenario("heterogeneous"))
    assert [n for n, _ in sim.host_specs()] == [h["name"] for h in real.fleet["hosts"]]
    assert [g.factor for g in sim.hosts] == [h["launch"]["service_time_factor"] for h in real.fleet["hosts"]]
    assert sim.rate_rps() == real.load.rate_rps and sim.seed == real.load.seed
    assert sim.load.duration_s == real.load.duration_s and sim.load.warmup_s == real.load.warmup_s
    # The real benchmark's baseline processor is the simulator's expected_completion_baseline.
    assert sim.policies == ("round_robin", "least_request", "expected_completion_baseline", "picker", "oracle")


def test_a_real_slowdown_is_a_factor_event_of_the_hosts_launch_speed() -> None:
    sim = load_sim_scenario(next(p for p in family() if p.stem == "real_slowdown"))
    (slowdown,) = load_scenario(find_scenario("slowdown")).slowdowns
    (event,) = sim.events
    assert (event.at_s, event.host, event.action, event.factor) == (slowdown.at_s, slowdown.host, "factor", 6.0)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"models": {}}, "models"),
        ({"events": [{"at_s": 1, "host": "nope", "action": "die"}]}, "no host or group 'nope'"),
        ({"load": {"load": 0.5, "rate_rps": 3, "requests": 5, "mix": [{"model": "m"}]}}, "exactly one of rate_rps"),
        (
            {"load": {"load": 0.5, "requests": 5, "mix": [{"model": "m", "rows": {"dist": "fixed", "value": 9}}]}},
            "above m's max_batch",
        ),
        ({"fleet": {"picker": {"max_hosts": 99}}}, "fleet.picker.max_hosts"),
    ],
)
def test_an_invalid_scenario_names_its_key(override: dict[str, Any], message: str) -> None:
    with pytest.raises(SimScenarioError, match=message):
        scenario(**override)


def test_fleet_settings_change_the_fleet_and_refuse_what_the_schema_refuses() -> None:
    base = scenario(fleet={"picker": {"poll": {"repository_ms": 2000}}})
    changed = with_fleet_settings(base, ["picker.poll.triton_metrics_ms=50", "picker.profile.picker=power_of_two"])
    fleet = changed.real_fleet()
    assert fleet.picker.poll.triton_metrics_ms == 50 and fleet.picker.poll.repository_ms == 2000
    assert fleet.picker.profile.picker == "power_of_two"
    assert base.real_fleet().picker.poll.triton_metrics_ms != 50  # the scenario itself is unchanged
    with pytest.raises(SimScenarioError, match=r"key fleet\.picker\.poll\.triton_metrics_msx"):
        with_fleet_settings(base, ["picker.poll.triton_metrics_msx=50"])
    with pytest.raises(SimScenarioError, match="expected KEY=VALUE"):
        with_fleet_settings(base, ["picker.poll.triton_metrics_ms"])
    with pytest.raises(SimScenarioError, match=r"fleet\.repository_ms is not a mapping"):
        with_fleet_settings(base, ["picker.poll.repository_ms.x=1"])


def test_trace_sizes_and_bursts_follow_the_scenario() -> None:
    s = scenario(
        load={
            "load": 0.5,
            "duration_s": 20,
            "warmup_s": 0,
            "arrival": {"process": "onoff", "on_s": 0.5, "off_s": 1.5, "off_fraction": 0.0},
            "mix": [{"model": "m", "rows": {"dist": "bimodal", "small": 1, "large": 8, "p_large": 0.25}}],
        }
    )
    trace = build_trace(s)
    assert all(t % 2.0 < 0.5 for t in trace.arrival)  # nothing in the off phases
    assert abs(len(trace) / 20 - s.rate_rps()) / s.rate_rps() < 0.1  # the mean rate is the load's
    assert set(trace.rows) == {1, 8}
    assert abs(trace.rows.count(8) / len(trace) - 0.25) < 0.03


# ------------------------------------------------------------------------------------------ the engine


def test_a_seed_repeats_exactly_and_another_seed_differs() -> None:
    s = scenario()
    for policy in ("least_request", "picker", "expected_completion_baseline"):
        a, _ = run(s, policy, pickers=2)
        b, _ = run(s, policy, pickers=2)
        assert a.done == b.done and a.status == b.status and a.host_of == b.host_of
    other, _ = run(s.model_copy(update={"seed": 8}), "picker")
    first, _ = run(s, "picker")
    assert other.done != first.done


def test_one_unbatched_host_is_an_md1_queue() -> None:
    """Poisson arrivals, a deterministic 10 ms service, one server at 50 %: the mean wait in queue is
    rho x D / (2 (1 - rho)) = 5 ms (Pollaczek-Khinchine), so the mean latency is 15 ms."""
    s = scenario(
        hosts=[{"name": "only", "models": ["m"]}],
        models={"m": {"max_batch": 1, "queue_delay_us": 0, "fixed_ms": 10, "per_row_ms": 0}},
        load={"rate_rps": 50, "requests": 40000, "warmup_s": 20, "mix": [{"model": "m"}]},
    )
    _, summary = run(s, "round_robin")
    assert summary["ok"] == summary["requests"]
    assert summary["latency"]["mean_ms"] == pytest.approx(15.0, rel=0.04)
    assert summary["latency"]["p50_ms"] >= 10.0


def test_the_dynamic_batcher_waits_for_its_queue_delay_and_fills_batches() -> None:
    s = scenario(
        hosts=[{"name": "only", "models": ["m"]}],
        models={"m": {"max_batch": 4, "queue_delay_us": 2000, "fixed_ms": 10, "per_row_ms": 1}},
        load={"rate_rps": 1, "requests": 1, "warmup_s": 0, "mix": [{"model": "m"}]},
    )
    sim, _ = run(s, "round_robin")
    arrival = sim.trace.arrival[0]
    # A lone request waits the 2 ms queue delay, then runs alone: 10 + 1 ms.
    assert sim.done[0] - arrival == pytest.approx(0.013)
    b = sim.hosts[0].batchers[0]
    assert (b.success, b.count, b.exec) == (1, 1, 1)
    assert b.queue_us == pytest.approx(2000, abs=1)
    assert b.compute_us == pytest.approx(11000, abs=1)


def test_the_metrics_page_reads_back_through_the_real_parser() -> None:
    s = scenario(
        hosts=[{"name": "h", "models": ["m", "n"]}],
        models={
            "m": {"max_batch": 8, "fixed_ms": 8, "per_row_ms": 2},
            "n": {"max_batch": 32, "fixed_ms": 1, "per_row_ms": 1},
        },
        load={
            "load": 0.5,
            "requests": 500,
            "mix": [{"model": "m"}, {"model": "n", "rows": {"dist": "uniform", "min": 1, "max": 8}}],
        },
    )
    sim, _ = run(s, "round_robin")
    snap = parse_metrics(sim.hosts[0].metrics_text())
    for b in sim.hosts[0].batchers.values():
        counters = snap.series[b.label]
        assert counters.request_success == b.success and counters.inference_count == b.count
        assert counters.exec_count == b.exec and counters.compute_infer_us == round(b.compute_us)
    assert sum(b.success for b in sim.hosts[0].batchers.values()) == 500
    assert sum(b.count for b in sim.hosts[0].batchers.values()) > 500  # rows, not requests


def test_tries_on_a_dead_host_are_retried_elsewhere() -> None:
    s = scenario(
        hosts=[{"name": "host", "count": 3, "models": ["m"]}],
        load={"load": 0.5, "duration_s": 8, "warmup_s": 0, "mix": [{"model": "m"}]},
        events=[{"at_s": 2.0, "host": "host-1", "action": "die"}],
        # The picker reads Envoy every 300 ms: for a while after the death its view still has the host (with
        # the default polls, whether a pick names it before the next poll is up to where the death falls).
        fleet={"picker": {"poll": {"envoy_admin_ms": 300}}},
    )
    for policy in ("round_robin", "least_request", "picker", "expected_completion_baseline"):
        sim, summary = run(s, policy)
        # Only what was on the host when it died fails (reset after the request was sent: not retried).
        assert set(summary["errors"]) <= {"reset"}, (policy, summary["errors"])
        resets = [r for r in range(len(sim.trace)) if sim.status[r] == RESET]
        assert all(sim.trace.arrival[r] < 2.0 for r in resets), policy
        assert len(resets) <= 16, policy
        # Every later try that found it dead (connection refused) was retried on another host and served.
        refused = [r for r in range(len(sim.trace)) if sim.trace.arrival[r] > 2.0 and 1 in sim.tried[r]]
        assert all(sim.status[r] == OK and sim.host_of[r] != 1 for r in refused), policy
        assert summary["retries"] == sum(len(sim.tried[r]) - 1 for r in range(len(sim.trace))), policy
        if policy in ("picker", "expected_completion_baseline"):
            # Envoy ejected the host after the resets (3 local-origin failures in a row), but the pickers'
            # lists name it until their view of Envoy and of Triton catches up.
            assert refused, policy
        # Once Envoy's health checks (2 x 1 s) and the pickers' views caught up, nothing goes there.
        late = [r for r in range(len(sim.trace)) if sim.trace.arrival[r] > 6.0]
        assert all(1 not in sim.tried[r] for r in late), policy
        assert all(sim.status[r] == OK for r in late), policy


def test_a_host_that_comes_back_is_used_again() -> None:
    s = scenario(
        hosts=[{"name": "host", "count": 3, "models": ["m"]}],
        load={"load": 0.6, "duration_s": 12, "warmup_s": 0, "mix": [{"model": "m"}]},
        events=[{"at_s": 1.0, "host": "host-1", "action": "die"}, {"at_s": 5.0, "host": "host-1", "action": "revive"}],
    )
    sim, _ = run(s, "picker")
    late = [r for r in range(len(sim.trace)) if sim.trace.arrival[r] > 9.0 and sim.status[r] == OK]
    assert sum(1 for r in late if sim.host_of[r] == 1) > len(late) / 10


def test_the_oracle_is_no_worse_than_round_robin_on_a_skewed_fleet() -> None:
    s = scenario(
        hosts=[
            {"name": "x1", "count": 3, "models": ["m"]},
            {"name": "x8", "count": 3, "factor": 8.0, "models": ["m"]},
        ],
        load={"load": 0.6, "requests": 6000, "warmup_s": 0.5, "mix": [{"model": "m"}]},
    )
    _, oracle = run(s, "oracle")
    _, rr = run(s, "round_robin")
    _, lr = run(s, "least_request")
    assert oracle["errors"] == {} and oracle["ok"] == oracle["requests"]  # round robin overloads the slow hosts
    assert oracle["latency"]["p99_ms"] <= rr["latency"]["p99_ms"]
    assert oracle["latency"]["p99_ms"] <= lr["latency"]["p99_ms"]
    # The fast hosts take most of the work.
    assert oracle["group_share"]["x1"] > 0.8


def test_the_picker_policy_is_the_real_scheduler(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_decide = Scheduler.decide

    def counting(self: Scheduler, request: Any) -> Any:
        calls.append(request)
        return real_decide(self, request)

    monkeypatch.setattr(Scheduler, "decide", counting)
    s = scenario()
    sim, summary = run(s, "picker", pickers=2)
    assert len(calls) == len(sim.trace)
    assert summary["errors"] == {}
    policy = sim.policy
    assert isinstance(policy, Picker)
    assert all(isinstance(sch, Scheduler) for sch in policy.schedulers)
    for view in policy.views:
        # Fed through the real telemetry code: fitted times from the rendered counters, Envoy's view.
        times = [st.load.models["m"] for st in view.states]
        assert all(t.service_ms is not None and t.exec_ms is not None for t in times)
        assert all(st.envoy_at is not None and st.batching["m"].max_batch == 8 for st in view.states)
    # Each gateway's picker sees its own Envoy only.
    assert policy.views[0].gateway is not policy.views[1].gateway


def test_each_of_several_pickers_measures_its_share_of_the_hosts_traffic() -> None:
    """Four gateways split the traffic: on each busy host the pickers' shares (1 / their in-flight scale)
    add up to about the whole, each well under 1; one picker's stays 1."""
    s = scenario(load={"load": 0.6, "requests": 6000, "warmup_s": 0.5, "mix": [{"model": "m"}]})
    sim, _ = run(s, "picker", pickers=4)
    assert isinstance(sim.policy, Picker)
    for i, host in enumerate(sim.hosts):
        if host.name.startswith("fast"):
            shares = [1 / view.states[i].load.envoy_scale for view in sim.policy.views]
            assert 0.8 < sum(shares) < 1.2 and max(shares) < 0.6, shares
    one, _ = run(s, "picker")
    assert isinstance(one.policy, Picker)
    assert all(st.load.envoy_scale == 1.0 for st in one.policy.views[0].states)


SHARING = {"picker": {"replicas": {"follow": "gw0:9100", "token_file": "token", "share_load": True}}}


def test_pickers_that_share_their_loads_hear_each_other_and_scale_nothing() -> None:
    """With picker.replicas.share_load each gateway's picker applies the others' picks, which arrive
    telemetry.replica_lag_ms late, and its counts and picks stand for themselves (scale 1)."""
    s = scenario(fleet=SHARING, telemetry={"replica_lag_ms": 3.0})
    sim, _ = run(s, "picker", pickers=2)
    assert isinstance(sim.policy, Picker)
    for view in sim.policy.views:
        assert view.peer_load is not None and view.peer_load.peers == 1
        applied, lost = view.peer_load.taken()
        assert applied > 500 and lost == 0
        assert all(state.peer_count is not None and state.scale() == 1.0 for state in view.states)
    alone, _ = run(scenario(fleet=SHARING), "picker")
    assert isinstance(alone.policy, Picker)
    assert alone.policy.views[0].peer_load is not None and alone.policy.views[0].peer_load.peers == 0


def test_the_picker_sends_sizes_the_fleet_classifies_by() -> None:
    s = scenario(
        hosts=[
            {"name": "cpu", "tier": "cpu", "models": ["m"]},
            {"name": "gpu", "count": 2, "tier": "gpu", "models": ["m"]},
        ],
        fleet={"models": [{"name": "m", "tiers": ["cpu", "gpu"], "rules": [{"tier": "gpu", "min_bytes": 1000}]}]},
        load={
            "load": 0.3,
            "requests": 1000,
            "warmup_s": 0,
            "mix": [
                {"model": "m", "rows": {"dist": "fixed", "value": 1}, "bytes_per_row": 10, "name": "small"},
                {"model": "m", "rows": {"dist": "fixed", "value": 8}, "bytes_per_row": 200, "name": "large"},
            ],
        },
    )
    sim, _ = run(s, "picker")
    for r in range(len(sim.trace)):
        expected_cpu = sim.trace.rows[r] == 1
        assert (sim.host_of[r] == 0) == expected_cpu


def test_the_diagnosis_observes_the_pickers_run_without_changing_it() -> None:
    """The diagnosed run decides as benchmarks.sim's picker x1 does; its shares add up; the simulated batch
    cost is the scenario's times the host's factor; with one-row requests Triton's request-weighted rows
    per execution are at least the counted ones (Jensen), which is what biases the fit."""
    s = scenario()
    sim, rows = diagnose.diagnose(s)
    plain, _ = run(s, "picker")
    assert sim.host_of == plain.host_of
    assert sum(r["request_share"] for r in rows) == pytest.approx(1.0)
    fast, slow = sorted(rows, key=lambda r: r["group"])
    assert (fast["true_fixed_ms"], fast["true_per_row_ms"]) == pytest.approx((8.0, 2.0))
    assert (slow["true_fixed_ms"], slow["true_per_row_ms"]) == pytest.approx((32.0, 8.0))
    assert fast["request_share"] > 0.9 and fast["in_flight_envoy"] > 1.0
    assert all(r["request_weighted_rows_per_batch"] >= r["rows_per_batch"] >= 1.0 for r in rows)
    assert len(diagnose.format_report(rows).splitlines()) == 2 + len(rows)


def test_the_diagnosis_reads_the_first_of_several_pickers() -> None:
    """With 2 pickers the diagnosed run is benchmarks.sim's picker x2, and the count each estimate is held
    against is every gateway's (each picker's estimate scales its own requests by its share)."""
    s = scenario()
    sim, rows = diagnose.diagnose(s, pickers=2)
    plain, _ = run(s, "picker", pickers=2)
    assert sim.host_of == plain.host_of
    assert sum(r["request_share"] for r in rows) == pytest.approx(1.0)
    fast = max(rows, key=lambda r: r["request_share"])
    assert fast["in_flight_envoy"] > 1.0


def test_telemetry_buckets_spread_every_host_once() -> None:
    slots = buckets(10, 0.25, 0.005, 0.3)
    assert len(slots) == 50
    assert sorted(h for s in slots for h in s) == list(range(10))


def test_every_policy_runs_with_several_pickers() -> None:
    s = scenario()
    for policy in FACTORIES:
        _, summary = run(s, policy, pickers=4)
        assert summary["ok"] == summary["requests"], policy
        assert math.isfinite(summary["latency"]["p99_ms"])


# --------------------------------------------------------------------------------------------- the CLI


def test_the_command_writes_json_with_command_seed_and_scenario(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = scenario().model_dump(mode="json")
    path = tmp_path / "unit.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    out = tmp_path / "out.json"
    code = cli.main(
        [
            "--scenario",
            str(path),
            "--seed",
            "3",
            "--policies",
            "baseline",
            "oracle",
            "--pickers",
            "1",
            "2",
            "--fleet",
            "picker.poll.triton_metrics_ms=100",
            "--replica-lag-ms",
            "4",
            "-o",
            str(out),
        ]
    )
    assert code == 0
    report = json.loads(out.read_text())
    assert report["seed"] == 3 and report["scenario"]["resolved"]["seed"] == 3
    assert report["scenario"]["resolved"]["telemetry"]["replica_lag_ms"] == 4
    assert report["revision"] not in ("", "?")  # the commit measured
    assert report["scenario"]["resolved"]["fleet"]["picker"]["poll"]["triton_metrics_ms"] == 100
    assert "--seed 3" in report["command"]
    assert [(r["policy"], r["pickers"]) for r in report["runs"]] == [
        ("expected_completion_baseline", 1),
        ("oracle", 1),
        ("expected_completion_baseline", 2),
    ]
    assert report["comparisons"]["1"]["expected_completion_baseline"]["p99_over_baseline"] == 1.0
    assert "p99" in capsys.readouterr().out
    assert cli.main(["--scenario", str(path), "--policies", "nope"]) == 2
    assert cli.main(["--scenario", str(path), "--fleet", "picker.nope=1"]) == 2
    assert cli.main(["--scenario", str(path), "--replica-lag-ms", "-1"]) == 2


def test_execution_jitter_lengthens_executions_alike_for_every_policy() -> None:
    base = load_sim_scenario(next(p for p in family() if p.stem == "real_homogeneous"))
    models = {k: v.model_copy(update={"jitter_ms": 0.0}) for k, v in base.models.items()}
    quiet = base.model_copy(update={"models": models})
    trace = build_trace(base)
    p50 = {}
    for name, scenario in (("quiet", quiet), ("jitter", base)):
        runs = [cli.simulate(scenario, trace, policy)[1] for policy in ("round_robin", "least_request")]
        p50[name] = [r["latency"]["p50_ms"] for r in runs]
    # An exponential delay of mean 2 ms per execution: at least that much more at the median, and more
    # where the longer executions make requests queue, but not without bound.
    assert all(2.0 < j - q < 6.0 for j, q in zip(p50["jitter"], p50["quiet"], strict=True)), p50


def test_validation_compares_each_policy_of_a_real_run_with_its_simulation() -> None:
    from benchmarks.sim.validate import compare

    real = {
        "scenario": "homogeneous",
        "policies": [
            {"policy": "least_request", "latency": {"p99_ms": 35.0}},
            {"policy": "baseline", "latency": {"p99_ms": 1000.0}},
        ],
    }
    rows = compare(real, tolerance=0.25)
    assert [r["policy"] for r in rows] == ["least_request", "baseline"]
    for row in rows:
        assert row["sim_over_real"] == pytest.approx(row["sim_p99_ms"] / row["real_p99_ms"])
    assert rows[0]["within"] and not rows[1]["within"]
