//! Switching an armed engine onto the kernel-bypass path and back
//! ([`IntxDevice::set_kernel_bypass`]).

use std::sync::atomic::Ordering;

use vmm_sys_util::eventfd::EventFd;

use tracing::instrument;

use crate::backend::PciBackend;
use crate::intx::error::{IntxError, Operation};
use crate::intx::sink::InterruptSink;

use super::{Bypass, Device, During, IntxDevice, IntxOptions, LineState};

impl<B: PciBackend> IntxDevice<B> {
    /// Takes over `backend`'s INTx on the kernel bypass exactly as the
    /// kernel has it wired already: it signals `irqfd` and runs its
    /// check-and-unmask at each signal of `resample` (KVM's resample
    /// eventfd, as its unmask eventfd) — the wiring a previous owner of the
    /// same device file left in place, e.g. this daemon's previous process
    /// (the fd store kept the device file and the eventfds open, so the
    /// kernel kept delivering while no process served the device).
    ///
    /// Nothing is re-wired, masked or unmasked ([`PciBackend::intx_adopt`]),
    /// so delivery goes on without a gap; the device is read (COMMAND, the
    /// capability list, the header kept for resets) as at any arming. From
    /// then on the engine is on the bypass as after
    /// [`with_kernel_bypass`](Self::with_kernel_bypass) or
    /// [`set_kernel_bypass`](Self::set_kernel_bypass): never in service,
    /// re-checks end in the kernel's check-and-unmask, resets and the
    /// watchdog follow the bypass's rules (the watchdog recovers a line the
    /// previous owner left masked). `sink` receives what the engine itself
    /// delivers on the bypass (a re-check that finds the device asserting).
    ///
    /// The caller vouches that the wiring is `irqfd` and `resample` (the
    /// kernel has no call that reads it back); a backend that can tell it
    /// is not in place refuses, and then nothing is armed.
    #[instrument(skip_all, fields(bdf = %backend.bdf()))]
    pub fn with_adopted_bypass(
        backend: B,
        sink: impl InterruptSink + 'static,
        irqfd: EventFd,
        resample: EventFd,
        options: IntxOptions,
    ) -> Result<Self, IntxError> {
        Self::build(
            backend,
            Box::new(sink),
            Some(Bypass { irqfd, resample }),
            true,
            options,
        )
    }

    /// Whether the kernel bypass carries this device's EOIs.
    pub fn is_kernel_bypass(&self) -> bool {
        self.bypass_active.load(Ordering::SeqCst)
    }

    /// Switches an armed engine onto the kernel-bypass path (`Some`:
    /// KVM's irqfd and resample eventfd, e.g. of a VMM that attached
    /// later) or back to the user-space path (`None`), under the gate.
    ///
    /// Onto the bypass: the backend signals `irqfd`, `resample` becomes its
    /// unmask eventfd (enable order trigger -> mask -> unmask eventfd), and
    /// the line is re-derived with the kernel's check-and-unmask, so an
    /// interrupt the device asserts is signalled to the new irqfd; on
    /// failure the whole user-space wiring is put back (and
    /// [`is_kernel_bypass`](Self::is_kernel_bypass) says so). Back: the
    /// unmask eventfd is removed, the backend signals the engine's trigger
    /// again, and the line is re-derived the same way (an interrupt the
    /// departed guest never EOIed is delivered again on the user-space
    /// path).
    ///
    /// `Some` while the line is held ([`hold`](Self::hold)) is refused with
    /// nothing changed.
    ///
    /// `Some` while already on the bypass swaps the wiring: the kernel
    /// takes one unmask eventfd per device (`vfio_virqfd_enable` answers
    /// EBUSY for a second), so the old one is removed first (fd -1), then
    /// the new pair is wired as above.
    ///
    /// If re-deriving the line fails, the worker re-checks it (a kick), as
    /// after any failure of the interrupt path.
    pub fn set_kernel_bypass(&self, wiring: Option<(EventFd, EventFd)>) -> Result<(), IntxError> {
        let mut dev = self.gate.access();
        if wiring.is_some() && dev.hold.is_some() {
            // The kernel would unmask the held line at the guest's EOI.
            return Err(IntxError::HoldOnBypass { bdf: self.bdf });
        }
        let ctx = self.ctx();
        let d = &mut *dev;
        let settle = |d: &mut Device<B>| {
            d.line = LineState::Idle;
            d.settle(&ctx).inspect_err(|_| ctx.wake.kick())
        };
        let unwired = if d.bypass.take().is_some() {
            self.bypass_active.store(false, Ordering::SeqCst);
            d.backend
                .intx_set_unmask_eventfd(None)
                .during(Operation::SetUnmaskEventfd)
        } else {
            Ok(())
        };
        let result = match wiring {
            Some((irqfd, resample)) => {
                let wired = unwired
                    .and_then(|()| d.backend.intx_enable(&irqfd).during(Operation::Enable))
                    .and_then(|()| d.backend.intx_mask().during(Operation::Mask))
                    .and_then(|()| {
                        d.backend
                            .intx_set_unmask_eventfd(Some(&resample))
                            .during(Operation::SetUnmaskEventfd)
                    });
                match wired {
                    Ok(()) => {
                        d.bypass = Some(Bypass { irqfd, resample });
                        self.bypass_active.store(true, Ordering::SeqCst);
                        settle(d)
                    }
                    Err(f) => {
                        let _ = d.backend.intx_set_unmask_eventfd(None);
                        let _ = d.backend.intx_enable(&self.wake.trigger);
                        let _ = d.backend.intx_mask();
                        // An interrupt in service on the user-space path
                        // stays so; the bypass never leaves one.
                        let _ = d.settle(&ctx).inspect_err(|_| ctx.wake.kick());
                        Err(f)
                    }
                }
            }
            None => unwired
                .and_then(|()| {
                    d.backend
                        .intx_enable(&self.wake.trigger)
                        .during(Operation::Enable)
                })
                .and_then(|()| d.backend.intx_mask().during(Operation::Mask))
                .and_then(|()| settle(d)),
        };
        drop(dev);
        result.map_err(|f| self.fail(f))
    }
}
