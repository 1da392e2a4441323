//! The `[metrics]` exporters' lifecycle: the HTTP endpoint and the textfile
//! writer started with the daemon, changed by a reload, stopped with it;
//! and their events, counted and logged rate limited.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tracing::{error, info, warn};

use super::{http, textfile};
use crate::daemon::config::MetricsConfig;
use crate::daemon::registry::Daemon;
use crate::daemon::DaemonError;
use crate::ratelimit::LogLimiter;

/// Something a scraper or the filesystem can cause at will: counted per
/// cause, logged one line per cause per ten seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ExporterEvent {
    /// A connection beyond `max-connections`, closed at once.
    TooManyConnections,
    /// A scraper that did not send its headers, or finish, in `timeout-ms`.
    Timeout,
    /// A connection that failed otherwise (malformed request, reset).
    ConnectionError,
    /// `accept` failed (out of descriptors).
    AcceptError,
    /// Writing or renaming the textfile failed.
    TextfileError,
}

impl ExporterEvent {
    const ALL: [Self; 5] = [
        Self::TooManyConnections,
        Self::Timeout,
        Self::ConnectionError,
        Self::AcceptError,
        Self::TextfileError,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::TooManyConnections => "too-many-connections",
            Self::Timeout => "timeout",
            Self::ConnectionError => "connection-error",
            Self::AcceptError => "accept-error",
            Self::TextfileError => "textfile-error",
        }
    }
}

/// Counts of [`ExporterEvent`]s and their log limiters.
#[derive(Debug)]
pub(crate) struct ExporterEvents {
    counts: [AtomicU64; ExporterEvent::ALL.len()],
    limits: Mutex<[LogLimiter; ExporterEvent::ALL.len()]>,
}

impl Default for ExporterEvents {
    fn default() -> Self {
        Self {
            counts: Default::default(),
            limits: Mutex::new(
                ExporterEvent::ALL.map(|_| LogLimiter::new(Duration::from_secs(10), 1)),
            ),
        }
    }
}

impl ExporterEvents {
    /// Counts `event`; `Some(n)` when it may be logged, `n` the lines of
    /// its cause suppressed since the last one.
    pub(crate) fn note(&self, event: ExporterEvent) -> Option<u32> {
        let i = event as usize;
        if let Some(c) = self.counts.get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        let mut limits = self.limits.lock().unwrap_or_else(PoisonError::into_inner);
        limits.get_mut(i).and_then(LogLimiter::admit)
    }

    fn count(&self, event: ExporterEvent) -> u64 {
        self.counts
            .get(event as usize)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// The Prometheus rows.
    pub(crate) fn prometheus(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP vfio_intx_metrics_http_events_total Metrics endpoint connections refused, \
             timed out or failed, by cause; their log lines are rate limited."
        );
        let _ = writeln!(out, "# TYPE vfio_intx_metrics_http_events_total counter");
        for e in ExporterEvent::ALL {
            if e == ExporterEvent::TextfileError {
                continue;
            }
            let _ = writeln!(
                out,
                "vfio_intx_metrics_http_events_total{{cause=\"{}\"}} {}",
                e.name(),
                self.count(e)
            );
        }
        let _ = writeln!(
            out,
            "# HELP vfio_intx_textfile_write_errors_total Failed writes of the node_exporter \
             textfile; their log lines are rate limited."
        );
        let _ = writeln!(out, "# TYPE vfio_intx_textfile_write_errors_total counter");
        let _ = writeln!(
            out,
            "vfio_intx_textfile_write_errors_total {}",
            self.count(ExporterEvent::TextfileError)
        );
        out
    }
}

struct HttpRunning {
    addr: SocketAddr,
    max_connections: usize,
    timeout: Duration,
    task: tokio::task::JoinHandle<()>,
}

/// The running exporters.
pub(crate) struct Exporter {
    daemon: Arc<Daemon>,
    http: Option<HttpRunning>,
    textfile: Option<textfile::Writer>,
}

