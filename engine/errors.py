"""One hierarchy of engine errors.

Every error carries a short ``title`` and a ``message`` a person can act on
("need 41 GiB on /mnt/backup, 12 GiB free"). Front-ends show both and never a
traceback.
"""

from __future__ import annotations


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
    exit_code = 11  # a vetoed backup is a failed backup
