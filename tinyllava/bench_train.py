"""Benchmark a training step: tinyllava's hand-written backward against torch autograd, like for like.

    python -m tinyllava.bench_train [--threads N] [--reps 5] [--json]

The same step on both sides, with the same weights: 196 image features -> mlp2x_gelu projector -> one image and
caption sequence through SmolLM2 (float32) -> cross-entropy on the caption -> the gradients back through all 30
blocks. Three steps, as the three kinds of training train them:

    stage 1      the projector's gradients; the decoder frozen
    stage 2 LoRA the projector's and rank-16 adapters' on every linear of every block (lora.py; torch: the same
                 W + (alpha/r) B A written as a module around each frozen nn.Linear)
    stage 2 full the projector's and every decoder weight's

torch runs transformers' LlamaForCausalLM loaded from the same GGUF. tinyllava also runs stage 1 in its packed
form (one image with 5 captions in one sequence, as `python -m tinyllava.train` trains). Each engine runs in
its own process with the same thread count; figures are captions (samples) per second, median of --reps.
"""
import argparse
import json
import os
import subprocess
import sys

CAPTIONS = ["A brown dog runs through the tall green grass.", "A dog is running in a field.",
            "A puppy plays outside on a sunny day.", "The dog jumps over the grass near some trees.",
            "A small dog runs toward the camera."]
MODES = ("stage1", "lora", "full")
RANK, ALPHA = 16, 32.0


def median_seconds(fn, reps):
    from .bench import median_time
    fn()  # warm up
    return median_time(fn, reps)


def run_tinyllava(reps):
    import numpy as np

    from . import lora
    from .model import load_decoder
    from .projector import Projector
    from .train import batch_loss_and_grads
    out = {}
    for mode in MODES:
        dec, tok = load_decoder()
        proj = Projector.init("mlp2x_gelu")
        params = {f"proj.{k}": v for k, v in proj.params.items()}
        if mode == "lora":
            params |= lora.attach(dec, RANK, ALPHA)
        elif mode == "full":
            params |= dec.named_weights()
        feats = [np.random.default_rng(0).standard_normal((196, 768)).astype(np.float32)]
        caps = [tok.encode(c) + [tok.eos_id] for c in CAPTIONS]
        out[f"{mode}_samples_s"] = 1 / median_seconds(
            lambda: batch_loss_and_grads(dec, proj, feats, [caps[:1]], params=params), reps)
        if mode == "stage1":
            out["stage1_packed_samples_s"] = 5 / median_seconds(
                lambda: batch_loss_and_grads(dec, proj, feats, [caps], params=params), reps)
    return out


def run_torch(reps, threads):
    import torch

    from .reference import llama_causal_lm
    from .tokenizer import Tokenizer
    from .weights import decoder_path
    torch.set_num_threads(threads)
    tok = Tokenizer.load(decoder_path())
    cap = tok.encode(CAPTIONS[0]) + [tok.eos_id]
    out = {}

    class LoRALinear(torch.nn.Module):  # W x + (alpha/r) B A x, W frozen
        def __init__(self, base):
            super().__init__()
            self.base = base
            self.a = torch.nn.Parameter(torch.randn(RANK, base.in_features) / base.in_features ** 0.5)
            self.b = torch.nn.Parameter(torch.zeros(base.out_features, RANK))

        def forward(self, x):
            return self.base(x) + (ALPHA / RANK) * ((x @ self.a.T) @ self.b.T)

    for mode in MODES:
        model = llama_causal_lm(decoder_path())
        model.requires_grad_(mode == "full")
        if mode == "lora":
            for layer in model.model.layers:
                for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                                      (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
                    for name in names:
                        setattr(parent, name, LoRALinear(getattr(parent, name)))
        proj = torch.nn.Sequential(torch.nn.Linear(768, 576), torch.nn.GELU(approximate="tanh"),
                                   torch.nn.Linear(576, 576))
        feats = torch.randn(196, 768)
        ids = torch.tensor(cap[:-1])

        def one():
            model.zero_grad(set_to_none=True)
            proj.zero_grad(set_to_none=True)
            x = torch.cat([proj(feats), model.get_input_embeddings()(ids)])[None]
            logits = model(inputs_embeds=x).logits[0, 195:]
            torch.nn.functional.cross_entropy(logits, torch.tensor(cap), reduction="sum").backward()

        out[f"{mode}_samples_s"] = 1 / median_seconds(one, reps)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tinyllava.bench_train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--worker", choices=["tinyllava", "torch"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        out = run_tinyllava(args.reps) if args.worker == "tinyllava" else run_torch(args.reps, args.threads)
        print(json.dumps(out))
        return
    env = dict(os.environ, **{v: str(args.threads) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                              "MKL_NUM_THREADS")})
    results = {}
    for engine in ("tinyllava", "torch"):
        print(f"bench_train: {engine} ...", file=sys.stderr, flush=True)
        p = subprocess.run([sys.executable, "-m", "tinyllava.bench_train", "--worker", engine, "--threads",
                            str(args.threads), "--reps", str(args.reps)], env=env, capture_output=True, text=True)
        lines = (p.stdout.strip() or p.stderr.strip() or "no output").splitlines()
        results[engine] = json.loads(lines[-1]) if p.returncode == 0 else {"error": lines[-1][:150]}
    if args.json:
        print(json.dumps({"threads": args.threads, "load": os.getloadavg(), **results}))
        return
    t, th = results["tinyllava"], results["torch"]
    cell = lambda r, k: f"{r[k]:.2f}" if k in r else r.get("error", "n/a")  # noqa: E731
    print(f"training step, {args.threads} threads (load average {os.getloadavg()[0]:.1f}), samples/s:\n")
    print("| step | tinyllava (hand-written backward) | torch autograd | ratio |\n|---|---|---|---|")
    for mode, name in zip(MODES, ("stage 1 (projector)", "stage 2 LoRA r=16", "stage 2 full")):
        k = f"{mode}_samples_s"
        ratio = f"{t[k] / th[k]:.2f}x" if k in t and k in th else ""
        print(f"| {name} | {cell(t, k)} | {cell(th, k)} | {ratio} |")
    print(f"| stage 1, 5 captions packed per image | {cell(t, 'stage1_packed_samples_s')} | n/a | |")


if __name__ == "__main__":
    main()
