//! A fake sysfs tree for the VFIO backend's unit tests of `open`'s checks,
//! which read sysfs through [`crate::pci::sysfs::PciSysfs`].

#[cfg(test)]
pub(super) mod fake {
    //! A fake sysfs tree in a temporary directory.

    use std::fs;
    use std::os::unix::fs::symlink;
    use std::path::Path;

    use vmm_sys_util::tempdir::TempDir;

    use crate::pci::sysfs::PciSysfs;

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

        pub(in crate::vfio) fn sysfs(&self) -> PciSysfs {
            PciSysfs::with_root(self.dir.as_path())
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
