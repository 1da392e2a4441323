//! A device's lifecycle: bring-up (open, or adopt a VMM's device fd;
//! probe; arm; reset at start) and hand-back (INTx delivery stopped,
//! COMMAND as found, the previous driver restored).

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{info, instrument, warn};
use vmm_sys_util::eventfd::EventFd;

use super::{lock, Control, DeviceError, EduHandle, ManagedDevice, SessionSink, SimHandle};
use crate::backend::{ConfigSpace, PciBackend};
use crate::daemon::asfound::{self, BindingRecord, Found, Resume};
use crate::daemon::backend::AnyBackend;
use crate::daemon::config::{BackendKind, DeviceConfig, PathSetting};
use crate::daemon::fdstore::{self, role};
use crate::daemon::metrics::DeviceMetrics;
use crate::intx::{IntxDevice, IntxOptions, WatchdogOptions};
use crate::pci::intx::{read_command_status, CommandStatus};
use crate::pci::regs::{COMMAND_INTX_DISABLE, PCI_COMMAND};
use crate::pci::sysfs::{Binding, PciSysfs};
use crate::pci::{Bdf, Width};
#[cfg(feature = "testkit")]
use crate::sim::{SimDevice, SimKernel};
use crate::uio::UioBackend;
use crate::vfio::handover::DeviceIdentity;
use crate::vfio::VfioBackend;

/// What handing a device back left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    /// COMMAND as found at start.
    pub found: u16,
    /// COMMAND now.
    pub now: u16,
    /// Whether the previous driver was restored.
    pub driver_restored: bool,
    /// A VMM's own device: only INTx was released, COMMAND is the VMM's.
    pub handed_over: bool,
    /// COMMAND differs from the one found only by INTX_DISABLE, set by the
    /// kernel driver's own handler for a device still asserting
    /// (uio_pci_generic's check-and-mask): the state that driver keeps
    /// until its next user unmasks, not a failed hand-back.
    pub kernel_masked: bool,
}

impl Restored {
    /// Whether the device was handed back as it should be: COMMAND as
    /// found, or masked by the kernel driver for a line still asserting.
    pub fn as_found(&self) -> bool {
        self.now == self.found || self.kernel_masked
    }
}

/// Whether COMMAND read back after the hand-back (`now`) differs from the
/// one written (`found`) only because the kernel driver masked a line that
/// still asserts: INTX_DISABLE is the only difference, it is set, STATUS
/// shows the interrupt, and the driver has a live check-and-mask handler.
fn masked_by_kernel(found: u16, now: CommandStatus, driver_masks_asserting_line: bool) -> bool {
    driver_masks_asserting_line
        && now.command ^ found == COMMAND_INTX_DISABLE
        && now.masked()
        && now.asserting()
}

impl ManagedDevice {
    /// Brings a device up as configured: bind, open, probe, arm, reset.
    /// Blocking. On failure everything done so far is undone.
    #[instrument(skip_all, fields(bdf = %config.bdf))]
    pub(crate) fn open(
        config: DeviceConfig,
    ) -> Result<(Arc<Self>, mpsc::UnboundedReceiver<Control>), DeviceError> {
        let bdf = config.bdf;
        let kind = config.backend;
        let sysfs = PciSysfs::default();
        // An entry means the previous instance did not hand the device back
        // (it crashed): the device is as that instance left it, and the
        // record says how it was found.
        let recorded = asfound::get(bdf);
        if let Some(found) = &recorded {
            info!(command = format_args!("{:#06x}", found.command), binding = ?found.binding,
                "the previous instance did not hand this device back; taking the state it found from its record");
        }
        let binding = match (config.bind, config.backend.driver()) {
            (true, Some(driver)) => {
                let bound = crate::daemon::progress::after_slow(
                    crate::daemon::progress::SLOW,
                    || info!(%bdf, driver, "binding takes more than 1 s: waiting for the device's current driver to release it (its user must let go)"),
                    || sysfs.bind(bdf, driver),
                )?;
                let previous = recorded
                    .as_ref()
                    .and_then(|f| f.binding.as_ref())
                    .filter(|_| !bound.changed())
                    .and_then(|r| r.binding(bdf, driver));
                Some(previous.unwrap_or(bound))
            }
            _ => None,
        };
        let found_command = recorded.as_ref().map(|f| f.command);
        let result = Self::open_bound(&sysfs, config, binding.clone(), found_command);
        match &result {
            // The record after the store entries (sent in `open_bound`): a
            // crash in between leaves entries the record does not explain,
            // which the next start closes.
            Ok((dev, _)) => asfound::put(
                bdf,
                Found {
                    command: dev.found_command,
                    binding: binding.as_ref().and_then(BindingRecord::of),
                    resume: dev.resume_record(),
                },
            ),
            Err(_) => {
                for name in stored_names(bdf, kind) {
                    fdstore::remove(name);
                }
                if let Some(b) = &binding {
                    if let Err(e) = sysfs.unbind(b) {
                        warn!(error = %crate::error_chain(&e), "restoring the previous driver failed");
                    }
                }
            }
        }
        result
    }

