"""Visual instruction data (LLaVA's stage 2): conversations about images, read and written in LLaVA's JSON, and
made by a program from human captions, as LLaVA made its data from captions (with GPT-4, not reachable here).

LLaVA's format (llava_instruct_150k.json), one record per image conversation:

    {"id": "...", "image": "path/relative/to/the/image/folder.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is the dog doing?"},
                       {"from": "gpt", "value": "The dog is running through the grass."}, ...more turns]}

`<image>` stands once, in the first human turn; the loss is on the gpt turns only (sequences.conversation_ids).

Generators (`from_captions`, one photo's five captions -> its conversations; every answer is what the captions
say, and a question is dropped rather than answered wrongly):
  brief        one of LLaVA's brief-description instructions -> one human caption
  detailed     one of LLaVA's detailed-description instructions -> the captions that together name the most
  presence     "Is there a dog in the image?" -> yes for an object named by at least two captions; no for a
               salient object (SALIENT: things people name when they see them) that no caption names, nor
               anything related to it (RELATED: "puppy" or "animal" keep "dog" from being a no)
  objects      "What objects are in this image?" -> the salient objects two captions name
  doing, where, count, colour
               from the captions' regular grammar ("A black dog is running on the beach."): a subject from
               SUBJECTS, its colour if two captions agree and none differs, its number likewise, what it is
               doing and where (a closing "in/on/at/near the ..." that is not a body part)
easy-VQA (`from_easy_vqa`): its questions about synthetic shapes, answered by its own labels.
"""
import argparse
import json
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import TinyLlavaError, cli_errors
from .files import write_atomic
from .model import IMAGE

SYSTEM = "You are a helpful vision assistant."  # stage 2's system turn (the paper's words)

# LLaVA's instruction lists (the paper's appendix, tables 11 and 12)
BRIEF = ["Describe the image concisely.", "Provide a brief description of the given image.",
         "Offer a succinct explanation of the picture presented.", "Summarize the visual content of the image.",
         "Give a short and clear explanation of the subsequent image.",
         "Share a concise interpretation of the image provided.",
         "Present a compact description of the photo's key features.",
         "Relay a brief, clear account of the picture shown.", "Render a clear and concise summary of the photo.",
         "Write a terse but informative summary of the picture.",
         "Create a compact narrative representing the image presented."]
DETAILED = ["Describe the following image in detail", "Provide a detailed description of the given image",
            "Give an elaborate explanation of the image you see", "Share a comprehensive rundown of the presented image",
            "Offer a thorough analysis of the image", "Explain the various aspects of the image before you",
            "Clarify the contents of the displayed image with great detail",
            "Characterize the image using a well-detailed description",
            "Break down the elements of the image in a detailed manner",
            "Walk through the important details of the image", "Portray the image with a rich, descriptive narrative",
            "Narrate the contents of the image with precision",
            "Analyze the image in a comprehensive and detailed manner",
            "Illustrate the image through a descriptive explanation", "Examine the image closely and share its details",
            "Write an exhaustive depiction of the given image"]
PRESENCE = ["Is there a {} in the image? Answer yes or no.", "Is there a {} in the image?",
            "Does the image contain a {}?", "Can you see a {} in this picture?"]
POPE = "Is there a {} in the image? Answer yes or no."  # the evaluation's phrasing

