"""Fuzzing the two parsers of untrusted files: the GGUF reader and the ONNX import.

Mutations of small valid files (bit flips, byte overwrites, truncations, insertions, huge integers planted
where counts and lengths live). The only failure allowed is the project's own error class; no hang (a deadline
per example), no memory blow-up (peak RSS checked).

CI runs a bounded number of examples (seconds). The longer run (documented in the README):
    TINYLLAVA_FUZZ_EXAMPLES=20000 python -m pytest tests/test_fuzz.py -p no:randomly
"""
import os
import struct
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinyllava import onnx
from tinyllava.errors import TinyLlavaError
from tinyllava.gguf import GGUFFile, GGUFTensor, write_gguf
from tinyllava.quant import GGMLType, quantize

EXAMPLES = int(os.environ.get("TINYLLAVA_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=2000, suppress_health_check=[HealthCheck.too_slow],
                derandomize=EXAMPLES <= 300)  # CI: the same examples every run; long runs explore


def seed_gguf(tmp):
    x = np.linspace(-1, 1, 128, dtype=np.float32).reshape(2, 64)
    meta = {"general.architecture": "llama", "n": 7, "f": 0.5, "flag": True, "s": "héllo",
            "tokens": ["a", "bb", "ccc"], "ids": np.arange(5, dtype=np.int32), "big": np.uint64(2**40)}
    tensors = {"w": x, "q": GGUFTensor("q", GGMLType.Q8_0, x.shape, quantize(x, GGMLType.Q8_0)),
               "q4": GGUFTensor("q4", GGMLType.Q4_1, x.shape, quantize(x, GGMLType.Q4_1))}
    return write_gguf(tmp / "seed.gguf", meta, tensors).read_bytes()


def _varint(n):
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num, payload):  # a length-delimited protobuf field
    return _varint(num << 3 | 2) + _varint(len(payload)) + payload


def seed_onnx():
    """A tiny ONNX model: one MatMulInteger node, an int8 matrix, its float scales and int8 zero points."""
    node = _field(1, b"x") + _field(1, b"W_quantized") + _field(2, b"y") + _field(3, b"/layer/MatMul_quant") + \
        _field(4, b"MatMulInteger")
    w = _varint(1 << 3) + _varint(2) + _varint(1 << 3) + _varint(4) + _varint(2 << 3) + _varint(3) + \
        _field(8, b"W_quantized") + _field(9, bytes(range(8)))
    scale = _field(1, _varint(4)) + _varint(2 << 3) + _varint(1) + _field(8, b"W_scale") + \
        _field(4, struct.pack("<4f", 0.1, 0.2, 0.3, 0.4))
    zero = _field(1, _varint(4)) + _varint(2 << 3) + _varint(3) + _field(8, b"W_zero_point") + \
        _field(5, _varint(0) * 3 + _varint((1 << 64) - 1))
    graph = _field(1, node) + _field(5, w) + _field(5, scale) + _field(5, zero)
    return _varint(1 << 3) + _varint(7) + _field(7, graph)


MUTATIONS = st.lists(st.tuples(st.sampled_from(["flip", "byte", "cut", "insert", "u64", "u32"]),
                               st.integers(0, 2**31), st.integers(0, 255)), min_size=1, max_size=4)
BIG = [0, 1, 2**31 - 1, 2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**64 - 1]


def mutate(raw, ops):
    raw = bytearray(raw)
    for op, where, value in ops:
        if not raw:
            break
        i = where % len(raw)
        if op == "flip":
            raw[i] ^= 1 << (value % 8)
        elif op == "byte":
            raw[i] = value
        elif op == "cut":
            del raw[i:]
        elif op == "insert":
            raw[i:i] = bytes([value]) * (1 + value % 7)
        elif op == "u64":
            raw[i:i + 8] = struct.pack("<Q", BIG[value % len(BIG)])
        else:
            raw[i:i + 4] = struct.pack("<I", BIG[value % 4] & 0xFFFFFFFF)
    return bytes(raw)


def fuzz(raw, path, parse, budget_mb=200):
    """parse(path) on many mutations of raw: only TinyLlavaError may come out, and no mutation may make the parser
    allocate more than budget_mb at once (tracemalloc's peak over the run: NumPy's arrays count, this process's
    earlier peaks do not)."""
    tracemalloc.start()

    @FUZZ
    @given(MUTATIONS)
    def run(ops):
        path.write_bytes(mutate(raw, ops))
        try:
            parse(path)
        except TinyLlavaError:
            pass

    try:
        run()
        peak = tracemalloc.get_traced_memory()[1] / 1e6
    finally:
        tracemalloc.stop()
    assert peak < budget_mb, f"a mutated file made the parser allocate {peak:.0f} MB: what the file claimed"


def read_gguf_fully(path):
    for t in GGUFFile(path).tensors.values():
        t.numpy()


def test_gguf_reader_survives_mutations(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    fuzz(seed_gguf(tmp), tmp / "m.gguf", read_gguf_fully)


def test_onnx_import_survives_mutations(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    raw = seed_onnx()
    (tmp / "seed.onnx").write_bytes(raw)
    nodes, inits = onnx.load(tmp / "seed.onnx")  # the seed itself is valid
    assert nodes[0].op_type == "MatMulInteger" and inits["W_quantized"].shape == (2, 4)
    assert inits["W_zero_point"].tolist() == [0, 0, 0, -1]
    fuzz(raw, tmp / "m.onnx", onnx.load)


def test_the_memory_check_catches_a_parser_that_allocates_what_a_file_claims(tmp_path):
    with pytest.raises(AssertionError, match="allocate"):
        fuzz(b"x" * 64, tmp_path / "m", lambda p: np.ones(1_000_000), budget_mb=5)  # 8 MB each time
