//! The node_exporter textfile writer: every interval, the metrics text is
//! rendered on the runtime (a snapshot) and written on the blocking pool to
//! a temporary file in the same directory, made 0644 and renamed over the
//! target, so node_exporter never reads half a file. The temporary name
//! does not end in `.prom`: the collector ignores it. A slow filesystem
//! delays the next write, never the runtime; a failed write is counted and
//! logged rate limited, never fatal. Stopping removes the file.

use std::io::{self, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tracing::{info, warn};

use super::exporter::ExporterEvent;
use crate::daemon::registry::Daemon;

/// Serializes writes and the removal at stop; `true` once stopped.
type Stopped = Arc<Mutex<bool>>;

/// A running textfile writer.
pub(crate) struct Writer {
    path: PathBuf,
    interval: Duration,
    stopped: Stopped,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    /// Starts writing `path` every `interval` (the first write at once).
    pub(crate) fn start(daemon: Arc<Daemon>, path: PathBuf, interval: Duration) -> Self {
        info!(path = %path.display(), ?interval, "metrics textfile: writing");
        let stopped: Stopped = Arc::default();
        let task = tokio::spawn(run(daemon, path.clone(), interval, Arc::clone(&stopped)));
        Self {
            path,
            interval,
            stopped,
            task,
        }
    }

    /// The file.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// How often it is written.
    pub(crate) fn interval(&self) -> Duration {
        self.interval
    }

    /// Stops writing and removes the file (waiting at most a second for a
    /// filesystem that does not answer).
    pub(crate) async fn stop(self) {
        self.task.abort();
        let path = self.path.clone();
        let stopped = self.stopped;
        let removal = tokio::task::spawn_blocking(move || {
            // A write under way finishes (or is abandoned) first.
            *stopped.lock().unwrap_or_else(PoisonError::into_inner) = true;
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        });
        match tokio::time::timeout(Duration::from_secs(1), removal).await {
            Ok(Ok(Ok(()))) => info!(path = %self.path.display(), "metrics textfile: removed"),
            Ok(Ok(Err(e))) => {
                warn!(path = %self.path.display(), error = %e, "metrics textfile: removing it failed")
            }
            Ok(Err(e)) => {
                warn!(path = %self.path.display(), error = %e, "metrics textfile: removing it failed")
            }
            Err(_) => warn!(
                path = %self.path.display(),
                "metrics textfile: removing it did not finish within a second"
            ),
        }
    }
}

async fn run(daemon: Arc<Daemon>, path: PathBuf, interval: Duration, stopped: Stopped) {
    let mut timer = tokio::time::interval(interval);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        timer.tick().await;
        let text = super::render(&daemon);
        let target = path.clone();
        let stopped = Arc::clone(&stopped);
        let written = tokio::task::spawn_blocking(move || {
            let stopped = stopped.lock().unwrap_or_else(PoisonError::into_inner);
            if *stopped {
                return Ok(());
            }
            write_atomically(&target, text.as_bytes())
        })
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)));
        if let Err(e) = written {
            if let Some(suppressed) = daemon.exporter_events.note(ExporterEvent::TextfileError) {
                warn!(path = %path.display(), error = %e, suppressed, "metrics textfile: writing it failed");
            }
        }
    }
}

/// Writes `bytes` to a temporary file beside `path`, mode 0644, and renames
/// it over `path`.
fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&tmp)?;
        // Whatever the umask: node_exporter runs as another user.
        f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        f.write_all(bytes)?;
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_replaces_the_file_whole_with_mode_0644_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.prom");
        std::fs::write(&path, "old").unwrap();
        write_atomically(&path, b"new\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).ok().as_deref(),
            Some("new\n")
        );
        let mode = std::fs::metadata(&path).map(|m| m.permissions().mode() & 0o777);
        assert_eq!(mode.ok(), Some(0o644));
        assert_eq!(
            std::fs::read_dir(dir.path()).map(Iterator::count).ok(),
            Some(1)
        );
    }

    #[test]
    fn a_missing_directory_is_an_error_not_a_panic() {
        let e = write_atomically(Path::new("/nonexistent-vfio-intx/x.prom"), b"x");
        assert_eq!(e.map_err(|e| e.kind()).err(), Some(io::ErrorKind::NotFound));
    }
}
