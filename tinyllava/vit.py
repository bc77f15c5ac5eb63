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
from .ops import attention, layer_norm, linear, quick_gelu


@dataclass
class ClipConfig:
    image_size: int = 224
    patch_size: int = 16
    dim: int = 768
    ffn_dim: int = 3072
    n_layers: int = 12
    n_heads: int = 12
    norm_eps: float = 1e-5
    projection_dim: int = 512

    @classmethod
    def from_gguf(cls, g):
        if g.get("general.architecture") != "clip" or not g.get("clip.has_vision_encoder"):
            g.fail("is not a CLIP vision tower (general.architecture must be 'clip' with a vision encoder)")
        v = "clip.vision."
        return cls(image_size=g.require(v + "image_size"), patch_size=g.require(v + "patch_size"),
                   dim=g.require(v + "embedding_length"), ffn_dim=g.require(v + "feed_forward_length"),
                   n_layers=g.require(v + "block_count"), n_heads=g.require(v + "attention.head_count"),
                   norm_eps=g.require(v + "attention.layer_norm_epsilon"),
                   projection_dim=g.get(v + "projection_dim", 0))

    @property
    def n_patches(self):
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self):
        return self.dim // self.n_heads


def patchify(pixels, p):  # [B, C, H, W] -> [B, (H/p)*(W/p), C*p*p], patches in row-major order
    B, C, H, W = pixels.shape
    x = pixels.reshape(B, C, H // p, p, W // p, p)                  # [B, C, h, p, w, p]
    return x.transpose(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), C * p * p)


@dataclass
class Layer:  # the fields of llama.Layer, and each one's bias (its name and _b)
    attn_norm: np.ndarray    # [d]
    attn_norm_b: np.ndarray  # [d]
    wq: np.ndarray           # [d, d]
    wq_b: np.ndarray         # [d]
    wk: np.ndarray           # [d, d]
    wk_b: np.ndarray         # [d]
    wv: np.ndarray           # [d, d]
    wv_b: np.ndarray         # [d]
    wo: np.ndarray           # [d, d]
    wo_b: np.ndarray         # [d]
    ffn_norm: np.ndarray     # [d]
    ffn_norm_b: np.ndarray   # [d]
    w_up: np.ndarray         # [f, d]
    w_up_b: np.ndarray       # [f]
    w_down: np.ndarray       # [d, f]
    w_down_b: np.ndarray     # [d]


# Layer field -> tensor name in the GGUF (v.blk.N.<name>), llama.cpp's CLIP names
TENSOR_NAMES = {"attn_norm": "ln1.weight", "attn_norm_b": "ln1.bias", "wq": "attn_q.weight", "wq_b": "attn_q.bias",
                "wk": "attn_k.weight", "wk_b": "attn_k.bias", "wv": "attn_v.weight", "wv_b": "attn_v.bias",
                "wo": "attn_out.weight", "wo_b": "attn_out.bias", "ffn_norm": "ln2.weight", "ffn_norm_b": "ln2.bias",
                "w_up": "ffn_up.weight", "w_up_b": "ffn_up.bias", "w_down": "ffn_down.weight",
                "w_down_b": "ffn_down.bias"}


def block(x, layer, cfg):  # [B, N, d] -> [B, N, d]
    B, N, d = x.shape
    H, hd = cfg.n_heads, cfg.head_dim
    a = layer_norm(x, layer.attn_norm, layer.attn_norm_b, cfg.norm_eps)              # [B, N, d]
    q = linear(a, layer.wq, layer.wq_b).reshape(B, N, H, hd)                         # [B, N, H, hd]
    k = linear(a, layer.wk, layer.wk_b).reshape(B, N, H, hd)                         # [B, N, H, hd]
    v = linear(a, layer.wv, layer.wv_b).reshape(B, N, H, hd)                         # [B, N, H, hd]
    x = x + linear(attention(q, k, v, mask=None).reshape(B, N, d), layer.wo, layer.wo_b)  # [B, N, d]
    m = layer_norm(x, layer.ffn_norm, layer.ffn_norm_b, cfg.norm_eps)                # [B, N, d]
    return x + linear(quick_gelu(linear(m, layer.w_up, layer.w_up_b)), layer.w_down, layer.w_down_b)


