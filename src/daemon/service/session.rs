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
    /// The delivery ledger, if the device keeps one (`Ledger`).
    ledger: Option<Arc<Ledger>>,
}

/// Where the session's last interrupt stands, in a memfd kept in systemd's
/// fd store (`<bdf>.delivery`), one `pwrite` per step: injected for the
/// irqfd (before the writer is told), written to it (after the write, with
/// nothing more pending), EOIed (when the resample eventfd was read, before
/// the EOI is processed). A daemon resumed after a kill -9 that finds the
/// device masked and asserting knows from it whether that interrupt is in
/// the guest's hands (written, no EOI since: it must not be sent again) or
/// not (injected but not written, or EOIed and the crash came before the
/// re-check: it must be).
pub(crate) struct Ledger {
    file: std::fs::File,
}

impl Ledger {
    const IDLE: u64 = 0;
    const INJECTED: u64 = 1;
    const WRITTEN: u64 = 2;

    /// A ledger in `file`, reset.
    pub(crate) fn new(file: std::fs::File) -> Self {
        let ledger = Self { file };
        ledger.put(Self::IDLE);
        ledger
    }

    /// Whether `file` records an interrupt written to the irqfd and not
    /// EOIed since.
    pub(crate) fn in_guest(file: &std::fs::File) -> bool {
        use std::os::unix::fs::FileExt;
        let mut b = [0u8; 8];
        file.read_exact_at(&mut b, 0).is_ok() && u64::from_le_bytes(b) == Self::WRITTEN
    }

    fn put(&self, state: u64) {
        use std::os::unix::fs::FileExt;
        // A failed write only weakens the resume's knowledge (it then
        // re-checks and may re-send); not worth a log line per interrupt.
        let _ = self.file.write_all_at(&state.to_le_bytes(), 0);
    }
}

struct WriterState {
    signals: u64,
    /// A write taken from `signals` is under way.
    writing: bool,
    closed: bool,
}

