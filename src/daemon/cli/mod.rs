//! The operator commands of `vfio-intx`: `daemon`, `status`, `probe`,
//! `bind`, `unbind`, `reset`, `mask`, `unmask`, `metrics`, `validate`.
//!
//! Each talks to the daemon when it runs (a reset then goes through the
//! device's gate in the daemon) and works standalone otherwise. With
//! `--json` the result (or the error) is printed as one JSON document on
//! stdout. Exit codes are those of [`crate::daemon::exit`].

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::daemon::client::{Client, ClientError};
use crate::daemon::config::{Config, DEFAULT_CONFIG, DEFAULT_SOCKET};
use crate::daemon::progress::stderr_after_slow;
use crate::daemon::protocol::{ErrorKind, LineReport, Request, Response};
use crate::daemon::{exit, exit_code, DaemonStatus, HasKind};
use crate::pci::holders::{Holders, HoldersError};
use crate::pci::sysfs::{PciSysfs, SysfsError, UIO_PCI_GENERIC, VFIO_PCI};
use crate::pci::Bdf;

pub mod assets;
mod binding;

use binding::{bind, unbind};

/// Options every client command takes.
#[derive(Debug, Clone, clap::Args)]
pub struct Common {
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// The daemon's control socket.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Seconds to wait for the daemon's answer before reporting it as not
    /// answering (exit 7).
    #[arg(long, default_value_t = 30, value_name = "SECONDS")]
    pub timeout: u64,
}

/// Options of the commands that change a device's binding.
#[derive(Debug, Clone, clap::Args)]
pub struct Change {
    /// Change the binding even though a process holds the device open: a
    /// uio user then gets EIO, and a VFIO user makes the kernel's unbind
    /// wait until it releases the device.
    #[arg(long)]
    pub force: bool,
    /// How long to wait for the kernel's unbind, in seconds, before giving
    /// up with exit 8 (the kernel's write itself cannot be cancelled).
    #[arg(long, default_value_t = 10)]
    pub wait: u64,
}

/// The operator commands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Run the daemon: arm the configured devices and serve the control
    /// socket until SIGTERM (SIGHUP reloads the configuration).
    Daemon {
        /// The configuration file.
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Listen here instead of the configuration's socket.
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// The daemon's state and every device's counters.
    Status {
        /// Output and socket options.
        #[command(flatten)]
        common: Common,
    },
    /// Whether PCI 2.3 INTx masking works on a device.
    Probe {
        /// The device, e.g. 0000:01:00.0.
        bdf: String,
        /// Output and socket options.
        #[command(flatten)]
        common: Common,
    },
    /// Bind a device to vfio-pci or uio_pci_generic. Refused (exit 8) while
    /// a process holds the device (its /dev/uioN, VFIO group or device fd)
    /// or the daemon owns it.
    Bind {
        /// The device.
        bdf: String,
        /// The driver.
        #[arg(long, value_parser = [VFIO_PCI, UIO_PCI_GENERIC])]
        driver: String,
        /// How the binding change is made.
        #[command(flatten)]
        change: Change,
        /// Output and socket options.
        #[command(flatten)]
        common: Common,
    },
    /// Unbind a device from its driver (and clear driver_override). Refused
    /// (exit 8) while a process holds the device or the daemon owns it.
    Unbind {
        /// The device.
        bdf: String,
        /// How the binding change is made.
        #[command(flatten)]
        change: Change,
        /// Output and socket options.
        #[command(flatten)]
        common: Common,
    },
    /// Reset a device: through the daemon's gate when the daemon owns it,
    /// directly otherwise.
    Reset {
        /// The device.
        bdf: String,
        /// How many times to retry while the device is busy.
        #[arg(long, default_value_t = 20)]
        retries: u32,
        /// Output and socket options.
        #[command(flatten)]
        common: Common,
    },
    /// Mask a daemon-owned device's INTx and hold it masked.
    Mask {
        /// The device.
        bdf: String,
        /// Output and socket options.
        #[command(flatten)]
        common: Common,
    },
    /// Lift a hold put by `mask`.
    Unmask {
        /// The device.
        bdf: String,
        /// Output and socket options.
        #[command(flatten)]
        common: Common,
    },
    /// Every device's metrics in the Prometheus text format.
    Metrics {
        /// Output and socket options.
        #[command(flatten)]
        common: Common,
    },
    /// Restarts the daemon keeping every device and session (an upgrade):
    /// guests keep their INTx. Operators only; needs the service manager's
    /// fd store (`systemctl restart` is a stop and a start instead: the
    /// devices are handed back and sessions end).
    Restart {
        /// Output and socket options.
        #[command(flatten)]
        common: Common,
    },
    /// Check configuration files (all must be valid).
    Validate {
        /// The files.
        #[arg(required = true)]
        configs: Vec<PathBuf>,
        /// Print the result as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
}

/// A command's failure: an exit code and a message.
#[derive(Debug)]
struct Failure {
    code: u8,
    kind: &'static str,
    message: String,
}

impl Failure {
    fn new(code: u8, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            kind,
            message: message.into(),
        }
    }

    fn from_error(e: &impl HasKind) -> Self {
        let code = exit_code(e);
        Self::new(code, kind_name(code), crate::error_chain(e))
    }

    fn from_response(kind: ErrorKind, message: String) -> Self {
        let code = match kind {
            ErrorKind::NotFound => exit::NOT_FOUND,
            ErrorKind::PermissionDenied => exit::PERMISSION,
            ErrorKind::Busy | ErrorKind::TooManyClients | ErrorKind::OutOfDescriptors => exit::BUSY,
            ErrorKind::Timeout => exit::RUNTIME,
            _ => exit::FAILED,
        };
        Self::new(code, kind_name(code), message)
    }
}

