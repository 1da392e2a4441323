//! The fd-store harness (`vfio_intx::fdstore_harness`) against a child that
//! speaks the protocol: this test executable re-invoked (`child_entry`)
//! with `FDSTORE_CHILD_ACTIONS`, reading `LISTEN_*` with the real
//! `sd-notify` crate and storing fds with `sendmsg(SCM_RIGHTS)`. Each
//! start reports what it got (`report`) on the notify socket itself.
#![cfg(all(feature = "testkit", feature = "daemon"))]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::io::{IoSlice, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use vfio_intx::fdstore_harness::{FdKind, Notification, ServiceCommand, StoreOptions, Supervisor};

const ACTIONS: &str = "FDSTORE_CHILD_ACTIONS";
const ONESHOT: &str = "FDSTORE_CHILD_ONESHOT";
const T: Duration = Duration::from_secs(10);

// ------------------------------------------------------------------ the child

/// Sends `text` (lines separated by `|`) with `fds` to NOTIFY_SOCKET.
fn send(text: &str, fds: &[i32]) {
    let path = std::env::var_os("NOTIFY_SOCKET").expect("NOTIFY_SOCKET");
    let sock = UnixDatagram::unbound().unwrap();
    sock.connect(path).unwrap();
    let text = text.replace('|', "\n");
    let raw = fds;
    let cmsgs: Vec<ControlMessage<'_>> = if raw.is_empty() {
        vec![]
    } else {
        vec![ControlMessage::ScmRights(raw)]
    };
    sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(text.as_bytes())],
        &cmsgs,
        MsgFlags::empty(),
        None,
    )
    .unwrap();
}

fn data_file(marker: &str) -> OwnedFd {
    let mut f = tempfile::tempfile().unwrap();
    f.write_all(marker.as_bytes()).unwrap();
    f.into()
}

/// What one start received, as one notification.
fn report() {
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| "-".into());
    let mut lines = vec![
        "STATUS=report".to_string(),
        format!("X_PID={}", std::process::id()),
        format!("X_LISTEN_PID={}", var("LISTEN_PID")),
        format!("X_LISTEN_FDS={}", var("LISTEN_FDS")),
        format!("X_LISTEN_FDNAMES={}", var("LISTEN_FDNAMES")),
        format!("X_FDSTORE={}", var("FDSTORE")),
    ];
    // The real sd-notify crate: empty unless LISTEN_PID is this process.
    let fds: Vec<(i32, String)> = sd_notify::listen_fds_with_names(false)
        .map(|i| i.collect())
        .unwrap_or_default();
    lines.push(format!(
        "X_SD_NOTIFY={}",
        fds.iter()
            .map(|(fd, n)| format!("{fd}={n}"))
            .collect::<Vec<_>>()
            .join(",")
    ));
    let open: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    lines.push(format!("X_OPEN={}", open.join(",")));
    for (fd, name) in &fds {
        let link = format!("/proc/self/fd/{fd}");
        let target = std::fs::read_link(&link)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let ino = std::fs::metadata(&link).map(|m| m.ino()).unwrap_or(0);
        let kind = FdKind::from_link(&target);
        let data = match kind {
            FdKind::Other(_) => std::fs::read_to_string(&link).unwrap_or_default(),
            _ => String::new(),
        };
        let kind = kind.to_string().replace(' ', "_");
        lines.push(format!("X_FD={fd} {name} {ino} {kind} {data}"));
    }
    send(&lines.join("|"), &[]);
}

