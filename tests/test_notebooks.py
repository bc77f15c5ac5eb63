"""The book: a chapter per concept, in the README's order, none carrying a copy of the package's code, each
running top to bottom (each ends with a check against the reference or a measured number)."""
import ast
import json
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def title(path):  # "# 04 · The CLIP vision transformer: LLaVA's eye" -> "The CLIP vision transformer"
    first = "".join(json.loads(path.read_text())["cells"][0]["source"]).splitlines()[0]
    return first.split("·", 1)[1].split(":")[0].strip()


def test_there_is_a_chapter_per_concept_as_the_readme_lists_them():
    """Numbered 01.. without a gap, each chapter the README's chapter of that number and title."""
    assert [p.name[:2] for p in NOTEBOOKS] == [f"{i:02d}" for i in range(1, len(NOTEBOOKS) + 1)]
    book = (ROOT / "README.md").read_text().split("\n## The book\n")[1].split("\n## ")[0]
    table = dict(re.findall(r"^\| (\d\d) ([^|]+?) \|", book, re.M))
    assert {p.name[:2]: title(p) for p in NOTEBOOKS} == table


def bodies(tree):  # -> {the body of each function, as ast.dump: its name and arguments aside}
    return {ast.dump(ast.Module(body=n.body, type_ignores=[])) for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}


def test_no_chapter_carries_a_copy_of_the_package():
    """A function a chapter defines is not one of the package's, pasted: it calls the package instead."""
    package = set().union(*(bodies(ast.parse(p.read_text())) for p in (ROOT / "tinyllava").glob("*.py")))
    for path in NOTEBOOKS:
        for cell in json.loads(path.read_text())["cells"]:
            if cell["cell_type"] == "code":
                source = "".join(cell["source"])
                code = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!")))
                assert not bodies(ast.parse(code)) & package, f"{path.name}: a copy of a package function"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path):
    book = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in book.cells if c.cell_type == "code"), "commit notebooks without outputs"
    NotebookClient(book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}},
                   extra_arguments=["--HistoryManager.enabled=False"]).execute()
