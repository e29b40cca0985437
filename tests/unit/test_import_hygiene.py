"""engine/ never imports Textual, and the installed package has no bare top-level names.

Every module is found by walking the source tree, subpackages included, so a new
module or a new subpackage cannot escape the checks.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[2] / "engine"
FORBIDDEN = ("textual", "rich", "guestsafe.tui")


def _module_name(path: Path) -> str:
    parts = ["guestsafe", "engine", *path.relative_to(ENGINE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_of(path: Path) -> list[str]:
    name = _module_name(path).split(".")
    return name if path.name == "__init__.py" else name[:-1]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                names.add(node.module)
            elif node.level > 0:
                base = _package_of(path)[: len(_package_of(path)) - (node.level - 1)]
                names.add(".".join([*base, *([node.module] if node.module else [])]))
    return names


def _engine_modules() -> list[Path]:
    return sorted(p for p in ENGINE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_subpackage_is_walked() -> None:
    packages = {p.parent.name for p in _engine_modules() if p.parent != ENGINE}
    assert {"archive", "backup", "devices", "hypervisor", "jobs"} <= packages


def test_engine_sources_never_import_the_ui() -> None:
    offenders = []
    for path in _engine_modules():
        for name in _imports(path):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN):
                offenders.append(f"{path.relative_to(ENGINE)}: {name}")
    assert offenders == []


def test_importing_the_whole_engine_loads_no_textual() -> None:
    modules = [_module_name(p) for p in _engine_modules()]
    assert "guestsafe.engine.backup.runner" in modules
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('textual', 'rich')]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def _engine_graph() -> dict[str, set[str]]:
    """Each engine module and the engine modules it imports (``from a import b``
    counts as importing ``a.b`` where that is a module)."""
    modules = {_module_name(p): p for p in _engine_modules()}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        # A package's __init__ is not a dependency worth a cycle: it holds a docstring.
        imported = found & modules.keys()
        graph[name] = {m for m in imported if m != name and modules[m].stem != "__init__"}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle, as the modules along it, or [] when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str]:
        state[module] = 1
        path.append(module)
        for imported in sorted(graph[module]):
            if state.get(imported) == 1:
                return [*path[path.index(imported) :], imported]
            if imported not in state and (found := visit(imported)):
                return found
        state[module] = 2
        path.pop()
        return []

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) == []


def test_the_engine_has_no_import_cycle() -> None:
    graph = _engine_graph()
    assert "guestsafe.engine.archive.store" in graph["guestsafe.engine.backup.runner"]
    assert _cycle(graph) == []


def test_test_files_have_distinct_names() -> None:
    # pytest's default import mode needs them: two test_x.py in tests/ break collection.
    tests = ENGINE.parent / "tests"
    names = [
        p.name
        for p in tests.rglob("test_*.py")
        if "__snapshots__" not in p.parts and "__pycache__" not in p.parts
    ]
    assert len(names) > 40
    assert sorted({n for n in names if names.count(n) > 1}) == []


def test_no_bare_engine_or_tui_package_is_importable() -> None:
    code = (
        "import importlib.util\n"
        "print(importlib.util.find_spec('engine'), importlib.util.find_spec('tui'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/"
    )
    assert out.stdout.strip() == "None None"
