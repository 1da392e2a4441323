//! One backend type for every device the daemon owns, whichever way it is
//! reached.

use vmm_sys_util::eventfd::EventFd;

use crate::backend::{BackendError, Capabilities, ConfigSpace, PciBackend, Unmask};
use crate::daemon::config::{BackendKind, SimKernelSetting};
use crate::pci::{Bdf, Width};
#[cfg(feature = "testkit")]
use crate::sim::{SimBackend, SimKernel};
use crate::uio::UioBackend;
use crate::vfio::VfioBackend;

/// A device backend chosen by the configuration.
pub enum AnyBackend {
    /// Kernel VFIO.
    Vfio(VfioBackend),
    /// uio_pci_generic.
    Uio(UioBackend),
    /// The simulated device (test kit).
    #[cfg(feature = "testkit")]
    Sim(SimBackend),
}

macro_rules! each {
    ($self:expr, $b:ident => $e:expr) => {
        match $self {
            AnyBackend::Vfio($b) => $e,
            AnyBackend::Uio($b) => $e,
            #[cfg(feature = "testkit")]
            AnyBackend::Sim($b) => $e,
        }
    };
}

impl std::fmt::Debug for AnyBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AnyBackend::Vfio(b) => b.fmt(f),
            AnyBackend::Uio(b) => b.fmt(f),
            #[cfg(feature = "testkit")]
            AnyBackend::Sim(b) => write!(f, "SimBackend({})", b.bdf()),
        }
    }
}

impl AnyBackend {
    /// Whether the kernel driver behind the backend keeps a handler that
    /// masks the line while the device asserts, with nobody to unmask it
    /// once the daemon lets go: uio_pci_generic (its `irqhandler` is
    /// `pci_check_and_mask_intx` for as long as it is bound). vfio-pci's
    /// handler does too, but the daemon sees its virtual INTX_DISABLE.
    pub fn masks_asserting_line(&self) -> bool {
        matches!(self, AnyBackend::Uio(_))
    }
}

/// Whether a device of `kind` (for a simulated one, modelling `sim_kernel`)
/// can take the kernel bypass: the backends' own answer
/// ([`Capabilities::unmask_eventfd`]), for a configuration that must decide
/// before any device is open. An open device answers through
/// [`PciBackend::capabilities`].
pub(crate) fn kind_bypass_capable(kind: BackendKind, sim_kernel: SimKernelSetting) -> bool {
    match kind {
        BackendKind::Vfio => VfioBackend::UNMASK_EVENTFD,
        BackendKind::Uio => UioBackend::UNMASK_EVENTFD,
        #[cfg(feature = "testkit")]
        BackendKind::Sim => SimKernel::from(sim_kernel).unmask_eventfd(),
        // Without the test kit no simulated device can be opened at all.
        #[cfg(not(feature = "testkit"))]
        BackendKind::Sim => {
            let _ = sim_kernel;
            false
        }
    }
}

#[cfg(feature = "testkit")]
impl From<SimKernelSetting> for SimKernel {
    fn from(setting: SimKernelSetting) -> Self {
        match setting {
            SimKernelSetting::Bare => SimKernel::Bare,
            SimKernelSetting::VfioPci => SimKernel::VfioPci,
        }
    }
}

impl ConfigSpace for AnyBackend {
    fn bdf(&self) -> Bdf {
        each!(self, b => b.bdf())
    }
    fn config_size(&self) -> u16 {
        each!(self, b => b.config_size())
    }
    fn config_read(&mut self, offset: u16, width: Width) -> Result<u32, BackendError> {
        each!(self, b => b.config_read(offset, width))
    }
    fn config_write(&mut self, offset: u16, width: Width, value: u32) -> Result<(), BackendError> {
        each!(self, b => b.config_write(offset, width, value))
    }
}

impl PciBackend for AnyBackend {
    fn capabilities(&self) -> Capabilities {
        each!(self, b => b.capabilities())
    }
    fn intx_enable(&mut self, trigger: &EventFd) -> Result<(), BackendError> {
        each!(self, b => b.intx_enable(trigger))
    }
    fn intx_disable(&mut self) -> Result<(), BackendError> {
        each!(self, b => b.intx_disable())
    }
    fn intx_check_and_mask(&mut self) -> Result<bool, BackendError> {
        each!(self, b => b.intx_check_and_mask())
    }
    fn intx_check_and_unmask(&mut self) -> Result<Unmask, BackendError> {
        each!(self, b => b.intx_check_and_unmask())
    }
    fn read_physical_intx_disable(&mut self) -> Result<bool, BackendError> {
        each!(self, b => b.read_physical_intx_disable())
    }
    fn host_interrupt_count(&mut self) -> Result<Option<u64>, BackendError> {
        each!(self, b => b.host_interrupt_count())
    }
    fn intx_mask(&mut self) -> Result<(), BackendError> {
        each!(self, b => b.intx_mask())
    }
    fn intx_set_unmask_eventfd(&mut self, fd: Option<&EventFd>) -> Result<(), BackendError> {
        each!(self, b => b.intx_set_unmask_eventfd(fd))
    }
    fn intx_adopt(&mut self, trigger: &EventFd, unmask: &EventFd) -> Result<(), BackendError> {
        each!(self, b => b.intx_adopt(trigger, unmask))
    }
    fn reset(&mut self) -> Result<(), BackendError> {
        each!(self, b => b.reset())
    }
}

#[cfg(all(test, feature = "testkit"))]
mod tests {
    use super::*;
    use crate::sim::SimDevice;

    /// The answer a configuration gets for a kind is the one the opened
    /// backend gives, and the one its unmask eventfd registration keeps.
    #[test]
    fn a_kinds_bypass_answer_is_the_opened_backends() {
        for setting in [SimKernelSetting::Bare, SimKernelSetting::VfioPci] {
            let sim = SimDevice::builder()
                .kernel(SimKernel::from(setting))
                .build();
            let mut backend = AnyBackend::Sim(sim.backend());
            let caps = backend.capabilities();
            assert_eq!(
                kind_bypass_capable(BackendKind::Sim, setting),
                caps.bypass_capable(),
                "{setting:?}"
            );
            let fd = EventFd::new(0).unwrap();
            assert_eq!(
                backend.intx_set_unmask_eventfd(Some(&fd)).is_ok(),
                caps.unmask_eventfd,
                "{setting:?}"
            );
            backend.intx_set_unmask_eventfd(None).ok();
            // The engine answers without the gate, as the backend did.
            let engine =
                crate::intx::IntxDevice::new(backend, crate::intx::CallbackSink(|| Ok(())))
                    .unwrap();
            assert_eq!(engine.capabilities(), caps, "{setting:?}");
        }
        assert!(kind_bypass_capable(
            BackendKind::Vfio,
            SimKernelSetting::Bare
        ));
        assert!(!kind_bypass_capable(
            BackendKind::Uio,
            SimKernelSetting::Bare
        ));
    }
}
