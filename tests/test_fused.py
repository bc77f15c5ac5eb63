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

The integer kernels (engine "int8") multiply the weights by x rounded to 8 bits per block of 32 (xq, with scale
xd = max|x_b| / 127). Two checks: against the exact product with that rounded x, xd * xq, to the same TOL (the
integer sums are exact, so only float32 rounding remains: a wrong nibble or bit would show as ~s / n); and against
the exact product with x itself, within the bound the rounding allows: each x_j moves by at most xd / 2, so y[i]
by at most sum_b xd_b / 2 * sum_{j in b} |W[i, j]|.
"""
import json
import os
import platform
import subprocess
import sys

import numpy as np
import pytest

from tinyllava import decoding, fused, quant, runtime, simd, weights
from tinyllava.decoding import Sampling, generate
from tinyllava.gguf import GGUFFile
from tinyllava.model import load_decoder
from tinyllava.quant import GGMLType

TOL = 1e-5
TYPES = [GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q4_K, GGMLType.Q6_K]
ENGINES = ["numba", "int8", "numpy"] if fused.numba else ["numpy"]


@pytest.fixture(params=ENGINES)
def engine(request, monkeypatch):
    """Every test runs with numba's compiled loops (float32, and the integer kernels on 8-bit activations) and with
    the NumPy fallback (fused.ENGINE, fused.INTEGER)."""
    monkeypatch.setattr(fused, "ENGINE", "numpy" if request.param == "numpy" else "numba")
    monkeypatch.setattr(fused, "INTEGER", request.param == "int8")
    return request.param


@pytest.fixture(autouse=True)
def float_kernels(monkeypatch):  # the tests below ask for the integer kernels where they mean them
    monkeypatch.setattr(fused, "INTEGER", False)


def check_product(y, x, w):  # y [M, n_out] against the exact x @ w.T, w the dequantized float32 weights
    exact = x.astype(np.float64) @ w.T.astype(np.float64)          # [M, n_out]
    size = np.abs(x).astype(np.float64) @ np.abs(w).T              # [M, n_out]: s[i] of each output
    assert y.dtype == np.float32 and y.shape == exact.shape
    worst = float((np.abs(y - exact) / np.maximum(size, 1e-30)).max())
    assert worst < TOL, f"error {worst:.2e} of the summed magnitude (tolerance {TOL})"
    return worst


def rounded_activations(x):  # x [M, n] -> xd * xq [M, n] float64: x as the integer kernels see it
    xq, xd, xs = fused.quantize_activations(np.ascontiguousarray(x, np.float32))
    top = np.abs(x).reshape(len(x), -1, 32).max(axis=2)                          # [M, n / 32]
    with np.errstate(divide="ignore"):
        want = np.rint(x.reshape(len(x), -1, 32) * np.where(top > 0, np.float32(127) / top, 0)[..., None])
    assert np.abs(xq.reshape(want.shape) - want).max() <= 1                       # rint, ties either way
    np.testing.assert_allclose(xd, top / np.float32(127), rtol=1e-6)           # (fastmath: times 1 / 127)
    np.testing.assert_allclose(xs, xd * xq.reshape(want.shape).sum(axis=2), rtol=1e-6)
    return (xd.astype(np.float64)[..., None] * xq.reshape(want.shape)).reshape(x.shape)


def check_int8_product(y, x, w):  # the integer kernels' y [M, n_out]: see the module's docstring
    xr = rounded_activations(x)
    check_product(y, xr, w)                                        # exact sums of the rounded x
    exact = x.astype(np.float64) @ w.T.astype(np.float64)
    top = np.abs(x).reshape(len(x), -1, 32).max(axis=2).astype(np.float64)       # [M, n / 32]
    bound = (top / 254) @ np.abs(w).reshape(len(w), -1, 32).sum(axis=2).T        # [M, n_out]
    size = np.abs(x).astype(np.float64) @ np.abs(w).T
    assert np.all(np.abs(y - exact) <= bound + TOL * size)
    return float((np.abs(y - exact) / size).max())


def check(engine, y, x, w):  # the check for what computed y
    if engine == "int8" and len(x) <= fused.MATVEC_MAX_ROWS and len(w) >= 4:
        return check_int8_product(y, x, w)
    return check_product(y, x, w)


def random_matrix(qtype, n_out, n_in, seed):
    """Random weights with the spread of a real layer: rows of different scale, a few outliers, a zero block."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n_out, n_in)).astype(np.float32) * rng.uniform(0.01, 0.2, (n_out, 1)).astype(np.float32)
    a[rng.integers(0, n_out, 5), rng.integers(0, n_in, 5)] *= 30
    a[0, :32] = 0
    return fused.QuantMatrix.quantize(a, qtype)


