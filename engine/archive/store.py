"""The archive: versioned folders of plain disk files, format v1 (FORMAT.md).

``Archive`` opens an archive, finds its guests and lists their versions, begins
new ones, and runs verification, retention and recovery over them. The pieces
live beside it: ``layout`` (names and safe file access), ``versions`` (reading a
committed version), ``partial`` (writing one), ``verify`` and ``retention``.

A version exists once its folder is renamed from ``.partial-<n>`` to ``<n>``,
after every file and the manifest are fsynced. Nothing else in a committed
version is ever rewritten; verification results live in a ``verified.json``
sidecar next to the manifest.

One process writes to an archive at a time: the runner holds the lock kept in
the archive (``locks.archive_lock``, FORMAT.md 10.4), whichever host or path it
comes from. ``recover`` removes unfinished versions without asking whose they
are, so call it only with that lock held. Reading is safe at any time.
"""

from __future__ import annotations

import json
import os
import stat
import threading
import uuid as uuidlib
from collections.abc import Mapping
from datetime import tzinfo
from pathlib import Path
from typing import Any

from guestsafe.engine.archive.calendar_retention import (
    RULES,
    Candidate,
    RetentionPolicy,
    keep_reasons,
)
from guestsafe.engine.archive.layout import (
    COUNTER_FILE,
    DELETING_PREFIX,
    DIR_MODE,
    FILE_MODE,
    GUEST_NAME_FILE,
    NUMBER,
    PARTIAL_PREFIX,
    join_numbers,
    kind_of,
    mkdir_private,
    now,
    read_small,
    remove,
    version_numbers,
)
from guestsafe.engine.archive.manifest import ARCHIVE_FORMAT, MANIFEST_FILE, Manifest
from guestsafe.engine.archive.names import (
    decode_guest_dir,
    encode_guest_name,
    is_truncated,
    matches,
    printable,
)
from guestsafe.engine.archive.partial import PartialVersion
from guestsafe.engine.archive.retention import candidates, keep_in_use, plan, prune
from guestsafe.engine.archive.verify import (
    ProgressFn,
    VerifyReport,
    check_version,
    hash_job,
    record,
)
from guestsafe.engine.archive.versions import VersionInfo, read_version
from guestsafe.engine.errors import ArchiveError, NotFoundError
from guestsafe.engine.fsutil import atomic_write_bytes, fsync_dir, is_temp_name, lstat_or_none

