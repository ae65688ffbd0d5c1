"""``python -m benchmarks.overload`` and the load generator's overload features: scenarios, the phased load,
the analysis (outcomes, windows, goodput, recovery) on synthetic records, and deadlines, headers and
retry-after against in-process REST and gRPC servers. No timing of a real run is asserted."""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml
from aiohttp import web

from benchmarks import overload
from benchmarks.loadgen import (
    DEADLINE,
    MODEL_INFER_METHOD,
    REST_DEADLINE_HEADER,
    LoadSpec,
    MixEntry,
    Records,
    RunSpec,
    build_trace,
    poisson_offsets,
    run_load,
)
from benchmarks.overload import (
    OverloadScenario,
    analyse_mode,
    excursions,
    measured_capacity,
    merged,
    mode_load,
    outcome,
    outcome_summary,
    parse_overload_scenario,
    phases,
    recovery_time,
    sliding_p99,
    windows,
)
from benchmarks.ports import free_ports
from benchmarks.routing import ScenarioError
from extproc.datapath.headers import PRIORITY_HEADER

REPO = Path(__file__).resolve().parent.parent
SCENARIOS = sorted((REPO / "benchmarks" / "scenarios" / "overload").glob("*.yaml"))


def scenario_data(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(overload.DEFAULT_SCENARIO.read_text(encoding="utf-8"))
    data.update(overrides)
    return data


def default_scenario(**overrides: Any) -> OverloadScenario:
    return parse_overload_scenario(scenario_data(**overrides), "s.yaml")


def records(rows: Sequence[tuple[float, float, str]], retry_after: Sequence[str] | None = None) -> Records:
    """Records of one mix entry from (intended, done, status) rows."""
    n = len(rows)
    return Records(
        intended=[r[0] for r in rows],
        entry=[0] * n,
        sent=[r[0] for r in rows],
        done=[r[1] for r in rows],
        status=[r[2] for r in rows],
        host=[""] * n,
        retry_after=list(retry_after) if retry_after is not None else [""] * n,
    )


# ------------------------------------------------------------------------------------------------ scenarios


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_shipped_scenarios_are_valid(path: Path) -> None:
    scenario = overload.load_overload_scenario(path)
    assert [m.name for m in scenario.modes] == ["admission-off", "admission-on"]
    off = scenario.mode_fleet(scenario.modes[0])
    assert off["picker"]["overload"] == {"fairness_header": "x-tenant", "admission": False}
    assert scenario.fairness.header == off["picker"]["overload"]["fairness_header"]
    assert scenario.factor == 2.0 and scenario.deadline_s == 2.0 and scenario.overload_s == 60


def test_default_scenario_is_shipped() -> None:
    assert overload.DEFAULT_SCENARIO in SCENARIOS
    assert overload.find_scenario("timed_batch") == overload.DEFAULT_SCENARIO


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"second": {"model": "nope", "rate_rps": 1}}, "key second.model: 'nope' is loaded on no host"),
        ({"modes": [{"name": "x", "fleet": {"picker": {"bogus": 1}}}]}, "key fleet.picker.bogus"),
        ({"modes": [{"name": "a"}, {"name": "a"}]}, "key modes: Value error, modes repeat a name"),
        ({"capacity": {"duration_s": 1, "skip_s": 2}}, "key capacity: Value error, skip_s (2) must be below"),
        ({"factor": 0.5}, "key factor: Input should be greater than 1"),
    ],
)
def test_scenario_errors_name_the_key(overrides: dict[str, Any], expected: str) -> None:
    with pytest.raises(ScenarioError) as info:
        parse_overload_scenario(scenario_data(**overrides), "s.yaml")
    assert expected in str(info.value)


def test_merged_patches_mappings_key_by_key() -> None:
    base: dict[str, Any] = {
        "picker": {"overload": {"fairness_header": "x-tenant"}, "log_level": "info"},
        "hosts": [1, 2],
    }
    out = merged(base, {"picker": {"overload": {"admission": False}}, "hosts": [3]})
    assert out == {
        "picker": {"overload": {"fairness_header": "x-tenant", "admission": False}, "log_level": "info"},
        "hosts": [3],
    }
    assert base["picker"]["overload"] == {"fairness_header": "x-tenant"}  # not modified


# -------------------------------------------------------------------------------------------- the loads


