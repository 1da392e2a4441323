//! Model checks of the config-access gate with loom.
//!
//! Run with `scripts/loom.sh`, i.e.
//! `RUSTFLAGS="--cfg loom" cargo test --release --test loom_gate --target-dir target/loom`.
//! Under `--cfg loom` the gate's atomics, fences, mutexes and condvar are
//! loom's (see `src/sync.rs`), so loom explores the interleavings of the
//! gate's own protocol, not just of the test around it.
//!
//! # What is checked
//!
//! - **Mutual exclusion**: every holder (block, access, try-access, and the
//!   worker the kick wakes) increments a separate `inside` counter on entry
//!   and finds it was 0.
//! - **Blocked means blocked**: a blocker sees [`ConfigGate::is_blocked`]
//!   inside its section; an ordinary access never does.
//! - **No deadlock, no lost wake-up**: loom fails the model if threads are
//!   left waiting with nobody to wake them; every thread is joined.
//! - **No lost deferral** (the interrupt path's contract). The try-accessor
//!   behaves like the engine's interrupt path: it records its work first
//!   (`work = true`, the engine's `pending` bits), then tries the gate. If
//!   `try_access` returns `None`, the gate must call the kick *after* the work
//!   was recorded: a kick from before it could wake the worker too early to
//!   see the work. The test checks exactly this ordering. It reads the `kicks`
//!   count after recording the work and before trying the gate, and asserts
//!   that by the end `kicks` went past that value. It then does what the
//!   woken worker does (try the gate again, which nobody holds after the
//!   join, and run the work) and asserts that the work ran exactly once:
//!   either on the spot or after the kick, never lost and never twice.
//!   Spurious kicks (the try-access got in after all) are allowed.
//!
//! # Steering loom to failed try-locks
//!
//! loom 0.7's DPOR reorders threads only at operations that depend on each
//! other, and a thread whose next operation is `try_lock` is parked like a
//! `lock` when another thread takes the mutex (the cause of
//! tokio-rs/loom#376). A try-access therefore only fails in loom if it
//! arrives after a holder got in, which needs a dependency between the
//! try-accessor's previous step and what a holder does inside the gate.
//! The interrupt path reads the `inside` counter just before `try_access`
//! for that reason; without that read loom never explores a deferral. Every
//! model asserts at the end that it explored the outcomes it is about
//! (deferred and not deferred), so the check cannot pass vacuously.
//!
//! # Bounds
//!
//! loom allows five threads including the main one, so the full model (two
//! blockers, one access, one try-access, with the main thread as the kicked
//! worker) is at the limit, and too large to explore without a bound. It
//! runs with a preemption bound of 2 (`FULL_MODEL_PREEMPTIONS`): every
//! interleaving in which the scheduler preempts a runnable thread at most
//! twice. The races this gate can have (a flag set on one side of a
//! release, a wake-up slipping between a check and a sleep) need one or two
//! preemptions to show: with bound 2 the models catch a try-access that does
//! not re-check after recording its deferral, a release that does not wake
//! sleepers, and a `wait_turn` without its fence (a lost wake-up). Bound 2
//! takes about 12 s on two cores (about 120,000 executions, some 13,000 of
//! them with a deferred try-access); bound 3 passes too but takes about 6
//! minutes, too long for every CI run (`LOOM_MAX_PREEMPTIONS=3
//! scripts/loom.sh` runs it). The two smaller models (two blockers; one
//! blocker and one try-access) are explored without a bound.
//! `LOOM_MAX_PREEMPTIONS` overrides the defaults.
//!
//! # Not covered
//!
//! loom does not preempt a thread when it unlocks a mutex, so it cannot
//! show what goes wrong if a guard did its release bookkeeping before
//! unlocking the device (the field order of `GateGuard`); that order is
//! argued in the code, not model-checked. A failed `try_lock` is not a
//! memory access in loom and its mutex is sequentially consistent, so the
//! SeqCst fences of the deferral handshake are needed on real hardware but
//! not in the model; the fences of the turn hand-off are checked.

#![cfg(loom)]

use std::sync::atomic::{AtomicUsize as StdAtomicUsize, Ordering::Relaxed};
use std::sync::Arc as StdArc;

