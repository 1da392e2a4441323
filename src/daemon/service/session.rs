//! A device's sessions: the interrupt sink ([`SessionSink`]: the attached
//! VMM's irqfd, written on a thread of its own ([`IrqfdWriter`]), or an
//! interrupt parked for the next session), and
//! attaching, detaching and ending a session in the device's task (on the
//! kernel bypass or the user-space EOI path).

use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use tokio::io::unix::AsyncFd;
use tracing::{info, warn};
use vmm_sys_util::eventfd::EventFd;

use super::task::Task;
use super::{lock, rate_limit, AttachError};
use crate::daemon::config::PathSetting;
use crate::daemon::metrics::DeviceMetrics;
use crate::intx::InterruptSink;

/// Signals a VMM's irqfd from a thread of its own, never the runtime's.
///
/// The VMM chose the descriptor's blocking mode, and `O_NONBLOCK` lives on
/// the open file description it shares with the daemon, so the VMM can
/// change it at any time; eventfds take no per-call non-blocking flag for
/// writes (`pwritev2(RWF_NOWAIT)` is `EOPNOTSUPP`). A write blocks when the
/// counter is at its maximum (nobody consumes it: no KVM irqfd registered).
/// So the writes happen here: a blocked write holds up this session's
/// interrupts alone, and signals coalesce meanwhile (the line is level: one
/// write asserts it). `EAGAIN` (a non-blocking, saturated irqfd) means the
/// guest's line is already asserted: not an error.
struct IrqfdWriter {
    shared: Arc<WriterShared>,
    /// The daemon's other copy: reading it at the end unblocks a write
    /// stuck on a saturated counter, so that the thread can exit.
    unblock: EventFd,
}

struct WriterShared {
    state: Mutex<WriterState>,
    wake: Condvar,
}

struct WriterState {
    signals: u64,
    closed: bool,
}

impl IrqfdWriter {
    fn spawn(irqfd: EventFd) -> io::Result<Self> {
        let unblock = irqfd.try_clone()?;
        let shared = Arc::new(WriterShared {
            state: Mutex::new(WriterState {
                signals: 0,
                closed: false,
            }),
            wake: Condvar::new(),
        });
        let writer = Arc::clone(&shared);
        let span = tracing::Span::current();
        std::thread::Builder::new()
            .name("vfio-intx-irqfd".into())
            .stack_size(256 * 1024)
            .spawn(move || span.in_scope(|| writer.run(&irqfd)))?;
        Ok(Self { shared, unblock })
    }

    fn signal(&self) {
        lock(&self.shared.state).signals += 1;
        self.shared.wake.notify_one();
    }
}

impl WriterShared {
    fn run(&self, irqfd: &EventFd) {
        let mut log = rate_limit();
        loop {
            {
                let mut s = lock(&self.state);
                while s.signals == 0 && !s.closed {
                    s = self.wake.wait(s).unwrap_or_else(PoisonError::into_inner);
                }
                if s.closed {
                    return;
                }
                s.signals = 0;
            }
            match irqfd.write(1) {
                Ok(()) => {}
                Err(e) => {
                    if let Some(suppressed) = log.admit() {
                        if e.kind() == io::ErrorKind::WouldBlock {
                            info!(suppressed, "the VMM's irqfd is saturated (nobody consumes it); the guest's line is already asserted");
                        } else {
                            warn!(suppressed, error = %e, "signalling the VMM's irqfd failed");
                        }
                    }
                }
            }
        }
    }
}

impl Drop for IrqfdWriter {
    fn drop(&mut self) {
        lock(&self.shared.state).closed = true;
        self.shared.wake.notify_one();
        // A write blocked on a full counter completes once it is drained
        // (a VMM that keeps refilling it keeps only this thread).
        let _ = crate::daemon::sys::read_eventfd_nowait(&self.unblock);
    }
}

struct SinkState {
    irqfd: Option<IrqfdWriter>,
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
        let irqfd = IrqfdWriter::spawn(irqfd)?;
        let mut s = lock(&self.state);
        if std::mem::take(&mut s.parked) && !bypass {
            irqfd.signal();
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

    pub(crate) fn in_service_since(&self) -> Option<std::time::Instant> {
        lock(&self.state).in_service_since
    }
}

impl InterruptSink for SessionSink {
    fn inject(&self) -> io::Result<()> {
        let mut s = lock(&self.state);
        s.in_service_since = Some(std::time::Instant::now());
        match &s.irqfd {
            Some(fd) => {
                fd.signal();
                Ok(())
            }
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
            PathSetting::Auto | PathSetting::Fast => {
                self.dev.engine.capabilities().bypass_capable()
            }
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
