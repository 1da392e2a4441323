//! The daemon survives its own restart and crash (issue 14): under a
//! test-owned service manager with systemd's fd store
//! (`vfio_intx::fdstore_harness`), a restart (`restart`, SIGUSR2: exit 75)
//! or a kill -9 keeps every device and session; SIGTERM still hands every
//! device back and empties the store.

use std::os::fd::OwnedFd;

use vfio_intx::daemon::protocol::SimTotals;
use vfio_intx::fdstore_harness::{ServiceCommand, StoreOptions, Supervisor};

use super::*;

/// `FileDescriptorStoreMax=` of the shipped unit.
const STORE_MAX: usize = 1024;

/// The daemon under the test's service manager.
struct Supervised {
    sup: Supervisor,
    dir: tempfile::TempDir,
    socket: PathBuf,
    log: PathBuf,
}

impl Supervised {
    fn start(devices: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("control.sock");
        let config = dir.path().join("daemon.toml");
        std::fs::write(&config, Daemon::config_text(&socket, "", devices)).unwrap();
        let log = dir.path().join("daemon.log");
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let cmd = ServiceCommand::new(BIN)
            .arg("daemon")
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .env_remove("JOURNAL_STREAM")
            .stderr(OwnedFd::from(stderr));
        let sup = Supervisor::start(cmd, StoreOptions::default().with_max(STORE_MAX)).unwrap();
        let mut s = Self {
            sup,
            dir,
            socket,
            log,
        };
        s.ready();
        s
    }

    fn ready(&mut self) -> Duration {
        match self.sup.wait_ready(Duration::from_secs(20)) {
            Ok(d) => d,
            Err(e) => panic!("{e}; log:\n{}", self.log()),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn client(&self) -> Client {
        Client::connect(&self.socket, Duration::from_secs(10)).unwrap()
    }

    fn ask(&self, request: &Request) -> serde_json::Value {
        match self.client().request(request).unwrap() {
            Response::Ok { data } => data,
            other => panic!("{request:?}: {other:?}; log:\n{}", self.log()),
        }
    }

    fn status(&self) -> DaemonStatus {
        serde_json::from_value(self.ask(&Request::Status)).unwrap()
    }

    fn totals(&self, bdf: &str) -> SimTotals {
        let data = self.ask(&Request::SimRaise {
            bdf: bdf.parse().unwrap(),
            count: 0,
        });
        serde_json::from_value(data["totals"].clone()).unwrap()
    }

    /// The last READY=1's STATUS= line.
    fn ready_status(&self) -> String {
        self.sup
            .notifications()
            .iter()
            .rev()
            .find(|n| n.accepted && n.has("READY=1"))
            .and_then(|n| n.get("STATUS").map(str::to_owned))
            .unwrap_or_default()
    }

    /// A restart that keeps the guests: `vfio-intx restart` (or SIGUSR2),
    /// exit status 75, started again with the store.
    fn restart_keeping(&mut self, by_signal: bool) -> Duration {
        let t0 = Instant::now();
        if by_signal {
            self.sup.signal(nix::sys::signal::Signal::SIGUSR2).unwrap();
        } else {
            let out = Command::new(BIN)
                .args(["restart", "--socket"])
                .arg(&self.socket)
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}; log:\n{}", self.log());
        }
        let exit = self.sup.wait_exit(Duration::from_secs(10)).unwrap();
        assert_eq!(
            exit.code(),
            Some(i32::from(exit::RESTART)),
            "log:\n{}",
            self.log()
        );
        self.sup.restart().unwrap();
        self.ready();
        t0.elapsed()
    }

    fn kill9(&mut self) -> Duration {
        let t0 = Instant::now();
        self.sup.kill9_and_restart(Duration::from_secs(10)).unwrap();
        self.ready();
        t0.elapsed()
    }

    fn daemon_fds(&self) -> usize {
        let pid = self.sup.pid().unwrap();
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    }

    fn fd_links(&self) -> String {
        let pid = self.sup.pid().unwrap();
        let mut out = String::new();
        for e in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
            let e = e.unwrap();
            let link = std::fs::read_link(e.path()).unwrap_or_default();
            out.push_str(&format!("{:?} -> {}\n", e.file_name(), link.display()));
        }
        out
    }

