//! A device's sessions: the interrupt sink ([`SessionSink`]: the attached
//! VMM's irqfd, or an interrupt parked for the next session), and
//! attaching, detaching and ending a session in the device's task (on the
//! kernel bypass or the user-space EOI path).

use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tokio::io::unix::AsyncFd;
use tracing::{info, warn};
use vmm_sys_util::eventfd::EventFd;

use super::task::Task;
use super::{lock, AttachError};
use crate::daemon::config::PathSetting;
use crate::daemon::metrics::DeviceMetrics;
use crate::intx::InterruptSink;

struct SinkState {
    irqfd: Option<EventFd>,
    parked: bool,
    in_service_since: Option<std::time::Instant>,
}

/// The engine's interrupt sink for a daemon-owned device: the attached
/// session's irqfd, or, with no session, a parked interrupt delivered to
/// the next session (the line stays masked in service meanwhile).
pub struct SessionSink {
    state: Mutex<SinkState>,
    metrics: Arc<DeviceMetrics>,
}

impl SessionSink {
    pub(super) fn new(metrics: Arc<DeviceMetrics>) -> Self {
        Self {
            state: Mutex::new(SinkState {
                irqfd: None,
                parked: false,
                in_service_since: None,
            }),
            metrics,
        }
    }

    /// Whether a session's irqfd is attached.
    pub fn attached(&self) -> bool {
        lock(&self.state).irqfd.is_some()
    }

    /// Attaches `irqfd`. On the user-space path an interrupt parked
    /// meanwhile is delivered now; on the kernel bypass the engine's
    /// re-check has the kernel signal it instead.
    pub(super) fn attach(&self, irqfd: EventFd, bypass: bool) -> io::Result<()> {
        let mut s = lock(&self.state);
        if std::mem::take(&mut s.parked) && !bypass {
            irqfd.write(1)?;
        }
        if bypass {
            s.in_service_since = None;
        }
        s.irqfd = Some(irqfd);
        Ok(())
    }

    pub(super) fn detach(&self) -> bool {
        let mut s = lock(&self.state);
        s.irqfd = None;
        s.in_service_since.is_some()
    }

    pub(super) fn take_in_service(&self) -> Option<std::time::Instant> {
        lock(&self.state).in_service_since.take()
    }

    pub(super) fn in_service_since(&self) -> Option<std::time::Instant> {
        lock(&self.state).in_service_since
    }
}

impl InterruptSink for SessionSink {
    fn inject(&self) -> io::Result<()> {
        let mut s = lock(&self.state);
        s.in_service_since = Some(std::time::Instant::now());
        match &s.irqfd {
            Some(fd) => fd.write(1),
            None => {
                s.parked = true;
                self.metrics
                    .parked
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Ok(())
            }
        }
    }
}

impl Task {
    pub(super) async fn attach(
        &mut self,
        resample: &mut Option<AsyncFd<EventFd>>,
        irqfd: EventFd,
        fd: EventFd,
    ) -> Result<(), AttachError> {
        let bdf = self.dev.bdf();
        if self.dev.sink.attached() {
            return Err(AttachError::Busy { bdf });
        }
        let register = |source| AttachError::Register { bdf, source };
        let config = &self.dev.config;
        let bypass = match config.path {
            PathSetting::Userspace => false,
            PathSetting::Auto | PathSetting::Fast => config.bypass_capable(),
        };
        if bypass && self.holding() {
            return Err(AttachError::Held { bdf });
        }
        if bypass {
            let wiring = (
                irqfd.try_clone().map_err(register)?,
                fd.try_clone().map_err(register)?,
            );
            self.dev
                .sink
                .attach(irqfd.try_clone().map_err(register)?, true)
                .map_err(register)?;
            let engine = Arc::clone(&self.dev.engine);
            let wired = tokio::task::spawn_blocking(move || engine.set_kernel_bypass(Some(wiring)))
                .await
                .map_err(|e| AttachError::Register {
                    bdf,
                    source: io::Error::other(e),
                })?;
            match wired {
                Ok(()) => {
                    self.dev
                        .metrics
                        .sessions
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    info!(
                        "session attached on the kernel bypass: no user-space work per interrupt"
                    );
                    return Ok(());
                }
                Err(source) if config.path == PathSetting::Fast => {
                    self.dev.sink.detach();
                    return Err(AttachError::Bypass { bdf, source });
                }
                Err(e) => {
                    self.dev.sink.detach();
                    warn!(error = %crate::error_chain(&e), "the kernel bypass could not be wired; the session takes the user-space path");
                }
            }
        }
        let fd = crate::intx::sys::async_eventfd(fd).map_err(register)?;
        self.dev.sink.attach(irqfd, false).map_err(register)?;
        *resample = Some(fd);
        self.dev
            .metrics
            .sessions
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        info!("session attached on the user-space EOI path");
        Ok(())
    }

    pub(super) async fn detach(&mut self) {
        self.dev.session_ending.store(true, Ordering::SeqCst);
        self.detach_wiring().await;
        self.dev.session_ending.store(false, Ordering::SeqCst);
        info!("session detached");
    }

    async fn detach_wiring(&mut self) {
        if self.dev.engine.is_kernel_bypass() {
            self.dev.sink.detach();
            self.dev.sink.take_in_service();
            // Back to the user-space wiring; an interrupt the VMM never
            // EOIed is re-checked and parks for the next session.
            let engine = Arc::clone(&self.dev.engine);
            match tokio::task::spawn_blocking(move || engine.set_kernel_bypass(None)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => self.report(&e),
                Err(e) => self.report(&e),
            }
        } else if self.dev.sink.detach() {
            // The VMM left with an interrupt in service: nobody will EOI
            // it. Treat it as EOIed; a line still asserting parks again.
            self.dev.sink.take_in_service();
            if let Err(e) = self.dev.engine.on_guest_eoi() {
                self.report(&e);
            }
        }
    }
}
