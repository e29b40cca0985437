"""Restore tests, the watch: the order of the signs of life, the clone's isolated XML,
when a job's test is due, and the job keys that set it (issue #14, item 3)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from guestsafe.engine.archive.restore_record import AGENT, CONSOLE, RUNNING, RestoreTest
from guestsafe.engine.errors import JobConfigError
from guestsafe.engine.jobs.jobs_file import load_jobs, save_jobs
from guestsafe.engine.jobs.model import Job, RestoreTestWhen
from guestsafe.engine.restore.boottest.due import is_due
from guestsafe.engine.restore.boottest.isolate import isolate_xml
from guestsafe.engine.restore.boottest.probes import console_file, has_agent_channel
from guestsafe.engine.restore.boottest.signs import Outcome, Wanted, watch


@dataclass
class FakeClone:
    """A clone whose signs appear at given seconds; a fake clock advanced by sleep."""

    agent_at: float | None = None  # None: no agent channel at all
    agent_silent: bool = False
    console: list[tuple[float, str]] | None = field(default_factory=list)  # None: unreadable
    down_at: float | None = None
    now: float = 0.0
    asked: list[str] = field(default_factory=list)

    def down(self) -> str | None:
        self.asked.append("down")
        return (
            "the clone went off" if self.down_at is not None and self.now >= self.down_at else None
        )

    def agent_answers(self) -> bool | None:
        self.asked.append("agent")
        if self.agent_at is None:
            return None
        return not self.agent_silent and self.now >= self.agent_at

    def console_text(self) -> str | None:
        if self.console is None:
            return None
        return "".join(text for at, text in self.console if self.now >= at)

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def clock(self) -> float:
        return self.now


def _watch(clone: FakeClone, line: str | None = "login:", seconds: float = 60) -> Outcome:
    return watch(clone, Wanted(line, seconds), clock=clone.clock, sleep=clone.sleep)


def test_the_agent_comes_first() -> None:
    clone = FakeClone(agent_at=5, console=[(2, "web1 login: ")])
    # The console line came earlier, but an agent is looked for first each poll:
    # at 2 s the agent is not up, so the console wins; with both up, the agent.
    assert _watch(clone).sign == CONSOLE
    both = FakeClone(agent_at=3, console=[(3, "login:")])
    outcome = _watch(both)
    assert outcome.ok and outcome.sign == AGENT and outcome.seconds == pytest.approx(3, abs=0.5)


def test_the_console_line_without_an_agent() -> None:
    clone = FakeClone(console=[(1, "booting\n"), (14, "web1 login: ")])
    outcome = _watch(clone)
    assert outcome.ok and outcome.sign == CONSOLE
    assert outcome.seconds == pytest.approx(14, abs=0.5)
    assert "agent" in clone.asked  # asked, and it said it has no channel


def test_a_named_line_that_never_comes_is_a_failure() -> None:
    outcome = _watch(FakeClone(console=[(1, "booting\n")]), seconds=30)
    assert not outcome.ok and outcome.sign is None
    assert outcome.problem == "no 'login:' on the serial console within 30 s"


def test_without_agent_or_line_it_must_stay_running() -> None:
    outcome = _watch(FakeClone(console=[(1, "booting\n")]), line=None, seconds=20)
    assert outcome.ok and outcome.sign == RUNNING and outcome.seconds >= 20


def test_a_line_named_but_no_console_to_read_falls_back_to_running() -> None:
    outcome = _watch(FakeClone(console=None), seconds=20)
    assert outcome.ok and outcome.sign == RUNNING


def test_a_silent_agent_falls_back_to_the_next_sign() -> None:
    outcome = _watch(FakeClone(agent_at=0, agent_silent=True, console=None), seconds=10)
    assert outcome.ok and outcome.sign == RUNNING


def test_going_down_before_a_sign_fails() -> None:
    outcome = _watch(FakeClone(down_at=4, console=[(1, "booting\n")]), line=None)
    assert not outcome.ok and outcome.problem == "the clone went off"
    assert outcome.seconds == pytest.approx(4, abs=0.5)


def test_a_kernel_panic_on_the_console_fails_and_is_named() -> None:
    panic = "[    1.2] Kernel panic - not syncing: No working init found.  Try passing init=\n"
    outcome = _watch(FakeClone(console=[(2, panic)], down_at=2))
    assert not outcome.ok
    assert outcome.problem == (
        "the guest's kernel panicked: Kernel panic - not syncing: No working init found.  "
        "Try passing init="
    )


DOMAIN = """<domain type='qemu'><name>c</name>
<on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot>
<devices>
 <interface type='network'><mac address='52:54:00:00:00:01'/><link state='up'/></interface>
 <interface type='user'><mac address='52:54:00:00:00:02'/></interface>
 <serial type='file'><source path='/var/log/c.log'/><target port='0'/></serial>
 <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
