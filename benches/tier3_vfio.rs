//! Tier-3 figures inside the vfio-intx QEMU guest: the project's paths
//! against bare VFIO calls on the same vfio-pci edu, in the same boot.
//!
//! (a) one INTx cycle: raise -> trigger -> on_host_interrupt -> ack ->
//!     on_guest_eoi, against raise -> trigger read -> ack -> SET_IRQS UNMASK
//!     (vfio-ioctls' `unmask_irq`); each also with the injection a VMM makes
//!     either way (an irqfd write, read back by the "guest"). The target is
//!     the per-round median of project+irqfd / bare+irqfd <= 1.1;
//! (b) a config read through the gate (`guest_config_read`) against a bare
//!     `pread` of the config region;
//! (c) a reset through the engine against a bare `VFIO_DEVICE_RESET`
//!     (vfio-ioctls' `reset`).
//!
//! Figures, not assertions. Single-threaded loops, so thread wake-ups do not
//! blur the comparison. Run by scripts/tier3.sh; outside the guest it prints
//! a SKIP line.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vfio_bindings::bindings::vfio::VFIO_PCI_INTX_IRQ_INDEX;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use vfio_intx::backend::ConfigSpace;
use vfio_intx::error_chain;
use vfio_intx::intx::{CallbackSink, IntxDevice};
use vfio_intx::pci::regs::{COMMAND_MASTER, COMMAND_MEMORY, PCI_COMMAND};
use vfio_intx::pci::{Bdf, Width};
use vfio_intx::vfio::{RegionAccess, VfioBackend};

const RAISE: u64 = 0x60;
const ACK: u64 = 0x64;
const STATUS: u64 = 0x24;
const CONFIG_REGION: u32 = 7;

/// Interrupt cycles per round, and rounds: each round runs the four
/// variants in turn (1600 interrupts in all).
const CYCLES: usize = 40;
const ROUNDS: usize = 10;
/// Config reads per kind, in alternating chunks.
const READS: usize = 2000;
/// Resets per kind, alternating.
const RESETS: usize = 20;

fn open(bdf: Bdf) -> (VfioBackend, RegionAccess) {
    let mut b = VfioBackend::open(bdf).unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    let command = b.config_read(PCI_COMMAND, Width::Word).unwrap();
    b.config_write(
        PCI_COMMAND,
        Width::Word,
        command | u32::from(COMMAND_MEMORY | COMMAND_MASTER),
    )
    .unwrap();
    let bar = b.region(0).unwrap();
    let stale = bar.read_u32(STATUS).unwrap();
    if stale != 0 {
        bar.write_u32(ACK, stale).unwrap();
    }
    (b, bar)
}

/// Blocks until `fd` is readable.
struct Waiter(Epoll);

impl Waiter {
    fn new(fd: &EventFd) -> Self {
        let epoll = Epoll::new().unwrap();
        epoll
            .ctl(
                ControlOperation::Add,
                fd.as_raw_fd(),
                EpollEvent::new(EventSet::IN, 0),
            )
            .unwrap();
        Self(epoll)
    }

    fn wait(&self) {
        let mut events = [EpollEvent::default(); 1];
        loop {
            match self.0.wait(2000, &mut events) {
                Ok(1) => return,
                Ok(_) => panic!("no interrupt within 2 s"),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => panic!("epoll_wait: {e}"),
            }
        }
    }
}

/// How the interrupt reaches the "guest" in a cycle.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Inject {
    /// Not at all (bare) / an in-process callback (project): the loop's own
    /// cost only.
    None,
    /// An eventfd write (the KVM irqfd a VMM would signal) and its read.
    EventFd,
}

fn bare_cycles(bdf: Bdf, n: usize, inject: Inject) -> Vec<Duration> {
    let (backend, bar) = open(bdf);
    let device = Arc::clone(backend.device().expect("opened through its group"));
    let trigger = EventFd::new(EFD_NONBLOCK).unwrap();
    device
        .enable_irq(VFIO_PCI_INTX_IRQ_INDEX, vec![&trigger])
        .unwrap();
    let waiter = Waiter::new(&trigger);
    let irqfd = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        bar.write_u32(RAISE, 1).unwrap();
        waiter.wait();
        trigger.read().unwrap();
        if inject == Inject::EventFd {
            irqfd.write(1).unwrap();
            irqfd.read().unwrap();
        }
        bar.write_u32(ACK, 1).unwrap();
        device.unmask_irq(VFIO_PCI_INTX_IRQ_INDEX).unwrap();
        samples.push(t.elapsed());
    }
    device.disable_irq(VFIO_PCI_INTX_IRQ_INDEX).unwrap();
    samples
}

fn project_cycles(bdf: Bdf, n: usize, inject: Inject) -> Vec<Duration> {
    let (backend, bar) = open(bdf);
    let irqfd = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
    let device = match inject {
        Inject::None => IntxDevice::new(backend, CallbackSink(|| Ok(()))),
        Inject::EventFd => IntxDevice::new(backend, Arc::clone(&irqfd)),
    }
    .unwrap();
    let waiter = Waiter::new(device.trigger());
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        bar.write_u32(RAISE, 1).unwrap();
        waiter.wait();
        device.on_host_interrupt().unwrap();
        // The guest takes the interrupt, acknowledges the device, EOIs.
        if inject == Inject::EventFd {
            irqfd.read().unwrap();
        }
        bar.write_u32(ACK, 1).unwrap();
        device.on_guest_eoi().unwrap();
        samples.push(t.elapsed());
    }
    let stats = device.stats();
    assert_eq!(stats.injected, n as u64);
    assert_eq!(stats.errors, 0);
    // Every event but the first (nothing dates it) is the kernel's claim:
    // no STATUS re-read.
    assert_eq!(stats.claimed + 1, n as u64, "{stats:?}");
    device.disarm().unwrap();
    samples
}

