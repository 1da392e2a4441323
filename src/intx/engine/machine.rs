//! The INTx state machine proper, run under the gate: host interrupts,
//! guest EOIs, unmask-or-redeliver, injection, settling after a reset, and
//! the guest's COMMAND writes merged with the host mask.

use crate::backend::{BackendError, IntxDisableBit, PciBackend, Unmask};
use crate::intx::error::{Fail, Operation};
use crate::intx::stats::Counters;
use crate::pci::intx::read_command_status;
use crate::pci::regs::PCI_COMMAND;
use crate::pci::{with_intx_disable, Width};

use super::{Ctx, Device, During, LineState, WORK_CLAIMED, WORK_EOI, WORK_HOST, WORK_RECHECK};

impl<B: PciBackend> Device<B> {
    /// Runs the recorded interrupt-path work: EOI first, so that a host
    /// interrupt seen in the same pass finds the line as the EOI left it;
    /// a re-check (after a deferral or a failure) last. Each step done is
    /// cleared from `work`, so that on failure only what is left is queued
    /// again: an EOI that already re-injected must not run (and inject)
    /// twice before the guest's next EOI.
    ///
    /// On the kernel bypass a host interrupt is a re-check: the kernel
    /// signals KVM's irqfd itself and takes the guest's EOI, so the engine
    /// never injects there nor waits in service for an EOI.
    pub(super) fn run(&mut self, work: &mut u8, ctx: &Ctx<'_>) -> Result<(), Fail> {
        if self.bypass.is_some() && *work & WORK_HOST != 0 {
            *work = (*work & !(WORK_HOST | WORK_CLAIMED)) | WORK_RECHECK;
        }
        if *work & WORK_EOI != 0 {
            self.guest_eoi(ctx)?;
            *work &= !WORK_EOI;
        }
        if *work & WORK_HOST != 0 {
            // A claim holds only if nothing that could outdate it runs in
            // this pass or ran since (a re-check, a reset, a re-wiring).
            let claimed = *work & WORK_CLAIMED != 0
                && *work & WORK_RECHECK == 0
                && ctx.claimed_generation == ctx.generation.current()
                && self.backend.capabilities().trigger_claims;
            self.host_interrupt(ctx, claimed)?;
            *work &= !(WORK_HOST | WORK_CLAIMED);
        }
        if *work & WORK_RECHECK != 0 {
            self.settle(ctx)?;
            *work &= !WORK_RECHECK;
        }
        Ok(())
    }

    /// Flow 1 behind the gate. `claimed`: the kernel's own check-and-mask
    /// found the device asserting and masked it, and nothing can have
    /// changed that since, so STATUS need not be read again.
    pub(super) fn host_interrupt(&mut self, ctx: &Ctx<'_>, claimed: bool) -> Result<(), Fail> {
        Counters::bump(&ctx.counters.host_interrupts);
        let asserting = if claimed {
            Counters::bump(&ctx.counters.claimed);
            true
        } else {
            self.backend
                .intx_check_and_mask()
                .during(Operation::CheckAndMask)?
        };
        if !asserting {
            if self.line == LineState::Idle {
                Counters::bump(&ctx.counters.not_mine);
            }
            return Ok(());
        }
        if self.hold.is_some() {
            // Held: check-and-mask masked it; `release` delivers it.
            return Ok(());
        }
        match self.line {
            // The guest's line is already asserted; its EOI re-checks.
            LineState::InService | LineState::GuestMasked => Ok(()),
            LineState::Idle if self.guest.intx_disabled() => {
                Counters::bump(&ctx.counters.held);
                self.line = LineState::GuestMasked;
                Ok(())
            }
            LineState::Idle => self.inject(ctx),
        }
    }

    /// Flow 2 behind the gate.
    pub(super) fn guest_eoi(&mut self, ctx: &Ctx<'_>) -> Result<(), Fail> {
        Counters::bump(&ctx.counters.eois);
        if self.line != LineState::InService {
            Counters::bump(&ctx.counters.spurious_eois);
            return Ok(());
        }
        Counters::bump(&ctx.counters.serviced_eois);
        if self.hold.is_some() {
            // The guest is done with it, but the host holds the line
            // masked: `release` re-checks and delivers what still asserts.
            self.line = LineState::Idle;
            return Ok(());
        }
        if self.guest.intx_disabled() {
            // The guest masked its INTx meanwhile: stay masked until it
            // clears the bit; `settle` then delivers what is still pending.
            self.line = LineState::GuestMasked;
            return Ok(());
        }
        self.unmask_or_redeliver(ctx)
    }

