"""Planning a restore: the checks a version must pass, the clone's new name, paths
and MACs, and the plan the console shows before anything is written.

A clone gets a new name, a new UUID, new disk, NVRAM and console-log paths
that never overwrite a file, and for each interface either its old MAC or a
new unique one. Two guests with one MAC (and so one DHCP lease) break the
network, so a MAC that any defined guest already uses is reported as a clash
and, unless the caller keeps it, replaced.
"""

from __future__ import annotations

import os
import random
import stat
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path, PurePosixPath

import blake3

from guestsafe.engine import events
from guestsafe.engine.archive.manifest import DOMAIN_XML_FILE, DiskRecord
from guestsafe.engine.archive.names import encode_guest_name, libvirt_accepts, printable
from guestsafe.engine.archive.store import Archive
from guestsafe.engine.archive.versions import VersionInfo
from guestsafe.engine.errors import RestoreError, VerifyError
from guestsafe.engine.events import Reporter
from guestsafe.engine.hypervisor.cluster_macs import unchecked_warning, unreachable_hosts
from guestsafe.engine.hypervisor.connection import Hypervisor
from guestsafe.engine.hypervisor.domain_xml import parse_domain_xml
from guestsafe.engine.hypervisor.hosts import LOCAL_HOST

# Every MAC in use mapped to the guests using it, read when called (cluster_macs.py).
MacsInUse = Callable[[], Mapping[str, list[str]]]


class MacChoice(StrEnum):
    """What a clone's interface gets: its old MAC, or a new unique one (the CLI's spelling)."""

    KEEP = "keep"
    NEW = "new"


# Module-level names kept for the console and the CLI.
KEEP = MacChoice.KEEP
NEW = MacChoice.NEW
MAC_PREFIX = "52:54:00"
# Where a block-device disk restored into a file goes when no file disk shows a place.
DEFAULT_IMAGE_DIR = Path("/var/lib/libvirt/images")


@dataclass(frozen=True)
class InterfacePlan:
    index: int
    mac: str
    clash_with: str | None
    new_mac: str

    @property
    def clashes(self) -> bool:
        return self.clash_with is not None


@dataclass
class RestorePlan:
    version: VersionInfo
    new_name: str
    disks: list[tuple[DiskRecord, Path]]
    nvram: tuple[DiskRecord, Path] | None
    interfaces: list[InterfacePlan]
    xml: str
    # Set when domain.xml does not match its manifest: restoring needs force.
    xml_problem: str | None = None
    # Disks written onto existing block devices (--disk-target), not into new files.
    device_targets: dict[str, Path] = field(default_factory=dict)
    # Write onto a device target even where blkid finds a filesystem or partition table.
    overwrite_devices: bool = False
    # The host the clone is defined on ([hosts.NAME] of jobs.toml, "local" for this one).
    host: str = LOCAL_HOST
    # Hosts whose MACs could not be read when planning ("node3: <reason>").
    macs_unchecked: list[str] = field(default_factory=list)

    @property
    def clashes(self) -> list[InterfacePlan]:
        return [i for i in self.interfaces if i.clashes]

    @property
    def to_settle(self) -> list[InterfacePlan]:
        """The interfaces whose MAC the operator chooses before the restore: the
        clashing ones, and every one with a MAC while some host did not answer
        (the original may be a guest of that host)."""
        if self.macs_unchecked:
            return [i for i in self.interfaces if i.mac or i.clashes]
        return self.clashes

    @property
    def unchecked_note(self) -> str | None:
        """The warning for the hosts whose MACs were not read, or None if all answered."""
        return unchecked_warning(self.macs_unchecked)


@dataclass
class RestoreResult:
    name: str
    uuid: str
    macs: list[str]
    disk_paths: list[Path]
    started: bool
    warnings: list[str] = field(default_factory=list)
    # What the clone got instead of the original's devices, or lost (see clone_xml).
    notes: list[str] = field(default_factory=list)


def new_mac(taken: set[str]) -> str:
    """A random locally administered QEMU MAC that no defined guest uses."""
    rng = random.SystemRandom()
    while True:
        mac = MAC_PREFIX + "".join(f":{rng.randrange(256):02x}" for _ in range(3))
        if mac not in taken:
            taken.add(mac)
            return mac


