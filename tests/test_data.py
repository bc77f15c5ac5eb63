"""Reading image-caption data: pairs.jsonl, LLaVA's pretrain JSON, the synthetic set, the feature cache."""
import json

import numpy as np
import pytest
from PIL import Image

from tinyllava.data import FeatureCache, clean_caption, load_examples, make_synthetic, read_pairs
from tinyllava.errors import TinyLlavaError


def test_clean_caption():
    assert clean_caption("a dog runs through the grass .") == "A dog runs through the grass."
    assert clean_caption("  Two dogs , one black  ") == "Two dogs, one black."
    assert clean_caption("is it the dog 's toy ?") == "Is it the dog's toy?"
    assert clean_caption("x") == "X."


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "images").mkdir()
    for n in ("a", "b"):
        Image.new("RGB", (32, 32)).save(tmp_path / "images" / f"{n}.jpg")
    return tmp_path


def write_lines(folder, lines):
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")


def test_pairs_jsonl_with_a_malformed_line_stops_or_skips_with_its_line_number(folder, capsys):
    good = json.dumps({"image": "images/a.jpg", "captions": ["a cat ."], "split": "train"})
    write_lines(folder, [good, '{"image": "images/b.jpg", "captions": [', good.replace("a.jpg", "b.jpg")])
    with pytest.raises(TinyLlavaError, match=r"pairs.jsonl:2: malformed line"):
        read_pairs(folder)
    ex = read_pairs(folder, on_error="skip")
    assert [e.image.name for e in ex] == ["a.jpg", "b.jpg"] and ex[0].captions == ["A cat."]
    assert "pairs.jsonl:2" in capsys.readouterr().err


def test_missing_image_is_reported_with_its_line(folder):
    write_lines(folder, [json.dumps({"image": "images/zzz.jpg", "captions": ["x"]})])
    with pytest.raises(TinyLlavaError, match=r"pairs.jsonl:1: image .*zzz.jpg does not exist"):
        read_pairs(folder)
    assert read_pairs(folder, on_error="skip") == []


def test_llava_pretrain_json(folder):
    recs = [{"id": "1", "image": "images/a.jpg",
             "conversations": [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "a cat"}]},
            {"id": "2", "image": "images/b.jpg", "conversations": [{"from": "human", "value": "<image>"}]}]
    (folder / "blip.json").write_text(json.dumps(recs))
    with pytest.raises(TinyLlavaError, match="record 1"):
        load_examples(folder / "blip.json", images=folder)
    ex = load_examples(folder / "blip.json", images=folder, on_error="skip")
    assert len(ex) == 1 and ex[0].captions == ["a cat"]
    with pytest.raises(TinyLlavaError, match="--images"):
        load_examples(folder / "blip.json")


def test_synthetic_dataset_says_what_it_draws(tmp_path):
    make_synthetic(tmp_path, n=10, seed=1)
    ex = load_examples(tmp_path)
    assert len(ex) == 10 and {e.split for e in ex} == {"train", "dev"}
    img = np.asarray(Image.open(ex[0].image))
    assert img.shape == (224, 224, 3)
    assert "background" in ex[0].captions[0] and ex[0].captions[0][0].isupper()


def test_feature_cache_resumes_and_refuses_other_images(tmp_path, folder):
    write_lines(folder, [json.dumps({"image": f"images/{n}.jpg", "captions": ["x"]}) for n in "ab"])
    ex = load_examples(folder)

    class FakeTower:
        calls = 0

        def features(self, px):
            FakeTower.calls += len(px)
            return np.ones((len(px), 196, 768), np.float32) * px[:, :1, :1, :1]

    cache = FeatureCache(tmp_path / "c", [e.image for e in ex], "tower-x", True, (196, 768))
    cache.fill(FakeTower(), chunk=1)
    assert FakeTower.calls == 2 and cache.done.all()
    again = FeatureCache(tmp_path / "c", [e.image for e in ex], "tower-x", True, (196, 768))
    again.fill(FakeTower())
    assert FakeTower.calls == 2  # nothing recomputed
    assert again[1].dtype == np.float32 and again[1].shape == (196, 768)
    with pytest.raises(TinyLlavaError, match="other images"):
        FeatureCache(tmp_path / "c", [ex[0].image], "tower-x", True, (196, 768))
