"""A scratch filesystem on a loop-mounted image file: XFS with reflink, or ext4 without.

For tests of what depends on the filesystem under an archive (shared blocks, FIEMAP).
Missing mkfs or a refused loop mount skips the test, and fails it in CI.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rig.host import require

_MKFS = {
    "xfs": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"],
    "ext4": ["mkfs.ext4", "-q", "-F"],
}


@contextmanager
def scratch_fs(where: Path, fstype: str, size: int = 512 * 1024 * 1024) -> Iterator[Path]:
    """Mount a fresh ``fstype`` filesystem of ``size`` bytes under ``where``; yield its root."""
    command = _MKFS[fstype]
    require(shutil.which(command[0]), f"{command[0]} is not installed")
    image = where / f"{fstype}.img"
    with image.open("wb") as handle:
        handle.truncate(size)
    subprocess.run([*command, str(image)], check=True, capture_output=True)
    mountpoint = where / f"{fstype}-mnt"
    mountpoint.mkdir()
    result = subprocess.run(
        ["mount", "-o", "loop", str(image), str(mountpoint)], check=False, capture_output=True
    )
    require(result.returncode == 0, f"cannot loop-mount an {fstype} image here")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=False)
