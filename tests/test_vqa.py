"""VQA evaluation: the answer normalization and POPE's metrics on cases worked out by hand, the two file formats
and their bad inputs, and `python -m tinyllava.evaluate --vqa` on synthetic images with a tiny decoder."""
import json
import subprocess
import sys

import pytest

from tinyllava.errors import TinyLlavaError
from tinyllava.evaluate import Question, normalize_answer, pope_label, pope_metrics, read_vqa, score_vqa


@pytest.mark.parametrize("text, want", [
    ("Yes.", "yes"),                         # lowercase; a period before no digit goes
    ("The dog's ball", "dog 's ball"),       # "'s" split off; the article goes
    ("Two dogs, three cats?", "2 dogs 3 cats"),  # ',' and '?' deleted; number words -> digits
    ("none", "0"),
    ("An apple", "apple"),
    ("t-shirt", "t shirt"),                  # '-' touches no space anywhere: replaced by a space
    ("yes - it is", "yes it is"),            # '-' touches a space: deleted everywhere (then spaces collapse)
    ("red/white", "red white"),
    ("a/b", "b"),                            # "a b": the "a" is then an article
    ("2.5 meters.", "2.5 meters"),           # a period before a digit stays
    ("  ten\tcars\n", "10 cars"),
    ("(blue)", "blue"),                      # '(' and ')' become spaces, which then go
])
def test_normalize_answer(text, want):
    assert normalize_answer(text) == want


@pytest.mark.parametrize("text, want", [
    ("No, there is no dog.", "no"),                        # words of "No there is no dog": "No"
    ("Yes, there is a dog. It is not black.", "yes"),      # only the first sentence counts
    ("There is not a cat", "no"),
    ("no.", "no"),
    ("Nope", "yes"),                                       # only the exact words no / No / not
    ("I see nothing", "yes"),
    ("No\nthe image", "yes"),                              # POPE splits at spaces only: "No\nthe" is one word
])
def test_pope_label(text, want):
    assert pope_label(text) == want


def test_pope_metrics():
    predicted = ["yes", "yes", "yes", "no", "no", "yes"]
    truth = ["yes", "no", "no", "yes", "no", "yes"]
    # TP: 0, 5 -> 2; FP: 1, 2 -> 2; TN: 4 -> 1; FN: 3 -> 1
    m = pope_metrics(predicted, truth)
    assert m["n"] == 6
    assert m["accuracy"] == pytest.approx(3 / 6)               # (TP + TN) / n
    assert m["precision"] == pytest.approx(2 / 4)              # TP / (TP + FP)
    assert m["recall"] == pytest.approx(2 / 3)                 # TP / (TP + FN)
    assert m["f1"] == pytest.approx(4 / 7)                     # 2 (1/2)(2/3) / (1/2 + 2/3) = (2/3) / (7/6)
    assert m["yes_ratio"] == pytest.approx(4 / 6)              # (TP + FP) / n
    # never "yes": precision and F1 have no denominator and are 0
    m = pope_metrics(["no", "no"], ["yes", "no"])
    assert (m["accuracy"], m["precision"], m["recall"], m["f1"], m["yes_ratio"]) == (0.5, 0.0, 0.0, 0.0, 0.0)
    assert pope_metrics([], [])["n"] == 0


def test_score_vqa():
    qs = [Question("a.png", "Is it red?", "yes"), Question("a.png", "Is it big?", "no"),
          Question("b.png", "What colour?", "Red"), Question("b.png", "How many?", "2")]
    r = score_vqa(["Yes.", "No, it is not.", "The red one", "two"], qs)
    # normalized: "yes" "no it is not" "red one" "2" against "yes" "no" "red" "2": exact 1, 0, 0, 1
    assert r["n"] == 4 and r["accuracy"] == 0.5
    assert r["accuracy_contains"] == 1.0                       # each answer is in its reply, as whole words
    assert r["by_type"] == {"yes/no": {"accuracy": 0.5, "n": 2}, "other": {"accuracy": 0.5, "n": 2}}
    # POPE reads "Yes." as yes and "No, it is not." as no: both right, one of each predicted
    assert r["yes_no"] == {"accuracy": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0, "yes_ratio": 0.5, "n": 2}
    assert "by_kind" not in r and "reading" not in r


def test_reading_is_scored_on_the_quoted_words_whatever_their_case():
    qs = [Question("s.png", "What does the sign say?", 'The sign says "Open Late".') for _ in range(4)]
    r = score_vqa(['The sign says "OPEN late".', 'It says "open  late"', "Open late.", 'The sign says "Open".'], qs)
    assert r["reading"] == {"accuracy": 0.75, "n": 4}   # the last reads one word of two


def write_png(path):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path)
    return path


