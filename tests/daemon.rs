//! The daemon, driven as systemd, operators and VMMs drive it: the real
//! binary with a NOTIFY_SOCKET the test owns, the control socket, signals,
//! and a VMM session with a real KVM guest.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use vfio_intx::daemon::client::Client;
use vfio_intx::daemon::exit;
use vfio_intx::daemon::protocol::{self, ErrorKind, FrameDecoder, Request, Response, MAX_FRAME};
use vfio_intx::daemon::DaemonStatus;

const BIN: &str = env!("CARGO_BIN_EXE_vfio-intx");
const A: &str = "0000:00:04.0";
const B: &str = "0000:00:05.0";
const C: &str = "0000:00:06.0";

fn device(bdf: &str, extra: &str) -> String {
    format!("[[device]]\nbdf = \"{bdf}\"\nbackend = \"sim\"\n{extra}\n")
}

struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
    socket: PathBuf,
    config: PathBuf,
    notify: UnixDatagram,
    log: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
    started: Instant,
}

impl Daemon {
    /// Starts the daemon on `devices` (TOML) and waits for READY=1.
    fn start(devices: &str) -> Self {
        Self::start_with("", devices)
    }

    fn start_with(daemon_extra: &str, devices: &str) -> Self {
        let d = Self::spawn(daemon_extra, devices);
        let ready = d.wait_notify("READY=1", Duration::from_secs(10));
        assert!(ready.contains("STATUS="), "{ready}");
        d
    }

    fn spawn(daemon_extra: &str, devices: &str) -> Self {
        Self::spawn_as(daemon_extra, devices, |_, config| {
            let mut c = Command::new(BIN);
            c.args(["daemon", "--config"])
                .arg(config)
                .env_remove("JOURNAL_STREAM");
            c
        })
    }

