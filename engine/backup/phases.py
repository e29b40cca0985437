"""The phases of one guest's backup, as the journal and the log spell them.

The journal records each phase before it begins (``recover()`` reads it after a
crash) and the console shows it; the spellings are on disk and in log files, so
they never change. In the order a guest meets them::

    preflight      checks and the guest's lock; nothing touched yet
    prepare        stop-short, snapshot: the partial and QEMU's access to it
    shutdown       stop, stop-short: the clean shutdown
    copy           the disks (stop), the NVRAM (stop-short, snapshot)
    start          stop, stop-short: the guest starts again
    freeze         snapshot: the guest agent freezes the filesystems
    backup-begin   stop-short: started paused, QEMU's push backup begins, resumed;
                   snapshot: the push backup begins on the running guest
    backup         stop-short, snapshot: waiting for QEMU's copy
    hash           stop-short, snapshot: QEMU's files hashed
    commit         the manifest written, the version renamed into place
    verify         the version read back (when the job says so)
    retention      versions beyond ``keep`` removed
    restart-failed the guest could not be started again; recover() tries later
"""

from __future__ import annotations

from enum import StrEnum


class Phase(StrEnum):
    PREFLIGHT = "preflight"
    PREPARE = "prepare"
    SHUTDOWN = "shutdown"
    COPY = "copy"
    FREEZE = "freeze"
    BACKUP_BEGIN = "backup-begin"
    START = "start"
    BACKUP = "backup"
    HASH = "hash"
    COMMIT = "commit"
    VERIFY = "verify"
    RETENTION = "retention"
    RESTART_FAILED = "restart-failed"


# Journal phases in which a push backup job of ours may still write, or the
# guest's filesystems be frozen: recovery looks for a leftover job.
PUSH_LEFTOVER_PHASES = (Phase.FREEZE, Phase.BACKUP_BEGIN, Phase.BACKUP)
