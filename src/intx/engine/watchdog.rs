//! The stuck-INTx watchdog: survive resets the project did not start.
//!
//! A reset that bypasses the gate (two `echo 1 > .../reset` loops, as in the
//! 2011 reproducer) can leave INTx masked with nothing telling user space:
//! vfio-pci applies an unmask that lands inside the reset window (from our
//! UNMASK, or in the kernel from KVM's resample eventfd on the bypass), the
//! reset's restore puts INTX_DISABLE back, and from then on vfio believes
//! the line is unmasked while no interrupt ever arrives again.
//!
//! Detection: STATUS.INTERRUPT (read through the gate) has been seen set
//! and, for [`WatchdogOptions::detect_after`] since, the interrupt path
//! made no progress (no host interrupt, injection, or EOI that found the
//! line in service: KVM signals every resample eventfd on a GSI at each
//! EOI of it, so another device's EOIs prove nothing about this one) and
//! the line never looked idle and unmasked (STATUS.INTERRUPT clear and the
//! hardware's INTX_DISABLE clear, read with
//! [`PciBackend::read_physical_intx_disable`]). The suspicion outlives
//! STATUS.INTERRUPT going clear: a reset drops the device's line, and under
//! a storm of resets the line is never set for long, while the mask a reset
//! restored stays. What the state machine expects decides:
//!
//! - The guest's own INTX_DISABLE (`GuestMasked`), a host hold
//!   ([`IntxDevice::hold`]), or an interrupt in service on
//!   the user-space path whose EOI the engine will see: masked is expected
//!   for as long as the guest likes. Never a re-sync.
//! - Idle on the user-space path: the engine would have seen an interrupt
//!   or an EOI; a line asserting or masked with no progress disagrees.
//!   Re-sync.
//! - The kernel bypass: the engine sees neither the interrupt nor the EOI,
//!   so an asserting line the kernel masked may be one the guest is still
//!   servicing, and a re-sync's UNMASK would re-signal its irqfd (landing
//!   after the guest's EOI, that delivers an interrupt the device no longer
//!   asserts). Only a reset outside the engine strands the line there, so
//!   the watchdog re-syncs when it saw one lately (a STATUS read that
//!   waited for it, or a device not answering), or when one suspicion has
//!   lasted [`WatchdogOptions::guest_service_limit`], longer than any guest
//!   services an interrupt (a reset the ticks did not catch).
//!
//! A suspicion that reached the detection time without a re-sync is a
//! harmless re-check, counted apart (`watchdog_rechecks`).
//!
//! Recovery: re-sync the kernel's mask state with the hardware — mask, then
//! settle, which is VFIO's ACTION_MASK then ACTION_UNMASK (the kernel's
//! check-and-unmask, re-signalling if the device still asserts), or for a
//! physical INTX_DISABLE a rewrite of COMMAND — and check again at the next
//! tick, since a re-sync that lands inside another reset can be undone the
//! same way. Never while a reset of our own holds the gate.
//!
//! Cost: no polling thread; whoever runs the engine calls
//! [`IntxDevice::watchdog_tick`] when the delay it returned has passed
//! (the [`run_worker`](crate::intx::run_worker) loop does, with its epoll
//! timeout). Ticks are frequent only while the device is active or
//! asserting; an idle device is looked at once per
//! [`WatchdogOptions::idle_interval`]. Active means an interrupt went
//! through lately, or a reset outside the engine was seen lately: the
//! tick's STATUS read waited for one (vfio-pci and uio_pci_generic make
//! user-space config accesses sleep while a reset holds the device — the
//! only trace such a reset leaves in user space) or the device did not
//! answer. That matters where the interrupt path shows no progress: on the
//! kernel bypass the engine sees no interrupt at all, and under a storm of
//! resets the device is held in reset nearly all the time; without it a
//! line stranded by the last reset would be found only at the next idle
//! tick.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use super::{During, IntxDevice, LineState, Operation, WORK_EOI, WORK_HOST, WORK_RECHECK};
use crate::backend::{BackendError, PciBackend};
use crate::intx::stats::Counters;
use crate::pci::intx::read_command_status;

/// Tunables of the stuck-INTx watchdog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct WatchdogOptions {
    /// Detect and recover stuck lines (pending work after a reset is re-run
    /// by the ticks either way).
    pub enabled: bool,
    /// How long after STATUS.INTERRUPT was seen set the line may go on
    /// without interrupt progress, and without looking idle and unmasked,
    /// before it counts as stuck.
    pub detect_after: Duration,
    /// How long a device counts as active after its last interrupt, or
    /// after the last sign of a reset outside the engine; also how long
    /// such a sign counts as evidence on the kernel bypass.
    pub active_for: Duration,
    /// Tick interval while the device is idle.
    pub idle_interval: Duration,
    /// On the kernel bypass, with no sign of a reset outside the engine:
    /// how long a line may stay asserting or masked, with no moment seen
    /// idle and unmasked, before the watchdog re-syncs it anyway (a guest
    /// may take this long to service an interrupt).
    pub guest_service_limit: Duration,
}

