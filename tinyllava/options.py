"""The model options that the tools which run LLaVA share (`generate`, `serve`): their flags, and what the flags
mean for loading. Kept here, in the library, because one application may not import another.

    ap = argparse.ArgumentParser(); add_model_options(ap); args = ap.parse_args()
    projector, adapter = model_files(args.stage, args.projector, args.adapter)
    llava = load_llava(projector, args.model, load_matrix=matrix_loader(args.fused), adapter=adapter)
"""
import argparse
import os

from .errors import TinyLlavaError
from .instruct import BRIEF

CAPTION_REQUEST = BRIEF[0]  # "Describe the image concisely.": the stage-2 model's best captions (README)


def add_model_options(ap):
    """-m, --stage, --projector, --adapter, --crop, --fused, -t: which weights, which engine, how many threads."""
    ap.add_argument("-m", "--model", help="decoder GGUF (default: the fetched SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--stage", type=int, choices=[1, 2],
                    help="which committed model: 2, tuned on instructions (the default when weights/stage2-*.gguf "
                         "are there), or 1, the projector aligned on captions alone")
    ap.add_argument("--projector", help="projector GGUF (default: the --stage model's)")
    ap.add_argument("--adapter", help="stage-2 LoRA adapter GGUF (default: the --stage 2 model's)")
    ap.add_argument("--crop", action="store_true", help="centre-crop images instead of padding them square")
    ap.add_argument("--fused", action=argparse.BooleanOptionalAction, default=None,
                    help="keep the weights quantized and dequantize inside each product (tinyllava/fused.py; "
                         "the default when numba is installed); --no-fused: float32 weights, dequantized at load")
    ap.add_argument("-t", "--threads", type=int, help="threads for the products (default: the cores that other "
                    "programs leave idle when it starts)")


def model_files(stage=None, projector=None, adapter=None, images=True):
    """-> (projector, adapter) paths for load_llava (None: its default). Stage 2 is the default when its committed
    files are there and there are images to look at (text alone: SmolLM2 itself, unless stage 2 is asked for);
    a projector or adapter named explicitly wins over the stage."""
    from .model import stage2_paths
    stage = stage or (2 if images and all(p.exists() for p in stage2_paths()) else 1)
    if stage == 2 and not projector and not adapter:
        projector, adapter = stage2_paths()
    return projector, adapter


def matrix_loader(use_fused=None):
    """load_matrix for load_llava: the fused engine's quantized matrices (the default when numba is there), or
    None for float32 weights."""
    from . import fused
    use_fused = use_fused if use_fused is not None else fused.ENGINE == "numba"
    return fused.QuantMatrix.from_tensor if use_fused else None


def thread_count(threads=None):
    """--threads checked, or by default the cores that other programs leave idle."""
    if threads is not None and not 1 <= threads <= (os.cpu_count() or 1):
        raise TinyLlavaError(f"--threads must be between 1 and the {os.cpu_count()} cores")
    return threads or idle_cores()


def idle_cores():
    """The cores other programs leave free, at least one: all of them less the threads running right now in
    other processes (Linux's /proc; elsewhere the 1-minute load average). Each token runs ~150 parallel loops,
    each waiting for its slowest thread: a thread that shares its core with a busy program makes decoding several
    times slower than one thread alone (measured in the README)."""
    cores = os.cpu_count() or 1
    try:
        with open("/proc/loadavg") as f:
            running = int(f.read().split()[3].split("/")[0])    # "running/total" tasks of the machine
        mine = 0                                                # this process's own (BLAS threads may spin)
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/stat") as f:
                mine += f.read().rsplit(")", 1)[1].split()[0] == "R"
        busy = running - mine
    except (OSError, ValueError, IndexError):
        busy = round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
    return max(1, min(cores, cores - busy))
