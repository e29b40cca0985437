"""Hooks without guests: who may run, how they run, what they are told."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from guestsafe.engine.backup.hooks import (
    OUTPUT_LIMIT,
    HookContext,
    HookRunner,
    check_programs,
    program_problem,
    run_hook,
)
from guestsafe.engine.errors import HookFailed
from guestsafe.engine.events import Event, LogLine
from guestsafe.engine.jobs.model import Hooks, Job

NOBODY = 65534


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    """A root-owned 0755 directory for hook programs (tmp_path's parents are root's)."""
    path = tmp_path / "bin"
    path.mkdir(mode=0o755)
    path.chmod(0o755)
    return path


def script(directory: Path, name: str, body: str, mode: int = 0o755) -> Path:
    path = directory / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(mode)
    return path


# --- who may run ---------------------------------------------------------------


def test_root_owned_program_in_safe_dirs_may_run(bin_dir: Path) -> None:
    assert program_problem(str(script(bin_dir, "ok", "exit 0"))) is None
    assert program_problem("/bin/true") is None


@pytest.mark.parametrize("mode", [0o757, 0o775, 0o777])
def test_writable_program_is_refused(bin_dir: Path, mode: int) -> None:
    path = script(bin_dir, "open", "exit 0", mode)
    problem = program_problem(str(path))
    assert problem is not None
    assert f"{path} is writable by group or others (mode 0{mode:o}); chmod go-w {path}" in problem


def test_program_owned_by_someone_else_is_refused(bin_dir: Path) -> None:
    path = script(bin_dir, "theirs", "exit 0")
    os.chown(path, NOBODY, NOBODY)
    assert f"belongs to uid {NOBODY}, not root" in (program_problem(str(path)) or "")


def test_program_in_a_writable_directory_is_refused(bin_dir: Path) -> None:
    path = script(bin_dir, "ok", "exit 0")
    bin_dir.chmod(0o777)
    problem = program_problem(str(path)) or ""
    assert f"{bin_dir} is writable by group or others" in problem
    assert "anyone could swap" in problem


def test_sticky_world_writable_directory_is_accepted(bin_dir: Path) -> None:
    path = script(bin_dir, "ok", "exit 0")
    bin_dir.chmod(0o1777)
    assert program_problem(str(path)) is None


def test_symlink_to_an_unsafe_program_is_refused(bin_dir: Path, tmp_path: Path) -> None:
    unsafe_dir = tmp_path / "open"
    unsafe_dir.mkdir()
    unsafe_dir.chmod(0o777)
    target = script(unsafe_dir, "real", "exit 0")
    link = bin_dir / "link"
    link.symlink_to(target)
    assert f"{unsafe_dir} is writable" in (program_problem(str(link)) or "")


def test_missing_and_not_executable_programs(bin_dir: Path) -> None:
    assert program_problem(str(bin_dir / "gone")) == f"{bin_dir / 'gone'} does not exist"
    path = script(bin_dir, "plain", "exit 0", 0o644)
    assert "is not executable" in (program_problem(str(path)) or "")
    assert program_problem(str(bin_dir)) == f"{bin_dir} is not a regular file"


def test_check_programs_names_the_phase(bin_dir: Path) -> None:
    good = script(bin_dir, "good", "exit 0")
    bad = script(bin_dir, "bad", "exit 0", 0o777)
    hooks = Hooks({"pre-stop": [str(good)], "post-start": [str(bad), "--thaw"]})
    [(phase, message)] = check_programs(hooks)
    assert phase == "post-start" and message.startswith("hooks.post-start: ")


def test_runner_refuses_the_job_with_the_reason(bin_dir: Path) -> None:
    bad = script(bin_dir, "bad", "exit 0", 0o777)
    job = Job("nightly", ["web1"], Path("/srv"), hooks=Hooks({"pre-stop": [str(bad)]}))
    with pytest.raises(HookFailed, match=r"job nightly refused: hooks.pre-stop: .* chmod go-w"):
        HookRunner(job, lambda e: None).check()


# --- running one ---------------------------------------------------------------


def _context(**changes: str) -> HookContext:
    base = HookContext(job="nightly", mode="stop", guests=("web1", "db 1"), guest="web1")
    return HookContext(**{**base.__dict__, **changes})


def test_environment_and_output(bin_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "env.json"
    body = (
        'python3 -c "import json, os, sys; '
        "json.dump({k: v for k, v in os.environ.items() if k.startswith('GUESTSAFE_')}, "
        'open(sys.argv[1], \'w\'))" "$1"\n'
        "echo hello; echo oops >&2; pwd"
    )
    prog = script(bin_dir, "env", body)
    env = _context(version_path="/srv/web1/.partial-3", status="failed", error="x").environment(
        "post-stop"
    )
    result, output = run_hook("post-stop", [str(prog), str(out)], env, 10)
    assert result.ok and result.returncode == 0
    assert output.lines() == ["hello", "oops", "/"]
    seen = json.loads(out.read_text())
    assert {k: v for k, v in seen.items() if k != "GUESTSAFE_HOME"} == {
        "GUESTSAFE_JOB": "nightly",
        "GUESTSAFE_GUEST": "web1",
        "GUESTSAFE_GUESTS": "web1\ndb 1",
        "GUESTSAFE_PHASE": "post-stop",
        "GUESTSAFE_MODE": "stop",
        "GUESTSAFE_VERSION_PATH": "/srv/web1/.partial-3",
        "GUESTSAFE_STATUS": "failed",
        "GUESTSAFE_ERROR": "x",
    }


def test_arguments_reach_the_program_unchanged(bin_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "args"
    prog = script(bin_dir, "args", f'for a in "$@"; do printf "%s\\n" "$a"; done > {out}')
    odd = ["$HOME", "a b", "`id`", "; rm -rf /", "*"]
    result, _ = run_hook("pre-stop", [str(prog), *odd], _context().environment("pre-stop"), 10)
    assert result.ok
    assert out.read_text().splitlines() == odd  # no shell saw them


def test_nonzero_exit_fails(bin_dir: Path) -> None:
    prog = script(bin_dir, "no", "exit 3")
    result, _ = run_hook("pre-stop", [str(prog)], {}, 10)
    assert not result.ok and result.describe() == "exited with status 3"


def test_timeout_kills_the_hook_and_its_children(bin_dir: Path, tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    prog = script(bin_dir, "slow", f"sleep 60 & echo $! > {pid_file}; wait")
    t0 = time.monotonic()
    result, _ = run_hook("pre-stop", [str(prog)], {}, 1)
    assert time.monotonic() - t0 < 10
    assert result.timed_out and not result.ok
    assert result.describe() == "timed out after 1 s and was killed"
    child = int(pid_file.read_text())
    time.sleep(0.2)
    assert not Path(f"/proc/{child}").exists() or "Z" in _proc_state(child)


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return "Z"


def test_a_child_holding_the_pipe_does_not_hang_the_run(bin_dir: Path) -> None:
    prog = script(bin_dir, "daemon", "sleep 30 & echo started")
    t0 = time.monotonic()
    result, output = run_hook("post-start", [str(prog)], {}, 20)
    assert result.ok and output.lines() == ["started"]
    assert time.monotonic() - t0 < 5


def test_output_is_bounded(bin_dir: Path) -> None:
    prog = script(bin_dir, "loud", "head -c 1000000 /dev/zero | tr '\\0' 'x'")
    result, output = run_hook("post-start", [str(prog)], {}, 20)
    assert result.ok
    assert len(output.kept) == OUTPUT_LIMIT and output.dropped == 1000000 - OUTPUT_LIMIT


def test_program_that_cannot_start(bin_dir: Path) -> None:
    result, _ = run_hook("pre-stop", [str(bin_dir / "gone")], {}, 5)
    assert not result.ok and result.describe().startswith("could not start: ")


def test_cancel_stops_a_hook(bin_dir: Path) -> None:
    prog = script(bin_dir, "slow", "sleep 60")
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    result, _ = run_hook("pre-stop", [str(prog)], {}, 60, cancel=cancel)
    assert result.cancelled and not result.ok


# --- the runner's side -----------------------------------------------------------


def _runner(hooks: Hooks) -> tuple[HookRunner, list[Event]]:
    seen: list[Event] = []
    job = Job("nightly", ["web1"], Path("/srv"), hooks=hooks)
    return HookRunner(job, seen.append), seen


def test_veto_raises_and_logs_the_output(bin_dir: Path) -> None:
    prog = script(bin_dir, "no", "echo database busy; exit 1")
    runner, seen = _runner(Hooks({"pre-stop": [str(prog)]}))
    with pytest.raises(HookFailed) as info:
        runner.veto("pre-stop", guest="web1")
    assert info.value.message == (
        f"backup vetoed: hook pre-stop ({prog}) exited with status 1; the guest was not stopped"
    )
    lines = [(e.message, e.guest) for e in seen if isinstance(e, LogLine)]
    assert ("hook pre-stop: database busy", "web1") in lines


def test_later_phase_failure_is_returned_not_raised(bin_dir: Path) -> None:
    prog = script(bin_dir, "no", "exit 2")
    runner, _ = _runner(Hooks({"post-start": [str(prog)]}))
    failure = runner.run("post-start", guest="web1")
    assert isinstance(failure, HookFailed)
    assert failure.message == f"hook post-start ({prog}) exited with status 2"


def test_phase_without_a_hook_does_nothing() -> None:
    runner, seen = _runner(Hooks())
    assert runner.run("pre-stop") is None
    runner.veto("job-start")
    assert seen == []


def test_hook_timeout_comes_from_the_job(bin_dir: Path) -> None:
    prog = script(bin_dir, "slow", "sleep 30")
    runner, _ = _runner(Hooks({"job-end": [str(prog)]}, timeout=1))
    failure = runner.run("job-end")
    assert failure is not None and "timed out after 1 s" in failure.message
