"""GGML block quantization: how llama.cpp stores a matrix in 4 to 8 bits per weight.

A quantized row is cut into blocks of 32 (or 256) numbers. Each block keeps a few small integers per number
and one or two float16 scales for the whole block, so a weight costs 4.5 to 8.5 bits instead of 32. Each
format below is a NumPy structured dtype: the bytes of one block, field by field, exactly as on disk.

`dequantize` turns raw blocks back into float32; `quantize` makes blocks from float32 (Q8_0, Q4_0, Q4_1, Q5_0,
and the K-quants Q4_K and Q6_K). Both reproduce ggml's reference C code bit for bit: checked against the `gguf`
package in the tests, and for the K-quants, which it cannot make, against llama.cpp's own quantizer
(tests/make_reference.py saves its blocks).

The 32-block formats round each weight to the nearest step of one scale. The K-quants search: each sub-block's
scale (and, for Q4_K, minimum) is fitted by trying 20 or 19 nearby scales and keeping the one with the least
weighted squared error (make_qkx2_quants, make_qx_quants below), then the sub-block scales are themselves
quantized to 6 or 8 bits against one float16 per super-block of 256. That search is why they are ggml's default
at 4-6 bits: at 4.5 bits per weight Q4_K's error is below Q4_1's at 5.

To add a format (Q5_1, say: 32 weights = d * q + m, q 5 bits: 4 in qs, the fifth in a 32-bit qh):
  1. its (numbers per block, bytes per block) are already in BLOCK_SIZE for every ggml type; write its block as
     a structured dtype below, field by field as ggml's block_q5_1 struct, and add it to BLOCK_DTYPE;
  2. a branch in `dequantize` (and in `quantize`, if tinyllava should write it), following ggml's
     dequantize_row_q5_1 / quantize_row_q5_1_ref;
  3. a test against `gguf.quants` (or llama.cpp's quantizer, tests/make_reference.py) on random blocks and on a
     real tensor (tests/test_quant.py);
  4. to keep it quantized in memory as well (fused.py): a kernel id in fused.KERNELS, a float `dot4_` loop, an
     integer `idot4_` loop (simd.py's intrinsics unpack its bytes) and a branch of `dequantize_rows`, reading the
     field offsets from the dtype; tests/test_fused.py then runs it.
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
# Q5_0: 32 weights = d * (q - 16), q 5 bits: the low 4 packed as Q4_0's, the fifth bit of weight j in bit j of
# the 32-bit qh.                                                                          22 bytes, 5.5 bits
Q5_0 = np.dtype([("d", "<f2"), ("qh", "<u4"), ("qs", "u1", 16)])
# Q4_K: a super-block of 256 = 8 sub-blocks of 32; weight = d * sc[s] * q - dmin * m[s], with 6-bit sc and m
# per sub-block packed into 12 bytes, and 4-bit q (byte j of a 32-byte group: low nibble in sub-block 2g,
# high nibble in sub-block 2g+1).                                                        144 bytes, 4.5 bits
Q4_K = np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qs", "u1", 128)])
# Q6_K: a super-block of 256 = 16 sub-blocks of 16; weight = d * sc[s] * (q - 32), q 6 bits: the low 4 in
# ql, the high 2 in qh; sc an int8 per sub-block.                                        210 bytes, 6.5625 bits
Q6_K = np.dtype([("ql", "u1", 128), ("qh", "u1", 64), ("scales", "i1", 16), ("d", "<f2")])

BLOCK_DTYPE = {GGMLType.Q8_0: Q8_0, GGMLType.Q4_0: Q4_0, GGMLType.Q4_1: Q4_1, GGMLType.Q5_0: Q5_0,
               GGMLType.Q4_K: Q4_K, GGMLType.Q6_K: Q6_K}


# llama.cpp's file types (llama_ftype, a GGUF's general.file_type) that tinyllava writes, each with the type its
# matrices default to (export.quant_types: which tensors llama-quantize gives another).
FILE_TYPES = {"Q4_0": (2, GGMLType.Q4_0), "Q4_1": (3, GGMLType.Q4_1), "Q8_0": (7, GGMLType.Q8_0),
              "Q5_0": (8, GGMLType.Q5_0), "Q4_K_M": (15, GGMLType.Q4_K)}


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
    elif qtype == GGMLType.Q5_0:
        high = (b["qh"][:, None] >> np.arange(32, dtype=np.uint32)) & 1                      # [n, 32]: bit j
        q = (_unpack_nibbles(b["qs"]) | (high << 4).astype(np.uint8)).astype(np.int8) - np.int8(16)  # [n, 32]
        x = b["d"].astype(np.float32)[:, None] * q.astype(np.float32)                       # [n, 32]
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


def _nearest_int(x):  # ggml's nearest_int: rounds half to even (it adds 1.5 * 2^23), as np.rint does
    return np.rint(x).astype(np.int32)


def _sum(terms):  # [..., n] float32 -> [...]: the C loop `s = 0; for i: s += terms[i]`, in that order
    """C sums a block one term after another, in float32; NumPy's sum adds pairwise, which rounds differently.
    cumsum is sequential, and the 0 it starts from makes -0.0 terms sum as C's do."""
    zero = np.zeros(terms.shape[:-1] + (1,), np.float32)
    return np.cumsum(np.concatenate([zero, terms], axis=-1), axis=-1, dtype=np.float32)[..., -1]


