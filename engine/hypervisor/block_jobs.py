"""libvirt block jobs on a running guest: pulling a backing chain into its top image,
or copying a disk, flattened, to a new file and switching the guest over to it.

``virDomainBlockPull`` with no base copies every block the overlay does not hold
from its backing files into the overlay, then QEMU drops the backing file from
the overlay's header and libvirt from the guest's live and persistent XML
(libvirt 9.0 does both for a persistent guest). The guest runs meanwhile.
"""

from __future__ import annotations

import contextlib
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from xml.sax.saxutils import quoteattr

import libvirt

from guestsafe.engine import failpoints
from guestsafe.engine.errors import Cancelled, HypervisorError
from guestsafe.engine.hypervisor.connection import Hypervisor

POLL_SECONDS = 0.5
PIVOT_WAIT = 120  # seconds a caught-up copy may stay "not ready" (a busy guest writing)

ProgressFn = Callable[[int, int], None]


def pull_backing(
    hv: Hypervisor,
    name: str,
    target: str,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
) -> None:
    """Flatten disk ``target`` of running guest ``name`` into its own image; wait for it."""
    dom = _domain(hv, name)
    try:
        dom.blockPull(target, 0, 0)
    except libvirt.libvirtError as exc:
        raise HypervisorError(f"cannot start a block pull of {name} {target}: {exc}") from exc
    while True:
        if cancel is not None and cancel.is_set():
            _abort(dom, target)
            raise Cancelled(f"promote of {name} cancelled; {target} still reads the archive")
        try:
            info = dom.blockJobInfo(target, 0)
        except libvirt.libvirtError as exc:
            raise HypervisorError(
                f"cannot follow the block pull of {name} {target}: {exc}"
            ) from exc
        if not info:
            break  # the job ended (libvirt clears it once QEMU has pivoted)
        if progress is not None:
            progress(int(info.get("cur", 0)), int(info.get("end", 0)))
        time.sleep(POLL_SECONDS)
    if backing_files(hv.xml(name, inactive=False), target):
        raise HypervisorError(
            f"the block pull of {name} {target} ended, but the disk still has a backing file "
            "(see libvirtd's log); the clone still reads the archive"
        )


def _abort(dom: libvirt.virDomain, target: str) -> None:
    with contextlib.suppress(libvirt.libvirtError):  # it ended meanwhile
        dom.blockJobAbort(target, 0)


def backing_files(xml: str, target: str) -> list[str]:
    """The files of disk ``target``'s backing chain in domain ``xml``, top down."""
    root = ET.fromstring(xml)
    for disk in root.findall("./devices/disk"):
        dev = disk.find("target")
        if dev is None or dev.get("dev") != target:
            continue
        files = []
        store = disk.find("backingStore")
        while store is not None:
            source = store.find("source")
            if source is None:
                break
            files.append(source.get("file") or source.get("dev") or "")
            store = store.find("backingStore")
        return files
    return []


def _domain(hv: Hypervisor, name: str) -> libvirt.virDomain:
    try:
        return hv.connection.lookupByName(name)
    except libvirt.libvirtError as exc:
        raise HypervisorError(f"guest {name!r}: {exc}") from exc


def copy_to(
    hv: Hypervisor,
    name: str,
    target: str,
    dest: Path,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
) -> None:
    """Copy disk ``target`` of running guest ``name``, flattened, into a new qcow2 ``dest``;
    switch the guest over to it once the copy has caught up (a block copy, then pivot).

    The job is transient (libvirt would otherwise refuse it on a persistent guest);
    the caller writes the new path into the persistent XML.
    """
    dom = _domain(hv, name)
    xml = f"<disk type='file'><driver type='qcow2'/><source file={quoteattr(str(dest))}/></disk>"
    try:
        dom.blockCopy(target, xml, None, libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB)
    except libvirt.libvirtError as exc:
        raise HypervisorError(f"cannot start a block copy of {name} {target}: {exc}") from exc
    refused = 0
    while True:
        if cancel is not None and cancel.is_set():
            _abort(dom, target)
            raise Cancelled(f"promote of {name} cancelled; {target} still reads the archive")
        try:
            info = dom.blockJobInfo(target, 0)
        except libvirt.libvirtError as exc:
            raise HypervisorError(
                f"cannot follow the block copy of {name} {target}: {exc}"
            ) from exc
        if not info:
            raise HypervisorError(f"the block copy of {name} {target} ended before it was done")
        done, total = int(info.get("cur", 0)), int(info.get("end", 0))
        if progress is not None:
            progress(done, total)
        failpoints.hit("promote.copy")
        if total > 0 and done == total:
            if _pivoted(dom, target):
                break
            refused += 1
            if refused * POLL_SECONDS > PIVOT_WAIT:
                _abort(dom, target)
                raise HypervisorError(
                    f"the block copy of {name} {target} caught up but libvirt would not switch "
                    f"over to {dest} within {PIVOT_WAIT} s; the copy was abandoned"
                )
        time.sleep(POLL_SECONDS)
    live = hv.xml(name, inactive=False)
    if source_of(live, target) != str(dest):
        raise HypervisorError(f"the block copy of {name} {target} did not switch to {dest}")


def _pivoted(dom: libvirt.virDomain, target: str) -> bool:
    # Ready only once the mirror is in sync; libvirt says "not ready" until then.
    try:
        dom.blockJobAbort(target, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
    except libvirt.libvirtError:
        return False
    return True


def source_of(xml: str, target: str) -> str | None:
    for disk in ET.fromstring(xml).findall("./devices/disk"):
        dev = disk.find("target")
        source = disk.find("source")
        if dev is not None and dev.get("dev") == target and source is not None:
            return source.get("file")
    return None


def abort_job(hv: Hypervisor, name: str, target: str) -> bool:
    """End a block job left on disk ``target`` of running guest ``name``, without a pivot.

    False when there was none (the guest is off, or the job ended with its process).
    """
    try:
        dom = hv.connection.lookupByName(name)
        if not dom.isActive() or not dom.blockJobInfo(target, 0):
            return False
        dom.blockJobAbort(target, 0)  # no pivot: the guest stays on the disk it had
    except libvirt.libvirtError:
        return False
    return True
