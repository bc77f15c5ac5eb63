"""Decoding: read the prompt once into the KV cache (prefill), then one token at a time.

    prompt embeddings [1, T, d] --prefill--> logits of the last position --sample--> token
    token --embed, one position through the decoder with the cache--> logits --sample--> next token ...

Each step costs one position, not the whole sequence: the cache holds every layer's keys and values of the
positions already seen. Sampling is greedy (temp 0) or a draw from softmax(logits / temp), cut to the top_k
most likely tokens and then to the smallest set whose probability reaches top_p.
"""
import codecs
from dataclasses import dataclass

import numpy as np

from .errors import TinyLlavaError
from .llama import KVCache

PREFILL_CHUNK = 256  # prompt positions per forward pass: bounds the attention scores' memory


@dataclass
class Sampling:
    n_predict: int = 256  # most tokens to generate
    temp: float = 0.0     # 0: greedy
    top_k: int = 0        # 0: all tokens
    top_p: float = 1.0    # 1: no nucleus cut
    seed: int = None

    def check(self):
        if self.n_predict < 1:
            raise TinyLlavaError("-n must be at least 1")
        if not 0 < self.top_p <= 1 or self.top_k < 0 or self.temp < 0:
            raise TinyLlavaError("--temp and --top-k must be >= 0, --top-p in (0, 1]")
        return self


def sample(logits, temp=0.0, top_k=0, top_p=1.0, rng=None):  # [vocab] -> token id
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


def prefill(model, x, cache, hidden_states=None):  # [1, T, d] -> logits of the last position [vocab]
    for s in range(0, x.shape[1], PREFILL_CHUNK):
        h = model.forward(x[:, s:s + PREFILL_CHUNK], cache, hidden_states=hidden_states)
    return model.logits(h[0, -1])


def generate(model, x, sampling=Sampling(), stop_ids=(), cache=None, on_step=None, hidden_states=None):
    """Yield up to sampling.n_predict token ids continuing the prompt embeddings x [1, T, d]; the last one
    yielded is a stop id if one came. `cache`, if given, holds what came before x and is extended.
    on_step(step, logits) sees the logits before each choice; `hidden_states` (a list) gets the prefill's block
    outputs (the trace uses both)."""
    T, n = x.shape[1], sampling.n_predict
    if T == 0:
        raise TinyLlavaError("the prompt is empty")
    cache = cache if cache is not None else KVCache(model.cfg, 1, T + n)
    if cache.length + T + n > model.cfg.context_length:
        raise TinyLlavaError(f"prompt ({cache.length + T} tokens) + {n} new tokens do not fit in the "
                             f"context ({model.cfg.context_length} positions)")
    cache.reserve(cache.length + T + n)
    rng = np.random.default_rng(sampling.seed)
    logits = prefill(model, x, cache, hidden_states)
    for step in range(n):
        if on_step:
            on_step(step, logits)
        tok = sample(logits, sampling.temp, sampling.top_k, sampling.top_p, rng)
        yield tok
        if tok in stop_ids or step == n - 1:
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