# salient objects: the name asked about -> words that name it in a caption
SALIENT = {
    "dog": "dog dogs puppy puppies pup", "cat": "cat cats kitten kittens", "horse": "horse horses pony ponies",
    "bird": "bird birds duck ducks seagull seagulls goose geese pigeon pigeons", "cow": "cow cows cattle bull bulls",
    "sheep": "sheep lamb lambs", "ball": "ball balls", "bicycle": "bicycle bicycles bike bikes",
    "motorcycle": "motorcycle motorcycles motorbike motorbikes", "car": "car cars", "boat": "boat boats canoe kayak",
    "skateboard": "skateboard skateboards", "surfboard": "surfboard surfboards", "snowboard": "snowboard snowboards",
    "frisbee": "frisbee frisbees", "guitar": "guitar guitars", "umbrella": "umbrella umbrellas", "tent": "tent tents",
    "bench": "bench benches", "fountain": "fountain fountains", "kite": "kite kites",
    "child": "child children kid kids boy boys girl girls toddler toddlers baby babies",
    "man": "man men guy guys gentleman", "woman": "woman women lady ladies",
}
# a person may be named in many ways: "no" to a person is said only of photos that name no one at all
PEOPLE = ("person people man men woman women guy guys lady ladies gentleman child children kid kids boy boys girl "
          "girls toddler toddlers baby babies infant teenager teen teens adult adults crowd family couple team group "
          "player players skier skiers surfer surfers snowboarder snowboarders skateboarder skateboarders biker "
          "bikers cyclist cyclists bicyclist rider riders climber climbers swimmer swimmers runner runners hiker "
          "hikers dancer dancers worker workers athlete athletes spectators audience he she his her him mother "
          "father son daughter brother sister friends someone somebody performer musician officer police soldier "
          "cowboy jockey referee tourists fans student students dad mom wrestler wrestlers boxer")
# words that make a "no" unsafe: the object may be there under another name
RELATED = {
    "dog": "animal animals pet pets terrier retriever collie poodle labrador lab beagle shepherd greyhound husky "
           "dachshund spaniel pitbull chihuahua",
    "cat": "animal animals pet pets", "horse": "animal animals rider riders jockey", "bird": "animal animals",
    "cow": "animal animals rodeo", "sheep": "animal animals", "bicycle": "cyclist cyclists biker bikers bmx",
    "motorcycle": "biker bikers motocross dirt", "car": "vehicle vehicles truck jeep race racing",
    "boat": "raft sail sailboat", "skateboard": "skateboarder skateboarders skater skaters board",
    "surfboard": "surfer surfers board", "snowboard": "snowboarder snowboarders board", "ball": "soccer football",
}
SUBJECTS = {"dog": "dogs", "man": "men", "woman": "women", "boy": "boys", "girl": "girls", "child": "children",
            "person": "people", "horse": "horses", "bird": "birds", "cat": "cats", "player": "players",
            "skier": "skiers", "surfer": "surfers", "biker": "bikers", "baby": "babies", "puppy": "puppies"}
COLOURS = ("black", "white", "brown", "red", "blue", "green", "yellow", "orange", "pink", "purple", "gray", "grey",
           "tan")
NUMBERS = {"two": 2, "three": 3, "four": 4, "five": 5}
PLACES = ("in", "on", "at", "near", "by", "under", "beside")
# verbs of purpose ("jumping to catch"), and -ing words that name no action to ask the purpose of ("trying to")
PURPOSES = set("catch get take climb hit look push bite cross run block jump throw make put tackle play grab shoot "
               "swim see blow score ride splash drink surf find avoid chase fetch steer reach keep stay watch eat "
               "pass kick pull protect hold lift carry cool warm".split())
NOT_ACTIONS = {"being", "having", "trying", "attempting", "going", "getting", "preparing", "waiting", "beginning", "starting", "about"}
NOT_PLACES = {"mouth", "hand", "hands", "arms", "arm", "air", "background", "head", "face", "front", "back", "lap"}


# -- reading and writing LLaVA's JSON ----------------------------------------------------------------------
@dataclass
class Conversation:
    image: Path      # the image file
    turns: list      # [(question, answer), ...]; the image belongs before the first question
    id: str = ""


