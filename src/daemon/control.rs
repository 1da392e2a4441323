//! The control requests: one request in, one handler, one answer out; and
//! the one mapping of errors to what they mean for whoever asked
//! ([`Kind`]: the wire's [`ErrorKind`] and the CLI's exit code), by a
//! `kind()` on each error. Sessions, which need a connection of their own,
//! are the server's.

use std::io;
use std::sync::Arc;

use crate::daemon::client::ClientError;
use crate::daemon::config::{BackendKind, ConfigError};
use crate::daemon::metrics::DeviceStats;
#[cfg(feature = "testkit")]
use crate::daemon::protocol::SimTotals;
#[cfg(feature = "testkit")]
use crate::daemon::protocol::{AckReply, RaiseReply};
use crate::daemon::protocol::{
    ErrorKind, HoldReply, LineReport, MetricsReply, PingReply, ProbeReport, Request, ResetReply,
    Response,
};
use crate::daemon::registry::Daemon;
use crate::daemon::service::{AttachError, DeviceError, ManagedDevice};
use crate::daemon::{exit, metrics, server, DaemonError};
use crate::intx::IntxError;
use crate::pci::sysfs::SysfsError;
use crate::pci::Bdf;
use crate::uio::UioError;
use crate::vfio::VfioError;

/// What a failure means to whoever asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The request or its descriptors are wrong.
    BadRequest,
    /// The configuration is invalid.
    Config,
    /// No such device, or not the daemon's.
    NotFound,
    /// Not allowed.
    PermissionDenied,
    /// Busy (a reset holds the device, a session is attached); retry.
    Busy,
    /// Not possible in the device's state or this build.
    Unsupported,
    /// The daemon is not running or does not answer.
    Unreachable,
    /// Anything else: it could not be done.
    Failed,
}

impl Kind {
    /// The kind on the wire.
    pub fn wire(self) -> ErrorKind {
        match self {
            Kind::BadRequest => ErrorKind::BadRequest,
            Kind::NotFound => ErrorKind::NotFound,
            Kind::PermissionDenied => ErrorKind::PermissionDenied,
            Kind::Busy => ErrorKind::Busy,
            Kind::Unsupported => ErrorKind::Unsupported,
            Kind::Config | Kind::Unreachable | Kind::Failed => ErrorKind::Failed,
        }
    }

    /// The process exit code of a command that failed locally with it.
    pub fn exit_code(self) -> u8 {
        match self {
            Kind::Config => exit::CONFIG,
            Kind::NotFound => exit::NOT_FOUND,
            Kind::PermissionDenied => exit::PERMISSION,
            Kind::Busy => exit::BUSY,
            Kind::Unreachable => exit::UNREACHABLE,
            Kind::BadRequest | Kind::Unsupported | Kind::Failed => exit::RUNTIME,
        }
    }
}

/// An error that knows its [`Kind`].
pub trait HasKind: std::error::Error + 'static {
    /// What the error means to whoever asked.
    fn kind(&self) -> Kind;
}

/// The kind an OS error in `e`'s chain decides (permission, busy), for
/// errors whose own variants do not.
fn os_kind(e: &(dyn std::error::Error + 'static)) -> Kind {
    let mut cause = Some(e);
    while let Some(e) = cause {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            if io.kind() == io::ErrorKind::PermissionDenied
                || io.raw_os_error() == Some(libc::EPERM)
            {
                return Kind::PermissionDenied;
            }
            if matches!(io.raw_os_error(), Some(libc::EBUSY | libc::EAGAIN)) {
                return Kind::Busy;
            }
        }
        cause = e.source();
    }
    Kind::Failed
}

impl HasKind for io::Error {
    fn kind(&self) -> Kind {
        os_kind(self)
    }
}

impl HasKind for ConfigError {
    fn kind(&self) -> Kind {
        Kind::Config
    }
}

impl HasKind for SysfsError {
    fn kind(&self) -> Kind {
        match self {
            SysfsError::NoDevice { .. } => Kind::NotFound,
            _ => os_kind(self),
        }
    }
}

