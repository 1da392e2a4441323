//! Tier 3: the stuck-INTx watchdog against the 2011 reproducer on the real
//! kernel, inside the vfio-intx QEMU guest (guest/README.md).
//!
//! The scenario of `vfio_intx::sim::stress::run_external_resets`, for real:
//! two threads loop writing "1" to the edu's sysfs `reset` file (exactly
//! `while :; do echo 1 > /sys/bus/pci/devices/$BDF/reset; done`, twice, in
//! parallel: resets the engine's gate never sees) for 10 s while the edu
//! raises interrupts steadily and a guest acknowledges them. Then the loops
//! stop and the test checks that delivery comes back — with the watchdog —
//! or proves that the line is stuck masked — without it (KERNEL-NOTES.md,
//! "Measured: the 2011 reproducer against today's kernel").
//!
//! Paths: the user-space path on vfio-pci and on uio_pci_generic (an engine,
//! its `run_worker`, and a guest thread: sink eventfd -> ack one edu status
//! bit -> resample eventfd), and the kernel bypass on vfio-pci with KVM
//! inside the QEMU guest (`Assignment` with `PathPolicy::Fast`: KVM's
//! resample eventfd is vfio's ACTION_UNMASK eventfd).
//!
//! Counting on a device that is in reset nearly all the time: with two
//! loops, one reset (~12 ms under emulation) follows the other at once, and
//! user space practically never finds the edu decoding while they run (a
//! thread reading edu's ID register as fast as it could saw it answer in no
//! gap between two resets in 3 s). QEMU's edu does not decode while a reset
//! holds it (reads return 0, writes are dropped), and a reset lowers its
//! INTx line while it keeps its own status bits. So the raiser writes a
//! raise every few milliseconds, and the bookkeeping ([`Book`], under a lock
//! shared with the guest's ISR, so raises, acks and the reads that confirm
//! them never interleave) counts a raise as raised only once a status read
//! made while the device decodes (bracketed by two reads of the ID
//! register) shows its bit — or the ISR acked it — and an ack as delivered
//! only once such a read shows the bit cleared. Each raise sets one status
//! bit that is not pending yet (with all 32 pending, a raise period is
//! skipped), and each ISR run acknowledges one bit, so
//! "raised" and "delivered" count the same things. A bit whose line a
//! reset dropped (pending at the device, STATUS.INTERRUPT clear, nothing in
//! flight, after the loops stopped) is raised again and counted separately:
//! that is edu's quirk, not a stuck mask, and no watchdog can see it.
//!
//! Outside the guest every test prints a SKIP line and returns. Run with
//! `--test-threads=1` (scripts/tier3.sh does).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use common::{physical, say, Bar0, EDU_ACK, EDU_ID, EDU_ID_VALUE, EDU_RAISE, EDU_STATUS};
use vfio_intx::backend::{ConfigSpace, PciBackend};
use vfio_intx::error_chain;
use vfio_intx::intx::{
    run_worker, InterruptSink, IntxDevice, IntxOptions, IntxStats, LineState, WatchdogOptions,
};
use vfio_intx::kvm::assign::{Assignment, DeviceSide};
use vfio_intx::kvm::{Path, PathPolicy};
use vfio_intx::pci::intx::read_command_status;
use vfio_intx::pci::regs::{COMMAND_INTX_DISABLE, COMMAND_MASTER, COMMAND_MEMORY, PCI_COMMAND};
use vfio_intx::pci::sysfs::{PciSysfs, SysfsConfig};
use vfio_intx::pci::{Bdf, Width};
use vfio_intx::uio::UioBackend;
use vfio_intx::vfio::{RegionAccess, VfioBackend};

// ------------------------------------------------------------------ knobs

/// How long the two reset loops run.
const STORM_FOR: Duration = Duration::from_secs(10);
/// Pause between two raises during the storm.
const RAISE_EVERY: Duration = Duration::from_millis(3);
/// With the watchdog: how long after the last reset delivery may take to
/// come back before the test calls the line stuck.
const RECOVERY_LIMIT: Duration = Duration::from_secs(5);
/// With the watchdog: the most the last reset -> all delivered time may
/// take. Detection (50 ms) and a tick or two, raising a bit again whose line
/// the last reset dropped (~40 ms), and delivering up to 32 pending
/// interrupts: ~130 ms measured, with room for a busy host. A watchdog that
/// waits for its idle tick (1 s) does not fit: 1.06-1.10 s measured on the
/// bypass before it took a config read that waited for a reset as a sign
/// of activity.
const RECOVERY_BOUND: Duration = Duration::from_millis(750);
/// Without the watchdog: no delivery for this long after the loops stopped,
/// with the device asserting and physically masked, is a stuck line.
const STUCK_AFTER: Duration = Duration::from_secs(1);
/// How long the reset loops run in each round of the comparison with the
/// bare servicer.
const COMPARE_STORM_FOR: Duration = Duration::from_secs(5);
/// Noise allowed in that comparison (one round per subject and ISR delay):
/// this many, plus half the bare servicer's figure. Measured in 5 s rounds
/// with an ISR that reaches the device at once: the user-space path 53-100
/// ISR runs that found their bit, the bypass 61-98 (one path's rounds vary
/// by a factor of 1.9), the bare servicer 68 and 83 in two rounds and 0 in
/// nine (its line stuck early, see [`BareServicer`]).
const COMPARE_SLACK: u64 = 2;
/// What issue 11 item 13 reports for its bare servicer during the loops (10
/// to 12 delivered in a run); the project must deliver this many in
/// [`COMPARE_STORM_FOR`] with an ISR that reaches the device at once.
const ISSUE_BARE_DELIVERED: u64 = 12;
/// Rounds of the storm without the watchdog until the line sticks.
const ROUNDS_WITHOUT_WATCHDOG: usize = 3;
/// Bound on waiting for the edu to decode again (a reset takes ~10 ms).
const DECODE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the guest's ISR takes to reach the device after the interrupt
/// (a driver's own work before it touches the device), on every path.
///
/// The interrupt reaches the guest right after a reset ends: the engine's
/// check-and-mask (user-space path) and the KVM guest's config read of
/// COMMAND/STATUS (bypass) go through vfio-pci's config region, which
/// sleeps until the reset in progress is over. An ISR that acked at once
/// mostly reached the device in the short gap before the next reset, and
/// its EOI (the unmask) seldom landed inside a reset. Measured without this
/// delay and without the watchdog, over two boots: the bypass stuck in 1 of
/// 3 ten-second rounds (0 of 165 and 0 of 295 ISR runs found the device
/// mid-reset in the other two), the user-space path in 2 of 3 (0 of 120 in
/// the third). With a millisecond between the interrupt and the device
/// access, the ack and the EOI land anywhere in the reset cycle, and the
/// line stuck at the first interrupt in every round measured.
const ISR_DELAY: Duration = Duration::from_millis(1);

// ------------------------------------------------------------------ setup

/// The device named by `var` inside the guest; outside it, a loud SKIP.
fn guest_device(var: &str, test: &str) -> Option<Bdf> {
    common::guest_device(
        var,
        test,
        "the real kernel's vfio-pci / uio_pci_generic and sysfs reset",
    )
}

