"""The ``guestsafe`` command: a thin, headless client of the engine.

Exit codes: 0 success; the engine error's ``exit_code`` otherwise (2 bad
configuration, 3 not found, 4 hypervisor, 5 refused, 6 copy, 7 archive,
8 verification, 9 restore, 10 device, 11 a backup failed); 130 interrupted.
``run`` exits with its run's most specific cause (``RunResult.exit_code``), or
9 when every backup went well but a restore test after it did not pass.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from guestsafe.engine.api import (
    KEEP,
    LOCAL_HOST,
    MARKER,
    NEW,
    Archive,
    BootRecord,
    Candidate,
    Engine,
    HostState,
    Job,
    LastResult,
    OverwriteNotice,
    Paths,
    RestorePlan,
    VerifyReport,
    VersionInfo,
    __version__,
    byte_size,
    describe_policy,
    describe_restore_test,
    device_shares,
    escape,
    mode_label,
    on_calendar,
    retention_policy,
    sharing_label,
    space_of,
    split_series,
)
from guestsafe.engine.errors import (
    ConfigError,
    GuestsafeError,
    HypervisorError,
    RestoreError,
    RunFailed,
)
from guestsafe.engine.events import (
    Event,
    GuestOutcome,
    LogLine,
)

from .model import files_cli
from .model.coverage import coverage
from .model.host_options import add_host_option, add_to_host_option
from .model.printing import ConsoleReporter

EXIT_INTERRUPTED = 130
SPACE_HELP = (
    "ALLOCATED is the space a version's files take; UNIQUE the part of it no other "
    "file shares (reflink), about what deleting the version frees. The line under "
    "each archive's versions counts every block once however many versions share it."
)
DEVICE_HELP = (
    "the archive on an unmounted device: /dev/sdb1, UUID=... or LABEL=... "
    "(mounted read-only meanwhile)"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="guestsafe",
        description="Cold backups of libvirt/KVM guests. Without a command, opens the console.",
    )
    parser.add_argument("--version", action="version", version=f"guestsafe {__version__}")
    parser.add_argument(
        "--connect", "-c", metavar="URI", help="libvirt URI (default qemu:///system)"
    )
    parser.add_argument("--config", type=Path, metavar="FILE", help="jobs file to use")
    parser.add_argument(
        "--demo", action="store_true", help="use a throwaway sandbox with sample guests"
    )
    parser.add_argument(
        "--theme",
        metavar="NAME",
        help="console colours: dark (default), light, high-contrast, or a Textual theme name",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("jobs", help="list the jobs")
    run = sub.add_parser("run", help="run a job now")
    run.add_argument("job")
    run.add_argument(
        "--wait",
        action="store_true",
        help="wait up to the job's lock_wait for a busy guest or destination "
        "(the timers do); without it a busy one fails at once, naming its holder",
    )
    lst = sub.add_parser(
        "list",
        help="list backed-up versions",
        description="List backed-up versions. " + SPACE_HELP,
    )
    lst.add_argument("guest", nargs="?")
    lst.add_argument("--dest", type=Path, help="archive directory (default: every job's)")
    lst.add_argument("--device", metavar="DEV", help=DEVICE_HELP)
    add_host_option(lst)
    restore = sub.add_parser("restore", help="restore a version as a new guest")
    restore.add_argument("guest")
    restore.add_argument("version", type=int)
    restore.add_argument("new_name", nargs="?", metavar="NEWNAME")
    restore.add_argument(
        "--mac",
        choices=(NEW, KEEP),
        default=NEW,
        help="new (default): new MACs where they clash, and for every interface while some "
        "host's MACs cannot be read; keep: keep them all",
    )
    restore.add_argument("--start", action="store_true", help="start the restored guest")
    restore.add_argument("--target-dir", type=Path, help="where the disk files go")
    restore.add_argument(
        "--target-pool",
        metavar="POOL",
        help="on a remote host (--connect qemu+ssh://...): the storage pool the disks are "
        "uploaded into (default: the pool that held each original disk)",
    )
    restore.add_argument(
        "--disk-target",
        action="append",
        default=[],
        metavar="DISK=DEVICE",
        help="write that disk onto an existing block device, e.g. vdb=/dev/vg/new-lv "
        "(repeatable; refused if it holds a filesystem unless --force)",
    )
    restore.add_argument(
        "--overwrite",
        action="store_true",
        help="restore over the original guest (it must be shut off); asks first",
    )
    restore.add_argument(
        "--yes", action="store_true", help="with --overwrite: do not ask (for scripts)"
    )
    restore.add_argument(
        "--keep-replaced",
        action="store_true",
        help="with --overwrite: keep the replaced files beside the originals, dated",
    )
    restore.add_argument(
        "--force", action="store_true", help="restore a version that fails its checks"
    )
    restore.add_argument("--dest", type=Path, help="archive directory")
    restore.add_argument("--device", metavar="DEV", help=DEVICE_HELP)
    add_host_option(restore)
    add_to_host_option(restore)
    boot = sub.add_parser(
        "boot", help="run a version now as a new guest on overlays backed by the version"
    )
    boot.add_argument("guest", nargs="?")
    boot.add_argument("version", nargs="?", type=int)
    boot.add_argument("new_name", nargs="?", metavar="NEWNAME")
    boot.add_argument(
        "--mac",
        choices=(NEW, KEEP),
        default=NEW,
        help="new (default): new MACs where they clash, and for every interface while some "
        "host's MACs cannot be read; keep: keep them all",
    )
    boot.add_argument("--target-dir", type=Path, help="where the overlays go")
    boot.add_argument("--force", action="store_true", help="boot a version that fails its checks")
    boot.add_argument("--dest", type=Path, help="archive directory")
    add_host_option(boot)
    add_to_host_option(boot)
    boot.add_argument(
        "--discard",
        metavar="CLONE",
        help="remove a clone guestsafe booted: the guest, its overlays and NVRAM",
    )
    promote = sub.add_parser(
        "promote", help="copy a booted clone onto its own storage while it runs"
    )
    promote.add_argument("clone")
    promote.add_argument(
        "--target-dir",
        type=Path,
        metavar="DIR",
        help="move the clone's disks into DIR while it runs (default: they stay where boot "
        "put them)",
    )
    test = sub.add_parser(
        "test-restore",
        help="boot a version cut off from the network, wait for a sign of life, record it",
    )
    test.add_argument("guest")
    test.add_argument("version", nargs="?", type=int, help="default: the newest good version")
    test.add_argument("--dest", type=Path, help="archive directory")
    add_host_option(test)
    verify = sub.add_parser("verify", help="re-read and check versions")
    verify.add_argument("guest", nargs="?")
    verify.add_argument("version", nargs="?", type=int)
    verify.add_argument("--dest", type=Path, help="archive directory (default: every job's)")
    verify.add_argument("--device", metavar="DEV", help=DEVICE_HELP)
    add_host_option(verify)
    recover = sub.add_parser("recover", help="finish the clean-up of an interrupted run")
    recover.add_argument(
        "--start",
        action="store_true",
        help="also start a guest an interrupted backup left off that recovery would not "
        "start by itself (it says why)",
    )
    recover.add_argument(
        "--host",
        metavar="NAME",
        help="only what interrupted runs left on that host ([hosts.NAME] in jobs.toml), "
        "e.g. once it answers again after a connection lost mid-copy",
    )
    prune = sub.add_parser(
        "prune", help="apply the job's retention now: delete the versions its rules let go"
    )
    prune.add_argument("job", nargs="?", help="the job (default: every job)")
    prune.add_argument(
        "--dry-run",
        action="store_true",
        help="show which versions each rule keeps and which would go; delete nothing",
    )
    guests = sub.add_parser("guests", help="list the hypervisor's guests and their disk plans")
    guests.add_argument(
        "--job", help="plan the disks as this job would back them up (default: mode stop)"
    )
    guests.add_argument(
        "--host", metavar="NAME", help="list this host's guests alone (default: every host's)"
    )
    sub.add_parser(
        "run-due", help="run each job whose scheduled time has come (for a one-minute cron line)"
    )
    sched = sub.add_parser("schedule", help="systemd timers for the jobs' schedules")
    sched.add_argument("action", choices=("install", "remove", "status"))
    sched.add_argument(
        "--unit-dir",
        type=Path,
        metavar="DIR",
        help="where the units go (default /etc/systemd/system, or $GUESTSAFE_UNIT_DIR)",
    )
    devs = sub.add_parser("devices", help="list external devices with a filesystem, not mounted")
    devs.add_argument(
        "--no-probe",
        action="store_true",
        help="do not mount them read-only for a moment to look for an archive",
    )
    files_cli.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except GuestsafeError as exc:
        print(f"guestsafe: {exc.title}: {escape(exc.message)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("guestsafe: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _dispatch(args: argparse.Namespace) -> int:
    if args.demo:
        engine = Engine.demo()
    else:
        engine = Engine(uri=args.connect, paths=Paths.default(args.config))
    if args.command is None:
        return _open_console(engine, args)
    reporter = ConsoleReporter()
    try:
        if args.command != "recover":  # that one recovers itself, maybe with --start
            engine.recover(reporter)
        handler = _COMMANDS[args.command]
        return handler(engine, args, reporter)
    finally:
        engine.close()


def _open_console(engine: Engine, args: argparse.Namespace) -> int:
    try:
        from .app import run_console
    except ImportError:
        build_parser().print_help()
        return 0
    try:
        return run_console(engine, theme=args.theme)
    finally:
        # Also writes the demo sandbox's guests back, so a restored clone stays.
        engine.close()


def cmd_jobs(engine: Engine, args: argparse.Namespace, reporter: ConsoleReporter) -> int:
    jobs = engine.jobs()
    if not jobs:
        print(f"no jobs yet in {engine.paths.config_file}")
        return 0
    results = engine.last_results()
    rows = [("JOB", "GUESTS", "DESTINATION", "KEEP", "MODE", "TIME", "NEXT RUN", "LAST RESULT")]
    timers = engine.timer_states(jobs)
    for job in jobs:
        last = results.get(job.name)
        outcome = "-" if last is None else ("ok " if last.ok else "FAILED ") + last.finished
        where = job.device + " -> " + str(job.destination) if job.device else str(job.destination)
        rows.append(
            (
                job.name,
                _guests_column(job),
                where,
                str(job.keep),
                job.mode,
                job.schedule.time or "manual",
                _next_run(engine, job, timers.get(job.name, "manual")),
                outcome,
            )
        )
    _table(rows)
    _print_summaries({j.name: results[j.name] for j in jobs if j.name in results})
    return 0


def _guests_column(job: Job) -> str:
    if not job.all_guests:
        return ",".join(job.guests)
    return "all" + "".join(f",-{pattern}" for pattern in job.exclude)


def _next_run(engine: Engine, job: Job, timer: str) -> str:
    when = engine.next_run(job)
    if when is None:
        return "-"
    # Without an installed timer the time holds only if cron runs run-due.
    note = "" if timer == "installed" else f" (timer {timer})"
    return when.strftime("%a %Y-%m-%d %H:%M %Z") + note


def _print_summaries(results: dict[str, LastResult]) -> None:
    """The last run's one line per guest, under the table."""
    for name, last in results.items():
        for line in last.summary:
            print(f"{escape(name)}: {escape(line)}")


