"""Restore a version as a new guest, or over the original.

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
import threading
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path, PurePosixPath

import blake3

from guestsafe.engine import events, locks
from guestsafe.engine.archive.manifest import DOMAIN_XML_FILE, DiskRecord
from guestsafe.engine.archive.names import encode_guest_name, libvirt_accepts, printable
from guestsafe.engine.archive.store import Archive
from guestsafe.engine.archive.versions import VersionInfo
from guestsafe.engine.copier import copy_file
from guestsafe.engine.errors import RestoreError, VerifyError
from guestsafe.engine.events import PhaseChanged, Progress, Reporter
from guestsafe.engine.hypervisor.connection import Hypervisor
from guestsafe.engine.hypervisor.domain_xml import SHUTOFF, parse_domain_xml
from guestsafe.engine.paths import Paths


class MacChoice(StrEnum):
    """What a clone's interface gets: its old MAC, or a new unique one (the CLI's spelling)."""

    KEEP = "keep"
    NEW = "new"


# Module-level names kept for the console and the CLI.
KEEP = MacChoice.KEEP
NEW = MacChoice.NEW
MAC_PREFIX = "52:54:00"


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

    @property
    def clashes(self) -> list[InterfacePlan]:
        return [i for i in self.interfaces if i.clashes]


@dataclass
class RestoreResult:
    name: str
    uuid: str
    macs: list[str]
    disk_paths: list[Path]
    started: bool
    warnings: list[str] = field(default_factory=list)


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
) -> RestorePlan:
    """Work out every new path and MAC, touching nothing."""
    version = archive.version(guest, number)
    if not new_name or new_name != new_name.strip():
        raise RestoreError(f"new name {new_name!r} is empty or has surrounding spaces")
    if not libvirt_accepts(new_name):
        raise RestoreError(
            f"new name {new_name!r} holds '/' or a control character; libvirt refuses such names"
        )
    if hv.exists(new_name):
        raise RestoreError(f"a guest named {new_name!r} is already defined; choose another name")
    _check_plain_files(version)
    if target_dir is None:
        _check_sources(version)
    xml = _read_domain_xml(version)
    try:
        xml_interfaces = parse_domain_xml(xml).interfaces
    except ET.ParseError as exc:
        raise RestoreError(
            f"{DOMAIN_XML_FILE} of {_where(version)} is not valid XML ({exc}); "
            "the version is damaged"
        ) from exc
    taken_paths: set[Path] = set()
    disk_plan = [
        (rec, _new_path(rec, new_name, target_dir, taken_paths)) for rec in version.manifest.disks
    ]
    nvram = version.manifest.nvram
    nvram_plan = (nvram, _new_path(nvram, new_name, target_dir, taken_paths)) if nvram else None
    all_macs = hv.all_macs()
    taken = set(all_macs)
    interfaces = [
        InterfacePlan(i, mac, all_macs.get(mac), new_mac(taken))
        for i, mac in enumerate(m.mac or "" for m in xml_interfaces)
    ]
    problem = _domain_xml_problem(version, xml)
    return RestorePlan(version, new_name, disk_plan, nvram_plan, interfaces, xml, problem)


def _where(version: VersionInfo) -> str:
    return f"version {version.number} of {printable(version.guest)}"


def _check_plain_files(version: VersionInfo) -> None:
    """Refuse, before anything is copied, a version whose files are not plain files.

    guestsafe writes only regular files into a version. A symlink there was planted:
    following it would restore whatever it points at, so not even --force does.
    """
    for name in [r.file for r in version.manifest.records] + [DOMAIN_XML_FILE]:
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


def _check_sources(version: VersionInfo) -> None:
    """Refuse source paths that would put restored files somewhere unexpected."""
    for rec in version.manifest.records:
        source = PurePosixPath(rec.source)
        if not source.is_absolute() or ".." in source.parts or "\x00" in rec.source:
            raise RestoreError(
                f"the manifest of {_where(version)} gives {printable(rec.target)} the source "
                f"{printable(rec.source)}, not a plain absolute path; it was edited or is "
                "corrupt (restore as a new guest with --target-dir)"
            )


def _read_domain_xml(version: VersionInfo) -> str:
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


def _domain_xml_problem(version: VersionInfo, xml: str) -> str | None:
    """Why domain.xml cannot be trusted (it differs from its manifest), or None."""
    expected = version.manifest.domain_xml_blake3
    actual = str(blake3.blake3(xml.encode("utf-8")).hexdigest())
    if expected is None or actual == expected:
        return None
    return (
        f"{DOMAIN_XML_FILE} of {printable(version.guest)} version {version.number} does not "
        f"match its manifest (blake3 {actual[:12]}.. != {expected[:12]}..)"
    )


def _accept_damage(
    problem: str | None, force: bool, reporter: Reporter, who: str, warnings: list[str]
) -> None:
    if problem is None:
        return
    if not force:
        raise VerifyError(problem + "; restore it anyway with --force")
    events.warn(reporter, problem + "; used anyway (--force)", who)
    warnings.append(problem)


def _new_path(rec: DiskRecord, new_name: str, target_dir: Path | None, taken: set[Path]) -> Path:
    directory = target_dir or Path(rec.source).parent
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
    replaces clashing MACs only and ``policy`` keep keeps them all.
    """
    macs = []
    for iface in plan.interfaces:
        choice = (choices or {}).get(iface.index)
        if choice is None:
            choice = NEW if policy == NEW and iface.clashes else KEEP
        if choice not in tuple(MacChoice):
            raise RestoreError(f"interface {iface.index}: choose 'keep' or 'new', not {choice!r}")
        macs.append(iface.new_mac if choice == NEW or not iface.mac else iface.mac)
    return macs


