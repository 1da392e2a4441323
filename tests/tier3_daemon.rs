//! Tier 3, the daemon on the real vfio-pci inside the vfio-intx QEMU guest:
//! the seed's reproducer against the daemon. The daemon owns the edu behind
//! a root port (it has a reset method), a VMM session (plain eventfds; this
//! test plays the VMM) receives its interrupts and EOIs them, and two shell
//! loops of `vfio-intx reset BDF` run in parallel while interrupts flow.
//! Expected: every interrupt raised is delivered and acknowledged, the
//! loops print nothing but clean "busy, retried" reports, and the daemon is
//! healthy afterwards and hands the device back on SIGTERM.
//!
//! The guest has only this executable (built statically by scripts/tier3.sh),
//! so it is also the `vfio-intx` binary: `THIS cli ARGS...` runs the CLI
//! (the same library code as src/bin/vfio-intx.rs), and a two-line
//! `vfio-intx` shell wrapper on the loops' PATH calls it. The daemon owns the
//! edu's VFIO group, so the test makes the edu interrupt and acknowledges it
//! through the daemon's `test-raise`/`test-ack` hooks (`edu-test-hooks`),
//! which write its BAR0 under the device's gate — except in the restart test
//! with a real KVM guest (`kvm_guest_restarts`), where the test is the
//! guest's VMM and raises and acknowledges the edu through a dup of the
//! daemon's device fd taken from the fd store, so that interrupts go on
//! while the daemon is away.
//!
//! harness = false: `--list` names the one test for scripts/tier3.sh;
//! outside the guest it prints a SKIP line and passes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use vfio_intx::daemon::client::Client;
use vfio_intx::daemon::protocol::{Request, Response};
use vfio_intx::daemon::DaemonStatus;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

mod common;
use common::{driver_of, guest_var, phys_asserting};

const TEST: &str = "daemon_services_the_edu_while_two_reset_loops_run";
const BIND_TEST: &str = "daemon_binds_vfio_pci_and_restores_the_previous_driver_on_sigterm";
const UIO_PENDING_TEST: &str =
    "sigterm_hands_back_a_uio_device_still_asserting_with_exit_0_and_no_error";
const HANDOVER_TEST: &str =
    "a_vmm_hands_over_its_own_vfio_device_fd_and_the_daemon_services_its_real_kvm_guest";
const REATTACH_TEST: &str =
    "a_new_bypass_session_attached_while_the_edu_asserts_keeps_interrupts_flowing_after_a_reset";
const RESTART_TEST: &str =
    "the_daemon_restarts_and_crashes_while_the_edu_interrupts_and_no_interrupt_is_lost";
const KVM_RESTART_TEST: &str =
    "a_kvm_guest_gets_every_edu_interrupt_exactly_once_while_the_daemon_restarts_or_is_away";
const UIO_RESTART_TEST: &str =
    "a_uio_device_and_its_session_survive_the_daemons_restarts_and_crashes_every_interrupt_once";
const HANDOVER_RESTART_TEST: &str =
    "a_session_on_a_vmms_own_device_fd_survives_the_daemons_restarts_and_crashes";
/// Restarts per path in the restart test (half `restart`, half kill -9).
const RESTARTS: usize = 10;
/// Restarts in the uio restart test (mixed `restart` and kill -9).
const UIO_RESTARTS: usize = 5;
/// Interrupts raised into the KVM guest per path in the handover test.
const HANDOVER_INTERRUPTS: u64 = 120;
/// Interrupts raised during the reset loops, at least.
const INTERRUPTS: u64 = 300;
/// Resets the loops must have done through the daemon before the raising
/// stops (about 10 a second in the emulated guest).
const MIN_RESETS: u64 = 50;

#[derive(Parser)]
#[command(name = "vfio-intx")]
struct Cli {
    #[command(subcommand)]
    command: vfio_intx::daemon::cli::Command,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("cli") {
        let cli = Cli::parse_from(
            std::iter::once("vfio-intx".to_owned()).chain(args.iter().skip(2).cloned()),
        );
        return vfio_intx::daemon::cli::run(cli.command);
    }
    if args.iter().any(|a| a == "--list") {
        println!("{TEST}: test");
        println!("{BIND_TEST}: test");
        println!("{UIO_PENDING_TEST}: test");
        println!("{HANDOVER_TEST}: test");
        println!("{REATTACH_TEST}: test");
        println!("{RESTART_TEST}: test");
        println!("{KVM_RESTART_TEST}: test");
        println!("{UIO_RESTART_TEST}: test");
        println!("{HANDOVER_RESTART_TEST}: test");
        return ExitCode::SUCCESS;
    }
    if !common::in_guest(TEST, "real vfio-pci") {
        println!("test {TEST} ... ok (skipped)");
        println!("test {BIND_TEST} ... ok (skipped)");
        println!("test {UIO_PENDING_TEST} ... ok (skipped)");
        println!("test {HANDOVER_TEST} ... ok (skipped)");
        println!("test {REATTACH_TEST} ... ok (skipped)");
        println!("test {RESTART_TEST} ... ok (skipped)");
        println!("test {KVM_RESTART_TEST} ... ok (skipped)");
        println!("test {UIO_RESTART_TEST} ... ok (skipped)");
        println!("test {HANDOVER_RESTART_TEST} ... ok (skipped)");
        return ExitCode::SUCCESS;
    }
    if args.iter().any(|a| a == HANDOVER_RESTART_TEST) {
        handover_restarts("userspace");
        handover_restarts("auto");
        println!("test {HANDOVER_RESTART_TEST} ... ok");
        return ExitCode::SUCCESS;
    }
    if args.iter().any(|a| a == UIO_RESTART_TEST) {
        uio_restarts();
        println!("test {UIO_RESTART_TEST} ... ok");
        return ExitCode::SUCCESS;
    }
    if args.iter().any(|a| a == RESTART_TEST) {
        restarts("userspace");
        restarts("auto");
        println!("test {RESTART_TEST} ... ok");
        return ExitCode::SUCCESS;
    }
    if args.iter().any(|a| a == KVM_RESTART_TEST) {
        kvm_guest_restarts("auto");
        kvm_guest_restarts("userspace");
        println!("test {KVM_RESTART_TEST} ... ok");
        return ExitCode::SUCCESS;
    }
    if args.iter().any(|a| a == REATTACH_TEST) {
        // Run just this one (guest/run.sh ... -- BINARY NAME).
        reattach_while_asserting();
        println!("test {REATTACH_TEST} ... ok");
        return ExitCode::SUCCESS;
    }
    // scripts/tier3.sh boots the restart tests one a boot (each by name)
    // and the rest in one: the emulated guest hangs now and then on long,
    // interrupt-heavy boots, and a short boot keeps a hang to one test.
    let without_restarts = args.iter().any(|a| a == "--without-restarts");
    println!("running {} tests", if without_restarts { 5 } else { 9 });
    // The user-space EOI path, then the kernel bypass (the session's
    // resample eventfd as vfio-pci's unmask eventfd).
    run("userspace");
    run("auto");
    println!("test {TEST} ... ok");
    bind_and_restore();
    println!("test {BIND_TEST} ... ok");
    uio_pending_hand_back();
    println!("test {UIO_PENDING_TEST} ... ok");
    handover("userspace");
    handover("auto");
    println!("test {HANDOVER_TEST} ... ok");
    reattach_while_asserting();
    println!("test {REATTACH_TEST} ... ok");
    if without_restarts {
        println!("\ntest result: ok. 5 passed; 0 failed");
        return ExitCode::SUCCESS;
    }
    restarts("userspace");
    restarts("auto");
    println!("test {RESTART_TEST} ... ok");
    kvm_guest_restarts("auto");
    kvm_guest_restarts("userspace");
    println!("test {KVM_RESTART_TEST} ... ok");
    uio_restarts();
    println!("test {UIO_RESTART_TEST} ... ok");
    handover_restarts("userspace");
    handover_restarts("auto");
    println!("test {HANDOVER_RESTART_TEST} ... ok");
    println!("\ntest result: ok. 9 passed; 0 failed");
    ExitCode::SUCCESS
}

struct Daemon {
    child: Child,
    socket: PathBuf,
    notify: UnixDatagram,
    log: Arc<Mutex<String>>,
}

impl Daemon {
    fn wait_notify(&self, what: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.notify.recv(&mut buf) {
                if String::from_utf8_lossy(&buf[..n]).contains(what) {
                    return;
                }
            }
        }
        panic!(
            "no {what} within {timeout:?}; log:\n{}",
            self.log.lock().unwrap()
        );
    }

    fn client(&self) -> Client {
        Client::connect(&self.socket, Duration::from_secs(60)).unwrap()
    }
}

fn ask(c: &mut Client, r: &Request) -> serde_json::Value {
    match c.request(r).unwrap() {
        Response::Ok { data } => data,
        other => panic!("{r:?}: {other:?}"),
    }
}

fn start_daemon(dir: &Path, bdf: &str, this: &Path, path: &str) -> Daemon {
    start_daemon_with(
        dir,
        this,
        &format!(
            "[[device]]\nbdf = \"{bdf}\"\nbackend = \"vfio\"\npath = \"{path}\"\nprobe = true\n\
             reset = true\nedu-test-hooks = true\n"
        ),
    )
}

fn start_daemon_with(dir: &Path, this: &Path, devices: &str) -> Daemon {
    let socket = dir.join("control.sock");
    let config = dir.join("daemon.toml");
    std::fs::write(
        &config,
        format!(
            "[daemon]\nsocket = \"{}\"\nstatus-interval-ms = 5000\nclient-timeout-ms = 60000\n\n\
             {devices}",
            socket.display()
        ),
    )
    .unwrap();
    let notify_path = dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut child = Command::new(this)
        .args(["cli", "daemon", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &notify_path)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let sink = Arc::clone(&log);
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            eprintln!("daemon: {line}");
            let mut l = sink.lock().unwrap();
            l.push_str(&line);
            l.push('\n');
        }
    });
    let d = Daemon {
        child,
        socket,
        notify,
        log,
    };
    d.wait_notify("READY=1", Duration::from_secs(60));
    d
}

/// A reset loop, as the 2011 reproducer: `while :; do vfio-intx reset BDF;
/// done`, in a process group of its own; output to `log`.
fn reset_loop(bin_dir: &Path, bdf: &str, socket: &Path, log: &Path) -> Child {
    let out = std::fs::File::create(log).unwrap();
    let err = out.try_clone().unwrap();
    Command::new("sh")
        .arg("-c")
        .arg(format!(
            "while :; do vfio-intx reset {bdf} --socket {} || echo \"RESET-FAILED rc=$?\"; done",
            socket.display()
        ))
        .env("PATH", format!("{}:/bin", bin_dir.display()))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .unwrap()
}

