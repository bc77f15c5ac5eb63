"""The LLaMA decoder (SmolLM2-135M): the language half of LLaVA, as pure functions over NumPy arrays.

    ids -> embedding [B, T, d]
        -> 30 x block:  x = x + attention(rms_norm(x))      (RoPE on q, k; 9 query heads share 3 kv heads)
                        x = x + swiglu(rms_norm(x))
        -> rms_norm -> x @ embedding.T (the output projection is tied to the embedding) -> logits [B, T, vocab]

Each forward function takes its inputs and returns its output; its backward, right below it, takes the
gradient of that output and the same inputs and returns the gradients of the inputs (recomputing what it
needs instead of storing it). Training uses the backward functions (stage 1 of LLaVA); inference ignores them.
Matrices are stored as in the GGUF, (n_out, n_in), so a linear layer is x @ W.T.
"""
import math
from dataclasses import dataclass

import numpy as np

from .errors import TinyLlavaError
from .gguf import GGUFFile


@dataclass
class LlamaConfig:
    vocab_size: int = 49152
    dim: int = 576
    n_layers: int = 30
    n_heads: int = 9
    n_kv_heads: int = 3
    ffn_dim: int = 1536
    norm_eps: float = 1e-5
    rope_theta: float = 100000.0
    context_length: int = 8192

    @property
    def head_dim(self):
        return self.dim // self.n_heads

    @classmethod
    def from_gguf(cls, g):
        arch = g.require("general.architecture")
        if arch != "llama":
            g._fail(f"general.architecture is {arch!r}; the decoder must be a 'llama' GGUF")
        p = f"{arch}."
        return cls(vocab_size=len(g.require("tokenizer.ggml.tokens")), dim=g.require(p + "embedding_length"),
                   n_layers=g.require(p + "block_count"), n_heads=g.require(p + "attention.head_count"),
                   n_kv_heads=g.require(p + "attention.head_count_kv"),
                   ffn_dim=g.require(p + "feed_forward_length"),
                   norm_eps=g.require(p + "attention.layer_norm_rms_epsilon"),
                   rope_theta=g.get(p + "rope.freq_base", 10000.0), context_length=g.require(p + "context_length"))


# -- layers ----------------------------------------------------------------------------------------------
def linear(x, w):  # [..., n_in], [n_out, n_in] -> [..., n_out]
    # w is a float32 matrix, or a fused.QuantMatrix that keeps its quantized blocks and computes the same product
    if not isinstance(w, np.ndarray):
        return w.matmul(x)
    return (x.reshape(-1, x.shape[-1]) @ w.T).reshape(*x.shape[:-1], w.shape[0])  # 2-D: one BLAS call


def linear_backward(dy, x, w):  # [..., n_out], [..., n_in], [n_out, n_in] -> dx [..., n_in] (frozen w)
    return (dy.reshape(-1, dy.shape[-1]) @ w).reshape(*dy.shape[:-1], w.shape[1])


def rms_norm(x, w, eps):  # [..., d], [d] -> [..., d]
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rms_norm_backward(dy, x, w, eps):  # [..., d], [..., d], [d] -> dx [..., d]
    r = 1 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)  # [..., 1]
    g = dy * w                                                     # [..., d]
    return r * g - x * (r ** 3) * np.mean(g * x, axis=-1, keepdims=True)