MARKER = "guestsafe-archive.json"


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
            data = {"format": ARCHIVE_FORMAT, "archive_id": str(uuidlib.uuid4()), "created": now()}
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
            data = json.loads(read_small(marker))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ArchiveError(f"archive marker {marker} is unreadable: {exc}") from exc
        if not isinstance(data, dict):
            data = {}
        fmt = data.get("format")
        if type(fmt) is int and fmt > ARCHIVE_FORMAT:
            raise ArchiveError(
                f"archive {marker.parent} uses format {fmt}, newer than this guestsafe "
                f"reads ({ARCHIVE_FORMAT}); use a guestsafe release that reads format {fmt}"
            )
        if not (
            type(fmt) is int
            and fmt == ARCHIVE_FORMAT
            and data.keys() == {"format", "archive_id", "created"}
            and _is_uuid(data["archive_id"])
            and isinstance(data["created"], str)
        ):
            raise ArchiveError(
                f"archive marker {marker} is damaged: expected exactly format "
                f"{ARCHIVE_FORMAT}, archive_id (a UUID) and created"
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
            stored = read_small(folder / GUEST_NAME_FILE).decode("utf-8", "surrogatepass")
        except (OSError, UnicodeDecodeError):
            stored = ""
        if matches(stored, folder.name):
            return stored
        # guest-name lost: any manifest in the folder names the guest as well.
        for number in version_numbers(folder):
            try:
                manifest = Manifest.from_json(read_small(folder / str(number) / MANIFEST_FILE))
            except (OSError, ArchiveError):
                continue
            if matches(manifest.series, folder.name):
                return manifest.series
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
                mkdir_private(path)
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
                f"the folder of guest {printable(guest)}, {path}, is {kind_of(st)}; "
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
            stored = read_small(folder / GUEST_NAME_FILE)
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

    def _scan_versions(self, guest: str, folder: Path) -> tuple[list[VersionInfo], list[str]]:
        versions: list[VersionInfo] = []
        problems: list[str] = []
        for number in version_numbers(folder):
            path = folder / str(number)
            try:
                st = os.lstat(path)
                if not stat.S_ISDIR(st.st_mode):
                    problems.append(
                        f"version {number} of {printable(guest)}, {path}, is {kind_of(st)}"
                    )
                    continue
                versions.append(read_version(guest, path))
            except FileNotFoundError:
                continue  # deleted by retention while we looked
            except ArchiveError as exc:
                problems.append(exc.message)
        for prefix in (PARTIAL_PREFIX, DELETING_PREFIX):
            for number in version_numbers(folder, prefix):
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
        numbers = version_numbers(folder) if folder else []
        if folder is None or number not in numbers:
            raise NotFoundError(
                f"guest {printable(guest)} has no version {number} in {self.root} "
                f"(versions: {join_numbers(numbers)})"
            )
        path = folder / str(number)
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise ArchiveError(f"version {number} of {printable(guest)}, {path}, is {kind_of(st)}")
        return read_version(guest, path)

    def latest(self, guest: str) -> VersionInfo | None:
        found = self.versions(guest)
        return found[-1] if found else None

    # --- writing -------------------------------------------------------------

    def _read_counter(self, folder: Path) -> int:
        try:
            value = read_small(folder / COUNTER_FILE).decode("ascii").strip()
        except (OSError, UnicodeDecodeError):
            return 0
        # A damaged counter falls back to the folders present: reusing the number of a
        # deleted version is far less harmful than refusing to back up.
        return int(value) if NUMBER.fullmatch(value) else 0

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
            used += version_numbers(folder, prefix)
        number = max(used) + 1
        while True:
            # The counter is durable before the number is used, so no crash can hand
            # the same number out twice.
            atomic_write_bytes(folder / COUNTER_FILE, f"{number}\n".encode(), FILE_MODE)
            path = folder / f"{PARTIAL_PREFIX}{number}"
            try:
                mkdir_private(path)
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
        targets = [(g, f, n) for g, f in sorted(folders.items()) for n in version_numbers(f)]
        if number is not None:
            chosen = [t for t in targets if t[2] == number]
            if not chosen:
                raise NotFoundError(
                    f"guest {printable(str(guest))} has no version {number} in {self.root} "
                    f"(versions: {join_numbers([t[2] for t in targets])})"
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
        checks = [check_version(g, f / str(n), n) for g, f, n in self._targets(guest, number)]
        total = sum(job.size for check in checks for job in check.jobs)
        done = 0
        reports = []
        for check in checks:
            for job in check.jobs:
                done = hash_job(check, job, done, total, progress, cancel)
            reports.append(record(check))
        return reports

    # --- retention and recovery ------------------------------------------------

    def apply_retention(
        self,
        guest: str,
        keep: int | RetentionPolicy,
        in_use: Mapping[int, list[str]] | None = None,
    ) -> list[int]:
        """Delete the versions no rule keeps, and bad ones it outlived; their numbers.

        ``keep`` is a ``RetentionPolicy`` or, as before calendar rules, a count of
        good versions (``keep_last``). Never deletes the newest version, nor the
        newest one whose last verification passed, nor one ``in_use`` names
        (number -> instant-boot clones reading it). Call it only after the new
        version is committed.
        """
        policy = _as_policy(guest, keep)
        folder = self._guest_dir(guest)
        return [] if folder is None else prune(folder, guest, policy, in_use)

    def retention_plan(
        self,
        guest: str,
        policy: RetentionPolicy,
        tz: tzinfo | None = None,
        in_use: Mapping[int, list[str]] | None = None,
    ) -> dict[int, list[str]]:
        """Per version of ``guest``, the rules that keep it (empty: it goes); deletes nothing."""
        folder = self._guest_dir(guest)
        return {} if folder is None else plan(folder, guest, policy, tz, in_use)

    def retention_rows(
        self,
        guest: str,
        policy: RetentionPolicy,
        in_use: Mapping[int, list[str]] | None = None,
    ) -> list[tuple[Candidate, list[str]]]:
        """Each version of ``guest``, newest first, with the rules that keep it; for a dry run."""
        folder = self._guest_dir(guest)
        if folder is None:
            return []
        found = candidates(folder, guest)
        reasons = keep_in_use(keep_reasons(found, policy), in_use)
        return [(c, reasons[c.number]) for c in reversed(found)]

    def recover(self) -> list[Path]:
        """Remove unfinished and half-deleted versions and stray temporary files.

        Run it only while holding the archive's lock (``locks.archive_lock``):
        then no other guestsafe process, on any host, writes to this archive.
        """
        removed: list[Path] = []
        for name in os.listdir(self.root):
            if is_temp_name(name):
                removed.append(self.root / name)
        for folder in self._recoverable_guest_dirs():
            for name in os.listdir(folder):
                rest = name.removeprefix(PARTIAL_PREFIX).removeprefix(DELETING_PREFIX)
                if (rest != name and NUMBER.fullmatch(rest)) or is_temp_name(name):
                    removed.append(folder / name)
            for number in version_numbers(folder):
                version = folder / str(number)
                if version.is_dir() and not version.is_symlink():
                    removed += [version / n for n in os.listdir(version) if is_temp_name(n)]
        for path in removed:
            remove(path)
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


def _as_policy(guest: str, keep: int | RetentionPolicy) -> RetentionPolicy:
    if isinstance(keep, int):
        if keep < 1:
            raise ArchiveError(f"keep must be at least 1 for guest {printable(guest)}, not {keep}")
        return RetentionPolicy(last=keep)
    policy = keep
    counts = [policy.count(rule) for rule in RULES]
    if min(counts) < 0 or sum(counts) < 1:
        raise ArchiveError(f"retention for guest {printable(guest)} keeps no version: {policy}")
    return policy