/// `bind = true`: the daemon takes the edu that the guest's init bound to
/// uio_pci_generic, binds it to vfio-pci, arms it, and at SIGTERM hands it
/// back to uio_pci_generic with driver_override as it was.
fn bind_and_restore() {
    let bdf = guest_var("VFIO_INTX_EDU_UIO");
    let this = std::env::current_exe().unwrap();
    let dir = PathBuf::from("/tmp/vfio-intx-daemon-bind");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let override_path = format!("/sys/bus/pci/devices/{bdf}/driver_override");
    let override_before = std::fs::read_to_string(&override_path).unwrap();
    assert_eq!(driver_of(&bdf).as_deref(), Some("uio_pci_generic"));
    let mut d = start_daemon_with(
        &dir,
        &this,
        &format!("[[device]]\nbdf = \"{bdf}\"\nbackend = \"vfio\"\nbind = true\nprobe = true\n"),
    );
    assert_eq!(driver_of(&bdf).as_deref(), Some("vfio-pci"));
    let mut c = d.client();
    let status: DaemonStatus = serde_json::from_value(ask(&mut c, &Request::Status)).unwrap();
    assert!(status.devices[0].bound_by_daemon, "{status:?}");
    // Issue 15 item 1, through the daemon: the armed edu's line is the
    // routed one, shared with its root port, with vfio-pci's handler on it.
    let line = status.devices[0]
        .line
        .clone()
        .expect("status names the line");
    eprintln!("{BIND_TEST}: status line: {}", line.summary);
    assert_eq!(
        (line.irq_source.as_str(), line.verdict.as_str()),
        ("routed", "shared-safe"),
        "{line:?}"
    );
    assert!(
        line.sharers
            .iter()
            .any(|s| s.driver.as_deref() == Some("pcieport")),
        "{line:?}"
    );
    assert_eq!(line.handlers, [format!("vfio-intx({bdf})")], "{line:?}");
    let probe: vfio_intx::daemon::protocol::ProbeReport = serde_json::from_value(ask(
        &mut c,
        &Request::Probe {
            bdf: bdf.parse().unwrap(),
        },
    ))
    .unwrap();
    assert!(probe.owned, "{probe:?}");
    assert_eq!(probe.line.as_ref(), Some(&line), "{probe:?}");
    drop(c);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(d.child.wait().unwrap().code(), Some(0));
    std::thread::sleep(Duration::from_millis(100));
    let log = d.log.lock().unwrap().clone();
    assert!(log.contains("driver_restored=true"), "{log}");
    assert_eq!(driver_of(&bdf).as_deref(), Some("uio_pci_generic"), "{log}");
    assert_eq!(
        std::fs::read_to_string(&override_path).unwrap(),
        override_before
    );
    eprintln!("{BIND_TEST}: {bdf} uio_pci_generic -> vfio-pci (daemon) -> uio_pci_generic");
}

