"""Issue 16, hosts: two hosts' guests of one name are two series; the manifest says whose."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import test_manifest as manifests

from guestsafe.engine.archive.manifest import DEVICE_STATE_FORMAT, FORMAT_VERSION, Manifest
from guestsafe.engine.archive.names import (
    decode_guest_dir,
    encode_guest_name,
    pick_series,
    series_name,
    split_series,
)
from guestsafe.engine.archive.store import Archive
from guestsafe.engine.errors import AmbiguousGuest, ArchiveError


def test_a_local_guest_keeps_its_folder_and_a_remote_one_gets_a_host_qualified_one() -> None:
    assert series_name("web1") == series_name("web1", "local") == "web1"
    assert encode_guest_name(series_name("web1")) == "web1"  # as before hosts existed
    remote = series_name("web1", "node2")
    folder = encode_guest_name(remote)
    assert folder == "node2%2Fweb1"
    assert "/" not in folder and not folder.startswith((".", "-"))
    assert decode_guest_dir(folder) == remote
    assert split_series(remote) == ("node2", "web1")
    assert split_series("web1") == ("local", "web1")
    with pytest.raises(ArchiveError):
        series_name("web1", "a/b")


def test_two_hosts_web1_are_two_series_in_one_archive(tmp_path: Path) -> None:
    archive = Archive.open(tmp_path / "backup", create=True)
    numbers = {}
    for series in ("web1", series_name("web1", "node2"), series_name("web1", "node1")):
        partial = archive.begin(series)
        partial.write_domain_xml("<domain/>\n")
        payload = series.encode()
        partial.file_path("vda.raw").write_bytes(payload)
        record = replace(
            manifests.disk("vda.raw", format="raw"),
            blake3=str(__import__("blake3").blake3(payload).hexdigest()),
            virtual_size=len(payload),
            allocated_size=len(payload),
            size=None,
        )
        host = split_series(series)[0]
        manifest = manifests.manifest(
            guest="web1",
            disks=[record],
            nvram=None,
            host_name=None if host == "local" else host,
            format=FORMAT_VERSION if host == "local" else DEVICE_STATE_FORMAT,
            domain_xml_blake3=None,
        )
        numbers[series] = partial.commit(manifest).number
    assert numbers == {"web1": 1, "node2/web1": 1, "node1/web1": 1}  # own numbering each
    assert archive.guests() == ["node1/web1", "node2/web1", "web1"]
    assert sorted(p.name for p in archive.root.iterdir() if p.is_dir()) == [
        "node1%2Fweb1",
        "node2%2Fweb1",
        "web1",
    ]
    again = Archive.open(tmp_path / "backup")
    assert again.version("node2/web1", 1).manifest.host_name == "node2"
    assert again.version("web1", 1).manifest.host_name is None
    assert [r.ok for r in again.verify()] == [True, True, True]


def test_pick_series_asks_for_the_host_where_the_name_is_ambiguous() -> None:
    known = ["web1", "node2/web1", "node2/db1"]
    assert pick_series(known, "db1") == "node2/db1"  # one host only: that one
    assert pick_series(known, "web1", "node2") == "node2/web1"
    assert pick_series(known, "web1", "local") == "web1"
    assert pick_series(known, "new1") == "new1"  # never backed up: this machine's
    with pytest.raises(AmbiguousGuest, match=r"local, node2.*--host"):
        pick_series(known, "web1")


def test_the_manifest_records_the_host_name_and_uuid_in_format_2() -> None:
    m = manifests.manifest(host_name="node2", format=DEVICE_STATE_FORMAT)
    data = manifests.as_dict(m)
    assert data["host_name"] == "node2"
    assert data["uuid"] == "6f2d8d1e-5a3c-4b59-9d61-1a2b3c4d5e6f"
    assert Manifest.from_json(m.to_json()) == m


def test_an_old_manifest_without_a_host_name_stays_readable_as_this_machines() -> None:
    data = manifests.as_dict(manifests.manifest())
    assert "host_name" not in data and data["format"] == FORMAT_VERSION
    assert manifests.load(data).host_name is None


@pytest.mark.parametrize(
    ("fmt", "value", "message"),
    [
        (FORMAT_VERSION, "node2", "unknown key"),  # format 1 readers know no host_name
        (DEVICE_STATE_FORMAT, "../etc", "not a host name"),
        (DEVICE_STATE_FORMAT, "", "host_name"),
        (DEVICE_STATE_FORMAT, 7, "host_name"),
    ],
)
def test_a_bad_host_name_is_refused(fmt: int, value: object, message: str) -> None:
    data = manifests.as_dict(manifests.manifest(format=fmt))
    data["host_name"] = value
    with pytest.raises(ArchiveError, match=message):
        Manifest.from_json(json.dumps(data))


def test_retention_looks_after_the_series_of_the_jobs_own_hosts() -> None:
    from guestsafe.engine.jobs.coverage import job_series
    from guestsafe.engine.jobs.model import Job

    archived = ["web1", "scratch1", "node2/web1", "node2/scratch2", "node3/db1"]
    listed = Job("n", ["web1"], Path("/b"), hosts=["node2"])
    assert job_series(listed, archived) == ["node2/web1"]  # not this machine's web1
    local = Job("l", ["web1"], Path("/b"))
    assert job_series(local, archived) == ["web1"]
    everything = Job("a", [], Path("/b"), all_guests=True, exclude=["scratch*"])
    everything.hosts = ["local", "node2"]
    assert job_series(everything, archived) == ["web1", "node2/web1"]
