"""Train LLaVA's two stages, by hand-written backpropagation.

    python -m tinyllava.train --data data/flickr8k --out runs/mlp                 # stage 1
    python -m tinyllava.train --stage 2 --data data/instruct/flickr8k-train.json \\
                              --data data/instruct/easy-vqa-train.json --out runs/stage2   # stage 2 (LoRA)

Stage 1 (alignment) trains only the projector; the vision tower and the decoder stay frozen. An image and all its
captions make one packed sequence ("plain" template: image tokens, caption, end token), the loss is on the
caption tokens, and the gradient flows back through the 30 decoder blocks into the projector.

Stage 2 (visual instruction tuning) trains the projector and the language model on conversations about images
(LLaVA's instruction JSON; see instruct.py), in the chat template with a system turn, the loss on the
assistant's tokens only. The language model trains through LoRA adapters on its linear layers (the default), or
all of it (--full), with the gradients of its weights written by hand too.

Either way each image's features come from a cache (the vision tower runs once per image); an image and all its
sequences are packed into one (each sees the image and itself only); AdamW with linear warmup and cosine
decay, as LLaVA trains. Every --checkpoint-every steps OUT/checkpoint.gguf is written atomically (the trained
weights, Adam's moments, the step and a checksum); the same command again resumes it exactly. OUT/log.jsonl has
a line per step; OUT/projector.gguf (and OUT/adapter.gguf, or OUT/decoder.gguf with --full) are the weights with
the lowest dev loss seen.
"""
import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import runtime
from .data import Example, FeatureCache
from .errors import TinyLlavaError, cli_errors
from .files import write_atomic
from .gguf import GGUFFile, write_gguf
from .ops import cross_entropy
from .optim import AdamW, clip_grad_norm, lr_at
from .options import add_options, picked
from .projector import KINDS, Projector
from .sequences import caption_ids, collate, conversation_ids, pack


def option(default, help, **more):  # a TrainConfig field: its default, and its --help
    return field(default=default, metadata={"help": help, **more})


