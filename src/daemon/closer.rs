//! Closing descriptors a peer handed over, off the runtime's thread.
//!
//! `close(2)` of a descriptor that came from an untrusted peer can block:
//! the last close of a TCP socket with `SO_LINGER` and unsent data waits
//! for the linger time, a FUSE file's flush waits for its server. The
//! daemon never does that on its runtime: every descriptor a client sent
//! that the daemon does not keep goes to a small pool of closer threads,
//! which a hostile peer may hold up without holding up anything else (past
//! the pool's size, closes queue; nothing blocks the runtime).

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use tracing::warn;

/// Closer threads at most: a close held up (a lingering socket: as long as
/// its peer set, up to hours) holds up one of them, not the others' work.
const MAX_CLOSERS: usize = 8;

struct Pool {
    state: Mutex<PoolState>,
    work: Condvar,
}

struct PoolState {
    queue: VecDeque<Vec<OwnedFd>>,
    threads: usize,
    idle: usize,
}

static POOL: Pool = Pool {
    state: Mutex::new(PoolState {
        queue: VecDeque::new(),
        threads: 0,
        idle: 0,
    }),
    work: Condvar::new(),
};

impl Pool {
    fn lock(&self) -> MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn run(&self) {
        let mut s = self.lock();
        loop {
            if let Some(fds) = s.queue.pop_front() {
                drop(s);
                drop(fds);
                s = self.lock();
                continue;
            }
            s.idle += 1;
            s = self.work.wait(s).unwrap_or_else(PoisonError::into_inner);
            s.idle -= 1;
        }
    }
}

/// Closes `fds` (received from a peer) without blocking the caller: on a
/// closer thread (one more is started, up to [`MAX_CLOSERS`], when none is
/// idle).
pub(crate) fn close(fds: Vec<OwnedFd>) {
    if fds.is_empty() {
        return;
    }
    let mut s = POOL.lock();
    s.queue.push_back(fds);
    if s.idle == 0 && s.threads < MAX_CLOSERS {
        let spawned = std::thread::Builder::new()
            .name("vfio-intx-closer".into())
            .stack_size(256 * 1024)
            .spawn(|| POOL.run());
        match spawned {
            Ok(_) => s.threads += 1,
            Err(e) if s.threads == 0 => {
                warn!(error = %e, "starting a descriptor closer thread failed");
            }
            Err(_) => {}
        }
    }
    drop(s);
    POOL.work.notify_one();
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
