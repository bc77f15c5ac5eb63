"""`generate --trace`: every stage of LLaVA inference, printed to stderr as it happens, for a learner to follow.

    image -> preprocessing -> patch embedding -> ViT blocks -> projector -> prompt with the image tokens in
    place -> prefill, block by block -> decode steps, each with its top candidates
"""
import sys
import time

import numpy as np

from .image import open_image, preprocess
from .model import IMAGE
from .ops import softmax


def say(*a):
    print(*a, file=sys.stderr, flush=True)


class BlockClock(list):
    """A list of hidden states that notes when each arrives, so the time of every block can be read off.
    Pass it as a tower's `hidden_states`."""

    def __init__(self):
        super().__init__()
        self.times = [time.perf_counter()]

    def append(self, x):
        self.times.append(time.perf_counter())
        super().append(x)

    def report(self, name):
        dt = np.diff(self.times) * 1000
        rows = [f"{i:3d}:{t:6.1f} ms |h|={np.linalg.norm(h[0, -1]):7.1f}" for i, (t, h) in enumerate(zip(dt, self))]
        for r in range(0, len(rows), 3):
            say("    " + "   ".join(rows[r:r + 3]))
        say(f"  {name}: {len(self)} blocks in {dt.sum():.0f} ms")


def image_tokens(llava, path, pad=True):
    """Preprocess, run the vision tower and the projector on one image, printing each stage. -> [196, d]"""
    tower, cfg = llava.tower, llava.tower.cfg
    img = open_image(path)
    t = time.perf_counter()
    px = preprocess(img, cfg.image_size, pad=pad)
    say(f"\n[1] preprocessing {path}: {img.width}x{img.height} {img.mode} -> "
        f"{'padded square with the mean colour' if pad else 'centre crop'}, bicubic to {cfg.image_size}, "
        f"normalized: [3, {cfg.image_size}, {cfg.image_size}] in [{px.min():.2f}, {px.max():.2f}] "
        f"({(time.perf_counter() - t) * 1000:.0f} ms)")
    t = time.perf_counter()
    x = tower.embed(px[None])
    n = cfg.image_size // cfg.patch_size
    say(f"[2] patch embedding: {n}x{n} patches of {cfg.patch_size}x{cfg.patch_size}x3 -> [{cfg.n_patches}, "
        f"{cfg.dim}], plus the class token and positions, pre-LN: [1, {x.shape[1]}, {cfg.dim}] "
        f"({(time.perf_counter() - t) * 1000:.0f} ms)")
    say(f"[3] vision tower: {cfg.n_layers - 1} of {cfg.n_layers} blocks (LLaVA takes the output of block "
        f"{cfg.n_layers - 1}, hidden state -2)")
    clock = BlockClock()
    x = tower.forward(x, n_layers=cfg.n_layers - 1, hidden_states=clock)
    clock.report("vision tower")
    t = time.perf_counter()
    out = llava.projector.forward(x[0, 1:])
    say(f"[4] projector ({llava.projector.kind}): drop the class token, [{cfg.n_patches}, {cfg.dim}] -> "
        f"[{out.shape[0]}, {out.shape[1]}] image tokens, |token| ~ {np.linalg.norm(out, axis=-1).mean():.2f} "
        f"({(time.perf_counter() - t) * 1000:.0f} ms)")
    return out


def prompt(tok, pieces, n_image_tokens):
    """Show the prompt as the decoder sees it: token by token, each image as one block of tokens."""
    shown = [f"[IMAGE x{n_image_tokens}]" if p == IMAGE else repr(tok.decode([p]))[1:-1] for p in pieces]
    n = sum(n_image_tokens if p == IMAGE else 1 for p in pieces)
    say(f"\n[5] prompt: {n} positions\n    " + " ".join(shown))


def decoding(tok, temp=0.0, k=5):
    """-> the `hidden_states` and `on_step` arguments of Llava.complete that show the prefill block by block,
    then each decode step's top candidates."""
    clock, last = BlockClock(), [0.0]

    def on_step(step, logits):
        now = time.perf_counter()
        if step == 0:
            say("\n[6] prefill of the prompt into the KV cache, block by block:")
            clock.report("decoder")
            say("\n[7] decoding, one token per step:")
            last[0] = clock.times[-1]
        p = softmax(logits.astype(np.float64) / (temp if temp > 0 else 1.0))
        top = np.argsort(-p)[:k]
        cands = "  ".join(f"{tok.decode([int(i)])!r} {p[i]:.2f}" for i in top)
        say(f"  step {step:3d} ({(now - last[0]) * 1000:5.1f} ms): {cands}")
        last[0] = now
    return {"hidden_states": clock, "on_step": on_step}
