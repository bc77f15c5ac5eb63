"""Just enough of ONNX to take the weights out of a model file: a small protobuf reader, no onnx package.

An .onnx file is one protobuf message, ModelProto. Protobuf is a list of fields, each a varint key
(field number << 3 | wire type) followed by its value: a varint (0), 8 bytes (1), a length and that many
bytes (2: strings, bytes, nested messages, packed numbers) or 4 bytes (5). We need:

    ModelProto.graph (7) -> GraphProto
        .node (1) -> NodeProto: input (1), output (2), name (3), op_type (4)
        .initializer (5) -> TensorProto: dims (1), data_type (2), float_data (4), int32_data (5),
                            int64_data (7), name (8), raw_data (9), double_data (10), data_location (14)

Everything is bounds-checked; a damaged file raises OnnxError (a TinyLlavaError), never anything else.
"""
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import TinyLlavaError


class OnnxError(TinyLlavaError):
    pass


# ONNX TensorProto.DataType -> NumPy dtype of raw_data
DTYPES = {1: "<f4", 2: "u1", 3: "i1", 4: "<u2", 5: "<i2", 6: "<i4", 7: "<i8", 9: "u1", 10: "<f2", 11: "<f8",
          12: "<u4", 13: "<u8"}


def _varint(buf, pos, end):
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise OnnxError(f"bad varint at byte {pos}")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            if result >= 1 << 64:
                raise OnnxError(f"varint at byte {pos} is wider than 64 bits")
            return result, pos
        shift += 7


def fields(buf, start, end):
    """Yield (field number, wire type, value) of one message; value is an int or a (start, end) span."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end)
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            if pos + n > end:
                raise OnnxError(f"field {num} at byte {pos} runs past its message")
            value, pos = (pos, pos + n), pos + n
        elif wire == 2:
            n, pos = _varint(buf, pos, end)
            if pos + n > end:
                raise OnnxError(f"field {num} at byte {pos} claims {n} bytes, past its message")
            value, pos = (pos, pos + n), pos + n
        else:
            raise OnnxError(f"unsupported protobuf wire type {wire} at byte {pos}")
        yield num, wire, value


def _text(buf, span):
    try:
        return bytes(buf[span[0]:span[1]]).decode("utf-8")
    except UnicodeDecodeError:
        raise OnnxError(f"string at byte {span[0]} is not UTF-8") from None


def _ints(buf, wire, value, signed):
    """A repeated integer field: one varint (wire 0) or a packed run of them (wire 2)."""
    if wire == 0:
        vals = [value]
    elif wire == 2:
        vals, pos = [], value[0]
        while pos < value[1]:
            v, pos = _varint(buf, pos, value[1])
            vals.append(v)
    else:
        raise OnnxError(f"integer field with wire type {wire}")
    return [v - (1 << 64) if signed and v >= 1 << 63 else v for v in vals]


@dataclass
class Node:
    name: str = ""
    op_type: str = ""
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)


@dataclass
class Tensor:
    name: str = ""
    dims: list = field(default_factory=list)
    data_type: int = 0
    array: np.ndarray = None


def _node(buf, span):
    n = Node()
    for num, wire, v in fields(buf, *span):
        if num in (1, 2, 3, 4) and wire != 2:
            raise OnnxError(f"NodeProto field {num} has wire type {wire}")
        if num == 1:
            n.inputs.append(_text(buf, v))
        elif num == 2:
            n.outputs.append(_text(buf, v))
        elif num == 3:
            n.name = _text(buf, v)
        elif num == 4:
            n.op_type = _text(buf, v)
    return n


def _tensor(buf, span):
    t, raw, typed = Tensor(), None, []
    for num, wire, v in fields(buf, *span):
        if num == 1:
            t.dims += _ints(buf, wire, v, signed=True)
        elif num == 2 and wire == 0:
            t.data_type = v
        elif num == 8 and wire == 2:
            t.name = _text(buf, v)
        elif num == 9 and wire == 2:
            raw = v
        elif num == 4 and wire == 2:   # packed float_data
            typed.append(np.frombuffer(buf[v[0]:v[1] - (v[1] - v[0]) % 4], "<f4"))
        elif num == 4 and wire == 5:
            typed.append(np.frombuffer(buf[v[0]:v[1]], "<f4"))
        elif num in (5, 7) and wire in (0, 2):  # int32_data (also int8/uint8/float16 bits), int64_data
            typed.append(np.array(_ints(buf, wire, v, signed=True), np.int64))
        elif num == 10 and wire == 2:  # packed double_data
            typed.append(np.frombuffer(buf[v[0]:v[1] - (v[1] - v[0]) % 8], "<f8"))
        elif num == 14 and wire == 0 and v == 1:
            raise OnnxError(f"tensor {t.name!r} keeps its data in an external file; not supported")
    if t.data_type not in DTYPES:
        raise OnnxError(f"tensor {t.name!r} has unsupported data type {t.data_type}")
    if any(d < 0 for d in t.dims) or len(t.dims) > 8:
        raise OnnxError(f"tensor {t.name!r} has bad dims {t.dims}")
    count = int(np.prod(t.dims, dtype=np.float64)) if t.dims else 1
    dtype = np.dtype(DTYPES[t.data_type])
    if raw is not None:
        if raw[1] - raw[0] != count * dtype.itemsize:
            raise OnnxError(f"tensor {t.name!r}: raw_data has {raw[1] - raw[0]} bytes, dims {t.dims} need "
                            f"{count * dtype.itemsize}")
        data = np.frombuffer(buf[raw[0]:raw[1]], dtype)
    else:
        data = np.concatenate(typed) if typed else np.zeros(0)
        if data.size != count:
            raise OnnxError(f"tensor {t.name!r}: {data.size} values for dims {t.dims}")
        if t.data_type == 10:  # float16 travels as its 16 bits in int32_data
            data = data.astype(np.uint16).view("<f2")
    t.array = data.astype(dtype.newbyteorder("=")).reshape(t.dims)
    return t


def load(path):
    """-> (nodes, initializers): the graph's nodes in order, and its initializers by name."""
    path = Path(path)
    try:
        buf = memoryview(path.read_bytes())  # indexing gives ints, slicing copies nothing
    except OSError as e:
        raise OnnxError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        graph = [v for num, wire, v in fields(buf, 0, len(buf)) if num == 7 and wire == 2]
        if len(graph) != 1:
            raise OnnxError("no graph: not an ONNX model")
        nodes, inits = [], {}
        for num, wire, v in fields(buf, *graph[0]):
            if num == 1 and wire == 2:
                nodes.append(_node(buf, v))
            elif num == 5 and wire == 2:
                t = _tensor(buf, v)
                inits[t.name] = t.array
        return nodes, inits
    except OnnxError as e:
        raise OnnxError(f"{path}: {e}") from None
