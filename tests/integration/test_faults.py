"""The worst nights: crashes at every step, signals, full disks, late power-offs,
and libvirtd dropping the connection. After each, guests run as before, no partial
is left, and every listed version is complete and verifies."""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from rig import DiskSpec, GuestFactory, MiB, TestGuest
from rig.gs import GS, file_digests, fill_random, wait_stderr

from guestsafe.engine import locks
from guestsafe.engine.backup.results import RunResult
from guestsafe.engine.events import PhaseChanged

pytestmark = pytest.mark.integration


def _guest_with_data(guest_factory: GuestFactory, label: str, data_mib: int) -> TestGuest:
    """A running guest whose vdb holds real data, so its copy takes several chunks."""
    guest = guest_factory(
        label,
        disks=(DiskSpec("vda", "qcow2", 64 * MiB), DiskSpec("vdb", "raw", data_mib * MiB)),
        start=False,
    )
    fill_random(guest.disks["vdb"].path, data_mib * MiB)
    guest.start()
    return guest


def _assert_archive_sound(gs: GS, guest: TestGuest) -> None:
    assert gs.partials() == []
    assert not list(gs.archive.glob("*/.deleting-*"))
    versions = gs.versions(guest)
    assert versions, "no complete version left"
    reports = gs.engine.verify(gs.archive, guest.name)
    assert all(r.ok for r in reports), reports


def _assert_lock_free(gs: GS, guest: TestGuest) -> None:
    key = f"guest:{guest.dom.UUIDString()}"
    with locks.acquire(gs.engine.paths.state_dir, key, "test"):
        pass


# Each point is where the runner dies; the guest is running or off at that moment.
KILL_POINTS = [
    "phase.shutdown",
    "phase.copy",
    "copy.chunk",
    "phase.start",
    "phase.commit",
    "commit.before-manifest",
    "commit.before-rename",
    "commit.after-rename",
    "phase.verify",
    "phase.retention",
    "retention.before-delete",
]


@pytest.mark.parametrize("point", KILL_POINTS)
def test_sigkill_at_each_step_then_recover(gs: GS, guest_factory: GuestFactory, point: str) -> None:
    guest = guest_factory("kill")
    gs.job("kill", [guest], keep=1)
    offset = guest.console_size()
    assert gs.engine.run_job("kill").ok
    guest.wait_for_console(r"^GS-READY", timeout=60, after=offset)
    [first] = gs.versions(guest)
    digests = file_digests(first)

    proc = gs.popen("run", "kill", extra_env={"GUESTSAFE_FAILPOINTS": f"{point}=kill"})
    proc.wait(timeout=180)
    assert proc.returncode == -signal.SIGKILL

    recovered = gs.cli("recover", check=True)

    assert guest.is_running(), recovered.stderr
    _assert_archive_sound(gs, guest)
    _assert_lock_free(gs, guest)
    numbers = [v.number for v in gs.versions(guest)]
    if 1 in numbers:
        assert file_digests(gs.versions(guest)[0]) == digests
    # The next run works and numbers stay monotonic.
    offset = guest.console_size()
    assert gs.engine.run_job("kill").ok
    assert gs.versions(guest)[-1].number > max(numbers)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_signal_to_a_running_cli_cleans_up(
    gs: GS, guest_factory: GuestFactory, sig: signal.Signals
) -> None:
    guest = _guest_with_data(guest_factory, "sig", 96)
    gs.job("sig", [guest])

    proc = gs.popen("run", "sig", extra_env={"GUESTSAFE_FAILPOINTS": "copy.chunk=slow"})
    wait_stderr(proc, "copying vdb")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)

    assert proc.returncode == 130, err  # case 22: the cause, interrupted
    assert "cancelling the run" in err
    assert guest.is_running()
    assert gs.partials() == [] and gs.versions(guest) == []


@pytest.fixture
def loop_fs(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """Makes mounted ext4 loop filesystems of a given size in MiB."""
    mounted: list[Path] = []

    def make(size_mib: int) -> Path:
        image = tmp_path / f"fs{len(mounted)}.img"
        mountpoint = tmp_path / f"fs{len(mounted)}"
        mountpoint.mkdir()
        with image.open("wb") as f:
            f.truncate(size_mib * MiB)
        subprocess.run(["mkfs.ext4", "-q", "-m", "0", str(image)], check=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(mountpoint)], check=True)
        mountpoint.chmod(0o700)
        mounted.append(mountpoint)
        return mountpoint

    yield make
    for mountpoint in mounted:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def test_too_small_destination_is_refused_before_shutdown(
    gs: GS, guest_factory: GuestFactory, loop_fs: Callable[[int], Path]
) -> None:
    small_fs = loop_fs(128)
    guest = _guest_with_data(guest_factory, "full", 96)
    domain_id = guest.dom.ID()
    gs.job("full", [guest], destination=small_fs)

    result = gs.engine.run_job("full")

    assert not result.ok
    assert re.search(r"need [\d.]+ MiB on .*, [\d.]+ (MiB|KiB) free", result.outcomes[0].message)
    assert guest.is_running() and guest.dom.ID() == domain_id  # never stopped
    assert list(small_fs.glob("*/*")) == []


