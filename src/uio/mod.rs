//! uio_pci_generic backend: /dev/uioN events, masking through sysfs config.
//!
//! uio_pci_generic's whole interrupt handler is the kernel's PCI 2.3
//! check-and-mask on a shared line: when the device asserts INTx, the
//! kernel sets COMMAND.INTX_DISABLE and bumps the uio event count. User space
//! waits for the count with `read()`/`poll()` on /dev/uioN and unmasks by
//! clearing INTX_DISABLE through the sysfs `config` file. There is no
//! eventfd and no irqcontrol (`write()` to the uio fd returns ENOSYS).
//!
//! [`UioBackend`] maps that onto [`PciBackend`]:
//!
//! - config space is the sysfs `config` file ([`SysfsConfig`]), where
//!   INTX_DISABLE is the physical mask ([`IntxDisableBit::Physical`]);
//! - a small forwarder thread blocks in `epoll_wait` on the uio fd and a
//!   private stop eventfd, reads the event count and signals the engine's
//!   trigger eventfd when it advanced (no busy polling);
//! - reset is the sysfs `reset` attribute (the kernel saves and restores the
//!   config state around it).

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};

use tracing::{debug, error, trace, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend::{BackendError, Capabilities, ConfigSpace, IntxDisableBit, PciBackend, Unmask};
use crate::pci::intx;
use crate::pci::regs::{COMMAND_INTX_DISABLE, PCI_COMMAND, PCI_INTERRUPT_PIN};
use crate::pci::sysfs::{PciSysfs, SysfsConfig, SysfsError, UIO_PCI_GENERIC};
use crate::pci::{covers, Bdf, Width};

/// Why a uio_pci_generic device could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UioError {
    /// A sysfs lookup failed.
    #[error(transparent)]
    Sysfs(#[from] SysfsError),
    /// The device is not bound to uio_pci_generic.
    #[error("{bdf}: the device is bound to {}, not uio_pci_generic (bind it first)",
        .driver.as_deref().unwrap_or("no driver"))]
    NotUio {
        /// The device.
        bdf: Bdf,
        /// The driver it is bound to.
        driver: Option<String>,
    },
    /// uio_pci_generic is bound but registered no uio device.
    #[error("{bdf}: bound to uio_pci_generic but no uio device is registered under {}",
        .path.display())]
    NoUioDevice {
        /// The device.
        bdf: Bdf,
        /// Where the uio device was looked for.
        path: PathBuf,
    },
    /// Opening the uio device node failed.
    #[error("{bdf}: opening {} failed", .path.display())]
    Open {
        /// The device.
        bdf: Bdf,
        /// The node.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Why the forwarder thread stopped on its own, kept to report it from the
/// next backend call (an `io::Error` cannot be cloned).
#[derive(Debug, Clone)]
struct ForwarderFailure {
    op: &'static str,
    errno: Option<i32>,
    kind: io::ErrorKind,
    message: String,
}

impl ForwarderFailure {
    fn new(op: &'static str, e: &io::Error) -> Self {
        Self {
            op,
            errno: e.raw_os_error(),
            kind: e.kind(),
            message: e.to_string(),
        }
    }

    fn to_error(&self) -> BackendError {
        let source = match self.errno {
            Some(errno) => io::Error::from_raw_os_error(errno),
            None => io::Error::new(self.kind, self.message.clone()),
        };
        BackendError::os(self.op, source)
    }
}

type FailureSlot = Arc<Mutex<Option<ForwarderFailure>>>;

/// The running forwarder thread.
struct Forwarder {
    stop: EventFd,
    thread: JoinHandle<()>,
}

/// One PCI function bound to uio_pci_generic.
pub struct UioBackend {
    bdf: Bdf,
    config: SysfsConfig,
    uio: File,
    uio_path: PathBuf,
    device_dir: PathBuf,
    has_irq: bool,
    forwarder: Option<Forwarder>,
    failure: FailureSlot,
    /// The INTX_DISABLE value the engine last asked for (a COMMAND write, a
    /// mask, a successful check-and-(un)mask). The only other writer of the
    /// bit is the kernel's interrupt handler, which sets it; so a set bit
    /// while this is `false` is the kernel's automask.
    engine_mask: bool,
}

impl std::fmt::Debug for UioBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UioBackend")
            .field("bdf", &self.bdf)
            .field("uio", &self.uio_path)
            .field("forwarding", &self.forwarder.is_some())
            .finish_non_exhaustive()
    }
}

