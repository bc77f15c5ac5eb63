"""What several test files share, in one place: the saved references and the inputs they were made from (the
script tests/make_reference.py makes them from these), small models and data to train in seconds, and a
Flickr8k-shaped set of public sources with an HTTP server standing in for GitHub."""
import gzip
import hashlib
import http.server
import io
import json
import subprocess
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from tinyllava import weights
from tinyllava.data import DATA_DIR, Flickr8kSources, Pin
from tinyllava.llama import Layer, Llama, LlamaConfig
from tinyllava.projector import Projector
from tinyllava.sources import Snapshot

REF = Path(__file__).resolve().parent / "reference"
FLICKR = DATA_DIR / "flickr8k" / "images"  # Flickr8k's photos, where `python -m tinyllava.data flickr8k` built them


# -- the saved references, and what they were computed on -------------------------------------------------

def load_npz(name):
    with np.load(REF / name, allow_pickle=False) as f:
        return dict(f)


def load_json(name):
    return json.loads((REF / name).read_text())


# -- the tokenizer's: 200+ strings of every kind the pre-tokenizer and BPE must get right -----------------------
HANDWRITTEN = [
    "", " ", "  ", "\n", "\n\n\n", "\t", " \t \n ", "Hello world", "Hello, world!", "hello   world",
    "I have 123 apples and 4567 oranges.", "3.14159", "  3.14", "1,000,000", "x=10**9", "2024-11-27T23:59:59Z",
    "Call 555-0100 or +1 (800) 555 0199", "0.5e-10", "v1.2.3-rc4", "100%", "$19.99", "#42", "1st 2nd 3rd 4th",
    "it's", "It's", "IT'S", "don't won't can't", "we'll they've I'm you're he'd", "'s 't 're", "''''", "rock 'n' roll",
    "naïve café résumé", "Ünïcödé façade", "Straße", "Œuvre — “quotes” ‘single’ …", "¿Qué? ¡Sí!",
    "日本語のテキスト", "中文文本，标点。", "한국어 텍스트", "Русский текст", "Ελληνικά", "עברית", "العربية ٣٤٥",
    "हिन्दी", "ไทย", "emoji 😀😃😄", "👍🏽👩‍👩‍👧‍👦", "🇫🇷🇯🇵", "❤️‍🔥", "a😀b", "★☆✓✗→←", "∑∫√∞≈≠", "x² + y³ = z⁴",
    "½ ¼ ¾", "Ⅻ Ⅳ", "①②③", "٣٤٥", "१२३", "\u00a0non-breaking\u00a0space", "zero\u200bwidth", "\u3000ideographic",
    "line\u2028sep", "tab\tseparated\tvalues", "CRLF\r\nline", "trailing spaces   ", "   leading spaces",
    "mixed \t\n whitespace \n\t ", "a\n\n b", "a \n b", "end\n", "\n\nstart",
    "def f(x):\n    return x ** 2\n", "for (int i = 0; i < n; i++) {\n\tsum += a[i];\n}",
    "print('hello')  # comment", "<div class=\"x\">&amp;</div>", "SELECT * FROM t WHERE id=1;",
    "{\"key\": [1, 2, 3], \"nested\": {\"a\": null}}", "https://example.com/path?q=1&r=2#frag",
    "user@example.com", "C:\\Users\\name\\file.txt", "/usr/local/bin/python3", "__init__", "camelCaseWord",
    "snake_case_word", "SCREAMING_CASE", "x->y", "a::b", "i++", "!=", "===", "...", "--", "—", "~~~", "```python",
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start|>user\nhi<|im_end|>\n",
    "text<|im_end|>more", "<|im_start|><|im_end|>", "a <|endoftext|> b", "<|im_start", "im_end|>",
    "<repo_name>x<file_sep>y", "<jupyter_code>print(1)", "< |im_start| >", "<<|im_start|>>",
    "The quick brown fox jumps over the lazy dog.", "A dog runs through the grass.",
    "Two children are playing on the beach near the water.", "What is the capital of France?",
    "supercalifragilisticexpialidocious", "antidisestablishmentarianism", "aaaaaaaaaaaaaaaaaaaaaaaa",
    "ababababababab", "    ", "        indented", "\x1c\x1d separators", "bell\x07", "null\x00byte", "\x7f",
]


