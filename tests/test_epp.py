"""The Endpoint Picker Protocol (GIE proposal 004) on the picker's ext_proc stream, without servers: a GIE
gateway's messages in (FULL_DUPLEX_STREAMED bodies, response phases, the subset hint), the protocol's
answers out. tests/test_epp_gateway.py runs the same through a gateway-shaped Envoy and real Triton hosts."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import struct_pb2
from structlog.testing import capture_logs
from tritonclient.grpc import service_pb2

from extproc.config import Fleet, parse_fleet
from extproc.datapath.datastore import Datastore
from extproc.datapath.headers import (
    EPP_DESTINATION_HEADER,
    EPP_NAMESPACE,
    EPP_SERVED_KEY,
    EPP_SUBSET_KEY,
    EPP_SUBSET_NAMESPACE,
    HOSTS_HEADER,
)
from extproc.datapath.metrics import PickerMetrics
from extproc.datapath.scheduling.scheduler import Scheduler
from extproc.handlers.server import Processor

_DUPLEX = processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED
GPU_REST, CPU_REST = "10.0.0.1:8000", "10.0.1.1:8000"
GPU_GRPC = "10.0.0.1:8001"


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


@pytest.fixture
def store() -> Datastore:
    store = Datastore(fleet())
    now = store.now()
    ready = {"g1": {"mlp", "seq"}, "c1": {"mlp"}}
    for name, host in store.hosts.items():
        models = {m: frozenset({"1"}) for m in ready[name]}
        store.update_index(host, models, frozenset(models), now)
        host.metrics_at = host.envoy_at = now
        host.load.service_ms = 2.0
    return store


def request_headers(
    path: str, method: str = "POST", body: bytes | None = None, subset: Sequence[str] | str | None = None
) -> ep.ProcessingRequest:
    """The first message of a GIE gateway's stream: all headers (no forward rules), both bodies in
    FULL_DUPLEX_STREAMED, and the subset hint where given."""
    headers = [(":path", path), (":method", method), (":authority", "gateway"), ("user-agent", "test")]
    if body is not None:
        headers.append(("content-length", str(len(body))))
    if path.startswith("/inference."):
        headers.append(("content-type", "application/grpc"))
    message = ep.ProcessingRequest(
        request_headers=ep.HttpHeaders(
            headers=base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers]),
            end_of_stream=body is None,
        )
    )
    message.protocol_config.request_body_mode = _DUPLEX
    message.protocol_config.response_body_mode = _DUPLEX
    if subset is not None:
        hint = message.metadata_context.filter_metadata[EPP_SUBSET_NAMESPACE]
        if isinstance(subset, str):
            hint.fields[EPP_SUBSET_KEY].string_value = subset
        else:
            hint.fields[EPP_SUBSET_KEY].list_value.values.extend(struct_pb2.Value(string_value=e) for e in subset)
    return message


def request_body(body: bytes, end: bool = True) -> ep.ProcessingRequest:
    return ep.ProcessingRequest(request_body=ep.HttpBody(body=body, end_of_stream=end))


def response_messages(served: str | None, body: bytes = b'{"ok":1}') -> list[ep.ProcessingRequest]:
    """What the gateway sends once the host answered: its headers (with the served endpoint), body and
    trailers."""
    headers = ep.ProcessingRequest(
        response_headers=ep.HttpHeaders(
            headers=base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=":status", raw_value=b"200")])
        )
    )
    if served is not None:
        headers.metadata_context.filter_metadata[EPP_NAMESPACE].fields[EPP_SERVED_KEY].string_value = served
    return [
        headers,
        ep.ProcessingRequest(response_body=ep.HttpBody(body=body, end_of_stream=False)),
        ep.ProcessingRequest(response_trailers=ep.HttpTrailers()),
    ]


def infer_body(model: str = "mlp") -> bytes:
    return json.dumps(
        {"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}], "model": model}
    ).encode()


def grpc_frame(message: Any) -> bytes:
    data: bytes = message.SerializeToString()
    return b"\0" + len(data).to_bytes(4, "big") + data


async def stream(store: Datastore, messages: Sequence[ep.ProcessingRequest]) -> list[ep.ProcessingResponse]:
    """Every answer of one GIE gateway's stream to ``messages``."""
    processor = Processor(store.fleet, Scheduler(store.fleet, store), PickerMetrics(store))

    async def requests() -> AsyncIterator[bytes]:
        for m in messages:
            yield m.SerializeToString()

    context: Any = None  # the store has telemetry: the picker never aborts here
    return [r async for r in processor.ProcessEpp(requests(), context)]


