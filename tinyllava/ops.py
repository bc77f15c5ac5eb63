"""The primitives both towers are built from, each forward with its backward right below it.

A backward takes the gradient of its forward's output and the forward's own inputs, and returns the gradients
of those inputs. What it needs from inside the forward (an activation, attention's probabilities) it
recomputes, unless the forward kept it in `saved` (a dict the caller passes to both): training keeps them, at
the cost of memory, to skip the recomputation. Weight gradients are computed only when asked
(`need_dw=True`): stage 1 trains no weight of either tower, stage 2 trains the decoder's.

Matrices are stored as in a GGUF, (n_out, n_in), so a linear layer is x @ W.T. A matrix may also be an object
that computes the same products: `w.matmul(x)` = x @ W.T, `dy @ w` = dy @ W, and, if it has trainable parts,
`w.weight_grad(dy, x)` = their gradients (fused.QuantMatrix keeps quantized blocks; lora.LoRA adds a
trainable low-rank update to a frozen matrix).
"""
import math

import numpy as np

SQRT_2_OVER_PI = math.sqrt(2 / math.pi)  # Python floats keep float32 arrays float32


# -- linear ------------------------------------------------------------------------------------------------
def linear(x, w, b=None):  # [..., n_in], [n_out, n_in], [n_out] -> [..., n_out]
    if isinstance(w, np.ndarray):
        y = (x.reshape(-1, x.shape[-1]) @ w.T).reshape(*x.shape[:-1], w.shape[0])  # 2-D: one BLAS call
    else:
        y = w.matmul(x)
    return y if b is None else y + b


def linear_backward(dy, x, w, need_dw=False):  # [..., n_out], [..., n_in], [n_out, n_in] -> dx [..., n_in], dw
    """dx = dy @ W; with need_dw, dw = dy.T @ x [n_out, n_in] summed over every leading axis (for a matrix
    object, what its weight_grad returns, or None if it has none: a frozen quantized matrix). The bias
    gradient, where there is one, is dy summed likewise."""
    dy2 = dy.reshape(-1, dy.shape[-1])                                                  # [M, n_out]
    dx = (dy2 @ w).reshape(*dy.shape[:-1], -1)                                          # [..., n_in]
    if not need_dw:
        return dx, None
    x2 = x.reshape(-1, x.shape[-1])                                                     # [M, n_in]
    if isinstance(w, np.ndarray):
        return dx, dy2.T @ x2                                                           # [n_out, n_in]
    return dx, (w.weight_grad(dy2, x2) if hasattr(w, "weight_grad") else None)


# -- normalization -----------------------------------------------------------------------------------------
def rms_norm(x, w, eps):  # [..., d], [d] -> [..., d]
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rms_norm_backward(dy, x, w, eps, need_dw=False):  # [..., d], [..., d], [d] -> dx [..., d], dw [d]
    """y = x r w with r = 1/sqrt(mean(x^2) + eps): dr/dx = -x r^3 / d, so dx = r g - x r^3 mean(g x), g = dy w."""
    r = 1 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)                       # [..., 1]
    g = dy * w                                                                          # [..., d]
    dx = r * g - x * (r ** 3) * np.mean(g * x, axis=-1, keepdims=True)                  # [..., d]
    return dx, ((dy * x * r).reshape(-1, x.shape[-1]).sum(0) if need_dw else None)


def layer_norm(x, w, b, eps):  # [..., d], [d], [d] -> [..., d]
    mu = x.mean(axis=-1, keepdims=True)                                                 # [..., 1]
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)                                  # [..., 1]
    return (x - mu) / np.sqrt(var + eps) * w + b


