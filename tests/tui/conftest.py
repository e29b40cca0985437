"""Fixtures for the console's tests: a demo sandbox and an engine on it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from guestsafe.engine import demo
from guestsafe.engine.api import Engine


@pytest.fixture
def sandbox(tmp_path: Path) -> demo.Sandbox:
    return demo.ensure_sandbox(tmp_path / "demo")


@pytest.fixture
def engine(sandbox: demo.Sandbox) -> Iterator[Engine]:
    engine = Engine.demo(sandbox)
    yield engine
    engine.close()