def cmd_run(engine: Engine, args: argparse.Namespace, reporter: ConsoleReporter) -> int:
    result = engine.run_job(
        args.job, reporter, cancel=cancel_on_signals(), interactive=not args.wait
    )
    print(f"log: {result.log_path}", file=sys.stderr)
    result.raise_for_failure()
    if result.restore_tests_failed:
        # The backups are fine, but cron must hear that a version did not boot:
        # the code test-restore gives for the same verdict.
        _say_failed_tests(result.restore_tests_failed)
        return RestoreError.exit_code
    return 0


def _say_failed_tests(lines: Iterable[str]) -> None:
    for line in lines:
        print(f"guestsafe: {escape(line)}", file=sys.stderr)


def cancel_on_signals() -> threading.Event:
    """Ctrl-C, SIGTERM or a dropped SSH session (SIGHUP) cancel the run cleanly.

    The engine then removes the unfinished copy and starts the guest again
    before the command exits, instead of dying with the guest shut off.
    """
    cancel = threading.Event()

    def stop(signum: int, frame: object) -> None:
        # No reporter call here: the signal may land while it holds its lock.
        if not cancel.is_set():
            note = f"guestsafe: {signal.Signals(signum).name}: cancelling the run\n"
            os.write(sys.stderr.fileno(), note.encode())
        cancel.set()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)
    return cancel


