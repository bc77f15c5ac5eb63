"""The projector: CLIP patch features [.., 768] -> the decoder's token embedding space [.., 576].

LLaVA v1:   linear        y = f W0.T + b0
LLaVA v1.5: mlp2x_gelu    y = gelu(f W0.T + b0) W2.T + b2    (GELU with the tanh approximation, as llama.cpp's
                                                            LLaVA projector computes it)

It is the only thing stage 1 trains. Saved as a small GGUF with llama.cpp's projector names: mm.0.* is the
first linear layer, mm.2.* the second (mm.1 is the GELU, which has no weights).
"""
import math

import numpy as np

from .errors import TinyLlavaError
from .gguf import GGUFFile, write_gguf

KINDS = ("linear", "mlp2x_gelu")
SQRT_2_OVER_PI = math.sqrt(2 / math.pi)  # a Python float: keeps float32 arrays float32


def gelu_tanh(x):  # [...] -> [...]
    return 0.5 * x * (1 + np.tanh(SQRT_2_OVER_PI * (x + 0.044715 * x ** 3)))


def gelu_tanh_backward(dy, x):  # [...], [...] -> dx [...]
    t = np.tanh(SQRT_2_OVER_PI * (x + 0.044715 * x ** 3))
    return dy * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * SQRT_2_OVER_PI * (1 + 3 * 0.044715 * x * x))


class Projector:
    def __init__(self, kind, params):
        if kind not in KINDS:
            raise TinyLlavaError(f"unknown projector {kind!r} (choose from {', '.join(KINDS)})")
        self.kind = kind
        self.params = params  # "w0" [out, in], "b0" [out] (+ "w2" [out, out], "b2" [out] for mlp2x_gelu)

    @classmethod
    def init(cls, kind, d_in=768, d_out=576, seed=0):
        """PyTorch's nn.Linear initialization: uniform in +-1/sqrt(fan_in), for weights and biases."""
        rng = np.random.default_rng(seed)
        u = lambda shape, fan_in: rng.uniform(-1, 1, shape).astype(np.float32) / np.float32(np.sqrt(fan_in))  # noqa
        p = {"w0": u((d_out, d_in), d_in), "b0": u(d_out, d_in)}
        if kind == "mlp2x_gelu":
            p.update(w2=u((d_out, d_out), d_out), b2=u(d_out, d_out))
        return cls(kind, p)

    @property
    def d_in(self):
        return self.params["w0"].shape[1]

    @property
    def d_out(self):
        return self.params["w0"].shape[0]

    def forward(self, f):  # [..., d_in] -> [..., d_out]
        p = self.params
        h = f @ p["w0"].T + p["b0"]                                    # [..., d_out]
        if self.kind == "linear":
            return h
        return gelu_tanh(h) @ p["w2"].T + p["b2"]                      # [..., d_out]

    def backward(self, dy, f):  # d(output) [..., d_out], the input [..., d_in] -> gradients of params
        p = self.params
        f2, dy2 = f.reshape(-1, f.shape[-1]), dy.reshape(-1, dy.shape[-1])  # [M, d_in], [M, d_out]
        if self.kind == "linear":
            return {"w0": dy2.T @ f2, "b0": dy2.sum(0)}
        h = f2 @ p["w0"].T + p["b0"]                                   # [M, d_out] (recomputed)
        g = gelu_tanh(h)                                               # [M, d_out]
        dh = gelu_tanh_backward(dy2 @ p["w2"], h)                      # [M, d_out]
        return {"w0": dh.T @ f2, "b0": dh.sum(0), "w2": dy2.T @ g, "b2": dy2.sum(0)}

    # -- file -------------------------------------------------------------------------------------------
    NAMES = {"w0": "mm.0.weight", "b0": "mm.0.bias", "w2": "mm.2.weight", "b2": "mm.2.bias"}

    def save(self, path, metadata=None):
        meta = {"general.architecture": "clip", "general.name": f"tinyllava projector ({self.kind})",
                "clip.has_llava_projector": True, "clip.projector_type": "mlp",
                "tinyllava.projector": self.kind, **(metadata or {})}
        write_gguf(path, meta, {self.NAMES[k]: np.ascontiguousarray(v, np.float32) for k, v in self.params.items()})

    @classmethod
    def load(cls, path):
        g = GGUFFile(path)
        if "mm.0.weight" not in g.tensors:
            g._fail("has no projector (no mm.0.weight): pass a projector GGUF made by tinyllava.train")
        kind = g.get("tinyllava.projector") or ("mlp2x_gelu" if "mm.2.weight" in g.tensors else "linear")
        params = {k: g.tensor(n).numpy() for k, n in cls.NAMES.items() if n in g.tensors}
        proj = cls(kind, params)
        if set(params) != set(cls.init(kind, 2, 2).params):
            g._fail(f"a {kind} projector needs {sorted(cls.NAMES[k] for k in cls.init(kind, 2, 2).params)}")
        return proj
