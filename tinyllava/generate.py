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
    cache = cache or KVCache(cfg, 1, min(cfg.context_length, T + n_predict))
    if cache.length + T + n_predict > cache.k.shape[2]:
        raise TinyLlavaError(f"prompt ({cache.length + T} tokens) + {n_predict} new tokens do not fit in the "
                             f"context ({cache.k.shape[2]} positions)")
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


def load_decoder(path=None, fused=False):
    """The SmolLM2 decoder and its tokenizer (fetched on first use when no path is given)."""
    from .llama import Llama
    from .tokenizer import Tokenizer
    from .weights import decoder_path
    model = Llama.load(path or decoder_path())
    return model, Tokenizer.from_gguf(model.gguf)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tinyllava.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", help="decoder GGUF (default: the fetched SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("-p", "--prompt", default="What is the capital of France?", help="the user's message")
    ap.add_argument("-sys", "--system-prompt", help="system message (default: the model's own)")
    ap.add_argument("-n", "--n-predict", type=int, default=256, help="most tokens to generate (default 256)")
    ap.add_argument("--temp", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    ap.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
    ap.add_argument("-s", "--seed", type=int, default=None, help="random seed for sampling")
    args = ap.parse_args(argv)

    with cli_errors("tinyllava.generate"):
        try:
            args.prompt.encode("utf-8")
        except UnicodeEncodeError:
            raise TinyLlavaError("the prompt is not valid UTF-8") from None
        if not args.prompt.strip():
            raise TinyLlavaError("the prompt is empty")
        if args.n_predict < 1:
            raise TinyLlavaError("-n must be at least 1")
        t0 = time.perf_counter()
        model, tok = load_decoder(args.model)
        messages = ([{"role": "system", "content": args.system_prompt}] if args.system_prompt else []) + \
            [{"role": "user", "content": args.prompt}]
        ids = tok.encode(tok.chat(messages))
        if len(ids) >= model.cfg.context_length:
            raise TinyLlavaError(f"the prompt is {len(ids)} tokens, longer than the context "
                                 f"({model.cfg.context_length})")
        n = min(args.n_predict, model.cfg.context_length - len(ids))
        t1 = time.perf_counter()
        stream, count = TextStream(tok), 0
        for t in generate(model, model.embed([ids]), n, {tok.eos_id}, args.temp, args.top_k, args.top_p,
                          args.seed):
            count += 1
            if t != tok.eos_id:
                sys.stdout.write(stream.push(t))
                sys.stdout.flush()
        sys.stdout.write(stream.flush() + "\n")
        t2 = time.perf_counter()
        print(f"[load {t1 - t0:.1f} s, prompt {len(ids)} tokens, {count} tokens in {t2 - t1:.1f} s, "
              f"{count / (t2 - t1):.1f} tok/s]", file=sys.stderr)


if __name__ == "__main__":
    main()
