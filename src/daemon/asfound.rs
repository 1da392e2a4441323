//! The "as found" record: what each configured device was like before the
//! daemon touched it — its COMMAND and the driver it had — kept in the
//! runtime directory beside the instance lock (`<socket>.as-found`).
//!
//! In memory alone, that state dies with the process: a daemon killed with
//! SIGKILL (or aborted by a panic) and started again would find each device
//! as the crash left it (bound to the daemon's driver, COMMAND with its
//! own bits) and hand that back at its next stop as if it were the original.
//! So an entry is written when a device is brought up and removed when it
//! is handed back; a graceful stop leaves the record empty. At start, an
//! entry for a configured device means the previous instance did not hand
//! it back: its COMMAND and previous driver are taken from the record.
//!
//! Only the process holding the instance lock uses the record ([`init`]
//! after the lock is taken); without it every call does nothing. Each write
//! replaces the file atomically (a temporary file in the same directory,
//! then renamed over it). A record that cannot be read or parsed is
//! reported and ignored: the daemon starts clean, as without one.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, PoisonError};

use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::pci::sysfs::Binding;
use crate::pci::Bdf;

/// What one device was like when the first instance found it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Found {
    /// COMMAND before the daemon armed the device.
    pub(crate) command: u16,
    /// The driver change the daemon made (`bind = true`), to be undone.
    pub(crate) binding: Option<BindingRecord>,
    /// What a restart needs to resume the device from systemd's fd store
    /// (absent in records of versions before it, and without a store).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) resume: Option<Resume>,
}

/// The resume part of a device's record: how it was reached and wired, and
/// the fd store entries that hold it. Written after its entries were sent
/// to the store, so an entry the record names may be missing (a crash in
/// between) but never one the record should name and does not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Resume {
    /// The backend (`vfio`, `uio`, `sim`).
    pub(crate) backend: crate::daemon::config::BackendKind,
    /// The device's store entries (`0000-00-04.0.sim-state`, ...).
    pub(crate) names: Vec<String>,
    /// The VMM session attached, if one is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) session: Option<SessionRecord>,
    /// An operator hold (`mask`) is in force.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) held: bool,
    /// A VMM's own VFIO device fd, taken over for its session (not a
    /// configured device): resumed only with that session, never brought
    /// up afresh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) vmm_device: Option<VmmDevice>,
}

/// A VMM's own device in the record: what the hand-over was told.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct VmmDevice {
    /// The address the VMM claimed (checked against the fd again at
    /// resume), if it claimed one.
    pub(crate) claimed: Option<String>,
    /// The EOI path the VMM asked for.
    pub(crate) path: crate::daemon::config::PathSetting,
}

/// A VMM session in the record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SessionRecord {
    /// The session's id: its device's address (one session per device).
    pub(crate) id: String,
    /// Its role: `vmm` (a VMM's session on a device the daemon owns).
    pub(crate) role: String,
    /// The EOI path it took: `bypass` or `user`.
    pub(crate) path: String,
    /// The VMM's pid (SO_PEERCRED), which may act on the device.
    pub(crate) owner: Option<i32>,
    /// Its store entries: irqfd, resample eventfd, connection.
    pub(crate) names: Vec<String>,
}

/// A [`Binding`] as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct BindingRecord {
    driver: String,
    previous: Option<String>,
    previous_override: Option<String>,
}

impl BindingRecord {
    /// The record of a binding that changed the driver; `None` for one that
    /// found the device already bound (nothing to undo).
    pub(crate) fn of(binding: &Binding) -> Option<Self> {
        binding.changed().then(|| Self {
            driver: binding.driver().to_owned(),
            previous: binding.previous().map(str::to_owned),
            previous_override: binding.previous_override().map(str::to_owned),
        })
    }

