//! Unit tests of the VFIO backend's open path against a fake sysfs.

use super::fake_sysfs::fake::FakeSysfs;
use super::layout::DependentDevice;
use super::region::short;
use super::*;
use crate::error_chain;

fn bdf(s: &str) -> Bdf {
    s.parse().unwrap()
}

#[test]
fn preflight_names_a_missing_device() {
    let fake = FakeSysfs::new();
    let err = preflight(&fake.sysfs(), bdf("0000:0f:00.0")).unwrap_err();
    assert!(matches!(err, VfioError::DeviceNotFound { .. }), "{err:?}");
    let text = error_chain(&err);
    assert!(
        text.starts_with("0000:0f:00.0: no such PCI device"),
        "{text}"
    );
    assert!(text.contains("os error 2"), "{text}");
}

#[test]
fn preflight_names_the_driver_a_device_is_bound_to() {
    let fake = FakeSysfs::new();
    fake.device("0000:02:00.0", "0x00ff00", Some("uio_pci_generic"), Some(6));
    fake.device("0000:03:00.0", "0x00ff00", None, Some(8));
    let err = preflight(&fake.sysfs(), bdf("0000:02:00.0")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "0000:02:00.0: cannot open through VFIO: the device is bound to uio_pci_generic, not vfio-pci"
    );
    let err = preflight(&fake.sysfs(), bdf("0000:03:00.0")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "0000:03:00.0: cannot open through VFIO: the device is not bound to any driver (bind it to vfio-pci)"
    );
}

#[test]
fn preflight_without_an_iommu_group_is_no_iommu() {
    let fake = FakeSysfs::new();
    fake.device("0000:01:00.0", "0x00ff00", Some("vfio-pci"), None);
    let err = preflight(&fake.sysfs(), bdf("0000:01:00.0")).unwrap_err();
    assert!(matches!(err, VfioError::NoIommu { .. }), "{err:?}");
    assert!(
        err.to_string().contains("iommu_group does not exist"),
        "{err}"
    );
}

#[test]
fn preflight_names_the_device_that_makes_the_group_not_viable() {
    let fake = FakeSysfs::new();
    fake.device("0000:01:00.0", "0x020000", Some("vfio-pci"), Some(7));
    fake.device("0000:01:00.1", "0x020000", Some("e1000e"), Some(7));
    fake.device("0000:00:1c.0", "0x060400", Some("pcieport"), Some(7));
    let err = preflight(&fake.sysfs(), bdf("0000:01:00.0")).unwrap_err();
    match &err {
        VfioError::GroupNotViable {
            group, blockers, ..
        } => {
            assert_eq!(*group, 7);
            assert_eq!(blockers, &["0000:01:00.1 is bound to e1000e".to_owned()]);
        }
        other => panic!("{other:?}"),
    }
    assert!(
        err.to_string().starts_with(
            "0000:01:00.0: IOMMU group 7 is not viable: 0000:01:00.1 is bound to e1000e"
        ),
        "{err}"
    );
}

#[test]
fn preflight_accepts_a_viable_group() {
    let fake = FakeSysfs::new();
    fake.device("0000:01:00.0", "0x020000", Some("vfio-pci"), Some(7));
    fake.device("0000:01:00.1", "0x020000", None, Some(7));
    fake.device("0000:00:1c.0", "0x060400", Some("pcieport"), Some(7));
    assert_eq!(preflight(&fake.sysfs(), bdf("0000:01:00.0")).unwrap(), 7);
}

