"""Make the reference activations the tests compare against, from torch/transformers on the same weights.

    pip install torch==2.13.0 -e ".[reference]"
    python tests/make_reference.py [tokenizer] [decoder] [generation] ...   (default: all)

Writes small files under tests/reference/. The tests read them with NumPy alone (allow_pickle=False), so a
laptop without torch still checks every layer; where torch is installed they also compare live.
"""
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
REF = HERE / "reference"

import reference_impl as ref  # noqa: E402  (the reference models, shared with the live tests)
from tinyllava import weights  # noqa: E402

# -- tokenizer: 200+ strings of every kind the pre-tokenizer and BPE must get right -----------------------
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


def make_tokenizer():
    tok = ref.tokenizer()
    strings = HANDWRITTEN + tokenizer_strings(seed=0, n=120)
    ids = [tok(s, add_special_tokens=False).input_ids for s in strings]
    (REF / "tokenizer.json").write_text(json.dumps({"strings": strings, "ids": ids}, ensure_ascii=True))
    print(f"tokenizer: {len(strings)} strings")


# -- decoder ---------------------------------------------------------------------------------------------
DECODER_PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Describe a red bicycle."}]


def make_decoder():
    tok = ref.tokenizer()
    ids = tok.apply_chat_template(DECODER_PROMPT, tokenize=True, add_generation_prompt=True, return_dict=False)
    hidden, logits = ref.decoder_activations(ids)
    np.savez_compressed(REF / "decoder.npz", ids=np.array(ids, np.int32), hidden=hidden,
                        logits_last=logits[-2:])
    print(f"decoder: {len(ids)} tokens, hidden {hidden.shape}")


# -- greedy generation -----------------------------------------------------------------------------------
GENERATION_PROMPTS = [
    "What is the capital of France?", "Name three primary colours.", "Write a haiku about autumn leaves.",
    "What is 12 times 12?", "Explain photosynthesis in one sentence.", "Translate 'good morning' into Spanish.",
    "Give me a synonym for happy.", "What do cats like to eat?", "Write a Python function that adds two numbers.",
    "Why is the sky blue?", "List two planets of the solar system.", "How many legs does a spider have?",
]


def make_generation():
    tok = ref.tokenizer()
    out = []
    for p in GENERATION_PROMPTS:
        ids = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=True, add_generation_prompt=True,
                                      return_dict=False)
        new = ref.greedy(ids, 32)
        out.append({"prompt": p, "ids": ids, "new": new, "text": tok.decode(new)})
        print(f"  {p!r} -> {tok.decode(new)!r}")
    (REF / "generation.json").write_text(json.dumps(out, ensure_ascii=True, indent=0))


# -- vision tower and preprocessing -----------------------------------------------------------------------
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


def make_vision():
    images = vision_inputs()
    proc = ref.image_processor()
    pixels = np.stack([proc(images=im, return_tensors="np")["pixel_values"][0] for im in images])
    hidden, embeds = ref.vision_activations(pixels)
    np.savez_compressed(REF / "vision.npz", levels=to_levels(pixels), tokens=np.array(VISION_TOKENS),
                        hidden=hidden[:, :, VISION_TOKENS], image_embeds=embeds)
    print(f"vision: {len(images)} images, hidden {hidden.shape} saved at {len(VISION_TOKENS)} positions")


# -- gradient through the real decoder ---------------------------------------------------------------------
def make_gradient():
    from test_backward import real_example
    from tinyllava.model import load_decoder
    model, tok = load_decoder()
    x, at, targets = real_example(model, tok)
    loss, grad = ref.hf_input_grad(x, at, targets)
    np.savez_compressed(REF / "gradient.npz", x=x, loss=np.float64(loss), grad=grad)
    print(f"gradient: loss {loss:.4f} over {len(targets)} tokens, |grad| max {np.abs(grad).max():.3e}")


def make_weight_gradient():
    """Weight gradients of the real decoder (transformers' autograd), rows 0..63 of each (the file stays small)."""
    from test_backward import WEIGHT_NAMES, real_example
    from tinyllava.model import load_decoder
    model, tok = load_decoder()
    x, at, targets = real_example(model, tok)
    loss, grads = ref.hf_weight_grads(x, at, targets, WEIGHT_NAMES)
    np.savez_compressed(REF / "weight_gradient.npz", **{name: g[:64] for name, g in grads.items()})
    print(f"weight gradients: {len(grads)} weights, loss {loss:.4f}")


PARTS = {"tokenizer": make_tokenizer, "decoder": make_decoder, "generation": make_generation,
         "vision": make_vision, "gradient": make_gradient, "weight_gradient": make_weight_gradient}

if __name__ == "__main__":
    REF.mkdir(exist_ok=True)
    weights.decoder_path()
    for name in sys.argv[1:] or PARTS:
        PARTS[name]()
