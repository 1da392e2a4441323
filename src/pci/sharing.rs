//! Who shares a device's host INTx line, and whether sharing it is safe.
//!
//! A device on an INTx line that another device also uses needs every
//! device on the line to mask with PCI 2.3 INTX_DISABLE: the kernel's
//! shared handlers (vfio-pci's and uio_pci_generic's check-and-mask) ask
//! each device whether it raised the line, and a device that cannot mask
//! keeps the line asserted ("irq N: nobody cared"). vfio-pci refuses to
//! share a line for a device without masking ("genirq: Flags mismatch").
//!
//! [`line_sharing`] reports the line from sysfs and `/proc/interrupts`
//! (both injectable through [`PciSysfs`]): the IRQ number, every other PCI
//! device whose sysfs `irq` is the same with its driver and its read-only
//! masking verdict (nothing is toggled under a bound device), the handler
//! names `/proc/interrupts` lists, and a [`ShareVerdict`].
//!
//! The IRQ number reported is the sysfs `irq`. Until a driver enables the
//! device (its sysfs `enable` count is 0) that is the firmware's
//! INTERRUPT_LINE, and enabling can route the device to another line (in
//! the test guest two vfio edus show IRQ 10 until vfio-pci opens them, then
//! 20 and 21): the verdict is then [`ShareVerdict::Unknown`] and the
//! sharers listed are those on the firmware's number.

use std::fmt;
use std::fs;
use std::io;

use crate::pci::sysfs::{PciSysfs, SysfsError};
use crate::pci::Bdf;

/// Another PCI device on the line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sharer {
    /// The device.
    pub bdf: Bdf,
    /// Its driver.
    pub driver: Option<String>,
    /// Its read-only masking verdict; `None` when it could not be read.
    pub masking: Option<bool>,
}

impl Sharer {
    fn driver_name(&self) -> &str {
        self.driver.as_deref().unwrap_or("no driver")
    }
}

/// Which IRQ number is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrqSource {
    /// The device is enabled: sysfs `irq` is the line its handlers use.
    Routed,
    /// The device is not enabled (or its `enable` attribute is missing):
    /// sysfs `irq` is the firmware's INTERRUPT_LINE (or, after a vfio-pci
    /// user closed the device, the line it was last routed to), which
    /// enabling may change.
    Firmware,
}

impl IrqSource {
    /// A short name for JSON: `routed` or `firmware`.
    pub fn name(self) -> &'static str {
        match self {
            IrqSource::Routed => "routed",
            IrqSource::Firmware => "firmware",
        }
    }
}

/// Whether the line can be shared as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShareVerdict {
    /// The device has no INTx (no IRQ).
    NoIrq,
    /// No other PCI device is on the line.
    Alone,
    /// Every other device on the line masks with PCI 2.3.
    SharedSafe,
    /// At least one other device on the line cannot mask (or its masking
    /// could not be read).
    SharedUnsafe,
    /// The line is only known once the device is enabled.
    Unknown,
}

impl ShareVerdict {
    /// A short name for JSON: `no-irq`, `alone`, `shared-safe`,
    /// `shared-unsafe` or `unknown`.
    pub fn name(self) -> &'static str {
        match self {
            ShareVerdict::NoIrq => "no-irq",
            ShareVerdict::Alone => "alone",
            ShareVerdict::SharedSafe => "shared-safe",
            ShareVerdict::SharedUnsafe => "shared-unsafe",
            ShareVerdict::Unknown => "unknown",
        }
    }
}

/// A device's host INTx line and who shares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineSharing {
    /// The device.
    pub bdf: Bdf,
    /// The sysfs `irq`; `None` when the device has none.
    pub irq: Option<u32>,
    /// Whether `irq` is the routed line or the firmware's number.
    pub source: IrqSource,
    /// Every other PCI device with the same `irq`.
    pub sharers: Vec<Sharer>,
    /// The handler names `/proc/interrupts` lists for `irq`.
    pub handlers: Vec<String>,
    /// The verdict.
    pub verdict: ShareVerdict,
}

impl LineSharing {
    /// The sharers that make sharing unsafe: no masking, or unreadable.
    pub fn unsafe_sharers(&self) -> impl Iterator<Item = &Sharer> {
        self.sharers.iter().filter(|s| s.masking != Some(true))
    }

