//! Metrics a fleet can scrape: the opt-in HTTP `/metrics` endpoint and the
//! node_exporter textfile, parsed by Prometheus' own parser (`promtool
//! check metrics`), the gauges an alert needs as a line is masked and
//! unmasked, and a scraper that cannot stall anything else.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};

use super::*;

/// A loopback port nothing listens on (bound, then released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn metrics_table(port: u16, extra: &str) -> String {
    format!("\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n{extra}\n")
}

/// One HTTP/1.1 exchange: the status code, the header block and the body.
fn http(port: u16, method: &str, path: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {raw:?}"));
    (code, head.to_owned(), body.to_owned())
}

fn scrape(port: u16) -> String {
    let (code, head, body) = http(port, "GET", "/metrics");
    assert_eq!(code, 200, "{head}\n{body}");
    body
}

/// `promtool`: `$PROMTOOL`, else the one in PATH. `None` (said loudly)
/// when there is none: scripts/test-all.sh provides it.
fn promtool() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PROMTOOL") {
        return Some(PathBuf::from(p));
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("promtool"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        eprintln!(
            "SKIPPED the promtool parse: no promtool (Debian package prometheus; \
             scripts/test-all.sh extracts it and sets PROMTOOL)"
        );
    }
    found
}

/// Parses `text` with Prometheus' own text parser and linter.
fn promtool_accepts(text: &str) {
    let Some(promtool) = promtool() else { return };
    let mut child = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The value of the sample `series` (name and labels, exactly as written).
fn sample(text: &str, series: &str) -> f64 {
    let prefix = format!("{series} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
        .parse()
        .unwrap()
}

/// Every family's name, from its TYPE line; each must appear once, with
/// a HELP line.
fn families(text: &str) -> Vec<String> {
    let mut names: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| l.split(' ').next().unwrap().to_owned())
        .collect();
    for n in &names {
        assert!(text.contains(&format!("# HELP {n} ")), "no HELP for {n}");
    }
    let count = names.len();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), count, "a TYPE given twice in\n{text}");
    names
}

/// Whether the process `pid` has a listening TCP socket.
fn listens_on_tcp(pid: u32) -> bool {
    let mut inodes = Vec::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let Ok(target) = std::fs::read_link(fd.unwrap().path()) else {
            continue;
        };
        let t = target.to_string_lossy().into_owned();
        if let Some(inode) = t.strip_prefix("socket:[").and_then(|i| i.strip_suffix(']')) {
            inodes.push(inode.to_owned());
        }
    }
    ["tcp", "tcp6"].iter().any(|table| {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        text.lines().skip(1).any(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            // st 0A is LISTEN; column 9 the inode.
            cols.get(3) == Some(&"0A") && cols.get(9).is_some_and(|i| inodes.iter().any(|x| x == i))
        })
    })
}

