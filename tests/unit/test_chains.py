"""qcow2 backing chains, pool volumes and network disks (issue 11), with real qemu-img."""

from __future__ import annotations

import json
import subprocess
import threading
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import blake3
import pytest

from guestsafe.engine import events
from guestsafe.engine.archive.chunks import table_bytes
from guestsafe.engine.archive.manifest import (
    ChainFile,
    DiskRecord,
    Manifest,
    b3sums_text,
    manifest_format,
)
from guestsafe.engine.archive.store import Archive
from guestsafe.engine.backup.chain_copy import copy_chain
from guestsafe.engine.backup.guest_run import GuestRun
from guestsafe.engine.copier import hash_with_chunks
from guestsafe.engine.errors import ArchiveError, PreflightError
from guestsafe.engine.hypervisor import chains, volumes
from guestsafe.engine.hypervisor.domain_xml import DiskInfo, GuestInfo, GuestState
from guestsafe.engine.jobs.jobs_file import load_jobs, save_jobs
from guestsafe.engine.jobs.model import Job
from guestsafe.engine.jobs.validation import validate_job
from guestsafe.engine.modes import ChainMode, Mode
from guestsafe.engine.restore.chain_restore import restore_chain
from guestsafe.engine.restore.clone_xml import build_clone_xml
from guestsafe.engine.restore.files import restore_file
from guestsafe.engine.restore.plan import RestorePlan

UUID = "6f2d8d1e-5a3c-4b59-9d61-1a2b3c4d5e6f"
MiB = 1024 * 1024


def qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True).stdout


def qemu_io(image: Path, command: str) -> str:
    proc = subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", command, str(image)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def make_chain(folder: Path) -> tuple[Path, Path]:
    """base.qcow2 with 0xaa at 1 MiB, top.qcow2 over it with 0xbb at 2 MiB."""
    base, top = folder / "base.qcow2", folder / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), str(8 * MiB))
    qemu_io(base, f"write -P 0xaa {MiB} 64k")
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(top))
    qemu_io(top, f"write -P 0xbb {2 * MiB} 64k")
    return base, top


def reads_both_layers(top: Path) -> bool:
    out = qemu_io(top, f"read -P 0xaa {MiB} 64k") + qemu_io(top, f"read -P 0xbb {2 * MiB} 64k")
    return "Pattern verification failed" not in out


def disk(source: Path | None, kind: str = "file", **extra: object) -> DiskInfo:
    return DiskInfo(
        "vda", str(source) if source else None, kind, "disk", "qcow2", False, False, **extra
    )  # type: ignore[arg-type]


def guest(*disks: DiskInfo, state: GuestState = GuestState.RUNNING) -> GuestInfo:
    return GuestInfo("web", UUID, state, True, list(disks))


# A stand-in version for build_clone_xml, which reads the plan's XML and the manifest's tpm.
NO_VERSION = SimpleNamespace(manifest=SimpleNamespace(tpm=None))


def manifest(disks: list[DiskRecord]) -> Manifest:
    return Manifest(
        manifest_format(None, None, [], disks), "web", UUID, "hv1", Mode.STOP,
        "2025-03-01T02:00:00+00:00", "2025-03-01T02:03:00+00:00", 1.0, "0.1.0", disks, None, [],
        domain_xml_blake3="0" * 64,
    )  # fmt: skip


def b3(path: Path) -> str:
    return str(blake3.blake3(path.read_bytes()).hexdigest())


# --- reading chains -------------------------------------------------------------


def test_backing_chain_lists_every_file_top_first(tmp_path: Path) -> None:
    base, top = make_chain(tmp_path)
    layers = chains.backing_chain(top)
    assert [(layer.path, layer.backing) for layer in layers] == [(top, base), (base, None)]
    assert chains.disk_chain(disk(top)) == layers
    assert chains.disk_chain(disk(base)) is None  # a standalone file is no chain


def test_missing_backing_file_is_refused_before_anything_stops(tmp_path: Path) -> None:
    base, top = make_chain(tmp_path)
    base.unlink()
    with pytest.raises(PreflightError, match=r"vda .*backing chain.*missing or moved"):
        chains.check_chain("web", disk(top))


def test_backing_device_is_refused_with_the_reason(tmp_path: Path) -> None:
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "/dev/null", "-F", "raw", str(top), "8M")
    with pytest.raises(PreflightError, match="/dev/null is not a regular file"):
        chains.check_chain("web", disk(top))


# --- copying chains -------------------------------------------------------------


def run_into(archive: Archive) -> GuestRun:
    run = GuestRun("web", Mode.STOP, threading.Event(), say=lambda _l, _t: None)
    run.partial = archive.begin("web")
    return run