fn options(watchdog: bool) -> IntxOptions {
    IntxOptions::default().with_watchdog(WatchdogOptions::default().with_enabled(watchdog))
}

// ------------------------------------------------------------------ the edu

/// 4-byte access to edu's BAR0, through VFIO or a uio sysfs mapping.
trait EduBar: Send + Sync {
    /// `None` when the access itself failed.
    fn read(&self, offset: u64) -> Option<u32>;
    fn write(&self, offset: u64, value: u32);
}

impl EduBar for RegionAccess {
    fn read(&self, offset: u64) -> Option<u32> {
        self.read_u32(offset).ok()
    }
    fn write(&self, offset: u64, value: u32) {
        self.write_u32(offset, value)
            .unwrap_or_else(|e| panic!("edu BAR0 write at {offset:#x}: {}", error_chain(&e)));
    }
}

impl EduBar for Bar0 {
    fn read(&self, offset: u64) -> Option<u32> {
        Some(Bar0::read(self, offset))
    }
    fn write(&self, offset: u64, value: u32) {
        Bar0::write(self, offset, value);
    }
}

/// What the test knows about edu's status bits. Every change happens under
/// [`Edu::book`]'s lock together with the BAR access that justifies it, so
/// raises, acks and the reads that confirm them never interleave.
#[derive(Debug, Clone, Default)]
struct Book {
    /// Bits raised (landed, or being raised) and not yet delivered.
    outstanding: u32,
    /// The bit being raised: written (again each raise period), not yet
    /// seen set.
    raising: u32,
    /// Bits whose ack was written and not yet seen cleared.
    acking: u32,
    next_bit: u32,
    /// Raises seen landed (their bit read back set, or acked).
    raised: u64,
    /// Raise writes, most of them swallowed while a reset holds the device.
    raise_writes: u64,
    /// Raise attempts that never landed before the loops stopped.
    withdrawn: u64,
    /// Raise periods skipped because all 32 bits were outstanding.
    skipped: u64,
    /// Acks seen landed (their bit read back clear).
    delivered: u64,
    /// Acks written by the guest's ISR.
    ack_writes: u64,
    /// Acks a reset swallowed (the bit read back still set; acked again by
    /// a later ISR run).
    acks_swallowed: u64,
    /// ISR runs that found no pending bit (e.g. a status read mid-reset).
    empty: u64,
    /// Pending bits raised again after a reset dropped their line.
    reraised: u64,
    isr_runs: u64,
}

/// The edu with exact bookkeeping of raised and acknowledged status bits
/// (see the module documentation).
struct Edu {
    bar: Box<dyn EduBar>,
    book: Mutex<Book>,
    /// The guest's ISR is running (set around it by the guest side).
    isr_busy: AtomicBool,
}

impl Edu {
    fn new(bar: Box<dyn EduBar>) -> Self {
        assert_eq!(
            bar.read(EDU_ID),
            Some(EDU_ID_VALUE),
            "not an edu, or BAR0 not decoded"
        );
        // A status left by an earlier test.
        let stale = bar.read(EDU_STATUS).unwrap();
        if stale != 0 {
            bar.write(EDU_ACK, stale);
        }
        Self {
            bar,
            book: Mutex::default(),
            isr_busy: AtomicBool::new(false),
        }
    }

