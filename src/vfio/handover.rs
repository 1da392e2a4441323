//! Device fds handed over by another process: what they are, and which PCI
//! function they reach.
//!
//! A VMM that opened a device through VFIO (container, group, device fd)
//! can hand the device fd to the daemon with `SCM_RIGHTS` and keep the rest.
//! Everything the daemon does then goes through that fd, so it always
//! drives the right hardware; the address matters for what the daemon
//! reports and for the operator's `reset BDF`. The kernel gives no ioctl
//! for a device fd's address, so the evidence is taken in this order:
//!
//! 1. fdinfo: Linux 6.18 and later print `vfio-device-syspath: /sys/devices/…/<address>`
//!    in `/proc/<pid>/fdinfo/<fd>` — the kernel's own word.
//! 2. The hot-reset scope: `VFIO_DEVICE_GET_PCI_HOT_RESET_INFO` lists every
//!    device a slot or bus reset of the fd's device would reach, itself
//!    included; a claimed address outside the list is refused, and a list
//!    of one device names it.
//! 3. The config header (IDs, class, revision, subsystem) read through the
//!    fd must match the claimed device's, read through sysfs; if no other
//!    vfio-bound device (in the scope, where there is one) has the same
//!    header, the claim is the only one possible.
//!
//! A claim that contradicts any of these is refused. One that is consistent
//! but not proven (several identical vfio-bound devices, no fdinfo, no
//! hot-reset scope) is accepted and reported as such.

use std::fmt;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;

use vfio_bindings::bindings::vfio::VFIO_PCI_HOT_RESET_FLAG_DEV_ID;

use super::{VfioBackend, VfioError};
use crate::backend::ConfigSpace;
use crate::pci::sysfs::{PciSysfs, SysfsConfig};
use crate::pci::{Bdf, Width};

/// What `/proc/self/fd/N` reads for a device fd from a group
/// (`VFIO_GROUP_GET_DEVICE_FD`).
const ANON_DEVICE: &str = "anon_inode:[vfio-device]";
/// Where the per-device character devices (Linux 6.2+, iommufd) live.
const CDEV_DIR: &str = "/dev/vfio/devices/";
/// The fdinfo key Linux 6.18 added for VFIO device fds.
const FDINFO_SYSPATH: &str = "vfio-device-syspath:";

/// Config-header dwords compared between the fd and sysfs: vendor and
/// device ID (0x00), revision and class (0x08), subsystem (0x2c).
const HEADER_DWORDS: [u16; 3] = [0x00, 0x08, 0x2c];

/// How a handed-over device fd was matched to its PCI address, strongest
/// first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(
    feature = "daemon",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "kebab-case")
)]
pub enum DeviceIdentity {
    /// The kernel names the fd's device (fdinfo `vfio-device-syspath`).
    Fdinfo,
    /// The device is the only one in the fd's hot-reset scope.
    HotResetScope,
    /// The fd's config header matches the device's, and no other
    /// vfio-bound device has the same header.
    UniqueHeader,
    /// The fd's config header matches the device's, but `others` more
    /// vfio-bound devices have the same header: consistent, not proven.
    SharedHeader {
        /// How many other devices could be the fd's.
        others: usize,
    },
}

impl DeviceIdentity {
    /// Whether the evidence rules out every other device.
    pub fn proven(&self) -> bool {
        !matches!(self, DeviceIdentity::SharedHeader { .. })
    }
}

impl fmt::Display for DeviceIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceIdentity::Fdinfo => {
                f.write_str("named by the kernel (fdinfo vfio-device-syspath)")
            }
            DeviceIdentity::HotResetScope => {
                f.write_str("the only device in the fd's hot-reset scope")
            }
            DeviceIdentity::UniqueHeader => {
                f.write_str("the only vfio-bound device with the fd's config header")
            }
            DeviceIdentity::SharedHeader { others } => write!(
                f,
                "consistent with the fd's config header, which {others} other vfio-bound \
                 device(s) share (not proven)"
            ),
        }
    }
}

/// Checks that `fd` is a VFIO device fd: one from a group
/// (`anon_inode:[vfio-device]`) or an opened `/dev/vfio/devices/vfioN`.
pub fn check_device_fd(fd: BorrowedFd<'_>) -> Result<(), VfioError> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    match link {
        Ok(target) if is_device_fd_target(&target) => Ok(()),
        Ok(target) => Err(VfioError::NotADeviceFd {
            what: target.display().to_string(),
        }),
        Err(e) => Err(VfioError::NotADeviceFd {
            what: format!("unreadable in /proc/self/fd: {e}"),
        }),
    }
}