def cmd_list(engine: Engine, args: argparse.Namespace, reporter: ConsoleReporter) -> int:
    if args.device is not None:
        with engine.device_archive(args.device) as archive:
            code = _print_versions([(args.device, _host_versions(engine, archive, args))])
            _print_problems(archive.problems(_series_of(engine, archive, args)))
            return code
    listed = _listed_archives(engine, args.dest)
    booted = engine.booted_clones()
    archives = [engine.archive(dest) for dest in listed]
    code = _print_versions(
        ((str(a.root), _host_versions(engine, a, args)) for a in archives), booted
    )
    for archive in archives:
        _print_problems(archive.problems(_series_of(engine, archive, args)))
    return code


def _series_of(engine: Engine, archive: Archive, args: argparse.Namespace) -> str | None:
    """The series the command's guest and --host name in ``archive`` (None: no guest)."""
    if args.guest is None:
        return None
    return engine.series(archive, args.guest, args.host)


def _host_versions(engine: Engine, archive: Archive, args: argparse.Namespace) -> list[VersionInfo]:
    """The versions ``list`` shows: the guest's, or with --host alone every guest's of it."""
    versions = archive.versions(_series_of(engine, archive, args))
    if args.guest is None and args.host is not None:
        versions = [v for v in versions if split_series(v.guest)[0] == args.host]
    return versions


