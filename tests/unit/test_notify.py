"""Notifications: the [notify] table, a sendmail stand-in, and a webhook on loopback."""

from __future__ import annotations

import email
import json
import threading
from collections.abc import Iterator
from email.message import Message
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from guestsafe.engine.api import Engine
from guestsafe.engine.backup.results import RunResult
from guestsafe.engine.errors import ConfigError
from guestsafe.engine.events import GuestOutcome
from guestsafe.engine.jobs.jobs_file import load_jobs, load_notify, upsert_job
from guestsafe.engine.jobs.model import Job
from guestsafe.engine.notify import NotifyConfig, RunReport, parse_notify, send
from guestsafe.engine.paths import Paths

OK = GuestOutcome("web1", True, 3, 12.5, 1 << 30, 40.0, "ok: version 3, downtime 12.5 s")
BAD = GuestOutcome("db1", False, None, None, 0, 2.0, "failed: hook pre-stop exited 1")


def _report(ok: bool = False) -> RunReport:
    outcomes = [OK] if ok else [OK, BAD]
    return RunReport("nightly", ok, "/var/log/guestsafe/x.log", outcomes, host="hv1")


# --- configuration -------------------------------------------------------------


def test_parse_full_table() -> None:
    config, problems = parse_notify(
        {
            "mail_to": "ops@example.org",
            "sendmail": "/usr/lib/sendmail",
            "mail_from": "gs@hv1.example.org",
            "webhook": "https://hooks.example.org/x?y=1",
            "on_success": True,
            "timeout": 5,
        }
    )
    assert problems == []
    assert config == NotifyConfig(
        ("ops@example.org",),
        "/usr/lib/sendmail",
        "gs@hv1.example.org",
        "https://hooks.example.org/x?y=1",
        True,
        5,
    )
    assert parse_notify(config.table()) == (config, [])


@pytest.mark.parametrize(
    ("table", "field"),
    [
        ({"mail_to": "ops@example.org\nBcc: all@example.org"}, "notify.mail_to"),
        ({"mail_to": ["-oQ/tmp@x"]}, "notify.mail_to"),
        ({"mail_to": 3}, "notify.mail_to"),
        ({"sendmail": "sendmail"}, "notify.sendmail"),
        ({"webhook": "file:///etc/passwd"}, "notify.webhook"),
        ({"webhook": "http://x/ y"}, "notify.webhook"),
        ({"on_success": "yes"}, "notify.on_success"),
        ({"timeout": 0}, "notify.timeout"),
        ({"mail_too": "x@y"}, "notify.mail_too"),
    ],
)
def test_bad_settings_are_named(table: dict[str, object], field: str) -> None:
    config, problems = parse_notify(table)
    assert [f for f, _ in problems] == [field]
    assert config == NotifyConfig()


def test_jobs_file_accepts_and_keeps_notify(tmp_path: Path) -> None:
    path = tmp_path / "jobs.toml"
    path.write_text(
        '[notify]\nmail_to = ["ops@example.org"]\nwebhook = "http://127.0.0.1:9/x"\n\n'
        '[jobs.nightly]\nguests = ["web1"]\ndestination = "/srv"\n'
    )
    assert [j.name for j in load_jobs(path)] == ["nightly"]
    upsert_job(path, Job("weekly", ["db1"], Path("/srv")))  # rewrites the file
    config = load_notify(path)
    assert config.mail_to == ("ops@example.org",) and config.webhook == "http://127.0.0.1:9/x"
    assert [j.name for j in load_jobs(path)] == ["nightly", "weekly"]


def test_bad_notify_table_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "jobs.toml"
    path.write_text('[notify]\nwebhook = "ftp://x"\n')
    with pytest.raises(ConfigError, match=r"notify\.webhook must be an http"):
        load_jobs(path)
    with pytest.raises(ConfigError, match=r"notify\.webhook"):
        load_notify(path)
    assert load_notify(tmp_path / "absent.toml") == NotifyConfig()


# --- sendmail ------------------------------------------------------------------


@pytest.fixture
def sendmail(tmp_path: Path) -> Path:
    """A sendmail stand-in: keeps its arguments and the message it was given."""
    directory = tmp_path / "sbin"
    directory.mkdir(mode=0o755)
    path = directory / "sendmail"
    spool = tmp_path / "spool"
    path.write_text(
        f'#!/bin/sh\nprintf "%s\\n" "$@" > {spool}.args\ncat > {spool}.msg\n'
        'if [ -e "$0.fail" ]; then echo "relay refused" >&2; exit 75; fi\n'
    )
    path.chmod(0o755)
    return path


