"""Export what tinyllava trains as files llama.cpp runs: the vision tower and a projector as one mmproj GGUF
(for llama.cpp's multimodal loader, mtmd), and a stage-2 decoder with its adapter merged in.

    python -m tinyllava.export --mmproj tinyllava-mmproj.gguf [--projector FILE] [--type q8_0|f16|f32]
    llama-mtmd-cli -m SmolLM2-135M-Instruct.Q4_1.gguf --mmproj tinyllava-mmproj.gguf --image cat.jpg -p "..."
    python -m tinyllava.export --decoder merged.gguf --adapter weights/stage2-lora.gguf [--quant Q8_0|Q4_1|Q4_K_M|...]
    python -m tinyllava.export --decoder smollm2-q4_k_m.gguf --quant Q4_K_M    # `llama-quantize ... Q4_K_M`

A stage-2 LoRA adapter needs no export: tinyllava writes it in llama.cpp's own adapter format
(`llama-mtmd-cli ... --lora weights/stage2-lora.gguf`). The decoder (SmolLM2, with an adapter merged in: W + s B A
in every adapted matrix, or a --full run's decoder.gguf) is quantized again with tinyllava's own quantizers
(quant.py), each tensor to the type llama.cpp's `llama-quantize` gives it for the same --quant (quant_types, from
llama.cpp's src/llama-quant.cpp), so the blocks are the ones llama-quantize writes from the same float weights.
Norms stay float32. Q8_0 is the default. Q4_1 loses what stage 2 taught: SmolLM2's weights already sit on its
grid, and the update s B A is mostly smaller than half a step of it, so rounding puts most weights back where
they were (the README has the measurement).

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

from . import quant
from .errors import TinyLlavaError, cli_errors
from .gguf import GGUFFile, ValueType, write_gguf
from .projector import KINDS, Projector
from .quant import FILE_TYPES, GGMLType


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


def use_more_bits(i, n):  # llama-quant.cpp: the first and last eighth of the layers, and every third between
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def quant_types(shapes, ftype, n_layers):
    """{tensor name: (n_out, n_in)} -> {name: GGMLType}: the type llama.cpp's `llama-quantize` (llama_tensor_get_type
    in src/llama-quant.cpp, as llama-cpp-python 0.3.36 vendors it) gives each 2-D weight of a llama decoder with no
    experts, for these file types. Q4_K_M: attn_v and ffn_down of the layers use_more_bits picks get Q6_K, the
    rest Q4_K. The token embedding, which is also the output matrix here (tied), gets Q6_K unless the type is
    Q8_0. Then a row that is not whole blocks falls back: Q4_K to Q5_0, Q6_K to Q8_0 (SmolLM2's rows of 576 are
    2.25 blocks of 256, so its Q4_K_M is mostly Q5_0 and Q8_0: only ffn_down, rows of 1536, is a K-quant)."""
    default = FILE_TYPES[ftype][1]
    types = {}
    for name, (n_out, n_in) in shapes.items():
        t, layer = default, int(name.split(".")[1]) if name.startswith("blk.") else -1
        if name in ("output.weight", "token_embd.weight"):  # token_embd: tied, as llama-quantize assumes
            tied = name == "token_embd.weight" and "output.weight" not in shapes
            if name == "output.weight" or tied:
                t = GGMLType.Q8_0 if n_in % quant.BLOCK_SIZE[t][0] or t == GGMLType.Q8_0 else GGMLType.Q6_K
        elif ftype == "Q4_K_M" and name.endswith(("attn_v.weight", "ffn_down.weight")) and use_more_bits(layer, n_layers):
            t = GGMLType.Q6_K
        if n_in % quant.BLOCK_SIZE[t][0]:                    # tensor_type_fallback
            t = {GGMLType.Q4_K: GGMLType.Q5_0, GGMLType.Q6_K: GGMLType.Q8_0}[t]
        types[name] = t
    return types


def export_decoder(out, decoder_path, adapter=None, ftype="Q4_1"):
    """The decoder (with the adapter merged, if one is given) quantized again as `llama-quantize` would for file
    type `ftype` (FILE_TYPES); the norms float32; the metadata and tensor order of the original file."""
    from . import lora
    from .gguf import GGUFTensor
    from .llama import Llama
    if ftype not in FILE_TYPES:
        raise TinyLlavaError(f"--quant must be one of {', '.join(FILE_TYPES)}, not {ftype!r}")
    decoder = Llama.load(decoder_path)
    if adapter:
        lora.load(adapter, decoder)
    weights = {name: (w.merged() if isinstance(w, lora.LoRA) else w) for name, w in decoder.named_weights().items()}
    types = quant_types({name: w.shape for name, w in weights.items() if w.ndim == 2}, ftype, decoder.cfg.n_layers)
    tensors = {}
    for name, w in weights.items():
        if w.ndim == 1:
            tensors[name] = np.ascontiguousarray(w, np.float32)
        else:
            tensors[name] = GGUFTensor(name, types[name], w.shape, quant.quantize(w, types[name]))
    g = decoder.gguf
    meta = {**g.metadata, "general.file_type": FILE_TYPES[ftype][0], "general.quantization_version": 2}
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
    ap.add_argument("--quant", type=str.upper, choices=list(FILE_TYPES), default="Q8_0",
                    help="the decoder's types, as llama-quantize's file type of that name (Q4_K_M: its mix of Q4_K, "
                         "Q6_K and their fallbacks); Q4_1 is SmolLM2's own, and rounds most of an adapter's update away")
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
            outs.append(export_decoder(args.decoder, args.model or decoder_path(), args.adapter, args.quant))
        for out in outs:
            print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)", file=sys.stderr)


if __name__ == "__main__":
    main()
