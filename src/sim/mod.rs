//! A simulated PCI 2.3 device, faithful to the parts of the specification the
//! engine depends on, with fault injection. Used by the tests, the
//! benchmarks and `vfio-intx demo`.
//!
//! The model:
//! - the device drives its INTx level from its own pending-interrupt count
//!   (raised by [`SimDevice::raise`], lowered by [`SimDevice::ack`], the
//!   driver's BAR accesses);
//! - STATUS.INTERRUPT mirrors that level, also while INTX_DISABLE is set;
//! - INTX_DISABLE gates the line; the host interrupt (the backend's trigger
//!   eventfd) fires when the gated line goes from low to high, as a
//!   level-triggered line does when its handler masks it;
//! - a reset clears COMMAND, the BARs and the header registers, and for its
//!   window makes config reads return all-ones and drops writes; the device
//!   keeps its pending interrupts and asserts again afterwards;
//! - resets exclude each other as the kernel's device lock does: the
//!   backend's reset answers EAGAIN while another reset's window is open
//!   (`pci_try_reset_function`), an outside reset waits for it (sysfs
//!   `reset`, `pci_reset_function`);
//! - an FLR initiated by a config write that reaches the device (PCIe
//!   DevCtl, or Advanced Features AF_CTRL when built with
//!   [`SimDeviceBuilder::advanced_features`]) resets it with no one saving
//!   or restoring anything (in both kernel models: real vfio-pci would turn
//!   such a write into its own `pci_try_reset_function`, around any gate of
//!   ours; either way the bit must not get there, and the model makes a
//!   leaked one visible);
//! - devices built on the same [`SimBus`] are reset together by
//!   [`SimBackend::hot_reset`] (a secondary bus reset);
//! - faults can be injected per operation and call;
//! - masking can be made broken (INTX_DISABLE does not stick).

mod rig;
pub mod stress;

pub use rig::{RigError, SimRig};

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use crate::backend::{BackendError, Capabilities, ConfigSpace, IntxDisableBit, PciBackend, Unmask};
use crate::pci::intx;
use crate::pci::regs::*;
use crate::pci::{check_access, check_write, intx_disable_mask, with_intx_disable, Bdf, Width};

/// Vendor ID of the simulated device (QEMU's edu device, which the real-kernel
/// tests use too).
pub const SIM_VENDOR_ID: u16 = 0x1234;
/// Device ID of the simulated device.
pub const SIM_DEVICE_ID: u16 = 0x11e8;
/// Offset of the simulated PCI Express capability.
pub const SIM_PCIE_CAP: u16 = 0x40;
/// Offset of the simulated Advanced Features capability, when built with
/// one.
pub const SIM_AF_CAP: u16 = 0x60;
/// Size of BAR0.
const BAR0_SIZE: u32 = 0x1000;
/// COMMAND bits the device implements.
const COMMAND_WRITABLE: u16 = COMMAND_IO
    | COMMAND_MEMORY
    | COMMAND_MASTER
    | COMMAND_PARITY
    | COMMAND_SERR
    | COMMAND_INTX_DISABLE;

/// Which host kernel driver the simulated device sits behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SimKernel {
    /// None: the backend reaches the raw PCI 2.3 device and owns
    /// INTX_DISABLE itself, as with uio_pci_generic's sysfs config. Config
    /// reads during a reset window return all-ones.
    #[default]
    Bare,
    /// A model of vfio-pci: the host interrupt handler automasks
    /// (check-and-mask) before signalling the trigger, COMMAND.INTX_DISABLE
    /// is virtualized (the user's virtual disable), ACTION_MASK/UNMASK and
    /// the unmask eventfd follow `vfio_pci_intrs.c`, user config accesses
    /// wait while the device is in reset, and a reset saves and restores
    /// COMMAND without touching the driver's mask bookkeeping — so an
    /// unmask that lands inside a reset window is undone by the restore and
    /// the line stays masked while the driver believes it unmasked, exactly
    /// as the kernel does.
    VfioPci,
}

impl SimKernel {
    /// How the modelled kernel's COMMAND.INTX_DISABLE behaves.
    pub const fn intx_disable_bit(self) -> IntxDisableBit {
        match self {
            SimKernel::Bare => IntxDisableBit::Physical,
            SimKernel::VfioPci => IntxDisableBit::Virtualized,
        }
    }

    /// Whether the modelled kernel takes an unmask eventfd (the vfio-pci
    /// model does), i.e. whether the device can take the kernel bypass.
    pub const fn unmask_eventfd(self) -> bool {
        matches!(self, SimKernel::VfioPci)
    }
}

/// A backend operation that faults can be attached to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SimOp {
    /// `config_read`.
    ConfigRead,
    /// `config_write`.
    ConfigWrite,
    /// `intx_enable`.
    IntxEnable,
    /// `intx_disable`.
    IntxDisable,
    /// `intx_check_and_mask`.
    CheckAndMask,
    /// `intx_check_and_unmask`.
    CheckAndUnmask,
    /// `intx_mask`.
    Mask,
    /// `reset`.
    Reset,
}

