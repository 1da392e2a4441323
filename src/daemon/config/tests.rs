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

#[test]
fn metrics_are_off_unless_the_table_asks_for_them() {
    let c = parse("").unwrap();
    assert_eq!(c.metrics, MetricsConfig::default());
    assert_eq!(c.metrics.listen, None);
    assert_eq!(c.metrics.textfile, None);
    // `http = true` alone listens on loopback.
    let c = parse("[metrics]\nhttp = true\n").unwrap();
    assert_eq!(c.metrics.listen, Some(DEFAULT_METRICS_LISTEN));
    assert!(DEFAULT_METRICS_LISTEN.ip().is_loopback());
    let c = parse("[metrics]\nhttp = false\n").unwrap();
    assert_eq!(c.metrics.listen, None);
}

#[test]
fn metrics_keys_are_read_and_checked() {
    let c = parse(
        "[metrics]\nlisten = \"[::1]:9100\"\nmax-connections = 4\ntimeout-ms = 250\n\
         textfile = \"/var/lib/node_exporter/textfile_collector/vfio-intx.prom\"\n\
         textfile-interval-ms = 1000\n",
    )
    .unwrap();
    let m = &c.metrics;
    assert_eq!(m.listen, Some("[::1]:9100".parse().unwrap()));
    assert_eq!(m.max_connections, 4);
    assert_eq!(m.timeout, Duration::from_millis(250));
    assert_eq!(
        m.textfile.as_deref(),
        Some(Path::new(
            "/var/lib/node_exporter/textfile_collector/vfio-intx.prom"
        ))
    );
    assert_eq!(m.textfile_interval, Duration::from_secs(1));
    // A textfile alone: no HTTP endpoint.
    let c = parse("[metrics]\ntextfile = \"/tmp/x.prom\"\n").unwrap();
    assert_eq!(c.metrics.listen, None);
}

#[test]
fn bad_metrics_values_are_refused_naming_the_key_and_the_value() {
    for (text, expected) in [
        (
            "[metrics]\nlisten = \"localhost\"\n",
            "t.toml:2:10: listen = \"localhost\" is not an address and port",
        ),
        (
            "[metrics]\nlisten = \"127.0.0.1:99999\"\n",
            "t.toml:2:10: listen = \"127.0.0.1:99999\" is not an address and port",
        ),
        (
            "[metrics]\nhttp = false\nlisten = \"127.0.0.1:9797\"\n",
            "t.toml:2:8: http = false contradicts listen = \"127.0.0.1:9797\"",
        ),
        (
            "[metrics]\nmax-connections = 0\n",
            "t.toml:2:19: max-connections = 0 must be between 1 and 1024",
        ),
        (
            "[metrics]\ntimeout-ms = 5\n",
            "t.toml:2:14: timeout-ms = 5 must be at least 10 ms",
        ),
        (
            "[metrics]\ntextfile = \"vfio-intx.prom\"\n",
            "t.toml:2:12: textfile = \"vfio-intx.prom\" must be an absolute path",
        ),
        (
            "[metrics]\ntextfile = \"/var/lib/x/vfio-intx.txt\"\n",
            "t.toml:2:12: textfile = \"/var/lib/x/vfio-intx.txt\" must end in .prom",
        ),
        (
            "[metrics]\ntextfile-interval-ms = 10\n",
            "t.toml:2:24: textfile-interval-ms = 10 must be at least 100 ms",
        ),
        (
            "[metrics]\nport = 9797\n",
            "t.toml:2:1: unknown field `port`",
        ),
    ] {
        let e = parse(text).unwrap_err().to_string();
        assert!(e.starts_with(expected), "{text:?}: {e}");
    }
}
