//! `vfio-intx daemon`: owns the configured devices and services their INTx
//! on a tokio runtime, with a control socket for operators and VMMs. This
//! file is the daemon's lifecycle: [`run`], the signal loop, logging, exit
//! codes. One concern a file:
//!
//! - `registry`: the device map, bringing devices up and handing them
//!   back, status, the reload diff;
//! - `control`: a request in, its handler, its answer out, and the one
//!   mapping of errors to kinds ([`Kind`], a `kind()` on each error);
//! - `server`: the control socket (framing, peer credentials, client
//!   bound, timeouts) and sessions' connections (`SCM_RIGHTS`);
//! - [`protocol`]: every wire type (frames, requests, replies, status);
//! - `service`: one device: `lifecycle` (open, adopt, arm, restore,
//!   hand back), `session`, `health` (storms, EOI timeouts, holds: a
//!   sans-IO state machine), `task` (the select loop);
//! - [`config`]: the TOML configuration; [`metrics`]: per-device metrics
//!   and the Prometheus text; `systemd`: notification; [`client`]: a
//!   synchronous client (the CLI, tests, VMMs); `cli` (feature `cli`): the
//!   operator commands.
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

mod asfound;
pub(crate) mod backend;
#[cfg(feature = "cli")]
pub mod cli;
pub mod client;
mod closer;
pub mod config;
mod control;
#[cfg(feature = "testkit")]
mod example;
mod fdstore;
pub mod metrics;
pub mod progress;
pub mod protocol;
mod registry;
mod resume;
mod rundir;
mod server;
pub(crate) mod service;
mod sys;
pub(crate) mod systemd;

pub use control::{HasKind, Kind};
pub use protocol::{DaemonStatus, ProbeReport, SessionReport};

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

use crate::daemon::config::{Config, ConfigError};
use crate::daemon::registry::{open_devices, Daemon};
use crate::daemon::service::DeviceError;
use crate::daemon::systemd::Notifier;

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
    /// The daemon exited for a restart that keeps every device and session
    /// (`restart`, SIGUSR2): EX_TEMPFAIL, which the unit's
    /// `RestartForceExitStatus=` restarts with the fd store.
    pub const RESTART: u8 = 75;
}

/// Why the daemon could not start or had to stop.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
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
    /// Something other than a socket is at the socket path.
    #[error("{}: {what} is there, not a socket; refusing to remove it", .path.display())]
    NotASocket {
        /// The socket path.
        path: PathBuf,
        /// What is there.
        what: &'static str,
    },
    /// The socket's directory could be changed by someone else.
    #[error(
        "{}: the control socket's directory is {why}; it must be owned by uid {euid} and \
         writable by nobody else", .dir.display()
    )]
    UnsafeDirectory {
        /// The directory.
        dir: PathBuf,
        /// What is wrong with it.
        why: String,
        /// The daemon's effective uid.
        euid: u32,
    },
    /// Another daemon holds the instance lock.
    #[error(
        "{}: another vfio-intx daemon{} holds the instance lock; no device was touched",
        .lock.display(),
        .pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    Locked {
        /// The lock file.
        lock: PathBuf,
        /// The holder's pid, as written in the lock file.
        pid: Option<u32>,
    },
    /// The configured socket or admin group does not exist.
    #[error("{key} {name:?} does not exist")]
    NoSuchGroup {
        /// The configuration key naming it.
        key: &'static str,
        /// The group.
        name: String,
    },
    /// The metrics endpoint cannot listen on its configured address.
    #[error("[metrics] listen = \"{addr}\": cannot listen there")]
    MetricsListen {
        /// The address.
        addr: std::net::SocketAddr,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Some devices could not be handed back at shutdown.
    #[error("{failed} device(s) could not be restored at shutdown")]
    Restore {
        /// How many.
        failed: usize,
    },
}

/// The exit code for an error: its [`Kind`]'s.
pub fn exit_code(error: &impl HasKind) -> u8 {
    error.kind().exit_code()
}

