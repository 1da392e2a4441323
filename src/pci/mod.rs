//! PCI facts: registers, addresses, access rules, and the PCI 2.3 INTx
//! masking primitives.

mod access;
mod bdf;
pub(crate) mod config;
pub mod holders;
pub mod intx;
pub mod regs;
pub mod sharing;
pub mod sysfs;

pub use access::{
    check_access, check_write, covers, intx_disable_mask, with_intx_disable, AccessError, Width,
};
pub use bdf::{Bdf, BdfError};