impl SimOp {
    /// Every operation, for tests that fault each one in turn.
    pub const ALL: [SimOp; 8] = [
        SimOp::ConfigRead,
        SimOp::ConfigWrite,
        SimOp::IntxEnable,
        SimOp::IntxDisable,
        SimOp::CheckAndMask,
        SimOp::CheckAndUnmask,
        SimOp::Mask,
        SimOp::Reset,
    ];

    fn index(self) -> usize {
        self as usize
    }
}

/// What an injected fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fault {
    /// EIO.
    Eio,
    /// EAGAIN (transient).
    Eagain,
    /// EBUSY (transient).
    Ebusy,
    /// The device is gone.
    Gone,
    /// Config reads return all-ones; other operations report the device as
    /// not responding.
    AllOnes,
}

impl Fault {
    fn error(self, op: &'static str) -> BackendError {
        let os = |errno| BackendError::os(op, std::io::Error::from_raw_os_error(errno));
        match self {
            Fault::Eio => os(libc::EIO),
            Fault::Eagain => os(libc::EAGAIN),
            Fault::Ebusy => os(libc::EBUSY),
            Fault::Gone => BackendError::Gone,
            Fault::AllOnes => BackendError::NotResponding,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct FaultRule {
    op: SimOp,
    /// Calls of `op` to let through before the fault applies.
    skip: u64,
    /// Calls that fail once it applies (`u64::MAX`: forever).
    times: u64,
    fault: Fault,
}

/// Counters and state of the simulated device, for assertions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimSnapshot {
    /// COMMAND as the hardware holds it.
    pub command: u16,
    /// Whether the device asserts INTx (STATUS.INTERRUPT).
    pub asserting: bool,
    /// Interrupts raised and not yet acknowledged.
    pub pending: u64,
    /// Interrupts raised in all.
    pub raised: u64,
    /// Interrupts acknowledged in all.
    pub acked: u64,
    /// Resets performed.
    pub resets: u64,
    /// Host interrupts signalled on the trigger eventfd.
    pub host_signals: u64,
    /// Whether the device is inside a reset window.
    pub in_reset: bool,
    /// FLRs the device performed because a config write initiating one
    /// reached it (counted in `resets` too).
    pub device_flrs: u64,
}

struct State {
    config: [u8; PCI_CFG_SPACE_SIZE as usize],
    pending: u64,
    raised: u64,
    acked: u64,
    resets: u64,
    host_signals: u64,
    in_reset: bool,
    /// The function does not answer config reads until its next reset.
    wedged: bool,
    device_flrs: u64,
    line_out: bool,
    trigger: Option<EventFd>,
    calls: [u64; SimOp::ALL.len()],
    faults: Vec<FaultRule>,
    /// vfio-pci model: the user's virtual INTX_DISABLE (`virq_disabled`).
    virq_disabled: bool,
    /// vfio-pci model: the driver's mask bookkeeping (`ctx->masked`).
    vfio_masked: bool,
    /// vfio-pci model: the unmask eventfd's servicing thread.
    virqfd: Option<Virqfd>,
}

struct Inner {
    bdf: Bdf,
    broken_masking: bool,
    trigger_claims: bool,
    has_reset: bool,
    reset_window: Duration,
    kernel: SimKernel,
    advanced_features: bool,
    bus: Option<SimBus>,
    state: Mutex<State>,
    /// Signalled when a reset window ends (vfio-pci model: user config
    /// accesses wait for it).
    reset_done: Condvar,
}

/// Builds a [`SimDevice`].
#[derive(Debug, Clone)]
pub struct SimDeviceBuilder {
    bdf: Bdf,
    vendor: u16,
    device: u16,
    pin: u8,
    broken_masking: bool,
    has_reset: bool,
    reset_window: Duration,
    kernel: SimKernel,
    advanced_features: bool,
    bus: Option<SimBus>,
    trigger_claims: bool,
}

/// A bus several simulated devices sit on: a secondary bus reset
/// ([`SimBackend::hot_reset`]) through any of them resets them all. Cheap to
/// clone; clones are the same bus.
#[derive(Clone, Default)]
pub struct SimBus {
    devices: Arc<Mutex<Vec<std::sync::Weak<Inner>>>>,
}

impl std::fmt::Debug for SimBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimBus").finish_non_exhaustive()
    }
}

impl SimBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    fn members(&self) -> Vec<Arc<Inner>> {
        self.devices
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .collect()
    }
}