fn is_device_fd_target(target: &Path) -> bool {
    target == Path::new(ANON_DEVICE) || target.starts_with(CDEV_DIR)
}

/// The address the kernel gives for a device fd in its fdinfo, if this
/// kernel gives one (Linux 6.18+). A fdinfo that names a device that is not
/// a PCI function is an error.
pub fn fdinfo_device(fd: BorrowedFd<'_>) -> Result<Option<Bdf>, VfioError> {
    let path = format!("/proc/self/fdinfo/{}", fd.as_raw_fd());
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) => {
            // fdinfo of one's own open fd is always readable; if it is not,
            // the kernel just says nothing and the other evidence decides.
            tracing::debug!(%path, error = %e, "reading fdinfo failed");
            return Ok(None);
        }
    };
    match fdinfo_syspath(&text) {
        None => Ok(None),
        Some(syspath) => match syspath_bdf(syspath) {
            Some(bdf) => Ok(Some(bdf)),
            None => Err(VfioError::NotADeviceFd {
                what: format!("a VFIO device that is not a PCI function ({syspath})"),
            }),
        },
    }
}

/// The value of fdinfo's `vfio-device-syspath:` line.
fn fdinfo_syspath(fdinfo: &str) -> Option<&str> {
    fdinfo
        .lines()
        .find_map(|l| l.strip_prefix(FDINFO_SYSPATH))
        .map(str::trim)
}

/// The PCI address that a sysfs device path ends in.
fn syspath_bdf(syspath: &str) -> Option<Bdf> {
    Path::new(syspath).file_name()?.to_str()?.parse().ok()
}

/// Matches a handed-over backend's fd to the address it was opened as
/// (`backend.bdf()`, the claim) when the kernel's fdinfo does not name it.
pub(super) fn identify(
    sysfs: &PciSysfs,
    backend: &mut VfioBackend,
) -> Result<DeviceIdentity, VfioError> {
    let claimed = backend.bdf;
    let not_it = |evidence: String| VfioError::NotThisDevice { claimed, evidence };
    match sysfs.driver(claimed)? {
        Some(driver) if driver.contains("vfio") => {}
        Some(driver) => {
            return Err(not_it(format!(
                "{claimed} is bound to {driver}, so no VFIO device fd reaches it"
            )))
        }
        None => {
            return Err(not_it(format!(
                "{claimed} is bound to no driver, so no VFIO device fd reaches it"
            )))
        }
    }
    let header = header(backend)?;
    let claimed_header = sysfs_header(sysfs, claimed)?;
    if header != claimed_header {
        return Err(not_it(format!(
            "its config header {} differs from {claimed}'s {}",
            show_header(&header),
            show_header(&claimed_header)
        )));
    }
    let scope = match super::hot_reset_info(backend.device.fd()) {
        Ok(info) if info.flags() & VFIO_PCI_HOT_RESET_FLAG_DEV_ID == 0 => Some(
            info.devices()
                .iter()
                .filter_map(|d| d.bdf)
                .collect::<Vec<_>>(),
        ),
        // ENODEV (no slot or bus reset) or device ids (iommufd): no scope.
        Ok(_) | Err(_) => None,
    };
    let mut twins = Vec::new();
    for bdf in sysfs.devices()? {
        if bdf == claimed || scope.as_ref().is_some_and(|s| !s.contains(&bdf)) {
            continue;
        }
        let vfio_bound = sysfs
            .driver(bdf)
            .ok()
            .flatten()
            .is_some_and(|d| d.contains("vfio"));
        if vfio_bound && sysfs_header(sysfs, bdf).is_ok_and(|h| h == header) {
            twins.push(bdf);
        }
    }
    decide(claimed, scope.as_deref(), &twins).map_err(not_it)
}

/// The decision of [`identify`] once the facts are in: `scope` is the
/// fd's hot-reset scope if the kernel gave one, `twins` the other
/// vfio-bound devices (within the scope) with the fd's config header.
/// `Err` is the evidence against the claim.
fn decide(claimed: Bdf, scope: Option<&[Bdf]>, twins: &[Bdf]) -> Result<DeviceIdentity, String> {
    if let Some(scope) = scope {
        if !scope.contains(&claimed) {
            let list: Vec<String> = scope.iter().map(Bdf::to_string).collect();
            return Err(format!(
                "the kernel's hot-reset scope of the fd is [{}], which does not include it",
                list.join(", ")
            ));
        }
        if scope.len() == 1 {
            return Ok(DeviceIdentity::HotResetScope);
        }
    }
    Ok(match twins.len() {
        0 => DeviceIdentity::UniqueHeader,
        others => DeviceIdentity::SharedHeader { others },
    })
}