def _sent(sendmail: Path) -> tuple[list[str], Message]:
    spool = sendmail.parent.parent / "spool"
    args = Path(f"{spool}.args").read_text().splitlines()
    return args, email.message_from_bytes(Path(f"{spool}.msg").read_bytes())


def test_failure_is_mailed(sendmail: Path) -> None:
    config = NotifyConfig(mail_to=("ops@example.org", "b@example.org"), sendmail=str(sendmail))
    assert send(config, _report()) == ["ok: mail sent to ops@example.org, b@example.org"]
    args, message = _sent(sendmail)
    assert args == ["-oi", "ops@example.org", "b@example.org"]
    assert message["Subject"] == "guestsafe: job nightly FAILED on hv1 (1 of 2 guests)"
    assert message["To"] == "ops@example.org, b@example.org"
    body = message.get_payload(decode=True).decode()  # type: ignore[union-attr]
    assert "web1: ok: version 3, downtime 12.5 s" in body
    assert "db1: failed: hook pre-stop exited 1" in body
    assert "log: /var/log/guestsafe/x.log" in body


def test_success_is_mailed_only_when_asked(sendmail: Path) -> None:
    config = NotifyConfig(mail_to=("ops@example.org",), sendmail=str(sendmail))
    assert send(config, _report(ok=True)) == []
    assert not (sendmail.parent.parent / "spool.msg").exists()
    loud = NotifyConfig(mail_to=("ops@example.org",), sendmail=str(sendmail), on_success=True)
    assert send(loud, _report(ok=True)) == ["ok: mail sent to ops@example.org"]
    assert _sent(sendmail)[1]["Subject"] == "guestsafe: job nightly ok on hv1"


def test_sendmail_failures_are_reported_not_raised(sendmail: Path, tmp_path: Path) -> None:
    Path(f"{sendmail}.fail").touch()
    config = NotifyConfig(mail_to=("ops@example.org",), sendmail=str(sendmail))
    [line] = send(config, _report())
    assert line == f"failed: mail to ops@example.org: {sendmail} exited 75: relay refused"
    missing = NotifyConfig(mail_to=("ops@example.org",), sendmail=str(tmp_path / "none"))
    [line] = send(missing, _report())
    assert line.startswith("failed: mail to ops@example.org via ")


# --- webhook -------------------------------------------------------------------


class Hook(BaseHTTPRequestHandler):
    received: list[tuple[str, dict[str, str], bytes]]
    status = 204

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.path, dict(self.headers), body))
        self.send_response(self.status)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[HTTPServer, list[tuple[str, dict[str, str], bytes]]]]:
    received: list[tuple[str, dict[str, str], bytes]] = []
    handler = type("Handler", (Hook,), {"received": received})
    httpd = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd, received
    httpd.shutdown()
    httpd.server_close()


def _url(httpd: HTTPServer, path: str = "/guestsafe") -> str:
    return f"http://127.0.0.1:{httpd.server_address[1]}{path}"


def test_webhook_gets_the_run_as_json(server: tuple[HTTPServer, list]) -> None:  # type: ignore[type-arg]
    httpd, received = server
    url = _url(httpd)
    assert send(NotifyConfig(webhook=url), _report()) == [f"ok: webhook {url} answered 204"]
    [(path, headers, body)] = received
    assert path == "/guestsafe" and headers["Content-Type"] == "application/json"
    payload = json.loads(body)
    assert payload["job"] == "nightly" and payload["ok"] is False and payload["host"] == "hv1"
    assert [g["guest"] for g in payload["guests"]] == ["web1", "db1"]
    assert payload["guests"][0]["version"] == 3 and payload["guests"][0]["bytes_copied"] == 1 << 30


def test_webhook_errors_are_reported_not_raised(server: tuple[HTTPServer, list]) -> None:  # type: ignore[type-arg]
    httpd, _ = server
    Hook.status = 500
    try:
        [line] = send(NotifyConfig(webhook=_url(httpd)), _report())
    finally:
        Hook.status = 204
    assert line == f"failed: webhook {_url(httpd)} answered 500 Internal Server Error"
    closed = HTTPServer(("127.0.0.1", 0), Hook)
    port = closed.server_address[1]
    closed.server_close()
    [line] = send(NotifyConfig(webhook=f"http://127.0.0.1:{port}/x", timeout=2), _report())
    assert line.startswith(f"failed: webhook http://127.0.0.1:{port}/x: ")


