//! Building simulated devices ([`SimDeviceBuilder`]) and the shared bus
//! that lets several of them share one INTx line ([`SimBus`]).

use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use crate::pci::regs::*;
use crate::pci::{Bdf, Width};

use super::{put, Inner, SimDevice, SimKernel, SimOp, State, SIM_AF_CAP, SIM_PCIE_CAP};

/// Builds a [`SimDevice`].
#[derive(Debug, Clone)]
pub struct SimDeviceBuilder {
    pub(super) bdf: Bdf,
    pub(super) vendor: u16,
    pub(super) device: u16,
    pub(super) pin: u8,
    pub(super) broken_masking: bool,
    pub(super) has_reset: bool,
    pub(super) reset_window: Duration,
    pub(super) kernel: SimKernel,
    pub(super) advanced_features: bool,
    pub(super) bus: Option<SimBus>,
    pub(super) trigger_claims: bool,
}

/// A bus several simulated devices sit on: a secondary bus reset
/// ([`SimBackend::hot_reset`](super::SimBackend::hot_reset)) through any of them resets them all. Cheap to
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

    pub(super) fn members(&self) -> Vec<Arc<Inner>> {
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
    /// claims ([`Capabilities::trigger_claims`](crate::backend::Capabilities::trigger_claims)), as it does on real
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
    /// one answers resets with [`BackendError::NoResetMethod`](crate::backend::BackendError::NoResetMethod)).
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
                persist: None,
                signals_due: 0,
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
