"""Stage-1 alignment: train only the projector, the vision tower and the decoder frozen.

    python -m tinyllava.train --data ../shared/data/flickr8k --out runs/mlp

Each image's features come from a cache (the vision tower runs once per image). Each step takes --batch images;
an image and all its captions make one packed sequence ("plain" template: image tokens, caption, end token;
the loss is on the caption tokens); the gradient flows back through the 30 frozen decoder blocks to the image
tokens, then into the projector. AdamW with linear warmup and cosine decay, as LLaVA trains it.

Every --checkpoint-every steps the run writes OUT/checkpoint.gguf atomically (weights, Adam moments, step,
and a checksum); running the same command again resumes from it exactly. OUT/log.jsonl has one line per step;
OUT/projector.gguf is the projector with the lowest dev loss seen.
"""
import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from .errors import TinyLlavaError, cli_errors
from .gguf import GGUFFile, write_gguf
from .model import caption_ids, collate, pack
from .ops import cross_entropy
from .optim import AdamW, clip_grad_norm, lr_at
from .projector import KINDS, Projector


@dataclass
class TrainConfig:
    """Everything a run depends on; `python -m tinyllava.train --help` explains each one."""
    data: str
    out: str
    images: str = None
    projector: str = "mlp2x_gelu"
    split: str = "train"
    dev_split: str = "dev"
    dev_images: int = 100
    epochs: float = 1.0
    steps: int = None
    batch: int = 16
    micro_batch: int = 1
    captions: int = 5
    lr: float = None
    warmup: float = 0.03
    weight_decay: float = 0.0
    clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 20
    eval_every: int = 50
    fresh: bool = False
    init: str = None
    cache: str = None
    crop: bool = False
    model: str = None
    on_error: str = "stop"

    def check(self):
        for name in ("batch", "micro_batch", "captions", "checkpoint_every", "eval_every"):
            if getattr(self, name) < 1:
                raise TinyLlavaError(f"--{name.replace('_', '-')} must be at least 1")
        if self.projector not in KINDS:
            raise TinyLlavaError(f"unknown projector {self.projector!r} (choose from {', '.join(KINDS)})")
        return self


# -- one step ----------------------------------------------------------------------------------------------
def batch_loss_and_grads(decoder, proj, feats, captions, micro_batch=1):
    """Summed caption loss over the images, the number of caption tokens, and the projector's gradients.
    feats: list of [196, 768]; captions: one list of id lists per image."""
    total, n_tokens, grads = 0.0, 0, {k: np.zeros_like(v) for k, v in proj.params.items()}
    for s in range(0, len(feats), micro_batch):
        f = feats[s:s + micro_batch]
        prefixes = [proj.forward(fi) for fi in f]                                  # [196, d] each
        samples = [pack(p, caps) for p, caps in zip(prefixes, captions[s:s + micro_batch])]
        x, positions, mask, at, targets = collate(samples, prefixes, decoder.embed)
        loss, dx, _ = decoder.loss_and_grad(x, at, targets, positions, mask)       # dx [B, L, d]
        for b, fi in enumerate(f):
            for k, g in proj.backward(dx[b, :len(fi)], fi).items():
                grads[k] += g
        total += loss
        n_tokens += len(targets)
    return total, n_tokens, grads


def train_step(decoder, proj, opt, feats, captions, lr, clip=1.0, micro_batch=1):
    """One optimizer step of stage 1: each image and its captions packed into one sequence, the forward pass,
    the loss on the caption tokens, the backward through the frozen decoder into the projector, AdamW.
    -> (mean loss per caption token, gradient norm before clipping, caption tokens)"""
    loss, n_tokens, grads = batch_loss_and_grads(decoder, proj, feats, captions, micro_batch)
    grads, norm = clip_grad_norm({k: g / n_tokens for k, g in grads.items()}, clip)  # mean over caption tokens
    opt.step(proj.params, grads, lr)
    return loss / n_tokens, norm, n_tokens


def dev_loss(decoder, proj, cache, indices, tok, examples):
    """Mean caption loss per token on dev images (forward only, all captions packed per image)."""
    total, n = 0.0, 0
    for i in indices:
        prefix = proj.forward(cache[i])
        ids, positions, mask, at, targets = pack(prefix, caption_ids(tok, examples[i].captions))
        x = np.concatenate([prefix, decoder.embed(ids[len(prefix):])])[None]
        h = decoder.forward(x, positions=positions, mask=mask)[0]
        total += cross_entropy(decoder.logits(h[at]), targets)
        n += len(targets)
    return total / n


