"""The fused quantized matmul: keep a GGUF matrix as its quantized blocks and dequantize inside the product.

The reference path (`quant.dequantize` at load) turns SmolLM2's 98 MB of blocks into 540 MB of float32 and
then reads all of it for every token. Here a matrix stays as the file's own blocks: a view into the
memory-mapped GGUF, so a page of weights costs RAM only once something reads it. Each product unpacks the
weights it needs:

    one row of x (decoding): for each output row r, block by block (32 weights, see quant.py for the formats)
        Q8_0:  y[r] += d * (q . x[b])                      q int8
        Q4_0:  y[r] += d * ((q - 8) . x[b])                q 4-bit
        Q4_1:  y[r] += d * (q . x[b]) + m * sum(x[b])      q 4-bit; sum(x[b]) once per call, not once per
                                                           row (llama.cpp's trick): the minimum m costs one
                                                           multiply-add per block
        The 32 weights are unpacked in registers and never written to memory; four rows go through each block
        of x together, so the loads of x are shared and the four sums overlap in the CPU.
    many rows of x (prefill, the vision tower): dequantize a tile of rows to float32, exactly as quant.py does,
        then x @ tile.T by BLAS sgemm. Each weight is unpacked once and used by all T rows of x; for T beyond
        a handful, sgemm is much faster than any loop here.

Engines: with numba (a dependency of tinyllava), the loops below are compiled to machine code
(parallel over output rows, cached on disk after the first compilation). Without numba (or with
`fused.ENGINE = "numpy"`, or TINYLLAVA_NO_NUMBA=1) every product goes through the dequantized tiles and NumPy:
the same numbers up to float32 rounding and the same memory, but decoding dequantizes every matrix for every
token, far slower than the float32 reference path. The README's "Speed and memory" has the measurements
behind each choice here.

A block layout is read from quant.py's structured dtypes (its size, where d, m and the quants sit), so a
kernel below names fields, not byte offsets. To add a format: its dtype in quant.py (see there), a `dot4_*`
and a branch of `dequantize_rows` here, and its kernel id in KERNELS.

    from tinyllava import fused
    model = Llama.load(path, load_matrix=fused.QuantMatrix.from_tensor)   # llama.py's blocks on these products
    model, tok = load_decoder(quantized=True)   # model.py: a FusedLlama, each token one compiled call

The threads the loops run on are runtime.THREADS (runtime.py decides them for numba and OpenBLAS together).
"""
import os
import threading

import numpy as np

from . import quant, runtime
from .errors import TinyLlavaError
from .quant import GGMLType

KERNELS = {GGMLType.Q8_0: 0, GGMLType.Q4_0: 1, GGMLType.Q4_1: 2, GGMLType.Q5_0: 3, GGMLType.Q4_K: 4,
           GGMLType.Q6_K: 5}  # the types computed here, and each one's id
K_Q8_0, K_Q4_0, K_Q4_1, K_Q5_0, K_Q4_K, K_Q6_K = range(6)
INT8 = 8  # kernel id + INT8: the same type's integer kernel, on 8-bit activations (see "Integer products" above)


def offset(dtype, field):  # where a field of a block starts, in bytes
    return dtype.fields[field][1]


# block layouts, from quant.py's dtypes (numba freezes these module constants into the compiled loops)
Q8_0_BYTES, Q8_0_D, Q8_0_QS = quant.Q8_0.itemsize, offset(quant.Q8_0, "d"), offset(quant.Q8_0, "qs")
Q4_0_BYTES, Q4_0_D, Q4_0_QS = quant.Q4_0.itemsize, offset(quant.Q4_0, "d"), offset(quant.Q4_0, "qs")
Q4_1_BYTES, Q4_1_D, Q4_1_M, Q4_1_QS = (quant.Q4_1.itemsize, offset(quant.Q4_1, "d"), offset(quant.Q4_1, "m"),
                                       offset(quant.Q4_1, "qs"))
Q5_0_BYTES, Q5_0_D, Q5_0_QH, Q5_0_QS = (quant.Q5_0.itemsize, offset(quant.Q5_0, "d"), offset(quant.Q5_0, "qh"),
                                        offset(quant.Q5_0, "qs"))
Q4_K_BYTES, Q4_K_D, Q4_K_DMIN, Q4_K_SCALES, Q4_K_QS = (quant.Q4_K.itemsize, *(offset(quant.Q4_K, f) for f in
                                                                               ("d", "dmin", "scales", "qs")))
Q6_K_BYTES, Q6_K_QL, Q6_K_QH, Q6_K_SCALES, Q6_K_D = (quant.Q6_K.itemsize, *(offset(quant.Q6_K, f) for f in
                                                                             ("ql", "qh", "scales", "d")))
QK = quant.BLOCK_SIZE[GGMLType.Q8_0][0]    # weights per block: 32, and per sub-block of Q4_K
QK_K = quant.BLOCK_SIZE[GGMLType.Q4_K][0]  # weights per super-block of the K-quants: 256

MATVEC_MAX_ROWS = 8     # up to this many rows of x, the fused loop; above, dequantized tiles and sgemm
TILE_BYTES = 4 << 20    # float32 bytes of one dequantized tile: bounds the extra memory of a product
AHEAD = 4096            # bytes of weights to prefetch ahead of the fused loop
PARALLEL_MIN = 1 << 18  # weights: a smaller matrix is one thread's work (starting the threads costs more)
# numba's OpenMP threads spin a while between parallel loops, as OpenMP does by default, and that is kept:
# decoding runs ~150 short loops per token, and waking sleeping threads for each is slow.