struct Summary {
    median: Duration,
    p90: Duration,
    n: usize,
}

fn summary(mut samples: Vec<Duration>) -> Summary {
    samples.sort_unstable();
    let n = samples.len();
    Summary {
        median: samples[n / 2],
        p90: samples[n * 9 / 10],
        n,
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    if std::env::var_os("VFIO_INTX_IN_GUEST").is_none() {
        eprintln!(
            "SKIP (not inside the vfio-intx QEMU guest): tier3_vfio bench needs real vfio-pci; \
             run scripts/tier3.sh"
        );
        return;
    }
    let bdf: Bdf = std::env::var("VFIO_INTX_EDU_RESET")
        .expect("VFIO_INTX_EDU_RESET")
        .parse()
        .unwrap();
    println!("tier3 bench: vfio-pci edu {bdf}, single-threaded loops, medians (p90)");

    // (a) Interrupt cycle, in short rounds that run the four variants in
    // turn, so that the host's load drifts across all of them alike; the
    // ratio is also taken per round (paired) and its median reported.
    type Run = fn(Bdf, usize, Inject) -> Vec<Duration>;
    let variants: [(&str, Run, Inject); 4] = [
        ("bare", bare_cycles, Inject::None),
        ("project", project_cycles, Inject::None),
        ("bare+irqfd", bare_cycles, Inject::EventFd),
        ("project+irqfd", project_cycles, Inject::EventFd),
    ];
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); variants.len()];
    let mut paired = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let mut medians = [0.0; 4];
        for (i, (_, run, inject)) in variants.iter().enumerate() {
            let s = run(bdf, CYCLES, *inject);
            medians[i] = us(summary(s.clone()).median);
            samples[i].extend(s);
        }
        paired.0.push(medians[1] / medians[0]);
        paired.1.push(medians[3] / medians[2]);
    }
    let s: Vec<Summary> = samples.into_iter().map(summary).collect();
    for (i, (name, _, _)) in variants.iter().enumerate() {
        println!(
            "(a) interrupt cycle {name:>13}: {:.1} us ({:.1}), n={}",
            us(s[i].median),
            us(s[i].p90),
            s[i].n
        );
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "(a) ratio project/bare {:.2}, per-round median {:.2}; with the irqfd injection in \
         both {:.2}, per-round median {:.2} (target <= 1.1)",
        us(s[1].median) / us(s[0].median),
        median(&mut paired.0),
        us(s[3].median) / us(s[2].median),
        median(&mut paired.1),
    );

    // (b) and (c) on one armed engine.
    let (backend, _bar) = open(bdf);
    let config = backend.region(CONFIG_REGION).unwrap();
    let vfio_device = Arc::clone(backend.device().expect("opened through its group"));
    let sink = EventFd::new(EFD_NONBLOCK).unwrap();
    let device = IntxDevice::new(backend, sink).unwrap();

    let mut bare = Vec::with_capacity(READS);
    let mut project = Vec::with_capacity(READS);
    for _ in 0..READS / 100 {
        for _ in 0..100 {
            let t = Instant::now();
            let v = config.read_u32(u64::from(PCI_COMMAND)).unwrap();
            bare.push(t.elapsed());
            std::hint::black_box(v);
        }
        for _ in 0..100 {
            let t = Instant::now();
            let v = device.guest_config_read(PCI_COMMAND, Width::Dword).unwrap();
            project.push(t.elapsed());
            std::hint::black_box(v);
        }
    }
    let (b, p) = (summary(bare), summary(project));
    println!(
        "(b) config read (COMMAND+STATUS dword): project {:.2} us ({:.2}), bare pread {:.2} us \
         ({:.2}), n={}+{}; ratio {:.2}",
        us(p.median),
        us(p.p90),
        us(b.median),
        us(b.p90),
        p.n,
        b.n,
        us(p.median) / us(b.median)
    );

    let mut bare = Vec::with_capacity(RESETS);
    let mut project = Vec::with_capacity(RESETS);
    for _ in 0..RESETS {
        let t = Instant::now();
        vfio_device.reset();
        bare.push(t.elapsed());
        let t = Instant::now();
        device.reset().unwrap();
        project.push(t.elapsed());
    }
    assert_eq!(device.stats().errors, 0);
    let (b, p) = (summary(bare), summary(project));
    println!(
        "(c) reset: project {:.2} ms ({:.2}), bare VFIO_DEVICE_RESET {:.2} ms ({:.2}), n={}+{}; \
         difference {:+.3} ms (target <= 1 ms)",
        ms(p.median),
        ms(p.p90),
        ms(b.median),
        ms(b.p90),
        p.n,
        b.n,
        ms(p.median) - ms(b.median)
    );
    device.disarm().unwrap();
}