def read_conversations(path, images=None):
    """A LLaVA instruction JSON (a list) or JSONL (a record per line) -> [Conversation]; or easy-VQA's
    questions.json (a list of [question, answer, image id] rows, see easy_vqa_row). `images` is the folder the
    image paths start from (default: the file's folder; for easy-VQA its images/). Problems name the record or
    line."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise TinyLlavaError(f"{path}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError:
        raise TinyLlavaError(f"{path}: not UTF-8 text") from None
    if text.lstrip().startswith("["):
        try:
            records = [(f"{path}: record {i}", r) for i, r in enumerate(json.loads(text))]
        except json.JSONDecodeError as e:
            raise TinyLlavaError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    else:
        records = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append((f"{path}:{n}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise TinyLlavaError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    if not records:
        raise TinyLlavaError(f"{path}: no conversations")
    if isinstance(records[0][1], list):  # easy-VQA's rows
        folder = Path(images) if images else path.parent / "images"
        return [easy_vqa_row(rec, where, folder, f"{path.parent.name}-{n}") for n, (where, rec) in enumerate(records)]
    return [parse_record(rec, where, Path(images) if images else path.parent) for where, rec in records]


def parse_record(rec, where, folder):
    """One LLaVA record -> Conversation: alternating human/gpt turns, <image> once, in the first human turn."""
    try:
        turns, image = rec["conversations"], rec["image"]
        roles = [t["from"] for t in turns]
        values = [t["value"] for t in turns]
    except (KeyError, TypeError) as e:
        raise TinyLlavaError(f"{where}: malformed record (needs 'image' and 'conversations' with 'from' and "
                             f"'value'; {type(e).__name__}: {e})") from None
    if not isinstance(image, str) or not all(isinstance(v, str) for v in values):
        raise TinyLlavaError(f"{where}: 'image' and every turn's 'value' must be strings")
    if "gpt" not in roles:
        raise TinyLlavaError(f"{where}: the conversation has no assistant (gpt) turn to learn from")
    if roles != ["human", "gpt"] * (len(roles) // 2) or len(roles) % 2:
        raise TinyLlavaError(f"{where}: turns must alternate human, gpt (got {roles})")
    n_image = sum(v.count(IMAGE) for v in values)
    if n_image != 1 or IMAGE not in values[0]:
        raise TinyLlavaError(f"{where}: {IMAGE} must stand once, in the first human turn (found {n_image})")
    if not all(v.replace(IMAGE, "").strip() for v in values):
        raise TinyLlavaError(f"{where}: a turn is empty ({IMAGE} alone asks nothing)")
    first = values[0].replace(IMAGE, "").strip()  # LLaVA moves the image to the front of the turn
    questions = [first] + [v.strip() for v in values[2::2]]
    return Conversation(image_file(folder / image, where), list(zip(questions, [v.strip() for v in values[1::2]])),
                        str(rec.get("id", "")))


def easy_vqa_row(row, where, folder, id):
    """One of easy-VQA's rows [question, answer, image id] -> Conversation, as stage 2 is taught: the question
    with a capital letter, the answer as a sentence ("circle" -> "Circle.")."""
    if not isinstance(row, list) or len(row) != 3 or not all(isinstance(v, str) and v.strip() for v in row[:2]) \
            or not isinstance(row[2], (int, str)) or isinstance(row[2], bool):
        raise TinyLlavaError(f"{where}: malformed row, expected [question, answer, image id]")
    question, answer, image = row
    return Conversation(image_file(folder / f"{image}.png", where), [(question[:1].upper() + question[1:],
                                                                     sentence(answer))], id)


def image_file(path, where):
    if not path.is_file():
        raise TinyLlavaError(f"{where}: image {path} does not exist")
    return path


def to_record(c, folder):
    """Conversation -> LLaVA's JSON record, the image path relative to `folder`."""
    turns = []
    for k, (q, a) in enumerate(c.turns):
        turns += [{"from": "human", "value": (IMAGE + "\n" if k == 0 else "") + q}, {"from": "gpt", "value": a}]
    return {"id": c.id, "image": os.path.relpath(Path(c.image).resolve(), Path(folder).resolve()),
            "conversations": turns}


def write_conversations(path, conversations, folder):
    """Write LLaVA's JSON list, atomically (one record per line, so the file reads line by line too)."""
    return write_atomic(path, "[\n" + ",\n".join(json.dumps(to_record(c, folder)) for c in conversations) + "\n]\n")


# -- the generators ----------------------------------------------------------------------------------------
def words(caption):
    return re.findall(r"[a-z]+", caption.lower())


def sentence(text):
    text = " ".join(text.split()).strip(" .")
    return text[:1].upper() + text[1:] + "."


def names(caption_words, wordlist):  # does this caption name it?
    return bool(set(caption_words) & set(wordlist.split()))