# -- checkpoints -------------------------------------------------------------------------------------------
def tensors_checksum(tensors):
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(np.ascontiguousarray(tensors[name]).tobytes())
    return h.hexdigest()


def save_checkpoint(path, proj, opt, step, state):
    tensors = {f"param.{k}": v for k, v in proj.params.items()}
    tensors |= {f"adam_m.{k}": v for k, v in opt.m.items()} | {f"adam_v.{k}": v for k, v in opt.v.items()}
    meta = {"general.architecture": "tinyllava-checkpoint", "tinyllava.projector": proj.kind,
            "tinyllava.step": step, "tinyllava.adam_t": opt.t, "tinyllava.state": json.dumps(state),
            "tinyllava.checksum": tensors_checksum(tensors)}
    write_gguf(path, meta, tensors)


def load_checkpoint(path):
    """-> (kind, params, m, v, step, adam_t, state); refuses a truncated or corrupted file."""
    g = GGUFFile(path)  # a truncated file fails here, with the reason
    tensors = {name: t.numpy() for name, t in g.tensors.items()}
    if g.get("tinyllava.checksum") != tensors_checksum(tensors):
        raise TinyLlavaError(f"{path}: checkpoint is corrupt (checksum mismatch); delete it, or start over "
                             f"with --fresh")
    part = lambda p: {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}  # noqa: E731
    return (g.require("tinyllava.projector"), part("param."), part("adam_m."), part("adam_v."),
            g.require("tinyllava.step"), g.require("tinyllava.adam_t"), json.loads(g.require("tinyllava.state")))


def _write_atomic(path, text):
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# -- the run -----------------------------------------------------------------------------------------------
def epoch_order(n, seed, epoch):
    return np.random.default_rng([seed, epoch]).permutation(n)


