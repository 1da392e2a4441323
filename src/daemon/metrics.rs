//! Per-device metrics beyond the engine's counters: the interrupt round trip
//! (injection to the guest's EOI), time held masked, storms, EOI timeouts;
//! the control socket's events per cause; and the Prometheus text
//! rendering of everything, and where it goes besides the control socket:
//! an HTTP `/metrics` endpoint (`http`) and node_exporter's textfile
//! collector (`textfile`), both opt-in (`[metrics]`).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::intx::IntxStats;

mod exporter;
mod http;
mod textfile;

pub(crate) use exporter::{Exporter, ExporterEvents};

/// Upper bounds of the round-trip histogram's buckets, in microseconds.
pub const BUCKETS_US: [u64; 12] = [
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 50_000, 250_000,
];

/// A lock-free latency histogram with fixed buckets.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Counts per bucket of [`BUCKETS_US`], plus one for larger values.
    buckets: [AtomicU64; BUCKETS_US.len() + 1],
    sum_ns: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn record(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = BUCKETS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(BUCKETS_US.len());
        if let Some(b) = self.buckets.get(i) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// A snapshot.
    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            buckets: self
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            sum_ns: self.sum_ns.load(Ordering::Relaxed),
            count: self.count.load(Ordering::Relaxed),
        }
    }
}

/// A histogram's counts at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistogramSnapshot {
    /// Counts per bucket of [`BUCKETS_US`] (not cumulative), then the
    /// overflow bucket.
    pub buckets: Vec<u64>,
    /// Sum of all observations, in nanoseconds.
    pub sum_ns: u64,
    /// Number of observations.
    pub count: u64,
}

