//! Per-device health: storms, EOI timeouts, a busy device that is not a
//! storm.

use super::*;

#[test]
fn a_line_nobody_handles_is_masked_as_a_storm_reported_and_retried() {
    let d = Daemon::start(&format!(
        "{}{}",
        device(A, "storm-threshold = 1000\nstorm-backoff-ms = 100"),
        device(B, "")
    ));
    let vmm = FakeVmm::attach(&d, A);
    // The device asserts and nobody acknowledges it; the "guest" EOIs
    // every injection, so the line re-asserts after each EOI.
    d.ask(&Request::SimRaise {
        bdf: A.parse().unwrap(),
        count: 1,
    });
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let guest = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut eois = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                if vmm.injected() > 0 {
                    vmm.eoi();
                    eois += 1;
                } else {
                    std::thread::yield_now();
                }
            }
            (vmm, eois)
        })
    };
    wait_for("a storm", Duration::from_secs(5), || {
        device_status(&d, A).stats.daemon.storms >= 1
    });
    d.wait_log("interrupt storm");
    // Retried after the back-off, and masked again while it goes on.
    wait_for("a second storm", Duration::from_secs(5), || {
        device_status(&d, A).stats.daemon.storms >= 2
    });
    // The other device is not disturbed.
    let other = device_status(&d, B);
    assert_eq!(other.held, None);
    assert_eq!(other.stats.daemon.storms, 0);
    // Someone handles it at last: the next retry finds a quiet line.
    let r = d.ask(&Request::SimAck {
        bdf: A.parse().unwrap(),
    });
    assert_eq!(r["acked"], true);
    wait_for("the line released", Duration::from_secs(5), || {
        device_status(&d, A).held.is_none()
    });
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (_vmm, eois) = guest.join().unwrap();
    assert!(eois > 20, "{eois}");
    let text = d.ask(&Request::Metrics)["text"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(text.contains(&format!("vfio_intx_storms_total{{bdf=\"{A}\"}}")));
}

#[test]
fn an_interrupt_left_without_eoi_is_reported_and_recovered() {
    let d = Daemon::start(&device(A, "eoi-timeout-ms = 150"));
    let vmm = FakeVmm::attach(&d, A);
    d.ask(&Request::SimRaise {
        bdf: A.parse().unwrap(),
        count: 1,
    });
    wait_for("the injection", Duration::from_secs(5), || {
        vmm.injected() == 1
    });
    // The guest's driver acknowledges the device but its EOI never comes.
    assert_eq!(
        d.ask(&Request::SimAck {
            bdf: A.parse().unwrap()
        })["acked"],
        true
    );
    wait_for("the EOI timeout", Duration::from_secs(5), || {
        device_status(&d, A).stats.daemon.eoi_timeouts == 1
    });
    d.wait_log("no EOI from the guest");
    // Recovered: the line is unmasked and the next interrupt arrives.
    d.ask(&Request::SimRaise {
        bdf: A.parse().unwrap(),
        count: 1,
    });
    wait_for("the next injection", Duration::from_secs(5), || {
        vmm.injected() == 1
    });
    assert_eq!(device_status(&d, A).stats.engine.injected, 2);
}

#[test]
fn a_busy_device_whose_guest_handles_it_is_not_a_storm() {
    let d = Daemon::start(&device(A, "storm-threshold = 1000"));
    let vmm = FakeVmm::attach(&d, A);
    let mut c = d.client();
    let mut ask = |r: Request| match c.request(&r).unwrap() {
        Response::Ok { data } => data,
        other => panic!("{other:?}"),
    };
    // Two interrupts at a time: every other EOI finds the device still
    // asserting (a re-injection), far above the threshold's rate, but the
    // guest handles each one.
    for _ in 0..300 {
        ask(Request::SimRaise {
            bdf: A.parse().unwrap(),
            count: 2,
        });
        for _ in 0..2 {
            wait_for("an injection", Duration::from_secs(5), || {
                vmm.injected() > 0
            });
            assert_eq!(
                ask(Request::SimAck {
                    bdf: A.parse().unwrap()
                })["acked"],
                true
            );
            vmm.eoi();
        }
    }
    let s = device_status(&d, A);
    assert_eq!(s.stats.engine.injected, 600);
    assert!(s.stats.engine.reinjected >= 250, "{:?}", s.stats.engine);
    assert_eq!(s.stats.daemon.storms, 0, "{}", d.log());
}