def test_disk_filling_mid_copy_removes_the_partial_and_keeps_old_versions(
    gs: GS,
    guest_factory: GuestFactory,
    loop_fs: Callable[[int], Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    small_fs = loop_fs(256)
    guest = _guest_with_data(guest_factory, "fill", 80)
    gs.job("fill", [guest], destination=small_fs, keep=1)
    offset = guest.console_size()
    assert gs.engine.run_job("fill").ok
    guest.wait_for_console(r"^GS-READY", timeout=60, after=offset)
    archive = gs.engine.archive(small_fs)
    [first] = archive.versions(guest.name)
    digests = file_digests(first)
    monkeypatch.setenv("GUESTSAFE_FAILPOINTS", "copy.chunk=slow")
    copying = threading.Event()
    results: list[RunResult] = []

    def reporter(event: object) -> None:
        if "copying vdb" in str(getattr(event, "message", "")):
            copying.set()

    worker = threading.Thread(target=lambda: results.append(gs.engine.run_job("fill", reporter)))
    worker.start()
    assert copying.wait(120)
    # Another writer takes the rest of the disk while the copy runs.
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={small_fs / 'filler2'}", "bs=1M"],
        capture_output=True,
        check=False,
    )
    worker.join(180)

    [result] = results
    assert not result.ok
    assert "no space left" in result.outcomes[0].message
    assert guest.is_running()
    assert list(small_fs.glob("*/.partial-*")) == []
    [still] = archive.versions(guest.name)  # retention did not run
    assert still.number == first.number and file_digests(still) == digests


def test_guest_powering_off_after_the_timeout_is_started_again(
    gs: GS, guest_factory: GuestFactory
) -> None:
    guest = guest_factory("late", ignore_acpi=True)
    timeout = 5
    gs.job("late", [guest], shutdown_timeout=timeout, on_timeout="abort")
    shutdown_began = threading.Event()

    def reporter(event: object) -> None:
        if isinstance(event, PhaseChanged) and event.phase == "shutdown":
            shutdown_began.set()

    def power_off_late() -> None:
        # Stands in for a guest that finishes its shutdown just after the timeout.
        assert shutdown_began.wait(120)
        time.sleep(timeout + 2)
        guest.dom.destroy()

    threading.Thread(target=power_off_late, daemon=True).start()
    result = gs.engine.run_job("late", reporter)

    assert not result.ok
    assert "powered off after the shutdown timeout" in result.log_path.read_text()
    assert guest.is_running()
    assert gs.versions(guest) == []


def _virt_admin_clients_of(pid: int) -> list[str]:
    listing = subprocess.run(
        ["virt-admin", "srv-clients-list", "libvirtd"], capture_output=True, text=True, check=True
    ).stdout
    ids = re.findall(r"^\s*(\d+)\s+unix", listing, re.MULTILINE)
    mine = []
    for client in ids:
        info = subprocess.run(
            ["virt-admin", "client-info", "libvirtd", client],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        if re.search(rf"unix_process_id\s*:\s*{pid}\b", info):
            mine.append(client)
    return mine


def test_libvirt_connection_lost_mid_copy_reconnects_and_restarts_the_guest(
    gs: GS, guest_factory: GuestFactory
) -> None:
    guest = _guest_with_data(guest_factory, "conn", 96)
    gs.job("conn", [guest])

    proc = gs.popen("run", "conn", extra_env={"GUESTSAFE_FAILPOINTS": "copy.chunk=slow"})
    wait_stderr(proc, "copying vdb")
    clients = _virt_admin_clients_of(proc.pid)
    assert clients, "the runner has no libvirt connection to drop"
    for client in clients:  # libvirtd drops the runner's connection, as a restart would
        subprocess.run(["virt-admin", "client-disconnect", "libvirtd", client], check=True)
    _, err = proc.communicate(timeout=180)

    assert guest.is_running(), err
    assert gs.partials() == []
    if proc.returncode == 0:
        _assert_archive_sound(gs, guest)
    else:
        assert gs.versions(guest) == []
