//! Per-device counters of the INTx engine.

use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters, updated without locks.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) host_interrupts: AtomicU64,
    pub(crate) claimed: AtomicU64,
    pub(crate) not_mine: AtomicU64,
    pub(crate) injected: AtomicU64,
    pub(crate) reinjected: AtomicU64,
    pub(crate) eois: AtomicU64,
    pub(crate) spurious_eois: AtomicU64,
    pub(crate) held: AtomicU64,
    pub(crate) resets: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) mid_reset_events: AtomicU64,
    pub(crate) stuck_detections: AtomicU64,
    pub(crate) resyncs: AtomicU64,
    pub(crate) stuck_nanos: AtomicU64,
}

impl Counters {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A snapshot of one device's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IntxStats {
    /// Host interrupt events handled (including deferred ones re-run).
    pub host_interrupts: u64,
    /// Host interrupts taken on the kernel's claim (its check-and-mask ran
    /// just before it signalled, and nothing has moved the gate's
    /// generation since) without re-reading STATUS.
    pub claimed: u64,
    /// Host interrupts for which the device was not asserting ("not mine").
    pub not_mine: u64,
    /// Interrupts injected into the guest, re-injections included.
    pub injected: u64,
    /// Re-injections at EOI because the device still asserted.
    pub reinjected: u64,
    /// Guest EOIs handled.
    pub eois: u64,
    /// EOIs that arrived while no interrupt was in service.
    pub spurious_eois: u64,
    /// Interrupts held because the guest had set its own INTX_DISABLE.
    pub held: u64,
    /// Interrupt-path attempts deferred because the gate was held.
    pub deferred: u64,
    /// Resets performed through the engine.
    pub resets: u64,
    /// Operations that failed.
    pub errors: u64,
    /// Retries after transient failures.
    pub retries: u64,
    /// Interrupt-path events that found the device not decoding (in a reset
    /// the engine did not start), re-checked after the reset.
    pub mid_reset_events: u64,
    /// Times the watchdog found the line stuck.
    pub stuck_detections: u64,
    /// Re-syncs of the kernel's mask state with the hardware.
    pub resyncs: u64,
    /// Time lines spent stuck before the watchdog recovered them.
    pub stuck_time: std::time::Duration,
}

impl Counters {
    pub(crate) fn snapshot(&self, deferred: u64) -> IntxStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        IntxStats {
            host_interrupts: get(&self.host_interrupts),
            claimed: get(&self.claimed),
            not_mine: get(&self.not_mine),
            injected: get(&self.injected),
            reinjected: get(&self.reinjected),
            eois: get(&self.eois),
            spurious_eois: get(&self.spurious_eois),
            held: get(&self.held),
            deferred,
            resets: get(&self.resets),
            errors: get(&self.errors),
            retries: get(&self.retries),
            mid_reset_events: get(&self.mid_reset_events),
            stuck_detections: get(&self.stuck_detections),
            resyncs: get(&self.resyncs),
            stuck_time: std::time::Duration::from_nanos(get(&self.stuck_nanos)),
        }
    }
}
