//! The daemon's TOML configuration: kebab-case keys, unknown keys rejected,
//! every error located by file, line and column.
//!
//! ```toml
//! [daemon]
//! socket = "/run/vfio-intx/control.sock"
//! socket-mode = 0o660          # must include 0o600, nothing for others
//! socket-group = "kvm"         # members may connect (SO_PEERCRED checked)
//! admin-group = "vfio-admin"   # members are operators (mask, reset any device)
//! max-clients = 64
//! client-timeout-ms = 10000
//! status-interval-ms = 10000
//!
//! [[device]]
//! bdf = "0000:01:00.0"
//! backend = "vfio"             # vfio | uio | sim
//! path = "auto"                # auto | fast | userspace (sessions' EOI path)
//! bind = true                  # bind to vfio-pci / uio_pci_generic at start
//! probe = true                 # check PCI 2.3 masking at start (default)
//! reset = true                 # reset through the gate at start
//! storm-threshold = 20000      # unhandled interrupts per second; 0 = off
//! storm-backoff-ms = 1000      # first retry after a storm (doubles)
//! stuck-after-ms = 50          # the stuck-INTx watchdog
//! eoi-timeout-ms = 2000        # in service with no EOI: recover; 0 = off
//! idle-interval-ms = 1000      # watchdog interval of an idle device
//! # edu-test-hooks = true      # vfio + QEMU edu only: test-raise/test-ack
//! # sim-command = 0x0006       # sim only: COMMAND as "firmware" left it
//! # sim-kernel = "vfio-pci"    # sim only: bare | vfio-pci
//!
//! [metrics]                    # off unless this table is here
//! http = true                  # serve GET /metrics (Prometheus text)
//! listen = "127.0.0.1:9797"    # its address (the default; loopback)
//! max-connections = 16         # scrapers served at once
//! timeout-ms = 5000            # headers and the whole request
//! textfile = "/var/lib/prometheus/node-exporter/vfio-intx.prom"
//! textfile-interval-ms = 15000 # node_exporter's textfile collector
//!
//! [example-guest]              # the built-in KVM guest (demo)
//! bdf = "0000:00:04.0"         # a sim device
//! interrupts-per-second = 100
//! ```

use std::fmt;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::daemon::backend::kind_bypass_capable;
use crate::kvm::PathPolicy;
use crate::pci::Bdf;

/// Where the daemon's configuration lives by default.
pub const DEFAULT_CONFIG: &str = "/etc/vfio-intx/daemon.toml";
/// The control socket's default path.
pub const DEFAULT_SOCKET: &str = "/run/vfio-intx/control.sock";

/// Why a configuration could not be used. Every variant names the file;
/// parse and validation errors also the line and column (1-based).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: cannot read the configuration", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The file is not valid TOML, or does not match the schema (unknown
    /// key, wrong type, missing key).
    #[error("{}:{line}:{column}: {message}", .path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// Line of the offending text.
        line: usize,
        /// Column of the offending text.
        column: usize,
        /// What is wrong.
        message: String,
    },
    /// The file parses but a value is not acceptable.
    #[error("{}:{line}:{column}: {message}", .path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Line of the offending value.
        line: usize,
        /// Column of the offending value.
        column: usize,
        /// What is wrong.
        message: String,
    },
}

/// Which backend reaches a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    /// Kernel VFIO (vfio-pci).
    Vfio,
    /// uio_pci_generic with sysfs config.
    Uio,
    /// The simulated PCI 2.3 device (tests, demo, benchmarks).
    Sim,
}

impl BackendKind {
    /// The kernel driver the backend needs the device bound to.
    pub fn driver(self) -> Option<&'static str> {
        match self {
            BackendKind::Vfio => Some(crate::pci::sysfs::VFIO_PCI),
            BackendKind::Uio => Some(crate::pci::sysfs::UIO_PCI_GENERIC),
            BackendKind::Sim => None,
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Vfio => "vfio",
            BackendKind::Uio => "uio",
            BackendKind::Sim => "sim",
        })
    }
}

