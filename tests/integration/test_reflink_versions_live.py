"""Shared versions (issue 13) of a real TCG guest on loop-mounted XFS (reflink) and btrfs.

One guest per filesystem goes through the life of an archive: a first version, a
second that shares the first's unchanged blocks, both verified and restored to
booting clones with the right counters, a run killed mid-copy that leaves both
untouched, retention deleting the oldest while the newer stays whole, and a byte
flipped on the device inside a block two versions share, reported for both.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from rig import GuestFactory, require
from rig.gs import BOOT, GS, file_digests, shutdown_counter

pytestmark = pytest.mark.integration
MiB = 1024 * 1024
SHARED_LINE = re.compile(r"vda: shared with version (\d+), wrote (.+) of (.+)")


@pytest.fixture(params=["xfs", "btrfs"])
def reflink_dir(request: pytest.FixtureRequest) -> Iterator[tuple[str, Path, Path]]:
    """A fresh loop-mounted filesystem that can reflink: its kind, mount point and image."""
    kind = str(request.param)
    mkfs = {"xfs": ["mkfs.xfs", "-q", "-m", "reflink=1"], "btrfs": ["mkfs.btrfs", "-q"]}[kind]
    require(os.geteuid() == 0 and shutil.which(mkfs[0]) is not None, f"{mkfs[0]} and root")
    base = Path("/var/tmp/guestsafe-test-reflink")
    base.mkdir(mode=0o700, exist_ok=True)
    image = base / f"{kind}-{os.getpid()}.img"
    with image.open("wb") as f:
        f.truncate(1024 * MiB)
    subprocess.run([*mkfs, str(image)], check=True)
    mnt = base / f"mnt-{kind}-{os.getpid()}"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=False)
    require(mounted.returncode == 0, f"cannot loop-mount a {kind} image here")
    try:
        yield kind, mnt, image
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        mnt.rmdir()
        image.unlink()


def logs(gs: GS) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted(gs.home.rglob("*.log")))


def shared_extents(path: Path) -> list[tuple[int, int]]:
    """(physical byte offset, length) of the file's extents flagged shared by filefrag -v."""
    out = subprocess.run(["filefrag", "-v", "-b4096", str(path)], check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    found = []
    for line in out.splitlines():
        fields = [f.strip() for f in line.split(":")]
        if len(fields) >= 4 and "shared" in line and fields[0].isdigit():
            start = int(fields[2].split("..")[0])
            length = int(fields[3])
            found.append((start * 4096, length * 4096))
    return found


def verify(gs: GS, archive: Path) -> dict[int, list[str]]:
    return {r.number: r.problems for r in gs.engine.verify(archive)}


def run_and_settle(gs: GS, guest: object, job: str) -> int:
    """One backup run of the running guest; the counter it shut down with."""
    before = guest.console_size()  # type: ignore[attr-defined]
    result = gs.engine.run_job(job)
    assert result.ok, result.outcomes
    counter = shutdown_counter(guest, before)  # type: ignore[arg-type]
    guest.wait_for_console(r"^GS-READY", timeout=90, after=before)  # type: ignore[attr-defined]
    return counter


def restored_boot(gs: GS, libvirt_conn: libvirt.virConnect, factory: GuestFactory,
                  guest: str, number: int) -> int:
    """Restore version ``number`` as a new guest, start it: the counter it boots with."""
    name = f"{guest}-v{number}"
    factory.adopt(name)
    gs.cli("restore", guest, str(number), name, "--start", check=True)
    dom = libvirt_conn.lookupByName(name)
    source = ET.fromstring(dom.XMLDesc(0)).find("./devices/serial/source")
    assert source is not None
    console = Path(source.get("path", ""))
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        match = BOOT.search(console.read_text(errors="replace") if console.exists() else "")
        if match:
            dom.destroy()
            return int(match.group(1))
        time.sleep(0.3)
    raise AssertionError(f"{name} never booted")


def test_versions_share_blocks_verify_restore_survive_a_crash_and_retention(
    gs: GS,
    guest_factory: GuestFactory,
    libvirt_conn: libvirt.virConnect,
    reflink_dir: tuple[str, Path, Path],
) -> None:
    kind, mnt, image = reflink_dir
    archive = mnt / "archive"
    archive.mkdir(mode=0o700)
    gs.archive = archive  # versions, partials and the job's destination: on the reflink fs
    guest = guest_factory(f"rl{kind}")
    guest.wait_for_console(r"^GS-READY", timeout=90)
    gs.job("rl", [guest], keep=2)

    first_counter = run_and_settle(gs, guest, "rl")
    used_one = shutil.disk_usage(mnt).used
    second_counter = run_and_settle(gs, guest, "rl")
    used_two = shutil.disk_usage(mnt).used
    one, two = gs.versions(guest)
    disk_two = two.path / "vda.qcow2"

    # The second version shares the first's unchanged blocks, and says so in its log.
    [line] = list(SHARED_LINE.finditer(logs(gs)))
    assert line.group(1) == "1"
    assert shared_extents(disk_two), "no extent of the second version is shared"
    assert used_two - used_one < disk_two.stat().st_blocks * 512 // 2
    assert one.manifest.format == two.manifest.format == 3
    assert verify(gs, archive) == {1: [], 2: []}
    subprocess.run(["b3sum", "--check", "B3SUMS"], cwd=two.path, check=True, capture_output=True)

    # Each restores to a clone that boots with the counter it was backed up with.
    assert restored_boot(gs, libvirt_conn, guest_factory, guest.name, 1) == first_counter
    assert restored_boot(gs, libvirt_conn, guest_factory, guest.name, 2) == second_counter

    # A run killed while it writes a changed chunk leaves both versions untouched.
    digests = {v.number: file_digests(v) for v in (one, two)}
    before = guest.console_size()
    proc = gs.popen("run", "rl", extra_env={"GUESTSAFE_FAILPOINTS": "copy.chunk=kill"})
    proc.wait(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    gs.cli("recover", check=True)
    assert gs.partials() == []
    assert {v.number: file_digests(v) for v in gs.versions(guest)} == digests
    guest.wait_for_console(r"^GS-READY", timeout=90, after=before)

    # Retention (keep = 2) deletes version 1 once a new one is committed; 2 stays whole.
    run_and_settle(gs, guest, "rl")
    two_now, newest = gs.versions(guest)
    assert two_now.number == 2 and file_digests(two_now) == digests[2]
    assert verify(gs, archive) == {2: [], newest.number: []}

    # A byte flipped on the device in a block both versions share: reported for both.
    # XFS names the chunk whose digest differs; btrfs's own data checksum refuses the
    # read, and verify names the file and the chunk it could not read.
    shared = shared_extents(newest.path / "vda.qcow2")
    assert shared
    offset = device_offset(kind, image, shared[0][0]) + 100
    os.sync()
    with image.open("r+b") as f:
        f.seek(offset)
        old = f.read(1)
        f.seek(offset)
        f.write(bytes([old[0] ^ 0xFF]))
        f.flush()
        os.fsync(f.fileno())
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    problems = verify(gs, archive)
    for number in (2, newest.number):
        assert any(p.startswith("vda.qcow2: chunk at offset") for p in problems[number]), problems


def device_offset(kind: str, image: Path, address: int) -> int:
    """Where on the device the filesystem's extent address lies (filefrag prints
    btrfs's logical addresses, which its chunk tree maps onto the device)."""
    if kind == "xfs":
        return address
    out = subprocess.run(["btrfs-map-logical", "-l", str(address), str(image)],
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    match = re.search(r"mirror 1 logical \d+ physical (\d+)", out)
    assert match, out
    return int(match.group(1))
