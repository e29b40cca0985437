"""stop-short and snapshot: push backups of real TCG guests under qemu:///system."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest
from rig import DiskSpec, GuestFactory, MiB, TestGuest, read_disk_counter, read_first_line
from rig.gs import BOOT, GS, shutdown_counter

from guestsafe.engine.archive.manifest import Manifest
from guestsafe.engine.backup.push_copy import PushCopy
from guestsafe.engine.hypervisor import disk_files, push_jobs

pytestmark = pytest.mark.integration

# Data on vdb that takes QEMU seconds to copy, so a test can throttle the job
# right after it begins and then interfere while it runs.
SLOW_DATA = 1024 * MiB


@pytest.fixture
def pgs(gs: GS, workdir: Path) -> GS:
    """gs with its archive where QEMU can reach it: pytest's own tmp dirs are 0700."""
    archive = workdir / "archive"
    archive.mkdir(mode=0o700)
    gs.archive = archive
    return gs


def _acl_users(path: Path) -> list[str]:
    """Named-user ACL entries of ``path`` (``user:64055:--x``)."""
    out = subprocess.run(
        ["getfacl", "--omit-header", "--numeric", "--absolute-names", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line for line in out.splitlines() if re.match(r"user:\d+:", line)]


def test_stop_short_backs_up_the_clean_state_with_the_guest_back_before_the_copy(
    pgs: GS, guest_factory: GuestFactory
) -> None:
    guest = guest_factory(
        "short",
        disks=(DiskSpec("vda", "qcow2", 64 * MiB), DiskSpec("vdb", "raw", 64 * MiB)),
        vdb_text="raw disk of a stop-short guest",
    )
    before = guest.console_size()
    pgs.job("short", [guest], mode="stop-short")

    result = pgs.engine.run_job("short")

    assert result.ok, result.outcomes
    assert guest.is_running()
    [version] = pgs.versions(guest)
    manifest: Manifest = version.manifest
    assert manifest.mode == "stop-short" and version.verified is True
    assert manifest.downtime is not None and 0 < manifest.downtime < 60
    at_shutdown = shutdown_counter(guest, before)
    assert read_disk_counter(version.path / "vda.qcow2", "qcow2") == at_shutdown > 0
    assert read_first_line(version.path / "vdb.raw", "raw") == "raw disk of a stop-short guest"
    # The guest ran again before QEMU's copy was done, and the log says how long it was down.
    log = result.log_path.read_text()
    assert log.index("guest is running again") < log.index("QEMU copied the disks")
    assert re.search(rf"downtime {manifest.downtime:.1f} s", log)
    # QEMU's files are ordinary archive files: root's, 0600, no ACL; raw holes stay holes.
    for name in ("vda.qcow2", "vdb.raw"):
        st = (version.path / name).stat()
        assert (st.st_uid, st.st_mode & 0o777) == (0, 0o600), name
    assert (version.path / "vdb.raw").stat().st_blocks * 512 <= 4 * MiB
    for folder in (pgs.archive, version.path.parent, version.path):
        assert _acl_users(folder) == [], folder
    assert {d.file for d in manifest.disks} == {"vda.qcow2", "vdb.raw"}
    proc = pgs.cli("verify", guest.name, "--dest", str(pgs.archive))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_stop_short_version_restores_to_a_clone_booting_with_the_counter_at_shutdown(
    pgs: GS, guest_factory: GuestFactory, workdir: Path
) -> None:
    guest = guest_factory("shortrest")
    before = guest.console_size()
    pgs.job("sr", [guest], mode="stop-short")
    assert pgs.engine.run_job("sr").ok
    at_shutdown = shutdown_counter(guest, before)
    clone = guest.name + "-clone"
    target = workdir / "clone-disks"
    target.mkdir()
    guest_factory.adopt(clone, target)

    archive = pgs.engine.archive(pgs.archive)
    plan = pgs.engine.plan_restore(archive, guest.name, 1, clone, target_dir=target)
    pgs.engine.restore(plan, start=True)

    console = Path(_console_of(pgs, clone))
    match = _wait_console(console, BOOT)
    assert int(match.group(1)) == at_shutdown > 0


def _console_of(gs: GS, name: str) -> str:
    xml = gs.engine.hv.xml(name, inactive=False)
    source = ET.fromstring(xml).find("./devices/serial/source")
    assert source is not None
    return source.get("path", "")


def _wait_console(path: Path, pattern: re.Pattern[str], timeout: float = 60) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        match = pattern.search(text)
        if match:
            return match
        time.sleep(0.2)
    raise AssertionError(f"no {pattern.pattern} on {path}")


# --- helpers for the failure tests ------------------------------------------------


def _fill(path: Path, data: int, offset: int = MiB) -> None:
    """Data into a raw disk file (one random MiB over and over): copies take real time."""
    block = os.urandom(MiB)
    with path.open("r+b") as f:
        f.seek(offset)
        for _ in range(data // MiB):
            f.write(block)
        os.fsync(f.fileno())


def _data_guest(guest_factory: GuestFactory, label: str, data: int) -> TestGuest:
    """A running guest with a raw vdb holding ``data`` bytes of random data."""
    size = data + 2 * MiB
    guest = guest_factory(label, disks=(DiskSpec("vda"), DiskSpec("vdb", "raw", size)), start=False)
    _fill(guest.disks["vdb"].path, data)
    guest.start()
    return guest


@pytest.fixture
def slow_push(monkeypatch: pytest.MonkeyPatch) -> None:
    """QEMU copies vdb at 1 MiB/s: the job still runs when a test interferes."""
    begin = PushCopy._begin

    def throttled(self: PushCopy, dom: libvirt.virDomain) -> None:
        begin(self, dom)
        dom.blockJobSetSpeed("vdb", 1, 0)  # the data disk (see _data_guest)

    monkeypatch.setattr(PushCopy, "_begin", throttled)


def _never_stopped(guest: TestGuest, after: int) -> bool:
    text = guest.console_text(after)
    return "GS-POWEROFF" not in text and "GS-BOOT" not in text


def _no_backup_job(guest: TestGuest) -> bool:
    return guest.dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE


# --- stop-short failures --------------------------------------------------------------


def test_stop_short_failure_mid_backup_leaves_the_guest_running_and_nothing_committed(
    pgs: GS, guest_factory: GuestFactory, monkeypatch: pytest.MonkeyPatch, slow_push: None
) -> None:
    guest = _data_guest(guest_factory, "shortfail", SLOW_DATA)
    pgs.job("sf", [guest], mode="stop-short")
    monkeypatch.setenv("GUESTSAFE_FAILPOINTS", "push.during-backup=raise")

    result = pgs.engine.run_job("sf")

    assert not result.ok
    assert "failpoint push.during-backup" in result.outcomes[0].message
    assert guest.is_running() and _no_backup_job(guest)
    assert pgs.versions(guest) == [] and pgs.partials() == []
    log = result.log_path.read_text()
    assert "push backup job aborted" in log and "unfinished copy removed" in log
    for folder in (pgs.archive, *pgs.archive.iterdir()):
        if folder.is_dir():
            assert _acl_users(folder) == [], folder


def test_stop_short_running_out_of_space_keeps_older_versions(
    pgs: GS, guest_factory: GuestFactory, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    small = workdir / "small"
    image = workdir / "small.img"
    # About 70 MiB free: room for one 42 MiB version with margin (ext4 reserves
    # blocks for delayed allocation), not for a second one.
    subprocess.run(["truncate", "-s", "80M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], check=True)
    small.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(small)], check=True)
    try:
        small.chmod(0o700)
        pgs.archive = small
        guest = _data_guest(guest_factory, "full", 40 * MiB)
        pgs.job("full", [guest], mode="stop-short")
        # Preflight would see the shortage (it keeps a 64 MiB margin); pretend it did
        # not, as when the disk fills up during the copy, so ENOSPC comes from QEMU.
        monkeypatch.setattr(disk_files, "free_space", lambda _path: 1 << 40)
        assert pgs.engine.run_job("full").ok  # version 1 fills the disk to the brim

        result = pgs.engine.run_job("full")

        assert not result.ok
        assert "No space left on device" in result.outcomes[0].message
        assert guest.is_running() and _no_backup_job(guest)
        assert [v.number for v in pgs.versions(guest)] == [1]
        assert pgs.partials() == []
        [report] = pgs.engine.verify(small, guest.name, 1)
        assert report.ok, report.problems
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_guest_shutting_down_during_the_backup_is_discarded_and_started_again(
    pgs: GS, guest_factory: GuestFactory, monkeypatch: pytest.MonkeyPatch, slow_push: None
) -> None:
    guest = _data_guest(guest_factory, "selfstop", SLOW_DATA)
    pgs.job("ss", [guest], mode="stop-short")
    before = guest.console_size()
    finish = PushCopy.finish

    def shut_down_first(self: PushCopy) -> list[object]:
        # The guest boots again while QEMU copies; then it powers itself off.
        ready = guest.wait_for_console(r"GS-BOOT[^\n]*\n(.*\n)*?GS-READY", 60, after=before)
        guest.dom.shutdown()
        guest.wait_for_console(r"GS-POWEROFF", timeout=60, after=before + ready.end())
        return finish(self)  # type: ignore[return-value]

    monkeypatch.setattr(PushCopy, "finish", shut_down_first)

    result = pgs.engine.run_job("ss")

    assert not result.ok
    assert "stopped while QEMU was copying" in result.outcomes[0].message
    assert guest.is_running()
    assert pgs.versions(guest) == [] and pgs.partials() == []


def _wait_for_stderr(proc: subprocess.Popen[str], needle: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    assert proc.stderr is not None
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if needle in line:
            return
        if not line and proc.poll() is not None:
            raise AssertionError(f"runner exited with {proc.returncode} before {needle!r}")
    raise AssertionError(f"no {needle!r} within {timeout} s")


def test_runner_killed_while_qemu_copies_then_recover_stops_the_job(
    pgs: GS, guest_factory: GuestFactory
) -> None:
    guest = _data_guest(guest_factory, "killcopy", SLOW_DATA)
    pgs.job("kc", [guest], mode="stop-short")
    env = {"GUESTSAFE_FAILPOINTS": "push.during-backup=hang"}
    proc = pgs.popen("run", "kc", extra_env=env)
    _wait_for_stderr(proc, "FAILPOINT push.during-backup hang")
    guest.dom.blockJobSetSpeed("vdb", 1, 0)  # keep QEMU busy past the crash
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert guest.is_running() and not _no_backup_job(guest)

    recovered = pgs.cli("recover", check=True)

    assert "stopped the push backup" in recovered.stderr
    assert _no_backup_job(guest) and guest.is_running()
    assert pgs.partials() == []


def test_runner_killed_while_the_guest_is_paused_then_recover_resumes_it(
    pgs: GS, guest_factory: GuestFactory
) -> None:
    guest = guest_factory("killpaused")
    pgs.job("kp", [guest], mode="stop-short")

    proc = pgs.popen("run", "kp", extra_env={"GUESTSAFE_FAILPOINTS": "push.paused=kill"})
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert guest.state() == libvirt.VIR_DOMAIN_PAUSED

    recovered = pgs.cli("recover", check=True)

    assert "resumed" in recovered.stderr
    assert guest.state() == libvirt.VIR_DOMAIN_RUNNING
    assert pgs.partials() == []


# --- fallback, group -------------------------------------------------------------------


def test_without_push_backups_stop_short_refuses_unless_the_job_allows_stop(
    pgs: GS, guest_factory: GuestFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    guest = guest_factory("nopush")
    before = guest.console_size()
    monkeypatch.setattr(push_jobs, "MIN_LIBVIRT", 99_000_000)  # as on a too old libvirt
    pgs.job("strict", [guest], mode="stop-short")
    pgs.job("lenient", [guest], mode="stop-short", fallback_to_stop=True)

    refused = pgs.engine.run_job("strict")

    assert not refused.ok
    message = refused.outcomes[0].message
    assert "older than 99.0.0" in message and "fallback_to_stop" in message
    assert _never_stopped(guest, before) and pgs.versions(guest) == []

    fallen_back = pgs.engine.run_job("lenient")

    assert fallen_back.ok, fallen_back.outcomes
    [version] = pgs.versions(guest)
    assert version.manifest.mode == "stop"
    assert any("falling back to mode stop" in note for note in version.manifest.notes)
    assert guest.is_running()


def test_group_stop_short_stops_all_then_starts_in_reverse(
    pgs: GS, guest_factory: GuestFactory
) -> None:
    first, second = guest_factory("sgrpa"), guest_factory("sgrpb")
    pgs.job("sgroup", [first, second], mode="stop-short", group=True)

    result = pgs.engine.run_job("sgroup")

    assert result.ok, result.outcomes
    assert first.is_running() and second.is_running()
    phases = re.findall(r" PHASE (\S+) (\S+)", result.log_path.read_text())
    order = [(g, p) for g, p in phases if p in ("shutdown", "start")]
    a, b = first.name, second.name
    assert order == [(a, "shutdown"), (b, "shutdown"), (b, "start"), (a, "start")]
    assert [v.manifest.mode for v in pgs.versions(first) + pgs.versions(second)] == [
        "stop-short",
        "stop-short",
    ]


# --- snapshot ------------------------------------------------------------------------------


def test_snapshot_copies_the_running_guest_and_labels_it_crash_consistent(
    pgs: GS, guest_factory: GuestFactory
) -> None:
    guest = guest_factory("snap")
    before = guest.console_size()
    pgs.job("snap", [guest], mode="snapshot")

    result = pgs.engine.run_job("snap")

    assert result.ok, result.outcomes
    assert guest.is_running() and _never_stopped(guest, before)
    [version] = pgs.versions(guest)
    manifest = version.manifest
    assert manifest.mode == "snapshot" and manifest.downtime == 0.0
    assert any(note.startswith("crash-consistent") for note in manifest.notes)
    assert any("no guest agent" in note for note in manifest.notes)
    assert version.verified is True
    assert read_disk_counter(version.path / "vda.qcow2", "qcow2") > 0
    assert "crash-consistent" in result.log_path.read_text()
    listing = pgs.cli("list", guest.name, "--dest", str(pgs.archive), check=True)
    assert "snapshot (crash-consistent)" in listing.stdout


def test_snapshot_failure_mid_backup_never_stops_the_guest(
    pgs: GS, guest_factory: GuestFactory, monkeypatch: pytest.MonkeyPatch, slow_push: None
) -> None:
    guest = _data_guest(guest_factory, "snapfail", SLOW_DATA)
    before = guest.console_size()
    pgs.job("snapfail", [guest], mode="snapshot")
    monkeypatch.setenv("GUESTSAFE_FAILPOINTS", "push.during-backup=raise")

    result = pgs.engine.run_job("snapfail")

    assert not result.ok
    assert guest.is_running() and _never_stopped(guest, before) and _no_backup_job(guest)
    assert pgs.versions(guest) == [] and pgs.partials() == []


def test_snapshot_of_a_shut_off_guest_is_a_cold_copy(pgs: GS, guest_factory: GuestFactory) -> None:
    guest = guest_factory("snapoff", start=False)
    pgs.job("snapoff", [guest], mode="snapshot")

    assert pgs.engine.run_job("snapoff").ok

    assert not guest.is_running()
    [version] = pgs.versions(guest)
    assert version.manifest.mode == "stop"
    assert any("shut off" in note for note in version.manifest.notes)
