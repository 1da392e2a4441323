#!/usr/bin/env bash
# Prepare everything the QEMU guest harness (guest/run.sh) needs. Idempotent.
#
#  1. Installs the Debian packages qemu-system-x86, busybox-static, cpio and kmod
#     (for modinfo) when they are missing.
#  2. Downloads (never installs) the kernel package that linux-image-amd64 depends on,
#     unpacks it with dpkg -x, extracts the uncompressed ELF vmlinux from vmlinuz and
#     collects the kernel modules the guest loads, plus their dependencies.
#
# Cache: ${VFIO_INTX_GUEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vfio-intx-guest}
#   debs/<kernel>.deb       the downloaded package (kept: a rebuild never downloads again)
#   <pkg>_<version>/        vmlinux, modules/*.ko, modules.load (insmod order), READY
#   current                 symlink to the kernel directory run.sh uses
#
# A second run with a complete cache does nothing but check (no download, no unpack).
# Options:
#   --force   re-extract vmlinux and modules (reuses the cached .deb)
set -euo pipefail

PROG=guest/prepare.sh
die() { echo "$PROG: error: $*" >&2; exit 1; }
info() { echo "$PROG: $*" >&2; }

FORCE=0
while [ $# -gt 0 ]; do
    case "$1" in
        --force) FORCE=1 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) die "unknown option: $1 (try --help)" ;;
    esac
    shift
done

CACHE="${VFIO_INTX_GUEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vfio-intx-guest}"

# Modules loaded in the guest, in this order (dependencies found with modinfo are
# inserted before the module that needs them). kvm-amd: QEMU's TCG emulates AMD SVM,
# not Intel VMX. ccp is a dependency of kvm-amd in Debian's kernel.
WANTED_MODULES=(irqbypass kvm ccp kvm-amd vfio vfio_iommu_type1 vfio_virqfd
                vfio-pci-core vfio-pci uio uio_pci_generic)
# Modules that may legitimately be built into the kernel or absent in a given kernel.
OPTIONAL_MODULES=" vfio_virqfd ccp "

APT_UPDATED=0
apt_update_once() {
    [ "$APT_UPDATED" = 0 ] || return 0
    [ "$(id -u)" = 0 ] || die "apt-get update needs root"
    info "running apt-get update"
    apt-get update -q >&2 || die "apt-get update failed"
    APT_UPDATED=1
}