def destination(response: ep.ProcessingResponse) -> str:
    """The endpoints a routing answer names, held to the protocol: the header and the metadata agree, and
    none of the picker's own routing headers is set."""
    mutation = response.request_headers.response.header_mutation
    headers: dict[str, str] = {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers}
    assert set(headers) == {EPP_DESTINATION_HEADER}, headers
    metadata = response.dynamic_metadata.fields[EPP_NAMESPACE].struct_value.fields[EPP_DESTINATION_HEADER]
    assert metadata.string_value == headers[EPP_DESTINATION_HEADER]
    return headers[EPP_DESTINATION_HEADER]


def streamed(body: ep.BodyResponse) -> tuple[bytes, bool]:
    chunk = body.response.body_mutation.streamed_response
    return chunk.body, chunk.end_of_stream


async def test_rest_request_and_response_pass_whole_through_the_picker(store: Datastore) -> None:
    """FULL_DUPLEX_STREAMED: the picker owns both bodies, so each chunk comes back unchanged and every
    message of the stream gets its answer, in order."""
    body = infer_body()
    messages = [
        request_headers("/v2/models/seq/infer", body=body),
        request_body(body[:10], end=False),
        request_body(body[10:]),
        *response_messages(served=GPU_REST),
    ]
    answers = await stream(store, messages)
    kinds = [a.WhichOneof("response") for a in answers]
    assert kinds == [
        "request_headers",
        "request_body",
        "request_body",
        "response_headers",
        "response_body",
        "response_trailers",
    ]
    assert destination(answers[0]) == GPU_REST  # seq is ready on g1 only
    assert streamed(answers[1].request_body) == (body[:10], False)
    assert streamed(answers[2].request_body) == (body[10:], True)
    assert streamed(answers[4].response_body) == (b'{"ok":1}', False)


async def test_the_ranked_hosts_go_to_the_gateway_best_first(store: Datastore) -> None:
    answers = await stream(store, [request_headers("/v2/models/mlp/ready", method="GET")])
    endpoints = destination(answers[0]).split(",")
    assert sorted(endpoints) == sorted([GPU_REST, CPU_REST])


async def test_grpc_is_routed_by_the_model_in_its_body_to_the_grpc_port(store: Datastore) -> None:
    frame = grpc_frame(service_pb2.ModelInferRequest(model_name="seq"))
    messages = [
        request_headers("/inference.GRPCInferenceService/ModelInfer", body=frame),
        request_body(frame),
        *response_messages(served=GPU_GRPC),
    ]
    answers = await stream(store, messages)
    assert destination(answers[0]) == GPU_GRPC
    assert streamed(answers[1].request_body) == (frame, True)
    assert [a.WhichOneof("response") for a in answers[2:]] == ["response_headers", "response_body", "response_trailers"]


@pytest.mark.parametrize("subset", [[CPU_REST], CPU_REST, [CPU_REST, "10.9.9.9:8000"]])
async def test_the_subset_hint_limits_the_choice(store: Datastore, subset: list[str] | str) -> None:
    answers = await stream(store, [request_headers("/v2/models/mlp/ready", method="GET", subset=subset)])
    assert destination(answers[0]) == CPU_REST


@pytest.mark.parametrize(
    "subset",
    [
        [],  # the protocol: an empty list is answered 503
        ["10.9.9.9:8000"],  # no host of the fleet
        [CPU_REST],  # a host without the model (seq is on g1 only)
        [GPU_GRPC],  # the right host, the wrong port for REST
    ],
)
async def test_no_usable_endpoint_in_the_subset_is_503(store: Datastore, subset: list[str]) -> None:
    body = infer_body("seq")
    answers = await stream(
        store, [request_headers("/v2/models/seq/infer", body=body, subset=subset), request_body(body)]
    )
    (answer,) = answers
    immediate = answer.immediate_response
    assert immediate.status.code == 503
    headers = {h.header.key: h.header.raw_value.decode() for h in immediate.headers.set_headers}
    assert headers["retry-after"] == "1"


async def test_unknown_model_is_404_in_tritons_words(store: Datastore) -> None:
    body = infer_body("nope")
    (answer,) = await stream(store, [request_headers("/v2/models/nope/infer", body=body), request_body(body)])
    assert answer.immediate_response.status.code == 404
    assert json.loads(answer.immediate_response.body) == {"error": "Request for unknown model: 'nope' is not found"}


