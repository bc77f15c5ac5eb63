"""Training sequences: an image and all its captions, or all its conversations, packed into one sequence.

Stage 1 (the plain template): the image tokens, then each caption and the end token. Stage 2 (the chat
template): the text before the image, the image tokens, then each conversation, with the loss on the assistant's
tokens only. Packed, each caption or conversation sees the image and itself only (a block mask) and starts at the
position right after the image: the same numbers as one sequence each, with the image computed once.
"""
import numpy as np

from .errors import TinyLlavaError
from .model import IMAGE, chat_prompt
from .ops import causal_mask


def caption_ids(tok, captions):  # the plain template's targets: each caption, then the end token
    return [tok.encode(c) + [tok.eos_id] for c in captions]


def conversation_ids(tok, turns, system=None):
    """A conversation about one image, [(question, answer), ...], in the chat template, cut where the image
    stands. -> (prefix ids: the text before the image; ids after it; targets: True on the tokens the loss
    scores, each answer and the end token after it). Each prompt is encoded as at inference, up to where the
    answer starts, and each answer on its own, as the model generates it."""
    history, said, prefix, ids, targets = [], "", None, [], []
    end = tok.decode([tok.eos_id])
    for question, answer in turns:
        text = chat_prompt(tok, question, 1, system, history)    # the conversation so far, ending "assistant\n"
        if prefix is None:
            before, new = text.split(IMAGE)
            prefix = tok.encode(before)
        elif text.startswith(said):
            new = text[len(said):]
        else:
            raise TinyLlavaError("the chat template rewrote earlier turns: cannot cut the conversation into turns")
        prompt, reply = tok.encode(new), tok.encode(answer) + [tok.eos_id]
        ids += prompt + reply
        targets += [False] * len(prompt) + [True] * len(reply)
        history += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        said = text + answer + end
    return prefix, ids, targets


def pack(prefix, segments):
    """One image's training sequence: the prefix, then every segment packed after it.

    prefix: [P, d] embeddings (the image tokens, with any text before them); segments: list of id lists, each
    predicting all its tokens (stage 1: a caption ending with the end token), or of (ids, targets) pairs,
    `targets` marking which tokens the loss scores (stage 2: the answers of a conversation). Each segment sees
    the prefix and itself only (a block mask) and starts at the position right after the prefix: the same
    numbers as one sequence per segment, with the prefix computed once.
    -> (ids [L] (-1 under the prefix), positions [L], mask [1, 1, L, L], at [N], targets [N]): position
    `at[k]` must predict token `targets[k]`; the prefix's last position predicts each segment's first token."""
    P = len(prefix)
    ids, positions, segment = [np.full(P, -1)], [np.arange(P)], [np.zeros(P, int)]
    at, targets, start = [], [], P
    for j, seg in enumerate(segments, start=1):
        seg_ids, scored = seg if isinstance(seg, tuple) else (seg, [True] * len(seg))
        n = len(seg_ids)
        ids.append(np.array(seg_ids))
        positions.append(P + np.arange(n))
        segment.append(np.full(n, j))
        before = [P - 1] + list(range(start, start + n - 1))  # the position that predicts each token
        at += [p for p, s in zip(before, scored) if s]
        targets += [t for t, s in zip(seg_ids, scored) if s]
        start += n
    ids, positions, segment = np.concatenate(ids), np.concatenate(positions), np.concatenate(segment)
    L = len(ids)
    # query t may see key s if s is in the prefix or in t's own segment, and s comes no later than t
    mask = ((segment[None, :] == 0) | (segment[None, :] == segment[:, None])) & causal_mask(L)[0, 0]
    return ids, positions, mask[None, None], np.array(at, int), np.array(targets, int)


def collate(samples, prefixes, embed):
    """Several packed sequences of different lengths -> one padded batch.
    samples: outputs of pack(); prefixes: their [P, d] prefixes; embed(ids) -> [n, d].
    -> x [B, L, d], positions [B, L], mask [B, 1, L, L] (padding is seen by no one), at [N] (flat), targets [N]"""
    B, L = len(samples), max(len(s[0]) for s in samples)
    d = prefixes[0].shape[-1]
    x = np.zeros((B, L, d), prefixes[0].dtype)
    positions = np.zeros((B, L), int)
    mask = np.zeros((B, 1, L, L), bool)
    ats, targets = [], []
    for b, ((ids, pos, m, at, tg), prefix) in enumerate(zip(samples, prefixes)):
        n, P = len(ids), len(prefix)
        x[b, :P] = prefix
        x[b, P:n] = embed(ids[P:])
        positions[b, :n] = pos
        mask[b, 0, :n, :n] = m[0, 0]
        mask[b, 0, n:, 0] = True  # padding queries look at one key, so their softmax stays finite
        ats.append(b * L + at)
        targets.append(tg)
    return x, positions, mask, np.concatenate(ats), np.concatenate(targets)
