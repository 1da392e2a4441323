//! Benchmarks of the core: the gate's fast paths, one INTx cycle through the
//! engine, and access latency while resets hammer the gate.
//!
//! Run with `cargo bench --bench core`. The figures are printed, not
//! asserted. Each one is printed next to a floor measured in the same run,
//! because the absolute numbers depend on the machine.
//!
//! Method for the per-operation figures: after a warm-up round, time `ROUNDS`
//! rounds of `N` operations each with `Instant`, and report the median of
//! the per-round ns/op with the 10th and 90th percentiles across rounds.
//! The floor's rounds alternate with the benchmark's, so that both see the
//! same load from the rest of the machine, and the ratio (and, for the INTx
//! cycle, the difference) is taken per round. The latency figures time each
//! access on its own and report percentiles over all samples.

use std::convert::Infallible;
use std::error::Error;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use vfio_intx::backend::PciBackend;
use vfio_intx::gate::ConfigGate;
use vfio_intx::intx::{CallbackSink, IntxDevice};
use vfio_intx::sim::SimDevice;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Rounds per figure; odd, so the median is a sample. Many short rounds
/// (well under a millisecond each) rather than a few long ones, so that
/// most rounds run without being preempted on a busy machine and the
/// median is one of those.
const ROUNDS: usize = 101;

/// A per-round quantity across rounds.
#[derive(Debug, Clone, Copy)]
struct Spread {
    p10: f64,
    median: f64,
    p90: f64,
}

impl Spread {
    fn of(mut values: Vec<f64>) -> Self {
        values.sort_by(f64::total_cmp);
        let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
        Spread {
            p10: at(0.10),
            median: at(0.50),
            p90: at(0.90),
        }
    }

    fn show(&self, unit: &str) -> String {
        format!(
            "median {:>7.1} {unit}   p10 {:>7.1}   p90 {:>7.1}",
            self.median, self.p10, self.p90
        )
    }
}

/// A benchmark and its floor, measured in alternating rounds.
#[derive(Debug, Clone, Copy)]
struct Paired {
    /// ns per operation of the benchmark.
    op: Spread,
    /// ns per operation of the floor.
    floor: Spread,
    /// Per-round benchmark / floor.
    ratio: Spread,
    /// Per-round benchmark - floor, in ns per operation.
    excess: Spread,
}

/// ns per operation of one round of `n` operations.
fn round<E>(n: u64, op: &mut impl FnMut() -> Result<(), E>) -> Result<f64, E> {
    let start = Instant::now();
    for _ in 0..n {
        op()?;
    }
    Ok(start.elapsed().as_nanos() as f64 / n as f64)
}

/// Times `ROUNDS` rounds of `n` operations of `op` and of `floor`, one round
/// of each in turn (after a warm-up round of each), so that both see the
/// same load from the rest of the machine.
fn paired<E>(
    n: u64,
    mut floor: impl FnMut() -> Result<(), E>,
    mut op: impl FnMut() -> Result<(), E>,
) -> Result<Paired, E> {
    round(n, &mut floor)?;
    round(n, &mut op)?;
    let (mut ops, mut floors, mut ratios, mut excesses) = (vec![], vec![], vec![], vec![]);
    for _ in 0..ROUNDS {
        let f = round(n, &mut floor)?;
        let o = round(n, &mut op)?;
        ops.push(o);
        floors.push(f);
        ratios.push(o / f);
        excesses.push(o - f);
    }
    Ok(Paired {
        op: Spread::of(ops),
        floor: Spread::of(floors),
        ratio: Spread::of(ratios),
        excess: Spread::of(excesses),
    })
}

/// [`paired`] for operations that cannot fail.
fn paired_infallible(n: u64, mut floor: impl FnMut(), mut op: impl FnMut()) -> Paired {
    let result = paired::<Infallible>(
        n,
        || {
            floor();
            Ok(())
        },
        || {
            op();
            Ok(())
        },
    );
    match result {
        Ok(paired) => paired,
        Err(never) => match never {},
    }
}

/// "met" or "MISSED" for a median against its target.
fn verdict(value_ns: f64, target_ns: f64) -> &'static str {
    if value_ns <= target_ns {
        "met"
    } else {
        "MISSED"
    }
}

