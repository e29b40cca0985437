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
    openssh-server openssh-client
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

# libvirt runs swtpm_setup as tss to make a TPM guest's state, signing its EK
# certificate with the local CA in /var/lib/swtpm-localca. A CA folder that tss
# cannot write, or one left half made by a run that was killed, fails every TPM
# guest's first start with only "Could not run swtpm_setup". Try it as tss now,
# and repair what it needs.
SWTPM_USER=tss
SWTPM_LOCALCA=/var/lib/swtpm-localca
SWTPM_LOGDIR=/var/log/swtpm/libvirt/qemu

swtpm_probe() {
    local dir rc
    dir=$(mktemp -d /tmp/host-setup-swtpm.XXXXXX)
    chown "$SWTPM_USER" "$dir"
    rc=0
    runuser -u "$SWTPM_USER" -- env TMPDIR=/tmp swtpm_setup --tpm2 --tpm-state "$dir" \
        --createek --create-ek-cert --create-platform-cert --lock-nvram \
        --logfile "$dir/log" --vmid host-setup-probe >/dev/null 2>&1 || rc=$?
    ((rc == 0)) || cat "$dir/log" >&2 || true
    rm -rf "$dir"
    return "$rc"
}

check_swtpm() {
    mkdir -p "$SWTPM_LOCALCA" "$SWTPM_LOGDIR"
    chown "$SWTPM_USER" "$SWTPM_LOGDIR"
    if swtpm_probe; then
        log "swtpm_setup works as $SWTPM_USER"
        return
    fi
    log "swtpm_setup fails as $SWTPM_USER: giving $SWTPM_LOCALCA back to $SWTPM_USER"
    chown -R "$SWTPM_USER:root" "$SWTPM_LOCALCA"
    chmod 0750 "$SWTPM_LOCALCA"
    if swtpm_probe; then
        log "swtpm_setup works as $SWTPM_USER now"
        return
    fi
    local aside
    aside="$SWTPM_LOCALCA.broken-$(date +%Y%m%d%H%M%S)"
    log "swtpm_setup still fails: moving the local CA aside to $aside and making a new one"
    mv "$SWTPM_LOCALCA" "$aside"
    install -d -o "$SWTPM_USER" -g root -m 0750 "$SWTPM_LOCALCA"
    swtpm_probe || die "swtpm_setup fails as $SWTPM_USER even with a new local CA (log above)"
    log "swtpm_setup works as $SWTPM_USER with a new local CA"
}

main() {
    ((EUID == 0)) || die "run as root (it installs packages and starts libvirtd)"
    install_packages
    start_daemons
    wait_for_libvirt
    check_swtpm
}

main "$@"
