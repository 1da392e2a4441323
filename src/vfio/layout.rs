//! Safe builders and parsers for the variable-length VFIO ioctl arguments.
//!
//! Each argument is a C struct with a flexible array at its end. They are
//! built in a `Vec<u32>`: 4-byte aligned like the structs, every field a
//! whole number of words, and the length checked against `argsz` before
//! [`super::sys`] hands the buffer to the kernel.

use std::mem::size_of;
use std::os::fd::RawFd;

use vfio_bindings::bindings::vfio::{
    vfio_irq_set, vfio_pci_dependent_device, vfio_pci_hot_reset, vfio_pci_hot_reset_info,
    VFIO_IRQ_SET_ACTION_MASK, VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_ACTION_UNMASK,
    VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE,
};

use crate::pci::Bdf;

const WORD: usize = size_of::<u32>();
/// Words in the fixed part of `struct vfio_irq_set`.
const IRQ_SET_HEADER_WORDS: usize = size_of::<vfio_irq_set>() / WORD;
/// Words in the fixed part of `struct vfio_pci_hot_reset_info`.
const HOT_RESET_INFO_HEADER_WORDS: usize = size_of::<vfio_pci_hot_reset_info>() / WORD;
/// Words per `struct vfio_pci_dependent_device`.
const DEPENDENT_DEVICE_WORDS: usize = size_of::<vfio_pci_dependent_device>() / WORD;
/// Words in the fixed part of `struct vfio_pci_hot_reset`.
const HOT_RESET_HEADER_WORDS: usize = size_of::<vfio_pci_hot_reset>() / WORD;

// The layouts below rely on these sizes (checked by the bindings too).
const _: () = assert!(size_of::<vfio_irq_set>() == 20);
const _: () = assert!(size_of::<vfio_pci_hot_reset_info>() == 12);
const _: () = assert!(size_of::<vfio_pci_dependent_device>() == 8);
const _: () = assert!(size_of::<vfio_pci_hot_reset>() == 12);

fn bytes(words: usize) -> u32 {
    // The buffers here hold a handful of words.
    (words * WORD) as u32
}

/// What a `VFIO_DEVICE_SET_IRQS` call does to an IRQ index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum IrqAction {
    /// `ACTION_TRIGGER`: set (or with `-1` remove) the eventfd the kernel
    /// signals.
    Trigger,
    /// `ACTION_MASK`.
    Mask,
    /// `ACTION_UNMASK`: unmask now (`DATA_NONE`) or set the eventfd whose
    /// signal unmasks (`DATA_EVENTFD`).
    Unmask,
}

impl IrqAction {
    fn flag(self) -> u32 {
        match self {
            IrqAction::Trigger => VFIO_IRQ_SET_ACTION_TRIGGER,
            IrqAction::Mask => VFIO_IRQ_SET_ACTION_MASK,
            IrqAction::Unmask => VFIO_IRQ_SET_ACTION_UNMASK,
        }
    }
}

/// A `struct vfio_irq_set` with its data, ready for `VFIO_DEVICE_SET_IRQS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct IrqSet(Vec<u32>);

impl IrqSet {
    /// `DATA_NONE` for `count` vectors from 0: with `count = 1`, mask, unmask
    /// or (loopback) trigger; with `Trigger` and `count = 0`, disable the
    /// whole index.
    pub(super) fn none(index: u32, action: IrqAction, count: u32) -> Self {
        Self::build(index, VFIO_IRQ_SET_DATA_NONE | action.flag(), count, &[])
    }

    /// `DATA_EVENTFD` for vectors `0..fds.len()`; `-1` removes a vector's
    /// eventfd.
    pub(super) fn eventfds(index: u32, action: IrqAction, fds: &[RawFd]) -> Self {
        // The kernel's field is an s32 array; `as u32` keeps the bits of -1.
        let data: Vec<u32> = fds.iter().map(|&fd| fd as u32).collect();
        let count = data.len() as u32;
        Self::build(
            index,
            VFIO_IRQ_SET_DATA_EVENTFD | action.flag(),
            count,
            &data,
        )
    }

