"""The LLaMA decoder (SmolLM2-135M): the language half of LLaVA.

    ids -> embedding [B, T, d]
        -> 30 x block:  x = x + attention(rms_norm(x))      (RoPE on q, k; 9 query heads share 3 kv heads)
                        x = x + swiglu(rms_norm(x))
        -> rms_norm -> x @ embedding.T (the output projection is tied to the embedding) -> logits [B, T, vocab]

The layers are pure functions (the shared ones in ops.py); each forward has its backward right below it.
Stage 1 uses the backward for the gradient of the input embeddings (the image tokens); stage 2 also asks for
the weight gradients. Matrices are stored as in the GGUF, (n_out, n_in), so a linear layer is x @ W.T.

To add a decoder family (Qwen2, for example: q/k/v biases, NEOX-style RoPE, an untied output matrix):
  1. `LlamaConfig.from_gguf`: accept its `general.architecture` and read the same keys under its prefix
     (`qwen2.embedding_length`, ...), plus a field for what differs (`rope_neox: bool`).
  2. `Layer`: optional fields `wq_b`, `wk_b`, `wv_b`, loaded from `blk.N.attn_{q,k,v}.bias` (add them to
     TENSOR_NAMES); `qkv` passes them to `linear(x, w, b)`, and the backward adds their gradients (dy summed).
  3. RoPE: NEOX rotates the pairs (x[i], x[i + hd/2]) instead of (x[2i], x[2i+1]); a `rope_neox` that does
     this (and its backward, the inverse rotation), chosen in `qkv` by the config.
  4. `Llama.load`: read `output.weight` when the file has one, and `logits` multiplies by it instead of the
     embedding (the tied gradient in `loss_and_grad` then goes to that matrix).
  5. Tests: a transformers reference on the real file (as tests/test_llama.py does), and the backward on a tiny
     random configuration against torch autograd (tests/test_backward.py).
"""
from dataclasses import dataclass, fields

import numpy as np

from .errors import TinyLlavaError
from .gguf import GGUFFile
from .ops import (
    attention,
    attention_backward,
    causal_mask,
    cross_entropy,
    cross_entropy_backward,
    linear,
    linear_backward,
    rms_norm,
    rms_norm_backward,
    swiglu,
    swiglu_backward,
)


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
            g.fail(f"general.architecture is {arch!r}; the decoder must be a 'llama' GGUF")
        p = f"{arch}."
        return cls(vocab_size=len(g.require("tokenizer.ggml.tokens")), dim=g.require(p + "embedding_length"),
                   n_layers=g.require(p + "block_count"), n_heads=g.require(p + "attention.head_count"),
                   n_kv_heads=g.require(p + "attention.head_count_kv"),
                   ffn_dim=g.require(p + "feed_forward_length"),
                   norm_eps=g.require(p + "attention.layer_norm_rms_epsilon"),
                   rope_theta=g.get(p + "rope.freq_base", 10000.0), context_length=g.require(p + "context_length"))