/// The EOI path policy as written in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PathSetting {
    /// The kernel bypass when possible.
    #[default]
    Auto,
    /// The kernel bypass or an error.
    Fast,
    /// Always the user-space path.
    Userspace,
}

impl From<PathSetting> for PathPolicy {
    fn from(p: PathSetting) -> Self {
        match p {
            PathSetting::Auto => PathPolicy::Auto,
            PathSetting::Fast => PathPolicy::Fast,
            PathSetting::Userspace => PathPolicy::UserSpace,
        }
    }
}

/// Which kernel driver a simulated device models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SimKernelSetting {
    /// The raw PCI 2.3 device (as through uio_pci_generic).
    #[default]
    Bare,
    /// The vfio-pci model.
    VfioPci,
}

/// The `[daemon]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DaemonConfig {
    /// The control socket.
    pub socket: PathBuf,
    /// Permission bits of the control socket.
    pub socket_mode: u32,
    /// Group that owns the control socket and whose members may use it:
    /// as VMMs, acting only on their own session's device.
    pub socket_group: Option<String>,
    /// Group whose members are operators, as root is: they may mask,
    /// unmask, reset and drive the test hooks of any device. (They reach
    /// the socket through its mode and group like anyone else.)
    pub admin_group: Option<String>,
    /// Clients served at once; further connections are refused.
    pub max_clients: usize,
    /// How long a client may take to send a request (and stay idle between
    /// requests), and to read each reply, before the connection is closed.
    pub client_timeout: Duration,
    /// How often the daemon reports its state (STATUS= and a log line).
    pub status_interval: Duration,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from(DEFAULT_SOCKET),
            socket_mode: 0o600,
            socket_group: None,
            admin_group: None,
            max_clients: 64,
            client_timeout: Duration::from_secs(10),
            status_interval: Duration::from_secs(10),
        }
    }
}

/// One `[[device]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeviceConfig {
    /// The device.
    pub bdf: Bdf,
    /// How it is reached.
    pub backend: BackendKind,
    /// EOI path policy for sessions: `auto` takes the kernel bypass where
    /// the backend has a kernel unmask eventfd (vfio-pci), `fast` requires
    /// it, `userspace` never takes it.
    pub path: PathSetting,
    /// Bind it to the backend's driver at start (and restore the previous
    /// driver at shutdown).
    pub bind: bool,
    /// Check PCI 2.3 masking at start; refuse the device if it is broken.
    pub probe: bool,
    /// Reset it through the gate at start.
    pub reset: bool,
    /// Unhandled interrupts per second (re-injections of a line still
    /// asserting after the guest's EOI, "not mine" events) above which the
    /// line is masked; 0 disables storm detection.
    pub storm_threshold: u32,
    /// How long a storming line stays masked before the first retry (doubled
    /// on each storm in a row).
    pub storm_backoff: Duration,
    /// The stuck-INTx watchdog: STATUS.INTERRUPT set with no progress for
    /// this long counts as stuck.
    pub stuck_after: Duration,
    /// An interrupt in service with no EOI from the attached guest for
    /// this long is reported and recovered (0 disables).
    pub eoi_timeout: Duration,
    /// Watchdog interval while the device is idle.
    pub idle_interval: Duration,
    /// Simulated device only: COMMAND as the "firmware" left it.
    pub sim_command: u16,
    /// Simulated device only: the kernel driver modelled.
    pub sim_kernel: SimKernelSetting,
    /// vfio devices only, for tests: QEMU's edu device whose BAR0 the
    /// daemon maps (enabling memory decoding at start) so that
    /// `test-raise`/`test-ack` can make it interrupt and acknowledge it
    /// while the daemon owns its VFIO group.
    pub edu_test_hooks: bool,
}

/// The built-in example KVM guest (the demo): it receives a simulated
/// device's interrupts through the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ExampleGuestConfig {
    /// The simulated device assigned to it.
    pub bdf: Bdf,
    /// Interrupts the device raises per second.
    pub interrupts_per_second: u32,
}

