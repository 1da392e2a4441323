//! Kernel VFIO backend (vfio-pci).
//!
//! [`VfioBackend`] opens one PCI function through its IOMMU group with
//! vfio-ioctls (a TYPE1v2 container, the group, the device fd) and
//! implements the engine's seam with vfio-pci's semantics:
//!
//! - COMMAND.INTX_DISABLE is virtualized by the kernel
//!   ([`IntxDisableBit::Virtualized`]); the kernel keeps the physical mask.
//! - INTx is *automasked*: vfio-pci's interrupt handler does the PCI 2.3
//!   check-and-mask itself before it signals the trigger eventfd, and
//!   `VFIO_DEVICE_SET_IRQS(ACTION_UNMASK)` is the kernel's check-and-unmask,
//!   which signals the trigger again while the device still asserts.
//! - `VFIO_DEVICE_RESET` and `VFIO_DEVICE_PCI_HOT_RESET` leave vfio's own
//!   `masked` flag untouched while they restore the physical COMMAND; the
//!   backend re-masks after each reset so the flag matches the hardware, and
//!   the engine's settle lifts the mask with a check-and-unmask.
//!
//! Everything whose errno matters (config-region I/O, SET_IRQS, resets) is
//! done with the backend's own system calls in the private `sys` module, not
//! with vfio-ioctls' `region_read`/`region_write`/`reset`, which drop errors.
//!
//! A backend can also be built on a device fd that another process opened
//! ([`VfioBackend::from_device_fd`]): a VMM keeps its container and group
//! and hands the daemon the device fd, whose PCI address is then checked
//! against the one the VMM names (see [`handover`]).
//!
//! ```no_run
//! use vfio_intx::intx::IntxDevice;
//! use vfio_intx::vfio::VfioBackend;
//! use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let backend = VfioBackend::open("0000:01:00.0".parse()?)?;
//! // The VMM maps guest memory for DMA through the same container.
//! let _container = backend.container().cloned();
//! let irqfd = EventFd::new(EFD_NONBLOCK)?;
//! let device = IntxDevice::new(backend, irqfd)?;
//! device.reset()?; // VFIO_DEVICE_RESET, under the engine's protocol
//! device.reset_by(VfioBackend::hot_reset)?; // a bus reset
//! # Ok(()) }
//! ```

#[cfg(feature = "testkit")]
pub mod edu;
#[cfg(test)]
mod fake_sysfs;
pub mod handover;
mod layout;
mod sys;

use std::fmt;
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::{debug, info, instrument, trace};
use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FLAGS_PCI, VFIO_DEVICE_FLAGS_RESET, VFIO_IRQ_INFO_AUTOMASKED,
    VFIO_IRQ_INFO_EVENTFD, VFIO_IRQ_INFO_MASKABLE, VFIO_PCI_CONFIG_REGION_INDEX,
    VFIO_PCI_ERR_IRQ_INDEX, VFIO_PCI_HOT_RESET_FLAG_DEV_ID, VFIO_PCI_INTX_IRQ_INDEX,
    VFIO_PCI_REQ_IRQ_INDEX, VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioOps};
use vmm_sys_util::eventfd::EventFd;

use crate::backend::{BackendError, Capabilities, ConfigSpace, IntxDisableBit, PciBackend, Unmask};
use crate::pci::intx::read_command_status;
use crate::pci::regs::PCI_CFG_SPACE_EXP_SIZE;
use crate::pci::{check_access, check_write, Bdf, Width};

use crate::pci::sysfs::{PciSysfs, SysfsConfig, SysfsError};
use handover::DeviceIdentity;
use layout::{DependentDevice, HotResetInfo, IrqAction, IrqSet};

/// The container node every VFIO user opens first.
const VFIO_CONTAINER_PATH: &str = "/dev/vfio/vfio";

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

/// What `VFIO_DEVICE_GET_IRQ_INFO` reports for one IRQ index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IrqInfo {
    /// `VFIO_IRQ_INFO_*` flags.
    pub flags: u32,
    /// Number of vectors; 0 means the device has none of this kind.
    pub count: u32,
}

impl IrqInfo {
    /// Whether the device has at least one vector of this kind.
    pub fn usable(&self) -> bool {
        self.count > 0
    }
    /// Whether an eventfd can be attached (`VFIO_IRQ_INFO_EVENTFD`).
    pub fn eventfd(&self) -> bool {
        self.flags & VFIO_IRQ_INFO_EVENTFD != 0
    }
    /// Whether it can be masked (`VFIO_IRQ_INFO_MASKABLE`).
    pub fn maskable(&self) -> bool {
        self.flags & VFIO_IRQ_INFO_MASKABLE != 0
    }
    /// Whether the kernel masks it when it fires (`VFIO_IRQ_INFO_AUTOMASKED`).
    pub fn automasked(&self) -> bool {
        self.flags & VFIO_IRQ_INFO_AUTOMASKED != 0
    }
}

/// What `VFIO_DEVICE_GET_REGION_INFO` reports for one region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionInfo {
    /// The region index (`VFIO_PCI_BAR0_REGION_INDEX` ...).
    pub index: u32,
    /// `VFIO_REGION_INFO_FLAG_*`.
    pub flags: u32,
    /// Size in bytes.
    pub size: u64,
    /// Offset of the region in the device fd.
    pub offset: u64,
}

impl RegionInfo {
    /// Whether the region can be read.
    pub fn readable(&self) -> bool {
        self.flags & VFIO_REGION_INFO_FLAG_READ != 0
    }
    /// Whether the region can be written.
    pub fn writable(&self) -> bool {
        self.flags & VFIO_REGION_INFO_FLAG_WRITE != 0
    }
    /// Whether the region can be mmapped.
    pub fn mappable(&self) -> bool {
        self.flags & VFIO_REGION_INFO_FLAG_MMAP != 0
    }
}

