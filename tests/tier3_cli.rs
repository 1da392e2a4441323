//! Tier 3: the operator CLI never takes a device from a live user (issue 13
//! item 12), on the real uio_pci_generic and vfio-pci inside the vfio-intx
//! QEMU guest (guest/run.sh; scripts/tier3.sh).
//!
//! The binary is its own CLI (`tier3_cli cli ARGS...` runs `vfio-intx
//! ARGS...`) and its own device holder (`tier3_cli hold-uio PATH`, `tier3_cli
//! hold-vfio BDF`: open the device, print "ready", wait for stdin to close),
//! so the holders are real processes with their own pids.
//!
//! Runs its tests one after another (they rebind the guest's edus).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;

use vfio_intx::pci::sysfs::PciSysfs;
use vfio_intx::pci::Bdf;

mod common;
use common::guest_bdf;

const UIO_TEST: &str = "unbind_and_bind_of_a_uio_device_held_open_are_refused_naming_the_holder";
const VFIO_TEST: &str =
    "bind_to_uio_of_a_device_a_vfio_user_holds_is_refused_promptly_and_force_waits_bounded";
const RESET_TEST: &str = "reset_of_the_root_bus_edu_on_uio_says_no_reset_method";
const LINE_TEST: &str = "probe_names_the_uio_device_sharing_the_vfio_edus_line_and_its_driver";
const TESTS: [&str; 4] = [UIO_TEST, VFIO_TEST, RESET_TEST, LINE_TEST];

#[derive(Parser)]
#[command(name = "vfio-intx")]
struct Cli {
    #[command(subcommand)]
    command: vfio_intx::daemon::cli::Command,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("cli") => {
            let cli = Cli::parse_from(
                std::iter::once("vfio-intx".to_owned()).chain(args.iter().skip(2).cloned()),
            );
            return vfio_intx::daemon::cli::run(cli.command);
        }
        Some("hold-uio") => {
            let _file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&args[2])
                .unwrap();
            return hold();
        }
        Some("hold-vfio") => {
            let _device = vfio_intx::vfio::VfioBackend::open(args[2].parse().unwrap()).unwrap();
            return hold();
        }
        _ => {}
    }
    if args.iter().any(|a| a == "--list") {
        for t in TESTS {
            println!("{t}: test");
        }
        return ExitCode::SUCCESS;
    }
    if !common::in_guest(&TESTS.join(", "), "real uio_pci_generic and vfio-pci") {
        for t in TESTS {
            println!("test {t} ... ok (skipped)");
        }
        return ExitCode::SUCCESS;
    }
    // Filters as libtest takes them: run the tests whose names contain one.
    let filters: Vec<&String> = args[1..].iter().filter(|a| !a.starts_with("--")).collect();
    let chosen: Vec<&str> = TESTS
        .into_iter()
        .filter(|t| filters.is_empty() || filters.iter().any(|f| t.contains(f.as_str())))
        .collect();
    println!("running {} tests", chosen.len());
    for t in chosen {
        match t {
            UIO_TEST => uio_holder(),
            VFIO_TEST => vfio_holder(),
            LINE_TEST => shared_line(),
            _ => reset_without_method(),
        }
        println!("test {t} ... ok");
    }
    ExitCode::SUCCESS
}

/// The holder's life: say "ready", then wait for stdin to close.
fn hold() -> ExitCode {
    println!("ready");
    let _ = std::io::stdout().flush();
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    ExitCode::SUCCESS
}

/// A holder process, ended (and reaped) on drop.
struct Holder(Child);

