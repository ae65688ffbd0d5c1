"""The batch cost model: fitting exec(b) = fixed + per-item x b from scrape intervals, and completion times."""

from __future__ import annotations

import random

import pytest
from tritonclient.grpc import model_config_pb2

from extproc.datapath.batch_cost import BatchCost, Batching, LineFit, completion_ms, fitted_cost, per_request
from extproc.datapath.datastore import TritonLoad
from extproc.telemetry.repository import batching_from_config
from extproc.telemetry.triton_metrics import Counters, TritonSnapshot, derive_load


def test_fit_recovers_a_linear_batch_cost() -> None:
    fit = LineFit()
    rng = random.Random(1)
    for _ in range(40):
        b = rng.uniform(1.5, 6.0)
        fit = fit.add(b, 8.0 + 2.0 * b + rng.gauss(0, 0.2))
    cost = fitted_cost(fit)
    assert cost is not None
    assert cost.fixed_ms == pytest.approx(8.0, abs=0.5)
    assert cost.item_ms == pytest.approx(2.0, abs=0.15)


def test_no_fit_from_alike_batches_or_unphysical_lines() -> None:
    fit = LineFit()
    for _ in range(10):
        fit = fit.add(1.0, 40.0)
    assert fitted_cost(fit) is None, "every interval at batch 1: fixed and per-item time cannot be told apart"
    falling = LineFit().add(1.0, 10.0).add(4.0, 4.0).add(2.0, 8.0)
    assert fitted_cost(falling) is None, "a batch time that falls with the batch size is noise, not a cost"
    assert fitted_cost(LineFit()) is None


def test_fit_forgets_an_old_speed() -> None:
    fit = LineFit()
    for i in range(100):
        b = 1.0 + i % 4
        fit = fit.add(b, 8.0 + 2.0 * b)
    for i in range(100):
        b = 1.0 + i % 4
        fit = fit.add(b, 4 * (8.0 + 2.0 * b))  # the host became 4x slower
    cost = fitted_cost(fit)
    assert cost is not None and cost.item_ms == pytest.approx(8.0, rel=0.05)


def test_completion_follows_the_batch_structure() -> None:
    cost, one = BatchCost(8.0, 2.0), Batching(max_batch=8, instances=1)
    assert completion_ms(cost, one, 0) == 10.0  # alone, at once
    assert completion_ms(cost, one, 1) == 5.0 + 10.0  # a running batch of 1 half done, then alone
    assert completion_ms(cost, one, 8) == 12.0 + 10.0  # a running full batch, then alone
    assert completion_ms(cost, one, 12) == 12.0 + (8.0 + 2.0 * 5)  # joins the 4 queued
    assert completion_ms(cost, one, 24) == 12.0 + 2 * 24.0 + 10.0  # two full batches queued ahead
    unbatched = Batching(max_batch=1, instances=1)
    assert completion_ms(cost, unbatched, 3) == 5.0 + 2 * 10.0 + 10.0
    two = Batching(max_batch=8, instances=2)
    assert completion_ms(cost, two, 1) == 10.0, "a free instance starts it at once"
    assert completion_ms(cost, two, 16) == 12.0 + 10.0
    assert completion_ms(cost, two, 32) == 12.0 + 24.0 + 10.0, "two queued batches run side by side"


def test_derive_load_fits_the_models_batch_cost() -> None:
    labels = 'model="m",version="1"'
    totals = Counters()
    previous = TritonSnapshot(series={labels: totals})
    load = TritonLoad()
    for batch in (1, 2, 4, 8, 3, 6):
        execs, done = 5, 5 * batch
        ms = 8.0 + 2.0 * batch
        totals = Counters(
            totals.request_success + done,
            totals.request_success + done,
            totals.exec_count + execs,
            totals.queue_us,
            totals.compute_infer_us + done * ms * 1000,  # Triton adds a batch's time once per request
        )
        current = TritonSnapshot(series={labels: totals})
        load = derive_load(previous, current, load)
        previous = current
    cost = load.models["m"].cost
    assert cost is not None
    assert cost.fixed_ms == pytest.approx(8.0)
    assert cost.item_ms == pytest.approx(2.0)