    fn record(&self) -> serde_json::Value {
        let mut p = self.socket.as_os_str().to_owned();
        p.push(".as-found");
        std::fs::read(PathBuf::from(p))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(serde_json::Value::Null)
    }
}

fn own_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// A VMM with plain eventfds as irqfd and resample on `socket`.
fn fake_vmm(s: &Supervised, bdf: &str) -> FakeVmm {
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
    let irqfd = EventFd::new(EFD_NONBLOCK).unwrap();
    let resample = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut session = s.client();
    let r = session
        .request_with_fds(
            &Request::session(bdf.parse().unwrap()),
            &[irqfd.as_raw_fd(), resample.as_raw_fd()],
        )
        .unwrap();
    assert!(matches!(r, Response::Ok { .. }), "{r:?}");
    FakeVmm {
        irqfd,
        resample,
        session,
    }
}

fn raise(s: &Supervised, bdf: &str) {
    s.ask(&Request::SimRaise {
        bdf: bdf.parse().unwrap(),
        count: 1,
    });
}

fn ack(s: &Supervised, bdf: &str) {
    s.ask(&Request::SimAck {
        bdf: bdf.parse().unwrap(),
    });
}

/// One interrupt through a fake VMM: raised, injected, acknowledged,
/// EOIed.
fn one_interrupt(s: &Supervised, vmm: &FakeVmm, bdf: &str) {
    raise(s, bdf);
    wait_for(
        "the interrupt at the VMM's irqfd",
        Duration::from_secs(5),
        || vmm.injected() > 0,
    );
    ack(s, bdf);
    vmm.eoi();
}

#[test]
fn a_restart_or_a_crash_keeps_the_device_and_the_vmm_session() {
    let mut s = Supervised::start(&device(A, ""));
    let vmm = fake_vmm(&s, A);
    one_interrupt(&s, &vmm, A);
    let names = s.sup.store_names();
    for role in [
        "sim-state",
        "delivery",
        "session-irqfd",
        "session-resample",
        "session-conn",
    ] {
        assert!(
            names.contains(&format!("0000-00-04.0.{role}")),
            "{role} not in the store: {names:?}"
        );
    }
    assert!(names.contains(&"control-socket".to_owned()), "{names:?}");

    // Restart by request: the session survives, its next interrupt comes.
    s.restart_keeping(false);
    assert!(
        s.ready_status()
            .starts_with("resumed 1 device(s) and 1 session(s)"),
        "{}; log:\n{}\nmanager: {:#?}",
        s.ready_status(),
        s.log(),
        s.sup.log()
    );
    let st = s.status();
    assert!(st.devices[0].session, "the session was not resumed");
    one_interrupt(&s, &vmm, A);
    // A crash: the same.
    s.kill9();
    assert!(
        s.status().devices[0].session,
        "the session was not resumed after kill -9"
    );
    one_interrupt(&s, &vmm, A);
    // And SIGUSR2.
    s.restart_keeping(true);
    one_interrupt(&s, &vmm, A);
    let totals = s.totals(A);
    assert_eq!((totals.raised_total, totals.acked_total), (4, 4));
    // The VMM's session connection is the same one all along: ending it
    // ends the session in the current process.
    let FakeVmm { session, .. } = vmm;
    session.end_session().unwrap();
    assert!(!s.status().devices[0].session);
    let names = s.sup.store_names();
    assert!(
        !names.iter().any(|n| n.contains("session")),
        "session entries left in the store: {names:?}"
    );
}

#[test]
fn sigterm_still_hands_every_device_back_and_empties_the_store() {
    let mut s = Supervised::start(&device(A, "sim-command = 0x0003"));
    let _vmm = fake_vmm(&s, A);
    assert!(!s.sup.store_names().is_empty());
    s.sup.signal(nix::sys::signal::Signal::SIGTERM).unwrap();
    let exit = s.sup.wait_exit(Duration::from_secs(10)).unwrap();
    assert_eq!(exit.code(), Some(0), "log:\n{}", s.log());
    assert_eq!(
        s.sup.store_names(),
        Vec::<String>::new(),
        "log:\n{}",
        s.log()
    );
    assert_eq!(
        s.record()["devices"],
        serde_json::json!({}),
        "{}",
        s.record()
    );
    let _ = &s.dir;
}

