//! Host helpers (`pci::sysfs`) and the uio backend's sysfs side, against
//! fake sysfs trees in temporary directories.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tempfile::TempDir;
use vfio_intx::backend::{BackendError, ConfigSpace, PciBackend};
use vfio_intx::pci::intx::MaskingReason;
use vfio_intx::pci::regs::*;
use vfio_intx::pci::sharing::{line_sharing, IrqSource, ShareVerdict};
use vfio_intx::pci::sysfs::{
    interrupt_count, interrupt_handlers, PciSysfs, Source, SysfsConfig, SysfsError,
    UIO_PCI_GENERIC, VFIO_PCI,
};
use vfio_intx::pci::{Bdf, Width};
use vfio_intx::uio::{UioBackend, UioError};

fn bdf(s: &str) -> Bdf {
    s.parse().unwrap()
}

/// A fake host: `<tmp>/sys`, `<tmp>/proc_interrupts`, `<tmp>/dev`.
struct FakeHost {
    tmp: TempDir,
}

/// One fake PCI device.
struct FakeDevice<'a> {
    bdf: &'a str,
    ids: (u16, u16),
    irq: u32,
    pin: u8,
    driver: Option<&'a str>,
    group: Option<u32>,
    reset_method: Option<&'a str>,
}

impl Default for FakeDevice<'_> {
    fn default() -> Self {
        Self {
            bdf: "0000:01:00.0",
            ids: (0x1234, 0x11e8),
            irq: 10,
            pin: 1,
            driver: None,
            group: None,
            reset_method: None,
        }
    }
}

const DRIVERS: [&str; 5] = [VFIO_PCI, UIO_PCI_GENERIC, "pcieport", "pci-stub", "e1000e"];

impl FakeHost {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let sys = tmp.path().join("sys");
        fs::create_dir_all(sys.join("bus/pci/devices")).unwrap();
        for d in DRIVERS {
            let dir = sys.join("bus/pci/drivers").join(d);
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join("bind"), "").unwrap();
            fs::write(dir.join("unbind"), "").unwrap();
        }
        fs::write(sys.join("bus/pci/drivers_probe"), "").unwrap();
        fs::create_dir_all(sys.join("kernel/iommu_groups")).unwrap();
        fs::create_dir_all(tmp.path().join("dev")).unwrap();
        fs::write(
            tmp.path().join("proc_interrupts"),
            "           CPU0       \n  0:         46   IO-APIC   2-edge      timer\n",
        )
        .unwrap();
        Self { tmp }
    }

    fn sys(&self) -> PathBuf {
        self.tmp.path().join("sys")
    }

    fn sysfs(&self) -> PciSysfs {
        PciSysfs::with_root(self.sys())
            .proc_interrupts(self.tmp.path().join("proc_interrupts"))
            .dev_root(self.tmp.path().join("dev"))
    }

    fn dir(&self, bdf: &str) -> PathBuf {
        self.sys().join("devices/pci0000:00").join(bdf)
    }

    fn add(&self, d: FakeDevice<'_>) -> Bdf {
        let dir = self.dir(d.bdf);
        fs::create_dir_all(&dir).unwrap();
        symlink(&dir, self.sys().join("bus/pci/devices").join(d.bdf)).unwrap();
        fs::write(dir.join("vendor"), format!("{:#06x}\n", d.ids.0)).unwrap();
        fs::write(dir.join("device"), format!("{:#06x}\n", d.ids.1)).unwrap();
        fs::write(dir.join("irq"), format!("{}\n", d.irq)).unwrap();
        fs::write(dir.join("driver_override"), "(null)\n").unwrap();
        let mut config = [0u8; 256];
        config[0..2].copy_from_slice(&d.ids.0.to_le_bytes());
        config[2..4].copy_from_slice(&d.ids.1.to_le_bytes());
        config[4..6].copy_from_slice(&0x0006u16.to_le_bytes());
        config[0x3d] = d.pin;
        fs::write(dir.join("config"), config).unwrap();
        if let Some(driver) = d.driver {
            self.set_driver(d.bdf, Some(driver));
        }
        if let Some(group) = d.group {
            let gdir = self
                .sys()
                .join("kernel/iommu_groups")
                .join(group.to_string());
            fs::create_dir_all(gdir.join("devices")).unwrap();
            symlink(&gdir, dir.join("iommu_group")).unwrap();
            symlink(&dir, gdir.join("devices").join(d.bdf)).unwrap();
        }
        if let Some(methods) = d.reset_method {
            fs::write(dir.join("reset_method"), methods).unwrap();
            if !methods.trim().is_empty() {
                fs::write(dir.join("reset"), "").unwrap();
            }
        }
        bdf(d.bdf)
    }

    fn set_driver(&self, bdf: &str, driver: Option<&str>) {
        let link = self.dir(bdf).join("driver");
        let _ = fs::remove_file(&link);
        if let Some(driver) = driver {
            symlink(self.sys().join("bus/pci/drivers").join(driver), link).unwrap();
        }
    }

    fn add_uio(&self, bdf: &str, n: u32) {
        fs::create_dir_all(self.dir(bdf).join(format!("uio/uio{n}"))).unwrap();
        fs::write(self.tmp.path().join(format!("dev/uio{n}")), [0u8; 4]).unwrap();
    }

    fn config(&self, bdf: &str) -> PathBuf {
        self.dir(bdf).join("config")
    }

    /// Sets COMMAND and STATUS in the fake config file.
    fn set_command_status(&self, bdf: &str, command: u16, status: u16) {
        let path = self.config(bdf);
        let mut config = fs::read(&path).unwrap();
        config[4..6].copy_from_slice(&command.to_le_bytes());
        config[6..8].copy_from_slice(&status.to_le_bytes());
        fs::write(&path, config).unwrap();
    }

    fn command(&self, bdf: &str) -> u16 {
        let config = fs::read(self.config(bdf)).unwrap();
        u16::from_le_bytes([config[4], config[5]])
    }

    fn set_nointxmask(&self, value: &str) {
        let dir = self.sys().join("module/vfio_pci/parameters");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("nointxmask"), value).unwrap();
    }

    fn set_proc_interrupts(&self, text: &str) {
        fs::write(self.tmp.path().join("proc_interrupts"), text).unwrap();
    }
}

