//! Surviving the daemon's own restart and crash: what goes into systemd's
//! fd store and the record (`<socket>.as-found`) while the daemon runs,
//! the explicit restart that keeps every device and session (`restart`,
//! SIGUSR2: exit status 75), and the resume at the next start.
//!
//! Write order, so that a SIGKILL at any instruction leaves something
//! resumable: the fds go into the store first and the record after; a
//! session's or device's end changes the record first and removes its
//! store entries after. So at start a store entry the record does not
//! explain is left over (closed, with a log line), and a record entry
//! whose fds are missing falls back to the crash handling without a store
//! (the device is brought up afresh, as found per the record).

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::daemon::asfound::{self, Found, Resume, SessionRecord, VmmDevice};
use crate::daemon::backend::AnyBackend;
use crate::daemon::config::{BackendKind, DeviceConfig};
use crate::daemon::fdstore::{self, role, FdKind, CONTROL_SOCKET};
use crate::daemon::protocol::{ErrorKind, Response, RestartReply};
use crate::daemon::registry::{Daemon, Opened};
use crate::daemon::service::{vmm_device_names, ManagedDevice};
use crate::pci::Bdf;

/// How long a restart waits for the service manager to take every queued
/// store message.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// The store entries a session keeps.
fn session_names(bdf: Bdf) -> Vec<String> {
    [
        role::SESSION_IRQFD,
        role::SESSION_RESAMPLE,
        role::SESSION_CONN,
    ]
    .into_iter()
    .map(|r| fdstore::name(bdf, r))
    .collect()
}

/// Stores a new session's irqfd, resample eventfd and connection, then
/// records it. A session on a VMM's own device fd keeps the daemon's copy
/// of that fd too (its delivery ledger was stored when it was adopted),
/// and its record is the device's whole record: role `vmm-device`, the
/// address, the EOI path.
pub(crate) fn store_session(
    dev: &ManagedDevice,
    irqfd: &OwnedFd,
    resample: &OwnedFd,
    conn: BorrowedFd<'_>,
    owner: Option<i32>,
) {
    if !fdstore::enabled() {
        return;
    }
    let bdf = dev.bdf();
    let names = session_names(bdf);
    for (name, fd) in names.iter().zip([irqfd.as_fd(), resample.as_fd(), conn]) {
        fdstore::store(name.clone(), fd);
    }
    let path = if dev.engine.is_kernel_bypass() {
        "bypass"
    } else {
        "user"
    };
    let role = if dev.handed_over.is_some() {
        "vmm-device"
    } else {
        "vmm"
    };
    let session = SessionRecord {
        id: bdf.to_string(),
        role: role.to_owned(),
        path: path.to_owned(),
        owner,
        names,
    };
    if dev.handed_over.is_none() {
        asfound::set_session(bdf, Some(session));
        return;
    }
    let device = fdstore::name(bdf, role::VFIO_DEVICE);
    dev.engine.with_backend(|b| {
        if let AnyBackend::Vfio(v) = b {
            fdstore::store(device, v.device_fd());
        }
    });
    asfound::put(
        bdf,
        Found {
            command: dev.found_command,
            binding: None,
            resume: Some(Resume {
                backend: BackendKind::Vfio,
                names: vmm_device_names(bdf),
                session: Some(session),
                held: false,
                vmm_device: Some(VmmDevice {
                    claimed: Some(bdf.to_string()),
                    path: dev.config.path,
                }),
            }),
        },
    );
}

/// A session ended: out of the record, then out of the store. A VMM's own
/// device leaves the record with it (its device fd's copy and ledger leave
/// the store when it is handed back).
pub(crate) fn forget_session(dev: &ManagedDevice) {
    // A resumed session that is not re-attached leaves its adopted bypass
    // to the next session's attach to re-wire, not to take as it is.
    dev.resumed_on_bypass
        .store(false, std::sync::atomic::Ordering::SeqCst);
    if !fdstore::enabled() {
        return;
    }
    if dev.handed_over.is_some() {
        asfound::remove(dev.bdf());
    } else {
        asfound::set_session(dev.bdf(), None);
    }
    for name in session_names(dev.bdf()) {
        fdstore::remove(name);
    }
}