def train(cfg, log=print):
    """Run (or resume) a stage-1 training run as the TrainConfig says. -> the projector of the last step"""
    from .data import FeatureCache, load_examples
    from .model import load_decoder
    from .weights import vision_path
    cfg.check()

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    examples = load_examples(cfg.data, cfg.images, on_error=cfg.on_error)       # every split: one cache
    train_idx = [i for i, e in enumerate(examples) if cfg.split in (None, "all") or e.split in (cfg.split, None)]
    dev_idx = [i for i, e in enumerate(examples) if e.split == cfg.dev_split][:cfg.dev_images]
    if not train_idx:
        raise TinyLlavaError(f"{cfg.data}: no training examples in split {cfg.split!r}")
    decoder, tok = load_decoder(cfg.model)
    cache = FeatureCache.for_examples(examples, vision_path(), pad=not cfg.crop, cache=cfg.cache)
    if not cache.done[train_idx + dev_idx].all():
        from .vit import VisionTower
        failed = set(cache.fill(VisionTower.load(vision_path()), on_error=cfg.on_error))
        train_idx = [i for i in train_idx if i not in failed]
        dev_idx = [i for i in dev_idx if i not in failed]

    steps_per_epoch = max(1, len(train_idx) // cfg.batch)
    total = cfg.steps or int(cfg.epochs * steps_per_epoch)
    warmup = max(1, round(cfg.warmup * total))
    lr = cfg.lr or KINDS[cfg.projector].lr
    ckpt, log_path = out / "checkpoint.gguf", out / "log.jsonl"

    if ckpt.exists() and not cfg.fresh:
        kind, params, m, v, step, t, state = load_checkpoint(ckpt)
        if kind != cfg.projector or state["seed"] != cfg.seed or state["total"] != total:
            raise TinyLlavaError(f"{ckpt}: was made by a different run ({kind}, seed {state['seed']}, "
                                 f"{state['total']} steps); use --fresh or another --out")
        proj, opt = Projector(kind, params), AdamW(params, weight_decay=cfg.weight_decay)
        opt.m, opt.v, opt.t = m, v, t
        lines = log_path.read_text().splitlines() if log_path.exists() else []
        _write_atomic(log_path, "".join(ln + "\n" for ln in lines if json.loads(ln)["step"] < step))
        log(f"resuming {ckpt} at step {step}/{total}")
    else:
        proj = Projector.load(cfg.init) if cfg.init else \
            Projector.init(cfg.projector, cache.features.shape[-1], decoder.cfg.dim, seed=cfg.seed)
        if proj.kind != cfg.projector or proj.d_out != decoder.cfg.dim:
            raise TinyLlavaError(f"{cfg.init}: a {proj.kind} projector to {proj.d_out}, not {cfg.projector} to "
                                 f"{decoder.cfg.dim}")
        opt, step = AdamW(proj.params, weight_decay=cfg.weight_decay), 0
        state = {"seed": cfg.seed, "total": total, "best_dev": None, "best_step": None}
        log_path.unlink(missing_ok=True)
        log(f"training a {cfg.projector} projector: {len(train_idx)} images, {total} steps of {cfg.batch}")

    from tqdm import tqdm
    bar = tqdm(total=total, initial=step, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True,
               disable=None)  # None: shown on a terminal only
    while step < total:
        t0 = time.perf_counter()
        epoch, k = divmod(step * cfg.batch, steps_per_epoch * cfg.batch)
        order = epoch_order(len(train_idx), cfg.seed, epoch)
        batch = [train_idx[j] for j in order[k:k + cfg.batch]]
        feats = [cache[i] for i in batch]
        caps = [caption_ids(tok, examples[i].captions[:cfg.captions]) for i in batch]
        rate = lr_at(step, total, lr, warmup)
        loss, norm, n_tokens = train_step(decoder, proj, opt, feats, caps, rate, cfg.clip, cfg.micro_batch)
        step += 1
        record = {"step": step - 1, "loss": loss, "lr": rate, "grad_norm": norm, "tokens": n_tokens,
                  "seconds": round(time.perf_counter() - t0, 3)}
        if dev_idx and (step % cfg.eval_every == 0 or step == total):
            record["dev_loss"] = dev_loss(decoder, proj, cache, dev_idx, tok, examples)
            if state["best_dev"] is None or record["dev_loss"] < state["best_dev"]:
                state.update(best_dev=record["dev_loss"], best_step=step)
                proj.save(out / "projector.gguf", {"tinyllava.step": step, "tinyllava.dev_loss": record["dev_loss"]})
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        bar.set_postfix(loss=f"{record['loss']:.3f}", dev=f"{state['best_dev']:.3f}" if state["best_dev"] else "-")
        bar.update(1)
        if step % cfg.checkpoint_every == 0 or step == total:
            save_checkpoint(ckpt, proj, opt, step, state)
    bar.close()
    if not dev_idx:
        proj.save(out / "projector.gguf", {"tinyllava.step": step})
    log(f"done: {out / 'projector.gguf'}" + (f" (best dev loss {state['best_dev']:.4f} at step "
                                              f"{state['best_step']})" if dev_idx else ""))
    return proj


def parser():
    ap = argparse.ArgumentParser(prog="python -m tinyllava.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="folder with pairs.jsonl, or a LLaVA pretrain JSON (with --images)")
    ap.add_argument("--images", help="image folder of a LLaVA pretrain JSON")
    ap.add_argument("--out", required=True, help="run folder: checkpoint.gguf, log.jsonl, projector.gguf")
    ap.add_argument("--projector", choices=list(KINDS), default="mlp2x_gelu")
    ap.add_argument("--split", default="train", help="pairs.jsonl split to train on ('all' for every line)")
    ap.add_argument("--dev-split", default="dev", help="split for the dev loss that selects the saved projector")
    ap.add_argument("--dev-images", type=int, default=100, help="dev images evaluated at each --eval-every")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--steps", type=int, help="total optimizer steps (overrides --epochs)")
    ap.add_argument("--batch", type=int, default=16, help="images per optimizer step (gradient accumulation)")
    ap.add_argument("--micro-batch", type=int, default=1, help="images per forward pass (padded together)")
    ap.add_argument("--captions", type=int, default=5, help="captions per image packed into its sequence")
    ap.add_argument("--lr", type=float, help="peak learning rate (default 2e-3 linear, 1e-3 mlp2x_gelu)")
    ap.add_argument("--warmup", type=float, default=0.03, help="warmup fraction of the steps")
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoint-every", type=int, default=20)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint in --out")
    ap.add_argument("--init", help="start from this projector GGUF instead of random weights (a further epoch)")
    ap.add_argument("--cache", help="feature cache folder")
    ap.add_argument("--crop", action="store_true", help="centre-crop images instead of padding them square")
    ap.add_argument("--model", help="decoder GGUF (default: the fetched SmolLM2)")
    ap.add_argument("--on-error", choices=["stop", "skip"], default="stop",
                    help="a malformed data line or unreadable image: stop, or skip it and go on")
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    with cli_errors("tinyllava.train"):
        train(TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)}),
              log=lambda s: print(s, file=sys.stderr))


if __name__ == "__main__":
    main()
