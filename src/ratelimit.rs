//! Rate limiting of log messages a guest or a client can trigger
//! repeatedly: at most a burst per window, with a count of the rest.

use std::time::{Duration, Instant};

/// Admits at most `burst` messages per `window` and counts the others.
#[derive(Debug)]
pub(crate) struct LogLimiter {
    window: Duration,
    burst: u32,
    start: Instant,
    seen: u32,
}

impl LogLimiter {
    pub(crate) fn new(window: Duration, burst: u32) -> Self {
        Self {
            window,
            burst,
            start: Instant::now(),
            seen: 0,
        }
    }

    /// Whether to log this one; `Some(n)` with the number suppressed since
    /// the previous window.
    pub(crate) fn admit(&mut self) -> Option<u32> {
        let now = Instant::now();
        if now.duration_since(self.start) >= self.window {
            let suppressed = self.seen.saturating_sub(self.burst);
            self.start = now;
            self.seen = 1;
            return Some(suppressed);
        }
        self.seen += 1;
        (self.seen <= self.burst).then_some(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_a_burst_then_counts_the_rest() {
        let mut l = LogLimiter::new(Duration::from_secs(3600), 2);
        assert_eq!(l.admit(), Some(0));
        assert_eq!(l.admit(), Some(0));
        assert_eq!(l.admit(), None);
        assert_eq!(l.admit(), None);
        let mut l = LogLimiter::new(Duration::ZERO, 2);
        assert_eq!(l.admit(), Some(0));
    }
}
