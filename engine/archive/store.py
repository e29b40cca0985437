"""The archive: versioned folders of plain disk files, format v1 (FORMAT.md).

A version exists once its folder is renamed from ``.partial-<n>`` to ``<n>``,
after every file and the manifest are fsynced. Nothing else in a committed
version is ever rewritten; verification results live in a ``verified.json``
sidecar next to the manifest.

One process writes to an archive at a time (the runner's lock sees to it);
``recover`` in particular removes unfinished versions without asking whose they
are. Reading is safe at any time.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import stat
import threading
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from guestsafe.engine import failpoints
from guestsafe.engine.archive.manifest import (
    B3SUMS_FILE,
    DOMAIN_XML_FILE,
    FORMAT_VERSION,
    MANIFEST_FILE,
    RESERVED_FILES,
    VERIFIED_FILE,
    DiskRecord,
    Manifest,
    b3sums_text,
    is_safe_file_name,
)
from guestsafe.engine.archive.names import (
    decode_guest_dir,
    encode_guest_name,
    is_truncated,
    matches,
    printable,
)
from guestsafe.engine.copier import hash_file
from guestsafe.engine.errors import ArchiveError, CopyError, NotFoundError, VerifyError
from guestsafe.engine.events import Progress
from guestsafe.engine.fsutil import (
    atomic_write_bytes,
    fsync_dir,
    fsync_file,
    is_temp_name,
    lstat_or_none,
)
from guestsafe.engine.modes import Mode

MARKER = "guestsafe-archive.json"
COUNTER_FILE = "last-version"
GUEST_NAME_FILE = "guest-name"
PARTIAL_PREFIX = ".partial-"
DELETING_PREFIX = ".deleting-"
DIR_MODE = 0o700
FILE_MODE = 0o600

# Version numbers are decimal without leading zeros, so each has one spelling.
_NUMBER = re.compile(r"[1-9][0-9]{0,17}")
# Metadata files are small; a huge one is damage, and reading it whole would hurt.
_MAX_METADATA = 16 * 1024 * 1024

ProgressFn = Callable[[Progress], None]


@dataclass(frozen=True)
class VersionInfo:
    """One committed version as the archive list shows it."""

    guest: str
    number: int
    path: Path
    manifest: Manifest
    size: int  # bytes the folder's files take on disk
    date: str  # manifest.finished
    mode: Mode
    verified: bool | None  # None: never verified, or its record is unreadable


@dataclass(frozen=True)
class VerifyReport:
    guest: str
    number: int
    ok: bool
    problems: list[str]

    def raise_if_failed(self) -> None:
        """Raise VerifyError naming guest, version and the first problems."""
        if self.ok:
            return
        shown = "; ".join(self.problems[:3])
        more = f" (and {len(self.problems) - 3} more)" if len(self.problems) > 3 else ""
        raise VerifyError(
            f"version {self.number} of {printable(self.guest)} failed verification: {shown}{more}"
        )


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _read_small(path: Path) -> bytes:
    """Read a metadata file without following a symlink planted in its place."""
    # O_NONBLOCK: a FIFO in a manifest's place must fail, not hang the open.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        data = f.read(_MAX_METADATA + 1)
    if len(data) > _MAX_METADATA:
        raise OSError(errno.EFBIG, "larger than any metadata file guestsafe writes")
    return data


def _mkdir_private(path: Path) -> None:
    os.mkdir(path, DIR_MODE)
    # mkdir's mode is narrowed by the umask only, never widened; the chmod makes the
    # mode exact whatever umask the timer or shell left us with.
    try:
        os.chmod(path, DIR_MODE)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP):  # exFAT/FAT have no modes
            raise


def _kind(st: os.stat_result) -> str:
    if stat.S_ISLNK(st.st_mode):
        return "a symlink"
    if stat.S_ISDIR(st.st_mode):
        return "a directory"
    return "a special file"


def _remove(path: Path) -> None:
    """Remove a file or a whole tree, never following a symlink out of it."""
    st = lstat_or_none(path)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        # shutil.rmtree works on file descriptors here (avoids_symlink_attacks): a
        # symlink inside is unlinked, never followed.
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _guest_like(name: str) -> bool:
    """True for a name guestsafe could have given a guest folder."""
    if is_truncated(name):
        return True
    try:
        decode_guest_dir(name)
    except ArchiveError:
        return False
    return True


def _is_uuid(value: object) -> bool:
    try:
        return isinstance(value, str) and str(uuidlib.UUID(value)) == value
    except ValueError:
        return False


def _join(numbers: list[int]) -> str:
    return ", ".join(map(str, numbers)) if numbers else "none"


def _read_verified(folder: Path) -> bool | None:
    """The last verification result of a version folder; None if there is none."""
    try:
        data = json.loads(_read_small(folder / VERIFIED_FILE))
    except (OSError, ValueError):
        return None
    # An unreadable record proves nothing either way: "unknown", not "failed".
    ok = data.get("ok") if isinstance(data, dict) else None
    return ok if isinstance(ok, bool) else None


def _folder_size(folder: Path) -> int:
    total = 0
    with os.scandir(folder) as entries:
        for entry in entries:
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(st.st_mode):
                total += st.st_blocks * 512
    return total


@dataclass
class _HashJob:
    file: str
    path: Path
    expected: str
    size: int


@dataclass
class _Check:
    """One version's verification: problems found so far and files left to hash."""

    guest: str
    number: int
    folder: Path
    problems: list[str]
    jobs: list[_HashJob]
    record: bool = True  # False when the folder is not ours to write into