</devices></domain>"""


def test_the_clone_is_cut_off_and_boots_once() -> None:
    root = ET.fromstring(isolate_xml(DOMAIN))
    links = root.findall("./devices/interface/link")
    assert len(links) == 2 and all(link.attrib == {"state": "down"} for link in links)
    assert root.findtext("on_reboot") == "destroy" and root.findtext("on_crash") == "destroy"
    assert root.findtext("on_poweroff") == "destroy"
    tags = [child.tag for child in root]
    assert tags.index("on_crash") < tags.index("devices")


def _pty_domain(folder: Path, devices: str) -> str:
    return (
        "<domain type='qemu'><name>web1-restore-test</name><devices>"
        f"<disk type='file'><source file='{folder}/web1-restore-test-vda.qcow2'/></disk>"
        f"{devices}</devices></domain>"
    )


def test_a_pty_console_gets_a_log_beside_the_overlays(tmp_path: Path) -> None:
    serial = "<serial type='pty'><target port='0'/></serial>"
    console = "<console type='pty'><target type='serial' port='0'/></console>"
    (tmp_path / "web1-restore-test-console.log").write_text("an older test's")
    root = ET.fromstring(isolate_xml(_pty_domain(tmp_path, serial + console)))
    logs = [dev.find("log") for dev in root.findall("./devices/*") if dev.tag != "disk"]
    # serial and its console view carry one log, new (the old file is not reused)
    files = {log.get("file") for log in logs if log is not None}
    assert len(logs) == 2 and files == {str(tmp_path / "1-web1-restore-test-console.log")}
    assert console_file(ET.tostring(root, encoding="unicode")) == Path(files.pop() or "")


def test_a_logged_or_file_console_and_a_virtio_console_are_handled(tmp_path: Path) -> None:
    logged = "<serial type='pty'><log file='/l/own.log'/><target port='0'/></serial>"
    root = ET.fromstring(isolate_xml(_pty_domain(tmp_path, logged)))
    assert [log.get("file") for log in root.iter("log")] == ["/l/own.log"]
    virtio = "<console type='pty'><target type='virtio' port='0'/></console>"
    root = ET.fromstring(isolate_xml(_pty_domain(tmp_path, virtio)))
    assert [log.get("file") for log in root.iter("log")] == [
        str(tmp_path / "web1-restore-test-console.log")
    ]
    assert not list(ET.fromstring(isolate_xml(DOMAIN)).iter("log"))  # a file serial: none


def test_the_probes_find_the_console_file_and_the_agent_channel() -> None:
    assert console_file(DOMAIN) == Path("/var/log/c.log")
    assert has_agent_channel(DOMAIN)
    bare = "<domain><devices><serial type='pty'/></devices></domain>"
    assert console_file(bare) is None and not has_agent_channel(bare)
    logged = (
        "<domain><devices><serial type='pty'><log file='/l/x.log'/></serial></devices></domain>"
    )
    assert console_file(logged) == Path("/l/x.log")


@dataclass(frozen=True)
class _Version:
    restore_test: RestoreTest | None


NOW = datetime(2026, 12, 3, 17, 0, tzinfo=UTC)


def _tested(days_ago: float) -> _Version:
    at = (NOW - timedelta(days=days_ago)).isoformat()
    return _Version(RestoreTest(ok=True, at=at, sign=RUNNING, seconds=60.0))


def test_when_a_test_is_due() -> None:
    never_tested: list[Any] = [_Version(None)]
    assert not is_due("never", never_tested, NOW)
    assert is_due("always", [_tested(0)], NOW)
    assert is_due("weekly", never_tested, NOW)
    assert not is_due("weekly", [_tested(6.9), _Version(None)], NOW)
    assert is_due("weekly", [_tested(7.1)], NOW)


def test_the_job_keys_round_trip_and_default_to_never(tmp_path: Path) -> None:
    path = tmp_path / "jobs.toml"
    job = Job("nightly", ["web1"], Path("/srv/backup"))
    assert job.restore_test == RestoreTestWhen.NEVER
    job.restore_test = RestoreTestWhen.WEEKLY
    job.restore_test_console = "login:"
    job.restore_test_seconds = 120
    save_jobs(path, [job])

    (loaded,) = load_jobs(path)
    assert (loaded.restore_test, loaded.restore_test_console, loaded.restore_test_seconds) == (
        "weekly",
        "login:",
        120,
    )
    save_jobs(path, [Job("plain", ["web1"], Path("/srv/backup"))])
    assert "restore_test" not in path.read_text()  # defaults are not written


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("restore_test", "daily", "restore_test must be one of never, weekly, always"),
        ("restore_test_console", "", "restore_test_console must be a line of text"),
        ("restore_test_console", "a\nb", "restore_test_console must be a line of text"),
        ("restore_test_seconds", 0, "restore_test_seconds must be at least 1"),
        ("restore_test_seconds", True, "restore_test_seconds must be a whole number"),
    ],
)
def test_bad_restore_test_keys_are_named(
    tmp_path: Path, key: str, value: object, fragment: str
) -> None:
    path = tmp_path / "jobs.toml"
    table = {"guests": ["web1"], "destination": "/srv/backup", key: value}
    path.write_text(tomli_w.dumps({"jobs": {"nightly": table}}))
    with pytest.raises(JobConfigError) as info:
        load_jobs(path)
    assert any(fragment in p.message and p.field == key for p in info.value.problems), [
        p.message for p in info.value.problems
    ]
