"""LLaVA: the vision tower, the projector and the decoder put together.

    image -> vit.features [196, 768] -> projector [196, 576] = 196 "image tokens"
    text with "<image>" -> token embeddings, the image tokens spliced in where "<image>" stands -> decoder

Two prompt forms:
  plain (stage-1 pretraining, and captioning): <image> caption <|im_end|>
  chat (a question about the image):           ChatML, the first user turn starting with <image>\\n

For training, one image and all its captions are packed into one sequence, [image | caption 1 | caption 2 ...],
where each caption sees the image and itself only (a block mask) and starts at the position right after the
image: the same numbers as one sequence per caption, with the image computed once.
"""
import numpy as np

from .decoding import Sampling, TextStream, generate
from .errors import TinyLlavaError
from .llama import KVCache, Llama
from .ops import causal_mask
from .tokenizer import Tokenizer

IMAGE = "<image>"


# -- prompts -----------------------------------------------------------------------------------------------
def split_prompt(text):
    """'a <image> b' -> ['a ', IMAGE, ' b'] (text pieces and image markers, in order)."""
    out = []
    for i, piece in enumerate(text.split(IMAGE)):
        if i:
            out.append(IMAGE)
        if piece:
            out.append(piece)
    return out


def chat_messages(question, n_images=1, system=None, history=()):
    """ChatML messages for a question about the images, after earlier turns (`history`, a list of
    {"role", "content"}). The images go first in the first user turn, as LLaVA puts them, unless that turn
    already places them with <image>."""
    messages = ([{"role": "system", "content": system}] if system else []) + \
        [dict(m) for m in history] + [{"role": "user", "content": question}]
    first = next(m for m in messages if m["role"] == "user")
    if n_images and IMAGE not in first["content"]:
        marks = IMAGE + "\n" if n_images == 1 else "".join(f"Image {i + 1}: {IMAGE}\n" for i in range(n_images))
        first["content"] = marks + first["content"]
    return messages


def chat_prompt(tokenizer, question, n_images=1, system=None, history=()):
    """The chat template's text for a question about the images, ending where the answer starts."""
    return tokenizer.chat(chat_messages(question, n_images, system, history))


def caption_ids(tok, captions):  # the plain template's targets: each caption, then the end token
    return [tok.encode(c) + [tok.eos_id] for c in captions]


# -- the model ---------------------------------------------------------------------------------------------
class Llava:
    def __init__(self, decoder, tokenizer, tower=None, projector=None, system=None):
        self.decoder = decoder      # llama.Llama
        self.tok = tokenizer        # tokenizer.Tokenizer
        self.tower = tower          # vit.VisionTower (None: text only, or features come from a cache)
        self.projector = projector  # projector.Projector
        self.system = system        # the system turn the model was tuned with (None: the tokenizer's default)
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

    def complete(self, x, sampling=Sampling(), on_text=None, cache=None, on_step=None, hidden_states=None):
        """Generate after the prompt embeddings x [1, T, d] until the end token. on_text(piece) gets the text
        as it is decoded. -> (text, token ids, the last of them the end token if it came)"""
        stream, ids = TextStream(self.tok), []
        for t in generate(self.decoder, x, sampling, {self.tok.eos_id}, cache, on_step, hidden_states):
            ids.append(t)
            if t != self.tok.eos_id and on_text:
                on_text(stream.push(t))
        if on_text:
            on_text(stream.flush())
        return self.tok.decode([t for t in ids if t != self.tok.eos_id]), ids

    def caption(self, image_tokens, sampling=Sampling(), on_text=None, **observe):  # [196, d] -> text
        """The plain template, as stage 1 trained it: the image tokens, then the caption."""
        return self.complete(image_tokens[None], sampling, on_text, **observe)[0]

    def answer(self, question, images=(), history=(), system=None, sampling=Sampling(), on_text=None, **observe):
        """The reply to `question` about the images (each [196, d]), through the chat template (with the model's
        own system turn unless `system` is given)."""
        x, _ = self.embed(chat_prompt(self.tok, question, len(images), system or self.system, history), images)
        return self.complete(x, sampling, on_text, **observe)[0]


class Chat:
    """A conversation about images, turn by turn, through the tokenizer's chat template. The KV cache is kept
    between turns, so a turn costs only its own new tokens."""

    def __init__(self, llava, images=(), system=None):
        self.llava, self.images, self.system = llava, list(images), system or llava.system
        self.history = []   # the messages so far
        self.cache = KVCache(llava.decoder.cfg, 1, 0)  # generate() reserves as it goes
        self.text = ""      # the conversation's text so far: in the cache, but for the pending token
        self.pending = []   # the last answer's final token, sampled but not yet fed in
        self.ids = []       # the last answer's token ids

    def prompt(self, question):
        """-> (x [1, T, d] to feed for this turn, pieces (ids or IMAGE) for showing it, the turn's full text)"""
        tok = self.llava.tok
        text = chat_prompt(tok, question, len(self.images), self.system, self.history)
        if not self.history:
            x, pieces = self.llava.embed(text, self.images)
            return x, pieces, text
        if not text.startswith(self.text):
            raise TinyLlavaError("the chat template rewrote earlier turns: the KV cache cannot be reused")
        ids = self.pending + tok.encode(text[len(self.text):])
        return self.llava.decoder.embed([ids]), ids, text

    def ask(self, question, sampling=Sampling(), on_text=None, **observe):
        x, _, text = self.prompt(question)
        context = self.llava.decoder.cfg.context_length
        room = context - self.cache.length - x.shape[1]
        if room < 1:
            raise TinyLlavaError(f"the prompt is {x.shape[1]} tokens, longer than the context ({context})"
                                 if not self.history else f"the conversation has filled the context ({context})")
        sampling = Sampling(**{**vars(sampling), "n_predict": min(sampling.n_predict, room)})
        answer, self.ids = self.llava.complete(x, sampling, on_text, self.cache, **observe)
        self.history += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        self.text = text + answer
        self.pending = [] if self.ids[-1] == self.llava.tok.eos_id else self.ids[-1:]
        return answer


