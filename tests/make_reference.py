"""Make the reference activations the tests compare against, from torch/transformers on the same weights.

    pip install torch==2.13.0 -e ".[reference]"
    python tests/make_reference.py [tokenizer] [decoder] [generation] ...   (default: all)

Writes small files under tests/reference/. The tests read them with NumPy alone (allow_pickle=False), so a
laptop without torch still checks every layer; where torch is installed they also compare live.
"""
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
REF = HERE / "reference"

import reference_impl as ref  # noqa: E402  (the reference models, shared with the live tests)
from helpers import (DECODER_PROMPT, HANDWRITTEN, VISION_TOKENS, WEIGHT_NAMES, real_example,  # noqa: E402
                     to_levels, tokenizer_strings, vision_inputs)
from tinyllava import weights  # noqa: E402

def make_tokenizer():
    tok = ref.tokenizer()
    strings = HANDWRITTEN + tokenizer_strings(seed=0, n=120)
    ids = [tok(s, add_special_tokens=False).input_ids for s in strings]
    (REF / "tokenizer.json").write_text(json.dumps({"strings": strings, "ids": ids}, ensure_ascii=True))
    print(f"tokenizer: {len(strings)} strings")


# -- decoder ---------------------------------------------------------------------------------------------


def make_decoder():
    tok = ref.tokenizer()
    ids = tok.apply_chat_template(DECODER_PROMPT, tokenize=True, add_generation_prompt=True, return_dict=False)
    hidden, logits = ref.decoder_activations(ids)
    np.savez_compressed(REF / "decoder.npz", ids=np.array(ids, np.int32), hidden=hidden,
                        logits_last=logits[-2:])
    print(f"decoder: {len(ids)} tokens, hidden {hidden.shape}")


# -- greedy generation -----------------------------------------------------------------------------------
GENERATION_PROMPTS = [
    "What is the capital of France?", "Name three primary colours.", "Write a haiku about autumn leaves.",
    "What is 12 times 12?", "Explain photosynthesis in one sentence.", "Translate 'good morning' into Spanish.",
    "Give me a synonym for happy.", "What do cats like to eat?", "Write a Python function that adds two numbers.",
    "Why is the sky blue?", "List two planets of the solar system.", "How many legs does a spider have?",
]


def make_generation():
    tok = ref.tokenizer()
    out = []
    for p in GENERATION_PROMPTS:
        ids = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=True, add_generation_prompt=True,
                                      return_dict=False)
        new = ref.greedy(ids, 32)
        out.append({"prompt": p, "ids": ids, "new": new, "text": tok.decode(new)})
        print(f"  {p!r} -> {tok.decode(new)!r}")
    (REF / "generation.json").write_text(json.dumps(out, ensure_ascii=True, indent=0))


# -- vision tower and preprocessing -----------------------------------------------------------------------
def make_vision():
    images = vision_inputs()
    proc = ref.image_processor()
    pixels = np.stack([proc(images=im, return_tensors="np")["pixel_values"][0] for im in images])
    hidden, embeds = ref.vision_activations(pixels)
    np.savez_compressed(REF / "vision.npz", levels=to_levels(pixels), tokens=np.array(VISION_TOKENS),
                        hidden=hidden[:, :, VISION_TOKENS], image_embeds=embeds)
    print(f"vision: {len(images)} images, hidden {hidden.shape} saved at {len(VISION_TOKENS)} positions")


# -- gradient through the real decoder ---------------------------------------------------------------------
def make_gradient():
    from tinyllava.model import load_decoder
    model, tok = load_decoder()
    x, at, targets = real_example(model, tok)
    loss, grad = ref.hf_input_grad(x, at, targets)
    np.savez_compressed(REF / "gradient.npz", x=x, loss=np.float64(loss), grad=grad)
    print(f"gradient: loss {loss:.4f} over {len(targets)} tokens, |grad| max {np.abs(grad).max():.3e}")


def make_weight_gradient():
    """Weight gradients of the real decoder (transformers' autograd), rows 0..63 of each (the file stays small)."""
    from tinyllava.model import load_decoder
    model, tok = load_decoder()
    x, at, targets = real_example(model, tok)
    loss, grads = ref.hf_weight_grads(x, at, targets, WEIGHT_NAMES)
    np.savez_compressed(REF / "weight_gradient.npz", **{name: g[:64] for name, g in grads.items()})
    print(f"weight gradients: {len(grads)} weights, loss {loss:.4f}")


PARTS = {"tokenizer": make_tokenizer, "decoder": make_decoder, "generation": make_generation,
         "vision": make_vision, "gradient": make_gradient, "weight_gradient": make_weight_gradient}

if __name__ == "__main__":
    REF.mkdir(exist_ok=True)
    weights.decoder_path()
    for name in sys.argv[1:] or PARTS:
        PARTS[name]()
