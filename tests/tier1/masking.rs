//! PCI 2.3 check-and-mask / check-and-unmask and the masking probe.

use proptest::prelude::*;
use vfio_intx::backend::{BackendError, ConfigSpace};
use vfio_intx::pci::intx::{
    check_and_mask, check_and_unmask, probe_masking, read_command_status, MaskingReason,
};
use vfio_intx::pci::regs::*;
use vfio_intx::pci::Width;
use vfio_intx::sim::{Fault, SimDevice, SimOp};

fn command(dev: &mut impl ConfigSpace) -> u16 {
    read_command_status(dev).unwrap().command
}

#[test]
fn check_and_mask_reports_not_mine_and_changes_nothing_when_not_asserting() {
    let sim = SimDevice::builder().build();
    let mut b = sim.backend();
    b.config_write(PCI_COMMAND, Width::Word, 0x0006).unwrap();
    let writes = sim.calls(SimOp::ConfigWrite);
    assert!(!check_and_mask(&mut b).unwrap());
    assert_eq!(command(&mut b), 0x0006);
    assert_eq!(
        sim.calls(SimOp::ConfigWrite),
        writes,
        "no write on 'not mine'"
    );
}

#[test]
fn check_and_mask_masks_an_asserting_device_with_one_dword_read_and_one_word_write() {
    let sim = SimDevice::builder().build();
    let mut b = sim.backend();
    b.config_write(PCI_COMMAND, Width::Word, 0x0006).unwrap();
    sim.raise();
    let (reads, writes) = (sim.calls(SimOp::ConfigRead), sim.calls(SimOp::ConfigWrite));
    assert!(check_and_mask(&mut b).unwrap());
    assert_eq!(sim.calls(SimOp::ConfigRead) - reads, 1);
    assert_eq!(sim.calls(SimOp::ConfigWrite) - writes, 1);
    let cs = read_command_status(&mut b).unwrap();
    assert_eq!(cs.command, 0x0006 | COMMAND_INTX_DISABLE);
    assert!(
        cs.asserting(),
        "STATUS.INTERRUPT stays visible while masked"
    );
}

#[test]
fn check_and_unmask_stays_masked_while_the_device_still_asserts() {
    let sim = SimDevice::builder().build();
    let mut b = sim.backend();
    sim.raise();
    assert!(check_and_mask(&mut b).unwrap());
    assert!(!check_and_unmask(&mut b).unwrap());
    assert!(read_command_status(&mut b).unwrap().masked());
    assert!(sim.ack());
    assert!(check_and_unmask(&mut b).unwrap());
    assert!(!read_command_status(&mut b).unwrap().masked());
}

#[test]
fn all_ones_command_status_is_an_error_not_an_assertion() {
    let sim = SimDevice::builder().build();
    let mut b = sim.backend();
    sim.inject_fault(SimOp::ConfigRead, Fault::AllOnes, 0, 1);
    assert!(matches!(
        check_and_mask(&mut b),
        Err(BackendError::NotResponding)
    ));
}

proptest! {
    /// check-and-set against a reference of the kernel function, for every
    /// starting COMMAND, line level and direction.
    #[test]
    fn check_and_set_matches_the_kernel_reference(start in any::<u16>(), asserting: bool, mask: bool) {
        let sim = SimDevice::builder().build();
        let mut b = sim.backend();
        b.config_write(PCI_COMMAND, Width::Word, u32::from(start)).unwrap();
        if asserting { sim.raise(); }
        let before = command(&mut b);
        let got = vfio_intx::pci::intx::check_and_set_intx_mask(&mut b, mask).unwrap();
        let after = command(&mut b);
        // Reference: pci_check_and_set_intx_mask.
        let expected_ret = asserting == mask;
        let expected_cmd = if !expected_ret {
            before
        } else if mask {
            before | COMMAND_INTX_DISABLE
        } else {
            before & !COMMAND_INTX_DISABLE
        };
        prop_assert_eq!(got, expected_ret);
        prop_assert_eq!(after, expected_cmd);
        prop_assert_eq!(sim.snapshot().asserting, asserting);
    }
}

#[test]
fn probe_finds_working_masking_and_restores_command_exactly() {
    for start in [0x0000u16, 0x0006, 0x0406, 0x0547] {
        let sim = SimDevice::builder().build();
        let mut b = sim.backend();
        b.config_write(PCI_COMMAND, Width::Word, u32::from(start))
            .unwrap();
        let support = probe_masking(&mut b).unwrap();
        assert_eq!(support.reason, MaskingReason::ToggleWorks, "{support}");
        assert!(support.supported());
        assert_eq!(command(&mut b), start);
        assert!(support.to_string().contains("can be shared"));
    }
}

#[test]
fn probe_detects_a_bit_that_does_not_stick() {
    let sim = SimDevice::builder().broken_masking(true).build();
    let mut b = sim.backend();
    b.config_write(PCI_COMMAND, Width::Word, 0x0002).unwrap();
    let support = probe_masking(&mut b).unwrap();
    assert!(!support.supported());
    assert!(matches!(
        support.reason,
        MaskingReason::BitDoesNotStick {
            original: 0x0002,
            written: 0x0402,
            read_back: 0x0002
        }
    ));
    assert!(support.to_string().contains("must be exclusive"));
    assert_eq!(command(&mut b), 0x0002);
}

#[test]
fn probe_applies_the_kernel_quirk_table_and_the_interrupt_pin() {
    let sim = SimDevice::builder().ids(0x10ec, 0x8169).build();
    let support = probe_masking(&mut sim.backend()).unwrap();
    assert!(matches!(support.reason, MaskingReason::Quirk(q) if q.name.contains("8169")));
    assert!(!support.supported());

    let sim = SimDevice::builder().interrupt_pin(0).build();
    let support = probe_masking(&mut sim.backend()).unwrap();
    assert_eq!(support.reason, MaskingReason::NoInterruptPin);
}

#[test]
fn probe_restores_command_when_the_read_back_fails() {
    let sim = SimDevice::builder().build();
    let mut b = sim.backend();
    b.config_write(PCI_COMMAND, Width::Word, 0x0006).unwrap();
    // Reads: vendor, device, pin, COMMAND, then the read-back fails.
    sim.inject_fault(SimOp::ConfigRead, Fault::Eio, 4, 1);
    let err = probe_masking(&mut b).unwrap_err();
    assert!(matches!(err, BackendError::Os { .. }), "{err}");
    assert_eq!(
        command(&mut b),
        0x0006,
        "COMMAND restored after the failure"
    );
}
