//! Why opening or driving a device through VFIO failed ([`VfioError`]),
//! and the constructors that turn sysfs findings and vfio-ioctls' setup
//! errors into it.

use std::io;
use std::path::PathBuf;

use crate::backend::BackendError;
use crate::pci::Bdf;

use super::layout::DependentDevice;
use super::VFIO_CONTAINER_PATH;
use crate::pci::sysfs::{PciSysfs, SysfsError};

/// Why opening or driving a device through VFIO failed. Every message names
/// the device; the OS error, where there is one, is the source.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VfioError {
    /// No PCI device at that address.
    #[error("{bdf}: no such PCI device ({path} does not exist)")]
    DeviceNotFound {
        /// The device.
        bdf: Bdf,
        /// The sysfs directory that was looked for.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The device is bound to another driver, or to none.
    #[error(
        "{bdf}: cannot open through VFIO: {}",
        match driver {
            Some(d) => format!("the device is bound to {d}, not vfio-pci"),
            None => "the device is not bound to any driver (bind it to vfio-pci)".to_owned(),
        }
    )]
    NotBoundToVfio {
        /// The device.
        bdf: Bdf,
        /// The driver it is bound to, if any.
        driver: Option<String>,
    },
    /// Another device in the IOMMU group is bound to a driver that is not a
    /// vfio driver, so the kernel refuses the group.
    #[error(
        "{bdf}: IOMMU group {group} is not viable: {} (every device in the group must be bound to vfio-pci, pci-stub or no driver)",
        if blockers.is_empty() {
            "the kernel reports a device bound to a non-vfio driver".to_owned()
        } else {
            blockers.join(", ")
        }
    )]
    GroupNotViable {
        /// The device.
        bdf: Bdf,
        /// Its IOMMU group.
        group: u32,
        /// The devices in the way, as `"<address> (bound to <driver>)"`.
        blockers: Vec<String>,
    },
    /// The group (or container) node exists but may not be opened.
    #[error("{bdf}: no permission to open {path}")]
    NoPermission {
        /// The device.
        bdf: Bdf,
        /// The node that could not be opened.
        path: PathBuf,
        /// The OS error (EACCES or EPERM).
        #[source]
        source: io::Error,
    },
    /// There is no IOMMU to isolate the device: no `iommu_group` link, or no
    /// VFIO container node.
    #[error("{bdf}: no IOMMU for VFIO: {missing} does not exist (is the IOMMU enabled, e.g. intel_iommu=on, and are the vfio modules loaded?)")]
    NoIommu {
        /// The device.
        bdf: Bdf,
        /// What is missing.
        missing: PathBuf,
    },
    /// The group is already open (by another process, or another container
    /// of this one).
    #[error("{bdf}: IOMMU group {group} is already in use (/dev/vfio/{group} is open elsewhere)")]
    GroupBusy {
        /// The device.
        bdf: Bdf,
        /// Its IOMMU group.
        group: u32,
        /// The OS error (EBUSY).
        #[source]
        source: io::Error,
    },
    /// Reading the device's facts in sysfs failed.
    #[error(transparent)]
    Sysfs(#[from] SysfsError),
    /// Setting up the container, group or device with vfio-ioctls failed for
    /// another reason.
    #[error("{bdf}: setting up the VFIO container, group and device failed")]
    Setup {
        /// The device.
        bdf: Bdf,
        /// vfio-ioctls' error.
        #[source]
        source: vfio_ioctls::VfioError,
    },
    /// A VFIO ioctl failed.
    #[error("{bdf}: {op} failed")]
    Ioctl {
        /// The device.
        bdf: Bdf,
        /// The ioctl and what it was for.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A config-space access through the device fd failed.
    #[error("{bdf}: {op} failed")]
    Config {
        /// The device.
        bdf: Bdf,
        /// What the access was for.
        op: &'static str,
        /// Why it failed.
        #[source]
        source: BackendError,
    },
    /// VFIO reports something that is not a PCI device.
    #[error(
        "{bdf}: VFIO reports a device that is not PCI (VFIO_DEVICE_GET_INFO flags {flags:#x})"
    )]
    NotPci {
        /// The device.
        bdf: Bdf,
        /// The device flags.
        flags: u32,
    },
    /// The device has no such region.
    #[error("{bdf}: the device has no region {index}")]
    NoSuchRegion {
        /// The device.
        bdf: Bdf,
        /// The region index.
        index: u32,
    },
    /// A region access reaches past the region's end.
    #[error("{bdf}: {len}-byte access at {offset:#x} is outside region {index} ({size:#x} bytes)")]
    RegionOutOfRange {
        /// The device.
        bdf: Bdf,
        /// The region index.
        index: u32,
        /// Offset within the region.
        offset: u64,
        /// Length of the access.
        len: usize,
        /// Size of the region.
        size: u64,
    },
    /// A region read or write failed or transferred fewer bytes than asked.
    #[error("{bdf}: {len}-byte {op} at {offset:#x} of region {index} failed")]
    RegionIo {
        /// The device.
        bdf: Bdf,
        /// "read" or "write".
        op: &'static str,
        /// The region index.
        index: u32,
        /// Offset within the region.
        offset: u64,
        /// Length of the access.
        len: usize,
        /// The OS error, or the short transfer.
        #[source]
        source: io::Error,
    },
    /// The device offers no interrupt of this kind (GET_IRQ_INFO count 0).
    #[error("{bdf}: the device has no {irq} interrupt (VFIO_DEVICE_GET_IRQ_INFO reports count 0)")]
    IrqNotSupported {
        /// The device.
        bdf: Bdf,
        /// Which interrupt ("INTx", "ERR", "REQ").
        irq: &'static str,
    },
    /// A descriptor handed over as a VFIO device fd is something else.
    #[error("the descriptor handed over is not a VFIO device fd (it is {what})")]
    NotADeviceFd {
        /// What `/proc/self/fd` says it is.
        what: String,
    },
    /// The kernel does not name a handed-over device fd's device, and no
    /// address was given to check it against.
    #[error(
        "the PCI address of a VFIO device fd cannot be read on this kernel (its fdinfo has no \
         vfio-device-syspath, which Linux 6.18 adds): name the device"
    )]
    Unidentified,
    /// A handed-over device fd is not the device it was said to be.
    #[error("{claimed}: the VFIO device fd handed over is another device: {evidence}")]
    NotThisDevice {
        /// The address the fd was said to be.
        claimed: Bdf,
        /// What shows that it is not.
        evidence: String,
    },
    /// A hot reset would reset devices in groups this process does not own.
    #[error(
        "{bdf}: a hot reset would also reset devices in IOMMU groups this process does not own: {}",
        devices.join(", ")
    )]
    HotResetNotOwned {
        /// The device.
        bdf: Bdf,
        /// The affected devices outside our group, as
        /// `"<address> (group <n>)"`.
        devices: Vec<String>,
        /// Their groups, sorted, without duplicates.
        groups: Vec<u32>,
    },
}

