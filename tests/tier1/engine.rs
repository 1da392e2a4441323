//! The INTx state machine, step by step and with the worker and guest
//! threads of `SimRig`.

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use vfio_intx::intx::{IntxOptions, LineState, Serviced};
use vfio_intx::pci::regs::*;
use vfio_intx::pci::Width;
use vfio_intx::sim::{SimDevice, SimRig};

use crate::Stepper;

#[test]
fn host_interrupt_masks_injects_and_eoi_unmasks() {
    let t = Stepper::new(SimDevice::builder().build());
    t.sim.raise();
    assert_eq!(t.dev.on_host_interrupt().unwrap(), Serviced::Done);
    assert_eq!(t.injected(), 1);
    assert!(t.masked(), "host mask set while in service");
    assert_eq!(t.dev.line_state(), LineState::InService);
    assert!(t.guest_isr());
    assert_eq!(t.dev.line_state(), LineState::Idle);
    assert!(!t.masked());
    let s = t.dev.stats();
    assert_eq!(
        (s.host_interrupts, s.injected, s.eois, s.not_mine),
        (1, 1, 1, 0)
    );
}

#[test]
fn eoi_while_the_device_still_asserts_reinjects_and_stays_masked() {
    let t = Stepper::new(SimDevice::builder().build());
    t.sim.raise();
    t.sim.raise();
    t.poll_host();
    assert_eq!(t.injected(), 1);
    assert!(t.guest_isr());
    assert_eq!(t.injected(), 2, "re-injected at EOI");
    assert!(t.masked());
    assert_eq!(t.dev.stats().reinjected, 1);
    assert!(t.guest_isr());
    assert_eq!(t.injected(), 2);
    assert!(!t.masked());
    assert_eq!(t.sim.snapshot().acked, 2);
}

#[test]
fn an_event_for_another_device_on_the_shared_line_is_not_mine() {
    let t = Stepper::new(SimDevice::builder().build());
    t.dev
        .guest_config_write(PCI_COMMAND, Width::Word, 0x0006)
        .unwrap();
    let before = t.sim.snapshot().command;
    // Another device on the same host line fired.
    t.dev.trigger().write(1).unwrap();
    t.poll_host();
    assert_eq!(t.injected(), 0);
    assert_eq!(t.dev.stats().not_mine, 1);
    assert_eq!(t.sim.snapshot().command, before, "nothing changed");
}

#[test]
fn spurious_eoi_is_counted_and_changes_nothing() {
    let t = Stepper::new(SimDevice::builder().build());
    t.dev.on_guest_eoi().unwrap();
    assert_eq!(t.dev.stats().spurious_eois, 1);
    assert_eq!(t.injected(), 0);
    assert!(!t.masked());
}

#[test]
fn an_interrupt_already_asserted_at_arming_is_delivered() {
    let sim = SimDevice::builder().build();
    sim.raise();
    let t = Stepper::new(sim);
    assert_eq!(t.injected(), 1);
    assert_eq!(t.dev.line_state(), LineState::InService);
}

#[test]
fn guest_sees_its_own_intx_disable_never_the_host_mask() {
    let t = Stepper::new(SimDevice::builder().build());
    t.dev
        .guest_config_write(PCI_COMMAND, Width::Word, 0x0006)
        .unwrap();
    t.sim.raise();
    t.poll_host();
    assert!(t.masked(), "host mask is set physically");
    for (offset, width, bit) in [
        (PCI_COMMAND, Width::Word, u32::from(COMMAND_INTX_DISABLE)),
        (PCI_COMMAND, Width::Dword, u32::from(COMMAND_INTX_DISABLE)),
        (
            PCI_COMMAND + 1,
            Width::Byte,
            u32::from(COMMAND_INTX_DISABLE >> 8),
        ),
    ] {
        let v = t.dev.guest_config_read(offset, width).unwrap();
        assert_eq!(
            v & bit,
            0,
            "guest read at {offset:#x} {width} shows the host mask"
        );
    }
    let dword = t.dev.guest_config_read(PCI_COMMAND, Width::Dword).unwrap();
    assert_ne!(
        dword & (u32::from(STATUS_INTERRUPT) << 16),
        0,
        "STATUS passes through"
    );
}