fn kind_name(code: u8) -> &'static str {
    match code {
        exit::CONFIG => "config",
        exit::NOT_FOUND => "not-found",
        exit::PERMISSION => "permission-denied",
        exit::UNREACHABLE => "unreachable",
        exit::BUSY => "busy",
        exit::RUNTIME => "runtime",
        _ => "failed",
    }
}

/// What a command prints on success.
struct Output {
    json: Value,
    text: String,
}

/// Runs an operator command; returns the process exit code.
pub fn run(command: Command) -> ExitCode {
    if let Command::Daemon { config, socket } = &command {
        crate::daemon::init_logging("info");
        return match crate::daemon::run(config, socket.as_deref()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                let message = match &e {
                    crate::daemon::DaemonError::Device(
                        crate::daemon::service::DeviceError::Starting { bdf, source },
                    ) => in_context(
                        "daemon: starting device",
                        &Device::Bdf(*bdf),
                        &crate::error_chain(source.as_ref()),
                    ),
                    e => crate::error_chain(e),
                };
                eprintln!("error: {message}");
                ExitCode::from(exit_code(&e))
            }
        };
    }
    crate::daemon::init_logging("warn");
    let json = match &command {
        Command::Daemon { .. } => false,
        Command::Validate { json, .. } => *json,
        Command::Status { common }
        | Command::Probe { common, .. }
        | Command::Bind { common, .. }
        | Command::Unbind { common, .. }
        | Command::Reset { common, .. }
        | Command::Mask { common, .. }
        | Command::Unmask { common, .. }
        | Command::Metrics { common }
        | Command::Restart { common } => common.json,
    };
    let (op, device) = operation(&command);
    let result = match command {
        Command::Daemon { .. } => Err(Failure::new(exit::FAILED, "failed", "unreachable")),
        Command::Status { common } => status(&common),
        Command::Probe { bdf, common } => probe(&bdf, &common),
        Command::Bind {
            bdf,
            driver,
            change,
            common,
        } => bind(&bdf, &driver, &change, &common),
        Command::Unbind {
            bdf,
            change,
            common,
        } => unbind(&bdf, &change, &common),
        Command::Reset {
            bdf,
            retries,
            common,
        } => reset(&bdf, retries, &common),
        Command::Mask { bdf, common } => {
            parse_bdf(&bdf).and_then(|bdf| simple(&common, Request::Mask { bdf }, "held masked"))
        }
        Command::Unmask { bdf, common } => {
            parse_bdf(&bdf).and_then(|bdf| simple(&common, Request::Unmask { bdf }, "released"))
        }
        Command::Metrics { common } => metrics(&common),
        Command::Restart { common } => restart(&common),
        Command::Validate { configs, .. } => validate(&configs),
    };
    match result {
        Ok(out) => {
            if json {
                println!("{}", out.json);
            } else if !out.text.is_empty() {
                println!("{}", out.text);
            }
            ExitCode::SUCCESS
        }
        Err(f) => {
            let message = match &device {
                Some(device) => in_context(op, device, &f.message),
                None if op == "validate" => f.message,
                None => format!("{op}: {}", f.message),
            };
            if json {
                println!(
                    "{}",
                    json!({ "error": {
                        "kind": f.kind,
                        "message": message,
                        "operation": op,
                        "device": device.as_ref().map(Device::name),
                    } })
                );
            }
            eprintln!("error: {message}");
            ExitCode::from(f.code)
        }
    }
}