def salient_present(captions, min_captions=2):  # -> salient objects named by at least min_captions captions
    ws = [words(c) for c in captions]
    return [o for o, wl in SALIENT.items() if sum(names(w, wl) for w in ws) >= min_captions]


def salient_absent(captions):  # -> salient objects no caption names, nor anything related to them
    ws = set(w for c in captions for w in words(c))
    related = lambda o: SALIENT[o] + " " + (PEOPLE if o in ("child", "man", "woman") else RELATED.get(o, ""))  # noqa
    return [o for o in SALIENT if not ws & set(related(o).split())]


def article(noun):
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def listing(items):  # ["a dog", "a ball", "a man"] -> "a dog, a ball and a man"
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def parse_subject(caption):
    """'A black dog is running on the beach .' -> dict(count, colour, noun, verb phrase, place) or None.
    The subject: a determiner or number, at most two adjectives, a noun of SUBJECTS (with any "in a red shirt"
    after it), then is/are and a verb in -ing."""
    w = " ".join(caption.lower().replace(" .", ".").strip(" .").split())
    nouns = "|".join(list(SUBJECTS) + list(SUBJECTS.values()))
    m = re.match(rf"^(a|an|the|one|two|three|four|five) ((?:[a-z-]+ ){{0,2}}?)({nouns}) (?:[a-z ,-]+? )?"
                 rf"(is|are) ([a-z]+ing\b.*)$", w)
    if not m:
        return None
    det, adjectives, noun, _, rest = m.groups()
    count = NUMBERS.get(det, 1)
    if (count == 1) != (noun in SUBJECTS):  # "two dog", "a dogs": not what we think
        return None
    colour = next((a for a in adjectives.split() if a in COLOURS), None)
    place = None
    pm = re.search(rf"\b({'|'.join(PLACES)}) (the|a|an) ([a-z ]+)$", rest)
    if pm and not NOT_PLACES & set(pm.group(3).split()) and " while " not in rest and " and " not in pm.group(3):
        place = f"{pm.group(1)} {pm.group(2)} {pm.group(3)}"
    return {"count": count, "colour": colour, "noun": noun if count == 1 else next(
        s for s, p in SUBJECTS.items() if p == noun), "doing": rest, "place": place}


def from_captions(image, captions, rng, n_presence=2):
    """One photo and its human captions -> [Conversation], each one question answered by what the captions
    say (see the module's docstring)."""
    out = []
    ask = lambda q, a: out.append(Conversation(image, [(q, a)]))  # noqa: E731
    ask(BRIEF[rng.integers(len(BRIEF))], sentence(captions[rng.integers(len(captions))]))
    ask(DETAILED[rng.integers(len(DETAILED))], detailed(captions))
    present, absent = salient_present(captions), salient_absent(captions)
    if present:
        ask("What objects are in this image?", sentence("I can see " + listing([article(o) for o in present])))
    freq = np.array([FREQUENCY.get(o, 1) for o in absent], float)  # frequent objects are the tempting "no"s
    n = min(n_presence, len(present), len(absent))
    yes = list(rng.choice(present, n, replace=False)) if n else []
    no = list(rng.choice(absent, n, replace=False, p=freq / freq.sum())) if n else []
    for obj, answer in [(o, True) for o in yes] + [(o, False) for o in no]:
        template = PRESENCE[rng.integers(len(PRESENCE))]
        short = template.endswith("yes or no.")
        reply = ("Yes." if short else f"Yes, there is {article(obj)} in the image.") if answer else \
            ("No." if short else f"No, there is no {obj} in the image.")
        ask(template.format(obj), reply)
    out += grammar_questions(image, captions, rng)
    return out


