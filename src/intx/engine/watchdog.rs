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
//! and stays set for [`WatchdogOptions::detect_after`] while the interrupt
//! path made no progress (no host interrupt, injection or EOI). An
//! interrupt in service whose EOI the guest has not sent yet is the guest's
//! business, not a stuck line.
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
pub struct WatchdogOptions {
    /// Detect and recover stuck lines (pending work after a reset is re-run
    /// by the ticks either way).
    pub enabled: bool,
    /// How long STATUS.INTERRUPT may stay set with no progress before the
    /// line counts as stuck.
    pub detect_after: Duration,
    /// How long a device counts as active after its last interrupt, or
    /// after the last sign of a reset outside the engine.
    pub active_for: Duration,
    /// Tick interval while the device is idle.
    pub idle_interval: Duration,
}

impl Default for WatchdogOptions {
    fn default() -> Self {
        Self {
            enabled: true,
            detect_after: Duration::from_millis(50),
            active_for: Duration::from_secs(2),
            idle_interval: Duration::from_secs(1),
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
    /// When STATUS.INTERRUPT was first seen set with the progress count
    /// then; `None` while it reads clear.
    asserting_since: Option<(Instant, u64)>,
    /// Progress count at the previous tick, and when it last moved (or a
    /// reset outside the engine was last seen).
    last_progress: Option<(u64, Instant)>,
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
    /// Interrupt-path progress: host interrupts, injections and EOIs.
    fn progress(&self) -> u64 {
        let c = &self.counters;
        c.host_interrupts.load(Ordering::Relaxed)
            + c.injected.load(Ordering::Relaxed)
            + c.eois.load(Ordering::Relaxed)
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
        let Some(mut dev) = self.gate.try_access() else {
            return (Tick::Busy, fast);
        };
        let progress = self.progress();
        let read_at = Instant::now();
        let read = read_command_status(&mut dev.backend);
        let reset_seen =
            read_at.elapsed() >= RESET_WAIT || matches!(read, Err(BackendError::NotResponding));
        let active = match dev.watch.last_progress {
            Some((p, at)) if p == progress && !reset_seen => {
                now.duration_since(at) < opts.active_for
            }
            _ => {
                dev.watch.last_progress = Some((progress, now));
                true
            }
        };
        let cs = match read {
            Ok(cs) => cs,
            Err(BackendError::NotResponding) => return (Tick::Busy, fast),
            Err(e) => {
                debug!(bdf = %self.bdf, error = %e, "watchdog: reading STATUS failed");
                return (Tick::Busy, if active { fast } else { opts.idle_interval });
            }
        };
        if !cs.asserting() {
            dev.watch.asserting_since = None;
            return (Tick::Quiet, if active { fast } else { opts.idle_interval });
        }
        let since = match dev.watch.asserting_since {
            Some((since, mark)) if mark == progress => since,
            _ => {
                dev.watch.asserting_since = Some((now, progress));
                return (Tick::Quiet, fast);
            }
        };
        let waiting_for_guest = dev.line == LineState::InService && !self.is_kernel_bypass();
        let stuck_for = now.duration_since(since);
        if !opts.enabled || waiting_for_guest || stuck_for < opts.detect_after {
            return (Tick::Quiet, fast);
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
        // Check again from scratch: a re-sync inside another reset can be
        // undone the same way.
        dev.watch.asserting_since = None;
        drop(dev);
        match resynced {
            Ok(()) => {
                // Rate limited: a reset loop can make this happen many
                // times a second; the counters have every one.
                let detections = self.counters.stuck_detections.load(Ordering::Relaxed);
                if detections == 1 || detections % 64 == 0 {
                    warn!(bdf = %self.bdf, ?stuck_for, detections,
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
