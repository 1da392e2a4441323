//! Why a sysfs look-up or write failed ([`SysfsError`]).

use std::io;
use std::path::PathBuf;

use crate::pci::config::BackendError;
use crate::pci::Bdf;

use super::driver_name;

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
