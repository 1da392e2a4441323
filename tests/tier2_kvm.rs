//! Tier 2: real KVM (/dev/kvm). A tiny real-mode guest receives the
//! simulated device's INTx through a KVM irqfd, reads its STATUS through
//! config cycles that go through the engine, acks it and EOIs the PIC; KVM
//! signals the resample eventfd.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::path::Path as FsPath;
use std::sync::Arc;

use std::time::Duration;

use vfio_intx::kvm::assign::{run_assignment, Assignment, AssignmentConfig, DeviceSide};
use vfio_intx::kvm::testvm::TinyVm;
use vfio_intx::kvm::{
    choose_path, FallbackReason, Irqchip, KvmCaps, Path, PathPolicy, ResampleIrqfd,
};
use vfio_intx::pci::regs::*;
use vfio_intx::pci::Width;
use vfio_intx::sim::{SimBackend, SimDevice, SimKernel, SIM_PCIE_CAP};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

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

fn vfio_model() -> SimDevice {
    SimDevice::builder().kernel(SimKernel::VfioPci).build()
}

#[test]
fn kernel_bypass_delivers_each_of_1000_interrupts_once_with_no_user_space_wakeups() {
    if !kvm_available("kernel_bypass") {
        return;
    }
    let sim = vfio_model();
    let report = run_assignment(
        sim.backend(),
        true,
        Arc::new(SimSide(sim.clone())),
        AssignmentConfig {
            interrupts: 1000,
            burst: 7,
            policy: PathPolicy::Fast,
            ..AssignmentConfig::default()
        },
    )
    .unwrap();
    println!(
        "kernel bypass ({}): p50 {:?} p99 {:?}",
        report.path,
        report.latency(0.5),
        report.latency(0.99)
    );
    assert_eq!(report.path.path, Path::KernelBypass);
    assert_eq!(report.acked, 1000);
    assert_eq!(report.empty_isr_runs, 0);
    assert_eq!(report.status_clear_in_isr, 0);
    // Zero user-space wakeups per interrupt: the engine never ran.
    assert_eq!(report.stats.host_interrupts, 0);
    assert_eq!(report.stats.eois, 0);
    assert_eq!(report.stats.injected, 0);
    assert_eq!(sim.snapshot().pending, 0);
}

#[test]
fn user_space_path_on_the_vfio_model_delivers_each_interrupt_once() {
    if !kvm_available("user_space_on_vfio_model") {
        return;
    }
    let sim = vfio_model();
    let report = run_assignment(
        sim.backend(),
        true,
        Arc::new(SimSide(sim.clone())),
        AssignmentConfig {
            interrupts: 1000,
            burst: 5,
            policy: PathPolicy::UserSpace,
            ..AssignmentConfig::default()
        },
    )
    .unwrap();
    assert_eq!(report.path.fallback, Some(FallbackReason::Configured));
    assert_eq!(report.acked, 1000);
    assert_eq!(report.resample_before_eoi, 0);
    assert_eq!(report.status_clear_in_isr, 0);
}

fn start(sim: &SimDevice, bypass: bool) -> Assignment<SimBackend> {
    Assignment::start(
        sim.backend(),
        bypass,
        Arc::new(SimSide(sim.clone())),
        5,
        3 << 3,
        if bypass {
            PathPolicy::Fast
        } else {
            PathPolicy::UserSpace
        },
    )
    .unwrap()
}

#[test]
fn guest_intx_disable_holds_interrupts_until_the_guest_clears_it_on_both_paths() {
    if !kvm_available("guest_intx_disable") {
        return;
    }
    for (sim, bypass) in [
        (SimDevice::builder().build(), false),
        (vfio_model(), true),
        (vfio_model(), false),
    ] {
        let run = start(&sim, bypass);
        run.device
            .guest_config_write(PCI_COMMAND, Width::Word, u32::from(COMMAND_INTX_DISABLE))
            .unwrap();
        sim.raise();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            run.control.acked(),
            0,
            "delivered while the guest disabled INTx (bypass {bypass})"
        );
        let seen = run
            .device
            .guest_config_read(PCI_COMMAND, Width::Word)
            .unwrap();
        assert_ne!(seen & u32::from(COMMAND_INTX_DISABLE), 0);
        run.device
            .guest_config_write(PCI_COMMAND, Width::Word, 0)
            .unwrap();
        run.wait_acked(1, Duration::from_secs(5)).unwrap();
        sim.raise();
        run.wait_acked(2, Duration::from_secs(5)).unwrap();
        run.finish().unwrap();
        assert_eq!(sim.snapshot().pending, 0);
    }
}

#[test]
fn resets_and_guest_flr_mid_stream_lose_nothing_and_leave_the_line_unmasked() {
    if !kvm_available("resets_mid_stream") {
        return;
    }
    for (sim, bypass) in [
        (SimDevice::builder().build(), false),
        (vfio_model(), true),
        (vfio_model(), false),
    ] {
        let run = start(&sim, bypass);
        let devctl = SIM_PCIE_CAP + PCI_EXP_DEVCTL;
        std::thread::scope(|s| {
            s.spawn(|| {
                for i in 0..60 {
                    if i % 3 == 0 {
                        // A guest FLR, as a vCPU's config cycle would do it.
                        run.device
                            .guest_config_write(
                                devctl,
                                Width::Word,
                                u32::from(PCI_EXP_DEVCTL_BCR_FLR),
                            )
                            .unwrap();
                    } else {
                        run.device.reset().unwrap();
                    }
                    std::thread::sleep(Duration::from_micros(300));
                }
            });
            for i in 1..=400 {
                sim.raise();
                run.wait_acked(i, Duration::from_secs(10)).unwrap();
            }
        });
        // Quiet now: the line must come back unmasked.
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while sim.snapshot().command & COMMAND_INTX_DISABLE != 0
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(
            sim.snapshot().command & COMMAND_INTX_DISABLE,
            0,
            "line left masked (bypass {bypass})"
        );
        assert_eq!(run.device.stats().resets, 60);
        // An ISR that runs while the device is in its reset window cannot
        // ack (the device does not decode); the interrupt stays pending and
        // is delivered again after the reset. None may be lost.
        println!(
            "bypass {bypass}: {} ISR runs hit a reset window",
            run.control.empty_isr_runs()
        );
        assert_eq!(sim.snapshot().pending, 0);
        assert_eq!(run.control.acked(), 400);
        sim.raise();
        run.wait_acked(401, Duration::from_secs(5)).unwrap();
        run.finish().unwrap();
    }
}