def quantize(x, qtype):
    """float32 [..., n] -> raw blocks [..., bytes per row] (uint8), as ggml's reference quantizer makes them."""
    qtype = GGMLType(qtype)
    x = np.asarray(x, dtype=np.float32)
    shape = x.shape
    if qtype == GGMLType.F32:
        return x.view(np.uint8).reshape(*shape[:-1], -1)
    if qtype == GGMLType.F16:
        return x.astype("<f2").view(np.uint8).reshape(*shape[:-1], -1)
    if qtype not in (GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q4_K, GGMLType.Q6_K):
        raise TinyLlavaError(f"quantizing to {qtype.name} is not supported")
    bytes_per_row = nbytes(qtype, shape[-1:])
    if qtype in (GGMLType.Q4_K, GGMLType.Q6_K):
        b = (_quantize_q4_k if qtype == GGMLType.Q4_K else _quantize_q6_k)(x.reshape(-1, 256))
        return b.view(np.uint8).reshape(*shape[:-1], bytes_per_row)
    xb = x.reshape(-1, 32)                                                  # [n, 32]
    b = np.zeros(xb.shape[0], dtype=BLOCK_DTYPE[qtype])                     # [n] structured
    with np.errstate(divide="ignore"):
        if qtype == GGMLType.Q8_0:
            d = np.abs(xb).max(axis=1) / np.float32(127)                    # [n]
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d)        # [n]
            b["qs"] = _roundf(xb * inv[:, None])
        elif qtype in (GGMLType.Q4_0, GGMLType.Q5_0):  # d = the signed abs-max / -8 (or -16), q = x / d + 8 (16)
            half = 8 if qtype == GGMLType.Q4_0 else 16
            big = np.take_along_axis(xb, np.abs(xb).argmax(axis=1)[:, None], axis=1)[:, 0]  # [n] signed abs-max
            big = np.where(big == 0, np.float32(0), big)                    # C starts from +0: an all-zero block
            d = big / np.float32(-half)                                     # [n]   has d = -0.0, even from -0.0s
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d)        # [n]
            q = np.minimum(np.trunc(xb * inv[:, None] + np.float32(half + 0.5)), 2 * half - 1).astype(np.uint8)
            b["qs"] = (q[:, :16] & 15) | ((q[:, 16:] & 15) << 4)            # [n, 32] -> [n, 16]
            if qtype == GGMLType.Q5_0:                                      # the fifth bits, weight j at bit j
                b["qh"] = ((q.astype(np.uint32) >> 4) << np.arange(32, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)
        else:  # Q4_1
            lo = np.take_along_axis(xb, xb.argmin(axis=1)[:, None], axis=1)[:, 0]   # [n]: as C's loop, the first
            hi = np.take_along_axis(xb, xb.argmax(axis=1)[:, None], axis=1)[:, 0]   # of equal values (-0.0 or +0)
            d = (hi - lo) / np.float32(15)                                  # [n]
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d)        # [n]
            q = np.minimum(np.trunc((xb - lo[:, None]) * inv[:, None] + np.float32(0.5)), 15).astype(np.uint8)
            b["qs"] = q[:, :16] | (q[:, 16:] << 4)
            b["m"] = lo
    b["d"] = d
    return b.view(np.uint8).reshape(*shape[:-1], bytes_per_row)