def release_memory():
    """Drop this thread's tile buffer and give the heap's free pages back to the system. After a prefill: the
    decoding steps use neither, and the peak RSS comes while they run, once the output product has read the last
    of the decoder's pages."""
    _local.buf = None
    runtime.trim_memory()


try:  # numba compiles the loops below; without it they stay Python and only the NumPy path is used
    import numba
except ImportError:
    numba = None

ENGINE = "numba" if numba and not os.environ.get("TINYLLAVA_NO_NUMBA") else "numpy"  # the tests flip it
if numba:
    from . import simd
    from .simd import f16, prefetch  # intrinsics: one instruction each (simd.py)
# With TINYLLAVA_INTEGER_KERNELS=1, decoding multiplies integers where the CPU multiplies bytes (x86 with AVX2 or
# VNNI: simd.INSTRUCTIONS). Not the default: the compiled one-token step and the batched products do not yet give
# the same logits on them (README, "Integer products on x86"). Chosen once per process (the tests flip it).
INTEGER = (ENGINE == "numba" and simd.INSTRUCTIONS is not None
           and os.environ.get("TINYLLAVA_INTEGER_KERNELS") == "1")


def jit(**options):  # numba.njit(cache=True, nogil=True, boundscheck=False, **options), or nothing
    if numba is None:
        return lambda f: f
    return numba.njit(cache=True, nogil=True, boundscheck=False, **options)


prange = numba.prange if numba else range


# -- the loops: plain Python that numba compiles (never run uncompiled: far too slow) ------------------------
@jit(inline="always")
def f32(i):  # a small integer -> float32, through int32: numba computes integers in int64, and converting int64
    return np.float32(np.int32(i))  # to float is slower than int32 in the vector units


@jit(inline="always")
def prefetch_ahead(flat, start, n):  # prefetch bytes start..start+n (n <= 192) of the flat matrix, if there
    """The hardware prefetcher alone leaves the loop below waiting for memory: the matrix is read once per
    token, from RAM, in four interleaved streams. So the loop asks for the bytes AHEAD further on itself."""
    last = flat.shape[0] - 1
    prefetch(flat, min(start, last))
    prefetch(flat, min(start + 64, last))
    if n > 128:
        prefetch(flat, min(start + 128, last))


