"""Fixtures for the console's tests: a demo sandbox and an engine on it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_textual_snapshot
from tui_support import normalise_snapshot_folder

from guestsafe.engine import demo
from guestsafe.engine.api import Engine


@pytest.fixture(autouse=True)
def _snapshots_show_the_fixed_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each run has its own sandbox folder; the SVGs name the fixed one (tui_support)."""
    original = pytest_textual_snapshot.normalize_svg
    monkeypatch.setattr(
        pytest_textual_snapshot,
        "normalize_svg",
        lambda svg: original(normalise_snapshot_folder(svg)),
    )


@pytest.fixture
def sandbox(tmp_path: Path) -> demo.Sandbox:
    return demo.ensure_sandbox(tmp_path / "demo")


@pytest.fixture
def engine(sandbox: demo.Sandbox) -> Iterator[Engine]:
    engine = Engine.demo(sandbox)
    yield engine
    engine.close()