def rope_angles(positions, head_dim, theta):  # [T] or [B, T] -> cos, sin [(B,) T, head_dim/2]
    freqs = theta ** (-np.arange(0, head_dim, 2) / head_dim)    # [hd/2]
    angles = np.asarray(positions)[..., None] * freqs           # [(B,) T, hd/2]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rope(x, cos, sin):  # [B, T, H, hd], [(B,) T, hd/2] x2 -> [B, T, H, hd]
    # rotate each adjacent pair (x[2i], x[2i+1]) by its angle: the GGUF converter permuted Q and K for this
    x0, x1 = x[..., 0::2], x[..., 1::2]                         # [B, T, H, hd/2] each
    c, s = cos[..., None, :], sin[..., None, :]                 # [(B,) T, 1, hd/2]
    return np.stack([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1).reshape(x.shape)


def rope_backward(dy, cos, sin):  # the inverse rotation: [B, T, H, hd] -> [B, T, H, hd]
    return rope(dy, cos, -sin)


def softmax(x):  # [..., n] -> [..., n]
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def heads(q, k, v):  # [B, T, H, hd], [B, S, Hkv, hd] x2 -> [B, Hkv, rep*T, hd], [B, Hkv, hd, S], [B, Hkv, S, hd]
    """Lay q, k, v out head by head, contiguous (so each product is one BLAS call per head). The `rep` query
    heads that share a key/value head become extra rows of one matrix: that is grouped-query attention."""
    B, T, H, hd = q.shape
    Hkv = k.shape[2]
    qg = np.ascontiguousarray(q.reshape(B, T, Hkv, H // Hkv, hd).transpose(0, 2, 3, 1, 4)).reshape(B, Hkv, -1, hd)
    return qg, np.ascontiguousarray(k.transpose(0, 2, 3, 1)), np.ascontiguousarray(v.transpose(0, 2, 1, 3))


def attention_probs(qg, kt, mask):  # [B, Hkv, rep*T, hd], [B, Hkv, hd, S], [B, 1, T, S] -> [B, Hkv, rep*T, S]
    scores = qg @ kt / math.sqrt(kt.shape[2])        # a Python float keeps the arrays' precision
    if mask is not None:                             # causal (and padding) mask, the same for every query head
        B, Hkv, RT, S = scores.shape
        T = mask.shape[2]
        scores = np.where(mask[:, :, None], scores.reshape(B, Hkv, RT // T, T, S), -np.inf).reshape(B, Hkv, RT, S)
    return softmax(scores.astype(qg.dtype, copy=False))


def attention(q, k, v, mask):  # [B, T, H, hd], [B, S, Hkv, hd] x2, [B, 1, T, S] bool or None -> [B, T, H, hd]
    B, T, H, hd = q.shape
    qg, kt, vh = heads(q, k, v)
    out = attention_probs(qg, kt, mask) @ vh                            # [B, Hkv, rep*T, hd]
    return out.reshape(B, -1, H // kt.shape[1], T, hd).transpose(0, 3, 1, 2, 4).reshape(B, T, H, hd)


def attention_backward(dout, q, k, v, mask):  # [B, T, H, hd] -> dq [B, T, H, hd], dk, dv [B, S, Hkv, hd]
    B, T, H, hd = q.shape
    qg, kt, vh = heads(q, k, v)
    Hkv = kt.shape[1]
    p = attention_probs(qg, kt, mask)                                   # [B, Hkv, rep*T, S] (recomputed)
    do = np.ascontiguousarray(dout.reshape(B, T, Hkv, H // Hkv, hd).transpose(0, 2, 3, 1, 4)).reshape(qg.shape)
    dv = p.swapaxes(-1, -2) @ do                                        # [B, Hkv, S, hd]: sums the group too
    dp = do @ vh.swapaxes(-1, -2)                                       # [B, Hkv, rep*T, S]
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True)) / math.sqrt(hd)  # softmax backward, then the scale
    dq = ds @ kt.swapaxes(-1, -2)                                       # [B, Hkv, rep*T, hd]
    dk = ds.swapaxes(-1, -2) @ qg                                       # [B, Hkv, S, hd]
    return (dq.reshape(B, Hkv, H // Hkv, T, hd).transpose(0, 3, 1, 2, 4).reshape(B, T, H, hd),
            dk.transpose(0, 2, 1, 3), dv.transpose(0, 2, 1, 3))


def silu(x):  # [...] -> [...]
    return x / (1 + np.exp(-x))


def swiglu(x, w_gate, w_up, w_down):  # [..., d], [f, d], [f, d], [d, f] -> [..., d]
    return linear(silu(linear(x, w_gate)) * linear(x, w_up), w_down)


def swiglu_backward(dy, x, w_gate, w_up, w_down):  # [..., d] -> dx [..., d]
    g, u = linear(x, w_gate), linear(x, w_up)                   # [..., f] each
    sig = 1 / (1 + np.exp(-g))                                  # [..., f]
    dh = linear_backward(dy, None, w_down)                      # [..., f]
    dg = dh * u * sig * (1 + g * (1 - sig))                     # d silu(g) / dg = sig * (1 + g (1 - sig))
    du = dh * g * sig
    return linear_backward(dg, x, w_gate) + linear_backward(du, x, w_up)


# -- the decoder -----------------------------------------------------------------------------------------
@dataclass
class Layer:
    attn_norm: np.ndarray  # [d]
    wq: np.ndarray         # [H*hd, d]
    wk: np.ndarray         # [Hkv*hd, d]
    wv: np.ndarray         # [Hkv*hd, d]
    wo: np.ndarray         # [d, H*hd]
    ffn_norm: np.ndarray   # [d]
    w_gate: np.ndarray     # [f, d]
    w_up: np.ndarray       # [f, d]
    w_down: np.ndarray     # [d, f]


class KVCache:
    """Keys and values of every layer for the positions seen so far, so each new token costs one position."""

    def __init__(self, cfg, batch=1, max_len=2048, dtype=np.float32):
        shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim)
        self.k = np.zeros(shape, dtype)  # [L, B, max_len, Hkv, hd]
        self.v = np.zeros(shape, dtype)  # [L, B, max_len, Hkv, hd]
        self.length = 0

    def copy(self):
        new = object.__new__(KVCache)
        new.k, new.v, new.length = self.k.copy(), self.v.copy(), self.length
        return new

    def reserve(self, n):
        """Room for n positions, growing by doubling. (Not one big allocation up front: untouched zeros cost
        nothing, but the kernel backs each touched layer with a 2 MB huge page, ~100 MB for a full context.)"""
        if n > self.k.shape[2]:
            grown = max(n, 2 * self.k.shape[2])
            k, v = (np.zeros(self.k.shape[:2] + (grown,) + self.k.shape[3:], self.k.dtype) for _ in range(2))
            k[:, :, :self.length], v[:, :, :self.length] = self.k[:, :, :self.length], self.v[:, :, :self.length]
            self.k, self.v = k, v
        return self


def attention_layer(x, layer, cfg, cos, sin, mask, cache=None, i=0):  # [B, T, d] -> [B, T, d]
    B, T, _ = x.shape
    q = rope(linear(x, layer.wq).reshape(B, T, cfg.n_heads, cfg.head_dim), cos, sin)     # [B, T, H, hd]
    k = rope(linear(x, layer.wk).reshape(B, T, cfg.n_kv_heads, cfg.head_dim), cos, sin)  # [B, T, Hkv, hd]
    v = linear(x, layer.wv).reshape(B, T, cfg.n_kv_heads, cfg.head_dim)                  # [B, T, Hkv, hd]
    if cache is not None and cache.k.shape[1] == B:  # append to the cache, attend over everything in it
        start = cache.length
        cache.k[i, :, start:start + T], cache.v[i, :, start:start + T] = k, v
        k, v = cache.k[i, :, :start + T], cache.v[i, :, :start + T]                       # [B, S, Hkv, hd]
    elif cache is not None:  # one cached prefix shared by B continuations (left unchanged)
        pk, pv = (np.broadcast_to(c[i, :, :cache.length], (B, cache.length, *k.shape[2:])) for c in (cache.k, cache.v))
        k, v = np.concatenate([pk, k], axis=1), np.concatenate([pv, v], axis=1)           # [B, S, Hkv, hd]
    return linear(attention(q, k, v, mask).reshape(B, T, -1), layer.wo)                  # [B, T, d]


def attention_layer_backward(dy, x, layer, cfg, cos, sin, mask):  # [B, T, d] -> dx [B, T, d]
    B, T, _ = x.shape
    q = rope(linear(x, layer.wq).reshape(B, T, cfg.n_heads, cfg.head_dim), cos, sin)     # [B, T, H, hd]
    k = rope(linear(x, layer.wk).reshape(B, T, cfg.n_kv_heads, cfg.head_dim), cos, sin)  # [B, T, Hkv, hd]
    v = linear(x, layer.wv).reshape(B, T, cfg.n_kv_heads, cfg.head_dim)                  # [B, T, Hkv, hd]
    da = linear_backward(dy, None, layer.wo).reshape(B, T, cfg.n_heads, cfg.head_dim)   # [B, T, H, hd]
    dq, dk, dv = attention_backward(da, q, k, v, mask)
    dq, dk = rope_backward(dq, cos, sin), rope_backward(dk, cos, sin)
    return (linear_backward(dq.reshape(B, T, -1), x, layer.wq) + linear_backward(dk.reshape(B, T, -1), x, layer.wk)
            + linear_backward(dv.reshape(B, T, -1), x, layer.wv))


def block(x, layer, cfg, cos, sin, mask, cache=None, i=0, mids=None):  # [B, T, d] -> [B, T, d]
    h = x + attention_layer(rms_norm(x, layer.attn_norm, cfg.norm_eps), layer, cfg, cos, sin, mask, cache, i)
    if mids is not None:  # training keeps the mid-block residual, so the backward need not recompute attention
        mids.append(h)
    return h + swiglu(rms_norm(h, layer.ffn_norm, cfg.norm_eps), layer.w_gate, layer.w_up, layer.w_down)


def block_backward(dy, x, h, layer, cfg, cos, sin, mask):  # [B, T, d]; block input x, mid residual h -> dx
    dh = dy + rms_norm_backward(
        swiglu_backward(dy, rms_norm(h, layer.ffn_norm, cfg.norm_eps), layer.w_gate, layer.w_up, layer.w_down),
        h, layer.ffn_norm, cfg.norm_eps)
    a = rms_norm(x, layer.attn_norm, cfg.norm_eps)                                         # recomputed
    return dh + rms_norm_backward(attention_layer_backward(dh, a, layer, cfg, cos, sin, mask),
                                  x, layer.attn_norm, cfg.norm_eps)


def causal_mask(T, start=0, valid=None):  # -> [B or 1, 1, T, start+T] bool: may query t see key s?
    """Query t (at position start+t) sees keys 0..start+t; `valid` [B, start+T] bool hides padding keys."""
    S = start + T
    mask = (np.arange(S)[None, :] <= start + np.arange(T)[:, None])[None, None]  # [1, 1, T, S]
    return mask if valid is None else mask & valid[:, None, None, :]


class Llama:
    """SmolLM2 weights and the whole forward pass. `Llama.load(path)` dequantizes the GGUF to float32."""

    def __init__(self, cfg, embedding, layers, norm):
        self.cfg = cfg
        self.embedding = embedding  # [vocab, d], also the output projection
        self.layers = layers        # list of Layer
        self.norm = norm            # [d]

    @classmethod
    def load(cls, path, load_matrix=None):
        """Read a llama GGUF. Matrices become float32 arrays, or whatever `load_matrix(GGUFTensor)` makes."""
        g = GGUFFile(path)
        cfg = LlamaConfig.from_gguf(g)
        mat = load_matrix or (lambda t: t.numpy())
        vec = lambda name: g.tensor(name).numpy()  # noqa: E731 (norm weights are small float32 vectors)
        layers = [Layer(vec(f"blk.{i}.attn_norm.weight"), mat(g.tensor(f"blk.{i}.attn_q.weight")),
                        mat(g.tensor(f"blk.{i}.attn_k.weight")), mat(g.tensor(f"blk.{i}.attn_v.weight")),
                        mat(g.tensor(f"blk.{i}.attn_output.weight")), vec(f"blk.{i}.ffn_norm.weight"),
                        mat(g.tensor(f"blk.{i}.ffn_gate.weight")), mat(g.tensor(f"blk.{i}.ffn_up.weight")),
                        mat(g.tensor(f"blk.{i}.ffn_down.weight"))) for i in range(cfg.n_layers)]
        if "output.weight" in g.tensors:
            g._fail("has a separate output.weight; tinyllava supports tied embeddings only (as in SmolLM2)")
        model = cls(cfg, mat(g.tensor("token_embd.weight")), layers, vec("output_norm.weight"))
        model.gguf = g
        return model

    def embed(self, ids):  # [B, T] int -> [B, T, d]
        ids = np.asarray(ids)
        if isinstance(self.embedding, np.ndarray):
            return self.embedding[ids]
        return self.embedding.rows(ids)

    def forward(self, x, cache=None, valid=None, hidden_states=None, positions=None, mask=None, mids=None):
        """Run the blocks on input embeddings [B, T, d] -> [B, T, d]. With a cache, x continues the sequence the
        cache holds; a cache of batch 1 under B > 1 sequences is a prefix they all share, read but not extended.
        `valid` [B, S] bool marks real tokens (False = padding). `hidden_states`, if a list, gets
        each block's output appended. `positions` [T] and `mask` [B or 1, 1, T, S] replace the plain causal
        layout, for several sequences packed into one (see model.pack). `mids`, if a list, gets each block's
        residual after attention (what the backward needs)."""
        B, T, _ = x.shape
        start = cache.length if cache is not None else 0
        if cache is not None and cache.k.shape[1] == B and start + T > cache.k.shape[2]:
            raise TinyLlavaError(f"{start + T} positions do not fit in the KV cache ({cache.k.shape[2]})")
        positions = np.arange(start, start + T) if positions is None else positions
        mask = causal_mask(T, start, valid) if mask is None else mask
        cos, sin = rope_angles(positions, self.cfg.head_dim, self.cfg.rope_theta)
        for i, layer in enumerate(self.layers):
            x = block(x, layer, self.cfg, cos, sin, mask, cache, i, mids)
            if hidden_states is not None:
                hidden_states.append(x)
        if cache is not None and cache.k.shape[1] == B:
            cache.length += T
        return x

    def logits(self, h):  # [..., d] -> [..., vocab]
        return linear(rms_norm(h, self.norm, self.cfg.norm_eps), self.embedding)

    def backward(self, dh, x, hidden_states, mids, positions, mask):  # d(last block's output) -> d(x) [B, T, d]
        cos, sin = rope_angles(positions, self.cfg.head_dim, self.cfg.rope_theta)
        inputs = [x] + hidden_states[:-1]                      # each block's input
        for layer, xi, h in zip(reversed(self.layers), reversed(inputs), reversed(mids)):
            dh = block_backward(dh, xi, h, layer, self.cfg, cos, sin, mask)
        return dh

    def loss_and_grad(self, x, at, targets, positions=None, mask=None):
        """Cross-entropy of chosen next tokens, and its gradient with respect to the input embeddings.
        x [B, T, d]; at [N]: flat indices into B*T of the positions scored (one may repeat: in a packed
        sequence the last image token predicts the first word of every caption); targets [N]: the token each
        should predict. -> (summed loss, d(summed loss)/dx [B, T, d]). The weights stay frozen."""
        B, T, d = x.shape
        positions = np.arange(T) if positions is None else positions
        mask = causal_mask(T) if mask is None else mask
        hidden, mids = [], []
        h = self.forward(x, hidden_states=hidden, positions=positions, mask=mask, mids=mids)  # [B, T, d]
        hs = h.reshape(-1, d)[at]                                                    # [N, d]
        n = rms_norm(hs, self.norm, self.cfg.norm_eps)                               # [N, d]
        logits = linear(n, self.embedding)                                           # [N, vocab]
        loss = cross_entropy(logits, targets)
        dlogits = cross_entropy_backward(logits, targets)                            # [N, vocab]
        dh = np.zeros((B * T, d), h.dtype)
        np.add.at(dh, at, rms_norm_backward(linear_backward(dlogits, n, self.embedding), hs, self.norm,
                                            self.cfg.norm_eps))
        return loss, self.backward(dh.reshape(B, T, d), x, hidden, mids, positions, mask)


def cross_entropy(logits, targets):  # [N, vocab], [N] -> summed -log p(target)
    z = logits - logits.max(axis=-1, keepdims=True)                               # [N, vocab]
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))                      # [N, vocab]
    return float(-logp[np.arange(len(targets)), targets].sum())


def cross_entropy_backward(logits, targets):  # [N, vocab], [N] -> d(summed loss)/d(logits) [N, vocab]
    d = softmax(logits)
    d[np.arange(len(targets)), targets] -= 1
    return d
