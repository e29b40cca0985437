"""Instant boot: the clone records, retention sparing a version in use, and discard's refusals."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import blake3
import pytest

from guestsafe.engine.archive.calendar_retention import RetentionPolicy
from guestsafe.engine.archive.in_use import (
    BootRecord,
    all_records,
    read_record,
    versions_in_use,
    write_record,
)
from guestsafe.engine.archive.manifest import DiskRecord, Manifest
from guestsafe.engine.archive.store import Archive
from guestsafe.engine.backup.prune import prune_job
from guestsafe.engine.errors import RestoreError
from guestsafe.engine.jobs.model import Job, Schedule
from guestsafe.engine.paths import Paths
from guestsafe.engine.restore.instant_boot import ChainLink, discard_clone, overlay_xml

XML = "<domain type='qemu'><name>web</name></domain>\n"
CLONE_UUID = "0b6c7a2e-3f4d-4e5a-8b9c-0d1e2f3a4b5c"


def _backup(archive: Archive, guest: str = "web") -> None:
    partial = archive.begin(guest)
    partial.write_domain_xml(XML)
    data = os.urandom(4096)
    partial.file_path("vda.raw").write_bytes(data)
    disk = DiskRecord("vda", "/img/vda.raw", "raw", 4096, 4096, "vda.raw", _b3(data))
    stamp = "2025-03-01T02:00:00+00:00"
    manifest = Manifest(
        1, guest, "6f2d8d1e-5a3c-4b59-9d61-1a2b3c4d5e6f", "hv1", "stop", stamp, stamp, 1.0,
        "0.1.0", [disk], None, [],
    )  # fmt: skip
    partial.commit(manifest)


def _b3(data: bytes) -> str:
    return str(blake3.blake3(data).hexdigest())


def _record(archive: Archive, number: int, clone: str = "web-now") -> BootRecord:
    return BootRecord(
        clone=clone,
        clone_uuid=CLONE_UUID,
        guest="web",
        number=number,
        archive=str(archive.root),
        version_path=str(archive.root / "web" / str(number)),
        overlays={"vda": f"/img/{clone}-vda.qcow2"},
    )


@pytest.fixture
def archive(tmp_path: Path) -> Archive:
    archive = Archive.open(tmp_path / "backup", create=True)
    for _ in range(3):
        _backup(archive)
    return archive


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    home = tmp_path / "home"
    return Paths(home / "jobs.toml", home / "state", home / "log", home / "cache")


def test_a_record_reads_back_and_names_the_version_it_holds(
    archive: Archive, paths: Paths, tmp_path: Path
) -> None:
    write_record(paths.state_dir, _record(archive, 1))
    assert read_record(paths.state_dir, "web-now") == _record(archive, 1)
    assert read_record(paths.state_dir, "web") is None
    assert versions_in_use(paths.state_dir, archive.root, "web") == {1: ["web-now"]}
    # The same archive by another path is the same archive; another guest is not.
    (tmp_path / "link").symlink_to(archive.root)
    assert versions_in_use(paths.state_dir, tmp_path / "link", "web") == {1: ["web-now"]}
    assert versions_in_use(paths.state_dir, archive.root, "db") == {}
    assert oct((paths.state_dir / "booted").stat().st_mode & 0o777) == "0o700"


def test_retention_keeps_a_version_in_use_and_says_why(archive: Archive, paths: Paths) -> None:
    in_use = {1: ["web-now"]}
    rows = {c.number: why for c, why in archive.retention_rows("web", _keep(1), in_use)}
    assert rows[1] == ["in use by web-now"] and rows[2] == []
    assert archive.apply_retention("web", _keep(1), in_use) == [2]
    assert [v.number for v in archive.versions("web")] == [1, 3]
    # Once the clone lets go, the version goes like any other.
    assert archive.apply_retention("web", _keep(1)) == [1]


def test_prune_keeps_what_a_booted_clone_reads(archive: Archive, paths: Paths) -> None:
    write_record(paths.state_dir, _record(archive, 2))
    job = Job("nightly", ["web"], archive.root, keep=1, schedule=Schedule(None))

    pruned = prune_job(job, lambda: pytest.fail("no hypervisor needed"), paths)

    assert pruned[0].deleted == [1]
    assert [v.number for v in archive.versions("web")] == [2, 3]
    assert "in use by web-now" in dict((c.number, w) for c, w in pruned[0].rows)[2]


@dataclass
class FakeHypervisor:
    guests: dict[str, str]
    removed: list[str] = field(default_factory=list)

    def exists(self, name: str) -> bool:
        return name in self.guests

    def xml(self, name: str, *, inactive: bool = True) -> str:
        return self.guests[name]

    def destroy(self, name: str) -> None:
        self.removed.append(f"destroy {name}")

    def undefine(self, name: str) -> None:
        self.removed.append(f"undefine {name}")
        del self.guests[name]


def _domain(name: str, uuid: str) -> str:
    return f"<domain type='qemu'><name>{name}</name><uuid>{uuid}</uuid></domain>"


def test_discard_refuses_a_guest_guestsafe_did_not_boot(archive: Archive, paths: Paths) -> None:
    hv = FakeHypervisor({"web": _domain("web", "6f2d8d1e-5a3c-4b59-9d61-1a2b3c4d5e6f")})

    with pytest.raises(RestoreError, match="not an instant-boot clone guestsafe made"):
        discard_clone("web", hv, paths)  # type: ignore[arg-type]

    assert hv.removed == [] and "web" in hv.guests


def test_discard_refuses_a_guest_that_took_a_clones_name(archive: Archive, paths: Paths) -> None:
    write_record(paths.state_dir, _record(archive, 1))
    hv = FakeHypervisor({"web-now": _domain("web-now", "11111111-2222-3333-4444-555555555555")})

    with pytest.raises(RestoreError, match="UUID differs"):
        discard_clone("web-now", hv, paths)  # type: ignore[arg-type]

    assert hv.removed == [] and read_record(paths.state_dir, "web-now") is not None


def test_discard_removes_the_clone_its_overlay_and_record(
    archive: Archive, paths: Paths, tmp_path: Path
) -> None:
    overlay = tmp_path / "web-now-vda.qcow2"
    overlay.write_bytes(b"overlay")
    record = _record(archive, 1)
    write_record(
        paths.state_dir, BootRecord(**{**record.__dict__, "overlays": {"vda": str(overlay)}})
    )
    hv = FakeHypervisor({"web-now": _domain("web-now", CLONE_UUID)})

    discard_clone("web-now", hv, paths)  # type: ignore[arg-type]

    assert hv.removed == ["destroy web-now", "undefine web-now"]
    assert not overlay.exists() and all_records(paths.state_dir) == []
    assert [v.number for v in archive.versions("web")] == [1, 2, 3]  # the archive untouched


def test_the_overlay_xml_reads_the_chain_read_only_without_relabelling() -> None:
    xml = (
        "<domain><devices><disk type='file' device='disk'><driver name='qemu' type='raw'/>"
        "<source file='/img/web-now-vda.raw'/><target dev='vda'/></disk></devices></domain>"
    )
    chain = [ChainLink(Path("/backup/web/1/vda.raw"), "raw", 4096)]

    disk = ET.fromstring(overlay_xml(xml, {"vda": chain})).find("./devices/disk")

    assert disk is not None
    assert disk.find("driver").get("type") == "qcow2"  # type: ignore[union-attr]
    store = disk.find("backingStore")
    assert store is not None and store.find("format").get("type") == "raw"  # type: ignore[union-attr]
    assert store.find("source").get("file") == "/backup/web/1/vda.raw"  # type: ignore[union-attr]
    label = store.find("source/seclabel")
    assert label is not None and label.attrib == {"model": "dac", "relabel": "no"}
    end = store.find("backingStore")
    assert end is not None and len(end) == 0 and not end.attrib


def _keep(n: int) -> RetentionPolicy:
    return RetentionPolicy(last=n)


def test_list_and_the_dry_run_name_the_clone_a_version_is_in_use_by(
    archive: Archive,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import tomli_w

    from guestsafe.tui.cli import main

    home = tmp_path / "home"
    (home / "config").mkdir(parents=True)
    job = {"guests": ["web"], "destination": str(archive.root), "keep": 1}
    (home / "config" / "jobs.toml").write_text(tomli_w.dumps({"jobs": {"nightly": job}}))
    monkeypatch.setenv("GUESTSAFE_HOME", str(home))
    write_record(home / "state", _record(archive, 1))

    assert main(["list", "web"]) == 0
    rows = {line.split()[1]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["1"].endswith("in use by web-now") and rows["2"].endswith(" -")
    assert main(["prune", "--dry-run", "nightly"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[2] for line in out.splitlines() if "in use by web-now" in line] == ["1"]