#[test]
fn guest_intx_disable_holds_interrupts_until_cleared() {
    let t = Stepper::new(SimDevice::builder().build());
    t.dev
        .guest_config_write(
            PCI_COMMAND,
            Width::Word,
            u32::from(0x0006 | COMMAND_INTX_DISABLE),
        )
        .unwrap();
    assert!(t.masked());
    t.sim.raise();
    t.poll_host();
    assert_eq!(t.injected(), 0, "no delivery while the guest disabled INTx");
    let v = t.dev.guest_config_read(PCI_COMMAND, Width::Word).unwrap();
    assert_ne!(
        v & u32::from(COMMAND_INTX_DISABLE),
        0,
        "guest sees its own bit"
    );
    // The guest clears the bit with a byte write to the high half of COMMAND.
    t.dev
        .guest_config_write(PCI_COMMAND + 1, Width::Byte, 0)
        .unwrap();
    t.poll_host();
    assert_eq!(t.injected(), 1, "held interrupt delivered on enable");
    assert!(t.masked());
    assert!(t.guest_isr());
    assert!(!t.masked());
    assert_eq!(t.dev.guest_command(), 0x0006);
}

#[test]
fn guest_disabling_intx_while_in_service_holds_the_rest() {
    let t = Stepper::new(SimDevice::builder().build());
    t.sim.raise();
    t.sim.raise();
    t.poll_host();
    assert_eq!(t.injected(), 1);
    t.dev
        .guest_config_write(PCI_COMMAND, Width::Word, u32::from(COMMAND_INTX_DISABLE))
        .unwrap();
    assert!(t.guest_isr());
    assert_eq!(t.dev.line_state(), LineState::GuestMasked);
    assert_eq!(t.injected(), 1, "second interrupt held");
    assert!(t.masked());
    t.dev
        .guest_config_write(PCI_COMMAND, Width::Word, 0)
        .unwrap();
    assert_eq!(t.injected(), 2);
    assert!(t.guest_isr());
    assert!(!t.masked());
    assert_eq!(t.dev.line_state(), LineState::Idle);
}

#[test]
fn invalid_guest_accesses_are_refused_naming_the_device_and_change_nothing() {
    let t = Stepper::new(SimDevice::builder().build());
    t.dev
        .guest_config_write(PCI_COMMAND, Width::Word, 0x0006)
        .unwrap();
    for (offset, width) in [
        (0x05, Width::Word),
        (0x102, Width::Word),
        (0xfd, Width::Dword),
    ] {
        let err = t.dev.guest_config_write(offset, width, 0).unwrap_err();
        let text = vfio_intx::error_chain(&err);
        assert!(text.starts_with("0000:00:04.0: guest"), "{text}");
        assert!(t.dev.guest_config_read(offset, width).is_err());
    }
    let err = t
        .dev
        .guest_config_write(PCI_COMMAND, Width::Byte, 0x1ff)
        .unwrap_err();
    assert!(vfio_intx::error_chain(&err).contains("does not fit"));
    assert_eq!(t.dev.guest_command(), 0x0006);
    assert_eq!(t.sim.snapshot().command, 0x0006);
}

#[test]
fn reset_restores_the_guest_command_and_header() {
    let t = Stepper::new(SimDevice::builder().build());
    t.dev
        .guest_config_write(PCI_COMMAND, Width::Word, 0x0006)
        .unwrap();
    t.dev
        .guest_config_write(PCI_BASE_ADDRESS_0, Width::Dword, 0xfebf_1000)
        .unwrap();
    t.dev
        .guest_config_write(PCI_INTERRUPT_LINE, Width::Byte, 11)
        .unwrap();
    t.dev.reset().unwrap();
    assert_eq!(t.sim.snapshot().resets, 1);
    assert_eq!(t.sim.snapshot().command, 0x0006);
    assert_eq!(
        t.dev
            .guest_config_read(PCI_BASE_ADDRESS_0, Width::Dword)
            .unwrap(),
        0xfebf_1000
    );
    assert_eq!(
        t.dev
            .guest_config_read(PCI_INTERRUPT_LINE, Width::Byte)
            .unwrap(),
        11
    );
    assert_eq!(
        t.dev
            .guest_config_read(PCI_INTERRUPT_PIN, Width::Byte)
            .unwrap(),
        1
    );
}

