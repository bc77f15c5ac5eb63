"""Visual instruction data (LLaVA's stage 2): conversations about images, read and written in LLaVA's JSON, and
made by a program from human captions, as LLaVA made its data from captions (with GPT-4, not reachable here).

LLaVA's format (llava_instruct_150k.json), one record per image conversation:

    {"id": "...", "image": "path/relative/to/the/image/folder.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is the dog doing?"},
                       {"from": "gpt", "value": "The dog is running through the grass."}, ...more turns]}

`<image>` stands once, in the first human turn; the loss is on the gpt turns only (`conversation_segment`).

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

IMAGE = "<image>"
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
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("[\n" + ",\n".join(json.dumps(to_record(c, folder)) for c in conversations) + "\n]\n")
    tmp.replace(path)
    return path


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
    return out


def detailed(captions, most=3):
    """A longer description: the captions that, taken longest first, each add words the others did not say."""
    chosen, seen = [], set()
    for c in sorted(captions, key=lambda c: -len(words(c))):
        new = set(words(c)) - seen - {"a", "an", "the", "is", "are", "in", "on", "of", "and", "with"}
        if len(new) >= 2 or not chosen:
            chosen.append(sentence(c))
            seen |= set(words(c))
        if len(chosen) == most:
            break
    return " ".join(chosen)


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
    f.add_argument("--data", required=True, help="folder with pairs.jsonl (e.g. ../shared/data/flickr8k)")
    f.add_argument("--out", required=True, help="folder for NAME-train.json, NAME-dev.json, NAME-pope-dev.json")
    f.add_argument("--name", default="flickr8k")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--photos", type=int, help="keep the conversations of only this many train photos, spread "
                   "evenly (each photo's conversations are those of the full set): to mix with easy-VQA at "
                   "another ratio")
    e = sub.add_parser("easy-vqa", help="easy-VQA's train questions (fetched from PyPI, pinned)")
    e.add_argument("--out", required=True, help="folder for easy-vqa-train.json and easy-vqa-dev.json")
    e.add_argument("--dev-images", type=int, default=200,
                   help="train images held out for the dev loss (the test split is never written here)")
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
            files = {f"{args.name}-train.json": convs,
                     f"{args.name}-dev.json": build_from_pairs(dev, args.seed),
                     f"{args.name}-pope-dev.json": pope_questions(dev, args.seed)}
        else:
            from .data import easy_vqa_path
            convs = from_easy_vqa(easy_vqa_path() / "train")
            held = {f"{i}.png" for i in range(args.dev_images)}  # easy-VQA's train image ids run from 0
            files = {"easy-vqa-train.json": [c for c in convs if c.image.name not in held],
                     "easy-vqa-dev.json": [c for c in convs if c.image.name in held]}
        for name, convs in files.items():
            write_conversations(out / name, convs, out)
            print(f"{out / name}: {len(convs)} conversations about {len({c.image for c in convs})} images",
                  file=sys.stderr)


if __name__ == "__main__":
    main()