/// Prints a benchmark's line and its floor's line.
fn report(name: &str, floor_name: &str, unit: &str, p: &Paired, target_ns: Option<f64>) {
    println!("{floor_name:<22} {}   (floor)", p.floor.show(unit));
    let target = match target_ns {
        Some(t) => format!("   target <= {t} ns: {}", verdict(p.op.median, t)),
        None => String::new(),
    };
    println!(
        "{name:<22} {}   {:.2}x floor (p10 {:.2}, p90 {:.2}){target}",
        p.op.show(unit),
        p.ratio.median,
        p.ratio.p10,
        p.ratio.p90
    );
}

fn no_kick() -> Box<dyn Fn() + Send + Sync> {
    Box::new(|| {})
}

/// 1 and 2: the gate's uncontended fast paths against a bare mutex.
fn gate_fast_paths() {
    const N: u64 = 20_000;
    let mutex = Mutex::new(0u64);
    let mutex_op = || {
        let guard = mutex.lock().unwrap_or_else(PoisonError::into_inner);
        black_box(&*guard);
    };
    let gate = ConfigGate::new(0u64, no_kick());

    let access = paired_infallible(N, mutex_op, || {
        let guard = gate.access();
        black_box(&*guard);
    });
    report(
        "gate_access",
        "mutex_lock_unlock",
        "ns/op",
        &access,
        Some(50.0),
    );

    let mut missed = 0u64;
    let try_access = paired_infallible(N, mutex_op, || match gate.try_access() {
        Some(guard) => {
            black_box(&*guard);
        }
        None => missed += 1,
    });
    report(
        "gate_try_access",
        "mutex_lock_unlock",
        "ns/op",
        &try_access,
        Some(50.0),
    );
    if missed > 0 {
        println!("  (warning: {missed} uncontended try_access calls found the gate held)");
    }
}

/// 3: one INTx cycle through the engine, against the same backend work done
/// directly on the simulated device.
fn intx_cycle() -> Result<(), Box<dyn Error>> {
    const N: u64 = 1_000;

    // Floor: the backend operations of one cycle, in the engine's order,
    // without the engine: the backend trait's check-and-mask and
    // check-and-unmask (`pci::intx::check_and_mask`/`check_and_unmask` plus
    // the simulated device's fault hook, as the engine calls them). The
    // backend's trigger is registered, so `raise` writes the eventfd as it
    // does under the engine, and the floor reads it back: the cycle's two
    // eventfd syscalls.
    let floor_sim = SimDevice::builder().build();
    let mut backend = floor_sim.backend();
    let trigger = EventFd::new(EFD_NONBLOCK)?;
    backend.intx_enable(&trigger)?;

    let sim = SimDevice::builder().build();
    let dev = IntxDevice::new(sim.backend(), CallbackSink(|| Ok(())))?;
    let before = dev.stats().injected;

    let cycle = paired(
        N,
        || -> Result<(), Box<dyn Error>> {
            floor_sim.raise();
            black_box(trigger.read()?);
            black_box(backend.intx_check_and_mask()?);
            floor_sim.ack();
            black_box(backend.intx_check_and_unmask()?);
            Ok(())
        },
        || -> Result<(), Box<dyn Error>> {
            sim.raise();
            black_box(dev.on_host_interrupt()?);
            sim.ack();
            black_box(dev.on_guest_eoi()?);
            Ok(())
        },
    )?;
    let cycles = N * (ROUNDS as u64 + 1);
    let injected = dev.stats().injected - before;
    if injected != cycles {
        return Err(format!("intx_cycle injected {injected} interrupts in {cycles} cycles").into());
    }
    report("intx_cycle", "intx_cycle_backend", "ns/cycle", &cycle, None);
    println!(
        "{:<22} {}   (per round: intx_cycle - floor)   target <= 1000 ns: {}",
        "  engine overhead",
        cycle.excess.show("ns/cycle"),
        verdict(cycle.excess.median, 1000.0)
    );
    Ok(())
}

/// Access latencies in ns, sorted.
struct Latencies(Vec<u64>);

