"""Shared versions (issue 13): second backups and seven versions on XFS (reflink) and ext4.

Each filesystem is a loop-mounted image in the scratch directory, made afresh; the
source disk stays outside it, where a guest's disk would be. The backups are the
copier child's ``copy`` (a first, full version) and ``backup`` (a version made from
the previous one: a reflink clone with only the changed chunks written where the
filesystem can, else a full copy, as the engine does).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

MiB = 1024 * 1024
GiB = 1024 * MiB
CHANGE_WRITE = MiB  # the changed data is written in 1 MiB pieces at random data offsets


@contextlib.contextmanager
def loop_fs(scratch: Path, kind: str, size: int) -> Iterator[tuple[Path, str]]:
    """A fresh ``kind`` filesystem on a loop device: its mount point and the device's name."""
    image = scratch / f"{kind}.img"
    with image.open("wb") as f:
        f.truncate(size)
    mkfs = ["mkfs.xfs", "-q", "-m", "reflink=1"] if kind == "xfs" else ["mkfs.ext4", "-q", "-F"]
    subprocess.run([*mkfs, str(image)], check=True)
    # Direct I/O to the image, as a real disk takes writes: a buffered loop device
    # would put every byte the full copy writes through the host's page cache too.
    device = subprocess.run(["losetup", "--find", "--show", "--direct-io=on", str(image)],
                            check=True, capture_output=True, text=True).stdout.strip()
    mnt = scratch / f"mnt-{kind}"
    mnt.mkdir()
    subprocess.run(["mount", device, str(mnt)], check=True)
    try:
        yield mnt, Path(device).name
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        subprocess.run(["losetup", "-d", device], check=False)
        mnt.rmdir()
        image.unlink()


def sectors_written(device: str) -> int:
    """Bytes the block device has written so far (/sys/block/DEV/stat, field 7)."""
    return int(Path(f"/sys/block/{device}/stat").read_text().split()[6]) * 512


def used_bytes(mnt: Path) -> int:
    st = os.statvfs(mnt)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def change_data(path: Path, fraction: float, seed: int) -> int:
    """Overwrite ``fraction`` of the file's data with new random bytes; bytes written."""
    extents = []
    with path.open("r+b") as f:
        fd, pos, size = f.fileno(), 0, os.fstat(f.fileno()).st_size
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            if end - start >= CHANGE_WRITE:
                extents.append((start, end))
            pos = end
        data = sum(end - start for start, end in extents)
        rng = random.Random(seed)
        target = int(data * fraction)
        done = 0
        while done < target:
            start, end = rng.choice(extents)
            offset = rng.randrange(start, end - CHANGE_WRITE + 1, 4096)
            f.seek(offset)
            f.write(rng.randbytes(CHANGE_WRITE))
            done += CHANGE_WRITE
        f.flush()
        os.fsync(fd)
    return done


def child_json(argv: list[str]) -> dict[str, Any]:
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return dict(json.loads(out.splitlines()[-1]))


def measure(bench: Any, race: Callable[..., Any], ours: Callable[..., Any], child: Path,
            drop_caches: Callable[[Any], None]) -> None:
    """second_backup_written_fraction, second_backup_vs_full_ratio, seven_versions_space_ratio."""
    src: Path = bench.files["raw"]
    data = int(str(bench.figures["source_data_bytes"]))
    size = int(str(bench.figures["source_virtual_bytes"]))
    image = 2 * size + 12 * data  # ext4 holds seven full versions and the race's copies
    for kind in ("xfs", "ext4"):
        with loop_fs(bench.scratch, kind, image) as (mnt, device):
            second_backup(bench, race, ours, child, drop_caches, src, mnt, device, kind, data)
            seven_versions(bench, child, src, mnt, kind)


