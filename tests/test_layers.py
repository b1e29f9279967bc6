"""The package's layering (README, "Layout"; setup.cfg [importlinter], checked by `lint-imports` in CI):
what the import graph itself cannot show. No module imports a private name of another, and no import of
a gradprune module hides inside a function without a comment saying why."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(ROOT / "gradprune").rglob("*.py"), *(ROOT / "callbacks").glob("*.py")])


def _is_ours(node: ast.ImportFrom) -> bool:
    return node.level > 0 or (node.module or "").split(".")[0] == "gradprune"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_names_imported_from_another_module(path):
    tree = ast.parse(path.read_text())
    bad = [f"line {node.lineno}: {alias.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
           and _is_ours(node) for alias in node.names if alias.name.startswith("_") and not alias.name.startswith("__")]
    assert not bad, f"{path.name} imports private names of other modules: {bad}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_function_level_imports_of_our_modules_say_why(path):
    text = path.read_text()
    lines = text.splitlines()
    bad = []
    for function in ast.walk(ast.parse(text)):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(function):
            ours = isinstance(node, ast.ImportFrom) and _is_ours(node) or isinstance(node, ast.Import) and any(
                alias.name.split(".")[0] == "gradprune" for alias in node.names)
            if ours and "#" not in lines[node.lineno - 1]:
                bad.append(f"line {node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not bad, f"{path.name} imports gradprune modules inside functions without a comment saying why: {bad}"


def test_the_import_graph_has_no_cycle(monkeypatch):
    """Every import counts, those inside functions too; one under ``if TYPE_CHECKING:`` never runs."""
    grimp = pytest.importorskip("grimp")  # installed with import-linter (the dev extra)
    monkeypatch.syspath_prepend(str(ROOT))  # callbacks/ is a top-level package in the source tree
    graph = grimp.build_graph("gradprune", "callbacks", exclude_type_checking_imports=True, cache_dir=None)
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            if module < imported and graph.find_shortest_chain(importer=imported, imported=module):
                cycles.append(f"{module} <-> {imported}")
    assert not cycles, f"import cycles: {cycles}"
