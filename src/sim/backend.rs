//! The engine's seam on the simulated device ([`SimBackend`]): config
//! access and INTx control as the modelled kernel driver (bare or vfio-pci)
//! offers them, including vfio-pci's unmask eventfd (`Virqfd`).

use std::sync::Arc;
use std::thread;

use vmm_sys_util::eventfd::EventFd;

use crate::backend::{BackendError, Capabilities, ConfigSpace, PciBackend, Unmask};
use crate::pci::intx;
use crate::pci::regs::*;
use crate::pci::{intx_disable_mask, with_intx_disable, Bdf, Width};

use super::{Inner, SimBus, SimKernel, SimOp};

/// The engine's side of the simulated device.
pub struct SimBackend {
    pub(super) inner: Arc<Inner>,
}

impl SimBackend {
    /// A secondary bus reset (as VFIO_DEVICE_PCI_HOT_RESET does): every
    /// device on this one's [`SimBus`] is reset in the same window, each
    /// restored by the kernel as its own reset would be. EAGAIN, with
    /// nothing reset, while any of them is in another reset. Like
    /// [`reset`](PciBackend::reset), re-masks this device's INTx afterwards
    /// in the vfio-pci model; the other devices' drivers are not told.
    pub fn hot_reset(&mut self) -> Result<(), BackendError> {
        let mut devices = self
            .inner
            .bus
            .as_ref()
            .map(SimBus::members)
            .unwrap_or_default();
        if !devices.iter().any(|d| Arc::ptr_eq(d, &self.inner)) {
            devices.push(Arc::clone(&self.inner));
        }
        if devices.iter().any(|d| d.lock().in_reset) {
            // Another reset holds one of them; nothing is reset.
            return Err(BackendError::os(
                "hot reset",
                std::io::Error::from_raw_os_error(libc::EAGAIN),
            ));
        }
        let mut saved = Vec::with_capacity(devices.len());
        for device in &devices {
            let entered = {
                let mut s = device.lock();
                device.enter_reset(&mut s, device.kernel == SimKernel::VfioPci)
            };
            match entered {
                Ok(state) => saved.push((device, state)),
                Err(e) => {
                    for (device, state) in saved {
                        device.leave_reset(state);
                    }
                    return Err(e);
                }
            }
        }
        let window = devices.iter().map(|d| d.reset_window).max();
        thread::sleep(window.unwrap_or_default());
        for (device, state) in saved {
            device.leave_reset(state);
        }
        if self.inner.kernel == SimKernel::VfioPci {
            let mut s = self.inner.lock();
            self.inner.vfio_mask(&mut s);
        }
        Ok(())
    }

    fn op(&self, op: SimOp, name: &'static str) -> Result<(), BackendError> {
        let mut s = self.inner.lock();
        match self.inner.fault(&mut s, op) {
            Some(f) => Err(f.error(name)),
            None => Ok(()),
        }
    }
}

impl ConfigSpace for SimBackend {
    fn bdf(&self) -> Bdf {
        self.inner.bdf
    }

    fn config_size(&self) -> u16 {
        PCI_CFG_SPACE_SIZE
    }

    fn config_read(&mut self, offset: u16, width: Width) -> Result<u32, BackendError> {
        let mut s = self.inner.wait_out_of_reset(self.inner.lock());
        let value = self.inner.read(&mut s, offset, width)?;
        Ok(match self.inner.kernel {
            SimKernel::Bare => value,
            // vfio-pci shows the user's virtual INTX_DISABLE.
            SimKernel::VfioPci => with_intx_disable(offset, width, value, s.virq_disabled),
        })
    }

    fn config_write(&mut self, offset: u16, width: Width, value: u32) -> Result<(), BackendError> {
        let mut s = self.inner.wait_out_of_reset(self.inner.lock());
        match self.inner.kernel {
            SimKernel::Bare => self.inner.write(&mut s, offset, width, value),
            SimKernel::VfioPci => {
                // The physical bit is the driver's; the written one is the
                // user's virtual disable (vfio_basic_config_write).
                let physical = self.inner.command(&s) & COMMAND_INTX_DISABLE != 0;
                let virt = intx_disable_mask(offset, width).map(|mask| value & mask != 0);
                self.inner.write(
                    &mut s,
                    offset,
                    width,
                    with_intx_disable(offset, width, value, physical),
                )?;
                match virt {
                    Some(true) if !s.virq_disabled => {
                        s.virq_disabled = true;
                        self.inner.vfio_mask(&mut s);
                    }
                    Some(false) if s.virq_disabled => {
                        s.virq_disabled = false;
                        self.inner.vfio_unmask(&mut s);
                    }
                    _ => {}
                }
                Ok(())
            }
        }
    }
}

