//! The unsafe edge of the async adapter: registering an eventfd with
//! tokio's reactor.

use std::io;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use vmm_sys_util::eventfd::EventFd;

/// A duplicate of `fd`, registered with the current tokio reactor for
/// readability. Must be called inside a tokio runtime.
pub(crate) fn async_eventfd(fd: &EventFd) -> io::Result<AsyncFd<EventFd>> {
    let owned = fd.try_clone()?;
    // SAFETY: `owned` is a fresh duplicate owned by the `AsyncFd` from here
    // on: its descriptor stays open, and `EventFd::as_raw_fd` keeps
    // returning it, until the `AsyncFd` is dropped or unwrapped.
    unsafe { AsyncFd::register_with_interest(owned, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}