def layer_norm_backward(dy, x, w, eps):  # [..., d], [..., d], [d] -> dx [..., d]  (CLIP's tower stays frozen)
    """n = (x - mu) r, y = n w + b: dx = r (g - mean(g) - n mean(g n)), g = dy w."""
    mu = x.mean(axis=-1, keepdims=True)                                                 # [..., 1]
    r = 1 / np.sqrt(((x - mu) ** 2).mean(axis=-1, keepdims=True) + eps)                 # [..., 1]
    n, g = (x - mu) * r, dy * w                                                         # [..., d] each
    return r * (g - g.mean(axis=-1, keepdims=True) - n * (g * n).mean(axis=-1, keepdims=True))


# -- activations -------------------------------------------------------------------------------------------
def silu(x):  # [...] -> [...]: x * sigmoid(x)
    return x / (1 + np.exp(-x))


def silu_backward(dy, x):  # d silu / dx = s (1 + x (1 - s)), s = sigmoid(x)
    s = 1 / (1 + np.exp(-x))
    return dy * s * (1 + x * (1 - s))


def quick_gelu(x):  # [...] -> [...]: CLIP's GELU, x * sigmoid(1.702 x)
    return x / (1 + np.exp(-1.702 * x))


def quick_gelu_backward(dy, x):  # s + 1.702 x s (1 - s), s = sigmoid(1.702 x)
    s = 1 / (1 + np.exp(-1.702 * x))
    return dy * (s + 1.702 * x * s * (1 - s))


def gelu_tanh(x):  # [...] -> [...]: GELU with the tanh approximation (LLaVA's projector, as llama.cpp computes it)
    return 0.5 * x * (1 + np.tanh(SQRT_2_OVER_PI * (x + 0.044715 * x ** 3)))


def gelu_tanh_backward(dy, x):  # [...], [...] -> dx [...]
    t = np.tanh(SQRT_2_OVER_PI * (x + 0.044715 * x ** 3))
    return dy * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * SQRT_2_OVER_PI * (1 + 3 * 0.044715 * x * x))


def swiglu(x, w_gate, w_up, w_down, saved=None):  # [..., d], [f, d], [f, d], [d, f] -> [..., d]
    g, u = linear(x, w_gate), linear(x, w_up)                                           # [..., f] each
    if saved is not None:
        saved.update(g=g, u=u)
    return linear(silu(g) * u, w_down)


def swiglu_backward(dy, x, w_gate, w_up, w_down, need_dw=False, saved=None):  # -> dx [..., d], (dgate, dup, ddown)
    g, u = (saved["g"], saved["u"]) if saved else (linear(x, w_gate), linear(x, w_up))  # [..., f] each
    dh, d_down = linear_backward(dy, silu(g) * u, w_down, need_dw)                      # [..., f]
    dx_gate, d_gate = linear_backward(silu_backward(dh * u, g), x, w_gate, need_dw)     # [..., d]
    dx_up, d_up = linear_backward(dh * silu(g), x, w_up, need_dw)                       # [..., d]
    return dx_gate + dx_up, ((d_gate, d_up, d_down) if need_dw else None)


# -- softmax, attention ------------------------------------------------------------------------------------
def softmax(x):  # [..., n] -> [..., n]
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def softmax_backward(dp, p):  # d(output), the output p -> d(input): p (dp - sum(dp p))
    return p * (dp - (dp * p).sum(axis=-1, keepdims=True))


def causal_mask(T, start=0, valid=None):  # -> [B or 1, 1, T, start+T] bool: may query t see key s?
    """Query t (at position start+t) sees keys 0..start+t; `valid` [B, start+T] bool hides padding keys."""
    S = start + T
    mask = (np.arange(S)[None, :] <= start + np.arange(T)[:, None])[None, None]        # [1, 1, T, S]
    return mask if valid is None else mask & valid[:, None, None, :]


