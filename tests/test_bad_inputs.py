"""A corpus of bad inputs, each through a command line: one line on stderr naming the file and the problem,
exit status 2, no traceback, nothing half-written left behind. (And the odd-but-valid inputs simply work.)"""
import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tinyllava import convert, data, evaluate, export, generate, gguf, train, weights
from tinyllava.gguf import write_gguf
from tinyllava.projector import Projector


def run(main, *argv, capsys):
    """Run a CLI's main() in-process. -> (exit status, stdout, stderr)"""
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *words):
    assert code == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("fetching", "converting"))]
    assert len(lines) == 1, err
    for w in words:
        assert str(w).lower() in lines[0].lower(), (w, lines[0])


# -- GGUF files, crafted ---------------------------------------------------------------------------------
def gguf_bytes(kvs=b"", n_kv=0, tensors=b"", n_tensors=0, version=3, magic=b"GGUF", tail=b""):
    return magic + struct.pack("<IQQ", version, n_tensors, n_kv) + kvs + tensors + tail


def kv_string(key, value):
    k, v = key.encode(), value.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<I", 8) + struct.pack("<Q", len(v)) + v


def tensor_info(name, dims, ttype, offset):
    n = name.encode()
    return struct.pack("<Q", len(n)) + n + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ttype, offset)


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("g") / "small.gguf"
    return write_gguf(path, {"general.architecture": "llama", "tokens": ["a", "b", "c"]},
                      {"w": np.arange(64, dtype=np.float32).reshape(2, 32)})


def crafted(tmp_path, small_gguf):
    raw = small_gguf.read_bytes()
    return {
        "truncated-header.gguf": raw[:10],
        "truncated-metadata.gguf": raw[:60],
        "truncated-tensor-data.gguf": raw[:-40],
        "wrong-magic.gguf": b"GGML" + raw[4:],
        "version-1.gguf": raw[:4] + struct.pack("<I", 1) + raw[8:],
        "version-99.gguf": raw[:4] + struct.pack("<I", 99) + raw[8:],
        "big-endian.gguf": raw[:4] + struct.pack(">I", 3) + raw[8:],
        "unknown-tensor-type.gguf": gguf_bytes(tensors=tensor_info("w", [32], 99, 0), n_tensors=1, tail=bytes(200)),
        "tensor-past-end.gguf": gguf_bytes(tensors=tensor_info("w", [32, 1000], 0, 0), n_tensors=1, tail=bytes(64)),
        "tensor-offset-huge.gguf": gguf_bytes(tensors=tensor_info("w", [32], 0, 2**62), n_tensors=1, tail=bytes(64)),
        "absurd-tensor-count.gguf": gguf_bytes(n_tensors=2**60),
        "absurd-kv-count.gguf": gguf_bytes(n_kv=2**62),
        "absurd-string-length.gguf": gguf_bytes(struct.pack("<Q", 2**60) + b"key", n_kv=1, tail=bytes(64)),
        "absurd-array-length.gguf": gguf_bytes(struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 8, 2**61), n_kv=1,
                                                tail=bytes(64)),
        "absurd-dims.gguf": gguf_bytes(tensors=tensor_info("w", [2**40, 2**40], 0, 0), n_tensors=1, tail=bytes(64)),
        "five-dims.gguf": gguf_bytes(tensors=tensor_info("w", [1, 1, 1, 1, 32], 0, 0), n_tensors=1, tail=bytes(200)),
        "duplicate-key.gguf": gguf_bytes(kv_string("a", "x") + kv_string("a", "y"), n_kv=2),
        "bad-value-type.gguf": gguf_bytes(struct.pack("<Q", 1) + b"k" + struct.pack("<I", 77), n_kv=1),
        "bad-utf8-key.gguf": gguf_bytes(struct.pack("<Q", 2) + b"\xff\xfe" + struct.pack("<IB", 0, 1), n_kv=1),
        "bad-alignment.gguf": gguf_bytes(struct.pack("<Q", 17) + b"general.alignment" + struct.pack("<II", 4, 3), n_kv=1),
        "random-bytes.gguf": np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(),
        "empty.gguf": b"",
    }


WHAT = {"truncated": "truncated", "wrong-magic": "not a gguf", "version": "version", "big-endian": "version",
        "unknown-tensor-type": "type 99", "tensor-past-end": "past the end", "tensor-offset-huge": "past the end",
        "absurd-tensor": "more than the file", "absurd-kv": "more than the file", "absurd-string": "truncated",
        "absurd-array": "more than the file", "absurd-dims": "impossible dimensions", "five-dims": "dimensions",
        "duplicate-key": "twice", "bad-value-type": "unknown value type", "bad-utf8": "utf-8",
        "bad-alignment": "alignment", "random-bytes": "not a gguf", "empty": "not a gguf"}


