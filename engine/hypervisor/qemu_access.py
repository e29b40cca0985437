"""Letting QEMU into one partial version, and nowhere else in the archive.

In a push backup libvirt creates the target files and QEMU, running as its own
user (``libvirt-qemu`` on Debian), opens and writes them. The archive is 0700
and root's, so QEMU needs search permission on the archive root and the guest
folder, and write and search on the ``.partial-N`` folder. POSIX ACL entries
for QEMU's uid grant exactly that without opening the folders to anyone else;
they are taken back when the job ends, and the version folder keeps no ACL.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt

from guestsafe.engine.errors import CopyError, GuestsafeError
from guestsafe.engine.hypervisor.connection import Hypervisor

_DAC_LABEL = re.compile(r"\+?(\d+):\+?(\d+)")
PID_DIR = Path("/run/libvirt/qemu")


def qemu_uid(hv: Hypervisor, name: str) -> int | None:
    """The uid QEMU runs as for this guest; None when it runs as root.

    The running guest's DAC label says it; failing that, the host's default
    label for the guest's virtualization type.
    """
    try:
        root = ET.fromstring(hv.xml(name, inactive=False))
    except (GuestsafeError, ET.ParseError):
        root = None  # the host's default below
    if root is not None:
        for seclabel in root.findall("seclabel"):
            uid = _uid(seclabel.findtext("label"))
            if seclabel.get("model") == "dac" and uid is not None:
                return uid or None
    virt_type = root.get("type", "qemu") if root is not None else "qemu"
    try:
        caps = ET.fromstring(hv.connection.getCapabilities())
    except libvirt.libvirtError:
        return None
    for model in caps.findall("./host/secmodel"):
        if model.findtext("model") != "dac":
            continue
        for base in model.findall("baselabel"):
            uid = _uid(base.text)
            if base.get("type") == virt_type and uid is not None:
                return uid or None
    return None


def _uid(label: str | None) -> int | None:
    match = _DAC_LABEL.fullmatch((label or "").strip())
    return int(match.group(1)) if match else None


class QemuAccess:
    """ACL entries giving QEMU's uid its way into one partial version."""

    def __init__(self, uid: int | None, root: Path, partial: Path) -> None:
        self.uid = uid
        self.partial = partial
        self._passages = [root, partial.parent]  # the archive root and the guest folder
        self._added: list[Path] = []
        self._partial_open = False

    def grant(self) -> None:
        if self.uid is None:
            return
        for folder in self._passages:
            # An entry someone else made stays as it is, and stays afterwards.
            if not _others_may_search(folder) and not self._has_entry(folder):
                _setfacl("-m", f"u:{self.uid}:x", folder, self.uid)
                self._added.append(folder)
        _setfacl("-m", f"u:{self.uid}:wx", self.partial, self.uid)
        self._partial_open = True

    def close_partial(self) -> None:
        """QEMU is done: the partial (and so the version) keeps no ACL at all."""
        if self._partial_open and self.partial.is_dir():
            _setfacl("-b", None, self.partial, self.uid)
        self._partial_open = False

    def revoke(self) -> None:
        """Take back the passages granted; failures are left for the next run to see."""
        with contextlib.suppress(CopyError):
            self.close_partial()
        for folder in reversed(self._added):
            with contextlib.suppress(CopyError):
                _setfacl("-x", f"u:{self.uid}", folder, self.uid)
        self._added = []

    def _has_entry(self, folder: Path) -> bool:
        listing = _run(["getfacl", "--omit-header", "--numeric", "--absolute-names", str(folder)])
        return any(line.startswith(f"user:{self.uid}:") for line in listing.splitlines())


def _others_may_search(folder: Path) -> bool:
    return bool(os.stat(folder).st_mode & stat.S_IXOTH)


def _setfacl(flag: str, spec: str | None, path: Path, uid: int | None) -> None:
    argv = ["setfacl", flag, *([spec] if spec else []), str(path)]
    try:
        _run(argv)
    except CopyError as exc:
        raise CopyError(
            f"cannot let QEMU (uid {uid}) write its backup into {path}: {exc.message}; "
            "push backups need POSIX ACLs on the destination filesystem (mode stop does not)"
        ) from exc


def _run(argv: list[str]) -> str:
    if shutil.which(argv[0]) is None:
        raise CopyError(f"{argv[0]} is missing (install the acl package)")
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise CopyError(proc.stderr.strip() or f"{argv[0]} failed ({proc.returncode})")
    return proc.stdout


def qemu_sees(name: str, folder: Path) -> bool | None:
    """Whether the guest's QEMU process can see ``folder``; None when we cannot tell.

    QEMU lives in its own mount namespace. On a host whose root mount is not
    shared, a filesystem mounted after QEMU started never shows up in there.
    """
    try:
        pid = int((PID_DIR / f"{name}.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    inside = Path(f"/proc/{pid}/root") / folder.relative_to(folder.anchor)
    try:
        return inside.is_dir()
    except OSError:
        return None


def grant_read(uid: int | None, files: list[Path]) -> list[Path]:
    """Let QEMU's uid read ``files`` (a booted clone's backing files), and nothing more.

    Search on each folder above them that others may not search, read on each file
    others may not read. An entry QEMU's uid has already is widened if need be and
    stays afterwards (the mask is recomputed: a chmod may have masked it). The
    paths given a new entry, to hand to ``revoke_read`` later.
    """
    if uid is None:
        return []
    added: list[Path] = []
    try:
        for path in files:
            for folder in reversed(path.parents):
                if folder not in added and not _others_may_search(folder):
                    _allow(uid, folder, "x", added)
            if not os.stat(path).st_mode & stat.S_IROTH:
                _allow(uid, path, "r", added)
    except BaseException:
        revoke_read(uid, added)
        raise
    return added


def _allow(uid: int, path: Path, perm: str, added: list[Path]) -> None:
    had = _uid_perms(path, uid)
    if had is None:
        _read_acl("-m", f"u:{uid}:{perm}", path, uid)
        added.append(path)
    else:
        _read_acl("-m", f"u:{uid}:{''.join(sorted(set(had.replace('-', '') + perm)))}", path, uid)


def revoke_read(uid: int | None, paths: list[Path]) -> None:
    """Take back the entries ``grant_read`` added; a path gone meanwhile is skipped.

    A path left with no other extended entry loses its ACL altogether, so its mode
    reads as it did before.
    """
    if uid is None:
        return
    for path in reversed(paths):
        with contextlib.suppress(CopyError, OSError):
            if not path.exists():
                continue
            _read_acl("-x", f"u:{uid}", path, uid)
            if not _named_entries(path):
                _run(["setfacl", "-b", str(path)])


def _acl_lines(path: Path) -> list[str]:
    listing = _run(["getfacl", "--omit-header", "--numeric", "--absolute-names", str(path)])
    return [line.split("#")[0].strip() for line in listing.splitlines() if line.strip()]


def _uid_perms(path: Path, uid: int) -> str | None:
    for line in _acl_lines(path):
        if line.startswith(f"user:{uid}:"):
            return line.split(":")[2]
    return None


def _named_entries(path: Path) -> list[str]:
    return [
        line
        for line in _acl_lines(path)
        if line.split(":")[0] in ("user", "group") and line.split(":")[1]
    ]


def _read_acl(flag: str, spec: str, path: Path, uid: int) -> None:
    try:
        _run(["setfacl", flag, spec, str(path)])
    except CopyError as exc:
        raise CopyError(
            f"cannot let QEMU (uid {uid}) read {path}: {exc.message}; booting a version "
            "needs POSIX ACLs on the archive's filesystem (restore it instead)"
        ) from exc
