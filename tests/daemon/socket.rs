//! The control socket: requests, framing, client timeout, peer
//! credentials, client limits, the frame decoder.

use super::*;

#[test]
fn control_requests_reach_the_device() {
    let d = Daemon::start(&device(A, "sim-command = 0x0006"));
    // No session: the interrupt is delivered, parked for the next session.
    d.ask(&Request::SimRaise {
        bdf: A.parse().unwrap(),
        count: 1,
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while d.interrupts(A) < 1 {
        assert!(Instant::now() < deadline, "{}", d.log());
        std::thread::sleep(Duration::from_millis(5));
    }
    let stats = d.ask(&Request::Stats {
        bdf: Some(A.parse().unwrap()),
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
    let p = d.ask(&Request::Probe {
        bdf: A.parse().unwrap(),
    });
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
    // The daemon's answer, as the CLI prints it: the operation and the
    // device, the device named once.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("error: mask 0000:00:1f.0: "), "{stderr}");
    assert_eq!(stderr.matches("0000:00:1f.0").count(), 1, "{stderr}");
    // A bad address is refused when the request is decoded.
    let r = d
        .client()
        .request_raw_json(br#"{"op":"sim-ack","bdf":"zz"}"#);
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
    // The test makes the socket world-writable (the configuration refuses
    // such a mode) so that the refusal is the daemon's SO_PEERCRED check,
    // not the file mode.
    let d = Daemon::start(&device(A, ""));
    std::fs::set_permissions(&d.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
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
            stream.extend(protocol::encode(&Request::Stats { bdf: Some(vfio_intx::pci::Bdf::new(0, i as u8, 0, 0).unwrap()) }).unwrap());
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

    // Out of descriptors: a daemon started under a low descriptor limit
    // (set before it execs, so no `prlimit --pid`, which CI sandboxes
    // refuse), connections held open until accept() fails with EMFILE,
    // then let go again.
    drop(d);
    let d = Daemon::spawn_as("max-clients = 500", &device(A, ""), |_, config| {
        super::attacks::under_fd_limit(40, config)
    });
    d.wait_notify("READY=1", Duration::from_secs(10));
    let flood: Vec<std::os::unix::net::UnixStream> = (0..60)
        .filter_map(|_| std::os::unix::net::UnixStream::connect(&d.socket).ok())
        .collect();
    d.wait_log("accepting a client failed");
    drop(flood);
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
}

#[test]
fn a_long_pci_address_is_echoed_bounded_and_named_once() {
    let d = Daemon::start(&device(A, ""));
    // 600 KB of address: the answer used to repeat it twice and exceed
    // the 1 MiB frame cap, so no answer came at all.
    let long = "0".repeat(600_000);
    let r = d
        .client()
        .request_raw_json(format!(r#"{{"op":"reset","bdf":"{long}"}}"#).as_bytes());
    let Response::Error { kind, message } = r else {
        panic!("{r:?}");
    };
    assert_eq!(kind, ErrorKind::BadRequest);
    assert!(
        message.len() < 512,
        "{} bytes: {message:.300}",
        message.len()
    );
    assert!(message.contains("(600000 bytes)"), "{message}");
    assert_eq!(
        message.matches("invalid PCI address").count(),
        1,
        "{message}"
    );
    // The CLI says it once too.
    let out = d.cli(&["mask", "00:04"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert_eq!(err.matches("invalid PCI address").count(), 1, "{err}");
    assert!(err.contains("\"00:04\""), "{err}");
}

/// Spawns a daemon whose socket is `run/control.sock` under its test
/// directory, after `prepare(run)` set the scene (the directory is
/// created 0755 first).
fn spawn_in_run_dir(prepare: impl FnOnce(&Path)) -> (Daemon, PathBuf) {
    let mut socket = PathBuf::new();
    let d = Daemon::spawn_as("", &device(A, ""), |dir, config| {
        let run = dir.join("run");
        std::fs::create_dir(&run).unwrap();
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();
        prepare(&run);
        socket = run.join("control.sock");
        let mut c = Command::new(BIN);
        c.args(["daemon", "--config"])
            .arg(config)
            .arg("--socket")
            .arg(&socket)
            .env_remove("JOURNAL_STREAM");
        c
    });
    (d, socket)
}

#[test]
fn anything_but_a_stale_socket_at_the_socket_path_is_refused_and_kept() {
    // A regular file.
    let (mut d, socket) = spawn_in_run_dir(|run| {
        std::fs::write(run.join("control.sock"), "precious").unwrap();
    });
    let (code, _) = d.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(i32::from(exit::RUNTIME)), "{}", d.log());
    assert_eq!(std::fs::read_to_string(&socket).unwrap(), "precious");
    assert!(d.log().contains("not a socket"), "{}", d.log());
    assert!(!d.log().contains("INTx masking probed"), "{}", d.log());
    // A symbolic link (to a file the daemon must not chmod or chown).
    let target = tempfile::NamedTempFile::new().unwrap();
    std::fs::set_permissions(target.path(), std::fs::Permissions::from_mode(0o600)).unwrap();
    let (mut d, socket) = spawn_in_run_dir(|run| {
        std::os::unix::fs::symlink(target.path(), run.join("control.sock")).unwrap();
    });
    let (code, _) = d.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(i32::from(exit::RUNTIME)), "{}", d.log());
    assert!(std::fs::symlink_metadata(&socket).unwrap().is_symlink());
    let mode = std::fs::metadata(target.path())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // A stale socket (nobody listens) is replaced.
    let (d, socket) = spawn_in_run_dir(|run| {
        drop(std::os::unix::net::UnixListener::bind(run.join("control.sock")).unwrap());
    });
    d.wait_notify("READY=1", Duration::from_secs(10));
    assert!(Client::connect(&socket, Duration::from_secs(5)).is_ok());
}

#[test]
fn a_socket_directory_others_can_write_or_own_is_refused() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "SKIP a_socket_directory_others_can_write_or_own_is_refused: needs root to chown"
        );
        return;
    }
    for (what, mode, owner) in [
        ("world-writable", 0o777, 0),
        ("group-writable", 0o775, 0),
        ("owned by uid 65534", 0o755, 65534),
    ] {
        let (mut d, socket) = spawn_in_run_dir(|run| {
            std::fs::set_permissions(run, std::fs::Permissions::from_mode(mode)).unwrap();
            std::os::unix::fs::chown(run, Some(owner), None).unwrap();
        });
        let (code, _) = d.wait_exit(Duration::from_secs(10));
        let log = d.log();
        assert_eq!(code, Some(i32::from(exit::PERMISSION)), "{what}: {log}");
        assert!(
            log.contains("run: "),
            "{what}: the directory is named: {log}"
        );
        assert!(!socket.exists(), "{what}");
        assert!(!log.contains("INTx masking probed"), "{what}: {log}");
    }
}

#[test]
fn the_cli_reports_a_hung_daemon_as_not_answering() {
    // A "daemon" that accepts connections (the backlog) and never answers.
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("control.sock");
    let _hung = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let start = Instant::now();
    let out = Command::new(BIN)
        .args(["status", "--json", "--timeout", "1", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    let took = start.elapsed();
    assert_eq!(
        out.status.code(),
        Some(i32::from(exit::UNREACHABLE)),
        "{out:?}"
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["error"]["kind"], "unreachable", "{json}");
    let message = json["error"]["message"].as_str().unwrap();
    assert!(message.contains("not answering"), "{message}");
    assert!(message.contains(&socket.display().to_string()), "{message}");
    assert!(took < Duration::from_secs(5), "{took:?}");
}

/// A reset the daemon takes more than a second to answer (it waits behind
/// another reset) says so once on stderr, and --json stdout stays one
/// document.
#[test]
fn a_reset_waiting_more_than_a_second_says_what_it_waits_for() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("control.sock");
    let _hung = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let out = Command::new(BIN)
        .args([
            "reset",
            "0000:00:04.0",
            "--json",
            "--timeout",
            "3",
            "--socket",
        ])
        .arg(&socket)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(i32::from(exit::UNREACHABLE)),
        "{out:?}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let waiting = "reset 0000:00:04.0: waiting for the daemon's answer";
    assert_eq!(stderr.matches(waiting).count(), 1, "{stderr}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["error"]["operation"], "reset", "{json}");
}

/// The value of `vfio_intx_control_events_total{cause="…"}`.
///
/// With `max-clients = 1` the slot of a client that just hung up is freed
/// once the daemon has closed it, so a refusal for too many clients is
/// asked again (for up to 5 s) instead of being read as an answer, and
/// counted in `refused`: each one is itself a `too-many-clients` event.
fn control_events(d: &Daemon, cause: &str, refused: &std::cell::Cell<u64>) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    let data = loop {
        match d.client().request(&Request::Metrics).unwrap() {
            Response::Ok { data } => break data,
            Response::Error {
                kind: ErrorKind::TooManyClients,
                ..
            } if Instant::now() < deadline => {
                refused.set(refused.get() + 1);
                std::thread::sleep(Duration::from_millis(5));
            }
            other => panic!("metrics: {other:?}"),
        }
    };
    let text = data["text"].as_str().unwrap().to_owned();
    let row = format!("vfio_intx_control_events_total{{cause=\"{cause}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&row))
        .unwrap_or_else(|| panic!("no {row:?} in\n{text}"))
        .parse()
        .unwrap()
}

#[test]
fn client_faults_and_sessions_are_counted_per_cause_and_logged_rate_limited() {
    let d = Daemon::start_with("max-clients = 1\nclient-timeout-ms = 500", &device(A, ""));
    let start = Instant::now();
    // Too many clients: one holds the only slot.
    let held = d.client();
    std::thread::sleep(Duration::from_millis(20));
    for _ in 0..200 {
        let mut c = d.client();
        assert!(matches!(
            c.read_response(),
            Ok(Response::Error {
                kind: ErrorKind::TooManyClients,
                ..
            })
        ));
    }
    // Timeouts, and their client gone.
    let r = { held }.read_response();
    assert!(
        matches!(
            r,
            Ok(Response::Error {
                kind: ErrorKind::Timeout,
                ..
            })
        ),
        "{r:?}"
    );
    for _ in 0..2 {
        let r = d.client().read_response();
        assert!(
            matches!(
                r,
                Ok(Response::Error {
                    kind: ErrorKind::Timeout,
                    ..
                })
            ),
            "{r:?}"
        );
    }
    // Bad frames.
    for _ in 0..300 {
        let mut c = d.client();
        c.send_raw(b"\0\0\0\x09{not json").unwrap();
        assert!(matches!(
            c.read_response(),
            Ok(Response::Error {
                kind: ErrorKind::BadRequest,
                ..
            })
        ));
    }
    // Sessions starting and ending.
    for _ in 0..20 {
        let vmm = FakeVmm::attach(&d, A);
        vmm.session.end_session().unwrap();
    }
    // Unauthorized peers (as root: a client running as uid 65534).
    let unauthorized = if nix::unistd::geteuid().is_root() {
        std::fs::set_permissions(&d.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
        std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let script = format!(
            "import socket\nfor i in range(1000):\n    s = socket.socket(socket.AF_UNIX)\n    \
             s.connect({:?})\n    s.recv(4096)\n    s.close()\n",
            d.socket.display().to_string()
        );
        let out = Command::new("setpriv")
            .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
            .args(["/usr/bin/python3", "-c", &script])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        1000
    } else {
        eprintln!("SKIP the unauthorized-peer part: needs root to run a client as uid 65534");
        0
    };
    let took = start.elapsed();
    // One line per cause (the window is longer than the test), none lost
    // from the counts.
    std::thread::sleep(Duration::from_millis(100));
    let log = d.log();
    let causes = [
        (
            "too-many-clients",
            "refusing a client: too many clients",
            200,
        ),
        ("timeout", "closing an idle client", 3),
        ("bad-frame", "closing a client after a bad frame", 300),
        ("session-started", "VMM session started", 20),
        ("session-ended", "VMM session ended", 20),
        (
            "unauthorized",
            "refusing a client: not allowed",
            unauthorized,
        ),
    ];
    let lines = |needle: &str| log.matches(needle).count();
    let figures: Vec<String> = causes
        .iter()
        .map(|(cause, needle, events)| {
            format!("{cause}: {events} events, {} log lines", lines(needle))
        })
        .collect();
    println!("{} in {took:?}", figures.join("; "));
    let refused = std::cell::Cell::new(0);
    for (cause, needle, events) in causes {
        wait_for(cause, Duration::from_secs(5), || {
            let counted = control_events(&d, cause, &refused);
            match cause {
                "too-many-clients" => counted == events + refused.get(),
                _ => counted == events,
            }
        });
        if events > 0 {
            let lines = lines(needle);
            assert!(
                (1..=3).contains(&lines),
                "{cause}: {lines} lines for {events} events:\n{log}"
            );
        }
    }
}

/// Runs tests/daemon/scripts/vmm_roles.py against `d` as uid/gid 65534
/// (nobody/nogroup); its answers by step.
fn vmm_as_nobody(d: &Daemon) -> serde_json::Value {
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/daemon/scripts/vmm_roles.py"
    );
    let out = Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .args(["/usr/bin/python3", script])
        .arg(&d.socket)
        .args([A, B])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn a_vmm_acts_only_on_its_own_sessions_device_and_operators_on_any() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIP a_vmm_acts_only_on_its_own_sessions_device_and_operators_on_any: needs root to run a client as uid 65534");
        return;
    }
    let devices = format!("{}{}", device(A, ""), device(B, ""));
    let d = Daemon::start_with("socket-group = \"nogroup\"\nsocket-mode = 0o660", &devices);
    let r = vmm_as_nobody(&d);
    let result = |step: &str| r[step]["result"].as_str().unwrap_or("").to_owned();
    let kind = |step: &str| r[step]["kind"].as_str().unwrap_or("").to_owned();
    assert_eq!(result("status"), "ok", "{r}");
    assert_eq!(result("session"), "ok", "{r}");
    for step in ["mask-own", "unmask-own", "reset-own"] {
        assert_eq!(result(step), "ok", "{step}: {r}");
    }
    for step in [
        "mask-before-session",
        "mask-other",
        "reset-other",
        "sim-raise-other",
    ] {
        assert_eq!(kind(step), "permission-denied", "{step}: {r}");
    }
    assert!(
        r["mask-other"]["message"]
            .as_str()
            .unwrap()
            .contains("admin-group"),
        "{r}"
    );
    assert_eq!(device_status(&d, B).held, None);
    assert_eq!(device_status(&d, B).stats.engine.resets, 0);
    // Root is an operator.
    assert!(d.cli(&["mask", B]).status.success());
    assert!(d.cli(&["unmask", B]).status.success());
    // So is a member of the admin group.
    let d = Daemon::start_with(
        "socket-group = \"nogroup\"\nsocket-mode = 0o660\nadmin-group = \"nogroup\"",
        &devices,
    );
    let r = vmm_as_nobody(&d);
    for step in [
        "mask-before-session",
        "mask-other",
        "reset-other",
        "sim-raise-other",
    ] {
        assert_eq!(r[step]["result"], "ok", "{step}: {r}");
    }
}

#[test]
fn the_cli_reports_a_daemon_whose_backlog_is_full_as_not_answering() {
    use nix::sys::socket::{
        bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
    };
    // A hung daemon that stopped accepting: its backlog (0: one pending
    // connection) is full, so a blocking connect(2) would wait for ever.
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("control.sock");
    let listener = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    bind(listener.as_raw_fd(), &UnixAddr::new(&socket_path).unwrap()).unwrap();
    listen(&listener, Backlog::new(0).unwrap()).unwrap();
    let _pending = std::os::unix::net::UnixStream::connect(&socket_path).unwrap();
    let start = Instant::now();
    let mut child = Command::new(BIN)
        .args(["status", "--json", "--timeout", "1", "--socket"])
        .arg(&socket_path)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if start.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the CLI still waits after 10 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(code, Some(i32::from(exit::UNREACHABLE)));
    let mut stdout = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut stdout).unwrap();
    assert!(stdout.contains("not answering"), "{stdout}");
    println!("answered 'not answering' after {:?}", start.elapsed());
}
