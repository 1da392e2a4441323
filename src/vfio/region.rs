//! What the kernel reports about a device's IRQs and regions
//! ([`IrqInfo`], [`RegionInfo`], hot-reset info) and error-reporting
//! region I/O ([`RegionAccess`]).

use std::fmt;
use std::io;
use std::os::fd::BorrowedFd;

use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_INFO_AUTOMASKED, VFIO_IRQ_INFO_EVENTFD, VFIO_IRQ_INFO_MASKABLE,
    VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};

use crate::pci::Bdf;

use super::layout::HotResetInfo;
use super::{sys, DeviceFile, VfioError};

/// What `VFIO_DEVICE_GET_IRQ_INFO` reports for one IRQ index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IrqInfo {
    /// `VFIO_IRQ_INFO_*` flags.
    pub flags: u32,
    /// Number of vectors; 0 means the device has none of this kind.
    pub count: u32,
}

impl IrqInfo {
    /// Whether the device has at least one vector of this kind.
    pub fn usable(&self) -> bool {
        self.count > 0
    }
    /// Whether an eventfd can be attached (`VFIO_IRQ_INFO_EVENTFD`).
    pub fn eventfd(&self) -> bool {
        self.flags & VFIO_IRQ_INFO_EVENTFD != 0
    }
    /// Whether it can be masked (`VFIO_IRQ_INFO_MASKABLE`).
    pub fn maskable(&self) -> bool {
        self.flags & VFIO_IRQ_INFO_MASKABLE != 0
    }
    /// Whether the kernel masks it when it fires (`VFIO_IRQ_INFO_AUTOMASKED`).
    pub fn automasked(&self) -> bool {
        self.flags & VFIO_IRQ_INFO_AUTOMASKED != 0
    }
}

/// What `VFIO_DEVICE_GET_REGION_INFO` reports for one region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionInfo {
    /// The region index (`VFIO_PCI_BAR0_REGION_INDEX` ...).
    pub index: u32,
    /// `VFIO_REGION_INFO_FLAG_*`.
    pub flags: u32,
    /// Size in bytes.
    pub size: u64,
    /// Offset of the region in the device fd.
    pub offset: u64,
}

impl RegionInfo {
    /// Whether the region can be read.
    pub fn readable(&self) -> bool {
        self.flags & VFIO_REGION_INFO_FLAG_READ != 0
    }
    /// Whether the region can be written.
    pub fn writable(&self) -> bool {
        self.flags & VFIO_REGION_INFO_FLAG_WRITE != 0
    }
    /// Whether the region can be mmapped.
    pub fn mappable(&self) -> bool {
        self.flags & VFIO_REGION_INFO_FLAG_MMAP != 0
    }
}

/// Reads and writes one region of a VFIO device with `pread`/`pwrite`,
/// reporting errors and short transfers. Cheap to clone; shares the device.
#[derive(Clone)]
pub struct RegionAccess {
    pub(super) bdf: Bdf,
    pub(super) info: RegionInfo,
    pub(super) device: DeviceFile,
}

impl fmt::Debug for RegionAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegionAccess")
            .field("bdf", &self.bdf)
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl RegionAccess {
    /// The region's index, flags, size and offset.
    pub fn info(&self) -> RegionInfo {
        self.info
    }

    fn check(&self, offset: u64, len: usize) -> Result<u64, VfioError> {
        let end = offset.checked_add(len as u64);
        match end {
            Some(end) if end <= self.info.size => Ok(self.info.offset + offset),
            _ => Err(VfioError::RegionOutOfRange {
                bdf: self.bdf,
                index: self.info.index,
                offset,
                len,
                size: self.info.size,
            }),
        }
    }

    fn io_error(&self, op: &'static str, offset: u64, len: usize, source: io::Error) -> VfioError {
        VfioError::RegionIo {
            bdf: self.bdf,
            op,
            index: self.info.index,
            offset,
            len,
            source,
        }
    }

    /// Reads `buf.len()` bytes at `offset` in the region.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), VfioError> {
        let at = self.check(offset, buf.len())?;
        match sys::pread(self.device.fd(), buf, at) {
            Ok(n) if n == buf.len() => Ok(()),
            Ok(n) => Err(self.io_error("read", offset, buf.len(), short(n, buf.len()))),
            Err(e) => Err(self.io_error("read", offset, buf.len(), e)),
        }
    }

    /// Writes `buf` at `offset` in the region.
    pub fn write(&self, offset: u64, buf: &[u8]) -> Result<(), VfioError> {
        let at = self.check(offset, buf.len())?;
        match sys::pwrite(self.device.fd(), buf, at) {
            Ok(n) if n == buf.len() => Ok(()),
            Ok(n) => Err(self.io_error("write", offset, buf.len(), short(n, buf.len()))),
            Err(e) => Err(self.io_error("write", offset, buf.len(), e)),
        }
    }

    /// Reads a little-endian 32-bit register.
    pub fn read_u32(&self, offset: u64) -> Result<u32, VfioError> {
        let mut b = [0u8; 4];
        self.read(offset, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Writes a little-endian 32-bit register.
    pub fn write_u32(&self, offset: u64, value: u32) -> Result<(), VfioError> {
        self.write(offset, &value.to_le_bytes())
    }
}

/// The error for a transfer that moved `done` of `wanted` bytes.
pub(super) fn short(done: usize, wanted: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("short transfer: {done} of {wanted} bytes"),
    )
}

/// `VFIO_DEVICE_GET_PCI_HOT_RESET_INFO`: the devices a slot or bus reset
/// of the device would affect (ENODEV: it has neither).
pub(super) fn hot_reset_info(fd: BorrowedFd<'_>) -> io::Result<HotResetInfo> {
    let mut info = HotResetInfo::with_capacity(1);
    // The device count can change between two calls (hotplug): a few
    // rounds, each sized by the previous ENOSPC answer.
    let mut rounds = 0;
    loop {
        match sys::hot_reset_info(fd, info.words_mut()) {
            Ok(()) => return Ok(info),
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && rounds < 4 => {
                rounds += 1;
                info = HotResetInfo::with_capacity(info.count());
            }
            Err(e) => return Err(e),
        }
    }
}

pub(super) fn region(fd: BorrowedFd<'_>, index: u32) -> io::Result<RegionInfo> {
    let r = sys::region_info(fd, index)?;
    Ok(RegionInfo {
        index,
        flags: r.flags,
        size: r.size,
        offset: r.offset,
    })
}