def restore_clone(
    plan: RestorePlan,
    hv: Hypervisor,
    paths: Paths,
    *,
    mac_policy: str = NEW,
    mac_choices: Mapping[int, str] | None = None,
    start: bool = False,
    force: bool = False,
    reporter: Reporter = events.null_reporter,
    cancel: threading.Event | None = None,
) -> RestoreResult:
    """Copy the version's files to their new paths and define the clone."""
    macs = choose_macs(plan, mac_policy, mac_choices)
    new_uuid = str(uuid.uuid4())
    name = plan.new_name
    warnings = _check_verified(plan.version, force, reporter, name)
    _check_plain_files(plan.version)  # again: the plan may be old
    _accept_damage(plan.xml_problem, force, reporter, name, warnings)
    # The source guest's lock: a backup of it (and its retention) must not run meanwhile.
    source = plan.version
    purpose = f"restore of {source.guest} version {source.number} to {name}"
    with locks.acquire(paths.state_dir, f"guest:{source.manifest.uuid}", purpose):
        copied: list[Path] = []
        try:
            reporter(PhaseChanged(name, "copy"))
            for rec, dst in _copies(plan):
                _restore_file(plan.version, rec, dst, force, reporter, name, cancel, warnings)
                copied.append(dst)
            reporter(PhaseChanged(name, "define"))
            xml = rewrite_clone_xml(plan, new_uuid, macs)
            if hv.exists(name):
                raise RestoreError(f"a guest named {name!r} was defined meanwhile; nothing defined")
            hv.define(xml)
        except BaseException:
            for path in copied:
                path.unlink(missing_ok=True)
            raise
    events.info(reporter, f"defined {name} from {plan.version.guest} version {plan.version.number}")
    if start:
        reporter(PhaseChanged(name, "start"))
        hv.start(name)
    reporter(events.RunEnded(events.RunKind.RESTORE, True, "restore successful", name))
    return RestoreResult(name, new_uuid, macs, copied, start, warnings)


def _copies(plan: RestorePlan) -> list[tuple[DiskRecord, Path]]:
    return plan.disks + ([plan.nvram] if plan.nvram else [])


def _check_verified(version: VersionInfo, force: bool, reporter: Reporter, who: str) -> list[str]:
    if version.verified is False:
        message = f"version {version.number} of {version.guest} failed its last verification"
        if not force:
            raise RestoreError(message + "; restore it anyway with --force")
        events.warn(reporter, message + "; restoring anyway (--force)", who)
        return [message]
    return []


def _restore_file(
    version: VersionInfo,
    rec: DiskRecord,
    dst: Path,
    force: bool,
    reporter: Reporter,
    who: str,
    cancel: threading.Event | None,
    warnings: list[str],
) -> None:
    src = version.path / rec.file
    if src.is_symlink() or not src.is_file():
        raise RestoreError(f"{src} is missing or not a regular file; the version is damaged")
    dst.parent.mkdir(parents=True, exist_ok=True)
    events.info(reporter, f"restoring {rec.file} to {dst}", who)

    def progress(done: int, total: int) -> None:
        reporter(Progress(who, rec.target, done, total))

    result = copy_file(src, dst, progress=progress, cancel=cancel)
    if result.blake3 != rec.blake3:
        message = (
            f"{rec.file} of {version.guest} version {version.number} does not match its "
            f"manifest (blake3 {result.blake3[:12]}.. != {rec.blake3[:12]}..)"
        )
        if not force:
            dst.unlink(missing_ok=True)
            raise VerifyError(message + "; restore it anyway with --force")
        events.warn(reporter, message + "; kept anyway (--force)", who)
        warnings.append(message)


