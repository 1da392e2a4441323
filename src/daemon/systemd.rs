//! systemd service notification (`sd_notify`): READY=1 once every device is
//! armed, STATUS= lines, WATCHDOG=1 at half of WatchdogSec, RELOADING=1 with
//! MONOTONIC_USEC around a reload, STOPPING=1 at shutdown. Without
//! `NOTIFY_SOCKET` every call is a no-op.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sd_notify::NotifyState;
use tracing::{debug, warn};

/// Sends notifications to the service manager, if there is one.
#[derive(Debug, Clone, Copy)]
pub struct Notifier {
    enabled: bool,
}

impl Notifier {
    /// Notifies when `NOTIFY_SOCKET` is set.
    pub fn from_env() -> Self {
        Self {
            enabled: std::env::var_os("NOTIFY_SOCKET").is_some(),
        }
    }

    /// Whether a service manager listens.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        if !self.enabled {
            return;
        }
        static WARNED: AtomicBool = AtomicBool::new(false);
        if let Err(e) = sd_notify::notify(false, states) {
            // Once: a manager that went away does not come back.
            if !WARNED.swap(true, Ordering::Relaxed) {
                warn!(error = %e, "notifying the service manager failed");
            }
        }
    }

    /// READY=1 with a STATUS= line.
    pub fn ready(&self, status: &str) {
        debug!(status, "READY=1");
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    /// A STATUS= line.
    pub fn status(&self, status: &str) {
        self.send(&[NotifyState::Status(status)]);
    }

    /// RELOADING=1 with MONOTONIC_USEC (Type=notify-reload).
    pub fn reloading(&self) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[
                NotifyState::Reloading,
                now,
                NotifyState::Status("reloading the configuration"),
            ]),
            Err(e) => {
                warn!(error = %e, "reading CLOCK_MONOTONIC failed");
                self.send(&[NotifyState::Reloading]);
            }
        }
    }

    /// STOPPING=1.
    pub fn stopping(&self) {
        self.send(&[
            NotifyState::Stopping,
            NotifyState::Status("stopping: restoring devices"),
        ]);
    }

    /// WATCHDOG=1.
    pub fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }

    /// How often to send WATCHDOG=1: half of WatchdogSec, when the service
    /// manager asked for it (WATCHDOG_USEC, for this process).
    pub fn watchdog_interval(&self) -> Option<Duration> {
        let mut usec = 0;
        (self.enabled && sd_notify::watchdog_enabled(false, &mut usec))
            .then(|| Duration::from_micros(usec / 2).max(Duration::from_millis(1)))
    }
}