    fn build(index: u32, flags: u32, count: u32, data: &[u32]) -> Self {
        let words = IRQ_SET_HEADER_WORDS + data.len();
        let mut buf = Vec::with_capacity(words);
        // argsz, flags, index, start, count: the field order of the struct.
        buf.extend_from_slice(&[bytes(words), flags, index, 0, count]);
        buf.extend_from_slice(data);
        Self(buf)
    }

    /// The buffer to pass to the kernel.
    pub(super) fn words(&self) -> &[u32] {
        &self.0
    }
}

/// One device a hot reset would affect, as `GET_PCI_HOT_RESET_INFO` lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct DependentDevice {
    /// Its IOMMU group.
    pub(super) group: u32,
    /// Its address, if the kernel's numbers form a valid one.
    pub(super) bdf: Option<Bdf>,
}

/// A `struct vfio_pci_hot_reset_info` buffer with room for `capacity`
/// devices.
#[derive(Debug, Clone)]
pub(super) struct HotResetInfo(Vec<u32>);

impl HotResetInfo {
    pub(super) fn with_capacity(capacity: usize) -> Self {
        let words = HOT_RESET_INFO_HEADER_WORDS + capacity * DEPENDENT_DEVICE_WORDS;
        let mut buf = vec![0; words];
        buf[0] = bytes(words);
        Self(buf)
    }

    /// The buffer for the kernel to fill.
    pub(super) fn words_mut(&mut self) -> &mut [u32] {
        &mut self.0
    }

    /// The `flags` the kernel returned.
    pub(super) fn flags(&self) -> u32 {
        self.0[1]
    }

    /// The `count` the kernel returned: devices listed, or after ENOSPC the
    /// number the buffer must hold.
    pub(super) fn count(&self) -> usize {
        self.0[2] as usize
    }

    /// The listed devices, at most as many as the buffer holds.
    pub(super) fn devices(&self) -> Vec<DependentDevice> {
        self.0[HOT_RESET_INFO_HEADER_WORDS..]
            .chunks_exact(DEPENDENT_DEVICE_WORDS)
            .take(self.count())
            .map(|d| {
                // Word 0: group_id (or devid). Word 1, in memory order:
                // segment (u16), bus (u8), devfn (u8).
                let [s0, s1, bus, devfn] = d[1].to_ne_bytes();
                let segment = u16::from_ne_bytes([s0, s1]);
                DependentDevice {
                    group: d[0],
                    bdf: Bdf::new(segment, bus, devfn >> 3, devfn & 7).ok(),
                }
            })
            .collect()
    }

    /// Test helper: a buffer as the kernel would fill it.
    #[cfg(test)]
    fn filled(flags: u32, devices: &[(u32, u16, u8, u8)]) -> Self {
        let mut info = Self::with_capacity(devices.len());
        info.0[1] = flags;
        info.0[2] = devices.len() as u32;
        for (i, &(group, segment, bus, devfn)) in devices.iter().enumerate() {
            let at = HOT_RESET_INFO_HEADER_WORDS + i * DEPENDENT_DEVICE_WORDS;
            let [s0, s1] = segment.to_ne_bytes();
            info.0[at] = group;
            info.0[at + 1] = u32::from_ne_bytes([s0, s1, bus, devfn]);
        }
        info
    }
}

/// A `struct vfio_pci_hot_reset` naming `group_fds` as the groups the caller
/// owns.
pub(super) fn hot_reset(group_fds: &[RawFd]) -> Vec<u32> {
    let words = HOT_RESET_HEADER_WORDS + group_fds.len();
    let mut buf = Vec::with_capacity(words);
    // argsz, flags (none), count, then the s32 group fds.
    buf.extend_from_slice(&[bytes(words), 0, group_fds.len() as u32]);
    buf.extend(group_fds.iter().map(|&fd| fd as u32));
    buf
}

