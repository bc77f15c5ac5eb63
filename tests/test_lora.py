"""LoRA adapters: the algebra, the file llama.cpp reads, and refusing what does not fit."""
import numpy as np
import pytest

from helpers import tiny_llama
from tinyllava import fused, lora, quant
from tinyllava.errors import TinyLlavaError
from tinyllava.gguf import GGUFFile, write_gguf


def trained(model, rank=3, seed=0):
    """Adapters on every linear with non-zero B (a fresh adapter changes nothing)."""
    params = lora.attach(model, rank=rank, alpha=2.0 * rank, seed=seed)
    rng = np.random.default_rng(seed)
    for k, v in params.items():
        if k.endswith("lora_b"):
            v[...] = rng.standard_normal(v.shape) * 0.05
    return params


def test_a_fresh_adapter_changes_nothing_and_a_trained_one_is_w_plus_s_b_a():
    model = tiny_llama(0, dtype=np.float32)
    x = np.random.default_rng(1).standard_normal((1, 5, model.cfg.dim)).astype(np.float32)
    before = model.forward(x)
    lora.attach(model, rank=4)
    np.testing.assert_array_equal(model.forward(x), before)
    m = lora.LoRA(np.eye(3, dtype=np.float32), np.ones((2, 3), np.float32), np.ones((3, 2), np.float32), 0.5)
    y = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_allclose(m.matmul(y), y @ m.merged().T)
    np.testing.assert_allclose(y @ m, y @ m.merged())
    r = np.random.default_rng(2)                     # merged() keeps float64 exact, and widens a file's float16
    w, a, b = r.standard_normal((3, 4)), r.standard_normal((2, 4)), r.standard_normal((3, 2))
    assert lora.LoRA(w, a, b, 0.5).merged().dtype == np.float64
    np.testing.assert_array_equal(lora.LoRA(w, a, b, 0.5).merged(), w + np.float32(0.5) * (b @ a))
    a16, b16 = a.astype(np.float16), b.astype(np.float16)
    half = lora.LoRA(w.astype(np.float32), a16, b16, 0.5).merged()
    want = w.astype(np.float32) + np.float32(0.5) * (b16.astype(np.float32) @ a16.astype(np.float32))
    assert half.dtype == np.float32 and np.array_equal(half, want)


def test_save_and_load_round_trip(tmp_path):
    model = tiny_llama(0, dtype=np.float32)
    trained(model)
    for m in lora.adapters(model).values():  # the file holds float16 (llama.cpp's converter's choice)
        m.a[...], m.b[...] = m.a.astype(np.float16), m.b.astype(np.float16)
    x = np.random.default_rng(1).standard_normal((1, 4, model.cfg.dim)).astype(np.float32)
    want = model.forward(x)
    lora.save(tmp_path / "a.gguf", model, alpha=6.0)
    g = GGUFFile(tmp_path / "a.gguf")
    assert g.get("general.type") == "adapter" and g.get("adapter.type") == "lora"
    assert g.types["adapter.lora.alpha"][0].name == "FLOAT32"                 # llama.cpp aborts on float64
    assert g.tensors["blk.0.attn_q.weight.lora_a"].shape == (3, model.cfg.dim)  # [r, n_in], ggml [n_in, r]
    assert g.tensors["blk.1.ffn_down.weight.lora_b"].shape == (model.cfg.dim, 3)  # [n_out, r]
    assert g.tensors["blk.1.ffn_down.weight.lora_b"].type.name == "F16"
    fresh = tiny_llama(0, dtype=np.float32)
    lora.load(tmp_path / "a.gguf", fresh)
    assert all(m.a.dtype == m.b.dtype == np.float16 for m in lora.adapters(fresh).values())   # as in the file
    np.testing.assert_allclose(fresh.forward(x), want, rtol=1e-6, atol=1e-6)
    with pytest.raises(TinyLlavaError, match="adapters already"):  # stacked adapters would have no merged()
        lora.load(tmp_path / "a.gguf", fresh)


def test_the_adapter_runs_beside_quantized_products():
    """On a QuantMatrix base (the fused path), x A^T B^T is added to the quantized product."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 96)).astype(np.float32)
    q = fused.QuantMatrix.quantize(w, quant.GGMLType.Q4_1)
    a, b = rng.standard_normal((4, 96)).astype(np.float32), rng.standard_normal((64, 4)).astype(np.float32)
    m = lora.LoRA(q, a, b, 0.5)
    x = rng.standard_normal((3, 96)).astype(np.float32)
    np.testing.assert_allclose(m.matmul(x), x @ (q.dequantize() + 0.5 * b @ a).T, rtol=1e-4, atol=1e-4)
    assert m.weight_grad(np.ones((3, 64), np.float32), x).keys() == {"lora_a", "lora_b"}


def test_refuses_what_does_not_fit(tmp_path):
    model = tiny_llama(0, dtype=np.float32)
    trained(model)
    lora.save(tmp_path / "a.gguf", model, alpha=6.0)
    other = tiny_llama(0, dtype=np.float32, dim=32, n_heads=4, n_kv_heads=2)
    with pytest.raises(TinyLlavaError, match="do not fit"):
        lora.load(tmp_path / "a.gguf", other)
    t = {"blk.0.attn_q.weight.lora_a": np.zeros((2, 24), np.float32),
         "blk.0.nothing.weight.lora_b": np.zeros((24, 2), np.float32)}
    write_gguf(tmp_path / "b.gguf", {"general.type": "adapter", "adapter.type": "lora", "adapter.lora.alpha": 1.0}, t)
    with pytest.raises(TinyLlavaError, match="adapts nothing"):
        lora.load(tmp_path / "b.gguf", tiny_llama(0, dtype=np.float32))
    write_gguf(tmp_path / "c.gguf", {"general.architecture": "llama"}, {})
    with pytest.raises(TinyLlavaError, match="not a LoRA adapter"):
        lora.load(tmp_path / "c.gguf", tiny_llama(0))
    with pytest.raises(TinyLlavaError, match="rank"):
        lora.attach(tiny_llama(0), rank=0)
    raw = (tmp_path / "a.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(raw[:len(raw) // 2])
    with pytest.raises(TinyLlavaError, match="truncated|past the end"):
        lora.load(tmp_path / "cut.gguf", tiny_llama(0))
