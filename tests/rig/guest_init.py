"""The shell scripts that run inside the test guest (busybox ash).

The guest is a kernel plus an initramfs and nothing else. Its /init loads the
virtio and ACPI button modules, then keeps a counter on /dev/vda so a test can
tell what a disk copy holds. It speaks to the host only through the serial
console, one ``GS-...`` line per event:

- ``GS-BOOT counter=<n>``: the counter it found on /dev/vda at boot (0 if none);
- ``GS-VDB <line>``: the first line of /dev/vdb, when the guest has one;
- ``GS-READY``: setup is done, the counter runs. A power button press before
  this line may be lost (the kernel drops it before acpid listens), so wait for
  it before asking for a shutdown;
- ``GS-COUNTER <n>``: on the first tick and then every 5th (about a second);
- ``GS-POWEROFF counter=<n>``: the ACPI power button stopped the counter and
  ``n`` is what /dev/vda holds; the guest powers off right after.

Kernel command line options: ``gs.acpi=0`` leaves acpid out, so the guest
ignores the power button; ``gs.disks=<n>`` tells init how many virtio disks to
wait for; ``gs.agent=0`` leaves the guest-agent responder out, so a guest with
the agent channel never answers on it.

When the host gave the guest a virtio-serial device, init loads virtio_console
and, on the port named ``org.qemu.guest_agent.0``, runs a tiny stand-in for
qemu-guest-agent (``AGENT_SH``): enough of its protocol for libvirt's ping.
"""

from __future__ import annotations

# Load order matters: insmod resolves no dependencies, so each module comes
# after the ones it needs. virtio_net and its failover helpers only make the
# NICs visible inside the guest; nothing depends on them.
MODULES: tuple[str, ...] = (
    "evdev",
    "button",
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
)

# Loaded only when the host gave the guest such a device (a virtio device of
# that id under /sys/bus/virtio): module -> virtio device id. Their dependencies
# must be in MODULES (the builder checks modules.dep).
DEVICE_MODULES: dict[str, str] = {"virtio_console": "0x0003"}

AGENT_PORT = "org.qemu.guest_agent.0"

# Every module except these must load, or the guest cannot do its job.
OPTIONAL_MODULES: frozenset[str] = frozenset({"failover", "net_failover", "virtio_net"})

COUNTER_PRINT_EVERY = 5

# Shared by /init and the power-button handler.
LIB_SH = r"""
PATH=/bin
export PATH

# Value of gs.<name>= on the kernel command line, or $2.
gs_opt() {
    for word in $(cat /proc/cmdline); do
        case "$word" in
            "gs.$1="*) echo "${word#*=}"; return ;;
        esac
    done
    echo "$2"
}

# First line of a block device. Reads one sector only (an empty disk has no
# newline, and head would read all of it) and drops the NUL padding.
first_line() {
    dd if="$1" bs=512 count=1 2>/dev/null | tr -d '\000' | head -n 1
}

# The counter /dev/vda holds, 0 when it holds none.
read_counter() {
    line=$(first_line /dev/vda)
    case "$line" in
        "GSCOUNTER "*) value=${line#GSCOUNTER } ;;
        *) value=0 ;;
    esac
    case "$value" in
        '' | *[!0-9]*) value=0 ;;
    esac
    echo "$value"
}
"""

