"""External backup disks: udev discovery and hot-plug watching, mount information, and
the mount lifecycle of a job's device."""