impl Exporter {
    /// Starts what `config` asks for. An address it cannot listen on is an
    /// error naming it; nothing is left running then.
    pub(crate) async fn start(
        daemon: &Arc<Daemon>,
        config: &MetricsConfig,
    ) -> Result<Self, DaemonError> {
        let mut exporter = Self {
            daemon: Arc::clone(daemon),
            http: None,
            textfile: None,
        };
        if let Some(addr) = config.listen {
            exporter.http = Some(exporter.listen(addr, config).await?);
        }
        exporter.set_textfile(config).await;
        Ok(exporter)
    }

    async fn listen(
        &self,
        addr: SocketAddr,
        config: &MetricsConfig,
    ) -> Result<HttpRunning, DaemonError> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| DaemonError::MetricsListen { addr, source })?;
        if !addr.ip().is_loopback() {
            warn!(
                %addr,
                "metrics endpoint on a non-loopback address: whoever reaches it reads the \
                 daemon's metrics (device addresses, sessions); firewall it"
            );
        }
        info!(%addr, max_connections = config.max_connections, timeout = ?config.timeout, "metrics endpoint listening");
        let task = tokio::spawn(http::serve(
            listener,
            Arc::clone(&self.daemon),
            http::Limits {
                max_connections: config.max_connections,
                timeout: config.timeout,
            },
        ));
        Ok(HttpRunning {
            addr,
            max_connections: config.max_connections,
            timeout: config.timeout,
            task,
        })
    }

    /// Stops the endpoint and waits until its listener is closed.
    async fn stop_http(&mut self) {
        if let Some(old) = self.http.take() {
            old.task.abort();
            let _ = old.task.await;
            info!(addr = %old.addr, "metrics endpoint closed");
        }
    }

    async fn set_textfile(&mut self, config: &MetricsConfig) {
        let same = match (&self.textfile, &config.textfile) {
            (Some(w), Some(path)) => w.path() == path && w.interval() == config.textfile_interval,
            (None, None) => true,
            _ => false,
        };
        if same {
            return;
        }
        if let Some(old) = self.textfile.take() {
            old.stop().await;
        }
        if let Some(path) = &config.textfile {
            self.textfile = Some(textfile::Writer::start(
                Arc::clone(&self.daemon),
                path.clone(),
                config.textfile_interval,
            ));
        }
    }

    /// Applies a reloaded `[metrics]`: a listener added, moved, changed or
    /// removed; the textfile started, moved or stopped. A new address that
    /// cannot be listened on is logged and the endpoint stays as it was.
    pub(crate) async fn reload(&mut self, config: &MetricsConfig) {
        let unchanged = match (&self.http, config.listen) {
            (Some(h), Some(addr)) => {
                h.addr == addr
                    && h.max_connections == config.max_connections
                    && h.timeout == config.timeout
            }
            (None, None) => true,
            _ => false,
        };
        if !unchanged {
            match config.listen {
                None => self.stop_http().await,
                Some(addr) => {
                    // The same address: the old listener must go first.
                    let same = self.http.as_ref().is_some_and(|h| h.addr == addr);
                    if same {
                        self.stop_http().await;
                    }
                    match self.listen(addr, config).await {
                        Ok(new) => {
                            self.stop_http().await;
                            self.http = Some(new);
                        }
                        Err(e) => error!(
                            error = %crate::error_chain(&e),
                            "reload: {}",
                            if same {
                                "the metrics endpoint is closed"
                            } else {
                                "the metrics endpoint stays as it was"
                            }
                        ),
                    }
                }
            }
        }
        self.set_textfile(config).await;
    }

    /// Stops everything; the textfile is removed (a stopped daemon's last
    /// numbers must not look current).
    pub(crate) async fn stop(&mut self) {
        self.stop_http().await;
        if let Some(w) = self.textfile.take() {
            w.stop().await;
        }
    }
}
