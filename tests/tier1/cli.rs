//! The binary, driven as a user would.

use std::process::Command;

fn vfio_intx() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vfio-intx"))
}

#[test]
fn demo_exits_zero_and_reports_no_loss_with_parallel_reset_threads() {
    let out = vfio_intx()
        .args([
            "demo",
            "--interrupts",
            "500",
            "--reset-threads",
            "4",
            "--resets",
            "25",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "demo failed:\n{stdout}");
    assert!(stdout.contains("interrupts raised      500"), "{stdout}");
    assert!(stdout.contains("interrupts delivered   500"), "{stdout}");
    assert!(
        stdout.contains("resets                 100 ok, 0 failed"),
        "{stdout}"
    );
    assert!(stdout.contains("lines masked at end    0"), "{stdout}");
    assert!(
        stdout.contains("PASS: every interrupt delivered once"),
        "{stdout}"
    );
    assert!(
        stdout.contains("PASS: delivery restored after resets vfio-intx did not start"),
        "{stdout}"
    );
}

#[test]
fn bad_arguments_are_a_usage_error() {
    let out = vfio_intx()
        .args(["demo", "--interrupts", "many"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid value 'many'"));
}

/// Occurrences of `device` in `text` outside paths (a path such as
/// /sys/bus/pci/devices/BDF is evidence, not a second naming).
fn named(text: &str, device: &str) -> usize {
    text.match_indices(device)
        .filter(|(i, _)| !text[..*i].ends_with('/'))
        .count()
}

/// Every device command with a missing device or a bad address: the
/// message names the operation and the device once, with the README's exit
/// code (5 not found, 2 usage, 7 daemon not running), plain and --json.
#[test]
fn every_device_error_names_the_operation_and_the_device_once() {
    let dir = std::env::temp_dir().join(format!("vfio-intx-cli-errors-{}", std::process::id()));
    let socket = dir.join("none.sock");
    let socket = socket.to_str().unwrap();
    // Nothing on this machine has this address (the simulated and the
    // guest's devices sit on bus 0).
    let missing = "0000:7e:1f.7";
    let bad = "0000:7e:1f";
    let mut cases: Vec<(Vec<&str>, &str, &str, i32)> = Vec::new();
    for (op, extra) in [
        ("probe", &[][..]),
        ("reset", &[][..]),
        ("bind", &["--driver", "vfio-pci"][..]),
        ("unbind", &[][..]),
        ("mask", &[][..]),
        ("unmask", &[][..]),
    ] {
        let not_found = if matches!(op, "mask" | "unmask") {
            7
        } else {
            5
        };
        let mut a = vec![op, missing];
        a.extend_from_slice(extra);
        cases.push((a, op, missing, not_found));
        let mut a = vec![op, bad];
        a.extend_from_slice(extra);
        cases.push((a, op, bad, 2));
    }
    let mut wrong = Vec::new();
    for (args, op, device, code) in &cases {
        for json in [false, true] {
            let mut cmd = vfio_intx();
            cmd.args(args).args(["--socket", socket]);
            if json {
                cmd.arg("--json");
            }
            let out = cmd.output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            let line = stderr
                .lines()
                .find(|l| l.starts_with("error: "))
                .unwrap_or_default()
                .to_owned();
            let message = if json {
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
                let e = &v["error"];
                if e["operation"] != *op || e["device"] != *device {
                    wrong.push(format!("{args:?} --json: {v}"));
                }
                e["message"].as_str().unwrap_or_default().to_owned()
            } else {
                line.trim_start_matches("error: ").to_owned()
            };
            let ok = out.status.code() == Some(*code)
                && named(&message, device) == 1
                && named(&message, &format!("{op} ")) == 1
                && message.starts_with(&format!("{op} "));
            if !ok {
                wrong.push(format!(
                    "{args:?}{}: exit {:?} (want {code}): {message:?}",
                    if json { " --json" } else { "" },
                    out.status.code()
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} cases:\n{}",
        wrong.len(),
        cases.len() * 2,
        wrong.join("\n")
    );
}
