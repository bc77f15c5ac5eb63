"""Benchmark: tinyllava's fused quantized path against its float32 reference path, llama.cpp and torch.

    python -m tinyllava.bench                 # one markdown table (a few minutes)
    python -m tinyllava.bench --threads 1 --json
    python -m tinyllava.bench --profile       # where the fused engine's time goes
    python -m tinyllava.bench --engines fused,fused-int,llama.cpp --model smollm2-q4_k_m.gguf   # another decoder

Every engine runs in its own subprocess, so its peak RSS (VmHWM) is its own, with the same thread count
(OMP/OpenBLAS/MKL/numba threads, torch.set_num_threads, llama.cpp n_threads). Each measures, on the same
token ids and the same GGUF files:

    time to first token  load the decoder, then a 220-token prompt (the size of an image prompt: 196 image
                         tokens and some text), then the first greedy token; in a fresh process of its own
    prefill              tokens/s over that prompt, warm (median of --reps)
    decode               tokens/s of 32 greedy tokens after it (median of --reps)
    vision tower         seconds per 224x224 image, LLaVA's feature (CLIP ViT-B/16 up to block 11 of 12)
    peak RSS             of a generate-like run: decoder and vision tower loaded, one image encoded, then
                         the prompt and the decoded tokens (VmHWM of that worker); and, with the fused
                         engine, of the README's first command itself (python -m tinyllava.generate)

The fused engine decodes with the float kernels (the reference: every CPU computes alike);
fused-int is the same engine on the integer kernels (TINYLLAVA_INTEGER_KERNELS=1), not run unless asked for.
--model FILE gives tinyllava's engines, llama.cpp and torch another decoder GGUF (a Q4_K_M export, say).

Timings on a shared machine are noisy: compare engines within one run, not across runs. When other work
keeps the cores busy, every engine's threads wait for each other (the README measures by how much): then
`--threads 1` is the fair comparison.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ENGINES = ("fused", "fused-int", "reference", "llama.cpp", "torch")
DEFAULT_ENGINES = ("fused", "reference", "llama.cpp", "torch")
COLUMNS = {"fused": "tinyllava fused", "fused-int": "tinyllava fused, integer kernels",
           "reference": "tinyllava reference float32", "llama.cpp": "llama.cpp (llama-cpp-python)",
           "torch": "torch/transformers"}
PROMPT = ("Describe the picture in detail. " * 60)  # tokenized, then cut to --prompt-tokens ids


# -- measuring, inside a worker --------------------------------------------------------------------------
def rss_mb(key="VmRSS"):  # this process's resident memory in MB of 10^6 bytes, as the files (VmHWM: the peak)
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024 / 1e6  # the kernel's "kB" are KiB
    return float("nan")


def median_time(fn, reps):  # run fn() reps times -> median seconds
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def prompt_ids(n):
    from .tokenizer import Tokenizer
    from .weights import decoder_path
    return Tokenizer.load(decoder_path()).encode(PROMPT)[:n]


def pixels():  # one preprocessed 224x224 image; the content does not change the work
    import numpy as np
    return np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)


def tinyllava_prefill(model, ids, room):  # -> (logits of the last position [vocab], KV cache with room to spare)
    from .llama import KVCache
    cache = KVCache(model.cfg, 1, len(ids) + room)
    return model.logits(model.forward(model.embed([ids]), cache)[0, -1]), cache


def tinyllava_decode(model, cache, tok_id, n):  # n greedy steps after tok_id, appended to cache -> the last token
    import numpy as np
    for _ in range(n):
        tok_id = int(np.argmax(model.logits(model.forward(model.embed([[tok_id]]), cache)[0, -1])))
    return tok_id


def run_tinyllava(args, fused):
    """The tinyllava engines: fused (quantized blocks, fused.QuantMatrix) or reference (float32 at load). In
    the order of a generate run with an image: load both models, encode the image, then the prompt, then
    decode. Both drop the vision tower after the image and keep freed memory for reuse
    (runtime.keep_freed_memory), as generate does."""
    import numpy as np
    memory = {"imports": rss_mb()}
    from . import fused as fused_mod
    from . import runtime
    from .model import load_decoder
    from .vit import Clip
    from .weights import decoder_path, vision_path
    load_matrix = fused_mod.QuantMatrix.from_tensor if fused else None
    paths = args.model or decoder_path(), vision_path()  # verified (sha256) before the clock starts
    ids = args.ids
    runtime.keep_freed_memory()

    t0 = time.perf_counter()
    model, tok = load_decoder(paths[0], quantized=fused)
    memory["decoder + tokenizer loaded"] = rss_mb()

    def prefill():  # -> (logits of the last position, cache)
        return tinyllava_prefill(model, ids, args.decode_tokens + 1)

    if args.ttft:
        first = int(np.argmax(prefill()[0]))
        return {"ttft_s": time.perf_counter() - t0, "first_token": first}

    tower = Clip.load(paths[1], load_matrix=load_matrix)
    memory["vision tower loaded"] = rss_mb()
    px = pixels()
    tower.features(px)  # warm
    vision = median_time(lambda: tower.features(px), args.reps)
    memory["image encoded"] = rss_mb()
    tower = None  # dropped, as generate drops it (the fused one's file is unmapped with it)
    memory["vision tower dropped"] = rss_mb()
    prefill()  # warm
    prefill_s = median_time(prefill, args.reps)
    logits, cache = prefill()
    memory["prompt done"] = rss_mb()

    decode_s = median_time(lambda: tinyllava_decode(model, cache.copy(), int(np.argmax(logits)), args.decode_tokens),
                           args.reps)
    memory["decoded"] = rss_mb()
    out = {"prefill_tok_s": len(ids) / prefill_s, "decode_tok_s": args.decode_tokens / decode_s,
           "vision_s": vision, "peak_rss_mb": rss_mb("VmHWM"), "memory_mb": memory}
    if fused:
        from . import simd
        out["engine"] = fused_mod.ENGINE
        out["kernels"] = f"integer ({simd.INSTRUCTIONS})" if fused_mod.INTEGER else "float"
    return out


def run_llama_cpp(args):
    """llama.cpp through llama-cpp-python (tinyllava/llamacpp.py), on the same decoder GGUF; its vision tower is
    tinyllava's exported mmproj (python -m tinyllava.export) with the committed projector."""
    import tempfile

    import numpy as np

    from .export import export_mmproj
    from .llamacpp import LlamaCpp
    from .projector import Projector
    from .weights import default_projector_path, vision_path
    ids, mmproj = args.ids, None
    with tempfile.TemporaryDirectory() as tmp:  # llama.cpp reads the mmproj once, at load
        if not args.ttft and default_projector_path().exists():
            mmproj = export_mmproj(Path(tmp) / "mmproj.gguf", vision_path(), Projector.load(default_projector_path()))
        t0 = time.perf_counter()
        cpp = LlamaCpp(mmproj, args.threads, extra_buffer_types=not args.no_extra_bufts, model=args.model)
    llm = cpp.llm

    def prefill():
        llm.reset()
        llm.eval(ids)
        return int(np.argmax(cpp.logits()))  # (llm.scores stays zeros unless every position's logits are kept)

    first = prefill()
    if args.ttft:
        return {"ttft_s": time.perf_counter() - t0, "first_token": first}
    vision = None
    if mmproj is not None:
        rgb = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)  # 224x224: no resampling
        cpp.embeddings(rgb)  # warm
        vision = median_time(lambda: cpp.embeddings(rgb), args.reps)
    prefill_s = median_time(prefill, args.reps)

    def decode_timed():
        tok = prefill()
        t = time.perf_counter()
        for _ in range(args.decode_tokens):
            llm.eval([tok])
            tok = int(np.argmax(cpp.logits()))
        return time.perf_counter() - t

    decode_s = statistics.median(decode_timed() for _ in range(args.reps))
    return {"prefill_tok_s": len(ids) / prefill_s, "decode_tok_s": args.decode_tokens / decode_s,
            "vision_s": vision, "peak_rss_mb": rss_mb("VmHWM"), "extra_bufts": not args.no_extra_bufts}