/// The device a command names, as its messages name it.
enum Device {
    /// A valid address, in its full form.
    Bdf(Bdf),
    /// The text given where an address was expected.
    Invalid(String),
}

impl Device {
    fn name(&self) -> String {
        match self {
            Device::Bdf(bdf) => bdf.to_string(),
            Device::Invalid(text) => text.clone(),
        }
    }
}

/// The operation and the device of a command, for its error message.
fn operation(command: &Command) -> (&'static str, Option<Device>) {
    let (op, text) = match command {
        Command::Daemon { .. } => ("daemon", None),
        Command::Status { .. } => ("status", None),
        Command::Probe { bdf, .. } => ("probe", Some(bdf)),
        Command::Bind { bdf, .. } => ("bind", Some(bdf)),
        Command::Unbind { bdf, .. } => ("unbind", Some(bdf)),
        Command::Reset { bdf, .. } => ("reset", Some(bdf)),
        Command::Mask { bdf, .. } => ("mask", Some(bdf)),
        Command::Unmask { bdf, .. } => ("unmask", Some(bdf)),
        Command::Metrics { .. } => ("metrics", None),
        Command::Restart { .. } => ("restart", None),
        Command::Validate { .. } => ("validate", None),
    };
    let device = text.map(|t| match t.parse::<Bdf>() {
        Ok(bdf) => Device::Bdf(bdf),
        Err(_) => Device::Invalid(t.clone()),
    });
    (op, device)
}

/// The one place a failure becomes a message: "OPERATION DEVICE: what
/// happened", the device named once. The errors underneath each name the
/// device they concern (`BDF: ...`, `invalid PCI address "TEXT"`): those
/// mentions are dropped, a path that contains the address is kept.
fn in_context(op: &str, device: &Device, message: &str) -> String {
    match device {
        Device::Bdf(bdf) => {
            let rest = message.replace(&format!("{bdf}: "), "");
            format!("{op} {bdf}: {rest}")
        }
        Device::Invalid(text) => {
            let rest = message.replace(&format!(" {text:?}"), "");
            format!("{op} {text:?}: {rest}")
        }
    }
}

fn parse_bdf(text: &str) -> Result<Bdf, Failure> {
    text.parse::<Bdf>()
        .map_err(|e| Failure::new(exit::USAGE, "usage", e.to_string()))
}

/// Connects to the daemon; `None` when it is not running.
fn reach(common: &Common) -> Result<Option<Client>, Failure> {
    match Client::connect(&common.socket, Duration::from_secs(common.timeout.max(1))) {
        Ok(c) => Ok(Some(c)),
        Err(ClientError::NotRunning { .. }) => Ok(None),
        Err(e) => Err(Failure::from_error(&e)),
    }
}

