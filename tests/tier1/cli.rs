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
