"""The checks of a request's tensor headers and parameters (see :mod:`extproc.datapath.protocol.tensors`): datatypes
and their element sizes, shapes and the element cap, binary data sizes, the model configuration's inputs,
and the parameters and outputs Triton reads, of the JSON types it takes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from extproc.datapath.protocol.json_text import (
    SURE_INTEGER,
    UINT64_MAX,
    DuplicateKey,
    fits_double,
    quote,
    repeated,
    show,
    too_big,
)
from extproc.datapath.protocol.parse import MalformedRequest
from extproc.datapath.protocol.tensor_data import InputHead, check_data

# Bytes per element of each KServe v2 datatype; 0 for BYTES, whose elements are 4-byte-length-prefixed
# strings of any size.
_ELEMENT_BYTES: Final[dict[str, int]] = {
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
_BYTES_PREFIX: Final = 4  # the length prefix of each binary BYTES element
_MAX_RANK: Final = 32  # numpy 1.x's own limit: any array a Python client can build has at most this
_MAX_DIM: Final = (1 << 63) - 1  # Triton keeps dimensions as int64

# The parameters Triton reads, by the JSON type its reader takes (a wrong one is a 500): the request's, an
# input's, an output's.
_P_BOOL: Final = 0
_P_UINT: Final = 1
_P_STRING: Final = 2
_P_UINT_OR_STRING: Final = 3
_P_TAKES: Final[dict[int, str]] = {
    _P_BOOL: "true or false",
    _P_UINT: "an integer from 0 to 2^64-1",
    _P_STRING: "a string",
    _P_UINT_OR_STRING: "an integer from 0 to 2^64-1 or a string",
}
_REQUEST_PARAMETERS: Final[dict[str, int]] = {
    "priority": _P_UINT,
    "timeout": _P_UINT,
    "binary_data_output": _P_BOOL,
    "sequence_id": _P_UINT_OR_STRING,
    "sequence_start": _P_BOOL,
    "sequence_end": _P_BOOL,
}
_INPUT_PARAMETERS: Final[dict[str, int]] = {
    "binary_data_size": _P_UINT,
    "shared_memory_region": _P_STRING,
    "shared_memory_offset": _P_UINT,
    "shared_memory_byte_size": _P_UINT,
}
_OUTPUT_PARAMETERS: Final[dict[str, int]] = {
    "binary_data": _P_BOOL,
    "classification": _P_UINT,
    "shared_memory_region": _P_STRING,
    "shared_memory_offset": _P_UINT,
    "shared_memory_byte_size": _P_UINT,
}

# What the value being read is, hence what happens to it: one numbering for an input's members, which the
# checks take, and the keys and other values the scanner reads.
R_NONE: Final = 0  # between values
R_DATA: Final = 1  # an input's data: skipped (tallied), and its bytes are not head bytes
R_TOP_KEY: Final = 2
R_INPUT_KEY: Final = 3
R_TOP_VALUE: Final = 4  # a top-level value other than inputs
R_NAME: Final = 5
R_SHAPE: Final = 6
R_DATATYPE: Final = 7
R_INPUT_PARAMETERS: Final = 8
R_INPUT_OTHER: Final = 9  # an input's member the reader does not know: only its numbers are checked
INPUT_ROLES: Final[dict[str, int]] = {
    "data": R_DATA,
    "name": R_NAME,
    "shape": R_SHAPE,
    "datatype": R_DATATYPE,
    "parameters": R_INPUT_PARAMETERS,
}


@dataclass(frozen=True, slots=True)
class InputSpec:
    """One input of a model's configuration: ``dims`` without the batch dimension, -1 for any size;
    ``datatype`` a KServe name (``FP32``, not the config's ``TYPE_FP32``)."""

    dims: tuple[int, ...]
    datatype: str


@dataclass(frozen=True, slots=True)
class ModelInputs:
    """What a model's configuration says its requests may hold. With ``max_batch_size`` > 0 a request's
    shape is ``[batch] + dims``, 1 ≤ batch ≤ ``max_batch_size``; with 0 it is ``dims``."""

    max_batch_size: int
    inputs: Mapping[str, InputSpec]


# Built per input of every request: a written __init__ and not frozen, as scheduling.types.InferenceRequest.
@dataclass(slots=True, init=False)
class TensorHead:
    """An input tensor as the request declares it."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    elements: int

    def __init__(self, name: str, datatype: str, shape: tuple[int, ...], elements: int) -> None:
        self.name = name
        self.datatype = datatype
        self.shape = shape
        self.elements = elements


class HeadChecks:
    """The checks of what a request's head declares, the same whichever way the reader reads its JSON (one
    json.loads, or the scanner): an input's members as they come, each input once it ends
    (:meth:`_close_input`), the inputs together (:meth:`_close_inputs`), the request's other members. The
    base of :class:`~extproc.datapath.protocol.tensors.TensorHeadReader`, whose public attributes they set."""

    def __init__(
        self, body_length: int | None, json_length: int | None, max_elements: int, spec: ModelInputs | None
    ) -> None:
        self.tensors: list[TensorHead] = []
        self.elements = 0
        self.sequence_id: str | None = None
        self.sequence_start = False
        self.sequence_end = False
        self.parameters_read = False  # the request's parameters were seen (sequence_id and flags are final)
        self._body_length = body_length
        self._json_length = json_length
        self._max_elements = max_elements
        self._spec = spec
        self._names: set[str] = set()
        self._json_elements = 0  # of inputs whose elements are in "data"
        self._binary_bytes = 0
        self._inputs_closed = False

    def _read_top_member(self, key: str, value: object) -> None:
        """A member of the request's object other than inputs."""
        if key == "parameters":
            self._read_parameters(value)
        elif key == "id":
            if not isinstance(value, str):
                raise MalformedRequest(f"the request's id {show(value)} is not a string")
        elif key == "outputs":
            _read_outputs(value)
        else:
            _check_integers(value, f"the request's {quote(key)}")

    def _read_input_member(self, head: InputHead, role: int, value: object) -> None:
        label = head.label()
        if role == R_NAME:
            if not isinstance(value, str):
                raise MalformedRequest(f"{label}: the name is not a string")
            head.name = value
        elif role == R_DATATYPE:
            if not isinstance(value, str) or value not in _ELEMENT_BYTES:
                raise MalformedRequest(f"{label} has an unknown datatype {show(value)}")
            head.datatype = value
        elif role == R_SHAPE:
            self._read_shape(head, label, value)
        elif role == R_INPUT_PARAMETERS:
            if isinstance(value, DuplicateKey):
                raise repeated(f"the parameters of {label}", value)
            if not isinstance(value, dict):
                raise MalformedRequest(f"{label}: the parameters are not an object")
            _check_parameters(label, value, _INPUT_PARAMETERS)
            size = value.get("binary_data_size")
            if isinstance(size, int):  # an unsigned integer: _check_parameters says so
                head.binary_size = size
            head.shared_memory = "shared_memory_region" in value
        else:
            _check_integers(value, label)

    def _read_shape(self, head: InputHead, label: str, value: object) -> None:
        if not isinstance(value, list):
            raise MalformedRequest(f"{label}: the shape is not a list")
        if len(value) > _MAX_RANK:
            raise MalformedRequest(f"{label}: the shape has {len(value)} dimensions, more than {_MAX_RANK}")
        for dim in value:
            if isinstance(dim, bool) or not isinstance(dim, int) or not 0 <= dim <= _MAX_DIM:
                raise MalformedRequest(
                    f"{label}: the shape has the dimension {show(dim)}: dimensions are integers from 0 to 2^63-1"
                )
        shape: tuple[int, ...] = tuple(value)
        room = self._max_elements - self.elements
        elements = 1
        if 0 in shape:
            elements = 0
        else:
            for dim in shape:
                elements *= dim
                if elements > room:
                    raise MalformedRequest(
                        f"{label}: shape {show(list(shape))} takes the request over its limit of "
                        f"{self._max_elements} elements"
                    )
        head.shape = shape
        head.elements = elements

    def _close_input(self, head: InputHead, text_length: int) -> None:
        """``text_length``: the JSON text's length, or as much of it as comes before the input's end."""
        label = head.label()
        name, datatype, shape = head.name, head.datatype, head.shape
        if name is None:
            raise MalformedRequest(f"{label} has no name")
        if datatype is None:
            raise MalformedRequest(f"{label} has no datatype")
        if shape is None:
            raise MalformedRequest(f"{label} has no shape")
        # As Triton asks: the elements come from exactly one place.
        if int(head.has_data) + int(head.binary_size is not None) + int(head.shared_memory) != 1:
            raise MalformedRequest(
                f"{label} must have exactly one of data, parameters.binary_data_size and "
                "parameters.shared_memory_region"
            )
        if name in self._names:
            raise MalformedRequest(f"the request has {label} twice")
        self._names.add(name)
        if self._spec is not None:
            _check_spec(self._spec, label, name, datatype, shape)
        elements = head.elements
        if head.binary_size is not None:
            self._check_binary(label, datatype, shape, elements, head.binary_size)
        elif head.has_data:
            # Each element of JSON data takes a byte at least: more elements than bytes is a shape the data
            # cannot fill, which Triton would still allocate for.
            self._json_elements += elements
            if self._json_elements > text_length:
                raise MalformedRequest(
                    f"{label}: shape {show(list(shape))} has more elements than the request's "
                    f"{text_length} bytes of JSON can hold"
                )
            check_data(head, label, datatype, shape)
        self.elements += elements
        self.tensors.append(TensorHead(name, datatype, shape, elements))

    def _check_binary(self, label: str, datatype: str, shape: tuple[int, ...], elements: int, size: int) -> None:
        if size and self._json_length is None:
            raise MalformedRequest(f"{label} has binary data but the request has no Inference-Header-Content-Length")
        element_bytes = _ELEMENT_BYTES[datatype]
        if element_bytes and size != elements * element_bytes:
            raise MalformedRequest(
                f"{label} has {size} bytes of binary data; shape {show(list(shape))} of {datatype} takes "
                f"{elements * element_bytes}"
            )
        if not element_bytes and size < elements * _BYTES_PREFIX:
            raise MalformedRequest(
                f"{label} has {size} bytes of binary data, too few for {elements} BYTES elements "
                f"({_BYTES_PREFIX} bytes each at least)"
            )
        self._binary_bytes += size

    def _close_inputs(self) -> None:
        if not self.tensors:
            raise MalformedRequest("the request has no inputs")
        if self._json_length is not None and self._body_length is not None:
            binary = self._body_length - self._json_length
            if binary != self._binary_bytes:
                raise MalformedRequest(
                    f"the request has {binary} bytes after its JSON part but its inputs' binary_data_size "
                    f"add up to {self._binary_bytes}"
                )
        self._inputs_closed = True

    def _read_parameters(self, value: object) -> None:
        if isinstance(value, DuplicateKey):
            raise repeated("the request's parameters", value)
        if not isinstance(value, dict):
            raise MalformedRequest("the request's parameters are not an object")
        _check_parameters("the request's parameters", value, _REQUEST_PARAMETERS)
        self.parameters_read = True
        self.sequence_start = value.get("sequence_start") is True
        self.sequence_end = value.get("sequence_end") is True
        sequence_id = value.get("sequence_id")
        # An unsigned integer or a string (_check_parameters says so); 0 and "" mean "not part of a sequence".
        if sequence_id is None or sequence_id == 0 or sequence_id == "":
            self.sequence_id = None
        else:
            self.sequence_id = str(sequence_id)


