"""tinyllava.metrics against pycocoevalcap (the COCO caption evaluation's own Python code) on the same tokens.

pycocoevalcap needs Java only for its PTB tokenizer, METEOR and SPICE; the three scorers imported here are plain
Python. The tokenizer's expected outputs below were produced by that Java tokenizer (pycocoevalcap 1.2's
PTBTokenizer, CoreNLP 3.4.1) once, and are written out so the tests need no Java.
"""
import math
import random

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from tinyllava.metrics import bleu, cider_d, cider_d_per_image, rouge_l, score_captions, tokenize

TOL = 1e-9


def coco(candidates, references):  # [images][words], [images][refs][words] -> [4] bleu, cider, [images] cider, rouge
    res = {i: [" ".join(c)] for i, c in enumerate(candidates)}
    gts = {i: [" ".join(r) for r in refs] for i, refs in enumerate(references)}
    b, _ = Bleu(4).compute_score(gts, res, verbose=0)
    c, cs = Cider().compute_score(gts, res)
    r, _ = Rouge().compute_score(gts, res)
    return b, float(c), list(cs), float(r)


def assert_same_as_coco(candidates, references):  # -> largest abs difference seen
    b, c, cs, r = coco(candidates, references)
    ours = bleu(candidates, references) + [cider_d(candidates, references), rouge_l(candidates, references)]
    ours += cider_d_per_image(candidates, references)
    theirs = list(b) + [c, r] + cs
    diff = max(abs(x - y) for x, y in zip(ours, theirs))
    assert len(ours) == len(theirs) and diff <= TOL, (ours, theirs)
    return diff


def split(*captions):  # str... -> [[words]]
    return [c.split() for c in captions]


HAND = [  # (candidate, references) of one image each
    (split("a cat sat on a mat")[0], split("a cat sat on the mat")),  # same length
    (split("a very small black cat sat quietly on the red mat today")[0],  # longer than the references
     split("a cat sat on the mat", "the cat is on a mat")),
    (split("a cat")[0], split("a cat sat on the mat", "there is a cat on the mat")),  # shorter: BP, no 3/4-grams
    (split("zebra giraffe elephant")[0], split("a cat sat on the mat", "a dog")),  # no match at all
    (split("the the the the the the")[0], split("the cat the mat", "the dog")),  # clipping of repeated words
    (split("on the mat on the mat on the mat")[0], split("a cat on the mat on the mat")),  # repeated 2/3-grams
    (split("a dog runs on grass")[0], split("a dog runs", "a dog runs on the green grass")),  # closest-length tie
    (split("dog")[0], split("a dog", "dog")),  # one word
    ([], split("a man rides a horse", "a person on a horse")),  # empty candidate
    (split("a man rides a horse")[0], split("a man rides a horse")),  # perfect
]


@pytest.mark.parametrize("case", range(len(HAND)))
def test_hand_case_alone(case):
    cand, refs = HAND[case]
    assert_same_as_coco([cand], [refs])  # one image: CIDEr-D is 0 (all idf are log 1 - log 1)
    assert cider_d([cand], [refs]) == 0.0


def test_hand_cases_as_one_corpus():
    assert_same_as_coco([c for c, _ in HAND], [r for _, r in HAND])
    assert_same_as_coco([c for c, _ in HAND[::-1]], [r for _, r in HAND[::-1]])


def test_known_by_hand():
    """ "a cat sat on a mat" against "a cat sat on the mat", equal lengths so BP = 1:
    1-grams: a a cat sat on mat, "a" clipped to 1 -> 5/6;  2-grams: a cat, cat sat, sat on match of 5 -> 3/5;
    3-grams: a cat sat, cat sat on of 4 -> 2/4;  4-grams: a cat sat on of 3 -> 1/3.
    BLEU-1 = 5/6, BLEU-2 = (5/6 * 3/5)^(1/2) = 0.5^(1/2), BLEU-3 = (1/2 * 1/2)^(1/3) = 0.25^(1/3),
    BLEU-4 = (1/4 * 1/3)^(1/4) = (1/12)^(1/4).  ROUGE-L: LCS "a cat sat on mat" = 5, P = R = 5/6 -> F = 5/6.
    Then "a cat sat" against "a cat sat on the mat": p1 = p2 = p3 = 1, no 4-gram, so p4 = 1e-15/1e-9 = 1e-6
    (pycocoevalcap's constants), BP = exp(1 - 6/3) = e^-1: BLEU-1..3 = e^-1, BLEU-4 = e^-1 * 1e-6^(1/4) = 0.0116.
    """
    got = bleu(split("a cat sat on a mat"), [split("a cat sat on the mat")])
    assert got == pytest.approx([5 / 6, 0.5 ** 0.5, 0.25 ** (1 / 3), (1 / 12) ** 0.25], abs=1e-8)
    assert rouge_l(split("a cat sat on a mat"), [split("a cat sat on the mat")]) == pytest.approx(5 / 6, abs=1e-12)
    got = bleu(split("a cat sat"), [split("a cat sat on the mat")])
    e = math.exp(-1)
    assert got == pytest.approx([e, e, e, e * 1e-6 ** 0.25], abs=1e-8)