/// Sends a request; an error answer becomes a failure.
fn ask(client: &mut Client, request: &Request) -> Result<Value, Failure> {
    match client.request(request) {
        Ok(Response::Ok { data }) => Ok(data),
        Ok(Response::Error { kind, message }) => Err(Failure::from_response(kind, message)),
        Err(e) => Err(Failure::from_error(&e)),
    }
}

fn need_daemon(common: &Common) -> Result<Client, Failure> {
    reach(common)?.ok_or_else(|| {
        Failure::new(
            exit::UNREACHABLE,
            "unreachable",
            format!(
                "{}: the vfio-intx daemon is not running",
                common.socket.display()
            ),
        )
    })
}

fn status(common: &Common) -> Result<Output, Failure> {
    let mut client = need_daemon(common)?;
    let data = ask(&mut client, &Request::Status)?;
    let status: DaemonStatus = serde_json::from_value(data.clone())
        .map_err(|e| Failure::new(exit::FAILED, "failed", format!("decoding the status: {e}")))?;
    let mut text = format!(
        "vfio-intx daemon {} (pid {}), up {:.1} s, config {}, socket {}\n",
        status.version,
        status.pid,
        status.uptime_ms as f64 / 1000.0,
        status.config,
        status.socket
    );
    for d in &status.devices {
        let e = &d.stats.engine;
        text.push_str(&format!(
            "  {} {:<4} session={} held={} interrupts={} injected={} eois={} not-mine={} deferred={} resets={} errors={} storms={} stuck={}\n",
            d.bdf,
            d.backend.to_string(),
            if d.session { "yes" } else { "no" },
            d.held.as_deref().unwrap_or("no"),
            e.interrupts,
            e.injected,
            e.eois,
            e.not_mine,
            e.deferred,
            e.resets,
            e.errors,
            d.stats.daemon.storms,
            e.stuck_detections,
        ));
        if let Some(line) = d.line.as_ref().and_then(|l| line_text(&json!(l))) {
            text.push_str(&format!("    line: {line}\n").replace("\n    ", "\n      "));
        }
        if let Some(identity) = &d.handed_over {
            text.push_str(&format!(
                "    the VMM's own VFIO device fd, for its session; address {identity}\n"
            ));
        }
    }
    if let Some(g) = &status.example_guest {
        text.push_str(&format!(
            "  example guest on {}: raised {}, acknowledged {}\n",
            g.bdf, g.raised, g.acked
        ));
    }
    Ok(Output {
        json: data,
        text: text.trim_end().to_owned(),
    })
}

fn probe(text: &str, common: &Common) -> Result<Output, Failure> {
    let bdf = parse_bdf(text)?;
    let data = match reach(common)? {
        Some(mut client) => ask(&mut client, &Request::Probe { bdf })?,
        None => {
            let v = PciSysfs::default()
                .masking_verdict(bdf)
                .map_err(|e| Failure::from_error(&e))?;
            json!({
                "bdf": bdf.to_string(),
                "supported": v.supported,
                "verdict": v.to_string(),
                "evidence": v.source.evidence(),
                "owned": false,
                "line": LineReport::of(bdf),
            })
        }
    };
    let mut text = data["verdict"].as_str().unwrap_or_default().to_owned();
    if let Some(line) = line_text(&data["line"]) {
        text.push_str(&format!("\n  line: {line}"));
    }
    Ok(Output { json: data, text })
}

