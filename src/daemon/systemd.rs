//! systemd service notification (`sd_notify`): READY=1 once every device is
//! armed, STATUS= lines, WATCHDOG=1 at half of WatchdogSec, RELOADING=1 with
//! MONOTONIC_USEC around a reload, STOPPING=1 at shutdown. Without
//! `NOTIFY_SOCKET` every call is a no-op.
//!
//! [`stderr_is_journal`] tells whether systemd connected stderr to the
//! journal, so that logs go to journald with their fields.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sd_notify::NotifyState;
use tracing::{debug, warn};

/// Whether stderr is the stream systemd connected to the journal: the
/// service manager sets `JOURNAL_STREAM` to its `DEVICE:INODE`, and a
/// process that inherited the variable with stderr redirected elsewhere
/// (a shell, a pipe to a file) must keep writing to stderr.
#[cfg(feature = "cli")]
pub fn stderr_is_journal() -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some(value) = value.to_str() else {
        return false;
    };
    let stat = std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .map(std::fs::File::from)
        .and_then(|f| f.metadata());
    match stat {
        Ok(m) => journal_stream_is(value, m.dev(), m.ino()),
        Err(_) => false,
    }
}

/// Whether a `JOURNAL_STREAM` value names the file `dev`, `ino`.
#[cfg(any(feature = "cli", test))]
fn journal_stream_is(value: &str, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = value.trim().split_once(':') else {
        return false;
    };
    d.parse() == Ok(dev) && i.parse() == Ok(ino)
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_journal_stream_is_the_file_it_names() {
        assert!(journal_stream_is("8:2617", 8, 2617));
        assert!(journal_stream_is("8:2617\n", 8, 2617));
        // Another file (stderr redirected after systemd set the variable).
        assert!(!journal_stream_is("8:2617", 8, 2618));
        assert!(!journal_stream_is("9:2617", 8, 2617));
        // Malformed values are not the journal.
        assert!(!journal_stream_is("", 8, 2617));
        assert!(!journal_stream_is("8-2617", 8, 2617));
        assert!(!journal_stream_is("8:", 8, 2617));
        assert!(!journal_stream_is("x:2617", 8, 2617));
    }
}
