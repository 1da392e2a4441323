//! Who holds a PCI device open: the processes a driver change would take
//! the device from.
//!
//! Unbinding a device from uio_pci_generic under a process that has its
//! `/dev/uioN` open succeeds and leaves that process with EIO; unbinding it
//! from vfio-pci while a VFIO user holds it blocks in the kernel ("blocked
//! until released by user") until that user lets go. So before changing a
//! binding the CLI asks [`Holders::of`], which scans every process's open
//! descriptors (`/proc/PID/fd`) for
//!
//! - the device's uio node (`/sys/bus/pci/devices/BDF/uio/uioN` names it),
//! - its VFIO group (`/dev/vfio/GROUP`, the `iommu_group` link),
//! - its VFIO character device (`/dev/vfio/devices/vfioN`, iommufd), and
//! - a VFIO device fd (`anon_inode:[vfio-device]`) whose fdinfo names the
//!   device (`vfio-device-syspath:`, Linux 6.18 and later). Older kernels do
//!   not say which device such an fd is for; the group fd its owner opened
//!   to get it is then the evidence.
//!
//! A process that ends while being scanned is skipped; a process whose
//! descriptors cannot be read (not root) is counted in
//! [`HolderScan::unreadable`] so that the caller can say the scan was
//! incomplete.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::pci::sysfs::{PciSysfs, SysfsError};
use crate::pci::Bdf;

/// What a holder has open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Held {
    /// The device's uio node, e.g. `/dev/uio0`.
    Uio(String),
    /// The device's VFIO group, e.g. `/dev/vfio/7`.
    VfioGroup(String),
    /// The device's VFIO character device, e.g. `/dev/vfio/devices/vfio0`.
    VfioCdev(String),
    /// A VFIO device fd the kernel names as this device's.
    VfioDevice,
}

impl fmt::Display for Held {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Held::Uio(path) | Held::VfioGroup(path) | Held::VfioCdev(path) => f.write_str(path),
            Held::VfioDevice => f.write_str("a VFIO device fd"),
        }
    }
}

/// One process holding the device, by one of its descriptors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The process.
    pub pid: u32,
    /// Its command name (`/proc/PID/comm`), `?` when it could not be read.
    pub comm: String,
    /// What it has open.
    pub held: Held,
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PID {} ({}) holds {}", self.pid, self.comm, self.held)
    }
}

/// The result of a scan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HolderScan {
    /// Every holder found, by pid, one entry per thing held.
    pub holders: Vec<Holder>,
    /// Processes whose descriptors could not be read (permission).
    pub unreadable: usize,
}

impl HolderScan {
    /// Whether any process holds the device.
    pub fn is_held(&self) -> bool {
        !self.holders.is_empty()
    }

    /// "PID 12 (qemu) holds /dev/vfio/7, PID 40 (app) holds /dev/uio0".
    pub fn describe(&self) -> String {
        self.holders
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The holders' pids, each once, in order.
    pub fn pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self.holders.iter().map(|h| h.pid).collect();
        pids.dedup();
        pids
    }
}