def run_torch(args):
    import torch

    from .gguf import GGUFFile
    from .reference import clip_vision_model, llama_causal_lm
    from .weights import decoder_path, vision_path
    torch.set_num_threads(args.threads)
    path, ids = args.model or decoder_path(), torch.tensor([args.ids])
    t0 = time.perf_counter()
    model = llama_causal_lm(path)

    def prefill():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        return int(out.logits[0, -1].argmax()), out.past_key_values

    with torch.inference_mode():
        if args.ttft:
            first = prefill()[0]
            return {"ttft_s": time.perf_counter() - t0, "first_token": first}
        g = GGUFFile(vision_path())
        tower = clip_vision_model(lambda name: g.tensor(name).numpy(), n_layers=11)  # LLaVA's feature: block 11
        px = torch.from_numpy(pixels())
        tower(pixel_values=px)
        vision = median_time(lambda: tower(pixel_values=px), args.reps)
        prefill()
        prefill_s = median_time(prefill, args.reps)

        def decode_timed():
            tok, past = prefill()
            t = time.perf_counter()
            for _ in range(args.decode_tokens):
                out = model(input_ids=torch.tensor([[tok]]), past_key_values=past, use_cache=True)
                tok, past = int(out.logits[0, -1].argmax()), out.past_key_values
            return time.perf_counter() - t

        decode_s = statistics.median(decode_timed() for _ in range(args.reps))
    return {"prefill_tok_s": ids.shape[1] / prefill_s, "decode_tok_s": args.decode_tokens / decode_s,
            "vision_s": vision, "peak_rss_mb": rss_mb("VmHWM")}


