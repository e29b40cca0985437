"""Issue 12 against the runner's fake hypervisor: exit codes (22), lock order (17),
busy guests (16) and libvirt errors (18)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import test_runner_phases as phases

from guestsafe.engine.errors import RunFailed
from guestsafe.engine.hypervisor.domain_xml import PAUSED

Rig = phases.Rig


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path)


def _exit_code_of(rig: Rig, result: phases.RunResult) -> int:
    with pytest.raises(RunFailed) as raised:
        result.raise_for_failure()
    assert raised.value.exit_code == result.exit_code
    return result.exit_code


# --- case 22: the most specific cause --------------------------------------------------


def test_case_22_a_cancelled_run_exits_130(rig: Rig) -> None:
    rig.add_guest("web1")
    cancel = threading.Event()
    cancel.set()

    result = rig.run(rig.job(["web1"]), cancel=cancel)

    assert _exit_code_of(rig, result) == 130


def test_case_22_a_refused_destination_exits_5(rig: Rig) -> None:
    rig.add_guest("web1")
    rig.archive.rmdir()

    result = rig.run(rig.job(["web1"]))

    assert _exit_code_of(rig, result) == 5


def test_case_22_a_guest_that_cannot_start_exits_4(rig: Rig) -> None:
    rig.add_guest("web1")
    rig.hv.refuse_start.add("web1")

    assert _exit_code_of(rig, rig.run(rig.job(["web1"]))) == 4


def test_case_22_mixed_causes_exit_with_the_highest_priority(rig: Rig) -> None:
    rig.add_guest("web1")
    rig.hv.refuse_start.add("web1")  # 4, hypervisor
    rig.add_guest("web2", state=PAUSED)  # 5, refused before anything stopped
    rig.add_guest("web3")  # fine

    result = rig.run(rig.job(["web1", "web2", "web3"]))

    assert [o.ok for o in result.outcomes] == [False, False, True]
    assert _exit_code_of(rig, result) == 5


def test_case_22_a_hook_failure_exits_11_and_success_0(rig: Rig) -> None:
    rig.add_guest("web1")
    assert rig.run(rig.job(["web1"])).exit_code == 0
    hooks = phases.Hooks({"post-start": rig.hook("post-start", exit_code=3)})

    result = rig.run(rig.job(["web1"], hooks=hooks))

    assert _exit_code_of(rig, result) == 11
