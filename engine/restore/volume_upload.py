"""Restore a version as a new guest on a remote host: its disks uploaded into pool volumes.

guestsafe cannot write files on another host, so each disk becomes a new volume
of a storage pool there (the pool that held the original disk, or
``--target-pool``), filled with ``virStorageVolUpload`` (sparse: holes are sent
as holes). What was sent is hashed on the way and must match the manifest
before the guest is defined; the clone's disks then point at the volumes' paths.
A failure deletes the volumes made so far and defines nothing.
"""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from xml.sax.saxutils import escape

import libvirt

from guestsafe.engine import events, locks
from guestsafe.engine.archive.manifest import DiskRecord
from guestsafe.engine.errors import CopyError, RestoreError
from guestsafe.engine.events import PhaseChanged, Progress, Reporter
from guestsafe.engine.hypervisor.connection import Hypervisor
from guestsafe.engine.hypervisor.volume_streams import upload_volume
from guestsafe.engine.paths import Paths
from guestsafe.engine.restore.clone import (
    MACS_LOCK,
    MACS_LOCK_WAIT,
    recheck_macs,
    warning_census,
)
from guestsafe.engine.restore.clone_xml import build_clone_xml
from guestsafe.engine.restore.files import check_verified
from guestsafe.engine.restore.plan import (
    NEW,
    MacsInUse,
    RestorePlan,
    RestoreResult,
    accept_damage,
    check_plain_files,
    choose_macs,
)


def restore_clone_remote(
    plan: RestorePlan,
    hv: Hypervisor,
    paths: Paths,
    *,
    target_pool: str | None = None,
    mac_policy: str = NEW,
    mac_choices: Mapping[int, str] | None = None,
    start: bool = False,
    force: bool = False,
    reporter: Reporter = events.null_reporter,
    cancel: threading.Event | None = None,
    macs_in_use: MacsInUse | None = None,
) -> RestoreResult:
    """Upload the version's disks into volumes on ``hv``'s host and define the clone there.

    ``macs_in_use`` reads the MACs of every known host just before the clone is
    defined (default: ``hv``'s alone): a clone there clashes with any host's guest.
    """
    _refuse_unsupported(plan)
    macs = choose_macs(plan, mac_policy, mac_choices)
    new_uuid = str(uuid.uuid4())
    name = plan.new_name
    warnings = check_verified(plan.version, force, reporter, name)
    check_plain_files(plan.version)
    accept_damage(plan.xml_problem, force, reporter, name, warnings)
    source = plan.version
    purpose = f"restore of {source.guest} version {source.number} to {name} on {hv.uri}"
    conn = hv.connection
    made: list[libvirt.virStorageVol] = []
    with locks.acquire(paths.state_dir, f"guest:{source.manifest.uuid}", purpose):
        try:
            reporter(PhaseChanged(name, "copy"))
            new_disks = []
            for rec, planned in plan.disks:
                pool = _pool_for(conn, rec, target_pool)
                vol = _create_volume(pool, planned.name, plan.version.path / rec.file)
                made.append(vol)
                _upload(conn, vol, plan, rec, reporter, name, cancel)
                new_disks.append((rec, Path(str(vol.path()))))
            reporter(PhaseChanged(name, "define"))
            with locks.acquire(paths.state_dir, MACS_LOCK, purpose, wait=MACS_LOCK_WAIT):
                if hv.exists(name):
                    raise RestoreError(
                        f"a guest named {name!r} was defined meanwhile on {hv.uri}; nothing defined"
                    )
                census = warning_census(macs_in_use or hv.mac_owners, reporter, name, warnings)
                macs = recheck_macs(plan, macs, census())
                clone = build_clone_xml(replace(plan, disks=new_disks), new_uuid, macs)
                hv.define(clone.xml)
        except BaseException:
            for vol in made:
                with contextlib.suppress(libvirt.libvirtError):
                    vol.delete(0)
            raise
    events.info(
        reporter,
        f"defined {name} on {hv.uri} from {plan.version.guest} version {plan.version.number}",
    )
    if start:
        reporter(PhaseChanged(name, "start"))
        hv.start(name)
    reporter(events.RunEnded(events.RunKind.RESTORE, True, "restore successful", name))
    return RestoreResult(
        name, new_uuid, macs, [p for _, p in new_disks], start, warnings, clone.notes
    )


