"""How LLaVA updates its weights: AdamW, a learning rate that warms up linearly and decays as a cosine, and the
gradient clipped to a largest norm. Parameters and gradients are flat dicts of arrays, name -> array.
"""
import math

import numpy as np


def lr_at(step, total, base, warmup):
    """Linear warmup over `warmup` steps, then cosine decay to zero (as transformers' cosine schedule)."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def clip_grad_norm(grads, max_norm):  # {name: array} -> (the same, scaled to norm <= max_norm; the norm before)
    norm = math.sqrt(sum(float((g * g).sum()) for g in grads.values()))
    if norm > max_norm:
        grads = {k: g * (max_norm / norm) for k, g in grads.items()}
    return grads, norm


class AdamW:
    """m, v: running means of the gradient and its square; the step is m_hat / (sqrt(v_hat) + eps), with the
    weight decay applied to the weight directly (decoupled, the W of AdamW). Updates the arrays in place."""

    def __init__(self, params, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        self.betas, self.eps, self.wd = betas, eps, weight_decay
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}
        self.t = 0

    def step(self, params, grads, lr):
        self.t += 1
        b1, b2 = self.betas
        for k, g in grads.items():
            self.m[k] = b1 * self.m[k] + (1 - b1) * g
            self.v[k] = b2 * self.v[k] + (1 - b2) * g * g
            m_hat = self.m[k] / (1 - b1 ** self.t)
            v_hat = self.v[k] / (1 - b2 ** self.t)
            params[k][...] = params[k] * (1 - lr * self.wd) - lr * m_hat / (np.sqrt(v_hat) + self.eps)