impl SimDeviceBuilder {
    /// The host kernel driver to model (default [`SimKernel::Bare`]).
    pub fn kernel(mut self, kernel: SimKernel) -> Self {
        self.kernel = kernel;
        self
    }
    /// The device's address (default `0000:00:04.0`).
    pub fn bdf(mut self, bdf: Bdf) -> Self {
        self.bdf = bdf;
        self
    }
    /// Vendor and device ID (default QEMU's edu, 1234:11e8).
    pub fn ids(mut self, vendor: u16, device: u16) -> Self {
        self.vendor = vendor;
        self.device = device;
        self
    }
    /// INTERRUPT_PIN (default 1 = INTA#; 0 = no INTx).
    pub fn interrupt_pin(mut self, pin: u8) -> Self {
        self.pin = pin;
        self
    }
    /// vfio-pci model: let the engine take the model's trigger signals as
    /// claims ([`Capabilities::trigger_claims`]), as it does on real
    /// vfio-pci (default no, so that tests may signal the trigger
    /// themselves to stand for an event of another device).
    pub fn trigger_claims(mut self, claims: bool) -> Self {
        self.trigger_claims = claims;
        self
    }
    /// Makes INTX_DISABLE not stick, as on devices with broken masking.
    pub fn broken_masking(mut self, broken: bool) -> Self {
        self.broken_masking = broken;
        self
    }
    /// Whether the device has a reset method (default yes; a device without
    /// one answers resets with [`BackendError::NoResetMethod`]).
    pub fn reset_method(mut self, has_reset: bool) -> Self {
        self.has_reset = has_reset;
        self
    }
    /// How long a reset keeps the device unresponsive (default 50 us).
    pub fn reset_window(mut self, window: Duration) -> Self {
        self.reset_window = window;
        self
    }
    /// Adds an Advanced Features capability (at [`SIM_AF_CAP`]) that
    /// advertises FLR, as conventional PCI devices do (default none).
    pub fn advanced_features(mut self, af: bool) -> Self {
        self.advanced_features = af;
        self
    }
    /// Puts the device on `bus` (default: alone on its own).
    pub fn bus(mut self, bus: &SimBus) -> Self {
        self.bus = Some(bus.clone());
        self
    }

    /// Creates the device, out of reset, INTx unmasked and idle.
    pub fn build(self) -> SimDevice {
        let mut config = [0u8; PCI_CFG_SPACE_SIZE as usize];
        put(&mut config, PCI_VENDOR_ID, Width::Word, self.vendor.into());
        put(&mut config, PCI_DEVICE_ID, Width::Word, self.device.into());
        put(&mut config, PCI_REVISION_ID, Width::Byte, 0x10);
        // Class 00ff00: unclassified device, as edu reports.
        put(&mut config, PCI_CLASS_PROG, Width::Byte, 0x00);
        put(&mut config, PCI_CLASS_PROG + 1, Width::Word, 0x00ff);
        put(&mut config, PCI_INTERRUPT_PIN, Width::Byte, self.pin.into());
        put(
            &mut config,
            PCI_CAPABILITY_LIST,
            Width::Byte,
            SIM_PCIE_CAP.into(),
        );
        put(
            &mut config,
            SIM_PCIE_CAP,
            Width::Byte,
            PCI_CAP_ID_EXP.into(),
        );
        put(
            &mut config,
            SIM_PCIE_CAP + PCI_CAP_LIST_NEXT,
            Width::Byte,
            0,
        );
        // PCIe capability version 2, endpoint.
        put(&mut config, SIM_PCIE_CAP + 2, Width::Word, 0x0002);
        let devcap = if self.has_reset {
            PCI_EXP_DEVCAP_FLR
        } else {
            0
        };
        put(
            &mut config,
            SIM_PCIE_CAP + PCI_EXP_DEVCAP,
            Width::Dword,
            devcap,
        );
        if self.advanced_features {
            put(
                &mut config,
                SIM_PCIE_CAP + PCI_CAP_LIST_NEXT,
                Width::Byte,
                SIM_AF_CAP.into(),
            );
            put(&mut config, SIM_AF_CAP, Width::Byte, PCI_CAP_ID_AF.into());
            put(&mut config, SIM_AF_CAP + PCI_AF_LENGTH, Width::Byte, 6);
            let af_cap = if self.has_reset {
                PCI_AF_CAP_TP | PCI_AF_CAP_FLR
            } else {
                0
            };
            put(
                &mut config,
                SIM_AF_CAP + PCI_AF_CAP,
                Width::Byte,
                af_cap.into(),
            );
        }
        let inner = Arc::new(Inner {
            bdf: self.bdf,
            broken_masking: self.broken_masking,
            trigger_claims: self.trigger_claims,
            has_reset: self.has_reset,
            reset_window: self.reset_window,
            kernel: self.kernel,
            advanced_features: self.advanced_features,
            bus: self.bus.clone(),
            reset_done: Condvar::new(),
            state: Mutex::new(State {
                config,
                pending: 0,
                raised: 0,
                acked: 0,
                resets: 0,
                host_signals: 0,
                in_reset: false,
                wedged: false,
                device_flrs: 0,
                line_out: false,
                trigger: None,
                calls: [0; SimOp::ALL.len()],
                faults: Vec::new(),
                virq_disabled: false,
                vfio_masked: false,
                virqfd: None,
            }),
        });
        if let Some(bus) = &self.bus {
            bus.devices
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(Arc::downgrade(&inner));
        }
        SimDevice { inner }
    }
}

fn put(config: &mut [u8], offset: u16, width: Width, value: u32) {
    let start = usize::from(offset);
    let bytes = value.to_le_bytes();
    let len = usize::from(width.bytes());
    config[start..start + len].copy_from_slice(&bytes[..len]);
}

