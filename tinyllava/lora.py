"""LoRA (Hu et al. 2021): a frozen weight W plus a trainable low-rank update.

    y = x W^T + s (x A^T) B^T        A [r, n_in], B [n_out, r], s = alpha / r

A starts random and B at zero, so a new adapter changes nothing; training moves only A and B: r (n_in + n_out)
numbers per matrix instead of n_in n_out. Their gradients, from dy = d(loss)/dy and the input x:

    dB = s dy^T (x A^T)              [n_out, r]
    dA = s (dy B)^T x                [r, n_in]
    dx = dy W + s (dy B) A           (what flows on to the layer below)

W stays whatever it was: a float32 array, or the file's quantized blocks (fused.QuantMatrix), so the adapter
runs beside each quantized product. Saved as llama.cpp's LoRA GGUF (general.type = adapter): tensors
blk.N.attn_q.weight.lora_a [r, n_in] and .lora_b [n_out, r] in float16, adapter.lora.alpha. A loaded adapter
stays float16, in the file's pages (half the memory of float32; NumPy widens it in each product, exactly);
training widens what it trains to float32.
"""
import numpy as np

from .errors import TinyLlavaError
from .gguf import GGUFFile, ValueType, write_gguf
from .llama import MATRICES, TENSOR_NAMES
from .ops import linear
from .quant import GGMLType

FIELD = {TENSOR_NAMES[f].removesuffix(".weight"): f for f in MATRICES}  # adapter target (attn_q) -> Layer field
TARGETS = tuple(FIELD)  # every linear


class LoRA:
    """W + s B A as one matrix for the layers: `matmul(x)` = x @ (W + s B A).T, `dy @ lora` = dy @ (W + s B A),
    `weight_grad(dy, x)` = the gradients of A and B."""

    __array_ufunc__ = None  # so that `dy @ lora` (NumPy on the left) comes to __rmatmul__

    def __init__(self, w, a, b, scale):
        self.w, self.a, self.b, self.scale = w, a, b, np.float32(scale)  # [n_out, n_in], [r, n_in], [n_out, r]

    @property
    def shape(self):
        return self.w.shape

    def matmul(self, x):  # [..., n_in] -> [..., n_out]
        return linear(x, self.w) + self.scale * ((x @ self.a.T) @ self.b.T)

    def __rmatmul__(self, dy):  # [..., n_out] -> [..., n_in]
        return dy @ self.w + self.scale * ((dy @ self.b) @ self.a)

    def weight_grad(self, dy, x):  # dy [M, n_out], x [M, n_in] -> {"lora_a": [r, n_in], "lora_b": [n_out, r]}
        return {"lora_a": self.scale * ((dy @ self.b).T @ x), "lora_b": self.scale * (dy.T @ (x @ self.a.T))}

    def merged(self):  # -> [n_out, n_in]: W + s B A, float32 (float64 if W, A or B is)
        w = self.w if isinstance(self.w, np.ndarray) else self.w.dequantize()
        dtype = np.result_type(self.a, self.b, np.float32)    # a loaded adapter's float16 widens; float64 stays
        return w + self.scale * (self.b.astype(dtype, copy=False) @ self.a.astype(dtype, copy=False))


def attach(decoder, rank=16, alpha=32.0, targets=TARGETS, seed=0):
    """Wrap the decoder's target matrices in new adapters (A uniform in +-1/sqrt(n_in), as PEFT initializes
    it; B zero). -> {name: array} of what trains, named as in the adapter file (blk.N.attn_q.weight.lora_a)."""
    if rank < 1:
        raise TinyLlavaError(f"the LoRA rank must be at least 1, not {rank}")
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise TinyLlavaError(f"unknown LoRA targets {sorted(unknown)} (choose from {', '.join(TARGETS)})")
    rng = np.random.default_rng(seed)
    params = {}
    for i, layer in enumerate(decoder.layers):
        for t in targets:
            w = getattr(layer, FIELD[t])
            n_out, n_in = w.shape
            a = (rng.uniform(-1, 1, (rank, n_in)) / np.sqrt(n_in)).astype(np.float32)
            setattr(layer, FIELD[t], LoRA(w, a, np.zeros((n_out, rank), np.float32), alpha / rank))
            params |= {f"blk.{i}.{t}.weight.lora_a": a, f"blk.{i}.{t}.weight.lora_b": getattr(layer, FIELD[t]).b}
    return params


def adapters(decoder):  # -> {GGUF weight name: LoRA} of the decoder's wrapped matrices
    return {f"blk.{i}.{TENSOR_NAMES[f]}": getattr(layer, f) for i, layer in enumerate(decoder.layers)
            for f in FIELD.values() if isinstance(getattr(layer, f), LoRA)}


def save(path, decoder, alpha, metadata=None):
    """The decoder's adapters as llama.cpp's LoRA GGUF, A and B in float16 as llama.cpp's own converter writes
    them: half the file (training keeps float32 in its checkpoint)."""
    tensors = {}
    for name, m in adapters(decoder).items():
        tensors[name + ".lora_a"], tensors[name + ".lora_b"] = m.a.astype(np.float16), m.b.astype(np.float16)
    meta = {"general.architecture": "llama", "general.type": "adapter", "adapter.type": "lora",
            "adapter.lora.alpha": float(alpha), "general.name": "tinyllava stage-2 LoRA", **(metadata or {})}
    return write_gguf(path, meta, tensors, types={"adapter.lora.alpha": (ValueType.FLOAT32, None)})


def load(path, decoder):
    """Attach the adapters of a LoRA GGUF to the decoder, checking every name and shape against it."""
    g = GGUFFile(path)
    if g.get("general.type") != "adapter" or g.get("adapter.type") != "lora":
        g.fail("is not a LoRA adapter (general.type must be 'adapter' and adapter.type 'lora')")
    weights = decoder.named_weights()
    if adapters(decoder):
        g.fail("cannot go on this decoder: it has adapters already (load the base model again)")
    pairs = {}
    for name in g.tensors:
        base, _, part = name.rpartition(".")
        if part not in ("lora_a", "lora_b") or base not in weights or base.split(".")[-2] not in FIELD:
            g.fail(f"tensor {name!r} adapts nothing in this decoder")
        t = g.tensor(name)
        pairs.setdefault(base, {})[part] = (t.data.view("<f2").reshape(t.shape) if t.type == GGMLType.F16 else
                                            t.numpy())                        # float16 stays: a view of the file
    alpha = g.require("adapter.lora.alpha")
    for base, p in pairs.items():
        if set(p) != {"lora_a", "lora_b"}:
            g.fail(f"{base} has only {sorted(p)}: needs lora_a and lora_b")
        a, b = p["lora_a"], p["lora_b"]
        n_out, n_in = weights[base].shape
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != n_in or b.shape[0] != n_out or a.shape[0] != b.shape[1] \
                or a.shape[0] < 1:
            g.fail(f"{base}: lora_a {a.shape} and lora_b {b.shape} do not fit a {n_out}x{n_in} matrix")
        i, field = int(base.split(".")[1]), FIELD[base.split(".")[2]]
        setattr(decoder.layers[i], field, LoRA(getattr(decoder.layers[i], field), a, b, alpha / a.shape[0]))
    return decoder
