//! The devices the daemon owns: the device map, bringing devices up and
//! handing them back, status, the example guest, and the reload diff.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use tracing::{error, info, warn};

use crate::daemon::config::{self, Config, DeviceConfig};
#[cfg(feature = "testkit")]
use crate::daemon::example;
use crate::daemon::protocol::{self, DaemonStatus};
use crate::daemon::service::{self, DeviceError, ManagedDevice};
use crate::daemon::systemd::Notifier;
use crate::pci::Bdf;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

pub(crate) struct Entry {
    pub(crate) dev: Arc<ManagedDevice>,
    pub(crate) task: tokio::task::JoinHandle<()>,
}

/// The running daemon, shared by the signal loop, the control socket and
/// the device tasks.
pub struct Daemon {
    pub(crate) config: Mutex<Config>,
    pub(crate) devices: Mutex<BTreeMap<Bdf, Entry>>,
    pub(crate) notifier: Notifier,
    pub(crate) started: Instant,
    pub(crate) euid: u32,
    pub(crate) group: Option<u32>,
    /// The admin group's gid: its members are operators.
    pub(crate) admin_group: Option<u32>,
    /// The pid (SO_PEERCRED) of each session's VMM, by device: it may act
    /// on that device from other connections.
    pub(crate) session_owners: Mutex<BTreeMap<Bdf, Option<i32>>>,
    #[cfg(feature = "testkit")]
    pub(crate) example: Mutex<Option<example::ExampleGuest>>,
    /// The socket given on the command line, over the configuration's.
    pub(crate) socket_override: Option<PathBuf>,
    /// The control socket's events, counted and rate limited per cause.
    pub(crate) events: crate::daemon::metrics::ControlEvents,
    /// The metrics endpoint's and textfile's events, counted and rate
    /// limited per cause.
    pub(crate) exporter_events: crate::daemon::metrics::ExporterEvents,
    /// A `restart` was answered: the signal loop exits for it.
    pub(crate) restart: tokio::sync::Notify,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon").finish_non_exhaustive()
    }
}

pub(crate) type Opened = Vec<(
    Arc<ManagedDevice>,
    tokio::sync::mpsc::UnboundedReceiver<service::Control>,
)>;

/// Brings devices up on the blocking pool, one after another; on the first
/// failure, hands back the ones already up and fails.
pub(crate) async fn open_devices(configs: Vec<DeviceConfig>) -> Result<Opened, DeviceError> {
    let joined = tokio::task::spawn_blocking(move || {
        let mut opened: Opened = Vec::with_capacity(configs.len());
        for config in configs {
            let bdf = config.bdf;
            match ManagedDevice::open(config) {
                Ok(o) => opened.push(o),
                Err(e) => {
                    let e = DeviceError::Starting {
                        bdf,
                        source: Box::new(e),
                    };
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
    pub(crate) fn insert(&self, opened: Opened) {
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

    pub(crate) fn all(&self) -> Vec<Arc<ManagedDevice>> {
        lock(&self.devices)
            .values()
            .map(|e| Arc::clone(&e.dev))
            .collect()
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
            example_guest: self.example_status(),
        }
    }

    pub(crate) fn status_line(&self) -> String {
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
        if let Some(s) = self.example_status() {
            line.push_str(&format!(
                "; example guest: {} interrupts received and acknowledged",
                s.acked
            ));
        }
        line
    }

    #[cfg(not(feature = "testkit"))]
    pub(crate) async fn start_example(self: &Arc<Self>, _config: &config::ExampleGuestConfig) {
        warn!("the example guest needs vfio-intx built with the testkit feature; the daemon runs without it");
    }

    #[cfg(not(feature = "testkit"))]
    pub(crate) async fn stop_example(&self, _only: Option<Bdf>) {}

    #[cfg(not(feature = "testkit"))]
    fn example_status(&self) -> Option<protocol::ExampleGuestStatus> {
        None
    }

    #[cfg(feature = "testkit")]
    fn example_status(&self) -> Option<protocol::ExampleGuestStatus> {
        lock(&self.example).as_ref().map(|g| g.status())
    }

    #[cfg(feature = "testkit")]
    pub(crate) async fn start_example(self: &Arc<Self>, config: &config::ExampleGuestConfig) {
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

    #[cfg(feature = "testkit")]
    pub(crate) async fn stop_example(&self, only: Option<Bdf>) {
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
                Ok(r) if r.as_found() => {
                    info!(%bdf, command = format_args!("{:#06x}", r.found), now = format_args!("{:#06x}", r.now),
                        driver_restored = r.driver_restored,
                        "device restored: INTx delivery stopped, COMMAND as found; the device still \
                         asserts, so the kernel driver's handler holds INTx masked for its next user");
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

    pub(crate) async fn shutdown(&self) -> usize {
        self.stop_example(None).await;
        self.remove(None).await
    }

    /// SIGHUP, first half: re-reads the configuration (on the blocking
    /// pool: a file that does not answer holds up nothing else, and the
    /// read may be abandoned at shutdown). `None` when it is invalid: that
    /// changes nothing.
    pub(crate) async fn load_for_reload(&self) -> Option<Config> {
        self.notifier.reloading();
        let path = self.config().path;
        let loaded = tokio::task::spawn_blocking(move || Config::load(&path)).await;
        let msg = match loaded {
            Ok(Ok(mut c)) => {
                if let Some(socket) = &self.socket_override {
                    c.daemon.socket = socket.clone();
                }
                return Some(c);
            }
            Ok(Err(e)) => crate::error_chain(&e),
            Err(e) => format!("reading the configuration could not run: {e}"),
        };
        error!(error = %msg, "reload failed; the previous configuration stays in force");
        self.notifier
            .ready(&format!("reload failed ({msg}); {}", self.status_line()));
        None
    }

    /// SIGHUP, second half: devices added are brought up, devices removed
    /// (or whose settings changed) are handed back, the rest are not
    /// touched.
    pub(crate) async fn apply_reload(self: &Arc<Self>, new: Config) {
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
                    let e = match e {
                        DeviceError::Starting { source, .. } => *source,
                        e => e,
                    };
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
