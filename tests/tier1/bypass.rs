//! The engine on the kernel bypass (simulated vfio-pci): no EOI ever reaches
//! the engine there, so it must never wait for one, and whatever it does
//! to the line must end with the kernel's check-and-unmask.

use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use vfio_intx::backend::PciBackend;
use vfio_intx::intx::{IntxDevice, IntxOptions, LineState, Tick, WatchdogOptions};
use vfio_intx::sim::{Fault, SimBackend, SimDevice, SimKernel, SimOp};

use crate::{readable, Stepper};

/// KVM's irqfd and resample eventfd of a VMM.
struct Vmm {
    irqfd: EventFd,
    resample: EventFd,
}

impl Vmm {
    fn new() -> Self {
        Self {
            irqfd: EventFd::new(EFD_NONBLOCK).unwrap(),
            resample: EventFd::new(EFD_NONBLOCK).unwrap(),
        }
    }

    fn wiring(&self) -> Option<(EventFd, EventFd)> {
        Some((
            self.irqfd.try_clone().unwrap(),
            self.resample.try_clone().unwrap(),
        ))
    }

    /// Whether the irqfd was signalled since the last call (drains it).
    fn signalled(&self) -> bool {
        readable(&self.irqfd) && self.irqfd.read().is_ok()
    }
}

fn vfio_stepper(options: IntxOptions) -> Stepper {
    Stepper::with_options(
        SimDevice::builder().kernel(SimKernel::VfioPci).build(),
        options,
    )
}

/// Waits for the simulated kernel's unmask-eventfd thread.
fn wait_unmasked(t: &Stepper) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while t.masked() {
        assert!(Instant::now() < deadline, "the kernel never unmasked");
        std::thread::yield_now();
    }
}

/// Issue 11 item 1: the daemon's detach then attach. On the user path the
/// kernel signalled the engine's trigger and nobody read it before the
/// switch onto the bypass; the worker then wakes on that stale count. It
/// must not inject and wait in service for an EOI that goes to the kernel:
/// after the device lowers and a reset, the next raise reaches the irqfd.
#[test]
fn a_stale_trigger_count_on_the_bypass_never_parks_the_line_in_service() {
    let t = vfio_stepper(IntxOptions::default());
    let vmm = Vmm::new();
    t.sim.raise();
    assert!(
        t.trigger_fired(),
        "the kernel signalled the user-space path"
    );
    t.dev.set_kernel_bypass(vmm.wiring()).unwrap();
    assert!(vmm.signalled(), "the switch re-signals the asserted line");
    // The worker wakes on the count left from the user path.
    t.poll_host();
    assert_ne!(
        t.dev.line_state(),
        LineState::InService,
        "in service on the bypass: no EOI will ever reach the engine"
    );
    assert_eq!(t.injected(), 0, "the engine injected on the bypass");
    // The guest's driver lowers the line; then a reset through the engine.
    assert!(t.sim.ack());
    t.dev.reset().unwrap();
    vmm.signalled();
    assert!(!t.masked(), "the reset left the line masked on the bypass");
    t.sim.raise();
    assert!(
        vmm.signalled(),
        "the next interrupt never reached the irqfd"
    );
    // And the kernel's own cycle goes on: EOI, unmask, next interrupt.
    assert!(t.sim.ack());
    vmm.resample.write(1).unwrap();
    wait_unmasked(&t);
    t.sim.raise();
    assert!(vmm.signalled());
    assert_eq!(t.dev.line_state(), LineState::Idle);
}

/// Issue 11 item 1: the watchdog's recovery on the bypass (mask, settle)
/// ends with the kernel's check-and-unmask, which re-signals the irqfd for
/// a device still asserting — also after a stale trigger count.
#[test]
fn the_watchdog_recovery_on_the_bypass_ends_with_the_kernels_unmask() {
    let t = vfio_stepper(IntxOptions::default());
    let vmm = Vmm::new();
    t.sim.raise();
    t.dev.set_kernel_bypass(vmm.wiring()).unwrap();
    t.poll_host();
    vmm.signalled();
    // The device keeps asserting with nothing arriving (as after a reset
    // outside vfio-intx undid an unmask). On the bypass the guest may still
    // be servicing it, so with no reset seen the watchdog only re-checks at
    // the detection time, and re-syncs once no host interrupt came for the
    // guest service limit.
    let opts = WatchdogOptions::default();
    let t0 = Instant::now();
    assert_eq!(t.dev.watchdog_tick(t0).0, Tick::Quiet);
    let recheck = t0 + opts.detect_after + Duration::from_millis(10);
    assert_eq!(t.dev.watchdog_tick(recheck).0, Tick::Quiet);
    let later = t0 + opts.guest_service_limit + Duration::from_millis(10);
    assert_eq!(t.dev.watchdog_tick(later).0, Tick::Recovered);
    assert!(
        vmm.signalled(),
        "the re-sync ended masked: nothing re-signalled the irqfd"
    );
    assert!(t.sim.ack());
    vmm.resample.write(1).unwrap();
    wait_unmasked(&t);
    t.sim.raise();
    assert!(vmm.signalled());
}

