#!/bin/sh
# shellcheck shell=sh
# /init of the vfio-intx test guest (busybox sh). Installed by guest/run.sh, which
# also writes /etc/vfio-intx-guest.conf (VFIO_PCI_ARGS and the command as `set -- ...`).
#
# Loads the KVM, VFIO and UIO modules, binds the three edu devices, exports
# VFIO_INTX_* variables, runs the command, prints exactly one line
#   VFIO-INTX-GUEST-VERDICT rc=<exit code>
# and powers off. A setup failure prints a VFIO-INTX-GUEST-SETUP-ERROR line instead
# of a verdict.

export PATH=/bin
export HOME=/root TERM=dumb

/bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
# The initramfs may have no /dev/console node (it needs root to create): make sure
# stdio is the serial console either way.
exec 0</dev/console 1>/dev/console 2>&1
# No CR before LF on the serial line: the host log gets plain LF line endings.
stty -onlcr 2>/dev/null || true

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mkdir -p /tmp /root /run
mount -t tmpfs tmpfs /tmp

T0="$(cut -d' ' -f1 /proc/uptime)"
log() { echo "guest-init: $*"; }

setup_error() {
    echo "VFIO-INTX-GUEST-SETUP-ERROR $*"
    echo "guest-init: last kernel messages:"
    dmesg | tail -n 30
    poweroff -f
    sleep 5
    exit 1
}

# shellcheck source=/dev/null
. /etc/vfio-intx-guest.conf || setup_error "cannot read /etc/vfio-intx-guest.conf"

# ---------------------------------------------------------------- modules
while read -r ko; do
    [ -n "$ko" ] || continue
    args=""
    [ "$ko" = "vfio-pci.ko" ] && args="$VFIO_PCI_ARGS"
    # shellcheck disable=SC2086 # module parameters are word-split on purpose
    insmod "/lib/modules/$ko" $args || setup_error "insmod $ko $args failed"
done </etc/modules.load

[ -c /dev/kvm ] || setup_error "/dev/kvm missing after loading kvm-amd (CPU model without svm?)"

# ---------------------------------------------------------------- edu devices
EDU_RESET=""
EDU_NORESET=""
EDU_UIO=""
EDU_BUS=""
for d in /sys/bus/pci/devices/*; do
    [ "$(cat "$d/vendor"):$(cat "$d/device")" = 0x1234:0x11e8 ] || continue
    bdf="${d##*/}"
    # Real path: /sys/devices/pci0000:00/[<bridge>/]<bdf>
    parent="$(readlink -f "$d/..")"
    parent="${parent##*/}"
    case "$parent" in
        pci????:??) role=NORESET ;;              # on the root bus: no reset method
        "$RP_RESET") role=RESET ;;               # behind the first pcie-root-port
        "$RP_UIO") role=UIO ;;                   # behind the second pcie-root-port
        "$BR_BUS") EDU_BUS="$EDU_BUS $bdf"; continue ;; # behind a pcie-pci-bridge (extra boots)
        *) setup_error "edu $bdf behind unexpected bridge $parent" ;;
    esac
    eval "cur=\$EDU_$role"
    # shellcheck disable=SC2154 # cur is set by eval
    [ -z "$cur" ] || setup_error "two edu devices for role $role: $cur and $bdf"
    eval "EDU_$role=$bdf"
done
[ -n "$EDU_RESET" ] || setup_error "edu behind root port $RP_RESET not found"
[ -n "$EDU_NORESET" ] || setup_error "edu on the root bus not found"
[ -n "$EDU_UIO" ] || setup_error "edu behind root port $RP_UIO not found"

bind() { # bdf driver
    echo "$2" >"/sys/bus/pci/devices/$1/driver_override" || setup_error "driver_override $1 failed"
    echo "$1" >/sys/bus/pci/drivers_probe || setup_error "drivers_probe $1 ($2) failed"
    drv="$(readlink "/sys/bus/pci/devices/$1/driver")"
    [ "${drv##*/}" = "$2" ] || setup_error "$1 is bound to '${drv##*/}', not $2"
}
bind "$EDU_RESET" vfio-pci
bind "$EDU_NORESET" vfio-pci
bind "$EDU_UIO" uio_pci_generic

group_of() { # bdf -> $GROUP
    GROUP="$(readlink "/sys/bus/pci/devices/$1/iommu_group")" || setup_error "$1 has no IOMMU group"
    GROUP="${GROUP##*/}"
    [ -c "/dev/vfio/$GROUP" ] || setup_error "/dev/vfio/$GROUP missing for $1"
}
group_of "$EDU_RESET"
VFIO_INTX_EDU_RESET_GROUP="$GROUP"
group_of "$EDU_NORESET"
VFIO_INTX_EDU_NORESET_GROUP="$GROUP"
VFIO_INTX_EDU_UIO_DEV=""
for u in "/sys/bus/pci/devices/$EDU_UIO/uio/"uio*; do
    [ -e "$u" ] || setup_error "$EDU_UIO has no uio device"
    VFIO_INTX_EDU_UIO_DEV="/dev/${u##*/}"
    [ -c "$VFIO_INTX_EDU_UIO_DEV" ] || setup_error "$VFIO_INTX_EDU_UIO_DEV missing for $EDU_UIO"
done

export VFIO_INTX_IN_GUEST=1
export VFIO_INTX_EDU_RESET="$EDU_RESET"
export VFIO_INTX_EDU_NORESET="$EDU_NORESET"
export VFIO_INTX_EDU_UIO="$EDU_UIO"
# Edus a boot adds behind a pcie-pci-bridge at $BR_BUS (scripts/tier3.sh does for
# tier3_hot_reset), left unbound: one bus, one IOMMU group.
export VFIO_INTX_EDU_BUS="${EDU_BUS# }"
export VFIO_INTX_EDU_RESET_GROUP VFIO_INTX_EDU_NORESET_GROUP VFIO_INTX_EDU_UIO_DEV

T1="$(cut -d' ' -f1 /proc/uptime)"
log "kernel $(uname -r); setup done at ${T1}s (init started at ${T0}s)"
log "edu reset=$EDU_RESET (group $VFIO_INTX_EDU_RESET_GROUP) noreset=$EDU_NORESET (group $VFIO_INTX_EDU_NORESET_GROUP) uio=$EDU_UIO ($VFIO_INTX_EDU_UIO_DEV)"
log "running: $(printf '%s ' "$@" | tr '\n' ' ' | cut -c 1-160)"

# ---------------------------------------------------------------- the command
cd /root || true
"$@"
rc=$?
# A leading newline so that the verdict starts a line even if the command's last
# output line had no newline.
printf '\nVFIO-INTX-GUEST-VERDICT rc=%d\n' "$rc"
poweroff -f
sleep 5