impl PciBackend for SimBackend {
    /// As the modelled kernel's ([`SimKernel::intx_disable_bit`],
    /// [`SimKernel::unmask_eventfd`]); trigger claims as built
    /// ([`SimDeviceBuilder::trigger_claims`](super::SimDeviceBuilder::trigger_claims)), where only the vfio-pci model
    /// signals the way that makes them true.
    fn capabilities(&self) -> Capabilities {
        let kernel = self.inner.kernel;
        Capabilities::new(
            kernel.intx_disable_bit(),
            kernel.unmask_eventfd(),
            self.inner.trigger_claims && kernel == SimKernel::VfioPci,
        )
    }

    fn intx_enable(&mut self, trigger: &EventFd) -> Result<(), BackendError> {
        self.op(SimOp::IntxEnable, "INTx enable")?;
        let trigger = trigger
            .try_clone()
            .map_err(|e| BackendError::os("eventfd dup", e))?;
        let mut s = self.inner.lock();
        s.trigger = Some(trigger);
        if self.inner.kernel == SimKernel::VfioPci {
            // vfio_intx_enable: masked iff virtually disabled.
            s.vfio_masked = s.virq_disabled;
            let masked = s.vfio_masked;
            self.inner.set_physical_intx_disable(&mut s, masked);
        }
        // A line already high is an interrupt the new handler must see.
        s.line_out = false;
        self.inner.update_line(&mut s);
        Ok(())
    }

    fn intx_disable(&mut self) -> Result<(), BackendError> {
        self.op(SimOp::IntxDisable, "INTx disable")?;
        let virqfd = {
            let mut s = self.inner.lock();
            s.trigger = None;
            self.inner.set_physical_intx_disable(&mut s, true);
            s.vfio_masked = true;
            self.inner.update_line(&mut s);
            s.virqfd.take()
        };
        // Stopped outside the state lock: its thread takes that lock.
        drop(virqfd);
        Ok(())
    }

    fn intx_check_and_mask(&mut self) -> Result<bool, BackendError> {
        self.op(SimOp::CheckAndMask, "INTx check-and-mask")?;
        match self.inner.kernel {
            SimKernel::Bare => intx::check_and_mask(self),
            SimKernel::VfioPci => {
                // The kernel masked before signalling; if the device no
                // longer asserts, undo that through ACTION_UNMASK.
                if intx::read_command_status(self)?.asserting() {
                    Ok(true)
                } else {
                    let mut s = self.inner.lock();
                    self.inner.vfio_unmask(&mut s);
                    Ok(false)
                }
            }
        }
    }

    fn intx_check_and_unmask(&mut self) -> Result<Unmask, BackendError> {
        self.op(SimOp::CheckAndUnmask, "INTx check-and-unmask")?;
        match self.inner.kernel {
            SimKernel::Bare => Ok(if intx::check_and_unmask(self)? {
                Unmask::Unmasked
            } else {
                Unmask::StillAsserting
            }),
            SimKernel::VfioPci => {
                let mut s = self.inner.lock();
                self.inner.vfio_unmask(&mut s);
                Ok(Unmask::Delegated)
            }
        }
    }

    fn intx_mask(&mut self) -> Result<(), BackendError> {
        self.op(SimOp::Mask, "INTx mask")?;
        match self.inner.kernel {
            SimKernel::Bare => intx::set_intx_disable(self, true),
            SimKernel::VfioPci => {
                let mut s = self.inner.lock();
                self.inner.vfio_mask(&mut s);
                Ok(())
            }
        }
    }

    /// The model's COMMAND.INTX_DISABLE: in the vfio-pci model through
    /// sysfs config, which waits while the device is in reset; the bare
    /// device answers all-ones during a reset.
    fn read_physical_intx_disable(&mut self) -> Result<bool, BackendError> {
        let s = self.inner.wait_out_of_reset(self.inner.lock());
        if s.in_reset {
            return Err(BackendError::NotResponding);
        }
        Ok(self.inner.command(&s) & COMMAND_INTX_DISABLE != 0)
    }

    /// The host interrupts the model signalled (its kernel handler's runs).
    fn host_interrupt_count(&mut self) -> Result<Option<u64>, BackendError> {
        Ok(Some(self.inner.lock().host_signals))
    }