pub(super) fn not_found(sysfs: &PciSysfs, bdf: Bdf) -> VfioError {
    VfioError::DeviceNotFound {
        bdf,
        path: sysfs.device_dir(bdf),
        source: io::Error::from_raw_os_error(libc::ENOENT),
    }
}

pub(super) fn no_iommu_group(sysfs: &PciSysfs, bdf: Bdf) -> VfioError {
    VfioError::NoIommu {
        bdf,
        missing: sysfs.device_dir(bdf).join("iommu_group"),
    }
}

/// Turns vfio-ioctls' setup errors into ours, keeping the OS error.
pub(super) fn classify_setup_error(bdf: Bdf, group: u32, e: vfio_ioctls::VfioError) -> VfioError {
    use vfio_ioctls::VfioError as E;
    let group_path = || PathBuf::from(format!("/dev/vfio/{group}"));
    let open_error = |path: PathBuf, source: io::Error| match source.kind() {
        io::ErrorKind::PermissionDenied => VfioError::NoPermission { bdf, path, source },
        io::ErrorKind::NotFound => VfioError::NoIommu { bdf, missing: path },
        _ if source.raw_os_error() == Some(libc::EBUSY) => {
            VfioError::GroupBusy { bdf, group, source }
        }
        _ => VfioError::Setup {
            bdf,
            source: E::OpenGroup(source, group.to_string()),
        },
    };
    match e {
        E::OpenContainer(source) => match source.kind() {
            io::ErrorKind::PermissionDenied => VfioError::NoPermission {
                bdf,
                path: PathBuf::from(VFIO_CONTAINER_PATH),
                source,
            },
            io::ErrorKind::NotFound => VfioError::NoIommu {
                bdf,
                missing: PathBuf::from(VFIO_CONTAINER_PATH),
            },
            _ => VfioError::Setup {
                bdf,
                source: E::OpenContainer(source),
            },
        },
        E::OpenGroup(source, _) => open_error(group_path(), source),
        E::GroupViable => VfioError::GroupNotViable {
            bdf,
            group,
            blockers: Vec::new(),
        },
        other => VfioError::Setup { bdf, source: other },
    }
}

pub(super) fn hot_reset_not_owned(bdf: Bdf, foreign: &[DependentDevice]) -> VfioError {
    let devices = foreign
        .iter()
        .map(|d| match d.bdf {
            Some(b) => format!("{b} (group {})", d.group),
            None => format!("a device in group {}", d.group),
        })
        .collect();
    let mut groups: Vec<u32> = foreign.iter().map(|d| d.group).collect();
    groups.sort_unstable();
    groups.dedup();
    VfioError::HotResetNotOwned {
        bdf,
        devices,
        groups,
    }
}
