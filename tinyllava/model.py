"""LLaVA: the vision tower, the projector and the decoder put together.

    image -> vit.features [196, 768] -> projector [196, 576] = 196 "image tokens"
    text with "<image>" -> token embeddings, the image tokens spliced in where "<image>" stands -> decoder

Two prompt forms:
  plain (stage-1 pretraining, and captioning): <image> caption <|im_end|>
  chat (a question about the image):           ChatML, the user's turn starting with <image>\\n

For training, one image and all its captions are packed into one sequence, [image | caption 1 | caption 2 ...],
where each caption sees the image and itself only (a block mask) and starts at the position right after the
image: the same numbers as one sequence per caption, with the image computed once.
"""
import numpy as np

from .errors import TinyLlavaError
from .llama import causal_mask

IMAGE = "<image>"


def split_prompt(text):
    """'a <image> b' -> ['a ', IMAGE, ' b'] (text pieces and image markers, in order)."""
    out = []
    for i, piece in enumerate(text.split(IMAGE)):
        if i:
            out.append(IMAGE)
        if piece:
            out.append(piece)
    return out


def chat_prompt(tokenizer, question, n_images=1, system=None, history=()):
    """ChatML text for a question about the images (LLaVA puts the images first in the user's turn)."""
    messages = ([{"role": "system", "content": system}] if system else []) + list(history)
    images = IMAGE + "\n" if n_images == 1 else "".join(f"Image {i + 1}: {IMAGE}\n" for i in range(n_images))
    content = (images if not history else "") + question
    return tokenizer.chat(messages + [{"role": "user", "content": content}])


class Llava:
    def __init__(self, decoder, tokenizer, tower=None, projector=None):
        self.decoder = decoder      # llama.Llama
        self.tok = tokenizer        # tokenizer.Tokenizer
        self.tower = tower          # vit.VisionTower (None: text only, or features come from a cache)
        self.projector = projector  # projector.Projector
        if projector is not None and projector.d_out != decoder.cfg.dim:
            raise TinyLlavaError(f"the projector makes {projector.d_out}-wide image tokens but the decoder's "
                                 f"embeddings are {decoder.cfg.dim} wide: they do not belong together")
        if projector is not None and tower is not None and projector.d_in != tower.cfg.dim:
            raise TinyLlavaError(f"the projector expects {projector.d_in}-wide features but the vision tower "
                                 f"makes {tower.cfg.dim}")

    def image_tokens(self, pixels):  # [B, 3, 224, 224] -> [B, 196, d]
        return self.projector.forward(self.tower.features(pixels))

    def embed(self, text, images=()):
        """Prompt text with <image> markers and one [196, d] array per marker -> (x [1, T, d], pieces),
        pieces being token ids or IMAGE, in order (for showing the prompt)."""
        parts = split_prompt(text)
        if parts.count(IMAGE) != len(images):
            raise TinyLlavaError(f"the prompt has {parts.count(IMAGE)} {IMAGE} markers for {len(images)} images")
        xs, pieces, images = [], [], list(images)
        for part in parts:
            if part == IMAGE:
                xs.append(images.pop(0))
                pieces.append(IMAGE)
            else:
                ids = self.tok.encode(part)
                xs.append(self.decoder.embed(ids))
                pieces += ids
        return np.concatenate(xs, axis=0)[None].astype(np.float32), pieces


# -- stage-1 training sequences --------------------------------------------------------------------------
def pack(prefix, captions):
    """One image's training sequence with all its captions packed after it.

    prefix: [P, d] embeddings (the image tokens, with any text around them); captions: list of id lists,
    each already ending with the end token. -> (ids [L] (-1 under the prefix), positions [L], mask [1, 1, L, L],
    at [N], targets [N]): position `at[k]` must predict token `targets[k]`; the prefix's last position
    predicts the first token of every caption."""
    P = len(prefix)
    ids, positions, segment = [np.full(P, -1)], [np.arange(P)], [np.zeros(P, int)]
    at, targets, start = [], [], P
    for j, cap in enumerate(captions, start=1):
        n = len(cap)
        ids.append(np.array(cap))
        positions.append(P + np.arange(n))
        segment.append(np.full(n, j))
        at += [P - 1] + list(range(start, start + n - 1))  # prefix end, then each caption token but the last
        targets += cap
        start += n
    ids, positions, segment = np.concatenate(ids), np.concatenate(positions), np.concatenate(segment)
    L = len(ids)
    # query t may see key s if s is in the prefix or in t's own caption, and s comes no later than t
    mask = ((segment[None, :] == 0) | (segment[None, :] == segment[:, None])) & causal_mask(L)[0, 0]
    return ids, positions, mask[None, None], np.array(at), np.array(targets)


def collate(samples, prefixes, embed):
    """Several packed sequences of different lengths -> one padded batch.
    samples: outputs of pack(); prefixes: their [P, d] prefixes; embed(ids) -> [n, d].
    -> x [B, L, d], positions [B, L], mask [B, 1, L, L] (padding is seen by no one), at [N] (flat), targets [N]"""
    B, L = len(samples), max(len(s[0]) for s in samples)
    d = prefixes[0].shape[-1]
    x = np.zeros((B, L, d), prefixes[0].dtype)
    positions = np.zeros((B, L), int)
    mask = np.zeros((B, 1, L, L), bool)
    ats, targets = [], []
    for b, ((ids, pos, m, at, tg), prefix) in enumerate(zip(samples, prefixes)):
        n, P = len(ids), len(prefix)
        x[b, :P] = prefix
        x[b, P:n] = embed(ids[P:])
        positions[b, :n] = pos
        mask[b, 0, :n, :n] = m[0, 0]
        mask[b, 0, n:, 0] = True  # padding queries look at one key, so their softmax stays finite
        ats.append(b * L + at)
        targets.append(tg)
    return x, positions, mask, np.concatenate(ats), np.concatenate(targets)


def default_projector_path():
    from .weights import WEIGHTS_DIR
    return WEIGHTS_DIR / "projector.gguf"


def load_llava(projector=None, decoder=None, tower=True, load_matrix=None):
    """The decoder, its tokenizer, the vision tower (unless tower=False) and a trained projector (default: the
    committed weights/projector.gguf), each fetched or converted on first use."""
    from pathlib import Path

    from .generate import load_decoder
    from .projector import Projector
    from .vit import VisionTower
    from .weights import vision_path
    path = Path(projector) if projector else default_projector_path()
    if not path.exists():
        raise TinyLlavaError(f"{path}: no such projector file" + ("" if projector else
                             "; train one with `python -m tinyllava.train` or pass --projector"))
    proj = Projector.load(path)
    dec, tok = load_decoder(decoder, load_matrix=load_matrix)
    vt = VisionTower.load(vision_path(), load_matrix=load_matrix) if tower else None
    return Llava(dec, tok, vt, proj)
