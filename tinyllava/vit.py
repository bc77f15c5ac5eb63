"""CLIP ViT-B/16, the vision tower of LLaVA: a picture becomes 196 patch vectors.

    pixels [B, 3, 224, 224] -> 14x14 patches of 16x16x3, each a linear map to 768 (a strided convolution)
        -> prepend the class token, add position embeddings, LayerNorm ("pre-LN")
        -> 12 x block:  x = x + attention(layer_norm(x))       (12 heads, every patch sees every patch)
                        x = x + mlp(layer_norm(x))             (768 -> 3072, quick_gelu, -> 768)
    LLaVA's feature:  the output of block 11 of 12 (hidden state -2), without the class token -> [B, 196, 768]
    CLIP's own:       post-LN of the class token, then the visual projection -> image_embeds [B, 512]
"""
from dataclasses import dataclass

import numpy as np

from .gguf import GGUFFile
from .llama import attention, linear


@dataclass
class ClipConfig:
    image_size: int = 224
    patch_size: int = 16
    dim: int = 768
    ffn_dim: int = 3072
    n_layers: int = 12
    n_heads: int = 12
    eps: float = 1e-5
    projection_dim: int = 512

    @classmethod
    def from_gguf(cls, g):
        if g.get("general.architecture") != "clip" or not g.get("clip.has_vision_encoder"):
            g._fail("is not a CLIP vision tower (general.architecture must be 'clip' with a vision encoder)")
        v = "clip.vision."
        return cls(g.require(v + "image_size"), g.require(v + "patch_size"), g.require(v + "embedding_length"),
                   g.require(v + "feed_forward_length"), g.require(v + "block_count"),
                   g.require(v + "attention.head_count"), g.require(v + "attention.layer_norm_epsilon"),
                   g.get(v + "projection_dim", 0))

    @property
    def n_patches(self):
        return (self.image_size // self.patch_size) ** 2


def layer_norm(x, w, b, eps):  # [..., d], [d], [d] -> [..., d]
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def quick_gelu(x):  # [...] -> [...]: CLIP's GELU, x * sigmoid(1.702 x)
    return x / (1 + np.exp(-1.702 * x))


def patchify(pixels, p):  # [B, C, H, W] -> [B, (H/p)*(W/p), C*p*p], patches in row-major order
    B, C, H, W = pixels.shape
    x = pixels.reshape(B, C, H // p, p, W // p, p)                  # [B, C, h, p, w, p]
    return x.transpose(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), C * p * p)


@dataclass
class ClipLayer:
    ln1_w: np.ndarray  # [d]
    ln1_b: np.ndarray  # [d]
    wq: np.ndarray     # [d, d]
    bq: np.ndarray     # [d]
    wk: np.ndarray     # [d, d]
    bk: np.ndarray     # [d]
    wv: np.ndarray     # [d, d]
    bv: np.ndarray     # [d]
    wo: np.ndarray     # [d, d]
    bo: np.ndarray     # [d]
    ln2_w: np.ndarray  # [d]
    ln2_b: np.ndarray  # [d]
    w_up: np.ndarray   # [f, d]
    b_up: np.ndarray   # [f]
    w_down: np.ndarray  # [d, f]
    b_down: np.ndarray  # [d]


def clip_block(x, L, cfg):  # [B, N, d] -> [B, N, d]
    B, N, d = x.shape
    hd = d // cfg.n_heads
    a = layer_norm(x, L.ln1_w, L.ln1_b, cfg.eps)                     # [B, N, d]
    q = (linear(a, L.wq) + L.bq).reshape(B, N, cfg.n_heads, hd)      # [B, N, H, hd]
    k = (linear(a, L.wk) + L.bk).reshape(B, N, cfg.n_heads, hd)      # [B, N, H, hd]
    v = (linear(a, L.wv) + L.bv).reshape(B, N, cfg.n_heads, hd)      # [B, N, H, hd]
    x = x + linear(attention(q, k, v, mask=None).reshape(B, N, d), L.wo) + L.bo
    m = layer_norm(x, L.ln2_w, L.ln2_b, cfg.eps)                     # [B, N, d]
    return x + linear(quick_gelu(linear(m, L.w_up) + L.b_up), L.w_down) + L.b_down


class VisionTower:
    """CLIP ViT weights from a llama.cpp-style CLIP GGUF. Matrices are float32, or what load_matrix makes."""

    def __init__(self, cfg, patch_w, class_embd, pos_embd, pre_ln, layers, post_ln, visual_proj):
        self.cfg = cfg
        self.patch_w = patch_w          # [d, 3*p*p]: the convolution kernel, flattened
        self.class_embd = class_embd    # [d]
        self.pos_embd = pos_embd        # [1 + n_patches, d]
        self.pre_ln = pre_ln            # (w [d], b [d])
        self.layers = layers            # list of ClipLayer
        self.post_ln = post_ln          # (w [d], b [d])
        self.visual_proj = visual_proj  # [projection_dim, d] or None

    @classmethod
    def load(cls, path, load_matrix=None):
        g = GGUFFile(path)
        cfg = ClipConfig.from_gguf(g)
        mat = load_matrix or (lambda t: t.numpy())
        vec = lambda name: g.tensor(name).numpy()  # noqa: E731
        blk = lambda i, n: f"v.blk.{i}.{n}"  # noqa: E731
        layers = [ClipLayer(vec(blk(i, "ln1.weight")), vec(blk(i, "ln1.bias")),
                            mat(g.tensor(blk(i, "attn_q.weight"))), vec(blk(i, "attn_q.bias")),
                            mat(g.tensor(blk(i, "attn_k.weight"))), vec(blk(i, "attn_k.bias")),
                            mat(g.tensor(blk(i, "attn_v.weight"))), vec(blk(i, "attn_v.bias")),
                            mat(g.tensor(blk(i, "attn_out.weight"))), vec(blk(i, "attn_out.bias")),
                            vec(blk(i, "ln2.weight")), vec(blk(i, "ln2.bias")),
                            mat(g.tensor(blk(i, "ffn_up.weight"))), vec(blk(i, "ffn_up.bias")),
                            mat(g.tensor(blk(i, "ffn_down.weight"))), vec(blk(i, "ffn_down.bias")))
                  for i in range(cfg.n_layers)]
        patch = vec("v.patch_embd.weight")                               # [d, 3, p, p]
        proj = mat(g.tensors["v.visual_proj.weight"]) if "v.visual_proj.weight" in g.tensors else None
        tower = cls(cfg, patch.reshape(patch.shape[0], -1), vec("v.class_embd"), vec("v.position_embd.weight"),
                    (vec("v.pre_ln.weight"), vec("v.pre_ln.bias")), layers,
                    (vec("v.post_ln.weight"), vec("v.post_ln.bias")), proj)
        tower.gguf = g
        return tower

    def embed(self, pixels):  # [B, 3, 224, 224] -> [B, 1 + n_patches, d]: the input of block 0
        x = linear(patchify(pixels, self.cfg.patch_size), self.patch_w)          # [B, 196, d]
        cls_tok = np.broadcast_to(self.class_embd, (x.shape[0], 1, x.shape[2]))  # [B, 1, d]
        x = np.concatenate([cls_tok, x], axis=1) + self.pos_embd                 # [B, 197, d]
        return layer_norm(x, *self.pre_ln, self.cfg.eps)

    def forward(self, pixels, n_layers=None):  # -> hidden states: [input of block 0, output of each block]
        """All hidden states (n_layers + 1 of [B, 197, d]), as transformers' output_hidden_states numbers them."""
        hidden = [self.embed(np.asarray(pixels, np.float32))]
        for L in self.layers[:n_layers]:
            hidden.append(clip_block(hidden[-1], L, self.cfg))
        return hidden

    def features(self, pixels):  # [B, 3, 224, 224] -> [B, 196, d]
        """LLaVA's image feature: hidden state -2 (block 11's output), patches only. Block 12 is never run."""
        return self.forward(pixels, n_layers=self.cfg.n_layers - 1)[-1][:, 1:]

    def image_embeds(self, pixels):  # [B, 3, 224, 224] -> [B, projection_dim]
        """CLIP's image embedding: post-LN of the final class token, projected (what CLIP compares to text)."""
        pooled = layer_norm(self.forward(pixels)[-1][:, 0], *self.post_ln, self.cfg.eps)  # [B, d]
        return linear(pooled, self.visual_proj)
