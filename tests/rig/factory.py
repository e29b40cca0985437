"""Make test guests for one test (or module) and remove them afterwards, whatever happened."""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import libvirt

from .assets import GuestAssets
from .disks import DiskSpec, MiB
from .errors import RigError
from .guest import (
    NAME_PREFIX,
    TestGuest,
    boot_id,
    find_domain,
    make_guest,
    owner_of,
    remove_domain,
    unique_name,
)

CONSOLE_TAIL_CHARS = 1500


class GuestFactory:
    """Call it to make guests; cleanup() removes exactly those (and adopted) guests."""

    def __init__(self, conn: libvirt.virConnect, workdir: Path, assets: GuestAssets) -> None:
        self.conn = conn
        self.workdir = workdir
        self.assets = assets
        self.guests: list[TestGuest] = []
        self._adopted: list[tuple[str, tuple[Path, ...]]] = []

    def __call__(
        self,
        label: str = "vm",
        *,
        disks: Sequence[DiskSpec] = (DiskSpec("vda", "qcow2", 64 * MiB),),
        ignore_acpi: bool = False,
        start: bool = True,
        interfaces: int = 1,
        vdb_text: str | None = None,
        nvram: bool = False,
        memory_mib: int = 192,
        agent_channel: bool = False,
    ) -> TestGuest:
        """Make a guest named ``gstest-<label>-<random>``; see rig.make_guest."""
        guest = make_guest(
            self.conn,
            self.workdir,
            unique_name(label),
            disks=disks,
            ignore_acpi=ignore_acpi,
            start=start,
            interfaces=interfaces,
            vdb_text=vdb_text,
            nvram=nvram,
            assets=self.assets,
            memory_mib=memory_mib,
            agent_channel=agent_channel,
        )
        self.guests.append(guest)
        return guest

    def adopt(self, name: str, *paths: Path) -> None:
        """Remove this guest (and these files) at cleanup too, e.g. one a restore defined.

        Only rig names are accepted: name it with rig.unique_name().
        """
        if not name.startswith(NAME_PREFIX):
            raise ValueError(f"only {NAME_PREFIX}* guests can be adopted, not {name!r}")
        self._adopted.append((name, paths))

    def cleanup(self) -> None:
        """Destroy and undefine every guest made or adopted here; raise after trying all."""
        errors: list[str] = []
        for guest in reversed(self.guests):
            _collect(errors, guest.name, guest.destroy_and_undefine)
        for name, paths in reversed(self._adopted):
            _collect(errors, name, functools.partial(_remove_adopted, self.conn, name, paths))
        self.guests.clear()
        self._adopted.clear()
        if errors:
            raise RigError("cleanup failed: " + "; ".join(errors))

    def console_tails(self) -> str:
        """The end of every guest's console log, for a failed test's report."""
        parts = [
            f"--- {guest.name} ({guest.console_log}) ---\n"
            + guest.console_text()[-CONSOLE_TAIL_CHARS:]
            + _host_logs(guest.name)
            for guest in self.guests
        ]
        return "\n".join(parts)


# What libvirt logged on the host for a guest: QEMU's stderr, and swtpm's setup when the
# guest has a TPM (libvirt's own error only says "check the log for details").
HOST_LOGS = (
    Path("/var/log/libvirt/qemu/{name}.log"),
    Path("/var/log/swtpm/libvirt/qemu/{name}-swtpm.log"),
)


def _host_logs(name: str) -> str:
    parts = []
    for template in HOST_LOGS:
        path = Path(str(template).format(name=name))
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        parts.append(f"\n--- {path} ---\n{text[-CONSOLE_TAIL_CHARS:]}")
    return "".join(parts)


def _collect(errors: list[str], name: str, action: Callable[[], None]) -> None:
    try:
        action()
    except Exception as error:
        errors.append(f"{name}: {error}")


def _remove_adopted(conn: libvirt.virConnect, name: str, paths: tuple[Path, ...]) -> None:
    dom = find_domain(conn, name)
    if dom is not None:
        remove_domain(dom)
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def sweep_orphans(conn: libvirt.virConnect) -> list[str]:
    """Remove rig guests whose pytest process is gone (killed runs leave TCG guests
    burning CPU). Guests of live processes and guests the rig did not make stay.
    """
    removed = []
    for dom in conn.listAllDomains():
        if not dom.name().startswith(NAME_PREFIX):
            continue
        owner = owner_of(dom)
        if owner is None or _owner_alive(owner):
            continue
        remove_domain(dom)
        directory = Path(owner.get("directory", ""))
        # Only the guest's own folder, as make_guest named it.
        if directory.is_absolute() and directory.name == dom.name():
            shutil.rmtree(directory, ignore_errors=True)
        removed.append(dom.name())
    return removed


def _owner_alive(owner: dict[str, str]) -> bool:
    if owner.get("boot") != boot_id():
        return False
    try:
        pid = int(owner.get("pid", ""))
    except ValueError:
        return True  # unreadable: better leave it than remove a live run's guest
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0
