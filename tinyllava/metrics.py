"""Caption metrics from scratch: BLEU-1..4, CIDEr-D and ROUGE-L, as the COCO caption evaluation computes them.

Each metric gives the same numbers as pycocoevalcap 1.2 (bleu/bleu_scorer.py, cider/cider_scorer.py, rouge/rouge.py)
on the same tokens, to 1e-9 (tests/test_metrics.py checks it); their quirks are kept on purpose and said where they
happen. A caption is a list of tokens; `candidates` has one caption per image, `references` one list of captions
per image.

The tokenizer. COCO runs Stanford CoreNLP 3.4.1's Java PTBTokenizer (`-preserveLines -lowerCase`), then drops the
tokens in PUNCTUATIONS. `tokenize` is a regex that copies PTB's rules that captions meet: lowercase; split off
"n't" and the clitics 's 're 've 'll 'd 'm (don't -> do n't, can't -> ca n't); split "cannot gonna gotta wanna lemme
gimme" (can not, gon na, ...); keep whole hyphenated words (t-shirt), numbers (3.5, 1,000, 2:30, 1/2), initials and
acronyms with their periods (p., u.s.), a list of common abbreviations with theirs (mr., st., etc.), inner
apostrophes (o'clock) and "'n'"; split off every other period and symbol. Two PTB quirks that COCO keeps are kept:
the lowercasing turns "-LRB-" into "-lrb-", which is not in COCO's list, so "(" ")" "[" "]" "{" "}" stay in the
scores as the tokens -lrb- -rrb- -lsb- -rsb- -lcb- -rcb-; and runs of "!"/"?" ("!!", "?!") stay as one token.
Checked against the Java tokenizer on all 35,000 Flickr8k train+dev captions, and on the same with the spaces
before "." and "," removed (as a model writes them): identical, token for token. What it does not copy:
  - PTB's abbreviation list is longer and partly context-dependent ("est.", "sq.", "ph.d.", "no." before a
    number keep their period there; here they lose it): a caption using one differs from COCO by that one token.
  - "#tag" and "@name" are one token in PTB, two here; PTB keeps "at&t"/"a&w" and "x_y" whole, here they are split
    around "&"/"_"; PTB gives "5 '10", "'90s", "y' all", "'t is", here "5'10", "90s", "y'all", "tis"; PTB writes
    ":)" as ":-rrb-", here ":" is dropped and "-rrb-" kept.
  - Unicode: curly and angle quotes, en/em dashes, "…", soft hyphens and ½ ¼ ¾ are mapped as PTB maps them;
    other non-ASCII punctuation PTB may normalize is not surveyed, and stays here as a token of its own.
Each of these changes only the tokens involved: a few n-grams and an LCS step in BLEU/CIDEr-D/ROUGE-L, in the
rare captions that have them.
"""
import math
import re
from collections import Counter

import numpy as np

PUNCTUATIONS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",  # COCO's list, verbatim
                ".", "?", "!", ",", ":", "-", "--", "...", ";"}
_UNICODE = str.maketrans({"“": '"', "”": '"', "«": '"', "»": '"', "‘": "'", "’": "'", "–": "--", "—": "--",
                          "…": "...", "\xad": "", "½": "1/2", "¼": "1/4", "¾": "3/4"})
_BRACKETS = str.maketrans({"(": " -lrb- ", ")": " -rrb- ", "[": " -lsb- ", "]": " -rsb- ", "{": " -lcb- ",
                           "}": " -rcb- ", '"': " '' "})
_CLITIC = re.compile(r"(?<=[^\W_])(n't|'(?:s|re|ve|ll|d|m))\b")
_ABBREVIATIONS = ("mr mrs ms dr st jr sr vs etc inc co corp ltd bros ave blvd rd mt ft prof gen sgt capt lt col gov "
                  "sen rep rev hon pres dept jan feb mar apr jun jul aug sep sept oct nov dec").split()
