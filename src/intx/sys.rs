//! The unsafe edge of the async adapter and the daemon: registering an
//! eventfd with tokio's reactor.

use std::io;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use vmm_sys_util::eventfd::EventFd;

/// Registers `fd` with the current tokio reactor for readability; the
/// `AsyncFd` owns it. Must be called inside a tokio runtime.
pub(crate) fn async_eventfd(fd: EventFd) -> io::Result<AsyncFd<EventFd>> {
    // SAFETY: the `AsyncFd` owns the `EventFd` from here on: its descriptor
    // stays open, and `EventFd::as_raw_fd` keeps returning it, until the
    // `AsyncFd` is dropped (after deregistering) or unwrapped.
    unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(|e| e.into_parts().1)
}