def plan_restore(
    archive: Archive,
    guest: str,
    number: int,
    new_name: str,
    hv: Hypervisor,
    *,
    target_dir: Path | None = None,
    disk_targets: Mapping[str, Path] | None = None,
    macs_in_use: MacsInUse | None = None,
    host: str = LOCAL_HOST,
) -> RestorePlan:
    """Work out every new path and MAC, touching nothing.

    ``disk_targets`` (target -> block device) writes those disks onto existing
    devices; the devices themselves are checked when the restore begins.
    ``hv`` is the connection of ``host``, where the clone is defined;
    ``macs_in_use`` reads the MACs of every known host (default: ``hv``'s alone).
    """
    version = archive.version(guest, number)
    if not new_name or new_name != new_name.strip():
        raise RestoreError(f"new name {new_name!r} is empty or has surrounding spaces")
    if not libvirt_accepts(new_name):
        raise RestoreError(
            f"new name {new_name!r} holds '/' or a control character; libvirt refuses such names"
        )
    if hv.exists(new_name):
        raise RestoreError(f"a guest named {new_name!r} is already defined; choose another name")
    check_plain_files(version)
    if target_dir is None:
        check_sources(version)
    xml = read_domain_xml(version)
    try:
        xml_interfaces = parse_domain_xml(xml).interfaces
    except ET.ParseError as exc:
        raise RestoreError(
            f"{DOMAIN_XML_FILE} of {_where(version)} is not valid XML ({exc}); "
            "the version is damaged"
        ) from exc
    devices = dict(disk_targets or {})
    check_targets_known(version, devices)
    taken_paths: set[Path] = set()
    image_dir = _image_dir(version)
    disk_plan = [
        (
            rec,
            devices.get(rec.target) or _new_path(rec, new_name, target_dir, taken_paths, image_dir),
        )
        for rec in version.manifest.disks
    ]
    nvram = version.manifest.nvram
    nvram_plan = (nvram, _new_path(nvram, new_name, target_dir, taken_paths)) if nvram else None
    owners = (macs_in_use or hv.mac_owners)()
    all_macs = {mac: names[0] for mac, names in owners.items() if names}
    taken = set(all_macs)
    interfaces = [
        InterfacePlan(i, mac, all_macs.get(mac), new_mac(taken))
        for i, mac in enumerate(m.mac or "" for m in xml_interfaces)
    ]
    problem = domain_xml_problem(version, xml)
    return RestorePlan(
        version,
        new_name,
        disk_plan,
        nvram_plan,
        interfaces,
        xml,
        problem,
        devices,
        host=host,
        macs_unchecked=unreachable_hosts(owners),
    )


def _image_dir(version: VersionInfo) -> Path:
    """Where a block-device disk restored into a file goes: beside the first file disk's."""
    files = [rec for rec in version.manifest.disks if rec.source_kind == "file"]
    return Path(files[0].source).parent if files else DEFAULT_IMAGE_DIR


def check_targets_known(version: VersionInfo, targets: Mapping[str, Path]) -> None:
    """Every disk a --disk-target names must be a disk of the version."""
    known = [rec.target for rec in version.manifest.disks]
    for target in targets:
        if target not in known:
            raise RestoreError(
                f"--disk-target {target}: {_where(version)} has no disk {target} "
                f"(it has {', '.join(known)})"
            )


def _where(version: VersionInfo) -> str:
    return f"version {version.number} of {printable(version.guest)}"


def check_plain_files(version: VersionInfo) -> None:
    """Refuse, before anything is copied, a version whose files are not plain files.

    guestsafe writes only regular files into a version. A symlink there was planted:
    following it would restore whatever it points at, so not even --force does.
    """
    for name in [r.file for r in version.manifest.files] + [DOMAIN_XML_FILE]:
        path = version.path / name
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise RestoreError(
                f"{name} of {_where(version)} is missing ({path}); the version is damaged"
            ) from None
        if stat.S_ISLNK(st.st_mode):
            raise RestoreError(
                f"{name} of {_where(version)} is a symlink to {printable(os.readlink(path))}; "
                "a version holds plain files only and guestsafe never follows links in an "
                "archive (it was edited; check it with guestsafe verify)"
            )
        if not stat.S_ISREG(st.st_mode):
            raise RestoreError(
                f"{name} of {_where(version)} is not a regular file ({path}); "
                "the version is damaged"
            )


