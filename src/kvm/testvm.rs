//! A tiny KVM guest for exercising INTx end to end: 16-bit real mode, the
//! 8259 PIC with one level-triggered line, an ISR that reads the assigned
//! device's STATUS through PCI config cycles (ports 0xCF8/0xCFC), acks the
//! device, EOIs the PIC and returns.
//!
//! The PIC is used on purpose: KVM signals the resample eventfd at the
//! PIC's EOI of a level-triggered line, which is what "resample only after
//! EOI" needs; its IOAPIC path signals at delivery.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use kvm_bindings::{kvm_enable_cap, KVM_CAP_SPLIT_IRQCHIP};

use crate::kvm::sys::pic_of;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

use crate::kvm::sys::GuestMemory;
use crate::kvm::{Irqchip, KvmError};
use crate::pci::Width;

/// Guest RAM size.
const MEM_SIZE: usize = 0x10000;
/// Where the program is loaded and starts (CS:IP = 0000:1000).
const CODE_ADDR: u16 = 0x1000;
/// Initial stack pointer.
const STACK_TOP: u64 = 0xf000;

/// Port the guest writes once its PIC is set up.
pub const PORT_READY: u16 = 0xf0;
/// Port the ISR reads: non-zero asks the guest to stop.
pub const PORT_STOP_QUERY: u16 = 0xf2;
/// Port the guest writes when it stops.
pub const PORT_STOPPED: u16 = 0xf3;
/// Port the ISR writes to acknowledge the device (stands for its BAR write).
pub const PORT_ACK: u16 = 0xf4;
/// PCI configuration address port.
pub const PORT_CONFIG_ADDRESS: u16 = 0xcf8;
/// PCI configuration data ports.
pub const PORT_CONFIG_DATA: u16 = 0xcfc;

/// The assigned device as the test VM's "chipset" sees it.
pub trait GuestDevice: Send + Sync {
    /// A guest config read of the device.
    fn config_read(&self, offset: u16, width: Width) -> u32;
    /// A guest config write of the device.
    fn config_write(&self, offset: u16, width: Width, value: u32);
    /// The ISR acknowledges one interrupt; returns whether one was pending.
    fn ack(&self) -> bool;
}

/// Shared counters and controls of a running test VM.
#[derive(Debug, Default)]
pub struct VmControl {
    stop: AtomicBool,
    ready: AtomicBool,
    isr_runs: AtomicU64,
    acked: AtomicU64,
    empty: AtomicU64,
    config_cycles: AtomicU64,
}

impl VmControl {
    /// Whether the guest has set up its PIC and enabled interrupts.
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
    /// ISR runs that acknowledged a device interrupt.
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::SeqCst)
    }
    /// ISR runs in all.
    pub fn isr_runs(&self) -> u64 {
        self.isr_runs.load(Ordering::SeqCst)
    }
    /// ISR runs that found no device interrupt pending.
    pub fn empty_isr_runs(&self) -> u64 {
        self.empty.load(Ordering::SeqCst)
    }
    /// Config cycles the guest made.
    pub fn config_cycles(&self) -> u64 {
        self.config_cycles.load(Ordering::SeqCst)
    }
    /// Asks the guest to stop at its next interrupt (the caller then
    /// raises one, e.g. by signalling the irqfd).
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// A tiny real-mode VM with one vCPU.
pub struct TinyVm {
    // Field order: the vCPU and the VM go before the memory they use.
    vcpu: VcpuFd,
    vm: Arc<VmFd>,
    _kvm: Kvm,
    mem: GuestMemory,
    irqchip: Irqchip,
    /// The VFIO container guest RAM is DMA-mapped into, unmapped on drop.
    dma: Option<std::sync::Arc<vfio_ioctls::VfioContainer>>,
}

impl Drop for TinyVm {
    fn drop(&mut self) {
        if let Some(container) = self.dma.take() {
            if let Err(e) = crate::kvm::sys::dma_unmap(&self.mem, &container) {
                tracing::warn!(error = %e, "unmapping guest RAM from the VFIO container failed");
            }
        }
    }
}

impl std::fmt::Debug for TinyVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TinyVm")
            .field("irqchip", &self.irqchip)
            .finish_non_exhaustive()
    }
}