fn read(path: impl AsRef<Path>) -> String {
    fs::read_to_string(path).unwrap()
}

#[test]
fn ids_driver_and_group_come_from_the_tree() {
    let h = FakeHost::new();
    let a = h.add(FakeDevice {
        driver: Some(VFIO_PCI),
        group: Some(5),
        ..FakeDevice::default()
    });
    let s = h.sysfs();
    assert!(s.exists(a));
    let ids = s.ids(a).unwrap();
    assert_eq!((ids.vendor, ids.device), (0x1234, 0x11e8));
    assert_eq!(ids.to_string(), "1234:11e8");
    assert_eq!(s.driver(a).unwrap().as_deref(), Some(VFIO_PCI));
    assert_eq!(s.driver_override(a).unwrap(), None);
    assert_eq!(s.iommu_group(a).unwrap(), Some(5));
    let (group, members) = s.iommu_group_members(a).unwrap();
    assert_eq!(group, 5);
    assert_eq!(members.len(), 1);
    assert_eq!(members[0].bdf, Some(a));
    assert_eq!(members[0].driver.as_deref(), Some(VFIO_PCI));
    assert_eq!(s.devices().unwrap(), vec![a]);
}

#[test]
fn an_unknown_device_is_reported_by_address_and_path() {
    let h = FakeHost::new();
    let s = h.sysfs();
    let missing = bdf("0000:00:1f.7");
    assert!(!s.exists(missing));
    for err in [
        s.driver(missing).unwrap_err(),
        s.ids(missing).unwrap_err(),
        s.bind(missing, VFIO_PCI).unwrap_err(),
        s.masking_verdict(missing).unwrap_err(),
    ] {
        assert!(matches!(err, SysfsError::NoDevice { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.starts_with("0000:00:1f.7: no such PCI device"), "{msg}");
    }
}

#[test]
fn a_device_without_an_iommu_group_says_so() {
    let h = FakeHost::new();
    let a = h.add(FakeDevice::default());
    let s = h.sysfs();
    assert_eq!(s.iommu_group(a).unwrap(), None);
    let err = s.vfio_viability(a).unwrap_err();
    assert!(matches!(err, SysfsError::NoIommuGroup { .. }));
    assert!(err.to_string().contains("has no IOMMU group"), "{err}");
}

#[test]
fn vfio_viability_allows_vfio_pci_stub_pcieport_and_unbound_members() {
    let h = FakeHost::new();
    let a = h.add(FakeDevice {
        bdf: "0000:01:00.0",
        driver: Some(VFIO_PCI),
        group: Some(7),
        ..FakeDevice::default()
    });
    h.add(FakeDevice {
        bdf: "0000:00:10.0",
        driver: Some("pcieport"),
        group: Some(7),
        ..FakeDevice::default()
    });
    h.add(FakeDevice {
        bdf: "0000:01:00.1",
        driver: Some("pci-stub"),
        group: Some(7),
        ..FakeDevice::default()
    });
    h.add(FakeDevice {
        bdf: "0000:01:00.2",
        group: Some(7),
        ..FakeDevice::default()
    });
    let s = h.sysfs();
    let v = s.vfio_viability(a).unwrap();
    assert_eq!(v.group, 7);
    assert_eq!(v.members.len(), 4);
    assert!(v.is_viable(), "{v}");
    assert!(v
        .to_string()
        .starts_with("IOMMU group 7 is viable for VFIO"));

    // A member with a DMA-API driver (here a NIC driver) blocks the group.
    h.add(FakeDevice {
        bdf: "0000:01:00.3",
        driver: Some("e1000e"),
        group: Some(7),
        ..FakeDevice::default()
    });
    let v = s.vfio_viability(a).unwrap();
    assert!(!v.is_viable());
    let offending: Vec<_> = v.offending().map(|m| m.name.as_str()).collect();
    assert_eq!(offending, ["0000:01:00.3"]);
    let msg = v.to_string();
    assert!(msg.contains("not viable"), "{msg}");
    assert!(msg.contains("0000:01:00.3 (e1000e)"), "{msg}");
}

#[test]
fn a_uio_bound_device_makes_its_group_not_viable() {
    let h = FakeHost::new();
    let a = h.add(FakeDevice {
        driver: Some(UIO_PCI_GENERIC),
        group: Some(3),
        ..FakeDevice::default()
    });
    let v = h.sysfs().vfio_viability(a).unwrap();
    assert!(!v.is_viable());
    assert!(v.to_string().contains("(uio_pci_generic)"), "{v}");
}

#[test]
fn reset_methods_are_listed_and_an_empty_or_missing_file_means_none() {
    let h = FakeHost::new();
    let a = h.add(FakeDevice {
        bdf: "0000:01:00.0",
        reset_method: Some("flr bus\n"),
        ..FakeDevice::default()
    });
    let b = h.add(FakeDevice {
        bdf: "0000:02:00.0",
        reset_method: Some("\n"),
        ..FakeDevice::default()
    });
    let c = h.add(FakeDevice {
        bdf: "0000:03:00.0",
        ..FakeDevice::default()
    });
    let s = h.sysfs();
    assert_eq!(s.reset_methods(a).unwrap(), ["flr", "bus"]);
    assert!(s.reset_methods(b).unwrap().is_empty());
    assert!(s.reset_methods(c).unwrap().is_empty());
}

const PROC_INTERRUPTS: &str = "\
            CPU0       CPU1
   0:         46          0   IO-APIC   2-edge      timer
   9:          0          0   IO-APIC   9-fasteoi   acpi
  10:        117         12   IO-APIC  10-fasteoi   vfio-intx(0000:00:11.0), vfio-intx(0000:01:00.0)
  22:       2003          0   IO-APIC  22-fasteoi   uio_pci_generic
  24:          0          0  PCI-MSI 65536-edge      PCIe PME, aerdrv
  30:          3          0   IO-APIC  16-fasteoi
 NMI:          0          0   Non-maskable interrupts
";

#[test]
fn proc_interrupts_handlers_are_split_at_commas_only() {
    assert_eq!(
        interrupt_handlers(PROC_INTERRUPTS, 10),
        ["vfio-intx(0000:00:11.0)", "vfio-intx(0000:01:00.0)"]
    );
    assert_eq!(interrupt_handlers(PROC_INTERRUPTS, 22), ["uio_pci_generic"]);
    assert_eq!(
        interrupt_handlers(PROC_INTERRUPTS, 24),
        ["PCIe PME", "aerdrv"]
    );
    assert_eq!(interrupt_handlers(PROC_INTERRUPTS, 0), ["timer"]);
    assert!(interrupt_handlers(PROC_INTERRUPTS, 30).is_empty());
    assert!(interrupt_handlers(PROC_INTERRUPTS, 11).is_empty());
    assert!(interrupt_handlers("", 10).is_empty());
}

#[test]
fn proc_interrupts_counts_are_summed_over_the_cpus() {
    assert_eq!(interrupt_count(PROC_INTERRUPTS, 10), Some(129));
    assert_eq!(interrupt_count(PROC_INTERRUPTS, 22), Some(2003));
    assert_eq!(interrupt_count(PROC_INTERRUPTS, 30), Some(3));
    assert_eq!(interrupt_count(PROC_INTERRUPTS, 11), None);
    assert_eq!(interrupt_count("", 10), None);
}

#[test]
fn irq_line_lists_the_other_devices_and_the_handlers() {
    let h = FakeHost::new();
    let a = h.add(FakeDevice {
        bdf: "0000:01:00.0",
        irq: 10,
        driver: Some(VFIO_PCI),
        ..FakeDevice::default()
    });
    let b = h.add(FakeDevice {
        bdf: "0000:00:11.0",
        irq: 10,
        driver: Some(VFIO_PCI),
        ..FakeDevice::default()
    });
    let c = h.add(FakeDevice {
        bdf: "0000:02:00.0",
        irq: 22,
        driver: Some(UIO_PCI_GENERIC),
        ..FakeDevice::default()
    });
    let d = h.add(FakeDevice {
        bdf: "0000:03:00.0",
        irq: 0,
        pin: 0,
        ..FakeDevice::default()
    });
    h.set_proc_interrupts(PROC_INTERRUPTS);
    let s = h.sysfs();

    let line = s.irq_line(a).unwrap().unwrap();
    assert_eq!(line.irq, 10);
    assert!(line.is_shared());
    assert_eq!(line.shared_with.len(), 1);
    assert_eq!(line.shared_with[0].bdf, b);
    assert_eq!(line.shared_with[0].driver.as_deref(), Some(VFIO_PCI));
    assert_eq!(line.shared_with[0].to_string(), "0000:00:11.0 (vfio-pci)");
    assert_eq!(line.handlers.len(), 2);

    let line = s.irq_line(c).unwrap().unwrap();
    assert!(!line.is_shared());
    assert_eq!(line.handlers, ["uio_pci_generic"]);

    assert_eq!(s.irq(d).unwrap(), None);
    assert_eq!(s.irq_line(d).unwrap(), None);
}

#[test]
fn nointxmask_is_read_as_yes_no_or_absent() {
    let h = FakeHost::new();
    let s = h.sysfs();
    assert_eq!(s.vfio_nointxmask().unwrap(), None);
    h.set_nointxmask("Y\n");
    assert_eq!(s.vfio_nointxmask().unwrap(), Some(true));
    h.set_nointxmask("N\n");
    assert_eq!(s.vfio_nointxmask().unwrap(), Some(false));
    h.set_nointxmask("maybe\n");
    let err = s.vfio_nointxmask().unwrap_err();
    assert!(err.to_string().contains("nointxmask"), "{err}");
}

#[test]
fn the_uio_node_is_found_under_dev() {
    let h = FakeHost::new();
    let a = h.add(FakeDevice {
        driver: Some(UIO_PCI_GENERIC),
        ..FakeDevice::default()
    });
    let s = h.sysfs();
    assert_eq!(s.uio_device(a).unwrap(), None);
    h.add_uio("0000:01:00.0", 3);
    assert_eq!(
        s.uio_device(a).unwrap(),
        Some(h.tmp.path().join("dev/uio3"))
    );
}

#[test]
fn binding_to_the_current_driver_changes_nothing() {
    let h = FakeHost::new();
    let a = h.add(FakeDevice {
        driver: Some(UIO_PCI_GENERIC),
        ..FakeDevice::default()
    });
    let s = h.sysfs();
    let binding = s.bind(a, UIO_PCI_GENERIC).unwrap();
    assert!(!binding.changed());
    assert_eq!(binding.previous(), Some(UIO_PCI_GENERIC));
    assert_eq!(read(h.sys().join("bus/pci/drivers_probe")), "");
    assert_eq!(
        read(h.sys().join("bus/pci/drivers/uio_pci_generic/unbind")),
        ""
    );
    s.unbind(&binding).unwrap();
    assert_eq!(s.driver(a).unwrap().as_deref(), Some(UIO_PCI_GENERIC));
}

#[test]
fn binding_to_a_driver_that_is_not_loaded_names_it() {
    let h = FakeHost::new();
    let a = h.add(FakeDevice::default());
    let err = h.sysfs().bind(a, "vfio-pcie").unwrap_err();
    assert!(matches!(err, SysfsError::DriverMissing { .. }));
    let msg = err.to_string();
    assert!(
        msg.starts_with("0000:01:00.0: cannot bind to vfio-pcie: the driver is not loaded"),
        "{msg}"
    );
}

#[test]
fn a_refused_bind_explains_and_puts_the_previous_driver_back() {
    // The fake kernel never reacts: the driver link stays as it was, which is
    // what a driver whose probe fails looks like after drivers_probe.
    let h = FakeHost::new();
    let a = h.add(FakeDevice {
        driver: Some(VFIO_PCI),
        ..FakeDevice::default()
    });
    let s = h.sysfs();
    let err = s.bind(a, UIO_PCI_GENERIC).unwrap_err();
    assert!(matches!(err, SysfsError::Refused { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.starts_with("0000:01:00.0: uio_pci_generic refused the device: INTx masking broken"),
        "{msg}"
    );
    assert!(msg.contains("now bound to vfio-pci"), "{msg}");
    // The kernel way: unbind, driver_override, drivers_probe ...
    assert_eq!(
        read(h.sys().join("bus/pci/drivers/vfio-pci/unbind")),
        "0000:01:00.0"
    );
    assert_eq!(read(h.sys().join("bus/pci/drivers_probe")), "0000:01:00.0");
    // ... and the override is cleared again by the roll-back.
    assert_eq!(read(h.dir("0000:01:00.0").join("driver_override")), "\n");
}

#[test]
fn a_refused_bind_puts_back_a_driver_override_that_was_set() {
    let h = FakeHost::new();
    let a = h.add(FakeDevice {
        driver: Some(UIO_PCI_GENERIC),
        ..FakeDevice::default()
    });
    let s = h.sysfs();
    // Bound the way guest/init.sh binds: with an override.
    fs::write(
        h.dir("0000:01:00.0").join("driver_override"),
        "uio_pci_generic\n",
    )
    .unwrap();
    let err = s.bind(a, VFIO_PCI).unwrap_err();
    assert!(matches!(err, SysfsError::Refused { .. }), "{err:?}");
    assert!(
        err.to_string().contains("vfio-pci refused the device"),
        "{err}"
    );
    assert_eq!(
        read(h.dir("0000:01:00.0").join("driver_override")),
        "uio_pci_generic"
    );
}

#[test]
fn unbinding_a_binding_that_changed_nothing_touches_nothing() {
    let h = FakeHost::new();
    let a = h.add(FakeDevice {
        driver: Some(VFIO_PCI),
        ..FakeDevice::default()
    });
    let s = h.sysfs();
    let binding = s.bind(a, VFIO_PCI).unwrap();
    assert!(!binding.changed());
    // Someone else rebinds the device meanwhile; the no-op binding must not
    // undo their work.
    h.set_driver("0000:01:00.0", Some("e1000e"));
    s.unbind(&binding).unwrap();
    assert_eq!(s.driver(a).unwrap().as_deref(), Some("e1000e"));
    assert_eq!(read(h.sys().join("bus/pci/drivers/e1000e/unbind")), "");
}

#[test]
fn sysfs_config_reads_and_writes_little_endian_and_rejects_short_reads() {
    let h = FakeHost::new();
    let a = h.add(FakeDevice::default());
    let s = h.sysfs();
    let mut c = SysfsConfig::open(&s, a).unwrap();
    assert_eq!(c.bdf(), a);
    assert_eq!(c.config_size(), 256);
    assert_eq!(
        c.config_read(PCI_VENDOR_ID, Width::Dword).unwrap(),
        0x11e8_1234
    );
    assert_eq!(c.config_read(PCI_INTERRUPT_PIN, Width::Byte).unwrap(), 1);
    c.config_write(PCI_COMMAND, Width::Word, 0x0406).unwrap();
    assert_eq!(h.command("0000:01:00.0"), 0x0406);
    assert!(matches!(
        c.config_read(0x05, Width::Word),
        Err(BackendError::Access(_))
    ));
    assert!(matches!(
        c.config_read(0x100, Width::Byte),
        Err(BackendError::Access(_))
    ));

    // A short read (here: the file shrank, as it reads for an unprivileged
    // user past 64 bytes) is an error, not zeros.
    let f = fs::OpenOptions::new()
        .write(true)
        .open(h.config("0000:01:00.0"))
        .unwrap();
    f.set_len(0x40).unwrap();
    let err = c.config_read(0x40, Width::Dword).unwrap_err();
    assert!(
        matches!(&err, BackendError::Os { op, .. } if *op == "sysfs config pread"),
        "{err:?}"
    );
    assert!(vfio_intx::error_chain(&err).contains("0 of 4 bytes at offset 0x40"));

    // Read-only: writes fail with the errno.
    let mut ro = SysfsConfig::open_read_only(&s, a).unwrap();
    assert!(matches!(
        ro.config_write(PCI_COMMAND, Width::Word, 0),
        Err(BackendError::Os { .. })
    ));
}

#[test]
fn probe_masking_toggles_and_restores_on_an_unbound_device() {
    let h = FakeHost::new();
    let a = h.add(FakeDevice::default());
    h.set_command_status("0000:01:00.0", 0x0007, 0);
    let support = h.sysfs().probe_masking(a).unwrap();
    assert_eq!(support.reason, MaskingReason::ToggleWorks);
    assert_eq!(h.command("0000:01:00.0"), 0x0007, "COMMAND restored");
}

#[test]
fn probe_masking_refuses_a_device_with_a_live_kernel_driver() {
    let h = FakeHost::new();
    let a = h.add(FakeDevice {
        driver: Some("e1000e"),
        ..FakeDevice::default()
    });
    let err = h.sysfs().probe_masking(a).unwrap_err();
    assert!(matches!(err, SysfsError::LiveDriver { .. }));
    let msg = err.to_string();
    assert!(
        msg.starts_with(
            "0000:01:00.0: refusing toggling INTX_DISABLE: the device is bound to e1000e"
        ),
        "{msg}"
    );
}

/// Sets the config file's mtime far in the past, so that any write to it
/// (even one restoring the same bytes) shows.
fn age_config(h: &FakeHost, bdf: &str) -> SystemTime {
    let old = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
    fs::File::options()
        .write(true)
        .open(h.config(bdf))
        .unwrap()
        .set_modified(old)
        .unwrap();
    old
}

fn config_mtime(h: &FakeHost, bdf: &str) -> SystemTime {
    fs::metadata(h.config(bdf)).unwrap().modified().unwrap()
}

#[test]
fn masking_verdict_uses_the_toggle_test_only_without_a_driver() {
    let h = FakeHost::new();
    let a = h.add(FakeDevice::default());
    let aged = age_config(&h, "0000:01:00.0");
    let v = h.sysfs().masking_verdict(a).unwrap();
    assert!(v.supported);
    assert_eq!(v.source, Source::ToggleTest(MaskingReason::ToggleWorks));
    assert_eq!(
        (v.source.evidence(), v.source.toggled()),
        ("toggle-test", true)
    );
    // The toggle wrote (and restored) COMMAND: the check below sees writes.
    assert_ne!(config_mtime(&h, "0000:01:00.0"), aged);
    assert_eq!(h.command("0000:01:00.0"), 0x0006);
    let msg = v.to_string();
    assert!(
        msg.starts_with("0000:01:00.0 (1234:11e8, no driver): PCI 2.3 INTx masking works"),
        "{msg}"
    );
    assert!(msg.contains("toggled"), "{msg}");
}

#[test]
fn masking_verdict_never_writes_to_a_bound_device_and_names_its_evidence() {
    let h = FakeHost::new();
    let cases = [
        (
            "0000:01:00.0",
            UIO_PCI_GENERIC,
            "uio-bound",
            "uio_pci_generic bound the device",
        ),
        (
            "0000:02:00.0",
            VFIO_PCI,
            "inference",
            "vfio-pci owns INTX_DISABLE, so it was not toggled",
        ),
        (
            "0000:03:00.0",
            "e1000e",
            "inference",
            "e1000e owns INTX_DISABLE, so it was not toggled",
        ),
    ];
    h.set_nointxmask("N\n");
    let s = h.sysfs();
    for (addr, driver, evidence, words) in cases {
        let a = h.add(FakeDevice {
            bdf: addr,
            driver: Some(driver),
            ..FakeDevice::default()
        });
        // The device asserts, as it may under a live handler.
        h.set_command_status(addr, 0x0006, STATUS_INTERRUPT);
        let aged = age_config(&h, addr);
        let before = fs::read(h.config(addr)).unwrap();

        let v = s.masking_verdict(a).unwrap();
        eprintln!("{v}");
        assert_eq!(config_mtime(&h, addr), aged, "{driver}: config was written");
        assert_eq!(fs::read(h.config(addr)).unwrap(), before, "{driver}");
        assert!(v.supported, "{v}");
        assert_eq!(v.source.evidence(), evidence, "{v}");
        assert!(!v.source.toggled(), "{v}");
        assert!(v.to_string().contains(words), "{v}");

        // The toggle itself is refused under every driver.
        let err = s.probe_masking(a).unwrap_err();
        assert!(
            matches!(err, SysfsError::LiveDriver { .. }),
            "{driver}: {err:?}"
        );
        assert!(
            err.to_string().contains(&format!("bound to {driver}")),
            "{err}"
        );
        assert_eq!(config_mtime(&h, addr), aged, "{driver}: config was written");
    }
}

#[test]
fn masking_verdict_on_uio_still_knows_quirks_and_pinless_devices() {
    let h = FakeHost::new();
    let quirky = h.add(FakeDevice {
        bdf: "0000:01:00.0",
        ids: (0x1425, 0x0030),
        driver: Some(UIO_PCI_GENERIC),
        ..FakeDevice::default()
    });
    let pinless = h.add(FakeDevice {
        bdf: "0000:02:00.0",
        pin: 0,
        driver: Some(UIO_PCI_GENERIC),
        ..FakeDevice::default()
    });
    let s = h.sysfs();
    let v = s.masking_verdict(quirky).unwrap();
    assert!(!v.supported, "{v}");
    assert_eq!(v.source.evidence(), "quirk-table");
    let v = s.masking_verdict(pinless).unwrap();
    assert_eq!((v.supported, v.source), (false, Source::InterruptPin));
}

#[test]
fn masking_verdict_infers_for_vfio_pci_and_reports_nointxmask() {
    let h = FakeHost::new();
    let a = h.add(FakeDevice {
        driver: Some(VFIO_PCI),
        ..FakeDevice::default()
    });
    let s = h.sysfs();
    h.set_nointxmask("N\n");
    let v = s.masking_verdict(a).unwrap();
    assert!(v.supported);
    assert_eq!(v.source, Source::Inference);
    assert!(v.to_string().contains("inferred to work"), "{v}");
    assert!(v.to_string().contains("nointxmask off"), "{v}");

    h.set_nointxmask("Y\n");
    let v = s.masking_verdict(a).unwrap();
    assert!(!v.supported);
    assert_eq!(v.source, Source::VfioNoIntxMask);
    assert!(
        v.to_string().ends_with(
            "vfio-pci is in disable_irq mode (nointxmask=1): the host line is exclusive"
        ),
        "{v}"
    );
}

#[test]
fn masking_verdict_knows_the_quirks_the_vfio_nointx_list_and_pinless_devices() {
    let h = FakeHost::new();
    let realtek = h.add(FakeDevice {
        bdf: "0000:01:00.0",
        ids: (0x10ec, 0x8169),
        driver: Some(VFIO_PCI),
        ..FakeDevice::default()
    });
    let x550 = h.add(FakeDevice {
        bdf: "0000:02:00.0",
        ids: (0x8086, 0x1563),
        driver: Some(VFIO_PCI),
        ..FakeDevice::default()
    });
    let pinless = h.add(FakeDevice {
        bdf: "0000:03:00.0",
        pin: 0,
        driver: Some(VFIO_PCI),
        ..FakeDevice::default()
    });
    let quirky_unbound = h.add(FakeDevice {
        bdf: "0000:04:00.0",
        ids: (0x1425, 0x0030),
        ..FakeDevice::default()
    });
    let s = h.sysfs();
    let v = s.masking_verdict(realtek).unwrap();
    assert!(!v.supported);
    assert!(matches!(v.source, Source::QuirkTable(q) if q.name.contains("RTL8169")));
    assert!(v.to_string().contains("kernel quirk table"), "{v}");
    let v = s.masking_verdict(x550).unwrap();
    assert_eq!((v.supported, v.source), (false, Source::VfioNoIntx));
    let v = s.masking_verdict(pinless).unwrap();
    assert_eq!((v.supported, v.source), (false, Source::InterruptPin));
    assert!(v.to_string().contains("no INTx pin"), "{v}");
    let v = s.masking_verdict(quirky_unbound).unwrap();
    assert!(matches!(v.source, Source::QuirkTable(_)));
}

fn uio_host() -> (FakeHost, Bdf) {
    let h = FakeHost::new();
    let a = h.add(FakeDevice {
        driver: Some(UIO_PCI_GENERIC),
        reset_method: Some("bus\n"),
        ..FakeDevice::default()
    });
    h.add_uio("0000:01:00.0", 0);
    (h, a)
}

#[test]
fn uio_backend_refuses_devices_not_bound_to_uio_pci_generic() {
    let h = FakeHost::new();
    let a = h.add(FakeDevice {
        bdf: "0000:01:00.0",
        driver: Some(VFIO_PCI),
        ..FakeDevice::default()
    });
    let b = h.add(FakeDevice {
        bdf: "0000:02:00.0",
        ..FakeDevice::default()
    });
    let s = h.sysfs();
    let err = UioBackend::open_with(&s, a).unwrap_err();
    assert!(matches!(err, UioError::NotUio { .. }));
    assert_eq!(
        err.to_string(),
        "0000:01:00.0: the device is bound to vfio-pci, not uio_pci_generic (bind it first)"
    );
    let err = UioBackend::open_with(&s, b).unwrap_err();
    assert!(err.to_string().contains("bound to no driver"), "{err}");
    // Bound but no uio node registered.
    h.set_driver("0000:02:00.0", Some(UIO_PCI_GENERIC));
    let err = UioBackend::open_with(&s, b).unwrap_err();
    assert!(matches!(err, UioError::NoUioDevice { .. }), "{err:?}");
}

#[test]
fn uio_check_and_mask_lifts_a_kernel_automask_when_the_device_does_not_assert() {
    let (h, a) = uio_host();
    let mut u = UioBackend::open_with(&h.sysfs(), a).unwrap();
    assert_eq!(u.uio_path(), h.tmp.path().join("dev/uio0"));
    // The kernel's handler masked, and the device deasserted since.
    h.set_command_status("0000:01:00.0", 0x0406, 0);
    assert!(!u.intx_check_and_mask().unwrap());
    assert_eq!(h.command("0000:01:00.0"), 0x0006);
}

#[test]
fn uio_check_and_mask_keeps_a_mask_the_engine_set() {
    let (h, a) = uio_host();
    let mut u = UioBackend::open_with(&h.sysfs(), a).unwrap();
    u.intx_mask().unwrap();
    assert_eq!(h.command("0000:01:00.0"), 0x0406);
    assert!(!u.intx_check_and_mask().unwrap());
    assert_eq!(h.command("0000:01:00.0"), 0x0406, "the engine's mask stays");
    // The same for a guest COMMAND write with INTX_DISABLE (byte access).
    h.set_command_status("0000:01:00.0", 0x0006, 0);
    u.config_write(PCI_COMMAND + 1, Width::Byte, 0x04).unwrap();
    assert!(!u.intx_check_and_mask().unwrap());
    assert_eq!(h.command("0000:01:00.0"), 0x0406);
}

#[test]
fn uio_check_and_mask_masks_an_asserting_device_and_unmask_waits_for_it() {
    let (h, a) = uio_host();
    let mut u = UioBackend::open_with(&h.sysfs(), a).unwrap();
    h.set_command_status("0000:01:00.0", 0x0006, STATUS_INTERRUPT);
    assert!(u.intx_check_and_mask().unwrap());
    assert_eq!(h.command("0000:01:00.0"), 0x0406);
    assert_eq!(
        u.intx_check_and_unmask().unwrap(),
        vfio_intx::backend::Unmask::StillAsserting
    );
    assert_eq!(h.command("0000:01:00.0"), 0x0406);
    h.set_command_status("0000:01:00.0", 0x0406, 0);
    assert_eq!(
        u.intx_check_and_unmask().unwrap(),
        vfio_intx::backend::Unmask::Unmasked
    );
    assert_eq!(h.command("0000:01:00.0"), 0x0006);
}

#[test]
fn uio_reset_writes_the_reset_attribute_or_reports_no_method() {
    let (h, a) = uio_host();
    let mut u = UioBackend::open_with(&h.sysfs(), a).unwrap();
    u.reset().unwrap();
    assert_eq!(read(h.dir("0000:01:00.0").join("reset")), "1");
    fs::write(h.dir("0000:01:00.0").join("reset_method"), "\n").unwrap();
    assert!(matches!(u.reset(), Err(BackendError::NoResetMethod)));
    fs::remove_file(h.dir("0000:01:00.0").join("reset_method")).unwrap();
    fs::remove_file(h.dir("0000:01:00.0").join("reset")).unwrap();
    assert!(matches!(u.reset(), Err(BackendError::NoResetMethod)));
}

#[test]
fn uio_has_no_unmask_eventfd_and_no_intx_without_an_irq() {
    let (h, a) = uio_host();
    let mut u = UioBackend::open_with(&h.sysfs(), a).unwrap();
    assert_eq!(
        u.capabilities().intx_disable,
        vfio_intx::backend::IntxDisableBit::Physical
    );
    assert!(!u.capabilities().bypass_capable());
    let err = u.intx_set_unmask_eventfd(None).unwrap_err();
    assert!(
        matches!(&err, BackendError::Os { source, .. } if source.kind() == std::io::ErrorKind::Unsupported)
    );
    fs::write(h.dir("0000:01:00.0").join("irq"), "0\n").unwrap();
    let mut u = UioBackend::open_with(&h.sysfs(), a).unwrap();
    let trigger = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
    assert!(matches!(u.intx_enable(&trigger), Err(BackendError::NoIntx)));
    assert!(!u.is_forwarding());
}

// ---- Who holds a device (pci::holders), against a fake /proc ----

/// A fake process: `<tmp>/proc/PID/{comm,fd/N,fdinfo/N}`; each fd is a
/// symlink to `target` as the kernel shows it.
fn fake_process(h: &FakeHost, pid: u32, comm: &str, fds: &[(&str, Option<&str>)]) {
    let dir = h.tmp.path().join("proc").join(pid.to_string());
    fs::create_dir_all(dir.join("fd")).unwrap();
    fs::create_dir_all(dir.join("fdinfo")).unwrap();
    fs::write(dir.join("comm"), format!("{comm}\n")).unwrap();
    for (n, (target, fdinfo)) in fds.iter().enumerate() {
        let n = n + 3;
        symlink(target, dir.join("fd").join(n.to_string())).unwrap();
        let info = format!("pos:\t0\nflags:\t02\nmnt_id:\t15\n{}", fdinfo.unwrap_or(""));
        fs::write(dir.join("fdinfo").join(n.to_string()), info).unwrap();
    }
}

fn holders(h: &FakeHost) -> vfio_intx::pci::holders::Holders {
    fs::create_dir_all(h.tmp.path().join("proc")).unwrap();
    vfio_intx::pci::holders::Holders::new(h.sysfs(), h.tmp.path().join("proc"))
}

#[test]
fn a_process_with_the_uio_node_open_holds_the_device_and_is_named() {
    let h = FakeHost::new();
    let a = h.add(FakeDevice {
        driver: Some(UIO_PCI_GENERIC),
        ..FakeDevice::default()
    });
    h.add_uio("0000:01:00.0", 2);
    fake_process(&h, 4242, "uio-app", &[("/dev/uio2", None)]);
    // Other processes: another uio node, a pipe, a file.
    fake_process(
        &h,
        17,
        "bystander",
        &[
            ("/dev/uio1", None),
            ("pipe:[123]", None),
            ("/etc/passwd", None),
        ],
    );
    let scan = holders(&h).of(a).unwrap();
    assert!(scan.is_held());
    assert_eq!(scan.pids(), [4242]);
    assert_eq!(scan.describe(), "PID 4242 (uio-app) holds /dev/uio2");
}

#[test]
fn an_open_vfio_group_holds_every_device_in_it() {
    let h = FakeHost::new();
    let a = h.add(FakeDevice {
        driver: Some(VFIO_PCI),
        group: Some(7),
        ..FakeDevice::default()
    });
    fake_process(
        &h,
        300,
        "qemu-system-x86",
        &[("/dev/vfio/vfio", None), ("/dev/vfio/7", None)],
    );
    fake_process(&h, 301, "other-vmm", &[("/dev/vfio/71", None)]);
    let scan = holders(&h).of(a).unwrap();
    assert_eq!(
        scan.describe(),
        "PID 300 (qemu-system-x86) holds /dev/vfio/7"
    );
}

#[test]
fn a_vfio_device_fd_counts_only_where_its_fdinfo_names_the_device() {
    let h = FakeHost::new();
    let a = h.add(FakeDevice {
        driver: Some(VFIO_PCI),
        group: Some(9),
        ..FakeDevice::default()
    });
    // Linux 6.18+: the fdinfo names the device (group fd already closed).
    fake_process(
        &h,
        500,
        "vmm",
        &[(
            "anon_inode:[vfio-device]",
            Some("vfio-device-syspath: /sys/devices/pci0000:00/0000:01:00.0\n"),
        )],
    );
    // Another device's fd, and an fd of an older kernel that names none.
    fake_process(
        &h,
        501,
        "vmm2",
        &[(
            "anon_inode:[vfio-device]",
            Some("vfio-device-syspath: /sys/devices/pci0000:00/0000:02:00.0\n"),
        )],
    );
    fake_process(&h, 502, "vmm3", &[("anon_inode:[vfio-device]", None)]);
    let scan = holders(&h).of(a).unwrap();
    assert_eq!(scan.describe(), "PID 500 (vmm) holds a VFIO device fd");
}

#[test]
fn an_iommufd_vfio_cdev_holds_the_device() {
    let h = FakeHost::new();
    let a = h.add(FakeDevice {
        driver: Some(VFIO_PCI),
        ..FakeDevice::default()
    });
    fs::create_dir_all(h.dir("0000:01:00.0").join("vfio-dev/vfio3")).unwrap();
    fake_process(
        &h,
        60,
        "cloud-hv",
        &[("/dev/iommu", None), ("/dev/vfio/devices/vfio3", None)],
    );
    let scan = holders(&h).of(a).unwrap();
    assert_eq!(
        scan.describe(),
        "PID 60 (cloud-hv) holds /dev/vfio/devices/vfio3"
    );
}

#[test]
fn nobody_holds_an_idle_device_and_unreadable_processes_are_counted() {
    let h = FakeHost::new();
    let a = h.add(FakeDevice {
        driver: Some(UIO_PCI_GENERIC),
        group: Some(4),
        ..FakeDevice::default()
    });
    h.add_uio("0000:01:00.0", 0);
    fake_process(&h, 10, "sh", &[("/dev/tty1", None)]);
    // A process whose fd directory is not a directory (as unreadable).
    let p = h.tmp.path().join("proc/11");
    fs::create_dir_all(&p).unwrap();
    fs::write(p.join("fd"), "").unwrap();
    // Entries of /proc that are no processes.
    fs::create_dir_all(h.tmp.path().join("proc/sys")).unwrap();
    let scan = holders(&h).of(a).unwrap();
    assert!(!scan.is_held(), "{}", scan.describe());
    assert_eq!(scan.unreadable, 1);
}

#[test]
fn holders_of_an_unknown_device_name_it() {
    let h = FakeHost::new();
    let err = holders(&h).of(bdf("0000:09:00.0")).unwrap_err();
    let msg = vfio_intx::error_chain(&err);
    assert!(
        msg.starts_with("0000:09:00.0: finding who holds the device"),
        "{msg}"
    );
    assert!(msg.contains("no such PCI device"), "{msg}");
}

#[test]
fn the_read_only_verdict_never_writes_a_device_someone_else_may_use() {
    let h = FakeHost::new();
    // No driver: the only case where the plain verdict toggles.
    let a = h.add(FakeDevice {
        driver: None,
        ..FakeDevice::default()
    });
    let path = h.config("0000:01:00.0");
    let written = || fs::metadata(&path).unwrap().modified().unwrap();
    let age = |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).unwrap();
    let set_old = || {
        fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1))
            .unwrap();
    };
    // The toggle test writes COMMAND (and restores it): a write to a
    // device someone may be using through sysfs alone.
    set_old();
    let toggled = h.sysfs().masking_verdict(a).unwrap();
    assert!(age(written()).as_secs() > 1, "the toggle test writes");
    assert_eq!(
        toggled.source,
        Source::ToggleTest(MaskingReason::ToggleWorks)
    );
    // The read-only verdict only reads.
    set_old();
    let v = h.sysfs().masking_verdict_read_only(a).unwrap();
    assert_eq!(age(written()).as_secs(), 1, "nothing written");
    assert!(v.supported);
    assert_eq!(v.source, Source::Inference);
}

/// Marks a fake device enabled (`enable` = 1), as a driver's
/// `pci_enable_device` does.
fn set_enabled(h: &FakeHost, bdf: &str, enabled: bool) {
    fs::write(
        h.dir(bdf).join("enable"),
        if enabled { "1\n" } else { "0\n" },
    )
    .unwrap();
}

/// The host: a vfio-pci device and a uio_pci_generic device on IRQ
/// 20, both enabled, and a lone vfio-pci device on 21.
fn shared_line_host() -> (FakeHost, Bdf, Bdf, Bdf) {
    let h = FakeHost::new();
    let vfio = h.add(FakeDevice {
        bdf: "0000:00:04.0",
        irq: 20,
        driver: Some(VFIO_PCI),
        ..FakeDevice::default()
    });
    let uio = h.add(FakeDevice {
        bdf: "0000:00:08.0",
        irq: 20,
        driver: Some(UIO_PCI_GENERIC),
        ..FakeDevice::default()
    });
    let lone = h.add(FakeDevice {
        bdf: "0000:00:05.0",
        irq: 21,
        driver: Some(VFIO_PCI),
        ..FakeDevice::default()
    });
    for b in ["0000:00:04.0", "0000:00:08.0", "0000:00:05.0"] {
        set_enabled(&h, b, true);
    }
    h.set_proc_interrupts(
        "           CPU0       CPU1       \n  \
         20:         12          3   IO-APIC  20-fasteoi   uio_pci_generic, vfio-intx(0000:00:04.0)\n  \
         21:          0          0   IO-APIC  21-fasteoi   vfio-intx(0000:00:05.0)\n",
    );
    (h, vfio, uio, lone)
}

#[test]
fn line_sharing_names_the_other_device_its_driver_the_irq_and_the_handlers() {
    let (h, vfio, uio, _) = shared_line_host();
    let s = h.sysfs();
    let line = line_sharing(&s, vfio).unwrap();
    assert_eq!(line.irq, Some(20));
    assert_eq!(line.source, IrqSource::Routed);
    assert_eq!(line.sharers.len(), 1);
    assert_eq!(line.sharers[0].bdf, uio);
    assert_eq!(line.sharers[0].driver.as_deref(), Some(UIO_PCI_GENERIC));
    assert_eq!(line.sharers[0].masking, Some(true));
    assert_eq!(
        line.handlers,
        ["uio_pci_generic", "vfio-intx(0000:00:04.0)"]
    );
    assert_eq!(line.verdict, ShareVerdict::SharedSafe);
    let text = line.to_string();
    assert_eq!(
        text,
        "host IRQ 20: shared-safe; shared with 0000:00:08.0 (uio_pci_generic, masks); \
         handlers: uio_pci_generic, vfio-intx(0000:00:04.0)"
    );

    // And from the other side.
    let line = line_sharing(&s, uio).unwrap();
    assert_eq!(line.sharers[0].bdf, vfio);
    assert_eq!(line.sharers[0].driver.as_deref(), Some(VFIO_PCI));
    assert_eq!(line.verdict, ShareVerdict::SharedSafe);
}

#[test]
fn line_sharing_says_alone_for_a_device_alone_on_its_line() {
    let (h, _, _, lone) = shared_line_host();
    let line = line_sharing(&h.sysfs(), lone).unwrap();
    assert_eq!((line.irq, line.verdict), (Some(21), ShareVerdict::Alone));
    assert!(line.sharers.is_empty());
    assert_eq!(line.handlers, ["vfio-intx(0000:00:05.0)"]);
    assert_eq!(
        line.to_string(),
        "host IRQ 21: alone; handlers: vfio-intx(0000:00:05.0)"
    );
}

#[test]
fn line_sharing_names_a_sharer_that_cannot_mask_and_what_to_do() {
    let (h, vfio, _, _) = shared_line_host();
    // A Realtek RTL8169 (broken masking in the kernel's quirk table) on
    // the same line, bound to its own driver; never toggled.
    let rtl = h.add(FakeDevice {
        bdf: "0000:00:0c.0",
        ids: (0x10ec, 0x8169),
        irq: 20,
        driver: Some("e1000e"),
        ..FakeDevice::default()
    });
    let before = fs::read(h.config("0000:00:0c.0")).unwrap();
    let line = line_sharing(&h.sysfs(), vfio).unwrap();
    assert_eq!(fs::read(h.config("0000:00:0c.0")).unwrap(), before);
    assert_eq!(line.verdict, ShareVerdict::SharedUnsafe);
    let bad: Vec<Bdf> = line.unsafe_sharers().map(|s| s.bdf).collect();
    assert_eq!(bad, [rtl]);
    let advice = line.advice();
    assert!(
        advice.starts_with("0000:00:0c.0 (e1000e, no PCI 2.3 masking) cannot share the line"),
        "{advice}"
    );
    for what in ["another line", "nointxmask", "MSI"] {
        assert!(advice.contains(what), "{what}: {advice}");
    }
    assert!(line.to_string().contains(&advice), "{line}");
}

#[test]
fn line_sharing_is_unknown_until_the_device_is_enabled() {
    let (h, vfio, uio, _) = shared_line_host();
    set_enabled(&h, "0000:00:04.0", false);
    let line = line_sharing(&h.sysfs(), vfio).unwrap();
    assert_eq!(line.source, IrqSource::Firmware);
    assert_eq!(line.verdict, ShareVerdict::Unknown);
    // The sharers on the firmware's number are still listed.
    assert_eq!(line.sharers[0].bdf, uio);
    let text = line.to_string();
    assert!(
        text.starts_with(
            "IRQ 20 (device not enabled: the firmware's or its last routing): unknown"
        ),
        "{text}"
    );
    assert!(text.contains("known once a driver enables it"), "{text}");

    // A device without the attribute counts as not enabled; one without
    // an IRQ has no line.
    let pinless = h.add(FakeDevice {
        bdf: "0000:00:09.0",
        irq: 0,
        pin: 0,
        ..FakeDevice::default()
    });
    let line = line_sharing(&h.sysfs(), pinless).unwrap();
    assert_eq!((line.irq, line.verdict), (None, ShareVerdict::NoIrq));
}
