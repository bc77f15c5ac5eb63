"""The fused quantized matmul (fused.py) against the reference path: quant.dequantize, then an ordinary product.

Tolerance. Dequantizing is exact: fused.py makes the same float32 weights as quant.dequantize, bit for bit, so
`rows` (the embedding) and the many-row products (dequantized tiles, then sgemm) are checked for equality or
near it. The one-row loop sums in another order (by block, with the Q4 minimum folded in as m * sum(x[b]),
vector lanes added at the end), so it differs from the product of the dequantized matrix by float32 rounding
only. Both are compared with the exact product (float64) of the same dequantized weights: each output y[i]
must be within TOL * s[i] of it, where s[i] = sum_j |W[i, j] x[j]| is the size of what is summed. Rounding
in float32 (2^-24 = 6e-8 per operation) accumulates like a random walk, ~sqrt(n) * 6e-8 * s = 2.3e-6 s for a
row of n = 1536; TOL = 1e-5 leaves room (measured worst: 6e-7 s on random blocks, 6e-8 s on the real
tensors, where float32 BLAS on the dequantized matrix itself is 9e-8 s), while one weight off by one
quantization step moves y[i] by about s / n, 6e-4 s for n = 1536.
For the whole decoder the logits are compared to 1e-4 of the largest logit (measured: 4e-7 after the prompt,
2e-6 after decoding steps): rounding differences grow through 30 blocks, a wrong matrix would not stay small.
"""
import json
import os
import platform
import subprocess
import sys

import numpy as np
import pytest

from tinyllava import decoding, fused, quant, runtime, weights
from tinyllava.decoding import Sampling, generate
from tinyllava.gguf import GGUFFile
from tinyllava.model import load_decoder
from tinyllava.quant import GGMLType

TOL = 1e-5
TYPES = [GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1]
ENGINES = ["numba", "numpy"] if fused.numba else ["numpy"]


@pytest.fixture(params=ENGINES)
def engine(request, monkeypatch):
    """Every test runs with numba's compiled loops and with the NumPy fallback (fused.ENGINE)."""
    monkeypatch.setattr(fused, "ENGINE", request.param)
    return request.param


def check_product(y, x, w):  # y [M, n_out] against the exact x @ w.T, w the dequantized float32 weights
    exact = x.astype(np.float64) @ w.T.astype(np.float64)          # [M, n_out]
    size = np.abs(x).astype(np.float64) @ np.abs(w).T              # [M, n_out]: s[i] of each output
    assert y.dtype == np.float32 and y.shape == exact.shape
    worst = float((np.abs(y - exact) / np.maximum(size, 1e-30)).max())
    assert worst < TOL, f"error {worst:.2e} of the summed magnitude (tolerance {TOL})"
    return worst