#[test]
fn nothing_listens_unless_metrics_are_configured() {
    let d = Daemon::start(&device(A, ""));
    assert!(!listens_on_tcp(d.child.id()), "{}", d.log());
    // The control socket still has the text.
    let text = d.ask(&Request::Metrics)["text"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(text.contains("vfio_intx_build_info{"), "{text}");
}

#[test]
fn the_endpoint_serves_the_control_sockets_text_which_promtool_accepts() {
    let port = free_port();
    let d = Daemon::start_with(&metrics_table(port, ""), &device(A, ""));
    assert!(listens_on_tcp(d.child.id()));
    let (code, head, body) = http(port, "GET", "/metrics");
    assert_eq!(code, 200, "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
        "{head}"
    );
    promtool_accepts(&body);
    // One renderer: the same families as the control socket's `metrics`.
    let control = d.ask(&Request::Metrics)["text"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(families(&body), families(&control));
    // The gauges an alert needs, for the device, and the build.
    for series in [
        format!("vfio_intx_line_masked{{bdf=\"{A}\"}}"),
        format!("vfio_intx_line_masked_seconds{{bdf=\"{A}\"}}"),
        format!("vfio_intx_line_stuck{{bdf=\"{A}\"}}"),
        format!("vfio_intx_session_attached{{bdf=\"{A}\"}}"),
        "vfio_intx_sessions_attached".to_owned(),
    ] {
        assert_eq!(sample(&body, &series), 0.0, "{series}");
    }
    assert_eq!(
        sample(
            &body,
            &format!("vfio_intx_path{{bdf=\"{A}\",path=\"user\"}}")
        ),
        1.0
    );
    assert_eq!(
        sample(
            &body,
            &format!("vfio_intx_pci23{{bdf=\"{A}\",verdict=\"masking\",evidence=\"toggle-test\"}}")
        ),
        1.0
    );
    let version = env!("CARGO_PKG_VERSION");
    assert!(
        body.contains(&format!("vfio_intx_build_info{{version=\"{version}\"")),
        "{body}"
    );
    // HEAD: the headers alone.
    let (code, head, body) = http(port, "HEAD", "/metrics");
    assert_eq!(code, 200, "{head}");
    assert_eq!(body, "");
    // Nothing else.
    assert_eq!(http(port, "GET", "/").0, 404);
    assert_eq!(http(port, "GET", "/metrics/x").0, 404);
    assert_eq!(http(port, "POST", "/metrics").0, 405);
    assert_eq!(http(port, "DELETE", "/metrics").0, 405);
}

#[test]
fn gauges_follow_a_line_masked_and_unmasked_over_http_and_in_the_textfile() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let prom = dir.path().join("vfio-intx.prom");
    let d = Daemon::start_with(
        &metrics_table(
            port,
            &format!(
                "textfile = \"{}\"\ntextfile-interval-ms = 100",
                prom.display()
            ),
        ),
        &device(A, "eoi-timeout-ms = 0"),
    );
    let vmm = FakeVmm::attach(&d, A);
    let masked = format!("vfio_intx_line_masked{{bdf=\"{A}\"}}");
    let seconds = format!("vfio_intx_line_masked_seconds{{bdf=\"{A}\"}}");
    let text = scrape(port);
    assert_eq!(sample(&text, &masked), 0.0, "{text}");
    assert_eq!(
        sample(&text, &format!("vfio_intx_session_attached{{bdf=\"{A}\"}}")),
        1.0
    );
    assert_eq!(sample(&text, "vfio_intx_sessions_attached"), 1.0);

    // The device interrupts: the line is masked in service until the EOI.
    d.ask(&Request::SimRaise {
        bdf: A.parse().unwrap(),
        count: 1,
    });
    wait_for("the injection", Duration::from_secs(5), || {
        vmm.injected() == 1
    });
    let first = scrape(port);
    promtool_accepts(&first);
    assert_eq!(sample(&first, &masked), 1.0, "{first}");
    std::thread::sleep(Duration::from_millis(300));
    let later = scrape(port);
    let (s1, s2) = (sample(&first, &seconds), sample(&later, &seconds));
    assert!(s2 >= 0.3 && s2 > s1, "masked for {s1} then {s2} s");

    // The textfile says the same, and parses the same.
    wait_for("the textfile", Duration::from_secs(5), || {
        std::fs::read_to_string(&prom).is_ok_and(|t| t.contains(&format!("{masked} 1")))
    });
    let file = std::fs::read_to_string(&prom).unwrap();
    promtool_accepts(&file);
    assert!(sample(&file, &seconds) > 0.0, "{file}");
    let mode = std::fs::metadata(&prom).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644);
    assert_eq!(families(&file), families(&first));
    // Only the file itself in its directory: temporary files are renamed.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("vfio-intx.prom")]);

    // The guest's driver acknowledges the device and EOIs: unmasked.
    assert_eq!(
        d.ask(&Request::SimAck {
            bdf: A.parse().unwrap()
        })["acked"],
        true
    );
    vmm.eoi();
    wait_for("the line unmasked", Duration::from_secs(5), || {
        sample(&scrape(port), &masked) == 0.0
    });
    let text = scrape(port);
    assert_eq!(sample(&text, &seconds), 0.0, "{text}");
    // The stretch is in the counter of all the time masked.
    let total = sample(
        &text,
        &format!("vfio_intx_masked_seconds_total{{bdf=\"{A}\"}}"),
    );
    assert!(total >= 0.3, "{total}");
    wait_for("the textfile unmasked", Duration::from_secs(5), || {
        std::fs::read_to_string(&prom).is_ok_and(|t| t.contains(&format!("{masked} 0")))
    });

    // An operator's hold masks it too, for as long as it lasts.
    d.ask(&Request::Mask {
        bdf: A.parse().unwrap(),
    });
    let held = scrape(port);
    assert_eq!(sample(&held, &masked), 1.0, "{held}");
    std::thread::sleep(Duration::from_millis(100));
    assert!(sample(&scrape(port), &seconds) >= 0.1);
    d.ask(&Request::Unmask {
        bdf: A.parse().unwrap(),
    });
    assert_eq!(sample(&scrape(port), &masked), 0.0);

    // Stopped: the file goes, so that nobody reads a stopped daemon's
    // last numbers as current ones.
    let mut d = d;
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(d.wait_exit(Duration::from_secs(5)).0, Some(0));
    assert!(!prom.exists(), "{}", d.log());
}

