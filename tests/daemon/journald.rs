//! Logs to journald when stderr is the journal.

use super::*;

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
