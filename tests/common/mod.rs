//! Helpers shared by the tier-3 test binaries (each includes this file with
//! `mod common;`): output past libtest's capture, the loud skip outside the
//! QEMU guest, the guest's devices from the variables guest/init.sh
//! exports, the kernel's view of a device's config space through sysfs,
//! binding, edu's BAR0 (registers, and a sysfs mapping for devices without
//! VFIO), eventfd waits, and the 2011 reproducer's sysfs reset loop.
// Each binary uses its own subset.
#![allow(dead_code)]

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use vfio_intx::pci::intx::{read_command_status, CommandStatus};
use vfio_intx::pci::regs::{COMMAND_INTX_DISABLE, PCI_COMMAND, PCI_STATUS, STATUS_INTERRUPT};
use vfio_intx::pci::sysfs::{PciSysfs, SysfsConfig};
use vfio_intx::pci::Bdf;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

// ------------------------------------------------------------------ output

/// Writes a line to stderr past libtest's capture (which only covers the
/// print macros), so that figures and SKIP lines always reach the guest's
/// log.
pub fn say(args: fmt::Arguments<'_>) {
    let _ = writeln!(io::stderr().lock(), "{args}");
}

// ------------------------------------------------------------------ the guest

/// Whether this runs inside the vfio-intx QEMU guest (guest/init.sh sets
/// `VFIO_INTX_IN_GUEST`); outside it, says a loud SKIP for `test`, which
/// needs `needs`.
pub fn in_guest(test: &str, needs: &str) -> bool {
    if std::env::var_os("VFIO_INTX_IN_GUEST").is_some() {
        return true;
    }
    say(format_args!(
        "SKIP (not inside the vfio-intx QEMU guest): {test} needs {needs}; run scripts/tier3.sh"
    ));
    false
}

/// A variable guest/init.sh exports; unset inside the guest is a failure.
pub fn guest_var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set in the guest"))
}

