//! The INTx engine for one assigned device: the four flows of the design.
//!
//! 1. Host interrupt: try-access the gate (defer if held) -> check-and-mask
//!    -> inject into the sink.
//! 2. Guest EOI (user-space path): try-access -> check-and-unmask ->
//!    re-inject while the device still asserts.
//! 3. Guest config cycle: access -> merge the guest's INTX_DISABLE with the
//!    host mask -> backend.
//! 4. Reset: block -> save -> mask -> backend reset -> restore -> settle
//!    (re-check STATUS, re-arm) -> unblock -> deferred work runs.
//!
//! Resets the engine did not start (an administrator writing the device's
//! sysfs `reset`) cannot go through the gate; the watchdog (see
//! [`IntxDevice::watchdog_tick`]) notices their effects and recovers.

mod bypass;
mod flr;
mod machine;
mod options;
mod reset;
mod watchdog;

pub use options::{IntxOptions, RetryPolicy};
pub use watchdog::{Tick, WatchdogOptions};

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use tracing::{debug, info, instrument, trace, warn};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend::{BackendError, Capabilities, IntxDisableBit, PciBackend};
use crate::gate::{ConfigGate, Generation};
use crate::intx::error::{Fail, IntxError, Operation};
use crate::intx::guest::GuestCommand;
use crate::intx::sink::InterruptSink;
use crate::intx::stats::{Counters, IntxStats};
use crate::pci::intx::{read_command_status, CommandStatus};
use crate::pci::regs::{COMMAND_INTX_DISABLE, PCI_COMMAND};
use crate::pci::{check_access, check_write, Bdf, Width};
use crate::ratelimit::LogLimiter;

/// Where the device's INTx stands in the state machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineState {
    /// Unmasked, waiting for the device to assert.
    Idle,
    /// Masked by the host; the interrupt was injected and the guest's EOI is
    /// awaited.
    InService,
    /// Masked by the host while the guest has its own INTX_DISABLE set; the
    /// interrupt is delivered once the guest clears it.
    GuestMasked,
}

/// What one run of the interrupt path did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serviced {
    /// The work ran.
    Done,
    /// The device does not decode (it is in a reset nobody announced): the
    /// work is kept and re-run by the next watchdog tick, after the reset.
    AwaitingReset,
    /// The gate was held; the work runs again when the holder leaves.
    Deferred,
}

// Work bits recorded before the gate is tried, so that a deferred attempt
// loses nothing.
const WORK_HOST: u8 = 1 << 0;
const WORK_EOI: u8 = 1 << 1;
const WORK_RECHECK: u8 = 1 << 2;
/// With `WORK_HOST`: every trigger signal behind it came from the backend's
/// kernel driver, in generation `Wake::claimed_generation`.
const WORK_CLAIMED: u8 = 1 << 3;

/// Names the operation a backend error happened in.
trait During<T> {
    fn during(self, op: Operation) -> Result<T, Fail>;
}

impl<T> During<T> for Result<T, BackendError> {
    fn during(self, op: Operation) -> Result<T, Fail> {
        self.map_err(|e| Fail::Backend(op, e))
    }
}

/// The state that lives behind the gate.
struct Device<B> {
    backend: B,
    /// What the watchdog has seen of this device.
    watch: watchdog::WatchState,
    line: LineState,
    guest: GuestCommand,
    /// Where the guest can initiate an FLR.
    flr: flr::FlrRegisters,
    /// The header as last read from the device while it answered, restored
    /// after a reset.
    header: Option<reset::SavedHeader>,
    /// The kernel-bypass wiring, while it is in place.
    bypass: Option<Bypass>,
    /// Why the host holds the line masked ([`IntxDevice::hold`]), if it does.
    hold: Option<&'static str>,
}

