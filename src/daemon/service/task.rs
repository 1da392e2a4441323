//! A device's service task: the select loop. It pumps events — the trigger
//! eventfd (host interrupts), the session's resample eventfd (EOIs), control
//! requests, the watchdog's and the storm back-off's timers — into the
//! engine and into the health policy (`health.rs`), and carries out the
//! policy's actions. Sessions' wiring is in `session.rs`.
//!
//! Interrupt-path calls into the engine never wait behind a reset (the
//! engine defers), so they run on the runtime's thread; anything that may
//! wait for the gate (mask, re-sync) runs on the blocking pool.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};
use vmm_sys_util::eventfd::EventFd;

use super::health::{Action, Event, Health, HealthConfig, Held, StormCounts};
use super::{rate_limit, Control, DeviceError, ManagedDevice};
use crate::intx::IntxError;
use crate::ratelimit::LogLimiter;

pub(super) struct Task {
    pub(super) dev: Arc<ManagedDevice>,
    pub(super) next_tick: Instant,
    pub(super) health: Health,
    errors: LogLimiter,
    eoi_log: LogLimiter,
    /// A resumed session's kernel-bypass wiring (irqfd, resample), put
    /// back once its interrupt in service is EOIed (`session.rs`).
    pub(super) bypass_later: Option<(EventFd, EventFd)>,
}

/// Waits until `fd` is readable; never, without an fd.
async fn readable(
    fd: Option<&AsyncFd<EventFd>>,
) -> io::Result<tokio::io::unix::AsyncFdReadyGuard<'_, EventFd>> {
    match fd {
        Some(fd) => fd.readable().await,
        None => std::future::pending().await,
    }
}

impl Task {
    pub(super) fn new(dev: Arc<ManagedDevice>) -> Self {
        let now = Instant::now();
        let config = HealthConfig {
            storm_threshold: dev.config.storm_threshold,
            storm_backoff: dev.config.storm_backoff,
            eoi_timeout: dev.config.eoi_timeout,
        };
        Self {
            dev,
            next_tick: now,
            health: Health::new(config, now.into_std()),
            errors: rate_limit(),
            eoi_log: rate_limit(),
            bypass_later: None,
        }
    }

    pub(super) async fn run(
        mut self,
        trigger: AsyncFd<EventFd>,
        mut rx: mpsc::UnboundedReceiver<Control>,
    ) {
        let mut resample: Option<AsyncFd<EventFd>> = None;
        debug!("service task running");
        loop {
            let holding = self.health.holding();
            let storm_retry = self.health.storm_retry_at().map(Instant::from_std);
            tokio::select! {
                biased;
                msg = rx.recv() => match msg {
                    None | Some(Control::Stop) => break,
                    Some(Control::Attach { irqfd, resample: fd, reply }) => {
                        let _ = reply.send(self.attach(&mut resample, irqfd, fd).await);
                    }
                    Some(Control::Detach) => {
                        resample = None;
                        self.bypass_later = None;
                        self.detach().await;
                    }
                    Some(Control::Hold { reply }) => {
                        let event = Event::Hold {
                            now: std::time::Instant::now(),
                            bypass: self.dev.engine.is_kernel_bypass(),
                        };
                        let _ = reply.send(self.pump(event).await);
                    }
                    Some(Control::Release { reply }) => {
                        let event = Event::Release {
                            now: std::time::Instant::now(),
                            counts: self.counts(),
                        };
                        let _ = reply.send(self.pump(event).await);
                    }
                },
                _ = tokio::time::sleep_until(storm_retry.unwrap_or_else(Instant::now)), if storm_retry.is_some() => {
                    let event = Event::StormRetry {
                        now: std::time::Instant::now(),
                        counts: self.counts(),
                    };
                    if let Err(e) = self.pump(event).await {
                        self.report(&e);
                    }
                }
                guard = trigger.readable(), if !holding => match guard {
                    Ok(mut guard) => {
                        let r = self.dev.engine.on_host_interrupt();
                        guard.clear_ready();
                        self.after_event(r).await;
                    }
                    Err(e) => {
                        error!(error = %e, "polling the trigger eventfd failed; the device is no longer serviced");
                        break;
                    }
                },
                guard = readable(resample.as_ref()), if !holding && resample.is_some() => match guard {
                    Ok(mut guard) => {
                        // Never a blocking read of the VMM's descriptor,
                        // whatever its mode: it may have drained it itself.
                        let drained = crate::daemon::sys::read_eventfd_nowait(guard.get_inner());
                        guard.clear_ready();
                        if let Err(e) = drained {
                            if e.kind() != io::ErrorKind::WouldBlock {
                                warn!(error = %e, "reading the resample eventfd failed; detaching the session");
                                resample = None;
                                self.detach().await;
                                continue;
                            }
                        }
                        self.dev.sink.note_eoi();
                        if let Some(t) = self.dev.sink.take_in_service() {
                            self.dev.metrics.round_trip.record(t.elapsed());
                        }
                        let r = self.dev.engine.on_guest_eoi();
                        self.after_event(r).await;
                        self.rewire_bypass(&mut resample).await;
                    }
                    Err(e) => {
                        warn!(error = %e, "polling the resample eventfd failed; detaching the session");
                        resample = None;
                        self.detach().await;
                    }
                },
                _ = tokio::time::sleep_until(self.next_tick), if !holding => {
                    self.tick().await;
                    self.rewire_bypass(&mut resample).await;
                }
            }
        }
        debug!("service task stopped");
    }

