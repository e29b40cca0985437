"""Driving the console without a terminal: wait for its workers, then look.

The screenshot command and the console's tests run the real app headless
(``App.run_test``) and must only look once its engine calls are done.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from textual.pilot import Pilot
from textual.worker import WorkerState

# Workers that run until cancelled, so "idle" means all the others are done.
ENDLESS_GROUPS = frozenset({"tail"})


async def wait_for(pilot: Pilot[Any], predicate: Callable[[], object], timeout: float = 30) -> None:
    """Pause the caller (never the app) until ``predicate`` holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {predicate}")
        await pilot.pause(0.05)


def busy_workers(pilot: Pilot[Any]) -> list[str]:
    return [
        f"{w.group}:{w.name}"
        for w in pilot.app.workers
        if w.group not in ENDLESS_GROUPS and w.state in (WorkerState.PENDING, WorkerState.RUNNING)
    ]


async def settle(pilot: Pilot[Any], timeout: float = 30) -> None:
    """Wait until every worker but the log tail is done, and the UI has caught up."""
    await pilot.pause()
    await wait_for(pilot, lambda: not busy_workers(pilot), timeout)
    await pilot.pause()
    await pilot.pause()
