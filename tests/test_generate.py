"""Generation: greedy decoding token for token against the reference, sampling, and the CLI."""
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import load_json
from tinyllava.decoding import Sampling, generate, sample
from tinyllava.model import Chat, Llava


@pytest.mark.parametrize("case", load_json("generation.json"), ids=lambda c: c["prompt"][:24])
def test_greedy_32_tokens_equal_the_reference(decoder, case):
    model, tok = decoder
    ids = tok.encode(tok.chat([{"role": "user", "content": case["prompt"]}]))
    assert ids == case["ids"]
    new = list(generate(model, model.embed([ids]), Sampling(32), {tok.eos_id}))
    assert new == case["new"], tok.decode(new)


def test_the_cache_grows_as_tokens_come(decoder, monkeypatch):
    """generate() reserves KV positions for a few tokens after the prompt, not for n_predict, and doubles them
    when the answer needs more: the tokens are the reference's when the cache has to grow during the answer."""
    from tinyllava import decoding
    from tinyllava.llama import KVCache
    monkeypatch.setattr(decoding, "RESERVE", 1)
    model, tok = decoder
    case = load_json("generation.json")[0]
    T, cache = len(case["ids"]), KVCache(model.cfg, 1, 0)
    assert list(generate(model, model.embed([case["ids"]]), Sampling(256), {tok.eos_id}, cache)) == case["new"]
    assert len(case["new"]) > 2 and cache.k.shape[2] == 2 * (T + 1)  # T + 1, then doubled once


def test_greedy_equals_live_reference_on_other_prompts(decoder, reference):
    model, tok = decoder
    for prompt in ["What is a rainbow?", "Suggest a name for a dog."]:
        ids = tok.encode(tok.chat([{"role": "user", "content": prompt}]))
        assert list(generate(model, model.embed([ids]), Sampling(24), {tok.eos_id})) == reference.greedy(ids, 24)


def test_sampling():
    logits = np.log(np.array([0.1, 0.6, 0.3], np.float32))
    rng = np.random.default_rng(0)
    assert sample(logits) == 1
    assert sample(logits, temp=1.0, top_k=1, rng=rng) == 1
    assert sample(logits, temp=1.0, top_p=0.5, rng=rng) == 1            # 0.6 alone reaches the mass
    draws = [sample(logits, temp=1.0, rng=rng) for _ in range(4000)]
    assert np.allclose(np.bincount(draws, minlength=3) / 4000, [0.1, 0.6, 0.3], atol=0.03)
    draws = [sample(logits, temp=1.0, top_k=2, rng=rng) for _ in range(4000)]
    assert np.allclose(np.bincount(draws, minlength=3) / 4000, [0, 2 / 3, 1 / 3], atol=0.03)
    a = [sample(logits, 1.0, rng=np.random.default_rng(5)) for _ in range(3)]
    assert a == [sample(logits, 1.0, rng=np.random.default_rng(5)) for _ in range(3)]


def test_chat_turns_reuse_the_cache_and_equal_the_whole_conversation(decoder):
    """A second turn fed on top of the first turn's KV cache gives the answer that the whole conversation,
    rendered by the chat template and run from scratch, gives; a turn cut short by -n is completed right."""
    model, tok = decoder
    llava = Llava(model, tok)
    for n in (64, 5):  # 5: the first answer stops early, its last sampled token is fed with the next turn
        chat = Chat(llava)
        first = chat.ask("Name a colour.", Sampling(n))
        second = chat.ask("And another one?", Sampling(12))
        history = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": first}]
        assert second == llava.answer("And another one?", history=history, sampling=Sampling(12))
        assert chat.text.startswith(tok.chat(history + [{"role": "user", "content": "And another one?"}]))


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "tinyllava.generate", *args], capture_output=True, text=True,
                          timeout=300, env=None if env is None else dict(os.environ, **env))


def test_cli_answers_the_reference_answer():
    """transformers' answer, from the command as a user runs it (the float kernels: x86's integer ones, opt-in,
    round x to 8 bits, and this answer's first token is a near tie that they tip; the README's "Speed and memory")."""
    r = run_cli("-p", "What is the capital of France?")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "The capital of France is Paris.\n"


def test_cli_rejects_an_empty_prompt_in_one_line():
    r = run_cli("-p", "   ")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().count("\n") == 0 and "empty" in r.stderr
