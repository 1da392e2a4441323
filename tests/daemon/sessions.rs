//! VMM sessions over SCM_RIGHTS with a real KVM guest, on the user-space
//! EOI path and on the kernel bypass.

use super::*;

#[test]
fn a_vmm_session_delivers_interrupts_to_a_real_kvm_guest_and_is_released_when_it_ends() {
    use vfio_intx::kvm::testvm::{kick_signal, TinyVm, VmControl};
    use vfio_intx::kvm::{Irqchip, ResampleIrqfd};
    use vmm_sys_util::signal::Killable;
    if !Path::new("/dev/kvm").exists() {
        eprintln!("SKIP a_vmm_session_delivers_interrupts_to_a_real_kvm_guest: no /dev/kvm");
        return;
    }
    let d = Daemon::start(&device(A, ""));
    const N: u64 = 50;
    const GSI: u8 = 5;
    const DEVFN: u8 = 3 << 3;
    let mut vm = TinyVm::new(GSI, DEVFN, Irqchip::Full).unwrap();
    let irqfd = ResampleIrqfd::register(Arc::clone(vm.vm()), u32::from(GSI)).unwrap();

    // Descriptors of the wrong type are refused.
    let pipe = nix::unistd::pipe().unwrap();
    let r = d
        .client()
        .request_with_fds(
            &Request::session(A.parse().unwrap()),
            &[pipe.0.as_raw_fd(), irqfd.resample().as_raw_fd()],
        )
        .unwrap();
    assert!(
        matches!(&r, Response::Error { kind: ErrorKind::BadRequest, message } if message.contains("not an eventfd")),
        "{r:?}"
    );
    // A VMM's own VFIO device fd is checked for its type before anything
    // else, with or without an address, and whether or not the daemon owns
    // the address.
    for request in [
        Request::device_fd_session(None, None),
        Request::device_fd_session(Some(A.parse().unwrap()), None),
        Request::device_fd_session(Some("0000:00:1f.7".parse().unwrap()), None),
    ] {
        let r = d
            .client()
            .request_with_fds(
                &request,
                &[
                    pipe.1.as_raw_fd(),
                    irqfd.trigger().as_raw_fd(),
                    irqfd.resample().as_raw_fd(),
                ],
            )
            .unwrap();
        assert!(
            matches!(&r, Response::Error { kind: ErrorKind::BadRequest, message }
                if message.contains("not a VFIO device fd (it is pipe:[")),
            "{request:?}: {r:?}"
        );
    }
    // "path" belongs to a VMM's own device: the daemon's config sets it for
    // the devices it owns.
    let r = d
        .client()
        .request_with_fds(
            &Request::Session {
                bdf: Some(A.parse().unwrap()),
                vfio_device_fd: false,
                path: Some(vfio_intx::daemon::config::PathSetting::Userspace),
            },
            &[irqfd.trigger().as_raw_fd(), irqfd.resample().as_raw_fd()],
        )
        .unwrap();
    assert!(
        matches!(&r, Response::Error { kind: ErrorKind::BadRequest, message } if message.contains("\"path\"")),
        "{r:?}"
    );

    let mut session = d.client();
    let r = session
        .request_with_fds(
            &Request::session(A.parse().unwrap()),
            &[irqfd.trigger().as_raw_fd(), irqfd.resample().as_raw_fd()],
        )
        .unwrap();
    assert!(matches!(r, Response::Ok { .. }), "{r:?}");
    // A second session on the same device is busy.
    let r = d
        .client()
        .request_with_fds(
            &Request::session(A.parse().unwrap()),
            &[irqfd.trigger().as_raw_fd(), irqfd.resample().as_raw_fd()],
        )
        .unwrap();
    assert!(
        matches!(
            r,
            Response::Error {
                kind: ErrorKind::Busy,
                ..
            }
        ),
        "{r:?}"
    );

    let control = Arc::new(VmControl::default());
    let chipset = VmmDevice {
        control: Mutex::new(d.client()),
    };
    let vcpu = {
        let control = Arc::clone(&control);
        std::thread::spawn(move || vm.run(DEVFN, &chipset, &control))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !control.ready() {
        assert!(Instant::now() < deadline, "the guest did not come up");
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut raiser = d.client();
    for i in 1..=N {
        let r = raiser
            .request(&Request::SimRaise {
                bdf: A.parse().unwrap(),
                count: 1,
            })
            .unwrap();
        assert!(matches!(r, Response::Ok { .. }));
        let deadline = Instant::now() + Duration::from_secs(10);
        while control.acked() < i {
            assert!(
                Instant::now() < deadline,
                "interrupt {i} did not reach the guest (acked {}); log:\n{}",
                control.acked(),
                d.log()
            );
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    assert_eq!(control.acked(), N);
    assert_eq!(control.empty_isr_runs(), 0);
    let status = d.status();
    let dev = &status.devices[0];
    assert!(dev.session);
    assert_eq!(dev.stats.engine.injected, N);
    assert!(dev.stats.engine.eois >= N);
    assert!(dev.stats.daemon.round_trip.count >= N);

    control.request_stop();
    while !vcpu.is_finished() {
        let _ = vcpu.kill(kick_signal());
        std::thread::sleep(Duration::from_millis(1));
    }
    vcpu.join().unwrap().unwrap();
    // The VMM ends the session and waits for the daemon to let go: the
    // connection closes only once the device is back on its own wiring.
    session.end_session().unwrap();
    assert!(
        !d.status().devices[0].session,
        "the session was not released"
    );
    d.wait_log("VMM session ended");
    // And a new session can start.
    let mut again = d.client();
    let r = again
        .request_with_fds(
            &Request::session(A.parse().unwrap()),
            &[irqfd.trigger().as_raw_fd(), irqfd.resample().as_raw_fd()],
        )
        .unwrap();
    assert!(matches!(r, Response::Ok { .. }), "{r:?}");
}

#[test]
fn a_vmm_session_takes_the_kernel_bypass_where_the_backend_has_one() {
    use vfio_intx::kvm::testvm::{kick_signal, TinyVm, VmControl};
    use vfio_intx::kvm::{Irqchip, ResampleIrqfd};
    use vmm_sys_util::signal::Killable;
    if !Path::new("/dev/kvm").exists() {
        eprintln!("SKIP a_vmm_session_takes_the_kernel_bypass: no /dev/kvm");
        return;
    }
    // The vfio-pci model: the resample eventfd becomes its unmask eventfd.
    let d = Daemon::start(&device(A, "sim-kernel = \"vfio-pci\"\npath = \"auto\""));
    const N: u64 = 50;
    const GSI: u8 = 5;
    const DEVFN: u8 = 3 << 3;
    let mut vm = TinyVm::new(GSI, DEVFN, Irqchip::Full).unwrap();
    let irqfd = ResampleIrqfd::register(Arc::clone(vm.vm()), u32::from(GSI)).unwrap();
    // An interrupt raised before any session: parked, then delivered by
    // the kernel when the session's bypass is wired.
    d.ask(&Request::SimRaise {
        bdf: A.parse().unwrap(),
        count: 1,
    });
    let mut session = d.client();
    let r = session
        .request_with_fds(
            &Request::session(A.parse().unwrap()),
            &[irqfd.trigger().as_raw_fd(), irqfd.resample().as_raw_fd()],
        )
        .unwrap();
    let Response::Ok { data } = r else {
        panic!("{r:?}")
    };
    assert!(
        data["path"].as_str().unwrap().starts_with("kernel bypass"),
        "{data}"
    );
    // No operator hold on the bypass: the kernel unmasks at each EOI.
    let out = d.cli(&["mask", A]);
    assert_eq!(out.status.code(), Some(i32::from(exit::FAILED)), "{out:?}");
    assert_eq!(device_status(&d, A).held, None);

    let control = Arc::new(VmControl::default());
    let chipset = VmmDevice {
        control: Mutex::new(d.client()),
    };
    let vcpu = {
        let control = Arc::clone(&control);
        std::thread::spawn(move || vm.run(DEVFN, &chipset, &control))
    };
    wait_for("the guest", Duration::from_secs(10), || control.ready());
    wait_for("the parked interrupt", Duration::from_secs(10), || {
        control.acked() == 1
    });
    let before = device_status(&d, A).stats.engine;
    let mut raiser = d.client();
    for i in 2..=N + 1 {
        raiser
            .request(&Request::SimRaise {
                bdf: A.parse().unwrap(),
                count: 1,
            })
            .unwrap();
        wait_for("an interrupt in the guest", Duration::from_secs(10), || {
            control.acked() >= i
        });
    }
    assert_eq!(control.acked(), N + 1);
    assert_eq!(control.empty_isr_runs(), 0);
    let s = device_status(&d, A);
    assert!(s.path.starts_with("kernel bypass"), "{}", s.path);
    // No user-space work per interrupt on the bypass.
    assert_eq!(
        s.stats.engine.injected, before.injected,
        "{:?}",
        s.stats.engine
    );
    assert_eq!(s.stats.engine.eois, before.eois);

    control.request_stop();
    while !vcpu.is_finished() {
        let _ = vcpu.kill(kick_signal());
        std::thread::sleep(Duration::from_millis(1));
    }
    vcpu.join().unwrap().unwrap();
    drop(session);
    wait_for("the session's end", Duration::from_secs(5), || {
        !device_status(&d, A).session
    });
    // Back on the user-space wiring: the next interrupt parks.
    let s = device_status(&d, A);
    assert!(s.path.starts_with("user-space"), "{}", s.path);
    let parked = s.stats.daemon.parked;
    d.ask(&Request::SimRaise {
        bdf: A.parse().unwrap(),
        count: 1,
    });
    wait_for("the next interrupt parked", Duration::from_secs(5), || {
        device_status(&d, A).stats.daemon.parked > parked
    });
}