/// Records the EOI path `bdf`'s session's wiring is on now (the kernel
/// bypass or not), for the next process, which adopts a bypass the record
/// names as the kernel has it: it must never name one the kernel does not
/// have. Nothing without a recorded session.
pub(crate) fn record_path(bdf: Bdf, bypass: bool) {
    if !fdstore::enabled() {
        return;
    }
    let path = if bypass { "bypass" } else { "user" };
    let recorded = asfound::all()
        .remove(&bdf.to_string())
        .and_then(|f| f.resume)
        .and_then(|r| r.session);
    if let Some(session) = recorded.filter(|s| s.path != path) {
        asfound::set_session(
            bdf,
            Some(SessionRecord {
                path: path.to_owned(),
                ..session
            }),
        );
    }
}

/// Records an operator hold set or lifted on `dev`, for the next process.
pub(crate) fn record_hold(dev: &ManagedDevice, held: bool) {
    if dev.handed_over.is_none() && fdstore::enabled() {
        asfound::set_held(dev.bdf(), held);
    }
}

/// Puts back the operator holds the previous process had (before any
/// session re-attaches); how many.
pub(crate) async fn restore_holds(daemon: &Arc<Daemon>, held: Vec<Bdf>) -> usize {
    let mut n = 0;
    for bdf in held {
        let Some(dev) = daemon.device(bdf) else {
            continue;
        };
        match dev.hold().await {
            Ok(()) => {
                info!(%bdf, "the operator hold is in force again after the restart");
                n += 1;
            }
            Err(e) => {
                warn!(%bdf, error = %crate::error_chain(&e), "putting the operator hold back failed");
                asfound::set_held(bdf, false);
            }
        }
    }
    n
}

impl Daemon {
    /// Makes sure the store and the record are complete for a restart that
    /// keeps every device and session; the answer to `restart`.
    pub(crate) async fn prepare_restart(&self) -> Response {
        if !fdstore::enabled() {
            return Response::error(
                ErrorKind::Unsupported,
                "no service manager keeps an fd store for this daemon (NOTIFY_SOCKET and FDSTORE \
                 are not both set; the unit needs FileDescriptorStoreMax=): a restart would lose \
                 every device and session; stop and start it instead",
            );
        }
        let flushed = tokio::task::spawn_blocking(|| fdstore::flush(FLUSH_TIMEOUT)).await;
        if !matches!(flushed, Ok(true)) {
            return Response::error(
                ErrorKind::Failed,
                format!(
                    "the service manager did not take every fd store entry within \
                     {FLUSH_TIMEOUT:?}; not restarting"
                ),
            );
        }
        let devices = self.all();
        let sessions = devices.iter().filter(|d| d.sink.attached()).count();
        let (retried, refused) = fdstore::counts();
        info!(
            devices = devices.len(),
            sessions,
            store_retried = retried,
            store_refused = refused,
            "the fd store and the record are complete for a restart"
        );
        Response::ok(RestartReply {
            pid: std::process::id(),
            devices: devices.len(),
            sessions,
        })
    }
}

/// What the store passed at start, sorted: entries of the wrong type are
/// closed (and removed from the store) with a log line each.
pub(crate) struct Passed {
    fds: BTreeMap<String, OwnedFd>,
}

impl Passed {
    /// Takes the descriptors passed at exec and checks each against its
    /// role.
    pub(crate) fn take() -> Self {
        let mut fds = BTreeMap::new();
        // Names removed from the store (FDSTOREREMOVE removes every entry
        // of a name): a good entry of the same name is stored again.
        let mut removed = std::collections::BTreeSet::new();
        for (name, fd) in fdstore::take_passed() {
            let kind = fdstore::kind_of(fd.as_fd());
            let expected = if name == CONTROL_SOCKET {
                Some(FdKind::Listener)
            } else {
                fdstore::parse(&name).and_then(|(_, role)| fdstore::expected_kind(role))
            };
            match expected {
                Some(e) if e != kind => {
                    warn!(entry = %name, "fd store entry {name} is {kind}, not {e} as its role needs; closed and removed from the store");
                    fdstore::remove(name.clone());
                    removed.insert(name);
                }
                None => {
                    warn!(entry = %name, "fd store entry {name} is not one this daemon stores; closed and removed from the store");
                    fdstore::remove(name);
                }
                Some(_) if fds.contains_key(&name) => {
                    warn!(entry = %name, "fd store entry {name} is there twice; the second is closed and removed from the store");
                    fdstore::remove(name.clone());
                    removed.insert(name);
                }
                Some(_) => {
                    fds.insert(name, fd);
                }
            }
        }
        for name in removed {
            if let Some(fd) = fds.get(&name) {
                fdstore::store(name, fd.as_fd());
            }
        }
        if !fds.is_empty() {
            info!(
                entries = fds.len(),
                "the fd store passed descriptors from a previous instance"
            );
        }
        Self { fds }
    }