    /// Check-and-unmask; if the device still asserts, it stays masked and
    /// the interrupt is delivered again.
    pub(super) fn unmask_or_redeliver(&mut self, ctx: &Ctx<'_>) -> Result<(), Fail> {
        match self
            .backend
            .intx_check_and_unmask()
            .during(Operation::CheckAndUnmask)?
        {
            Unmask::Unmasked | Unmask::Delegated => {
                self.line = LineState::Idle;
                Ok(())
            }
            Unmask::StillAsserting if self.line == LineState::InService => {
                Counters::bump(&ctx.counters.reinjected);
                self.inject(ctx)
            }
            Unmask::StillAsserting => {
                // Not in service, so the line may not be masked yet.
                self.backend.intx_mask().during(Operation::Mask)?;
                self.inject(ctx)
            }
        }
    }

    pub(super) fn inject(&mut self, ctx: &Ctx<'_>) -> Result<(), Fail> {
        ctx.sink.inject().map_err(Fail::Inject)?;
        Counters::bump(&ctx.counters.injected);
        // On the kernel bypass the guest's EOI goes to the kernel (KVM's
        // resample eventfd is its unmask eventfd), which unmasks then: no
        // EOI reaches the engine, so it must not wait in service for one.
        self.line = if self.bypass.is_some() {
            LineState::Idle
        } else {
            LineState::InService
        };
        Ok(())
    }

    /// Re-derives the mask from the state machine and the device's STATUS:
    /// after arming, after a reset, and when the guest clears its
    /// INTX_DISABLE. An interrupt the device asserts is delivered (or held),
    /// and a line nobody needs masked is unmasked.
    pub(super) fn settle(&mut self, ctx: &Ctx<'_>) -> Result<(), Fail> {
        // The line is re-derived: a trigger signal sent before this no longer
        // proves anything about the device.
        ctx.generation.advance();
        if self.hold.is_some() {
            return self.backend.intx_mask().during(Operation::Mask);
        }
        match self.line {
            LineState::InService => self.backend.intx_mask().during(Operation::Mask),
            LineState::Idle | LineState::GuestMasked if self.guest.intx_disabled() => {
                let cs =
                    read_command_status(&mut self.backend).during(Operation::ReadCommandStatus)?;
                if cs.asserting() {
                    self.backend.intx_mask().during(Operation::Mask)?;
                    if self.line == LineState::Idle {
                        Counters::bump(&ctx.counters.held);
                    }
                    self.line = LineState::GuestMasked;
                } else {
                    self.line = LineState::Idle;
                    self.write_command(ctx).during(Operation::RestoreState)?;
                }
                Ok(())
            }
            LineState::Idle | LineState::GuestMasked => self.unmask_or_redeliver(ctx),
        }
    }

    /// Whether the host currently wants the line masked.
    pub(super) fn host_masked(&self) -> bool {
        self.line != LineState::Idle || self.hold.is_some()
    }

    /// The INTX_DISABLE value to put in COMMAND writes.
    pub(super) fn physical_intx_disable(&self, ctx: &Ctx<'_>) -> bool {
        match ctx.disable_bit {
            IntxDisableBit::Physical => self.guest.intx_disabled() || self.host_masked(),
            IntxDisableBit::Virtualized => self.guest.intx_disabled(),
        }
    }

    /// Writes the guest's COMMAND merged with the host mask.
    pub(super) fn write_command(&mut self, ctx: &Ctx<'_>) -> Result<(), BackendError> {
        let command = self.guest.merged(self.physical_intx_disable(ctx));
        self.backend
            .config_write(PCI_COMMAND, Width::Word, u32::from(command))
    }

    /// Flow 3 (write) behind the gate.
    pub(super) fn guest_write(
        &mut self,
        offset: u16,
        width: Width,
        value: u32,
        ctx: &Ctx<'_>,
        write: impl FnOnce(&mut Self, u32) -> Result<(), BackendError>,
    ) -> Result<(), Fail> {
        let op = Operation::GuestConfigWrite { offset, width };
        let before = self.guest;
        self.guest.record(offset, width, value);
        let enabling = before.intx_disabled() && !self.guest.intx_disabled();
        // When the guest unmasks, keep a physical mask in place and let
        // `settle` lift it with a check-and-unmask, so that a device that
        // asserted meanwhile is delivered rather than left to fire unmasked.
        let intx_disable = match ctx.disable_bit {
            IntxDisableBit::Physical if enabling => true,
            _ => self.physical_intx_disable(ctx),
        };
        let physical = with_intx_disable(offset, width, value, intx_disable);
        if let Err(e) = write(self, physical) {
            self.guest = before;
            return Err(Fail::Backend(op, e));
        }
        if enabling {
            // The guest unmasked its INTx: deliver what it held back. If
            // that fails the worker re-checks (bounded, as after any
            // interrupt-path failure): the line may be masked meanwhile.
            self.settle(ctx).inspect_err(|_| ctx.wake.kick())?;
        }
        Ok(())
    }
}
