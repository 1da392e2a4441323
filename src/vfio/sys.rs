//! The VFIO system calls the backend makes itself: the only `unsafe` code of
//! the VFIO backend.
//!
//! vfio-ioctls opens the container, the group and the device; everything
//! whose result the engine depends on (device, region and IRQ info,
//! `VFIO_DEVICE_SET_IRQS`, resets, config-region I/O) is done here so that
//! every errno reaches the caller. The variable-length arguments are built
//! and parsed by safe code in [`super::layout`]; this module only hands
//! buffers to the kernel.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::raw::c_ulong;

use vfio_bindings::bindings::vfio::{
    vfio_device_info, vfio_irq_info, vfio_region_info, VFIO_BASE, VFIO_TYPE,
};
use vfio_ioctls::VfioDevice;
use vmm_sys_util::ioctl::{ioctl, ioctl_with_mut_ptr, ioctl_with_mut_ref, ioctl_with_ptr};

/// `_IO(VFIO_TYPE, VFIO_BASE + nr)`: every VFIO ioctl is `_IO`, without a
/// size or direction in its number (the size travels in `argsz`).
const fn vfio_io(nr: u32) -> c_ulong {
    ((VFIO_TYPE as c_ulong) << 8) | (VFIO_BASE + nr) as c_ulong
}

pub(super) const VFIO_DEVICE_GET_INFO: c_ulong = vfio_io(7);
pub(super) const VFIO_DEVICE_GET_REGION_INFO: c_ulong = vfio_io(8);
pub(super) const VFIO_DEVICE_GET_IRQ_INFO: c_ulong = vfio_io(9);
pub(super) const VFIO_DEVICE_SET_IRQS: c_ulong = vfio_io(10);
pub(super) const VFIO_DEVICE_RESET: c_ulong = vfio_io(11);
pub(super) const VFIO_DEVICE_GET_PCI_HOT_RESET_INFO: c_ulong = vfio_io(12);
pub(super) const VFIO_DEVICE_PCI_HOT_RESET: c_ulong = vfio_io(13);

/// `argsz` of a fixed-size VFIO argument.
fn argsz<T>() -> u32 {
    // Every VFIO argument struct is a few dozen bytes.
    size_of::<T>() as u32
}

/// Turns an ioctl's return value into a `Result`, keeping the errno.
fn check(ret: i32) -> io::Result<i32> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// The device fd that vfio-ioctls opened, borrowed for as long as `device`.
pub(super) fn device_fd(device: &VfioDevice) -> BorrowedFd<'_> {
    // SAFETY: `VfioDevice` owns its device file and closes it only in its
    // `Drop`, which cannot run while `device` is borrowed; the returned fd
    // borrows `device`, so it is open for its whole lifetime.
    unsafe { BorrowedFd::borrow_raw(device.as_raw_fd()) }
}

/// `VFIO_DEVICE_GET_INFO`.
pub(super) fn device_info(fd: BorrowedFd<'_>) -> io::Result<vfio_device_info> {
    let mut info = vfio_device_info {
        argsz: argsz::<vfio_device_info>(),
        ..Default::default()
    };
    // SAFETY: `fd` is an open VFIO device fd; `info` is a properly sized and
    // aligned `vfio_device_info` whose `argsz` tells the kernel how much it
    // may write, and it outlives the call.
    check(unsafe { ioctl_with_mut_ref(&fd, VFIO_DEVICE_GET_INFO, &mut info) })?;
    Ok(info)
}

/// `VFIO_DEVICE_GET_REGION_INFO` without capabilities (the kernel fills the
/// fixed part and reports a larger `argsz` when capabilities exist).
pub(super) fn region_info(fd: BorrowedFd<'_>, index: u32) -> io::Result<vfio_region_info> {
    let mut info = vfio_region_info {
        argsz: argsz::<vfio_region_info>(),
        index,
        ..Default::default()
    };
    // SAFETY: as in `device_info`: a valid fd and a `vfio_region_info` whose
    // `argsz` is its own size, so the kernel writes within it.
    check(unsafe { ioctl_with_mut_ref(&fd, VFIO_DEVICE_GET_REGION_INFO, &mut info) })?;
    Ok(info)
}

/// `VFIO_DEVICE_GET_IRQ_INFO`.
pub(super) fn irq_info(fd: BorrowedFd<'_>, index: u32) -> io::Result<vfio_irq_info> {
    let mut info = vfio_irq_info {
        argsz: argsz::<vfio_irq_info>(),
        index,
        ..Default::default()
    };
    // SAFETY: as in `device_info`: a valid fd and a `vfio_irq_info` whose
    // `argsz` is its own size.
    check(unsafe { ioctl_with_mut_ref(&fd, VFIO_DEVICE_GET_IRQ_INFO, &mut info) })?;
    Ok(info)
}

/// `VFIO_DEVICE_SET_IRQS` with a `struct vfio_irq_set` laid out in `words`
/// (see [`super::layout::IrqSet`]).
pub(super) fn set_irqs(fd: BorrowedFd<'_>, words: &[u32]) -> io::Result<()> {
    check_argsz(words)?;
    // SAFETY: `words` is a 4-byte aligned buffer holding a `vfio_irq_set`
    // header followed by its data, and its first word (`argsz`) is at most
    // the buffer's length (checked above), so the kernel reads only inside
    // it. The kernel does not write to it, and it outlives the call.
    check(unsafe { ioctl_with_ptr(&fd, VFIO_DEVICE_SET_IRQS, words.as_ptr()) })?;
    Ok(())
}

