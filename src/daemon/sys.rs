//! The daemon's only `unsafe`: receiving descriptors with `recvmsg(2)`
//! (`SCM_RIGHTS`) and taking ownership of them, and reading a VMM's
//! eventfd without ever blocking (`preadv2(RWF_NOWAIT)`).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};

use vmm_sys_util::eventfd::EventFd;

/// The most descriptors one `SCM_RIGHTS` message carries (the kernel's
/// `SCM_MAX_FD`); a stream socket's `recvmsg` returns one message's worth.
const SCM_MAX_FD: usize = 253;

/// Control-message buffer, 8-byte aligned as `cmsghdr` requires: room for
/// [`SCM_MAX_FD`] descriptors after the (16-byte) header, so that a client
/// sending too many gets them all closed instead of truncated, and a
/// truncation (`MSG_CTRUNC`) can only mean the kernel could not install
/// them: the daemon is out of descriptors.
const CMSG_WORDS: usize = (16 + SCM_MAX_FD * std::mem::size_of::<RawFd>()).div_ceil(8);

/// What one `recvmsg` returned.
pub(crate) struct Received {
    /// Bytes read into the buffer (0 = end of stream).
    pub(crate) bytes: usize,
    /// Whether the kernel dropped descriptors: with a control buffer sized
    /// for the most one message carries, because the process is out of
    /// descriptors (`EMFILE`, `ENFILE`).
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

/// Reads (and so resets) an eventfd's counter without ever blocking,
/// whatever blocking mode the descriptor's owner chose: `O_NONBLOCK` lives
/// on the open file description the VMM shares with the daemon (and the VMM
/// may change it at any time), so the daemon asks for non-blocking I/O per
/// call with `preadv2(RWF_NOWAIT)` (eventfds support it since Linux 5.8,
/// "eventfd: convert to f_op->read_iter()").
/// `WouldBlock` when the counter is zero. On a kernel without it, a
/// descriptor in blocking mode is refused (`Unsupported`) rather than read.
pub(crate) fn read_eventfd_nowait(fd: &impl AsRawFd) -> io::Result<u64> {
    let mut value = 0u64;
    let iov = libc::iovec {
        iov_base: std::ptr::from_mut(&mut value).cast(),
        iov_len: std::mem::size_of::<u64>(),
    };
    // SAFETY: `iov` points at `value`, 8 writable bytes that outlive the
    // call; offset -1 means the current position (an eventfd has none).
    let n = unsafe { libc::preadv2(fd.as_raw_fd(), &iov, 1, -1, libc::RWF_NOWAIT) };
    if n == 8 {
        return Ok(value);
    }
    if n >= 0 {
        return Err(io::Error::other("a short read from an eventfd"));
    }
    let e = io::Error::last_os_error();
    if !matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL)) {
        return Err(e);
    }
    let flags = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)
        .map_err(io::Error::from)?;
    if flags & libc::O_NONBLOCK == 0 {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "the eventfd is in blocking mode and this kernel has no per-call non-blocking \
             read (RWF_NOWAIT); create it with EFD_NONBLOCK",
        ));
    }
    let mut buf = [0u8; 8];
    nix::unistd::read(fd.as_raw_fd(), &mut buf).map_err(io::Error::from)?;
    Ok(u64::from_ne_bytes(buf))
}

/// Takes ownership of a descriptor the service manager passed at exec
/// (`LISTEN_FDS`: descriptors 3 .. 3+n), made close-on-exec.
pub(crate) fn own_passed_fd(raw: RawFd) -> io::Result<OwnedFd> {
    // Checked before ownership is taken: a descriptor that is not open is
    // not ours to own (a service manager that lied about LISTEN_FDS).
    nix::fcntl::fcntl(
        raw,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(io::Error::from)?;
    // SAFETY: `raw` is open (F_SETFD succeeded), and it was passed to this
    // process at exec for it to own (LISTEN_PID named this process); it is
    // taken once, from the parsed LISTEN_FDS range, by the only caller.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// A new anonymous memory file (`memfd_create(2)`, close-on-exec), named
/// `name` in /proc links (`/memfd:<name>`).
pub(crate) fn memfd(name: &str) -> io::Result<std::fs::File> {
    let name = std::ffi::CString::new(name).map_err(io::Error::other)?;
    // SAFETY: `name` is a valid NUL-terminated string that outlives the
    // call; memfd_create takes no other pointer.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: memfd_create returned a new descriptor nobody else owns.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

/// A close-on-exec duplicate of `fd` (for types that only expose a raw
/// descriptor, such as an [`EventFd`]).
pub(crate) fn dup(fd: &impl AsRawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC takes no pointer; it returns a new descriptor
    // (or -1) for an open one, or fails (EBADF) for one that is not.
    let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `new` was just returned by fcntl: open, and owned by nobody.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}