def _read_outputs(value: object) -> None:
    """The request's outputs, as Triton reads them: a list of objects, each with a string name, and the
    parameters it reads of the types it takes."""
    if not isinstance(value, list):
        raise MalformedRequest("the request's outputs are not a list")
    for index, item in enumerate(value):
        label = f"output #{index}"
        if isinstance(item, DuplicateKey):
            raise repeated(label, item)
        if not isinstance(item, dict):
            raise MalformedRequest(f"{label} is not an object")
        name = item.get("name")
        if name is None:
            raise MalformedRequest(f"{label} has no name")
        if not isinstance(name, str):
            raise MalformedRequest(f"{label}: the name is not a string")
        label = f"output {quote(name)}"
        if "parameters" in item:
            parameters = item["parameters"]
            if isinstance(parameters, DuplicateKey):
                raise repeated(f"the parameters of {label}", parameters)
            if not isinstance(parameters, dict):
                raise MalformedRequest(f"{label}: the parameters are not an object")
            _check_parameters(label, parameters, _OUTPUT_PARAMETERS)
        _check_integers(item, label)


def _check_parameters(label: str, parameters: dict[str, object], types: Mapping[str, int]) -> None:
    """The parameters Triton reads of ``types``'s JSON types (any other is its 500), and the integers of all."""
    for key, kind in types.items():
        if key not in parameters:
            continue
        value = parameters[key]
        if kind == _P_BOOL:
            fits = isinstance(value, bool)
        elif kind == _P_STRING:
            fits = isinstance(value, str)
        else:
            fits = (isinstance(value, str) and kind == _P_UINT_OR_STRING) or (
                isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= UINT64_MAX
            )
        if not fits:
            raise MalformedRequest(f"{label}: {key} {show(value)} is not {_P_TAKES[kind]}")
    _check_integers(parameters, label)


