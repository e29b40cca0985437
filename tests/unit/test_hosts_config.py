"""Issue 16, hosts: [hosts.NAME] tables, a job's host/hosts, and what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from guestsafe.engine.api import Engine
from guestsafe.engine.errors import JobConfigError
from guestsafe.engine.hypervisor.bounded_open import CONNECT_TIMEOUT
from guestsafe.engine.hypervisor.connection import Hypervisor
from guestsafe.engine.jobs import jobs_file
from guestsafe.engine.jobs.hosts_config import LOCAL_HOST, check_uri
from guestsafe.engine.jobs.model import Job, job_hosts
from guestsafe.engine.paths import Paths

NODE2 = 'uri = "qemu+ssh://root@node2/system"'


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "jobs.toml"
    path.write_text(text)
    return path


def _job(hosts_line: str = "", name: str = "nightly") -> str:
    return f'[jobs.{name}]\nguests = ["web1"]\ndestination = "/srv/backup"\n{hosts_line}\n'


def _problems(path: Path) -> list[str]:
    with pytest.raises(JobConfigError) as raised:
        jobs_file.load_jobs(path)
    return [str(p) for p in raised.value.problems]


def test_a_job_names_one_host_or_several(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        f"[hosts.node1]\n{NODE2.replace('node2', 'node1')}\n[hosts.node2]\n{NODE2}\n"
        + _job('host = "node2"')
        + _job('hosts = ["local", "node1", "node2"]', "cluster")
        + _job("", "plain"),
    )
    jobs = {job.name: job for job in jobs_file.load_jobs(path)}
    assert jobs["nightly"].hosts == ["node2"]
    assert jobs["cluster"].hosts == [LOCAL_HOST, "node1", "node2"]
    assert jobs["plain"].hosts == [] and job_hosts(jobs["plain"]) == [LOCAL_HOST]
    hosts = jobs_file.load_hosts(path)
    assert {name: h.uri for name, h in hosts.items()} == {
        "node1": "qemu+ssh://root@node1/system",
        "node2": "qemu+ssh://root@node2/system",
    }


def test_saving_a_job_keeps_the_hosts_and_the_jobs_host(tmp_path: Path) -> None:
    path = _write(tmp_path, f"[hosts.node2]\n{NODE2}\n" + _job('host = "node2"'))
    jobs = jobs_file.load_jobs(path)
    cluster = Job("cluster", ["db1"], Path("/srv/backup"), hosts=[LOCAL_HOST, "node2"])
    jobs_file.upsert_job(path, cluster)
    again = {job.name: job for job in jobs_file.load_jobs(path)}
    assert again["nightly"].hosts == jobs[0].hosts == ["node2"]
    assert again["cluster"].hosts == [LOCAL_HOST, "node2"]
    assert jobs_file.load_hosts(path)["node2"].uri == "qemu+ssh://root@node2/system"
    text = path.read_text()
    assert 'host = "node2"' in text and 'hosts = [\n    "local",' in text


def test_a_uri_with_a_password_is_refused_in_one_line_without_echoing_it(tmp_path: Path) -> None:
    path = _write(tmp_path, '[hosts.node2]\nuri = "qemu+ssh://root:s3cret@node2/system"\n')
    with pytest.raises(JobConfigError) as raised:
        jobs_file.load_jobs(path)
    message = raised.value.message
    assert "password" in message and "\n" not in message
    assert "s3cret" not in message  # the error goes to logs and terminals


def test_a_job_naming_an_unknown_host_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, f"[hosts.node2]\n{NODE2}\n" + _job('hosts = ["node2", "node3"]'))
    (problem,) = _problems(path)
    assert "'node3' is not defined" in problem and "[hosts.node3]" in problem


def test_a_job_saved_with_an_unknown_host_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, "")
    with pytest.raises(JobConfigError, match="'node9' is not defined"):
        jobs_file.upsert_job(path, Job("x", ["web1"], Path("/srv/b"), hosts=["node9"]))
    assert not jobs_file.load_jobs(path)


def test_a_broken_host_table_is_named_once_and_not_blamed_on_its_jobs(tmp_path: Path) -> None:
    path = _write(tmp_path, '[hosts.node2]\nuri = "ftp://node2/"\n' + _job('host = "node2"'))
    (problem,) = _problems(path)
    assert "[hosts.node2]" in problem and "driver 'ftp'" in problem


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[hosts.local]\nuri = "qemu:///system"\n', "this machine's own libvirt"),
        ("[hosts.node2]\n", "uri is required"),
        ('[hosts.node2]\nuri = "qemu+ssh://root@node2/system"\nport = 22\n', "unknown key"),
        ('[hosts."-bad"]\nuri = "qemu:///system"\n', "host name '-bad'"),
        (f"[hosts.node2]\n{NODE2}\n" + _job('host = "node2"\nhosts = ["node2"]'), "not both"),
        (f"[hosts.node2]\n{NODE2}\n" + _job('hosts = ["node2", "node2"]'), "more than once"),
        (_job("hosts = [1]"), "list of host names"),
        ("hosts = 3\n", "hosts must be tables"),
    ],
)
def test_malformed_hosts_are_refused(tmp_path: Path, text: str, expected: str) -> None:
    problems = _problems(_write(tmp_path, text))
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize(
    "uri",
    [
        "qemu+ssh://root@node2/system",
        "qemu+ssh://root@127.0.0.1:2222/system?keyfile=/root/.ssh/id_ed25519",
        "qemu+tls://node2.example.org/system",
        "qemu://node2/system",
        "qemu+libssh2://root@node2/system?known_hosts=/root/.ssh/known_hosts",
        "qemu+tcp://node2/system",
        "qemu:///system",
        "test:///default",
    ],
)
def test_libvirt_uris_are_accepted(uri: str) -> None:
    assert check_uri(uri) is None


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("node2", "not a libvirt URI"),
        ("qemu+ssh://root@node 2/system", "not a libvirt URI"),
        ("xen+ssh://root@node2/system", "driver 'xen'"),
        ("qemu+ftp://root@node2/system", "transport 'ftp'"),
        ("qemu+ssh://root@node2:ssh/system", "port must be a number"),
        ("qemu+ssh://root:pw@node2/system", "password"),
        ("qemu+ssh://root@node2", "must name a path"),
        ("qemu+tls://node2/system?no_verify=1", "no_verify"),
    ],
)
def test_uris_guestsafe_will_not_use_are_refused(uri: str, expected: str) -> None:
    problem = check_uri(uri)
    assert problem is not None and expected in problem


def test_a_hosts_reconnect_wait_and_connect_timeout_are_read_and_reach_its_connection(
    tmp_path: Path,
) -> None:
    path = _write(
        tmp_path,
        f"[hosts.node2]\n{NODE2}\nreconnect_wait = 5\nconnect_timeout = 7\n"
        f"[hosts.node3]\n{NODE2.replace('node2', 'node3')}\n" + _job('host = "node2"'),
    )
    hosts = jobs_file.load_hosts(path)
    assert hosts["node2"].reconnect_wait == 5.0 and hosts["node3"].reconnect_wait is None
    cluster = Job("cluster", ["db1"], Path("/srv/backup"), hosts=["node2"])
    jobs_file.upsert_job(path, cluster)  # the [hosts] tables are kept as they were
    assert jobs_file.load_hosts(path)["node2"].reconnect_wait == 5.0
    assert jobs_file.load_hosts(path)["node2"].connect_timeout == 7.0

    engine = Engine(uri="test:///default", paths=_paths(tmp_path, path))
    try:
        registry = engine.hosts
        opened = []
        registry._opener = lambda uri, t: opened.append((uri, t)) or Hypervisor("test:///default")  # type: ignore[method-assign]
        assert registry.get("node2").reconnect_wait == 5.0
        assert registry.get("node3").reconnect_wait is None
        assert [t for _uri, t in opened] == [7.0, CONNECT_TIMEOUT]
        assert engine.hv.reconnect_wait is None  # --connect: the copy's own default
    finally:
        engine.close()


@pytest.mark.parametrize("value", ["-1", "3601", '"soon"', "true"])
def test_a_wrong_reconnect_wait_is_refused(tmp_path: Path, value: str) -> None:
    path = _write(tmp_path, f"[hosts.node2]\n{NODE2}\nreconnect_wait = {value}\n" + _job())
    (problem,) = _problems(path)
    assert "reconnect_wait must be a number of seconds from 0 to 3600" in problem


@pytest.mark.parametrize("value", ["0.5", "601", '"soon"', "false"])
def test_a_wrong_connect_timeout_is_refused(tmp_path: Path, value: str) -> None:
    path = _write(tmp_path, f"[hosts.node2]\n{NODE2}\nconnect_timeout = {value}\n" + _job())
    (problem,) = _problems(path)
    assert "connect_timeout must be a number of seconds from 1 to 600, not " in problem


def _paths(tmp_path: Path, config: Path) -> Paths:
    home = tmp_path / "home"
    return Paths(config, home / "state", home / "log", home / "cache")
