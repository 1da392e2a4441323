//! The daemon, driven as systemd, operators and VMMs drive it: the real
//! binary with a NOTIFY_SOCKET the test owns, the control socket, signals,
//! and a VMM session with a real KVM guest.
//!
//! One module per concern; the harness (the daemon under a NOTIFY_SOCKET
//! the test owns, a fake VMM) is here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod attacks;
mod health;
mod journald;
mod lifecycle;
mod metrics_http;
mod protocol_doc;
mod restart;
mod sessions;
mod socket;

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
        let reader = Self::read_log(&mut child, Arc::clone(&log));
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

    /// Starts the daemon again in the same directory (its socket, notify
    /// socket and runtime files) on `devices`, once the previous process
    /// has ended; waits for READY=1.
    fn restart(&mut self, daemon_extra: &str, devices: &str) {
        assert!(
            self.child.try_wait().unwrap().is_some(),
            "the previous daemon still runs"
        );
        std::fs::write(
            &self.config,
            Self::config_text(&self.socket, daemon_extra, devices),
        )
        .unwrap();
        let mut child = Command::new(BIN)
            .args(["daemon", "--config"])
            .arg(&self.config)
            .env_remove("JOURNAL_STREAM")
            .env("NOTIFY_SOCKET", self.dir.path().join("notify.sock"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        self.log.lock().unwrap().push_str("---- restarted ----\n");
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        self.reader = Some(Self::read_log(&mut child, Arc::clone(&self.log)));
        self.child = child;
        self.started = Instant::now();
        let ready = self.wait_notify("READY=1", Duration::from_secs(10));
        assert!(ready.contains("STATUS="), "{ready}");
    }

    /// Appends the child's stderr to `log`, line by line, until it closes.
    fn read_log(child: &mut Child, log: Arc<Mutex<String>>) -> std::thread::JoinHandle<()> {
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut l = log.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        })
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
        let d = status
            .devices
            .iter()
            .find(|d| d.bdf.to_string() == bdf)
            .unwrap();
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
        let r = self.control.lock().unwrap().request(&Request::SimAck {
            bdf: A.parse().unwrap(),
        });
        matches!(r, Ok(Response::Ok { data }) if data["acked"] == true)
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
                &Request::session(bdf.parse().unwrap()),
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

fn device_status(d: &Daemon, bdf: &str) -> vfio_intx::daemon::protocol::DeviceStatus {
    d.status()
        .devices
        .into_iter()
        .find(|s| s.bdf.to_string() == bdf)
        .unwrap()
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}