def test_own_rate_entries_are_streams_of_their_own() -> None:
    load = LoadSpec(
        rate_rps=1,
        duration_s=40,
        warmup_s=0,
        mix=(
            MixEntry(model="m", name="always", rate_rps=50),
            MixEntry(model="m", name="burst", rate_rps=200, start_s=10, stop_s=20),
        ),
    )
    trace = build_trace(load)
    assert list(trace.offsets) == sorted(trace.offsets)
    by = {k: [t for t, e in zip(trace.offsets, trace.entries, strict=True) if e == k] for k in (0, 1)}
    assert abs(len(by[0]) - 50 * 40) < 0.1 * 50 * 40
    assert abs(len(by[1]) - 200 * 10) < 0.1 * 200 * 10
    assert all(10 <= t < 20 for t in by[1])
    # Each stream is seeded on its own: another entry's rate does not move it.
    other = load.model_copy(update={"mix": (load.mix[0], load.mix[1].model_copy(update={"rate_rps": 20.0}))})
    changed = build_trace(other)
    assert [t for t, e in zip(changed.offsets, changed.entries, strict=True) if e == 0] == by[0]


def test_shared_rate_trace_is_unchanged() -> None:
    """Without own rates, the trace is the one the routing benchmark always replayed."""
    load = LoadSpec(rate_rps=300, duration_s=5, seed=11, mix=(MixEntry(model="a", weight=3), MixEntry(model="b")))
    rng = np.random.default_rng(11)
    offsets = poisson_offsets(300, load.total_s, rng)
    entries = rng.choice(2, size=len(offsets), p=np.array([0.75, 0.25]))
    trace = build_trace(load)
    assert trace.offsets == tuple(offsets)
    assert trace.entries == tuple(int(e) for e in entries)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"start_s": 3}, "start_s and stop_s need the entry's own rate_rps"),
        ({"rate_rps": 5, "start_s": 3, "stop_s": 2}, "stop_s (2) must be after start_s (3)"),
        ({"headers": {" x": "1"}}, "header names must be non-empty"),
        ({"deadline_s": 0}, "greater than 0"),
    ],
)
def test_mix_entry_checks(fields: dict[str, Any], expected: str) -> None:
    with pytest.raises(ValueError) as info:
        MixEntry.model_validate({"model": "m", **fields})
    assert expected in str(info.value)


def test_mode_load_phases_and_rates() -> None:
    scenario = default_scenario()
    capacity = 80.0
    load = mode_load(scenario, capacity)
    ph = phases(scenario)
    assert (ph.unloaded_end, ph.overload_end, ph.recovery_end, ph.fairness_end) == (15, 75, 90, 110)
    assert load.total_s == ph.fairness_end
    by = {m.label: m for m in load.mix}
    assert all(m.deadline_s == 2.0 and m.rate_rps is not None for m in load.mix)
    assert {m.protocol for m in load.mix} == {"http", "grpc"}

    def rate(prefix: str) -> float:
        return sum(m.rate_rps or 0.0 for m in load.mix if m.label.startswith(prefix + "/"))

    # During the overload, the overloaded model gets factor x capacity in all.
    assert rate("probe") + rate("critical") + rate("standard") == pytest.approx(2 * capacity)
    assert rate("critical") == pytest.approx(0.1 * capacity)
    assert (by["standard/http"].start_s, by["standard/http"].stop_s) == (15, 75)
    assert by["critical/grpc"].headers == {PRIORITY_HEADER: "critical"}
    # Fairness: two clients at 4:1, together factor x capacity, after the recovery.
    assert rate("client-a") == pytest.approx(4 * rate("client-b"))
    assert rate("client-a") + rate("client-b") == pytest.approx(2 * capacity)
    assert by["client-b/http"].headers == {"x-tenant": "client-b"} and by["client-b/http"].start_s == 90
    assert by["probe/http"].stop_s == 90 and by["second/grpc"].model == "mlp_classifier"
    assert by["second/grpc"].shape == (1, 16)
    with pytest.raises(ValueError, match="exceed"):
        mode_load(scenario, 5.0)  # the probe alone would be above 2 x capacity


# --------------------------------------------------------------------------------------------- analysis


