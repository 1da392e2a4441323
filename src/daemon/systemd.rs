//! systemd service notification (`sd_notify`): READY=1 once every device is
//! armed, STATUS= lines, WATCHDOG=1 at half of WatchdogSec, RELOADING=1 with
//! MONOTONIC_USEC around a reload, STOPPING=1 at shutdown. Without
//! `NOTIFY_SOCKET` every call is a no-op.
//!
//! [`stderr_is_journal`] tells whether systemd connected stderr to the
//! journal, so that logs go to journald with their fields.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

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

/// How long READY=1, RELOADING=1 and STOPPING=1 wait for room in a full
/// notify socket before they are dropped.
const LIFECYCLE_PATIENCE: Duration = Duration::from_millis(100);

/// One datagram to `NOTIFY_SOCKET` (a path, or `@name` in the abstract
/// namespace), sent with MSG_DONTWAIT semantics: `WouldBlock` while the
/// receiver's queue is full.
fn send_nonblocking(msg: &[u8]) -> std::io::Result<()> {
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(());
    };
    let addr = match path.as_encoded_bytes().strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name)?
        }
        None => SocketAddr::from_pathname(&path)?,
    };
    let sock = UnixDatagram::unbound()?;
    sock.set_nonblocking(true)?;
    sock.connect_addr(&addr)?;
    let sent = sock.send(msg)?;
    if sent == msg.len() {
        Ok(())
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::WriteZero,
            "incomplete notification",
        ))
    }
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

    /// Sends one notification without ever blocking the caller (the
    /// runtime's thread): a manager that stops reading fills its socket's
    /// queue (`net.unix.max_dgram_qlen`, 10 by default), and a blocking
    /// send would then freeze every device and the control socket. STATUS=
    /// and WATCHDOG=1 are dropped while the queue is full (the next one
    /// carries the news); the lifecycle states are retried for up to
    /// [`LIFECYCLE_PATIENCE`] first.
    fn send(&self, states: &[NotifyState<'_>]) {
        if !self.enabled {
            return;
        }
        let mut msg = String::new();
        for state in states {
            msg.push_str(&state.to_string());
            msg.push('\n');
        }
        let lifecycle = states.iter().any(|s| {
            matches!(
                s,
                NotifyState::Ready | NotifyState::Reloading | NotifyState::Stopping
            )
        });
        static WARNED: AtomicBool = AtomicBool::new(false);
        static DROPPED: AtomicU64 = AtomicU64::new(0);
        let deadline = Instant::now() + LIFECYCLE_PATIENCE;
        loop {
            match send_nonblocking(msg.as_bytes()) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if lifecycle && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                    let dropped = DROPPED.fetch_add(1, Ordering::Relaxed) + 1;
                    if dropped == 1 || dropped % 64 == 0 {
                        warn!(dropped, lifecycle, "the service manager is not reading its notify socket; notification dropped");
                    }
                    return;
                }
                Err(e) => {
                    // Once: a manager that went away does not come back.
                    if !WARNED.swap(true, Ordering::Relaxed) {
                        warn!(error = %e, "notifying the service manager failed");
                    }
                    return;
                }
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
