"""A version being written: the ``.partial-<n>`` folder and its commit.

A version exists once its folder is renamed from ``.partial-<n>`` to ``<n>``,
after every file and the manifest are fsynced (FORMAT.md, "10. Writing a version").
"""

from __future__ import annotations

import os
import stat
from dataclasses import replace
from pathlib import Path
from typing import Protocol, TypeVar

import blake3

from guestsafe.engine import failpoints
from guestsafe.engine.archive.chunks import table_bytes, table_file_name
from guestsafe.engine.archive.layout import FILE_MODE, kind_of, remove
from guestsafe.engine.archive.manifest import (
    B3SUMS_FILE,
    DOMAIN_XML_FILE,
    MANIFEST_FILE,
    ChainFile,
    ChunkRef,
    DiskRecord,
    Manifest,
    b3sums_text,
    is_safe_file_name,
)
from guestsafe.engine.archive.names import printable
from guestsafe.engine.archive.versions import VersionInfo
from guestsafe.engine.copier import ChunkTable, hash_file
from guestsafe.engine.errors import ArchiveError, CopyError
from guestsafe.engine.fsutil import atomic_write_bytes, fsync_dir, fsync_file, lstat_or_none

_Sized = TypeVar("_Sized", DiskRecord, ChainFile)


class VersionLookup(Protocol):
    """How a committed version is read back: ``Archive.version``."""

    def version(self, guest: str, number: int) -> VersionInfo: ...


class PartialVersion:
    """A version being written; invisible to every listing until ``commit``."""

    def __init__(self, archive: VersionLookup, guest: str, number: int, path: Path) -> None:
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

    def write_chunk_table(self, name: str, table: ChunkTable | None) -> ChunkRef | None:
        """Store the chunk table of the disk file ``name`` beside it (``name.chunks``).

        None in, None out: a file copied without a table is verified whole.
        """
        if table is None:
            return None
        self._check_open()
        self.file_path(name)  # the same plain-name check as the file's own
        data = table_bytes(table)
        table_name = table_file_name(name)
        atomic_write_bytes(self.path / table_name, data, FILE_MODE)
        return ChunkRef(table_name, table.chunk_size, str(blake3.blake3(data).hexdigest()))

    def write_domain_xml(self, xml: str) -> None:
        """Store the domain XML, 0600: it can hold console and storage passwords."""
        self._check_open()
        atomic_write_bytes(self.path / DOMAIN_XML_FILE, xml.encode("utf-8"), FILE_MODE)

    def _complete(self, record: DiskRecord) -> DiskRecord:
        """The record, and its kept backing files, with each file checked and sized."""
        chain = tuple(self._sized(layer) for layer in record.chain)
        return replace(self._sized(record), chain=chain)

    def _sized(self, record: _Sized) -> _Sized:
        """The file checked and its size filled in."""
        path = self.file_path(record.file)
        st = lstat_or_none(path)
        if st is None:
            raise ArchiveError(f"{self._where()}: {record.file} is missing in {self.path}")
        if not stat.S_ISREG(st.st_mode):
            raise ArchiveError(f"{self._where()}: {record.file} is {kind_of(st)}, not a file")
        if record.size is not None and record.size != st.st_size:
            raise ArchiveError(
                f"{self._where()}: {record.file} is {st.st_size} bytes, "
                f"the manifest says {record.size}"
            )
        if record.chunks is not None and lstat_or_none(self.path / record.chunks.file) is None:
            raise ArchiveError(f"{self._where()}: {record.chunks.file} is missing in {self.path}")
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
        if manifest.series != self.guest:
            raise ArchiveError(
                f"{self._where()}: the manifest is of guest {printable(manifest.guest)}"
            )
        disks = [self._complete(r) for r in manifest.disks]
        nvram = self._complete(manifest.nvram) if manifest.nvram is not None else None
        digest = self._domain_digest()
        if manifest.domain_xml_blake3 not in (None, digest):
            raise ArchiveError(f"{self._where()}: {DOMAIN_XML_FILE} changed since it was hashed")
        tpm = manifest.tpm
        if tpm is not None:
            tpm = replace(tpm, files=[self._complete(r) for r in tpm.files])
        final = replace(manifest, disks=disks, nvram=nvram, tpm=tpm, domain_xml_blake3=digest)
        try:
            text = final.to_json()
        except ArchiveError as exc:
            raise ArchiveError(f"{self._where()}: {exc.message}") from exc
        files = {r.file for r in final.files}
        files |= {r.chunks.file for r in final.files if r.chunks is not None}
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
        remove(self.path)