def second_backup(bench: Any, race: Callable[..., Any], ours: Callable[..., Any], child: Path,
                  drop_caches: Callable[[Any], None], src: Path, mnt: Path, device: str,
                  kind: str, data: int) -> None:
    first, second, full = mnt / "v1.raw", mnt / "v2.raw", mnt / "full.raw"
    child_json([sys.executable, str(child), "copy", str(src), str(first)])
    for path in (second, full):
        for side in (".chunks", ".b3"):
            path.with_name(path.name + side).unlink(missing_ok=True)
    runs = race(bench, [
        ours("second", "backup", str(src), str(second), str(first), output=second),
        ours("full", "copy", str(src), str(full), output=full),
    ])
    if _digest(second) != _digest(full):
        raise AssertionError(f"the second backup's BLAKE3 is not the full copy's ({kind})")
    bench.record("shared", f"second backup, unchanged disk ({kind})", runs["second"], data)
    bench.record("shared", f"full copy of the same disk ({kind})", runs["full"], data)
    bench.figures[f"second_backup_vs_full_ratio_{kind}"] = round(
        runs["second"].seconds / runs["full"].seconds, 3)
    bench.figures[f"second_backup_vs_full_ratio_{kind}_median"] = round(
        runs["second"].median / runs["full"].median, 3)
    if kind == "xfs":
        changed_backup(bench, race, ours, child, src, first, second)
    second.unlink(missing_ok=True)
    drop_caches(bench)
    before = sectors_written(device)
    result = child_json([sys.executable, str(child), "backup", str(src), str(second),
                         str(first)])
    os.sync()
    written = sectors_written(device) - before
    bench.figures[f"second_backup_written_fraction_{kind}"] = round(written / data, 4)
    bench.figures[f"second_backup_shared_{kind}"] = result["shared"]
    bench.figures[f"second_backup_unchanged_{kind}"] = result.get("unchanged", False)
    bench.figures[f"second_backup_chunks_written_bytes_{kind}"] = result["written"]
    for path in (first, second, full):
        path.unlink()
        for side in (".chunks", ".b3"):
            path.with_name(path.name + side).unlink(missing_ok=True)


def changed_backup(bench: Any, race: Callable[..., Any], ours: Callable[..., Any], child: Path,
                   src: Path, first: Path, second: Path) -> None:
    """A second backup after 2 % of the data changed: the whole-file hash caught up
    after the first differing chunk, against one pass hashing everything as read."""
    disk = bench.scratch / "changed.raw"
    subprocess.run(["cp", "--sparse=always", str(src), str(disk)], check=True)
    change_data(disk, 0.02, seed=11)
    runs = race(bench, [
        ours("caught up", "backup", str(disk), str(second), str(first), output=second),
        ours("one pass", "backup-one-pass", str(disk), str(second), str(first), output=second),
    ])
    data = int(str(bench.figures["source_data_bytes"]))
    bench.record("shared", "second backup, 2 % changed, caught up (xfs)", runs["caught up"], data)
    bench.record("shared", "second backup, 2 % changed, one pass (xfs)", runs["one pass"], data)
    bench.figures["changed_backup_catch_up_vs_one_pass_ratio_xfs"] = round(
        runs["caught up"].seconds / runs["one pass"].seconds, 3)
    bench.figures["changed_backup_catch_up_vs_one_pass_ratio_xfs_median"] = round(
        runs["caught up"].median / runs["one pass"].median, 3)
    second.unlink()
    caught_up = child_json([sys.executable, str(child), "backup", str(disk), str(second),
                            str(first)])["blake3"]
    b3sum = subprocess.run(["b3sum", "--no-names", str(disk)], check=True, capture_output=True,
                           text=True).stdout.strip()
    if caught_up != b3sum:
        raise AssertionError("the caught-up whole-file digest is not b3sum's")
    disk.unlink()


def _digest(disk: Path) -> str:
    return (disk.parent / (disk.name + ".b3")).read_text()


def seven_versions(bench: Any, child: Path, src: Path, mnt: Path, kind: str) -> None:
    """Seven versions, 2 % of the data changed between each: space over one version's."""
    disk = bench.scratch / "changing.raw"
    subprocess.run(["cp", "--sparse=always", str(src), str(disk)], check=True)
    os.sync()
    base = used_bytes(mnt)
    child_json([sys.executable, str(child), "copy", str(disk), str(mnt / "v1.raw")])
    one = (mnt / "v1.raw").stat().st_blocks * 512
    changed = 0
    for n in range(2, 8):
        changed += change_data(disk, 0.02, seed=n)
        child_json([sys.executable, str(child), "backup", str(disk), str(mnt / f"v{n}.raw"),
                    str(mnt / f"v{n - 1}.raw")])
    os.sync()
    bench.figures[f"seven_versions_space_ratio_{kind}"] = round((used_bytes(mnt) - base) / one, 3)
    bench.figures["seven_versions_changed_bytes"] = changed
    disk.unlink()
    for path in mnt.iterdir():
        if path.is_file():
            path.unlink()
    shutil.rmtree(mnt / "lost+found", ignore_errors=True)
