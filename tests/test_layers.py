"""The import graph points one way: applications (the `python -m tinyllava.X` commands) import the library;
the library never imports an application, an application uses another only where declared below, and no chain
of imports, lazy ones (inside a function) included, comes back to where it started."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tinyllava"
# modules with a command line that are library first: the command shows or builds the module's own concept
LIBRARY_COMMANDS = {"gguf": "shows a GGUF file", "weights": "fetches the weights", "data": "builds a data set",
                    "instruct": "writes instruction data", "convert": "converts the CLIP ONNX"}
# modules without a command line that belong to an application: its parts
PARTS = {"trace": "generate's --trace", "llamacpp": "bench's llama.cpp column (and llama-quantize, for the checks)"}
# application -> the applications it may use, and why
USES = {"generate": {"trace"},        # --trace prints through trace.py
        "bench": {"llamacpp", "export"},  # the llama.cpp column: llamacpp.py drives it on an exported mmproj
        "bench_train": {"bench", "train"}}  # the same timing helpers; the training step it times


def imports(path):  # -> [(line, module name inside the package)], lazy imports (in functions) included
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


def defines_main(path):
    return any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in ast.parse(path.read_text()).body)


def applications(package=PACKAGE):  # the modules with a command line that are not library first, and their parts
    return {p.stem for p in package.glob("*.py") if defines_main(p)} - set(LIBRARY_COMMANDS) | set(PARTS)


def violations(package=PACKAGE):
    found, apps = [], applications(package)
    for path in sorted(package.glob("*.py")):
        me = path.stem
        for line, other in imports(path):
            if other not in apps or other == me:
                continue
            if me not in apps:
                found.append(f"{path.name}:{line}: library module imports the application {other}")
            elif other not in USES.get(me, ()):
                found.append(f"{path.name}:{line}: application {me} imports the application {other}")
    return found


def cycles(package=PACKAGE):  # -> every chain of imports that comes back to its start, each once
    graph = {p.stem: {m for _, m in imports(p) if m != p.stem} for p in package.glob("*.py")}
    found, done = set(), set()

    def visit(node, path):
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                loop = path[path.index(nxt):]
                k = loop.index(min(loop))
                found.add(" -> ".join(loop[k:] + loop[:k] + [min(loop)]))
            elif nxt not in done:
                visit(nxt, path + [nxt])
        done.add(node)
    for start in sorted(graph):
        visit(start, [start])
    return sorted(found)


def test_imports_point_from_applications_to_the_library():
    assert violations() == []


def test_every_command_is_known_as_an_application_or_a_library_module():
    entry = {p.stem for p in PACKAGE.glob("*.py") if defines_main(p)}
    assert set(LIBRARY_COMMANDS) <= entry and not set(PARTS) & entry
    assert {"generate", "train", "evaluate", "export", "bench"} <= applications()


def test_the_import_graph_has_no_cycle():
    assert cycles() == []


def test_the_checks_find_a_violation_a_lazy_import_and_a_cycle(tmp_path):
    (tmp_path / "llama.py").write_text("def f():\n    from .generate import load_decoder\n")  # lazy
    (tmp_path / "generate.py").write_text("from . import ops\n\n\ndef main():\n    pass\n")
    (tmp_path / "evaluate.py").write_text("from .train import x\nfrom tinyllava.model import Llava\n\n\ndef main():\n"
                                          "    pass\n")
    (tmp_path / "train.py").write_text("def main():\n    pass\n")
    (tmp_path / "model.py").write_text("def g():\n    from . import ops\n")
    (tmp_path / "ops.py").write_text("from .model import g\n")
    assert violations(tmp_path) == ["evaluate.py:1: application evaluate imports the application train",
                                    "llama.py:2: library module imports the application generate"]
    assert cycles(tmp_path) == ["model -> ops -> model"]
