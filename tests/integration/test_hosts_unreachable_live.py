"""Issue 16, hosts: a job whose other host does not answer backs up this machine's guest
and fails the other host's guests alone, saying why (real libvirtd, a real TCG guest)."""

from __future__ import annotations

import pytest
from rig.gs import GS

from guestsafe.engine.archive.store import Archive

pytestmark = pytest.mark.integration

# Nothing listens on port 1: ssh is refused at once, as from a host that is down.
DOWN_URI = "qemu+ssh://root@127.0.0.1:1/system"


def _hosts_file(gs: GS) -> None:
    config = gs.engine.paths.config_file
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(f'[hosts.down]\nuri = "{DOWN_URI}"\n')


def test_an_unreachable_host_fails_its_guests_and_the_local_one_is_backed_up(
    gs: GS, guest_factory
) -> None:
    guest = guest_factory("hostsok")
    _hosts_file(gs)
    gs.job("cluster", [guest.name, "elsewhere1"], hosts=["local", "down"])

    result = gs.engine.run_job("cluster")

    outcomes = {o.guest: o for o in result.outcomes}
    assert outcomes[guest.name].ok, outcomes[guest.name].message
    assert guest.is_running()
    [version] = gs.versions(guest)
    assert version.verified is True and version.manifest.host_name is None
    assert version.manifest.uuid == guest.dom.UUIDString()
    failed = outcomes["elsewhere1"]
    assert not failed.ok and "'down' is unreachable" in failed.message
    assert "Connection refused" in failed.message
    assert not result.ok and any("'down' is unreachable" in p for p in result.problems)
    # Nothing of the unreachable host's reached the archive.
    assert Archive.open(gs.archive).guests() == [guest.name]
    log = result.log_path.read_text()
    assert "elsewhere1" in log and "Connection refused" in log


def test_the_cli_lists_each_host_with_its_state(gs: GS, guest_factory) -> None:
    guest = guest_factory("hostslist", start=False)
    _hosts_file(gs)

    listed = gs.cli("guests")
    alone = gs.cli("guests", "--host", "local")

    assert listed.returncode == 4, listed.stderr  # a host is unreachable: a hypervisor error
    assert "host local (qemu:///system): connected" in listed.stdout
    assert f"  {guest.name}" in listed.stdout
    assert f"host down ({DOWN_URI}): unreachable:" in listed.stdout
    assert "Connection refused" in listed.stdout
    assert alone.returncode == 0 and "host down" not in alone.stdout
    assert guest.name in alone.stdout
