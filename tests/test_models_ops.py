"""``extproc models``: planning and executing against fakes at the client layer (Triton's repository API and
the picker's HTTP endpoint, with a fake clock), then end to end against the real local stack (one stack for
the module): the fleet table, unload + load under light load without a failed request, a reload dry run and
``extproc status``."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from extproc.cli import _parser
from extproc.config import Fleet, HostSpec, Tier, parse_fleet
from extproc.ops import OpsError
from extproc.ops import models as m
from extproc.ops.execute import Ops, Timeouts, execute_load, execute_roll
from extproc.ops.plans import Skip, Target, merged_view, plan_load, plan_place, plan_roll, rank
from extproc.ops.present import (
    format_load_plan,
    format_model_summary,
    format_models,
    format_results,
    format_roll_plan,
    models_json,
)
from extproc.ops.status import PickerHost, PickerStatus
from extproc.ops.triton_api import (
    ABSENT,
    LOADING,
    NOT_LOADED,
    READY,
    UNAVAILABLE,
    UNKNOWN,
    UNLOADING,
    GrpcTriton,
    HostIndex,
    IndexEntry,
    TritonError,
    read_index,
)
from extproc.ops.triton_api import _describe as describe
from extproc.telemetry.envoy_admin import EndpointStatus
from tests.stack import REPO, Stack, local_fleet, start_stack, stop_stack

# --- a fake fleet: Triton hosts and pickers over one clock -----------------------------------------------

FLEET: dict[str, Any] = {
    "hosts": [
        {"name": "a", "address": "10.0.0.1", "tier": "gpu"},
        {"name": "b", "address": "10.0.0.2", "tier": "gpu"},
        {"name": "c", "address": "10.0.0.3", "tier": "cpu"},
    ],
    "models": [
        {"name": "mlp", "tiers": ["cpu", "gpu"]},
        {"name": "embed", "tiers": ["gpu"]},
        {"name": "solo", "tiers": ["gpu"]},
    ],
}
REPOSITORY = ("mlp", "embed", "solo", "extra")


def fleet() -> Fleet:
    return parse_fleet(FLEET, "fleet.yaml")


@dataclass
class World:
    """What the fakes share: Triton's states per host, the clock, and a log of every action."""

    fleet: Fleet
    states: dict[str, dict[str, tuple[str, str]]]  # host → model → (state, reason)
    t: float = 0.0
    events: list[str] = field(default_factory=list)
    down: set[str] = field(default_factory=set)
    fail_load: set[tuple[str, str]] = field(default_factory=set)
    in_flight: dict[str, float] = field(default_factory=dict)  # before a drain
    drain_needs_s: float = 0.5  # after a drain, requests in flight finish after this long
    unloading_reads: int = 1  # index reads that still show UNLOADING after an unload
    picker_stuck: set[tuple[str, str]] = field(default_factory=set)  # (host, model) a picker keeps READY
    gpu: dict[str, tuple[int, int]] = field(default_factory=dict)  # host → (used, total)
    ejected: set[str] = field(default_factory=set)
    # in flight at each unload, per host
    at_unload: list[tuple[str, float]] = field(default_factory=list)
    _unloading: dict[tuple[str, str], int] = field(default_factory=dict)
    _drained_at: dict[tuple[str, str], float] = field(default_factory=dict)

    def clock(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds

    def in_flight_now(self, host: str, drained_at: float | None) -> float:
        if drained_at is None:
            return self.in_flight.get(host, 0.0)
        return self.in_flight.get(host, 0.0) if self.t - drained_at < self.drain_needs_s else 0.0

    def picker_in_flight(self, host: str) -> float:
        drains = [at for (url, h), at in self._drained_at.items() if h == host]
        return self.in_flight_now(host, min(drains) if drains else None)


def world(**states: dict[str, str]) -> World:
    w = World(fleet(), {h.name: {} for h in fleet().hosts})
    for host, models in states.items():
        for model, state in models.items():
            w.states[host][model] = (state, "")
    return w


class FakeTriton:
    def __init__(self, w: World) -> None:
        self.w = w

    def _check(self, host: HostSpec) -> None:
        if host.name in self.w.down:
            raise TritonError(host.name, "unreachable (connection refused)")

    def index(self, host: HostSpec, timeout_s: float) -> Sequence[IndexEntry]:
        self._check(host)
        out = []
        for model in REPOSITORY:
            state, reason = self.w.states[host.name].get(model, ("", ""))
            key = (host.name, model)
            if key in self.w._unloading:
                if self.w._unloading[key] > 0:
                    self.w._unloading[key] -= 1
                    state = UNLOADING
                else:
                    del self.w._unloading[key]
            out.append(IndexEntry(model, "1" if state else "", state, reason))
        return out

    def load(self, host: HostSpec, model: str, timeout_s: float) -> None:
        self._check(host)
        self.w.events.append(f"load {host.name} {model}")
        if (host.name, model) in self.w.fail_load:
            self.w.states[host.name][model] = (UNAVAILABLE, "boom")
            raise TritonError(host.name, f"load {model} failed: boom")
        self.w.states[host.name][model] = (READY, "")

    def unload(self, host: HostSpec, model: str, timeout_s: float) -> None:
        self._check(host)
        self.w.events.append(f"unload {host.name} {model}")
        self.w.at_unload.append((host.name, self.w.picker_in_flight(host.name)))
        self.w.states[host.name][model] = (UNAVAILABLE, "unloaded")
        self.w._unloading[(host.name, model)] = self.w.unloading_reads


class FakePicker:
    def __init__(self, w: World, url: str = "http://picker-1") -> None:
        self.w = w
        self._url = url
        self.draining: set[str] = set()
        self.fail = False

    @property
    def url(self) -> str:
        return self._url

    def status(self) -> PickerStatus:
        if self.fail:
            raise OpsError(f"picker GET {self._url}/status: connection refused")
        hosts = {}
        for host in self.w.fleet.hosts:
            ready = {
                model: ("1",)
                for model in REPOSITORY
                if self.w.states[host.name].get(model, ("", ""))[0] == READY
                or (host.name, model) in self.w.picker_stuck
            }
            fresh = host.name not in self.w.down
            draining = host.name in self.draining
            ejected = host.name in self.w.ejected
            used, total = self.w.gpu.get(host.name, (None, None))
            hosts[host.name] = PickerHost(
                name=host.name,
                tier=host.tier.value,
                fresh=fresh,
                routable=fresh and not draining and not ejected,
                ready=ready,
                in_flight=self.w.picker_in_flight(host.name),
                draining=draining,
                ejected=ejected,
                gpu_memory_used=used,
                gpu_memory_total=total,
            )
        return PickerStatus(self._url, True, hosts)

    def drain(self, host: str) -> bool:
        self.w.events.append(f"drain {host} {self._url}")
        self.draining.add(host)
        self.w._drained_at[(self._url, host)] = self.w.t
        return True

    def undrain(self, host: str) -> bool:
        self.w.events.append(f"undrain {host} {self._url}")
        self.draining.discard(host)
        self.w._drained_at.pop((self._url, host), None)
        return False


class FakeEnvoy:
    def __init__(self, w: World) -> None:
        self.w = w
        self.url = "http://envoy-admin"

    def endpoints(self) -> Mapping[str, EndpointStatus]:
        return {
            h.http_endpoint: EndpointStatus(rq_active=int(self.w.picker_in_flight(h.name))) for h in self.w.fleet.hosts
        }


def ops_for(w: World, pickers: Sequence[FakePicker] | None = None, **timeouts: float) -> tuple[Ops, list[str]]:
    lines: list[str] = []
    ops = Ops(
        w.fleet,
        FakeTriton(w),
        list(pickers) if pickers is not None else [FakePicker(w)],
        [FakeEnvoy(w)],
        Timeouts(**timeouts),  # type: ignore[arg-type]
        lines.append,
        w.clock,
        w.sleep,
    )
    return ops, lines


def local_world() -> World:
    """Like deploy/local: a has everything, b the GPU-only models, c mlp."""
    return world(
        a={"mlp": READY, "embed": READY, "solo": READY},
        b={"embed": READY},
        c={"mlp": READY},
    )


def view(w: World, picker: FakePicker | None = None) -> dict[str, PickerHost]:
    return merged_view([(picker or FakePicker(w)).status()])


def indexes(w: World) -> dict[str, HostIndex]:
    return read_index(FakeTriton(w), w.fleet.hosts, 1.0)


# --- the index and the table ------------------------------------------------------------------------------


def test_host_index_states() -> None:
    host = fleet().hosts[0]
    entries = (
        IndexEntry("ready", "1", READY),
        IndexEntry("ready", "2", UNAVAILABLE, "unloaded"),
        IndexEntry("two", "1", READY),
        IndexEntry("two", "2", READY),
        IndexEntry("going", "1", UNLOADING),
        IndexEntry("gone", "1", UNAVAILABLE, "unloaded"),
        IndexEntry("never"),
        IndexEntry("broken", "1", UNAVAILABLE, "Internal: bad config"),
    )
    index = HostIndex(host, entries)
    assert index.state("ready") == READY and index.ready_versions("ready") == ("1",)
    assert index.ready_versions("two") == ("1", "2")
    assert index.state("going") == UNLOADING
    assert index.state("gone") == NOT_LOADED
    assert index.state("never") == NOT_LOADED
    assert index.state("broken") == UNAVAILABLE and index.reason("broken") == "Internal: bad config"
    assert index.state("elsewhere") == ABSENT
    assert HostIndex(host, error="down").state("ready") == UNKNOWN


def test_fleet_table_reports_a_down_host_and_keeps_going() -> None:
    w = local_world()
    w.down.add("b")
    w.states["c"]["extra"] = (UNAVAILABLE, "failed to load")
    f = fleet()
    text = format_models(f, indexes(w))
    lines = text.splitlines()
    assert lines[0].split() == ["MODEL", "TIERS", "a", "(gpu)", "b", "(gpu)", "c", "(cpu)"]
    assert lines[1].split() == ["mlp", "cpu,gpu", "READY", "?", "READY"]
    assert lines[2].split() == ["embed", "gpu", "READY", "?", "-"]
    assert lines[4].split() == ["extra", "any", "-", "?", "UNAVAILABLE"]
    assert "b: unreachable (connection refused)" in text
    assert "c: extra UNAVAILABLE: failed to load" in text
    doc = models_json(f, indexes(w), ["mlp"])
    assert doc["hosts"]["b"] == {"tier": "gpu", "error": "b: unreachable (connection refused)"}
    assert doc["models"]["mlp"]["tiers"] == ["cpu", "gpu"]
    assert doc["models"]["mlp"]["hosts"]["a"] == {"state": "READY", "ready_versions": ["1"], "reason": None}
    assert doc["models"]["mlp"]["hosts"]["b"]["state"] == "?"


def test_read_index_runs_hosts_in_parallel() -> None:
    w = local_world()
    barrier = threading.Barrier(3, timeout=5)

    class Slow(FakeTriton):
        def index(self, host: HostSpec, timeout_s: float) -> Sequence[IndexEntry]:
            barrier.wait()  # only passes when all three hosts are asked at once
            return super().index(host, timeout_s)

    assert set(read_index(Slow(w), w.fleet.hosts, 1.0)) == {"a", "b", "c"}


# --- load and place ---------------------------------------------------------------------------------------


def test_rank_prefers_default_tier_then_gpu_headroom_then_fewest_models() -> None:
    a, b, c = fleet().hosts
    targets = [
        Target(a, gpu_free=2 * 2**30, gpu_percent=75.0, loaded=1),
        Target(b, gpu_free=6 * 2**30, gpu_percent=25.0, loaded=5),
        Target(c, gpu_free=None, gpu_percent=None, loaded=0),
    ]
    assert [t.host.name for t in rank(targets, (Tier.GPU, Tier.CPU))] == ["b", "a", "c"]
    assert [t.host.name for t in rank(targets, (Tier.CPU, Tier.GPU))] == ["c", "b", "a"]
    unknown = [Target(a, None, None, 3), Target(b, None, None, 1)]
    assert [t.host.name for t in rank(unknown, None)] == ["b", "a"]
    assert "6.0 GiB GPU memory free (25% used)" in targets[1].describe()


def test_place_adds_hosts_by_gpu_headroom_and_skips_unroutable_ones() -> None:
    w = world(a={"embed": READY})
    w.gpu = {"a": (7, 10), "b": (2, 10)}
    plan = plan_place(w.fleet, "embed", indexes(w), view(w), count=2)
    assert plan.present == ("a",) and [t.host.name for t in plan.targets] == ["b"] and not plan.problems
    assert plan.skipped == ()  # c's tier is not embed's: not even considered
    w.ejected.add("b")
    plan = plan_place(w.fleet, "embed", indexes(w), view(w), count=2)
    assert plan.targets == () and Skip("b", "ejected by Envoy") in plan.skipped
    assert plan.problems == ("only 1 of 2 hosts possible in tiers gpu",) and plan.short == 1
    text = format_load_plan(plan, "place")
    assert "place embed on 2 hosts in all: READY now on a" in text and "nothing to load" in text


def test_place_fills_the_default_tier_first_and_respects_tier() -> None:
    w = world()
    plan = plan_place(w.fleet, "mlp", indexes(w), view(w), count=2)
    assert [t.host.name for t in plan.targets] == ["c", "a"]  # cpu is mlp's default tier; then a (fewest, name)
    plan = plan_place(w.fleet, "mlp", indexes(w), view(w), count=1, tier=Tier.GPU)
    assert [t.host.name for t in plan.targets] == ["a"]
    plan = plan_place(w.fleet, "embed", indexes(w), view(w), count=1, tier=Tier.CPU)
    assert plan.problems[0] == "embed may only run on tiers gpu (fleet file), not cpu"
    with pytest.raises(OpsError):
        plan_place(w.fleet, "embed", indexes(w), view(w), count=0)


def test_load_by_hosts_tier_and_count() -> None:
    w = world(a={"embed": READY})
    idx, v = indexes(w), view(w)
    plan = plan_load(w.fleet, "embed", idx, v, tier=Tier.GPU)
    assert plan.present == ("a",) and [t.host.name for t in plan.targets] == ["b"]
    plan = plan_load(w.fleet, "embed", idx, v, hosts=["c"])
    assert plan.targets == () and plan.problems == (
        "c: tier cpu is not allowed for embed (gpu) (--force to load it anyway)",
    )
    plan = plan_load(w.fleet, "embed", idx, v, hosts=["c"], force=True)
    assert [t.host.name for t in plan.targets] == ["c"] and not plan.problems
    plan = plan_load(w.fleet, "mlp", idx, v, count=1)
    assert [t.host.name for t in plan.targets] == ["c"]
    assert Skip("a", "--count 1: ranked below the chosen hosts") in plan.skipped
    plan = plan_load(w.fleet, "nope", idx, v, hosts=["a"])
    assert plan.skipped == (Skip("a", "nope is not in its model repository"),)
    assert "nope is not in the fleet file" in plan.notes[0]
    with pytest.raises(OpsError, match="no host named 'zz'"):
        plan_load(w.fleet, "embed", idx, v, hosts=["zz"])


def test_execute_load_loads_in_parallel_and_waits_for_the_picker() -> None:
    w = world(a={"embed": READY})
    ops, lines = ops_for(w)
    w.fail_load.add(("c", "mlp"))
    plan = plan_load(w.fleet, "mlp", indexes(w), view(w), hosts=["a", "c"])
    results = execute_load(ops, plan)
    assert [(r.host, r.ok) for r in results] == [("c", False), ("a", True)]
    assert "c: load mlp failed: boom" in results[0].message
    assert any(line == "a: READY in the picker (0.0 s)" for line in lines)
    assert IndexEntry("mlp", "1", UNAVAILABLE, "boom") in FakeTriton(w).index(w.fleet.hosts[2], 1)
    assert "1 of 2 hosts done" in format_results(results)


# --- unload and reload: plans ----------------------------------------------------------------------------


def test_roll_plan_refuses_to_strand_a_model() -> None:
    w = local_world()
    # Draining a strands solo (only on a); mlp and embed have other homes (mlp spills over to c's tier).
    plan = plan_roll("reload", w.fleet, "embed", indexes(w), view(w), hosts=["a"])
    assert [s.host.name for s in plan.steps] == ["a"]
    assert plan.steps[0].stranded == ("solo",)
    assert plan.steps[0].elsewhere == {"embed": ("b",), "mlp": ("c",), "solo": ()}
    assert len(plan.problems) == 1 and "solo has no other routable host" in plan.problems[0]
    text = format_roll_plan(plan, 1, Timeouts())
    assert "meanwhile: embed → b; mlp → c; solo → NOWHERE" in text
    # An ejected host gets no requests anyway: draining it strands nothing.
    w.ejected.add("a")
    assert plan_roll("reload", w.fleet, "embed", indexes(w), view(w), hosts=["a"]).problems == ()
    w.ejected.clear()
    # Reloading mlp drains c, whose only model (mlp) still has a: fine.
    plan = plan_roll("reload", w.fleet, "mlp", indexes(w), view(w), hosts=["c"])
    assert plan.problems == () and plan.steps[0].elsewhere == {"mlp": ("a",)}


def test_roll_plan_unloading_the_last_copy_needs_force() -> None:
    w = local_world()
    plan = plan_roll("unload", w.fleet, "mlp", indexes(w), view(w), hosts=["c"])
    assert plan.problems == ()
    # Unloading from c and then a: by the time a drains, c no longer has it.
    w2 = world(a={"mlp": READY, "embed": READY}, b={"embed": READY, "mlp": READY}, c={"mlp": READY})
    plan = plan_roll("unload", w2.fleet, "mlp", indexes(w2), view(w2), tier=Tier.GPU)
    assert [s.host.name for s in plan.steps] == ["a", "b"]
    assert plan.steps[1].elsewhere["mlp"] == ("c",) and plan.problems == ()
    plan = plan_roll("unload", w2.fleet, "mlp", indexes(w2), view(w2))
    assert [s.host.name for s in plan.steps] == ["a", "b", "c"]
    assert len(plan.problems) == 1 and "c: unloading the last routable copy of mlp" in plan.problems[0]


def test_roll_plan_without_a_picker_or_with_a_down_host() -> None:
    w = local_world()
    w.down.add("b")
    plan = plan_roll("reload", w.fleet, "embed", indexes(w), {}, hosts=["b"])
    assert plan.problems[0].startswith("no picker status: cannot drain hosts")
    assert any("b: unreachable" in p for p in plan.problems)
    plan = plan_roll("reload", w.fleet, "embed", indexes(w), {}, tier=Tier.GPU, drain=False)
    assert [s.host.name for s in plan.steps] == ["a"] and not plan.problems
    assert "--no-drain" in plan.notes[0]


def test_spillover_off_keeps_requests_in_their_tier() -> None:
    data = json.loads(json.dumps(FLEET))
    data["models"][0]["profile"] = {"spillover": False}
    w = local_world()
    w.fleet = parse_fleet(data)
    plan = plan_roll("reload", w.fleet, "mlp", indexes(w), view(w), hosts=["c"])
    assert plan.steps[0].stranded == ("mlp",)


# --- unload and reload: execution ------------------------------------------------------------------------


def test_unload_drains_waits_for_in_flight_then_undrains() -> None:
    w = local_world()
    w.in_flight = {"c": 3.0}
    w.drain_needs_s = 2.0
    ops, lines = ops_for(w)
    plan = plan_roll("unload", w.fleet, "mlp", indexes(w), view(w), hosts=["c"])
    results = execute_roll(ops, plan)
    assert [r.ok for r in results] == [True]
    assert w.events == ["drain c http://picker-1", "unload c mlp", "undrain c http://picker-1"]
    assert w.at_unload == [("c", 0.0)]  # nothing in flight when Triton was asked to unload
    assert w.t >= 2.0
    assert lines[0] == "[1/1] c: draining in 1 picker(s), waiting for in-flight requests"
    assert lines[-1].startswith("[1/1] c: undrained, done")
    assert w.states["c"]["mlp"] == (UNAVAILABLE, "unloaded")


def test_drain_timeout_unloads_nothing_and_undrains() -> None:
    w = local_world()
    w.in_flight = {"c": 1.0}
    w.drain_needs_s = 1000.0
    ops, _ = ops_for(w, drain_s=5.0)
    plan = plan_roll("unload", w.fleet, "mlp", indexes(w), view(w), hosts=["c"])
    results = execute_roll(ops, plan)
    assert not results[0].ok and "still 1 in flight" in results[0].message
    assert results[0].message.endswith("(undrained)")
    assert w.events == ["drain c http://picker-1", "undrain c http://picker-1"]


def test_host_is_left_drained_while_a_picker_still_lists_the_unloaded_model() -> None:
    w = local_world()
    w.picker_stuck.add(("c", "mlp"))
    ops, _ = ops_for(w, picker_s=3.0)
    plan = plan_roll("unload", w.fleet, "mlp", indexes(w), view(w), hosts=["c"])
    results = execute_roll(ops, plan)
    assert not results[0].ok
    assert "left c drained" in results[0].message and "/hosts/c/undrain" in results[0].message
    assert w.events == ["drain c http://picker-1", "unload c mlp"]


def test_rolling_reload_one_host_at_a_time_on_every_picker() -> None:
    w = world(a={"embed": READY, "mlp": READY}, b={"embed": READY}, c={"mlp": READY})
    w.unloading_reads = 2
    pickers = [FakePicker(w, "http://p1"), FakePicker(w, "http://p2")]
    ops, lines = ops_for(w, pickers)
    plan = plan_roll("reload", w.fleet, "embed", indexes(w), view(w), tier=Tier.GPU)
    assert not plan.problems
    results = execute_roll(ops, plan)
    assert [(r.host, r.ok) for r in results] == [("a", True), ("b", True)]
    assert w.events == [
        "drain a http://p1",
        "drain a http://p2",
        "unload a embed",
        "load a embed",
        "undrain a http://p1",
        "undrain a http://p2",
        "drain b http://p1",
        "drain b http://p2",
        "unload b embed",
        "load b embed",
        "undrain b http://p1",
        "undrain b http://p2",
    ]
    assert w.states["a"]["embed"] == w.states["b"]["embed"] == (READY, "")
    assert "[2/2] b: embed READY in the picker (0.0 s)" in lines


def test_failed_reload_stops_and_undrains_once_the_picker_agrees() -> None:
    w = world(a={"embed": READY}, b={"embed": READY}, c={"mlp": READY})
    w.fail_load.add(("a", "embed"))
    ops, _ = ops_for(w)
    plan = plan_roll("reload", w.fleet, "embed", indexes(w), view(w), tier=Tier.GPU)
    results = execute_roll(ops, plan)
    assert [(r.host, r.ok) for r in results] == [("a", False)]  # b is not touched
    assert "load embed failed: boom" in results[0].message
    assert w.events == ["drain a http://picker-1", "unload a embed", "load a embed", "undrain a http://picker-1"]


def test_a_host_already_draining_is_left_drained() -> None:
    w = local_world()
    picker = FakePicker(w)
    picker.draining.add("c")
    ops, lines = ops_for(w, [picker])
    plan = plan_roll("reload", w.fleet, "mlp", indexes(w), view(w, picker), hosts=["c"])
    results = execute_roll(ops, plan)
    assert results[0].ok
    assert w.events == ["unload c mlp", "load c mlp"]
    assert "c" in picker.draining
    assert any("already draining in http://picker-1" in line for line in lines)


def test_roll_rechecks_live_views_before_each_drain() -> None:
    w = world(a={"embed": READY}, b={"embed": READY}, c={"mlp": READY})
    ops, _ = ops_for(w)
    plan = plan_roll("reload", w.fleet, "embed", indexes(w), view(w), tier=Tier.GPU)
    w.ejected.add("b")  # after planning: a is now embed's only routable host
    results = execute_roll(ops, plan)
    assert not results[0].ok and "would leave embed with no routable host" in results[0].message
    assert w.events == []


# --- the command line, over the fakes --------------------------------------------------------------------


def run_models(w: World, *argv: str, picker: FakePicker | None = None) -> tuple[int, str]:
    args = _parser().parse_args(["models", *argv])
    ops, _ = ops_for(w, [picker or FakePicker(w)])
    out = io.StringIO()

    def progress(line: str) -> None:
        out.write(line + "\n")

    ops.progress = progress
    return m._run(args, ops, out), out.getvalue()


def test_cli_dry_runs_change_nothing() -> None:
    w = world(a={"mlp": READY, "embed": READY}, b={"embed": READY}, c={"mlp": READY})
    code, text = run_models(w, "reload", "mlp", "--all", "--dry-run")
    assert code == 0 and text.endswith("dry run: nothing changed\n")
    assert "1. a (gpu): drain in 1 picker" in text and "2. c (cpu)" in text
    code, text = run_models(w, "place", "mlp", "--count", "3", "--dry-run")
    assert code == 0 and "1. b (gpu)" in text
    w = local_world()
    code, text = run_models(w, "unload", "solo", "--hosts", "a", "--dry-run")
    assert code == 2 and "last routable copy of solo" in text
    assert w.events == []


def test_cli_refuses_problems_without_force() -> None:
    w = local_world()
    code, text = run_models(w, "unload", "solo", "--hosts", "a")
    assert code == 2 and "refused: nothing changed" in text and w.events == []
    code, text = run_models(w, "unload", "solo", "--hosts", "a", "--force")
    assert code == 0, text
    assert w.events == ["drain a http://picker-1", "unload a solo", "undrain a http://picker-1"]
    with pytest.raises(OpsError, match="say where"):
        run_models(w, "unload", "mlp")


def test_cli_needs_every_picker_to_drain() -> None:
    w = local_world()
    picker = FakePicker(w)
    picker.fail = True
    with pytest.raises(OpsError, match="cannot drain hosts without every picker"):
        run_models(w, "unload", "mlp", "--hosts", "c", picker=picker)
    code, text = run_models(w, "load", "mlp", "--hosts", "b", picker=picker)
    assert code == 0 and "note: picker GET" in text and w.events == ["load b mlp"]


def test_cli_list_summarizes_and_shows_the_table_only_for_named_hosts() -> None:
    w = local_world()
    w.states["b"]["embed"] = (LOADING, "")
    w.states["c"]["extra"] = (UNAVAILABLE, "failed to load")
    code, text = run_models(w, "list")
    assert code == 0
    lines = text.splitlines()
    assert lines[0] == "3 hosts (cpu 1, gpu 2), 3 answered"
    assert lines[1].split() == ["MODEL", "TIERS", "READY", "cpu", "gpu", "VERSIONS", "(hosts)", "NOT", "READY"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:6]}
    assert rows == {
        "mlp": ["cpu,gpu", "2/3", "1/1", "1/2", "1"],
        "embed": ["gpu", "1/2", "-", "1/2", "1", "LOADING", "1"],
        "solo": ["gpu", "1/2", "-", "1/2", "1"],
        "extra": ["any", "0/3", "0/1", "0/2", "-", "UNAVAILABLE", "1"],
    }
    assert "extra UNAVAILABLE on 1 hosts (c): failed to load" in text
    code, text = run_models(w, "list", "--hosts", "a,c")
    assert text.splitlines()[0].split() == ["MODEL", "TIERS", "a", "(gpu)", "c", "(cpu)"]
    code, text = run_models(w, "list", "--hosts", "[bc]", "--json", "mlp")
    assert code == 0
    assert json.loads(text)["models"]["mlp"]["hosts"] == {
        "b": {"state": NOT_LOADED, "ready_versions": [], "reason": None},
        "c": {"state": READY, "ready_versions": ["1"], "reason": None},
    }
    with pytest.raises(OpsError, match="no host of the fleet matches nope"):
        run_models(w, "list", "--hosts", "a,nope")


