"""A request's work, in requests of its model's mean size: the unit in which the in-flight counts (Envoy's,
Triton's: requests) are read, so that the mean request weighs 1 (see :meth:`RequestSizes.work`).

What the picker sees of a request before routing it: its rows where it has them (a gRPC ``ModelInfer``'s
first input, the client's ``x-triton-rows``), else its size in bytes. Bytes are compared with the mean
size of the model's requests sized the same way (:func:`sized`). A REST body's JSON text has a part that
does not grow with its tensors (names, shapes, datatypes), so its length overstates small requests
against big ones; the picker reads each REST body's tensor headers after routing it (the body check), and
:meth:`RequestSizes.learn` fits the model's elements on its lengths, which then gives a JSON body's
elements from its ``content-length`` alone.
"""

from __future__ import annotations

from typing import Final

from extproc.datapath.batch_cost import LineFit
from extproc.datapath.scheduling.scorers import Candidate
from extproc.datapath.scheduling.types import InferenceRequest, Protocol

__all__ = ["MIN_SIZES", "SIZE_MEMORY", "RequestSizes", "sized"]

# How many requests the means and fits are taken over, about, and how many it takes to use them (before:
# Triton's mean rows per request, or no estimate from bytes).
SIZE_MEMORY: Final = 128.0
MIN_SIZES: Final = 16.0
_KEEP: Final = 1.0 - 1.0 / SIZE_MEMORY
# Below this spread of a model's JSON body lengths (standard deviation over the mean) the fit cannot tell
# what grows with the tensors from what does not, and the lengths are compared as they are.
_MIN_SPREAD: Final = 0.01

# What a request's bytes measure (see sized).
_JSON: Final = 0
_GRPC: Final = 1
_BINARY: Final = 2


def sized(request: InferenceRequest) -> tuple[int | None, int]:
    """What a request without rows is sized by, and which of the means it compares with: a REST body's
    binary tensors (their bytes follow its elements), else its whole length, REST (JSON text around the
    numbers) or gRPC (a protobuf message)."""
    if request.tensor_bytes is not None:
        return request.tensor_bytes, _BINARY
    return request.size_bytes, _GRPC if request.protocol is Protocol.GRPC else _JSON


def _relative(fit: LineFit, x: float) -> float | None:
    """From a fit of a model's REST JSON bodies' (length, elements): the elements of a body of ``x`` bytes
    over the mean body's, or None while the line is not known."""
    moments = fit.moments()
    if moments is None or fit.weight < MIN_SIZES:
        return None
    mean_x, mean_y, variance, covariance = moments
    if mean_y <= 0.0 or variance <= (_MIN_SPREAD * mean_x) ** 2:
        return None
    slope = covariance / variance
    if slope <= 0.0:
        return None
    return (mean_y + slope * (x - mean_x)) / mean_y


class RequestSizes:
    """What one scheduler has seen of each model's request sizes: the mean rows of those that carry them,
    the mean bytes of those that do not (per :func:`sized` kind), and the fit of JSON bodies' elements on
    their lengths. Only models some host lists get here, so their repositories bound the keys."""

    def __init__(self) -> None:
        # Each value: (the mean, the requests it was taken over).
        self._mean_rows: dict[str, tuple[float, float]] = {}
        self._mean_bytes: tuple[dict[str, tuple[float, float]], ...] = ({}, {}, {})
        self._elements: dict[str, LineFit] = {}

    def observe(self, request: InferenceRequest, model: str) -> None:
        """Follow the model's mean sizes: the plain mean of the first :data:`SIZE_MEMORY` requests, then
        exponentially weighted over about as many."""
        rows = request.rows
        if rows is not None:
            value, means = float(rows), self._mean_rows
        else:
            size, kind = sized(request)
            if size is None:
                return
            value, means = float(size), self._mean_bytes[kind]
        mean, n = means.get(model, (0.0, 0.0))
        n += 1.0
        means[model] = (mean + (value - mean) / (n if n < SIZE_MEMORY else SIZE_MEMORY), n)

    def learn(self, request: InferenceRequest, elements: int) -> None:
        """A REST JSON body's elements, as its tensor headers declared them, beside its length."""
        model, size = request.model, request.size_bytes
        if model is None or size is None or elements <= 0 or sized(request)[1] != _JSON:
            return
        fit = self._elements.get(model)
        self._elements[model] = (LineFit() if fit is None else fit).add(float(size), float(elements), _KEEP)

    def work(self, request: InferenceRequest, candidate: Candidate) -> float:
        """The request's work among ``candidate``'s (see the module docstring): its rows against the mean
        rows of the model's requests that came with rows; else its elements as the fit gives them from a
        JSON body's length, against the mean body's; else its bytes against the mean of the model's
        requests sized alike. Clamped to one row and ``max_batch`` rows at the model's mean rows per
        request (Triton's count, see :class:`Candidate`); 1 where the model does not batch, Triton has not
        counted its rows or this picker its requests."""
        mean_rows = candidate.rows
        if mean_rows <= 0.0:
            return 1.0
        model = request.model or ""
        rows = request.rows
        if rows is not None:
            seen = self._mean_rows.get(model)
            if seen is not None and seen[1] >= MIN_SIZES:
                mean_rows = seen[0]
            clamped = float(rows) if rows < candidate.max_rows else candidate.max_rows
            return clamped / mean_rows
        size, kind = sized(request)
        if size is None:
            return 1.0
        work: float | None = None
        if kind == _JSON:
            fit = self._elements.get(model)
            if fit is not None:
                work = _relative(fit, float(size))
        if work is None:
            mean = self._mean_bytes[kind].get(model)
            if mean is None or mean[1] < MIN_SIZES or mean[0] <= 0.0:
                return 1.0
            work = size / mean[0]
        low, high = 1.0 / mean_rows, candidate.max_rows / mean_rows
        return low if work < low else high if work > high else work
