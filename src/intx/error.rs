//! Errors of the INTx engine.

use std::fmt;
use std::io;

use crate::backend::BackendError;
use crate::pci::{Bdf, Width};

/// The engine operation that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Reading COMMAND+STATUS.
    ReadCommandStatus,
    /// Check-and-mask on a host interrupt.
    CheckAndMask,
    /// Check-and-unmask on a guest EOI.
    CheckAndUnmask,
    /// Masking INTx.
    Mask,
    /// Enabling INTx delivery.
    Enable,
    /// Disabling INTx delivery.
    Disable,
    /// Reading the capability list.
    ReadCapabilities,
    /// Registering or removing the kernel unmask eventfd.
    SetUnmaskEventfd,
    /// Adopting the kernel bypass as the kernel has it wired.
    Adopt,
    /// Saving config state before a reset.
    SaveState,
    /// Resetting the function.
    Reset,
    /// Restoring config state after a reset.
    RestoreState,
    /// A guest config read.
    GuestConfigRead {
        /// Offset of the access.
        offset: u16,
        /// Width of the access.
        width: Width,
    },
    /// A guest config write.
    GuestConfigWrite {
        /// Offset of the access.
        offset: u16,
        /// Width of the access.
        width: Width,
    },
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Operation::ReadCommandStatus => f.write_str("reading COMMAND/STATUS"),
            Operation::CheckAndMask => f.write_str("INTx check-and-mask"),
            Operation::CheckAndUnmask => f.write_str("INTx check-and-unmask"),
            Operation::Mask => f.write_str("masking INTx"),
            Operation::Enable => f.write_str("enabling INTx"),
            Operation::Disable => f.write_str("disabling INTx"),
            Operation::ReadCapabilities => f.write_str("reading the capability list"),
            Operation::SetUnmaskEventfd => f.write_str("wiring the kernel unmask eventfd"),
            Operation::Adopt => f.write_str("adopting the kernel bypass as wired"),
            Operation::SaveState => f.write_str("saving config state before reset"),
            Operation::Reset => f.write_str("reset"),
            Operation::RestoreState => f.write_str("restoring config state"),
            Operation::GuestConfigRead { offset, width } => {
                write!(f, "guest {width} config read at {offset:#x}")
            }
            Operation::GuestConfigWrite { offset, width } => {
                write!(f, "guest {width} config write at {offset:#x}")
            }
        }
    }
}

/// An INTx engine error: names the device and the operation; the cause is
/// the source.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IntxError {
    /// A backend operation failed.
    #[error("{bdf}: {op} failed")]
    Backend {
        /// The device.
        bdf: Bdf,
        /// What was being done.
        op: Operation,
        /// The backend's error.
        #[source]
        source: BackendError,
    },
    /// Injecting into the interrupt sink failed.
    #[error("{bdf}: injecting the interrupt into the guest failed")]
    Inject {
        /// The device.
        bdf: Bdf,
        /// The sink's error.
        #[source]
        source: io::Error,
    },
    /// A hold on the kernel bypass, or the bypass while held: the kernel
    /// unmasks at the guest's EOI, so nothing would stay held.
    #[error("{bdf}: INTx cannot be held masked on the kernel bypass (the kernel unmasks at the guest's EOI)")]
    HoldOnBypass {
        /// The device.
        bdf: Bdf,
    },
    /// The engine's own eventfd failed.
    #[error("{bdf}: the host interrupt eventfd failed")]
    EventFd {
        /// The device.
        bdf: Bdf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl IntxError {
    /// The backend error behind this one, if any.
    pub fn backend_error(&self) -> Option<&BackendError> {
        match self {
            IntxError::Backend { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// A failure inside the state machine, before the device is named.
#[derive(Debug)]
pub(crate) enum Fail {
    Backend(Operation, BackendError),
    Inject(io::Error),
}

impl fmt::Display for Fail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fail::Backend(op, e) => write!(f, "{op} failed: {e}"),
            Fail::Inject(e) => write!(f, "injecting the interrupt failed: {e}"),
        }
    }
}

impl Fail {
    pub(crate) fn into_error(self, bdf: Bdf) -> IntxError {
        match self {
            Fail::Backend(op, source) => IntxError::Backend { bdf, op, source },
            Fail::Inject(source) => IntxError::Inject { bdf, source },
        }
    }
}