/// The /dev/uioN node of a device bound to uio_pci_generic, as sysfs shows
/// it now.
fn uio_node(sysfs: &PciSysfs, bdf: Bdf) -> Result<PathBuf, UioError> {
    let driver = sysfs.driver(bdf)?;
    if driver.as_deref() != Some(UIO_PCI_GENERIC) {
        return Err(UioError::NotUio { bdf, driver });
    }
    sysfs.uio_device(bdf)?.ok_or_else(|| UioError::NoUioDevice {
        bdf,
        path: sysfs.device_dir(bdf).join("uio"),
    })
}

impl UioBackend {
    /// uio_pci_generic has no kernel-side unmask eventfd, so a uio device
    /// never takes the kernel bypass: what a configuration may assume
    /// before any device is open.
    pub const UNMASK_EVENTFD: bool = false;

    /// Opens a device bound to uio_pci_generic on the real host.
    pub fn open(bdf: Bdf) -> Result<Self, UioError> {
        Self::open_with(&PciSysfs::default(), bdf)
    }

    /// Opens a device bound to uio_pci_generic, with sysfs and /dev where
    /// `sysfs` says.
    pub fn open_with(sysfs: &PciSysfs, bdf: Bdf) -> Result<Self, UioError> {
        let uio_path = uio_node(sysfs, bdf)?;
        // Non-blocking: the forwarder reads only after epoll says readable,
        // and must never sleep in read() where the stop eventfd cannot
        // reach it.
        let uio = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&uio_path)
            .map_err(|source| UioError::Open {
                bdf,
                path: uio_path.clone(),
                source,
            })?;
        let config = SysfsConfig::open(sysfs, bdf)?;
        let has_irq = sysfs.irq(bdf)?.is_some();
        let mut this = Self {
            bdf,
            config,
            uio,
            uio_path,
            device_dir: sysfs.device_dir(bdf),
            has_irq,
            forwarder: None,
            failure: Arc::new(Mutex::new(None)),
            engine_mask: false,
        };
        let cs =
            intx::read_command_status(&mut this.config).map_err(|source| SysfsError::Config {
                bdf,
                op: "reading COMMAND/STATUS",
                source,
            })?;
        // A set bit at open is someone's decision (a previous user, or a
        // kernel automask nobody serviced): keep it until the engine decides.
        this.engine_mask = cs.masked();
        debug!(%bdf, uio = %this.uio_path.display(), command = cs.command, "uio device opened");
        Ok(this)
    }

    /// Takes a device over again from the fds a previous process kept open
    /// (the daemon's restart): `uio`, its /dev/uioN, and `config`, its
    /// sysfs `config` file, each checked to be this device's as sysfs
    /// shows it now. Nothing is written: the open uio fd still holds the
    /// event count it last reported, so events the kernel's handler counted
    /// meanwhile (each one a check-and-mask) are forwarded at
    /// [`PciBackend::intx_enable`]. `engine_masked`: whether a set
    /// INTX_DISABLE is the previous process's own mask (an interrupt in
    /// service); otherwise a set bit is the kernel's automask, lifted by the
    /// first check that finds the device no longer asserting.
    pub fn resume_with(
        sysfs: &PciSysfs,
        bdf: Bdf,
        uio: std::os::fd::OwnedFd,
        config: std::os::fd::OwnedFd,
        engine_masked: bool,
    ) -> Result<Self, UioError> {
        let uio_path = uio_node(sysfs, bdf)?;
        let uio = File::from(uio);
        let named = std::fs::read_link(format!("/proc/self/fd/{}", uio.as_raw_fd()));
        if named.as_deref().ok() != Some(uio_path.as_path()) {
            return Err(UioError::Open {
                bdf,
                path: uio_path,
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("the kept uio fd is {named:?}, not this device's node"),
                ),
            });
        }
        let config = SysfsConfig::from_file(sysfs, bdf, File::from(config))?;
        let has_irq = sysfs.irq(bdf)?.is_some();
        let this = Self {
            bdf,
            config,
            uio,
            uio_path,
            device_dir: sysfs.device_dir(bdf),
            has_irq,
            forwarder: None,
            failure: Arc::new(Mutex::new(None)),
            engine_mask: engine_masked,
        };
        debug!(%bdf, uio = %this.uio_path.display(), engine_masked, "uio device resumed from kept fds");
        Ok(this)
    }

    /// The fds to keep for a resume after the daemon's restart: the uio
    /// device node and the sysfs `config` file ([`UioBackend::resume_with`]).
    pub fn kept_fds(&self) -> [std::os::fd::BorrowedFd<'_>; 2] {
        use std::os::fd::AsFd;
        [self.uio.as_fd(), self.config.file().as_fd()]
    }

    /// The uio device node, e.g. `/dev/uio0`.
    pub fn uio_path(&self) -> &Path {
        &self.uio_path
    }

    /// Whether the event forwarder thread is running.
    pub fn is_forwarding(&self) -> bool {
        self.forwarder.is_some()
    }

    fn stop_forwarder(&mut self) {
        if let Some(f) = self.forwarder.take() {
            // The write only fails if the counter would overflow, in which
            // case the thread is already due to wake.
            let _ = f.stop.write(1);
            if f.thread.join().is_err() {
                error!(bdf = %self.bdf, "the uio event forwarder panicked");
            }
        }
    }

    fn forwarder_failure(&self) -> Option<ForwarderFailure> {
        self.failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Records the INTX_DISABLE value of a COMMAND write the engine made.
    fn note_command_write(&mut self, offset: u16, width: Width, value: u32) {
        let byte = PCI_COMMAND + 1;
        if covers(offset, width, byte) {
            let bit = u32::from(byte - offset) * 8 + (COMMAND_INTX_DISABLE >> 8).trailing_zeros();
            self.engine_mask = value & (1 << bit) != 0;
        }
    }
}

