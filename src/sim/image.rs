//! The simulated device's state as one fixed-size image, so that a device
//! living in a daemon's memory can outlive the process (the daemon keeps
//! it in a memfd in systemd's fd store across its own restart): config
//! space, the pending-interrupt count and the counters — `raised` is the
//! total of interrupts the device ever raised, so a test can tell whether a
//! raise whose answer was lost took effect — and the vfio-pci model's mask
//! bookkeeping. The image is handed to the persistence after every change,
//! under the device's lock, so the last image written is always a state
//! the device was in.

use super::{SimDevice, State};
use crate::pci::regs::PCI_CFG_SPACE_SIZE;

const MAGIC: &[u8; 8] = b"VISIMG01";
const CONFIG: usize = PCI_CFG_SPACE_SIZE as usize;
const COUNTERS: usize = 6;
/// The image's size in bytes.
pub const IMAGE_SIZE: usize = MAGIC.len() + CONFIG + COUNTERS * 8 + 1;

/// Receives each new image.
pub(super) type Persist = Box<dyn Fn(&[u8]) + Send>;

/// Why an image could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimImageError {
    /// Not an image of this format (wrong size or magic).
    #[error("not a simulated device's state image ({len} bytes)")]
    Format {
        /// The size found.
        len: usize,
    },
}

fn encode(s: &State) -> [u8; IMAGE_SIZE] {
    let mut out = [0u8; IMAGE_SIZE];
    let mut at = 0;
    let mut put = |bytes: &[u8]| {
        out[at..at + bytes.len()].copy_from_slice(bytes);
        at += bytes.len();
    };
    put(MAGIC);
    put(&s.config);
    for v in [
        s.pending,
        s.raised,
        s.acked,
        s.resets,
        s.host_signals,
        s.device_flrs,
    ] {
        put(&v.to_le_bytes());
    }
    put(&[u8::from(s.wedged) | u8::from(s.virq_disabled) << 1 | u8::from(s.vfio_masked) << 2]);
    out
}

/// Hands the state to its persistence (not inside a reset window: the
/// config state then is the reset's, and the window's end writes again).
pub(super) fn persist(s: &State) {
    if s.in_reset {
        return;
    }
    if let Some(p) = &s.persist {
        p(&encode(s));
    }
}

impl SimDevice {
    /// The device's state image now.
    pub fn image(&self) -> Vec<u8> {
        encode(&self.state()).to_vec()
    }

    /// Hands every later state of the device to `sink` (one image after
    /// each change, under the device's lock: keep it short, e.g. one
    /// `pwrite` to a memfd), and the current one now.
    pub fn persist(&self, sink: impl Fn(&[u8]) + Send + 'static) {
        let mut s = self.state();
        sink(&encode(&s));
        s.persist = Some(Box::new(sink));
    }

    /// Puts the device in the state `image` describes (a device just
    /// built, with no trigger yet): config space, pending interrupts,
    /// counters, and the vfio-pci model's masks. The line is re-derived
    /// when the next driver enables INTx.
    pub fn load_image(&self, image: &[u8]) -> Result<(), SimImageError> {
        if image.len() != IMAGE_SIZE || !image.starts_with(MAGIC) {
            return Err(SimImageError::Format { len: image.len() });
        }
        let mut s = self.state();
        let mut at = MAGIC.len();
        s.config.copy_from_slice(&image[at..at + CONFIG]);
        at += CONFIG;
        let mut next = || {
            let mut b = [0u8; 8];
            b.copy_from_slice(&image[at..at + 8]);
            at += 8;
            u64::from_le_bytes(b)
        };
        s.pending = next();
        s.raised = next();
        s.acked = next();
        s.resets = next();
        s.host_signals = next();
        s.device_flrs = next();
        let flags = image[IMAGE_SIZE - 1];
        s.wedged = flags & 1 != 0;
        s.virq_disabled = flags & 2 != 0;
        s.vfio_masked = flags & 4 != 0;
        s.line_out = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use crate::backend::ConfigSpace;
    use crate::pci::regs::{COMMAND_INTX_DISABLE, PCI_COMMAND};
    use crate::pci::Width;
    use crate::sim::{SimDevice, SimKernel};

    #[test]
    fn a_device_rebuilt_from_its_last_image_is_the_same_device() {
        let dev = SimDevice::builder().kernel(SimKernel::VfioPci).build();
        let last = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&last);
        dev.persist(move |img| *sink.lock().unwrap_or_else(|e| e.into_inner()) = img.to_vec());
        let mut b = dev.backend();
        let ok = b.config_write(
            PCI_COMMAND,
            Width::Word,
            u32::from(COMMAND_INTX_DISABLE | 0x6),
        );
        assert!(ok.is_ok());
        dev.raise();
        dev.raise();
        assert!(dev.ack());
        let image = last.lock().unwrap_or_else(|e| e.into_inner()).clone();
        assert_eq!(image, dev.image());
        let again = SimDevice::builder().kernel(SimKernel::VfioPci).build();
        assert!(again.load_image(&image).is_ok());
        let (a, b) = (dev.snapshot(), again.snapshot());
        assert_eq!(
            (a.command, a.pending, a.raised, a.acked),
            (b.command, b.pending, b.raised, b.acked)
        );
        assert_eq!((b.pending, b.raised, b.acked), (1, 2, 1));
        let mut b2 = again.backend();
        // The virtual INTX_DISABLE the user wrote is still the user's.
        let cmd = b2.config_read(PCI_COMMAND, Width::Word).unwrap_or(0);
        assert_ne!(cmd & u32::from(COMMAND_INTX_DISABLE), 0);
        assert!(again.load_image(&image[1..]).is_err());
    }
}