with_setters!(WatchdogOptions {
    enabled: bool => with_enabled,
    detect_after: Duration => with_detect_after,
    active_for: Duration => with_active_for,
    idle_interval: Duration => with_idle_interval,
    guest_service_limit: Duration => with_guest_service_limit,
});

impl Default for WatchdogOptions {
    fn default() -> Self {
        Self {
            enabled: true,
            detect_after: Duration::from_millis(50),
            active_for: Duration::from_secs(2),
            idle_interval: Duration::from_secs(1),
            guest_service_limit: Duration::from_secs(1),
        }
    }
}

impl WatchdogOptions {
    /// Tick interval while the device is active or asserting.
    pub fn active_interval(&self) -> Duration {
        self.detect_after / 2
    }
}

/// A STATUS read that took this long waited for a reset (a config read
/// takes microseconds otherwise); a false alarm only costs ticks at the
/// active interval for [`WatchdogOptions::active_for`].
const RESET_WAIT: Duration = Duration::from_millis(2);

/// What the watchdog remembers of one device (behind the gate).
#[derive(Debug, Default)]
pub(super) struct WatchState {
    /// The line under suspicion, if it is.
    suspect: Option<Suspect>,
    /// Progress count at the previous tick, and when it last moved (or a
    /// reset outside the engine was last seen).
    last_progress: Option<(u64, Instant)>,
    /// When a reset outside the engine was last seen.
    reset_seen_at: Option<Instant>,
}

/// STATUS.INTERRUPT was seen set with no interrupt progress since.
#[derive(Debug, Clone, Copy)]
struct Suspect {
    since: Instant,
    /// The progress count then; any progress ends the suspicion.
    progress: u64,
    /// Whether this suspicion was counted as a harmless re-check.
    rechecked: bool,
    /// The kernel's count of host interrupts at the first closer look (the
    /// kernel bypass, no sign of a reset).
    host_count: Option<u64>,
}

impl Suspect {
    fn new(since: Instant, progress: u64) -> Self {
        Self {
            since,
            progress,
            rechecked: false,
            host_count: None,
        }
    }
}

/// The outcome of one tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tick {
    /// Nothing to do.
    Quiet,
    /// A reset holds the device (ours or, for vfio-pci, the kernel's); the
    /// tick comes back soon.
    Busy,
    /// The line was found stuck and re-synced.
    Recovered,
}

impl<B: PciBackend> IntxDevice<B> {
    /// Interrupt-path progress: host interrupts, injections and EOIs that
    /// found the line in service (not every resample on a shared GSI).
    fn progress(&self) -> u64 {
        let c = &self.counters;
        c.host_interrupts.load(Ordering::Relaxed)
            + c.injected.load(Ordering::Relaxed)
            + c.serviced_eois.load(Ordering::Relaxed)
    }

