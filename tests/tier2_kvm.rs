//! Tier 2: real KVM (/dev/kvm). A tiny real-mode guest receives the
//! simulated device's INTx through a KVM irqfd, reads its STATUS through
//! config cycles that go through the engine, acks it and EOIs the PIC; KVM
//! signals the resample eventfd.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::path::Path as FsPath;
use std::sync::Arc;

use vfio_intx::kvm::assign::{run_assignment, AssignmentConfig, DeviceSide};
use vfio_intx::kvm::{Path, PathPolicy};
use vfio_intx::sim::SimDevice;

fn kvm_available(test: &str) -> bool {
    if FsPath::new("/dev/kvm").exists() {
        return true;
    }
    eprintln!("SKIP {test}: /dev/kvm is absent on this machine (tier 2 needs real KVM)");
    false
}

struct SimSide(SimDevice);

impl DeviceSide for SimSide {
    fn raise(&self) {
        self.0.raise();
    }
    fn ack(&self) -> bool {
        self.0.ack()
    }
}

#[test]
fn user_space_path_delivers_each_of_1000_interrupts_once_with_resample_after_eoi() {
    if !kvm_available("user_space_path") {
        return;
    }
    let sim = SimDevice::builder().build();
    let report = run_assignment(
        sim.backend(),
        false,
        Arc::new(SimSide(sim.clone())),
        AssignmentConfig {
            interrupts: 1000,
            burst: 7,
            policy: PathPolicy::Auto,
            ..AssignmentConfig::default()
        },
    )
    .unwrap();
    println!(
        "user-space path ({}): p50 {:?} p99 {:?}, stats {:?}",
        report.path,
        report.latency(0.5),
        report.latency(0.99),
        report.stats
    );
    assert_eq!(report.path.path, Path::UserSpace);
    assert_eq!(report.acked, 1000);
    assert_eq!(report.empty_isr_runs, 0);
    assert_eq!(
        report.status_clear_in_isr, 0,
        "ISR saw the device not asserting"
    );
    assert_eq!(
        report.resample_before_eoi, 0,
        "resample arrived before the guest's EOI"
    );
    assert_eq!(sim.snapshot().acked, 1000);
    assert_eq!(sim.snapshot().pending, 0);
    assert_eq!(report.stats.errors, 0);
}