@dataclass
class TrainConfig:
    """Everything a run depends on; `python -m tinyllava.train --help` explains each one (options.py)."""
    data: list = field(metadata={"help": "stage 1: a folder with pairs.jsonl, or a LLaVA pretrain JSON (with "
                                         "--images); stage 2: a LLaVA instruction JSON. Repeat to train on several"})
    out: str = field(metadata={"help": "run folder: checkpoint.gguf, log.jsonl, the best weights"})
    stage: int = option(1, "1: the projector alone on captions; 2: projector and language model on conversations",
                        choices=[1, 2])
    images: str = option(None, "image folder of a LLaVA JSON (default: the JSON's own folder in stage 2)")
    projector: str = option("mlp2x_gelu", "the projector's kind", choices=list(KINDS))
    split: str = option("train", "stage 1: pairs.jsonl split to train on ('all' for every line)")
    dev_split: str = option("dev", "split for the dev loss that selects the saved weights")
    dev_images: int = option(100, "dev images evaluated at each --eval-every")
    dev_data: list = option(None, "stage 2: an instruction JSON for the dev loss (repeat)")
    epochs: float = option(1.0, "passes over the training images")
    steps: int = option(None, "total optimizer steps (overrides --epochs)")
    batch: int = option(16, "images per optimizer step (gradient accumulation)")
    micro_batch: int = option(1, "images per forward pass (padded together)")
    captions: int = option(5, "stage 1: captions per image packed into its sequence")
    lr: float = option(None, "peak learning rate (default: stage 1 the projector's, 2e-3 linear or 1e-3 mlp2x_gelu; "
                             "stage 2 2e-4 with LoRA, 2e-5 --full)")
    warmup: float = option(0.03, "warmup fraction of the steps")
    weight_decay: float = option(0.0, "AdamW's decoupled weight decay")
    clip: float = option(1.0, "gradient norm clipping")
    seed: int = option(0, "the order of the images, and new adapters' initial values")
    checkpoint_every: int = option(20, "steps between checkpoints")
    eval_every: int = option(50, "steps between dev losses")
    fresh: bool = option(False, "ignore an existing checkpoint in --out")
    init: str = option(None, "start from this projector GGUF (stage 2 default: weights/projector.gguf; 'none': a "
                             "new random projector, as stage 2 with stage 1 skipped)")
    init_adapter: str = option(None, "stage 2: go on training this LoRA GGUF (with --init, the projector trained "
                                     "with it) instead of new adapters")
    cache: str = option(None, "feature cache folder")
    crop: bool = option(False, "centre-crop images instead of padding them square")
    model: str = option(None, "decoder GGUF (default: the fetched SmolLM2)")
    on_error: str = option("stop", "a malformed data line or unreadable image: stop, or skip it and go on",
                           choices=["stop", "skip"])
    full: bool = option(False, "stage 2: train every weight of the language model, not LoRA")
    lora_rank: int = option(16, "stage 2: rank r of the adapters")
    lora_alpha: float = option(32.0, "stage 2: the adapters' scale is alpha / r")
    lora_targets: str = option("all", "stage 2: matrices to adapt, comma-separated among attn_q, attn_k, attn_v, "
                                      "attn_output, ffn_gate, ffn_up, ffn_down")
    system: str = option(None, "stage 2: the system turn (default: instruct.SYSTEM)")

    def check(self):
        for name in ("batch", "micro_batch", "captions", "checkpoint_every", "eval_every"):
            if getattr(self, name) < 1:
                raise TinyLlavaError(f"--{name.replace('_', '-')} must be at least 1")
        if self.projector not in KINDS:
            raise TinyLlavaError(f"unknown projector {self.projector!r} (choose from {', '.join(KINDS)})")
        if self.stage not in (1, 2):
            raise TinyLlavaError(f"--stage must be 1 or 2, not {self.stage}")
        if self.init_adapter and (self.stage != 2 or self.full):
            raise TinyLlavaError("--init-adapter goes with stage 2's LoRA training (--stage 2, without --full)")
        if self.stage == 2 and not self.full and self.lora_rank < 1:
            raise TinyLlavaError(f"--lora-rank must be at least 1, not {self.lora_rank}")
        self.data = [self.data] if isinstance(self.data, (str, Path)) else list(self.data)
        return self


# -- one step ----------------------------------------------------------------------------------------------
def batch_loss_and_grads(decoder, proj, feats, segments, prefix_ids=(), micro_batch=1, params=None):
    """Summed loss over the images, the number of scored tokens, and the gradients of the projector's
    parameters (named "proj.w0", ...) and of the decoder's trained weights (in `params`; none in stage 1), summed
    in float64 (a gradient with one term, as with one micro-batch, is that term: its float64 value is exact), in
    the order of `params` (the norm sums them in that order: the same in every run).

    feats: list of [196, 768]; segments: one list per image, of what model.pack takes (captions, or (ids,
    targets) conversations); prefix_ids: the text before the image (stage 2: the chat template's system and
    user turn)."""
    names = params or {f"proj.{k}": v for k, v in proj.params.items()}  # the gradients come back in this order
    need_dw = {k for k in names if not k.startswith("proj.")}           # the decoder's weights that train
    total, n_tokens, grads = 0.0, 0, {}
    text = decoder.embed(np.asarray(prefix_ids, int))                              # [T0, d]
    for s in range(0, len(feats), micro_batch):
        f = feats[s:s + micro_batch]
        prefixes = [np.concatenate([text, proj.forward(fi)]) for fi in f]         # [T0 + 196, d] each
        samples = [pack(p, segs) for p, segs in zip(prefixes, segments[s:s + micro_batch])]
        x, positions, mask, at, targets = collate(samples, prefixes, decoder.embed)
        loss, dx, dws = decoder.loss_and_grad(x, at, targets, positions, mask, need_dw)  # dx [B, L, d]
        for b, (fi, (ids, *_)) in enumerate(zip(f, samples)):
            for k, g in proj.backward(dx[b, len(text):len(text) + len(fi)], fi).items():
                accumulate(grads, f"proj.{k}", g)
            if "token_embd.weight" in need_dw:  # the embedding is also the input table: its rows get dx too
                np.add.at(dws["token_embd.weight"], np.asarray(prefix_ids, int), dx[b, :len(text)])
                text_at = np.nonzero(ids >= 0)[0]
                np.add.at(dws["token_embd.weight"], ids[text_at], dx[b, text_at])
        for k in names:
            if k in need_dw:
                accumulate(grads, k, dws[k])
        total += loss
        n_tokens += len(targets)
    return total, n_tokens, {k: grads[k] if k in grads else np.zeros(v.shape) for k, v in names.items()}


