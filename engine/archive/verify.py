"""Verification: re-read every file of a version and hash it against its manifest.

``check_version`` finds everything that needs no hashing (missing, unexpected or
non-regular files, sizes, B3SUMS) and lists the files to hash; ``hash_job`` hashes
one; ``record`` writes the result to the version's ``verified.json``.
``Archive.verify`` runs them over the versions chosen.

A format-3 file is checked against its chunk table (``chunks.verify_file``):
data chunks read in parallel, holes not read, a mismatch named by offset. The
table is first checked against its digest in the manifest; a damaged table is
reported and the file then checked whole. Its whole-file BLAKE3, computed from
the same bytes by the same read when the version was written, is checked by every
restore and by ``b3sum --check B3SUMS``. Files of formats 1 and 2 are checked whole.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from guestsafe.engine.archive.chunks import TableError, file_digest, verify_file
from guestsafe.engine.archive.layout import FILE_MODE, kind_of, now, read_small
from guestsafe.engine.archive.manifest import (
    B3SUMS_FILE,
    DOMAIN_XML_FILE,
    MANIFEST_FILE,
    RESERVED_FILES,
    VERIFIED_FILE,
    ChunkRef,
    Manifest,
    b3sums_text,
)
from guestsafe.engine.archive.names import printable
from guestsafe.engine.copier import hash_file
from guestsafe.engine.errors import ArchiveError, CopyError, VerifyError
from guestsafe.engine.events import Progress
from guestsafe.engine.fsutil import atomic_write_bytes, lstat_or_none

ProgressFn = Callable[[Progress], None]


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


@dataclass
class HashJob:
    file: str
    path: Path
    expected: str
    size: int
    chunks: ChunkRef | None = None


@dataclass
class Check:
    """One version's verification: problems found so far and files left to hash."""

    guest: str
    number: int
    folder: Path
    problems: list[str]
    jobs: list[HashJob]
    record: bool = True  # False when the folder is not ours to write into


def check_version(guest: str, folder: Path, number: int) -> Check:
    """Everything about one version that needs no hashing, and the files to hash."""
    check = Check(guest, number, folder, [], [])
    st = lstat_or_none(folder)
    if st is None or not stat.S_ISDIR(st.st_mode):
        kind = "gone (deleted meanwhile?)" if st is None else kind_of(st)
        check.problems.append(f"version folder {folder} is {kind}")
        check.record = False
        return check
    try:
        manifest = Manifest.from_json(
            read_small(folder / MANIFEST_FILE), version=number, path=folder / MANIFEST_FILE
        )
    except OSError as exc:
        check.problems.append(f"{MANIFEST_FILE}: unreadable ({exc.strerror or exc})")
        return check
    except ArchiveError as exc:
        check.problems.append(f"{MANIFEST_FILE}: {exc.message}")
        return check
    if manifest.series != guest:
        check.problems.append(
            f"{MANIFEST_FILE}: names guest {printable(manifest.guest)}, but the folder "
            f"belongs to {printable(guest)}"
        )
    _check_entries(check, manifest)
    return check


def _check_entries(check: Check, manifest: Manifest) -> None:
    expected: dict[str, tuple[str, int | None]] = {
        r.file: (r.blake3, r.size) for r in manifest.files
    }
    tables = {r.file: r.chunks for r in manifest.files if r.chunks is not None}
    table_files = {ref.file for ref in tables.values()}
    if manifest.domain_xml_blake3 is not None:  # always, in a valid manifest
        expected[DOMAIN_XML_FILE] = (manifest.domain_xml_blake3, None)
    present: dict[str, os.stat_result] = {}
    entries = sorted(os.listdir(check.folder))
    for name in entries:
        st = os.lstat(check.folder / name)
        if not stat.S_ISREG(st.st_mode):
            check.problems.append(f"{printable(name)} is {kind_of(st)}")
        elif name not in expected and name not in RESERVED_FILES and name not in table_files:
            check.problems.append(f"{printable(name)}: unexpected file")
        else:
            present[name] = st
    for name in [*expected, *sorted(table_files), B3SUMS_FILE]:
        if name not in entries:
            check.problems.append(f"{name}: missing")
    for name, (digest, size) in expected.items():
        st_file = present.get(name)
        if st_file is None:
            continue
        if size is not None and st_file.st_size != size:
            check.problems.append(f"{name}: size {st_file.st_size} != {size}")
            continue
        chunks = tables.get(name)
        if chunks is not None and chunks.file not in present:
            chunks = None  # reported missing above; the file itself is checked whole
        check.jobs.append(HashJob(name, check.folder / name, digest, st_file.st_size, chunks))
    if B3SUMS_FILE in present:
        _check_b3sums(check, manifest)


def _check_b3sums(check: Check, manifest: Manifest) -> None:
    try:
        text = read_small(check.folder / B3SUMS_FILE)
    except OSError as exc:
        check.problems.append(f"{B3SUMS_FILE}: unreadable ({exc.strerror or exc})")
        return
    if text != b3sums_text(manifest).encode():
        check.problems.append(f"{B3SUMS_FILE}: does not match {MANIFEST_FILE}")


def hash_job(
    check: Check,
    job: HashJob,
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
            progress(Progress(check.guest, item, done + file_done * job.size // file_total, total))

    if job.chunks is not None and _table_intact(check, job.chunks):
        _verify_chunks(check, job, job.chunks, lambda n: report(n, job.size), cancel)
    else:
        _verify_whole(check, job, report, cancel)
    if progress is not None:
        progress(Progress(check.guest, item, done + job.size, total))
    return done + job.size


def _table_intact(check: Check, ref: ChunkRef) -> bool:
    """The table matches its digest in the manifest; otherwise reported, and False."""
    try:
        actual = file_digest(check.folder / ref.file)
    except OSError as exc:
        check.problems.append(f"{ref.file}: read error ({exc.strerror or exc})")
        return False
    if actual == ref.blake3:
        return True
    check.problems.append(
        f"{ref.file}: blake3 mismatch (expected {ref.blake3[:16]}.., got {actual[:16]}..): "
        f"the chunk table was edited or is damaged; its file is checked whole instead"
    )
    return False


def _verify_chunks(
    check: Check,
    job: HashJob,
    ref: ChunkRef,
    report: Callable[[int], None],
    cancel: threading.Event | None,
) -> None:
    try:
        found = verify_file(
            job.path, job.file, check.folder / ref.file, ref.chunk_size,
            progress=report, cancel=cancel,
        )  # fmt: skip
    except TableError as exc:
        check.problems.append(f"{ref.file}: {exc}")
        return
    except OSError as exc:
        check.problems.append(f"{job.file}: read error ({exc.strerror or exc})")
        return
    check.problems += found.problems


def _verify_whole(
    check: Check,
    job: HashJob,
    report: Callable[[int, int], None],
    cancel: threading.Event | None,
) -> None:
    try:
        actual = hash_file(job.path, progress=report, cancel=cancel)
    except CopyError as exc:
        if cancel is not None and cancel.is_set():
            raise
        check.problems.append(f"{job.file}: read error ({exc.message})")
        return
    if actual != job.expected:
        check.problems.append(
            f"{job.file}: blake3 mismatch (expected {job.expected[:16]}.., got {actual[:16]}..)"
        )


def record(check: Check) -> VerifyReport:
    report = VerifyReport(check.guest, check.number, not check.problems, check.problems)
    if not check.record:
        return report
    data = {"ok": report.ok, "at": now(), "problems": report.problems}
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
