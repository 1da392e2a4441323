//! The engine's tunables: [`IntxOptions`] and the [`RetryPolicy`] of its
//! config accesses and resets.

use std::time::Duration;

use super::WatchdogOptions;

/// How retries of transient backend errors (EAGAIN, EBUSY) are bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub attempts: u32,
    /// Sleep before the second attempt; doubled each time.
    pub first_backoff: Duration,
    /// Upper bound of one sleep.
    pub max_backoff: Duration,
    /// Upper bound of the time spent retrying, if any: no attempt starts
    /// after it has passed.
    pub total: Option<Duration>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 6,
            first_backoff: Duration::from_micros(200),
            max_backoff: Duration::from_millis(20),
            total: None,
        }
    }
}

/// Tunables of one engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct IntxOptions {
    /// Retries of transient errors of config accesses.
    pub retry: RetryPolicy,
    /// Retries of a reset the kernel answers EAGAIN/EBUSY while another
    /// reset holds the device ([`RetryPolicy::reset_default`]).
    pub reset_retry: RetryPolicy,
    /// How many times in a row the interrupt path re-kicks itself after a
    /// failure before it gives up until the next event.
    pub interrupt_path_retries: u32,
    /// The stuck-INTx watchdog.
    pub watchdog: WatchdogOptions,
}

impl Default for IntxOptions {
    fn default() -> Self {
        Self {
            retry: RetryPolicy::default(),
            reset_retry: RetryPolicy::reset_default(),
            interrupt_path_retries: 8,
            watchdog: WatchdogOptions::default(),
        }
    }
}

with_setters!(RetryPolicy {
    attempts: u32 => with_attempts,
    first_backoff: Duration => with_first_backoff,
    max_backoff: Duration => with_max_backoff,
    total: Option<Duration> => with_total,
});

with_setters!(IntxOptions {
    retry: RetryPolicy => with_retry,
    reset_retry: RetryPolicy => with_reset_retry,
    interrupt_path_retries: u32 => with_interrupt_path_retries,
    watchdog: WatchdogOptions => with_watchdog,
});