def tokenizer_strings(seed, n):
    """n more strings, mixing the pieces above at random (seeded): what a hand-written list would miss."""
    rng = np.random.default_rng(seed)
    pieces = [s for s in HANDWRITTEN if s] + [" ", "  ", "\n", "\t", "0", "7", "42", "'", "'s", "😀", "é", "ß"]
    out = []
    for _ in range(n):
        k = int(rng.integers(2, 7))
        out.append("".join(pieces[i] for i in rng.integers(0, len(pieces), k)))
    return out


DECODER_PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Describe a red bicycle."}]


VISION_PHOTOS = ["chelsea.png", "rocket.jpg"]       # fetched demo photos (real, odd sizes)
VISION_TOKENS = [0, 1, 14, 50, 105, 150, 195, 196]  # saved positions of every hidden state (0 = class token)


def synthetic_photo(seed, size=(173, 131)):
    """A deterministic picture the tests make themselves: smooth colour fields and a few discs."""
    from PIL import Image, ImageDraw
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    rgb = np.stack([np.sin(6 * xx * rng.uniform(0.5, 2) + c) * 0.5 + 0.5 for c in rng.uniform(0, 6, 3)], -1)
    img = Image.fromarray((rgb * 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x, y, r = rng.integers(0, w), rng.integers(0, h), rng.integers(5, 40)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return img


def vision_inputs():
    from tinyllava.image import open_image
    photos = weights.demo_photos()
    return [open_image(photos[name]) for name in VISION_PHOTOS] + [synthetic_photo(0)]


def to_levels(pixels):  # normalized [.., 3, H, W] -> the 8-bit levels they came from (uint8)
    from tinyllava.image import CLIP_MEAN, CLIP_STD
    x = pixels * np.array(CLIP_STD)[:, None, None] + np.array(CLIP_MEAN)[:, None, None]
    return np.round(x * 255).clip(0, 255).astype(np.uint8)


# -- the gradient references' input --------------------------------------------------------------------
def real_example(model, tok):
    """6 made-up image embeddings, then a caption: the gradient reaches the image positions through 30 blocks."""
    rng = np.random.default_rng(0)
    cap = tok.encode("A dog runs through the grass.") + [tok.eos_id]
    prefix = (rng.standard_normal((6, model.cfg.dim)) * 0.05).astype(np.float32)
    x = np.concatenate([prefix, model.embed(cap[:-1])])
    at = np.arange(len(prefix) - 1, len(x))
    return x, at, np.array(cap)


WEIGHT_NAMES = ["blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.3.attn_v.weight", "blk.15.ffn_gate.weight",
                "blk.29.ffn_down.weight", "blk.29.attn_output.weight", "blk.7.attn_norm.weight",
                "blk.20.ffn_norm.weight", "output_norm.weight", "token_embd.weight"]


# -- small models and data that train in seconds ---------------------------------------------------------
def write_tiny_decoder(path, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, seed=0):
    """A small random decoder with SmolLM2's real tokenizer, as a GGUF: for tests that train in seconds."""
    from tinyllava.gguf import GGUFFile, write_gguf
    src = GGUFFile(weights.decoder_path())
    meta = {k: v for k, v in src.metadata.items()}
    types = dict(src.types)
    meta.update({"llama.embedding_length": dim, "llama.block_count": n_layers, "llama.attention.head_count": n_heads,
                 "llama.attention.head_count_kv": n_kv_heads, "llama.feed_forward_length": ffn_dim,
                 "llama.rope.dimension_count": dim // n_heads, "general.file_type": 0})
    rng = np.random.default_rng(seed)
    r = lambda *s: (rng.standard_normal(s) * 0.1).astype(np.float32)  # noqa: E731
    hd = dim // n_heads
    t = {"token_embd.weight": r(len(meta["tokenizer.ggml.tokens"]), dim), "output_norm.weight": 1 + r(dim)}
    for i in range(n_layers):
        t.update({f"blk.{i}.attn_norm.weight": 1 + r(dim), f"blk.{i}.attn_q.weight": r(n_heads * hd, dim),
                  f"blk.{i}.attn_k.weight": r(n_kv_heads * hd, dim), f"blk.{i}.attn_v.weight": r(n_kv_heads * hd, dim),
                  f"blk.{i}.attn_output.weight": r(dim, n_heads * hd), f"blk.{i}.ffn_norm.weight": 1 + r(dim),
                  f"blk.{i}.ffn_gate.weight": r(ffn_dim, dim), f"blk.{i}.ffn_up.weight": r(ffn_dim, dim),
                  f"blk.{i}.ffn_down.weight": r(dim, ffn_dim)})
    return write_gguf(path, meta, t, types=types)


# A tiny decoder whose ffn_down rows (256) are whole K-quant super-blocks, and 8 layers for llama-quantize's
# use_more_bits to choose among: its Q4_K_M has every type SmolLM2's has (tests/reference/q4_k_m.json).
TINY_K_DECODER = dict(dim=32, n_layers=8, n_heads=4, n_kv_heads=2, ffn_dim=256, seed=3)


def QUANTIZE_ROWS():  # rows of several kinds that quantizers round differently -> {name: float32 [4, 512]}
    rng = np.random.default_rng(7)
    shape = (4, 512)
    return {name: x.astype(np.float32) for name, x in {
        "normal": rng.standard_normal(shape),
        "uniform": rng.uniform(-1e-3, 5e-3, shape),                                 # all of one sign mostly
        "positive": rng.uniform(1, 2, shape),                                       # no negative: minimum > 0
        "spiky": rng.standard_normal(shape) * (rng.random(shape) < 0.05) * 100,     # mostly zeros, outliers
        "ties": np.round(rng.standard_normal(shape) * 4) / 4,                       # many equal values
        "tiny": rng.standard_normal(shape) * 1e-6,                                  # float16 subnormal scales
        "zeros": np.zeros(shape) * np.where(rng.random(shape) < 0.5, -1, 1),        # +0 and -0
        "part zeros": rng.standard_normal(shape) * (np.arange(512) % 64 < 20),      # zero sub-blocks
        "wide": rng.standard_normal(shape) * np.exp(rng.uniform(-8, 8, (4, 1))),    # rows of any scale
    }.items()}


def float32_copy(src, dst):  # a decoder GGUF -> the same with every tensor dequantized to float32 (what
    from tinyllava.gguf import GGUFFile, write_gguf  # llama-quantize is given to make a Q4_K_M of it)
    g = GGUFFile(src)
    return write_gguf(dst, {**g.metadata, "general.file_type": 0}, {name: t.numpy() for name, t in g.tensors.items()},
                      types=g.types)


def tiny_llama(seed=0, dtype=np.float64, **kw):
    cfg = LlamaConfig(**{**dict(vocab_size=61, dim=24, n_layers=2, n_heads=6, n_kv_heads=2, ffn_dim=40,
                               rope_theta=10000.0, context_length=64), **kw})
    rng = np.random.default_rng(seed)
    r = lambda *s: (rng.standard_normal(s) * 0.3).astype(dtype)  # noqa: E731
    hd = cfg.head_dim
    layers = [Layer(1 + r(cfg.dim), r(cfg.n_heads * hd, cfg.dim), r(cfg.n_kv_heads * hd, cfg.dim),
                    r(cfg.n_kv_heads * hd, cfg.dim), r(cfg.dim, cfg.n_heads * hd), 1 + r(cfg.dim),
                    r(cfg.ffn_dim, cfg.dim), r(cfg.ffn_dim, cfg.dim), r(cfg.dim, cfg.ffn_dim))
              for _ in range(cfg.n_layers)]
    return Llama(cfg, r(cfg.vocab_size, cfg.dim), layers, 1 + r(cfg.dim))


def steps_logged(run):
    log = run / "log.jsonl"
    return len(log.read_text().splitlines()) if log.exists() else 0


def instructions_in(synthetic_data, out):
    """Instruction JSON files (train and dev) made from the synthetic captions by instruct.py's generators."""
    from tinyllava import instruct
    from tinyllava.data import load_examples
    data, _ = synthetic_data
    for split in ("train", "dev"):
        convs = instruct.build_from_pairs(load_examples(data, split=split))
        instruct.write_conversations(out / f"{split}.json", convs, out)
    return out


def stage2_projector(model, folder):  # a (random) projector that fits the tiny decoder, as a file
    from tinyllava.llama import Llama
    return Projector.init("mlp2x_gelu", 768, Llama.load(model).cfg.dim, seed=1).save(folder / "p.gguf")


# -- a Flickr8k-shaped set of public sources ----------------------------------------------------------------
def git(folder, *args):
    return subprocess.run(["git", "-C", str(folder), *args], check=True, capture_output=True, text=True).stdout.strip()


def git_repo(folder, files):
    """A git repository at `folder` with `files` ({path: bytes}) in one commit. -> its commit id"""
    folder.mkdir(parents=True)
    git(folder, "init", "-q")
    for path, data in files.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(data)
    git(folder, "add", "-A")
    git(folder, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "data")
    return git(folder, "rev-parse", "HEAD")


def snapshot_tarball(repo, snapshot):
    """What GitHub serves for the commit: git archive under NAME-COMMIT/, gzipped. -> bytes"""
    tar = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", f"--prefix={snapshot.archive_name}/",
                          snapshot.commit], check=True, capture_output=True).stdout
    return gzip.compress(tar, mtime=0)


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def jpeg(seed):
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), (seed * 40 % 256, 90, 200 - seed * 10)).save(buf, "JPEG")
    return buf.getvalue()


