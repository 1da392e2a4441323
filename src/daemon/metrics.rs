//! Per-device metrics beyond the engine's counters: the interrupt round trip
//! (injection to the guest's EOI), time held masked, storms, EOI timeouts;
//! the control socket's events per cause; and the Prometheus text
//! rendering of everything.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::intx::IntxStats;

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
}

impl DeviceMetrics {
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
}
