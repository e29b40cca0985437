"""A version's last restore test: ``restore-test.json`` in its folder (FORMAT.md, 9.1).

``guestsafe test-restore`` boots a version as a throw-away clone and records here
whether it came up, how long it took and by which sign. Like ``verified.json`` it
is a record about the version, not part of it: it is outside the manifest and
B3SUMS, verify passes it by, and it is replaced atomically after each test. A
screenshot of the clone's display, where it had one, lies beside it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from guestsafe.engine.archive.layout import read_small
from guestsafe.engine.archive.manifest import RESTORE_TEST_FILE, SCREENSHOT_FILES
from guestsafe.engine.fsutil import atomic_write_bytes

__all__ = ["RESTORE_TEST_FILE", "SCREENSHOT_FILES", "RestoreTest"]
# The signs of life, in the order a test looks for them (restore/boottest/signs.py).
AGENT = "agent"
CONSOLE = "console"
RUNNING = "running"
SIGNS = (AGENT, CONSOLE, RUNNING)


@dataclass(frozen=True)
class RestoreTest:
    """One restore test of a version, as ``restore-test.json`` holds it."""

    ok: bool
    at: str  # ISO-8601 UTC time the test began
    sign: str | None  # one of SIGNS when ok; None when no sign came
    seconds: float | None  # from start to the sign of life
    problem: str | None = None  # why it failed, one line
    screenshot: str | None = None  # the file beside this one, if one was taken
    # Not ok because the test could not run (this host: no room for the overlays,
    # libvirt refused the clone), not because the guest showed no sign of life.
    # Says nothing about the version, so retention still counts it as good.
    error: bool = False

    @property
    def failed(self) -> bool:
        """The version failed its test: it ran and the guest never came up."""
        return not self.ok and not self.error

    def label(self) -> str:
        """How a listing shows it: "boot ok 14 s", "boot FAILED", "boot error"."""
        if self.error:
            return "boot error"
        if not self.ok:
            return "boot FAILED"
        return f"boot ok {round(self.seconds or 0)} s"


def write_restore_test(folder: Path, test: RestoreTest) -> None:
    data = json.dumps(asdict(test), indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(folder / RESTORE_TEST_FILE, data.encode())


def read_restore_test(folder: Path) -> RestoreTest | None:
    """The version's last test; None if never tested or the record proves nothing."""
    try:
        data = json.loads(read_small(folder / RESTORE_TEST_FILE))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("ok"), bool):
        return None
    seconds = data.get("seconds")
    sign = data.get("sign")
    return RestoreTest(
        ok=data["ok"],
        at=str(data.get("at", "")),
        sign=sign if sign in SIGNS else None,
        seconds=float(seconds) if isinstance(seconds, int | float) else None,
        problem=_text(data.get("problem")),
        screenshot=_text(data.get("screenshot")),
        error=data.get("error") is True and not data["ok"],
    )


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def last_test_failed(folder: Path) -> bool:
    """Whether the version's last restore test failed (not: never tested, nor could not run)."""
    test = read_restore_test(folder)
    return test is not None and test.failed