/// `VFIO_DEVICE_RESET`.
pub(super) fn reset(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: `fd` is an open VFIO device fd and the ioctl takes no argument.
    check(unsafe { ioctl(&fd, VFIO_DEVICE_RESET) })?;
    Ok(())
}

/// `VFIO_DEVICE_GET_PCI_HOT_RESET_INFO` into a `vfio_pci_hot_reset_info`
/// laid out in `words` (see [`super::layout::HotResetInfo`]). ENOSPC means
/// the buffer is too small; the kernel has then written the device count.
pub(super) fn hot_reset_info(fd: BorrowedFd<'_>, words: &mut [u32]) -> io::Result<()> {
    check_argsz(words)?;
    // SAFETY: `words` is a 4-byte aligned, writable buffer whose first word
    // (`argsz`) is at most its length (checked above): the kernel writes the
    // header and at most `argsz` bytes in all. It outlives the call.
    check(unsafe {
        ioctl_with_mut_ptr(&fd, VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, words.as_mut_ptr())
    })?;
    Ok(())
}

/// `VFIO_DEVICE_PCI_HOT_RESET` with a `vfio_pci_hot_reset` laid out in
/// `words` (see [`super::layout::hot_reset`]).
pub(super) fn hot_reset(fd: BorrowedFd<'_>, words: &[u32]) -> io::Result<()> {
    check_argsz(words)?;
    // SAFETY: as in `set_irqs`: an aligned buffer the kernel only reads,
    // whose `argsz` does not exceed it. The group fds in it are borrowed by
    // the caller for the duration of the call.
    check(unsafe { ioctl_with_ptr(&fd, VFIO_DEVICE_PCI_HOT_RESET, words.as_ptr()) })?;
    Ok(())
}

/// Refuses a buffer whose `argsz` (first word) is larger than the buffer.
fn check_argsz(words: &[u32]) -> io::Result<()> {
    match words.first() {
        Some(&argsz) if argsz as usize <= std::mem::size_of_val(words) => Ok(()),
        _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
    }
}

/// `pread(2)`: returns the number of bytes read.
pub(super) fn pread(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let offset =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the whole
    // call, and `fd` is open.
    let n = unsafe { libc::pread(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), offset) };
    // A negative return is the only one that does not fit usize.
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// `pwrite(2)`: returns the number of bytes written.
pub(super) fn pwrite(fd: BorrowedFd<'_>, buf: &[u8], offset: u64) -> io::Result<usize> {
    let offset =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    // SAFETY: `buf` is valid for reads of `buf.len()` bytes for the whole
    // call, and `fd` is open.
    let n = unsafe { libc::pwrite(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), offset) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Duplicates a file descriptor of this process found by number (close on
/// exec). The caller must check what the duplicate refers to: the number may
/// have been closed and reused by another thread before the call.
pub(super) fn dup_cloexec(raw: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC only reads the descriptor table: any integer is
    // a valid argument (an unused one yields EBADF), and no memory is passed.
    let new = unsafe { libc::fcntl(raw, libc::F_DUPFD_CLOEXEC, 0) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `new` is a descriptor the kernel just created for us and that
    // nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_linux_uapi() {
        // _IO(';', 100 + n) from include/uapi/linux/vfio.h.
        assert_eq!(VFIO_DEVICE_GET_INFO, 0x3b6b);
        assert_eq!(VFIO_DEVICE_GET_REGION_INFO, 0x3b6c);
        assert_eq!(VFIO_DEVICE_GET_IRQ_INFO, 0x3b6d);
        assert_eq!(VFIO_DEVICE_SET_IRQS, 0x3b6e);
        assert_eq!(VFIO_DEVICE_RESET, 0x3b6f);
        assert_eq!(VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, 0x3b70);
        assert_eq!(VFIO_DEVICE_PCI_HOT_RESET, 0x3b71);
    }

    #[test]
    fn a_buffer_shorter_than_its_argsz_is_refused_before_the_kernel_sees_it() {
        assert!(check_argsz(&[8, 0]).is_ok());
        let err = check_argsz(&[12, 0]).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
        assert!(check_argsz(&[]).is_err());
    }

    #[test]
    fn pread_and_pwrite_report_short_transfers_and_errnos() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/vfio-intx-sys").unwrap();
        let path = dir.as_path().join("f");
        std::fs::write(&path, [1u8, 2, 3]).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let fd = std::os::fd::AsFd::as_fd(&file);
        let mut buf = [0u8; 4];
        assert_eq!(pread(fd, &mut buf, 1).unwrap(), 2);
        assert_eq!(buf[..2], [2, 3]);
        assert_eq!(pwrite(fd, &[9], 0).unwrap(), 1);
        let ro = std::fs::File::open(&path).unwrap();
        let err = pwrite(std::os::fd::AsFd::as_fd(&ro), &[9], 0).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
    }

    #[test]
    fn dup_of_an_unused_number_is_ebadf() {
        let err = dup_cloexec(-1).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
    }
}
