"""manifest.json: what a version holds and the BLAKE3 of every file in it.

The JSON layout is archive format 3, specified in FORMAT.md ("manifest.json");
formats 1 and 2 (no chunk tables) are still read.
Reading is strict: unknown format versions, unknown or missing keys, wrong types
and unsafe file names are refused. A manifest is a safety record; a reader that
skipped what it did not understand could call a version sound on grounds it never
checked. ``to_json`` validates too, so guestsafe never writes a manifest it would
refuse to read.
"""

from __future__ import annotations

import json
import math
import re
import uuid as uuidlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

from guestsafe.engine.archive.names import printable, series_name
from guestsafe.engine.errors import ArchiveError
from guestsafe.engine.modes import Mode, parse_mode

FORMAT_VERSION = 1  # the manifest of a plain version
# The archive's marker (guestsafe-archive.json) keeps format 1: a newer version is
# refused on its own by an older guestsafe, the older versions beside it stay readable.
ARCHIVE_FORMAT = FORMAT_VERSION
# A manifest with the guest's device state and firmware facts (tpm, firmware,
# not_copied) is format 2: a reader of format 1 alone would restore such a
# version without its TPM state, so it must refuse it (FORMAT.md, section 1).
DEVICE_STATE_FORMAT = 2
# A manifest whose files have chunk tables (``chunks``) is format 3, which includes
# format 2: a reader of format 2 alone would refuse the unknown key with a message
# that hides what it lacks; the format number says it.
CHUNK_TABLE_FORMAT = 3
MANIFEST_FORMATS = (FORMAT_VERSION, DEVICE_STATE_FORMAT, CHUNK_TABLE_FORMAT)

MANIFEST_FILE = "manifest.json"
DOMAIN_XML_FILE = "domain.xml"
VERIFIED_FILE = "verified.json"
B3SUMS_FILE = "B3SUMS"
# The last restore test's record and screenshot (FORMAT.md, 9.1): records about the
# version like verified.json, outside the manifest and B3SUMS.
RESTORE_TEST_FILE = "restore-test.json"
# The screenshot's name by the image type libvirt hands back (QEMU gives PPM, newer PNG).
SCREENSHOT_FILES = {"image/png": "restore-test.png", "image/x-portable-pixmap": "restore-test.ppm"}
# Files of a version that are not disk images; a disk file may not take these names,
# compared case-insensitively because exFAT and NTFS fold case.
RESERVED_FILES = (
    MANIFEST_FILE,
    DOMAIN_XML_FILE,
    VERIFIED_FILE,
    B3SUMS_FILE,
    RESTORE_TEST_FILE,
    *SCREENSHOT_FILES.values(),
)

_RESERVED_LOWER = frozenset(r.lower() for r in RESERVED_FILES)
_SAFE_FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_BLAKE3 = re.compile(r"[0-9a-f]{64}")
_FORMAT_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
# What a disk's source was (libvirt's <disk type=...>). "file" is the default and is
# not written, so manifests of file disks read the same as before block disks came.
SOURCE_KINDS = ("file", "block")


def is_safe_file_name(name: str) -> bool:
    """A plain file name a version may hold: no path, no hidden file, no reserved name.

    Deliberately narrower than "no '/' and no '..'": these names end up in
    B3SUMS lines and shell commands people type years later.
    """
    return (
        _SAFE_FILE.fullmatch(name) is not None
        and not name.endswith(".")
        and name.lower() not in _RESERVED_LOWER
    )


@dataclass(frozen=True)
class ChunkRef:
    """A file's chunk table (format 3): ``file`` (``vda.qcow2.chunks``) and its BLAKE3.

    The digest protects the table: an edited table does not match it.
    """

    file: str
    chunk_size: int
    blake3: str


@dataclass(frozen=True)
class ChainFile:
    """A backing file of a disk kept with its chain (``chain = "keep"``).

    ``backing`` is the name, inside the version, of the file beneath this one,
    None for the base; the qcow2 header of the archived file says the same.
    """

    file: str
    source: str  # where it was on the host
    format: str
    backing: str | None
    blake3: str
    size: int | None = None
    chunks: ChunkRef | None = None