def _print_problems(problems: list[str]) -> None:
    """What the listing left out (an unsafe manifest, a planted symlink) and why."""
    for problem in problems:
        print(f"warning: {escape(problem)}", file=sys.stderr)


def _listed_archives(engine: Engine, dest: Path | None) -> list[Path]:
    """The archive named with --dest, or every job destination that holds one now."""
    return [dest] if dest is not None else _mounted_archives(engine, engine.destinations())


def _mounted_archives(engine: Engine, destinations: list[Path]) -> list[Path]:
    """The destinations, less those of device jobs whose device is not mounted there."""
    devices = {job.destination: job.device for job in engine.jobs() if job.device}
    found = []
    for dest in destinations:
        if dest not in devices and not (dest / MARKER).exists():
            continue  # a job that has not run yet: no archive there to list
        if dest in devices and not (dest / MARKER).exists():
            print(
                f"{escape(str(dest))}: device {escape(devices[dest] or '')} is not mounted "
                "there; list it with --device",
                file=sys.stderr,
            )
            continue
        found.append(dest)
    return found


def _print_versions(
    archives: Iterable[tuple[str, list[VersionInfo]]], booted: Sequence[BootRecord] = ()
) -> int:
    # ALLOCATED: the version folder's size; a run log's "copied" is the data read.
    header = (
        "GUEST", "VERSION", "DATE", "MODE", "ALLOCATED", "UNIQUE", "VERIFIED", "BOOT TEST",
        "ARCHIVE",
    )
    # An IN USE column only while some clone runs on a version (guestsafe boot).
    rows: list[tuple[str, ...]] = [header + (("IN USE",) if booted else ())]
    totals: list[str] = []
    for where, versions in archives:
        space = space_of(v.path for v in versions)
        if versions:
            totals.append(
                f"{where}: these {len(versions)} version(s) take {byte_size(space.total)} "
                "on the device, blocks shared between versions counted once"
            )
        for v in versions:
            verified = {True: "ok", False: "FAILED", None: "-"}[v.verified]
            row: tuple[str, ...] = (
                v.guest,
                str(v.number),
                v.date,
                mode_label(v.mode),
                byte_size(v.size),
                byte_size(space.unique[v.path]),
                verified,
                v.restore_test.label() if v.restore_test else "",
                where,
            )
            if booted:
                row += (_in_use(v, booted),)
            rows.append(row)
    if len(rows) == 1:
        print("no versions found")
        return 0
    _table(rows)
    for line in totals:
        print(escape(line))
    return 0