    /// The binding as the first instance made it, for `bdf`, if it was to
    /// `driver`.
    pub(crate) fn binding(&self, bdf: Bdf, driver: &str) -> Option<Binding> {
        (self.driver == driver).then(|| {
            Binding::recorded(
                bdf,
                driver,
                self.previous.clone(),
                self.previous_override.clone(),
            )
        })
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Record {
    /// By PCI address (`0000:01:00.0`).
    devices: BTreeMap<String, Found>,
}

struct Store {
    path: PathBuf,
    /// Serializes read-modify-write of the file within the process.
    lock: Mutex<()>,
}

static STORE: OnceLock<Store> = OnceLock::new();

/// The record's file for the daemon whose socket is `socket`.
pub(crate) fn path_for(socket: &Path) -> PathBuf {
    let mut name = socket.as_os_str().to_owned();
    name.push(".as-found");
    PathBuf::from(name)
}

/// Enables the record, for the process that holds the instance lock.
pub(crate) fn init(socket: &Path) {
    let _ = STORE.set(Store {
        path: path_for(socket),
        lock: Mutex::new(()),
    });
}

/// The recorded state of `bdf`, if the previous instance did not hand it
/// back.
pub(crate) fn get(bdf: Bdf) -> Option<Found> {
    let store = STORE.get()?;
    let _guard = store.lock.lock().unwrap_or_else(PoisonError::into_inner);
    read(&store.path).devices.remove(&bdf.to_string())
}

/// Records how `bdf` was found (when it was brought up).
pub(crate) fn put(bdf: Bdf, found: Found) {
    update(|r| {
        r.devices.insert(bdf.to_string(), found);
    });
}

/// Sets the resume part of `bdf`'s entry (after its fds were stored).
pub(crate) fn set_resume(bdf: Bdf, resume: Option<Resume>) {
    update(|r| {
        if let Some(found) = r.devices.get_mut(&bdf.to_string()) {
            found.resume = resume;
        }
    });
}

/// Sets the session part of `bdf`'s resume record.
pub(crate) fn set_session(bdf: Bdf, session: Option<SessionRecord>) {
    update(|r| {
        if let Some(resume) = r
            .devices
            .get_mut(&bdf.to_string())
            .and_then(|f| f.resume.as_mut())
        {
            resume.session = session;
        }
    });
}

/// Sets whether an operator hold is in force on `bdf`.
pub(crate) fn set_held(bdf: Bdf, held: bool) {
    update(|r| {
        if let Some(resume) = r
            .devices
            .get_mut(&bdf.to_string())
            .and_then(|f| f.resume.as_mut())
        {
            resume.held = held;
        }
    });
}

/// Every device's entry (at start, for the resume).
pub(crate) fn all() -> BTreeMap<String, Found> {
    match STORE.get() {
        Some(store) => {
            let _guard = store.lock.lock().unwrap_or_else(PoisonError::into_inner);
            read(&store.path).devices
        }
        None => BTreeMap::new(),
    }
}

/// Forgets `bdf` (it was handed back as found).
pub(crate) fn remove(bdf: Bdf) {
    update(|r| {
        r.devices.remove(&bdf.to_string());
    });
}

fn update(change: impl FnOnce(&mut Record)) {
    let Some(store) = STORE.get() else {
        return;
    };
    let _guard = store.lock.lock().unwrap_or_else(PoisonError::into_inner);
    let mut record = read(&store.path);
    change(&mut record);
    if let Err(e) = write(&store.path, &record) {
        warn!(path = %store.path.display(), error = %e,
            "writing the as-found record failed; a restart after a crash would take the devices' current state as found");
    }
}

fn read(path: &Path) -> Record {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            warn!(path = %path.display(), error = %e, "the as-found record is not readable; ignored");
            Record::default()
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Record::default(),
        Err(e) => {
            warn!(path = %path.display(), error = %e, "reading the as-found record failed; ignored");
            Record::default()
        }
    }
}

/// Replaces the file atomically: a crash of the process leaves the old
/// record or the new one, never half of one. No fsync: the record only
/// means something within one boot (the runtime directory is a tmpfs, and
/// after a reboot every device is found afresh anyway), and 256 devices
/// brought up one after another would pay one each.
fn write(path: &Path, record: &Record) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let bytes = serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(&bytes)?;
    drop(file);
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_survives_a_round_trip_and_a_torn_one_is_ignored() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| unreachable!("{e}"));
        let path = dir.path().join("control.sock.as-found");
        let mut r = Record::default();
        r.devices.insert(
            "0000:01:00.0".into(),
            Found {
                command: 0x0103,
                binding: Some(BindingRecord {
                    driver: "vfio-pci".into(),
                    previous: Some("uio_pci_generic".into()),
                    previous_override: None,
                }),
                resume: Some(Resume {
                    backend: crate::daemon::config::BackendKind::Sim,
                    names: vec!["0000-01-00.0.sim-state".into()],
                    session: Some(SessionRecord {
                        id: "0000:01:00.0".into(),
                        role: "vmm".into(),
                        path: "user".into(),
                        owner: Some(42),
                        names: vec!["0000-01-00.0.session-conn".into()],
                    }),
                    held: true,
                    vmm_device: None,
                }),
            },
        );
        // A VMM's own device fd with its session.
        r.devices.insert(
            "0000:02:00.0".into(),
            Found {
                command: 0x0507,
                binding: None,
                resume: Some(Resume {
                    backend: crate::daemon::config::BackendKind::Vfio,
                    names: vec![
                        "0000-02-00.0.vfio-device".into(),
                        "0000-02-00.0.delivery".into(),
                    ],
                    session: Some(SessionRecord {
                        id: "0000:02:00.0".into(),
                        role: "vmm-device".into(),
                        path: "bypass".into(),
                        owner: Some(43),
                        names: vec!["0000-02-00.0.session-conn".into()],
                    }),
                    held: false,
                    vmm_device: Some(VmmDevice {
                        claimed: Some("0000:02:00.0".into()),
                        path: crate::daemon::config::PathSetting::Auto,
                    }),
                }),
            },
        );
        write(&path, &r).unwrap_or_else(|e| unreachable!("{e}"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| unreachable!("{e}"));
        assert!(text.contains("\"vmm-device\""), "{text}");
        let back = read(&path);
        assert_eq!(back.devices, r.devices);
        std::fs::write(&path, b"{\"devices\": {\"0000:01:00.0\": {\"comm")
            .unwrap_or_else(|e| unreachable!("{e}"));
        assert!(read(&path).devices.is_empty());
    }
}