/// Issue 11 item 12: the daemon owns the uio_pci_generic edu (`backend =
/// "uio"`), the edu raises an interrupt nobody acknowledges (parked: no
/// session), and SIGTERM hands the device back. Writing COMMAND as found
/// unmasks a line that still asserts, so uio_pci_generic's own handler masks
/// it again at once (found 0x0103, now 0x0503): that is the kernel driver's
/// state for its next user, and the daemon must say so at INFO and exit 0.
fn uio_pending_hand_back() {
    use common::{EDU_ACK, EDU_RAISE, EDU_STATUS};
    use vfio_intx::backend::ConfigSpace;
    use vfio_intx::pci::intx::read_command_status;
    use vfio_intx::pci::regs::{COMMAND_INTX_DISABLE, COMMAND_MEMORY, PCI_COMMAND};
    use vfio_intx::pci::sysfs::{PciSysfs, SysfsConfig};
    use vfio_intx::pci::{Bdf, Width};

    let bdf_s = guest_var("VFIO_INTX_EDU_UIO");
    let bdf: Bdf = bdf_s.parse().unwrap();
    assert_eq!(driver_of(&bdf_s).as_deref(), Some("uio_pci_generic"));
    let sysfs = PciSysfs::default();
    // Memory decoding on (BAR0 for the raise), INTx unmasked, nothing
    // pending: the COMMAND the daemon finds.
    let mut config = SysfsConfig::open(&sysfs, bdf).unwrap();
    let command = read_command_status(&mut config).unwrap().command;
    let found = (command | COMMAND_MEMORY) & !COMMAND_INTX_DISABLE;
    config
        .config_write(PCI_COMMAND, Width::Word, u32::from(found))
        .unwrap();
    let bar = common::Bar0::map(bdf);
    let pending = bar.read(EDU_STATUS);
    if pending != 0 {
        bar.write(EDU_ACK, pending);
    }

    let this = std::env::current_exe().unwrap();
    let dir = PathBuf::from("/tmp/vfio-intx-daemon-uio");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut d = start_daemon_with(
        &dir,
        &this,
        &format!("[[device]]\nbdf = \"{bdf_s}\"\nbackend = \"uio\"\nreset = false\n"),
    );
    bar.write(EDU_RAISE, 1);
    let mut c = d.client();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status: DaemonStatus = serde_json::from_value(ask(&mut c, &Request::Status)).unwrap();
        if status.devices[0].stats.engine.interrupts >= 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the raise never reached the daemon: {status:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(c);
    assert!(phys_asserting(bdf), "the edu no longer asserts");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let code = d.child.wait().unwrap().code();
    std::thread::sleep(Duration::from_millis(100));
    let log = d.log.lock().unwrap().clone();
    let after = read_command_status(&mut config).unwrap();
    // Leave the edu as the next test expects it: acknowledged, unmasked.
    bar.write(EDU_ACK, bar.read(EDU_STATUS));
    config
        .config_write(PCI_COMMAND, Width::Word, u32::from(found))
        .unwrap();
    assert_eq!(code, Some(0), "{log}");
    assert!(!log.contains("ERROR"), "{log}");
    let line = log
        .lines()
        .find(|l| l.contains("device restored"))
        .unwrap_or_else(|| panic!("not restored:\n{log}"));
    assert!(line.contains(&format!("command={found:#06x}")), "{line}");
    eprintln!(
        "{UIO_PENDING_TEST}: found {found:#06x}, after SIGTERM {:#06x} (asserting {}): {line}",
        after.command,
        after.asserting()
    );
}

/// Resets the engine has done so far.
fn engine_resets(c: &mut Client) -> u64 {
    let status: DaemonStatus = serde_json::from_value(ask(c, &Request::Status)).unwrap();
    status.devices[0].stats.engine.resets
}

fn run(path: &str) {
    eprintln!("{TEST}: path = {path:?}");
    let bdf = guest_var("VFIO_INTX_EDU_RESET");
    let this = std::env::current_exe().unwrap();
    let dir = PathBuf::from("/tmp/vfio-intx-daemon");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    let wrapper = dir.join("bin/vfio-intx");
    std::fs::write(
        &wrapper,
        format!("#!/bin/sh\nexec {} cli \"$@\"\n", this.display()),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();

    let started = Instant::now();
    let mut d = start_daemon(&dir, &bdf, &this, path);
    eprintln!("{TEST}: daemon READY after {:?}", started.elapsed());

    // The VMM: a session with plain eventfds; each injection is handled
    // like a guest ISR would: acknowledge the device, then EOI.
    let irqfd = EventFd::new(EFD_NONBLOCK).unwrap();
    let resample = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut session = d.client();
    let r = session
        .request_with_fds(
            &Request::session(bdf.parse().unwrap()),
            &[irqfd.as_raw_fd(), resample.as_raw_fd()],
        )
        .unwrap();
    let Response::Ok { data } = r else {
        panic!("{r:?}")
    };
    let wired = data["path"].as_str().unwrap_or_default().to_owned();
    eprintln!("{TEST}: session on {wired}");
    assert_eq!(
        wired.starts_with("kernel bypass"),
        path == "auto",
        "{wired}"
    );
    let acked = Arc::new(AtomicU64::new(0));
    let empty = Arc::new(AtomicU64::new(0));
    // Injections taken by the VMM, counted before its ISR acknowledges the
    // device (which lowers the line): "nothing was delivered" below must not
    // mistake an acknowledgement in flight for a lost interrupt.
    let delivered = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let vmm = {
        let (acked, empty, delivered, stop) = (
            Arc::clone(&acked),
            Arc::clone(&empty),
            Arc::clone(&delivered),
            Arc::clone(&stop),
        );
        let mut c = d.client();
        let bdf = bdf.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match irqfd.read() {
                    Ok(_) => {
                        delivered.fetch_add(1, Ordering::SeqCst);
                        let r = ask(
                            &mut c,
                            &Request::SimAck {
                                bdf: bdf.parse().unwrap(),
                            },
                        );
                        if r["acked"] == true {
                            acked.fetch_add(1, Ordering::SeqCst);
                        } else {
                            empty.fetch_add(1, Ordering::SeqCst);
                        }
                        resample.write(1).unwrap();
                    }
                    Err(_) => std::thread::sleep(Duration::from_micros(200)),
                }
            }
        })
    };

    // The reproducer: two reset loops through the CLI.
    let logs = [dir.join("loop1.log"), dir.join("loop2.log")];
    let mut loops: Vec<Child> = logs
        .iter()
        .map(|log| reset_loop(&dir.join("bin"), &bdf, &d.socket, log))
        .collect();

    let mut c = d.client();
    let t = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut raises = 0u64;
    let mut dropped_by_reset = 0u64;
    let mut i = 0;
    loop {
        let resets_before = engine_resets(&mut c);
        if i >= INTERRUPTS && (resets_before >= MIN_RESETS || i >= 10 * INTERRUPTS) {
            break;
        }
        i += 1;
        let raised_at = Instant::now();
        ask(
            &mut c,
            &Request::SimRaise {
                bdf: bdf.parse().unwrap(),
                count: 1,
            },
        );
        raises += 1;
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut next_check = Instant::now() + Duration::from_millis(100);
        while acked.load(Ordering::SeqCst) < raises {
            if Instant::now() > deadline {
                let status = ask(&mut c, &Request::Status);
                panic!(
                    "interrupt {i} was not delivered within 30 s (acked {} of \
                     {raises} raises); status {status}",
                    acked.load(Ordering::SeqCst)
                );
            }
            if Instant::now() >= next_check {
                next_check = Instant::now() + Duration::from_millis(100);
                // edu's reset quirk (see tier3_vfio): a reset while its
                // interrupt is pending drops the PCI line while edu keeps
                // the bit in its own status, so nothing is left to deliver.
                // Only a reset can do that: raising again re-asserts the
                // line, and the ISR then acknowledges both bits.
                // The line first, then the count: an ISR that lowered the
                // line by its acknowledgement was counted before it did.
                // ISR runs that found nothing to acknowledge (spurious) are
                // no delivery.
                let low = !phys_asserting(bdf.parse().unwrap());
                let empty_runs = empty.load(Ordering::SeqCst);
                if low && delivered.load(Ordering::SeqCst) - empty_runs < raises {
                    assert!(
                        engine_resets(&mut c) > resets_before,
                        "interrupt {i}: the line is low and nothing was delivered, but no \
                         reset overlapped: lost"
                    );
                    dropped_by_reset += 1;
                    ask(
                        &mut c,
                        &Request::SimRaise {
                            bdf: bdf.parse().unwrap(),
                            count: 1,
                        },
                    );
                    raises += 1;
                }
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        slowest = slowest.max(raised_at.elapsed());
    }
    let flowing = t.elapsed();

    for l in &loops {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(l.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    for l in &mut loops {
        let _ = l.wait();
    }
    let status: DaemonStatus = serde_json::from_value(ask(&mut c, &Request::Status)).unwrap();
    let dev = &status.devices[0];
    let mut busy = 0;
    let mut slow = 0;
    let mut bad = Vec::new();
    let mut resets_ok = 0;
    for log in &logs {
        let text = std::fs::read_to_string(log).unwrap();
        for line in text.lines() {
            if line.contains("busy, retried") {
                busy += 1;
            } else if line.contains("waiting for the daemon's answer") {
                // A reset waiting more than 1 s says so (issue 15 item 5).
                slow += 1;
            } else if line.contains("reset through the daemon's gate") {
                resets_ok += 1;
            } else if !line.trim().is_empty() {
                bad.push(line.to_owned());
            }
        }
    }
    eprintln!(
        "{TEST} ({wired}): {i} interrupts ({raises} raises, {dropped_by_reset} re-raised after \
         edu's reset quirk dropped the line) in {flowing:?} (slowest {slowest:?}) while the \
         loops reset the edu {resets_ok} times through the daemon ({} resets in the engine, \
         {busy} busy-and-retried, {slow} waited more than 1 s); engine {:?}",
        dev.stats.engine.resets, dev.stats.engine
    );
    // The last reset of a loop may have been killed mid-way: its line is
    // then missing, never an error.
    assert!(bad.is_empty(), "reset loops reported errors: {bad:#?}");
    assert!(
        dev.stats.engine.resets >= MIN_RESETS,
        "the loops hardly ran: {} resets",
        dev.stats.engine.resets
    );
    assert_eq!(acked.load(Ordering::SeqCst), raises, "interrupts lost");
    // On the user-space path every injection is for a pending interrupt.
    // On the bypass a guest EOI goes straight into the kernel and can land
    // inside a reset window (the gate cannot hold it back); the engine's
    // watchdog then re-syncs the line, and the kernel may signal once more
    // for an interrupt the guest is already servicing: a spurious ISR run,
    // as real guests tolerate, never a lost interrupt.
    let spurious = empty.load(Ordering::SeqCst);
    eprintln!("{TEST} ({wired}): {spurious} ISR runs found nothing to acknowledge");
    if path == "userspace" {
        assert_eq!(spurious, 0, "injections with nothing to acknowledge");
    }
    assert_eq!(dev.held, None);
    assert!(dev.session);

    // Healthy afterwards: another interrupt flows at once.
    ask(
        &mut c,
        &Request::SimRaise {
            bdf: bdf.parse().unwrap(),
            count: 1,
        },
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while acked.load(Ordering::SeqCst) < raises + 1 {
        assert!(
            Instant::now() < deadline,
            "no interrupt after the loops stopped"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    stop.store(true, Ordering::SeqCst);
    vmm.join().unwrap();
    drop(session);

    // And it hands the device back on SIGTERM.
    let t = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let code = d.child.wait().unwrap().code();
    let took = t.elapsed();
    std::thread::sleep(Duration::from_millis(100));
    let log = d.log.lock().unwrap().clone();
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("device restored"), "{log}");
    assert!(!log.contains(" ERROR "), "{log}");
    eprintln!("{TEST}: SIGTERM to exit {took:?}");
}

/// Waits for `fd` to be signalled and drains it.
fn signalled_within(fd: &EventFd, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if fd.read().is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    false
}

/// Issue 11 item 1 on the real vfio-pci: a session on the kernel bypass
/// ends with the edu's interrupt unserviced, and a new one attaches at
/// once while the edu still asserts (the daemon's detach then attach:
/// the user-space path's UNMASK signalled the engine's trigger in
/// between). The new session gets the interrupt; then a reset through the
/// daemon, and interrupts keep flowing to the new session.
fn reattach_while_asserting() {
    const ROUNDS: u32 = 20;
    let bdf = guest_var("VFIO_INTX_EDU_RESET");
    let this = std::env::current_exe().unwrap();
    let dir = PathBuf::from("/tmp/vfio-intx-daemon-reattach");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut d = start_daemon(&dir, &bdf, &this, "auto");
    let mut c = d.client();
    let raise = |c: &mut Client| {
        ask(
            c,
            &Request::SimRaise {
                bdf: bdf.parse().unwrap(),
                count: 1,
            },
        );
    };
    // Attaches as soon as the daemon lets the previous session go (busy
    // until then).
    let attach = |irqfd: &EventFd, resample: &EventFd| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut session = d.client();
            let r = session
                .request_with_fds(
                    &Request::session(bdf.parse().unwrap()),
                    &[irqfd.as_raw_fd(), resample.as_raw_fd()],
                )
                .unwrap();
            match r {
                Response::Ok { data } => {
                    let wired = data["path"].as_str().unwrap_or_default();
                    assert!(wired.starts_with("kernel bypass"), "{wired}");
                    return session;
                }
                Response::Error {
                    kind: vfio_intx::daemon::protocol::ErrorKind::Busy,
                    ..
                } if Instant::now() < deadline => {}
                other => panic!("{other:?}"),
            }
        }
    };
    let new_vmm = || {
        (
            EventFd::new(EFD_NONBLOCK).unwrap(),
            EventFd::new(EFD_NONBLOCK).unwrap(),
        )
    };
    let (mut irqfd, mut resample) = new_vmm();
    let mut session = attach(&irqfd, &resample);
    for round in 0..ROUNDS {
        raise(&mut c);
        assert!(
            signalled_within(&irqfd, Duration::from_secs(10)),
            "round {round}: the interrupt never reached the session"
        );
        // The VMM goes away without servicing it; the next one attaches at
        // once, its request queued behind the daemon's detach.
        drop(session);
        (irqfd, resample) = new_vmm();
        session = attach(&irqfd, &resample);
        assert!(
            signalled_within(&irqfd, Duration::from_secs(10)),
            "round {round}: the asserted line never reached the new session; status {}",
            ask(&mut c, &Request::Status)
        );
        // Its ISR, then a reset through the daemon.
        assert_eq!(
            ask(
                &mut c,
                &Request::SimAck {
                    bdf: bdf.parse().unwrap()
                }
            )["acked"],
            true
        );
        resample.write(1).unwrap();
        ask(
            &mut c,
            &Request::Reset {
                bdf: bdf.parse().unwrap(),
            },
        );
        for i in 0..5 {
            raise(&mut c);
            assert!(
                signalled_within(&irqfd, Duration::from_secs(10)),
                "round {round}: interrupt {i} after the reset never arrived; status {}",
                ask(&mut c, &Request::Status)
            );
            assert_eq!(
                ask(
                    &mut c,
                    &Request::SimAck {
                        bdf: bdf.parse().unwrap()
                    }
                )["acked"],
                true
            );
            resample.write(1).unwrap();
        }
    }
    let status: DaemonStatus = serde_json::from_value(ask(&mut c, &Request::Status)).unwrap();
    eprintln!(
        "{REATTACH_TEST}: {ROUNDS} rounds of detach/attach while asserting, reset, 5 \
         interrupts; engine {:?}",
        status.devices[0].stats.engine
    );
    session.end_session().unwrap();
    drop(c);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let code = d.child.wait().unwrap().code();
    let log = d.log.lock().unwrap().clone();
    assert_eq!(code, Some(0), "{log}");
}

/// The VMM's device as its tiny KVM guest sees it: config cycles through
/// the VMM's own VFIO device fd (the daemon masks through its copy), the
/// ISR's acknowledgement a write to the edu's BAR0 that the VMM mapped.
struct VmmEdu {
    backend: Mutex<vfio_intx::vfio::VfioBackend>,
    edu: Arc<vfio_intx::vfio::edu::Edu>,
}

impl vfio_intx::kvm::testvm::GuestDevice for VmmEdu {
    fn config_read(&self, offset: u16, width: vfio_intx::pci::Width) -> u32 {
        use vfio_intx::backend::ConfigSpace;
        self.backend
            .lock()
            .unwrap()
            .config_read(offset, width)
            .unwrap_or(u32::MAX)
    }
    fn config_write(&self, _: u16, _: vfio_intx::pci::Width, _: u32) {}
    fn ack(&self) -> bool {
        vfio_intx::kvm::assign::DeviceSide::ack(&*self.edu)
    }
}

/// VFIO device fds the process `pid` holds.
fn vfio_device_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|t| t == Path::new("anon_inode:[vfio-device]"))
        .count()
}

/// A session on the VMM's own device: this test is the VMM. It opens the
/// edu through VFIO itself (container, group, device fd), runs a tiny KVM
/// guest with the edu's INTx at GSI 5, and hands the daemon (which owns no
/// device) its device fd with the KVM irqfd and resample eventfd. Claims
/// the fd contradicts are refused first, and nothing is kept of them; then
/// the daemon services the INTx into the guest, an operator's `reset BDF`
/// goes through the daemon's gate mid-session, and when the session ends
/// the daemon lets go of the fd while the VMM's own stays usable.
fn handover(path: &str) {
    use vfio_intx::backend::ConfigSpace;
    use vfio_intx::kvm::assign::DeviceSide;
    use vfio_intx::kvm::testvm::{kick_until_finished, pic_state, TinyVm, VmControl};
    use vfio_intx::kvm::{Irqchip, ResampleIrqfd};
    use vfio_intx::pci::regs::PCI_STATUS;
    use vfio_intx::pci::Width;
    use vfio_intx::vfio::{edu::Edu, VfioBackend};
    const GSI: u8 = 5;
    const DEVFN: u8 = 3 << 3;

    eprintln!("{HANDOVER_TEST}: path = {path:?}");
    assert!(
        Path::new("/dev/kvm").exists(),
        "no /dev/kvm inside the guest: the guest's init loads kvm"
    );
    let bdf = guest_var("VFIO_INTX_EDU_RESET");
    let noreset = guest_var("VFIO_INTX_EDU_NORESET");
    let uio = guest_var("VFIO_INTX_EDU_UIO");
    let this = std::env::current_exe().unwrap();
    let dir = PathBuf::from("/tmp/vfio-intx-daemon-handover");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut d = start_daemon_with(&dir, &this, "");
    let pid = d.child.id();

    // The VMM's side: its own VFIO open, decoding on as firmware would.
    let mut backend = VfioBackend::open(bdf.parse().unwrap())
        .unwrap_or_else(|e| panic!("{}", vfio_intx::error_chain(&e)));
    let edu = Arc::new(
        Edu::enable(&mut backend).unwrap_or_else(|e| panic!("{}", vfio_intx::error_chain(&e))),
    );
    let device_fd = backend
        .device()
        .expect("opened through its group")
        .as_raw_fd();
    let mut vm = TinyVm::new(GSI, DEVFN, Irqchip::Full).unwrap();
    let irqfd = ResampleIrqfd::register(Arc::clone(vm.vm()), u32::from(GSI)).unwrap();
    let vm_fd = Arc::clone(vm.vm());
    let fds = [
        device_fd,
        irqfd.trigger().as_raw_fd(),
        irqfd.resample().as_raw_fd(),
    ];
    let setting: vfio_intx::daemon::config::PathSetting =
        serde_json::from_value(serde_json::Value::String(path.into())).unwrap();
    let session_request = |claim: Option<&str>| {
        Request::device_fd_session(claim.map(|c| c.parse().unwrap()), Some(setting))
    };

    // Claims the evidence contradicts are refused, naming both devices.
    for (claim, evidence) in [
        (noreset.as_str(), "hot-reset scope".to_owned()),
        (uio.as_str(), "bound to uio_pci_generic".to_owned()),
    ] {
        let r = d
            .client()
            .request_with_fds(&session_request(Some(claim)), &fds)
            .unwrap();
        eprintln!("{HANDOVER_TEST}: claiming {claim}: {r:?}");
        assert!(
            matches!(&r, Response::Error { kind: vfio_intx::daemon::protocol::ErrorKind::BadRequest, message }
                if message.contains(claim) && message.contains("is another device")
                    && message.contains(&evidence)),
            "{claim}: {r:?}"
        );
    }
    // Without an address the kernel must name the device (Linux 6.18+).
    let kernel_names = std::fs::read_to_string(format!("/proc/self/fdinfo/{device_fd}"))
        .unwrap()
        .contains("vfio-device-syspath:");
    if !kernel_names {
        let r = d
            .client()
            .request_with_fds(&session_request(None), &fds)
            .unwrap();
        assert!(
            matches!(&r, Response::Error { kind: vfio_intx::daemon::protocol::ErrorKind::BadRequest, message }
                if message.contains("name the device")),
            "{r:?}"
        );
    }
    let status: DaemonStatus =
        serde_json::from_value(ask(&mut d.client(), &Request::Status)).unwrap();
    assert!(status.devices.is_empty(), "a refused claim left {status:?}");
    assert_eq!(
        vfio_device_fds(pid),
        0,
        "the daemon kept a refused device fd"
    );

    // The real claim: proven by the hot-reset scope (the edu is alone
    // behind its root port) or by the kernel's fdinfo.
    let mut session = d.client();
    let r = session
        .request_with_fds(&session_request(Some(&bdf)), &fds)
        .unwrap();
    let Response::Ok { data } = r else {
        panic!("{r:?}\nlog:\n{}", d.log.lock().unwrap())
    };
    eprintln!("{HANDOVER_TEST}: session {data}");
    let identity = data["identity"].as_str().unwrap_or_default().to_owned();
    let expected_identity = if kernel_names {
        "named by the kernel"
    } else {
        "the only device in the fd's hot-reset scope"
    };
    assert!(identity.starts_with(expected_identity), "{identity}");
    let wired = data["path"].as_str().unwrap_or_default().to_owned();
    assert_eq!(
        wired.starts_with("kernel bypass"),
        path == "auto",
        "{wired}"
    );
    assert_eq!(vfio_device_fds(pid), 1);
    // The same device twice is busy, and so is a session naming it alone.
    let r = d
        .client()
        .request_with_fds(&session_request(Some(&bdf)), &fds)
        .unwrap();
    assert!(
        matches!(
            &r,
            Response::Error {
                kind: vfio_intx::daemon::protocol::ErrorKind::Busy,
                ..
            }
        ),
        "{r:?}"
    );
    let status: DaemonStatus =
        serde_json::from_value(ask(&mut d.client(), &Request::Status)).unwrap();
    let [dev] = &status.devices[..] else {
        panic!("{status:?}")
    };
    assert_eq!(dev.bdf.to_string(), bdf);
    assert!(dev.session);
    assert_eq!(dev.handed_over.as_deref(), Some(identity.as_str()));
    assert!(!dev.bound_by_daemon);
    let out = Command::new(&this)
        .args(["cli", "status", "--socket"])
        .arg(&d.socket)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!(
            "the VMM's own VFIO device fd, for its session; address {identity}"
        )),
        "{text}"
    );

    // The VMM's guest runs; the daemon services its INTx.
    let control = Arc::new(VmControl::default());
    let chipset = VmmEdu {
        backend: Mutex::new(backend),
        edu: Arc::clone(&edu),
    };
    let vcpu = {
        let control = Arc::clone(&control);
        std::thread::spawn(move || {
            let r = vm.run(DEVFN, &chipset, &control);
            (r, vm, chipset)
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !control.ready() {
        assert!(Instant::now() < deadline, "the KVM guest did not come up");
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut c = d.client();
    let t = Instant::now();
    let mut resets = 0;
    let mut slowest = Duration::ZERO;
    for i in 1..=HANDOVER_INTERRUPTS {
        if i % 40 == 0 {
            // An operator's reset between interrupts, through the gate of
            // the daemon's copy of the fd (the VMM's fd is the same device).
            let mut cli = Command::new(&this);
            let out = cli
                .args(["cli", "reset", &bdf, "--socket"])
                .arg(&d.socket)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "reset {bdf}: {text}");
            assert!(text.contains("reset through the daemon's gate"), "{text}");
            resets += 1;
        }
        let raised = Instant::now();
        edu.raise();
        let deadline = Instant::now() + Duration::from_secs(10);
        while control.acked() < i {
            if Instant::now() > deadline {
                let status = ask(&mut c, &Request::Status);
                panic!(
                    "interrupt {i} did not reach the guest (acked {}, empty ISR runs {}); \
                     daemon status {status}; edu status {:?}; guest {}",
                    control.acked(),
                    control.empty_isr_runs(),
                    edu.status(),
                    pic_state(&vm_fd)
                );
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        slowest = slowest.max(raised.elapsed());
    }
    let flowing = t.elapsed();
    let status: DaemonStatus = serde_json::from_value(ask(&mut c, &Request::Status)).unwrap();
    let dev = &status.devices[0];
    eprintln!(
        "{HANDOVER_TEST} ({wired}): {HANDOVER_INTERRUPTS} interrupts into the KVM guest in \
         {flowing:?} (slowest {slowest:?}), {resets} operator resets; engine {:?}",
        dev.stats.engine
    );
    assert_eq!(control.acked(), HANDOVER_INTERRUPTS, "interrupts lost");
    assert_eq!(control.empty_isr_runs(), 0, "injections for nothing");
    assert!(dev.stats.engine.resets >= resets, "{:?}", dev.stats.engine);
    if path == "userspace" {
        assert_eq!(dev.stats.engine.injected, HANDOVER_INTERRUPTS);
    }

    control.request_stop();
    assert!(
        kick_until_finished(&vcpu, Duration::from_secs(10)),
        "the vCPU did not stop"
    );
    let (r, vm, chipset) = vcpu.join().unwrap();
    r.unwrap();

    // The VMM ends the session and waits for the daemon to let go: by
    // then the device is unlisted and the daemon's copy of the fd closed.
    session.end_session().unwrap();
    let status: DaemonStatus = serde_json::from_value(ask(&mut c, &Request::Status)).unwrap();
    assert!(status.devices.is_empty(), "not released: {status:?}");
    assert_eq!(
        vfio_device_fds(pid),
        0,
        "the daemon kept the VMM's device fd"
    );
    // The log comes through a pipe: the line may trail the status.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !d.log.lock().unwrap().contains("VMM device released") {
        assert!(
            Instant::now() < deadline,
            "no release in the log:\n{}",
            d.log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // The VMM's own fd still drives the device: an interrupt it raises
    // shows in STATUS through it, and nothing masks it any more.
    let mut backend = chipset.backend.into_inner().unwrap();
    edu.raise();
    let deadline = Instant::now() + Duration::from_secs(5);
    while backend.config_read(PCI_STATUS, Width::Word).unwrap() as u16
        & vfio_intx::pci::regs::STATUS_INTERRUPT
        == 0
    {
        assert!(Instant::now() < deadline, "the VMM's fd sees no interrupt");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(edu.ack());
    drop((irqfd, vm, vm_fd, edu, backend));

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let code = d.child.wait().unwrap().code();
    let log = d.log.lock().unwrap().clone();
    assert_eq!(code, Some(0), "{log}");
    assert!(!log.contains(" ERROR "), "{log}");
}

/// Issue 14 on the real vfio-pci: the daemon owns the edu under a test-owned
/// service manager with systemd's fd store; a VMM (plain eventfds; this
/// test) takes its interrupts, acknowledging the edu through the daemon's
/// `test-ack` (vfio-pci holds BAR0's region, so sysfs `resource0` cannot be
/// mapped beside it) and EOIing; the daemon is restarted RESTARTS times
/// (half `vfio-intx restart`, half kill -9) while interrupts flow. Every
/// raise is delivered; the longest gap is printed per path. Raises and
/// acknowledgements go through the daemon, so none happens while it is
/// away, and one whose answer a restart lost is sent again: an edu raise
/// of a bit already pending is the same interrupt, and a second
/// acknowledgement finds nothing (counted, not an error here; tier 2
/// proves exactly-once).
fn restarts(path: &str) {
    use vfio_intx::fdstore_harness::{ServiceCommand, StoreOptions, Supervisor};
    eprintln!("{RESTART_TEST}: path = {path:?}");
    let bdf = guest_var("VFIO_INTX_EDU_RESET");
    let this = std::env::current_exe().unwrap();
    let dir = PathBuf::from("/tmp/vfio-intx-daemon-restart");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("control.sock");
    let config = dir.join("daemon.toml");
    std::fs::write(
        &config,
        format!(
            "[daemon]\nsocket = \"{}\"\nstatus-interval-ms = 5000\nclient-timeout-ms = 60000\n\n\
             [[device]]\nbdf = \"{bdf}\"\nbackend = \"vfio\"\npath = \"{path}\"\nprobe = true\n\
             reset = true\nedu-test-hooks = true\n",
            socket.display()
        ),
    )
    .unwrap();
    let log_path = dir.join("daemon.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let cmd = ServiceCommand::new(&this)
        .args(["cli", "daemon", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stderr(std::os::fd::OwnedFd::from(log));
    let mut sup = Supervisor::start(cmd, StoreOptions::default().with_max(64)).unwrap();
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    sup.wait_ready(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", log()));

    let irqfd = EventFd::new(EFD_NONBLOCK).unwrap();
    let resample = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut session = Client::connect(&socket, Duration::from_secs(60)).unwrap();
    let r = session
        .request_with_fds(
            &Request::session(bdf.parse().unwrap()),
            &[irqfd.as_raw_fd(), resample.as_raw_fd()],
        )
        .unwrap();
    let Response::Ok { data } = r else {
        panic!("{r:?}")
    };
    let wired = data["path"].as_str().unwrap_or_default().to_owned();
    assert_eq!(
        wired.starts_with("kernel bypass"),
        path == "auto",
        "{wired}"
    );

    // The VMM's ISR: acknowledge what the edu has pending, then EOI.
    let acked = Arc::new(AtomicU64::new(0));
    let empty = Arc::new(AtomicU64::new(0));
    let delivered = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let vmm = {
        let (delivered, acked, empty, stop, socket, bdf) = (
            Arc::clone(&delivered),
            Arc::clone(&acked),
            Arc::clone(&empty),
            Arc::clone(&stop),
            socket.clone(),
            bdf.clone(),
        );
        std::thread::spawn(move || {
            let mut c = None;
            while !stop.load(Ordering::SeqCst) {
                match irqfd.read() {
                    Ok(_) => {
                        delivered.fetch_add(1, Ordering::SeqCst);
                        let ack = Request::SimAck {
                            bdf: bdf.parse().unwrap(),
                        };
                        let (data, _) = ask_across_restarts(&socket, &mut c, &ack);
                        if data["acked"] == true {
                            acked.fetch_add(1, Ordering::SeqCst);
                        } else {
                            empty.fetch_add(1, Ordering::SeqCst);
                        }
                        resample.write(1).unwrap();
                    }
                    Err(_) => std::thread::sleep(Duration::from_micros(100)),
                }
            }
            (irqfd, resample)
        })
    };

    // Restarts on a thread of their own while the edu interrupts.
    let done = Arc::new(AtomicBool::new(false));
    let restarter = {
        let (done, this, socket) = (Arc::clone(&done), this.clone(), socket.clone());
        std::thread::spawn(move || {
            let mut downs = Vec::new();
            for i in 0..RESTARTS {
                std::thread::sleep(Duration::from_millis(300));
                let t0 = Instant::now();
                restart_daemon(&mut sup, &this, &socket, i);
                downs.push(t0.elapsed());
            }
            // Interrupts keep flowing a while on the last process.
            std::thread::sleep(Duration::from_secs(2));
            done.store(true, Ordering::SeqCst);
            (sup, downs)
        })
    };
    let mut gaps = Vec::new();
    let mut raises = 0u64;
    let mut merged = 0u64;
    let mut c = None;
    while !done.load(Ordering::SeqCst) || raises < 50 {
        let t0 = Instant::now();
        let raise = Request::SimRaise {
            bdf: bdf.parse().unwrap(),
            count: 1,
        };
        let (_, retried) = ask_across_restarts(&socket, &mut c, &raise);
        raises += 1;
        let deadline = t0 + Duration::from_secs(30);
        while delivered.load(Ordering::SeqCst) < raises {
            // A raise sent again after a restart lost its answer may have
            // been the same edu interrupt (its status bit still pending):
            // one delivery for both, once the line is low again.
            if retried
                && t0.elapsed() > Duration::from_secs(1)
                && delivered.load(Ordering::SeqCst) + 1 == raises
                && !phys_asserting(bdf.parse().unwrap())
            {
                merged += 1;
                raises -= 1;
                break;
            }
            if Instant::now() >= deadline {
                let status = ask_across_restarts(&socket, &mut c, &Request::Status).0;
                panic!(
                    "interrupt {raises} was not delivered within 30 s (delivered {}, retried {retried}, \
                     line asserting {}, /proc/interrupts:\n{}); status {status}; log:\n{}",
                    delivered.load(Ordering::SeqCst),
                    phys_asserting(bdf.parse().unwrap()),
                    std::fs::read_to_string("/proc/interrupts").unwrap_or_default(),
                    log()
                );
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        gaps.push(t0.elapsed());
        // The ISR finishes (its acknowledgement may wait for the daemon's
        // restart) before the next raise: edu merges a raise of a bit
        // still pending.
        while acked.load(Ordering::SeqCst) + empty.load(Ordering::SeqCst)
            < delivered.load(Ordering::SeqCst)
        {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "the ISR's acknowledgement did not complete; log:\n{}",
                log()
            );
            std::thread::sleep(Duration::from_micros(100));
        }
    }
    let (mut sup, mut downs) = restarter.join().unwrap();

    // One more restart (a kill -9) while the seed's two sysfs reset loops
    // run; then interrupts flow again. A reset while the edu's interrupt
    // is pending drops the line (edu's quirk, see tier3_vfio), so the last
    // raise is repeated while the line is low and nothing came.
    let loop_stop = AtomicBool::new(false);
    let loop_resets = AtomicU64::new(0);
    let during = std::thread::scope(|scope| {
        let loops: Vec<_> = (0..2)
            .map(|_| {
                scope.spawn(|| {
                    common::sysfs_reset_loop(bdf.parse().unwrap(), &loop_stop, || {
                        loop_resets.fetch_add(1, Ordering::SeqCst);
                    })
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        let t0 = Instant::now();
        sup.kill9_and_restart(Duration::from_secs(30)).unwrap();
        sup.wait_ready(Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{e}; log:\n{}", log()));
        let down = t0.elapsed();
        std::thread::sleep(Duration::from_millis(300));
        loop_stop.store(true, Ordering::SeqCst);
        for l in loops {
            let r = l.join().unwrap();
            assert!(r.resets > 0, "a reset loop did not reset: {r:?}");
        }
        down
    });
    let before = delivered.load(Ordering::SeqCst);
    let t0 = Instant::now();
    let raise = Request::SimRaise {
        bdf: bdf.parse().unwrap(),
        count: 1,
    };
    ask_across_restarts(&socket, &mut c, &raise);
    let mut again = 0;
    while delivered.load(Ordering::SeqCst) == before {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no interrupt after the restart under the reset loops; log:\n{}",
            log()
        );
        if t0.elapsed() > Duration::from_secs(1 + again) && !phys_asserting(bdf.parse().unwrap()) {
            again += 1;
            ask_across_restarts(&socket, &mut c, &raise);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    eprintln!(
        "{RESTART_TEST} ({wired}): a kill -9 and resume while two sysfs reset loops ran ({} \
         resets; daemon down {during:?}); the next interrupt delivered after {:?} ({again} \
         raised again after a reset dropped the line)",
        loop_resets.load(Ordering::SeqCst),
        t0.elapsed()
    );
    stop.store(true, Ordering::SeqCst);
    let _ = vmm.join().unwrap();
    assert!(
        delivered.load(Ordering::SeqCst) >= raises,
        "interrupts lost: {} delivered of {raises}",
        delivered.load(Ordering::SeqCst)
    );
    let spurious = empty.load(Ordering::SeqCst);
    let mut c = Client::connect(&socket, Duration::from_secs(60)).unwrap();
    let status: DaemonStatus = serde_json::from_value(ask(&mut c, &Request::Status)).unwrap();
    let dev = &status.devices[0];
    assert!(dev.session, "the session did not survive");
    gaps.sort();
    downs.sort();
    eprintln!(
        "{RESTART_TEST} ({wired}): {raises} interrupts across {RESTARTS} restarts, each delivered \
         ({merged} raises sent again after a lost answer were the same interrupt; {} \
         acknowledged); {spurious} acknowledgements found nothing (sent again after a lost \
         answer); raise -> ISR p50 {:?}, max {:?} (the longest gap); daemon down (signal -> \
         READY=1) p50 {:?}, max {:?}",
        acked.load(Ordering::SeqCst),
        gaps[gaps.len() / 2],
        gaps[gaps.len() - 1],
        downs[downs.len() / 2],
        downs[downs.len() - 1],
    );
    // Only an acknowledgement sent again after a restart lost its answer
    // finds nothing: at most one per restart.
    assert!(
        spurious <= RESTARTS as u64,
        "{spurious} acknowledgements found nothing; log:\n{}",
        log()
    );
    drop(c);
    session.end_session().unwrap();
    // A stop hands the device back as found and empties the store.
    let exit = sup
        .stop(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(10))
        .unwrap();
    assert_eq!(exit.code(), Some(0), "{}", log());
    assert!(log().contains("device restored"), "{}", log());
    assert_eq!(driver_of(&bdf).as_deref(), Some("vfio-pci"));
}

/// One interrupt of the KVM restart test: raised at `raised`, its ISR's
/// acknowledgement seen at `delivered`.
#[derive(Clone, Copy)]
struct Delivery {
    raised: Instant,
    delivered: Instant,
}

/// The raiser of the KVM restart test: it writes the edu's BAR0 through the
/// VMM's own access (a dup of the device fd from the store), never through
/// the daemon, and raises only once the guest acknowledged the previous one.
#[derive(Default)]
struct Raiser {
    stop: AtomicBool,
    pause: AtomicBool,
    idle: AtomicBool,
    raised: AtomicU64,
    log: Mutex<Vec<Delivery>>,
    failure: Mutex<Option<String>>,
}

/// Pause between one interrupt's acknowledgement and the next raise: keeps a
/// path's run at a few thousand interrupts (see TEST-LAB.md: very long runs
/// hang the emulated SVM layer now and then).
const RAISE_PACE: Duration = Duration::from_millis(5);
/// How long a kill -9 is left without a restart.
const HOLD: Duration = Duration::from_millis(500);

impl Raiser {
    /// Raises one interrupt and waits up to `timeout` for the guest's
    /// acknowledgement.
    fn one(
        &self,
        edu: &vfio_intx::vfio::edu::Edu,
        control: &vfio_intx::kvm::testvm::VmControl,
        timeout: Duration,
    ) -> Result<Delivery, String> {
        use vfio_intx::kvm::assign::DeviceSide;
        let n = self.raised.fetch_add(1, Ordering::SeqCst) + 1;
        let raised = Instant::now();
        edu.raise();
        while control.acked() < n {
            if raised.elapsed() > timeout {
                return Err(format!(
                    "interrupt {n} was not acknowledged by the guest within {timeout:?} \
                     (acked {}, ISR runs {}, empty {}; edu status {:?})",
                    control.acked(),
                    control.isr_runs(),
                    control.empty_isr_runs(),
                    edu.status()
                ));
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        let d = Delivery {
            raised,
            delivered: Instant::now(),
        };
        self.log.lock().unwrap().push(d);
        Ok(d)
    }

    fn run(&self, edu: &vfio_intx::vfio::edu::Edu, control: &vfio_intx::kvm::testvm::VmControl) {
        while !self.stop.load(Ordering::SeqCst) {
            if self.pause.load(Ordering::SeqCst) {
                self.idle.store(true, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            self.idle.store(false, Ordering::SeqCst);
            if let Err(e) = self.one(edu, control, Duration::from_secs(30)) {
                *self.failure.lock().unwrap() = Some(e);
                return;
            }
            std::thread::sleep(RAISE_PACE);
        }
    }

    fn pause(&self) {
        self.idle.store(false, Ordering::SeqCst);
        self.pause.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.idle.load(Ordering::SeqCst) && self.failure.lock().unwrap().is_none() {
            assert!(Instant::now() < deadline, "the raiser did not pause");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn check(&self, what: impl Fn() -> String) {
        if let Some(e) = self.failure.lock().unwrap().as_ref() {
            panic!("{e}; {}", what());
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

/// All fds of `pid`.
fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Issue 14 tier 3 with a real KVM guest: the daemon owns the edu on the
/// real vfio-pci under a test-owned service manager with systemd's fd store
/// (`Supervisor`); a tiny KVM guest (this test is its VMM) gets the edu's
/// INTx through a session on its irqfd and resample eventfd, and its ISR
/// acknowledges the edu itself (a trapped `out` the VMM turns into a BAR0
/// write through a dup of the device fd taken from the store). The test
/// raises the edu through that same dup, never through the daemon, so
/// interrupts keep being raised while the daemon is away. The daemon is
/// restarted RESTARTS times (half `vfio-intx restart`, half kill -9);
/// after each kill -9 the restart is held back for HOLD: on the kernel
/// bypass every interrupt raised then reaches the guest with no daemon
/// process at all; on the user path the one raised waits for the new
/// process and is delivered once. Then one more kill -9 while the seed's
/// two sysfs reset loops run. Every raise is acknowledged by exactly one
/// ISR run; the daemon's fds and the store's size stay as they were.
fn kvm_guest_restarts(path: &str) {
    use vfio_intx::fdstore_harness::{ServiceCommand, StoreOptions, Supervisor};
    use vfio_intx::kvm::assign::DeviceSide;
    use vfio_intx::kvm::testvm::{kick_until_finished, pic_state, TinyVm, VmControl};
    use vfio_intx::kvm::{Irqchip, ResampleIrqfd};
    use vfio_intx::vfio::{edu::Edu, VfioBackend};
    const GSI: u8 = 5;
    const DEVFN: u8 = 3 << 3;

    eprintln!("{KVM_RESTART_TEST}: path = {path:?}");
    assert!(
        Path::new("/dev/kvm").exists(),
        "no /dev/kvm inside the guest: the guest's init loads kvm"
    );
    // An instant as the daemon's log shows the time of day (UTC).
    let anchor = (Instant::now(), std::time::SystemTime::now());
    let clock = |i: Instant| {
        let t = anchor.1 + i.saturating_duration_since(anchor.0);
        let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let s = d.as_secs() % 86_400;
        format!(
            "{:02}:{:02}:{:02}.{:06}",
            s / 3600,
            s / 60 % 60,
            s % 60,
            d.subsec_micros()
        )
    };
    let bdf = guest_var("VFIO_INTX_EDU_RESET");
    let this = std::env::current_exe().unwrap();
    let dir = PathBuf::from("/tmp/vfio-intx-daemon-kvm-restart");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("control.sock");
    let config = dir.join("daemon.toml");
    // edu-test-hooks: the daemon turns the edu's memory decoding on through
    // its gate (as a guest's firmware would); its test-raise/test-ack hooks
    // are not used here.
    std::fs::write(
        &config,
        format!(
            "[daemon]\nsocket = \"{}\"\nstatus-interval-ms = 5000\nclient-timeout-ms = 60000\n\n\
             [[device]]\nbdf = \"{bdf}\"\nbackend = \"vfio\"\npath = \"{path}\"\nprobe = true\n\
             reset = true\nedu-test-hooks = true\n",
            socket.display()
        ),
    )
    .unwrap();
    let log_path = dir.join("daemon.log");
    let log_file = std::fs::File::create(&log_path).unwrap();
    let cmd = ServiceCommand::new(&this)
        .args(["cli", "daemon", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stderr(std::os::fd::OwnedFd::from(log_file));
    let mut sup = Supervisor::start(cmd, StoreOptions::default().with_max(64)).unwrap();
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let mut ready = vec![sup
        .wait_ready(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", log()))];

    // The VMM's access to the edu: a dup of the daemon's device fd from
    // the store (the daemon holds the group; its fd is the device).
    let device_name = format!("{}.vfio-device", bdf.replace(':', "-"));
    let stored = sup
        .store()
        .unwrap()
        .into_iter()
        .find(|e| e.name == device_name)
        .unwrap_or_else(|| panic!("no {device_name} in the store {:?}", sup.store_names()));
    let mut backend = VfioBackend::from_device_fd(stored.fd, Some(bdf.parse().unwrap()))
        .unwrap_or_else(|e| panic!("{}", vfio_intx::error_chain(&e)));
    let edu = Arc::new(
        Edu::resume(&mut backend).unwrap_or_else(|e| panic!("{}", vfio_intx::error_chain(&e))),
    );
    assert_eq!(edu.status().unwrap(), 0, "the edu has an interrupt pending");

    let mut vm = TinyVm::new(GSI, DEVFN, Irqchip::Full).unwrap();
    let irqfd = ResampleIrqfd::register(Arc::clone(vm.vm()), u32::from(GSI)).unwrap();
    let vm_fd = Arc::clone(vm.vm());
    let mut session = Client::connect(&socket, Duration::from_secs(60)).unwrap();
    let r = session
        .request_with_fds(
            &Request::session(bdf.parse().unwrap()),
            &[irqfd.trigger().as_raw_fd(), irqfd.resample().as_raw_fd()],
        )
        .unwrap();
    let Response::Ok { data } = r else {
        panic!("{r:?}\nlog:\n{}", log())
    };
    let wired = data["path"].as_str().unwrap_or_default().to_owned();
    let bypass = path == "auto";
    assert_eq!(wired.starts_with("kernel bypass"), bypass, "{wired}");

    let control = Arc::new(VmControl::default());
    let chipset = VmmEdu {
        backend: Mutex::new(backend),
        edu: Arc::clone(&edu),
    };
    let vcpu = {
        let control = Arc::clone(&control);
        std::thread::spawn(move || {
            let r = vm.run(DEVFN, &chipset, &control);
            (r, vm, chipset)
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !control.ready() {
        assert!(Instant::now() < deadline, "the KVM guest did not come up");
        std::thread::sleep(Duration::from_millis(1));
    }
    let raiser = Arc::new(Raiser::default());
    let raising = {
        let (raiser, edu, control) = (Arc::clone(&raiser), Arc::clone(&edu), Arc::clone(&control));
        std::thread::spawn(move || raiser.run(&edu, &control))
    };
    let diagnose = |sup: &Supervisor| {
        format!(
            "daemon pid {:?}; edu status {:?}; line asserting {}; guest {}; store {:?}; log:\n{}",
            sup.pid(),
            edu.status(),
            phys_asserting(bdf.parse().unwrap()),
            pic_state(&vm_fd),
            sup.store_names(),
            log()
        )
    };

    // Restarts while the edu interrupts; a kill -9 is held back.
    let mut store_size = None;
    let mut fds_first = None;
    let mut windows = Vec::new(); // (signalled, READY=1)
    let mut holds = Vec::new(); // (absent from, absent until)
    let mut phases = Vec::new(); // (signalled, exited, started again, READY=1)
    for i in 0..RESTARTS {
        std::thread::sleep(Duration::from_millis(300));
        raiser.check(|| diagnose(&sup));
        let t0 = Instant::now();
        if i % 2 == 0 {
            let out = Command::new(&this)
                .args(["cli", "restart", "--socket"])
                .arg(&socket)
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            let exit = sup.wait_exit(Duration::from_secs(30)).unwrap();
            assert_eq!(exit.code(), Some(75), "{}", diagnose(&sup));
        } else {
            sup.signal(nix::sys::signal::Signal::SIGKILL).unwrap();
            sup.wait_exit(Duration::from_secs(30)).unwrap();
            let absent = Instant::now();
            std::thread::sleep(HOLD);
            holds.push((absent, Instant::now()));
        }
        let exited = holds
            .last()
            .filter(|_| i % 2 == 1)
            .map_or_else(Instant::now, |h| h.0);
        let spawned = Instant::now();
        sup.restart().unwrap();
        ready.push(
            sup.wait_ready(Duration::from_secs(60))
                .unwrap_or_else(|e| panic!("{e}; {}", diagnose(&sup))),
        );
        windows.push((t0, Instant::now()));
        phases.push((t0, exited, spawned, Instant::now()));
        // The store as it was: the same entries after every restart.
        let names = sup.store_names();
        let size = *store_size.get_or_insert(names.len());
        assert_eq!(
            names.len(),
            size,
            "the store after restart {}: {names:?}",
            i + 1
        );
        if fds_first.is_none() {
            // The reference for the leak check: the first new process's
            // fds once its start has settled.
            std::thread::sleep(Duration::from_millis(200));
            fds_first = Some(fd_count(sup.pid().unwrap()));
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    raiser.check(|| diagnose(&sup));

    // One more kill -9 while the seed's two sysfs reset loops run; the
    // raiser is paused (a reset while the edu's interrupt is pending drops
    // the line: edu's quirk, see tier3_vfio), then one interrupt is raised
    // by hand, raised again (the same one, or a new one if the reset
    // dropped the raise) while nothing came and the line is low.
    raiser.pause();
    raiser.check(|| diagnose(&sup));
    let loop_stop = AtomicBool::new(false);
    let loop_resets = AtomicU64::new(0);
    let during = std::thread::scope(|scope| {
        let loops: Vec<_> = (0..2)
            .map(|_| {
                scope.spawn(|| {
                    common::sysfs_reset_loop(bdf.parse().unwrap(), &loop_stop, || {
                        loop_resets.fetch_add(1, Ordering::SeqCst);
                    })
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        let t0 = Instant::now();
        sup.kill9_and_restart(Duration::from_secs(30)).unwrap();
        let exec_ready = sup
            .wait_ready(Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{e}; {}", diagnose(&sup)));
        let down = t0.elapsed();
        std::thread::sleep(Duration::from_millis(300));
        loop_stop.store(true, Ordering::SeqCst);
        for l in loops {
            let r = l.join().unwrap();
            assert!(r.resets > 0, "a reset loop did not reset: {r:?}");
        }
        (down, exec_ready)
    });
    ready.push(during.1);
    let before = control.acked();
    let n = raiser.raised.fetch_add(1, Ordering::SeqCst) + 1;
    assert_eq!(
        before + 1,
        n,
        "interrupts outstanding before the reset loops"
    );
    let t0 = Instant::now();
    edu.raise();
    let mut again = 0;
    while control.acked() == before {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no interrupt after the restart under the reset loops; {}",
            diagnose(&sup)
        );
        if t0.elapsed() > Duration::from_secs(1 + again) && !phys_asserting(bdf.parse().unwrap()) {
            again += 1;
            edu.raise_lost();
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let after_loops = t0.elapsed();
    // Flowing again on the last process.
    raiser.pause.store(false, Ordering::SeqCst);
    std::thread::sleep(Duration::from_secs(2));
    raiser.stop.store(true, Ordering::SeqCst);
    raising.join().unwrap();
    raiser.check(|| diagnose(&sup));
    // Let a last acknowledgement settle, then count.
    std::thread::sleep(Duration::from_millis(200));
    let raised = raiser.raised.load(Ordering::SeqCst);
    let names = sup.store_names();
    assert_eq!(
        Some(names.len()),
        store_size,
        "the store at the end: {names:?}"
    );

    // Exactly once: as many acknowledging ISR runs as raises, and no ISR run
    // that found nothing (an injection for an interrupt already handled).
    assert_eq!(control.acked(), raised, "{}", diagnose(&sup));
    assert_eq!(
        control.empty_isr_runs(),
        0,
        "an ISR run found nothing pending: an interrupt delivered twice; {}",
        diagnose(&sup)
    );
    let deliveries = raiser.log.lock().unwrap().clone();

    // The holds: what happened while no daemon process existed.
    let mut absent_latency = Vec::new();
    let mut waited = Vec::new();
    for (k, &(from, until)) in holds.iter().enumerate() {
        let inside: Vec<_> = deliveries
            .iter()
            .filter(|d| d.raised >= from && d.raised < until)
            .collect();
        if bypass {
            let during: Vec<_> = inside.iter().filter(|d| d.delivered < until).collect();
            assert!(
                during.len() >= 5,
                "hold {k}: only {} of {} interrupts raised while the daemon was away reached the \
                 guest before its restart",
                during.len(),
                inside.len()
            );
            // Only the one raised at the very end may finish after it.
            let late = inside
                .iter()
                .filter(|d| d.delivered >= until && until - d.raised > Duration::from_millis(100))
                .count();
            assert_eq!(late, 0, "hold {k}: interrupts waited for the restart");
            absent_latency.extend(during.iter().map(|d| d.delivered - d.raised));
        } else {
            // Nothing raised while the daemon was away reaches the guest
            // before the new process takes the line over ...
            let early = inside.iter().filter(|d| d.delivered < until).count();
            assert_eq!(
                early, 0,
                "hold {k}: an interrupt reached the guest with no daemon on the user path"
            );
            // ... and the one outstanding then is delivered after it.
            let pending: Vec<_> = deliveries
                .iter()
                .filter(|d| d.raised < until && d.delivered >= until)
                .collect();
            assert_eq!(
                pending.len(),
                1,
                "hold {k}: none was waiting for the restart"
            );
            waited.push(pending[0].delivered - until);
        }
    }
    let in_window = |d: &Delivery, w: &(Instant, Instant)| d.raised < w.1 && d.delivered > w.0;
    let mut normal: Vec<Duration> = deliveries
        .iter()
        .filter(|d| !windows.iter().any(|w| in_window(d, w)))
        .map(|d| d.delivered - d.raised)
        .collect();
    let mut per_restart: Vec<Duration> = windows
        .iter()
        .map(|w| {
            deliveries
                .iter()
                .filter(|d| in_window(d, w))
                .map(|d| d.delivered - d.raised)
                .max()
                .unwrap_or_default()
        })
        .collect();
    // Where in a restart the longest waits fall: the old process stopping
    // (signal -> exit), no process (exit -> start again), the new one
    // resuming (start -> READY=1).
    let longest_in = |from: Instant, until: Instant| {
        deliveries
            .iter()
            .filter(|d| d.raised < until && d.delivered > from)
            .map(|d| d.delivered - d.raised)
            .max()
            .unwrap_or_default()
    };
    let mut stopping: Vec<_> = phases.iter().map(|p| longest_in(p.0, p.1)).collect();
    let mut away: Vec<_> = phases.iter().map(|p| longest_in(p.1, p.2)).collect();
    let mut resuming: Vec<_> = phases.iter().map(|p| longest_in(p.2, p.3)).collect();
    stopping.sort();
    away.sort();
    resuming.sort();
    let delivered_resuming = phases
        .iter()
        .map(|p| {
            deliveries
                .iter()
                .filter(|d| d.delivered >= p.2 && d.delivered < p.3)
                .count()
        })
        .sum::<usize>();
    let user_path_attaches = log()
        .matches("session attached on the user-space EOI path")
        .count();
    eprintln!(
        "{KVM_RESTART_TEST} ({wired}): the longest raise -> ISR per restart, by phase (p50 / \
         max): stopping {:?} / {:?}; no daemon process {:?} / {:?}; the new process resuming \
         (exec -> READY=1) {:?} / {:?}, {delivered_resuming} interrupts delivered while it \
         resumed; sessions attached on the user-space path: {} (log)",
        percentile(&stopping, 0.5),
        stopping.last().copied().unwrap_or_default(),
        percentile(&away, 0.5),
        away.last().copied().unwrap_or_default(),
        percentile(&resuming, 0.5),
        resuming.last().copied().unwrap_or_default(),
        user_path_attaches,
    );
    let mut all: Vec<Duration> = deliveries.iter().map(|d| d.delivered - d.raised).collect();
    normal.sort();
    per_restart.sort();
    all.sort();
    absent_latency.sort();
    waited.sort();
    ready.sort();
    let fds_first = fds_first.unwrap();
    // The longest wait while a new process resumed, placed among the
    // resume's steps as the daemon logged them (UTC, as its log).
    let longest = phases
        .iter()
        .flat_map(|p| {
            deliveries
                .iter()
                .filter(move |d| d.raised < p.3 && d.delivered > p.2)
        })
        .max_by_key(|d| d.delivered - d.raised);
    if let Some(d) = longest {
        let (from, until) = (
            clock(d.raised - Duration::from_millis(300)),
            clock(d.delivered + Duration::from_millis(50)),
        );
        let text = log();
        let steps: Vec<&str> = text
            .lines()
            .filter(|l| {
                l.get(11..26)
                    .is_some_and(|t| t >= from.as_str() && t <= until.as_str())
                    && [
                        "as the previous process left it",
                        "INTx armed",
                        "session attached",
                        "back on the kernel bypass",
                        "VMM session resumed",
                    ]
                    .iter()
                    .any(|k| l.contains(k))
            })
            .collect();
        eprintln!(
            "{KVM_RESTART_TEST} ({wired}): the longest wait while a new process resumed: raised \
             {}, in the guest's ISR {} ({:?}); the resume's steps then:\n{}",
            clock(d.raised),
            clock(d.delivered),
            d.delivered - d.raised,
            steps.join("\n")
        );
    }
    let pid = sup.pid().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while fd_count(pid) > fds_first && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let fds_now = fd_count(pid);
    eprintln!(
        "{KVM_RESTART_TEST} ({wired}): {raised} interrupts into the KVM guest across {RESTARTS} \
         restarts ({} kill -9 held {HOLD:?}) + 1 kill -9 under two sysfs reset loops ({} resets), \
         each acknowledged by exactly one ISR run (ISR runs {}, empty 0); raise -> ISR: normal \
         p50 {:?} max {:?}; per restart the longest p50 {:?} max {:?}; overall max {:?}",
        holds.len(),
        loop_resets.load(Ordering::SeqCst),
        control.isr_runs(),
        percentile(&normal, 0.5),
        normal.last().copied().unwrap_or_default(),
        percentile(&per_restart, 0.5),
        per_restart.last().copied().unwrap_or_default(),
        all.last().copied().unwrap_or_default(),
    );
    if bypass {
        eprintln!(
            "{KVM_RESTART_TEST} ({wired}): while no daemon process existed: {} interrupts \
             delivered, raise -> ISR p50 {:?} max {:?} (normal p50 {:?})",
            absent_latency.len(),
            percentile(&absent_latency, 0.5),
            absent_latency.last().copied().unwrap_or_default(),
            percentile(&normal, 0.5),
        );
    } else {
        eprintln!(
            "{KVM_RESTART_TEST} ({wired}): the interrupt raised while no daemon process existed \
             waited for the new one, then was delivered once: exec -> delivery p50 {:?} max {:?}",
            percentile(&waited, 0.5),
            waited.last().copied().unwrap_or_default(),
        );
    }
    eprintln!(
        "{KVM_RESTART_TEST} ({wired}): exec -> READY=1 p50 {:?} max {:?}; under the reset loops \
         down {:?}, next interrupt after {after_loops:?} ({again} raised again); daemon fds \
         {fds_first} after the first restart, {fds_now} at the end; store {} entries throughout",
        percentile(&ready, 0.5),
        ready.last().copied().unwrap_or_default(),
        during.0,
        store_size.unwrap(),
    );
    if bypass {
        // The kernel keeps delivering while the daemon is away, and the new
        // process adopts its wiring as it is: its resume adds no wait of its
        // own. Judged on the per-restart p50 (a re-wiring costs every
        // restart its tens of ms); the max is printed above, as single
        // waits of any phase (and of normal delivery) reach tens of ms when
        // the TCG guest's host is busy.
        let normal_p50 = percentile(&normal, 0.5);
        let bound = normal_p50 * 3 + Duration::from_millis(10);
        let resume_p50 = percentile(&resuming, 0.5);
        let adopted = log()
            .matches("session resumed on the adopted kernel bypass")
            .count();
        eprintln!(
            "{KVM_RESTART_TEST} ({wired}): resumes that adopted the kernel's bypass as wired: \
             {adopted}; the resume's longest wait per restart p50 {resume_p50:?} (bound {bound:?})"
        );
        assert!(
            resume_p50 <= bound,
            "{KVM_RESTART_TEST} ({wired}): a new process's resume made interrupts wait \
             {resume_p50:?} (p50 per restart; the bound: 3 x the normal raise -> ISR p50 \
             {normal_p50:?} + 10 ms = {bound:?}); the resume must adopt the kernel bypass, not \
             re-wire it"
        );
        assert!(
            adopted >= RESTARTS,
            "{KVM_RESTART_TEST} ({wired}): {adopted} of {RESTARTS}+ resumes adopted the kernel \
             bypass as wired:\n{}",
            log()
        );
    }
    assert!(
        fds_now <= fds_first,
        "the daemon's fds: {fds_now} at the end, {fds_first} after the first restart"
    );

    control.request_stop();
    assert!(
        kick_until_finished(&vcpu, Duration::from_secs(10)),
        "the vCPU did not stop"
    );
    let (r, vm, chipset) = vcpu.join().unwrap();
    r.unwrap();
    let mut c = Client::connect(&socket, Duration::from_secs(60)).unwrap();
    let status: DaemonStatus = serde_json::from_value(ask(&mut c, &Request::Status)).unwrap();
    assert!(status.devices[0].session, "the session did not survive");
    drop(c);
    session.end_session().unwrap();
    // The VMM's dup of the device fd goes before the stop: the daemon hands
    // the device back when the last fd of it closes.
    drop((chipset, edu, irqfd, vm, vm_fd));
    let exit = sup
        .stop(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(10))
        .unwrap();
    assert_eq!(exit.code(), Some(0), "{}", log());
    assert!(log().contains("device restored"), "{}", log());
    assert!(!log().contains("panicked"), "{}", log());
    assert_eq!(driver_of(&bdf).as_deref(), Some("vfio-pci"));
}

/// Issue 14 for uio_pci_generic: the daemon owns the uio edu with a VMM
/// session (user-space EOI path: uio has no kernel bypass) and is restarted
/// [`UIO_RESTARTS`] times (`restart` and kill -9 in turn) while the edu
/// interrupts. The raises and the ISR's acknowledgements go straight to the
/// edu's BAR0, so they go on while the daemon is away: the kernel's uio
/// handler masks and counts, and the resumed daemon must deliver what is
/// pending exactly once and unmask. Every raise is delivered exactly once
/// (each waits for the previous acknowledgement, so edu never merges
/// two), the daemon's fds and the store do not grow, and the session ends
/// cleanly afterwards with the device handed back.
fn uio_restarts() {
    use common::{EDU_ACK, EDU_RAISE, EDU_STATUS};
    use vfio_intx::backend::ConfigSpace;
    use vfio_intx::fdstore_harness::{ServiceCommand, StoreOptions, Supervisor};
    use vfio_intx::pci::intx::read_command_status;
    use vfio_intx::pci::regs::{COMMAND_INTX_DISABLE, COMMAND_MEMORY, PCI_COMMAND};
    use vfio_intx::pci::sysfs::{PciSysfs, SysfsConfig};
    use vfio_intx::pci::{Bdf, Width};

    let bdf_s = guest_var("VFIO_INTX_EDU_UIO");
    let bdf: Bdf = bdf_s.parse().unwrap();
    assert_eq!(driver_of(&bdf_s).as_deref(), Some("uio_pci_generic"));
    let mut config = SysfsConfig::open(&PciSysfs::default(), bdf).unwrap();
    let command = read_command_status(&mut config).unwrap().command;
    let found = (command | COMMAND_MEMORY) & !COMMAND_INTX_DISABLE;
    config
        .config_write(PCI_COMMAND, Width::Word, u32::from(found))
        .unwrap();
    let bar = Arc::new(common::Bar0::map(bdf));
    let pending = bar.read(EDU_STATUS);
    if pending != 0 {
        bar.write(EDU_ACK, pending);
    }

    let this = std::env::current_exe().unwrap();
    let dir = PathBuf::from("/tmp/vfio-intx-daemon-uio-restart");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("control.sock");
    let daemon_toml = dir.join("daemon.toml");
    std::fs::write(
        &daemon_toml,
        format!(
            "[daemon]\nsocket = \"{}\"\nstatus-interval-ms = 5000\nclient-timeout-ms = 60000\n\n\
             [[device]]\nbdf = \"{bdf_s}\"\nbackend = \"uio\"\nreset = false\n",
            socket.display()
        ),
    )
    .unwrap();
    let log_path = dir.join("daemon.log");
    let log_file = std::fs::File::create(&log_path).unwrap();
    let cmd = ServiceCommand::new(&this)
        .args(["cli", "daemon", "--config"])
        .arg(&daemon_toml)
        .env("RUST_LOG", "info")
        .stderr(std::os::fd::OwnedFd::from(log_file));
    let mut sup = Supervisor::start(cmd, StoreOptions::default().with_max(64)).unwrap();
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    sup.wait_ready(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", log()));

    let irqfd = EventFd::new(EFD_NONBLOCK).unwrap();
    let resample = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut session = Client::connect(&socket, Duration::from_secs(60)).unwrap();
    let r = session
        .request_with_fds(
            &Request::session(bdf),
            &[irqfd.as_raw_fd(), resample.as_raw_fd()],
        )
        .unwrap();
    assert!(matches!(r, Response::Ok { .. }), "{r:?}");
    let fds_of = |pid: Option<i32>| {
        std::fs::read_dir(format!("/proc/{}/fd", pid.unwrap()))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    let fds_before = fds_of(sup.pid());
    let mut store_before = sup.store_names();
    store_before.sort();

    // The VMM's ISR: acknowledge what the edu has pending, then EOI.
    let delivered = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(AtomicU64::new(0));
    let empty = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let vmm = {
        let (delivered, acked, empty, stop, bar) = (
            Arc::clone(&delivered),
            Arc::clone(&acked),
            Arc::clone(&empty),
            Arc::clone(&stop),
            Arc::clone(&bar),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match irqfd.read() {
                    Ok(_) => {
                        delivered.fetch_add(1, Ordering::SeqCst);
                        let pending = bar.read(EDU_STATUS);
                        if pending != 0 {
                            bar.write(EDU_ACK, pending);
                            acked.fetch_add(1, Ordering::SeqCst);
                        } else {
                            empty.fetch_add(1, Ordering::SeqCst);
                        }
                        resample.write(1).unwrap();
                    }
                    Err(_) => std::thread::sleep(Duration::from_micros(100)),
                }
            }
            (irqfd, resample)
        })
    };

    let done = Arc::new(AtomicBool::new(false));
    let restarter = {
        let (done, this, socket) = (Arc::clone(&done), this.clone(), socket.clone());
        std::thread::spawn(move || {
            let mut downs = Vec::new();
            for i in 0..UIO_RESTARTS {
                std::thread::sleep(Duration::from_millis(300));
                let t0 = Instant::now();
                restart_daemon(&mut sup, &this, &socket, i);
                downs.push(t0.elapsed());
            }
            std::thread::sleep(Duration::from_secs(1));
            done.store(true, Ordering::SeqCst);
            (sup, downs)
        })
    };
    let mut gaps = Vec::new();
    let mut raises = 0u64;
    while !done.load(Ordering::SeqCst) || raises < 50 {
        let t0 = Instant::now();
        bar.write(EDU_RAISE, 1);
        raises += 1;
        while delivered.load(Ordering::SeqCst) < raises
            || acked.load(Ordering::SeqCst) + empty.load(Ordering::SeqCst) < raises
        {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "interrupt {raises} was not delivered and acknowledged within 30 s (delivered \
                 {}, acknowledged {}, line asserting {}); log:\n{}",
                delivered.load(Ordering::SeqCst),
                acked.load(Ordering::SeqCst),
                phys_asserting(bdf),
                log()
            );
            std::thread::sleep(Duration::from_micros(100));
        }
        gaps.push(t0.elapsed());
        // Paced, as the KVM restart test is: the emulated guest's interrupt
        // layer hangs now and then on long interrupt-heavy boots
        // (guest/README.md).
        std::thread::sleep(RAISE_PACE);
    }
    let (mut sup, mut downs) = restarter.join().unwrap();
    // Anything sent twice would arrive by now.
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::SeqCst);
    let _ = vmm.join().unwrap();
    let fds_after = fds_of(sup.pid());
    let mut store_after = sup.store_names();
    store_after.sort();
    gaps.sort();
    downs.sort();
    eprintln!(
        "{UIO_RESTART_TEST}: {raises} interrupts across {UIO_RESTARTS} restarts: delivered {}, \
         acknowledged {}, found nothing {}; raise -> ISR p50 {:?}, max {:?}; daemon down p50 \
         {:?}, max {:?}; daemon fds {fds_before} -> {fds_after}; store {} -> {} entries",
        delivered.load(Ordering::SeqCst),
        acked.load(Ordering::SeqCst),
        empty.load(Ordering::SeqCst),
        gaps[gaps.len() / 2],
        gaps[gaps.len() - 1],
        downs[downs.len() / 2],
        downs[downs.len() - 1],
        store_before.len(),
        store_after.len(),
    );
    assert_eq!(delivered.load(Ordering::SeqCst), raises, "{}", log());
    assert_eq!(empty.load(Ordering::SeqCst), 0, "{}", log());
    assert!(fds_after <= fds_before, "{fds_before} -> {fds_after}");
    assert_eq!(store_before, store_after);
    let log_now = log();
    assert_eq!(
        log_now
            .matches("resumed from the fd store: no reset")
            .count(),
        UIO_RESTARTS,
        "{log_now}"
    );
    session.end_session().unwrap();
    let exit = sup
        .stop(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(10))
        .unwrap();
    let after = read_command_status(&mut config).unwrap();
    bar.write(EDU_ACK, bar.read(EDU_STATUS));
    config
        .config_write(PCI_COMMAND, Width::Word, u32::from(found))
        .unwrap();
    assert_eq!(exit.code(), Some(0), "{}", log());
    assert!(log().contains("device restored"), "{}", log());
    assert_eq!(after.command, found, "{}", log());
    assert_eq!(driver_of(&bdf_s).as_deref(), Some("uio_pci_generic"));
}

/// Issue 14 for a session on a VMM's own VFIO device fd: this test is the
/// VMM (its own VFIO open, a tiny KVM guest with the edu's INTx at GSI 5)
/// and hands the daemon, which owns no device, its device fd under the
/// test-owned service manager with the fd store. The daemon is restarted
/// [`UIO_RESTARTS`] times (`restart` and kill -9 in turn) while the edu
/// interrupts: every raise reaches the guest exactly once, the daemon's
/// fds and the store do not grow, the session is the same one (the VMM
/// sees no difference), and when it ends the daemon lets go of every copy
/// of the fd and removes its entries; the VMM's COMMAND is as it left it.
fn handover_restarts(path: &str) {
    use vfio_intx::backend::ConfigSpace;
    use vfio_intx::fdstore_harness::{ServiceCommand, StoreOptions, Supervisor};
    use vfio_intx::kvm::assign::DeviceSide;
    use vfio_intx::kvm::testvm::{kick_until_finished, pic_state, TinyVm, VmControl};
    use vfio_intx::kvm::{Irqchip, ResampleIrqfd};
    use vfio_intx::pci::regs::PCI_COMMAND;
    use vfio_intx::pci::Width;
    use vfio_intx::vfio::{edu::Edu, VfioBackend};
    const GSI: u8 = 5;
    const DEVFN: u8 = 3 << 3;

    eprintln!("{HANDOVER_RESTART_TEST}: path = {path:?}");
    assert!(
        Path::new("/dev/kvm").exists(),
        "no /dev/kvm inside the guest: the guest's init loads kvm"
    );
    let bdf = guest_var("VFIO_INTX_EDU_RESET");
    let this = std::env::current_exe().unwrap();
    let dir = PathBuf::from("/tmp/vfio-intx-daemon-handover-restart");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("control.sock");
    let daemon_toml = dir.join("daemon.toml");
    std::fs::write(
        &daemon_toml,
        format!(
            "[daemon]\nsocket = \"{}\"\nstatus-interval-ms = 5000\nclient-timeout-ms = 60000\n",
            socket.display()
        ),
    )
    .unwrap();
    let log_path = dir.join("daemon.log");
    let log_file = std::fs::File::create(&log_path).unwrap();
    let cmd = ServiceCommand::new(&this)
        .args(["cli", "daemon", "--config"])
        .arg(&daemon_toml)
        .env("RUST_LOG", "info")
        .stderr(std::os::fd::OwnedFd::from(log_file));
    let mut sup = Supervisor::start(cmd, StoreOptions::default().with_max(64)).unwrap();
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    sup.wait_ready(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", log()));
    let store_empty = sup.store_names();

    // The VMM's side: its own VFIO open, decoding on as firmware would.
    let mut backend = VfioBackend::open(bdf.parse().unwrap())
        .unwrap_or_else(|e| panic!("{}", vfio_intx::error_chain(&e)));
    let edu = Arc::new(
        Edu::enable(&mut backend).unwrap_or_else(|e| panic!("{}", vfio_intx::error_chain(&e))),
    );
    let command_before = backend.config_read(PCI_COMMAND, Width::Word).unwrap();
    let device_fd = backend
        .device()
        .expect("opened through its group")
        .as_raw_fd();
    let mut vm = TinyVm::new(GSI, DEVFN, Irqchip::Full).unwrap();
    let irqfd = ResampleIrqfd::register(Arc::clone(vm.vm()), u32::from(GSI)).unwrap();
    let vm_fd = Arc::clone(vm.vm());
    let fds = [
        device_fd,
        irqfd.trigger().as_raw_fd(),
        irqfd.resample().as_raw_fd(),
    ];
    let setting: vfio_intx::daemon::config::PathSetting =
        serde_json::from_value(serde_json::Value::String(path.into())).unwrap();
    let mut session = Client::connect(&socket, Duration::from_secs(60)).unwrap();
    let r = session
        .request_with_fds(
            &Request::device_fd_session(Some(bdf.parse().unwrap()), Some(setting)),
            &fds,
        )
        .unwrap();
    let Response::Ok { data } = r else {
        panic!("{r:?}\nlog:\n{}", log())
    };
    let wired = data["path"].as_str().unwrap_or_default().to_owned();
    assert_eq!(
        wired.starts_with("kernel bypass"),
        path == "auto",
        "{wired}"
    );
    let fds_of = |pid: Option<i32>| fd_targets(pid.unwrap());
    let fds_before = fds_of(sup.pid());
    let mut store_before = sup.store_names();
    store_before.sort();

    let control = Arc::new(VmControl::default());
    let chipset = VmmEdu {
        backend: Mutex::new(backend),
        edu: Arc::clone(&edu),
    };
    let vcpu = {
        let control = Arc::clone(&control);
        std::thread::spawn(move || {
            let r = vm.run(DEVFN, &chipset, &control);
            (r, vm, chipset)
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !control.ready() {
        assert!(Instant::now() < deadline, "the KVM guest did not come up");
        std::thread::sleep(Duration::from_millis(1));
    }

    let done = Arc::new(AtomicBool::new(false));
    let restarter = {
        let (done, this, socket) = (Arc::clone(&done), this.clone(), socket.clone());
        std::thread::spawn(move || {
            let mut downs = Vec::new();
            let mut counts = Vec::new();
            for i in 0..UIO_RESTARTS {
                std::thread::sleep(Duration::from_millis(300));
                let t0 = Instant::now();
                restart_daemon(&mut sup, &this, &socket, i);
                downs.push(t0.elapsed());
                counts.push(fd_targets(sup.pid().unwrap()).len());
                eprintln!(
                    "{HANDOVER_RESTART_TEST}: restart {i} serving again after {:?}",
                    t0.elapsed()
                );
            }
            std::thread::sleep(Duration::from_secs(1));
            done.store(true, Ordering::SeqCst);
            (sup, downs, counts)
        })
    };
    let mut gaps = Vec::new();
    let mut raises = 0u64;
    while !done.load(Ordering::SeqCst) || raises < 50 {
        let t0 = Instant::now();
        edu.raise();
        raises += 1;
        while control.acked() < raises {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "interrupt {raises} did not reach the guest within 30 s (acked {}, empty ISR \
                 runs {}, edu status {:?}, guest {}); log:\n{}",
                control.acked(),
                control.empty_isr_runs(),
                edu.status(),
                pic_state(&vm_fd),
                log()
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        gaps.push(t0.elapsed());
        std::thread::sleep(RAISE_PACE);
    }
    eprintln!("{HANDOVER_RESTART_TEST}: {raises} raised, waiting for the restarts to end");
    let (mut sup, mut downs, counts) = restarter.join().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let fds_after = fds_of(sup.pid());
    let mut store_after = sup.store_names();
    store_after.sort();
    control.request_stop();
    assert!(
        kick_until_finished(&vcpu, Duration::from_secs(10)),
        "the vCPU did not stop"
    );
    let (r, vm, chipset) = vcpu.join().unwrap();
    r.unwrap();
    gaps.sort();
    downs.sort();
    eprintln!(
        "{HANDOVER_RESTART_TEST} ({wired}): {raises} interrupts across {UIO_RESTARTS} restarts: \
         {} reached the guest, {} empty ISR runs; raise -> ISR p50 {:?}, max {:?}; daemon down \
         p50 {:?}, max {:?}; daemon fds {} -> {} (after each restart: {counts:?}); store {} -> {} \
         entries",
        control.acked(),
        control.empty_isr_runs(),
        gaps[gaps.len() / 2],
        gaps[gaps.len() - 1],
        downs[downs.len() / 2],
        downs[downs.len() - 1],
        fds_before.len(),
        fds_after.len(),
        store_before.len(),
        store_after.len(),
    );
    assert_eq!(control.acked(), raises, "{}", log());
    assert_eq!(control.empty_isr_runs(), 0, "{}", log());
    // The same descriptors, but for the read-only sysfs config file the
    // resumed process opened for the physical INTX_DISABLE (a lazily opened
    // cache, one per device; the first process had not needed it yet).
    let lasting = |t: &Vec<String>| -> Vec<String> {
        t.iter()
            .filter(|t| !(t.starts_with("/sys/") && t.ends_with("/config")))
            .cloned()
            .collect()
    };
    assert_eq!(
        lasting(&fds_before),
        lasting(&fds_after),
        "{fds_before:?} -> {fds_after:?}"
    );
    assert_eq!(store_before, store_after);
    let mut c = Client::connect(&socket, Duration::from_secs(60)).unwrap();
    let status: DaemonStatus = serde_json::from_value(ask(&mut c, &Request::Status)).unwrap();
    let [dev] = &status.devices[..] else {
        panic!("{status:?}")
    };
    assert!(dev.session && dev.handed_over.is_some(), "{status:?}");

    // The VMM ends the session (on the connection it opened before the
    // restarts): the daemon lets go of every copy and removes the entries.
    eprintln!("{HANDOVER_RESTART_TEST}: ending the session");
    session.end_session().unwrap();
    let status: DaemonStatus = serde_json::from_value(ask(&mut c, &Request::Status)).unwrap();
    assert!(status.devices.is_empty(), "not released: {status:?}");
    assert_eq!(
        vfio_device_fds(sup.pid().unwrap() as u32),
        0,
        "the daemon kept the VMM's device fd"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut names = sup.store_names();
        names.sort();
        if names == store_empty {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "entries left in the store: {names:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let backend = chipset.backend.into_inner().unwrap();
    let mut backend = backend;
    let command_after = backend.config_read(PCI_COMMAND, Width::Word).unwrap();
    assert_eq!(
        command_after, command_before,
        "COMMAND not as the VMM left it"
    );
    drop(c);
    drop((irqfd, vm, vm_fd, edu, backend));
    let exit = sup
        .stop(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(10))
        .unwrap();
    assert_eq!(exit.code(), Some(0), "{}", log());
    assert!(!log().contains(" ERROR "), "{}", log());
}

/// What each fd of process `pid` is (its /proc link), sorted.
fn fd_targets(pid: i32) -> Vec<String> {
    let mut t: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .map(|t| {
                    let t = t.display().to_string();
                    // Socket and pipe inode numbers differ between processes.
                    t.split(':').next().unwrap_or_default().to_owned()
                        + if t.starts_with("anon_inode") || t.starts_with('/') {
                            &t[t.find(':').map_or(t.len(), |i| i)..]
                        } else {
                            ""
                        }
                })
                .collect()
        })
        .unwrap_or_default();
    t.sort();
    t
}

/// Restart `i` of a restart test: an even one is `vfio-intx restart` (the
/// daemon exits 75 and is started again on its fd store), an odd one a
/// kill -9 and a start on the store; returns once the new process said
/// READY=1.
fn restart_daemon(
    sup: &mut vfio_intx::fdstore_harness::Supervisor,
    this: &Path,
    socket: &Path,
    i: usize,
) {
    if i % 2 == 0 {
        let out = Command::new(this)
            .args(["cli", "restart", "--socket"])
            .arg(socket)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let exit = sup.wait_exit(Duration::from_secs(30)).unwrap();
        assert_eq!(exit.code(), Some(75));
        sup.restart().unwrap();
    } else {
        sup.kill9_and_restart(Duration::from_secs(30)).unwrap();
    }
    sup.wait_ready(Duration::from_secs(60)).unwrap();
}

/// `r` on `c` (connected on demand), sent again on a new connection when a
/// restart of the daemon closed the old one.
/// Also whether it had to be sent again.
fn ask_across_restarts(
    socket: &Path,
    c: &mut Option<Client>,
    r: &Request,
) -> (serde_json::Value, bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut retried = false;
    loop {
        if c.is_none() {
            *c = Client::connect(socket, Duration::from_secs(60)).ok();
        }
        if let Some(client) = c.as_mut() {
            match client.request(r) {
                Ok(Response::Ok { data }) => return (data, retried),
                Ok(other) => panic!("{r:?}: {other:?}"),
                Err(_) => {
                    *c = None;
                    retried = true;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "{r:?}: no daemon answered for 60 s"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}