    fn open_bound(
        sysfs: &PciSysfs,
        config: DeviceConfig,
        binding: Option<Binding>,
        found_command: Option<u16>,
    ) -> Result<(Arc<Self>, mpsc::UnboundedReceiver<Control>), DeviceError> {
        let bdf = config.bdf;
        let (backend, sim) = match config.backend {
            BackendKind::Vfio => {
                let backend = VfioBackend::open(bdf)?;
                if stored_names(bdf, BackendKind::Vfio)
                    .contains(&fdstore::name(bdf, role::VFIO_DEVICE))
                {
                    fdstore::store(fdstore::name(bdf, role::VFIO_DEVICE), backend.device_fd());
                }
                (AnyBackend::Vfio(backend), None)
            }
            BackendKind::Uio => {
                let backend = UioBackend::open(bdf)?;
                if fdstore::enabled() {
                    let [uio, config] = backend.kept_fds();
                    fdstore::store(fdstore::name(bdf, role::UIO), uio);
                    fdstore::store(fdstore::name(bdf, role::UIO_CONFIG), config);
                }
                (AnyBackend::Uio(backend), None)
            }
            #[cfg(not(feature = "testkit"))]
            BackendKind::Sim => {
                return Err(DeviceError::Unsupported {
                    bdf,
                    what: "simulated devices need vfio-intx built with the testkit feature",
                })
            }
            #[cfg(feature = "testkit")]
            BackendKind::Sim => {
                let sim = SimDevice::builder()
                    .bdf(bdf)
                    .kernel(SimKernel::from(config.sim_kernel))
                    .build();
                let backend_error = |op| move |source| DeviceError::Backend { bdf, op, source };
                let mut backend = sim.backend();
                // The "firmware's" COMMAND, as a real device would be found.
                backend
                    .config_write(PCI_COMMAND, Width::Word, u32::from(config.sim_command))
                    .map_err(backend_error("setting the simulated device's COMMAND"))?;
                // Under a service manager, the device's state outlives the
                // process in a memfd in the fd store.
                if fdstore::enabled() {
                    match crate::daemon::sys::memfd("vfio-intx-sim-state") {
                        Ok(memfd) => {
                            use std::os::fd::AsFd;
                            fdstore::store(fdstore::name(bdf, role::SIM_STATE), memfd.as_fd());
                            persist_sim(&sim, memfd);
                        }
                        Err(e) => {
                            warn!(error = %e, "creating the simulated device's state memfd failed; a restart cannot resume it")
                        }
                    }
                }
                (AnyBackend::Sim(backend), Some(sim))
            }
        };
        let opened = Self::arm(
            sysfs,
            config,
            backend,
            sim,
            binding,
            None,
            found_command,
            false,
            None,
        )?;
        if stored_names(bdf, opened.0.config.backend).contains(&fdstore::name(bdf, role::DELIVERY))
        {
            opened.0.store_ledger("device");
        }
        Ok(opened)
    }

