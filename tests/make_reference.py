"""Make the reference activations the tests compare against, from torch/transformers on the same weights, and the
blocks llama.cpp's own quantizer makes (the `gguf` package cannot make K-quants).

    pip install torch==2.13.0 -e ".[reference]"
    python tests/make_reference.py [tokenizer] [decoder] [generation] ...   (default: all but quantize)
    pip install llama-cpp-python==0.3.36        # compiles llama.cpp (the README says how long)
    python tests/make_reference.py quantize

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


# -- llama.cpp's quantizers --------------------------------------------------------------------------------
def tensor_digests(path):  # {name: [type name, sha256 of its bytes]}
    import hashlib

    from tinyllava.gguf import GGUFFile
    return {name: [t.type.name, hashlib.sha256(np.ascontiguousarray(t.data).tobytes()).hexdigest()]
            for name, t in GGUFFile(path).tensors.items()}


def make_quantize():
    """llama.cpp's blocks for random rows of several kinds (quantize.npz), and what `llama-quantize ... Q4_K_M`
    makes of float32 decoders (q4_k_m.json: each tensor's type and the sha256 of its bytes): SmolLM2's weights
    as tinyllava dequantizes them, and the small random decoder of tests/helpers.py that test_export quantizes."""
    import tempfile

    from helpers import QUANTIZE_ROWS, TINY_K_DECODER, float32_copy, write_tiny_decoder
    from tinyllava.llamacpp import quantize_file, quantize_rows
    from tinyllava.quant import GGMLType
    saved = {}
    for name, x in QUANTIZE_ROWS().items():
        saved[name] = x
        for t in (GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q4_K,
                  GGMLType.Q6_K):
            saved[f"{name}.{t.name}"] = quantize_rows(x, t)
    np.savez_compressed(REF / "quantize.npz", **saved)
    digests = {}
    with tempfile.TemporaryDirectory() as tmp:
        f32 = float32_copy(weights.decoder_path(), Path(tmp) / "smollm2-f32.gguf")
        for name, src in (("SmolLM2", f32), ("tiny", write_tiny_decoder(Path(tmp) / "tiny.gguf", **TINY_K_DECODER))):
            digests[name] = tensor_digests(quantize_file(src, Path(tmp) / f"{name}-q4_k_m.gguf", "Q4_K_M"))
    (REF / "q4_k_m.json").write_text(json.dumps(digests, indent=0))
    print(f"quantize: {len(QUANTIZE_ROWS())} kinds of rows; Q4_K_M of SmolLM2 ({len(digests['SmolLM2'])} tensors) "
          f"and of the tiny decoder ({len(digests['tiny'])})")


PARTS = {"tokenizer": make_tokenizer, "decoder": make_decoder, "generation": make_generation,
         "vision": make_vision, "gradient": make_gradient, "weight_gradient": make_weight_gradient}

if __name__ == "__main__":
    REF.mkdir(exist_ok=True)
    weights.decoder_path()
    for name in sys.argv[1:] or PARTS:
        {**PARTS, "quantize": make_quantize}[name]()
