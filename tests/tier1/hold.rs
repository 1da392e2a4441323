//! The host's own hold of a line (an operator's `mask`, an interrupt storm)
//! as engine state: nothing masks behind the state machine's back, and every
//! path the engine has (interrupt, EOI, reset, re-sync, watchdog, guest
//! config write) keeps a held line masked until it is released.

use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use vfio_intx::intx::{IntxError, LineState, Tick, WatchdogOptions};
use vfio_intx::pci::regs::{COMMAND_INTX_DISABLE, COMMAND_MEMORY, PCI_COMMAND};
use vfio_intx::pci::Width;
use vfio_intx::sim::{SimDevice, SimKernel};

use crate::Stepper;

fn models() -> [(&'static str, SimDevice); 2] {
    [
        ("bare", SimDevice::builder().build()),
        (
            "vfio-pci",
            SimDevice::builder().kernel(SimKernel::VfioPci).build(),
        ),
    ]
}

#[test]
fn an_interrupt_raised_while_held_is_delivered_once_at_release() {
    for (model, sim) in models() {
        let t = Stepper::new(sim);
        t.dev.hold("operator").unwrap();
        assert_eq!(t.dev.hold_reason(), Some("operator"), "{model}");
        t.sim.raise();
        t.poll_host();
        assert_eq!(t.injected(), 0, "{model}: delivered while held");
        assert!(t.masked(), "{model}: a held line is masked");
        t.dev.release().unwrap();
        t.poll_host();
        assert_eq!(t.injected(), 1, "{model}: not delivered at release");
        assert_eq!(t.dev.hold_reason(), None);
        assert!(t.guest_isr(), "{model}");
        t.poll_host();
        assert!(!t.masked(), "{model}: left masked after the EOI");
        assert_eq!(t.injected(), 1, "{model}");
    }
}

#[test]
fn an_eoi_while_held_leaves_the_line_masked_and_release_redelivers_what_still_asserts() {
    for (model, sim) in models() {
        let t = Stepper::new(sim);
        t.sim.raise();
        t.sim.raise();
        t.poll_host();
        assert_eq!(t.injected(), 1, "{model}");
        t.dev.hold("storm").unwrap();
        // The guest handles one of the two and EOIs: the device still
        // asserts, but the host holds the line.
        assert!(t.guest_isr(), "{model}");
        t.poll_host();
        assert_eq!(t.injected(), 1, "{model}: re-injected while held");
        assert!(t.masked(), "{model}: the EOI unmasked a held line");
        assert_eq!(t.dev.line_state(), LineState::Idle, "{model}");
        t.dev.release().unwrap();
        t.poll_host();
        assert_eq!(t.injected(), 2, "{model}: the one still asserting");
        assert!(t.guest_isr(), "{model}");
        t.poll_host();
        assert!(!t.masked(), "{model}");
        assert_eq!(t.sim.snapshot().pending, 0, "{model}");
    }
}

#[test]
fn resets_resyncs_and_guest_command_writes_keep_a_held_line_masked() {
    for (model, sim) in models() {
        let t = Stepper::new(sim);
        t.dev.hold("operator").unwrap();
        t.sim.raise();
        t.poll_host();
        t.dev.reset().unwrap();
        assert!(t.masked(), "{model}: the reset unmasked a held line");
        t.dev.resync().unwrap();
        assert!(t.masked(), "{model}: the re-sync unmasked a held line");
        t.dev
            .guest_config_write(PCI_COMMAND, Width::Word, u32::from(COMMAND_MEMORY))
            .unwrap();
        assert!(t.masked(), "{model}: the guest's COMMAND write unmasked it");
        // The guest still sees its own INTX_DISABLE, not the host's hold.
        let seen = t.dev.guest_config_read(PCI_COMMAND, Width::Word).unwrap() as u16;
        assert_eq!(seen & COMMAND_INTX_DISABLE, 0, "{model}");
        t.poll_host();
        assert_eq!(t.injected(), 0, "{model}");
        t.dev.release().unwrap();
        t.poll_host();
        assert_eq!(t.injected(), 1, "{model}");
    }
}

#[test]
fn the_watchdog_never_takes_a_held_asserting_line_for_stuck() {
    for (model, sim) in models() {
        let t = Stepper::new(sim);
        t.dev.hold("operator").unwrap();
        t.sim.raise();
        t.poll_host();
        let t0 = Instant::now();
        let limit = WatchdogOptions::default().guest_service_limit;
        for step in 0..10u32 {
            let now = t0 + (limit + Duration::from_millis(100)) * step / 4;
            assert_eq!(t.dev.watchdog_tick(now).0, Tick::Quiet, "{model}");
        }
        assert_eq!(t.dev.stats().stuck_detections, 0, "{model}");
        assert!(t.masked(), "{model}");
        assert_eq!(t.injected(), 0, "{model}");
    }
}

#[test]
fn a_hold_on_the_kernel_bypass_and_the_bypass_while_held_are_refused_with_nothing_changed() {
    let t = Stepper::new(SimDevice::builder().kernel(SimKernel::VfioPci).build());
    let wiring = || {
        let irqfd = EventFd::new(EFD_NONBLOCK).unwrap();
        let resample = EventFd::new(EFD_NONBLOCK).unwrap();
        Some((irqfd, resample))
    };
    t.dev.hold("operator").unwrap();
    let e = t.dev.set_kernel_bypass(wiring()).unwrap_err();
    assert!(matches!(e, IntxError::HoldOnBypass { .. }), "{e}");
    assert!(!t.dev.is_kernel_bypass());
    assert_eq!(t.dev.hold_reason(), Some("operator"));
    t.dev.release().unwrap();
    t.dev.set_kernel_bypass(wiring()).unwrap();
    let e = t.dev.hold("storm").unwrap_err();
    assert!(e.to_string().contains("kernel bypass"), "{e}");
    assert_eq!(t.dev.hold_reason(), None);
    assert!(t.dev.is_kernel_bypass());
}