    /// Takes a device over again after the daemon's own restart or crash,
    /// from its fd store entries (`fds`, by name; the ones used are taken)
    /// and its record: no bind, no reset, no probe toggling INTX_DISABLE;
    /// the engine re-derives the line from STATUS as after a reset (an
    /// interrupt pending across the restart is delivered, a line is never
    /// left masked). Blocking.
    #[instrument(skip_all, fields(bdf = %config.bdf))]
    pub(crate) fn resume(
        config: DeviceConfig,
        found: &Found,
        fds: &mut std::collections::BTreeMap<String, std::os::fd::OwnedFd>,
    ) -> Result<(Arc<Self>, mpsc::UnboundedReceiver<Control>), DeviceError> {
        let bdf = config.bdf;
        let unreadable = |what| DeviceError::Unsupported { bdf, what };
        // The kernel bypass the previous process left, to adopt as wired.
        let mut adopt = None;
        // The device fd again, for re-wiring if adopting fails.
        let mut spare = None;
        // A VMM's own device fd, kept with its session: resumed as the
        // hand-over took it (identified again, never written at start).
        let vmm = found.resume.as_ref().and_then(|r| r.vmm_device.as_ref());
        let mut handed_over = None;
        // `in_service`: masked and asserting, the previous process
        // delivered it.
        // A stored fd by role, taken out of `fds`; its absence named.
        let take = |fds: &mut std::collections::BTreeMap<String, std::os::fd::OwnedFd>, r, what| {
            fds.remove(&fdstore::name(bdf, r)).ok_or(unreadable(what))
        };
        let (backend, sim, in_service, ledger) = match config.backend {
            #[cfg(feature = "testkit")]
            BackendKind::Sim => {
                use std::os::unix::fs::FileExt;
                let memfd = std::fs::File::from(take(
                    fds,
                    role::SIM_STATE,
                    "the fd store has no state for the simulated device",
                )?);
                let mut image = vec![0u8; crate::sim::SIM_IMAGE_SIZE];
                memfd.read_exact_at(&mut image, 0).map_err(|_| {
                    unreadable("the simulated device's stored state is not readable")
                })?;
                let sim = SimDevice::builder()
                    .bdf(bdf)
                    .kernel(SimKernel::from(config.sim_kernel))
                    .build();
                sim.load_image(&image).map_err(|_| {
                    unreadable("the simulated device's stored state is not an image")
                })?;
                persist_sim(&sim, memfd);
                let snap = sim.snapshot();
                let delivery = std::fs::File::from(take(fds, role::DELIVERY, NO_LEDGER)?);
                // Masked and asserting, and the signal reached the irqfd
                // with no EOI since.
                let in_service = snap.asserting
                    && snap.command & COMMAND_INTX_DISABLE != 0
                    && super::session::Ledger::in_guest(&delivery);
                info!(
                    pending = snap.pending,
                    command = format_args!("{:#06x}", snap.command),
                    raised = snap.raised,
                    "the simulated device's state, as the previous process left it"
                );
                (
                    AnyBackend::Sim(sim.backend()),
                    Some(sim),
                    in_service,
                    Some(delivery),
                )
            }
            BackendKind::Vfio => {
                let fd = take(
                    fds,
                    role::VFIO_DEVICE,
                    "the fd store has no VFIO device fd for the device",
                )?;
                let delivery = std::fs::File::from(take(fds, role::DELIVERY, NO_LEDGER)?);
                spare = fd.try_clone().ok();
                // The same checks as a VMM's device fd: it is this device.
                let mut backend = VfioBackend::from_device_fd(fd, Some(bdf))?;
                if vmm.is_some() {
                    handed_over = backend.identity();
                }
                // The previous process's kernel-bypass wiring: adopted as
                // the kernel has it (it kept delivering while no process
                // was here), or, where the record and the store do not
                // confirm it (and for a VMM's own device, whose wiring is
                // put back by its session's re-attach), removed (the kernel
                // takes one unmask eventfd per device) and put back by the
                // session's re-attach.
                let plan = match vmm {
                    None => bypass_to_adopt(&config, found, fds),
                    Some(_) => Err(None),
                };
                match plan {
                    Ok(wiring) => adopt = Some(wiring),
                    Err(why) => {
                        if let Some(why) = why {
                            info!("the previous process's kernel bypass is wired afresh: {why}");
                        }
                        clear_unmask_eventfd(&mut backend);
                    }
                }
                let cs =
                    read_command_status(&mut backend).map_err(|source| DeviceError::Backend {
                        bdf,
                        op: "reading COMMAND and STATUS",
                        source,
                    })?;
                let masked = backend.read_physical_intx_disable().unwrap_or_else(|e| {
                    // Not known to be masked: not taken as in service, so
                    // the engine's first check decides.
                    warn!(error = %crate::error_chain(&e), "reading the physical INTX_DISABLE at resume failed; taken as unmasked");
                    false
                });
                let in_service =
                    cs.asserting() && masked && super::session::Ledger::in_guest(&delivery);
                info!(
                    command = format_args!("{:#06x}", cs.command),
                    status = format_args!("{:#06x}", cs.status),
                    masked,
                    "the device as the previous process left it"
                );
                (AnyBackend::Vfio(backend), None, in_service, Some(delivery))
            }
            BackendKind::Uio => {
                let uio = take(fds, role::UIO, "the fd store has no uio fd for the device")?;
                let config = take(
                    fds,
                    role::UIO_CONFIG,
                    "the fd store has no sysfs config fd for the device",
                )?;
                let delivery = std::fs::File::from(take(fds, role::DELIVERY, NO_LEDGER)?);
                // INTX_DISABLE is the physical mask: the previous process's
                // own (in service: delivered, no EOI since) or the kernel
                // handler's check-and-mask while nobody ran; the latter is
                // lifted by the engine's first check that finds the line low.
                let in_guest = super::session::Ledger::in_guest(&delivery);
                let mut backend =
                    UioBackend::resume_with(&PciSysfs::default(), bdf, uio, config, in_guest)?;
                let cs =
                    read_command_status(&mut backend).map_err(|source| DeviceError::Backend {
                        bdf,
                        op: "reading COMMAND and STATUS",
                        source,
                    })?;
                let in_service = cs.asserting() && cs.masked() && in_guest;
                info!(
                    command = format_args!("{:#06x}", cs.command),
                    status = format_args!("{:#06x}", cs.status),
                    in_guest,
                    "the device as the previous process left it (uio)"
                );
                (AnyBackend::Uio(backend), None, in_service, Some(delivery))
            }
            #[cfg(not(feature = "testkit"))]
            BackendKind::Sim => {
                let _ = fds;
                return Err(unreadable(
                    "simulated devices need vfio-intx built with the testkit feature",
                ));
            }
        };
        let binding = match (found.binding.as_ref(), config.backend.driver()) {
            (Some(b), Some(driver)) => b.binding(bdf, driver),
            _ => None,
        };
        if vmm.is_some() && handed_over.is_none() {
            return Err(unreadable(
                "the kept VMM device fd is not identified as the hand-over identified it",
            ));
        }
        let config = match vmm {
            Some(v) => DeviceConfig {
                bind: false,
                reset: false,
                edu_test_hooks: false,
                path: v.path,
                ..config
            },
            None => DeviceConfig {
                reset: false,
                ..config
            },
        };
        let adopting = adopt.is_some();
        let binding = binding.filter(|_| vmm.is_none());
        let armed = Self::arm(
            &PciSysfs::default(),
            config.clone(),
            backend,
            sim,
            binding.clone(),
            handed_over,
            Some(found.command),
            true,
            adopt,
        );
        let opened = match (armed, spare) {
            (Err(e), Some(fd)) if adopting => {
                warn!(error = %crate::error_chain(&e), "adopting the kernel bypass as wired failed; it is wired afresh when the session re-attaches");
                let mut backend = VfioBackend::from_device_fd(fd, Some(bdf))?;
                clear_unmask_eventfd(&mut backend);
                Self::arm(
                    &PciSysfs::default(),
                    config,
                    AnyBackend::Vfio(backend),
                    None,
                    binding,
                    None,
                    Some(found.command),
                    true,
                    None,
                )?
            }
            (armed, _) => armed?,
        };
        // On the adopted bypass the kernel takes the guest's EOI of an
        // interrupt in service: the engine never waits for it.
        let adopted = opened.0.engine.is_kernel_bypass();
        if !adopted {
            // Until the session's re-attach wires it again.
            crate::daemon::resume::record_path(bdf, false);
        }
        opened
            .0
            .resumed_on_bypass
            .store(adopted, std::sync::atomic::Ordering::SeqCst);
        opened
            .0
            .resumed_in_service
            .store(in_service && !adopted, std::sync::atomic::Ordering::SeqCst);
        if let Some(file) = ledger {
            opened.0.sink.set_ledger(super::session::Ledger::new(file));
        }
        if adopted {
            info!("resumed from the fd store: no reset, no rebind; the kernel bypass adopted as wired, the kernel kept delivering");
        } else {
            info!(
                in_service,
                "resumed from the fd store: no reset, no rebind; the line re-checked"
            );
        }
        Ok(opened)
    }

