"""Restore a version as a new guest beside the original."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Mapping
from pathlib import Path

from guestsafe.engine import events, locks
from guestsafe.engine.archive.manifest import DiskRecord
from guestsafe.engine.errors import RestoreError
from guestsafe.engine.events import PhaseChanged, Reporter
from guestsafe.engine.hypervisor.connection import Hypervisor
from guestsafe.engine.paths import Paths
from guestsafe.engine.restore.clone_xml import rewrite_clone_xml
from guestsafe.engine.restore.files import check_verified, restore_file
from guestsafe.engine.restore.plan import (
    NEW,
    RestorePlan,
    RestoreResult,
    accept_damage,
    check_plain_files,
    choose_macs,
)


def restore_clone(
    plan: RestorePlan,
    hv: Hypervisor,
    paths: Paths,
    *,
    mac_policy: str = NEW,
    mac_choices: Mapping[int, str] | None = None,
    start: bool = False,
    force: bool = False,
    reporter: Reporter = events.null_reporter,
    cancel: threading.Event | None = None,
) -> RestoreResult:
    """Copy the version's files to their new paths and define the clone."""
    macs = choose_macs(plan, mac_policy, mac_choices)
    new_uuid = str(uuid.uuid4())
    name = plan.new_name
    warnings = check_verified(plan.version, force, reporter, name)
    check_plain_files(plan.version)  # again: the plan may be old
    accept_damage(plan.xml_problem, force, reporter, name, warnings)
    # The source guest's lock: a backup of it (and its retention) must not run meanwhile.
    source = plan.version
    purpose = f"restore of {source.guest} version {source.number} to {name}"
    with locks.acquire(paths.state_dir, f"guest:{source.manifest.uuid}", purpose):
        copied: list[Path] = []
        try:
            reporter(PhaseChanged(name, "copy"))
            for rec, dst in _copies(plan):
                restore_file(plan.version, rec, dst, force, reporter, name, cancel, warnings)
                copied.append(dst)
            reporter(PhaseChanged(name, "define"))
            xml = rewrite_clone_xml(plan, new_uuid, macs)
            if hv.exists(name):
                raise RestoreError(f"a guest named {name!r} was defined meanwhile; nothing defined")
            hv.define(xml)
        except BaseException:
            for path in copied:
                path.unlink(missing_ok=True)
            raise
    events.info(reporter, f"defined {name} from {plan.version.guest} version {plan.version.number}")
    if start:
        reporter(PhaseChanged(name, "start"))
        hv.start(name)
    reporter(events.RunEnded(events.RunKind.RESTORE, True, "restore successful", name))
    return RestoreResult(name, new_uuid, macs, copied, start, warnings)


def _copies(plan: RestorePlan) -> list[tuple[DiskRecord, Path]]:
    return plan.disks + ([plan.nvram] if plan.nvram else [])