# -- RoPE --------------------------------------------------------------------------------------------------
def rope_angles(positions, head_dim, theta):  # [T] or [B, T] -> cos, sin [(B,) T, head_dim/2]
    freqs = theta ** (-np.arange(0, head_dim, 2) / head_dim)    # [hd/2]
    angles = np.asarray(positions)[..., None] * freqs           # [(B,) T, hd/2]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rope(x, cos, sin):  # [B, T, H, hd], [(B,) T, hd/2] x2 -> [B, T, H, hd]
    # rotate each adjacent pair (x[2i], x[2i+1]) by its angle: the GGUF converter permuted Q and K for this
    x0, x1 = x[..., 0::2], x[..., 1::2]                         # [B, T, H, hd/2] each
    c, s = cos[..., None, :], sin[..., None, :]                 # [(B,) T, 1, hd/2]
    return np.stack([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1).reshape(x.shape)


def rope_backward(dy, cos, sin):  # a rotation's transpose is the rotation back: [B, T, H, hd] -> [B, T, H, hd]
    return rope(dy, cos, -sin)


# -- the block ---------------------------------------------------------------------------------------------
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


MATRICES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")  # a block's linear maps, in this order everywhere
# Layer field -> tensor name in the GGUF (blk.N.<name>)
TENSOR_NAMES = {"attn_norm": "attn_norm.weight", "wq": "attn_q.weight", "wk": "attn_k.weight",
                "wv": "attn_v.weight", "wo": "attn_output.weight", "ffn_norm": "ffn_norm.weight",
                "w_gate": "ffn_gate.weight", "w_up": "ffn_up.weight", "w_down": "ffn_down.weight"}


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

    def reserve(self, n, limit=None):
        """Room for n positions, growing by doubling up to `limit` (untouched zeros cost nothing, but every
        touched layer of one big allocation would be backed by huge pages). k and v may become new arrays."""
        if n > self.k.shape[2]:
            grown = max(n, min(2 * self.k.shape[2], limit or 2 * self.k.shape[2]))
            k, v = (np.zeros(self.k.shape[:2] + (grown,) + self.k.shape[3:], self.k.dtype) for _ in range(2))
            k[:, :, :self.length], v[:, :, :self.length] = self.k[:, :, :self.length], self.v[:, :, :self.length]
            self.k, self.v = k, v
        return self


def qkv(a, layer, cfg, cos, sin):  # [B, T, d] (normalized) -> q [B, T, H, hd], k, v [B, T, Hkv, hd]
    B, T, _ = a.shape
    q = rope(linear(a, layer.wq).reshape(B, T, cfg.n_heads, cfg.head_dim), cos, sin)     # [B, T, H, hd]
    k = rope(linear(a, layer.wk).reshape(B, T, cfg.n_kv_heads, cfg.head_dim), cos, sin)  # [B, T, Hkv, hd]
    v = linear(a, layer.wv).reshape(B, T, cfg.n_kv_heads, cfg.head_dim)                  # [B, T, Hkv, hd]
    return q, k, v


def attention_layer(a, layer, cfg, cos, sin, mask, cache=None, i=0, saved=None):  # [B, T, d] -> [B, T, d]
    B, T, _ = a.shape
    q, k, v = qkv(a, layer, cfg, cos, sin)
    if cache is not None and cache.k.shape[1] == B:  # append to the cache, attend over everything in it
        start = cache.length
        cache.k[i, :, start:start + T], cache.v[i, :, start:start + T] = k, v
        k, v = cache.k[i, :, :start + T], cache.v[i, :, :start + T]                       # [B, S, Hkv, hd]
    elif cache is not None:  # one cached prefix shared by B continuations (left unchanged)
        pk, pv = (np.broadcast_to(c[i, :, :cache.length], (B, cache.length, *k.shape[2:])) for c in (cache.k, cache.v))
        k, v = np.concatenate([pk, k], axis=1), np.concatenate([pv, v], axis=1)           # [B, S, Hkv, hd]
    o = attention(q, k, v, mask, saved).reshape(B, T, -1)                                # [B, T, H*hd]
    if saved is not None:
        saved.update(q=q, k=k, v=v, o=o)
    return linear(o, layer.wo)                                                           # [B, T, d]


def attention_layer_backward(dy, a, layer, cfg, cos, sin, mask, need_dw=False, saved=None):  # -> da [B, T, d], dws
    B, T, _ = a.shape
    q, k, v = (saved["q"], saved["k"], saved["v"]) if saved else qkv(a, layer, cfg, cos, sin)
    o = saved["o"] if saved else attention(q, k, v, mask).reshape(B, T, -1) if need_dw else None  # [B, T, H*hd]
    do, d_wo = linear_backward(dy, o, layer.wo, need_dw)
    dq, dk, dv = attention_backward(do.reshape(B, T, cfg.n_heads, cfg.head_dim), q, k, v, mask, saved)
    dq, dk = rope_backward(dq, cos, sin), rope_backward(dk, cos, sin)
    da_q, d_wq = linear_backward(dq.reshape(B, T, -1), a, layer.wq, need_dw)
    da_k, d_wk = linear_backward(dk.reshape(B, T, -1), a, layer.wk, need_dw)
    da_v, d_wv = linear_backward(dv.reshape(B, T, -1), a, layer.wv, need_dw)
    return da_q + da_k + da_v, dict(wq=d_wq, wk=d_wk, wv=d_wv, wo=d_wo)


def block(x, layer, cfg, cos, sin, mask, cache=None, i=0, saved=None):  # [B, T, d] -> [B, T, d]
    """One block; `saved` (a dict), if given, keeps what the backward needs: the input x, the normalized a and
    f, the mid-block residual h, and the attention's and the SwiGLU's insides."""
    a = rms_norm(x, layer.attn_norm, cfg.norm_eps)                                        # [B, T, d]
    h = x + attention_layer(a, layer, cfg, cos, sin, mask, cache, i, saved)               # [B, T, d]
    f = rms_norm(h, layer.ffn_norm, cfg.norm_eps)                                         # [B, T, d]
    if saved is not None:
        saved.update(x=x, a=a, h=h, f=f)
    return h + swiglu(f, layer.w_gate, layer.w_up, layer.w_down, saved)


def block_backward(dy, layer, cfg, cos, sin, mask, saved, need_dw=False):
    """d(block output) [B, T, d] and what the forward saved -> dx [B, T, d], and with need_dw the gradients of
    the layer's weights as a dict named like Layer's fields (None where a weight has none)."""
    x, a, h, f = saved["x"], saved["a"], saved["h"], saved["f"]
    df, d_ffn = swiglu_backward(dy, f, layer.w_gate, layer.w_up, layer.w_down, need_dw, saved)
    d_gate, d_up, d_down = d_ffn or (None,) * 3
    dh_norm, d_ffn_norm = rms_norm_backward(df, h, layer.ffn_norm, cfg.norm_eps, need_dw)
    dh = dy + dh_norm                                                                     # [B, T, d]
    da, d_attn = attention_layer_backward(dh, a, layer, cfg, cos, sin, mask, need_dw, saved)
    dx_norm, d_attn_norm = rms_norm_backward(da, x, layer.attn_norm, cfg.norm_eps, need_dw)
    return dh + dx_norm, dict(attn_norm=d_attn_norm, ffn_norm=d_ffn_norm, w_gate=d_gate, w_up=d_up,
                              w_down=d_down, **d_attn)


# -- the decoder -------------------------------------------------------------------------------------------
class Llama:
    """SmolLM2's weights and the whole forward pass. `Llama.load(path)` dequantizes the GGUF to float32."""

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
        if "output.weight" in g.tensors:
            g.fail("has a separate output.weight; tinyllava supports tied embeddings only (as in SmolLM2)")
        layers = [Layer(**{f: g.weight(f"blk.{i}.{n}", load_matrix) for f, n in TENSOR_NAMES.items()})
                  for i in range(cfg.n_layers)]
        model = cls(cfg, g.weight("token_embd.weight", load_matrix), layers, g.weight("output_norm.weight"))
        model.gguf = g
        return model

    def named_weights(self):  # -> {GGUF tensor name: weight}, the names the file and the gradients use
        out = {"token_embd.weight": self.embedding, "output_norm.weight": self.norm}
        for i, layer in enumerate(self.layers):
            out |= {f"blk.{i}.{TENSOR_NAMES[f.name]}": getattr(layer, f.name) for f in fields(Layer)}
        return out

    def embed(self, ids):  # [B, T] int -> [B, T, d]
        ids = np.asarray(ids)
        if isinstance(self.embedding, np.ndarray):
            return self.embedding[ids]
        return self.embedding.rows(ids)

    def forward(self, x, cache=None, valid=None, hidden_states=None, positions=None, mask=None, saved=None):
        """Run the blocks on input embeddings x [B, T, d] -> the last block's output [B, T, d].

        With a cache, x continues the sequence the cache holds; a cache of batch 1 under B > 1 sequences is a
        prefix they all share, read but not extended. `valid` [B, S] bool marks real tokens (False: padding).
        `positions` [T] and `mask` [B or 1, 1, T, S] replace the plain causal layout, for several sequences
        packed into one (see model.pack). If lists are given, `hidden_states` gets each block's output and
        `saved` a dict per block of what its backward needs (see block)."""
        B, T, _ = x.shape
        start = cache.length if cache is not None else 0
        if cache is not None and cache.k.shape[1] == B and start + T > cache.k.shape[2]:
            raise TinyLlavaError(f"{start + T} positions do not fit in the KV cache ({cache.k.shape[2]})")
        positions = np.arange(start, start + T) if positions is None else positions
        mask = causal_mask(T, start, valid) if mask is None else mask
        cos, sin = rope_angles(positions, self.cfg.head_dim, self.cfg.rope_theta)
        for i, layer in enumerate(self.layers):
            kept = None if saved is None else {}
            x = block(x, layer, self.cfg, cos, sin, mask, cache, i, kept)
            if saved is not None:
                saved.append(kept)
            if hidden_states is not None:
                hidden_states.append(x)
        if cache is not None and cache.k.shape[1] == B:
            cache.length += T
        return x

    def logits(self, h):  # [..., d] -> [..., vocab]
        return linear(rms_norm(h, self.norm, self.cfg.norm_eps), self.embedding)

    def backward(self, dh, saved, positions, mask, need_dw=False):
        """d(last block's output) [B, T, d] and what forward(saved=[]) kept -> d(x) [B, T, d], and the weight
        gradients {GGUF name: array} (empty unless need_dw; a weight that has no gradient, a frozen quantized
        matrix, is left out)."""
        cos, sin = rope_angles(positions, self.cfg.head_dim, self.cfg.rope_theta)
        grads = {}
        for i in reversed(range(self.cfg.n_layers)):
            dh, dws = block_backward(dh, self.layers[i], self.cfg, cos, sin, mask, saved[i], need_dw)
            for field, dw in dws.items():
                add_grad(grads, f"blk.{i}.{TENSOR_NAMES[field]}", dw)
        return dh, grads

    def loss_and_grad(self, x, at, targets, positions=None, mask=None, need_dw=False):
        """Cross-entropy of chosen next tokens, and its gradients.

        x [B, T, d]; at [N]: flat indices into B*T of the positions scored (one may repeat: in a packed sequence
        the last image token predicts the first word of every caption); targets [N]: the token each should
        predict. need_dw: False, True, or the set of weight names wanted (every block's are computed if any
        is; the embedding's only if named, as it costs a vocab x d product).
        -> (summed loss, d(loss)/dx [B, T, d], weight gradients {GGUF name: array}; the embedding's here is
        only its part as the output matrix: the caller adds dx at the positions of text tokens)."""
        B, T, d = x.shape
        positions = np.arange(T) if positions is None else positions
        mask = causal_mask(T) if mask is None else mask
        saved = []
        h = self.forward(x, positions=positions, mask=mask, saved=saved)            # [B, T, d]
        hs = h.reshape(-1, d)[at]                                                    # [N, d]
        n = rms_norm(hs, self.norm, self.cfg.norm_eps)                               # [N, d]
        logits = linear(n, self.embedding)                                           # [N, vocab]
        loss = cross_entropy(logits, targets)
        embedding_dw = need_dw is True or "token_embd.weight" in (need_dw or ())
        dn, d_embedding = linear_backward(cross_entropy_backward(logits, targets), n, self.embedding, embedding_dw)
        dhs, d_norm = rms_norm_backward(dn, hs, self.norm, self.cfg.norm_eps, bool(need_dw))  # [N, d]
        dh = np.zeros((B * T, d), h.dtype)
        np.add.at(dh, at, dhs)
        dx, grads = self.backward(dh.reshape(B, T, d), saved, positions, mask, bool(need_dw))
        add_grad(grads, "output_norm.weight", d_norm)
        add_grad(grads, "token_embd.weight", d_embedding)
        return loss, dx, grads


def add_grad(grads, name, dw):  # a weight's gradient into the flat dict; a LoRA's parts as name.lora_a, ...
    if isinstance(dw, dict):
        grads.update({f"{name}.{k}": v for k, v in dw.items()})
    elif dw is not None:
        grads[name] = dw
