"""The exported mmproj: llama.cpp's keys and names, and what llama.cpp's LLaVA graph computes from it (simulated
here in NumPy, following its source; tests/check_llamacpp.py runs the real thing)."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from tinyllava import weights
from tinyllava.export import export_mmproj
from tinyllava.gguf import GGUFFile, ValueType
from tinyllava.image import preprocess
from tinyllava.ops import attention, gelu_tanh, layer_norm, quick_gelu
from tinyllava.projector import Projector
from tinyllava.quant import GGMLType
from tinyllava.vit import Clip, patchify

from helpers import synthetic_photo


def llama_cpp_llava_graph(g, pixels):
    """llama.cpp's LLaVA graph (tools/mtmd/models/llava.cpp, at the version llama-cpp-python 0.3.36 vendors):
    patches then the class token *last*, position rows 0..n in that order, pre-LN, feature_layer blocks,
    rows 1.. (or all without a class token) to mm.0 -> GELU -> mm.2."""
    t = lambda name: g.tensor(name).numpy()  # noqa: E731
    d = g.require("clip.vision.embedding_length")
    x = patchify(pixels[None], 16)[0] @ t("v.patch_embd.weight").reshape(d, -1).T         # [196, d]
    has_cls = "v.class_embd" in g.tensors
    if has_cls:
        x = np.concatenate([x, t("v.class_embd")[None]])                                   # [197, d]: CLS last
    x = layer_norm(x + t("v.position_embd.weight"), t("v.pre_ln.weight"), t("v.pre_ln.bias"), 1e-5)
    n_heads = g.require("clip.vision.attention.head_count")
    for i in range(g.require("clip.vision.feature_layer")[0]):
        b = lambda n: t(f"v.blk.{i}.{n}")  # noqa: E731
        a = layer_norm(x, b("ln1.weight"), b("ln1.bias"), 1e-5)
        q, k, v = ((a @ b(f"attn_{w}.weight").T + b(f"attn_{w}.bias")).reshape(1, len(x), n_heads, -1) for w in "qkv")
        x = x + attention(q, k, v, None).reshape(len(x), d) @ b("attn_out.weight").T + b("attn_out.bias")
        m = layer_norm(x, b("ln2.weight"), b("ln2.bias"), 1e-5)
        x = x + quick_gelu(m @ b("ffn_up.weight").T + b("ffn_up.bias")) @ b("ffn_down.weight").T + b("ffn_down.bias")
    x = x[1:] if has_cls else x
    return gelu_tanh(x @ t("mm.0.weight").T + t("mm.0.bias")) @ t("mm.2.weight").T + t("mm.2.bias")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    tower = Clip.load(weights.vision_path())
    pixels = preprocess(synthetic_photo(7, (224, 224)))
    return tmp, tower, pixels, tower.features(pixels[None])[0]


@pytest.mark.parametrize("kind", ["mlp2x_gelu", "linear"])
def test_llama_cpp_graph_on_the_export_computes_tinyllavas_tokens(setup, kind):
    tmp, tower, pixels, feats = setup
    proj = Projector.init(kind, seed=1)
    g = GGUFFile(export_mmproj(tmp / f"{kind}.gguf", weights.vision_path(), proj, GGMLType.F32))
    theirs = llama_cpp_llava_graph(g, pixels)                    # [196, 576]: patches 1..195, then the class token
    ours = proj.forward(feats)                                   # [196, 576]: patches 0..195
    np.testing.assert_allclose(theirs[:195], ours[1:], atol=2e-4 * np.abs(ours).max())
    cls_token = proj.forward(tower.forward(tower.embed(pixels[None]), n_layers=11)[0, :1])
    np.testing.assert_allclose(theirs[195:], cls_token, atol=2e-4 * np.abs(ours).max())


def test_dropping_the_class_token(setup):
    """--cls drop: no class token, and each patch keeps its own position row (so the order is right). The
    encoder then runs without the class token, which moves every feature (mean cosine ~0.7 after a random
    projector on this image): why `reorder` is the default."""
    tmp, tower, pixels, feats = setup
    g = GGUFFile(export_mmproj(tmp / "drop.gguf", weights.vision_path(), Projector.init("mlp2x_gelu"),
                               GGMLType.F32, cls="drop"))
    assert "v.class_embd" not in g.tensors
    np.testing.assert_array_equal(g.tensor("v.position_embd.weight").numpy(), tower.pos_embd[1:])
    assert llama_cpp_llava_graph(g, pixels).shape == (196, 576)


def test_keys_names_and_types_llama_cpp_requires(setup):
    tmp, *_ = setup
    g = GGUFFile(export_mmproj(tmp / "q8.gguf", weights.vision_path(), Projector.init("mlp2x_gelu")))
    u32 = ["image_size", "patch_size", "embedding_length", "feed_forward_length", "projection_dim", "block_count",
           "attention.head_count"]
    for k in u32:
        assert g.types[f"clip.vision.{k}"][0] == ValueType.UINT32, k
    assert g.types["clip.vision.attention.layer_norm_epsilon"][0] == ValueType.FLOAT32
    assert g.types["clip.vision.feature_layer"] == (ValueType.ARRAY, ValueType.INT32)
    assert g.metadata["clip.vision.feature_layer"].tolist() == [11] and g.metadata["clip.vision.block_count"] == 11
    assert g.metadata["clip.projector_type"] == "mlp" and g.metadata["clip.has_vision_encoder"] is True
    assert g.metadata.get("clip.use_gelu") is False and "clip.vision.image_grid_pinpoints" not in g.metadata
    names = set(g.tensors)
    assert {"mm.0.weight", "mm.0.bias", "mm.2.weight", "mm.2.bias"} <= names
    assert not any(n.startswith(("v.post_ln", "mm.1", "mm.3", "v.blk.11.")) or n == "v.visual_proj.weight"
                   for n in names)
    assert g.tensors["v.class_embd"].type == GGMLType.F32 and g.tensors["v.patch_embd.weight"].type == GGMLType.F16
    assert g.tensors["v.blk.0.attn_q.weight"].type == GGMLType.Q8_0


def test_a_decoder_quantized_again_without_an_adapter_is_the_original_file(tmp_path):
    """tinyllava's Q4_1 and Q8_0 quantizers give back SmolLM2's own blocks from their dequantized weights: the
    re-quantized file holds the same bytes for all 272 tensors, in the same order, with the same metadata."""
    from tinyllava.export import export_decoder
    out = export_decoder(tmp_path / "same.gguf", weights.decoder_path())
    a, b = GGUFFile(weights.decoder_path()), GGUFFile(out)
    assert list(a.tensors) == list(b.tensors) and a.metadata.keys() == b.metadata.keys()
    for name, t in a.tensors.items():
        assert t.type == b.tensors[name].type and np.array_equal(t.data, b.tensors[name].data), name


def test_a_merged_decoder_runs_in_the_fused_path_as_the_adapter_did(tmp_path):
    from helpers import write_tiny_decoder
    from tinyllava import fused, lora
    from tinyllava.export import export_decoder
    from tinyllava.llama import Llama
    tiny_decoder = write_tiny_decoder(tmp_path / "t.gguf", ffn_dim=64)  # whole blocks of 32
    model = Llama.load(tiny_decoder)
    params = lora.attach(model, rank=4, alpha=8.0)
    for k, v in params.items():
        if k.endswith("lora_b"):
            v[...] = np.random.default_rng(len(k)).standard_normal(v.shape) * 0.05
    lora.save(tmp_path / "a.gguf", model, alpha=8.0)
    merged = export_decoder(tmp_path / "m.gguf", tiny_decoder, tmp_path / "a.gguf", "Q8_0")
    quantized = Llama.load(merged, load_matrix=fused.QuantMatrix.from_tensor)
    assert isinstance(quantized.layers[0].wq, fused.QuantMatrix)
    x = model.embed([[5, 17, 900, 3]])
    want, got = model.logits(model.forward(x)), quantized.logits(quantized.forward(x))
    assert np.abs(got - want).max() < 0.02 * np.abs(want).max()   # Q8_0's rounding of W + s B A


# -- Q4_K_M, as llama-quantize makes it --------------------------------------------------------------------------
def llama_quantize():  # what llama-quantize made (tests/make_reference.py quantize): {decoder: {name: digest}}
    return json.loads((Path(__file__).parent / "reference" / "q4_k_m.json").read_text())


def digest(t):  # a tensor's type and the sha256 of its bytes, as tests/make_reference.py records llama.cpp's
    return [GGMLType(t.type).name, hashlib.sha256(np.ascontiguousarray(t.data).tobytes()).hexdigest()]


def test_q4_k_m_of_a_small_decoder_is_llama_quantizes_file(tmp_path):
    """Every tensor of `export --quant Q4_K_M` (the types llama-quantize picks, and its blocks bit for bit) against
    what llama.cpp's llama_model_quantize made of the same float32 decoder: 8 layers, so that use_more_bits picks
    Q6_K for some attn_v and ffn_down and Q4_K for others, with rows of 32 (Q4_K and Q6_K fall back to Q5_0 and
    Q8_0) and of 256 (ffn_down: K-quants)."""
    from helpers import TINY_K_DECODER, write_tiny_decoder
    from tinyllava.export import export_decoder
    src = write_tiny_decoder(tmp_path / "tiny.gguf", **TINY_K_DECODER)
    g = GGUFFile(export_decoder(tmp_path / "q4_k_m.gguf", src, ftype="Q4_K_M"))
    assert {name: digest(t) for name, t in g.tensors.items()} == llama_quantize()["tiny"]
    assert {GGMLType(t.type).name for t in g.tensors.values()} == {"F32", "Q8_0", "Q5_0", "Q4_K", "Q6_K"}
    assert g.metadata["general.file_type"] == 15 and g.metadata["general.quantization_version"] == 2


def test_q4_k_m_of_smollm2_types_and_blocks():
    """SmolLM2's Q4_K_M: each of its 211 matrices gets the type llama-quantize gave it, and a few of them (one of
    each type: the K-quants are the slow ones to make) the same blocks, from SmolLM2's weights as tinyllava reads
    them (its Q4_1 and Q8_0 blocks dequantized: what llama-quantize was given, as float32)."""
    from tinyllava import quant
    from tinyllava.export import quant_types
    g = GGUFFile(weights.decoder_path())
    want = llama_quantize()["SmolLM2"]
    types = quant_types({n: t.shape for n, t in g.tensors.items() if len(t.shape) == 2}, "Q4_K_M", 30)
    assert {n: t.name for n, t in types.items()} == {n: d[0] for n, d in want.items() if d[0] != "F32"}
    for name in ["blk.0.ffn_down.weight", "blk.3.ffn_down.weight", "blk.0.attn_q.weight", "blk.0.attn_v.weight"]:
        t = types[name]
        blocks = quant.quantize(g.tensors[name].numpy(), t)
        assert [t.name, hashlib.sha256(blocks.tobytes()).hexdigest()] == want[name], name


@pytest.mark.parametrize("integer", [False, True])
def test_a_q4_k_m_decoder_runs_fused(tmp_path, integer, monkeypatch):
    """A Q4_K_M file in the fused path (Q5_0, Q8_0, Q4_K and Q6_K kept as blocks; the compiled step) against the
    same weights dequantized to float32: logits after a prompt and after decoding steps. The float kernels to
    rounding (1e-4 of the largest logit); the integer ones within the bound test_fused sets on SmolLM2 (0.1: x
    rounded to 8 bits per block of 32, through every layer; this tiny random decoder measured 0.029)."""
    from helpers import TINY_K_DECODER, write_tiny_decoder
    from tinyllava import fused
    from tinyllava.export import export_decoder
    from tinyllava.fused_llama import FusedLlama
    from tinyllava.llama import KVCache, Llama
    from tinyllava.model import load_decoder
    monkeypatch.setattr(fused, "INTEGER", integer)
    path = export_decoder(tmp_path / "q4_k_m.gguf", write_tiny_decoder(tmp_path / "t.gguf", **TINY_K_DECODER),
                          ftype="Q4_K_M")
    ref, (model, tok) = Llama.load(path), load_decoder(path, quantized=True)
    assert isinstance(model, FusedLlama) and model.compiled() is not None
    assert {m.type for layer in model.layers for m in (layer.wv, layer.w_down)} == {
        GGMLType.Q8_0, GGMLType.Q5_0, GGMLType.Q4_K, GGMLType.Q6_K}
    ids = tok.encode(tok.chat([{"role": "user", "content": "Name three rivers of Europe."}]))
    caches = [KVCache(m.cfg, 1, len(ids) + 8) for m in (ref, model)]
    tol = 0.1 if integer else 1e-4
    for t in [ids] + [[t] for t in ids[:6]]:                          # the prompt (tiles), then the compiled step
        logits = [m.logits(m.forward(m.embed([t]), c)[0, -1]) for m, c in zip((ref, model), caches)]
        assert np.abs(logits[1] - logits[0]).max() < tol * np.abs(logits[0]).max()