    fn book(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn raised(&self) -> u64 {
        self.book().raised
    }

    fn delivered(&self) -> u64 {
        self.book().delivered
    }

    /// The status, if the device decodes: a status read between two reads
    /// of the ID register that both answer (a reset takes milliseconds, the
    /// three reads microseconds). A device held in reset reads 0.
    fn decoding_status(&self) -> Option<u32> {
        let id = || self.bar.read(EDU_ID) == Some(EDU_ID_VALUE);
        if !id() {
            return None;
        }
        let status = self.bar.read(EDU_STATUS)?;
        id().then_some(status)
    }

    /// Settles what a status read while the device decodes proves: a bit
    /// being raised that reads set landed; an acked bit that reads clear was
    /// delivered, one that still reads set had its ack swallowed.
    fn resolve(b: &mut Book, status: u32) {
        if b.raising & status != 0 {
            b.raising = 0;
            b.raised += 1;
        }
        let delivered = b.acking & !status;
        b.delivered += u64::from(delivered.count_ones());
        b.acks_swallowed += u64::from((b.acking & status).count_ones());
        b.outstanding &= !delivered;
        b.acking = 0;
    }

    /// Resolves what can be resolved now, if the device decodes.
    fn try_resolve(&self, b: &mut Book) {
        if b.raising | b.acking == 0 {
            return;
        }
        if let Some(status) = self.decoding_status() {
            Self::resolve(b, status);
        }
    }

    /// One raise period: write the bit being raised again, or raise a new
    /// bit (one that is not outstanding) once the last one landed.
    fn raise_tick(&self) {
        let mut b = self.book();
        self.try_resolve(&mut b);
        if b.raising == 0 {
            let first = b.next_bit;
            b.next_bit = (b.next_bit + 1) % 32;
            let busy = b.outstanding;
            let Some(k) = (0..32)
                .map(|i| (first + i) % 32)
                .find(|k| busy & (1 << k) == 0)
            else {
                b.skipped += 1;
                return;
            };
            b.raising = 1 << k;
            b.outstanding |= b.raising;
        }
        self.bar.write(EDU_RAISE, b.raising);
        b.raise_writes += 1;
    }

    /// After the last raise period (no reset running any more): waits until
    /// the device decodes, resolves, and withdraws a raise that never
    /// landed. Returns whether the device decoded.
    fn finish_raising(&self) -> bool {
        let deadline = Instant::now() + DECODE_TIMEOUT;
        let mut b = self.book();
        loop {
            if let Some(status) = self.decoding_status() {
                Self::resolve(&mut b, status);
                if b.raising != 0 {
                    b.outstanding &= !b.raising;
                    b.raising = 0;
                    b.withdrawn += 1;
                }
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_micros(200));
        }
    }

    /// The guest ISR's device access: read the status, acknowledge one of
    /// the pending bits. Returns whether one was pending. A status read
    /// mid-reset sees nothing, as a real driver's would.
    fn isr_ack(&self) -> bool {
        let mut b = self.book();
        b.isr_runs += 1;
        self.try_resolve(&mut b);
        // Only bits this test raised count.
        let status = self.bar.read(EDU_STATUS).unwrap_or(0) & b.outstanding;
        if status == 0 {
            b.empty += 1;
            return false;
        }
        let bit = 1 << status.trailing_zeros();
        if b.raising & bit != 0 {
            // Seen set: it landed.
            b.raising = 0;
            b.raised += 1;
        }
        self.bar.write(EDU_ACK, bit);
        b.acking |= bit;
        b.ack_writes += 1;
        true
    }

    /// Resolves now if the device decodes; returns (raised, delivered,
    /// outstanding).
    fn poll(&self) -> (u64, u64, u32) {
        let mut b = self.book();
        self.try_resolve(&mut b);
        (b.raised, b.delivered, b.outstanding)
    }

    /// Pending bits: outstanding, no ack in flight, set in a status read
    /// while the device decodes.
    fn pending(&self) -> Option<u32> {
        let mut b = self.book();
        let status = self.decoding_status()?;
        Self::resolve(&mut b, status);
        Some(status & b.outstanding & !b.raising)
    }

    /// Raises the lowest pending bit again: edu asserts its line for it
    /// without a new status bit. Returns whether one was pending.
    fn reraise_pending(&self) -> bool {
        let mut b = self.book();
        let Some(status) = self.decoding_status() else {
            return false;
        };
        Self::resolve(&mut b, status);
        let pending = status & b.outstanding & !b.raising;
        if pending == 0 {
            return false;
        }
        self.bar.write(EDU_RAISE, 1 << pending.trailing_zeros());
        b.reraised += 1;
        true
    }

    fn counts(&self) -> String {
        let b = self.book().clone();
        format!(
            "raise writes {} (withdrawn {}, skipped {}), ack writes {} (swallowed {}), \
             empty ISR runs {} of {}, outstanding {:#x}",
            b.raise_writes,
            b.withdrawn,
            b.skipped,
            b.ack_writes,
            b.acks_swallowed,
            b.empty,
            b.isr_runs,
            b.outstanding,
        )
    }
}

// ------------------------------------------------------------------ subjects

/// What the scenario needs from a setup under test.
trait Subject: Sync {
    fn label(&self) -> &str;
    fn bdf(&self) -> Bdf;
    fn edu(&self) -> &Edu;
    fn stats(&self) -> IntxStats;
    fn line_state(&self) -> LineState;
    /// COMMAND as the backend shows it (vfio-pci: the virtual INTX_DISABLE).
    fn backend_command(&self) -> Option<u16>;
    /// Nothing in flight towards or inside the guest's ISR.
    fn guest_idle(&self) -> bool;
    /// Changes whenever the engine or the guest did something.
    fn activity(&self) -> u64;
    /// What recovered the line in KERNEL-NOTES: MASK, then check-and-unmask.
    fn resync_by_hand(&self);
    fn diagnostics(&self) -> String {
        let edu = self.edu();
        format!(
            "physical {:?}, backend COMMAND {:?}, edu status {:?}, line {:?}, raised {}, \
             delivered {}, {}; engine {:?}",
            physical(self.bdf()),
            self.backend_command().map(|c| format!("{c:#06x}")),
            edu.decoding_status().map(|s| format!("{s:#x}")),
            self.line_state(),
            edu.raised(),
            edu.delivered(),
            edu.counts(),
            self.stats(),
        )
    }
}

/// The sink: counts an injection before signalling the guest's eventfd, so
/// the count is never behind what the guest has seen.
struct CountingSink {
    irq: Arc<EventFd>,
    injected: Arc<AtomicU64>,
}

impl InterruptSink for CountingSink {
    fn inject(&self) -> io::Result<()> {
        self.injected.fetch_add(1, Ordering::SeqCst);
        self.irq.write(1)
    }
}

/// The user-space path: an engine on `B`, its worker (which ticks the
/// watchdog), and a guest thread.
struct UserSpaceRig<B: PciBackend + 'static> {
    label: String,
    bdf: Bdf,
    device: Arc<IntxDevice<B>>,
    edu: Arc<Edu>,
    injected: Arc<AtomicU64>,
    /// Injections the guest thread has read from its eventfd.
    seen: Arc<AtomicU64>,
    stop_worker: Arc<EventFd>,
    stop_guest: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl<B: PciBackend + 'static> UserSpaceRig<B> {
    fn start(label: &str, backend: B, edu: Edu, watchdog: bool, isr_delay: Duration) -> Self {
        let bdf = backend.bdf();
        let irq = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let resample = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let injected = Arc::new(AtomicU64::new(0));
        let sink = CountingSink {
            irq: Arc::clone(&irq),
            injected: Arc::clone(&injected),
        };
        let device = Arc::new(
            IntxDevice::with_options(backend, sink, options(watchdog))
                .unwrap_or_else(|e| panic!("{}", error_chain(&e))),
        );
        let mut rig = Self {
            label: label.to_owned(),
            bdf,
            device,
            edu: Arc::new(edu),
            injected,
            seen: Arc::default(),
            stop_worker: Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
            stop_guest: Arc::default(),
            threads: Vec::new(),
        };
        let (device, stop) = (Arc::clone(&rig.device), Arc::clone(&rig.stop_worker));
        let worker_resample = Arc::clone(&resample);
        rig.threads.push(thread::spawn(move || {
            run_worker(&device, Some(&worker_resample), &stop).unwrap();
        }));
        let (edu, stop, seen) = (
            Arc::clone(&rig.edu),
            Arc::clone(&rig.stop_guest),
            Arc::clone(&rig.seen),
        );
        rig.threads.push(thread::spawn(move || {
            guest_loop(&edu, &irq, &resample, &stop, &seen, isr_delay);
        }));
        rig
    }
}

impl<B: PciBackend + 'static> Drop for UserSpaceRig<B> {
    fn drop(&mut self) {
        self.stop_guest.store(true, Ordering::SeqCst);
        let _ = self.stop_worker.write(1);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let _ = self.device.disarm();
    }
}

/// The guest driver: on each injection, acknowledge one edu status bit,
/// then EOI (KVM would signal the resample eventfd).
fn guest_loop(
    edu: &Edu,
    irq: &EventFd,
    resample: &EventFd,
    stop: &AtomicBool,
    seen: &AtomicU64,
    isr_delay: Duration,
) {
    let epoll = Epoll::new().unwrap();
    epoll
        .ctl(
            ControlOperation::Add,
            irq.as_raw_fd(),
            EpollEvent::new(EventSet::IN, 0),
        )
        .unwrap();
    let mut events = [EpollEvent::default(); 1];
    while !stop.load(Ordering::SeqCst) {
        match epoll.wait(10, &mut events) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => panic!("guest epoll_wait: {e}"),
        }
        edu.isr_busy.store(true, Ordering::SeqCst);
        let Ok(count) = irq.read() else {
            edu.isr_busy.store(false, Ordering::SeqCst);
            continue;
        };
        seen.fetch_add(count, Ordering::SeqCst);
        thread::sleep(isr_delay);
        edu.isr_ack();
        resample.write(1).unwrap();
        edu.isr_busy.store(false, Ordering::SeqCst);
    }
}

impl<B: PciBackend + 'static> Subject for UserSpaceRig<B> {
    fn label(&self) -> &str {
        &self.label
    }
    fn bdf(&self) -> Bdf {
        self.bdf
    }
    fn edu(&self) -> &Edu {
        &self.edu
    }
    fn stats(&self) -> IntxStats {
        self.device.stats()
    }
    fn line_state(&self) -> LineState {
        self.device.line_state()
    }
    fn backend_command(&self) -> Option<u16> {
        self.device.command_status().ok().map(|cs| cs.command)
    }
    fn guest_idle(&self) -> bool {
        !self.edu.isr_busy.load(Ordering::SeqCst)
            && self.injected.load(Ordering::SeqCst) == self.seen.load(Ordering::SeqCst)
    }
    fn activity(&self) -> u64 {
        let s = self.device.stats();
        s.host_interrupts + s.injected + s.eois + self.edu.book().isr_runs
    }
    fn resync_by_hand(&self) {
        self.device.with_backend(|b| {
            b.intx_mask().unwrap();
            b.intx_check_and_unmask().unwrap();
        });
    }
}

