#!/usr/bin/env bash
# Smoke check of the QEMU guest harness: boots the guest once and checks inside it that
# /dev/kvm exists (kvm-amd loaded), both vfio edus have /dev/vfio/<group>, /dev/uio0
# exists, the edu behind the root port has a reset method and the root-bus edu has none.
# Extra arguments go to guest/run.sh (e.g. --timeout 120, --log PATH).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
"$HERE/prepare.sh"

# shellcheck disable=SC2016 # expanded by the guest's shell, not here
CHECK='
fail=0
ok() { echo "smoke: ok   $*"; }
bad() { echo "smoke: FAIL $*"; fail=1; }
dev="/sys/bus/pci/devices"

if [ -c /dev/kvm ]; then ok "/dev/kvm exists"; else bad "/dev/kvm missing"; fi
if grep -q "^kvm_amd " /proc/modules; then ok "kvm_amd loaded"; else bad "kvm_amd not loaded"; fi
dmesg | grep -E "Nested (Virtualization|Paging) enabled" | sed "s/^/smoke: dmesg: /"

for v in VFIO_INTX_IN_GUEST VFIO_INTX_EDU_RESET VFIO_INTX_EDU_NORESET VFIO_INTX_EDU_UIO; do
    eval "val=\${$v:-}"
    if [ -n "$val" ]; then ok "$v=$val"; else bad "$v not set"; fi
done

for bdf in "$VFIO_INTX_EDU_RESET" "$VFIO_INTX_EDU_NORESET"; do
    drv="$(basename "$(readlink "$dev/$bdf/driver")")"
    g="$(basename "$(readlink "$dev/$bdf/iommu_group")")"
    if [ "$drv" = vfio-pci ]; then ok "$bdf bound to vfio-pci"; else bad "$bdf bound to \"$drv\""; fi
    if [ -c "/dev/vfio/$g" ]; then ok "$bdf: /dev/vfio/$g exists"; else bad "$bdf: /dev/vfio/$g missing"; fi
done

drv="$(basename "$(readlink "$dev/$VFIO_INTX_EDU_UIO/driver")")"
if [ "$drv" = uio_pci_generic ]; then ok "$VFIO_INTX_EDU_UIO bound to uio_pci_generic"; else bad "$VFIO_INTX_EDU_UIO bound to \"$drv\""; fi
if [ -c /dev/uio0 ]; then ok "/dev/uio0 exists (VFIO_INTX_EDU_UIO_DEV=$VFIO_INTX_EDU_UIO_DEV)"; else bad "/dev/uio0 missing"; fi

rm_reset="$(cat "$dev/$VFIO_INTX_EDU_RESET/reset_method" 2>/dev/null || true)"
if [ -n "$rm_reset" ]; then ok "reset edu $VFIO_INTX_EDU_RESET reset_method: $rm_reset"
else bad "reset edu $VFIO_INTX_EDU_RESET has no reset_method"; fi
rm_noreset="$(cat "$dev/$VFIO_INTX_EDU_NORESET/reset_method" 2>/dev/null || true)"
if [ -z "$rm_noreset" ]; then ok "root-bus edu $VFIO_INTX_EDU_NORESET has no reset method"
else bad "root-bus edu $VFIO_INTX_EDU_NORESET has reset_method: $rm_noreset"; fi
rm_uio="$(cat "$dev/$VFIO_INTX_EDU_UIO/reset_method" 2>/dev/null || true)"
echo "smoke: info uio edu $VFIO_INTX_EDU_UIO reset_method: ${rm_uio:-(none)}"

for bdf in "$VFIO_INTX_EDU_RESET" "$VFIO_INTX_EDU_NORESET" "$VFIO_INTX_EDU_UIO"; do
    echo "smoke: info $bdf -> $(readlink -f "$dev/$bdf"), irq $(cat "$dev/$bdf/irq")"
done
echo "smoke: info guest uptime at the end of the check: $(cut -d" " -f1 /proc/uptime)s"
if [ "$fail" = 0 ]; then echo "smoke: all checks passed"; else echo "smoke: some checks FAILED"; fi
exit "$fail"
'

exec "$HERE/run.sh" --timeout 120 "$@" -- sh -c "$CHECK"
