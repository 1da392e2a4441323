//! PCI 2.3 INTx masking primitives with the kernel's exact semantics
//! (`pci_check_and_set_intx_mask` and `pci_intx_mask_broken` in the Linux
//! PCI core), over any [`ConfigSpace`].
//!
//! These are for backends whose COMMAND.INTX_DISABLE is the physical mask
//! (uio_pci_generic, the simulated device). The caller must hold the config
//! gate, which plays the role of the kernel's `pci_lock`: the read and the
//! write below are not atomic on their own.

use std::fmt;

use crate::pci::config::{BackendError, ConfigSpace};
use crate::pci::regs::{
    COMMAND_INTX_DISABLE, PCI_COMMAND, PCI_DEVICE_ID, PCI_INTERRUPT_PIN, PCI_VENDOR_ID,
    STATUS_CAP_LIST, STATUS_INTERRUPT,
};
use crate::pci::Width;

/// COMMAND and STATUS as read together by one 32-bit access at 0x04.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandStatus {
    /// PCI_COMMAND.
    pub command: u16,
    /// PCI_STATUS.
    pub status: u16,
}

impl CommandStatus {
    /// Whether STATUS.INTERRUPT is set: the device asserts INTx.
    pub fn asserting(&self) -> bool {
        self.status & STATUS_INTERRUPT != 0
    }
    /// Whether COMMAND.INTX_DISABLE is set.
    pub fn masked(&self) -> bool {
        self.command & COMMAND_INTX_DISABLE != 0
    }
}

/// Reads COMMAND and STATUS with a single 32-bit access, refusing the
/// all-ones answer of a device that is in reset, wedged or gone. STATUS
/// tells (its bits 0-2 are reserved zero, so it never reads all-ones from a
/// device that answers); COMMAND may not, as vfio-pci shows its own virtual
/// bits there (INTX_DISABLE among them), nor STATUS.CAP_LIST, which vfio-pci
/// virtualizes too.
pub fn read_command_status<B: ConfigSpace + ?Sized>(
    dev: &mut B,
) -> Result<CommandStatus, BackendError> {
    let dword = dev.config_read(PCI_COMMAND, Width::Dword)?;
    if (dword >> 16) | u32::from(STATUS_CAP_LIST) == u32::from(u16::MAX) {
        return Err(BackendError::NotResponding);
    }
    // Truncation is the point: the low half is COMMAND, the high half STATUS.
    Ok(CommandStatus {
        command: (dword & 0xffff) as u16,
        status: (dword >> 16) as u16,
    })
}

/// `pci_check_and_set_intx_mask`: one 32-bit read of COMMAND+STATUS; if the
/// device's INTx state differs from `mask`, changes nothing and returns
/// `false`; otherwise sets (`mask`) or clears (`!mask`) INTX_DISABLE with one
/// 16-bit COMMAND write, skipped when the bit already has that value, and
/// returns `true`.
///
/// - `mask = true` (check-and-mask): `false` means "not mine" on a shared line.
/// - `mask = false` (check-and-unmask): `false` means the device still
///   asserts and stays masked.
pub fn check_and_set_intx_mask<B: ConfigSpace + ?Sized>(
    dev: &mut B,
    mask: bool,
) -> Result<bool, BackendError> {
    let cs = read_command_status(dev)?;
    if cs.asserting() != mask {
        return Ok(false);
    }
    if cs.masked() != mask {
        let command = if mask {
            cs.command | COMMAND_INTX_DISABLE
        } else {
            cs.command & !COMMAND_INTX_DISABLE
        };
        dev.config_write(PCI_COMMAND, Width::Word, u32::from(command))?;
    }
    Ok(true)
}

/// `pci_check_and_mask_intx`.
pub fn check_and_mask<B: ConfigSpace + ?Sized>(dev: &mut B) -> Result<bool, BackendError> {
    check_and_set_intx_mask(dev, true)
}

/// `pci_check_and_unmask_intx`.
pub fn check_and_unmask<B: ConfigSpace + ?Sized>(dev: &mut B) -> Result<bool, BackendError> {
    check_and_set_intx_mask(dev, false)
}