#[test]
fn reset_while_interrupt_pending_redelivers_after_restore() {
    let sim = SimDevice::builder()
        .reset_window(Duration::from_millis(100))
        .build();
    let t = Arc::new(Stepper::new(sim));
    let resetter = {
        let t = Arc::clone(&t);
        thread::spawn(move || t.dev.reset())
    };
    while !t.dev.is_blocked() {
        thread::yield_now();
    }
    t.sim.raise();
    // The interrupt path must not wait behind the reset.
    let start = std::time::Instant::now();
    assert_eq!(t.dev.service().unwrap(), Serviced::Deferred);
    assert!(start.elapsed() < Duration::from_millis(50));
    resetter.join().unwrap().unwrap();
    // The reset re-checked STATUS and delivered; the deferred work then finds
    // the line in service and does not inject twice.
    t.poll_host();
    assert_eq!(t.injected(), 1);
    assert_eq!(t.dev.line_state(), LineState::InService);
    assert!(t.guest_isr());
    assert!(!t.masked(), "line not left masked");
    assert_eq!(t.dev.line_state(), LineState::Idle);
}

#[test]
fn reset_while_in_service_keeps_the_line_masked_until_eoi() {
    let t = Stepper::new(SimDevice::builder().build());
    t.sim.raise();
    t.poll_host();
    t.dev.reset().unwrap();
    assert!(t.masked(), "reset put the host mask back");
    assert_eq!(t.injected(), 1);
    assert!(t.guest_isr());
    assert!(!t.masked());
}

#[test]
fn reset_of_a_device_without_reset_method_is_a_clear_error_and_disturbs_nothing() {
    let t = Stepper::new(SimDevice::builder().reset_method(false).build());
    t.dev
        .guest_config_write(PCI_COMMAND, Width::Word, 0x0006)
        .unwrap();
    let err = t.dev.reset().unwrap_err();
    assert_eq!(
        vfio_intx::error_chain(&err),
        "0000:00:04.0: reset failed: the device has no reset method"
    );
    assert_eq!(t.sim.snapshot().command, 0x0006);
    t.sim.raise();
    t.poll_host();
    assert_eq!(t.injected(), 1, "interrupts still flow");
}

#[test]
fn a_thousand_interrupts_through_worker_and_guest_threads_each_delivered_once() {
    let rig = SimRig::start(SimDevice::builder().build(), IntxOptions::default()).unwrap();
    for i in 0..1000 {
        rig.sim.raise();
        if i % 10 == 0 {
            // Let some arrive before the previous EOI, some after.
            thread::sleep(Duration::from_micros(50));
        }
    }
    assert!(
        rig.wait_delivered(1000, Duration::from_secs(20)),
        "delivered {}",
        rig.delivered()
    );
    thread::sleep(Duration::from_millis(20));
    assert_eq!(rig.delivered(), 1000);
    assert_eq!(rig.double_injections(), 0);
    assert_eq!(rig.empty_isr_runs(), 0);
    assert_eq!(rig.device.line_state(), LineState::Idle);
    assert_eq!(rig.sim.snapshot().command & COMMAND_INTX_DISABLE, 0);
}

#[test]
fn guest_initiated_flr_becomes_a_serialized_reset_through_the_gate() {
    use vfio_intx::sim::SIM_PCIE_CAP;
    let t = Stepper::new(SimDevice::builder().build());
    t.dev
        .guest_config_write(PCI_COMMAND, Width::Word, 0x0006)
        .unwrap();
    t.sim.raise();
    t.poll_host();
    assert_eq!(t.injected(), 1);
    let devctl = SIM_PCIE_CAP + PCI_EXP_DEVCTL;
    // Initiate FLR with a byte write of DevCtl's high half, as drivers do
    // with a word write; both must be caught.
    t.dev
        .guest_config_write(
            devctl + 1,
            Width::Byte,
            u32::from(PCI_EXP_DEVCTL_BCR_FLR >> 8),
        )
        .unwrap();
    assert_eq!(t.sim.snapshot().resets, 1);
    t.dev
        .guest_config_write(
            devctl,
            Width::Word,
            u32::from(PCI_EXP_DEVCTL_BCR_FLR | 0x0010),
        )
        .unwrap();
    assert_eq!(t.sim.snapshot().resets, 2);
    assert_eq!(
        t.sim.snapshot().command & !COMMAND_INTX_DISABLE,
        0x0006,
        "COMMAND restored"
    );
    assert_eq!(
        t.dev.guest_config_read(devctl, Width::Word).unwrap() & u32::from(PCI_EXP_DEVCTL_BCR_FLR),
        0,
        "FLR reads as zero"
    );
    // The interrupt in service across the FLRs is still completed.
    assert!(t.guest_isr());
    assert!(!t.masked());
    assert_eq!(t.dev.stats().resets, 2);
}