def test_cli_list_json_summary() -> None:
    w = local_world()
    w.down.add("b")
    code, text = run_models(w, "list", "--json", "embed")
    assert code == 1  # a host did not answer
    doc = json.loads(text)
    assert doc["hosts"]["b"] == {"tier": "gpu", "error": "b: unreachable (connection refused)"}
    assert doc["models"] == {
        "embed": {
            "tiers": ["gpu"],
            "ready": 1,
            "of": 2,
            "by_tier": {"cpu": {"ready": 0, "hosts": 1}, "gpu": {"ready": 1, "hosts": 2}},
            "versions": {"1": 1},
            "states": {},
            "unavailable": {},
        }
    }


def big_fleet(count: int) -> tuple[Fleet, dict[str, HostIndex]]:
    """``count`` hosts with 12 long-named models in versions that differ across hosts, some failed loads
    with a long reason, and every 100th host down: every column and note at its widest."""
    hosts = [
        {"name": f"triton-{t}-10-0-{i // 250}-{i % 250}", "address": f"10.0.{i // 250}.{i % 250 + 1}", "tier": t}
        for i in range(count)
        for t in ["gpu" if i % 4 else "cpu"]
    ]
    models = [f"a_rather_long_model_name_{n}" for n in range(12)]
    big = parse_fleet({"hosts": hosts, "models": [{"name": n, "tiers": ["cpu", "gpu"]} for n in models]})
    reason = "Internal: failed to load: " + "a very long reason " * 10
    indexes = {}
    for i, host in enumerate(big.hosts):
        if i % 100 == 99:
            indexes[host.name] = HostIndex(host, error=f"{host.name}: unreachable ({'connection refused ' * 8})")
            continue
        entries = [
            IndexEntry(n, str(1 + (i + k) % 3), READY if (i + k) % 7 else UNAVAILABLE, reason)
            for k, n in enumerate(models)
        ]
        indexes[host.name] = HostIndex(host, tuple(entries))
    return big, indexes


