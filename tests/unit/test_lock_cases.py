"""Issue 12, case 15: the archive's lock lives in the archive.

Two runners with their own state folders (as two hosts on one NFS share have)
reach one archive through two paths: the real one and a symlinked parent. The
other writer is a real process, so its PID, its death and its lock are real.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import test_runner_phases as phases

from guestsafe.engine import locks
from guestsafe.engine.archive.store import Archive
from guestsafe.engine.jobs.model import Job
from guestsafe.engine.paths import Paths

WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from guestsafe.engine import locks
    from guestsafe.engine.archive.store import Archive

    root = Path(sys.argv[1])
    lock = locks.archive_lock(Archive.open(root).root, "backup of job other-host")
    lock.acquire()
    partial = Archive.open(root).begin("web1")
    print(partial.path, flush=True)
    time.sleep(120)
    """
)


@pytest.fixture
def rig(tmp_path: Path) -> phases.Rig:
    rig = phases.Rig(tmp_path)
    rig.add_guest("web1")
    Archive.open(rig.archive, create=True)
    return rig


@pytest.fixture
def other_writer(rig: phases.Rig) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """A writer in another process, through the archive's real path, mid-backup."""
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(rig.archive)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        partial = Path(proc.stdout.readline().strip())
        assert partial.is_dir()
        yield proc, partial
    finally:
        proc.kill()
        proc.wait()


def _second_runner(rig: phases.Rig) -> tuple[phases.Rig, Job]:
    """A runner with its own state folder that reaches the archive through a symlinked parent."""
    alias = rig.root / "alias"
    alias.symlink_to(rig.root)
    home = rig.root / "second-host"
    rig.paths = Paths(home / "config" / "jobs.toml", home / "state", home / "log", home / "cache")
    return rig, Job("nightly", ["web1"], alias / "archive", lock_wait=0)


def test_case_15_a_second_runner_through_another_path_leaves_the_first_ones_partial(
    rig: phases.Rig, other_writer: tuple[subprocess.Popen[str], Path]
) -> None:
    proc, partial = other_writer
    second, job = _second_runner(rig)

    result = second.run(job)

    assert not result.ok
    message = result.outcomes[0].message
    assert f"busy: archive {rig.archive} held by PID {proc.pid} on " in message, message
    assert "(backup of job other-host)" in message
    assert partial.is_dir()  # not cleared under the running writer
    assert second.calls() == []  # and no guest was touched
    holder = locks.archive_holder(rig.archive)
    assert holder is not None and holder.pid == proc.pid


def test_case_15_a_partial_whose_owner_died_is_cleared(
    rig: phases.Rig, other_writer: tuple[subprocess.Popen[str], Path]
) -> None:
    proc, partial = other_writer
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    second, job = _second_runner(rig)

    result = second.run(job)

    assert result.ok, result.outcomes[0].message
    assert not partial.exists()
    assert second.versions("web1") == [2]  # numbering went on past the dead one's 1
    assert locks.archive_holder(rig.archive) is None
    assert (rig.archive / locks.ARCHIVE_LOCK_FILE).read_bytes() == b""  # released cleanly


def test_case_15_a_live_last_writer_keeps_its_partials_where_locks_do_not_work(
    rig: phases.Rig,
) -> None:
    # A filesystem whose locks stay local (NFS mounted nolock) lets us lock an
    # archive whose last writer, this test's parent process, still runs.
    partial = Archive.open(rig.archive).begin("web1")
    owner = {
        "key": f"archive {rig.archive}",
        "pid": os.getppid(),
        "host": socket.gethostname(),
        "since": "2025-01-06T02:00:03+00:00",
        "purpose": "backup of job other-host",
        "started": locks.process_start(os.getppid()),
    }
    (rig.archive / locks.ARCHIVE_LOCK_FILE).write_text(json.dumps(owner) + "\n")

    result = rig.run(rig.job(["web1"]))

    assert result.ok
    assert partial.path.is_dir()
    assert f"its last writer, PID {os.getppid()} on " in result.log_path.read_text()


def test_case_15_a_filesystem_without_locks_is_refused_in_words(
    rig: phases.Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_locks(fd: int, cmd: int, arg: object = 0) -> object:
        if cmd == fcntl.F_OFD_SETLK:
            raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
        return real(fd, cmd, arg)

    real = fcntl.fcntl
    monkeypatch.setattr(fcntl, "fcntl", no_locks)

    result = rig.run(rig.job(["web1"]))

    assert not result.ok and result.exit_code == 5
    assert "No locks available; guestsafe needs working file locks" in result.outcomes[0].message
    assert rig.calls() == []