def test_damaged_gguf_files(tmp_path, small_gguf, capsys):
    for name, raw in crafted(tmp_path, small_gguf).items():
        path = tmp_path / name
        path.write_bytes(raw)
        code, out, err = run(gguf.main, path, capsys=capsys)
        what = next(v for k, v in WHAT.items() if name.startswith(k))
        assert_one_line_error(code, err, name, what)


def test_damaged_gguf_as_the_decoder(tmp_path, small_gguf, capsys):
    path = tmp_path / "cut.gguf"
    path.write_bytes(weights.decoder_path().read_bytes()[:5_000_000])
    assert_one_line_error(*run(generate.main, "-m", path, "-p", "hi", capsys=capsys)[::2], "cut.gguf", "truncated")
    assert_one_line_error(*run(generate.main, "-m", small_gguf, "-p", "hi", capsys=capsys)[::2], "small.gguf",
                          "missing")


# -- files in the wrong place ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def projector_512(tmp_path_factory):
    path = tmp_path_factory.mktemp("p") / "proj512.gguf"
    Projector.init("mlp2x_gelu", 768, 512).save(path)
    return path


@pytest.fixture(scope="module")
def projector_576(tmp_path_factory):
    path = tmp_path_factory.mktemp("p") / "proj576.gguf"
    Projector.init("mlp2x_gelu", 768, 576).save(path)
    return path


def photo():
    return weights.demo_photos()["chelsea.png"]


def test_projector_of_the_wrong_width(projector_512, capsys):
    r = run(generate.main, "--image", photo(), "--projector", projector_512, capsys=capsys)
    assert_one_line_error(r[0], r[2], "512", "576")


def test_decoder_where_the_projector_belongs_and_the_reverse(projector_576, capsys):
    r = run(generate.main, "--image", photo(), "--projector", weights.decoder_path(), capsys=capsys)
    assert_one_line_error(r[0], r[2], "SmolLM2", "no projector")
    r = run(generate.main, "-m", projector_576, "-p", "hi", capsys=capsys)
    assert_one_line_error(r[0], r[2], "proj576.gguf", "'clip'", "llama")


def test_missing_files_and_directories(tmp_path, capsys):
    for args, name, what in [(["-m", tmp_path / "nope.gguf", "-p", "hi"], "nope.gguf", "cannot open"),
                             (["-m", tmp_path, "-p", "hi"], str(tmp_path), "directory"),
                             (["--image", tmp_path / "nope.jpg"], "nope.jpg", "no such file"),
                             (["--image", tmp_path], str(tmp_path), "directory"),
                             (["--image", photo(), "--projector", tmp_path / "p.gguf"], "p.gguf", "no such")]:
        r = run(generate.main, *args, capsys=capsys)
        assert_one_line_error(r[0], r[2], name, what)


# -- images --------------------------------------------------------------------------------------------------
def test_bad_images(tmp_path, capsys):
    (tmp_path / "text.jpg").write_text("this is not a picture\n")
    (tmp_path / "zero.png").write_bytes(b"")
    Image.new("RGB", (1, 1)).save(tmp_path / "one.png")
    Image.new("1", (20000, 20000)).save(tmp_path / "bomb.png")
    raw = (tmp_path / "ok.png")
    Image.new("RGB", (300, 300), (9, 9, 9)).save(raw)
    (tmp_path / "cut.png").write_bytes(raw.read_bytes()[:100])
    for name, what in [("text.jpg", "not a readable image"), ("zero.png", "not a readable image"),
                       ("one.png", "too small"), ("bomb.png", "too large"), ("cut.png", "not a readable image")]:
        r = run(generate.main, "--image", tmp_path / name, capsys=capsys)
        assert_one_line_error(r[0], r[2], name, what)
        assert r[1] == ""


def test_odd_but_valid_images_work(tmp_path, projector_576, capsys):
    base = Image.open(photo()).convert("RGB")
    base.convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray((np.asarray(base.convert("L"), np.uint16) * 257)).save(tmp_path / "sixteen.png")
    base.convert("P").save(tmp_path / "palette.png")
    base.save(tmp_path / "anim.gif", save_all=True, append_images=[base.rotate(90)])
    exif = Image.Exif()
    exif[0x0112] = 6
    base.save(tmp_path / "rotated.jpg", exif=exif)
    for name in ("cmyk.jpg", "sixteen.png", "palette.png", "anim.gif", "rotated.jpg"):
        code, out, err = run(generate.main, "--image", tmp_path / name, "--projector", projector_576, "-n", "2",
                             capsys=capsys)
        assert code == 0 and "error" not in err, (name, err)


