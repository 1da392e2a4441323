//! The unsafe edge of the KVM module: anonymous guest memory and its
//! registration with KVM.

use std::io;
use std::ptr::NonNull;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;

/// Page-aligned anonymous memory that backs guest RAM.
pub(crate) struct GuestMemory {
    addr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is owned exclusively by this value; the pointer is
// only dereferenced through `&self`/`&mut self` methods that bound-check.
unsafe impl Send for GuestMemory {}
// SAFETY: shared access only reads through `&self` (no interior mutability
// is exposed); writes need `&mut self`.
unsafe impl Sync for GuestMemory {}

impl GuestMemory {
    /// Maps `len` bytes of zeroed, private, anonymous memory.
    pub(crate) fn new(len: usize) -> io::Result<Self> {
        // SAFETY: a fresh anonymous mapping with no address hint touches no
        // existing memory; the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let addr =
            NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Self { addr, len })
    }

    /// Copies `bytes` to guest-physical offset `offset`.
    pub(crate) fn write(&mut self, offset: usize, bytes: &[u8]) -> io::Result<()> {
        let end = offset
            .checked_add(bytes.len())
            .filter(|end| *end <= self.len)
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "write beyond guest memory")
            })?;
        // SAFETY: `offset..end` lies inside the mapping (checked above) and
        // `&mut self` guarantees no other reference into it from this side.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.addr.as_ptr().add(offset),
                end - offset,
            );
        }
        Ok(())
    }

    /// Registers the memory as guest RAM at guest-physical 0 in `slot`.
    pub(crate) fn register(&self, vm: &VmFd, slot: u32) -> io::Result<()> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: self.len as u64,
            userspace_addr: self.addr.as_ptr() as u64,
        };
        // SAFETY: the region describes this live mapping, which outlives the
        // VM as long as the owner keeps `self` alive longer than `vm` (the
        // test VM drops the VM first).
        unsafe { vm.set_user_memory_region(region) }.map_err(io::Error::from)
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: `addr`/`len` are exactly the mapping created in `new`, and
        // no reference into it outlives `self`.
        unsafe {
            libc::munmap(self.addr.as_ptr().cast(), self.len);
        }
    }
}

/// Maps guest RAM (at guest-physical 0) into a VFIO container's IOMMU
/// space, as any VMM does for an assigned device's DMA.
pub(crate) fn dma_map(
    mem: &GuestMemory,
    container: &vfio_ioctls::VfioContainer,
) -> Result<(), vfio_ioctls::VfioError> {
    // SAFETY: the mapping is live and stays so until `dma_unmap` (the test
    // VM unmaps before it frees the memory); the crate holds no Rust
    // references into guest memory while the VM runs (it is written only
    // before the vCPU starts).
    unsafe { container.vfio_dma_map(0, mem.len, mem.addr.as_ptr()) }
}

/// Undoes [`dma_map`].
pub(crate) fn dma_unmap(
    mem: &GuestMemory,
    container: &vfio_ioctls::VfioContainer,
) -> Result<(), vfio_ioctls::VfioError> {
    container.vfio_dma_unmap(0, mem.len)
}

/// The PIC state inside a `kvm_irqchip` filled by `KVM_GET_IRQCHIP` for
/// chip 0 or 1.
pub(crate) fn pic_of(chip: &kvm_bindings::kvm_irqchip) -> kvm_bindings::kvm_pic_state {
    // SAFETY: for chip ids 0 and 1 (the PICs) KVM fills the `pic` member of
    // the union; every bit pattern is a valid `kvm_pic_state` (plain u8
    // fields), so reading it is sound even if KVM wrote less.
    unsafe { chip.chip.pic }
}