def test_model_summary_of_1000_hosts_fits_120_columns() -> None:
    text = format_model_summary(*big_fleet(1000))
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 120, max(lines, key=len)
    # Nothing per host: as many lines as for 100 hosts.
    assert len(lines) == len(format_model_summary(*big_fleet(100)).splitlines())
    assert lines[0] == "1000 hosts (cpu 250, gpu 750), 990 answered"
    assert "10 hosts did not answer: triton-gpu-10-0-0-99, " in text
    assert lines[2].split()[:5] == ["a_rather_long_model_name_0", "cpu,gpu", "848/1000", "214/250", "634/750"]
    assert "a_rather_long_model_name_0 UNAVAILABLE on 142 hosts (triton-cpu-10-0-0-0, +141): Internal:" in text


def test_grpc_errors_are_described() -> None:
    class Exc:
        def __init__(self, status: str, message: str) -> None:
            self._s, self._m = status, message

        def status(self) -> str:
            return self._s

        def message(self) -> str:
            return self._m

    assert describe(Exc("StatusCode.UNAVAILABLE", "failed to connect\nmore")) == "unreachable (failed to connect)"
    assert describe(Exc("StatusCode.DEADLINE_EXCEEDED", "x")) == "timed out"
    assert describe(Exc("StatusCode.INTERNAL", "failed to load 'x'")) == "INTERNAL: failed to load 'x'"