/// Sets or clears COMMAND.INTX_DISABLE unconditionally (`pci_intx`).
pub fn set_intx_disable<B: ConfigSpace + ?Sized>(
    dev: &mut B,
    disable: bool,
) -> Result<(), BackendError> {
    let command = read_command_status(dev)?.command;
    let new = if disable {
        command | COMMAND_INTX_DISABLE
    } else {
        command & !COMMAND_INTX_DISABLE
    };
    if new != command {
        dev.config_write(PCI_COMMAND, Width::Word, u32::from(new))?;
    }
    Ok(())
}

/// A device whose INTx masking the kernel's quirk table marks as broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaskingQuirk {
    /// PCI vendor ID.
    pub vendor: u16,
    /// PCI device ID.
    pub device: u16,
    /// What the device is.
    pub name: &'static str,
}

/// The kernel's `quirk_broken_intx_masking` table (drivers/pci/quirks.c).
/// Mellanox ConnectX devices whose quirk depends on the firmware version are
/// left out: only the toggle test can judge them from user space.
#[rustfmt::skip]
pub const BROKEN_MASKING_QUIRKS: &[MaskingQuirk] = &[
    MaskingQuirk { vendor: 0x1425, device: 0x0030, name: "Chelsio T3" },
    MaskingQuirk { vendor: 0x1814, device: 0x0601, name: "Ralink RT2800 802.11n PCI" },
    MaskingQuirk { vendor: 0x1b7c, device: 0x0004, name: "Ceton InfiniTV4" },
    MaskingQuirk { vendor: 0x1102, device: 0x000b, name: "Creative EMU20k2" },
    MaskingQuirk { vendor: 0x10ec, device: 0x8169, name: "Realtek RTL8169" },
    MaskingQuirk { vendor: 0x8086, device: 0x1572, name: "Intel X710 (i40e)" },
    MaskingQuirk { vendor: 0x8086, device: 0x1574, name: "Intel XL710 (i40e)" },
    MaskingQuirk { vendor: 0x8086, device: 0x1580, name: "Intel XL710 (i40e)" },
    MaskingQuirk { vendor: 0x8086, device: 0x1581, name: "Intel X710 (i40e)" },
    MaskingQuirk { vendor: 0x8086, device: 0x1583, name: "Intel XL710 (i40e)" },
    MaskingQuirk { vendor: 0x8086, device: 0x1584, name: "Intel XL710 (i40e)" },
    MaskingQuirk { vendor: 0x8086, device: 0x1585, name: "Intel XL710 (i40e)" },
    MaskingQuirk { vendor: 0x8086, device: 0x1586, name: "Intel X710 (i40e)" },
    MaskingQuirk { vendor: 0x8086, device: 0x1587, name: "Intel XL710 (i40e)" },
    MaskingQuirk { vendor: 0x8086, device: 0x1588, name: "Intel XL710 (i40e)" },
    MaskingQuirk { vendor: 0x8086, device: 0x1589, name: "Intel X710 (i40e)" },
    MaskingQuirk { vendor: 0x8086, device: 0x158a, name: "Intel XXV710 (i40e)" },
    MaskingQuirk { vendor: 0x8086, device: 0x158b, name: "Intel XXV710 (i40e)" },
    MaskingQuirk { vendor: 0x8086, device: 0x37d0, name: "Intel X722 (i40e)" },
    MaskingQuirk { vendor: 0x8086, device: 0x37d1, name: "Intel X722 (i40e)" },
    MaskingQuirk { vendor: 0x8086, device: 0x37d2, name: "Intel X722 (i40e)" },
];

/// Looks a device up in [`BROKEN_MASKING_QUIRKS`].
pub fn masking_quirk(vendor: u16, device: u16) -> Option<&'static MaskingQuirk> {
    BROKEN_MASKING_QUIRKS
        .iter()
        .find(|q| q.vendor == vendor && q.device == device)
}

