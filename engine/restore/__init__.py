"""Restoring: planning a restore, a version as a new guest (a clone), or over the
original. It reads the archive and never imports ``backup/``."""
