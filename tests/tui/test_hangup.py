"""Fault case 2: the SSH session of a console-started run drops (SIGHUP).

The console cancels the run and exits only after the engine has removed the
unfinished copy and started the guest again. It runs in a real pty, in its own
process, on the demo sandbox, as an operator's console would.
"""

from __future__ import annotations

import contextlib
import os
import pty
import re
import select
import signal
import sys
import time
from pathlib import Path

import pytest

from guestsafe.engine import demo

pytestmark = pytest.mark.tui

MIB = 1024 * 1024


def _drain(fd: int, seconds: float) -> bytes:
    out = b""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                out += os.read(fd, 65536)
            except OSError:
                break
    return out


def _wait_exit(pid: int, fd: int, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        _drain(fd, 0.2)
    return None


def _running_guests(node_file: Path) -> set[str]:
    text = node_file.read_text()
    domains = re.findall(r"<domain.*?</domain>", text, re.DOTALL)
    return {
        re.search(r"<name>(.*?)</name>", d).group(1)  # type: ignore[union-attr]
        for d in domains
        if re.search(r"runstate>1<", d)
    }


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM])
def test_hangup_during_a_console_run_cancels_it_cleanly(tmp_path: Path, sig: int) -> None:
    sandbox = demo.ensure_sandbox(tmp_path / "demo")
    # Real data on db1's second disk keeps its copy busy for several seconds.
    with (sandbox.disk_dir / "db1-vdb.raw").open("r+b") as f:
        f.write(os.urandom(160 * MIB))
    env = {
        **os.environ,
        "GUESTSAFE_DEMO_DIR": str(sandbox.root),
        "GUESTSAFE_FAILPOINTS": "copy.chunk=slow",
        "TERM": "xterm-256color",
    }
    status: int | None = None
    pid, fd = pty.fork()
    if pid == 0:  # the console, as an SSH session would run it
        os.execve(sys.executable, [sys.executable, "-m", "guestsafe.tui", "--demo"], env)
    try:
        _drain(fd, 4)
        os.write(fd, b"s")  # start the selected job (nightly: web1, db1) ...
        _drain(fd, 1.5)
        os.write(fd, b"y")  # ... and confirm
        log_dir = sandbox.home / "log"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            logs = sorted(log_dir.glob("*.log"))
            if logs and "copying vdb" in logs[-1].read_text():
                break
            _drain(fd, 0.3)
        else:
            pytest.fail("the console never started copying db1's vdb")
        os.kill(pid, sig)
        status = _wait_exit(pid, fd, 60)
    finally:
        if status is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert status is not None, "the console did not exit after the hang-up"
    log = logs[-1].read_text()
    assert "copy cancelled" in log
    assert {"web1", "db1"} <= _running_guests(sandbox.node_file)
    assert list(sandbox.archive_dir.glob("*/.partial-*")) == []
