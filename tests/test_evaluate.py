"""Evaluation: the shared-prefix scoring equals scoring each caption alone; retrieval metrics; the CLI."""
import json
import subprocess
import sys

import numpy as np

from test_backward import tiny_llama
from tinyllava.evaluate import caption_logprobs, retrieval
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
    assert r["r_at_5"] == 1.0
    # PMI = logp - none: image 0 -> [0, -6, 0.5] (caption 2 wins: a miss), image 1 -> [-4, 0, 0.5] (a miss),
    # image 2 -> [-4, 1, 8.5] (its own caption wins)
    assert r["i2t_r_at_1"] == 1 / 3


def test_cli_json(synthetic_data, tiny_decoder, tmp_path):
    from tinyllava.projector import Projector
    data, cache = synthetic_data
    Projector.init("mlp2x_gelu", 768, 32, seed=0).save(tmp_path / "p.gguf")
    r = subprocess.run([sys.executable, "-m", "tinyllava.evaluate", "--data", str(data), "--limit", "6",
                        "--projector", str(tmp_path / "p.gguf"), "--model", str(tiny_decoder), "--cache", str(cache),
                        "--generate", "2", "--json"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for key in ("k", "r_at_1", "r_at_5", "i2t_r_at_1", "loss_image", "loss_shuffled", "loss_none"):
        assert key in out
    assert out["k"] == 6 and 0 <= out["r_at_1"] <= out["r_at_5"] <= 1 and len(out["samples"]) == 2
