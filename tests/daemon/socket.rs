//! The control socket: requests, framing, client timeout, peer
//! credentials, client limits, the frame decoder.

use super::*;

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