def run_profile(args):
    """Where the fused engine's time goes: cProfile's own time per function over one image, one prefill and
    --decode-tokens decoding steps. Compiled loops (numba) and BLAS count toward the Python function that calls
    them (QuantMatrix.matmul, linear); cProfile's own overhead inflates the many small NumPy calls a little."""
    import cProfile
    import pstats

    import numpy as np

    from . import fused, runtime
    from .model import load_decoder
    from .vit import Clip
    from .weights import decoder_path, vision_path
    runtime.keep_freed_memory()
    model, _ = load_decoder(decoder_path(), quantized=True)
    tower = Clip.load(vision_path(), load_matrix=fused.QuantMatrix.from_tensor)
    px, ids = pixels(), args.ids

    logits, after_prompt = tinyllava_prefill(model, ids, args.decode_tokens + 1)
    first = int(np.argmax(logits))
    stages = {}
    for name, fn in [("vision tower, one image", lambda: tower.features(px)),
                     (f"prefill, {len(ids)} tokens", lambda: tinyllava_prefill(model, ids, args.decode_tokens + 1)),
                     (f"decode, {args.decode_tokens} tokens",
                      lambda: tinyllava_decode(model, after_prompt.copy(), first, args.decode_tokens))]:
        fn()  # warm
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.runcall(fn)
        seconds = time.perf_counter() - t0
        stats = pstats.Stats(prof).stats
        rows = sorted(((tt, nc, func if file == "~" else f"{Path(file).stem}.{func}")
                       for (file, _, func), (_, nc, tt, _, _) in stats.items()), reverse=True)
        stages[name] = {"seconds": seconds, "top": [[label, tt, nc] for tt, nc, label in rows[:12]]}
    return {"engine": fused.ENGINE, "threads": args.threads, "stages": stages}


def profile_table(prof):
    lines = [f"fused engine ({prof['engine']}), {prof['threads']} threads: cProfile's own time per function"]
    for name, st in prof["stages"].items():
        lines += ["", f"{name}: {st['seconds']:.3f} s", "", "| share | s | calls | function |", "|---|---|---|---|"]
        lines += [f"| {tt / st['seconds']:.0%} | {tt:.3f} | {nc} | `{label}` |" for label, tt, nc in st["top"]]
    return "\n".join(lines)


def worker(args):
    if args.profile:
        return run_profile(args)
    if args.worker in ("fused", "fused-int"):
        return run_tinyllava(args, fused=True)
    if args.worker == "reference":
        return run_tinyllava(args, fused=False)
    if args.worker == "llama.cpp":
        return run_llama_cpp(args)
    return run_torch(args)


# -- running the workers ---------------------------------------------------------------------------------
NEEDS = {"fused": (), "fused-int": (), "reference": (), "llama.cpp": ("llama_cpp",),
         "torch": ("torch", "transformers", "gguf")}


def installed(engine):
    import importlib.util
    return all(importlib.util.find_spec(mod) is not None for mod in NEEDS[engine])