    /// One watchdog look at the device: re-runs interrupt work left pending
    /// by a reset the engine did not start, and detects and recovers a
    /// stuck line. Returns the tick's outcome and when to tick next.
    pub fn watchdog_tick(&self, now: Instant) -> (Tick, Duration) {
        let opts = self.options.watchdog;
        let fast = opts.active_interval();
        if self.wake.pending.load(Ordering::SeqCst) & (WORK_HOST | WORK_EOI | WORK_RECHECK) != 0 {
            // Work left by an event that found the device mid-reset.
            if let Err(e) = self.service() {
                debug!(bdf = %self.bdf, error = %e, "watchdog: pending work failed");
            }
        }
        // Busy is retried at the next tick: no deferral (and no kick).
        let Some(mut dev) = self.gate.try_access_untracked() else {
            return (Tick::Busy, fast);
        };
        let progress = self.progress();
        let read_at = Instant::now();
        let read = read_command_status(&mut dev.backend);
        let reset_seen =
            read_at.elapsed() >= RESET_WAIT || matches!(read, Err(BackendError::NotResponding));
        if reset_seen {
            dev.watch.reset_seen_at = Some(now);
        }
        let active = match dev.watch.last_progress {
            Some((p, at)) if p == progress && !reset_seen => {
                now.duration_since(at) < opts.active_for
            }
            _ => {
                dev.watch.last_progress = Some((progress, now));
                true
            }
        };
        let quiet = if active { fast } else { opts.idle_interval };
        let cs = match read {
            Ok(cs) => cs,
            Err(BackendError::NotResponding) => return (Tick::Busy, fast),
            Err(e) => {
                debug!(bdf = %self.bdf, error = %e, "watchdog: reading STATUS failed");
                return (Tick::Busy, quiet);
            }
        };
        let bypass = self.is_kernel_bypass();
        // Masked for as long as the guest likes: its own INTX_DISABLE, or an
        // interrupt in service whose EOI the engine will see.
        let guest_holds = dev.guest.intx_disabled()
            || dev.hold.is_some()
            || dev.line == LineState::GuestMasked
            || (dev.line == LineState::InService && !bypass);
        if guest_holds {
            dev.watch.suspect = None;
            return (Tick::Quiet, if cs.asserting() { fast } else { quiet });
        }
        if dev.watch.suspect.is_some_and(|s| s.progress != progress) {
            // The interrupt path moved: the line works.
            dev.watch.suspect = None;
        }
        let Some(suspect) = dev.watch.suspect else {
            if !cs.asserting() {
                return (Tick::Quiet, quiet);
            }
            dev.watch.suspect = Some(Suspect::new(now, progress));
            return (Tick::Quiet, fast);
        };
        let masked = match dev.backend.read_physical_intx_disable() {
            Ok(masked) => masked,
            Err(BackendError::NotResponding) => return (Tick::Busy, fast),
            Err(e) => {
                // Unknown: taken as masked, the case that needs the most
                // evidence below.
                debug!(bdf = %self.bdf, error = %e, "watchdog: reading the physical INTX_DISABLE failed");
                true
            }
        };
        if !cs.asserting() && !masked {
            // Idle and unmasked: nothing owed, nothing stuck.
            dev.watch.suspect = None;
            return (Tick::Quiet, quiet);
        }
        let stuck_for = now.duration_since(suspect.since);
        if !opts.enabled || stuck_for < opts.detect_after {
            return (Tick::Quiet, fast);
        }
        let reset_lately = dev
            .watch
            .reset_seen_at
            .is_some_and(|at| now.duration_since(at) < opts.active_for);
        if bypass && !reset_lately {
            // Possibly an interrupt the guest is still servicing: a new
            // interrupt taken by the kernel since proves the line alive.
            let count = dev.backend.host_interrupt_count().unwrap_or_else(|e| {
                debug!(bdf = %self.bdf, error = %e, "watchdog: reading the host interrupt count failed");
                None
            });
            if !suspect.rechecked {
                Counters::bump(&self.counters.watchdog_rechecks);
            }
            let mut next = Suspect {
                rechecked: true,
                host_count: suspect.host_count.or(count),
                ..suspect
            };
            if count.is_some() && suspect.host_count.is_some() && count != suspect.host_count {
                next = Suspect {
                    host_count: count,
                    ..Suspect::new(now, progress)
                };
            }
            dev.watch.suspect = Some(next);
            if now.duration_since(next.since) < opts.guest_service_limit {
                return (Tick::Quiet, fast);
            }
        }
        Counters::bump(&self.counters.stuck_detections);
        let nanos = u64::try_from(stuck_for.as_nanos()).unwrap_or(u64::MAX);
        self.counters
            .stuck_nanos
            .fetch_add(nanos, Ordering::Relaxed);
        let ctx = self.ctx();
        let resynced = dev
            .backend
            .intx_mask()
            .during(Operation::Mask)
            .and_then(|()| dev.settle(&ctx));
        Counters::bump(&self.counters.resyncs);
        // Look again after the detection time: a re-sync inside another
        // reset can be undone the same way. Progress, or the line seen idle
        // and unmasked, ends the suspicion before that.
        dev.watch.suspect = Some(Suspect::new(now, self.progress()));
        drop(dev);
        match resynced {
            Ok(()) => {
                // Rate limited: a reset loop can make this happen many
                // times a second; the counters have every one.
                let detections = self.counters.stuck_detections.load(Ordering::Relaxed);
                if detections == 1 || detections % 64 == 0 {
                    warn!(bdf = %self.bdf, ?stuck_for, masked, asserting = cs.asserting(), detections,
                        "INTx was stuck masked (a reset outside vfio-intx undid an unmask); re-synced");
                }
            }
            Err(f) => {
                let e = self.fail(f);
                debug!(bdf = %self.bdf, error = %e, "watchdog: re-sync failed, retrying next tick");
            }
        }
        (Tick::Recovered, fast)
    }
}