/// The child's body: the actions in `FDSTORE_CHILD_ACTIONS`, then wait to
/// be killed (or exit, with `FDSTORE_CHILD_ONESHOT`).
fn child(actions: &str) {
    let mut kept: Vec<OwnedFd> = Vec::new();
    let mut peers: Vec<UnixStream> = Vec::new();
    let mut events = Vec::new();
    for action in actions.split(';').filter(|a| !a.is_empty()) {
        let args: Vec<&str> = action.split(',').collect();
        match args[..] {
            ["report"] => report(),
            ["ready"] => sd_notify::notify(false, &[sd_notify::NotifyState::Ready]).unwrap(),
            ["file", name, marker] => {
                let f = data_file(marker);
                send(&format!("FDSTORE=1|FDNAME={name}"), &[f.as_raw_fd()]);
                kept.push(f);
            }
            ["noname"] => {
                let f = data_file("noname");
                send("FDSTORE=1", &[f.as_raw_fd()]);
                kept.push(f);
            }
            ["many", name, n] => {
                let fs: Vec<OwnedFd> = (0..n.parse().unwrap())
                    .map(|i| data_file(&i.to_string()))
                    .collect();
                let b: Vec<i32> = fs.iter().map(|f| f.as_raw_fd()).collect();
                send(&format!("FDSTORE=1|FDNAME={name}"), &b);
                kept.extend(fs);
            }
            ["eventfd", name] => {
                let e = vmm_sys_util::eventfd::EventFd::new(libc::EFD_CLOEXEC).unwrap();
                send(&format!("FDSTORE=1|FDNAME={name}"), &[e.as_raw_fd()]);
                events.push(e);
            }
            ["sock", name] | ["socknopoll", name] => {
                let (a, b) = UnixStream::pair().unwrap();
                let nopoll = if args[0] == "socknopoll" {
                    "|FDPOLL=0"
                } else {
                    ""
                };
                send(
                    &format!("FDSTORE=1|FDNAME={name}{nopoll}"),
                    &[a.as_raw_fd()],
                );
                kept.push(a.into());
                peers.push(b);
            }
            ["closepeers"] => peers.clear(),
            ["again", name] => {
                let f = kept.last().unwrap();
                send(&format!("FDSTORE=1|FDNAME={name}"), &[f.as_raw_fd()]);
            }
            ["remove", name] => send(&format!("FDSTOREREMOVE=1|FDNAME={name}"), &[]),
            ["raw", text] => {
                let f = data_file("raw");
                send(text, &[f.as_raw_fd()]);
                kept.push(f);
            }
            ["intruder"] => {
                let status = std::process::Command::new(std::env::current_exe().unwrap())
                    .args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
                    .env(ACTIONS, "file,intruder,x")
                    .env(ONESHOT, "1")
                    .stdout(std::process::Stdio::null())
                    .status()
                    .unwrap();
                assert!(status.success());
            }
            _ => panic!("unknown child action {action:?}"),
        }
    }
    if std::env::var_os(ONESHOT).is_some() {
        return;
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// The child's entry point when this executable runs as the service
/// (`FDSTORE_CHILD_ACTIONS` set); in the test run itself there is nothing
/// to do.
#[test]
fn child_entry() {
    if let Ok(actions) = std::env::var(ACTIONS) {
        child(&actions);
    }
}

// ------------------------------------------------------------------ the tests

fn service(actions: &str) -> ServiceCommand {
    ServiceCommand::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
        .env(ACTIONS, actions)
        .env_remove(ONESHOT)
        .stdout(std::fs::File::create("/dev/null").unwrap())
}

fn start(actions: &str, max: usize) -> Supervisor {
    let mut s = Supervisor::start(service(actions), StoreOptions::default().with_max(max)).unwrap();
    let up = s
        .wait_ready(T)
        .unwrap_or_else(|e| panic!("{e}; log {:?}", s.log()));
    eprintln!("[fdstore] exec to READY=1: {up:?}");
    s
}

/// Restarts with `actions` (`sig`: SIGTERM-with-restart or SIGKILL) and
/// returns the new start's report.
fn restart(s: &mut Supervisor, sig: Signal, actions: &str) -> Notification {
    s.command_mut().set_env(ACTIONS, actions);
    let since = s.notifications().len();
    let r = s.stop_and_restart(sig, T).unwrap();
    let up = s
        .wait_ready(T)
        .unwrap_or_else(|e| panic!("{e}; log {:?}", s.log()));
    eprintln!(
        "[fdstore] {sig}: exit {}, down {:?}, exec to READY=1 {up:?}",
        r.exit, r.down
    );
    let pid = s.pid().unwrap();
    s.wait_notification(since, T, |n| n.pid == pid && n.has("STATUS=report"))
        .unwrap()
}

fn fd_lines(n: &Notification) -> Vec<Vec<String>> {
    n.lines
        .iter()
        .filter_map(|l| l.strip_prefix("X_FD="))
        .map(|l| l.splitn(5, ' ').map(String::from).collect())
        .collect()
}

fn ino(fd: &OwnedFd) -> u64 {
    nix::sys::stat::fstat(fd.as_raw_fd()).unwrap().st_ino
}

#[test]
fn a_restart_passes_the_store_newest_first_by_name_to_the_childs_own_pid() {
    let mut s = start(
        "file,state,marker-1;eventfd,irqfd;socknopoll,conn;file,state,marker-2;eventfd,gone;remove,gone;ready",
        16,
    );
    // Newest first (systemd prepends); both "state" kept; "gone" removed.
    assert_eq!(
        s.store_names(),
        ["state", "conn", "irqfd", "state"],
        "{:?}",
        s.log()
    );
    let stored = s.store().unwrap();
    let kinds: Vec<String> = stored.iter().map(|f| f.kind.to_string()).collect();
    assert_eq!(kinds[1..3], ["socket", "eventfd"]);
    let conn_ino = ino(&stored[1].fd);

    let rep = restart(&mut s, Signal::SIGTERM, "report;ready");
    let pid = s.pid().unwrap().to_string();
    assert_eq!(rep.get("X_PID"), Some(pid.as_str()));
    assert_eq!(
        rep.get("X_LISTEN_PID"),
        Some(pid.as_str()),
        "LISTEN_PID is the child's own pid"
    );
    assert_eq!(rep.get("X_LISTEN_FDS"), Some("4"));
    assert_eq!(rep.get("X_LISTEN_FDNAMES"), Some("state:conn:irqfd:state"));
    assert_eq!(rep.get("X_FDSTORE"), Some("16"));
    // Nothing else of the test process reached the child: stdio, the four
    // stored fds, and the directory the child lists them with.
    assert_eq!(rep.get("X_OPEN"), Some("0,1,2,3,4,5,6,7"));
    // The real sd-notify crate sees the same (it checks LISTEN_PID).
    assert_eq!(
        rep.get("X_SD_NOTIFY"),
        Some("3=state,4=conn,5=irqfd,6=state")
    );
    let fds = fd_lines(&rep);
    assert_eq!(fds.len(), 4, "{rep:?}");
    // The same objects: the files' contents, the socket's inode.
    assert_eq!(
        (fds[0][1].as_str(), fds[0][4].as_str()),
        ("state", "marker-2")
    );
    assert_eq!(fds[1][2], conn_ino.to_string());
    assert_eq!(fds[1][3], "socket");
    assert_eq!(fds[2][3], "eventfd");
    assert_eq!(
        (fds[3][1].as_str(), fds[3][4].as_str()),
        ("state", "marker-1")
    );
    // The store itself is unchanged by passing it.
    assert_eq!(s.store_names(), ["state", "conn", "irqfd", "state"]);
    assert!(s.errors().is_empty(), "{:?}", s.errors());
}

#[test]
fn kill_9_keeps_the_store_and_a_stop_closes_it() {
    let mut s = start("ready", 8);
    let (ours, theirs) = UnixStream::pair().unwrap();
    s.inject("conn", theirs.into());
    let rep = restart(&mut s, Signal::SIGKILL, "report;ready");
    assert_eq!(rep.get("X_SD_NOTIFY"), Some("3=conn"));
    // Still open: no EOF for the peer after the crash.
    ours.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 1];
    let e = (&ours).read(&mut buf).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
    let rep = restart(&mut s, Signal::SIGKILL, "report;ready");
    assert_eq!(rep.get("X_SD_NOTIFY"), Some("3=conn"));

    let status = s.stop(Signal::SIGTERM, T).unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGTERM)
    );
    assert!(s.store_names().is_empty());
    ours.set_nonblocking(false).unwrap();
    ours.set_read_timeout(Some(T)).unwrap();
    assert_eq!(
        (&ours).read(&mut buf).unwrap(),
        0,
        "the peer sees EOF after a stop"
    );
}

