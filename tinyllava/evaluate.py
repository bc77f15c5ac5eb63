"""Does the projector make SmolLM2 see? Measured on held-out image-caption pairs.

    python -m tinyllava.evaluate --data ../shared/data/flickr8k --split dev --limit 100 [--json]

- caption loss per token given the true image, a shuffled (wrong) image, and no image at all
- retrieval among K images and their first captions, from log p(caption | image) for all K x K pairs:
    caption -> image: rank the K images by the caption's likelihood (R@1, R@5; chance 1/K)
    image -> caption: rank the K captions by pointwise mutual information,
                      log p(caption | image) - log p(caption | no image)
  Each image's 196-token prefix is computed once into a KV cache that all K captions read, as one batch.
- greedy captions for a few images, next to a human one
"""
import argparse
import json
import sys

import numpy as np

from .errors import TinyLlavaError, cli_errors
from .llama import KVCache
from .model import caption_ids
from .ops import log_softmax


def caption_logprobs(decoder, prefix, captions):
    """log p(caption | prefix) for every caption, sharing the prefix's KV cache.
    prefix [P, d]; captions: list of id lists (each ending with the end token). -> (sum log p [K], tokens [K])"""
    cfg = decoder.cfg
    cache = KVCache(cfg, 1, len(prefix), prefix.dtype)
    h_last = decoder.forward(prefix[None], cache)[0, -1]                          # [d]
    first = log_softmax(decoder.logits(h_last))                                   # [vocab]: p(caption[0])
    K, L = len(captions), max(len(c) for c in captions) - 1
    ids = np.zeros((K, max(L, 1)), int)
    valid = np.zeros((K, cache.length + ids.shape[1]), bool)
    valid[:, :cache.length] = True
    for j, c in enumerate(captions):
        ids[j, :len(c) - 1] = c[:-1]                                              # inputs: all but the last
        valid[j, cache.length:cache.length + len(c) - 1] = True
    h = decoder.forward(decoder.embed(ids), cache, valid=valid)                   # [K, L, d]
    out = np.array([first[c[0]] for c in captions], np.float64)
    for j, c in enumerate(captions):
        if len(c) > 1:
            lp = log_softmax(decoder.logits(h[j, :len(c) - 1]))                   # [len-1, vocab]
            out[j] += lp[np.arange(len(c) - 1), c[1:]].sum()
    return out, np.array([len(c) for c in captions])


def retrieval(logp, logp_none):
    """logp [K images, K captions] = log p(caption j | image i); logp_none [K]. Caption i belongs to image i."""
    K = len(logp)
    truth = logp[np.arange(K), np.arange(K)]
    c2i_rank = (logp > truth[None, :]).sum(axis=0)               # per caption: images scoring higher
    pmi = logp - logp_none[None, :]
    i2t_rank = (pmi > np.diag(pmi)[:, None]).sum(axis=1)         # per image: captions scoring higher
    return {"r_at_1": float(np.mean(c2i_rank < 1)), "r_at_5": float(np.mean(c2i_rank < 5)),
            "i2t_r_at_1": float(np.mean(i2t_rank < 1)), "i2t_r_at_5": float(np.mean(i2t_rank < 5)),
            "i2t_r_at_1_raw_likelihood": float(np.mean((logp > truth[:, None]).sum(axis=1) < 1))}


def evaluate(llava, features, captions, n_generate=5, images=None, progress=True):
    """features: [K, 196, 768] of K images; captions: their reference captions (caption i of image i)."""
    from tqdm import tqdm

    from .decoding import Sampling
    tok, dec = llava.tok, llava.decoder
    ids = caption_ids(tok, captions)
    K = len(ids)
    tokens = np.array([len(c) for c in ids])
    logp = np.zeros((K, K))
    for i in tqdm(range(K), desc="K x K scores", file=sys.stderr, disable=None if progress else True,
                  dynamic_ncols=True):
        logp[i], _ = caption_logprobs(dec, llava.projector.forward(features[i]), ids)
    none, _ = caption_logprobs(dec, dec.embed([0]), ids)                          # prefix: <|endoftext|>
    shuffled = logp[(np.arange(K) + 1) % K, np.arange(K)]                         # each caption, the next image
    result = {"k": K, "chance": 1 / K, **retrieval(logp, none),
              "loss_image": float(-np.diag(logp).sum() / tokens.sum()),
              "loss_shuffled": float(-shuffled.sum() / tokens.sum()),
              "loss_none": float(-none.sum() / tokens.sum()), "samples": []}
    for i in range(min(n_generate, K)):
        result["samples"].append({"image": str(images[i]) if images is not None else i, "reference": captions[i],
                                  "generated": llava.caption(llava.projector.forward(features[i]), Sampling(40))})
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tinyllava.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="folder with pairs.jsonl (any folder in that format)")
    ap.add_argument("--split", default=None, help="only this split (e.g. dev); default: every line")
    ap.add_argument("--limit", type=int, default=100, help="K: how many images (and captions) to score")
    ap.add_argument("--skip", type=int, default=0,
                    help="start after this many images (train picks its best checkpoint on the first 100 dev images)")
    ap.add_argument("--projector", help="projector GGUF (default: the committed weights/projector.gguf)")
    ap.add_argument("--model", help="decoder GGUF (default: the fetched SmolLM2)")
    ap.add_argument("--generate", type=int, default=5, help="greedy captions to write for the first N images")
    ap.add_argument("--cache", help="feature cache folder (default: computed and cached as train does)")
    ap.add_argument("--crop", action="store_true", help="centre-crop images instead of padding them square")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a report")
    ap.add_argument("--on-error", choices=["stop", "skip"], default="stop")
    args = ap.parse_args(argv)
    with cli_errors("tinyllava.evaluate"):
        if args.limit < 2:
            raise TinyLlavaError("--limit must be at least 2")
        if args.skip < 0:
            raise TinyLlavaError("--skip must not be negative")
        from .data import FeatureCache, load_examples
        from .model import load_llava
        from .vit import VisionTower
        from .weights import vision_path
        examples = load_examples(args.data, split=args.split, on_error=args.on_error)[args.skip:args.skip + args.limit]
        if len(examples) < 2:
            raise TinyLlavaError(f"{args.data}: fewer than 2 images to score after --skip {args.skip}")
        llava = load_llava(projector=args.projector, decoder=args.model, tower=False)
        cache = FeatureCache.for_examples(examples, vision_path(), pad=not args.crop, cache=args.cache)
        cache.fill(VisionTower.load(vision_path()))
        r = evaluate(llava, np.stack([cache[i] for i in range(len(examples))]),
                     [e.captions[0] for e in examples], args.generate, [e.image for e in examples],
                     progress=not args.json)
        if args.json:
            print(json.dumps(r))
            return
        print(f"K = {r['k']} held-out images (chance R@1 = {r['chance']:.3f})")
        print(f"caption loss/token: true image {r['loss_image']:.3f}, shuffled image {r['loss_shuffled']:.3f}, "
              f"no image {r['loss_none']:.3f}")
        print(f"caption -> image: R@1 {r['r_at_1']:.3f}, R@5 {r['r_at_5']:.3f}")
        print(f"image -> caption by PMI: R@1 {r['i2t_r_at_1']:.3f}, R@5 {r['i2t_r_at_5']:.3f} "
              f"(raw likelihood R@1 {r['i2t_r_at_1_raw_likelihood']:.3f})")
        for s in r["samples"]:
            print(f"\n{s['image']}\n  generated: {s['generated']}\n  reference: {s['reference']}")


if __name__ == "__main__":
    main()