_TOKEN = re.compile(rf"""-[lr][rsc]b-                  # a bracket as PTB writes it
    | (?:[^\W\d_]\.)+(?![^\W_])                       # an initial or acronym with its periods: p. u.s.
    | (?:{'|'.join(_ABBREVIATIONS)})\.                  # an abbreviation with its period: mr.
    | \d+(?:[.,:/]\d+)+                               # a number: 3.5 1,000 2:30 1/2
    | n't | '(?:s|re|ve|ll|d|m)\b | 'n'                # a clitic, split off by _CLITIC; rock 'n' roll
    | [^\W_]+(?:[-'./][^\W_]+)*                       # a word, maybe with inner - ' . /: t-shirt o'clock
    | \.\.\. | -- | '' | [!?]+ | \S                    # punctuation, or any other symbol alone""", re.X)
_SPLIT = {"cannot": ["can", "not"], "gonna": ["gon", "na"], "gotta": ["got", "ta"], "wanna": ["wan", "na"],
          "lemme": ["lem", "me"], "gimme": ["gim", "me"]}


def tokenize(text):  # str -> [words]: lowercase PTB tokens, COCO's punctuation dropped
    text = _CLITIC.sub(r" \1", text.lower().translate(_UNICODE).translate(_BRACKETS))
    return [w for t in _TOKEN.findall(text) if t not in PUNCTUATIONS for w in _SPLIT.get(t, [t])]


def ngrams(words, n):  # [words] -> Counter{(w1..wk): count} over all k-grams, 1 <= k <= n
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def bleu(candidates, references, n=4):  # [images][words], [images][refs][words] -> [n] BLEU-1..BLEU-n
    """Corpus BLEU (Papineni et al. 2002) as pycocoevalcap's Bleu, counts summed over images before dividing:

        p_k    = (sum_i clipped_k(i) + 1e-15) / (sum_i max(len(c_i) - k + 1, 0) + 1e-9)
        clipped_k(i) = sum over the k-grams g of c_i of min(count(g in c_i), max over refs r of count(g in r))
        BLEU-k = BP * (p_1 * ... * p_k) ** (1/k)
        BP     = exp(1 - 1/ratio) if ratio < 1 else 1,   ratio = (c + 1e-15) / (r + 1e-9)

    c = sum of candidate lengths, r = sum over images of the reference length closest to the candidate's (a tie
    goes to the shorter: "closest"). The 1e-15/1e-9 keep a k with no match at ~1e-6**(1/k) instead of 0 or a 0/0.
    """
    correct, guess, c, r = [0] * n, [0] * n, 0, 0
    for cand, refs in zip(candidates, references):
        c += len(cand)
        r += min((abs(len(ref) - len(cand)), len(ref)) for ref in refs)[1]
        max_ref = Counter()
        for ref in refs:
            max_ref |= ngrams(ref, n)  # |= keeps the max count of each n-gram
        for g, count in ngrams(cand, n).items():
            correct[len(g) - 1] += min(count, max_ref[g])
        for k in range(n):
            guess[k] += max(len(cand) - k, 0)
    scores, p = [], 1.0
    for k in range(n):
        p *= (correct[k] + 1e-15) / (guess[k] + 1e-9)  # running product p_1..p_k
        scores.append(p ** (1 / (k + 1)))
    ratio = (c + 1e-15) / (r + 1e-9)
    return [s * math.exp(1 - 1 / ratio) for s in scores] if ratio < 1 else scores