def test_perfect_candidate_scores_one():
    refs = [split("a man rides a brown horse on the beach"), split("two dogs play in the snow")]
    cands = [r[0] for r in refs]
    assert bleu(cands, refs) == pytest.approx([1.0] * 4, abs=1e-9)
    assert rouge_l(cands, refs) == 1.0
    assert_same_as_coco(cands, refs)


def test_random_captions_small_vocabulary():
    rng = random.Random(0)
    vocab = "a the dog cat man woman on in with red blue runs sits grass water ball two of and is near".split()
    cands, refs = [], []
    for _ in range(300):
        rs = [[rng.choice(vocab) for _ in range(rng.randint(1, 15))] for _ in range(rng.randint(1, 5))]
        if rng.random() < 0.5:  # a random caption
            cand = [rng.choice(vocab) for _ in range(rng.randint(0, 15))]
        else:  # a reference with a few words replaced, dropped or inserted: longer n-gram matches
            cand = list(rng.choice(rs))
            for _ in range(rng.randint(0, 3)):
                i = rng.randint(0, len(cand))
                op = rng.choice("rdi")
                if op == "i" or i == len(cand):
                    cand.insert(i, rng.choice(vocab))
                elif op == "r":
                    cand[i] = rng.choice(vocab)
                else:
                    del cand[i]
        cands.append(cand)
        refs.append(rs)
    assert_same_as_coco(cands, refs)


def realistic_captions(rng, n_images):  # -> [images] str, [images][refs] str: raw captions as people write them
    subject = ["a dog", "a black dog", "two dogs", "a man", "a young girl", "a woman in a red shirt", "the boy",
               "a group of people", "a brown and white dog", "a child", "an older man's dog", "a surfer"]
    verb = ["runs", "is running", "jumps", "plays", "is sitting", "stands", "walks", "rides a bike", "is climbing",
            "swims", "isn't moving", "looks at the camera"]
    place = ["on the grass", "in the water", "through the snow", "on a beach", "near a building", "in a park",
             "down the street", "on a rock", "at the top of a hill", "in front of a crowd"]
    extra = ["", "", " with a ball", " with a stick in its mouth", ", smiling", " (in the sun)", " together"]
    end = [" .", ".", "", "!", " ."]

    def caption(s, v, p):
        text = f"{s} {v} {p}{rng.choice(extra)}{rng.choice(end)}"
        return text[0].upper() + text[1:] if rng.random() < 0.7 else text

    cands, refs = [], []
    for _ in range(n_images):
        s, v, p = rng.choice(subject), rng.choice(verb), rng.choice(place)
        refs.append([caption(rng.choice([s, rng.choice(subject)]), rng.choice([v, rng.choice(verb)]),
                             rng.choice([p, rng.choice(place)])) for _ in range(rng.randint(1, 5))])
        cands.append(caption(s, rng.choice([v, rng.choice(verb)]), p))
    return cands, refs


def test_score_captions_realistic():
    cands, refs = realistic_captions(random.Random(1), 200)
    got = score_captions(cands, refs)
    b, c, _, r = coco([tokenize(x) for x in cands], [[tokenize(x) for x in rs] for rs in refs])
    want = {"bleu1": b[0], "bleu2": b[1], "bleu3": b[2], "bleu4": b[3], "cider": c, "rouge_l": r, "n": 200}
    assert got.keys() == want.keys()
    for k in want:
        assert abs(got[k] - want[k]) <= TOL, k
    assert 0.1 < got["bleu4"] < got["bleu1"] < 1 and got["cider"] > 0.5  # the captions overlap as real ones do


@pytest.mark.parametrize("text, tokens", [  # tokens as the Java PTBTokenizer + COCO's punctuation removal give them
    ("A dog's ball (red) isn't here.", "a dog 's ball -lrb- red -rrb- is n't here"),
    ("Don't, can't, cannot; won't: I'm they're we've I'll he'd the dogs' ball",
     "do n't ca n't can not wo n't i 'm they 're we 've i 'll he 'd the dogs ball"),
    ('He said "hello" -- and [left] {x} ... ok - fine', "he said hello and -lsb- left -rsb- -lcb- x -rcb- ok fine"),
    ("Two dogs.. play!? Yes!!", "two dogs play !? yes !!"),
    ("A man in a Dr. Seuss hat on St. Patrick's day, with U.S. flags.",
     "a man in a dr. seuss hat on st. patrick 's day with u.s. flags"),
    ("A 12-year-old in a t-shirt pays $1,000.50 at 2:30 for 1/2 of a 3.5 kg cake o'clock",
     "a 12-year-old in a t-shirt pays $ 1,000.50 at 2:30 for 1/2 of a 3.5 kg cake o'clock"),
    ("A boy slides down a slip 'n' slide gonna wanna gotta",
     "a boy slides down a slip 'n' slide gon na wan na got ta"),
    ("“Curly” quotes — a dash… it’s ‘fine’", "curly quotes a dash it 's fine"),
    ("The letter P. on a sign at 50% off & more", "the letter p. on a sign at 50 % off & more"),
    ("A dog runs on the grass .", "a dog runs on the grass"),
])
def test_tokenize_like_ptb(text, tokens):
    assert tokenize(text) == tokens.split()