fn get(config: &[u8], offset: u16, width: Width) -> u32 {
    let start = usize::from(offset);
    let mut bytes = [0u8; 4];
    let len = usize::from(width.bytes());
    bytes[..len].copy_from_slice(&config[start..start + len]);
    u32::from_le_bytes(bytes)
}

/// The simulated device, as the hardware side sees it: the guest driver's
/// BAR accesses ([`raise`](Self::raise) stands for the device deciding to
/// interrupt, [`ack`](Self::ack) for the driver acknowledging one) and the
/// test's view of the registers. Cheap to clone; clones are the same device.
#[derive(Clone)]
pub struct SimDevice {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SimDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimDevice")
            .field("bdf", &self.inner.bdf)
            .field("state", &self.snapshot())
            .finish()
    }
}

impl SimDevice {
    /// A builder with the defaults: edu IDs, INTA#, working masking, a reset
    /// method with a 50 us window.
    pub fn builder() -> SimDeviceBuilder {
        SimDeviceBuilder {
            // 00:04.0 is a valid address by construction.
            bdf: Bdf::new(0, 0, 4, 0).unwrap_or_else(|_| unreachable!()),
            vendor: SIM_VENDOR_ID,
            device: SIM_DEVICE_ID,
            pin: 1,
            broken_masking: false,
            has_reset: true,
            reset_window: Duration::from_micros(50),
            kernel: SimKernel::Bare,
            advanced_features: false,
            bus: None,
            trigger_claims: false,
        }
    }

    /// A backend for the engine (the "driver" side).
    pub fn backend(&self) -> SimBackend {
        SimBackend {
            inner: Arc::clone(&self.inner),
        }
    }

    /// The device's address.
    pub fn bdf(&self) -> Bdf {
        self.inner.bdf
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.lock()
    }

    /// The device raises one interrupt (its pending count goes up).
    pub fn raise(&self) {
        let mut s = self.state();
        s.pending += 1;
        s.raised += 1;
        self.inner.update_line(&mut s);
    }

    /// The driver acknowledges one interrupt. Returns `false` if none was
    /// pending (or the device is in reset and does not decode).
    pub fn ack(&self) -> bool {
        let mut s = self.state();
        if s.pending == 0 || s.in_reset {
            return false;
        }
        s.pending -= 1;
        s.acked += 1;
        self.inner.update_line(&mut s);
        true
    }

    /// The registers and counters right now.
    pub fn snapshot(&self) -> SimSnapshot {
        let s = self.state();
        SimSnapshot {
            command: self.inner.command(&s),
            asserting: self.inner.level(&s),
            pending: s.pending,
            raised: s.raised,
            acked: s.acked,
            resets: s.resets,
            host_signals: s.host_signals,
            in_reset: s.in_reset,
            device_flrs: s.device_flrs,
        }
    }

    /// Makes the next `times` calls of `op`, after `skip` successful ones,
    /// fail with `fault`. `times = u64::MAX` fails forever.
    pub fn inject_fault(&self, op: SimOp, fault: Fault, skip: u64, times: u64) {
        let mut s = self.state();
        let skip = s.calls[op.index()] + skip;
        s.faults.push(FaultRule {
            op,
            skip,
            times,
            fault,
        });
    }

    /// Removes every injected fault.
    pub fn clear_faults(&self) {
        self.state().faults.clear();
    }

    /// A reset the engine does not know about: an administrator writing the
    /// device's sysfs `reset` (the kernel saves and restores config state
    /// around it), bypassing the gate, exactly as in the 2011 reproducer.
    /// Blocks for the reset window. A device without a reset method answers
    /// [`BackendError::NoResetMethod`].
    /// Waits for a reset in progress to end first, as the kernel's device
    /// lock makes it.
    pub fn external_reset(&self) -> Result<(), BackendError> {
        self.inner.reset(true, true)
    }

    /// The function wedges: config reads return all-ones (and operations
    /// that read config fail as not responding) until its next reset, which
    /// is how such a function is recovered.
    pub fn wedge(&self) {
        self.state().wedged = true;
    }

