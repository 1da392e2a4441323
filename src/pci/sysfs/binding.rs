//! Binding a device to a driver and handing it back: `driver_override` +
//! `drivers_probe`, checked through the `driver` link ([`Binding`]).

use tracing::{debug, info, instrument, warn};

use crate::pci::Bdf;

use super::{refusal_reason, write_attr, PciSysfs, SysfsError};

/// A driver change made by [`PciSysfs::bind`], to be undone by
/// [`PciSysfs::unbind`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    bdf: Bdf,
    driver: String,
    previous: Option<String>,
    previous_override: Option<String>,
    changed: bool,
}

impl Binding {
    /// The device.
    pub fn bdf(&self) -> Bdf {
        self.bdf
    }
    /// The driver the device was bound to.
    pub fn driver(&self) -> &str {
        &self.driver
    }
    /// The driver the device had before, restored by [`PciSysfs::unbind`].
    pub fn previous(&self) -> Option<&str> {
        self.previous.as_deref()
    }
    /// Whether [`PciSysfs::bind`] changed anything (`false`: the device was
    /// already bound to the driver, and unbinding leaves it so).
    pub fn changed(&self) -> bool {
        self.changed
    }
    /// The `driver_override` the device had before, restored by
    /// [`PciSysfs::unbind`].
    pub fn previous_override(&self) -> Option<&str> {
        self.previous_override.as_deref()
    }

    /// A binding a previous process made and recorded (the daemon's
    /// as-found record after a crash): [`PciSysfs::unbind`] undoes it.
    #[cfg(feature = "daemon")]
    pub(crate) fn recorded(
        bdf: Bdf,
        driver: &str,
        previous: Option<String>,
        previous_override: Option<String>,
    ) -> Self {
        Self {
            bdf,
            driver: driver.to_owned(),
            previous,
            previous_override,
            changed: true,
        }
    }
}

impl PciSysfs {
    /// Binds the device to `driver` the kernel way: unbind the current
    /// driver, set `driver_override`, write the address to `drivers_probe`,
    /// and check the `driver` link. Already bound to `driver`: nothing
    /// changes. On failure the previous driver is put back (best effort) and
    /// the error says why the driver refused. Keep the returned [`Binding`]
    /// for [`unbind`](Self::unbind).
    #[instrument(skip_all, fields(bdf = %bdf, driver))]
    pub fn bind(&self, bdf: Bdf, driver: &str) -> Result<Binding, SysfsError> {
        self.existing_device_dir(bdf)?;
        let driver_dir = self.drivers_dir().join(driver);
        if !driver_dir.is_dir() {
            return Err(SysfsError::DriverMissing {
                bdf,
                driver: driver.to_owned(),
                path: driver_dir,
            });
        }
        let previous = self.driver(bdf)?;
        let previous_override = self.driver_override(bdf)?;
        let mut binding = Binding {
            bdf,
            driver: driver.to_owned(),
            previous,
            previous_override,
            changed: false,
        };
        if binding.previous.as_deref() == Some(driver) {
            debug!(driver, "already bound");
            return Ok(binding);
        }
        binding.changed = true;
        let bound = self
            .unbind_current(bdf)
            .and_then(|()| self.attach(bdf, driver));
        match bound {
            Ok(()) => {
                info!(driver, previous = ?binding.previous, "bound");
                Ok(binding)
            }
            Err(error) => {
                if let Err(e) = self.unbind(&binding) {
                    warn!(error = %crate::error_chain(&e), "restoring the previous driver failed");
                }
                Err(error)
            }
        }
    }

    /// Undoes a [`bind`](Self::bind): unbinds the device from the driver it
    /// was bound to, binds the previous driver again (if there was one) and
    /// restores `driver_override`. Does nothing when the bind changed
    /// nothing; refuses when someone else rebound the device meanwhile.
    #[instrument(skip_all, fields(bdf = %binding.bdf))]
    pub fn unbind(&self, binding: &Binding) -> Result<(), SysfsError> {
        if !binding.changed {
            return Ok(());
        }
        let bdf = binding.bdf;
        let now = self.driver(bdf)?;
        let reattach = match now.as_deref() {
            Some(d) if d == binding.driver => {
                self.unbind_current(bdf)?;
                true
            }
            // A failed bind can leave the device unbound.
            None => true,
            // Already back (e.g. a second unbind).
            Some(d) if Some(d) == binding.previous.as_deref() => false,
            Some(_) => {
                return Err(SysfsError::BindingChanged {
                    bdf,
                    expected: binding.driver.clone(),
                    now,
                })
            }
        };
        let attached = match (&binding.previous, reattach) {
            (Some(previous), true) => self.attach(bdf, previous),
            _ => Ok(()),
        };
        // Restore the override whatever happened; "\n" clears it.
        let path = self.device_dir(bdf).join("driver_override");
        let value = binding.previous_override.as_deref().unwrap_or("\n");
        let restored = write_attr(bdf, &path, value, "restoring driver_override");
        attached.and(restored)?;
        info!(
            driver = binding.previous.as_deref().unwrap_or("none"),
            "previous driver restored"
        );
        Ok(())
    }

    /// Unbinds the device from whatever driver it has and clears
    /// `driver_override`, leaving it unbound (the operator's `vfio-intx
    /// unbind`, where no [`Binding`] was kept). Returns the driver it had.
    #[instrument(skip_all, fields(bdf = %bdf))]
    pub fn unbind_device(&self, bdf: Bdf) -> Result<Option<String>, SysfsError> {
        let dir = self.existing_device_dir(bdf)?;
        let previous = self.driver(bdf)?;
        self.unbind_current(bdf)?;
        write_attr(
            bdf,
            &dir.join("driver_override"),
            "\n",
            "clearing driver_override",
        )?;
        info!(previous = previous.as_deref().unwrap_or("none"), "unbound");
        Ok(previous)
    }

    /// Unbinds the device from its current driver, if any.
    fn unbind_current(&self, bdf: Bdf) -> Result<(), SysfsError> {
        let dir = self.device_dir(bdf);
        if self.driver(bdf)?.is_some() {
            write_attr(
                bdf,
                &dir.join("driver/unbind"),
                &bdf.to_string(),
                "unbinding from the current driver",
            )?;
        }
        Ok(())
    }

    /// Binds an unbound device to `driver` through `driver_override` and
    /// `drivers_probe`, and checks that it took.
    fn attach(&self, bdf: Bdf, driver: &str) -> Result<(), SysfsError> {
        let dir = self.device_dir(bdf);
        write_attr(
            bdf,
            &dir.join("driver_override"),
            driver,
            "writing driver_override",
        )?;
        write_attr(
            bdf,
            &self.root.join("bus/pci/drivers_probe"),
            &bdf.to_string(),
            "probing drivers (drivers_probe)",
        )?;
        let now = self.driver(bdf)?;
        if now.as_deref() == Some(driver) {
            Ok(())
        } else {
            Err(SysfsError::Refused {
                bdf,
                driver: driver.to_owned(),
                now,
                reason: refusal_reason(driver),
            })
        }
    }
}
