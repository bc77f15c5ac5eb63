"""Benchmark the stage-1 training step: tinyllava's hand-written backward against torch autograd.

    python -m tinyllava.bench_train [--threads N] [--json]

The same step on both sides, with the same weights: 196 image features -> mlp2x_gelu projector -> one image
caption sequence through the frozen SmolLM2 (float32) -> cross-entropy on the caption -> gradient back
through all 30 blocks into the projector's weights. torch runs transformers' LlamaForCausalLM (loaded from the
same GGUF) with autograd, weights frozen. tinyllava also runs its packed form, one image with 5 captions in one
sequence, which is how `python -m tinyllava.train` trains. Each engine runs in its own process with the same
thread count; figures are captions (samples) per second, median of --reps.
"""
import argparse
import json
import os
import subprocess
import sys

CAPTIONS = ["A brown dog runs through the tall green grass.", "A dog is running in a field.",
            "A puppy plays outside on a sunny day.", "The dog jumps over the grass near some trees.",
            "A small dog runs toward the camera."]


def median_seconds(fn, reps):
    from .bench import median_time
    fn()  # warm up
    return median_time(fn, reps)


def run_tinyllava(reps):
    import numpy as np

    from .model import load_decoder, pack
    from .projector import Projector
    dec, tok = load_decoder()
    proj = Projector.init("mlp2x_gelu")
    feats = np.random.default_rng(0).standard_normal((196, 768)).astype(np.float32)
    caps = [tok.encode(c) + [tok.eos_id] for c in CAPTIONS]

    def one():  # [image | caption 1]: one sample
        prefix = proj.forward(feats)
        x = np.concatenate([prefix, dec.embed(caps[0][:-1])])[None]
        _, dx, _ = dec.loss_and_grad(x, np.arange(195, x.shape[1]), np.array(caps[0]))
        proj.backward(dx[0, :196], feats)

    def packed():  # [image | 5 captions]: five samples
        prefix = proj.forward(feats)
        ids, pos, mask, at, targets = pack(prefix, caps)
        x = np.concatenate([prefix, dec.embed(ids[196:])])[None]
        _, dx, _ = dec.loss_and_grad(x, at, targets, pos, mask)
        proj.backward(dx[0, :196], feats)

    return {"samples_s": 1 / median_seconds(one, reps), "packed_samples_s": 5 / median_seconds(packed, reps)}


def run_torch(reps, threads):
    import torch

    from .reference import llama_causal_lm
    from .tokenizer import Tokenizer
    from .weights import decoder_path
    torch.set_num_threads(threads)
    tok = Tokenizer.load(decoder_path())
    model = llama_causal_lm(decoder_path())
    model.requires_grad_(False)
    proj = torch.nn.Sequential(torch.nn.Linear(768, 576), torch.nn.GELU(approximate="tanh"), torch.nn.Linear(576, 576))
    feats = torch.randn(196, 768)
    cap = tok.encode(CAPTIONS[0]) + [tok.eos_id]
    emb = model.get_input_embeddings()(torch.tensor(cap[:-1]))

    def one():
        proj.zero_grad()
        x = torch.cat([proj(feats), emb])[None]
        logits = model(inputs_embeds=x).logits[0, 195:]
        torch.nn.functional.cross_entropy(logits, torch.tensor(cap), reduction="sum").backward()

    return {"samples_s": 1 / median_seconds(one, reps)}


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
        print(json.dumps({"threads": args.threads, **results}))
        return
    t, th = results["tinyllava"], results["torch"]
    cell = lambda r, k: f"{r[k]:.2f}" if k in r else r.get("error", "n/a")  # noqa: E731
    print(f"| training step ({args.threads} threads), samples/s | tinyllava (hand-written backward) | "
          f"torch autograd |\n|---|---|---|")
    print(f"| one caption per sequence | {cell(t, 'samples_s')} | {cell(th, 'samples_s')} |")
    print(f"| 5 captions packed per image | {cell(t, 'packed_samples_s')} | n/a |")
    if "samples_s" in t and "samples_s" in th:
        print(f"\ntinyllava / torch, same step: {t['samples_s'] / th['samples_s']:.2f}x")


if __name__ == "__main__":
    main()