/// The VMM's side of the device in the KVM tests: the ISR's
/// acknowledgement is the daemon's `sim-ack`, retried across the daemon's
/// restart on a new connection. An acknowledgement whose answer was lost
/// is looked up in the device's totals (which survive the restart) before
/// it is sent again, so that it is never applied twice.
struct RestartingVmmDevice {
    socket: PathBuf,
    bdf: vfio_intx::pci::Bdf,
    client: Mutex<Option<Client>>,
    acked_total: std::sync::atomic::AtomicU64,
}

impl RestartingVmmDevice {
    fn new(socket: &Path, bdf: &str) -> Self {
        Self {
            socket: socket.to_owned(),
            bdf: bdf.parse().unwrap(),
            client: Mutex::new(None),
            acked_total: Default::default(),
        }
    }
}

/// Sends `request` on `client` (connected on demand); `None` when the
/// connection failed (the daemon restarted under it).
fn try_request(socket: &Path, client: &mut Option<Client>, request: &Request) -> Option<Response> {
    if client.is_none() {
        *client = Client::connect(socket, Duration::from_secs(10)).ok();
    }
    match client.as_mut()?.request(request) {
        Ok(r) => Some(r),
        Err(_) => {
            *client = None;
            None
        }
    }
}

/// The device's totals, asked until a daemon answers.
fn totals_of(socket: &Path, client: &mut Option<Client>, bdf: vfio_intx::pci::Bdf) -> SimTotals {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(Response::Ok { data }) =
            try_request(socket, client, &Request::SimRaise { bdf, count: 0 })
        {
            return serde_json::from_value(data["totals"].clone()).unwrap();
        }
        assert!(Instant::now() < deadline, "no daemon answered for 20 s");
        std::thread::sleep(Duration::from_millis(2));
    }
}

impl vfio_intx::kvm::testvm::GuestDevice for RestartingVmmDevice {
    fn config_read(&self, _offset: u16, _width: vfio_intx::pci::Width) -> u32 {
        0x0008_0006
    }
    fn config_write(&self, _: u16, _: vfio_intx::pci::Width, _: u32) {}
    fn ack(&self) -> bool {
        use std::sync::atomic::Ordering;
        let mut client = self.client.lock().unwrap();
        loop {
            match try_request(
                &self.socket,
                &mut client,
                &Request::SimAck { bdf: self.bdf },
            ) {
                Some(Response::Ok { data }) => {
                    if let Some(t) = data["totals"]["acked_total"].as_u64() {
                        self.acked_total.store(t, Ordering::SeqCst);
                    }
                    if data["acked"] != true {
                        eprintln!(
                            "{:?}: an ISR run found nothing pending: {data}",
                            std::time::SystemTime::now()
                        );
                    }
                    return data["acked"] == true;
                }
                Some(other) => panic!("sim-ack: {other:?}"),
                None => {
                    let before = self.acked_total.load(Ordering::SeqCst);
                    let t = totals_of(&self.socket, &mut client, self.bdf);
                    if t.acked_total > before {
                        // It took effect before the daemon went away.
                        self.acked_total.store(t.acked_total, Ordering::SeqCst);
                        return true;
                    }
                }
            }
        }
    }
}

/// Raises one interrupt across restarts: a raise whose answer was lost is
/// looked up in the totals before it is sent again.
fn raise_once(socket: &Path, client: &mut Option<Client>, bdf: vfio_intx::pci::Bdf, before: u64) {
    loop {
        match try_request(socket, client, &Request::SimRaise { bdf, count: 1 }) {
            Some(Response::Ok { .. }) => return,
            Some(other) => panic!("sim-raise: {other:?}"),
            None => {
                if totals_of(socket, client, bdf).raised_total > before {
                    return;
                }
            }
        }
    }
}

/// How many restarts of each kind per path.
const RESTARTS_EACH: usize = 10;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

