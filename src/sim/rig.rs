//! A whole simulated assignment: the simulated device, the engine, its
//! worker thread, and a guest driver thread that services the interrupt the
//! way a guest ISR does (acknowledge the device, EOI).

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::intx::{run_worker, IntxDevice, IntxError, IntxOptions};
use crate::sim::{SimBackend, SimDevice};

/// What the guest driver observed.
#[derive(Debug, Default)]
struct GuestCounters {
    /// Interrupts whose ISR acknowledged a pending device interrupt.
    delivered: AtomicU64,
    /// Injections that found the guest's line already asserted (the engine
    /// injected twice without an EOI in between).
    double_injections: AtomicU64,
    /// ISR runs that found nothing pending on the device.
    empty: AtomicU64,
}

/// Errors starting a rig.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RigError {
    /// The engine refused the device.
    #[error(transparent)]
    Intx(#[from] IntxError),
    /// Creating an eventfd or thread failed.
    #[error("starting the simulated guest failed")]
    Io(#[source] io::Error),
}

/// A running simulated assignment. Dropping it stops the threads.
pub struct SimRig {
    /// The simulated device (hardware side).
    pub sim: SimDevice,
    /// The engine servicing it.
    pub device: Arc<IntxDevice<SimBackend>>,
    stop_worker: Arc<EventFd>,
    stop_guest: Arc<AtomicBool>,
    guest: Arc<GuestCounters>,
    threads: Vec<JoinHandle<()>>,
}

impl SimRig {
    /// Arms `sim` in a new engine and starts the worker and guest threads.
    pub fn start(sim: SimDevice, options: IntxOptions) -> Result<Self, RigError> {
        let irq = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(RigError::Io)?);
        let resample = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(RigError::Io)?);
        let stop_worker = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(RigError::Io)?);
        let device = Arc::new(IntxDevice::with_options(
            sim.backend(),
            Arc::clone(&irq),
            options,
        )?);
        let stop_guest = Arc::new(AtomicBool::new(false));
        let guest = Arc::new(GuestCounters::default());

        let worker = {
            let device = Arc::clone(&device);
            let resample = Arc::clone(&resample);
            let stop = Arc::clone(&stop_worker);
            thread::Builder::new()
                .name("intx-worker".into())
                .spawn(move || {
                    if let Err(e) = run_worker(&device, Some(&resample), &stop) {
                        tracing::error!(error = %crate::error_chain(&e), "worker stopped");
                    }
                })
                .map_err(RigError::Io)?
        };
        let isr = {
            let sim = sim.clone();
            let stop = Arc::clone(&stop_guest);
            let counters = Arc::clone(&guest);
            thread::Builder::new()
                .name("sim-guest".into())
                .spawn(move || guest_loop(&sim, &irq, &resample, &stop, &counters))
                .map_err(RigError::Io)?
        };
        Ok(Self {
            sim,
            device,
            stop_worker,
            stop_guest,
            guest,
            threads: vec![worker, isr],
        })
    }

    /// Interrupts the guest driver has handled.
    pub fn delivered(&self) -> u64 {
        self.guest.delivered.load(Ordering::SeqCst)
    }

    /// Injections the guest saw while its line was already asserted.
    pub fn double_injections(&self) -> u64 {
        self.guest.double_injections.load(Ordering::SeqCst)
    }

    /// ISR runs that found nothing to acknowledge.
    pub fn empty_isr_runs(&self) -> u64 {
        self.guest.empty.load(Ordering::SeqCst)
    }

    /// Waits until the guest has handled `count` interrupts; `false` on
    /// timeout.
    pub fn wait_delivered(&self, count: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.delivered() < count {
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_micros(200));
        }
        true
    }

    fn shutdown(&mut self) {
        self.stop_guest.store(true, Ordering::SeqCst);
        let _ = self.stop_worker.write(1);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for SimRig {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The guest driver: on each interrupt, acknowledge one device interrupt
/// (a BAR access) and EOI (which KVM turns into the resample eventfd).
fn guest_loop(
    sim: &SimDevice,
    irq: &EventFd,
    resample: &EventFd,
    stop: &AtomicBool,
    counters: &GuestCounters,
) {
    let Ok(epoll) = Epoll::new() else { return };
    let fd = std::os::fd::AsRawFd::as_raw_fd(irq);
    if epoll
        .ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, 0))
        .is_err()
    {
        return;
    }
    let mut events = [EpollEvent::default(); 1];
    while !stop.load(Ordering::SeqCst) {
        match epoll.wait(10, &mut events) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
        let Ok(count) = irq.read() else { continue };
        if count > 1 {
            counters
                .double_injections
                .fetch_add(count - 1, Ordering::SeqCst);
        }
        if sim.ack() {
            counters.delivered.fetch_add(1, Ordering::SeqCst);
        } else {
            counters.empty.fetch_add(1, Ordering::SeqCst);
        }
        let _ = resample.write(1);
    }
}