/// One PCI function opened through kernel VFIO (vfio-pci).
///
/// Implements [`ConfigSpace`] and [`PciBackend`] for the INTx engine; also
/// gives the VMM the vfio-ioctls container (for DMA mapping) and device,
/// region access with errors, a bus/slot reset ([`hot_reset`](Self::hot_reset))
/// and the ERR and REQ notifications.
pub struct VfioBackend {
    bdf: Bdf,
    group: u32,
    device_flags: u32,
    config: RegionInfo,
    config_size: u16,
    intx: IrqInfo,
    err: IrqInfo,
    req: IrqInfo,
    intx_enabled: bool,
    err_enabled: bool,
    req_enabled: bool,
    identity: Option<DeviceIdentity>,
    /// The device's sysfs `config`, read-only, opened at the first read of
    /// the physical INTX_DISABLE (the config region shows the virtual bit).
    physical_config: Option<SysfsConfig>,
    // Declared before `container` so that the device is closed first.
    device: DeviceFile,
    container: Option<Arc<VfioContainer>>,
}

/// The device file a backend drives: one it opened through its group with
/// vfio-ioctls, or one another process opened and handed over.
#[derive(Clone)]
enum DeviceFile {
    Opened(Arc<VfioDevice>),
    HandedOver(Arc<OwnedFd>),
}

impl DeviceFile {
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            DeviceFile::Opened(device) => sys::device_fd(device),
            DeviceFile::HandedOver(fd) => fd.as_fd(),
        }
    }
}