impl HistogramSnapshot {
    /// The bucket bound (in microseconds) under which quantile `q` falls;
    /// `None` without observations or in the overflow bucket.
    pub fn quantile_bound_us(&self, q: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let target = ((self.count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in self.buckets.iter().enumerate() {
            seen += c;
            if seen >= target {
                return BUCKETS_US.get(i).copied();
            }
        }
        None
    }
}

/// The daemon's own counters for one device.
#[derive(Debug, Default)]
pub struct DeviceMetrics {
    /// Injection to EOI.
    pub round_trip: Histogram,
    /// Storms detected (line masked).
    pub storms: AtomicU64,
    /// Interrupts in service past the EOI timeout, recovered.
    pub eoi_timeouts: AtomicU64,
    /// Nanoseconds the line was held masked by the daemon (storm or
    /// operator).
    pub held_ns: AtomicU64,
    /// Resets requested through the control socket that failed.
    pub reset_failures: AtomicU64,
    /// Sessions served.
    pub sessions: AtomicU64,
    /// Interrupts delivered while no session was attached, kept for the
    /// next one.
    pub parked: AtomicU64,
    /// Since when the daemon holds the line masked (storm or operator).
    held_since: Mutex<Option<Instant>>,
    /// When the watchdog last found the line stuck and re-synced it.
    stuck_at: Mutex<Option<Instant>>,
}

/// How long after the watchdog found a line stuck (and re-synced it) the
/// line counts as stuck: a line a reset loop keeps stranding is found
/// again well within it, a recovered one drops out.
pub const STUCK_RECENT: Duration = Duration::from_secs(10);

impl DeviceMetrics {
    /// The daemon began holding the line masked at `at` (`Some`), or lifted
    /// its hold (`None`).
    pub fn set_held(&self, at: Option<Instant>) {
        *self
            .held_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = at;
    }

    /// Since when the daemon holds the line masked.
    pub fn held_since(&self) -> Option<Instant> {
        *self
            .held_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The watchdog found the line stuck at `at` (and re-synced it).
    pub fn note_stuck(&self, at: Instant) {
        *self.stuck_at.lock().unwrap_or_else(PoisonError::into_inner) = Some(at);
    }

    /// Whether the watchdog found the line stuck within [`STUCK_RECENT`]
    /// of `now`.
    pub fn stuck(&self, now: Instant) -> bool {
        self.stuck_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some_and(|at| now.saturating_duration_since(at) < STUCK_RECENT)
    }

    /// Adds `d` to the held time.
    pub fn add_held(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.held_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// A snapshot.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MetricsSnapshot {
            round_trip: self.round_trip.snapshot(),
            storms: get(&self.storms),
            eoi_timeouts: get(&self.eoi_timeouts),
            held_ns: get(&self.held_ns),
            reset_failures: get(&self.reset_failures),
            sessions: get(&self.sessions),
            parked: get(&self.parked),
        }
    }
}

/// [`DeviceMetrics`] at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricsSnapshot {
    /// Injection to EOI.
    pub round_trip: HistogramSnapshot,
    /// Storms detected.
    pub storms: u64,
    /// EOI timeouts recovered.
    pub eoi_timeouts: u64,
    /// Nanoseconds held masked by the daemon.
    pub held_ns: u64,
    /// Failed resets.
    pub reset_failures: u64,
    /// Sessions served.
    pub sessions: u64,
    /// Interrupts parked while no session was attached.
    pub parked: u64,
}

macro_rules! define_engine_counters {
    ($($field:ident, $wire:ident, $prom:literal, $help:literal;)*) => {
        /// The engine's counters, serializable: generated from the engine's
        /// one list of counters (`with_intx_counters!` in
        /// `src/intx/stats.rs`), under their wire names.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(default)]
        pub struct EngineCounters {
            $(#[doc = $help] pub $wire: u64,)*
            /// Interrupt-path attempts deferred behind a reset.
            pub deferred: u64,
            /// Nanoseconds lines were stuck before recovery.
            pub stuck_ns: u64,
        }

        impl From<IntxStats> for EngineCounters {
            fn from(s: IntxStats) -> Self {
                Self {
                    $($wire: s.$field,)*
                    deferred: s.deferred,
                    stuck_ns: u64::try_from(s.stuck_time.as_nanos()).unwrap_or(u64::MAX),
                }
            }
        }

        /// The engine's Prometheus counters: name, help, value.
        const ENGINE_ROWS: &[(&str, &str, fn(&EngineCounters) -> u64)] = &[
            $(($prom, $help, |c| c.$wire),)*
            (
                "deferred_total",
                "Interrupt-path attempts deferred behind a reset.",
                |c| c.deferred,
            ),
        ];
    };
}
crate::intx::stats::with_intx_counters!(define_engine_counters);

/// Everything measured about one device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStats {
    /// The device.
    pub bdf: String,
    /// The engine's counters.
    pub engine: EngineCounters,
    /// The daemon's.
    pub daemon: MetricsSnapshot,
}

fn seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// Renders `devices` in the Prometheus text exposition format (0.0.4).
pub fn prometheus(devices: &[DeviceStats]) -> String {
    let mut out = String::new();
    type Get = fn(&DeviceStats) -> f64;
    for (name, help, get) in ENGINE_ROWS {
        let _ = writeln!(out, "# HELP vfio_intx_{name} {help}");
        let _ = writeln!(out, "# TYPE vfio_intx_{name} counter");
        for d in devices {
            let _ = writeln!(
                out,
                "vfio_intx_{name}{{bdf=\"{}\"}} {}",
                d.bdf,
                get(&d.engine)
            );
        }
    }
    let counters: [(&str, &str, Get); 5] = [
        (
            "storms_total",
            "Interrupt storms detected (line masked).",
            |d| d.daemon.storms as f64,
        ),
        (
            "eoi_timeouts_total",
            "Interrupts in service past the EOI timeout, recovered.",
            |d| d.daemon.eoi_timeouts as f64,
        ),
        (
            "masked_seconds_total",
            "Time the line was masked by the host: in service, held, or stuck.",
            |d| {
                seconds(
                    d.daemon
                        .round_trip
                        .sum_ns
                        .saturating_add(d.daemon.held_ns)
                        .saturating_add(d.engine.stuck_ns),
                )
            },
        ),
        (
            "held_seconds_total",
            "Time the line was held masked by the daemon (storm or operator).",
            |d| seconds(d.daemon.held_ns),
        ),
        ("sessions_total", "VMM sessions served.", |d| {
            d.daemon.sessions as f64
        }),
    ];
    for (name, help, get) in counters {
        let _ = writeln!(out, "# HELP vfio_intx_{name} {help}");
        let _ = writeln!(out, "# TYPE vfio_intx_{name} counter");
        for d in devices {
            let _ = writeln!(out, "vfio_intx_{name}{{bdf=\"{}\"}} {}", d.bdf, get(d));
        }
    }
    let name = "vfio_intx_round_trip_seconds";
    let _ = writeln!(out, "# HELP {name} Interrupt injection to guest EOI.");
    let _ = writeln!(out, "# TYPE {name} histogram");
    for d in devices {
        let h = &d.daemon.round_trip;
        let mut cumulative = 0;
        for (i, bound) in BUCKETS_US.iter().enumerate() {
            cumulative += h.buckets.get(i).copied().unwrap_or(0);
            let _ = writeln!(
                out,
                "{name}_bucket{{bdf=\"{}\",le=\"{}\"}} {cumulative}",
                d.bdf,
                *bound as f64 / 1e6
            );
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{bdf=\"{}\",le=\"+Inf\"}} {}",
            d.bdf, h.count
        );
        let _ = writeln!(out, "{name}_sum{{bdf=\"{}\"}} {}", d.bdf, seconds(h.sum_ns));
        let _ = writeln!(out, "{name}_count{{bdf=\"{}\"}} {}", d.bdf, h.count);
    }
    out
}

/// A control-socket event a client can cause at will: counted per cause,
/// logged rate limited per cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ControlEvent {
    /// A peer neither root, the daemon's uid nor in the socket group.
    Unauthorized,
    /// A connection beyond `max-clients`.
    TooManyClients,
    /// A malformed or oversized frame, undecodable JSON, the wrong
    /// descriptors.
    BadFrame,
    /// No complete request within `client-timeout-ms`.
    Timeout,
    /// A VMM session started.
    SessionStarted,
    /// A VMM session ended.
    SessionEnded,
}

impl ControlEvent {
    const ALL: [Self; 6] = [
        Self::Unauthorized,
        Self::TooManyClients,
        Self::BadFrame,
        Self::Timeout,
        Self::SessionStarted,
        Self::SessionEnded,
    ];

