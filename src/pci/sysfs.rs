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

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use tracing::{debug, info, instrument, warn};

use crate::backend::{BackendError, ConfigSpace};
use crate::pci::intx::{self, MaskingQuirk, MaskingReason, MaskingSupport};
use crate::pci::regs::{PCI_CFG_SPACE_EXP_SIZE, PCI_INTERRUPT_PIN};
use crate::pci::{check_access, check_write, Bdf, Width};

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

/// Why a sysfs helper failed. Every message names the device (or the host
/// file) and the operation; the OS error is the source.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SysfsError {
    /// The device does not exist.
    #[error("{bdf}: no such PCI device (no {})", .path.display())]
    NoDevice {
        /// The device asked for.
        bdf: Bdf,
        /// The directory that is missing.
        path: PathBuf,
    },
    /// Reading or writing a file of the device failed.
    #[error("{bdf}: {op} ({}) failed", .path.display())]
    Io {
        /// The device.
        bdf: Bdf,
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A file of the device held something unexpected.
    #[error("{bdf}: {op}: unexpected content {content:?} in {}", .path.display())]
    Parse {
        /// The device.
        bdf: Bdf,
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// What it held.
        content: String,
    },
    /// Reading a host-wide file (module parameter) failed.
    #[error("{op} ({}) failed", .path.display())]
    Host {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A host-wide file held something unexpected.
    #[error("{op}: unexpected content {content:?} in {}", .path.display())]
    HostParse {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// What it held.
        content: String,
    },
    /// The device is in no IOMMU group.
    #[error(
        "{bdf}: the device has no IOMMU group (no {}): the IOMMU is off or does not cover it",
        .path.display()
    )]
    NoIommuGroup {
        /// The device.
        bdf: Bdf,
        /// The missing link.
        path: PathBuf,
    },
    /// The driver to bind to is not registered.
    #[error("{bdf}: cannot bind to {driver}: the driver is not loaded (no {})", .path.display())]
    DriverMissing {
        /// The device.
        bdf: Bdf,
        /// The driver asked for.
        driver: String,
        /// The driver directory that is missing.
        path: PathBuf,
    },
    /// The driver did not take the device.
    #[error("{bdf}: {driver} refused the device: {reason} (the device is now bound to {})",
        driver_name(.now))]
    Refused {
        /// The device.
        bdf: Bdf,
        /// The driver that refused it.
        driver: String,
        /// What the device is bound to afterwards.
        now: Option<String>,
        /// The driver's known reasons to refuse a device.
        reason: &'static str,
    },
    /// Someone else changed the binding since it was recorded.
    #[error("{bdf}: cannot restore the previous driver: the device is bound to {}, not {expected} \
        as recorded", driver_name(.now))]
    BindingChanged {
        /// The device.
        bdf: Bdf,
        /// The driver the record says the device is bound to.
        expected: String,
        /// What it is bound to.
        now: Option<String>,
    },
    /// The operation would touch a device a kernel driver is servicing.
    #[error(
        "{bdf}: refusing {op}: the device is bound to {driver}, and this would disturb a live \
        driver (unbind it, or bind it to uio_pci_generic or vfio-pci first)"
    )]
    LiveDriver {
        /// The device.
        bdf: Bdf,
        /// What was refused.
        op: &'static str,
        /// The driver servicing the device.
        driver: String,
    },
    /// A config-space access through the sysfs `config` file failed.
    #[error("{bdf}: {op} through sysfs config failed")]
    Config {
        /// The device.
        bdf: Bdf,
        /// What was being done.
        op: &'static str,
        /// The access error.
        #[source]
        source: BackendError,
    },
}

/// "no driver" or the driver's name, for messages.
fn driver_name(driver: &Option<String>) -> &str {
    driver.as_deref().unwrap_or("no driver")
}

