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


def no_extra_buffer_types():
    """llama.cpp puts weights in "extra buffer types" where it can, such as the AMX tiles of Sapphire Rapids CPUs;
    its AMX matmul crashes (SIGSEGV) on these machines as soon as a batch has many rows. Keep plain buffers."""
    import llama_cpp.llama_cpp as lib
    default = lib.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p
    lib.llama_model_default_params = params


class LlamaCpp:
    """SmolLM2 + an mmproj in llama.cpp, through llama-cpp-python's low-level bindings (float32 attention)."""

    def __init__(self, mmproj, threads=2):
        import llama_cpp
        import llama_cpp.mtmd_cpp as mtmd
        no_extra_buffer_types()
        self.lc, self.mtmd = llama_cpp, mtmd
        self.llm = llama_cpp.Llama(model_path=str(weights.decoder_path()), n_ctx=1024, n_batch=512,
                                   n_threads=threads, flash_attn=False, verbose=False)
        p = mtmd.mtmd_context_params_default()
        p.use_gpu, p.n_threads, p.print_timings = False, threads, False
        p.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = mtmd.mtmd_init_from_file(str(mmproj).encode(), self.llm.model, p)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp refused {mmproj}")

    def embeddings(self, rgb):
        """llama.cpp's image tokens for an RGB uint8 picture -> [196, 576]."""
        m = self.mtmd
        img = np.ascontiguousarray(rgb)
        bmp = m.mtmd_bitmap_init(img.shape[1], img.shape[0], (ctypes.c_uint8 * img.size).from_buffer_copy(img.tobytes()))
        t = m.mtmd_input_text()
        t.text, t.text_len, t.add_special, t.parse_special = MARKER.encode(), len(MARKER), False, True
        chunks = m.mtmd_input_chunks_init()
        assert m.mtmd_tokenize(self.ctx, chunks, ctypes.byref(t), (m.mtmd_bitmap_p_ctypes * 1)(bmp), 1) == 0
        ch = m.mtmd_input_chunks_get(chunks, 0)
        n = m.mtmd_input_chunk_get_n_tokens(ch)
        assert m.mtmd_input_chunk_get_type(ch) == m.MTMD_INPUT_CHUNK_TYPE_IMAGE and m.mtmd_encode_chunk(self.ctx, ch) == 0
        d = self.lc.llama_model_n_embd_inp(self.llm.model)
        out = np.ctypeslib.as_array(m.mtmd_get_output_embd(self.ctx), shape=(n * d,)).reshape(n, d).copy()
        m.mtmd_input_chunks_free(chunks)
        m.mtmd_bitmap_free(bmp)
        return out

    def _decode(self, n_past, ids=None, emb=None):  # token ids or embeddings [n, d] at positions n_past...
        lc = self.lc
        n = len(ids) if ids is not None else len(emb)
        batch = lc.llama_batch_init(n, 0 if ids is not None else emb.shape[1], 1)
        try:
            if ids is not None:
                for i, t in enumerate(ids):
                    batch.token[i] = t
            else:
                ctypes.memmove(batch.embd, np.ascontiguousarray(emb, np.float32).ctypes.data, emb.size * 4)
            for i in range(n):
                batch.pos[i], batch.n_seq_id[i], batch.logits[i] = n_past + i, 1, i == n - 1
                batch.seq_id[i][0] = 0
            batch.n_tokens = n
            assert lc.llama_decode(self.llm.ctx, batch) == 0
        finally:
            lc.llama_batch_free(batch)
        return n_past + n

    def answer(self, prompt, image_tokens):
        """Greedy continuation of `prompt` (MARKER where the image goes), with llama.cpp's decoder, the
        image as the given tokens [196, 576], the text through llama.cpp's own tokenizer. -> token ids"""
        lc = self.lc
        lc.llama_memory_clear(lc.llama_get_memory(self.llm.ctx), True)
        before, after = prompt.split(MARKER)
        n_past = 0
        if before:
            n_past = self._decode(n_past, ids=self.llm.tokenize(before.encode(), add_bos=False, special=True))
        n_past = self._decode(n_past, emb=image_tokens)
        if after:
            n_past = self._decode(n_past, ids=self.llm.tokenize(after.encode(), add_bos=False, special=True))
        vocab, out = lc.llama_model_get_vocab(self.llm.model), []
        for _ in range(N_NEW):
            logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.llm.n_vocab(),))
            tok = int(np.argmax(logits))
            out.append(tok)
            if lc.llama_vocab_is_eog(vocab, tok):
                break
            n_past = self._decode(n_past, ids=[tok])
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
            ours = list(generate(dec, llava.embed(text.replace(MARKER, "<image>"), [ours_img])[0], N_NEW, {tok.eos_id}))
            theirs = cpp.answer(text, theirs_img)
            row[name] = {"tinyllava": tok.decode(ours), "llama.cpp": tok.decode(theirs), "same": ours == theirs,
                         "same_with_our_image_tokens": cpp.answer(text, ours_img) == ours,
                         "same_with_their_image_tokens": list(generate(
                             dec, llava.embed(text.replace(MARKER, "<image>"), [theirs_img])[0], N_NEW,
                             {tok.eos_id})) == theirs}
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
