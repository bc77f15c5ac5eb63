"""Evaluation: the shared-prefix scoring equals scoring each caption alone; retrieval metrics; batched decoding
gives the tokens of decoding one prompt at a time; beam search; the CLI. (VQA: test_vqa.py.)"""
import json
import subprocess
import sys
from contextlib import contextmanager

import numpy as np
import pytest

from helpers import tiny_llama
from tinyllava.decoding import Sampling, beam_search, generate, greedy_decode, prefill
from tinyllava.evaluate import caption_logprobs, chat_prompts, plain_prompts, retrieval
from tinyllava.llama import KVCache
from tinyllava.ops import log_softmax


def test_shared_prefix_scores_equal_one_sequence_per_caption():
    model = tiny_llama(7)
    rng = np.random.default_rng(0)
    prefix = rng.standard_normal((5, model.cfg.dim))
    caps = [list(rng.integers(0, model.cfg.vocab_size, n)) for n in (1, 4, 2, 6)]
    got, n = caption_logprobs(model, prefix, caps)
    assert n.tolist() == [1, 4, 2, 6]
    for j, c in enumerate(caps):
        x = np.concatenate([prefix, model.embedding[c[:-1]]])[None]
        lp = log_softmax(model.logits(model.forward(x))[0])           # [T, vocab]
        want = lp[np.arange(len(prefix) - 1, x.shape[1]), c].sum()
        assert abs(got[j] - want) < 1e-9 * abs(want), j


def test_retrieval_ranks():
    # image i, caption j; caption 0 is most likely under image 0, caption 1 under image 2 (a miss), ...
    logp = np.array([[-1.0, -9.0, -9.0],
                     [-5.0, -3.0, -9.0],
                     [-5.0, -2.0, -1.0]])
    none = np.array([-1.0, -3.0, -9.5])
    r = retrieval(logp, none)
    assert r["r_at_1"] == 2 / 3       # caption 1 ranks image 2 above its own image 1
    # PMI = logp - none: image 0 -> [0, -6, 0.5] (caption 2 wins: a miss), image 1 -> [-4, 0, 0.5] (a miss),
    # image 2 -> [-4, 1, 8.5] (its own caption wins)
    assert r["i2t_r_at_1"] == 1 / 3
    # seven images: caption 0's own image ranks 6th (five score it higher), caption 1's 5th, the rest 1st
    logp = np.full((7, 7), -9.0)
    np.fill_diagonal(logp, -1.0)
    logp[:6, 0], logp[0, 0] = -0.5, -1.0    # images 1-5 score caption 0 above image 0 (rank 6)
    logp[2:6, 1] = -0.5                     # images 2-5 score caption 1 above image 1 (rank 5)
    r = retrieval(logp, np.full(7, -5.0))
    assert r["r_at_1"] == 5 / 7 and r["r_at_5"] == 6 / 7


def test_cli_json(synthetic_data, tiny_decoder, tmp_path):
    from tinyllava.projector import Projector
    data, cache = synthetic_data
    Projector.init("mlp2x_gelu", 768, 32, seed=0).save(tmp_path / "p.gguf")
    def run(*extra):
        r = subprocess.run([sys.executable, "-m", "tinyllava.evaluate", "--data", str(data), "--limit", "6",
                            "--projector", str(tmp_path / "p.gguf"), "--model", str(tiny_decoder), "--cache",
                            str(cache), "--generate", "2", "--json", *extra], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)
    out = run()
    # the command's numbers are the library's on the same images and captions
    from tinyllava.data import FeatureCache, load_examples
    from tinyllava.evaluate import evaluate
    from tinyllava.model import load_llava
    from tinyllava.weights import vision_path
    examples = load_examples(data)[:6]
    feats = FeatureCache.for_examples(examples, vision_path(), cache=cache)
    want = evaluate(load_llava(tmp_path / "p.gguf", tiny_decoder, tower=False), np.stack([feats[i] for i in range(6)]),
                    [e.captions[0] for e in examples], 0, progress=False)
    for key in ("k", "r_at_1", "r_at_5", "i2t_r_at_1", "loss_image", "loss_shuffled", "loss_none"):
        assert out[key] == pytest.approx(want[key], rel=1e-6), key
    assert len(out["samples"]) == 2
    # the losses alone, from 2K scored captions: the same three numbers (each caption scored in another batch)
    fast = run("--no-retrieval")
    assert "r_at_1" not in fast and fast["samples"] == out["samples"]
    for key in ("loss_image", "loss_shuffled", "loss_none"):
        assert fast[key] == pytest.approx(out[key], rel=1e-5), key


