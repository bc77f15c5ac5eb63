"""Instruction data: LLaVA's JSON read and written, the loss mask on the assistant's tokens, the generators."""
import json

import numpy as np
import pytest

from tinyllava import instruct
from tinyllava.errors import TinyLlavaError
from tinyllava.sequences import conversation_ids, pack

DOG = ["A black dog is running on the beach .", "A black dog runs along the shore .",
       "A dog is running in the sand near the water .", "The black dog is running on the beach .",
       "Black dog running by the ocean ."]
KIDS = ["Two boys are playing soccer in a field .", "Two boys kick a ball on the grass .",
        "Two young boys are playing with a soccer ball .", "Kids play soccer .", "Two children chase a ball ."]


def test_the_loss_is_on_the_assistant_tokens_only(decoder):
    """Two turns: only each answer and the end token after it are scored, every one of them."""
    _, tok = decoder
    prefix, ids, targets = conversation_ids(tok, [("Is there a dog?", "Yes."), ("What color is it?", "Black.")],
                                            instruct.SYSTEM)
    assert tok.decode(prefix) == f"<|im_start|>system\n{instruct.SYSTEM}<|im_end|>\n<|im_start|>user\n"
    shown = "".join(f"[{tok.decode([i])}]" if t else tok.decode([i]) for i, t in zip(ids, targets))
    assert shown == ("\nIs there a dog?<|im_end|>\n<|im_start|>assistant\n[Yes][.][<|im_end|>]\n"
                     "<|im_start|>user\nWhat color is it?<|im_end|>\n<|im_start|>assistant\n[Black][.][<|im_end|>]")
    # the whole conversation, as the chat template writes it, is exactly prefix + <image> + ids
    full = tok.chat([{"role": "system", "content": instruct.SYSTEM},
                     {"role": "user", "content": "<image>\nIs there a dog?"}, {"role": "assistant", "content": "Yes."},
                     {"role": "user", "content": "What color is it?"}, {"role": "assistant", "content": "Black."}],
                    add_generation_prompt=False)
    assert full == tok.decode(prefix) + "<image>" + tok.decode(ids) + "\n"


def test_packed_conversations_score_only_their_targets():
    prefix = np.zeros((3, 4))
    ids, positions, mask, at, targets = pack(prefix, [([5, 6, 7], [False, True, True]), [8, 9]])
    assert ids.tolist() == [-1, -1, -1, 5, 6, 7, 8, 9] and positions.tolist() == [0, 1, 2, 3, 4, 5, 3, 4]
    assert targets.tolist() == [6, 7, 8, 9] and at.tolist() == [3, 4, 2, 6]  # 8 is predicted by the prefix's end
    assert mask[0, 0, 6, :3].all() and not mask[0, 0, 6, 3:6].any()          # segment 2 sees the prefix, not 1


def test_read_and_write_llava_json(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    c = instruct.Conversation(tmp_path / "a.jpg", [("What is this?", "A dog."), ("Its colour?", "Black.")], "x1")
    instruct.write_conversations(tmp_path / "d.json", [c], tmp_path)
    rec = json.loads((tmp_path / "d.json").read_text())[0]
    assert rec == {"id": "x1", "image": "a.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A dog."},
        {"from": "human", "value": "Its colour?"}, {"from": "gpt", "value": "Black."}]}
    (back,) = instruct.read_conversations(tmp_path / "d.json")
    assert back.turns == c.turns and back.image == tmp_path / "a.jpg"
    # JSONL, and <image> after the question (LLaVA moves it to the front)
    (tmp_path / "l.jsonl").write_text(json.dumps({"image": "a.jpg", "conversations": [
        {"from": "human", "value": "What is this?\n<image>"}, {"from": "gpt", "value": "A dog."}]}) + "\n")
    assert instruct.read_conversations(tmp_path / "l.jsonl")[0].turns == [("What is this?", "A dog.")]


