"""Triton's contract, through the gateway: the gateway is a drop-in for a Triton host.

One set of checks over the KServe v2 / Triton protocol runs twice: against a Triton host's own ports
(``triton-a`` of the local stack, which has every model the checks use and none that the others lack) and
through the gateway (Envoy, the picker and the three hosts). Each check returns what a client sees, and the
two must be equal: the status, the shape of the body and the message, for raw REST calls and for
tritonclient's HTTP and gRPC clients used as applications use them (sync, ``async_infer``, asyncio, streams,
sequences, ``is_model_ready`` on models no host has, errors told apart by their message). Where the answer is
Triton's own, the check also pins it (``UNKNOWN_MODEL`` ...), so that a Triton upgrade that changes it shows
here.

The differences that are intended, each checked by the test that names it, and listed in
docs/reference/http-api.md ("Differences from Triton"):

- ``DIFF_CONTENT_TYPE``: where the picker refuses a REST inference request itself (an unknown model,
  version, a model no host has ready), its JSON error body is ``application/json``; Triton labels the same
  body ``text/plain`` on its inference route (its metadata and config routes say ``application/json``).
- ``DIFF_HEADERS``: the gateway's answers carry Envoy's headers (``x-triton-host`` with
  ``envoy.expose_upstream_host``, ``x-envoy-upstream-service-time``, ``server: envoy``) and, on the
  gateway's own refusals, ``retry-after``. Bodies, statuses and content types are Triton's.
- ``DIFF_CLOSED_APIS``: Triton's model repository, shared-memory, logging and trace APIs are refused by the
  gateway (403, gRPC ``PERMISSION_DENIED``) with a message that names the API and why: through the gateway
  they would act on one host picked at random. A host that ``extproc up`` starts refuses them too, unless
  the caller has the admin key, in its own words.
- ``DIFF_STATISTICS``: statistics are refused the same way unless ``envoy.allow_statistics``; where allowed
  they are the numbers of the one host that answered, not the fleet's.
"""

from __future__ import annotations

import asyncio
import json
import queue
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
import tritonclient.http as httpclient
import tritonclient.http.aio as httpclient_aio
from tritonclient.utils import InferenceServerException

from extproc.datapath.headers import UPSTREAM_HOST_HEADER
from tests.stack import Stack, local_fleet, start_stack, stop_stack

pytestmark = pytest.mark.e2e

PROTOCOLS = ("http", "grpc")
# The models loaded on triton-a, and through the gateway (each on at least one host).
MODELS = ("mlp_classifier", "embed_normalize", "timed_batch", "seq_accumulate")
# In the model repository, loaded on no host: Triton knows its directory, not a model.
NOT_LOADED = "crash_probe"
UNKNOWN = "no_such_model"

# Triton 2.51's own words, as its clients see them.
UNKNOWN_MODEL = "Request for unknown model: '{model}' is not found"
UNKNOWN_VERSION = "Request for unknown model: '{model}' version {version} is not found"

DIFF_CONTENT_TYPE = "the picker's JSON errors to REST inference requests are application/json (Triton: text/plain)"
DIFF_HEADERS = "the gateway's answers carry Envoy's response headers and, on its own refusals, retry-after"
DIFF_CLOSED_APIS = "the gateway refuses Triton's control APIs (403 / PERMISSION_DENIED), naming the API and why"
DIFF_STATISTICS = "statistics are refused unless envoy.allow_statistics, and are then one host's numbers"


@dataclass(frozen=True)
class Endpoint:
    """Where a client connects: a Triton host's own ports, or the gateway's one port."""

    name: str
    http: str  # host:port
    grpc: str

    def client(self, protocol: str, **kwargs: Any) -> Any:
        if protocol == "http":
            return httpclient.InferenceServerClient(self.http, **kwargs)
        return grpcclient.InferenceServerClient(self.grpc, **kwargs)


@dataclass(frozen=True)
class Targets:
    direct: Endpoint
    gateway: Endpoint


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    run_dir = tmp_path_factory.mktemp("contract")
    stack = start_stack(run_dir, local_fleet(run_dir))
    yield stack
    stop_stack(stack)


