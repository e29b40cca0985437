"""Telling someone how a run went: the host's sendmail, or a webhook.

Configured in the ``[notify]`` table of ``jobs.toml``::

    [notify]
    mail_to = ["ops@example.org"]        # one address or a list; enables mail
    sendmail = "/usr/sbin/sendmail"      # the default; any sendmail-compatible program
    mail_from = "guestsafe@host"         # optional From: header
    webhook = "https://hooks.example.org/guestsafe"  # POSTs the run as JSON
    on_success = false                   # failures always; successes only when true
    timeout = 10                         # seconds for sendmail and for the webhook

Sending never changes a run's outcome: ``send`` returns what went wrong as
lines for the run's log and raises nothing. sendmail gets an argument list (no
shell) and the message on stdin; the recipients are checked when the file is
loaded, so none can pass for an option.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from email.message import EmailMessage
from email.utils import formatdate
from enum import StrEnum

import humanize

from guestsafe.engine import __version__
from guestsafe.engine.events import GuestOutcome

DEFAULT_SENDMAIL = "/usr/sbin/sendmail"
DEFAULT_TIMEOUT = 10
_KEYS = ("mail_to", "sendmail", "mail_from", "webhook", "on_success", "timeout")
# Deliberately plain: one local part, one domain, no spaces, no leading dash.
_ADDRESS = re.compile(r"[A-Za-z0-9._%+=~!#$&'*/?^`{|}-]+@[A-Za-z0-9.-]+")
_URL = re.compile(r"https?://[^\s\x00-\x1f\x7f]+")


@dataclass(frozen=True)
class NotifyConfig:
    mail_to: tuple[str, ...] = ()
    sendmail: str = DEFAULT_SENDMAIL
    mail_from: str | None = None
    webhook: str | None = None
    on_success: bool = False
    timeout: int = DEFAULT_TIMEOUT

    @property
    def enabled(self) -> bool:
        return bool(self.mail_to or self.webhook)

    def table(self) -> dict[str, object]:
        """The ``[notify]`` table that reads back as this config."""
        table: dict[str, object] = {}
        if self.mail_to:
            table |= {"mail_to": list(self.mail_to), "sendmail": self.sendmail}
        if self.mail_from is not None:
            table["mail_from"] = self.mail_from
        if self.webhook is not None:
            table["webhook"] = self.webhook
        return table | {"on_success": self.on_success, "timeout": self.timeout}


def parse_notify(table: object) -> tuple[NotifyConfig, list[tuple[str, str]]]:
    """The config in a ``[notify]`` table, and (field, message) for each problem."""
    if not isinstance(table, dict):
        return NotifyConfig(), [("notify", "notify must be a table: [notify]")]
    problems = [(f"notify.{k}", f"notify: unknown key {k!r}") for k in table if k not in _KEYS]
    mail_to = table.get("mail_to", [])
    if isinstance(mail_to, str):
        mail_to = [mail_to]
    checks = (
        _check_addresses(mail_to),
        _check_program(table.get("sendmail", DEFAULT_SENDMAIL)),
        _check_from(table.get("mail_from")),
        _check_url(table.get("webhook")),
        _check_type("on_success", table.get("on_success", False), bool, "true or false"),
        _check_timeout(table.get("timeout", DEFAULT_TIMEOUT)),
    )
    problems += [p for p in checks if p is not None]
    if problems:
        return NotifyConfig(), problems
    config = NotifyConfig(
        mail_to=tuple(mail_to),
        sendmail=table.get("sendmail", DEFAULT_SENDMAIL),
        mail_from=table.get("mail_from"),
        webhook=table.get("webhook"),
        on_success=table.get("on_success", False),
        timeout=table.get("timeout", DEFAULT_TIMEOUT),
    )
    return config, []


def _check_addresses(value: object) -> tuple[str, str] | None:
    problem = check_mail_to("notify.mail_to", value)
    return None if problem is None else ("notify.mail_to", problem)


def check_mail_to(name: str, value: object) -> str | None:
    """What is wrong with ``value`` as a list of recipients; for ``[notify]`` and a job."""
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        return f"{name} must be an address or a list of addresses"
    for address in value:
        if not _ADDRESS.fullmatch(address) or address.startswith("-"):
            return f"{name}: {address!r} is not a plain mail address"
    return None


def _check_program(value: object) -> tuple[str, str] | None:
    if not isinstance(value, str) or not value.startswith("/") or not value.isprintable():
        return ("notify.sendmail", f"notify.sendmail must be an absolute path, not {value!r}")
    return None


def _check_from(value: object) -> tuple[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _ADDRESS.fullmatch(value):
        return ("notify.mail_from", f"notify.mail_from: {value!r} is not a plain mail address")
    return None


def _check_url(value: object) -> tuple[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _URL.fullmatch(value):
        return (
            "notify.webhook",
            f"notify.webhook must be an http:// or https:// URL, not {value!r}",
        )
    return None


def _check_type(name: str, value: object, kind: type, wanted: str) -> tuple[str, str] | None:
    if not isinstance(value, kind):
        return (f"notify.{name}", f"notify.{name} must be {wanted}, not {value!r}")
    return None


def _check_timeout(value: object) -> tuple[str, str] | None:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 600:
        return ("notify.timeout", f"notify.timeout must be 1 to 600 seconds, not {value!r}")
    return None


# --- sending -------------------------------------------------------------------


@dataclass(frozen=True)
class RunReport:
    """What a notification says about one run."""

    job: str
    ok: bool
    log_path: str
    outcomes: Sequence[GuestOutcome]
    problems: Sequence[str] = ()  # job-level failures, such as a failed job-end hook
    host: str = field(default_factory=socket.gethostname)
    uncovered: Sequence[str] = ()  # persistent guests no job backs up, seen after the run
    restore_tests: Sequence[str] = ()  # one line per restore test after the run
    restore_tests_failed: int = 0

    def subject(self) -> str:
        notes = []
        failed = sum(not o.ok for o in self.outcomes)
        if not self.ok and failed:
            notes.append(f"{failed} of {len(self.outcomes)} guests")
        if self.uncovered:
            notes.append(f"{_guests(len(self.uncovered))} in no job")
        if self.restore_tests_failed:
            notes.append(f"restore test FAILED for {_guests(self.restore_tests_failed)}")
        status = "ok" if self.ok else "FAILED"
        suffix = f" ({', '.join(notes)})" if notes else ""
        return f"guestsafe: job {self.job} {status} on {self.host}{suffix}"

    @property
    def total_bytes(self) -> int:
        return sum(o.bytes_copied for o in self.outcomes)

    def body(self) -> str:
        lines = _table(self.outcomes) if self.outcomes else ["no guest was backed up"]
        lines += [f"total: {_size(self.total_bytes)}", ""]
        lines += [f"{o.guest}: {o.message}" for o in self.outcomes]
        lines += list(self.problems)
        if self.restore_tests:
            lines += ["", *self.restore_tests]
        if self.uncovered:
            lines += ["", "not backed up by any job: " + ", ".join(self.uncovered)]
        lines += ["", f"log: {self.log_path}", f"guestsafe {__version__} on {self.host}"]
        return "\n".join(lines) + "\n"

    def payload(self) -> dict[str, object]:
        return {
            "tool": "guestsafe",
            "version": __version__,
            "host": self.host,
            "job": self.job,
            "ok": self.ok,
            "summary": self.subject(),
            "log": self.log_path,
            "problems": list(self.problems),
            "guests": [asdict(o) for o in self.outcomes],
            "total_bytes": self.total_bytes,
            "uncovered": list(self.uncovered),
            "restore_tests": list(self.restore_tests),
            "restore_tests_failed": self.restore_tests_failed,
        }


_COLUMNS = ("GUEST", "STATUS", "VERSION", "SIZE", "DOWNTIME", "DURATION")


def _table(outcomes: Sequence[GuestOutcome]) -> list[str]:
    """The per-guest table of the mail, in columns for a fixed-width font."""
    rows = [_COLUMNS] + [
        (
            o.guest,
            "ok" if o.ok else "FAILED",
            "-" if o.version is None else str(o.version),
            _size(o.bytes_copied),
            "-" if o.downtime is None else f"{o.downtime:.1f} s",
            f"{o.duration:.1f} s",
        )
        for o in outcomes
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]


def _size(n: int) -> str:
    # As sizes.byte_size spells it; notify sits beside sizes and imports none of it.
    return str(humanize.naturalsize(n, binary=True))


def _guests(count: int) -> str:
    return f"{count} guest{'s' if count != 1 else ''}"


def for_job(config: NotifyConfig, mail_to: Sequence[str]) -> NotifyConfig:
    """``config`` with a job's own ``mail_to`` in place of ``[notify]``'s, if it has one."""
    return replace(config, mail_to=tuple(mail_to)) if mail_to else config


class Delivery(StrEnum):
    """How one sending went; each line ``send`` returns starts with ``<value>:``."""

    OK = "ok"
    FAILED = "failed"


def _line(delivery: Delivery, text: str) -> str:
    return f"{delivery}: {text}"


def delivery_of(line: str) -> Delivery:
    """How the sending a line of ``send`` tells of went."""
    return Delivery.OK if line.startswith(f"{Delivery.OK}:") else Delivery.FAILED


def wanted(config: NotifyConfig, report: RunReport) -> bool:
    # A guest in no job is news even after a good run: it is going without backups.
    # So is a version that did not boot in its restore test: the backup may be useless.
    news = bool(report.uncovered) or report.restore_tests_failed > 0
    return config.enabled and (not report.ok or config.on_success or news)


def send(config: NotifyConfig, report: RunReport) -> list[str]:
    """Send ``report`` where ``config`` says; lines for the log, the failures marked.

    Each line starts with ``ok:`` or ``failed:`` (``delivery_of`` tells which). Nothing
    is raised.
    """
    if not wanted(config, report):
        return []
    lines: list[str] = []
    if config.mail_to:
        lines.append(_mail(config, report))
    if config.webhook:
        lines.append(_post(config, config.webhook, report))
    return lines


def _message(config: NotifyConfig, report: RunReport) -> bytes:
    message = EmailMessage()
    message["To"] = ", ".join(config.mail_to)
    if config.mail_from:
        message["From"] = config.mail_from
    message["Subject"] = report.subject()
    message["Date"] = formatdate(localtime=True)
    message.set_content(report.body())
    return message.as_bytes()


def _mail(config: NotifyConfig, report: RunReport) -> str:
    to = ", ".join(config.mail_to)
    # -oi: a line holding only "." does not end the message early.
    argv = [config.sendmail, "-oi", *config.mail_to]
    try:
        proc = subprocess.run(
            argv,
            input=_message(config, report),
            capture_output=True,
            timeout=config.timeout,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return _line(Delivery.FAILED, f"mail to {to} via {config.sendmail}: {exc}")
    if proc.returncode != 0:
        said = " ".join(proc.stderr.decode(errors="replace").split())[:300]
        return _line(
            Delivery.FAILED, f"mail to {to}: {config.sendmail} exited {proc.returncode}: {said}"
        )
    return _line(Delivery.OK, f"mail sent to {to}")


def _post(config: NotifyConfig, url: str, report: RunReport) -> str:
    data = json.dumps(report.payload()).encode()
    headers = {"Content-Type": "application/json", "User-Agent": f"guestsafe/{__version__}"}
    # The scheme is checked to be http or https when the config is loaded.
    request = urllib.request.Request(url, data=data, headers=headers, method="POST")  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=config.timeout) as response:  # noqa: S310
            status = response.status
    except urllib.error.HTTPError as exc:
        return _line(Delivery.FAILED, f"webhook {url} answered {exc.code} {exc.reason}")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        return _line(Delivery.FAILED, f"webhook {url}: {reason}")
    return _line(Delivery.OK, f"webhook {url} answered {status}")
