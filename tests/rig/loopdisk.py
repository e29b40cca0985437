"""File-backed disks for device tests: a sparse image, a partition table, loop, mkfs.

    disk = loop_disks(Part("ext4", 256, label="gsbackup"), Part("swap", 32))
    disk.partitions[0].node  -> "/dev/loop3p1"
    disk.partitions[0].uuid  -> the filesystem UUID udev reports

The partitions appear through ``losetup -P`` and, where the kernel was slow to
scan, ``partx -a``; every filesystem is then known to udev (``udevadm trigger``
and ``settle``) before the fixture hands the disk over. Cleanup unmounts what is
still mounted from the disk, detaches the loop device and deletes the image,
whatever the test did.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
import uuid as uuidlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .errors import RigError
from .host import require

MiB = 1024 * 1024
UDEV_TIMEOUT = 20.0
# Room before the first partition (alignment) and after the last (the GPT backup).
_TABLE_MIB = 2

MKFS = {
    "ext4": ["mkfs.ext4", "-q", "-F", "-L", "{label}"],
    "xfs": ["mkfs.xfs", "-q", "-f", "-L", "{label}"],
    "btrfs": ["mkfs.btrfs", "-q", "-f", "-L", "{label}"],
    "ntfs": ["mkfs.ntfs", "-Q", "-q", "-F", "-L", "{label}"],
    "exfat": ["mkfs.exfat", "-n", "{label}"],
    "vfat": ["mkfs.vfat", "-F", "32", "-n", "{label}"],
    "swap": ["mkswap", "-L", "{label}"],
    "LVM2_member": ["pvcreate", "-q", "-f"],
    "crypto_LUKS": [],  # written by _fake_luks_header: no cryptsetup needed
    "": [],  # a partition without a filesystem
}
TOOLS = {
    "ext4": "mkfs.ext4",
    "xfs": "mkfs.xfs",
    "btrfs": "mkfs.btrfs",
    "ntfs": "mkfs.ntfs",
    "exfat": "mkfs.exfat",
    "vfat": "mkfs.vfat",
    "swap": "mkswap",
    "LVM2_member": "pvcreate",
}


@dataclass(frozen=True)
class Part:
    """One partition: filesystem ("" for none), size in MiB, label."""

    fstype: str
    size_mib: int = 64
    label: str = ""


@dataclass
class Partition:
    node: str
    fstype: str
    label: str
    uuid: str = ""

    @property
    def spec(self) -> str:
        return f"UUID={self.uuid}"


@dataclass
class LoopDisk:
    image: Path
    loop: str = ""
    partitions: list[Partition] = field(default_factory=list)
    whole: bool = False  # a filesystem on the whole disk, no partition table

    @property
    def attached(self) -> bool:
        return bool(self.loop)

    def attach(self) -> None:
        """Plug it in: losetup, partitions, and wait until udev knows every filesystem."""
        self.loop = _run("losetup", "-f", "--show", "-P", str(self.image)).strip()
        nodes = [self.loop] if self.whole else _partition_nodes(self.loop, len(self.partitions))
        for part, node in zip(self.partitions, nodes, strict=True):
            part.node = node
        settle(self.loop, *nodes)

    def detach(self) -> None:
        """Unplug it: unmount whatever is mounted from it, then detach the loop device."""
        if not self.loop:
            return
        nodes = [p.node for p in self.partitions] + [self.loop]
        for node in nodes:
            for target in mount_points(node):
                subprocess.run(["umount", "-l", target], capture_output=True, check=False)
        _run("losetup", "-d", self.loop)
        loop, self.loop = self.loop, ""
        _wait_gone([p.node for p in self.partitions if p.node != loop])
        subprocess.run(["udevadm", "settle", "-t", "10"], capture_output=True, check=False)

    def mounted(self) -> bool:
        return any(mount_points(p.node) for p in self.partitions)


def _run(*argv: str, input: str | None = None) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, input=input, check=False)
    if result.returncode != 0:
        raise RigError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


def settle(*nodes: str) -> None:
    """Have udev (re)read the nodes and wait until it is done."""
    _run("udevadm", "trigger", "--action=change", *nodes)
    _run("udevadm", "settle", "-t", str(int(UDEV_TIMEOUT)))


def _partition_nodes(loop: str, count: int) -> list[str]:
    nodes = [f"{loop}p{n}" for n in range(1, count + 1)]
    deadline = time.monotonic() + UDEV_TIMEOUT
    while not all(os.path.exists(n) for n in nodes):
        if time.monotonic() > deadline:
            raise RigError(f"partitions of {loop} never appeared: {nodes}")
        # The kernel's own scan (losetup -P) is not always there in time; partx adds
        # what is missing and complains about what exists.
        subprocess.run(["partx", "-a", loop], capture_output=True, check=False)
        time.sleep(0.1)
    return nodes


def _wait_gone(nodes: Sequence[str]) -> None:
    deadline = time.monotonic() + UDEV_TIMEOUT
    while any(os.path.exists(n) for n in nodes) and time.monotonic() < deadline:
        time.sleep(0.05)


def mount_points(node: str) -> list[str]:
    """Where ``node`` is mounted now (its real device, whatever the spelling)."""
    try:
        rdev = os.stat(node).st_rdev
    except OSError:
        return []
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        major, minor = (int(x) for x in fields[2].split(":"))
        sep = fields.index("-")
        source = fields[sep + 2]
        same = os.makedev(major, minor) == rdev
        if not same and source.startswith("/dev/"):
            with contextlib.suppress(OSError):
                same = os.stat(source).st_rdev == rdev
        if same:
            found.append(fields[4].replace("\\040", " "))
    return found


def udev_property(node: str, name: str) -> str:
    out = _run("udevadm", "info", "--query=property", f"--name={node}")
    for line in out.splitlines():
        key, _, value = line.partition("=")
        if key == name:
            return value
    return ""


def _fake_luks_header(node: str) -> None:
    # A LUKS1 header is what blkid looks at: magic, version 1, and the UUID at 168.
    header = bytearray(592)
    header[0:6] = b"LUKS\xba\xbe"
    header[6:8] = (1).to_bytes(2, "big")
    header[8:11] = b"aes"
    header[40:51] = b"xts-plain64"
    header[72:78] = b"sha256"
    header[104:108] = (4096).to_bytes(4, "big")
    header[108:112] = (64).to_bytes(4, "big")
    header[168:204] = str(uuidlib.uuid4()).encode()
    with open(node, "r+b") as handle:
        handle.write(header)
        os.fsync(handle.fileno())


def make_filesystem(node: str, part: Part) -> None:
    if part.fstype == "crypto_LUKS":
        _fake_luks_header(node)
        return
    argv = [a.replace("{label}", part.label or "gstest") for a in MKFS[part.fstype]]
    if argv:
        _run(*argv, node)


def build(image: Path, parts: Sequence[Part], *, whole: bool = False) -> LoopDisk:
    """Make the image with its partitions and filesystems; it is left attached."""
    if whole and len(parts) != 1:
        raise ValueError("a whole-disk filesystem is one Part")
    size = sum(p.size_mib for p in parts) + (0 if whole else 2 * _TABLE_MIB)
    with image.open("wb") as handle:
        handle.truncate(size * MiB)  # sparse: only what mkfs writes takes space
    if not whole:
        table = "label: gpt\n" + "".join(f"size={p.size_mib}MiB\n" for p in parts)
        _run("sfdisk", "-q", str(image), input=table)
    disk = LoopDisk(image, partitions=[Partition("", p.fstype, p.label) for p in parts])
    disk.whole = whole
    disk.attach()
    try:
        for part, spec in zip(disk.partitions, parts, strict=True):
            make_filesystem(part.node, spec)
        settle(*(p.node for p in disk.partitions))
        for part in disk.partitions:
            _wait_for_udev(part)
    except BaseException:
        disk.detach()
        raise
    return disk


def _wait_for_udev(part: Partition) -> None:
    """udev answers from its database; wait until it holds the new filesystem."""
    if not part.fstype:
        return
    deadline = time.monotonic() + UDEV_TIMEOUT
    while udev_property(part.node, "ID_FS_TYPE") != part.fstype:
        if time.monotonic() > deadline:
            raise RigError(f"udev never saw {part.fstype} on {part.node}")
        settle(part.node)
    part.uuid = udev_property(part.node, "ID_FS_UUID")


def loop_problem(fstypes: Sequence[str] = ()) -> str | None:
    """Why loop-device tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "device tests need root (losetup, mount)"
    for tool in ("losetup", "sfdisk", "partx", "udevadm", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed; run .ci/host-setup.sh"
    if not Path("/run/udev/control").exists():
        return "systemd-udevd is not running (start /lib/systemd/systemd-udevd --daemon)"
    for fstype in fstypes:
        tool = TOOLS.get(fstype)
        if tool and shutil.which(tool) is None:
            return f"{tool} is not installed; run .ci/host-setup.sh"
    return None


class LoopDisks:
    """Call it to make loop disks for one test; all of them are removed afterwards."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.disks: list[LoopDisk] = []

    def __call__(self, *parts: Part, whole: bool = False) -> LoopDisk:
        problem = loop_problem([p.fstype for p in parts])
        require(problem is None, problem or "")
        image = self.directory / f"disk{len(self.disks)}.img"
        disk = build(image, parts, whole=whole)
        self.disks.append(disk)
        return disk

    def cleanup(self) -> None:
        errors = []
        for disk in reversed(self.disks):
            try:
                disk.detach()
            except RigError as error:
                errors.append(str(error))
            disk.image.unlink(missing_ok=True)
        self.disks.clear()
        if errors:
            raise RigError("loop disk cleanup failed: " + "; ".join(errors))


def make_loop_disks(tmp_path: Path) -> Iterator[LoopDisks]:
    """The body of a loop-disk fixture: ``yield from make_loop_disks(tmp_path)``."""
    problem = loop_problem()
    require(problem is None, problem or "")
    directory = tmp_path / "loopdisks"
    directory.mkdir()
    disks = LoopDisks(directory)
    try:
        yield disks
    finally:
        disks.cleanup()


@pytest.fixture
def loop_disks(tmp_path: Path) -> Iterator[LoopDisks]:
    """Call it with Part(...) specs; see LoopDisks. Needs root, udev and loop devices."""
    yield from make_loop_disks(tmp_path)