@pytest.mark.parametrize("mode", list(ChainMode))
def test_copied_chain_reads_both_layers_and_is_hashed_as_written(
    tmp_path: Path, mode: ChainMode
) -> None:
    _base, top = make_chain(tmp_path)
    archive = Archive.open(tmp_path / "backup", create=True)
    run = run_into(archive)
    layers = chains.backing_chain(top)

    record = copy_chain(run, disk(top), layers, mode, run.cancel)

    assert run.partial is not None
    folder = run.partial.path
    copied = folder / record.file
    assert reads_both_layers(copied)
    assert record.blake3 == b3(copied)
    archived = chains.backing_chain(copied)
    assert all(layer.path.parent == folder for layer in archived)
    if mode == ChainMode.KEEP:
        assert [c.file for c in record.chain] == ["vda.1.qcow2"]
        assert record.chain[0].blake3 == b3(folder / "vda.1.qcow2")
        assert record.chain[0].source == str(tmp_path / "base.qcow2")
        assert len(archived) == 2
    else:
        assert record.chain == () and len(archived) == 1
        assert "flattened from a chain of 2 files" in run.warnings[0]
    # Each file hashed as written (rebased, or by qemu-img) has the table of those bytes.
    for archived_file in (record, *record.chain):
        assert archived_file.chunks is not None
        table = (folder / archived_file.chunks.file).read_bytes()
        assert table == table_bytes(hash_with_chunks(folder / archived_file.file).chunks)
        assert archived_file.chunks.blake3 == blake3.blake3(table).hexdigest()
    run.partial.write_domain_xml("<domain/>")
    version = run.partial.commit(replace(manifest([record]), domain_xml_blake3=None))
    (report,) = archive.verify("web", version.number)
    assert report.ok, report.problems


def test_verify_checks_a_kept_backing_file(tmp_path: Path) -> None:
    _base, top = make_chain(tmp_path)
    archive = Archive.open(tmp_path / "backup", create=True)
    run = run_into(archive)
    record = copy_chain(run, disk(top), chains.backing_chain(top), ChainMode.KEEP, run.cancel)
    assert run.partial is not None
    run.partial.write_domain_xml("<domain/>")
    version = run.partial.commit(replace(manifest([record]), domain_xml_blake3=None))
    assert "vda.1.qcow2" in (version.path / "B3SUMS").read_text()
    with (version.path / "vda.1.qcow2").open("r+b") as f:
        f.seek(100)  # any byte of the backing file
        f.write(b"X")

    (report,) = archive.verify("web", version.number)

    assert not report.ok and any("vda.1.qcow2" in p for p in report.problems)


# --- the manifest ---------------------------------------------------------------

LAYER = ChainFile("vda.1.qcow2", "/img/base.qcow2", "qcow2", None, "1" * 64, 10)
TOP = DiskRecord("vda", "/img/top.qcow2", "qcow2", 8, 8, "vda.qcow2", "2" * 64, 20)


def test_manifest_keeps_chain_pool_and_volume() -> None:
    kept = replace(TOP, chain=(LAYER,), pool="default", volume="top.qcow2")
    again = Manifest.from_json(manifest([kept]).to_json())
    assert again.disks == [kept]
    assert [f.file for f in again.files] == ["vda.qcow2", "vda.1.qcow2"]
    assert "vda.1.qcow2" in b3sums_text(again)


def test_a_manifest_without_the_new_keys_stays_as_before() -> None:
    data = json.loads(manifest([TOP]).to_json())
    assert set(data["disks"][0]) == {
        "target", "source", "format", "virtual_size", "allocated_size", "file", "size", "blake3"
    }  # fmt: skip
    assert Manifest.from_json(json.dumps(data)).disks == [TOP]


@pytest.mark.parametrize(
    ("layer", "fragment"),
    [
        (replace(LAYER, backing="vda.qcow2"), "backed by 'vda.qcow2', not None"),
        (replace(LAYER, file="../etc/passwd"), "unsafe file"),
        (replace(LAYER, file="vda.qcow2"), "twice"),
    ],
)
def test_an_edited_chain_is_refused(layer: ChainFile, fragment: str) -> None:
    text = json.dumps(json.loads(manifest([replace(TOP, chain=(LAYER,))]).to_json()))
    bad = text.replace(json.dumps(LAYER.file), json.dumps(layer.file), 1)
    data = json.loads(bad)
    data["disks"][0]["chain"][0]["backing"] = layer.backing
    with pytest.raises(ArchiveError, match=fragment):
        Manifest.from_json(json.dumps(data))


# --- restoring a kept chain ---------------------------------------------------------


def test_restored_chain_points_at_its_own_copies(tmp_path: Path) -> None:
    base, top = make_chain(tmp_path)
    archive = Archive.open(tmp_path / "backup", create=True)
    run = run_into(archive)
    record = copy_chain(run, disk(top), chains.backing_chain(top), ChainMode.KEEP, run.cancel)
    assert run.partial is not None
    run.partial.write_domain_xml("<domain/>")
    version = run.partial.commit(replace(manifest([record]), domain_xml_blake3=None))
    target = tmp_path / "restored"
    target.mkdir()
    new_top = target / "clone-vda.qcow2"
    restored = archive.version("web", version.number)
    restore_file(restored, record, new_top, False, events.null_reporter, "clone", None, [])
    written = restore_chain(
        restored, record, new_top, False, events.null_reporter, "clone", None, []
    )

    assert written == [target / "clone-vda.1.qcow2"]
    assert [layer.path for layer in chains.backing_chain(new_top)] == [new_top, *written]
    base.unlink()  # the original chain plays no part
    top.unlink()
    assert reads_both_layers(new_top)


