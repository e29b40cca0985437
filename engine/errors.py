"""One hierarchy of engine errors.

Every error carries a short ``title`` and a ``message`` a person can act on
("need 41 GiB on /mnt/backup, 12 GiB free"). Front-ends show both and never a
traceback.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


class GuestsafeError(Exception):
    """Base of every error the engine raises on purpose."""

    title = "guestsafe error"
    exit_code = 1

    def __init__(self, message: str, *, title: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if title is not None:
            self.title = title

    def __str__(self) -> str:
        return self.message


class ConfigError(GuestsafeError):
    title = "Invalid configuration"
    exit_code = 2


class NotFoundError(GuestsafeError):
    title = "Not found"
    exit_code = 3


@dataclass(frozen=True)
class FieldError:
    """One problem with one field of one job, for forms and error messages.

    ``field`` is the TOML key (``keep``, ``hooks.pre-stop``), ``name`` for the job's
    name, or ``""`` when the whole job table is wrong. ``job`` is ``""`` for problems
    outside any job. ``message`` names the field too, so it reads on its own.
    """

    job: str
    field: str
    message: str

    def __str__(self) -> str:
        # job is "" for problems outside any job, such as an unknown top-level key.
        return f"job {self.job!r}: {self.message}" if self.job else self.message


class JobConfigError(ConfigError):
    """Jobs that failed validation; ``problems`` lists every one of them."""

    def __init__(self, message: str, problems: Sequence[FieldError] = ()) -> None:
        super().__init__(message)
        self.problems = tuple(problems)


class JobNotFound(ConfigError, NotFoundError):
    """No job by that name; both a config and a not-found error for callers."""

    title = "Job not found"
    exit_code = NotFoundError.exit_code


class HypervisorError(GuestsafeError):
    title = "Hypervisor error"
    exit_code = 4


class ShutdownTimeout(HypervisorError):
    title = "Guest did not shut down"


class PreflightError(GuestsafeError):
    title = "Backup refused"
    exit_code = 5


class LockBusy(PreflightError):
    title = "Busy"


class CopyError(GuestsafeError):
    title = "Copy failed"
    exit_code = 6


class Cancelled(CopyError):
    """The operator cancelled (Ctrl-C, SIGTERM, the console's cancel button).

    A ``CopyError`` still, so that whatever cleans up after an unfinished copy
    (the partial removed, the guest started again) does so after a cancel too;
    its title and exit code say what really happened.
    """

    title = "Cancelled"
    exit_code = 130  # 128 + SIGINT, as shells report an interrupted command


class IOFailure(CopyError):
    """An operating-system error, with the operation and the path it hit.

    ``IOFailure("writing the manifest", path, exc)`` reads "writing the manifest
    /srv/backup/web1/.partial-3/manifest.json: No space left on device". A
    ``CopyError`` (exit code 6) like every I/O failure of a backup before it.
    """

    title = "I/O error"

    def __init__(self, operation: str, path: Path | str | None, exc: OSError) -> None:
        reason = exc.strerror or str(exc)
        where = f" {path}" if path else ""
        super().__init__(f"{operation}{where}: {reason}")
        self.operation = operation
        self.path = None if path is None else Path(path)
        self.errno = exc.errno


@contextmanager
def naming(operation: str, path: Path | str | None) -> Iterator[None]:
    """Turn an ``OSError`` inside the block into an ``IOFailure`` naming what failed.

    Without a ``path``, the file name the error carries (if any) is named.
    """
    try:
        yield
    except OSError as exc:
        raise io_failure(operation, path, exc) from exc


def io_failure(operation: str, path: Path | str | None, exc: OSError) -> IOFailure:
    """The ``IOFailure`` for ``exc``; ``path``, else the file name the error carries."""
    if path is None and isinstance(exc.filename, str | bytes):
        path = os.fsdecode(exc.filename)
    return IOFailure(operation, path, exc)


class ArchiveError(GuestsafeError):
    title = "Archive error"
    exit_code = 7


class VerifyError(ArchiveError):
    title = "Verification failed"
    exit_code = 8


class RestoreError(GuestsafeError):
    title = "Restore refused"
    exit_code = 9


class DeviceError(GuestsafeError):
    title = "Device error"
    exit_code = 10


class RunFailed(GuestsafeError):
    """A job finished with at least one guest failed; details are in the log."""

    title = "Backup failed"
    exit_code = 11


class HookFailed(GuestsafeError):
    """An operator's hook failed; from job-start or pre-stop it vetoes the backup."""

    title = "Hook failed"
    # A hook's failure is a failed backup: a run reports it as RunFailed (README,
    # "Exit codes"), and only the hooks' own checks raise it to a front-end.
    exit_code = RunFailed.exit_code


class HostUnreachable(HypervisorError):
    """A hypervisor host of ``[hosts.NAME]`` did not answer; its guests alone fail."""

    title = "Host unreachable"


class RemoteDisksUnsupported(HypervisorError):
    """Reading or writing the disks of a guest on another host needs the remote transport."""

    title = "Remote disks not supported"


class AmbiguousGuest(ConfigError):
    """A guest name found on several hosts (or in their series): the caller names one."""

    title = "Which host?"