# ---------------------------------------------------------------- 1. host packages
pkg_installed() {
    # No `grep -q` behind a pipe: with pipefail, its early exit makes the
    # writer die of SIGPIPE and the whole test fail at random.
    [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" == *"install ok installed"* ]]
}

missing=()
for p in qemu-system-x86 busybox-static cpio kmod; do
    pkg_installed "$p" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || die "missing Debian packages: ${missing[*]} (installing them needs root)"
    info "installing ${missing[*]}"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2; then
        apt_update_once
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 \
            || die "apt-get install ${missing[*]} failed"
    fi
fi
for t in qemu-system-x86_64 cpio modinfo xz dpkg-deb python3; do
    command -v "$t" >/dev/null || die "required tool '$t' not found in PATH"
done
[ -x /bin/busybox ] || die "/bin/busybox missing although busybox-static is installed"
if ! grep -qx insmod <<<"$(/bin/busybox --list)"; then
    die "/bin/busybox has no insmod applet (is it busybox-static?)"
fi

# ---------------------------------------------------------------- 2. kernel
# Which kernel package? The one the candidate linux-image-amd64 depends on.
resolve_kernel() {
    apt-cache show --no-all-versions linux-image-amd64 2>/dev/null \
        | sed -n 's/^Depends: .*\(linux-image-[0-9][^ ,]*-amd64\) (= \([^)]*\)).*/\1 \2/p' | head -n 1
}

kpkg_ver="$(resolve_kernel || true)"
if [ -z "$kpkg_ver" ] && [ -e "$CACHE/current/READY" ] && [ "$FORCE" = 0 ]; then
    # No apt lists, but a complete cache: use it rather than needing the network.
    info "apt cannot resolve linux-image-amd64 (no package lists?); using the cached kernel"
    info "ready: $(readlink -f "$CACHE/current")"
    exit 0
fi
if [ -z "$kpkg_ver" ]; then
    apt_update_once
    kpkg_ver="$(resolve_kernel || true)"
    [ -n "$kpkg_ver" ] || die "cannot find which linux-image-*-amd64 package linux-image-amd64 depends on"
fi
KPKG="${kpkg_ver% *}"
KVER="${kpkg_ver#* }"
KDIR="$CACHE/${KPKG}_${KVER}"

if [ -e "$KDIR/READY" ] && [ "$FORCE" = 0 ]; then
    ln -sfn "$(basename "$KDIR")" "$CACHE/current"
    info "already prepared: $KDIR"
    exit 0
fi

mkdir -p "$CACHE/debs"
DEB="$CACHE/debs/${KPKG}_${KVER}_amd64.deb"
if [ ! -s "$DEB" ]; then
    info "downloading $KPKG=$KVER (about 70 MB)"
    dltmp="$(mktemp -d "$CACHE/debs/.download.XXXXXX")"
    # apt-get download writes into the current directory. As root it warns that the
    # download is unsandboxed (the _apt user cannot write here); that is harmless.
    if ! (cd "$dltmp" && apt-get download -q "$KPKG=$KVER" >&2); then
        rm -rf "$dltmp"
        die "apt-get download $KPKG=$KVER failed"
    fi
    got=("$dltmp"/*.deb)
    [ -s "${got[0]}" ] || { rm -rf "$dltmp"; die "apt-get download produced no .deb"; }
    mv "${got[0]}" "$DEB"
    rm -rf "$dltmp"
else
    info "using cached $DEB"
fi

info "unpacking $DEB"
rm -rf "$KDIR"
mkdir -p "$KDIR"
UNPACK="$KDIR/.unpack"
dpkg-deb -x "$DEB" "$UNPACK" || die "dpkg-deb -x $DEB failed"

vmlinuz=("$UNPACK"/boot/vmlinuz-*)
[ -f "${vmlinuz[0]}" ] || die "no /boot/vmlinuz-* in $DEB"
KREL="${vmlinuz[0]##*/vmlinuz-}"
MODDIR="$UNPACK/lib/modules/$KREL"
[ -d "$MODDIR" ] || die "no /lib/modules/$KREL in $DEB"

# vmlinuz is a bzImage whose payload is an xz stream. Booting the ELF vmlinux directly
# (PVH entry) skips the in-guest decompression, which is slow under TCG.
info "extracting vmlinux from ${vmlinuz[0]##*/}"
python3 - "${vmlinuz[0]}" "$KDIR/vmlinux" <<'EOF' || die "could not extract vmlinux"
import lzma, sys
src, dst = sys.argv[1], sys.argv[2]
data = open(src, "rb").read()
magic = b"\xfd7zXZ\x00"
pos = data.find(magic)
while pos >= 0:
    d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    try:
        out = d.decompress(data[pos:])  # stops at the end of the first stream
    except lzma.LZMAError:
        out = b""
    if out[:4] == b"\x7fELF":
        open(dst, "wb").write(out)
        print(f"vmlinux: xz stream at offset {pos}, {len(out)} bytes", file=sys.stderr)
        sys.exit(0)
    pos = data.find(magic, pos + 1)
sys.exit("no xz stream decompressing to an ELF image found (kernel not xz-compressed?)")
EOF

# Find a module file by name; '-' and '_' are interchangeable in module names.
find_module() {
    local n="$1" a b
    a="${n//-/_}"
    b="${n//_/-}"
    find "$MODDIR/kernel" \( -name "$a.ko" -o -name "$a.ko.xz" -o -name "$a.ko.zst" -o -name "$a.ko.gz" \
        -o -name "$b.ko" -o -name "$b.ko.xz" -o -name "$b.ko.zst" -o -name "$b.ko.gz" \) -print -quit
}

is_builtin() {
    local a="${1//-/_}"
    [ -f "$MODDIR/modules.builtin" ] || return 1
    grep -q "/$a\.ko$" <<<"$(sed 's/-/_/g' "$MODDIR/modules.builtin")"
}

mkdir -p "$KDIR/modules"
ORDER=()
declare -A SEEN=()

# Copy one module (decompressing it: busybox insmod may not handle compressed
# modules), after its dependencies.
add_module() {
    local n="$1" key f base out deps d
    key="${n//-/_}"
    [ -z "${SEEN[$key]:-}" ] || return 0
    SEEN[$key]=1
    f="$(find_module "$n")"
    if [ -z "$f" ]; then
        if is_builtin "$n"; then
            info "module $n is built into $KREL: nothing to load"
            return 0
        fi
        case "$OPTIONAL_MODULES" in
            *" $n "*) info "module $n does not exist in $KREL: skipped"; return 0 ;;
        esac
        die "module $n not found in $KREL"
    fi
    base="${f##*/}"
    case "$base" in
        *.ko.xz)  out="${base%.xz}";  xz -dc "$f" >"$KDIR/modules/$out" || die "xz -d $f failed" ;;
        *.ko.zst) out="${base%.zst}"; command -v zstd >/dev/null || die "$f is zstd-compressed: install zstd"
                  zstd -qdc "$f" >"$KDIR/modules/$out" || die "zstd -d $f failed" ;;
        *.ko.gz)  out="${base%.gz}";  gzip -dc "$f" >"$KDIR/modules/$out" || die "gzip -d $f failed" ;;
        *)        out="$base";        cp "$f" "$KDIR/modules/$out" ;;
    esac
    [ "$out" = "$base" ] || info "decompressed $base"
    deps="$(modinfo -F depends "$KDIR/modules/$out")" || die "modinfo $out failed"
    for d in ${deps//,/ }; do
        add_module "$d"
    done
    ORDER+=("$out")
}

for m in "${WANTED_MODULES[@]}"; do
    add_module "$m"
done
printf '%s\n' "${ORDER[@]}" >"$KDIR/modules.load"
echo "$KREL" >"$KDIR/kernel.release"
echo "$KPKG $KVER" >"$KDIR/package"
rm -rf "$UNPACK"
touch "$KDIR/READY"
ln -sfn "$(basename "$KDIR")" "$CACHE/current"

info "kernel $KREL ($KPKG $KVER) ready in $KDIR"
info "module load order: ${ORDER[*]}"