    /// The resume part of the device's record: its store entries.
    fn resume_record(&self) -> Option<Resume> {
        let names = stored_names(self.bdf(), self.config.backend);
        (fdstore::enabled() && !names.is_empty() && self.handed_over.is_none()).then_some(Resume {
            backend: self.config.backend,
            names,
            session: None,
            held: false,
            vmm_device: None,
        })
    }

    /// Takes over a VMM's own VFIO device fd for one session
    /// ([`VfioBackend::from_device_fd`]): probed (read-only) and armed like
    /// a configured device, never bound, reset or written to at start.
    #[instrument(skip_all, fields(bdf = %config.bdf))]
    pub(crate) fn adopt(
        config: DeviceConfig,
        backend: VfioBackend,
    ) -> Result<(Arc<Self>, mpsc::UnboundedReceiver<Control>), DeviceError> {
        let Some(identity) = backend.identity() else {
            return Err(DeviceError::Unsupported {
                bdf: config.bdf,
                what: "only a handed-over device fd can be adopted for a session",
            });
        };
        let config = DeviceConfig {
            bind: false,
            reset: false,
            edu_test_hooks: false,
            ..config
        };
        let opened = Self::arm(
            &PciSysfs::default(),
            config,
            AnyBackend::Vfio(backend),
            None,
            None,
            Some(identity),
            None,
            false,
            None,
        )?;
        // Its session outlives the daemon's restart (kept in the fd store
        // with the device fd when the session starts): the delivery ledger
        // from the first interrupt on.
        if fdstore::enabled() {
            opened.0.store_ledger("session");
        }
        Ok(opened)
    }