    /// The `cause` label.
    fn name(self) -> &'static str {
        match self {
            Self::Unauthorized => "unauthorized",
            Self::TooManyClients => "too-many-clients",
            Self::BadFrame => "bad-frame",
            Self::Timeout => "timeout",
            Self::SessionStarted => "session-started",
            Self::SessionEnded => "session-ended",
        }
    }
}

/// Counts of [`ControlEvent`]s and their log limiters: a client's faults
/// get one line per cause per ten seconds, sessions three per five
/// seconds (every one in normal operation, not a flood's).
#[derive(Debug)]
pub(crate) struct ControlEvents {
    counts: [AtomicU64; ControlEvent::ALL.len()],
    limits: std::sync::Mutex<[crate::ratelimit::LogLimiter; ControlEvent::ALL.len()]>,
}

impl Default for ControlEvents {
    fn default() -> Self {
        use crate::ratelimit::LogLimiter;
        Self {
            counts: Default::default(),
            limits: std::sync::Mutex::new(ControlEvent::ALL.map(|e| match e {
                ControlEvent::SessionStarted | ControlEvent::SessionEnded => {
                    LogLimiter::new(Duration::from_secs(5), 3)
                }
                _ => LogLimiter::new(Duration::from_secs(10), 1),
            })),
        }
    }
}

impl ControlEvents {
    /// Counts `event`; `Some(n)` when it may be logged, `n` the lines of
    /// its cause suppressed since the last one.
    pub(crate) fn note(&self, event: ControlEvent) -> Option<u32> {
        let i = event as usize;
        if let Some(c) = self.counts.get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        let mut limits = self
            .limits
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        limits.get_mut(i).and_then(|l| l.admit())
    }

    /// The Prometheus rows.
    pub(crate) fn prometheus(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP vfio_intx_control_events_total Control-socket events by cause \
             (refusals, bad frames, timeouts, sessions); their log lines are rate limited."
        );
        let _ = writeln!(out, "# TYPE vfio_intx_control_events_total counter");
        for (e, c) in ControlEvent::ALL.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "vfio_intx_control_events_total{{cause=\"{}\"}} {}",
                e.name(),
                c.load(Ordering::Relaxed)
            );
        }
        out
    }
}

/// What an alert needs to know about one device now: gauges, read without
/// waiting for the device (no config access, no gate).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceGauges {
    /// The device.
    pub bdf: String,
    /// Since when the line is masked by the host: an interrupt in service
    /// awaiting the guest's EOI (or parked for the next session), or a
    /// hold of the daemon's. `None`: unmasked, as far as the daemon knows
    /// (on the kernel bypass the kernel masks and unmasks each interrupt
    /// without the daemon seeing it; a line the guest masked itself is not
    /// the host's doing).
    pub masked_since: Option<Instant>,
    /// The watchdog found the line stuck within [`STUCK_RECENT`].
    pub stuck: bool,
    /// A session runs on the kernel bypass (else the user-space path).
    pub bypass: bool,
    /// The PCI 2.3 masking verdict at start: `masking` (probed, works) or
    /// `not-probed` (a device whose masking is broken is never started).
    pub verdict: &'static str,
    /// What decided it (`toggle-test`, the sysfs evidence), or `none`.
    pub evidence: &'static str,
    /// A VMM session is attached.
    pub session: bool,
}

