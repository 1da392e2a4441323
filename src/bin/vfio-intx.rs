//! `vfio-intx`: user-space PCI 2.3 INTx masking for assigned devices.
#![forbid(unsafe_code)]

#[cfg(not(loom))]
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[cfg(not(loom))]
use clap::CommandFactory;
use clap::{Parser, Subcommand};

use vfio_intx::sim::stress::{self, ExternalResetConfig, StressConfig};

/// Exit code: the run completed but broke a promise (an interrupt lost, a
/// line left masked). The same as `vfio_intx::daemon::exit::FAILED`.
const EXIT_FAILED_CHECK: u8 = 1;
/// Exit code: the run could not start (`vfio_intx::daemon::exit::RUNTIME`).
const EXIT_RUNTIME: u8 = 3;

#[derive(Parser)]
#[command(
    version,
    about = "User-space PCI 2.3 INTx masking for devices assigned to KVM guests"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Drive the simulated device through the whole INTx state machine with
    /// concurrent reset threads, and check that nothing is lost.
    Demo {
        /// Interrupts the device raises.
        #[arg(long, default_value_t = 2000)]
        interrupts: u64,
        /// Threads looping resets in parallel (the 2011 reproducer).
        #[arg(long, default_value_t = 4)]
        reset_threads: usize,
        /// Resets per thread.
        #[arg(long, default_value_t = 100)]
        resets: u64,
        /// Guest COMMAND writes during the run.
        #[arg(long, default_value_t = 400)]
        config_writes: u64,
        /// Reset window of the simulated device, in microseconds.
        #[arg(long, default_value_t = 50)]
        reset_window_us: u64,
        /// How long the second part runs its reset loops around the engine
        /// (sysfs-style resets the gate cannot see), in milliseconds.
        #[arg(long, default_value_t = 1000)]
        external_resets_ms: u64,
    },
    // Not under loom (scripts/loom.sh builds the binary for its test):
    // tokio's loom mode has no sockets or signals.
    #[cfg(not(loom))]
    #[command(flatten)]
    Ops(vfio_intx::daemon::cli::Command),
}

// `vfio-intx generate-assets`, for packaging/build-deb.sh. Parsed apart
// from `Cli`, not as a hidden subcommand of it: clap's completions offer
// hidden subcommands too, and the pages and completions are generated from
// `Cli` itself.
#[cfg(not(loom))]
#[derive(Parser)]
#[command(
    name = "vfio-intx generate-assets",
    bin_name = "vfio-intx generate-assets",
    about = "Write the man pages and shell completions of the package"
)]
struct GenerateAssets {
    /// The directory to write the man pages and completions into.
    #[arg(long)]
    out: PathBuf,
    /// The man pages' date, YYYY-MM-DD (packaging/build-deb.sh: the last
    /// commit's).
    #[arg(long)]
    date: String,
}

fn main() -> ExitCode {
    #[cfg(not(loom))]
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == "generate-assets")
    {
        let args = GenerateAssets::parse_from(std::env::args_os().skip(1));
        return match vfio_intx::daemon::cli::assets::generate(Cli::command(), &args.out, &args.date)
        {
            Ok(written) => {
                for path in written {
                    println!("{}", path.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: generate-assets: {}", vfio_intx::error_chain(&e));
                ExitCode::from(EXIT_RUNTIME)
            }
        };
    }
    let cli = Cli::parse();
    match cli.command {
        #[cfg(not(loom))]
        Command::Ops(command) => vfio_intx::daemon::cli::run(command),
        Command::Demo {
            interrupts,
            reset_threads,
            resets,
            config_writes,
            reset_window_us,
            external_resets_ms,
        } => {
            init_logging();
            let gate = demo(
                StressConfig::default()
                    .with_interrupts(interrupts)
                    .with_reset_threads(reset_threads)
                    .with_resets_per_thread(resets)
                    .with_config_writes(config_writes)
                    .with_reset_window(Duration::from_micros(reset_window_us)),
            );
            let around = demo_external(
                ExternalResetConfig::default()
                    .with_duration(Duration::from_millis(external_resets_ms)),
            );
            if gate == ExitCode::SUCCESS {
                around
            } else {
                gate
            }
        }
    }
}

fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(vfio_intx::log_filter("warn"))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

fn demo(config: StressConfig) -> ExitCode {
    println!(
        "vfio-intx demo, part 1 (resets through the gate): simulated PCI 2.3 device, {} interrupts, {} reset threads x {} resets, \
         {} guest COMMAND writes",
        config.interrupts, config.reset_threads, config.resets_per_thread, config.config_writes
    );
    let report = match stress::run(config) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("error: {}", vfio_intx::error_chain(&e));
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let s = &report.stats;
    println!("  interrupts raised      {}", report.raised);
    println!("  interrupts delivered   {}", report.delivered);
    println!("  host interrupts        {}", s.host_interrupts);
    println!("  re-injected at EOI     {}", s.reinjected);
    println!("  held (guest disabled)  {}", s.held);
    println!("  deferred (gate held)   {}", s.deferred);
    println!(
        "  resets                 {} ok, {} failed",
        report.resets_ok, report.resets_failed
    );
    println!("  guest config errors    {}", report.config_errors);
    println!("  engine errors/retries  {}/{}", s.errors, s.retries);
    println!("  double injections      {}", report.double_injections);
    println!(
        "  lines masked at end    {}",
        u8::from(report.masked_at_end)
    );
    println!(
        "  COMMAND device/guest   {:#06x}/{:#06x}",
        report.device_command, report.guest_command
    );
    println!("  elapsed                {:.2?}", report.elapsed);
    if report.passed() {
        println!("PASS: every interrupt delivered once, no line left masked");
        ExitCode::SUCCESS
    } else {
        println!("FAIL: see the figures above");
        ExitCode::from(EXIT_FAILED_CHECK)
    }
}

fn demo_external(config: ExternalResetConfig) -> ExitCode {
    println!(
        "\nvfio-intx demo, part 2 (resets around the gate, as `echo 1 > .../reset`): simulated \
         vfio-pci, {} reset loops for {:?}, stuck-INTx watchdog on",
        config.reset_threads, config.duration
    );
    let report = match stress::run_external_resets(config) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("error: {}", vfio_intx::error_chain(&e));
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let s = &report.stats;
    println!("  interrupts raised      {}", report.raised);
    println!("  interrupts delivered   {}", report.delivered);
    println!("  external resets        {}", report.resets);
    println!(
        "  stuck lines detected   {} (stuck {:.2?} in all)",
        s.stuck_detections, s.stuck_time
    );
    println!("  re-syncs               {}", s.resyncs);
    println!("  mid-reset events       {}", s.mid_reset_events);
    match report.recovered_after {
        Some(t) => println!("  delivery restored      {t:.2?} after the last reset"),
        None => println!("  delivery restored      never (the line is stuck)"),
    }
    println!(
        "  lines masked at end    {}",
        u8::from(report.masked_at_end)
    );
    if report.recovered_after.is_some()
        && report.delivered == report.raised
        && !report.masked_at_end
    {
        println!("PASS: delivery restored after resets vfio-intx did not start");
        ExitCode::SUCCESS
    } else {
        println!("FAIL: see the figures above");
        ExitCode::from(EXIT_FAILED_CHECK)
    }
}