def _in_use(version: VersionInfo, booted: Sequence[BootRecord]) -> str:
    clones = [
        r.clone
        for r in booted
        if r.number == version.number and r.uses(version.path.parent.parent, version.guest)
    ]
    return "in use by " + ", ".join(sorted(clones)) if clones else "-"


def cmd_verify(engine: Engine, args: argparse.Namespace, reporter: ConsoleReporter) -> int:
    if args.device is not None:
        if args.dest is not None:
            raise ConfigError("give --dest or --device, not both")
        # Mounted read-only meanwhile: the results are shown, not recorded on the device.
        with engine.device_archive(args.device) as archive:
            series = _series_of(engine, archive, args)
        found = engine.verify(guest=series, number=args.version, device=args.device)
        return _exit_code(_printed(found))
    reports: list[VerifyReport] = []
    for dest in _listed_archives(engine, args.dest):
        series = _series_of(engine, engine.archive(dest), args)
        if series is not None and series not in engine.archive(dest).guests():
            continue
        reports += _printed(engine.verify(dest, series, args.version))
    return _exit_code(reports)


def _printed(reports: list[VerifyReport]) -> list[VerifyReport]:
    for report in reports:
        status = "ok" if report.ok else "FAILED: " + "; ".join(report.problems)
        print(f"{escape(report.guest)} version {report.number}: {escape(status)}")
    return reports


def _exit_code(reports: list[VerifyReport]) -> int:
    if not reports:
        print("nothing to verify", file=sys.stderr)
        return 3
    return 8 if any(not report.ok for report in reports) else 0


def _confirm_overwrite(yes: bool) -> Callable[[OverwriteNotice], bool]:
    """Ask on the terminal; without one, only --yes goes ahead."""

    def confirm(notice: OverwriteNotice) -> bool:
        if yes:
            return True
        if not (sys.stdin.isatty() and sys.stderr.isatty()):
            raise RestoreError(
                f"restore over {notice.guest!r} replaces its disks and asks first, but "
                "there is no terminal to ask on; nothing was changed (add --yes to confirm)"
            )
        for line in notice.lines():
            print(escape(line), file=sys.stderr)
        try:
            answer = input("go ahead? [y/N] ")
        except EOFError:
            answer = ""
        return answer.strip().lower() in ("y", "yes")

    return confirm


def cmd_restore(engine: Engine, args: argparse.Namespace, reporter: ConsoleReporter) -> int:
    if args.device is None:
        archive = engine.find_archive(args.guest, args.dest, host=args.host)
        return _restore_from(engine, archive, args, reporter)
    if args.dest is not None:
        raise RestoreError("give --dest or --device, not both")
    with engine.device_archive(args.device) as archive:
        return _restore_from(engine, archive, args, reporter)


def _restore_from(
    engine: Engine, archive: Archive, args: argparse.Namespace, reporter: ConsoleReporter
) -> int:
    series = engine.series(archive, args.guest, args.host)
    if args.overwrite:
        if args.to_host is not None:
            raise RestoreError("--overwrite restores on the guest's own host; give no --to-host")
        if args.new_name not in (None, args.guest):
            raise RestoreError("--overwrite restores over the original; give no new name")
        if args.disk_target:
            raise RestoreError(
                "--overwrite writes each disk back to its own file or device; "
                "--disk-target goes with a new guest"
            )
        engine.restore_over(
            archive,
            series,
            args.version,
            force=args.force,
            keep_replaced=args.keep_replaced,
            confirm=_confirm_overwrite(args.yes),
            reporter=reporter,
        )
        return 0
    if args.yes or args.keep_replaced:
        raise RestoreError("--yes and --keep-replaced go with --overwrite")
    if args.new_name is None:
        raise RestoreError("give a new name for the restored guest, or --overwrite")
    plan = engine.plan_restore(
        archive,
        series,
        args.version,
        args.new_name,
        target_dir=args.target_dir,
        disk_targets=args.disk_target,
        to_host=args.to_host,
    )
    _say_macs(plan, args.mac)
    result = engine.restore(
        plan,
        mac_policy=args.mac,
        start=args.start,
        force=args.force,
        reporter=reporter,
        target_pool=args.target_pool,
    )
    print(
        f"restored {escape(result.name)} (uuid {result.uuid}, MACs {', '.join(result.macs) or '-'})"
    )
    for note in result.notes:  # what the clone got instead of the original's, or lost
        print(f"note: {escape(note)}")
    return 0


