//! The seed reproducer on the simulated device: 2, 4 and 8 threads looping
//! resets while interrupts flow and the guest writes COMMAND.

use std::time::Duration;

use vfio_intx::sim::stress::{run, StressConfig};
use vfio_intx::sim::SimKernel;

fn reproducer(reset_threads: usize) {
    for kernel in [SimKernel::Bare, SimKernel::VfioPci] {
        reproducer_on(reset_threads, kernel);
    }
}

fn reproducer_on(reset_threads: usize, kernel: SimKernel) {
    let report = run(StressConfig::default()
        .with_kernel(kernel)
        .with_interrupts(3000)
        .with_reset_threads(reset_threads)
        .with_resets_per_thread(150)
        .with_config_writes(400)
        .with_reset_window(Duration::from_micros(50))
        .with_timeout(Duration::from_secs(60)))
    .unwrap();
    println!("{reset_threads} reset threads, {kernel:?}: {report:?}");
    assert_eq!(report.delivered, report.raised, "interrupts lost");
    assert_eq!(report.resets_ok, 150 * reset_threads as u64);
    assert_eq!(report.resets_failed, 0);
    assert_eq!(report.config_errors, 0);
    assert_eq!(report.double_injections, 0);
    assert!(!report.masked_at_end, "line left masked");
    assert_eq!(
        report.device_command, report.guest_command,
        "COMMAND is not what the guest last wrote"
    );
    assert!(report.passed());
}

#[test]
fn two_parallel_reset_loops_lose_nothing() {
    reproducer(2);
}

#[test]
fn four_parallel_reset_loops_lose_nothing() {
    reproducer(4);
}

#[test]
fn eight_parallel_reset_loops_lose_nothing() {
    reproducer(8);
}