impl Holder {
    fn start(what: &str, arg: &str) -> Self {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([what, arg])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "{what} {arg} did not get ready");
        Holder(child)
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `vfio-intx ARGS`; its exit code, stderr and how long it took.
fn cli(args: &[&str]) -> (Option<i32>, String, Duration) {
    let start = Instant::now();
    let out = Command::new(std::env::current_exe().unwrap())
        .arg("cli")
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!(
        "$ vfio-intx {}: {:?} {stderr}",
        args.join(" "),
        out.status.code()
    );
    (out.status.code(), stderr, start.elapsed())
}

fn driver(bdf: Bdf) -> Option<String> {
    PciSysfs::default().driver(bdf).unwrap()
}

/// A process holds the uio edu's /dev/uioN: `unbind` and `bind --driver
/// vfio-pci` are refused with exit 8 naming it, and change nothing;
/// `--force` takes the device anyway (uio does not block).
fn uio_holder() {
    let bdf = guest_bdf("VFIO_INTX_EDU_UIO");
    let b = bdf.to_string();
    assert_eq!(driver(bdf).as_deref(), Some("uio_pci_generic"));
    let node = PciSysfs::default().uio_device(bdf).unwrap().unwrap();
    let node = node.to_str().unwrap();
    let holder = Holder::start("hold-uio", node);
    let named = format!("PID {} (", holder.pid());

    let (code, err, _) = cli(&["unbind", &b]);
    assert_eq!(code, Some(8), "{err}");
    assert!(err.contains(&named) && err.contains(node), "{err}");
    assert!(
        err.starts_with(&format!("error: unbind {b}: in use: ")),
        "{err}"
    );
    assert_eq!(driver(bdf).as_deref(), Some("uio_pci_generic"));

    let (code, err, _) = cli(&["bind", "--driver", "vfio-pci", &b]);
    assert_eq!(code, Some(8), "{err}");
    assert!(err.contains(&named) && err.contains(node), "{err}");
    assert_eq!(driver(bdf).as_deref(), Some("uio_pci_generic"));

    // --force: the operator takes it; uio_pci_generic's unbind does not wait.
    let (code, err, took) = cli(&["unbind", "--force", &b]);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("--force"), "{err}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert_eq!(driver(bdf), None);
    drop(holder);
    let (code, err, _) = cli(&["bind", "--driver", "uio_pci_generic", &b]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(driver(bdf).as_deref(), Some("uio_pci_generic"));
}

/// A VFIO user holds the root-bus edu (container, group, device fd):
/// `bind --driver uio_pci_generic` is refused with exit 8 at once, naming
/// the holder and its group. With `--force` the kernel's unbind blocks: the
/// CLI says whom it waits for after a second and gives up at `--wait`
/// (exit 8); the write cannot be cancelled, so the process ends only when
/// the holder lets go. Afterwards the device is rebound to vfio-pci.
fn vfio_holder() {
    let bdf = guest_bdf("VFIO_INTX_EDU_NORESET");
    let group = common::guest_var("VFIO_INTX_EDU_NORESET_GROUP");
    let b = bdf.to_string();
    assert_eq!(driver(bdf).as_deref(), Some("vfio-pci"));
    let holder = Holder::start("hold-vfio", &b);
    let named = format!("PID {} (", holder.pid());

    let (code, err, took) = cli(&["bind", "--driver", "uio_pci_generic", &b]);
    assert_eq!(code, Some(8), "{err}");
    assert!(
        err.contains(&named) && err.contains(&format!("/dev/vfio/{group}")),
        "{err}"
    );
    assert!(took < Duration::from_secs(3), "refusal took {took:?}");
    assert_eq!(driver(bdf).as_deref(), Some("vfio-pci"));
    let (code, err, _) = cli(&["unbind", &b]);
    assert_eq!(code, Some(8), "{err}");

    // --force with the holder alive: a bounded, explained wait.
    let start = Instant::now();
    let mut forced = Command::new(std::env::current_exe().unwrap())
        .args(["cli", "unbind", "--force", "--wait", "3", &b])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = Arc::new(Mutex::new(String::new()));
    let reader = {
        let lines = Arc::clone(&lines);
        let stderr = forced.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let line = line.unwrap();
                eprintln!("forced unbind: {line} (at {:?})", start.elapsed());
                lines.lock().unwrap().push_str(&format!("{line}\n"));
            }
        })
    };
    let gave_up = loop {
        let text = lines.lock().unwrap().clone();
        if text.contains("gave up after 3 s") {
            break start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(8),
            "no give-up message: {text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = lines.lock().unwrap().clone();
    assert!(
        text.contains(&format!("unbind {b}: still waiting for {named}")),
        "{text}"
    );
    assert!(text.contains("cannot be cancelled"), "{text}");
    assert!(gave_up < Duration::from_secs(5), "gave up at {gave_up:?}");
    // The kernel write is still pending: the process cannot end yet.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        forced.try_wait().unwrap().is_none(),
        "the CLI ended although vfio-pci's unbind should still block"
    );
    let released = Instant::now();
    drop(holder);
    let status = forced.wait().unwrap();
    reader.join().unwrap();
    eprintln!(
        "{VFIO_TEST}: gave up at {gave_up:?}; the process ended {:?} after the holder let go",
        released.elapsed()
    );
    assert_eq!(status.code(), Some(8));
    assert_eq!(driver(bdf), None, "the unbind completes once released");
    let (code, err, _) = cli(&["bind", "--driver", "vfio-pci", &b]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(driver(bdf).as_deref(), Some("vfio-pci"));
}

/// The root-bus edu has no reset method: on uio_pci_generic (no daemon) a
/// reset says so instead of "No such file or directory".
fn reset_without_method() {
    let bdf = guest_bdf("VFIO_INTX_EDU_NORESET");
    let b = bdf.to_string();
    assert!(PciSysfs::default().reset_methods(bdf).unwrap().is_empty());
    let (code, err, _) = cli(&["bind", "--driver", "uio_pci_generic", &b]);
    assert_eq!(code, Some(0), "{err}");
    let (code, err, _) = cli(&["reset", &b]);
    let back = cli(&["bind", "--driver", "vfio-pci", &b]);
    assert!(err.contains("no reset method"), "{err}");
    assert_eq!(code, Some(1), "{err}");
    // The operation and the device, the device named once (issue 15 item 3).
    assert!(
        err.starts_with(&format!("error: reset {b}: no reset method")),
        "{err}"
    );
    assert_eq!(err.matches(b.as_str()).count(), 1, "{err}");
    assert_eq!(back.0, Some(0), "{}", back.1);
}

/// The extra device scripts/tier3.sh adds for this boot: an e1000 on the
/// root bus at slot 0x15, four slots after the root-bus edu (0x11): q35
/// routes both to GSI 20 + (slot mod 4) = 21.
const SHARER: &str = "0000:00:15.0";

/// Runs `vfio-intx ARGS`, which must succeed; its stdout.
fn cli_ok(args: &[&str]) -> String {
    let out = Command::new(std::env::current_exe().unwrap())
        .arg("cli")
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!(
        "$ vfio-intx {}: {:?}\n{stdout}{}",
        args.join(" "),
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0), "vfio-intx {}", args.join(" "));
    stdout
}