/// Borrowed context for the state machine's steps.
struct Ctx<'a> {
    sink: &'a dyn InterruptSink,
    counters: &'a Counters,
    disable_bit: IntxDisableBit,
    /// Queues a re-check for the worker.
    wake: &'a Wake,
    generation: &'a Generation,
    /// The generation of the trigger signals behind `WORK_CLAIMED`.
    claimed_generation: u64,
}

/// What one kick adds to the trigger eventfd's counter. The backend adds 1
/// per host interrupt, so the low 32 bits count host interrupts and the
/// high bits the engine's own kicks: one read tells them apart, with no
/// second counter that a racing kick could update before or after its
/// write (a kick counted without its write made a later read see a host
/// interrupt that never happened).
const KICK: u64 = 1 << 32;

/// The shared part of the engine that the gate's kick needs.
struct Wake {
    trigger: EventFd,
    pending: AtomicU8,
    /// The gate's generation just before the trigger's last read: every
    /// signal a read drains was sent after it.
    read_generation: AtomicU64,
    /// See `WORK_CLAIMED`.
    claimed_generation: AtomicU64,
}

impl Wake {
    /// Re-runs the interrupt path from the worker: mark a re-check, then wake
    /// the worker through the trigger eventfd it already polls.
    fn kick(&self) {
        self.pending.fetch_or(WORK_RECHECK, Ordering::SeqCst);
        // An eventfd write only fails when the counter would overflow, in
        // which case the worker is already due to wake.
        let _ = self.trigger.write(KICK);
    }
}

/// The kernel-bypass wiring: KVM's irqfd (the backend's trigger) and
/// resample eventfd (the backend's unmask eventfd).
struct Bypass {
    irqfd: EventFd,
    resample: EventFd,
}

/// INTx for one assigned PCI function: the engine that implements PCI 2.3
/// masking on behalf of a guest.
///
/// Embed it in a VMM by polling [`trigger`](Self::trigger) (and the KVM
/// resample eventfd on the user-space path) and calling
/// [`on_host_interrupt`](Self::on_host_interrupt) /
/// [`on_guest_eoi`](Self::on_guest_eoi); route the guest's config cycles
/// through [`guest_config_read`](Self::guest_config_read) and
/// [`guest_config_write`](Self::guest_config_write). Everything is
/// synchronous and may be called from any thread.
pub struct IntxDevice<B: PciBackend> {
    bdf: Bdf,
    config_size: u16,
    /// The backend's capabilities, read once when the engine is built.
    capabilities: Capabilities,
    gate: ConfigGate<Device<B>>,
    wake: Arc<Wake>,
    sink: Box<dyn InterruptSink>,
    /// Whether `Device::bypass` is set, readable without the gate.
    bypass_active: AtomicBool,
    /// `Device::hold`, readable without the gate (written under it).
    hold_reason: Mutex<Option<&'static str>>,
    counters: Counters,
    failures: AtomicU32,
    options: IntxOptions,
    /// Rate limit of reset problems a guest can trigger (its FLRs).
    reset_log: Mutex<LogLimiter>,
}

impl<B: PciBackend> std::fmt::Debug for IntxDevice<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntxDevice")
            .field("bdf", &self.bdf)
            .field("gate", &self.gate)
            .finish_non_exhaustive()
    }
}

impl<B: PciBackend> IntxDevice<B> {
    /// Takes over `backend`'s INTx and arms it with default options.
    pub fn new(backend: B, sink: impl InterruptSink + 'static) -> Result<Self, IntxError> {
        Self::with_options(backend, sink, IntxOptions::default())
    }

    /// Takes over `backend`'s INTx and arms it: the guest's view of COMMAND
    /// starts as the device's (without INTX_DISABLE where that bit is the
    /// physical mask: it is the host's then, not the guest's), the backend
    /// signals a fresh trigger eventfd, and an interrupt the device already
    /// asserts is delivered.
    #[instrument(skip_all, fields(bdf = %backend.bdf()))]
    pub fn with_options(
        backend: B,
        sink: impl InterruptSink + 'static,
        options: IntxOptions,
    ) -> Result<Self, IntxError> {
        Self::build(backend, Box::new(sink), None, false, options)
    }