impl Drop for UioBackend {
    fn drop(&mut self) {
        self.stop_forwarder();
    }
}

impl ConfigSpace for UioBackend {
    fn bdf(&self) -> Bdf {
        self.bdf
    }

    fn config_size(&self) -> u16 {
        self.config.config_size()
    }

    fn config_read(&mut self, offset: u16, width: Width) -> Result<u32, BackendError> {
        self.config.config_read(offset, width)
    }

    fn config_write(&mut self, offset: u16, width: Width, value: u32) -> Result<(), BackendError> {
        self.config.config_write(offset, width, value)?;
        self.note_command_write(offset, width, value);
        Ok(())
    }
}

const TOKEN_UIO: u64 = 0;
const TOKEN_STOP: u64 = 1;

/// The forwarder: waits for the uio event count to move and signals
/// `trigger`. Returns on the stop eventfd, or records why it had to stop
/// (and signals `trigger` once, so that the engine runs and sees it).
fn forward(bdf: Bdf, mut uio: File, trigger: EventFd, stop: EventFd, failure: FailureSlot) {
    let fail = |op, e: &io::Error| {
        error!(%bdf, op, error = %e, "uio event forwarding stopped");
        *failure.lock().unwrap_or_else(PoisonError::into_inner) =
            Some(ForwarderFailure::new(op, e));
        let _ = trigger.write(1);
    };
    let epoll = match Epoll::new() {
        Ok(epoll) => epoll,
        Err(e) => return fail("epoll_create for uio events", &e),
    };
    for (fd, token) in [(uio.as_raw_fd(), TOKEN_UIO), (stop.as_raw_fd(), TOKEN_STOP)] {
        if let Err(e) = epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        ) {
            return fail("epoll_ctl for uio events", &e);
        }
    }
    let mut last: Option<u32> = None;
    let mut events = [EpollEvent::default(); 2];
    loop {
        let ready = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return fail("epoll_wait for uio events", &e),
        };
        for event in &events[..ready] {
            if event.data() == TOKEN_STOP {
                return;
            }
            let mut count = [0u8; 4];
            match uio.read(&mut count) {
                Ok(4) => {}
                Ok(n) => {
                    let e = io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("read {n} of 4 bytes of the event count"),
                    );
                    return fail("uio event read", &e);
                }
                // Readable but nothing new (another reader of the same fd,
                // or a signal): wait again.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) =>
                {
                    continue
                }
                Err(e) => return fail("uio event read", &e),
            }
            let count = u32::from_ne_bytes(count);
            if last != Some(count) {
                let advanced = last.map_or(1, |l| count.wrapping_sub(l));
                trace!(%bdf, count, advanced, "uio interrupt event");
                last = Some(count);
                if let Err(e) = trigger.write(1) {
                    return fail("signalling the trigger eventfd", &e);
                }
            }
        }
    }
}

