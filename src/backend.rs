//! The backend seam: everything the engine needs from one PCI function.
//!
//! One implementation per way of reaching a device (kernel VFIO,
//! uio_pci_generic plus sysfs config, the simulated device). Every method is
//! required and fallible: a device that is gone, in reset or answering
//! all-ones is an error the caller sees, never a made-up value.
//!
//! Backends are only ever reached through the [`ConfigGate`](crate::gate::ConfigGate),
//! which is why the methods take `&mut self`: holding a gate guard is what
//! makes the access exclusive.

use vmm_sys_util::eventfd::EventFd;

pub use crate::pci::config::{BackendError, ConfigSpace};

/// How a backend's COMMAND.INTX_DISABLE bit behaves when written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntxDisableBit {
    /// The bit is the hardware mask (uio_pci_generic's sysfs config, the
    /// simulated device): the engine writes the union of the guest's bit and
    /// its own host mask.
    Physical,
    /// The kernel virtualizes the bit (vfio-pci): writing it sets the user's
    /// virtual disable while the kernel keeps the host mask itself, so the
    /// engine writes the guest's bit unchanged.
    Virtualized,
}

/// What a backend can do: the one place every "can this backend ...?"
/// question asks (the engine for the INTX_DISABLE owner and trigger claims,
/// the KVM wiring and the daemon for the kernel bypass).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// Who owns COMMAND.INTX_DISABLE, i.e. how the bit behaves when written.
    pub intx_disable: IntxDisableBit,
    /// Whether the kernel takes an unmask eventfd
    /// ([`PciBackend::intx_set_unmask_eventfd`]): the target of KVM's
    /// resample eventfd, without which there is no kernel bypass.
    pub unmask_eventfd: bool,
    /// Whether a signal of the trigger eventfd by the backend's own kernel
    /// driver is proof that the device asserted INTx and that its line is
    /// masked for us, so that
    /// [`intx_check_and_mask`](PciBackend::intx_check_and_mask) would only
    /// confirm it. vfio-pci: yes (AUTOMASKED: in PCI 2.3 mode its handler
    /// signals only after its own check-and-mask claimed the interrupt, its
    /// UNMASK only while the device still asserts; with `nointxmask=1` it
    /// disables its exclusive, level-triggered IRQ first). The engine relies
    /// on it only for a signal nothing can have overtaken (no reset,
    /// re-wiring or re-derivation since: the gate's generation), and
    /// re-checks everything else.
    pub trigger_claims: bool,
}

impl Capabilities {
    /// Capabilities from their parts.
    pub const fn new(
        intx_disable: IntxDisableBit,
        unmask_eventfd: bool,
        trigger_claims: bool,
    ) -> Self {
        Self {
            intx_disable,
            unmask_eventfd,
            trigger_claims,
        }
    }

    /// Whether the backend can take the kernel bypass (KVM's resample
    /// eventfd wired straight to the kernel's check-and-unmask).
    pub const fn bypass_capable(&self) -> bool {
        self.unmask_eventfd
    }
}

/// Result of a check-and-unmask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmask {
    /// The device was not asserting; INTx is unmasked.
    Unmasked,
    /// The device still asserts; INTx stays masked and the interrupt must be
    /// delivered again.
    StillAsserting,
    /// The kernel performs the check itself and signals the trigger eventfd
    /// again if the device still asserts (vfio-pci's ACTION_UNMASK).
    Delegated,
}

/// One PCI function, as the INTx engine needs it: config space plus INTx
/// control and reset.
pub trait PciBackend: ConfigSpace + Send {
    /// What this backend can do ([`Capabilities`]): the one answer to every
    /// question about the INTX_DISABLE owner, the kernel unmask eventfd and
    /// trigger claims. Fixed for the backend's lifetime (the engine reads it
    /// once, [`IntxDevice::capabilities`](crate::intx::IntxDevice::capabilities)).
    fn capabilities(&self) -> Capabilities;

    /// Starts INTx delivery: the backend signals `trigger` each time the
    /// device raises its line while unmasked.
    fn intx_enable(&mut self, trigger: &EventFd) -> Result<(), BackendError>;

    /// Stops INTx delivery and leaves the line masked.
    fn intx_disable(&mut self) -> Result<(), BackendError>;

    /// A host interrupt arrived: returns whether this device asserts INTx,
    /// and guarantees that on `Ok(true)` the line is masked and on `Ok(false)`
    /// nothing is left masked on its behalf (PCI 2.3 check-and-mask; "not
    /// mine" on a shared line).
    fn intx_check_and_mask(&mut self) -> Result<bool, BackendError>;

    /// The guest has finished with the interrupt: unmask unless the device
    /// still asserts (PCI 2.3 check-and-unmask).
    fn intx_check_and_unmask(&mut self) -> Result<Unmask, BackendError>;

    /// Masks INTx unconditionally.
    fn intx_mask(&mut self) -> Result<(), BackendError>;

    /// Reads the hardware's COMMAND.INTX_DISABLE, whoever set it: for
    /// vfio-pci through the device's sysfs `config` (the config region shows
    /// the user's virtual bit instead), for uio_pci_generic the config
    /// itself. The stuck-INTx watchdog compares it with what the state
    /// machine expects. Like any user config access it waits while a reset
    /// holds the device; a device that answers all-ones is
    /// [`BackendError::NotResponding`].
    fn read_physical_intx_disable(&mut self) -> Result<bool, BackendError>;

    /// How many interrupts the kernel's INTx handler has taken on the
    /// device's host IRQ (for vfio-pci the line's count in
    /// `/proc/interrupts`, every device on a shared line included), or
    /// `None` where the backend has no such count. On the kernel bypass it
    /// is the only trace of a new interrupt user space can see: the
    /// watchdog tells a line the guest is slow to service from one that no
    /// interrupt reaches any more with it.
    fn host_interrupt_count(&mut self) -> Result<Option<u64>, BackendError>;

    /// Registers (or with `None` removes) an eventfd whose signal performs a
    /// kernel-side check-and-unmask: the target of KVM's resample eventfd on
    /// the kernel-bypass path ([`Capabilities::unmask_eventfd`]). Backends
    /// without kernel support return
    /// [`std::io::ErrorKind::Unsupported`] as an [`BackendError::Os`].
    fn intx_set_unmask_eventfd(&mut self, fd: Option<&EventFd>) -> Result<(), BackendError>;

    /// Takes over INTx exactly as the kernel has it wired already, touching
    /// nothing: the kernel signals `trigger` and checks-and-unmasks at each
    /// signal of `unmask` (the kernel bypass a previous owner of the same
    /// device file set up, e.g. this daemon's previous process: its wiring
    /// outlives the process while the fd store keeps the device file open).
    /// Afterwards the backend behaves as after [`intx_enable`](Self::intx_enable)
    /// and [`intx_set_unmask_eventfd`](Self::intx_set_unmask_eventfd) with
    /// these eventfds. Backends without an unmask eventfd
    /// ([`Capabilities::unmask_eventfd`]) return
    /// [`std::io::ErrorKind::Unsupported`] as an [`BackendError::Os`]; one
    /// whose kernel shows the wiring is not in place refuses it.
    fn intx_adopt(&mut self, trigger: &EventFd, unmask: &EventFd) -> Result<(), BackendError>;

    /// Resets the function. Called only while the gate is blocked; the caller
    /// saves and restores config state around it and then re-establishes the
    /// INTx mask from the device's STATUS. A backend whose kernel keeps its
    /// own mask bookkeeping must leave it consistent with the hardware (for
    /// vfio-pci: masked).
    fn reset(&mut self) -> Result<(), BackendError>;
}
