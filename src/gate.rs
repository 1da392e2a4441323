//! The config-access gate: user space's counterpart of the kernel's
//! `pci_cfg_access_lock` / `pci_cfg_access_trylock` / `pci_cfg_access_unlock`.
//!
//! The gate owns the device (its backend and the INTx state), so the only way
//! to reach config space is through one of its guards:
//!
//! - [`ConfigGate::access`]: an ordinary access (guest config cycle,
//!   management read). Waits while the device is blocked or another access is
//!   in flight.
//! - [`ConfigGate::block`]: exclusive use across a multi-step operation
//!   (reset, state save/restore). Waits for in-flight accesses; a second
//!   blocker waits for the first instead of interleaving with it — the 2011
//!   bug, where two parallel reset loops crashed the kernel.
//! - [`ConfigGate::try_access`]: for the interrupt path; never sleeps. When
//!   the device is held, the attempt is recorded as *deferred* and the gate's
//!   kick runs as soon as the holder leaves, so the interrupt is handled then
//!   and never lost.
//!
//! Waiters are served in arrival order (a ticket lock), so accesses waiting
//! behind a stream of resets get in between them. Only the interrupt path may
//! go ahead of the queue, as the kernel's trylock does. Guards release on
//! drop, including when the holder panics or returns early.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::PoisonError;

use crate::sync::{AtomicBool, AtomicU64, Condvar, Mutex, MutexGuard, Ordering};

#[cfg(loom)]
use loom::sync::atomic::fence;
#[cfg(not(loom))]
use std::sync::atomic::fence;

/// What the gate calls when a deferred try-access needs handling.
pub type Kick = Box<dyn Fn() + Send + Sync>;

/// A serialized config-access gate around a device `T`.
pub struct ConfigGate<T> {
    /// The device. Holding this mutex is holding the gate; the ticket protocol
    /// below decides who may take it, in which order.
    data: Mutex<T>,
    /// Next ticket to hand out to an access or a blocker.
    next_ticket: AtomicU64,
    /// Ticket whose turn it is.
    now_serving: AtomicU64,
    /// Number of threads asleep on `turn`.
    sleepers: AtomicU64,
    /// Lock paired with `turn`; it protects no data.
    turn_lock: Mutex<()>,
    turn: Condvar,
    /// A blocker holds the device.
    blocked: AtomicBool,
    /// A try-access found the device held since the last release.
    deferred: AtomicBool,
    kick: Kick,
    deferrals: AtomicU64,
    blocks: AtomicU64,
    generation: Generation,
}

/// A gate's generation: moves on every [`ConfigGate::block`] (a reset
/// through the gate) and every [`advance`](Self::advance) by a holder that
/// re-wired or re-derived the device's interrupt. An event produced while
/// the generation read `g` still describes the device as long as the
/// generation reads `g`; after a move it may not.
#[derive(Debug)]
pub struct Generation(AtomicU64);

impl Generation {
    fn new() -> Self {
        Self(AtomicU64::new(0))
    }

    /// The current generation.
    pub fn current(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }

    /// Moves the generation on.
    pub fn advance(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

impl<T> fmt::Debug for ConfigGate<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConfigGate")
            .field("blocked", &self.is_blocked())
            .field("deferrals", &self.deferrals())
            .field("blocks", &self.blocks())
            .finish_non_exhaustive()
    }
}

