//! The reset path: wedged functions, resets that wait for another reset,
//! Advanced Features FLR, and bus resets that reach several engines.

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use vfio_intx::intx::{IntxOptions, LineState, RetryPolicy};
use vfio_intx::pci::regs::*;
use vfio_intx::pci::{Bdf, Width};
use vfio_intx::sim::{Fault, SimDevice, SimKernel, SimOp, SIM_AF_CAP, SIM_PCIE_CAP, SIM_VENDOR_ID};

use crate::Stepper;

const BAR0: u32 = 0xfebf_0000;

/// A device whose BAR0 the host programmed before handing it over.
fn programmed(sim: SimDevice) -> SimDevice {
    let mut backend = sim.backend();
    vfio_intx::backend::ConfigSpace::config_write(
        &mut backend,
        PCI_BASE_ADDRESS_0,
        Width::Dword,
        BAR0,
    )
    .unwrap();
    sim
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "timed out: {what}"
        );
        thread::sleep(Duration::from_micros(200));
    }
}

fn a_wedged_function_is_reset_and_settled(kernel: SimKernel) {
    let t = Stepper::new(programmed(SimDevice::builder().kernel(kernel).build()));
    t.dev
        .guest_config_write(PCI_COMMAND, Width::Word, u32::from(COMMAND_MEMORY))
        .unwrap();
    t.sim.wedge();
    assert_eq!(
        t.dev.guest_config_read(PCI_VENDOR_ID, Width::Word).unwrap(),
        0xffff,
        "the function reads all-ones"
    );
    // An interrupt the device raises while wedged is pending across the
    // reset.
    t.sim.raise();
    if let Err(e) = t.dev.reset() {
        panic!("{kernel:?}: {}", vfio_intx::error_chain(&e));
    }
    assert_eq!(t.sim.snapshot().resets, 1);
    assert_eq!(
        t.dev.guest_config_read(PCI_VENDOR_ID, Width::Word).unwrap(),
        u32::from(SIM_VENDOR_ID),
        "the reset recovered the function"
    );
    assert_eq!(
        t.dev
            .guest_config_read(PCI_BASE_ADDRESS_0, Width::Dword)
            .unwrap(),
        BAR0,
        "BAR0 restored"
    );
    assert_eq!(
        t.dev.guest_config_read(PCI_COMMAND, Width::Word).unwrap(),
        u32::from(COMMAND_MEMORY),
        "COMMAND restored"
    );
    t.poll_host();
    assert_eq!(t.injected(), 1, "the pending interrupt is delivered");
    assert!(t.guest_isr());
    t.poll_host();
    assert!(!t.masked(), "the line is not left masked");
    assert_eq!(t.dev.line_state(), LineState::Idle);
    assert_eq!(t.injected(), 1);
}

#[test]
fn a_wedged_function_reading_all_ones_is_reset_and_settled_on_the_bare_device() {
    a_wedged_function_is_reset_and_settled(SimKernel::Bare);
}

#[test]
fn a_wedged_function_reading_all_ones_is_reset_and_settled_behind_vfio_pci() {
    a_wedged_function_is_reset_and_settled(SimKernel::VfioPci);
}

fn guest_flr_waits_out_an_outside_reset(kernel: SimKernel) {
    let window = Duration::from_millis(250);
    let t = Arc::new(Stepper::new(programmed(
        SimDevice::builder()
            .kernel(kernel)
            .reset_window(window)
            .build(),
    )));
    t.sim.raise();
    t.poll_host();
    assert_eq!(t.injected(), 1);
    let outside = {
        let sim = t.sim.clone();
        thread::spawn(move || sim.external_reset())
    };
    wait_until("the outside reset started", || t.sim.snapshot().in_reset);
    let started = Instant::now();
    let devctl = SIM_PCIE_CAP + PCI_EXP_DEVCTL;
    let flr = t
        .dev
        .guest_config_write(devctl, Width::Word, u32::from(PCI_EXP_DEVCTL_BCR_FLR));
    let waited = started.elapsed();
    outside.join().unwrap().unwrap();
    if let Err(e) = flr {
        panic!(
            "{kernel:?}: the guest FLR failed after {waited:?}: {}",
            vfio_intx::error_chain(&e)
        );
    }
    println!("{kernel:?}: the guest FLR waited {waited:?} for the outside reset");
    assert!(
        waited >= window / 2,
        "the FLR cannot have run inside the window"
    );
    let snap = t.sim.snapshot();
    assert_eq!(snap.resets, 2, "the outside reset and the guest's FLR");
    assert_eq!(snap.device_flrs, 0, "the FLR bit never reached the device");
    let stats = t.dev.stats();
    assert_eq!((stats.resets, stats.errors), (1, 0));
    assert_eq!(
        t.dev
            .guest_config_read(PCI_BASE_ADDRESS_0, Width::Dword)
            .unwrap(),
        BAR0
    );
    // The interrupt in service across both resets is completed.
    assert!(t.guest_isr());
    t.poll_host();
    assert!(!t.masked());
    assert_eq!(t.dev.line_state(), LineState::Idle);
}

