"""Instant boot: run a version at once as a clone on overlays backed by the version.

``boot_clone`` gives each disk of the clone a new, empty qcow2 overlay whose backing
file is the version's own file (``qemu-img create -b FILE -F FMT``): the clone runs
within seconds whatever the disk size, and everything it writes goes into its
overlays. The version is never written: QEMU opens backing files read-only, libvirt
is told not to relabel them (``<seclabel model='dac' relabel='no'/>`` on each
backing source, so their owner stays root's), and QEMU's uid gets read access
through ACL entries instead. Everything else a clone gets (name, UUID, MACs, log
and socket paths) is what a restore gives it: ``plan_restore``, ``build_clone_xml``
and the MAC lock and recheck of ``clone.py``. NVRAM is small and written by the
firmware, so it is copied.

A record per clone (``archive/in_use.py``) keeps the version out of retention's
reach, and is the proof ``discard_clone`` asks for before it removes a guest.
``promote_clone`` (``promote.py``) cuts the tie to the archive.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from guestsafe.engine import events, locks
from guestsafe.engine.archive.in_use import (
    BootRecord,
    all_records,
    read_record,
    remove_record,
    write_record,
)
from guestsafe.engine.archive.names import printable
from guestsafe.engine.archive.versions import VersionInfo
from guestsafe.engine.errors import GuestsafeError, HypervisorError, RestoreError
from guestsafe.engine.events import PhaseChanged, Reporter
from guestsafe.engine.hypervisor.connection import Hypervisor
from guestsafe.engine.hypervisor.qemu_access import grant_read, qemu_uid, revoke_read
from guestsafe.engine.hypervisor.remote_disks import require_local_disks
from guestsafe.engine.paths import Paths
from guestsafe.engine.restore.clone import (
    MACS_LOCK,
    MACS_LOCK_WAIT,
    recheck_macs,
    warning_census,
)
from guestsafe.engine.restore.clone_xml import build_clone_xml
from guestsafe.engine.restore.files import check_verified, restore_file
from guestsafe.engine.restore.plan import (
    NEW,
    MacsInUse,
    RestorePlan,
    RestoreResult,
    accept_damage,
    check_plain_files,
    choose_macs,
)

OVERLAY_FORMAT = "qcow2"


@dataclass(frozen=True)
class ChainLink:
    """One file of a version disk's chain, as QEMU will open it (read-only)."""

    path: Path
    format: str
    virtual_size: int


def boot_clone(
    plan: RestorePlan,
    hv: Hypervisor,
    paths: Paths,
    *,
    mac_policy: str = NEW,
    mac_choices: Mapping[int, str] | None = None,
    force: bool = False,
    reporter: Reporter = events.null_reporter,
    cancel: threading.Event | None = None,
    xml_filter: Callable[[str], str] | None = None,
    restore_test: bool = False,
    macs_in_use: MacsInUse | None = None,
) -> RestoreResult:
    """Define and start the clone ``plan`` names, on overlays over the version's files.

    ``xml_filter`` changes the clone's XML last, before it is defined (a restore
    test cuts its network); ``restore_test`` marks the record as such a clone's.
    """
    name, version = plan.new_name, plan.version
    require_local_disks(hv, name, "booting it on overlays over this machine's archive")
    if plan.device_targets:
        raise RestoreError(
            "boot puts every disk on an overlay file; --disk-target goes with a restore"
        )
    macs = choose_macs(plan, mac_policy, mac_choices)
    warnings = check_verified(version, force, reporter, name)
    check_plain_files(version)
    accept_damage(plan.xml_problem, force, reporter, name, warnings)
    chains = {rec.target: version_chain(version, rec.file) for rec, _ in plan.disks}
    new_uuid = str(uuid.uuid4())
    record = BootRecord(
        clone=name,
        clone_uuid=new_uuid,
        guest=version.guest,
        number=version.number,
        archive=str(version.path.parent.parent.resolve()),
        version_path=str(version.path.resolve()),
        overlays={rec.target: str(dst) for rec, dst in plan.disks},
        nvram=str(plan.nvram[1]) if plan.nvram else None,
        restore_test=restore_test,
    )
    purpose = f"instant boot of {version.guest} version {version.number} as {name}"
    # The source guest's lock: retention must not delete the version before the
    # record that protects it is written.
    with locks.acquire(paths.state_dir, f"guest:{version.manifest.uuid}", purpose):
        if read_record(paths.state_dir, name) is not None:
            raise RestoreError(
                f"a clone named {name!r} was booted before and is not discarded; "
                f"run guestsafe boot --discard {name} first"
            )
        write_record(paths.state_dir, record)  # first: whatever follows can be undone
        try:
            macs_now = warning_census(macs_in_use or hv.mac_owners, reporter, name, warnings)
            record, notes = _build(
                plan,
                record,
                chains,
                macs,
                hv,
                macs_now,
                paths,
                force,
                reporter,
                cancel,
                xml_filter,
            )
        except BaseException:
            # The record as last written: it names the ACL entries granted meanwhile.
            written = read_record(paths.state_dir, name) or record
            _undo(written, hv, paths, defined=hv.exists(name) and _is_ours(hv, written))
            raise
    events.info(reporter, f"booted {name} from {version.guest} version {version.number} (overlays)")
    reporter(events.RunEnded(events.RunKind.RESTORE, True, "instant boot successful", name))
    disks = [Path(p) for p in record.overlays.values()]
    return RestoreResult(name, new_uuid, record_macs(hv, name), disks, True, warnings, notes)