impl Latencies {
    fn at(&self, q: f64) -> u64 {
        self.0[((self.0.len() - 1) as f64 * q).round() as usize]
    }
    fn max(&self) -> u64 {
        self.0.last().copied().unwrap_or(0)
    }
}

/// Times `samples` accesses, each from the call to the guard in hand. The
/// figure includes reading the clock twice (a few tens of ns).
fn access_latencies(gate: &ConfigGate<u64>, samples: usize) -> Latencies {
    let mut ns = Vec::with_capacity(samples);
    for _ in 0..samples {
        let start = Instant::now();
        let guard = gate.access();
        let waited = start.elapsed();
        black_box(&*guard);
        drop(guard);
        ns.push(u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX));
    }
    ns.sort_unstable();
    Latencies(ns)
}

/// 4: access latency while reset loops keep blocking the gate.
///
/// Each of `RESETTERS` threads loops: block, hold for `HOLD`, release. The
/// hold is a busy wait so that it is `HOLD` and not `HOLD` plus the timer
/// slack of a sleep (50 us by default). Only the holder spins; the threads
/// queued behind it sleep on the gate's condvar, so two cores are enough.
fn access_under_resets() {
    const SAMPLES: usize = 20_000;
    const RESETTERS: usize = 4;
    const HOLD: Duration = Duration::from_micros(30);

    let gate = ConfigGate::new(0u64, no_kick());
    access_latencies(&gate, 1000);
    let floor = access_latencies(&gate, SAMPLES);

    let gate = Arc::new(ConfigGate::new(0u64, no_kick()));
    let stop = Arc::new(AtomicBool::new(false));
    let resetters: Vec<_> = (0..RESETTERS)
        .map(|_| {
            let gate = Arc::clone(&gate);
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                let mut holds = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let mut guard = gate.block();
                    let start = Instant::now();
                    while start.elapsed() < HOLD {
                        std::hint::spin_loop();
                    }
                    *guard += 1;
                    holds.push(start.elapsed());
                }
                holds
            })
        })
        .collect();
    while gate.blocks() < 4 * RESETTERS as u64 {
        thread::yield_now();
    }
    let resets_before = gate.blocks();
    let start = Instant::now();
    let loaded = access_latencies(&gate, SAMPLES);
    let elapsed = start.elapsed();
    let resets = gate.blocks() - resets_before;
    stop.store(true, Ordering::Relaxed);
    let mut holds: Vec<Duration> = resetters
        .into_iter()
        .filter_map(|t| t.join().ok())
        .flatten()
        .collect();
    holds.sort_unstable();
    let hold_p50 = holds.get(holds.len() / 2).copied().unwrap_or_default();

    let us = |ns: u64| ns as f64 / 1000.0;
    println!(
        "{:<22} p50 {:>9.3} us   p99 {:>9.3} us   max {:>9.3} us   (floor, no resets)",
        "access_latency_idle",
        us(floor.at(0.50)),
        us(floor.at(0.99)),
        us(floor.max())
    );
    println!(
        "{:<22} p50 {:>9.3} us   p99 {:>9.3} us   max {:>9.3} us   {:.0}x floor p50 \
         (p50 = {:.1} reset holds)",
        "access_under_resets",
        us(loaded.at(0.50)),
        us(loaded.at(0.99)),
        us(loaded.max()),
        loaded.at(0.50) as f64 / floor.at(0.50).max(1) as f64,
        loaded.at(0.50) as f64 / hold_p50.as_nanos().max(1) as f64
    );
    println!(
        "  {RESETTERS} reset threads, hold p50 {:.1} us; {resets} resets during {SAMPLES} accesses \
         in {:.2} s ({:.2} resets per access)",
        hold_p50.as_secs_f64() * 1e6,
        elapsed.as_secs_f64(),
        resets as f64 / SAMPLES as f64
    );
}

fn main() -> Result<(), Box<dyn Error>> {
    // `cargo bench` passes `--bench`; a filter is not supported, every
    // benchmark runs.
    let started = Instant::now();
    println!(
        "vfio-intx core benchmarks ({ROUNDS} rounds per figure; median, p10, p90 across rounds)"
    );
    gate_fast_paths();
    intx_cycle()?;
    access_under_resets();
    println!("total {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