# -- training sequences ------------------------------------------------------------------------------------
def conversation_ids(tok, turns, system=None):
    """A conversation about one image, [(question, answer), ...], in the chat template, cut where the image
    stands. -> (prefix ids: the text before the image; ids after it; targets: True on the tokens the loss
    scores, each answer and the end token after it). Each prompt is encoded as at inference, up to where the
    answer starts, and each answer on its own, as the model generates it."""
    history, said, prefix, ids, targets = [], "", None, [], []
    end = tok.decode([tok.eos_id])
    for question, answer in turns:
        text = chat_prompt(tok, question, 1, system, history)    # the conversation so far, ending "assistant\n"
        if prefix is None:
            before, new = text.split(IMAGE)
            prefix = tok.encode(before)
        elif text.startswith(said):
            new = text[len(said):]
        else:
            raise TinyLlavaError("the chat template rewrote earlier turns: cannot cut the conversation into turns")
        prompt, reply = tok.encode(new), tok.encode(answer) + [tok.eos_id]
        ids += prompt + reply
        targets += [False] * len(prompt) + [True] * len(reply)
        history += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        said = text + answer + end
    return prefix, ids, targets


def pack(prefix, segments):
    """One image's training sequence: the prefix, then every segment packed after it.

    prefix: [P, d] embeddings (the image tokens, with any text before them); segments: list of id lists, each
    predicting all its tokens (stage 1: a caption ending with the end token), or of (ids, targets) pairs,
    `targets` marking which tokens the loss scores (stage 2: the answers of a conversation). Each segment sees
    the prefix and itself only (a block mask) and starts at the position right after the prefix: the same
    numbers as one sequence per segment, with the prefix computed once.
    -> (ids [L] (-1 under the prefix), positions [L], mask [1, 1, L, L], at [N], targets [N]): position
    `at[k]` must predict token `targets[k]`; the prefix's last position predicts each segment's first token."""
    P = len(prefix)
    ids, positions, segment = [np.full(P, -1)], [np.arange(P)], [np.zeros(P, int)]
    at, targets, start = [], [], P
    for j, seg in enumerate(segments, start=1):
        seg_ids, scored = seg if isinstance(seg, tuple) else (seg, [True] * len(seg))
        n = len(seg_ids)
        ids.append(np.array(seg_ids))
        positions.append(P + np.arange(n))
        segment.append(np.full(n, j))
        before = [P - 1] + list(range(start, start + n - 1))  # the position that predicts each token
        at += [p for p, s in zip(before, scored) if s]
        targets += [t for t, s in zip(seg_ids, scored) if s]
        start += n
    ids, positions, segment = np.concatenate(ids), np.concatenate(positions), np.concatenate(segment)
    L = len(ids)
    # query t may see key s if s is in the prefix or in t's own segment, and s comes no later than t
    mask = ((segment[None, :] == 0) | (segment[None, :] == segment[:, None])) & causal_mask(L)[0, 0]
    return ids, positions, mask[None, None], np.array(at, int), np.array(targets, int)


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


# -- loading -----------------------------------------------------------------------------------------------
def default_projector_path():  # the committed stage-1 projector
    from .weights import WEIGHTS_DIR
    return WEIGHTS_DIR / "projector.gguf"


def stage2_paths():  # the committed stage-2 model: (its projector, its LoRA adapter)
    from .weights import WEIGHTS_DIR
    return WEIGHTS_DIR / "stage2-projector.gguf", WEIGHTS_DIR / "stage2-lora.gguf"


def load_decoder(path=None, load_matrix=None):
    """The SmolLM2 decoder and its tokenizer (fetched on first use when no path is given). Matrices are float32,
    or what load_matrix(GGUFTensor) makes (fused.QuantMatrix.from_tensor keeps them quantized, and then a
    fused_llama.FusedLlama decodes each token in one compiled call)."""
    from .weights import decoder_path
    if load_matrix is None:
        model = Llama.load(path or decoder_path())
    else:
        from .fused_llama import FusedLlama
        model = FusedLlama.load(path or decoder_path(), load_matrix)
    return model, Tokenizer.from_gguf(model.gguf)


def load_llava(projector=None, decoder=None, tower=True, load_matrix=None, adapter=None):
    """The decoder, its tokenizer, the vision tower (unless tower=False) and a trained projector (default: the
    committed weights/projector.gguf), each fetched or converted on first use; with `adapter`, a stage-2 LoRA
    GGUF on top of the decoder, and the system turn it was tuned with."""
    from pathlib import Path

    from . import lora
    from .gguf import GGUFFile
    from .projector import Projector
    from .vit import VisionTower
    from .weights import vision_path
    path = Path(projector) if projector else default_projector_path()
    for p, what in ((path, "projector"), (adapter and Path(adapter), "adapter")):
        if p and not p.exists():
            raise TinyLlavaError(f"{p}: no such {what} file" + ("" if projector or what == "adapter" else
                                 "; train one with `python -m tinyllava.train` or pass --projector"))
    proj = Projector.load(path)
    dec, tok = load_decoder(decoder, load_matrix=load_matrix)
    system = GGUFFile(path).get("tinyllava.system")
    if adapter:
        lora.load(adapter, dec)
        system = GGUFFile(adapter).get("tinyllava.system", system)
    vt = VisionTower.load(vision_path(), load_matrix=load_matrix) if tower else None
    return Llava(dec, tok, vt, proj, system)
