//! KVM wiring: capability checks, the choice between the kernel bypass and
//! the user-space EOI path, and the irqfd/resample registration.
//!
//! - **Kernel bypass** ("fast path"): the backend signals KVM's irqfd
//!   directly, and KVM's resample eventfd is the backend's unmask eventfd
//!   (vfio-pci `ACTION_UNMASK` with an eventfd): the kernel does
//!   check-and-unmask at the guest's EOI; no user-space work per interrupt.
//! - **User-space path**: the engine receives the host interrupt, injects
//!   through the irqfd, reads the resample eventfd and runs check-and-unmask
//!   through the gate. The only path for backends without a kernel unmask
//!   eventfd (uio_pci_generic) and for VMs whose KVM rejects resample irqfds
//!   (split irqchip).

#[cfg(feature = "testkit")]
pub mod assign;
// The test VM's memory, DMA mapping and PIC state live here too.
#[cfg_attr(not(feature = "testkit"), allow(dead_code))]
mod sys;
#[cfg(feature = "testkit")]
pub mod testvm;

use std::fmt;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use kvm_ioctls::{Cap, Kvm, VmFd};
use tracing::{info, warn};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend::Capabilities;

/// Errors of the KVM wiring.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KvmError {
    /// A KVM ioctl failed.
    #[error("{op} failed")]
    Ioctl {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The GSI cannot carry this device's INTx.
    #[error("GSI {gsi} is not usable for INTx: {reason}")]
    BadGsi {
        /// The GSI.
        gsi: u32,
        /// Why.
        reason: &'static str,
    },
    /// A file descriptor handed in is not what it must be.
    #[error("{what} is not an eventfd")]
    NotAnEventFd {
        /// Which descriptor.
        what: &'static str,
    },
    /// The requested path is not possible here.
    #[error("the kernel-bypass path was requested but is not possible: {0}")]
    FastPathUnavailable(FallbackReason),
    /// The guest did something the test VM does not expect.
    #[error("unexpected VM exit: {0}")]
    UnexpectedExit(String),
}

impl KvmError {
    fn ioctl(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
        move |e| KvmError::Ioctl {
            op,
            source: io::Error::from_raw_os_error(e.errno()),
        }
    }
}

/// The interrupt controller a VM was created with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Irqchip {
    /// PIC, IOAPIC and LAPIC in the kernel (`KVM_CREATE_IRQCHIP`).
    Full,
    /// Only the LAPIC in the kernel; PIC/IOAPIC in user space
    /// (`KVM_CAP_SPLIT_IRQCHIP`).
    Split,
    /// No in-kernel irqchip.
    None,
}

/// What this KVM supports for INTx delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvmCaps {
    /// `KVM_CAP_IRQCHIP`.
    pub irqchip: bool,
    /// `KVM_CAP_IRQFD`.
    pub irqfd: bool,
    /// `KVM_CAP_IRQFD_RESAMPLE`.
    pub irqfd_resample: bool,
    /// `KVM_CAP_SPLIT_IRQCHIP`.
    pub split_irqchip: bool,
}

impl KvmCaps {
    /// Asks KVM.
    pub fn probe(kvm: &Kvm) -> Self {
        Self {
            irqchip: kvm.check_extension(Cap::Irqchip),
            irqfd: kvm.check_extension(Cap::Irqfd),
            irqfd_resample: kvm.check_extension(Cap::IrqfdResample),
            split_irqchip: kvm.check_extension(Cap::SplitIrqchip),
        }
    }
}

/// Which EOI path to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PathPolicy {
    /// The kernel bypass when possible, the user-space path otherwise.
    #[default]
    Auto,
    /// The kernel bypass or an error.
    Fast,
    /// Always the user-space path.
    UserSpace,
}

/// The EOI path in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// KVM resample eventfd straight into the backend's unmask eventfd.
    KernelBypass,
    /// The engine services host interrupts and EOIs.
    UserSpace,
}

/// Why the kernel bypass is not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FallbackReason {
    /// The configuration asked for the user-space path.
    Configured,
    /// KVM lacks irqfd or resample irqfd support.
    NoResampleIrqfd,
    /// The VM has a split irqchip: KVM rejects resample irqfds there.
    SplitIrqchip,
    /// The VM has no in-kernel irqchip.
    NoIrqchip,
    /// The backend cannot take an unmask eventfd (uio_pci_generic, the
    /// simulated device).
    BackendHasNoUnmaskEventfd,
}

impl fmt::Display for FallbackReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FallbackReason::Configured => "the configuration selects the user-space path",
            FallbackReason::NoResampleIrqfd => "KVM does not support resample irqfds",
            FallbackReason::SplitIrqchip => {
                "the VM has a split irqchip, where KVM rejects resample irqfds"
            }
            FallbackReason::NoIrqchip => "the VM has no in-kernel irqchip",
            FallbackReason::BackendHasNoUnmaskEventfd => "the backend has no kernel unmask eventfd",
        })
    }
}

/// The path chosen and, for the user-space path, why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathChoice {
    /// The path.
    pub path: Path,
    /// Why the bypass is not used (`None` on the bypass).
    pub fallback: Option<FallbackReason>,
}

impl fmt::Display for PathChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.fallback {
            None => f.write_str("kernel bypass (KVM resample eventfd -> kernel check-and-unmask)"),
            Some(reason) => write!(f, "user-space EOI path: {reason}"),
        }
    }
}