def thread_env(threads):  # the environment of a fresh Python whose every thread pool has `threads` threads
    return dict(os.environ, **{var: str(threads) for var in
                               ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")})


def failure(returncode, stderr):  # why a process failed, in one line
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    why = f"signal {-returncode}" if returncode < 0 else (lines[-1] if lines else f"exit {returncode}")
    return "failed: " + why[:120]


def spawn(engine, args, ids, extra=()):
    """Run one engine in a fresh Python with the thread count fixed. -> (result dict or None, error text)"""
    env = thread_env(args.threads)
    if engine == "fused-int":
        env["TINYLLAVA_INTEGER_KERNELS"] = "1"
    cmd = [sys.executable, "-m", "tinyllava.bench", "--worker", engine, "--threads", str(args.threads),
           "--reps", str(args.reps), "--decode-tokens", str(args.decode_tokens), "--ids", ",".join(map(str, ids)),
           *(["--model", str(args.model)] if args.model else []), *extra]
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {args.timeout} s"
    if p.returncode != 0:
        return None, failure(p.returncode, p.stderr)
    return json.loads(p.stdout.strip().splitlines()[-1]), None


def run_generate(args):
    """The README's first command as a user runs it (`python -m tinyllava.generate`: the demo photo, captioned by
    the committed model), with --threads. -> {"peak_rss_mb": its own VmHWM, "files_mb": {file: MB} of the model
    files it loads} or {"error": why}"""
    import tempfile
    import threading

    from .weights import decoder_path, default_projector_path, stage2_paths, vision_path
    with tempfile.TemporaryFile() as err:
        p = subprocess.Popen([sys.executable, "-m", "tinyllava.generate", "--threads", str(args.threads)],
                             env=thread_env(args.threads), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=err)
        timer = threading.Timer(args.timeout, p.kill)
        timer.start()
        _, status, usage = os.wait4(p.pid, 0)  # the child's own peak, not that of every child so far
        timer.cancel()
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode != 0:
            err.seek(0)
            return {"error": failure(p.returncode, err.read().decode(errors="replace"))}
    # the files generate.py loads: the stage-2 model when it is there, else the stage-1 projector
    extra = stage2_paths() if all(q.exists() for q in stage2_paths()) else (default_projector_path(),)
    return {"peak_rss_mb": usage.ru_maxrss * 1024 / 1e6,
            "files_mb": {q.name: q.stat().st_size / 1e6 for q in (decoder_path(), vision_path(), *extra)}}


def collect(args):
    ids = prompt_ids(args.prompt_tokens)
    results, notes = {}, {}
    fused = "fused" in args.engines
    if fused or "fused-int" in args.engines:  # fill numba's on-disk cache, so TTFT is not a compile
        subprocess.run([sys.executable, "-c", "from tinyllava import bench; bench.warm_numba()"], timeout=args.timeout)
    for engine in args.engines:
        if not installed(engine):
            results[engine], notes[engine] = None, "not installed"
            continue
        print(f"bench: {engine} ...", file=sys.stderr, flush=True)
        extra = []
        res, err = spawn(engine, args, ids, ["--ttft"])
        if engine == "llama.cpp" and res is None and err.startswith("failed: signal"):
            # ggml's AMX kernels crash where the CPU reports AMX but the VM does not allow it: run without
            print(f"bench: llama.cpp crashed ({err}); again with use_extra_bufts=False", file=sys.stderr)
            extra = ["--no-extra-bufts"]
            res, err = spawn(engine, args, ids, ["--ttft", *extra])
        if res is not None:  # the first measurement worked: now the rest, in another fresh process
            ttft = res
            res, err = spawn(engine, args, ids, extra)
            if res is not None:
                res.update(ttft)
        results[engine], notes[engine] = res, err
    if fused:
        print("bench: python -m tinyllava.generate ...", file=sys.stderr, flush=True)
    first_command = run_generate(args) if fused else None
    return {"threads": args.threads, "prompt_tokens": len(ids), "decode_tokens": args.decode_tokens,
            "reps": args.reps, "cpu": cpu_name(), "vector_extensions": vector_extensions(),
            "numba_target": numba_target(), "cores": os.cpu_count(), "load_average": load_average(),
            "model_files_mb": model_files_mb(args.model), "results": results, "generate": first_command,
            "errors": {k: v for k, v in notes.items() if v}, "ratios": ratios(results)}


def warm_numba():  # compile the fused loops on every path a worker takes (numba caches them on disk for them)
    from . import fused, runtime
    from .llama import KVCache
    from .model import load_decoder
    if fused.ENGINE != "numba":
        return
    model, _ = load_decoder(quantized=True)
    for threads in (1, 2):                        # the one-thread and the parallel loops
        runtime.use_threads(threads)
        cache = KVCache(model.cfg, 1, 16)
        model.logits(model.forward(model.embed([list(range(1, 12))]), cache))   # tiles, then a few rows
        model.logits(model.forward(model.embed([[1, 2]]), cache))
        model.logits(model.forward(model.embed([[3]]), cache))                  # the compiled decoding step


def load_average():  # the machine's 1-minute load before the run: other work skews every engine alike
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except OSError:
        return None


def cpuinfo(field):  # the first "field : value" of /proc/cpuinfo, or None
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith(field)), None)
    except OSError:
        return None


