//! Host facts from sysfs: IOMMU groups, drivers, binding, reset methods,
//! IRQ lines, and the INTx masking verdict.
//!
//! Every path is resolved under a configurable sysfs root (default `/sys`),
//! `/proc/interrupts` and `/dev` locations, so that the logic can be tested
//! against a fake tree in a temporary directory. [`PciSysfs::default`] uses
//! the real locations.
//!
//! The kernel rules these helpers follow, with the kernel source they come
//! from:
//!
//! - **VFIO group viability** (Linux 5.19 and later, `iommu_group_claim_dma_owner`
//!   in drivers/iommu/iommu.c, used by vfio's `VFIO_GROUP_GET_STATUS` and
//!   `VFIO_GROUP_SET_CONTAINER`): a group can be handed to user space when no
//!   member is bound to a driver that uses the kernel DMA API. Drivers that
//!   declare `driver_managed_dma` are exempt: the vfio drivers (vfio-pci and
//!   its variants), `pci-stub` and `pcieport`. Unbound members are fine.
//!   Before 5.19 (`vfio_dev_viable`) any bridge was allowed whatever its
//!   driver; today a bridge counts only through `pcieport` or no driver.
//! - **Binding**: `driver_override` + `drivers_probe`, as `driverctl` and
//!   libvirt do. A failed probe does not make the `drivers_probe` write fail,
//!   so the result is checked through the `driver` link.
//! - **Reset**: the `reset` attribute exists only when the device has a reset
//!   method; `reset_method` lists them (Linux 5.15 and later).
//! - **vfio-pci `nointxmask`**: read once when `vfio_pci` is loaded
//!   (`vfio_pci_core_set_params`); a later write to the parameter file changes
//!   the file but not vfio-pci's behaviour until the module is reloaded.

mod binding;
mod config_space;
mod error;
mod facts;
mod proc;

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::pci::config::ConfigSpace;
use crate::pci::intx::{self, MaskingReason, MaskingSupport};
use crate::pci::regs::PCI_INTERRUPT_PIN;
use crate::pci::{Bdf, Width};

pub use binding::Binding;
pub use config_space::SysfsConfig;
pub use error::SysfsError;
pub use facts::{
    driver_allows_vfio, vfio_hides_intx, DeviceDriver, GroupMember, IrqLine, MaskingVerdict,
    PciIds, Source, VfioViability,
};
use facts::{driver_name, refusal_reason};
pub use proc::{interrupt_count, interrupt_handlers};

/// Name of the vfio-pci driver in sysfs.
pub const VFIO_PCI: &str = "vfio-pci";
/// Name of the uio_pci_generic driver in sysfs.
pub const UIO_PCI_GENERIC: &str = "uio_pci_generic";
/// Name of the pci-stub driver in sysfs.
pub const PCI_STUB: &str = "pci-stub";
/// Name of the PCI Express port driver in sysfs.
pub const PCIEPORT: &str = "pcieport";

/// Smallest config file the crate accepts: the standard header.
const MIN_CONFIG_SIZE: u64 = 64;

/// Where the host's PCI facts are: the sysfs root, `/proc/interrupts` and
/// `/dev`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciSysfs {
    root: PathBuf,
    proc_interrupts: PathBuf,
    dev: PathBuf,
}

impl Default for PciSysfs {
    /// `/sys`, `/proc/interrupts`, `/dev`.
    fn default() -> Self {
        Self {
            root: PathBuf::from("/sys"),
            proc_interrupts: PathBuf::from("/proc/interrupts"),
            dev: PathBuf::from("/dev"),
        }
    }
}

/// Reads a file of a device, naming the device and operation on failure.
fn read_to_string(bdf: Bdf, path: &Path, op: &'static str) -> Result<String, SysfsError> {
    fs::read_to_string(path).map_err(|source| SysfsError::Io {
        bdf,
        op,
        path: path.to_owned(),
        source,
    })
}

