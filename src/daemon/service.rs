//! One device the daemon owns: bringing it up (bind, open, probe, arm,
//! reset), its service task (host interrupts, the session's EOIs, watchdog
//! ticks, storm and EOI-timeout detection), and handing it back.
//!
//! The engine is synchronous; the task calls it from a tokio `AsyncFd` over
//! its trigger eventfd and over the session's resample eventfd. Interrupt-
//! path calls never wait behind a reset (the engine defers), so they run on
//! the runtime's thread; anything that may wait for the gate (reset, mask,
//! re-sync, restore) runs on the blocking pool.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::ratelimit::LogLimiter;

use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, error, info, instrument, warn, Instrument};
use vmm_sys_util::eventfd::EventFd;

use crate::backend::{BackendError, ConfigSpace, PciBackend};
use crate::daemon::backend::AnyBackend;
use crate::daemon::config::{BackendKind, DeviceConfig, PathSetting, SimKernelSetting};
use crate::daemon::metrics::{DeviceMetrics, DeviceStats};
use crate::intx::{InterruptSink, IntxDevice, IntxError, IntxOptions, WatchdogOptions};
use crate::pci::intx::read_command_status;
use crate::pci::regs::PCI_COMMAND;
use crate::pci::sysfs::{Binding, PciSysfs, SysfsError};
use crate::pci::{Bdf, Width};
use crate::sim::{SimDevice, SimKernel};
use crate::uio::{UioBackend, UioError};
use crate::vfio::handover::DeviceIdentity;
use crate::vfio::{VfioBackend, VfioError};

