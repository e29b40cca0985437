"""The ``--host`` and ``--to-host`` options every command that names a guest takes."""

from __future__ import annotations

import argparse

HOST_HELP = (
    "the host the guest was backed up from ([hosts.NAME] in jobs.toml; default: the one "
    "host whose backups hold that guest, else this machine)"
)
TO_HOST_HELP = "define the new guest on this host ([hosts.NAME]; default: this machine)"


def add_host_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", metavar="NAME", help=HOST_HELP)


def add_to_host_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--to-host", metavar="NAME", help=TO_HOST_HELP)
