//! The guest's view of COMMAND.INTX_DISABLE, kept apart from the host mask.

use crate::pci::regs::{COMMAND_INTX_DISABLE, PCI_COMMAND};
use crate::pci::{covers, with_intx_disable, Width};

/// COMMAND as the guest last wrote it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct GuestCommand(u16);

impl GuestCommand {
    pub(crate) fn new(command: u16) -> Self {
        Self(command)
    }

    pub(crate) fn value(&self) -> u16 {
        self.0
    }

    /// Whether the guest has set its own INTX_DISABLE.
    pub(crate) fn intx_disabled(&self) -> bool {
        self.0 & COMMAND_INTX_DISABLE != 0
    }

    /// The guest's COMMAND with INTX_DISABLE replaced by `intx_disable`.
    pub(crate) fn merged(&self, intx_disable: bool) -> u16 {
        if intx_disable {
            self.0 | COMMAND_INTX_DISABLE
        } else {
            self.0 & !COMMAND_INTX_DISABLE
        }
    }

    /// Records the COMMAND bytes a guest write covers.
    pub(crate) fn record(&mut self, offset: u16, width: Width, value: u32) {
        for byte in [PCI_COMMAND, PCI_COMMAND + 1] {
            if covers(offset, width, byte) {
                let shift_in_value = u32::from(byte - offset) * 8;
                let shift_in_command = u32::from(byte - PCI_COMMAND) * 8;
                let b = (value >> shift_in_value) & 0xff;
                // `b` is one byte and the shift is 0 or 8: it fits 16 bits.
                let b = (b << shift_in_command) as u16;
                self.0 = (self.0 & !(0xff << shift_in_command)) | b;
            }
        }
    }

    /// A read value as the guest must see it: INTX_DISABLE (if covered) is
    /// the guest's own bit.
    pub(crate) fn present(&self, offset: u16, width: Width, value: u32) -> u32 {
        with_intx_disable(offset, width, value, self.intx_disabled())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_writes_update_only_their_byte() {
        let mut g = GuestCommand::new(0x0107);
        g.record(5, Width::Byte, 0x04);
        assert_eq!(g.value(), 0x0407);
        assert!(g.intx_disabled());
        g.record(4, Width::Byte, 0x02);
        assert_eq!(g.value(), 0x0402);
        g.record(4, Width::Dword, 0xffff_0006);
        assert_eq!(g.value(), 0x0006);
        g.record(8, Width::Dword, 0xffff_ffff);
        assert_eq!(g.value(), 0x0006);
    }
}