/// The `line` of a probe or status reply in words: the summary, then each
/// sharer and the advice on lines of their own. `None` where the reply has
/// no line (a simulated device).
fn line_text(line: &serde_json::Value) -> Option<String> {
    let line: LineReport = serde_json::from_value(line.clone()).ok()?;
    let which = if line.irq_source == "routed" {
        "host IRQ"
    } else {
        "device not enabled: the firmware's IRQ or its last routing"
    };
    let mut text = match line.irq {
        Some(irq) => format!("{} ({which} {irq})", line.verdict),
        None => line.summary.clone(),
    };
    if line.irq.is_some() {
        for s in &line.sharers {
            let masking = match s.masking {
                Some(true) => "masks",
                Some(false) => "no PCI 2.3 masking",
                None => "masking unknown",
            };
            text.push_str(&format!(
                "\n    shared with {} ({}, {masking})",
                s.bdf,
                s.driver.as_deref().unwrap_or("no driver")
            ));
        }
        if line.handlers.is_empty() {
            text.push_str("\n    handlers: none registered");
        } else {
            text.push_str(&format!("\n    handlers: {}", line.handlers.join(", ")));
        }
    }
    if let Some(advice) = &line.advice {
        text.push_str(&format!("\n    {advice}"));
    }
    Some(text)
}

fn reset(text: &str, retries: u32, common: &Common) -> Result<Output, Failure> {
    let bdf = parse_bdf(text)?;
    if let Some(mut client) = reach(common)? {
        let request = Request::Reset { bdf };
        let mut backoff = Duration::from_millis(5);
        let mut attempt = 0;
        loop {
            let answer = stderr_after_slow(
                || {
                    format!("reset {bdf}: waiting for the daemon's answer (another reset may hold the device's gate)")
                },
                || client.request(&request),
            );
            match answer {
                Ok(Response::Ok { data }) => {
                    return Ok(Output {
                        json: json!({ "bdf": bdf.to_string(), "reset": true, "via": "daemon", "retries": attempt, "data": data }),
                        text: format!("{bdf}: reset through the daemon's gate"),
                    })
                }
                Ok(Response::Error {
                    kind: ErrorKind::Busy,
                    message,
                }) if attempt < retries => {
                    attempt += 1;
                    eprintln!("{bdf}: busy, retried ({message})");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
                // Not the daemon's: reset it directly.
                Ok(Response::Error {
                    kind: ErrorKind::NotFound,
                    ..
                }) => break,
                Ok(Response::Error { kind, message }) => {
                    return Err(Failure::from_response(kind, message))
                }
                Err(e) => return Err(Failure::from_error(&e)),
            }
        }
    }
    standalone_reset(bdf)
}

fn standalone_reset(bdf: Bdf) -> Result<Output, Failure> {
    let sysfs = PciSysfs::default();
    let driver = sysfs.driver(bdf).map_err(|e| Failure::from_error(&e))?;
    let how = stderr_after_slow(
        || {
            format!(
                "reset {bdf}: waiting for the kernel's reset (another reset may hold the device)"
            )
        },
        || kernel_reset(&sysfs, bdf, driver.as_deref()),
    )?;
    Ok(Output {
        json: json!({ "bdf": bdf.to_string(), "reset": true, "via": how }),
        text: format!("{bdf}: reset ({how}; no daemon owns it)"),
    })
}

/// Resets a device no daemon owns: through VFIO when vfio-pci has it,
/// else through sysfs; returns how.
fn kernel_reset(sysfs: &PciSysfs, bdf: Bdf, driver: Option<&str>) -> Result<&'static str, Failure> {
    use crate::backend::PciBackend;
    let how = match driver {
        Some(VFIO_PCI) => {
            let mut b = crate::vfio::VfioBackend::open(bdf).map_err(|e| Failure::from_error(&e))?;
            b.reset().map_err(|e| {
                let code = if e.is_transient() {
                    exit::BUSY
                } else {
                    exit::FAILED
                };
                Failure::new(
                    code,
                    kind_name(code),
                    format!("{bdf}: VFIO_DEVICE_RESET: {}", crate::error_chain(&e)),
                )
            })?;
            "VFIO_DEVICE_RESET"
        }
        _ => {
            // Without a method the kernel hides the `reset` attribute, and
            // writing it would fail with a bare ENOENT.
            let methods = sysfs
                .reset_methods(bdf)
                .map_err(|e| Failure::from_error(&e))?;
            if methods.is_empty() {
                return Err(Failure::new(
                    exit::FAILED,
                    "failed",
                    format!(
                        "{bdf}: no reset method: the kernel knows no way to reset this \
                         function alone (its reset_method is empty; a device on the root bus \
                         without FLR or PM reset has none)"
                    ),
                ));
            }
            sysfs
                .reset_function(bdf)
                .map_err(|e| Failure::from_error(&e))?;
            "sysfs reset"
        }
    };
    Ok(how)
}

