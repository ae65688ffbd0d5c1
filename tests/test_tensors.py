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

from extproc.handlers.parse import MalformedRequest
from extproc.handlers.tensors import InputSpec, ModelInputs, TensorHead, TensorHeadReader

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
        ({"sequence_end": 1}, (False, False)),  # Triton takes JSON booleans only
        ({}, (False, False)),
    ):
        body = request([fp32()], parameters={"sequence_id": 5, **flags})
        for text, _ in ways(body):
            reader = read(text)
            assert reader.parameters_read and reader.sequence_id == "5"
            assert (reader.sequence_start, reader.sequence_end) == expected


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
        ({"sequence_id": True}, None),
        ({"sequence_id": 1.5}, None),
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
    # Elsewhere (in data, outputs, custom parameters) the reader does not look, and Triton decides.
    body = b'{"inputs":[{"name":"X","shape":[1],"datatype":"FP32","data":[1]}],"outputs":[{"name":"Y","name":"Z"}]}'
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
    for size in (-1, True, 4.0, "4"):
        header = request([{"name": "A", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": size}}])
        with pytest.raises(MalformedRequest, match=r"binary_data_size .* is not a byte count"):
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
    if datatype == "BYTES":
        return st.text(max_size=6)
    if datatype == "BOOL":
        return st.booleans()
    if datatype.startswith(("FP", "BF")):
        return st.floats(allow_nan=False, allow_infinity=False, width=32)
    return st.integers(-(2**31), 2**31)


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


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=4),
    max_leaves=30,
)


@settings(max_examples=150, deadline=None)
@given(JSON_VALUES, JSON_VALUES, st.data())
def test_skipped_values_end_where_json_says(data_value: object, other: object, data: st.DataObject) -> None:
    """Whatever a data value or an unread key holds, the scanner finds its end, in any chunks."""
    body = json.dumps(
        {
            "id": other,
            "inputs": [{"name": "X", "data": data_value, "extra": other, "shape": [0], "datatype": "BYTES"}],
            "outputs": other,
            "parameters": {"custom": other, "sequence_id": "s"},
        }
    ).encode()
    for text, length in ways(body):
        reader = read(text, length, cuts=cut_points(data, text))
        assert heads(reader) == [("X", "BYTES", (0,), 0)] and reader.sequence_id == "s"


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