def prompts_and_end(model, lengths=(5, 9, 3, 7, 4, 6, 8, 2), n=12):
    """Prompts of several lengths, their one-at-a-time greedy tokens, and an end id that ends some of them early."""
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((k, model.cfg.dim)).astype(np.float32) for k in lengths]
    free = [list(generate(model, x[None], Sampling(n))) for x in xs]               # no end token
    ends = {t: sum(t in f[:n - 1] for f in free) for f in free for t in f}
    end = max(ends, key=ends.get)                                                   # the one that ends most
    want = [list(generate(model, x[None], Sampling(n), {end})) for x in xs]
    return xs, end, want


def test_batched_greedy_equals_one_prompt_at_a_time():
    model = tiny_llama(3, np.float32, vocab_size=97)
    n = 12
    xs, end, want = prompts_and_end(model, n=n)
    lengths = sorted(map(len, want))
    assert lengths[0] < n and lengths[-1] == n, lengths  # some end early, some run to n_predict
    # batch 3 < 8 prompts: rows are refilled, columns packed when they run out, ended rows dropped at the end
    for batch in (1, 3, 8, 20):
        got = dict(greedy_decode(model, plain_prompts(model, xs), n, end, batch))
        assert [got[i] for i in range(len(xs))] == want, batch


def test_beam_search_one_beam_is_greedy_and_more_beams_score_higher():
    model = tiny_llama(4, np.float32, vocab_size=97)
    n = 10
    xs, end, want = prompts_and_end(model, (4, 6, 3), n)

    def mean_logp(x, ids):  # log p(ids | x) / len(ids), by one plain forward pass
        full = np.concatenate([x, model.embed(np.array(ids[:-1], int))])[None]        # [1, P + len - 1, d]
        lp = log_softmax(model.logits(model.forward(full))[0])
        return sum(lp[len(x) - 1 + j, t] for j, t in enumerate(ids)) / len(ids)
    for x, greedy in zip(xs, want):
        cache = KVCache(model.cfg, 1, len(x))
        first = prefill(model, x[None], cache)
        assert beam_search(model, cache, first, 1, n, end) == greedy
        beams = beam_search(model, cache, first, 4, n, end)        # the prompt's cache is read, not changed
        assert mean_logp(x, beams) >= mean_logp(x, greedy) - 1e-6


def test_chat_prompts_continue_the_shared_image_prefix(tiny_decoder):
    from tinyllava.model import Llava, chat_prompt, load_decoder
    from tinyllava.projector import Projector
    dec, tok = load_decoder(tiny_decoder)
    llava = Llava(dec, tok, projector=Projector.init("mlp2x_gelu", 768, dec.cfg.dim, seed=0))
    rng = np.random.default_rng(0)
    images = [llava.projector.forward(rng.standard_normal((196, 768)).astype(np.float32)) for _ in range(2)]
    questions = [["What is it?", "What colour is the big shape?"], ["Is there a circle?"]]
    got = list(chat_prompts(llava, images, questions))
    assert len(got) == 3
    for (cache, logits), (x, q) in zip(got, [(images[0], q) for q in questions[0]] + [(images[1], questions[1][0])]):
        full, _ = llava.embed(chat_prompt(tok, q, 1, llava.system), [x])           # [1, T, d]: the whole prompt
        assert cache.length == full.shape[1]
        np.testing.assert_allclose(logits, dec.logits(dec.forward(full)[0, -1]), rtol=1e-4, atol=1e-4)
    answers = dict(greedy_decode(dec, chat_prompts(llava, images, questions), 8, tok.eos_id, batch=2))
    assert tok.decode(answers[2]) == tok.decode(llava.complete(
        llava.embed(chat_prompt(tok, questions[1][0], 1, llava.system), [images[1]])[0], Sampling(8))[1])