def test_grpc_triton_reports_a_down_host() -> None:
    host = HostSpec(name="down", address="127.0.0.1", grpc_port=1, http_port=2, metrics_port=3, tier=Tier.CPU)
    triton = GrpcTriton()
    try:
        with pytest.raises(TritonError, match=r"down: repository index failed \(127.0.0.1:1\): unreachable"):
            triton.index(host, 2.0)
    finally:
        triton.close()


# --- end to end -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    run_dir = tmp_path_factory.mktemp("ops")
    stack = start_stack(run_dir, local_fleet(run_dir))
    yield stack
    stop_stack(stack)


def extproc(stack: Stack, *argv: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "extproc", *argv, "--config", str(stack.run_dir / "fleet.yaml")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout_s,
    )


@pytest.mark.e2e
def test_e2e_models_list_shows_the_local_placement(stack: Stack) -> None:
    result = extproc(stack, "models", "list")
    assert result.returncode == 0, result.stderr
    summary = {line.split()[0]: line.split()[2:5] for line in result.stdout.splitlines()[2:6]}
    assert summary["mlp_classifier"] == ["2/3", "1/1", "1/2"], result.stdout
    assert summary["embed_normalize"] == ["2/2", "-", "2/2"], result.stdout
    result = extproc(stack, "models", "list", "--hosts", "triton-*")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split()[2:] for line in result.stdout.splitlines()[1:5]}
    assert rows == {
        "mlp_classifier": ["READY", "-", "READY"],
        "embed_normalize": ["READY", "READY", "-"],
        "timed_batch": ["READY", "READY", "-"],
        "seq_accumulate": ["READY", "READY", "-"],
    }, result.stdout
    doc = json.loads(extproc(stack, "models", "list", "--json").stdout)
    assert doc["hosts"]["triton-c"] == {"tier": "cpu", "error": None}


