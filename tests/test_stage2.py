"""The committed stage-2 model (weights/stage2-projector.gguf + stage2-lora.gguf): its answers, with the adapters
beside the float32 or the quantized products, are transformers' answers with the adapters merged into SmolLM2,
token for token; and `generate` uses it for questions about images unless told --stage 1."""
import subprocess
import sys
from pathlib import Path

import pytest

from tinyllava.decoding import Sampling, generate
from tinyllava.generate import CAPTION_REQUEST
from tinyllava.image import preprocess
from tinyllava.model import Chat, load_llava
from tinyllava.weights import stage2_paths
from tinyllava.weights import demo_photos

QUESTIONS = ["Is there a person in the image? Answer yes or no.", "What is happening in this image?"]


def image_and_prompts(llava, photo):
    """The photo's 196 image tokens, and the prompt embeddings [1, T, d] of each question about it."""
    tokens = llava.image_tokens(preprocess(photo, pad=True)[None])[0]            # [196, d], as generate pads
    return tokens, [Chat(llava, [tokens]).prompt(q)[0] for q in QUESTIONS]


def readme_first_output():  # the caption the README shows for its first command (the same demo photo)
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    return text.split("$ python -m tinyllava.generate\n", 1)[1].split("```", 1)[0].strip().splitlines()[-1]


@pytest.fixture(scope="module")
def photo():
    return demo_photos()["astronaut.png"]


def test_the_committed_files_are_there():
    assert all(p.exists() for p in stage2_paths()), "weights/stage2-*.gguf are committed with the repository"


@pytest.mark.parametrize("engine", ["float32", "fused"])
def test_answers_equal_transformers_with_the_adapters_merged(engine, photo, reference, monkeypatch):
    from tinyllava import fused
    monkeypatch.setattr(fused, "INTEGER", False)  # the float kernels: x86's integer ones round x to 8 bits
    projector, adapter = stage2_paths()
    llava = load_llava(projector, adapter=adapter, quantized=engine == "fused")
    _, prompts = image_and_prompts(llava, photo)
    merged = reference.with_adapters(llava.decoder)
    for x in prompts:
        ours = list(generate(llava.decoder, x, Sampling(24), {llava.tok.eos_id}))
        assert ours == reference.greedy_embeds(merged, x[0], 24), llava.tok.decode(ours)


def test_generate_answers_about_an_image_with_stage2_unless_told(photo, monkeypatch):
    """A question goes to stage 2 by default; with no question, stage 2 is asked for a caption and stage 1 (as it
    was trained) sees the image alone. On the float kernels, which every CPU runs alike (the README's first
    output is theirs; it says what x86's integer kernels print)."""
    from tinyllava import fused
    monkeypatch.setattr(fused, "INTEGER", False)

    def cli(*args):
        r = subprocess.run([sys.executable, "-m", "tinyllava.generate", "--image", photo, *args],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    projector, adapter = stage2_paths()
    stage2 = load_llava(projector, adapter=adapter, quantized=True)
    stage1 = load_llava(quantized=True)
    (tokens2, _), (tokens1, _) = image_and_prompts(stage2, photo), image_and_prompts(stage1, photo)
    assert cli("-p", QUESTIONS[0]) == stage2.answer(QUESTIONS[0], [tokens2]).strip()
    assert cli("-p", QUESTIONS[0], "--stage", "1") == stage1.answer(QUESTIONS[0], [tokens1]).strip()
    assert cli() == stage2.answer(CAPTION_REQUEST, [tokens2]).strip() == readme_first_output()
    assert cli("--stage", "1") == stage1.caption(tokens1).strip()
