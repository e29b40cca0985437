"""The console's boundaries: which engine modules it may import, which of its parts
load no Textual, and how every worker's error reaches the operator.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

TUI = Path(__file__).resolve().parents[2] / "tui"
# The engine's face to the front-ends; everything else of it is behind api.
ALLOWED_ENGINE = frozenset(
    {"guestsafe.engine.api", "guestsafe.engine.errors", "guestsafe.engine.events"}
)
WORKER_PATH = "worker_errors.py"


def _sources() -> list[Path]:
    return sorted(TUI.rglob("*.py"))


def _absolute(path: Path, node: ast.ImportFrom) -> str:
    """The module an import names, relative ones resolved against ``path``'s package."""
    if node.level == 0:
        return node.module or ""
    package = ["guestsafe", "tui", *path.relative_to(TUI).parent.parts]
    base = package[: len(package) - node.level + 1]
    return ".".join([*base, node.module] if node.module else base)


def _imported(path: Path, source: str | None = None) -> set[str]:
    names: set[str] = set()
    text = path.read_text() if source is None else source
    for node in ast.walk(ast.parse(text, str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = _absolute(path, node)
            names.add(module)
            # "from guestsafe.engine import demo" imports the module guestsafe.engine.demo.
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def _engine_modules(names: set[str]) -> set[str]:
    return {n for n in names if n == "guestsafe.engine" or n.startswith("guestsafe.engine.")}


def test_the_console_and_cli_import_only_api_errors_and_events() -> None:
    offenders = []
    for path in _sources():
        for name in _engine_modules(_imported(path)):
            if not any(name == a or name.startswith(a + ".") for a in ALLOWED_ENGINE):
                offenders.append(f"{path.relative_to(TUI)}: {name}")
    assert offenders == []


def test_the_import_check_sees_every_kind_of_import() -> None:
    """The scan above notices each way a file can reach past the facade."""
    source = (
        "import guestsafe.engine.demo\n"
        "from guestsafe.engine import paths\n"
        "from guestsafe.engine.backup.runlog import escape\n"
        "from ...engine.jobs import model\n"
        "from guestsafe.engine.api import Engine\n"
    )
    found = _engine_modules(_imported(TUI / "model" / "probe.py", source))
    assert {
        "guestsafe.engine.demo",
        "guestsafe.engine.paths",
        "guestsafe.engine.backup.runlog",
        "guestsafe.engine.jobs.model",
        "guestsafe.engine.api",
    } <= found


def test_the_widget_free_parts_never_load_textual_or_rich() -> None:
    model = TUI / "model"
    modules = [f"guestsafe.tui.model.{p.stem}" for p in sorted(model.glob("*.py"))]
    assert "guestsafe.tui.model.run_tracker" in modules and len(modules) >= 6
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('textual', 'rich')]\n"
        "print(','.join(sorted(bad)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_no_widget_free_module_is_left_beside_the_widgets() -> None:
    """A tui/ module outside model/ holds Textual or Rich code (else it belongs in model/)."""
    loose = []
    for path in sorted(TUI.glob("*.py")):
        if path.name in ("__init__.py", "__main__.py", "cli.py"):
            continue  # the package, its entry point, and the headless CLI
        names = _imported(path)
        if not any(n.split(".")[0] in ("textual", "rich") for n in names):
            loose.append(path.name)
    assert loose == []


# --- workers -------------------------------------------------------------------------


def _decorator_name(node: ast.expr) -> str:
    target = node.func if isinstance(node, ast.Call) else node
    if isinstance(target, ast.Attribute):
        return target.attr
    return target.id if isinstance(target, ast.Name) else ""


def _base_names(cls: ast.ClassDef) -> set[str]:
    return {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in cls.bases}


def test_every_worker_starts_through_the_one_error_path() -> None:
    """Workers start only through ``background`` in classes that report their errors.

    ``background`` makes a thread worker that does not exit the app on error,
    and ``ReportsWorkerErrors`` turns the failure into the ErrorModal.
    """
    direct, unreported, workers = [], [], 0
    for path in _sources():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "run_worker":
                direct.append(f"{path.name}:{node.lineno} run_worker")
            if isinstance(node, ast.Name) and node.id == "work" and path.name != WORKER_PATH:
                direct.append(f"{path.name}:{node.lineno} work")
        for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
            for item in cls.body:
                if not isinstance(item, ast.FunctionDef):
                    continue
                if any(_decorator_name(d) == "background" for d in item.decorator_list):
                    workers += 1
                    if "ReportsWorkerErrors" not in _base_names(cls):
                        unreported.append(f"{path.name}: {cls.name}.{item.name}")
    assert direct == []
    assert unreported == []
    assert workers >= 18  # every worker the console has was seen