def cmd_boot(engine: Engine, args: argparse.Namespace, reporter: ConsoleReporter) -> int:
    if args.discard is not None:
        if args.guest is not None:
            raise RestoreError("boot --discard CLONE takes no other names")
        for line in engine.discard_boot(args.discard):
            print(escape(line))
        return 0
    if args.guest is None or args.version is None or args.new_name is None:
        raise RestoreError("give the guest, the version and a new name: boot web1 3 web1-now")
    archive = engine.find_archive(args.guest, args.dest, host=args.host)
    plan = engine.plan_restore(
        archive,
        engine.series(archive, args.guest, args.host),
        args.version,
        args.new_name,
        target_dir=args.target_dir,
        to_host=args.to_host,
    )
    _say_macs(plan, args.mac)
    result = engine.boot(plan, mac_policy=args.mac, force=args.force, reporter=reporter)
    print(
        f"booted {escape(result.name)} (uuid {result.uuid}, MACs {', '.join(result.macs) or '-'})"
        f" on overlays of {escape(args.guest)} version {args.version}; "
        f"guestsafe promote {escape(result.name)} makes it independent"
    )
    for note in result.notes:
        print(f"note: {escape(note)}")
    return 0


def cmd_promote(engine: Engine, args: argparse.Namespace, reporter: ConsoleReporter) -> int:
    disks = engine.promote(
        args.clone, target_dir=args.target_dir, reporter=reporter, cancel=cancel_on_signals()
    )
    print(f"promoted {escape(args.clone)}: {', '.join(disks)} on its own storage")
    return 0


def cmd_test_restore(engine: Engine, args: argparse.Namespace, reporter: ConsoleReporter) -> int:
    version, test = engine.test_restore(
        args.guest,
        args.version,
        args.dest,
        host=args.host,
        reporter=reporter,
        cancel=cancel_on_signals(),
    )
    line = f"{escape(version.guest)} version {version.number}: restore test "
    if not test.ok:
        print(f"guestsafe: {line}{escape(describe_restore_test(test))}", file=sys.stderr)
        return RestoreError.exit_code
    print(line + escape(describe_restore_test(test)))
    return 0


def _say_macs(plan: RestorePlan, mac: str) -> None:
    """A line for each interface whose MAC is not known to be free, and what it gets."""
    for iface in plan.to_settle:
        action = "keeping it (--mac keep)" if mac == KEEP else f"using {iface.new_mac}"
        if iface.clash_with is not None:
            why = f"is already used by guest {escape(iface.clash_with)}"
        else:
            why = "could not be checked on every host (the original may run there)"
        print(f"interface {iface.index}: MAC {iface.mac} {why}; {action}", file=sys.stderr)


def cmd_recover(engine: Engine, args: argparse.Namespace, reporter: ConsoleReporter) -> int:
    recovered = engine.recover(reporter, start=args.start, host=args.host)
    # A host named: the operator waits for its guests, so what is left fails the command.
    left = engine.left_to_recover(args.host) if args.host is not None else []
    if left:
        print(
            f"guestsafe: still to recover on host {escape(args.host)}: {escape(', '.join(left))} "
            "(the lines above say why; run guestsafe recover again)",
            file=sys.stderr,
        )
        return HypervisorError.exit_code
    print("recovered" if recovered else "nothing left to recover")
    return 0