@dataclass(frozen=True)
class DiskRecord:
    """One disk (or the NVRAM) as copied into a version.

    ``size`` is the length in bytes of ``file`` (what ``b3sum`` hashes). The copier
    may leave it None; ``PartialVersion.commit`` fills it in from the file, and a
    committed manifest always has it.
    """

    target: str
    source: str
    format: str
    virtual_size: int
    allocated_size: int
    file: str
    blake3: str
    size: int | None = None
    source_kind: str = "file"  # "block": ``source`` is a block device (LV, zvol, partition)
    # The backing files beneath ``file``, top down (chain = "keep"); empty otherwise.
    chain: tuple[ChainFile, ...] = ()
    # A <disk type='volume'>: the libvirt storage pool and volume ``source`` resolved from.
    pool: str | None = None
    volume: str | None = None
    chunks: ChunkRef | None = None  # format 3

    @property
    def backing(self) -> str | None:
        """The name, inside the version, of the file ``file`` is an overlay on."""
        return self.chain[0].file if self.chain else None


# A file a version holds: a disk, the NVRAM, or a backing file of a kept chain.
ArchivedFile = DiskRecord | ChainFile


@dataclass(frozen=True)
class TpmRecord:
    """An emulated TPM's state (swtpm's files), copied while the guest was off."""

    model: str
    version: str
    state_dir: str  # where swtpm keeps it on the host, e.g. /var/lib/libvirt/swtpm/<uuid>/tpm2
    files: list[DiskRecord]  # target "tpm:<name>", source the file's path on the host


@dataclass(frozen=True)
class FirmwareRecord:
    """The domain's <os> firmware facts: what a restore needs on the host."""

    loader: str | None
    loader_type: str | None
    firmware: str | None
    nvram_template: str | None
    nvram_format: str | None


@dataclass(frozen=True)
class NotCopied:
    """A disk the version records but does not hold (install media, read-only images)."""

    target: str
    source: str
    device: str
    reason: str


@dataclass(frozen=True)
class CheckpointRecord:
    """The libvirt checkpoint a push backup began, and what the version was built on.

    ``name`` is the checkpoint (a dirty bitmap in each qcow2 disk) begun with this
    version; the next backup may read only what changed since it. ``based_on`` is
    the checkpoint whose changes QEMU wrote into a reflink clone of version
    ``previous``; None for both means every block was read. ``sources`` maps each
    disk's target to the ``device:inode`` of its file then, so a disk file replaced
    since (a restore, a copy by hand) is noticed.
    """

    name: str
    based_on: str | None
    previous: int | None
    sources: dict[str, str]


@dataclass(frozen=True)
class Manifest:
    """Everything a version records about itself (see FORMAT.md).

    ``domain_xml_blake3`` is filled in by ``PartialVersion.commit``, like
    ``DiskRecord.size``.
    """

    format: int
    guest: str
    uuid: str
    host: str
    mode: Mode
    started: str
    finished: str
    downtime: float | None
    tool_version: str
    disks: list[DiskRecord]
    nvram: DiskRecord | None
    notes: list[str] = field(default_factory=list)
    domain_xml_blake3: str | None = None
    # Written only when there is something to say, so other versions read as before.
    tpm: TpmRecord | None = None
    firmware: FirmwareRecord | None = None
    not_copied: list[NotCopied] = field(default_factory=list)
    checkpoint: CheckpointRecord | None = None
    # The [hosts.NAME] the guest was backed up from; None: this machine ("local"),
    # as every manifest written before hosts existed says by leaving it out.
    host_name: str | None = None

    @property
    def series(self) -> str:
        """The archive's name for this guest: "web1" here, "node2/web1" of host node2."""
        return series_name(self.guest, self.host_name)

    @property
    def records(self) -> list[DiskRecord]:
        """The disks, the NVRAM if there is one, the TPM state: every file of the version."""
        nvram = [self.nvram] if self.nvram is not None else []
        return [*self.disks, *nvram, *(self.tpm.files if self.tpm is not None else [])]

    @property
    def files(self) -> list[ArchivedFile]:
        """Every image file of the version: each record, then its kept backing files."""
        files: list[ArchivedFile] = []
        for record in self.records:
            files += [record, *record.chain]
        return files

    def to_json(self) -> str:
        """The manifest as ASCII JSON; raises ArchiveError if it is not valid."""
        data = _to_dict(self)
        _Reader(None, None).manifest(data)
        return json.dumps(data, indent=2, ensure_ascii=True, allow_nan=False) + "\n"

    @classmethod
    def from_json(
        cls, data: str | bytes, *, version: int | None = None, path: Path | None = None
    ) -> Manifest:
        """Parse and validate; ``version`` and ``path`` only make messages precise."""
        reader = _Reader(version, path)
        return reader.manifest(reader.load(data))


