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

Engines: with numba installed (`pip install -e ".[fast]"`), the loops below are compiled to machine code
(parallel over output rows, cached on disk: ~9 s to compile the first time, then ~0.4 s per process to
load, plus ~0.35 s to import numba).
Without numba (or with `fused.ENGINE = "numpy"`, or TINYLLAVA_NO_NUMBA=1) every product goes through the
dequantized tiles and NumPy: the same numbers up to float32 rounding and the same memory, but decoding
dequantizes every matrix for every token (~0.7 s per token, 40x slower than the reference path).

    from tinyllava import fused
    model = Llama.load(path, load_matrix=fused.QuantMatrix.from_tensor)   # or fused.load_decoder()
"""
import ctypes
import mmap
import os
import threading

import numpy as np

from . import quant
from .errors import TinyLlavaError
from .quant import GGMLType

# (weights per block, bytes per block) of the types computed here without dequantizing the whole matrix
BLOCK = {GGMLType.Q8_0: (32, 34), GGMLType.Q4_0: (32, 18), GGMLType.Q4_1: (32, 20)}
KIND = {GGMLType.Q8_0: 0, GGMLType.Q4_0: 1, GGMLType.Q4_1: 2}  # the kernels' switch
MATVEC_MAX_ROWS = 8     # up to this many rows of x, the fused loop; above, dequantized tiles and sgemm
TILE_BYTES = 4 << 20    # float32 bytes of one dequantized tile: bounds the extra memory of a product
AHEAD = 4096            # bytes of weights to prefetch ahead of the fused loop (measured: 4-8 kB are as good)
PARALLEL_MIN = 1 << 18  # weights: a smaller matrix is one thread's work (starting the threads costs ~10 us)

# numba's OpenMP threads spin a while between parallel loops, as OpenMP does by default: keep it. Decoding runs
# ~200 short loops per token, and waking sleeping threads for each is slow: measured on 2 idle cores, 49 tokens/s
# by default, 3.9 with OMP_WAIT_POLICY=passive. (On a busy machine spinning threads lose their cores: use fewer.)


def keep_freed_memory():
    """NumPy's temporaries in a forward pass (1-3 MB each) are above glibc's initial mmap threshold (128 kB), so
    each one is a fresh mmap that page-faults on every touch and is unmapped when freed: 40,000 page faults per
    image in the vision tower (+25% time). The reference path escapes by accident: freeing its big load-time
    temporaries raises glibc's threshold. Here it is raised on purpose: blocks up to 32 MB come from the heap,
    and up to 64 MB of freed heap are kept for the next ones (Linux/glibc; elsewhere nothing happens)."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


keep_freed_memory()
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
    return np.float32(np.int32(i))  # to float is half as fast as int32 in the vector units