/// Chooses the EOI path from the policy, KVM's capabilities, the VM's
/// irqchip and what the backend can do (its kernel unmask eventfd:
/// [`Capabilities::bypass_capable`]).
pub fn choose_path(
    policy: PathPolicy,
    caps: KvmCaps,
    irqchip: Irqchip,
    backend: Capabilities,
) -> Result<PathChoice, KvmError> {
    let obstacle = if policy == PathPolicy::UserSpace {
        Some(FallbackReason::Configured)
    } else if irqchip == Irqchip::Split {
        Some(FallbackReason::SplitIrqchip)
    } else if irqchip == Irqchip::None {
        Some(FallbackReason::NoIrqchip)
    } else if !caps.irqfd || !caps.irqfd_resample {
        Some(FallbackReason::NoResampleIrqfd)
    } else if !backend.bypass_capable() {
        Some(FallbackReason::BackendHasNoUnmaskEventfd)
    } else {
        None
    };
    match (policy, obstacle) {
        (PathPolicy::Fast, Some(reason)) => Err(KvmError::FastPathUnavailable(reason)),
        (_, None) => {
            info!("INTx EOI path: kernel bypass");
            Ok(PathChoice {
                path: Path::KernelBypass,
                fallback: None,
            })
        }
        (_, Some(reason)) => {
            if reason == FallbackReason::Configured {
                info!(%reason, "INTx EOI path: user space");
            } else {
                warn!(%reason, "INTx EOI path: user space (kernel bypass not possible)");
            }
            Ok(PathChoice {
                path: Path::UserSpace,
                fallback: Some(reason),
            })
        }
    }
}

/// GSIs that KVM's default routing connects (PIC 0-15, IOAPIC 0-23). KVM
/// accepts an irqfd on any GSI and silently drops what is not routed, so
/// the wiring checks the GSI itself.
pub const DEFAULT_ROUTED_GSIS: u32 = 24;

/// PIC lines that cannot be level-triggered (ELCR): the timer, keyboard,
/// cascade, RTC and FPU lines.
pub const PIC_EDGE_ONLY_LINES: [u32; 5] = [0, 1, 2, 8, 13];

/// Checks that `gsi` is routed by KVM's default routing and can carry a
/// level-triggered INTx.
pub fn validate_gsi(gsi: u32) -> Result<(), KvmError> {
    if gsi >= DEFAULT_ROUTED_GSIS {
        return Err(KvmError::BadGsi {
            gsi,
            reason: "not routed by the default GSI routing (0-23)",
        });
    }
    if PIC_EDGE_ONLY_LINES.contains(&gsi) {
        return Err(KvmError::BadGsi {
            gsi,
            reason: "the PIC cannot make this line level-triggered",
        });
    }
    Ok(())
}

/// Checks that a descriptor handed over (e.g. by another process) is an
/// eventfd, by its /proc link.
pub fn validate_eventfd(fd: &impl AsRawFd, what: &'static str) -> Result<(), KvmError> {
    let link =
        std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).map_err(|source| {
            KvmError::Ioctl {
                op: "reading the descriptor's /proc link",
                source,
            }
        })?;
    if link.to_string_lossy() == "anon_inode:[eventfd]" {
        Ok(())
    } else {
        Err(KvmError::NotAnEventFd { what })
    }
}

/// A KVM irqfd with a resample eventfd, registered for one GSI; unregistered
/// on drop.
pub struct ResampleIrqfd {
    vm: Arc<VmFd>,
    gsi: u32,
    trigger: EventFd,
    resample: EventFd,
}

impl fmt::Debug for ResampleIrqfd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResampleIrqfd")
            .field("gsi", &self.gsi)
            .finish_non_exhaustive()
    }
}

impl ResampleIrqfd {
    /// Creates the two eventfds and registers them (`KVM_IRQFD` with
    /// `KVM_IRQFD_FLAG_RESAMPLE`). Fails cleanly, with nothing registered,
    /// on a GSI outside the default routing, a split irqchip (EINVAL) or a
    /// trigger registered twice (EBUSY).
    pub fn register(vm: Arc<VmFd>, gsi: u32) -> Result<Self, KvmError> {
        let new = || {
            EventFd::new(EFD_NONBLOCK).map_err(|source| KvmError::Ioctl {
                op: "eventfd",
                source,
            })
        };
        Self::register_fds(vm, gsi, new()?, new()?)
    }

    /// Registers eventfds the VMM already has (e.g. handed over a socket):
    /// both are checked to be eventfds, the GSI to be routed. KVM answers
    /// EBUSY for a trigger that is already registered.
    pub fn register_fds(
        vm: Arc<VmFd>,
        gsi: u32,
        trigger: EventFd,
        resample: EventFd,
    ) -> Result<Self, KvmError> {
        validate_gsi(gsi)?;
        validate_eventfd(&trigger, "the irqfd trigger")?;
        validate_eventfd(&resample, "the resample eventfd")?;
        vm.register_irqfd_with_resample(&trigger, &resample, gsi)
            .map_err(KvmError::ioctl("KVM_IRQFD with resample"))?;
        Ok(Self {
            vm,
            gsi,
            trigger,
            resample,
        })
    }

    /// The GSI.
    pub fn gsi(&self) -> u32 {
        self.gsi
    }

    /// The irqfd: signalling it asserts the guest's line.
    pub fn trigger(&self) -> &EventFd {
        &self.trigger
    }

    /// KVM signals this at the guest's EOI of the line (and deasserts it).
    pub fn resample(&self) -> &EventFd {
        &self.resample
    }
}

impl Drop for ResampleIrqfd {
    fn drop(&mut self) {
        if let Err(e) = self.vm.unregister_irqfd(&self.trigger, self.gsi) {
            warn!(gsi = self.gsi, error = %e, "unregistering the irqfd failed");
        }
    }
}
