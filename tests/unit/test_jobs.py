from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from guestsafe.engine.archive.calendar_retention import RetentionPolicy
from guestsafe.engine.errors import ConfigError, FieldError, JobConfigError, NotFoundError
from guestsafe.engine.jobs.jobs_file import delete_job, load_jobs, save_jobs, upsert_job
from guestsafe.engine.jobs.model import (
    HOOK_PHASES,
    Hooks,
    Job,
    Schedule,
    retention_policy,
)
from guestsafe.engine.jobs.validation import check_job_runtime, validate_job

FULL_TOML = """
[jobs.nightly]
guests = ["web1", "db1"]
destination = "/srv/backup"
device = "UUID=1234-abcd"
keep = 5
time = "02:00"
weekdays = ["mon", "tue"]
mode = "stop-short"
shutdown_timeout = 120
on_timeout = "force"
group = true
verify = false

[jobs.nightly.hooks]
pre-stop = ["/usr/local/sbin/freeze", "--all"]
post-start = ["/usr/local/sbin/thaw"]
timeout = 120

[jobs."weekly.v2"]
guests = ["mail"]
destination = "/mnt/usb"
"""


def _job(**changes: Any) -> Job:
    job = Job(name="nightly", guests=["web1"], destination=Path("/srv/backup"))
    for key, value in changes.items():
        setattr(job, key, value)
    return job


def _write(path: Path, table: dict[str, Any], name: str = "nightly") -> Path:
    path.write_text(tomli_w.dumps({"jobs": {name: table}}))
    return path


def _problems(path: Path) -> tuple[JobConfigError, list[FieldError]]:
    with pytest.raises(JobConfigError) as info:
        load_jobs(path)
    return info.value, list(info.value.problems)


BASE: dict[str, Any] = {"guests": ["web1"], "destination": "/srv/backup"}


# --- loading ----------------------------------------------------------------


def test_missing_file_holds_no_jobs(tmp_path: Path) -> None:
    assert load_jobs(tmp_path / "absent.toml") == []


def test_load_full_example(tmp_path: Path) -> None:
    path = tmp_path / "jobs.toml"
    path.write_text(FULL_TOML)
    nightly, weekly = load_jobs(path)
    assert nightly == Job(
        name="nightly",
        guests=["web1", "db1"],
        destination=Path("/srv/backup"),
        device="UUID=1234-abcd",
        keep=5,
        schedule=Schedule(time="02:00", weekdays=["mon", "tue"]),
        mode="stop-short",
        shutdown_timeout=120,
        on_timeout="force",
        group=True,
        verify=False,
        hooks=Hooks(
            {
                "pre-stop": ["/usr/local/sbin/freeze", "--all"],
                "post-start": ["/usr/local/sbin/thaw"],
            },
            timeout=120,
        ),
    )
    assert weekly == Job(name="weekly.v2", guests=["mail"], destination=Path("/mnt/usb"))
    assert weekly.schedule.time is None
    assert weekly.hooks.timeout == 300


def test_malformed_toml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "jobs.toml"
    path.write_text('[jobs.nightly]\nguests = ["web1"\nkeep = 3\n')
    with pytest.raises(ConfigError) as info:
        load_jobs(path)
    message = str(info.value)
    assert str(path) in message
    assert "line 3" in message
    assert "\n" not in message