@pytest.fixture(scope="module")
def targets(stack: Stack) -> Targets:
    host = stack.host("triton-a")
    assert set(MODELS) <= set(host["launch"]["models"]) and NOT_LOADED not in host["launch"]["models"]
    direct = Endpoint("triton-a", f"127.0.0.1:{host['http_port']}", f"127.0.0.1:{host['grpc_port']}")
    return Targets(direct, Endpoint("gateway", stack.http_url, stack.http_url))


# ---------------------------------------------------------------------------------------------- comparing


def outcome(call: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, ...]:
    """What a client sees of one call: ("ok", value), or ("error", status, message) as tritonclient raises
    it (status: the HTTP status, the gRPC code, or None for an error inside a gRPC stream)."""
    try:
        return ("ok", call(*args, **kwargs))
    except InferenceServerException as exc:
        return ("error", exc.status(), exc.message())


def same(targets: Targets, check: Callable[..., Any], *args: Any) -> Any:
    """Run ``check(endpoint, *args)`` against Triton, then through the gateway; the two must see the same.
    Returns Triton's."""
    direct = check(targets.direct, *args)
    gateway = check(targets.gateway, *args)
    assert gateway == direct, f"through the gateway:\n  {gateway!r}\nfrom Triton:\n  {direct!r}"
    return direct


