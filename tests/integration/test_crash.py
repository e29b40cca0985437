"""A runner killed mid-copy, then `guestsafe recover`."""

from __future__ import annotations

import signal

import pytest
from rig import GuestFactory
from rig.gs import GS, file_digests, wait_stderr

from guestsafe.engine import locks

pytestmark = pytest.mark.integration


def test_sigkill_mid_copy_then_recover(gs: GS, guest_factory: GuestFactory) -> None:
    guest = guest_factory("crash")
    gs.job("crash", [guest])
    offset = guest.console_size()
    assert gs.engine.run_job("crash").ok
    guest.wait_for_console(r"^GS-READY", timeout=60, after=offset)
    [first] = gs.versions(guest)
    digests = file_digests(first)

    proc = gs.popen("run", "crash", extra_env={"GUESTSAFE_FAILPOINTS": "copy.chunk=hang"})
    wait_stderr(proc, "FAILPOINT copy.chunk hang")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)

    assert not guest.is_running()  # the runner died with the guest stopped
    assert gs.partials()

    recovered = gs.cli("recover", check=True)

    assert "started again" in recovered.stderr
    assert guest.is_running()
    assert gs.partials() == []
    assert [v.number for v in gs.versions(guest)] == [1]
    assert file_digests(gs.versions(guest)[0]) == digests
    key = f"guest:{guest.dom.UUIDString()}"
    with locks.acquire(gs.engine.paths.state_dir, key, "test"):
        pass  # the dead runner's lock is free
    # And the next run works, with a new version number.
    result = gs.engine.run_job("crash")
    assert result.ok, result.outcomes
    assert [v.number for v in gs.versions(guest)][-1] == 3


def test_every_command_recovers_first(gs: GS, guest_factory: GuestFactory) -> None:
    guest = guest_factory("autorec")
    gs.job("autorec", [guest])

    proc = gs.popen("run", "autorec", extra_env={"GUESTSAFE_FAILPOINTS": "copy.chunk=kill"})
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert not guest.is_running()

    listing = gs.cli("list", "--dest", str(gs.archive), check=True)

    assert guest.is_running()
    assert gs.partials() == []
    assert "no versions" in listing.stdout
