//! A device's health policy — interrupt storms, interrupts left without an
//! EOI, operator holds — as one synchronous, sans-IO state machine: events
//! in ([`Event`]), actions out ([`Action`]). No tokio, no sockets, no device
//! access, no clock of its own: the device's task (`task.rs`) feeds it the
//! engine's counts and the time, and carries out what it returns (masking,
//! re-syncing, treating an interrupt as EOIed), so the policy is tested
//! below without any of that. (The model is ntpd-rs's `ntp-proto`.)
//!
//! "Mask" and "unmask" are the engine's own hold
//! ([`IntxDevice::hold`](crate::intx::IntxDevice::hold) and `release`), so
//! nothing masks the line behind the state machine's back.

use std::time::{Duration, Instant};

use crate::intx::IntxStats;

/// Storm detection window: short, so that a storm costs at most this much
/// of the daemon's time before it is masked (and per retry).
pub(crate) const STORM_WINDOW: Duration = Duration::from_millis(20);
/// A storm within this long after the previous one's back-off counts as
/// the same storm going on (the back-off doubles).
pub(crate) const STORM_MEMORY: Duration = Duration::from_secs(2);
/// Upper bound of the storm back-off.
pub(crate) const STORM_MAX_BACKOFF: Duration = Duration::from_secs(60);

/// The device's settings the policy uses.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HealthConfig {
    /// Unhandled interrupts per second that make a storm; 0 = off.
    pub(crate) storm_threshold: u32,
    /// First back-off after a storm (doubles while storms go on).
    pub(crate) storm_backoff: Duration,
    /// In service this long with no EOI: recovered; zero = off.
    pub(crate) eoi_timeout: Duration,
}

/// The counts storm detection compares between windows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct StormCounts {
    /// Re-injections: an EOI found the device still asserting.
    pub(crate) reinjected: u64,
    /// Host interrupts the device did not assert (a shared line).
    pub(crate) not_mine: u64,
    /// EOIs that found the line deasserted: someone handled the device.
    pub(crate) cleared: u64,
}

impl StormCounts {
    /// The counts in the engine's statistics.
    pub(crate) fn of(s: &IntxStats) -> Self {
        Self {
            reinjected: s.reinjected,
            not_mine: s.not_mine,
            cleared: s.eois.saturating_sub(s.reinjected + s.spurious_eois),
        }
    }
}

/// What happened to the device.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Event {
    /// The task serviced a host interrupt or a guest EOI; the engine's
    /// counts after it.
    Serviced {
        /// When.
        now: Instant,
        /// The engine's counts.
        counts: StormCounts,
        /// Whether a session runs on the kernel bypass.
        bypass: bool,
    },
    /// The operator asks for the line to be held masked.
    Hold {
        /// When.
        now: Instant,
        /// Whether a session runs on the kernel bypass.
        bypass: bool,
    },
    /// The operator lifts the hold.
    Release {
        /// When.
        now: Instant,
        /// The engine's counts.
        counts: StormCounts,
    },
    /// A storm's back-off ran out (at [`Health::storm_retry_at`]).
    StormRetry {
        /// When.
        now: Instant,
        /// The engine's counts.
        counts: StormCounts,
    },
    /// A watchdog tick.
    Tick {
        /// When.
        now: Instant,
        /// Since when an interrupt injected into a user-space session waits
        /// for its EOI (`None`: nothing in service, no session, or the
        /// kernel bypass, where the kernel takes the EOIs).
        in_service_since: Option<Instant>,
    },
}