#[test]
fn a_stored_socket_whose_peer_hung_up_is_dropped_unless_fdpoll_0() {
    let s = start("sock,polled;socknopoll,kept;closepeers;ready", 8);
    let deadline = std::time::Instant::now() + T;
    while s.store_names() != ["kept"] {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?} {:?}",
            s.store_names(),
            s.log()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        s.log()
            .iter()
            .any(|l| l.contains("POLLHUP on stored fd (polled)")),
        "{:?}",
        s.log()
    );
}

#[test]
fn an_invalid_fdname_is_stored_as_stored_not_refused() {
    let long = "x".repeat(256);
    let s = start(
        &format!(
            "raw,FDSTORE=1|FDNAME=bad:name;raw,FDSTORE=1|FDNAME={long};noname;raw,FDSTORE=1|FDNAME=ctl\ttab;\
             raw,FDSTOREREMOVE=1|FDNAME=bad:name;file,{},ok;ready",
            "y".repeat(255)
        ),
        8,
    );
    let names = s.store_names();
    assert_eq!(names.len(), 5, "{names:?} {:?}", s.log());
    assert_eq!(names[0], "y".repeat(255));
    assert!(names[1..].iter().all(|n| n == "stored"), "{names:?}");
    let log = s.log();
    assert_eq!(
        log.iter()
            .filter(|l| l.contains("FDNAME= name is invalid"))
            .count(),
        3,
        "{log:?}"
    );
    assert!(
        log.iter()
            .any(|l| l.contains("FDSTOREREMOVE=1 requested, but no valid")),
        "{log:?}"
    );
}

