//! A ready-made event loop for one device, for embedders without their own
//! (and for the demo and tests): waits on the trigger, the resample eventfd
//! and a stop eventfd, and calls the engine.

use std::io;
use std::time::{Duration, Instant};

use tracing::warn;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::backend::PciBackend;
use crate::intx::IntxDevice;
use crate::ratelimit::LogLimiter;

/// Why the worker loop stopped.
#[derive(Debug, thiserror::Error)]
#[error("{bdf}: INTx worker {op} failed")]
pub struct WorkerError {
    bdf: crate::pci::Bdf,
    op: &'static str,
    #[source]
    source: io::Error,
}

impl WorkerError {
    pub(crate) fn new(bdf: crate::pci::Bdf, op: &'static str, source: io::Error) -> Self {
        Self { bdf, op, source }
    }
}

const TOKEN_TRIGGER: u64 = 0;
const TOKEN_RESAMPLE: u64 = 1;
const TOKEN_STOP: u64 = 2;

/// Services `device` until `stop` is signalled, and runs its watchdog ticks
/// (see [`IntxDevice::watchdog_tick`]) from the same thread with epoll
/// timeouts — no extra thread, no busy polling. `resample` is KVM's resample
/// eventfd on the user-space EOI path (`None` when the kernel bypass handles
/// EOIs or the embedder reports them itself). Interrupt-path errors are
/// logged (rate limited) and counted; the engine retries them itself.
pub fn run_worker<B: PciBackend>(
    device: &IntxDevice<B>,
    resample: Option<&EventFd>,
    stop: &EventFd,
) -> Result<(), WorkerError> {
    let bdf = device.bdf();
    let fail = |op| move |source| WorkerError::new(bdf, op, source);
    let epoll = Epoll::new().map_err(fail("epoll_create"))?;
    let watch = |fd: &EventFd, token| {
        epoll.ctl(
            ControlOperation::Add,
            std::os::fd::AsRawFd::as_raw_fd(fd),
            EpollEvent::new(EventSet::IN, token),
        )
    };
    watch(device.trigger(), TOKEN_TRIGGER).map_err(fail("epoll_ctl"))?;
    watch(stop, TOKEN_STOP).map_err(fail("epoll_ctl"))?;
    if let Some(resample) = resample {
        watch(resample, TOKEN_RESAMPLE).map_err(fail("epoll_ctl"))?;
    }

    let mut limiter = LogLimiter::new(Duration::from_secs(1), 10);
    let mut events = [EpollEvent::default(); 3];
    let mut next_tick = Instant::now();
    loop {
        let now = Instant::now();
        if now >= next_tick {
            let (_, delay) = device.watchdog_tick(now);
            next_tick = now + delay;
        }
        let timeout_ms = next_tick
            .saturating_duration_since(Instant::now())
            .as_millis()
            .clamp(1, i32::MAX as u128) as i32;
        let ready = match epoll.wait(timeout_ms, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(fail("epoll_wait")(e)),
        };
        for event in &events[..ready] {
            let result = match event.data() {
                TOKEN_STOP => return Ok(()),
                TOKEN_RESAMPLE => match resample.map(EventFd::read) {
                    Some(Err(e)) if e.kind() != io::ErrorKind::WouldBlock => {
                        return Err(fail("resample read")(e))
                    }
                    _ => device.on_guest_eoi(),
                },
                _ => device.on_host_interrupt(),
            };
            if let Err(error) = result {
                if let Some(suppressed) = limiter.admit() {
                    warn!(%bdf, suppressed, error = %crate::error_chain(&error), "INTx servicing failed");
                }
            }
        }
    }
}