class Traffic:
    """~20 REST requests a second for one model through Envoy, in a thread; counts what fails."""

    def __init__(self, stack: Stack, model: str, rate: float = 20.0) -> None:
        self.url = f"http://{stack.http_url}/v2/models/{model}/infer"
        self.body = json.dumps(
            {"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": list(range(16))}]}
        ).encode()
        self.period = 1.0 / rate
        self.sent = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.monotonic()
            self.sent += 1
            try:
                request = urllib.request.Request(self.url, data=self.body, headers={"content-type": "application/json"})
                with urllib.request.urlopen(request, timeout=10) as response:
                    response.read()
            except urllib.error.HTTPError as exc:
                self.failures.append(f"HTTP {exc.code}: {exc.read()[:200]!r}")
            except OSError as exc:
                self.failures.append(repr(exc))
            self._stop.wait(max(0.0, self.period - (time.monotonic() - start)))

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


@pytest.mark.e2e
def test_e2e_unload_and_load_under_load_lose_no_request(stack: Stack) -> None:
    with Traffic(stack, "mlp_classifier") as traffic:
        time.sleep(1.0)
        unload = extproc(stack, "models", "unload", "mlp_classifier", "--hosts", "triton-c")
        assert unload.returncode == 0, unload.stdout + unload.stderr
        assert "triton-c: undrained, done" in unload.stdout
        status = stack.picker_status()["hosts"]["triton-c"]
        assert "mlp_classifier" not in status["ready"] and not status["draining"]
        time.sleep(1.0)  # served by triton-a meanwhile
        load = extproc(stack, "models", "load", "mlp_classifier", "--hosts", "triton-c")
        assert load.returncode == 0, load.stdout + load.stderr
        assert "triton-c: READY in the picker" in load.stdout
        time.sleep(1.0)
    assert traffic.sent >= 40
    assert traffic.failures == [], traffic.failures[:5]
    assert "mlp_classifier" in stack.picker_status()["hosts"]["triton-c"]["ready"]


