//! Resets the engine did not start (the 2011 reproducer around the gate):
//! the stuck-INTx watchdog detects and recovers the line.

use std::thread;
use std::time::{Duration, Instant};

use vfio_intx::intx::{IntxDevice, IntxOptions, Tick, WatchdogOptions};
use vfio_intx::sim::stress::{run_external_resets, ExternalResetConfig};
use vfio_intx::sim::{Fault, SimDevice, SimKernel, SimOp};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::Stepper;

fn options(enabled: bool) -> IntxOptions {
    IntxOptions::default().with_watchdog(WatchdogOptions::default().with_enabled(enabled))
}

#[test]
fn without_the_watchdog_external_resets_leave_the_vfio_line_stuck() {
    // Proof that the test below can fail: the kernel's behaviour, modelled
    // by the simulated vfio-pci, strands the line.
    let mut stuck_runs = 0;
    for _ in 0..3 {
        let report = run_external_resets(
            ExternalResetConfig::default()
                .with_options(options(false))
                .with_recovery_timeout(Duration::from_millis(500)),
        )
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
            let report = run_external_resets(
                ExternalResetConfig::default()
                    .with_kernel(kernel)
                    .with_options(options(true)),
            )
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

/// The kernel bypass on the vfio-pci model: the guest's ISR finds the
/// device inside a reset outside the engine and EOIs; KVM's resample is
/// vfio's unmask eventfd, so the unmask lands inside the reset window and
/// the reset's restore masks the line again. `tick_during_reset`: a
/// watchdog tick runs while the reset holds the device (its STATUS read
/// waits for it). Returns the engine and the irqfd.
fn strand_on_the_bypass(
    sim: &SimDevice,
    tick_during_reset: bool,
) -> (IntxDevice<vfio_intx::sim::SimBackend>, EventFd) {
    let irqfd = EventFd::new(EFD_NONBLOCK).unwrap();
    let resample = EventFd::new(EFD_NONBLOCK).unwrap();
    let dev = IntxDevice::with_kernel_bypass(
        sim.backend(),
        irqfd.try_clone().unwrap(),
        resample.try_clone().unwrap(),
        options(true),
    )
    .unwrap();
    sim.raise();
    assert_eq!(irqfd.read().unwrap(), 1, "the kernel signals the irqfd");
    thread::scope(|s| {
        let reset = s.spawn(|| sim.external_reset());
        while !sim.snapshot().in_reset {
            thread::yield_now();
        }
        assert!(!sim.ack(), "the device decodes nothing in reset");
        resample.write(1).unwrap();
        // vfio's unmask eventfd thread runs the unmask inside the window.
        thread::sleep(Duration::from_millis(5));
        if tick_during_reset {
            let (tick, _) = dev.watchdog_tick(Instant::now());
            assert_eq!(tick, Tick::Quiet);
        }
        reset.join().unwrap().unwrap();
    });
    let snap = sim.snapshot();
    assert!(
        snap.asserting && snap.command & vfio_intx::pci::regs::COMMAND_INTX_DISABLE != 0,
        "not stranded: {snap:?}"
    );
    (dev, irqfd)
}

/// Issue 11 item 7: on the kernel bypass the engine sees neither interrupt
/// nor EOI, so an asserting, masked line is one the guest may still be
/// servicing. With no sign of a reset, the watchdog only re-checks until no
/// new host interrupt has come for `guest_service_limit`; a reset it saw
/// makes it re-sync at the detection time.
#[test]
fn on_the_bypass_a_stuck_line_is_resynced_at_once_after_a_seen_reset_and_late_without() {
    let opts = WatchdogOptions::default();
    let window = Duration::from_millis(30);

    // No tick saw the reset.
    let sim = SimDevice::builder()
        .kernel(SimKernel::VfioPci)
        .reset_window(window)
        .build();
    let (dev, irqfd) = strand_on_the_bypass(&sim, false);
    let t0 = Instant::now();
    assert_eq!(dev.watchdog_tick(t0).0, Tick::Quiet);
    for at in [
        opts.detect_after + Duration::from_millis(10),
        opts.guest_service_limit / 2,
    ] {
        assert_eq!(dev.watchdog_tick(t0 + at).0, Tick::Quiet, "at {at:?}");
    }
    assert!(irqfd.read().is_err(), "nothing re-signalled");
    let late = t0 + opts.guest_service_limit + Duration::from_millis(1);
    assert_eq!(dev.watchdog_tick(late).0, Tick::Recovered);
    assert_eq!(irqfd.read().unwrap(), 1, "the re-sync re-signals the irqfd");
    let stats = dev.stats();
    assert_eq!((stats.stuck_detections, stats.watchdog_rechecks), (1, 1));

    // A tick waited for the reset: re-synced at the detection time.
    let sim = SimDevice::builder()
        .kernel(SimKernel::VfioPci)
        .reset_window(window)
        .build();
    let (dev, irqfd) = strand_on_the_bypass(&sim, true);
    let t0 = Instant::now();
    dev.watchdog_tick(t0);
    let at = t0 + opts.detect_after + Duration::from_millis(10);
    assert_eq!(dev.watchdog_tick(at).0, Tick::Recovered);
    assert_eq!(irqfd.read().unwrap(), 1, "the re-sync re-signals the irqfd");
    assert_eq!(dev.stats().watchdog_rechecks, 0);
}

/// Issue 11 item 7: the guest's own INTX_DISABLE held while the device
/// asserts is what the state machine expects: no detection, however long.
#[test]
fn a_line_the_guest_disabled_is_never_a_stuck_line() {
    for kernel in [SimKernel::Bare, SimKernel::VfioPci] {
        let sim = SimDevice::builder().kernel(kernel).build();
        let t = Stepper::with_options(sim.clone(), options(true));
        t.dev
            .guest_config_write(
                vfio_intx::pci::regs::PCI_COMMAND,
                vfio_intx::pci::Width::Word,
                u32::from(vfio_intx::pci::regs::COMMAND_INTX_DISABLE),
            )
            .unwrap();
        sim.raise();
        t.poll_host();
        let t0 = Instant::now();
        for ms in [0, 30, 60, 200, 2000] {
            let (tick, _) = t.dev.watchdog_tick(t0 + Duration::from_millis(ms));
            assert_eq!(tick, Tick::Quiet, "{kernel:?} at {ms} ms");
        }
        assert_eq!(t.dev.stats().stuck_detections, 0, "{kernel:?}");
        assert_eq!(t.injected(), 0);
    }
}