/// The edu as the KVM guest's device: raise a new status bit; the ISR's
/// BAR write acknowledges one.
struct EduSide(Arc<Edu>, Duration);

impl DeviceSide for EduSide {
    fn raise(&self) {
        self.0.raise_tick();
    }
    fn ack(&self) -> bool {
        self.0.isr_busy.store(true, Ordering::SeqCst);
        thread::sleep(self.1);
        let acked = self.0.isr_ack();
        self.0.isr_busy.store(false, Ordering::SeqCst);
        acked
    }
}

/// The kernel bypass: a KVM guest (inside the QEMU guest) whose EOIs go
/// from KVM's resample eventfd straight to vfio's ACTION_UNMASK eventfd.
struct BypassRig {
    label: String,
    bdf: Bdf,
    edu: Arc<Edu>,
    assignment: Option<Assignment<VfioBackend>>,
}

impl BypassRig {
    fn assignment(&self) -> &Assignment<VfioBackend> {
        self.assignment.as_ref().unwrap()
    }

    fn finish(mut self) {
        let assignment = self.assignment.take().unwrap();
        let acked = assignment.control.acked();
        assert_eq!(
            acked,
            self.edu.book().ack_writes,
            "{}: the KVM guest's acked count and the edu's disagree",
            self.label
        );
        assignment
            .finish()
            .unwrap_or_else(|e| panic!("{}: stopping the guest: {}", self.label, error_chain(&e)));
    }
}

impl Subject for BypassRig {
    fn label(&self) -> &str {
        &self.label
    }
    fn bdf(&self) -> Bdf {
        self.bdf
    }
    fn edu(&self) -> &Edu {
        &self.edu
    }
    fn stats(&self) -> IntxStats {
        self.assignment().device.stats()
    }
    fn line_state(&self) -> LineState {
        self.assignment().device.line_state()
    }
    fn backend_command(&self) -> Option<u16> {
        self.assignment()
            .device
            .command_status()
            .ok()
            .map(|cs| cs.command)
    }
    fn guest_idle(&self) -> bool {
        !self.edu.isr_busy.load(Ordering::SeqCst)
    }
    fn activity(&self) -> u64 {
        self.assignment().control.isr_runs() + self.edu.book().isr_runs
    }
    fn resync_by_hand(&self) {
        self.assignment().device.with_backend(|b| {
            b.intx_mask().unwrap();
            b.intx_check_and_unmask().unwrap();
        });
    }
    fn diagnostics(&self) -> String {
        let a = self.assignment();
        format!(
            "physical {:?}, backend COMMAND {:?}, edu status {:?}, raised {}, delivered {}, {}; \
             {}",
            physical(self.bdf),
            self.backend_command().map(|c| format!("{c:#06x}")),
            self.edu.decoding_status().map(|s| format!("{s:#x}")),
            self.edu.raised(),
            self.edu.delivered(),
            self.edu.counts(),
            a.diagnose(),
        )
    }
}

/// How often the bare servicer's watchdog looks while no event arrives.
const BARE_POLL: Duration = Duration::from_millis(5);
/// The bare servicer re-syncs this long after it first saw STATUS.INTERRUPT
/// with no event since (KERNEL-NOTES.md, "Measured").
const BARE_RESYNC_AFTER: Duration = Duration::from_millis(50);

#[derive(Debug, Default)]
struct BareCounts {
    events: AtomicU64,
    resyncs: AtomicU64,
}

/// The minimal servicer of KERNEL-NOTES.md's "Measured" section, without
/// the engine: vfio-pci's TRIGGER eventfd; on each event the same ISR as the
/// project's rigs (the same delay, then one ack through the [`Book`]), then
/// VFIO UNMASK. Its watchdog reads STATUS through the config region and, 50 ms
/// after it FIRST saw STATUS.INTERRUPT with no event since, issues VFIO MASK
/// then UNMASK. The yardstick for delivery during the reset loops.
///
/// Its weakness under the loops: a reset drops edu's line within
/// milliseconds, so once an UNMASK inside a reset left the line masked, its
/// watchdog seldom sees STATUS.INTERRUPT set again, and with all 32 status
/// bits outstanding nothing raises the line any more until the loops stop.
/// The engine's suspicion outlives STATUS going clear while the hardware's
/// INTX_DISABLE stays set (module docs of its watchdog).
struct BareServicer {
    label: String,
    bdf: Bdf,
    edu: Arc<Edu>,
    backend: Arc<Mutex<VfioBackend>>,
    counts: Arc<BareCounts>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl BareServicer {
    fn start(bdf: Bdf, isr_delay: Duration) -> Self {
        let (mut backend, edu) = open_vfio_edu(bdf);
        let trigger = EventFd::new(EFD_NONBLOCK).unwrap();
        backend.intx_enable(&trigger).unwrap();
        let mut bare = Self {
            label: "bare servicer (vfio TRIGGER + UNMASK, 50 ms re-sync)".to_owned(),
            bdf,
            edu: Arc::new(edu),
            backend: Arc::new(Mutex::new(backend)),
            counts: Arc::default(),
            stop: Arc::default(),
            thread: None,
        };
        let (backend, edu, counts, stop) = (
            Arc::clone(&bare.backend),
            Arc::clone(&bare.edu),
            Arc::clone(&bare.counts),
            Arc::clone(&bare.stop),
        );
        bare.thread = Some(thread::spawn(move || {
            bare_loop(&backend, &edu, &trigger, &stop, &counts, isr_delay);
        }));
        bare
    }

    fn backend(&self) -> MutexGuard<'_, VfioBackend> {
        self.backend.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for BareServicer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = self.backend().intx_disable();
    }
}

