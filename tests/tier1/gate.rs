//! The config-access gate's promises, with real threads. The exhaustive
//! interleavings are checked by the loom model in tests/loom_gate.rs.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use vfio_intx::gate::ConfigGate;

fn counting_gate() -> (Arc<ConfigGate<u64>>, Arc<AtomicU64>) {
    let kicks = Arc::new(AtomicU64::new(0));
    let k = Arc::clone(&kicks);
    let gate = Arc::new(ConfigGate::new(
        0u64,
        Box::new(move || {
            k.fetch_add(1, Ordering::SeqCst);
        }),
    ));
    (gate, kicks)
}

#[test]
fn parallel_blockers_serialize_instead_of_interleaving() {
    let (gate, _) = counting_gate();
    let inside = AtomicUsize::new(0);
    thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                for _ in 0..200 {
                    let mut g = gate.block();
                    assert!(g.is_block());
                    assert_eq!(
                        inside.fetch_add(1, Ordering::SeqCst),
                        0,
                        "two blockers inside"
                    );
                    *g += 1;
                    thread::yield_now();
                    inside.fetch_sub(1, Ordering::SeqCst);
                }
            });
        }
    });
    assert_eq!(*gate.access(), 1600);
    assert!(!gate.is_blocked());
}

#[test]
fn accesses_wait_while_a_blocker_holds_the_device() {
    let (gate, _) = counting_gate();
    let released = AtomicBool::new(false);
    let held = Barrier::new(2);
    thread::scope(|s| {
        s.spawn(|| {
            let _g = gate.block();
            held.wait();
            thread::sleep(Duration::from_millis(50));
            released.store(true, Ordering::SeqCst);
        });
        held.wait();
        assert!(gate.is_blocked());
        let _g = gate.access();
        assert!(
            released.load(Ordering::SeqCst),
            "access got in during the block"
        );
    });
}

#[test]
fn try_access_defers_behind_a_blocker_and_the_kick_follows_the_release() {
    let (gate, kicks) = counting_gate();
    let g = gate.block();
    assert!(gate.try_access().is_none());
    assert!(gate.try_access().is_none());
    assert_eq!(kicks.load(Ordering::SeqCst), 0, "no kick while held");
    assert_eq!(gate.deferrals(), 2);
    drop(g);
    assert_eq!(
        kicks.load(Ordering::SeqCst),
        1,
        "one kick covers both deferrals"
    );
    let t = gate.try_access().expect("free gate");
    drop(t);
    assert_eq!(
        kicks.load(Ordering::SeqCst),
        1,
        "no kick without a deferral"
    );
}

#[test]
fn try_access_never_sleeps_even_behind_a_long_reset() {
    let (gate, _) = counting_gate();
    let held = Barrier::new(2);
    thread::scope(|s| {
        s.spawn(|| {
            let _g = gate.block();
            held.wait();
            thread::sleep(Duration::from_millis(200));
        });
        held.wait();
        let start = std::time::Instant::now();
        for _ in 0..1000 {
            assert!(gate.try_access().is_none());
        }
        assert!(start.elapsed() < Duration::from_millis(150));
    });
}

#[test]
fn an_accessor_behind_a_stream_of_resets_gets_in_between_them() {
    let (gate, _) = counting_gate();
    let stop = AtomicBool::new(false);
    thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                while !stop.load(Ordering::SeqCst) {
                    let mut g = gate.block();
                    *g += 1;
                    thread::sleep(Duration::from_micros(200));
                }
            });
        }
        thread::sleep(Duration::from_millis(5));
        for _ in 0..50 {
            let before = *gate.access();
            let after = *gate.access();
            // FIFO: at most the four blockers already queued get in between.
            assert!(
                after - before <= 4,
                "{} resets overtook the access",
                after - before
            );
        }
        stop.store(true, Ordering::SeqCst);
    });
}

#[test]
fn a_holder_that_panics_does_not_leave_the_device_blocked() {
    let (gate, kicks) = counting_gate();
    let r = catch_unwind(AssertUnwindSafe(|| {
        let mut g = gate.block();
        *g = 7;
        assert!(gate.try_access().is_none());
        panic!("reset path failed");
    }));
    assert!(r.is_err());
    assert!(!gate.is_blocked());
    assert_eq!(
        kicks.load(Ordering::SeqCst),
        1,
        "deferred work still kicked"
    );
    assert_eq!(*gate.access(), 7);
    assert!(gate.try_access().is_some());
}
