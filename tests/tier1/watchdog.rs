//! Resets the engine did not start (the 2011 reproducer around the gate):
//! the stuck-INTx watchdog detects and recovers the line.

use std::thread;
use std::time::{Duration, Instant};

use vfio_intx::intx::{IntxOptions, Tick, WatchdogOptions};
use vfio_intx::sim::stress::{run_external_resets, ExternalResetConfig};
use vfio_intx::sim::{Fault, SimDevice, SimKernel, SimOp};

use crate::Stepper;

fn options(enabled: bool) -> IntxOptions {
    IntxOptions {
        watchdog: WatchdogOptions {
            enabled,
            ..WatchdogOptions::default()
        },
        ..IntxOptions::default()
    }
}

#[test]
fn without_the_watchdog_external_resets_leave_the_vfio_line_stuck() {
    // Proof that the test below can fail: the kernel's behaviour, modelled
    // by the simulated vfio-pci, strands the line.
    let mut stuck_runs = 0;
    for _ in 0..3 {
        let report = run_external_resets(ExternalResetConfig {
            options: options(false),
            recovery_timeout: Duration::from_millis(500),
            ..ExternalResetConfig::default()
        })
        .unwrap();
        println!("watchdog off: {report:?}");
        if report.recovered_after.is_none() {
            stuck_runs += 1;
            assert!(report.delivered < report.raised);
            assert_eq!(report.stats.resyncs, 0);
        }
    }
    assert!(
        stuck_runs > 0,
        "two external reset loops never stranded the line"
    );
}

#[test]
fn the_watchdog_recovers_delivery_after_external_resets_on_both_kernels() {
    for kernel in [SimKernel::VfioPci, SimKernel::Bare] {
        for _ in 0..3 {
            let report = run_external_resets(ExternalResetConfig {
                kernel,
                options: options(true),
                ..ExternalResetConfig::default()
            })
            .unwrap();
            println!("watchdog on, {kernel:?}: {report:?}");
            let recovered = report
                .recovered_after
                .unwrap_or_else(|| panic!("{kernel:?}: line stuck: {report:?}"));
            assert_eq!(report.delivered, report.raised);
            assert!(!report.masked_at_end, "{kernel:?}: line left masked");
            // Detection (50 ms) plus one re-sync, with room for a busy
            // machine.
            assert!(
                recovered < Duration::from_millis(500),
                "{kernel:?}: took {recovered:?}"
            );
        }
    }
}

/// Ticks of an engine whose interrupt path made no progress for longer than
/// `active_for` (as on the kernel bypass, where the engine sees no
/// interrupt, or while resets hold the device): a reset outside the engine
/// makes them frequent again, so that a line it strands is found within
/// `detect_after` and a tick or two, not at the next idle tick.
#[test]
fn a_reset_outside_the_engine_keeps_the_idle_watchdog_ticking_fast() {
    let opts = WatchdogOptions::default();
    let (fast, idle) = (opts.active_interval(), opts.idle_interval);

    // vfio-pci model: the tick's STATUS read waits for the reset.
    let sim = SimDevice::builder()
        .kernel(SimKernel::VfioPci)
        .reset_window(Duration::from_millis(30))
        .build();
    let t = Stepper::with_options(sim.clone(), options(true));
    let t0 = Instant::now();
    assert_eq!(t.dev.watchdog_tick(t0), (Tick::Quiet, fast));
    let idle_at = t0 + opts.active_for + Duration::from_millis(1);
    assert_eq!(t.dev.watchdog_tick(idle_at), (Tick::Quiet, idle));
    thread::scope(|s| {
        let reset = s.spawn(|| sim.external_reset());
        while !sim.snapshot().in_reset {
            assert!(!reset.is_finished(), "the reset ended before the tick");
            thread::yield_now();
        }
        let seen_at = idle_at + Duration::from_millis(1);
        assert_eq!(t.dev.watchdog_tick(seen_at), (Tick::Quiet, fast));
        reset.join().unwrap().unwrap();
        // Fast for `active_for` after the reset was seen, then idle again.
        let later = seen_at + opts.active_for / 2;
        assert_eq!(t.dev.watchdog_tick(later), (Tick::Quiet, fast));
        let much_later = seen_at + opts.active_for + Duration::from_millis(1);
        assert_eq!(t.dev.watchdog_tick(much_later), (Tick::Quiet, idle));
    });

    // Bare model: the device answers all-ones while in reset.
    let sim = SimDevice::builder().build();
    let t = Stepper::with_options(sim.clone(), options(true));
    let t0 = Instant::now();
    t.dev.watchdog_tick(t0);
    let idle_at = t0 + opts.active_for + Duration::from_millis(1);
    assert_eq!(t.dev.watchdog_tick(idle_at), (Tick::Quiet, idle));
    sim.inject_fault(SimOp::ConfigRead, Fault::AllOnes, 0, 1);
    let seen_at = idle_at + Duration::from_millis(1);
    assert_eq!(t.dev.watchdog_tick(seen_at), (Tick::Busy, fast));
    let later = seen_at + opts.active_for / 2;
    assert_eq!(t.dev.watchdog_tick(later), (Tick::Quiet, fast));
}