/// What a driver is known to refuse devices for, for [`SysfsError::Refused`].
fn refusal_reason(driver: &str) -> &'static str {
    match driver {
        UIO_PCI_GENERIC => {
            "INTx masking broken (uio_pci_generic takes only devices whose PCI 2.3 masking works) \
             or enabling the device failed; see the kernel log"
        }
        VFIO_PCI => {
            "vfio-pci takes only devices with a normal header in an IOMMU group; see the kernel log"
        }
        _ => "the driver's probe failed or did not match; see the kernel log",
    }
}

/// Whether a driver leaves DMA to its user, so that the kernel lets VFIO
/// claim the IOMMU group with the device bound to it (`driver_managed_dma`
/// in Linux 5.19 and later): the vfio drivers (vfio-pci and the variant
/// drivers, which all carry "vfio" in their names), pci-stub and pcieport.
pub fn driver_allows_vfio(driver: &str) -> bool {
    driver == PCI_STUB || driver == PCIEPORT || driver.contains("vfio")
}

/// Whether vfio-pci hides the device's INTx altogether (`vfio_pci_nointx` in
/// drivers/vfio/pci/vfio_pci_core.c): devices that can disable INTx but do
/// not report it in STATUS.INTERRUPT. vfio-pci then reports no interrupt pin
/// and keeps INTX_DISABLE set on the host.
pub fn vfio_hides_intx(vendor: u16, device: u16) -> bool {
    const PCI_VENDOR_ID_INTEL: u16 = 0x8086;
    vendor == PCI_VENDOR_ID_INTEL
        && matches!(device,
            // All i40e (XL710/X710/XXV710) 10/20/25/40GbE NICs.
            0x1572 | 0x1574 | 0x1580..=0x1581 | 0x1583..=0x158b | 0x37d0..=0x37d2
            // X550.
            | 0x1563)
}

/// Vendor and device ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PciIds {
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
}

impl fmt::Display for PciIds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04x}:{:04x}", self.vendor, self.device)
    }
}

/// A PCI device and the driver it is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceDriver {
    /// The device.
    pub bdf: Bdf,
    /// Its driver, if any.
    pub driver: Option<String>,
}

impl fmt::Display for DeviceDriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.bdf, driver_name(&self.driver))
    }
}

/// A member of an IOMMU group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMember {
    /// The device's name in sysfs (the BDF for PCI devices).
    pub name: String,
    /// The PCI address, if the member is a PCI device.
    pub bdf: Option<Bdf>,
    /// Its driver, if any.
    pub driver: Option<String>,
}

impl GroupMember {
    /// Whether this member keeps the group from being handed to VFIO.
    pub fn blocks_vfio(&self) -> bool {
        self.driver
            .as_deref()
            .is_some_and(|d| !driver_allows_vfio(d))
    }
}

impl fmt::Display for GroupMember {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name, driver_name(&self.driver))
    }
}

/// Whether an IOMMU group can be handed to VFIO, and which members keep it
/// from being handed over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VfioViability {
    /// The group number (`/dev/vfio/<group>`).
    pub group: u32,
    /// Every member with its driver.
    pub members: Vec<GroupMember>,
}

impl VfioViability {
    /// Members bound to a driver that uses the kernel DMA API.
    pub fn offending(&self) -> impl Iterator<Item = &GroupMember> {
        self.members.iter().filter(|m| m.blocks_vfio())
    }

    /// Whether VFIO can take the group: every member is unbound or bound to
    /// a vfio driver, pci-stub or pcieport.
    pub fn is_viable(&self) -> bool {
        self.offending().next().is_none()
    }
}

impl fmt::Display for VfioViability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |f: &mut fmt::Formatter<'_>, members: &mut dyn Iterator<Item = &GroupMember>| {
            for (i, m) in members.enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                write!(f, "{m}")?;
            }
            Ok(())
        };
        if self.is_viable() {
            write!(
                f,
                "IOMMU group {} is viable for VFIO (members: ",
                self.group
            )?;
            list(f, &mut self.members.iter())?;
            f.write_str(")")
        } else {
            write!(
                f,
                "IOMMU group {} is not viable for VFIO: member(s) bound to a driver that uses \
                 the kernel DMA API: ",
                self.group
            )?;
            list(f, &mut self.offending())?;
            f.write_str(" (allowed: no driver, vfio drivers, pci-stub, pcieport)")
        }
    }
}

