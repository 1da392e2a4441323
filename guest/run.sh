#!/usr/bin/env bash
# Boot the vfio-intx test guest in QEMU (TCG) and run a command inside it.
#
# usage: guest/run.sh [options] -- CMD [ARGS...]
#
#   --bin PATH           copy a host file into the guest as /bin/<basename> (repeatable;
#                        ELF files must be statically linked)
#   --timeout SECONDS    whole-run timeout, boot included (default 300)
#   --append "ARGS"      extra kernel command line arguments
#   --vfio-pci-args "A"  module parameters for `insmod vfio-pci.ko`, e.g. "nointxmask=1"
#   --log PATH           where to keep the guest's serial log
#                        (default target/guest/run-<date>-<pid>.log; target/guest/last.log
#                        links to the latest)
#   --mem MB             guest memory (default 256)
#   --qemu-arg ARG       extra QEMU argument (repeatable)
#   -h, --help           this text
#
# Inside the guest, /init loads irqbypass, kvm, ccp, kvm-amd, the vfio stack, uio and
# uio_pci_generic, binds the three edu devices, exports VFIO_INTX_IN_GUEST=1,
# VFIO_INTX_EDU_RESET, VFIO_INTX_EDU_NORESET, VFIO_INTX_EDU_UIO (PCI addresses) and
# VFIO_INTX_EDU_RESET_GROUP, VFIO_INTX_EDU_NORESET_GROUP, VFIO_INTX_EDU_UIO_DEV, runs
# CMD and prints `VFIO-INTX-GUEST-VERDICT rc=<rc>`. The serial output is streamed to
# stdout while the guest runs.
#
# Exit status: CMD's exit status from the verdict line; 124 on timeout; 125 when the
# guest ended without a verdict (setup error, crash, panic) or QEMU failed; 2 on a
# usage error. Run guest/prepare.sh once first.
set -euo pipefail

PROG=guest/run.sh
die() { echo "$PROG: error: $*" >&2; exit 125; }
usage_error() { echo "$PROG: $*" >&2; echo "try: $PROG --help" >&2; exit 2; }
info() { echo "$PROG: $*" >&2; }

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
CACHE="${VFIO_INTX_GUEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vfio-intx-guest}"

BINS=()
TIMEOUT=300
APPEND=""
VFIO_PCI_ARGS=""
LOG=""
MEM=256
QEMU_EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        --bin) [ $# -ge 2 ] || usage_error "--bin needs a path"; BINS+=("$2"); shift 2 ;;
        --timeout) [ $# -ge 2 ] || usage_error "--timeout needs seconds"; TIMEOUT="$2"; shift 2 ;;
        --append) [ $# -ge 2 ] || usage_error "--append needs an argument"; APPEND="$2"; shift 2 ;;
        --vfio-pci-args) [ $# -ge 2 ] || usage_error "--vfio-pci-args needs an argument"; VFIO_PCI_ARGS="$2"; shift 2 ;;
        --log) [ $# -ge 2 ] || usage_error "--log needs a path"; LOG="$2"; shift 2 ;;
        --mem) [ $# -ge 2 ] || usage_error "--mem needs a size in MB"; MEM="$2"; shift 2 ;;
        --qemu-arg) [ $# -ge 2 ] || usage_error "--qemu-arg needs an argument"; QEMU_EXTRA+=("$2"); shift 2 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        --) shift; break ;;
        -*) usage_error "unknown option: $1" ;;
        *) break ;;
    esac