impl HasKind for VfioError {
    fn kind(&self) -> Kind {
        match self {
            VfioError::DeviceNotFound { .. } => Kind::NotFound,
            VfioError::NoPermission { .. } => Kind::PermissionDenied,
            VfioError::GroupBusy { .. } => Kind::Busy,
            VfioError::NotADeviceFd { .. }
            | VfioError::Unidentified
            | VfioError::NotThisDevice { .. } => Kind::BadRequest,
            VfioError::Sysfs(e) => e.kind(),
            _ => os_kind(self),
        }
    }
}

impl HasKind for UioError {
    fn kind(&self) -> Kind {
        match self {
            UioError::Sysfs(e) => e.kind(),
            _ => os_kind(self),
        }
    }
}

impl HasKind for IntxError {
    fn kind(&self) -> Kind {
        if self.backend_error().is_some_and(|b| b.is_transient()) {
            Kind::Busy
        } else {
            os_kind(self)
        }
    }
}

impl HasKind for DeviceError {
    fn kind(&self) -> Kind {
        match self {
            DeviceError::Sysfs(e) => e.kind(),
            DeviceError::Vfio(e) => e.kind(),
            DeviceError::Uio(e) => e.kind(),
            DeviceError::Intx(e) => e.kind(),
            DeviceError::Unsupported { .. } => Kind::Unsupported,
            DeviceError::Starting { source, .. } => source.kind(),
            _ => os_kind(self),
        }
    }
}

impl HasKind for AttachError {
    fn kind(&self) -> Kind {
        match self {
            AttachError::Busy { .. } | AttachError::Held { .. } => Kind::Busy,
            _ => Kind::Failed,
        }
    }
}

impl HasKind for ClientError {
    fn kind(&self) -> Kind {
        match self {
            ClientError::NotRunning { .. } | ClientError::NotAnswering { .. } => Kind::Unreachable,
            _ => os_kind(self),
        }
    }
}

impl HasKind for DaemonError {
    fn kind(&self) -> Kind {
        match self {
            DaemonError::Config(e) => e.kind(),
            DaemonError::MetricsListen { .. } => Kind::Config,
            DaemonError::Device(e) => e.kind(),
            DaemonError::AlreadyRunning { .. } | DaemonError::Locked { .. } => Kind::Busy,
            DaemonError::UnsafeDirectory { .. } => Kind::PermissionDenied,
            _ => os_kind(self),
        }
    }
}

/// The answer for a failed request.
pub(crate) fn failure(e: &impl HasKind) -> Response {
    Response::error(e.kind().wire(), crate::error_chain(e))
}

/// A simulated device's hardware side as the test hooks drive it.
#[cfg(feature = "testkit")]
struct SimSide(crate::sim::SimDevice);

#[cfg(feature = "testkit")]
impl crate::kvm::assign::DeviceSide for SimSide {
    fn raise(&self) {
        self.0.raise();
    }
    fn ack(&self) -> bool {
        self.0.ack()
    }
}

/// Who sent a request (SO_PEERCRED) and its role: an operator (root, the
/// daemon's uid, the admin group) may act on any device the daemon owns; a
/// VMM (the socket group) reads everything but masks, unmasks, resets and
/// drives test hooks only on the device of a session it holds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer {
    pub(crate) uid: u32,
    pub(crate) pid: Option<i32>,
    pub(crate) operator: bool,
}

