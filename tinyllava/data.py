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
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import TinyLlavaError, cli_errors

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
CC3M_LISTING_SHA256 = "106192d020291da393ea4c817b53e081513dd14f5cd91eef50336613fc223513"


def is_img2dataset(folder):
    """Numbered shard folders (00000/, 00001/, ...) holding KEY.jpg images (and KEY.txt captions)."""
    return Path(folder).is_dir() and any(p.suffix in IMG2DATASET_IMAGES for p in Path(folder).glob("[0-9]*/*"))


def read_img2dataset(folder, split=None, on_error="stop", dev_size=300):
    r"""An img2dataset folder -> [Example], one per image, its caption the alt-text in KEY.txt beside it.

    The alt-text is kept as it is but for surrounding whitespace; the KEY.json metadata is not read. An image
    without its .txt, or with an empty one, stops, or is skipped and reported. The split depends on the keys
    alone: the dev_size images with the smallest sha256 of their key (the string, e.g. b"000000000") are "dev",
    the rest "train", on any machine and in any file order.

    The Conceptual Captions subset used here (18,643 CC3M images, 256x256, in 5 shards) is the folder data/ of a
    public repository at one commit (deleted in the next). Those images are 99% of the repository's history, so
    a plain clone (~400 MB) is the way; `--filter=blob:none` would save nothing.

        git clone https://github.com/heon01px2020/csci1470-prismer-final-project.git prismer
        mkdir -p data/cc3m
        git -C prismer archive e059e1606aef04521e399c2b421438a46658a018 data |
            tar -x -C data/cc3m --strip-components=1

    Check it: listing_sha256("data/cc3m") == CC3M_LISTING_SHA256, or in a shell (the same number):
        (cd data/cc3m && find . -type f \( -name '*.jpg' -o -name '*.txt' \) -printf '%P\n' | LC_ALL=C sort |
            xargs -d '\n' sha256sum) | sha256sum
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


def listing_sha256(folder):
    """sha256 of `sha256sum`'s lines ("HASH  00000/000000000.jpg") for every .jpg and .txt, sorted by path."""
    folder = Path(folder)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.suffix in (".jpg", ".txt"))
    lines = "".join(f"{hashlib.sha256((folder / f).read_bytes()).hexdigest()}  {f}\n" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()


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
    tmp = out / "pairs.jsonl.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, out / "pairs.jsonl")
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
        from .gguf import GGUFFile
        from .vit import ClipConfig
        from .weights import sha256_file
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
        tmp = self.files[i].with_name(f".{self.files[i].name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(features, np.float16))
        os.replace(tmp, self.files[i])
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
    s = sub.add_parser("synth", help="write a synthetic shapes-and-colours dataset")
    s.add_argument("out")
    s.add_argument("--n", type=int, default=200)
    s.add_argument("--seed", type=int, default=0)
    c = sub.add_parser("cache", help="compute the image features of a dataset ahead of training")
    c.add_argument("--data", required=True,
                   help="folder with pairs.jsonl, an img2dataset folder, or a LLaVA pretrain JSON; A,B for several")
    c.add_argument("--images", help="image folder of a LLaVA JSON")
    c.add_argument("--cache", help=f"cache folder (default {CACHE_DIR / 'features'})")
    c.add_argument("--crop", action="store_true", help="centre-crop instead of padding to a square")
    c.add_argument("--on-error", choices=["stop", "skip"], default="stop")
    args = ap.parse_args(argv)
    with cli_errors("tinyllava.data"):
        if args.cmd == "synth":
            print(make_synthetic(args.out, args.n, args.seed))
        else:
            from .vit import VisionTower
            from .weights import vision_path
            examples = load_examples(args.data, args.images, on_error=args.on_error)
            cache = FeatureCache.for_examples(examples, vision_path(), pad=not args.crop, cache=args.cache)
            cache.fill(VisionTower.load(vision_path()), on_error=args.on_error)
            print(cache.folder)


if __name__ == "__main__":
    main()