def test_real_model_batched_captions_equal_one_at_a_time(synthetic_data):
    """The committed projector and SmolLM2 (quantized, fused when numba is there) on two synthetic images."""
    from tinyllava import fused
    from tinyllava.data import FeatureCache, load_examples
    from tinyllava.model import load_llava
    from tinyllava.weights import vision_path
    data, cache_dir = synthetic_data
    examples = load_examples(data)[:2]
    cache = FeatureCache.for_examples(examples, vision_path(), cache=cache_dir)
    llava = load_llava(tower=False, quantized=fused.ENGINE == "numba")
    tokens = [llava.projector.forward(cache[i]) for i in range(2)]
    with one_thread():
        want = [llava.complete(x[None], Sampling(12))[1] for x in tokens]
        got = dict(greedy_decode(llava.decoder, plain_prompts(llava.decoder, tokens), 12, llava.tok.eos_id, batch=2))
    assert [got[0], got[1]] == want


@contextmanager
def one_thread():
    """Each fused product on one thread: the same numbers (rows are independent), and on a busy machine the
    parallel loops of every token would each wait for a descheduled thread."""
    from tinyllava import runtime
    before = runtime.THREADS
    runtime.use_threads(1)
    try:
        yield
    finally:
        runtime.use_threads(before)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "tinyllava.evaluate", *map(str, args)], capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def tiny_projector(tmp_path_factory):
    from tinyllava.projector import Projector
    path = tmp_path_factory.mktemp("projector") / "p.gguf"
    Projector.init("mlp2x_gelu", 768, 32, seed=0).save(path)  # 32: the tiny decoder's width
    return path


def test_cli_captions_json(synthetic_data, tiny_decoder, tiny_projector, tmp_path):
    data, cache = synthetic_data
    args = ("--captions", "--limit", 5, "--batch", 2, "-n", 6, "--projector", tiny_projector, "--model", tiny_decoder,
            "--cache", cache, "--json")
    r = run_cli("--data", data, *args)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for key in ("bleu1", "bleu2", "bleu3", "bleu4", "cider", "rouge_l", "coverage", "chair_i", "n", "seconds", "tokens",
                "samples"):
        assert key in out, key
    assert out["n"] == 5 and len(out["samples"]) == 5
    assert set(out["samples"][0]) == {"image", "generated", "references"}
    # the same images, their human captions now the captions just generated for three of them: the scores are the
    # metrics' on exactly these five pairs (a random model's own captions against the synthetic ones score 0)
    generated = [s["generated"] for s in out["samples"]]
    references = [[g] for g in generated[:3]] + [["A red square on a green background."]] * 2
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"image": s["image"], "captions": refs}) + "\n"
                                                  for s, refs in zip(out["samples"], references)))
    r = run_cli("--data", tmp_path, *args)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    from tinyllava.data import clean_caption
    from tinyllava.metrics import score_captions
    want = score_captions(generated, [[clean_caption(c) for c in refs] for refs in references])
    assert 0 < want["bleu1"] < 1 and want["cider"] > 0
    for key in ("bleu1", "bleu4", "cider", "rouge_l"):
        assert out[key] == pytest.approx(want[key], abs=1e-12), key
    r = run_cli("--data", data, "--captions", "--limit", 3, "--skip", 2, "--beams", 2, "-n", 4, "--prompt",
                "Describe the image.", "--projector", tiny_projector, "--model", tiny_decoder, "--cache", cache)
    assert r.returncode == 0, r.stderr
    assert "3 images, beam search (2 beams)" in r.stdout and "| BLEU-1 |" in r.stdout


def test_cli_perplexity_of_the_decoder_alone(synthetic_data, tiny_decoder):
    """--perplexity: every caption of the images, each alone after <|endoftext|>, through its end token; the number
    is exp of the mean negative log-probability, here from one plain forward pass per caption."""
    from tinyllava.data import load_examples
    from tinyllava.model import load_decoder
    from tinyllava.ops import log_softmax
    data, _ = synthetic_data
    r = run_cli("--perplexity", "--data", data, "--limit", 3, "--skip", 1, "--model", tiny_decoder, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    dec, tok = load_decoder(tiny_decoder)
    nll, n = 0.0, 0
    for caption in [c for e in load_examples(data)[1:4] for c in e.captions]:
        ids = [0] + tok.encode(caption) + [tok.eos_id]
        lp = log_softmax(dec.logits(dec.forward(dec.embed([ids]))[0, :-1]))         # position t predicts t + 1
        nll, n = nll - lp[np.arange(len(ids) - 1), ids[1:]].sum(), n + len(ids) - 1
    assert out["tokens"] == n and out["texts"] == 3 * len(load_examples(data)[0].captions)
    assert out["perplexity"] == pytest.approx(np.exp(nll / n), rel=1e-5)