# Each dot4 computes four consecutive rows of W (from row r) times x, block by block. The four rows go through
# each block of x together: the loads of x are shared and the four sums overlap in the CPU. `half` is always
# 16; it is passed at run time so that the compiler vectorizes the loop over one block's bytes instead of
# unrolling it and vectorizing across blocks with slow gathers.
@jit(inline="always", fastmath=True)  # fastmath: the sums may be reordered and use fused multiply-adds
def dot4_q8_0(w, flat, r, x, xsum, half):  # w [n_out, row bytes] uint8, rows r..r+3, x [n_in] -> 4 x float32
    w0, w1, w2, w3 = w[r], w[r + 1], w[r + 2], w[r + 3]
    ahead = r * w.shape[1] + AHEAD
    a0 = a1 = a2 = a3 = np.float32(0)
    for b in range(x.shape[0] // QK):
        o, xb = Q8_0_BYTES * b, x[QK * b:QK * b + QK]        # a block: scale d (float16), 32 int8 weights
        prefetch_ahead(flat, ahead + 4 * Q8_0_BYTES * b, 4 * Q8_0_BYTES)  # the four rows' blocks b, further on
        e = o + Q8_0_BYTES
        b0, b1, b2, b3 = w0[o:e], w1[o:e], w2[o:e], w3[o:e]
        s0 = s1 = s2 = s3 = np.float32(0)
        for j in range(2 * half):
            s0 += f32(np.int8(b0[Q8_0_QS + j])) * xb[j]
            s1 += f32(np.int8(b1[Q8_0_QS + j])) * xb[j]
            s2 += f32(np.int8(b2[Q8_0_QS + j])) * xb[j]
            s3 += f32(np.int8(b3[Q8_0_QS + j])) * xb[j]
        a0 += f16(b0, Q8_0_D) * s0
        a1 += f16(b1, Q8_0_D) * s1
        a2 += f16(b2, Q8_0_D) * s2
        a3 += f16(b3, Q8_0_D) * s3
    return a0, a1, a2, a3


@jit(inline="always", fastmath=True)
def dot4_q4_0(w, flat, r, x, xsum, half):  # weight = d * (q - 8)
    w0, w1, w2, w3 = w[r], w[r + 1], w[r + 2], w[r + 3]
    ahead = r * w.shape[1] + AHEAD
    a0 = a1 = a2 = a3 = np.float32(0)
    for b in range(x.shape[0] // QK):
        o, xb = Q4_0_BYTES * b, x[QK * b:QK * b + QK]        # a block: d, then 16 bytes of two 4-bit weights
        prefetch_ahead(flat, ahead + 4 * Q4_0_BYTES * b, 4 * Q4_0_BYTES)  # the four rows' blocks b, further on
        e = o + Q4_0_BYTES
        b0, b1, b2, b3 = w0[o:e], w1[o:e], w2[o:e], w3[o:e]
        s0 = s1 = s2 = s3 = np.float32(0)
        for j in range(half):                                  # byte j: weight j (low nibble), j + 16 (high)
            lo, hi = xb[j], xb[half + j]
            q = np.int32(b0[Q4_0_QS + j]); s0 += f32(q & 15) * lo + f32(q >> 4) * hi  # noqa: E702
            q = np.int32(b1[Q4_0_QS + j]); s1 += f32(q & 15) * lo + f32(q >> 4) * hi  # noqa: E702
            q = np.int32(b2[Q4_0_QS + j]); s2 += f32(q & 15) * lo + f32(q >> 4) * hi  # noqa: E702
            q = np.int32(b3[Q4_0_QS + j]); s3 += f32(q & 15) * lo + f32(q >> 4) * hi  # noqa: E702
        xs8 = np.float32(8) * xsum[b]                          # the -8 of every weight: d * 8 * sum(x[b])
        a0 += f16(b0, Q4_0_D) * (s0 - xs8)
        a1 += f16(b1, Q4_0_D) * (s1 - xs8)
        a2 += f16(b2, Q4_0_D) * (s2 - xs8)
        a3 += f16(b3, Q4_0_D) * (s3 - xs8)
    return a0, a1, a2, a3


@jit(inline="always", fastmath=True)
def dot4_q4_1(w, flat, r, x, xsum, half):  # weight = d * q + m
    w0, w1, w2, w3 = w[r], w[r + 1], w[r + 2], w[r + 3]
    ahead = r * w.shape[1] + AHEAD
    a0 = a1 = a2 = a3 = np.float32(0)
    for b in range(x.shape[0] // QK):
        o, xb = Q4_1_BYTES * b, x[QK * b:QK * b + QK]        # a block: d, m, then 16 bytes of 4-bit weights
        prefetch_ahead(flat, ahead + 4 * Q4_1_BYTES * b, 4 * Q4_1_BYTES)  # the four rows' blocks b, further on
        e = o + Q4_1_BYTES
        b0, b1, b2, b3 = w0[o:e], w1[o:e], w2[o:e], w3[o:e]
        s0 = s1 = s2 = s3 = np.float32(0)
        for j in range(half):
            lo, hi = xb[j], xb[half + j]
            q = np.int32(b0[Q4_1_QS + j]); s0 += f32(q & 15) * lo + f32(q >> 4) * hi  # noqa: E702
            q = np.int32(b1[Q4_1_QS + j]); s1 += f32(q & 15) * lo + f32(q >> 4) * hi  # noqa: E702
            q = np.int32(b2[Q4_1_QS + j]); s2 += f32(q & 15) * lo + f32(q >> 4) * hi  # noqa: E702
            q = np.int32(b3[Q4_1_QS + j]); s3 += f32(q & 15) * lo + f32(q >> 4) * hi  # noqa: E702
        xs = xsum[b]                                           # m * sum(x[b]): the minimum, once per block
        a0 += f16(b0, Q4_1_D) * s0 + f16(b0, Q4_1_M) * xs
        a1 += f16(b1, Q4_1_D) * s1 + f16(b1, Q4_1_M) * xs
        a2 += f16(b2, Q4_1_D) * s2 + f16(b2, Q4_1_M) * xs
        a3 += f16(b3, Q4_1_D) * s3 + f16(b3, Q4_1_M) * xs
    return a0, a1, a2, a3


@jit(inline="always")
def uint32(b, o):  # the little-endian uint32 at b[o:o+4] (Q5_0's fifth bits)
    return np.int64(b[o]) | np.int64(b[o + 1]) << 8 | np.int64(b[o + 2]) << 16 | np.int64(b[o + 3]) << 24


@jit(inline="always", fastmath=True)
def dot4_q5_0(w, flat, r, x, xsum, half):  # weight = d * (q - 16), q = the nibble + 16 * its bit of qh
    w0, w1, w2, w3 = w[r], w[r + 1], w[r + 2], w[r + 3]
    ahead = r * w.shape[1] + AHEAD
    a0 = a1 = a2 = a3 = np.float32(0)
    for b in range(x.shape[0] // QK):
        o, xb = Q5_0_BYTES * b, x[QK * b:QK * b + QK]        # a block: d, the 32 fifth bits, 16 bytes of nibbles
        prefetch_ahead(flat, ahead + 4 * Q5_0_BYTES * b, 4 * Q5_0_BYTES)
        e = o + Q5_0_BYTES
        b0, b1, b2, b3 = w0[o:e], w1[o:e], w2[o:e], w3[o:e]
        h0, h1, h2, h3 = uint32(b0, Q5_0_QH), uint32(b1, Q5_0_QH), uint32(b2, Q5_0_QH), uint32(b3, Q5_0_QH)
        s0 = s1 = s2 = s3 = np.float32(0)
        for j in range(half):
            lo, hi = xb[j], xb[half + j]
            q = np.int32(b0[Q5_0_QS + j]); s0 += f32(q & 15 | (h0 >> j & 1) << 4) * lo + f32(q >> 4 | (h0 >> (j + 16) & 1) << 4) * hi  # noqa: E501,E702
            q = np.int32(b1[Q5_0_QS + j]); s1 += f32(q & 15 | (h1 >> j & 1) << 4) * lo + f32(q >> 4 | (h1 >> (j + 16) & 1) << 4) * hi  # noqa: E501,E702
            q = np.int32(b2[Q5_0_QS + j]); s2 += f32(q & 15 | (h2 >> j & 1) << 4) * lo + f32(q >> 4 | (h2 >> (j + 16) & 1) << 4) * hi  # noqa: E501,E702
            q = np.int32(b3[Q5_0_QS + j]); s3 += f32(q & 15 | (h3 >> j & 1) << 4) * lo + f32(q >> 4 | (h3 >> (j + 16) & 1) << 4) * hi  # noqa: E501,E702
        xs16 = np.float32(16) * xsum[b]                        # the -16 of every weight
        a0 += f16(b0, Q5_0_D) * (s0 - xs16)
        a1 += f16(b1, Q5_0_D) * (s1 - xs16)
        a2 += f16(b2, Q5_0_D) * (s2 - xs16)
        a3 += f16(b3, Q5_0_D) * (s3 - xs16)
    return a0, a1, a2, a3


# The K-quants go one row at a time: each super-block of 256 first unpacks its row's 8 or 16 sub-block scales,
# which four rows at once would keep in more registers than x86 has.
@jit(inline="always")
def scale_min_k4(b, o, j):  # Q4_K sub-block j's 6-bit scale and minimum, from the 12 bytes at b[o:] (ggml's
    if j < 4:                                                                  # get_scale_min_k4)
        return np.int32(b[o + j] & 63), np.int32(b[o + j + 4] & 63)
    return (np.int32((b[o + j + 4] & 15) | ((b[o + j - 4] >> 6) << 4)),
            np.int32((b[o + j + 4] >> 4) | ((b[o + j] >> 6) << 4)))


@jit(fastmath=True)  # not inlined: one copy for the four rows of dot4
def dot_q4_k(w, flat, r, x, xsum, half):  # row r . x; weight = d * sc * q - dmin * m, per sub-block of 32
    row, start, a = w[r], r * w.shape[1], np.float32(0)
    for s in range(x.shape[0] // QK_K):
        o = Q4_K_BYTES * s
        prefetch_ahead(flat, start + o + AHEAD, Q4_K_BYTES)
        d, dmin = f16(row, o + Q4_K_D), f16(row, o + Q4_K_DMIN)
        for c in range(4):                                     # 32 bytes: sub-block 2c low nibbles, 2c + 1 high
            sc0, m0 = scale_min_k4(row, o + Q4_K_SCALES, 2 * c)
            sc1, m1 = scale_min_k4(row, o + Q4_K_SCALES, 2 * c + 1)
            qs, xb = o + Q4_K_QS + 32 * c, QK_K * s + 64 * c
            s0 = s1 = np.float32(0)
            for j in range(2 * half):
                q = np.int32(row[qs + j])
                s0 += f32(q & 15) * x[xb + j]
                s1 += f32(q >> 4) * x[xb + 32 + j]
            sub = 8 * s + 2 * c                                # sub-blocks of 32 = blocks of xsum
            a += d * (f32(sc0) * s0 + f32(sc1) * s1) - dmin * (f32(m0) * xsum[sub] + f32(m1) * xsum[sub + 1])
    return a


@jit(fastmath=True)  # not inlined: one copy for the four rows of dot4
def dot_q6_k(w, flat, r, x, xsum, half):  # row r . x; weight = d * sc * (q - 32), per sub-block of 16
    row, start, a = w[r], r * w.shape[1], np.float32(0)
    for s in range(x.shape[0] // QK_K):
        o = Q6_K_BYTES * s
        prefetch_ahead(flat, start + o + AHEAD, 192)
        d = f16(row, o + Q6_K_D)
        for h in range(2):                                     # a half: 64 bytes of ql, 32 of qh, 8 scales
            ql, qh, sc, xb = o + Q6_K_QL + 64 * h, o + Q6_K_QH + 32 * h, o + Q6_K_SCALES + 8 * h, QK_K * s + 128 * h
            for g in range(2):                                 # weights l = 16g..16g+15 of each run of 32
                s0 = s1 = s2 = s3 = np.float32(0)
                for j in range(half):
                    l = 16 * g + j
                    lo, hi, top = np.int32(row[ql + l]), np.int32(row[ql + 32 + l]), np.int32(row[qh + l])
                    s0 += f32((lo & 15 | (top & 3) << 4) - 32) * x[xb + l]
                    s1 += f32((hi & 15 | (top >> 2 & 3) << 4) - 32) * x[xb + 32 + l]
                    s2 += f32((lo >> 4 | (top >> 4 & 3) << 4) - 32) * x[xb + 64 + l]
                    s3 += f32((hi >> 4 | (top >> 6) << 4) - 32) * x[xb + 96 + l]
                a += d * (f32(np.int8(row[sc + g])) * s0 + f32(np.int8(row[sc + g + 2])) * s1 +
                          f32(np.int8(row[sc + g + 4])) * s2 + f32(np.int8(row[sc + g + 6])) * s3)
    return a


@jit(fastmath=True)  # not inlined: compiled once for every product that calls it (numba is slow to compile)
def dot4(w, flat, r, x, xsum, kind, half):  # rows r..r+3 of W . x, in float32 -> 4 x float32
    if kind == K_Q4_1:
        return dot4_q4_1(w, flat, r, x, xsum, half)
    if kind == K_Q4_0:
        return dot4_q4_0(w, flat, r, x, xsum, half)
    if kind == K_Q5_0:
        return dot4_q5_0(w, flat, r, x, xsum, half)
    if kind == K_Q4_K:
        return (dot_q4_k(w, flat, r, x, xsum, half), dot_q4_k(w, flat, r + 1, x, xsum, half),
                dot_q4_k(w, flat, r + 2, x, xsum, half), dot_q4_k(w, flat, r + 3, x, xsum, half))
    if kind == K_Q6_K:
        return (dot_q6_k(w, flat, r, x, xsum, half), dot_q6_k(w, flat, r + 1, x, xsum, half),
                dot_q6_k(w, flat, r + 2, x, xsum, half), dot_q6_k(w, flat, r + 3, x, xsum, half))
    return dot4_q8_0(w, flat, r, x, xsum, half)


# -- Integer products: llama.cpp's way of decoding ------------------------------------------------------------
# x is quantized once per product, per block of 32, as llama.cpp's Q8_1: xq = round(x / xd) in int8, with
# xd = max |x| / 127, and xs = xd * sum(xq) (the block's sum, for the formats with an offset or a minimum). Then
# each block of the weights is an exact integer dot product with xq (simd.py: one or two instructions for 32
# pairs of bytes), scaled once: Q8_0's d * (q . x) becomes d * xd * (q . xq). The weights stay the file's
# integers; what changes is x, rounded to 8 bits (the README measures what that does to the logits).
@jit(inline="always", fastmath=True)
def quantize_activations(x):  # x [M, n_in] float32 -> xq [M, n_in] int8, xd, xs [M, n_in / 32] float32
    xq = np.empty(x.shape, np.int8)
    xd, xs = np.empty((x.shape[0], x.shape[1] // QK), np.float32), np.empty((x.shape[0], x.shape[1] // QK), np.float32)
    for i in range(x.shape[0]):
        for b in range(x.shape[1] // QK):
            top = np.float32(0)
            for j in range(QK):
                top = max(top, abs(x[i, QK * b + j]))
            inv = np.float32(127) / top if top > 0 else np.float32(0)
            total = 0
            for j in range(QK):
                q = np.int32(np.rint(x[i, QK * b + j] * inv))
                xq[i, QK * b + j] = q
                total += q
            xd[i, b] = top / np.float32(127)
            xs[i, b] = xd[i, b] * np.float32(total)
    return xq, xd, xs


# The integer kernels read the weights through `flat` (the matrix's bytes in one row, rb bytes a row of W) and
# x's 8-bit form through xq, xd, xs and its row i, at offsets: no array views, whose reference counts numba would
# update for every group of rows. simd's dot4_ intrinsics take four rows of W at once and sum their lanes together.
@jit(inline="always", fastmath=True)
def idot4_q8_0(flat, rb, r, xq, xd, xs, i):  # rows r..r+3 of W . row i of x, from its 8-bit form -> 4 x float32
    a0 = a1 = a2 = a3 = np.float32(0)
    base, xo = r * rb, i * xq.shape[1]
    for b in range(xd.shape[1]):
        o = base + Q8_0_BYTES * b                              # row r's block b; row r + k's is rb * k further
        prefetch_ahead(flat, o + 3 * rb + AHEAD, Q8_0_BYTES)
        i0, i1, i2, i3 = simd.dot4_q8_0(flat, o + Q8_0_QS, rb, xq, xo + QK * b)
        dx = xd[i, b]
        a0 += f16(flat, o + Q8_0_D) * dx * f32(i0)
        a1 += f16(flat, o + rb + Q8_0_D) * dx * f32(i1)
        a2 += f16(flat, o + 2 * rb + Q8_0_D) * dx * f32(i2)
        a3 += f16(flat, o + 3 * rb + Q8_0_D) * dx * f32(i3)
    return a0, a1, a2, a3


@jit(inline="always", fastmath=True)
def idot4_q4_0(flat, rb, r, xq, xd, xs, i):  # weight d (q - 8): d (xd (q . xq) - 8 xs)
    a0 = a1 = a2 = a3 = np.float32(0)
    base, xo = r * rb, i * xq.shape[1]
    for b in range(xd.shape[1]):
        o = base + Q4_0_BYTES * b
        prefetch_ahead(flat, o + 3 * rb + AHEAD, Q4_0_BYTES)
        i0, i1, i2, i3 = simd.dot4_q4(flat, o + Q4_0_QS, rb, xq, xo + QK * b)
        dx, xs8 = xd[i, b], np.float32(8) * xs[i, b]
        a0 += f16(flat, o + Q4_0_D) * (dx * f32(i0) - xs8)
        a1 += f16(flat, o + rb + Q4_0_D) * (dx * f32(i1) - xs8)
        a2 += f16(flat, o + 2 * rb + Q4_0_D) * (dx * f32(i2) - xs8)
        a3 += f16(flat, o + 3 * rb + Q4_0_D) * (dx * f32(i3) - xs8)
    return a0, a1, a2, a3


@jit(inline="always", fastmath=True)
def idot4_q4_1(flat, rb, r, xq, xd, xs, i):  # weight d q + m: d xd (q . xq) + m xs
    a0 = a1 = a2 = a3 = np.float32(0)
    base, xo = r * rb, i * xq.shape[1]
    for b in range(xd.shape[1]):
        o = base + Q4_1_BYTES * b
        prefetch_ahead(flat, o + 3 * rb + AHEAD, Q4_1_BYTES)
        i0, i1, i2, i3 = simd.dot4_q4(flat, o + Q4_1_QS, rb, xq, xo + QK * b)
        dx, s = xd[i, b], xs[i, b]
        a0 += f16(flat, o + Q4_1_D) * dx * f32(i0) + f16(flat, o + Q4_1_M) * s
        a1 += f16(flat, o + rb + Q4_1_D) * dx * f32(i1) + f16(flat, o + rb + Q4_1_M) * s
        a2 += f16(flat, o + 2 * rb + Q4_1_D) * dx * f32(i2) + f16(flat, o + 2 * rb + Q4_1_M) * s
        a3 += f16(flat, o + 3 * rb + Q4_1_D) * dx * f32(i3) + f16(flat, o + 3 * rb + Q4_1_M) * s
    return a0, a1, a2, a3


@jit(inline="always", fastmath=True)
def idot4_q5_0(flat, rb, r, xq, xd, xs, i):  # weight d (q - 16): d (xd (q . xq) - 16 xs)
    a0 = a1 = a2 = a3 = np.float32(0)
    base, xo = r * rb, i * xq.shape[1]
    for b in range(xd.shape[1]):
        o = base + Q5_0_BYTES * b
        prefetch_ahead(flat, o + 3 * rb + AHEAD, Q5_0_BYTES)
        i0, i1, i2, i3 = simd.dot4_q5_0(flat, o + Q5_0_QS, rb, o + Q5_0_QH, xq, xo + QK * b)
        dx, xs16 = xd[i, b], np.float32(16) * xs[i, b]
        a0 += f16(flat, o + Q5_0_D) * (dx * f32(i0) - xs16)
        a1 += f16(flat, o + rb + Q5_0_D) * (dx * f32(i1) - xs16)
        a2 += f16(flat, o + 2 * rb + Q5_0_D) * (dx * f32(i2) - xs16)
        a3 += f16(flat, o + 3 * rb + Q5_0_D) * (dx * f32(i3) - xs16)
    return a0, a1, a2, a3


@jit(fastmath=True)  # not inlined: one copy for the four rows of idot4
def idot_q4_k(flat, rb, r, xq, xd, xs, i):  # row r: per sub-block j, d sc_j xd_j (q . xq) - dmin m_j xs_j
    a, base, xo = np.float32(0), r * rb, i * xq.shape[1]
    for s in range(xq.shape[1] // QK_K):
        o = base + Q4_K_BYTES * s
        prefetch_ahead(flat, o + AHEAD, Q4_K_BYTES)
        d, dmin = f16(flat, o + Q4_K_D), f16(flat, o + Q4_K_DMIN)
        for c in range(4):                                     # 32 bytes: sub-block 2c low nibbles, 2c + 1 high
            sc0, m0 = scale_min_k4(flat, o + Q4_K_SCALES, 2 * c)
            sc1, m1 = scale_min_k4(flat, o + Q4_K_SCALES, 2 * c + 1)
            i0, i1 = simd.dot_q4_k(flat, o + Q4_K_QS + 32 * c, xq, xo + QK_K * s + 64 * c)
            sub = 8 * s + 2 * c
            a += d * (f32(sc0) * xd[i, sub] * f32(i0) + f32(sc1) * xd[i, sub + 1] * f32(i1)) - \
                dmin * (f32(m0) * xs[i, sub] + f32(m1) * xs[i, sub + 1])
    return a


@jit(fastmath=True)  # not inlined: one copy for the four rows of idot4
def idot_q6_k(flat, rb, r, xq, xd, xs, i):  # row r: per run of 32, d xd (sc_a (q - 32) . xq + sc_b ...), 16 each
    a, base, xo = np.float32(0), r * rb, i * xq.shape[1]
    for s in range(xq.shape[1] // QK_K):
        o = base + Q6_K_BYTES * s
        prefetch_ahead(flat, o + AHEAD, 192)
        d = f16(flat, o + Q6_K_D)
        for h in range(2):                                     # a half: 64 bytes of ql, 32 of qh, 8 scales
            sc = o + Q6_K_SCALES + 8 * h
            for k in range(4):                                 # runs of 32 weights, two scales each
                i0, i1 = simd.dot_q6_k(flat, o + Q6_K_QL + 64 * h, o + Q6_K_QH + 32 * h, k, xq,
                                       xo + QK_K * s + 128 * h + 32 * k)
                isum = np.int32(np.int8(flat[sc + 2 * k])) * i0 + np.int32(np.int8(flat[sc + 2 * k + 1])) * i1
                a += d * xd[i, 8 * s + 4 * h + k] * f32(isum)
    return a


@jit(fastmath=True)  # not inlined, as dot4
def idot4(flat, rb, r, xq, xd, xs, i, kind):  # rows r..r+3 of W . row i of x, from its 8-bit form -> 4 x float32
    if kind == K_Q4_1:
        return idot4_q4_1(flat, rb, r, xq, xd, xs, i)
    if kind == K_Q4_0:
        return idot4_q4_0(flat, rb, r, xq, xd, xs, i)
    if kind == K_Q5_0:
        return idot4_q5_0(flat, rb, r, xq, xd, xs, i)
    if kind == K_Q4_K:
        return (idot_q4_k(flat, rb, r, xq, xd, xs, i), idot_q4_k(flat, rb, r + 1, xq, xd, xs, i),
                idot_q4_k(flat, rb, r + 2, xq, xd, xs, i), idot_q4_k(flat, rb, r + 3, xq, xd, xs, i))
    if kind == K_Q6_K:
        return (idot_q6_k(flat, rb, r, xq, xd, xs, i), idot_q6_k(flat, rb, r + 1, xq, xd, xs, i),
                idot_q6_k(flat, rb, r + 2, xq, xd, xs, i), idot_q6_k(flat, rb, r + 3, xq, xd, xs, i))
    return idot4_q8_0(flat, rb, r, xq, xd, xs, i)


# -- the products --------------------------------------------------------------------------------------------
@jit(inline="always", fastmath=True)
def block_sums(x):  # [M, n_in] -> [M, n_in / 32]: the sum of each block of x (for the offsets and minimums)
    """Plain loops, no `x[...].sum()`: in a parallel function numba makes each such sum a parallel loop of its
    own, and starting one per block cost more than the product (the README's "Speed and memory")."""
    xsum = np.empty((x.shape[0], x.shape[1] // QK), np.float32)
    for i in range(x.shape[0]):
        for b in range(x.shape[1] // QK):
            s = np.float32(0)
            for j in range(QK):
                s += x[i, QK * b + j]
            xsum[i, b] = s
    return xsum


@jit(inline="always", fastmath=True)
def activations(x, kind):  # x [M, n_in] -> what the kernels read: (xq, xd, xsum)
    """For an integer kernel (kind >= INT8) x's 8-bit form: xq int8 [M, n_in], xd and xs [M, n_in / 32]; for a
    float one nothing in xq and xd, and the block sums of x."""
    if kind >= INT8:
        return quantize_activations(x)
    return np.empty((x.shape[0], 0), np.int8), np.empty((x.shape[0], 0), np.float32), block_sums(x)


@jit(inline="always", fastmath=True)
def matvec_group(w, flat, x, act, y, g, kind, half):  # rows 4g..4g+3 of y = x @ W.T, for every row of x
    r = min(4 * g, w.shape[0] - 4)                             # the last group may overlap the one before
    xq, xd, xsum = act
    for i in range(x.shape[0]):
        if kind >= INT8:
            a = idot4(flat, w.shape[1], r, xq, xd, xsum, i, kind - INT8)
        else:
            a = dot4(w, flat, r, x[i], xsum[i], kind, half)
        y[i, r], y[i, r + 1], y[i, r + 2], y[i, r + 3] = a


@jit(parallel=True, fastmath=True)
def matvec(w, x, y, kind, half):  # w [n_out, row bytes] uint8, x [M, n_in], y [M, n_out] float32
    act, flat = activations(x, kind), w.reshape(-1)            # flat: the same bytes, one after the other
    for g in prange((w.shape[0] + 3) // 4):                    # groups of 4 rows, shared among the threads
        matvec_group(w, flat, x, act, y, g, kind, half)


@jit(fastmath=True)
def matvec_1thread(w, x, y, kind, half):  # the same, without numba's thread pool (one thread: its start
    act, flat = activations(x, kind), w.reshape(-1)  # and finish would cost more than a small product)
    for g in range((w.shape[0] + 3) // 4):
        matvec_group(w, flat, x, act, y, g, kind, half)


@jit()
def dequantize_rows(w, out, kind, half):  # w [n, row bytes] uint8 -> out [n, n_in] float32
    """The same float32 numbers as quant.dequantize, bit for bit (the products and sums round the same way).
    On one thread: splitting it would hand the cores back and forth between numba's threads and OpenBLAS's
    (sgemm comes next) for a small part of a prefill."""
    per = QK_K if kind == K_Q4_K or kind == K_Q6_K else QK
    bb = w.shape[1] * per // out.shape[1]                      # bytes per block
    for r in range(w.shape[0]):
        for b in range(out.shape[1] // per):
            blk, o = w[r, b * bb:b * bb + bb], out[r, per * b:per * b + per]
            if kind == K_Q8_0:
                d = f16(blk, Q8_0_D)
                for j in range(2 * half):
                    o[j] = d * np.float32(np.int8(blk[Q8_0_QS + j]))
            elif kind == K_Q4_0:
                d = f16(blk, Q4_0_D)
                for j in range(half):
                    q = np.int32(blk[Q4_0_QS + j])
                    o[j], o[half + j] = d * np.float32((q & 15) - 8), d * np.float32((q >> 4) - 8)
            elif kind == K_Q4_1:
                d, m = f16(blk, Q4_1_D), f16(blk, Q4_1_M)
                for j in range(half):
                    q = np.int32(blk[Q4_1_QS + j])
                    o[j], o[half + j] = d * np.float32(q & 15) + m, d * np.float32(q >> 4) + m
            elif kind == K_Q5_0:
                d, h = f16(blk, Q5_0_D), uint32(blk, Q5_0_QH)
                for j in range(half):
                    q = np.int32(blk[Q5_0_QS + j])
                    o[j] = d * np.float32((q & 15 | (h >> j & 1) << 4) - 16)
                    o[half + j] = d * np.float32((q >> 4 | (h >> (j + 16) & 1) << 4) - 16)
            elif kind == K_Q4_K:
                d, dmin = f16(blk, Q4_K_D), f16(blk, Q4_K_DMIN)
                for c in range(4):
                    for t in range(2):                         # sub-block 2c + t: the low nibbles, then the high
                        sc, m = scale_min_k4(blk, Q4_K_SCALES, 2 * c + t)
                        ds, dm = d * np.float32(sc), dmin * np.float32(m)
                        for j in range(2 * half):
                            o[64 * c + 32 * t + j] = ds * np.float32(blk[Q4_K_QS + 32 * c + j] >> (4 * t) & 15) - dm
            else:  # Q6_K
                d = f16(blk, Q6_K_D)
                for h in range(2):
                    for l in range(2 * half):
                        lo, hi = np.int32(blk[Q6_K_QL + 64 * h + l]), np.int32(blk[Q6_K_QL + 64 * h + 32 + l])
                        top, sc = np.int32(blk[Q6_K_QH + 32 * h + l]), Q6_K_SCALES + 8 * h + l // 16
                        o[128 * h + l] = d * np.float32(np.int8(blk[sc])) * np.float32((lo & 15 | (top & 3) << 4) - 32)
                        o[128 * h + 32 + l] = (d * np.float32(np.int8(blk[sc + 2])) *
                                               np.float32((hi & 15 | (top >> 2 & 3) << 4) - 32))
                        o[128 * h + 64 + l] = (d * np.float32(np.int8(blk[sc + 4])) *
                                               np.float32((lo >> 4 | (top >> 4 & 3) << 4) - 32))
                        o[128 * h + 96 + l] = (d * np.float32(np.int8(blk[sc + 6])) *
                                               np.float32((hi >> 4 | (top >> 6) << 4) - 32))


# -- the matrix ------------------------------------------------------------------------------------------
def readonly(a):  # the same memory as a read-only view: like the file's pages, and one compiled signature for all
    v = a.view()
    v.flags.writeable = False
    return v


class QuantMatrix:
    """A (n_out, n_in) matrix kept as its GGUF blocks, row by row: `w` [n_out, bytes per row] uint8, usually
    a view into the memory-mapped file. `matmul(x)` is x @ W.T, `rows(ids)` is W[ids], both float32."""

    __array_ufunc__ = None  # so that `dy @ W` (NumPy on the left) comes to __rmatmul__

    def __init__(self, w, qtype, shape):
        qtype = GGMLType(qtype)
        if qtype not in KERNELS:
            raise TinyLlavaError(f"the fused matmul supports {', '.join(t.name for t in KERNELS)}, not {qtype.name}")
        n_out, n_in = shape
        if n_in % quant.BLOCK_SIZE[qtype][0] or w.shape != (n_out, quant.nbytes(qtype, (n_in,))) or w.dtype != np.uint8:
            raise TinyLlavaError(f"{qtype.name} {tuple(shape)}: blocks of shape {w.shape} {w.dtype} do not fit")
        self.w, self.type, self.shape = readonly(w), qtype, (int(n_out), int(n_in))

    @classmethod
    def from_tensor(cls, t):  # gguf.GGUFTensor -> QuantMatrix, or a float32 array for unquantized types
        """Use as `Llama.load(path, load_matrix=QuantMatrix.from_tensor)`. F32/F16/BF16 and the types without a
        fused loop here become plain float32 arrays, as on the reference path."""
        if t.type not in KERNELS or len(t.shape) != 2:
            return t.numpy()
        return cls(t.data.reshape(t.shape[0], -1), t.type, t.shape)

    @classmethod
    def quantize(cls, a, qtype):  # float32 [n_out, n_in] -> QuantMatrix (a copy, not a file view)
        return cls(quant.quantize(a, qtype), qtype, a.shape)

    def __repr__(self):
        return f"QuantMatrix({self.type.name}, {self.shape}, {self.w.nbytes / 1e6:.1f} MB)"

    @property
    def nbytes(self):
        return self.w.nbytes

    def dequantize(self, start=0, stop=None):  # rows start:stop -> float32 [stop - start, n_in] (a new array)
        w = self.w[start:stop]
        return self._dequantize(w, np.empty((w.shape[0], self.shape[1]), np.float32))

    def _dequantize(self, w, out):  # some rows' blocks [n, row bytes] -> out [n, n_in] float32
        if ENGINE == "numpy":
            out[...] = quant.dequantize(w, self.type, out.shape)
        else:
            dequantize_rows(w, out, KERNELS[self.type], QK // 2)
        return out

    def tiles(self):  # -> (first row, float32 [rows, n_in]) for tiles of TILE_BYTES, in one reused buffer
        n_out, n_in = self.shape
        step = max(1, min(n_out, TILE_BYTES // (4 * n_in)))
        buf = scratch(step * n_in).reshape(step, n_in)  # reused: a new 4 MB array costs page faults each time
        for r in range(0, n_out, step):
            yield r, self._dequantize(self.w[r:r + step], buf[:min(step, n_out - r)])

    def rows(self, ids):  # int array [...] -> float32 [..., n_in]: the embedding lookup
        ids = np.asarray(ids)
        return self._dequantize(self.w[ids.reshape(-1)], np.empty((ids.size, self.shape[1]), np.float32)
                                ).reshape(*ids.shape, self.shape[1])

    def matmul(self, x):  # [..., n_in] -> [..., n_out] = x @ W.T (float32; float64 stays float64)
        x = np.asarray(x)
        if x.shape[-1] != self.shape[1]:
            raise TinyLlavaError(f"x [..., {x.shape[-1]}] @ W.T: W is {self.shape}")
        dtype = np.float64 if x.dtype == np.float64 else np.float32
        x2 = x.reshape(-1, self.shape[1])                                               # [M, n_in]
        if x2.dtype != dtype or not (x2.flags.c_contiguous and x2.flags.writeable):    # (one compiled signature)
            x2 = np.array(x2, dtype, order="C")
        if ENGINE == "numba" and dtype == np.float32 and x2.shape[0] <= MATVEC_MAX_ROWS and self.shape[0] >= 4:
            y = np.empty((x2.shape[0], self.shape[0]), dtype)                           # [M, n_out]
            parallel = runtime.THREADS > 1 and self.shape[0] * self.shape[1] >= PARALLEL_MIN
            kind = KERNELS[self.type] + (INT8 if INTEGER else 0)
            (matvec if parallel else matvec_1thread)(self.w, x2, y, kind, QK // 2)
        else:  # many rows: a tile of W at a time in float32, times all of x by BLAS (sgemm)
            y = None
            for r, tile in self.tiles():
                if y is None and len(tile) == self.shape[0]:                            # one tile: all of W
                    y = x2 @ tile.T.astype(dtype, copy=False)                           # [M, n_out]
                    break
                if y is None:
                    y = np.empty((x2.shape[0], self.shape[0]), dtype)                   # [M, n_out]
                np.matmul(x2, tile.T.astype(dtype, copy=False), out=y[:, r:r + len(tile)])  # [M, rows]
        return y.reshape(*x.shape[:-1], self.shape[0])

    def __rmatmul__(self, dy):  # dy [..., n_out] @ W -> [..., n_in]: the backward of a frozen linear layer
        dy2 = np.asarray(dy).reshape(-1, self.shape[0])                                # [M, n_out]
        dx = np.zeros((dy2.shape[0], self.shape[1]), np.result_type(dy2.dtype, np.float32))
        for r, tile in self.tiles():
            dx += dy2[:, r:r + len(tile)] @ tile                                        # [M, n_in]
        return dx.reshape(*np.shape(dy)[:-1], self.shape[1])


_local = threading.local()


def scratch(n):  # a float32 buffer of n numbers, this thread's, reused by every product
    if getattr(_local, "buf", None) is None or _local.buf.size < n:
        _local.buf = np.empty(n, np.float32)
    return _local.buf[:n]
