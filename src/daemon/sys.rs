//! The daemon's only `unsafe`: receiving descriptors with `recvmsg(2)`
//! (`SCM_RIGHTS`) and taking ownership of them.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};

use vmm_sys_util::eventfd::EventFd;

/// Control-message buffer, 8-byte aligned as `cmsghdr` requires: room for
/// far more descriptors than any request carries, so that a client sending
/// too many gets them all closed instead of truncated.
const CMSG_WORDS: usize = 64;

/// What one `recvmsg` returned.
pub(crate) struct Received {
    /// Bytes read into the buffer (0 = end of stream).
    pub(crate) bytes: usize,
    /// Whether the kernel dropped descriptors that did not fit.
    pub(crate) truncated: bool,
}

/// Reads bytes and any `SCM_RIGHTS` descriptors from a stream socket
/// (non-blocking: `WouldBlock` when nothing is there). Every received
/// descriptor is close-on-exec and owned by `fds`, also when the control
/// buffer was truncated — which is why this is not nix's `recvmsg`, whose
/// `cmsgs()` refuses a truncated buffer and would leave the descriptors
/// that did arrive open in the daemon.
pub(crate) fn recv_with_fds(
    socket: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<Received> {
    let mut cmsg = [0u64; CMSG_WORDS];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty header (null name, no
    // iovecs, no control buffer); the fields set below point at live
    // buffers of the stated lengths.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cmsg);
    // SAFETY: `msg` points at `iov` (into `buf`) and `cmsg`, which outlive
    // the call; the kernel writes at most the lengths given.
    let n = unsafe {
        libc::recvmsg(
            socket.as_raw_fd(),
            &mut msg,
            libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `msg` was filled by a successful recvmsg, so its control
    // pointer and length describe the part of `cmsg` the kernel wrote; the
    // CMSG_* macros stay within `msg_controllen`.
    let mut header = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !header.is_null() {
        // SAFETY: `header` is non-null and was returned by CMSG_FIRSTHDR or
        // CMSG_NXTHDR for this message, so it points at a complete cmsghdr.
        let (level, kind, len) = unsafe {
            (
                (*header).cmsg_level,
                (*header).cmsg_type,
                (*header).cmsg_len,
            )
        };
        if level == libc::SOL_SOCKET && kind == libc::SCM_RIGHTS {
            // SAFETY: as above; CMSG_LEN(0) is the header's own size.
            let data_len = len.saturating_sub(unsafe { libc::CMSG_LEN(0) } as usize);
            let count = data_len / std::mem::size_of::<RawFd>();
            // SAFETY: CMSG_DATA points just past the header, where the
            // kernel wrote `count` descriptors; read unaligned to be safe.
            let data = unsafe { libc::CMSG_DATA(header) }.cast::<RawFd>();
            for i in 0..count {
                // SAFETY: `i < count`, within the data the kernel wrote.
                let raw = unsafe { data.add(i).read_unaligned() };
                // SAFETY: SCM_RIGHTS installed `raw` as a new descriptor of
                // this process that nothing else owns.
                fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
            }
        }
        // SAFETY: `header` is a valid header of `msg` (see above).
        header = unsafe { libc::CMSG_NXTHDR(&msg, header) };
    }
    Ok(Received {
        // Non-negative here.
        bytes: n as usize,
        truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
    })
}

/// Turns a descriptor already checked to be an eventfd into an [`EventFd`].
pub(crate) fn into_eventfd(fd: OwnedFd) -> EventFd {
    // SAFETY: the caller checked (by its /proc link) that `fd` is an
    // eventfd; ownership moves from the OwnedFd to the EventFd.
    unsafe { EventFd::from_raw_fd(fd.into_raw_fd()) }
}
