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
    /// Raises again an interrupt the device still holds pending in its own
    /// status but no longer asserts on its line: a reset lowered the line
    /// (QEMU's edu keeps its status across a reset, and nothing raises the
    /// line again). Returns whether one was pending. The default is for
    /// devices that never lose a raise.
    fn raise_lost(&self) -> bool {
        false
    }
}

/// What to run.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
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
    /// How long to wait for one interrupt (without any progress, a
    /// re-raise counting as progress) before giving up.
    pub timeout: Duration,
    /// How often the driver loop checks, while an interrupt is overdue,
    /// whether the device lost it (see [`DeviceSide::raise_lost`]); it is
    /// raised again after two such checks in a row found it lost.
    pub lost_check: Duration,
}

with_setters!(AssignmentConfig {
    gsi: u8 => with_gsi,
    devfn: u8 => with_devfn,
    interrupts: u64 => with_interrupts,
    burst: u64 => with_burst,
    policy: PathPolicy => with_policy,
    timeout: Duration => with_timeout,
    lost_check: Duration => with_lost_check,
});

impl Default for AssignmentConfig {
    fn default() -> Self {
        Self {
            gsi: 5,
            devfn: 3 << 3,
            interrupts: 1000,
            burst: 0,
            policy: PathPolicy::Auto,
            timeout: Duration::from_secs(10),
            lost_check: Duration::from_millis(20),
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
    /// Interrupts the device lost (a reset outside the engine lowered its
    /// line over a pending status: nothing left masked, nothing in flight)
    /// that the driver loop raised again.
    pub reraised: u64,
    /// Raise-to-ISR-ack latency of each interrupt, sorted.
    pub latencies: Vec<Duration>,
    /// The engine's counters (on the bypass path its per-interrupt counters
    /// stay zero: no user-space work per interrupt).
    pub stats: IntxStats,
}

impl AssignmentReport {
    /// Whether the run saw resets outside the engine: an interrupt the
    /// device lost and the driver loop raised again, a line the watchdog
    /// found stuck, or an event that found the device mid-reset.
    pub fn saw_outside_resets(&self) -> bool {
        self.reraised > 0 || self.stats.stuck_detections > 0 || self.stats.mid_reset_events > 0
    }

    /// What the run broke, empty if nothing: an interrupt not acknowledged
    /// (or more acknowledged than raised and re-raised), a resample before
    /// the guest's EOI, or ISR runs that found the device
    /// not asserting or nothing to acknowledge. The last two are failures
    /// only in a run without outside resets: a reset that lowers the line
    /// between the injection and the ISR's read, or drops the ISR's
    /// acknowledgement, causes them without anything being wrong, and they
    /// are then only reported (see [`saw_outside_resets`](Self::saw_outside_resets)).
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        // A re-raise of an interrupt that was only slow (its ISR stalled
        // between the device's acknowledgement and counting it) is a second
        // real interrupt of the device: acknowledged too, and no loss.
        if self.acked < self.raised || self.acked > self.raised + self.reraised {
            problems.push(format!(
                "{} of {} interrupts acknowledged ({} re-raised)",
                self.acked, self.raised, self.reraised
            ));
        }
        if self.resample_before_eoi > 0 {
            problems.push(format!("{} resamples before EOI", self.resample_before_eoi));
        }
        if !self.saw_outside_resets() {
            if self.status_clear_in_isr > 0 {
                problems.push(format!(
                    "{} ISR reads without STATUS.INTERRUPT",
                    self.status_clear_in_isr
                ));
            }
            if self.empty_isr_runs > 0 {
                problems.push(format!(
                    "{} ISR runs with nothing to acknowledge",
                    self.empty_isr_runs
                ));
            }
        }
        problems
    }

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
#[non_exhaustive]
pub enum AssignError {
    /// KVM refused something.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// The engine refused the device.
    #[error(transparent)]
    Intx(#[from] IntxError),
    /// The guest stopped receiving interrupts.
    #[error("interrupt {index} of {total} did not reach the guest within {timeout:?} (raised {raised}, acked {acked}; {state})")]
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
        /// The guest PIC's and the engine's state then.
        state: String,
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

/// A running assignment: the test VM's vCPU thread and the engine's worker
/// thread, around one engine. Stop it with [`finish`](Self::finish).
pub struct Assignment<B: PciBackend + 'static> {
    /// The engine.
    pub device: Arc<IntxDevice<B>>,
    /// The guest's counters and controls.
    pub control: Arc<VmControl>,
    /// The EOI path and why.
    pub path: PathChoice,
    chipset: Arc<Chipset<B>>,
    /// Kept registered for as long as the assignment runs.
    _irqfd: ResampleIrqfd,
    stop_worker: Arc<EventFd>,
    vm: Arc<kvm_ioctls::VmFd>,
    vcpu: Option<thread::JoinHandle<Result<(), KvmError>>>,
    worker: Option<thread::JoinHandle<Result<(), crate::intx::WorkerError>>>,
}

impl<B: PciBackend + 'static> Assignment<B> {
    /// Creates the VM, wires the device on the path `policy` allows, and
    /// starts the vCPU and worker threads; returns once the guest is ready.
    /// The engine runs with default options.
    pub fn start(
        backend: B,
        side: Arc<dyn DeviceSide>,
        gsi: u8,
        devfn: u8,
        policy: PathPolicy,
    ) -> Result<Self, AssignError> {
        Self::start_full(
            backend,
            side,
            (gsi, devfn, policy),
            IntxOptions::default(),
            None,
        )
    }

    /// [`start`](Self::start) with the engine's options (e.g. its watchdog).
    pub fn start_with_options(
        backend: B,
        side: Arc<dyn DeviceSide>,
        gsi: u8,
        devfn: u8,
        policy: PathPolicy,
        options: IntxOptions,
    ) -> Result<Self, AssignError> {
        Self::start_full(backend, side, (gsi, devfn, policy), options, None)
    }

    /// [`start`](Self::start), with guest RAM DMA-mapped into a VFIO
    /// container first, as a real VMM does for an assigned device.
    pub fn start_with_dma(
        backend: B,
        side: Arc<dyn DeviceSide>,
        gsi: u8,
        devfn: u8,
        policy: PathPolicy,
        dma: Option<Arc<vfio_ioctls::VfioContainer>>,
    ) -> Result<Self, AssignError> {
        Self::start_full(
            backend,
            side,
            (gsi, devfn, policy),
            IntxOptions::default(),
            dma,
        )
    }

    fn start_full(
        backend: B,
        side: Arc<dyn DeviceSide>,
        (gsi, devfn, policy): (u8, u8, PathPolicy),
        options: IntxOptions,
        dma: Option<Arc<vfio_ioctls::VfioContainer>>,
    ) -> Result<Self, AssignError> {
        let kvm = Kvm::new().map_err(|e| KvmError::Ioctl {
            op: "opening /dev/kvm",
            source: std::io::Error::from_raw_os_error(e.errno()),
        })?;
        let caps = KvmCaps::probe(&kvm);
        // Before any vCPU thread exists, so a kick can never find the
        // signal's default action (terminate) in place.
        crate::kvm::testvm::install_kick_handler()?;
        let mut vm = TinyVm::new(gsi, devfn, Irqchip::Full)?;
        if let Some(container) = dma {
            vm.dma_map(container)?;
        }
        let path = choose_path(policy, caps, vm.irqchip(), backend.capabilities())?;
        let irqfd = ResampleIrqfd::register(Arc::clone(vm.vm()), u32::from(gsi))?;
        let vm_fd = Arc::clone(vm.vm());
        let dup = |fd: &EventFd| {
            fd.try_clone().map_err(|source| KvmError::Ioctl {
                op: "dup eventfd",
                source,
            })
        };
        let device = Arc::new(match path.path {
            Path::UserSpace => IntxDevice::with_options(backend, dup(irqfd.trigger())?, options)?,
            Path::KernelBypass => IntxDevice::with_kernel_bypass(
                backend,
                dup(irqfd.trigger())?,
                dup(irqfd.resample())?,
                options,
            )?,
        });
        let control = Arc::new(VmControl::default());
        let chipset = Arc::new(Chipset {
            device: Arc::clone(&device),
            side,
            bypass: path.path == Path::KernelBypass,
            status_clear: AtomicU64::new(0),
            resample_before_eoi: AtomicU64::new(0),
        });
        let stop_worker =
            Arc::new(
                EventFd::new(EFD_NONBLOCK).map_err(|source| KvmError::Ioctl {
                    op: "eventfd",
                    source,
                })?,
            );
        let spawn_error =
            |e: std::io::Error| AssignError::Thread(format!("spawning a thread: {e}"));
        let worker = {
            let device = Arc::clone(&device);
            let resample = match path.path {
                Path::UserSpace => Some(dup(irqfd.resample())?),
                Path::KernelBypass => None,
            };
            let stop = Arc::clone(&stop_worker);
            thread::Builder::new()
                .name("intx-worker".into())
                .spawn(move || run_worker(&device, resample.as_ref(), &stop))
                .map_err(spawn_error)?
        };
        let vcpu = {
            let chipset = Arc::clone(&chipset);
            let control = Arc::clone(&control);
            thread::Builder::new()
                .name("vcpu0".into())
                .spawn(move || vm.run(devfn, &*chipset, &control))
                .map_err(spawn_error)?
        };
        let mut this = Self {
            device,
            control,
            path,
            chipset,
            _irqfd: irqfd,
            stop_worker,
            vm: vm_fd,
            vcpu: Some(vcpu),
            worker: Some(worker),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !this.control.ready() {
            if Instant::now() > deadline || this.vcpu.as_ref().is_some_and(|t| t.is_finished()) {
                let _ = this.stop();
                return Err(AssignError::Thread("the guest did not come up".into()));
            }
            thread::sleep(Duration::from_millis(1));
        }
        Ok(this)
    }

    /// Waits until the guest has acknowledged `count` interrupts in all.
    pub fn wait_acked(&self, count: u64, timeout: Duration) -> Result<(), AssignError> {
        let deadline = Instant::now() + timeout;
        while self.control.acked() < count {
            if Instant::now() > deadline {
                return Err(AssignError::Stalled {
                    index: count,
                    total: count,
                    timeout,
                    raised: count,
                    acked: self.control.acked(),
                    state: self.diagnose(),
                });
            }
            std::hint::spin_loop();
        }
        Ok(())
    }

    /// The VM, e.g. to wire another interrupt source on the device's GSI.
    pub fn vm(&self) -> &Arc<kvm_ioctls::VmFd> {
        &self.vm
    }

    /// ISR config reads that did not see STATUS.INTERRUPT set.
    pub fn status_clear_in_isr(&self) -> u64 {
        self.chipset.status_clear.load(Ordering::SeqCst)
    }

    /// ISR config reads that found the EOI already processed.
    pub fn resample_before_eoi(&self) -> u64 {
        self.chipset.resample_before_eoi.load(Ordering::SeqCst)
    }

    /// The guest's interrupt controller and the engine's view, for a
    /// diagnosis when interrupts stop arriving.
    pub fn diagnose(&self) -> String {
        format!(
            "{}engine line {:?}, stats {:?}; guest ISR runs {}, acked {}",
            crate::kvm::testvm::pic_state(&self.vm),
            self.device.line_state(),
            self.device.stats(),
            self.control.isr_runs(),
            self.control.acked()
        )
    }

    fn stop(&mut self) -> Result<(), AssignError> {
        // Kick the vCPU out of KVM_RUN until its loop sees the request.
        self.control.request_stop();
        if let Some(vcpu) = &self.vcpu {
            if !crate::kvm::testvm::kick_until_finished(vcpu, Duration::from_secs(5)) {
                return Err(AssignError::Thread(format!(
                    "the vCPU thread does not stop: {}",
                    self.diagnose()
                )));
            }
        }
        let vcpu = self.vcpu.take().map(|t| t.join());
        let _ = self.stop_worker.write(1);
        let worker = self.worker.take().map(|t| t.join());
        match (vcpu, worker) {
            (Some(Err(_)), _) | (_, Some(Err(_))) => {
                Err(AssignError::Thread("a thread panicked".into()))
            }
            (Some(Ok(Err(e))), _) => Err(AssignError::Kvm(e)),
            (_, Some(Ok(Err(e)))) => Err(AssignError::Thread(crate::error_chain(&e))),
            _ => Ok(()),
        }
    }

    /// Stops the guest and the worker.
    pub fn finish(mut self) -> Result<(), AssignError> {
        self.stop()
    }
}

impl<B: PciBackend + 'static> Drop for Assignment<B> {
    fn drop(&mut self) {
        if self.vcpu.is_some() || self.worker.is_some() {
            let _ = self.stop();
        }
    }
}

/// Assigns `backend` to a tiny KVM guest on the chosen path and raises
/// `config.interrupts` interrupts through `side`, one after another (with
/// bursts that arrive before the EOI), each delivered to and acknowledged by
/// the guest's ISR.
pub fn run_assignment<B: PciBackend + 'static>(
    backend: B,
    side: Arc<dyn DeviceSide>,
    config: AssignmentConfig,
) -> Result<AssignmentReport, AssignError> {
    run_assignment_with_dma(backend, side, config, None)
}

/// [`run_assignment`] with guest RAM DMA-mapped into a VFIO container.
pub fn run_assignment_with_dma<B: PciBackend + 'static>(
    backend: B,
    side: Arc<dyn DeviceSide>,
    config: AssignmentConfig,
    dma: Option<Arc<vfio_ioctls::VfioContainer>>,
) -> Result<AssignmentReport, AssignError> {
    let run = Assignment::start_with_dma(
        backend,
        Arc::clone(&side),
        config.gsi,
        config.devfn,
        config.policy,
        dma,
    )?;
    let driven = drive(&config, &*side, &run);
    let report = driven.map(|(latencies, reraised)| AssignmentReport {
        path: run.path,
        raised: config.interrupts,
        acked: run.control.acked(),
        empty_isr_runs: run.control.empty_isr_runs(),
        status_clear_in_isr: run.status_clear_in_isr(),
        resample_before_eoi: run.resample_before_eoi(),
        reraised,
        latencies,
        stats: run.device.stats(),
    });
    run.finish()?;
    report
}

