"""A request's work from what the picker sees before routing it (extproc.datapath.scheduling.work), and the
fit of REST JSON bodies' elements on their lengths that the body check feeds."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from extproc.config import parse_fleet
from extproc.datapath.batch_cost import BatchCost, Batching
from extproc.datapath.datastore import Datastore, ModelTimes
from extproc.datapath.metrics import PickerMetrics
from extproc.datapath.scheduling.scheduler import Scheduler
from extproc.datapath.scheduling.scorers import Candidate, prepare
from extproc.datapath.scheduling.types import InferenceRequest, Protocol
from extproc.datapath.scheduling.work import MIN_SIZES, RequestSizes
from extproc.handlers.server import Processor

# A JSON body's length: what does not grow with its elements, and what does.
OVERHEAD, PER_ELEMENT = 400, 10


def rest(elements: int, model: str = "embed") -> InferenceRequest:
    return InferenceRequest(Protocol.HTTP, model, size_bytes=OVERHEAD + PER_ELEMENT * elements)


def store() -> Datastore:
    """Two hosts serving "embed", batching up to 32 rows, Triton's mean 4 rows per request."""
    fleet = parse_fleet(
        {
            "hosts": [{"name": f"g{i}", "address": f"10.0.0.{i}", "tier": "gpu"} for i in (1, 2)],
            "models": [{"name": "embed", "tiers": ["gpu"]}],
        }
    )
    s = Datastore(fleet)
    now = s.now()
    for host in s.hosts.values():
        s.update_index(host, {"embed": frozenset({"1"})}, frozenset({"embed"}), now)
        host.metrics_at = host.envoy_at = now
        host.load.service_ms = 4.0
        host.load.models = {
            "embed": ModelTimes(
                service_ms=4.0, exec_ms=12.0, drain_ms=4.0, cost=BatchCost(4.0, 1.0), rows_per_request=4.0
            )
        }
        host.batching = {"embed": Batching(max_batch=32, instances=1)}
    s.changed()
    return s


@pytest.fixture
def candidate() -> Candidate:
    s = store()
    return prepare([s.hosts["g1"]], "embed")[0]


def test_json_bodies_are_sized_by_their_elements_once_learned(candidate: Candidate) -> None:
    """Lengths alone overstate a small body against a big one (the JSON around the numbers); once the
    picker has read enough bodies' tensor headers, a length gives the body's elements."""
    sizes = RequestSizes()
    mix = [4, 4, 4, 32] * 8  # mean 11 elements
    for n in mix:
        sizes.observe(rest(n), "embed")
    mean_bytes = OVERHEAD + PER_ELEMENT * 11
    assert sizes.work(rest(32), candidate) == pytest.approx((OVERHEAD + 320) / mean_bytes), "by length"
    for n in mix[: int(MIN_SIZES) - 1]:
        sizes.learn(rest(n), n)
    assert sizes.work(rest(32), candidate) == pytest.approx((OVERHEAD + 320) / mean_bytes), "too few yet"
    for n in mix[int(MIN_SIZES) - 1 :]:
        sizes.learn(rest(n), n)
    # Against the mean of the recent bodies (weighted to the last ones): about 11 elements.
    assert sizes.work(rest(32), candidate) == pytest.approx(32 / 11, rel=0.02)
    assert sizes.work(rest(4), candidate) == pytest.approx(4 / 11, rel=0.02)
    assert sizes.work(rest(100_000), candidate) == pytest.approx(32 / 4), "at most max_batch rows"


def test_what_is_not_a_json_body_is_not_learned(candidate: Candidate) -> None:
    sizes = RequestSizes()
    for n in [4, 32] * 16:
        sizes.learn(InferenceRequest(Protocol.GRPC, "embed", size_bytes=OVERHEAD + PER_ELEMENT * n), n)
        binary = InferenceRequest(Protocol.HTTP, "embed", size_bytes=200 + 4 * n, tensor_bytes=4 * n)
        sizes.learn(binary, n)
        sizes.learn(rest(n), 0)  # a body whose tensors the reader did not count
    assert sizes.work(rest(32), candidate) == 1.0, "nothing learned, and no length seen"


def test_bodies_of_one_length_are_compared_by_length(candidate: Candidate) -> None:
    """Without a spread of lengths there is no line to fit: lengths are compared as they are."""
    sizes = RequestSizes()
    for _ in range(32):
        sizes.observe(rest(8), "embed")
        sizes.learn(rest(8), 8)
    assert sizes.work(rest(8), candidate) == pytest.approx(1.0)
    assert sizes.work(rest(16), candidate) == pytest.approx((OVERHEAD + 160) / (OVERHEAD + 80))


def headers(elements: int) -> ep.ProcessingRequest:
    body_length = len(body(elements))
    pairs = [(":method", "POST"), (":path", "/v2/models/embed/infer"), ("content-length", str(body_length))]
    message = ep.ProcessingRequest(
        request_headers=ep.HttpHeaders(
            headers=base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs])
        )
    )
    message.protocol_config.request_body_mode = processing_mode_pb2.ProcessingMode.STREAMED
    return message


def body(elements: int) -> bytes:
    tensor = {"name": "INPUT0", "shape": [elements, 1], "datatype": "FP32", "data": [1.5] * elements}
    return json.dumps({"inputs": [tensor]}).encode()


async def test_the_body_check_teaches_the_scheduler_each_models_element_sizes() -> None:
    s = store()
    scheduler = Scheduler(s.fleet, s)
    processor = Processor(s.fleet, scheduler, PickerMetrics(s))

    async def stream(elements: int) -> AsyncIterator[bytes]:
        yield headers(elements).SerializeToString()
        chunk = ep.ProcessingRequest(request_body=ep.HttpBody(body=body(elements), end_of_stream=True))
        yield chunk.SerializeToString()

    context: Any = None
    for n in [1, 1, 1, 8] * 6:
        answers = [a async for a in processor.Process(stream(n), context)]
        assert answers[0].HasField("request_headers"), answers[0]
    (candidate,) = prepare([s.hosts["g1"]], "embed")
    small = InferenceRequest(Protocol.HTTP, "embed", size_bytes=len(body(1)))
    big = InferenceRequest(Protocol.HTTP, "embed", size_bytes=len(body(8)))
    assert scheduler.work(big, candidate) / scheduler.work(small, candidate) == pytest.approx(8.0, rel=0.05)