/// Idle connections that never send a byte, and one that sends its
/// headers a byte at a time, slower than the header timeout.
struct Flood {
    idle: Vec<TcpStream>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    slow: Option<std::thread::JoinHandle<bool>>,
}

impl Flood {
    fn start(port: u16, idle: usize) -> Self {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let slow = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                // Whether the daemon closed it before the headers ended.
                for b in b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nX-Slow: "
                    .iter()
                    .cycle()
                {
                    if stop.load(std::sync::atomic::Ordering::SeqCst) {
                        return false;
                    }
                    if s.write_all(&[*b]).is_err() {
                        return true;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                false
            })
        };
        let idle = (0..idle)
            .filter_map(|_| TcpStream::connect(addr).ok())
            .collect();
        Self {
            idle,
            stop,
            slow: Some(slow),
        }
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(slow) = self.slow.take() {
            let _ = slow.join();
        }
    }
}

#[test]
fn a_slowloris_and_200_idle_connections_delay_neither_status_nor_a_scrape() {
    // The bound stated: `status` on the control socket as fast as without
    // the flood (under 250 ms), a scrape served within the timeout (1 s,
    // which frees the idle connections' slots) plus 1 s.
    let port = free_port();
    let d = Daemon::start_with(
        &metrics_table(port, "max-connections = 8\ntimeout-ms = 1000"),
        &device(A, ""),
    );
    let mut flood = Flood::start(port, 200);
    assert!(flood.idle.len() >= 190, "{}", flood.idle.len());
    let mut worst = Duration::ZERO;
    for _ in 0..20 {
        let t = Instant::now();
        let status = d.status();
        worst = worst.max(t.elapsed());
        assert_eq!(status.devices.len(), 1);
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("status under the flood: worst {worst:?}");
    assert!(worst < Duration::from_millis(250), "{worst:?}");
    // A scrape: retried while the slots are taken (the daemon closes a
    // connection beyond max-connections at once).
    let t = Instant::now();
    let text = loop {
        let attempt = std::panic::catch_unwind(|| http(port, "GET", "/metrics"));
        match attempt {
            Ok((200, _, body)) => break body,
            _ if t.elapsed() < Duration::from_secs(5) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            other => panic!("no scrape within 5 s: {other:?}"),
        }
    };
    let took = t.elapsed();
    eprintln!("a scrape under the flood took {took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    // The slow client was cut off by the header timeout.
    let slow = flood.slow.take().unwrap().join().unwrap();
    assert!(slow, "the slowloris client was never disconnected");
    // Refusals and timeouts are counted; the log has a line, not 200.
    let refused = sample(
        &text,
        "vfio_intx_metrics_http_events_total{cause=\"too-many-connections\"}",
    );
    assert!(refused >= 1.0, "{text}");
    let timeouts = sample(
        &text,
        "vfio_intx_metrics_http_events_total{cause=\"timeout\"}",
    );
    assert!(timeouts >= 1.0, "{text}");
    drop(flood);
    let log = d.log();
    let lines = log.matches("metrics endpoint").count();
    assert!(lines <= 6, "{lines} lines:\n{log}");
}

#[test]
fn a_port_in_use_is_a_config_error_naming_the_address() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut d = Daemon::spawn(&metrics_table(port, ""), &device(A, ""));
    let (code, _) = d.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(i32::from(exit::CONFIG)), "{}", d.log());
    let log = d.log();
    assert!(
        log.contains(&format!("[metrics] listen = \"127.0.0.1:{port}\"")),
        "{log}"
    );
}

#[test]
fn a_reload_adds_moves_and_removes_the_listener() {
    let d = Daemon::start(&device(A, ""));
    let reload = |extra: &str| {
        std::fs::write(
            &d.config,
            Daemon::config_text(&d.socket, extra, &device(A, "")),
        )
        .unwrap();
        d.signal(nix::sys::signal::Signal::SIGHUP);
    };
    let serves = |port: u16| {
        TcpStream::connect(("127.0.0.1", port)).is_ok() && http(port, "GET", "/metrics").0 == 200
    };
    let first = free_port();
    reload(&metrics_table(first, ""));
    wait_for("the listener added", Duration::from_secs(5), || {
        serves(first)
    });
    let second = free_port();
    reload(&metrics_table(second, ""));
    wait_for("the listener moved", Duration::from_secs(5), || {
        serves(second) && TcpStream::connect(("127.0.0.1", first)).is_err()
    });
    reload("");
    wait_for("the listener removed", Duration::from_secs(5), || {
        TcpStream::connect(("127.0.0.1", second)).is_err()
    });
    assert!(!listens_on_tcp(d.child.id()));
}