/// Issue 11 item 3: the kernel allows one unmask eventfd per device
/// (`vfio_virqfd_enable` answers EBUSY for a second); the simulated
/// vfio-pci does the same instead of silently replacing it.
#[test]
fn the_simulated_vfio_pci_refuses_a_second_unmask_eventfd_with_ebusy() {
    let sim = SimDevice::builder().kernel(SimKernel::VfioPci).build();
    let mut b = sim.backend();
    let (first, second) = (Vmm::new(), Vmm::new());
    b.intx_enable(&first.irqfd).unwrap();
    b.intx_set_unmask_eventfd(Some(&first.resample)).unwrap();
    let err = b
        .intx_set_unmask_eventfd(Some(&second.resample))
        .unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(vfio_intx::error_chain(&err).contains("busy"), "{err}");
    // The first one still works.
    sim.raise();
    assert!(first.signalled());
    assert!(sim.ack());
    first.resample.write(1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while sim.snapshot().command & vfio_intx::pci::regs::COMMAND_INTX_DISABLE != 0 {
        assert!(
            Instant::now() < deadline,
            "the first unmask eventfd is gone"
        );
        std::thread::yield_now();
    }
    // Removed (fd -1), then a new one is accepted.
    b.intx_set_unmask_eventfd(None).unwrap();
    b.intx_set_unmask_eventfd(Some(&second.resample)).unwrap();
}

/// Issue 11 item 3: `set_kernel_bypass(Some)` while already on the bypass
/// swaps the wiring: the old unmask eventfd is removed before the new one
/// is added, and interrupts and EOIs go through the new pair only.
#[test]
fn switching_the_bypass_to_new_wiring_swaps_it_completely() {
    let t = vfio_stepper(IntxOptions::default());
    let (old, new) = (Vmm::new(), Vmm::new());
    t.dev.set_kernel_bypass(old.wiring()).unwrap();
    t.sim.raise();
    assert!(old.signalled());
    // The old VMM leaves the interrupt unserviced; the new one takes over.
    t.dev.set_kernel_bypass(new.wiring()).unwrap();
    assert!(t.dev.is_kernel_bypass());
    assert!(new.signalled(), "the asserted line goes to the new irqfd");
    assert!(!old.signalled());
    assert!(t.sim.ack());
    // The old resample eventfd no longer unmasks; the new one does.
    old.resample.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert!(t.masked(), "the old unmask eventfd is still registered");
    new.resample.write(1).unwrap();
    wait_unmasked(&t);
    t.sim.raise();
    assert!(new.signalled());
    assert!(!old.signalled());
    assert!(!t.trigger_fired(), "no user-space work on the bypass");
    assert_eq!(t.injected(), 0);
}

/// Issue 11 item 3: a swap that fails half-way leaves no half-torn wiring:
/// the engine is back on the user-space path, whole, and says so.
#[test]
fn a_failed_bypass_swap_falls_back_to_the_whole_user_space_path() {
    let t = vfio_stepper(IntxOptions::default());
    let (old, new) = (Vmm::new(), Vmm::new());
    t.dev.set_kernel_bypass(old.wiring()).unwrap();
    t.sim.inject_fault(SimOp::IntxEnable, Fault::Eio, 0, 1);
    assert!(t.dev.set_kernel_bypass(new.wiring()).is_err());
    assert!(!t.dev.is_kernel_bypass(), "bypass reported, wiring gone");
    // Neither resample eventfd unmasks any more; the user-space path works.
    t.sim.raise();
    assert!(!old.signalled() && !new.signalled());
    t.poll_host();
    assert_eq!(t.injected(), 1);
    assert!(t.sim.ack());
    old.resample.write(1).unwrap();
    new.resample.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert!(t.masked(), "a stale unmask eventfd is still registered");
    t.dev.on_guest_eoi().unwrap();
    assert!(!t.masked());
    assert_eq!(t.dev.line_state(), LineState::Idle);
    // And onto the bypass again.
    t.dev.set_kernel_bypass(new.wiring()).unwrap();
    t.sim.raise();
    assert!(new.signalled());
}

/// A watchdog tick that finds the gate held (a VMM reading the device's
/// state) returns Busy and comes back at its next tick. It must not leave a
/// deferral behind: the kick would make the worker re-check the line, and on
/// the bypass that re-check's UNMASK re-signals the irqfd of an interrupt
/// the guest is still servicing — delivered again after the guest's EOI, for
/// a device no longer asserting (the tier-2 "ISR saw the device not
/// asserting" flake).
#[test]
fn a_watchdog_tick_that_finds_the_gate_held_leaves_no_recheck_behind() {
    let t = vfio_stepper(IntxOptions::default());
    let vmm = Vmm::new();
    t.dev.set_kernel_bypass(vmm.wiring()).unwrap();
    t.sim.raise();
    assert!(vmm.signalled(), "the kernel signals the irqfd");
    // The guest is servicing it: the kernel keeps the line masked.
    let tick = t
        .dev
        .with_backend(|_| t.dev.watchdog_tick(Instant::now()).0);
    assert_eq!(tick, Tick::Busy);
    assert!(
        !t.trigger_fired(),
        "the busy tick queued a re-check (a kick) for the worker"
    );
    t.poll_host();
    assert!(
        !vmm.signalled(),
        "the irqfd was signalled again while the guest services the interrupt"
    );
    // The guest's ISR and EOI: the kernel unmasks; nothing else arrives.
    assert!(t.sim.ack());
    vmm.resample.write(1).unwrap();
    wait_unmasked(&t);
    assert!(
        !vmm.signalled(),
        "an interrupt for nothing reached the guest"
    );
}

/// The wiring-touching backend calls, by kind.
fn wiring_calls(sim: &SimDevice) -> [u64; 5] {
    [
        SimOp::IntxEnable,
        SimOp::IntxDisable,
        SimOp::SetUnmaskEventfd,
        SimOp::Mask,
        SimOp::CheckAndUnmask,
    ]
    .map(|op| sim.calls(op))
}

/// An engine on the bypass whose process dies (kill -9: nothing is torn
/// down; the kernel keeps its trigger and unmask eventfd while the fd store
/// keeps the device file open), with the guest servicing an interrupt.
fn bypass_then_killed(sim: &SimDevice, vmm: &Vmm) {
    let (irqfd, resample) = vmm.wiring().unwrap();
    let old =
        IntxDevice::with_kernel_bypass(sim.backend(), irqfd, resample, IntxOptions::default())
            .unwrap();
    sim.raise();
    assert!(vmm.signalled());
    assert!(sim.ack());
    vmm.resample.write(1).unwrap();
    wait_until_unmasked(sim);
    sim.raise();
    assert!(vmm.signalled(), "the kernel signals the irqfd");
    // The process is gone without running any teardown.
    std::mem::forget(old);
}

fn wait_until_unmasked(sim: &SimDevice) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while sim.snapshot().command & vfio_intx::pci::regs::COMMAND_INTX_DISABLE != 0 {
        assert!(Instant::now() < deadline, "the kernel never unmasked");
        std::thread::yield_now();
    }
}