fn bare_loop(
    backend: &Mutex<VfioBackend>,
    edu: &Edu,
    trigger: &EventFd,
    stop: &AtomicBool,
    counts: &BareCounts,
    isr_delay: Duration,
) {
    let lock = || backend.lock().unwrap_or_else(PoisonError::into_inner);
    let epoll = Epoll::new().unwrap();
    epoll
        .ctl(
            ControlOperation::Add,
            trigger.as_raw_fd(),
            EpollEvent::new(EventSet::IN, 0),
        )
        .unwrap();
    let timeout = i32::try_from(BARE_POLL.as_millis()).unwrap();
    let mut events = [EpollEvent::default(); 1];
    // When STATUS.INTERRUPT was first seen set with no event since.
    let mut first_seen: Option<Instant> = None;
    while !stop.load(Ordering::SeqCst) {
        match epoll.wait(timeout, &mut events) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => panic!("bare servicer epoll_wait: {e}"),
        }
        if let Ok(n) = trigger.read() {
            counts.events.fetch_add(n, Ordering::SeqCst);
            edu.isr_busy.store(true, Ordering::SeqCst);
            thread::sleep(isr_delay);
            edu.isr_ack();
            lock().intx_check_and_unmask().unwrap();
            edu.isr_busy.store(false, Ordering::SeqCst);
            first_seen = None;
            continue;
        }
        let now = Instant::now();
        match first_seen {
            None => {
                // Sleeps while a reset holds the device.
                let asserting = read_command_status(&mut *lock()).is_ok_and(|cs| cs.asserting());
                if asserting {
                    first_seen = Some(Instant::now());
                }
            }
            Some(at) if now.duration_since(at) >= BARE_RESYNC_AFTER => {
                let mut b = lock();
                b.intx_mask().unwrap();
                b.intx_check_and_unmask().unwrap();
                counts.resyncs.fetch_add(1, Ordering::SeqCst);
                first_seen = None;
            }
            Some(_) => {}
        }
    }
}

impl Subject for BareServicer {
    fn label(&self) -> &str {
        &self.label
    }
    fn bdf(&self) -> Bdf {
        self.bdf
    }
    fn edu(&self) -> &Edu {
        &self.edu
    }
    fn stats(&self) -> IntxStats {
        let resyncs = self.counts.resyncs.load(Ordering::SeqCst);
        IntxStats {
            host_interrupts: self.counts.events.load(Ordering::SeqCst),
            stuck_detections: resyncs,
            resyncs,
            ..IntxStats::default()
        }
    }
    fn line_state(&self) -> LineState {
        LineState::Idle
    }
    fn backend_command(&self) -> Option<u16> {
        read_command_status(&mut *self.backend())
            .ok()
            .map(|cs| cs.command)
    }
    fn guest_idle(&self) -> bool {
        !self.edu.isr_busy.load(Ordering::SeqCst)
    }
    fn activity(&self) -> u64 {
        self.counts.events.load(Ordering::SeqCst)
            + self.counts.resyncs.load(Ordering::SeqCst)
            + self.edu.book().isr_runs
    }
    fn resync_by_hand(&self) {
        let mut b = self.backend();
        b.intx_mask().unwrap();
        b.intx_check_and_unmask().unwrap();
    }
}

// ------------------------------------------------------------------ setups

/// Opens the vfio edu, enables memory decoding (BAR0 access needs it).
fn open_vfio_edu(bdf: Bdf) -> (VfioBackend, Edu) {
    let mut backend = VfioBackend::open(bdf).unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    let command = backend.config_read(PCI_COMMAND, Width::Word).unwrap();
    let command = command | u32::from(COMMAND_MEMORY | COMMAND_MASTER);
    backend
        .config_write(PCI_COMMAND, Width::Word, command)
        .unwrap();
    let bar = backend.region(0).unwrap();
    (backend, Edu::new(Box::new(bar)))
}

/// Opens the uio edu: memory decoding on, INTx unmasked, BAR0 mapped.
fn open_uio_edu(bdf: Bdf) -> (UioBackend, Edu) {
    let mut config = SysfsConfig::open(&PciSysfs::default(), bdf).unwrap();
    let command = read_command_status(&mut config).unwrap().command;
    let wanted = (command | COMMAND_MEMORY) & !COMMAND_INTX_DISABLE;
    config
        .config_write(PCI_COMMAND, Width::Word, u32::from(wanted))
        .unwrap();
    let edu = Edu::new(Box::new(Bar0::map(bdf)));
    let backend = UioBackend::open(bdf).unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    (backend, edu)
}

fn vfio_user_space(bdf: Bdf, watchdog: bool) -> UserSpaceRig<VfioBackend> {
    vfio_user_space_with_isr(bdf, watchdog, ISR_DELAY)
}

fn vfio_user_space_with_isr(
    bdf: Bdf,
    watchdog: bool,
    isr_delay: Duration,
) -> UserSpaceRig<VfioBackend> {
    let (backend, edu) = open_vfio_edu(bdf);
    let label = format!("vfio-pci user-space path, watchdog {}", on_off(watchdog));
    UserSpaceRig::start(&label, backend, edu, watchdog, isr_delay)
}

fn uio_user_space(bdf: Bdf, watchdog: bool) -> UserSpaceRig<UioBackend> {
    let (backend, edu) = open_uio_edu(bdf);
    let label = format!(
        "uio_pci_generic user-space path, watchdog {}",
        on_off(watchdog)
    );
    UserSpaceRig::start(&label, backend, edu, watchdog, ISR_DELAY)
}

fn vfio_bypass(bdf: Bdf, watchdog: bool) -> BypassRig {
    vfio_bypass_with_isr(bdf, watchdog, ISR_DELAY)
}

fn vfio_bypass_with_isr(bdf: Bdf, watchdog: bool, isr_delay: Duration) -> BypassRig {
    let (backend, edu) = open_vfio_edu(bdf);
    let edu = Arc::new(edu);
    let side: Arc<dyn DeviceSide> = Arc::new(EduSide(Arc::clone(&edu), isr_delay));
    let assignment = Assignment::start_with_options(
        backend,
        side,
        5,
        3 << 3,
        PathPolicy::Fast,
        options(watchdog),
    )
    .unwrap_or_else(|e| {
        panic!(
            "the kernel bypass with KVM inside the QEMU guest did not start: {}",
            error_chain(&e)
        )
    });
    assert_eq!(assignment.path.path, Path::KernelBypass);
    assert!(assignment.device.is_kernel_bypass());
    BypassRig {
        label: format!(
            "vfio-pci kernel bypass (KVM), watchdog {}",
            on_off(watchdog)
        ),
        bdf,
        edu,
        assignment: Some(assignment),
    }
}

fn on_off(on: bool) -> &'static str {
    if on {
        "on"
    } else {
        "off"
    }
}

// ------------------------------------------------------------------ scenario

#[derive(Debug)]
struct Storm {
    resets: u64,
    reset_errors: u64,
    first_reset_error: Option<String>,
    /// When the last reset returned (both loops joined).
    last_reset_end: Instant,
    /// Raises that landed while the loops ran.
    raised_during: u64,
    /// Interrupts that reached the guest's ISR while the loops ran, whatever
    /// its status read found (mid-reset it reads 0).
    isr_runs_during: u64,
    /// Of those, the ones that found their status bit (the ISR wrote the
    /// ack).
    isr_acks_during: u64,
    /// Interrupts delivered (acks seen landed) while the loops ran: only a
    /// status read while the device decodes confirms an ack, which the
    /// loops hardly ever allow, so most are confirmed after them.
    delivered_during: u64,
}

struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// The 2011 reproducer: two threads loop `echo 1 > .../reset` for
/// `duration` while this thread raises interrupts steadily.
fn storm(subject: &dyn Subject, duration: Duration) -> Storm {
    let bdf = subject.bdf();
    let stop = AtomicBool::new(false);
    thread::scope(|scope| {
        let loops: Vec<_> = (0..2)
            .map(|_| scope.spawn(|| common::sysfs_reset_loop(bdf, &stop, || {})))
            .collect();
        // Stops the loops however this thread leaves (a failed assertion
        // included), so the scope can join them.
        let stopper = StopOnDrop(&stop);
        let before = (subject.edu().poll(), subject.edu().book().ack_writes);
        let runs_before = subject.edu().book().isr_runs;
        let start = Instant::now();
        while start.elapsed() < duration {
            subject.edu().raise_tick();
            thread::sleep(RAISE_EVERY);
        }
        let after = (subject.edu().poll(), subject.edu().book().ack_writes);
        let runs_after = subject.edu().book().isr_runs;
        drop(stopper);
        let mut storm = Storm {
            resets: 0,
            reset_errors: 0,
            first_reset_error: None,
            last_reset_end: start,
            raised_during: after.0 .0 - before.0 .0,
            isr_runs_during: runs_after - runs_before,
            isr_acks_during: after.1 - before.1,
            delivered_during: after.0 .1 - before.0 .1,
        };
        for l in loops {
            let l = l.join().unwrap();
            storm.resets += l.resets;
            storm.reset_errors += l.errors;
            storm.first_reset_error = storm.first_reset_error.take().or(l.first_error);
            storm.last_reset_end = storm.last_reset_end.max(l.ended);
        }
        storm
    })
}

/// Waits until every raised interrupt is delivered; returns the time since
/// `since`, or `None` when no delivery happened for `patience` (or `limit`
/// passed). Meanwhile, a bit whose line a reset dropped — pending at the
/// device, STATUS.INTERRUPT clear, nothing in flight towards the guest, for
/// two checks 20 ms apart — is raised again (edu's quirk: a reset lowers
/// the line and keeps the status bit; no new interrupt would ever come).
fn await_delivery(
    subject: &dyn Subject,
    since: Instant,
    patience: Duration,
    limit: Duration,
) -> Option<Duration> {
    let edu = subject.edu();
    let start = Instant::now();
    let mut last_delivered = edu.poll().1;
    let mut progress_at = start;
    let mut next_check = start;
    let mut candidate = None;
    loop {
        let now = Instant::now();
        let (raised, delivered, outstanding) = edu.poll();
        if delivered == raised && outstanding == 0 {
            return Some(since.elapsed());
        }
        if delivered != last_delivered {
            last_delivered = delivered;
            progress_at = now;
        }
        if now.duration_since(progress_at) >= patience || now.duration_since(start) >= limit {
            return None;
        }
        if now >= next_check {
            next_check = now + Duration::from_millis(20);
            let activity = subject.activity();
            let dropped = subject.guest_idle()
                && !physical(subject.bdf()).asserting()
                && edu.pending().is_some_and(|p| p != 0)
                && subject.guest_idle();
            if !dropped {
                candidate = None;
            } else if candidate == Some((activity, delivered)) {
                edu.reraise_pending();
                candidate = None;
                progress_at = now;
            } else {
                candidate = Some((activity, delivered));
            }
        }
        thread::sleep(Duration::from_millis(1));
    }
}

/// What one storm round ended in.
struct Round {
    storm: Storm,
    recovered_after: Option<Duration>,
    raised: u64,
    delivered: u64,
    reraised: u64,
    stats: IntxStats,
}

impl Round {
    fn report(&self, label: &str, round: usize) {
        let s = &self.stats;
        say(format_args!(
            "tier3 watchdog | {label}, round {round}: during the loops raised {}, reached the \
             guest's ISR {} (found their status bit {}), confirmed delivered {}; \
             in all raised {}, delivered {}, \
             re-raised-after-drop {}, resets {} (errors {}), stuck detections {}, re-syncs {}, \
             harmless re-checks {}, mid-reset events {}, stuck time {:?}, last reset -> all \
             delivered: {}",
            self.storm.raised_during,
            self.storm.isr_runs_during,
            self.storm.isr_acks_during,
            self.storm.delivered_during,
            self.raised,
            self.delivered,
            self.reraised,
            self.storm.resets,
            self.storm.reset_errors,
            s.stuck_detections,
            s.resyncs,
            s.watchdog_rechecks,
            s.mid_reset_events,
            s.stuck_time,
            self.recovered_after
                .map_or_else(|| "NOT RECOVERED".to_owned(), |d| format!("{d:?}")),
        ));
    }
}

/// One storm and the wait for delivery after it; counts are this round's.
fn run_round(subject: &dyn Subject, patience: Duration, limit: Duration) -> Round {
    run_round_for(subject, STORM_FOR, patience, limit)
}

/// [`run_round`] with a storm of `storm_for`.
fn run_round_for(
    subject: &dyn Subject,
    storm_for: Duration,
    patience: Duration,
    limit: Duration,
) -> Round {
    let edu = subject.edu();
    let before = edu.book().clone();
    let storm = storm(subject, storm_for);
    assert!(
        edu.finish_raising(),
        "{}: the edu does not decode after the loops stopped",
        subject.label()
    );
    let recovered_after = await_delivery(subject, storm.last_reset_end, patience, limit);
    Round {
        recovered_after,
        raised: edu.raised() - before.raised,
        delivered: edu.delivered() - before.delivered,
        reraised: edu.book().reraised - before.reraised,
        stats: subject.stats(),
        storm,
    }
}

/// With the watchdog: every raise delivered after the loops stop, the line
/// not left masked, and a new raise delivered.
fn watchdog_recovers(subject: &dyn Subject) {
    let label = subject.label().to_owned();
    let started = Instant::now();
    let round = run_round(subject, RECOVERY_LIMIT, RECOVERY_LIMIT);
    round.report(&label, 1);
    say(format_args!(
        "tier3 watchdog | {label}: {}; engine {:?}",
        subject.edu().counts(),
        round.stats
    ));
    assert_eq!(
        round.storm.reset_errors, 0,
        "{label}: sysfs resets failed: {:?}",
        round.storm.first_reset_error
    );
    assert!(round.storm.resets > 0, "{label}: no reset happened");
    assert!(
        round.raised > 0,
        "{label}: no raise landed during the storm"
    );
    let recovered = round.recovered_after.unwrap_or_else(|| {
        panic!(
            "{label}: delivery did not come back within {RECOVERY_LIMIT:?} of the last reset: {}",
            subject.diagnostics()
        )
    });
    assert!(
        recovered < RECOVERY_BOUND,
        "{label}: delivery came back {recovered:?} after the last reset (bound \
         {RECOVERY_BOUND:?}); the watchdog found {} stuck line(s) in {:?}",
        round.stats.stuck_detections,
        round.stats.stuck_time
    );
    assert_eq!(round.stats.errors, 0, "{label}: {:?}", round.stats);
    settled_and_working(subject);
    say(format_args!(
        "tier3 watchdog | {label}: final raise delivered; whole test {:.1} s",
        started.elapsed().as_secs_f64()
    ));
}