/// `value` escaped for a label value of the text format: backslash,
/// double quote and line feed.
pub fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP vfio_intx_{name} {help}");
    let _ = writeln!(out, "# TYPE vfio_intx_{name} {kind}");
}

/// Renders the gauges of `devices` at `now`, and `vfio_intx_build_info`.
pub fn prometheus_gauges(devices: &[DeviceGauges], now: Instant) -> String {
    let mut out = String::new();
    let flag = |b: bool| u8::from(b);
    type Get = fn(&DeviceGauges, Instant) -> f64;
    let rows: [(&str, &str, Get); 4] = [
        (
            "line_masked",
            "1 while the host holds the line masked: an interrupt awaiting the guest's EOI, or a \
             hold (storm, operator).",
            |d, _| if d.masked_since.is_some() { 1.0 } else { 0.0 },
        ),
        (
            "line_masked_seconds",
            "How long the line has been masked by the host, this time; 0 when unmasked.",
            |d, now| {
                d.masked_since
                    .map_or(0.0, |t| now.saturating_duration_since(t).as_secs_f64())
            },
        ),
        (
            "line_stuck",
            "1 when the stuck-INTx watchdog found the line stuck masked (and re-synced it) \
             within the last 10 seconds.",
            |d, _| if d.stuck { 1.0 } else { 0.0 },
        ),
        (
            "session_attached",
            "1 while a VMM session is attached to the device.",
            |d, _| if d.session { 1.0 } else { 0.0 },
        ),
    ];
    for (name, help, get) in rows {
        family(&mut out, name, "gauge", help);
        for d in devices {
            let bdf = escape_label(&d.bdf);
            let _ = writeln!(out, "vfio_intx_{name}{{bdf=\"{bdf}\"}} {}", get(d, now));
        }
    }
    family(
        &mut out,
        "sessions_attached",
        "gauge",
        "VMM sessions attached, all devices.",
    );
    let attached = devices.iter().filter(|d| d.session).count();
    let _ = writeln!(out, "vfio_intx_sessions_attached {attached}");
    family(
        &mut out,
        "path",
        "gauge",
        "The EOI path in use: 1 for the current one (bypass: the kernel's; user: the daemon's).",
    );
    for d in devices {
        let bdf = escape_label(&d.bdf);
        for (path, on) in [("bypass", d.bypass), ("user", !d.bypass)] {
            let _ = writeln!(
                out,
                "vfio_intx_path{{bdf=\"{bdf}\",path=\"{path}\"}} {}",
                flag(on)
            );
        }
    }
    family(
        &mut out,
        "pci23",
        "gauge",
        "The PCI 2.3 INTx masking verdict at start (1), and what decided it.",
    );
    for d in devices {
        let _ = writeln!(
            out,
            "vfio_intx_pci23{{bdf=\"{}\",verdict=\"{}\",evidence=\"{}\"}} 1",
            escape_label(&d.bdf),
            escape_label(d.verdict),
            escape_label(d.evidence)
        );
    }
    family(
        &mut out,
        "build_info",
        "gauge",
        "The daemon's build: 1, labelled with its version.",
    );
    let _ = writeln!(
        out,
        "vfio_intx_build_info{{version=\"{}\"}} 1",
        escape_label(env!("CARGO_PKG_VERSION"))
    );
    out
}

