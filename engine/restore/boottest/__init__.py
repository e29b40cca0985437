"""Automatic restore tests: boot a version as a cut-off clone, wait for a sign of life."""