    /// Gives the device a new delivery ledger (a memfd) and keeps it in the
    /// fd store, so a restart knows how far its interrupt got; on failure
    /// says that the restart cannot resume `what` (the device or the
    /// session).
    fn store_ledger(&self, what: &str) {
        match crate::daemon::sys::memfd("vfio-intx-delivery") {
            Ok(memfd) => {
                use std::os::fd::AsFd;
                fdstore::store(fdstore::name(self.bdf(), role::DELIVERY), memfd.as_fd());
                self.sink.set_ledger(super::session::Ledger::new(memfd));
            }
            Err(e) => {
                warn!(error = %e, "creating the delivery ledger's memfd failed; a restart cannot resume the {what}")
            }
        }
    }

    /// Probes and arms an opened backend (`resumed`: taken over again after
    /// a restart, probed by the instance that brought it up, and nothing
    /// is toggled now).
    #[allow(clippy::too_many_arguments)]
    fn arm(
        sysfs: &PciSysfs,
        config: DeviceConfig,
        mut backend: AnyBackend,
        sim: Option<SimHandle>,
        binding: Option<Binding>,
        handed_over: Option<DeviceIdentity>,
        recorded_command: Option<u16>,
        resumed: bool,
        adopt: Option<(EventFd, EventFd)>,
    ) -> Result<(Arc<Self>, mpsc::UnboundedReceiver<Control>), DeviceError> {
        let bdf = config.bdf;
        let backend_error = |op| move |source| DeviceError::Backend { bdf, op, source };
        let now = read_command_status(&mut backend)
            .map_err(backend_error("reading COMMAND"))?
            .command;
        let found_command = recorded_command.unwrap_or(now);
        let edu = if config.edu_test_hooks {
            Some(Self::edu_hooks(&mut backend, resumed)?)
        } else {
            None
        };
        let (masking, masking_evidence) = if resumed {
            (
                "resumed after a restart (probed when first brought up)".to_owned(),
                None,
            )
        } else if config.probe {
            let (supported, verdict, evidence) = match &mut backend {
                // The daemon's own simulated device: no driver, no handler
                // yet, so the enumeration-time toggle test is safe.
                #[cfg(feature = "testkit")]
                AnyBackend::Sim(b) => {
                    let support = crate::pci::intx::probe_masking(b)
                        .map_err(backend_error("probing INTx masking"))?;
                    (support.supported(), support.to_string(), "toggle-test")
                }
                // A bound device: read-only evidence, never a toggle under
                // its driver's live handler.
                _ => {
                    let v = sysfs.masking_verdict(bdf)?;
                    (v.supported, v.to_string(), v.source.evidence())
                }
            };
            if !supported {
                return Err(DeviceError::MaskingBroken { bdf, verdict });
            }
            info!(%verdict, evidence, "INTx masking probed");
            (verdict, Some(evidence))
        } else {
            ("not probed (probe = false)".to_owned(), None)
        };
        let metrics = Arc::new(DeviceMetrics::default());
        let sink = Arc::new(SessionSink::new(Arc::clone(&metrics)));
        let options = IntxOptions {
            watchdog: WatchdogOptions {
                detect_after: config.stuck_after,
                idle_interval: config.idle_interval,
                ..WatchdogOptions::default()
            },
            ..IntxOptions::default()
        };
        let engine = Arc::new(match adopt {
            Some((irqfd, resample)) => IntxDevice::with_adopted_bypass(
                backend,
                Arc::clone(&sink),
                irqfd,
                resample,
                options,
            )?,
            None => IntxDevice::with_options(backend, Arc::clone(&sink), options)?,
        });
        if config.reset {
            crate::daemon::progress::after_slow(
                crate::daemon::progress::SLOW,
                || info!(%bdf, "the reset at start takes more than 1 s: waiting behind another reset of the device"),
                || engine.reset(),
            )?;
            info!("reset at start");
        }
        let (control, rx) = mpsc::unbounded_channel();
        Ok((
            Arc::new(Self {
                config,
                engine,
                sink,
                sim,
                edu,
                metrics,
                found_command,
                masking,
                masking_evidence,
                handed_over,
                binding: Mutex::new(binding),
                session_ending: AtomicBool::new(false),
                resumed_in_service: AtomicBool::new(false),
                resumed_on_bypass: AtomicBool::new(false),
                control,
            }),
            rx,
        ))
    }