    /// How many times `op` was called.
    pub fn calls(&self, op: SimOp) -> u64 {
        self.state().calls[op.index()]
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The device's INTx level: pending work, and not held in reset.
    fn level(&self, s: &State) -> bool {
        s.pending > 0 && !s.in_reset
    }

    fn command(&self, s: &State) -> u16 {
        // A word read of the config array is at most 16 bits.
        (get(&s.config, PCI_COMMAND, Width::Word) & 0xffff) as u16
    }

    fn masked(&self, s: &State) -> bool {
        !self.broken_masking && self.command(s) & COMMAND_INTX_DISABLE != 0
    }

    /// Recomputes the gated line and signals the host on a rising edge.
    fn update_line(&self, s: &mut State) {
        let out = self.level(s) && !self.masked(s);
        if out && !s.line_out && self.kernel == SimKernel::VfioPci {
            // vfio_intx_handler: check-and-mask unless already masked, then
            // signal the user unless it disabled INTx virtually.
            s.line_out = false;
            if s.trigger.is_some() && !s.vfio_masked {
                self.set_physical_intx_disable(s, true);
                s.vfio_masked = true;
                self.signal_user(s);
            }
            return;
        }
        if out && !s.line_out {
            if let Some(trigger) = &s.trigger {
                // Overflow of the eventfd counter is the only failure; the
                // host is then due to run anyway.
                let _ = trigger.write(1);
                s.host_signals += 1;
            }
        }
        s.line_out = out;
    }

    fn set_physical_intx_disable(&self, s: &mut State, disable: bool) {
        let command = self.command(s);
        let command = if disable {
            command | COMMAND_INTX_DISABLE
        } else {
            command & !COMMAND_INTX_DISABLE
        };
        put(&mut s.config, PCI_COMMAND, Width::Word, command.into());
    }

    /// vfio_send_intx_eventfd.
    fn signal_user(&self, s: &mut State) {
        if s.virq_disabled {
            return;
        }
        if let Some(trigger) = &s.trigger {
            let _ = trigger.write(1);
            s.host_signals += 1;
        }
    }

    /// vfio-pci model: `vfio_pci_intx_mask`.
    fn vfio_mask(&self, s: &mut State) {
        if !s.vfio_masked {
            self.set_physical_intx_disable(s, true);
            s.vfio_masked = true;
        }
        self.update_line(s);
    }

    /// vfio-pci model: `vfio_pci_intx_unmask_handler`, run by ACTION_UNMASK
    /// and by the unmask eventfd. Kernel-internal config accesses do not
    /// wait for a reset: during one they see the device's reset state.
    fn vfio_unmask(&self, s: &mut State) {
        if s.vfio_masked && !s.virq_disabled {
            if self.level(s) {
                // Still asserting: stay masked, re-send the interrupt.
                self.signal_user(s);
            } else {
                self.set_physical_intx_disable(s, false);
                s.vfio_masked = false;
            }
        }
        self.update_line(s);
    }

    /// vfio-pci model: user config accesses sleep while the device is in
    /// reset.
    fn wait_out_of_reset<'a>(&self, mut s: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        if self.kernel == SimKernel::VfioPci {
            while s.in_reset {
                s = self
                    .reset_done
                    .wait(s)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        }
        s
    }

    /// Counts a call of `op` and returns the fault to apply to it, if any.
    fn fault(&self, s: &mut State, op: SimOp) -> Option<Fault> {
        let call = s.calls[op.index()];
        s.calls[op.index()] += 1;
        s.faults
            .iter()
            .find(|r| r.op == op && call >= r.skip && call - r.skip < r.times)
            .map(|r| r.fault)
    }

    fn read(&self, s: &mut State, offset: u16, width: Width) -> Result<u32, BackendError> {
        check_access(offset, width, PCI_CFG_SPACE_SIZE)?;
        match self.fault(s, SimOp::ConfigRead) {
            Some(Fault::AllOnes) => return Ok(width.all_ones()),
            Some(f) => return Err(f.error("config read")),
            None => {}
        }
        if s.in_reset || s.wedged {
            return Ok(width.all_ones());
        }
        let mut config = s.config;
        let mut status = get(&config, PCI_STATUS, Width::Word) as u16;
        if self.level(s) {
            status |= STATUS_INTERRUPT;
        }
        status |= STATUS_CAP_LIST;
        put(&mut config, PCI_STATUS, Width::Word, status.into());
        Ok(get(&config, offset, width))
    }

    fn write(
        &self,
        s: &mut State,
        offset: u16,
        width: Width,
        value: u32,
    ) -> Result<(), BackendError> {
        check_write(offset, width, PCI_CFG_SPACE_SIZE, value)?;
        if let Some(f) = self.fault(s, SimOp::ConfigWrite) {
            return Err(f.error("config write"));
        }
        if s.in_reset {
            return Ok(());
        }
        let bytes = value.to_le_bytes();
        let mut flr = false;
        for (i, b) in bytes[..usize::from(width.bytes())].iter().enumerate() {
            // i < 4, so the offset stays within config space (checked above).
            flr |= self.write_byte(s, offset + i as u16, *b);
        }
        if flr {
            // The device resets itself; nobody saves or restores anything.
            // (Its window is not modelled: it ends before the write returns.)
            s.device_flrs += 1;
            self.clear_for_reset(s);
        }
        self.update_line(s);
        Ok(())
    }

    /// Applies one written byte according to the register's write mask.
    /// Returns whether the byte initiates an FLR the device supports.
    fn write_byte(&self, s: &mut State, offset: u16, value: u8) -> bool {
        let devctl_flr = (PCI_EXP_DEVCTL_BCR_FLR >> 8) as u8;
        let flr = self.has_reset
            && match offset {
                o if o == SIM_PCIE_CAP + PCI_EXP_DEVCTL + 1 => value & devctl_flr != 0,
                o if self.advanced_features && o == SIM_AF_CAP + PCI_AF_CTRL => {
                    value & PCI_AF_CTRL_FLR != 0
                }
                _ => false,
            };
        let mut mask: u8 = match offset {
            // COMMAND
            0x04 => (COMMAND_WRITABLE & 0xff) as u8,
            0x05 => (COMMAND_WRITABLE >> 8) as u8,
            // BAR0: 4 KiB 32-bit memory BAR, address bits only.
            0x10 => 0x00,
            0x11 => (!(BAR0_SIZE - 1) >> 8) as u8,
            0x12 | 0x13 => 0xff,
            // Cache line size, latency timer, interrupt line.
            0x0c | 0x0d | 0x3c => 0xff,
            // PCIe Device Control (low byte, high byte without FLR).
            o if o == SIM_PCIE_CAP + PCI_EXP_DEVCTL => 0xff,
            o if o == SIM_PCIE_CAP + PCI_EXP_DEVCTL + 1 => 0x7f,
            _ => 0x00,
        };
        if self.broken_masking && offset == PCI_COMMAND + 1 {
            mask &= !((COMMAND_INTX_DISABLE >> 8) as u8);
        }
        let i = usize::from(offset);
        s.config[i] = (s.config[i] & !mask) | (value & mask);
        flr
    }

