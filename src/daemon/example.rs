//! The built-in example guest (`[example-guest]`, used by config/demo.toml):
//! a tiny KVM guest to which a daemon-owned simulated device is assigned.
//! The daemon attaches it like a VMM session (KVM irqfd with resample), a
//! timer makes the device raise interrupts, and the guest's ISR reads
//! COMMAND/STATUS through the engine's guest config path and acknowledges
//! the device — so `vfio-intx daemon --config config/demo.toml` visibly
//! services interrupts end to end. Needs /dev/kvm; without it the daemon
//! runs without the guest and says so.

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use tracing::{info, warn};
use vmm_sys_util::eventfd::EventFd;

use crate::daemon::protocol::ExampleGuestStatus;
use crate::daemon::service::{AttachError, ManagedDevice};
use crate::kvm::testvm::{GuestDevice, TinyVm, VmControl};
use crate::kvm::{Irqchip, KvmError, ResampleIrqfd};
use crate::pci::{Bdf, Width};
use crate::sim::SimDevice;

/// PIC line of the example guest's device.
const GSI: u8 = 5;
/// Slot of the device on the guest's bus 0.
const DEVFN: u8 = 3 << 3;

/// Why the example guest could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExampleError {
    /// KVM refused something.
    #[error("the example guest's VM could not be set up")]
    Kvm(#[from] KvmError),
    /// The device would not take the guest's session.
    #[error(transparent)]
    Attach(#[from] AttachError),
    /// The vCPU thread could not start or the guest did not come up.
    #[error("the example guest: {0}")]
    Guest(String),
}

struct Chipset {
    dev: Arc<ManagedDevice>,
    sim: SimDevice,
}

impl GuestDevice for Chipset {
    fn config_read(&self, offset: u16, width: Width) -> u32 {
        self.dev
            .engine
            .guest_config_read(offset, width)
            .unwrap_or(u32::MAX)
    }

    fn config_write(&self, offset: u16, width: Width, value: u32) {
        let _ = self.dev.engine.guest_config_write(offset, width, value);
    }

    fn ack(&self) -> bool {
        self.sim.ack()
    }
}

/// The running example guest.
pub(crate) struct ExampleGuest {
    dev: Arc<ManagedDevice>,
    sim: SimDevice,
    control: Arc<VmControl>,
    vcpu: Option<thread::JoinHandle<Result<(), KvmError>>>,
    raiser: tokio::task::JoinHandle<()>,
    _irqfd: ResampleIrqfd,
}

impl ExampleGuest {
    /// Starts the guest on `dev` (a simulated device) with the device
    /// raising `rate` interrupts per second. `Ok(None)` without /dev/kvm.
    pub(crate) async fn start(
        dev: Arc<ManagedDevice>,
        rate: u32,
    ) -> Result<Option<Self>, ExampleError> {
        let Some(sim) = dev.sim.clone() else {
            return Err(ExampleError::Guest(format!(
                "{} is not a simulated device",
                dev.bdf()
            )));
        };
        if !std::path::Path::new("/dev/kvm").exists() {
            warn!("no /dev/kvm: the example guest is not started (raise interrupts with `sim-raise` instead)");
            return Ok(None);
        }
        crate::kvm::testvm::install_kick_handler()?;
        let mut vm = TinyVm::new(GSI, DEVFN, Irqchip::Full)?;
        let irqfd = ResampleIrqfd::register(Arc::clone(vm.vm()), u32::from(GSI))?;
        let dup = |fd: &EventFd| {
            fd.try_clone().map_err(|source| KvmError::Ioctl {
                op: "dup eventfd",
                source,
            })
        };
        dev.attach(dup(irqfd.trigger())?, dup(irqfd.resample())?)
            .await?;
        let control = Arc::new(VmControl::default());
        let chipset = Chipset {
            dev: Arc::clone(&dev),
            sim: sim.clone(),
        };
        let vcpu = {
            let control = Arc::clone(&control);
            thread::Builder::new()
                .name("example-vcpu".into())
                .spawn(move || vm.run(DEVFN, &chipset, &control))
                .map_err(|e| ExampleError::Guest(format!("spawning the vCPU thread: {e}")))?
        };
        let started = tokio::time::Instant::now();
        while !control.ready() {
            if started.elapsed() > Duration::from_secs(10) || vcpu.is_finished() {
                dev.detach();
                return Err(ExampleError::Guest("the guest did not come up".into()));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let raiser = {
            let sim = sim.clone();
            let period = Duration::from_secs(1) / rate.max(1);
            tokio::spawn(async move {
                let mut timer = tokio::time::interval(period);
                timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                loop {
                    timer.tick().await;
                    sim.raise();
                }
            })
        };
        info!(bdf = %dev.bdf(), rate, "example KVM guest running: the simulated device's interrupts go to its ISR through the daemon");
        Ok(Some(Self {
            dev,
            sim,
            control,
            vcpu: Some(vcpu),
            raiser,
            _irqfd: irqfd,
        }))
    }

    pub(crate) fn bdf(&self) -> Bdf {
        self.dev.bdf()
    }

    pub(crate) fn status(&self) -> ExampleGuestStatus {
        ExampleGuestStatus {
            bdf: self.dev.bdf(),
            raised: self.sim.snapshot().raised,
            acked: self.control.acked(),
            isr_runs: self.control.isr_runs(),
        }
    }

    /// Stops the raiser and the vCPU, and detaches from the device.
    pub(crate) async fn stop(mut self) {
        self.raiser.abort();
        self.control.request_stop();
        if let Some(vcpu) = self.vcpu.take() {
            let stopped = tokio::task::spawn_blocking(move || {
                let finished =
                    crate::kvm::testvm::kick_until_finished(&vcpu, Duration::from_secs(2));
                if finished {
                    let _ = vcpu.join();
                }
                finished
            })
            .await;
            if !matches!(stopped, Ok(true)) {
                warn!("the example guest's vCPU did not stop");
            }
        }
        self.dev.detach();
    }
}