/// Assembles the guest program for `line` and the device at
/// `device_fn` (bus 0, `devfn` = device << 3 | function).
fn program(line: u8, devfn: u8) -> (Vec<u8>, u16) {
    let vector = if line < 8 {
        0x20 + line
    } else {
        0x28 + line - 8
    };
    let ivt = u16::from(vector) * 4;
    let mut p: Vec<u8> = Vec::new();
    let out_al = |p: &mut Vec<u8>, port: u8, value: u8| p.extend([0xb0, value, 0xe6, port]);
    p.push(0xfa); // cli
                  // mov word [ivt], isr  (patched below); mov word [ivt+2], 0
    let isr_patch = p.len() + 4;
    p.extend([0xc7, 0x06]);
    p.extend(ivt.to_le_bytes());
    p.extend([0, 0]);
    p.extend([0xc7, 0x06]);
    p.extend((ivt + 2).to_le_bytes());
    p.extend([0, 0]);
    // ELCR: level-triggered, before ICW1.
    let (elcr_port, elcr_bit): (u16, u8) = if line < 8 {
        (0x4d0, 1 << line)
    } else {
        (0x4d1, 1 << (line - 8))
    };
    p.push(0xba); // mov dx, port
    p.extend(elcr_port.to_le_bytes());
    p.extend([0xb0, elcr_bit, 0xee]); // mov al, bit; out dx, al
                                      // Master PIC: ICW1 edge/level by ELCR, ICW2 base 0x20, ICW3 slave on 2, ICW4 8086.
    for (port, value) in [(0x20, 0x11), (0x21, 0x20), (0x21, 0x04), (0x21, 0x01)] {
        out_al(&mut p, port, value);
    }
    for (port, value) in [(0xa0, 0x11), (0xa1, 0x28), (0xa1, 0x02), (0xa1, 0x01)] {
        out_al(&mut p, port, value);
    }
    let (master_mask, slave_mask) = if line < 8 {
        (!(1u8 << line), 0xff)
    } else {
        (!(1u8 << 2), !(1u8 << (line - 8)))
    };
    out_al(&mut p, 0x21, master_mask);
    out_al(&mut p, 0xa1, slave_mask);
    p.extend([0xe6, PORT_READY as u8]); // out READY, al
    p.push(0xfb); // sti
    p.extend([0xf4, 0xeb, 0xfd]); // hlt; jmp $-3

    let isr = CODE_ADDR + p.len() as u16;
    p[isr_patch..isr_patch + 2].copy_from_slice(&isr.to_le_bytes());
    // Stop requested? in al, STOP_QUERY; test al, al; jz +2; out STOPPED, al
    p.extend([
        0xe4,
        PORT_STOP_QUERY as u8,
        0x84,
        0xc0,
        0x74,
        0x02,
        0xe6,
        PORT_STOPPED as u8,
    ]);
    // Read COMMAND/STATUS through config cycles.
    let address: u32 = 0x8000_0000 | (u32::from(devfn) << 8) | 0x04;
    p.extend([0x66, 0xb8]);
    p.extend(address.to_le_bytes()); // mov eax, address
    p.push(0xba);
    p.extend(PORT_CONFIG_ADDRESS.to_le_bytes()); // mov dx, 0xcf8
    p.extend([0x66, 0xef]); // out dx, eax
    p.push(0xba);
    p.extend(PORT_CONFIG_DATA.to_le_bytes()); // mov dx, 0xcfc
    p.extend([0x66, 0xed]); // in eax, dx
    p.extend([0xe6, PORT_ACK as u8]); // out ACK, al
    if line >= 8 {
        out_al(&mut p, 0xa0, 0x20); // EOI slave first
    }
    out_al(&mut p, 0x20, 0x20); // EOI master
    p.push(0xcf); // iret
    (p, isr)
}

