//! Saying what a slow step is doing: a person should never stare at a
//! silent terminal while a reset waits behind another one or an unbind
//! waits for the device's user.

use std::sync::mpsc;
use std::time::Duration;

/// How long a step may run silently (1 s).
pub const SLOW: Duration = Duration::from_secs(1);

/// Runs `step` on this thread; if it is still running after `after`,
/// `say` runs once (on a watcher thread) to tell what it is waiting for.
/// Nothing is said for a step that finishes in time, and the watcher is
/// gone when this returns. If the watcher thread cannot start, the step
/// runs anyway, silently.
pub fn after_slow<T>(after: Duration, say: impl FnOnce() + Send, step: impl FnOnce() -> T) -> T {
    let (done, wait) = mpsc::channel::<()>();
    std::thread::scope(|s| {
        let watcher = std::thread::Builder::new()
            .name("progress".into())
            .spawn_scoped(s, move || {
                if let Err(mpsc::RecvTimeoutError::Timeout) = wait.recv_timeout(after) {
                    say();
                }
            });
        if watcher.is_err() {
            tracing::debug!("could not start the progress watcher thread");
        }
        let result = step();
        // Wakes the watcher (Disconnected) if it still waits.
        drop(done);
        result
    })
}

/// [`after_slow`] with [`SLOW`], saying `line` on stderr (never stdout,
/// which `--json` output owns).
pub fn stderr_after_slow<T>(line: impl FnOnce() -> String + Send, step: impl FnOnce() -> T) -> T {
    after_slow(SLOW, move || eprintln!("{}", line()), step)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    #[test]
    fn a_slow_step_is_told_once_and_a_quick_one_never() {
        let said = AtomicUsize::new(0);
        let got = after_slow(
            Duration::from_millis(50),
            || {
                said.fetch_add(1, Ordering::SeqCst);
            },
            || {
                std::thread::sleep(Duration::from_millis(300));
                7
            },
        );
        assert_eq!(got, 7);
        assert_eq!(said.load(Ordering::SeqCst), 1, "a slow step is told once");

        let quiet = AtomicUsize::new(0);
        let start = Instant::now();
        after_slow(
            Duration::from_millis(200),
            || {
                quiet.fetch_add(1, Ordering::SeqCst);
            },
            || (),
        );
        // The watcher left as soon as the step ended, not at the threshold.
        assert!(
            start.elapsed() < Duration::from_millis(150),
            "{:?}",
            start.elapsed()
        );
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(quiet.load(Ordering::SeqCst), 0, "a quick step is not told");
    }
}