/// A real KVM guest takes interrupts from a daemon-owned simulated device
/// while the daemon is restarted 20 times (10 `restart`/SIGUSR2, 10 kill
/// -9): every interrupt the device raised reaches the guest exactly once,
/// nothing leaks.
fn interrupts_reach_a_kvm_guest_exactly_once_across_restarts(path: &str, extra: &str) {
    use vfio_intx::kvm::testvm::{kick_signal, TinyVm, VmControl};
    use vfio_intx::kvm::{Irqchip, ResampleIrqfd};
    use vmm_sys_util::signal::Killable;
    if !Path::new("/dev/kvm").exists() {
        eprintln!(
            "SKIP interrupts_reach_a_kvm_guest_exactly_once_across_restarts ({path}): no /dev/kvm"
        );
        return;
    }
    let baseline_fds = own_fds();
    let mut s = Supervised::start(&device(A, extra));
    const GSI: u8 = 5;
    const DEVFN: u8 = 3 << 3;
    let mut vm = TinyVm::new(GSI, DEVFN, Irqchip::Full).unwrap();
    let irqfd = ResampleIrqfd::register(Arc::clone(vm.vm()), u32::from(GSI)).unwrap();
    let mut session = s.client();
    let r = session
        .request_with_fds(
            &Request::session(A.parse().unwrap()),
            &[irqfd.trigger().as_raw_fd(), irqfd.resample().as_raw_fd()],
        )
        .unwrap();
    let Response::Ok { data } = r else {
        panic!("{r:?}")
    };
    let want = if path == "bypass" {
        "kernel bypass"
    } else {
        "user-space"
    };
    assert!(data["path"].as_str().unwrap().starts_with(want), "{data}");

    // The daemon's fds after one restart, with nothing but the session
    // connected: the reference for the leak check.
    s.kill9();
    let fds_after_first = s.daemon_fds();

    let control = Arc::new(VmControl::default());
    let chipset = RestartingVmmDevice::new(&s.socket, A);
    let vcpu = {
        let control = Arc::clone(&control);
        std::thread::spawn(move || vm.run(DEVFN, &chipset, &control))
    };
    wait_for("the guest", Duration::from_secs(10), || control.ready());

    // Restarts on a thread of their own while interrupts flow.
    let socket = s.socket.clone();
    let log_path = s.log.clone();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let restarter = {
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            let mut downs = Vec::new();
            for i in 0..2 * RESTARTS_EACH {
                std::thread::sleep(Duration::from_millis(60));
                let down = match i % 4 {
                    0 => s.restart_keeping(false),
                    1 => s.kill9(),
                    2 => s.restart_keeping(true),
                    _ => s.kill9(),
                };
                downs.push(down);
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            (s, downs)
        })
    };
    let bdf: vfio_intx::pci::Bdf = A.parse().unwrap();
    let mut client = None;
    let mut gaps = Vec::new();
    let mut raised = 0u64;
    while !done.load(std::sync::atomic::Ordering::SeqCst) || raised < 50 {
        let t0 = Instant::now();
        raise_once(&socket, &mut client, bdf, raised);
        raised += 1;
        let deadline = t0 + Duration::from_secs(20);
        while control.acked() < raised {
            assert!(
                Instant::now() < deadline,
                "interrupt {raised} did not reach the guest (acked {}, ISR runs {}); log:\n{}",
                control.acked(),
                control.isr_runs(),
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_micros(100));
        }
        gaps.push(t0.elapsed());
    }
    let (s, downs) = restarter.join().unwrap();
    let log = s.log();
    let totals = totals_of(&socket, &mut client, bdf);
    assert_eq!(
        totals.raised_total, raised,
        "the device raised what the test asked, once each"
    );
    assert_eq!(control.acked(), raised, "every interrupt reached the guest");
    assert_eq!(
        control.empty_isr_runs(),
        0,
        "an ISR run found nothing pending: an interrupt was delivered twice; log:\n{log}"
    );
    assert_eq!(totals.acked_total, raised);
    assert!(s.status().devices[0].session, "the session did not survive");
    // A session resumed with an interrupt in service goes back onto the
    // bypass at that interrupt's EOI.
    wait_for(
        "the session's path as it was",
        Duration::from_secs(5),
        || s.status().devices[0].path.starts_with(want),
    );
    control.request_stop();
    while !vcpu.is_finished() {
        let _ = vcpu.kill(kick_signal());
        std::thread::sleep(Duration::from_millis(1));
    }
    // The guest's acknowledging connection goes with the vCPU thread.
    vcpu.join().unwrap().unwrap();
    drop(client);
    // Connections just closed are closed by the daemon a moment later.
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.daemon_fds() != fds_after_first && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let fds_now = s.daemon_fds();
    // No growth (a leak grows by the restart); one fewer is a transient
    // descriptor of the first measurement (a connection being closed).
    assert!(
        fds_now <= fds_after_first,
        "the daemon's fds after {} restarts: {fds_now}, after 1: {fds_after_first}:\n{}",
        2 * RESTARTS_EACH + 1,
        s.fd_links()
    );
    gaps.sort();
    let mut downs = downs;
    downs.sort();
    println!(
        "{path}: {raised} interrupts across {} restarts, each delivered once; raise -> guest ISR p50 {:?}, max {:?} (the longest gap); daemon down (signal -> READY=1) p50 {:?}, max {:?}; daemon fds {fds_now}",
        2 * RESTARTS_EACH,
        percentile(&gaps, 0.5),
        gaps.last().copied().unwrap_or_default(),
        percentile(&downs, 0.5),
        downs.last().copied().unwrap_or_default(),
    );
    assert!(!log.contains("panicked"), "{log}");
    session.end_session().unwrap();
    drop(irqfd);
    drop(s);
    // Other tests open descriptors in the same process when they run in
    // parallel: the count is only this test's with one test thread.
    let serial = std::env::args().any(|a| a == "--test-threads=1")
        || std::env::var("RUST_TEST_THREADS").as_deref() == Ok("1");
    if serial {
        assert_eq!(own_fds(), baseline_fds, "the test process's own fds");
    } else {
        eprintln!(
            "NOTE {path}: the test process's own fd count is checked with --test-threads=1 only"
        );
    }
}