    /// A function reset's effect on the registers: COMMAND, BARs and the
    /// writable header registers go back to their power-on values, and a
    /// wedged function answers again.
    fn clear_for_reset(&self, s: &mut State) {
        s.resets += 1;
        s.wedged = false;
        put(&mut s.config, PCI_COMMAND, Width::Word, 0);
        put(&mut s.config, PCI_CACHE_LINE_SIZE, Width::Word, 0);
        put(&mut s.config, PCI_INTERRUPT_LINE, Width::Byte, 0);
        for bar in 0..PCI_NUM_BARS {
            put(&mut s.config, PCI_BASE_ADDRESS_0 + 4 * bar, Width::Dword, 0);
        }
        put(&mut s.config, SIM_PCIE_CAP + PCI_EXP_DEVCTL, Width::Word, 0);
    }

    /// A function reset. `kernel_restores`: the kernel saves the config
    /// state before and restores it after, as vfio-pci's reset ioctl and the
    /// sysfs `reset` file do (`pci_reset_function`); otherwise the device
    /// comes out with its power-on values and its user restores. `wait`:
    /// wait for a reset in progress to end (`pci_reset_function`, the sysfs
    /// `reset` file) instead of answering EAGAIN (`pci_try_reset_function`,
    /// VFIO_DEVICE_RESET).
    fn reset(&self, kernel_restores: bool, wait: bool) -> Result<(), BackendError> {
        let saved = {
            let s = self.lock();
            let mut s = if wait { self.wait_for_reset(s) } else { s };
            self.enter_reset(&mut s, kernel_restores)?
        };
        thread::sleep(self.reset_window);
        self.leave_reset(saved);
        Ok(())
    }

    fn wait_for_reset<'a>(&self, mut s: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        while s.in_reset {
            s = self
                .reset_done
                .wait(s)
                .unwrap_or_else(PoisonError::into_inner);
        }
        s
    }

    /// Opens a reset window; returns the config state the kernel restores
    /// when it closes, if it does.
    fn enter_reset(
        &self,
        s: &mut State,
        kernel_restores: bool,
    ) -> Result<Option<[u8; PCI_CFG_SPACE_SIZE as usize]>, BackendError> {
        if let Some(f) = self.fault(s, SimOp::Reset) {
            return Err(f.error("reset"));
        }
        if !self.has_reset {
            return Err(BackendError::NoResetMethod);
        }
        if s.in_reset {
            // Another reset holds the device.
            return Err(BackendError::os(
                "reset",
                std::io::Error::from_raw_os_error(libc::EAGAIN),
            ));
        }
        s.in_reset = true;
        let saved = kernel_restores.then_some(s.config);
        self.clear_for_reset(s);
        self.update_line(s);
        Ok(saved)
    }

    fn leave_reset(&self, saved: Option<[u8; PCI_CFG_SPACE_SIZE as usize]>) {
        let mut s = self.lock();
        s.in_reset = false;
        if let Some(saved) = saved {
            // Physical DisINTx included; the driver's mask bookkeeping is
            // not touched.
            s.config = saved;
        }
        self.update_line(&mut s);
        self.reset_done.notify_all();
    }
}

/// The engine's side of the simulated device.
pub struct SimBackend {
    inner: Arc<Inner>,
}

impl SimBackend {
    /// A secondary bus reset (as VFIO_DEVICE_PCI_HOT_RESET does): every
    /// device on this one's [`SimBus`] is reset in the same window, each
    /// restored by the kernel as its own reset would be. EAGAIN, with
    /// nothing reset, while any of them is in another reset. Like
    /// [`reset`](PciBackend::reset), re-masks this device's INTx afterwards
    /// in the vfio-pci model; the other devices' drivers are not told.
    pub fn hot_reset(&mut self) -> Result<(), BackendError> {
        let mut devices = self
            .inner
            .bus
            .as_ref()
            .map(SimBus::members)
            .unwrap_or_default();
        if !devices.iter().any(|d| Arc::ptr_eq(d, &self.inner)) {
            devices.push(Arc::clone(&self.inner));
        }
        if devices.iter().any(|d| d.lock().in_reset) {
            // Another reset holds one of them; nothing is reset.
            return Err(BackendError::os(
                "hot reset",
                std::io::Error::from_raw_os_error(libc::EAGAIN),
            ));
        }
        let mut saved = Vec::with_capacity(devices.len());
        for device in &devices {
            let entered = {
                let mut s = device.lock();
                device.enter_reset(&mut s, device.kernel == SimKernel::VfioPci)
            };
            match entered {
                Ok(state) => saved.push((device, state)),
                Err(e) => {
                    for (device, state) in saved {
                        device.leave_reset(state);
                    }
                    return Err(e);
                }
            }
        }
        let window = devices.iter().map(|d| d.reset_window).max();
        thread::sleep(window.unwrap_or_default());
        for (device, state) in saved {
            device.leave_reset(state);
        }
        if self.inner.kernel == SimKernel::VfioPci {
            let mut s = self.inner.lock();
            self.inner.vfio_mask(&mut s);
        }
        Ok(())
    }