#[test]
fn a_guest_flr_during_an_outside_reset_waits_for_it_and_completes_on_the_bare_device() {
    guest_flr_waits_out_an_outside_reset(SimKernel::Bare);
}

#[test]
fn a_guest_flr_during_an_outside_reset_waits_for_it_and_completes_behind_vfio_pci() {
    guest_flr_waits_out_an_outside_reset(SimKernel::VfioPci);
}

/// A guest FLR while another holder keeps the kernel answering EAGAIN
/// (`pci_try_reset_function` while another reset, or a driver bind, holds
/// the device lock) for `held`. Returns the FLR's result and how long it
/// took.
fn guest_flr_held_off(
    t: &Stepper,
    held: Duration,
) -> (Result<(), vfio_intx::intx::IntxError>, Duration) {
    t.sim.inject_fault(SimOp::Reset, Fault::Eagain, 0, u64::MAX);
    let release = {
        let sim = t.sim.clone();
        thread::spawn(move || {
            thread::sleep(held);
            sim.clear_faults();
        })
    };
    let started = Instant::now();
    let flr = t.dev.guest_config_write(
        SIM_PCIE_CAP + PCI_EXP_DEVCTL,
        Width::Word,
        u32::from(PCI_EXP_DEVCTL_BCR_FLR),
    );
    let took = started.elapsed();
    release.join().unwrap();
    (flr, took)
}

#[test]
fn a_guest_flr_answered_eagain_for_250ms_completes_behind_vfio_pci() {
    let t = Stepper::new(programmed(
        SimDevice::builder().kernel(SimKernel::VfioPci).build(),
    ));
    t.sim.raise();
    t.poll_host();
    let (flr, took) = guest_flr_held_off(&t, Duration::from_millis(250));
    if let Err(e) = flr {
        panic!(
            "the guest FLR failed after {took:?}: {}",
            vfio_intx::error_chain(&e)
        );
    }
    let stats = t.dev.stats();
    println!(
        "the guest FLR completed after {took:?} of EAGAIN, {} retries",
        stats.retries
    );
    assert!(took >= Duration::from_millis(200));
    assert_eq!(t.sim.snapshot().resets, 1);
    assert_eq!(
        (stats.resets, stats.errors, stats.guest_flr_failures),
        (1, 0, 0)
    );
    assert!(t.guest_isr());
    t.poll_host();
    assert!(!t.masked());
    assert_eq!(t.dev.line_state(), LineState::Idle);
}

#[test]
fn a_guest_flr_that_still_fails_is_reported_and_leaves_the_device_working() {
    let options = IntxOptions::default()
        .with_reset_retry(RetryPolicy::reset_default().with_total(Some(Duration::from_millis(30))));
    let t = Stepper::with_options(
        programmed(SimDevice::builder().kernel(SimKernel::VfioPci).build()),
        options,
    );
    let (flr, took) = guest_flr_held_off(&t, Duration::from_millis(300));
    let err = flr.expect_err("the reset cannot get through in 30 ms");
    let text = vfio_intx::error_chain(&err);
    assert!(
        text.starts_with("0000:00:04.0: reset failed"),
        "the error names the device and the operation: {text}"
    );
    assert!(
        took < Duration::from_millis(250),
        "the budget bounds it: {took:?}"
    );
    let stats = t.dev.stats();
    assert_eq!(stats.guest_flr_failures, 1, "counted for the metrics");
    assert!(stats.retries > 0);
    assert_eq!(t.sim.snapshot().resets, 0);
    // Nothing is left masked or half restored.
    assert_eq!(
        t.dev
            .guest_config_read(PCI_BASE_ADDRESS_0, Width::Dword)
            .unwrap(),
        BAR0
    );
    t.sim.raise();
    t.poll_host();
    assert_eq!(t.injected(), 1);
    assert!(t.guest_isr());
    t.poll_host();
    assert!(!t.masked());
}

#[test]
fn a_guest_advanced_features_flr_runs_the_reset_protocol_and_never_reaches_the_device() {
    let t = Arc::new(Stepper::new(programmed(
        SimDevice::builder()
            .advanced_features(true)
            .reset_window(Duration::from_millis(100))
            .build(),
    )));
    t.dev
        .guest_config_write(PCI_COMMAND, Width::Word, u32::from(COMMAND_MEMORY))
        .unwrap();
    t.sim.raise();
    t.poll_host();
    assert_eq!(t.injected(), 1);
    let af_ctrl = SIM_AF_CAP + PCI_AF_CTRL;
    let writer = {
        let t = Arc::clone(&t);
        thread::spawn(move || {
            t.dev
                .guest_config_write(af_ctrl, Width::Byte, u32::from(PCI_AF_CTRL_FLR))
        })
    };
    // The engine's reset holds the gate for the device's reset window.
    let started = Instant::now();
    let mut blocked = false;
    while !writer.is_finished() && started.elapsed() < Duration::from_secs(5) {
        blocked |= t.dev.is_blocked() && t.sim.snapshot().in_reset;
        thread::sleep(Duration::from_micros(200));
    }
    writer.join().unwrap().unwrap();
    let snap = t.sim.snapshot();
    assert_eq!(snap.device_flrs, 0, "AF_CTRL.FLR never reached the device");
    assert_eq!(snap.resets, 1);
    assert!(
        blocked,
        "the gate was blocked while the device was in reset"
    );
    assert_eq!(t.dev.stats().resets, 1, "the engine's reset protocol ran");
    assert_eq!(
        t.dev
            .guest_config_read(PCI_BASE_ADDRESS_0, Width::Dword)
            .unwrap(),
        BAR0,
        "the header was restored"
    );
    assert_eq!(
        t.dev.guest_config_read(PCI_COMMAND, Width::Word).unwrap(),
        u32::from(COMMAND_MEMORY)
    );
    assert_eq!(
        t.dev.guest_config_read(af_ctrl, Width::Byte).unwrap() & u32::from(PCI_AF_CTRL_FLR),
        0,
        "AF_CTRL.FLR reads as zero"
    );
    // A dword write covering AF_CTRL with other bytes is caught too.
    t.dev
        .guest_config_write(
            SIM_AF_CAP + PCI_AF_CTRL,
            Width::Byte,
            u32::from(PCI_AF_CTRL_FLR),
        )
        .unwrap();
    let snap = t.sim.snapshot();
    assert_eq!((snap.resets, snap.device_flrs), (2, 0));
    // The interrupt in service across the FLRs is still completed.
    assert!(t.guest_isr());
    t.poll_host();
    assert!(!t.masked());
    assert_eq!(t.dev.line_state(), LineState::Idle);
}

#[test]
fn an_advanced_features_capability_without_flr_support_is_left_alone() {
    let t = Stepper::new(
        SimDevice::builder()
            .advanced_features(true)
            .reset_method(false)
            .build(),
    );
    t.dev
        .guest_config_write(
            SIM_AF_CAP + PCI_AF_CTRL,
            Width::Byte,
            u32::from(PCI_AF_CTRL_FLR),
        )
        .unwrap();
    assert_eq!(t.sim.snapshot().resets, 0);
    assert_eq!(t.dev.stats().resets, 0);
}

fn bdf(text: &str) -> Bdf {
    text.parse().unwrap()
}

fn a_bus_reset_reaches_every_engine_on_the_bus(kernel: SimKernel) {
    let bus = vfio_intx::sim::SimBus::new();
    let window = Duration::from_millis(100);
    let device = |addr| {
        SimDevice::builder()
            .kernel(kernel)
            .bdf(bdf(addr))
            .bus(&bus)
            .reset_window(window)
            .build()
    };
    let a = Arc::new(Stepper::new(programmed(device("0000:00:04.0"))));
    let b = Arc::new(Stepper::new(programmed(device("0000:00:05.0"))));
    // The sibling's interrupt: raised, its host interrupt not handled yet.
    b.sim.raise();
    let resetter = {
        let (a, b) = (Arc::clone(&a), Arc::clone(&b));
        thread::spawn(move || a.dev.reset_with_siblings(&[&b.dev], |x| x.hot_reset()))
    };
    wait_until("the bus reset started", || b.sim.snapshot().in_reset);
    // An access to the sibling waits for the reset instead of landing in it.
    let read_at = Instant::now();
    let vendor = b.dev.guest_config_read(PCI_VENDOR_ID, Width::Word).unwrap();
    let waited = read_at.elapsed();
    resetter.join().unwrap().unwrap();
    assert_eq!(
        vendor,
        u32::from(SIM_VENDOR_ID),
        "{kernel:?}: read inside the reset"
    );
    assert!(!b.sim.snapshot().in_reset);
    println!("{kernel:?}: the sibling's config read waited {waited:?}");
    for t in [&a, &b] {
        assert_eq!(t.sim.snapshot().resets, 1, "{kernel:?}: one bus reset");
        assert_eq!(t.dev.stats().resets, 1, "{kernel:?}: {} reset", t.dev.bdf());
        assert_eq!(
            t.dev
                .guest_config_read(PCI_BASE_ADDRESS_0, Width::Dword)
                .unwrap(),
            BAR0,
            "{kernel:?}: {} header restored",
            t.dev.bdf()
        );
    }
    b.poll_host();
    assert_eq!(
        b.injected(),
        1,
        "{kernel:?}: the sibling's pending interrupt is delivered"
    );
    assert!(b.guest_isr());
    for t in [&a, &b] {
        t.poll_host();
        assert!(!t.masked(), "{kernel:?}: {} left masked", t.dev.bdf());
        assert_eq!(t.dev.line_state(), LineState::Idle);
        // And the line works.
        t.sim.raise();
        t.poll_host();
        assert!(t.guest_isr());
        t.poll_host();
        assert!(!t.masked());
    }
    assert_eq!((a.injected(), b.injected()), (1, 2));
}

#[test]
fn a_bus_reset_blocks_and_settles_every_engine_on_the_bus_bare() {
    a_bus_reset_reaches_every_engine_on_the_bus(SimKernel::Bare);
}

#[test]
fn a_bus_reset_blocks_and_settles_every_engine_on_the_bus_behind_vfio_pci() {
    a_bus_reset_reaches_every_engine_on_the_bus(SimKernel::VfioPci);
}

#[test]
fn bus_resets_started_from_either_sibling_at_once_take_turns_and_never_deadlock() {
    let bus = vfio_intx::sim::SimBus::new();
    let device = |addr| {
        SimDevice::builder()
            .bdf(bdf(addr))
            .bus(&bus)
            .reset_window(Duration::from_micros(200))
            .build()
    };
    let a = Arc::new(Stepper::new(device("0000:00:04.0")));
    let b = Arc::new(Stepper::new(device("0000:00:05.0")));
    let rounds = 50;
    // Each thread names the other engine as the sibling: blocking the gates
    // in argument order would deadlock; BDF order cannot.
    let threads: Vec<_> = [
        (Arc::clone(&a), Arc::clone(&b)),
        (Arc::clone(&b), Arc::clone(&a)),
    ]
    .into_iter()
    .map(|(me, other)| {
        thread::spawn(move || {
            for _ in 0..rounds {
                me.dev
                    .reset_with_siblings(&[&other.dev], |x| x.hot_reset())
                    .unwrap();
            }
        })
    })
    .collect();
    let started = Instant::now();
    for t in threads {
        while !t.is_finished() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "deadlocked (or starved) after {:?}",
                started.elapsed()
            );
            thread::sleep(Duration::from_millis(1));
        }
        t.join().unwrap();
    }
    for t in [&a, &b] {
        assert_eq!(t.sim.snapshot().resets, 2 * rounds);
        assert_eq!(t.dev.stats().resets, 2 * rounds);
        t.sim.raise();
        t.poll_host();
        assert!(t.guest_isr());
        t.poll_host();
        assert!(!t.masked());
    }
}

#[test]
fn a_sibling_that_cannot_be_prepared_stops_the_bus_reset_and_leaves_both_as_they_were() {
    let bus = vfio_intx::sim::SimBus::new();
    let device = |addr| programmed(SimDevice::builder().bdf(bdf(addr)).bus(&bus).build());
    let a = Stepper::new(device("0000:00:04.0"));
    let b = Stepper::new(device("0000:00:05.0"));
    a.sim.raise();
    a.poll_host();
    assert_eq!(a.injected(), 1);
    b.sim.inject_fault(SimOp::Mask, Fault::Eio, 0, 1);
    let err = a
        .dev
        .reset_with_siblings(&[&b.dev], |x| x.hot_reset())
        .unwrap_err();
    let text = vfio_intx::error_chain(&err);
    assert!(
        text.starts_with("0000:00:05.0: masking INTx failed"),
        "names the sibling and the step: {text}"
    );
    for t in [&a, &b] {
        assert_eq!(t.sim.snapshot().resets, 0, "nothing was reset");
        assert_eq!(
            t.dev
                .guest_config_read(PCI_BASE_ADDRESS_0, Width::Dword)
                .unwrap(),
            BAR0
        );
    }
    // The interrupt in service on the prepared engine is still completed.
    assert!(a.guest_isr());
    a.poll_host();
    assert!(!a.masked());
    assert!(!b.masked());
    assert_eq!(b.dev.stats().errors, 1);
}
