//! The 2011 reproducer on the simulated device: reset threads looping while
//! interrupts flow and the guest writes COMMAND. Shared by `vfio-intx demo`
//! and the tests.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::intx::{IntxOptions, IntxStats, LineState};
use crate::pci::regs::{COMMAND_INTX_DISABLE, COMMAND_MASTER, COMMAND_MEMORY, PCI_COMMAND};
use crate::pci::Width;
use crate::sim::rig::{RigError, SimRig};
use crate::sim::{SimDevice, SimKernel};

/// What to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct StressConfig {
    /// Interrupts the device raises.
    pub interrupts: u64,
    /// Threads looping resets through the engine.
    pub reset_threads: usize,
    /// Resets each thread performs.
    pub resets_per_thread: u64,
    /// Guest COMMAND writes (every fourth one sets the guest's INTX_DISABLE,
    /// the next clears it).
    pub config_writes: u64,
    /// Reset window of the simulated device.
    pub reset_window: Duration,
    /// How long to wait for the last interrupt to be delivered.
    pub timeout: Duration,
    /// The host driver the simulated device sits behind.
    pub kernel: SimKernel,
}

with_setters!(StressConfig {
    interrupts: u64 => with_interrupts,
    reset_threads: usize => with_reset_threads,
    resets_per_thread: u64 => with_resets_per_thread,
    config_writes: u64 => with_config_writes,
    reset_window: Duration => with_reset_window,
    timeout: Duration => with_timeout,
    kernel: SimKernel => with_kernel,
});

impl Default for StressConfig {
    fn default() -> Self {
        Self {
            interrupts: 2000,
            reset_threads: 2,
            resets_per_thread: 100,
            config_writes: 400,
            reset_window: Duration::from_micros(50),
            timeout: Duration::from_secs(30),
            kernel: SimKernel::Bare,
        }
    }
}

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StressReport {
    /// Interrupts raised by the device.
    pub raised: u64,
    /// Interrupts the guest handled.
    pub delivered: u64,
    /// Resets that completed.
    pub resets_ok: u64,
    /// Resets that returned an error.
    pub resets_failed: u64,
    /// Guest config writes that returned an error.
    pub config_errors: u64,
    /// Injections while the guest's line was already asserted.
    pub double_injections: u64,
    /// Whether the device's INTX_DISABLE is set at the end.
    pub masked_at_end: bool,
    /// The engine's line state at the end.
    pub line_at_end: LineState,
    /// The device's COMMAND at the end.
    pub device_command: u16,
    /// The guest's last COMMAND write.
    pub guest_command: u16,
    /// The engine's counters.
    pub stats: IntxStats,
    /// Wall time.
    pub elapsed: Duration,
}

impl StressReport {
    /// Whether the run upheld every promise: every interrupt delivered once,
    /// no error, no line left masked, and COMMAND as the guest wrote it.
    pub fn passed(&self) -> bool {
        self.delivered == self.raised
            && self.resets_failed == 0
            && self.config_errors == 0
            && self.double_injections == 0
            && !self.masked_at_end
            && self.line_at_end == LineState::Idle
            && self.device_command == self.guest_command
    }
}

