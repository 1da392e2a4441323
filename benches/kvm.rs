//! KVM benchmarks on /dev/kvm: the interrupt round trip (raise -> guest ISR
//! -> EOI -> ready for the next) on the user-space EOI path vs the kernel
//! bypass, on the same kind of guest in the same run, and the user-space
//! wakeups per interrupt on the bypass.
//!
//! Run with `cargo bench --bench kvm`. Figures are printed, not asserted.
//! The device is the simulated vfio-pci model (its unmask eventfd is served
//! by a thread, standing in for the kernel's virqfd); the runs alternate
//! between the two paths so that both see the same machine load.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use vfio_intx::kvm::assign::{run_assignment, AssignmentConfig, DeviceSide};
use vfio_intx::kvm::{Path, PathPolicy};
use vfio_intx::sim::{SimDevice, SimKernel};

struct Side(SimDevice);

impl DeviceSide for Side {
    fn raise(&self) {
        self.0.raise();
    }
    fn ack(&self) -> bool {
        self.0.ack()
    }
}

const INTERRUPTS: u64 = 2000;
const RUNS: usize = 5;

fn run(policy: PathPolicy) -> (Vec<Duration>, u64) {
    let sim = SimDevice::builder().kernel(SimKernel::VfioPci).build();
    let report = run_assignment(
        sim.backend(),
        Arc::new(Side(sim.clone())),
        AssignmentConfig::default()
            .with_interrupts(INTERRUPTS)
            .with_policy(policy),
    )
    .unwrap();
    assert_eq!(report.acked, INTERRUPTS);
    let expected = if policy == PathPolicy::Fast {
        Path::KernelBypass
    } else {
        Path::UserSpace
    };
    assert_eq!(report.path.path, expected);
    let wakeups = report.stats.host_interrupts + report.stats.eois;
    (report.latencies, wakeups)
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn main() -> ExitCode {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("SKIP kvm benchmarks: /dev/kvm is absent on this machine");
        return ExitCode::SUCCESS;
    }
    let mut bypass = Vec::new();
    let mut user = Vec::new();
    let mut bypass_wakeups = 0;
    let mut user_wakeups = 0;
    for _ in 0..RUNS {
        let (l, w) = run(PathPolicy::Fast);
        bypass.extend(l);
        bypass_wakeups += w;
        let (l, w) = run(PathPolicy::UserSpace);
        user.extend(l);
        user_wakeups += w;
    }
    bypass.sort();
    user.sort();
    let total = (RUNS as u64 * INTERRUPTS) as f64;
    println!("vfio-intx KVM benchmarks on /dev/kvm ({RUNS} runs x {INTERRUPTS} interrupts per path, alternating)");
    println!("round trip (raise -> guest ISR ack), simulated device, tiny real-mode guest with the 8259 PIC:");
    for (name, l) in [("kernel bypass", &bypass), ("user-space EOI", &user)] {
        println!(
            "  {name:<15} p50 {:>8.1} us   p90 {:>8.1} us   p99 {:>8.1} us",
            quantile(l, 0.5).as_secs_f64() * 1e6,
            quantile(l, 0.9).as_secs_f64() * 1e6,
            quantile(l, 0.99).as_secs_f64() * 1e6,
        );
    }
    let ratio = quantile(&user, 0.5).as_secs_f64() / quantile(&bypass, 0.5).as_secs_f64();
    println!(
        "  user-space / bypass (p50): {ratio:.2}x   target <= 1.25x: {}",
        if ratio <= 1.25 { "met" } else { "NOT met" }
    );
    println!(
        "user-space wakeups per interrupt: bypass {:.3} (target 0), user-space path {:.3}",
        bypass_wakeups as f64 / total,
        user_wakeups as f64 / total
    );
    ExitCode::SUCCESS
}
