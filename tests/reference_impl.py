"""The references: torch/transformers running the same weights. Used by make_reference.py to write
tests/reference/, and by the live tests where torch is installed.

The decoder and tokenizer come from transformers loading the very GGUF tinyllava reads
(`from_pretrained(dir, gguf_file=...)`). One correction: transformers 5.23 builds the tokenizer of a
`tokenizer.ggml.pre = smollm` file with GPT-2's pre-tokenizer alone, while SmolLM2's own tokenizer.json and
llama.cpp first split every digit apart ("  3" is 'Ġ','Ġ','3' without that split, 'ĠĠ','3' with it). We add
that Digits step, so the reference is SmolLM2's real tokenizer; llama.cpp agrees with it on the test strings.
"""
import functools
import os

import numpy as np

from tinyllava import weights


def available():
    """Is torch/transformers here? In CI (TINYLLAVA_REQUIRE_REFERENCE=1) its absence is an error, not a skip."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
        return True
    except ImportError:
        if os.environ.get("TINYLLAVA_REQUIRE_REFERENCE") == "1":
            raise
        return False


@functools.lru_cache(maxsize=None)
def tokenizer():
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer
    path = weights.ensure(weights.SMOLLM2)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    bt = tok.backend_tokenizer
    bt.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), bt.pre_tokenizer])
    return tok


@functools.lru_cache(maxsize=None)
def decoder():
    import torch
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    path = weights.ensure(weights.SMOLLM2)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()


def decoder_activations(ids):
    """-> every block's output [n_layers, T, d] (float32) and the logits [T, vocab]."""
    import torch
    model = decoder()
    outs = []
    hooks = [layer.register_forward_hook(lambda m, i, o: outs.append((o[0] if isinstance(o, tuple) else o)[0]))
             for layer in model.model.layers]
    try:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
    finally:
        for h in hooks:
            h.remove()
    return np.stack([o.numpy() for o in outs]), logits.numpy()


def greedy(ids, n):
    """The reference's greedy continuation (stops at the end-of-turn token, like tinyllava)."""
    import torch
    model = decoder()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()
