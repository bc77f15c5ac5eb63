"""Export the vision tower and a trained projector as one mmproj GGUF that llama.cpp's multimodal loader (mtmd)
runs beside the SmolLM2 GGUF.

    python -m tinyllava.export --mmproj tinyllava-mmproj.gguf [--projector FILE] [--type q8_0|f16|f32]
    llama-mtmd-cli -m SmolLM2-135M-Instruct.Q4_1.gguf --mmproj tinyllava-mmproj.gguf --image cat.jpg -p "..."

What llama.cpp (as vendored in llama-cpp-python 0.3.36) computes, and how this file makes it tinyllava's:
- feature layer: `clip.vision.feature_layer = [11]` makes it run blocks 0..10 and take their output: LLaVA's
  hidden state -2. Only those 11 blocks are written; there is no post-LN (it would be applied).
- class token: its LLaVA graph appends the class token *after* the 196 patches, gives positions 0..196 in that
  order, and hands rows 1..196 to the projector. So by default (`--cls reorder`) the position table is
  written rotated, [pos 1..196, pos 0], and every token gets its own position: the encoder computes exactly
  CLIP's numbers. The projector then receives patches 1..195 and the class token instead of patches 0..195:
  one of 196 image tokens differs (measured in tests/check_llamacpp.py). `--cls drop` writes no class token
  instead: the order is right but the encoder runs without it, so every token moves a little.
- the projector: llama.cpp's "mlp" type is mm.0 -> GELU (tanh approximation) -> mm.2, which is tinyllava's
  mlp2x_gelu; each projector kind says how it is written as one (projector.KINDS: a linear one passes through
  the GELU where it is the identity).
"""
import argparse
import sys

import numpy as np

from .errors import TinyLlavaError, cli_errors
from .gguf import GGUFFile, ValueType, write_gguf
from .projector import KINDS, Projector
from .quant import GGMLType


def export_mmproj(out, tower_path, proj, qtype=GGMLType.Q8_0, cls="reorder"):
    g = GGUFFile(tower_path)
    n_layers = g.require("clip.vision.block_count")
    feature_layer = n_layers - 1  # LLaVA: hidden state -2
    tensors = {}
    for name, t in g.tensors.items():
        if name.startswith("v.post_ln") or name == "v.visual_proj.weight":
            continue
        if name.startswith("v.blk.") and int(name.split(".")[2]) >= feature_layer:
            continue
        if t.type == GGMLType.Q8_0 and qtype != GGMLType.Q8_0:  # re-express the int8 matrices
            x = t.numpy()
            tensors[name] = x if qtype == GGMLType.F32 else x.astype(np.float16)
        else:
            tensors[name] = t
    pos = g.tensor("v.position_embd.weight").numpy()                   # [197, d]: class token first
    if cls == "reorder":
        tensors["v.position_embd.weight"] = np.concatenate([pos[1:], pos[:1]])
    elif cls == "drop":
        tensors["v.position_embd.weight"] = pos[1:].copy()
        del tensors["v.class_embd"]
    else:
        raise TinyLlavaError(f"--cls must be reorder or drop, not {cls!r}")
    if proj.d_in != g.require("clip.vision.embedding_length"):
        raise TinyLlavaError(f"the projector takes {proj.d_in}-wide features, the vision tower in {tower_path} "
                             f"makes {g.require('clip.vision.embedding_length')}")
    for name, x in KINDS[proj.kind].llama_cpp(proj.params).items():  # small: kept float32, so llama.cpp computes what tinyllava does
        tensors[name] = np.ascontiguousarray(x, np.float32)
    meta = {k: v for k, v in g.metadata.items() if k.startswith("clip.") or k == "general.architecture"}
    types = {k: g.types[k] for k in meta}
    meta.update({"general.name": f"tinyllava mmproj: CLIP ViT-B/16 + {proj.kind} projector",
                 "general.description": "image encoder for LLaVA (tinyllava)",
                 "clip.has_llava_projector": True, "clip.projector_type": "mlp",
                 "clip.vision.block_count": feature_layer, "clip.vision.feature_layer": [feature_layer]})
    types.update({"clip.vision.feature_layer": (ValueType.ARRAY, ValueType.INT32),
                  "clip.vision.block_count": (ValueType.UINT32, None)})
    return write_gguf(out, meta, tensors, types=types)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tinyllava.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mmproj", required=True, help="output GGUF")
    ap.add_argument("--projector", help="projector GGUF (default: weights/projector.gguf)")
    ap.add_argument("--type", choices=["q8_0", "f16", "f32"], default="q8_0",
                    help="matrix type: q8_0 keeps the 8-bit weights (smallest); f32 makes llama.cpp compute in f32")
    ap.add_argument("--cls", choices=["reorder", "drop"], default="reorder",
                    help="how to meet llama.cpp's class-token order (see above)")
    args = ap.parse_args(argv)
    with cli_errors("tinyllava.export"):
        from .model import default_projector_path
        from .weights import vision_path
        proj = Projector.load(args.projector or default_projector_path())
        qtype = {"q8_0": GGMLType.Q8_0, "f16": GGMLType.F16, "f32": GGMLType.F32}[args.type]
        out = export_mmproj(args.mmproj, vision_path(), proj, qtype, args.cls)
        print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)", file=sys.stderr)


if __name__ == "__main__":
    main()