#[test]
fn interrupts_reach_a_kvm_guest_exactly_once_across_restarts_on_the_user_path() {
    interrupts_reach_a_kvm_guest_exactly_once_across_restarts("user", "");
}

#[test]
fn interrupts_reach_a_kvm_guest_exactly_once_across_restarts_on_the_bypass() {
    interrupts_reach_a_kvm_guest_exactly_once_across_restarts(
        "bypass",
        "sim-kernel = \"vfio-pci\"\npath = \"auto\"",
    );
}

#[test]
fn bad_store_entries_are_closed_with_a_log_line_and_nothing_else_is_disturbed() {
    let mut s = Supervised::start(&device(A, ""));
    let vmm = fake_vmm(&s, A);
    one_interrupt(&s, &vmm, A);
    // A pipe where an eventfd belongs, a second state entry that is not a
    // memfd, an entry for a device the daemon does not have, a name it
    // never stores.
    let (pipe_r, pipe_w) = nix::unistd::pipe().unwrap();
    let pipe = std::fs::read_link(format!("/proc/self/fd/{}", pipe_r.as_raw_fd()))
        .unwrap()
        .display()
        .to_string();
    let memfd = nix::sys::memfd::memfd_create(
        c"stale-sim-state",
        nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
    )
    .unwrap();
    s.sup.inject("0000-00-04.0.trigger", pipe_r);
    s.sup.inject("0000-00-04.0.sim-state", pipe_w);
    s.sup.inject("0000-00-09.0.sim-state", memfd);
    s.sup.inject(
        "garbage",
        OwnedFd::from(std::fs::File::open("/dev/null").unwrap()),
    );
    s.kill9();
    let log = s.log();
    for needle in [
        "fd store entry 0000-00-04.0.trigger is something else, not an eventfd",
        "fd store entry 0000-00-04.0.sim-state is something else, not a memfd",
        "fd store entry 0000-00-09.0.sim-state is not explained by the record: nothing resumed device 0000:00:09.0",
        "fd store entry garbage is not one this daemon stores",
    ] {
        assert!(log.contains(needle), "no {needle:?} in the log:\n{log}");
    }
    // Closed in the daemon, and out of the store.
    let links = s.fd_links();
    assert!(
        !links.contains(&pipe) && !links.contains("stale-sim-state"),
        "{links}"
    );
    let names = s.sup.store_names();
    assert!(
        !names
            .iter()
            .any(|n| n == "garbage" || n.contains("00-09.0") || n.ends_with(".trigger")),
        "{names:?}"
    );
    // Nothing else disturbed: the device and its session were resumed.
    assert!(
        s.ready_status()
            .starts_with("resumed 1 device(s) and 1 session(s)"),
        "{}",
        s.ready_status()
    );
    one_interrupt(&s, &vmm, A);
    assert_eq!(s.totals(A).raised_total, 2);
    // The good state entry that shared its name with the bad one is still
    // in the store: the next crash resumes the device with its state.
    s.kill9();
    assert!(
        s.ready_status()
            .starts_with("resumed 1 device(s) and 1 session(s)"),
        "{}; log:\n{}",
        s.ready_status(),
        s.log()
    );
    assert_eq!(s.totals(A).raised_total, 2);
    one_interrupt(&s, &vmm, A);
}

