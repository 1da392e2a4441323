//! Guest-initiated function-level resets: where a device's FLR bits are,
//! and which bits of a guest config write initiate one.
//!
//! A guest FLR never reaches the device as a bit: the engine strips it and
//! runs its own reset protocol instead (gate blocked, save, reset, restore,
//! settle). Two registers initiate an FLR, as in the kernel's `pcie_flr` and
//! `pci_af_flr` (drivers/pci/pci.c): PCI Express Device Control's "Initiate
//! FLR", where Device Capabilities advertise FLR, and Advanced Features
//! Control's "Initiate FLR" on conventional PCI devices, where AF
//! Capabilities advertise both FLR and Transactions Pending (the kernel
//! refuses an AF FLR without TP).

use crate::backend::{BackendError, ConfigSpace};
use crate::pci::intx::CommandStatus;
use crate::pci::regs::{
    PCI_AF_CAP, PCI_AF_CAP_FLR, PCI_AF_CAP_TP, PCI_AF_CTRL, PCI_AF_CTRL_FLR, PCI_CAPABILITY_LIST,
    PCI_CAP_ID_AF, PCI_CAP_ID_EXP, PCI_CAP_LIST_NEXT, PCI_CAP_POINTER_MASK, PCI_EXP_DEVCAP,
    PCI_EXP_DEVCAP_FLR, PCI_EXP_DEVCTL, PCI_EXP_DEVCTL_BCR_FLR, PCI_FIND_CAP_TTL,
    PCI_STD_HEADER_SIZEOF, STATUS_CAP_LIST,
};
use crate::pci::{covers, Width};

/// The registers through which a guest can initiate an FLR of the device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct FlrRegisters {
    /// Offset of PCIe Device Control, when the device advertises FLR.
    devctl: Option<u16>,
    /// Offset of Advanced Features Control, when the device advertises FLR
    /// and Transactions Pending there.
    af_ctrl: Option<u16>,
}

impl FlrRegisters {
    /// Walks the capability list for the FLR-capable registers.
    pub(super) fn find<B: ConfigSpace + ?Sized>(
        dev: &mut B,
        cs: CommandStatus,
    ) -> Result<Self, BackendError> {
        let mut found = Self::default();
        if cs.status & STATUS_CAP_LIST == 0 {
            return Ok(found);
        }
        let mut next = dev.config_read(PCI_CAPABILITY_LIST, Width::Byte)? & PCI_CAP_POINTER_MASK;
        for _ in 0..PCI_FIND_CAP_TTL {
            if next < u32::from(PCI_STD_HEADER_SIZEOF) {
                break;
            }
            // `next` is a byte value, so the offset fits config space.
            let cap = next as u16;
            let id = dev.config_read(cap, Width::Byte)?;
            if id == u32::from(PCI_CAP_ID_EXP) && found.devctl.is_none() {
                let devcap = dev.config_read(cap + PCI_EXP_DEVCAP, Width::Dword)?;
                if devcap & PCI_EXP_DEVCAP_FLR != 0 {
                    found.devctl = Some(cap + PCI_EXP_DEVCTL);
                }
            } else if id == u32::from(PCI_CAP_ID_AF) && found.af_ctrl.is_none() {
                let af_cap = dev.config_read(cap + PCI_AF_CAP, Width::Byte)?;
                let needed = u32::from(PCI_AF_CAP_TP | PCI_AF_CAP_FLR);
                if af_cap & needed == needed {
                    found.af_ctrl = Some(cap + PCI_AF_CTRL);
                }
            }
            next = dev.config_read(cap + PCI_CAP_LIST_NEXT, Width::Byte)? & PCI_CAP_POINTER_MASK;
        }
        Ok(found)
    }

    /// The FLR-initiating bits set in a write of `value` (`width` bytes at
    /// `offset`), as a mask of that value; 0 when the write initiates none.
    pub(super) fn initiated_by(&self, offset: u16, width: Width, value: u32) -> u32 {
        let devctl = self.devctl.map_or(0, |devctl| {
            // The FLR bit is in Device Control's high byte.
            let bit = u32::from(PCI_EXP_DEVCTL_BCR_FLR >> 8);
            bit_mask(devctl + 1, bit, offset, width)
        });
        let af = self.af_ctrl.map_or(0, |af_ctrl| {
            bit_mask(af_ctrl, u32::from(PCI_AF_CTRL_FLR), offset, width)
        });
        value & (devctl | af)
    }
}

/// The mask of bit `bit` of config byte `byte` within an access of `width`
/// at `offset`, or 0 if the access does not cover that byte.
fn bit_mask(byte: u16, bit: u32, offset: u16, width: Width) -> u32 {
    if covers(offset, width, byte) {
        bit << (u32::from(byte - offset) * 8)
    } else {
        0
    }
}
