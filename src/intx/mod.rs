//! The INTx engine: PCI 2.3 masking on behalf of a guest, one device at a
//! time, behind the config-access gate.

mod engine;
mod error;
mod guest;
mod sink;
mod stats;
mod worker;

pub use engine::{
    IntxDevice, IntxOptions, LineState, RetryPolicy, Serviced, Tick, WatchdogOptions,
};
pub use error::{IntxError, Operation};
pub use sink::{CallbackSink, InterruptSink};
pub use stats::IntxStats;
pub use worker::{run_worker, WorkerError};
