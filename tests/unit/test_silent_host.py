"""Issue 16: a remote host that never answers costs one bounded wait, not a hang.

ssh waits out TCP's retries for a host that is off (about two minutes) and, for
one that takes the TCP connection but never speaks, forever. The mute host
here is a listening socket on 127.0.0.1 that never accepts: the kernel
completes the handshake, then nothing comes. The real ssh client and the real
libvirt client are used; no libvirtd is reached.
"""

from __future__ import annotations

import shutil
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from rig.host import require

from guestsafe.engine.backup import recovery
from guestsafe.engine.backup.journal import Journal, JournalEntry
from guestsafe.engine.errors import HypervisorError
from guestsafe.engine.events import Event, LogLine
from guestsafe.engine.hypervisor.connection import Hypervisor
from guestsafe.engine.hypervisor.domain_xml import RUNNING
from guestsafe.engine.paths import Paths
from guestsafe.tui.cli import main

LIMIT = 1.5


def _mute_host() -> tuple[socket.socket, str]:
    """A listening socket that never accepts, and the qemu+ssh:// URI that reaches it."""
    require(shutil.which("ssh"), "ssh is missing (apt-get install openssh-client)")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    return listener, f"qemu+ssh://root@127.0.0.1:{listener.getsockname()[1]}/system?no_tty=1"


@pytest.fixture
def mute_uri() -> Iterator[str]:
    listener, uri = _mute_host()
    try:
        yield uri
    finally:
        listener.close()  # resets the waiting ssh: the abandoned open ends


def _opening_threads(uri: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"open {uri}"]


def _returns(call: Callable[[], object], seconds: float) -> list[BaseException]:
    """Run ``call`` in a thread; fail the test if it has not returned within ``seconds``."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:  # handed to the test, which asserts on it
            raised.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still waiting after {seconds} s"
    return raised


def test_a_host_that_never_answers_fails_the_open_at_the_limit(mute_uri: str) -> None:
    raised = _returns(lambda: Hypervisor(mute_uri, connect_timeout=LIMIT), 30)

    assert len(raised) == 1 and isinstance(raised[0], HypervisorError)
    assert f"cannot connect to {mute_uri}: no answer within {LIMIT:g} s" in str(raised[0])
    assert _opening_threads(mute_uri)  # libvirt's open still waits in the background


def test_the_abandoned_open_ends_once_the_host_goes_away() -> None:
    listener, uri = _mute_host()
    with pytest.raises(HypervisorError, match="no answer"):
        Hypervisor(uri, connect_timeout=LIMIT)
    (waiting,) = _opening_threads(uri)

    listener.close()

    waiting.join(30)
    assert not waiting.is_alive()


def test_recovery_asks_a_silent_host_once_for_all_its_guests(mute_uri: str, tmp_path: Path) -> None:
    home = tmp_path / "home"
    paths = Paths(home / "jobs.toml", home / "state", home / "log", home / "cache")
    journal = Journal(paths.state_dir)
    for guest in ("web1", "db1", "mail1"):
        entry = JournalEntry("nightly", guest, str(uuid.uuid4()), mute_uri, RUNNING)
        entry.detached = True  # its run lost the host mid-stream
        journal.write(entry)
    tries: list[str] = []

    def connect(uri: str) -> Hypervisor:
        tries.append(uri)
        return Hypervisor(uri, connect_timeout=LIMIT)

    said: list[Event] = []
    raised = _returns(lambda: recovery.recover(paths, said.append, connect=connect), 30)

    assert raised == [] and tries == [mute_uri]
    lines = {(e.guest, e.message) for e in said if isinstance(e, LogLine)}
    for guest in ("web1", "db1", "mail1"):
        assert any(g == guest and "no answer within" in m for g, m in lines), lines
    assert {e.guest for e in journal.entries()} == {"web1", "db1", "mail1"}  # kept for later


def test_a_command_asks_a_silent_host_within_its_connect_timeout(
    mute_uri: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`guests` with a guest left to recover on the silent host: the recovery at the
    command's start and the listing each wait [hosts.mute] connect_timeout, then go on."""
    monkeypatch.setenv("GUESTSAFE_HOME", str(tmp_path / "home"))
    config = tmp_path / "jobs.toml"
    config.write_text(f'[hosts.mute]\nuri = "{mute_uri}"\nconnect_timeout = {LIMIT}\n')
    journal = Journal(tmp_path / "home" / "state")
    entry = JournalEntry("nightly", "web1", str(uuid.uuid4()), mute_uri, RUNNING, detached=True)
    journal.write(entry)
    codes: list[int] = []
    argv = ["--connect", "test:///default", "--config", str(config), "guests"]

    raised = _returns(lambda: codes.append(main(argv)), 30)

    assert raised == [] and codes == [4]  # a host did not answer
    out, err = capsys.readouterr()
    assert f"host mute ({mute_uri}): unreachable" in out
    assert f"no answer within {LIMIT:g} s" in out
    assert "host local (test:///default): connected" in out
    assert [e.guest for e in journal.entries()] == ["web1"]  # kept for when it answers
    assert f"web1: recovery could not restart the guest: cannot connect to {mute_uri}" in err