def accumulate(grads, k, g):
    """grads[k] += g in float64. A float64 sum of a few float32 terms is exact (unless their sizes lie some 2^25
    apart): it does not depend on the order the images are added in, so several processes (parallel.py) give one
    process's weights exactly. The first term is kept as it came (not added into zeros: for a full fine-tune
    that was 1 GB zeroed and added to, every step); a float64 one is copied, as the next terms go into it."""
    if k not in grads:
        grads[k] = g.copy() if g.dtype == np.float64 else g
    elif grads[k].dtype == np.float64:
        grads[k] += g
    else:
        grads[k] = grads[k].astype(np.float64) + g


def train_step(decoder, proj, opt, params, feats, segments, lr, prefix_ids=(), clip=1.0, micro_batch=1,
               world=None):
    """One optimizer step: each image and its sequences packed into one, the forward pass, the loss on the
    scored tokens, the backward (into the projector, and the decoder's trained weights), AdamW.
    params: {name: array} of everything that trains; with several processes (`world`, see parallel.py) feats and
    segments are this rank's share of the step's images, and the sums are taken over all ranks.
    -> (mean loss per scored token, gradient norm before clipping, scored tokens)"""
    loss, n_tokens, grads = batch_loss_and_grads(decoder, proj, feats, segments, prefix_ids, micro_batch, params)
    if world is not None:
        grads, loss, n_tokens = world.sum(grads, loss, n_tokens)
    grads = {k: np.divide(g, n_tokens, dtype=np.float64).astype(np.float32) for k, g in grads.items()}  # the mean
    grads, norm = clip_grad_norm(grads, clip)
    opt.step(params, grads, lr)
    return loss / n_tokens, norm, n_tokens


def dev_loss(decoder, proj, feats, segments, prefix_ids=(), world=None):
    """Mean loss per scored token on dev images (forward only, each image's sequences packed); with `world`,
    over every rank's share."""
    total, n = 0.0, 0
    text = decoder.embed(np.asarray(prefix_ids, int))
    for f, segs in zip(feats, segments):
        prefix = np.concatenate([text, proj.forward(f)])
        ids, positions, mask, at, targets = pack(prefix, segs)
        x = np.concatenate([prefix, decoder.embed(ids[len(prefix):])])[None]
        h = decoder.forward(x, positions=positions, mask=mask)[0]
        total += cross_entropy(decoder.logits(h[at]), targets)
        n += len(targets)
    if world is not None:
        _, total, n = world.sum({}, total, n)
    return total / n


# -- checkpoints -------------------------------------------------------------------------------------------
def tensors_checksum(tensors):
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(np.ascontiguousarray(tensors[name]).tobytes())
    return h.hexdigest()


def save_checkpoint(path, params, opt, step, state, kind):
    tensors = {f"param.{k}": v for k, v in params.items()}
    tensors |= {f"adam_m.{k}": v for k, v in opt.m.items()} | {f"adam_v.{k}": v for k, v in opt.v.items()}
    meta = {"general.architecture": "tinyllava-checkpoint", "tinyllava.projector": kind,
            "tinyllava.step": step, "tinyllava.adam_t": opt.t, "tinyllava.state": json.dumps(state),
            "tinyllava.checksum": tensors_checksum(tensors)}
    write_gguf(path, meta, tensors)