def random_matrix(qtype, n_out, n_in, seed):
    """Random weights with the spread of a real layer: rows of different scale, a few outliers, a zero block."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n_out, n_in)).astype(np.float32) * rng.uniform(0.01, 0.2, (n_out, 1)).astype(np.float32)
    a[rng.integers(0, n_out, 5), rng.integers(0, n_in, 5)] *= 30
    a[0, :32] = 0
    return fused.QuantMatrix.quantize(a, qtype)


@pytest.mark.parametrize("qtype", TYPES)
def test_dequantize_is_bit_exact(qtype, engine):
    m = random_matrix(qtype, 37, 96, seed=1)
    ref = quant.dequantize(m.w, qtype, m.shape)
    np.testing.assert_array_equal(m.dequantize(), ref)
    np.testing.assert_array_equal(m.dequantize(5, 9), ref[5:9])
    ids = np.array([[3, 0, 36], [3, 7, 1]])
    np.testing.assert_array_equal(m.rows(ids), ref[ids])              # [2, 3, 96]: the embedding lookup


def test_float16_scales_every_value():
    """Every one of the 65536 float16 bit patterns as a Q8_0 scale (subnormals, zeros, infinities, NaNs)."""
    d = np.arange(65536, dtype=np.uint16)
    blocks = np.zeros(65536, quant.Q8_0)
    blocks["d"] = d.view(np.float16)
    blocks["qs"][:, 0] = 1                                            # weight 0 of each block is the scale
    m = fused.QuantMatrix(blocks.view(np.uint8).reshape(2048, -1), GGMLType.Q8_0, (2048, 1024))
    with np.errstate(invalid="ignore"):  # inf * 0 in the other 31 weights: NaN, as intended
        got = m.dequantize()
    np.testing.assert_array_equal(got[:, ::32].reshape(-1), d.view(np.float16).astype(np.float32))


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("n_out", [2, 37, 256])                       # fewer than 4 rows, a short last group
@pytest.mark.parametrize("M", [1, 3, fused.MATVEC_MAX_ROWS + 1])       # the fused loop, and the sgemm tiles
def test_matmul_random_blocks(qtype, n_out, M, engine):
    m = random_matrix(qtype, n_out, 160, seed=n_out)
    x = np.random.default_rng(M).standard_normal((M, 160)).astype(np.float32)
    check_product(m.matmul(x), x, quant.dequantize(m.w, qtype, m.shape))


def test_matmul_keeps_leading_axes_and_tiles(engine, monkeypatch):
    m = random_matrix(GGMLType.Q4_1, 100, 64, seed=3)
    w = m.dequantize()
    x = np.random.default_rng(0).standard_normal((2, 5, 64)).astype(np.float32)
    monkeypatch.setattr(fused, "TILE_BYTES", 64 * 4 * 7)              # tiles of 7 rows: 15 tiles, a short one
    y = m.matmul(x)
    assert y.shape == (2, 5, 100)
    check_product(y.reshape(10, 100), x.reshape(10, 64), w)
    check_product(m.matmul(x[0, :1]), x[0, :1], w)                    # one row: [1, 64] -> [1, 100]
    dy = np.random.default_rng(1).standard_normal((2, 5, 100)).astype(np.float32)
    np.testing.assert_allclose(dy @ m, dy @ w, rtol=1e-5, atol=1e-5)  # the backward of a frozen layer


def real_tensors():
    dec, vis = GGUFFile(weights.decoder_path()), GGUFFile(weights.vision_path())
    return {"attn_q.0": dec.tensor("blk.0.attn_q.weight"), "ffn_down.29": dec.tensor("blk.29.ffn_down.weight"),
            "token_embd": dec.tensor("token_embd.weight"), "v.ffn_up.3": vis.tensor("v.blk.3.ffn_up.weight"),
            "v.attn_out.11": vis.tensor("v.blk.11.attn_out.weight")}


@pytest.fixture(scope="module")
def tensors():
    return real_tensors()


@pytest.mark.parametrize("name", ["attn_q.0", "ffn_down.29", "token_embd", "v.ffn_up.3", "v.attn_out.11"])
def test_real_tensors(tensors, name, engine):
    t = tensors[name]
    m = fused.QuantMatrix.from_tensor(t)
    assert m.type == t.type and m.shape == t.shape and np.shares_memory(m.w, t.data)  # kept in the file's map
    w = t.numpy()                                                     # the reference path: quant.dequantize
    np.testing.assert_array_equal(m.dequantize(0, 64), w[:64])
    x = np.random.default_rng(0).standard_normal((2, t.shape[1])).astype(np.float32)
    check_product(m.matmul(x[:1]), x[:1], w)
    check_product(m.matmul(x), x, w)


def test_unquantized_tensors_stay_arrays():
    t = GGUFFile(weights.decoder_path()).tensor("output_norm.weight")  # F32
    assert isinstance(fused.QuantMatrix.from_tensor(t), np.ndarray)


@pytest.fixture(scope="module")
def fused_decoder():
    return load_decoder(quantized=True)


def test_decoder_logits_and_greedy_tokens(decoder, fused_decoder):
    """The whole decoder, fused against the reference (float32 weights): a prompt through the sgemm tiles,
    then decoding steps through the fused loop, and greedy generation token for token."""
    from tinyllava.llama import KVCache
    ref, tok = decoder
    model, _ = fused_decoder
    ids = tok.encode(tok.chat([{"role": "user", "content": "Name three rivers of Europe."}]))
    caches = [KVCache(m.cfg, 1, 64) for m in (ref, model)]
    logits = [m.logits(m.forward(m.embed([ids]), c)) for m, c in zip((ref, model), caches)]  # [1, T, vocab]
    assert np.abs(logits[1] - logits[0]).max() < 1e-4 * np.abs(logits[0]).max()
    for t in ids[:6]:                                                 # one token at a time: the fused loop
        step = [m.logits(m.forward(m.embed([[t]]), c)) for m, c in zip((ref, model), caches)]
        assert np.abs(step[1] - step[0]).max() < 1e-4 * np.abs(step[0]).max()
    x = [m.embed([ids]) for m in (ref, model)]
    np.testing.assert_array_equal(x[1], x[0])
    want = list(generate(ref, x[0], Sampling(24)))
    assert list(generate(model, x[1], Sampling(24))) == want


def test_a_prefill_hands_its_tile_buffer_back(fused_decoder):
    """Decoding needs no dequantized tiles: after a prompt goes into the KV cache the buffer is dropped (and
    malloc's free pages returned), so the decoding steps do not hold them at the peak of the process's memory.
    A pass without a cache (training) keeps it for the next one."""
    from tinyllava.llama import KVCache
    model, _ = fused_decoder
    x = model.embed([list(range(1, 40))])                             # [1, 39, d]: the sgemm tiles
    model.forward(x)
    assert fused._local.buf is not None
    model.forward(x, KVCache(model.cfg, 1, 64))
    assert fused._local.buf is None


def test_decoder_numpy_fallback(decoder, fused_decoder, monkeypatch):
    monkeypatch.setattr(fused, "ENGINE", "numpy")
    ref, tok = decoder
    model, _ = fused_decoder
    ids = tok.encode(tok.chat([{"role": "user", "content": "What is the capital of France?"}]))
    assert list(generate(model, model.embed([ids]), Sampling(8))) == list(generate(ref, ref.embed([ids]), Sampling(8)))


def test_vision_block(tensors):
    """One CLIP block with fused Q8_0 matrices against the same block with float32 ones (197 rows: sgemm)."""
    from tinyllava.vit import Clip, ClipConfig, block
    path = weights.vision_path()
    fused_tower = Clip.load(path, load_matrix=fused.QuantMatrix.from_tensor)
    layer = fused_tower.layers[3]
    plain = type(layer)(**{k: (v.dequantize() if isinstance(v, fused.QuantMatrix) else v)
                           for k, v in vars(layer).items()})
    x = np.random.default_rng(0).standard_normal((1, 197, 768)).astype(np.float32)
    a, b = block(x, layer, ClipConfig()), block(x, plain, ClipConfig())
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


VECTOR_CODE = """
import json, re, numpy as np
from tinyllava import fused, runtime
from tinyllava.quant import GGMLType
runtime.use_threads(1)
for t in (GGMLType.Q4_1, GGMLType.Q8_0):  # the decoder's two kinds, through the one-thread product
    w = np.random.default_rng(1).standard_normal((64, 576)).astype(np.float32)
    fused.QuantMatrix.quantize(w, t).matmul(np.ones((1, 576), np.float32))
asm = "\\n".join(fused.matvec_1thread.inspect_asm().values())
fma = re.findall(r"^\\s*vfn?m(?:add|sub)\\w*ps\\s.*%([xyz]mm)\\d+\\s*$", asm, re.M)  # packed float32 FMAs
print(json.dumps({r: fma.count(r) for r in ("xmm", "ymm", "zmm")}))
"""


on_x86 = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="compiles for x86 CPUs")


def run_compiled(code, cache_dir, **env):  # code in a fresh Python whose numba compiles afresh -> its stdout
    p = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir), **env),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


@on_x86
@pytest.mark.parametrize("cpu", ["host", "haswell"])
def test_the_products_compile_to_vector_code(cpu, tmp_path):
    """The quantized products become packed float32 fused multiply-adds in 256-bit registers (ymm, 8 lanes) or
    wider, on this CPU and for AVX2 alone (NUMBA_CPU_NAME=haswell: the code an AVX2 laptop gets); scalar code
    would have none. Compiled afresh (an empty cache directory): numba shows no assembly of cached code."""
    target = dict(NUMBA_CPU_NAME="haswell", NUMBA_CPU_FEATURES="+avx,+avx2,+fma,+f16c") if cpu == "haswell" else {}
    fma = json.loads(run_compiled(VECTOR_CODE, tmp_path, **target))
    assert fma["ymm"] + fma["zmm"] >= 32, fma
    if cpu == "haswell":
        assert fma["zmm"] == 0, fma  # AVX2 has no 512-bit registers


OLD_X86 = """
import numba, numpy as np
from tinyllava import fused, quant, runtime
from tinyllava.quant import GGMLType
assert not fused.NATIVE_F16  # the integer path is the one compiled here


@numba.njit
def widen(b, out):
    for i in range(out.shape[0]):
        out[i] = fused.f16(b, 2 * i)


h = np.arange(2 ** 16, dtype=np.uint16)  # every float16, subnormals, infinities and NaNs included
out, want = np.empty(2 ** 16, np.float32), h.view(np.float16).astype(np.float32)
widen(h.view(np.uint8), out)
nan = np.isnan(want)
assert np.array_equal(np.isnan(out), nan) and np.array_equal(out[~nan].view(np.uint32), want[~nan].view(np.uint32))
runtime.use_threads(1)
x = np.random.default_rng(0).standard_normal((1, 576)).astype(np.float32)
for t in (GGMLType.Q4_1, GGMLType.Q8_0):
    m = fused.QuantMatrix.quantize(np.random.default_rng(1).standard_normal((64, 576)).astype(np.float32), t)
    assert np.array_equal(m.dequantize(), quant.dequantize(m.w, t, m.shape))
    y, ref = m.matmul(x), x.astype(np.float64) @ quant.dequantize(m.w, t, m.shape).T.astype(np.float64)
    assert np.abs(y - ref).max() < 1e-5 * np.abs(ref).max()
print("ok")
"""


@on_x86
def test_an_x86_without_f16c_widens_float16_exactly(tmp_path):
    """On an x86 CPU without F16C (before 2012; Atom-class cores without AVX) the float16 scales are widened with
    integer operations, not by a library call the JIT lacks (that crashed): every float16 bit for bit as NumPy
    widens it, and the products equal the NumPy path. Compiled for such a CPU: NUMBA_CPU_NAME=x86-64, SSE2."""
    assert run_compiled(OLD_X86, tmp_path, NUMBA_CPU_NAME="x86-64", NUMBA_CPU_FEATURES="+sse2").strip() == "ok"


@pytest.mark.parametrize("threads", [1, 2])
def test_compiled_step_against_the_blocks(threads):
    """The one-token step of fused_llama.py (all blocks in one compiled call) against Llama's blocks on the same
    quantized matrices, before and after a LoRA adapter in float16 is attached (random: it changes the logits):
    each step's logits, the KV cache it writes, and greedy generation token for token."""
    from tinyllava import lora
    from tinyllava.errors import TinyLlavaError
    from tinyllava.fused_llama import FusedLlama
    from tinyllava.llama import KVCache, Llama
    model, tok = load_decoder(quantized=True)                         # its own: the adapter stays in this test
    blocks = Llama(model.cfg, model.embedding, model.layers, model.norm)        # the same weights, Llama's path
    assert isinstance(model, FusedLlama) and not isinstance(blocks, FusedLlama)
    ids = tok.encode(tok.chat([{"role": "user", "content": "Why is the sky blue?"}]))
    before = runtime.THREADS
    try:
        runtime.use_threads(threads)
        for adapted in (False, True):
            if adapted:
                lora.attach(model, rank=4)                                # every linear of every block
                assert model.compiled() is None                           # float32, training: Llama's path
                for m in lora.adapters(model).values():                   # float16, as lora.load leaves them
                    m.a, m.b = m.a.astype(np.float16), np.random.default_rng(1).normal(0, 0.05, m.b.shape
                                                                                       ).astype(np.float16)
            assert model.compiled() is not None                           # the compiled step runs
            caches = [KVCache(model.cfg, 1, len(ids) + 8) for _ in range(2)]
            for t in [ids] + [[t] for t in ids[:6]]:                  # the prompt (Llama's path), then 6 steps
                logits = [m.logits(m.forward(m.embed([t]), c)[0, -1]) for m, c in zip((blocks, model), caches)]
                assert np.abs(logits[1] - logits[0]).max() < 1e-4 * np.abs(logits[0]).max()
            n = caches[0].length
            assert caches[1].length == n
            for a, b in ((caches[0].k, caches[1].k), (caches[0].v, caches[1].v)):
                assert np.abs(b[:, :, :n] - a[:, :, :n]).max() < 1e-4 * np.abs(a[:, :, :n]).max()
            x = model.embed([ids])
            with pytest.MonkeyPatch.context() as mp:  # the cache grows during the answer: new arrays for the step
                mp.setattr(decoding, "RESERVE", 3)
                assert list(generate(model, x, Sampling(16))) == list(generate(blocks, x, Sampling(16)))
        full = KVCache(model.cfg, 1, 1)
        model.forward(model.embed([[ids[0]]]), full)
        with pytest.raises(TinyLlavaError, match="do not fit"):                   # Llama's error, not a crash
            model.forward(model.embed([[ids[1]]]), full)
    finally:
        runtime.use_threads(before)