#[test]
fn the_metrics_drop_in_verifies_and_keeps_the_unit_exposure_at_most_4() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd");
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("vfio-intx.service");
    std::fs::copy(root.join("vfio-intx.service"), &unit).unwrap();
    std::fs::create_dir(dir.path().join("vfio-intx.service.d")).unwrap();
    std::fs::copy(
        root.join("metrics.conf"),
        dir.path().join("vfio-intx.service.d/metrics.conf"),
    )
    .unwrap();
    // The unit path with the drop-in directory first.
    let path = format!("{}:", dir.path().display());
    let analyze = |args: &[&str]| {
        Command::new("systemd-analyze")
            .args(args)
            .arg(&unit)
            .env("SYSTEMD_UNIT_PATH", &path)
            .output()
    };
    let verify = match analyze(&["verify"]) {
        Ok(out) => out,
        Err(e) => {
            eprintln!("SKIPPED the drop-in check: systemd-analyze is not available: {e}");
            return;
        }
    };
    // The installed binary and man page may be absent here; the drop-in
    // itself must draw no complaint.
    let said = String::from_utf8_lossy(&verify.stderr).into_owned();
    assert!(!said.contains("metrics.conf"), "{said}");
    let out = analyze(&["security", "--offline=yes", "--no-pager"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    // The drop-in is in force: the unit now reaches the host's network.
    assert!(
        text.contains("Service has access to the host's network"),
        "{text}"
    );
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure level:\n{text}"));
    let level: f64 = line
        .split(':')
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse {line:?}"));
    eprintln!("exposure with the metrics drop-in: {level}");
    assert!(level <= 4.0, "{line}\n{text}");
}

#[test]
fn the_readmes_alert_rules_pass_promtool_check_rules() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let section = readme
        .split("## Metrics for a fleet")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("the README's metrics section");
    let rules = section
        .split("```yaml\n")
        .nth(1)
        .and_then(|s| s.split("```").next())
        .expect("alert rules in the metrics section");
    let Some(promtool) = promtool() else { return };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("vfio-intx.rules.yml");
    std::fs::write(&file, rules).unwrap();
    let out = Command::new(promtool)
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}\n{rules}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Every family an alert names is one the daemon exports.
    let d = Daemon::start(&device(A, ""));
    let text = d.ask(&Request::Metrics)["text"]
        .as_str()
        .unwrap()
        .to_owned();
    let names = families(&text);
    for word in rules.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if word.starts_with("vfio_intx_") {
            assert!(names.iter().any(|n| n == word), "{word} is not exported");
        }
    }
}

#[test]
fn a_textfile_that_cannot_be_written_is_counted_and_logged_rate_limited_never_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let prom = dir.path().join("missing-dir/vfio-intx.prom");
    let d = Daemon::start_with(
        &format!(
            "\n[metrics]\ntextfile = \"{}\"\ntextfile-interval-ms = 100\n",
            prom.display()
        ),
        &device(A, ""),
    );
    let errors = || {
        let text = d.ask(&Request::Metrics)["text"]
            .as_str()
            .unwrap()
            .to_owned();
        sample(&text, "vfio_intx_textfile_write_errors_total")
    };
    wait_for("five failed writes", Duration::from_secs(5), || {
        errors() >= 5.0
    });
    // Still serving, and one line for all of them.
    assert_eq!(d.status().devices.len(), 1);
    let log = d.log();
    assert_eq!(
        log.matches("metrics textfile: writing it failed").count(),
        1,
        "{log}"
    );
    assert!(log.contains(&prom.display().to_string()), "{log}");
}

#[test]
fn a_non_loopback_address_is_served_with_a_warning() {
    let port = free_port();
    let d = Daemon::start_with(
        &format!("\n[metrics]\nlisten = \"0.0.0.0:{port}\"\n"),
        &device(A, ""),
    );
    d.wait_log("metrics endpoint on a non-loopback address");
    assert_eq!(http(port, "GET", "/metrics").0, 200);
}
