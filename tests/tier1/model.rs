//! The state machine against a small reference model: random sequences of
//! device, guest, worker and reset events, stepped on one thread so that
//! every step's outcome is predicted exactly.

use proptest::prelude::*;
use vfio_intx::intx::LineState;
use vfio_intx::pci::regs::*;
use vfio_intx::pci::Width;
use vfio_intx::sim::SimDevice;

use crate::Stepper;

#[derive(Debug, Clone)]
enum Op {
    Raise,
    HostPoll,
    GuestIsr,
    SpuriousEoi,
    SpuriousHostEvent,
    WriteCommand { width: Width, command: u16 },
    Reset,
}

fn op() -> impl Strategy<Value = Op> {
    let command = prop::sample::select(vec![
        0u16,
        COMMAND_MEMORY,
        COMMAND_MEMORY | COMMAND_MASTER,
        COMMAND_INTX_DISABLE,
        COMMAND_MEMORY | COMMAND_INTX_DISABLE,
        COMMAND_MEMORY | COMMAND_MASTER | COMMAND_INTX_DISABLE,
    ]);
    let width = prop::sample::select(vec![Width::Byte, Width::Word, Width::Dword]);
    prop_oneof![
        4 => Just(Op::Raise),
        4 => Just(Op::HostPoll),
        4 => Just(Op::GuestIsr),
        1 => Just(Op::SpuriousEoi),
        1 => Just(Op::SpuriousHostEvent),
        2 => (width, command).prop_map(|(width, command)| Op::WriteCommand { width, command }),
        1 => Just(Op::Reset),
    ]
}

/// What the engine should be doing, derived from the PCI 2.3 rules alone.
#[derive(Debug, Default)]
struct Model {
    pending: u64,
    guest_disabled: bool,
    guest_command: u16,
    line: Option<LineState>,
    /// The host trigger has fired and not been serviced.
    event: bool,
    /// The guest's line is asserted (injected, no EOI yet).
    guest_asserted: bool,
    injected: u64,
}

impl Model {
    fn line(&self) -> LineState {
        self.line.unwrap_or(LineState::Idle)
    }

    fn inject(&mut self) {
        assert!(!self.guest_asserted, "model: double injection");
        self.guest_asserted = true;
        self.injected += 1;
        self.line = Some(LineState::InService);
    }

    /// `settle`: after arming, a reset, or the guest clearing its bit.
    fn settle(&mut self) {
        match self.line() {
            LineState::InService => {}
            _ if self.guest_disabled => {
                self.line = Some(if self.pending > 0 {
                    LineState::GuestMasked
                } else {
                    LineState::Idle
                });
            }
            _ if self.pending > 0 => self.inject(),
            _ => self.line = Some(LineState::Idle),
        }
    }

    fn step(&mut self, op: &Op) {
        match op {
            Op::Raise => {
                let unmasked = self.line() == LineState::Idle && !self.guest_disabled;
                if unmasked && self.pending == 0 {
                    self.event = true;
                }
                self.pending += 1;
            }
            Op::HostPoll => {
                if std::mem::take(&mut self.event)
                    && self.pending > 0
                    && self.line() == LineState::Idle
                {
                    if self.guest_disabled {
                        self.line = Some(LineState::GuestMasked);
                    } else {
                        self.inject();
                    }
                }
            }
            Op::GuestIsr => {
                if self.guest_asserted {
                    self.pending = self.pending.saturating_sub(1);
                    self.guest_asserted = false;
                    if self.guest_disabled {
                        self.line = Some(LineState::GuestMasked);
                    } else if self.pending > 0 {
                        self.inject();
                    } else {
                        self.line = Some(LineState::Idle);
                    }
                }
            }
            Op::SpuriousEoi => {
                // An EOI with the line in service is a real one (the guest's
                // ack is missing, so the device still asserts: re-inject).
                if self.line() == LineState::InService {
                    self.guest_asserted = false;
                    if self.guest_disabled {
                        self.line = Some(LineState::GuestMasked);
                    } else if self.pending > 0 {
                        self.inject();
                    } else {
                        self.line = Some(LineState::Idle);
                    }
                }
            }
            Op::SpuriousHostEvent => self.event = true,
            Op::WriteCommand { width, command } => {
                let (low, high) = ((command & 0xff) as u8, (command >> 8) as u8);
                match width {
                    Width::Byte => {
                        self.guest_command = (self.guest_command & 0x00ff) | (u16::from(high) << 8)
                    }
                    _ => self.guest_command = u16::from(low) | (u16::from(high) << 8),
                }
                let was = self.guest_disabled;
                self.guest_disabled = self.guest_command & COMMAND_INTX_DISABLE != 0;
                if was && !self.guest_disabled {
                    self.settle();
                }
            }
            Op::Reset => {
                if self.pending > 0 {
                    // The reset cleared COMMAND: the line rose unmasked.
                    self.event = true;
                }
                self.settle();
            }
        }
    }
}

