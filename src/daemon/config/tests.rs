//! Unit tests of the configuration parser and its checks.

use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(Path::new("t.toml"), text)
}

#[test]
fn a_minimal_device_gets_the_defaults() {
    let c = parse("[[device]]\nbdf = \"0000:00:04.0\"\nbackend = \"sim\"\n").unwrap();
    assert_eq!(c.devices.len(), 1);
    assert_eq!(c.daemon, DaemonConfig::default());
    let d = &c.devices[0];
    assert_eq!(d, &DeviceConfig::defaults(d.bdf, BackendKind::Sim));
}

#[test]
fn unknown_keys_are_rejected_with_line_and_column() {
    let e =
        parse("[[device]]\nbdf = \"0000:00:04.0\"\nbackend = \"sim\"\n  colour = 1\n").unwrap_err();
    let text = e.to_string();
    assert!(
        text.starts_with("t.toml:4:3: unknown field `colour`"),
        "{text}"
    );
}

#[test]
fn a_bad_address_points_at_its_value() {
    let e = parse("[[device]]\nbdf = \"00:zz.0\"\nbackend = \"sim\"\n").unwrap_err();
    assert!(
        e.to_string().starts_with("t.toml:2:7: invalid PCI address"),
        "{e}"
    );
}

#[test]
fn duplicates_and_misplaced_options_are_refused() {
    let dup = "[[device]]\nbdf = \"0000:00:04.0\"\nbackend = \"sim\"\n\
               [[device]]\nbdf = \"0000:00:04.0\"\nbackend = \"sim\"\n";
    assert!(parse(dup)
        .unwrap_err()
        .to_string()
        .contains("t.toml:5:7: device 0000:00:04.0 is listed twice"));
    let fast = "[[device]]\nbdf = \"0000:00:04.0\"\nbackend = \"uio\"\npath = \"fast\"\n";
    assert!(parse(fast).unwrap_err().to_string().contains("t.toml:4:8:"));
    let bind = "[[device]]\nbdf = \"0000:00:04.0\"\nbackend = \"sim\"\nbind = true\n";
    assert!(parse(bind).unwrap_err().to_string().contains("t.toml:4:8:"));
}

#[test]
fn the_admin_group_is_read_and_an_empty_one_refused() {
    let c = parse("[daemon]\nadmin-group = \"wheel\"\n").unwrap();
    assert_eq!(c.daemon.admin_group.as_deref(), Some("wheel"));
    let e = parse("[daemon]\nadmin-group = \"\"\n").unwrap_err();
    assert!(e.to_string().starts_with("t.toml:2:15: admin-group"), "{e}");
}

#[test]
fn line_column_counts_from_one() {
    assert_eq!(line_column("ab\ncd", 0), (1, 1));
    assert_eq!(line_column("ab\ncd", 4), (2, 2));
}
