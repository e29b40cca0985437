"""Shared by every test layer: the rig's import path and the CI-aware ``require``."""

from __future__ import annotations

import sys
from pathlib import Path

# The test rig (tests/rig) is imported as ``rig`` from any test directory,
# whatever pytest's import mode.
_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from rig.host import in_ci, require  # noqa: E402

# require(condition, reason) skips a test whose prerequisite is missing, or
# fails it when CI is set (CI must not quietly skip). It lives in
# rig.host because conftest modules cannot be imported reliably; import it as
# ``from rig import require``.
__all__ = ["in_ci", "require"]
