"""Image-caption data for stage 1, and the cache that runs the vision tower once per image.

Three sources, all read into a list of Example(image path, captions):
  - a folder with pairs.jsonl, one line per image: {"image": "images/x.jpg", "captions": [...], "split": "train"}
  - LLaVA's pretraining JSON (blip_laion_cc_sbu_558k.json): [{"id", "image", "conversations": [human, gpt]}]
    with the folder its image paths are relative to
  - a synthetic set the project makes itself (shapes and colours, captions that say so): `make_synthetic`

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
        raise TinyLlavaError(f"{where}: {what} (use --on-error skip to skip such lines)")


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


def load_examples(data, images=None, split=None, on_error="stop"):
    """--data DIR|pairs.jsonl (with --split) or --data llava.json --images DIR."""
    data = Path(data)
    if data.suffix == ".json":
        if images is None:
            raise TinyLlavaError(f"{data}: a LLaVA JSON needs --images, the folder its image paths start from")
        examples = read_llava_json(data, images, on_error)
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
    """LLaVA image features [n_patches, d] of a list of images, float16 in a memory-mapped .npy, computed once.

    Filled in chunks: a chunk's rows are flushed to disk before they are marked done, so a killed run loses at
    most one chunk and resumes where it stopped."""

    def __init__(self, folder, images, tower_id, pad, shape):  # shape: one image's features, (n_patches, d)
        self.folder, self.images = Path(folder), [str(p) for p in images]
        self.folder.mkdir(parents=True, exist_ok=True)
        index = {"images": self.images, "tower": tower_id, "pad": pad, "shape": list(shape)}
        index_path, feat_path, done_path = (self.folder / n for n in ("index.json", "features.npy", "done.npy"))
        if index_path.exists():
            try:
                same = json.loads(index_path.read_text()) == index
            except (OSError, json.JSONDecodeError):
                same = False
            if not same:
                raise TinyLlavaError(f"{self.folder}: this feature cache was made for other images or another "
                                     f"vision tower; delete it or pass another --cache")
        else:
            from numpy.lib.format import open_memmap
            open_memmap(feat_path, "w+", np.float16, (len(images), *shape)).flush()
            np.save(done_path, np.zeros(len(images), bool))
            tmp = index_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(index))
            os.replace(tmp, index_path)  # written last: an index means the files beside it are complete
        self.pad = pad
        self.features = np.load(feat_path, mmap_mode="r+")      # [N, n_patches, d] float16
        self.done = np.load(done_path, allow_pickle=False)       # [N] bool
        self._done_path = done_path

    @classmethod
    def for_examples(cls, examples, tower_path, pad=True, cache=None):
        """The cache for these images and this vision tower: a folder named by a hash of both."""
        from .gguf import GGUFFile
        from .vit import ClipConfig
        from .weights import sha256_file
        cfg = ClipConfig.from_gguf(GGUFFile(tower_path))
        tower_id = sha256_file(tower_path)
        key = hashlib.sha256(json.dumps([tower_id, pad, [str(e.image) for e in examples]]).encode()).hexdigest()
        return cls(Path(cache or CACHE_DIR / "features") / key[:16], [e.image for e in examples], tower_id, pad,
                   shape=(cfg.n_patches, cfg.dim))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):  # -> [n_patches, d] float32
        if not self.done[i]:
            raise TinyLlavaError(f"feature cache {self.folder}: image {i} not computed yet")
        return self.features[i].astype(np.float32)

    def fill(self, tower, chunk=16, on_error="stop"):
        """Compute the missing rows with the vision tower (tqdm progress). An unreadable image stops, or is
        skipped (its row stays missing) with on_error='skip'. -> indices that could not be read"""
        from tqdm import tqdm

        from .image import preprocess
        todo, failed = np.nonzero(~self.done)[0], []
        with tqdm(total=len(self), initial=len(self) - len(todo), desc="image features", unit="img",
                  file=sys.stderr, dynamic_ncols=True, disable=None) as bar:
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
                    self.features[idx] = tower.features(np.stack(pixels)).astype(np.float16)
                    self.features.flush()
                    self.done[idx] = True
                    tmp = self._done_path.with_suffix(".tmp.npy")
                    np.save(tmp, self.done)
                    os.replace(tmp, self._done_path)
                bar.update(len(todo[s:s + chunk]))
        return failed


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tinyllava.data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("synth", help="write a synthetic shapes-and-colours dataset")
    s.add_argument("out")
    s.add_argument("--n", type=int, default=200)
    s.add_argument("--seed", type=int, default=0)
    c = sub.add_parser("cache", help="compute the image features of a dataset ahead of training")
    c.add_argument("--data", required=True, help="folder with pairs.jsonl, or a LLaVA pretrain JSON")
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
