"""Shared by every test layer: the CI-aware ``require``.

The test rig (tests/rig) is imported as ``rig`` from any test directory: pytest's
``pythonpath`` setting in pyproject.toml puts tests/ on the path.
"""

from __future__ import annotations

from rig.host import in_ci, require

# require(condition, reason) skips a test whose prerequisite is missing, or
# fails it when CI is set (CI must not quietly skip). It lives in
# rig.host because conftest modules cannot be imported reliably; import it as
# ``from rig import require``.
__all__ = ["in_ci", "require"]
