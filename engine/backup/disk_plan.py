"""What a backup will do with each disk of a guest, and why not where it will not.

``plan_disks`` is pure: it reads the guest's definition and the facts
``plan_options`` gathered (the job's choices, the other guests running on a
shareable disk), and asks the file checks (``disk_files.check_backup_disks``,
``disk_checks``). One rule per kind of disk, tried in order; the first that
speaks decides. The runner's preflight refuses the first refused disk
(``refuse_before_stop``) before anything stops, and ``guestsafe guests`` and the
console's Guests tab show the whole plan.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from guestsafe.engine import modes
from guestsafe.engine.errors import GuestsafeError, PreflightError
from guestsafe.engine.hypervisor import chains, disk_checks, disk_files, volumes
from guestsafe.engine.hypervisor.connection import Hypervisor
from guestsafe.engine.hypervisor.domain_xml import DiskInfo, GuestInfo
from guestsafe.engine.modes import ChainMode, Mode

COPY, RECORD, SKIP, REFUSE = "copy", "record", "skip", "refuse"


@dataclass(frozen=True)
class DiskPlan:
    """One disk (or the NVRAM, or the TPM state) and what the backup does with it."""

    target: str
    source: str | None
    action: str  # COPY, RECORD (in the manifest only), SKIP, or REFUSE (the backup)
    how: str  # "copy file (qcow2)", "record only", "refused", ...
    reason: str | None = None  # why it is not copied, or refused

    @property
    def refused(self) -> bool:
        return self.action == REFUSE


@dataclass(frozen=True)
class PlanOptions:
    """The job's choices and the host's facts the plan needs beyond the guest's XML."""

    mode: Mode = Mode.STOP
    include_readonly: bool = False
    # target -> other guests running now on that shareable disk
    sharers: Mapping[str, list[str]] = field(default_factory=dict)
    managed_save: bool = False
    chain: ChainMode = ChainMode.FLATTEN


Rule = Callable[[GuestInfo, DiskInfo, PlanOptions], DiskPlan | None]


def plan_disks(info: GuestInfo, options: PlanOptions) -> list[DiskPlan]:
    """Per disk of ``info``, then its NVRAM and TPM state: copied, recorded, or why not."""
    plans = [_plan_disk(info, disk, options) for disk in info.disks]
    if info.nvram:
        plans.append(DiskPlan("nvram", info.nvram, COPY, "copy file (NVRAM)"))
    tpm = info.emulated_tpm
    if tpm is not None:
        refusal = _tpm_refusal(info, options)
        source = f"swtpm {tpm.version}"
        if refusal is None:
            plans.append(DiskPlan("tpm", source, COPY, "copy swtpm state (while off)"))
        else:
            plans.append(DiskPlan("tpm", source, REFUSE, "refused", refusal))
    return plans


def guest_refusals(info: GuestInfo, options: PlanOptions) -> list[str]:
    """What refuses the whole guest, whatever its disks."""
    if options.managed_save:
        return [
            f"guest {info.name!r} has a managed-save image: its memory belongs to the disks "
            "as they were when it was saved, so a copy of them now would not match it; start "
            f"it and shut it down, or discard the image ('virsh managedsave-remove {info.name}')"
        ]
    return []


def refuse_before_stop(info: GuestInfo, options: PlanOptions) -> list[DiskPlan]:
    """Raise PreflightError for the first refusal; else the plan."""
    for problem in guest_refusals(info, options):
        raise PreflightError(problem)
    plans = plan_disks(info, options)
    for plan in plans:
        if plan.refused:
            raise PreflightError(plan.reason or f"guest {info.name!r}: {plan.target} refused")
    return plans


def plan_options(
    hv: Hypervisor,
    info: GuestInfo,
    mode: Mode,
    include_readonly: bool,
    chain: ChainMode = ChainMode.FLATTEN,
) -> PlanOptions:
    """The facts of the host now: sharers of shareable disks, a managed-save image."""
    sharers: dict[str, list[str]] = {}
    if any(d.shareable for d in info.disks):
        states = {g.name: str(g.state) for g in hv.guests()}
        sharers = disk_checks.running_sharers(info, hv.disk_users(), states)
    managed = info.persistent and hv.has_managed_save(info.name)
    return PlanOptions(mode, include_readonly, sharers, managed, chain)


# --- one rule per kind of disk, in order ------------------------------------------------


def _no_medium(info: GuestInfo, disk: DiskInfo, options: PlanOptions) -> DiskPlan | None:
    if disk.source is None:
        return DiskPlan(disk.target, None, SKIP, "nothing to copy", f"{disk.device}, no medium")
    return None


def _media(info: GuestInfo, disk: DiskInfo, options: PlanOptions) -> DiskPlan | None:
    if not disk.is_media:
        return None
    kind = "read-only disk" if disk.readonly and disk.device != "cdrom" else f"{disk.device} image"
    if not options.include_readonly:
        reason = f"{kind}: recorded in the manifest, not copied (include_readonly = true copies it)"
        return DiskPlan(disk.target, disk.source, RECORD, "record only", reason)
    if disk.kind != "file":
        reason = (
            f"guest {info.name!r}: {kind} {disk.target} is a {disk.kind} disk ({disk.source}); "
            "include_readonly copies file images only (set include_readonly = false)"
        )
        return DiskPlan(disk.target, disk.source, REFUSE, "refused", reason)
    return DiskPlan(disk.target, disk.source, COPY, f"copy file ({kind}, include_readonly)")


