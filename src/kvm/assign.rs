//! A whole device assignment on the test VM: the engine wired to KVM on the
//! chosen EOI path, the guest servicing the device's interrupts, and a
//! driver loop raising them. Shared by the example VMM, the tier-2/3 tests
//! and the benchmarks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use kvm_ioctls::Kvm;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend::PciBackend;
use crate::intx::{run_worker, IntxDevice, IntxError, IntxOptions, IntxStats, LineState};
use crate::kvm::testvm::{GuestDevice, TinyVm, VmControl};
use crate::kvm::{
    choose_path, Irqchip, KvmCaps, KvmError, Path, PathChoice, PathPolicy, ResampleIrqfd,
};
use crate::pci::regs::STATUS_INTERRUPT;
use crate::pci::Width;

/// The device's own side: what its driver does through the BARs.
pub trait DeviceSide: Send + Sync {
    /// Makes the device raise one interrupt.
    fn raise(&self);
    /// Acknowledges one interrupt (the guest ISR's BAR write).
    fn ack(&self) -> bool;
}

/// What to run.
#[derive(Debug, Clone, Copy)]
pub struct AssignmentConfig {
    /// PIC line / GSI of the device's INTx in the guest.
    pub gsi: u8,
    /// The device's slot on the guest's bus 0 (devfn).
    pub devfn: u8,
    /// Interrupts to raise.
    pub interrupts: u64,
    /// Every `burst`-th raise is followed at once by another, before the
    /// guest's EOI (0 = never).
    pub burst: u64,
    /// EOI path policy.
    pub policy: PathPolicy,
    /// How long to wait for one interrupt before giving up.
    pub timeout: Duration,
}

impl Default for AssignmentConfig {
    fn default() -> Self {
        Self {
            gsi: 5,
            devfn: 3 << 3,
            interrupts: 1000,
            burst: 0,
            policy: PathPolicy::Auto,
            timeout: Duration::from_secs(10),
        }
    }
}

/// What happened.
#[derive(Debug, Clone)]
pub struct AssignmentReport {
    /// The EOI path and why.
    pub path: PathChoice,
    /// Interrupts raised.
    pub raised: u64,
    /// ISR runs that acknowledged a device interrupt.
    pub acked: u64,
    /// ISR runs that found nothing to acknowledge.
    pub empty_isr_runs: u64,
    /// ISR config reads that did not see STATUS.INTERRUPT set.
    pub status_clear_in_isr: u64,
    /// ISR config reads that found the EOI already processed (the resample
    /// came before the guest's EOI).
    pub resample_before_eoi: u64,
    /// Raise-to-ISR-ack latency of each interrupt, sorted.
    pub latencies: Vec<Duration>,
    /// The engine's counters (on the bypass path its per-interrupt counters
    /// stay zero: no user-space work per interrupt).
    pub stats: IntxStats,
}

impl AssignmentReport {
    /// The latency at quantile `q` (0..=1).
    pub fn latency(&self, q: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let i = ((self.latencies.len() - 1) as f64 * q).round() as usize;
        self.latencies[i.min(self.latencies.len() - 1)]
    }
}

/// Errors of an assignment run.
#[derive(Debug, thiserror::Error)]
pub enum AssignError {
    /// KVM refused something.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// The engine refused the device.
    #[error(transparent)]
    Intx(#[from] IntxError),
    /// The guest stopped receiving interrupts.
    #[error("interrupt {index} of {total} did not reach the guest within {timeout:?} (raised {raised}, acked {acked}, line {line:?})")]
    Stalled {
        /// Which interrupt.
        index: u64,
        /// How many were to be raised.
        total: u64,
        /// The wait.
        timeout: Duration,
        /// Raised so far.
        raised: u64,
        /// Acked so far.
        acked: u64,
        /// The engine's line state then.
        line: LineState,
    },
    /// A thread could not be started or failed.
    #[error("{0}")]
    Thread(String),
}

struct Chipset<B: PciBackend> {
    device: Arc<IntxDevice<B>>,
    side: Arc<dyn DeviceSide>,
    bypass: bool,
    status_clear: AtomicU64,
    resample_before_eoi: AtomicU64,
}

impl<B: PciBackend> GuestDevice for Chipset<B> {
    fn config_read(&self, offset: u16, width: Width) -> u32 {
        let value = self
            .device
            .guest_config_read(offset, width)
            .unwrap_or(u32::MAX);
        if offset == crate::pci::regs::PCI_COMMAND && width == Width::Dword {
            // The ISR's read: the device must still assert (not acked yet),
            // and on the user-space path the engine must not have seen the
            // EOI yet.
            if value & (u32::from(STATUS_INTERRUPT) << 16) == 0 {
                self.status_clear.fetch_add(1, Ordering::SeqCst);
            }
            if !self.bypass && self.device.line_state() != LineState::InService {
                self.resample_before_eoi.fetch_add(1, Ordering::SeqCst);
            }
        }
        value
    }

    fn config_write(&self, offset: u16, width: Width, value: u32) {
        let _ = self.device.guest_config_write(offset, width, value);
    }

