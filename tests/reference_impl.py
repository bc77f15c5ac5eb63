"""The references: torch/transformers running the same weights. Used by make_reference.py to write
tests/reference/, and by the live tests where torch is installed.

The decoder and tokenizer come from transformers loading the very GGUF tinyllava reads
(`from_pretrained(dir, gguf_file=...)`). One correction: transformers 5.23 builds the tokenizer of a
`tokenizer.ggml.pre = smollm` file with GPT-2's pre-tokenizer alone, while SmolLM2's own tokenizer.json and
llama.cpp first split every digit apart ("  3" is 'Ġ','Ġ','3' without that split, 'ĠĠ','3' with it). We add
that Digits step, so the reference is SmolLM2's real tokenizer; llama.cpp agrees with it on the test strings.
"""
import functools
import os

import numpy as np

from tinyllava import weights


def available():
    """Is torch/transformers here? In CI (TINYLLAVA_REQUIRE_REFERENCE=1) its absence is an error, not a skip."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
        return True
    except ImportError:
        if os.environ.get("TINYLLAVA_REQUIRE_REFERENCE") == "1":
            raise
        return False


@functools.lru_cache(maxsize=None)
def tokenizer():
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer
    path = weights.decoder_path()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    bt = tok.backend_tokenizer
    bt.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), bt.pre_tokenizer])
    return tok


@functools.lru_cache(maxsize=None)
def decoder():
    from tinyllava.reference import llama_causal_lm
    return llama_causal_lm(weights.decoder_path())


def decoder_activations(ids):
    """-> every block's output [n_layers, T, d] (float32) and the logits [T, vocab]."""
    import torch
    model = decoder()
    outs = []
    hooks = [layer.register_forward_hook(lambda m, i, o: outs.append((o[0] if isinstance(o, tuple) else o)[0]))
             for layer in model.model.layers]
    try:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
    finally:
        for h in hooks:
            h.remove()
    return np.stack([o.numpy() for o in outs]), logits.numpy()


def greedy(ids, n):
    """The reference's greedy continuation (stops at the end-of-turn token, like tinyllava)."""
    import torch
    model = decoder()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


@functools.lru_cache(maxsize=None)
def vision_tower():
    """transformers' CLIPVisionModelWithProjection holding exactly the weights of tinyllava's CLIP GGUF,
    dequantized by the gguf package (not by tinyllava)."""
    import gguf
    from tinyllava.reference import clip_vision_model
    r = gguf.GGUFReader(weights.vision_path())
    t = {x.name: np.array(gguf.quants.dequantize(x.data, x.tensor_type), np.float32)
         .reshape([int(d) for d in reversed(x.shape)]) for x in r.tensors}
    return clip_vision_model(t.__getitem__, with_projection=True)


def image_processor():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    return CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                                 resample=3, image_mean=[0.48145466, 0.4578275, 0.40821073],
                                 image_std=[0.26862954, 0.26130258, 0.27577711])


def vision_activations(pixels):
    """pixels [B, 3, 224, 224] -> hidden states [13, B, 197, 768], image_embeds [B, 512] (float32)."""
    import torch
    with torch.no_grad():
        out = vision_tower()(pixel_values=torch.from_numpy(np.asarray(pixels, np.float32)), output_hidden_states=True)
    return np.stack([h.numpy() for h in out.hidden_states]), out.image_embeds.numpy()


