"""The package's layout is a table of contents and its layering holds: import-linter's contracts
(pyproject.toml) are kept, no import cycle exists, and every stage says what it owns."""
import ast
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import grimp
import networkx as nx
import pytest

import headlens

ROOT = Path(headlens.__file__).parent
REPO = ROOT.parent
TOP_LEVEL_ALLOWED = {"__init__.py", "__main__.py", "errors.py", "files.py"}


def test_import_linter_contracts_are_kept():
    """``lint-imports`` on the contracts in pyproject.toml (the pipeline's layers, synthetic
    models only for the command line, basics import no stage) passes, and checks them all."""
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True, no_logo=True))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    kept = re.search(r"Contracts: (\d+) kept, (\d+) broken", proc.stdout)
    assert kept and int(kept.group(1)) >= 4 and kept.group(2) == "0", proc.stdout[-2000:]


def test_no_import_cycle_between_modules():
    """No two modules of headlens import each other, directly or through others (imports inside
    functions count: grimp reads them too)."""
    graph = grimp.build_graph("headlens")
    g = nx.DiGraph()
    for module in graph.modules:
        for imported in graph.find_modules_directly_imported_by(module):
            g.add_edge(module, imported)
    cycles = [sorted(c) for c in nx.strongly_connected_components(g) if len(c) > 1]
    assert cycles == []


def test_the_package_is_folders_of_stages():
    top = {p.name for p in ROOT.glob("*.py")}
    assert top <= TOP_LEVEL_ALLOWED, f"modules directly under headlens/: {sorted(top - TOP_LEVEL_ALLOWED)}"
    subpackages = [m.name for m in pkgutil.iter_modules([str(ROOT)]) if m.ispkg]
    assert len(subpackages) >= 6
    for name in subpackages:
        init = ROOT / name / "__init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        if name == "data":
            assert "Owns" in doc
            continue
        for part in ("Owns", "May import", "Public names"):
            assert part in doc, f"headlens/{name}/__init__.py does not say what it {part.lower()}"


@pytest.mark.parametrize("name", ["load", "report"])
def test_entry_points_do_not_shadow_modules(name):
    """``headlens.load`` and ``headlens.report`` are the functions; no module has those names."""
    assert callable(getattr(headlens, name))
    assert not (ROOT / f"{name}.py").exists() and not (ROOT / name).is_dir()