    /// Takes over `backend`'s INTx on the kernel-bypass path: the backend
    /// signals `irqfd` (a KVM irqfd registered with `resample`) directly, and
    /// KVM's `resample` eventfd becomes the backend's unmask eventfd, so the
    /// kernel runs check-and-unmask at the guest's EOI with no user-space
    /// work per interrupt. Enabled in the order trigger -> mask -> unmask
    /// eventfd -> unmask; torn down completely if any step fails. The engine
    /// still owns config accesses and resets.
    #[instrument(skip_all, fields(bdf = %backend.bdf()))]
    pub fn with_kernel_bypass(
        backend: B,
        irqfd: EventFd,
        resample: EventFd,
        options: IntxOptions,
    ) -> Result<Self, IntxError> {
        let bdf = backend.bdf();
        let sink = irqfd
            .try_clone()
            .map_err(|source| IntxError::EventFd { bdf, source })?;
        Self::build(
            backend,
            Box::new(sink),
            Some(Bypass { irqfd, resample }),
            false,
            options,
        )
    }

    /// `adopt`: `bypass` is the kernel's wiring already ([`arm`](Self::arm)).
    fn build(
        backend: B,
        sink: Box<dyn InterruptSink>,
        bypass: Option<Bypass>,
        adopt: bool,
        options: IntxOptions,
    ) -> Result<Self, IntxError> {
        let bdf = backend.bdf();
        let config_size = backend.config_size();
        let capabilities = backend.capabilities();
        let disable_bit = capabilities.intx_disable;
        let trigger =
            EventFd::new(EFD_NONBLOCK).map_err(|source| IntxError::EventFd { bdf, source })?;
        let wake = Arc::new(Wake {
            trigger,
            pending: AtomicU8::new(0),
            read_generation: AtomicU64::new(u64::MAX),
            claimed_generation: AtomicU64::new(u64::MAX),
        });
        let kick_target = Arc::clone(&wake);
        let device = Device {
            watch: watchdog::WatchState::default(),
            backend,
            line: LineState::Idle,
            guest: GuestCommand::default(),
            flr: flr::FlrRegisters::default(),
            header: None,
            bypass: None,
            hold: None,
        };
        let bypassed = bypass.is_some();
        let device = Device { bypass, ..device };
        let this = Self {
            bdf,
            config_size,
            capabilities,
            gate: ConfigGate::new(device, Box::new(move || kick_target.kick())),
            wake,
            sink,
            bypass_active: AtomicBool::new(bypassed),
            counters: Counters::default(),
            failures: AtomicU32::new(0),
            options,
            reset_log: Mutex::new(LogLimiter::new(Duration::from_secs(5), 3)),
            hold_reason: Mutex::new(None),
        };
        this.arm(adopt)?;
        info!(
            ?disable_bit,
            bypass = bypassed,
            adopted = adopt,
            "INTx armed"
        );
        Ok(this)
    }