def test_read_vqa_formats(tmp_path):
    write_png(tmp_path / "pics" / "x.png")
    rec = {"id": "1", "image": "pics/x.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "Red"}]}
    (tmp_path / "list.json").write_text(json.dumps([rec, {**rec, "id": "2"}]))
    (tmp_path / "lines.jsonl").write_text(json.dumps(rec) + "\n\n" + json.dumps(rec) + "\n")
    for name in ("list.json", "lines.jsonl"):
        qs = read_vqa(tmp_path / name)
        assert [(q.image, q.question, q.answer, q.kind) for q in qs] == \
            [(tmp_path / "pics" / "x.png", "What colour is it?", "Red", "colour")] * 2
    assert len(read_vqa(tmp_path / "list.json", limit=1)) == 1
    # easy-VQA: [question, answer, image_id], the images in images/<id>.png beside the file (or in --images)
    write_png(tmp_path / "easy" / "images" / "0.png")
    (tmp_path / "easy" / "questions.json").write_text(json.dumps(
        [["what is the red shape?", "circle", 0], ["what color is the shape?", "red", 0],
         ["is there a triangle?", "no", 0]]))
    qs = read_vqa(tmp_path / "easy" / "questions.json")
    assert [q.kind for q in qs] == ["shape", "colour", "yes/no"] and qs[0].image == tmp_path / "easy/images/0.png"
    assert read_vqa(tmp_path / "easy" / "questions.json", images=tmp_path / "easy" / "images")[0].image.is_file()


def test_read_vqa_bad_input(tmp_path):
    write_png(tmp_path / "x.png")
    good = {"image": "x.png", "conversations": [{"from": "human", "value": "<image>\nQ?"},
                                                {"from": "gpt", "value": "A"}]}
    cases = {
        "broken.json": ('[\n{"image": "x.png",\n', "broken.json:3: not valid JSON"),
        "broken.jsonl": (json.dumps(good) + "\n{nope\n", "broken.jsonl:2: not valid JSON"),
        "turns.json": (json.dumps([good, {"image": "x.png", "conversations": [{"from": "gpt", "value": "A"}]}]),
                       "turns.json: record 1: the conversation has no assistant|turns.json: record 1: turns must"),
        "empty_q.jsonl": (json.dumps({**good, "conversations": [{"from": "human", "value": "<image>"},
                                                                {"from": "gpt", "value": "A"}]}),
                          "empty_q.jsonl:1: .*empty"),
        "missing.json": (json.dumps([good, {**good, "image": "gone.png"}]), "record 1: image"),
        "easy.json": (json.dumps([["q?", "yes", 0], ["q?", "yes"]]), "easy.json: record 1: malformed row"),
        "easy2.json": (json.dumps([["q?", "yes", 0], ["q?", "no", 5]]), "record 1: image .*5.png does not exist"),
        "dict.json": ('{"a": 1}', "dict.json:1: malformed record"),      # one JSON line
        "nothing.jsonl": ("\n\n", "no conversations"),
    }
    write_png(tmp_path / "images" / "0.png")  # easy-VQA's image 0, where it looks by default
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(TinyLlavaError, match=message):
            read_vqa(tmp_path / name)
    with pytest.raises(TinyLlavaError, match="no-such.json: cannot read it"):
        read_vqa(tmp_path / "no-such.json")


def run_vqa(*args):
    return subprocess.run([sys.executable, "-m", "tinyllava.evaluate", "--vqa", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


def test_cli_vqa(synthetic_data, tiny_decoder, tmp_path):
    from tinyllava.projector import Projector
    data, cache = synthetic_data
    Projector.init("mlp2x_gelu", 768, 32, seed=0).save(tmp_path / "p.gguf")  # 32: the tiny decoder's width
    common = ["--projector", tmp_path / "p.gguf", "--model", tiny_decoder, "--cache", cache, "-n", 5, "--batch", 3]
    # easy-VQA's format over the synthetic images (their features are in the cache already)
    easy = [[q, a, f"synth_{i:05d}"] for i in range(3)
            for q, a in (("what shape is it?", "circle"), ("what colour is it?", "red"), ("is it a square?", "no"))]
    (tmp_path / "questions.json").write_text(json.dumps(easy))
    r = run_vqa(tmp_path / "questions.json", "--images", data / "images", "--limit", 8, "--json", *common)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for key in ("accuracy", "n", "yes_no", "by_type", "by_kind", "seconds", "samples"):
        assert key in out, key
    assert out["n"] == 8 and set(out["yes_no"]) == {"accuracy", "precision", "recall", "f1", "yes_ratio", "n"}
    assert out["yes_no"]["n"] == 2 and out["by_kind"]["shape"]["n"] == 3 and out["by_kind"]["colour"]["n"] == 3
    assert set(out["samples"][0]) == {"image", "question", "answer", "predicted"}
    r = run_vqa(tmp_path / "questions.json", "--images", data / "images", "--skip", 7, "--json", *common)
    assert r.returncode == 0 and json.loads(r.stdout)["n"] == 2, r.stderr   # the last 2 of 9 questions
    assert json.loads(r.stdout)["by_kind"]["yes/no"]["n"] == 1
    r = run_vqa(tmp_path / "questions.json", "--images", data / "images", "--skip", 9, *common)
    assert r.returncode == 2 and "no questions left after --skip 9" in r.stderr, r.stderr
    # LLaVA's format, as JSON lines, image paths from --images; a (new, so no-op) stage-2 adapter on the decoder
    lines = [{"id": str(i), "image": f"images/synth_{i:05d}.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is in the picture?"}, {"from": "gpt", "value": "A shape."}]}
        for i in range(2)]
    (tmp_path / "vqa.jsonl").write_text("\n".join(map(json.dumps, lines)))
    from tinyllava import lora
    from tinyllava.model import load_decoder
    decoder, _ = load_decoder(tiny_decoder)
    lora.attach(decoder, rank=2)
    lora.save(tmp_path / "adapter.gguf", decoder, alpha=4.0)
    r = run_vqa(tmp_path / "vqa.jsonl", "--images", data, "--adapter", tmp_path / "adapter.gguf", *common)
    assert r.returncode == 0, r.stderr
    assert "2 questions" in r.stdout and "| all | 2 |" in r.stdout


def test_cli_vqa_bad_input(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"image": "x.png"}\n')
    (tmp_path / "gone.json").write_text(json.dumps([["what?", "red", 7]]))
    for path, message in ((tmp_path / "bad.jsonl", "bad.jsonl:1: malformed record"),
                          (tmp_path / "gone.json", "record 0: image")):
        r = run_vqa(path)
        assert r.returncode == 2 and "Traceback" not in r.stderr and r.stdout == "", r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
