"""What a backup does with each disk of a guest on a remote host (``guestsafe guests``).

The local plan (``disk_plan.py``) asks the local filesystem about each disk;
on a remote host those paths are another machine's, so the plan asks libvirt's
storage pools there instead, with the same refusals preflight makes.
"""

from __future__ import annotations

from collections.abc import Callable

import libvirt

from guestsafe.engine.backup.disk_plan import COPY, RECORD, REFUSE, SKIP, DiskPlan
from guestsafe.engine.errors import PreflightError
from guestsafe.engine.hypervisor.domain_xml import DiskInfo, GuestInfo
from guestsafe.engine.hypervisor.remote_disks import (
    check_remote_extras,
    check_remote_mode,
    volume_of,
)
from guestsafe.engine.modes import Mode


def plan_remote_disks(
    conn: libvirt.virConnect, info: GuestInfo, mode: Mode, include_readonly: bool
) -> list[DiskPlan]:
    """Per disk of a remote guest: streamed from its pool volume, recorded, or why not."""
    uri = str(conn.getURI())
    refusal = _refusal(lambda: check_remote_mode(info, mode, uri))
    plans = [_plan_disk(conn, info, disk, include_readonly, refusal) for disk in info.disks]
    extras = _refusal(lambda: check_remote_extras(info, uri))
    if info.nvram:
        plans.append(DiskPlan("nvram", info.nvram, REFUSE, "refused", extras))
    if info.emulated_tpm is not None:
        plans.append(DiskPlan("tpm", "swtpm", REFUSE, "refused", extras))
    return plans


def _plan_disk(
    conn: libvirt.virConnect,
    info: GuestInfo,
    disk: DiskInfo,
    include_readonly: bool,
    refusal: str | None,
) -> DiskPlan:
    if disk.source is None:
        return DiskPlan(disk.target, None, SKIP, "nothing to copy", f"{disk.device}, no medium")
    if not disk.copied(include_readonly):
        reason = "recorded in the manifest, not copied (include_readonly = true copies it)"
        return DiskPlan(disk.target, disk.source, RECORD, "record only", reason)
    if refusal is not None:
        return DiskPlan(disk.target, disk.source, REFUSE, "refused", refusal)
    try:
        remote = volume_of(conn, info, disk)
    except PreflightError as exc:
        return DiskPlan(disk.target, disk.source, REFUSE, "refused", exc.message)
    how = f"stream volume {remote.pool}/{remote.volume} ({disk.format or 'raw'})"
    return DiskPlan(disk.target, disk.source, COPY, how)


def _refusal(check: Callable[[], None]) -> str | None:
    try:
        check()
    except PreflightError as exc:
        return exc.message
    return None
