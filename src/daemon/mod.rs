//! `vfio-intx daemon`: owns the configured devices and services their INTx
//! on a tokio runtime, with a control socket for operators and VMMs.
//!
//! - [`config`]: the TOML configuration.
//! - [`protocol`]: the control socket's frames and messages.
//! - `server`: the control socket (peer credentials, client bound, timeouts,
//!   `SCM_RIGHTS` sessions).
//! - [`service`]: one device: bring-up, its service task, hand-back.
//! - [`metrics`]: per-device metrics and the Prometheus text format.
//! - [`systemd`]: service notification.
//! - [`client`]: a synchronous client (the CLI, tests, VMMs).
//! - [`cli`]: the operator commands.
//!
//! Lifecycle: load the configuration (an error starts nothing), bring every
//! device up (bind, open, probe, reset, arm), open the control socket, then
//! READY=1. SIGHUP reloads (devices added and removed, unchanged ones left
//! alone); SIGTERM or SIGINT hands every device back (INTx delivery
//! stopped, COMMAND as found, the previous driver restored) and exits.
//!
//! Sessions come in two forms, each on a connection of its own that lasts
//! as long as the session:
//!
//! - A VMM names a device the daemon owns and passes its KVM irqfd and
//!   resample eventfd.
//! - A VMM that opened the device through VFIO itself passes its device fd
//!   first (`"vfio-device-fd": true`, with the address it claims and an
//!   optional EOI `path`). The daemon matches the fd to its address
//!   ([`crate::vfio::handover`]: fdinfo, hot-reset scope, config header;
//!   a contradicted claim is refused), lists the device for the session's
//!   length, and at its end stops INTx delivery and closes its copy of the
//!   fd, leaving COMMAND and everything else to the VMM.
//!
//! Either way the daemon wires the irqfd and resample eventfd to the
//! device (the kernel bypass where the path allows it, else the user-space
//! EOI path) until the connection closes or the VMM dies. For simulated
//! devices, `sim-raise` makes the device interrupt and `sim-ack` is the
//! guest driver's acknowledgement (the BAR write a real ISR does), so a VMM
//! in a test can run a real KVM guest against a daemon-owned simulated
//! device.

pub mod backend;
pub mod cli;
pub mod client;
pub mod config;
mod example;
pub mod metrics;
pub mod protocol;
mod server;
pub mod service;
mod sys;
pub mod systemd;

pub use server::{ProbeReport, SessionReport};

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

use crate::daemon::config::{Config, ConfigError, DeviceConfig};
use crate::daemon::metrics::DeviceStats;
use crate::daemon::protocol::{ErrorKind, Request, Response};
use crate::daemon::service::{DeviceError, DeviceStatus, ManagedDevice};
use crate::daemon::systemd::Notifier;
use crate::pci::Bdf;

/// Process exit codes of `vfio-intx` (daemon and CLI).
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// The operation failed (or, for `demo`, broke a promise).
    pub const FAILED: u8 = 1;
    /// Bad command line (clap's code).
    pub const USAGE: u8 = 2;
    /// A runtime error: the daemon or command could not run.
    pub const RUNTIME: u8 = 3;
    /// The configuration is invalid.
    pub const CONFIG: u8 = 4;
    /// The device does not exist or is not the daemon's.
    pub const NOT_FOUND: u8 = 5;
    /// Permission denied (files, devices, or the daemon's socket).
    pub const PERMISSION: u8 = 6;
    /// The daemon is not running or not reachable (commands that need it).
    pub const UNREACHABLE: u8 = 7;
    /// The device is busy; retrying later may succeed.
    pub const BUSY: u8 = 8;
}

