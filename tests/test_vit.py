"""The CLIP vision tower against transformers' CLIPVisionModelWithProjection holding the same weights.

Tolerances. In float32 both sides differ only by summation order, but this ViT amplifies rounding ~1000x
between blocks 5 and 8 (it does so in float64 too), so each block's output is checked to 1e-4 of that block's
largest |activation| (measured: <= 2.5e-5). In float64 (live test) the two agree to 1e-8 (measured 5e-11),
which is the real proof that every operation is the same one.
"""
import numpy as np
import pytest

from helpers import FLICKR, VISION_TOKENS, load_npz, synthetic_photo
from tinyllava import onnx, weights
from tinyllava.convert import onnx_matrices
from tinyllava.gguf import GGUFFile
from tinyllava.image import preprocess
from tinyllava.vit import Clip

REL_TOL = 1e-4


@pytest.fixture(scope="module")
def tower():
    return Clip.load(weights.vision_path())


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def reference_pixels(levels):  # the reference's normalized input, back from its saved 8-bit levels
    from tinyllava.image import CLIP_MEAN, CLIP_STD
    return ((levels.astype(np.float32) / 255 - np.array(CLIP_MEAN, np.float32)[:, None, None])
            / np.array(CLIP_STD, np.float32)[:, None, None])


def all_hidden_states(tower, pixels):  # as transformers numbers them: the input of block 0, then every block's output
    hidden = [tower.embed(pixels)]
    tower.forward(hidden[0], hidden_states=hidden)
    return hidden


def test_every_block_matches_saved_reference(tower):
    ref = load_npz("vision.npz")
    hidden = all_hidden_states(tower, reference_pixels(ref["levels"]))
    assert len(hidden) == len(ref["hidden"]) == 13
    for i, (a, b) in enumerate(zip(hidden, ref["hidden"])):
        assert rel_err(a[:, VISION_TOKENS], b) < REL_TOL, f"hidden state {i}"
    assert rel_err(tower.image_embeds(reference_pixels(ref["levels"])), ref["image_embeds"]) < REL_TOL


def test_llava_features_are_block_11_without_the_class_token(tower):
    x = preprocess(synthetic_photo(5))[None]
    f = tower.features(x)
    assert f.shape == (1, 196, 768)
    np.testing.assert_array_equal(f, all_hidden_states(tower, x)[-2][:, 1:])


def live_images():
    if FLICKR.is_dir():
        from tinyllava.image import open_image
        return [open_image(p) for p in sorted(FLICKR.glob("*.jpg"))[100:103]]
    return [synthetic_photo(s, (300, 200)) for s in (10, 11, 12)]


def test_every_block_matches_live_reference(tower, reference):
    x = np.stack([preprocess(im) for im in live_images()])
    hidden_ref, embeds_ref = reference.vision_activations(x)
    for i, (a, b) in enumerate(zip(all_hidden_states(tower, x), hidden_ref)):
        assert rel_err(a, b) < REL_TOL, f"hidden state {i}"
    assert rel_err(tower.image_embeds(x), embeds_ref) < REL_TOL


def as_float64(tower):
    for obj in [tower, *tower.layers]:
        for k, v in vars(obj).items():
            if isinstance(v, np.ndarray):
                setattr(obj, k, v.astype(np.float64))
            elif isinstance(v, tuple):
                setattr(obj, k, tuple(a.astype(np.float64) for a in v))
    return tower


def test_float64_agrees_to_1e_8(reference):
    import torch
    tower = as_float64(Clip.load(weights.vision_path()))
    x = preprocess(live_images()[0])[None].astype(np.float64)
    model = reference.vision_tower().double()
    try:
        with torch.no_grad():
            out = model(pixel_values=torch.from_numpy(x), output_hidden_states=True)
    finally:
        model.float()
    for i, (a, b) in enumerate(zip(all_hidden_states(tower, x), out.hidden_states)):
        assert rel_err(a, b.numpy()) < 1e-8, f"hidden state {i}"


def test_conversion_keeps_the_int8_weights(tower):
    """Every converted matrix is q * fp16(scale): within 2^-11 of the ONNX's q * scale, weight by weight."""
    nodes, inits = onnx.load(weights.ensure(weights.CLIP_ONNX)[0])
    for name, (q, scale) in onnx_matrices(nodes, inits).items():
        exact = q.astype(np.float32) * scale[:, None]
        got = tower.gguf.tensor(name).numpy()
        assert np.all(np.abs(got - exact) <= np.abs(exact) * 2.0 ** -11), name


def test_gguf_follows_llama_cpp_clip_conventions():
    import gguf
    r = gguf.GGUFReader(weights.vision_path())
    names = {t.name for t in r.tensors}
    assert {"v.patch_embd.weight", "v.class_embd", "v.position_embd.weight", "v.pre_ln.weight", "v.pre_ln.bias",
            "v.post_ln.weight", "v.post_ln.bias"} <= names
    for i in range(12):
        for part in ("attn_q", "attn_k", "attn_v", "attn_out", "ln1", "ln2", "ffn_up", "ffn_down"):
            assert {f"v.blk.{i}.{part}.weight", f"v.blk.{i}.{part}.bias"} <= names
    f = {k: v.contents() for k, v in r.fields.items()}
    assert f["general.architecture"] == "clip" and f["clip.has_vision_encoder"] is True
    assert (f["clip.vision.image_size"], f["clip.vision.patch_size"], f["clip.vision.embedding_length"],
            f["clip.vision.feed_forward_length"], f["clip.vision.block_count"],
            f["clip.vision.attention.head_count"], f["clip.vision.projection_dim"]) == (224, 16, 768, 3072, 12, 12, 512)
    assert np.allclose(f["clip.vision.image_mean"], [0.48145466, 0.4578275, 0.40821073])
    g = GGUFFile(weights.vision_path())
    assert g.types["clip.vision.image_size"][0].name == "UINT32"
    assert g.types["clip.vision.attention.layer_norm_epsilon"][0].name == "FLOAT32"
