//! User-space PCI 2.3 INTx masking for PCI devices assigned to KVM guests.
//!
//! The crate implements, for one assigned device at a time, the pattern the
//! kernel's uio_pci_generic and vfio-pci use for shared INTx lines: on a host
//! interrupt, check PCI_STATUS.INTERRUPT and set PCI_COMMAND.INTX_DISABLE
//! (check-and-mask); forward the interrupt to the guest; on the guest's EOI,
//! check-and-unmask, re-injecting while the device still asserts. Every
//! config-space access goes through a serialized [`gate::ConfigGate`] that
//! coordinates with resets the way the kernel's `pci_cfg_access_lock` does.
//!
//! The core is synchronous and has no async runtime in it, so a VMM built on
//! any thread model can embed it:
//!
//! - [`pci`]: registers, addresses, PCI 2.3 masking primitives, the masking
//!   probe;
//! - [`backend`]: the seam every device backend implements;
//! - [`gate`]: the config-access gate;
//! - [`intx`]: the per-device INTx engine and its event loop;
//! - [`vfio`]: the kernel VFIO backend (vfio-pci);
//! - [`sim`] (feature `testkit`): a faithful simulated PCI 2.3 device;
//! - [`daemon`] (feature `daemon`): the tokio daemon and its control socket
//!   (the only part with an async runtime); the operator CLI with feature
//!   `cli`.
//!
//! Feature `testkit` adds the test kit: [`sim`], `kvm::testvm`,
//! `kvm::assign`, `vfio::edu`, and in the daemon simulated devices and the
//! example guest. The default features (`cli`, `testkit`) are the binary's;
//! an embedding VMM builds with `default-features = false`.
//!
//! ```
//! # #[cfg(feature = "testkit")] {
//! use vfio_intx::intx::{CallbackSink, IntxDevice};
//! use vfio_intx::sim::SimDevice;
//!
//! let sim = SimDevice::builder().build();
//! let dev = IntxDevice::new(sim.backend(), CallbackSink(|| Ok(()))).unwrap();
//! sim.raise();
//! dev.on_host_interrupt().unwrap();
//! assert_eq!(dev.stats().injected, 1);
//! # }
//! ```

/// Builder-style setters (`with_<field>`) for a `#[non_exhaustive]` public
/// options struct, which other crates can no longer build with a struct
/// literal: `IntxOptions::default().with_watchdog(w)`.
macro_rules! with_setters {
    ($ty:ty { $($field:ident: $fty:ty => $with:ident),+ $(,)? }) => {
        impl $ty {
            $(
                #[doc = concat!("Sets [`", stringify!($field), "`](Self::", stringify!($field), ").")]
                #[must_use]
                pub fn $with(mut self, $field: $fty) -> Self {
                    self.$field = $field;
                    self
                }
            )+
        }
    };
}

pub mod backend;
// A test-owned systemd service manager with a file-descriptor store.
#[cfg(all(feature = "testkit", feature = "daemon", not(loom)))]
pub mod fdstore_harness;
// Not under loom: tokio's loom mode has no sockets or signals.
#[cfg(all(feature = "daemon", not(loom)))]
pub mod daemon;
pub mod gate;
pub mod intx;
pub mod kvm;
pub mod pci;
mod ratelimit;
#[cfg(feature = "testkit")]
pub mod sim;
mod sync;
pub mod uio;
pub mod vfio;

/// Formats an error and all its sources on one line, separated by ": ".
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// The log filter of the binary, the daemon and the examples: `RUST_LOG` if
/// set, else `default`; either way with `vfio_ioctls` held to errors unless
/// `RUST_LOG` names it. vfio-ioctls opens every device by asking
/// `GET_IRQ_INFO` for every index the device reports and logs a warning for
/// each one the device lacks (`Could not get VFIO IRQ info for index 3`:
/// PCIe AER's ERR index on a conventional PCI function), a normal probe
/// result and not a degradation a user should be warned about. Warnings of
/// vfio-intx itself are not affected.
#[cfg(feature = "cli")]
pub fn log_filter(default: &str) -> tracing_subscriber::EnvFilter {
    use tracing_subscriber::EnvFilter;
    let from_env = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let names_vfio_ioctls = from_env
        .as_deref()
        .is_some_and(|v| v.contains("vfio_ioctls"));
    let filter = from_env
        .and_then(|v| EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| EnvFilter::new(default));
    if names_vfio_ioctls {
        return filter;
    }
    match "vfio_ioctls=error".parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    }
}

/// The README's Rust examples, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