/// Why the daemon could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A device could not be brought up.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The async runtime or signal handling could not be set up.
    #[error("{op} failed")]
    Runtime {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The control socket could not be set up.
    #[error("{}: {op} failed", .path.display())]
    Socket {
        /// The socket.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Another daemon answers on the socket.
    #[error("{}: another vfio-intx daemon is already listening", .path.display())]
    AlreadyRunning {
        /// The socket.
        path: PathBuf,
    },
    /// The configured socket group does not exist.
    #[error("socket-group {name:?} does not exist")]
    NoSuchGroup {
        /// The group.
        name: String,
    },
    /// Some devices could not be handed back at shutdown.
    #[error("{failed} device(s) could not be restored at shutdown")]
    Restore {
        /// How many.
        failed: usize,
    },
}

/// The error a transparent wrapper stands for (its `source()` skips it).
fn unwrap_transparent<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a (dyn std::error::Error + 'static)> {
    use crate::uio::UioError;
    if let Some(d) = e.downcast_ref::<DaemonError>() {
        return match d {
            DaemonError::Config(c) => Some(c),
            DaemonError::Device(d) => Some(d),
            _ => None,
        };
    }
    if let Some(d) = e.downcast_ref::<DeviceError>() {
        return match d {
            DeviceError::Sysfs(s) => Some(s),
            DeviceError::Vfio(v) => Some(v),
            DeviceError::Uio(u) => Some(u),
            DeviceError::Intx(i) => Some(i),
            _ => None,
        };
    }
    match e.downcast_ref::<UioError>() {
        Some(UioError::Sysfs(s)) => Some(s),
        _ => None,
    }
}

/// The exit code for an error, from the first cause in its chain that
/// decides one.
pub fn exit_code(error: &(dyn std::error::Error + 'static)) -> u8 {
    use crate::pci::sysfs::SysfsError;
    use crate::vfio::VfioError;
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = cause {
        if e.is::<ConfigError>() {
            return exit::CONFIG;
        }
        if let Some(v) = e.downcast_ref::<VfioError>() {
            match v {
                VfioError::DeviceNotFound { .. } => return exit::NOT_FOUND,
                VfioError::NoPermission { .. } => return exit::PERMISSION,
                VfioError::GroupBusy { .. } => return exit::BUSY,
                _ => {}
            }
        }
        if let Some(SysfsError::NoDevice { .. }) = e.downcast_ref::<SysfsError>() {
            return exit::NOT_FOUND;
        }
        if let Some(io) = e.downcast_ref::<io::Error>() {
            match io.kind() {
                io::ErrorKind::PermissionDenied => return exit::PERMISSION,
                _ if io.raw_os_error() == Some(libc::EPERM) => return exit::PERMISSION,
                _ if matches!(io.raw_os_error(), Some(libc::EBUSY | libc::EAGAIN)) => {
                    return exit::BUSY
                }
                _ => {}
            }
        }
        cause = unwrap_transparent(e).or_else(|| e.source());
    }
    exit::RUNTIME
}

/// The supplementary groups of process `pid` (empty if unreadable).
fn supplementary_groups(pid: i32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Groups:")).map(|g| {
                g.split_whitespace()
                    .filter_map(|n| n.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// A simulated device's hardware side as the test hooks drive it.
struct SimSide(crate::sim::SimDevice);

impl crate::kvm::assign::DeviceSide for SimSide {
    fn raise(&self) {
        self.0.raise();
    }
    fn ack(&self) -> bool {
        self.0.ack()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

struct Entry {
    dev: Arc<ManagedDevice>,
    task: tokio::task::JoinHandle<()>,
}

/// The daemon's state as `status` reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DaemonStatus {
    /// The daemon's process id.
    pub pid: u32,
    /// Its version.
    pub version: String,
    /// Milliseconds since it started.
    pub uptime_ms: u64,
    /// The configuration file.
    pub config: String,
    /// The control socket.
    pub socket: String,
    /// Every device, by address.
    pub devices: Vec<DeviceStatus>,
    /// The built-in example guest, if it runs.
    pub example_guest: Option<example::ExampleGuestStatus>,
}

/// The running daemon, shared by the signal loop, the control socket and
/// the device tasks.
pub struct Daemon {
    config: Mutex<Config>,
    devices: Mutex<BTreeMap<Bdf, Entry>>,
    notifier: Notifier,
    started: Instant,
    euid: u32,
    group: Option<u32>,
    example: Mutex<Option<example::ExampleGuest>>,
    /// The socket given on the command line, over the configuration's.
    socket_override: Option<PathBuf>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon").finish_non_exhaustive()
    }
}

/// Loads the configuration at `path` and runs the daemon until SIGTERM or
/// SIGINT. Nothing is started when the configuration is invalid.
/// `socket` overrides the configuration's control socket.
pub fn run(path: &Path, socket: Option<&Path>) -> Result<(), DaemonError> {
    let mut config = Config::load(path)?;
    if let Some(socket) = socket {
        config.daemon.socket = socket.to_owned();
    }
    let group = match &config.daemon.socket_group {
        None => None,
        Some(name) => Some(
            nix::unistd::Group::from_name(name)
                .ok()
                .flatten()
                .ok_or_else(|| DaemonError::NoSuchGroup { name: name.clone() })?
                .gid
                .as_raw(),
        ),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(16)
        .build()
        .map_err(|source| DaemonError::Runtime {
            op: "starting the async runtime",
            source,
        })?;
    runtime.block_on(main(config, group, socket.map(Path::to_owned)))
}

async fn main(
    config: Config,
    group: Option<u32>,
    socket_override: Option<PathBuf>,
) -> Result<(), DaemonError> {
    let started = Instant::now();
    let notifier = Notifier::from_env();
    let signals = |kind, op| signal(kind).map_err(|source| DaemonError::Runtime { op, source });
    let mut term = signals(SignalKind::terminate(), "installing the SIGTERM handler")?;
    let mut int = signals(SignalKind::interrupt(), "installing the SIGINT handler")?;
    let mut hup = signals(SignalKind::hangup(), "installing the SIGHUP handler")?;
    notifier.status("arming devices");
    info!(config = %config.path.display(), devices = config.devices.len(), "starting");

    let daemon = Arc::new(Daemon {
        config: Mutex::new(config.clone()),
        devices: Mutex::new(BTreeMap::new()),
        notifier,
        started,
        euid: nix::unistd::geteuid().as_raw(),
        group,
        example: Mutex::new(None),
        socket_override,
    });
    let opened = open_devices(config.devices.clone()).await?;
    daemon.insert(opened);
    let listener = match server::bind(&config.daemon.socket, config.daemon.socket_mode, group) {
        Ok(l) => l,
        Err(e) => {
            daemon.shutdown().await;
            return Err(e);
        }
    };
    let server = tokio::spawn(server::serve(listener, Arc::clone(&daemon)));
    if let Some(guest) = &config.example_guest {
        daemon.start_example(guest).await;
    }
    let status = daemon.status_line();
    info!(elapsed = ?started.elapsed(), "{status}");
    daemon.notifier.ready(&status);

    let mut status_timer = tokio::time::interval(config.daemon.status_interval);
    status_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    status_timer.tick().await;
    let watchdog = daemon.notifier.watchdog_interval();
    let mut watchdog_timer = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = int.recv() => { info!("SIGINT: shutting down"); break; }
            _ = hup.recv() => daemon.reload().await,
            _ = status_timer.tick() => {
                let status = daemon.status_line();
                info!("{status}");
                daemon.notifier.status(&status);
            }
            _ = watchdog_timer.tick(), if watchdog.is_some() => daemon.notifier.watchdog(),
        }
    }
    daemon.notifier.stopping();
    server.abort();
    let socket = daemon.config().daemon.socket.clone();
    let failed = daemon.shutdown().await;
    if let Err(e) = std::fs::remove_file(&socket) {
        warn!(socket = %socket.display(), error = %e, "removing the control socket failed");
    }
    info!(elapsed = ?started.elapsed(), "stopped");
    if failed > 0 {
        return Err(DaemonError::Restore { failed });
    }
    Ok(())
}

type Opened = Vec<(
    Arc<ManagedDevice>,
    tokio::sync::mpsc::UnboundedReceiver<service::Control>,
)>;

/// Brings devices up on the blocking pool, one after another; on the first
/// failure, hands back the ones already up and fails.
async fn open_devices(configs: Vec<DeviceConfig>) -> Result<Opened, DeviceError> {
    let joined = tokio::task::spawn_blocking(move || {
        let mut opened: Opened = Vec::with_capacity(configs.len());
        for config in configs {
            match ManagedDevice::open(config) {
                Ok(o) => opened.push(o),
                Err(e) => {
                    let devs = opened.into_iter().map(|(dev, _)| dev).collect();
                    for (bdf, r) in service::hand_back(devs) {
                        if let Err(e) = r {
                            warn!(%bdf, error = %crate::error_chain(&e), "handing a device back failed");
                        }
                    }
                    return Err(e);
                }
            }
        }
        Ok(opened)
    })
    .await;
    joined.map_err(|source| DeviceError::Pool {
        op: "bringing devices up",
        source,
    })?
}

impl Daemon {
    /// The configuration in force.
    pub fn config(&self) -> Config {
        lock(&self.config).clone()
    }

    /// Lists devices the daemon opened and starts their tasks; one that
    /// cannot be listed is handed back in place.
    fn insert(&self, opened: Opened) {
        let mut failed = Vec::new();
        for (dev, rx) in opened {
            if let Err(e) = self.list(&dev, rx) {
                error!(bdf = %dev.bdf(), error = %crate::error_chain(&e), "the device was not started");
                failed.push(dev);
            }
        }
        for (bdf, r) in service::hand_back(failed) {
            if let Err(e) = r {
                warn!(%bdf, error = %crate::error_chain(&e), "handing a device back failed");
            }
        }
    }

    /// Lists a device and starts its task. Refused when the daemon already
    /// has a device at that address (a configured device and a VMM's own
    /// device fd for the same function: whichever came first keeps it), or
    /// when the task cannot start (the reactor refused an eventfd); the
    /// caller then hands `dev` back.
    pub(crate) fn list(
        &self,
        dev: &Arc<ManagedDevice>,
        rx: tokio::sync::mpsc::UnboundedReceiver<service::Control>,
    ) -> Result<(), DeviceError> {
        let bdf = dev.bdf();
        let mut devices = lock(&self.devices);
        if devices.contains_key(&bdf) {
            return Err(DeviceError::Unsupported {
                bdf,
                what: "the daemon already has a device at this address",
            });
        }
        let task = dev.spawn(rx)?;
        devices.insert(
            bdf,
            Entry {
                dev: Arc::clone(dev),
                task,
            },
        );
        Ok(())
    }

    /// Ends a VMM device's session: stops its task, disarms it and closes
    /// the daemon's copy of its fd, and returns once it is closed. Does
    /// nothing if the device is no longer listed (a shutdown took it).
    pub(crate) async fn release_handed_over(&self, dev: Arc<ManagedDevice>) {
        let entry = {
            let mut devices = lock(&self.devices);
            match devices.get(&dev.bdf()) {
                Some(e) if Arc::ptr_eq(&e.dev, &dev) => devices.remove(&dev.bdf()),
                _ => None,
            }
        };
        // The entry's reference is the last one: hand_back waits for the
        // device to be closed.
        drop(dev);
        if let Some(entry) = entry {
            self.finish_removal(vec![entry]).await;
        }
    }

    /// A device the daemon owns.
    pub fn device(&self, bdf: Bdf) -> Option<Arc<ManagedDevice>> {
        lock(&self.devices).get(&bdf).map(|e| Arc::clone(&e.dev))
    }

    fn all(&self) -> Vec<Arc<ManagedDevice>> {
        lock(&self.devices)
            .values()
            .map(|e| Arc::clone(&e.dev))
            .collect()
    }

    /// Root, the daemon's own uid, and members of the socket group (the
    /// peer's primary group from SO_PEERCRED, or a supplementary group
    /// from its /proc status).
    fn authorized(&self, uid: u32, gid: u32, pid: Option<i32>) -> bool {
        if uid == 0 || uid == self.euid {
            return true;
        }
        let Some(group) = self.group else {
            return false;
        };
        gid == group || pid.is_some_and(|pid| supplementary_groups(pid).contains(&group))
    }

    /// The daemon's state.
    pub fn status(&self) -> DaemonStatus {
        let config = self.config();
        DaemonStatus {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            config: config.path.display().to_string(),
            socket: config.daemon.socket.display().to_string(),
            devices: self.all().iter().map(|d| d.status()).collect(),
            example_guest: lock(&self.example).as_ref().map(|g| g.status()),
        }
    }

    fn status_line(&self) -> String {
        let devices = self.all();
        let sessions = devices.iter().filter(|d| d.sink.attached()).count();
        let held = devices.iter().filter(|d| d.status().held.is_some()).count();
        let interrupts: u64 = devices
            .iter()
            .map(|d| d.engine.stats().host_interrupts)
            .sum();
        let mut line = format!(
            "{} device(s) armed, {sessions} session(s), {held} held masked, {interrupts} interrupts serviced",
            devices.len()
        );
        if let Some(g) = lock(&self.example).as_ref() {
            let s = g.status();
            line.push_str(&format!(
                "; example guest: {} interrupts received and acknowledged",
                s.acked
            ));
        }
        line
    }

    /// Answers one control request (sessions are handled by the server).
    pub(crate) async fn handle(self: &Arc<Self>, request: Request) -> Response {
        match request {
            Request::Ping => Response::ok(serde_json::json!({ "pid": std::process::id() })),
            Request::Status => Response::ok(self.status()),
            Request::Stats { bdf } => {
                let devices = match bdf {
                    None => self.all(),
                    Some(text) => match self.owned(&text) {
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
            Request::Metrics => {
                let stats: Vec<DeviceStats> = self.all().iter().map(|d| d.stats()).collect();
                Response::ok(serde_json::json!({ "text": metrics::prometheus(&stats) }))
            }
            Request::Reset { bdf } => {
                let dev = match self.owned(&bdf) {
                    Ok(d) => d,
                    Err(r) => return r,
                };
                let worker = Arc::clone(&dev);
                match tokio::task::spawn_blocking(move || worker.reset()).await {
                    Ok(Ok(())) => Response::ok(
                        serde_json::json!({ "bdf": dev.bdf().to_string(), "reset": true }),
                    ),
                    Ok(Err(e)) => {
                        let kind = if e.backend_error().is_some_and(|b| b.is_transient()) {
                            ErrorKind::Busy
                        } else {
                            ErrorKind::Failed
                        };
                        Response::error(kind, crate::error_chain(&e))
                    }
                    Err(e) => Response::error(
                        ErrorKind::Failed,
                        format!("{bdf}: reset could not run: {e}"),
                    ),
                }
            }
            Request::Mask { bdf } => self.hold(&bdf, true).await,
            Request::Unmask { bdf } => self.hold(&bdf, false).await,
            Request::Probe { bdf } => self.probe(&bdf).await,
            Request::SimRaise { bdf, count } => {
                let count = count.min(1_000_000);
                match self
                    .test_hook(&bdf, move |side| {
                        for _ in 0..count {
                            side.raise();
                        }
                        true
                    })
                    .await
                {
                    Ok(_) => Response::ok(serde_json::json!({ "raised": count })),
                    Err(r) => r,
                }
            }
            Request::SimAck { bdf } => match self.test_hook(&bdf, |side| side.ack()).await {
                Ok(acked) => Response::ok(serde_json::json!({ "acked": acked })),
                Err(r) => r,
            },
            Request::Session { .. } => Response::error(
                ErrorKind::BadRequest,
                "sessions are started on a connection of their own",
            ),
        }
    }

    fn owned(&self, text: &str) -> Result<Arc<ManagedDevice>, Response> {
        let bdf = server::bdf_arg(text)?;
        self.device(bdf).ok_or_else(|| server::not_owned(bdf))
    }

    /// Runs a test hook (raise, ack) on a simulated device, or on an edu
    /// with `edu-test-hooks` — there under the gate, so that the BAR
    /// access never lands inside a reset, which the edu would drop.
    async fn test_hook(
        &self,
        text: &str,
        hook: impl FnOnce(&dyn crate::kvm::assign::DeviceSide) -> bool + Send + 'static,
    ) -> Result<bool, Response> {
        let dev = self.owned(text)?;
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
            .map_err(|e| Response::error(ErrorKind::Failed, format!("{text}: test hook: {e}")))
    }

    async fn hold(&self, text: &str, mask: bool) -> Response {
        let dev = match self.owned(text) {
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
                Response::ok(serde_json::json!({ "bdf": dev.bdf().to_string(), "held": mask }))
            }
            Err(e) => Response::error(ErrorKind::Failed, crate::error_chain(&e)),
        }
    }

    async fn probe(&self, text: &str) -> Response {
        let bdf = match server::bdf_arg(text) {
            Ok(b) => b,
            Err(r) => return r,
        };
        if let Some(dev) = self.device(bdf) {
            return Response::ok(ProbeReport {
                bdf: bdf.to_string(),
                // Devices whose masking is broken are refused at start.
                supported: dev.config.probe.then_some(true),
                verdict: dev.masking.clone(),
                evidence: dev.masking_evidence.map(str::to_owned),
                owned: true,
            });
        }
        match tokio::task::spawn_blocking(move || crate::pci::sysfs::masking_verdict(bdf)).await {
            Ok(Ok(v)) => Response::ok(ProbeReport {
                bdf: bdf.to_string(),
                supported: Some(v.supported),
                verdict: v.to_string(),
                evidence: Some(v.source.evidence().to_owned()),
                owned: false,
            }),
            Ok(Err(e)) => {
                let kind = match exit_code(&e) {
                    exit::NOT_FOUND => ErrorKind::NotFound,
                    exit::PERMISSION => ErrorKind::PermissionDenied,
                    _ => ErrorKind::Failed,
                };
                Response::error(kind, crate::error_chain(&e))
            }
            Err(e) => Response::error(
                ErrorKind::Failed,
                format!("{bdf}: probe could not run: {e}"),
            ),
        }
    }

    async fn start_example(self: &Arc<Self>, config: &config::ExampleGuestConfig) {
        let Some(dev) = self.device(config.bdf) else {
            return;
        };
        match example::ExampleGuest::start(dev, config.interrupts_per_second).await {
            Ok(Some(guest)) => *lock(&self.example) = Some(guest),
            Ok(None) => {}
            Err(e) => {
                warn!(error = %crate::error_chain(&e), "the example guest could not start; the daemon runs without it");
            }
        }
    }

    async fn stop_example(&self, only: Option<Bdf>) {
        let guest = {
            let mut slot = lock(&self.example);
            match (&*slot, only) {
                (Some(g), Some(bdf)) if g.bdf() != bdf => None,
                _ => slot.take(),
            }
        };
        if let Some(g) = guest {
            g.stop().await;
        }
    }

    /// Stops and hands back the devices at `bdfs` (all when `None`);
    /// returns how many could not be restored.
    async fn remove(&self, bdfs: Option<&[Bdf]>) -> usize {
        let entries: Vec<Entry> = {
            let mut devices = lock(&self.devices);
            match bdfs {
                None => std::mem::take(&mut *devices).into_values().collect(),
                Some(list) => list.iter().filter_map(|b| devices.remove(b)).collect(),
            }
        };
        self.finish_removal(entries).await
    }

    /// Stops and hands back devices already taken out of the list; returns
    /// how many could not be restored.
    async fn finish_removal(&self, entries: Vec<Entry>) -> usize {
        for e in &entries {
            e.dev.stop();
        }
        let mut devs = Vec::with_capacity(entries.len());
        for e in entries {
            let _ = e.task.await;
            devs.push(e.dev);
        }
        let restored = tokio::task::spawn_blocking(move || service::hand_back(devs)).await;
        let Ok(restored) = restored else {
            error!("handing devices back could not run");
            return 1;
        };
        let mut failed = 0;
        for (bdf, r) in restored {
            match r {
                Ok(r) if r.handed_over => {
                    info!(%bdf, command = format_args!("{:#06x}", r.now),
                        "VMM device released: INTx delivery stopped, COMMAND left to the VMM");
                }
                Ok(r) if r.now == r.found => {
                    info!(%bdf, command = format_args!("{:#06x}", r.now), driver_restored = r.driver_restored,
                        "device restored: INTx delivery stopped, COMMAND as found");
                }
                Ok(r) => {
                    failed += 1;
                    error!(%bdf, found = format_args!("{:#06x}", r.found), now = format_args!("{:#06x}", r.now),
                        "device handed back with COMMAND not as found");
                }
                Err(e) => {
                    failed += 1;
                    error!(%bdf, error = %crate::error_chain(&e), "handing the device back failed");
                }
            }
        }
        failed
    }

    async fn shutdown(&self) -> usize {
        self.stop_example(None).await;
        self.remove(None).await
    }

    /// SIGHUP: re-reads the configuration; devices added are brought up,
    /// devices removed (or whose settings changed) are handed back, the
    /// rest are not touched. An invalid file changes nothing.
    async fn reload(self: &Arc<Self>) {
        self.notifier.reloading();
        let path = self.config().path;
        let new = match Config::load(&path) {
            Ok(mut c) => {
                if let Some(socket) = &self.socket_override {
                    c.daemon.socket = socket.clone();
                }
                c
            }
            Err(e) => {
                let msg = crate::error_chain(&e);
                error!(error = %msg, "reload failed; the previous configuration stays in force");
                self.notifier
                    .ready(&format!("reload failed ({msg}); {}", self.status_line()));
                return;
            }
        };
        let old = self.config();
        if new.daemon != old.daemon {
            warn!("changes to [daemon] take effect at the next restart");
        }
        if new.example_guest != old.example_guest {
            warn!("changes to [example-guest] take effect at the next restart");
        }
        let gone: Vec<Bdf> = old
            .devices
            .iter()
            .filter(|o| new.device(o.bdf) != Some(*o))
            .map(|o| o.bdf)
            .collect();
        let added: Vec<DeviceConfig> = new
            .devices
            .iter()
            .filter(|n| old.device(n.bdf) != Some(*n))
            .cloned()
            .collect();
        for bdf in &gone {
            self.stop_example(Some(*bdf)).await;
        }
        let failed = self.remove(Some(&gone)).await;
        if failed > 0 {
            warn!(failed, "some removed devices could not be restored");
        }
        let mut not_started = 0;
        for config in added.iter().cloned() {
            let bdf = config.bdf;
            match open_devices(vec![config]).await {
                Ok(opened) => self.insert(opened),
                Err(e) => {
                    not_started += 1;
                    error!(%bdf, error = %crate::error_chain(&e), "bringing an added device up failed");
                }
            }
        }
        {
            let mut config = lock(&self.config);
            let daemon = config.daemon.clone();
            let example = config.example_guest.clone();
            *config = Config {
                daemon,
                example_guest: example,
                ..new
            };
        }
        info!(
            removed = gone.len(),
            added = added.len(),
            not_started,
            "configuration reloaded"
        );
        self.notifier.ready(&self.status_line());
    }
}

/// Sets up logging: journald when systemd connected stderr to the journal
/// ([`systemd::stderr_is_journal`]), with each event's span fields (the
/// device's `F_BDF`) as journal fields; formatted stderr otherwise, and if
/// the journal's socket cannot be reached. `RUST_LOG` overrides `default`.
pub fn init_logging(default: &str) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = crate::log_filter(default);
    if systemd::stderr_is_journal() {
        if let Ok(journald) = tracing_journald::layer() {
            let _ = tracing_subscriber::registry()
                .with(filter)
                .with(journald.with_syslog_identifier("vfio-intx".to_owned()))
                .try_init();
            return;
        }
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&io::stderr()))
        .try_init();
}