def grammar_questions(image, captions, rng):
    """What the subject is doing, where it is, how many there are and their colour, where the captions agree."""
    parsed = [p for p in map(parse_subject, captions) if p]
    out = []
    by_noun = {}
    for p in parsed:
        by_noun.setdefault(p["noun"], []).append(p)
    for noun, ps in by_noun.items():
        counts = Counter(p["count"] for p in ps)
        plural = SUBJECTS[noun]
        if len(counts) == 1 and len(ps) >= 2:
            count = ps[0]["count"]
            if count > 1:
                number = next(k for k, v in NUMBERS.items() if v == count)
                out.append(Conversation(image, [(f"How many {plural} are in the image?",
                                                 f"There are {number} {plural}.")]))
            colours = Counter(p["colour"] for p in ps if p["colour"])
            if count == 1 and len(colours) == 1 and sum(colours.values()) >= 2:
                out.append(Conversation(image, [(f"What color is the {noun}?", sentence(next(iter(colours))))]))
        p = ps[rng.integers(len(ps))]
        subject = f"the {noun}" if p["count"] == 1 else f"the {plural}"
        verb = "is" if p["count"] == 1 else "are"
        out.append(Conversation(image, [(f"What {verb} {subject} doing?", sentence(f"{subject} {verb} {p['doing']}"))]))
        if p["place"]:
            out.append(Conversation(image, [(f"Where {verb} {subject}?", sentence(f"{subject} {verb} {p['place']}"))]))
        for q in ps:  # why: where a caption gives the purpose ("jumping up to catch a red toy")
            why = re.match(r"^([a-z]+ing)\b.*?\b([a-z]+) to ([a-z]+)\b", q["doing"])
            if why and why.group(3) in PURPOSES and not {why.group(1), why.group(2)} & NOT_ACTIONS:
                subject, verb = (f"the {noun}", "is") if q["count"] == 1 else (f"the {plural}", "are")
                out.append(Conversation(image, [(f"Why {verb} {subject} {why.group(1)}?",
                                                 sentence(f"{subject} {verb} {q['doing']}"))]))
                break
    return out


def detailed(captions, most=4):
    """A longer description made of the captions themselves, so that it says nothing they do not: first those that
    name the objects two captions agree on (metrics.objects_named), each adding the most of them, then those that
    add at least two words the chosen ones did not say; at most `most` sentences."""
    from .metrics import objects_named
    counts = Counter(o for c in captions for o in objects_named(c))
    todo = {o for o, k in counts.items() if k >= 2}
    chosen, seen = [], set()
    stop = {"a", "an", "the", "is", "are", "in", "on", "of", "and", "with", "at", "to", "his", "her", "their"}
    while len(chosen) < len(captions):
        c = max((c for c in captions if c not in chosen), key=lambda c: (len(objects_named(c) & todo), len(words(c))))
        if chosen and not objects_named(c) & todo:
            break
        chosen.append(c)
        todo -= objects_named(c)
        seen |= set(words(c))
    for c in sorted(captions, key=lambda c: -len(words(c))):
        if len(chosen) < most and c not in chosen and len(set(words(c)) - seen - stop) >= 2:
            chosen.append(c)
            seen |= set(words(c))
    return " ".join(sentence(c) for c in chosen[:most])


FREQUENCY = {}  # object -> how many training photos name it (set by build_from_pairs, for negative sampling)


def build_from_pairs(examples, seed=0):
    """Image-caption examples (data.Example) -> [Conversation]: every generator on every photo."""
    FREQUENCY.clear()
    FREQUENCY.update(Counter(o for e in examples for o in salient_present(e.captions)))
    rng = np.random.default_rng(seed)
    out = []
    for e in examples:
        for k, c in enumerate(from_captions(e.image, e.captions, rng)):
            c.id = f"{Path(e.image).stem}-{k}"
            out.append(c)
    return out


def pope_questions(examples, seed=0, n=3):
    """POPE-style yes/no questions about these photos, the evaluation's phrasing: n objects named by two
    captions ("yes"), n salient objects no caption names ("no"), sampled by frequency as POPE's "popular"."""
    freq = Counter(o for e in examples for o in salient_present(e.captions))
    rng = np.random.default_rng(seed)
    out = []
    for e in examples:
        present, absent = salient_present(e.captions), salient_absent(e.captions)
        k = min(n, len(present), len(absent))
        if not k:
            continue
        p = np.array([freq.get(o, 1) for o in absent], float)
        for obj, answer in [(o, "Yes") for o in rng.choice(present, k, replace=False)] + \
                [(o, "No") for o in rng.choice(absent, k, replace=False, p=p / p.sum())]:
            out.append(Conversation(e.image, [(POPE.format(obj), answer + ".")], f"{Path(e.image).stem}-{obj}"))
    return out


