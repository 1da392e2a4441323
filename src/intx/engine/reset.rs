//! Flow 4, resets through the gate, for one function or for every function
//! a bus or slot reset reaches.
//!
//! Per engine: block the gate -> save the header -> mask -> (the reset) ->
//! restore -> settle (re-check STATUS, re-arm) -> run deferred work ->
//! unblock. A reset that reaches several functions this process drives
//! (`VFIO_DEVICE_PCI_HOT_RESET`) blocks every one of their gates first, in
//! BDF order so that two such resets over overlapping sets cannot wait for
//! each other in a cycle, resets once, then restores and settles each.
//!
//! A function that reads all-ones is reset anyway: the kernel has no such
//! precondition, and a reset is how a wedged function is recovered. Its
//! header is then restored from the last one read from it while it
//! answered (at arming, at the previous reset, after the guest's last write
//! of a header register), as vfio-pci restores the state it saved when the
//! device was opened; vfio-pci itself also saves and restores around its
//! own reset.

use std::ptr;
use std::sync::atomic::Ordering;
use std::sync::PoisonError;
use std::time::Duration;

use tracing::{debug, error, instrument, warn};

use super::{Ctx, Device, During, IntxDevice, RetryPolicy, WORK_RECHECK};
use crate::backend::{BackendError, ConfigSpace, PciBackend};
use crate::gate::GateGuard;
use crate::intx::error::{Fail, IntxError, Operation};
use crate::intx::stats::Counters;
use crate::pci::intx::read_command_status;
use crate::pci::regs::{
    PCI_BASE_ADDRESS_0, PCI_CACHE_LINE_SIZE, PCI_INTERRUPT_LINE, PCI_LATENCY_TIMER, PCI_NUM_BARS,
    PCI_ROM_ADDRESS, PCI_STATUS,
};
use crate::pci::{covers, Width};

impl RetryPolicy {
    /// The default budget for resets: as long as the kernel's own reset
    /// waits, since VFIO_DEVICE_RESET (`pci_try_reset_function`) answers
    /// EAGAIN for as long as another reset holds the device. An FLR alone
    /// waits 100 ms, a secondary bus reset about a second; the budget covers
    /// a bus reset in progress and another queued before ours.
    pub const fn reset_default() -> Self {
        Self {
            attempts: u32::MAX,
            first_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(50),
            total: Some(Duration::from_secs(3)),
        }
    }
}

/// One engine taking part in a reset, its gate blocked.
struct Held<'a, B: PciBackend> {
    engine: &'a IntxDevice<B>,
    dev: GateGuard<'a, Device<B>>,
    /// Saved and masked, so it must be restored and settled.
    prepared: bool,
}