impl PciBackend for UioBackend {
    /// The bit is the hardware mask; uio has no kernel-side unmask
    /// ([`UioBackend::UNMASK_EVENTFD`]); no trigger claims: the forwarder's
    /// events are uio's event count, and the check-and-mask also lifts an
    /// automask nobody needs, so it always runs.
    fn capabilities(&self) -> Capabilities {
        Capabilities::new(IntxDisableBit::Physical, Self::UNMASK_EVENTFD, false)
    }

    /// Starts the forwarder thread (replacing a running one). Events counted
    /// since the device was opened are forwarded too: the uio fd remembers
    /// the count it last reported.
    fn intx_enable(&mut self, trigger: &EventFd) -> Result<(), BackendError> {
        let pin = self.config.config_read(PCI_INTERRUPT_PIN, Width::Byte)?;
        if pin == 0 || !self.has_irq {
            return Err(BackendError::NoIntx);
        }
        self.stop_forwarder();
        *self.failure.lock().unwrap_or_else(PoisonError::into_inner) = None;
        let trigger = trigger
            .try_clone()
            .map_err(|e| BackendError::os("eventfd dup", e))?;
        let stop = EventFd::new(EFD_NONBLOCK).map_err(|e| BackendError::os("eventfd", e))?;
        let thread_stop = stop
            .try_clone()
            .map_err(|e| BackendError::os("eventfd dup", e))?;
        let uio = self
            .uio
            .try_clone()
            .map_err(|e| BackendError::os("uio fd dup", e))?;
        let bdf = self.bdf;
        let failure = Arc::clone(&self.failure);
        let thread = thread::Builder::new()
            .name(format!("uio-intx-{bdf}"))
            .spawn(move || forward(bdf, uio, trigger, thread_stop, failure))
            .map_err(|e| BackendError::os("spawning the uio event forwarder", e))?;
        self.forwarder = Some(Forwarder { stop, thread });
        debug!(%bdf, uio = %self.uio_path.display(), "uio event forwarding started");
        Ok(())
    }

    /// Stops and joins the forwarder, then sets INTX_DISABLE.
    fn intx_disable(&mut self) -> Result<(), BackendError> {
        self.stop_forwarder();
        intx::set_intx_disable(&mut self.config, true)?;
        self.engine_mask = true;
        Ok(())
    }