def test_outcomes() -> None:
    rec = records(
        [
            (0.0, 0.5, "http 200"),
            (0.0, 2.5, "grpc OK"),
            (0.0, 0.01, "http 429"),
            (0.0, 0.02, "grpc UNAVAILABLE"),
            (0.0, 2.0, DEADLINE),
            (0.0, 0.3, "http 500"),
            (0.0, 3.0, "client ClientOSError"),
            (0.0, 2.2, "http 504"),
        ],
        retry_after=["", "", "1", "", "", "", "", ""],
    )
    kinds = [outcome(rec, i, 2.0) for i in range(8)]
    assert kinds == ["good", "late", "refused", "refused", "no_answer", "error", "error", "late"]
    summary = outcome_summary(rec, range(8), 2.0)
    assert (summary["good"], summary["late"], summary["refused"], summary["no_answer"], summary["error"]) == (
        1,
        2,
        2,
        1,
        2,
    )
    assert summary["good_fraction"] == 1 / 8
    assert summary["p99_ms"] == pytest.approx(2500.0)  # the answered ones
    assert summary["p99_all_ms"] == math.inf  # 3 of 8 never answered OK
    assert summary["refusal_p99_ms"] == pytest.approx(20.0)
    assert summary["refusal_retry_after_fraction"] == 0.5
    assert summary["statuses"]["http 200"] == 1
    assert math.isnan(outcome_summary(rec, [], 2.0)["good_fraction"])


def test_windows_count_goodput_by_answer_time() -> None:
    rows = [(t / 10, t / 10 + 0.1, "http 200") for t in range(100)]  # 10 req/s for 10 s, all good
    rows += [(t / 10, t / 10 + 0.005, "http 429") for t in range(50)]  # 10 req/s refused in the first 5 s
    rows += [(5.0, 7.5, "grpc OK"), (5.5, 7.5, DEADLINE)]  # one late answer, one gave up
    rec = records(rows, retry_after=["2" if s == "http 429" else "" for _, _, s in rows])
    out = windows(rec, range(len(rows)), 0.0, 10.0, 5.0, capacity_rps=5.0, deadline_s=2.0)
    assert [(w["start_s"], w["end_s"]) for w in out] == [(0, 5), (5, 10)]
    first, second = out
    assert first["offered_rps"] == pytest.approx(100 / 5)
    # Answers at 0.1 ... 4.9 fall in the first window; the one sent at 4.9 is answered at 5.0: the second's.
    assert first["goodput_rps"] == pytest.approx(49 / 5) and first["goodput_over_capacity"] == pytest.approx(49 / 25)
    assert (first["refused"], first["refusal_retry_after_fraction"], first["late"]) == (50, 1.0, 0)
    assert first["refusal_p99_ms"] == pytest.approx(5.0)
    assert (second["late"], second["no_answer"], second["refused"]) == (1, 1, 0)
    # 4.9 → 5.0, then 5.0 ... 9.8; the late answer at 7.5 is not goodput.
    assert second["goodput_rps"] == pytest.approx(50 / 5)
    assert math.isnan(second["refusal_p99_ms"])


def test_recovery_time() -> None:
    # A probe at 20 req/s from t=30; slow (3 s) until 33, then 50 ms.
    rows = [(30 + k / 20, 30 + k / 20 + (3.0 if 30 + k / 20 < 33 else 0.05), "http 200") for k in range(200)]
    series = sliding_p99(records(rows), range(200), 30.0, 40.0)
    assert [t for t, _ in series][:3] == pytest.approx([30.0, 30.1, 30.2])
    assert series[-1][0] == pytest.approx(39.0) and series[-1][1] == pytest.approx(50.0)
    assert series[0][1] == pytest.approx(3000.0)
    assert recovery_time(series, 30.0, limit_ms=60.0, hold_s=3.0) == pytest.approx(3.0, abs=0.11)
    assert excursions(series, 33.0, 60.0) == 0 and excursions(series, 30.0, 60.0) > 0
    # A refused probe is infinitely slow: the hold restarts after the windows that hold it.
    rows[80] = (34.0, 34.01, "http 429")
    later = sliding_p99(records(rows), range(200), 30.0, 40.0)
    assert max(p99 for _, p99 in later) == math.inf
    assert recovery_time(later, 30.0, limit_ms=60.0, hold_s=3.0) == pytest.approx(4.1, abs=0.11)
    assert excursions(later, 33.0, 60.0) == 10  # the windows starting in (33.0, 34.0]
    # Not held long enough before the last window.
    assert recovery_time(later, 30.0, limit_ms=60.0, hold_s=5.5) is None
    assert sliding_p99(records(rows), [], 30.0, 40.0) == []
    assert recovery_time([], 30.0, limit_ms=60.0, hold_s=1.0) is None