def manifest_format(
    tpm: TpmRecord | None,
    firmware: FirmwareRecord | None,
    not_copied: list[NotCopied],
    disks: Sequence[DiskRecord] = (),
    checkpoint: CheckpointRecord | None = None,
    host_name: str | None = None,
) -> int:
    """The format a manifest with these records is written in (1 when it has none).

    A reader of format 1 alone would misread any of them (a kept chain without its
    backing files, a block device as a file), so each makes the manifest format 2.
    A chunk table on any file makes it format 3 (which includes format 2).
    """
    files: list[ArchivedFile] = [*disks, *(c for d in disks for c in d.chain)]
    if tpm is not None:
        files += tpm.files
    if any(f.chunks is not None for f in files):
        return CHUNK_TABLE_FORMAT
    special = any(_record_dict(d).keys() - _RECORD_KEYS - {"chunks"} for d in disks)
    if tpm or firmware or not_copied or special or checkpoint or host_name:
        return DEVICE_STATE_FORMAT
    return FORMAT_VERSION


def b3sums_text(manifest: Manifest) -> str:
    """The B3SUMS file of a version: ``b3sum --check B3SUMS`` checks it without guestsafe.

    Each file's chunk table follows the file, so ``b3sum --check`` covers the tables too.
    """
    lines = []
    for r in manifest.files:
        lines.append(f"{r.blake3}  {r.file}\n")
        if r.chunks is not None:
            lines.append(f"{r.chunks.blake3}  {r.chunks.file}\n")
    lines.append(f"{manifest.domain_xml_blake3}  {DOMAIN_XML_FILE}\n")
    return "".join(lines)


def parse_utc(value: str) -> datetime:
    """An ISO-8601 UTC timestamp as written in manifests; ValueError otherwise."""
    stamp = datetime.fromisoformat(value)
    if stamp.utcoffset() != timedelta(0):
        raise ValueError(f"{value!r} is not in UTC")
    return stamp


def _record_dict(record: DiskRecord) -> dict[str, Any]:
    data: dict[str, Any] = {
        "target": record.target,
        "source": record.source,
        "format": record.format,
        "virtual_size": record.virtual_size,
        "allocated_size": record.allocated_size,
        "file": record.file,
        "size": record.size,
        "blake3": record.blake3,
    }
    if record.source_kind != "file":
        data["source_kind"] = record.source_kind
    # Written only when set: a version without chains or volumes stays readable by
    # guestsafe releases that predate these keys (FORMAT.md, "manifest.json").
    if record.chain:
        data["chain"] = [_chain_dict(c) for c in record.chain]
    if record.pool is not None:
        data["pool"] = record.pool
    if record.volume is not None:
        data["volume"] = record.volume
    if record.chunks is not None:
        data["chunks"] = _chunks_dict(record.chunks)
    return data


def _chunks_dict(ref: ChunkRef) -> dict[str, Any]:
    return {"file": ref.file, "chunk_size": ref.chunk_size, "blake3": ref.blake3}


def _chain_dict(layer: ChainFile) -> dict[str, Any]:
    data: dict[str, Any] = {
        "file": layer.file,
        "source": layer.source,
        "format": layer.format,
        "backing": layer.backing,
        "size": layer.size,
        "blake3": layer.blake3,
    }
    if layer.chunks is not None:
        data["chunks"] = _chunks_dict(layer.chunks)
    return data


def _to_dict(manifest: Manifest) -> dict[str, Any]:
    return {
        "format": manifest.format,
        "guest": manifest.guest,
        "uuid": manifest.uuid,
        "host": manifest.host,
        "mode": manifest.mode,
        "started": manifest.started,
        "finished": manifest.finished,
        "downtime": manifest.downtime,
        "tool_version": manifest.tool_version,
        "domain_xml_blake3": manifest.domain_xml_blake3,
        "disks": [_record_dict(d) for d in manifest.disks],
        "nvram": None if manifest.nvram is None else _record_dict(manifest.nvram),
        "notes": list(manifest.notes),
    } | _optional_dict(manifest)