    /// uio_pci_generic's handler has already run check-and-mask before it
    /// counted the event; running it again over sysfs config is idempotent
    /// and tells whether the device asserts.
    ///
    /// When the device does not assert, the kernel may have masked for
    /// nothing (the device deasserted since): if the engine had not asked
    /// for the mask itself, the mask is the kernel's and is lifted with a
    /// check-and-unmask, so that `Ok(false)` leaves nothing masked on this
    /// event's behalf. A mask the engine set (in service, or the guest's own
    /// INTX_DISABLE) is left alone. Should the device assert again between
    /// the two steps, the unmask declines and the mask is taken as for any
    /// assertion.
    fn intx_check_and_mask(&mut self) -> Result<bool, BackendError> {
        if let Some(failure) = self.forwarder_failure() {
            return Err(failure.to_error());
        }
        if intx::check_and_mask(&mut self.config)? {
            self.engine_mask = true;
            return Ok(true);
        }
        if self.engine_mask || intx::check_and_unmask(&mut self.config)? {
            return Ok(false);
        }
        // Asserting again since the check: it is masked (by the kernel's
        // earlier automask), so no new host interrupt will come.
        let asserting = intx::check_and_mask(&mut self.config)?;
        if asserting {
            self.engine_mask = true;
        } else {
            // Deasserted once more: nothing pending, so unmasking cannot
            // lose an interrupt (a new assertion fires the line).
            intx::set_intx_disable(&mut self.config, false)?;
        }
        Ok(asserting)
    }

    /// The sysfs config is the hardware's COMMAND.
    fn read_physical_intx_disable(&mut self) -> Result<bool, BackendError> {
        Ok(intx::read_command_status(&mut self.config)?.masked())
    }

    /// None: uio_pci_generic offers no kernel bypass, so the engine sees
    /// every interrupt itself.
    fn host_interrupt_count(&mut self) -> Result<Option<u64>, BackendError> {
        Ok(None)
    }

    fn intx_check_and_unmask(&mut self) -> Result<Unmask, BackendError> {
        if intx::check_and_unmask(&mut self.config)? {
            self.engine_mask = false;
            Ok(Unmask::Unmasked)
        } else {
            // Still asserting: the line stays (or will be) masked.
            self.engine_mask = true;
            Ok(Unmask::StillAsserting)
        }
    }

    fn intx_mask(&mut self) -> Result<(), BackendError> {
        intx::set_intx_disable(&mut self.config, true)?;
        self.engine_mask = true;
        Ok(())
    }

    fn intx_set_unmask_eventfd(&mut self, _fd: Option<&EventFd>) -> Result<(), BackendError> {
        Err(BackendError::os(
            "registering an unmask eventfd (uio has no kernel-side unmask)",
            io::Error::from(io::ErrorKind::Unsupported),
        ))
    }

    fn intx_adopt(&mut self, _trigger: &EventFd, _unmask: &EventFd) -> Result<(), BackendError> {
        Err(BackendError::os(
            "adopting a kernel bypass (uio has no kernel-side unmask)",
            io::Error::from(io::ErrorKind::Unsupported),
        ))
    }

    /// Writes "1" to the sysfs `reset` attribute: `pci_reset_function`, which
    /// locks the device, saves its config state, resets it with the first
    /// working method in `reset_method`, and restores the state. A device
    /// without a reset method has no `reset` attribute (or an empty
    /// `reset_method`): [`BackendError::NoResetMethod`].
    fn reset(&mut self) -> Result<(), BackendError> {
        let reset = self.device_dir.join("reset");
        let methods = self.device_dir.join("reset_method");
        match std::fs::read_to_string(&methods) {
            Ok(text) if text.trim().is_empty() => return Err(BackendError::NoResetMethod),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(BackendError::os("reading reset_method", e)),
        }
        let result = OpenOptions::new()
            .write(true)
            .open(&reset)
            .and_then(|mut f| io::Write::write_all(&mut f, b"1"));
        match result {
            Ok(()) => {
                debug!(bdf = %self.bdf, "reset through sysfs");
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(BackendError::NoResetMethod),
            Err(e) if e.raw_os_error() == Some(libc::ENOTTY) => Err(BackendError::NoResetMethod),
            Err(e) => {
                warn!(bdf = %self.bdf, error = %e, "sysfs reset failed");
                Err(BackendError::os("sysfs reset", e))
            }
        }
    }
}