impl Daemon {
    /// Answers one control request (sessions are handled by the server).
    pub(crate) async fn handle(self: &Arc<Self>, request: Request, peer: &Peer) -> Response {
        if let Some(bdf) = request.acts_on() {
            if let Err(r) = self.may_act(bdf, peer) {
                return r;
            }
        }
        match request {
            Request::Ping => Response::ok(PingReply {
                pid: std::process::id(),
            }),
            Request::Status => {
                let mut status = self.status();
                // Who shares each real device's line: a sysfs scan, off the
                // runtime.
                let devices = std::mem::take(&mut status.devices);
                match tokio::task::spawn_blocking(move || {
                    devices
                        .into_iter()
                        .map(|mut d| {
                            if d.backend != BackendKind::Sim {
                                d.line = Some(LineReport::of(d.bdf));
                            }
                            d
                        })
                        .collect()
                })
                .await
                {
                    Ok(devices) => status.devices = devices,
                    Err(e) => {
                        return Response::error(
                            ErrorKind::Failed,
                            format!("status: the line scan could not run: {e}"),
                        )
                    }
                }
                Response::ok(status)
            }
            Request::Stats { bdf } => {
                let devices = match bdf {
                    None => self.all(),
                    Some(bdf) => match self.owned(bdf) {
                        Ok(d) => vec![d],
                        Err(r) => return r,
                    },
                };
                Response::ok(
                    devices
                        .iter()
                        .map(|d| d.stats())
                        .collect::<Vec<DeviceStats>>(),
                )
            }
            Request::Metrics => Response::ok(MetricsReply {
                text: metrics::render(self),
            }),
            Request::Reset { bdf } => {
                let dev = match self.owned(bdf) {
                    Ok(d) => d,
                    Err(r) => return r,
                };
                let worker = Arc::clone(&dev);
                match tokio::task::spawn_blocking(move || worker.reset()).await {
                    Ok(Ok(())) => Response::ok(ResetReply {
                        bdf: dev.bdf(),
                        reset: true,
                    }),
                    Ok(Err(e)) => failure(&e),
                    Err(e) => Response::error(
                        ErrorKind::Failed,
                        format!("{bdf}: reset could not run: {e}"),
                    ),
                }
            }
            Request::Mask { bdf } => self.hold(bdf, true).await,
            Request::Unmask { bdf } => self.hold(bdf, false).await,
            Request::Probe { bdf } => self.probe(bdf).await,
            #[cfg(not(feature = "testkit"))]
            Request::SimRaise { bdf, .. } | Request::SimAck { bdf } => Response::error(
                ErrorKind::Unsupported,
                format!("{bdf}: test hooks need vfio-intx built with the testkit feature"),
            ),
            #[cfg(feature = "testkit")]
            Request::SimRaise { bdf, count } => {
                let count = count.min(1_000_000);
                match self
                    .test_hook(bdf, move |side| {
                        for _ in 0..count {
                            side.raise();
                        }
                        true
                    })
                    .await
                {
                    Ok(_) => Response::ok(RaiseReply {
                        raised: count,
                        totals: self.sim_totals(bdf),
                    }),
                    Err(r) => r,
                }
            }
            #[cfg(feature = "testkit")]
            Request::SimAck { bdf } => match self.test_hook(bdf, |side| side.ack()).await {
                Ok(acked) => Response::ok(AckReply {
                    acked,
                    totals: self.sim_totals(bdf),
                }),
                Err(r) => r,
            },
            Request::Restart => {
                if !peer.operator {
                    return Response::error(
                        ErrorKind::PermissionDenied,
                        format!(
                            "uid {} may not restart the daemon (operators only: root, the \
                             daemon's uid, the admin-group)",
                            peer.uid
                        ),
                    );
                }
                self.prepare_restart().await
            }
            Request::Session { .. } => Response::error(
                ErrorKind::BadRequest,
                "sessions are started on a connection of their own",
            ),
        }
    }

    /// A simulated device's totals (none for other devices).
    #[cfg(feature = "testkit")]
    fn sim_totals(&self, bdf: Bdf) -> Option<SimTotals> {
        let snap = self.device(bdf)?.sim.as_ref()?.snapshot();
        Some(SimTotals {
            raised_total: snap.raised,
            acked_total: snap.acked,
        })
    }