def raw(endpoint: Endpoint, method: str, path: str, body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(f"http://{endpoint.http}{path}", data=body, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def rest(endpoint: Endpoint, method: str, path: str, body: Any = None) -> tuple[Any, ...]:
    """A REST call as the protocol defines its answer: status and body (parsed, where it is JSON); and the
    content type, but that of Triton's own errors to inference requests (``DIFF_CONTENT_TYPE``)."""
    status, headers, data = raw(endpoint, method, path, None if body is None else json.dumps(body).encode())
    try:
        answer = json.loads(data) if data else data
    except ValueError:
        answer = data
    content_type = headers.get("content-type")
    if path.endswith("/infer") and status != 200:
        content_type = None
    return status, content_type, answer


def rows(n: int, seed: int = 0) -> np.ndarray[Any, np.dtype[np.float32]]:
    return np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32)


def tensor(protocol: str, name: str, array: np.ndarray[Any, Any], binary: bool = True) -> Any:
    if protocol == "http":
        t = httpclient.InferInput(name, list(array.shape), _datatype(array))
        t.set_data_from_numpy(array, binary_data=binary)
        return t
    g = grpcclient.InferInput(name, list(array.shape), _datatype(array))
    g.set_data_from_numpy(array)
    return g


def _datatype(array: np.ndarray[Any, Any]) -> str:
    return {np.float32: "FP32", np.int64: "INT64"}[array.dtype.type]


def requested(protocol: str, names: tuple[str, ...], binary: bool = True) -> list[Any]:
    if protocol == "http":
        return [httpclient.InferRequestedOutput(n, binary_data=binary) for n in names]
    return [grpcclient.InferRequestedOutput(n) for n in names]


def infer_view(client: Any, request: dict[str, Any], names: tuple[str, ...]) -> tuple[Any, ...]:
    return result_view(client.infer(**request), names)


def result_of(pending: Any, names: tuple[str, ...]) -> tuple[Any, ...]:
    """The result of an ``async_infer`` call."""
    return result_view(pending.get_result(), names)


def result_view(result: Any, names: tuple[str, ...]) -> tuple[Any, ...]:
    """An inference result as a client reads it: the response's header (model, version, id, outputs' names,
    datatypes and shapes) and every output's values."""
    response = result.get_response()
    if not isinstance(response, dict):
        response = result.get_response(as_json=True)
        response.pop("raw_output_contents", None)
    header = {k: v for k, v in response.items() if k != "outputs"}
    outputs = sorted(
        (o["name"], o["datatype"], [int(d) for d in o["shape"]], o.get("parameters", {})) for o in response["outputs"]
    )
    values = {n: (str(result.as_numpy(n).dtype), result.as_numpy(n).tolist()) for n in names}
    return header, outputs, values


# ------------------------------------------------------------------------------------ health and metadata


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_health(targets: Targets, protocol: str) -> None:
    def check(endpoint: Endpoint) -> Any:
        client = endpoint.client(protocol)
        try:
            return [outcome(client.is_server_live), outcome(client.is_server_ready)]
        finally:
            client.close()

    assert same(targets, check) == [("ok", True), ("ok", True)]


def test_health_rest(targets: Targets) -> None:
    for path in ("/v2/health/live", "/v2/health/ready"):
        assert same(targets, rest, "GET", path)[0] == 200


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_server_metadata(targets: Targets, protocol: str) -> None:
    def check(endpoint: Endpoint) -> Any:
        client = endpoint.client(protocol)
        try:
            if protocol == "http":
                return outcome(client.get_server_metadata)
            return outcome(lambda: client.get_server_metadata(as_json=True))
        finally:
            client.close()

    kind, metadata = same(targets, check)
    assert kind == "ok" and metadata["name"] == "triton" and metadata["version"].startswith("2.")
    rest_metadata = same(targets, rest, "GET", "/v2")
    assert rest_metadata[0] == 200 and rest_metadata[2]["name"] == "triton"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_model_metadata_and_config(targets: Targets, protocol: str) -> None:
    def check(endpoint: Endpoint) -> Any:
        client = endpoint.client(protocol)
        as_json = {} if protocol == "http" else {"as_json": True}
        try:
            return [
                (
                    outcome(client.get_model_metadata, model, **as_json),
                    outcome(client.get_model_metadata, model, "1", **as_json),
                    outcome(client.get_model_config, model, **as_json),
                )
                for model in MODELS
            ]
        finally:
            client.close()

    for model, (metadata, versioned, config) in zip(MODELS, same(targets, check), strict=True):
        assert metadata[0] == "ok" and metadata[1]["name"] == model, metadata
        assert versioned == metadata
        assert config[0] == "ok", config


def test_model_metadata_and_config_rest(targets: Targets) -> None:
    for model in MODELS:
        for path in (f"/v2/models/{model}", f"/v2/models/{model}/versions/1", f"/v2/models/{model}/config"):
            assert same(targets, rest, "GET", path)[0] == 200


# ------------------------------------------------------------------------------------------------ readiness


READINESS = [
    *((model, "", True) for model in MODELS),
    ("timed_batch", "1", True),
    (UNKNOWN, "", False),
    ("timed_batch", "7", False),
    (NOT_LOADED, "", False),
]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_is_model_ready(targets: Targets, protocol: str) -> None:
    """Not ready is an answer, not an error: ``is_model_ready`` returns False for a model no host has."""

    def check(endpoint: Endpoint) -> Any:
        client = endpoint.client(protocol)
        try:
            return [outcome(client.is_model_ready, m, v) for m, v, _ in READINESS]
        finally:
            client.close()

    assert same(targets, check) == [("ok", ready) for _, _, ready in READINESS]


def test_model_ready_rest(targets: Targets) -> None:
    for model, version, ready in READINESS:
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/ready"
        status = same(targets, rest, "GET", path)[0]
        assert (status == 200) is ready, path


# ------------------------------------------------------------------------------------------------ errors


def refusals(protocol: str, model: str, version: str = "") -> Callable[[Endpoint], Any]:
    """Metadata, config, readiness and inference of a model (version) Triton does not serve."""

    def check(endpoint: Endpoint) -> Any:
        client = endpoint.client(protocol)
        as_json = {} if protocol == "http" else {"as_json": True}
        inputs = [tensor(protocol, "INPUT0", np.ones((1, 4), np.float32))]
        try:
            return [
                outcome(client.get_model_metadata, model, version, **as_json),
                outcome(client.get_model_config, model, version, **as_json),
                outcome(client.is_model_ready, model, version),
                outcome(client.infer, model, inputs, model_version=version),
            ]
        finally:
            client.close()

    return check


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_unknown_model(targets: Targets, protocol: str) -> None:
    metadata, config, ready, infer = same(targets, refusals(protocol, UNKNOWN))
    assert ready == ("ok", False)
    for answer in (metadata, config, infer):
        # Applications tell this error by its message (Triton's own examples do).
        assert answer[0] == "error" and answer[2].startswith(UNKNOWN_MODEL.format(model=UNKNOWN)), answer


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_unknown_version(targets: Targets, protocol: str) -> None:
    metadata, config, ready, infer = same(targets, refusals(protocol, "timed_batch", "7"))
    assert ready == ("ok", False)
    for answer in (metadata, config, infer):
        assert answer[0] == "error" and "timed_batch" in answer[2], answer


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_model_not_loaded(targets: Targets, protocol: str) -> None:
    metadata, config, ready, infer = same(targets, refusals(protocol, NOT_LOADED))
    assert ready == ("ok", False)
    for answer in (metadata, config, infer):
        assert answer[0] == "error" and NOT_LOADED in answer[2], answer


def test_refusals_rest(targets: Targets) -> None:
    """The raw answers: status, content type and JSON error body, for each REST endpoint."""
    body = {"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    for base in (f"/v2/models/{UNKNOWN}", "/v2/models/timed_batch/versions/7", f"/v2/models/{NOT_LOADED}"):
        for method, path, payload in (
            ("GET", base, None),
            ("GET", f"{base}/config", None),
            ("GET", f"{base}/ready", None),
            ("POST", f"{base}/infer", body),
        ):
            status, content_type, answer = same(targets, rest, method, path, payload)
            assert status >= 400 and set(answer) == {"error"}, (path, status, answer)
            if path.endswith("/ready"):
                assert (status, content_type, answer) == (400, "text/plain", {"error": "Model version not ready"})
            elif method == "GET":
                assert content_type == "application/json", (path, content_type)
    # DIFF_CONTENT_TYPE: the same body, labelled as what it is.
    path = f"/v2/models/{UNKNOWN}/infer"
    assert raw(targets.direct, "POST", path, json.dumps(body).encode())[1]["content-type"] == "text/plain"
    assert raw(targets.gateway, "POST", path, json.dumps(body).encode())[1]["content-type"] == "application/json"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_versions_triton_cannot_read(targets: Targets, protocol: str) -> None:
    """REST paths take versions in digits only (else Triton has no route); gRPC versions must parse as
    integers, and not negative; a version with leading zeros is that version."""

    def check(endpoint: Endpoint) -> Any:
        client = endpoint.client(protocol)
        as_json = {} if protocol == "http" else {"as_json": True}
        try:
            return [
                [outcome(client.get_model_metadata, "timed_batch", v, **as_json) for v in ("latest", "-1", "0")],
                outcome(client.get_model_metadata, "timed_batch", "01", **as_json)[0],
            ]
        finally:
            client.close()

    bad, leading_zero = same(targets, check)
    assert [answer[0] for answer in bad] == ["error"] * 3 and leading_zero == "ok"
    if protocol == "grpc":
        assert bad[0][1:] == (
            "StatusCode.INVALID_ARGUMENT",
            "failed to get model version from specified version string 'latest' (details: stol), version should "
            "be an integral value > 0",
        )
        assert bad[2][2] == UNKNOWN_VERSION.format(model="timed_batch", version=0)
    else:
        assert bad[0][1:] == ("404", "Not Found")


# --------------------------------------------------------------------------------------------- inference


@pytest.mark.parametrize(("protocol", "binary"), [("http", True), ("http", False), ("grpc", True)])
def test_inference(targets: Targets, protocol: str, binary: bool) -> None:
    """FP32 in, FP32 and INT64 out, as binary tensors or JSON (REST) and raw contents (gRPC)."""

    def check(endpoint: Endpoint) -> Any:
        client = endpoint.client(protocol)
        try:
            mlp = client.infer(
                "mlp_classifier",
                [tensor(protocol, "INPUT0", rows(3), binary)],
                outputs=requested(protocol, ("PROBS", "LABEL"), binary),
                request_id="contract-1",
            )
            embed = client.infer(
                "embed_normalize", [tensor(protocol, "INPUT", np.array([[3.0, 4.0, 0.0, 0.0]], np.float32), binary)]
            )
            timed = client.infer("timed_batch", [tensor(protocol, "INPUT0", np.ones((2, 4), np.float32), binary)])
            return [
                result_view(mlp, ("PROBS", "LABEL")),
                result_view(embed, ("OUTPUT", "NORM")),
                result_view(timed, ("OUTPUT0",)),
            ]
        finally:
            client.close()

    mlp, embed, _ = same(targets, check)
    assert mlp[0]["id"] == "contract-1"
    assert embed[2]["NORM"] == ("float32", [[5.0]])


def test_http_async_infer(targets: Targets) -> None:
    def check(endpoint: Endpoint) -> Any:
        client = endpoint.client("http", concurrency=4)
        try:
            pending = [
                client.async_infer("mlp_classifier", [tensor("http", "INPUT0", rows(2, seed))]) for seed in range(3)
            ]
            unknown = client.async_infer(UNKNOWN, [tensor("http", "INPUT0", rows(1))])
            return [outcome(result_of, r, ("PROBS", "LABEL")) for r in pending] + [outcome(unknown.get_result)]
        finally:
            client.close()

    answers = same(targets, check)
    assert [a[0] for a in answers] == ["ok", "ok", "ok", "error"]


def test_asyncio_clients(targets: Targets) -> None:
    async def both(endpoint: Endpoint) -> Any:
        seen: list[Any] = []
        http = httpclient_aio.InferenceServerClient(endpoint.http)
        grpc = grpcclient_aio.InferenceServerClient(endpoint.grpc)
        try:
            for client, module in ((http, httpclient), (grpc, grpcclient)):
                seen.append(await client.is_model_ready(UNKNOWN))
                seen.append(await client.is_model_ready("timed_batch"))
                inputs = [module.InferInput("INPUT0", [1, 4], "FP32")]
                inputs[0].set_data_from_numpy(np.full((1, 4), 2.0, np.float32))
                seen.append(result_view(await client.infer("timed_batch", inputs), ("OUTPUT0",)))
                try:
                    await client.infer(UNKNOWN, inputs)
                except InferenceServerException as exc:
                    seen.append((exc.status(), exc.message()))
        finally:
            await http.close()
            await grpc.close()
        return seen

    answers = same(targets, lambda endpoint: asyncio.run(both(endpoint)))
    assert answers[0] is False and answers[1] is True


# ----------------------------------------------------------------------------------- streams and sequences


def stream(endpoint: Endpoint, requests: list[dict[str, Any]], names: tuple[str, ...]) -> list[tuple[Any, ...]]:
    """Send ``requests`` on one gRPC stream (``async_stream_infer``'s arguments) and collect the answers (the
    outputs ``names`` of each result)."""
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = endpoint.client("grpc")
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for request in requests:
            client.async_stream_infer(**request)
        seen: list[tuple[Any, ...]] = []
        for _ in requests:
            result, error = answers.get(timeout=30)
            if error is not None:
                seen.append(("error", error.status(), error.message()))
            else:
                seen.append(("ok", result_view(result, names)))
        return seen
    finally:
        client.stop_stream()
        client.close()


def test_grpc_stream(targets: Targets) -> None:
    def ones(n: float) -> list[Any]:
        return [tensor("grpc", "INPUT0", np.full((1, 4), n, np.float32))]

    requests = [{"model_name": "timed_batch", "inputs": ones(n)} for n in range(3)]
    answers = same(targets, stream, requests, ("OUTPUT0",))
    assert [a[0] for a in answers] == ["ok"] * 3
    # A model Triton does not serve: each message is answered in the stream, which stays open.
    unknown = same(targets, stream, [{"model_name": UNKNOWN, "inputs": ones(1)}] * 2, ("OUTPUT0",))
    assert unknown == [("error", None, UNKNOWN_MODEL.format(model=UNKNOWN))] * 2


def sequence_requests(protocol: str, sequence_id: int | str, values: list[float]) -> list[dict[str, Any]]:
    return [
        {
            "model_name": "seq_accumulate",
            "inputs": [tensor(protocol, "INPUT", np.array([[v]], np.float32))],
            "sequence_id": sequence_id,
            "sequence_start": i == 0,
            "sequence_end": i == len(values) - 1,
        }
        for i, v in enumerate(values)
    ]


def test_sequence_on_a_stream(targets: Targets) -> None:
    answers = same(targets, stream, sequence_requests("grpc", 7101, [1.0, 2.0, 3.0]), ("OUTPUT",))
    assert [a[1][2]["OUTPUT"][1] for a in answers] == [[[1.0]], [[3.0]], [[6.0]]]


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("sequence_id", [7201, "contract-seq"], ids=["int", "string"])
def test_sequence_over_requests(targets: Targets, protocol: str, sequence_id: int | str) -> None:
    def check(endpoint: Endpoint) -> Any:
        client = endpoint.client(protocol)
        try:
            return [
                outcome(infer_view, client, r, ("OUTPUT",))
                for r in sequence_requests(protocol, sequence_id, [1.0, 2.0, 3.0])
            ]
        finally:
            client.close()

    answers = same(targets, check)
    if isinstance(sequence_id, int):
        assert [a[1][2]["OUTPUT"][1] for a in answers] == [[[1.0]], [[3.0]], [[6.0]]]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_sequence_without_start(targets: Targets, protocol: str) -> None:
    def check(endpoint: Endpoint) -> Any:
        client = endpoint.client(protocol)
        request = sequence_requests(protocol, 7301, [1.0, 2.0])[1]  # the second request: no start flag
        try:
            return outcome(infer_view, client, request, ("OUTPUT",))
        finally:
            client.close()

    assert same(targets, check)[0] == "error"


# ------------------------------------------------------------------------------- the intended differences


def control_calls(protocol: str) -> dict[str, Callable[[Any], Any]]:
    """The control APIs, as tritonclient calls them, by the API group the gateway names in its refusal."""
    as_json = {} if protocol == "http" else {"as_json": True}
    return {
        "model repository": lambda c: c.get_model_repository_index(**as_json),
        "model repository (load)": lambda c: c.load_model("timed_batch"),
        "model repository (unload)": lambda c: c.unload_model("timed_batch"),
        "shared-memory": lambda c: c.get_system_shared_memory_status(**as_json),
        "shared-memory (register)": lambda c: c.register_system_shared_memory("region", "/contract", 64),
        "shared-memory (CUDA)": lambda c: c.get_cuda_shared_memory_status(**as_json),
        "logging": lambda c: c.get_log_settings(**as_json),
        "trace": lambda c: c.get_trace_settings(**as_json),
    }


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_control_apis_are_refused_naming_why(targets: Targets, protocol: str) -> None:
    """DIFF_CLOSED_APIS."""
    for name, call in control_calls(protocol).items():
        direct, gateway = (outcome(call, e.client(protocol)) for e in (targets.direct, targets.gateway))
        # A host that `extproc up` started refuses a caller without the admin key, in its own words.
        assert direct[0] == "error", (name, direct)
        assert gateway[0] == "error" and gateway[1] in ("403", "StatusCode.PERMISSION_DENIED"), (name, gateway)
        api = name.split(" (")[0]
        assert gateway[2].startswith(f"the gateway does not offer Triton's {api}"), (name, gateway)
        assert ": " in gateway[2].removeprefix("the gateway does not offer"), (name, gateway)  # ...and why
    # Nothing changed on the hosts: the model the calls tried to unload is still served.
    assert outcome(targets.gateway.client(protocol).is_model_ready, "timed_batch") == ("ok", True)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_statistics_are_refused_naming_why(targets: Targets, protocol: str) -> None:
    """DIFF_STATISTICS."""
    as_json = {} if protocol == "http" else {"as_json": True}
    for model in ("", "timed_batch"):
        direct, gateway = (
            outcome(e.client(protocol).get_inference_statistics, model, **as_json)
            for e in (targets.direct, targets.gateway)
        )
        assert direct[0] == "ok" and "model_stats" in direct[1], direct
        assert gateway[0] == "error" and gateway[1] in ("403", "StatusCode.PERMISSION_DENIED"), gateway
        assert gateway[2].startswith("the gateway does not offer Triton's statistics API"), gateway
        assert "envoy.allow_statistics" in gateway[2], gateway


def test_response_headers(targets: Targets) -> None:
    """DIFF_HEADERS: the same status, content type and body; the gateway adds its own headers."""
    for path in ("/v2/models/timed_batch", f"/v2/models/{UNKNOWN}"):
        (direct_status, direct_headers, direct_body), (status, headers, body) = (
            raw(e, "GET", path) for e in (targets.direct, targets.gateway)
        )
        assert (status, headers.get("content-type"), body) == (
            direct_status,
            direct_headers.get("content-type"),
            direct_body,
        )
        assert UPSTREAM_HOST_HEADER not in direct_headers
    assert UPSTREAM_HOST_HEADER in raw(targets.gateway, "GET", "/v2/models/timed_batch")[1]