    fn intx_set_unmask_eventfd(&mut self, fd: Option<&EventFd>) -> Result<(), BackendError> {
        self.op(SimOp::SetUnmaskEventfd, "INTx unmask eventfd")?;
        if !self.inner.kernel.unmask_eventfd() {
            return Err(BackendError::os(
                "registering an unmask eventfd",
                std::io::Error::from(std::io::ErrorKind::Unsupported),
            ));
        }
        let Some(fd) = fd else {
            // fd -1: vfio_virqfd_disable. Stopped outside the state lock:
            // its thread takes that lock.
            let old = self.inner.lock().virqfd.take();
            drop(old);
            return Ok(());
        };
        // vfio_virqfd_enable: one unmask eventfd per device; a second one is
        // refused until the first is removed.
        if self.inner.lock().virqfd.is_some() {
            return Err(BackendError::os(
                "registering an unmask eventfd",
                std::io::Error::from_raw_os_error(libc::EBUSY),
            ));
        }
        let virqfd = Virqfd::start(Arc::clone(&self.inner), fd)
            .map_err(|e| BackendError::os("starting the unmask eventfd thread", e))?;
        self.inner.lock().virqfd = Some(virqfd);
        Ok(())
    }

    /// The vfio-pci model keeps its trigger and unmask eventfd thread in
    /// the device's state, beyond any one backend (as the kernel keeps them
    /// beyond the process that set them while the device file stays open):
    /// adopted as they are, nothing changed, if both are in place; refused
    /// (EINVAL) otherwise.
    fn intx_adopt(&mut self, _trigger: &EventFd, _unmask: &EventFd) -> Result<(), BackendError> {
        self.op(SimOp::IntxAdopt, "INTx adopt")?;
        if !self.inner.kernel.unmask_eventfd() {
            return Err(BackendError::os(
                "adopting a kernel bypass",
                std::io::Error::from(std::io::ErrorKind::Unsupported),
            ));
        }
        let s = self.inner.lock();
        if s.trigger.is_none() || s.virqfd.is_none() {
            return Err(BackendError::os(
                "adopting a kernel bypass (the kernel has no trigger or unmask eventfd)",
                std::io::Error::from_raw_os_error(libc::EINVAL),
            ));
        }
        Ok(())
    }

    fn reset(&mut self) -> Result<(), BackendError> {
        self.inner
            .reset(self.inner.kernel == SimKernel::VfioPci, false)?;
        if self.inner.kernel == SimKernel::VfioPci {
            // As the VFIO backend does: bring the driver's mask bookkeeping
            // in line with the hardware the reset restored.
            let mut s = self.inner.lock();
            self.inner.vfio_mask(&mut s);
        }
        Ok(())
    }
}

impl Drop for SimBackend {
    fn drop(&mut self) {
        // The unmask eventfd's thread holds the device; stop it with the
        // backend that started it (outside the state lock it takes).
        let virqfd = self.inner.lock().virqfd.take();
        drop(virqfd);
    }
}

/// vfio-pci model: the thread behind an unmask eventfd (the kernel's
/// virqfd), running the unmask handler each time the eventfd is signalled.
pub(super) struct Virqfd {
    stop: EventFd,
    thread: Option<thread::JoinHandle<()>>,
}

impl Virqfd {
    pub(super) fn start(inner: Arc<Inner>, fd: &EventFd) -> std::io::Result<Self> {
        use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
        let fd = fd.try_clone()?;
        let stop = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK)?;
        let stop_rx = stop.try_clone()?;
        let epoll = Epoll::new()?;
        for (f, token) in [(&fd, 0), (&stop_rx, 1)] {
            epoll.ctl(
                ControlOperation::Add,
                std::os::fd::AsRawFd::as_raw_fd(f),
                EpollEvent::new(EventSet::IN, token),
            )?;
        }
        let thread = thread::Builder::new()
            .name("sim-virqfd".into())
            .spawn(move || {
                let mut events = [EpollEvent::default(); 2];
                loop {
                    let n = match epoll.wait(-1, &mut events) {
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(_) => return,
                    };
                    for event in &events[..n] {
                        if event.data() == 1 {
                            return;
                        }
                        if fd.read().is_ok() {
                            let mut s = inner.lock();
                            inner.vfio_unmask(&mut s);
                        }
                    }
                }
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Virqfd {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