impl TinyVm {
    /// Creates the VM with the given irqchip, loads the guest for PIC
    /// `line`, and sets up the vCPU. The device appears at 00:`devfn`.
    pub fn new(line: u8, devfn: u8, irqchip: Irqchip) -> Result<Self, KvmError> {
        let kvm = Kvm::new().map_err(KvmError::ioctl("opening /dev/kvm"))?;
        let vm = kvm.create_vm().map_err(KvmError::ioctl("KVM_CREATE_VM"))?;
        match irqchip {
            Irqchip::Full => vm
                .create_irq_chip()
                .map_err(KvmError::ioctl("KVM_CREATE_IRQCHIP"))?,
            Irqchip::Split => {
                let mut cap = kvm_enable_cap {
                    cap: KVM_CAP_SPLIT_IRQCHIP,
                    ..Default::default()
                };
                cap.args[0] = 24;
                vm.enable_cap(&cap)
                    .map_err(KvmError::ioctl("KVM_ENABLE_CAP(SPLIT_IRQCHIP)"))?;
            }
            Irqchip::None => {}
        }
        let mut mem = GuestMemory::new(MEM_SIZE).map_err(|source| KvmError::Ioctl {
            op: "mapping guest memory",
            source,
        })?;
        let (code, _isr) = program(line, devfn);
        mem.write(usize::from(CODE_ADDR), &code)
            .map_err(|source| KvmError::Ioctl {
                op: "loading the guest program",
                source,
            })?;
        mem.register(&vm, 0).map_err(|source| KvmError::Ioctl {
            op: "KVM_SET_USER_MEMORY_REGION",
            source,
        })?;
        let vcpu = vm
            .create_vcpu(0)
            .map_err(KvmError::ioctl("KVM_CREATE_VCPU"))?;
        let mut sregs = vcpu.get_sregs().map_err(KvmError::ioctl("KVM_GET_SREGS"))?;
        for seg in [
            &mut sregs.cs,
            &mut sregs.ds,
            &mut sregs.es,
            &mut sregs.ss,
            &mut sregs.fs,
            &mut sregs.gs,
        ] {
            seg.base = 0;
            seg.selector = 0;
        }
        vcpu.set_sregs(&sregs)
            .map_err(KvmError::ioctl("KVM_SET_SREGS"))?;
        let mut regs = vcpu.get_regs().map_err(KvmError::ioctl("KVM_GET_REGS"))?;
        regs.rip = u64::from(CODE_ADDR);
        regs.rsp = STACK_TOP;
        regs.rflags = 0x2;
        vcpu.set_regs(&regs)
            .map_err(KvmError::ioctl("KVM_SET_REGS"))?;
        Ok(Self {
            vcpu,
            vm: Arc::new(vm),
            _kvm: kvm,
            mem,
            irqchip,
            dma: None,
        })
    }

    /// The VM, for irqfd registration.
    pub fn vm(&self) -> &Arc<VmFd> {
        &self.vm
    }

    /// DMA-maps guest RAM into `container` (unmapped when the VM is
    /// dropped), as a VMM must for an assigned device.
    pub fn dma_map(
        &mut self,
        container: std::sync::Arc<vfio_ioctls::VfioContainer>,
    ) -> Result<(), KvmError> {
        crate::kvm::sys::dma_map(&self.mem, &container).map_err(|e| KvmError::Ioctl {
            op: "VFIO_IOMMU_MAP_DMA of guest RAM",
            source: std::io::Error::other(e.to_string()),
        })?;
        self.dma = Some(container);
        Ok(())
    }

    /// The irqchip the VM was created with.
    pub fn irqchip(&self) -> Irqchip {
        self.irqchip
    }

    /// Runs the vCPU until the guest stops, or until a stop is requested and
    /// the thread is kicked out of `KVM_RUN` with [`kick_signal`] (see
    /// [`VmControl::request_stop`]). Config cycles to 00:`devfn` go to
    /// `device`; others read all-ones.
    pub fn run(
        &mut self,
        devfn: u8,
        device: &dyn GuestDevice,
        control: &VmControl,
    ) -> Result<(), KvmError> {
        install_kick_handler()?;
        let mut address: u32 = 0;
        loop {
            if control.stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            let exit = match self.vcpu.run() {
                Ok(exit) => exit,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(e) => return Err(KvmError::ioctl("KVM_RUN")(e)),
            };
            match exit {
                VcpuExit::IoOut(PORT_READY, _) => control.ready.store(true, Ordering::SeqCst),
                VcpuExit::IoOut(PORT_STOPPED, _) => return Ok(()),
                VcpuExit::IoIn(PORT_STOP_QUERY, data) => {
                    control.isr_runs.fetch_add(1, Ordering::SeqCst);
                    data.fill(0);
                    if let Some(b) = data.first_mut() {
                        *b = u8::from(control.stop.load(Ordering::SeqCst));
                    }
                }
                VcpuExit::IoOut(PORT_ACK, _) => {
                    if device.ack() {
                        control.acked.fetch_add(1, Ordering::SeqCst);
                    } else {
                        control.empty.fetch_add(1, Ordering::SeqCst);
                    }
                }
                VcpuExit::IoOut(PORT_CONFIG_ADDRESS, data) if data.len() == 4 => {
                    let mut bytes = [0u8; 4];
                    bytes.copy_from_slice(data);
                    address = u32::from_le_bytes(bytes);
                }
                VcpuExit::IoIn(port, data)
                    if (PORT_CONFIG_DATA..PORT_CONFIG_DATA + 4).contains(&port) =>
                {
                    control.config_cycles.fetch_add(1, Ordering::SeqCst);
                    let value = config_target(address, port, data.len(), devfn)
                        .map(|(offset, width)| device.config_read(offset, width))
                        .unwrap_or(u32::MAX);
                    let bytes = value.to_le_bytes();
                    let n = data.len().min(4);
                    data[..n].copy_from_slice(&bytes[..n]);
                }
                VcpuExit::IoOut(port, data)
                    if (PORT_CONFIG_DATA..PORT_CONFIG_DATA + 4).contains(&port) =>
                {
                    control.config_cycles.fetch_add(1, Ordering::SeqCst);
                    if let Some((offset, width)) = config_target(address, port, data.len(), devfn) {
                        let mut bytes = [0u8; 4];
                        bytes[..data.len().min(4)].copy_from_slice(&data[..data.len().min(4)]);
                        device.config_write(offset, width, u32::from_le_bytes(bytes));
                    }
                }
                VcpuExit::IoIn(_, data) => data.fill(0xff),
                VcpuExit::IoOut(..) | VcpuExit::Intr => {}
                other => return Err(KvmError::UnexpectedExit(format!("{other:?}"))),
            }
        }
    }
}

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN() + 2
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) handler of [`kick_signal`], once per process, so the
/// signal interrupts `KVM_RUN` instead of killing the process.
pub fn install_kick_handler() -> Result<(), KvmError> {
    static INSTALLED: std::sync::OnceLock<Result<(), i32>> = std::sync::OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
                .map_err(|e| e.errno())
        })
        .map_err(|errno| KvmError::Ioctl {
            op: "installing the vCPU kick signal handler",
            source: std::io::Error::from_raw_os_error(errno),
        })
}