    pub(super) fn holding(&self) -> bool {
        self.health.holding()
    }

    fn counts(&self) -> StormCounts {
        StormCounts::of(&self.dev.engine.stats())
    }

    pub(super) fn report(&mut self, e: &dyn std::error::Error) {
        if let Some(suppressed) = self.errors.admit() {
            warn!(bdf = %self.dev.bdf(), suppressed, error = %crate::error_chain(e), "servicing the device failed");
        }
    }

    async fn after_event(&mut self, result: Result<crate::intx::Serviced, IntxError>) {
        if let Err(e) = result {
            self.report(&e);
        }
        let event = Event::Serviced {
            now: std::time::Instant::now(),
            counts: self.counts(),
            bypass: self.dev.engine.is_kernel_bypass(),
        };
        if let Err(e) = self.pump(event).await {
            self.report(&e);
        }
    }

    /// Feeds `event` to the health policy and carries out its actions;
    /// the first failure (or refusal) is returned.
    async fn pump(&mut self, event: Event) -> Result<(), DeviceError> {
        let actions = self.health.on(event);
        let mut result = Ok(());
        for action in actions {
            let r = self.carry_out(action).await;
            if result.is_ok() {
                result = r;
            }
        }
        // A hold that changed its reason (a storm hold the operator took
        // over, or the reverse) is the same mask: only its name changes.
        let want = self.health.held().map(Held::reason);
        if result.is_ok() && want.is_some() && self.dev.engine.hold_reason() != want {
            result = self.hold(want).await;
        }
        result
    }

    /// The engine's hold, off the runtime (it waits for the gate).
    async fn hold(&self, reason: Option<&'static str>) -> Result<(), DeviceError> {
        let bdf = self.dev.bdf();
        let engine = Arc::clone(&self.dev.engine);
        tokio::task::spawn_blocking(move || match reason {
            Some(reason) => engine.hold(reason),
            None => engine.release(),
        })
        .await
        .map_err(|source| DeviceError::Join {
            bdf,
            op: if reason.is_some() {
                "holding"
            } else {
                "releasing"
            },
            source,
        })??;
        Ok(())
    }

    async fn carry_out(&mut self, action: Action) -> Result<(), DeviceError> {
        let bdf = self.dev.bdf();
        match action {
            Action::Mask => {
                let reason = self.health.held().map_or("operator", Held::reason);
                self.dev.metrics.set_held(Some(std::time::Instant::now()));
                self.hold(Some(reason)).await
            }
            Action::Unmask { held, after_storm } => {
                if after_storm {
                    info!("retrying the line after the storm back-off");
                }
                self.dev.metrics.add_held(held);
                self.dev.metrics.set_held(None);
                self.next_tick = Instant::now();
                self.hold(None).await
            }
            Action::StormDetected { backoff, storms } => {
                self.dev.metrics.storms.fetch_add(1, Ordering::Relaxed);
                warn!(
                    bdf = %bdf,
                    threshold = self.dev.config.storm_threshold,
                    ?backoff,
                    storms,
                    "interrupt storm: the line keeps asserting and nobody handles it; masked, retrying later"
                );
                Ok(())
            }
            Action::EoiTimeout { waited } => {
                self.dev
                    .metrics
                    .eoi_timeouts
                    .fetch_add(1, Ordering::Relaxed);
                if let Some(suppressed) = self.eoi_log.admit() {
                    warn!(
                        ?waited,
                        suppressed,
                        "interrupt in service with no EOI from the guest; recovering as if EOIed"
                    );
                }
                self.dev.sink.note_eoi();
                self.dev.sink.take_in_service();
                self.dev.engine.on_guest_eoi()?;
                Ok(())
            }
            Action::CheckAt(at) => {
                self.next_tick = self.next_tick.min(Instant::from_std(at));
                Ok(())
            }
            Action::Refuse(what) => Err(DeviceError::Unsupported { bdf, what }),
        }
    }

    async fn tick(&mut self) {
        let now = Instant::now();
        let (tick, delay) = self.dev.engine.watchdog_tick(now.into_std());
        if tick == crate::intx::Tick::Recovered {
            self.dev.metrics.note_stuck(now.into_std());
        }
        self.next_tick = now + delay;
        // EOI timeouts: only for an interrupt injected into a user-space
        // session (on the kernel bypass the kernel takes the EOIs).
        let watched = self.dev.sink.attached() && !self.dev.engine.is_kernel_bypass();
        let event = Event::Tick {
            now: now.into_std(),
            in_service_since: self.dev.sink.in_service_since().filter(|_| watched),
        };
        if let Err(e) = self.pump(event).await {
            self.report(&e);
        }
    }
}
