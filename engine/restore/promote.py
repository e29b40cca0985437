"""Promote an instant-boot clone: move it onto its own storage while it runs.

Each overlay already lives where a restored disk would, so promoting is a libvirt
block pull per disk (``hypervisor/block_jobs.py``): QEMU copies into the overlay
every block it still reads from the version, drops the backing file from the
overlay's header, and libvirt drops it from the live and the persistent XML. Then
the record goes, and with it the version's protection from retention: the clone
is an ordinary guest. A clone that is shut off is flattened by ``qemu-img rebase``
instead, which does the same with nothing running.

With ``target_dir`` the disks move as well: a block copy per disk, flattened into
a new file there, and a pivot onto it (``qemu-img convert`` for a clone shut off);
then the old overlay goes. The directory is checked first (``promote_target.py``).
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

from guestsafe.engine import events, failpoints, locks
from guestsafe.engine.archive.in_use import BootRecord, read_record, remove_record
from guestsafe.engine.archive.names import printable
from guestsafe.engine.errors import GuestsafeError, HypervisorError, LockBusy, RestoreError
from guestsafe.engine.events import PhaseChanged, Progress, Reporter
from guestsafe.engine.hypervisor.block_jobs import backing_files, copy_to, pull_backing
from guestsafe.engine.hypervisor.connection import Hypervisor
from guestsafe.engine.hypervisor.domain_xml import RUNNING, SHUTOFF
from guestsafe.engine.paths import Paths
from guestsafe.engine.restore.instant_boot import release_access
from guestsafe.engine.restore.promote_moves import (
    end_move,
    lock_key,
    point_config_at,
    resolve_moves,
    start_move,
)
from guestsafe.engine.restore.promote_target import check_target_dir


def promote_clone(
    name: str,
    hv: Hypervisor,
    paths: Paths,
    *,
    reporter: Reporter = events.null_reporter,
    cancel: threading.Event | None = None,
    target_dir: Path | None = None,
) -> list[str]:
    """Make clone ``name`` independent of the archive; the disks it flattened.

    ``target_dir``: move the disks into that directory meanwhile.
    """
    purpose = f"promoting {name}"
    try:
        lock = locks.acquire(paths.state_dir, lock_key(name), purpose)
    except LockBusy as exc:
        raise RestoreError(f"{printable(name)} is being promoted already ({exc.message})") from exc
    with lock:
        return _promote(name, hv, paths, reporter, cancel, target_dir)


def _promote(
    name: str,
    hv: Hypervisor,
    paths: Paths,
    reporter: Reporter,
    cancel: threading.Event | None,
    target_dir: Path | None,
) -> list[str]:
    record = _own_record(name, hv, paths)
    if record.moving:  # an earlier promote died midway: settle its files first
        record, lines = resolve_moves(record, hv, paths)
        for line in lines:
            events.info(reporter, line, name)
    state = hv.state(name)
    if state not in (RUNNING, SHUTOFF):
        raise RestoreError(f"clone {printable(name)} is {state}; promote it running or shut off")
    reporter(PhaseChanged(name, "promote"))
    if target_dir is not None:
        moves = check_target_dir(target_dir, record, hv.xml(name))
        _move(record, moves, state == RUNNING, hv, paths, reporter, cancel)
        record = read_record(paths.state_dir, name) or record
    else:
        _flatten_in_place(record, state == RUNNING, hv, reporter, cancel)
    _drop_backing_from_config(hv, name, list(record.overlays))
    release_access(record, paths)
    remove_record(paths.state_dir, name)
    events.info(
        reporter,
        f"promoted {name}: its disks no longer read {record.guest} version {record.number}",
        name,
    )
    reporter(events.RunEnded(events.RunKind.RESTORE, True, "promote successful", name))
    return list(record.overlays)


def _flatten_in_place(
    record: BootRecord,
    running: bool,
    hv: Hypervisor,
    reporter: Reporter,
    cancel: threading.Event | None,
) -> None:
    name = record.clone
    for target, overlay in record.overlays.items():
        events.info(
            reporter, f"{target}: copying what {overlay} still reads from the archive", name
        )
        if running:

            def progress(done: int, total: int, target: str = target) -> None:
                reporter(Progress(name, target, done, total))

            pull_backing(hv, name, target, progress, cancel)
        else:
            _rebase_offline(Path(overlay))


def _move(
    record: BootRecord,
    moves: dict[str, Path],
    running: bool,
    hv: Hypervisor,
    paths: Paths,
    reporter: Reporter,
    cancel: threading.Event | None,
) -> None:
    """Each disk into its new file, flattened; the definition and the record follow each."""
    name = record.clone
    for target, dest in moves.items():
        old = Path(record.overlays[target])
        events.info(reporter, f"{target}: copying {old} and what it reads into {dest}", name)
        record = start_move(paths, record, target, dest)
        try:
            _copy_one(hv, name, target, old, dest, running, reporter, cancel)
        except BaseException:
            # Settled now if it can be; else the record still names the file for recover.
            with contextlib.suppress(GuestsafeError, OSError):
                resolve_moves(record, hv, paths)
            raise
        point_config_at(hv, name, target, dest)
        record = end_move(paths, record, target, adopted=True)
        old.unlink(missing_ok=True)


def _copy_one(
    hv: Hypervisor,
    name: str,
    target: str,
    old: Path,
    dest: Path,
    running: bool,
    reporter: Reporter,
    cancel: threading.Event | None,
) -> None:
    if running:

        def progress(done: int, total: int) -> None:
            reporter(Progress(name, target, done, total))

        copy_to(hv, name, target, dest, progress, cancel)
    else:
        _convert_offline(old, dest)


def _convert_offline(overlay: Path, dest: Path) -> None:
    argv = ["qemu-img", "convert", "-q", "-f", "qcow2", "-O", "qcow2", str(overlay), str(dest)]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        dest.unlink(missing_ok=True)
        raise HypervisorError(f"cannot copy {overlay} to {dest}: {proc.stderr.strip()}")
    failpoints.hit("promote.converted")


def _own_record(name: str, hv: Hypervisor, paths: Paths) -> BootRecord:
    record = read_record(paths.state_dir, name)
    if record is None:
        raise RestoreError(
            f"{printable(name)} is not an instant-boot clone guestsafe made (no record of it); "
            "nothing to promote"
        )
    uuid_text = ET.fromstring(hv.xml(name)).findtext("uuid")
    if uuid_text != record.clone_uuid:
        raise RestoreError(
            f"guest {printable(name)} is not the clone guestsafe booted (its UUID differs "
            "from the record's); nothing was changed"
        )
    return record


def _rebase_offline(overlay: Path) -> None:
    # A safe rebase onto nothing: every block the backing files give is copied in.
    argv = ["qemu-img", "rebase", "-q", "-f", "qcow2", "-b", "", str(overlay)]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise HypervisorError(f"cannot flatten {overlay}: {proc.stderr.strip()}")


def _drop_backing_from_config(hv: Hypervisor, name: str, targets: list[str]) -> None:
    """The persistent XML must no longer name the version's files.

    libvirt updates it after a pull itself; after an offline rebase (or where it did
    not), the chain is cut from the definition here.
    """
    xml = hv.xml(name)
    if not any(backing_files(xml, target) for target in targets):
        return
    root = ET.fromstring(xml)
    for disk in root.findall("./devices/disk"):
        dev = disk.find("target")
        if dev is None or dev.get("dev") not in targets:
            continue
        for store in disk.findall("backingStore"):
            disk.remove(store)
        source = disk.find("source")
        where = list(disk).index(source) + 1 if source is not None else 0
        disk.insert(where, ET.Element("backingStore"))
    hv.define(ET.tostring(root, encoding="unicode"))