def _build(
    plan: RestorePlan,
    record: BootRecord,
    chains: dict[str, list[ChainLink]],
    macs: list[str],
    hv: Hypervisor,
    macs_in_use: MacsInUse,
    paths: Paths,
    force: bool,
    reporter: Reporter,
    cancel: threading.Event | None,
    xml_filter: Callable[[str], str] | None = None,
) -> tuple[BootRecord, list[str]]:
    """Overlays, NVRAM, QEMU's access, define and start; the record and the XML's notes."""
    name = plan.new_name
    reporter(PhaseChanged(name, "overlays"))
    for rec, dst in plan.disks:
        create_overlay(chains[rec.target][0], dst)
        events.info(reporter, f"{rec.target}: overlay {dst} on {chains[rec.target][0].path}", name)
    if plan.nvram is not None:
        rec, dst = plan.nvram
        restore_file(plan.version, rec, dst, force, reporter, name, cancel, [])
    uid = qemu_uid(hv, name)
    backing = [link.path for chain in chains.values() for link in chain]
    record = replace(record, qemu_uid=uid, qemu_acl=[str(p) for p in grant_read(uid, backing)])
    write_record(paths.state_dir, record)
    reporter(PhaseChanged(name, "define"))
    with locks.acquire(paths.state_dir, MACS_LOCK, f"instant boot to {name}", wait=MACS_LOCK_WAIT):
        if hv.exists(name):
            raise RestoreError(f"a guest named {name!r} was defined meanwhile; nothing defined")
        macs = recheck_macs(plan, macs, macs_in_use())
        clone = build_clone_xml(plan, record.clone_uuid, macs)
        xml = overlay_xml(clone.xml, chains)
        hv.define(xml_filter(xml) if xml_filter is not None else xml)
    reporter(PhaseChanged(name, "start"))
    hv.start(name)
    return record, clone.notes


def record_macs(hv: Hypervisor, name: str) -> list[str]:
    root = ET.fromstring(hv.xml(name))
    return [m.get("address", "") for m in root.findall("./devices/interface/mac")]


def version_chain(version: VersionInfo, file: str) -> list[ChainLink]:
    """The version file ``file`` and the files beneath it (a kept chain), top down.

    Every file must lie in the version's own folder: a backing name in a header
    pointing elsewhere would give the clone a file that is not the version's.
    """
    path = version.path / file
    raw = _qemu_img_json(["info", "--backing-chain", "--output=json", "-U", str(path)])
    info: list[dict[str, Any]] = raw if isinstance(raw, list) else [raw]
    links = []
    folder = version.path.resolve()
    for image in info:
        image_path = Path(str(image["filename"]))
        if not image_path.is_absolute():
            image_path = version.path / image_path
        if image_path.resolve().parent != folder:
            raise RestoreError(
                f"{file} of version {version.number} of {printable(version.guest)} has the "
                f"backing file {printable(str(image_path))} outside its folder; refused "
                "(check it with guestsafe verify)"
            )
        fmt = str(image["format"])
        if fmt not in ("qcow2", "raw"):
            raise RestoreError(f"{image_path} is {fmt}; boot needs qcow2 or raw files")
        links.append(ChainLink(image_path.resolve(), fmt, int(image["virtual-size"])))
    return links


