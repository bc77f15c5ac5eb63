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

KERNELS = {GGMLType.Q8_0: 0, GGMLType.Q4_0: 1, GGMLType.Q4_1: 2}  # the types computed here, and each one's id
K_Q8_0, K_Q4_0, K_Q4_1 = (KERNELS[t] for t in (GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1))


def offset(dtype, field):  # where a field of a block starts, in bytes
    return dtype.fields[field][1]


# block layouts, from quant.py's dtypes (numba freezes these module constants into the compiled loops)
Q8_0_BYTES, Q8_0_D, Q8_0_QS = quant.Q8_0.itemsize, offset(quant.Q8_0, "d"), offset(quant.Q8_0, "qs")
Q4_0_BYTES, Q4_0_D, Q4_0_QS = quant.Q4_0.itemsize, offset(quant.Q4_0, "d"), offset(quant.Q4_0, "qs")
Q4_1_BYTES, Q4_1_D, Q4_1_M, Q4_1_QS = (quant.Q4_1.itemsize, offset(quant.Q4_1, "d"), offset(quant.Q4_1, "m"),
                                       offset(quant.Q4_1, "qs"))
QK = quant.BLOCK_SIZE[GGMLType.Q8_0][0]  # weights per block: 32 for all three

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


def jit(**options):  # numba.njit(cache=True, nogil=True, boundscheck=False, **options), or nothing
    if numba is None:
        return lambda f: f
    return numba.njit(cache=True, nogil=True, boundscheck=False, **options)


prange = numba.prange if numba else range


# -- the loops: plain Python that numba compiles (never run uncompiled: far too slow) ------------------------
@jit(inline="always")
def f32(i):  # a small integer -> float32, through int32: numba computes integers in int64, and converting int64
    return np.float32(np.int32(i))  # to float is slower than int32 in the vector units


if numba:
    from llvmlite import ir
    from numba.core import cgutils
    from numba.extending import intrinsic

    def native_f16():  # can the CPU numba compiles for widen float16 itself? (x86 without F16C cannot)
        import platform

        import llvmlite.binding as llvm
        features = (numba.config.CPU_FEATURES or llvm.get_host_cpu_features().flatten()).split(",")
        return platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86") or "+f16c" in features

    def widen_f16(builder, h):  # float16 bits (i16) -> float32 with integer operations: x86 before F16C
        """The sign moves to bit 31; exponent and mantissa move up 13 bits, which reads as the value times 2^-112
        (the exponent biases are 15 and 127), so one multiply by 2^112 makes it exact, subnormals included.
        Infinities and NaNs (exponent all ones) get float32's all-ones exponent instead."""
        i32, f32 = ir.IntType(32), ir.FloatType()
        bits = builder.zext(h, i32)
        sign = builder.shl(builder.and_(bits, i32(0x8000)), i32(16))
        body = builder.shl(builder.and_(bits, i32(0x7FFF)), i32(13))
        finite = builder.fmul(builder.bitcast(body, f32), f32(2.0 ** 112))
        special = builder.bitcast(builder.or_(body, i32(0x7F800000)), f32)
        is_special = builder.icmp_unsigned(">=", body, i32(0x7C00 << 13))
        value = builder.bitcast(builder.select(is_special, special, finite), i32)
        return builder.bitcast(builder.or_(value, sign), f32)

    NATIVE_F16 = native_f16()

    @intrinsic
    def f16(typingctx, b, o):  # the little-endian float16 at bytes b[o], b[o + 1] -> float32
        """Load the two bytes as a float16 and widen it: one instruction (vcvtph2ps) on x86 since 2012. numba has
        no float16 type, and the same conversion done with shifts and masks is slower; an x86 CPU without
        F16C (before 2012, and Atom-class cores without AVX) gets it all the same: LLVM would call a library
        function the JIT does not have."""
        def codegen(context, builder, sig, args):
            data = context.make_array(sig.args[0])(context, builder, args[0]).data
            h = builder.load(builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(16).as_pointer()), align=1)
            if not NATIVE_F16:
                return widen_f16(builder, h)
            return builder.fpext(builder.bitcast(h, ir.HalfType()), ir.FloatType())
        return numba.float32(b, numba.intp), codegen

    @intrinsic
    def prefetch(typingctx, b, o):  # ask the CPU to start loading the cache line of b[o]; no result
        def codegen(context, builder, sig, args):
            data = context.make_array(sig.args[0])(context, builder, args[0]).data
            i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                                "llvm.prefetch.p0")        # (address, read, keep in all caches, data)
            builder.call(fn, [builder.bitcast(builder.gep(data, [args[1]]), i8p), i32(0), i32(3), i32(1)])
            return context.get_dummy_value()
        return numba.void(b, numba.intp), codegen


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


