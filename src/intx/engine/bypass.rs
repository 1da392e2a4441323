//! Switching an armed engine onto the kernel-bypass path and back
//! ([`IntxDevice::set_kernel_bypass`]).

use std::sync::atomic::Ordering;

use vmm_sys_util::eventfd::EventFd;

use crate::backend::PciBackend;
use crate::intx::error::{IntxError, Operation};

use super::{Bypass, Device, During, IntxDevice, LineState};

impl<B: PciBackend> IntxDevice<B> {
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