def cpu_name():
    return cpuinfo("model name") or "unknown CPU"


VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                "avx_vnni", "gfni", "amx_int8")


def vector_extensions():  # -> the CPU's vector extensions among VECTOR_FLAGS, as /proc/cpuinfo names them
    flags = (cpuinfo("flags") or "").split()
    return [v for v in VECTOR_FLAGS if v in flags]


def numba_target():  # the CPU numba compiles the fused loops for: the host's, or NUMBA_CPU_NAME's
    """NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES=+avx,+avx2,+fma,+f16c compiles the AVX2 code on any x86 machine
    (with NUMBA_CPU_NAME alone, numba keeps the host's features: AVX-512 on a CPU that has it)."""
    try:
        import llvmlite.binding as llvm
    except ImportError:
        return None
    name = os.environ.get("NUMBA_CPU_NAME")
    return f"{name} (features {os.environ.get('NUMBA_CPU_FEATURES') or 'of the host'})" if name else \
        llvm.get_host_cpu_name()


def model_files_mb(model=None):
    from .weights import decoder_path, vision_path
    return {p.name: p.stat().st_size / 1e6 for p in (Path(model or decoder_path()), vision_path())}


def ratios(results):
    f, lc, th = results.get("fused"), results.get("llama.cpp"), results.get("torch")
    r = {}
    if f and lc:
        r["decode_vs_llama.cpp"] = f["decode_tok_s"] / lc["decode_tok_s"]
        r["prefill_vs_llama.cpp"] = f["prefill_tok_s"] / lc["prefill_tok_s"]
    if f and th:
        r["vision_speed_vs_torch"] = th["vision_s"] / f["vision_s"]  # > 1: fused is faster
    if f and lc and lc.get("vision_s"):
        r["vision_speed_vs_llama.cpp"] = lc["vision_s"] / f["vision_s"]
    return r


# -- the table -------------------------------------------------------------------------------------------
ROWS = [("decode tokens/s", "decode_tok_s", "{:.1f}"), ("prefill tokens/s", "prefill_tok_s", "{:.0f}"),
        ("vision tower s/image", "vision_s", "{:.3f}"), ("time to first token s", "ttft_s", "{:.2f}"),
        ("peak RSS MB", "peak_rss_mb", "{:.0f}")]


