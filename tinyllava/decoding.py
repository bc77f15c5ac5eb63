"""Decoding: read the prompt once into the KV cache (prefill), then one token at a time.

    prompt embeddings [1, T, d] --prefill--> logits of the last position --sample--> token
    token --embed, one position through the decoder with the cache--> logits --sample--> next token ...

Each step costs one position, not the whole sequence: the cache holds every layer's keys and values of the
positions already seen. Sampling is greedy (temp 0) or a draw from softmax(logits / temp), cut to the top_k
most likely tokens and then to the smallest set whose probability reaches top_p.

Many prompts at once (the evaluation's captions and answers): each row of one batched KV cache decodes its own
sequence, and a row whose sequence ends takes the next prompt (continuous batching: greedy_decode); beam search
keeps several continuations of one prompt as rows (beam_search).
"""
import codecs
from dataclasses import dataclass, field

import numpy as np

from . import runtime
from .errors import TinyLlavaError
from .llama import KVCache
from .ops import log_softmax

PREFILL_CHUNK = 256  # prompt positions per forward pass: bounds the attention scores' memory
RESERVE = 64         # KV cache positions reserved after a prompt; it doubles when they are used up


@dataclass
class Sampling:
    n_predict: int = field(default=256, metadata={"flags": ("-n",), "help": "most tokens to generate per answer"})
    temp: float = field(default=0.0, metadata={"help": "sampling temperature; 0: greedy"})
    top_k: int = field(default=0, metadata={"help": "sample among the k most likely tokens; 0: all"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass; 1.0: off"})
    seed: int = field(default=None, metadata={"flags": ("-s",), "help": "random seed for sampling"})

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
    yielded is a stop id if one came. `cache`, if given, holds what came before x and is extended (its k and v
    arrays are replaced by larger ones as it grows).
    on_step(step, logits) sees the logits before each choice; `hidden_states` (a list) gets the prefill's block
    outputs (the trace uses both)."""
    T, n = x.shape[1], sampling.n_predict
    if T == 0:
        raise TinyLlavaError("the prompt is empty")
    cache, context = cache if cache is not None else KVCache(model.cfg, 1, 0), model.cfg.context_length
    if cache.length + T + n > context:
        raise TinyLlavaError(f"prompt ({cache.length + T} tokens) + {n} new tokens do not fit in the "
                             f"context ({context} positions)")
    cache.reserve(cache.length + T + min(n, RESERVE), context)  # the rest as it comes: most answers end long before n
    rng = np.random.default_rng(sampling.seed)
    logits = prefill(model, x, cache, hidden_states)
    for step in range(n):
        if on_step:
            on_step(step, logits)
        tok = sample(logits, sampling.temp, sampling.top_k, sampling.top_p, rng)
        yield tok
        if tok in stop_ids or step == n - 1:
            return
        logits = model.logits(model.forward(model.embed([[tok]]), cache.reserve(cache.length + 1, context))[0, -1])


class TextStream:
    """Token ids -> text as it becomes valid UTF-8 (a character may span several byte-level tokens)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id):
        return self.utf8.decode(self.tok.decode_bytes([token_id]))

    def flush(self):
        return self.utf8.decode(b"", final=True)


# -- many sequences at once ---------------------------------------------------------------------------------
class BatchCache:
    """Several sequences in one KV cache, one per row, each of its own length.

    Row b's keys and values sit in the columns where valid[b] is True; a step writes every row's new token to
    the same next column (cache.length) and gives it the row's own position pos[b] for RoPE, and each row's
    attention sees only its own columns, so every row computes what it would alone. The keys are stored
    already rotated, so which column holds a key does not matter: a new sequence can take any row (its prompt
    in columns 0..P-1, the columns after it masked), and a row's columns can be packed to the left. When the
    columns run out, the rows are packed and `room` more columns added."""

    def __init__(self, cfg, rows, room):
        self.cfg, self.room = cfg, room
        self.cache = KVCache(cfg, rows, 0)         # k, v [layers, rows, columns, Hkv, hd]
        self.valid = np.zeros((rows, 0), bool)     # [rows, columns]: which columns are the row's
        self.pos = np.zeros(rows, int)             # [rows]: the position of each row's next token

    def put(self, b, prompt):  # a prompt's KV cache (batch 1) -> row b, replacing what was there
        P = prompt.length
        self.valid[b] = False
        if P > self.valid.shape[1]:
            self.pack(np.arange(len(self.pos)), P + self.room)
        self.cache.k[:, b, :P], self.cache.v[:, b, :P] = prompt.k[:, 0, :P], prompt.v[:, 0, :P]
        self.valid[b, :P] = True
        self.cache.length = max(self.cache.length, P)
        self.pos[b] = P

    def pack(self, rows, room=None):  # keep these rows (in this order; one may repeat), their columns to the left
        n = self.valid[rows].sum(axis=1)                                            # [rows'] columns in use
        S = int(n.max(initial=0))
        room = self.room if room is None else room
        cache = KVCache(self.cfg, len(rows), S + room)                              # `room` free columns
        for j, b in enumerate(rows):
            cols = np.nonzero(self.valid[b])[0]
            cache.k[:, j, :len(cols)], cache.v[:, j, :len(cols)] = self.cache.k[:, b, cols], self.cache.v[:, b, cols]
        cache.length = S
        self.cache, self.valid, self.pos = cache, np.arange(S + room)[None, :] < n[:, None], self.pos[rows]

    def step(self, decoder, tokens):  # tokens [rows], one per row -> logits [rows, vocab] after them
        if self.cache.length == self.valid.shape[1]:                                # no free column: pack
            self.pack(np.arange(len(self.pos)))
        S = self.cache.length
        self.valid[:, S] = True
        h = decoder.forward(decoder.embed(tokens[:, None]), self.cache, valid=self.valid[:, :S + 1],
                            positions=self.pos[:, None])                            # [rows, 1, d]
        self.pos += 1
        return decoder.logits(h[:, 0])                                              # [rows, vocab]


def greedy_decode(decoder, prompts, n_predict, end_id, batch=16):
    """Greedy continuations of many prompts, up to `batch` of them in each forward pass. prompts: an iterable of
    (KV cache of batch 1 holding a prompt, logits [vocab] after it), read as rows come free. Yields (i, ids) for
    prompt i when it ends, in the order they end; ids stop at end_id (kept) or after n_predict tokens.

    Continuous batching: each row of a BatchCache decodes one sequence; a row whose sequence ends takes the next
    prompt at once, so the batch stays full until the prompts run out (then the rows that ended are dropped
    once they are half of them: a drop copies the cache). Each row computes what it would alone (the same
    tokens as decoding.generate, one prompt at a time, up to float rounding)."""
    todo = enumerate(prompts)
    rows = BatchCache(decoder.cfg, batch, n_predict)
    who = np.full(batch, -1)                                      # [B] the prompt in each row (-1: none left)
    logits = np.zeros((batch, decoder.cfg.vocab_size), np.float32)  # [B, vocab] each row's next-token logits
    tokens = np.zeros(batch, int)                                 # [B] each row's next input
    out = [[] for _ in range(batch)]

    def admit(b):  # the next prompt, if any, into row b
        i, (cache, first) = next(todo, (-1, (None, None)))
        who[b] = i
        if i >= 0:
            rows.put(b, cache)
            logits[b], out[b] = first, []

    for b in range(batch):
        admit(b)
    while True:
        for b in range(len(who)):
            while who[b] >= 0:  # the row's next token; a row that ends yields and takes the next prompt
                t = int(np.argmax(logits[b]))
                out[b].append(t)
                if t != end_id and len(out[b]) < n_predict:
                    tokens[b] = t
                    break
                yield int(who[b]), out[b]
                admit(b)
        live = np.nonzero(who >= 0)[0]
        if len(live) == 0:
            return
        if len(live) <= len(who) // 2:  # no prompts left and half the rows ended: drop those
            rows.pack(live)
            who, logits, tokens, out = who[live], logits[live], tokens[live], [out[b] for b in live]
        runtime.adapt()  # a long evaluation follows the machine's load (runtime.py)
        logits = rows.step(decoder, tokens)


def beam_search(decoder, prompt, logits, beams, n_predict, end_id, alpha=1.0):
    """The continuation of a prompt (its KV cache of batch 1, and the logits [vocab] after it) that beam search
    with `beams` beams finds, ranked by the length-normalized log-probability

        score(y) = log p(y | prompt) / len(y) ** alpha        (len(y) counts the end token)

    alpha = 1: the mean log-probability per token; alpha = 0: the plain sum, which favours short captions. Each
    step ranks every one-token extension of the live beams by summed log p: one that ends (end_id, or n_predict
    tokens) and ranks among the first `beams` is set aside, scored; the best that do not end are the next beams.
    It stops once `beams` have been set aside (transformers' early_stopping=True); one beam is greedy decoding.
    -> ids (ending with end_id if it came)"""
    vocab = decoder.cfg.vocab_size
    rows = BatchCache(decoder.cfg, 1, n_predict)
    rows.put(0, prompt)
    seqs, sums, lp = [[]], np.zeros(1), log_softmax(logits.astype(np.float64))[None]  # live beams; [k]; [k, vocab]
    done = []                                                     # (score, ids) of the candidates that ended
    for step in range(n_predict):
        total = sums[:, None] + lp                                # [k, vocab] sum log p of each extension
        best = np.argsort(-total, axis=None, kind="stable")[:2 * beams]
        parents, nxt = [], []
        for rank, f in enumerate(best):  # an ended one among the `beams` best is set aside; the rest are beams
            b, t = divmod(int(f), vocab)
            ids = seqs[b] + [t]
            if t == end_id or step == n_predict - 1:
                if rank < beams:
                    done.append((total[b, t] / len(ids) ** alpha, ids))
            elif len(parents) < beams:
                parents.append(b)
                nxt.append(ids)
        if len(done) >= beams or not parents:
            break
        if parents != list(range(len(seqs))):
            rows.pack(np.array(parents))                          # each beam's cache: a copy of its parent's
        seqs, sums = nxt, np.array([total[b, s[-1]] for b, s in zip(parents, nxt)])
        lp = log_softmax(rows.step(decoder, np.array([s[-1] for s in seqs])).astype(np.float64))
    return max(done, key=lambda d: d[0])[1]
