"""A ``promote --target-dir`` that died midway: its half-made files, resolved.

Before a disk's copy into the target directory starts, the clone's boot record
names the new file (``BootRecord.moving``), and a promote holds the clone's lock
(``lock_key``) throughout. An entry found with nobody holding that lock belongs
to a promote that died (a crash, a kill, a power cut). Each is resolved so that
the clone is whole and the directory holds no stray file:

- a disk libvirt already switched over to the new file (it pivoted before the
  process died) is adopted: the definition and the record follow it, and the old
  overlay goes, as the promote would have done next;
- anything else (a mirror still running in QEMU, a partial qcow2 left by the
  copy or by ``qemu-img convert``) is abandoned: the job is aborted without a
  pivot, the new file is deleted, and the clone runs on its overlay as before.

The next ``promote`` starts that disk again from the beginning.
"""

from __future__ import annotations

import contextlib
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from guestsafe.engine import events
from guestsafe.engine.archive.in_use import BootRecord, abandoned_records, write_record
from guestsafe.engine.errors import GuestsafeError
from guestsafe.engine.events import Reporter
from guestsafe.engine.hypervisor.block_jobs import abort_job, source_of
from guestsafe.engine.hypervisor.connection import Hypervisor
from guestsafe.engine.hypervisor.domain_xml import SHUTOFF
from guestsafe.engine.paths import Paths

LOCK_PREFIX = "promote:"


def lock_key(clone: str) -> str:
    return LOCK_PREFIX + clone


def start_move(paths: Paths, record: BootRecord, target: str, dest: Path) -> BootRecord:
    """Say in the record, before the copy makes it, which file disk ``target`` goes to."""
    record = replace(record, moving={**record.moving, target: str(dest)})
    write_record(paths.state_dir, record)
    return record


def end_move(paths: Paths, record: BootRecord, target: str, *, adopted: bool) -> BootRecord:
    """Forget disk ``target``'s move: onto its new file (``adopted``), or given up."""
    moving = dict(record.moving)
    dest = moving.pop(target)
    overlays = {**record.overlays, target: dest} if adopted else record.overlays
    record = replace(record, overlays=overlays, moving=moving)
    write_record(paths.state_dir, record)
    return record


def abandon(hv: Hypervisor, record: BootRecord, target: str) -> list[str]:
    """Stop a copy of disk ``target`` the guest does not run on, and delete its file."""
    dest = record.moving[target]
    done = []
    if abort_job(hv, record.clone, target):
        done.append(f"{record.clone} {target}: stopped the unfinished copy into {dest}")
    with contextlib.suppress(FileNotFoundError):
        Path(dest).unlink()
        done.append(f"removed the partial copy {dest}")
    return done


def runs_on(hv: Hypervisor, clone: str, target: str, dest: str) -> bool:
    """Whether the clone's disk ``target`` is ``dest`` now, live or in its definition."""
    if not hv.exists(clone):
        return False
    xmls = [hv.xml(clone)]
    if hv.state(clone) != SHUTOFF:
        xmls.append(hv.xml(clone, inactive=False))
    return any(source_of(xml, target) == dest for xml in xmls)


def resolve_moves(record: BootRecord, hv: Hypervisor, paths: Paths) -> tuple[BootRecord, list[str]]:
    """Adopt or abandon each move the record names; the record after, and what was done."""
    done: list[str] = []
    for target, dest in list(record.moving.items()):
        if runs_on(hv, record.clone, target, dest):
            old = Path(record.overlays[target])
            point_config_at(hv, record.clone, target, Path(dest))
            record = end_move(paths, record, target, adopted=True)
            if str(old) != dest:
                old.unlink(missing_ok=True)
            done.append(f"{record.clone} {target}: kept the finished copy {dest}")
        else:
            done += abandon(hv, record, target)
            record = end_move(paths, record, target, adopted=False)
    return record, done


def recover_promotes(
    paths: Paths,
    hv: Callable[[], Hypervisor],
    reporter: Reporter = events.null_reporter,
) -> list[str]:
    """Resolve the moves of promotes that died; what was done, in words."""
    done: list[str] = []
    dead = abandoned_records(
        paths.state_dir, lambda r: bool(r.moving), lock_key, "finishing the promote of"
    )
    for record in dead:
        try:
            _, lines = resolve_moves(record, hv(), paths)
        except (GuestsafeError, OSError) as exc:
            events.warn(reporter, f"interrupted promote of {record.clone}: {exc}")
            continue
        for line in lines:
            events.info(reporter, f"recovery of a promote: {line}", record.clone)
        done += lines
    return done


def point_config_at(hv: Hypervisor, name: str, target: str, dest: Path) -> None:
    """The persistent XML's disk ``target`` on ``dest``, a file with no backing chain."""
    root = ET.fromstring(hv.xml(name))
    for disk in root.findall("./devices/disk"):
        dev = disk.find("target")
        if dev is None or dev.get("dev") != target:
            continue
        source = disk.find("source")
        if source is None:
            source = ET.SubElement(disk, "source")
        source.set("file", str(dest))
        for store in disk.findall("backingStore"):
            disk.remove(store)
        disk.insert(list(disk).index(source) + 1, ET.Element("backingStore"))
    hv.define(ET.tostring(root, encoding="unicode"))