def table(report):
    res, errors, r = report["results"], report["errors"], report["ratios"]
    files = sum(report["model_files_mb"].values())
    engines = list(res)
    head = ["", *(COLUMNS[e] for e in engines), "ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ratio = {"decode_tok_s": f"{r['decode_vs_llama.cpp']:.2f}x llama.cpp" if "decode_vs_llama.cpp" in r else "",
             "prefill_tok_s": f"{r['prefill_vs_llama.cpp']:.2f}x llama.cpp" if "prefill_vs_llama.cpp" in r else "",
             "vision_s": ", ".join(f"{r[k]:.2f}x {name}'s speed" for k, name in
                                   [("vision_speed_vs_torch", "torch"), ("vision_speed_vs_llama.cpp", "llama.cpp")]
                                   if k in r),
             "ttft_s": "", "peak_rss_mb": (f"{res['fused']['peak_rss_mb'] / files:.2f}x the model files"
                                           if res.get("fused") else "")}
    for label, key, fmt in ROWS:
        cells = []
        for e in engines:
            if res[e] is None:
                cells.append(errors.get(e, "failed"))
            elif res[e].get(key) is None:
                cells.append("n/a [1]")
            else:
                cells.append(fmt.format(res[e][key]))
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {ratio[key]} |")
    load = report.get("load_average")
    notes = [f"{report['threads']} threads, {report['cpu']} ({report.get('cores')} cores, load average "
             f"{load if load is not None else '?'} before the run; "
             f"{' '.join(report.get('vector_extensions') or ['no vector extensions known'])}; numba compiles for "
             f"{report.get('numba_target') or '-'}); prompt {report['prompt_tokens']} tokens, "
             f"{report['decode_tokens']} decoded, median of {report['reps']}; model files {files:.0f} MB "
             f"({' + '.join(f'{v:.0f}' for v in report['model_files_mb'].values())}).",
             "[1] llama.cpp's vision tower runs tinyllava's exported mmproj: it needs weights/projector.gguf.",
             "peak RSS: every worker loads both models and encodes one image, then the prompt and the decoded "
             "tokens; the vision tower is dropped after the image, as generate drops it."]
    g = report.get("generate")
    if g and "error" in g:
        notes.append(f"python -m tinyllava.generate {g['error']}")
    elif g:
        loaded = sum(g["files_mb"].values())
        notes.append(f"the README's first command (`python -m tinyllava.generate --threads {report['threads']}`): "
                     f"peak RSS {g['peak_rss_mb']:.0f} MB, {g['peak_rss_mb'] / loaded:.2f}x the {loaded:.0f} MB of "
                     f"model files it loads ({', '.join(g['files_mb'])}).")
    lc = res.get("llama.cpp")
    if lc and not lc.get("extra_bufts", True):
        notes.append("llama.cpp ran with use_extra_bufts=False: its AMX weight buffers crash on this VM.")
    kernels = [f"{COLUMNS[e]}: {res[e]['kernels']}" for e in ("fused", "fused-int") if res.get(e) and "kernels" in res[e]]
    if kernels:
        notes.append("decoding kernels: " + "; ".join(kernels) + ".")
    f = res.get("fused")
    if f:
        notes.append("fused memory (MB, RSS after each stage): " +
                     ", ".join(f"{k} {v:.0f}" for k, v in f["memory_mb"].items()) +
                     ("" if f.get("engine") == "numba" else " (NumPy engine: numba is not installed)"))
    return "\n".join(lines + [""] + notes)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tinyllava.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for every engine (all cores)")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each measurement (median; 3)")
    ap.add_argument("--prompt-tokens", type=int, default=220, help="prompt length (220, an image prompt)")
    ap.add_argument("--decode-tokens", type=int, default=32, help="tokens decoded per repetition (32)")
    ap.add_argument("--engines", default=",".join(DEFAULT_ENGINES),
                    help=f"comma-separated subset of {','.join(ENGINES)} (default: all but fused-int)")
    ap.add_argument("--model", help="the decoder GGUF for every engine (default: the fetched SmolLM2)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds allowed per engine (900)")
    ap.add_argument("--profile", action="store_true",
                    help="instead of the table: where the fused engine's time goes (cProfile, per stage)")
    ap.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    ap.add_argument("--ids", help=argparse.SUPPRESS)
    ap.add_argument("--no-extra-bufts", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ttft", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:  # inside a subprocess: measure one engine, print one JSON line
        args.ids = [int(i) for i in args.ids.split(",")]
        print(json.dumps(worker(args)))
        return
    if args.profile:
        res, err = spawn("fused", args, prompt_ids(args.prompt_tokens), ["--profile"])
        if res is None:
            sys.exit(f"tinyllava.bench: the profile {err}")
        print(json.dumps(res, indent=1) if args.json else profile_table(res))
        return
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(args.engines) - set(ENGINES)
    if unknown:
        ap.error(f"unknown engines {', '.join(sorted(unknown))} (choose from {', '.join(ENGINES)})")
    report = collect(args)
    print(json.dumps(report, indent=1) if args.json else table(report))


if __name__ == "__main__":
    main()
