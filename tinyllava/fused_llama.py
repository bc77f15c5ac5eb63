"""A decoding step compiled whole: every block of SmolLM2 for one token in a single call, on fused products.

Decoding a token runs 30 blocks of 7 products (fused.py), with small operations between them: normalize,
rotate q and k, write the KV cache, attend, gate. In NumPy each of those is an interpreter round trip and a
new array, about 60 a block. Here one compiled call does the same arithmetic as llama.py's `block` for all 30
blocks, as loops over one position, with q, k and v (and gate and up) in one parallel loop each:

    a = rms_norm(x)                  q, k, v = a Wq^T, a Wk^T, a Wv^T        (one parallel loop over their rows)
    q, k = rope(q), rope(k)          cache[pos] = k, v
    o = softmax(q k^T / sqrt(hd)) v  over the cache; query head h reads key/value head h // (H / Hkv)
    x = x + o Wo^T
    f = rms_norm(x)                  g, u = f Wg^T, f Wu^T                   (one parallel loop)
    x = x + (silu(g) u) Wd^T

A LoRA adapter (lora.py) adds s B (A a) to its product, read in float16 as its file stores it (an adapter in
float32, one that is training, takes Llama's path). llama.py stays the readable form and the path for all
else (prefill, batches, training); tests/test_fused.py checks that both give the same logits and greedy tokens.
The README's "Speed and memory" has what this step saves.
"""
import numpy as np

from . import fused, runtime, simd
from .fused import QK, activations, jit, matvec_group, numba, prange, readonly
from .llama import MATRICES, Llama, rope_angles
from .lora import LoRA

List = numba.typed.List if numba else list


@jit(inline="always", fastmath=True)
def rms_norm(x, w, eps):  # [1, d], [d] -> [1, d]
    ss = np.float32(0)
    for j in range(x.shape[1]):
        ss += x[0, j] * x[0, j]
    r = np.float32(1) / np.sqrt(ss / np.float32(x.shape[1]) + np.float32(eps))
    y = np.empty_like(x)
    for j in range(x.shape[1]):
        y[0, j] = x[0, j] * r * w[j]
    return y


@jit(fastmath=True)  # not inlined: one copy for step's seven adapters keeps step's own code small
def add_lora(y, a, lora_a, lora_b, scales, m):  # y [n_out] += s B (A a), matrix m's adapter (r = 0: none)
    """The adapter is read once per token, as the blocks are, so each loop asks for its bytes a little ahead of
    where it reads, as fused.py's products do: two rows of A ahead, 32 rows of B."""
    A, B, s = lora_a[m], lora_b[m], scales[m]                   # float16 as bytes: [r, 2 n_in], [n_out, 2 r]
    if A.shape[0] == 0:
        return
    fa, fb = A.reshape(-1), B.reshape(-1)                                     # the same bytes, flat
    t = np.zeros(A.shape[0], np.float32)                                      # [r] = A a
    for i in range(A.shape[0]):
        for c in range(0, A.shape[1], 64):                                    # row i + 2, a cache line at a time
            simd.prefetch(fa, min((i + 2) * A.shape[1] + c, fa.shape[0] - 1))
        for j in range(a.shape[0]):
            t[i] += simd.f16(A[i], 2 * j) * a[j]
    for o in range(B.shape[0]):
        simd.prefetch(fb, min((o + 32) * B.shape[1], fb.shape[0] - 1))
        acc = np.float32(0)
        for i in range(t.shape[0]):
            acc += simd.f16(B[o], 2 * i) * t[i]
        y[o] += s * acc