/// Loads the configuration at `path` and runs the daemon until SIGTERM or
/// SIGINT. Nothing is started when the configuration is invalid.
/// `socket` overrides the configuration's control socket.
pub fn run(path: &Path, socket: Option<&Path>) -> Result<(), DaemonError> {
    let mut config = Config::load(path)?;
    if let Some(socket) = socket {
        config::socket_path_fits(socket).map_err(|message| DaemonError::Socket {
            path: socket.to_owned(),
            op: "checking the socket path",
            source: io::Error::new(io::ErrorKind::InvalidInput, message),
        })?;
        config.daemon.socket = socket.to_owned();
    }
    let gid = |key, name: &Option<String>| match name {
        None => Ok(None),
        Some(name) => nix::unistd::Group::from_name(name)
            .ok()
            .flatten()
            .map(|g| Some(g.gid.as_raw()))
            .ok_or_else(|| DaemonError::NoSuchGroup {
                key,
                name: name.clone(),
            }),
    };
    let group = gid("socket-group", &config.daemon.socket_group)?;
    let admin_group = gid("admin-group", &config.daemon.admin_group)?;
    // What systemd's fd store kept from a previous instance (none without
    // one), checked: entries of the wrong type are closed here.
    let mut passed = resume::Passed::take();
    let listener = passed.listener(&config.daemon.socket);
    // Before any device is touched: a second instance stops here. The
    // socket path is checked too, except that a listener kept in the store
    // is this daemon's own.
    let _lock = rundir::lock(
        &config.daemon.socket,
        nix::unistd::geteuid().as_raw(),
        listener.is_some(),
    )?;
    // The lock's holder alone keeps the record of how devices were found.
    asfound::init(&config.daemon.socket);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(16)
        .build()
        .map_err(|source| DaemonError::Runtime {
            op: "starting the async runtime",
            source,
        })?;
    let result = runtime.block_on(main(
        config,
        group,
        admin_group,
        socket.map(Path::to_owned),
        passed,
        listener,
    ));
    // A reload still reading a configuration file that does not answer is
    // abandoned, not waited for.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

async fn main(
    config: Config,
    group: Option<u32>,
    admin_group: Option<u32>,
    socket_override: Option<PathBuf>,
    mut passed: resume::Passed,
    stored_listener: Option<std::os::fd::OwnedFd>,
) -> Result<(), DaemonError> {
    let started = Instant::now();
    let notifier = Notifier::from_env();
    let signals = |kind, op| signal(kind).map_err(|source| DaemonError::Runtime { op, source });
    let mut term = signals(SignalKind::terminate(), "installing the SIGTERM handler")?;
    let mut int = signals(SignalKind::interrupt(), "installing the SIGINT handler")?;
    let mut hup = signals(SignalKind::hangup(), "installing the SIGHUP handler")?;
    let mut usr2 = signals(
        SignalKind::user_defined2(),
        "installing the SIGUSR2 handler",
    )?;
    notifier.status("arming devices");
    info!(config = %config.path.display(), devices = config.devices.len(), "starting");

    let daemon = Arc::new(Daemon {
        config: Mutex::new(config.clone()),
        devices: Mutex::new(BTreeMap::new()),
        notifier,
        started,
        euid: nix::unistd::geteuid().as_raw(),
        group,
        admin_group,
        session_owners: Mutex::new(BTreeMap::new()),
        #[cfg(feature = "testkit")]
        example: Mutex::new(None),
        socket_override,
        events: Default::default(),
        exporter_events: Default::default(),
        restart: tokio::sync::Notify::new(),
    });
    // Before any device is touched: an address in use stops here.
    let exporter = Arc::new(tokio::sync::Mutex::new(
        metrics::Exporter::start(&daemon, &config.metrics).await?,
    ));
    // Devices the store and the record let the daemon resume first (no
    // reset, no rebind), then the leftovers of the store closed, then the
    // rest brought up afresh (whose entries the leftovers' removal must
    // not hit).
    let (to_resume, mut fresh) = passed.plan(config.devices.clone());
    let resumed_devices;
    let pending_sessions;
    {
        let joined = tokio::task::spawn_blocking(move || {
            let r = resume::resume_devices(&mut passed, to_resume);
            (passed, r)
        })
        .await;
        let joined = match joined {
            Ok(j) => j,
            Err(e) => {
                exporter.lock().await.stop().await;
                return Err(DaemonError::Runtime {
                    op: "resuming devices",
                    source: io::Error::other(e),
                });
            }
        };
        let (mut rest, (opened, sessions, failed, held)) = joined;
        rest.close_rest();
        resumed_devices = opened.len();
        daemon.insert(opened);
        resume::restore_holds(&daemon, held).await;
        pending_sessions = sessions;
        fresh.extend(failed);
    }
    let opened = match open_devices(fresh).await {
        Ok(o) => o,
        Err(e) => {
            exporter.lock().await.stop().await;
            daemon.shutdown().await;
            return Err(e.into());
        }
    };
    daemon.insert(opened);
    let listener = match stored_listener {
        Some(fd) => server::listener_from(fd, &config.daemon.socket),
        None => server::bind(&config.daemon.socket, config.daemon.socket_mode, group),
    };
    let listener = match listener {
        Ok(l) => l,
        Err(e) => {
            exporter.lock().await.stop().await;
            daemon.shutdown().await;
            return Err(e);
        }
    };
    let resumed_sessions = resume::resume_sessions(&daemon, pending_sessions).await;
    let server = tokio::spawn(server::serve(listener, Arc::clone(&daemon)));
    if let Some(guest) = &config.example_guest {
        daemon.start_example(guest).await;
    }
    let mut status = daemon.status_line();
    if resumed_devices > 0 || resumed_sessions > 0 {
        status = format!(
            "resumed {resumed_devices} device(s) and {resumed_sessions} session(s) from the fd store; {status}"
        );
    }
    info!(elapsed = ?started.elapsed(), "{status}");
    daemon.notifier.ready(&status);

    let mut status_timer = tokio::time::interval(config.daemon.status_interval);
    status_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    status_timer.tick().await;
    let watchdog = daemon.notifier.watchdog_interval();
    let mut watchdog_timer = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
    // Reloads run beside the signal loop, so that neither SIGTERM nor the
    // watchdog keepalive waits for one. SIGHUPs during a reload coalesce
    // into one more. `stopping` is held while a reload changes devices and
    // set at shutdown: a reload is abandoned while it reads the file,
    // waited for while it changes devices, and none starts after.
    let stopping = Arc::new(tokio::sync::Mutex::new(false));
    let (reload_tx, mut reload_rx) = tokio::sync::mpsc::channel::<()>(1);
    let reloader = tokio::spawn({
        let daemon = Arc::clone(&daemon);
        let stopping = Arc::clone(&stopping);
        let exporter = Arc::clone(&exporter);
        async move {
            while reload_rx.recv().await.is_some() {
                let Some(new) = daemon.load_for_reload().await else {
                    continue;
                };
                let stopping = stopping.lock().await;
                if *stopping {
                    break;
                }
                exporter.lock().await.reload(&new.metrics).await;
                daemon.apply_reload(new).await;
            }
        }
    });
    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = int.recv() => { info!("SIGINT: shutting down"); break; }
            _ = usr2.recv() => {
                match daemon.prepare_restart().await {
                    crate::daemon::protocol::Response::Ok { .. } => restart(&daemon),
                    crate::daemon::protocol::Response::Error { message, .. } => {
                        warn!("SIGUSR2: not restarting: {message}");
                    }
                }
            }
            () = daemon.restart.notified() => restart(&daemon),
            _ = hup.recv() => {
                if reload_tx.try_send(()).is_err() {
                    info!("SIGHUP: a reload is under way; one more follows it");
                }
            }
            _ = status_timer.tick() => {
                let status = daemon.status_line();
                info!("{status}");
                daemon.notifier.status(&status);
            }
            _ = watchdog_timer.tick(), if watchdog.is_some() => daemon.notifier.watchdog(),
        }
    }
    daemon.notifier.stopping();
    *stopping.lock().await = true;
    reloader.abort();
    server.abort();
    exporter.lock().await.stop().await;
    let socket = daemon.config().daemon.socket.clone();
    let failed = daemon.shutdown().await;
    // A stop: nothing is to be resumed.
    fdstore::remove_all();
    if !tokio::task::spawn_blocking(|| fdstore::flush(Duration::from_secs(1)))
        .await
        .unwrap_or(false)
    {
        warn!("the service manager did not take every fd store removal; it drops the store at the stop anyway");
    }
    if let Err(e) = std::fs::remove_file(&socket) {
        warn!(socket = %socket.display(), error = %e, "removing the control socket failed");
    }
    info!(elapsed = ?started.elapsed(), "stopped");
    if failed > 0 {
        return Err(DaemonError::Restore { failed });
    }
    Ok(())
}