/// Why a device could not be brought up, driven or handed back. Every
/// message names the device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// Binding or unbinding the driver, or reading sysfs, failed.
    #[error(transparent)]
    Sysfs(#[from] SysfsError),
    /// Opening through VFIO failed.
    #[error(transparent)]
    Vfio(#[from] VfioError),
    /// Opening through uio_pci_generic failed.
    #[error(transparent)]
    Uio(#[from] UioError),
    /// The engine refused or failed.
    #[error(transparent)]
    Intx(#[from] IntxError),
    /// A backend access outside the engine failed.
    #[error("{bdf}: {op} failed")]
    Backend {
        /// The device.
        bdf: Bdf,
        /// What was being done.
        op: &'static str,
        /// The cause.
        #[source]
        source: BackendError,
    },
    /// PCI 2.3 masking does not work on the device.
    #[error("{bdf}: refusing the device: {verdict}")]
    MaskingBroken {
        /// The device.
        bdf: Bdf,
        /// The probe's verdict.
        verdict: String,
    },
    /// The device's service task is gone.
    #[error("{bdf}: the device's service task has stopped")]
    TaskGone {
        /// The device.
        bdf: Bdf,
    },
    /// The device is still in use, so its previous driver cannot be put
    /// back (vfio-pci's remove would wait for it).
    #[error("{bdf}: the device is still open elsewhere in the daemon; its previous driver was not restored")]
    StillOpen {
        /// The device.
        bdf: Bdf,
    },
    /// A VMM's own device fd is still open in the daemon after its session
    /// ended (something still uses the device).
    #[error("{bdf}: the daemon still holds the VMM's device fd after its session ended")]
    FdStillHeld {
        /// The device.
        bdf: Bdf,
    },
    /// The operation is not possible in the device's current state.
    #[error("{bdf}: {what}")]
    Unsupported {
        /// The device.
        bdf: Bdf,
        /// What and why.
        what: &'static str,
    },
    /// A blocking operation for several devices could not be run.
    #[error("{op} could not run")]
    Pool {
        /// What was being done.
        op: &'static str,
        /// The runtime's error.
        #[source]
        source: tokio::task::JoinError,
    },
    /// A blocking operation could not be run.
    #[error("{bdf}: {op} could not run")]
    Join {
        /// The device.
        bdf: Bdf,
        /// What was being done.
        op: &'static str,
        /// The runtime's error.
        #[source]
        source: tokio::task::JoinError,
    },
}

/// Why a session could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// Another session is attached.
    #[error("{bdf}: a VMM session is already attached")]
    Busy {
        /// The device.
        bdf: Bdf,
    },
    /// The resample eventfd could not be registered with the runtime.
    #[error("{bdf}: registering the resample eventfd failed")]
    Register {
        /// The device.
        bdf: Bdf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The device's task is gone.
    #[error("{bdf}: the device's service task has stopped")]
    TaskGone {
        /// The device.
        bdf: Bdf,
    },
    /// The line is held masked (operator or storm); attach after release.
    #[error("{bdf}: INTx is held masked; unmask it before attaching a session")]
    Held {
        /// The device.
        bdf: Bdf,
    },
    /// path = "fast" and the kernel bypass could not be wired.
    #[error("{bdf}: path = \"fast\" is configured but the kernel bypass could not be wired")]
    Bypass {
        /// The device.
        bdf: Bdf,
        /// Why.
        #[source]
        source: IntxError,
    },
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

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
    fn new(metrics: Arc<DeviceMetrics>) -> Self {
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
    fn attach(&self, irqfd: EventFd, bypass: bool) -> io::Result<()> {
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

    fn detach(&self) -> bool {
        let mut s = lock(&self.state);
        s.irqfd = None;
        s.in_service_since.is_some()
    }

    fn take_in_service(&self) -> Option<std::time::Instant> {
        lock(&self.state).in_service_since.take()
    }

    fn in_service_since(&self) -> Option<std::time::Instant> {
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

/// Requests to a device's service task.
pub(crate) enum Control {
    Attach {
        irqfd: EventFd,
        resample: EventFd,
        reply: oneshot::Sender<Result<(), AttachError>>,
    },
    Detach,
    Hold {
        reply: oneshot::Sender<Result<(), DeviceError>>,
    },
    Release {
        reply: oneshot::Sender<Result<(), DeviceError>>,
    },
    Stop,
}

/// A device the daemon owns.
pub struct ManagedDevice {
    /// Its configuration.
    pub config: DeviceConfig,
    /// The engine.
    pub engine: Arc<IntxDevice<AnyBackend>>,
    /// Where interrupts go.
    pub sink: Arc<SessionSink>,
    /// The simulated device's hardware side (sim backend only).
    pub sim: Option<SimDevice>,
    /// An edu's BAR0 (`edu-test-hooks`): raise and acknowledge for tests.
    pub edu: Option<Arc<crate::vfio::edu::Edu>>,
    /// The daemon's metrics.
    pub metrics: Arc<DeviceMetrics>,
    /// COMMAND as found before arming, restored at shutdown.
    pub found_command: u16,
    /// The masking probe's verdict at start.
    pub masking: String,
    /// The evidence that decided it ([`Source::evidence`](crate::pci::sysfs::Source::evidence));
    /// `None` when not probed.
    pub masking_evidence: Option<&'static str>,
    /// `Some` for a VMM's own VFIO device fd, handed over for one session
    /// (how its address was established): the daemon only services its
    /// INTx and never touches COMMAND when it lets go.
    pub handed_over: Option<DeviceIdentity>,
    binding: Mutex<Option<Binding>>,
    held_operator: AtomicBool,
    /// A session's end is being processed: the VMM's irqfd is already
    /// detached but the device is not back on its own wiring yet.
    session_ending: AtomicBool,
    held_storm: AtomicBool,
    control: mpsc::UnboundedSender<Control>,
}

impl std::fmt::Debug for ManagedDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagedDevice")
            .field("bdf", &self.config.bdf)
            .finish_non_exhaustive()
    }
}

/// A device's state for `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStatus {
    /// The device.
    pub bdf: String,
    /// Its backend.
    pub backend: BackendKind,
    /// The EOI path sessions use.
    pub path: String,
    /// The masking probe's verdict at start.
    pub masking: String,
    /// Whether a VMM session (or the example guest) is attached.
    pub session: bool,
    /// Why the line is held masked by the daemon, if it is.
    pub held: Option<String>,
    /// COMMAND as found before arming.
    pub found_command: u16,
    /// Whether the daemon bound the driver (and restores it at shutdown).
    pub bound_by_daemon: bool,
    /// Whether a reset holds the device right now.
    pub in_reset: bool,
    /// For a VMM's own device fd, handed over for its session: how its
    /// address was established. `None` for devices the daemon opened.
    #[serde(default)]
    pub handed_over: Option<String>,
    /// Counters.
    pub stats: DeviceStats,
}

/// What handing a device back left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    /// COMMAND as found at start.
    pub found: u16,
    /// COMMAND now.
    pub now: u16,
    /// Whether the previous driver was restored.
    pub driver_restored: bool,
    /// A VMM's own device: only INTx was released, COMMAND is the VMM's.
    pub handed_over: bool,
}

impl ManagedDevice {
    /// Brings a device up as configured: bind, open, probe, arm, reset.
    /// Blocking. On failure everything done so far is undone.
    #[instrument(skip_all, fields(bdf = %config.bdf))]
    pub(crate) fn open(
        config: DeviceConfig,
    ) -> Result<(Arc<Self>, mpsc::UnboundedReceiver<Control>), DeviceError> {
        let bdf = config.bdf;
        let sysfs = PciSysfs::default();
        let binding = match (config.bind, config.backend.driver()) {
            (true, Some(driver)) => Some(sysfs.bind(bdf, driver)?),
            _ => None,
        };
        let result = Self::open_bound(&sysfs, config, binding.clone());
        if result.is_err() {
            if let Some(b) = &binding {
                if let Err(e) = sysfs.unbind(b) {
                    warn!(error = %crate::error_chain(&e), "restoring the previous driver failed");
                }
            }
        }
        result
    }

    fn open_bound(
        sysfs: &PciSysfs,
        config: DeviceConfig,
        binding: Option<Binding>,
    ) -> Result<(Arc<Self>, mpsc::UnboundedReceiver<Control>), DeviceError> {
        let bdf = config.bdf;
        let backend_error = |op| move |source| DeviceError::Backend { bdf, op, source };
        let (backend, sim) = match config.backend {
            BackendKind::Vfio => (AnyBackend::Vfio(VfioBackend::open(bdf)?), None),
            BackendKind::Uio => (AnyBackend::Uio(UioBackend::open(bdf)?), None),
            BackendKind::Sim => {
                let sim = SimDevice::builder()
                    .bdf(bdf)
                    .kernel(match config.sim_kernel {
                        SimKernelSetting::Bare => SimKernel::Bare,
                        SimKernelSetting::VfioPci => SimKernel::VfioPci,
                    })
                    .build();
                let mut backend = sim.backend();
                // The "firmware's" COMMAND, as a real device would be found.
                backend
                    .config_write(PCI_COMMAND, Width::Word, u32::from(config.sim_command))
                    .map_err(backend_error("setting the simulated device's COMMAND"))?;
                (AnyBackend::Sim(backend), Some(sim))
            }
        };
        Self::arm(sysfs, config, backend, sim, binding, None)
    }

    /// Takes over a VMM's own VFIO device fd for one session
    /// ([`VfioBackend::from_device_fd`]): probed (read-only) and armed like
    /// a configured device, never bound, reset or written to at start.
    #[instrument(skip_all, fields(bdf = %config.bdf))]
    pub(crate) fn adopt(
        config: DeviceConfig,
        backend: VfioBackend,
    ) -> Result<(Arc<Self>, mpsc::UnboundedReceiver<Control>), DeviceError> {
        let Some(identity) = backend.identity() else {
            return Err(DeviceError::Unsupported {
                bdf: config.bdf,
                what: "only a handed-over device fd can be adopted for a session",
            });
        };
        let config = DeviceConfig {
            bind: false,
            reset: false,
            edu_test_hooks: false,
            ..config
        };
        Self::arm(
            &PciSysfs::default(),
            config,
            AnyBackend::Vfio(backend),
            None,
            None,
            Some(identity),
        )
    }

    /// Probes and arms an opened backend.
    fn arm(
        sysfs: &PciSysfs,
        config: DeviceConfig,
        mut backend: AnyBackend,
        sim: Option<SimDevice>,
        binding: Option<Binding>,
        handed_over: Option<DeviceIdentity>,
    ) -> Result<(Arc<Self>, mpsc::UnboundedReceiver<Control>), DeviceError> {
        let bdf = config.bdf;
        let backend_error = |op| move |source| DeviceError::Backend { bdf, op, source };
        let found_command = read_command_status(&mut backend)
            .map_err(backend_error("reading COMMAND"))?
            .command;
        let edu = if config.edu_test_hooks {
            Some(Self::edu_hooks(&mut backend)?)
        } else {
            None
        };
        let (masking, masking_evidence) = if config.probe {
            let (supported, verdict, evidence) = match &mut backend {
                // The daemon's own simulated device: no driver, no handler
                // yet, so the enumeration-time toggle test is safe.
                AnyBackend::Sim(b) => {
                    let support = crate::pci::intx::probe_masking(b)
                        .map_err(backend_error("probing INTx masking"))?;
                    (support.supported(), support.to_string(), "toggle-test")
                }
                // A bound device: read-only evidence, never a toggle under
                // its driver's live handler.
                _ => {
                    let v = sysfs.masking_verdict(bdf)?;
                    (v.supported, v.to_string(), v.source.evidence())
                }
            };
            if !supported {
                return Err(DeviceError::MaskingBroken { bdf, verdict });
            }
            info!(%verdict, evidence, "INTx masking probed");
            (verdict, Some(evidence))
        } else {
            ("not probed (probe = false)".to_owned(), None)
        };
        let metrics = Arc::new(DeviceMetrics::default());
        let sink = Arc::new(SessionSink::new(Arc::clone(&metrics)));
        let options = IntxOptions {
            watchdog: WatchdogOptions {
                detect_after: config.stuck_after,
                idle_interval: config.idle_interval,
                ..WatchdogOptions::default()
            },
            ..IntxOptions::default()
        };
        let engine = Arc::new(IntxDevice::with_options(
            backend,
            Arc::clone(&sink),
            options,
        )?);
        if config.reset {
            engine.reset()?;
            info!("reset at start");
        }
        let (control, rx) = mpsc::unbounded_channel();
        Ok((
            Arc::new(Self {
                config,
                engine,
                sink,
                sim,
                edu,
                metrics,
                found_command,
                masking,
                masking_evidence,
                handed_over,
                binding: Mutex::new(binding),
                held_operator: AtomicBool::new(false),
                session_ending: AtomicBool::new(false),
                held_storm: AtomicBool::new(false),
                control,
            }),
            rx,
        ))
    }

    /// The device's address.
    pub fn bdf(&self) -> Bdf {
        self.config.bdf
    }

    /// Maps an edu's BAR0 for the test hooks, enabling memory decoding
    /// first (the edu answers BAR accesses only then). COMMAND as found is
    /// read before, and restored at shutdown.
    fn edu_hooks(backend: &mut AnyBackend) -> Result<Arc<crate::vfio::edu::Edu>, DeviceError> {
        let bdf = backend.bdf();
        let AnyBackend::Vfio(vfio) = backend else {
            return Err(DeviceError::Backend {
                bdf,
                op: "edu test hooks (vfio devices only)",
                source: BackendError::NoIntx,
            });
        };
        let edu = crate::vfio::edu::Edu::enable(vfio)?;
        Ok(Arc::new(edu))
    }

    /// Counters.
    pub fn stats(&self) -> DeviceStats {
        DeviceStats {
            bdf: self.bdf().to_string(),
            engine: self.engine.stats().into(),
            daemon: self.metrics.snapshot(),
        }
    }

    /// The device's state.
    pub fn status(&self) -> DeviceStatus {
        let held = match (
            self.held_operator.load(Ordering::SeqCst),
            self.held_storm.load(Ordering::SeqCst),
        ) {
            (true, _) => Some("operator".to_owned()),
            (false, true) => Some("storm".to_owned()),
            _ => None,
        };
        DeviceStatus {
            bdf: self.bdf().to_string(),
            backend: self.config.backend,
            path: self.path_description().to_owned(),
            masking: self.masking.clone(),
            session: self.sink.attached() || self.session_ending.load(Ordering::SeqCst),
            held,
            found_command: self.found_command,
            bound_by_daemon: lock(&self.binding).as_ref().is_some_and(Binding::changed),
            in_reset: self.engine.is_blocked(),
            handed_over: self.handed_over.map(|i| i.to_string()),
            stats: self.stats(),
        }
    }

    /// The EOI path sessions on this device take now.
    pub fn path_description(&self) -> &'static str {
        if self.engine.is_kernel_bypass() {
            "kernel bypass (KVM resample eventfd -> vfio-pci check-and-unmask)"
        } else {
            "user-space (the daemon carries each EOI)"
        }
    }

    /// Starts the device's service task.
    pub(crate) fn spawn(
        self: &Arc<Self>,
        rx: mpsc::UnboundedReceiver<Control>,
    ) -> Result<tokio::task::JoinHandle<()>, DeviceError> {
        let trigger = self
            .engine
            .trigger()
            .try_clone()
            .and_then(crate::intx::sys::async_eventfd)
            .map_err(|e| DeviceError::Backend {
                bdf: self.bdf(),
                op: "registering the trigger eventfd",
                source: BackendError::os("eventfd", e),
            })?;
        let span = tracing::info_span!("device", bdf = %self.bdf());
        Ok(tokio::spawn(
            Task::new(Arc::clone(self))
                .run(trigger, rx)
                .instrument(span),
        ))
    }

    /// Attaches a session: interrupts go to `irqfd`, EOIs come from
    /// `resample`.
    pub async fn attach(&self, irqfd: EventFd, resample: EventFd) -> Result<(), AttachError> {
        let bdf = self.bdf();
        let (reply, rx) = oneshot::channel();
        self.control
            .send(Control::Attach {
                irqfd,
                resample,
                reply,
            })
            .map_err(|_| AttachError::TaskGone { bdf })?;
        rx.await.map_err(|_| AttachError::TaskGone { bdf })?
    }

    /// Resolves when the device's service task has stopped (the device was
    /// removed or the daemon is stopping).
    pub async fn gone(&self) {
        self.control.closed().await;
    }

    /// Detaches the session.
    pub fn detach(&self) {
        let _ = self.control.send(Control::Detach);
    }

    /// Masks INTx and holds it masked (operator hold).
    pub async fn hold(&self) -> Result<(), DeviceError> {
        self.request(|reply| Control::Hold { reply }).await
    }

    /// Lifts an operator hold.
    pub async fn release(&self) -> Result<(), DeviceError> {
        self.request(|reply| Control::Release { reply }).await
    }

    async fn request(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<(), DeviceError>>) -> Control,
    ) -> Result<(), DeviceError> {
        let bdf = self.bdf();
        let (reply, rx) = oneshot::channel();
        self.control
            .send(make(reply))
            .map_err(|_| DeviceError::TaskGone { bdf })?;
        rx.await.map_err(|_| DeviceError::TaskGone { bdf })?
    }

    /// Asks the service task to stop.
    pub(crate) fn stop(&self) {
        let _ = self.control.send(Control::Stop);
    }

    /// Resets through the gate (blocking: run it on the blocking pool).
    pub fn reset(&self) -> Result<(), IntxError> {
        let r = self.engine.reset();
        if r.is_err() {
            self.metrics
                .reset_failures
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        r
    }

    /// Hands the device back (blocking): INTx delivery stopped, COMMAND as
    /// found. The previous driver is restored by [`hand_back`], once the
    /// device is closed. A VMM's own device is only disarmed: its COMMAND
    /// is the VMM's guest's, which may have changed it during the session.
    #[instrument(skip_all, fields(bdf = %self.bdf()))]
    fn restore(&self) -> Result<Restored, DeviceError> {
        let bdf = self.bdf();
        let backend_error = |op| move |source| DeviceError::Backend { bdf, op, source };
        let handed_over = self.handed_over.is_some();
        let disarmed = self.engine.disarm();
        let written = if handed_over {
            Ok(())
        } else {
            self.engine.with_backend(|b| {
                b.config_write(PCI_COMMAND, Width::Word, u32::from(self.found_command))
            })
        };
        let now = match &self.sim {
            Some(sim) => Ok(sim.snapshot().command),
            None => self
                .engine
                .with_backend(read_command_status)
                .map(|cs| cs.command),
        };
        disarmed?;
        written.map_err(backend_error("restoring COMMAND"))?;
        let now = now.map_err(backend_error("reading COMMAND back"))?;
        Ok(Restored {
            found: if handed_over { now } else { self.found_command },
            now,
            driver_restored: false,
            handed_over,
        })
    }
}

/// How long [`hand_back`] waits for the last user of a device to let go
/// before it restores the driver.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Hands devices back (blocking): each is disarmed with COMMAND as found
/// and closed; then the drivers the daemon bound are restored. The order
/// matters: vfio-pci's remove waits until the device's user has closed it,
/// so unbinding a device still open would hang.
pub(crate) fn hand_back(
    devs: Vec<Arc<ManagedDevice>>,
) -> Vec<(Bdf, Result<Restored, DeviceError>)> {
    let mut out = Vec::with_capacity(devs.len());
    // Devices that must be closed before this returns: those whose driver
    // is restored, and a VMM's own device fds (the VMM may set INTx up
    // itself as soon as the daemon says it let go).
    let mut close = Vec::new();
    for dev in devs {
        let bdf = dev.bdf();
        let r = dev.restore();
        let binding = lock(&dev.binding).take().filter(Binding::changed);
        let handed_over = dev.handed_over.is_some();
        let engine = Arc::downgrade(&dev.engine);
        drop(dev);
        if binding.is_some() || handed_over {
            close.push((out.len(), bdf, engine, binding));
        }
        out.push((bdf, r));
    }
    for (i, bdf, engine, binding) in close {
        let deadline = std::time::Instant::now() + CLOSE_TIMEOUT;
        while engine.strong_count() > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let still_open = engine.strong_count() > 0;
        let rebind = binding.is_some();
        let restored = match binding {
            Some(_) if still_open => Err(DeviceError::StillOpen { bdf }),
            None if still_open => Err(DeviceError::FdStillHeld { bdf }),
            Some(binding) => PciSysfs::default()
                .unbind(&binding)
                .map_err(DeviceError::from),
            None => Ok(()),
        };
        if let Some((_, result)) = out.get_mut(i) {
            match (restored, result) {
                (Ok(()), Ok(r)) => r.driver_restored = rebind,
                (Ok(()), Err(_)) => {}
                (Err(e), result) => *result = Err(e),
            }
        }
    }
    out
}

/// Storm detection window: short, so that a storm costs at most this much
/// of the daemon's time before it is masked (and per retry).
const STORM_WINDOW: Duration = Duration::from_millis(20);
/// A storm within this long after the previous one's back-off counts as
/// the same storm going on (the back-off doubles).
const STORM_MEMORY: Duration = Duration::from_secs(2);
/// Upper bound of the storm back-off.
const STORM_MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Logs at most three messages per five seconds per device.
pub(crate) fn rate_limit() -> LogLimiter {
    LogLimiter::new(Duration::from_secs(5), 3)
}

/// The counts storm detection compares between windows.
#[derive(Debug, Clone, Copy, Default)]
struct StormCounts {
    /// Re-injections: an EOI found the device still asserting.
    reinjected: u64,
    /// Host interrupts the device did not assert (a shared line).
    not_mine: u64,
    /// EOIs that found the line deasserted: someone handled the device.
    cleared: u64,
}

impl StormCounts {
    fn of(s: &crate::intx::IntxStats) -> Self {
        Self {
            reinjected: s.reinjected,
            not_mine: s.not_mine,
            cleared: s.eois.saturating_sub(s.reinjected + s.spurious_eois),
        }
    }
}

struct Storm {
    window_start: Instant,
    base: StormCounts,
    consecutive: u32,
    /// When the last storm was masked and its back-off.
    last: Option<(Instant, Duration)>,
    retry_at: Option<Instant>,
}

struct Task {
    dev: Arc<ManagedDevice>,
    next_tick: Instant,
    storm: Storm,
    held_since: Option<Instant>,
    errors: LogLimiter,
    eoi_log: LogLimiter,
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
    fn new(dev: Arc<ManagedDevice>) -> Self {
        let now = Instant::now();
        Self {
            dev,
            next_tick: now,
            storm: Storm {
                window_start: now,
                base: StormCounts::default(),
                consecutive: 0,
                last: None,
                retry_at: None,
            },
            held_since: None,
            errors: rate_limit(),
            eoi_log: rate_limit(),
        }
    }

    fn holding(&self) -> bool {
        self.held_since.is_some()
    }

    async fn run(mut self, trigger: AsyncFd<EventFd>, mut rx: mpsc::UnboundedReceiver<Control>) {
        let mut resample: Option<AsyncFd<EventFd>> = None;
        debug!("service task running");
        loop {
            let holding = self.holding();
            let storm_retry = self.storm.retry_at;
            tokio::select! {
                biased;
                msg = rx.recv() => match msg {
                    None | Some(Control::Stop) => break,
                    Some(Control::Attach { irqfd, resample: fd, reply }) => {
                        let _ = reply.send(self.attach(&mut resample, irqfd, fd).await);
                    }
                    Some(Control::Detach) => {
                        resample = None;
                        self.detach().await;
                    }
                    Some(Control::Hold { reply }) => {
                        let r = self.hold().await;
                        if r.is_ok() {
                            self.dev.held_operator.store(true, Ordering::SeqCst);
                        }
                        let _ = reply.send(r);
                    }
                    Some(Control::Release { reply }) => {
                        self.dev.held_operator.store(false, Ordering::SeqCst);
                        let r = if self.dev.held_storm.load(Ordering::SeqCst) {
                            Ok(())
                        } else {
                            self.release().await
                        };
                        let _ = reply.send(r);
                    }
                },
                _ = tokio::time::sleep_until(storm_retry.unwrap_or_else(Instant::now)), if storm_retry.is_some() => {
                    self.storm.retry_at = None;
                    self.dev.held_storm.store(false, Ordering::SeqCst);
                    if !self.dev.held_operator.load(Ordering::SeqCst) {
                        info!("retrying the line after the storm back-off");
                        if let Err(e) = self.release().await {
                            self.report(&e);
                        }
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
                        let drained = guard.get_inner().read();
                        guard.clear_ready();
                        if let Err(e) = drained {
                            if e.kind() != io::ErrorKind::WouldBlock {
                                warn!(error = %e, "reading the resample eventfd failed; detaching the session");
                                resample = None;
                                self.detach().await;
                                continue;
                            }
                        }
                        if let Some(t) = self.dev.sink.take_in_service() {
                            self.dev.metrics.round_trip.record(t.elapsed());
                        }
                        let r = self.dev.engine.on_guest_eoi();
                        self.after_event(r).await;
                    }
                    Err(e) => {
                        warn!(error = %e, "polling the resample eventfd failed; detaching the session");
                        resample = None;
                        self.detach().await;
                    }
                },
                _ = tokio::time::sleep_until(self.next_tick), if !holding => self.tick(),
            }
        }
        debug!("service task stopped");
    }

    async fn attach(
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

    async fn detach(&mut self) {
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

    fn report(&mut self, e: &dyn std::error::Error) {
        if let Some(suppressed) = self.errors.admit() {
            warn!(bdf = %self.dev.bdf(), suppressed, error = %crate::error_chain(e), "servicing the device failed");
        }
    }

    async fn after_event(&mut self, result: Result<crate::intx::Serviced, IntxError>) {
        if let Err(e) = result {
            self.report(&e);
        }
        let threshold = self.dev.config.storm_threshold;
        if threshold == 0 {
            return;
        }
        let now = Instant::now();
        let counts = StormCounts::of(&self.dev.engine.stats());
        let limit = (u64::from(threshold) * STORM_WINDOW.as_millis() as u64 / 1000).max(1);
        if now.duration_since(self.storm.window_start) >= STORM_WINDOW {
            self.storm.window_start = now;
            self.storm.base = counts;
            return;
        }
        // The kernel's "nobody cared", in this engine's terms: host
        // interrupts nobody claims on a shared line, or a line that
        // re-asserts after every EOI of the window with none finding it
        // handled (a fast device whose guest does handle it clears the
        // line between interrupts, and is not a storm).
        let base = self.storm.base;
        let not_mine = counts.not_mine.saturating_sub(base.not_mine);
        let reinjected = counts.reinjected.saturating_sub(base.reinjected);
        let cleared = counts.cleared.saturating_sub(base.cleared);
        if not_mine > limit || (reinjected > limit && cleared == 0) {
            self.storm_detected(now).await;
        }
    }

    async fn storm_detected(&mut self, now: Instant) {
        let going_on = self
            .storm
            .last
            .is_some_and(|(at, backoff)| now.duration_since(at) < backoff + STORM_MEMORY);
        if !going_on {
            self.storm.consecutive = 0;
        }
        let backoff = self
            .dev
            .config
            .storm_backoff
            .saturating_mul(1 << self.storm.consecutive.min(16))
            .min(STORM_MAX_BACKOFF);
        self.storm.consecutive += 1;
        self.storm.last = Some((now, backoff));
        self.dev
            .metrics
            .storms
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.dev.held_storm.store(true, Ordering::SeqCst);
        warn!(
            bdf = %self.dev.bdf(),
            threshold = self.dev.config.storm_threshold,
            ?backoff,
            storms = self.storm.consecutive,
            "interrupt storm: the line keeps asserting and nobody handles it; masked, retrying later"
        );
        self.storm.retry_at = Some(now + backoff);
        if let Err(e) = self.hold().await {
            self.report(&e);
        }
    }

    /// Masks the line; the task stops servicing it until released.
    async fn hold(&mut self) -> Result<(), DeviceError> {
        if self.holding() {
            return Ok(());
        }
        if self.dev.engine.is_kernel_bypass() {
            return Err(DeviceError::Unsupported {
                bdf: self.dev.bdf(),
                what: "cannot hold INTx masked while a session runs on the kernel bypass (the \
                       kernel unmasks at each EOI); configure path = \"userspace\" to hold it",
            });
        }
        self.held_since = Some(Instant::now());
        let engine = Arc::clone(&self.dev.engine);
        let bdf = self.dev.bdf();
        tokio::task::spawn_blocking(move || engine.with_backend(|b| b.intx_mask()))
            .await
            .map_err(|source| DeviceError::Join {
                bdf,
                op: "masking",
                source,
            })?
            .map_err(|source| DeviceError::Backend {
                bdf,
                op: "masking INTx",
                source,
            })
    }

    /// Lifts the mask (re-sync from the state machine and STATUS) and
    /// resumes servicing.
    async fn release(&mut self) -> Result<(), DeviceError> {
        let Some(since) = self.held_since.take() else {
            return Ok(());
        };
        self.dev.metrics.add_held(since.elapsed());
        let now = Instant::now();
        self.storm.window_start = now;
        self.storm.base = StormCounts::of(&self.dev.engine.stats());
        self.next_tick = now;
        let engine = Arc::clone(&self.dev.engine);
        let bdf = self.dev.bdf();
        tokio::task::spawn_blocking(move || engine.resync())
            .await
            .map_err(|source| DeviceError::Join {
                bdf,
                op: "re-sync",
                source,
            })??;
        Ok(())
    }

    fn tick(&mut self) {
        let now = Instant::now();
        let (_, delay) = self.dev.engine.watchdog_tick(now.into_std());
        self.next_tick = now + delay;
        let timeout = self.dev.config.eoi_timeout;
        if timeout.is_zero() || !self.dev.sink.attached() || self.dev.engine.is_kernel_bypass() {
            return;
        }
        if let Some(since) = self.dev.sink.in_service_since() {
            let waited = since.elapsed();
            if waited >= timeout {
                self.dev
                    .metrics
                    .eoi_timeouts
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if let Some(suppressed) = self.eoi_log.admit() {
                    warn!(
                        ?waited,
                        suppressed,
                        "interrupt in service with no EOI from the guest; recovering as if EOIed"
                    );
                }
                self.dev.sink.take_in_service();
                if let Err(e) = self.dev.engine.on_guest_eoi() {
                    self.report(&e);
                }
            } else {
                self.next_tick = self.next_tick.min(now + (timeout - waited));
            }
        }
    }
}