    fn ctx(&self) -> Ctx<'_> {
        Ctx {
            sink: &*self.sink,
            counters: &self.counters,
            disable_bit: self.capabilities.intx_disable,
            wake: &self.wake,
            generation: self.gate.generation(),
            claimed_generation: self.wake.claimed_generation.load(Ordering::SeqCst),
        }
    }

    /// Reads the device and wires INTx: the user-space path, or the kernel
    /// bypass, enabled afresh or (`adopt`) taken over as the kernel has it
    /// (see [`with_adopted_bypass`](Self::with_adopted_bypass)).
    fn arm(&self, adopt: bool) -> Result<(), IntxError> {
        let mut dev = self.gate.access();
        let ctx = self.ctx();
        let mut found = None;
        let armed = (|| {
            let cs = read_command_status(&mut dev.backend).during(Operation::ReadCommandStatus)?;
            found = Some(cs.command);
            // Where INTX_DISABLE is the physical mask, a set bit is the
            // host's (uio_pci_generic's automask of an interrupt nobody
            // serviced yet, or a previous owner's mask), not a choice of the
            // guest, which has written nothing yet. Its view starts with the
            // bit clear, as after a reset and as vfio-pci's enable leaves
            // its virtual bit; `settle` then delivers what the device
            // asserts instead of holding it for an EOI-less guest.
            let guest_view = match self.capabilities.intx_disable {
                IntxDisableBit::Physical => cs.command & !COMMAND_INTX_DISABLE,
                IntxDisableBit::Virtualized => cs.command,
            };
            dev.guest = GuestCommand::new(guest_view);
            dev.flr = flr::FlrRegisters::find(&mut dev.backend, cs)
                .during(Operation::ReadCapabilities)?;
            dev.refresh_header();
            let d = &mut *dev;
            match &d.bypass {
                None => d
                    .backend
                    .intx_enable(&self.wake.trigger)
                    .during(Operation::Enable)?,
                Some(Bypass { irqfd, resample }) if adopt => {
                    d.backend
                        .intx_adopt(irqfd, resample)
                        .during(Operation::Adopt)?;
                    // Nothing to re-derive: on the bypass the kernel masks
                    // only an interrupt it signalled to the irqfd and
                    // unmasks at the guest's EOI (KVM's resample eventfd),
                    // so its state is whole. A re-check now would be its
                    // UNMASK, which re-signals a line the guest may be
                    // servicing: KVM applies that signal from a work queue,
                    // possibly after the EOI, as a second delivery. What
                    // the previous owner could not finish is the
                    // watchdog's, as after any unannounced change.
                    ctx.generation.advance();
                    return Ok(());
                }
                Some(Bypass { irqfd, resample }) => {
                    d.backend.intx_enable(irqfd).during(Operation::Enable)?;
                    d.backend.intx_mask().during(Operation::Mask)?;
                    d.backend
                        .intx_set_unmask_eventfd(Some(resample))
                        .during(Operation::SetUnmaskEventfd)?;
                }
            }
            dev.settle(&ctx)
        })();
        if armed.is_err() {
            // Leave nothing half set up.
            if dev.bypass.is_some() {
                let _ = dev.backend.intx_set_unmask_eventfd(None);
            }
            let _ = dev.backend.intx_disable();
            if let Some(command) = found {
                let _ = dev
                    .backend
                    .config_write(PCI_COMMAND, Width::Word, u32::from(command));
            }
        }
        armed.map_err(|f| self.fail(f))
    }

    /// The device's address.
    pub fn bdf(&self) -> Bdf {
        self.bdf
    }

    /// What the backend can do ([`PciBackend::capabilities`], read when the
    /// engine was built). Never waits (not even behind a reset).
    pub fn capabilities(&self) -> Capabilities {
        self.capabilities
    }

    /// The eventfd the backend signals on a host interrupt. Poll it for
    /// readability and call [`on_host_interrupt`](Self::on_host_interrupt).
    /// The engine also signals it itself to re-run deferred work.
    pub fn trigger(&self) -> &EventFd {
        &self.wake.trigger
    }

    /// Flow 1: the trigger eventfd is readable. Drains it and runs the
    /// interrupt path. Never waits behind a reset.
    pub fn on_host_interrupt(&self) -> Result<Serviced, IntxError> {
        let generation = self.gate.generation().current();
        match self.wake.trigger.read() {
            Ok(count) => {
                let previous = self.wake.read_generation.swap(generation, Ordering::SeqCst);
                // On the kernel bypass the backend signals KVM's irqfd,
                // never the trigger: a host count read there was left by
                // the user-space path before the switch, whose settle
                // re-derived the line from STATUS already.
                if count % KICK > 0 && !self.is_kernel_bypass() {
                    // Only the kernel's signals, all sent after the previous
                    // read, with nothing moving the generation since: the
                    // kernel's check-and-mask claimed them (see
                    // `Capabilities::trigger_claims`).
                    let claimed = count / KICK == 0 && previous == generation;
                    if claimed {
                        self.wake
                            .claimed_generation
                            .store(generation, Ordering::SeqCst);
                    }
                    let work = if claimed {
                        WORK_HOST | WORK_CLAIMED
                    } else {
                        WORK_HOST
                    };
                    self.wake.pending.fetch_or(work, Ordering::SeqCst);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(source) => {
                return Err(IntxError::EventFd {
                    bdf: self.bdf,
                    source,
                })
            }
        }
        self.service()
    }

    /// Flow 2 (user-space path): the guest has EOIed the interrupt (KVM's
    /// resample eventfd fired; the caller drains it). Check-and-unmask, and
    /// re-inject if the device still asserts. Never waits behind a reset.
    pub fn on_guest_eoi(&self) -> Result<Serviced, IntxError> {
        self.wake.pending.fetch_or(WORK_EOI, Ordering::SeqCst);
        self.service()
    }

    /// Runs whatever interrupt-path work is pending. On failure the work is
    /// kept and retried through the trigger a bounded number of times.
    pub fn service(&self) -> Result<Serviced, IntxError> {
        let Some(mut dev) = self.gate.try_access() else {
            trace!(bdf = %self.bdf, "gate held, interrupt work deferred");
            return Ok(Serviced::Deferred);
        };
        let mut work = self.wake.pending.swap(0, Ordering::SeqCst);
        match dev.run(&mut work, &self.ctx()) {
            Ok(()) => {
                self.failures.store(0, Ordering::Relaxed);
                Ok(Serviced::Done)
            }
            Err(Fail::Backend(op, BackendError::NotResponding)) => {
                // An event while the device is mid-reset: not spurious, not
                // an error; re-check once the device decodes again.
                self.wake
                    .pending
                    .fetch_or(work | WORK_RECHECK, Ordering::SeqCst);
                Counters::bump(&self.counters.mid_reset_events);
                trace!(bdf = %self.bdf, %op, "device does not decode, re-check after its reset");
                Ok(Serviced::AwaitingReset)
            }
            Err(fail) => {
                // Keep the work; a re-check covers a host interrupt whose
                // check-and-mask did not complete.
                self.wake
                    .pending
                    .fetch_or(work | WORK_RECHECK, Ordering::SeqCst);
                let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
                if failures <= self.options.interrupt_path_retries {
                    Counters::bump(&self.counters.retries);
                    self.wake.kick();
                }
                drop(dev);
                Err(self.fail(fail))
            }
        }
    }

    /// Flow 3: a guest config read. Waits while the device is blocked. The
    /// guest sees its own INTX_DISABLE, not the host mask.
    pub fn guest_config_read(&self, offset: u16, width: Width) -> Result<u32, IntxError> {
        let op = Operation::GuestConfigRead { offset, width };
        check_access(offset, width, self.config_size)
            .map_err(|e| self.fail(Fail::Backend(op, e.into())))?;
        let mut dev = self.gate.access();
        let value = self
            .retry(|| dev.backend.config_read(offset, width))
            .map_err(|e| self.fail(Fail::Backend(op, e)))?;
        Ok(dev.guest.present(offset, width, value))
    }

    /// Flow 3: a guest config write. The guest's INTX_DISABLE is recorded and
    /// merged with the host mask; clearing it delivers an interrupt held
    /// meanwhile. Invalid accesses change nothing.
    pub fn guest_config_write(
        &self,
        offset: u16,
        width: Width,
        value: u32,
    ) -> Result<(), IntxError> {
        let op = Operation::GuestConfigWrite { offset, width };
        check_write(offset, width, self.config_size, value)
            .map_err(|e| self.fail(Fail::Backend(op, e.into())))?;
        let mut dev = self.gate.access();
        let ctx = self.ctx();
        let flr = dev.flr.initiated_by(offset, width, value);
        // The FLR bit itself never reaches the device: the reset below does
        // the FLR, through the gate, with save/restore and re-arm.
        let value = value & !flr;
        let result = dev.guest_write(offset, width, value, &ctx, |dev, v| {
            self.retry(|| dev.backend.config_write(offset, width, v))
        });
        if result.is_ok() && reset::SavedHeader::covered_by(offset, width) {
            dev.refresh_header();
        }
        drop(dev);
        result.map_err(|f| self.fail(f))?;
        if flr != 0 {
            self.guest_flr()?;
        }
        Ok(())
    }

    /// Flow 4: resets the function through the gate. A concurrent reset waits
    /// its turn; accesses wait; the interrupt path defers and runs when the
    /// reset is over. Config state is saved and restored around the reset,
    /// and INTx is re-armed from the device's STATUS so that an interrupt
    /// pending across the reset is delivered and the line not left masked.
    pub fn reset(&self) -> Result<(), IntxError> {
        self.reset_by(B::reset)
    }

    /// [`reset`](Self::reset) with another reset method of the backend
    /// (e.g. a bus reset), under the same protocol. A reset that also
    /// reaches other functions this process drives goes through
    /// [`reset_with_siblings`](Self::reset_with_siblings).
    pub fn reset_by(
        &self,
        method: impl FnMut(&mut B) -> Result<(), BackendError>,
    ) -> Result<(), IntxError> {
        self.reset_with_siblings(&[], method)
    }

    /// Masks INTx and stops delivery, restoring COMMAND to the guest's view
    /// without the host mask. Used when the device is handed back.
    pub fn disarm(&self) -> Result<(), IntxError> {
        let mut dev = self.gate.access();
        let ctx = self.ctx();
        let result = (|| {
            if dev.bypass.is_some() {
                dev.backend
                    .intx_set_unmask_eventfd(None)
                    .during(Operation::SetUnmaskEventfd)?;
            }
            dev.backend.intx_disable().during(Operation::Disable)?;
            dev.line = LineState::Idle;
            dev.hold = None;
            self.mirror_hold(None);
            dev.write_command(&ctx).during(Operation::RestoreState)
        })();
        result.map_err(|f| self.fail(f))
    }

    /// Holds the line masked for a reason of the host's own (an operator's
    /// hold, an interrupt storm), as part of the state machine: interrupts
    /// are checked and masked but not delivered, EOIs leave the line
    /// masked, resets and re-syncs keep it masked, and the watchdog does not
    /// take it for stuck, until [`release`](Self::release). Holding again
    /// replaces the reason. Refused on the kernel bypass, where the kernel
    /// unmasks at the guest's EOI: nothing would stay held. Waits for the
    /// gate like any access.
    pub fn hold(&self, reason: &'static str) -> Result<(), IntxError> {
        let mut dev = self.gate.access();
        if dev.bypass.is_some() {
            return Err(IntxError::HoldOnBypass { bdf: self.bdf });
        }
        dev.hold = Some(reason);
        self.mirror_hold(dev.hold);
        let result = dev.backend.intx_mask().during(Operation::Mask);
        drop(dev);
        result.map_err(|f| self.fail(f))
    }

    /// Lifts a [`hold`](Self::hold): the line is re-derived as after a
    /// re-sync, so an interrupt the device asserts meanwhile is delivered
    /// (an interrupt in service when the hold began was EOIed or is
    /// delivered again). Nothing to do when the line is not held.
    pub fn release(&self) -> Result<(), IntxError> {
        let mut dev = self.gate.access();
        if dev.hold.take().is_none() {
            return Ok(());
        }
        self.mirror_hold(None);
        drop(dev);
        self.resync()
    }

    /// Why the host holds the line masked, if it does. Never waits (not
    /// even behind a reset).
    pub fn hold_reason(&self) -> Option<&'static str> {
        *self
            .hold_reason
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn mirror_hold(&self, hold: Option<&'static str>) {
        *self
            .hold_reason
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = hold;
    }

    /// Re-derives the line's mask from the state machine and the device's
    /// STATUS, as the watchdog's recovery does: mask, then settle (a line in
    /// service stays masked for its EOI; an idle one is check-and-unmasked,
    /// delivering what the device asserts; a held one stays masked). Waits
    /// for the gate like any access.
    pub fn resync(&self) -> Result<(), IntxError> {
        let mut dev = self.gate.access();
        let ctx = self.ctx();
        let result = dev
            .backend
            .intx_mask()
            .during(Operation::Mask)
            .and_then(|()| dev.settle(&ctx));
        Counters::bump(&self.counters.resyncs);
        drop(dev);
        if result.is_err() {
            // The mask may be in place with nothing to lift it: the worker
            // re-checks (bounded, as after any interrupt-path failure).
            self.wake.kick();
        }
        result.map_err(|f| self.fail(f))
    }

    /// Where the line stands. Waits for the gate like any access.
    pub fn line_state(&self) -> LineState {
        self.gate.access().line
    }

    /// COMMAND and STATUS as the backend shows them (for vfio-pci, with the
    /// kernel's virtual INTX_DISABLE). Waits for the gate like any access.
    pub fn command_status(&self) -> Result<CommandStatus, IntxError> {
        let mut dev = self.gate.access();
        read_command_status(&mut dev.backend)
            .map_err(|e| self.fail(Fail::Backend(Operation::ReadCommandStatus, e)))
    }

    /// The guest's view of COMMAND: its last write, with its own
    /// INTX_DISABLE.
    pub fn guest_command(&self) -> u16 {
        self.gate.access().guest.value()
    }

    /// Whether a reset holds the device right now.
    pub fn is_blocked(&self) -> bool {
        self.gate.is_blocked()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> IntxStats {
        self.counters.snapshot(self.gate.deferrals())
    }

    /// Runs `f` with exclusive access to the backend, through the gate.
    /// For management operations the engine has no method for.
    pub fn with_backend<R>(&self, f: impl FnOnce(&mut B) -> R) -> R {
        f(&mut self.gate.access().backend)
    }

    fn retry<T>(&self, op: impl FnMut() -> Result<T, BackendError>) -> Result<T, BackendError> {
        self.retry_with(self.options.retry, op)
    }

    fn retry_with<T>(
        &self,
        policy: RetryPolicy,
        mut op: impl FnMut() -> Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        let started = Instant::now();
        let within_budget = |backoff: Duration| match policy.total {
            Some(total) => started.elapsed() + backoff <= total,
            None => true,
        };
        let mut backoff = policy.first_backoff;
        let mut attempt = 1;
        loop {
            match op() {
                Err(e)
                    if e.is_transient() && attempt < policy.attempts && within_budget(backoff) =>
                {
                    Counters::bump(&self.counters.retries);
                    debug!(bdf = %self.bdf, attempt, error = %e, "transient error, retrying");
                    thread::sleep(backoff);
                    backoff = (backoff * 2).min(policy.max_backoff);
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    fn fail(&self, fail: Fail) -> IntxError {
        Counters::bump(&self.counters.errors);
        fail.into_error(self.bdf)
    }
}

impl<B: PciBackend> Drop for IntxDevice<B> {
    /// Hands the device back masked, with delivery stopped and COMMAND as
    /// the guest left it.
    fn drop(&mut self) {
        if let Err(e) = self.disarm() {
            warn!(bdf = %self.bdf, error = %crate::error_chain(&e), "disarming INTx failed");
        }
    }
}