def cmd_guests(engine: Engine, args: argparse.Namespace, reporter: ConsoleReporter) -> int:
    host = getattr(args, "host", None)
    if host is None and engine.host_names() == [LOCAL_HOST]:
        return _local_guests(engine, args)  # no [hosts.NAME]: the listing as it always was
    listings = engine.guests_by_host(host)
    for listing in listings:
        status = listing.status
        print(f"host {escape(status.describe())}")
        if status.state != HostState.CONNECTED:
            continue
        rows = [("  GUEST", "STATE", "DISKS", "MACS")]
        for guest in listing.guests:
            disks = ",".join(d.target for d in guest.disks if d.backs_up)
            rows.append((f"  {guest.name}", guest.state, disks or "-", ",".join(guest.macs) or "-"))
        _table(rows if listing.guests else [("  (no guests)",)])
    unreachable = [g.status.name for g in listings if g.status.state != HostState.CONNECTED]
    if unreachable:
        print(f"unreachable: {escape(', '.join(unreachable))}", file=sys.stderr)
        return 4
    return 0


def _local_guests(engine: Engine, args: argparse.Namespace) -> int:
    rows = [("GUEST", "STATE", "DISKS", "MACS", "JOBS")]
    job = engine.job(args.job) if getattr(args, "job", None) else None
    guests = engine.guests()
    covered = coverage(engine.jobs(), guests)
    for guest in guests:
        disks = ",".join(d.target for d in guest.disks if d.backs_up)
        label = covered[guest.name].label
        rows.append((guest.name, guest.state, disks or "-", ",".join(guest.macs) or "-", label))
    _table(rows)
    uncovered = sorted(name for name, c in covered.items() if c.uncovered)
    if uncovered:
        print(f"not backed up by any job: {escape(', '.join(uncovered))}", file=sys.stderr)
    for guest in guests:
        print(f"\n{escape(guest.name)}{'' if guest.persistent else ' (transient)'}:")
        # Without --job, the plan of the first job that backs the guest up (mode stop if none).
        plan_rows = [
            (f"  {p.target}", p.source or "-", p.how + (f": {p.reason}" if p.reason else ""))
            for p in engine.disk_plans(guest, job or covered[guest.name].first)
        ]
        _table(plan_rows or [("  (no disks)",)])
    return 0


def cmd_devices(engine: Engine, args: argparse.Namespace, reporter: ConsoleReporter) -> int:
    found = engine.devices(probe_marker=not args.no_probe)
    if not found:
        print("no external devices with a filesystem (plugged in and not mounted)")
        return 0
    header = ("NODE", "LABEL", "UUID", "FILESYSTEM", "SIZE", "VENDOR/MODEL", "BUS", "VERSIONS")
    rows = [(*header, "ARCHIVE")]
    sharing = {dev.node: device_shares(dev.fstype, dev.node) for dev in found}
    for dev in found:
        rows.append(
            (
                dev.node,
                dev.label or "-",
                dev.uuid or "-",
                dev.filesystem,
                byte_size(dev.size),
                " ".join(x for x in (dev.vendor, dev.model) if x) or "-",
                dev.bus or "-",
                sharing_label(sharing[dev.node]),
                {True: "yes", False: "no", None: "?"}[dev.has_marker],
            )
        )
    _table(rows)
    if not all(sharing.values()):
        print(
            "VERSIONS: shared = each version shares the blocks that did not change with the "
            "one before (reflink); full copies = every version takes the whole space. "
            "For a backup disk, XFS or btrfs shares."
        )
    return 0


def cmd_run_due(engine: Engine, args: argparse.Namespace, reporter: ConsoleReporter) -> int:
    # Quiet unless something ran: cron mails whatever a command prints.
    done = engine.run_due(_OutcomesOnly(reporter))
    for run in done:
        status = "ok" if run.ok else "FAILED"
        if run.ok and run.restore_tests_failed:
            status = "ok, but a restore test did not pass"
        print(f"job {escape(run.job)} (due {run.due:%Y-%m-%d %H:%M %Z}): {status}")
        _say_failed_tests(run.restore_tests_failed)
    if not all(run.ok for run in done):
        return RunFailed.exit_code
    # As for run: cron must hear that a version did not boot.
    return RestoreError.exit_code if any(run.restore_tests_failed for run in done) else 0