def _refuse_unsupported(plan: RestorePlan) -> None:
    manifest = plan.version.manifest
    problems = []
    if plan.device_targets:
        problems.append("--disk-target writes onto local devices")
    if manifest.nvram is not None:
        problems.append("the version holds UEFI variables (NVRAM), which live outside pools")
    if manifest.tpm is not None:
        problems.append("the version holds TPM state, which lives outside pools")
    if any(rec.chain for rec, _ in plan.disks):
        problems.append("a disk was kept with its backing chain (chain = keep)")
    if problems:
        raise RestoreError(
            f"cannot restore {plan.version.guest} version {plan.version.number} onto a remote "
            f"host: {'; '.join(problems)}; restore it on the local host instead"
        )


def _pool_for(
    conn: libvirt.virConnect, rec: DiskRecord, target_pool: str | None
) -> libvirt.virStoragePool:
    """The named pool, or the one that held the original disk, running."""
    name = target_pool or rec.pool or _pool_of_path(conn, rec.source)
    if name is None:
        raise RestoreError(
            f"disk {rec.target} came from {rec.source}, which no storage pool on "
            f"{conn.getURI()} holds now; name one with --target-pool"
        )
    try:
        pool = conn.storagePoolLookupByName(name)
    except libvirt.libvirtError as exc:
        raise RestoreError(f"no storage pool {name!r} on {conn.getURI()}: {exc}") from exc
    if not pool.isActive():
        raise RestoreError(f"storage pool {name!r} is not running: 'virsh pool-start {name}'")
    return pool


def _pool_of_path(conn: libvirt.virConnect, path: str) -> str | None:
    with contextlib.suppress(libvirt.libvirtError):
        return str(conn.storageVolLookupByPath(path).storagePoolLookupByVolume().name())
    folder = os.path.dirname(path).rstrip("/")
    for pool in conn.listAllStoragePools(0):
        target = ET.fromstring(pool.XMLDesc(0)).findtext("./target/path") or ""
        if target.strip().rstrip("/") == folder:
            return str(pool.name())
    return None


def _create_volume(pool: libvirt.virStoragePool, name: str, src: Path) -> libvirt.virStorageVol:
    """A new empty volume the size of the archived file (raw: the file's bytes go in as is)."""
    size = src.stat().st_size
    xml = (
        f"<volume><name>{escape(name)}</name><capacity unit='bytes'>{size}</capacity>"
        "<allocation unit='bytes'>0</allocation><target><format type='raw'/>"
        "<permissions><mode>0600</mode></permissions></target></volume>"
    )
    try:
        return pool.createXML(xml, 0)
    except libvirt.libvirtError as exc:
        raise RestoreError(
            f"cannot create volume {name!r} in storage pool {pool.name()!r}: "
            f"{exc.get_error_message() or exc}"
        ) from exc


def _upload(
    conn: libvirt.virConnect,
    vol: libvirt.virStorageVol,
    plan: RestorePlan,
    rec: DiskRecord,
    reporter: Reporter,
    who: str,
    cancel: threading.Event | None,
) -> None:
    src = plan.version.path / rec.file
    events.info(reporter, f"uploading {rec.target} into volume {vol.path()}", who)

    def progress(done: int, total: int) -> None:
        reporter(Progress(who, rec.target, done, total))

    sent = upload_volume(conn, vol, src, progress=progress, cancel=cancel)
    if sent != rec.blake3:
        raise CopyError(
            f"{rec.file} of {plan.version.guest} version {plan.version.number} hashed "
            f"{sent[:12]}.. on its way to {conn.getURI()}, the manifest says "
            f"{rec.blake3[:12]}..; nothing defined (guestsafe verify checks the archive)"
        )
