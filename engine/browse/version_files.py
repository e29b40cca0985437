"""A version's filesystems, read inside the libguestfs appliance, never by the host.

A guest's filesystem may be hostile (crafted to crash or exploit a filesystem
driver), so it is never mounted by the host's kernel: libguestfs boots a small
appliance VM under QEMU, adds each of the version's files to it read-only, in the
manifest's format (never probed), and mounts them there. The host only sees
names, metadata and file contents over the appliance's channel.

Paths name a filesystem and a path in it: ``/dev/sda1:/etc/hosts``. The disks
are added in the manifest's order, so ``/dev/sda`` is its first disk (vda),
``/dev/sdb`` the second, and LVM volumes appear as ``/dev/VG/LV``.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from guestsafe.engine import locks
from guestsafe.engine.archive.versions import VersionInfo
from guestsafe.engine.browse.guestfs_module import load_guestfs
from guestsafe.engine.errors import RestoreError

# "tcg" runs the appliance without KVM: for hosts whose /dev/kvm opens but cannot
# run a VM (some nested setups), where libguestfs would wait for it forever.
ACCEL_ENV = "GUESTSAFE_APPLIANCE_ACCEL"
_NOT_FILESYSTEMS = {"swap", "unknown", ""}
# (done bytes, total bytes, path being copied)
ExtractProgress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class Filesystem:
    device: str
    fstype: str
    size: int
    label: str


@dataclass(frozen=True)
class Entry:
    """One directory entry; ``kind`` is dir, file, link or other (devices, fifos...)."""

    name: str
    kind: str
    size: int
    mode: int
    mtime_ns: int
    atime_ns: int
    target: str = ""


@dataclass(frozen=True)
class Extracted:
    files: int
    bytes: int
    skipped: tuple[str, ...]


def split_path(path: str) -> tuple[str, str]:
    """``/dev/sda1:/etc`` -> (``/dev/sda1``, ``/etc``); refuses ``..`` and relative paths."""
    device, sep, inner = path.partition(":")
    if not sep or not device.startswith("/dev/"):
        raise RestoreError(
            f"{path!r} names no filesystem; give DEVICE:/PATH, e.g. /dev/sda1:/etc "
            "(guestsafe files GUEST N lists them)"
        )
    inner = inner or "/"
    parts = PurePosixPath(inner).parts
    if not inner.startswith("/") or ".." in parts or any(_bad_char(p) for p in parts):
        raise RestoreError(f"{path!r}: the path must be absolute, without '..' or control chars")
    return device, str(PurePosixPath(inner))


def _bad_char(text: str) -> bool:
    return any(ord(ch) < 32 or ord(ch) == 127 for ch in text)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISLNK(mode):
        return "link"
    return "other"


class VersionFiles:
    """An open appliance on one version's disks; use ``open_version_files``."""

    def __init__(self, handle: Any, devices: list[str]) -> None:
        self._g = handle
        self._mounted: str | None = None
        self._lock = threading.Lock()  # one libguestfs call at a time
        self.filesystems = self._find_filesystems(devices)

    def _find_filesystems(self, devices: list[str]) -> list[Filesystem]:
        found = []
        for device, fstype in sorted(self._g.list_filesystems().items()):
            if fstype in _NOT_FILESYSTEMS:
                continue
            size = int(self._g.blockdev_getsize64(device))
            label = ""
            with contextlib.suppress(RuntimeError):  # not every filesystem has labels
                label = str(self._g.vfs_label(device))
            found.append(Filesystem(device, str(fstype), size, label))
        return found

    def _mount(self, device: str) -> None:
        if device not in {fs.device for fs in self.filesystems}:
            raise RestoreError(
                f"{device} is no filesystem of this version; "
                f"it has {', '.join(fs.device for fs in self.filesystems) or 'none'}"
            )
        if self._mounted == device:
            return
        self._g.umount_all()
        self._mounted = None
        try:
            self._g.mount_ro(device, "/")
        except RuntimeError as exc:
            raise RestoreError(f"cannot mount {device} in the appliance: {exc}") from exc
        self._mounted = device

    def stat(self, path: str) -> Entry:
        device, inner = split_path(path)
        with self._lock:
            self._mount(device)
            return self._entry(inner, self._lstat(inner))

    def listdir(self, path: str) -> list[Entry]:
        """The entries of a directory, by name."""
        device, inner = split_path(path)
        with self._lock:
            self._mount(device)
            return self._list(inner)

    def _lstat(self, inner: str) -> dict[str, int]:
        try:
            return dict(self._g.lstatns(inner))
        except RuntimeError as exc:
            raise RestoreError(f"{inner}: {exc}") from exc

    def _list(self, inner: str) -> list[Entry]:
        if not self._g.is_dir(inner, followsymlinks=False):
            raise RestoreError(f"{inner} is not a directory")
        names = sorted(self._g.ls(inner))
        stats = self._g.lstatnslist(inner, names) if names else []
        return [
            self._entry(str(PurePosixPath(inner) / name), dict(st))
            for name, st in zip(names, stats, strict=True)
        ]

    def _entry(self, inner: str, st: dict[str, int]) -> Entry:
        mode = int(st["st_mode"])
        target = str(self._g.readlink(inner)) if stat.S_ISLNK(mode) else ""
        return Entry(
            name=PurePosixPath(inner).name or "/",
            kind=_kind(mode),
            size=int(st["st_size"]),
            mode=mode,
            mtime_ns=int(st["st_mtime_sec"]) * 10**9 + int(st["st_mtime_nsec"]),
            atime_ns=int(st["st_atime_sec"]) * 10**9 + int(st["st_atime_nsec"]),
            target=target,
        )

    def extract(
        self,
        path: str,
        dest: Path,
        *,
        force: bool = False,
        progress: ExtractProgress | None = None,
        cancel: threading.Event | None = None,
    ) -> Extracted:
        """Copy ``path`` (a file, link or whole folder) into the directory ``dest``.

        It lands as ``dest/<name>``. Every conflict is found before anything is
        written: an existing file is refused unless ``force``. Modes keep their
        permission bits (no setuid/setgid: the files belong to whoever extracts),
        times are kept, symlinks are recreated as links and never followed, and
        device nodes, fifos and sockets are skipped.
        """
        device, inner = split_path(path)
        with self._lock:
            self._mount(device)
            name = PurePosixPath(inner).name or device.rsplit("/", 1)[-1]
            plan = self._walk(inner, PurePosixPath(name))
            return _Writer(self._g, dest, force, progress, cancel).write(plan)

    def _walk(self, inner: str, rel: PurePosixPath) -> list[tuple[PurePosixPath, Entry]]:
        top = self._entry(inner, self._lstat(inner))
        plan = [(rel, top)]
        pending = [(inner, rel)] if top.kind == "dir" else []
        while pending:
            remote, local = pending.pop()
            for entry in self._list(remote):
                child_remote = str(PurePosixPath(remote) / entry.name)
                plan.append((local / entry.name, _with_remote(entry, child_remote)))
                if entry.kind == "dir":
                    pending.append((child_remote, local / entry.name))
        plan[0] = (rel, _with_remote(top, inner))
        return plan


