"""Byte-level BPE, as SmolLM2 (and GPT-2) tokenize text, built from the vocabulary inside the GGUF.

    text --split out special tokens--> pieces --pre-tokenize--> words --bytes as printable chars--> BPE --> ids

1. Special tokens (GGUF token type 3, "control": <|im_start|>, <|im_end|>, ...) are matched whole in the text.
2. The pre-tokenizer cuts the rest into words that BPE never merges across. SmolLM2 (GGUF
   `tokenizer.ggml.pre = smollm`) first puts every digit on its own, then applies GPT-2's rule:
       's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+
   written out below as a small scanner, because Python's `re` has no \\p{L} (letter) or \\p{N} (number).
3. Each word's UTF-8 bytes become printable characters (GPT-2's byte-to-unicode table: a space is 'Ġ'),
   and BPE merges adjacent pairs, always the pair that comes first in the merge list, until none applies.
"""
import re
import unicodedata
from functools import lru_cache

from .gguf import GGUFFile

# Unicode White_Space: what \s matches in the regex engine of the reference tokenizer (not str.isspace(),
# which also counts the ASCII separators \x1c-\x1f).
WHITESPACE = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
                       "\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


def bytes_to_unicode():
    """GPT-2's table: byte -> printable character. Printable Latin-1 bytes map to themselves, the other 68
    bytes (controls, space, ...) to the characters from U+0100 up, so every token is printable text."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@lru_cache(maxsize=None)
def _kind(c):  # 'L' letter, 'N' number, 'S' whitespace, 'P' anything else
    if c in WHITESPACE:
        return "S"
    cat = unicodedata.category(c)[0]
    return cat if cat in "LN" else "P"


def _run(text, i, kind):  # end of the run of characters of this kind starting at i
    while i < len(text) and _kind(text[i]) == kind:
        i += 1
    return i


def gpt2_split(text):
    """GPT-2's pre-tokenizer regex, alternative by alternative, as a scanner. -> list of words"""
    words, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        k = _kind(c)
        nxt = _kind(text[i + 1]) if i + 1 < n else None
        if c == "'" and (m := next((s for s in CONTRACTIONS if text.startswith(s, i)), None)):
            j = i + len(m)                                   # 's|'t|'re|'ve|'m|'ll|'d
        elif k in "LN":
            j = _run(text, i, k)                             # \p{L}+ or \p{N}+
        elif c == " " and nxt in ("L", "N"):
            j = _run(text, i + 1, nxt)                       # ' ?\p{L}+' or ' ?\p{N}+' with the space
        elif k == "P" or (c == " " and nxt == "P"):
            j = _run(text, i + 1, "P")                       # ' ?[^\s\p{L}\p{N}]+'
        else:
            j = _run(text, i, "S")                           # \s+(?!\S): leave the last space to the word after it
            if j < n and j - i > 1:
                j -= 1                                       # (a single space falls through to \s+)
        words.append(text[i:j])
        i = j
    return words


def pre_tokenize(text):
    """SmolLM2's pre-tokenizer: digits one by one, then GPT-2's split of what lies between. -> list of words"""
    words, start = [], 0
    for i, c in enumerate(text):
        if _kind(c) == "N":
            words += gpt2_split(text[start:i]) + [c]
            start = i + 1
    return words + gpt2_split(text[start:])


class Tokenizer:
    """SmolLM2's byte-level BPE, read from the GGUF: encode (text -> ids: the digit split, GPT-2's pre-tokenizer,
    then merges by rank), decode (ids -> text), and chat (ChatML messages -> the prompt's text)."""

    def __init__(self, tokens, merges, token_types, eos_id, chat_template_system=None):
        self.tokens = list(tokens)                               # id -> token text (in the byte alphabet)
        self.ids = {t: i for i, t in enumerate(self.tokens)}     # token text -> id
        self.ranks = {m: r for r, m in enumerate(merges)}         # "left right" -> priority (lower first)
        self.special = {t: i for i, (t, ty) in enumerate(zip(self.tokens, token_types)) if ty == 3}
        self.eos_id = eos_id
        self.byte_char = bytes_to_unicode()
        self.char_byte = {c: b for b, c in self.byte_char.items()}
        self.special_re = re.compile("|".join(re.escape(t) for t in sorted(self.special, key=len, reverse=True)))
        self.default_system = chat_template_system
        self._bpe = lru_cache(maxsize=65536)(self._bpe_uncached)

    @classmethod
    def load(cls, path):
        """The tokenizer stored in a GGUF (no weight is read)."""
        return cls.from_gguf(GGUFFile(path))

    @classmethod
    def from_gguf(cls, gguf_file):
        g = gguf_file
        template = g.get("tokenizer.chat_template", "")
        # SmolLM2's template inserts a default system turn; take its text from the file, not from here.
        m = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", template, re.S)
        return cls(g.require("tokenizer.ggml.tokens"), g.require("tokenizer.ggml.merges"),
                   g.require("tokenizer.ggml.token_type"), int(g.require("tokenizer.ggml.eos_token_id")),
                   m.group(1) if m else None)

    def __len__(self):
        return len(self.tokens)

    def _bpe_uncached(self, word):  # word in the byte alphabet -> tuple of tokens
        parts = list(word)
        while len(parts) > 1:
            pairs = [(self.ranks.get(f"{a} {b}", float("inf")), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            rank, i = min(pairs)
            if rank == float("inf"):
                break
            left, right = parts[i], parts[i + 1]
            merged, j = [], 0
            while j < len(parts):  # merge every occurrence of the pair, left to right
                if j + 1 < len(parts) and parts[j] == left and parts[j + 1] == right:
                    merged.append(left + right)
                    j += 2
                else:
                    merged.append(parts[j])
                    j += 1
            parts = merged
        return tuple(parts)

    def encode_ordinary(self, text):
        """Text -> ids, treating special-token text as ordinary characters.

        (*) SmolLM2's vocabulary lacks 21 of the 256 bytes (the controls \x04 \x06 \x13 \x14 \x16 \x1d and
        bytes that never occur in UTF-8 below U+40000); like the reference and llama.cpp, those are dropped."""
        ids = []
        for word in pre_tokenize(text):
            chars = "".join(self.byte_char[b] for b in word.encode("utf-8"))
            ids += [self.ids[t] for t in self._bpe(chars) if t in self.ids]  # (*)
        return ids

    def encode(self, text, special=True):
        """Text -> ids. With special=True (as the reference does) <|im_start|> etc. in the text become their ids."""
        if not special or not self.special:
            return self.encode_ordinary(text)
        ids, start = [], 0
        for m in self.special_re.finditer(text):
            ids += self.encode_ordinary(text[start:m.start()]) + [self.special[m.group()]]
            start = m.end()
        return ids + self.encode_ordinary(text[start:])

    def decode_bytes(self, ids):
        return bytes(self.char_byte[c] for i in ids for c in self.tokens[i])

    def decode(self, ids):
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def chat(self, messages, add_generation_prompt=True):
        """ChatML, as SmolLM2's chat template writes it: a default system turn unless one is given, then
        `<|im_start|>role\\ncontent<|im_end|>\\n` per message, then `<|im_start|>assistant\\n`. -> text"""
        text = ""
        if self.default_system is not None and (not messages or messages[0]["role"] != "system"):
            text += f"<|im_start|>system\n{self.default_system}<|im_end|>\n"
        for m in messages:
            text += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")
