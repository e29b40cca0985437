"""The per-disk backup plan, its refusals, include_readonly, and the manifest's new records."""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from test_runner_phases import Rig, rig  # noqa: F401  (the fixture)

from guestsafe.engine.archive.manifest import (
    DiskRecord,
    FirmwareRecord,
    Manifest,
    NotCopied,
    TpmRecord,
)
from guestsafe.engine.archive.store import Archive
from guestsafe.engine.backup.disk_plan import (
    COPY,
    RECORD,
    REFUSE,
    SKIP,
    PlanOptions,
    plan_disks,
    refuse_before_stop,
)
from guestsafe.engine.errors import ArchiveError, PreflightError
from guestsafe.engine.hypervisor import chains, disk_files, tpm_state
from guestsafe.engine.hypervisor.domain_xml import DiskInfo, GuestInfo, parse_domain_xml
from guestsafe.engine.jobs import jobs_file
from guestsafe.engine.jobs.model import Job
from guestsafe.engine.modes import ChainMode, Mode

UUID = "0b9e5f1c-3a4d-4e8f-9c2b-7d6a5e4f3c2b"


def _disk(target: str, source: str | None, **kw: object) -> DiskInfo:
    values: dict[str, object] = {
        "kind": "file",
        "device": "disk",
        "format": "raw",
        "readonly": False,
        "shareable": False,
    }
    values.update(kw)
    return DiskInfo(target, source, **values)  # type: ignore[arg-type]


def _guest(*disks: DiskInfo, persistent: bool = True, xml_extra: str = "") -> GuestInfo:
    info = parse_domain_xml(
        f"<domain><name>web1</name><uuid>{UUID}</uuid><devices>{xml_extra}</devices></domain>",
        persistent=persistent,
    )
    return replace(info, disks=list(disks))


def _raw(path: Path, data: bytes = b"\0" * 4096) -> Path:
    path.write_bytes(data)
    return path


def _qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def test_a_writable_file_disk_is_copied_and_says_how(tmp_path: Path) -> None:
    vda = _raw(tmp_path / "vda.raw")
    [plan] = plan_disks(_guest(_disk("vda", str(vda))), PlanOptions())

    assert (plan.action, plan.how, plan.reason) == (COPY, "copy file (raw)", None)
    stop_short = plan_disks(_guest(_disk("vda", str(vda))), PlanOptions(Mode.STOP_SHORT))
    assert stop_short[0].how == "QEMU push backup (raw)"


def test_media_are_recorded_unless_include_readonly(tmp_path: Path) -> None:
    iso = _raw(tmp_path / "install.iso")
    ro = _raw(tmp_path / "ro.raw")
    info = _guest(
        _disk("sda", str(iso), device="cdrom", readonly=True),
        _disk("vdb", str(ro), readonly=True),
        _disk("sdb", None, device="cdrom", readonly=True),
    )

    plans = plan_disks(info, PlanOptions())
    assert [p.action for p in plans] == [RECORD, RECORD, SKIP]
    assert "cdrom image" in (plans[0].reason or "")
    assert "include_readonly = true" in (plans[1].reason or "")

    included = plan_disks(info, PlanOptions(include_readonly=True))
    assert [p.action for p in included] == [COPY, COPY, SKIP]


def test_a_writable_floppy_image_is_copied(tmp_path: Path) -> None:
    fd = _raw(tmp_path / "floppy.img")
    [plan] = plan_disks(_guest(_disk("fda", str(fd), device="floppy")), PlanOptions())

    assert plan.action == COPY
    assert _disk("fda", str(fd), device="floppy").backs_up


def test_a_shareable_disk_another_running_guest_uses_is_refused(tmp_path: Path) -> None:
    shared = _raw(tmp_path / "shared.raw")
    info = _guest(_disk("vdb", str(shared), shareable=True))

    [plan] = plan_disks(info, PlanOptions(sharers={"vdb": ["db1"]}))
    assert plan.action == REFUSE
    assert "'db1' is running on it" in (plan.reason or "")
    with pytest.raises(PreflightError, match="shareable"):
        refuse_before_stop(info, PlanOptions(sharers={"vdb": ["db1"]}))
    # Nobody else running on it: copied.
    assert plan_disks(info, PlanOptions())[0].action == COPY


def test_a_managed_save_image_refuses_the_guest(tmp_path: Path) -> None:
    info = _guest(_disk("vda", str(_raw(tmp_path / "vda.raw"))))

    with pytest.raises(PreflightError, match=r"managed-save image.*managedsave-remove"):
        refuse_before_stop(info, PlanOptions(managed_save=True))


