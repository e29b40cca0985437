"""The hypervisor: the libvirt connection, facts read from domain XML, libvirt push
backup jobs, QEMU's access to files, and facts about disk files."""
