"""Does the projector make SmolLM2 see? Measured on held-out images, three ways.

    python -m tinyllava.evaluate --data data/flickr8k --split dev --limit 100 [--json]
    python -m tinyllava.evaluate --data data/flickr8k --split dev --limit 100 --captions [--json]
    python -m tinyllava.evaluate --vqa questions.json [--images DIR] [--limit N] [--json]
    python -m tinyllava.evaluate --perplexity --data data/flickr8k --split test --limit 1000 [--model FILE] [--json]

Loss and retrieval (the default), from log p(caption | image) of the first captions of K images:
- caption loss per token given the true image, a shuffled (wrong) image, and no image at all
- retrieval among the K images and their first captions, from all K x K pairs:
    caption -> image: rank the K images by the caption's likelihood (R@1, R@5; chance 1/K)
    image -> caption: rank the K captions by pointwise mutual information,
                      log p(caption | image) - log p(caption | no image)
  Each image's 196-token prefix is computed once into a KV cache that all K captions read, as one batch.
  --no-retrieval: the three losses alone, from 2K captions instead of K x K (a large dev set in minutes)
- greedy captions for a few images, next to a human one

--captions: a greedy caption of each image (the plain template, as stage 1 trained it; with --prompt TEXT the
chat answer to TEXT instead), scored against all the image's human captions by BLEU-1..4, CIDEr-D and ROUGE-L
(metrics.py, the COCO caption evaluation's numbers), and by the objects it names (coverage of the objects two
captions agree on, CHAIR hallucination: metrics.description_scores). --beams K: beam search instead of greedy.
Detailed descriptions: --captions --prompt "Describe this image in detail." -n 120.

--perplexity: the decoder alone (no image) on every human caption of the --limit images, each caption its own
text after <|endoftext|>: exp of the mean negative log-probability of its tokens and the end token. A measure of
the language model's weights (the float32 path, whatever the file's types), e.g. of a --model quantized again.

--vqa FILE: the chat answer to each question about its image, scored by exact match after VQA's answer
normalization; yes/no questions also by POPE's accuracy, precision, recall, F1 and yes-ratio; questions about
the text of a sign by the words read (`instruct signs`). FILE is
  - LLaVA's conversation format, a JSON list or JSON lines of
      {"id", "image", "conversations": [{"from": "human", "value": "<image>\\nQUESTION"}, {"from": "gpt", ...}]}
    (the first exchange is used; image paths start from --images, default the file's folder), or
  - easy-VQA's questions.json, a list of [question, answer, image_id], the images in images/<image_id>.png
    beside it (or in --images); answers are then also counted by kind: shape, colour, yes/no.

The vision tower runs once per image into the feature cache (data.FeatureCache). The decoder keeps its quantized
weights (fused.py) when numba is there. Captions and answers decode `--batch` sequences in one forward pass, each
row its own sequence (continuous batching: greedy_decode, BatchCache): the same tokens as one at a time. A prompt
is read once (196 image tokens: most of the time per image); an image's questions share the KV cache of their
prompt up to and including the image tokens.
"""
import argparse
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .decoding import beam_search, greedy_decode, prefill
from .errors import TinyLlavaError, cli_errors
from .llama import KVCache
from .model import IMAGE, chat_prompt
from .ops import log_softmax
from .progress import bar
from .sequences import caption_ids


# -- loss and retrieval ------------------------------------------------------------------------------------
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


def perplexity(decoder, tok, texts, batch=64):  # -> (exp(mean -log p per token), tokens scored)
    """Each text alone after <|endoftext|>, scored through its end token: caption_logprobs with that prefix."""
    ids, prefix = caption_ids(tok, texts), decoder.embed([0])                # 0: <|endoftext|>
    logp = np.concatenate([caption_logprobs(decoder, prefix, ids[i:i + batch])[0] for i in range(0, len(ids), batch)])
    tokens = sum(map(len, ids))
    return float(np.exp(-logp.sum() / tokens)), tokens


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


