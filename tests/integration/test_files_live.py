"""Browsing and extracting a version's files through the libguestfs appliance.

The version is made by a real cold backup of a rig guest whose second disk (vdb,
raw) holds a partition table and an ext4 filesystem built by ``mkfs.ext4 -d``
from a known tree. The guest never boots: a shut-off guest is copied as it is.
"""

from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path

import pytest
from rig import DiskSpec, MiB
from rig.gs import GS, file_digests

pytestmark = pytest.mark.integration

# The test machines' /dev/kvm opens but runs no VM: the appliance must use TCG.
TCG = {"GUESTSAFE_APPLIANCE_ACCEL": "tcg"}
PARTITION_OFFSET = 1 * MiB
HOSTILE = "bad\x1b[31mname\x01"


def build_tree(root: Path) -> None:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hosts").write_text("127.0.0.1 localhost\n")
    (root / "etc" / "hosts").chmod(0o640)
    (root / "data").mkdir()
    (root / "data" / "big.bin").write_bytes(os.urandom(3 * MiB + 123))
    (root / "data" / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "data" / "run.sh").chmod(0o755)
    (root / "data" / HOSTILE).write_text("hostile name\n")
    (root / "data" / "escape").symlink_to("/etc/passwd")  # recreated, never followed
    for n, path in enumerate(sorted(root.rglob("*"), key=lambda p: -len(p.parts))):
        stamp = 1_600_000_000 + n * 3600  # whole seconds: small ext4 inodes keep no ns
        os.utime(path, (stamp, stamp), follow_symlinks=False)


def write_ext4_disk(image: Path, tree: Path, size: int) -> None:
    """A DOS partition table with one ext4 partition made from ``tree``, in place."""
    with image.open("r+b") as f:
        f.truncate(0)
        f.truncate(size)
    subprocess.run(
        ["sfdisk", "-q", str(image)],
        input="label: dos\nstart=2048, type=83\n",
        text=True,
        check=True,
    )
    fs_size = (size - PARTITION_OFFSET) // 1024
    subprocess.run(
        [
            "mkfs.ext4",
            "-q",
            "-E",
            f"offset={PARTITION_OFFSET}",
            "-d",
            str(tree),
            str(image),
            f"{fs_size}k",
        ],
        check=True,
    )


def b3sum_check(version_dir: Path) -> None:
    subprocess.run(["b3sum", "--check", "--quiet", "B3SUMS"], cwd=version_dir, check=True)


def assert_same_tree(source: Path, copy: Path) -> None:
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        got = copy / rel
        want_st, got_st = path.lstat(), got.lstat()
        assert stat.S_IFMT(got_st.st_mode) == stat.S_IFMT(want_st.st_mode), rel
        assert stat.S_IMODE(got_st.st_mode) == stat.S_IMODE(want_st.st_mode), rel
        assert int(got_st.st_mtime) == int(want_st.st_mtime), rel
        if path.is_symlink():
            assert os.readlink(got) == os.readlink(path), rel
        elif path.is_file():
            assert got.read_bytes() == path.read_bytes(), rel


def test_files_listed_and_extracted_with_bytes_modes_and_times(
    gs: GS, guest_factory, tmp_path: Path
) -> None:
    guest = guest_factory(
        "files",
        disks=(DiskSpec("vda", "qcow2", 32 * MiB), DiskSpec("vdb", "raw", 32 * MiB)),
        start=False,
    )
    tree = tmp_path / "tree"
    build_tree(tree)
    write_ext4_disk(guest.disks["vdb"].path, tree, 32 * MiB)
    gs.job("files", [guest])
    assert gs.engine.run_job("files").ok
    [version] = gs.versions(guest)
    b3sum_check(version.path)
    before = file_digests(version)
    gs.env.update(TCG)

    started = time.monotonic()
    filesystems = gs.cli("files", guest.name, "1", check=True)
    print(f"appliance launch + list filesystems: {time.monotonic() - started:.1f} s")
    assert "/dev/sdb1:/  ext4" in filesystems.stdout

    listing = gs.cli("files", guest.name, "1", "/dev/sdb1:/data", check=True).stdout
    lines = {line.rsplit("  ", 1)[-1]: line for line in listing.splitlines()}
    assert lines["run.sh"].startswith("-rwxr-xr-x")
    assert "escape -> /etc/passwd" in lines
    assert "\x1b" not in listing and "\x01" not in listing  # hostile names are escaped
    assert gs.cli("files", guest.name, "1", "/dev/sdb1:/../etc").returncode == 9

    dest = tmp_path / "out"
    gs.cli("extract", guest.name, "1", "/dev/sdb1:/", str(dest), check=True)
    assert_same_tree(tree, dest / "sdb1")
    assert (dest / "sdb1" / "data" / HOSTILE).read_text() == "hostile name\n"

    # A second extraction is refused before anything is written; --force replaces.
    (dest / "sdb1" / "etc" / "hosts").write_text("changed\n")
    again = gs.cli("extract", guest.name, "1", "/dev/sdb1:/etc", str(dest / "sdb1"))
    assert again.returncode == 9 and "already exist" in again.stderr
    assert (dest / "sdb1" / "etc" / "hosts").read_text() == "changed\n"
    # A link planted where a file goes is replaced, not followed out of DEST.
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    (dest / "sdb1" / "etc" / "hosts").unlink()
    (dest / "sdb1" / "etc" / "hosts").symlink_to(victim)
    gs.cli("extract", guest.name, "1", "/dev/sdb1:/etc", str(dest / "sdb1"), "--force", check=True)
    assert victim.read_text() == "keep me\n"
    assert_same_tree(tree / "etc", dest / "sdb1" / "etc")

    # Read-only: every file of the version is as the backup wrote it.
    assert file_digests(version) == before
    b3sum_check(version.path)