# -- torch autograd on the same numbers: the gradient reference ------------------------------------------
def torch_decoder_loss(model, x, at, targets, positions, mask, weights=None):
    """The decoder's summed next-token loss written in torch ops on tinyllava's own weights (GGUF layout: RoPE
    on adjacent pairs), so autograd gives the gradient tinyllava's hand-written backward must reproduce.
    x [B, T, d] (NumPy, or a torch tensor built from leaves); at, targets [N]; positions [T] or [B, T]; mask
    [B or 1, 1, T, S] bool; weights: {GGUF name: torch tensor} to use instead of the model's own (leaves whose
    .grad the caller reads, or expressions of them).
    -> (loss: torch scalar, x: the torch leaf whose .grad the caller reads after loss.backward())"""
    import torch
    cfg = model.cfg
    dt = torch.float64 if model.norm.dtype == np.float64 else torch.float32
    T_ = lambda a: torch.as_tensor(np.asarray(a), dtype=dt)  # noqa: E731
    named = model.named_weights()
    W = lambda name: weights[name] if weights and name in weights else T_(named[name])  # noqa: E731
    xt = x if isinstance(x, torch.Tensor) else T_(x).requires_grad_(True)
    B, T, d = xt.shape
    hd, H, Hkv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    freqs = cfg.rope_theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.as_tensor(np.asarray(positions), dtype=torch.float64)[..., None] * freqs
    cos, sin = torch.cos(ang).to(torch.float32).to(dt)[..., None, :], torch.sin(ang).to(torch.float32).to(dt)[..., None, :]

    def rms(v, w):
        return v / torch.sqrt((v * v).mean(-1, keepdim=True) + cfg.norm_eps) * w

    def rope(v):  # [B, T, h, hd]
        v0, v1 = v[..., 0::2], v[..., 1::2]
        return torch.stack([v0 * cos - v1 * sin, v0 * sin + v1 * cos], -1).reshape(v.shape)

    m = torch.as_tensor(np.asarray(mask))
    h = xt
    for i in range(cfg.n_layers):
        w = lambda n: W(f"blk.{i}.{n}.weight")  # noqa: E731
        a = rms(h, w("attn_norm"))
        q = rope((a @ w("attn_q").T).reshape(B, T, H, hd)).transpose(1, 2)
        k = rope((a @ w("attn_k").T).reshape(B, T, Hkv, hd)).transpose(1, 2).repeat_interleave(H // Hkv, 1)
        v = (a @ w("attn_v").T).reshape(B, T, Hkv, hd).transpose(1, 2).repeat_interleave(H // Hkv, 1)
        s = (q @ k.transpose(-1, -2)) / np.sqrt(hd)
        p = torch.softmax(s.masked_fill(~m, float("-inf")), -1)
        h = h + (p @ v).transpose(1, 2).reshape(B, T, d) @ w("attn_output").T
        f = rms(h, w("ffn_norm"))
        h = h + (torch.nn.functional.silu(f @ w("ffn_gate").T) * (f @ w("ffn_up").T)) @ w("ffn_down").T
    logits = rms(h.reshape(B * T, d)[torch.as_tensor(at)], W("output_norm.weight")) @ W("token_embd.weight").T
    loss = torch.nn.functional.cross_entropy(logits, torch.as_tensor(targets), reduction="sum")
    return loss, xt


def gguf_permute(w, n_head):
    """transformers' Q/K rows -> the GGUF's (llama.cpp's converter rotates adjacent pairs, not halves)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_unpermute(w, n_head):
    """The GGUF's Q/K rows -> transformers' (the inverse of gguf_permute)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


HF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def hf_weight_grads(x, at, targets, names):
    """The real decoder in transformers (float32): summed loss at positions `at` of input embeddings x [T, d],
    and the gradients of the named weights (GGUF names, returned in the GGUF's layout; token_embd.weight's is
    its part as the output matrix only, since x is given). -> (loss, {name: grad})"""
    import torch
    model = decoder()
    cfg = model.config
    x = torch.as_tensor(np.asarray(x, np.float32))[None]
    model.zero_grad()
    logits = model(inputs_embeds=x).logits[0]
    loss = torch.nn.functional.cross_entropy(logits[torch.as_tensor(at)], torch.as_tensor(targets), reduction="sum")
    loss.backward()
    out = {}
    for name in names:
        if name == "token_embd.weight":
            g = model.lm_head.weight.grad
        elif name == "output_norm.weight":
            g = model.model.norm.weight.grad
        else:
            _, i, short, _ = name.split(".")
            g = model.model.layers.get_submodule(f"{i}.{HF_NAMES[short]}").weight.grad
            if short in ("attn_q", "attn_k"):
                g = torch.as_tensor(gguf_permute(g.numpy(), cfg.num_attention_heads if short == "attn_q"
                                                 else cfg.num_key_value_heads))
        out[name] = g.numpy().copy()
    model.zero_grad()
    return float(loss.detach()), out


def hf_input_grad(ids_or_x, at, targets):
    """The real decoder in transformers (float32): summed loss of `targets` at positions `at` of one plain
    causal sequence of input embeddings x [T, d], and its gradient d loss / d x. -> (loss, grad [T, d])"""
    import torch
    model = decoder()
    x = torch.as_tensor(np.asarray(ids_or_x, np.float32))[None].requires_grad_(True)
    logits = model(inputs_embeds=x).logits[0]
    loss = torch.nn.functional.cross_entropy(logits[torch.as_tensor(at)], torch.as_tensor(targets), reduction="sum")
    loss.backward()
    return float(loss.detach()), x.grad[0].numpy()


def with_adapters(model):
    """A fresh transformers SmolLM2 with the LoRA adapters of tinyllava's `model` merged in: each W + (alpha/r) B A
    written into its weights (Q and K rows brought to transformers' order)."""
    import torch

    from tinyllava.lora import adapters
    from tinyllava.reference import llama_causal_lm
    hf = llama_causal_lm(weights.decoder_path())
    cfg = hf.config
    assert adapters(model), "no adapters to merge"
    with torch.no_grad():
        for name, w in adapters(model).items():
            _, i, short, _ = name.split(".")
            delta = w.scale * (w.b @ w.a)
            if short in ("attn_q", "attn_k"):
                delta = gguf_unpermute(delta, cfg.num_attention_heads if short == "attn_q" else cfg.num_key_value_heads)
            hf.model.layers.get_submodule(f"{i}.{HF_NAMES[short]}").weight += torch.as_tensor(delta)
    return hf


def greedy_embeds(hf, x, n):
    """transformers' greedy continuation of the prompt embeddings x [T, d] (stops at the end-of-turn token, like
    tinyllava)."""
    import torch
    with torch.no_grad():
        out = hf.generate(inputs_embeds=torch.as_tensor(np.asarray(x, np.float32))[None], max_new_tokens=n,
                          do_sample=False, attention_mask=torch.ones(1, len(x), dtype=torch.long))
    return out[0].tolist()