def evaluate(llava, features, captions, n_generate=5, images=None, progress=True, retrieve=True):
    """features: [K, 196, 768] of K images; captions: their reference captions (caption i of image i).
    retrieve=False scores only what the losses need: each image's own caption and the previous image's."""
    from .decoding import Sampling
    tok, dec = llava.tok, llava.decoder
    ids = caption_ids(tok, captions)
    K = len(ids)
    tokens = np.array([len(c) for c in ids])
    logp = np.full((K, K), np.nan)  # [image, caption]; without retrieval only the diagonal and the one below it
    with bar(K, "K x K scores" if retrieve else "caption scores", "image", progress) as scored:
        for i in range(K):
            mine = range(K) if retrieve else [i, (i - 1) % K]
            logp[i, mine], _ = caption_logprobs(dec, llava.projector.forward(features[i]), [ids[j] for j in mine])
            scored.update()
    none, _ = caption_logprobs(dec, dec.embed([0]), ids)                          # prefix: <|endoftext|>
    shuffled = logp[(np.arange(K) + 1) % K, np.arange(K)]                         # each caption, the next image
    result = {"k": K, "chance": 1 / K, **(retrieval(logp, none) if retrieve else {}),
              "loss_image": float(-np.diag(logp).sum() / tokens.sum()),
              "loss_shuffled": float(-shuffled.sum() / tokens.sum()),
              "loss_none": float(-none.sum() / tokens.sum()), "samples": []}
    for i in range(min(n_generate, K)):
        result["samples"].append({"image": str(images[i]) if images is not None else i, "reference": captions[i],
                                  "generated": llava.caption(llava.projector.forward(features[i]), Sampling(40))})
    return result


# -- decoding many prompts at once -------------------------------------------------------------------------
def plain_prompts(decoder, image_tokens):  # iterable of [196, d] -> iterable of (KV cache, logits [vocab])
    """The plain template (stage 1's, for captions): each image's tokens alone, read into a KV cache of its own."""
    for x in image_tokens:
        cache = KVCache(decoder.cfg, 1, len(x))
        yield cache, prefill(decoder, x[None], cache)


def chat_prompts(llava, image_tokens, questions):
    """The chat template, as llava.answer writes it, for each image [196, d] and each of its questions (a list per
    image) -> (KV cache, logits [vocab]) per question, in order. The prompt up to and including the image (the
    system turn, the user turn's start, the image tokens) is the same for all of an image's questions: it is
    read once, and each question continues a copy of its cache."""
    tok, dec = llava.tok, llava.decoder
    for x, qs in zip(image_tokens, questions):
        parts = [chat_prompt(tok, q, 1, llava.system).split(IMAGE) for q in qs]   # [head, tail] per question
        prefix, _ = llava.embed(parts[0][0] + IMAGE, [x])                          # [1, P, d]
        tails = [tok.encode(tail) for _, tail in parts]  # as llava.embed encodes the text after the image
        shared = KVCache(dec.cfg, 1, prefix.shape[1] + max(map(len, tails)))
        prefill(dec, prefix, shared)
        for ids in tails:
            cache = shared.copy()
            yield cache, prefill(dec, dec.embed([ids]), cache)


# -- captions ----------------------------------------------------------------------------------------------
def evaluate_captions(llava, features, references, prompt=None, n_predict=40, batch=16, beams=1, images=None,
                      n_samples=5, progress=True):
    """A caption of each image, scored against all of its human captions.

    features: indexable, features[i] [196, 768] of image i; references: a list of captions per image. The caption
    is the plain template's continuation of the image tokens (its first line), or with `prompt` the chat answer
    to it. Greedy (greedy_decode, `batch` images at a time), or beam search with `beams` > 1.
    Also what its objects are (metrics.description_scores): the share of the objects two human captions agree on
    that it names (coverage), and of those it names, the share no human caption names (CHAIR_i).
    -> {bleu1..bleu4, cider, rouge_l, coverage, chair_i, chair_s, n, seconds, tokens, captions, samples}"""
    from .metrics import description_scores, score_captions
    dec, tok = llava.decoder, llava.tok
    t0 = time.perf_counter()
    N = len(references)
    tokens = (llava.projector.forward(features[i]) for i in range(N))            # [196, d] each, as needed
    prompts = plain_prompts(dec, tokens) if prompt is None else chat_prompts(llava, tokens, [[prompt]] * N)
    ids = [None] * N
    with bar(N, "captions", "image", progress) as done:
        if beams > 1:
            for i, (cache, logits) in enumerate(prompts):
                ids[i] = beam_search(dec, cache, logits, beams, n_predict, tok.eos_id)
                done.update()
        else:
            for i, seq in greedy_decode(dec, prompts, n_predict, tok.eos_id, batch):
                ids[i] = seq
                done.update()
    # a caption is its first line: the plain template may run on past it ("... grass.\n\nThe dog ...")
    captions = [tok.decode([t for t in s if t != tok.eos_id]).strip().split("\n")[0] for s in ids]
    result = score_captions(captions, references) | description_scores(captions, references)
    result.update(seconds=time.perf_counter() - t0, tokens=sum(map(len, ids)), captions=captions,
                  samples=[{"image": str(images[i]) if images is not None else i, "generated": captions[i],
                            "references": references[i]} for i in range(min(n_samples, N))])
    return result