# -- reading text: signs ----------------------------------------------------------------------------------
READ = ["What does the sign say?", "What is written on the sign?", "Read the text in the image.",
        "What does the text in the image say?", "What is written here?", "Can you read the sign?",
        "Read the sign for me.", "What do the letters on the sign spell?"]
READ_ANSWERS = ['The sign says "{}".', 'It says "{}".', 'The text reads "{}".']
READ_EVAL = READ[0]  # the seed's own words, asked of every dev and test sign


def sign_conversations(folder, split, n, photos, fonts, words, rng, name, evaluation=False):
    """n signs of `split`, drawn with `fonts` ({package: path}) and 1-3 `words` each, half on `photos` (image
    paths) and half on plain backgrounds, saved as folder/NAME-00000.jpg. -> [Conversation]: asked to read it
    (in READ's words, or READ_EVAL's for evaluation), and for training sometimes also the plate's colour."""
    from PIL import Image

    from .signs import draw_sign, styled
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fonts = sorted(fonts.items())
    out = []
    for i in range(n):
        k = min(int(rng.choice(3, p=[0.55, 0.3, 0.15])) + 1, len(words))
        text = styled(list(rng.choice(words, k, replace=False)), rng)
        package, font = fonts[rng.integers(len(fonts))]
        background = None
        if i % 2:
            with Image.open(photos[rng.integers(len(photos))]) as im:
                background = im.convert("RGB")
        img, plate = draw_sign(text, font, rng, background)
        path = folder / f"{name}-{i:05d}.jpg"
        img.save(path, quality=95)
        question = READ_EVAL if evaluation else READ[rng.integers(len(READ))]
        answer = READ_ANSWERS[0 if evaluation else rng.integers(len(READ_ANSWERS))].format(text)
        turns = [(question, answer)]
        out.append(Conversation(path, turns, f"{name}-{i:05d}-{package}"))
        if not evaluation and rng.random() < 0.3:
            out.append(Conversation(path, [("What color is the sign?", f"The sign is {plate}.")],
                                    f"{name}-{i:05d}-colour"))
    return out


def sign_sets(photos_by_split, out, fonts_folder, n_train=6000, n_eval=300, seed=0):
    """The reading data: signs-train.json (train fonts, train words, train photos), and for dev and test (their
    own fonts and photos) signs-SPLIT-known.json (words the training signs hold) and signs-SPLIT-unseen.json
    (words of the split, never trained on). -> {file name: [Conversation]}"""
    from .signs import font_files, vocabulary
    vocab = vocabulary(fonts_folder)
    rng = np.random.default_rng(seed)
    images = Path(out) / "signs"
    files = {"signs-train.json": sign_conversations(images / "train", "train", n_train, photos_by_split["train"],
                                                    font_files("train", fonts_folder), vocab["train"], rng, "train")}
    trained = sorted({w.lower() for c in files["signs-train.json"] if '"' in c.turns[0][1]
                      for w in c.turns[0][1].split('"')[1].split()})
    for split in ("dev", "test"):
        fonts = font_files(split, fonts_folder)
        for kind, words in (("known", trained), ("unseen", vocab[split])):
            files[f"signs-{split}-{kind}.json"] = sign_conversations(
                images / split, split, n_eval, photos_by_split[split], fonts, words, rng, f"{split}-{kind}", True)
    return files


# -- easy-VQA ----------------------------------------------------------------------------------------------
def from_easy_vqa(folder):
    """easy-VQA's split folder (questions.json: [question, answer, image id], images/<id>.png) -> [Conversation],
    one question each."""
    return read_conversations(Path(folder) / "questions.json")