/// Issue 15 item 1: the root-bus edu on vfio-pci (held open by a VFIO user,
/// so vfio-pci has enabled it and its IRQ is the routed one) and the e1000
/// on uio_pci_generic share IRQ 21: `probe` of each names the other, its
/// driver and the IRQ, plain and `--json`, and calls the line shared-safe.
fn shared_line() {
    let sharer: Bdf = SHARER.parse().unwrap();
    if !PciSysfs::default().exists(sharer) {
        eprintln!(
            "SKIPPED {LINE_TEST}: no {SHARER} in this guest (scripts/tier3.sh adds an e1000 there \
             for tier3_cli)"
        );
        return;
    }
    let edu = guest_bdf("VFIO_INTX_EDU_NORESET");
    let e = edu.to_string();
    let (code, err, _) = cli(&["bind", "--driver", "uio_pci_generic", SHARER]);
    assert_eq!(code, Some(0), "{err}");
    let holder = Holder::start("hold-vfio", &e);

    let json: serde_json::Value = serde_json::from_str(&cli_ok(&["probe", "--json", &e])).unwrap();
    let line = &json["line"];
    assert_eq!(line["irq_source"], "routed", "{json:#}");
    let irq = line["irq"]
        .as_u64()
        .unwrap_or_else(|| panic!("no irq: {json:#}"));
    assert_eq!(line["verdict"], "shared-safe", "{json:#}");
    let sharers = line["sharers"].as_array().unwrap();
    let s = sharers
        .iter()
        .find(|s| s["bdf"] == SHARER)
        .unwrap_or_else(|| panic!("{SHARER} not named: {json:#}"));
    assert_eq!(s["driver"], "uio_pci_generic", "{json:#}");
    assert_eq!(s["masking"], true, "{json:#}");
    let handlers: Vec<&str> = line["handlers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|h| h.as_str())
        .collect();
    assert!(handlers.contains(&"uio_pci_generic"), "{json:#}");

    let plain = cli_ok(&["probe", &e]);
    assert!(
        plain.contains(&format!("line: shared-safe (host IRQ {irq})")),
        "{plain}"
    );
    assert!(
        plain.contains(&format!("shared with {SHARER} (uio_pci_generic, masks)")),
        "{plain}"
    );
    assert!(plain.contains("handlers: uio_pci_generic"), "{plain}");

    // And from the uio side: the edu on vfio-pci, on the same IRQ.
    let json: serde_json::Value =
        serde_json::from_str(&cli_ok(&["probe", "--json", SHARER])).unwrap();
    assert_eq!(json["line"]["irq"].as_u64(), Some(irq), "{json:#}");
    assert!(
        json["line"]["sharers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["bdf"] == e.as_str() && s["driver"] == "vfio-pci"),
        "{json:#}"
    );
    let plain = cli_ok(&["probe", SHARER]);
    assert!(
        plain.contains(&format!("shared with {e} (vfio-pci, masks)")),
        "{plain}"
    );
    drop(holder);
}