/// A device's host IRQ line, and who else is on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IrqLine {
    /// The host IRQ number (`irq` in sysfs).
    pub irq: u32,
    /// Every other PCI device whose `irq` is the same, with its driver.
    pub shared_with: Vec<DeviceDriver>,
    /// The names of the handlers registered on the line, from
    /// `/proc/interrupts` (empty when none is registered: e.g. vfio-pci
    /// registers `vfio-intx(<bdf>)` only while a user has INTx enabled).
    pub handlers: Vec<String>,
}

impl IrqLine {
    /// Whether another PCI device uses the same line.
    pub fn is_shared(&self) -> bool {
        !self.shared_with.is_empty()
    }
}

/// A driver change made by [`PciSysfs::bind`], to be undone by
/// [`PciSysfs::unbind`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    bdf: Bdf,
    driver: String,
    previous: Option<String>,
    previous_override: Option<String>,
    changed: bool,
}

impl Binding {
    /// The device.
    pub fn bdf(&self) -> Bdf {
        self.bdf
    }
    /// The driver the device was bound to.
    pub fn driver(&self) -> &str {
        &self.driver
    }
    /// The driver the device had before, restored by [`PciSysfs::unbind`].
    pub fn previous(&self) -> Option<&str> {
        self.previous.as_deref()
    }
    /// Whether [`PciSysfs::bind`] changed anything (`false`: the device was
    /// already bound to the driver, and unbinding leaves it so).
    pub fn changed(&self) -> bool {
        self.changed
    }
    /// The `driver_override` the device had before, restored by
    /// [`PciSysfs::unbind`].
    pub fn previous_override(&self) -> Option<&str> {
        self.previous_override.as_deref()
    }

    /// A binding a previous process made and recorded (the daemon's
    /// as-found record after a crash): [`PciSysfs::unbind`] undoes it.
    #[cfg(feature = "daemon")]
    pub(crate) fn recorded(
        bdf: Bdf,
        driver: &str,
        previous: Option<String>,
        previous_override: Option<String>,
    ) -> Self {
        Self {
            bdf,
            driver: driver.to_owned(),
            previous,
            previous_override,
            changed: true,
        }
    }
}

/// Which evidence decided a [`MaskingVerdict`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// INTX_DISABLE was toggled and read back through the sysfs `config`
    /// file: the device had no driver, so no handler could race the toggle
    /// (the kernel's `pci_intx_mask_broken` at enumeration). Carries
    /// [`MaskingReason::ToggleWorks`] or [`MaskingReason::BitDoesNotStick`].
    ToggleTest(MaskingReason),
    /// uio_pci_generic is bound, and it binds only devices whose PCI 2.3
    /// masking the kernel found working (`pci_intx_mask_supported` in its
    /// probe): the kernel's own enumeration-time toggle test, read from the
    /// binding. Nothing is toggled under its live check-and-mask handler.
    UioBound,
    /// The kernel's quirk table lists the device's masking as broken.
    QuirkTable(&'static MaskingQuirk),
    /// INTERRUPT_PIN is 0: the device has no INTx.
    InterruptPin,
    /// vfio-pci runs with `nointxmask=1`: it masks with `disable_irq` on an
    /// exclusive host line instead of PCI 2.3 masking.
    VfioNoIntxMask,
    /// vfio-pci hides this device's INTx ([`vfio_hides_intx`]).
    VfioNoIntx,
    /// Inferred without touching the device, because its driver
    /// virtualizes or owns INTX_DISABLE: it has an INTx pin, it is not in the
    /// quirk table, and (for vfio-pci) `nointxmask` is off. The kernel's own
    /// toggle test at enumeration is not visible to user space.
    Inference,
}