/// Everything raised was delivered, the line is idle and not masked, and a
/// new raise is delivered.
fn settled_and_working(subject: &dyn Subject) {
    let label = subject.label();
    let edu = subject.edu();
    let book = edu.book().clone();
    assert_eq!(book.delivered, book.raised, "{label}: {book:?}");
    assert_eq!(book.outstanding, 0, "{label}: {book:?}");

    // Idle: nothing pending, nothing masked.
    let deadline = Instant::now() + Duration::from_secs(1);
    while physical(subject.bdf()).masked() || subject.line_state() != LineState::Idle {
        assert!(
            Instant::now() < deadline,
            "{label}: line left masked once idle: {}",
            subject.diagnostics()
        );
        thread::sleep(Duration::from_millis(5));
    }
    let cs = physical(subject.bdf());
    assert!(!cs.asserting(), "{label}: {}", subject.diagnostics());
    assert_eq!(edu.decoding_status(), Some(0), "{label}");

    // A new raise is delivered.
    let target = edu.raised() + 1;
    edu.raise_tick();
    assert!(edu.finish_raising(), "{label}: the edu does not decode");
    assert_eq!(
        edu.raised(),
        target,
        "{label}: a raise with no reset running did not land"
    );
    let deadline = Instant::now() + Duration::from_secs(2);
    while edu.poll().1 < target {
        assert!(
            Instant::now() < deadline,
            "{label}: the raise after the storm was not delivered: {}",
            subject.diagnostics()
        );
        thread::sleep(Duration::from_millis(1));
    }
}

/// Without the watchdog: up to [`ROUNDS_WITHOUT_WATCHDOG`] storms until one
/// leaves the line stuck (no delivery for [`STUCK_AFTER`] while edu has a
/// bit pending, STATUS.INTERRUPT is set and the physical INTX_DISABLE is
/// set). Then a MASK + UNMASK by hand must bring delivery back. Returns
/// how many rounds ran and how many stuck.
fn stuck_without_watchdog(subject: &dyn Subject, rounds: usize) -> (usize, usize) {
    let label = subject.label().to_owned();
    let mut stuck_rounds = 0;
    let mut ran = 0;
    for round_no in 1..=rounds {
        ran += 1;
        let round = run_round(subject, STUCK_AFTER, Duration::from_secs(10));
        round.report(&label, round_no);
        assert_eq!(
            round.storm.reset_errors, 0,
            "{label}: sysfs resets failed: {:?}",
            round.storm.first_reset_error
        );
        assert_eq!(round.stats.stuck_detections, 0, "{label}: watchdog is off");
        assert_eq!(round.stats.resyncs, 0, "{label}: watchdog is off");
        if round.recovered_after.is_some() {
            say(format_args!(
                "tier3 watchdog | {label}, round {round_no}: not stuck: {}",
                subject.edu().counts()
            ));
            continue;
        }
        let edu = subject.edu();
        let cs = physical(subject.bdf());
        let pending = edu.pending().unwrap_or(0);
        say(format_args!(
            "tier3 watchdog | {label}, round {round_no}: no delivery for {STUCK_AFTER:?} after \
             the loops stopped: {}",
            subject.diagnostics()
        ));
        assert!(
            cs.asserting() && cs.masked() && pending != 0,
            "{label}: undelivered interrupts, but not the stuck-masked signature \
             (STATUS.INTERRUPT and physical INTX_DISABLE set, edu status pending): {}",
            subject.diagnostics()
        );
        stuck_rounds += 1;
        // What recovered it on the real kernel: MASK, then UNMASK.
        let t = Instant::now();
        subject.resync_by_hand();
        let back = await_delivery(subject, t, Duration::from_secs(2), Duration::from_secs(5));
        say(format_args!(
            "tier3 watchdog | {label}, round {round_no}: STUCK (physical COMMAND {:#06x}, \
             backend view {:?}); MASK + UNMASK by hand -> all delivered after {back:?}",
            cs.command,
            subject.backend_command().map(|c| format!("{c:#06x}")),
        ));
        assert!(
            back.is_some(),
            "{label}: MASK + UNMASK by hand did not bring delivery back: {}",
            subject.diagnostics()
        );
        break;
    }
    (ran, stuck_rounds)
}

// ------------------------------------------------------------------ tests

#[test]
fn vfio_user_space_path_recovers_from_two_sysfs_reset_loops_with_the_watchdog() {
    let test = "vfio_user_space_path_recovers_from_two_sysfs_reset_loops_with_the_watchdog";
    let Some(bdf) = guest_device("VFIO_INTX_EDU_RESET", test) else {
        return;
    };
    let rig = vfio_user_space(bdf, true);
    watchdog_recovers(&rig);
}

#[test]
fn vfio_user_space_path_without_the_watchdog_is_left_stuck_masked_by_sysfs_reset_loops() {
    let test =
        "vfio_user_space_path_without_the_watchdog_is_left_stuck_masked_by_sysfs_reset_loops";
    let Some(bdf) = guest_device("VFIO_INTX_EDU_RESET", test) else {
        return;
    };
    let rig = vfio_user_space(bdf, false);
    let (ran, stuck) = stuck_without_watchdog(&rig, ROUNDS_WITHOUT_WATCHDOG);
    say(format_args!(
        "tier3 watchdog | {}: stuck in {stuck} of {ran} rounds",
        rig.label
    ));
    assert!(
        stuck > 0,
        "{}: {ran} rounds of two sysfs reset loops never left the line stuck",
        rig.label
    );
}

#[test]
fn uio_user_space_path_recovers_from_two_sysfs_reset_loops_with_the_watchdog() {
    let test = "uio_user_space_path_recovers_from_two_sysfs_reset_loops_with_the_watchdog";
    let Some(bdf) = guest_device("VFIO_INTX_EDU_UIO", test) else {
        return;
    };
    let rig = uio_user_space(bdf, true);
    watchdog_recovers(&rig);
}

#[test]
fn uio_user_space_path_is_not_left_stuck_by_sysfs_reset_loops_even_without_the_watchdog() {
    let test =
        "uio_user_space_path_is_not_left_stuck_by_sysfs_reset_loops_even_without_the_watchdog";
    let Some(bdf) = guest_device("VFIO_INTX_EDU_UIO", test) else {
        return;
    };
    let rig = uio_user_space(bdf, false);
    let (ran, stuck) = stuck_without_watchdog(&rig, 1);
    say(format_args!(
        "tier3 watchdog | {}: stuck in {stuck} of {ran} rounds",
        rig.label
    ));
    // What the real kernel does here (every boot so far): nothing sticks.
    // uio_pci_generic's unmask is a write through sysfs config, a user
    // config access, which sleeps while a reset holds the device, so it
    // never lands inside one; and the kernel's own check-and-mask cannot
    // fire during a reset (COMMAND is INTX_DISABLE, the line held low). An
    // ack that finds the device mid-reset still cannot land, and a reset
    // lowers edu's line over a pending bit: once the loops stop, such a bit
    // is raised again (counted as re-raised after a drop) and delivered.
    assert_eq!(stuck, 0, "{}: {}", rig.label, rig.diagnostics());
    settled_and_working(&rig);
}

