"""Does llama.cpp run tinyllava's trained model and say the same thing? (A check script, not a CI test:
`pip install llama-cpp-python==0.3.36` compiles llama.cpp, about 25 minutes on two cores.)

    python tests/check_llamacpp.py [--projector FILE] [--photos N] [--json]

For each photo: export the mmproj (python -m tinyllava.export), load it with SmolLM2's GGUF in llama.cpp's
multimodal library (mtmd), and compare with tinyllava:
  1. image embeddings: llama.cpp's 196 image tokens against tinyllava's (cosine per token; llama.cpp's LLaVA
     graph hands the projector patches 1..195 and the class token, see tinyllava/export.py)
  2. greedy answers, token for token, for a caption (the plain template: the image alone) and a ChatML question
  3. the same answers with llama.cpp's decoder fed tinyllava's own image tokens, and tinyllava's decoder fed
     llama.cpp's: this splits any difference into "the image tokens differ" and "the decoders differ"
"""
import argparse
import ctypes
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tinyllava import weights  # noqa: E402
from tinyllava.export import export_mmproj  # noqa: E402
from tinyllava.generate import generate  # noqa: E402
from tinyllava.image import open_image, preprocess  # noqa: E402
from tinyllava.model import chat_prompt, default_projector_path, load_llava  # noqa: E402
from tinyllava.projector import Projector  # noqa: E402
from tinyllava.quant import GGMLType  # noqa: E402

MARKER = "<__media__>"
QUESTION = "What is in the picture?"
N_NEW = 24


class LlamaCpp:
    """SmolLM2 + an mmproj in llama.cpp, through llama-cpp-python's low-level bindings (float32 attention)."""

    def __init__(self, mmproj, threads=2):
        import llama_cpp
        import llama_cpp.mtmd_cpp as mtmd
        self.lc, self.mtmd = llama_cpp, mtmd
        self.llm = llama_cpp.Llama(model_path=str(weights.decoder_path()), n_ctx=1024, n_batch=512,
                                   n_threads=threads, flash_attn=False, verbose=False)
        p = mtmd.mtmd_context_params_default()
        p.use_gpu, p.n_threads, p.print_timings = False, threads, False
        p.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = mtmd.mtmd_init_from_file(str(mmproj).encode(), self.llm.model, p)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp refused {mmproj}")
        self.n_embd = llama_cpp.llama_model_n_embd_inp(self.llm.model)

    def chunks(self, rgb, prompt):
        m = self.mtmd
        img = np.ascontiguousarray(rgb)
        bmp = m.mtmd_bitmap_init(img.shape[1], img.shape[0], (ctypes.c_uint8 * img.size).from_buffer_copy(img.tobytes()))
        t = m.mtmd_input_text()
        b = prompt.encode()
        t.text, t.text_len, t.add_special, t.parse_special = b, len(b), False, True
        chunks = m.mtmd_input_chunks_init()
        assert m.mtmd_tokenize(self.ctx, chunks, ctypes.byref(t), (m.mtmd_bitmap_p_ctypes * 1)(bmp), 1) == 0
        return chunks

    def image_chunk(self, chunks):
        m = self.mtmd
        return next(m.mtmd_input_chunks_get(chunks, i) for i in range(m.mtmd_input_chunks_size(chunks))
                    if m.mtmd_input_chunk_get_type(m.mtmd_input_chunks_get(chunks, i)) == m.MTMD_INPUT_CHUNK_TYPE_IMAGE)

    def embeddings(self, rgb):  # -> [196, 576] llama.cpp's image tokens
        chunks = self.chunks(rgb, MARKER)
        ch = self.image_chunk(chunks)
        n = self.mtmd.mtmd_input_chunk_get_n_tokens(ch)
        assert self.mtmd.mtmd_encode_chunk(self.ctx, ch) == 0
        out = np.ctypeslib.as_array(self.mtmd.mtmd_get_output_embd(self.ctx), shape=(n * self.n_embd,))
        return out.reshape(n, self.n_embd).copy()

    def answer(self, rgb, prompt, image_tokens=None):
        """Greedy continuation of `prompt` (MARKER where the image goes). image_tokens: feed these instead of
        llama.cpp's own. -> token ids"""
        lc, m = self.lc, self.mtmd
        lc.llama_memory_clear(lc.llama_get_memory(self.llm.ctx), True)
        chunks = self.chunks(rgb, prompt)
        n_past = lc.llama_pos(0)
        for i in range(m.mtmd_input_chunks_size(chunks)):
            ch = m.mtmd_input_chunks_get(chunks, i)
            last = i == m.mtmd_input_chunks_size(chunks) - 1
            if image_tokens is not None and m.mtmd_input_chunk_get_type(ch) == m.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                emb = np.ascontiguousarray(image_tokens, np.float32)
                ok = m.mtmd_helper_decode_image_chunk(self.ctx, self.llm.ctx, ch,
                                                      emb.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                                      n_past.value, 0, 512, ctypes.byref(n_past))
            else:
                ok = m.mtmd_helper_eval_chunk_single(self.ctx, self.llm.ctx, ch, n_past.value, 0, 512, last,
                                                     ctypes.byref(n_past))
            assert ok == 0
        vocab, out = lc.llama_model_get_vocab(self.llm.model), []
        for _ in range(N_NEW):
            logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.llm.n_vocab(),))
            tok = int(np.argmax(logits))
            out.append(tok)
            if lc.llama_vocab_is_eog(vocab, tok):
                break
            assert lc.llama_decode(self.llm.ctx, lc.llama_batch_get_one((lc.llama_token * 1)(tok), 1)) == 0
        return out


