"""Issue 7, case 14: a bad jobs.toml is one clear line naming job and field, and no
run starts: no guest stopped, no run log, CLI exit code 2.

Guests on libvirt's test driver with real disk files; the console's form is
checked in tests/tui/test_bad_form_input.py and tests/tui/test_console_flows.py.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from rig.testnode import DriverNode, NodeGuest, node_engine, run_cli, write_node

from guestsafe.engine.api import Engine
from guestsafe.engine.errors import ConfigError


@dataclass
class Bad:
    node: DriverNode
    home: Path
    dest: Path
    engine: Engine

    def write(self, text: str) -> None:
        config = self.engine.paths.config_file
        config.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        config.write_text(text)


@pytest.fixture
def bad(tmp_path: Path) -> Iterator[Bad]:
    node = write_node(tmp_path / "node", [NodeGuest("web", macs=["52:54:00:63:00:01"])])
    dest = tmp_path / "archive"
    dest.mkdir(mode=0o700)
    engine = node_engine(node, tmp_path / "home")
    try:
        yield Bad(node, tmp_path / "home", dest, engine)
    finally:
        engine.close()


@pytest.fixture
def regular_file_in_dev() -> Iterator[Path]:
    """A regular file whose path looks like a device node."""
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path("/dev")
    path = base / f"guestsafe-test-{uuid.uuid4().hex[:8]}"
    path.write_bytes(b"not a disk\n")
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def _job(dest: Path, extra: str = "") -> str:
    return f'[jobs.nightly]\nguests = ["web"]\ndestination = "{dest}"\n{extra}'


CASES = {
    "malformed TOML": (lambda d: _job(d).replace('["web"]', '["web"'), ("line 3", "TOML")),
    "unknown key": (lambda d: _job(d, "kepp = 3\n"), ("job 'nightly'", "unknown key 'kepp'")),
    "keep 0": (lambda d: _job(d, "keep = 0\n"), ("job 'nightly'", "keep must be at least 1")),
    "time 25:00": (lambda d: _job(d, 'time = "25:00"\n'), ("job 'nightly'", "time must be")),
    "device not under /dev": (
        lambda d: _job(d, f'device = "{d}"\n'),
        ("job 'nightly'", "device '", "must be /dev/..., UUID=... or LABEL=..."),
    ),
}


def _assert_no_run(bad: Bad) -> None:
    assert bad.engine.hv.state("web") == "running"
    log_dir = bad.engine.paths.log_dir
    assert not log_dir.exists() or list(log_dir.iterdir()) == []
    journal = bad.engine.paths.state_dir / "journal"
    assert not journal.exists() or list(journal.iterdir()) == []
    assert list(bad.dest.iterdir()) == []


@pytest.mark.parametrize("case", list(CASES))
def test_bad_config_is_one_line_and_no_run_starts(bad: Bad, case: str) -> None:
    make, expected = CASES[case]
    bad.write(make(bad.dest))

    with pytest.raises(ConfigError) as info:
        bad.engine.run_job("nightly")
    assert all(part in info.value.message for part in expected), info.value.message
    assert "\n" not in info.value.message
    _assert_no_run(bad)

    for args in (["run", "nightly"], ["run-due"], ["jobs"]):
        proc = run_cli(bad.node, bad.home, *args)
        assert proc.returncode == 2, (args, proc.stderr)
        [line] = proc.stderr.strip().splitlines()
        assert line.startswith("guestsafe: Invalid configuration: "), line
        assert str(bad.engine.paths.config_file) in line
        assert all(part in line for part in expected), line
        assert proc.stdout == ""
    _assert_no_run(bad)


def test_a_device_path_that_is_a_regular_file_starts_no_run(
    bad: Bad, regular_file_in_dev: Path
) -> None:
    bad.write(_job(bad.dest, f'device = "{regular_file_in_dev}"\n'))
    expected = f"job 'nightly': device {regular_file_in_dev} is not a block device"

    with pytest.raises(ConfigError, match="is not a block device") as info:
        bad.engine.run_job("nightly")
    assert info.value.message == expected
    assert info.value.exit_code == 2
    _assert_no_run(bad)

    proc = run_cli(bad.node, bad.home, "run", "nightly")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"guestsafe: Invalid configuration: {expected}"]
    _assert_no_run(bad)


def test_a_missing_device_still_runs_and_logs_why(bad: Bad) -> None:
    """Unplugged is not misconfigured: the timer's run says so in its log."""
    bad.write(_job(bad.dest, 'device = "/dev/guestsafe-test-unplugged"\n'))

    result = bad.engine.run_job("nightly")

    assert not result.ok
    assert "/dev/guestsafe-test-unplugged" in result.log_path.read_text()
    assert bad.engine.hv.state("web") == "running"