/// What the task must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// Mask the line and stop servicing it until [`Action::Unmask`].
    Mask,
    /// Lift the mask (re-derive it from the state machine and STATUS) and
    /// resume servicing; the line was held masked for `held`.
    Unmask {
        /// How long the line was held.
        held: Duration,
        /// Whether a storm's back-off ran out (rather than the operator).
        after_storm: bool,
    },
    /// A storm was detected (count it, report it); a [`Action::Mask`]
    /// follows unless the line is held already.
    StormDetected {
        /// When the line is retried.
        backoff: Duration,
        /// Storms in a row.
        storms: u32,
    },
    /// The interrupt in service waited `waited` for an EOI: count it,
    /// report it and handle it as EOIed.
    EoiTimeout {
        /// How long it waited.
        waited: Duration,
    },
    /// Look again at `at` (an EOI timeout falls due).
    CheckAt(Instant),
    /// Refused: the operation is not possible now.
    Refuse(&'static str),
}

/// Why the line is held masked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Held {
    /// The operator's `mask`.
    Operator,
    /// A storm, until its back-off runs out.
    Storm,
}

impl Held {
    /// The engine's hold reason ([`IntxDevice::hold`](crate::intx::IntxDevice::hold)),
    /// as `status` shows it.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Held::Operator => "operator",
            Held::Storm => "storm",
        }
    }
}

/// The policy's state for one device.
#[derive(Debug)]
pub(crate) struct Health {
    config: HealthConfig,
    window_start: Instant,
    base: StormCounts,
    consecutive: u32,
    /// When the last storm was masked and its back-off.
    last_storm: Option<(Instant, Duration)>,
    retry_at: Option<Instant>,
    operator: bool,
    storm: bool,
    /// Since when the line is masked by the policy.
    held_since: Option<Instant>,
}

/// Why a hold on the kernel bypass is refused.
pub(crate) const HOLD_ON_BYPASS: &str =
    "cannot hold INTx masked while a session runs on the kernel bypass (the kernel unmasks at \
     each EOI); configure path = \"userspace\" to hold it";

impl Health {
    /// A device in good health at `now`.
    pub(crate) fn new(config: HealthConfig, now: Instant) -> Self {
        Self {
            config,
            window_start: now,
            base: StormCounts::default(),
            consecutive: 0,
            last_storm: None,
            retry_at: None,
            operator: false,
            storm: false,
            held_since: None,
        }
    }

    /// Whether the line is held masked: the task services nothing.
    pub(crate) fn holding(&self) -> bool {
        self.held_since.is_some()
    }

    /// Why the line is held, as `status` reports it.
    pub(crate) fn held(&self) -> Option<Held> {
        match (self.operator, self.storm) {
            (true, _) => Some(Held::Operator),
            (false, true) => Some(Held::Storm),
            _ => None,
        }
    }

    /// When a storm's back-off runs out.
    pub(crate) fn storm_retry_at(&self) -> Option<Instant> {
        self.retry_at
    }

    /// Takes one event; returns what to do, in order.
    pub(crate) fn on(&mut self, event: Event) -> Vec<Action> {
        match event {
            Event::Serviced {
                now,
                counts,
                bypass,
            } => self.serviced(now, counts, bypass),
            Event::Hold { now, bypass } => {
                if self.holding() {
                    self.operator = true;
                    return Vec::new();
                }
                if bypass {
                    return vec![Action::Refuse(HOLD_ON_BYPASS)];
                }
                self.operator = true;
                self.held_since = Some(now);
                vec![Action::Mask]
            }
            Event::Release { now, counts } => {
                self.operator = false;
                if self.storm {
                    return Vec::new();
                }
                self.unhold(now, counts, false)
            }
            Event::StormRetry { now, counts } => {
                self.retry_at = None;
                self.storm = false;
                if self.operator {
                    return Vec::new();
                }
                self.unhold(now, counts, true)
            }
            Event::Tick {
                now,
                in_service_since,
            } => {
                let timeout = self.config.eoi_timeout;
                match in_service_since {
                    Some(since) if !timeout.is_zero() => {
                        let waited = now.saturating_duration_since(since);
                        if waited >= timeout {
                            vec![Action::EoiTimeout { waited }]
                        } else {
                            vec![Action::CheckAt(now + (timeout - waited))]
                        }
                    }
                    _ => Vec::new(),
                }
            }
        }
    }