/// Kicks the vCPU thread `vcpu` out of `KVM_RUN` (after the caller's
/// [`VmControl::request_stop`]) until it has finished; `false` if it is
/// still running after `timeout`.
pub fn kick_until_finished<T>(
    vcpu: &std::thread::JoinHandle<T>,
    timeout: std::time::Duration,
) -> bool {
    use vmm_sys_util::signal::Killable;
    let deadline = std::time::Instant::now() + timeout;
    while !vcpu.is_finished() {
        if std::time::Instant::now() > deadline {
            return false;
        }
        // A kick that arrives between the loop's stop check and KVM_RUN is
        // lost; the next one is not.
        let _ = vcpu.kill(kick_signal());
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    true
}

/// The guest PIC's registers as KVM holds them, for diagnosing a guest
/// that stopped taking interrupts.
pub fn pic_state(vm: &VmFd) -> String {
    let mut text = String::new();
    for (chip_id, name) in [(0, "master"), (1, "slave")] {
        let mut chip = kvm_bindings::kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        match vm.get_irqchip(&mut chip) {
            // SAFETY-free: reading the PIC variant of the union is done by
            // kvm-bindings' accessor below.
            Ok(()) => {
                let pic = pic_of(&chip);
                text.push_str(&format!(
                    "PIC {name}: irr {:#04x} imr {:#04x} isr {:#04x} elcr {:#04x} last_irr {:#04x}; ",
                    pic.irr, pic.imr, pic.isr, pic.elcr, pic.last_irr
                ));
            }
            Err(e) => text.push_str(&format!("PIC {name}: KVM_GET_IRQCHIP failed: {e}; ")),
        }
    }
    text
}

/// Decodes a config data-port access against the latched address: the
/// register offset and width, if it targets enabled 00:`devfn`.
fn config_target(address: u32, port: u16, len: usize, devfn: u8) -> Option<(u16, Width)> {
    let enabled = address & 0x8000_0000 != 0;
    let bus = (address >> 16) & 0xff;
    let target = (address >> 8) & 0xff;
    if !enabled || bus != 0 || target != u32::from(devfn) {
        return None;
    }
    let width = Width::from_len(len)?;
    // The register field is 8 bits (bits 2-7), plus the data-port byte.
    let offset = (address & 0xfc) as u16 + (port - PORT_CONFIG_DATA);
    Some((offset, width))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_isr_address_is_patched_into_the_ivt_store() {
        let (code, isr) = program(5, 3 << 3);
        // mov word [0x25*4], isr
        assert_eq!(&code[1..4], &[0xc7, 0x06, 0x94]);
        assert_eq!(u16::from_le_bytes([code[5], code[6]]), isr);
        assert_eq!(*code.last().unwrap(), 0xcf, "ends with iret");
    }

    #[test]
    fn config_cycles_decode_only_for_the_device() {
        let a = 0x8000_0000 | (0x18 << 8) | 0x04;
        assert_eq!(config_target(a, 0xcfc, 4, 0x18), Some((0x04, Width::Dword)));
        assert_eq!(config_target(a, 0xcfd, 1, 0x18), Some((0x05, Width::Byte)));
        assert_eq!(config_target(a, 0xcfc, 4, 0x20), None);
        assert_eq!(config_target(a & 0x7fff_ffff, 0xcfc, 4, 0x18), None);
    }
}
