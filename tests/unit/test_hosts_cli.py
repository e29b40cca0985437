"""Issue 16, hosts: --host on the CLI, on the test driver as a second host."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import test_hosts_archive as archives

from guestsafe.engine.archive.store import Archive
from guestsafe.engine.backup.journal import Journal, JournalEntry
from guestsafe.engine.hypervisor.domain_xml import RUNNING
from guestsafe.tui.cli import main

DOWN_URI = "qemu+ssh://root@127.0.0.1:1/system"


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("GUESTSAFE_HOME", str(tmp_path / "home"))
    path = tmp_path / "jobs.toml"
    path.write_text(f'[hosts.t2]\nuri = "test:///default"\n\n[hosts.down]\nuri = "{DOWN_URI}"\n')
    return path


def _gs(config: Path, *args: str) -> list[str]:
    return ["--connect", "test:///default", "--config", str(config), *args]


def test_guests_lists_each_host_with_its_state(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(_gs(config, "guests"))
    out, err = capsys.readouterr()
    assert code == 4  # a host did not answer
    lines = out.splitlines()
    assert lines[0] == "host local (test:///default): connected"
    assert "host t2 (test:///default): connected" in lines
    down = next(line for line in lines if line.startswith("host down"))
    assert "unreachable" in down and "Connection refused" in down
    assert "unreachable: down" in err
    assert main(_gs(config, "guests", "--host", "t2")) == 0
    out, _err = capsys.readouterr()
    assert out.splitlines()[0] == "host t2 (test:///default): connected" and "down" not in out
    assert main(_gs(config, "guests", "--host", "node9")) == 3
    assert "'node9' is not defined" in capsys.readouterr().err


def test_list_asks_for_the_host_where_two_hosts_backed_up_one_name(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    archives.test_two_hosts_web1_are_two_series_in_one_archive(tmp_path)  # web1 of 3 hosts
    dest = str(tmp_path / "backup")
    assert Archive.open(Path(dest)).guests() == ["node1/web1", "node2/web1", "web1"]

    assert main(_gs(config, "list", "web1", "--dest", dest)) == 2
    assert "name one with --host" in capsys.readouterr().err
    assert main(_gs(config, "list", "web1", "--host", "node2", "--dest", dest)) == 0
    rows = _version_rows(capsys.readouterr().out)
    assert [row.split()[0] for row in rows] == ["node2/web1"]
    assert main(_gs(config, "list", "--host", "node1", "--dest", dest)) == 0
    rows = _version_rows(capsys.readouterr().out)
    assert [row.split()[0] for row in rows] == ["node1/web1"]
    assert main(_gs(config, "verify", "web1", "--host", "local", "--dest", dest)) == 0
    assert capsys.readouterr().out.splitlines() == ["web1 version 1: ok"]


def _version_rows(out: str) -> list[str]:
    """The table's rows: not its header, nor the space total printed per archive below it."""
    return [line for line in out.splitlines()[1:] if " version(s) take " not in line]


TEST_GUEST_UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"  # test:///default's guest "test"


def test_recover_host_acts_on_that_hosts_journal_entries_alone(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run that lost node2 mid-stream left its guest to recover: --host node2 takes it
    up once node2 answers, and says what is left while it does not."""
    journal = Journal(tmp_path / "home" / "state")
    gone = JournalEntry("nightly", "web1", str(uuid.uuid4()), DOWN_URI, RUNNING, detached=True)
    back = JournalEntry("nightly", "test", TEST_GUEST_UUID, "test:///default", RUNNING)
    back.detached = True
    journal.write(gone)
    journal.write(back)

    assert main(_gs(config, "recover", "--host", "down")) == 4
    err = capsys.readouterr().err
    assert "still to recover on host down: web1" in err
    assert {e.guest for e in journal.entries()} == {"web1", "test"}  # t2's untouched

    assert main(_gs(config, "recover", "--host", "t2")) == 0
    assert capsys.readouterr().out.strip() == "recovered"
    assert [e.guest for e in journal.entries()] == ["web1"]  # down's kept for later
    assert main(_gs(config, "recover", "--host", "node9")) == 3
    assert "'node9' is not defined" in capsys.readouterr().err