/// Exits for a restart that keeps every device and session: no device is
/// handed back and nothing is torn down (no destructor runs: INTx stays
/// wired, the kernel and systemd's fd store keep the descriptors), with
/// [`exit::RESTART`] for the service manager.
fn restart(daemon: &registry::Daemon) -> ! {
    info!("restarting: every device and session is kept in the fd store for the next process");
    // An interrupt the engine masked for delivery reaches its guest before
    // the process goes (the next one finds it masked and asserting, and
    // takes it as delivered). The runtime's thread is here: no device task
    // injects meanwhile.
    for dev in daemon.all() {
        if !dev.sink.flush(Duration::from_millis(100)) {
            warn!(bdf = %dev.bdf(), "an interrupt for the VMM's irqfd was not written before the restart; the EOI timeout recovers it");
        }
    }
    let _ = fdstore::flush(Duration::from_secs(1));
    std::process::exit(i32::from(exit::RESTART))
}

/// Sets up logging: journald when systemd connected stderr to the journal
/// (`JOURNAL_STREAM` names stderr), with each event's span fields (the
/// device's `F_BDF`) as journal fields; formatted stderr otherwise, and if
/// the journal's socket cannot be reached. `RUST_LOG` overrides `default`.
#[cfg(feature = "cli")]
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
