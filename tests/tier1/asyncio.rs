//! The optional async adapter drives the same engine from a tokio runtime.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vfio_intx::intx::{asyncio, IntxDevice};
use vfio_intx::sim::SimDevice;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

#[test]
fn the_tokio_adapter_delivers_each_interrupt_once() {
    let sim = SimDevice::builder().build();
    let irq = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
    let resample = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
    let dev = IntxDevice::new(sim.backend(), Arc::clone(&irq)).unwrap();
    let delivered = Arc::new(AtomicU64::new(0));
    // The guest: on each injection, ack the device and EOI.
    let guest = {
        let (sim, irq, resample, delivered) = (
            sim.clone(),
            Arc::clone(&irq),
            Arc::clone(&resample),
            Arc::clone(&delivered),
        );
        std::thread::spawn(move || {
            while delivered.load(Ordering::SeqCst) < 200 {
                if irq.read().is_ok() {
                    assert!(sim.ack(), "injected with nothing pending");
                    delivered.fetch_add(1, Ordering::SeqCst);
                    resample.write(1).unwrap();
                } else {
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
        })
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let serve = asyncio::serve(&dev, Some(&resample));
        let drive = async {
            let mut raised = 0u64;
            while raised < 200 {
                // Some raises arrive in pairs, before the previous EOI.
                let n = if raised % 10 == 0 { 2 } else { 1 };
                for _ in 0..n {
                    sim.raise();
                }
                raised += n;
                while delivered.load(Ordering::SeqCst) < raised {
                    tokio::time::sleep(Duration::from_micros(100)).await;
                }
            }
        };
        tokio::select! {
            r = serve => panic!("serve ended: {r:?}"),
            () = drive => {}
        }
    });
    guest.join().unwrap();
    assert_eq!(delivered.load(Ordering::SeqCst), 200);
    assert_eq!(sim.snapshot().pending, 0);
    assert_eq!(dev.stats().errors, 0);
}
