"""Generate text: prefill the prompt once, then decode one token at a time with the KV cache.

    python -m tinyllava.generate -p "What is the capital of France?"

Only the answer goes to stdout (streamed as it is decoded); diagnostics go to stderr.
"""
import argparse
import codecs
import sys
import time

import numpy as np

from .errors import TinyLlavaError, cli_errors
from .llama import KVCache

PREFILL_CHUNK = 256  # prompt positions per forward pass: bounds the attention scores' memory


def sample(logits, temp=0.0, top_k=0, top_p=1.0, rng=None):  # [vocab] -> token id
    """Greedy when temp == 0; otherwise softmax(logits / temp) cut to the top_k tokens, then to the smallest
    set whose probability reaches top_p (nucleus), and one draw from what is left."""
    if temp <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temp                        # [vocab]
    order = np.argsort(-z, kind="stable")                       # [vocab] best first
    if top_k > 0:
        order = order[:top_k]
    p = np.exp(z[order] - z[order[0]])
    p /= p.sum()
    if top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(p), top_p)) + 1    # smallest prefix with mass >= top_p
        p = p[:keep] / p[:keep].sum()
        order = order[:keep]
    return int(order[(rng or np.random.default_rng()).choice(len(p), p=p)])


def prefill(model, x, cache):  # [1, T, d] -> logits of the last position [vocab]
    for s in range(0, x.shape[1], PREFILL_CHUNK):
        h = model.forward(x[:, s:s + PREFILL_CHUNK], cache)
    return model.logits(h[0, -1])


def generate(model, x, n_predict, stop_ids=(), temp=0.0, top_k=0, top_p=1.0, seed=None, cache=None,
             on_step=None):
    """Yield up to n_predict token ids continuing the prompt embeddings x [1, T, d] (stops after a stop id).
    on_step(step, logits), if given, sees the logits before each choice (the trace uses it)."""
    cfg = model.cfg
    T = x.shape[1]
    if T == 0:
        raise TinyLlavaError("the prompt is empty")
    cache = cache if cache is not None else KVCache(cfg, 1, T + n_predict)
    if cache.length + T + n_predict > cfg.context_length:
        raise TinyLlavaError(f"prompt ({cache.length + T} tokens) + {n_predict} new tokens do not fit in the "
                             f"context ({cfg.context_length} positions)")
    cache.reserve(cache.length + T + n_predict)
    rng = np.random.default_rng(seed)
    logits = prefill(model, x, cache)
    for step in range(n_predict):
        if on_step:
            on_step(step, logits)
        tok = sample(logits, temp, top_k, top_p, rng)
        yield tok
        if tok in stop_ids or step == n_predict - 1:
            return
        logits = model.logits(model.forward(model.embed([[tok]]), cache)[0, -1])


class TextStream:
    """Token ids -> text as it becomes valid UTF-8 (a character may span several byte-level tokens)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id):
        return self.utf8.decode(self.tok.decode_bytes([token_id]))

    def flush(self):
        return self.utf8.decode(b"", final=True)


def load_decoder(path=None, load_matrix=None):
    """The SmolLM2 decoder and its tokenizer (fetched on first use when no path is given)."""
    from .llama import Llama
    from .tokenizer import Tokenizer
    from .weights import decoder_path
    model = Llama.load(path or decoder_path(), load_matrix)
    return model, Tokenizer.from_gguf(model.gguf)


def stream_answer(model, tok, x, args, cache=None, out=sys.stdout):
    """Generate after the prompt embeddings x [1, T, d], printing text as it comes. -> the token ids"""
    stream, ids, on_step = TextStream(tok), [], None
    if args.trace:
        from . import trace
        cache = cache if cache is not None else KVCache(model.cfg, 1, x.shape[1] + args.n_predict)
        trace.prefill(model, x, cache)
        x, on_step = x[:, -1:], trace.step_printer(tok, args.temp)
    for t in generate(model, x, args.n_predict, {tok.eos_id}, args.temp, args.top_k, args.top_p, args.seed,
                      cache=cache, on_step=on_step):
        ids.append(t)
        if t != tok.eos_id:
            out.write(stream.push(t))
            out.flush()
    out.write(stream.flush() + "\n")
    out.flush()
    return ids


def check_text(text, what="the prompt"):
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise TinyLlavaError(f"{what} is not valid UTF-8") from None
    if not text.strip():
        raise TinyLlavaError(f"{what} is empty")
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m tinyllava.generate", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__ + """
  python -m tinyllava.generate                                  # caption a demo photo
  python -m tinyllava.generate --image cat.jpg                  # caption your photo
  python -m tinyllava.generate --image cat.jpg -p "What is the cat doing?"
  python -m tinyllava.generate --image cat.jpg --chat           # talk about it, turn by turn
  python -m tinyllava.generate -p "What is the capital of France?"   # text only
