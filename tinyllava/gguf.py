"""GGUF, llama.cpp's model file, read (memory-mapped) and written from scratch.

Layout, all little-endian (versions 2 and 3 are the same on disk; version 1 used 32-bit counts):

    "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv times:      key (string) | value type u32 | value
    n_tensors times: name (string) | n_dims u32 | dims u64 x n_dims | ggml type u32 | offset u64
    zero padding up to a multiple of general.alignment (default 32)
    tensor data: each tensor at data_start + offset, every offset a multiple of the alignment

A string is a u64 byte length and UTF-8 bytes; an array is an element type u32, a count u64 and the elements.
Tensor dims are ggml's, fastest-varying first: ggml [n_in, n_out] is NumPy (n_out, n_in), so y = x @ W.T.

Every count and offset is checked against the file's size before it is used, so a damaged or hostile file
raises GGUFError naming the problem, and never makes the reader allocate what the file merely claims.
"""
import math
import mmap
import os
import struct
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

import numpy as np

from . import quant
from .errors import TinyLlavaError
from .files import atomic
from .quant import GGMLType


class GGUFError(TinyLlavaError):
    """A GGUF file that cannot be read (or written) as asked."""


class ValueType(IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


STRUCT_FORMAT = {ValueType.UINT8: "<B", ValueType.INT8: "<b", ValueType.UINT16: "<H", ValueType.INT16: "<h",
                 ValueType.UINT32: "<I", ValueType.INT32: "<i", ValueType.FLOAT32: "<f", ValueType.BOOL: "<B",
                 ValueType.UINT64: "<Q", ValueType.INT64: "<q", ValueType.FLOAT64: "<d"}
NUMPY_DTYPE = {ValueType.UINT8: "<u1", ValueType.INT8: "<i1", ValueType.UINT16: "<u2", ValueType.INT16: "<i2",
               ValueType.UINT32: "<u4", ValueType.INT32: "<i4", ValueType.FLOAT32: "<f4", ValueType.BOOL: "<u1",
               ValueType.UINT64: "<u8", ValueType.INT64: "<i8", ValueType.FLOAT64: "<f8"}
MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS


@dataclass
class GGUFTensor:
    name: str
    type: GGMLType
    shape: tuple   # NumPy order: (n_out, n_in) for a matrix
    data: np.ndarray  # the raw bytes, uint8 (a view into the memory map when read from a file)

    def numpy(self):  # -> float32 array of self.shape
        return quant.dequantize(self.data, self.type, self.shape)


class GGUFFile:
    """A GGUF file opened read-only: `.metadata` (key -> value), `.types` (key -> value type, element type)
    and `.tensors` (name -> GGUFTensor whose bytes stay in the memory map until used)."""

    def __init__(self, path):
        self.path = Path(path)
        if self.path.is_dir():
            raise GGUFError(f"{self.path}: is a directory, not a GGUF file")
        try:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size else None
        except OSError as e:
            raise GGUFError(f"{self.path}: cannot open ({e.strerror or e})") from None
        self._buf = np.frombuffer(self._map, np.uint8) if self._map else np.zeros(0, np.uint8)
        self._mv = memoryview(self._buf)
        self._pos = 0
        self.metadata, self.types, self.tensors = {}, {}, {}
        self._parse()
        header = self._pos - self._pos % mmap.PAGESIZE
        if header and hasattr(self._map, "madvise"):  # parsed: the header's pages (SmolLM2's tokenizer, 1.8 MB)
            self._map.madvise(mmap.MADV_DONTNEED, 0, header)  # need not stay in this process; the tensors' do

    # -- low-level reads, each checked against the end of the file --------------------------------------
    def fail(self, what):
        """Raise GGUFError naming this file: for readers that find its contents wrong."""
        raise GGUFError(f"{self.path}: {what}")

    def _take(self, n, what):
        if n < 0 or self._pos + n > len(self._buf):
            self.fail(f"truncated: {what} needs {n} bytes at offset {self._pos}, file has {len(self._buf)}")
        start, self._pos = self._pos, self._pos + n
        return start

    def _scalar(self, fmt, what):
        start = self._take(struct.calcsize(fmt), what)
        return struct.unpack_from(fmt, self._mv, start)[0]

    def _string(self, what):
        n = self._scalar("<Q", f"length of {what}")
        start = self._take(n, f"{what} ({n} bytes)")
        try:
            return self._mv[start:start + n].tobytes().decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} at offset {start} is not valid UTF-8")

    def _value(self, vtype, what):
        try:
            vtype = ValueType(vtype)
        except ValueError:
            self.fail(f"{what} has unknown value type {vtype}")
        if vtype == ValueType.STRING:
            return self._string(what), (vtype, None)
        if vtype == ValueType.ARRAY:
            etype = self._scalar("<I", f"element type of {what}")
            count = self._scalar("<Q", f"length of {what}")
            if etype not in ValueType._value2member_map_ or etype == ValueType.ARRAY:
                self.fail(f"{what} is an array of unsupported type {etype}")
            etype = ValueType(etype)
            if etype in NUMPY_DTYPE:  # numbers: one bounds check, then a single read
                dtype = np.dtype(NUMPY_DTYPE[etype])
                start = self._take(count * dtype.itemsize, f"{what} ({count} numbers)")
                arr = np.frombuffer(self._mv, dtype, count, start).copy()
                return (arr.astype(bool) if etype == ValueType.BOOL else arr), (vtype, etype)
            if count * 8 > len(self._buf) - self._pos:  # every string needs at least its 8-byte length
                self.fail(f"{what} claims {count} strings, more than the file can hold")
            return [self._string(f"{what}[{i}]") for i in range(count)], (vtype, etype)
        value = self._scalar(STRUCT_FORMAT[vtype], what)
        return (bool(value) if vtype == ValueType.BOOL else value), (vtype, None)

    # -- the file ----------------------------------------------------------------------------------------
    def _parse(self):
        if len(self._buf) < 4 or self._mv[:4].tobytes() != MAGIC:
            self.fail(f"not a GGUF file (magic {self._mv[:4].tobytes()!r}, expected b'GGUF')")
        self._pos = 4
        self.version = self._scalar("<I", "version")
        if self.version not in (2, 3):
            self.fail(f"unsupported GGUF version {self.version} (tinyllava reads versions 2 and 3)")
        n_tensors = self._scalar("<Q", "tensor count")
        n_kv = self._scalar("<Q", "metadata count")
        remaining = len(self._buf) - self._pos
        if n_kv * 12 > remaining or n_tensors * 24 > remaining:  # smallest possible key/value, tensor info
            self.fail(f"header claims {n_kv} metadata entries and {n_tensors} tensors, more than the file holds "
                       f"(truncated, or not written as GGUF)")
        for i in range(n_kv):
            key = self._string(f"metadata key #{i}")
            if key in self.metadata:
                self.fail(f"metadata key {key!r} appears twice")
            vtype = self._scalar("<I", f"type of {key!r}")
            self.metadata[key], self.types[key] = self._value(vtype, f"value of {key!r}")

        self.alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if self.types.get("general.alignment", (ValueType.UINT32,))[0] != ValueType.UINT32 or \
                not isinstance(self.alignment, int) or self.alignment <= 0 or self.alignment & (self.alignment - 1):
            self.fail(f"general.alignment must be a power of two (u32), got {self.alignment!r}")

        infos = []
        for i in range(n_tensors):
            name = self._string(f"name of tensor #{i}")
            n_dims = self._scalar("<I", f"dims of {name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                self.fail(f"tensor {name!r} has {n_dims} dimensions (1..{MAX_DIMS} allowed)")
            dims = [self._scalar("<Q", f"dim of {name!r}") for _ in range(n_dims)]
            if min(dims) < 1 or math.prod(dims) > 2**62:
                self.fail(f"tensor {name!r} has impossible dimensions {dims}")
            ttype = self._scalar("<I", f"type of {name!r}")
            offset = self._scalar("<Q", f"offset of {name!r}")
            if ttype not in quant.BLOCK_SIZE:
                self.fail(f"tensor {name!r} has unknown or unsupported ggml type {ttype}")
            if name in self.tensors or name in (n for n, *_ in infos):
                self.fail(f"tensor {name!r} appears twice")
            infos.append((name, dims, GGMLType(ttype), offset))

        data_start = -(-self._pos // self.alignment) * self.alignment
        for name, dims, ttype, offset in infos:
            shape = tuple(reversed(dims))
            try:
                size = quant.nbytes(ttype, shape)
            except TinyLlavaError as e:
                self.fail(f"tensor {name!r}: {e}")
            start = data_start + offset
            if offset % self.alignment:
                self.fail(f"tensor {name!r} offset {offset} is not a multiple of the alignment {self.alignment}")
            if start + size > len(self._buf):
                self.fail(f"tensor {name!r} ({ttype.name} {list(dims)}, {size} bytes at offset {start}) runs past "
                           f"the end of the file ({len(self._buf)} bytes): truncated?")
            self.tensors[name] = GGUFTensor(name, ttype, shape, self._buf[start:start + size])

    def __repr__(self):
        return f"GGUFFile({str(self.path)!r}, v{self.version}, {len(self.metadata)} keys, {len(self.tensors)} tensors)"

    def get(self, key, default=None):
        return self.metadata.get(key, default)

    def require(self, key):
        """A metadata value that must be present, with an error naming the file otherwise."""
        if key not in self.metadata:
            self.fail(f"missing metadata key {key!r} (is this the right kind of model file?)")
        return self.metadata[key]

    def tensor(self, name):
        if name not in self.tensors:
            self.fail(f"missing tensor {name!r} (is this the right kind of model file?)")
        return self.tensors[name]

    def weight(self, name, load_matrix=None):
        """A tensor as a model holds it: a matrix as load_matrix(GGUFTensor) makes it (default: float32), anything
        else (norms, biases, embeddings of other shapes) as a float32 array."""
        t = self.tensor(name)
        return (load_matrix or GGUFTensor.numpy)(t) if len(t.shape) == 2 else t.numpy()


# -- writing ---------------------------------------------------------------------------------------------
def _infer_type(value):
    """The value type for a Python/NumPy metadata value that names no type of its own."""
    if isinstance(value, (bool, np.bool_)):
        return ValueType.BOOL, None
    if isinstance(value, str):
        return ValueType.STRING, None
    if isinstance(value, np.generic):
        return next(t for t, d in NUMPY_DTYPE.items() if np.dtype(d) == value.dtype.newbyteorder("<")
                    and t != ValueType.BOOL), None
    if isinstance(value, int):
        return (ValueType.UINT32 if 0 <= value < 2**32 else ValueType.INT64), None
    if isinstance(value, float):
        return ValueType.FLOAT32, None
    if isinstance(value, np.ndarray):
        if value.dtype == bool:
            return ValueType.ARRAY, ValueType.BOOL
        return ValueType.ARRAY, _infer_type(value.dtype.type(0))[0]
    if isinstance(value, (list, tuple)):
        if not value:
            return ValueType.ARRAY, ValueType.INT32
        first = _infer_type(value[0])[0]
        if first == ValueType.UINT32:
            first = ValueType.INT32  # a Python list of ints: llama.cpp's token types, for example
        return ValueType.ARRAY, first
    raise GGUFError(f"cannot store a {type(value).__name__} in GGUF metadata")


def _pack_string(s):
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _pack_value(value, vtype, etype=None):
    if vtype == ValueType.STRING:
        return _pack_string(value)
    if vtype == ValueType.ARRAY:
        head = struct.pack("<IQ", etype, len(value))
        if etype in NUMPY_DTYPE:
            return head + np.asarray(value).astype(NUMPY_DTYPE[etype]).tobytes()
        return head + b"".join(_pack_value(v, etype, None) for v in value)
    return np.asarray(value).astype(NUMPY_DTYPE[vtype]).tobytes()


def write_gguf(path, metadata, tensors, types=None, alignment=DEFAULT_ALIGNMENT):
    """Write a GGUF v3 file atomically (a temporary file renamed into place).

    metadata: key -> value; `types` (key -> (value type, element type)) overrides the inferred type, which is
    u32 for a non-negative int, f32 for a float and the dtype's own type for NumPy values.
    tensors: name -> GGUFTensor (raw blocks of any type) or a float32 / float16 NumPy array.
    """
    path = Path(path)
    types = types or {}
    metadata = dict(metadata)
    if alignment != DEFAULT_ALIGNMENT:
        metadata["general.alignment"] = alignment
        types["general.alignment"] = (ValueType.UINT32, None)
    header = [MAGIC, struct.pack("<IQQ", 3, len(tensors), len(metadata))]
    for key, value in metadata.items():
        vtype, etype = types.get(key) or _infer_type(value)
        header += [_pack_string(key), struct.pack("<I", vtype), _pack_value(value, vtype, etype)]

    blobs, offset = [], 0
    for name, t in tensors.items():
        if isinstance(t, np.ndarray):
            ttype = {np.float32: GGMLType.F32, np.float16: GGMLType.F16}.get(t.dtype.type)
            if ttype is None:
                raise GGUFError(f"tensor {name!r}: store float32 or float16 arrays, or quantize first")
            t = GGUFTensor(name, ttype, t.shape, np.ascontiguousarray(t).view(np.uint8).reshape(-1))
        data = np.ascontiguousarray(t.data).reshape(-1).view(np.uint8)
        if data.size != quant.nbytes(t.type, t.shape):
            raise GGUFError(f"tensor {name!r}: {data.size} bytes do not make a {t.type.name} {t.shape}")
        dims = list(reversed(t.shape))
        header += [_pack_string(name), struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, t.type, offset)]
        blobs.append((offset, data))
        offset += -(-data.size // alignment) * alignment

    with atomic(path) as f:
        head = b"".join(header)
        f.write(head + bytes(-len(head) % alignment))
        data_start = f.tell()
        for off, data in blobs:
            f.write(bytes(data_start + off - f.tell()))
            f.write(data.tobytes())
    return path


def main(argv=None):
    """python -m tinyllava.gguf FILE: print a GGUF's metadata and tensor table."""
    import argparse
    import sys

    from .errors import cli_errors
    ap = argparse.ArgumentParser(prog="python -m tinyllava.gguf", description="Show what a GGUF file holds.")
    ap.add_argument("file")
    ap.add_argument("--all", action="store_true", help="print long arrays in full")
    args = ap.parse_args(argv)
    with cli_errors("tinyllava.gguf"):
        g = GGUFFile(args.file)
        print(f"{g.path}: GGUF v{g.version}, alignment {g.alignment}, {len(g.metadata)} metadata keys, "
              f"{len(g.tensors)} tensors")
        for k, v in g.metadata.items():
            shown = repr(v) if args.all or not hasattr(v, "__len__") or len(v) <= 8 or isinstance(v, str) else \
                f"[{', '.join(repr(x) for x in list(v)[:5])}, ... {len(v)} items]"
            print(f"  {k:45s} {g.types[k][0].name:8s} {shown[:200]}")
        for t in g.tensors.values():
            print(f"  {t.name:45s} {t.type.name:5s} {str(t.shape):20s} {t.data.nbytes:>12,} bytes")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