def rewrite_clone_xml(plan: RestorePlan, new_uuid: str, macs: list[str]) -> str:
    root = ET.fromstring(plan.xml)
    _set_text(root, "name", plan.new_name)
    _set_text(root, "uuid", new_uuid)
    new_paths = {rec.target: dst for rec, dst in plan.disks}
    for disk in root.findall("./devices/disk"):
        target = disk.find("target")
        source = disk.find("source")
        dev = target.get("dev") if target is not None else None
        if dev in new_paths and source is not None:
            source.attrib.pop("dev", None)
            source.set("file", str(new_paths[dev]))
            disk.set("type", "file")
    nvram = root.find("./os/nvram")
    if nvram is not None and plan.nvram is not None:
        nvram.text = str(plan.nvram[1])
    for iface, mac in zip(root.findall("./devices/interface"), macs, strict=False):
        _set_mac(iface, mac)
        target = iface.find("target")
        if target is not None:
            iface.remove(target)
    _rewrite_char_devices(root, plan.new_name)
    return ET.tostring(root, encoding="unicode")


def _set_text(root: ET.Element, tag: str, text: str) -> None:
    element = root.find(tag)
    if element is None:
        element = ET.SubElement(root, tag)
    element.text = text


def _set_mac(iface: ET.Element, mac: str) -> None:
    element = iface.find("mac")
    if element is None:
        element = ET.Element("mac")
        iface.insert(0, element)
    element.set("address", mac)


def _rewrite_char_devices(root: ET.Element, new_name: str) -> None:
    """Give file-backed consoles their own log, and let libvirt pick socket paths."""
    prefix = encode_guest_name(new_name)[:160]
    for dev in root.findall("./devices/*"):
        if dev.tag not in ("serial", "console", "channel", "parallel"):
            continue
        source = dev.find("source")
        if source is None or "path" not in source.attrib:
            continue
        if dev.get("type") == "file":
            old = Path(source.get("path", ""))
            source.set("path", str(_free_path(old.parent / f"{prefix}-{old.name}")))
        elif dev.get("type") == "unix":
            del source.attrib["path"]


def _free_path(path: Path) -> Path:
    candidate, n = path, 1
    while candidate.exists():
        candidate = path.with_name(f"{n}-{path.name}")
        n += 1
    return candidate


def restore_over_original(
    archive: Archive,
    guest: str,
    number: int,
    hv: Hypervisor,
    paths: Paths,
    *,
    force: bool = False,
    reporter: Reporter = events.null_reporter,
    cancel: threading.Event | None = None,
) -> RestoreResult:
    """Put a version back in place of the guest it came from.

    The guest must be shut off. Its current files are renamed aside and only
    removed once the restored ones are complete and the guest is redefined;
    on any failure they are renamed back.
    """
    version = archive.version(guest, number)
    if hv.exists(guest) and hv.state(guest) != SHUTOFF:
        raise RestoreError(
            f"guest {guest!r} is {hv.state(guest)}; shut it off before restoring over it"
        )
    warnings = _check_verified(version, force, reporter, guest)
    _check_plain_files(version)
    _check_sources(version)  # the files land at the sources: they must be plain paths
    xml = _read_domain_xml(version)
    _accept_damage(_domain_xml_problem(version, xml), force, reporter, guest, warnings)
    targets = [(rec, Path(rec.source)) for rec in version.manifest.disks]
    if version.manifest.nvram:
        targets.append((version.manifest.nvram, Path(version.manifest.nvram.source)))
    with locks.acquire(paths.state_dir, f"guest:{version.manifest.uuid}", f"restore over {guest}"):
        aside = _set_aside([dst for _, dst in targets], reporter, guest)
        try:
            reporter(PhaseChanged(guest, "copy"))
            for rec, dst in targets:
                _restore_file(version, rec, dst, force, reporter, guest, cancel, warnings)
            info = hv.define(xml)
        except BaseException:
            _put_back(aside, reporter, guest)
            raise
        for moved in aside.values():
            moved.unlink(missing_ok=True)
    reporter(events.RunEnded(events.RunKind.RESTORE, True, "restore successful", guest))
    return RestoreResult(guest, info.uuid, info.macs, [dst for _, dst in targets], False, warnings)


def _set_aside(files: list[Path], reporter: Reporter, who: str) -> dict[Path, Path]:
    aside: dict[Path, Path] = {}
    try:
        for path in files:
            if path.exists():
                moved = _free_path(path.with_name(path.name + ".guestsafe-aside"))
                os.rename(path, moved)
                aside[path] = moved
                events.info(reporter, f"kept {path} aside as {moved}", who)
    except OSError:
        _put_back(aside, reporter, who)
        raise
    return aside


def _put_back(aside: dict[Path, Path], reporter: Reporter, who: str) -> None:
    for original, moved in aside.items():
        original.unlink(missing_ok=True)
        os.rename(moved, original)
        events.warn(reporter, f"restore failed: put {original} back as it was", who)