    /// The listening control socket, if the store kept one bound at
    /// `socket`; another one is closed (and removed) with a log line.
    pub(crate) fn listener(&mut self, socket: &std::path::Path) -> Option<OwnedFd> {
        let fd = self.fds.remove(CONTROL_SOCKET)?;
        let listener = std::os::unix::net::UnixListener::from(fd);
        let at = listener
            .local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(std::path::Path::to_owned));
        let file_there = std::fs::symlink_metadata(socket)
            .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()));
        if at.as_deref() == Some(socket) && !file_there {
            warn!(entry = CONTROL_SOCKET, socket = %socket.display(),
                "the stored control socket's file is gone (the runtime directory was not preserved?); closed and removed from the store, a new one is bound");
            fdstore::remove(CONTROL_SOCKET.to_owned());
            return None;
        }
        if at.as_deref() == Some(socket) {
            fdstore::kept(CONTROL_SOCKET);
            Some(OwnedFd::from(listener))
        } else {
            warn!(entry = CONTROL_SOCKET, at = ?at, socket = %socket.display(),
                "the stored control socket listens elsewhere than the configured socket; closed and removed from the store");
            fdstore::remove(CONTROL_SOCKET.to_owned());
            None
        }
    }

    /// Splits the configured devices into those the store and the record
    /// let the daemon resume and those brought up afresh.
    pub(crate) fn plan(
        &self,
        configs: Vec<DeviceConfig>,
    ) -> (Vec<(DeviceConfig, Found)>, Vec<DeviceConfig>) {
        let records = asfound::all();
        let mut resume = Vec::new();
        let mut fresh = Vec::new();
        for config in configs {
            let found = records.get(&config.bdf.to_string());
            match found.and_then(|f| f.resume.as_ref().map(|r| (f, r))) {
                Some((f, r))
                    if r.backend == config.backend
                        && r.names.iter().all(|n| self.fds.contains_key(n)) =>
                {
                    resume.push((config, f.clone()));
                }
                Some(_) => {
                    info!(bdf = %config.bdf, "the record names fd store entries that are missing (or the backend changed); the device is brought up afresh, as found per its record");
                    fresh.push(config);
                }
                None => fresh.push(config),
            }
        }
        // VMMs' own device fds kept with their sessions: resumed with the
        // session, never brought up afresh (the device is the VMM's).
        for (addr, found) in records {
            let Some(r) = found.resume.as_ref().filter(|r| r.vmm_device.is_some()) else {
                continue;
            };
            let Ok(bdf) = addr.parse::<Bdf>() else {
                continue;
            };
            let complete = r.names.iter().all(|n| self.fds.contains_key(n))
                && r.session
                    .as_ref()
                    .is_some_and(|s| s.names.iter().all(|n| self.fds.contains_key(n)));
            if complete && !resume.iter().any(|(c, _)| c.bdf == bdf) {
                let config = DeviceConfig {
                    bind: false,
                    reset: false,
                    edu_test_hooks: false,
                    ..DeviceConfig::defaults(bdf, BackendKind::Vfio)
                };
                resume.push((config, found));
            } else {
                info!(%bdf, "the record's session on a VMM's own device fd has fd store entries missing; it is not resumed (its VMM sees its connection close)");
                asfound::remove(bdf);
            }
        }
        (resume, fresh)
    }

    /// Takes `names` out of the passed descriptors, if all are there.
    fn take_all(&mut self, names: &[String]) -> Option<Vec<OwnedFd>> {
        if !names.iter().all(|n| self.fds.contains_key(n)) {
            return None;
        }
        Some(names.iter().filter_map(|n| self.fds.remove(n)).collect())
    }

    /// Closes every entry nothing took, removing it from the store, with
    /// one log line each.
    pub(crate) fn close_rest(&mut self) {
        for (name, fd) in std::mem::take(&mut self.fds) {
            let why = match fdstore::parse(&name) {
                Some((bdf, _)) => format!(
                    "nothing resumed device {bdf} with it (not configured, or not in the record)"
                ),
                None => "no device".to_owned(),
            };
            warn!(entry = %name, "fd store entry {name} is not explained by the record: {why}; closed and removed from the store");
            drop(fd);
            fdstore::remove(name);
        }
    }
}