/// Locks a mutex whose holder may have panicked. Every state the gate keeps
/// is valid between any two steps, so a poisoned lock is still usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<T> ConfigGate<T> {
    /// Creates a gate around `device`. `kick` is called, outside the gate,
    /// whenever a holder leaves after a try-access was deferred; it must not
    /// block (signal an eventfd, unpark a thread).
    pub fn new(device: T, kick: Kick) -> Self {
        Self {
            data: Mutex::new(device),
            next_ticket: AtomicU64::new(0),
            now_serving: AtomicU64::new(0),
            sleepers: AtomicU64::new(0),
            turn_lock: Mutex::new(()),
            turn: Condvar::new(),
            blocked: AtomicBool::new(false),
            deferred: AtomicBool::new(false),
            kick,
            deferrals: AtomicU64::new(0),
            blocks: AtomicU64::new(0),
            generation: Generation::new(),
        }
    }

    /// An ordinary access: waits its turn, then holds the device until the
    /// guard is dropped.
    pub fn access(&self) -> GateGuard<'_, T> {
        self.wait_turn();
        GateGuard {
            data: lock(&self.data),
            release: Release {
                gate: self,
                kind: Kind::Access,
            },
        }
    }

    /// Blocks the device for exclusive use across several steps (reset,
    /// save/restore). Waits for in-flight accesses and for earlier blockers.
    pub fn block(&self) -> GateGuard<'_, T> {
        self.wait_turn();
        let data = lock(&self.data);
        self.blocked.store(true, Ordering::SeqCst);
        self.blocks.fetch_add(1, Ordering::Relaxed);
        self.generation.advance();
        GateGuard {
            data,
            release: Release {
                gate: self,
                kind: Kind::Block,
            },
        }
    }

    /// The interrupt path's access: never sleeps. `None` means the device is
    /// held; the attempt is recorded and the gate's kick runs once the holder
    /// leaves.
    pub fn try_access(&self) -> Option<GateGuard<'_, T>> {
        if let Some(guard) = self.try_take() {
            return Some(guard);
        }
        // A swap rather than a store: the same here, and loom models an RMW
        // racing a releaser's swap exactly, where a plain store can be
        // misplaced inside that swap (tokio-rs/loom#254).
        self.deferred.swap(true, Ordering::SeqCst);
        // Pairs with the fence in `Release::drop`: either the holder sees the
        // flag, or this second attempt sees that the holder has left.
        fence(Ordering::SeqCst);
        let guard = self.try_take();
        if guard.is_none() {
            self.deferrals.fetch_add(1, Ordering::Relaxed);
        }
        guard
    }

    /// A look that never sleeps and is not interrupt work (the watchdog's
    /// tick): `None` means the device is held, and nothing is recorded, so
    /// no kick follows; the caller comes back on its own. A deferral would
    /// make the interrupt path re-check the line for nothing, and on the
    /// kernel bypass that re-check's UNMASK re-signals the irqfd of a line
    /// the guest may be servicing.
    pub fn try_access_untracked(&self) -> Option<GateGuard<'_, T>> {
        self.try_take()
    }

    fn try_take(&self) -> Option<GateGuard<'_, T>> {
        let data = match self.data.try_lock() {
            Ok(data) => data,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        Some(GateGuard {
            data,
            release: Release {
                gate: self,
                kind: Kind::Try,
            },
        })
    }

    /// Whether a blocker (reset) holds the device right now.
    pub fn is_blocked(&self) -> bool {
        self.blocked.load(Ordering::SeqCst)
    }

    /// How many try-accesses were deferred so far.
    pub fn deferrals(&self) -> u64 {
        self.deferrals.load(Ordering::Relaxed)
    }

    /// How many times the device was blocked so far.
    pub fn blocks(&self) -> u64 {
        self.blocks.load(Ordering::Relaxed)
    }

    /// The device's [`Generation`].
    pub fn generation(&self) -> &Generation {
        &self.generation
    }

    /// Takes a ticket and waits until it is served.
    fn wait_turn(&self) {
        let ticket = self.next_ticket.fetch_add(1, Ordering::SeqCst);
        if self.now_serving.load(Ordering::SeqCst) == ticket {
            return;
        }
        let mut waiting = lock(&self.turn_lock);
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        // Pairs with the fence in `Release::drop`: either the releaser sees
        // this sleeper and notifies, or the check below sees its increment
        // of `now_serving`.
        fence(Ordering::SeqCst);
        while self.now_serving.load(Ordering::SeqCst) != ticket {
            waiting = self
                .turn
                .wait(waiting)
                .unwrap_or_else(PoisonError::into_inner);
        }
        self.sleepers.fetch_sub(1, Ordering::SeqCst);
    }

    /// Passes the turn to the next ticket. The caller must issue a SeqCst
    /// fence before [`wake_sleepers`](Self::wake_sleepers).
    fn end_turn(&self) {
        self.now_serving.fetch_add(1, Ordering::SeqCst);
    }

    /// Wakes the threads asleep in [`wait_turn`](Self::wait_turn), if any.
    fn wake_sleepers(&self) {
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            // Taking the lock orders this notify after a sleeper's check of
            // `now_serving`, so it cannot miss the wake-up.
            let _waiting = lock(&self.turn_lock);
            self.turn.notify_all();
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Access,
    Block,
    Try,
}

/// Exclusive use of the device behind a [`ConfigGate`]. Dropping it lets the
/// next waiter in and runs the kick if an interrupt was deferred meanwhile.
pub struct GateGuard<'a, T> {
    // Field order matters: `data` is dropped (the device released) before
    // `release` runs its bookkeeping.
    data: MutexGuard<'a, T>,
    release: Release<'a, T>,
}

impl<T> GateGuard<'_, T> {
    /// Whether this guard blocks the device (taken by [`ConfigGate::block`]).
    pub fn is_block(&self) -> bool {
        self.release.kind == Kind::Block
    }
}

impl<T> Deref for GateGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.data
    }
}

impl<T> DerefMut for GateGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.data
    }
}

struct Release<'a, T> {
    gate: &'a ConfigGate<T>,
    kind: Kind,
}

impl<T> Drop for Release<'_, T> {
    fn drop(&mut self) {
        let gate = self.gate;
        // The device mutex is already unlocked (see `GateGuard`).
        if self.kind == Kind::Block {
            gate.blocked.store(false, Ordering::SeqCst);
        }
        let queued = self.kind != Kind::Try;
        if queued {
            gate.end_turn();
        }
        // One fence for two pairings. With the fence in `wait_turn`: either a
        // waiter's check sees the new `now_serving`, or `wake_sleepers` sees
        // the waiter. With the fence in `try_access`: either the swap below
        // sees the deferral, or the try-access sees the device free.
        fence(Ordering::SeqCst);
        if queued {
            gate.wake_sleepers();
        }
        if gate.deferred.swap(false, Ordering::SeqCst) {
            (gate.kick)();
        }
    }
}