# -- K-quants: ggml's quantize_row_q4_K_ref and quantize_row_q6_K_ref, vectorized over sub-blocks ----------------
# Every float32 operation is written in C's order (a * b * c is (a * b) * c; sums go one term at a time, _sum), so
# that NumPy rounds exactly as the C does: the search below compares errors, and one different bit of a sum can
# choose another scale.
def _make_qkx2_quants(x, w, nmax, rmin, rdelta, nstep):  # ggml's make_qkx2_quants (use_mad false), per row
    """x, w [N, n] float32: values and their importance. Fit x ~ scale * L + min, L integers 0..nmax, min <= 0,
    by least weighted squares over nstep + 1 trial scales around nmax / (max - min). -> scale [N], -min [N],
    L [N, n] uint8"""
    f32 = np.float32
    lo, hi = x.min(axis=1), x.max(axis=1)                                   # [N]
    lo = np.where(lo > 0, f32(0), lo)                                       # the minimum is never positive
    sum_w, sum_x = _sum(w), _sum(w * x)                                     # [N]
    flat = hi == lo                                                         # all equal: L = 0
    span = np.where(flat, f32(1), hi - lo)                                  # [N] (1: no division by zero)
    iscale = f32(nmax) / span
    scale = f32(1) / iscale
    L = np.clip(_nearest_int(iscale[:, None] * (x - lo[:, None])), 0, nmax).astype(np.uint8)      # [N, n]
    diff = scale[:, None] * L.astype(f32) + lo[:, None] - x
    best = _sum(w * (diff * diff))                                          # [N]
    for step in range(nstep + 1):                                           # (as in C, a better fit's minimum
        span = np.where(flat, f32(1), hi - lo)                              # moves the next trials' grid)
        iscale = (f32(rmin) + f32(rdelta) * f32(step) + f32(nmax)) / span
        aux = np.clip(_nearest_int(iscale[:, None] * (x - lo[:, None])), 0, nmax)                 # [N, n]
        la = aux.astype(f32)
        sum_l, sum_l2, sum_xl = _sum(w * la), _sum(w * la * la), _sum(w * la * x)                # [N]
        D = sum_w * sum_l2 - sum_l * sum_l
        with np.errstate(divide="ignore", invalid="ignore"):
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            positive = this_min > 0                                          # then no minimum: refit the scale
            this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
        this_min = np.where(positive, f32(0), this_min)
        diff = this_scale[:, None] * la + this_min[:, None] - x
        err = _sum(w * (diff * diff))
        better = (D > 0) & (err < best) & ~flat                              # [N]
        L = np.where(better[:, None], aux.astype(np.uint8), L)
        best, scale, lo = np.where(better, err, best), np.where(better, this_scale, scale), np.where(better, this_min, lo)
    scale = np.where(flat, f32(0), scale)
    L = np.where(flat[:, None], np.uint8(0), L)
    return scale, -lo, L


def _make_qx_quants(x, nmax):  # ggml's make_qx_quants, rmse_type 1 (weights x^2), no importance matrix
    """x [N, n] float32. Fit x ~ scale * l, l integers -nmax..nmax-1, by least squares weighted by x^2 over 19
    trial scales around -nmax / max (max: the value of largest magnitude). -> scale [N], L = l + nmax [N, n]"""
    f32 = np.float32
    big = np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)[:, 0]   # [N] signed, first largest
    zero = np.abs(big) < f32(1e-15)                                          # GROUP_MAX_EPS: all zero
    big = np.where(zero, f32(1), big)
    w = x * x                                                                # [N, n]

    def trial(iscale):  # -> l [N, n] int32, sum w x l, sum w l^2
        l = np.clip(_nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
        lf = l.astype(f32)
        return l, _sum(w * x * lf), _sum(w * lf * lf)

    l, sumlx, suml2 = trial(f32(-nmax) / big)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / suml2, f32(0))
    best = scale * sumlx
    for step in [s for s in range(-9, 10) if s]:
        laux, sumlx, suml2 = trial(-(f32(nmax) + f32(0.1) * f32(step)) / big)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        with np.errstate(divide="ignore", invalid="ignore"):
            new = sumlx / suml2
        l = np.where(better[:, None], laux, l)
        scale = np.where(better, new, scale)
        best = np.where(better, scale * sumlx, best)
    return np.where(zero, f32(0), scale), np.where(zero[:, None], 0, l + nmax)