/// Why INTx masking is or is not usable on a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskingReason {
    /// INTX_DISABLE toggled and read back as written.
    ToggleWorks,
    /// INTX_DISABLE did not read back as written (`pci_intx_mask_broken`).
    BitDoesNotStick {
        /// COMMAND as found.
        original: u16,
        /// The value written.
        written: u16,
        /// The value read back.
        read_back: u16,
    },
    /// The kernel's quirk table lists the device.
    Quirk(&'static MaskingQuirk),
    /// INTERRUPT_PIN is 0: the device has no INTx at all.
    NoInterruptPin,
}

/// The masking probe's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaskingSupport {
    /// Vendor ID read from the device.
    pub vendor: u16,
    /// Device ID read from the device.
    pub device: u16,
    /// INTERRUPT_PIN (1..=4 = INTA#..INTD#, 0 = none).
    pub pin: u8,
    /// Why masking is (not) usable.
    pub reason: MaskingReason,
}

impl MaskingSupport {
    /// Whether PCI 2.3 INTx masking works, which is what makes sharing the
    /// host IRQ line safe (`IRQF_SHARED`); otherwise the line must be exclusive.
    pub fn supported(&self) -> bool {
        matches!(self.reason, MaskingReason::ToggleWorks)
    }
}

impl fmt::Display for MaskingSupport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.reason {
            MaskingReason::ToggleWorks => write!(
                f,
                "PCI 2.3 INTx masking works (INTX_DISABLE toggles): the host line can be shared"
            ),
            MaskingReason::BitDoesNotStick {
                original,
                written,
                read_back,
            } => write!(
                f,
                "INTx masking is broken: COMMAND {original:#06x} written as {written:#06x} read back \
                 {read_back:#06x}; the host line must be exclusive"
            ),
            MaskingReason::Quirk(q) => write!(
                f,
                "INTx masking is broken on {} ({:04x}:{:04x}, kernel quirk table); the host line \
                 must be exclusive",
                q.name, q.vendor, q.device
            ),
            MaskingReason::NoInterruptPin => write!(f, "the device has no INTx pin"),
        }
    }
}

/// Reads a 16-bit register, refusing all-ones.
fn read_word<B: ConfigSpace + ?Sized>(dev: &mut B, offset: u16) -> Result<u16, BackendError> {
    let v = dev.config_read(offset, Width::Word)?;
    if v == Width::Word.all_ones() {
        return Err(BackendError::NotResponding);
    }
    // A word access returns at most 16 bits.
    Ok((v & 0xffff) as u16)
}

/// Probes whether PCI 2.3 INTx masking works, like the kernel does at
/// enumeration: flips INTX_DISABLE, reads it back and restores COMMAND
/// exactly as found, also when an access fails. Also consults the quirk
/// table, which wins over a passing toggle test.
///
/// Use it on a device no driver is servicing: while the bit is flipped the
/// device's INTx is (un)masked behind its driver's back.
pub fn probe_masking<B: ConfigSpace + ?Sized>(dev: &mut B) -> Result<MaskingSupport, BackendError> {
    let vendor = read_word(dev, PCI_VENDOR_ID)?;
    let device = read_word(dev, PCI_DEVICE_ID)?;
    let pin = (dev.config_read(PCI_INTERRUPT_PIN, Width::Byte)? & 0xff) as u8;
    let mut support = MaskingSupport {
        vendor,
        device,
        pin,
        reason: MaskingReason::NoInterruptPin,
    };
    if pin == 0 {
        return Ok(support);
    }
    if let Some(quirk) = masking_quirk(vendor, device) {
        support.reason = MaskingReason::Quirk(quirk);
        return Ok(support);
    }

    let original = read_word(dev, PCI_COMMAND)?;
    let written = original ^ COMMAND_INTX_DISABLE;
    let toggled = dev
        .config_write(PCI_COMMAND, Width::Word, u32::from(written))
        .and_then(|()| dev.config_read(PCI_COMMAND, Width::Word));
    // Restore whatever happened above; the first error wins.
    let restored = dev.config_write(PCI_COMMAND, Width::Word, u32::from(original));
    let read_back = (toggled? & 0xffff) as u16;
    restored?;

    support.reason = if read_back == written {
        MaskingReason::ToggleWorks
    } else {
        MaskingReason::BitDoesNotStick {
            original,
            written,
            read_back,
        }
    };
    Ok(support)
}