def _check_integers(value: object, where: str) -> None:
    """Refuse an integer anywhere in ``value`` that RapidJSON cannot hold (json.loads makes it an int, where a
    number with a fraction or an exponent is a Float, checked as it is made). Iterative."""
    stack: list[object] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, int) and not -SURE_INTEGER <= item <= SURE_INTEGER and not fits_double(str(item)):
            raise too_big(str(item), where)


def _check_spec(spec: ModelInputs, label: str, name: str, datatype: str, shape: tuple[int, ...]) -> None:
    expected = spec.inputs.get(name)
    if expected is None:
        raise MalformedRequest(f"the model has no {label}")
    if datatype != expected.datatype:
        raise MalformedRequest(f"{label} is {datatype}; the model takes {expected.datatype}")
    batch = spec.max_batch_size
    dims = shape
    if batch > 0:
        if not shape or not 1 <= shape[0] <= batch:
            raise MalformedRequest(
                f"{label} has shape {show(list(shape))}; the model takes [batch] + {list(expected.dims)} "
                f"with a batch of 1 to {batch}"
            )
        dims = shape[1:]
    if not _dims_fit(dims, expected.dims):
        takes = f"[batch] + {list(expected.dims)}" if batch > 0 else str(list(expected.dims))
        raise MalformedRequest(f"{label} has shape {show(list(shape))}; the model takes {takes}")


def _dims_fit(dims: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    return len(dims) == len(expected) and all(want in (-1, got) for got, want in zip(dims, expected, strict=True))