def test_measured_capacity() -> None:
    # Answers every 12.5 ms (80/s) from 0.5 s on; the first second and anything after the load are not counted.
    rows = [(0.0, 0.5 + k * 0.0125, "http 200") for k in range(800)] + [(0.0, 1.5, DEADLINE)]
    assert measured_capacity(records(rows), 1.0, 6.0) == pytest.approx(80.0, rel=0.01)


def _synthetic_mode(scenario: OverloadScenario, capacity: float, admission: bool) -> tuple[LoadSpec, Records]:
    """A mode's trace with made-up outcomes: admission on answers what fits and refuses the rest at once;
    off answers a little and leaves the rest without an answer."""
    load = mode_load(scenario, capacity)
    trace = build_trace(load)
    rec = Records.for_trace(trace)
    ph = phases(scenario)
    rng = np.random.default_rng(1)
    for i, (t, k) in enumerate(zip(trace.offsets, trace.entries, strict=True)):
        stream = load.mix[k].label.split("/")[0]
        rec.sent[i] = t
        overloaded = ph.unloaded_end <= t < ph.overload_end or t >= ph.recovery_end
        fits = stream in ("second", "critical", "client-b", "probe") or rng.random() < 0.45
        if stream == "second" or not overloaded or (admission and fits):
            rec.done[i], rec.status[i] = t + 0.05, "http 200"
        elif admission:
            rec.done[i], rec.status[i], rec.retry_after[i] = t + 0.004, "http 429", "1"
        elif rng.random() < 0.2:
            rec.done[i], rec.status[i] = t + 1.5, "grpc OK"
        else:
            rec.done[i], rec.status[i] = t + 2.0, DEADLINE
    return load, rec


@pytest.mark.parametrize("admission", [True, False])
def test_analyse_mode(admission: bool) -> None:
    scenario = default_scenario(overload_s=30)
    capacity = 80.0
    load, rec = _synthetic_mode(scenario, capacity, admission)
    result = analyse_mode(scenario, load, rec, capacity)
    assert len(result["windows"]) == 3
    assert result["unloaded"]["probe"]["p99_ms"] == pytest.approx(50.0)
    assert result["overload"]["all"]["late"] == 0
    checks = result["checks"]
    assert checks["none_answered_after_deadline"] and checks["second_model_p99"]
    if admission:
        assert result["min_goodput_over_capacity_after_first_window"] > 0.9
        assert result["recovery"]["seconds"] == pytest.approx(0.0)
        assert result["recovery"]["unloaded_window_p99_ms"] == pytest.approx(50.0)
        assert result["second_p99_ratio"] == pytest.approx(1.0)
        assert result["fairness"]["light_client"] == "client-b"
        assert result["fairness"]["client-b"]["good_fraction"] == 1.0
        assert all(checks.values()), checks
    else:
        assert result["min_goodput_over_capacity_after_first_window"] < 0.5
        assert not checks["goodput_every_window_after_first"] and not checks["critical_goodput"]
    table = overload.format_comparison({"off": result, "on": result})
    assert "goodput / capacity, min after 1st window" in table and "check recovered" in table
    assert "0-10" in overload.format_mode("on", result)


# --------------------------------------------------------------------- the load generator, against fakes