# -- prompts --------------------------------------------------------------------------------------------------
def test_bad_prompts(capsys):
    long_prompt = "many words " * 5000  # more than the 8192-token context
    for args, what in [(["-p", ""], "empty"), (["-p", " \n\t"], "empty"), (["-p", "bad \udcff byte"], "utf-8"),
                       (["-p", long_prompt], "longer than the context"), (["-p", "hi", "-n", "0"], "-n"),
                       (["-p", "hi", "--top-p", "0"], "top-p"), (["-p", "hi", "-t", "0"], "--threads")]:
        r = run(generate.main, *args, capsys=capsys)
        assert_one_line_error(r[0], r[2], what)


def test_invalid_utf8_prompt_through_a_real_process():
    r = subprocess.run([sys.executable, "-m", "tinyllava.generate", "-p", b"caf\xe9 \xff"], capture_output=True,
                       timeout=120)
    assert r.returncode == 2 and b"Traceback" not in r.stderr and b"UTF-8" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stdout == b""


# -- training data and checkpoints ----------------------------------------------------------------------------
def test_training_data_errors(tmp_path, tiny_decoder, synthetic_data, capsys):
    src, cache = synthetic_data
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    lines = (bad / "pairs.jsonl").read_text().splitlines()
    lines[3] = lines[3][:25]                                          # a cut-off JSON line
    (bad / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    args = ["--data", bad, "--out", tmp_path / "run", "--model", tiny_decoder, "--cache", cache, "--steps", "1",
            "--batch", "2", "--dev-images", "1"]
    r = run(train.main, *args, capsys=capsys)
    assert_one_line_error(r[0], r[2], "pairs.jsonl:4", "malformed")
    assert not (tmp_path / "run" / "projector.gguf").exists()
    code, _, err = run(train.main, *args, "--on-error", "skip", capsys=capsys)
    assert code == 0 and "pairs.jsonl:4" in err                       # reported, and the run goes on
    lines[3] = json.dumps({"image": "images/missing.png", "captions": ["x"], "split": "train"})
    (bad / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    r = run(train.main, *args, "--fresh", capsys=capsys)
    assert_one_line_error(r[0], r[2], "pairs.jsonl:4", "missing.png", "does not exist")


def test_corrupt_checkpoint_through_the_cli(tmp_path, tiny_decoder, synthetic_data, capsys):
    src, cache = synthetic_data
    args = ["--data", src, "--out", tmp_path / "run", "--model", tiny_decoder, "--cache", cache, "--steps", "2",
            "--batch", "2", "--dev-images", "1"]
    assert run(train.main, *args, capsys=capsys)[0] == 0
    ckpt = tmp_path / "run" / "checkpoint.gguf"
    raw = bytearray(ckpt.read_bytes())
    raw[-7] ^= 0xFF
    ckpt.write_bytes(bytes(raw))
    r = run(train.main, *args, capsys=capsys)
    assert_one_line_error(r[0], r[2], "checkpoint.gguf", "checksum")
    ckpt.write_bytes(bytes(raw[:300]))
    r = run(train.main, *args, capsys=capsys)
    assert_one_line_error(r[0], r[2], "checkpoint.gguf", "truncated")


def test_data_and_evaluate_arguments(tmp_path, capsys):
    r = run(data.main, "cache", "--data", tmp_path / "nowhere", capsys=capsys)
    assert_one_line_error(r[0], r[2], "nowhere", "no such file")
    r = run(evaluate.main, "--data", tmp_path, "--limit", "1", capsys=capsys)
    assert_one_line_error(r[0], r[2], "--limit")
    r = run(evaluate.main, "--data", tmp_path, "--skip", "-1", capsys=capsys)
    assert_one_line_error(r[0], r[2], "--skip")
    r = run(evaluate.main, "--data", tmp_path, "--captions", "--no-retrieval", capsys=capsys)
    assert_one_line_error(r[0], r[2], "--no-retrieval")
    (tmp_path / "x.json").write_text("{not json")
    r = run(train.main, "--data", tmp_path / "x.json", "--images", tmp_path, "--out", tmp_path / "o", capsys=capsys)
    assert_one_line_error(r[0], r[2], "x.json", "not a readable llava json")


# -- conversion and export --------------------------------------------------------------------------------------
def test_bad_onnx_and_no_partial_output(tmp_path, capsys):
    real = weights.ensure(weights.CLIP_ONNX)[0].read_bytes()
    cases = {"cut.onnx": real[:1_000_000], "junk.onnx": b"\x08\x07" + bytes(100), "text.onnx": b"hello world\n"}
    for name, raw in cases.items():
        (tmp_path / name).write_bytes(raw)
        r = run(convert.main, tmp_path / name, tmp_path / "out.gguf", capsys=capsys)
        assert_one_line_error(r[0], r[2], name)
        assert not (tmp_path / "out.gguf").exists() and not list(tmp_path.glob(".out.gguf*"))


def test_export_refuses_a_mismatched_projector_and_leaves_nothing(tmp_path, capsys):
    Projector.init("mlp2x_gelu", 512, 576).save(tmp_path / "p.gguf")
    r = run(export.main, "--mmproj", tmp_path / "mm.gguf", "--projector", tmp_path / "p.gguf", capsys=capsys)
    assert_one_line_error(r[0], r[2], "512", "768")
    assert not (tmp_path / "mm.gguf").exists()


# -- supply chain -------------------------------------------------------------------------------------------------
def test_a_tampered_weight_file_is_refused(tmp_path):
    (tmp_path / weights.SMOLLM2.files[0].filename).write_bytes(weights.decoder_path().read_bytes())
    with open(tmp_path / weights.SMOLLM2.files[0].filename, "r+b") as f:
        f.seek(50_000_000)
        b = f.read(1)
        f.seek(50_000_000)
        f.write(bytes([b[0] ^ 1]))
    r = subprocess.run([sys.executable, "-m", "tinyllava.generate", "-p", "hi"], capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, TINYLLAVA_WEIGHTS=str(tmp_path)))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "sha256" in r.stderr and r.stdout == ""


def test_nothing_is_ever_unpickled():
    import pathlib
    root = pathlib.Path(__file__).resolve().parents[1]
    for py in list((root / "tinyllava").glob("*.py")) + list((root / "tests").glob("*.py")):
        if py.name == pathlib.Path(__file__).name:  # (this test spells the words it looks for)
            continue
        text = py.read_text()
        assert "import pickle" not in text and "allow_pickle=True" not in text, py
        for line in text.splitlines():
            if "np.load(" in line and "mmap_mode" not in line:
                assert "allow_pickle=False" in line, (py, line)


def test_stage2_data_and_adapter_errors(tmp_path, tiny_decoder, synthetic_data, projector_576, capsys):
    """Malformed instruction JSON (the record named), a conversation without an answer, <image> missing or twice,
    a rank of 0, an adapter for another model, a damaged adapter: one line, exit 2, nothing written."""
    from tinyllava.llama import Llama
    src, cache = synthetic_data
    image = next((src / "images").iterdir())
    proj = tmp_path / "p.gguf"
    Projector.init("mlp2x_gelu", 768, Llama.load(tiny_decoder).cfg.dim).save(proj)
    args = ["--stage", "2", "--out", tmp_path / "run", "--model", tiny_decoder, "--cache", cache, "--steps", "1",
            "--batch", "1", "--init", proj]
    turn = lambda who, what: {"from": who, "value": what}  # noqa: E731
    for records, words in [
            ('[{"image": "x.png", "conversations": [}]', ["d.json:1", "not valid json"]),
            ([{"image": str(image), "conversations": [turn("human", "<image>\nHi")]}], ["record 0", "no assistant"]),
            ([{"image": str(image), "conversations": [turn("human", "Hi"), turn("gpt", "Yo")]}], ["record 0", "<image>"]),
            ([{"image": str(image), "conversations": [turn("human", "<image><image>"), turn("gpt", "Yo")]}],
             ["record 0", "<image>"])]:
        (tmp_path / "d.json").write_text(records if isinstance(records, str) else json.dumps(records))
        r = run(train.main, *args, "--data", tmp_path / "d.json", capsys=capsys)
        assert_one_line_error(r[0], r[2], *words)
        assert not (tmp_path / "run" / "adapter.gguf").exists()
    (tmp_path / "d.json").write_text(json.dumps(
        [{"image": str(image), "conversations": [turn("human", "<image>\nHi"), turn("gpt", "Yo")]}]))
    r = run(train.main, *args, "--data", tmp_path / "d.json", "--lora-rank", "0", capsys=capsys)
    assert_one_line_error(r[0], r[2], "rank")
    assert run(train.main, *args, "--data", tmp_path / "d.json", capsys=capsys)[0] == 0
    adapter = tmp_path / "run" / "adapter.gguf"                      # made for the tiny decoder, not SmolLM2
    r = run(generate.main, "--image", image, "--projector", projector_576, "--adapter", adapter, "-p", "hi",
            capsys=capsys)
    assert_one_line_error(r[0], r[2], "adapter.gguf", "do not fit")
    (tmp_path / "cut.gguf").write_bytes(adapter.read_bytes()[:200])
    r = run(generate.main, "--image", image, "--projector", projector_576, "--adapter", tmp_path / "cut.gguf",
            "-p", "hi", capsys=capsys)
    assert_one_line_error(r[0], r[2], "cut.gguf", "truncated")
