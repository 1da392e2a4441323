//! Fallible access to one function's configuration space ([`ConfigSpace`])
//! and the error every backend operation reports ([`BackendError`]): the
//! config-space layer the PCI primitives build on, below the backend seam
//! (`crate::backend`, which re-exports both).

use std::io;

use crate::pci::{AccessError, Bdf, Width};

/// Why a backend operation failed. The device and operation are named by the
/// caller's error, which wraps this one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The access was refused before reaching the device.
    #[error(transparent)]
    Access(#[from] AccessError),
    /// The device no longer exists (hot-unplugged, driver unbound, fd revoked).
    #[error("the device is gone")]
    Gone,
    /// A config read returned all-ones: the device is in reset, powered down
    /// or gone.
    #[error("the device does not respond (config read returned all-ones)")]
    NotResponding,
    /// The device offers no reset method.
    #[error("the device has no reset method")]
    NoResetMethod,
    /// The device has no usable INTx (no interrupt pin, or the driver refuses it).
    #[error("the device has no usable INTx interrupt")]
    NoIntx,
    /// A system call failed; the errno is kept.
    #[error("{op} failed")]
    Os {
        /// What was being done, e.g. "VFIO_DEVICE_RESET" or "config pread".
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl BackendError {
    /// Wraps an OS error with the operation that produced it.
    pub fn os(op: &'static str, source: io::Error) -> Self {
        BackendError::Os { op, source }
    }

    /// Whether retrying the same operation later may succeed (EAGAIN, EBUSY,
    /// EINTR), as the kernel answers while another reset holds the device.
    pub fn is_transient(&self) -> bool {
        match self {
            BackendError::Os { source, .. } => matches!(
                source.raw_os_error(),
                Some(libc::EAGAIN) | Some(libc::EBUSY) | Some(libc::EINTR)
            ),
            _ => false,
        }
    }
}

/// Fallible access to one function's configuration space.
pub trait ConfigSpace {
    /// The device's address, for errors and logs.
    fn bdf(&self) -> Bdf;

    /// Size of the config space this backend exposes.
    fn config_size(&self) -> u16;

    /// Reads `width` bytes at `offset`. Misaligned or out-of-range accesses
    /// are errors. A read of all-ones from a register that cannot be all-ones
    /// is reported by the caller, which knows the register.
    fn config_read(&mut self, offset: u16, width: Width) -> Result<u32, BackendError>;

    /// Writes `width` bytes of `value` at `offset`.
    fn config_write(&mut self, offset: u16, width: Width, value: u32) -> Result<(), BackendError>;
}
