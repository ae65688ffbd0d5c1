"""The picker's answers where Triton has one (no servers): Triton's status and words for a model or version it
does not serve, a host's answer where only a host can write Triton's (readiness probes, streams), and the
gateway's own answers with retry-after where retrying helps. tests/test_triton_contract.py holds the same
answers to a real Triton's."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from tritonclient.grpc import service_pb2

from extproc.config import Fleet, parse_fleet
from extproc.datapath.datastore import Datastore
from extproc.datapath.headers import HOSTS_HEADER, TIER_HEADER
from extproc.datapath.metrics import PickerMetrics
from extproc.datapath.scheduling.scheduler import Scheduler
from extproc.datapath.scheduling.types import InferenceRequest, Priority, Protocol, Reject
from extproc.handlers.server import Processor

UNKNOWN_MODEL = "Request for unknown model: 'nope' is not found"


def fleet() -> Fleet:
    return parse_fleet(
        {
            "hosts": [
                {"name": "g1", "address": "10.0.0.1", "tier": "gpu"},
                {"name": "c1", "address": "10.0.1.1", "tier": "cpu"},
            ],
            "models": [{"name": "mlp", "tiers": ["cpu", "gpu"]}, {"name": "seq", "tiers": ["gpu"], "sequence": True}],
        }
    )


def live(store: Datastore, ready: dict[str, dict[str, list[str]]], known: tuple[str, ...] = ()) -> None:
    """Hosts fresh, with ``ready`` models (name → versions) READY and ``known`` listed besides."""
    now = store.now()
    for name, host in store.hosts.items():
        models = {m: frozenset(v) for m, v in ready.get(name, {}).items()}
        store.update_index(host, models, frozenset({*models, *known}), now)
        host.metrics_at = host.envoy_at = now
        host.load.service_ms = 2.0


@pytest.fixture
def store() -> Datastore:
    store = Datastore(fleet())
    live(store, {"g1": {"mlp": ["1"], "seq": ["1"]}, "c1": {"mlp": ["1"]}}, known=("unloaded",))
    return store


def http(model: str, version: str | None = None) -> InferenceRequest:
    return InferenceRequest(Protocol.HTTP, model, version)


def rejected(decision: Any) -> Reject:
    assert isinstance(decision, Reject), decision
    return decision


# ------------------------------------------------------------------------------------------------ scheduler


def test_unknown_model_in_tritons_words(store: Datastore) -> None:
    reject = rejected(Scheduler(store.fleet, store).decide(http("nope")))
    assert (reject.status, reject.message, reject.reason, reject.retry_after) == (
        404,
        UNKNOWN_MODEL,
        "unknown_model",
        False,
    )


def test_unknown_version_in_tritons_words(store: Datastore) -> None:
    reject = rejected(Scheduler(store.fleet, store).decide(http("mlp", "7")))
    assert (reject.status, reject.message, reject.reason) == (
        404,
        "Request for unknown model: 'mlp' version 7 is not found",
        "unknown_version",
    )


@pytest.mark.parametrize(
    ("protocol", "version", "status", "message"),
    [
        (Protocol.HTTP, "latest", 404, "Not Found"),  # Triton has no route for a REST version but digits
        (Protocol.HTTP, "-1", 404, "Not Found"),
        (
            Protocol.GRPC,
            "latest",
            400,
            "failed to get model version from specified version string 'latest' (details: stol), version should be "
            "an integral value > 0",
        ),
        (
            Protocol.GRPC,
            "-1",
            400,
            "invalid model version specified '-1' , version should be an integral value > 0",
        ),
        (Protocol.GRPC, "99999999999999999999", 400, "failed to get model version from specified version string"),
        (Protocol.HTTP, "0", 404, "Request for unknown model: 'mlp' version 0 is not found"),
        (Protocol.HTTP, "007", 404, "Request for unknown model: 'mlp' version 7 is not found"),
        (Protocol.GRPC, " +7", 404, "Request for unknown model: 'mlp' version 7 is not found"),
    ],
)
def test_versions_as_triton_reads_them(
    store: Datastore, protocol: Protocol, version: str, status: int, message: str
) -> None:
    reject = rejected(Scheduler(store.fleet, store).decide(InferenceRequest(protocol, "mlp", version)))
    assert (reject.status, reject.reason) == (status, "unknown_version")
    assert reject.message.startswith(message)


@pytest.mark.parametrize("version", ["01", "0001"])
def test_a_version_with_leading_zeros_is_the_version_triton_reads(store: Datastore, version: str) -> None:
    decision = Scheduler(store.fleet, store).decide(http("mlp", version))
    assert not isinstance(decision, Reject), decision


def test_a_bad_version_of_an_unknown_model_is_refused_as_triton_reads_it_first(store: Datastore) -> None:
    reject = rejected(Scheduler(store.fleet, store).decide(InferenceRequest(Protocol.GRPC, "nope", "x")))
    assert reject.status == 400 and reject.message.startswith("failed to get model version")
    reject = rejected(Scheduler(store.fleet, store).decide(http("nope", "7")))
    assert (reject.status, reject.message) == (404, UNKNOWN_MODEL)


def test_a_model_ready_nowhere_in_tritons_words(store: Datastore) -> None:
    """Listed in a repository, ready on no host, and every host has reported: Triton's refusal."""
    reject = rejected(Scheduler(store.fleet, store).decide(http("unloaded")))
    assert (reject.status, reject.message, reject.reason, reject.retry_after) == (
        404,
        "Request for unknown model: 'unloaded' is not found",
        "model_not_ready",
        False,
    )


