//! The few sysfs facts the VFIO backend checks before opening a device, so
//! that a refusal names its reason: the device's driver, its IOMMU group and
//! the drivers of the group's other members.
//!
//! Private and minimal on purpose: the crate's general sysfs helpers live in
//! [`crate::pci::sysfs`]; these can be folded into them. The root is a
//! parameter so that tests can point it at a fake tree.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::pci::Bdf;

/// Drivers that leave an IOMMU group viable besides the vfio drivers
/// (`vfio_driver_allowed` in the kernel's drivers/vfio).
const ALLOWED_DRIVERS: &[&str] = &["pci-stub"];

/// A sysfs tree (normally `/sys`).
#[derive(Debug, Clone)]
pub(super) struct Sysfs {
    root: PathBuf,
}

/// One device of an IOMMU group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct GroupMember {
    /// Its sysfs name (a PCI address for PCI devices).
    pub(super) name: String,
    /// The driver it is bound to.
    pub(super) driver: Option<String>,
    /// Whether it is a PCI-to-PCI or CardBus bridge (class 0x0604/0x0607),
    /// which the kernel lets stay bound to its driver.
    pub(super) bridge: bool,
}

impl GroupMember {
    /// Whether this member makes the group not viable for VFIO.
    pub(super) fn blocks_vfio(&self) -> bool {
        match &self.driver {
            None => false,
            Some(d) if is_vfio_driver(d) || ALLOWED_DRIVERS.contains(&d.as_str()) => false,
            Some(_) => !self.bridge,
        }
    }
}

/// Whether `driver` is vfio-pci or a vfio-pci variant driver
/// (`mlx5_vfio_pci`, ...).
pub(super) fn is_vfio_driver(driver: &str) -> bool {
    driver.contains("vfio")
}

impl Default for Sysfs {
    fn default() -> Self {
        Self::at("/sys")
    }
}

impl Sysfs {
    pub(super) fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// `/sys/bus/pci/devices/<bdf>`.
    pub(super) fn device_dir(&self, bdf: Bdf) -> PathBuf {
        self.root.join("bus/pci/devices").join(bdf.to_string())
    }

    /// The name of the driver `dir` is bound to, if any.
    fn driver_of(dir: &Path) -> io::Result<Option<String>> {
        link_name(&dir.join("driver"))
    }

    /// The driver `bdf` is bound to, if any.
    pub(super) fn driver(&self, bdf: Bdf) -> io::Result<Option<String>> {
        Self::driver_of(&self.device_dir(bdf))
    }

    /// The IOMMU group of `bdf`; `None` without an `iommu_group` link (no
    /// IOMMU, or the device is not behind one).
    pub(super) fn iommu_group(&self, bdf: Bdf) -> io::Result<Option<u32>> {
        let Some(name) = link_name(&self.device_dir(bdf).join("iommu_group"))? else {
            return Ok(None);
        };
        name.parse().map(Some).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("iommu_group link names {name:?}, not a group number"),
            )
        })
    }

    /// `/sys/kernel/iommu_groups/<group>/devices`.
    pub(super) fn group_devices_dir(&self, group: u32) -> PathBuf {
        self.root
            .join("kernel/iommu_groups")
            .join(group.to_string())
            .join("devices")
    }

    /// Every device of IOMMU group `group`, sorted by name.
    pub(super) fn group_members(&self, group: u32) -> io::Result<Vec<GroupMember>> {
        let mut members = Vec::new();
        for entry in fs::read_dir(self.group_devices_dir(group))? {
            let entry = entry?;
            let path = entry.path();
            let class = fs::read_to_string(path.join("class")).unwrap_or_default();
            members.push(GroupMember {
                name: entry.file_name().to_string_lossy().into_owned(),
                driver: Self::driver_of(&path)?,
                bridge: is_bridge_class(&class),
            });
        }
        members.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(members)
    }
}