def _optional_dict(manifest: Manifest) -> dict[str, Any]:
    data: dict[str, Any] = {}
    if manifest.tpm is not None:
        tpm = manifest.tpm
        data["tpm"] = {
            "model": tpm.model,
            "version": tpm.version,
            "state_dir": tpm.state_dir,
            "files": [_record_dict(r) for r in tpm.files],
        }
    if manifest.firmware is not None:
        data["firmware"] = dict(vars(manifest.firmware))
    if manifest.host_name is not None:
        data["host_name"] = manifest.host_name
    if manifest.not_copied:
        data["not_copied"] = [dict(vars(n)) for n in manifest.not_copied]
    if manifest.checkpoint is not None:
        data["checkpoint"] = dict(vars(manifest.checkpoint)) | {
            "sources": dict(manifest.checkpoint.sources)
        }
    return data


_MANIFEST_KEYS = frozenset(
    _to_dict(Manifest(1, "", "", "", Mode.STOP, "", "", None, "", [], None, [])).keys()
)
_RECORD_KEYS = frozenset(_record_dict(DiskRecord("", "", "", 0, 0, "", "")).keys())
_OPTIONAL_RECORD_KEYS = frozenset({"source_kind", "chain", "pool", "volume", "chunks"})
_CHAIN_KEYS = frozenset(_chain_dict(ChainFile("", "", "", None, "")).keys())
# Keys a manifest may leave out: versions without a TPM, firmware facts or media have none.
_OPTIONAL_KEYS = frozenset(("tpm", "firmware", "not_copied", "checkpoint", "host_name"))
_CHECKPOINT_KEYS = frozenset(CheckpointRecord.__dataclass_fields__)
# A host name of jobs.toml ([hosts.NAME]): it qualifies the guest's folder name too.
_HOST_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")
_TPM_KEYS = frozenset(("model", "version", "state_dir", "files"))
_FIRMWARE_KEYS = frozenset(FirmwareRecord.__dataclass_fields__)
_NOT_COPIED_KEYS = frozenset(NotCopied.__dataclass_fields__)
_CHUNKS_KEYS = frozenset(_chunks_dict(ChunkRef("", 0, "")).keys())
CHUNKS_SUFFIX = ".chunks"
# Chunk sizes a reader accepts: powers of two a reflink can share (4 KiB blocks up),
# and small enough that verify's four chunk buffers stay well under 100 MiB.
_MIN_CHUNK, _MAX_CHUNK = 4096, 16 << 20


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two values for one key would let a tool and a person read different manifests.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"key {key!r} appears twice")
        result[key] = value
    return result


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


