"""GGML block quantization: how llama.cpp stores a matrix in 4 to 8 bits per weight.

A quantized row is cut into blocks of 32 (or 256) numbers. Each block keeps a few small integers per number
and one or two float16 scales for the whole block, so a weight costs 4.5 to 8.5 bits instead of 32. Each
format below is a NumPy structured dtype: the bytes of one block, field by field, exactly as on disk.

`dequantize` turns raw blocks back into float32; `quantize` makes blocks from float32 (Q8_0, Q4_0, Q4_1).
Both reproduce ggml's reference C code bit for bit (checked against the `gguf` package in the tests).

To add a format (Q5_0, say: 32 weights = d * (q - 16), q 5 bits: 4 in qs, the fifth in a 32-bit qh):
  1. its (numbers per block, bytes per block) are already in BLOCK_SIZE for every ggml type; write its block as
     a structured dtype below, field by field as ggml's block_q5_0 struct, and add it to BLOCK_DTYPE;
  2. a branch in `dequantize` (and in `quantize`, if tinyllava should write it), following ggml's
     dequantize_row_q5_0 / quantize_row_q5_0_ref;
  3. a test against `gguf.quants` on random blocks and on a real tensor (tests/test_quant.py);
  4. to keep it quantized in memory as well (fused.py): a kernel id in fused.KERNELS, a `dot4_` loop and a
     branch of `dequantize_rows`, reading the field offsets from the dtype; tests/test_fused.py then runs it.
"""
from enum import IntEnum

import numpy as np

from .errors import TinyLlavaError


class GGMLType(IntEnum):
    """Tensor types of ggml (the numbers stored in a GGUF file)."""
    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    BF16 = 30


# (numbers per block, bytes per block) for every type a GGUF may hold; the reader needs the sizes of all of
# them to find tensors, even those this module does not dequantize.
BLOCK_SIZE = {
    GGMLType.F32: (1, 4), GGMLType.F16: (1, 2), GGMLType.BF16: (1, 2), GGMLType.F64: (1, 8),
    GGMLType.I8: (1, 1), GGMLType.I16: (1, 2), GGMLType.I32: (1, 4), GGMLType.I64: (1, 8),
    GGMLType.Q4_0: (32, 18), GGMLType.Q4_1: (32, 20), GGMLType.Q5_0: (32, 22), GGMLType.Q5_1: (32, 24),
    GGMLType.Q8_0: (32, 34), GGMLType.Q8_1: (32, 36),
    GGMLType.Q2_K: (256, 84), GGMLType.Q3_K: (256, 110), GGMLType.Q4_K: (256, 144),
    GGMLType.Q5_K: (256, 176), GGMLType.Q6_K: (256, 210), GGMLType.Q8_K: (256, 292),
}

# Q8_0: 32 weights = d * q, q an int8.                                                    34 bytes, 8.5 bits/weight
Q8_0 = np.dtype([("d", "<f2"), ("qs", "i1", 32)])
# Q4_0: 32 weights = d * (q - 8), q a 4-bit nibble; byte j holds weight j (low) and j+16 (high). 18 bytes, 4.5 bits
Q4_0 = np.dtype([("d", "<f2"), ("qs", "u1", 16)])
# Q4_1: 32 weights = d * q + m, q a 4-bit nibble (same packing as Q4_0), m the block minimum.  20 bytes, 5 bits
Q4_1 = np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)])
# Q4_K: a super-block of 256 = 8 sub-blocks of 32; weight = d * sc[s] * q - dmin * m[s], with 6-bit sc and m
# per sub-block packed into 12 bytes, and 4-bit q (byte j of a 32-byte group: low nibble in sub-block 2g,
# high nibble in sub-block 2g+1).                                                        144 bytes, 4.5 bits
Q4_K = np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qs", "u1", 128)])
# Q6_K: a super-block of 256 = 16 sub-blocks of 16; weight = d * sc[s] * (q - 32), q 6 bits: the low 4 in
# ql, the high 2 in qh; sc an int8 per sub-block.                                        210 bytes, 6.5625 bits
Q6_K = np.dtype([("ql", "u1", 128), ("qh", "u1", 64), ("scales", "i1", 16), ("d", "<f2")])

BLOCK_DTYPE = {GGMLType.Q8_0: Q8_0, GGMLType.Q4_0: Q4_0, GGMLType.Q4_1: Q4_1, GGMLType.Q4_K: Q4_K,
               GGMLType.Q6_K: Q6_K}


def nbytes(qtype, shape):
    """Bytes that a tensor of this type and (NumPy) shape takes; the last axis must be whole blocks."""
    per_block, block_bytes = BLOCK_SIZE[qtype]
    n = 1
    for s in shape:
        n *= int(s)
    if shape and int(shape[-1]) % per_block:
        raise TinyLlavaError(f"a row of {shape[-1]} is not a whole number of {GGMLType(qtype).name} blocks "
                             f"of {per_block}")
    return n // per_block * block_bytes


def _unpack_nibbles(qs):  # [..., 16] uint8 -> [..., 32] uint8: low nibbles are weights 0..15, high 16..31
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _q4_k_scales(scales):  # [n, 12] uint8 -> sc [n, 8], m [n, 8]: eight 6-bit scales and mins
    lo, hi, mix = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = np.concatenate([lo & 63, (mix & 0x0F) | ((lo >> 6) << 4)], axis=1)  # [n, 8]
    m = np.concatenate([hi & 63, (mix >> 4) | ((hi >> 6) << 4)], axis=1)     # [n, 8]
    return sc, m