def load_checkpoint(path):
    """-> (projector kind, params, m, v, step, adam_t, state); refuses a truncated or corrupted file."""
    g = GGUFFile(path)  # a truncated file fails here, with the reason
    tensors = {name: t.numpy() for name, t in g.tensors.items()}
    if g.get("tinyllava.checksum") != tensors_checksum(tensors):
        raise TinyLlavaError(f"{path}: checkpoint is corrupt (checksum mismatch); delete it, or start over "
                             f"with --fresh")
    part = lambda p: {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}  # noqa: E731
    return (g.require("tinyllava.projector"), part("param."), part("adam_m."), part("adam_v."),
            g.require("tinyllava.step"), g.require("tinyllava.adam_t"), json.loads(g.require("tinyllava.state")))


# -- the data ----------------------------------------------------------------------------------------------
@dataclass
class Images:
    """The images of a run, each with the sequences packed after it, and the text before it."""
    paths: list      # image files
    segments: list   # per image: what model.pack takes
    split: list      # per image: "train", "dev" or None
    source: list     # per image: which --data (or --dev-data) it came from
    prefix_ids: list  # the tokens before the image (stage 2: system and user turn)

    def dev(self, split, n):  # the first n images of the split, taken from each source in turn
        by_source = {}
        for i, s in enumerate(self.split):
            if s == split:
                by_source.setdefault(self.source[i], []).append(i)
        turns = [idx[k] for k in range(max(map(len, by_source.values()), default=0)) for idx in by_source.values()
                 if k < len(idx)]
        return turns[:n]


def stage1_images(cfg, tok):
    from .data import load_examples
    examples = [(d, e) for d in cfg.data for e in load_examples(d, cfg.images, on_error=cfg.on_error)]
    return Images([e.image for _, e in examples], [caption_ids(tok, e.captions[:cfg.captions]) for _, e in examples],
                  [e.split for _, e in examples], [str(d) for d, _ in examples], [])


def stage2_images(cfg, tok, system):
    """Conversations of the --data files (train) and --dev-data files (dev), grouped by image."""
    from .instruct import read_conversations
    by_image, prefix = {}, None
    for split, files in (("train", cfg.data), ("dev", cfg.dev_data or [])):
        for path in files:
            for c in read_conversations(path, cfg.images):
                before, ids, targets = conversation_ids(tok, c.turns, system)
                if prefix is not None and before != prefix:
                    raise TinyLlavaError(f"{path}: conversation {c.id!r} starts differently from the others")
                prefix = before
                entry = by_image.setdefault(str(c.image), (split, str(path), []))
                if entry[0] != split:
                    raise TinyLlavaError(f"{c.image}: in both the training and the dev data")
                entry[2].append((ids, targets))
    if not by_image:
        raise TinyLlavaError("no conversations in the stage-2 data")
    paths = list(by_image)
    return Images([Path(p) for p in paths], [by_image[p][2] for p in paths], [by_image[p][0] for p in paths],
                  [by_image[p][1] for p in paths], prefix)


# -- the run -----------------------------------------------------------------------------------------------
def epoch_order(n, seed, epoch):
    return np.random.default_rng([seed, epoch]).permutation(n)


def trainable(cfg, decoder, proj):
    """The run's trained weights as one flat dict {name: array}: the projector's, and in stage 2 the adapters'
    (LoRA, attached to the decoder here) or every decoder weight (--full)."""
    from . import lora
    params = {f"proj.{k}": v for k, v in proj.params.items()}
    if cfg.stage == 2 and cfg.full:
        params |= decoder.named_weights()
    elif cfg.init_adapter:  # go on training an adapter: it keeps its own targets
        lora.load(cfg.init_adapter, decoder)
        for name, m in lora.adapters(decoder).items():
            if m.a.shape[0] != cfg.lora_rank or m.scale != np.float32(cfg.lora_alpha / cfg.lora_rank):
                raise TinyLlavaError(f"{cfg.init_adapter}: rank {m.a.shape[0]} and scale {m.scale:g}, not the run's "
                                     f"--lora-rank {cfg.lora_rank} and --lora-alpha {cfg.lora_alpha:g}")
            m.a, m.b = np.array(m.a, np.float32), np.array(m.b, np.float32)
            params |= {f"{name}.lora_a": m.a, f"{name}.lora_b": m.b}
    elif cfg.stage == 2:
        targets = lora.TARGETS if cfg.lora_targets == "all" else tuple(cfg.lora_targets.split(","))
        params |= lora.attach(decoder, cfg.lora_rank, cfg.lora_alpha, targets, seed=cfg.seed)
    return params