/// The device a guest variable names.
pub fn guest_bdf(name: &str) -> Bdf {
    guest_var(name)
        .parse()
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The device named by `var` inside the guest; outside it, a loud SKIP.
pub fn guest_device(var: &str, test: &str, needs: &str) -> Option<Bdf> {
    in_guest(test, needs).then(|| guest_bdf(var))
}

// ------------------------------------------------------------------ sysfs

/// Reads `N` bytes of the device's physical config space through sysfs
/// (the kernel's view, not VFIO's virtualized one).
pub fn sysfs_config<const N: usize>(bdf: Bdf, offset: u16) -> [u8; N] {
    let path = format!("/sys/bus/pci/devices/{bdf}/config");
    let mut f = fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    f.seek(SeekFrom::Start(offset.into())).unwrap();
    let mut b = [0u8; N];
    f.read_exact(&mut b).unwrap();
    b
}

/// A 16-bit register of the physical config space, through sysfs.
pub fn sysfs_u16(bdf: Bdf, offset: u16) -> u16 {
    u16::from_le_bytes(sysfs_config::<2>(bdf, offset))
}

/// The physical COMMAND register.
pub fn phys_command(bdf: Bdf) -> u16 {
    sysfs_u16(bdf, PCI_COMMAND)
}

/// Physical COMMAND.INTX_DISABLE (the kernel's view, not VFIO's).
pub fn phys_masked(bdf: Bdf) -> bool {
    phys_command(bdf) & COMMAND_INTX_DISABLE != 0
}

/// Whether the device drives its INTx line (physical STATUS.INTERRUPT).
pub fn phys_asserting(bdf: Bdf) -> bool {
    sysfs_u16(bdf, PCI_STATUS) & STATUS_INTERRUPT != 0
}

/// Physical COMMAND and STATUS through the library's sysfs config access
/// (the kernel's view: vfio-pci's config region virtualizes INTX_DISABLE).
pub fn physical(bdf: Bdf) -> CommandStatus {
    let mut config = SysfsConfig::open_read_only(&PciSysfs::default(), bdf).unwrap();
    read_command_status(&mut config).unwrap()
}

/// The driver `bdf` is bound to, from sysfs.
pub fn driver_of(bdf: &str) -> Option<String> {
    fs::read_link(format!("/sys/bus/pci/devices/{bdf}/driver"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
}

/// Binds `bdf` to `driver` with driver_override and drivers_probe.
pub fn bind(bdf: Bdf, driver: &str) {
    fs::write(
        format!("/sys/bus/pci/devices/{bdf}/driver_override"),
        driver,
    )
    .unwrap();
    fs::write("/sys/bus/pci/drivers_probe", bdf.to_string()).unwrap();
    let bound = fs::read_link(format!("/sys/bus/pci/devices/{bdf}/driver")).unwrap();
    assert!(
        bound.ends_with(driver),
        "{bdf} bound to {bound:?}, not {driver}"
    );
}

/// What one [`sysfs_reset_loop`] did.
#[derive(Debug)]
pub struct ResetLoop {
    /// Resets written.
    pub resets: u64,
    /// Writes the kernel refused.
    pub errors: u64,
    /// The first refusal.
    pub first_error: Option<String>,
    /// When the loop stopped.
    pub ended: Instant,
}

/// One loop of the 2011 reproducer, `while :; do echo 1 >
/// /sys/bus/pci/devices/$BDF/reset; done`, until `stop`: each reset is an
/// open, write, close; a refused write is counted and followed by 1 ms of
/// sleep. `on_reset` runs after each reset (a live count).
pub fn sysfs_reset_loop(bdf: Bdf, stop: &AtomicBool, on_reset: impl Fn()) -> ResetLoop {
    let path = format!("/sys/bus/pci/devices/{bdf}/reset");
    let (mut resets, mut errors, mut first_error) = (0u64, 0u64, None);
    while !stop.load(Ordering::SeqCst) {
        match fs::write(&path, "1") {
            Ok(()) => {
                resets += 1;
                on_reset();
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| e.to_string());
                thread::sleep(Duration::from_millis(1));
            }
        }
    }
    ResetLoop {
        resets,
        errors,
        first_error,
        ended: Instant::now(),
    }
}

// ------------------------------------------------------------------ eventfds

/// Whether `fd` becomes readable within `timeout` (without reading it).
pub fn readable_within(fd: &EventFd, timeout: Duration) -> bool {
    let epoll = Epoll::new().unwrap();
    epoll
        .ctl(
            ControlOperation::Add,
            fd.as_raw_fd(),
            EpollEvent::new(EventSet::IN, 0),
        )
        .unwrap();
    let mut events = [EpollEvent::default(); 1];
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    loop {
        match epoll.wait(ms, &mut events) {
            Ok(n) => return n > 0,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => panic!("epoll_wait: {e}"),
        }
    }
}

// ------------------------------------------------------------------ the edu

/// edu: identification register (reads [`EDU_ID_VALUE`]).
pub const EDU_ID: u64 = vfio_intx::vfio::edu::Edu::ID;
/// What edu's identification register reads.
pub const EDU_ID_VALUE: u32 = 0x0100_00ed;
/// edu: pending interrupt bits (read).
pub const EDU_STATUS: u64 = vfio_intx::vfio::edu::Edu::STATUS;
/// edu: raise the written bits (write).
pub const EDU_RAISE: u64 = vfio_intx::vfio::edu::Edu::RAISE;
/// edu: acknowledge the written bits (write).
pub const EDU_ACK: u64 = vfio_intx::vfio::edu::Edu::ACK;

/// BAR0 of an edu, mapped through its sysfs `resource0` file (sysfs memory
/// BARs support mmap only, no read/write). edu decodes 4-byte accesses.
pub struct Bar0 {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is device memory accessed only with volatile 4-byte
// reads and writes, which are safe from any thread; nothing in Rust aliases
// it.
unsafe impl Send for Bar0 {}
// SAFETY: as above; every access is a single volatile load or store.
unsafe impl Sync for Bar0 {}

impl Bar0 {
    /// Maps the first page of `bdf`'s BAR0.
    pub fn map(bdf: Bdf) -> Self {
        let path = format!("/sys/bus/pci/devices/{bdf}/resource0");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("opening {path}: {e}"));
        let len = 4096;
        // SAFETY: a new shared mapping of the first page of the BAR; the
        // kernel checks the range against the BAR, and the returned address
        // is checked below. The file may be closed once mapped.
        let addr = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(
            addr,
            libc::MAP_FAILED,
            "mmap {path}: {}",
            io::Error::last_os_error()
        );
        Self {
            base: NonNull::new(addr.cast()).expect("mmap returned NULL"),
            len,
        }
    }

    fn reg(&self, offset: u64) -> *mut u32 {
        let offset = usize::try_from(offset).unwrap_or(usize::MAX);
        assert!(
            offset % 4 == 0 && offset.saturating_add(4) <= self.len,
            "bad edu offset {offset:#x}"
        );
        // SAFETY: in bounds of the mapping (checked above), 4-aligned.
        unsafe { self.base.as_ptr().add(offset).cast() }
    }

    /// A volatile 4-byte read at `offset`.
    pub fn read(&self, offset: u64) -> u32 {
        // SAFETY: `reg` returns an aligned pointer into the live mapping.
        unsafe { ptr::read_volatile(self.reg(offset)) }
    }

    /// A volatile 4-byte write at `offset`.
    pub fn write(&self, offset: u64, value: u32) {
        // SAFETY: `reg` returns an aligned pointer into the live mapping.
        unsafe { ptr::write_volatile(self.reg(offset), value) }
    }
}

impl Drop for Bar0 {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`, which nothing
        // uses any more.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}
