"""Waiting for a sign of life from a restore-test clone, in a fixed order.

The order (issue #14): the guest agent answers a ping; else the line the job
names (``restore_test_console``) appears on the serial console; else the guest
stays running for ``restore_test_seconds`` without crashing, shutting off or
panicking. A named console line that never appears within that time is a
failure: the operator said what a healthy boot prints. The probes are a
protocol so that this order is tested without a hypervisor.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from guestsafe.engine.archive.restore_record import AGENT, CONSOLE, RUNNING

POLL_SECONDS = 0.5
CANCELLED = "the test was cancelled"
# What a Linux kernel prints when it gives up; the guest may reboot right after.
PANIC_MARKS = ("Kernel panic - not syncing",)


class Probes(Protocol):
    """What the watcher asks the running clone, once per poll."""

    def down(self) -> str | None:
        """Why the clone is no longer running (shut off, crashed); None while it runs."""
        ...

    def agent_answers(self) -> bool | None:
        """Whether the guest agent answered a ping; None when the clone has no agent channel."""
        ...

    def console_text(self) -> str | None:
        """The serial console's output so far; None when it cannot be read."""
        ...


@dataclass(frozen=True)
class Wanted:
    """What counts as alive, from the job: ``restore_test_console`` and ``_seconds``."""

    console_line: str | None
    seconds: float


@dataclass(frozen=True)
class Outcome:
    ok: bool
    sign: str | None
    seconds: float  # from the start of the watch to the sign, or to the failure
    problem: str | None = None
    error: bool = False  # the test could not run: no verdict on the version


def watch(
    probes: Probes,
    wanted: Wanted,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    cancel: threading.Event | None = None,
) -> Outcome:
    """Poll ``probes`` until a sign of life, a sign of death, or ``wanted.seconds``."""
    began = clock()
    while True:
        elapsed = clock() - began
        text = probes.console_text()
        down = probes.down()
        if down is not None:
            text = probes.console_text()  # its last words, written as it went down
        death = _panic_line(text) or down
        if death is not None:
            return Outcome(False, None, elapsed, death)
        if probes.agent_answers():
            return Outcome(True, AGENT, elapsed)
        line = wanted.console_line
        if line and text is not None and line in text:
            return Outcome(True, CONSOLE, elapsed)
        if elapsed >= wanted.seconds:
            if line and text is not None:
                problem = f"no {line!r} on the serial console within {wanted.seconds:g} s"
                return Outcome(False, None, elapsed, problem)
            return Outcome(True, RUNNING, elapsed)
        if cancel is not None and cancel.is_set():
            return Outcome(False, None, elapsed, CANCELLED)
        sleep(min(POLL_SECONDS, max(wanted.seconds - elapsed, 0.01)))


def _panic_line(text: str | None) -> str | None:
    if not text:
        return None
    for mark in PANIC_MARKS:
        where = text.find(mark)
        if where >= 0:
            line = text[where:].splitlines()[0].strip()
            return f"the guest's kernel panicked: {line}"
    return None
