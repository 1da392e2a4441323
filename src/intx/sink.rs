//! Where the engine delivers interrupts to the guest.

use std::io;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

/// Receives the interrupts the engine delivers to the guest.
///
/// The contract is that of a level-triggered line behind a KVM irqfd with
/// resample: [`inject`](InterruptSink::inject) asserts the guest's line; the
/// guest's EOI (KVM's resample eventfd) deasserts it and is reported back to
/// the engine. The engine injects at most once per EOI.
pub trait InterruptSink: Send + Sync {
    /// Asserts the guest's interrupt line.
    fn inject(&self) -> io::Result<()>;
}

/// A plain eventfd, e.g. a KVM irqfd registered with a resample eventfd.
impl InterruptSink for EventFd {
    fn inject(&self) -> io::Result<()> {
        self.write(1)
    }
}

impl<S: InterruptSink + ?Sized> InterruptSink for Arc<S> {
    fn inject(&self) -> io::Result<()> {
        (**self).inject()
    }
}

impl<S: InterruptSink + ?Sized> InterruptSink for Box<S> {
    fn inject(&self) -> io::Result<()> {
        (**self).inject()
    }
}

/// An in-process callback, for tests and embedders with their own delivery.
pub struct CallbackSink<F>(pub F);

impl<F> InterruptSink for CallbackSink<F>
where
    F: Fn() -> io::Result<()> + Send + Sync,
{
    fn inject(&self) -> io::Result<()> {
        (self.0)()
    }
}
