from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from guestsafe.engine.errors import LockBusy
from guestsafe.engine.locks import (
    Lock,
    acquire,
    destination_key,
    guest_key,
    holder,
    lock_path,
)

KEY = "guest:1b4e28ba-2fa1-11d2-883f-0016d3cca427"

HOLDER_SCRIPT = """
import sys, time
from pathlib import Path
from guestsafe.engine.locks import acquire
lock = acquire(Path(sys.argv[1]), sys.argv[2], "backup of job nightly")
print("locked", flush=True)
time.sleep(600)
"""


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def other_process(state: Path) -> Iterator[subprocess.Popen[str]]:
    """A separate process holding the lock on KEY until killed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER_SCRIPT, str(state), KEY],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "locked\n"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_acquire_and_release(state: Path) -> None:
    with acquire(state, KEY, "backup of job nightly") as lock:
        assert lock.held
        current = holder(state, KEY)
        assert current is not None
        assert (current.key, current.pid, current.host) == (KEY, os.getpid(), socket.gethostname())
        assert current.purpose == "backup of job nightly"
        assert abs(time.time() - current.since.timestamp()) < 5
    assert not lock.held
    assert holder(state, KEY) is None
    acquire(state, KEY, "again").release()


def test_lock_is_a_context_manager_that_acquires(state: Path) -> None:
    with Lock(state, KEY, "restore") as lock:
        assert lock.held
        with pytest.raises(LockBusy):
            acquire(state, KEY, "other")
    assert holder(state, KEY) is None


def test_busy_names_the_holder(state: Path) -> None:
    with acquire(state, KEY, "backup of job nightly"), pytest.raises(LockBusy) as info:
        acquire(state, KEY, "restore")
    message = str(info.value)
    pattern = (
        rf"busy: {re.escape(KEY)} held by PID {os.getpid()} on {re.escape(socket.gethostname())}"
        r" since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d \(backup of job nightly\)"
    )
    assert re.fullmatch(pattern, message), message


def test_busy_across_processes(state: Path, other_process: subprocess.Popen[str]) -> None:
    with pytest.raises(LockBusy, match=f"held by PID {other_process.pid} "):
        acquire(state, KEY, "restore")
    current = holder(state, KEY)
    assert current is not None and current.pid == other_process.pid


def test_sigkilled_holder_frees_the_lock(state: Path, other_process: subprocess.Popen[str]) -> None:
    other_process.send_signal(signal.SIGKILL)
    other_process.wait()
    # The dead holder's record is still in the file, but nobody holds the lock.
    assert lock_path(state, KEY).read_text()
    assert holder(state, KEY) is None
    with acquire(state, KEY, "after the crash"):
        current = holder(state, KEY)
        assert current is not None and current.pid == os.getpid()


def test_wait_timeout_is_honoured(state: Path) -> None:
    with acquire(state, KEY, "long job"):
        start = time.monotonic()
        with pytest.raises(LockBusy, match="long job"):
            acquire(state, KEY, "waiter", wait=0.4)
        waited = time.monotonic() - start
    assert 0.4 <= waited < 2.0


def test_fail_fast_by_default(state: Path) -> None:
    with acquire(state, KEY, "long job"):
        start = time.monotonic()
        with pytest.raises(LockBusy):
            acquire(state, KEY, "waiter")
        assert time.monotonic() - start < 0.2


def test_wait_gets_the_lock_when_released(state: Path) -> None:
    first = acquire(state, KEY, "short job")
    timer = threading.Timer(0.2, first.release)
    timer.start()
    try:
        with acquire(state, KEY, "waiter", wait=5) as second:
            assert second.held
    finally:
        timer.cancel()


def test_keys_are_independent(state: Path) -> None:
    with acquire(state, guest_key("web1"), "a"), acquire(state, guest_key("db1"), "b"):
        assert holder(state, guest_key("web1")) is not None
        assert holder(state, destination_key(Path("/srv"))) is None


def test_destination_key_normalises(tmp_path: Path) -> None:
    assert destination_key(tmp_path / "a" / ".." / "b") == destination_key(tmp_path / "b/")


def test_lock_files_are_private_and_safely_named(state: Path) -> None:
    with acquire(state, "guest:../../etc/passwd\n", "x y\nz"):
        path = lock_path(state, "guest:../../etc/passwd\n")
        assert path.parent == state / "locks"
        assert re.fullmatch(r"[0-9a-f]{64}\.lock", path.name)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        current = holder(state, "guest:../../etc/passwd\n")
        assert current is not None and current.purpose == "x y z"


def test_holder_of_unknown_key(state: Path) -> None:
    assert holder(state, KEY) is None


def test_release_twice_is_harmless(state: Path) -> None:
    lock = acquire(state, KEY, "x")
    lock.release()
    lock.release()
    assert lock.acquire() is lock
    lock.release()


def test_lock_is_not_inherited_by_children(state: Path) -> None:
    with acquire(state, KEY, "x"):
        # close_fds=False: only O_CLOEXEC keeps the lock out of the child.
        child = subprocess.Popen(["sleep", "30"], close_fds=False)
    try:
        assert holder(state, KEY) is None
        acquire(state, KEY, "while the child runs").release()
    finally:
        child.kill()
        child.wait()