@dataclass(frozen=True)
class _RemoteEntry(Entry):
    remote: str = ""


def _with_remote(entry: Entry, remote: str) -> _RemoteEntry:
    return _RemoteEntry(**{**entry.__dict__, "remote": remote})


class _Writer:
    """Writes a walked tree under ``dest`` through directory fds, never following links."""

    def __init__(
        self,
        handle: Any,
        dest: Path,
        force: bool,
        progress: ExtractProgress | None,
        cancel: threading.Event | None,
    ) -> None:
        self._g = handle
        self._dest = dest
        self._force = force
        self._progress = progress or (lambda done, total, name: None)
        self._cancel = cancel

    def write(self, plan: list[tuple[PurePosixPath, Entry]]) -> Extracted:
        for rel, _entry in plan:
            if any(part in ("", ".", "..") or "/" in part or "\0" in part for part in rel.parts):
                raise RestoreError(f"refusing the name {str(rel)!r} from the guest")
            if rel.is_absolute():
                raise RestoreError(f"refusing the absolute name {str(rel)!r} from the guest")
        self._dest.mkdir(parents=True, exist_ok=True)
        root_fd = os.open(self._dest, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            self._preflight(root_fd, plan)
            return self._copy(root_fd, plan)
        finally:
            os.close(root_fd)

    def _preflight(self, root_fd: int, plan: list[tuple[PurePosixPath, Entry]]) -> None:
        clashes = []
        for rel, entry in plan:
            existing = _lstat_at(root_fd, rel)
            if existing is None:
                continue
            if entry.kind == "dir" and stat.S_ISDIR(existing.st_mode):
                continue  # merged into
            if stat.S_ISDIR(existing.st_mode):
                raise RestoreError(
                    f"{rel} is a folder in {self._dest} and a {entry.kind} in the version; "
                    "nothing was written (move the folder away)"
                )
            clashes.append(str(rel))
        if clashes and not self._force:
            shown = ", ".join(repr(c) for c in clashes[:3])
            more = f" and {len(clashes) - 3} more" if len(clashes) > 3 else ""
            raise RestoreError(
                f"{shown}{more} already exist in {self._dest}; nothing was written "
                "(--force replaces them)"
            )

    def _copy(self, root_fd: int, plan: list[tuple[PurePosixPath, Entry]]) -> Extracted:
        total = sum(e.size for _, e in plan if e.kind == "file")
        done = files = 0
        skipped: list[str] = []
        dirs: list[tuple[PurePosixPath, Entry]] = []
        for rel, entry in plan:
            if self._cancel is not None and self._cancel.is_set():
                raise RestoreError("extraction cancelled; what was copied so far stays")
            parent_fd = _open_dir(root_fd, rel.parent)
            try:
                name = rel.name
                existing = _lstat_at(parent_fd, PurePosixPath(name))
                is_dir = existing is not None and stat.S_ISDIR(existing.st_mode)
                if existing is not None and not is_dir:
                    # --force (preflight refused otherwise): a file or link goes, and
                    # a link is removed itself, never followed.
                    os.unlink(name, dir_fd=parent_fd)
                if entry.kind == "dir":
                    if not is_dir:
                        os.mkdir(name, 0o700, dir_fd=parent_fd)
                    dirs.append((rel, entry))
                elif entry.kind == "file":
                    self._file(parent_fd, name, entry, done, total, str(rel))
                    done += entry.size
                    files += 1
                elif entry.kind == "link":
                    os.symlink(entry.target, name, dir_fd=parent_fd)
                    os.utime(
                        name,
                        ns=(entry.atime_ns, entry.mtime_ns),
                        dir_fd=parent_fd,
                        follow_symlinks=False,
                    )
                    files += 1
                else:
                    skipped.append(str(rel))
            finally:
                os.close(parent_fd)
            self._progress(done, total, str(rel))
        # Directories last, deepest first: writing into one changes its mtime.
        for rel, entry in sorted(dirs, key=lambda item: len(item[0].parts), reverse=True):
            fd = _open_dir(root_fd, rel)
            try:
                os.fchmod(fd, stat.S_IMODE(entry.mode) & 0o777)
                os.utime(fd, ns=(entry.atime_ns, entry.mtime_ns))
            finally:
                os.close(fd)
        return Extracted(files, done, tuple(skipped))

    def _file(
        self, parent_fd: int, name: str, entry: Entry, done: int, total: int, shown: str
    ) -> None:
        assert isinstance(entry, _RemoteEntry)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(name, flags, 0o600, dir_fd=parent_fd)
        try:
            event = self._g.set_event_callback(
                lambda _ev, _eh, _buf, array: self._progress(
                    done + int(array[2]) if len(array) > 2 else done, total, shown
                ),
                load_guestfs().EVENT_PROGRESS,
            )
            try:
                # Through our own fd: libguestfs opens /dev/fd/N, which is this very
                # file, so no path on the host is resolved again.
                self._g.download(entry.remote, f"/dev/fd/{fd}")
            finally:
                self._g.delete_event_callback(event)
            os.fchmod(fd, stat.S_IMODE(entry.mode) & 0o777)
            os.utime(fd, ns=(entry.atime_ns, entry.mtime_ns))
        finally:
            os.close(fd)


def _open_dir(root_fd: int, rel: PurePosixPath) -> int:
    fd = os.dup(root_fd)
    for part in rel.parts:
        if part in ("", "."):
            continue
        try:
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        finally:
            os.close(fd)
        fd = nxt
    return fd


def _lstat_at(root_fd: int, rel: PurePosixPath) -> os.stat_result | None:
    parent = rel.parent
    try:
        fd = _open_dir(root_fd, parent)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:  # ELOOP: a link where a folder should be
        raise RestoreError(f"{parent} in the destination is not a folder: {exc.strerror}") from exc
    try:
        return os.stat(rel.name, dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    finally:
        os.close(fd)


def _launch(version: VersionInfo) -> tuple[Any, list[str]]:
    guestfs = load_guestfs()
    g = guestfs.GuestFS(python_return_dict=True, close_on_exit=True)
    g.set_backend("direct")  # no libvirt domain of its own; QEMU as this user
    if os.environ.get(ACCEL_ENV, "") == "tcg":
        # set_backend_settings: set_backend_setting("force_tcg", "") crashes 1.48.
        g.set_backend_settings(["force_tcg"])
    for rec in version.manifest.disks:
        src = version.path / rec.file
        if src.is_symlink() or not src.is_file():
            raise RestoreError(f"{src} is missing or not a regular file; the version is damaged")
        # readonly: the appliance writes to a throwaway overlay; format from the
        # manifest, since probing a raw image a guest wrote could read it as qcow2.
        g.add_drive_opts(str(src), readonly=True, format=rec.format)
    try:
        g.launch()
    except RuntimeError as exc:
        g.close()
        raise RestoreError(
            f"the libguestfs appliance did not start: {exc}; libguestfs-test-tool says why"
        ) from exc
    return g, list(g.list_devices())


@contextmanager
def open_version_files(
    version: VersionInfo, state_dir: Path, purpose: str
) -> Iterator[VersionFiles]:
    """The version's filesystems, under its guest's lock (prune keeps it meanwhile)."""
    with locks.acquire(state_dir, f"guest:{version.manifest.uuid}", purpose):
        g, devices = _launch(version)
        try:
            yield VersionFiles(g, devices)
        finally:
            g.close()
