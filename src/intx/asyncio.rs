//! The optional async adapter (feature `tokio`): the same event loop as
//! [`run_worker`](crate::intx::run_worker), as a future on a tokio runtime.
//! The engine itself stays synchronous; this only waits for its eventfds
//! with `AsyncFd` and calls it.

use std::io;
use std::time::{Duration, Instant};

use tracing::warn;
use vmm_sys_util::eventfd::EventFd;

use crate::backend::PciBackend;
use crate::intx::sys::async_eventfd;
use crate::intx::{IntxDevice, WorkerError};
use crate::ratelimit::LogLimiter;

/// Services `device` until the future is dropped: host interrupts from its
/// trigger, guest EOIs from `resample` (the user-space path), and the
/// watchdog's ticks from a tokio timer. Interrupt-path errors are logged
/// (at most ten a second) and counted; the engine retries them itself.
///
/// Must be polled inside a tokio runtime with the I/O and time drivers
/// enabled.
pub async fn serve<B: PciBackend>(
    device: &IntxDevice<B>,
    resample: Option<&EventFd>,
) -> Result<(), WorkerError> {
    let bdf = device.bdf();
    let fail = |op| move |source| WorkerError::new(bdf, op, source);
    // The engine and the caller keep their descriptors; tokio owns dups.
    let dup = |fd: &EventFd| fd.try_clone().and_then(async_eventfd);
    let trigger = dup(device.trigger()).map_err(fail("registering the trigger with tokio"))?;
    let resample_fd = match resample {
        Some(r) => Some(dup(r).map_err(fail("registering the resample eventfd with tokio"))?),
        None => None,
    };
    let mut next_tick = Instant::now();
    let mut limiter = LogLimiter::new(Duration::from_secs(1), 10);
    let mut report = |result: Result<_, crate::intx::IntxError>| {
        if let Err(error) = result {
            if let Some(suppressed) = limiter.admit() {
                warn!(%bdf, suppressed, error = %crate::error_chain(&error), "INTx servicing failed");
            }
        }
    };
    loop {
        let now = Instant::now();
        if now >= next_tick {
            let (_, delay) = device.watchdog_tick(now);
            next_tick = now + delay;
        }
        let tick = tokio::time::sleep_until(next_tick.into());
        tokio::select! {
            ready = trigger.readable() => {
                let mut guard = ready.map_err(fail("waiting for the trigger"))?;
                // Drains the eventfd; readiness cleared after, so an event
                // arriving meanwhile is seen again (tokio tracks it).
                report(device.on_host_interrupt());
                guard.clear_ready();
            }
            ready = async {
                match &resample_fd {
                    Some(fd) => fd.readable().await,
                    None => std::future::pending().await,
                }
            } => {
                let mut guard = ready.map_err(fail("waiting for the resample eventfd"))?;
                if let Some(r) = &resample_fd {
                    match r.get_ref().read() {
                        Ok(_) => report(device.on_guest_eoi()),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(fail("reading the resample eventfd")(e)),
                    }
                }
                guard.clear_ready();
            }
            () = tick => {}
        }
    }
}