    fn op(&self, op: SimOp, name: &'static str) -> Result<(), BackendError> {
        let mut s = self.inner.lock();
        match self.inner.fault(&mut s, op) {
            Some(f) => Err(f.error(name)),
            None => Ok(()),
        }
    }
}

impl ConfigSpace for SimBackend {
    fn bdf(&self) -> Bdf {
        self.inner.bdf
    }

    fn config_size(&self) -> u16 {
        PCI_CFG_SPACE_SIZE
    }

    fn config_read(&mut self, offset: u16, width: Width) -> Result<u32, BackendError> {
        let mut s = self.inner.wait_out_of_reset(self.inner.lock());
        let value = self.inner.read(&mut s, offset, width)?;
        Ok(match self.inner.kernel {
            SimKernel::Bare => value,
            // vfio-pci shows the user's virtual INTX_DISABLE.
            SimKernel::VfioPci => with_intx_disable(offset, width, value, s.virq_disabled),
        })
    }

    fn config_write(&mut self, offset: u16, width: Width, value: u32) -> Result<(), BackendError> {
        let mut s = self.inner.wait_out_of_reset(self.inner.lock());
        match self.inner.kernel {
            SimKernel::Bare => self.inner.write(&mut s, offset, width, value),
            SimKernel::VfioPci => {
                // The physical bit is the driver's; the written one is the
                // user's virtual disable (vfio_basic_config_write).
                let physical = self.inner.command(&s) & COMMAND_INTX_DISABLE != 0;
                let virt = intx_disable_mask(offset, width).map(|mask| value & mask != 0);
                self.inner.write(
                    &mut s,
                    offset,
                    width,
                    with_intx_disable(offset, width, value, physical),
                )?;
                match virt {
                    Some(true) if !s.virq_disabled => {
                        s.virq_disabled = true;
                        self.inner.vfio_mask(&mut s);
                    }
                    Some(false) if s.virq_disabled => {
                        s.virq_disabled = false;
                        self.inner.vfio_unmask(&mut s);
                    }
                    _ => {}
                }
                Ok(())
            }
        }
    }
}

impl PciBackend for SimBackend {
    /// As the modelled kernel's ([`SimKernel::intx_disable_bit`],
    /// [`SimKernel::unmask_eventfd`]); trigger claims as built
    /// ([`SimDeviceBuilder::trigger_claims`]), where only the vfio-pci model
    /// signals the way that makes them true.
    fn capabilities(&self) -> Capabilities {
        let kernel = self.inner.kernel;
        Capabilities::new(
            kernel.intx_disable_bit(),
            kernel.unmask_eventfd(),
            self.inner.trigger_claims && kernel == SimKernel::VfioPci,
        )
    }

    fn intx_enable(&mut self, trigger: &EventFd) -> Result<(), BackendError> {
        self.op(SimOp::IntxEnable, "INTx enable")?;
        let trigger = trigger
            .try_clone()
            .map_err(|e| BackendError::os("eventfd dup", e))?;
        let mut s = self.inner.lock();
        s.trigger = Some(trigger);
        if self.inner.kernel == SimKernel::VfioPci {
            // vfio_intx_enable: masked iff virtually disabled.
            s.vfio_masked = s.virq_disabled;
            let masked = s.vfio_masked;
            self.inner.set_physical_intx_disable(&mut s, masked);
        }
        // A line already high is an interrupt the new handler must see.
        s.line_out = false;
        self.inner.update_line(&mut s);
        Ok(())
    }

    fn intx_disable(&mut self) -> Result<(), BackendError> {
        self.op(SimOp::IntxDisable, "INTx disable")?;
        let virqfd = {
            let mut s = self.inner.lock();
            s.trigger = None;
            self.inner.set_physical_intx_disable(&mut s, true);
            s.vfio_masked = true;
            self.inner.update_line(&mut s);
            s.virqfd.take()
        };
        // Stopped outside the state lock: its thread takes that lock.
        drop(virqfd);
        Ok(())
    }

    fn intx_check_and_mask(&mut self) -> Result<bool, BackendError> {
        self.op(SimOp::CheckAndMask, "INTx check-and-mask")?;
        match self.inner.kernel {
            SimKernel::Bare => intx::check_and_mask(self),
            SimKernel::VfioPci => {
                // The kernel masked before signalling; if the device no
                // longer asserts, undo that through ACTION_UNMASK.
                if intx::read_command_status(self)?.asserting() {
                    Ok(true)
                } else {
                    let mut s = self.inner.lock();
                    self.inner.vfio_unmask(&mut s);
                    Ok(false)
                }
            }
        }
    }

