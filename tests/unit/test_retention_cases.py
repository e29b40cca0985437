"""Issue 12, retention: ``keep`` counts good versions only (case 14)."""

from __future__ import annotations

import os
from pathlib import Path

import blake3
import pytest

from guestsafe.engine.archive.manifest import DiskRecord, Manifest
from guestsafe.engine.archive.store import Archive
from guestsafe.engine.archive.versions import VersionInfo

XML = "<domain type='qemu'><name>web</name></domain>\n"


def _backup(archive: Archive, guest: str = "web") -> VersionInfo:
    partial = archive.begin(guest)
    partial.write_domain_xml(XML)
    data = os.urandom(4096)
    partial.file_path("vda.raw").write_bytes(data)
    disk = DiskRecord(
        target="vda",
        source="/var/lib/libvirt/images/vda.raw",
        format="raw",
        virtual_size=len(data),
        allocated_size=len(data),
        file="vda.raw",
        blake3=str(blake3.blake3(data).hexdigest()),
    )
    manifest = Manifest(
        format=1,
        guest=guest,
        uuid="6f2d8d1e-5a3c-4b59-9d61-1a2b3c4d5e6f",
        host="hv1",
        mode="stop",
        started="2025-03-01T02:00:00+00:00",
        finished="2025-03-01T02:03:00+00:00",
        downtime=1.0,
        tool_version="0.1.0",
        disks=[disk],
        nvram=None,
        notes=[],
    )
    return partial.commit(manifest)


def _fail_verification(archive: Archive, version: VersionInfo) -> None:
    (version.path / "vda.raw").write_bytes(b"flipped" + b"\0" * 4089)
    assert not archive.verify("web", version.number)[0].ok


def _on_disk(archive: Archive) -> list[int]:
    return sorted(int(n) for n in os.listdir(archive.root / "web") if n.isdigit())


@pytest.fixture
def archive(tmp_path: Path) -> Archive:
    return Archive.open(tmp_path / "backup", create=True)


def test_case_14_keep_counts_good_versions_only(archive: Archive) -> None:
    # The example: keep = 2, v1 good, v2 failed verification, v3 good.
    first = _backup(archive)
    archive.verify("web", first.number)
    _fail_verification(archive, _backup(archive))
    newest = _backup(archive)
    archive.verify("web", newest.number)

    assert archive.apply_retention("web", 2) == []
    assert _on_disk(archive) == [1, 2, 3]  # two good versions, and the bad one not yet outlived
    assert [v.verified for v in archive.versions("web")] == [True, False, True]  # listed as bad


def test_case_14_an_unreadable_manifest_counts_as_bad(archive: Archive) -> None:
    _backup(archive)
    broken = _backup(archive)
    (broken.path / "manifest.json").write_text("{ not json")
    _backup(archive)

    assert archive.apply_retention("web", 2) == []
    assert _on_disk(archive) == [1, 2, 3]
    assert any("web/2/manifest.json" in p for p in archive.problems("web"))  # listed as bad


def test_case_14_a_bad_version_goes_once_keep_good_versions_are_newer(archive: Archive) -> None:
    _backup(archive)
    _fail_verification(archive, _backup(archive))
    broken = _backup(archive)
    (broken.path / "manifest.json").write_text("{ not json")
    _backup(archive)
    assert archive.apply_retention("web", 2) == []  # one good version newer than 2 and 3
    assert _on_disk(archive) == [1, 2, 3, 4]

    _backup(archive)
    assert archive.apply_retention("web", 2) == [1, 2, 3]
    assert _on_disk(archive) == [4, 5]


def test_case_14_a_bad_newest_version_pushes_no_good_one_out(archive: Archive) -> None:
    _backup(archive)
    _backup(archive)
    _fail_verification(archive, _backup(archive))

    assert archive.apply_retention("web", 2) == []
    assert _on_disk(archive) == [1, 2, 3]