    /// Maps an edu's BAR0 for the test hooks, enabling memory decoding
    /// first (the edu answers BAR accesses only then). COMMAND as found is
    /// read before, and restored at shutdown.
    #[cfg(not(feature = "testkit"))]
    fn edu_hooks(backend: &mut AnyBackend, _resumed: bool) -> Result<Arc<EduHandle>, DeviceError> {
        Err(DeviceError::Unsupported {
            bdf: backend.bdf(),
            what: "edu test hooks need vfio-intx built with the testkit feature",
        })
    }

    /// Maps an edu's BAR0 for the test hooks (see above). `resumed`: after
    /// the daemon's restart, where a pending interrupt status is not an
    /// earlier user's leftover but an interrupt to deliver.
    #[cfg(feature = "testkit")]
    fn edu_hooks(backend: &mut AnyBackend, resumed: bool) -> Result<Arc<EduHandle>, DeviceError> {
        let bdf = backend.bdf();
        let AnyBackend::Vfio(vfio) = backend else {
            return Err(DeviceError::Backend {
                bdf,
                op: "edu test hooks (vfio devices only)",
                source: crate::backend::BackendError::NoIntx,
            });
        };
        let edu = if resumed {
            crate::vfio::edu::Edu::resume(vfio)?
        } else {
            crate::vfio::edu::Edu::enable(vfio)?
        };
        Ok(Arc::new(edu))
    }

    /// Hands the device back (blocking): INTx delivery stopped, COMMAND as
    /// found. The previous driver is restored by [`hand_back`], once the
    /// device is closed. A VMM's own device is only disarmed: its COMMAND
    /// is the VMM's guest's, which may have changed it during the session.
    #[instrument(skip_all, fields(bdf = %self.bdf()))]
    fn restore(&self) -> Result<Restored, DeviceError> {
        let bdf = self.bdf();
        let backend_error = |op| move |source| DeviceError::Backend { bdf, op, source };
        let handed_over = self.handed_over.is_some();
        let disarmed = self.engine.disarm();
        let written = if handed_over {
            Ok(())
        } else {
            self.engine.with_backend(|b| {
                b.config_write(PCI_COMMAND, Width::Word, u32::from(self.found_command))
            })
        };
        // Read back through the backend, the view the daemon wrote through
        // (for vfio-pci, the virtual INTX_DISABLE: the physical bit is the
        // driver's).
        let now = self
            .engine
            .with_backend(|b| read_command_status(b).map(|cs| (cs, b.masks_asserting_line())));
        disarmed?;
        written.map_err(backend_error("restoring COMMAND"))?;
        let (now, masks) = now.map_err(backend_error("reading COMMAND back"))?;
        let found = if handed_over {
            now.command
        } else {
            self.found_command
        };
        Ok(Restored {
            found,
            now: now.command,
            driver_restored: false,
            handed_over,
            kernel_masked: masked_by_kernel(found, now, masks),
        })
    }
}

/// The fd store entries a device of `kind` keeps (while the daemon is
/// under a service manager).
/// The kernel-bypass wiring a resumed device's session had, as the record
/// and the store confirm it: the session's irqfd and resample eventfd
/// (duplicates; the session's re-attach takes the entries), for the engine
/// to adopt. `Err(None)`: no session on the bypass to adopt; `Err(Some)`:
/// why one is not adopted.
/// The error for a resumed device whose delivery ledger is not in the store.
const NO_LEDGER: &str = "the fd store has no delivery ledger for the device";

/// Removes the previous process's unmask eventfd (the kernel takes one per
/// device) before the session's re-attach wires the bypass again; a failure
/// is said here and shows again, as EBUSY, at that re-attach, which then
/// stays on the user-space path.
fn clear_unmask_eventfd(backend: &mut VfioBackend) {
    if let Err(e) = backend.intx_set_unmask_eventfd(None) {
        warn!(error = %crate::error_chain(&e), "clearing the previous process's unmask eventfd failed");
    }
}