/// Everything the daemon measures, in the Prometheus text format: the
/// one rendering the control socket's `metrics`, the HTTP endpoint and the
/// textfile share. Reads a snapshot (the device list is copied, then only
/// atomics and short locks are read): it never waits for a device.
pub(crate) fn render(daemon: &crate::daemon::registry::Daemon) -> String {
    let now = Instant::now();
    let devices = daemon.all();
    let stats: Vec<DeviceStats> = devices.iter().map(|d| d.stats()).collect();
    let gauges: Vec<DeviceGauges> = devices.iter().map(|d| d.gauges(now)).collect();
    let mut text = prometheus(&stats);
    text.push_str(&daemon.events.prometheus());
    text.push_str(&daemon.exporter_events.prometheus());
    text.push_str(&prometheus_gauges(&gauges, now));
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_histogram_buckets_and_quantiles_agree() {
        let h = Histogram::default();
        for us in [5, 20, 20, 90, 3_000] {
            h.record(Duration::from_micros(us));
        }
        let s = h.snapshot();
        assert_eq!(s.count, 5);
        assert_eq!(s.quantile_bound_us(0.5), Some(25));
        assert_eq!(s.quantile_bound_us(1.0), Some(5_000));
    }

    #[test]
    fn prometheus_text_has_cumulative_buckets() {
        let h = Histogram::default();
        h.record(Duration::from_micros(5));
        h.record(Duration::from_micros(40));
        let d = DeviceStats {
            bdf: "0000:00:04.0".into(),
            daemon: MetricsSnapshot {
                round_trip: h.snapshot(),
                ..Default::default()
            },
            ..Default::default()
        };
        let text = prometheus(&[d]);
        assert!(
            text.contains(
                "vfio_intx_round_trip_seconds_bucket{bdf=\"0000:00:04.0\",le=\"0.00005\"} 2"
            ),
            "{text}"
        );
        assert!(text.contains("vfio_intx_round_trip_seconds_count{bdf=\"0000:00:04.0\"} 2"));
        assert!(text.contains("# TYPE vfio_intx_interrupts_total counter"));
    }

    #[test]
    fn every_engine_counter_reaches_the_wire_and_prometheus() {
        // The two EngineCounters had lost when it was a hand-made copy.
        let stats = IntxStats {
            held: 7,
            mid_reset_events: 9,
            host_interrupts: 11,
            ..Default::default()
        };
        let engine = EngineCounters::from(stats);
        let json = serde_json::to_value(engine).unwrap_or_default();
        assert_eq!(json["held_by_guest"], 7, "{json}");
        assert_eq!(json["mid_reset_events"], 9, "{json}");
        assert_eq!(json["interrupts"], 11, "{json}");
        let back: EngineCounters = serde_json::from_value(json).unwrap_or_default();
        assert_eq!(back, engine);
        let text = prometheus(&[DeviceStats {
            bdf: "0000:00:04.0".into(),
            engine,
            ..Default::default()
        }]);
        for row in [
            "vfio_intx_held_by_guest_total{bdf=\"0000:00:04.0\"} 7",
            "vfio_intx_mid_reset_events_total{bdf=\"0000:00:04.0\"} 9",
            "vfio_intx_interrupts_total{bdf=\"0000:00:04.0\"} 11",
        ] {
            assert!(text.contains(row), "{row} not in\n{text}");
        }
    }

    #[test]
    fn gauges_escape_label_values_and_measure_the_masked_stretch() {
        assert_eq!(escape_label("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
        let now = Instant::now();
        let d = DeviceGauges {
            bdf: "0000:00:04.0".into(),
            masked_since: now.checked_sub(Duration::from_millis(1500)),
            stuck: true,
            bypass: true,
            verdict: "masking",
            evidence: "say \"sysfs\"",
            session: true,
        };
        let text = prometheus_gauges(&[d], now);
        for row in [
            "vfio_intx_line_masked{bdf=\"0000:00:04.0\"} 1\n",
            "vfio_intx_line_masked_seconds{bdf=\"0000:00:04.0\"} 1.5\n",
            "vfio_intx_line_stuck{bdf=\"0000:00:04.0\"} 1\n",
            "vfio_intx_path{bdf=\"0000:00:04.0\",path=\"bypass\"} 1\n",
            "vfio_intx_path{bdf=\"0000:00:04.0\",path=\"user\"} 0\n",
            "vfio_intx_pci23{bdf=\"0000:00:04.0\",verdict=\"masking\",evidence=\"say \\\"sysfs\\\"\"} 1\n",
            "vfio_intx_sessions_attached 1\n",
        ] {
            assert!(text.contains(row), "{row} not in\n{text}");
        }
        assert_eq!(text.matches("# TYPE ").count(), 8, "{text}");
    }

    #[test]
    fn a_stuck_line_counts_as_stuck_for_a_while_only() {
        let m = DeviceMetrics::default();
        let t = Instant::now();
        assert!(!m.stuck(t));
        m.note_stuck(t);
        assert!(m.stuck(t + Duration::from_secs(1)));
        assert!(!m.stuck(t + STUCK_RECENT));
    }
}
