"""A promote --target-dir that died midway leaves no file nobody knows of (issue #14).

The clone is a guest of libvirt's test driver whose disk is a file; the record
names the half-made copy, as promote writes it before a copy starts.
"""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from guestsafe.engine import locks
from guestsafe.engine.archive.in_use import BootRecord, read_record, write_record
from guestsafe.engine.hypervisor.connection import Hypervisor
from guestsafe.engine.paths import Paths
from guestsafe.engine.restore.instant_boot import discard_clone
from guestsafe.engine.restore.promote_moves import lock_key, recover_promotes


@pytest.fixture
def hv() -> Iterator[Hypervisor]:
    conn = Hypervisor("test:///default")
    yield conn
    conn.close()


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    home = tmp_path / "home"
    return Paths(home / "jobs.toml", home / "state", home / "log", home / "cache")


def _clone(hv: Hypervisor, paths: Paths, tmp_path: Path, disk: str) -> BootRecord:
    """A clone on ``disk`` and a record whose move of vda into ``vms/`` is under way."""
    name, clone_uuid = f"now-{uuid.uuid4().hex[:8]}", str(uuid.uuid4())
    overlay, dest = tmp_path / f"{name}-vda.qcow2", tmp_path / "vms" / f"{name}-vda.qcow2"
    dest.parent.mkdir(exist_ok=True)
    overlay.write_bytes(b"overlay")
    dest.write_bytes(b"half a copy")
    source = {"overlay": overlay, "dest": dest}[disk]
    hv.define(
        f"<domain type='test'><name>{name}</name><uuid>{clone_uuid}</uuid>"
        "<memory>65536</memory><os><type>hvm</type></os><devices>"
        f"<disk type='file' device='disk'><source file='{source}'/><target dev='vda'/></disk>"
        "</devices></domain>"
    )
    version = tmp_path / "archive" / "web1" / "1"
    record = BootRecord(
        name,
        clone_uuid,
        "web1",
        1,
        str(tmp_path / "archive"),
        str(version),
        {"vda": str(overlay)},
        moving={"vda": str(dest)},
    )
    write_record(paths.state_dir, record)
    return record


def _disk_source(hv: Hypervisor, name: str) -> str | None:
    source = ET.fromstring(hv.xml(name)).find("./devices/disk/source")
    return None if source is None else source.get("file")


def test_a_copy_the_clone_does_not_run_on_is_deleted(
    hv: Hypervisor, paths: Paths, tmp_path: Path
) -> None:
    record = _clone(hv, paths, tmp_path, disk="overlay")

    done = recover_promotes(paths, lambda: hv)

    assert not Path(record.moving["vda"]).exists()
    assert Path(record.overlays["vda"]).read_bytes() == b"overlay"
    after = read_record(paths.state_dir, record.clone)
    assert after is not None and after.moving == {} and after.overlays == record.overlays
    assert _disk_source(hv, record.clone) == record.overlays["vda"]
    assert any("removed the partial copy" in line for line in done)


def test_a_copy_libvirt_already_switched_to_is_kept(
    hv: Hypervisor, paths: Paths, tmp_path: Path
) -> None:
    record = _clone(hv, paths, tmp_path, disk="dest")
    dest = record.moving["vda"]

    recover_promotes(paths, lambda: hv)

    assert Path(dest).exists() and not Path(record.overlays["vda"]).exists()
    after = read_record(paths.state_dir, record.clone)
    assert after is not None and after.moving == {} and after.overlays == {"vda": dest}
    assert _disk_source(hv, record.clone) == dest


def test_a_promote_still_running_is_left_alone(
    hv: Hypervisor, paths: Paths, tmp_path: Path
) -> None:
    record = _clone(hv, paths, tmp_path, disk="overlay")

    with locks.acquire(paths.state_dir, lock_key(record.clone), "promoting"):
        assert recover_promotes(paths, lambda: hv) == []

    assert Path(record.moving["vda"]).exists()
    assert read_record(paths.state_dir, record.clone) == record


def test_discard_removes_a_half_made_copy_too(hv: Hypervisor, paths: Paths, tmp_path: Path) -> None:
    record = _clone(hv, paths, tmp_path, disk="overlay")

    discard_clone(record.clone, hv, paths)

    assert not Path(record.moving["vda"]).exists()
    assert not Path(record.overlays["vda"]).exists()
    assert not hv.exists(record.clone)
