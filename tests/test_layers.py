"""The import graph points one way: applications (the `python -m tinyllava.X` commands) import the library;
the library never imports an application, and an application uses another only where declared below."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tinyllava"
APPLICATIONS = {"generate", "train", "evaluate", "bench", "bench_train", "export", "trace", "llamacpp", "serve",
                "bench_serve"}
# application -> the applications it may use, and why
USES = {"generate": {"trace"},        # --trace prints through trace.py
        "bench": {"llamacpp", "export"},  # the llama.cpp column: llamacpp.py drives it on an exported mmproj
        "bench_train": {"bench", "train"}}  # the same timing helpers; the training step it times


def imports(path):  # -> [(line, module name inside the package)]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level >= 1:
            if node.module:
                out.append((node.lineno, node.module.split(".")[0]))
            else:  # from . import a, b
                out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tinyllava."):
            out.append((node.lineno, node.module.split(".")[1]))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")[1]) for a in node.names if a.name.startswith("tinyllava.")]
    return out


def violations(package=PACKAGE):
    found = []
    for path in sorted(package.glob("*.py")):
        me = path.stem
        for line, other in imports(path):
            if other not in APPLICATIONS or other == me:
                continue
            if me not in APPLICATIONS:
                found.append(f"{path.name}:{line}: library module imports the application {other}")
            elif other not in USES.get(me, ()):
                found.append(f"{path.name}:{line}: application {me} imports the application {other}")
    return found


def test_imports_point_from_applications_to_the_library():
    assert violations() == []


def test_the_check_finds_a_violation(tmp_path):
    (tmp_path / "llama.py").write_text("from .generate import load_decoder\n")
    (tmp_path / "evaluate.py").write_text("from .train import caption_ids\nfrom tinyllava.model import Llava\n")
    assert violations(tmp_path) == ["evaluate.py:1: application evaluate imports the application train",
                                    "llama.py:1: library module imports the application generate"]