# --- jobs -------------------------------------------------------------------------


def test_chain_key_round_trips_and_is_validated(tmp_path: Path) -> None:
    path = tmp_path / "jobs.toml"
    job = Job("n", ["web"], tmp_path, chain=ChainMode.KEEP)
    save_jobs(path, [job])
    assert 'chain = "keep"' in path.read_text()
    assert load_jobs(path)[0].chain == ChainMode.KEEP
    save_jobs(path, [replace(job, chain=ChainMode.FLATTEN)])
    assert "chain =" not in path.read_text()  # the default is not written
    assert load_jobs(path)[0].chain == ChainMode.FLATTEN
    (problem,) = validate_job(replace(job, chain="deep"))  # type: ignore[arg-type]
    assert problem.field == "chain" and "flatten, keep" in problem.message


# --- volumes and network disks ------------------------------------------------------


def test_an_unresolved_volume_is_refused_naming_pool_and_volume() -> None:
    unresolved = disk(None, "volume", pool="tank", volume="web.qcow2")
    unresolved = replace(unresolved, source="web.qcow2")
    with pytest.raises(PreflightError, match=r"volume 'web.qcow2' of storage pool 'tank'"):
        volumes.check_volumes(guest(unresolved))


@pytest.mark.parametrize("state", [GuestState.RUNNING, GuestState.SHUTOFF])
def test_a_network_disk_is_refused_for_a_cold_copy_naming_stop_short(state: GuestState) -> None:
    nbd = replace(disk(None, "network"), source="export", target="vdb")
    info = guest(nbd, state=state)
    with pytest.raises(PreflightError, match=r"vdb is a network disk.*mode stop-short"):
        volumes.check_network_disks(info, cold=True)
    volumes.check_network_disks(info, cold=False)  # QEMU reads it in a push backup


# --- the clone's XML ----------------------------------------------------------------

VOLUME_XML = """<domain type='qemu'><name>web</name><uuid>{uuid}</uuid><devices>
  <disk type='volume' device='disk'>
    <driver name='qemu' type='qcow2'/>
    <source pool='tank' volume='web.qcow2' mode='host'/>
    <backingStore type='file'><format type='qcow2'/><source file='/img/base.qcow2'/></backingStore>
    <target dev='vda' bus='virtio'/>
  </disk>
</devices></domain>"""


def test_clone_of_a_volume_disk_gets_a_plain_file_and_no_kept_backing_store() -> None:
    rec = replace(TOP, pool="tank", volume="web.qcow2")
    plan = RestorePlan(
        NO_VERSION,  # type: ignore[arg-type]  # build_clone_xml reads the XML and tpm only
        "web-clone", [(rec, Path("/img/web-clone-vda.qcow2"))], None, [],
        VOLUME_XML.format(uuid=UUID),
    )  # fmt: skip

    element = ET.fromstring(build_clone_xml(plan, UUID, []).xml).find("./devices/disk")

    assert element is not None and element.get("type") == "file"
    source = element.find("source")
    assert source is not None and source.attrib == {"file": "/img/web-clone-vda.qcow2"}
    assert element.find("backingStore") is None  # the clone reads its own file's chain


def test_clone_of_a_network_disk_gets_a_plain_file() -> None:
    xml = f"""<domain type='qemu'><name>web</name><uuid>{UUID}</uuid><devices>
      <disk type='network' device='disk'>
        <driver name='qemu' type='raw'/>
        <auth username='admin'><secret type='ceph' usage='pool'/></auth>
        <source protocol='rbd' name='pool/web'><host name='10.0.0.1' port='6789'/></source>
        <target dev='vdb' bus='virtio'/>
      </disk></devices></domain>"""
    rec = replace(TOP, target="vdb", source="pool/web", format="raw", file="vdb.raw")
    plan = RestorePlan(
        NO_VERSION,  # type: ignore[arg-type]  # build_clone_xml reads the XML and tpm only
        "web-clone", [(rec, Path("/img/web-clone-vdb.raw"))], None, [], xml,
    )  # fmt: skip

    element = ET.fromstring(build_clone_xml(plan, UUID, []).xml).find("./devices/disk")

    assert element is not None and element.get("type") == "file"
    source = element.find("source")
    assert source is not None and source.attrib == {"file": "/img/web-clone-vdb.raw"}
    assert list(source) == [] and element.find("auth") is None


def test_the_console_form_keeps_an_edited_jobs_chain(tmp_path: Path) -> None:
    from guestsafe.tui.model.job_form import JobFormValues, build_job

    job = Job("n", ["web"], tmp_path, chain=ChainMode.KEEP)
    edited, problems = build_job(JobFormValues.from_job(job), base=job)
    assert problems == [] and edited.chain == ChainMode.KEEP
    new, _ = build_job(JobFormValues.from_job(job))
    assert new.chain == ChainMode.FLATTEN  # a new job from the form: the default