impl fmt::Debug for VfioBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VfioBackend")
            .field("bdf", &self.bdf)
            .field("group", &self.group)
            .field("device_flags", &self.device_flags)
            .field("config", &self.config)
            .field("intx", &self.intx)
            .field("err", &self.err)
            .field("req", &self.req)
            .field("intx_enabled", &self.intx_enabled)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl VfioBackend {
    /// vfio-pci always takes an INTx unmask eventfd
    /// (`SET_IRQS(INTX, DATA_EVENTFD | ACTION_UNMASK)`), so a vfio device
    /// can take the kernel bypass: what a configuration may assume before
    /// any device is open.
    pub const UNMASK_EVENTFD: bool = true;

    /// Opens `bdf`, which must be bound to vfio-pci, in a new TYPE1v2
    /// container of its own.
    ///
    /// Before asking the kernel, checks sysfs so that a refusal says why: no
    /// such device, bound to another driver (named), no IOMMU group, no
    /// `/dev/vfio/vfio`, a group made not viable by another device (named).
    pub fn open(bdf: Bdf) -> Result<Self, VfioError> {
        Self::open_with(&PciSysfs::new(), bdf, None)
    }

    /// Like [`open`](Self::open), adding the device's group to an existing
    /// container (e.g. one a VMM shares between its assigned devices).
    pub fn open_in(bdf: Bdf, container: Arc<VfioContainer>) -> Result<Self, VfioError> {
        Self::open_with(&PciSysfs::new(), bdf, Some(container))
    }

    #[instrument(skip_all, fields(bdf = %bdf))]
    fn open_with(
        sysfs: &PciSysfs,
        bdf: Bdf,
        container: Option<Arc<VfioContainer>>,
    ) -> Result<Self, VfioError> {
        let group = preflight(sysfs, bdf)?;
        let container = match container {
            Some(c) => c,
            None => {
                Arc::new(VfioContainer::new(None).map_err(|e| classify_setup_error(bdf, group, e))?)
            }
        };
        let ops: Arc<dyn VfioOps> = container.clone();
        let device = VfioDevice::new(&sysfs.device_dir(bdf), ops, false)
            .map_err(|e| classify_setup_error(bdf, group, e))?;
        Self::with_device(
            bdf,
            group,
            DeviceFile::Opened(Arc::new(device)),
            Some(container),
        )
    }

    /// A backend on a VFIO device fd that another process opened — a VMM
    /// that keeps its container and group and hands the device fd over (by
    /// `SCM_RIGHTS`) so that this process services the device's INTx.
    ///
    /// `claimed` is the address the fd is said to be. The fd is checked to
    /// be a VFIO device fd and matched to its address with the strongest
    /// evidence the kernel gives (see [`handover`]): the kernel's own
    /// word in fdinfo (Linux 6.18+; `claimed` may then be `None`), else a
    /// hot-reset scope or the config header, which must agree with
    /// `claimed`. A fd that turns out to be another device is refused
    /// ([`VfioError::NotThisDevice`]), and nothing is changed on it.
    ///
    /// The backend has no container ([`container`](Self::container) is
    /// `None`) and cannot hot-reset (that needs the group fd, which the
    /// owner keeps); everything else works as on a device this process
    /// opened. INTx is the backend's from [`intx_enable`](PciBackend::intx_enable)
    /// until it is dropped: the owner must not set INTx up itself meanwhile.
    #[instrument(skip_all, fields(claimed = ?claimed))]
    pub fn from_device_fd(fd: OwnedFd, claimed: Option<Bdf>) -> Result<Self, VfioError> {
        Self::from_device_fd_with(&PciSysfs::new(), fd, claimed)
    }

    fn from_device_fd_with(
        sysfs: &PciSysfs,
        fd: OwnedFd,
        claimed: Option<Bdf>,
    ) -> Result<Self, VfioError> {
        handover::check_device_fd(fd.as_fd())?;
        let named = handover::fdinfo_device(fd.as_fd())?;
        let bdf = match (named, claimed) {
            (Some(named), Some(claimed)) if named != claimed => {
                return Err(VfioError::NotThisDevice {
                    claimed,
                    evidence: format!("the kernel's fdinfo names {named}"),
                })
            }
            (Some(named), _) => named,
            (None, Some(claimed)) => claimed,
            (None, None) => return Err(VfioError::Unidentified),
        };
        if !sysfs.exists(bdf) {
            return Err(not_found(sysfs, bdf));
        }
        let group = sysfs
            .iommu_group(bdf)?
            .ok_or_else(|| no_iommu_group(sysfs, bdf))?;
        let mut backend =
            Self::with_device(bdf, group, DeviceFile::HandedOver(Arc::new(fd)), None)?;
        let identity = match named {
            Some(_) => DeviceIdentity::Fdinfo,
            None => handover::identify(sysfs, &mut backend)?,
        };
        if identity.proven() {
            info!(%identity, "device fd handed over");
        } else {
            tracing::warn!(%identity, "device fd handed over; its address is not proven");
        }
        backend.identity = Some(identity);
        Ok(backend)
    }

    fn with_device(
        bdf: Bdf,
        group: u32,
        device: DeviceFile,
        container: Option<Arc<VfioContainer>>,
    ) -> Result<Self, VfioError> {
        let fd = device.fd();
        let ioctl = |op| move |source| VfioError::Ioctl { bdf, op, source };
        let info = sys::device_info(fd).map_err(ioctl("VFIO_DEVICE_GET_INFO"))?;
        if info.flags & VFIO_DEVICE_FLAGS_PCI == 0 {
            return Err(VfioError::NotPci {
                bdf,
                flags: info.flags,
            });
        }
        if info.num_regions <= VFIO_PCI_CONFIG_REGION_INDEX {
            return Err(VfioError::NoSuchRegion {
                bdf,
                index: VFIO_PCI_CONFIG_REGION_INDEX,
            });
        }
        let config = region(fd, VFIO_PCI_CONFIG_REGION_INDEX)
            .map_err(ioctl("VFIO_DEVICE_GET_REGION_INFO (config)"))?;
        if config.size == 0 {
            return Err(VfioError::NoSuchRegion {
                bdf,
                index: VFIO_PCI_CONFIG_REGION_INDEX,
            });
        }
        // At most 4 KiB, so it fits.
        let config_size = config.size.min(u64::from(PCI_CFG_SPACE_EXP_SIZE)) as u16;
        let irq = |index, op| -> Result<IrqInfo, VfioError> {
            if index >= info.num_irqs {
                return Ok(IrqInfo::default());
            }
            match sys::irq_info(fd, index) {
                Ok(i) => Ok(IrqInfo {
                    flags: i.flags,
                    count: i.count,
                }),
                // vfio-pci refuses indexes a device cannot have (ERR on a
                // conventional PCI device) with EINVAL: none of this kind.
                Err(e)
                    if index != VFIO_PCI_INTX_IRQ_INDEX
                        && e.raw_os_error() == Some(libc::EINVAL) =>
                {
                    Ok(IrqInfo::default())
                }
                Err(e) => Err(ioctl(op)(e)),
            }
        };
        let intx = irq(VFIO_PCI_INTX_IRQ_INDEX, "VFIO_DEVICE_GET_IRQ_INFO (INTx)")?;
        let err = irq(VFIO_PCI_ERR_IRQ_INDEX, "VFIO_DEVICE_GET_IRQ_INFO (ERR)")?;
        let req = irq(VFIO_PCI_REQ_IRQ_INDEX, "VFIO_DEVICE_GET_IRQ_INFO (REQ)")?;
        info!(
            group,
            device_flags = info.flags,
            config_size,
            intx = intx.count,
            err = err.count,
            req = req.count,
            "opened through VFIO"
        );
        Ok(Self {
            bdf,
            group,
            device_flags: info.flags,
            config,
            config_size,
            intx,
            err,
            req,
            intx_enabled: false,
            err_enabled: false,
            req_enabled: false,
            identity: None,
            physical_config: None,
            device,
            container,
        })
    }

    /// How a handed-over device fd was matched to its address; `None` for a
    /// device this backend opened itself.
    pub fn identity(&self) -> Option<DeviceIdentity> {
        self.identity
    }

    /// The device's IOMMU group.
    pub fn group(&self) -> u32 {
        self.group
    }

    /// The container the device's group is attached to: map guest memory for
    /// the device's DMA through it, or open further devices into it with
    /// [`open_in`](Self::open_in). `None` on a handed-over device fd (its
    /// owner keeps the container).
    pub fn container(&self) -> Option<&Arc<VfioContainer>> {
        self.container.as_ref()
    }

    /// The vfio-ioctls device (MSI/MSI-X setup, mmap of BARs, ...). `None`
    /// on a handed-over device fd.
    pub fn device(&self) -> Option<&Arc<VfioDevice>> {
        match &self.device {
            DeviceFile::Opened(device) => Some(device),
            DeviceFile::HandedOver(_) => None,
        }
    }

    /// `VFIO_DEVICE_GET_INFO` flags (`VFIO_DEVICE_FLAGS_*`).
    pub fn device_flags(&self) -> u32 {
        self.device_flags
    }

    /// Whether vfio-pci offers `VFIO_DEVICE_RESET` for this device
    /// (`VFIO_DEVICE_FLAGS_RESET`).
    pub fn has_reset(&self) -> bool {
        self.device_flags & VFIO_DEVICE_FLAGS_RESET != 0
    }

    /// The config-space region.
    pub fn config_region(&self) -> RegionInfo {
        self.config
    }

    /// INTx as GET_IRQ_INFO reports it (count 0: no usable INTx).
    pub fn intx_info(&self) -> IrqInfo {
        self.intx
    }

    /// The ERR index (PCIe AER notification) as GET_IRQ_INFO reports it.
    pub fn err_info(&self) -> IrqInfo {
        self.err
    }

    /// The REQ index (release request) as GET_IRQ_INFO reports it.
    pub fn req_info(&self) -> IrqInfo {
        self.req
    }

    /// Access to region `index` (a BAR, the ROM, config) with errors, by
    /// `pread`/`pwrite` on the device fd. The handle is independent of the
    /// backend (it shares the device), so it can be used from other threads
    /// while the engine owns the backend.
    pub fn region(&self, index: u32) -> Result<RegionAccess, VfioError> {
        let info = region(self.device.fd(), index).map_err(|source| {
            if source.raw_os_error() == Some(libc::EINVAL) {
                VfioError::NoSuchRegion {
                    bdf: self.bdf,
                    index,
                }
            } else {
                VfioError::Ioctl {
                    bdf: self.bdf,
                    op: "VFIO_DEVICE_GET_REGION_INFO",
                    source,
                }
            }
        })?;
        Ok(RegionAccess {
            bdf: self.bdf,
            info,
            device: self.device.clone(),
        })
    }

    /// Signals `fd` when the kernel asks for the device back — vfio-pci's
    /// release request (REQ), sent when something wants to unbind the
    /// device from vfio-pci (a write to its driver's `unbind` file, a
    /// hot-unplug). The unbind waits until every user has closed the device,
    /// and the kernel repeats the request while it waits: the owner must then
    /// disarm INTx and drop the backend (closing the device). Disabled again
    /// by [`disable_req`](Self::disable_req) or when the backend is dropped.
    pub fn enable_req(&mut self, fd: &EventFd) -> Result<(), VfioError> {
        self.set_notification(VFIO_PCI_REQ_IRQ_INDEX, Some(fd))?;
        self.req_enabled = true;
        Ok(())
    }

    /// Stops the release-request notification.
    pub fn disable_req(&mut self) -> Result<(), VfioError> {
        self.set_notification(VFIO_PCI_REQ_IRQ_INDEX, None)?;
        self.req_enabled = false;
        Ok(())
    }

    /// Signals `fd` when the kernel reports an uncorrectable PCIe error on
    /// the device (AER, the ERR index). Only PCIe devices with AER have it.
    /// Disabled again by [`disable_err`](Self::disable_err) or when the
    /// backend is dropped.
    pub fn enable_err(&mut self, fd: &EventFd) -> Result<(), VfioError> {
        self.set_notification(VFIO_PCI_ERR_IRQ_INDEX, Some(fd))?;
        self.err_enabled = true;
        Ok(())
    }

    /// Stops the error notification.
    pub fn disable_err(&mut self) -> Result<(), VfioError> {
        self.set_notification(VFIO_PCI_ERR_IRQ_INDEX, None)?;
        self.err_enabled = false;
        Ok(())
    }

    fn set_notification(&self, index: u32, fd: Option<&EventFd>) -> Result<(), VfioError> {
        let (info, irq, op) = if index == VFIO_PCI_REQ_IRQ_INDEX {
            (self.req, "REQ", "VFIO_DEVICE_SET_IRQS (REQ eventfd)")
        } else {
            (self.err, "ERR", "VFIO_DEVICE_SET_IRQS (ERR eventfd)")
        };
        if !info.usable() {
            return Err(VfioError::IrqNotSupported { bdf: self.bdf, irq });
        }
        // -1 removes the eventfd whether or not one is set (DATA_NONE with
        // count 0 would fail with EINVAL when none is).
        let raw = fd.map_or(-1, AsRawFd::as_raw_fd);
        let set = IrqSet::eventfds(index, IrqAction::Trigger, &[raw]);
        sys::set_irqs(self.device.fd(), set.words()).map_err(|source| VfioError::Ioctl {
            bdf: self.bdf,
            op,
            source,
        })
    }

    /// A bus or slot reset (`VFIO_DEVICE_PCI_HOT_RESET`), for devices
    /// without a function-level reset method. Use it through the engine:
    /// `device.reset_by(VfioBackend::hot_reset)`, or, where the reset's
    /// scope holds other functions whose engines this process runs,
    /// `device.reset_with_siblings(&[&other], VfioBackend::hot_reset)` so
    /// that they are held at their gates, restored and re-settled too.
    ///
    /// Asks the kernel which devices the reset would affect
    /// (`VFIO_DEVICE_GET_PCI_HOT_RESET_INFO`) and refuses, naming them, if
    /// any is in an IOMMU group other than this device's (the kernel requires
    /// the caller to own every affected group; this backend owns only its
    /// own). No slot or bus reset ([`BackendError::NoResetMethod`]); EAGAIN
    /// and EBUSY come back as transient [`BackendError::Os`] errors for the
    /// engine to retry. Like [`reset`](PciBackend::reset), re-masks INTx
    /// afterwards so vfio's bookkeeping matches the restored hardware.
    pub fn hot_reset(&mut self) -> Result<(), BackendError> {
        const OP_INFO: &str = "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO";
        const OP_RESET: &str = "VFIO_DEVICE_PCI_HOT_RESET";
        let fd = self.device.fd();
        let info = match hot_reset_info(fd) {
            Ok(info) => info,
            // Neither the slot nor the bus can be reset.
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {
                return Err(BackendError::NoResetMethod)
            }
            Err(e) => return Err(BackendError::os(OP_INFO, e)),
        };
        if info.flags() & VFIO_PCI_HOT_RESET_FLAG_DEV_ID != 0 {
            // Only iommufd (cdev) users get device ids instead of groups.
            return Err(BackendError::os(
                OP_INFO,
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the kernel listed device ids, not IOMMU groups",
                ),
            ));
        }
        let devices = info.devices();
        let foreign = layout::foreign_devices(&devices, self.group);
        if !foreign.is_empty() {
            let error = hot_reset_not_owned(self.bdf, &foreign);
            return Err(BackendError::os(
                OP_RESET,
                io::Error::new(io::ErrorKind::PermissionDenied, error),
            ));
        }
        let group_fd =
            own_group_fd(self.group).map_err(|e| BackendError::os("finding the group fd", e))?;
        let arg = layout::hot_reset(&[group_fd.as_raw_fd()]);
        sys::hot_reset(fd, &arg).map_err(|e| BackendError::os(OP_RESET, e))?;
        drop(group_fd);
        debug!(bdf = %self.bdf, affected = devices.len(), "hot reset done");
        self.remask_after_reset()
    }

    /// After a reset: vfio's `masked` flag is not touched by the reset, while
    /// the hardware's INTX_DISABLE is whatever the reset's restore wrote
    /// back. ACTION_MASK makes both "masked" (if vfio already believed so it
    /// changes nothing); the engine's settle then lifts the mask with a
    /// check-and-unmask, which delivers an interrupt still pending.
    fn remask_after_reset(&mut self) -> Result<(), BackendError> {
        if !self.intx_enabled {
            return Ok(());
        }
        self.set_intx(
            IrqSet::none(VFIO_PCI_INTX_IRQ_INDEX, IrqAction::Mask, 1),
            "VFIO_DEVICE_SET_IRQS (INTx MASK after reset)",
        )
    }

    fn require_intx(&self) -> Result<(), BackendError> {
        if self.intx.usable() {
            Ok(())
        } else {
            Err(BackendError::NoIntx)
        }
    }

    fn set_intx(&self, set: IrqSet, op: &'static str) -> Result<(), BackendError> {
        self.require_intx()?;
        trace!(bdf = %self.bdf, op, "SET_IRQS");
        sys::set_irqs(self.device.fd(), set.words()).map_err(|e| BackendError::os(op, e))
    }

    fn config_io_offset(&self, offset: u16) -> u64 {
        self.config.offset + u64::from(offset)
    }
}

