"""Item 5: every doubt about the checkpoint chain means a full read, never a wrong version."""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from guestsafe.engine.archive.manifest import CheckpointRecord, DiskRecord, Manifest
from guestsafe.engine.archive.versions import VersionInfo
from guestsafe.engine.backup.incremental import Base, bitmaps_problem, choose_base, source_id
from guestsafe.engine.hypervisor import checkpoints
from guestsafe.engine.hypervisor.push_jobs import PushTarget, backup_xml
from guestsafe.engine.modes import Mode

SIZE = 1 << 30
CKPT = "guestsafe-20260101T000000Z-abcdef"
DIGEST = "ab" * 32


def _previous(tmp_path: Path, **changes: object) -> VersionInfo:
    disk = DiskRecord(
        "vda", "/var/lib/libvirt/images/web.qcow2", "qcow2", SIZE, 0, "vda.qcow2", DIGEST, 1
    )
    record = CheckpointRecord(CKPT, None, None, {"vda": "1:2"})
    manifest = Manifest(
        format=2,
        guest="web",
        uuid="6f2d8d1e-5a3c-4b59-9d61-1a2b3c4d5e6f",
        host="hv1",
        mode=Mode.STOP_SHORT,
        started="2026-01-01T02:00:00+00:00",
        finished="2026-01-01T02:03:10+00:00",
        downtime=1.0,
        tool_version="0.1.0",
        disks=[disk],
        nvram=None,
        domain_xml_blake3=DIGEST,
        checkpoint=record,
    )
    version = VersionInfo("web", 3, tmp_path / "3", manifest, 0, "", Mode.STOP_SHORT, True)
    return replace(version, **changes)  # type: ignore[arg-type]


TARGET = PushTarget("vda", "/var/lib/libvirt/images/web.qcow2", "qcow2", Path("/p/vda.qcow2"))
GOOD = {"reflink": True, "leaves": [CKPT], "sources": {"vda": "1:2"}, "sizes": {"vda": SIZE}}


def _choose(previous: VersionInfo | None, target: PushTarget = TARGET, **facts: object) -> object:
    return choose_base(previous, [target], **(GOOD | facts))  # type: ignore[arg-type]


def test_with_no_doubt_the_backup_builds_on_the_previous_version(tmp_path: Path) -> None:
    base = _choose(_previous(tmp_path))
    assert base == Base(CKPT, 3, {"vda": tmp_path / "3" / "vda.qcow2"})


def _without_checkpoint(tmp_path: Path) -> VersionInfo:
    version = _previous(tmp_path)
    return replace(version, manifest=replace(version.manifest, checkpoint=None))


@pytest.mark.parametrize(
    ("doubt", "arrange", "said"),
    [
        ("first backup", lambda p: (None, {}), "no earlier version"),
        ("previous began none", lambda p: (_without_checkpoint(p), {}), "began no checkpoint"),
        ("no reflink", lambda p: (_previous(p), {"reflink": False}), "no reflink"),
        ("not verified", lambda p: (_previous(p, verified=None), {}), "not verified"),
        ("verify failed", lambda p: (_previous(p, verified=False), {}), "not verified"),
        ("no checkpoints here", lambda p: (_previous(p), {"leaves": None}), "no checkpoints"),
        ("checkpoint gone", lambda p: (_previous(p), {"leaves": []}), "has no checkpoint"),
        (
            "a failed run began another",
            lambda p: (_previous(p), {"leaves": ["guestsafe-later"]}),
            "not the guest's latest",
        ),
        (
            "another tool's checkpoint beside",
            lambda p: (_previous(p), {"leaves": [CKPT, "other"]}),
            "other checkpoints",
        ),
        (
            "restored (file replaced)",
            lambda p: (_previous(p), {"sources": {"vda": "1:99"}}),
            "restored or replaced",
        ),
        ("resized", lambda p: (_previous(p), {"sizes": {"vda": 2 * SIZE}}), "resized"),
    ],
)
def test_each_doubt_means_a_full_read(
    tmp_path: Path, doubt: str, arrange: object, said: str
) -> None:
    previous, facts = arrange(tmp_path)  # type: ignore[operator]
    reason = _choose(previous, **facts)
    assert isinstance(reason, str) and said in reason, doubt


def test_a_raw_disk_or_another_source_means_a_full_read(tmp_path: Path) -> None:
    assert "raw" in str(_choose(_previous(tmp_path), replace(TARGET, fmt="raw")))
    moved = replace(TARGET, source="/elsewhere/web.qcow2")
    assert "now" in str(_choose(_previous(tmp_path), moved))


def _qcow2_with_bitmap(path: Path, name: str, *flags: str) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "16M"], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", *flags, str(path), name], check=True)


def test_a_missing_or_disabled_bitmap_is_a_doubt_read_from_the_real_image(tmp_path: Path) -> None:
    image = tmp_path / "web.qcow2"
    _qcow2_with_bitmap(image, CKPT)
    assert checkpoints.bitmap_consistent(image, CKPT)
    assert not checkpoints.bitmap_consistent(image, "guestsafe-other")  # missing
    disabled = tmp_path / "disabled.qcow2"
    _qcow2_with_bitmap(disabled, CKPT, "--disable")
    assert not checkpoints.bitmap_consistent(disabled, CKPT)  # missed writes
    base = Base(CKPT, 3, {"vda": tmp_path / "3" / "vda.qcow2"})
    target = replace(TARGET, source=str(disabled))
    assert "no intact bitmap" in str(bitmaps_problem(base, [target], checkpoints.bitmap_consistent))
    assert (
        bitmaps_problem(base, [replace(TARGET, source=str(image))], checkpoints.bitmap_consistent)
        is None
    )


def test_a_replaced_file_has_another_source_id(tmp_path: Path) -> None:
    disk = tmp_path / "web.qcow2"
    disk.write_bytes(b"a")
    before = source_id(str(disk))
    replacement = tmp_path / "new.qcow2"
    replacement.write_bytes(b"a")
    replacement.replace(disk)
    assert source_id(str(disk)) != before


def test_the_manifest_keeps_what_a_version_was_based_on(tmp_path: Path) -> None:
    manifest = _previous(tmp_path).manifest
    based = replace(manifest, checkpoint=CheckpointRecord("guestsafe-b", CKPT, 3, {"vda": "1:2"}))
    data = json.loads(based.to_json())
    assert data["checkpoint"] == {
        "name": "guestsafe-b",
        "based_on": CKPT,
        "previous": 3,
        "sources": {"vda": "1:2"},
    }
    assert Manifest.from_json(based.to_json()).checkpoint == based.checkpoint


def test_the_backup_xml_names_the_checkpoint_it_builds_on() -> None:
    xml = backup_xml([TARGET], ["sda"], CKPT)
    assert f"<incremental>{CKPT}</incremental>" in xml
    assert "<incremental>" not in backup_xml([TARGET], ["sda"])
    ckpt = checkpoints.checkpoint_xml("guestsafe-b", ["vda"], ["sda"])
    assert '<disk name="vda" checkpoint="bitmap"' in ckpt and 'checkpoint="no"' in ckpt
