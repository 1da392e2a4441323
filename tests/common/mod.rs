//! Helpers shared by the tier-3 test binaries (each includes this file with
//! `mod common;`).

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::{self, NonNull};

use vfio_intx::pci::Bdf;

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

    fn reg(&self, offset: usize) -> *mut u32 {
        assert!(
            offset % 4 == 0 && offset + 4 <= self.len,
            "bad edu offset {offset:#x}"
        );
        // SAFETY: in bounds of the mapping (checked above), 4-aligned.
        unsafe { self.base.as_ptr().add(offset).cast() }
    }

    /// A volatile 4-byte read at `offset`.
    pub fn read(&self, offset: usize) -> u32 {
        // SAFETY: `reg` returns an aligned pointer into the live mapping.
        unsafe { ptr::read_volatile(self.reg(offset)) }
    }

    /// A volatile 4-byte write at `offset`.
    pub fn write(&self, offset: usize, value: u32) {
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
