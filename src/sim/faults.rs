//! Faults that can be attached to the simulated device's backend
//! operations ([`SimOp`], [`Fault`]).

use crate::backend::BackendError;

/// A backend operation that faults can be attached to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SimOp {
    /// `config_read`.
    ConfigRead,
    /// `config_write`.
    ConfigWrite,
    /// `intx_enable`.
    IntxEnable,
    /// `intx_disable`.
    IntxDisable,
    /// `intx_check_and_mask`.
    CheckAndMask,
    /// `intx_check_and_unmask`.
    CheckAndUnmask,
    /// `intx_mask`.
    Mask,
    /// `reset`.
    Reset,
    /// `intx_set_unmask_eventfd`.
    SetUnmaskEventfd,
    /// `intx_adopt`.
    IntxAdopt,
}

impl SimOp {
    /// Every operation, for tests that fault each one in turn.
    pub const ALL: [SimOp; 10] = [
        SimOp::ConfigRead,
        SimOp::ConfigWrite,
        SimOp::IntxEnable,
        SimOp::IntxDisable,
        SimOp::CheckAndMask,
        SimOp::CheckAndUnmask,
        SimOp::Mask,
        SimOp::Reset,
        SimOp::SetUnmaskEventfd,
        SimOp::IntxAdopt,
    ];

    pub(super) fn index(self) -> usize {
        self as usize
    }
}

/// What an injected fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fault {
    /// EIO.
    Eio,
    /// EAGAIN (transient).
    Eagain,
    /// EBUSY (transient).
    Ebusy,
    /// The device is gone.
    Gone,
    /// Config reads return all-ones; other operations report the device as
    /// not responding.
    AllOnes,
}

impl Fault {
    pub(super) fn error(self, op: &'static str) -> BackendError {
        let os = |errno| BackendError::os(op, std::io::Error::from_raw_os_error(errno));
        match self {
            Fault::Eio => os(libc::EIO),
            Fault::Eagain => os(libc::EAGAIN),
            Fault::Ebusy => os(libc::EBUSY),
            Fault::Gone => BackendError::Gone,
            Fault::AllOnes => BackendError::NotResponding,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub(super) struct FaultRule {
    pub(super) op: SimOp,
    /// Calls of `op` to let through before the fault applies.
    pub(super) skip: u64,
    /// Calls that fail once it applies (`u64::MAX`: forever).
    pub(super) times: u64,
    pub(super) fault: Fault,
}