def save_best(cfg, out, decoder, proj, meta):
    from . import lora
    proj.save(out / "projector.gguf", meta)
    if cfg.stage == 2 and cfg.full:
        write_gguf(out / "decoder.gguf", {**decoder.gguf.metadata, **meta},
                   {k: np.ascontiguousarray(v, np.float32) for k, v in decoder.named_weights().items()},
                   types=decoder.gguf.types)
    elif cfg.stage == 2:
        lora.save(out / "adapter.gguf", decoder, cfg.lora_alpha, meta)


def train(cfg, log=print, world=None):
    """Run (or resume) a training run as the TrainConfig says; with `world` (parallel.World), as one of its
    ranks: each takes its share of every step's images, rank 0 writes. -> the projector of the last step"""
    from .instruct import SYSTEM
    from .model import load_decoder, load_tower
    from .parallel import World
    from .weights import default_projector_path, vision_path
    cfg.check()
    world = world or World()
    writer = world.rank == 0
    log = log if writer else (lambda s: None)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    decoder, tok = load_decoder(cfg.model)
    system = cfg.system or SYSTEM
    # what the saved weights record: stage 1 trains in the plain template, with no system turn to carry over
    meta = {"tinyllava.system": system} if cfg.stage == 2 else {}
    data = stage1_images(cfg, tok) if cfg.stage == 1 else stage2_images(cfg, tok, system)
    train_idx = [i for i, s in enumerate(data.split) if cfg.split in (None, "all") or s in (cfg.split, None)]
    dev_idx = data.dev(cfg.dev_split, cfg.dev_images)
    if not train_idx:
        raise TinyLlavaError(f"{', '.join(map(str, cfg.data))}: no training examples in split {cfg.split!r}")
    cache = FeatureCache.for_examples([Example(p, []) for p in data.paths], vision_path(), pad=not cfg.crop,
                                      cache=cfg.cache)
    if not cache.done[train_idx + dev_idx].all():  # every rank fills its share, then all read all of it
        cache.fill(load_tower(), on_error=cfg.on_error, share=(world.rank, world.size))
        world.barrier()
        cache.refresh()
        train_idx = [i for i in train_idx if cache.done[i]]  # what could not be read stays missing (--on-error)
        dev_idx = [i for i in dev_idx if cache.done[i]]

    steps_per_epoch = max(1, len(train_idx) // cfg.batch)
    total = cfg.steps or int(cfg.epochs * steps_per_epoch)
    warmup = max(1, round(cfg.warmup * total))
    lr = cfg.lr or (KINDS[cfg.projector].lr if cfg.stage == 1 else 2e-5 if cfg.full else 2e-4)
    ckpt, log_path = out / "checkpoint.gguf", out / "log.jsonl"

    init = cfg.init or (default_projector_path() if cfg.stage == 2 else None)
    init = None if init == "none" else init           # stage 2 with stage 1 skipped: the paper's ablation
    proj = Projector.load(init) if init else \
        Projector.init(cfg.projector, cache.shape[-1], decoder.cfg.dim, seed=cfg.seed)
    if proj.kind != cfg.projector or proj.d_out != decoder.cfg.dim:
        raise TinyLlavaError(f"{init}: a {proj.kind} projector to {proj.d_out}, not {cfg.projector} to "
                             f"{decoder.cfg.dim}")
    params = trainable(cfg, decoder, proj)
    opt, step = AdamW(params, weight_decay=cfg.weight_decay), 0
    run = {"stage": cfg.stage, "seed": cfg.seed, "total": total, "full": cfg.full, "rank": cfg.lora_rank}
    state = {**run, "best_dev": None, "best_step": None}
    if ckpt.exists() and not cfg.fresh:
        kind, saved, m, v, step, t, state = load_checkpoint(ckpt)
        if kind != cfg.projector or {k: state.get(k) for k in run} != run or set(saved) != set(params):
            raise TinyLlavaError(f"{ckpt}: was made by a different run ({kind}, {({k: state.get(k) for k in run})}); "
                                 f"use --fresh or another --out")
        for k, a in saved.items():
            params[k][...] = a
        opt.m, opt.v, opt.t = m, v, t
        if writer:  # the log keeps what the checkpoint has seen
            lines = log_path.read_text().splitlines() if log_path.exists() else []
            write_atomic(log_path, "".join(ln + "\n" for ln in lines if json.loads(ln)["step"] < step))
        log(f"resuming {ckpt} at step {step}/{total}" + (f" on {world.size} processes" if world.size > 1 else ""))
    else:
        if writer:
            log_path.unlink(missing_ok=True)
        log(f"stage {cfg.stage}: training {'the projector' if cfg.stage == 1 else 'the projector and the decoder'}"
            f" ({sum(v.size for v in params.values()):,} numbers) on {len(train_idx)} images, {total} steps of "
            f"{cfg.batch}")

    from .progress import bar
    progress = bar(total, "train", "step", show=writer, initial=step)
    while step < total:
        runtime.adapt()  # the threads follow the machine's load between steps (runtime.py)
        t0 = time.perf_counter()
        epoch, k = divmod(step * cfg.batch, steps_per_epoch * cfg.batch)
        order = epoch_order(len(train_idx), cfg.seed, epoch)
        batch = [train_idx[j] for j in order[k:k + cfg.batch]]
        mine = world.share(batch)
        rate = lr_at(step, total, lr, warmup)
        loss, norm, n_tokens = train_step(decoder, proj, opt, params, [cache[i] for i in mine],
                                          [data.segments[i] for i in mine], rate, data.prefix_ids, cfg.clip,
                                          cfg.micro_batch, world)
        step += 1
        record = {"step": step - 1, "loss": loss, "lr": rate, "grad_norm": norm, "tokens": n_tokens,
                  "seconds": round(time.perf_counter() - t0, 3)}
        if dev_idx and (step % cfg.eval_every == 0 or step == total):
            mine = world.share(dev_idx)
            record["dev_loss"] = dev_loss(decoder, proj, [cache[i] for i in mine], [data.segments[i] for i in mine],
                                          data.prefix_ids, world)
            if state["best_dev"] is None or record["dev_loss"] < state["best_dev"]:
                state.update(best_dev=record["dev_loss"], best_step=step)
                if writer:
                    save_best(cfg, out, decoder, proj, {"tinyllava.step": step, **meta,
                                                        "tinyllava.dev_loss": record["dev_loss"]})
        if writer:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        progress.set_postfix(loss=f"{record['loss']:.3f}", dev=f"{state['best_dev']:.3f}" if state["best_dev"] else "-")
        progress.update(1)
        if writer and (step % cfg.checkpoint_every == 0 or step == total):
            save_checkpoint(ckpt, params, opt, step, state, cfg.projector)
    progress.close()
    if writer and not dev_idx:
        save_best(cfg, out, decoder, proj, {"tinyllava.step": step, **meta})
    log(f"done: {out}" + (f" (best dev loss {state['best_dev']:.4f} at step {state['best_step']})" if dev_idx else ""))
    return proj


def parser():
    ap = argparse.ArgumentParser(prog="python -m tinyllava.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_options(ap, TrainConfig)


def main(argv=None):
    from .parallel import World
    args = parser().parse_args(argv)
    with cli_errors("tinyllava.train"):
        world = World()
    with world.stop_all_on_error("tinyllava.train"), cli_errors("tinyllava.train"):
        train(TrainConfig(**picked(args, TrainConfig)),
              log=lambda s: print(s, file=sys.stderr), world=world)


if __name__ == "__main__":
    main()