@pytest.mark.parametrize("record,message", [
    ({"image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\nHi"}]}, "no assistant"),
    ({"image": "a.jpg", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]},
     "<image> must stand once"),
    ({"image": "a.jpg", "conversations": [{"from": "human", "value": "<image><image>Hi"}, {"from": "gpt", "value": "."}]},
     "found 2"),
    ({"image": "a.jpg", "conversations": [{"from": "gpt", "value": "<image>Hi"}, {"from": "human", "value": "x"}]},
     "alternate"),
    ({"conversations": []}, "malformed record"),
])
def test_bad_records_name_the_record(tmp_path, record, message):
    (tmp_path / "d.json").write_text(json.dumps([record]))
    with pytest.raises(TinyLlavaError, match=message) as e:
        instruct.read_conversations(tmp_path / "d.json")
    assert "record 0" in str(e.value)
    (tmp_path / "d.json").write_text('[{"image": "a.jpg",\n "conversations": [}]')
    with pytest.raises(TinyLlavaError, match="d.json:2: not valid JSON"):
        instruct.read_conversations(tmp_path / "d.json")


def test_subject_parser_reads_what_it_can_and_drops_the_rest():
    assert instruct.parse_subject("A black dog is running on the beach .") == {
        "count": 1, "colour": "black", "noun": "dog", "doing": "running on the beach", "place": "on the beach"}
    p = instruct.parse_subject("Two boys are playing soccer in a field .")
    assert p["count"] == 2 and p["noun"] == "boy" and p["place"] == "in a field"
    assert instruct.parse_subject("A dog with a ball in its mouth is running .")["place"] is None
    assert instruct.parse_subject("Kids play soccer .") is None              # no "is/are ...ing": dropped
    assert instruct.parse_subject("Black dog running by the ocean .") is None


def test_generators_answer_only_what_the_captions_say():
    rng = np.random.default_rng(0)
    instruct.FREQUENCY.update({"dog": 10, "ball": 5, "child": 8, "man": 8})
    qa = dict(t for c in instruct.from_captions("dog.jpg", DOG, rng) for t in c.turns)
    assert qa["What color is the dog?"] == "Black."
    assert qa["What is the dog doing?"].startswith("The dog is running")
    assert qa["What objects are in this image?"] == "I can see a dog."
    yes = [q for q, a in qa.items() if a.startswith("Yes")]
    no = [q for q, a in qa.items() if a.startswith("No")]
    assert len(yes) == len(no) == 1 and "dog" in yes[0] and "dog" not in no[0]
    qa = dict(t for c in instruct.from_captions("kids.jpg", KIDS, rng) for t in c.turns)
    assert qa["How many boys are in the image?"] == "There are two boys."
    assert not any("man" in q or "woman" in q for q, a in qa.items() if a.startswith("No"))  # people: never "no"


def test_no_is_never_said_of_what_a_caption_names_under_another_word():
    caps = ["A puppy chews a stick .", "A small animal plays .", "A pup in the yard .", "The puppy is playing .",
            "A young animal on grass ."]
    assert "dog" in instruct.salient_present(caps)
    assert "dog" not in instruct.salient_absent(caps) and "cat" not in instruct.salient_absent(caps)  # "animal"
    assert "man" not in instruct.salient_absent(["A girl runs .", "She runs ."])


def test_pope_questions_are_balanced():
    from tinyllava.data import Example
    qs = instruct.pope_questions([Example("d.jpg", DOG), Example("k.jpg", KIDS)], seed=1)
    answers = [c.turns[0][1] for c in qs]
    assert answers.count("Yes.") == answers.count("No.") > 0
    assert all(c.turns[0][0].endswith("in the image? Answer yes or no.") for c in qs)


def test_easy_vqa_folder(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "3.png").write_bytes(b"")
    (tmp_path / "questions.json").write_text(json.dumps([["what shape is in the image?", "circle", 3]]))
    (c,) = instruct.from_easy_vqa(tmp_path)
    assert c.image == tmp_path / "images" / "3.png" and c.turns == [("What shape is in the image?", "Circle.")]


def test_photos_keeps_some_photos_with_their_own_conversations(synthetic_data, tmp_path):
    """--photos N: the conversations of N train photos, each photo's the same as in the full set."""
    data, _ = synthetic_data
    instruct.main(["captions", "--data", str(data), "--out", str(tmp_path / "all")])
    instruct.main(["captions", "--data", str(data), "--out", str(tmp_path / "some"), "--photos", "3"])
    full, some = (json.loads((tmp_path / d / "flickr8k-train.json").read_text()) for d in ("all", "some"))
    assert len({c["image"] for c in some}) == 3 and some == [c for c in full if c["image"] in {s["image"] for s in some}]
    with pytest.raises(SystemExit):
        instruct.main(["captions", "--data", str(data), "--out", str(tmp_path / "none"), "--photos", "0"])