#[test]
fn setup_errors_keep_their_errno_and_are_told_apart() {
    use vfio_ioctls::VfioError as E;
    let b = bdf("0000:01:00.0");
    let os = io::Error::from_raw_os_error;

    let err = classify_setup_error(b, 5, E::OpenGroup(os(libc::EACCES), "5".into()));
    assert!(matches!(err, VfioError::NoPermission { .. }), "{err:?}");
    assert_eq!(
        error_chain(&err),
        format!(
            "0000:01:00.0: no permission to open /dev/vfio/5: {}",
            os(libc::EACCES)
        )
    );
    let source = std::error::Error::source(&err).unwrap();
    let source = source.downcast_ref::<io::Error>().unwrap();
    assert_eq!(source.raw_os_error(), Some(libc::EACCES));

    let err = classify_setup_error(b, 5, E::OpenContainer(os(libc::EACCES)));
    assert!(err.to_string().ends_with("open /dev/vfio/vfio"), "{err}");

    let err = classify_setup_error(b, 5, E::OpenGroup(os(libc::EBUSY), "5".into()));
    assert!(
        matches!(err, VfioError::GroupBusy { group: 5, .. }),
        "{err:?}"
    );

    let err = classify_setup_error(b, 5, E::OpenGroup(os(libc::ENOENT), "5".into()));
    assert!(matches!(err, VfioError::NoIommu { .. }), "{err:?}");

    let err = classify_setup_error(b, 5, E::GroupViable);
    assert!(
        err.to_string().contains("IOMMU group 5 is not viable"),
        "{err}"
    );

    let err = classify_setup_error(b, 5, E::OpenGroup(os(libc::EIO), "5".into()));
    assert!(matches!(err, VfioError::Setup { .. }), "{err:?}");
    assert!(error_chain(&err).contains(&os(libc::EIO).to_string()));
}

#[test]
fn hot_reset_refusal_lists_the_foreign_devices_and_groups() {
    let foreign = [
        DependentDevice {
            group: 9,
            bdf: Some(bdf("0000:02:00.1")),
        },
        DependentDevice {
            group: 7,
            bdf: Some(bdf("0000:02:00.2")),
        },
        DependentDevice {
            group: 9,
            bdf: None,
        },
    ];
    let err = hot_reset_not_owned(bdf("0000:02:00.0"), &foreign);
    assert_eq!(
        err.to_string(),
        "0000:02:00.0: a hot reset would also reset devices in IOMMU groups this process \
         does not own: 0000:02:00.1 (group 9), 0000:02:00.2 (group 7), a device in group 9"
    );
    match err {
        VfioError::HotResetNotOwned { groups, .. } => assert_eq!(groups, vec![7, 9]),
        other => panic!("{other:?}"),
    }
    // Through the backend error the engine sees, the text survives.
    let backend = BackendError::os(
        "VFIO_DEVICE_PCI_HOT_RESET",
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            hot_reset_not_owned(bdf("0000:02:00.0"), &foreign[..1]),
        ),
    );
    assert!(!backend.is_transient());
    assert_eq!(
        error_chain(&backend),
        "VFIO_DEVICE_PCI_HOT_RESET failed: 0000:02:00.0: a hot reset would also reset \
         devices in IOMMU groups this process does not own: 0000:02:00.1 (group 9)"
    );
}

#[test]
fn region_and_irq_errors_name_device_and_operation() {
    let err = VfioError::RegionIo {
        bdf: bdf("0000:01:00.0"),
        op: "write",
        index: 0,
        offset: 0x60,
        len: 4,
        source: io::Error::from_raw_os_error(libc::EIO),
    };
    assert!(err
        .to_string()
        .starts_with("0000:01:00.0: 4-byte write at 0x60 of region 0 failed"));
    let err = VfioError::IrqNotSupported {
        bdf: bdf("0000:01:00.0"),
        irq: "ERR",
    };
    assert_eq!(
        err.to_string(),
        "0000:01:00.0: the device has no ERR interrupt (VFIO_DEVICE_GET_IRQ_INFO reports count 0)"
    );
}

#[test]
fn no_open_group_file_is_not_found() {
    // No test process holds a VFIO group open.
    let err = own_group_fd(4_000_000).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::NotFound);
}

#[test]
fn short_transfers_are_errors_that_say_so() {
    let e = short(2, 4);
    assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    assert_eq!(e.to_string(), "short transfer: 2 of 4 bytes");
}
