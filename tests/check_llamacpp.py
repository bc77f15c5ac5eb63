"""Does llama.cpp run tinyllava's trained model and say the same thing? (A check script, not a CI test:
`pip install llama-cpp-python==0.3.36` compiles llama.cpp, about 25 minutes on two cores.)

    python tests/check_llamacpp.py [--projector FILE] [--photos N] [--type q8_0|f32] [--cls reorder|drop] [--json]
    python tests/check_llamacpp.py --stage 2 [--merged q4_1|q8_0|q4_k_m]    # the stage-2 model: its LoRA adapter
                                                                       # (or merged into a decoder) in llama.cpp
    python tests/check_llamacpp.py --q4-k-m                            # export --quant Q4_K_M against llama-quantize

For each photo: export the mmproj (python -m tinyllava.export), load it with SmolLM2's GGUF in llama.cpp's
multimodal library (mtmd), and compare with tinyllava:
  1. image embeddings: llama.cpp's 196 image tokens against tinyllava's (cosine per token; llama.cpp's LLaVA
     graph hands the projector patches 1..195 and the class token, see tinyllava/export.py)
  2. greedy answers, token for token, for a caption (stage 1: the plain template, the image alone; stage 2: asked
     "Describe the image concisely.", as generate does) and a ChatML question
  3. the same answers with llama.cpp's decoder fed tinyllava's own image tokens, and tinyllava's decoder fed
     llama.cpp's: this splits any difference into "the image tokens differ" and "the decoders differ"
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from tinyllava import weights  # noqa: E402
from tinyllava.export import export_decoder, export_mmproj  # noqa: E402
from tinyllava.decoding import Sampling  # noqa: E402
from tinyllava.image import open_image, preprocess  # noqa: E402
from tinyllava.instruct import BRIEF  # noqa: E402
from tinyllava.llamacpp import MARKER, LlamaCpp  # noqa: E402
from tinyllava.model import chat_prompt, load_llava  # noqa: E402
from tinyllava.weights import default_projector_path, stage2_paths  # noqa: E402
from tinyllava.projector import Projector  # noqa: E402
from tinyllava.quant import GGMLType  # noqa: E402

QUESTION = "What is in the picture?"
N_NEW = 24


def photos(n):
    """N Flickr8k dev photos (224x224: no resampling on either side) when present, then four demo photos of other
    sizes (both sides pad them square with the mean colour; then tinyllava resizes bicubic, llama.cpp bilinear)."""
    flickr = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k"
    out = []
    if flickr.is_dir():
        pairs = [json.loads(x) for x in (flickr / "pairs.jsonl").open()]
        out = [flickr / p["image"] for p in pairs if p["split"] == "dev"][:n]
    return out + list(weights.demo_photos().values())[:4]


Q4_K_M_PROMPTS = ["What is the capital of France?", "Name three primary colours.", "Why is the sky blue?",
                  "What do cats like to eat?", "How many legs does a spider have?", "Write one sentence about trains."]


def check_q4_k_m(as_json):
    """`python -m tinyllava.export --decoder out.gguf --quant Q4_K_M` against `llama-quantize` on the same weights
    (SmolLM2's, dequantized to a float32 GGUF): every tensor's type and bytes. Then tinyllava's file in llama.cpp
    and in tinyllava (float and integer kernels): greedy answers to a few questions, in ChatML."""
    from helpers import float32_copy
    from tinyllava import fused
    from tinyllava.gguf import GGUFFile
    from tinyllava.llamacpp import quantize_file
    from tinyllava.model import Llava, load_decoder
    with tempfile.TemporaryDirectory() as tmp:
        ours = export_decoder(Path(tmp) / "ours.gguf", weights.decoder_path(), ftype="Q4_K_M")
        theirs = quantize_file(float32_copy(weights.decoder_path(), Path(tmp) / "f32.gguf"), Path(tmp) / "theirs.gguf",
                               "Q4_K_M")
        a, b = GGUFFile(ours), GGUFFile(theirs)
        differ = [n for n, t in a.tensors.items() if n not in b.tensors or t.type != b.tensors[n].type or
                  not np.array_equal(t.data, b.tensors[n].data)]
        result = {"tensors": len(a.tensors), "their tensors": len(b.tensors), "differing": differ,
                  "types": {t.name: sum(x.type == t for x in a.tensors.values()) for t in {x.type for x in a.tensors.values()}},
                  "bytes": ours.stat().st_size, "their bytes": theirs.stat().st_size, "answers": []}
        cpp = LlamaCpp(model=ours)
        model, tok = load_decoder(ours, quantized=True)
        llava = Llava(model, tok)
        for q in Q4_K_M_PROMPTS:
            row = {"question": q, "llama.cpp": tok.decode(cpp.answer(tok.chat([{"role": "user", "content": q}]),
                                                                     n_new=N_NEW))}
            for name, integer in (("tinyllava float", False), ("tinyllava integer", True)):
                fused.INTEGER = integer
                row[name] = llava.answer(q, sampling=Sampling(N_NEW))
            result["answers"].append(row)
    if as_json:
        print(json.dumps(result))
        return
    print(f"{result['tensors']} tensors ({result['types']}), {len(differ)} differ from llama-quantize's "
          f"({result['their tensors']} tensors); {result['bytes']} bytes, llama.cpp's {result['their bytes']}")
    for row in result["answers"]:
        print(f"\n{row['question']}")
        for k in ("llama.cpp", "tinyllava float", "tinyllava integer"):
            print(f"  {k:18s} {row[k]!r}")


def cosine(a, b):
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--projector", default=str(default_projector_path()))
    ap.add_argument("--photos", type=int, default=4, help="Flickr8k dev photos (plus 4 demo photos)")
    ap.add_argument("--type", choices=["q8_0", "f32"], default="q8_0")
    ap.add_argument("--cls", choices=["reorder", "drop"], default="reorder")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--stage", type=int, choices=[1, 2], default=1,
                    help="2: the committed stage-2 model (weights/stage2-*.gguf), its adapter given to llama.cpp")
    ap.add_argument("--merged", choices=["q4_1", "q8_0", "q4_k_m"],
                    help="stage 2: give llama.cpp a decoder with the adapter merged in and quantized again (and "
                         "tinyllava the same file), instead of the adapter")
    ap.add_argument("--q4-k-m", action="store_true", help="export --quant Q4_K_M against llama-quantize, and the "
                                                              "file in llama.cpp (see check_q4_k_m)")
    args = ap.parse_args()
    if args.q4_k_m:
        return check_q4_k_m(args.json)
    adapter = None
    if args.stage == 2:
        args.projector, adapter = stage2_paths()
    with tempfile.TemporaryDirectory() as tmp:  # llama.cpp reads the files once, at load
        mmproj = export_mmproj(Path(tmp) / "mmproj.gguf", weights.vision_path(), Projector.load(args.projector),
                               GGMLType.Q8_0 if args.type == "q8_0" else GGMLType.F32, args.cls)
        model = None
        if args.merged:
            model = export_decoder(Path(tmp) / "merged.gguf", weights.decoder_path(), adapter, args.merged.upper())
            cpp = LlamaCpp(mmproj, model=model)
            llava = load_llava(args.projector, model)
        else:
            cpp = LlamaCpp(mmproj, lora=adapter)
            llava = load_llava(args.projector, adapter=adapter)
    tok = llava.tok
    rows = []
    for path in photos(args.photos):
        img = open_image(path)
        ours_img = llava.image_tokens(preprocess(img, pad=True)[None])[0]       # [196, 576], as generate
        theirs_img = cpp.embeddings(np.asarray(img))
        shift = 1 if args.cls == "reorder" else 0                              # llama.cpp's token j = our j + 1
        cos = cosine(ours_img[shift:], theirs_img[:196 - shift])
        row = {"photo": Path(path).name, "size": img.size, "token_cos_min": float(cos.min()),
               "token_cos_mean": float(cos.mean())}
        asked = lambda q: chat_prompt(tok, q, system=llava.system).replace("<image>", MARKER)  # noqa: E731
        for name, text in [("caption", MARKER if args.stage == 1 else asked(BRIEF[0])), ("question", asked(QUESTION))]:
            ours = llava.complete(llava.embed(text.replace(MARKER, "<image>"), [ours_img])[0], Sampling(N_NEW))[1]
            theirs = cpp.answer(text, theirs_img)
            row[name] = {"tinyllava": tok.decode(ours), "llama.cpp": tok.decode(theirs), "same": ours == theirs,
                         "same_with_our_image_tokens": cpp.answer(text, ours_img) == ours,
                         "same_with_their_image_tokens": llava.complete(
                             llava.embed(text.replace(MARKER, "<image>"), [theirs_img])[0], Sampling(N_NEW))[1] == theirs}
        rows.append(row)
        if not args.json:
            print(f"\n{row['photo']} {row['size']}: image tokens cos min {row['token_cos_min']:.4f} "
                  f"mean {row['token_cos_mean']:.4f}")
            for name in ("caption", "question"):
                r = row[name]
                print(f"  {name:8s} same: {r['same']}  (llama.cpp decoder on our tokens: "
                      f"{r['same_with_our_image_tokens']}, ours on theirs: {r['same_with_their_image_tokens']})")
                print(f"    tinyllava: {r['tinyllava']!r}\n    llama.cpp: {r['llama.cpp']!r}")
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