@dataclass
class Flickr8kLike:
    """Six photos (2 train, 2 dev, 2 test) and one in no split, five captions each, in three git repositories
    laid out as the real sources are; `sources` pins them as data.FLICKR8K pins the real ones."""
    root: Path
    photos: dict = field(default_factory=dict)      # name -> jpeg bytes
    captions: dict = field(default_factory=dict)    # name -> [5 captions]
    splits: dict = field(default_factory=dict)      # split -> [names]
    repos: dict = field(default_factory=dict)       # "images" | "captions" | "splits" -> (folder, Snapshot)
    sources: Flickr8kSources = None

    def __post_init__(self):
        names = [f"{1000 + k}_{k:010x}.jpg" for k in range(7)]
        self.photos = {n: jpeg(k) for k, n in enumerate(names)}
        self.captions = {n: [f"A dog , number {k} , runs .", f'A "quoted" dog {k} .', f"dog {k} plays", f"Dog {k} .",
                             f"The dog {k} sits ."] for k, n in enumerate(names)}
        self.splits = {"train": names[:2], "dev": names[2:4], "test": names[4:6]}  # names[6] is in no split
        csv = "image,caption\n" + "".join(f'{n},"{c.replace(chr(34), 2 * chr(34))}"\n' if ("," in c or '"' in c)
                                          else f"{n},{c}\n" for n, cs in self.captions.items() for c in cs)
        self.files = {
            "images": {f"data/images/{n}": b for n, b in self.photos.items()} | {"README.md": b"images\n"},
            "captions": {"data/ignore_captions.txt": csv.encode(), "data/other.txt": b"x\n"},
            "splits": {f"Flickr8k_text/Flickr_8k.{s}Images.txt": ("\n".join(ns + ["e12_01.jpg"]) + "\n").encode()
                       for s, ns in self.splits.items()}}
        for kind, files in self.files.items():
            commit = git_repo(self.root / kind, files)
            self.repos[kind] = (self.root / kind, Snapshot(f"someone/{kind}-repo", commit))
        self.sources = self.pinned()

    def pinned(self, mirror=None):
        """The pins, computed here from the bytes written (not by the code under test)."""
        snap = {k: Snapshot(s.repo, s.commit, mirror) for k, (_, s) in self.repos.items()}
        listing = "".join(f"{sha256(self.photos[n])}  {n}\n" for n in sorted(self.photos))
        return Flickr8kSources(
            images=Pin(snap["images"], "data/images/", sha256(listing.encode())),
            captions=Pin(snap["captions"], "data/ignore_captions.txt",
                         sha256(self.files["captions"]["data/ignore_captions.txt"])),
            splits={s: Pin(snap["splits"], f"Flickr8k_text/Flickr_8k.{s}Images.txt",
                           sha256(self.files["splits"][f"Flickr8k_text/Flickr_8k.{s}Images.txt"]))
                    for s in self.splits},
            pairs_sha256=sha256(self.pairs_jsonl().encode()), built_sha256=None)

    def pairs_jsonl(self):  # what the build must write, line by line
        split_of = {n: s for s, ns in self.splits.items() for n in ns}
        return "".join(json.dumps({"image": f"images/{n}", "captions": self.captions[n], "split": split_of[n]}) + "\n"
                       for n in sorted(split_of))

    def zips(self, folder):
        """The two archives tutorials download, in their layout. -> (Flickr8k_Dataset.zip, Flickr8k_text.zip)"""
        folder.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(folder / "Flickr8k_Dataset.zip", "w") as z:
            for n, b in self.photos.items():
                z.writestr(f"Flicker8k_Dataset/{n}", b)
            z.writestr(f"__MACOSX/Flicker8k_Dataset/._{next(iter(self.photos))}", b"junk")
        with zipfile.ZipFile(folder / "Flickr8k_text.zip", "w") as z:
            z.writestr("Flickr8k.token.txt", "".join(f"{n}#{i}\t{c}\n" for n, cs in self.captions.items()
                                                     for i, c in enumerate(cs)))
            for s, ns in self.splits.items():
                z.writestr(f"Flickr_8k.{s}Images.txt", "\n".join(ns) + "\n")
        return folder / "Flickr8k_Dataset.zip", folder / "Flickr8k_text.zip"

    def serve(self):
        """A GitHub stand-in serving these repositories (raw files, snapshot tarballs). -> FakeGitHub"""
        server = FakeGitHub()
        for kind, (repo, snap) in self.repos.items():
            for path, data in self.files[kind].items():
                server.files[f"/{snap.repo}/{snap.commit}/{path}"] = data
            server.files[f"/{snap.repo}/tar.gz/{snap.commit}"] = snapshot_tarball(repo, snap)
        return server.start()


class FakeGitHub(http.server.ThreadingHTTPServer):
    """Serves `files` ({url path: bytes}) on 127.0.0.1, honouring Range; `cut` ({path: n}) ends the next n
    transfers of a path halfway, as a dropped connection does; `ranges` records the Range headers received."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files, self.cut, self.ranges = {}, {}, []

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"

    def start(self):
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def stop(self):
        self.shutdown()
        self.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        data = self.server.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        if rng := self.headers.get("Range"):
            self.server.ranges.append((self.path, rng))
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_error(416)
                return
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if self.server.cut.get(self.path, 0) > 0:  # a dropped connection: half the bytes, then nothing
            self.server.cut[self.path] -= 1
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)