def n_in(qtype):  # a row: 5 blocks of 32, or 2 super-blocks of 256
    return 512 if quant.BLOCK_SIZE[qtype][0] == 256 else 160


@pytest.mark.parametrize("qtype", TYPES)
def test_dequantize_is_bit_exact(qtype, engine):
    m = random_matrix(qtype, 37, n_in(qtype), seed=1)
    ref = quant.dequantize(m.w, qtype, m.shape)
    np.testing.assert_array_equal(m.dequantize(), ref)
    np.testing.assert_array_equal(m.dequantize(5, 9), ref[5:9])
    ids = np.array([[3, 0, 36], [3, 7, 1]])
    np.testing.assert_array_equal(m.rows(ids), ref[ids])              # [2, 3, n_in]: the embedding lookup


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
    m = random_matrix(qtype, n_out, n_in(qtype), seed=n_out)
    x = np.random.default_rng(M).standard_normal((M, n_in(qtype))).astype(np.float32)
    check(engine, m.matmul(x), x, quant.dequantize(m.w, qtype, m.shape))


@pytest.mark.parametrize("qtype", TYPES)
def test_integer_kernels_on_awkward_activations(qtype, monkeypatch):
    """x with a zero block, a block of one value, huge and tiny blocks (rounded to 8 bits each on its own scale),
    and every 8-bit value of the weights' range: the integer kernels, against the exact product with the rounded x."""
    monkeypatch.setattr(fused, "INTEGER", True)
    m = random_matrix(qtype, 64, 512, seed=5)
    x = np.random.default_rng(2).standard_normal((2, 512)).astype(np.float32)
    x[0, :32], x[0, 32:64], x[1, 64:96], x[1, 96:128] = 0, -3.5, x[1, 64:96] * 1e4, x[1, 96:128] * 1e-6
    check_int8_product(m.matmul(x), x, quant.dequantize(m.w, qtype, m.shape))


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
    check(engine, m.matmul(x[:1]), x[:1], w)
    check(engine, m.matmul(x), x, w)


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


HELD_OUT = ["Why is the sky blue?", "What do cats like to eat?", "How do bees make honey?", "Name a famous painter."]


def test_integer_decoding_on_held_out_prompts(fused_decoder, monkeypatch):
    """What rounding x to 8 bits does to SmolLM2's decoding (the README's "Speed and memory"): along the float
    kernels' greedy tokens, the integer kernels' logits stay within 0.1 of the largest logit (on 20 held-out prompts
    x 32 tokens: at most 0.074), and they pick the same token wherever the float logits' top two are 0.5 apart or
    more (on those 20 prompts the two paths part only where the gap was 0.30 or less). No choice in the kernels was
    made on these prompts (4 of the 20)."""
    from tinyllava.llama import KVCache
    model, tok = fused_decoder
    for prompt in HELD_OUT:
        ids = tok.encode(tok.chat([{"role": "user", "content": prompt}]))
        logits, tokens = {}, []
        for integer in (False, True):                                 # float first; then along its tokens
            monkeypatch.setattr(fused, "INTEGER", integer)
            cache = KVCache(model.cfg, 1, len(ids) + 16)
            h, logits[integer] = model.forward(model.embed([ids]), cache)[0, -1], []
            for step in range(12):
                logits[integer].append(model.logits(h))
                if not integer:
                    tokens.append(int(logits[False][-1].argmax()))
                h = model.forward(model.embed([[tokens[step]]]), cache)[0, -1]
        for f, i in zip(logits[False], logits[True]):
            assert np.abs(i - f).max() < 0.1 * np.abs(f).max(), prompt
            second, first = np.sort(f)[-2:]
            assert first - second < 0.5 or i.argmax() == f.argmax(), prompt


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