impl Drop for VfioBackend {
    fn drop(&mut self) {
        // The kernel disables everything when the device fd is closed, but a
        // `RegionAccess` may keep it open: stop every notification now.
        if self.req_enabled {
            if let Err(e) = self.disable_req() {
                debug!(error = %e, "disabling REQ on drop failed");
            }
        }
        if self.err_enabled {
            if let Err(e) = self.disable_err() {
                debug!(error = %e, "disabling ERR on drop failed");
            }
        }
        if self.intx_enabled {
            if let Err(e) = self.intx_disable() {
                debug!(error = %e, "disabling INTx on drop failed");
            }
        }
    }
}

impl ConfigSpace for VfioBackend {
    fn bdf(&self) -> Bdf {
        self.bdf
    }

    fn config_size(&self) -> u16 {
        self.config_size
    }

    fn config_read(&mut self, offset: u16, width: Width) -> Result<u32, BackendError> {
        check_access(offset, width, self.config_size)?;
        let mut bytes = [0u8; 4];
        let buf = &mut bytes[..usize::from(width.bytes())];
        let fd = self.device.fd();
        match sys::pread(fd, buf, self.config_io_offset(offset)) {
            Ok(n) if n == buf.len() => {}
            Ok(n) => return Err(BackendError::os("config pread", short(n, buf.len()))),
            Err(e) => return Err(BackendError::os("config pread", e)),
        }
        // Config space is little-endian.
        Ok(u32::from_le_bytes(bytes))
    }