def cider_d_per_image(candidates, references, n=4, sigma=6.0):  # [images][words], [images][refs][words] -> [images]
    """CIDEr-D (Vedantam et al. 2015) of each image, as pycocoevalcap's Cider (which is CIDEr-D):

        g_k(s)   = tf-idf vector of the k-grams of s: count(g in s) * (log N - log max(1, df(g)))
        CIDEr-D  = 10 / n * sum_k 1/M * sum_j  exp(-(l(c) - l(r_j))^2 / (2 sigma^2))
                        * sum_g min(g_k(c)[g], g_k(r_j)[g]) * g_k(r_j)[g] / (|g_k(c)| |g_k(r_j)|)

    N = number of images evaluated, df(g) = how many of them have g in at least one reference: the idf comes from
    the references of this evaluation only, so a score depends on which other images are scored with it (one image
    alone scores 0, all idf being 0). M = number of references of the image. The min clips the candidate's
    counts by the reference's. A zero norm leaves the dot product (then 0) undivided. l(s) = len(s) (pycocoevalcap
    counts bigrams, len(s) - 1: the same difference, except for an empty caption, whose similarity is 0 anyway).
    """
    refs_ngrams = [[ngrams(ref, n) for ref in refs] for refs in references]
    df = Counter(g for refs in refs_ngrams for g in set().union(*refs))
    log_n = math.log(len(references))

    def vector(counts):  # Counter -> [n] {g: tf-idf}, [n] norms
        vec = [{} for _ in range(n)]
        for g, tf in counts.items():
            vec[len(g) - 1][g] = tf * (log_n - math.log(max(1.0, df[g])))
        return vec, [math.sqrt(sum(w * w for w in v.values())) for v in vec]

    scores = []
    for cand, refs, ref_counts in zip(candidates, references, refs_ngrams):
        vec_c, norm_c = vector(ngrams(cand, n))
        total = np.zeros(n)  # [n] summed over references
        for ref, counts in zip(refs, ref_counts):
            vec_r, norm_r = vector(counts)
            delta = len(cand) - len(ref)
            for k in range(n):
                val = sum(min(w, vec_r[k].get(g, 0.0)) * vec_r[k].get(g, 0.0) for g, w in vec_c[k].items())
                if norm_c[k] != 0 and norm_r[k] != 0:
                    val /= norm_c[k] * norm_r[k]
                total[k] += val * math.exp(-delta ** 2 / (2 * sigma ** 2))
        scores.append(float(np.mean(total)) / len(refs) * 10.0)
    return scores


def cider_d(candidates, references, n=4, sigma=6.0):  # [images][words], [images][refs][words] -> CIDEr-D
    return float(np.mean(cider_d_per_image(candidates, references, n, sigma)))


def lcs(a, b):  # [words], [words] -> length of their longest common subsequence
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l_image(cand, refs, beta=1.2):  # [words], [refs][words] -> ROUGE-L F of one image
    """ROUGE-L (Lin 2004) as pycocoevalcap's Rouge, precision and recall each maxed over references separately:

        P = max_j LCS(c, r_j) / len(c),   R = max_j LCS(c, r_j) / len(r_j)
        F = (1 + beta^2) P R / (R + beta^2 P)   (0 if P or R is 0),   beta = 1.2

    An empty candidate scores 0 (pycocoevalcap splits "" into one empty token and scores 0 too, except against
    an empty reference, where it gives 1).
    """
    if not cand:
        return 0.0
    p = max(lcs(cand, ref) / len(cand) for ref in refs)
    r = max(lcs(cand, ref) / max(len(ref), 1) for ref in refs)
    return (1 + beta ** 2) * p * r / (r + beta ** 2 * p) if p != 0 and r != 0 else 0.0


def rouge_l(candidates, references, beta=1.2):  # [images][words], [images][refs][words] -> mean ROUGE-L
    return float(np.mean([rouge_l_image(c, refs, beta) for c, refs in zip(candidates, references)]))


def score_captions(candidates, references):  # [images] str, [images][refs] str -> {metric: value}
    """Tokenizes the captions, then scores them: {"bleu1".."bleu4", "cider" (CIDEr-D), "rouge_l", "n" images}."""
    cands, refs = [tokenize(c) for c in candidates], [[tokenize(r) for r in rs] for rs in references]
    b = bleu(cands, refs)
    return {**{f"bleu{k + 1}": b[k] for k in range(4)}, "cider": cider_d(cands, refs), "rouge_l": rouge_l(cands, refs),
            "n": len(cands)}