def heads(q, k, v):  # [B, T, H, hd], [B, S, Hkv, hd] x2 -> [B, Hkv, rep*T, hd], [B, Hkv, hd, S], [B, Hkv, S, hd]
    """Lay q, k, v out head by head, contiguous (so each product is one BLAS call per head). The `rep` query
    heads that share a key/value head become extra rows of one matrix: that is grouped-query attention."""
    B, T, H, hd = q.shape
    Hkv = k.shape[2]
    qg = np.ascontiguousarray(q.reshape(B, T, Hkv, H // Hkv, hd).transpose(0, 2, 3, 1, 4)).reshape(B, Hkv, -1, hd)
    return qg, np.ascontiguousarray(k.transpose(0, 2, 3, 1)), np.ascontiguousarray(v.transpose(0, 2, 1, 3))


def attention_probs(qg, kt, mask):  # [B, Hkv, rep*T, hd], [B, Hkv, hd, S], [B, 1, T, S] -> [B, Hkv, rep*T, S]
    scores = qg @ kt / math.sqrt(kt.shape[2])                                           # [B, Hkv, rep*T, S]
    if mask is not None:  # causal (and padding) mask, the same for every query head
        B, Hkv, RT, S = scores.shape
        T = mask.shape[2]
        scores = np.where(mask[:, :, None], scores.reshape(B, Hkv, RT // T, T, S), -np.inf).reshape(B, Hkv, RT, S)
    return softmax(scores.astype(qg.dtype, copy=False))


def attention(q, k, v, mask, saved=None):  # [B, T, H, hd], [B, S, Hkv, hd] x2, [B, 1, T, S] bool -> [B, T, H, hd]
    """softmax(q k^T / sqrt(hd)) v, head by head; H query heads share H / Hkv key/value heads."""
    B, T, H, hd = q.shape
    qg, kt, vh = heads(q, k, v)
    p = attention_probs(qg, kt, mask)                                                   # [B, Hkv, rep*T, S]
    if saved is not None:
        saved["p"] = p
    out = p @ vh                                                                        # [B, Hkv, rep*T, hd]
    return out.reshape(B, -1, H // kt.shape[1], T, hd).transpose(0, 3, 1, 2, 4).reshape(B, T, H, hd)


def attention_backward(dout, q, k, v, mask, saved=None):  # [B, T, H, hd] -> dq [B, T, H, hd], dk, dv [B, S, Hkv, hd]
    B, T, H, hd = q.shape
    qg, kt, vh = heads(q, k, v)
    Hkv = kt.shape[1]
    p = saved["p"] if saved else attention_probs(qg, kt, mask)                          # [B, Hkv, rep*T, S]
    do = np.ascontiguousarray(dout.reshape(B, T, Hkv, H // Hkv, hd).transpose(0, 2, 3, 1, 4)).reshape(qg.shape)
    dv = p.swapaxes(-1, -2) @ do                                                        # [B, Hkv, S, hd]
    ds = softmax_backward(do @ vh.swapaxes(-1, -2), p) / math.sqrt(hd)                  # [B, Hkv, rep*T, S]
    dq = ds @ kt.swapaxes(-1, -2)                                                       # [B, Hkv, rep*T, hd]
    dk = ds.swapaxes(-1, -2) @ qg                                                       # [B, Hkv, S, hd]
    return (dq.reshape(B, Hkv, H // Hkv, T, hd).transpose(0, 3, 1, 2, 4).reshape(B, T, H, hd),
            dk.transpose(0, 2, 1, 3), dv.transpose(0, 2, 1, 3))


# -- the loss ----------------------------------------------------------------------------------------------
def log_softmax(z):  # [..., n] -> [..., n], in float64
    z = z.astype(np.float64) - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def cross_entropy(logits, targets):  # [N, vocab], [N] -> summed -log p(target)
    return float(-log_softmax(logits)[np.arange(len(targets)), targets].sum())


def cross_entropy_backward(logits, targets):  # [N, vocab], [N] -> d(summed loss)/d(logits) [N, vocab]
    d = softmax(logits)                                                                 # p
    d[np.arange(len(targets)), targets] -= 1                                            # p - onehot(target)
    return d