/// The last component of the symlink at `link`'s target; `None` if there is
/// no such link.
fn link_name(link: &Path) -> io::Result<Option<String>> {
    match fs::read_link(link) {
        Ok(target) => Ok(target.file_name().map(|n| n.to_string_lossy().into_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether a sysfs `class` value (`0x060400`) is a PCI-to-PCI or CardBus
/// bridge.
fn is_bridge_class(class: &str) -> bool {
    let digits = class.trim().trim_start_matches("0x");
    match u32::from_str_radix(digits, 16) {
        Ok(class) => matches!(class >> 8, 0x0604 | 0x0607),
        Err(_) => false,
    }
}

#[cfg(test)]
pub(super) mod fake {
    //! A fake sysfs tree in a temporary directory.

    use std::fs;
    use std::os::unix::fs::symlink;
    use std::path::Path;

    use vmm_sys_util::tempdir::TempDir;

    use super::Sysfs;

    pub(in crate::vfio) struct FakeSysfs {
        pub(in crate::vfio) dir: TempDir,
    }

    impl FakeSysfs {
        pub(in crate::vfio) fn new() -> Self {
            let dir = TempDir::new_with_prefix("/tmp/vfio-intx-sysfs").unwrap();
            for d in ["bus/pci/devices", "bus/pci/drivers", "kernel/iommu_groups"] {
                fs::create_dir_all(dir.as_path().join(d)).unwrap();
            }
            Self { dir }
        }

        pub(in crate::vfio) fn sysfs(&self) -> Sysfs {
            Sysfs::at(self.dir.as_path())
        }

        fn root(&self) -> &Path {
            self.dir.as_path()
        }

        /// Adds a device with a class, optionally bound to `driver` and in
        /// IOMMU group `group`.
        pub(in crate::vfio) fn device(
            &self,
            name: &str,
            class: &str,
            driver: Option<&str>,
            group: Option<u32>,
        ) {
            let dev = self.root().join("devices").join(name);
            fs::create_dir_all(&dev).unwrap();
            fs::write(dev.join("class"), format!("{class}\n")).unwrap();
            symlink(&dev, self.root().join("bus/pci/devices").join(name)).unwrap();
            if let Some(driver) = driver {
                let drv = self.root().join("bus/pci/drivers").join(driver);
                fs::create_dir_all(&drv).unwrap();
                symlink(&drv, dev.join("driver")).unwrap();
            }
            if let Some(group) = group {
                let g = self
                    .root()
                    .join("kernel/iommu_groups")
                    .join(group.to_string());
                fs::create_dir_all(g.join("devices")).unwrap();
                symlink(&g, dev.join("iommu_group")).unwrap();
                symlink(&dev, g.join("devices").join(name)).unwrap();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeSysfs;
    use super::*;

    fn bdf(s: &str) -> Bdf {
        s.parse().unwrap()
    }

    #[test]
    fn reads_driver_and_group_and_tells_missing_links_apart() {
        let fake = FakeSysfs::new();
        fake.device("0000:01:00.0", "0x00ff00", Some("vfio-pci"), Some(5));
        fake.device("0000:02:00.0", "0x00ff00", None, None);
        let sysfs = fake.sysfs();
        assert_eq!(
            sysfs.driver(bdf("0000:01:00.0")).unwrap().as_deref(),
            Some("vfio-pci")
        );
        assert_eq!(sysfs.iommu_group(bdf("0000:01:00.0")).unwrap(), Some(5));
        assert_eq!(sysfs.driver(bdf("0000:02:00.0")).unwrap(), None);
        assert_eq!(sysfs.iommu_group(bdf("0000:02:00.0")).unwrap(), None);
    }

    #[test]
    fn a_group_with_a_device_bound_to_another_driver_is_not_viable() {
        let fake = FakeSysfs::new();
        fake.device("0000:01:00.0", "0x020000", Some("vfio-pci"), Some(7));
        fake.device("0000:01:00.1", "0x020000", Some("e1000e"), Some(7));
        fake.device("0000:01:00.2", "0x020000", None, Some(7));
        fake.device("0000:00:1c.0", "0x060400", Some("pcieport"), Some(7));
        fake.device("0000:01:00.3", "0x020000", Some("pci-stub"), Some(7));
        fake.device("0000:01:00.4", "0x020000", Some("mlx5_vfio_pci"), Some(7));
        let members = fake.sysfs().group_members(7).unwrap();
        assert_eq!(members.len(), 6);
        let blockers: Vec<_> = members.iter().filter(|m| m.blocks_vfio()).collect();
        assert_eq!(blockers.len(), 1);
        assert_eq!(blockers[0].name, "0000:01:00.1");
        assert_eq!(blockers[0].driver.as_deref(), Some("e1000e"));
    }

    #[test]
    fn bridge_classes() {
        assert!(is_bridge_class("0x060400\n"));
        assert!(is_bridge_class("0x060700"));
        assert!(!is_bridge_class("0x060000"));
        assert!(!is_bridge_class("0x00ff00"));
        assert!(!is_bridge_class(""));
    }
}
