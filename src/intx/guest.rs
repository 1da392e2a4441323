//! The guest's view of COMMAND.INTX_DISABLE, kept apart from the host mask.

use crate::pci::regs::{COMMAND_INTX_DISABLE, PCI_COMMAND};
use crate::pci::{covers, Width};

/// Config-space byte that holds COMMAND.INTX_DISABLE.
const INTX_DISABLE_BYTE: u16 = PCI_COMMAND + 1;
/// Bit of INTX_DISABLE within that byte.
const INTX_DISABLE_BIT_IN_BYTE: u32 = COMMAND_INTX_DISABLE.trailing_zeros() - 8;

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

    /// The mask of INTX_DISABLE within the value of an access, if the access
    /// covers it.
    fn intx_disable_mask(offset: u16, width: Width) -> Option<u32> {
        covers(offset, width, INTX_DISABLE_BYTE)
            .then(|| 1 << (u32::from(INTX_DISABLE_BYTE - offset) * 8 + INTX_DISABLE_BIT_IN_BYTE))
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

    /// A write value with INTX_DISABLE (if covered) set to `intx_disable`.
    pub(crate) fn with_intx_disable(
        offset: u16,
        width: Width,
        value: u32,
        intx_disable: bool,
    ) -> u32 {
        match Self::intx_disable_mask(offset, width) {
            Some(mask) if intx_disable => value | mask,
            Some(mask) => value & !mask,
            None => value,
        }
    }

    /// A read value as the guest must see it: INTX_DISABLE (if covered) is
    /// the guest's own bit.
    pub(crate) fn present(&self, offset: u16, width: Width, value: u32) -> u32 {
        Self::with_intx_disable(offset, width, value, self.intx_disabled())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intx_disable_is_found_at_every_width() {
        assert_eq!(
            GuestCommand::intx_disable_mask(4, Width::Dword),
            Some(1 << 10)
        );
        assert_eq!(
            GuestCommand::intx_disable_mask(4, Width::Word),
            Some(1 << 10)
        );
        assert_eq!(
            GuestCommand::intx_disable_mask(5, Width::Byte),
            Some(1 << 2)
        );
        assert_eq!(GuestCommand::intx_disable_mask(4, Width::Byte), None);
        assert_eq!(GuestCommand::intx_disable_mask(6, Width::Word), None);
        assert_eq!(GuestCommand::intx_disable_mask(0, Width::Dword), None);
    }

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