async def test_a_bad_tensor_header_is_refused_mid_stream(store: Datastore) -> None:
    """The picker's body checks hold in the gateway's dialect: the chunk that shows the tensor is bad is
    answered 400 instead of being passed on."""
    body = json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [1]}]}).encode()
    answers = await stream(store, [request_headers("/v2/models/mlp/infer", body=body), request_body(body)])
    assert destination(answers[0])
    assert answers[-1].immediate_response.status.code == 400


async def test_a_request_without_a_body_still_gets_its_response_phases_answered(store: Datastore) -> None:
    messages = [request_headers("/v2/health/ready", method="GET"), *response_messages(served=CPU_REST)]
    answers = await stream(store, messages)
    assert destination(answers[0]) in (GPU_REST, CPU_REST)
    assert [a.WhichOneof("response") for a in answers[1:]] == ["response_headers", "response_body", "response_trailers"]


async def test_the_served_endpoint_is_logged_when_it_is_not_the_picked_one(store: Datastore) -> None:
    """The gateway reports the endpoint that served the request: another than the picker's first means
    Envoy retried on the next one, or failed open."""
    first = [request_headers("/v2/models/seq/ready", method="GET")]
    with capture_logs() as logs:
        await stream(store, [*first, *response_messages(served=GPU_REST)])
        await stream(store, [*first, *response_messages(served=None)])
    assert [e["event"] for e in logs] == ["epp_served"]
    with capture_logs() as logs:
        await stream(store, [*first, *response_messages(served=CPU_REST)])
    assert [(e["event"], e["picked"], e["served"]) for e in logs] == [("epp_served_elsewhere", GPU_REST, CPU_REST)]


async def test_the_pickers_own_dialect_is_unchanged(store: Datastore) -> None:
    processor = Processor(store.fleet, Scheduler(store.fleet, store), PickerMetrics(store))

    async def requests() -> AsyncIterator[bytes]:
        yield request_headers("/v2/models/seq/ready", method="GET").SerializeToString()

    context: Any = None
    (answer,) = [r async for r in processor.Process(requests(), context)]
    mutation = answer.request_headers.response.header_mutation
    assert {h.header.key for h in mutation.set_headers} >= {HOSTS_HEADER}
    assert not answer.HasField("dynamic_metadata")


async def test_the_client_key_is_the_operators_header_never_the_clients_copy_of_ours() -> None:
    """A GIE gateway forwards the client's headers as they are, so a client could send our own key header
    (x-triton-lb-client) and pass as another. The picker reads picker.overload.fairness_header there
    instead: here the owner of sequence 7 is tenant a, and tenant b, sending the same forged key, may not
    touch it; without a fairness header every client of the gateway is one key."""
    data = fleet().model_dump(mode="json", exclude={"source"})
    data["picker"] = {"overload": {"fairness_header": "x-tenant"}}
    store = Datastore(parse_fleet(data))
    now = store.now()
    for name, host in store.hosts.items():
        models = {m: frozenset({"1"}) for m in ({"mlp", "seq"} if name == "g1" else {"mlp"})}
        store.update_index(host, models, frozenset(models), now)
        host.metrics_at = host.envoy_at = now

    def sequence_request(tenant: str, start: bool) -> list[ep.ProcessingRequest]:
        body = json.dumps(
            {
                "parameters": {"sequence_id": 7, "sequence_start": start},
                "inputs": [{"name": "INPUT", "shape": [1, 1], "datatype": "FP32", "data": [1]}],
            }
        ).encode()
        headers = request_headers("/v2/models/seq/infer", body=body)
        for key, value in (("x-tenant", tenant), ("x-triton-lb-client", "forged")):
            headers.request_headers.headers.headers.append(base_pb2.HeaderValue(key=key, raw_value=value.encode()))
        return [headers, request_body(body)]

    processor = Processor(store.fleet, Scheduler(store.fleet, store), PickerMetrics(store))

    async def answers(messages: list[ep.ProcessingRequest]) -> list[ep.ProcessingResponse]:
        async def requests() -> AsyncIterator[bytes]:
            for m in messages:
                yield m.SerializeToString()

        context: Any = None
        return [r async for r in processor.ProcessEpp(requests(), context)]

    started = await answers(sequence_request("a", start=True))
    assert started[0].HasField("request_headers")
    (refused,) = await answers(sequence_request("b", start=False))
    assert refused.immediate_response.status.code == 403
    assert (await answers(sequence_request("a", start=False)))[0].HasField("request_headers")