def photos(n):
    """Flickr8k dev photos (224x224: no resampling on either side) when present, then the demo photos."""
    flickr = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k"
    out = []
    if flickr.is_dir():
        pairs = [json.loads(x) for x in (flickr / "pairs.jsonl").open()]
        out = [flickr / p["image"] for p in pairs if p["split"] == "dev"][:n]
    return out + list(weights.demo_photos().values())[:max(0, n - len(out))]


def cosine(a, b):
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--projector", default=str(default_projector_path()))
    ap.add_argument("--photos", type=int, default=6)
    ap.add_argument("--type", choices=["q8_0", "f32"], default="q8_0")
    ap.add_argument("--cls", choices=["reorder", "drop"], default="reorder")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    mmproj = export_mmproj(tmp / "mmproj.gguf", weights.vision_path(), Projector.load(args.projector),
                           GGMLType.Q8_0 if args.type == "q8_0" else GGMLType.F32, args.cls)
    cpp = LlamaCpp(mmproj)
    llava = load_llava(args.projector)
    tok, dec = llava.tok, llava.decoder
    rows = []
    for path in photos(args.photos):
        img = open_image(path)
        ours_img = llava.image_tokens(preprocess(img)[None])[0]                 # [196, 576]
        theirs_img = cpp.embeddings(np.asarray(img))
        shift = 1 if args.cls == "reorder" else 0                              # llama.cpp's token j = our j + 1
        cos = cosine(ours_img[shift:], theirs_img[:196 - shift])
        row = {"photo": Path(path).name, "size": img.size, "token_cos_min": float(cos.min()),
               "token_cos_mean": float(cos.mean())}
        for name, text in [("caption", MARKER), ("question", chat_prompt(tok, QUESTION).replace("<image>", MARKER))]:
            x_ours, _ = llava.embed(text.replace(MARKER, "<image>"), [ours_img])
            x_theirs, _ = llava.embed(text.replace(MARKER, "<image>"), [theirs_img])
            ours = list(generate(dec, x_ours, N_NEW, {tok.eos_id}))
            theirs = cpp.answer(np.asarray(img), text)
            row[name] = {"tinyllava": tok.decode(ours), "llama.cpp": tok.decode(theirs), "same": ours == theirs,
                         "same_with_our_image_tokens": cpp.answer(np.asarray(img), text, ours_img) == ours,
                         "same_with_their_image_tokens": list(generate(dec, x_theirs, N_NEW, {tok.eos_id})) == theirs}
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