/// A session to re-attach once its device runs.
pub(crate) struct PendingSession {
    bdf: Bdf,
    owner: Option<i32>,
    fds: Vec<OwnedFd>,
}

/// Resumes the devices `plan` chose (blocking: run it on the blocking
/// pool). One that cannot be resumed is brought up afresh by the caller.
pub(crate) fn resume_devices(
    passed: &mut Passed,
    devices: Vec<(DeviceConfig, Found)>,
) -> (Opened, Vec<PendingSession>, Vec<DeviceConfig>, Vec<Bdf>) {
    let mut held = Vec::new();
    let mut opened: Opened = Vec::new();
    let mut sessions = Vec::new();
    let mut failed = Vec::new();
    for (config, found) in devices {
        let bdf = config.bdf;
        let Some(resume) = found.resume.clone() else {
            failed.push(config);
            continue;
        };
        for name in &resume.names {
            fdstore::kept(name);
        }
        match ManagedDevice::resume(config.clone(), &found, &mut passed.fds) {
            Ok(o) => {
                opened.push(o);
                if resume.held {
                    held.push(bdf);
                }
            }
            Err(e) if resume.vmm_device.is_some() => {
                // The VMM's device: not the daemon's to bring up; the
                // session ends (its entries, left untaken, are closed).
                warn!(%bdf, error = %crate::error_chain(&e), "resuming the session on a VMM's own device fd failed; the session ends (its VMM sees its connection close)");
                asfound::remove(bdf);
                for name in &resume.names {
                    fdstore::remove(name.clone());
                }
                continue;
            }
            Err(e) => {
                warn!(%bdf, error = %crate::error_chain(&e), "resuming the device failed; it is brought up afresh");
                for name in &resume.names {
                    fdstore::remove(name.clone());
                }
                asfound::set_resume(bdf, None);
                failed.push(config);
                continue;
            }
        }
        let Some(session) = resume.session else {
            continue;
        };
        match passed.take_all(&session.names) {
            Some(fds) if fds.len() == 3 => {
                for name in &session.names {
                    fdstore::kept(name);
                }
                sessions.push(PendingSession {
                    bdf,
                    owner: session.owner,
                    fds,
                });
            }
            _ => {
                info!(%bdf, "the record's session has fd store entries missing; it is not resumed (its VMM sees its connection close)");
                asfound::set_session(bdf, None);
                for name in session.names {
                    fdstore::remove(name);
                }
            }
        }
    }
    (opened, sessions, failed, held)
}

/// Re-attaches the resumed sessions (before READY=1), each served on a
/// task of its own; how many were.
pub(crate) async fn resume_sessions(daemon: &Arc<Daemon>, sessions: Vec<PendingSession>) -> usize {
    let mut n = 0;
    for s in sessions {
        let Some(dev) = daemon.device(s.bdf) else {
            asfound::set_session(s.bdf, None);
            for name in session_names(s.bdf) {
                fdstore::remove(name);
            }
            continue;
        };
        let mut fds = s.fds.into_iter();
        let (Some(irqfd), Some(resample), Some(conn)) = (fds.next(), fds.next(), fds.next()) else {
            continue;
        };
        let resumed = crate::daemon::server::resume_session(
            Arc::clone(daemon),
            dev,
            conn,
            irqfd,
            resample,
            s.owner,
        )
        .await;
        n += usize::from(resumed);
    }
    n
}