/// Why a scan failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HoldersError {
    /// The device's facts could not be read from sysfs.
    #[error("{bdf}: finding who holds the device")]
    Sysfs {
        /// The device.
        bdf: Bdf,
        /// The sysfs error.
        #[source]
        source: SysfsError,
    },
    /// The process table could not be listed.
    #[error("{bdf}: finding who holds the device: listing {} failed", .path.display())]
    Proc {
        /// The device.
        bdf: Bdf,
        /// The proc root.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Where to look: a sysfs tree and a proc tree (the real ones by default;
/// fake trees in tests).
#[derive(Debug, Clone)]
pub struct Holders {
    sysfs: PciSysfs,
    proc: PathBuf,
}

impl Default for Holders {
    /// `/sys` and `/proc`.
    fn default() -> Self {
        Self {
            sysfs: PciSysfs::default(),
            proc: PathBuf::from("/proc"),
        }
    }
}

/// The descriptor link targets that mean "this device".
struct Targets {
    uio: Vec<String>,
    group: Option<String>,
    cdev: Vec<String>,
    bdf: String,
}

impl Holders {
    /// Scans `proc` for holders of devices described by `sysfs`.
    pub fn new(sysfs: PciSysfs, proc: impl Into<PathBuf>) -> Self {
        Self {
            sysfs,
            proc: proc.into(),
        }
    }

    /// Every process holding `bdf` open, except this process.
    pub fn of(&self, bdf: Bdf) -> Result<HolderScan, HoldersError> {
        let targets = self.targets(bdf)?;
        let entries = fs::read_dir(&self.proc).map_err(|source| HoldersError::Proc {
            bdf,
            path: self.proc.clone(),
            source,
        })?;
        let me = std::process::id();
        let mut pids: Vec<u32> = entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .filter(|&pid| pid != me)
            .collect();
        pids.sort_unstable();
        let mut scan = HolderScan::default();
        for pid in pids {
            let dir = self.proc.join(pid.to_string());
            match scan_process(&dir, &targets) {
                Ok(held) => {
                    if held.is_empty() {
                        continue;
                    }
                    let comm = fs::read_to_string(dir.join("comm"))
                        .map(|c| c.trim_end().to_owned())
                        .unwrap_or_else(|_| "?".to_owned());
                    for held in held {
                        scan.holders.push(Holder {
                            pid,
                            comm: comm.clone(),
                            held,
                        });
                    }
                }
                // Ended while we looked.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(_) => scan.unreadable += 1,
            }
        }
        Ok(scan)
    }

    fn targets(&self, bdf: Bdf) -> Result<Targets, HoldersError> {
        let sysfs = |source| HoldersError::Sysfs { bdf, source };
        let dir = self.sysfs.device_dir(bdf);
        if !dir.is_dir() {
            return Err(sysfs(SysfsError::NoDevice { bdf, path: dir }));
        }
        Ok(Targets {
            uio: class_nodes(&dir.join("uio"), "uio", "/dev"),
            group: self
                .sysfs
                .iommu_group(bdf)
                .map_err(sysfs)?
                .map(|g| format!("/dev/vfio/{g}")),
            cdev: class_nodes(&dir.join("vfio-dev"), "vfio", "/dev/vfio/devices"),
            bdf: bdf.to_string(),
        })
    }
}

/// `<dev>/<name>` for every entry of `dir` whose name starts with `prefix`.
fn class_nodes(dir: &Path, prefix: &str, dev: &str) -> Vec<String> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut nodes: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .map(|n| format!("{dev}/{n}"))
        .collect();
    nodes.sort();
    nodes
}

/// What one process (its `/proc/PID` directory) holds of the targets.
fn scan_process(dir: &Path, t: &Targets) -> io::Result<Vec<Held>> {
    let mut held = Vec::new();
    for entry in fs::read_dir(dir.join("fd"))? {
        let Ok(entry) = entry else { continue };
        // A descriptor closed meanwhile has no link any more.
        let Ok(link) = fs::read_link(entry.path()) else {
            continue;
        };
        let link = link.to_string_lossy();
        let found = if t.uio.iter().any(|u| *u == link) {
            Some(Held::Uio(link.into_owned()))
        } else if t.group.as_deref() == Some(&*link) {
            Some(Held::VfioGroup(link.into_owned()))
        } else if t.cdev.iter().any(|c| *c == link) {
            Some(Held::VfioCdev(link.into_owned()))
        } else if link == "anon_inode:[vfio-device]"
            && names_device(&dir.join("fdinfo").join(entry.file_name()), &t.bdf)
        {
            Some(Held::VfioDevice)
        } else {
            None
        };
        if let Some(found) = found {
            if !held.contains(&found) {
                held.push(found);
            }
        }
    }
    Ok(held)
}

/// Whether a VFIO device fd's fdinfo names `bdf` (`vfio-device-syspath:
/// /sys/devices/pci0000:00/0000:00:03.0`, Linux 6.18+).
fn names_device(fdinfo: &Path, bdf: &str) -> bool {
    let Ok(text) = fs::read_to_string(fdinfo) else {
        return false;
    };
    text.lines()
        .filter_map(|l| l.strip_prefix("vfio-device-syspath:"))
        .any(|p| Path::new(p.trim()).file_name().and_then(|n| n.to_str()) == Some(bdf))
}