class _OutcomesOnly:
    """Passes on the per-guest results and errors, not every step."""

    def __init__(self, reporter: ConsoleReporter) -> None:
        self.reporter = reporter

    def __call__(self, event: Event) -> None:
        if isinstance(event, GuestOutcome) or (
            isinstance(event, LogLine) and event.level >= logging.ERROR
        ):
            self.reporter(event)


def cmd_schedule(engine: Engine, args: argparse.Namespace, reporter: ConsoleReporter) -> int:
    unit_dir: Path = args.unit_dir or engine.unit_dir
    if args.action == "status":
        rows = [("JOB", "ON CALENDAR", "NEXT RUN", "TIMER")]
        states = engine.timer_states()
        for job in engine.jobs():
            calendar = on_calendar(job) or "-"
            rows.append((job.name, calendar, _next_run(engine, job, "installed"), states[job.name]))
        _table(rows)
        print(f"units in {unit_dir}")
        return 0
    if args.action == "install":
        changes = engine.install_timers(unit_dir)
    else:
        changes = engine.remove_timers(unit_dir)
    for name in changes.written:
        print(f"wrote {escape(str(unit_dir / name))}")
    for name in changes.removed:
        print(f"removed {escape(str(unit_dir / name))}")
    if not changes.written and not changes.removed:
        print(f"timers in {escape(str(unit_dir))} are up to date")
    if not changes.reloaded and (changes.written or changes.removed):
        print("systemd was not reloaded (not running, or not its unit directory)")
    return 0


def _table(raw_rows: Sequence[Sequence[str]]) -> None:
    rows = [tuple(escape(cell) for cell in row) for row in raw_rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def cmd_prune(engine: Engine, args: argparse.Namespace, reporter: ConsoleReporter) -> int:
    jobs = [engine.job(args.job)] if args.job is not None else engine.jobs()
    if not jobs:
        print(f"no jobs yet in {engine.paths.config_file}")
        return 0
    rows = [("JOB", "GUEST", "VERSION", "STARTED", "KEPT BY")]
    deleted = 0
    for job in jobs:
        print(f"{escape(job.name)}: {describe_policy(retention_policy(job))}")
        if args.dry_run:
            previews = [(g, rows, "would go") for g, rows in engine.retention_preview(job)]
        else:
            # The same rules as the dry run, applied under the locks a backup takes.
            pruned = engine.prune(job, reporter)
            previews = [(p.guest, p.rows, "kept: busy" if p.skipped else "deleted") for p in pruned]
            deleted += sum(len(p.deleted) for p in pruned)
        for guest, versions, gone in previews:
            rows += [(job.name, guest, *_prune_row(c, why, gone)) for c, why in versions]
            if not versions:
                rows.append((job.name, guest, "-", "-", "no versions"))
    _table(rows)
    if not args.dry_run:
        print(f"deleted {deleted} version{'s' if deleted != 1 else ''}")
    return 0


def _prune_row(
    candidate: Candidate, reasons: list[str], gone: str = "would go"
) -> tuple[str, str, str]:
    # Local time: the calendar rules bucket by the host's local dates.
    when = "-" if candidate.started is None else candidate.started.astimezone()
    started = when if isinstance(when, str) else when.strftime("%Y-%m-%d %a %H:%M")
    return str(candidate.number), started, ", ".join(reasons) or gone


_COMMANDS = {
    "prune": cmd_prune,
    "jobs": cmd_jobs,
    "run": cmd_run,
    "list": cmd_list,
    "verify": cmd_verify,
    "restore": cmd_restore,
    "boot": cmd_boot,
    "promote": cmd_promote,
    "test-restore": cmd_test_restore,
    "recover": cmd_recover,
    "guests": cmd_guests,
    "run-due": cmd_run_due,
    "schedule": cmd_schedule,
    "devices": cmd_devices,
    "files": files_cli.cmd_files,
    "extract": files_cli.cmd_extract,
}