fn bypass_to_adopt(
    config: &DeviceConfig,
    found: &Found,
    fds: &std::collections::BTreeMap<String, std::os::fd::OwnedFd>,
) -> Result<(EventFd, EventFd), Option<String>> {
    let bdf = config.bdf;
    let resume = found.resume.as_ref().ok_or(None)?;
    let session = resume.session.as_ref().ok_or(None)?;
    if session.path != "bypass" {
        return Err(None);
    }
    if config.path == PathSetting::Userspace {
        return Err(Some(
            "the configuration asks for the user-space path now".to_owned(),
        ));
    }
    if resume.held {
        return Err(Some("an operator hold was in force".to_owned()));
    }
    let entry = |r| {
        let name = fdstore::name(bdf, r);
        if session.names.contains(&name) {
            fds.get(&name)
        } else {
            None
        }
    };
    let (Some(irqfd), Some(resample), Some(_)) = (
        entry(role::SESSION_IRQFD),
        entry(role::SESSION_RESAMPLE),
        entry(role::SESSION_CONN),
    ) else {
        return Err(Some(
            "the fd store lacks the session's irqfd, resample eventfd or connection".to_owned(),
        ));
    };
    let dup = |fd: &std::os::fd::OwnedFd| {
        fd.try_clone()
            .map(crate::daemon::sys::into_eventfd)
            .map_err(|e| Some(format!("duplicating the session's eventfds failed: {e}")))
    };
    // Both are eventfds: the store's entries were checked against their
    // roles when they were passed.
    Ok((dup(irqfd)?, dup(resample)?))
}

pub(crate) fn stored_names(bdf: Bdf, kind: BackendKind) -> Vec<String> {
    match kind {
        BackendKind::Sim if cfg!(feature = "testkit") && fdstore::enabled() => {
            vec![
                fdstore::name(bdf, role::SIM_STATE),
                fdstore::name(bdf, role::DELIVERY),
            ]
        }
        BackendKind::Vfio if fdstore::enabled() => vec![
            fdstore::name(bdf, role::VFIO_DEVICE),
            fdstore::name(bdf, role::DELIVERY),
        ],
        BackendKind::Uio if fdstore::enabled() => vec![
            fdstore::name(bdf, role::UIO),
            fdstore::name(bdf, role::UIO_CONFIG),
            fdstore::name(bdf, role::DELIVERY),
        ],
        _ => Vec::new(),
    }
}

/// The fd store entries of a VMM's own device fd kept with its session:
/// the daemon's copy of the device fd and the delivery ledger.
pub(crate) fn vmm_device_names(bdf: Bdf) -> Vec<String> {
    vec![
        fdstore::name(bdf, role::VFIO_DEVICE),
        fdstore::name(bdf, role::DELIVERY),
    ]
}

/// Writes each new state of the simulated device into `memfd` (one
/// `pwrite` of the whole image, under the device's lock).
#[cfg(feature = "testkit")]
fn persist_sim(sim: &SimDevice, memfd: std::fs::File) {
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::{AtomicBool, Ordering};
    static WARNED: AtomicBool = AtomicBool::new(false);
    sim.persist(move |image| {
        if let Err(e) = memfd.write_all_at(image, 0) {
            if !WARNED.swap(true, Ordering::Relaxed) {
                warn!(error = %e, "writing the simulated device's state to its memfd failed");
            }
        }
    });
}

