//! Tier 1: no hardware. The gate, PCI 2.3 masking, the INTx state machine,
//! fault injection and the 2011 reproducer, all on the simulated device.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod asyncio;
mod bypass;
mod cli;
mod engine;
mod faults;
mod gate;
mod hold;
mod masking;
mod model;
mod recheck;
mod reset;
mod stress;
mod sysfs;
mod watchdog;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use vfio_intx::intx::{CallbackSink, IntxDevice, IntxOptions};
use vfio_intx::sim::{SimBackend, SimDevice};

/// An engine on a simulated device, driven step by step by the test (no
/// worker thread), with a sink that counts injections.
pub struct Stepper {
    pub sim: SimDevice,
    pub dev: IntxDevice<SimBackend>,
    pub injected: Arc<AtomicU64>,
}

impl Stepper {
    pub fn new(sim: SimDevice) -> Self {
        Self::with_options(sim, IntxOptions::default())
    }

    pub fn with_options(sim: SimDevice, options: IntxOptions) -> Self {
        let injected = Arc::new(AtomicU64::new(0));
        let count = Arc::clone(&injected);
        let dev = IntxDevice::with_options(
            sim.backend(),
            CallbackSink(move || {
                count.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }),
            options,
        )
        .unwrap();
        Self { sim, dev, injected }
    }

    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::SeqCst)
    }

    /// Whether the trigger eventfd is readable (a worker would wake).
    pub fn trigger_fired(&self) -> bool {
        readable(self.dev.trigger())
    }

    /// Runs the host interrupt path if the trigger fired, as a worker
    /// polling it would.
    pub fn poll_host(&self) {
        if self.trigger_fired() {
            let _ = self.dev.on_host_interrupt();
        }
    }

    /// The guest ISR: acknowledge one device interrupt, then EOI.
    pub fn guest_isr(&self) -> bool {
        let acked = self.sim.ack();
        let _ = self.dev.on_guest_eoi();
        acked
    }

    pub fn masked(&self) -> bool {
        self.sim.snapshot().command & vfio_intx::pci::regs::COMMAND_INTX_DISABLE != 0
    }
}

/// Whether `fd` is readable right now.
pub fn readable(fd: &EventFd) -> bool {
    let epoll = Epoll::new().unwrap();
    epoll
        .ctl(
            ControlOperation::Add,
            std::os::fd::AsRawFd::as_raw_fd(fd),
            EpollEvent::new(EventSet::IN, 0),
        )
        .unwrap();
    let mut events = [EpollEvent::default(); 1];
    epoll.wait(0, &mut events).unwrap() > 0
}
