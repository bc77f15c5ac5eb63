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
(parallel over output rows, cached on disk after the first compile). Without numba (or with
`fused.ENGINE = "numpy"`) every product goes through the dequantized tiles and NumPy: the same numbers up
to float32 rounding, but decoding is several times slower than the reference path.

    from tinyllava import fused
    model = Llama.load(path, load_matrix=fused.QuantMatrix.from_tensor)   # or fused.load_decoder()
"""
import functools
import os

import numpy as np

from . import quant
from .errors import TinyLlavaError
from .quant import GGMLType

# (weights per block, bytes per block) of the types computed here without dequantizing the whole matrix
BLOCK = {GGMLType.Q8_0: (32, 34), GGMLType.Q4_0: (32, 18), GGMLType.Q4_1: (32, 20)}
KIND = {GGMLType.Q8_0: 0, GGMLType.Q4_0: 1, GGMLType.Q4_1: 2}  # the kernels' switch
MATVEC_MAX_ROWS = 8     # up to this many rows of x, the fused loop; above, dequantized tiles and sgemm
TILE_BYTES = 4 << 20    # float32 bytes of one dequantized tile: bounds the extra memory of a product


def _numba_available():
    try:
        import numba  # noqa: F401
        return os.environ.get("TINYLLAVA_ENGINE", "numba") != "numpy"
    except ImportError:
        return False


ENGINE = "numba" if _numba_available() else "numpy"  # set to "numpy" to force the fallback (the tests do)


# -- the loops (plain Python; numba compiles them, see _kernels) ---------------------------------------------
# Tables for float16 -> float32: EXP2[s << 5 | e] is +-2^(max(e, 1) - 25), the value of one mantissa unit.
EXP2 = np.array([2.0 ** (max(e, 1) - 25) for e in range(31)] + [np.inf], np.float32)
EXP2 = np.concatenate([EXP2, -EXP2])


def f16(b, o, exp2):  # the little-endian float16 at bytes b[o], b[o+1] -> float32 (exact)
    h = np.int32(b[o]) | (np.int32(b[o + 1]) << 8)             # sign | 5-bit exponent | 10-bit mantissa
    e = (h >> 10) & 31
    if e == 31:                                                # inf or nan: never a real scale
        return exp2[h >> 10] if h & 1023 == 0 else np.float32(np.nan)
    mant = (h & 1023) | (np.int32(e != 0) << 10)               # the implicit leading 1 of a normal number
    return np.float32(mant) * exp2[h >> 10]                    # zero and subnormals need no special case


# Each dot4 takes one block (its bytes) of four consecutive rows and the matching 32 numbers of x, and returns
# the four partial sums. `half` is always 16: passed at run time so that the compiler vectorizes the inner
# loop (16 bytes = 32 weights) instead of unrolling it and vectorizing across blocks with slow gathers.
def dot4_q8_0(b0, b1, b2, b3, xb, xs, half, exp2):  # blocks [34] uint8 x4, xb [32] -> 4 x float32
    s0 = s1 = s2 = s3 = np.float32(0)
    for j in range(2 * half):                                  # 32 int8 weights after the 2-byte scale d
        s0 += np.float32(np.int8(b0[2 + j])) * xb[j]
        s1 += np.float32(np.int8(b1[2 + j])) * xb[j]
        s2 += np.float32(np.int8(b2[2 + j])) * xb[j]
        s3 += np.float32(np.int8(b3[2 + j])) * xb[j]
    return f16(b0, 0, exp2) * s0, f16(b1, 0, exp2) * s1, f16(b2, 0, exp2) * s2, f16(b3, 0, exp2) * s3


def dot4_q4_0(b0, b1, b2, b3, xb, xs, half, exp2):  # blocks [18] x4: weight = d * (q - 8)
    s0 = s1 = s2 = s3 = np.float32(0)
    for j in range(half):                                      # byte j: weight j (low nibble), j + 16 (high)
        lo, hi = xb[j], xb[half + j]
        q = np.int32(b0[2 + j]); s0 += np.float32(q & 15) * lo + np.float32(q >> 4) * hi  # noqa: E702
        q = np.int32(b1[2 + j]); s1 += np.float32(q & 15) * lo + np.float32(q >> 4) * hi  # noqa: E702
        q = np.int32(b2[2 + j]); s2 += np.float32(q & 15) * lo + np.float32(q >> 4) * hi  # noqa: E702
        q = np.int32(b3[2 + j]); s3 += np.float32(q & 15) * lo + np.float32(q >> 4) * hi  # noqa: E702
    xs8 = np.float32(8) * xs                                   # the -8 of every weight: d * 8 * sum(x[b])
    return (f16(b0, 0, exp2) * (s0 - xs8), f16(b1, 0, exp2) * (s1 - xs8),
            f16(b2, 0, exp2) * (s2 - xs8), f16(b3, 0, exp2) * (s3 - xs8))


def dot4_q4_1(b0, b1, b2, b3, xb, xs, half, exp2):  # blocks [20] x4: weight = d * q + m
    s0 = s1 = s2 = s3 = np.float32(0)
    for j in range(half):
        lo, hi = xb[j], xb[half + j]
        q = np.int32(b0[4 + j]); s0 += np.float32(q & 15) * lo + np.float32(q >> 4) * hi  # noqa: E702
        q = np.int32(b1[4 + j]); s1 += np.float32(q & 15) * lo + np.float32(q >> 4) * hi  # noqa: E702
        q = np.int32(b2[4 + j]); s2 += np.float32(q & 15) * lo + np.float32(q >> 4) * hi  # noqa: E702
        q = np.int32(b3[4 + j]); s3 += np.float32(q & 15) * lo + np.float32(q >> 4) * hi  # noqa: E702
    return (f16(b0, 0, exp2) * s0 + f16(b0, 2, exp2) * xs, f16(b1, 0, exp2) * s1 + f16(b1, 2, exp2) * xs,
            f16(b2, 0, exp2) * s2 + f16(b2, 2, exp2) * xs, f16(b3, 0, exp2) * s3 + f16(b3, 2, exp2) * xs)


def matvec(w, x, y, kind, half, exp2):  # w [n_out, row bytes] uint8, x [M, n_in], y [M, n_out] float32
    n_out, bb = w.shape[0], w.shape[1] * 32 // x.shape[1]      # bb: bytes per block
    nb = x.shape[1] // 32
    xsum = np.empty((x.shape[0], nb), np.float32)              # sum of each block of x, for Q4_0 and Q4_1
    for i in range(x.shape[0]):
        for b in range(nb):
            xsum[i, b] = x[i, 32 * b:32 * b + 32].sum()
    for g in prange((n_out + 3) // 4):                         # groups of 4 rows, split among the threads
        r = [min(4 * g + k, n_out - 1) for k in range(4)]      # the last group repeats its last row
        for i in range(x.shape[0]):
            a0 = a1 = a2 = a3 = np.float32(0)
            for b in range(nb):
                o, xb, xs = b * bb, x[i, 32 * b:32 * b + 32], xsum[i, b]
                b0, b1, b2, b3 = w[r[0], o:o + bb], w[r[1], o:o + bb], w[r[2], o:o + bb], w[r[3], o:o + bb]
                if kind == 2:
                    s = dot4_q4_1(b0, b1, b2, b3, xb, xs, half, exp2)
                elif kind == 1:
                    s = dot4_q4_0(b0, b1, b2, b3, xb, xs, half, exp2)
                else:
                    s = dot4_q8_0(b0, b1, b2, b3, xb, xs, half, exp2)
                a0 += s[0]; a1 += s[1]; a2 += s[2]; a3 += s[3]  # noqa: E702
            y[i, r[3]] = a3; y[i, r[2]] = a2; y[i, r[1]] = a1; y[i, r[0]] = a0  # noqa: E702


def dequantize_rows(w, out, kind, half, exp2):  # w [n, row bytes] uint8 -> out [n, n_in] float32
    """The same float32 numbers as quant.dequantize, bit for bit (the products and sums round the same way)."""
    bb = w.shape[1] * 32 // out.shape[1]
    for r in prange(w.shape[0]):
        for b in range(out.shape[1] // 32):
            blk, o = w[r, b * bb:b * bb + bb], out[r, 32 * b:32 * b + 32]
            d = f16(blk, 0, exp2)
            if kind == 0:
                for j in range(2 * half):
                    o[j] = d * np.float32(np.int8(blk[2 + j]))
            elif kind == 1:
                for j in range(half):
                    q = np.int32(blk[2 + j])
                    o[j], o[half + j] = d * np.float32((q & 15) - 8), d * np.float32((q >> 4) - 8)
            else:
                m = f16(blk, 2, exp2)
                for j in range(half):
                    q = np.int32(blk[4 + j])
                    o[j], o[half + j] = d * np.float32(q & 15) + m, d * np.float32(q >> 4) + m


def prange(*args):  # plain range when the loops run as Python; numba.prange once compiled
    return range(*args)


@functools.lru_cache(maxsize=None)
def _kernels():
    """Compile (or load from numba's on-disk cache) the loops above. -> (matvec, dequantize_rows)"""
    import numba
    g = globals()
    # the helpers are compiled first and the drivers see them as compiled functions through these globals
    fast = dict(cache=True, nogil=True, fastmath=True, boundscheck=False)
    exact = dict(cache=True, nogil=True, boundscheck=False)  # no fastmath: no fused multiply-add, exact
    g["f16"] = numba.njit(inline="always", **exact)(f16.py_func if hasattr(f16, "py_func") else f16)
    for name in ("dot4_q8_0", "dot4_q4_0", "dot4_q4_1"):
        fn = g[name]
        g[name] = numba.njit(inline="always", **fast)(getattr(fn, "py_func", fn))
    g["prange"] = numba.prange
    mv = numba.njit(parallel=True, **fast)(getattr(matvec, "py_func", matvec))
    dq = numba.njit(parallel=True, **exact)(getattr(dequantize_rows, "py_func", dequantize_rows))
    return mv, dq


# -- the matrix ------------------------------------------------------------------------------------------
class QuantMatrix:
    """A (n_out, n_in) matrix kept as its GGUF blocks, row by row: `w` [n_out, bytes per row] uint8, usually
    a view into the memory-mapped file. `matmul(x)` is x @ W.T, `rows(ids)` is W[ids], both float32."""

    def __init__(self, w, qtype, shape):
        qtype = GGMLType(qtype)
        if qtype not in BLOCK:
            raise TinyLlavaError(f"the fused matmul supports {', '.join(t.name for t in BLOCK)}, not {qtype.name}")
        n_out, n_in = shape
        if n_in % 32 or w.shape != (n_out, n_in // 32 * BLOCK[qtype][1]) or w.dtype != np.uint8:
            raise TinyLlavaError(f"{qtype.name} {tuple(shape)}: blocks of shape {w.shape} {w.dtype} do not fit")
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

    def dequantize(self, start=0, stop=None):  # rows start:stop -> float32 [stop - start, n_in]
        return self._dequantize(self.w[start:stop])

    def _dequantize(self, w):  # some rows' blocks [n, row bytes] -> float32 [n, n_in]
        if ENGINE == "numpy":
            return quant.dequantize(w, self.type, (w.shape[0], self.shape[1]))
        out = np.empty((w.shape[0], self.shape[1]), np.float32)
        _kernels()[1](w, out, KIND[self.type], 16, EXP2)
        return out

    def rows(self, ids):  # int array [...] -> float32 [..., n_in]: the embedding lookup
        ids = np.asarray(ids)
        return self._dequantize(self.w[ids.reshape(-1)]).reshape(*ids.shape, self.shape[1])

    def matmul(self, x):  # [..., n_in] -> [..., n_out] = x @ W.T
        x = np.asarray(x)
        if x.shape[-1] != self.shape[1]:
            raise TinyLlavaError(f"x [..., {x.shape[-1]}] @ W.T: W is {self.shape}")
        x2 = np.ascontiguousarray(x.reshape(-1, self.shape[1]), dtype=np.float32)  # [M, n_in]
        if ENGINE == "numba" and x2.shape[0] <= MATVEC_MAX_ROWS:
            y = np.empty((x2.shape[0], self.shape[0]), np.float32)                # [M, n_out]
            _kernels()[0](self.w, x2, y, KIND[self.type], 16, EXP2)
        else:
            y = self._tiled(x2)
        return y.reshape(*x.shape[:-1], self.shape[0]).astype(x.dtype, copy=False)

    def _tiled(self, x):  # [M, n_in] -> [M, n_out]: dequantize a tile of rows at a time, then sgemm
        step = max(1, TILE_BYTES // (4 * self.shape[1]))
        if step >= self.shape[0]:
            return x @ self.dequantize().T
        y = np.empty((x.shape[0], self.shape[0]), np.float32)
        for r in range(0, self.shape[0], step):
            y[:, r:r + step] = x @ self.dequantize(r, r + step).T
        return y

    def __rmatmul__(self, dy):  # dy [..., n_out] @ W -> [..., n_in]: the backward of a frozen linear layer
        dy2 = np.asarray(dy).reshape(-1, self.shape[0])
        step = max(1, TILE_BYTES // (4 * self.shape[1]))
        dx = np.zeros((dy2.shape[0], self.shape[1]), np.result_type(dy2.dtype, np.float32))
        for r in range(0, self.shape[0], step):
            dx += dy2[:, r:r + step] @ self.dequantize(r, r + step)
        return dx.reshape(*np.shape(dy)[:-1], self.shape[1])


# -- loading ---------------------------------------------------------------------------------------------
def load_decoder(path=None):
    """SmolLM2 with its matrices kept quantized. -> (Llama, Tokenizer)"""
    from .generate import load_decoder as load
    return load(path, load_matrix=QuantMatrix.from_tensor)


def load_vision_tower(path=None):
    """The CLIP vision tower with its matrices kept quantized (Q8_0)."""
    from .vit import VisionTower
    from .weights import vision_path
    return VisionTower.load(path or vision_path(), load_matrix=QuantMatrix.from_tensor)
