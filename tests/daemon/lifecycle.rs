//! The daemon's life: READY and STATUS, configuration errors, shipped
//! configs, SIGTERM hand-back, SIGHUP reload, the systemd unit and its
//! watchdog, the demo.

use super::*;

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
    let bdfs: Vec<String> = status.devices.iter().map(|d| d.bdf.to_string()).collect();
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

/// A configured device that does not exist: the daemon says it was
/// starting that device, names it once, and exits 5.
#[test]
fn a_missing_device_is_reported_as_starting_that_device() {
    let missing = "0000:7e:1f.7";
    let mut d = Daemon::spawn(
        "",
        &format!("[[device]]\nbdf = \"{missing}\"\nbackend = \"vfio\"\n"),
    );
    let (code, _) = d.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(i32::from(exit::NOT_FOUND)), "{}", d.log());
    let log = d.log();
    let line = log
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line:\n{log}"));
    assert!(
        line.starts_with(&format!(
            "error: daemon: starting device {missing}: no such PCI device"
        )),
        "{line}"
    );
    // Named once (a sysfs path holding the address is evidence).
    let named = line
        .match_indices(missing)
        .filter(|(i, _)| !line[..*i].ends_with('/'))
        .count();
    assert_eq!(named, 1, "{line}");
    assert!(!d.socket.exists(), "no socket may be created");
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
fn sigterm_restores_every_device_within_a_second() {
    let mut d = Daemon::start(&format!(
        "{}{}",
        device(A, "sim-command = 0x0006"),
        device(B, "sim-command = 0x0002")
    ));
    // Leave an interrupt in service (masked, parked for a session) on A.
    d.ask(&Request::SimRaise {
        bdf: A.parse().unwrap(),
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
        bdf: A.parse().unwrap(),
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
    let bdfs: Vec<String> = status.devices.iter().map(|d| d.bdf.to_string()).collect();
    assert_eq!(bdfs, [A, C]);
    assert_eq!(d.interrupts(A), 1, "A keeps its statistics");
    vmm.session.wait_closed().unwrap();
    d.wait_log("device restored");
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
        "FileDescriptorStoreMax=",
        "RestartForceExitStatus=75",
        "Restart=on-failure",
        "RuntimeDirectoryPreserve=restart",
        "StartLimitBurst=",
    ] {
        assert!(unit_text.contains(needed), "the unit lacks {needed}");
    }
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
fn sigterm_hands_back_a_device_still_asserting_without_a_false_error() {
    // uio_pci_generic's handler, and vfio-pci's model, mask a line that
    // still asserts: COMMAND then differs from the one found only by
    // INTX_DISABLE, which is the kernel doing its job, not a failed
    // hand-back. Once without an interrupt pending, once with one.
    for pending in [0, 2] {
        let mut d = Daemon::start(&device(
            A,
            "sim-kernel = \"vfio-pci\"\nsim-command = 0x0103",
        ));
        if pending > 0 {
            d.ask(&Request::SimRaise {
                bdf: A.parse().unwrap(),
                count: pending,
            });
        }
        d.signal(nix::sys::signal::Signal::SIGTERM);
        let (code, _) = d.wait_exit(Duration::from_secs(5));
        let log = d.log();
        assert_eq!(code, Some(0), "pending {pending}:\n{log}");
        assert!(!log.contains("ERROR"), "pending {pending}:\n{log}");
        let line = log
            .lines()
            .find(|l| l.contains("device restored") && l.contains(A))
            .unwrap_or_else(|| panic!("pending {pending}: not restored:\n{log}"));
        assert!(line.contains("command=0x0103"), "{line}");
    }
}

#[test]
fn validate_refuses_a_world_writable_socket_mode_and_a_socket_path_over_sun_path() {
    let dir = tempfile::tempdir().unwrap();
    let validate = |name: &str, daemon: &str| {
        let config = dir.path().join(name);
        std::fs::write(&config, format!("[daemon]\n{daemon}\n{}", device(A, ""))).unwrap();
        let out = Command::new(BIN)
            .arg("validate")
            .arg(&config)
            .output()
            .unwrap();
        (out, config)
    };
    for mode in ["0o666", "0o602", "0o677"] {
        let (out, config) = validate("mode.toml", &format!("socket-mode = {mode}"));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(i32::from(exit::CONFIG)),
            "{mode}: {out:?}"
        );
        assert!(
            err.contains(&format!("{}:2:15: socket-mode", config.display())),
            "{mode}: {err}"
        );
    }
    // sun_path holds 107 bytes and a NUL.
    let long = format!("/run/{}/control.sock", "d".repeat(100));
    let (out, config) = validate("long.toml", &format!("socket = \"{long}\""));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(i32::from(exit::CONFIG)), "{out:?}");
    assert!(
        err.contains(&format!("{}:2:10: socket", config.display())),
        "{err}"
    );
    assert!(err.contains("108"), "{err}");
    // The limit itself passes.
    let fits = format!("/{}", "s".repeat(106));
    let (out, _) = validate(
        "fits.toml",
        &format!("socket = \"{fits}\"\nsocket-mode = 0o660"),
    );
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn a_second_instance_exits_busy_naming_the_first_before_touching_any_device() {
    let first = Daemon::start(&device(A, ""));
    let first_pid = first.child.id();
    first.wait_log("INTx masking probed");
    // The same configuration, socket and devices; its own NOTIFY_SOCKET.
    let mut second = Daemon::spawn_as("", &device(A, ""), |_, _| {
        let mut c = Command::new(BIN);
        c.args(["daemon", "--config"])
            .arg(&first.config)
            .env_remove("JOURNAL_STREAM");
        c
    });
    let (code, took) = second.wait_exit(Duration::from_secs(10));
    let log = second.log();
    assert_eq!(code, Some(i32::from(exit::BUSY)), "{log}");
    assert!(
        log.contains(&format!("pid {first_pid}")),
        "the holder is named: {log}"
    );
    assert!(
        !log.contains("INTx masking probed") && !log.contains("arming"),
        "the second instance touched the devices: {log}"
    );
    let mut buf = [0u8; 512];
    assert!(
        second.notify.recv(&mut buf).is_err(),
        "no notification at all"
    );
    println!("second instance refused in {took:?}");
    // The first is untouched and still serves.
    assert_eq!(first.status().pid, first_pid);
    assert!(first.socket.exists());
}

#[test]
fn a_reload_stuck_reading_its_config_holds_up_neither_the_watchdog_nor_sigterm() {
    let mut d = Daemon::spawn_as("", &device(A, ""), |_, config| {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(format!(
                "WATCHDOG_PID=$$ exec {BIN} daemon --config {}",
                config.display()
            ))
            .env("WATCHDOG_USEC", "200000")
            .env_remove("JOURNAL_STREAM");
        c
    });
    d.wait_notify("READY=1", Duration::from_secs(10));
    // The configuration becomes a FIFO nobody writes: reading it blocks
    // (as a file on a hung network filesystem would).
    std::fs::remove_file(&d.config).unwrap();
    nix::unistd::mkfifo(&d.config, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    d.signal(nix::sys::signal::Signal::SIGHUP);
    d.wait_notify("RELOADING=1", Duration::from_secs(2));
    let keepalive = Instant::now();
    d.wait_notify("WATCHDOG=1", Duration::from_secs(1));
    println!("keepalive {:?} after RELOADING=1", keepalive.elapsed());
    assert!(d.ask(&Request::Ping)["pid"].is_number());
    d.signal(nix::sys::signal::Signal::SIGTERM);
    let stopping = Instant::now();
    d.wait_notify("STOPPING=1", Duration::from_secs(1));
    let stopping = stopping.elapsed();
    // The abandoned read is given a bounded time at exit.
    let (code, took) = d.wait_exit(Duration::from_secs(3));
    println!("STOPPING=1 {stopping:?} after SIGTERM, exited {took:?} later");
    assert_eq!(code, Some(0), "{}", d.log());
    assert!(d.log().contains("device restored"), "{}", d.log());
}

/// Issue 13 item 11: the state a device was found in lives in the runtime
/// directory, not only in memory. A daemon killed with SIGKILL leaves the
/// device as it had it (here: the simulated device comes back with another
/// COMMAND, as a crash would leave a real one); the restarted daemon takes
/// the found COMMAND from the record, not from the device. A graceful stop
/// empties the record, so the next start finds the device afresh.
#[test]
fn a_restart_after_a_crash_hands_devices_back_as_the_first_instance_found_them() {
    let first = device(A, "sim-command = 0x0103");
    let mut d = Daemon::start(&first);
    assert_eq!(device_status(&d, A).found_command, 0x0103);
    let record = d.dir.path().join("control.sock.as-found");
    let text = std::fs::read_to_string(&record).unwrap();
    assert!(
        text.contains(A) && text.contains(&0x0103u16.to_string()),
        "{text}"
    );
    // A crash: nothing is handed back.
    d.child.kill().unwrap();
    d.child.wait().unwrap();
    // The device as the crash left it: another COMMAND.
    d.restart("", &device(A, "sim-command = 0x0507"));
    assert_eq!(
        device_status(&d, A).found_command,
        0x0103,
        "the restart took the crashed state as found:\n{}",
        d.log()
    );
    assert!(
        d.log()
            .contains("the previous instance did not hand this device back"),
        "{}",
        d.log()
    );
    // A graceful stop hands it back as first found and empties the record.
    d.signal(nix::sys::signal::Signal::SIGTERM);
    let (code, _) = d.wait_exit(Duration::from_secs(5));
    assert_eq!(code, Some(0), "{}", d.log());
    let text = std::fs::read_to_string(&record).unwrap();
    assert!(
        !text.contains(A),
        "the record kept a device handed back: {text}"
    );
    // The next start finds the device afresh.
    d.restart("", &device(A, "sim-command = 0x0507"));
    assert_eq!(device_status(&d, A).found_command, 0x0507);
}