""")
    ap.add_argument("--image", action="append", metavar="PATH", help="an image (repeat for several)")
    ap.add_argument("-p", "--prompt", help="the user's message (with an image and no prompt: caption it)")
    ap.add_argument("--chat", action="store_true", help="a conversation: read more turns from stdin")
    ap.add_argument("-sys", "--system-prompt", help="system message (default: the model's own)")
    ap.add_argument("-n", "--n-predict", type=int, default=256, help="most tokens to generate per answer (256)")
    ap.add_argument("--temp", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    ap.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
    ap.add_argument("-s", "--seed", type=int, default=None, help="random seed for sampling")
    ap.add_argument("-m", "--model", help="decoder GGUF (default: the fetched SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--projector", help="projector GGUF (default: weights/projector.gguf, trained here)")
    ap.add_argument("--crop", action="store_true", help="centre-crop images instead of padding them square")
    ap.add_argument("--fused", action=argparse.BooleanOptionalAction, default=None,
                    help="keep the weights quantized and dequantize inside each product (tinyllava/fused.py; "
                         "the default when numba is installed); --no-fused: float32 weights, dequantized at load")
    ap.add_argument("--trace", action="store_true",
                    help="print every stage to stderr: preprocessing, ViT blocks, projector, the prompt with the "
                         "image in place, prefill block by block, each decode step's top candidates")
    args = ap.parse_args(argv)

    with cli_errors("tinyllava.generate"):
        if args.prompt is not None:
            check_text(args.prompt)
        if args.n_predict < 1:
            raise TinyLlavaError("-n must be at least 1")
        if not 0 < args.top_p <= 1 or args.top_k < 0 or args.temp < 0:
            raise TinyLlavaError("--temp and --top-k must be >= 0, --top-p in (0, 1]")
        t0 = time.perf_counter()
        from . import fused
        use_fused = args.fused if args.fused is not None else fused.ENGINE == "numba"
        load_matrix = fused.QuantMatrix.from_tensor if use_fused else None
        images = args.image or []
        if not images and args.prompt is None and not args.chat:  # no arguments: a demo photo
            from .weights import demo_photos
            images = [demo_photos()["astronaut.png"]]  # a person: Flickr8k's domain (see README)
            print(f"(no --image given: captioning the demo photo {images[0]})", file=sys.stderr)
        if images:
            from .image import preprocess
            from .model import load_llava
            pixels = [preprocess(p, pad=not args.crop) for p in images]  # bad images fail before loading
            llava = load_llava(args.projector, args.model, load_matrix=load_matrix)
            model, tok = llava.decoder, llava.tok
            if args.trace:
                from . import trace
                tokens = [trace.image_tokens(llava, p, pad=not args.crop) for p in images]
            else:
                tokens = [llava.image_tokens(px[None])[0] for px in pixels]   # [196, d] each
            if use_fused:  # the vision tower's work is done: give its pages back before the prompt
                fused.release(llava.tower.gguf)
        else:
            from .model import Llava
            model, tok = load_decoder(args.model, load_matrix=load_matrix)
            llava, tokens = Llava(model, tok), []
        t1 = time.perf_counter()
        count = 0
        if images and args.prompt is None and not args.chat:  # captions: the plain template, image by image
            from .model import IMAGE
            for path, x in zip(images, tokens):
                if len(images) > 1:
                    sys.stdout.write(f"{path}: ")
                if args.trace:
                    trace.prompt(tok, [IMAGE])
                count += len(stream_answer(model, tok, x[None], args))
        else:
            from .model import chat_prompt
            question = args.prompt if args.prompt is not None else check_text(input_turn(), "the question")
            if images:
                text = chat_prompt(tok, question, len(images), args.system_prompt)
            else:
                text = tok.chat(([{"role": "system", "content": args.system_prompt}] if args.system_prompt else [])
                                + [{"role": "user", "content": question}])
            x, pieces = llava.embed(text, tokens)
            if args.trace:
                from . import trace
                trace.prompt(tok, pieces)
            if x.shape[1] + 1 > model.cfg.context_length:
                raise TinyLlavaError(f"the prompt is {x.shape[1]} tokens, longer than the context "
                                     f"({model.cfg.context_length})")
            cache = KVCache(model.cfg, 1, x.shape[1] + args.n_predict)  # grown as the conversation goes on
            args.n_predict = min(args.n_predict, model.cfg.context_length - x.shape[1])
            ids = stream_answer(model, tok, x, args, cache)
            count += len(ids)
            while args.chat and (question := input_turn()) is not None:
                # the last answer's final token was sampled but never fed in: it opens the next turn
                turn = [ids[-1]] + ([] if ids[-1] == tok.eos_id else [tok.eos_id]) + \
                    tok.encode(f"\n<|im_start|>user\n{check_text(question)}<|im_end|>\n<|im_start|>assistant\n")
                room = model.cfg.context_length - cache.length - len(turn)
                if room < 1:
                    raise TinyLlavaError(f"the conversation has filled the context ({model.cfg.context_length})")
                args.n_predict = min(args.n_predict, room)
                ids = stream_answer(model, tok, model.embed([turn]), args, cache)
                count += len(ids)
        t2 = time.perf_counter()
        print(f"[load {t1 - t0:.1f} s, {count} tokens in {t2 - t1:.1f} s, {count / (t2 - t1):.1f} tok/s]",
              file=sys.stderr)


def input_turn():
    """One line from the user (stdin), or None at the end of input."""
    if sys.stdin.isatty():
        print("> ", end="", file=sys.stderr, flush=True)
    line = sys.stdin.readline()
    return line.rstrip("\n") if line else None


if __name__ == "__main__":
    main()