/// Runs the reproducer.
pub fn run(config: StressConfig) -> Result<StressReport, RigError> {
    let sim = SimDevice::builder()
        .reset_window(config.reset_window)
        .kernel(config.kernel)
        .build();
    let rig = SimRig::start(sim, IntxOptions::default())?;
    let started = Instant::now();
    let resets_ok = AtomicU64::new(0);
    let resets_failed = AtomicU64::new(0);
    let config_errors = AtomicU64::new(0);
    let last_guest_command = AtomicU64::new(0);
    let raising = AtomicBool::new(true);

    thread::scope(|scope| {
        for _ in 0..config.reset_threads {
            scope.spawn(|| {
                for _ in 0..config.resets_per_thread {
                    match rig.device.reset() {
                        Ok(()) => resets_ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            tracing::warn!(error = %crate::error_chain(&e), "reset failed");
                            resets_failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            });
        }
        scope.spawn(|| {
            let mut command = COMMAND_MEMORY | COMMAND_MASTER;
            for i in 0..config.config_writes {
                command ^= COMMAND_MASTER;
                match i % 4 {
                    2 => command |= COMMAND_INTX_DISABLE,
                    3 => command &= !COMMAND_INTX_DISABLE,
                    _ => {}
                }
                if i + 1 == config.config_writes {
                    command &= !COMMAND_INTX_DISABLE;
                }
                match rig
                    .device
                    .guest_config_write(PCI_COMMAND, Width::Word, u32::from(command))
                {
                    Ok(()) => last_guest_command.store(u64::from(command), Ordering::SeqCst),
                    Err(_) => {
                        config_errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if raising.load(Ordering::Relaxed) {
                    thread::sleep(Duration::from_micros(100));
                }
            }
        });
        scope.spawn(|| {
            for i in 0..config.interrupts {
                rig.sim.raise();
                // Mostly one at a time, sometimes in bursts that arrive
                // before the previous EOI.
                if i % 16 != 0 {
                    thread::sleep(Duration::from_micros(20));
                }
            }
            raising.store(false, Ordering::Relaxed);
        });
    });

    rig.wait_delivered(config.interrupts, config.timeout);
    // Let the last EOI settle before judging the mask.
    let deadline = Instant::now() + Duration::from_secs(1);
    while rig.device.line_state() != LineState::Idle && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(1));
    }
    let snapshot = rig.sim.snapshot();
    Ok(StressReport {
        raised: snapshot.raised,
        delivered: rig.delivered(),
        resets_ok: resets_ok.into_inner(),
        resets_failed: resets_failed.into_inner(),
        config_errors: config_errors.into_inner(),
        double_injections: rig.double_injections(),
        masked_at_end: snapshot.command & COMMAND_INTX_DISABLE != 0,
        line_at_end: rig.device.line_state(),
        device_command: snapshot.command,
        // Only the low 16 bits were ever stored.
        guest_command: (last_guest_command.load(Ordering::SeqCst) & 0xffff) as u16,
        stats: rig.device.stats(),
        elapsed: started.elapsed(),
    })
}

/// The 2011 reproducer around the engine: resets it does not know about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ExternalResetConfig {
    /// The host driver the simulated device sits behind.
    pub kernel: SimKernel,
    /// Threads looping external resets (`echo 1 > .../reset`).
    pub reset_threads: usize,
    /// How long the reset loops run.
    pub duration: Duration,
    /// Reset window of the simulated device.
    pub reset_window: Duration,
    /// Pause between two interrupts raised by the device.
    pub raise_every: Duration,
    /// The engine's options (the watchdog among them).
    pub options: IntxOptions,
    /// How long to wait for delivery after the last reset.
    pub recovery_timeout: Duration,
}

with_setters!(ExternalResetConfig {
    kernel: SimKernel => with_kernel,
    reset_threads: usize => with_reset_threads,
    duration: Duration => with_duration,
    reset_window: Duration => with_reset_window,
    raise_every: Duration => with_raise_every,
    options: IntxOptions => with_options,
    recovery_timeout: Duration => with_recovery_timeout,
});

impl Default for ExternalResetConfig {
    fn default() -> Self {
        Self {
            kernel: SimKernel::VfioPci,
            reset_threads: 2,
            duration: Duration::from_secs(1),
            reset_window: Duration::from_micros(500),
            raise_every: Duration::from_micros(200),
            options: IntxOptions::default(),
            recovery_timeout: Duration::from_secs(2),
        }
    }
}

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExternalResetReport {
    /// Interrupts raised by the device.
    pub raised: u64,
    /// Interrupts the guest handled.
    pub delivered: u64,
    /// External resets performed.
    pub resets: u64,
    /// Time from the end of the last reset until every interrupt was
    /// delivered (`None`: not within the recovery timeout — the line is
    /// stuck).
    pub recovered_after: Option<Duration>,
    /// Whether the device's INTX_DISABLE was set at the end.
    pub masked_at_end: bool,
    /// The engine's counters (detections, re-syncs, mid-reset events).
    pub stats: IntxStats,
}

/// Runs interrupts through the engine while threads reset the device behind
/// its back, then measures how long delivery takes to recover.
pub fn run_external_resets(config: ExternalResetConfig) -> Result<ExternalResetReport, RigError> {
    let sim = SimDevice::builder()
        .reset_window(config.reset_window)
        .kernel(config.kernel)
        .build();
    let rig = SimRig::start(sim, config.options)?;
    let resetting = AtomicBool::new(true);
    let resets = AtomicU64::new(0);
    thread::scope(|scope| {
        for _ in 0..config.reset_threads {
            scope.spawn(|| {
                while resetting.load(Ordering::SeqCst) {
                    if rig.sim.external_reset().is_ok() {
                        resets.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        let start = Instant::now();
        while start.elapsed() < config.duration {
            rig.sim.raise();
            thread::sleep(config.raise_every);
        }
        resetting.store(false, Ordering::SeqCst);
    });
    // The reset threads are joined: the last reset has ended.
    let quiet = Instant::now();
    let raised = rig.sim.snapshot().raised;
    let recovered = rig.wait_delivered(raised, config.recovery_timeout);
    let recovered_after = recovered.then(|| quiet.elapsed());
    // Let the last EOI settle before judging the mask.
    let deadline = Instant::now() + Duration::from_millis(200);
    while rig.device.line_state() != LineState::Idle && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(1));
    }
    let snapshot = rig.sim.snapshot();
    Ok(ExternalResetReport {
        raised,
        delivered: rig.delivered(),
        resets: resets.into_inner(),
        recovered_after,
        masked_at_end: snapshot.command & COMMAND_INTX_DISABLE != 0,
        stats: rig.device.stats(),
    })
}
