//! A device's configuration space through its sysfs `config` file
//! ([`SysfsConfig`]).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;

use crate::pci::config::{BackendError, ConfigSpace};
use crate::pci::regs::PCI_CFG_SPACE_EXP_SIZE;
use crate::pci::{check_access, check_write, Bdf, Width};

use super::{PciSysfs, SysfsError, MIN_CONFIG_SIZE};

/// A device's configuration space through its sysfs `config` file
/// (`pread`/`pwrite`). The file is as large as the config space the kernel
/// exposes (256 or 4096 bytes); without CAP_SYS_ADMIN reads beyond the
/// first 64 bytes come back short, which is an error here.
///
/// The kernel splits each access into naturally aligned config cycles, so a
/// 4-byte access at 0x04 is one dword read of COMMAND and STATUS, as the
/// PCI 2.3 masking primitives need. User-space config accesses wait while
/// the device is blocked by a reset.
#[derive(Debug)]
pub struct SysfsConfig {
    bdf: Bdf,
    file: File,
    size: u16,
}

impl SysfsConfig {
    /// Opens the device's `config` file for reading and writing.
    pub fn open(sysfs: &PciSysfs, bdf: Bdf) -> Result<Self, SysfsError> {
        Self::open_mode(sysfs, bdf, true)
    }

    /// Opens the device's `config` file for reading only; writes fail.
    pub fn open_read_only(sysfs: &PciSysfs, bdf: Bdf) -> Result<Self, SysfsError> {
        Self::open_mode(sysfs, bdf, false)
    }

    fn open_mode(sysfs: &PciSysfs, bdf: Bdf, write: bool) -> Result<Self, SysfsError> {
        let path = sysfs.existing_device_dir(bdf)?.join("config");
        let file = OpenOptions::new()
            .read(true)
            .write(write)
            .open(&path)
            .map_err(|source| SysfsError::Io {
                bdf,
                op: "opening the config file",
                path: path.clone(),
                source,
            })?;
        Self::with_file(bdf, file, path)
    }

    /// Takes over an open `config` file of `bdf` (one kept across the
    /// daemon's restart), after checking that it is that device's `config`
    /// file: the path the open file names is the device's, as `sysfs`
    /// shows it now.
    pub fn from_file(sysfs: &PciSysfs, bdf: Bdf, file: File) -> Result<Self, SysfsError> {
        let path = sysfs.existing_device_dir(bdf)?.join("config");
        let io = |op, source| SysfsError::Io {
            bdf,
            op,
            path: path.clone(),
            source,
        };
        let expected =
            std::fs::canonicalize(&path).map_err(|e| io("resolving the config file", e))?;
        let named = std::fs::read_link(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&file)
        ))
        .map_err(|e| io("reading which file the kept config fd is", e))?;
        if named != expected {
            return Err(SysfsError::Parse {
                bdf,
                op: "checking the kept config fd",
                path,
                content: format!("the fd is {}", named.display()),
            });
        }
        Self::with_file(bdf, file, path)
    }

    /// The open `config` file (to keep it across a restart).
    pub fn file(&self) -> &File {
        &self.file
    }

    fn with_file(bdf: Bdf, file: File, path: std::path::PathBuf) -> Result<Self, SysfsError> {
        let io = |op, source| SysfsError::Io {
            bdf,
            op,
            path: path.clone(),
            source,
        };
        let len = file
            .metadata()
            .map_err(|e| io("reading the config file's size", e))?
            .len();
        if len < MIN_CONFIG_SIZE {
            return Err(SysfsError::Parse {
                bdf,
                op: "reading the config file's size",
                path,
                content: format!("{len} bytes"),
            });
        }
        // Clamped to 4096, so the conversion cannot fail.
        let size = u16::try_from(len.min(u64::from(PCI_CFG_SPACE_EXP_SIZE)))
            .unwrap_or(PCI_CFG_SPACE_EXP_SIZE);
        Ok(Self { bdf, file, size })
    }
}

/// Maps an I/O error on the config file, treating ENODEV (the device was
/// removed) as [`BackendError::Gone`].
pub(super) fn config_error(op: &'static str, e: io::Error) -> BackendError {
    if e.raw_os_error() == Some(libc::ENODEV) {
        BackendError::Gone
    } else {
        BackendError::os(op, e)
    }
}

pub(super) fn short(done: usize, want: usize, offset: u16) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("{done} of {want} bytes at offset {offset:#x}"),
    )
}

impl ConfigSpace for SysfsConfig {
    fn bdf(&self) -> Bdf {
        self.bdf
    }

    fn config_size(&self) -> u16 {
        self.size
    }

    fn config_read(&mut self, offset: u16, width: Width) -> Result<u32, BackendError> {
        check_access(offset, width, self.size)?;
        let mut bytes = [0u8; 4];
        let len = usize::from(width.bytes());
        let n = self
            .file
            .read_at(&mut bytes[..len], u64::from(offset))
            .map_err(|e| config_error("sysfs config pread", e))?;
        if n != len {
            return Err(BackendError::os(
                "sysfs config pread",
                short(n, len, offset),
            ));
        }
        Ok(u32::from_le_bytes(bytes))
    }

    fn config_write(&mut self, offset: u16, width: Width, value: u32) -> Result<(), BackendError> {
        check_write(offset, width, self.size, value)?;
        let bytes = value.to_le_bytes();
        let len = usize::from(width.bytes());
        let n = self
            .file
            .write_at(&bytes[..len], u64::from(offset))
            .map_err(|e| config_error("sysfs config pwrite", e))?;
        if n != len {
            return Err(BackendError::os(
                "sysfs config pwrite",
                short(n, len, offset),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_config_fd_is_taken_only_for_its_own_device() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| unreachable!("{e}"));
        let sysfs = PciSysfs::with_root(dir.path());
        let bdfs = ["0000:01:00.0", "0000:02:00.0"].map(|b| {
            let bdf: Bdf = b.parse().unwrap_or_else(|_| unreachable!());
            let dev = sysfs.device_dir(bdf);
            std::fs::create_dir_all(&dev).unwrap_or_else(|e| unreachable!("{e}"));
            std::fs::write(dev.join("config"), [0u8; 256]).unwrap_or_else(|e| unreachable!("{e}"));
            bdf
        });
        let open = |bdf| {
            File::open(sysfs.device_dir(bdf).join("config")).unwrap_or_else(|e| unreachable!("{e}"))
        };
        assert!(SysfsConfig::from_file(&sysfs, bdfs[0], open(bdfs[0])).is_ok());
        let other = SysfsConfig::from_file(&sysfs, bdfs[0], open(bdfs[1]));
        assert!(
            matches!(&other, Err(SysfsError::Parse { content, .. }) if content.contains("0000:02:00.0")),
            "{other:?}"
        );
    }
}
