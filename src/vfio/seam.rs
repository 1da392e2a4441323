//! The engine's seam on vfio-pci: [`ConfigSpace`] and [`PciBackend`] for
//! [`VfioBackend`], with vfio-pci's semantics (virtualized INTX_DISABLE,
//! automasked INTx, re-mask after reset).

use std::os::fd::AsRawFd;

use vfio_bindings::bindings::vfio::VFIO_PCI_INTX_IRQ_INDEX;
use vmm_sys_util::eventfd::EventFd;

use crate::backend::{BackendError, Capabilities, ConfigSpace, IntxDisableBit, PciBackend, Unmask};
use crate::pci::intx::read_command_status;
use crate::pci::{check_access, check_write, Bdf, Width};

use super::layout::{IrqAction, IrqSet};
use super::region::short;
use super::{sys, VfioBackend};
use crate::pci::sysfs::{PciSysfs, SysfsConfig};

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

    /// No ioctl: vfio-pci keeps INTx enabled with its trigger and unmask
    /// eventfd for as long as the device file is open, and VFIO has no call
    /// that reads them back, so the caller vouches for them (its record of
    /// the wiring on this same device file). From here on the backend
    /// treats INTx as enabled (masks after a reset, disables on drop).
    fn intx_adopt(&mut self, _trigger: &EventFd, _unmask: &EventFd) -> Result<(), BackendError> {
        self.require_intx()?;
        self.intx_enabled = true;
        Ok(())
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
