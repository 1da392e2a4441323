//! The daemon binary at scale and under a storm (`cargo bench --bench
//! daemon`):
//!
//! 1. 256 simulated devices in one daemon: start to READY=1 (NOTIFY_SOCKET),
//!    RSS after READY, idle CPU over a few seconds (targets: <= 500 ms,
//!    <= 32 MiB, near 0).
//! 2. One device's interrupt round trip (sim-raise -> injection into the
//!    session's irqfd), p50/p99, with and without another device storming
//!    (its "guest" EOIs every injection while nobody acknowledges the
//!    device); target: p99 at most 2x.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vfio_intx::daemon::client::Client;
use vfio_intx::daemon::protocol::{Request, Response};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const BIN: &str = env!("CARGO_BIN_EXE_vfio-intx");

struct Daemon {
    child: Child,
    socket: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

fn bdf(i: usize) -> String {
    format!("0000:{:02x}:{:02x}.0", 1 + i / 32, i % 32)
}

/// Starts the daemon on `devices`; returns it and the time to READY=1.
fn start(devices: &str) -> (Daemon, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("control.sock");
    let config = dir.path().join("daemon.toml");
    std::fs::write(
        &config,
        format!(
            "[daemon]\nsocket = \"{}\"\nstatus-interval-ms = 60000\n{devices}",
            socket.display()
        ),
    )
    .unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let start = Instant::now();
    let child = Command::new(BIN)
        .args(["daemon", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &notify_path)
        .env(
            "RUST_LOG",
            std::env::var("BENCH_DAEMON_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .env_remove("JOURNAL_STREAM")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 4096];
    loop {
        let n = notify.recv(&mut buf).expect("no READY=1 within 10 s");
        if String::from_utf8_lossy(&buf[..n]).contains("READY=1") {
            break;
        }
    }
    let ready = start.elapsed();
    (
        Daemon {
            child,
            socket,
            _dir: dir,
        },
        ready,
    )
}

fn status_field(pid: u32, field: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find(|l| l.starts_with(field))
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_owned()
}

/// utime + stime in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &text[text.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn scale() {
    let devices: String = (0..256)
        .map(|i| format!("[[device]]\nbdf = \"{}\"\nbackend = \"sim\"\n", bdf(i)))
        .collect();
    let (d, ready) = start(&devices);
    let pid = d.child.id();
    let rss_kib: u64 = status_field(pid, "VmRSS:").parse().unwrap();
    let threads = status_field(pid, "Threads:");
    let mut c = Client::connect(&d.socket, Duration::from_secs(10)).unwrap();
    let Response::Ok { data } = c.request(&Request::Status).unwrap() else {
        panic!("status failed")
    };
    let armed = data["devices"].as_array().unwrap().len();
    drop(c);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .unwrap()
        .unwrap() as f64;
    // Let start-up settle, then measure.
    std::thread::sleep(Duration::from_millis(500));
    let window = Duration::from_secs(5);
    let t0 = cpu_ticks(pid);
    std::thread::sleep(window);
    let cpu = (cpu_ticks(pid) - t0) as f64 / hz / window.as_secs_f64() * 100.0;
    println!("daemon, 256 simulated devices ({armed} armed, {threads} threads):");
    println!(
        "  start -> READY=1     {:>8.1} ms   (target <= 500 ms)",
        ready.as_secs_f64() * 1e3
    );
    println!(
        "  RSS after READY      {:>8.1} MiB  (target <= 32 MiB)",
        rss_kib as f64 / 1024.0
    );
    println!(
        "  idle CPU over {:?}    {:>8.2} %    (target near 0)",
        window, cpu
    );
}

struct Session {
    irqfd: EventFd,
    resample: EventFd,
    _client: Client,
}

fn attach(socket: &Path, bdf: &str) -> Session {
    // Blocking irqfd: the bench waits on it; the daemon only writes it.
    let irqfd = EventFd::new(0).unwrap();
    let resample = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut client = Client::connect(socket, Duration::from_secs(10)).unwrap();
    let r = client
        .request_with_fds(
            &Request::session(bdf.parse().unwrap()),
            &[irqfd.as_raw_fd(), resample.as_raw_fd()],
        )
        .unwrap();
    assert!(matches!(r, Response::Ok { .. }), "{r:?}");
    Session {
        irqfd,
        resample,
        _client: client,
    }
}

/// Round trips (raise -> injection) of `bdf` for `run` (at least `n`),
/// sorted.
fn round_trips(socket: &Path, s: &Session, bdf: &str, n: usize, run: Duration) -> Vec<Duration> {
    let mut c = Client::connect(socket, Duration::from_secs(10)).unwrap();
    let raise = Request::SimRaise {
        bdf: bdf.parse().unwrap(),
        count: 1,
    };
    let ack = Request::SimAck {
        bdf: bdf.parse().unwrap(),
    };
    let mut out = Vec::with_capacity(n);
    let start = Instant::now();
    while out.len() < n || start.elapsed() < run {
        let t = Instant::now();
        assert!(matches!(c.request(&raise).unwrap(), Response::Ok { .. }));
        s.irqfd.read().unwrap();
        out.push(t.elapsed());
        assert!(matches!(c.request(&ack).unwrap(), Response::Ok { .. }));
        s.resample.write(1).unwrap();
    }
    out.sort();
    out
}

fn q(v: &[Duration], q: f64) -> Duration {
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn storm() {
    let quiet = "0000:00:04.0";
    let noisy = "0000:00:05.0";
    let devices = format!(
        "[[device]]\nbdf = \"{quiet}\"\nbackend = \"sim\"\n[[device]]\nbdf = \"{noisy}\"\nbackend = \"sim\"\n"
    );
    let (d, _) = start(&devices);
    let q_session = attach(&d.socket, quiet);
    let n_session = attach(&d.socket, noisy);
    const N: usize = 2000;
    // Long enough for the storming line to be retried (after 1 s, then 2 s).
    const RUN: Duration = Duration::from_secs(4);
    // Warm up, then the baseline.
    round_trips(&d.socket, &q_session, quiet, 200, Duration::ZERO);
    let base = round_trips(&d.socket, &q_session, quiet, N, RUN);

    // The storm: the noisy device asserts, nobody acknowledges it, its
    // "guest" EOIs each injection at once.
    let stop = Arc::new(AtomicBool::new(false));
    let eois = Arc::new(AtomicU64::new(0));
    let resample = n_session.resample.try_clone().unwrap();
    let irq = n_session.irqfd.try_clone().unwrap();
    let wake = n_session.irqfd.try_clone().unwrap();
    let guest = {
        let stop = Arc::clone(&stop);
        let eois = Arc::clone(&eois);
        std::thread::spawn(move || loop {
            irq.read().unwrap();
            if stop.load(Ordering::SeqCst) {
                return;
            }
            resample.write(1).unwrap();
            eois.fetch_add(1, Ordering::Relaxed);
        })
    };
    let mut c = Client::connect(&d.socket, Duration::from_secs(10)).unwrap();
    c.request(&Request::SimRaise {
        bdf: noisy.parse().unwrap(),
        count: 1,
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let stormy = round_trips(&d.socket, &q_session, quiet, N, RUN);
    stop.store(true, Ordering::SeqCst);
    wake.write(1).unwrap();
    guest.join().unwrap();
    let Response::Ok { data } = c
        .request(&Request::Stats {
            bdf: Some(noisy.parse().unwrap()),
        })
        .unwrap()
    else {
        panic!("stats failed")
    };
    let storms = &data[0]["daemon"]["storms"];
    let reinjected = &data[0]["engine"]["reinjected"];
    println!(
        "\ninterrupt round trip of one device (sim-raise -> injection), {} / {} samples over {RUN:?}:",
        base.len(),
        stormy.len()
    );
    println!(
        "  quiet                p50 {:>7.1} us  p99 {:>7.1} us",
        q(&base, 0.5).as_secs_f64() * 1e6,
        q(&base, 0.99).as_secs_f64() * 1e6
    );
    println!(
        "  another storming     p50 {:>7.1} us  p99 {:>7.1} us",
        q(&stormy, 0.5).as_secs_f64() * 1e6,
        q(&stormy, 0.99).as_secs_f64() * 1e6
    );
    println!(
        "  p99 ratio            {:>7.2}x  (target <= 2x); the storming device: {} EOIs without an ack, {} re-injections, {} storms masked",
        q(&stormy, 0.99).as_secs_f64() / q(&base, 0.99).as_secs_f64(),
        eois.load(Ordering::Relaxed),
        reinjected,
        storms
    );
    drop(n_session);
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    scale();
    storm();
}