def create_overlay(base: ChainLink, overlay: Path) -> None:
    """A new qcow2 ``overlay`` backed by ``base``; ``-u``: the base is not even opened."""
    if overlay.exists():
        raise RestoreError(f"{overlay} exists; boot never overwrites a file")
    overlay.parent.mkdir(parents=True, exist_ok=True)
    argv = ["qemu-img", "create", "-q", "-f", OVERLAY_FORMAT, "-u"]
    argv += ["-b", str(base.path), "-F", base.format, str(overlay), str(base.virtual_size)]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RestoreError(f"cannot create overlay {overlay}: {proc.stderr.strip()}")


def overlay_xml(xml: str, chains: Mapping[str, list[ChainLink]]) -> str:
    """The clone's XML with each disk a qcow2 overlay on its read-only backing chain."""
    root = ET.fromstring(xml)
    for disk in root.findall("./devices/disk"):
        target = disk.find("target")
        dev = target.get("dev") if target is not None else None
        if dev is None or dev not in chains:
            continue
        driver = disk.find("driver")
        if driver is None:
            driver = ET.SubElement(disk, "driver", {"name": "qemu"})
        driver.set("type", OVERLAY_FORMAT)
        for store in disk.findall("backingStore"):
            disk.remove(store)
        parent = disk
        for link in chains[dev]:
            store = ET.Element("backingStore", {"type": "file"})
            ET.SubElement(store, "format", {"type": link.format})
            source = ET.SubElement(store, "source", {"file": str(link.path)})
            # The archive's files keep their owner: QEMU reads them through an ACL entry.
            ET.SubElement(source, "seclabel", {"model": "dac", "relabel": "no"})
            _insert_after_source(parent, store)
            parent = store
        ET.SubElement(parent, "backingStore")  # the end of the chain: nothing to probe
    return ET.tostring(root, encoding="unicode")


def _insert_after_source(parent: ET.Element, store: ET.Element) -> None:
    children = list(parent)
    source = parent.find("source")
    parent.insert(children.index(source) + 1 if source is not None else len(children), store)


def discard_clone(
    name: str, hv: Hypervisor, paths: Paths, reporter: Reporter = events.null_reporter
) -> list[str]:
    """Remove a clone ``boot_clone`` made: the guest, its overlays, NVRAM and record.

    Refused for any guest without a record, or whose UUID is not the record's:
    guestsafe never undefines a guest it did not boot. What was removed, in words.
    """
    record = read_record(paths.state_dir, name)
    if record is None:
        raise RestoreError(
            f"{printable(name)} is not an instant-boot clone guestsafe made (no record of it); "
            "nothing was changed (remove other guests with virsh)"
        )
    if hv.exists(name) and not _is_ours(hv, record):
        raise RestoreError(
            f"guest {printable(name)} is not the clone guestsafe booted (its UUID differs "
            "from the record's); nothing was changed"
        )
    done = _undo(record, hv, paths, defined=hv.exists(name))
    for line in done:
        events.info(reporter, line, name)
    return done


def _is_ours(hv: Hypervisor, record: BootRecord) -> bool:
    try:
        uuid_text = ET.fromstring(hv.xml(record.clone)).findtext("uuid")
    except GuestsafeError:
        return False
    return uuid_text == record.clone_uuid


def _undo(record: BootRecord, hv: Hypervisor, paths: Paths, *, defined: bool) -> list[str]:
    done = []
    if defined:
        hv.destroy(record.clone)
        hv.undefine(record.clone)  # with its NVRAM file
        done.append(f"removed guest {record.clone}")
    owned = [*record.overlays.values(), *record.moving.values()]
    for path in [*owned, *([record.nvram] if record.nvram else [])]:
        with contextlib.suppress(FileNotFoundError):
            Path(path).unlink()
            done.append(f"removed {path}")
    release_access(record, paths)
    remove_record(paths.state_dir, record.clone)
    return done


def release_access(record: BootRecord, paths: Paths) -> None:
    """Take back QEMU's read access, except where another booted clone still needs it."""
    others = {
        p for r in all_records(paths.state_dir) if r.clone != record.clone for p in r.qemu_acl
    }
    revoke_read(record.qemu_uid, [Path(p) for p in record.qemu_acl if p not in others])


def _qemu_img_json(args: list[str]) -> Any:
    proc = subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise HypervisorError(f"qemu-img {args[0]} failed: {proc.stderr.strip()}")
    return json.loads(proc.stdout)