#[test]
fn devctl_writes_without_flr_support_do_not_reset() {
    use vfio_intx::sim::SIM_PCIE_CAP;
    let t = Stepper::new(SimDevice::builder().reset_method(false).build());
    t.dev
        .guest_config_write(
            SIM_PCIE_CAP + PCI_EXP_DEVCTL,
            Width::Word,
            u32::from(PCI_EXP_DEVCTL_BCR_FLR),
        )
        .unwrap();
    assert_eq!(t.sim.snapshot().resets, 0);
    assert_eq!(t.dev.stats().resets, 0);
}

#[test]
fn an_interrupt_masked_by_the_host_before_arming_is_delivered_when_armed() {
    // Where INTX_DISABLE is physical, a kernel driver (uio_pci_generic) may
    // have check-and-masked an interrupt before the engine takes over.
    let sim = SimDevice::builder().build();
    let mut b = sim.backend();
    vfio_intx::backend::ConfigSpace::config_write(
        &mut b,
        PCI_COMMAND,
        Width::Word,
        u32::from(0x0006 | COMMAND_INTX_DISABLE),
    )
    .unwrap();
    sim.raise();
    let t = Stepper::new(sim);
    assert_eq!(
        t.dev.guest_command() & COMMAND_INTX_DISABLE,
        0,
        "the host's mask is not the guest's choice"
    );
    assert_eq!(t.injected(), 1, "delivered when armed, not held");
    assert_eq!(t.dev.line_state(), LineState::InService);
    assert!(t.masked());
    assert!(t.guest_isr());
    assert_eq!(t.dev.line_state(), LineState::Idle);
    assert!(!t.masked());
}

#[test]
fn interrupts_keep_flowing_during_a_back_to_back_reset_storm() {
    // Two threads reset without pause: a deferred interrupt must not wait
    // for the storm to end (the reset path runs it before it unblocks).
    use std::sync::atomic::{AtomicBool, Ordering};
    let sim = SimDevice::builder()
        .reset_window(Duration::from_micros(300))
        .build();
    let rig = SimRig::start(sim, IntxOptions::default()).unwrap();
    let storming = AtomicBool::new(true);
    let (raised, delivered_in_storm) = std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                while storming.load(Ordering::SeqCst) {
                    rig.device.reset().unwrap();
                }
            });
        }
        let mut raised = 0;
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_millis(600) {
            rig.sim.raise();
            raised += 1;
            thread::sleep(Duration::from_millis(2));
        }
        // Give the last one a moment, still inside the storm.
        thread::sleep(Duration::from_millis(20));
        let delivered = rig.delivered();
        storming.store(false, Ordering::SeqCst);
        (raised, delivered)
    });
    println!(
        "raised {raised}, delivered during the storm {delivered_in_storm}, stats {:?}",
        rig.device.stats()
    );
    assert!(
        delivered_in_storm + 2 >= raised,
        "only {delivered_in_storm} of {raised} delivered while resets were running"
    );
    assert!(rig.wait_delivered(raised, Duration::from_secs(5)));
}

#[test]
fn the_kernel_bypass_can_be_wired_and_unwired_on_an_armed_engine() {
    use vfio_intx::sim::SimKernel;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
    let rig = crate::Stepper::new(SimDevice::builder().kernel(SimKernel::VfioPci).build());
    // A parked interrupt on the user-space path: injected, masked.
    rig.sim.raise();
    rig.poll_host();
    assert_eq!(rig.injected(), 1);
    let irqfd = EventFd::new(EFD_NONBLOCK).unwrap();
    let resample = EventFd::new(EFD_NONBLOCK).unwrap();
    rig.dev
        .set_kernel_bypass(Some((
            irqfd.try_clone().unwrap(),
            resample.try_clone().unwrap(),
        )))
        .unwrap();
    assert!(rig.dev.is_kernel_bypass());
    // The kernel re-signals what the device still asserts, to the new irqfd.
    assert!(
        crate::readable(&irqfd),
        "the pending interrupt goes to the irqfd"
    );
    irqfd.read().unwrap();
    assert!(rig.sim.ack());
    resample.write(1).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while rig.masked() {
        assert!(
            std::time::Instant::now() < deadline,
            "the kernel never unmasked"
        );
        std::thread::yield_now();
    }
    rig.sim.raise();
    assert!(
        crate::readable(&irqfd),
        "the next interrupt goes straight to the irqfd"
    );
    assert!(!rig.trigger_fired(), "no user-space work on the bypass");
    assert_eq!(rig.injected(), 1);
    // Back to user space with that interrupt never EOIed: re-delivered.
    rig.dev.set_kernel_bypass(None).unwrap();
    assert!(!rig.dev.is_kernel_bypass());
    rig.poll_host();
    assert_eq!(rig.injected(), 2);
}

