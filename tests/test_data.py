"""Reading image-caption data: pairs.jsonl, LLaVA's pretrain JSON, img2dataset folders, the synthetic set, the
feature cache."""
import hashlib
import json
import os
import subprocess
import tarfile
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import Flickr8kLike, snapshot_tarball
from tinyllava.data import (FeatureCache, build_flickr8k, clean_caption, load_examples, make_synthetic,
                            read_img2dataset, read_pairs)
from tinyllava.data import main as data_main
from tinyllava.files import folder_sha256
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


def test_feature_cache_resumes_and_is_shared_by_image(tmp_path, folder):
    write_lines(folder, [json.dumps({"image": f"images/{n}.jpg", "captions": ["x"]}) for n in "ab"])
    ex = load_examples(folder)

    class FakeTower:
        calls = 0

        def features(self, px):
            FakeTower.calls += len(px)
            return np.ones((len(px), 196, 768), np.float32) * px[:, 0, :1, :1]

    cache = FeatureCache(tmp_path / "c", [e.image for e in ex], True, (196, 768))
    cache.fill(FakeTower(), chunk=1)
    assert FakeTower.calls == 2 and cache.done.all()
    again = FeatureCache(tmp_path / "c", [e.image for e in ex], True, (196, 768))
    again.fill(FakeTower())
    assert FakeTower.calls == 2  # nothing recomputed
    assert again[1].dtype == np.float32 and again[1].shape == (196, 768)
    one = FeatureCache(tmp_path / "c", [ex[1].image], True, (196, 768))  # another dataset shares the files
    assert one.done.all() and np.array_equal(one[0], again[1])
    Image.new("RGB", (40, 40)).save(ex[1].image)                        # a changed image is not the same image
    assert not FeatureCache(tmp_path / "c", [ex[1].image], True, (196, 768)).done.any()
    copy = tmp_path / "elsewhere" / "copy.png"                          # the same bytes elsewhere, another
    copy.parent.mkdir()                                                  # date: the same image
    copy.write_bytes(Path(ex[0].image).read_bytes())
    os.utime(copy, (1, 1))
    assert FeatureCache(tmp_path / "c", [copy], True, (196, 768)).done.all()
    assert not list((tmp_path / "c").rglob("*.tmp"))


def img2dataset_folder(root, n=(3, 2)):
    """n[s] images in shard s, laid out as img2dataset writes them: 0000s/KEY.jpg, KEY.txt, KEY.json."""
    for s, count in enumerate(n):
        (root / f"{s:05d}").mkdir(parents=True)
        for i in range(count):
            key = root / f"{s:05d}" / f"{s * 10000 + i:09d}"
            Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(key.with_suffix(".jpg"))
            key.with_suffix(".txt").write_text(f" a red square number {i} \n")
            key.with_suffix(".json").write_text(json.dumps({"key": key.name, "status": "success"}))
    return root


def test_img2dataset_folder_one_caption_per_image_and_a_split_by_key_hash(tmp_path):
    root = img2dataset_folder(tmp_path / "cc")
    ex = read_img2dataset(root, dev_size=2)
    assert [e.image.relative_to(root).as_posix() for e in ex] == ["00000/000000000.jpg", "00000/000000001.jpg",
                                                                   "00000/000000002.jpg", "00001/000010000.jpg",
                                                                   "00001/000010001.jpg"]
    assert ex[1].captions == ["a red square number 1"]  # stripped, otherwise the alt-text as it is
    dev = [e.image.stem for e in ex if e.split == "dev"]
    assert dev == [e.image.stem for e in read_img2dataset(root, split="dev", dev_size=2)] and len(dev) == 2
    assert {e.split for e in ex} == {"train", "dev"} and len(read_img2dataset(root, "train", dev_size=2)) == 3
    by_hash = sorted((e.image.stem for e in ex), key=lambda k: hashlib.sha256(k.encode()).digest())
    assert sorted(dev) == sorted(by_hash[:2])
    # the folder's digest is the number the shell's sha256sum pipeline gives (the README's check of a copy)
    shell = subprocess.run("find . -type f \\( -name '*.jpg' -o -name '*.txt' \\) -printf '%P\\n' | LC_ALL=C sort | "
                           "xargs -d '\\n' sha256sum | sha256sum", shell=True, cwd=root, capture_output=True, text=True)
    assert folder_sha256(root, (".jpg", ".txt")) == shell.stdout.split()[0]


def test_load_examples_finds_an_img2dataset_folder_and_joins_sources(tmp_path, folder):
    root = img2dataset_folder(tmp_path / "cc")
    assert len(load_examples(root)) == 5 and len(load_examples(root, split="dev")) == 5  # dev_size 300 > 5 images
    write_lines(folder, [json.dumps({"image": f"images/{n}.jpg", "captions": ["x"], "split": s})
                         for n, s in (("a", "train"), ("b", "dev"))])
    both = load_examples([folder, root])
    assert len(both) == 7 and [e.split for e in both[:2]] == ["train", "dev"] and both[2].image.parent.name == "00000"
    assert [e.image for e in load_examples(f"{folder},{root}")] == [e.image for e in both]
    with pytest.raises(TinyLlavaError, match=r"nowhere: no such file"):
        load_examples([root, tmp_path / "nowhere"])


