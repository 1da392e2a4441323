//! QEMU's `edu` test device through VFIO: the device the tier-3 tests, the
//! in-guest benchmarks and the example VMM assign. BAR0 0x60 raises its
//! interrupt (the written bits are ORed into its status), 0x64 acknowledges
//! (clears the written bits), 0x24 reads the status; the INTx line is high
//! while the status is non-zero.

use std::sync::atomic::{AtomicU32, Ordering};

use tracing::warn;

use crate::backend::ConfigSpace;
use crate::kvm::assign::DeviceSide;
use crate::pci::regs::{COMMAND_MASTER, COMMAND_MEMORY, PCI_COMMAND};
use crate::pci::Width;
use crate::vfio::{RegionAccess, VfioBackend, VfioError};

/// PCI vendor and device ID of the edu device.
pub const EDU_ID: (u16, u16) = (0x1234, 0x11e8);

/// The edu's interrupt registers in BAR0.
#[derive(Debug)]
pub struct Edu {
    bar: RegionAccess,
    next_bit: AtomicU32,
}

impl Edu {
    /// Identification register (low byte 0xed).
    pub const ID: u64 = 0x00;
    /// Interrupt status.
    pub const STATUS: u64 = 0x24;
    /// Interrupt raise.
    pub const RAISE: u64 = 0x60;
    /// Interrupt acknowledge.
    pub const ACK: u64 = 0x64;
    /// How many distinct status bits [`DeviceSide::raise`] rotates through,
    /// so raises that arrive before the ack are counted, not merged.
    pub const BITS: u32 = 16;

    /// Wraps BAR0 (region 0) of an edu; checks its ID register. The caller
    /// must have enabled memory decoding (COMMAND.MEMORY).
    pub fn new(bar: RegionAccess) -> Result<Self, VfioError> {
        let id = bar.read_u32(Self::ID)?;
        if id & 0xff != 0xed {
            warn!(id, "BAR0 does not look like an edu device");
        }
        Ok(Self {
            bar,
            next_bit: AtomicU32::new(0),
        })
    }

    /// Sets an edu up as a guest's firmware and driver would: memory
    /// decoding and bus mastering on in COMMAND (through `backend`'s
    /// config space), BAR0 mapped, and an interrupt status left by an
    /// earlier user acknowledged.
    pub fn enable(backend: &mut VfioBackend) -> Result<Self, VfioError> {
        let bdf = backend.bdf();
        let config = |op| move |source| VfioError::Config { bdf, op, source };
        let command = backend
            .config_read(PCI_COMMAND, Width::Word)
            .map_err(config("reading COMMAND"))?;
        backend
            .config_write(
                PCI_COMMAND,
                Width::Word,
                command | u32::from(COMMAND_MEMORY | COMMAND_MASTER),
            )
            .map_err(config("enabling memory decoding and bus mastering"))?;
        let edu = Self::new(backend.region(0)?)?;
        let stale = edu.status()?;
        if stale != 0 {
            edu.ack_bits(stale)?;
        }
        Ok(edu)
    }

    /// Maps BAR0 of an edu a previous process of this program set up (its
    /// restart): as [`enable`](Self::enable), but an interrupt status
    /// pending is left pending (it is an interrupt to deliver).
    pub fn resume(backend: &mut VfioBackend) -> Result<Self, VfioError> {
        Self::new(backend.region(0)?)
    }

    /// Raises the interrupt with status `bits`.
    pub fn raise_bits(&self, bits: u32) -> Result<(), VfioError> {
        self.bar.write_u32(Self::RAISE, bits)
    }

    /// Acknowledges status `bits`.
    pub fn ack_bits(&self, bits: u32) -> Result<(), VfioError> {
        self.bar.write_u32(Self::ACK, bits)
    }

    /// The interrupt status.
    pub fn status(&self) -> Result<u32, VfioError> {
        self.bar.read_u32(Self::STATUS)
    }

    /// The interrupt status, if the device decodes around the read: its ID
    /// register reads right just before and just after (a device in reset
    /// reads zeros or all-ones, which would pass for a status).
    fn decoding_status(&self) -> Option<u32> {
        let decodes = || {
            self.bar
                .read_u32(Self::ID)
                .is_ok_and(|id| id & 0xff == 0xed && id != u32::MAX)
        };
        if !decodes() {
            return None;
        }
        let status = self.status().ok()?;
        decodes().then_some(status)
    }
}

impl DeviceSide for Edu {
    /// Raises one interrupt with the next of [`Edu::BITS`] status bits.
    fn raise(&self) {
        let bit = self.next_bit.fetch_add(1, Ordering::Relaxed) % Self::BITS;
        if let Err(e) = self.raise_bits(1 << bit) {
            warn!(error = %crate::error_chain(&e), "edu raise failed");
        }
    }

    /// Raises a lost interrupt again: the lowest pending status bit, whose
    /// line a reset lowered (edu asserts its line whenever a raise finds its
    /// status non-zero), or, with nothing pending, a new one: the raise
    /// itself was dropped by a device in reset. A device that does not
    /// decode raises nothing.
    fn raise_lost(&self) -> bool {
        match self.decoding_status() {
            None => false,
            Some(0) => {
                self.raise();
                true
            }
            Some(status) => self.raise_bits(status & status.wrapping_neg()).is_ok(),
        }
    }

    /// Acknowledges the lowest pending status bit, if any, and checks that
    /// the acknowledgement landed (a device in reset drops it; the bit then
    /// stays pending and is acknowledged by a later ISR run).
    fn ack(&self) -> bool {
        match self.decoding_status() {
            None | Some(0) => false,
            Some(status) => {
                let bit = status & status.wrapping_neg();
                self.ack_bits(bit).is_ok()
                    && self.decoding_status().is_some_and(|now| now & bit == 0)
            }
        }
    }
}
