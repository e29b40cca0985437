"""guests = "all", exclude and a job's own mail_to, against real guests under qemu:///system.

The libvirtd is shared with other tests, so an all-guests job here must not touch
their guests: ``only_prefix`` makes the exclude patterns that leave out every
guest whose name does not start with this test's own prefix. The job still
decides at run time, from the hypervisor's listing, which guests it backs up.
"""

from __future__ import annotations

import email
import random
import string
from pathlib import Path

import pytest
from rig.gs import GS
from rig.guest import NAME_PREFIX

from guestsafe.engine.api import Job
from guestsafe.engine.jobs.model import Schedule

pytestmark = pytest.mark.integration


def only_prefix(prefix: str) -> list[str]:
    """fnmatch patterns matching every name that does not start with ``prefix``."""
    patterns = [f"{prefix[:i]}[!{prefix[i]}]*" for i in range(len(prefix))]
    patterns += [prefix[:i] for i in range(1, len(prefix))]  # a name that is a proper prefix
    return patterns


def _prefix() -> str:
    token = "".join(random.choices(string.ascii_lowercase, k=5))
    return f"h15{token}"  # the factory names guests gstest-<label>-<random>


def _all_job(gs: GS, name: str, prefix: str, *extra: str, **options: object) -> Job:
    exclude = only_prefix(NAME_PREFIX + prefix) + list(extra)
    job = Job(
        name,
        [],
        gs.archive,
        schedule=Schedule(None),
        all_guests=True,
        exclude=exclude,
        lock_wait=0,
        **options,  # type: ignore[arg-type]
    )
    gs.engine.save_job(job)
    return job


def test_only_prefix_patterns() -> None:
    from guestsafe.engine.jobs.coverage import excluded

    patterns = only_prefix("gstest-h15ab")
    assert not excluded("gstest-h15ab-x-1234", patterns)
    for other in ("gstest-run-1234", "web1", "gstest-h15a", "gstest-h15ac-1", ""):
        assert excluded(other, patterns) or other == "", other


def test_all_guests_takes_a_guest_defined_after_the_job_and_leaves_out_the_excluded(
    gs: GS, guest_factory
) -> None:
    prefix = _prefix()
    early = guest_factory(f"{prefix}a", start=False)
    _all_job(gs, "everything", prefix, f"{NAME_PREFIX}{prefix}scratch*")
    late = guest_factory(f"{prefix}b", start=False)  # defined after the job was saved
    scratch = guest_factory(f"{prefix}scratch", start=False)

    result = gs.engine.run_job("everything")

    assert result.ok, (result.outcomes, result.problems)
    assert sorted(o.guest for o in result.outcomes) == sorted([early.name, late.name])
    assert [v.number for v in gs.versions(early)] == [1]
    assert [v.number for v in gs.versions(late)] == [1]
    assert gs.versions(scratch) == []
    assert not early.is_running() and not late.is_running()  # shut off before, shut off after
    # The deliberately excluded guest is not "in no job"; the console lists it as excluded.
    assert scratch.name not in gs.engine.uncovered_guests()
    listing = gs.cli("guests", check=True).stdout
    line = next(row for row in listing.splitlines() if row.startswith(scratch.name))
    assert line.endswith("- (excluded)")
    line = next(row for row in listing.splitlines() if row.startswith(late.name))
    assert line.endswith("everything")


def test_all_guests_matching_nothing_fails_clearly(gs: GS, guest_factory) -> None:
    prefix = _prefix()
    _all_job(gs, "nothing", prefix)  # no guest of this prefix exists

    result = gs.engine.run_job("nothing")

    assert not result.ok and result.outcomes == []
    [problem] = result.problems
    assert 'guests = "all" found no persistent guest' in problem
    assert "nothing was backed up" in result.log_path.read_text()
    proc = gs.cli("run", "nothing")
    assert proc.returncode != 0 and "found no persistent guest" in proc.stderr


def _sendmail(directory: Path) -> Path:
    """A sendmail stand-in: keeps its arguments and the message, as test_notify's does."""
    directory.mkdir(mode=0o755, exist_ok=True)
    program = directory / "sendmail"
    program.write_text(
        f'#!/bin/sh\nprintf "%s\\n" "$@" > {directory}/args\ncat > {directory}/message\n'
    )
    program.chmod(0o755)
    return program


def test_a_jobs_mail_to_gets_the_report_with_its_table(
    gs: GS, guest_factory, tmp_path: Path
) -> None:
    sendmail = _sendmail(tmp_path / "mail")
    config = gs.engine.paths.config_file
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(
        f'[notify]\nmail_to = "everyone@example.org"\nsendmail = "{sendmail}"\non_success = true\n'
    )
    guest = guest_factory("h15mail", start=False)
    stray = guest_factory("h15stray", start=False)  # in no job
    gs.job("mailed", [guest], mail_to=["owner@example.org"], bwlimit=50 * 1024 * 1024)

    result = gs.engine.run_job("mailed")

    assert result.ok, result.outcomes
    args = (tmp_path / "mail" / "args").read_text().splitlines()
    assert args == ["-oi", "owner@example.org"]
    message = email.message_from_bytes((tmp_path / "mail" / "message").read_bytes())
    assert message["To"] == "owner@example.org"
    assert message["Subject"].startswith(f"guestsafe: job mailed ok on {gs.engine.hostname}")
    body = message.get_payload(decode=True).decode()  # type: ignore[union-attr]
    header, row = (line.split() for line in body.splitlines()[:2])
    assert header == ["GUEST", "STATUS", "VERSION", "SIZE", "DOWNTIME", "DURATION"]
    assert row[:3] == [guest.name, "ok", "1"] and row[-1] == "s"
    assert body.splitlines()[2].startswith("total: ")
    # A guest no job covers is named in the mail and in the run's log.
    assert "not backed up by any job: " in body and stray.name in body
    log = result.log_path.read_text()
    assert "guests not backed up by any job: " in log and stray.name in log
    assert "notify: ok: mail sent to owner@example.org" in log
    assert "I/O class idle, at most 50 MiB/s" in log  # the copier's pace, as the job says
    assert "default I/O class" not in log
    listing = gs.cli("guests", check=True).stdout
    line = next(row for row in listing.splitlines() if row.startswith(stray.name))
    assert line.endswith("NONE (no backup)")