    fn ack(&self) -> bool {
        self.side.ack()
    }
}

/// Assigns `backend` to a tiny KVM guest on the chosen path and raises
/// `config.interrupts` interrupts through `side`, each delivered to and
/// acknowledged by the guest's ISR.
pub fn run_assignment<B: PciBackend + 'static>(
    backend: B,
    backend_has_unmask_eventfd: bool,
    side: Arc<dyn DeviceSide>,
    config: AssignmentConfig,
) -> Result<AssignmentReport, AssignError> {
    let kvm = Kvm::new().map_err(|e| KvmError::Ioctl {
        op: "opening /dev/kvm",
        source: std::io::Error::from_raw_os_error(e.errno()),
    })?;
    let caps = KvmCaps::probe(&kvm);
    let mut vm = TinyVm::new(config.gsi, config.devfn, Irqchip::Full)?;
    let path = choose_path(
        config.policy,
        caps,
        vm.irqchip(),
        backend_has_unmask_eventfd,
    )?;
    let irqfd = ResampleIrqfd::register(Arc::clone(vm.vm()), u32::from(config.gsi))?;
    let dup = |fd: &EventFd| {
        fd.try_clone().map_err(|source| KvmError::Ioctl {
            op: "dup eventfd",
            source,
        })
    };
    let device = Arc::new(match path.path {
        Path::UserSpace => {
            IntxDevice::with_options(backend, dup(irqfd.trigger())?, IntxOptions::default())?
        }
        Path::KernelBypass => IntxDevice::with_kernel_bypass(
            backend,
            dup(irqfd.trigger())?,
            dup(irqfd.resample())?,
            IntxOptions::default(),
        )?,
    });
    let control = Arc::new(VmControl::default());
    let chipset = Arc::new(Chipset {
        device: Arc::clone(&device),
        side: Arc::clone(&side),
        bypass: path.path == Path::KernelBypass,
        status_clear: AtomicU64::new(0),
        resample_before_eoi: AtomicU64::new(0),
    });
    let stop_worker = EventFd::new(EFD_NONBLOCK).map_err(|source| KvmError::Ioctl {
        op: "eventfd",
        source,
    })?;

    let result = thread::scope(|s| {
        let worker = s.spawn(|| {
            let resample = (path.path == Path::UserSpace).then(|| irqfd.resample());
            run_worker(&device, resample, &stop_worker)
        });
        let vcpu = {
            let chipset = Arc::clone(&chipset);
            let control = Arc::clone(&control);
            s.spawn(move || vm.run(config.devfn, &*chipset, &control))
        };
        let driven = drive(&config, &*side, &control, &device);
        // Stop the guest at its next interrupt, then the worker.
        control.request_stop();
        let _ = irqfd.trigger().write(1);
        let vcpu_result = vcpu.join();
        let _ = stop_worker.write(1);
        let worker_result = worker.join();
        match (vcpu_result, worker_result) {
            (Ok(Ok(())), Ok(Ok(()))) => driven,
            (Ok(Err(e)), _) => Err(AssignError::Kvm(e)),
            (_, Ok(Err(e))) => Err(AssignError::Thread(crate::error_chain(&e))),
            _ => Err(AssignError::Thread("a thread panicked".into())),
        }
    });
    let latencies = result?;
    Ok(AssignmentReport {
        path,
        raised: config.interrupts,
        acked: control.acked(),
        empty_isr_runs: control.empty_isr_runs(),
        status_clear_in_isr: chipset.status_clear.load(Ordering::SeqCst),
        resample_before_eoi: chipset.resample_before_eoi.load(Ordering::SeqCst),
        latencies,
        stats: device.stats(),
    })
}

fn drive<B: PciBackend>(
    config: &AssignmentConfig,
    side: &dyn DeviceSide,
    control: &VmControl,
    device: &IntxDevice<B>,
) -> Result<Vec<Duration>, AssignError> {
    let deadline = Instant::now() + config.timeout;
    while !control.ready() {
        if Instant::now() > deadline {
            return Err(AssignError::Thread("the guest did not come up".into()));
        }
        thread::sleep(Duration::from_millis(1));
    }
    let mut latencies = Vec::with_capacity(config.interrupts as usize);
    let mut raised = 0;
    while raised < config.interrupts {
        let burst =
            config.burst != 0 && raised % config.burst == 0 && raised + 2 <= config.interrupts;
        let n = if burst { 2 } else { 1 };
        let target = control.acked() + n;
        let start = Instant::now();
        for _ in 0..n {
            side.raise();
        }
        raised += n;
        let deadline = start + config.timeout;
        while control.acked() < target {
            if Instant::now() > deadline {
                return Err(AssignError::Stalled {
                    index: raised,
                    total: config.interrupts,
                    timeout: config.timeout,
                    raised,
                    acked: control.acked(),
                    line: device.line_state(),
                });
            }
            std::hint::spin_loop();
        }
        latencies.push(start.elapsed());
    }
    latencies.sort();
    Ok(latencies)
}
