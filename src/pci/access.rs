//! Config-space access widths and the checks every backend applies first.

use std::fmt;

/// Width of one configuration-space access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Width {
    /// One byte.
    Byte,
    /// Two bytes, 2-aligned.
    Word,
    /// Four bytes, 4-aligned.
    Dword,
}

impl Width {
    /// Number of bytes accessed.
    pub const fn bytes(self) -> u16 {
        match self {
            Width::Byte => 1,
            Width::Word => 2,
            Width::Dword => 4,
        }
    }

    /// The width of an access of `len` bytes, if `len` is 1, 2 or 4.
    pub const fn from_len(len: usize) -> Option<Self> {
        match len {
            1 => Some(Width::Byte),
            2 => Some(Width::Word),
            4 => Some(Width::Dword),
            _ => None,
        }
    }

    /// Mask of the value bits an access of this width carries.
    pub const fn value_mask(self) -> u32 {
        match self {
            Width::Byte => 0xff,
            Width::Word => 0xffff,
            Width::Dword => 0xffff_ffff,
        }
    }

    /// The all-ones value a device that does not answer returns.
    pub const fn all_ones(self) -> u32 {
        self.value_mask()
    }
}

impl fmt::Display for Width {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-byte", self.bytes())
    }
}

/// Why an access is refused before it reaches the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AccessError {
    /// The offset is not a multiple of the width.
    #[error("{width} access at offset {offset:#x} is misaligned")]
    Misaligned {
        /// Offset of the refused access.
        offset: u16,
        /// Width of the refused access.
        width: Width,
    },
    /// The access reaches past the end of configuration space.
    #[error("{width} access at offset {offset:#x} is outside the {size:#x}-byte config space")]
    OutOfRange {
        /// Offset of the refused access.
        offset: u16,
        /// Width of the refused access.
        width: Width,
        /// Size of the config space.
        size: u16,
    },
    /// The value has bits above the access width.
    #[error("value {value:#x} does not fit a {width} write at offset {offset:#x}")]
    ValueTooWide {
        /// Offset of the refused access.
        offset: u16,
        /// Width of the refused access.
        width: Width,
        /// The value that does not fit.
        value: u32,
    },
}

/// Checks alignment and bounds of an access to a config space of `size`
/// bytes. Backends call this before touching the device.
pub fn check_access(offset: u16, width: Width, size: u16) -> Result<(), AccessError> {
    if offset % width.bytes() != 0 {
        return Err(AccessError::Misaligned { offset, width });
    }
    if u32::from(offset) + u32::from(width.bytes()) > u32::from(size) {
        return Err(AccessError::OutOfRange {
            offset,
            width,
            size,
        });
    }
    Ok(())
}

/// [`check_access`] for writes, which also refuses values wider than the access.
pub fn check_write(offset: u16, width: Width, size: u16, value: u32) -> Result<(), AccessError> {
    check_access(offset, width, size)?;
    if value & !width.value_mask() != 0 {
        return Err(AccessError::ValueTooWide {
            offset,
            width,
            value,
        });
    }
    Ok(())
}

/// Whether the access `[offset, offset + width)` covers byte `byte`.
pub const fn covers(offset: u16, width: Width, byte: u16) -> bool {
    offset <= byte && byte < offset + width.bytes()
}

/// Where COMMAND.INTX_DISABLE sits in the value of an access at `offset`
/// of `width`: its mask, if the access covers it.
pub fn intx_disable_mask(offset: u16, width: Width) -> Option<u32> {
    use crate::pci::regs::{COMMAND_INTX_DISABLE, PCI_COMMAND};
    // Bit 10 of COMMAND: byte PCI_COMMAND + 1, bit 2.
    let byte = PCI_COMMAND + 1;
    let bit_in_byte = COMMAND_INTX_DISABLE.trailing_zeros() - 8;
    covers(offset, width, byte).then(|| 1 << (u32::from(byte - offset) * 8 + bit_in_byte))
}

/// `value` with COMMAND.INTX_DISABLE (if the access covers it) set to
/// `disable`.
pub fn with_intx_disable(offset: u16, width: Width, value: u32, disable: bool) -> u32 {
    match intx_disable_mask(offset, width) {
        Some(mask) if disable => value | mask,
        Some(mask) => value & !mask,
        None => value,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn misaligned_and_out_of_range_accesses_are_refused() {
        assert_eq!(
            check_access(0x05, Width::Word, 0x100),
            Err(AccessError::Misaligned {
                offset: 5,
                width: Width::Word
            })
        );
        assert!(check_access(0x06, Width::Dword, 0x100).is_err());
        assert!(check_access(0xfc, Width::Dword, 0x100).is_ok());
        assert!(check_access(0x100, Width::Byte, 0x100).is_err());
        assert!(check_access(0xfffe, Width::Word, 0x1000).is_err());
        assert!(check_write(0x04, Width::Word, 0x100, 0x1_0000).is_err());
        assert!(check_write(0x04, Width::Word, 0x100, 0xffff).is_ok());
    }

    #[test]
    fn intx_disable_is_found_at_every_width() {
        assert_eq!(intx_disable_mask(4, Width::Dword), Some(1 << 10));
        assert_eq!(intx_disable_mask(4, Width::Word), Some(1 << 10));
        assert_eq!(intx_disable_mask(5, Width::Byte), Some(1 << 2));
        assert_eq!(intx_disable_mask(4, Width::Byte), None);
        assert_eq!(intx_disable_mask(6, Width::Word), None);
        assert_eq!(intx_disable_mask(0, Width::Dword), None);
        assert_eq!(with_intx_disable(5, Width::Byte, 0xff, false), 0xfb);
    }

    #[test]
    fn coverage_of_a_byte() {
        assert!(covers(0x04, Width::Dword, 0x05));
        assert!(covers(0x04, Width::Word, 0x05));
        assert!(!covers(0x04, Width::Byte, 0x05));
        assert!(covers(0x05, Width::Byte, 0x05));
        assert!(!covers(0x06, Width::Word, 0x05));
    }
}