done
[ $# -gt 0 ] || usage_error "no command given (usage: $PROG [options] -- CMD [ARGS...])"
[[ "$TIMEOUT" =~ ^[1-9][0-9]*$ ]] || usage_error "--timeout must be a positive integer, got '$TIMEOUT'"
[[ "$MEM" =~ ^[1-9][0-9]*$ ]] || usage_error "--mem must be a positive integer, got '$MEM'"
case "$VFIO_PCI_ARGS" in *[\'\"\\\$\`]*) usage_error "--vfio-pci-args must not contain quotes, \\, \$ or \`" ;; esac

KDIR="$CACHE/current"
[ -e "$KDIR/READY" ] || die "no prepared kernel in $CACHE: run guest/prepare.sh first"
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not found: run guest/prepare.sh first"
[ -x /bin/busybox ] || die "/bin/busybox not found: run guest/prepare.sh first"
for t in cpio python3; do
    command -v "$t" >/dev/null || die "'$t' not found: run guest/prepare.sh first"
done

if [ -z "$LOG" ]; then
    mkdir -p "$REPO/target/guest"
    LOG="$REPO/target/guest/run-$(date +%Y%m%d-%H%M%S)-$$.log"
    ln -sfn "$(basename "$LOG")" "$REPO/target/guest/last.log"
else
    mkdir -p "$(dirname "$LOG")"
fi
LOG="$(cd "$(dirname "$LOG")" && pwd)/$(basename "$LOG")"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/vfio-intx-guest.XXXXXX")"
QPID=""
TAILPID=""
# shellcheck disable=SC2317 # called through the EXIT trap
cleanup() {
    if [ -n "$QPID" ] && kill -0 "$QPID" 2>/dev/null; then
        kill -KILL "$QPID" 2>/dev/null || true
    fi
    if [ -n "$TAILPID" ] && kill -0 "$TAILPID" 2>/dev/null; then
        kill "$TAILPID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'info "interrupted"; exit 130' INT TERM HUP

# ---------------------------------------------------------------- initramfs
ROOT="$WORK/root"
mkdir -p "$ROOT"/{bin,dev,proc,sys,tmp,root,etc,lib/modules}
cp /bin/busybox "$ROOT/bin/busybox"
for a in $(/bin/busybox --list); do
    [ "$a" = busybox ] || ln -s busybox "$ROOT/bin/$a"
done
cp "$KDIR"/modules/*.ko "$ROOT/lib/modules/"
cp "$KDIR/modules.load" "$ROOT/etc/modules.load"
install -m 0755 "$HERE/init.sh" "$ROOT/init"
# The kernel opens /dev/console for /init before /init mounts devtmpfs. Creating the
# node needs root; without it /init redirects its stdio itself after mounting /dev.
mknod -m 600 "$ROOT/dev/console" c 5 1 2>/dev/null || true

is_dynamic_elf() { # exit 0 if the file is an ELF with a program interpreter
    python3 - "$1" <<'EOF'
import struct, sys
with open(sys.argv[1], "rb") as f:
    h = f.read(64)
    if h[:4] != b"\x7fELF" or h[4] != 2:   # not ELF64: let it through
        sys.exit(1)
    phoff, = struct.unpack_from("<Q", h, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", h, 0x36)
    for i in range(phnum):
        f.seek(phoff + i * phentsize)
        if struct.unpack("<I", f.read(4))[0] == 3:  # PT_INTERP
            sys.exit(0)
sys.exit(1)
EOF
}

declare -A BIN_SEEN=()
for b in "${BINS[@]}"; do
    [ -f "$b" ] || die "--bin $b: no such file"
    name="$(basename "$b")"
    case "$name" in busybox|sh|init) die "--bin $b: the name '$name' is reserved in the guest" ;; esac
    [ -z "${BIN_SEEN[$name]:-}" ] || die "--bin $b: another --bin is also called $name"
    BIN_SEEN[$name]=1
    if is_dynamic_elf "$b"; then
        die "--bin $b is dynamically linked; the guest has no libc (build with guest/build-static.sh)"
    fi
    [ ! -L "$ROOT/bin/$name" ] || info "note: --bin $name replaces the busybox applet of that name"
    rm -f "$ROOT/bin/$name"
    cp "$b" "$ROOT/bin/$name"
    chmod 0755 "$ROOT/bin/$name"
done

sq() { # quote for a POSIX shell
    printf "'%s'" "${1//\'/\'\\\'\'}"
}
# PCI addresses of the two pcie-root-ports below (bus 0, slots 0x10 and 0x12).
RP_RESET=0000:00:10.0
RP_UIO=0000:00:12.0
# Where extra edus sharing one bus may sit (a pcie-pci-bridge at 00:14.0, added with
# --qemu-arg; see scripts/tier3.sh).
BR_BUS=0000:00:14.0
{
    echo "VFIO_PCI_ARGS=$(sq "$VFIO_PCI_ARGS")"
    echo "RP_RESET=$RP_RESET"
    echo "RP_UIO=$RP_UIO"
    echo "BR_BUS=$BR_BUS"
    printf 'set --'
    for a in "$@"; do printf ' %s' "$(sq "$a")"; done
    echo
} >"$ROOT/etc/vfio-intx-guest.conf"

INITRD="$WORK/initramfs.cpio"
(cd "$ROOT" && find . -print0 | cpio --null -o -H newc --quiet) >"$INITRD" \
    || die "building the initramfs failed"

# ---------------------------------------------------------------- QEMU
QMP="$WORK/qmp.sock"
KCMD="console=ttyS0 intel_iommu=on quiet panic=-1${APPEND:+ $APPEND}"
# shellcheck disable=SC2054 # the commas are QEMU option syntax
QEMU=(qemu-system-x86_64 -nodefaults -no-user-config
    -M q35 -accel tcg -cpu qemu64,+svm,+npt -smp 1 -m "$MEM"
    # The IOMMU is listed ahead of the PCI devices. Interrupt remapping: without it
    # VFIO_SET_IOMMU fails with EPERM.
    -device intel-iommu,intremap=on
    # edu behind a root port: has a reset method (secondary bus reset).
    -device pcie-root-port,id=rp1,bus=pcie.0,addr=0x10,chassis=1
    -device edu,bus=rp1,addr=0x0
    # edu on the root bus: no reset method.
    -device edu,bus=pcie.0,addr=0x11
    # edu for uio_pci_generic, behind its own root port (so it can be reset too).
    -device pcie-root-port,id=rp2,bus=pcie.0,addr=0x12,chassis=2
    -device edu,bus=rp2,addr=0x0
    -kernel "$KDIR/vmlinux" -initrd "$INITRD" -append "$KCMD"
    -display none -serial "file:$LOG" -qmp "unix:$QMP,server=on,wait=off"
    -no-reboot
    "${QEMU_EXTRA[@]}")

: >"$LOG"
info "booting guest (timeout ${TIMEOUT}s, log $LOG)"
T_START="$(date +%s.%N)"
"${QEMU[@]}" </dev/null &
QPID=$!
# Stream the serial log live; tail exits by itself shortly after QEMU does.
tail -n +1 -s 0.2 -f --pid="$QPID" "$LOG" &
TAILPID=$!

DEADLINE=$((SECONDS + TIMEOUT))
TIMED_OUT=0
while kill -0 "$QPID" 2>/dev/null; do
    if [ "$SECONDS" -ge "$DEADLINE" ]; then
        TIMED_OUT=1
        break
    fi
    sleep 0.2
done
T_END="$(date +%s.%N)"
ELAPSED="$(awk -v a="$T_START" -v b="$T_END" 'BEGIN { printf "%.1f", b - a }')"

show_tail() { # header lines
    echo "$PROG: ---- last $2 lines of the serial log ----" >&2
    tail -n "$2" "$1" | tr -d '\r' >&2
    echo "$PROG: ---- end of serial log excerpt ----" >&2
}

if [ "$TIMED_OUT" = 1 ]; then
    info "TIMEOUT: no result after ${TIMEOUT}s; dumping the guest state before killing QEMU"
    cp "$LOG" "$WORK/serial-at-timeout.log"
    DUMP="$WORK/monitor-dump.txt"
    python3 - "$QMP" >"$DUMP" <<'EOF' || info "warning: the QEMU monitor dump failed (see above)"
import json, socket, sys, time
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(10)
sock.connect(sys.argv[1])
f = sock.makefile("rwb")
def recv():
    while True:
        line = f.readline()
        if not line:
            raise SystemExit("QMP connection closed")
        msg = json.loads(line)
        if "event" not in msg:
            return msg
def cmd(obj):
    f.write((json.dumps(obj) + "\n").encode())
    f.flush()
    return recv()
recv()  # greeting
cmd({"execute": "qmp_capabilities"})
for hmp in ("info status", "info registers", "info pic", "info lapic", "info irq"):
    r = cmd({"execute": "human-monitor-command", "arguments": {"command-line": hmp}})
    print(f"---- (qemu) {hmp}")
    print(r.get("return", r).rstrip() if isinstance(r.get("return"), str) else json.dumps(r))
EOF
    kill -TERM "$QPID" 2>/dev/null || true
    for _ in $(seq 1 25); do kill -0 "$QPID" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$QPID" 2>/dev/null || true
    wait "$QPID" 2>/dev/null || true
    wait "$TAILPID" 2>/dev/null || true
    {
        echo
        echo "==== $PROG: timeout after ${TIMEOUT}s: QEMU monitor dump ===="
        cat "$DUMP"
    } >>"$LOG"
    show_tail "$WORK/serial-at-timeout.log" 50
    echo "$PROG: ---- QEMU monitor dump ----" >&2
    cat "$DUMP" >&2
    info "FAILED: guest timed out after ${TIMEOUT}s (no verdict). Full log: $LOG"
    exit 124
fi

QRC=0
wait "$QPID" || QRC=$?
wait "$TAILPID" 2>/dev/null || true

VERDICT="$(tr -d '\r' <"$LOG" | grep -a -E '^VFIO-INTX-GUEST-VERDICT rc=[0-9]+$' | tail -n 1 || true)"
if [ -n "$VERDICT" ]; then
    RC="${VERDICT##*rc=}"
    if [ "$QRC" != 0 ]; then
        info "warning: qemu-system-x86_64 exited with status $QRC after the verdict"
    fi
    if [ "$RC" = 0 ]; then
        info "guest command succeeded (rc=0) in ${ELAPSED}s (QEMU start to power-off)"
    else
        info "FAILED: guest command exited with rc=$RC after ${ELAPSED}s. Full log: $LOG"
    fi
    exit "$RC"
fi

SETUP_ERR="$(tr -d '\r' <"$LOG" | grep -a -m 1 '^VFIO-INTX-GUEST-SETUP-ERROR' || true)"
if [ -n "$SETUP_ERR" ]; then
    info "FAILED: guest setup failed: ${SETUP_ERR#VFIO-INTX-GUEST-SETUP-ERROR }"
elif grep -a -q 'Kernel panic' "$LOG"; then
    show_tail "$LOG" 50
    info "FAILED: the guest kernel panicked (no verdict)"
elif [ "$QRC" != 0 ]; then
    info "FAILED: qemu-system-x86_64 exited with status $QRC (no verdict)"
else
    show_tail "$LOG" 50
    info "FAILED: the guest stopped without a verdict line"
fi
info "Full log: $LOG"
exit 125
