"""Facts about a guest's disks that a cold copy would tear or miss, asked before it stops.

Each answers one question about one disk or guest and reads only what it must:
``qemu-img info`` for a qcow2's external data file (a copy of the qcow2 alone
would hold its metadata without its data), the hypervisor for the other guests
using a shareable disk and for a saved memory image. The plan
(``backup/disk_plan.py``) turns the answers into refusals.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from guestsafe.engine.errors import HypervisorError
from guestsafe.engine.hypervisor.domain_xml import RUNNING, DiskInfo, GuestInfo

QEMU_IMG_TIMEOUT = 60.0


def qemu_img_info(path: Path, fmt: str | None) -> dict[str, Any]:
    """``qemu-img info --output=json`` of ``path`` read as ``fmt`` (-U: it may be in use)."""
    argv = ["qemu-img", "info", "--output=json", "-U"]
    if fmt:
        argv += ["-f", fmt]
    try:
        done = subprocess.run(
            [*argv, str(path)], capture_output=True, text=True, timeout=QEMU_IMG_TIMEOUT
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HypervisorError(f"cannot run qemu-img info on {path}: {exc}") from exc
    if done.returncode != 0:
        raise HypervisorError(f"qemu-img info {path}: {done.stderr.strip() or 'failed'}")
    data = json.loads(done.stdout)
    if not isinstance(data, dict):
        raise HypervisorError(f"qemu-img info {path}: unexpected output")
    return data


def qcow2_data_file(disk: DiskInfo) -> str | None:
    """The external data file a qcow2 disk keeps its guest data in, if any."""
    if disk.format != "qcow2" or disk.kind != "file" or not disk.source:
        return None
    if not Path(disk.source).is_file():
        return None  # missing: check_backup_disks says so
    if shutil.which("qemu-img") is None:
        # Only the demo sandbox runs without qemu-utils (a host-setup package);
        # its images are guestsafe's own and never have a data file.
        return None
    info = qemu_img_info(Path(disk.source), "qcow2")
    data = info.get("format-specific", {}).get("data", {})
    found = data.get("data-file") if isinstance(data, dict) else None
    return str(found) if found else None


def image_format(path: Path) -> str | None:
    """The format qemu-img finds in a file (for the record; never for copying)."""
    try:
        found = qemu_img_info(path, None).get("format")
    except (HypervisorError, ValueError):
        return None
    return str(found) if found else None


def running_sharers(
    info: GuestInfo, users: Mapping[str, set[str]], states: Mapping[str, str]
) -> dict[str, list[str]]:
    """Per shareable disk of ``info``: the other guests using it that are running now."""
    found: dict[str, list[str]] = {}
    for disk in info.disks:
        if not disk.shareable or not disk.source:
            continue
        others = sorted(
            g for g in users.get(disk.source, set()) if g != info.name and states.get(g) == RUNNING
        )
        if others:
            found[disk.target] = others
    return found
