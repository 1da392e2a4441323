//! Closing descriptors a peer handed over, off the runtime's thread.
//!
//! `close(2)` of a descriptor that came from an untrusted peer can block:
//! the last close of a TCP socket with `SO_LINGER` and unsent data waits
//! for the linger time, a FUSE file's flush waits for its server. The
//! daemon never does that on its runtime: every descriptor a client sent
//! that the daemon does not keep goes to one closer thread, which may be
//! held up by a hostile peer without holding up anything else.

use std::os::fd::OwnedFd;
use std::sync::mpsc::{self, Sender};
use std::sync::{Mutex, OnceLock};

use tracing::warn;

fn closer() -> Option<Sender<Vec<OwnedFd>>> {
    static CLOSER: OnceLock<Option<Mutex<Sender<Vec<OwnedFd>>>>> = OnceLock::new();
    CLOSER
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel::<Vec<OwnedFd>>();
            let spawned = std::thread::Builder::new()
                .name("vfio-intx-closer".into())
                .spawn(move || {
                    for fds in rx {
                        drop(fds);
                    }
                });
            match spawned {
                Ok(_) => Some(Mutex::new(tx)),
                Err(e) => {
                    warn!(error = %e, "starting the descriptor closer thread failed; peers' descriptors are closed on blocking-pool threads");
                    None
                }
            }
        })
        .as_ref()
        .map(|tx| tx.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone())
}

/// Closes `fds` (received from a peer) without blocking the caller.
pub(crate) fn close(fds: Vec<OwnedFd>) {
    if fds.is_empty() {
        return;
    }
    let fds = match closer() {
        Some(tx) => match tx.send(fds) {
            Ok(()) => return,
            Err(mpsc::SendError(fds)) => fds,
        },
        None => fds,
    };
    // No closer thread: the blocking pool (bounded) rather than the caller.
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => {
            rt.spawn_blocking(move || drop(fds));
        }
        // Not on the runtime: this thread may block.
        Err(_) => drop(fds),
    }
}

/// Descriptors received from a peer and not (yet) taken: closed off-thread
/// when dropped.
#[derive(Default)]
pub(crate) struct Foreign(pub(crate) Vec<OwnedFd>);

impl Foreign {
    /// Takes the next descriptor, in the order they arrived.
    pub(crate) fn next(&mut self) -> Option<OwnedFd> {
        if self.0.is_empty() {
            None
        } else {
            Some(self.0.remove(0))
        }
    }
}

impl Drop for Foreign {
    fn drop(&mut self) {
        close(std::mem::take(&mut self.0));
    }
}
