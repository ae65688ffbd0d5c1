"""Checking REST inference requests' tensor headers before Triton reads them, including hostile bodies."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import tritonclient.http as httpclient
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.datapath.protocol.parse import MalformedRequest
from extproc.datapath.protocol.tensors import InputSpec, ModelInputs, TensorHead, TensorHeadReader

MAX_ELEMENTS = 1 << 20
SIZES = {
    "BOOL": 1,
    "UINT8": 1,
    "UINT16": 2,
    "UINT32": 4,
    "UINT64": 8,
    "INT8": 1,
    "INT16": 2,
    "INT32": 4,
    "INT64": 8,
    "FP16": 2,
    "BF16": 2,
    "FP32": 4,
    "FP64": 8,
    "BYTES": 0,
}
# Over 64 brackets: a JSON text short enough for one json.loads goes to the reader's scanner instead, in one
# piece (json.loads would recurse on deep nesting).
SCAN_PREFIX = b'{"pad":[' + b"[]," * 64 + b"[]],"


def read(
    body: bytes,
    json_length: int | None = None,
    *,
    cuts: Iterable[int] = (),
    known_length: bool = True,
    max_elements: int = MAX_ELEMENTS,
    max_head_bytes: int = 64 * 1024,
    spec: ModelInputs | None = None,
) -> TensorHeadReader:
    """Feed ``body`` cut at ``cuts`` until the reader has its verdict, then end the body if it wants more."""
    reader = TensorHeadReader(
        body_length=len(body) if known_length else None,
        json_length=json_length,
        max_elements=max_elements,
        max_head_bytes=max_head_bytes,
        spec=spec,
    )
    bounds = sorted({0, len(body), *cuts})
    for start, stop in itertools.pairwise(bounds):
        if reader.feed(body[start:stop]):
            return reader
    reader.finish()
    return reader


def ways(
    body: bytes, json_length: int | None = None, *, max_head_bytes: int = 64 * 1024
) -> list[tuple[bytes, int | None]]:
    """The body (and its json_length) as it is; with SCAN_PREFIX for its opening brace; and with whitespace after
    its JSON that makes the JSON longer than ``max_head_bytes``, so that the scanner reads it chunk by chunk."""
    prefixed = SCAN_PREFIX + body[1:]
    end = len(body) if json_length is None else json_length
    padding = max_head_bytes + 1
    padded = body[:end] + b" " * padding + body[end:]
    if json_length is None:
        return [(body, None), (prefixed, None), (padded, None)]
    return [(body, json_length), (prefixed, json_length + len(SCAN_PREFIX) - 1), (padded, json_length + padding)]


def heads(reader: TensorHeadReader) -> list[tuple[str, str, tuple[int, ...], int]]:
    return [(t.name, t.datatype, t.shape, t.elements) for t in reader.tensors]


def request(inputs: list[dict[str, object]], **top: object) -> bytes:
    return json.dumps({"inputs": inputs, **top}).encode()


def fp32(name: str = "X", shape: list[int] | None = None, data: object = None) -> dict[str, object]:
    shape = [2, 2] if shape is None else shape
    return {
        "name": name,
        "shape": shape,
        "datatype": "FP32",
        "data": [1.0] * math.prod(shape) if data is None else data,
    }


def tritonclient_body(*inputs: httpclient.InferInput, **kwargs: object) -> tuple[bytes, int | None]:
    body, json_length = httpclient.InferenceServerClient.generate_request_body(list(inputs), **kwargs)
    assert isinstance(body, bytes)
    return body, json_length


ARRAYS: dict[str, npt.NDArray[Any]] = {
    "FP32": np.arange(16, dtype=np.float32).reshape(1, 16),
    "FP16": np.ones((2, 3), dtype=np.float16),
    "FP64": np.zeros((3,), dtype=np.float64),
    "INT64": np.arange(6, dtype=np.int64).reshape(1, 2, 3),
    "UINT8": np.arange(4, dtype=np.uint8),
    "BOOL": np.array([[True, False]]),
    "BYTES": np.array([[b"a", "é".encode(), b'q"u\\o[t]e{', b""]], dtype=np.object_),
    "INT8": np.zeros((0, 4), dtype=np.int8),
}


@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("step", [0, 1, 13])
def test_tritonclient_bodies(binary: bool, step: int) -> None:
    inputs = []
    for datatype, array in ARRAYS.items():
        tensor = httpclient.InferInput(f"IN_{datatype}", list(array.shape), datatype)
        inputs.append(tensor.set_data_from_numpy(array, binary_data=binary))
    body, json_length = tritonclient_body(
        *inputs, outputs=[httpclient.InferRequestedOutput("OUT")], sequence_id=42, request_id="r1"
    )
    assert (json_length is not None) == binary
    for text, length in ways(body, json_length):
        reader = read(text, length, cuts=range(0, len(body), step) if step else ())
        assert reader.done
        assert heads(reader) == [
            (f"IN_{datatype}", datatype, array.shape, array.size) for datatype, array in ARRAYS.items()
        ]
        assert reader.elements == sum(array.size for array in ARRAYS.values())
        assert reader.sequence_id == "42"


def test_binary_request_needs_only_its_json_part() -> None:
    tensor = httpclient.InferInput("X", [1, 1000], "FP32").set_data_from_numpy(np.ones((1, 1000), np.float32))
    body, json_length = tritonclient_body(tensor, sequence_id="s-1")
    assert json_length is not None
    reader = TensorHeadReader(body_length=len(body), json_length=json_length, max_elements=MAX_ELEMENTS)
    assert not reader.feed(body[: json_length - 1])
    assert reader.feed(body[json_length - 1 : json_length + 1])
    assert reader.sequence_id == "s-1"
    assert heads(reader) == [("X", "FP32", (1, 1000), 1000)]


def test_sequence_flags_are_read_with_the_id() -> None:
    for flags, expected in (
        ({"sequence_start": True}, (True, False)),
        ({"sequence_start": True, "sequence_end": True}, (True, True)),
        ({"sequence_start": False}, (False, False)),
        ({}, (False, False)),
    ):
        body = request([fp32()], parameters={"sequence_id": 5, **flags})
        for text, _ in ways(body):
            reader = read(text)
            assert reader.parameters_read and reader.sequence_id == "5"
            assert (reader.sequence_start, reader.sequence_end) == expected
    # Triton takes JSON booleans only, and answers anything else with a 500.
    for text, _ in ways(request([fp32()], parameters={"sequence_id": 5, "sequence_end": 1})):
        with pytest.raises(MalformedRequest, match=r"the request's parameters: sequence_end 1 is not true or false"):
            read(text)


def test_the_body_that_kills_triton_is_refused() -> None:
    body = b'{"inputs":[{"name":"INPUT","shape":[1,1000000000000],"datatype":"FP32","data":[1,2,3,4]}]}'
    for text, _ in ways(body):
        with pytest.raises(MalformedRequest, match=r"'INPUT'.*over its limit of 1048576 elements"):
            read(text)
        # Under any element cap, four numbers cannot fill the shape.
        with pytest.raises(MalformedRequest, match=r"'INPUT'.*more elements than the request's \d+ bytes of JSON"):
            read(text, max_elements=10**15)


def test_scanner_refuses_a_shape_before_reading_the_data() -> None:
    data = b",".join([b"1.25"] * 250_000)
    body = b'{"inputs":[{"name":"X","shape":[1,1000000000000],"datatype":"FP32","data":[' + data + b"]}]}"
    reader = TensorHeadReader(body_length=len(body), json_length=None, max_elements=MAX_ELEMENTS)
    with pytest.raises(MalformedRequest, match="over its limit"):
        reader.feed(body[:4096])


def test_large_json_data_in_small_chunks_keeps_no_body() -> None:
    values = [i / 7 for i in range(12_000)]
    body = request([fp32("X", [12_000], values)], parameters={"sequence_id": 9})
    assert len(body) > 64 * 1024
    for step in (1, 7, 4096):
        reader = TensorHeadReader(body_length=len(body), json_length=None, max_elements=MAX_ELEMENTS)
        for start in range(0, len(body), step):
            done = reader.feed(body[start : start + step])
            # Only the values the reader needs are kept, never the data.
            assert len(reader._buffer) == 0 and len(reader._kept) < 64
            if done:
                break
        assert reader.done and heads(reader) == [("X", "FP32", (12_000,), 12_000)]
        assert reader.sequence_id == "9"


def test_chunked_body_without_a_length() -> None:
    small = request([fp32()], parameters={"sequence_id": 3})
    large = request([fp32("X", [20_000])], parameters={"sequence_id": 3})
    for body in (small, large):
        reader = read(body, cuts=range(0, len(body), 1000), known_length=False)
        assert reader.sequence_id == "3" and reader.tensors[0].elements in (4, 20_000)
    for body in (large, SCAN_PREFIX + small[1:]):
        with pytest.raises(MalformedRequest, match="ended before its JSON"):
            read(body[:-1], known_length=False)


def test_data_before_shape_and_any_key_order() -> None:
    body = b'{"parameters":{"sequence_id":"s"},"id":"x","inputs":[{"data":[[1,2,3],[4,5,6]],"datatype":"INT32",'
    body += b'"parameters":{},"shape":[2,3],"name":"A"},{"name":"B","data":[true],"shape":[1],"datatype":"BOOL"}]}'
    for text, _ in ways(body):
        reader = read(text, cuts=range(0, len(text), 3))
        assert heads(reader) == [("A", "INT32", (2, 3), 6), ("B", "BOOL", (1,), 1)]
        assert reader.sequence_id == "s"


def test_bytes_tensors_in_json() -> None:
    strings = ['q"uote', "back\\slash", "[not] {structure}", "é", "\u20ac\U0001f600", "", "\n\t"]
    for ensure_ascii in (True, False):
        body = json.dumps(
            {"inputs": [{"name": "S", "shape": [len(strings)], "datatype": "BYTES", "data": strings}]},
            ensure_ascii=ensure_ascii,
        ).encode()
        for text, _ in ways(body):
            for step in (0, 1, 5):
                reader = read(text, cuts=range(0, len(text), step) if step else ())
                assert heads(reader) == [("S", "BYTES", (len(strings),), len(strings))]


@pytest.mark.parametrize(
    ("parameters", "expected"),
    [
        ({"sequence_id": 7}, "7"),
        ({"sequence_id": 2**64 - 1}, str(2**64 - 1)),
        ({"sequence_id": "abc"}, "abc"),
        ({"sequence_id": 0}, None),
        ({"sequence_id": ""}, None),
        ({"priority": 1}, None),
        (None, None),
    ],
)
def test_sequence_id(parameters: dict[str, object] | None, expected: str | None) -> None:
    top = {} if parameters is None else {"parameters": parameters}
    for body in (request([fp32()], **top), json.dumps({**top, "inputs": [fp32()]}).encode()):
        for text, _ in ways(body):
            assert read(text).sequence_id == expected


def test_sequence_id_after_large_data() -> None:
    body = request([fp32("X", [30_000])], outputs=[{"name": "Y"}], parameters={"sequence_id": 11})
    assert len(body) > 64 * 1024
    assert read(body, cuts=range(0, len(body), 5000)).sequence_id == "11"


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ([{**fp32(), "datatype": "FP8"}], r"input 'X' has an unknown datatype 'FP8'"),
        ([{**fp32(), "datatype": 4}], r"unknown datatype 4"),
        ([fp32(shape=[2, -2])], r"input 'X': the shape has the dimension -2"),
        ([fp32() | {"shape": [True, 4]}], r"the dimension True"),
        ([fp32() | {"shape": [2.0, 2]}], r"the dimension 2\.0"),
        ([fp32() | {"shape": [2**63, 0]}], r"the dimension 9223372036854775808"),
        ([fp32() | {"shape": [1] * 33}], r"the shape has 33 dimensions"),
        ([fp32() | {"shape": "2,2"}], r"the shape is not a list"),
        ([fp32() | {"shape": {"0": 2}}], r"the shape is not a list"),
        ([fp32() | {"name": 5}], r"input #0: the name is not a string"),
        ([{"name": "X", "shape": [1], "data": [1]}], r"input 'X' has no datatype"),
        ([{"shape": [1], "datatype": "FP32", "data": [1]}], r"input #0 has no name"),
        ([{"name": "X", "datatype": "FP32", "data": [1]}], r"input 'X' has no shape"),
        ([{"name": "X", "shape": [1], "datatype": "FP32"}], r"exactly one of data"),
        ([{}], r"input #0 has no name"),
        (
            [fp32() | {"parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 16}}],
            r"exactly one of data",
        ),
        ([fp32() | {"parameters": []}], r"input 'X': the parameters are not an object"),
        ([fp32(), fp32()], r"the request has input 'X' twice"),
        ([fp32(), 3], r"input #1 is not an object"),
        ([], r"the request has no inputs"),
        ([fp32("N" * 200) | {"datatype": "X"}], r"input 'N{64}\.\.\.' has an unknown datatype"),
    ],
)
def test_malformed_inputs(inputs: list[object], message: str) -> None:
    for text, _ in ways(json.dumps({"inputs": inputs}).encode()):
        with pytest.raises(MalformedRequest, match=message):
            read(text)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"id":"x"}', "no inputs"),
        (b"{}", "no inputs|not valid JSON"),
        (b'{"inputs":[{"name":@}]}', "not valid JSON"),
        (b'{"id":}', "not valid JSON"),
        (b'{"inputs":{}}', "inputs are not a list"),
        (b'{"inputs":[{"name":"X","shape":[1],"datatype":"FP32","data":[1]}],"parameters":5}', "parameters are not"),
        (b'{"inputs":[{"name":"X","shape":[1],"datatype":"FP32","data":[NaN]}]}', "not valid JSON"),
        (b'{"inputs":[{"name":"X","shape":[1],"datatype":"FP32","data":[-Infinity]}]}', "not valid JSON"),
        (b'{"inputs":[{"name":"X","shape":[1],"datatype":"FP32","data":[1]}],}', "not valid JSON"),
        (b'{"inputs":[{"name":"X","shape":[1],"datatype":"FP32","data":[1]},]}', "not valid JSON"),
        (b'{"inputs":[{"name":"X","shape":[1],"datatype":"FP32","data":[1]}] "id":1}', "not valid JSON"),
        # Its whitespace padding (see ways) is head bytes, as JSON outside tensor data is.
        (
            b'{"inputs":[{"name":"X","shape":[1],"datatype":"FP32","data":[1]}',
            "ended before|not valid|over 65536 bytes",
        ),
        (b'{"inputs":[{"name":"X","shape":[1],"datatype":"FP32","data":[1', "ended before|not valid|over 65536 bytes"),
    ],
)
def test_malformed_json(body: bytes, message: str) -> None:
    for text, _ in ways(body):
        with pytest.raises(MalformedRequest, match=message):
            read(text, cuts=range(0, len(text), 4))


@pytest.mark.parametrize("body", [b"", b"[1]", b'"inputs"', b"nul", b"\xef\xbb\xbf{}", b" ", "{}".encode("utf-16")])
def test_not_a_json_object(body: bytes) -> None:
    if not body:
        assert read(body).done and not read(body, known_length=False).tensors  # an empty body is a raw tensor
        return
    with pytest.raises(MalformedRequest):
        read(body)


def test_repeated_keys_are_refused() -> None:
    # Triton's parser takes a repeated key's first value, Python's its last: neither may decide alone.
    inputs = b'{"name":"X","shape":[1],"shape":[1000000000],"datatype":"FP32","data":[1]}'
    cases = [
        (b'{"inputs":[' + inputs + b"]}", r"the key 'shape' comes twice in input ('X'|#0)"),
        (b'{"inputs":[],"inputs":[{"name":"X","shape":[1],"datatype":"FP32","data":[1]}]}', r"'inputs'|no inputs"),
        (
            b'{"inputs":[{"name":"X","shape":[1],"datatype":"FP32","parameters":{"binary_data_size":4,'
            b'"binary_data_size":0}}]}',
            r"the key 'binary_data_size' comes twice in the parameters of input 'X'",
        ),
        (
            b'{"parameters":{"sequence_id":1,"sequence_id":2},"inputs":[{"name":"X","shape":[1],"datatype":"FP32",'
            b'"data":[1]}]}',
            r"the key 'sequence_id' comes twice in the request's parameters",
        ),
        (b'{"id":"a","inputs":[{"name":"X","shape":[1],"datatype":"FP32","data":[1]}],"id":"b"}', r"'id' comes twice"),
    ]
    for body, message in cases:
        for text, _ in ways(body):
            with pytest.raises(MalformedRequest, match=message):
                read(text)
    # Outputs are read too (their names and parameters' types), and data holds no object.
    for body, message in (
        (
            b'{"inputs":[{"name":"X","shape":[1],"datatype":"FP32","data":[1]}],"outputs":[{"name":"Y","name":"Z"}]}',
            r"the key 'name' comes twice in output #0",
        ),
        (
            b'{"inputs":[{"name":"X","shape":[1],"datatype":"FP32","data":[1]}],"outputs":[{"name":"Y",'
            b'"parameters":{"binary_data":true,"binary_data":false}}]}',
            r"the key 'binary_data' comes twice in the parameters of output 'Y'",
        ),
        (b'{"inputs":[{"name":"X","shape":[1],"datatype":"FP32","data":[{"a":1,"a":2}]}]}', r"data holds an object"),
    ):
        for text, _ in ways(body):
            with pytest.raises(MalformedRequest, match=message):
                read(text)
    # Inside a custom parameter the reader does not look for keys, and Triton decides.
    body = b'{"inputs":[{"name":"X","shape":[1],"datatype":"FP32","data":[1]}],"parameters":{"c":{"a":1,"a":2}}}'
    for text, _ in ways(body):
        assert read(text).done


def binary_body(*inputs: tuple[str, str, list[int], int], body_extra: int = 0) -> tuple[bytes, int]:
    header = request(
        [
            {"name": name, "shape": shape, "datatype": datatype, "parameters": {"binary_data_size": size}}
            for name, datatype, shape, size in inputs
        ]
    )
    return header + b"\0" * (sum(size for *_, size in inputs) + body_extra), len(header)


def test_binary_sizes() -> None:
    body, json_length = binary_body(("A", "FP32", [2, 3], 24), ("B", "BYTES", [2], 11), ("C", "BF16", [0, 5], 0))
    for text, length in ways(body, json_length):
        assert heads(read(text, length)) == [
            ("A", "FP32", (2, 3), 6),
            ("B", "BYTES", (2,), 2),
            ("C", "BF16", (0, 5), 0),
        ]
        # Without content-length the body's total cannot be checked, each input's size still is.
        assert read(text, length, known_length=False).done

    refused = [
        (
            binary_body(("A", "FP32", [2, 3], 23)),
            r"input 'A' has 23 bytes of binary data; shape \[2, 3\] of FP32 takes 24",
        ),
        (binary_body(("A", "UINT64", [1], 4)), r"takes 8"),
        (binary_body(("B", "BYTES", [3], 11)), r"too few for 3 BYTES elements"),
        (binary_body(("A", "FP32", [1], 4), body_extra=1), r"5 bytes after its JSON part .* add up to 4"),
        (binary_body(("A", "FP32", [1], 4), body_extra=-1), r"3 bytes after its JSON part .* add up to 4"),
    ]
    for (text, length), message in refused:
        with pytest.raises(MalformedRequest, match=message):
            read(text, length)

    header = request([{"name": "A", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}])
    with pytest.raises(MalformedRequest, match="no Inference-Header-Content-Length"):
        read(header)
    for size in (-1, True, 4.0, "4", 2**64):
        header = request([{"name": "A", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": size}}])
        with pytest.raises(MalformedRequest, match=r"binary_data_size .* is not an integer from 0 to 2\^64-1"):
            read(header + b"\0" * 4, len(header))


def test_header_lengths() -> None:
    body, json_length = binary_body(("A", "FP32", [1], 4))
    with pytest.raises(MalformedRequest, match="not within the body's"):
        TensorHeadReader(body_length=10, json_length=11, max_elements=MAX_ELEMENTS)
    # A JSON part that does not end where the header says.
    with pytest.raises(MalformedRequest, match="longer than its Inference-Header-Content-Length"):
        read(*ways(body, json_length - 3)[2])
    with pytest.raises(MalformedRequest):
        read(body, json_length - 1)
    # Inference-Header-Content-Length: 0 makes the body one raw tensor: nothing to read.
    reader = TensorHeadReader(body_length=100, json_length=0, max_elements=MAX_ELEMENTS)
    assert reader.done and reader.feed(b"\0" * 100) and not reader.tensors


def test_shared_memory_inputs_are_counted() -> None:
    shm = {"shared_memory_region": "r", "shared_memory_byte_size": 4 * 10**6}
    body = request([{"name": "X", "shape": [1000, 1000], "datatype": "FP32", "parameters": shm}])
    for text, _ in ways(body):
        assert heads(read(text)) == [("X", "FP32", (1000, 1000), 10**6)]
        with pytest.raises(MalformedRequest, match="over its limit"):
            read(text, max_elements=10**6 - 1)


def test_element_cap_counts_all_inputs() -> None:
    body = request([fp32("A", [2, 2]), fp32("B", [3, 2]), fp32("C", [0, 10**12])])
    for text, _ in ways(body):
        assert read(text, max_elements=10).elements == 10
        with pytest.raises(MalformedRequest, match=r"input 'B': shape \[3, 2\] takes the request over its limit of 9"):
            read(text, max_elements=9)


SPEC = ModelInputs(max_batch_size=8, inputs={"X": InputSpec((-1, 4), "FP32"), "Y": InputSpec((), "INT64")})


def y(shape: list[int]) -> dict[str, object]:
    return {"name": "Y", "shape": shape, "datatype": "INT64", "data": [0] * math.prod(shape)}


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ([fp32("X", [2, 3, 4]), y([2])], None),
        ([fp32("X", [8, 1, 4])], None),
        (
            [fp32("X", [9, 1, 4])],
            r"input 'X' has shape \[9, 1, 4\]; the model takes \[batch\] \+ \[-1, 4\] with a batch",
        ),
        ([fp32("X", [0, 1, 4])], r"with a batch of 1 to 8"),
        ([y([])], r"input 'Y' has shape \[\]"),
        ([fp32("X", [1, 3, 5])], r"input 'X' has shape \[1, 3, 5\]; the model takes \[batch\] \+ \[-1, 4\]$"),
        ([fp32("X", [1, 4])], r"the model takes \[batch\] \+ \[-1, 4\]$"),
        ([fp32("Z", [1, 1, 4])], r"the model has no input 'Z'"),
        ([fp32("Y", [1])], r"input 'Y' is FP32; the model takes INT64"),
    ],
)
def test_model_config(inputs: list[dict[str, object]], message: str | None) -> None:
    for text, _ in ways(request(inputs)):
        if message is None:
            assert len(read(text, spec=SPEC).tensors) == len(inputs)
        else:
            with pytest.raises(MalformedRequest, match=message):
                read(text, spec=SPEC)


def test_model_config_without_batching() -> None:
    spec = ModelInputs(max_batch_size=0, inputs={"X": InputSpec((-1, 4), "FP32")})
    assert read(request([fp32("X", [3, 4])]), spec=spec).elements == 12
    with pytest.raises(MalformedRequest, match=r"the model takes \[-1, 4\]$"):
        read(request([fp32("X", [1, 3, 4])]), spec=spec)


def nested(depth: int) -> bytes:
    return b"[" * depth + b"1" + b"]" * depth


def test_depth() -> None:
    # The top-level object, the inputs array and an input object: data nested 61 deep reaches 64 levels.
    def body(data: bytes) -> bytes:
        return b'{"inputs":[{"name":"X","shape":[1],"datatype":"FP32","data":' + data + b"}]}"

    assert read(body(nested(61))).elements == 1
    for data in (nested(62), nested(100_000), b"[" * 100_000, b"[{" * 50_000):
        for step in (0, 1000):
            with pytest.raises(MalformedRequest, match="nested more than 64 levels"):
                read(body(data), cuts=range(0, len(body(data)), step) if step else ())
    for top in (b'{"outputs":' + nested(64) + b"}", b'{"parameters":{"a":' + nested(63) + b"}}"):
        with pytest.raises(MalformedRequest, match="nested more than 64 levels"):
            read(top)


def test_utf8() -> None:
    good = json.dumps({"inputs": [fp32("é€😀") | {"datatype": "BYTES", "data": ["é"] * 4}]}, ensure_ascii=False)
    for text, _ in ways(good.encode()):
        # Split inside multi-byte characters too.
        assert read(text, cuts=range(len(text))).tensors[0].name == "é€😀"
    bad = [
        b'{"inputs":[{"name":"\xff","shape":[1],"datatype":"BYTES","data":["a"]}]}',
        b'{"inputs":[{"name":"X","shape":[1],"datatype":"BYTES","data":["a\xc3"]}]}',
        b'{"inputs":[{"name":"X","shape":[1],"datatype":"BYTES","data":["\xc3\\n\xa9"]}]}',
        b'{"inputs":[{"name":"X","shape":[1],"datatype":"BYTES","data":["\xed\xa0\x80"]}]}',
        b'{"inputs":[{"name":"X","shape":[1],"datatype":"FP32","data":[1\xa0]}]}',
    ]
    for body in bad:
        for text, _ in ways(body):
            for step in (0, 1, 3):
                with pytest.raises(MalformedRequest, match=r"UTF-8|not valid JSON"):
                    read(text, cuts=range(0, len(text), step) if step else ())


def test_head_budget() -> None:
    inputs = [fp32("X", [10_000])]
    # Before the inputs end, a head over max_head_bytes is refused...
    long_head = json.dumps({"id": "i" * 2000, "inputs": inputs}).encode()
    with pytest.raises(MalformedRequest, match="over 1024 bytes before its inputs end"):
        read(long_head, max_head_bytes=1024)
    # ...after them, the reader stops with the tensors checked and gives up a later sequence_id.
    body = request(inputs, outputs=[{"name": "O" * 2000}], parameters={"sequence_id": 5})
    for step in (0, 700):
        reader = read(body, max_head_bytes=1024, cuts=range(0, len(body), step) if step else ())
        assert reader.elements == 10_000 and reader.sequence_id is None
    # Tensor data does not count: a small head and 50k bytes of data read in a 1 KiB budget.
    assert read(request(inputs, parameters={"sequence_id": 5}), max_head_bytes=1024).sequence_id == "5"


# -- what Triton 2.51 reads, then answers with a 500: refused here, both ways --


def refused_everywhere(body: bytes, message: str, json_length: int | None = None) -> None:
    """``body`` is refused with ``message`` read whole, by the scanner in one piece, and by the scanner cut
    every few bytes (every byte over its first 2000)."""
    for text, length in ways(body, json_length):
        for cuts in ((), range(0, min(len(text), 2000)), range(0, len(text), 7), range(0, len(text), 4096)):
            with pytest.raises(MalformedRequest, match=message):
                read(text, length, cuts=cuts)


def read_everywhere(body: bytes, json_length: int | None = None) -> list[TensorHeadReader]:
    """The readers of ``body`` (each with its verdict in) the ways refused_everywhere reads it."""
    readers = []
    for text, length in ways(body, json_length):
        for cuts in ((), range(0, min(len(text), 2000)), range(0, len(text), 7)):
            reader = read(text, length, cuts=cuts)
            assert reader.done
            readers.append(reader)
    return readers


def tensor(datatype: str, shape: list[int], data: bytes, name: str = "X") -> bytes:
    head = json.dumps({"name": name, "shape": shape, "datatype": datatype}).encode()
    return b'{"inputs":[' + head[:-1] + b',"data":' + data + b"}]}"


@pytest.mark.parametrize(
    ("shape", "data"),
    [
        ([1, 4], b"[1,2,3,4]"),
        ([1, 4], b"[[1,2,3,4]]"),
        ([4], b"[[1,2],[3,4]]"),  # Triton counts the elements, whatever the nesting
        ([2, 2], b"[1,[2,[3]],4]"),
        ([1, 4], b"[[],[1,2,3,4],[[]]]"),
        ([1, 4], b"[ [ 1 , 2 ] , [ ] , [\n\t3 ,4 ] ,[ \r\n ] ]"),
        ([2, 0], b"[[],[]]"),
        ([0], b"[]"),
        ([0], b"[ ]"),
        ([3], b"[" * 40 + b"1,[],2,[ ],3" + b"]" * 40),  # deeper than the scanner's one-run nesting
    ],
)
def test_data_that_fills_its_shape(shape: list[int], data: bytes) -> None:
    assert all(
        heads(r) == [("X", "FP32", tuple(shape), math.prod(shape))]
        for r in read_everywhere(tensor("FP32", shape, data))
    )


@pytest.mark.parametrize(
    ("shape", "data", "count"),
    [
        ([1, 4], b"[1,2,3]", 3),
        ([1, 4], b"[1,2,3,4,5]", 5),
        ([1, 4], b"[[1,2],[3]]", 3),
        ([1, 4], b"[[1,2],[],[3]]", 3),
        ([1, 4], b"[[1,2],[ ],[3 ],[\n]]", 3),
        ([0], b"[1]", 1),  # Triton would not read it; the reader does not guess
        ([2], b"[[],[]]", 0),
        ([1], b"[[[]]]", 0),
        ([3], b"[" * 40 + b"1,[],2" + b"]" * 40, 2),
    ],
)
def test_data_that_does_not_fill_its_shape(shape: list[int], data: bytes, count: int) -> None:
    takes = math.prod(shape)
    refused_everywhere(
        tensor("FP32", shape, data), rf"input 'X': the data holds {count} elements; shape .* takes {takes}$"
    )


@pytest.mark.parametrize("data", [b"{}", b'{"a":[1]}', b"5", b'"1,2,3,4"', b"null", b"true"])
def test_data_that_is_not_a_list(data: bytes) -> None:
    refused_everywhere(tensor("FP32", [1, 4], data), r"input ('X'|#0): the data is not a list")


# Each datatype's elements: what it takes, then what it does not and why.
ELEMENTS: list[tuple[str, bytes, str | None]] = [
    ("FP32", b"1", None),
    ("FP32", b"-2.5e-3", None),
    ("FP32", b"18446744073709551616", None),
    ("FP64", b"1e300", None),
    ("FP16", b"0.5", None),
    ("BF16", b"-1", None),
    ("FP32", b'"1"', r"a string; FP32 takes numbers"),
    ("FP32", b"true", r"true or false; FP32 takes numbers"),
    ("FP64", b"null", r"the data holds null"),
    ("FP16", b'{"a":1}', r"the data holds an object"),
    ("INT32", b"-7", None),
    ("INT64", b"9223372036854775807", None),
    ("INT64", b"-9223372036854775808", None),
    ("INT8", b"1000", None),  # Triton takes any int64 and narrows it
    ("INT32", b"1.5", r"a number with a fraction or an exponent; INT32 takes integers"),
    ("INT32", b"1.0", r"a fraction or an exponent"),
    ("INT16", b"1e2", r"a fraction or an exponent"),
    ("INT64", b"9223372036854775808", r"an integer outside int64; INT64 takes integers from -2\^63 to 2\^63-1"),
    ("INT64", b"-9223372036854775809", r"an integer outside int64"),
    ("INT8", b"18446744073709551616", r"an integer outside int64"),
    ("INT32", b'"5"', r"a string; INT32 takes"),
    ("UINT8", b"0", None),
    ("UINT8", b"-0", None),  # RapidJSON reads it as the unsigned 0
    ("UINT64", b"18446744073709551615", None),
    ("UINT8", b"-1", r"a negative number; UINT8 takes integers from 0 to 2\^64-1"),
    ("UINT32", b"-9223372036854775809", r"a negative number"),
    ("UINT64", b"18446744073709551616", r"an integer over 2\^64-1"),
    ("UINT16", b"2.5", r"a fraction or an exponent"),
    ("UINT16", b"false", r"true or false; UINT16 takes"),
    ("BOOL", b"true", None),
    ("BOOL", b"false", None),
    ("BOOL", b"1", r"a number; BOOL takes true and false"),
    ("BOOL", b"0.0", r"a number; BOOL takes true and false"),
    ("BOOL", b'"true"', r"a string; BOOL takes true and false"),
    ("BOOL", b"null", r"the data holds null"),
    ("BYTES", b'"abc"', None),
    ("BYTES", b'"1, 2], [\\"tf{n}:"', None),
    ("BYTES", b'""', None),
    ("BYTES", b"1", r"a number; BYTES takes strings"),
    ("BYTES", b"true", r"true or false; BYTES takes strings"),
    ("BYTES", b"[]", r"the data holds 2 elements; shape \[3\] takes 3"),
]


@pytest.mark.parametrize(("datatype", "element", "message"), ELEMENTS)
def test_data_elements_of_the_datatype(datatype: str, element: bytes, message: str | None) -> None:
    good = b'"s"' if datatype == "BYTES" else b"true" if datatype == "BOOL" else b"1"
    for data in (
        b"[" + element + b"," + good + b"," + good + b"]",
        b"[[" + good + b"],[" + good + b"," + element + b"]]",
    ):
        body = tensor(datatype, [3], data)
        if message is None:
            read_everywhere(body)
        else:
            refused_everywhere(body, rf"input 'X': .*{message}")


@pytest.mark.parametrize(
    ("datatype", "element", "message"), [e for e in ELEMENTS if e[2] is not None and "elements" not in e[2]]
)
def test_large_data_elements_of_the_datatype(datatype: str, element: bytes, message: str) -> None:
    """Far into data the scanner reads in chunks, wherever the chunks cut the element, and whichever comes
    first in the input: its datatype or its data."""
    good = b'"s"' if datatype == "BYTES" else b"true" if datatype == "BOOL" else b"1"
    count = 5000
    data = b"[" + b",".join([good] * 3000 + [element] + [good] * (count - 3001)) + b"]"
    at = data.index(element)
    head = json.dumps({"name": "X", "shape": [count], "datatype": datatype}).encode()
    expected = rf"input 'X': .*{message}"
    for body in (tensor(datatype, [count], data), b'{"inputs":[{"data":' + data + b"," + head[1:] + b"]}"):
        for offset in range(-2, len(element) + 2):
            with pytest.raises(MalformedRequest, match=expected.replace("'X'", "('X'|#0)")):
                read(body, cuts=(body.index(data) + at + offset,))
        with pytest.raises(MalformedRequest, match=expected.replace("'X'", "('X'|#0)")):
            read(body, cuts=range(0, len(body), 1000))


# RapidJSON 1.1 (Triton 2.51's, with its default precision) on these numbers, as it said itself: refused as too
# big, or taken as infinity (which a newer RapidJSON refuses: so does the reader); then taken.
BEYOND_A_DOUBLE = [
    b"1e400",
    b"-1e400",
    b"1E400",
    b"1e+400",
    b"0e400",  # its exponent, over 308 plus its digits after the point
    b"1.8e308",  # infinity
    b"-2e308",
    b"1.7976931348623159e308",
    b"2" + b"0" * 308,  # its integer part, past 1.8e307 before its last digit
    b"1" + b"0" * 400,
    b"1" + b"0" * 310 + b"e-400",
]
WITHIN_A_DOUBLE = [
    b"1e308",
    b"-1e308",
    b"1.5e308",
    b"1.7976931348623157e308",
    b"0.0001e310",
    b"1" + b"0" * 308,
    b"1" + b"0" * 300 + b"e8",
    b"0." + b"0" * 400 + b"1e400",
    b"1e-400",
    b"1e-99999",
    b"5e-324",
    b"123e300",
    b"1e290",
]


@pytest.mark.parametrize("number", BEYOND_A_DOUBLE)
def test_numbers_beyond_a_double(number: bytes) -> None:
    # json.loads makes inf of 1e400 and a Python int of 2 * 10**308: the reader says what RapidJSON does.
    message = r"holds the number .*, too big for a double"
    refused_everywhere(tensor("FP64", [2], b"[1," + number + b"]"), message)
    for where in (b'"parameters":{"x":%s}', b'"outputs":[{"name":"Y","parameters":{"x":[%s]}}]', b'"other":%s'):
        body = b'{"inputs":[{"name":"X","shape":[1],"datatype":"FP32","data":[1]}],' + where % number + b"}"
        refused_everywhere(body, message)
    data = b"[" + b",".join([b"1.5"] * 3000 + [number]) + b"]"
    body = tensor("FP64", [3001], data)
    for cut in range(len(number) + 2):
        with pytest.raises(MalformedRequest, match=message):
            read(body, cuts=(body.index(number) + cut,))


@pytest.mark.parametrize("number", WITHIN_A_DOUBLE)
def test_numbers_within_a_double(number: bytes) -> None:
    read_everywhere(tensor("FP64", [2], b"[1," + number + b"]"))
    data = b"[" + b",".join([b"1.5"] * 3000 + [number]) + b"]"
    body = tensor("FP64", [3001], data)
    for cut in range(len(number) + 2):
        assert read(body, cuts=(body.index(number) + cut,)).elements == 3001


@pytest.mark.parametrize("tail", [b"x", b"{}", b"]", b"}", b" \n x", b",", b"\x00"])
def test_bytes_after_the_json(tail: bytes) -> None:
    body = request([fp32()]) + tail
    message = r"goes on after its top-level object|not valid JSON"
    refused_everywhere(body, message)
    for text, _ in ways(body):
        with pytest.raises(MalformedRequest, match=message):
            read(text, known_length=False)
    # The JSON part of a binary request, which Triton parses alone.
    header = request([{"name": "A", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]) + tail
    refused_everywhere(header + b"\0" * 4, message, len(header))
    large = request([fp32("X", [3000])]) + tail
    with pytest.raises(MalformedRequest, match=message):
        read(large, cuts=range(0, len(large), 1000))


def test_whitespace_after_the_json() -> None:
    for body in (request([fp32()]) + b" \n\t\r ", request([fp32("X", [3000])]) + b"\n"):
        read_everywhere(body)
        for text, _ in ways(body):
            assert read(text, known_length=False).done
    # Whatever comes after the JSON part of a binary request is tensor bytes.
    header = request([{"name": "A", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}])
    read_everywhere(header + b" \n" + b"}x]{", len(header) + 2)


@pytest.mark.parametrize("value", [5, None, [], {}, True, 1.5])
def test_id_that_is_not_a_string(value: object) -> None:
    refused_everywhere(request([fp32()], id=value), r"the request's id .* is not a string")


def test_id() -> None:
    for value in ("abc", "", "é" * 100):
        read_everywhere(request([fp32()], id=value))


@pytest.mark.parametrize(
    ("outputs", "message"),
    [
        ({}, r"the request's outputs are not a list"),
        ("Y", r"the request's outputs are not a list"),
        (None, r"the request's outputs are not a list"),
        ([5], r"output #0 is not an object"),
        ([{"name": "Y"}, []], r"output #1 is not an object"),
        ([{}], r"output #0 has no name"),
        ([{"parameters": {}}], r"output #0 has no name"),
        ([{"name": 5}], r"output #0: the name is not a string"),
        ([{"name": None}], r"output #0 has no name"),
        ([{"name": "Y", "parameters": 5}], r"output 'Y': the parameters are not an object"),
        ([{"name": "Y", "parameters": {"binary_data": 1}}], r"output 'Y': binary_data 1 is not true or false"),
        ([{"name": "Y", "parameters": {"binary_data": "true"}}], r"binary_data 'true' is not true or false"),
        ([{"name": "Y", "parameters": {"classification": -1}}], r"classification -1 is not an integer from 0"),
        ([{"name": "Y", "parameters": {"classification": 1.5}}], r"classification 1.5 is not an integer"),
        ([{"name": "Y", "parameters": {"classification": True}}], r"classification True is not an integer"),
        ([{"name": "Y", "parameters": {"shared_memory_region": 5}}], r"shared_memory_region 5 is not a string"),
        ([{"name": "Y", "parameters": {"shared_memory_offset": "0"}}], r"shared_memory_offset '0' is not an"),
        ([{"name": "Y", "parameters": {"shared_memory_byte_size": -4}}], r"shared_memory_byte_size -4 is not an"),
    ],
)
def test_outputs_triton_cannot_read(outputs: object, message: str) -> None:
    refused_everywhere(request([fp32()], outputs=outputs), message)


def test_outputs() -> None:
    for outputs in (
        [],
        [{"name": "Y"}, {"name": "Z", "parameters": {"binary_data": True, "classification": 3, "custom": [None]}}],
        [{"name": "Y", "parameters": {"shared_memory_region": "r", "shared_memory_offset": 0}}],
    ):
        read_everywhere(request([fp32()], outputs=outputs))


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"priority": -1}, r"priority -1 is not an integer from 0 to 2\^64-1"),
        ({"priority": 1.5}, r"priority 1.5 is not an integer"),
        ({"priority": "1"}, r"priority '1' is not an integer"),
        ({"priority": True}, r"priority True is not an integer"),
        ({"timeout": 2**64}, r"timeout 18446744073709551616 is not an integer"),
        ({"timeout": None}, r"timeout None is not an integer"),
        ({"binary_data_output": 1}, r"binary_data_output 1 is not true or false"),
        ({"sequence_start": "true"}, r"sequence_start 'true' is not true or false"),
        ({"sequence_end": None}, r"sequence_end None is not true or false"),
        ({"sequence_id": -5}, r"sequence_id -5 is not an integer from 0 to 2\^64-1 or a string"),
        ({"sequence_id": 1.5}, r"sequence_id 1.5 is not an integer"),
        ({"sequence_id": True}, r"sequence_id True is not an integer"),
        ({"sequence_id": 2**64}, r"sequence_id 18446744073709551616 is not"),
        ({"sequence_id": [1]}, r"sequence_id \[1\] is not"),
        ({"sequence_id": None}, r"sequence_id None is not"),
    ],
)
def test_request_parameters_triton_cannot_read(parameters: dict[str, object], message: str) -> None:
    refused_everywhere(request([fp32()], parameters=parameters), rf"the request's parameters: {message}")
    # After large data, as tritonclient writes them.
    body = request([fp32("X", [3000])], parameters=parameters)
    with pytest.raises(MalformedRequest, match=message):
        read(body, cuts=range(0, len(body), 1000))


def test_request_parameters() -> None:
    parameters = {
        "priority": 0,
        "timeout": 10**6,
        "binary_data_output": False,
        "sequence_id": 2**64 - 1,
        "sequence_start": True,
        "custom": [None, {"a": 1.5}],  # Triton refuses what it cannot take here (400), not the reader
    }
    for reader in read_everywhere(request([fp32()], parameters=parameters)):
        assert reader.sequence_id == str(2**64 - 1) and reader.sequence_start


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"shared_memory_region": 5}, r"shared_memory_region 5 is not a string"),
        ({"shared_memory_region": None}, r"shared_memory_region None is not a string"),
        ({"shared_memory_region": "r", "shared_memory_byte_size": -1}, r"shared_memory_byte_size -1 is not an"),
        ({"shared_memory_region": "r", "shared_memory_byte_size": "16"}, r"shared_memory_byte_size '16' is not"),
        ({"shared_memory_region": "r", "shared_memory_offset": 1.5}, r"shared_memory_offset 1.5 is not an"),
        ({"binary_data_size": 2**64}, r"binary_data_size 18446744073709551616 is not an integer"),
    ],
)
def test_input_parameters_triton_cannot_read(parameters: dict[str, object], message: str) -> None:
    body = request([{"name": "X", "shape": [4], "datatype": "FP32", "parameters": parameters}])
    refused_everywhere(body, rf"input 'X': {message}")
    # Triton reads shared_memory_offset and shared_memory_byte_size of a JSON input too.
    if "shared_memory_region" in parameters and len(parameters) > 1:
        del parameters["shared_memory_region"]
        refused_everywhere(request([fp32() | {"parameters": parameters}]), rf"input 'X': {message}")


def test_input_parameters() -> None:
    shm = {"shared_memory_region": "r", "shared_memory_byte_size": 16, "shared_memory_offset": 0, "custom": "c"}
    read_everywhere(request([{"name": "X", "shape": [4], "datatype": "FP32", "parameters": shm}]))


def test_large_nested_data_is_counted() -> None:
    """Many rows a run of the scanner holds (past _FEW_OPENS), empty ones, spaced or not, and runs the chunks
    cut between a '[' and its ']'."""
    rows = [b"[1]", b"[ 2 ]", b"[]", b"[ ]", b"[\n]", b"[[],[3]]"] * 2000
    data = b"[" + b",".join(rows) + b"]"
    count = 3 * 2000
    body = tensor("FP32", [count], data)
    for step in (1000, 4093, 65536):
        assert read(body, cuts=range(0, len(body), step)).elements == count
    for cut in range(body.index(b"[ ]"), body.index(b"[ ]") + 4):
        assert read(body, cuts=(cut,)).elements == count
    with pytest.raises(MalformedRequest, match=rf"holds {count} elements; shape \[{count + 1}\]"):
        read(tensor("FP32", [count + 1], data), cuts=range(0, len(body), 4093))


def test_large_bytes_data_is_counted() -> None:
    strings = ["a,b", "[x]", 'q"u', "tfn{:}", "\\", "é,", ""] * 1000
    for ensure_ascii in (True, False):
        data = json.dumps([strings[i : i + 7] for i in range(0, len(strings), 7)], ensure_ascii=ensure_ascii).encode()
        body = tensor("BYTES", [len(strings)], data)
        for step in (1, 977, 65536):
            assert read(body, cuts=range(0, len(body), step)).elements == len(strings)
        with pytest.raises(MalformedRequest, match=r"holds 7000 elements"):
            read(tensor("BYTES", [len(strings) - 1], data), cuts=range(0, len(body), 977))


@pytest.mark.parametrize("string", [b'"a\\x"', b'"a\x01"', b'"\\u12"'])
def test_strings_triton_cannot_parse(string: bytes) -> None:
    # Control characters and unknown escapes (RapidJSON's refusal is a 500), in data the scanner skips too.
    body = tensor("BYTES", [2], b"[" + string + b',"b"]')
    refused_everywhere(body, r"not valid JSON")
    data = b"[" + b",".join([b'"s"'] * 3000 + [string]) + b"]"
    with pytest.raises(MalformedRequest, match=r"not valid JSON"):
        read(tensor("BYTES", [3001], data), cuts=range(0, len(data), 1000))


# -- properties --


@dataclass
class Generated:
    body: bytes
    json_length: int | None
    tensors: list[tuple[str, str, tuple[int, ...], int]]
    sequence_id: str | None


def nest(values: list[object], shape: list[int]) -> list[object]:
    if len(shape) <= 1:
        return values
    size = len(values) // shape[0] if shape[0] else 0
    return [nest(values[i * size : (i + 1) * size], shape[1:]) for i in range(shape[0])]


def values_of(datatype: str) -> st.SearchStrategy[object]:
    """Elements that ``datatype`` takes (see takes())."""
    if datatype == "BYTES":
        return st.text(max_size=6)
    if datatype == "BOOL":
        return st.booleans()
    if datatype.startswith(("FP", "BF")):
        return st.floats(allow_nan=False, allow_infinity=False, width=32)
    if datatype.startswith("UINT"):
        return st.integers(0, 2**64 - 1)
    return st.integers(-(2**63), 2**63 - 1)


@st.composite
def requests(draw: st.DrawFn) -> Generated:
    names = draw(st.lists(st.text(max_size=8), min_size=1, max_size=3, unique=True))
    inputs: list[dict[str, object]] = []
    binary_parts: list[bytes] = []
    expected: list[tuple[str, str, tuple[int, ...], int]] = []
    for name in names:
        datatype = draw(st.sampled_from(sorted(SIZES)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        elements = math.prod(shape)
        fields: dict[str, object] = {"name": name, "shape": shape, "datatype": datatype}
        if draw(st.booleans()):
            if datatype == "BYTES":
                strings = draw(st.lists(st.binary(max_size=5), min_size=elements, max_size=elements))
                raw = b"".join(len(s).to_bytes(4, "little") + s for s in strings)
            else:
                size = elements * SIZES[datatype]
                raw = draw(st.binary(min_size=size, max_size=size))
            fields["parameters"] = {"binary_data_size": len(raw)}
            binary_parts.append(raw)
        else:
            values = draw(st.lists(values_of(datatype), min_size=elements, max_size=elements))
            fields["data"] = nest(values, shape) if draw(st.booleans()) else values
        order = draw(st.permutations(list(fields)))
        inputs.append({key: fields[key] for key in order})
        expected.append((name, datatype, tuple(shape), elements))
    sequence_id = draw(st.one_of(st.none(), st.sampled_from([0, ""]), st.integers(1, 2**64 - 1), st.text(max_size=6)))
    top: dict[str, object] = {}
    parameters = {"sequence_id": sequence_id, "sequence_start": True} if sequence_id is not None else None
    if parameters is not None and draw(st.booleans()):
        top["parameters"] = parameters
    if draw(st.booleans()):
        top["id"] = draw(st.text(max_size=5))
    top["inputs"] = inputs
    if draw(st.booleans()):
        top["outputs"] = [{"name": "OUT", "parameters": {"binary_data": True}}]
    if parameters is not None and "parameters" not in top:
        top["parameters"] = parameters
    text = json.dumps(
        top,
        ensure_ascii=draw(st.booleans()),
        indent=draw(st.sampled_from([None, 1])),
        separators=draw(st.sampled_from([(",", ":"), (", ", ": ")])),
    ).encode()
    with_header = bool(binary_parts) or draw(st.booleans())  # binary data needs one
    json_length = len(text) if with_header else None
    wanted = None if sequence_id in (None, 0, "") else str(sequence_id)
    return Generated(text + b"".join(binary_parts), json_length, expected, wanted)


PROPERTY_HEAD_BYTES = 4096  # generated heads fit; a smaller padding than the default's keeps the tests fast


def cut_points(data: st.DataObject, body: bytes) -> list[int]:
    # Near the start: past the generated JSON there is only padding.
    return data.draw(st.lists(st.integers(0, min(len(body), 1500)), max_size=20))


@settings(max_examples=150, deadline=None)
@given(requests(), st.data())
def test_valid_requests_are_read_alike_in_any_chunks(generated: Generated, data: st.DataObject) -> None:
    known_length = data.draw(st.booleans())
    for body, json_length in ways(generated.body, generated.json_length, max_head_bytes=PROPERTY_HEAD_BYTES):
        cuts = cut_points(data, body)
        reader = read(body, json_length, cuts=cuts, known_length=known_length, max_head_bytes=PROPERTY_HEAD_BYTES)
        assert reader.done
        assert heads(reader) == generated.tensors
        assert reader.elements == sum(t[3] for t in generated.tensors)
        assert reader.sequence_id == generated.sequence_id


# JSON that RapidJSON holds: numbers within ±1e308 (see test_numbers_beyond_a_double).
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False, min_value=-1e308, max_value=1e308)
    | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=4),
    max_leaves=30,
)
# Nested lists of strings, which a BYTES input's data may be whatever the nesting.
STRING_ARRAYS = st.recursive(st.text(), lambda children: st.lists(children, max_size=4), max_leaves=30)


def leaves(value: object) -> int:
    return sum(leaves(item) for item in value) if isinstance(value, list) else 1


@settings(max_examples=150, deadline=None)
@given(STRING_ARRAYS.map(lambda value: value if isinstance(value, list) else [value]), JSON_VALUES, st.data())
def test_skipped_values_end_where_json_says(data_value: list[object], other: object, data: st.DataObject) -> None:
    """Whatever a data value or an unread key holds, the scanner finds its end (and the data's elements), in
    any chunks."""
    count = leaves(data_value)
    body = json.dumps(
        {
            "id": "i",
            "extra": other,
            "inputs": [{"name": "X", "data": data_value, "extra": other, "shape": [count], "datatype": "BYTES"}],
            "outputs": [{"name": "Y", "extra": other}],
            "parameters": {"custom": other, "sequence_id": "s"},
        },
        ensure_ascii=data.draw(st.booleans()),
    ).encode()
    for text, length in ways(body):
        reader = read(text, length, cuts=cut_points(data, text))
        assert heads(reader) == [("X", "BYTES", (count,), count)] and reader.sequence_id == "s"


@settings(max_examples=300, deadline=None)
@given(requests(), st.data())
def test_mutated_requests_are_read_or_refused(generated: Generated, data: st.DataObject) -> None:
    mutated = bytearray(generated.body)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(mutated) - 1))
        action = data.draw(st.sampled_from(["replace", "insert", "delete"]))
        byte = data.draw(st.sampled_from(b'{}[]",:\\ 0-9e\x00\xc3\xff') | st.integers(0, 255))
        if action == "replace":
            mutated[at] = byte
        elif action == "insert":
            mutated.insert(at, byte)
        else:
            del mutated[at]
    json_length = generated.json_length
    if json_length is not None:
        json_length = max(0, min(json_length + data.draw(st.integers(-2, 2)), len(mutated)))
    known_length = data.draw(st.booleans())
    for body, length in ways(bytes(mutated), json_length, max_head_bytes=PROPERTY_HEAD_BYTES):
        cuts = cut_points(data, body)
        try:
            reader = read(body, length, cuts=cuts, known_length=known_length, max_head_bytes=PROPERTY_HEAD_BYTES)
        except MalformedRequest:
            continue
        assert reader.done
        assert all(isinstance(t, TensorHead) and t.elements == math.prod(t.shape) for t in reader.tensors)
        assert reader.elements <= MAX_ELEMENTS


def takes(datatype: str, value: object) -> bool:
    """Whether Triton 2.51 reads ``value`` as an element of ``datatype`` (RapidJSON's IsString, IsBool,
    IsUint64, IsInt64, IsNumber): the oracle the reader's data checks are held to."""
    if datatype == "BYTES":
        return isinstance(value, str)
    if datatype == "BOOL":
        return isinstance(value, bool)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if datatype.startswith("UINT"):
        return isinstance(value, int) and 0 <= value <= 2**64 - 1
    if datatype.startswith("INT"):
        return isinstance(value, int) and -(2**63) <= value <= 2**63 - 1
    return True


def nested_lists(elements: st.SearchStrategy[object]) -> st.SearchStrategy[list[object]]:
    return st.lists(st.recursive(elements, lambda children: st.lists(children, max_size=4), max_leaves=12), max_size=6)


@st.composite
def data_inputs(draw: st.DrawFn) -> tuple[bytes, bool]:
    """An input's JSON with data of any nesting and elements mostly of its datatype; whether Triton takes it."""
    datatype = draw(st.sampled_from(sorted(SIZES)))
    others = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**65), 2**65),
        st.floats(allow_nan=False, allow_infinity=False, min_value=-1e308, max_value=1e308),
        st.text(max_size=4),
        st.just({}),
    )
    data = draw(nested_lists(st.one_of(values_of(datatype), values_of(datatype), others)))
    count = leaves(data)
    elements = max(0, count + draw(st.sampled_from([0, 0, 0, -1, 1])))
    shape = draw(st.sampled_from([[elements], [1, elements], [elements, 1]]))
    valid = elements == count and all(takes(datatype, leaf) for leaf in flatten(data))
    members = [("name", "X"), ("shape", shape), ("datatype", datatype), ("data", data)]
    order = draw(st.permutations(members))
    body = json.dumps(
        {"inputs": [dict(order)]},
        ensure_ascii=draw(st.booleans()),
        indent=draw(st.sampled_from([None, 1])),
        separators=draw(st.sampled_from([(",", ":"), (", ", ": ")])),
    ).encode()
    return body, valid


def flatten(value: object) -> list[object]:
    flat, stack = [], [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        else:
            flat.append(item)
    return flat


@settings(max_examples=300, deadline=None)
@given(data_inputs(), st.data())
def test_data_is_counted_and_typed_as_triton_reads_it(generated: tuple[bytes, bool], data: st.DataObject) -> None:
    """The json.loads walk and the scanner's tally, in any chunks, agree with the oracle on every data."""
    body, valid = generated
    for text, length in ways(body):
        cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=20))
        if valid:
            assert read(text, length, cuts=cuts).done
        else:
            with pytest.raises(MalformedRequest, match=r"data holds"):
                read(text, length, cuts=cuts)