use loom::model::Builder;
use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use loom::sync::Arc;
use loom::thread;
use vfio_intx::gate::ConfigGate;

/// Default preemption bound of the four-thread model; see the module docs.
const FULL_MODEL_PREEMPTIONS: usize = 2;

/// A loom builder with `bound` as the preemption bound unless
/// `LOOM_MAX_PREEMPTIONS` sets one.
fn builder(bound: Option<usize>) -> Builder {
    let mut builder = Builder::new();
    if std::env::var_os("LOOM_MAX_PREEMPTIONS").is_none() {
        builder.preemption_bound = bound;
    }
    builder.max_branches = 100_000;
    builder
}

/// The device behind the gate: counts the critical sections that ran.
#[derive(Debug, Default)]
struct State {
    sections: usize,
}

/// Marks one thread inside the gate for the duration of a critical section.
struct Inside<'a>(&'a AtomicUsize);

impl<'a> Inside<'a> {
    fn enter(counter: &'a AtomicUsize, who: &str) -> Self {
        let before = counter.fetch_add(1, SeqCst);
        assert_eq!(
            before, 0,
            "{who} entered the gate while another holder was inside"
        );
        Inside(counter)
    }
}

impl Drop for Inside<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

/// What the executions of one model did, counted across executions (plain
/// std atomics, outside the model).
#[derive(Debug, Default)]
struct Outcomes {
    executions: StdAtomicUsize,
    deferred: StdAtomicUsize,
    on_the_spot: StdAtomicUsize,
    spurious_kicks: StdAtomicUsize,
}

impl Outcomes {
    fn record(&self, deferred: bool, kicks: usize) {
        self.executions.fetch_add(1, Relaxed);
        if deferred {
            self.deferred.fetch_add(1, Relaxed);
        } else {
            self.on_the_spot.fetch_add(1, Relaxed);
            if kicks > 0 {
                self.spurious_kicks.fetch_add(1, Relaxed);
            }
        }
    }

    /// Fails unless the model explored both a deferred and an immediate
    /// try-access.
    fn assert_explored_both(&self) {
        let (executions, deferred, on_the_spot) = (
            self.executions.load(Relaxed),
            self.deferred.load(Relaxed),
            self.on_the_spot.load(Relaxed),
        );
        assert!(
            deferred > 0 && on_the_spot > 0,
            "the model did not explore both outcomes of try_access: {executions} executions, \
             {deferred} deferred, {on_the_spot} on the spot"
        );
    }
}

/// Everything the threads of one model execution share.
struct Shared {
    gate: ConfigGate<State>,
    inside: AtomicUsize,
    kicks: Arc<AtomicUsize>,
    /// The interrupt path's recorded work (the engine's `pending` bits).
    work: AtomicBool,
    /// How many times the recorded work ran.
    work_runs: AtomicUsize,
}

impl Shared {
    fn new() -> Arc<Self> {
        let kicks = Arc::new(AtomicUsize::new(0));
        let kick = {
            let kicks = Arc::clone(&kicks);
            Box::new(move || {
                kicks.fetch_add(1, SeqCst);
            })
        };
        Arc::new(Shared {
            gate: ConfigGate::new(State::default(), kick),
            inside: AtomicUsize::new(0),
            kicks,
            work: AtomicBool::new(false),
            work_runs: AtomicUsize::new(0),
        })
    }

    fn blocker(&self) {
        let mut dev = self.gate.block();
        let _inside = Inside::enter(&self.inside, "a blocker");
        assert!(dev.is_block());
        assert!(
            self.gate.is_blocked(),
            "a blocker holds the gate but it is not blocked"
        );
        dev.sections += 1;
    }

    fn accessor(&self) {
        let mut dev = self.gate.access();
        let _inside = Inside::enter(&self.inside, "an access");
        assert!(!dev.is_block());
        assert!(
            !self.gate.is_blocked(),
            "an access holds the gate while it is blocked"
        );
        dev.sections += 1;
    }

    /// Runs the recorded work, as the engine's `service` does behind the gate.
    fn run_work(&self, dev: &mut State, who: &str) {
        let _inside = Inside::enter(&self.inside, who);
        if self.work.swap(false, SeqCst) {
            self.work_runs.fetch_add(1, SeqCst);
        }
        dev.sections += 1;
    }