fn apply(t: &Stepper, op: &Op) {
    match op {
        Op::Raise => t.sim.raise(),
        Op::HostPoll => t.poll_host(),
        Op::GuestIsr => {
            t.sim.ack();
            t.dev.on_guest_eoi().unwrap();
        }
        Op::SpuriousEoi => {
            t.dev.on_guest_eoi().unwrap();
        }
        Op::SpuriousHostEvent => t.dev.trigger().write(1).unwrap(),
        Op::WriteCommand { width, command } => {
            let (offset, value) = match width {
                Width::Byte => (PCI_COMMAND + 1, u32::from(command >> 8)),
                Width::Word => (PCI_COMMAND, u32::from(*command)),
                // The high half writes STATUS: zeros clear nothing.
                Width::Dword => (PCI_COMMAND, u32::from(*command)),
            };
            t.dev.guest_config_write(offset, *width, value).unwrap();
        }
        Op::Reset => t.dev.reset().unwrap(),
    }
}

fn check(t: &Stepper, m: &Model, after: &Op) {
    let line = t.dev.line_state();
    assert_eq!(line, m.line(), "line state after {after:?}");
    assert_eq!(t.injected(), m.injected, "injections after {after:?}");
    let snap = t.sim.snapshot();
    let physical = snap.command & COMMAND_INTX_DISABLE != 0;
    assert_eq!(
        physical,
        m.guest_disabled || line != LineState::Idle,
        "physical INTX_DISABLE after {after:?}"
    );
    let seen = t.dev.guest_config_read(PCI_COMMAND, Width::Word).unwrap() as u16;
    assert_eq!(
        seen, m.guest_command,
        "guest's view of COMMAND after {after:?}"
    );
    assert_eq!(
        snap.command & !COMMAND_INTX_DISABLE,
        m.guest_command & !COMMAND_INTX_DISABLE
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn engine_follows_the_reference_model(ops in prop::collection::vec(op(), 1..80)) {
        let t = Stepper::new(SimDevice::builder().reset_window(std::time::Duration::ZERO).build());
        let mut m = Model::default();
        for op in &ops {
            // The guest ISR only runs when its line is asserted.
            if matches!(op, Op::GuestIsr) && !m.guest_asserted {
                continue;
            }
            m.step(op);
            apply(&t, op);
            check(&t, &m, op);
        }
        // Quiesce: the guest re-enables INTx and services everything.
        let enable = Op::WriteCommand { width: Width::Word, command: COMMAND_MEMORY };
        m.step(&enable);
        apply(&t, &enable);
        for _ in 0..(m.pending * 2 + 4) {
            for op in [Op::HostPoll, Op::GuestIsr] {
                if matches!(op, Op::GuestIsr) && !m.guest_asserted {
                    continue;
                }
                m.step(&op);
                apply(&t, &op);
                check(&t, &m, &op);
            }
        }
        let snap = t.sim.snapshot();
        prop_assert_eq!(snap.pending, 0, "interrupts left undelivered");
        prop_assert_eq!(snap.command & COMMAND_INTX_DISABLE, 0, "line left masked");
        prop_assert_eq!(t.dev.line_state(), LineState::Idle);
    }

    /// Any guest config access — offset, width, value, alignment — is either
    /// refused with an error or applied, never a panic, and the INTx
    /// invariants hold afterwards.
    #[test]
    fn arbitrary_guest_config_accesses_keep_the_invariants(
        accesses in prop::collection::vec((0u16..0x120, 0usize..5, any::<u32>(), any::<bool>()), 1..64)
    ) {
        let t = Stepper::new(SimDevice::builder().build());
        t.sim.raise();
        t.poll_host();
        for (offset, len, value, write) in accesses {
            let Some(width) = Width::from_len(len) else { continue };
            if write {
                let _ = t.dev.guest_config_write(offset, width, value);
            } else {
                let _ = t.dev.guest_config_read(offset, width);
            }
            let line = t.dev.line_state();
            let guest = t.dev.guest_command();
            let snap = t.sim.snapshot();
            let guest_disabled = guest & COMMAND_INTX_DISABLE != 0;
            prop_assert_eq!(snap.command & COMMAND_INTX_DISABLE != 0, guest_disabled || line != LineState::Idle);
            let seen = t.dev.guest_config_read(PCI_COMMAND, Width::Word).unwrap() as u16;
            prop_assert_eq!(seen & COMMAND_INTX_DISABLE, guest & COMMAND_INTX_DISABLE);
            if t.injected() > 0 && line == LineState::InService {
                t.guest_isr();
            }
        }
    }
}

/// Events of the reference model on and off the kernel bypass.
#[derive(Debug, Clone)]
enum BypassOp {
    Raise,
    /// The engine's worker wakes on its trigger.
    HostPoll,
    /// The guest's ISR: acknowledge the device, then EOI — to the engine on
    /// the user-space path, to the kernel (check-and-unmask) on the bypass.
    GuestIsr,
    SpuriousHostEvent,
    WriteCommand {
        width: Width,
        command: u16,
    },
    Reset,
    /// A VMM attaches on the bypass (or re-wires it while on it).
    BypassOn,
    /// Back to the user-space path (the daemon's detach).
    BypassOff,
}

fn bypass_op() -> impl Strategy<Value = BypassOp> {
    let command = prop::sample::select(vec![
        COMMAND_MEMORY,
        COMMAND_MEMORY | COMMAND_MASTER,
        COMMAND_INTX_DISABLE,
        COMMAND_MEMORY | COMMAND_INTX_DISABLE,
    ]);
    let width = prop::sample::select(vec![Width::Byte, Width::Word]);
    prop_oneof![
        4 => Just(BypassOp::Raise),
        4 => Just(BypassOp::HostPoll),
        4 => Just(BypassOp::GuestIsr),
        1 => Just(BypassOp::SpuriousHostEvent),
        2 => (width, command).prop_map(|(width, command)| BypassOp::WriteCommand { width, command }),
        1 => Just(BypassOp::Reset),
        2 => Just(BypassOp::BypassOn),
        1 => Just(BypassOp::BypassOff),
    ]
}

/// vfio-pci's INTx (vfio_pci_intrs.c, as the simulated kernel models it)
/// and the engine on top, on and off the bypass.
#[derive(Debug, Default)]
struct BypassModel {
    pending: u64,
    guest_disabled: bool,
    guest_command: u16,
    line: Option<LineState>,
    /// vfio's `masked` (the physical INTX_DISABLE).
    masked: bool,
    bypass: bool,
    /// The engine's trigger holds a host count.
    event: bool,
    /// Signals the irqfd received since the last look.
    irqfd: u64,
    /// The guest's line is asserted (an injection or an irqfd signal),
    /// no EOI yet.
    guest_asserted: bool,
    injected: u64,
}

impl BypassModel {
    fn line(&self) -> LineState {
        self.line.unwrap_or(LineState::Idle)
    }

    fn level(&self) -> bool {
        self.pending > 0
    }

    /// vfio_send_intx_eventfd: to KVM's irqfd on the bypass, else to the
    /// engine's trigger.
    fn signal(&mut self) {
        if self.bypass {
            self.irqfd += 1;
        } else {
            self.event = true;
        }
    }

    /// vfio_intx_handler on an unmasked line the device drives.
    fn handler(&mut self) {
        if self.level() && !self.masked {
            self.masked = true;
            self.signal();
        }
    }

    /// ACTION_UNMASK / the unmask eventfd: check-and-unmask.
    fn unmask(&mut self) {
        if self.masked && !self.guest_disabled {
            if self.level() {
                self.signal();
            } else {
                self.masked = false;
            }
        }
    }

    /// intx_enable with a new trigger: masked as the user's virtual bit.
    fn enable(&mut self) {
        self.masked = self.guest_disabled;
        self.handler();
    }

    fn inject(&mut self) {
        self.injected += 1;
        self.guest_asserted = true;
        self.line = Some(LineState::InService);
    }

    /// The engine's `settle`.
    fn settle(&mut self) {
        match self.line() {
            LineState::InService => self.masked = true,
            _ if self.guest_disabled => {
                self.line = Some(if self.level() {
                    self.masked = true;
                    LineState::GuestMasked
                } else {
                    LineState::Idle
                });
            }
            _ => {
                self.unmask();
                self.line = Some(LineState::Idle);
            }
        }
    }

    fn step(&mut self, op: &BypassOp) {
        match op {
            BypassOp::Raise => {
                self.pending += 1;
                self.handler();
            }
            BypassOp::HostPoll => {
                // On the bypass a count in the trigger is stale: dropped.
                if std::mem::take(&mut self.event) && !self.bypass {
                    if !self.level() {
                        self.unmask();
                    } else if self.line() == LineState::Idle {
                        if self.guest_disabled {
                            self.line = Some(LineState::GuestMasked);
                        } else {
                            self.inject();
                        }
                    }
                }
            }
            BypassOp::GuestIsr => {
                self.pending = self.pending.saturating_sub(1);
                self.guest_asserted = false;
                if self.bypass {
                    self.unmask();
                } else if self.line() == LineState::InService {
                    if self.guest_disabled {
                        self.line = Some(LineState::GuestMasked);
                    } else {
                        self.unmask();
                        self.line = Some(LineState::Idle);
                    }
                }
            }
            BypassOp::SpuriousHostEvent => self.event = true,
            BypassOp::WriteCommand { width, command } => {
                let high = command >> 8;
                self.guest_command = match width {
                    Width::Byte => (self.guest_command & 0x00ff) | (high << 8),
                    _ => *command,
                };
                let was = self.guest_disabled;
                let now = self.guest_command & COMMAND_INTX_DISABLE != 0;
                self.guest_disabled = now;
                if now && !was {
                    self.masked = true;
                } else if was && !now {
                    self.unmask();
                    self.settle();
                }
            }
            BypassOp::Reset => {
                self.masked = true;
                self.settle();
            }
            BypassOp::BypassOn => {
                self.bypass = true;
                self.enable();
                self.masked = true;
                self.line = Some(LineState::Idle);
                self.settle();
            }
            BypassOp::BypassOff => {
                self.bypass = false;
                self.enable();
                self.masked = true;
                self.line = Some(LineState::Idle);
                self.settle();
            }
        }
    }
}

struct BypassRig {
    t: Stepper,
    irqfd: vmm_sys_util::eventfd::EventFd,
    resample: vmm_sys_util::eventfd::EventFd,
}

impl BypassRig {
    fn apply(&self, op: &BypassOp) {
        let t = &self.t;
        match op {
            BypassOp::Raise => t.sim.raise(),
            BypassOp::HostPoll => t.poll_host(),
            BypassOp::GuestIsr => {
                t.sim.ack();
                if t.dev.is_kernel_bypass() {
                    // The kernel's unmask eventfd, run synchronously: what
                    // KVM's resample eventfd makes vfio-pci do.
                    t.dev
                        .with_backend(vfio_intx::backend::PciBackend::intx_check_and_unmask)
                        .unwrap();
                } else {
                    t.dev.on_guest_eoi().unwrap();
                }
            }
            BypassOp::SpuriousHostEvent => t.dev.trigger().write(1).unwrap(),
            BypassOp::WriteCommand { width, command } => {
                let (offset, value) = match width {
                    Width::Byte => (PCI_COMMAND + 1, u32::from(command >> 8)),
                    _ => (PCI_COMMAND, u32::from(*command)),
                };
                t.dev.guest_config_write(offset, *width, value).unwrap();
            }
            BypassOp::Reset => t.dev.reset().unwrap(),
            BypassOp::BypassOn => t
                .dev
                .set_kernel_bypass(Some((
                    self.irqfd.try_clone().unwrap(),
                    self.resample.try_clone().unwrap(),
                )))
                .unwrap(),
            BypassOp::BypassOff => t.dev.set_kernel_bypass(None).unwrap(),
        }
    }

    /// Compares the engine, the device and the irqfd with the model; the
    /// guest takes what the irqfd received.
    fn check(&self, m: &mut BypassModel, after: &BypassOp) {
        let t = &self.t;
        assert_eq!(t.dev.line_state(), m.line(), "line state after {after:?}");
        assert_eq!(t.dev.is_kernel_bypass(), m.bypass, "path after {after:?}");
        assert_eq!(t.injected(), m.injected, "injections after {after:?}");
        let received = self.irqfd.read().unwrap_or(0);
        assert_eq!(received, m.irqfd, "irqfd signals after {after:?}");
        if std::mem::take(&mut m.irqfd) > 0 {
            m.guest_asserted = true;
        }
        let snap = t.sim.snapshot();
        assert_eq!(
            snap.command & COMMAND_INTX_DISABLE != 0,
            m.masked,
            "vfio's mask after {after:?}"
        );
        let seen = t.dev.guest_config_read(PCI_COMMAND, Width::Word).unwrap() as u16;
        assert_eq!(seen, m.guest_command, "guest's COMMAND after {after:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// The engine on simulated vfio-pci, switched on and off the kernel
    /// bypass, reset and written on it: every step's line state, mask,
    /// injection and irqfd signal is the reference model's. On the bypass
    /// the engine never injects and never waits in service.
    #[test]
    fn engine_on_and_off_the_kernel_bypass_follows_the_reference_model(
        ops in prop::collection::vec(bypass_op(), 1..80)
    ) {
        use vfio_intx::sim::SimKernel;
        use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
        let sim = SimDevice::builder()
            .kernel(SimKernel::VfioPci)
            .reset_window(std::time::Duration::ZERO)
            .build();
        let rig = BypassRig {
            t: Stepper::new(sim),
            irqfd: EventFd::new(EFD_NONBLOCK).unwrap(),
            resample: EventFd::new(EFD_NONBLOCK).unwrap(),
        };
        let mut m = BypassModel::default();
        for op in &ops {
            if matches!(op, BypassOp::GuestIsr) && !m.guest_asserted {
                continue;
            }
            m.step(op);
            rig.apply(op);
            rig.check(&mut m, op);
            if m.bypass {
                prop_assert_ne!(m.line(), LineState::InService);
            }
        }
        // Quiesce: the guest re-enables INTx and services everything on
        // whichever path it is.
        let enable = BypassOp::WriteCommand { width: Width::Word, command: COMMAND_MEMORY };
        m.step(&enable);
        rig.apply(&enable);
        rig.check(&mut m, &enable);
        for _ in 0..(m.pending * 2 + 4) {
            for op in [BypassOp::HostPoll, BypassOp::GuestIsr] {
                if matches!(op, BypassOp::GuestIsr) && !m.guest_asserted {
                    continue;
                }
                m.step(&op);
                rig.apply(&op);
                rig.check(&mut m, &op);
            }
        }
        let snap = rig.t.sim.snapshot();
        prop_assert_eq!(snap.pending, 0, "interrupts left undelivered");
        prop_assert_eq!(snap.command & COMMAND_INTX_DISABLE, 0, "line left masked");
        prop_assert_eq!(rig.t.dev.line_state(), LineState::Idle);
    }
}
