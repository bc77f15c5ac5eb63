"""llama.cpp, driven from Python through llama-cpp-python's low-level bindings: the reference C++ runtime that
tinyllava's exported files must run in (tests/check_llamacpp.py) and that the benchmark compares against.

    cpp = LlamaCpp(mmproj="tinyllava-mmproj.gguf", threads=2)
    tokens = cpp.embeddings(rgb)            # llama.cpp's image tokens [196, 576] for an RGB uint8 picture
    ids = cpp.answer(prompt, tokens)        # greedy, with MARKER in the prompt where the image goes
    quantize_file(src, dst, "Q4_K_M")       # llama-quantize src dst Q4_K_M
    blocks = quantize_rows(x, GGMLType.Q4_K)    # ggml's reference quantizer on float32 rows

Needs `pip install llama-cpp-python==0.3.36`, which compiles llama.cpp from source (the README says how long).
"""
import ctypes
from pathlib import Path

import numpy as np

from . import quant, weights


def quantize_file(src, dst, ftype, threads=2):
    """llama.cpp's `llama-quantize src dst FTYPE` (llama_model_quantize); src: a float32 or float16 GGUF."""
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = quant.FILE_TYPES[ftype][0], threads
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src}")
    return Path(dst)


def quantize_rows(x, qtype):
    """float32 [rows, n] -> llama.cpp's blocks [rows, bytes per row]: ggml_quantize_chunk of llama-cpp-python's
    libggml-base, which without an importance matrix runs ggml's reference quantizers (quantize_row_q4_K_ref, ...),
    the ones llama-quantize runs."""
    import llama_cpp
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    x = np.ascontiguousarray(x, np.float32)
    out = np.zeros((x.shape[0], quant.nbytes(qtype, x.shape[1:])), np.uint8)
    lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], None)
    return out

MARKER = "<__media__>"


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
    """SmolLM2 (and an mmproj, for images) in llama.cpp; the vision tower's attention in float32."""

    def __init__(self, mmproj=None, threads=2, extra_buffer_types=False, model=None, lora=None):
        """model: a decoder GGUF (default: SmolLM2's); lora: a LoRA adapter GGUF applied on top of it."""
        import llama_cpp
        import llama_cpp.mtmd_cpp as mtmd
        if not extra_buffer_types:
            no_extra_buffer_types()
        self.lc, self.mtmd = llama_cpp, mtmd
        self.llm = llama_cpp.Llama(model_path=str(model or weights.decoder_path()), n_ctx=1024, n_batch=512,
                                   n_threads=threads, n_threads_batch=threads, flash_attn=False, verbose=False,
                                   lora_path=str(lora) if lora else None)
        self.ctx = None
        if mmproj is not None:
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

    def logits(self):  # -> [vocab]: the logits of the last position decoded (llama.cpp keeps only those)
        return np.ctypeslib.as_array(self.lc.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.llm.n_vocab(),))

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

    def answer(self, prompt, image_tokens=None, n_new=24):
        """Greedy continuation of `prompt` (MARKER where the image goes, if there is one), with llama.cpp's decoder,
        the image as the given tokens [196, 576], the text through llama.cpp's own tokenizer. -> token ids"""
        lc = self.lc
        lc.llama_memory_clear(lc.llama_get_memory(self.llm.ctx), True)
        before, after = prompt.split(MARKER) if image_tokens is not None else (prompt, "")
        n_past = 0
        if before:
            n_past = self._decode(n_past, ids=self.llm.tokenize(before.encode(), add_bos=False, special=True))
        if image_tokens is not None:
            n_past = self._decode(n_past, emb=image_tokens)
        if after:
            n_past = self._decode(n_past, ids=self.llm.tokenize(after.encode(), add_bos=False, special=True))
        vocab, out = lc.llama_model_get_vocab(self.llm.model), []
        for _ in range(n_new):
            tok = int(np.argmax(self.logits()))
            out.append(tok)
            if lc.llama_vocab_is_eog(vocab, tok):
                break
            n_past = self._decode(n_past, ids=[tok])
        return out