fn show_header(h: &[u32; 3]) -> String {
    format!(
        "{:04x}:{:04x} class {:06x} rev {:02x} subsystem {:04x}:{:04x}",
        h[0] & 0xffff,
        h[0] >> 16,
        h[1] >> 8,
        h[1] & 0xff,
        h[2] & 0xffff,
        h[2] >> 16
    )
}

/// The header dwords of a config space: the handed-over fd's (through the
/// backend) or a device's sysfs `config` file.
fn header(config: &mut impl ConfigSpace) -> Result<[u32; 3], VfioError> {
    let bdf = config.bdf();
    let mut out = [0u32; 3];
    for (word, offset) in out.iter_mut().zip(HEADER_DWORDS) {
        *word = config
            .config_read(offset, Width::Dword)
            .map_err(|source| VfioError::Config {
                bdf,
                op: "reading the config header",
                source,
            })?;
    }
    Ok(out)
}

/// The header dwords of `bdf` through its sysfs `config` file (the part
/// anyone may read).
fn sysfs_header(sysfs: &PciSysfs, bdf: Bdf) -> Result<[u32; 3], VfioError> {
    header(&mut SysfsConfig::open_read_only(sysfs, bdf)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bdf(s: &str) -> Bdf {
        s.parse().unwrap()
    }

    #[test]
    fn fdinfo_names_the_device_on_kernels_that_print_its_syspath() {
        let text = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\n\
                    vfio-device-syspath: /sys/devices/pci0000:e0/0000:e0:01.1/0000:e1:00.0/0000:e8:00.0\n";
        let path = fdinfo_syspath(text).unwrap();
        assert_eq!(syspath_bdf(path), Some(bdf("0000:e8:00.0")));
        // Older kernels print no such line.
        assert_eq!(
            fdinfo_syspath("pos:\t0\nflags:\t02000002\nmnt_id:\t15\n"),
            None
        );
        // A platform device's path does not end in a PCI address.
        assert_eq!(syspath_bdf("/sys/devices/platform/fff51000.ethernet"), None);
    }

    #[test]
    fn device_fd_targets_are_the_anon_inode_and_the_vfio_cdevs() {
        assert!(is_device_fd_target(Path::new("anon_inode:[vfio-device]")));
        assert!(is_device_fd_target(Path::new("/dev/vfio/devices/vfio0")));
        assert!(!is_device_fd_target(Path::new("/dev/vfio/7")));
        assert!(!is_device_fd_target(Path::new("anon_inode:[eventfd]")));
        assert!(!is_device_fd_target(Path::new("pipe:[1234]")));
    }

    #[test]
    fn a_hot_reset_scope_of_one_device_proves_the_claim() {
        let a = bdf("0000:01:00.0");
        assert_eq!(
            decide(a, Some(&[a]), &[]),
            Ok(DeviceIdentity::HotResetScope)
        );
    }

    #[test]
    fn a_claim_outside_the_hot_reset_scope_is_refused_naming_the_scope() {
        let err = decide(
            bdf("0000:01:00.0"),
            Some(&[bdf("0000:02:00.0"), bdf("0000:02:00.1")]),
            &[],
        )
        .unwrap_err();
        assert_eq!(
            err,
            "the kernel's hot-reset scope of the fd is [0000:02:00.0, 0000:02:00.1], which \
             does not include it"
        );
    }

    #[test]
    fn without_a_scope_the_header_decides_and_twins_leave_it_unproven() {
        let a = bdf("0000:00:11.0");
        let unique = decide(a, None, &[]).unwrap();
        assert_eq!(unique, DeviceIdentity::UniqueHeader);
        assert!(unique.proven());
        let shared = decide(a, None, &[bdf("0000:00:12.0"), bdf("0000:00:13.0")]).unwrap();
        assert_eq!(shared, DeviceIdentity::SharedHeader { others: 2 });
        assert!(!shared.proven());
        assert!(shared.to_string().contains("2 other vfio-bound device(s)"));
        // A multi-device scope that includes the claim falls back to the
        // header within the scope.
        let b = bdf("0000:00:11.1");
        assert_eq!(
            decide(a, Some(&[a, b]), &[b]),
            Ok(DeviceIdentity::SharedHeader { others: 1 })
        );
    }

    #[test]
    fn a_pipe_is_not_a_device_fd() {
        use std::os::fd::AsFd;
        let (r, _w) = nix::unistd::pipe().unwrap();
        let err = check_device_fd(r.as_fd()).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("the descriptor handed over is not a VFIO device fd (it is pipe:["),
            "{err}"
        );
        // And it has no fdinfo syspath.
        assert_eq!(fdinfo_device(r.as_fd()).unwrap(), None);
    }
}