impl Source {
    /// A short stable name of the evidence, for `--json` and metrics:
    /// `toggle-test`, `uio-bound`, `quirk-table`, `interrupt-pin`,
    /// `vfio-nointxmask`, `vfio-nointx` or `inference`.
    pub fn evidence(&self) -> &'static str {
        match self {
            Source::ToggleTest(_) => "toggle-test",
            Source::UioBound => "uio-bound",
            Source::QuirkTable(_) => "quirk-table",
            Source::InterruptPin => "interrupt-pin",
            Source::VfioNoIntxMask => "vfio-nointxmask",
            Source::VfioNoIntx => "vfio-nointx",
            Source::Inference => "inference",
        }
    }

    /// Whether the verdict came from toggling INTX_DISABLE on the device.
    pub fn toggled(&self) -> bool {
        matches!(self, Source::ToggleTest(_))
    }
}

/// Whether PCI 2.3 INTx masking can be relied on for a device, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaskingVerdict {
    /// The device.
    pub bdf: Bdf,
    /// Its IDs.
    pub ids: PciIds,
    /// The driver it is bound to.
    pub driver: Option<String>,
    /// Whether INTx is masked with PCI 2.3 INTX_DISABLE, so that the host
    /// line can be shared.
    pub supported: bool,
    /// The evidence that decided.
    pub source: Source,
}