def test_detailed_names_every_object_two_captions_agree_on_and_nothing_else():
    from tinyllava.metrics import description_scores, objects_named
    caps = ["A man in a red hat rides a horse .", "A rider on a horse in a field .", "A man and his dog .",
            "A dog runs next to a horse .", "Someone outdoors ."]
    text = instruct.detailed(caps)
    assert objects_named(text) >= {"person", "horse", "dog"}     # each named by two or more captions
    assert description_scores([text], [caps])["coverage"] == 1.0 and description_scores([text], [caps])["chair_i"] == 0
    assert set(text.split(". ")) <= {instruct.sentence(c).rstrip(".") for c in caps} | {instruct.sentence(c) for c in caps}


def test_why_is_asked_only_where_a_caption_gives_a_purpose():
    rng = np.random.default_rng(0)
    caps = ["A brown dog is jumping up to catch a red ball .", "A dog jumps .", "The dog catches a ball .",
            "A dog in the air .", "A brown dog plays ."]
    qa = dict(t for c in instruct.grammar_questions("d.jpg", caps, rng) for t in c.turns)
    assert qa["Why is the dog jumping?"] == "The dog is jumping up to catch a red ball."
    not_a_purpose = ["A boy is sliding down a slide about to hit the water .", "A man is being held up to see .",
                     "A girl is walking to the store .", "A girl is trying to climb ."]
    assert not [q for c in not_a_purpose for cv in instruct.grammar_questions("x.jpg", [c, c], rng)
                for q, _ in cv.turns if q.startswith("Why")]


def test_signs_hold_their_words_and_keep_fonts_words_and_photos_apart(tmp_path, monkeypatch):
    """Each split's signs use only its own fonts and photos, and dev/test 'unseen' words are never trained on."""
    from PIL import Image

    from tinyllava import signs
    font = signs.font_file(signs.FONTS[0], tmp_path / "fonts")   # one pinned font fetched, for all splits here
    photos = {s: [tmp_path / f"{s}.png"] for s in ("train", "dev", "test")}
    for s, (p,) in photos.items():
        Image.new("RGB", (64, 48), (10, 200, 30)).save(p)
    monkeypatch.setattr(signs, "font_files", lambda split, folder: {f"{split}-font": font})
    monkeypatch.setattr(signs, "vocabulary", lambda folder: {"train": ["apple", "river"], "dev": ["cloud"],
                                                             "test": ["stone"]})
    files = instruct.sign_sets(photos, tmp_path / "out", tmp_path / "fonts", n_train=12, n_eval=4, seed=1)
    train = files["signs-train.json"]
    read = [c for c in train if c.turns[0][0] in instruct.READ]
    assert len(read) == 12 and {c.id.split("-", 2)[2] for c in read} == {"train-font"}
    assert all(Image.open(c.image).size == (224, 224) for c in read)
    said = {w.lower() for c in read for w in c.turns[0][1].split('"')[1].split()}
    assert said <= {"apple", "river"}
    for split, word in (("dev", "cloud"), ("test", "stone")):
        unseen = files[f"signs-{split}-unseen.json"]
        assert all(c.turns[0] == (instruct.READ_EVAL, c.turns[0][1]) for c in unseen)
        assert {c.turns[0][1].split('"')[1].lower() for c in unseen} == {word}
        known = files[f"signs-{split}-known.json"]
        assert {w.lower() for c in known for w in c.turns[0][1].split('"')[1].split()} <= said
        assert all(f"/{split}/" in str(c.image) for c in unseen + known)


def test_a_drawn_sign_is_legible_and_inside_the_picture(tmp_path):
    """The plate and its ink differ in brightness, and the plate lies wholly in the 224 x 224 picture."""
    from tinyllava import signs
    font = signs.font_file(next(f for f in signs.FONTS if f.split == "test"), tmp_path)
    rng = np.random.default_rng(3)
    img, plate = signs.draw_sign("Open Market", font, rng)
    a = np.asarray(img).astype(int)
    assert img.size == (224, 224) and plate in signs.PLATES
    on_plate = np.abs(a - signs.PLATES[plate]).sum(-1) < 30
    assert on_plate.sum() > 800                                         # the plate is there, in its colour
    ys, xs = np.nonzero(on_plate)
    box = a[ys.min():ys.max() + 1, xs.min():xs.max() + 1]               # the plate's extent: it holds the ink
    ink = np.abs(box @ [0.2126, 0.7152, 0.0722] - signs.luminance(signs.PLATES[plate])) > 60
    assert ink.sum() > 150

