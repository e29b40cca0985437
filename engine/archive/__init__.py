"""The archive: committed versions, partial versions, verify, retention, the manifest
and the encoding of guest names on disk. ``FORMAT.md`` beside this file documents the
format. Reads and writes files only; it knows nothing of libvirt or jobs."""