    fn config_write(&mut self, offset: u16, width: Width, value: u32) -> Result<(), BackendError> {
        check_write(offset, width, self.config_size, value)?;
        let bytes = value.to_le_bytes();
        let buf = &bytes[..usize::from(width.bytes())];
        let fd = self.device.fd();
        match sys::pwrite(fd, buf, self.config_io_offset(offset)) {
            Ok(n) if n == buf.len() => Ok(()),
            Ok(n) => Err(BackendError::os("config pwrite", short(n, buf.len()))),
            Err(e) => Err(BackendError::os("config pwrite", e)),
        }
    }
}

impl PciBackend for VfioBackend {
    /// The kernel virtualizes INTX_DISABLE and always takes an unmask
    /// eventfd ([`VfioBackend::UNMASK_EVENTFD`]); it signals the trigger
    /// only after it masked an asserting device (AUTOMASKED), in PCI 2.3
    /// and in `nointxmask` mode alike.
    fn capabilities(&self) -> Capabilities {
        Capabilities::new(
            IntxDisableBit::Virtualized,
            Self::UNMASK_EVENTFD,
            self.intx.automasked(),
        )
    }

    /// `SET_IRQS(INTX, DATA_EVENTFD | ACTION_TRIGGER, trigger)`.
    fn intx_enable(&mut self, trigger: &EventFd) -> Result<(), BackendError> {
        self.set_intx(
            IrqSet::eventfds(
                VFIO_PCI_INTX_IRQ_INDEX,
                IrqAction::Trigger,
                &[trigger.as_raw_fd()],
            ),
            "VFIO_DEVICE_SET_IRQS (INTx trigger eventfd)",
        )?;
        self.intx_enabled = true;
        Ok(())
    }

    /// ACTION_MASK, then `SET_IRQS(INTX, DATA_NONE | ACTION_TRIGGER, count 0)`:
    /// the kernel frees its handler and the unmask eventfd with it, and the
    /// physical mask stays set. Does nothing if this backend has not enabled
    /// INTx (the kernel would answer EINVAL).
    fn intx_disable(&mut self) -> Result<(), BackendError> {
        self.require_intx()?;
        if !self.intx_enabled {
            return Ok(());
        }
        self.intx_mask()?;
        self.set_intx(
            IrqSet::none(VFIO_PCI_INTX_IRQ_INDEX, IrqAction::Trigger, 0),
            "VFIO_DEVICE_SET_IRQS (INTx disable)",
        )?;
        self.intx_enabled = false;
        Ok(())
    }

    /// vfio-pci's INTx handler has already done the PCI 2.3 check-and-mask in
    /// the kernel when it signalled the trigger (the index is AUTOMASKED): the
    /// line is masked and vfio's `masked` flag is set. What is left is to
    /// confirm that the device still asserts, with one 32-bit read of
    /// COMMAND+STATUS through the config region (STATUS.INTERRUPT passes
    /// through from the hardware; an all-ones answer is an error).
    ///
    /// - Set: the interrupt is ours and the kernel's mask holds it: `Ok(true)`.
    /// - Clear: the device deasserted since the kernel masked it (a reset
    ///   dropped the line, or the wake-up was the engine's own), so the mask
    ///   was taken on our behalf for nothing. ACTION_UNMASK runs the kernel's
    ///   check-and-unmask: it unmasks, or, if the device asserted again in
    ///   the meantime, keeps the mask and signals the trigger again. Either
    ///   way nothing stays masked on our behalf: `Ok(false)`.
    fn intx_check_and_mask(&mut self) -> Result<bool, BackendError> {
        self.require_intx()?;
        if read_command_status(self)?.asserting() {
            return Ok(true);
        }
        self.intx_check_and_unmask()?;
        Ok(false)
    }

    /// `SET_IRQS(INTX, DATA_NONE | ACTION_UNMASK)`: the kernel's
    /// check-and-unmask, which signals the trigger again if the device still
    /// asserts.
    fn intx_check_and_unmask(&mut self) -> Result<Unmask, BackendError> {
        self.set_intx(
            IrqSet::none(VFIO_PCI_INTX_IRQ_INDEX, IrqAction::Unmask, 1),
            "VFIO_DEVICE_SET_IRQS (INTx UNMASK)",
        )?;
        Ok(Unmask::Delegated)
    }

