"""The batch cost model: how long Triton takes to execute a batch, and when a new request would finish.

Triton's dynamic batcher runs queued requests together, so a request that joins a queue costs the host far
less than a request executed alone: on a model whose execution takes ``fixed_ms + item_ms x batch``
(launch overhead plus per-item work, the shape of most GPU and CPU models), the marginal request costs
``item_ms``. A per-request average (batch time / batch size) over-charges a host with a moderate queue and
sends traffic to a slower, idle host; this module predicts completion from the batch structure instead.

``exec(b) = fixed_ms + item_ms x b`` is fitted per (host, model) by least squares over Triton's scrape
intervals (each gives one mean batch size and mean batch time, see :mod:`extproc.telemetry.triton_metrics`),
with exponential forgetting so a host that changes speed is followed. ``b`` counts rows (the batch
dimension, Triton's ``nv_inference_count`` and ``max_batch_size``), not requests: a request may carry
several rows, and the model's time grows with the rows. The completion estimate works in requests (the
in-flight counts are requests), so :func:`per_request` turns the fitted line and ``max_batch`` into a
request's cost and the requests a batch holds, at the (host, model)'s observed mean rows per request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

# Weight kept by the older intervals at each new one: about 20 intervals (5 s at the default 250 ms scrape).
FORGET: Final = 0.95
# Below this spread of mean batch sizes (variance, in rows²) the intervals cannot separate the fixed
# from the per-item time, and the fit is not used.
MIN_BATCH_VARIANCE: Final = 0.05


# Not frozen, though never changed once made: the leader pickles these to its workers (extproc.sharing),
# and compiled a frozen dataclass cannot be unpickled (its __setattr__ refuses).
@dataclass(slots=True)
class BatchCost:
    """One execution of ``batch`` items takes ``fixed_ms + item_ms x batch``: rows as fitted (see the module
    docstring), requests once converted by :func:`per_request`."""

    fixed_ms: float
    item_ms: float

    def exec_ms(self, batch: float) -> float:
        return self.fixed_ms + self.item_ms * batch


@dataclass(slots=True)  # not frozen: see BatchCost
class Batching:
    """How a model on a host batches, from its Triton model config."""

    max_batch: int = 1  # rows per execution: max_batch_size with a dynamic/sequence batcher, else 1
    instances: int = 1  # executions that run at once (instance_group counts)
    sequence: bool = False  # a sequence batcher: requests of one correlation id must stay on one host
    # With a sequence batcher: how many sequences it runs at once (more wait in Triton's backlog), and how
    # long it keeps an idle one before freeing its slot.
    sequence_slots: int = 0
    sequence_idle_s: float = 1.0


@dataclass(slots=True)  # not frozen: see BatchCost
class LineFit:
    """Exponentially weighted moments of (x, y) pairs, for their least-squares line: here (mean batch size
    in rows, mean batch time) over scrape intervals (see :func:`fitted_cost`); also a model's REST bodies'
    (length, elements) (:mod:`extproc.datapath.scheduling.work`). Each pair added makes a new fit, so that
    a fit shared with a worker process (extproc.sharing) never changes under it."""

    weight: float = 0.0
    x: float = 0.0
    xx: float = 0.0
    y: float = 0.0
    xy: float = 0.0

    def add(self, x: float, y: float, keep: float = FORGET) -> LineFit:
        """The fit with (x, y) added, the older pairs' weight multiplied by ``keep``."""
        return LineFit(
            keep * self.weight + 1.0,
            keep * self.x + x,
            keep * self.xx + x * x,
            keep * self.y + y,
            keep * self.xy + x * y,
        )

    def moments(self) -> tuple[float, float, float, float] | None:
        """The weighted means of x and y, the variance of x and the covariance; None before any pair."""
        w = self.weight
        if w <= 0:
            return None
        mean_x, mean_y = self.x / w, self.y / w
        return mean_x, mean_y, self.xx / w - mean_x * mean_x, self.xy / w - mean_x * mean_y


def fitted_cost(fit: LineFit) -> BatchCost | None:
    """The least-squares line of a (mean batch size in rows, mean batch time) fit as a batch cost, or None
    while the batch sizes seen are too alike to fit one, or the fit is not physical (negative fixed or
    per-item time)."""
    moments = fit.moments()
    if moments is None:
        return None
    mean_b, mean_t, variance, covariance = moments
    if variance < MIN_BATCH_VARIANCE:
        return None
    item = covariance / variance
    fixed = mean_t - item * mean_b
    if item <= 0 or fixed < 0:
        return None
    return BatchCost(fixed, item)


def per_request(cost: BatchCost, batching: Batching, rows_per_request: float) -> tuple[BatchCost, float]:
    """The per-row ``cost`` and ``batching`` in requests of ``rows_per_request`` rows on average: a request's
    share of the per-row time, and how many requests one execution holds (``max_batch`` is in rows; at least
    one request, as Triton never splits one)."""
    rows = rows_per_request if rows_per_request > 1.0 else 1.0
    per_batch = batching.max_batch / rows
    return BatchCost(cost.fixed_ms, cost.item_ms * rows), per_batch if per_batch > 1.0 else 1.0


def completion_ms(
    cost: BatchCost,
    batching: Batching,
    in_flight: float,
    per_batch: float | None = None,
    own: float = 1.0,
    excess: float = 0.0,
) -> float:
    """When a request sent now finishes on a host with ``in_flight`` requests of this model ahead of it.

    ``cost`` is per request, and an execution holds ``per_batch`` requests (default ``max_batch``: requests
    of one row; see :func:`per_request` for others). Work is counted in such requests: the new request's
    is ``own``, and the requests ahead carry ``excess`` more than their count (less, when negative).

    With a free instance it executes at once, alone. Otherwise the instances' running batches are half
    done on average; the queued work ahead runs in full batches, spread over the instances; the new
    request runs in the batch formed by whatever is left of the queue, itself included.
    """
    instances = batching.instances
    max_batch = batching.max_batch if per_batch is None else per_batch
    if in_flight < instances:
        return cost.exec_ms(own)
    work = in_flight + excess if in_flight + excess > 0.0 else 0.0
    running = min(work, instances * max_batch)
    remaining = cost.exec_ms(running / instances) / 2
    queued = int(work - running)
    full_batches, left = divmod(queued, max_batch)
    return remaining + (full_batches // instances) * cost.exec_ms(max_batch) + cost.exec_ms(left + own)