class _Reader:
    """Validates one manifest and words its errors with guest, version and file."""

    def __init__(self, version: int | None, path: Path | None) -> None:
        self.version = version
        self.path = path
        self.guest: str | None = None
        self.fmt = FORMAT_VERSION

    def fail(self, problem: str, advice: str = "") -> NoReturn:
        if self.guest is None:
            where = f"manifest {self.path}" if self.path else "manifest"
        else:
            where = f"manifest of {printable(self.guest)}"
            if self.version is not None:
                where += f" version {self.version}"
        path = f" ({self.path})" if self.path and self.guest is not None else ""
        raise ArchiveError(f"{where} {problem}{path}" + (f"; {advice}" if advice else ""))

    def load(self, data: str | bytes) -> Any:
        try:
            return json.loads(
                data, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant
            )
        except (ValueError, RecursionError) as exc:
            self.fail(f"is not valid JSON: {exc}")

    def manifest(self, data: Any) -> Manifest:
        if not isinstance(data, dict):
            self.fail("is not a JSON object")
        guest = data.get("guest")
        # Known early so even a format error names the guest.
        self.guest = guest if isinstance(guest, str) and guest else None
        fmt = self.fmt = self.format(data.get("format"))
        self.guest = self.text(data, "guest")
        optional = _OPTIONAL_KEYS if fmt >= DEVICE_STATE_FORMAT else frozenset()
        self.keys({k: v for k, v in data.items() if k not in optional}, _MANIFEST_KEYS, "")
        # No "finished >= started" rule: a clock stepped back by NTP during a backup
        # must not make a good version unreadable.
        started, finished = self.timestamp(data, "started"), self.timestamp(data, "finished")
        disks = self.list_of(data, "disks", dict)
        nvram = data["nvram"]
        manifest = Manifest(
            format=fmt,
            guest=self.guest,
            uuid=self.uuid(data),
            host=self.text(data, "host"),
            mode=self.mode(data),
            started=started,
            finished=finished,
            downtime=self.downtime(data),
            tool_version=self.text(data, "tool_version"),
            disks=[self.record(d, f"disks[{i}]") for i, d in enumerate(disks)],
            nvram=None if nvram is None else self.record(nvram, "nvram"),
            notes=self.list_of(data, "notes", str),
            domain_xml_blake3=self.digest(data, "domain_xml_blake3"),
            tpm=self.tpm(data.get("tpm")),
            host_name=self.host_name(data),
            firmware=self.firmware(data.get("firmware")),
            not_copied=[
                self.not_copied(n, f"not_copied[{i}]")
                for i, n in enumerate(self.list_of(data, "not_copied", dict, []))
            ],
            checkpoint=self.checkpoint(data.get("checkpoint")),
        )
        self.unique(manifest.records)
        return manifest

    def checkpoint(self, data: Any) -> CheckpointRecord | None:
        if data is None:
            return None
        if not isinstance(data, dict):
            self.fail("has checkpoint that is not a JSON object")
        self.keys(data, _CHECKPOINT_KEYS, "checkpoint.")
        based_on, previous, sources = data["based_on"], data["previous"], data["sources"]
        if based_on is not None and not isinstance(based_on, str):
            self.fail("has checkpoint.based_on that is neither a name nor null")
        if previous is not None and (type(previous) is not int or previous < 1):
            self.fail("has checkpoint.previous that is neither a version number nor null")
        if not isinstance(sources, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in sources.items()
        ):
            self.fail("has checkpoint.sources that is not an object of strings")
        return CheckpointRecord(self.text(data, "name", "checkpoint."), based_on, previous, sources)

    def tpm(self, data: Any) -> TpmRecord | None:
        if data is None:
            return None
        if not isinstance(data, dict):
            self.fail("has tpm that is not a JSON object")
        self.keys(data, _TPM_KEYS, "tpm.")
        files = self.list_of(data, "files", dict)
        return TpmRecord(
            model=self.text(data, "model", "tpm."),
            version=self.text(data, "version", "tpm."),
            state_dir=self.text(data, "state_dir", "tpm."),
            files=[self.record(f, f"tpm.files[{i}]") for i, f in enumerate(files)],
        )

    def host_name(self, data: dict[str, Any]) -> str | None:
        value = self.optional_text(data, "host_name", "")
        if value is not None and not _HOST_NAME_RE.fullmatch(value):
            self.fail(f"has host_name {value!r}, not a host name of jobs.toml")
        return value

    def firmware(self, data: Any) -> FirmwareRecord | None:
        if data is None:
            return None
        if not isinstance(data, dict):
            self.fail("has firmware that is not a JSON object")
        self.keys(data, _FIRMWARE_KEYS, "firmware.")
        for key, value in data.items():
            if value is not None and (not isinstance(value, str) or not value):
                self.fail(f"has firmware.{key} {value!r}, not a text or null")
        return FirmwareRecord(**data)

    def not_copied(self, data: dict[str, Any], where: str) -> NotCopied:
        self.keys(data, _NOT_COPIED_KEYS, f"{where}.")
        return NotCopied(**{k: self.text(data, k, f"{where}.") for k in _NOT_COPIED_KEYS})

    def format(self, value: Any) -> int:
        if type(value) is not int:
            self.fail(f"has no valid format number (found {value!r})")
        newest = max(MANIFEST_FORMATS)
        if value > newest:
            self.fail(
                f"uses archive format {value}, newer than this guestsafe reads ({newest})",
                f"use a guestsafe release that reads format {value}",
            )
        if value not in MANIFEST_FORMATS:
            self.fail(
                f"uses unknown archive format {value} (this guestsafe reads "
                f"{', '.join(map(str, MANIFEST_FORMATS))})"
            )
        return int(value)

    def keys(
        self,
        data: dict[str, Any],
        expected: frozenset[str],
        where: str,
        optional: frozenset[str] = frozenset(),
    ) -> None:
        missing, unknown = expected - data.keys(), data.keys() - expected - optional
        if missing:
            self.fail(f"lacks {where}{', '.join(sorted(missing))}")
        if unknown:
            self.fail(f"has unknown key {where}{', '.join(sorted(map(repr, unknown)))}")

    def text(self, data: dict[str, Any], key: str, where: str = "") -> str:
        value = data.get(key)
        if not isinstance(value, str) or not value:
            self.fail(f"has no valid {where}{key} (found {value!r})")
        return value

    def timestamp(self, data: dict[str, Any], key: str) -> str:
        value = self.text(data, key)
        try:
            parse_utc(value)
        except ValueError:
            self.fail(f"has {key} {value!r}, not an ISO-8601 UTC time")
        return value

    def uuid(self, data: dict[str, Any]) -> str:
        value = self.text(data, "uuid")
        try:
            canonical = str(uuidlib.UUID(value))
        except ValueError:
            canonical = ""
        if canonical != value:
            self.fail(f"has uuid {value!r}, not a lower-case UUID")
        return value

    def mode(self, data: dict[str, Any]) -> Mode:
        value = self.text(data, "mode")
        mode = parse_mode(value)
        if mode is None:
            self.fail(f"has mode {value!r}, not one of {', '.join(Mode)}")
        return mode

    def downtime(self, data: dict[str, Any]) -> float | None:
        value = data["downtime"]
        if value is None:
            return None
        if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
            self.fail(f"has downtime {value!r}, not a number of seconds")
        return float(value)

    def list_of(
        self, data: dict[str, Any], key: str, kind: type, default: list[Any] | None = None
    ) -> list[Any]:
        value = data[key] if default is None else data.get(key, default)
        if not isinstance(value, list) or not all(isinstance(v, kind) for v in value):
            self.fail(f"has {key} that is not a list of {kind.__name__}")
        return value

    def digest(self, data: dict[str, Any], key: str) -> str:
        value = data[key]
        if not isinstance(value, str) or _BLAKE3.fullmatch(value) is None:
            self.fail(f"has {key} {value!r}, not 64 lower-case hex digits")
        return value

    def size(self, data: dict[str, Any], key: str, where: str) -> int:
        value = data[key]
        if type(value) is not int or value < 0:
            self.fail(f"has {where}{key} {value!r}, not a byte count")
        return value

    def record(self, data: Any, where: str) -> DiskRecord:
        if not isinstance(data, dict):
            self.fail(f"has {where} that is not a JSON object")
        optional = _OPTIONAL_RECORD_KEYS if self.fmt >= DEVICE_STATE_FORMAT else frozenset()
        self.keys(data, _RECORD_KEYS, f"{where}.", optional)
        file = self.file_name(data, where)
        fmt = self.format_name(data, where)
        chain = data.get("chain", [])
        if not isinstance(chain, list) or (not chain and "chain" in data):
            self.fail(f"has {where}.chain that is not a non-empty list")
        layers = tuple(self.chain_file(c, f"{where}.chain[{i}]") for i, c in enumerate(chain))
        self.chain_links(file, fmt, layers, where)
        return DiskRecord(
            target=self.text(data, "target", f"{where}."),
            source=self.text(data, "source", f"{where}."),
            format=fmt,
            virtual_size=self.size(data, "virtual_size", f"{where}."),
            allocated_size=self.size(data, "allocated_size", f"{where}."),
            file=file,
            blake3=self.digest(data, "blake3"),
            size=self.size(data, "size", f"{where}."),
            source_kind=self.source_kind(data, where),
            chain=layers,
            pool=self.optional_text(data, "pool", f"{where}."),
            volume=self.optional_text(data, "volume", f"{where}."),
            chunks=self.chunks(data, file, where),
        )

    def chunks(self, data: dict[str, Any], file: str, where: str) -> ChunkRef | None:
        """A format-3 file's chunk table; formats 1 and 2 have none."""
        if "chunks" not in data:
            return None
        if self.fmt < CHUNK_TABLE_FORMAT:
            self.fail(f"has {where}.chunks, which format {self.fmt} does not have")
        ref = data["chunks"]
        where = f"{where}.chunks"
        if not isinstance(ref, dict):
            self.fail(f"has {where} that is not a JSON object")
        self.keys(ref, _CHUNKS_KEYS, f"{where}.")
        if ref["file"] != file + CHUNKS_SUFFIX:
            self.fail(f"has {where}.file {ref['file']!r}, not {file + CHUNKS_SUFFIX!r}")
        size = ref["chunk_size"]
        if type(size) is not int or not _MIN_CHUNK <= size <= _MAX_CHUNK or size & (size - 1):
            self.fail(f"has {where}.chunk_size {size!r}, not a power of two from 4 KiB to 16 MiB")
        return ChunkRef(file + CHUNKS_SUFFIX, size, self.digest(ref, "blake3"))

    def source_kind(self, data: dict[str, Any], where: str) -> str:
        if "source_kind" not in data:
            return "file"
        kind = data["source_kind"]
        if kind not in SOURCE_KINDS or kind == "file":  # "file" is never written
            self.fail(f"has {where}.source_kind {kind!r}, not one of {', '.join(SOURCE_KINDS[1:])}")
        return str(kind)

    def file_name(self, data: dict[str, Any], where: str) -> str:
        file = data["file"]
        if not isinstance(file, str) or not is_safe_file_name(file):
            self.fail(
                f"names an unsafe file {file!r} in {where}",
                "disk files are plain names like vda.qcow2, so it was edited or is corrupt",
            )
        return file

    def format_name(self, data: dict[str, Any], where: str) -> str:
        fmt = self.text(data, "format", f"{where}.")
        if _FORMAT_NAME.fullmatch(fmt) is None:
            self.fail(f"has {where}.format {fmt!r}, not a disk format name")
        return fmt

    def optional_text(self, data: dict[str, Any], key: str, where: str) -> str | None:
        return self.text(data, key, where) if key in data else None

    def chain_file(self, data: Any, where: str) -> ChainFile:
        if not isinstance(data, dict):
            self.fail(f"has {where} that is not a JSON object")
        self.keys(data, _CHAIN_KEYS, f"{where}.", frozenset({"chunks"}))
        backing = data["backing"]
        if backing is not None and (not isinstance(backing, str) or not is_safe_file_name(backing)):
            self.fail(f"names an unsafe backing file {backing!r} in {where}")
        return ChainFile(
            file=self.file_name(data, where),
            source=self.text(data, "source", f"{where}."),
            format=self.format_name(data, where),
            backing=backing,
            blake3=self.digest(data, "blake3"),
            size=self.size(data, "size", f"{where}."),
            chunks=self.chunks(data, self.file_name(data, where), where),
        )

    def chain_links(self, top: str, fmt: str, layers: tuple[ChainFile, ...], where: str) -> None:
        """Each file of a kept chain names the next as its backing, and the base none.

        A chain that loops or points outside itself would restore another disk.
        """
        if not layers:
            return
        if fmt != "qcow2":
            self.fail(f"has {where}.chain under a {fmt} file; only qcow2 files have backing files")
        names = [top, *(layer.file for layer in layers)]
        for i, layer in enumerate(layers):
            wanted = names[i + 2] if i + 2 < len(names) else None
            if layer.backing != wanted:
                self.fail(
                    f"has {where}.chain[{i}] backed by {layer.backing!r}, not {wanted!r}; "
                    "the chain was edited or is corrupt"
                )
            if layer.backing is not None and layer.format != "qcow2":
                self.fail(f"has {where}.chain[{i}], a {layer.format} file with a backing file")

    def unique(self, records: list[DiskRecord]) -> None:
        layers: list[ArchivedFile] = [*records, *(c for r in records for c in r.chain)]
        files = [f.file.lower() for f in layers]
        files += [f.chunks.file.lower() for f in layers if f.chunks is not None]
        targets = [r.target for r in records]
        for label, values in (("file", files), ("target", targets)):
            twice = sorted({v for v in values if values.count(v) > 1})
            if twice:
                self.fail(f"names {label} {twice[0]!r} twice")
