//! Named PCI configuration-space registers and bits.
//!
//! Every offset and bit the crate uses is defined here once; logic elsewhere
//! never spells a raw number. Names follow `include/uapi/linux/pci_regs.h`.

/// Vendor ID (16 bits).
pub const PCI_VENDOR_ID: u16 = 0x00;
/// Device ID (16 bits).
pub const PCI_DEVICE_ID: u16 = 0x02;
/// Command register (16 bits).
pub const PCI_COMMAND: u16 = 0x04;
/// Status register (16 bits).
pub const PCI_STATUS: u16 = 0x06;
/// Revision ID (8 bits).
pub const PCI_REVISION_ID: u16 = 0x08;
/// Class code, 24 bits starting at the programming interface byte.
pub const PCI_CLASS_PROG: u16 = 0x09;
/// Cache line size (8 bits).
pub const PCI_CACHE_LINE_SIZE: u16 = 0x0c;
/// Latency timer (8 bits).
pub const PCI_LATENCY_TIMER: u16 = 0x0d;
/// Header type (8 bits).
pub const PCI_HEADER_TYPE: u16 = 0x0e;
/// First base address register (32 bits); six follow, 4 bytes apart.
pub const PCI_BASE_ADDRESS_0: u16 = 0x10;
/// Number of base address registers in a type 0 header.
pub const PCI_NUM_BARS: u16 = 6;
/// Subsystem vendor ID (16 bits).
pub const PCI_SUBSYSTEM_VENDOR_ID: u16 = 0x2c;
/// Subsystem ID (16 bits).
pub const PCI_SUBSYSTEM_ID: u16 = 0x2e;
/// Expansion ROM base address (32 bits).
pub const PCI_ROM_ADDRESS: u16 = 0x30;
/// Offset of the first capability (8 bits), valid when `STATUS_CAP_LIST` is set.
pub const PCI_CAPABILITY_LIST: u16 = 0x34;
/// Interrupt line (8 bits): the host's routing note, not used by the device.
pub const PCI_INTERRUPT_LINE: u16 = 0x3c;
/// Interrupt pin (8 bits): 0 = no INTx, 1..=4 = INTA#..INTD#.
pub const PCI_INTERRUPT_PIN: u16 = 0x3d;

/// Size of conventional PCI configuration space.
pub const PCI_CFG_SPACE_SIZE: u16 = 0x100;
/// Size of PCI Express extended configuration space.
pub const PCI_CFG_SPACE_EXP_SIZE: u16 = 0x1000;

/// COMMAND: respond to I/O space accesses.
pub const COMMAND_IO: u16 = 1 << 0;
/// COMMAND: respond to memory space accesses.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// COMMAND: bus mastering (DMA) enable.
pub const COMMAND_MASTER: u16 = 1 << 2;
/// COMMAND: parity error response.
pub const COMMAND_PARITY: u16 = 1 << 6;
/// COMMAND: SERR# enable.
pub const COMMAND_SERR: u16 = 1 << 8;
/// COMMAND: INTx emulation disable (PCI 2.3). While set the device does not
/// drive its INTx pin, but still reports the pending state in
/// [`STATUS_INTERRUPT`].
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;

/// STATUS: the device's INTx level (PCI 2.3), read-only, visible even while
/// [`COMMAND_INTX_DISABLE`] is set.
pub const STATUS_INTERRUPT: u16 = 1 << 3;
/// STATUS: a capability list is present at [`PCI_CAPABILITY_LIST`].
pub const STATUS_CAP_LIST: u16 = 1 << 4;
/// STATUS bits that are write-one-to-clear error flags.
pub const STATUS_RW1C_MASK: u16 = 0xf900;

/// Capability ID: PCI Express.
pub const PCI_CAP_ID_EXP: u8 = 0x10;
/// Capability ID: Advanced Features (conventional PCI FLR).
pub const PCI_CAP_ID_AF: u8 = 0x13;
/// Offset of the "next capability" pointer within a capability.
pub const PCI_CAP_LIST_NEXT: u16 = 1;
/// The bits of a capability pointer that address a capability: capabilities
/// are dword-aligned, the low two bits are reserved.
pub const PCI_CAP_POINTER_MASK: u32 = 0xfc;
/// Size of the standard type 0 header: capabilities live at or above it.
pub const PCI_STD_HEADER_SIZEOF: u16 = 0x40;
/// The most capabilities a well-formed list in 256 bytes can hold; a walk
/// that goes on longer follows a loop (Linux's `PCI_FIND_CAP_TTL`).
pub const PCI_FIND_CAP_TTL: usize = 48;

/// PCIe capability: Device Capabilities (32 bits).
pub const PCI_EXP_DEVCAP: u16 = 0x04;
/// DEVCAP: Function Level Reset supported.
pub const PCI_EXP_DEVCAP_FLR: u32 = 1 << 28;
/// PCIe capability: Device Control (16 bits).
pub const PCI_EXP_DEVCTL: u16 = 0x08;
/// DEVCTL: Initiate Function Level Reset (write-only, reads as zero).
pub const PCI_EXP_DEVCTL_BCR_FLR: u16 = 1 << 15;
/// PCIe capability: Device Status (16 bits).
pub const PCI_EXP_DEVSTA: u16 = 0x0a;
/// DEVSTA: transactions pending.
pub const PCI_EXP_DEVSTA_TRPND: u16 = 1 << 5;

/// Advanced Features capability: length of the capability (8 bits).
pub const PCI_AF_LENGTH: u16 = 2;
/// Advanced Features capability: AF Capabilities (8 bits).
pub const PCI_AF_CAP: u16 = 3;
/// AF_CAP: Transactions Pending supported.
pub const PCI_AF_CAP_TP: u8 = 1 << 0;
/// AF_CAP: Function Level Reset supported.
pub const PCI_AF_CAP_FLR: u8 = 1 << 1;
/// Advanced Features capability: AF Control (8 bits).
pub const PCI_AF_CTRL: u16 = 4;
/// AF_CTRL: Initiate Function Level Reset (reads as zero).
pub const PCI_AF_CTRL_FLR: u8 = 1 << 0;
/// Advanced Features capability: AF Status (8 bits).
pub const PCI_AF_STATUS: u16 = 5;
/// AF_STATUS: transactions pending.
pub const PCI_AF_STATUS_TP: u8 = 1 << 0;