#[test]
fn fds_past_the_store_max_are_closed() {
    let s = start("many,a,3;file,b,x;ready", 2);
    assert_eq!(s.store_names(), ["a", "a"], "{:?}", s.log());
    let log = s.log();
    assert!(
        log.iter()
            .filter(|l| l.contains("FileDescriptorStoreMax=2"))
            .count()
            == 2,
        "{log:?}"
    );
}

#[test]
fn the_same_open_file_twice_is_stored_once() {
    let s = start("file,a,x;again,b;ready", 8);
    assert_eq!(s.store_names(), ["a"]);
    assert!(
        s.log()
            .iter()
            .any(|l| l.contains("suppressing duplicate fd (b)")),
        "{:?}",
        s.log()
    );
}

#[test]
fn a_message_from_another_pid_is_ignored_and_its_fds_closed() {
    let s = start("intruder;ready", 8);
    assert!(s.store_names().is_empty(), "{:?}", s.store_names());
    let main = s.pid().unwrap();
    let ignored: Vec<Notification> = s
        .notifications()
        .into_iter()
        .filter(|n| !n.accepted)
        .collect();
    assert_eq!(ignored.len(), 1, "{ignored:?}");
    assert_ne!(ignored[0].pid, main);
    assert_eq!(ignored[0].get("FDNAME"), Some("intruder"));
    assert_eq!(ignored[0].fds, 1);
    assert!(
        s.log()
            .iter()
            .any(|l| l.contains("only permitted for main pid")),
        "{:?}",
        s.log()
    );
}