def _shared_in_use(info: GuestInfo, disk: DiskInfo, options: PlanOptions) -> DiskPlan | None:
    others = options.sharers.get(disk.target)
    if not others:
        return None
    reason = (
        f"guest {info.name!r}: disk {disk.target} ({disk.source}) is shareable and guest "
        f"{', '.join(map(repr, others))} is running on it; a copy taken while another guest "
        "writes would be torn (shut that guest down first)"
    )
    return DiskPlan(disk.target, disk.source, REFUSE, "refused", reason)


def _file_checks(info: GuestInfo, disk: DiskInfo, options: PlanOptions) -> DiskPlan | None:
    """The rules check_backup_disks applies (kind, missing file, overlay), for this disk."""
    try:
        disk_files.check_backup_disks(replace(info, disks=[disk], nvram=None))
    except GuestsafeError as exc:
        return DiskPlan(disk.target, disk.source, REFUSE, "refused", exc.message)
    return None


def _data_file(info: GuestInfo, disk: DiskInfo, options: PlanOptions) -> DiskPlan | None:
    try:
        data_file = disk_checks.qcow2_data_file(disk)
    except GuestsafeError as exc:
        return DiskPlan(disk.target, disk.source, REFUSE, "refused", exc.message)
    if data_file is None:
        return None
    reason = (
        f"guest {info.name!r}: disk {disk.target} ({disk.source}) keeps its data in the "
        f"external file {data_file}, which a copy of the qcow2 would leave behind; make it "
        f"a standalone qcow2 first ('qemu-img convert -O qcow2 {disk.source} NEW.qcow2', "
        "then point the disk at NEW.qcow2)"
    )
    return DiskPlan(disk.target, disk.source, REFUSE, "refused", reason)


def _volume(info: GuestInfo, disk: DiskInfo, options: PlanOptions) -> DiskPlan | None:
    """A volume the connection could not resolve to its file or device."""
    if disk.kind != "volume":
        return None
    try:
        volumes.check_volumes(replace(info, disks=[disk]))
    except GuestsafeError as exc:
        return DiskPlan(disk.target, disk.source, REFUSE, "refused", exc.message)
    return None


def _network(info: GuestInfo, disk: DiskInfo, options: PlanOptions) -> DiskPlan | None:
    if disk.kind != "network":
        return None
    cold = options.mode == Mode.STOP or info.state != "running"
    try:
        volumes.check_network_disks(replace(info, disks=[disk]), cold=cold)
    except GuestsafeError as exc:
        return DiskPlan(disk.target, disk.source, REFUSE, "refused", exc.message)
    return DiskPlan(disk.target, disk.source, COPY, "QEMU push backup (network disk)")


def _chain(info: GuestInfo, disk: DiskInfo, options: PlanOptions) -> DiskPlan | None:
    """A qcow2 overlay; check_backup_disks (in _file_checks) refused a broken chain."""
    try:
        layers = chains.disk_chain(disk)
    except GuestsafeError as exc:
        return DiskPlan(disk.target, disk.source, REFUSE, "refused", exc.message)
    if layers is None:
        return None
    files = f"{len(layers)} files"
    if options.mode in (modes.STOP_SHORT, modes.SNAPSHOT):
        if options.chain == ChainMode.KEEP:
            reason = (
                f"guest {info.name!r}: chain = keep needs mode stop, since a push backup "
                "writes one flattened file per disk (set chain = flatten, or mode stop)"
            )
            return DiskPlan(disk.target, disk.source, REFUSE, "refused", reason)
        how = f"QEMU push backup (chain of {files}, flat)"
        return DiskPlan(disk.target, disk.source, COPY, how)
    if options.chain == ChainMode.KEEP:
        return DiskPlan(disk.target, disk.source, COPY, f"keep chain ({files}, relinked)")
    return DiskPlan(disk.target, disk.source, COPY, f"flatten chain ({files}) into one qcow2")


def _copy(info: GuestInfo, disk: DiskInfo, options: PlanOptions) -> DiskPlan | None:
    fmt = disk.format or "raw"
    if options.mode in (modes.STOP_SHORT, modes.SNAPSHOT):
        return DiskPlan(disk.target, disk.source, COPY, f"QEMU push backup ({fmt})")
    if disk.kind == "block":
        return DiskPlan(disk.target, disk.source, COPY, f"copy device as sparse file ({fmt})")
    return DiskPlan(disk.target, disk.source, COPY, f"copy file ({fmt})")


RULES: list[Rule] = [
    *(_no_medium, _media, _volume, _network, _shared_in_use, _file_checks, _data_file),
    *(_chain, _copy),
]


def _plan_disk(info: GuestInfo, disk: DiskInfo, options: PlanOptions) -> DiskPlan:
    for rule in RULES:
        plan = rule(info, disk, options)
        if plan is not None:
            return plan
    raise AssertionError("the last rule always speaks")


def _tpm_refusal(info: GuestInfo, options: PlanOptions) -> str | None:
    if options.mode == modes.SNAPSHOT:
        return (
            f"guest {info.name!r} has an emulated TPM, whose state swtpm rewrites while the "
            "guest runs, so a snapshot cannot keep it consistent with the disks; use mode "
            "stop or stop-short (the state is copied while the guest is off)"
        )
    if not info.persistent:
        return (
            f"guest {info.name!r} is transient and has an emulated TPM: libvirt deletes its "
            "TPM state when it stops, so it would start again with an empty TPM; make it "
            f"persistent first ('virsh dumpxml {info.name} > G.xml; virsh define G.xml')"
        )
    return None