/// How long [`hand_back`] waits for the last users of the devices to let
/// go before it restores the drivers (one bound for all the devices).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Hands devices back (blocking): each is disarmed with COMMAND as found
/// and closed; then the drivers the daemon bound are restored. The order
/// matters: vfio-pci's remove waits until the device's user has closed it,
/// so unbinding a device still open would hang.
pub(crate) fn hand_back(
    devs: Vec<Arc<ManagedDevice>>,
) -> Vec<(Bdf, Result<Restored, DeviceError>)> {
    let mut out = Vec::with_capacity(devs.len());
    // Devices that must be closed before this returns: those whose driver
    // is restored, and a VMM's own device fds (the VMM may set INTx up
    // itself as soon as the daemon says it let go).
    let mut close = Vec::new();
    // Configured devices, whose as-found entries go once they are back.
    let mut recorded = Vec::new();
    for dev in devs {
        let bdf = dev.bdf();
        let r = dev.restore();
        recorded.push(bdf);
        // Out of the store now: the store's copy of a VFIO device fd
        // keeps the device open, and the driver's unbind below waits for
        // its last close (a VMM's own device: the copy kept with its
        // session goes with the session).
        let names = if dev.handed_over.is_none() {
            stored_names(bdf, dev.config.backend)
        } else {
            vmm_device_names(bdf)
        };
        for name in names {
            fdstore::remove(name);
        }
        let binding = lock(&dev.binding).take().filter(Binding::changed);
        let handed_over = dev.handed_over.is_some();
        let engine = Arc::downgrade(&dev.engine);
        drop(dev);
        if binding.is_some() || handed_over {
            close.push((out.len(), bdf, engine, binding));
        }
        out.push((bdf, r));
    }
    // One bound for all of them: they are closed in parallel (each by its
    // own last user), so they are waited for together.
    let deadline = std::time::Instant::now() + CLOSE_TIMEOUT;
    while close
        .iter()
        .any(|(_, _, engine, _)| engine.strong_count() > 0)
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(1));
    }
    for (i, bdf, engine, binding) in close {
        let still_open = engine.strong_count() > 0;
        let rebind = binding.is_some();
        let restored = match binding {
            Some(_) if still_open => Err(DeviceError::StillOpen { bdf }),
            None if still_open => Err(DeviceError::FdStillHeld { bdf }),
            Some(binding) => PciSysfs::default()
                .unbind(&binding)
                .map_err(DeviceError::from),
            None => Ok(()),
        };
        if let Some((_, result)) = out.get_mut(i) {
            match (restored, result) {
                (Ok(()), Ok(r)) => r.driver_restored = rebind,
                (Ok(()), Err(_)) => {}
                (Err(e), result) => *result = Err(e),
            }
        }
    }
    // Handed back (or tried, and reported): the next start finds them
    // afresh. A crash before this leaves the entries for the next start.
    for bdf in recorded {
        asfound::remove(bdf);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cs(command: u16, status: u16) -> CommandStatus {
        CommandStatus { command, status }
    }

    #[test]
    fn hand_back_waits_for_every_device_within_one_overall_bound() {
        // Three VMM devices whose engines someone still holds: each waits
        // for the last user to let go, all of them within one bound, not
        // one bound each (TimeoutStopSec=5s would kill the daemon first).
        let mut devs = Vec::new();
        let mut held = Vec::new();
        for slot in 4..7u8 {
            let bdf = Bdf::new(0, 0, slot, 0).unwrap_or_else(|_| unreachable!());
            let config = DeviceConfig::defaults(bdf, crate::daemon::config::BackendKind::Sim);
            let Ok((mut dev, _rx)) = ManagedDevice::open(config) else {
                panic!("opening a simulated device failed");
            };
            let Some(d) = Arc::get_mut(&mut dev) else {
                panic!("a new device is shared");
            };
            d.handed_over = Some(crate::vfio::handover::DeviceIdentity::Fdinfo);
            held.push(Arc::clone(&dev.engine));
            devs.push(dev);
        }
        let start = std::time::Instant::now();
        let out = hand_back(devs);
        let took = start.elapsed();
        assert_eq!(out.len(), 3);
        for (bdf, r) in &out {
            assert!(
                matches!(r, Err(DeviceError::FdStillHeld { .. })),
                "{bdf}: {r:?}"
            );
        }
        assert!(
            took >= CLOSE_TIMEOUT && took < CLOSE_TIMEOUT + Duration::from_millis(500),
            "{took:?} for three devices"
        );
        drop(held);
    }

    #[test]
    fn only_a_kernel_mask_of_a_line_still_asserting_counts_as_found() {
        // uio_pci_generic's handler masked the asserting device after the
        // hand-back wrote COMMAND as found (issue 11 item 12).
        assert!(masked_by_kernel(0x0103, cs(0x0503, 0x0018), true));
        // Not asserting: the mask is nobody's job; a real failure.
        assert!(!masked_by_kernel(0x0103, cs(0x0503, 0x0010), true));
        // A driver with no such handler.
        assert!(!masked_by_kernel(0x0103, cs(0x0503, 0x0018), false));
        // Any other bit different.
        assert!(!masked_by_kernel(0x0103, cs(0x0507, 0x0018), true));
        // INTX_DISABLE found set and now clear: not the kernel's mask.
        assert!(!masked_by_kernel(0x0503, cs(0x0103, 0x0018), true));
    }
}