INIT_SH = r"""#!/bin/sh
. /etc/gs-lib.sh

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /run /tmp /var/log
# The initramfs carries its own /dev/console for the first messages; the
# devtmpfs one replaces it now.
exec </dev/console >/dev/console 2>&1

for module in $(cat /etc/gs-modules); do
    insmod "/lib/modules/$module.ko" || echo "GS-WARN insmod $module failed"
done
# "<module> <virtio device id>" lines: a module only for a device the guest has.
while read -r module device; do
    if grep -qx "$device" /sys/bus/virtio/devices/*/device 2>/dev/null; then
        insmod "/lib/modules/$module.ko" || echo "GS-WARN insmod $module failed"
    fi
done </etc/gs-device-modules

# acpid opens the input devices at start, so button and evdev come first. It
# starts before the disks: a power button press with nobody listening is lost,
# and the handler waits for the counter (below) to be settled before it reads.
if [ "$(gs_opt acpi 1)" != 0 ]; then
    acpid -c /etc/acpi -l /run/acpid.log -p /run/acpid.pid
fi

# virtio_blk probes asynchronously; wait (bounded) for every disk the host gave us.
disks=$(gs_opt disks 1)
set -- a b c d e f g h i j k l m n o p
waited=0
while [ "$disks" -gt 0 ] && [ $# -gt 0 ]; do
    while [ ! -b "/dev/vd$1" ] && [ "$waited" -lt 200 ]; do
        sleep 0.05
        waited=$((waited + 1))
    done
    [ -b "/dev/vd$1" ] || echo "GS-WARN /dev/vd$1 missing"
    disks=$((disks - 1))
    shift
done

if [ -b /dev/vda ]; then
    counter=$(read_counter)
else
    counter=none
fi
echo "GS-BOOT counter=$counter"

if [ -b /dev/vdb ]; then
    echo "GS-VDB $(first_line /dev/vdb)"
fi

counter_loop() {
    n=$1
    ticks=0
    while [ ! -e /run/gs-stop ]; do
        n=$((n + 1))
        # fsync makes each value durable on the host before the next tick.
        printf 'GSCOUNTER %d\n' "$n" | dd of=/dev/vda conv=notrunc,fsync 2>/dev/null
        if [ $((ticks % @PRINT_EVERY@)) -eq 0 ]; then
            echo "GS-COUNTER $n"
        fi
        ticks=$((ticks + 1))
        sleep 0.2
    done
    : >/run/gs-stopped
}

if [ "$counter" = none ]; then
    : >/run/gs-stopped
else
    counter_loop "$counter" &
fi

# A virtio-serial device: the agent's port may be on it (the responder looks).
if [ "$(gs_opt agent 1)" != 0 ] && grep -qx 0x0003 /sys/bus/virtio/devices/*/device 2>/dev/null
then
    /etc/gs-agent.sh &
fi

echo GS-READY

# PID 1 must never exit (the kernel panics); reap orphans meanwhile.
while :; do
    wait
    sleep 3600
done
""".replace("@PRINT_EVERY@", str(COUNTER_PRINT_EVERY))

# busybox acpid maps the ACPI power button to the action "PWRF/00000080" and
# runs the file of that name under its config directory.
POWEROFF_SH = r"""#!/bin/sh
. /etc/gs-lib.sh

# Let the counter loop finish its current write, so the disk holds a whole value.
: >/run/gs-stop
tries=0
while [ ! -e /run/gs-stopped ] && [ "$tries" -lt 100 ]; do
    sleep 0.05
    tries=$((tries + 1))
done

if [ -b /dev/vda ]; then
    counter=$(read_counter)
else
    counter=none
fi
echo "GS-POWEROFF counter=$counter" >/dev/console
sync
# The serial line drains asynchronously; give the last line time to reach the host.
sleep 0.1
poweroff -f
"""

# A stand-in for qemu-guest-agent on its virtio port: one JSON command a line in,
# one reply a line out. libvirt sends guest-sync (its id echoed back) before a
# command, then the command; guest-sync-delimited's reply starts with a 0xFF byte
# as qemu-ga's does, so a client can find the reply's start after stale bytes.
AGENT_SH = r"""#!/bin/sh
. /etc/gs-lib.sh

# Without udev there is no /dev/virtio-ports/<name> link: find /dev/vportNpM by name.
port=
tries=0
while [ -z "$port" ] && [ "$tries" -lt 200 ]; do
    for name in /sys/class/virtio-ports/*/name; do
        if [ "$(cat "$name" 2>/dev/null)" = @PORT@ ]; then
            dir=${name%/name}
            port=/dev/${dir##*/}
        fi
    done
    [ -c "$port" ] || port=
    [ -n "$port" ] || sleep 0.05
    tries=$((tries + 1))
done
if [ -z "$port" ]; then
    echo "GS-WARN no virtio port @PORT@"
    exit 0
fi
echo "GS-AGENT $port"

# The number after "id": in a command line, or 0.
sync_id() {
    rest=${1#*'"id"'}
    rest=${rest#*:}
    rest=${rest#"${rest%%[!\ ]*}"}
    id=${rest%%[!0-9]*}
    echo "${id:-0}"
}

# One reply a line: the port is opened once, read-write (a second open is EBUSY).
serve() {
    while IFS= read -r line; do
        case "$line" in
            *'"guest-sync-delimited"'*) printf '\377{"return": %s}\n' "$(sync_id "$line")" ;;
            *'"guest-sync"'*) printf '{"return": %s}\n' "$(sync_id "$line")" ;;
            *'"guest-ping"'*) printf '{"return": {}}\n' ;;
            *'"execute"'*)
                printf '{"error": {"class": "CommandNotFound", "desc": "not in the rig"}}\n' ;;
        esac >&0
    done
}

# read gets end-of-file while the host side is closed; open the port again then.
while :; do
    serve <>"$port"
    sleep 0.2
done
""".replace("@PORT@", AGENT_PORT)
