"""manifest.json: round trips and strict validation."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guestsafe.engine.archive.manifest import (
    FORMAT_VERSION,
    DiskRecord,
    Manifest,
    b3sums_text,
    is_safe_file_name,
)
from guestsafe.engine.errors import ArchiveError

DIGEST = "ab" * 32


def disk(file: str = "vda.qcow2", target: str = "vda", **changes: Any) -> DiskRecord:
    record = DiskRecord(
        target=target,
        source=f"/var/lib/libvirt/images/{file}",
        format="qcow2",
        virtual_size=10 * 2**30,
        allocated_size=2 * 2**30,
        file=file,
        blake3=DIGEST,
        size=2 * 2**30 + 196_608,
    )
    return replace(record, **changes)


def manifest(**changes: Any) -> Manifest:
    base = Manifest(
        format=FORMAT_VERSION,
        guest="web",
        uuid="6f2d8d1e-5a3c-4b59-9d61-1a2b3c4d5e6f",
        host="hv1",
        mode="stop",
        started="2025-03-01T02:00:00+00:00",
        finished="2025-03-01T02:03:10Z",
        downtime=42.5,
        tool_version="0.1.0",
        disks=[disk(), disk("vdb.raw", "vdb", format="raw")],
        nvram=disk("nvram.fd", "nvram", format="fd", size=540_672),
        notes=["powered off after the shutdown timeout"],
        domain_xml_blake3="cd" * 32,
    )
    return replace(base, **changes)


def as_dict(m: Manifest) -> dict[str, Any]:
    data = json.loads(m.to_json())
    assert isinstance(data, dict)
    return data


def load(data: dict[str, Any], version: int | None = 3) -> Manifest:
    return Manifest.from_json(json.dumps(data), version=version)


def test_round_trip() -> None:
    m = manifest()
    assert Manifest.from_json(m.to_json()) == m
    assert Manifest.from_json(m.to_json().encode()) == m
    assert m.records == [*m.disks, m.nvram]


def test_a_clock_stepped_back_does_not_spoil_a_version() -> None:
    m = manifest(finished="2025-03-01T01:59:59+00:00")
    assert Manifest.from_json(m.to_json()) == m


def test_round_trip_without_nvram_or_downtime() -> None:
    m = manifest(nvram=None, downtime=None, notes=[], disks=[])
    assert Manifest.from_json(m.to_json()) == m


def test_hostile_guest_name_survives_as_ascii_json() -> None:
    m = manifest(guest="\x1b[31m[b]\ud800 日本")
    text = m.to_json()
    assert text.isascii()
    assert Manifest.from_json(text).guest == m.guest


def test_newer_format_is_refused_with_guest_and_version() -> None:
    data = as_dict(manifest())
    data["format"] = 4  # 2: versions with TPM state, 3: with chunk tables
    with pytest.raises(ArchiveError, match=r"manifest of web version 3 uses archive format 4"):
        load(data)


@pytest.mark.parametrize("value", [0, -1, "1", 1.0, True, None])
def test_other_format_values_are_refused(value: object) -> None:
    data = as_dict(manifest())
    data["format"] = value
    with pytest.raises(ArchiveError, match="format"):
        load(data)


UNSAFE = [
    "",
    ".",
    "..",
    "../vda.qcow2",
    "../../etc/shadow",
    "/etc/shadow",
    "a/b",
    "a\\b",
    ".hidden",
    ".partial-1",
    "-rf",
    "vda\x00.qcow2",
    "vda\n.qcow2",
    "vda .qcow2",
    "vda.",
    "manifest.json",
    "DOMAIN.XML",
    "verified.json",
    "B3SUMS",
    "x" * 129,
    "vdä.qcow2",
]


@pytest.mark.parametrize("name", UNSAFE)
def test_unsafe_file_names_are_refused(name: str) -> None:
    assert not is_safe_file_name(name)
    data = as_dict(manifest())
    data["disks"][0]["file"] = name
    with pytest.raises(ArchiveError, match=r"manifest of web version 3 names an unsafe file"):
        load(data)


@pytest.mark.parametrize("name", UNSAFE)
def test_unsafe_nvram_names_are_refused(name: str) -> None:
    data = as_dict(manifest())
    data["nvram"]["file"] = name
    with pytest.raises(ArchiveError, match="unsafe file"):
        load(data)


@pytest.mark.parametrize("name", ["vda.qcow2", "sda.raw", "nvram.fd", "hdc", "disk_0-1.img"])
def test_plain_names_are_safe(name: str) -> None:
    assert is_safe_file_name(name)


def test_to_json_refuses_what_from_json_would() -> None:
    with pytest.raises(ArchiveError, match="unsafe file"):
        manifest(disks=[disk("../x")]).to_json()
    with pytest.raises(ArchiveError, match="size"):
        manifest(disks=[disk(size=None)]).to_json()
    with pytest.raises(ArchiveError, match="domain_xml_blake3"):
        manifest(domain_xml_blake3=None).to_json()


def broken(path: str, value: Any) -> dict[str, Any]:
    data = as_dict(manifest())
    *parents, key = path.split(".")
    node: Any = data
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    if value is KeyError:
        del node[key]
    else:
        node[key] = value
    return data


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("guest", "", "guest"),
        ("guest", 7, "guest"),
        ("uuid", "not-a-uuid", "uuid"),
        ("uuid", "6F2D8D1E-5A3C-4B59-9D61-1A2B3C4D5E6F", "uuid"),
        ("mode", "live", "mode"),
        ("started", "yesterday", "started"),
        ("started", "2025-03-01T02:00:00", "UTC"),
        ("started", "2025-03-01T02:00:00+01:00", "UTC"),
        ("downtime", -1, "downtime"),
        ("downtime", "12", "downtime"),
        ("downtime", True, "downtime"),
        ("tool_version", None, "tool_version"),
        ("notes", "text", "notes"),
        ("notes", [1], "notes"),
        ("disks", {}, "disks"),
        ("disks", [1], "disks"),
        ("nvram", [], "nvram"),
        ("domain_xml_blake3", "AB" * 32, "domain_xml_blake3"),
        ("disks.0.blake3", "ab" * 31, "blake3"),
        ("disks.0.blake3", "xy" * 32, "blake3"),
        ("disks.0.size", -1, "size"),
        ("disks.0.size", True, "size"),
        ("disks.0.size", None, "size"),
        ("disks.0.virtual_size", 1.5, "virtual_size"),
        ("disks.0.format", "../qcow2", "format"),
        ("disks.0.target", "", "target"),
        ("disks.0.source", 3, "source"),
        ("disks.1.file", "VDA.qcow2", "file 'vda.qcow2' twice"),
        ("disks.1.target", "vda", "target 'vda' twice"),
        ("disks.0.extra", 1, "unknown key"),
        ("disks.0.blake3", KeyError, "lacks"),
        ("extra", 1, "unknown key"),
        ("nvram", KeyError, "lacks"),
    ],
)
def test_invalid_fields_are_refused(path: str, value: Any, message: str) -> None:
    with pytest.raises(ArchiveError, match=message):
        load(broken(path, value))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "[]",
        "{",
        '{"format": 1, "format": 1}',
        '{"format": NaN}',
        "\xff",
        "[" * 100_000,
    ],
)
def test_garbage_is_refused(text: str) -> None:
    with pytest.raises(ArchiveError, match="manifest"):
        Manifest.from_json(text)


def test_duplicate_keys_are_refused() -> None:
    text = manifest().to_json().replace('"host": "hv1",', '"host": "hv1", "host": "evil",')
    with pytest.raises(ArchiveError, match="twice"):
        Manifest.from_json(text)


def test_b3sums_lists_every_file_for_b3sum_check() -> None:
    m = manifest()
    assert b3sums_text(m) == (
        f"{DIGEST}  vda.qcow2\n{DIGEST}  vdb.raw\n{DIGEST}  nvram.fd\n{'cd' * 32}  domain.xml\n"
    )


NAMES = st.from_regex(r"[a-z][a-z0-9]{0,7}", fullmatch=True)


@given(
    guest=st.text(min_size=1),
    targets=st.lists(NAMES, max_size=4, unique=True),
    downtime=st.none() | st.floats(min_value=0, max_value=1e6),
    notes=st.lists(st.text()),
    sizes=st.integers(min_value=0, max_value=2**63),
)
def test_any_valid_manifest_round_trips(
    guest: str, targets: list[str], downtime: float | None, notes: list[str], sizes: int
) -> None:
    disks = [disk(f"{t}.raw", t, size=sizes, virtual_size=sizes) for t in targets]
    m = manifest(guest=guest, disks=disks, nvram=None, downtime=downtime, notes=notes)
    assert Manifest.from_json(m.to_json(), version=1) == m
