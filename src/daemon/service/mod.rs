//! One device the daemon owns: the handle the rest of the daemon holds
//! ([`ManagedDevice`]: status, counters, requests to its task), its errors
//! and its control messages. The device's concerns are one file each:
//! - `lifecycle.rs`: bring-up (bind, open or adopt, probe, arm, reset) and
//!   hand-back (disarm, COMMAND as found, the previous driver);
//! - `session.rs`: the session sink and attaching, detaching and ending a
//!   VMM's session;
//! - `health.rs`: storms, EOI timeouts and operator holds as one sans-IO
//!   state machine;
//! - `task.rs`: the select loop that pumps events into the engine and the
//!   health policy and carries out its actions.

mod health;
mod lifecycle;
mod session;
mod task;

/// A device's state for `status` (a wire type, in the protocol).
pub use crate::daemon::protocol::DeviceStatus;
pub(crate) use lifecycle::{hand_back, vmm_device_names};
pub use session::SessionSink;

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;
use vmm_sys_util::eventfd::EventFd;

use crate::backend::BackendError;
use crate::daemon::backend::AnyBackend;
use crate::daemon::config::DeviceConfig;
use crate::daemon::metrics::{DeviceMetrics, DeviceStats};
use crate::intx::{IntxDevice, IntxError};
use crate::pci::sysfs::{Binding, SysfsError};
use crate::pci::Bdf;
use crate::ratelimit::LogLimiter;
#[cfg(feature = "testkit")]
use crate::sim::SimDevice;
use crate::uio::UioError;
use crate::vfio::handover::DeviceIdentity;
use crate::vfio::VfioError;

use task::Task;

/// Why a device could not be brought up, driven or handed back. Every
/// message names the device.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
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
    /// A configured device could not be brought up at start.
    #[error("starting device {bdf}")]
    Starting {
        /// The device.
        bdf: Bdf,
        /// Why.
        #[source]
        source: Box<DeviceError>,
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
#[non_exhaustive]
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

/// The simulated device's hardware side (test kit).
#[cfg(feature = "testkit")]
pub(crate) type SimHandle = SimDevice;
/// Without the test kit there are no simulated devices.
#[cfg(not(feature = "testkit"))]
pub(crate) type SimHandle = std::convert::Infallible;
/// An edu's BAR0 for the test hooks (test kit).
#[cfg(feature = "testkit")]
pub(crate) type EduHandle = crate::vfio::edu::Edu;
/// Without the test kit there are no edu test hooks.
#[cfg(not(feature = "testkit"))]
pub(crate) type EduHandle = std::convert::Infallible;

/// A device the daemon owns.
pub struct ManagedDevice {
    /// Its configuration.
    pub config: DeviceConfig,
    /// The engine.
    pub engine: Arc<IntxDevice<AnyBackend>>,
    /// Where interrupts go.
    pub sink: Arc<SessionSink>,
    /// The simulated device's hardware side (sim backend only).
    // Without the test kit the type is uninhabited: always `None`.
    #[cfg_attr(not(feature = "testkit"), allow(dead_code))]
    pub sim: Option<SimHandle>,
    /// An edu's BAR0 (`edu-test-hooks`): raise and acknowledge for tests.
    #[cfg_attr(not(feature = "testkit"), allow(dead_code))]
    pub edu: Option<Arc<EduHandle>>,
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
    /// A session's end is being processed: the VMM's irqfd is already
    /// detached but the device is not back on its own wiring yet.
    session_ending: AtomicBool,
    /// Resumed after the daemon's restart with an interrupt in service
    /// (the device masked and asserting): the next session attach waits
    /// for its EOI instead of re-sending it (`session.rs`).
    resumed_in_service: AtomicBool,
    /// Resumed after the daemon's restart on the kernel bypass as the
    /// kernel had it wired ([`crate::intx::IntxDevice::with_adopted_bypass`]): the
    /// resumed session's attach takes that wiring as it is (`session.rs`).
    /// Cleared when that session is forgotten instead.
    pub(crate) resumed_on_bypass: AtomicBool,
    control: mpsc::UnboundedSender<Control>,
}

impl std::fmt::Debug for ManagedDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagedDevice")
            .field("bdf", &self.config.bdf)
            .finish_non_exhaustive()
    }
}

impl ManagedDevice {
    /// The device's address.
    pub fn bdf(&self) -> Bdf {
        self.config.bdf
    }

    /// Counters.
    pub fn stats(&self) -> DeviceStats {
        DeviceStats {
            bdf: self.bdf().to_string(),
            engine: self.engine.stats().into(),
            daemon: self.metrics.snapshot(),
        }
    }

    /// The gauges an alert needs, at `now`; never waits for the device.
    pub fn gauges(&self, now: std::time::Instant) -> crate::daemon::metrics::DeviceGauges {
        let masked_since = match (self.sink.in_service_since(), self.metrics.held_since()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        crate::daemon::metrics::DeviceGauges {
            bdf: self.bdf().to_string(),
            masked_since,
            stuck: self.metrics.stuck(now),
            bypass: self.engine.is_kernel_bypass(),
            verdict: if self.masking_evidence.is_some() {
                "masking"
            } else {
                "not-probed"
            },
            evidence: self.masking_evidence.unwrap_or("none"),
            session: self.sink.attached(),
        }
    }

    /// The device's state.
    pub fn status(&self) -> DeviceStatus {
        let held = self.engine.hold_reason().map(str::to_owned);
        DeviceStatus {
            bdf: self.bdf(),
            backend: self.config.backend,
            path: self.path_description().to_owned(),
            masking: self.masking.clone(),
            session: self.sink.attached() || self.session_ending.load(Ordering::SeqCst),
            held,
            found_command: self.found_command,
            bound_by_daemon: lock(&self.binding).as_ref().is_some_and(Binding::changed),
            in_reset: self.engine.is_blocked(),
            handed_over: self.handed_over.map(|i| i.to_string()),
            // Filled by the control handler, off the runtime (a sysfs scan).
            line: None,
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
}

/// Logs at most three messages per five seconds per device.
pub(crate) fn rate_limit() -> LogLimiter {
    LogLimiter::new(Duration::from_secs(5), 3)
}
