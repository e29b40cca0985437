"""Errors of the test rig."""

from __future__ import annotations


class RigError(Exception):
    """The rig could not build, start or inspect a test guest; the message says why."""