def test_a_qcow2_with_an_external_data_file_is_refused_saying_how(tmp_path: Path) -> None:
    qcow = tmp_path / "ext.qcow2"
    _qemu_img("create", "-f", "qcow2", "-o", f"data_file={tmp_path / 'ext.data'}", str(qcow), "1M")
    [plan] = plan_disks(_guest(_disk("vda", str(qcow), format="qcow2")), PlanOptions())

    assert plan.action == REFUSE
    assert "ext.data" in (plan.reason or "") and "qemu-img convert -O qcow2" in (plan.reason or "")


def test_the_existing_file_rules_speak_through_the_plan(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    _qemu_img("create", "-f", "qcow2", str(base), "1M")
    overlay = tmp_path / "overlay.qcow2"
    _qemu_img("create", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(overlay))
    info = _guest(
        _disk("vda", str(overlay), format="qcow2"),
        _disk("vdb", str(tmp_path / "gone.raw")),
    )

    plans = plan_disks(info, PlanOptions())
    assert [p.action for p in plans] == [COPY, REFUSE]
    assert plans[0].how == "flatten chain (2 files) into one qcow2"
    assert "missing" in (plans[1].reason or "")
    keep = plan_disks(info, PlanOptions(chain=ChainMode.KEEP))[0]
    assert keep.how == "keep chain (2 files, relinked)"
    pushed = plan_disks(info, PlanOptions(Mode.STOP_SHORT, chain=ChainMode.KEEP))[0]
    assert pushed.refused and "chain = keep needs mode stop" in (pushed.reason or "")
    base.unlink()
    gone = plan_disks(info, PlanOptions())[0]
    assert gone.refused


def test_a_raw_disk_starting_with_a_qcow2_header_is_raw(tmp_path: Path) -> None:
    qcow = tmp_path / "real.qcow2"
    _qemu_img(
        "create", "-u", "-f", "qcow2", "-b", "/elsewhere.qcow2", "-F", "qcow2", str(qcow), "8M"
    )
    # The guest wrote a qcow2 image (with a backing file) into its raw disk's start.
    raw = _raw(tmp_path / "vda.raw", qcow.read_bytes().ljust(1024 * 1024, b"\0"))

    assert disk_files.virtual_size(raw, "raw") == 1024 * 1024
    assert chains.disk_chain(_disk("vda", str(raw), format="raw")) is None  # never probed
    [plan] = plan_disks(_guest(_disk("vda", str(raw), format="raw")), PlanOptions())
    assert (plan.action, plan.how) == (COPY, "copy file (raw)")


TPM_XML = "<tpm model='tpm-tis'><backend type='emulator' version='2.0'/></tpm>"


def test_an_emulated_tpm_is_planned_and_refused_in_snapshot_mode(tmp_path: Path) -> None:
    info = _guest(_disk("vda", str(_raw(tmp_path / "vda.raw"))), xml_extra=TPM_XML)

    assert info.emulated_tpm is not None and info.emulated_tpm.model == "tpm-tis"
    tpm = plan_disks(info, PlanOptions())[-1]
    assert (tpm.target, tpm.action) == ("tpm", COPY)
    with pytest.raises(PreflightError, match=r"emulated TPM.*use mode stop or stop-short"):
        refuse_before_stop(info, PlanOptions(Mode.SNAPSHOT))
    transient = replace(info, persistent=False)
    with pytest.raises(PreflightError, match=r"transient.*deletes its TPM state"):
        refuse_before_stop(transient, PlanOptions())


def test_the_swtpm_state_dir_is_libvirts_default_or_the_domains_own() -> None:
    tpm = parse_domain_xml(f"<domain><devices>{TPM_XML}</devices></domain>").tpms[0]
    assert tpm_state.state_dir(UUID, tpm) == Path(f"/var/lib/libvirt/swtpm/{UUID}/tpm2")
    own = replace(tpm, source_dir="/srv/tpm/web1")
    assert tpm_state.state_dir(UUID, own) == Path("/srv/tpm/web1")
    passthrough = "<tpm model='tpm-tis'><backend type='passthrough'/></tpm>"
    assert parse_domain_xml(f"<domain><devices>{passthrough}</devices></domain>").tpms == []


def test_firmware_facts_are_parsed_from_os() -> None:
    xml = (
        "<domain><os><loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>"
        "<nvram template='/usr/share/OVMF/OVMF_VARS.fd' format='qcow2'>/var/nv.qcow2</nvram>"
        "</os></domain>"
    )
    info = parse_domain_xml(xml)

    assert info.firmware is not None
    assert info.firmware.loader == "/usr/share/OVMF/OVMF_CODE.fd"
    assert info.firmware.loader_type == "pflash"
    assert info.firmware.nvram_template == "/usr/share/OVMF/OVMF_VARS.fd"
    assert info.firmware.nvram_format == "qcow2"
    assert parse_domain_xml("<domain><os><type>hvm</type></os></domain>").firmware is None


def _manifest(**extra: object) -> Manifest:
    disk = DiskRecord("vda", "/img/vda.raw", "raw", 10, 10, "vda.raw", "a" * 64, 10)
    return Manifest(
        2 if extra else 1,
        "web1",
        UUID,
        "host",
        Mode.STOP,
        "2026-01-01T00:00:00+00:00",
        "2026-01-01T00:01:00+00:00",
        1.0,
        "0",
        [disk],
        None,
        [],
        "b" * 64,
        **extra,  # type: ignore[arg-type]
    )


def test_the_manifest_keeps_tpm_firmware_and_media_and_reads_old_ones() -> None:
    state = DiskRecord(
        "tpm:tpm2-00.permall",
        f"/var/lib/libvirt/swtpm/{UUID}/tpm2/tpm2-00.permall",
        "swtpm",
        6146,
        8192,
        "tpm-tpm2-00.permall",
        "c" * 64,
        6146,
    )
    full = _manifest(
        tpm=TpmRecord("tpm-tis", "2.0", f"/var/lib/libvirt/swtpm/{UUID}/tpm2", [state]),
        firmware=FirmwareRecord("/usr/share/OVMF/OVMF_CODE.fd", "pflash", None, None, "raw"),
        not_copied=[NotCopied("sda", "/iso/d.iso", "cdrom", "cdrom image, recorded only")],
    )

    back = Manifest.from_json(full.to_json())
    assert back == full
    assert [r.file for r in back.records] == ["vda.raw", "tpm-tpm2-00.permall"]
    plain = json.loads(_manifest().to_json())
    assert not {"tpm", "firmware", "not_copied"} & plain.keys()  # as before for plain guests
    assert Manifest.from_json(json.dumps(plain)) == _manifest()
    # Format 1 has no such keys; format 2 is the one that may.
    assert json.loads(full.to_json())["format"] == 2
    with pytest.raises(ArchiveError, match="unknown key 'firmware', 'not_copied', 'tpm'"):
        Manifest.from_json(json.dumps(json.loads(full.to_json()) | {"format": 1}))
    with pytest.raises(ArchiveError, match="reads 1, 2, 3"):
        Manifest.from_json(json.dumps(plain | {"format": 0}))


def test_include_readonly_is_a_job_key_that_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "jobs.toml"
    path.write_text(
        '[jobs.n]\nguests = ["web1"]\ndestination = "/srv/b"\ninclude_readonly = true\n'
    )
    [job] = jobs_file.load_jobs(path)
    assert job.include_readonly is True
    jobs_file.save_jobs(path, [job])
    assert jobs_file.load_jobs(path)[0].include_readonly is True
    path.write_text('[jobs.n]\nguests = ["web1"]\ndestination = "/srv/b"\ninclude_readonly = 1\n')
    with pytest.raises(Exception, match="include_readonly"):
        jobs_file.load_jobs(path)


def test_a_backup_records_media_and_copies_them_with_include_readonly(rig: Rig) -> None:  # noqa: F811
    rig.add_guest("web1")
    iso = _raw(rig.root / "install.iso", b"ISO" * 1000)
    rig.hv.guests["web1"].disks.append(_disk("sda", str(iso), device="cdrom", readonly=True))

    assert rig.run(rig.job(["web1"])).ok
    [first] = Archive.open(rig.archive).versions("web1")
    assert [r.target for r in first.manifest.disks] == ["vda"]
    assert [(n.target, n.source) for n in first.manifest.not_copied] == [("sda", str(iso))]
    assert not (first.path / "sda.raw").exists()

    assert rig.run(rig.job(["web1"], include_readonly=True)).ok
    second = Archive.open(rig.archive).versions("web1")[-1]
    assert [r.target for r in second.manifest.disks] == ["vda", "sda"]
    assert (second.path / "sda.raw").read_bytes() == iso.read_bytes()
    assert second.manifest.not_copied == []


def test_job_defaults_leave_media_out() -> None:
    assert Job("n", ["web1"], Path("/srv")).include_readonly is False