def test_a_model_ready_nowhere_while_a_host_is_silent_is_retried(store: Datastore) -> None:
    """A host whose repository index is stale may have the model: the gateway's 503, with retry-after."""
    store.hosts["c1"].index_at = store.now() - 60
    reject = rejected(Scheduler(store.fleet, store).decide(http("unloaded")))
    assert (reject.status, reject.reason, reject.retry_after) == (503, "no_ready_host", True)
    assert "retry" in reject.message


def test_no_ready_host_now_is_the_gateways_own_answer(store: Datastore) -> None:
    for host in store.hosts.values():
        host.envoy.ejected = True
    reject = rejected(Scheduler(store.fleet, store).decide(http("mlp")))
    assert (reject.status, reject.reason, reject.retry_after) == (503, "no_ready_host", True)
    assert reject.message.startswith("model 'mlp' has no ready host right now") and "retry" in reject.message


def test_shed_says_why_and_when_to_retry(store: Datastore) -> None:
    for host in store.hosts.values():
        host.envoy.active = 10_000
        host.reset_estimate(10_000, store.now())
    request = InferenceRequest(Protocol.HTTP, "mlp", priority=Priority.SHEDDABLE)
    reject = rejected(Scheduler(store.fleet, store).decide(request))
    assert (reject.status, reject.reason, reject.retry_after) == (429, "shed", True)
    assert "sheddable" in reject.message and "retry" in reject.message


# ---------------------------------------------------------------------------------------------- processor


def headers_message(path: str, method: str = "GET", streamed: bool = False) -> ep.ProcessingRequest:
    headers = [(":method", method), (":path", path)]
    message = ep.ProcessingRequest(
        request_headers=ep.HttpHeaders(
            headers=base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers]),
            end_of_stream=not streamed,
        )
    )
    if streamed:
        message.protocol_config.request_body_mode = processing_mode_pb2.ProcessingMode.STREAMED
    return message


def grpc_body(message: Any) -> ep.ProcessingRequest:
    data = message.SerializeToString()
    frame = b"\0" + len(data).to_bytes(4, "big") + data
    return ep.ProcessingRequest(request_body=ep.HttpBody(body=frame, end_of_stream=True))


async def answer(store: Datastore, *messages: ep.ProcessingRequest) -> ep.ProcessingResponse:
    processor = Processor(store.fleet, Scheduler(store.fleet, store), PickerMetrics(store))

    async def requests() -> AsyncIterator[bytes]:
        for m in messages:
            yield m.SerializeToString()

    context: Any = None  # no test here reaches the picker's abort (it has telemetry)
    responses = [r async for r in processor.Process(requests(), context)]
    return responses[0]


def routed_to(response: ep.ProcessingResponse) -> dict[str, str]:
    mutation = response.request_headers.response.header_mutation
    return {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers}