#[test]
fn kernel_bypass_recovers_from_two_sysfs_reset_loops_with_the_watchdog() {
    let test = "kernel_bypass_recovers_from_two_sysfs_reset_loops_with_the_watchdog";
    let Some(bdf) = guest_device("VFIO_INTX_EDU_RESET", test) else {
        return;
    };
    let rig = vfio_bypass(bdf, true);
    watchdog_recovers(&rig);
    rig.finish();
}

#[test]
fn kernel_bypass_without_the_watchdog_is_left_stuck_masked_by_sysfs_reset_loops() {
    let test = "kernel_bypass_without_the_watchdog_is_left_stuck_masked_by_sysfs_reset_loops";
    let Some(bdf) = guest_device("VFIO_INTX_EDU_RESET", test) else {
        return;
    };
    let rig = vfio_bypass(bdf, false);
    let (ran, stuck) = stuck_without_watchdog(&rig, ROUNDS_WITHOUT_WATCHDOG);
    say(format_args!(
        "tier3 watchdog | {}: stuck in {stuck} of {ran} rounds",
        rig.label
    ));
    assert!(
        stuck > 0,
        "{}: {ran} rounds of two sysfs reset loops never left the line stuck",
        rig.label
    );
    rig.finish();
}

/// Issue 11 item 7: on the kernel bypass, with no reset anywhere, a guest
/// ISR that takes 100 ms before it reaches the device is not a stuck line:
/// the watchdog (on) detects nothing and re-syncs nothing, and no ISR run
/// finds the device not asserting (a re-sync's UNMASK re-signals the irqfd
/// while the device asserts; landing after the guest's EOI, that is an
/// interrupt the device no longer asserts).
#[test]
fn kernel_bypass_with_a_100ms_guest_isr_and_no_reset_sees_no_stuck_line() {
    let test = "kernel_bypass_with_a_100ms_guest_isr_and_no_reset_sees_no_stuck_line";
    let Some(bdf) = guest_device("VFIO_INTX_EDU_RESET", test) else {
        return;
    };
    const INTERRUPTS: u64 = 30;
    let rig = vfio_bypass_with_isr(bdf, true, Duration::from_millis(100));
    let edu = rig.edu();
    for i in 1..=INTERRUPTS {
        edu.raise_tick();
        assert!(edu.finish_raising(), "the edu does not decode");
        let deadline = Instant::now() + Duration::from_secs(5);
        while edu.poll().1 < i {
            assert!(
                Instant::now() < deadline,
                "interrupt {i} not delivered: {}",
                rig.diagnostics()
            );
            thread::sleep(Duration::from_millis(1));
        }
    }
    let a = rig.assignment();
    let stats = a.device.stats();
    say(format_args!(
        "tier3 watchdog | kernel bypass, 100 ms guest ISR, no reset: {INTERRUPTS} delivered, \
         ISR runs {}, ISR reads without STATUS.INTERRUPT {}, stuck detections {}, re-syncs {}, \
         harmless re-checks {}",
        a.control.isr_runs(),
        a.status_clear_in_isr(),
        stats.stuck_detections,
        stats.resyncs,
        stats.watchdog_rechecks,
    ));
    assert_eq!(stats.stuck_detections, 0, "{stats:?}");
    assert_eq!(stats.resyncs, 0, "{stats:?}");
    assert_eq!(a.status_clear_in_isr(), 0, "{}", rig.diagnostics());
    assert_eq!(a.control.empty_isr_runs(), 0, "{}", rig.diagnostics());
    assert_eq!(a.control.acked(), INTERRUPTS);
    rig.finish();
}

/// Issue 11 item 13: while two sysfs reset loops run, the project delivers
/// at least as many interrupts as the bare servicer of KERNEL-NOTES.md, on
/// the same definition and in the same boot: ISR runs that found their
/// status bit (the device decoded; mid-reset the ISR's read finds nothing).
/// ISR runs in all are printed, not compared: more of them is not better
/// delivery (the bare servicer's UNMASK re-signals at once while a reset is
/// starting, with the device not decoding and its line still up: up to
/// 555 ISR runs that found nothing in one round). One round per subject
/// (bare servicer, user-space path, kernel bypass) for each guest ISR delay:
/// [`ISR_DELAY`] (the storm tests' ISR: its read lands in the next reset
/// nearly always, for everyone), and none (the read lands in the gap after
/// the reset that delayed the interrupt), where the project must also
/// reach the issue's figure for the bare servicer.
#[test]
fn during_two_sysfs_reset_loops_the_project_delivers_as_many_as_a_bare_servicer() {
    let test = "during_two_sysfs_reset_loops_the_project_delivers_as_many_as_a_bare_servicer";
    let Some(bdf) = guest_device("VFIO_INTX_EDU_RESET", test) else {
        return;
    };
    let started = Instant::now();
    let labels = [
        "bare servicer",
        "project user-space path",
        "project kernel bypass",
    ];
    let round_for = |subject: &dyn Subject, delay: Duration| {
        let round = run_round_for(subject, COMPARE_STORM_FOR, RECOVERY_LIMIT, RECOVERY_LIMIT);
        let label = format!("{}, ISR delay {delay:?}", subject.label());
        round.report(&label, 1);
        assert_eq!(
            round.storm.reset_errors, 0,
            "{label}: sysfs resets failed: {:?}",
            round.storm.first_reset_error
        );
        assert!(
            round.recovered_after.is_some(),
            "{label}: delivery did not come back after the loops: {}",
            subject.diagnostics()
        );
        (round.storm.isr_runs_during, round.storm.isr_acks_during)
    };
    for delay in [ISR_DELAY, Duration::ZERO] {
        let bare = BareServicer::start(bdf, delay);
        let bare_round = round_for(&bare, delay);
        drop(bare);
        let rig = vfio_user_space_with_isr(bdf, true, delay);
        let user_round = round_for(&rig, delay);
        drop(rig);
        let rig = vfio_bypass_with_isr(bdf, true, delay);
        let bypass_round = round_for(&rig, delay);
        rig.finish();

        let rounds = [bare_round, user_round, bypass_round];
        for (label, (reached, acked)) in labels.iter().zip(rounds) {
            say(format_args!(
                "tier3 watchdog | comparison, ISR delay {delay:?}, {COMPARE_STORM_FOR:?} of \
                 reset loops: {label} reached the guest's ISR {reached} times, {acked} found \
                 their status bit"
            ));
        }
        let bare_acked = bare_round.1;
        let slack = COMPARE_SLACK + bare_acked / 2;
        for (label, (_, acked)) in labels.iter().zip(rounds).skip(1) {
            assert!(
                acked + slack >= bare_acked,
                "{label}, ISR delay {delay:?}: {acked} ISR runs found their status bit during \
                 the loops, the bare servicer's {bare_acked} (slack {slack})"
            );
            if delay.is_zero() {
                assert!(
                    acked >= ISSUE_BARE_DELIVERED,
                    "{label}: {acked} ISR runs found their status bit during the loops, fewer \
                     than the issue's bare servicer ({ISSUE_BARE_DELIVERED})"
                );
            }
        }
    }
    say(format_args!(
        "tier3 watchdog | comparison with the bare servicer: whole test {:.1} s",
        started.elapsed().as_secs_f64()
    ));
}
