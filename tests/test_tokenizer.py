"""The tokenizer, id for id against SmolLM2's tokenizer (transformers on the same GGUF; see reference_impl)."""
import pytest

from helpers import load_json, tokenizer_strings
from tinyllava.tokenizer import pre_tokenize


@pytest.fixture(scope="module")
def tok(decoder):
    return decoder[1]


def test_saved_reference_ids(tok):
    ref = load_json("tokenizer.json")
    assert len(ref["strings"]) >= 200
    for s, ids in zip(ref["strings"], ref["ids"]):
        assert tok.encode(s) == ids, repr(s)


def test_live_reference_on_other_strings(tok, reference):
    ref = reference.tokenizer()
    for s in tokenizer_strings(seed=12345, n=300):
        assert tok.encode(s) == ref(s, add_special_tokens=False).input_ids, repr(s)


def test_decode_inverts_encode(tok):
    strings = load_json("tokenizer.json")["strings"] + tokenizer_strings(seed=7, n=200)
    for s in strings:
        if "\x1d" in s:  # a byte the vocabulary lacks: dropped, as by the reference (see encode_ordinary)
            assert tok.decode(tok.encode(s)) == s.replace("\x1d", "")
        else:
            assert tok.decode(tok.encode(s)) == s, repr(s)


def test_special_tokens_inside_text(tok):
    assert tok.encode("a<|im_end|>b") == tok.encode("a") + [2] + tok.encode("b")
    assert tok.encode("<|im_end|>", special=False) != [2]
    assert tok.decode([1, 2]) == "<|im_start|><|im_end|>"


def test_pre_tokenizer_splits_digits_and_keeps_gpt2_rules():
    assert pre_tokenize("I have 123 apples") == ["I", " have", " ", "1", "2", "3", " apples"]
    assert pre_tokenize("it's  ok\n\nyes ") == ["it", "'s", " ", " ok", "\n", "\n", "yes", " "]
    assert pre_tokenize("a!?  b") == ["a", "!?", " ", " b"]


def test_chat_template_matches_the_gguf_template(tok, reference):
    ref = reference.tokenizer()
    for msgs in ([{"role": "user", "content": "hi"}],
                 [{"role": "system", "content": "S"}, {"role": "user", "content": "u"},
                  {"role": "assistant", "content": "a"}, {"role": "user", "content": "v"}]):
        assert tok.chat(msgs) == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