    /// Refuses a VMM acting on a device that is not its session's.
    fn may_act(&self, bdf: Bdf, peer: &Peer) -> Result<(), Response> {
        if peer.operator {
            return Ok(());
        }
        let dev = self.owned(bdf)?;
        let owner = self
            .session_owners
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&dev.bdf())
            .copied();
        if peer.pid.is_some() && owner == Some(peer.pid) {
            return Ok(());
        }
        Err(Response::error(
            ErrorKind::PermissionDenied,
            format!(
                "{}: uid {} (pid {}) may act only on the device of its own VMM session; \
                 acting on other devices needs root or the admin-group",
                dev.bdf(),
                peer.uid,
                peer.pid.map_or("unknown".to_owned(), |p| p.to_string())
            ),
        ))
    }

    fn owned(&self, bdf: Bdf) -> Result<Arc<ManagedDevice>, Response> {
        self.device(bdf).ok_or_else(|| server::not_owned(bdf))
    }

    /// Runs a test hook (raise, ack) on a simulated device, or on an edu
    /// with `edu-test-hooks` — there under the gate, so that the BAR
    /// access never lands inside a reset, which the edu would drop.
    #[cfg(feature = "testkit")]
    async fn test_hook(
        &self,
        bdf: Bdf,
        hook: impl FnOnce(&dyn crate::kvm::assign::DeviceSide) -> bool + Send + 'static,
    ) -> Result<bool, Response> {
        let dev = self.owned(bdf)?;
        if let Some(sim) = dev.sim.clone() {
            return Ok(hook(&SimSide(sim)));
        }
        let Some(edu) = dev.edu.clone() else {
            return Err(Response::error(
                ErrorKind::Unsupported,
                format!(
                    "{}: test hooks need a simulated device or an edu with edu-test-hooks",
                    dev.bdf()
                ),
            ));
        };
        let engine = Arc::clone(&dev.engine);
        tokio::task::spawn_blocking(move || engine.with_backend(|_| hook(&*edu)))
            .await
            .map_err(|e| Response::error(ErrorKind::Failed, format!("{bdf}: test hook: {e}")))
    }

    async fn hold(&self, bdf: Bdf, mask: bool) -> Response {
        let dev = match self.owned(bdf) {
            Ok(d) => d,
            Err(r) => return r,
        };
        let r = if mask {
            dev.hold().await
        } else {
            dev.release().await
        };
        match r {
            Ok(()) => {
                // An operator hold outlives the daemon's restart.
                crate::daemon::resume::record_hold(&dev, mask);
                Response::ok(HoldReply {
                    bdf: dev.bdf(),
                    held: mask,
                })
            }
            Err(e) => failure(&e),
        }
    }

    async fn probe(&self, bdf: Bdf) -> Response {
        if let Some(dev) = self.device(bdf) {
            let line = if dev.config.backend == BackendKind::Sim {
                None
            } else {
                match tokio::task::spawn_blocking(move || LineReport::of(bdf)).await {
                    Ok(line) => Some(line),
                    Err(e) => {
                        return Response::error(
                            ErrorKind::Failed,
                            format!("{bdf}: probe: the line scan could not run: {e}"),
                        )
                    }
                }
            };
            return Response::ok(ProbeReport {
                bdf,
                // Devices whose masking is broken are refused at start.
                supported: dev.config.probe.then_some(true),
                verdict: dev.masking.clone(),
                evidence: dev.masking_evidence.map(str::to_owned),
                owned: true,
                line,
            });
        }
        // Read-only: someone else may be using a device the daemon does
        // not own; nothing is toggled.
        let verdict = tokio::task::spawn_blocking(move || {
            crate::pci::sysfs::masking_verdict_read_only(bdf).map(|v| (v, LineReport::of(bdf)))
        });
        match verdict.await {
            Ok(Ok((v, line))) => Response::ok(ProbeReport {
                bdf,
                supported: Some(v.supported),
                verdict: v.to_string(),
                evidence: Some(v.source.evidence().to_owned()),
                owned: false,
                line: Some(line),
            }),
            Ok(Err(e)) => failure(&e),
            Err(e) => Response::error(
                ErrorKind::Failed,
                format!("{bdf}: probe could not run: {e}"),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_says_its_kind_for_the_wire_and_the_exit_code() {
        let bdf: Bdf = "0000:00:04.0".parse().unwrap_or_else(|_| unreachable!());
        let busy = AttachError::Busy { bdf };
        assert_eq!(busy.kind().wire(), ErrorKind::Busy);
        let refused = DeviceError::Unsupported { bdf, what: "no" };
        assert_eq!(refused.kind().wire(), ErrorKind::Unsupported);
        let gone = DeviceError::Sysfs(SysfsError::NoDevice {
            bdf,
            path: "/sys/bus/pci/devices/0000:00:04.0".into(),
        });
        assert_eq!(gone.kind().exit_code(), exit::NOT_FOUND);
        assert_eq!(gone.kind().wire(), ErrorKind::NotFound);
        let eperm = DaemonError::Runtime {
            op: "x",
            source: io::Error::from_raw_os_error(libc::EPERM),
        };
        assert_eq!(eperm.kind().exit_code(), exit::PERMISSION);
        let ebusy = io::Error::from_raw_os_error(libc::EBUSY);
        assert_eq!(HasKind::kind(&ebusy), Kind::Busy);
        let other = DaemonError::NoSuchGroup {
            key: "socket-group",
            name: "kvm".into(),
        };
        assert_eq!(other.kind().exit_code(), exit::RUNTIME);
    }
}