impl<B: PciBackend> IntxDevice<B> {
    /// [`reset_by`](Self::reset_by) for a reset that also reaches other
    /// functions this process drives (a bus or slot reset: `VFIO_DEVICE_PCI_HOT_RESET`
    /// resets every function in its scope): `method` runs once, on this
    /// engine's backend, while every engine in `siblings` is held at its
    /// gate too. Their accesses wait, their interrupt paths defer; each is
    /// saved and masked before, and restored, re-masked where its kernel
    /// keeps mask bookkeeping, and settled after, so an interrupt pending
    /// across the reset is delivered and no line is left masked.
    ///
    /// Gates are blocked in BDF order and released in reverse. If saving or
    /// masking one engine fails, nothing is reset and the engines prepared
    /// so far are restored and settled. Returns the first failure (a failed
    /// preparation, else the reset's own, else a restore's), naming its
    /// device; every engine's own counters record its part.
    #[instrument(skip_all, fields(bdf = %self.bdf))]
    pub fn reset_with_siblings(
        &self,
        siblings: &[&IntxDevice<B>],
        mut method: impl FnMut(&mut B) -> Result<(), BackendError>,
    ) -> Result<(), IntxError> {
        let mut engines: Vec<&IntxDevice<B>> = Vec::with_capacity(siblings.len() + 1);
        engines.push(self);
        engines.extend_from_slice(siblings);
        engines.sort_by_key(|e| e.bdf);
        engines.dedup_by(|a, b| ptr::eq(*a, *b));
        let mut held: Vec<Held<'_, B>> = engines
            .into_iter()
            .map(|engine| Held {
                engine,
                dev: engine.gate.block(),
                prepared: false,
            })
            .collect();
        let mut failures: Vec<IntxError> = Vec::new();
        for h in &mut held {
            match h.dev.prepare_reset(h.engine) {
                Ok(()) => h.prepared = true,
                Err(f) => {
                    failures.push(h.engine.fail(f));
                    break;
                }
            }
        }
        let mut reset_done = false;
        if failures.is_empty() {
            // `self` is among the held engines by construction.
            if let Some(me) = held.iter_mut().find(|h| ptr::eq(h.engine, self)) {
                let mut retrying = false;
                let reset = self.retry_with(self.options.reset_retry, || {
                    if std::mem::replace(&mut retrying, true) {
                        // Another reset held the device (EAGAIN). A user
                        // config read of STATUS sleeps until that reset
                        // ends (the kernel blocks user config access during
                        // a reset), so the next try lands right after it
                        // instead of at a random moment of the next one: a
                        // loop of outside resets leaves only short gaps.
                        let _ = me.dev.backend.config_read(PCI_STATUS, Width::Word);
                    }
                    method(&mut me.dev.backend)
                });
                match reset {
                    Ok(()) => reset_done = true,
                    Err(e) => failures.push(self.fail(Fail::Backend(Operation::Reset, e))),
                }
            }
        }
        // Restore and re-arm whether or not the reset happened, so that a
        // failed reset leaves every device as it was.
        for h in held.iter_mut().filter(|h| h.prepared) {
            // The backend re-masked its own device; the others' kernels were
            // not told (vfio-pci's mask bookkeeping).
            let remask = reset_done && !ptr::eq(h.engine, self);
            let ctx = h.engine.ctx();
            match h.dev.finish_reset(h.engine, remask, &ctx) {
                Ok(()) => debug!(bdf = %h.engine.bdf, line = ?h.dev.line, "reset done"),
                Err(f) => {
                    warn!(bdf = %h.engine.bdf, error = %f, "reset did not complete");
                    failures.push(h.engine.fail(f));
                }
            }
        }
        while let Some(h) = held.pop() {
            drop(h);
        }
        failures.into_iter().next().map_or(Ok(()), Err)
    }

    /// A guest-initiated FLR: the reset protocol, and if it fails, a report
    /// (the guest's FLR bit was stripped, so it believes the FLR happened).
    pub(super) fn guest_flr(&self) -> Result<(), IntxError> {
        debug!(bdf = %self.bdf, "guest initiated a function-level reset");
        self.reset().inspect_err(|e| {
            Counters::bump(&self.counters.guest_flr_failures);
            let mut log = self
                .reset_log
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(suppressed) = log.admit() {
                error!(
                    bdf = %self.bdf,
                    error = %crate::error_chain(e),
                    suppressed,
                    "the guest's function-level reset failed; the guest believes it happened"
                );
            }
        })
    }
}

impl<B: PciBackend> Device<B> {
    /// Before a reset: save the header, mask INTx so the device cannot
    /// interrupt mid-reset. A device that does not respond is reset anyway,
    /// with the header it last answered with.
    fn prepare_reset(&mut self, engine: &IntxDevice<B>) -> Result<(), Fail> {
        Counters::bump(&engine.counters.resets);
        match SavedHeader::save(&mut self.backend) {
            Ok(header) => self.header = Some(header),
            Err(BackendError::NotResponding) => {
                let mut log = engine
                    .reset_log
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                if let Some(suppressed) = log.admit() {
                    warn!(
                        bdf = %engine.bdf,
                        restore = if self.header.is_some() { "the header last read" } else { "nothing" },
                        suppressed,
                        "the device does not respond (all-ones); resetting it anyway"
                    );
                }
            }
            Err(e) => return Err(Fail::Backend(Operation::SaveState, e)),
        }
        match self.backend.intx_mask() {
            // A device that does not respond cannot be masked through its
            // config space, nor can it interrupt; the reset clears it.
            Ok(()) | Err(BackendError::NotResponding) => Ok(()),
            Err(e) => Err(Fail::Backend(Operation::Mask, e)),
        }
    }