# -- the command line --------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tinyllava.instruct", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="source", required=True)
    f = sub.add_parser("captions", help="instruction data from image-caption pairs (a pairs.jsonl folder)")
    f.add_argument("--data", required=True, help="folder with pairs.jsonl (e.g. data/flickr8k)")
    f.add_argument("--out", required=True, help="folder for NAME-train.json, NAME-dev.json, NAME-pope-dev.json (and "
                   "NAME-pope-test.json where the data has a test split)")
    f.add_argument("--name", default="flickr8k")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--photos", type=int, help="keep the conversations of only this many train photos, spread "
                   "evenly (each photo's conversations are those of the full set): to mix with easy-VQA at "
                   "another ratio")
    r = sub.add_parser("signs", help="reading text: signs drawn in photos and on plain backgrounds (fonts and "
                       "words fetched from PyPI, pinned)")
    r.add_argument("--data", required=True, help="a pairs.jsonl folder with train, dev and test photos "
                   "(data/flickr8k): each split's signs go on its own photos")
    r.add_argument("--out", required=True, help="folder for signs-*.json and the signs/ images")
    r.add_argument("--train", type=int, default=6000, help="training signs")
    r.add_argument("--eval", type=int, default=300, help="signs of each dev and test file")
    r.add_argument("--fonts", help="where the fonts and word lists are unpacked (default: data/fonts)")
    r.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("easy-vqa", help="easy-VQA's train questions (fetched from PyPI, pinned)")
    e.add_argument("--out", required=True, help="folder for easy-vqa-train.json and easy-vqa-dev.json")
    e.add_argument("--dev-images", type=int, default=200,
                   help="train images held out for the dev loss (the test split is never written here)")
    e.add_argument("--images", type=int, help="keep the questions of only this many train images, spread evenly: "
                   "to mix with other data at another ratio")
    args = ap.parse_args(argv)
    with cli_errors("tinyllava.instruct"):
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        if args.source == "captions":
            from .data import load_examples
            examples = load_examples(args.data)
            train = [e for e in examples if e.split == "train"]
            dev = [e for e in examples if e.split == "dev"]
            if not train or not dev:
                raise TinyLlavaError(f"{args.data}: needs both train and dev photos")
            convs = build_from_pairs(train, args.seed)
            if args.photos is not None:
                if not 1 <= args.photos <= len(train):
                    raise TinyLlavaError(f"--photos must be between 1 and {len(train)}, not {args.photos}")
                keep = {train[i].image for i in np.linspace(0, len(train) - 1, args.photos).round().astype(int)}
                convs = [c for c in convs if c.image in keep]
            test = [e for e in examples if e.split == "test"]  # for reporting only: nothing trains on it
            files = {f"{args.name}-train.json": convs,
                     f"{args.name}-dev.json": build_from_pairs(dev, args.seed),
                     f"{args.name}-pope-dev.json": pope_questions(dev, args.seed)}
            if test:
                files[f"{args.name}-pope-test.json"] = pope_questions(test, args.seed)
        elif args.source == "signs":
            from .data import DATA_DIR, load_examples
            examples = load_examples(args.data)
            photos = {s: [e.image for e in examples if e.split == s] for s in ("train", "dev", "test")}
            if missing := [s for s, p in photos.items() if not p]:
                raise TinyLlavaError(f"{args.data}: no {' or '.join(missing)} photos (build it with "
                                     f"`python -m tinyllava.data flickr8k`)")
            files = sign_sets(photos, out, args.fonts or DATA_DIR / "fonts", args.train, args.eval, args.seed)
        else:
            from .data import easy_vqa_path
            convs = from_easy_vqa(easy_vqa_path() / "train")
            held = {f"{i}.png" for i in range(args.dev_images)}  # easy-VQA's train image ids run from 0
            train = [c for c in convs if c.image.name not in held]
            if args.images is not None:
                names = sorted({c.image.name for c in train}, key=lambda n: int(Path(n).stem))
                if not 1 <= args.images <= len(names):
                    raise TinyLlavaError(f"--images must be between 1 and {len(names)}, not {args.images}")
                keep = {names[i] for i in np.linspace(0, len(names) - 1, args.images).round().astype(int)}
                train = [c for c in train if c.image.name in keep]
            files = {f"easy-vqa{'' if args.images is None else f'-{args.images}'}-train.json": train,
                     "easy-vqa-dev.json": [c for c in convs if c.image.name in held]}
        for name, convs in files.items():
            write_conversations(out / name, convs, out)
            print(f"{out / name}: {len(convs)} conversations about {len({c.image for c in convs})} images",
                  file=sys.stderr)


if __name__ == "__main__":
    main()
