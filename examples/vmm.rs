//! An example VMM on kvm-ioctls: a tiny real-mode guest with the 8259 PIC
//! receives an assigned device's INTx through vfio-intx, reads the device's
//! STATUS through PCI config cycles (ports 0xCF8/0xCFC, routed to the
//! engine), acks the device, EOIs and loops.
//!
//! ```text
//! cargo run --example vmm                                # simulated device (vfio-pci model)
//! cargo run --example vmm -- --sim-kernel bare           # simulated device, user-owned mask
//! vmm --bdf 0000:01:00.0 --path fast                     # a QEMU edu bound to vfio-pci
//! ```
#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use vfio_intx::kvm::assign::{run_assignment, AssignmentConfig, AssignmentReport, DeviceSide};
use vfio_intx::kvm::PathPolicy;
use vfio_intx::pci::Bdf;
use vfio_intx::sim::{SimDevice, SimKernel};
use vfio_intx::vfio::edu::Edu;
use vfio_intx::vfio::VfioBackend;

#[derive(Clone, Copy, ValueEnum)]
enum PathArg {
    Auto,
    Fast,
    UserSpace,
}

#[derive(Clone, Copy, ValueEnum)]
enum SimKernelArg {
    Bare,
    VfioPci,
}

#[derive(Parser)]
#[command(about = "Example VMM: a tiny KVM guest serviced through vfio-intx")]
struct Args {
    /// Assign this device (a QEMU edu bound to vfio-pci) instead of the
    /// simulated one.
    #[arg(long)]
    bdf: Option<Bdf>,
    /// The simulated device's host driver model.
    #[arg(long, value_enum, default_value_t = SimKernelArg::VfioPci)]
    sim_kernel: SimKernelArg,
    /// Interrupts to deliver.
    #[arg(long, default_value_t = 1000)]
    interrupts: u64,
    /// EOI path: the kernel bypass, the user-space path, or the best possible.
    #[arg(long, value_enum, default_value_t = PathArg::Auto)]
    path: PathArg,
    /// Every n-th interrupt is raised twice before the guest's EOI.
    #[arg(long, default_value_t = 7)]
    burst: u64,
}

struct Sim(SimDevice);

impl DeviceSide for Sim {
    fn raise(&self) {
        self.0.raise();
    }
    fn ack(&self) -> bool {
        self.0.ack()
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(vfio_intx::log_filter("warn"))
        .init();
    let args = Args::parse();
    let config = AssignmentConfig::default()
        .with_interrupts(args.interrupts)
        .with_burst(args.burst)
        .with_policy(match args.path {
            PathArg::Auto => PathPolicy::Auto,
            PathArg::Fast => PathPolicy::Fast,
            PathArg::UserSpace => PathPolicy::UserSpace,
        })
        .with_timeout(Duration::from_secs(10));
    let result = match args.bdf {
        Some(bdf) => run_vfio(bdf, config),
        None => {
            let kernel = match args.sim_kernel {
                SimKernelArg::Bare => SimKernel::Bare,
                SimKernelArg::VfioPci => SimKernel::VfioPci,
            };
            let sim = SimDevice::builder().kernel(kernel).build();
            run_assignment(sim.backend(), Arc::new(Sim(sim)), config)
                .map_err(|e| vfio_intx::error_chain(&e))
        }
    };
    match result {
        Ok(report) => print_report(&report, args.interrupts),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(3)
        }
    }
}

fn run_vfio(bdf: Bdf, config: AssignmentConfig) -> Result<AssignmentReport, String> {
    let chain = |e: &dyn std::error::Error| vfio_intx::error_chain(e);
    let mut backend = VfioBackend::open(bdf).map_err(|e| chain(&e))?;
    // As the guest's firmware and driver would: decoding on, BAR0 mapped.
    let edu = Edu::enable(&mut backend).map_err(|e| chain(&e))?;
    let container = backend
        .container()
        .cloned()
        .ok_or_else(|| format!("{bdf}: opened without a container of its own"))?;
    vfio_intx::kvm::assign::run_assignment_with_dma(backend, Arc::new(edu), config, Some(container))
        .map_err(|e| chain(&e))
}

fn print_report(report: &AssignmentReport, interrupts: u64) -> ExitCode {
    println!("EOI path: {}", report.path);
    println!(
        "interrupts: {} raised, {} acked by the guest ISR",
        report.raised, report.acked
    );
    println!(
        "interrupts lost at the device (a reset lowered its line) and raised again: {}",
        report.reraised
    );
    println!(
        "round trip raise -> ISR ack: p50 {:?}, p99 {:?}",
        report.latency(0.5),
        report.latency(0.99)
    );
    println!(
        "engine: {} host interrupts, {} injections, {} EOIs (user-space wakeups per interrupt: {:.3})",
        report.stats.host_interrupts,
        report.stats.injected,
        report.stats.eois,
        (report.stats.host_interrupts + report.stats.eois) as f64 / interrupts.max(1) as f64
    );
    if report.saw_outside_resets() {
        println!(
            "resets outside the VMM were seen: {} ISR reads found STATUS.INTERRUPT clear, {} ISR \
             runs found nothing to acknowledge (a reset lowered the line or dropped the \
             acknowledgement); engine: {} stuck lines re-synced, {} events mid-reset",
            report.status_clear_in_isr,
            report.empty_isr_runs,
            report.stats.resyncs,
            report.stats.mid_reset_events
        );
    }
    let problems = report.problems();
    if report.raised == interrupts && problems.is_empty() {
        println!("PASS");
        ExitCode::SUCCESS
    } else {
        println!("FAIL: {}", problems.join(", "));
        ExitCode::from(1)
    }
}
