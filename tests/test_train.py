"""Stage-1 training: the optimizer, the schedule, checkpoints and exact resume, on a synthetic dataset."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import instructions_in, stage2_projector, steps_logged
from tinyllava.errors import TinyLlavaError
from tinyllava.gguf import GGUFError, GGUFFile
from tinyllava.instruct import SYSTEM
from tinyllava.projector import Projector
from tinyllava.optim import AdamW, lr_at
from tinyllava.train import TrainConfig, load_checkpoint, train


def test_schedule_warms_up_then_decays_to_zero():
    lrs = [lr_at(s, 100, 1e-3, 3) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-3 / 3) and lrs[2] == pytest.approx(1e-3) and max(lrs) == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] < 1e-6


def test_adamw_matches_torch(reference):
    import torch
    rng = np.random.default_rng(0)
    p = {"w": rng.standard_normal((3, 4)).astype(np.float32)}
    tp = torch.tensor(p["w"].copy(), requires_grad=True)
    opt, topt = AdamW(p, weight_decay=0.1), torch.optim.AdamW([tp], lr=1e-2, weight_decay=0.1)
    for step in range(5):
        g = rng.standard_normal((3, 4)).astype(np.float32)
        opt.step(p, {"w": g}, 1e-2)
        tp.grad = torch.tensor(g)
        topt.step()
    np.testing.assert_allclose(p["w"], tp.detach().numpy(), rtol=1e-5, atol=1e-6)


def run_args(data, cache, out, model, **extra):
    return TrainConfig(**{**dict(data=data, cache=cache, out=out, model=model, batch=4, steps=8, checkpoint_every=1,
                                 eval_every=4, dev_images=2, captions=1), **extra})


def test_training_lowers_the_loss(synthetic_data, tiny_decoder, tmp_path):
    data, cache = synthetic_data
    train(run_args(data, cache, tmp_path / "run", tiny_decoder, steps=30, lr=1e-2), log=lambda s: None)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 30 and [r["step"] for r in log] == list(range(30))
    assert np.mean([r["loss"] for r in log[-5:]]) < np.mean([r["loss"] for r in log[:5]]) - 0.3
    proj = Projector.load(tmp_path / "run" / "projector.gguf")
    assert proj.kind == "mlp2x_gelu" and proj.params["w0"].shape == (32, 768)
    # trained in the plain template: no system turn recorded for chat questions to pick up (stage 2 records one)
    assert GGUFFile(tmp_path / "run" / "projector.gguf").get("tinyllava.system") is None


def train_cmd(data, cache, out, model):
    return [sys.executable, "-m", "tinyllava.train", "--data", str(data), "--cache", str(cache), "--out", str(out),
            "--model", str(model), "--batch", "4", "--steps", "100", "--checkpoint-every", "1", "--eval-every", "10",
            "--dev-images", "2", "--captions", "1", "--seed", "3"]


def test_sigkill_at_random_points_then_resume_gives_identical_weights(synthetic_data, tiny_decoder, tmp_path):
    """Kill the training process (SIGKILL) 10 times, each at a random moment after it has made progress; each
    restart resumes from its checkpoint, and the final weights are bit for bit those of an uninterrupted run."""
    data, cache = synthetic_data
    env = dict(os.environ, TINYLLAVA_PROGRESS="0")
    whole = subprocess.run(train_cmd(data, cache, tmp_path / "whole", tiny_decoder), env=env, capture_output=True,
                           text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr
    rng = np.random.default_rng(0)
    run, kills = tmp_path / "killed", 0
    while True:
        before = steps_logged(run)
        p = subprocess.Popen(train_cmd(data, cache, run, tiny_decoder), env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
        if kills < 10:
            deadline = time.time() + 120
            while p.poll() is None and steps_logged(run) <= before and time.time() < deadline:
                time.sleep(0.01)                   # wait until this run has done a step of its own ...
            time.sleep(rng.uniform(0, 0.05))       # ... then kill it somewhere in what follows
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                kills += 1
                p.wait(timeout=60)
                continue
        p.wait(timeout=600)
        assert p.returncode == 0, p.stderr.read().decode()[-2000:]
        break
    assert kills == 10
    a, b = (load_checkpoint(tmp_path / r / "checkpoint.gguf") for r in ("whole", "killed"))
    for k in a[1]:
        assert np.array_equal(a[1][k], b[1][k]) and np.array_equal(a[2][k], b[2][k]), k
    assert (tmp_path / "whole" / "projector.gguf").read_bytes() == (tmp_path / "killed" / "projector.gguf").read_bytes()
    logs = [(tmp_path / r / "log.jsonl").read_text().splitlines() for r in ("whole", "killed")]
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in lines]  # noqa: E731
    assert strip(logs[0]) == strip(logs[1])


def test_corrupt_or_truncated_checkpoint_is_refused(synthetic_data, tiny_decoder, tmp_path):
    data, cache = synthetic_data
    train(run_args(data, cache, tmp_path / "run", tiny_decoder, steps=2), log=lambda s: None)
    ckpt = tmp_path / "run" / "checkpoint.gguf"
    raw = bytearray(ckpt.read_bytes())
    raw[-100] ^= 0x01  # one bit in the tensor data
    ckpt.write_bytes(bytes(raw))
    with pytest.raises(TinyLlavaError, match="checksum"):
        load_checkpoint(ckpt)
    with pytest.raises(TinyLlavaError, match="checksum"):
        train(run_args(data, cache, tmp_path / "run", tiny_decoder, steps=2), log=lambda s: None)
    ckpt.write_bytes(bytes(raw[: len(raw) // 2]))
    with pytest.raises(GGUFError, match="truncated|past the end"):
        load_checkpoint(ckpt)


# -- stage 2 -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def instructions(synthetic_data, tmp_path_factory):
    return instructions_in(synthetic_data, tmp_path_factory.mktemp("instruct"))


def stage2_args(instructions, cache, out, model, **extra):
    return run_args([instructions / "train.json"], cache, out, model, **{
        **dict(stage=2, dev_data=[instructions / "dev.json"], init=stage2_projector(model, out.parent), lora_rank=4),
        **extra})


@pytest.mark.parametrize("full", [False, True])
def test_stage2_training_lowers_the_loss(synthetic_data, instructions, tiny_decoder, tmp_path, full):
    _, cache = synthetic_data
    train(stage2_args(instructions, cache, tmp_path / "run", tiny_decoder, steps=25, lr=1e-2 if not full else 3e-3,
                      full=full), log=lambda s: None)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert np.mean([r["loss"] for r in log[-5:]]) < np.mean([r["loss"] for r in log[:5]]) - 0.3
    weights = tmp_path / "run" / ("decoder.gguf" if full else "adapter.gguf")
    assert GGUFFile(weights).get("tinyllava.system") == SYSTEM  # the system turn it was tuned with, for generate
    if not full:  # a second run goes on from the saved projector and adapter: its first loss is the trained one
        run = tmp_path / "run"
        train(stage2_args(instructions, cache, tmp_path / "again", tiny_decoder, steps=1, lr=1e-9,
                          init=run / "projector.gguf", init_adapter=run / "adapter.gguf"), log=lambda s: None)
        again = json.loads((tmp_path / "again" / "log.jsonl").read_text().splitlines()[0])
        best = min(r["dev_loss"] for r in log if "dev_loss" in r)
        assert again["loss"] < log[0]["loss"] - 0.3 and again["dev_loss"] == pytest.approx(best, abs=2e-3)


@pytest.mark.parametrize("full", [False, True])
def test_stage2_resume_after_sigkill_is_exact(synthetic_data, instructions, tiny_decoder, tmp_path, full):
    _, cache = synthetic_data
    cmd = lambda out: [sys.executable, "-m", "tinyllava.train", "--stage", "2", "--data",  # noqa: E731
                       str(instructions / "train.json"), "--dev-data", str(instructions / "dev.json"),
                       "--cache", str(cache), "--out", str(out), "--model", str(tiny_decoder), "--batch", "2",
                       "--steps", "8", "--checkpoint-every", "1", "--eval-every", "4", "--dev-images", "2",
                       "--init", str(tmp_path / "p.gguf"), "--lora-rank", "2"] + (["--full"] if full else [])
    stage2_projector(tiny_decoder, tmp_path)
    assert subprocess.run(cmd(tmp_path / "whole"), capture_output=True, timeout=600).returncode == 0
    for _ in range(2):
        p = subprocess.Popen(cmd(tmp_path / "killed"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        before, deadline = steps_logged(tmp_path / "killed"), time.time() + 120
        while p.poll() is None and steps_logged(tmp_path / "killed") < before + 2 and time.time() < deadline:
            time.sleep(0.01)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
    r = subprocess.run(cmd(tmp_path / "killed"), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    a, b = (load_checkpoint(tmp_path / r / "checkpoint.gguf") for r in ("whole", "killed"))
    assert a[1].keys() == b[1].keys() and any(k.endswith(".lora_a") or k.startswith("blk.") for k in a[1])
    for k in a[1]:
        assert np.array_equal(a[1][k], b[1][k]) and np.array_equal(a[3][k], b[3][k]), k


def test_stage2_with_stage1_skipped_starts_from_a_new_random_projector(synthetic_data, instructions, tiny_decoder,
                                                                         tmp_path):
    """--init none: the paper's ablation. With a rate too small to move a float32 weight, the saved projector is
    the one Projector.init makes from the run's seed, not the file stage 2 would start from by default."""
    from tinyllava.llama import Llama
    _, cache = synthetic_data
    train(stage2_args(instructions, cache, tmp_path / "run", tiny_decoder, steps=1, lr=1e-30, init="none", seed=3),
          log=lambda s: None)
    saved = Projector.load(tmp_path / "run" / "projector.gguf").params
    fresh = Projector.init("mlp2x_gelu", 768, Llama.load(tiny_decoder).cfg.dim, seed=3).params
    assert all(np.array_equal(saved[k], fresh[k]) for k in fresh)