def test_max_batch_counts_rows_so_multi_row_requests_fill_a_batch_sooner() -> None:
    per_row, batching = BatchCost(8.0, 2.0), Batching(max_batch=8, instances=1)
    cost, per_batch = per_request(per_row, batching, 4.0)
    assert (cost.fixed_ms, cost.item_ms, per_batch) == (8.0, 8.0, 2.0)  # two 4-row requests fill a batch
    # 6 requests of 4 rows ahead: a full batch running (2), two full batches queued (4); it runs alone after.
    assert completion_ms(cost, batching, 6, per_batch) == 24.0 / 2 + 2 * 24.0 + 16.0
    # Counted as requests of one row, the same queue would look like a single batch, 3x too short.
    assert completion_ms(per_row, batching, 6) == (8.0 + 2.0 * 6) / 2 + 10.0
    assert per_request(per_row, batching, 1.0) == (per_row, 8.0)
    assert per_request(per_row, batching, 0.5) == (per_row, 8.0), "a request is at least a row"
    assert per_request(per_row, batching, 16.0)[1] == 1.0, "a batch holds at least one request"


def test_derive_load_fits_per_row_and_measures_rows_per_request() -> None:
    labels = 'model="m",version="1"'
    totals = Counters()
    previous = TritonSnapshot(series={labels: totals})
    load = TritonLoad()
    for batch, rows in ((1, 4), (2, 2), (4, 1), (2, 4), (3, 2), (1, 8)):
        execs, done = 5, 5 * batch
        ms = 8.0 + 2.0 * batch * rows  # the model's time grows with the rows, not the requests
        totals = Counters(
            totals.request_success + done,
            totals.inference_count + done * rows,
            totals.exec_count + execs,
            totals.queue_us,
            totals.compute_infer_us + done * ms * 1000,
        )
        current = TritonSnapshot(series={labels: totals})
        load = derive_load(previous, current, load)
        previous = current
    times = load.models["m"]
    assert times.cost is not None
    assert times.cost.fixed_ms == pytest.approx(8.0)
    assert times.cost.item_ms == pytest.approx(2.0), "per row: exact although requests per batch vary"
    assert times.rows_per_request is not None and 4.0 < times.rows_per_request < 8.0  # smoothed toward 8


def _config(max_batch: int, batcher: str | None = None, groups: tuple[tuple[int, int], ...] = ()) -> object:
    """A ModelConfig as Triton returns it; ``groups``: (count, number of GPUs listed) per instance group."""
    mc = model_config_pb2
    config = mc.ModelConfig(max_batch_size=max_batch)
    if batcher == "dynamic":
        config.dynamic_batching.CopyFrom(mc.ModelDynamicBatching())
    elif batcher == "sequence":
        config.sequence_batching.CopyFrom(mc.ModelSequenceBatching())
    for count, gpus in groups:
        config.instance_group.append(mc.ModelInstanceGroup(count=count, gpus=list(range(gpus))))
    return config


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (_config(8, "dynamic"), Batching(8, 1)),
        (_config(8), Batching(1, 1)),  # no batcher: each request runs alone
        (_config(0, "dynamic"), Batching(1, 1)),
        # A correlation id pins it; the direct strategy runs one sequence per batch row, idle ones for 1 s.
        (_config(4, "sequence", ((1, 0),)), Batching(4, 1, sequence=True, sequence_slots=4, sequence_idle_s=1.0)),
        (_config(16, "dynamic", ((2, 2), (1, 0))), Batching(16, 5)),  # 2 on each of 2 GPUs, 1 on the CPU
    ],
)
def test_batching_from_model_config(config: object, expected: Batching) -> None:
    assert batching_from_config(config) == expected


def test_completion_counts_the_requests_own_work_and_the_excess_ahead() -> None:
    """Work in requests of the mean size: a request of twice the mean runs its own batch twice as long, and
    requests ahead that carry more work than their count fill more batches."""
    cost, batching = BatchCost(4.0, 2.0), Batching(max_batch=4, instances=1)
    assert completion_ms(cost, batching, 0.0, own=2.0) == pytest.approx(4.0 + 4.0)
    assert completion_ms(cost, batching, 2.0) == pytest.approx((4.0 + 4.0) / 2 + 4.0 + 2.0)
    # The same two requests ahead, but with 8 requests' worth of work: a full batch running, one queued.
    assert completion_ms(cost, batching, 2.0, excess=6.0) == pytest.approx((4.0 + 8.0) / 2 + 4.0 + 8.0 + 4.0 + 2.0)
    assert completion_ms(cost, batching, 2.0, excess=-5.0, own=0.5) == pytest.approx(4.0 / 2 + 4.0 + 1.0)