#[test]
fn split_irqchip_falls_back_to_the_user_space_path_and_says_why() {
    if !kvm_available("split_irqchip") {
        return;
    }
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let caps = KvmCaps::probe(&kvm);
    assert!(caps.irqfd_resample && caps.split_irqchip, "{caps:?}");
    let vm = TinyVm::new(5, 3 << 3, Irqchip::Split).unwrap();
    let choice = choose_path(PathPolicy::Auto, caps, vm.irqchip(), true).unwrap();
    assert_eq!(choice.path, Path::UserSpace);
    assert_eq!(choice.fallback, Some(FallbackReason::SplitIrqchip));
    assert!(choice.to_string().contains("split irqchip"), "{choice}");
    let err = choose_path(PathPolicy::Fast, caps, vm.irqchip(), true).unwrap_err();
    assert!(err.to_string().contains("split irqchip"), "{err}");
    // KVM itself refuses a resample irqfd there, and nothing stays registered.
    let err = ResampleIrqfd::register(Arc::clone(vm.vm()), 5).unwrap_err();
    assert!(
        vfio_intx::error_chain(&err).contains("KVM_IRQFD with resample failed"),
        "{err}"
    );
    // The fully in-kernel irqchip takes the bypass when the backend can.
    let full = TinyVm::new(5, 3 << 3, Irqchip::Full).unwrap();
    assert_eq!(
        choose_path(PathPolicy::Auto, caps, full.irqchip(), true)
            .unwrap()
            .path,
        Path::KernelBypass
    );
    assert_eq!(
        choose_path(PathPolicy::Auto, caps, full.irqchip(), false)
            .unwrap()
            .fallback,
        Some(FallbackReason::BackendHasNoUnmaskEventfd)
    );
}

#[test]
fn bad_input_from_the_vmm_side_is_refused_cleanly() {
    if !kvm_available("bad_input") {
        return;
    }
    let vm = TinyVm::new(5, 3 << 3, Irqchip::Full).unwrap();
    for (gsi, why) in [
        (24, "not routed"),
        (200, "not routed"),
        (2, "level-triggered"),
        (0, "level-triggered"),
    ] {
        let err = ResampleIrqfd::register(Arc::clone(vm.vm()), gsi).unwrap_err();
        assert!(
            err.to_string().contains(&format!("GSI {gsi}")) && err.to_string().contains(why),
            "{err}"
        );
    }
    // A descriptor that is not an eventfd.
    let file = std::fs::File::open("/dev/null").unwrap();
    let err = vfio_intx::kvm::validate_eventfd(&file, "the irqfd trigger").unwrap_err();
    assert_eq!(err.to_string(), "the irqfd trigger is not an eventfd");
    // The same trigger twice: KVM says EBUSY; the first registration stands.
    let first = ResampleIrqfd::register(Arc::clone(vm.vm()), 5).unwrap();
    let again = first.trigger().try_clone().unwrap();
    let resample = EventFd::new(EFD_NONBLOCK).unwrap();
    let err = ResampleIrqfd::register_fds(Arc::clone(vm.vm()), 5, again, resample).unwrap_err();
    let text = vfio_intx::error_chain(&err);
    assert!(text.contains("busy"), "{text}");
    drop(first);
    // Unregistered on drop: the same GSI can be wired again.
    ResampleIrqfd::register(Arc::clone(vm.vm()), 5).unwrap();
}

/// The example VMM (examples/vmm.rs), built by `cargo test`, run as a user
/// would on the simulated device.
#[test]
fn the_example_vmm_runs_both_device_models() {
    if !kvm_available("example_vmm") {
        return;
    }
    // target/<profile>/deps/tier2_kvm-<hash> -> target/<profile>/examples/vmm
    let exe = std::env::current_exe().unwrap();
    let vmm = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join("vmm");
    assert!(
        vmm.exists(),
        "{} not built (cargo test builds examples)",
        vmm.display()
    );
    for (args, path) in [
        (vec!["--interrupts", "300"], "kernel bypass"),
        (
            vec!["--interrupts", "300", "--path", "user-space"],
            "user-space EOI path",
        ),
        (
            vec!["--interrupts", "300", "--sim-kernel", "bare"],
            "user-space EOI path",
        ),
    ] {
        let out = std::process::Command::new(&vmm)
            .args(&args)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "vmm {args:?} failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains(&format!("EOI path: {path}")), "{stdout}");
        assert!(
            stdout.contains("interrupts: 300 raised, 300 acked"),
            "{stdout}"
        );
        assert!(stdout.contains("PASS"), "{stdout}");
    }
    // Forcing the bypass on a device that cannot take it is a clear error.
    let out = std::process::Command::new(&vmm)
        .args(["--sim-kernel", "bare", "--path", "fast"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no kernel unmask eventfd"));
}
