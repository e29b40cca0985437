"""Disk images of test guests: create them, and read what the guest wrote, offline."""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .errors import RigError

MiB = 1024 * 1024
SECTOR = 512
DiskFormat = Literal["raw", "qcow2"]
_COUNTER_LINE = re.compile(r"GSCOUNTER (\d+)")


@dataclass(frozen=True)
class DiskSpec:
    """One virtio disk of a test guest: target ("vda"), format and virtual size in bytes."""

    target: str
    fmt: DiskFormat = "qcow2"
    size: int = 64 * MiB


def create_disk(path: Path, fmt: DiskFormat, size: int, first_line: str | None = None) -> None:
    """Create an empty image; with first_line, the image starts with that line."""
    if first_line is None:
        _qemu_img("create", "-q", "-f", fmt, str(path), str(size))
        return
    if "\n" in first_line or len(first_line.encode()) >= SECTOR:
        raise ValueError("first_line must be one line shorter than a sector")
    # Write the line into a raw image, then convert: qemu-img cannot write data itself.
    raw = path if fmt == "raw" else path.with_name(path.name + ".raw-tmp")
    with raw.open("wb") as handle:
        handle.write(first_line.encode() + b"\n")
        handle.truncate(size)
    if fmt != "raw":
        try:
            _qemu_img("convert", "-q", "-f", "raw", "-O", fmt, str(raw), str(path))
        finally:
            raw.unlink()


def disk_format(path: Path, *, force_share: bool = False) -> DiskFormat:
    """The image format qemu-img detects."""
    args = ["info", "--output=json", *(["-U"] if force_share else []), str(path)]
    fmt = json.loads(_qemu_img(*args))["format"]
    if fmt not in ("raw", "qcow2"):
        raise RigError(f"{path}: unexpected image format {fmt}")
    return fmt  # type: ignore[no-any-return]


def read_first_line(path: Path, fmt: DiskFormat | None = None, *, force_share: bool = False) -> str:
    """First line of the image's first sector, NUL padding removed.

    force_share reads an image another process holds locked. Only do that when
    nothing writes to it, or the answer may be torn.
    """
    fmt = fmt or disk_format(path, force_share=force_share)
    sector = _first_sector(path, fmt, force_share)
    return sector.replace(b"\0", b"").split(b"\n", 1)[0].decode(errors="replace")


def read_disk_counter(
    path: Path, fmt: DiskFormat | None = None, *, force_share: bool = False
) -> int:
    """The GSCOUNTER value an image holds; 0 when it holds none (as the guest counts)."""
    match = _COUNTER_LINE.fullmatch(read_first_line(path, fmt, force_share=force_share))
    return int(match.group(1)) if match else 0


def _first_sector(path: Path, fmt: DiskFormat, force_share: bool) -> bytes:
    if fmt == "raw":
        with path.open("rb") as handle:
            return handle.read(SECTOR)
    with tempfile.TemporaryDirectory(prefix="gs-rig-read-") as scratch:
        out = Path(scratch) / "sector.raw"
        _qemu_img(
            "dd",
            *(["-U"] if force_share else []),
            "-f",
            fmt,
            "-O",
            "raw",
            f"bs={SECTOR}",
            "count=1",
            f"if={path}",
            f"of={out}",
        )
        return out.read_bytes()[:SECTOR]


def _qemu_img(*args: str) -> str:
    result = subprocess.run(["qemu-img", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RigError(f"qemu-img {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout
