//! Fault injection: every backend error at every call site yields a clean
//! error or a bounded retry, never a lost interrupt or a stuck-masked line.

use vfio_intx::intx::{IntxDevice, IntxOptions, LineState, RetryPolicy};
use vfio_intx::pci::regs::*;
use vfio_intx::pci::Width;
use vfio_intx::sim::{Fault, SimDevice, SimOp};

use crate::Stepper;

const FAULTS: [Fault; 5] = [
    Fault::Eio,
    Fault::Eagain,
    Fault::Ebusy,
    Fault::Gone,
    Fault::AllOnes,
];
const GUEST_COMMAND: u16 = COMMAND_MEMORY | COMMAND_MASTER;

fn fast_retry() -> IntxOptions {
    IntxOptions::default()
        .with_retry(RetryPolicy::default().with_first_backoff(std::time::Duration::from_micros(10)))
}

/// Drives a stream of interrupts, guest EOIs, resets and guest config
/// writes to the end, as the worker and a guest would, and checks every
/// error's message. Returns whether a reset's restore failed.
fn drive(t: &Stepper, interrupts: u64) -> bool {
    let mut handled = 0;
    let mut restore_failed = false;
    let check = |e: vfio_intx::intx::IntxError| {
        let text = vfio_intx::error_chain(&e);
        assert!(
            text.starts_with("0000:00:04.0: "),
            "error without the device: {text}"
        );
        text
    };
    for i in 0..interrupts {
        t.sim.raise();
        if i % 5 == 2 {
            if let Err(e) = t.dev.reset() {
                restore_failed |= check(e).contains("restoring config state");
            }
        }
        if i % 5 == 4 {
            if let Err(e) = t
                .dev
                .guest_config_write(PCI_COMMAND, Width::Word, GUEST_COMMAND.into())
            {
                check(e);
            }
        }
        // Run the worker and the guest until nothing moves.
        for _ in 0..100 {
            while t.trigger_fired() {
                if let Err(e) = t.dev.on_host_interrupt() {
                    check(e);
                }
            }
            if t.injected() > handled {
                handled += 1;
                t.sim.ack();
                if let Err(e) = t.dev.on_guest_eoi() {
                    check(e);
                }
                continue;
            }
            break;
        }
    }
    restore_failed
}

fn assert_recovered(t: &Stepper, what: &str) {
    let snap = t.sim.snapshot();
    assert_eq!(
        snap.acked, snap.raised,
        "{what}: interrupts lost ({snap:?})"
    );
    assert_eq!(t.dev.line_state(), LineState::Idle, "{what}");
    assert_eq!(
        snap.command & COMMAND_INTX_DISABLE,
        0,
        "{what}: line left masked"
    );
}

#[test]
fn one_fault_at_any_call_site_never_loses_an_interrupt_or_leaves_the_line_masked() {
    let ops = [
        SimOp::ConfigRead,
        SimOp::ConfigWrite,
        SimOp::CheckAndMask,
        SimOp::CheckAndUnmask,
        SimOp::Mask,
        SimOp::Reset,
    ];
    for op in ops {
        for fault in FAULTS {
            for skip in [0, 1, 3, 7, 12, 20] {
                let t = Stepper::with_options(SimDevice::builder().build(), fast_retry());
                t.dev
                    .guest_config_write(PCI_COMMAND, Width::Word, GUEST_COMMAND.into())
                    .unwrap();
                t.sim.inject_fault(op, fault, skip, 1);
                let restore_failed = drive(&t, 10);
                let what = format!("{op:?}/{fault:?} after {skip} calls");
                assert_recovered(&t, &what);
                let command = t.sim.snapshot().command;
                if restore_failed {
                    // Reported to the caller; the next reset puts it right.
                    t.dev.reset().unwrap();
                    assert_eq!(t.sim.snapshot().command, GUEST_COMMAND, "{what}");
                } else {
                    assert_eq!(command, GUEST_COMMAND, "{what}");
                }
            }
        }
    }
}

#[test]
fn transient_errors_are_retried_within_bounds() {
    for fault in [Fault::Eagain, Fault::Ebusy] {
        let t = Stepper::with_options(SimDevice::builder().build(), fast_retry());
        t.sim.inject_fault(SimOp::Reset, fault, 0, 3);
        t.dev.reset().unwrap();
        assert_eq!(t.dev.stats().retries, 3);
        // More failures than attempts: a clean error, device as it was.
        t.sim.inject_fault(SimOp::Reset, fault, 0, 100);
        let err = t.dev.reset().unwrap_err();
        let text = vfio_intx::error_chain(&err);
        assert!(
            text.starts_with("0000:00:04.0: reset failed: reset failed: "),
            "{text}"
        );
        t.sim.clear_faults();
        t.sim.raise();
        t.poll_host();
        assert!(t.guest_isr());
        assert_recovered(&t, "after the failed reset");
    }
}

#[test]
fn a_device_gone_for_good_gives_clean_errors_and_bounded_retries() {
    let t = Stepper::with_options(SimDevice::builder().build(), fast_retry());
    t.sim
        .inject_fault(SimOp::CheckAndMask, Fault::Gone, 0, u64::MAX);
    t.sim.raise();
    let mut errors = 0;
    while t.trigger_fired() {
        if let Err(e) = t.dev.on_host_interrupt() {
            errors += 1;
            assert_eq!(
                vfio_intx::error_chain(&e),
                "0000:00:04.0: INTx check-and-mask failed: the device is gone"
            );
        }
    }
    // The initial attempt plus the bounded re-kicks, then it waits for an event.
    assert_eq!(errors, 1 + IntxOptions::default().interrupt_path_retries);
    // The device comes back: the next service delivers what was pending.
    t.sim.clear_faults();
    t.dev.service().unwrap();
    assert_eq!(t.injected(), 1);
    assert!(t.guest_isr());
    assert_recovered(&t, "after the device came back");
}

#[test]
fn failing_to_arm_changes_nothing_and_names_the_device() {
    let sim = SimDevice::builder().build();
    let mut b = sim.backend();
    vfio_intx::backend::ConfigSpace::config_write(&mut b, PCI_COMMAND, Width::Word, 0x0006)
        .unwrap();
    for fault in FAULTS {
        sim.inject_fault(SimOp::IntxEnable, fault, 0, 1);
        let err =
            IntxDevice::new(sim.backend(), vfio_intx::intx::CallbackSink(|| Ok(()))).unwrap_err();
        let text = vfio_intx::error_chain(&err);
        assert!(
            text.starts_with("0000:00:04.0: enabling INTx failed"),
            "{text}"
        );
        assert_eq!(sim.snapshot().command, 0x0006);
        sim.raise();
        assert_eq!(sim.snapshot().host_signals, 0, "no trigger registered");
        sim.ack();
    }
}

#[test]
fn a_failing_sink_is_retried_and_the_interrupt_still_arrives() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    let sim = SimDevice::builder().build();
    let attempts = Arc::new(AtomicU64::new(0));
    let a = Arc::clone(&attempts);
    let dev = IntxDevice::new(
        sim.backend(),
        vfio_intx::intx::CallbackSink(move || {
            if a.fetch_add(1, Ordering::SeqCst) < 2 {
                Err(std::io::Error::from_raw_os_error(libc::EAGAIN))
            } else {
                Ok(())
            }
        }),
    )
    .unwrap();
    sim.raise();
    let mut errors = 0;
    while crate::readable(dev.trigger()) {
        if let Err(e) = dev.on_host_interrupt() {
            errors += 1;
            assert!(vfio_intx::error_chain(&e)
                .contains("injecting the interrupt into the guest failed"));
        }
    }
    assert_eq!(errors, 2);
    assert_eq!(attempts.load(Ordering::SeqCst), 3);
    assert_eq!(dev.line_state(), LineState::InService);
}
