"""guestsafe's engine: libvirt, copying, the archive, jobs and logs.

Nothing in this package imports Textual; tests/unit/test_import_hygiene.py enforces it.
"""

__version__ = "0.1.0"