class _Fakes:
    """A REST and a gRPC inference endpoint that answer by the request's x-behaviour header: ``ok``,
    ``refuse`` (429 / RESOURCE_EXHAUSTED with retry-after) or ``slow`` (1 s), and record what they got."""

    def __init__(self) -> None:
        self.rest_headers: list[dict[str, str]] = []
        self.grpc_seen: list[tuple[dict[str, str], float | None]] = []

    async def rest(self, request: web.Request) -> web.Response:
        await request.read()
        self.rest_headers.append(dict(request.headers))
        behaviour = request.headers.get("x-behaviour", "ok")
        if behaviour == "refuse":
            return web.Response(status=429, headers={"retry-after": "3"})
        if behaviour == "slow":
            await asyncio.sleep(1.0)
        return web.Response(status=200, body=b"{}")

    async def grpc_infer(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        self.grpc_seen.append((metadata, context.time_remaining()))
        behaviour = metadata.get("x-behaviour", "ok")
        if behaviour == "refuse":
            context.set_trailing_metadata((("retry-after", "4"),))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded")
        if behaviour == "slow":
            await asyncio.sleep(1.0)
        return b""


@pytest.fixture
async def fakes() -> AsyncIterator[tuple[_Fakes, str, str]]:
    fake = _Fakes()
    rest_port, grpc_port = free_ports(2)
    app = web.Application()
    app.router.add_post("/v2/models/{model}/infer", fake.rest)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", rest_port).start()
    server = grpc.aio.server()
    service, method = MODEL_INFER_METHOD.strip("/").split("/")
    handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(fake.grpc_infer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {method: handler}),))
    server.add_insecure_port(f"127.0.0.1:{grpc_port}")
    await server.start()
    try:
        yield fake, f"http://127.0.0.1:{rest_port}", f"127.0.0.1:{grpc_port}"
    finally:
        await server.stop(None)
        await runner.cleanup()


async def test_deadlines_headers_and_retry_after(fakes: tuple[_Fakes, str, str]) -> None:
    fake, http_base, grpc_target = fakes
    mix = tuple(
        MixEntry(
            model="m",
            protocol=protocol,
            name=f"{behaviour}/{protocol}",
            headers={"x-behaviour": behaviour, "X-Tenant": "a"},
            deadline_s=0.3 if behaviour == "slow" else 5.0,
            rate_rps=10,
        )
        for behaviour in ("ok", "refuse", "slow")
        for protocol in ("http", "grpc")
    )
    load = LoadSpec(rate_rps=1, duration_s=1.0, warmup_s=0, mix=(*mix, MixEntry(model="m", name="plain", rate_rps=10)))
    spec = RunSpec(label="t", http_base=http_base, grpc_target=grpc_target, load=load, progress=False)
    rec, _ = await run_load(spec)
    labels = [load.mix[k].label for k in rec.entry]
    by: dict[str, Counter[str]] = {}
    for label, status in zip(labels, rec.status, strict=True):
        by.setdefault(label, Counter())[status] += 1
    assert set(by["ok/http"]) == {"http 200"} and set(by["ok/grpc"]) == {"grpc OK"}
    assert set(by["refuse/http"]) == {"http 429"} and set(by["refuse/grpc"]) == {"grpc RESOURCE_EXHAUSTED"}
    assert set(by["slow/http"]) == {DEADLINE} and set(by["slow/grpc"]) == {DEADLINE}
    assert set(by["plain"]) == {"http 200"}
    for i, label in enumerate(labels):
        if label.startswith("refuse/"):
            assert rec.retry_after[i] == ("3" if label.endswith("http") else "4")
        else:
            assert rec.retry_after[i] == ""
        if label.startswith("slow/"):
            # Gave up at the deadline, counted from the intended send time.
            assert 0.29 <= rec.done[i] - rec.intended[i] < 0.9
    # REST: the deadline in milliseconds (what was left of it when sent), and the entry's headers.
    timed = [h for h in fake.rest_headers if "x-behaviour" in h]
    assert all(0 < int(h[REST_DEADLINE_HEADER]) <= (300 if h["x-behaviour"] == "slow" else 5000) for h in timed)
    assert all(h["X-Tenant"] == "a" for h in timed)
    assert all(REST_DEADLINE_HEADER not in h for h in fake.rest_headers if "x-behaviour" not in h)
    # gRPC: metadata keys lowercased; the deadline arrives as grpc-timeout (the server sees the time left).
    assert all(md["x-tenant"] == "a" for md, _ in fake.grpc_seen)
    for md, left in fake.grpc_seen:
        assert left is not None and 0 < left <= (0.3 if md["x-behaviour"] == "slow" else 5.0) + 0.01, (md, left)
    assert Records.from_json(rec.to_json()).retry_after == rec.retry_after


def test_records_from_older_json_have_no_retry_after() -> None:
    data = records([(0.0, 0.1, "http 200")]).to_json()
    del data["retry_after"]
    assert Records.from_json(data).retry_after == [""]