#[test]
fn entries_of_a_device_no_longer_configured_are_closed_and_the_others_resume() {
    let mut s = Supervised::start(&format!("{}{}", device(A, ""), device(B, "")));
    let vmm = fake_vmm(&s, A);
    let _vmm_b = fake_vmm(&s, B);
    one_interrupt(&s, &vmm, A);
    // B leaves the configuration; the daemon crashes.
    let config = s.dir.path().join("daemon.toml");
    std::fs::write(&config, Daemon::config_text(&s.socket, "", &device(A, ""))).unwrap();
    s.kill9();
    let log = s.log();
    for role in [
        "sim-state",
        "delivery",
        "session-irqfd",
        "session-resample",
        "session-conn",
    ] {
        let needle = format!(
            "fd store entry 0000-00-05.0.{role} is not explained by the record: nothing resumed device 0000:00:05.0"
        );
        assert!(log.contains(&needle), "no {needle:?} in the log:\n{log}");
    }
    assert!(
        !s.sup
            .store_names()
            .iter()
            .any(|n| n.starts_with("0000-00-05.0")),
        "{:?}",
        s.sup.store_names()
    );
    let st = s.status();
    assert_eq!(st.devices.len(), 1);
    assert!(st.devices[0].session);
    one_interrupt(&s, &vmm, A);
}

#[test]
fn a_session_whose_vmm_died_while_the_daemon_was_down_ends_at_resume() {
    let mut s = Supervised::start(&device(A, ""));
    let vmm = fake_vmm(&s, A);
    one_interrupt(&s, &vmm, A);
    s.sup.signal(nix::sys::signal::Signal::SIGKILL).unwrap();
    s.sup.wait_exit(Duration::from_secs(10)).unwrap();
    // The VMM dies while the daemon is down.
    drop(vmm);
    s.sup.restart().unwrap();
    s.ready();
    wait_for("the stale session's end", Duration::from_secs(5), || {
        !s.status().devices[0].session
    });
    let names = s.sup.store_names();
    assert!(
        !names.iter().any(|n| n.contains("session")),
        "session entries left in the store: {names:?}"
    );
    assert!(s.log().contains("VMM session ended"), "{}", s.log());
    // And the device takes a new session.
    let vmm = fake_vmm(&s, A);
    one_interrupt(&s, &vmm, A);
}

