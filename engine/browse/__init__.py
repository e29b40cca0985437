"""Browsing and extracting files from a version, read-only, through libguestfs."""
