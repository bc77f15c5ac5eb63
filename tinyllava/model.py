"""LLaVA: the vision tower, the projector and the decoder put together.

    image -> vit.features [196, 768] -> projector [196, 576] = 196 "image tokens"
    text with "<image>" -> token embeddings, the image tokens spliced in where "<image>" stands -> decoder

Two prompt forms:
  plain (stage-1 pretraining, and captioning): <image> caption <|im_end|>
  chat (a question about the image):           ChatML, the first user turn starting with <image>\\n

The loaders at the end put the parts together: load_decoder(quantized=...) says which engine runs the decoder
(float32, or the fused quantized products). Training sequences (an image with all its captions or conversations
packed into one) are sequences.py's.
"""
import numpy as np

from .decoding import Sampling, TextStream, generate
from .errors import TinyLlavaError
from .llama import KVCache, Llama
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


# -- the model ---------------------------------------------------------------------------------------------
class Llava:
    """LLaVA: a vision tower and a projector that turn a picture into image tokens, and a decoder that reads them
    with the text. caption() continues the image alone (the plain template stage 1 trains in); answer() replies in
    the chat template, with the system turn the model was tuned with. load_llava() makes one."""

    def __init__(self, decoder, tokenizer, tower=None, projector=None, system=None):
        self.decoder = decoder      # llama.Llama
        self.tok = tokenizer        # tokenizer.Tokenizer
        self.tower = tower          # vit.Clip (None: text only, or features come from a cache)
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
        """The reply to the next user turn (streamed to on_text as it is decoded), remembered for the turns after
        it; refused when the conversation would outgrow the context. -> the reply's text"""
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


# -- loading -----------------------------------------------------------------------------------------------
def load_decoder(path=None, quantized=False):
    """The SmolLM2 decoder and its tokenizer (fetched on first use when no path is given). Its matrices are float32
    (llama.Llama), or with quantized=True kept in the file's blocks (fused.QuantMatrix) in a fused_llama.FusedLlama
    that decodes each token in one compiled call. The products' threads are decided here (runtime.threads) unless
    they were already."""
    from . import runtime
    from .weights import decoder_path
    runtime.threads()
    if quantized:
        from .fused import QuantMatrix
        from .fused_llama import FusedLlama
        model = FusedLlama.load(path or decoder_path(), QuantMatrix.from_tensor)
    else:
        model = Llama.load(path or decoder_path())
    return model, Tokenizer.from_gguf(model.gguf)


def load_tower(quantized=False):
    """The CLIP vision tower (converted from the fetched ONNX on first use); quantized=True keeps its matrices in
    Q8_0 blocks, dequantized inside each product. The products' threads are decided here too (runtime.threads)."""
    from . import runtime
    from .vit import Clip
    from .weights import vision_path
    runtime.threads()
    if quantized:
        from .fused import QuantMatrix
        return Clip.load(vision_path(), load_matrix=QuantMatrix.from_tensor)
    return Clip.load(vision_path())


def load_llava(projector=None, decoder=None, tower=True, quantized=False, adapter=None):
    """The decoder, its tokenizer, the vision tower (unless tower=False) and a trained projector (default: the
    committed weights/projector.gguf), each fetched or converted on first use; with `adapter`, a stage-2 LoRA
    GGUF on top of the decoder, and the system turn it was tuned with. quantized: see load_decoder."""
    from pathlib import Path

    from . import lora
    from .gguf import GGUFFile
    from .projector import Projector
    from .weights import default_projector_path
    path = Path(projector) if projector else default_projector_path()
    for p, what in ((path, "projector"), (adapter and Path(adapter), "adapter")):
        if p and not p.exists():
            raise TinyLlavaError(f"{p}: no such {what} file" + ("" if projector or what == "adapter" else
                                 "; train one with `python -m tinyllava.train` or pass --projector"))
    proj = Projector.load(path)
    dec, tok = load_decoder(decoder, quantized)
    system = GGUFFile(path).get("tinyllava.system")
    if adapter:
        lora.load(adapter, dec)
        system = GGUFFile(adapter).get("tinyllava.system", system)
    return Llava(dec, tok, load_tower(quantized) if tower else None, proj, system)