#[test]
fn store_messages_a_full_notify_socket_refuses_wait_in_order_and_freeze_nothing() {
    let mut d = Daemon::spawn_as("", &device(A, ""), |_, config| {
        let mut c = Command::new(BIN);
        c.args(["daemon", "--config"])
            .arg(config)
            .env("FDSTORE", "64")
            .env_remove("JOURNAL_STREAM");
        c
    });
    d.wait_notify("READY=1", Duration::from_secs(10));
    // The manager stops reading: its queue fills.
    let filler = std::os::unix::net::UnixDatagram::unbound().unwrap();
    filler.connect(d.dir.path().join("notify.sock")).unwrap();
    filler.set_nonblocking(true).unwrap();
    while filler.send(b"X_FILLER=1\n").is_ok() {}
    // A session's three entries cannot be sent now; nothing waits for them.
    let t = Instant::now();
    let vmm = FakeVmm::attach(&d, A);
    assert!(d.ask(&Request::Ping)["pid"].is_number());
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "a session and a ping took {:?} with the notify socket full",
        t.elapsed()
    );
    std::thread::sleep(Duration::from_millis(50));
    // The manager reads again: every entry arrives, in order.
    let mut names = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(5);
    while names.len() < 3 && Instant::now() < deadline {
        if let Ok(n) = d.notify.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            if msg.contains("FDSTORE=1") {
                for l in msg.lines() {
                    if let Some(name) = l.strip_prefix("FDNAME=") {
                        if name.contains("session") {
                            names.push(name.to_owned());
                        }
                    }
                }
            }
        }
    }
    assert_eq!(
        names,
        [
            "0000-00-04.0.session-irqfd",
            "0000-00-04.0.session-resample",
            "0000-00-04.0.session-conn"
        ],
        "log:\n{}",
        d.log()
    );
    assert!(
        d.log().contains("fd store messages wait and are retried"),
        "{}",
        d.log()
    );
    drop(vmm);
    d.signal(nix::sys::signal::Signal::SIGTERM);
    let (code, took) = d.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{}", d.log());
    assert!(took < Duration::from_secs(3), "{took:?}");
}

#[test]
fn an_operator_hold_outlives_a_restart_and_a_crash() {
    let mut s = Supervised::start(&device(A, ""));
    let vmm = fake_vmm(&s, A);
    one_interrupt(&s, &vmm, A);
    s.ask(&Request::Mask {
        bdf: A.parse().unwrap(),
    });
    s.restart_keeping(false);
    assert_eq!(
        s.status().devices[0].held.as_deref(),
        Some("operator"),
        "log:\n{}",
        s.log()
    );
    s.kill9();
    assert_eq!(s.status().devices[0].held.as_deref(), Some("operator"));
    // Held: an interrupt waits for the release.
    raise(&s, A);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(vmm.injected(), 0, "delivered while held");
    s.ask(&Request::Unmask {
        bdf: A.parse().unwrap(),
    });
    wait_for("the held interrupt", Duration::from_secs(5), || {
        vmm.injected() > 0
    });
    ack(&s, A);
    vmm.eoi();
    // Lifted: the next process does not hold it again.
    s.kill9();
    assert_eq!(s.status().devices[0].held, None);
}

#[test]
fn without_an_fd_store_a_restart_is_refused_and_the_daemon_keeps_running() {
    // NOTIFY_SOCKET without FDSTORE=: a manager that keeps no store.
    let d = Daemon::start(&device(A, ""));
    let out = d.cli(&["restart"]);
    assert_eq!(out.status.code(), Some(i32::from(exit::FAILED)), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no service manager keeps an fd store"),
        "{stderr}"
    );
    assert!(d.ask(&Request::Ping)["pid"].is_number());
    // SIGUSR2 likewise: logged, nothing else.
    d.signal(nix::sys::signal::Signal::SIGUSR2);
    d.wait_log("SIGUSR2: not restarting");
    assert!(d.ask(&Request::Ping)["pid"].is_number());
}

#[test]
fn a_store_lost_after_a_crash_falls_back_to_the_as_found_record() {
    let mut s = Supervised::start(&device(A, "sim-command = 0x0003"));
    let FakeVmm { mut session, .. } = fake_vmm(&s, A);
    s.sup.signal(nix::sys::signal::Signal::SIGKILL).unwrap();
    s.sup.wait_exit(Duration::from_secs(10)).unwrap();
    // The store is gone (a stop, a manager restart): the record remains.
    s.sup.release_store();
    s.sup.restart().unwrap();
    s.ready();
    assert!(
        s.log()
            .contains("the record names fd store entries that are missing"),
        "{}",
        s.log()
    );
    let dev = &s.status().devices[0];
    assert_eq!(
        dev.found_command, 0x0003,
        "COMMAND as the first instance found it"
    );
    assert!(!dev.session);
    // The VMM's connection ended with the first process.
    session.wait_closed().unwrap();
}
