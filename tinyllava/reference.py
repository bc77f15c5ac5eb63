"""transformers models holding exactly tinyllava's weights: what the tests compare each layer against, and what
the benchmark's torch column runs. Needs torch and transformers (the `reference` extra).
"""
from .vit import TENSOR_NAMES

# our GGUF name (v.blk.N.<ours>) -> transformers' (vision_model.encoder.layers.N.<theirs>)
CLIP_LAYER_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                    "attn_out": "self_attn.out_proj", "ffn_up": "mlp.fc1", "ffn_down": "mlp.fc2",
                    "ln1": "layer_norm1", "ln2": "layer_norm2"}


def clip_vision_model(tensor, n_layers=12, with_projection=False):
    """transformers' CLIP ViT-B/16 (CLIPVisionModel, or CLIPVisionModelWithProjection) with the first n_layers
    blocks. tensor(name) -> float32 NumPy array of a tensor of tinyllava's CLIP GGUF (dequantized by whoever
    the caller trusts: the tests use the gguf package, the benchmark tinyllava)."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModel,
        CLIPVisionModelWithProjection,
    )
    t = lambda name: torch.from_numpy(tensor(name))  # noqa: E731
    cfg = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=n_layers,
                           num_attention_heads=12, image_size=224, patch_size=16, hidden_act="quick_gelu",
                           layer_norm_eps=1e-5, projection_dim=512)
    sd = {"vision_model.embeddings.patch_embedding.weight": t("v.patch_embd.weight"),
          "vision_model.embeddings.class_embedding": t("v.class_embd"),
          "vision_model.embeddings.position_embedding.weight": t("v.position_embd.weight"),
          "vision_model.pre_layrnorm.weight": t("v.pre_ln.weight"), "vision_model.pre_layrnorm.bias": t("v.pre_ln.bias"),
          "vision_model.post_layernorm.weight": t("v.post_ln.weight"),
          "vision_model.post_layernorm.bias": t("v.post_ln.bias")}
    for i in range(n_layers):
        for name in TENSOR_NAMES.values():
            ours, kind = name.split(".")
            sd[f"vision_model.encoder.layers.{i}.{CLIP_LAYER_NAMES[ours]}.{kind}"] = t(f"v.blk.{i}.{name}")
    if with_projection:
        sd["visual_projection.weight"] = t("v.visual_proj.weight")
        model = CLIPVisionModelWithProjection(cfg)
    else:
        model = CLIPVisionModel(cfg)
        if not hasattr(model, "vision_model"):  # transformers 5: CLIPVisionModel is the vision transformer itself
            sd = {k.removeprefix("vision_model."): v for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all("position_ids" in m for m in missing), (missing, unexpected)
    return model.eval()


def llama_causal_lm(path):
    """transformers' LlamaForCausalLM reading the same decoder GGUF (float32)."""
    import torch
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