@jit(inline="always", fastmath=True)
def matvec_group(w, flat, x, xsum, y, g, kind, half):  # rows 4g..4g+3 of y = x @ W.T, for every row of x
    r = min(4 * g, w.shape[0] - 4)                             # the last group may overlap the one before
    for i in range(x.shape[0]):
        if kind == K_Q4_1:
            a = dot4_q4_1(w, flat, r, x[i], xsum[i], half)
        elif kind == K_Q4_0:
            a = dot4_q4_0(w, flat, r, x[i], xsum[i], half)
        else:
            a = dot4_q8_0(w, flat, r, x[i], xsum[i], half)
        y[i, r], y[i, r + 1], y[i, r + 2], y[i, r + 3] = a


@jit(inline="always", fastmath=True)
def block_sums(x):  # [M, n_in] -> [M, n_in / 32]: the sum of each block of x (for Q4_0 and Q4_1)
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


@jit(parallel=True, fastmath=True)
def matvec(w, x, y, kind, half):  # w [n_out, row bytes] uint8, x [M, n_in], y [M, n_out] float32
    xsum, flat = block_sums(x), w.reshape(-1)                  # flat: the same bytes, one after the other
    for g in prange((w.shape[0] + 3) // 4):                    # groups of 4 rows, shared among the threads
        matvec_group(w, flat, x, xsum, y, g, kind, half)


@jit(fastmath=True)
def matvec_1thread(w, x, y, kind, half):  # the same, without numba's thread pool (one thread: its start
    xsum, flat = block_sums(x), w.reshape(-1)  # and finish would cost more than a small product)
    for g in range((w.shape[0] + 3) // 4):
        matvec_group(w, flat, x, xsum, y, g, kind, half)


@jit()
def dequantize_rows(w, out, kind, half):  # w [n, row bytes] uint8 -> out [n, n_in] float32
    """The same float32 numbers as quant.dequantize, bit for bit (the products and sums round the same way).
    On one thread: splitting it would hand the cores back and forth between numba's threads and OpenBLAS's
    (sgemm comes next) for a small part of a prefill."""
    bb = w.shape[1] * QK // out.shape[1]
    for r in range(w.shape[0]):
        for b in range(out.shape[1] // QK):
            blk, o = w[r, b * bb:b * bb + bb], out[r, QK * b:QK * b + QK]
            if kind == K_Q8_0:
                d = f16(blk, Q8_0_D)
                for j in range(2 * half):
                    o[j] = d * np.float32(np.int8(blk[Q8_0_QS + j]))
            elif kind == K_Q4_0:
                d = f16(blk, Q4_0_D)
                for j in range(half):
                    q = np.int32(blk[Q4_0_QS + j])
                    o[j], o[half + j] = d * np.float32((q & 15) - 8), d * np.float32((q >> 4) - 8)
            else:
                d, m = f16(blk, Q4_1_D), f16(blk, Q4_1_M)
                for j in range(half):
                    q = np.int32(blk[Q4_1_QS + j])
                    o[j], o[half + j] = d * np.float32(q & 15) + m, d * np.float32(q >> 4) + m


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
        if n_in % QK or w.shape != (n_out, quant.nbytes(qtype, (n_in,))) or w.dtype != np.uint8:
            raise TinyLlavaError(f"{qtype.name} {tuple(shape)}: blocks of shape {w.shape} {w.dtype} do not fit")
        self.w, self.type, self.shape = readonly(w), qtype, (int(n_out), int(n_in))

    @classmethod
    def from_tensor(cls, t):  # gguf.GGUFTensor -> QuantMatrix, or a float32 array for unquantized types
        """Use as `Llama.load(path, load_matrix=QuantMatrix.from_tensor)`. F32/F16/BF16 and the types without a
        fused loop here (Q4_K, Q6_K) become plain float32 arrays, as on the reference path."""
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
            (matvec if parallel else matvec_1thread)(self.w, x2, y, KERNELS[self.type], QK // 2)
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