/// The last path component of a symlink's target, or `None` when the link
/// does not exist.
fn link_name(bdf: Bdf, path: &Path, op: &'static str) -> Result<Option<String>, SysfsError> {
    match fs::read_link(path) {
        Ok(target) => match target.file_name().and_then(|n| n.to_str()) {
            Some(name) => Ok(Some(name.to_owned())),
            None => Err(SysfsError::Parse {
                bdf,
                op,
                path: path.to_owned(),
                content: target.display().to_string(),
            }),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(SysfsError::Io {
            bdf,
            op,
            path: path.to_owned(),
            source,
        }),
    }
}

/// Writes `value` to a sysfs attribute in one `write(2)`, as `echo` does.
fn write_attr(bdf: Bdf, path: &Path, value: &str, op: &'static str) -> Result<(), SysfsError> {
    let io = |source| SysfsError::Io {
        bdf,
        op,
        path: path.to_owned(),
        source,
    };
    // No O_CREAT: a missing attribute is an error, never a new file.
    let mut file = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(io)?;
    file.write_all(value.as_bytes()).map_err(io)
}

/// Parses "0x1234".
fn parse_hex_u16(text: &str) -> Option<u16> {
    let t = text.trim();
    u16::from_str_radix(t.strip_prefix("0x").unwrap_or(t), 16).ok()
}

impl PciSysfs {
    /// The real host: `/sys`, `/proc/interrupts`, `/dev`.
    pub fn new() -> Self {
        Self::default()
    }

    /// A sysfs tree rooted at `root` (instead of `/sys`); `/proc/interrupts`
    /// and `/dev` stay the real ones unless set too.
    pub fn with_root(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            ..Self::default()
        }
    }

    /// Uses `path` instead of `/proc/interrupts`.
    pub fn proc_interrupts(mut self, path: impl Into<PathBuf>) -> Self {
        self.proc_interrupts = path.into();
        self
    }

    /// Uses `path` instead of `/dev` for device nodes.
    pub fn dev_root(mut self, path: impl Into<PathBuf>) -> Self {
        self.dev = path.into();
        self
    }

    /// The sysfs root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn devices_dir(&self) -> PathBuf {
        self.root.join("bus/pci/devices")
    }

    fn drivers_dir(&self) -> PathBuf {
        self.root.join("bus/pci/drivers")
    }

    /// The device's directory, `<root>/bus/pci/devices/<bdf>`.
    pub fn device_dir(&self, bdf: Bdf) -> PathBuf {
        self.devices_dir().join(bdf.to_string())
    }

    /// The device's directory, or [`SysfsError::NoDevice`].
    fn existing_device_dir(&self, bdf: Bdf) -> Result<PathBuf, SysfsError> {
        let dir = self.device_dir(bdf);
        if dir.is_dir() {
            Ok(dir)
        } else {
            Err(SysfsError::NoDevice { bdf, path: dir })
        }
    }

    /// Whether the device exists.
    pub fn exists(&self, bdf: Bdf) -> bool {
        self.device_dir(bdf).is_dir()
    }

    /// Every PCI device the host has, in address order.
    pub fn devices(&self) -> Result<Vec<Bdf>, SysfsError> {
        let dir = self.devices_dir();
        let io = |source| SysfsError::Host {
            op: "listing PCI devices",
            path: dir.clone(),
            source,
        };
        let mut devices = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            if let Some(bdf) = entry.file_name().to_str().and_then(|n| n.parse().ok()) {
                devices.push(bdf);
            }
        }
        devices.sort();
        Ok(devices)
    }

    /// Vendor and device ID.
    pub fn ids(&self, bdf: Bdf) -> Result<PciIds, SysfsError> {
        let dir = self.existing_device_dir(bdf)?;
        let read = |name: &str, op| {
            let path = dir.join(name);
            let text = read_to_string(bdf, &path, op)?;
            parse_hex_u16(&text).ok_or(SysfsError::Parse {
                bdf,
                op,
                path,
                content: text,
            })
        };
        Ok(PciIds {
            vendor: read("vendor", "reading the vendor ID")?,
            device: read("device", "reading the device ID")?,
        })
    }

    /// The driver the device is bound to (the `driver` link), if any.
    pub fn driver(&self, bdf: Bdf) -> Result<Option<String>, SysfsError> {
        let dir = self.existing_device_dir(bdf)?;
        link_name(bdf, &dir.join("driver"), "reading the driver link")
    }

    /// The device's `driver_override`, if set.
    pub fn driver_override(&self, bdf: Bdf) -> Result<Option<String>, SysfsError> {
        let path = self.existing_device_dir(bdf)?.join("driver_override");
        match fs::read_to_string(&path) {
            Ok(text) => {
                let t = text.trim();
                Ok((!t.is_empty() && t != "(null)").then(|| t.to_owned()))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(SysfsError::Io {
                bdf,
                op: "reading driver_override",
                path,
                source,
            }),
        }
    }

    /// The device's IOMMU group number (the `iommu_group` link), if any.
    pub fn iommu_group(&self, bdf: Bdf) -> Result<Option<u32>, SysfsError> {
        let path = self.existing_device_dir(bdf)?.join("iommu_group");
        let op = "reading the iommu_group link";
        match link_name(bdf, &path, op)? {
            None => Ok(None),
            Some(name) => name.parse().map(Some).map_err(|_| SysfsError::Parse {
                bdf,
                op,
                path,
                content: name,
            }),
        }
    }

    /// The members of the device's IOMMU group with their drivers, or
    /// [`SysfsError::NoIommuGroup`].
    pub fn iommu_group_members(&self, bdf: Bdf) -> Result<(u32, Vec<GroupMember>), SysfsError> {
        let group = self
            .iommu_group(bdf)?
            .ok_or_else(|| SysfsError::NoIommuGroup {
                bdf,
                path: self.device_dir(bdf).join("iommu_group"),
            })?;
        let dir = self
            .root
            .join("kernel/iommu_groups")
            .join(group.to_string())
            .join("devices");
        let io = |source| SysfsError::Io {
            bdf,
            op: "listing the IOMMU group's devices",
            path: dir.clone(),
            source,
        };
        let mut members = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let driver = link_name(
                bdf,
                &entry.path().join("driver"),
                "reading an IOMMU group member's driver link",
            )?;
            members.push(GroupMember {
                bdf: name.parse().ok(),
                name,
                driver,
            });
        }
        members.sort_by(|a, b| a.name.cmp(&b.name));
        Ok((group, members))
    }

    /// Whether the device's IOMMU group can be handed to VFIO (see the
    /// module documentation for the kernel's rule).
    pub fn vfio_viability(&self, bdf: Bdf) -> Result<VfioViability, SysfsError> {
        let (group, members) = self.iommu_group_members(bdf)?;
        Ok(VfioViability { group, members })
    }

    /// The device's reset methods (`reset_method`, e.g. `["flr", "bus"]`);
    /// empty when it has none. On kernels before 5.15, which have no
    /// `reset_method`, the presence of the `reset` attribute is reported as
    /// `["unknown"]`.
    pub fn reset_methods(&self, bdf: Bdf) -> Result<Vec<String>, SysfsError> {
        let dir = self.existing_device_dir(bdf)?;
        let path = dir.join("reset_method");
        match fs::read_to_string(&path) {
            Ok(text) => Ok(text.split_whitespace().map(str::to_owned).collect()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // The attribute is hidden when there is no method; on older
                // kernels it does not exist at all, but `reset` does.
                Ok(if dir.join("reset").exists() {
                    vec!["unknown".to_owned()]
                } else {
                    Vec::new()
                })
            }
            Err(source) => Err(SysfsError::Io {
                bdf,
                op: "reading reset_method",
                path,
                source,
            }),
        }
    }

    /// The device's host IRQ (`irq` in sysfs); `None` when it is 0 (no
    /// INTx routed).
    ///
    /// Until a driver enables the device (`pci_enable_device`), this is the
    /// firmware's INTERRUPT_LINE. Enabling routes INTx through ACPI to the
    /// IO-APIC line a handler is really registered on, which can differ: in
    /// the test guest both vfio edus show IRQ 10 until vfio-pci opens them,
    /// then 20 and 21. vfio-pci enables a device when a user opens it,
    /// uio_pci_generic when it binds. With MSI (not MSI-X) enabled the
    /// kernel shows the first MSI IRQ instead.
    pub fn irq(&self, bdf: Bdf) -> Result<Option<u32>, SysfsError> {
        let path = self.existing_device_dir(bdf)?.join("irq");
        let op = "reading the IRQ number";
        let text = read_to_string(bdf, &path, op)?;
        match text.trim().parse::<u32>() {
            Ok(0) => Ok(None),
            Ok(irq) => Ok(Some(irq)),
            Err(_) => Err(SysfsError::Parse {
                bdf,
                op,
                path,
                content: text,
            }),
        }
    }

    /// The device's host IRQ line: every other PCI device whose `irq` is the
    /// same (with its driver), and the handlers registered on it. `None`
    /// when the device has no IRQ. Ask once the device is enabled (see
    /// [`irq`](Self::irq)): before that, the number is the firmware's and
    /// the sharing it shows may not be the sharing the handlers get.
    pub fn irq_line(&self, bdf: Bdf) -> Result<Option<IrqLine>, SysfsError> {
        let Some(irq) = self.irq(bdf)? else {
            return Ok(None);
        };
        let mut shared_with = Vec::new();
        for other in self.devices()? {
            if other == bdf {
                continue;
            }
            // A device that vanished meanwhile is simply not on the line.
            match self.irq(other) {
                Ok(Some(i)) if i == irq => shared_with.push(DeviceDriver {
                    bdf: other,
                    driver: self.driver(other)?,
                }),
                Ok(_) | Err(SysfsError::NoDevice { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        let text = fs::read_to_string(&self.proc_interrupts).map_err(|source| SysfsError::Io {
            bdf,
            op: "reading the IRQ handlers",
            path: self.proc_interrupts.clone(),
            source,
        })?;
        Ok(Some(IrqLine {
            irq,
            shared_with,
            handlers: interrupt_handlers(&text, irq),
        }))
    }

    /// vfio-pci's `nointxmask` module parameter: `Some(true)` for `Y`,
    /// `Some(false)` for `N`, `None` when vfio_pci is not loaded. vfio-pci
    /// reads it once when loaded: the file can disagree with vfio-pci's
    /// behaviour if someone wrote it later.
    pub fn vfio_nointxmask(&self) -> Result<Option<bool>, SysfsError> {
        let path = self.root.join("module/vfio_pci/parameters/nointxmask");
        let op = "reading vfio_pci's nointxmask parameter";
        match fs::read_to_string(&path) {
            Ok(text) => match text.trim() {
                "Y" | "y" | "1" => Ok(Some(true)),
                "N" | "n" | "0" => Ok(Some(false)),
                _ => Err(SysfsError::HostParse {
                    op,
                    path,
                    content: text,
                }),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(SysfsError::Host { op, path, source }),
        }
    }

    /// The device's uio node, e.g. `/dev/uio0`, when uio_pci_generic (or
    /// another uio driver) has registered one.
    pub fn uio_device(&self, bdf: Bdf) -> Result<Option<PathBuf>, SysfsError> {
        let dir = self.existing_device_dir(bdf)?.join("uio");
        let io = |source| SysfsError::Io {
            bdf,
            op: "listing the uio devices",
            path: dir.clone(),
            source,
        };
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(e)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let name = entry
                .map_err(io)?
                .file_name()
                .to_string_lossy()
                .into_owned();
            if name.starts_with("uio") {
                names.push(name);
            }
        }
        names.sort();
        Ok(names.first().map(|n| self.dev.join(n)))
    }

    /// Resets the function through its sysfs `reset` attribute (the kernel
    /// saves and restores config state around it, under its own config
    /// access lock), as `echo 1 > .../reset` does.
    pub fn reset_function(&self, bdf: Bdf) -> Result<(), SysfsError> {
        let dir = self.existing_device_dir(bdf)?;
        write_attr(bdf, &dir.join("reset"), "1", "resetting through sysfs")
    }

    /// Probes INTx masking by toggling INTX_DISABLE through the sysfs
    /// `config` file ([`intx::probe_masking`]), as the kernel does at
    /// enumeration. Only for a device no driver is bound to: under any
    /// driver the toggle races a live handler (uio_pci_generic's and
    /// vfio-pci's check-and-mask, which can then see a "broken" bit on a
    /// good device) or (un)masks INTx behind a host driver's back, so every
    /// driver is refused with [`SysfsError::LiveDriver`]; use
    /// [`masking_verdict`](Self::masking_verdict) for bound devices.
    pub fn probe_masking(&self, bdf: Bdf) -> Result<MaskingSupport, SysfsError> {
        if let Some(driver) = self.driver(bdf)? {
            return Err(SysfsError::LiveDriver {
                bdf,
                op: "toggling INTX_DISABLE",
                driver,
            });
        }
        let mut config = SysfsConfig::open(self, bdf)?;
        intx::probe_masking(&mut config).map_err(|source| SysfsError::Config {
            bdf,
            op: "probing INTx masking",
            source,
        })
    }

    /// Decides whether PCI 2.3 INTx masking can be relied on for the device,
    /// from the best evidence available. INTX_DISABLE is toggled only where
    /// no driver is bound (as the kernel does at enumeration); a bound
    /// device is only read:
    ///
    /// - no driver: the toggle test through sysfs config (with the quirk
    ///   table and INTERRUPT_PIN, as [`intx::probe_masking`]);
    /// - uio_pci_generic: INTERRUPT_PIN, the quirk table, and otherwise the
    ///   binding itself ([`Source::UioBound`]: uio_pci_generic refuses
    ///   devices with broken masking);
    /// - vfio-pci, which virtualizes INTX_DISABLE and hides its own
    ///   `pci_2_3` decision: INTERRUPT_PIN, the `nointxmask` parameter,
    ///   vfio's own no-INTx list, the quirk table, and otherwise an inference;
    /// - any other driver: the same read-only inference.
    pub fn masking_verdict(&self, bdf: Bdf) -> Result<MaskingVerdict, SysfsError> {
        self.verdict(bdf, true)
    }

    /// [`masking_verdict`](Self::masking_verdict) without the toggle test:
    /// the read-only evidence only, for every driver (the daemon's answer
    /// about a device it does not own, which someone else may be using).
    pub fn masking_verdict_read_only(&self, bdf: Bdf) -> Result<MaskingVerdict, SysfsError> {
        self.verdict(bdf, false)
    }

    fn verdict(&self, bdf: Bdf, toggle: bool) -> Result<MaskingVerdict, SysfsError> {
        let driver = self.driver(bdf)?;
        let ids = self.ids(bdf)?;
        let verdict = |supported, source| MaskingVerdict {
            bdf,
            ids,
            driver: driver.clone(),
            supported,
            source,
        };
        if toggle && driver.is_none() {
            let support = self.probe_masking(bdf)?;
            let source = match support.reason {
                MaskingReason::Quirk(q) => Source::QuirkTable(q),
                MaskingReason::NoInterruptPin => Source::InterruptPin,
                reason => Source::ToggleTest(reason),
            };
            return Ok(verdict(support.supported(), source));
        }

        let mut config = SysfsConfig::open_read_only(self, bdf)?;
        let pin = config
            .config_read(PCI_INTERRUPT_PIN, Width::Byte)
            .map_err(|source| SysfsError::Config {
                bdf,
                op: "reading INTERRUPT_PIN",
                source,
            })?;
        if pin == 0 {
            return Ok(verdict(false, Source::InterruptPin));
        }
        let vfio = driver.as_deref() == Some(VFIO_PCI);
        if vfio && self.vfio_nointxmask()? == Some(true) {
            return Ok(verdict(false, Source::VfioNoIntxMask));
        }
        if vfio && vfio_hides_intx(ids.vendor, ids.device) {
            return Ok(verdict(false, Source::VfioNoIntx));
        }
        if let Some(q) = intx::masking_quirk(ids.vendor, ids.device) {
            return Ok(verdict(false, Source::QuirkTable(q)));
        }
        if driver.as_deref() == Some(UIO_PCI_GENERIC) {
            return Ok(verdict(true, Source::UioBound));
        }
        Ok(verdict(true, Source::Inference))
    }
}

/// [`PciSysfs::masking_verdict`] on the real host.
pub fn masking_verdict(bdf: Bdf) -> Result<MaskingVerdict, SysfsError> {
    PciSysfs::default().masking_verdict(bdf)
}

/// [`PciSysfs::masking_verdict_read_only`] on the real host.
pub fn masking_verdict_read_only(bdf: Bdf) -> Result<MaskingVerdict, SysfsError> {
    PciSysfs::default().masking_verdict_read_only(bdf)
}