def _q6_k_values(ql, qh):  # [n, 128], [n, 64] uint8 -> [n, 256] int8 in -32..31
    halves = []
    for h in range(2):  # each half of the super-block reads 64 bytes of ql and 32 of qh
        lo, hi = ql[:, 64 * h:64 * h + 32], ql[:, 64 * h + 32:64 * h + 64]  # [n, 32] each
        top = qh[:, 32 * h:32 * h + 32]                                      # [n, 32]
        halves += [(lo & 0x0F) | ((top & 3) << 4), (hi & 0x0F) | (((top >> 2) & 3) << 4),
                   (lo >> 4) | (((top >> 4) & 3) << 4), (hi >> 4) | (((top >> 6) & 3) << 4)]
    return np.concatenate(halves, axis=1).astype(np.int8) - np.int8(32)  # [n, 256]


def dequantize(raw, qtype, shape):
    """Raw tensor bytes -> float32 array of `shape` (NumPy order: the last axis is a row of blocks)."""
    qtype = GGMLType(qtype)
    raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if raw.size != nbytes(qtype, shape):
        raise TinyLlavaError(f"{qtype.name} tensor of shape {tuple(shape)} needs {nbytes(qtype, shape)} bytes, "
                             f"got {raw.size}")
    if qtype == GGMLType.F32:
        return raw.view("<f4").astype(np.float32).reshape(shape)
    if qtype == GGMLType.F16:
        return raw.view("<f2").astype(np.float32).reshape(shape)
    if qtype == GGMLType.BF16:  # the top 16 bits of a float32
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
    if qtype not in BLOCK_DTYPE:
        raise TinyLlavaError(f"dequantizing {qtype.name} is not supported")
    b = raw.view(BLOCK_DTYPE[qtype])  # [n_blocks] structured
    if qtype == GGMLType.Q8_0:
        x = b["d"].astype(np.float32)[:, None] * b["qs"].astype(np.float32)                 # [n, 32]
    elif qtype == GGMLType.Q4_0:
        q = _unpack_nibbles(b["qs"]).astype(np.int8) - np.int8(8)                           # [n, 32]
        x = b["d"].astype(np.float32)[:, None] * q.astype(np.float32)                       # [n, 32]
    elif qtype == GGMLType.Q4_1:
        q = _unpack_nibbles(b["qs"]).astype(np.float32)                                     # [n, 32]
        x = b["d"].astype(np.float32)[:, None] * q + b["m"].astype(np.float32)[:, None]     # [n, 32]
    elif qtype == GGMLType.Q4_K:
        sc, m = _q4_k_scales(b["scales"])                                                   # [n, 8] each
        d = b["d"].astype(np.float32)[:, None] * sc.astype(np.float32)                      # [n, 8]
        dm = b["dmin"].astype(np.float32)[:, None] * m.astype(np.float32)                   # [n, 8]
        qs = b["qs"].reshape(-1, 4, 32)                                                     # [n, 4, 32]
        q = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(-1, 8, 32).astype(np.float32)    # [n, 8, 32]
        x = d[:, :, None] * q - dm[:, :, None]                                              # [n, 8, 32]
    else:  # Q6_K
        q = _q6_k_values(b["ql"], b["qh"]).reshape(-1, 16, 16).astype(np.float32)          # [n, 16, 16]
        d = b["d"].astype(np.float32)[:, None] * b["scales"].astype(np.float32)             # [n, 16]
        x = d[:, :, None] * q                                                               # [n, 16, 16]
    return x.reshape(shape)


def _roundf(x):  # C's roundf (half away from zero); float64 makes the +0.5 exact for float32 inputs
    x = x.astype(np.float64)
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def quantize(x, qtype):
    """float32 [..., n] -> raw blocks [..., bytes per row] (uint8), as ggml's reference quantizer makes them."""
    qtype = GGMLType(qtype)
    x = np.asarray(x, dtype=np.float32)
    shape = x.shape
    if qtype == GGMLType.F32:
        return x.view(np.uint8).reshape(*shape[:-1], -1)
    if qtype == GGMLType.F16:
        return x.astype("<f2").view(np.uint8).reshape(*shape[:-1], -1)
    if qtype not in (GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1):
        raise TinyLlavaError(f"quantizing to {qtype.name} is not supported")
    bytes_per_row = nbytes(qtype, shape[-1:])
    xb = x.reshape(-1, 32)                                                  # [n, 32]
    b = np.zeros(xb.shape[0], dtype=BLOCK_DTYPE[qtype])                     # [n] structured
    with np.errstate(divide="ignore"):
        if qtype == GGMLType.Q8_0:
            d = np.abs(xb).max(axis=1) / np.float32(127)                    # [n]
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d)        # [n]
            b["qs"] = _roundf(xb * inv[:, None])
        elif qtype == GGMLType.Q4_0:
            big = np.take_along_axis(xb, np.abs(xb).argmax(axis=1)[:, None], axis=1)[:, 0]  # [n] signed abs-max
            d = big / np.float32(-8)                                        # [n]
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d)        # [n]
            q = np.minimum(np.trunc(xb * inv[:, None] + np.float32(8.5)), 15).astype(np.uint8)  # [n, 32]
            b["qs"] = q[:, :16] | (q[:, 16:] << 4)
        else:  # Q4_1
            lo, hi = xb.min(axis=1), xb.max(axis=1)                         # [n], [n]
            d = (hi - lo) / np.float32(15)                                  # [n]
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d)        # [n]
            q = np.minimum(np.trunc((xb - lo[:, None]) * inv[:, None] + np.float32(0.5)), 15).astype(np.uint8)
            b["qs"] = q[:, :16] | (q[:, 16:] << 4)
            b["m"] = lo
    b["d"] = d
    return b.view(np.uint8).reshape(*shape[:-1], bytes_per_row)