@jit(inline="always", fastmath=True)
def rope(x, n_heads, cos, sin):  # [n_heads * hd] in place: each pair (x[2i], x[2i+1]) of a head rotated
    hd = x.shape[0] // n_heads
    for h in range(n_heads):
        for i in range(hd // 2):
            x0, x1 = x[h * hd + 2 * i], x[h * hd + 2 * i + 1]
            x[h * hd + 2 * i], x[h * hd + 2 * i + 1] = x0 * cos[i] - x1 * sin[i], x0 * sin[i] + x1 * cos[i]


@jit(inline="always", fastmath=True)
def attend(q, kc, vc, n, n_heads):  # q [1, H * hd], keys/values kc, vc [>= n, Hkv, hd] -> o [1, H * hd]
    n_kv, hd = kc.shape[1], kc.shape[2]
    o = np.empty_like(q)
    scale = np.float32(1 / np.sqrt(hd))
    for h in prange(n_heads):                                                 # the heads on the threads
        g, qh, p = h // (n_heads // n_kv), q[0, h * hd:(h + 1) * hd], np.empty(n, np.float32)  # [hd], [n]
        for t in range(n):                                                    # p [n]: the scores
            s = np.float32(0)
            for j in range(hd):
                s += qh[j] * kc[t, g, j]
            p[t] = s * scale
        top = p[0]                                                            # not -inf: fastmath assumes no inf
        for t in range(1, n):
            top = max(top, p[t])
        total = np.float32(0)
        for t in range(n):
            p[t] = np.exp(p[t] - top)
            total += p[t]
        oh = o[0, h * hd:(h + 1) * hd]
        oh[:] = 0
        for t in range(n):
            w = p[t] / total
            for j in range(hd):
                oh[j] += w * vc[t, g, j]
    return o


@jit(inline="always", fastmath=True)
def add(x, y):  # x [1, d] += y [1, d] (a loop: an array expression would be a parallel loop of its own)
    for j in range(x.shape[1]):
        x[0, j] += y[0, j]


@jit(fastmath=True)  # not inlined: compiled once for all of step's products (numba is slow to compile)
def products(w, kinds, m, n, x, act, y, t0, t1):  # groups t0..t1 of y [1, sum n_out] = x [1, n_in] @ W.T
    """W: the n matrices from m on, their rows one after the other (q, k and v; or gate and up), cut into
    groups of 4 rows (fused.matvec_group); t counts the groups through all n. A call per thread's share, which
    takes each matrix out of the list w once (an atomic update of its reference count), not one per group."""
    first, row = 0, 0                                                         # matrix i's first group and row
    for i in range(m, m + n):
        wi = w[i]                                                             # [n_out, row bytes]
        flat, part, g = wi.reshape(-1), y[:, row:row + wi.shape[0]], (wi.shape[0] + 3) // 4   # [bytes], [1, n_out]
        for t in range(max(t0, first), min(t1, first + g)):
            matvec_group(wi, flat, x, act, part, t - first, kinds[i], QK // 2)
        first, row = first + g, row + wi.shape[0]


@jit(inline="always")
def rows_of(w, m, n):  # the output rows, and groups of 4, of the n matrices from m on
    rows = groups = 0
    for i in range(m, m + n):
        rows, groups = rows + w[i].shape[0], groups + (w[i].shape[0] + 3) // 4
    return rows, groups


@jit(inline="always", fastmath=True)
def product(w, kinds, m, n, x, parts):  # x [1, n_in] @ W.T, the n matrices from m on -> [1, their rows together]
    rows, groups = rows_of(w, m, n)
    y, act = np.empty((1, rows), np.float32), activations(x, kinds[m])       # [1, rows]; x's 8-bit form or sums
    for p in prange(parts):                                                   # a share for each thread
        products(w, kinds, m, n, x, act, y, p * groups // parts, (p + 1) * groups // parts)
    return y


@jit(inline="always", fastmath=True)
def step(x, norms, w, kinds, lora_a, lora_b, scales, kc, vc, pos, cos, sin, n_heads, eps, parts):
    """One position through every block, x [1, d] updated in place. norms: the RMSNorm weights [d], block l's
    attention's at 2 l, its SwiGLU's at 2 l + 1; w, kinds, lora_a, lora_b, scales: block l's m-th matrix (in
    MATRICES order) at 7 l + m, as its blocks [n_out, bytes], kernel (fused.KERNELS), adapter A [r, n_in],
    B [n_out, r] and scale (r = 0: none); kc, vc [L, 1, max_len, Hkv, hd]: the KV cache, written at pos;
    cos, sin [hd / 2]: this position's RoPE angles; parts: how many shares each product is cut into (threads)."""
    n_kv, hd = kc.shape[3], kc.shape[4]
    for l in range(len(norms) // 2):
        Q, K, V, O, G, U, D = 7 * l, 7 * l + 1, 7 * l + 2, 7 * l + 3, 7 * l + 4, 7 * l + 5, 7 * l + 6
        a = rms_norm(x, norms[2 * l], eps)                                    # [1, d]
        qkv = product(w, kinds, Q, 3, a, parts)                               # [1, (H + 2 Hkv) hd]
        nq, nk = n_heads * hd, n_kv * hd
        q, k, v = qkv[:, :nq], qkv[:, nq:nq + nk], qkv[:, nq + nk:]           # [1, H hd], [1, Hkv hd] x2
        add_lora(q[0], a[0], lora_a, lora_b, scales, Q)
        add_lora(k[0], a[0], lora_a, lora_b, scales, K)
        add_lora(v[0], a[0], lora_a, lora_b, scales, V)
        rope(q[0], n_heads, cos, sin)
        rope(k[0], n_kv, cos, sin)
        for j in range(nk):
            kc[l, 0, pos, j // hd, j % hd] = k[0, j]
            vc[l, 0, pos, j // hd, j % hd] = v[0, j]
        o = attend(q, kc[l, 0], vc[l, 0], pos + 1, n_heads)                   # [1, H * hd]
        y = product(w, kinds, O, 1, o, parts)                                 # [1, d]
        add_lora(y[0], o[0], lora_a, lora_b, scales, O)
        add(x, y)
        f = rms_norm(x, norms[2 * l + 1], eps)                                # [1, d]
        gu = product(w, kinds, G, 2, f, parts)                                # [1, 2 ffn]
        ffn = gu.shape[1] // 2
        gate, up = gu[:, :ffn], gu[:, ffn:]                                   # [1, ffn] each
        add_lora(gate[0], f[0], lora_a, lora_b, scales, G)
        add_lora(up[0], f[0], lora_a, lora_b, scales, U)
        h = np.empty_like(gate)                                               # [1, ffn]: silu(gate) * up
        for j in range(ffn):
            e = np.exp(min(-gate[0, j], np.float32(80)))                      # no inf: fastmath assumes none
            h[0, j] = gate[0, j] / (np.float32(1) + e) * up[0, j]
        y = product(w, kinds, D, 1, h, parts)                                 # [1, d]
        add_lora(y[0], h[0], lora_a, lora_b, scales, D)
        add(x, y)


@jit(parallel=True, fastmath=True)
def decode_step(x, norms, w, kinds, lora_a, lora_b, scales, kc, vc, pos, cos, sin, n_heads, eps, parts):  # threads
    step(x, norms, w, kinds, lora_a, lora_b, scales, kc, vc, pos, cos, sin, n_heads, eps, parts)


@jit(fastmath=True)
def decode_step_1thread(x, norms, w, kinds, lora_a, lora_b, scales, kc, vc, pos, cos, sin, n_heads, eps,
                        parts):
    step(x, norms, w, kinds, lora_a, lora_b, scales, kc, vc, pos, cos, sin, n_heads, eps, parts)


@jit()
def new_list(arrays):  # a tuple of arrays of one type -> a numba typed list of them
    out = List()
    for i in range(len(arrays)):
        out.append(arrays[i])
    return out


@jit()
def extend(out, arrays):  # a numba typed list += a tuple of arrays
    for i in range(len(arrays)):
        out.append(arrays[i])


def as_list(arrays, per):  # arrays of one type -> a numba typed list of them
    """Built in compiled code, `per` at a time (a block's): numba caches that code, while a typed list made from
    Python compiles its own methods for each item type in every process, before the first token."""
    out = new_list(tuple(arrays[:per]))
    for i in range(per, len(arrays), per):
        extend(out, tuple(arrays[i:i + per]))
    return out


class FusedLlama(Llama):
    """A Llama whose one-token steps (batch 1, with a KV cache) run decode_step: all blocks in one compiled call.
    Everything else (prefill, batches, training) is Llama's; after a prefill, the memory its tiles used is handed
    back (fused.release_memory), as decoding needs none of it."""

    def forward(self, x, cache=None, valid=None, hidden_states=None, positions=None, mask=None, saved=None):
        args = self.compiled() if (cache is not None and x.shape == (1, 1, self.cfg.dim) and x.dtype == np.float32
                                   and cache.k.shape[1] == 1 and cache.k.dtype == cache.v.dtype == np.float32 and
                                   cache.length < cache.k.shape[2] and fused.ENGINE == "numba" and
                                   valid is hidden_states is positions is mask is saved is None) else None
        if args is None:
            y = super().forward(x, cache, valid, hidden_states, positions, mask, saved)
            if cache is not None and x.shape[1] > fused.MATVEC_MAX_ROWS:  # a prefill (a prompt into the cache)
                fused.release_memory()
            return y
        cfg, pos = self.cfg, cache.length
        cos, sin = rope_angles(np.array([pos]), cfg.head_dim, cfg.rope_theta)   # [1, hd/2] each
        x = x[0].copy()                                                         # [1, d], updated in place
        run = decode_step if runtime.THREADS > 1 else decode_step_1thread
        run(x, *args, cache.k, cache.v, pos, cos[0], sin[0], cfg.n_heads, cfg.norm_eps, runtime.THREADS)
        cache.length += 1
        return x[None]                                                          # [1, 1, d]

    def compiled(self):
        """The layers' weights as decode_step reads them, or None if a matrix is not quantized blocks. Made once,
        again only if a layer's matrices change (an adapter attached)."""
        mats = [getattr(layer, f) for layer in self.layers for f in MATRICES]
        parts = mats + [n for layer in self.layers for n in (layer.attn_norm, layer.ffn_norm)]
        parts += [p for m in mats if type(m) is LoRA for p in (m.w, m.a, m.b, m.scale)]
        key = (fused.INTEGER, *map(id, parts))   # ids compare in C: this runs for every token
        if getattr(self, "_compiled_key", None) != key:
            self._compiled, self._compiled_key, self._compiled_parts = self._compile(mats), key, parts  # parts
        return self._compiled                                                   # kept alive: their ids stay unique

    def _compile(self, mats):
        bases = [m.w if isinstance(m, LoRA) else m for m in mats]
        if not all(isinstance(b, fused.QuantMatrix) and b.shape[0] >= 4 for b in bases):
            return None
        none = np.zeros((0, 0), np.float16)
        adapters = [(m.a, m.b, m.scale) if isinstance(m, LoRA) else (none, none, 0) for m in mats]
        norms = [n for layer in self.layers for n in (layer.attn_norm, layer.ffn_norm)]   # not copies: they may train
        def ok(a, dtype):
            return isinstance(a, np.ndarray) and a.dtype == dtype and a.flags.c_contiguous
        if not (all(ok(n, np.float32) for n in norms) and all(ok(a, np.float16) and ok(b, np.float16)
                                                                for a, b, _ in adapters)):
            return None
        n, as_bytes = len(MATRICES), lambda a: readonly(a.view(np.uint8))                  # float16 [r, n] -> [r, 2 n]
        return (as_list([readonly(a) for a in norms], 2), as_list([b.w for b in bases], n),
                np.array([fused.KERNELS[b.type] + (fused.INT8 if fused.INTEGER else 0) for b in bases]),
                as_list([as_bytes(a) for a, _, _ in adapters], n),
                as_list([as_bytes(b) for _, b, _ in adapters], n), np.array([s for _, _, s in adapters], np.float32))