# -- objects in a description: coverage and hallucination (CHAIR, Rohrbach et al. 2018) ---------------------
# An object -> the words that name it in Flickr8k's captions (plurals included). CHAIR used COCO's 80 classes and
# their synonyms; Flickr8k's photos are of people, animals, sport and places, so the list is of those.
OBJECTS = {
    "person": "person people man men woman women boy boys girl girls child children kid kids baby babies toddler "
              "toddlers guy guys lady ladies player players skier skiers surfer surfers biker bikers cyclist "
              "cyclists rider riders climber climbers swimmer swimmers runner runners hiker hikers crowd teenager "
              "teenagers skateboarder skateboarders snowboarder snowboarders dancer dancers",
    "dog": "dog dogs puppy puppies pup", "cat": "cat cats kitten kittens", "horse": "horse horses pony ponies",
    "bird": "bird birds duck ducks seagull seagulls goose geese pigeon pigeons", "cow": "cow cows cattle bull bulls",
    "sheep": "sheep lamb lambs", "ball": "ball balls", "frisbee": "frisbee frisbees", "stick": "stick sticks",
    "toy": "toy toys", "bicycle": "bicycle bicycles bike bikes", "motorcycle": "motorcycle motorcycles motorbike",
    "car": "car cars", "truck": "truck trucks", "bus": "bus buses", "train": "train trains",
    "boat": "boat boats canoe canoes kayak kayaks raft", "skateboard": "skateboard skateboards",
    "surfboard": "surfboard surfboards", "snowboard": "snowboard snowboards", "skis": "ski skis", "sled": "sled sleds",
    "kite": "kite kites", "umbrella": "umbrella umbrellas", "tent": "tent tents", "bench": "bench benches",
    "chair": "chair chairs", "table": "table tables", "couch": "couch sofa", "bed": "bed beds",
    "fountain": "fountain fountains", "guitar": "guitar guitars", "drum": "drum drums",
    "microphone": "microphone microphones", "camera": "camera cameras", "phone": "phone cellphone",
    "book": "book books", "bag": "bag bags backpack backpacks purse", "hat": "hat hats cap caps",
    "helmet": "helmet helmets", "glasses": "glasses sunglasses goggles", "shirt": "shirt shirts jersey jerseys",
    "jacket": "jacket jackets coat coats", "dress": "dress dresses", "shorts": "shorts", "pants": "pants jeans",
    "flag": "flag flags", "sign": "sign signs", "fence": "fence fences", "wall": "wall walls",
    "building": "building buildings", "house": "house houses", "bridge": "bridge bridges",
    "stairs": "stairs steps staircase", "tree": "tree trees", "flower": "flower flowers", "grass": "grass grassy",
    "field": "field fields", "snow": "snow snowy", "water": "water", "beach": "beach", "sand": "sand sandy",
    "ocean": "ocean sea", "lake": "lake", "river": "river stream creek", "pool": "pool", "rock": "rock rocks",
    "mountain": "mountain mountains hill hills", "street": "street streets road sidewalk", "wave": "wave waves",
    "rope": "rope ropes", "net": "net", "window": "window windows", "door": "door doors", "food": "food",
}
_OBJECT_OF = {w: o for o, ws in OBJECTS.items() for w in ws.split()}


def objects_named(text):  # str -> the objects it names (set of OBJECTS keys)
    return {_OBJECT_OF[w] for w in re.findall(r"[a-z]+", text.lower()) if w in _OBJECT_OF}


def description_scores(descriptions, captions):  # [images] str, [images][refs] str -> {coverage, chair_i, ...}
    """coverage: of the objects at least 2 of an image's captions name, the share its description names (summed
    over images); chair_i: of the objects the descriptions name, the share that no caption of their image names;
    chair_s: the share of descriptions that name at least one such object. Counted per image and object."""
    consensus = covered = named = hallucinated = with_any = 0
    for d, refs in zip(descriptions, captions):
        counts = Counter(o for r in refs for o in objects_named(r))
        said, agreed = objects_named(d), {o for o, k in counts.items() if k >= 2}
        consensus, covered = consensus + len(agreed), covered + len(agreed & said)
        wrong = said - set(counts)
        named, hallucinated, with_any = named + len(said), hallucinated + len(wrong), with_any + bool(wrong)
    n = len(descriptions)
    return {"coverage": covered / consensus if consensus else 0.0, "chair_i": hallucinated / named if named else 0.0,
            "chair_s": with_any / n if n else 0.0, "objects_named": named / n if n else 0.0, "n": n}