    /// What a person can do about it, for [`ShareVerdict::SharedUnsafe`]
    /// and [`ShareVerdict::Unknown`]; empty otherwise.
    pub fn advice(&self) -> String {
        match self.verdict {
            ShareVerdict::SharedUnsafe => {
                let names: Vec<String> = self
                    .unsafe_sharers()
                    .map(|s| {
                        let why = if s.masking.is_none() {
                            "masking unknown"
                        } else {
                            "no PCI 2.3 masking"
                        };
                        format!("{} ({}, {why})", s.bdf, s.driver_name())
                    })
                    .collect();
                format!(
                    "{} cannot share the line: move {} to a slot on another line, give the \
                     sharer its own line (vfio-pci nointxmask=1 for a vfio-pci sharer makes \
                     vfio-pci demand an exclusive line), or use MSI",
                    names.join(", "),
                    self.bdf
                )
            }
            ShareVerdict::Unknown => format!(
                "{} is not enabled: the real line is known once a driver enables it \
                 (vfio-pci: while a user has it open); probe again then",
                self.bdf
            ),
            _ => String::new(),
        }
    }
}

impl fmt::Display for LineSharing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(irq) = self.irq else {
            return write!(f, "no host IRQ (no INTx line)");
        };
        match self.source {
            IrqSource::Routed => write!(f, "host IRQ {irq}: {}", self.verdict.name())?,
            // After a vfio-pci user closes the device, sysfs keeps the line
            // it was routed to; before the first enable it is the firmware's.
            IrqSource::Firmware => write!(
                f,
                "IRQ {irq} (device not enabled: the firmware's or its last routing): {}",
                self.verdict.name()
            )?,
        }
        if !self.sharers.is_empty() {
            let list: Vec<String> = self
                .sharers
                .iter()
                .map(|s| {
                    let masking = match s.masking {
                        Some(true) => "masks",
                        Some(false) => "no masking",
                        None => "masking unknown",
                    };
                    format!("{} ({}, {masking})", s.bdf, s.driver_name())
                })
                .collect();
            write!(f, "; shared with {}", list.join(", "))?;
        }
        if self.handlers.is_empty() {
            write!(f, "; no handler registered")?;
        } else {
            write!(f, "; handlers: {}", self.handlers.join(", "))?;
        }
        let advice = self.advice();
        if !advice.is_empty() {
            write!(f, "; {advice}")?;
        }
        Ok(())
    }
}

/// Whether the device is enabled (sysfs `enable` is not 0). A missing
/// attribute counts as not enabled: the IRQ cannot be trusted then.
fn enabled(sysfs: &PciSysfs, bdf: Bdf) -> Result<bool, SysfsError> {
    let path = sysfs.device_dir(bdf).join("enable");
    match fs::read_to_string(&path) {
        Ok(text) => Ok(text.trim().parse::<u32>().is_ok_and(|n| n > 0)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(SysfsError::Io {
            bdf,
            op: "reading whether the device is enabled",
            path,
            source,
        }),
    }
}

/// Reports `bdf`'s line: see the [module documentation](self).
pub fn line_sharing(sysfs: &PciSysfs, bdf: Bdf) -> Result<LineSharing, SysfsError> {
    let source = if enabled(sysfs, bdf)? {
        IrqSource::Routed
    } else {
        IrqSource::Firmware
    };
    let Some(line) = sysfs.irq_line(bdf)? else {
        return Ok(LineSharing {
            bdf,
            irq: None,
            source,
            sharers: Vec::new(),
            handlers: Vec::new(),
            verdict: ShareVerdict::NoIrq,
        });
    };
    let sharers: Vec<Sharer> = line
        .shared_with
        .into_iter()
        .map(|d| Sharer {
            bdf: d.bdf,
            // Read-only: a sharer is someone else's device.
            masking: sysfs
                .masking_verdict_read_only(d.bdf)
                .ok()
                .map(|v| v.supported),
            driver: d.driver,
        })
        .collect();
    // vfio-pci enables a device only while a user has it open; any other
    // driver enables it at bind. An unbound device is not enabled.
    let verdict = if source == IrqSource::Firmware {
        ShareVerdict::Unknown
    } else if sharers.is_empty() {
        ShareVerdict::Alone
    } else if sharers.iter().all(|s| s.masking == Some(true)) {
        ShareVerdict::SharedSafe
    } else {
        ShareVerdict::SharedUnsafe
    };
    Ok(LineSharing {
        bdf,
        irq: Some(line.irq),
        source,
        sharers,
        handlers: line.handlers,
        verdict,
    })
}