    /// After a reset (or a failed one): restore, re-mask if `remask`, put
    /// the mask where the state machine wants it, and run interrupt work
    /// deferred meanwhile before the gate opens (the next queued reset would
    /// otherwise take the gate first, and a storm of resets would starve the
    /// interrupt path).
    fn finish_reset(
        &mut self,
        engine: &IntxDevice<B>,
        remask: bool,
        ctx: &Ctx<'_>,
    ) -> Result<(), Fail> {
        let restore = self
            .header
            .as_ref()
            .map_or(Ok(()), |header| header.restore(&mut self.backend))
            .and(self.write_command(ctx))
            .during(Operation::RestoreState);
        let remasked = if remask {
            self.backend.intx_mask().during(Operation::Mask)
        } else {
            Ok(())
        };
        let settle = self.settle(ctx).and_then(|()| {
            let mut work = engine.wake.pending.swap(0, Ordering::SeqCst);
            self.run(&mut work, ctx).inspect_err(|_| {
                engine.wake.pending.fetch_or(work, Ordering::SeqCst);
            })
        });
        if settle.is_err() {
            // Leave the re-check to the interrupt path once the gate is free.
            engine.wake.pending.fetch_or(WORK_RECHECK, Ordering::SeqCst);
            engine.wake.kick();
        }
        restore.and(remasked).and(settle)
    }

    /// Re-reads the header after the guest wrote one of its registers, so
    /// that a reset of a device that stops answering restores what the guest
    /// last programmed. A device that does not answer keeps the old copy.
    pub(super) fn refresh_header(&mut self) {
        if let Ok(header) = SavedHeader::save(&mut self.backend) {
            self.header = Some(header);
        }
    }
}

/// The type 0 header registers a reset clears and the reset path restores.
/// COMMAND is not among them: it is rebuilt from the guest's view and the
/// host mask.
#[derive(Debug, Clone)]
pub(super) struct SavedHeader {
    bars: [u32; PCI_NUM_BARS as usize],
    rom: u32,
    cache_line_size: u32,
    latency_timer: u32,
    interrupt_line: u32,
}

impl SavedHeader {
    fn bar_offset(index: usize) -> u16 {
        // index < PCI_NUM_BARS, so this cannot truncate.
        PCI_BASE_ADDRESS_0 + 4 * index as u16
    }

    /// Whether an access covers one of the saved registers.
    pub(super) fn covered_by(offset: u16, width: Width) -> bool {
        (0..PCI_NUM_BARS * 4)
            .map(|i| PCI_BASE_ADDRESS_0 + i)
            .chain((0..4).map(|i| PCI_ROM_ADDRESS + i))
            .chain([PCI_CACHE_LINE_SIZE, PCI_LATENCY_TIMER, PCI_INTERRUPT_LINE])
            .any(|byte| covers(offset, width, byte))
    }

    pub(super) fn save<B: ConfigSpace + ?Sized>(dev: &mut B) -> Result<Self, BackendError> {
        // Fail early, before anything changes, if the device does not answer.
        read_command_status(dev)?;
        let mut bars = [0; PCI_NUM_BARS as usize];
        for (i, bar) in bars.iter_mut().enumerate() {
            *bar = dev.config_read(Self::bar_offset(i), Width::Dword)?;
        }
        Ok(Self {
            bars,
            rom: dev.config_read(PCI_ROM_ADDRESS, Width::Dword)?,
            cache_line_size: dev.config_read(PCI_CACHE_LINE_SIZE, Width::Byte)?,
            latency_timer: dev.config_read(PCI_LATENCY_TIMER, Width::Byte)?,
            interrupt_line: dev.config_read(PCI_INTERRUPT_LINE, Width::Byte)?,
        })
    }

    /// Writes every saved register back, going on past a failed write so
    /// that one failure leaves as little as possible unrestored; returns the
    /// first error.
    fn restore<B: ConfigSpace + ?Sized>(&self, dev: &mut B) -> Result<(), BackendError> {
        let writes = self
            .bars
            .iter()
            .enumerate()
            .map(|(i, bar)| (Self::bar_offset(i), Width::Dword, *bar))
            .chain([
                (PCI_ROM_ADDRESS, Width::Dword, self.rom),
                (PCI_CACHE_LINE_SIZE, Width::Byte, self.cache_line_size),
                (PCI_LATENCY_TIMER, Width::Byte, self.latency_timer),
                (PCI_INTERRUPT_LINE, Width::Byte, self.interrupt_line),
            ]);
        let mut first_error = None;
        for (offset, width, value) in writes {
            if let Err(e) = dev.config_write(offset, width, value) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}