/// The devices of a hot reset whose group is not `own_group`.
pub(super) fn foreign_devices(devices: &[DependentDevice], own_group: u32) -> Vec<DependentDevice> {
    devices
        .iter()
        .filter(|d| d.group != own_group)
        .copied()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vfio_bindings::bindings::vfio::{VFIO_PCI_INTX_IRQ_INDEX, VFIO_PCI_REQ_IRQ_INDEX};

    #[test]
    fn irq_set_with_one_eventfd_matches_the_kernel_struct() {
        let set = IrqSet::eventfds(VFIO_PCI_INTX_IRQ_INDEX, IrqAction::Trigger, &[7]);
        assert_eq!(
            set.words(),
            &[
                24,
                VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                0,
                0,
                1,
                7
            ]
        );
    }

    #[test]
    fn removing_an_eventfd_passes_minus_one() {
        let set = IrqSet::eventfds(VFIO_PCI_REQ_IRQ_INDEX, IrqAction::Trigger, &[-1]);
        assert_eq!(set.words()[2], VFIO_PCI_REQ_IRQ_INDEX);
        assert_eq!(set.words()[5] as i32, -1);
        assert_eq!(set.words()[0], 24);
    }

    #[test]
    fn data_none_sets_have_no_data_and_carry_the_count() {
        let unmask = IrqSet::none(VFIO_PCI_INTX_IRQ_INDEX, IrqAction::Unmask, 1);
        assert_eq!(
            unmask.words(),
            &[
                20,
                VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK,
                0,
                0,
                1
            ]
        );
        let mask = IrqSet::none(VFIO_PCI_INTX_IRQ_INDEX, IrqAction::Mask, 1);
        assert_eq!(
            mask.words()[1],
            VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_MASK
        );
        let disable = IrqSet::none(VFIO_PCI_INTX_IRQ_INDEX, IrqAction::Trigger, 0);
        assert_eq!(
            disable.words(),
            &[
                20,
                VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
                0,
                0,
                0
            ]
        );
    }

    #[test]
    fn several_eventfds_follow_the_header_in_order() {
        let set = IrqSet::eventfds(2, IrqAction::Trigger, &[3, 4, 5]);
        assert_eq!(set.words()[0], 32);
        assert_eq!(set.words()[4], 3);
        assert_eq!(&set.words()[5..], &[3, 4, 5]);
    }

    #[test]
    fn hot_reset_info_is_sized_for_its_capacity_and_parses_devices() {
        let empty = HotResetInfo::with_capacity(0);
        assert_eq!(empty.0, vec![12, 0, 0]);
        let info = HotResetInfo::filled(0, &[(5, 0, 1, 0), (9, 0x0001, 0x02, (3 << 3) | 1)]);
        assert_eq!(info.0[0], 12 + 16);
        let devices = info.devices();
        assert_eq!(devices.len(), 2);
        assert_eq!(devices[0].group, 5);
        assert_eq!(devices[0].bdf.unwrap().to_string(), "0000:01:00.0");
        assert_eq!(devices[1].group, 9);
        assert_eq!(devices[1].bdf.unwrap().to_string(), "0001:02:03.1");
    }

    #[test]
    fn a_count_larger_than_the_buffer_lists_only_what_fits() {
        let mut info = HotResetInfo::with_capacity(1);
        info.0[2] = 3;
        assert_eq!(info.count(), 3);
        assert_eq!(info.devices().len(), 1);
    }

    #[test]
    fn hot_reset_argument_lists_the_group_fds() {
        assert_eq!(hot_reset(&[11]), vec![16, 0, 1, 11]);
        assert_eq!(hot_reset(&[11, 12]), vec![20, 0, 2, 11, 12]);
    }

    #[test]
    fn devices_in_other_groups_are_foreign() {
        let info = HotResetInfo::filled(0, &[(5, 0, 1, 0), (7, 0, 1, 1), (5, 0, 1, 2)]);
        let foreign = foreign_devices(&info.devices(), 5);
        assert_eq!(foreign.len(), 1);
        assert_eq!(foreign[0].group, 7);
        assert!(foreign_devices(&info.devices(), 5)
            .iter()
            .all(|d| d.group != 5));
        assert!(foreign_devices(&HotResetInfo::filled(0, &[(5, 0, 1, 0)]).devices(), 5).is_empty());
    }
}