def test_slow_webhook_times_out(tmp_path: Path) -> None:
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)  # accepts the connection, never answers
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/"
        [line] = send(NotifyConfig(webhook=url, timeout=1), _report())
    finally:
        listener.close()
    assert line.startswith(f"failed: webhook {url}: ") and "timed out" in line


# --- through the engine --------------------------------------------------------


def test_engine_logs_notify_results_and_keeps_the_outcome(
    tmp_path: Path,
    sendmail: Path,
    server: tuple[HTTPServer, list],  # type: ignore[type-arg]
) -> None:
    httpd, received = server
    home = tmp_path / "home"
    paths = Paths(home / "config" / "jobs.toml", home / "state", home / "log", home / "cache")
    paths.ensure()
    paths.config_file.write_text(
        f'[notify]\nmail_to = "ops@example.org"\nsendmail = "{sendmail}"\n'
        f'webhook = "{_url(httpd)}"\n'
    )
    Path(f"{sendmail}.fail").touch()  # the mail fails, the webhook works
    log = tmp_path / "run.log"
    log.write_text("")
    result = RunResult("nightly", log, [OK, BAD])
    engine = Engine(uri="test:///default", paths=paths)
    engine._notify(result, lambda event: None)
    text = log.read_text()
    assert "WARNING - notify: failed: mail to ops@example.org" in text
    assert f"INFO - notify: ok: webhook {_url(httpd)} answered 204" in text
    assert len(received) == 1 and not result.ok


# --- issue 15: the per-guest table, per-job recipients, guests in no job ----------


def test_mail_body_has_the_per_guest_table_and_the_total(sendmail: Path) -> None:
    config = NotifyConfig(mail_to=("ops@example.org",), sendmail=str(sendmail))
    assert send(config, _report()) == ["ok: mail sent to ops@example.org"]
    body = _sent(sendmail)[1].get_payload(decode=True).decode()  # type: ignore[union-attr]
    table = [line.split() for line in body.splitlines()[:3]]
    assert table == [
        ["GUEST", "STATUS", "VERSION", "SIZE", "DOWNTIME", "DURATION"],
        ["web1", "ok", "3", "1.0", "GiB", "12.5", "s", "40.0", "s"],
        ["db1", "FAILED", "-", "0", "Bytes", "-", "2.0", "s"],
    ]
    assert "total: 1.0 GiB" in body


def test_guests_in_no_job_are_mailed_even_after_a_good_run(sendmail: Path) -> None:
    config = NotifyConfig(mail_to=("ops@example.org",), sendmail=str(sendmail))
    report = RunReport("nightly", True, "/l.log", [OK], host="hv1", uncovered=["new1", "new2"])
    assert send(config, report) == ["ok: mail sent to ops@example.org"]
    _, message = _sent(sendmail)
    assert message["Subject"] == "guestsafe: job nightly ok on hv1 (2 guests in no job)"
    body = message.get_payload(decode=True).decode()  # type: ignore[union-attr]
    assert "not backed up by any job: new1, new2" in body


def test_a_jobs_mail_to_replaces_the_notify_recipients(tmp_path: Path, sendmail: Path) -> None:
    home = tmp_path / "home"
    paths = Paths(home / "config" / "jobs.toml", home / "state", home / "log", home / "cache")
    paths.ensure()
    paths.config_file.write_text(
        f'[notify]\nmail_to = "ops@example.org"\nsendmail = "{sendmail}"\n\n'
        '[jobs.nightly]\nguests = ["web1"]\ndestination = "/srv"\n'
        'mail_to = ["web-team@example.org", "boss@example.org"]\n'
    )
    log = tmp_path / "run.log"
    log.write_text("")
    engine = Engine(uri="test:///default", paths=paths)
    job = engine.job("nightly")
    engine._notify(RunResult("nightly", log, [OK, BAD]), lambda e: None, mail_to=job.mail_to)
    args, message = _sent(sendmail)
    assert args == ["-oi", "web-team@example.org", "boss@example.org"]
    assert message["To"] == "web-team@example.org, boss@example.org"
    assert message["Subject"].startswith("guestsafe: job nightly FAILED on ")
    assert "notify: ok: mail sent to web-team@example.org, boss@example.org" in log.read_text()
