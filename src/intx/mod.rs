//! The INTx engine: PCI 2.3 masking on behalf of a guest, one device at a
//! time, behind the config-access gate.

// Not under loom: tokio's loom mode has no I/O driver.
#[cfg(all(feature = "tokio", not(loom)))]
pub mod asyncio;
mod engine;
mod error;
mod guest;
mod sink;
pub(crate) mod stats;
#[cfg(all(feature = "tokio", not(loom)))]
pub(crate) mod sys;
mod worker;

pub use engine::{
    IntxDevice, IntxOptions, LineState, RetryPolicy, Serviced, Tick, WatchdogOptions,
};
pub use error::{IntxError, Operation};
pub use sink::{CallbackSink, InterruptSink};
pub use stats::IntxStats;
pub use worker::{run_worker, WorkerError};