    /// `SET_IRQS(INTX, DATA_NONE | ACTION_MASK)`.
    fn intx_mask(&mut self) -> Result<(), BackendError> {
        self.set_intx(
            IrqSet::none(VFIO_PCI_INTX_IRQ_INDEX, IrqAction::Mask, 1),
            "VFIO_DEVICE_SET_IRQS (INTx MASK)",
        )
    }

    /// COMMAND through the device's sysfs `config` (opened read-only at the
    /// first call): the hardware's INTX_DISABLE, which vfio-pci's config
    /// region virtualizes. The kernel's automask and a reset's restore show
    /// here, and nowhere else.
    fn read_physical_intx_disable(&mut self) -> Result<bool, BackendError> {
        let config = match &mut self.physical_config {
            Some(config) => config,
            None => {
                let opened =
                    SysfsConfig::open_read_only(&PciSysfs::new(), self.bdf).map_err(|e| {
                        BackendError::os("opening the sysfs config", std::io::Error::other(e))
                    })?;
                self.physical_config.insert(opened)
            }
        };
        Ok(read_command_status(config)?.masked())
    }

    /// The count of the device's host IRQ in `/proc/interrupts` (its
    /// number from sysfs `irq`, read each time: enabling can move it).
    fn host_interrupt_count(&mut self) -> Result<Option<u64>, BackendError> {
        let sysfs = PciSysfs::new();
        let irq = sysfs
            .irq(self.bdf)
            .map_err(|e| BackendError::os("reading the IRQ number", std::io::Error::other(e)))?;
        let Some(irq) = irq else {
            return Ok(None);
        };
        let text = std::fs::read_to_string("/proc/interrupts")
            .map_err(|e| BackendError::os("reading /proc/interrupts", e))?;
        Ok(crate::pci::sysfs::interrupt_count(&text, irq))
    }

    /// `SET_IRQS(INTX, DATA_EVENTFD | ACTION_UNMASK, fd)`; `None` passes -1,
    /// which removes it.
    fn intx_set_unmask_eventfd(&mut self, fd: Option<&EventFd>) -> Result<(), BackendError> {
        let raw = fd.map_or(-1, AsRawFd::as_raw_fd);
        self.set_intx(
            IrqSet::eventfds(VFIO_PCI_INTX_IRQ_INDEX, IrqAction::Unmask, &[raw]),
            "VFIO_DEVICE_SET_IRQS (INTx unmask eventfd)",
        )
    }

    /// `VFIO_DEVICE_RESET`. Without `VFIO_DEVICE_FLAGS_RESET` the ioctl is
    /// not attempted: [`BackendError::NoResetMethod`], as for EINVAL. EAGAIN
    /// and EBUSY (another reset holds the device) are returned for the
    /// engine's bounded retry; the backend never sleeps. Afterwards INTx is
    /// re-masked so that vfio's `masked` flag matches the hardware the
    /// reset restored.
    fn reset(&mut self) -> Result<(), BackendError> {
        if !self.has_reset() {
            return Err(BackendError::NoResetMethod);
        }
        match sys::reset(self.device.fd()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                return Err(BackendError::NoResetMethod)
            }
            Err(e) => return Err(BackendError::os("VFIO_DEVICE_RESET", e)),
        }
        self.remask_after_reset()
    }
}

/// Reads and writes one region of a VFIO device with `pread`/`pwrite`,
/// reporting errors and short transfers. Cheap to clone; shares the device.
#[derive(Clone)]
pub struct RegionAccess {
    bdf: Bdf,
    info: RegionInfo,
    device: DeviceFile,
}

impl fmt::Debug for RegionAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegionAccess")
            .field("bdf", &self.bdf)
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl RegionAccess {
    /// The region's index, flags, size and offset.
    pub fn info(&self) -> RegionInfo {
        self.info
    }

    fn check(&self, offset: u64, len: usize) -> Result<u64, VfioError> {
        let end = offset.checked_add(len as u64);
        match end {
            Some(end) if end <= self.info.size => Ok(self.info.offset + offset),
            _ => Err(VfioError::RegionOutOfRange {
                bdf: self.bdf,
                index: self.info.index,
                offset,
                len,
                size: self.info.size,
            }),
        }
    }

    fn io_error(&self, op: &'static str, offset: u64, len: usize, source: io::Error) -> VfioError {
        VfioError::RegionIo {
            bdf: self.bdf,
            op,
            index: self.info.index,
            offset,
            len,
            source,
        }
    }

    /// Reads `buf.len()` bytes at `offset` in the region.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), VfioError> {
        let at = self.check(offset, buf.len())?;
        match sys::pread(self.device.fd(), buf, at) {
            Ok(n) if n == buf.len() => Ok(()),
            Ok(n) => Err(self.io_error("read", offset, buf.len(), short(n, buf.len()))),
            Err(e) => Err(self.io_error("read", offset, buf.len(), e)),
        }
    }

    /// Writes `buf` at `offset` in the region.
    pub fn write(&self, offset: u64, buf: &[u8]) -> Result<(), VfioError> {
        let at = self.check(offset, buf.len())?;
        match sys::pwrite(self.device.fd(), buf, at) {
            Ok(n) if n == buf.len() => Ok(()),
            Ok(n) => Err(self.io_error("write", offset, buf.len(), short(n, buf.len()))),
            Err(e) => Err(self.io_error("write", offset, buf.len(), e)),
        }
    }

    /// Reads a little-endian 32-bit register.
    pub fn read_u32(&self, offset: u64) -> Result<u32, VfioError> {
        let mut b = [0u8; 4];
        self.read(offset, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Writes a little-endian 32-bit register.
    pub fn write_u32(&self, offset: u64, value: u32) -> Result<(), VfioError> {
        self.write(offset, &value.to_le_bytes())
    }
}

/// The error for a transfer that moved `done` of `wanted` bytes.
fn short(done: usize, wanted: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("short transfer: {done} of {wanted} bytes"),
    )
}