/// The default address of the metrics endpoint: loopback.
pub const DEFAULT_METRICS_LISTEN: std::net::SocketAddr = std::net::SocketAddr::V4(
    std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 9797),
);

/// The `[metrics]` table: how the metrics leave the daemon besides the
/// control socket's `metrics` request. Everything is off by default.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct MetricsConfig {
    /// Where the HTTP `/metrics` endpoint listens; `None`: no endpoint.
    pub listen: Option<std::net::SocketAddr>,
    /// Scrapers' connections served at once; more are closed at once.
    pub max_connections: usize,
    /// How long a scraper may take to send its request headers, and to
    /// complete the whole exchange.
    pub timeout: Duration,
    /// The node_exporter textfile collector's file, rewritten atomically
    /// every [`textfile_interval`](Self::textfile_interval); `None`: none.
    pub textfile: Option<PathBuf>,
    /// How often the textfile is rewritten.
    pub textfile_interval: Duration,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: None,
            max_connections: 16,
            timeout: Duration::from_secs(5),
            textfile: None,
            textfile_interval: Duration::from_secs(15),
        }
    }
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Config {
    /// The file it came from.
    pub path: PathBuf,
    /// The `[daemon]` table.
    pub daemon: DaemonConfig,
    /// The devices, in file order.
    pub devices: Vec<DeviceConfig>,
    /// The built-in example guest, if any.
    pub example_guest: Option<ExampleGuestConfig>,
    /// The `[metrics]` table.
    pub metrics: MetricsConfig,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    daemon: Option<RawDaemon>,
    #[serde(default)]
    device: Vec<RawDevice>,
    #[serde(default)]
    example_guest: Option<RawExampleGuest>,
    #[serde(default)]
    metrics: Option<RawMetrics>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawMetrics {
    http: Option<Spanned<bool>>,
    listen: Option<Spanned<String>>,
    max_connections: Option<Spanned<usize>>,
    timeout_ms: Option<Spanned<u64>>,
    textfile: Option<Spanned<PathBuf>>,
    textfile_interval_ms: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawDaemon {
    socket: Option<Spanned<PathBuf>>,
    socket_mode: Option<Spanned<u32>>,
    socket_group: Option<Spanned<String>>,
    admin_group: Option<Spanned<String>>,
    max_clients: Option<Spanned<usize>>,
    client_timeout_ms: Option<Spanned<u64>>,
    status_interval_ms: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawDevice {
    bdf: Spanned<String>,
    backend: Spanned<BackendKind>,
    #[serde(default)]
    path: Option<Spanned<PathSetting>>,
    #[serde(default)]
    bind: Option<Spanned<bool>>,
    #[serde(default)]
    probe: Option<bool>,
    #[serde(default)]
    reset: Option<bool>,
    #[serde(default)]
    storm_threshold: Option<u32>,
    #[serde(default)]
    storm_backoff_ms: Option<Spanned<u64>>,
    #[serde(default)]
    stuck_after_ms: Option<Spanned<u64>>,
    #[serde(default)]
    eoi_timeout_ms: Option<u64>,
    #[serde(default)]
    idle_interval_ms: Option<Spanned<u64>>,
    #[serde(default)]
    sim_command: Option<Spanned<u16>>,
    #[serde(default)]
    sim_kernel: Option<Spanned<SimKernelSetting>>,
    #[serde(default)]
    edu_test_hooks: Option<Spanned<bool>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawExampleGuest {
    bdf: Spanned<String>,
    #[serde(default)]
    interrupts_per_second: Option<Spanned<u32>>,
}

/// 1-based line and column of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

struct Checker<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Checker<'_> {
    fn invalid(&self, span: Range<usize>, message: impl Into<String>) -> ConfigError {
        let (line, column) = line_column(self.text, span.start);
        ConfigError::Invalid {
            path: self.path.to_owned(),
            line,
            column,
            message: message.into(),
        }
    }

    fn bdf(&self, field: &Spanned<String>) -> Result<Bdf, ConfigError> {
        field
            .get_ref()
            .parse::<Bdf>()
            .map_err(|e| self.invalid(field.span(), e.to_string()))
    }

    fn millis(
        &self,
        field: &Option<Spanned<u64>>,
        default: Duration,
        min: u64,
        what: &str,
    ) -> Result<Duration, ConfigError> {
        match field {
            None => Ok(default),
            Some(v) if *v.get_ref() < min => Err(self.invalid(
                v.span(),
                format!("{what} = {} must be at least {min} ms", v.get_ref()),
            )),
            Some(v) => Ok(Duration::from_millis(*v.get_ref())),
        }
    }
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Validates `text` as if read from `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let (line, column) = line_column(text, e.span().map_or(0, |s| s.start));
            ConfigError::Parse {
                path: path.to_owned(),
                line,
                column,
                message: e.message().trim().to_owned(),
            }
        })?;
        let c = Checker { path, text };
        let daemon = c.daemon(raw.daemon)?;
        let metrics = c.metrics(raw.metrics)?;
        let mut devices: Vec<DeviceConfig> = Vec::with_capacity(raw.device.len());
        for d in &raw.device {
            let device = c.device(d)?;
            if devices.iter().any(|o| o.bdf == device.bdf) {
                return Err(c.invalid(
                    d.bdf.span(),
                    format!("device {} is listed twice", device.bdf),
                ));
            }
            devices.push(device);
        }
        let example_guest = match raw.example_guest {
            None => None,
            Some(g) => {
                let bdf = c.bdf(&g.bdf)?;
                if !devices
                    .iter()
                    .any(|d| d.bdf == bdf && d.backend == BackendKind::Sim)
                {
                    return Err(c.invalid(
                        g.bdf.span(),
                        format!(
                            "the example guest needs a [[device]] {bdf} with backend = \"sim\""
                        ),
                    ));
                }
                let rate = match &g.interrupts_per_second {
                    None => 100,
                    Some(r) if *r.get_ref() == 0 || *r.get_ref() > 100_000 => {
                        return Err(c.invalid(
                            r.span(),
                            "interrupts-per-second must be between 1 and 100000",
                        ))
                    }
                    Some(r) => *r.get_ref(),
                };
                Some(ExampleGuestConfig {
                    bdf,
                    interrupts_per_second: rate,
                })
            }
        };
        Ok(Self {
            path: path.to_owned(),
            daemon,
            devices,
            example_guest,
            metrics,
        })
    }

    /// The device configured at `bdf`.
    pub fn device(&self, bdf: Bdf) -> Option<&DeviceConfig> {
        self.devices.iter().find(|d| d.bdf == bdf)
    }
}

/// The longest control socket path: `sun_path` holds 108 bytes including
/// the terminating NUL.
pub const MAX_SOCKET_PATH: usize = 107;

/// Whether `path` fits in a Unix socket address; the message says why not.
pub fn socket_path_fits(path: &Path) -> Result<(), String> {
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(format!(
            "socket path is {len} bytes; a Unix socket path holds at most {MAX_SOCKET_PATH} \
             (sun_path is 108 bytes with its NUL)"
        ));
    }
    Ok(())
}

impl Checker<'_> {
    fn daemon(&self, raw: Option<RawDaemon>) -> Result<DaemonConfig, ConfigError> {
        let mut d = DaemonConfig::default();
        let Some(raw) = raw else { return Ok(d) };
        if let Some(s) = raw.socket {
            if !s.get_ref().is_absolute() {
                return Err(self.invalid(s.span(), "socket must be an absolute path"));
            }
            if let Err(message) = socket_path_fits(s.get_ref()) {
                return Err(self.invalid(s.span(), message));
            }
            d.socket = s.into_inner();
        }
        if let Some(m) = raw.socket_mode {
            if *m.get_ref() > 0o777 || *m.get_ref() & 0o600 != 0o600 {
                return Err(self.invalid(
                    m.span(),
                    "socket-mode must be permission bits (at most 0o777) including 0o600",
                ));
            }
            if *m.get_ref() & 0o007 != 0 {
                return Err(self.invalid(
                    m.span(),
                    format!(
                        "socket-mode {:#o} gives every local user access to the daemon; use the \
                         socket-group for the VMMs (e.g. 0o660)",
                        m.get_ref()
                    ),
                ));
            }
            d.socket_mode = m.into_inner();
        }
        if let Some(g) = raw.socket_group {
            if g.get_ref().is_empty() {
                return Err(self.invalid(g.span(), "socket-group must not be empty"));
            }
            d.socket_group = Some(g.into_inner());
        }
        if let Some(g) = raw.admin_group {
            if g.get_ref().is_empty() {
                return Err(self.invalid(g.span(), "admin-group must not be empty"));
            }
            d.admin_group = Some(g.into_inner());
        }
        if let Some(n) = raw.max_clients {
            if *n.get_ref() == 0 || *n.get_ref() > 4096 {
                return Err(self.invalid(n.span(), "max-clients must be between 1 and 4096"));
            }
            d.max_clients = n.into_inner();
        }
        d.client_timeout = self.millis(
            &raw.client_timeout_ms,
            d.client_timeout,
            10,
            "client-timeout-ms",
        )?;
        d.status_interval = self.millis(
            &raw.status_interval_ms,
            d.status_interval,
            100,
            "status-interval-ms",
        )?;
        Ok(d)
    }

    fn metrics(&self, raw: Option<RawMetrics>) -> Result<MetricsConfig, ConfigError> {
        let mut m = MetricsConfig::default();
        let Some(raw) = raw else { return Ok(m) };
        let listen = match &raw.listen {
            None => None,
            Some(l) => Some(l.get_ref().parse::<std::net::SocketAddr>().map_err(|_| {
                self.invalid(
                    l.span(),
                    format!(
                        "listen = {:?} is not an address and port (e.g. \"127.0.0.1:9797\" or \
                         \"[::1]:9797\")",
                        l.get_ref()
                    ),
                )
            })?),
        };
        m.listen = match (&raw.http, listen) {
            (Some(h), Some(addr)) if !*h.get_ref() => {
                return Err(self.invalid(
                    h.span(),
                    format!("http = false contradicts listen = \"{addr}\"; drop one of them"),
                ))
            }
            (_, Some(addr)) => Some(addr),
            (Some(h), None) if *h.get_ref() => Some(DEFAULT_METRICS_LISTEN),
            _ => None,
        };
        if let Some(n) = raw.max_connections {
            if *n.get_ref() == 0 || *n.get_ref() > 1024 {
                return Err(self.invalid(
                    n.span(),
                    format!(
                        "max-connections = {} must be between 1 and 1024",
                        n.get_ref()
                    ),
                ));
            }
            m.max_connections = n.into_inner();
        }
        m.timeout = self.millis(&raw.timeout_ms, m.timeout, 10, "timeout-ms")?;
        if let Some(t) = raw.textfile {
            let path = t.get_ref();
            if !path.is_absolute() || path.file_name().is_none() {
                return Err(self.invalid(
                    t.span(),
                    format!(
                        "textfile = {:?} must be an absolute path to a file",
                        path.display()
                    ),
                ));
            }
            if path.extension() != Some(std::ffi::OsStr::new("prom")) {
                return Err(self.invalid(
                    t.span(),
                    format!(
                        "textfile = {:?} must end in .prom (node_exporter's textfile collector \
                         reads only *.prom)",
                        path.display()
                    ),
                ));
            }
            m.textfile = Some(t.into_inner());
        }
        m.textfile_interval = self.millis(
            &raw.textfile_interval_ms,
            m.textfile_interval,
            100,
            "textfile-interval-ms",
        )?;
        Ok(m)
    }

    fn device(&self, raw: &RawDevice) -> Result<DeviceConfig, ConfigError> {
        let bdf = self.bdf(&raw.bdf)?;
        let backend = *raw.backend.get_ref();
        let path = raw
            .path
            .as_ref()
            .map_or(PathSetting::Auto, |p| *p.get_ref());
        let sim_kernel = raw
            .sim_kernel
            .as_ref()
            .map_or(SimKernelSetting::Bare, |k| *k.get_ref());
        if let Some(p) = &raw.path {
            let capable = kind_bypass_capable(backend, sim_kernel);
            if *p.get_ref() == PathSetting::Fast && !capable {
                return Err(self.invalid(
                    p.span(),
                    format!(
                        "path = \"fast\" needs the vfio backend (the kernel bypass is vfio-pci's \
                         unmask eventfd; or a simulated device with sim-kernel = \"vfio-pci\"); \
                         {bdf} uses {backend}"
                    ),
                ));
            }
        }
        let bind = match &raw.bind {
            Some(b) if *b.get_ref() && backend == BackendKind::Sim => {
                return Err(self.invalid(
                    b.span(),
                    "bind = true applies to vfio and uio devices, not to a simulated one",
                ))
            }
            Some(b) => *b.get_ref(),
            None => false,
        };
        if backend != BackendKind::Sim {
            for (field, name) in [
                (raw.sim_command.as_ref().map(|s| s.span()), "sim-command"),
                (raw.sim_kernel.as_ref().map(|s| s.span()), "sim-kernel"),
            ] {
                if let Some(span) = field {
                    return Err(
                        self.invalid(span, format!("{name} applies only to backend = \"sim\""))
                    );
                }
            }
        }
        let edu_test_hooks = match &raw.edu_test_hooks {
            Some(h) if *h.get_ref() && backend != BackendKind::Vfio => {
                return Err(self.invalid(
                    h.span(),
                    "edu-test-hooks applies only to backend = \"vfio\"",
                ))
            }
            Some(h) => *h.get_ref(),
            None => false,
        };
        let defaults = DeviceConfig::defaults(bdf, backend);
        Ok(DeviceConfig {
            bdf,
            backend,
            path,
            bind,
            probe: raw.probe.unwrap_or(defaults.probe),
            reset: raw.reset.unwrap_or(defaults.reset),
            storm_threshold: raw.storm_threshold.unwrap_or(defaults.storm_threshold),
            storm_backoff: self.millis(
                &raw.storm_backoff_ms,
                defaults.storm_backoff,
                1,
                "storm-backoff-ms",
            )?,
            stuck_after: self.millis(
                &raw.stuck_after_ms,
                defaults.stuck_after,
                2,
                "stuck-after-ms",
            )?,
            eoi_timeout: raw
                .eoi_timeout_ms
                .map_or(defaults.eoi_timeout, Duration::from_millis),
            idle_interval: self.millis(
                &raw.idle_interval_ms,
                defaults.idle_interval,
                10,
                "idle-interval-ms",
            )?,
            sim_command: raw.sim_command.as_ref().map_or(0, |c| *c.get_ref()),
            sim_kernel,
            edu_test_hooks,
        })
    }
}

impl DeviceConfig {
    /// Whether the backend can take the kernel bypass (a kernel unmask
    /// eventfd: vfio-pci, or its simulated model), as the backends answer
    /// for their kind before any device is open.
    pub fn bypass_capable(&self) -> bool {
        kind_bypass_capable(self.backend, self.sim_kernel)
    }

    /// A device with every setting at its default.
    pub fn defaults(bdf: Bdf, backend: BackendKind) -> Self {
        Self {
            bdf,
            backend,
            path: PathSetting::Auto,
            bind: false,
            probe: true,
            reset: false,
            storm_threshold: 20_000,
            storm_backoff: Duration::from_secs(1),
            stuck_after: Duration::from_millis(50),
            eoi_timeout: Duration::from_secs(2),
            idle_interval: Duration::from_secs(1),
            sim_command: 0,
            sim_kernel: SimKernelSetting::Bare,
            edu_test_hooks: false,
        }
    }
}

#[cfg(test)]
mod tests;