def check_sources(version: VersionInfo) -> None:
    """Refuse source paths that would put restored files somewhere unexpected."""
    for rec in version.manifest.records:
        source = PurePosixPath(rec.source)
        if not source.is_absolute() or ".." in source.parts or "\x00" in rec.source:
            raise RestoreError(
                f"the manifest of {_where(version)} gives {printable(rec.target)} the source "
                f"{printable(rec.source)}, not a plain absolute path; it was edited or is "
                "corrupt (restore as a new guest with --target-dir)"
            )


def read_domain_xml(version: VersionInfo) -> str:
    """The version's domain.xml, never read through a symlink planted in its place."""
    path = version.path / DOMAIN_XML_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise RestoreError(
            f"{DOMAIN_XML_FILE} of {_where(version)} cannot be read ({exc.strerror or exc}); "
            "the version is damaged"
        ) from exc
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise RestoreError(f"{DOMAIN_XML_FILE} of {_where(version)} is not a regular file")
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RestoreError(
            f"{DOMAIN_XML_FILE} of {_where(version)} is not UTF-8 text (byte {exc.start}); "
            "the version is damaged"
        ) from exc


def domain_xml_problem(version: VersionInfo, xml: str) -> str | None:
    """Why domain.xml cannot be trusted (it differs from its manifest), or None."""
    expected = version.manifest.domain_xml_blake3
    actual = str(blake3.blake3(xml.encode("utf-8")).hexdigest())
    if expected is None or actual == expected:
        return None
    return (
        f"{DOMAIN_XML_FILE} of {printable(version.guest)} version {version.number} does not "
        f"match its manifest (blake3 {actual[:12]}.. != {expected[:12]}..)"
    )


def accept_damage(
    problem: str | None, force: bool, reporter: Reporter, who: str, warnings: list[str]
) -> None:
    if problem is None:
        return
    if not force:
        raise VerifyError(problem + "; restore it anyway with --force")
    events.warn(reporter, problem + "; used anyway (--force)", who)
    warnings.append(problem)


def _new_path(
    rec: DiskRecord,
    new_name: str,
    target_dir: Path | None,
    taken: set[Path],
    image_dir: Path = DEFAULT_IMAGE_DIR,
) -> Path:
    directory = target_dir or Path(rec.source).parent
    if rec.source_kind == "block" and target_dir is None:
        directory = image_dir  # beside the other restored disks, never a file in /dev
    # Long names are cut so the file name stays within NAME_MAX (255 bytes).
    base = f"{encode_guest_name(new_name)[:160]}-{rec.file}"
    candidate = directory / base
    n = 1
    while candidate.exists() or candidate in taken:
        candidate = directory / f"{n}-{base}"
        n += 1
    taken.add(candidate)
    return candidate


def choose_macs(plan: RestorePlan, policy: str, choices: Mapping[int, str] | None) -> list[str]:
    """The MAC each interface ends up with.

    ``choices`` (interface index -> keep/new) wins; otherwise ``policy`` new
    replaces the MACs of ``plan.to_settle`` (the clashing ones, and every one
    while some host's MACs could not be read) and ``policy`` keep keeps them all.
    """
    unsafe = {iface.index for iface in plan.to_settle}
    macs = []
    for iface in plan.interfaces:
        choice = (choices or {}).get(iface.index)
        if choice is None:
            choice = NEW if policy == NEW and iface.index in unsafe else KEEP
        if choice not in tuple(MacChoice):
            raise RestoreError(f"interface {iface.index}: choose 'keep' or 'new', not {choice!r}")
        macs.append(iface.new_mac if choice == NEW or not iface.mac else iface.mac)
    return macs
