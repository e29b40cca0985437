"""Restore tests, the record: restore-test.json's format, verify passing it by, and
retention's "last good version" rule with a failed test (issue #14, item 3)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import blake3
import pytest

from guestsafe.engine.archive.manifest import DiskRecord, Manifest, is_safe_file_name
from guestsafe.engine.archive.restore_record import (
    RESTORE_TEST_FILE,
    RestoreTest,
    read_restore_test,
    write_restore_test,
)
from guestsafe.engine.archive.store import Archive
from guestsafe.engine.archive.versions import VersionInfo
from guestsafe.engine.events import GuestOutcome
from guestsafe.engine.notify import NotifyConfig, RunReport, wanted
from guestsafe.engine.restore.boottest.run import clone_name

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


PASSED = RestoreTest(ok=True, at="2026-12-03T17:00:00+00:00", sign="console", seconds=14.2)
FAILED = RestoreTest(
    ok=False,
    at="2026-12-03T17:00:00+00:00",
    sign=None,
    seconds=None,
    problem="the guest's kernel panicked: Kernel panic - not syncing: No working init found.",
)
COULD_NOT_RUN = RestoreTest(
    ok=False,
    at="2026-12-03T17:00:00+00:00",
    sign=None,
    seconds=None,
    problem="the clone could not be started: cannot create /srv/backup/web/7/x: read-only",
    error=True,
)


@pytest.fixture
def archive(tmp_path: Path) -> Archive:
    return Archive.open(tmp_path / "backup", create=True)


def _on_disk(archive: Archive) -> list[int]:
    return sorted(int(n) for n in os.listdir(archive.root / "web") if n.isdigit())


def test_the_record_reads_back_as_written_with_the_documented_keys(tmp_path: Path) -> None:
    write_restore_test(tmp_path, PASSED)

    data = json.loads((tmp_path / RESTORE_TEST_FILE).read_text())
    assert set(data) == {"ok", "at", "sign", "seconds", "problem", "screenshot", "error"}
    assert read_restore_test(tmp_path) == PASSED
    assert oct((tmp_path / RESTORE_TEST_FILE).stat().st_mode & 0o777) == "0o600"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("text", ["", "{", "[]", '{"ok": "yes"}', '{"at": "2026-12-03"}', "null"])
def test_a_record_that_proves_nothing_reads_as_never_tested(tmp_path: Path, text: str) -> None:
    (tmp_path / RESTORE_TEST_FILE).write_text(text)
    assert read_restore_test(tmp_path) is None


def test_labels_as_the_list_shows_them() -> None:
    assert PASSED.label() == "boot ok 14 s"
    assert FAILED.label() == "boot FAILED"
    assert COULD_NOT_RUN.label() == "boot error"


def test_a_test_that_could_not_run_reads_back_and_is_no_failure(tmp_path: Path) -> None:
    write_restore_test(tmp_path, COULD_NOT_RUN)
    assert json.loads((tmp_path / RESTORE_TEST_FILE).read_text())["error"] is True
    assert read_restore_test(tmp_path) == COULD_NOT_RUN
    assert COULD_NOT_RUN.failed is False and FAILED.failed is True and PASSED.failed is False
    # A record from before the key existed reads as the verdict it states.
    (tmp_path / RESTORE_TEST_FILE).write_text('{"ok": false, "at": "x", "problem": "off"}')
    old = read_restore_test(tmp_path)
    assert old is not None and old.error is False and old.label() == "boot FAILED"
    # "error" means nothing on a passed test.
    (tmp_path / RESTORE_TEST_FILE).write_text('{"ok": true, "at": "x", "error": true}')
    passed = read_restore_test(tmp_path)
    assert passed is not None and not passed.error and passed.label().startswith("boot ok")


def test_the_record_changes_neither_b3sums_nor_the_manifest_and_verify_passes_it_by(
    archive: Archive,
) -> None:
    version = _backup(archive)
    before = {p.name: p.read_bytes() for p in version.path.iterdir()}
    write_restore_test(version.path, FAILED)
    (version.path / "restore-test.ppm").write_bytes(b"P6\n1 1\n255\n\0\0\0")

    after = {p.name: p.read_bytes() for p in version.path.iterdir()}
    assert {n: b for n, b in after.items() if n in before} == before
    report = archive.verify("web", version.number)[0]
    assert report.ok, report.problems
    assert archive.versions("web")[0].restore_test == FAILED


def test_a_disk_may_not_take_a_record_name() -> None:
    for name in (RESTORE_TEST_FILE, "restore-test.png", "Restore-Test.PPM"):
        assert not is_safe_file_name(name)


def test_a_version_whose_test_failed_is_not_the_last_good_version(archive: Archive) -> None:
    first = _backup(archive)
    archive.verify("web", first.number)
    second = _backup(archive)
    archive.verify("web", second.number)  # verified, but it did not boot
    write_restore_test(second.path, FAILED)
    _backup(archive)  # the newest, never verified

    # keep = 1: the newest stays; the newest *good* verified one is 1, not 2;
    # 2 is bad and one good version is newer than it, so it goes.
    assert archive.apply_retention("web", 1) == [2]
    assert _on_disk(archive) == [1, 3]


def test_a_passed_test_leaves_the_rule_as_before(archive: Archive) -> None:
    first = _backup(archive)
    archive.verify("web", first.number)
    second = _backup(archive)
    archive.verify("web", second.number)
    write_restore_test(second.path, PASSED)
    _backup(archive)

    assert archive.apply_retention("web", 1) == [1]
    assert _on_disk(archive) == [2, 3]


def test_a_test_that_could_not_run_leaves_the_rule_as_before(archive: Archive) -> None:
    first = _backup(archive)
    archive.verify("web", first.number)
    second = _backup(archive)
    archive.verify("web", second.number)
    write_restore_test(second.path, COULD_NOT_RUN)  # this host's fault, not the version's
    _backup(archive)

    assert archive.apply_retention("web", 1) == [1]
    assert _on_disk(archive) == [2, 3]


def test_a_failed_test_is_kept_until_enough_good_versions_are_newer(archive: Archive) -> None:
    _backup(archive)
    _backup(archive)
    write_restore_test(archive.version("web", 2).path, FAILED)

    assert archive.apply_retention("web", 1) == []  # the newest: never deleted
    assert _on_disk(archive) == [1, 2]


def test_a_failed_restore_test_is_news_even_after_a_good_backup() -> None:
    outcome = GuestOutcome("web1", True, 7, 12.0, 1 << 20, 30.0, "backup ok")
    line = "restore test of web1 version 7: FAILED: the clone went off before a sign of life"
    report = RunReport(
        "nightly",
        True,
        "/var/log/guestsafe/x.log",
        [outcome],
        host="hv1",
        restore_tests=[line],
        restore_tests_failed=1,
    )
    config = NotifyConfig(mail_to=("ops@example.org",), on_success=False)

    assert wanted(config, report)
    assert report.subject() == (
        "guestsafe: job nightly ok on hv1 (restore test FAILED for 1 guest)"
    )
    assert line in report.body()
    assert report.payload()["restore_tests"] == [line]
    quiet = RunReport("nightly", True, "/x.log", [outcome], host="hv1", restore_tests=["passed"])
    assert not wanted(config, quiet)


def test_a_test_clone_of_another_hosts_series_has_a_name_libvirt_takes() -> None:
    assert clone_name("web1") == "web1-restore-test"
    assert clone_name("node2/web1") == "node2-web1-restore-test"
