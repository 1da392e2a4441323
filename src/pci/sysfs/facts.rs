//! What sysfs reports about a device, as values: IDs, driver, IOMMU group
//! members and VFIO viability, the IRQ line, and the INTx masking verdict
//! with the evidence that decided it; plus the driver rules they follow.

use std::fmt;

use crate::pci::intx::{MaskingQuirk, MaskingReason};
use crate::pci::Bdf;

use super::{PCIEPORT, PCI_STUB, UIO_PCI_GENERIC, VFIO_PCI};

/// "no driver" or the driver's name, for messages.
pub(super) fn driver_name(driver: &Option<String>) -> &str {
    driver.as_deref().unwrap_or("no driver")
}

/// What a driver is known to refuse devices for, for [`SysfsError::Refused`].
pub(super) fn refusal_reason(driver: &str) -> &'static str {
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