@pytest.mark.e2e
def test_e2e_reload_dry_run_prints_the_plan(stack: Stack) -> None:
    result = extproc(stack, "models", "reload", "embed_normalize", "--all", "--dry-run")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "reload embed_normalize on 2 hosts, one at a time:"
    assert lines[1].startswith("  1. triton-a (gpu): drain in 1 picker")
    assert lines[3].startswith("  2. triton-b (gpu): drain in 1 picker")
    assert "triton-c: embed_normalize is not loaded there (-)" in result.stdout
    assert lines[-1] == "dry run: nothing changed"
    assert not any(h["draining"] for h in stack.picker_status()["hosts"].values())


@pytest.mark.e2e
def test_e2e_status_once_prints_every_host(stack: Stack) -> None:
    result = extproc(stack, "status", "--once")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.startswith("triton-")}
    assert set(rows) == {"triton-a", "triton-b", "triton-c"}
    assert rows["triton-a"][1:3] == ["gpu", "ok"]
    assert rows["triton-c"][1:3] == ["cpu", "ok"] and rows["triton-c"][-1] == "mlp_classifier"
    doc = json.loads(extproc(stack, "status", "--json").stdout)
    (picker,) = doc["pickers"].values()
    assert set(picker["hosts"]) == {"triton-a", "triton-b", "triton-c"}
