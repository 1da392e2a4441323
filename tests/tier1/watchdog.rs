//! Resets the engine did not start (the 2011 reproducer around the gate):
//! the stuck-INTx watchdog detects and recovers the line.

use std::time::Duration;

use vfio_intx::intx::{IntxOptions, WatchdogOptions};
use vfio_intx::sim::stress::{run_external_resets, ExternalResetConfig};
use vfio_intx::sim::SimKernel;

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
