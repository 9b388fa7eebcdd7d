"""The shape of the source tree: a core that never imports the application, no import cycles,
short functions, imports at the top, one version string."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "harma"
MAX_FUNCTION_LINES = 100
APPLICATIONS = ("harma.training", "harma.search")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def parse(name: str) -> ast.Module:
    return ast.parse(MODULES[name].read_text(encoding="utf-8"), filename=str(MODULES[name]))


def resolve(name: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The harma modules an import statement in module ``name`` reads."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.split(".")[0] == "harma"]
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    if node.level:
        base = package.split(".")
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != "harma":
        return []
    found = [target]
    found += [f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in MODULES]
    return found


def top_level_imports(name: str) -> set[str]:
    imports: set[str] = set()
    for node in parse(name).body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            imports.update(resolve(name, node))
    return imports


def functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def test_every_module_is_found():
    assert "harma.inject" in MODULES and "harma.training.trainer" in MODULES and "harma.search.cli" in MODULES


def test_training_never_imports_search():
    reached = {m for name in MODULES if name.startswith("harma.training")
               for m in top_level_imports(name) if m.startswith("harma.search")}
    assert not reached, reached


@pytest.mark.parametrize("name", [name for name in MODULES if not name.startswith(APPLICATIONS)])
def test_the_core_never_imports_the_application(name):
    reached = {module for module in top_level_imports(name) if module.startswith(APPLICATIONS)}
    for function in functions(parse(name)):
        for node in ast.walk(function):
            if isinstance(node, ast.Import | ast.ImportFrom):
                reached.update(m for m in resolve(name, node) if m.startswith(APPLICATIONS))
    assert not reached, f"{name} imports {sorted(reached)}"


def test_no_import_cycles():
    graph = {name: {m for m in top_level_imports(name) if m in MODULES and m != name} for name in MODULES}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for other in sorted(graph[name]):
            if state.get(other) == 1:
                cycle = stack[stack.index(other):] + [other]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if other not in state:
                visit(other)
        stack.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_functions_are_short_and_import_no_harma_module_inside(name):
    for function in functions(parse(name)):
        length = function.end_lineno - function.lineno + 1
        assert length <= MAX_FUNCTION_LINES, f"{name}.{function.name} is {length} lines long"
        for node in ast.walk(function):
            if isinstance(node, ast.Import | ast.ImportFrom):
                assert not resolve(name, node), (
                    f"{name}.{function.name} imports {resolve(name, node)} inside a function (line {node.lineno})"
                )


def test_one_version_string():
    assignments = [
        name for name in MODULES for node in parse(name).body
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in node.targets)
    ]
    assert assignments == ["harma._version"]
    assert 'dynamic = ["version"]' in (ROOT / "pyproject.toml").read_text()


def test_the_faults_page_names_only_tests_that_exist():
    defined = {
        node.name for path in (ROOT / "tests").rglob("test_*.py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
    }
    named = set(re.findall(r"::(test_\w+)", (ROOT / "docs" / "faults.md").read_text(encoding="utf-8")))
    assert named and not named - defined, f"docs/faults.md names missing tests: {sorted(named - defined)}"


def test_test_files_have_unique_basenames():
    # pytest's prepend import mode imports test files by basename: two of the same name in
    # different folders stop the whole collection.
    tests = Path(__file__).resolve().parent
    names = [path.name for path in tests.rglob("test_*.py")]
    assert sorted(name for name in set(names) if names.count(name) > 1) == []
