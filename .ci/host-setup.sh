#!/usr/bin/env bash
# Prepare a Debian 12 host (or CI container) for guestsafe's integration tests:
# install the packages, start udev, virtlogd and libvirtd, and wait until
# qemu:///system answers. Safe to run again: it only does what is missing.
# Must run as root.
set -euo pipefail

PACKAGES=(
    libvirt-daemon-system libvirt-clients qemu-system-x86 qemu-utils ovmf
    libvirt-dev pkg-config
    busybox-static cpio
    udev acl lvm2
    e2fsprogs xfsprogs btrfs-progs ntfs-3g exfatprogs exfat-fuse dosfstools fdisk util-linux
    systemd
    python3-venv python3-dev b3sum
    swtpm swtpm-tools
    python3-guestfs linux-image-amd64
    openssh-server
)
LIBVIRT_URI=qemu:///system
WAIT_SECONDS=30

log() { printf 'host-setup: %s\n' "$*"; }
die() { printf 'host-setup: ERROR: %s\n' "$*" >&2; exit 1; }

missing_packages() {
    local pkg status
    for pkg in "${PACKAGES[@]}"; do
        status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
        [[ $status == installed ]] || printf '%s\n' "$pkg"
    done
}

install_packages() {
    local missing
    mapfile -t missing < <(missing_packages)
    if ((${#missing[@]} == 0)); then
        log "packages: all installed"
        return
    fi
    log "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # force-confnew: libvirt-daemon-system asks about an existing qemu.conf.
    apt-get install -y -q --no-install-recommends \
        -o Dpkg::Options::=--force-confnew "${missing[@]}"
}

running() { pgrep -x "$1" >/dev/null; }

start_daemons() {
    mkdir -p /var/log/libvirt /var/run/libvirt
    if ! running systemd-udevd; then
        log "starting systemd-udevd"
        /lib/systemd/systemd-udevd --daemon
    fi
    if ! running virtlogd; then
        log "starting virtlogd"
        virtlogd -d
    fi
    if ! running libvirtd; then
        log "starting libvirtd"
        libvirtd -d
    fi
}

wait_for_libvirt() {
    local deadline=$((SECONDS + WAIT_SECONDS))
    until virsh -c "$LIBVIRT_URI" version >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            virsh -c "$LIBVIRT_URI" version >&2 || true
            die "libvirtd does not answer at $LIBVIRT_URI after ${WAIT_SECONDS} s" \
                "(see /var/log/libvirt/libvirtd.log)"
        fi
        sleep 0.5
    done
    log "$LIBVIRT_URI answers"
}

main() {
    ((EUID == 0)) || die "run as root (it installs packages and starts libvirtd)"
    install_packages
    start_daemons
    wait_for_libvirt
}

main "$@"
