"""The projector: CLIP patch features [.., 768] -> the decoder's token embedding space [.., 576].

LLaVA v1:   linear        y = f W0.T + b0
LLaVA v1.5: mlp2x_gelu    y = gelu(f W0.T + b0) W2.T + b2    (GELU with the tanh approximation, as llama.cpp's
                                                            LLaVA projector computes it)

Stage 1 trains only this; stage 2 trains it together with the decoder. Saved as a small GGUF with llama.cpp's
projector names: mm.0.* is the first linear layer, mm.2.* the second (mm.1 is the GELU, which has no weights).

To add a projector type, add one row to KINDS: its parameters' shapes, forward, backward, its llama.cpp
tensors and its stage-1 learning rate. Training, loading, saving and export read everything from that row.
"""
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .errors import TinyLlavaError
from .gguf import GGUFFile, write_gguf
from .ops import gelu_tanh, gelu_tanh_backward, linear, linear_backward

LINEAR_SHIFT = 64.0  # see linear_as_mlp


# -- the kinds -----------------------------------------------------------------------------------------------
def linear_forward(p, f):  # params, [..., d_in] -> [..., d_out]
    return linear(f, p["w0"], p["b0"])


def linear_grads(p, dy, f):  # params, d(output) [M, d_out], input [M, d_in] -> gradients of params
    return {"w0": linear_backward(dy, f, p["w0"], need_dw=True)[1], "b0": dy.sum(0)}


def linear_as_mlp(p):
    """llama.cpp's projectors include "mlp" (mm.0 -> GELU -> mm.2), not a plain linear one. A linear projector
    becomes mm.0 = [W; b + C], mm.2 = [I; -C] with C = 64: ggml's GELU returns x itself for x >= 10, so
    GELU(Wx + b + C) - C = Wx + b while every Wx + b > -54."""
    d = p["w0"].shape[0]
    return {"mm.0.weight": p["w0"], "mm.0.bias": p["b0"] + np.float32(LINEAR_SHIFT),
            "mm.2.weight": np.eye(d, dtype=np.float32), "mm.2.bias": np.full(d, -LINEAR_SHIFT, np.float32)}


def mlp_forward(p, f):  # params, [..., d_in] -> [..., d_out]
    return linear(gelu_tanh(linear(f, p["w0"], p["b0"])), p["w2"], p["b2"])


def mlp_grads(p, dy, f):  # params, d(output) [M, d_out], input [M, d_in] -> gradients of params
    h = linear(f, p["w0"], p["b0"])                                    # [M, d_out] (recomputed)
    dg, dw2 = linear_backward(dy, gelu_tanh(h), p["w2"], need_dw=True)  # [M, d_out]
    dh = gelu_tanh_backward(dg, h)                                     # [M, d_out]
    return {"w0": linear_backward(dh, f, p["w0"], need_dw=True)[1], "b0": dh.sum(0), "w2": dw2, "b2": dy.sum(0)}


@dataclass(frozen=True)
class Kind:
    shapes: Callable    # (d_in, d_out) -> {param name: shape}
    forward: Callable   # (params, f [..., d_in]) -> [..., d_out]
    grads: Callable     # (params, dy [M, d_out], f [M, d_in]) -> {param name: gradient}
    llama_cpp: Callable  # params -> {llama.cpp's mm.* tensor name: array}
    lr: float           # LLaVA's stage-1 learning rate (v1: 2e-3, v1.5: 1e-3)


KINDS = {
    "linear": Kind(lambda i, o: {"w0": (o, i), "b0": (o,)}, linear_forward, linear_grads, linear_as_mlp, 2e-3),
    "mlp2x_gelu": Kind(lambda i, o: {"w0": (o, i), "b0": (o,), "w2": (o, o), "b2": (o,)}, mlp_forward, mlp_grads,
                       lambda p: {"mm.0.weight": p["w0"], "mm.0.bias": p["b0"], "mm.2.weight": p["w2"],
                                  "mm.2.bias": p["b2"]}, 1e-3),
}
FILE_NAMES = {"w0": "mm.0.weight", "b0": "mm.0.bias", "w2": "mm.2.weight", "b2": "mm.2.bias"}  # in our GGUF


class Projector:
    """The trained map from image features to image tokens: one of KINDS (linear, mlp2x_gelu), its parameters by
    name. forward and backward as the table of kinds says; saved and loaded as a GGUF of llama.cpp's mmproj names."""

    def __init__(self, kind, params):
        if kind not in KINDS:
            raise TinyLlavaError(f"unknown projector {kind!r} (choose from {', '.join(KINDS)})")
        self.kind = kind
        self.params = params  # name -> array, as KINDS[kind].shapes names them

    @classmethod
    def init(cls, kind, d_in=768, d_out=576, seed=0):
        """PyTorch's nn.Linear initialization: uniform in +-1/sqrt(fan_in), for weights and their biases."""
        if kind not in KINDS:
            raise TinyLlavaError(f"unknown projector {kind!r} (choose from {', '.join(KINDS)})")
        rng = np.random.default_rng(seed)
        shapes = KINDS[kind].shapes(d_in, d_out)
        fan_in = {name: shapes["w" + name[1:]][1] for name in shapes}  # a bias shares its weight's fan-in
        return cls(kind, {name: rng.uniform(-1, 1, shape).astype(np.float32) / np.float32(np.sqrt(fan_in[name]))
                          for name, shape in shapes.items()})

    @property
    def d_in(self):
        return self.params["w0"].shape[1]

    @property
    def d_out(self):
        return self.params["w0"].shape[0]

    def forward(self, f):  # [..., d_in] -> [..., d_out]
        return KINDS[self.kind].forward(self.params, f)

    def backward(self, dy, f):  # d(output) [..., d_out], the input [..., d_in] -> gradients of params
        return KINDS[self.kind].grads(self.params, dy.reshape(-1, dy.shape[-1]), f.reshape(-1, f.shape[-1]))

    # -- file -------------------------------------------------------------------------------------------
    def save(self, path, metadata=None):
        meta = {"general.architecture": "clip", "general.name": f"tinyllava projector ({self.kind})",
                "clip.has_llava_projector": True, "clip.projector_type": "mlp",
                "tinyllava.projector": self.kind, **(metadata or {})}
        return write_gguf(path, meta, {FILE_NAMES[k]: np.ascontiguousarray(v, np.float32) for k, v in self.params.items()})

    @classmethod
    def load(cls, path):
        g = GGUFFile(path)
        if "mm.0.weight" not in g.tensors:
            g.fail("has no projector (no mm.0.weight): pass a projector GGUF made by tinyllava.train")
        kind = g.get("tinyllava.projector") or ("mlp2x_gelu" if "mm.2.weight" in g.tensors else "linear")
        if kind not in KINDS:
            g.fail(f"unknown projector type {kind!r} (tinyllava knows {', '.join(KINDS)})")
        params = {k: g.tensor(n).numpy() for k, n in FILE_NAMES.items() if n in g.tensors}
        if set(params) != set(KINDS[kind].shapes(1, 1)):
            g.fail(f"a {kind} projector needs {sorted(FILE_NAMES[k] for k in KINDS[kind].shapes(1, 1))}")
        return cls(kind, params)
