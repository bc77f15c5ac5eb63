"""Command-line options made from a config dataclass, so that each default is written once, in the dataclass.

A field becomes --its-name (plus any short flags in its metadata), typed by its annotation: a bool is a switch,
a list an option to repeat, anything else its type; a field without a default is required. The metadata's "help"
explains it and "choices" limits it; the default is added to the help.

    @dataclass
    class Sampling:
        temp: float = field(default=0.0, metadata={"help": "sampling temperature; 0: greedy"})

    add_options(parser, Sampling)       # --temp TEMP  sampling temperature; 0: greedy (default 0.0)
    Sampling(**picked(args, Sampling))
"""
from dataclasses import MISSING, fields


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
