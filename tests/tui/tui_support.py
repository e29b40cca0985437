"""Helpers shared by the console's Pilot tests and snapshot tests."""

from __future__ import annotations

import atexit
import json
import os
import random
import shutil
import string
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from textual.pilot import Pilot
from textual.widgets import Input

from guestsafe.engine import demo
from guestsafe.engine.api import ArchiveSpace, Engine, LastResult
from guestsafe.engine.archive.versions import VersionInfo
from guestsafe.engine.hypervisor.connection import Hypervisor
from guestsafe.engine.jobs import schedule
from guestsafe.engine.restore import plan as restore_plan
from guestsafe.tui.headless import busy_workers as busy_workers  # shared with the screenshots
from guestsafe.tui.headless import settle as settle
from guestsafe.tui.headless import wait_for as wait_for

# Snapshots show paths, so the SVGs always show this folder. Each test run keeps its
# sandbox in a folder of its own (``snapshot_dir``), whose name has exactly this
# length, so every line lays out the same; the conftest writes this name in its
# place before an SVG is compared.
SNAPSHOT_DEMO_DIR = Path("/tmp/guestsafe-snapshot-demo")
_SNAPSHOT_PREFIX = str(SNAPSHOT_DEMO_DIR)[: -len("demo")]
_run_dir: Path | None = None
FIXED_HOST = "demo-host"
FIXED_DATE = "2025-01-06T02:00:00+00:00"
# The console's "now" for next runs: a Monday morning before the nightly job.
FIXED_NOW = datetime(2025, 1, 6, 1, 0, tzinfo=UTC)


async def type_into(pilot: Pilot[Any], selector: str, text: str) -> None:
    """Focus an input, clear it with the keyboard, and type ``text`` key by key."""
    field = pilot.app.screen.query_one(selector, Input)
    field.focus()
    await pilot.pause()
    await pilot.press("home", "ctrl+k", *text)


async def fill(pilot: Pilot[Any], selector: str, text: str) -> None:
    """Set an input's text at once (a paste), for fields a test is not about."""
    field = pilot.app.screen.query_one(selector, Input)
    field.focus()
    field.value = text
    await pilot.pause()


def snapshot_dir() -> Path:
    """This test run's own sandbox folder, ``/tmp/guestsafe-snapshot-xxxx``; removed at exit."""
    global _run_dir
    while _run_dir is None:
        suffix = "".join(random.choices(string.ascii_lowercase + string.digits, k=4))
        candidate = Path(_SNAPSHOT_PREFIX + suffix)
        if candidate == SNAPSHOT_DEMO_DIR:
            continue  # the name the SVGs show belongs to no run
        try:
            candidate.mkdir(mode=0o700)
        except FileExistsError:
            continue  # another run's
        _run_dir = candidate
        atexit.register(shutil.rmtree, candidate, ignore_errors=True)
    return _run_dir


def normalise_snapshot_folder(svg: str) -> str:
    """An SVG with this run's folder shown as ``SNAPSHOT_DEMO_DIR``."""
    return svg if _run_dir is None else svg.replace(str(_run_dir), str(SNAPSHOT_DEMO_DIR))


def fresh_sandbox(root: Path | None = None) -> demo.Sandbox:
    """An empty demo sandbox, by default in this run's snapshot folder (recreated per test)."""
    root = snapshot_dir() if root is None else root
    # Emptied, not removed: the folder's existence is what keeps its name this run's.
    for child in root.iterdir() if root.is_dir() else []:
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    return demo.ensure_sandbox(root)


def fixed_versions(engine: Engine) -> Callable[..., list[VersionInfo]]:
    """engine.versions with dates and sizes that do not depend on the clock or filesystem."""
    real = engine.versions

    def versions(destination: Path, guest: str | None = None) -> list[VersionInfo]:
        found = real(destination, guest)
        return [
            replace(v, date=FIXED_DATE, size=(v.number * 7 + len(v.guest)) * 1024 * 1024)
            for v in found
        ]

    return versions


def fixed_space(folders: Iterable[Path]) -> ArchiveSpace:
    """space_of with unique sizes and a total that do not depend on the filesystem."""
    unique = {f: (int(f.name) * 3 + len(f.parent.name)) * 1024 * 1024 for f in folders}
    return ArchiveSpace(unique=unique, total=sum(unique.values()) + 5 * 1024 * 1024)


def counting_macs() -> Callable[[set[str]], str]:
    """A new_mac that counts up instead of drawing random numbers."""
    state = {"n": 0}

    def new_mac(taken: set[str]) -> str:
        while True:
            state["n"] += 1
            mac = f"{restore_plan.MAC_PREFIX}:aa:00:{state['n']:02x}"
            if mac not in taken:
                taken.add(mac)
                return mac

    return new_mac


def freeze(monkeypatch: Any) -> None:
    """Make everything a snapshot shows independent of this host and this moment."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    monkeypatch.setattr(Hypervisor, "hostname", property(lambda self: FIXED_HOST))
    monkeypatch.setattr(restore_plan, "new_mac", counting_macs())
    monkeypatch.setattr(schedule, "current_time", lambda: FIXED_NOW)


def write_fixed_log(engine: Engine, name: str = "20250106-020000-nightly.log") -> Path:
    """A finished run's log with fixed times, as the runner writes it."""
    lines = [
        "2025-01-06T02:00:00+00:00 INFO - job nightly: web1, db1 -> /srv/backup",
        "2025-01-06T02:00:00+00:00 PHASE web1 preflight",
        "2025-01-06T02:00:00+00:00 PHASE web1 shutdown",
        "2025-01-06T02:00:00+00:00 INFO web1 shutting down (timeout 300 s, then abort)",
        "2025-01-06T02:00:04+00:00 INFO web1 guest is off after 3.9 s",
        "2025-01-06T02:00:04+00:00 PHASE web1 copy",
        "2025-01-06T02:00:04+00:00 INFO web1 copying vda (/var/lib/libvirt/images/web1.qcow2)",
        "2025-01-06T02:00:05+00:00 PROGRESS web1 vda 1073741824 8589934592",
        "2025-01-06T02:00:06+00:00 PROGRESS web1 vda 2147483648 8589934592",
        "2025-01-06T02:00:07+00:00 PROGRESS web1 vda 3221225472 8589934592",
        "2025-01-06T02:00:08+00:00 WARNING web1 [b]markup[/b] in a message stays literal",
        "2025-01-06T02:00:09+00:00 PROGRESS web1 vda 5368709120 8589934592",
    ]
    directory = engine.paths.log_dir
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text("\n".join(lines) + "\n")
    old = datetime(2025, 1, 6, 2, 0, 9, tzinfo=UTC).timestamp()
    os.utime(path, (old, old))
    return path


def write_fixed_result(engine: Engine) -> None:
    """A failed last run of the mail job, as the Jobs tab shows it."""
    directory = engine.paths.state_dir / "results"
    directory.mkdir(parents=True, exist_ok=True)
    result = LastResult(
        "mail-weekly",
        False,
        "2025-01-05T03:30:41+00:00",
        str(engine.paths.log_dir / "20250105-033000-mail-weekly.log"),
        [
            "mail: failed: need 41 GiB on /srv/backup, 12 GiB free; guest is shut off, "
            "no version, previous versions untouched"
        ],
        "2025-01-05T03:30:00+00:00",
    )
    (directory / "mail-weekly.json").write_text(json.dumps(asdict(result)))
