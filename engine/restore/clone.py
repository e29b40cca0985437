"""Restore a version as a new guest beside the original."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Mapping
from pathlib import Path

from guestsafe.engine import events, locks
from guestsafe.engine.archive.manifest import DiskRecord, Manifest
from guestsafe.engine.archive.names import printable
from guestsafe.engine.errors import RestoreError
from guestsafe.engine.events import PhaseChanged, Reporter
from guestsafe.engine.hypervisor import tpm_state
from guestsafe.engine.hypervisor.cluster_macs import unchecked_warning, unreachable_hosts
from guestsafe.engine.hypervisor.connection import Hypervisor
from guestsafe.engine.hypervisor.domain_xml import TpmInfo
from guestsafe.engine.hypervisor.remote_disks import require_local_disks
from guestsafe.engine.paths import Paths
from guestsafe.engine.restore.block_targets import check_device_target, restore_to_device
from guestsafe.engine.restore.chain_restore import restore_chain
from guestsafe.engine.restore.clone_xml import build_clone_xml
from guestsafe.engine.restore.files import check_verified, restore_file, warn_missing_firmware
from guestsafe.engine.restore.plan import (
    NEW,
    MacsInUse,
    RestorePlan,
    RestoreResult,
    accept_damage,
    check_plain_files,
    choose_macs,
    new_mac,
)

MACS_LOCK = "macs"
# Long enough for another restore to check and define, short enough for a person.
MACS_LOCK_WAIT = 60.0


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
    macs_in_use: MacsInUse | None = None,
) -> RestoreResult:
    """Copy the version's files to their new paths and define the clone.

    ``hv`` is the connection of the plan's host; ``macs_in_use`` reads the MACs of
    every known host just before the clone is defined (default: ``hv``'s alone).
    """
    require_local_disks(hv, plan.new_name, "restoring its disks")
    macs = choose_macs(plan, mac_policy, mac_choices)
    new_uuid = str(uuid.uuid4())
    name = plan.new_name
    warnings = check_verified(plan.version, force, reporter, name)
    check_plain_files(plan.version)  # again: the plan may be old
    accept_damage(plan.xml_problem, force, reporter, name, warnings)
    warn_missing_firmware(plan.version, reporter, name, warnings)
    # The source guest's lock: a backup of it (and its retention) must not run meanwhile.
    source = plan.version
    purpose = f"restore of {source.guest} version {source.number} to {name}"
    with locks.acquire(paths.state_dir, f"guest:{source.manifest.uuid}", purpose):
        _check_devices(plan, hv, force)  # before anything is written
        copied: list[Path] = []
        try:
            reporter(PhaseChanged(name, "copy"))
            tpm = tpm_copies(plan.version.manifest, new_uuid)
            for _, dst in tpm:
                dst.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # as swtpm keeps it
            for rec, dst in [*_copies(plan), *tpm]:
                if rec.target in plan.device_targets:
                    # Never in ``copied``: a device is not deleted when the restore fails.
                    restore_to_device(
                        plan.version, rec, dst, force, reporter, name, cancel, warnings
                    )
                    continue
                restore_file(plan.version, rec, dst, force, reporter, name, cancel, warnings)
                copied.append(dst)
                copied += restore_chain(
                    plan.version, rec, dst, force, reporter, name, cancel, warnings
                )
            reporter(PhaseChanged(name, "define"))
            # One restore at a time checks the MACs and defines: two consoles cloning
            # one version must not both pass the check, then both define one MAC.
            with locks.acquire(paths.state_dir, MACS_LOCK, purpose, wait=MACS_LOCK_WAIT):
                if hv.exists(name):
                    raise RestoreError(
                        f"a guest named {name!r} was defined meanwhile; nothing defined"
                    )
                census = warning_census(macs_in_use or hv.mac_owners, reporter, name, warnings)
                macs = recheck_macs(plan, macs, census())
                clone = build_clone_xml(plan, new_uuid, macs)
                hv.define(clone.xml)
        except BaseException:
            for path in copied:
                path.unlink(missing_ok=True)
            raise
    events.info(reporter, f"defined {name} from {plan.version.guest} version {plan.version.number}")
    if start:
        reporter(PhaseChanged(name, "start"))
        hv.start(name)
    reporter(events.RunEnded(events.RunKind.RESTORE, True, "restore successful", name))
    return RestoreResult(name, new_uuid, macs, copied, start, warnings, clone.notes)


def warning_census(
    macs_in_use: MacsInUse, reporter: Reporter, who: str, warnings: list[str]
) -> MacsInUse:
    """``macs_in_use``, warning (once) of the hosts it could not read when it is read."""

    def read() -> Mapping[str, list[str]]:
        owners = macs_in_use()
        message = unchecked_warning(unreachable_hosts(owners))
        if message is not None and message not in warnings:
            events.warn(reporter, message, who)
            warnings.append(message)
        return owners

    return read


def recheck_macs(plan: RestorePlan, macs: list[str], in_use: Mapping[str, list[str]]) -> list[str]:
    """The MACs again, against the guests defined now, not when the plan was made.

    A MAC the plan made up and someone took meanwhile is made up again. A kept MAC
    that a guest took meanwhile (another restore of the same version) is refused:
    the caller chose to keep it knowing only of the clash the plan showed.
    """
    taken = set(in_use) | set(macs)
    checked = []
    for iface, mac in zip(plan.interfaces, macs, strict=True):
        # Only the clash the plan showed was accepted; any other owner is new.
        others = [g for g in in_use.get(mac, []) if g != iface.clash_with]
        if not others:
            checked.append(mac)
        elif mac == iface.new_mac and mac != iface.mac:
            checked.append(new_mac(taken))
        else:
            raise RestoreError(
                f"interface {iface.index}: MAC {mac} is used by guest {printable(others[0])}, "
                f"defined after this restore was planned; nothing defined (plan again, or "
                "choose a new MAC)"
            )
    return checked


def _check_devices(plan: RestorePlan, hv: Hypervisor, force: bool) -> None:
    # The console's "overwrite" box allows a filesystem on the device, and nothing else
    # that force allows (an unverified version, a damaged domain.xml).
    wipe = force or plan.overwrite_devices
    for rec, device in plan.disks:
        if rec.target in plan.device_targets:
            check_device_target(device, rec, hv, force=wipe)


def tpm_copies(manifest: Manifest, new_uuid: str) -> list[tuple[DiskRecord, Path]]:
    """The TPM state files and where the clone's swtpm finds them (under its own UUID)."""
    tpm = manifest.tpm
    if tpm is None:
        return []
    directory = tpm_state.state_dir(new_uuid, TpmInfo(tpm.model, tpm.version, None))
    return [(rec, directory / Path(rec.source).name) for rec in tpm.files]


def _copies(plan: RestorePlan) -> list[tuple[DiskRecord, Path]]:
    return plan.disks + ([plan.nvram] if plan.nvram else [])