/// The vfio-pci model whose trigger signals the engine may take as the
/// kernel's claims, as on real vfio-pci.
fn claiming_vfio_pci() -> Stepper {
    use vfio_intx::sim::SimKernel;
    Stepper::new(
        SimDevice::builder()
            .kernel(SimKernel::VfioPci)
            .trigger_claims(true)
            .build(),
    )
}

#[test]
fn a_kernel_claimed_interrupt_is_taken_without_rereading_status() {
    use vfio_intx::sim::SimOp;
    let t = claiming_vfio_pci();
    let checks = t.sim.calls(SimOp::CheckAndMask);
    for round in 1..=5 {
        t.sim.raise();
        t.poll_host();
        assert_eq!(t.injected(), round);
        assert_eq!(t.dev.line_state(), LineState::InService);
        assert!(t.guest_isr());
        assert_eq!(t.dev.line_state(), LineState::Idle);
    }
    let s = t.dev.stats();
    // The first signal has no earlier read to date it: it is checked.
    assert_eq!(
        (s.host_interrupts, s.claimed, s.injected),
        (5, 4, 5),
        "{s:?}"
    );
    assert_eq!(t.sim.calls(SimOp::CheckAndMask) - checks, 1);
}

#[test]
fn a_claim_outdated_by_a_reset_or_a_resync_is_checked_again() {
    let t = claiming_vfio_pci();
    // Two claimed cycles: the engine takes the kernel's word.
    for _ in 0..2 {
        t.sim.raise();
        t.poll_host();
        assert!(t.guest_isr());
    }
    type Outdate = fn(&Stepper);
    let outdating: [(&str, Outdate); 2] = [
        ("a reset through the gate", |t| t.dev.reset().unwrap()),
        ("a re-sync", |t| t.dev.resync().unwrap()),
    ];
    for (what, outdate) in outdating {
        let before = t.dev.stats();
        // The kernel claims an interrupt and signals; before the engine
        // reads the signal the device deasserts and the generation moves.
        t.sim.raise();
        assert!(t.trigger_fired());
        assert!(t.sim.ack());
        outdate(&t);
        t.poll_host();
        let s = t.dev.stats();
        assert_eq!(
            t.injected(),
            before.injected,
            "{what}: a stale claim was injected"
        );
        assert_eq!(s.claimed, before.claimed, "{what}: {s:?}");
        assert_eq!(t.dev.line_state(), LineState::Idle, "{what}");
        assert!(!t.masked(), "{what}: left masked");
        // Delivery goes on, claimed again: the stale signal's read dated
        // the next ones.
        for _ in 0..2 {
            t.sim.raise();
            t.poll_host();
            assert!(t.guest_isr(), "{what}");
        }
        assert_eq!(t.injected(), before.injected + 2, "{what}");
        assert_eq!(t.dev.stats().claimed, before.claimed + 2, "{what}");
    }
}

#[test]
fn kicks_and_kernel_signals_sharing_one_read_are_told_apart() {
    let t = claiming_vfio_pci();
    for _ in 0..2 {
        t.sim.raise();
        t.poll_host();
        assert!(t.guest_isr());
    }
    let before = t.dev.stats();
    // A kick (here: a re-sync's re-check arriving through the worker) and a
    // kernel signal in the same read: the interrupt is checked, not claimed.
    t.sim.raise();
    t.dev.resync().unwrap();
    t.poll_host();
    let s = t.dev.stats();
    assert_eq!(t.injected(), before.injected + 1, "{s:?}");
    assert_eq!(s.claimed, before.claimed, "{s:?}");
    assert!(t.guest_isr());
    assert_eq!(t.dev.line_state(), LineState::Idle);
}