def test_unreadable_or_binary_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_jobs(tmp_path / "bin.toml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_jobs(tmp_path)  # a directory


def test_unknown_key_names_job_and_key(tmp_path: Path) -> None:
    path = _write(tmp_path / "jobs.toml", {**BASE, "kepp": 30})
    error, problems = _problems(path)
    assert "job 'nightly': unknown key 'kepp'" in str(error)
    assert str(path) in str(error)
    assert problems == [FieldError("nightly", "kepp", "unknown key 'kepp'")]


def test_unknown_top_level_key(tmp_path: Path) -> None:
    path = tmp_path / "jobs.toml"
    path.write_text('[job.nightly]\nguests = ["a"]\n')
    error, problems = _problems(path)
    assert problems[0].field == "job"
    assert "unknown top-level key 'job'" in str(error)


def test_jobs_must_be_tables(tmp_path: Path) -> None:
    path = tmp_path / "jobs.toml"
    path.write_text('jobs = ["nightly"]\n')
    _, problems = _problems(path)
    assert problems[0].field == "jobs"
    path.write_text("[jobs]\nnightly = 3\n")
    _, problems = _problems(path)
    assert problems[0].job == "nightly"


@pytest.mark.parametrize("key", ["guests", "destination"])
def test_required_keys(tmp_path: Path, key: str) -> None:
    table = dict(BASE)
    del table[key]
    _, problems = _problems(_write(tmp_path / "jobs.toml", table))
    assert problems == [FieldError("nightly", key, f"{key} is required")]


INVALID: list[tuple[str, Any, str]] = [
    ("guests", [], "at least one"),
    ("guests", "web1", "list of guest names"),
    ("guests", ["web1", "web1"], "more than once"),
    ("guests", [""], "not a valid guest name"),
    ("guests", ["a/b"], "not a valid guest name"),
    ("destination", "srv/backup", "absolute path"),
    ("destination", "/", "must not be '/'"),
    ("destination", 42, "path string"),
    ("device", "sdb1", "/dev/..., UUID=... or LABEL=..."),
    ("device", "UUID=", "/dev/..., UUID=... or LABEL=..."),
    ("device", "LABEL=", "/dev/..., UUID=... or LABEL=..."),
    ("device", "/dev/", "/dev/..., UUID=... or LABEL=..."),
    ("device", "/dev/../etc/passwd", "/dev/..., UUID=... or LABEL=..."),
    ("device", 5, "must be a string"),
    ("keep", 0, "at least 1"),
    ("keep", -2, "at least 1"),
    ("keep", "3", "whole number"),
    ("keep", True, "whole number"),
    ("keep", 2.5, "whole number"),
    ("time", "25:00", "HH:MM"),
    ("time", "7:5", "HH:MM"),
    ("time", "07:60", "HH:MM"),
    ("time", "7:05", "HH:MM"),
    ("time", 200, "HH:MM"),
    ("weekdays", ["monday"], "not one of mon, tue"),
    ("weekdays", ["Mon"], "not one of"),
    ("weekdays", ["mon", "mon"], "more than once"),
    ("weekdays", "mon", "list like"),
    ("mode", "live", "one of stop, stop-short, snapshot"),
    ("on_timeout", "kill", "one of abort, force"),
    ("shutdown_timeout", 0, "at least 1"),
    ("shutdown_timeout", "300", "whole number"),
    ("group", "yes", "true or false"),
    ("verify", 1, "true or false"),
]


@pytest.mark.parametrize(("key", "value", "fragment"), INVALID)
def test_bad_value_names_job_and_field(tmp_path: Path, key: str, value: Any, fragment: str) -> None:
    path = _write(tmp_path / "jobs.toml", {**BASE, key: value})
    error, problems = _problems(path)
    assert len(problems) == 1, problems
    (problem,) = problems
    assert (problem.job, problem.field) == ("nightly", key)
    assert fragment in problem.message
    assert key in problem.message
    assert str(error).startswith(f"{path}: job 'nightly': {key}")


def test_local_time_value_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "jobs.toml"
    path.write_text('[jobs.nightly]\nguests = ["a"]\ndestination = "/b"\ntime = 02:00:00\n')
    _, problems = _problems(path)
    assert [p.field for p in problems] == ["time"]


BAD_HOOKS: list[tuple[dict[str, Any], str, str]] = [
    ({"pre-stop": ["freeze"]}, "hooks.pre-stop", "absolute program path"),
    ({"pre-stop": []}, "hooks.pre-stop", "list like"),
    ({"pre-stop": "/bin/true"}, "hooks.pre-stop", "list like"),
    ({"pre-stop": ["/bin/echo", 3]}, "hooks.pre-stop", "list like"),
    ({"pre-stop": ["/bin/echo", "a\x00b"]}, "hooks.pre-stop", "NUL"),
    ({"pre_stop": ["/bin/true"]}, "hooks.pre_stop", "unknown phase 'pre_stop'"),
    ({"timeout": 0}, "hooks.timeout", "at least 1"),
    ({"timeout": "60"}, "hooks.timeout", "whole number"),
]


@pytest.mark.parametrize(("hooks", "field", "fragment"), BAD_HOOKS)
def test_bad_hooks_name_job_and_phase(
    tmp_path: Path, hooks: dict[str, Any], field: str, fragment: str
) -> None:
    _, problems = _problems(_write(tmp_path / "jobs.toml", {**BASE, "hooks": hooks}))
    assert [(p.job, p.field) for p in problems] == [("nightly", field)]
    assert fragment in problems[0].message


def test_hooks_must_be_a_table(tmp_path: Path) -> None:
    _, problems = _problems(_write(tmp_path / "jobs.toml", {**BASE, "hooks": ["/bin/true"]}))
    assert [(p.job, p.field) for p in problems] == [("nightly", "hooks")]


@pytest.mark.parametrize("name", [".hidden", "-x", "a" * 65, "a b", "naïve", "a/b", ""])
def test_bad_job_names(tmp_path: Path, name: str) -> None:
    error, problems = _problems(_write(tmp_path / "jobs.toml", BASE, name=name))
    assert [(p.job, p.field) for p in problems] == [(name, "name")]
    assert "must be 1 to 64" in str(error)


@pytest.mark.parametrize("name", ["a", "nightly", "web.v2", "_x", "A-1_b.c", "9" * 64])
def test_good_job_names(tmp_path: Path, name: str) -> None:
    assert load_jobs(_write(tmp_path / "jobs.toml", BASE, name=name))[0].name == name


def test_every_problem_is_collected(tmp_path: Path) -> None:
    path = _write(tmp_path / "jobs.toml", {"guests": [], "destination": "rel", "keep": 0, "x": 1})
    error, problems = _problems(path)
    assert {p.field for p in problems} == {"guests", "destination", "keep", "x"}
    assert "(and 3 more problems)" in str(error)
    assert "\n" not in str(error)


# --- validate_job, for forms ------------------------------------------------


def test_valid_job_has_no_problems() -> None:
    assert validate_job(_job()) == []


def test_validate_job_reports_every_field() -> None:
    job = _job(guests=[], keep=0, mode="x", on_timeout="y", schedule=Schedule("9", ["x"]))
    fields = [p.field for p in validate_job(job)]
    assert fields == ["guests", "keep", "time", "weekdays", "mode", "on_timeout"]


def test_validate_job_name_clash() -> None:
    problems = validate_job(_job(), existing=[_job(guests=["other"])])
    assert problems == [FieldError("nightly", "name", "name 'nightly' is taken by another job")]


def test_field_error_str() -> None:
    assert str(FieldError("nightly", "keep", "keep must be at least 1, not 0")) == (
        "job 'nightly': keep must be at least 1, not 0"
    )


def test_hooks_behave_like_a_dict() -> None:
    hooks = Hooks()
    hooks["pre-stop"] = ["/bin/true"]
    assert dict(hooks) == {"pre-stop": ["/bin/true"]}
    assert "pre-stop" in hooks and len(hooks) == 1
    assert hooks.get("post-stop") is None
    del hooks["pre-stop"]
    assert not hooks
    assert hooks.timeout == 300


# --- check_job_runtime ------------------------------------------------------


def test_runtime_ok(tmp_path: Path) -> None:
    assert check_job_runtime(_job(destination=tmp_path, device="LABEL=usb")) == []


def test_runtime_destination(tmp_path: Path) -> None:
    missing = check_job_runtime(_job(destination=tmp_path / "nope"))
    assert [(p.job, p.field) for p in missing] == [("nightly", "destination")]
    assert "does not exist" in missing[0].message
    (tmp_path / "file").write_text("")
    not_dir = check_job_runtime(_job(destination=tmp_path / "file"))
    assert "not a directory" in not_dir[0].message


def test_runtime_device(tmp_path: Path) -> None:
    missing = check_job_runtime(_job(destination=tmp_path, device="/dev/guestsafe-nope"))
    assert [(p.field, "does not exist" in p.message) for p in missing] == [("device", True)]
    char = check_job_runtime(_job(destination=tmp_path, device="/dev/null"))
    assert [(p.field, "not a block device" in p.message) for p in char] == [("device", True)]


def test_runtime_accepts_a_block_device(tmp_path: Path) -> None:
    block = next(
        (e.path for e in os.scandir("/dev") if stat.S_ISBLK(os.stat(e.path).st_mode)), None
    )
    if block is None:
        pytest.skip("no block device node in /dev")
    assert check_job_runtime(_job(destination=tmp_path, device=block)) == []


# --- saving -----------------------------------------------------------------


def _full_jobs(tmp_path: Path) -> list[Job]:
    path = tmp_path / "src.toml"
    path.write_text(FULL_TOML)
    return load_jobs(path)


def test_round_trip(tmp_path: Path) -> None:
    jobs = _full_jobs(tmp_path)
    path = tmp_path / "jobs.toml"
    save_jobs(path, jobs)
    assert load_jobs(path) == jobs


def test_save_is_deterministic_and_readable(tmp_path: Path) -> None:
    jobs = _full_jobs(tmp_path)
    save_jobs(tmp_path / "a.toml", jobs)
    save_jobs(tmp_path / "b.toml", load_jobs(tmp_path / "a.toml"))
    text = (tmp_path / "a.toml").read_text()
    assert text == (tmp_path / "b.toml").read_text()
    assert "[jobs.nightly]" in text and '[jobs."weekly.v2"]' in text
    assert text.index("[jobs.nightly]") < text.index("[jobs.nightly.hooks]")
    assert text.index("pre-stop") < text.index("post-start")  # phase order
    assert 'device = "UUID=1234-abcd"' in text


def test_save_writes_defaults_and_omits_unset(tmp_path: Path) -> None:
    save_jobs(tmp_path / "jobs.toml", [_job()])
    text = (tmp_path / "jobs.toml").read_text()
    for line in ("keep = 3", 'mode = "stop"', "verify = true", "shutdown_timeout = 300"):
        assert line in text
    keys = {line.split(" =")[0] for line in text.splitlines()}
    assert not keys & {"device", "time", "[jobs.nightly.hooks]"}


def test_save_is_atomic_private_and_clean(tmp_path: Path) -> None:
    path = tmp_path / "jobs.toml"
    path.write_text("old")
    path.chmod(0o644)
    save_jobs(path, [_job()])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jobs.toml"]


def test_failed_save_leaves_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "jobs.toml"
    save_jobs(path, [_job()])
    before = path.read_bytes()

    def boom(*_: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(ConfigError, match=r"cannot write .*No space left"):
        save_jobs(path, [_job(keep=9)])
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jobs.toml"]


def test_save_through_symlink_keeps_link(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    link = tmp_path / "jobs.toml"
    link.symlink_to(tmp_path / "real" / "jobs.toml")
    save_jobs(link, [_job()])
    assert link.is_symlink()
    assert load_jobs(tmp_path / "real" / "jobs.toml") == [_job()]


def test_save_refuses_invalid_and_duplicate_jobs(tmp_path: Path) -> None:
    path = tmp_path / "jobs.toml"
    with pytest.raises(JobConfigError, match="keep must be at least 1"):
        save_jobs(path, [_job(keep=0)])
    with pytest.raises(JobConfigError, match="taken by another job"):
        save_jobs(path, [_job(), _job()])
    assert not path.exists()


def test_save_empty(tmp_path: Path) -> None:
    save_jobs(tmp_path / "jobs.toml", [])
    assert load_jobs(tmp_path / "jobs.toml") == []


# --- upsert and delete ------------------------------------------------------


def test_upsert_adds_and_replaces_in_place(tmp_path: Path) -> None:
    path = tmp_path / "jobs.toml"
    upsert_job(path, _job())
    upsert_job(path, _job(name="weekly"))
    upsert_job(path, _job(keep=7))
    assert [(j.name, j.keep) for j in load_jobs(path)] == [("nightly", 7), ("weekly", 3)]


def test_upsert_renames(tmp_path: Path) -> None:
    path = tmp_path / "jobs.toml"
    save_jobs(path, [_job(), _job(name="weekly")])
    upsert_job(path, _job(name="daily"), previous_name="nightly")
    assert [j.name for j in load_jobs(path)] == ["daily", "weekly"]
    with pytest.raises(JobConfigError, match="taken by another job"):
        upsert_job(path, _job(name="weekly"), previous_name="daily")
    with pytest.raises(NotFoundError, match="job 'gone' not found"):
        upsert_job(path, _job(name="x"), previous_name="gone")


def test_upsert_validates_first(tmp_path: Path) -> None:
    path = tmp_path / "jobs.toml"
    upsert_job(path, _job())
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="job 'nightly': keep must be at least 1") as info:
        upsert_job(path, _job(keep=0))
    assert isinstance(info.value, JobConfigError)
    assert info.value.problems[0].field == "keep"
    assert path.read_bytes() == before


def test_delete(tmp_path: Path) -> None:
    path = tmp_path / "jobs.toml"
    save_jobs(path, [_job(), _job(name="weekly")])
    delete_job(path, "nightly")
    assert [j.name for j in load_jobs(path)] == ["weekly"]
    with pytest.raises(ConfigError, match="job 'nightly' not found") as info:
        delete_job(path, "nightly")
    assert isinstance(info.value, NotFoundError)


def test_edits_refuse_a_broken_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "jobs.toml", {**BASE, "kepp": 1})
    with pytest.raises(ConfigError, match="unknown key 'kepp'"):
        upsert_job(path, _job(name="other"))
    assert "kepp" in path.read_text()


def test_all_hook_phases_round_trip(tmp_path: Path) -> None:
    hooks = Hooks({phase: [f"/usr/bin/{phase}"] for phase in reversed(HOOK_PHASES)}, timeout=9)
    save_jobs(tmp_path / "jobs.toml", [_job(hooks=hooks)])
    loaded = load_jobs(tmp_path / "jobs.toml")[0].hooks
    assert loaded == Hooks({p: [f"/usr/bin/{p}"] for p in HOOK_PHASES}, timeout=9)


# --- retention by calendar ----------------------------------------------------


@pytest.mark.parametrize("key", ["keep_daily", "keep_weekly", "keep_monthly", "keep_yearly"])
@pytest.mark.parametrize(
    ("value", "message"),
    [(-1, "0 or more"), ("7", "whole number"), (True, "whole number"), (1.5, "whole number")],
)
def test_calendar_keys_are_whole_numbers_naming_the_field(
    key: str, value: object, message: str
) -> None:
    problems = validate_job(_job(**{key: value}))
    assert [p.field for p in problems] == [key]
    assert message in problems[0].message and key in problems[0].message


def test_keep_may_be_0_beside_a_calendar_rule_but_not_alone() -> None:
    assert validate_job(_job(keep=0, keep_daily=7)) == []
    problems = validate_job(_job(keep=0))
    assert [p.field for p in problems] == ["keep"]
    assert "at least 1" in problems[0].message


def test_calendar_keys_load_and_save(tmp_path: Path) -> None:
    table = {"guests": ["web1"], "destination": "/srv/backup", "keep_daily": 7, "keep_yearly": 2}
    path = _write(tmp_path / "jobs.toml", table)
    (job,) = load_jobs(path)
    assert (job.keep, job.keep_daily, job.keep_weekly, job.keep_yearly) == (0, 7, 0, 2)
    assert retention_policy(job) == RetentionPolicy(daily=7, yearly=2)
    save_jobs(path, [job])
    (again,) = load_jobs(path)
    assert again == job


def test_keep_last_is_keep(tmp_path: Path) -> None:
    table = {"guests": ["web1"], "destination": "/srv/backup", "keep_last": 4, "keep_daily": 7}
    (job,) = load_jobs(_write(tmp_path / "jobs.toml", table))
    assert retention_policy(job) == RetentionPolicy(last=4, daily=7)


def test_keep_and_keep_last_together_are_refused(tmp_path: Path) -> None:
    table = {"guests": ["web1"], "destination": "/srv/backup", "keep": 3, "keep_last": 4}
    _, problems = _problems(_write(tmp_path / "jobs.toml", table))
    assert [p.field for p in problems] == ["keep_last"]
    assert "keep and keep_last mean the same" in problems[0].message


def test_without_calendar_keys_keep_defaults_to_3(tmp_path: Path) -> None:
    table = {"guests": ["web1"], "destination": "/srv/backup"}
    (job,) = load_jobs(_write(tmp_path / "jobs.toml", table))
    assert retention_policy(job) == RetentionPolicy(last=3)