    /// The interrupt path: records its work, then tries the gate. If it is
    /// deferred, returns the kick count read after recording the work.
    fn interrupt_path(&self) -> Option<usize> {
        self.work.store(true, SeqCst);
        let kicks_before = self.kicks.load(SeqCst);
        // A scheduling point that depends on every holder; without it loom
        // never explores a failed try_lock (see the module docs).
        self.inside.load(SeqCst);
        match self.gate.try_access() {
            Some(mut dev) => {
                assert!(!dev.is_block());
                self.run_work(&mut dev, "a try-access");
                None
            }
            None => Some(kicks_before),
        }
    }

    /// After all threads are joined: checks the deferral contract and runs
    /// what the kick woke the worker for. `sections` is the number of
    /// critical sections the other threads ran.
    fn finish(&self, deferred: Option<usize>, sections: usize, outcomes: &Outcomes) {
        let kicks = self.kicks.load(SeqCst);
        match deferred {
            Some(kicks_before) => {
                assert!(
                    kicks > kicks_before,
                    "try_access was deferred but no kick followed the recorded work \
                     (kicks {kicks}, {kicks_before} before the attempt)"
                );
                assert_eq!(self.gate.deferrals(), 1);
            }
            None => assert_eq!(self.gate.deferrals(), 0),
        }
        if kicks > 0 {
            // The woken worker: nobody holds the gate any more, so it gets in.
            let dev = self.gate.try_access();
            assert!(
                dev.is_some(),
                "the gate is busy after every thread was joined"
            );
            if let Some(mut dev) = dev {
                self.run_work(&mut dev, "the kicked worker");
            }
        }
        assert!(
            !self.work.load(SeqCst),
            "the interrupt path's work was lost"
        );
        assert_eq!(
            self.work_runs.load(SeqCst),
            1,
            "the work must run exactly once"
        );
        let ran_on_the_spot = usize::from(deferred.is_none());
        let ran_by_the_worker = usize::from(kicks > 0);
        assert_eq!(
            self.gate.access().sections,
            sections + ran_on_the_spot + ran_by_the_worker
        );
        outcomes.record(deferred.is_some(), kicks);
    }
}

fn spawn(shared: &Arc<Shared>, role: fn(&Shared)) -> thread::JoinHandle<()> {
    let shared = Arc::clone(shared);
    thread::spawn(move || role(&shared))
}

#[test]
fn two_blockers_access_and_try_access_keep_exclusion_and_lose_no_deferral() {
    let outcomes = StdArc::new(Outcomes::default());
    let seen = StdArc::clone(&outcomes);
    builder(Some(FULL_MODEL_PREEMPTIONS)).check(move || {
        let shared = Shared::new();
        let others = [
            spawn(&shared, Shared::blocker),
            spawn(&shared, Shared::blocker),
            spawn(&shared, Shared::accessor),
        ];
        let interrupt = {
            let shared = Arc::clone(&shared);
            thread::spawn(move || shared.interrupt_path())
        };
        for t in others {
            t.join().unwrap();
        }
        let deferred = interrupt.join().unwrap();
        shared.finish(deferred, 3, &seen);
        assert_eq!(shared.gate.blocks(), 2);
    });
    outcomes.assert_explored_both();
}

#[test]
fn two_parallel_blockers_never_overlap_and_both_finish() {
    builder(None).check(|| {
        let shared = Shared::new();
        let blockers = [
            spawn(&shared, Shared::blocker),
            spawn(&shared, Shared::blocker),
        ];
        for t in blockers {
            t.join().unwrap();
        }
        assert_eq!(shared.gate.blocks(), 2);
        assert_eq!(shared.gate.access().sections, 2);
        assert_eq!(shared.kicks.load(SeqCst), 0);
    });
}

#[test]
fn try_access_deferred_by_a_blocker_is_kicked_after_the_block() {
    let outcomes = StdArc::new(Outcomes::default());
    let seen = StdArc::clone(&outcomes);
    builder(None).check(move || {
        let shared = Shared::new();
        let blocker = spawn(&shared, Shared::blocker);
        let deferred = shared.interrupt_path();
        blocker.join().unwrap();
        shared.finish(deferred, 1, &seen);
    });
    outcomes.assert_explored_both();
}
