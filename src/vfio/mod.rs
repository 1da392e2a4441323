//! Kernel VFIO backend (vfio-pci).
//!
//! [`VfioBackend`] opens one PCI function through its IOMMU group with
//! vfio-ioctls (a TYPE1v2 container, the group, the device fd) and
//! implements the engine's seam with vfio-pci's semantics:
//!
//! - COMMAND.INTX_DISABLE is virtualized by the kernel
//!   ([`IntxDisableBit::Virtualized`](crate::backend::IntxDisableBit::Virtualized)); the kernel keeps the physical mask.
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
mod error;
#[cfg(test)]
mod fake_sysfs;
pub mod handover;
mod layout;
mod region;
mod seam;
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
    VFIO_DEVICE_FLAGS_PCI, VFIO_DEVICE_FLAGS_RESET, VFIO_PCI_CONFIG_REGION_INDEX,
    VFIO_PCI_ERR_IRQ_INDEX, VFIO_PCI_HOT_RESET_FLAG_DEV_ID, VFIO_PCI_INTX_IRQ_INDEX,
    VFIO_PCI_REQ_IRQ_INDEX,
};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioOps};
use vmm_sys_util::eventfd::EventFd;

use crate::backend::{BackendError, PciBackend};
use crate::pci::regs::PCI_CFG_SPACE_EXP_SIZE;
use crate::pci::Bdf;

use crate::pci::sysfs::{PciSysfs, SysfsConfig};
pub use error::VfioError;
use error::{classify_setup_error, hot_reset_not_owned, no_iommu_group, not_found};
use handover::DeviceIdentity;
use layout::{IrqAction, IrqSet};
use region::{hot_reset_info, region};
pub use region::{IrqInfo, RegionAccess, RegionInfo};

/// The container node every VFIO user opens first.
const VFIO_CONTAINER_PATH: &str = "/dev/vfio/vfio";

/// One PCI function opened through kernel VFIO (vfio-pci).
///
/// Implements [`ConfigSpace`](crate::backend::ConfigSpace) and [`PciBackend`] for the INTx engine; also
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

    /// The VFIO device fd (a daemon keeps a duplicate in systemd's fd
    /// store, so that the device stays open, INTx wired, across its own
    /// restart: the device fd holds its group and container).
    pub fn device_fd(&self) -> BorrowedFd<'_> {
        self.device.fd()
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
mod tests;
