"""What must hold, under the guest's lock, before a restore over the original touches a file."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from guestsafe.engine import events
from guestsafe.engine.archive.names import printable
from guestsafe.engine.errors import RestoreError
from guestsafe.engine.events import Reporter
from guestsafe.engine.hypervisor.connection import Hypervisor
from guestsafe.engine.hypervisor.domain_xml import SHUTOFF


def check_shut_off(hv: Hypervisor, guest: str) -> None:
    if hv.exists(guest) and hv.state(guest) != SHUTOFF:
        raise RestoreError(
            f"guest {guest!r} is {hv.state(guest)}; shut it off before restoring over it"
        )


def check_managed_save(hv: Hypervisor, guest: str, force: bool, reporter: Reporter) -> bool:
    """Whether a saved memory image must be discarded (with force); refused without.

    A guest with a managed-save image looks shut off, but its next start resumes
    the saved memory over the restored disks, which corrupts them.
    """
    if not hv.exists(guest) or not hv.has_managed_save(guest):
        return False
    message = (
        f"guest {guest!r} has a saved memory image (virsh managedsave); its next start "
        "would resume that memory over the restored disks"
    )
    if not force:
        raise RestoreError(
            message + f"; start it and shut it down, or discard it with --force "
            f"(virsh managedsave-remove {guest})"
        )
    events.warn(reporter, message + "; it is discarded (--force)", guest)
    return True


def check_not_shared(hv: Hypervisor, guest: str, targets: Iterable[Path]) -> None:
    """Refuse a target path that another defined guest uses (a shared disk, or the same file).

    The path's file is replaced, so the other guest, running or not, would lose its disk.
    """
    wanted = {_identity(Path(p)): Path(p) for p in targets}
    for source, names in sorted(hv.disk_users().items()):
        others = sorted(n for n in names if n != guest)
        target = wanted.get(_identity(Path(source)))
        if others and target is not None:
            who = ", ".join(repr(printable(n)) for n in others)
            raise RestoreError(
                f"{target} is also used by guest {who}; restoring over {guest!r} would "
                "replace that guest's disk. Nothing was changed (detach it from the other "
                "guest, or restore as a new guest)"
            )


def _identity(path: Path) -> tuple[object, ...]:
    """One key per file: device and inode when it exists (hard links too), else its real path."""
    try:
        st = os.stat(path)
    except OSError:
        return ("path", os.path.realpath(path))
    return ("inode", st.st_dev, st.st_ino)