impl IrqfdWriter {
    fn spawn(irqfd: EventFd, ledger: Option<Arc<Ledger>>) -> io::Result<Self> {
        let unblock = irqfd.try_clone()?;
        let shared = Arc::new(WriterShared {
            ledger,
            state: Mutex::new(WriterState {
                signals: 0,
                writing: false,
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
        {
            let mut s = lock(&self.shared.state);
            s.signals += 1;
            if let Some(l) = &self.shared.ledger {
                l.put(Ledger::INJECTED);
            }
        }
        self.shared.wake.notify_all();
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
                s.writing = true;
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
            let mut s = lock(&self.state);
            if let (Some(l), 0) = (&self.ledger, s.signals) {
                l.put(Ledger::WRITTEN);
            }
            s.writing = false;
            drop(s);
            self.wake.notify_all();
        }
    }

    /// Waits up to `timeout` for every signal to be written.
    fn flush(&self, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut s = lock(&self.state);
        while s.signals > 0 || s.writing {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() || s.closed {
                return false;
            }
            s = self
                .wake
                .wait_timeout(s, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
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
    /// The delivery ledger each session's writer keeps.
    ledger: Option<Arc<Ledger>>,
    /// The session is on the kernel bypass: the kernel signals its irqfd
    /// (the backend's trigger) itself, also when the engine's re-check
    /// finds the device still asserting (vfio-pci's unmask re-sends).
    bypass: bool,
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
                ledger: None,
                bypass: false,
                parked: false,
                in_service_since: None,
            }),
            metrics,
        }
    }

    /// Waits up to `timeout` for the interrupts injected so far to be
    /// written to the session's irqfd (before the daemon exits for a
    /// restart: an interrupt the engine masked for delivery is delivered).
    pub(crate) fn flush(&self, timeout: std::time::Duration) -> bool {
        let shared = match &lock(&self.state).irqfd {
            Some(w) => Arc::clone(&w.shared),
            None => return true,
        };
        shared.flush(timeout)
    }

    /// Keeps the delivery ledger in `ledger` from the next session on.
    pub(crate) fn set_ledger(&self, ledger: Ledger) {
        lock(&self.state).ledger = Some(Arc::new(ledger));
    }

    /// The guest EOIed (the resample eventfd was read): in the ledger
    /// before the EOI is processed.
    pub(super) fn note_eoi(&self) {
        if let Some(l) = &lock(&self.state).ledger {
            l.put(Ledger::IDLE);
        }
    }

    /// Whether a session's irqfd is attached.
    pub fn attached(&self) -> bool {
        lock(&self.state).irqfd.is_some()
    }

    /// Attaches `irqfd`. Returns whether an interrupt was parked meanwhile
    /// on the user-space path: the caller re-checks it with the device
    /// (delivered if the device still asserts); on the kernel bypass the
    /// engine's re-check has the kernel signal it instead.
    pub(super) fn attach(&self, irqfd: EventFd, bypass: bool) -> io::Result<bool> {
        let ledger = lock(&self.state).ledger.clone();
        let irqfd = IrqfdWriter::spawn(irqfd, ledger)?;
        let mut s = lock(&self.state);
        let parked = std::mem::take(&mut s.parked) && !bypass;
        if bypass {
            s.in_service_since = None;
        }
        s.bypass = bypass;
        s.irqfd = Some(irqfd);
        Ok(parked)
    }

    pub(super) fn detach(&self) -> bool {
        let mut s = lock(&self.state);
        s.irqfd = None;
        s.bypass = false;
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
            // The kernel signalled the irqfd itself; a second signal from
            // the writer thread could land after the guest's EOI of the
            // first, and be a second delivery.
            Some(_) if s.bypass => Ok(()),
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
        if self.dev.resumed_on_bypass.swap(false, Ordering::SeqCst)
            && bypass
            && self.dev.engine.is_kernel_bypass()
        {
            // The session resumed after the daemon's restart: the engine
            // adopted its kernel bypass as the kernel kept it (the same
            // irqfd and resample eventfd, from the store). Nothing is
            // re-wired; the kernel never stopped delivering.
            self.dev.sink.attach(irqfd, true).map_err(register)?;
            self.dev
                .metrics
                .sessions
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            info!("session resumed on the adopted kernel bypass: nothing re-wired");
            return Ok(());
        }
        if self.dev.resumed_in_service.swap(false, Ordering::SeqCst) {
            return self.attach_in_service(resample, irqfd, fd, bypass);
        }
        let mut fell_back = false;
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
                    crate::daemon::resume::record_path(bdf, true);
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
                    // The engine's fallback re-check may have injected
                    // into the sink meanwhile: re-checked below.
                    fell_back = true;
                    warn!(error = %crate::error_chain(&e), "the kernel bypass could not be wired; the session takes the user-space path");
                }
            }
        }
        let fd = crate::intx::sys::async_eventfd(fd).map_err(register)?;
        let parked = self.dev.sink.attach(irqfd, false).map_err(register)?;
        *resample = Some(fd);
        if parked || fell_back {
            // Re-checked, not replayed: the device may have stopped
            // asserting since it parked (its driver acknowledged it — a
            // guest's ISR that ran while the daemon restarted — and the
            // guest EOIed), and a replay would then be a second delivery.
            // As at an EOI: delivered if it still asserts, else unmasked.
            self.dev.sink.take_in_service();
            if let Err(e) = self.dev.engine.on_guest_eoi() {
                self.report(&e);
            }
        }
        self.dev
            .metrics
            .sessions
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        info!("session attached on the user-space EOI path");
        Ok(())
    }

    /// Re-attaches a session resumed after the daemon's restart while the
    /// device was found masked and asserting: the previous process had
    /// delivered that interrupt (it masks, records, then signals; a
    /// restart flushes the signals before it exits) and the guest may be
    /// in its handler. A second signal now is not harmless: KVM applies a
    /// resample irqfd's signal from a work queue, so one written while the
    /// guest is in its handler can land after its EOI, as a second
    /// delivery (seen in the restart test). So nothing is re-sent: the
    /// engine stays in service and waits for the guest's EOI on the
    /// user-space path (one counted in the resample eventfd while the
    /// daemon was away is read at once; a delivery a kill -9 lost between
    /// the mask and the signal is recovered by the EOI timeout), and a
    /// session that was on the kernel bypass is wired onto it again once
    /// the line is idle.
    fn attach_in_service(
        &mut self,
        resample: &mut Option<AsyncFd<EventFd>>,
        irqfd: EventFd,
        fd: EventFd,
        bypass: bool,
    ) -> Result<(), AttachError> {
        let bdf = self.dev.bdf();
        let register = |source| AttachError::Register { bdf, source };
        if bypass {
            crate::daemon::resume::record_path(bdf, false);
            self.bypass_later = Some((
                irqfd.try_clone().map_err(register)?,
                fd.try_clone().map_err(register)?,
            ));
        }
        let fd = crate::intx::sys::async_eventfd(fd).map_err(register)?;
        // The parked interrupt is the one in service: not replayed.
        let _ = self.dev.sink.attach(irqfd, false).map_err(register)?;
        *resample = Some(fd);
        self.dev
            .metrics
            .sessions
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        info!(
            bypass_after_eoi = bypass,
            "session resumed with an interrupt in service: waiting for the guest's EOI, nothing re-sent"
        );
        Ok(())
    }

    /// Wires a resumed session back onto the kernel bypass once its
    /// interrupt in service was EOIed (the line idle).
    pub(super) async fn rewire_bypass(&mut self, resample: &mut Option<AsyncFd<EventFd>>) {
        if self.bypass_later.is_none() || self.holding() {
            return;
        }
        let engine = Arc::clone(&self.dev.engine);
        let idle = tokio::task::spawn_blocking(move || {
            engine.line_state() == crate::intx::LineState::Idle
        })
        .await;
        if !matches!(idle, Ok(true)) {
            return;
        }
        let Some((irqfd, fd)) = self.bypass_later.take() else {
            return;
        };
        let sink_irqfd = match irqfd.try_clone() {
            Ok(i) => i,
            Err(e) => {
                self.report(&e);
                return;
            }
        };
        self.dev.sink.detach();
        if let Err(e) = self.dev.sink.attach(sink_irqfd, true) {
            self.report(&e);
            return;
        }
        *resample = None;
        let engine = Arc::clone(&self.dev.engine);
        match tokio::task::spawn_blocking(move || engine.set_kernel_bypass(Some((irqfd, fd)))).await
        {
            Ok(Ok(())) => {
                crate::daemon::resume::record_path(self.dev.bdf(), true);
                info!("resumed session back on the kernel bypass")
            }
            Ok(Err(e)) => self.report(&e),
            Err(e) => self.report(&e),
        }
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