class Clip:
    """CLIP's vision transformer, from a llama.cpp-style CLIP GGUF. Matrices are float32, or what load_matrix makes
    (as llama.Llama's)."""

    def __init__(self, cfg, patch_w, class_embd, pos_embd, pre_ln, layers, post_ln, visual_proj):
        self.cfg = cfg
        self.patch_w = patch_w          # [d, 3*p*p]: the convolution kernel, flattened
        self.class_embd = class_embd    # [d]
        self.pos_embd = pos_embd        # [1 + n_patches, d]
        self.pre_ln = pre_ln            # (w [d], b [d])
        self.layers = layers            # list of Layer
        self.post_ln = post_ln          # (w [d], b [d])
        self.visual_proj = visual_proj  # [projection_dim, d] or None

    @classmethod
    def load(cls, path, load_matrix=None):
        g = GGUFFile(path)
        cfg = ClipConfig.from_gguf(g)
        vec = lambda name: g.tensor(name).numpy()  # noqa: E731 (embeddings stay float32, whatever their shape)
        layers = [Layer(**{f: g.weight(f"v.blk.{i}.{n}", load_matrix) for f, n in TENSOR_NAMES.items()})
                  for i in range(cfg.n_layers)]
        patch = vec("v.patch_embd.weight")                               # [d, 3, p, p]
        proj = g.weight("v.visual_proj.weight", load_matrix) if "v.visual_proj.weight" in g.tensors else None
        tower = cls(cfg, patch.reshape(patch.shape[0], -1), vec("v.class_embd"), vec("v.position_embd.weight"),
                    (vec("v.pre_ln.weight"), vec("v.pre_ln.bias")), layers,
                    (vec("v.post_ln.weight"), vec("v.post_ln.bias")), proj)
        tower.gguf = g
        return tower

    def embed(self, pixels):  # [B, 3, 224, 224] -> [B, 1 + n_patches, d]: the input of block 0
        pixels = np.asarray(pixels, np.float32)
        x = linear(patchify(pixels, self.cfg.patch_size), self.patch_w)          # [B, n_patches, d]
        cls_tok = np.broadcast_to(self.class_embd, (x.shape[0], 1, x.shape[2]))  # [B, 1, d]
        x = np.concatenate([cls_tok, x], axis=1) + self.pos_embd                 # [B, 1 + n_patches, d]
        return layer_norm(x, *self.pre_ln, self.cfg.norm_eps)

    def forward(self, x, n_layers=None, hidden_states=None):  # [B, 1 + n_patches, d] -> [B, 1 + n_patches, d]
        """Run the first n_layers blocks (all by default) on the embedded image x (see embed) -> the last
        block's output. If a list is given, `hidden_states` gets each block's output (as llama.Llama.forward)."""
        for layer in self.layers[:n_layers]:
            x = block(x, layer, self.cfg)
            if hidden_states is not None:
                hidden_states.append(x)
        return x

    def features(self, pixels):  # [B, 3, 224, 224] -> [B, n_patches, d]
        """LLaVA's image feature: hidden state -2 (block 11's output), patches only. Block 12 is never run."""
        return self.forward(self.embed(pixels), n_layers=self.cfg.n_layers - 1)[:, 1:]

    def image_embeds(self, pixels):  # [B, 3, 224, 224] -> [B, projection_dim]
        """CLIP's image embedding: post-LN of the final class token, projected (what CLIP compares to text)."""
        pooled = layer_norm(self.forward(self.embed(pixels))[:, 0], *self.post_ln, self.cfg.norm_eps)  # [B, d]
        return linear(pooled, self.visual_proj)