/// Raises the interrupts one after another (bursts of two every
/// `config.burst`), waiting for the guest to acknowledge each. An overdue
/// interrupt the device lost is raised again (see [`LostCheck`]); gives up
/// only after `config.timeout` without progress. Returns the latencies and
/// the number of re-raised interrupts.
fn drive<B: PciBackend + 'static>(
    config: &AssignmentConfig,
    side: &dyn DeviceSide,
    run: &Assignment<B>,
) -> Result<(Vec<Duration>, u64), AssignError> {
    let control = &run.control;
    let mut latencies = Vec::with_capacity(config.interrupts as usize);
    let mut raised = 0;
    let mut reraised = 0;
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
        let mut deadline = start + config.timeout;
        let mut lost = LostCheck::new(start, config.lost_check);
        while control.acked() < target {
            let now = Instant::now();
            if now > deadline {
                return Err(AssignError::Stalled {
                    index: raised,
                    total: config.interrupts,
                    timeout: config.timeout,
                    raised,
                    acked: control.acked(),
                    state: format!("{}; re-raised {reraised}", run.diagnose()),
                });
            }
            if lost.due(now) && lost.confirmed(run) && side.raise_lost() {
                reraised += 1;
                deadline = now + config.timeout;
            }
            std::hint::spin_loop();
        }
        latencies.push(start.elapsed());
    }
    latencies.sort();
    Ok((latencies, reraised))
}

