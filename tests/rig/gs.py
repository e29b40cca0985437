"""guestsafe on top of the rig: an engine with its own home, jobs, and the CLI.

Every test gets its own GUESTSAFE_HOME (config, state, logs) and archive
directory under tmp_path, so tests never share locks, journals or versions.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import blake3
import pytest

from guestsafe.engine.api import Engine
from guestsafe.engine.archive.versions import VersionInfo
from guestsafe.engine.jobs.model import Job, Schedule
from guestsafe.engine.paths import Paths

from .guest import TestGuest
from .host import LIBVIRT_URI

POWEROFF = re.compile(r"GS-POWEROFF counter=(\d+)")
BOOT = re.compile(r"GS-BOOT counter=(\d+)")
COUNTER = re.compile(r"GS-COUNTER (\d+)")
READY = re.compile(r"^GS-READY", re.MULTILINE)


@dataclass
class GS:
    """One test's guestsafe: engine, home and archive."""

    home: Path
    archive: Path
    engine: Engine
    env: dict[str, str] = field(default_factory=dict)

    def job(self, name: str, guests: list[TestGuest] | list[str], **options: object) -> Job:
        names = [g.name if isinstance(g, TestGuest) else g for g in guests]
        # A busy guest fails at once unless a test asks for waiting (lock_wait=...).
        options.setdefault("lock_wait", 0)
        destination = options.pop("destination", self.archive)
        job = Job(name, names, destination, schedule=Schedule(None), **options)  # type: ignore[arg-type]
        self.engine.save_job(job)
        return job

    def cli(
        self,
        *args: str,
        extra_env: dict[str, str] | None = None,
        check: bool = False,
        timeout: float = 300,
    ) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, **self.env, **(extra_env or {})}
        proc = subprocess.run(
            [sys.executable, "-m", "guestsafe.tui", "--connect", LIBVIRT_URI, *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"guestsafe {' '.join(args)} -> {proc.returncode}\n{proc.stderr}")
        return proc

    def popen(self, *args: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        env = {**os.environ, **self.env, **(extra_env or {})}
        return subprocess.Popen(
            [sys.executable, "-m", "guestsafe.tui", "--connect", LIBVIRT_URI, *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def versions(self, guest: TestGuest | str) -> list[VersionInfo]:
        name = guest.name if isinstance(guest, TestGuest) else guest
        return self.engine.versions(self.archive, name)

    def partials(self) -> list[Path]:
        return sorted(self.archive.glob("*/.partial-*"))


def make_gs(tmp_path: Path) -> Iterator[GS]:
    home = tmp_path / "gshome"
    archive = tmp_path / "archive"
    archive.mkdir(mode=0o700)
    paths = Paths(home / "config" / "jobs.toml", home / "state", home / "log", home / "cache")
    engine = Engine(uri=LIBVIRT_URI, paths=paths)
    gs = GS(home, archive, engine, {"GUESTSAFE_HOME": str(home)})
    try:
        yield gs
    finally:
        engine.close()


@pytest.fixture
def gs(tmp_path: Path) -> Iterator[GS]:
    yield from make_gs(tmp_path)


def shutdown_counter(guest: TestGuest, after: int = 0) -> int:
    """The counter the guest reported as it powered off (after console offset ``after``)."""
    values = POWEROFF.findall(guest.console_text(after))
    assert values, f"{guest.name} never printed GS-POWEROFF"
    return int(values[-1])


def wait_counted_past(guest: TestGuest, above: int, after: int = 0, timeout: float = 60) -> int:
    """Wait until the guest's latest boot (after console offset ``after``) counts past ``above``.

    Returns the value seen. The guest prints its counter on a boot's first tick and
    then only every 5th (a second and more under TCG), and the first often comes before
    GS-READY: so the search starts at the boot's GS-BOOT line, not at the console's
    end, and needs no wait for a later print. Only the latest boot's lines count,
    and only once it printed GS-READY too, so a shutdown that follows is heard.
    """
    deadline = time.monotonic() + timeout
    while True:
        text = guest.console_text(after)
        boots = list(BOOT.finditer(text))
        if boots and READY.search(text, boots[-1].end()):
            values = [int(v) for v in COUNTER.findall(text, boots[-1].end())]
            if any(v > above for v in values):
                return max(values)
        if time.monotonic() > deadline or not guest.is_running():
            raise AssertionError(
                f"{guest.name} did not count past {above}; console tail:\n{text[-2000:]}"
            )
        time.sleep(0.05)


def boot_counter(console: Path, timeout: float = 90) -> int:
    """The counter a guest booted with: its GS-BOOT line on the console file ``console``."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = console.read_text(errors="replace") if console.exists() else ""
        match = BOOT.search(text)
        if match:
            return int(match.group(1))
        time.sleep(0.3)
    raise AssertionError(f"no GS-BOOT on {console}: {text[-1500:]}")


def file_digests(version: VersionInfo) -> dict[str, str]:
    """BLAKE3 of every file a version holds, computed independently of guestsafe."""
    digests = {}
    for path in sorted(version.path.iterdir()):
        if path.name == "verified.json":
            continue  # rewritten by every verify: a record about the version, not of it
        hasher = blake3.blake3()
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                hasher.update(chunk)
        digests[path.name] = hasher.hexdigest()
    return digests


def fill_random(path: Path, size: int) -> None:
    """Overwrite the start of a disk file with real (incompressible) data."""
    with path.open("r+b") as f:
        f.write(os.urandom(size))


def wait_stderr(proc: subprocess.Popen[str], needle: str, timeout: float = 120) -> str:
    """Read a runner's stderr until a line holds ``needle``; return what was read."""
    assert proc.stderr is not None
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        seen.append(line)
        if needle in line:
            return "".join(seen)
        if not line and proc.poll() is not None:
            break
    raise AssertionError(f"no {needle!r} from the runner; it said:\n{''.join(seen)}")