# -- visual question answering -----------------------------------------------------------------------------
@dataclass
class Question:
    image: Path
    question: str
    answer: str
    kind: str = None  # easy-VQA's kind of answer: shape, colour or yes/no


QUOTED = re.compile(r'"([^"]+)"')


def read_out(text):  # a reply -> the text it says a sign holds: its first quotation, else the whole reply
    m = QUOTED.search(text)
    return " ".join((m.group(1) if m else text).lower().split()).strip(" .")


EASY_VQA_KINDS = {"yes": "yes/no", "no": "yes/no", "circle": "shape", "rectangle": "shape", "triangle": "shape",
                  **{c: "colour" for c in ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")}}


def read_vqa(path, images=None, limit=None):
    """A VQA file -> [Question] (the first `limit`): LLaVA's conversations (a JSON list, or JSON lines; the first
    exchange of each) or easy-VQA's [question, answer, image_id] list, read by instruct.read_conversations (which
    names a malformed entry, or a missing image). Each answer's kind (easy-VQA's: shape, colour or yes/no) is
    noted for the report."""
    from .instruct import read_conversations
    out = []
    for c in read_conversations(path, images)[:limit]:
        (question, answer), = c.turns[:1]
        out.append(Question(c.image, question, answer, EASY_VQA_KINDS.get(normalize_answer(answer))))
    return out


def distinct_images(questions):  # -> the images the questions ask about, in order of first appearance
    return list(dict.fromkeys(q.image for q in questions))


NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
           "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", "!"]


def normalize_answer(text):  # str -> str
    """VQA's answer normalization (the EvalAI answer processor of the VQAv2 and TextVQA evaluations, which LLaVA
    uses), step by step:
      lowercase; delete ',' and '?'; "'s" -> " 's"; newlines and tabs -> spaces
      each of ; / [ ] " { } ( ) = + \\ _ - > < @ ` ! is deleted if it touches a space anywhere in the text,
        else replaced by a space ("t-shirt" -> "t shirt", "yes - it is" -> "yes  it is")
      '.' deleted unless a digit follows ("2.5" stays)
      the words none, zero..ten -> 0..10; the articles a, an, the dropped; words joined by one space
    Its map of contractions written without the apostrophe (dont -> don't, ...) is left out."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in PUNCTUATION:
        out = out.replace(p, "" if p + " " in text or " " + p in text else " ")
    out = re.sub(r"\.(?!\d)", "", out, count=32)  # EvalAI passes re.UNICODE (= 32) where re.sub takes its count
    words = [NUMBERS.get(w, w) for w in out.split()]
    return " ".join(w for w in words if w not in ("a", "an", "the"))


def pope_label(text):  # an answer -> "yes" or "no", as POPE reads it
    """POPE's rule: the first sentence (the text before the first '.'), commas deleted, split at spaces; "no" if
    a word is "no", "No" or "not", else "yes"."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return "no" if {"no", "No", "not"} & set(words) else "yes"


def pope_metrics(predicted, truth):  # lists of "yes"/"no" -> {accuracy, precision, recall, f1, yes_ratio, n}
    """yes is the positive class: precision = TP / (TP + FP), recall = TP / (TP + FN), F1 = 2 P R / (P + R),
    accuracy = (TP + TN) / n, yes_ratio = (TP + FP) / n (0 where a denominator is 0)."""
    p, t = np.array(predicted) == "yes", np.array(truth) == "yes"
    tp, fp, tn, fn = (int(np.sum(a & b)) for a, b in ((p, t), (p, ~t), (~p, ~t), (~p, t)))
    n = len(p)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {"accuracy": (tp + tn) / n if n else 0.0, "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "yes_ratio": (tp + fp) / n if n else 0.0, "n": n}


def score_vqa(predictions, questions):  # [str], [Question] -> {accuracy, accuracy_contains, n, by_type, yes_no, ...}
    """accuracy: normalize_answer(prediction) == normalize_answer(answer); accuracy_contains: the normalized answer
    appears in the normalized prediction as whole words (kinder to a model that answers in sentences). by_type:
    the accuracy of yes/no questions (the answer is yes or no) and of the others; by_kind (easy-VQA): per kind
    of answer. yes_no: POPE's metrics on the yes/no questions, the prediction read by pope_label. reading: for
    questions whose answer quotes a sign ('The sign says "OPEN".'), the share whose reply quotes the same words
    (read_out: case and spacing aside)."""
    pred = [normalize_answer(p) for p in predictions]
    ref = [normalize_answer(q.answer) for q in questions]
    exact = np.array([p == r for p, r in zip(pred, ref)])                        # [n]
    yes_no = np.array([r in ("yes", "no") for r in ref])                          # [n]

    def accuracy(m):  # m [n] bool -> {accuracy, n} of those questions
        return {"accuracy": float(exact[m].mean()) if m.any() else 0.0, "n": int(m.sum())}
    result = {"accuracy": float(exact.mean()),
              "accuracy_contains": float(np.mean([f" {r} " in f" {p} " for p, r in zip(pred, ref)])),
              "n": len(questions), "by_type": {"yes/no": accuracy(yes_no), "other": accuracy(~yes_no)},
              "yes_no": pope_metrics([pope_label(p) for p, m in zip(predictions, yes_no) if m],
                                     [r for r, m in zip(ref, yes_no) if m])}
    reading = np.array([QUOTED.search(q.answer) is not None for q in questions])  # "The sign says "X"."
    if reading.any():  # the words read, as written but for case and spacing
        right = [read_out(p) == read_out(q.answer) for p, q, m in zip(predictions, questions, reading) if m]
        result["reading"] = {"accuracy": float(np.mean(right)), "n": int(reading.sum())}
    kinds = np.array([q.kind for q in questions])
    if any(k is not None for k in kinds):
        result["by_kind"] = {k: accuracy(kinds == k) for k in ("shape", "colour", "yes/no") if (kinds == k).any()}
    return result


def evaluate_vqa(llava, features, questions, n_predict=40, batch=16, n_samples=5, progress=True):
    """The chat answer (llava.answer's template, greedy) to each question about its image, scored by score_vqa.
    features[j]: [196, 768] of image j of distinct_images(questions). An image's questions share its prompt's
    KV cache up to the image tokens (chat_prompts). -> score_vqa's dict, with seconds, predictions, samples"""
    t0 = time.perf_counter()
    by_image = {image: [] for image in distinct_images(questions)}                # image -> its questions' indices
    for i, q in enumerate(questions):
        by_image[q.image].append(i)
    order = [i for idx in by_image.values() for i in idx]                          # questions grouped by image
    tokens = (llava.projector.forward(features[j]) for j in range(len(by_image)))  # [196, d] each, as needed
    prompts = chat_prompts(llava, tokens, [[questions[i].question for i in idx] for idx in by_image.values()])
    predictions = [None] * len(questions)
    with bar(len(questions), "answers", "question", progress) as done:
        for k, ids in greedy_decode(llava.decoder, prompts, n_predict, llava.tok.eos_id, batch):
            predictions[order[k]] = llava.tok.decode([t for t in ids if t != llava.tok.eos_id])
            done.update()
    result = score_vqa(predictions, questions)
    result.update(seconds=time.perf_counter() - t0, predictions=predictions,
                  samples=[{"image": str(q.image), "question": q.question, "answer": q.answer, "predicted": p}
                           for q, p in list(zip(questions, predictions))[:n_samples]])
    return result


# -- the command line --------------------------------------------------------------------------------------
def print_retrieval(r):
    print(f"K = {r['k']} held-out images (chance R@1 = {r['chance']:.3f})")
    print(f"caption loss/token: true image {r['loss_image']:.3f}, shuffled image {r['loss_shuffled']:.3f}, "
          f"no image {r['loss_none']:.3f}")
    if "r_at_1" in r:
        print(f"caption -> image: R@1 {r['r_at_1']:.3f}, R@5 {r['r_at_5']:.3f}")
        print(f"image -> caption by PMI: R@1 {r['i2t_r_at_1']:.3f}, R@5 {r['i2t_r_at_5']:.3f} "
              f"(raw likelihood R@1 {r['i2t_r_at_1_raw_likelihood']:.3f})")
    for s in r["samples"]:
        print(f"\n{s['image']}\n  generated: {s['generated']}\n  reference: {s['reference']}")


def print_captions(r, how):
    print(f"{r['n']} images, {how}: {r['seconds']:.1f} s, {r['tokens']} tokens\n")
    print("| BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | CIDEr | ROUGE-L |\n| --- | --- | --- | --- | --- | --- |")
    print("| " + " | ".join(f"{r[k]:.3f}" for k in ("bleu1", "bleu2", "bleu3", "bleu4", "cider", "rouge_l")) + " |")
    print(f"\nobjects (metrics.OBJECTS): coverage {r['coverage']:.3f} of those two captions agree on, CHAIR_i "
          f"{r['chair_i']:.3f}, CHAIR_s {r['chair_s']:.3f}, {r['objects_named']:.2f} named a caption")
    for s in r["samples"]:
        print(f"\n{s['image']}\n  generated: {s['generated']}\n  reference: {s['references'][0]}")


def print_vqa(r):
    print(f"{r['n']} questions: {r['seconds']:.1f} s\n")
    print("| questions | n | accuracy (exact) |\n| --- | --- | --- |")
    print(f"| all | {r['n']} | {r['accuracy']:.3f} (answer within the reply: {r['accuracy_contains']:.3f}) |")
    for name, a in list(r["by_type"].items()) + [(f"easy-VQA {k}", a) for k, a in r.get("by_kind", {}).items()] + \
            ([("reading: the quoted words, any case", r["reading"])] if "reading" in r else []):
        print(f"| {name} | {a['n']} | {a['accuracy']:.3f} |")
    y = r["yes_no"]
    print(f"\nyes/no questions read as POPE does ({y['n']}): accuracy {y['accuracy']:.3f}, precision "
          f"{y['precision']:.3f}, recall {y['recall']:.3f}, F1 {y['f1']:.3f}, yes-ratio {y['yes_ratio']:.3f}")
    for s in r["samples"]:
        print(f"\n{s['image']}\n  Q: {s['question']}\n  A: {s['predicted']}\n  reference: {s['answer']}")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tinyllava.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="folder with pairs.jsonl (any folder in that format), or a LLaVA JSON with --images")
    ap.add_argument("--split", default=None, help="only this split (e.g. dev); default: every line")
    ap.add_argument("--limit", type=int, default=100, help="how many images (--vqa: questions) to evaluate")
    ap.add_argument("--skip", type=int, default=0,
                    help="start after this many images (--vqa: questions; train picks its best checkpoint on the first "
                         "dev images)")
    ap.add_argument("--captions", action="store_true", help="generate captions and score them (BLEU, CIDEr, ROUGE-L)")
    ap.add_argument("--no-retrieval", action="store_true",
                    help="the loss mode without retrieval: 2K captions scored instead of K x K")
    ap.add_argument("--prompt", help="--captions: the chat answer to this instead of the plain template's caption")
    ap.add_argument("--beams", type=int, default=1, help="--captions: beam search with this many beams (1: greedy)")
    ap.add_argument("--vqa", metavar="FILE", help="answer the questions of this file and score them")
    ap.add_argument("--perplexity", action="store_true",
                    help="the decoder's perplexity on the human captions of --data (no image; see above)")
    ap.add_argument("--images", help="the folder the image paths of --vqa FILE (default: beside it) or of a LLaVA "
                                     "JSON --data start from")
    ap.add_argument("-n", "--n-predict", type=int, default=40, help="most tokens per caption or answer (40)")
    ap.add_argument("--batch", type=int, default=16, help="sequences decoded together in one forward pass (16)")
    ap.add_argument("--projector", help="projector GGUF (default: the committed weights/projector.gguf)")
    ap.add_argument("--model", help="decoder GGUF (default: the fetched SmolLM2)")
    ap.add_argument("--adapter", help="a LoRA adapter GGUF for the decoder")
    ap.add_argument("--generate", type=int, default=5, help="samples to show (the loss mode: greedy captions)")
    ap.add_argument("--cache", help="feature cache folder (default: computed and cached as train does)")
    ap.add_argument("--crop", action="store_true", help="centre-crop images instead of padding them square")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a report")
    ap.add_argument("--on-error", choices=["stop", "skip"], default="stop")
    args = ap.parse_args(argv)
    with cli_errors("tinyllava.evaluate"):
        from . import fused, runtime
        from .data import Example, FeatureCache, load_examples
        from . import lora
        from .model import load_decoder, load_llava, load_tower
        from .weights import vision_path
        if args.captions + bool(args.vqa) + args.perplexity > 1:
            raise TinyLlavaError("--captions, --vqa and --perplexity are different evaluations: give one")
        if args.perplexity:
            if not args.data:
                raise TinyLlavaError("--perplexity needs --data (a folder with pairs.jsonl, or a LLaVA JSON)")
            examples = load_examples(args.data, args.images, split=args.split, on_error=args.on_error)
            texts = [c for e in examples[args.skip:args.skip + args.limit] for c in e.captions]
            if not texts:
                raise TinyLlavaError(f"{args.data}: no captions left after --skip {args.skip}")
            decoder, tok = load_decoder(args.model)
            if args.adapter:
                lora.load(args.adapter, decoder)
            ppl, tokens = perplexity(decoder, tok, texts, args.batch * 4)
            r = {"perplexity": ppl, "tokens": tokens, "texts": len(texts), "model": str(args.model or "SmolLM2")}
            print(json.dumps(r) if args.json else f"perplexity {ppl:.3f} on {len(texts)} captions ({tokens} tokens), "
                                                  f"{r['model']}")
            return
        if args.no_retrieval and (args.captions or args.vqa):
            raise TinyLlavaError("--no-retrieval belongs to the loss mode (without --captions or --vqa)")
        if not args.vqa and not args.data:
            raise TinyLlavaError("--data is required (or --vqa FILE)")
        if args.limit < (1 if args.captions or args.vqa else 2):
            raise TinyLlavaError(f"--limit must be at least {1 if args.captions or args.vqa else 2}")
        if args.skip < 0 or args.beams < 1 or args.batch < 1 or args.n_predict < 1:
            raise TinyLlavaError("--skip must not be negative; --beams, --batch and -n must be at least 1")
        if args.vqa:
            questions = read_vqa(args.vqa, args.images)[args.skip:args.skip + args.limit]
            if not questions:
                raise TinyLlavaError(f"{args.vqa}: no questions left after --skip {args.skip}")
            examples = [Example(image, []) for image in distinct_images(questions)]
        else:
            examples = load_examples(args.data, args.images, split=args.split, on_error=args.on_error)
            examples = examples[args.skip:args.skip + args.limit]
            if len(examples) < 2 and not args.captions:
                raise TinyLlavaError(f"{args.data}: fewer than 2 images to score after --skip {args.skip}")
            if not examples:
                raise TinyLlavaError(f"{args.data}: no images left after --skip {args.skip}")
        runtime.keep_freed_memory()
        decoding = args.captions or args.vqa  # decode with the quantized weights; score K x K with float32's
        llava = load_llava(projector=args.projector, decoder=args.model, tower=False,
                           quantized=bool(decoding) and fused.ENGINE == "numba",
                           adapter=args.adapter)
        cache = FeatureCache.for_examples(examples, vision_path(), pad=not args.crop, cache=args.cache)
        cache.fill(load_tower())
        if args.vqa:
            r = evaluate_vqa(llava, cache, questions, args.n_predict, args.batch, args.generate, not args.json)
            r.pop("predictions")
        elif args.captions:
            r = evaluate_captions(llava, cache, [e.captions for e in examples], args.prompt, args.n_predict,
                                  args.batch, args.beams, [e.image for e in examples], args.generate, not args.json)
            r.pop("captions")
        else:
            r = evaluate(llava, np.stack([cache[i] for i in range(len(examples))]),
                         [e.captions[0] for e in examples], args.generate, [e.image for e in examples],
                         progress=not args.json, retrieve=not args.no_retrieval)
        if args.json:
            print(json.dumps(r))
        elif args.vqa:
            print_vqa(r)
        elif args.captions:
            print_captions(r, f"beam search ({args.beams} beams)" if args.beams > 1 else
                           f"greedy (batch {args.batch})" + (f", asked {args.prompt!r}" if args.prompt else ""))
        else:
            print_retrieval(r)


if __name__ == "__main__":
    main()