/// Tells an interrupt the device lost from one still on its way, the way
/// the tier-3 watchdog tests do for edu's reset quirk: the guest stayed
/// idle (no ISR run, no ack) over a whole check interval, and then the
/// engine has nothing in flight and the device's STATUS.INTERRUPT is clear
/// (its line is low: nothing for the host or the guest to take). The
/// device is looked at (through the gate) only once the guest was seen
/// idle, so that an interrupt merely slow to arrive costs no gate traffic.
/// A line left masked reads STATUS.INTERRUPT set and is never taken for
/// lost: that is the engine's to recover, and the loop's timeout reports
/// it.
struct LostCheck {
    next: Instant,
    every: Duration,
    candidate: Option<(u64, u64)>,
}

impl LostCheck {
    fn new(start: Instant, every: Duration) -> Self {
        Self {
            next: start + every,
            every,
            candidate: None,
        }
    }

    fn due(&mut self, now: Instant) -> bool {
        if now < self.next {
            return false;
        }
        self.next = now + self.every;
        true
    }

    fn confirmed<B: PciBackend + 'static>(&mut self, run: &Assignment<B>) -> bool {
        let guest = (run.control.isr_runs(), run.control.acked());
        if self.candidate != Some(guest) {
            self.candidate = Some(guest);
            return false;
        }
        self.candidate = None;
        run.device.line_state() == LineState::Idle
            && run.device.command_status().is_ok_and(|cs| !cs.asserting())
    }
}
