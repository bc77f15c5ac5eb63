"""Command-line options the tools share, in the library because one application may not import another.

Options made from a config dataclass, so that each default is written once, in the dataclass: a field becomes
--its-name (plus any short flags in its metadata), typed by its annotation: a bool is a switch, a list an option
to repeat, anything else its type; a field without a default is required. The metadata's "help" explains it and
"choices" limits it; the default is added to the help.

    @dataclass
    class Sampling:
        temp: float = field(default=0.0, metadata={"help": "sampling temperature; 0: greedy"})

    add_options(parser, Sampling)       # --temp TEMP  sampling temperature; 0: greedy (default 0.0)
    Sampling(**picked(args, Sampling))

And the model options of the tools that run LLaVA (generate, serve): their flags, and what they mean for loading.

    add_model_options(ap); args = ap.parse_args()
    projector, adapter = model_files(args.stage, args.projector, args.adapter)
    llava = load_llava(projector, args.model, quantized=quantized(args.fused), adapter=adapter)
"""
import argparse
from dataclasses import MISSING, fields

from .errors import TinyLlavaError
from .instruct import BRIEF

CAPTION_REQUEST = BRIEF[0]  # "Describe the image concisely.": the stage-2 model's best captions (README)


def add_options(parser, cls, skip=()):
    for f in fields(cls):
        if f.name in skip:
            continue
        meta, kw = f.metadata, {}
        if f.type is bool:
            kw["action"] = "store_true"
        elif f.type is list:
            kw["action"] = "append"
        else:
            kw["type"] = f.type
        if f.default is MISSING and f.default_factory is MISSING:
            kw["required"] = True
        else:
            kw["default"] = f.default
        if "choices" in meta:
            kw["choices"] = meta["choices"]
        shown = "" if f.default is None or f.default is False or f.default is MISSING else f" (default {f.default})"
        kw["help"] = (meta.get("help", "") + shown).strip() or None
        parser.add_argument(*meta.get("flags", ()), f"--{f.name.replace('_', '-')}", **kw)
    return parser


def picked(args, cls):  # the parsed options that are fields of cls -> {name: value}
    return {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}


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
    ap.add_argument("-t", "--threads", type=int, help="threads for the products (default: the cores other programs "
                    "leave idle, see runtime.py; or TINYLLAVA_THREADS)")


def model_files(stage=None, projector=None, adapter=None, images=True):
    """-> (projector, adapter) paths for load_llava (None: its default). Stage 2 is the default when its committed
    files are there and there are images to look at (text alone: SmolLM2 itself, unless stage 2 is asked for);
    a projector or adapter named explicitly wins over the stage."""
    from .weights import stage2_paths
    stage = stage or (2 if images and all(p.exists() for p in stage2_paths()) else 1)
    if stage == 2 and not projector and not adapter:
        projector, adapter = stage2_paths()
    return projector, adapter


def quantized(fused=None):
    """--fused / --no-fused: the fused engine's quantized matrices (the default when numba is there) or float32."""
    from . import fused as engine
    return fused if fused is not None else engine.ENGINE == "numba"


def threads_option(threads=None):
    """--threads, checked: None (runtime.py decides) or a count of this machine's cores."""
    from . import runtime
    if threads is not None and not 1 <= threads <= runtime.cores():
        raise TinyLlavaError(f"--threads must be between 1 and the {runtime.cores()} cores")
    return threads