def with_headers(message: ep.ProcessingRequest, **headers: str) -> ep.ProcessingRequest:
    """``message`` (request headers) with more headers; ``content_type`` stands for ``content-type``."""
    for key, value in headers.items():
        header = base_pb2.HeaderValue(key=key.replace("_", "-"), raw_value=value.encode())
        message.request_headers.headers.headers.append(header)
    return message


@pytest.mark.parametrize(
    ("path", "api"),
    [
        ("/v2/repository/index", "model repository"),
        ("/v2/repository/models/mlp/load", "model repository"),
        ("/v2/systemsharedmemory/region/r/register", "shared-memory"),
        ("/v2/logging", "logging"),
        ("/v2/models/mlp/trace/setting", "trace"),
        ("/v2/models/stats", "statistics"),
    ],
)
async def test_tritons_control_apis_are_refused_before_any_host_is_picked(
    store: Datastore, path: str, api: str
) -> None:
    """A GIE gateway's routes send every request of the pool to the picker, not only those our Envoy config
    lets through: the picker refuses Triton's control APIs itself, with the reason, as our Envoy does."""
    (answer,) = await stream(store, [request_headers(path, body=b"{}"), request_body(b"{}")])
    immediate = answer.immediate_response
    assert immediate.status.code == 403
    error = json.loads(immediate.body)["error"]
    assert error.startswith("the gateway does not offer") and api in error, error


@pytest.mark.parametrize(
    "method", ["RepositoryIndex", "RepositoryModelLoad", "CudaSharedMemoryRegister", "LogSettings", "Whatever"]
)
async def test_grpc_control_methods_are_permission_denied(store: Datastore, method: str) -> None:
    path = f"/inference.GRPCInferenceService/{method}"
    (answer,) = await stream(store, [request_headers(path, body=b"\0\0\0\0\0"), request_body(b"\0\0\0\0\0")])
    immediate = answer.immediate_response
    assert (immediate.status.code, immediate.grpc_status.status) == (403, 7)
    assert immediate.body.decode().startswith("the gateway does not offer")


@pytest.mark.parametrize(
    ("path", "headers", "status"),
    [
        ("/admin", {}, 404),
        ("/v2/anything/else", {}, 403),
        ("/v2/models/x/../../repository/index", {}, 400),
        ("/v2/models/..%2Frepository%2Findex/ready", {}, 400),
        ("/v2//repository/index", {}, 400),
        ("/v2/models/mlp/infer", {"content_encoding": "gzip"}, 415),
    ],
)
async def test_what_our_envoy_refuses_the_picker_refuses_on_a_gateways_stream(
    store: Datastore, path: str, headers: dict[str, str], status: int
) -> None:
    body = infer_body()
    first = with_headers(request_headers(path, body=body), **headers)
    (answer,) = await stream(store, [first, request_body(body)])
    assert answer.immediate_response.status.code == status


async def test_statistics_are_served_where_the_operator_allows_them(store: Datastore) -> None:
    data = fleet().model_dump(mode="json", exclude={"source"})
    data["envoy"] = {"allow_statistics": True}
    allowed = Datastore(parse_fleet(data))
    for host in allowed.hosts.values():
        models = {"mlp": frozenset({"1"})}
        allowed.update_index(host, models, frozenset(models), allowed.now())
        host.metrics_at = host.envoy_at = allowed.now()
    answers = await stream(allowed, [request_headers("/v2/models/mlp/stats", method="GET")])
    assert destination(answers[0])


async def test_a_rest_body_reaches_the_host_without_its_content_type_or_a_clients_admin_key(store: Datastore) -> None:
    """Triton 2.51 crashes on a large form-encoded body (the content type curl -d sends), whatever the
    path: as our Envoy routes do, the picker's answer removes the content type of REST requests, and any
    client copy of the admin key."""
    body = infer_body()
    first = with_headers(
        request_headers("/v2/models/mlp/infer", body=body),
        content_type="application/x-www-form-urlencoded",
        extproc_admin_key="guess",
    )
    answers = await stream(store, [first, request_body(body)])
    removed = set(answers[0].request_headers.response.header_mutation.remove_headers)
    assert removed == {"content-type", "extproc-admin-key", "triton-grpc-protocol-extproc-admin-key"}
    grpc = service_pb2.ModelInferRequest(model_name="mlp")
    frame = grpc_frame(grpc)
    first = with_headers(request_headers("/inference.GRPCInferenceService/ModelInfer", body=frame))
    answers = await stream(store, [first, request_body(frame)])
    assert "content-type" not in answers[0].request_headers.response.header_mutation.remove_headers