COMPILED_CODE = r"""
# Run in a fresh Python whose numba compiles for another CPU (NUMBA_CPU_NAME, NUMBA_CPU_FEATURES) into an empty cache
# (numba shows no assembly of cached code). argv: what to do; prints one JSON object.
import json, re, sys, numba, numpy as np
from tinyllava import fused, quant, runtime, simd
from tinyllava.quant import GGMLType
TYPES = (GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q4_K, GGMLType.Q6_K)


def integer_products(run):  # -> the integer kernels' products of random blocks, by type (run: else compile only)
    x = np.random.default_rng(0).standard_normal((1, 512)).astype(np.float32)
    act = fused.quantize_activations(x) if run else (np.zeros((1, 512), np.int8), np.ones((1, 16), np.float32),
                                                     np.ones((1, 16), np.float32))
    ys = {}
    for t in TYPES:
        w = fused.QuantMatrix.quantize(np.random.default_rng(1).standard_normal((64, 512)).astype(np.float32), t).w
        args = lambda r: (w.reshape(-1), w.shape[1], r, *act, 0, fused.KERNELS[t])  # rows r..r+3, row 0 of x
        fused.idot4.compile(tuple(numba.typeof(a) for a in args(0)))
        if run:
            ys[t.name] = [float(v) for r in range(0, 64, 4) for v in fused.idot4(*args(r))]
    return ys


def count(asm, pattern):
    return len(re.findall(pattern, asm, re.M))


if __name__ == "__main__":
    out = {"instructions": simd.INSTRUCTIONS, "integer": fused.INTEGER}
    runtime.use_threads(1)
    if "float" in sys.argv:  # the float kernels, as the products call them (compiled, not run)
        x, xsum = np.ones(576, np.float32), np.ones(18, np.float32)
        w = fused.QuantMatrix.quantize(np.ones((64, 576), np.float32), GGMLType.Q4_1).w
        fused.dot4.compile(tuple(numba.typeof(a) for a in (w, w.reshape(-1), 0, x, xsum, 0, 16)))
        asm = "\n".join(fused.dot4.inspect_asm().values())
        out["fma"] = {r: count(asm, r"^\s*vfn?m(?:add|sub)\w*ps\s.*%" + r + r"\d+\s*$") for r in ("xmm", "ymm", "zmm")}
    if "f16" in sys.argv:  # every float16 widened, and the float products, on a CPU without F16C
        @numba.njit
        def widen(b, out):
            for i in range(out.shape[0]):
                out[i] = simd.f16(b, 2 * i)
        h = np.arange(2 ** 16, dtype=np.uint16)  # every float16, subnormals, infinities and NaNs included
        got, want = np.empty(2 ** 16, np.float32), h.view(np.float16).astype(np.float32)
        widen(h.view(np.uint8), got)
        nan = np.isnan(want)
        out["f16 exact"] = bool(np.array_equal(np.isnan(got), nan) and
                                np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32)))
        x = np.random.default_rng(0).standard_normal((1, 576)).astype(np.float32)
        out["float products"] = {}
        for t in (GGMLType.Q4_1, GGMLType.Q8_0):
            m = fused.QuantMatrix.quantize(np.random.default_rng(1).standard_normal((64, 576)).astype(np.float32), t)
            deq = quant.dequantize(m.w, t, m.shape)
            y, ref = m.matmul(x), x.astype(np.float64) @ deq.T.astype(np.float64)
            out["float products"][t.name] = bool(np.array_equal(m.dequantize(), deq) and
                                                 np.abs(y - ref).max() < 1e-5 * np.abs(ref).max())
    if "integer" in sys.argv:  # compiled for the instructions chosen; run where this CPU has them
        out["y"] = integer_products("run" in sys.argv)
        asm = "\n".join(f.inspect_asm(f.signatures[0]) for f in (fused.idot4, fused.idot_q4_k, fused.idot_q6_k))
        out["count"] = {op: count(asm, r"^\s*(?:\{vex\}\s*)?" + op + r"\s") for op in
                        ("vpmaddubsw", "vpmaddwd", "vpdpbusd", "pmaddubsw")}
        out["count"]["vex vpdpbusd"] = count(asm, r"\{vex\}\s*vpdpbusd\s")
        out["count"]["vpdpbusd ymm"] = count(asm, r"^\s*(?:\{vex\}\s*)?vpdpbusd\s.*%ymm")
    print(json.dumps(out))
"""
AVX2 = "+avx,+avx2,+fma,+f16c"
TARGETS = {  # a CPU numba compiles for -> its NUMBA_CPU_NAME and NUMBA_CPU_FEATURES, and what is checked there
    "this CPU": (None, None, "float"),
    "AVX2 (Haswell, Zen 1-3)": ("haswell", AVX2, "float integer"),
    "AVX-512 VNNI (Ice Lake, Zen 4-5)": ("icelake-server", AVX2 + ",+avx512f,+avx512bw,+avx512vl,+avx512vnni",
                                         "integer"),
    "AVX-VNNI without AVX-512 (Alder Lake)": ("alderlake", AVX2 + ",+avxvnni,-avx512f,-avx512vnni", "integer"),
    "an x86 without F16C (x86-64, SSE2)": ("x86-64", "+sse2", "f16 integer"),
}
on_x86 = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="compiles for x86 CPUs")


