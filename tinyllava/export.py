"""Export what tinyllava trains as files llama.cpp runs: the vision tower and a projector as one mmproj GGUF
(for llama.cpp's multimodal loader, mtmd), and a stage-2 decoder with its adapter merged in.

    python -m tinyllava.export --mmproj tinyllava-mmproj.gguf [--projector FILE] [--type q8_0|f16|f32]
    llama-mtmd-cli -m SmolLM2-135M-Instruct.Q4_1.gguf --mmproj tinyllava-mmproj.gguf --image cat.jpg -p "..."
    python -m tinyllava.export --decoder merged.gguf --adapter weights/stage2-lora.gguf [--decoder-type q8_0|q4_1]

A stage-2 LoRA adapter needs no export: tinyllava writes it in llama.cpp's own adapter format
(`llama-mtmd-cli ... --lora weights/stage2-lora.gguf`). The merged decoder (W + s B A in every adapted matrix,
or a --full run's decoder.gguf) is quantized again with tinyllava's own quantizers (quant.py): every matrix Q8_0
by default, or Q4_1 as in SmolLM2's file (the embedding stays Q8_0); norms stay float32. Q4_1 loses what stage 2
taught: SmolLM2's weights already sit on its grid, and the update s B A is mostly smaller than half a step of it,
so rounding puts most weights back where they were (the README has the measurement).

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


def export_decoder(out, decoder_path, adapter=None, matrices=GGMLType.Q4_1):
    """The decoder (with the adapter merged, if one is given) quantized again: token_embd Q8_0, the other
    matrices `matrices`, the norms float32; the metadata and tensor order of the original file."""
    from . import lora, quant
    from .gguf import GGUFTensor
    from .llama import Llama
    decoder = Llama.load(decoder_path)
    if adapter:
        lora.load(adapter, decoder)
    tensors = {}
    for name, w in decoder.named_weights().items():
        w = w.merged() if isinstance(w, lora.LoRA) else w
        if w.ndim == 1:
            tensors[name] = np.ascontiguousarray(w, np.float32)
            continue
        qtype = GGMLType.Q8_0 if name == "token_embd.weight" else matrices
        tensors[name] = GGUFTensor(name, qtype, w.shape, quant.quantize(w, qtype))
    g = decoder.gguf
    meta = {**g.metadata, "general.file_type": {GGMLType.Q4_1: 3, GGMLType.Q8_0: 7}[matrices]}
    if adapter:
        meta["general.name"] = f"{g.get('general.name', 'decoder')} + tinyllava stage-2 LoRA (merged)"
    order = {name: i for i, name in enumerate(g.tensors)}
    return write_gguf(out, meta, dict(sorted(tensors.items(), key=lambda t: order.get(t[0], len(order)))),
                      types=g.types)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tinyllava.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mmproj", help="output: the vision tower and projector as one GGUF")
    ap.add_argument("--decoder", help="output: the decoder with --adapter merged in, quantized again")
    ap.add_argument("--adapter", help="a stage-2 LoRA adapter GGUF to merge into the decoder")
    ap.add_argument("--model", help="the decoder GGUF to start from (default: the fetched SmolLM2; a --full run's "
                                    "decoder.gguf)")
    ap.add_argument("--decoder-type", choices=["q8_0", "q4_1"], default="q8_0",
                    help="the merged decoder's matrices (the embedding is always Q8_0, as in SmolLM2's file); q4_1 "
                         "is smaller but rounds most of the adapter's update away")
    ap.add_argument("--projector", help="projector GGUF (default: weights/projector.gguf)")
    ap.add_argument("--type", choices=["q8_0", "f16", "f32"], default="q8_0",
                    help="matrix type: q8_0 keeps the 8-bit weights (smallest); f32 makes llama.cpp compute in f32")
    ap.add_argument("--cls", choices=["reorder", "drop"], default="reorder",
                    help="how to meet llama.cpp's class-token order (see above)")
    args = ap.parse_args(argv)
    with cli_errors("tinyllava.export"):
        from .weights import decoder_path, default_projector_path, vision_path
        if not args.mmproj and not args.decoder:
            raise TinyLlavaError("nothing to write: give --mmproj and/or --decoder")
        outs = []
        if args.mmproj:
            proj = Projector.load(args.projector or default_projector_path())
            qtype = {"q8_0": GGMLType.Q8_0, "f16": GGMLType.F16, "f32": GGMLType.F32}[args.type]
            outs.append(export_mmproj(args.mmproj, vision_path(), proj, qtype, args.cls))
        if args.decoder:
            outs.append(export_decoder(args.decoder, args.model or decoder_path(), args.adapter,
                                       {"q4_1": GGMLType.Q4_1, "q8_0": GGMLType.Q8_0}[args.decoder_type]))
        for out in outs:
            print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)", file=sys.stderr)


if __name__ == "__main__":
    main()
