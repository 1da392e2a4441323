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

mod backend;
mod builder;
mod faults;
mod image;
mod rig;
pub mod stress;

pub use backend::SimBackend;
use backend::Virqfd;
pub use builder::{SimBus, SimDeviceBuilder};
use faults::FaultRule;
pub use faults::{Fault, SimOp};
pub use image::{SimImageError, IMAGE_SIZE as SIM_IMAGE_SIZE};
pub use rig::{RigError, SimRig};

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use crate::backend::{BackendError, IntxDisableBit};
use crate::pci::regs::*;
use crate::pci::{check_access, check_write, Bdf, Width};

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
    /// Receives the device's state image after each change
    /// ([`SimDevice::persist`]).
    persist: Option<image::Persist>,
    /// Host signals decided and not sent yet: sent at the end of
    /// `update_line`, after the state is persisted.
    signals_due: u32,
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

    /// Recomputes the gated line and signals the host on a rising edge;
    /// then hands the state to its persistence, if any (every change of
    /// the device's state ends here).
    fn update_line(&self, s: &mut State) {
        self.update_line_only(s);
        image::persist(s);
        // The signals after the state that explains them: a process that
        // keeps the state across its own death (the daemon's memfd) never
        // finds a signal sent that its state does not show.
        if let Some(trigger) = &s.trigger {
            for _ in 0..std::mem::take(&mut s.signals_due) {
                // Overflow of the eventfd counter is the only failure; the
                // host is then due to run anyway.
                let _ = trigger.write(1);
            }
        }
        s.signals_due = 0;
    }

    fn update_line_only(&self, s: &mut State) {
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
        if out && !s.line_out && s.trigger.is_some() {
            s.signals_due += 1;
            s.host_signals += 1;
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
        if s.trigger.is_some() {
            s.signals_due += 1;
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