def runs_here(features):  # can this CPU run code compiled with these features?
    host = simd.compile_features()
    return features is None or all(f in host for f in features.split(",") if f.startswith("+"))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """target -> what COMPILED_CODE printed there (one subprocess per target, run once for all the tests)."""
    done = {}

    def get(target):
        if target not in done:
            name, features, what = TARGETS[target]
            env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path_factory.mktemp("numba")))
            if name:
                env.update(NUMBA_CPU_NAME=name, NUMBA_CPU_FEATURES=features)
            argv = what.split() + (["run"] if runs_here(features) else [])
            p = subprocess.run([sys.executable, "-c", COMPILED_CODE, *argv], env=env, capture_output=True,
                               text=True, timeout=900)
            assert p.returncode == 0, p.stderr[-2000:]
            done[target] = json.loads(p.stdout)
        return done[target]
    return get


@on_x86
@pytest.mark.parametrize("target", ["this CPU", "AVX2 (Haswell, Zen 1-3)"])
def test_the_products_compile_to_vector_code(target, compiled):
    """The float kernels become packed float32 fused multiply-adds in 256-bit registers (ymm, 8 lanes) or wider,
    on this CPU and for AVX2 alone (NUMBA_CPU_NAME=haswell: the code an AVX2 laptop gets); scalar code would have
    none."""
    fma = compiled(target)["fma"]
    assert fma["ymm"] + fma["zmm"] >= 32, fma
    if target != "this CPU":
        assert fma["zmm"] == 0, fma  # AVX2 has no 512-bit registers


@on_x86
def test_an_x86_without_f16c_widens_float16_exactly(compiled):
    """On an x86 CPU without F16C (before 2012; Atom-class cores without AVX) the float16 scales are widened with
    integer operations, not by a library call the JIT lacks (that crashed): every float16 bit for bit as NumPy
    widens it, and the products equal the NumPy path; there the float kernels decode (no byte multiplies)."""
    out = compiled("an x86 without F16C (x86-64, SSE2)")
    assert out["f16 exact"] and all(out["float products"].values()), out
    assert out["instructions"] is None and not out["integer"]


@on_x86
@pytest.mark.parametrize("target", [t for t in TARGETS if "integer" in TARGETS[t][2]])
def test_the_integer_kernels_compile_to_the_cpus_instructions(target, compiled, monkeypatch):
    """Each x86 target gets its instructions: vpmaddubsw + vpmaddwd on AVX2, one vpdpbusd on 256-bit registers with
    AVX-512 VNNI (EVEX) or AVX-VNNI (VEX), plain vector code on SSE2. Where this CPU can run that code, its products
    must be the ones this process's kernels make: the integer sums are exact, so every instruction set gives the
    same numbers. Where it cannot (VNNI on a CPU without it), the code is compiled and read, but no test runs it."""
    out = compiled(target)
    c, want = out["count"], simd.choose_instructions(set(TARGETS[target][1].split(",")))
    assert out["instructions"] == want
    if want == "avx2":
        assert c["vpmaddubsw"] >= 6 and c["vpmaddwd"] >= 6 and c["vpdpbusd"] == 0, c
    elif want == "avx512vnni":
        assert c["vpdpbusd ymm"] >= 6 and c["vex vpdpbusd"] == 0 and c["vpmaddubsw"] == 0, c
    elif want == "avxvnni":
        assert c["vex vpdpbusd"] >= 6 and c["vpdpbusd ymm"] >= 6 and c["vpmaddubsw"] == 0, c
    else:
        assert c["vpdpbusd"] == c["vpmaddubsw"] == c["pmaddubsw"] == 0, c
    assert bool(out["y"]) == runs_here(TARGETS[target][1])
    if out["y"]:
        monkeypatch.setattr(fused, "INTEGER", True)
        here = {}
        exec(compile(COMPILED_CODE.split("def count(")[0], "compiled_code", "exec"), here)
        for t, y in here["integer_products"](True).items():
            np.testing.assert_allclose(out["y"][t], y, rtol=1e-6, atol=1e-6 * np.abs(y).max(), err_msg=t)


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