const LEAK_PROBE: &str = "FDSTORE_LEAK_PROBE";

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// A whole supervisor life (stores, restarts, a hang-up, a stop) in a
/// process of its own, so that no other test's descriptors are counted.
#[test]
fn leak_probe_entry() {
    if std::env::var_os(LEAK_PROBE).is_none() {
        return;
    }
    let before = open_fds();
    {
        let mut s = start("file,a,x;eventfd,b;sock,c;closepeers;ready", 8);
        s.wait_store(T, |n| n == ["b", "a"]).unwrap();
        restart(&mut s, Signal::SIGTERM, "report;file,d,y;ready");
        restart(&mut s, Signal::SIGKILL, "report;ready");
        assert_eq!(s.store_names(), ["d", "b", "a"]);
        s.stop(Signal::SIGTERM, T).unwrap();
        assert!(s.errors().is_empty(), "{:?}", s.errors());
    }
    assert_eq!(open_fds(), before, "descriptors leaked by the harness");
}

#[test]
fn the_harness_leaks_no_descriptors() {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "leak_probe_entry",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(LEAK_PROBE, "1")
        .env_remove(ACTIONS)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("test leak_probe_entry ... ok"), "{text}");
}

#[test]
fn no_store_without_a_max_and_nothing_passed_without_fds() {
    let mut s = start("file,a,x;ready", 0);
    assert!(s.store_names().is_empty());
    let rep = restart(&mut s, Signal::SIGTERM, "report;ready");
    assert_eq!(rep.get("X_LISTEN_FDS"), Some("-"));
    assert_eq!(rep.get("X_LISTEN_PID"), Some("-"));
    assert_eq!(rep.get("X_FDSTORE"), Some("-"));
}

/// The real daemon under the harness, as it is today (no fd store use
/// yet): READY=1 with a STATUS= line, a SIGTERM restart, STOPPING=1 and a
/// clean exit on stop. The figures are the daemon's exec to READY=1.
#[cfg(feature = "cli")]
#[test]
fn the_daemon_starts_restarts_and_stops_under_the_harness() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("control.sock");
    let config = dir.path().join("daemon.toml");
    std::fs::write(
        &config,
        format!(
            "[daemon]\nsocket = \"{}\"\n\n[[device]]\nbdf = \"0000:00:04.0\"\nbackend = \"sim\"\n",
            socket.display()
        ),
    )
    .unwrap();
    let log = dir.path().join("daemon.log");
    let cmd = ServiceCommand::new(env!("CARGO_BIN_EXE_vfio-intx"))
        .args(["daemon", "--config"])
        .arg(&config)
        .env_remove("JOURNAL_STREAM")
        .env("RUST_LOG", "info")
        .stdout(std::fs::File::create("/dev/null").unwrap())
        .stderr(std::fs::File::create(&log).unwrap());
    let mut s = Supervisor::start(cmd, StoreOptions::default().with_max(64)).unwrap();
    let dump = |s: &Supervisor| {
        format!(
            "{:?}\n{}",
            s.log(),
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    };
    let up = s
        .wait_ready(T)
        .unwrap_or_else(|e| panic!("{e}: {}", dump(&s)));
    let ready = s.wait_notification(0, T, |n| n.has("READY=1")).unwrap();
    assert!(ready.get("STATUS").is_some(), "{ready:?}");
    let r = s.stop_and_restart(Signal::SIGTERM, T).unwrap();
    let up2 = s
        .wait_ready(T)
        .unwrap_or_else(|e| panic!("{e}: {}", dump(&s)));
    assert!(r.exit.success(), "{}: {}", r.exit, dump(&s));
    eprintln!(
        "[fdstore] daemon exec to READY=1: {up:?}; after a SIGTERM restart (down {:?}): {up2:?}",
        r.down
    );
    let status = s.stop(Signal::SIGTERM, T).unwrap();
    assert!(status.success(), "{status}: {}", dump(&s));
    assert!(
        s.lines().iter().any(|l| l == "STOPPING=1"),
        "{:?}",
        s.lines()
    );
    assert!(s.errors().is_empty(), "{:?}", s.errors());
}