if numba:
    from llvmlite import ir
    from numba.core import cgutils
    from numba.extending import intrinsic

    @intrinsic
    def f16(typingctx, b, o):  # the little-endian float16 at bytes b[o], b[o + 1] -> float32
        """Load the two bytes as a float16 and widen it: one instruction (vcvtph2ps) on x86 since 2012. numba has
        no float16 type, and the same conversion done with shifts and masks makes decoding ~10% slower."""
        def codegen(context, builder, sig, args):
            data = context.make_array(sig.args[0])(context, builder, args[0]).data
            h = builder.load(builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(16).as_pointer()), align=1)
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
    token, from RAM, in four interleaved streams. Asking for the bytes AHEAD further on cuts the time of all
    the decoder's products from 25.5 to 17.8 ms per token (one thread). (A loop over the lines is slower.)"""
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
    for b in range(x.shape[0] // 32):
        o, xb = 34 * b, x[32 * b:32 * b + 32]                 # a block: 2-byte scale d, then 32 int8 weights
        prefetch_ahead(flat, ahead + 136 * b, 136)           # the four rows' blocks b, further on
        b0, b1, b2, b3 = w0[o:o + 34], w1[o:o + 34], w2[o:o + 34], w3[o:o + 34]
        s0 = s1 = s2 = s3 = np.float32(0)
        for j in range(2 * half):
            s0 += f32(np.int8(b0[2 + j])) * xb[j]
            s1 += f32(np.int8(b1[2 + j])) * xb[j]
            s2 += f32(np.int8(b2[2 + j])) * xb[j]
            s3 += f32(np.int8(b3[2 + j])) * xb[j]
        a0 += f16(b0, 0) * s0
        a1 += f16(b1, 0) * s1
        a2 += f16(b2, 0) * s2
        a3 += f16(b3, 0) * s3
    return a0, a1, a2, a3


@jit(inline="always", fastmath=True)
def dot4_q4_0(w, flat, r, x, xsum, half):  # weight = d * (q - 8)
    w0, w1, w2, w3 = w[r], w[r + 1], w[r + 2], w[r + 3]
    ahead = r * w.shape[1] + AHEAD
    a0 = a1 = a2 = a3 = np.float32(0)
    for b in range(x.shape[0] // 32):
        o, xb = 18 * b, x[32 * b:32 * b + 32]                 # a block: d, then 16 bytes of two 4-bit weights
        prefetch_ahead(flat, ahead + 72 * b, 72)           # the four rows' blocks b, further on
        b0, b1, b2, b3 = w0[o:o + 18], w1[o:o + 18], w2[o:o + 18], w3[o:o + 18]
        s0 = s1 = s2 = s3 = np.float32(0)
        for j in range(half):                                  # byte j: weight j (low nibble), j + 16 (high)
            lo, hi = xb[j], xb[half + j]
            q = np.int32(b0[2 + j]); s0 += f32(q & 15) * lo + f32(q >> 4) * hi  # noqa: E702
            q = np.int32(b1[2 + j]); s1 += f32(q & 15) * lo + f32(q >> 4) * hi  # noqa: E702
            q = np.int32(b2[2 + j]); s2 += f32(q & 15) * lo + f32(q >> 4) * hi  # noqa: E702
            q = np.int32(b3[2 + j]); s3 += f32(q & 15) * lo + f32(q >> 4) * hi  # noqa: E702
        xs8 = np.float32(8) * xsum[b]                          # the -8 of every weight: d * 8 * sum(x[b])
        a0 += f16(b0, 0) * (s0 - xs8)
        a1 += f16(b1, 0) * (s1 - xs8)
        a2 += f16(b2, 0) * (s2 - xs8)
        a3 += f16(b3, 0) * (s3 - xs8)
    return a0, a1, a2, a3


@jit(inline="always", fastmath=True)
def dot4_q4_1(w, flat, r, x, xsum, half):  # weight = d * q + m
    w0, w1, w2, w3 = w[r], w[r + 1], w[r + 2], w[r + 3]
    ahead = r * w.shape[1] + AHEAD
    a0 = a1 = a2 = a3 = np.float32(0)
    for b in range(x.shape[0] // 32):
        o, xb = 20 * b, x[32 * b:32 * b + 32]                 # a block: d, m, then 16 bytes of 4-bit weights
        prefetch_ahead(flat, ahead + 80 * b, 80)           # the four rows' blocks b, further on
        b0, b1, b2, b3 = w0[o:o + 20], w1[o:o + 20], w2[o:o + 20], w3[o:o + 20]
        s0 = s1 = s2 = s3 = np.float32(0)
        for j in range(half):
            lo, hi = xb[j], xb[half + j]
            q = np.int32(b0[4 + j]); s0 += f32(q & 15) * lo + f32(q >> 4) * hi  # noqa: E702
            q = np.int32(b1[4 + j]); s1 += f32(q & 15) * lo + f32(q >> 4) * hi  # noqa: E702
            q = np.int32(b2[4 + j]); s2 += f32(q & 15) * lo + f32(q >> 4) * hi  # noqa: E702
            q = np.int32(b3[4 + j]); s3 += f32(q & 15) * lo + f32(q >> 4) * hi  # noqa: E702
        xs = xsum[b]                                           # m * sum(x[b]): the minimum, once per block
        a0 += f16(b0, 0) * s0 + f16(b0, 2) * xs
        a1 += f16(b1, 0) * s1 + f16(b1, 2) * xs
        a2 += f16(b2, 0) * s2 + f16(b2, 2) * xs
        a3 += f16(b3, 0) * s3 + f16(b3, 2) * xs
    return a0, a1, a2, a3


@jit(inline="always", fastmath=True)
def matvec_group(w, flat, x, xsum, y, g, kind, half):  # rows 4g..4g+3 of y = x @ W.T, for every row of x
    r = min(4 * g, w.shape[0] - 4)                             # the last group may overlap the one before
    for i in range(x.shape[0]):
        if kind == 2:
            a = dot4_q4_1(w, flat, r, x[i], xsum[i], half)
        elif kind == 1:
            a = dot4_q4_0(w, flat, r, x[i], xsum[i], half)
        else:
            a = dot4_q8_0(w, flat, r, x[i], xsum[i], half)
        y[i, r], y[i, r + 1], y[i, r + 2], y[i, r + 3] = a


@jit(inline="always", fastmath=True)
def block_sums(x):  # [M, n_in] -> [M, n_in / 32]: the sum of each block of x (for Q4_0 and Q4_1)
    xsum = np.empty((x.shape[0], x.shape[1] // 32), np.float32)
    for i in range(x.shape[0]):
        for b in range(x.shape[1] // 32):
            xsum[i, b] = x[i, 32 * b:32 * b + 32].sum()
    return xsum


@jit(parallel=True, fastmath=True)
def matvec(w, x, y, kind, half):  # w [n_out, row bytes] uint8, x [M, n_in], y [M, n_out] float32
    xsum, flat = block_sums(x), w.reshape(-1)                  # flat: the same bytes, one after the other
    for g in prange((w.shape[0] + 3) // 4):                    # groups of 4 rows, shared among the threads
        matvec_group(w, flat, x, xsum, y, g, kind, half)


@jit(fastmath=True)
def matvec_1thread(w, x, y, kind, half):  # the same, without numba's thread pool: with one thread, its
    xsum, flat = block_sums(x), w.reshape(-1)  # start and finish cost ~15 us per call, 10% of decoding
    for g in range((w.shape[0] + 3) // 4):
        matvec_group(w, flat, x, xsum, y, g, kind, half)


@jit()
def dequantize_rows(w, out, kind, half):  # w [n, row bytes] uint8 -> out [n, n_in] float32
    """The same float32 numbers as quant.dequantize, bit for bit (the products and sums round the same way).
    On one thread: it is ~10% of a prefill (one thread), and splitting it would hand the cores back and forth
    between numba's threads and OpenBLAS's (sgemm comes next) for at most that gain."""
    bb = w.shape[1] * 32 // out.shape[1]
    for r in range(w.shape[0]):
        for b in range(out.shape[1] // 32):
            blk, o = w[r, b * bb:b * bb + bb], out[r, 32 * b:32 * b + 32]
            d = f16(blk, 0)
            if kind == 0:
                for j in range(2 * half):
                    o[j] = d * np.float32(np.int8(blk[2 + j]))
            elif kind == 1:
                for j in range(half):
                    q = np.int32(blk[2 + j])
                    o[j], o[half + j] = d * np.float32((q & 15) - 8), d * np.float32((q >> 4) - 8)
            else:
                m = f16(blk, 2)
                for j in range(half):
                    q = np.int32(blk[4 + j])
                    o[j], o[half + j] = d * np.float32(q & 15) + m, d * np.float32(q >> 4) + m


# -- the matrix ------------------------------------------------------------------------------------------
class QuantMatrix:
    """A (n_out, n_in) matrix kept as its GGUF blocks, row by row: `w` [n_out, bytes per row] uint8, usually
    a view into the memory-mapped file. `matmul(x)` is x @ W.T, `rows(ids)` is W[ids], both float32."""

    __array_ufunc__ = None  # so that `dy @ W` (NumPy on the left) comes to __rmatmul__

    def __init__(self, w, qtype, shape):
        qtype = GGMLType(qtype)
        if qtype not in BLOCK:
            raise TinyLlavaError(f"the fused matmul supports {', '.join(t.name for t in BLOCK)}, not {qtype.name}")
        n_out, n_in = shape
        if n_in % 32 or w.shape != (n_out, n_in // 32 * BLOCK[qtype][1]) or w.dtype != np.uint8:
            raise TinyLlavaError(f"{qtype.name} {tuple(shape)}: blocks of shape {w.shape} {w.dtype} do not fit")
        w = w.view()
        w.flags.writeable = False  # read-only like the file's pages (and one compiled signature for all)
        self.w, self.type, self.shape = w, qtype, (int(n_out), int(n_in))

    @classmethod
    def from_tensor(cls, t):  # gguf.GGUFTensor -> QuantMatrix, or a float32 array for unquantized types
        """Use as `Llama.load(path, load_matrix=QuantMatrix.from_tensor)`. F32/F16/BF16 and the types without a
        fused loop here (Q4_K, Q6_K) become plain float32 arrays, as on the reference path."""
        if t.type not in BLOCK or len(t.shape) != 2:
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
            dequantize_rows(w, out, KIND[self.type], 16)
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
            parallel = numba.config.NUMBA_NUM_THREADS > 1 and self.shape[0] * self.shape[1] >= PARALLEL_MIN
            (matvec if parallel else matvec_1thread)(self.w, x2, y, KIND[self.type], 16)
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


# -- loading and unloading ---------------------------------------------------------------------------------
def release(gguf_file):
    """Give back the RAM of the pages of a memory-mapped GGUF that were read; the file stays mapped, and a page
    read again comes back from the OS's page cache (no disk read). For the vision tower after it has seen the
    image: its 90 MB are not needed again until the next image, and the decoder's 98 MB come in next."""
    mm = getattr(gguf_file._buf, "_mmap", None)  # the mmap.mmap under gguf.GGUFFile's np.memmap
    if mm is not None and hasattr(mmap, "MADV_DONTNEED"):
        mm.madvise(mmap.MADV_DONTNEED)


def load_decoder(path=None):
    """SmolLM2 with its matrices kept quantized. -> (Llama, Tokenizer)"""
    from .generate import load_decoder as load
    return load(path, load_matrix=QuantMatrix.from_tensor)


def load_vision_tower(path=None):
    """The CLIP vision tower with its matrices kept quantized (Q8_0)."""
    from .vit import VisionTower
    from .weights import vision_path
    return VisionTower.load(path or vision_path(), load_matrix=QuantMatrix.from_tensor)