def test_img2dataset_missing_or_empty_caption_stops_or_skips(tmp_path, capsys):
    root = img2dataset_folder(tmp_path / "cc")
    (root / "00000" / "000000001.txt").unlink()
    (root / "00001" / "000010000.txt").write_text("  \n")
    with pytest.raises(TinyLlavaError, match=r"000000001.jpg: no caption file 000000001.txt"):
        load_examples(root)
    (root / "00000" / "000000001.txt").write_text("back")
    with pytest.raises(TinyLlavaError, match=r"000010000.txt: empty caption"):
        load_examples(root)
    ex = load_examples(root, on_error="skip")
    assert len(ex) == 4 and "000010000.txt: empty caption; skipped" in capsys.readouterr().err


def test_a_folder_in_neither_format_is_named(tmp_path):
    (tmp_path / "x" / "00000").mkdir(parents=True)
    (tmp_path / "x" / "notes.txt").write_text("hello")
    with pytest.raises(TinyLlavaError, match=r"x: neither a folder with pairs.jsonl nor an img2dataset folder"):
        load_examples(tmp_path / "x")


# -- building Flickr8k from its pinned public sources (a small Flickr8k-shaped stand-in: tests/helpers.py) -------
@pytest.fixture
def flickr(tmp_path):
    return Flickr8kLike(tmp_path / "sources")


def built_as_expected(out, flickr):
    assert (out / "pairs.jsonl").read_text() == flickr.pairs_jsonl()
    split = {n for ns in flickr.splits.values() for n in ns}
    assert {p.name: p.read_bytes() for p in (out / "images").iterdir()} == {n: flickr.photos[n] for n in split}
    about = json.loads((out / "build.json").read_text())
    assert about["photos"] == {"train": 2, "dev": 2, "test": 2}
    return about["sha256"]


@pytest.mark.parametrize("copy", ["clone", "bare", "unpacked", "tarball"])
def test_flickr8k_from_local_copies_of_the_three_repositories(flickr, tmp_path, copy, capsys):
    local = {}
    for kind, (repo, snap) in flickr.repos.items():
        if copy == "clone":
            local[kind] = repo
        elif copy == "bare":
            local[kind] = tmp_path / f"{kind}.git"
            subprocess.run(["git", "clone", "-q", "--bare", str(repo), str(local[kind])], check=True)
        else:
            tarball = tmp_path / f"{kind}.tar.gz"
            tarball.write_bytes(snapshot_tarball(repo, snap))
            local[kind] = tarball
            if copy == "unpacked":
                local[kind] = tmp_path / f"{kind}-unpacked"
                with tarfile.open(tarball) as t:
                    t.extractall(local[kind], filter="data")
    out = tmp_path / "data" / "flickr8k"
    build_flickr8k(out, flickr.sources, local["images"], local["captions"], local["splits"])
    digest = built_as_expected(out, flickr)
    # the digest a rerun checks is the shell's sha256sum listing of images/ and pairs.jsonl
    shell = subprocess.run("find . -type f \\( -name '*.jpg' -o -name '*.jsonl' \\) -printf '%P\\n' | LC_ALL=C sort | "
                           "xargs -d '\\n' sha256sum | sha256sum", shell=True, cwd=out, capture_output=True, text=True)
    assert digest == shell.stdout.split()[0]
    # a rerun reuses the complete folder, pinned or not, without reading the sources
    before = (out / "pairs.jsonl").stat().st_mtime_ns
    for pinned in (None, digest):
        build_flickr8k(out, replace(flickr.sources, built_sha256=pinned), tmp_path / "nowhere", None, None)
        assert "complete" in capsys.readouterr().err and (out / "pairs.jsonl").stat().st_mtime_ns == before
    # a folder whose files changed is built again; one pinned to another digest is not reused either
    (out / "images" / flickr.splits["dev"][0]).write_bytes(b"changed")
    build_flickr8k(out, flickr.sources, local["images"], local["captions"], local["splits"])
    assert "changed" in capsys.readouterr().err and built_as_expected(out, flickr) == digest


def test_flickr8k_from_the_two_original_zips(flickr, tmp_path):
    out = tmp_path / "flickr8k-full"
    build_flickr8k(out, flickr.sources, zips=flickr.zips(tmp_path / "zips"))
    built_as_expected(out, flickr)  # the same pairs.jsonl as the GitHub sources make: its pin is checked
    broken = tmp_path / "zips2"
    dataset, text = flickr.zips(broken)
    with zipfile.ZipFile(text, "w") as z:
        z.writestr("Flickr8k.token.txt", "x")
    with pytest.raises(TinyLlavaError, match=r"Flickr8k_text.zip: no Flickr_8k.trainImages.txt"):
        build_flickr8k(tmp_path / "f2", flickr.sources, zips=(dataset, text))