impl fmt::Display for MaskingVerdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}, {}): ",
            self.bdf,
            self.ids,
            driver_name(&self.driver)
        )?;
        match self.source {
            Source::ToggleTest(MaskingReason::BitDoesNotStick {
                original,
                written,
                read_back,
            }) => write!(
                f,
                "INTx masking is broken: INTX_DISABLE does not stick (COMMAND {original:#06x} \
                 written as {written:#06x} read back {read_back:#06x} through sysfs config); the \
                 host line must be exclusive"
            ),
            Source::ToggleTest(_) => f.write_str(
                "PCI 2.3 INTx masking works: INTX_DISABLE toggled and read back through sysfs \
                 config (no driver bound); the host line can be shared",
            ),
            Source::UioBound => f.write_str(
                "PCI 2.3 INTx masking works: uio_pci_generic bound the device, and it binds only \
                 devices whose masking the kernel found working (not toggled under its live \
                 handler; INTx pin present, not in the kernel quirk table); the host line can be \
                 shared",
            ),
            Source::QuirkTable(q) => write!(
                f,
                "INTx masking is broken on {} (kernel quirk table); the host line must be \
                 exclusive",
                q.name
            ),
            Source::InterruptPin => {
                f.write_str("the device has no INTx pin: there is no INTx to mask")
            }
            Source::VfioNoIntxMask => f.write_str(
                "vfio-pci is in disable_irq mode (nointxmask=1): the host line is exclusive",
            ),
            Source::VfioNoIntx => f.write_str(
                "vfio-pci hides this device's INTx (STATUS.INTERRUPT is unreliable on it): no \
                 INTx is offered to user space",
            ),
            Source::Inference => write!(
                f,
                "PCI 2.3 INTx masking inferred to work ({} owns INTX_DISABLE, so it was not \
                 toggled: INTx pin present, not in the kernel quirk table{}); the host line can \
                 be shared",
                driver_name(&self.driver),
                if self.driver.as_deref() == Some(VFIO_PCI) {
                    ", vfio-pci nointxmask off"
                } else {
                    ""
                }
            ),
        }
    }
}

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

    /// Binds the device to `driver` the kernel way: unbind the current
    /// driver, set `driver_override`, write the address to `drivers_probe`,
    /// and check the `driver` link. Already bound to `driver`: nothing
    /// changes. On failure the previous driver is put back (best effort) and
    /// the error says why the driver refused. Keep the returned [`Binding`]
    /// for [`unbind`](Self::unbind).
    #[instrument(skip_all, fields(bdf = %bdf, driver))]
    pub fn bind(&self, bdf: Bdf, driver: &str) -> Result<Binding, SysfsError> {
        self.existing_device_dir(bdf)?;
        let driver_dir = self.drivers_dir().join(driver);
        if !driver_dir.is_dir() {
            return Err(SysfsError::DriverMissing {
                bdf,
                driver: driver.to_owned(),
                path: driver_dir,
            });
        }
        let previous = self.driver(bdf)?;
        let previous_override = self.driver_override(bdf)?;
        let mut binding = Binding {
            bdf,
            driver: driver.to_owned(),
            previous,
            previous_override,
            changed: false,
        };
        if binding.previous.as_deref() == Some(driver) {
            debug!(driver, "already bound");
            return Ok(binding);
        }
        binding.changed = true;
        let bound = self
            .unbind_current(bdf)
            .and_then(|()| self.attach(bdf, driver));
        match bound {
            Ok(()) => {
                info!(driver, previous = ?binding.previous, "bound");
                Ok(binding)
            }
            Err(error) => {
                if let Err(e) = self.unbind(&binding) {
                    warn!(error = %crate::error_chain(&e), "restoring the previous driver failed");
                }
                Err(error)
            }
        }
    }

    /// Undoes a [`bind`](Self::bind): unbinds the device from the driver it
    /// was bound to, binds the previous driver again (if there was one) and
    /// restores `driver_override`. Does nothing when the bind changed
    /// nothing; refuses when someone else rebound the device meanwhile.
    #[instrument(skip_all, fields(bdf = %binding.bdf))]
    pub fn unbind(&self, binding: &Binding) -> Result<(), SysfsError> {
        if !binding.changed {
            return Ok(());
        }
        let bdf = binding.bdf;
        let now = self.driver(bdf)?;
        let reattach = match now.as_deref() {
            Some(d) if d == binding.driver => {
                self.unbind_current(bdf)?;
                true
            }
            // A failed bind can leave the device unbound.
            None => true,
            // Already back (e.g. a second unbind).
            Some(d) if Some(d) == binding.previous.as_deref() => false,
            Some(_) => {
                return Err(SysfsError::BindingChanged {
                    bdf,
                    expected: binding.driver.clone(),
                    now,
                })
            }
        };
        let attached = match (&binding.previous, reattach) {
            (Some(previous), true) => self.attach(bdf, previous),
            _ => Ok(()),
        };
        // Restore the override whatever happened; "\n" clears it.
        let path = self.device_dir(bdf).join("driver_override");
        let value = binding.previous_override.as_deref().unwrap_or("\n");
        let restored = write_attr(bdf, &path, value, "restoring driver_override");
        attached.and(restored)?;
        info!(
            driver = binding.previous.as_deref().unwrap_or("none"),
            "previous driver restored"
        );
        Ok(())
    }

    /// Unbinds the device from whatever driver it has and clears
    /// `driver_override`, leaving it unbound (the operator's `vfio-intx
    /// unbind`, where no [`Binding`] was kept). Returns the driver it had.
    #[instrument(skip_all, fields(bdf = %bdf))]
    pub fn unbind_device(&self, bdf: Bdf) -> Result<Option<String>, SysfsError> {
        let dir = self.existing_device_dir(bdf)?;
        let previous = self.driver(bdf)?;
        self.unbind_current(bdf)?;
        write_attr(
            bdf,
            &dir.join("driver_override"),
            "\n",
            "clearing driver_override",
        )?;
        info!(previous = previous.as_deref().unwrap_or("none"), "unbound");
        Ok(previous)
    }

    /// Resets the function through its sysfs `reset` attribute (the kernel
    /// saves and restores config state around it, under its own config
    /// access lock), as `echo 1 > .../reset` does.
    pub fn reset_function(&self, bdf: Bdf) -> Result<(), SysfsError> {
        let dir = self.existing_device_dir(bdf)?;
        write_attr(bdf, &dir.join("reset"), "1", "resetting through sysfs")
    }

    /// Unbinds the device from its current driver, if any.
    fn unbind_current(&self, bdf: Bdf) -> Result<(), SysfsError> {
        let dir = self.device_dir(bdf);
        if self.driver(bdf)?.is_some() {
            write_attr(
                bdf,
                &dir.join("driver/unbind"),
                &bdf.to_string(),
                "unbinding from the current driver",
            )?;
        }
        Ok(())
    }

    /// Binds an unbound device to `driver` through `driver_override` and
    /// `drivers_probe`, and checks that it took.
    fn attach(&self, bdf: Bdf, driver: &str) -> Result<(), SysfsError> {
        let dir = self.device_dir(bdf);
        write_attr(
            bdf,
            &dir.join("driver_override"),
            driver,
            "writing driver_override",
        )?;
        write_attr(
            bdf,
            &self.root.join("bus/pci/drivers_probe"),
            &bdf.to_string(),
            "probing drivers (drivers_probe)",
        )?;
        let now = self.driver(bdf)?;
        if now.as_deref() == Some(driver) {
            Ok(())
        } else {
            Err(SysfsError::Refused {
                bdf,
                driver: driver.to_owned(),
                now,
                reason: refusal_reason(driver),
            })
        }
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

/// The handler names registered on `irq` in the text of `/proc/interrupts`
/// (empty when the IRQ is not listed or has no handler).
///
/// A line reads `IRQ: <count per CPU> <chip> <hwirq>-<flow> <name>, <name>...`,
/// e.g. ` 22:   123   IO-APIC  22-fasteoi   uio_pci_generic, ahci[0000:00:1f.2]`
/// (`show_interrupts` in kernel/irq/proc.c). Names may contain spaces
/// ("PCIe PME"), so they are split at ", " only.
pub fn interrupt_handlers(proc_interrupts: &str, irq: u32) -> Vec<String> {
    let mut lines = proc_interrupts.lines();
    let cpus = lines
        .next()
        .map_or(0, |header| header.split_whitespace().count());
    let label = format!("{irq}:");
    for line in lines {
        let rest = line.trim_start();
        let Some(rest) = rest.strip_prefix(&label) else {
            continue;
        };
        let mut rest = rest;
        // Skip the per-CPU counts.
        for _ in 0..cpus {
            rest = rest.trim_start();
            let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
            if !rest[..end].bytes().all(|b| b.is_ascii_digit()) {
                break;
            }
            rest = &rest[end..];
        }
        // The chip name, then the hwirq and flow ("22-fasteoi", "-edge" or
        // a bare number), then the handlers.
        let mut fields = rest.trim_start().splitn(2, char::is_whitespace);
        let _chip = fields.next();
        let mut rest = fields.next().unwrap_or("").trim_start();
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        let token = &rest[..end];
        let looks_like_hwirq = !token.is_empty()
            && token
                .split_once('-')
                .map_or(token.bytes().all(|b| b.is_ascii_digit()), |(n, _)| {
                    n.bytes().all(|b| b.is_ascii_digit())
                });
        if looks_like_hwirq {
            rest = &rest[end..];
        }
        return rest
            .trim()
            .split(", ")
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
    }
    Vec::new()
}

/// The interrupts taken on `irq` on every CPU, from the text of
/// `/proc/interrupts` (see [`interrupt_handlers`] for the format); `None`
/// when the IRQ is not listed.
pub fn interrupt_count(proc_interrupts: &str, irq: u32) -> Option<u64> {
    let mut lines = proc_interrupts.lines();
    let cpus = lines.next()?.split_whitespace().count();
    let label = format!("{irq}:");
    lines
        .find_map(|line| line.trim_start().strip_prefix(&label))
        .map(|rest| {
            rest.split_whitespace()
                .take(cpus)
                .map_while(|n| n.parse::<u64>().ok())
                .sum()
        })
}

/// A device's configuration space through its sysfs `config` file
/// (`pread`/`pwrite`). The file is as large as the config space the kernel
/// exposes (256 or 4096 bytes); without CAP_SYS_ADMIN reads beyond the
/// first 64 bytes come back short, which is an error here.
///
/// The kernel splits each access into naturally aligned config cycles, so a
/// 4-byte access at 0x04 is one dword read of COMMAND and STATUS, as the
/// PCI 2.3 masking primitives need. User-space config accesses wait while
/// the device is blocked by a reset.
#[derive(Debug)]
pub struct SysfsConfig {
    bdf: Bdf,
    file: File,
    size: u16,
}

impl SysfsConfig {
    /// Opens the device's `config` file for reading and writing.
    pub fn open(sysfs: &PciSysfs, bdf: Bdf) -> Result<Self, SysfsError> {
        Self::open_mode(sysfs, bdf, true)
    }

    /// Opens the device's `config` file for reading only; writes fail.
    pub fn open_read_only(sysfs: &PciSysfs, bdf: Bdf) -> Result<Self, SysfsError> {
        Self::open_mode(sysfs, bdf, false)
    }

    fn open_mode(sysfs: &PciSysfs, bdf: Bdf, write: bool) -> Result<Self, SysfsError> {
        let path = sysfs.existing_device_dir(bdf)?.join("config");
        let io = |op, source| SysfsError::Io {
            bdf,
            op,
            path: path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(write)
            .open(&path)
            .map_err(|e| io("opening the config file", e))?;
        let len = file
            .metadata()
            .map_err(|e| io("reading the config file's size", e))?
            .len();
        if len < MIN_CONFIG_SIZE {
            return Err(SysfsError::Parse {
                bdf,
                op: "reading the config file's size",
                path,
                content: format!("{len} bytes"),
            });
        }
        // Clamped to 4096, so the conversion cannot fail.
        let size = u16::try_from(len.min(u64::from(PCI_CFG_SPACE_EXP_SIZE)))
            .unwrap_or(PCI_CFG_SPACE_EXP_SIZE);
        Ok(Self { bdf, file, size })
    }
}

/// Maps an I/O error on the config file, treating ENODEV (the device was
/// removed) as [`BackendError::Gone`].
fn config_error(op: &'static str, e: io::Error) -> BackendError {
    if e.raw_os_error() == Some(libc::ENODEV) {
        BackendError::Gone
    } else {
        BackendError::os(op, e)
    }
}

fn short(done: usize, want: usize, offset: u16) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("{done} of {want} bytes at offset {offset:#x}"),
    )
}

impl ConfigSpace for SysfsConfig {
    fn bdf(&self) -> Bdf {
        self.bdf
    }

    fn config_size(&self) -> u16 {
        self.size
    }

    fn config_read(&mut self, offset: u16, width: Width) -> Result<u32, BackendError> {
        check_access(offset, width, self.size)?;
        let mut bytes = [0u8; 4];
        let len = usize::from(width.bytes());
        let n = self
            .file
            .read_at(&mut bytes[..len], u64::from(offset))
            .map_err(|e| config_error("sysfs config pread", e))?;
        if n != len {
            return Err(BackendError::os(
                "sysfs config pread",
                short(n, len, offset),
            ));
        }
        Ok(u32::from_le_bytes(bytes))
    }

    fn config_write(&mut self, offset: u16, width: Width, value: u32) -> Result<(), BackendError> {
        check_write(offset, width, self.size, value)?;
        let bytes = value.to_le_bytes();
        let len = usize::from(width.bytes());
        let n = self
            .file
            .write_at(&bytes[..len], u64::from(offset))
            .map_err(|e| config_error("sysfs config pwrite", e))?;
        if n != len {
            return Err(BackendError::os(
                "sysfs config pwrite",
                short(n, len, offset),
            ));
        }
        Ok(())
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
