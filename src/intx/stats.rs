//! Per-device counters of the INTx engine.

use std::sync::atomic::{AtomicU64, Ordering};

/// The engine's event counters: ONE list, one line each — the field, its
/// name on the daemon's wire (JSON), its Prometheus metric, its help text.
/// [`Counters`], [`IntxStats`], the daemon's serde form (`EngineCounters`)
/// and its Prometheus rows are all generated from this list, so they cannot
/// drift: adding a counter is one line here (then bump it in the engine
/// with `Counters::bump(&ctx.counters.<field>)`). Not in the list, because
/// they are not event counts the engine bumps: `deferred` (the gate counts
/// it) and the stuck time (a duration).
///
/// `with_intx_counters!(m)` calls `m! { field, wire, "prometheus", "help"; ... }`.
macro_rules! with_intx_counters {
    ($then:ident) => {
        $then! {
            host_interrupts, interrupts, "interrupts_total",
                "Host interrupt events handled (including deferred ones re-run).";
            claimed, claimed, "claimed_total",
                "Host interrupts taken on the kernel's claim (its check-and-mask ran just before it signalled, and nothing moved the gate's generation since) without re-reading STATUS.";
            not_mine, not_mine, "not_mine_total",
                "Host interrupts for which the device was not asserting (\"not mine\" on a shared line).";
            injected, injected, "injected_total",
                "Interrupts injected into the guest, re-injections included.";
            reinjected, reinjected, "reinjected_total",
                "Re-injections at EOI because the device still asserted.";
            eois, eois, "eois_total", "Guest EOIs handled.";
            serviced_eois, serviced_eois, "serviced_eois_total",
                "EOIs that found the line in service (the watchdog's progress: KVM signals every resample eventfd on a GSI at each EOI of it).";
            spurious_eois, spurious_eois, "spurious_eois_total",
                "EOIs that arrived while no interrupt was in service.";
            held, held_by_guest, "held_by_guest_total",
                "Interrupts held because the guest had set its own INTX_DISABLE.";
            resets, resets, "resets_total", "Resets performed through the engine (its gate).";
            errors, errors, "errors_total", "Operations that failed.";
            retries, retries, "retries_total", "Retries after transient failures.";
            mid_reset_events, mid_reset_events, "mid_reset_events_total",
                "Interrupt-path events that found the device not decoding (in a reset the engine did not start), re-checked after the reset.";
            stuck_detections, stuck_detections, "stuck_total",
                "Times the watchdog found the line stuck masked.";
            resyncs, resyncs, "resyncs_total",
                "Re-syncs of the kernel's mask state with the hardware.";
            guest_flr_failures, guest_flr_failures, "guest_flr_failures_total",
                "Guest-initiated function-level resets that failed (the guest believes they happened).";
            watchdog_rechecks, watchdog_rechecks, "watchdog_rechecks_total",
                "Watchdog looks at an asserting line that found the masks as the state machine expects (no re-sync).";
        }
    };
}
#[cfg(feature = "daemon")]
pub(crate) use with_intx_counters;

macro_rules! define_engine_stats {
    ($($field:ident, $wire:ident, $prom:literal, $help:literal;)*) => {
        /// Live counters, updated without locks.
        #[derive(Debug, Default)]
        pub(crate) struct Counters {
            $(pub(crate) $field: AtomicU64,)*
            pub(crate) stuck_nanos: AtomicU64,
        }

        /// A snapshot of one device's counters.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub struct IntxStats {
            $(#[doc = $help] pub $field: u64,)*
            /// Interrupt-path attempts deferred because the gate was held.
            pub deferred: u64,
            /// Time lines spent stuck before the watchdog recovered them.
            pub stuck_time: std::time::Duration,
        }

        impl Counters {
            pub(crate) fn snapshot(&self, deferred: u64) -> IntxStats {
                let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
                IntxStats {
                    $($field: get(&self.$field),)*
                    deferred,
                    stuck_time: std::time::Duration::from_nanos(get(&self.stuck_nanos)),
                }
            }
        }
    };
}
with_intx_counters!(define_engine_stats);

impl Counters {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