def test_flickr8k_downloads_resume_and_a_tampered_file_is_refused(flickr, tmp_path, monkeypatch):
    monkeypatch.setattr("tinyllava.sources.time.sleep", lambda s: None)  # the pause between retries
    server = flickr.serve()
    try:
        sources = flickr.pinned(mirror=server.url)
        tar = f"/{sources.images.snapshot.repo}/tar.gz/{sources.images.snapshot.commit}"
        server.cut[tar] = 2                   # the snapshot's transfer is cut off twice, then resumes
        out, downloads = tmp_path / "data" / "flickr8k", tmp_path / "dl"
        build_flickr8k(out, sources, downloads=downloads)
        built_as_expected(out, flickr)
        resumed = [r for p, r in server.ranges if p == tar]
        assert len(resumed) == 2 and all(r != "bytes=0-" for r in resumed)
        # cut off more often than one run retries: kept for the next run, which resumes it
        captions = f"/{sources.captions.snapshot.repo}/{sources.captions.snapshot.commit}/data/ignore_captions.txt"
        server.cut[captions] = 9
        with pytest.raises(TinyLlavaError, match="run the same command again to resume"):
            build_flickr8k(tmp_path / "f2", sources, downloads=tmp_path / "dl2")
        kept = next((tmp_path / "dl2").rglob("*.part")).stat().st_size
        assert 0 < kept < len(server.files[captions])
        server.cut[captions] = 0
        build_flickr8k(tmp_path / "f2", sources, downloads=tmp_path / "dl2")
        assert server.ranges[-1] == (captions, f"bytes={kept}-")  # the next run asked for the rest only
        built_as_expected(tmp_path / "f2", flickr)
        # a file whose sha256 is not the pinned one is refused, named, and deleted; nothing is built
        server.files[captions] = server.files[captions].replace(b"dog 3", b"cat 3")
        with pytest.raises(TinyLlavaError, match=r"ignore_captions.txt: sha256 .* is not the pinned .*deleted"):
            build_flickr8k(tmp_path / "f3", sources, downloads=tmp_path / "dl3")
        assert not list((tmp_path / "dl3").rglob("ignore_captions.txt*")) and not (tmp_path / "f3").exists()
        # a snapshot whose photos differ: refused, the tarball deleted
        server.files[captions] = flickr.files["captions"]["data/ignore_captions.txt"]
        other = replace(sources, images=replace(sources.images, sha256="0" * 64))
        with pytest.raises(TinyLlavaError, match=r"listing sha256 .* not the pinned 0000.*deleted, not used"):
            build_flickr8k(tmp_path / "f4", other, downloads=tmp_path / "dl4")
        assert not list((tmp_path / "dl4").glob("*.tar.gz")) and not (tmp_path / "f4").exists()
    finally:
        server.stop()


def test_a_build_killed_midway_leaves_no_folder_that_claims_to_be_complete(flickr, tmp_path, monkeypatch):
    out = tmp_path / "flickr8k"
    local = [flickr.repos[k][0] for k in ("images", "captions", "splits")]
    build_flickr8k(out, flickr.sources, *local)
    complete = (out / "pairs.jsonl").read_bytes()
    import tinyllava.data as data

    def killed(*args, **kwargs):  # the run dies after the photos are written, before pairs.jsonl
        raise KeyboardInterrupt
    monkeypatch.setattr(data, "finish", killed)
    (out / "images" / flickr.splits["test"][0]).write_bytes(b"changed")  # so that the folder is built again
    with pytest.raises(KeyboardInterrupt):
        build_flickr8k(out, flickr.sources, *local)
    # the earlier folder is as it was, and no other folder beside it holds a pairs.jsonl
    assert (out / "pairs.jsonl").read_bytes() == complete
    assert [p.parent for p in tmp_path.rglob("pairs.jsonl")] == [out]
    monkeypatch.undo()
    (out / "build.json").unlink()
    with pytest.raises(TinyLlavaError, match="exists and was not built by this command"):
        build_flickr8k(out, flickr.sources, *local)  # without build.json it is not ours to replace


def test_a_local_copy_missing_a_file_or_the_commit_says_which(flickr, tmp_path):
    images, captions, splits = (flickr.repos[k][0] for k in ("images", "captions", "splits"))
    with pytest.raises(TinyLlavaError, match=r"no Flickr8k_text/Flickr_8k.trainImages.txt in this copy"):
        build_flickr8k(tmp_path / "a", flickr.sources, images, captions, tmp_path)  # a folder without it
    with pytest.raises(TinyLlavaError, match=r"does not hold commit .* of someone/splits-repo"):
        build_flickr8k(tmp_path / "b", flickr.sources, images, captions, captions)  # another repository


def test_the_command_line_says_one_line_and_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        data_main(["flickr8k", "--out", "/dev/null/flickr8k", "--images-repo", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("tinyllava.data: error: ") and len(err.splitlines()) == 1
