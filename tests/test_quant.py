"""Block quantization, bit for bit against the `gguf` package (a port of ggml's reference C code) and, for what it
cannot make (the K-quants), against llama.cpp's own quantizer (its blocks saved by tests/make_reference.py)."""
from pathlib import Path

import gguf
import numpy as np
import pytest

from helpers import QUANTIZE_ROWS
from tinyllava.gguf import GGUFFile
from tinyllava.quant import BLOCK_SIZE, GGMLType, dequantize, quantize

DEQUANT = [GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0,
           GGMLType.Q4_K, GGMLType.Q6_K]
QUANT = [GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0]
LLAMA_CPP = np.load(Path(__file__).parent / "reference" / "quantize.npz", allow_pickle=False)


def random_blocks(qtype, n_blocks, rng):
    """Random bytes for n blocks, with every float16 field a finite number (as a real quantizer writes)."""
    per, nbytes = BLOCK_SIZE[qtype]
    raw = rng.integers(0, 256, (n_blocks, nbytes), dtype=np.uint8)
    f16 = rng.standard_normal((n_blocks, 2)).astype(np.float16).view(np.uint8)  # [n, 4]
    if qtype in (GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q5_0):
        raw[:, 0:2] = f16[:, 0:2]
    elif qtype in (GGMLType.Q4_1, GGMLType.Q4_K):
        raw[:, 0:4] = f16
    elif qtype == GGMLType.Q6_K:
        raw[:, -2:] = f16[:, 0:2]
    elif qtype in (GGMLType.F16, GGMLType.F32, GGMLType.BF16):
        raw = rng.standard_normal(n_blocks * per).astype({GGMLType.F16: np.float16, GGMLType.F32: np.float32,
                                                            GGMLType.BF16: np.float32}[qtype]).view(np.uint8)
        if qtype == GGMLType.BF16:
            raw = raw.reshape(-1, 4)[:, 2:].copy()
    return raw.reshape(-1)


def bits(x):
    return np.asarray(x, np.float32).view(np.uint32)


@pytest.mark.parametrize("qtype", DEQUANT, ids=lambda t: t.name)
@pytest.mark.parametrize("seed", [0, 1])
def test_dequantize_random_blocks(qtype, seed):
    rng = np.random.default_rng(seed)
    per, _ = BLOCK_SIZE[qtype]
    n = 512 if per == 1 else 64
    raw = random_blocks(qtype, n, rng)
    shape = (4, n * per // 4)
    ours = dequantize(raw, qtype, shape)
    theirs = gguf.quants.dequantize(raw.reshape(4, -1), gguf.GGMLQuantizationType(int(qtype)))
    assert ours.dtype == np.float32 and ours.shape == shape
    assert np.array_equal(bits(ours), bits(theirs.reshape(shape)))


@pytest.mark.parametrize("qtype", QUANT, ids=lambda t: t.name)
@pytest.mark.parametrize("seed,dist", enumerate(["normal", "uniform", "spiky", "zeros", "ties"]))
def test_quantize_matches_ggml(qtype, seed, dist):
    rng = np.random.default_rng(seed)
    x = {"normal": lambda: rng.standard_normal((8, 256)),
         "uniform": lambda: rng.uniform(-1e-3, 5e-3, (8, 256)),
         "spiky": lambda: rng.standard_normal((8, 256)) * (rng.random((8, 256)) < 0.05) * 100,
         "zeros": lambda: np.zeros((8, 256)),
         "ties": lambda: np.round(rng.standard_normal((8, 256)) * 4) / 4}[dist]().astype(np.float32)
    ours = quantize(x, qtype)
    theirs = gguf.quants.quantize(x, gguf.GGMLQuantizationType(int(qtype)))
    for a in (ours, theirs):  # where d or m is zero, ggml's C and gguf's port can write opposite signs (a block of
        fields = a.reshape(-1, BLOCK_SIZE[qtype][1])[:, :4 if qtype == GGMLType.Q4_1 else 2]  # +0 and -0): not
        f16 = fields.copy().view("<u2")                            # compared here; tinyllava follows the C, as
        fields[...] = np.where(f16 == 0x8000, 0, f16).view(np.uint8)   # test_quantize_matches_llama_cpp checks
    assert ours.shape == theirs.shape and np.array_equal(ours, theirs)
    assert np.array_equal(bits(dequantize(ours, qtype, x.shape)),
                          bits(gguf.quants.dequantize(theirs, gguf.GGMLQuantizationType(int(qtype)))))


@pytest.mark.parametrize("qtype", QUANT + [GGMLType.Q4_K, GGMLType.Q6_K], ids=lambda t: t.name)
@pytest.mark.parametrize("kind", list(QUANTIZE_ROWS()))
def test_quantize_matches_llama_cpp(qtype, kind):
    """The blocks llama.cpp's ggml_quantize_chunk makes (its reference quantizers, as llama-quantize runs them):
    K-quants search each sub-block's scale and minimum, so every float32 operation must round as the C does."""
    x = LLAMA_CPP[kind]
    ours, theirs = quantize(x, qtype), LLAMA_CPP[f"{kind}.{qtype.name}"]
    assert ours.shape == theirs.shape and np.array_equal(ours, theirs), f"{(ours != theirs).sum()} bytes differ"
    assert np.array_equal(bits(dequantize(ours, qtype, x.shape)),
                          bits(gguf.quants.dequantize(theirs, gguf.GGMLQuantizationType(int(qtype)))))


@pytest.mark.parametrize("qtype", QUANT + [GGMLType.Q4_K, GGMLType.Q6_K], ids=lambda t: t.name)
def test_quantization_error_is_bounded_by_the_block_scale(qtype):
    x = np.random.default_rng(3).standard_normal((16, 256)).astype(np.float32)
    err = np.abs(dequantize(quantize(x, qtype), qtype, x.shape) - x).reshape(-1, 32)
    span = np.ptp(x.reshape(-1, 32), axis=1, keepdims=True)
    levels = {GGMLType.Q8_0: 254, GGMLType.Q4_0: 15, GGMLType.Q4_1: 15, GGMLType.Q5_0: 31, GGMLType.Q4_K: 15,
              GGMLType.Q6_K: 63}[qtype]
    slack = 1.5 if qtype in (GGMLType.Q4_K, GGMLType.Q6_K) else 1.01  # 6-bit sub-block scales: a coarser grid
    assert np.all(err <= span / levels * slack + 1e-6)  # within about one quantization step


def test_every_tensor_of_the_real_file(decoder_gguf):
    theirs = {t.name: t for t in gguf.GGUFReader(decoder_gguf).tensors}
    for name, t in GGUFFile(decoder_gguf).tensors.items():
        want = gguf.quants.dequantize(theirs[name].data, theirs[name].tensor_type).reshape(t.shape)
        assert np.array_equal(bits(t.numpy()), bits(want)), name