/// `VFIO_DEVICE_GET_PCI_HOT_RESET_INFO`: the devices a slot or bus reset
/// of the device would affect (ENODEV: it has neither).
fn hot_reset_info(fd: BorrowedFd<'_>) -> io::Result<HotResetInfo> {
    let mut info = HotResetInfo::with_capacity(1);
    // The device count can change between two calls (hotplug): a few
    // rounds, each sized by the previous ENOSPC answer.
    let mut rounds = 0;
    loop {
        match sys::hot_reset_info(fd, info.words_mut()) {
            Ok(()) => return Ok(info),
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && rounds < 4 => {
                rounds += 1;
                info = HotResetInfo::with_capacity(info.count());
            }
            Err(e) => return Err(e),
        }
    }
}

fn region(fd: BorrowedFd<'_>, index: u32) -> io::Result<RegionInfo> {
    let r = sys::region_info(fd, index)?;
    Ok(RegionInfo {
        index,
        flags: r.flags,
        size: r.size,
        offset: r.offset,
    })
}

/// The checks `open` makes in sysfs before asking the kernel; returns the
/// device's IOMMU group.
fn preflight(sysfs: &PciSysfs, bdf: Bdf) -> Result<u32, VfioError> {
    if !sysfs.exists(bdf) {
        return Err(not_found(sysfs, bdf));
    }
    let driver = sysfs.driver(bdf)?;
    if !driver.as_deref().is_some_and(|d| d.contains("vfio")) {
        return Err(VfioError::NotBoundToVfio { bdf, driver });
    }
    if sysfs.iommu_group(bdf)?.is_none() {
        return Err(no_iommu_group(sysfs, bdf));
    }
    let viability = sysfs.vfio_viability(bdf)?;
    let blockers: Vec<String> = viability
        .offending()
        .map(|m| {
            format!(
                "{} is bound to {}",
                m.name,
                m.driver.as_deref().unwrap_or("?")
            )
        })
        .collect();
    if !blockers.is_empty() {
        return Err(VfioError::GroupNotViable {
            bdf,
            group: viability.group,
            blockers,
        });
    }
    Ok(viability.group)
}

fn not_found(sysfs: &PciSysfs, bdf: Bdf) -> VfioError {
    VfioError::DeviceNotFound {
        bdf,
        path: sysfs.device_dir(bdf),
        source: io::Error::from_raw_os_error(libc::ENOENT),
    }
}

fn no_iommu_group(sysfs: &PciSysfs, bdf: Bdf) -> VfioError {
    VfioError::NoIommu {
        bdf,
        missing: sysfs.device_dir(bdf).join("iommu_group"),
    }
}