async def test_rest_refusal_is_tritons_json_error(store: Datastore) -> None:
    for path in ("/v2/models/nope", "/v2/models/nope/config", "/v2/models/nope/infer"):
        immediate = (await answer(store, headers_message(path))).immediate_response
        assert immediate.status.code == 404
        assert immediate.body == b'{"error":"' + UNKNOWN_MODEL.encode() + b'"}'  # Triton's, byte for byte
        headers = {h.header.key: h.header.raw_value.decode() for h in immediate.headers.set_headers}
        assert headers == {"content-type": "application/json"}


async def test_grpc_refusal_is_not_found_with_tritons_message(store: Datastore) -> None:
    path = "/inference.GRPCInferenceService/ModelMetadata"
    body = grpc_body(service_pb2.ModelMetadataRequest(name="nope"))
    immediate = (await answer(store, headers_message(path, "POST", streamed=True), body)).immediate_response
    assert immediate.grpc_status.status == 5  # NOT_FOUND
    assert immediate.body.decode() == UNKNOWN_MODEL


@pytest.mark.parametrize(
    "path", ["/v2/models/nope/ready", "/v2/models/mlp/versions/7/ready", "/v2/models/unloaded/ready"]
)
async def test_rest_readiness_of_a_model_served_nowhere_is_a_hosts_answer(store: Datastore, path: str) -> None:
    """Triton answers not ready (400, no body), not an error: any live host says so."""
    headers = routed_to(await answer(store, headers_message(path)))
    assert headers[TIER_HEADER] == "gpu" and headers[HOSTS_HEADER] == "10.0.0.1:8000"


async def test_rest_readiness_while_no_host_is_ready_now_is_a_hosts_answer(store: Datastore) -> None:
    store.hosts["c1"].envoy.ejected = True
    store.hosts["g1"].draining = True
    store.changed()
    response = await answer(store, headers_message("/v2/models/mlp/ready"))
    # No live host at all to ask: the gateway's 503.
    assert response.immediate_response.status.code == 503
    store.hosts["g1"].draining = False
    store.hosts["g1"].ready.pop("mlp")
    store.update_index(store.hosts["g1"], dict(store.hosts["g1"].ready), store.hosts["g1"].known, store.now())
    headers = routed_to(await answer(store, headers_message("/v2/models/mlp/ready")))
    assert headers[HOSTS_HEADER] == "10.0.0.1:8000"


@pytest.mark.parametrize("method", ["ModelReady", "ModelStreamInfer"])
async def test_grpc_readiness_and_streams_of_an_unknown_model_are_a_hosts_answer(store: Datastore, method: str) -> None:
    """Envoy makes the picker's answer to a gRPC client a status without a body: ``ready: false`` and a
    stream's in-band error_message can only come from a host."""
    message = (
        service_pb2.ModelReadyRequest(name="nope")
        if method == "ModelReady"
        else service_pb2.ModelInferRequest(model_name="nope")
    )
    path = f"/inference.GRPCInferenceService/{method}"
    headers = routed_to(await answer(store, headers_message(path, "POST", streamed=True), grpc_body(message)))
    assert headers[TIER_HEADER] == "gpu" and headers[HOSTS_HEADER] == "10.0.0.1:8001"


async def test_grpc_infer_of_an_unknown_model_is_the_pickers_answer(store: Datastore) -> None:
    path = "/inference.GRPCInferenceService/ModelInfer"
    body = grpc_body(service_pb2.ModelInferRequest(model_name="nope"))
    immediate = (await answer(store, headers_message(path, "POST", streamed=True), body)).immediate_response
    assert immediate.grpc_status.status == 5 and immediate.body.decode() == UNKNOWN_MODEL


async def test_rest_readiness_of_a_model_with_a_ready_host_is_routed_as_usual(store: Datastore) -> None:
    headers = routed_to(await answer(store, headers_message("/v2/models/mlp/ready")))
    assert headers[TIER_HEADER] == "cpu" and headers[HOSTS_HEADER].startswith("10.0.1.1:8000")


async def test_a_model_named_ready_is_not_a_readiness_probe(store: Datastore) -> None:
    immediate = (await answer(store, headers_message("/v2/models/ready"))).immediate_response
    assert immediate.status.code == 404
    assert json.loads(immediate.body) == {"error": "Request for unknown model: 'ready' is not found"}