    fn unhold(&mut self, now: Instant, counts: StormCounts, after_storm: bool) -> Vec<Action> {
        let Some(since) = self.held_since.take() else {
            return Vec::new();
        };
        self.window_start = now;
        self.base = counts;
        vec![Action::Unmask {
            held: now.saturating_duration_since(since),
            after_storm,
        }]
    }

    fn serviced(&mut self, now: Instant, counts: StormCounts, bypass: bool) -> Vec<Action> {
        let threshold = self.config.storm_threshold;
        if threshold == 0 {
            return Vec::new();
        }
        let window_ms = u64::try_from(STORM_WINDOW.as_millis()).unwrap_or(u64::MAX);
        let limit = (u64::from(threshold) * window_ms / 1000).max(1);
        if now.saturating_duration_since(self.window_start) >= STORM_WINDOW {
            self.window_start = now;
            self.base = counts;
            return Vec::new();
        }
        // The kernel's "nobody cared", in this engine's terms: host
        // interrupts nobody claims on a shared line, or a line that
        // re-asserts after every EOI of the window with none finding it
        // handled (a fast device whose guest does handle it clears the
        // line between interrupts, and is not a storm).
        let base = self.base;
        let not_mine = counts.not_mine.saturating_sub(base.not_mine);
        let reinjected = counts.reinjected.saturating_sub(base.reinjected);
        let cleared = counts.cleared.saturating_sub(base.cleared);
        if !(not_mine > limit || (reinjected > limit && cleared == 0)) {
            return Vec::new();
        }
        let going_on = self.last_storm.is_some_and(|(at, backoff)| {
            now.saturating_duration_since(at) < backoff + STORM_MEMORY
        });
        if !going_on {
            self.consecutive = 0;
        }
        let backoff = self
            .config
            .storm_backoff
            .saturating_mul(1 << self.consecutive.min(16))
            .min(STORM_MAX_BACKOFF);
        self.consecutive += 1;
        self.last_storm = Some((now, backoff));
        self.storm = true;
        self.retry_at = Some(now + backoff);
        let mut actions = vec![Action::StormDetected {
            backoff,
            storms: self.consecutive,
        }];
        if self.holding() {
            return actions;
        }
        if bypass {
            actions.push(Action::Refuse(HOLD_ON_BYPASS));
            return actions;
        }
        self.held_since = Some(now);
        actions.push(Action::Mask);
        actions
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn health(threshold: u32) -> (Health, Instant) {
        let t0 = Instant::now();
        let config = HealthConfig {
            storm_threshold: threshold,
            storm_backoff: 100 * MS,
            eoi_timeout: 50 * MS,
        };
        (Health::new(config, t0), t0)
    }

    fn reinjected(n: u64) -> StormCounts {
        StormCounts {
            reinjected: n,
            ..StormCounts::default()
        }
    }

    fn serviced(h: &mut Health, now: Instant, counts: StormCounts) -> Vec<Action> {
        h.on(Event::Serviced {
            now,
            counts,
            bypass: false,
        })
    }

    #[test]
    fn a_line_reasserting_after_every_eoi_is_masked_and_retried_after_a_doubling_backoff() {
        // 1000/s over a 20 ms window: more than 20 re-injections is a storm.
        let (mut h, t0) = health(1000);
        assert!(serviced(&mut h, t0 + 20 * MS, reinjected(0)).is_empty());
        assert!(serviced(&mut h, t0 + 25 * MS, reinjected(20)).is_empty());
        let a = serviced(&mut h, t0 + 30 * MS, reinjected(21));
        assert_eq!(
            a,
            vec![
                Action::StormDetected {
                    backoff: 100 * MS,
                    storms: 1
                },
                Action::Mask
            ]
        );
        assert!(h.holding());
        assert_eq!(h.held(), Some(Held::Storm));
        assert_eq!(h.storm_retry_at(), Some(t0 + 130 * MS));
        let a = h.on(Event::StormRetry {
            now: t0 + 130 * MS,
            counts: reinjected(21),
        });
        assert_eq!(
            a,
            vec![Action::Unmask {
                held: 100 * MS,
                after_storm: true
            }]
        );
        assert_eq!(h.held(), None);
        // It goes on: the second back-off doubles.
        let a = serviced(&mut h, t0 + 140 * MS, reinjected(50));
        assert_eq!(
            a.first(),
            Some(&Action::StormDetected {
                backoff: 200 * MS,
                storms: 2
            })
        );
    }

    #[test]
    fn a_busy_device_whose_guest_clears_the_line_is_not_a_storm() {
        let (mut h, t0) = health(1000);
        serviced(&mut h, t0 + 20 * MS, StormCounts::default());
        let busy = StormCounts {
            reinjected: 100,
            cleared: 1,
            not_mine: 0,
        };
        assert!(serviced(&mut h, t0 + 30 * MS, busy).is_empty());
        assert!(!h.holding());
    }

    #[test]
    fn storm_detection_off_at_threshold_zero() {
        let (mut h, t0) = health(0);
        assert!(serviced(&mut h, t0 + MS, reinjected(1_000_000)).is_empty());
    }

    #[test]
    fn an_operator_hold_outlasts_a_storm_and_a_storm_outlasts_a_release() {
        let (mut h, t0) = health(1000);
        let hold = h.on(Event::Hold {
            now: t0,
            bypass: false,
        });
        assert_eq!(hold, vec![Action::Mask]);
        assert_eq!(h.held(), Some(Held::Operator));
        // The storm's retry does not lift the operator's hold.
        serviced(&mut h, t0 + 20 * MS, reinjected(0));
        let a = serviced(&mut h, t0 + 25 * MS, reinjected(50));
        assert_eq!(a.len(), 1, "{a:?}");
        assert!(h
            .on(Event::StormRetry {
                now: t0 + 200 * MS,
                counts: reinjected(50)
            })
            .is_empty());
        assert!(h.holding());
        // The release does.
        let a = h.on(Event::Release {
            now: t0 + 300 * MS,
            counts: reinjected(50),
        });
        assert_eq!(
            a,
            vec![Action::Unmask {
                held: 300 * MS,
                after_storm: false
            }]
        );
        // A storm held line: the operator's release leaves it to the retry.
        serviced(&mut h, t0 + 320 * MS, reinjected(50));
        let a = serviced(&mut h, t0 + 330 * MS, reinjected(100));
        assert!(a.contains(&Action::Mask), "{a:?}");
        assert!(h
            .on(Event::Release {
                now: t0 + 340 * MS,
                counts: reinjected(100)
            })
            .is_empty());
        assert!(h.holding());
    }

    #[test]
    fn no_hold_on_the_kernel_bypass() {
        let (mut h, t0) = health(1000);
        assert_eq!(
            h.on(Event::Hold {
                now: t0,
                bypass: true
            }),
            vec![Action::Refuse(HOLD_ON_BYPASS)]
        );
        assert!(!h.holding());
        assert_eq!(h.held(), None);
    }

    #[test]
    fn an_interrupt_waiting_past_the_eoi_timeout_is_recovered() {
        let (mut h, t0) = health(1000);
        assert_eq!(
            h.on(Event::Tick {
                now: t0 + 20 * MS,
                in_service_since: Some(t0)
            }),
            vec![Action::CheckAt(t0 + 50 * MS)]
        );
        assert_eq!(
            h.on(Event::Tick {
                now: t0 + 60 * MS,
                in_service_since: Some(t0)
            }),
            vec![Action::EoiTimeout { waited: 60 * MS }]
        );
        assert!(h
            .on(Event::Tick {
                now: t0 + 60 * MS,
                in_service_since: None
            })
            .is_empty());
    }
}