    fn intx_check_and_unmask(&mut self) -> Result<Unmask, BackendError> {
        self.op(SimOp::CheckAndUnmask, "INTx check-and-unmask")?;
        match self.inner.kernel {
            SimKernel::Bare => Ok(if intx::check_and_unmask(self)? {
                Unmask::Unmasked
            } else {
                Unmask::StillAsserting
            }),
            SimKernel::VfioPci => {
                let mut s = self.inner.lock();
                self.inner.vfio_unmask(&mut s);
                Ok(Unmask::Delegated)
            }
        }
    }

    fn intx_mask(&mut self) -> Result<(), BackendError> {
        self.op(SimOp::Mask, "INTx mask")?;
        match self.inner.kernel {
            SimKernel::Bare => intx::set_intx_disable(self, true),
            SimKernel::VfioPci => {
                let mut s = self.inner.lock();
                self.inner.vfio_mask(&mut s);
                Ok(())
            }
        }
    }

    /// The model's COMMAND.INTX_DISABLE: in the vfio-pci model through
    /// sysfs config, which waits while the device is in reset; the bare
    /// device answers all-ones during a reset.
    fn read_physical_intx_disable(&mut self) -> Result<bool, BackendError> {
        let s = self.inner.wait_out_of_reset(self.inner.lock());
        if s.in_reset {
            return Err(BackendError::NotResponding);
        }
        Ok(self.inner.command(&s) & COMMAND_INTX_DISABLE != 0)
    }

    /// The host interrupts the model signalled (its kernel handler's runs).
    fn host_interrupt_count(&mut self) -> Result<Option<u64>, BackendError> {
        Ok(Some(self.inner.lock().host_signals))
    }

    fn intx_set_unmask_eventfd(&mut self, fd: Option<&EventFd>) -> Result<(), BackendError> {
        if !self.inner.kernel.unmask_eventfd() {
            return Err(BackendError::os(
                "registering an unmask eventfd",
                std::io::Error::from(std::io::ErrorKind::Unsupported),
            ));
        }
        let Some(fd) = fd else {
            // fd -1: vfio_virqfd_disable. Stopped outside the state lock:
            // its thread takes that lock.
            let old = self.inner.lock().virqfd.take();
            drop(old);
            return Ok(());
        };
        // vfio_virqfd_enable: one unmask eventfd per device; a second one is
        // refused until the first is removed.
        if self.inner.lock().virqfd.is_some() {
            return Err(BackendError::os(
                "registering an unmask eventfd",
                std::io::Error::from_raw_os_error(libc::EBUSY),
            ));
        }
        let virqfd = Virqfd::start(Arc::clone(&self.inner), fd)
            .map_err(|e| BackendError::os("starting the unmask eventfd thread", e))?;
        self.inner.lock().virqfd = Some(virqfd);
        Ok(())
    }

    fn reset(&mut self) -> Result<(), BackendError> {
        self.inner
            .reset(self.inner.kernel == SimKernel::VfioPci, false)?;
        if self.inner.kernel == SimKernel::VfioPci {
            // As the VFIO backend does: bring the driver's mask bookkeeping
            // in line with the hardware the reset restored.
            let mut s = self.inner.lock();
            self.inner.vfio_mask(&mut s);
        }
        Ok(())
    }
}

impl Drop for SimBackend {
    fn drop(&mut self) {
        // The unmask eventfd's thread holds the device; stop it with the
        // backend that started it (outside the state lock it takes).
        let virqfd = self.inner.lock().virqfd.take();
        drop(virqfd);
    }
}

/// vfio-pci model: the thread behind an unmask eventfd (the kernel's
/// virqfd), running the unmask handler each time the eventfd is signalled.
struct Virqfd {
    stop: EventFd,
    thread: Option<thread::JoinHandle<()>>,
}

impl Virqfd {
    fn start(inner: Arc<Inner>, fd: &EventFd) -> std::io::Result<Self> {
        use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
        let fd = fd.try_clone()?;
        let stop = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK)?;
        let stop_rx = stop.try_clone()?;
        let epoll = Epoll::new()?;
        for (f, token) in [(&fd, 0), (&stop_rx, 1)] {
            epoll.ctl(
                ControlOperation::Add,
                std::os::fd::AsRawFd::as_raw_fd(f),
                EpollEvent::new(EventSet::IN, token),
            )?;
        }
        let thread = thread::Builder::new()
            .name("sim-virqfd".into())
            .spawn(move || {
                let mut events = [EpollEvent::default(); 2];
                loop {
                    let n = match epoll.wait(-1, &mut events) {
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(_) => return,
                    };
                    for event in &events[..n] {
                        if event.data() == 1 {
                            return;
                        }
                        if fd.read().is_ok() {
                            let mut s = inner.lock();
                            inner.vfio_unmask(&mut s);
                        }
                    }
                }
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Virqfd {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