    /// Starts the daemon with the command `command(dir, config)` returns
    /// (the binary, or a wrapper that runs it), with the test's
    /// NOTIFY_SOCKET and stderr.
    fn spawn_as(
        daemon_extra: &str,
        devices: &str,
        command: impl FnOnce(&Path, &Path) -> Command,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("control.sock");
        let config = dir.path().join("daemon.toml");
        std::fs::write(&config, Self::config_text(&socket, daemon_extra, devices)).unwrap();
        let notify_path = dir.path().join("notify.sock");
        let notify = UnixDatagram::bind(&notify_path).unwrap();
        notify
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let started = Instant::now();
        let mut child = command(dir.path(), &config)
            .env("NOTIFY_SOCKET", &notify_path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = Arc::clone(&log);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        Self {
            child,
            dir,
            socket,
            config,
            notify,
            log,
            reader: Some(reader),
            started,
        }
    }

    fn config_text(socket: &Path, daemon_extra: &str, devices: &str) -> String {
        format!(
            "[daemon]\nsocket = \"{}\"\nstatus-interval-ms = 500\n{daemon_extra}\n{devices}",
            socket.display()
        )
    }

    /// Waits for a notification containing `what`; returns it.
    fn wait_notify(&self, what: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            if let Ok(n) = self.notify.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                if msg.contains(what) {
                    return msg;
                }
                seen.push(msg);
            }
        }
        panic!(
            "no {what} within {timeout:?}; notifications {seen:?}; log:\n{}",
            self.log()
        );
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits for `needle` in the daemon's log. The log reaches the test
    /// through a pipe and a reader thread, so a line the daemon wrote just
    /// before answering a request may not be here yet.
    fn wait_log(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in the log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn client(&self) -> Client {
        Client::connect(&self.socket, Duration::from_secs(10)).unwrap()
    }

    fn ask(&self, request: &Request) -> serde_json::Value {
        match self.client().request(request).unwrap() {
            Response::Ok { data } => data,
            other => panic!("{request:?}: {other:?}"),
        }
    }

    fn status(&self) -> DaemonStatus {
        serde_json::from_value(self.ask(&Request::Status)).unwrap()
    }

    fn interrupts(&self, bdf: &str) -> u64 {
        let status = self.status();
        let d = status.devices.iter().find(|d| d.bdf == bdf).unwrap();
        d.stats.engine.interrupts
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }

    /// Waits for the process to exit; returns its code and how long it took.
    fn wait_exit(&mut self, timeout: Duration) -> (Option<i32>, Duration) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let took = start.elapsed();
                // Every line the daemon wrote, before anyone looks.
                if let Some(reader) = self.reader.take() {
                    reader.join().unwrap();
                }
                return (status.code(), took);
            }
            if start.elapsed() > timeout {
                let _ = self.child.kill();
                panic!(
                    "the daemon did not exit within {timeout:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(BIN)
            .args(args)
            .arg("--socket")
            .arg(&self.socket)
            .output()
            .unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[test]
fn the_daemon_notifies_ready_after_arming_and_answers_status() {
    let d = Daemon::start(&format!("{}{}", device(A, ""), device(B, "reset = true")));
    assert!(
        d.started.elapsed() < Duration::from_secs(5),
        "{:?}",
        d.started.elapsed()
    );
    let status = d.status();
    assert_eq!(status.pid, d.child.id());
    let bdfs: Vec<&str> = status.devices.iter().map(|d| d.bdf.as_str()).collect();
    assert_eq!(bdfs, [A, B]);
    assert_eq!(status.devices[1].stats.engine.resets, 1, "reset = true");
    assert!(status.devices[0].masking.contains("masking works"));
    assert_eq!(
        std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let out = d.cli(&["status"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(A) && text.contains(B), "{text}");
    let out = d.cli(&["status", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["devices"].as_array().unwrap().len(), 2);
    // Periodic STATUS= lines.
    d.wait_notify("STATUS=2 device(s) armed", Duration::from_secs(3));
}

#[test]
fn control_requests_reach_the_device() {
    let d = Daemon::start(&device(A, "sim-command = 0x0006"));
    // No session: the interrupt is delivered, parked for the next session.
    d.ask(&Request::SimRaise {
        bdf: A.into(),
        count: 1,
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while d.interrupts(A) < 1 {
        assert!(Instant::now() < deadline, "{}", d.log());
        std::thread::sleep(Duration::from_millis(5));
    }
    let stats = d.ask(&Request::Stats {
        bdf: Some(A.into()),
    });
    assert_eq!(stats[0]["engine"]["injected"], 1);
    assert_eq!(stats[0]["daemon"]["parked"], 1);
    // Reset through the gate, from the CLI.
    let out = d.cli(&["reset", A, "--json"]);
    assert!(out.status.success(), "{out:?}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["via"], "daemon");
    assert_eq!(d.status().devices[0].stats.engine.resets, 1);
    // Operator hold and release.
    assert!(d.cli(&["mask", A]).status.success());
    assert_eq!(d.status().devices[0].held.as_deref(), Some("operator"));
    assert!(d.cli(&["unmask", A]).status.success());
    assert_eq!(d.status().devices[0].held, None);
    // Probe answers from the start-time verdict.
    let p = d.ask(&Request::Probe { bdf: A.into() });
    assert_eq!(p["owned"], true);
    assert_eq!(p["supported"], true);
    // The simulated device has no driver: the toggle test, and it says so.
    assert_eq!(p["evidence"], "toggle-test", "{p}");
    // Prometheus text.
    let out = d.cli(&["metrics"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("vfio_intx_injected_total{{bdf=\"{A}\"}} 1")),
        "{text}"
    );
    assert!(text.contains("vfio_intx_round_trip_seconds_bucket"));
    // A device the daemon does not own.
    let out = d.cli(&["mask", "0000:00:1f.0"]);
    assert_eq!(out.status.code(), Some(i32::from(exit::NOT_FOUND)));
    let r = d
        .client()
        .request(&Request::SimAck { bdf: "zz".into() })
        .unwrap();
    assert!(
        matches!(
            r,
            Response::Error {
                kind: ErrorKind::BadRequest,
                ..
            }
        ),
        "{r:?}"
    );
}

#[test]
fn a_bad_config_is_reported_with_its_location_and_starts_nothing() {
    let mut d = Daemon::spawn("", &device(A, "colour = \"blue\""));
    let (code, _) = d.wait_exit(Duration::from_secs(5));
    assert_eq!(code, Some(i32::from(exit::CONFIG)));
    let log = d.log();
    let location = format!("{}:8:1: unknown field `colour`", d.config.display());
    assert!(log.contains(&location), "{log}");
    assert!(!d.socket.exists(), "no socket may be created");
    let mut buf = [0u8; 512];
    assert!(d.notify.recv(&mut buf).is_err(), "no notification at all");
    // A semantic error: the value is located too.
    let mut d = Daemon::spawn("", &device("0000:00:zz.0", ""));
    assert_eq!(
        d.wait_exit(Duration::from_secs(5)).0,
        Some(i32::from(exit::CONFIG))
    );
    d.wait_log(":6:7: invalid PCI address");
    // validate agrees, with --json.
    let out = Command::new(BIN)
        .args(["validate", "--json"])
        .arg(&d.config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(i32::from(exit::CONFIG)));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["error"]["kind"], "config");
}

#[test]
fn every_shipped_config_validates() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(files.iter().any(|f| f.ends_with("demo.toml")), "{files:?}");
    let out = Command::new(BIN)
        .arg("validate")
        .args(&files)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn malformed_and_oversized_frames_close_the_connection_with_an_error() {
    let d = Daemon::start(&device(A, ""));
    // Not JSON.
    let mut c = d.client();
    let body = b"{not json";
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(body);
    c.send_raw(&frame).unwrap();
    let r = c.read_response().unwrap();
    assert!(
        matches!(
            r,
            Response::Error {
                kind: ErrorKind::BadRequest,
                ..
            }
        ),
        "{r:?}"
    );
    assert!(c.read_response().is_err(), "the connection is closed");
    // An unknown operation.
    let r = d.client().request_raw_json(br#"{"op":"format-disk"}"#);
    assert!(
        matches!(
            r,
            Response::Error {
                kind: ErrorKind::BadRequest,
                ..
            }
        ),
        "{r:?}"
    );
    // Oversized: refused from the prefix alone, before any body.
    let mut c = d.client();
    c.send_raw(&((MAX_FRAME as u32) + 1).to_be_bytes()).unwrap();
    let r = c.read_response().unwrap();
    assert!(
        matches!(
            r,
            Response::Error {
                kind: ErrorKind::FrameTooLarge,
                ..
            }
        ),
        "{r:?}"
    );
    assert!(c.read_response().is_err());
    // A frame cut short by the client.
    let mut c = d.client();
    c.send_raw(&[0, 0, 0, 10, b'{']).unwrap();
    c.shutdown_write();
    let r = c.read_response().unwrap();
    assert!(
        matches!(
            r,
            Response::Error {
                kind: ErrorKind::BadRequest,
                ..
            }
        ),
        "{r:?}"
    );
    // Descriptors with a request that takes none.
    let mut c = d.client();
    let fd = std::fs::File::open("/dev/null").unwrap();
    let r = c
        .request_with_fds(&Request::Ping, &[fd.as_raw_fd()])
        .unwrap();
    assert!(
        matches!(
            r,
            Response::Error {
                kind: ErrorKind::BadRequest,
                ..
            }
        ),
        "{r:?}"
    );
    // Still healthy.
    assert!(d.ask(&Request::Ping)["pid"].is_number());
    assert_eq!(d.status().devices.len(), 1);
}

#[test]
fn an_idle_client_is_timed_out() {
    let d = Daemon::start_with("client-timeout-ms = 200", &device(A, ""));
    let mut c = d.client();
    let start = Instant::now();
    let r = c.read_response().unwrap();
    assert!(
        matches!(
            r,
            Response::Error {
                kind: ErrorKind::Timeout,
                ..
            }
        ),
        "{r:?}"
    );
    assert!(start.elapsed() >= Duration::from_millis(150));
    assert!(d.ask(&Request::Ping)["pid"].is_number());
}

#[test]
fn a_peer_with_another_uid_is_refused() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "SKIP a_peer_with_another_uid_is_refused: needs root to run a client as uid 65534"
        );
        return;
    }
    // The socket is world-writable here so that the refusal is the
    // daemon's SO_PEERCRED check, not the file mode.
    let d = Daemon::start_with("socket-mode = 0o666", &device(A, ""));
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new("setpriv")
        .args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            BIN,
        ])
        .args(["status", "--json", "--socket"])
        .arg(&d.socket)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(i32::from(exit::PERMISSION)),
        "{out:?}"
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["error"]["kind"], "permission-denied");
    assert!(json["error"]["message"]
        .as_str()
        .unwrap()
        .contains("uid 65534"));
    d.wait_log("refusing a client");
    // Root still gets in.
    assert!(d.ask(&Request::Ping)["pid"].is_number());
}

#[test]
fn sigterm_restores_every_device_within_a_second() {
    let mut d = Daemon::start(&format!(
        "{}{}",
        device(A, "sim-command = 0x0006"),
        device(B, "sim-command = 0x0002")
    ));
    // Leave an interrupt in service (masked, parked for a session) on A.
    d.ask(&Request::SimRaise {
        bdf: A.into(),
        count: 2,
    });
    d.signal(nix::sys::signal::Signal::SIGTERM);
    let (code, took) = d.wait_exit(Duration::from_secs(5));
    assert_eq!(code, Some(0), "{}", d.log());
    assert!(took < Duration::from_secs(1), "took {took:?}");
    d.wait_notify("STOPPING=1", Duration::from_secs(1));
    let log = d.log();
    for (bdf, command) in [(A, "0x0006"), (B, "0x0002")] {
        let line = log
            .lines()
            .find(|l| l.contains("device restored") && l.contains(bdf))
            .unwrap_or_else(|| panic!("{bdf} not restored:\n{log}"));
        assert!(line.contains(&format!("command={command}")), "{line}");
        assert!(line.contains("INTx delivery stopped"), "{line}");
    }
    assert!(!d.socket.exists(), "the socket is removed");
}

#[test]
fn sighup_reload_adds_and_removes_devices_and_leaves_unchanged_ones_alone() {
    let d = Daemon::start(&format!("{}{}", device(A, ""), device(B, "")));
    d.ask(&Request::SimRaise {
        bdf: A.into(),
        count: 1,
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while d.interrupts(A) < 1 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    // An invalid file changes nothing.
    std::fs::write(&d.config, "[[device]]\nbdf = 1\n").unwrap();
    d.signal(nix::sys::signal::Signal::SIGHUP);
    d.wait_notify("RELOADING=1", Duration::from_secs(5));
    let msg = d.wait_notify("READY=1", Duration::from_secs(5));
    assert!(msg.contains("reload failed"), "{msg}");
    assert_eq!(d.status().devices.len(), 2);
    // B removed, C added, A unchanged. B has a VMM session: it is closed.
    let mut vmm = FakeVmm::attach(&d, B);
    std::fs::write(
        &d.config,
        Daemon::config_text(
            &d.socket,
            "",
            &format!("{}{}", device(A, ""), device(C, "")),
        ),
    )
    .unwrap();
    d.signal(nix::sys::signal::Signal::SIGHUP);
    let msg = d.wait_notify("RELOADING=1", Duration::from_secs(5));
    assert!(msg.contains("MONOTONIC_USEC="), "{msg}");
    d.wait_notify("READY=1", Duration::from_secs(5));
    let status = d.status();
    let bdfs: Vec<&str> = status.devices.iter().map(|d| d.bdf.as_str()).collect();
    assert_eq!(bdfs, [A, C]);
    assert_eq!(d.interrupts(A), 1, "A keeps its statistics");
    vmm.session.wait_closed().unwrap();
    d.wait_log("device restored");
}

/// The VMM's side of the device in the session test: the guest's config
/// reads get COMMAND/STATUS with the interrupt bit set, and the ISR's
/// acknowledgement is the daemon's `sim-ack`.
struct VmmDevice {
    control: Mutex<Client>,
}

impl vfio_intx::kvm::testvm::GuestDevice for VmmDevice {
    fn config_read(&self, _offset: u16, _width: vfio_intx::pci::Width) -> u32 {
        0x0008_0006
    }
    fn config_write(&self, _: u16, _: vfio_intx::pci::Width, _: u32) {}
    fn ack(&self) -> bool {
        let r = self
            .control
            .lock()
            .unwrap()
            .request(&Request::SimAck { bdf: A.into() });
        matches!(r, Ok(Response::Ok { data }) if data["acked"] == true)
    }
}

#[test]
fn a_vmm_session_delivers_interrupts_to_a_real_kvm_guest_and_is_released_when_it_ends() {
    use vfio_intx::kvm::testvm::{kick_signal, TinyVm, VmControl};
    use vfio_intx::kvm::{Irqchip, ResampleIrqfd};
    use vmm_sys_util::signal::Killable;
    if !Path::new("/dev/kvm").exists() {
        eprintln!("SKIP a_vmm_session_delivers_interrupts_to_a_real_kvm_guest: no /dev/kvm");
        return;
    }
    let d = Daemon::start(&device(A, ""));
    const N: u64 = 50;
    const GSI: u8 = 5;
    const DEVFN: u8 = 3 << 3;
    let mut vm = TinyVm::new(GSI, DEVFN, Irqchip::Full).unwrap();
    let irqfd = ResampleIrqfd::register(Arc::clone(vm.vm()), u32::from(GSI)).unwrap();

    // Descriptors of the wrong type are refused.
    let pipe = nix::unistd::pipe().unwrap();
    let r = d
        .client()
        .request_with_fds(
            &Request::session(A),
            &[pipe.0.as_raw_fd(), irqfd.resample().as_raw_fd()],
        )
        .unwrap();
    assert!(
        matches!(&r, Response::Error { kind: ErrorKind::BadRequest, message } if message.contains("not an eventfd")),
        "{r:?}"
    );
    // A VMM's own VFIO device fd is checked for its type before anything
    // else, with or without an address, and whether or not the daemon owns
    // the address.
    for request in [
        Request::device_fd_session(None, None),
        Request::device_fd_session(Some(A.into()), None),
        Request::device_fd_session(Some("0000:00:1f.7".into()), None),
    ] {
        let r = d
            .client()
            .request_with_fds(
                &request,
                &[
                    pipe.1.as_raw_fd(),
                    irqfd.trigger().as_raw_fd(),
                    irqfd.resample().as_raw_fd(),
                ],
            )
            .unwrap();
        assert!(
            matches!(&r, Response::Error { kind: ErrorKind::BadRequest, message }
                if message.contains("not a VFIO device fd (it is pipe:[")),
            "{request:?}: {r:?}"
        );
    }
    // "path" belongs to a VMM's own device: the daemon's config sets it for
    // the devices it owns.
    let r = d
        .client()
        .request_with_fds(
            &Request::Session {
                bdf: Some(A.into()),
                vfio_device_fd: false,
                path: Some(vfio_intx::daemon::config::PathSetting::Userspace),
            },
            &[irqfd.trigger().as_raw_fd(), irqfd.resample().as_raw_fd()],
        )
        .unwrap();
    assert!(
        matches!(&r, Response::Error { kind: ErrorKind::BadRequest, message } if message.contains("\"path\"")),
        "{r:?}"
    );

    let mut session = d.client();
    let r = session
        .request_with_fds(
            &Request::session(A),
            &[irqfd.trigger().as_raw_fd(), irqfd.resample().as_raw_fd()],
        )
        .unwrap();
    assert!(matches!(r, Response::Ok { .. }), "{r:?}");
    // A second session on the same device is busy.
    let r = d
        .client()
        .request_with_fds(
            &Request::session(A),
            &[irqfd.trigger().as_raw_fd(), irqfd.resample().as_raw_fd()],
        )
        .unwrap();
    assert!(
        matches!(
            r,
            Response::Error {
                kind: ErrorKind::Busy,
                ..
            }
        ),
        "{r:?}"
    );

    let control = Arc::new(VmControl::default());
    let chipset = VmmDevice {
        control: Mutex::new(d.client()),
    };
    let vcpu = {
        let control = Arc::clone(&control);
        std::thread::spawn(move || vm.run(DEVFN, &chipset, &control))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !control.ready() {
        assert!(Instant::now() < deadline, "the guest did not come up");
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut raiser = d.client();
    for i in 1..=N {
        let r = raiser
            .request(&Request::SimRaise {
                bdf: A.into(),
                count: 1,
            })
            .unwrap();
        assert!(matches!(r, Response::Ok { .. }));
        let deadline = Instant::now() + Duration::from_secs(10);
        while control.acked() < i {
            assert!(
                Instant::now() < deadline,
                "interrupt {i} did not reach the guest (acked {}); log:\n{}",
                control.acked(),
                d.log()
            );
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    assert_eq!(control.acked(), N);
    assert_eq!(control.empty_isr_runs(), 0);
    let status = d.status();
    let dev = &status.devices[0];
    assert!(dev.session);
    assert_eq!(dev.stats.engine.injected, N);
    assert!(dev.stats.engine.eois >= N);
    assert!(dev.stats.daemon.round_trip.count >= N);

    control.request_stop();
    while !vcpu.is_finished() {
        let _ = vcpu.kill(kick_signal());
        std::thread::sleep(Duration::from_millis(1));
    }
    vcpu.join().unwrap().unwrap();
    // The VMM ends the session and waits for the daemon to let go: the
    // connection closes only once the device is back on its own wiring.
    session.end_session().unwrap();
    assert!(
        !d.status().devices[0].session,
        "the session was not released"
    );
    d.wait_log("VMM session ended");
    // And a new session can start.
    let mut again = d.client();
    let r = again
        .request_with_fds(
            &Request::session(A),
            &[irqfd.trigger().as_raw_fd(), irqfd.resample().as_raw_fd()],
        )
        .unwrap();
    assert!(matches!(r, Response::Ok { .. }), "{r:?}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    /// The frame decoder never panics, never returns a frame over the cap,
    /// and reassembles valid frames however the stream is split.
    #[test]
    fn the_frame_decoder_handles_arbitrary_streams(
        junk in proptest::collection::vec(any::<u8>(), 0..256),
        splits in proptest::collection::vec(1usize..64, 0..16),
        n in 0usize..4,
    ) {
        let mut d = FrameDecoder::new();
        let mut rest: &[u8] = &junk;
        for s in &splits {
            let (a, b) = rest.split_at((*s).min(rest.len()));
            d.push(a);
            rest = b;
            while let Ok(Some(f)) = d.next_frame() {
                prop_assert!(f.len() <= MAX_FRAME);
                let _ = protocol::decode::<Request>(&f);
            }
        }
        let mut d = FrameDecoder::new();
        let mut stream = Vec::new();
        for i in 0..n {
            stream.extend(protocol::encode(&Request::Stats { bdf: Some(format!("{i}")) }).unwrap());
        }
        let mut got = Vec::new();
        let mut pos = 0;
        for s in splits.iter().cycle().take(stream.len() + 1) {
            let end = (pos + s).min(stream.len());
            d.push(&stream[pos..end]);
            pos = end;
            while let Some(f) = d.next_frame().unwrap() {
                got.push(protocol::decode::<Request>(&f).unwrap());
            }
            if pos == stream.len() { break; }
        }
        if splits.is_empty() {
            d.push(&stream[pos..]);
            while let Some(f) = d.next_frame().unwrap() {
                got.push(protocol::decode::<Request>(&f).unwrap());
            }
        }
        prop_assert_eq!(got.len(), n);
    }
}

#[test]
fn the_systemd_unit_is_hardened_to_an_exposure_of_at_most_4() {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/vfio-intx.service");
    let out = match Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&unit)
        .output()
    {
        Ok(out) => out,
        Err(e) => {
            eprintln!("SKIP the_systemd_unit_is_hardened: systemd-analyze is not available: {e}");
            return;
        }
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| {
            panic!(
                "no exposure level:\n{text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let level: f64 = line
        .split(':')
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse {line:?}"));
    assert!(level <= 4.0, "{line}\n{text}");
    let unit_text = std::fs::read_to_string(&unit).unwrap();
    for needed in [
        "Type=notify",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "RuntimeDirectory=vfio-intx",
        "DeviceAllow=char-vfio rw",
        "WatchdogSec=",
        "ExecReload=",
    ] {
        assert!(unit_text.contains(needed), "the unit lacks {needed}");
    }
}

/// A VMM without a guest: attaches plain eventfds as irqfd and resample.
struct FakeVmm {
    irqfd: vmm_sys_util::eventfd::EventFd,
    resample: vmm_sys_util::eventfd::EventFd,
    session: Client,
}

impl FakeVmm {
    fn attach(d: &Daemon, bdf: &str) -> Self {
        use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
        let irqfd = EventFd::new(EFD_NONBLOCK).unwrap();
        let resample = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut session = d.client();
        let r = session
            .request_with_fds(
                &Request::session(bdf),
                &[irqfd.as_raw_fd(), resample.as_raw_fd()],
            )
            .unwrap();
        assert!(matches!(r, Response::Ok { .. }), "{r:?}");
        Self {
            irqfd,
            resample,
            session,
        }
    }

    /// Interrupts injected since the last call.
    fn injected(&self) -> u64 {
        self.irqfd.read().unwrap_or(0)
    }

    fn eoi(&self) {
        self.resample.write(1).unwrap();
    }
}

fn device_status(d: &Daemon, bdf: &str) -> vfio_intx::daemon::service::DeviceStatus {
    d.status()
        .devices
        .into_iter()
        .find(|s| s.bdf == bdf)
        .unwrap()
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn a_line_nobody_handles_is_masked_as_a_storm_reported_and_retried() {
    let d = Daemon::start(&format!(
        "{}{}",
        device(A, "storm-threshold = 1000\nstorm-backoff-ms = 100"),
        device(B, "")
    ));
    let vmm = FakeVmm::attach(&d, A);
    // The device asserts and nobody acknowledges it; the "guest" EOIs
    // every injection, so the line re-asserts after each EOI.
    d.ask(&Request::SimRaise {
        bdf: A.into(),
        count: 1,
    });
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let guest = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut eois = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                if vmm.injected() > 0 {
                    vmm.eoi();
                    eois += 1;
                } else {
                    std::thread::yield_now();
                }
            }
            (vmm, eois)
        })
    };
    wait_for("a storm", Duration::from_secs(5), || {
        device_status(&d, A).stats.daemon.storms >= 1
    });
    d.wait_log("interrupt storm");
    // Retried after the back-off, and masked again while it goes on.
    wait_for("a second storm", Duration::from_secs(5), || {
        device_status(&d, A).stats.daemon.storms >= 2
    });
    // The other device is not disturbed.
    let other = device_status(&d, B);
    assert_eq!(other.held, None);
    assert_eq!(other.stats.daemon.storms, 0);
    // Someone handles it at last: the next retry finds a quiet line.
    let r = d.ask(&Request::SimAck { bdf: A.into() });
    assert_eq!(r["acked"], true);
    wait_for("the line released", Duration::from_secs(5), || {
        device_status(&d, A).held.is_none()
    });
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (_vmm, eois) = guest.join().unwrap();
    assert!(eois > 20, "{eois}");
    let text = d.ask(&Request::Metrics)["text"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(text.contains(&format!("vfio_intx_storms_total{{bdf=\"{A}\"}}")));
}

/// One journald native-protocol datagram as (field, value) pairs:
/// `NAME=value\n`, or `NAME\n` + a little-endian u64 length + the value +
/// `\n` for values that may hold newlines.
fn journal_fields(mut d: &[u8]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    while !d.is_empty() {
        let end = d
            .iter()
            .position(|&b| b == b'\n' || b == b'=')
            .expect("a field name");
        let name = String::from_utf8(d[..end].to_vec()).unwrap();
        let rest = &d[end + 1..];
        if d[end] == b'=' {
            let nl = rest.iter().position(|&b| b == b'\n').expect("a newline");
            out.push((name, String::from_utf8_lossy(&rest[..nl]).into_owned()));
            d = &rest[nl + 1..];
        } else {
            let len = usize::try_from(u64::from_le_bytes(rest[..8].try_into().unwrap())).unwrap();
            out.push((
                name,
                String::from_utf8_lossy(&rest[8..8 + len]).into_owned(),
            ));
            assert_eq!(
                rest[8 + len],
                b'\n',
                "a length-encoded value ends in a newline"
            );
            d = &rest[8 + len + 1..];
        }
    }
    out
}

/// Runs the daemon on device A as systemd would with stderr on the journal:
/// in a private mount namespace whose /run/systemd/journal/socket is the
/// test's datagram socket, with JOURNAL_STREAM naming stderr's device and
/// inode (or, with `matching = false`, another file's, as a child that
/// inherited the variable sees it). Returns the journal entries and the
/// daemon's stderr.
fn run_under_journal(matching: bool) -> (Vec<Vec<(String, String)>>, String) {
    let journal_dir = tempfile::tempdir().unwrap();
    let journal = UnixDatagram::bind(journal_dir.path().join("socket")).unwrap();
    journal
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    // Read as journald does, all along: a datagram socket queues only a
    // few messages, and a sender blocks when the queue is full.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut entries = Vec::new();
            let mut buf = vec![0u8; 1 << 16];
            loop {
                match journal.recv(&mut buf) {
                    // tracing-journald probes the socket with an empty
                    // datagram.
                    Ok(0) => {}
                    Ok(n) => entries.push(journal_fields(&buf[..n])),
                    Err(_) if stop.load(std::sync::atomic::Ordering::SeqCst) => break,
                    Err(_) => {}
                }
            }
            entries
        })
    };
    let stream = if matching {
        "$(stat -L -c %d:%i /proc/self/fd/2)"
    } else {
        "0:1"
    };
    let script = format!(
        "set -e; mount -t tmpfs tmpfs /run; mkdir -p /run/systemd/journal; \
         mount --bind \"$JOURNAL_DIR\" /run/systemd/journal; \
         JOURNAL_STREAM={stream}; export JOURNAL_STREAM; exec \"$@\""
    );
    let mut d = Daemon::spawn_as("", &device(A, ""), |_, config| {
        let mut c = Command::new("unshare");
        c.args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
            "sh",
            BIN,
        ])
        .args(["daemon", "--config"])
        .arg(config)
        .env("JOURNAL_DIR", journal_dir.path());
        c
    });
    d.wait_notify("READY=1", Duration::from_secs(10));
    // A session: events in the device's span.
    let vmm = FakeVmm::attach(&d, A);
    drop(vmm);
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(
        d.wait_exit(Duration::from_secs(5)).0,
        Some(0),
        "{}",
        d.log()
    );
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    (reader.join().unwrap(), d.log())
}

#[test]
fn logs_go_to_journald_with_the_device_as_a_field_when_stderr_is_the_journal() {
    let unshare = Command::new("unshare").arg("--version").output();
    if !nix::unistd::geteuid().is_root() || !unshare.is_ok_and(|o| o.status.success()) {
        eprintln!(
            "SKIP logs_go_to_journald: needs root and unshare(1) for a private mount namespace"
        );
        return;
    }
    let (entries, stderr) = run_under_journal(true);
    let field = |e: &[(String, String)], name: &str| {
        e.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone())
    };
    assert!(
        !entries.is_empty(),
        "nothing reached the journal; stderr:\n{stderr}"
    );
    for e in &entries {
        assert_eq!(
            field(e, "SYSLOG_IDENTIFIER").as_deref(),
            Some("vfio-intx"),
            "{e:?}"
        );
        assert!(field(e, "PRIORITY").is_some(), "{e:?}");
    }
    let messages: Vec<String> = entries.iter().filter_map(|e| field(e, "MESSAGE")).collect();
    assert!(
        messages.iter().any(|m| m.contains("device(s) armed")),
        "{messages:#?}"
    );
    // Events in a device's span carry it as a journal field, so
    // `journalctl F_BDF=...` selects one device's lines.
    let attached = entries
        .iter()
        .find(|e| field(e, "MESSAGE").is_some_and(|m| m.starts_with("session attached")))
        .unwrap_or_else(|| panic!("no session line: {messages:#?}"));
    assert_eq!(
        field(attached, "SPAN_NAME").as_deref(),
        Some("device"),
        "{attached:?}"
    );
    assert_eq!(field(attached, "F_BDF").as_deref(), Some(A), "{attached:?}");
    // INFO maps to journald's "notice".
    assert_eq!(field(attached, "PRIORITY").as_deref(), Some("5"));
    assert!(
        !stderr.contains("device(s) armed"),
        "logged to stderr as well:\n{stderr}"
    );

    // An inherited JOURNAL_STREAM that names another file is not the
    // journal: the lines stay on stderr.
    let (entries, stderr) = run_under_journal(false);
    assert!(entries.is_empty(), "{entries:?}");
    assert!(stderr.contains("device(s) armed"), "{stderr}");
}

#[test]
fn an_interrupt_left_without_eoi_is_reported_and_recovered() {
    let d = Daemon::start(&device(A, "eoi-timeout-ms = 150"));
    let vmm = FakeVmm::attach(&d, A);
    d.ask(&Request::SimRaise {
        bdf: A.into(),
        count: 1,
    });
    wait_for("the injection", Duration::from_secs(5), || {
        vmm.injected() == 1
    });
    // The guest's driver acknowledges the device but its EOI never comes.
    assert_eq!(d.ask(&Request::SimAck { bdf: A.into() })["acked"], true);
    wait_for("the EOI timeout", Duration::from_secs(5), || {
        device_status(&d, A).stats.daemon.eoi_timeouts == 1
    });
    d.wait_log("no EOI from the guest");
    // Recovered: the line is unmasked and the next interrupt arrives.
    d.ask(&Request::SimRaise {
        bdf: A.into(),
        count: 1,
    });
    wait_for("the next injection", Duration::from_secs(5), || {
        vmm.injected() == 1
    });
    assert_eq!(device_status(&d, A).stats.engine.injected, 2);
}

#[test]
fn a_busy_device_whose_guest_handles_it_is_not_a_storm() {
    let d = Daemon::start(&device(A, "storm-threshold = 1000"));
    let vmm = FakeVmm::attach(&d, A);
    let mut c = d.client();
    let mut ask = |r: Request| match c.request(&r).unwrap() {
        Response::Ok { data } => data,
        other => panic!("{other:?}"),
    };
    // Two interrupts at a time: every other EOI finds the device still
    // asserting (a re-injection), far above the threshold's rate, but the
    // guest handles each one.
    for _ in 0..300 {
        ask(Request::SimRaise {
            bdf: A.into(),
            count: 2,
        });
        for _ in 0..2 {
            wait_for("an injection", Duration::from_secs(5), || {
                vmm.injected() > 0
            });
            assert_eq!(ask(Request::SimAck { bdf: A.into() })["acked"], true);
            vmm.eoi();
        }
    }
    let s = device_status(&d, A);
    assert_eq!(s.stats.engine.injected, 600);
    assert!(s.stats.engine.reinjected >= 250, "{:?}", s.stats.engine);
    assert_eq!(s.stats.daemon.storms, 0, "{}", d.log());
}

#[test]
fn watchdog_keepalives_follow_watchdog_usec() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("control.sock");
    let config = dir.path().join("daemon.toml");
    std::fs::write(&config, Daemon::config_text(&socket, "", &device(A, ""))).unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    // As systemd does: WATCHDOG_PID names the daemon's own pid (the shell
    // execs the daemon, which keeps the pid).
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "WATCHDOG_PID=$$ exec {BIN} daemon --config {}",
            config.display()
        ))
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "200000")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let mut keepalives = 0;
    let mut buf = [0u8; 4096];
    while start.elapsed() < Duration::from_millis(1500) {
        if let Ok(n) = notify.recv(&mut buf) {
            if String::from_utf8_lossy(&buf[..n]).contains("WATCHDOG=1") {
                keepalives += 1;
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    // WatchdogSec=200ms: a keepalive every 100 ms.
    assert!(
        (8..=20).contains(&keepalives),
        "{keepalives} keepalives in 1.5 s"
    );
}

#[test]
fn the_demo_config_services_interrupts_in_its_example_guest() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("control.sock");
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/demo.toml");
    let mut child = Command::new(BIN)
        .args(["daemon", "--config"])
        .arg(&demo)
        .arg("--socket")
        .arg(&socket)
        .env("NOTIFY_SOCKET", &notify_path)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 4096];
    loop {
        let n = notify.recv(&mut buf).expect("no READY=1 from the demo");
        if String::from_utf8_lossy(&buf[..n]).contains("READY=1") {
            break;
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let mut c = Client::connect(&socket, Duration::from_secs(10)).unwrap();
    let Response::Ok { data } = c.request(&Request::Status).unwrap() else {
        panic!("status failed")
    };
    let status: DaemonStatus = serde_json::from_value(data).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0));
    if !Path::new("/dev/kvm").exists() {
        eprintln!("SKIP the demo's example guest: no /dev/kvm (the daemon ran without it)");
        assert!(status.example_guest.is_none());
        return;
    }
    let guest = status.example_guest.expect("the example guest runs");
    assert!(guest.acked >= 20, "{guest:?}");
    assert!(guest.raised - guest.acked <= 2, "{guest:?}");
    assert_eq!(status.devices[0].stats.engine.errors, 0);
}

#[test]
fn clients_beyond_the_limit_are_refused_and_the_daemon_survives_running_out_of_descriptors() {
    let d = Daemon::start_with("max-clients = 2", &device(A, ""));
    // Two clients hold their slots (idle, within the timeout).
    let held: Vec<Client> = (0..2).map(|_| d.client()).collect();
    std::thread::sleep(Duration::from_millis(50));
    let mut third = d.client();
    let r = third.read_response().unwrap();
    assert!(
        matches!(
            r,
            Response::Error {
                kind: ErrorKind::TooManyClients,
                ..
            }
        ),
        "{r:?}"
    );
    drop(held);
    std::thread::sleep(Duration::from_millis(50));
    assert!(d.ask(&Request::Ping)["pid"].is_number());

    // Out of descriptors: lower the daemon's limit so that accept() fails
    // with EMFILE, hold connections open, and let them go again.
    let pid = d.child.id().to_string();
    let limit = Command::new("prlimit")
        .args(["--pid", &pid, "--nofile=24:24"])
        .status();
    if !limit.is_ok_and(|s| s.success()) {
        eprintln!("SKIP the EMFILE part: prlimit is not available");
        return;
    }
    let flood: Vec<std::os::unix::net::UnixStream> = (0..40)
        .filter_map(|_| std::os::unix::net::UnixStream::connect(&d.socket).ok())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    drop(flood);
    Command::new("prlimit")
        .args(["--pid", &pid, "--nofile=1024:1024"])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(mut c) = Client::connect(&d.socket, Duration::from_secs(2)) {
            if let Ok(Response::Ok { .. }) = c.request(&Request::Ping) {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the daemon does not recover: {}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    d.wait_log("accepting a client failed");
}

#[test]
fn a_vmm_session_takes_the_kernel_bypass_where_the_backend_has_one() {
    use vfio_intx::kvm::testvm::{kick_signal, TinyVm, VmControl};
    use vfio_intx::kvm::{Irqchip, ResampleIrqfd};
    use vmm_sys_util::signal::Killable;
    if !Path::new("/dev/kvm").exists() {
        eprintln!("SKIP a_vmm_session_takes_the_kernel_bypass: no /dev/kvm");
        return;
    }
    // The vfio-pci model: the resample eventfd becomes its unmask eventfd.
    let d = Daemon::start(&device(A, "sim-kernel = \"vfio-pci\"\npath = \"auto\""));
    const N: u64 = 50;
    const GSI: u8 = 5;
    const DEVFN: u8 = 3 << 3;
    let mut vm = TinyVm::new(GSI, DEVFN, Irqchip::Full).unwrap();
    let irqfd = ResampleIrqfd::register(Arc::clone(vm.vm()), u32::from(GSI)).unwrap();
    // An interrupt raised before any session: parked, then delivered by
    // the kernel when the session's bypass is wired.
    d.ask(&Request::SimRaise {
        bdf: A.into(),
        count: 1,
    });
    let mut session = d.client();
    let r = session
        .request_with_fds(
            &Request::session(A),
            &[irqfd.trigger().as_raw_fd(), irqfd.resample().as_raw_fd()],
        )
        .unwrap();
    let Response::Ok { data } = r else {
        panic!("{r:?}")
    };
    assert!(
        data["path"].as_str().unwrap().starts_with("kernel bypass"),
        "{data}"
    );
    // No operator hold on the bypass: the kernel unmasks at each EOI.
    let out = d.cli(&["mask", A]);
    assert_eq!(out.status.code(), Some(i32::from(exit::FAILED)), "{out:?}");
    assert_eq!(device_status(&d, A).held, None);

    let control = Arc::new(VmControl::default());
    let chipset = VmmDevice {
        control: Mutex::new(d.client()),
    };
    let vcpu = {
        let control = Arc::clone(&control);
        std::thread::spawn(move || vm.run(DEVFN, &chipset, &control))
    };
    wait_for("the guest", Duration::from_secs(10), || control.ready());
    wait_for("the parked interrupt", Duration::from_secs(10), || {
        control.acked() == 1
    });
    let before = device_status(&d, A).stats.engine;
    let mut raiser = d.client();
    for i in 2..=N + 1 {
        raiser
            .request(&Request::SimRaise {
                bdf: A.into(),
                count: 1,
            })
            .unwrap();
        wait_for("an interrupt in the guest", Duration::from_secs(10), || {
            control.acked() >= i
        });
    }
    assert_eq!(control.acked(), N + 1);
    assert_eq!(control.empty_isr_runs(), 0);
    let s = device_status(&d, A);
    assert!(s.path.starts_with("kernel bypass"), "{}", s.path);
    // No user-space work per interrupt on the bypass.
    assert_eq!(
        s.stats.engine.injected, before.injected,
        "{:?}",
        s.stats.engine
    );
    assert_eq!(s.stats.engine.eois, before.eois);

    control.request_stop();
    while !vcpu.is_finished() {
        let _ = vcpu.kill(kick_signal());
        std::thread::sleep(Duration::from_millis(1));
    }
    vcpu.join().unwrap().unwrap();
    drop(session);
    wait_for("the session's end", Duration::from_secs(5), || {
        !device_status(&d, A).session
    });
    // Back on the user-space wiring: the next interrupt parks.
    let s = device_status(&d, A);
    assert!(s.path.starts_with("user-space"), "{}", s.path);
    let parked = s.stats.daemon.parked;
    d.ask(&Request::SimRaise {
        bdf: A.into(),
        count: 1,
    });
    wait_for("the next interrupt parked", Duration::from_secs(5), || {
        device_status(&d, A).stats.daemon.parked > parked
    });
}