fn simple(common: &Common, request: Request, done: &str) -> Result<Output, Failure> {
    let mut client = need_daemon(common)?;
    let data = ask(&mut client, &request)?;
    let bdf = data["bdf"].as_str().unwrap_or_default().to_owned();
    Ok(Output {
        json: data,
        text: format!("{bdf}: {done}"),
    })
}

fn metrics(common: &Common) -> Result<Output, Failure> {
    let mut client = need_daemon(common)?;
    let data = ask(&mut client, &Request::Metrics)?;
    let text = data["text"]
        .as_str()
        .unwrap_or_default()
        .trim_end()
        .to_owned();
    Ok(Output { json: data, text })
}

fn restart(common: &Common) -> Result<Output, Failure> {
    let mut client = need_daemon(common)?;
    let data = ask(&mut client, &Request::Restart)?;
    let text = format!(
        "daemon (pid {}) restarting with {} device(s) and {} session(s) kept",
        data["pid"], data["devices"], data["sessions"]
    );
    Ok(Output { json: data, text })
}

fn validate(paths: &[PathBuf]) -> Result<Output, Failure> {
    let mut results = Vec::new();
    let mut text = Vec::new();
    let mut first_error = None;
    for path in paths {
        match Config::load(path) {
            Ok(c) => {
                results.push(json!({ "path": path.display().to_string(), "ok": true, "devices": c.devices.len() }));
                text.push(format!(
                    "{}: OK ({} device(s))",
                    path.display(),
                    c.devices.len()
                ));
            }
            Err(e) => {
                let message = crate::error_chain(&e);
                results.push(
                    json!({ "path": path.display().to_string(), "ok": false, "error": message }),
                );
                text.push(message.clone());
                first_error.get_or_insert(message);
            }
        }
    }
    match first_error {
        None => Ok(Output {
            json: Value::Array(results),
            text: text.join("\n"),
        }),
        Some(_) => Err(Failure::new(exit::CONFIG, "config", text.join("\n"))),
    }
}

#[cfg(test)]
mod tests {
    use super::binding::bounded;
    use super::*;

    fn change(wait: u64) -> Change {
        Change { force: true, wait }
    }

    #[test]
    fn a_binding_change_that_returns_in_time_gives_its_result() {
        let bdf: Bdf = "0000:00:04.0".parse().unwrap();
        let got = bounded(bdf, "bind", &change(5), || Ok(7)).unwrap();
        assert_eq!(got, 7);
        let e = bounded::<()>(bdf, "bind", &change(5), move || {
            Err(SysfsError::NoDevice {
                bdf,
                path: "/nonexistent".into(),
            })
        })
        .unwrap_err();
        assert_eq!(e.code, exit::NOT_FOUND, "{}", e.message);
    }

    #[test]
    fn a_binding_change_that_blocks_gives_up_busy_at_the_deadline() {
        let bdf: Bdf = "0000:00:04.0".parse().unwrap();
        let start = Instant::now();
        // Stands for vfio-pci's unbind waiting for the device's user.
        let e = bounded(bdf, "bind", &change(1), || {
            std::thread::sleep(Duration::from_secs(5));
            Ok(())
        })
        .unwrap_err();
        let took = start.elapsed();
        assert_eq!(e.code, exit::BUSY, "{}", e.message);
        assert!(e.message.contains("gave up after 1 s"), "{}", e.message);
        assert!(e.message.contains("cannot be cancelled"), "{}", e.message);
        assert!(
            took >= Duration::from_secs(1) && took < Duration::from_millis(2500),
            "{took:?}"
        );
    }
}