fn adopt(sim: &SimDevice, vmm: &Vmm) -> Result<IntxDevice<SimBackend>, vfio_intx::intx::IntxError> {
    let (irqfd, resample) = vmm.wiring().unwrap();
    IntxDevice::with_adopted_bypass(
        sim.backend(),
        irqfd.try_clone().unwrap(),
        irqfd,
        resample,
        IntxOptions::default(),
    )
}

/// Issue 14 (the bypass goal): a new process takes over the bypass the
/// previous one left, as the kernel has it: no SET_IRQS of the trigger, no
/// unmask eventfd removed or added, no mask or unmask. The interrupt in the
/// guest's handler across the takeover, one raised while it runs and one
/// right after each reach the irqfd exactly once, and the line never ends
/// masked.
#[test]
fn adopting_the_bypass_rewires_nothing_and_every_interrupt_reaches_the_irqfd_once() {
    let sim = SimDevice::builder().kernel(SimKernel::VfioPci).build();
    let vmm = Vmm::new();
    bypass_then_killed(&sim, &vmm);
    let before = wiring_calls(&sim);
    // Taken over while the guest services an interrupt: not signalled again
    // (a second signal could land after the guest's EOI: a second delivery).
    let dev = adopt(&sim, &vmm).unwrap();
    assert_eq!(
        wiring_calls(&sim),
        before,
        "adopting called [enable, disable, unmask eventfd, mask, check-and-unmask] this often"
    );
    assert_eq!(sim.calls(SimOp::IntxAdopt), 1);
    assert!(dev.is_kernel_bypass());
    assert_eq!(dev.line_state(), LineState::Idle);
    assert!(
        !vmm.signalled(),
        "the interrupt in service was signalled again"
    );
    // The guest's EOI goes to the kernel through the adopted pair; the next
    // interrupt reaches the irqfd once.
    assert!(sim.ack());
    vmm.resample.write(1).unwrap();
    wait_until_unmasked(&sim);
    sim.raise();
    assert_eq!(vmm.irqfd.read().unwrap(), 1);
    assert!(!readable(dev.trigger()), "user-space work on the bypass");
    // Once more, with the guest finishing that interrupt and the device
    // raising the next while a third process adopts the wiring.
    std::mem::forget(dev);
    let raiser = {
        let sim = sim.clone();
        let resample = vmm.resample.try_clone().unwrap();
        std::thread::spawn(move || {
            assert!(sim.ack());
            resample.write(1).unwrap();
            wait_until_unmasked(&sim);
            sim.raise();
        })
    };
    let dev = adopt(&sim, &vmm).unwrap();
    raiser.join().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !readable(&vmm.irqfd) {
        assert!(
            Instant::now() < deadline,
            "the interrupt raised during the adoption was lost"
        );
        std::thread::yield_now();
    }
    assert_eq!(vmm.irqfd.read().unwrap(), 1, "delivered more than once");
    assert!(sim.ack());
    vmm.resample.write(1).unwrap();
    wait_until_unmasked(&sim);
    assert!(
        !vmm.signalled(),
        "an interrupt for nothing reached the guest"
    );
    assert_eq!(wiring_calls(&sim), before);
    assert_eq!(dev.line_state(), LineState::Idle);
}