/// Turns vfio-ioctls' setup errors into ours, keeping the OS error.
fn classify_setup_error(bdf: Bdf, group: u32, e: vfio_ioctls::VfioError) -> VfioError {
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

fn hot_reset_not_owned(bdf: Bdf, foreign: &[DependentDevice]) -> VfioError {
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

/// A duplicate of this process's open file of `/dev/vfio/<group>`.
///
/// `VFIO_DEVICE_PCI_HOT_RESET` must be given the group fds as proof of
/// ownership, but vfio-ioctls keeps the group file private, and the kernel
/// lets a group node be open only once at a time (a second open is EBUSY).
/// So the file the container opened is found in `/proc/self/fd` and
/// duplicated; the duplicate is checked to be that character device, since
/// a number read from `/proc` may have been closed and reused meanwhile.
fn own_group_fd(group: u32) -> io::Result<OwnedFd> {
    let path = PathBuf::from(format!("/dev/vfio/{group}"));
    let want = fs::metadata(&path)?.rdev();
    for entry in fs::read_dir("/proc/self/fd")? {
        let entry = entry?;
        if fs::read_link(entry.path()).ok().as_deref() != Some(Path::new(&path)) {
            continue;
        }
        let Ok(raw) = entry.file_name().to_string_lossy().parse::<RawFd>() else {
            continue;
        };
        let Ok(dup) = sys::dup_cloexec(raw) else {
            continue;
        };
        let file = File::from(dup);
        let meta = file.metadata()?;
        if meta.file_type().is_char_device() && meta.rdev() == want {
            return Ok(file.into());
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("this process has no open file of {}", path.display()),
    ))
}

#[cfg(test)]
mod tests {
    use super::fake_sysfs::fake::FakeSysfs;
    use super::*;
    use crate::error_chain;

    fn bdf(s: &str) -> Bdf {
        s.parse().unwrap()
    }

    #[test]
    fn preflight_names_a_missing_device() {
        let fake = FakeSysfs::new();
        let err = preflight(&fake.sysfs(), bdf("0000:0f:00.0")).unwrap_err();
        assert!(matches!(err, VfioError::DeviceNotFound { .. }), "{err:?}");
        let text = error_chain(&err);
        assert!(
            text.starts_with("0000:0f:00.0: no such PCI device"),
            "{text}"
        );
        assert!(text.contains("os error 2"), "{text}");
    }

    #[test]
    fn preflight_names_the_driver_a_device_is_bound_to() {
        let fake = FakeSysfs::new();
        fake.device("0000:02:00.0", "0x00ff00", Some("uio_pci_generic"), Some(6));
        fake.device("0000:03:00.0", "0x00ff00", None, Some(8));
        let err = preflight(&fake.sysfs(), bdf("0000:02:00.0")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "0000:02:00.0: cannot open through VFIO: the device is bound to uio_pci_generic, not vfio-pci"
        );
        let err = preflight(&fake.sysfs(), bdf("0000:03:00.0")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "0000:03:00.0: cannot open through VFIO: the device is not bound to any driver (bind it to vfio-pci)"
        );
    }

    #[test]
    fn preflight_without_an_iommu_group_is_no_iommu() {
        let fake = FakeSysfs::new();
        fake.device("0000:01:00.0", "0x00ff00", Some("vfio-pci"), None);
        let err = preflight(&fake.sysfs(), bdf("0000:01:00.0")).unwrap_err();
        assert!(matches!(err, VfioError::NoIommu { .. }), "{err:?}");
        assert!(
            err.to_string().contains("iommu_group does not exist"),
            "{err}"
        );
    }

    #[test]
    fn preflight_names_the_device_that_makes_the_group_not_viable() {
        let fake = FakeSysfs::new();
        fake.device("0000:01:00.0", "0x020000", Some("vfio-pci"), Some(7));
        fake.device("0000:01:00.1", "0x020000", Some("e1000e"), Some(7));
        fake.device("0000:00:1c.0", "0x060400", Some("pcieport"), Some(7));
        let err = preflight(&fake.sysfs(), bdf("0000:01:00.0")).unwrap_err();
        match &err {
            VfioError::GroupNotViable {
                group, blockers, ..
            } => {
                assert_eq!(*group, 7);
                assert_eq!(blockers, &["0000:01:00.1 is bound to e1000e".to_owned()]);
            }
            other => panic!("{other:?}"),
        }
        assert!(
            err.to_string().starts_with(
                "0000:01:00.0: IOMMU group 7 is not viable: 0000:01:00.1 is bound to e1000e"
            ),
            "{err}"
        );
    }

    #[test]
    fn preflight_accepts_a_viable_group() {
        let fake = FakeSysfs::new();
        fake.device("0000:01:00.0", "0x020000", Some("vfio-pci"), Some(7));
        fake.device("0000:01:00.1", "0x020000", None, Some(7));
        fake.device("0000:00:1c.0", "0x060400", Some("pcieport"), Some(7));
        assert_eq!(preflight(&fake.sysfs(), bdf("0000:01:00.0")).unwrap(), 7);
    }

    #[test]
    fn setup_errors_keep_their_errno_and_are_told_apart() {
        use vfio_ioctls::VfioError as E;
        let b = bdf("0000:01:00.0");
        let os = io::Error::from_raw_os_error;

        let err = classify_setup_error(b, 5, E::OpenGroup(os(libc::EACCES), "5".into()));
        assert!(matches!(err, VfioError::NoPermission { .. }), "{err:?}");
        assert_eq!(
            error_chain(&err),
            format!(
                "0000:01:00.0: no permission to open /dev/vfio/5: {}",
                os(libc::EACCES)
            )
        );
        let source = std::error::Error::source(&err).unwrap();
        let source = source.downcast_ref::<io::Error>().unwrap();
        assert_eq!(source.raw_os_error(), Some(libc::EACCES));

        let err = classify_setup_error(b, 5, E::OpenContainer(os(libc::EACCES)));
        assert!(err.to_string().ends_with("open /dev/vfio/vfio"), "{err}");

        let err = classify_setup_error(b, 5, E::OpenGroup(os(libc::EBUSY), "5".into()));
        assert!(
            matches!(err, VfioError::GroupBusy { group: 5, .. }),
            "{err:?}"
        );

        let err = classify_setup_error(b, 5, E::OpenGroup(os(libc::ENOENT), "5".into()));
        assert!(matches!(err, VfioError::NoIommu { .. }), "{err:?}");

        let err = classify_setup_error(b, 5, E::GroupViable);
        assert!(
            err.to_string().contains("IOMMU group 5 is not viable"),
            "{err}"
        );

        let err = classify_setup_error(b, 5, E::OpenGroup(os(libc::EIO), "5".into()));
        assert!(matches!(err, VfioError::Setup { .. }), "{err:?}");
        assert!(error_chain(&err).contains(&os(libc::EIO).to_string()));
    }

    #[test]
    fn hot_reset_refusal_lists_the_foreign_devices_and_groups() {
        let foreign = [
            DependentDevice {
                group: 9,
                bdf: Some(bdf("0000:02:00.1")),
            },
            DependentDevice {
                group: 7,
                bdf: Some(bdf("0000:02:00.2")),
            },
            DependentDevice {
                group: 9,
                bdf: None,
            },
        ];
        let err = hot_reset_not_owned(bdf("0000:02:00.0"), &foreign);
        assert_eq!(
            err.to_string(),
            "0000:02:00.0: a hot reset would also reset devices in IOMMU groups this process \
             does not own: 0000:02:00.1 (group 9), 0000:02:00.2 (group 7), a device in group 9"
        );
        match err {
            VfioError::HotResetNotOwned { groups, .. } => assert_eq!(groups, vec![7, 9]),
            other => panic!("{other:?}"),
        }
        // Through the backend error the engine sees, the text survives.
        let backend = BackendError::os(
            "VFIO_DEVICE_PCI_HOT_RESET",
            io::Error::new(
                io::ErrorKind::PermissionDenied,
                hot_reset_not_owned(bdf("0000:02:00.0"), &foreign[..1]),
            ),
        );
        assert!(!backend.is_transient());
        assert_eq!(
            error_chain(&backend),
            "VFIO_DEVICE_PCI_HOT_RESET failed: 0000:02:00.0: a hot reset would also reset \
             devices in IOMMU groups this process does not own: 0000:02:00.1 (group 9)"
        );
    }

    #[test]
    fn region_and_irq_errors_name_device_and_operation() {
        let err = VfioError::RegionIo {
            bdf: bdf("0000:01:00.0"),
            op: "write",
            index: 0,
            offset: 0x60,
            len: 4,
            source: io::Error::from_raw_os_error(libc::EIO),
        };
        assert!(err
            .to_string()
            .starts_with("0000:01:00.0: 4-byte write at 0x60 of region 0 failed"));
        let err = VfioError::IrqNotSupported {
            bdf: bdf("0000:01:00.0"),
            irq: "ERR",
        };
        assert_eq!(
            err.to_string(),
            "0000:01:00.0: the device has no ERR interrupt (VFIO_DEVICE_GET_IRQ_INFO reports count 0)"
        );
    }

    #[test]
    fn no_open_group_file_is_not_found() {
        // No test process holds a VFIO group open.
        let err = own_group_fd(4_000_000).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn short_transfers_are_errors_that_say_so() {
        let e = short(2, 4);
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(e.to_string(), "short transfer: 2 of 4 bytes");
    }
}