class Archive:
    """An archive root holding ``guestsafe-archive.json``. Use ``Archive.open``."""

    def __init__(self, root: Path, archive_id: str, created: str) -> None:
        self.root = root
        self.archive_id = archive_id
        self.created = created

    # --- opening -------------------------------------------------------------

    @classmethod
    def open(cls, root: Path, *, create: bool = False, expected_id: str | None = None) -> Archive:
        """Open the archive at ``root``; with ``create``, make one if there is none.

        ``expected_id`` is the archive a job wrote to before: anything else there
        (another archive, or none at all) is refused, so a swapped device is noticed.
        """
        root = cls._resolve_root(Path(root), create=create)
        marker = root / MARKER
        data = cls._read_marker(marker)
        if data is None:
            if expected_id is not None:
                raise ArchiveError(
                    f"{root} holds no guestsafe archive, expected archive {expected_id}; "
                    "is the right device mounted?"
                )
            if not create:
                raise ArchiveError(
                    f"{root} is not a guestsafe archive (no {MARKER}); check the "
                    "destination, or let a backup job create the archive there"
                )
            data = {"format": FORMAT_VERSION, "archive_id": str(uuidlib.uuid4()), "created": _now()}
            atomic_write_bytes(marker, (json.dumps(data, indent=2) + "\n").encode(), FILE_MODE)
        archive = cls(root, data["archive_id"], data["created"])
        if expected_id is not None and expected_id != archive.archive_id:
            raise ArchiveError(
                f"{root} holds archive {archive.archive_id}, expected archive {expected_id}; "
                "is the right device mounted?"
            )
        return archive

    @staticmethod
    def _resolve_root(root: Path, *, create: bool) -> Path:
        if not root.exists() and create:
            root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        if not root.is_dir():
            raise ArchiveError(f"archive {root} does not exist or is not a directory")
        # Resolved once: a root reached through a symlink is fine, links below it are not.
        return root.resolve(strict=True)

    @staticmethod
    def _read_marker(marker: Path) -> dict[str, Any] | None:
        try:
            data = json.loads(_read_small(marker))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ArchiveError(f"archive marker {marker} is unreadable: {exc}") from exc
        if not isinstance(data, dict):
            data = {}
        fmt = data.get("format")
        if type(fmt) is int and fmt > FORMAT_VERSION:
            raise ArchiveError(
                f"archive {marker.parent} uses format {fmt}, newer than this guestsafe "
                f"reads ({FORMAT_VERSION}); use a guestsafe release that reads format {fmt}"
            )
        if not (
            type(fmt) is int
            and fmt == FORMAT_VERSION
            and data.keys() == {"format", "archive_id", "created"}
            and _is_uuid(data["archive_id"])
            and isinstance(data["created"], str)
        ):
            raise ArchiveError(
                f"archive marker {marker} is damaged: expected exactly format "
                f"{FORMAT_VERSION}, archive_id (a UUID) and created"
            )
        return data

    # --- guests --------------------------------------------------------------

    def _scan_guests(self) -> tuple[dict[str, Path], list[str]]:
        """Every guest folder in the root, and what looked wrong on the way."""
        found: dict[str, Path] = {}
        problems: list[str] = []
        for name in sorted(os.listdir(self.root)):
            if name.startswith(".") or name == MARKER or not _guest_like(name):
                # Foreign things (lost+found, a user's own files) are none of ours.
                continue
            path = self.root / name
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                problems.append(f"{path} is a symlink; guestsafe does not follow links")
                continue
            if not stat.S_ISDIR(st.st_mode):
                continue
            guest = self._guest_of(path)
            if guest is None:
                problems.append(
                    f"{path}: cannot tell which guest it belongs to ({GUEST_NAME_FILE} "
                    "and manifests unreadable)"
                )
                continue
            found[guest] = path
        return found, problems

    def _guest_of(self, folder: Path) -> str | None:
        """The guest a folder belongs to, or None if it is not a guest folder."""
        if not is_truncated(folder.name):
            try:
                return decode_guest_dir(folder.name)
            except ArchiveError:
                return None
        try:
            stored = _read_small(folder / GUEST_NAME_FILE).decode("utf-8", "surrogatepass")
        except (OSError, UnicodeDecodeError):
            stored = ""
        if matches(stored, folder.name):
            return stored
        # guest-name lost: any manifest in the folder names the guest as well.
        for number in self._numbers(folder):
            try:
                manifest = Manifest.from_json(_read_small(folder / str(number) / MANIFEST_FILE))
            except (OSError, ArchiveError):
                continue
            if matches(manifest.guest, folder.name):
                return manifest.guest
        return None

    def guests(self) -> list[str]:
        """Guests with a folder in the archive, sorted."""
        return sorted(self._scan_guests()[0])

    def _guest_dir(self, guest: str, *, create: bool = False) -> Path | None:
        """The folder of ``guest``; None if it has none and ``create`` is False."""
        name = encode_guest_name(guest)
        path = self.root / name
        st = lstat_or_none(path)
        if st is None:
            if not create:
                return None
            try:
                _mkdir_private(path)
            except FileExistsError:  # made by someone else meanwhile: check it as found
                return self._guest_dir(guest)
            if is_truncated(name):
                atomic_write_bytes(
                    path / GUEST_NAME_FILE, guest.encode("utf-8", "surrogatepass"), FILE_MODE
                )
            fsync_dir(self.root)
            return path
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            raise ArchiveError(
                f"the folder of guest {printable(guest)}, {path}, is {_kind(st)}; "
                "guestsafe refuses it (move it away to back this guest up)"
            )
        if name not in os.listdir(self.root):
            # A case-folding filesystem (exFAT, NTFS) matched another guest's folder.
            raise ArchiveError(
                f"guest {printable(guest)} would use {path}, but this filesystem folds case "
                "and the folder belongs to another guest; use a case-sensitive filesystem"
            )
        if is_truncated(name):
            self._check_guest_name(guest, path, create=create)
        return path

    @staticmethod
    def _check_guest_name(guest: str, folder: Path, *, create: bool) -> None:
        # The hash in a truncated name already ties the folder to this guest; only a
        # guest-name file that says otherwise means someone else's folder.
        try:
            stored = _read_small(folder / GUEST_NAME_FILE)
        except FileNotFoundError:
            if create:  # lost, or a crash right after the folder was made
                atomic_write_bytes(
                    folder / GUEST_NAME_FILE, guest.encode("utf-8", "surrogatepass"), FILE_MODE
                )
            return
        except OSError as exc:
            raise ArchiveError(
                f"cannot read {folder / GUEST_NAME_FILE}: {exc.strerror or exc}"
            ) from exc
        if stored != guest.encode("utf-8", "surrogatepass"):
            raise ArchiveError(
                f"{folder} belongs to another guest than {printable(guest)} "
                f"(its {GUEST_NAME_FILE} file disagrees); move it away"
            )

    # --- listing -------------------------------------------------------------

    @staticmethod
    def _numbers(folder: Path, prefix: str = "") -> list[int]:
        """Numbers of entries named ``<prefix><n>`` in a guest folder, any file type."""
        numbers = []
        for name in os.listdir(folder):
            if name.startswith(prefix) and _NUMBER.fullmatch(name[len(prefix) :]):
                numbers.append(int(name[len(prefix) :]))
        return sorted(numbers)

    def _read_version(self, guest: str, folder: Path) -> VersionInfo:
        number = int(folder.name)
        try:
            data = _read_small(folder / MANIFEST_FILE)
        except OSError as exc:
            raise ArchiveError(
                f"version {number} of {printable(guest)} has no readable {MANIFEST_FILE} "
                f"({folder}): {exc.strerror or exc}"
            ) from exc
        manifest = Manifest.from_json(data, version=number, path=folder / MANIFEST_FILE)
        if manifest.guest != guest:
            raise ArchiveError(
                f"version {number} of {printable(guest)} holds a manifest of guest "
                f"{printable(manifest.guest)} ({folder}); it was moved here by hand"
            )
        return VersionInfo(
            guest=guest,
            number=number,
            path=folder,
            manifest=manifest,
            size=_folder_size(folder),
            date=manifest.finished,
            mode=manifest.mode,
            verified=_read_verified(folder),
        )

    def _scan_versions(self, guest: str, folder: Path) -> tuple[list[VersionInfo], list[str]]:
        versions: list[VersionInfo] = []
        problems: list[str] = []
        for number in self._numbers(folder):
            path = folder / str(number)
            try:
                st = os.lstat(path)
                if not stat.S_ISDIR(st.st_mode):
                    problems.append(
                        f"version {number} of {printable(guest)}, {path}, is {_kind(st)}"
                    )
                    continue
                versions.append(self._read_version(guest, path))
            except FileNotFoundError:
                continue  # deleted by retention while we looked
            except ArchiveError as exc:
                problems.append(exc.message)
        for prefix in (PARTIAL_PREFIX, DELETING_PREFIX):
            for number in self._numbers(folder, prefix):
                problems.append(
                    f"{folder / f'{prefix}{number}'} is unfinished: a backup or retention "
                    "running now, or one interrupted (recovery removes it)"
                )
        return versions, problems

    def _scan(self, guest: str | None) -> tuple[list[VersionInfo], list[str]]:
        if guest is not None:
            folder = self._guest_dir(guest)
            return self._scan_versions(guest, folder) if folder else ([], [])
        folders, problems = self._scan_guests()
        versions: list[VersionInfo] = []
        for name, folder in sorted(folders.items()):
            found, trouble = self._scan_versions(name, folder)
            versions += found
            problems += trouble
        return versions, problems

    def versions(self, guest: str | None = None) -> list[VersionInfo]:
        """Committed, readable versions sorted by guest and number.

        Unfinished versions are never listed. Nor is a version whose manifest
        cannot be read: ``problems()`` names it and ``verify`` fails it.
        """
        return self._scan(guest)[0]

    def problems(self, guest: str | None = None) -> list[str]:
        """What ``versions`` had to leave out or found left over, one line each."""
        return self._scan(guest)[1]

    def version(self, guest: str, number: int) -> VersionInfo:
        folder = self._guest_dir(guest)
        numbers = self._numbers(folder) if folder else []
        if folder is None or number not in numbers:
            raise NotFoundError(
                f"guest {printable(guest)} has no version {number} in {self.root} "
                f"(versions: {_join(numbers)})"
            )
        path = folder / str(number)
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise ArchiveError(f"version {number} of {printable(guest)}, {path}, is {_kind(st)}")
        return self._read_version(guest, path)

    def latest(self, guest: str) -> VersionInfo | None:
        found = self.versions(guest)
        return found[-1] if found else None

    # --- writing -------------------------------------------------------------

    def _read_counter(self, folder: Path) -> int:
        try:
            value = _read_small(folder / COUNTER_FILE).decode("ascii").strip()
        except (OSError, UnicodeDecodeError):
            return 0
        # A damaged counter falls back to the folders present: reusing the number of a
        # deleted version is far less harmful than refusing to back up.
        return int(value) if _NUMBER.fullmatch(value) else 0

    def begin(self, guest: str) -> PartialVersion:
        """Start a new version of ``guest`` in ``.partial-<n>``.

        ``n`` is greater than any number this guest ever used, including versions
        deleted since and partials discarded: a number always means one backup.
        """
        if not os.path.isfile(self.root / MARKER):
            # An unmounted device leaves an empty mount point behind; a backup written
            # there would fill the wrong disk and vanish at the next mount.
            raise ArchiveError(
                f"{self.root} no longer holds archive {self.archive_id} (no {MARKER}); "
                "was the device unmounted?"
            )
        folder = self._guest_dir(guest, create=True)
        assert folder is not None
        used = [self._read_counter(folder)]
        for prefix in ("", PARTIAL_PREFIX, DELETING_PREFIX):
            used += self._numbers(folder, prefix)
        number = max(used) + 1
        while True:
            # The counter is durable before the number is used, so no crash can hand
            # the same number out twice.
            atomic_write_bytes(folder / COUNTER_FILE, f"{number}\n".encode(), FILE_MODE)
            path = folder / f"{PARTIAL_PREFIX}{number}"
            try:
                _mkdir_private(path)
            except FileExistsError:
                number += 1  # another writer raced us despite the lock; never share
                continue
            fsync_dir(folder)
            return PartialVersion(self, guest, number, path)

    # --- verify --------------------------------------------------------------

    def _targets(self, guest: str | None, number: int | None) -> list[tuple[str, Path, int]]:
        """(guest, guest folder, number) of every version folder to verify."""
        if guest is None:
            if number is not None:
                raise ArchiveError("verify: a version number needs a guest")
            folders = self._scan_guests()[0]
        else:
            folder = self._guest_dir(guest)
            folders = {guest: folder} if folder else {}
        targets = [(g, f, n) for g, f in sorted(folders.items()) for n in self._numbers(f)]
        if number is not None:
            chosen = [t for t in targets if t[2] == number]
            if not chosen:
                raise NotFoundError(
                    f"guest {printable(str(guest))} has no version {number} in {self.root} "
                    f"(versions: {_join([t[2] for t in targets])})"
                )
            return chosen
        if guest is not None and not targets:
            raise NotFoundError(f"guest {printable(guest)} has no versions in {self.root}")
        return targets

    def verify(
        self,
        guest: str | None = None,
        number: int | None = None,
        *,
        progress: ProgressFn | None = None,
        cancel: threading.Event | None = None,
    ) -> list[VerifyReport]:
        """Re-read and hash every file of the chosen versions (all of them by default).

        Each result is recorded in the version's ``verified.json``. ``progress`` gets
        bytes done and total over the whole call. A set ``cancel`` stops with
        CopyError and records nothing for the version it interrupted.
        """
        checks = [self._check(g, f / str(n), n) for g, f, n in self._targets(guest, number)]
        total = sum(job.size for check in checks for job in check.jobs)
        done = 0
        reports = []
        for check in checks:
            for job in check.jobs:
                done = self._hash(check, job, done, total, progress, cancel)
            reports.append(self._record(check))
        return reports

    def _check(self, guest: str, folder: Path, number: int) -> _Check:
        """Everything about one version that needs no hashing, and the files to hash."""
        check = _Check(guest, number, folder, [], [])
        st = lstat_or_none(folder)
        if st is None or not stat.S_ISDIR(st.st_mode):
            kind = "gone (deleted meanwhile?)" if st is None else _kind(st)
            check.problems.append(f"version folder {folder} is {kind}")
            check.record = False
            return check
        try:
            manifest = Manifest.from_json(
                _read_small(folder / MANIFEST_FILE), version=number, path=folder / MANIFEST_FILE
            )
        except OSError as exc:
            check.problems.append(f"{MANIFEST_FILE}: unreadable ({exc.strerror or exc})")
            return check
        except ArchiveError as exc:
            check.problems.append(f"{MANIFEST_FILE}: {exc.message}")
            return check
        if manifest.guest != guest:
            check.problems.append(
                f"{MANIFEST_FILE}: names guest {printable(manifest.guest)}, but the folder "
                f"belongs to {printable(guest)}"
            )
        self._check_entries(check, manifest)
        return check

    def _check_entries(self, check: _Check, manifest: Manifest) -> None:
        expected: dict[str, tuple[str, int | None]] = {
            r.file: (r.blake3, r.size) for r in manifest.records
        }
        if manifest.domain_xml_blake3 is not None:  # always, in a valid manifest
            expected[DOMAIN_XML_FILE] = (manifest.domain_xml_blake3, None)
        present: dict[str, os.stat_result] = {}
        entries = sorted(os.listdir(check.folder))
        for name in entries:
            st = os.lstat(check.folder / name)
            if not stat.S_ISREG(st.st_mode):
                check.problems.append(f"{printable(name)} is {_kind(st)}")
            elif name not in expected and name not in RESERVED_FILES:
                check.problems.append(f"{printable(name)}: unexpected file")
            else:
                present[name] = st
        for name in [*expected, B3SUMS_FILE]:
            if name not in entries:
                check.problems.append(f"{name}: missing")
        for name, (digest, size) in expected.items():
            st_file = present.get(name)
            if st_file is None:
                continue
            if size is not None and st_file.st_size != size:
                check.problems.append(f"{name}: size {st_file.st_size} != {size}")
                continue
            check.jobs.append(_HashJob(name, check.folder / name, digest, st_file.st_size))
        if B3SUMS_FILE in present:
            self._check_b3sums(check, manifest)

    @staticmethod
    def _check_b3sums(check: _Check, manifest: Manifest) -> None:
        try:
            text = _read_small(check.folder / B3SUMS_FILE)
        except OSError as exc:
            check.problems.append(f"{B3SUMS_FILE}: unreadable ({exc.strerror or exc})")
            return
        if text != b3sums_text(manifest).encode():
            check.problems.append(f"{B3SUMS_FILE}: does not match {MANIFEST_FILE}")

    @staticmethod
    def _hash(
        check: _Check,
        job: _HashJob,
        done: int,
        total: int,
        progress: ProgressFn | None,
        cancel: threading.Event | None,
    ) -> int:
        item = f"version {check.number}: {job.file}"

        def report(file_done: int, file_total: int) -> None:
            # hash_file counts data bytes only (holes cost nothing); scale them to the
            # file's length, which is what the total is made of.
            if progress is not None and file_total:
                progress(
                    Progress(check.guest, item, done + file_done * job.size // file_total, total)
                )

        try:
            actual = hash_file(job.path, progress=report, cancel=cancel)
        except CopyError as exc:
            if cancel is not None and cancel.is_set():
                raise
            check.problems.append(f"{job.file}: read error ({exc.message})")
            return done + job.size
        if actual != job.expected:
            check.problems.append(
                f"{job.file}: blake3 mismatch (expected {job.expected[:16]}.., got {actual[:16]}..)"
            )
        if progress is not None:
            progress(Progress(check.guest, item, done + job.size, total))
        return done + job.size

    @staticmethod
    def _record(check: _Check) -> VerifyReport:
        report = VerifyReport(check.guest, check.number, not check.problems, check.problems)
        if not check.record:
            return report
        data = {"ok": report.ok, "at": _now(), "problems": report.problems}
        try:
            atomic_write_bytes(
                check.folder / VERIFIED_FILE,
                (json.dumps(data, indent=2) + "\n").encode(),
                FILE_MODE,
            )
        except OSError as exc:
            # A read-only mount can still be verified; there is just nowhere to note it.
            # A folder deleted meanwhile (retention in another run) needs no note.
            if exc.errno not in (errno.EROFS, errno.ENOENT):
                raise ArchiveError(
                    f"verified version {check.number} of {printable(check.guest)} but could "
                    f"not record it in {check.folder / VERIFIED_FILE}: {exc.strerror or exc}"
                ) from exc
        return report

    # --- retention and recovery ------------------------------------------------

    def apply_retention(self, guest: str, keep: int) -> list[int]:
        """Delete the oldest versions beyond ``keep``; return their numbers.

        Never deletes the newest version, nor the newest one whose last
        verification passed: with an old verified version kept, ``keep + 1``
        versions remain. Call it only after the new version is committed.
        """
        if keep < 1:
            raise ArchiveError(f"keep must be at least 1 for guest {printable(guest)}, not {keep}")
        folder = self._guest_dir(guest)
        if folder is None:
            return []
        # Only real folders: a symlink named like a version is not ours to delete.
        numbers = [
            n for n in self._numbers(folder) if stat.S_ISDIR(os.lstat(folder / str(n)).st_mode)
        ]
        protected = set(numbers[-1:])
        verified = [n for n in numbers if _read_verified(folder / str(n)) is True]
        protected.update(verified[-1:])
        doomed = [n for n in numbers[: max(len(numbers) - keep, 0)] if n not in protected]
        for number in doomed:
            self._delete(folder, number)
        return doomed

    @staticmethod
    def _delete(folder: Path, number: int) -> None:
        source = folder / str(number)
        trash = folder / f"{DELETING_PREFIX}{number}"
        _remove(trash)  # garbage from an earlier crash would block the rename
        # The rename is the deletion: atomic and durable, the version is gone from
        # every listing before a single byte is freed.
        os.rename(source, trash)
        fsync_dir(folder)
        failpoints.hit("retention.before-delete")
        # The version is already gone; whatever cannot be removed now shows in
        # problems() and recover() removes it.
        with contextlib.suppress(OSError):
            _remove(trash)

    def recover(self) -> list[Path]:
        """Remove unfinished and half-deleted versions and stray temporary files.

        Run it only while no other guestsafe process writes to this archive.
        """
        removed: list[Path] = []
        for name in os.listdir(self.root):
            if is_temp_name(name):
                removed.append(self.root / name)
        for folder in self._recoverable_guest_dirs():
            for name in os.listdir(folder):
                rest = name.removeprefix(PARTIAL_PREFIX).removeprefix(DELETING_PREFIX)
                if (rest != name and _NUMBER.fullmatch(rest)) or is_temp_name(name):
                    removed.append(folder / name)
            for number in self._numbers(folder):
                version = folder / str(number)
                if version.is_dir() and not version.is_symlink():
                    removed += [version / n for n in os.listdir(version) if is_temp_name(n)]
        for path in removed:
            _remove(path)
        return sorted(removed)

    def _recoverable_guest_dirs(self) -> list[Path]:
        # Any real folder whose name guestsafe could have made, even if its guest is
        # no longer known: its leftovers are ours either way.
        found = []
        for name in os.listdir(self.root):
            path = self.root / name
            if name.startswith(".") or path.is_symlink() or not path.is_dir():
                continue
            if is_truncated(name) or self._guest_of(path) is not None:
                found.append(path)
        return sorted(found)


class PartialVersion:
    """A version being written; invisible to every listing until ``commit``."""

    def __init__(self, archive: Archive, guest: str, number: int, path: Path) -> None:
        self.guest = guest
        self.number = number
        self.path = path
        self._archive = archive
        self._committed = False

    def _where(self) -> str:
        return f"version {self.number} of {printable(self.guest)}"

    def _check_open(self) -> None:
        if self._committed:
            raise ArchiveError(f"{self._where()} is already committed")
        st = lstat_or_none(self.path)
        if st is None or not stat.S_ISDIR(st.st_mode):
            raise ArchiveError(
                f"{self._where()}: {self.path} is gone or replaced (was recovery run while "
                "this backup was writing?)"
            )

    def file_path(self, name: str) -> Path:
        """Where the disk file ``name`` (``vda.qcow2``) goes; a plain name only."""
        if not is_safe_file_name(name):
            raise ArchiveError(
                f"{self._where()}: {name!r} is not a plain disk file name (like vda.qcow2)"
            )
        return self.path / name

    def write_domain_xml(self, xml: str) -> None:
        """Store the domain XML, 0600: it can hold console and storage passwords."""
        self._check_open()
        atomic_write_bytes(self.path / DOMAIN_XML_FILE, xml.encode("utf-8"), FILE_MODE)

    def _complete(self, record: DiskRecord) -> DiskRecord:
        """The record with its file checked and its size filled in."""
        path = self.file_path(record.file)
        st = lstat_or_none(path)
        if st is None:
            raise ArchiveError(f"{self._where()}: {record.file} is missing in {self.path}")
        if not stat.S_ISREG(st.st_mode):
            raise ArchiveError(f"{self._where()}: {record.file} is {_kind(st)}, not a file")
        if record.size is not None and record.size != st.st_size:
            raise ArchiveError(
                f"{self._where()}: {record.file} is {st.st_size} bytes, "
                f"the manifest says {record.size}"
            )
        return replace(record, size=st.st_size)

    def _domain_digest(self) -> str:
        path = self.path / DOMAIN_XML_FILE
        st = lstat_or_none(path)
        if st is None or not stat.S_ISREG(st.st_mode):
            raise ArchiveError(
                f"{self._where()}: {DOMAIN_XML_FILE} is missing in {self.path}; "
                "a version must be bootable with virsh define"
            )
        try:
            return hash_file(path)
        except CopyError as exc:
            raise ArchiveError(f"{self._where()}: {exc.message}") from exc

    def _check_no_strays(self, wanted: set[str]) -> None:
        strays = sorted(set(os.listdir(self.path)) - wanted)
        if strays:
            raise ArchiveError(
                f"{self._where()}: {self.path} holds files the manifest does not list: "
                f"{', '.join(map(printable, strays))}"
            )

    def commit(self, manifest: Manifest) -> VersionInfo:
        """Make the version real: fsync everything, write the manifest, rename.

        ``DiskRecord.size`` and ``Manifest.domain_xml_blake3`` are filled in here
        when None, and checked when given.
        """
        self._check_open()
        if manifest.guest != self.guest:
            raise ArchiveError(
                f"{self._where()}: the manifest is of guest {printable(manifest.guest)}"
            )
        disks = [self._complete(r) for r in manifest.disks]
        nvram = self._complete(manifest.nvram) if manifest.nvram is not None else None
        digest = self._domain_digest()
        if manifest.domain_xml_blake3 not in (None, digest):
            raise ArchiveError(f"{self._where()}: {DOMAIN_XML_FILE} changed since it was hashed")
        final = replace(manifest, disks=disks, nvram=nvram, domain_xml_blake3=digest)
        try:
            text = final.to_json()
        except ArchiveError as exc:
            raise ArchiveError(f"{self._where()}: {exc.message}") from exc
        files = {r.file for r in final.records}
        # manifest.json and B3SUMS may be left by an earlier commit attempt; rewritten.
        self._check_no_strays(files | {DOMAIN_XML_FILE, MANIFEST_FILE, B3SUMS_FILE})
        for name in sorted(files):
            # The copier fsyncs too; this pass also covers files QEMU wrote (push backup).
            fsync_file(self.path / name)
        failpoints.hit("commit.before-manifest")
        atomic_write_bytes(self.path / B3SUMS_FILE, b3sums_text(final).encode(), FILE_MODE)
        atomic_write_bytes(self.path / MANIFEST_FILE, text.encode(), FILE_MODE)
        fsync_dir(self.path)
        failpoints.hit("commit.before-rename")
        target = self.path.parent / str(self.number)
        if os.path.lexists(target):
            raise ArchiveError(f"{self._where()}: {target} already exists; refusing to replace it")
        os.rename(self.path, target)
        self._committed = True
        fsync_dir(self.path.parent)
        failpoints.hit("commit.after-rename")
        return self._archive.version(self.guest, self.number)

    def discard(self) -> None:
        """Remove the unfinished version; a no-op once committed or already gone."""
        if self._committed:
            return
        _remove(self.path)