def _quantize_q4_k(x):  # [n, 256] float32 -> [n] Q4_K blocks (quantize_row_q4_K_ref)
    f32 = np.float32
    n = x.shape[0]
    xs = x.reshape(n * 8, 32)                                                # [8n, 32]: the sub-blocks
    av_x = np.sqrt(_sum(xs * xs) / f32(32))                                  # [8n]: their RMS
    w = av_x[:, None] + np.abs(xs)                                           # [8n, 32]: importance
    scales, mins, L = _make_qkx2_quants(xs, w, 15, -1.0, 0.1, 20)
    scales, mins, L = scales.reshape(n, 8), mins.reshape(n, 8), L.reshape(n, 8, 32)
    max_scale = np.maximum(scales.max(axis=1), f32(0))                       # [n]
    max_min = np.maximum(mins.max(axis=1), f32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, f32(63) / max_scale, f32(0))
        inv_min = np.where(max_min > 0, f32(63) / max_min, f32(0))
    ls = np.minimum(_nearest_int(inv_scale[:, None] * scales) & 255, 63).astype(np.uint8)   # [n, 8]: 6 bits
    lm = np.minimum(_nearest_int(inv_min[:, None] * mins) & 255, 63).astype(np.uint8)
    b = np.zeros(n, Q4_K)
    b["scales"][:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)                # the packing _q4_k_scales reads
    b["scales"][:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    b["scales"][:, 8:12] = (ls[:, 4:] & 15) | ((lm[:, 4:] & 15) << 4)
    b["d"], b["dmin"] = max_scale / f32(63), max_min / f32(63)
    d = b["d"].astype(f32)[:, None] * ls.astype(f32)                         # [n, 8]: as they will be read
    dm = b["dmin"].astype(f32)[:, None] * lm.astype(f32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.clip(_nearest_int((x.reshape(n, 8, 32) + dm[:, :, None]) / d[:, :, None]), 0, 15)
    L = np.where(d[:, :, None] != 0, q, L).astype(np.uint8)                  # a zero scale keeps the fit's L
    L = L.reshape(n, 4, 2, 32)                                               # 32 bytes: sub-block 2g low, 2g+1 high
    b["qs"] = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(n, 128)
    return b


def _quantize_q6_k(x):  # [n, 256] float32 -> [n] Q6_K blocks (quantize_row_q6_K_ref)
    f32 = np.float32
    n = x.shape[0]
    scales, L = _make_qx_quants(x.reshape(n * 16, 16), 32)
    scales, L = scales.reshape(n, 16), L.reshape(n, 16, 16)                  # [n, 16], [n, 16, 16]
    first = np.abs(scales).argmax(axis=1)[:, None]
    max_scale = np.take_along_axis(scales, first, axis=1)[:, 0]              # [n] signed, first largest
    zero = np.abs(max_scale) < f32(1e-15)
    iscale = f32(-128) / np.where(zero, f32(1), max_scale)
    b = np.zeros(n, Q6_K)
    b["d"] = f32(1) / iscale
    b["scales"] = np.minimum(127, _nearest_int(iscale[:, None] * scales))
    d = b["d"].astype(f32)[:, None] * b["scales"].astype(f32)                # [n, 16]: as they will be read
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.clip(_nearest_int(x.reshape(n, 16, 16) / d[:, :, None]), -32, 31) + 32
    L = np.where(d[:, :, None] != 0, q, L).reshape(n, 2, 4, 32).astype(np.uint8)  # halves of 128, runs of 32
    ql = (L[:, :, 0:2] & 15) | ((L[:, :, 2:4] & 15) << 4)                    # [n, 2, 2, 32]: runs 0,1 low; 2,3 high
    qh = (L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6)
    b["ql"], b["qh"] = ql.reshape(n, 128), qh.reshape(n, 64)
    b[zero] = np.zeros(1, Q6_K)                                              # an all-zero super-block: all bytes 0
    return b
