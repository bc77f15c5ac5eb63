"""The decoder, block by block against transformers' LlamaForCausalLM on the same dequantized weights.

Tolerance: both sides compute in float32 from identical weights, so they differ only by summation order.
We bound the error of each block's output by 1e-5 x that block's largest |activation| (SmolLM2 carries a few
activations of ~25,000 from block 11 on, so an absolute bound would be meaningless); measured: <= 2.3e-6. Those
few huge activations (at the first position) also set that scale for every other position, where a wrong
weight could hide below it: so each position is also held to 2e-5 x its own RMS (measured: <= 2e-6; a change of
0.01 in one weight of block 5 gives 3e-5).
"""
import numpy as np

from helpers import DECODER_PROMPT, load_npz
from tinyllava.llama import KVCache

REL_TOL = 1e-5


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def check_blocks(model, ids, hidden_ref, logits_ref):
    hidden = []
    h = model.forward(model.embed([ids]), hidden_states=hidden)
    for i, (a, b) in enumerate(zip(hidden, hidden_ref)):
        assert rel_err(a[0], b) < REL_TOL, f"block {i}: {rel_err(a[0], b):.2e}"
        per_position = np.sqrt(((a[0] - b) ** 2).mean(-1) / (b ** 2).mean(-1))   # [T]
        assert per_position.max() < 2e-5, f"block {i}, position {per_position.argmax()}: {per_position.max():.2e}"
    logits = model.logits(h[0])
    assert rel_err(logits[-len(logits_ref):], logits_ref) < REL_TOL
    return logits


def test_every_block_matches_saved_reference(decoder):
    model, tok = decoder
    ref = load_npz("decoder.npz")
    assert tok.encode(tok.chat(DECODER_PROMPT)) == ref["ids"].tolist()
    assert len(ref["hidden"]) == model.cfg.n_layers
    check_blocks(model, ref["ids"].tolist(), ref["hidden"], ref["logits_last"])


def test_every_block_matches_live_reference(decoder, reference):
    model, tok = decoder
    ids = tok.encode(tok.chat([{"role": "user", "content": "Tell me about the moon and its 4 phases."}]))
    hidden, logits = reference.decoder_activations(ids)
    ours = check_blocks(model, ids, hidden, logits)
    assert np.array_equal(ours.argmax(-1), logits.argmax(-1))


def test_kv_cache_decoding_equals_full_recomputation(decoder):
    model, tok = decoder
    ids = tok.encode(tok.chat([{"role": "user", "content": "Count to five."}]))
    full = model.logits(model.forward(model.embed([ids])))[0]              # [T, vocab]
    cache = KVCache(model.cfg, 1, len(ids))
    steps = [model.logits(model.forward(model.embed([ids[:10]]), cache))[0]]
    for t in ids[10:]:
        steps.append(model.logits(model.forward(model.embed([[t]]), cache))[0])
    assert cache.length == len(ids)
    np.testing.assert_allclose(np.concatenate(steps), full, atol=2e-4, rtol=0)


def test_padded_batch_equals_each_sequence_alone(decoder):
    model, tok = decoder
    a, b = tok.encode("A short one."), tok.encode("A somewhat longer sentence than the first.")
    T = max(len(a), len(b))
    ids = np.zeros((2, T), np.int64)
    valid = np.zeros((2, T), bool)
    for i, s in enumerate((a, b)):
        ids[i, :len(s)], valid[i, :len(s)] = s, True
    batch = model.forward(model.embed(ids), valid=valid)
    for i, s in enumerate((a, b)):
        alone = model.forward(model.embed([s]))[0]
        np.testing.assert_allclose(batch[i, :len(s)], alone, atol=1e-3 * np.abs(alone).max())