/// Issue 14: the adopted bypass is the bypass of the state machine: a
/// reset through the engine ends with the kernel's unmask and the next
/// interrupt reaches the irqfd; the watchdog's bypass rules re-sync a line
/// stuck asserting; nothing is ever in service.
#[test]
fn a_reset_and_the_watchdog_on_an_adopted_bypass_behave_as_on_a_fresh_one() {
    let sim = SimDevice::builder().kernel(SimKernel::VfioPci).build();
    let vmm = Vmm::new();
    bypass_then_killed(&sim, &vmm);
    let dev = adopt(&sim, &vmm).unwrap();
    // The guest's driver lowers the line; then a reset through the engine.
    assert!(sim.ack());
    dev.reset().unwrap();
    vmm.signalled();
    if readable(dev.trigger()) {
        dev.on_host_interrupt().unwrap();
    }
    assert_ne!(dev.line_state(), LineState::InService);
    wait_until_unmasked(&sim);
    sim.raise();
    assert!(
        vmm.signalled(),
        "the next interrupt never reached the irqfd"
    );
    // It keeps asserting with nothing arriving: as on a fresh bypass, the
    // watchdog re-checks and, past the guest service limit, re-syncs with
    // the kernel's unmask, which re-signals the irqfd.
    let opts = WatchdogOptions::default();
    let t0 = Instant::now();
    assert_eq!(dev.watchdog_tick(t0).0, Tick::Quiet);
    let recheck = t0 + opts.detect_after + Duration::from_millis(10);
    assert_eq!(dev.watchdog_tick(recheck).0, Tick::Quiet);
    let later = t0 + opts.guest_service_limit + Duration::from_millis(10);
    assert_eq!(dev.watchdog_tick(later).0, Tick::Recovered);
    assert!(vmm.signalled(), "the re-sync ended masked");
    assert!(sim.ack());
    vmm.resample.write(1).unwrap();
    wait_until_unmasked(&sim);
    sim.raise();
    assert!(vmm.signalled());
    assert_eq!(dev.line_state(), LineState::Idle);
}

/// Issue 14: where the kernel shows no bypass wiring (the previous process
/// had taken the line back to user space), adopting is refused and nothing
/// stays armed; wiring the bypass afresh then works.
#[test]
fn adopting_a_bypass_the_kernel_does_not_have_is_refused() {
    let sim = SimDevice::builder().kernel(SimKernel::VfioPci).build();
    let vmm = Vmm::new();
    let err = adopt(&sim, &vmm).unwrap_err();
    assert!(
        vfio_intx::error_chain(&err).contains("adopting"),
        "{}",
        vfio_intx::error_chain(&err)
    );
    let (irqfd, resample) = vmm.wiring().unwrap();
    let dev =
        IntxDevice::with_kernel_bypass(sim.backend(), irqfd, resample, IntxOptions::default())
            .unwrap();
    sim.raise();
    assert!(vmm.signalled());
    assert!(dev.is_kernel_bypass());
}
