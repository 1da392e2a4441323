//! The control socket: a Unix stream socket, peers checked with
//! `SO_PEERCRED`, length-prefixed JSON frames (see [`protocol`]), a bounded
//! number of clients, a per-connection timeout (for reading a request and
//! for writing each reply), back-off when the process runs out of
//! descriptors, and VMM sessions with descriptors passed as `SCM_RIGHTS`:
//! exactly the descriptors a request takes, none inside a session, and
//! every one the daemon does not keep closed off the runtime's thread
//! ([`closer`]).

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn};

use crate::backend::ConfigSpace;
use crate::daemon::closer::{self, Foreign};
use crate::daemon::config::{BackendKind, DeviceConfig, PathSetting};
use crate::daemon::control::{failure, Peer};
use crate::daemon::metrics::ControlEvent;
use crate::daemon::protocol::SessionReport;
use crate::daemon::protocol::{self, ErrorKind, FrameDecoder, FrameError, Request, Response};
use crate::daemon::registry::Daemon;
use crate::daemon::service::{self, rate_limit, AttachError, DeviceError, ManagedDevice};
use crate::daemon::{rundir, sys, DaemonError};
use crate::kvm::validate_eventfd;
use crate::pci::Bdf;
use crate::vfio::VfioBackend;

/// Creates the control socket: its directory if missing (and checked, see
/// `rundir`), replacing only a stale socket (refusing one another daemon
/// still answers on, and anything that is not a socket), with the
/// configured mode and group set without following symbolic links.
pub(crate) fn bind(
    path: &Path,
    mode: u32,
    group: Option<u32>,
) -> Result<UnixListener, DaemonError> {
    let fail = |op: &'static str| {
        let path = path.to_owned();
        move |source| DaemonError::Socket { path, op, source }
    };
    let dir = rundir::open_dir(path, nix::unistd::geteuid().as_raw())?;
    rundir::remove_stale(&dir, path)?;
    // Created with no access for anyone until the mode is set.
    let listener = {
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
        let l = UnixListener::bind(path);
        nix::sys::stat::umask(old);
        l.map_err(fail("binding"))?
    };
    rundir::set_owner_and_mode(&dir, path, mode, group)?;
    crate::daemon::fdstore::store(
        crate::daemon::fdstore::CONTROL_SOCKET.to_owned(),
        listener.as_fd(),
    );
    Ok(listener)
}

/// The listening socket the fd store kept (bound at `path`; checked by
/// the caller), made non-blocking for the runtime.
pub(crate) fn listener_from(fd: OwnedFd, path: &Path) -> Result<UnixListener, DaemonError> {
    let listener = std::os::unix::net::UnixListener::from(fd);
    listener
        .set_nonblocking(true)
        .and_then(|()| UnixListener::from_std(listener))
        .map_err(|source| DaemonError::Socket {
            path: path.to_owned(),
            op: "taking the stored listening socket",
            source,
        })
}

/// Accepts clients until the task is dropped.
pub(crate) async fn serve(listener: UnixListener, daemon: Arc<Daemon>) {
    let clients = Arc::new(Semaphore::new(daemon.config().daemon.max_clients));
    let mut backoff = Duration::from_millis(10);
    let mut log = rate_limit();
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                backoff = Duration::from_millis(10);
                let daemon = Arc::clone(&daemon);
                match Arc::clone(&clients).try_acquire_owned() {
                    Ok(permit) => {
                        tokio::spawn(connection(daemon, stream, permit));
                    }
                    Err(_) => {
                        if let Some(suppressed) = daemon.events.note(ControlEvent::TooManyClients) {
                            info!(
                                suppressed,
                                "refusing a client: too many clients are connected"
                            );
                        }
                        tokio::spawn(refuse(stream));
                    }
                }
            }
            Err(e) => {
                let exhausted = matches!(
                    e.raw_os_error(),
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                );
                if let Some(suppressed) = log.admit() {
                    warn!(error = %e, suppressed, ?backoff, "accepting a client failed");
                }
                if exhausted {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}

async fn refuse(mut stream: UnixStream) {
    let r = Response::error(
        ErrorKind::TooManyClients,
        "too many clients are connected; try again later",
    );
    let _ = send(&mut stream, &r, Duration::from_secs(1)).await;
    // The last close of a client's socket discards what the client sent and
    // nobody read, including descriptors in flight, whose own last close
    // may block (a lingering TCP socket): the closer does it.
    match stream.into_std() {
        Ok(s) => closer::close(vec![OwnedFd::from(s)]),
        Err(e) => debug!(error = %e, "deregistering a refused client's socket failed"),
    }
}

/// The closer's copy of a client's socket, taken as its connection ends:
/// dropped after the connection's own copy (a later field), it makes the
/// closer do the socket's last close, which discards descriptors the client
/// sent and nobody read (their own last close may block).
#[derive(Default)]
struct LastClose(Option<OwnedFd>);

impl Drop for LastClose {
    fn drop(&mut self) {
        closer::close(self.0.take().into_iter().collect());
    }
}

/// Writes `response`, giving up after `timeout`: a client that does not
/// read its replies loses its connection (and its client slot) instead of
/// holding them forever.
async fn send(stream: &mut UnixStream, response: &Response, timeout: Duration) -> io::Result<()> {
    let frame = protocol::encode(response).map_err(io::Error::other)?;
    match tokio::time::timeout(timeout, stream.write_all(&frame)).await {
        Ok(written) => written,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the client did not read its reply within {timeout:?}"),
        )),
    }
}

/// Why reading a request failed.
#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("reading from the client failed")]
    Io(#[from] io::Error),
    #[error("the client closed the connection in the middle of a frame")]
    Truncated,
    #[error("the client sent more descriptors than a request takes ({max})")]
    TooManyFds { max: usize },
    #[error(
        "the daemon is out of file descriptors (EMFILE/ENFILE): the descriptors the request \
         carried could not be received; try again later"
    )]
    OutOfDescriptors,
}

/// A client's connection; its socket and any descriptors it carried are
/// closed off the runtime's thread.
struct Conn {
    stream: UnixStream,
    decoder: FrameDecoder,
    /// Descriptors received with the frame being read (closed off-thread
    /// unless taken).
    fds: Foreign,
    /// How many descriptors the connection may carry before a frame is
    /// complete: the most any request takes, none inside a session.
    max_fds: usize,
    buf: Vec<u8>,
    /// Last: dropped after `stream`.
    last_close: LastClose,
}

impl Drop for Conn {
    fn drop(&mut self) {
        match self.stream.as_fd().try_clone_to_owned() {
            Ok(dup) => self.last_close.0 = Some(dup),
            Err(e) => {
                debug!(error = %e, "duplicating a client's socket to close it off-thread failed")
            }
        }
    }
}

impl Conn {
    /// The next frame's body; `None` at a clean end of stream.
    async fn next_frame(&mut self) -> Result<Option<Vec<u8>>, ReadError> {
        loop {
            if let Some(frame) = self.decoder.next_frame()? {
                return Ok(Some(frame));
            }
            let Self {
                stream, fds, buf, ..
            } = self;
            let received = loop {
                stream.readable().await?;
                match stream.try_io(Interest::READABLE, || {
                    sys::recv_with_fds(stream.as_fd(), buf, &mut fds.0)
                }) {
                    Ok(r) => break r,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e.into()),
                }
            };
            if received.truncated {
                return Err(ReadError::OutOfDescriptors);
            }
            if self.fds.0.len() > self.max_fds {
                return Err(ReadError::TooManyFds { max: self.max_fds });
            }
            if received.bytes == 0 {
                return if self.decoder.buffered() == 0 {
                    Ok(None)
                } else {
                    Err(ReadError::Truncated)
                };
            }
            let chunk = self.buf.get(..received.bytes).unwrap_or(&[]);
            self.decoder.push(chunk);
        }
    }
}

async fn connection(daemon: Arc<Daemon>, stream: UnixStream, permit: OwnedSemaphorePermit) {
    let mut conn = Conn {
        stream,
        decoder: FrameDecoder::new(),
        fds: Foreign::default(),
        max_fds: protocol::MAX_FDS,
        buf: vec![0; 64 * 1024],
        last_close: LastClose::default(),
    };
    let cred = match conn.stream.peer_cred() {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "reading the client's credentials (SO_PEERCRED) failed");
            return;
        }
    };
    if !daemon.authorized(cred.uid(), cred.gid(), cred.pid()) {
        if let Some(suppressed) = daemon.events.note(ControlEvent::Unauthorized) {
            info!(uid = cred.uid(), gid = cred.gid(), pid = ?cred.pid(), suppressed,
                "refusing a client: not allowed by uid or group");
        }
        let r = Response::error(
            ErrorKind::PermissionDenied,
            format!(
                "uid {} (gid {}) may not use the vfio-intx daemon (allowed: root, the daemon's uid, \
                 the socket group)",
                cred.uid(),
                cred.gid()
            ),
        );
        let _ = send(&mut conn.stream, &r, Duration::from_secs(1)).await;
        return;
    }
    let peer = Peer {
        uid: cred.uid(),
        pid: cred.pid(),
        operator: daemon.operator(cred.uid(), cred.gid(), cred.pid()),
    };
    let timeout = daemon.config().daemon.client_timeout;
    loop {
        let frame = match tokio::time::timeout(timeout, conn.next_frame()).await {
            Err(_) => {
                if let Some(suppressed) = daemon.events.note(ControlEvent::Timeout) {
                    info!(
                        ?timeout,
                        suppressed, "closing an idle client: no complete request in time"
                    );
                }
                let r = Response::error(
                    ErrorKind::Timeout,
                    format!("no complete request within {timeout:?}; closing"),
                );
                let _ = send(&mut conn.stream, &r, timeout).await;
                return;
            }
            Ok(Ok(None)) => return,
            Ok(Ok(Some(frame))) => frame,
            Ok(Err(e)) => {
                let kind = match e {
                    ReadError::Frame(FrameError::TooLarge { .. }) => ErrorKind::FrameTooLarge,
                    ReadError::OutOfDescriptors => ErrorKind::OutOfDescriptors,
                    _ => ErrorKind::BadRequest,
                };
                if let Some(suppressed) = daemon.events.note(ControlEvent::BadFrame) {
                    info!(error = %crate::error_chain(&e), suppressed, "closing a client after a bad frame");
                }
                let r = Response::error(kind, crate::error_chain(&e));
                let _ = send(&mut conn.stream, &r, timeout).await;
                return;
            }
        };
        let request: Request = match protocol::decode(&frame) {
            Ok(r) => r,
            Err(e) => {
                if let Some(suppressed) = daemon.events.note(ControlEvent::BadFrame) {
                    info!(error = %crate::error_chain(&e), suppressed, "closing a client after a bad frame");
                }
                let r = Response::error(ErrorKind::BadRequest, crate::error_chain(&e));
                let _ = send(&mut conn.stream, &r, timeout).await;
                return;
            }
        };
        let fds = std::mem::take(&mut conn.fds);
        if fds.0.len() != request.fds_expected() {
            if let Some(suppressed) = daemon.events.note(ControlEvent::BadFrame) {
                info!(
                    fds = fds.0.len(),
                    expected = request.fds_expected(),
                    suppressed,
                    "closing a client after a bad frame: wrong number of descriptors"
                );
            }
            let r = Response::error(
                ErrorKind::BadRequest,
                format!(
                    "the request carries {} descriptor(s), {} expected",
                    fds.0.len(),
                    request.fds_expected()
                ),
            );
            let _ = send(&mut conn.stream, &r, timeout).await;
            return;
        }
        if let Request::Session {
            bdf,
            vfio_device_fd,
            path,
        } = request
        {
            let attached = attach(&daemon, bdf, vfio_device_fd, path, fds).await;
            session(&daemon, conn, attached, Some(permit), peer.pid, timeout).await;
            return;
        }
        let restart = request == Request::Restart;
        let response = daemon.handle(request, &peer).await;
        let sent = send(&mut conn.stream, &response, timeout).await;
        if restart && matches!(response, Response::Ok { .. }) {
            // Answered (or the requester left): the signal loop exits.
            daemon.restart.notify_one();
        }
        if sent.is_err() {
            return;
        }
    }
}

/// Answers a session request; on success the connection is the session
/// until the VMM closes it or dies. A session carries no descriptors; one
/// that sends any, or does not read the refusal of a further request
/// within `timeout`, ends.
async fn session(
    daemon: &Arc<Daemon>,
    mut conn: Conn,
    attached: Result<Attached, Response>,
    permit: Option<OwnedSemaphorePermit>,
    owner: Option<i32>,
    timeout: Duration,
) {
    conn.max_fds = 0;
    let dev = match attached {
        Ok(Attached { dev, report, keep }) => {
            // Into the fd store and the record before the VMM hears of
            // it: a crash before the answer is a request the VMM sees fail
            // (and retries), never a session it believes in that the next
            // process does not know.
            if let Some((irqfd, resample)) = keep {
                crate::daemon::resume::store_session(
                    &dev,
                    &irqfd,
                    &resample,
                    conn.stream.as_fd(),
                    owner,
                );
            }
            // A resumed session was answered by the previous process.
            if let Some(report) = report {
                if send(&mut conn.stream, &Response::ok(&report), timeout)
                    .await
                    .is_err()
                {
                    end_session(daemon, dev).await;
                    return;
                }
            }
            dev
        }
        Err(r) => {
            let _ = send(&mut conn.stream, &r, timeout).await;
            return;
        }
    };
    lock(&daemon.session_owners).insert(dev.bdf(), owner);
    if let Some(suppressed) = daemon.events.note(ControlEvent::SessionStarted) {
        info!(bdf = %dev.bdf(), suppressed, "VMM session started");
    }
    // Sessions are bounded by the devices (one each), not by the client
    // limit, which is for short requests.
    drop(permit);
    // The session lasts as long as the connection: until the VMM closes it
    // or dies (the kernel closes it then), or the device goes away (reload,
    // shutdown), which closes the connection. It takes no further requests.
    loop {
        tokio::select! {
            frame = conn.next_frame() => match frame {
                Ok(Some(_)) => {
                    let r = Response::error(
                        ErrorKind::BadRequest,
                        "a session connection takes no further requests",
                    );
                    if send(&mut conn.stream, &r, timeout).await.is_err() {
                        break;
                    }
                }
                Ok(None) | Err(_) => break,
            },
            () = dev.gone() => {
                info!(bdf = %dev.bdf(), "the device is no longer the daemon's; closing its VMM session");
                break;
            }
        }
    }
    let bdf = dev.bdf();
    end_session(daemon, dev).await;
    if let Some(suppressed) = daemon.events.note(ControlEvent::SessionEnded) {
        info!(%bdf, suppressed, "VMM session ended; its descriptors are released");
    }
    // `conn` closes only now: a VMM that shut down its writing side and
    // waits for the end of the stream knows the daemon has let go.
}

/// Detaches a session; a VMM's own device is released with it (INTx
/// disarmed, the daemon's copy of its fd closed) before this returns.
async fn end_session(daemon: &Arc<Daemon>, dev: Arc<ManagedDevice>) {
    lock(&daemon.session_owners).remove(&dev.bdf());
    crate::daemon::resume::forget_session(&dev);
    dev.detach();
    if dev.handed_over.is_some() {
        daemon.release_handed_over(dev).await;
    }
}

/// An attached session: its device, the answer to send (none for a
/// session resumed after a restart: the previous process answered), and
/// the daemon's copies of its irqfd and resample eventfd for the fd store
/// (none without a store, and for a resumed session, whose are there).
struct Attached {
    dev: Arc<ManagedDevice>,
    report: Option<SessionReport>,
    keep: Option<(OwnedFd, OwnedFd)>,
}

/// Re-attaches a session kept in the fd store across the daemon's restart,
/// on its stored connection, with its stored irqfd and resample eventfd,
/// and starts serving it on a task of its own; whether it was attached. A
/// VMM that died meanwhile left a connection at its end: the session ends
/// at once, as any session whose VMM dies.
pub(crate) async fn resume_session(
    daemon: Arc<Daemon>,
    dev: Arc<ManagedDevice>,
    conn: OwnedFd,
    irqfd: OwnedFd,
    resample: OwnedFd,
    owner: Option<i32>,
) -> bool {
    let bdf = dev.bdf();
    let stream = std::os::unix::net::UnixStream::from(conn);
    let stream = match stream
        .set_nonblocking(true)
        .and_then(|()| UnixStream::from_std(stream))
    {
        Ok(s) => s,
        Err(e) => {
            warn!(%bdf, error = %e, "registering a resumed session's connection failed; the session ends");
            crate::daemon::resume::forget_session(&dev);
            return false;
        }
    };
    let attached = dev
        .attach(sys::into_eventfd(irqfd), sys::into_eventfd(resample))
        .await;
    if let Err(e) = attached {
        warn!(%bdf, error = %crate::error_chain(&e), "re-attaching a resumed session failed; it ends");
        crate::daemon::resume::forget_session(&dev);
        return false;
    }
    info!(%bdf, "VMM session resumed on its stored connection");
    let conn = Conn {
        stream,
        decoder: FrameDecoder::new(),
        fds: Foreign::default(),
        max_fds: 0,
        buf: vec![0; 4096],
        last_close: LastClose::default(),
    };
    let timeout = daemon.config().daemon.client_timeout;
    // Its entries are still in the store: kept, not stored again.
    let attached = Attached {
        dev,
        report: None,
        keep: None,
    };
    tokio::spawn(async move {
        session(&daemon, conn, Ok(attached), None, owner, timeout).await;
    });
    true
}

/// Validates a session request and attaches it.
async fn attach(
    daemon: &Arc<Daemon>,
    claimed: Option<Bdf>,
    vfio_device_fd: bool,
    path: Option<PathSetting>,
    mut fds: Foreign,
) -> Result<Attached, Response> {
    let mut next = || {
        fds.next()
            .ok_or_else(|| Response::error(ErrorKind::BadRequest, "missing descriptor"))
    };
    let bad =
        |e: crate::kvm::KvmError| Response::error(ErrorKind::BadRequest, crate::error_chain(&e));
    let device_fd = if vfio_device_fd || claimed.is_none() {
        let device = next()?;
        if let Err(e) = crate::vfio::handover::check_device_fd(device.as_fd()) {
            closer::close(vec![device]);
            return Err(Response::error(
                ErrorKind::BadRequest,
                crate::error_chain(&e),
            ));
        }
        Some(device)
    } else {
        None
    };
    let (irq_what, resample_what) = if device_fd.is_some() {
        (
            "the irqfd (second descriptor)",
            "the resample eventfd (third descriptor)",
        )
    } else {
        (
            "the irqfd (first descriptor)",
            "the resample eventfd (second descriptor)",
        )
    };
    let irqfd = next()?;
    let resample = next()?;
    if let Err(e) =
        validate_eventfd(&irqfd, irq_what).and_then(|()| validate_eventfd(&resample, resample_what))
    {
        closer::close(vec![irqfd, resample]);
        closer::close(device_fd.into_iter().collect());
        return Err(bad(e));
    }
    let (irqfd, resample) = (sys::into_eventfd(irqfd), sys::into_eventfd(resample));
    let Some(device) = device_fd else {
        // `claimed` is Some here: without an address the first descriptor
        // is a device fd.
        let Some(bdf) = claimed else {
            return Err(Response::error(ErrorKind::BadRequest, "missing \"bdf\""));
        };
        if path.is_some() {
            return Err(Response::error(
                ErrorKind::BadRequest,
                format!(
                    "{bdf}: \"path\" applies to a VMM's own device fd; the daemon's \
                     configuration sets it for devices the daemon owns"
                ),
            ));
        }
        let dev = daemon.device(bdf).ok_or_else(|| not_owned(bdf))?;
        // The daemon's copies for the fd store, while it can still make
        // them (a session that outlives the daemon's restart).
        let keep = match (sys::dup(&irqfd), sys::dup(&resample)) {
            (Ok(i), Ok(r)) if crate::daemon::fdstore::enabled() => Some((i, r)),
            _ => None,
        };
        dev.attach(irqfd, resample).await.map_err(attach_error)?;
        let report = SessionReport {
            bdf,
            path: dev.status().path,
            identity: None,
        };
        return Ok(Attached {
            dev,
            report: Some(report),
            keep,
        });
    };
    if let Some(bdf) = claimed.filter(|b| daemon.device(*b).is_some()) {
        return Err(Response::error(
            ErrorKind::Busy,
            format!(
                "{bdf}: the daemon owns this device already; start the session with \"bdf\" \
                 alone and pass the irqfd and resample eventfd"
            ),
        ));
    }
    let dev = adopt(daemon, device, claimed, path.unwrap_or_default()).await?;
    // The daemon's copies for the fd store: the session on the VMM's own
    // device fd outlives the daemon's restart too.
    let keep = match (sys::dup(&irqfd), sys::dup(&resample)) {
        (Ok(i), Ok(r)) if crate::daemon::fdstore::enabled() => Some((i, r)),
        _ => None,
    };
    if let Err(e) = dev.attach(irqfd, resample).await {
        daemon.release_handed_over(dev).await;
        return Err(attach_error(e));
    }
    let report = SessionReport {
        bdf: dev.bdf(),
        path: dev.status().path,
        identity: dev.handed_over.map(|i| i.to_string()),
    };
    Ok(Attached {
        dev,
        report: Some(report),
        keep,
    })
}

fn attach_error(e: AttachError) -> Response {
    failure(&e)
}

/// Takes a VMM's own VFIO device fd: identifies it, arms it and lists it
/// among the daemon's devices for the session.
async fn adopt(
    daemon: &Arc<Daemon>,
    device: OwnedFd,
    claimed: Option<Bdf>,
    path: PathSetting,
) -> Result<Arc<ManagedDevice>, Response> {
    let joined = tokio::task::spawn_blocking(move || {
        let backend = VfioBackend::from_device_fd(device, claimed)?;
        let config = DeviceConfig {
            path,
            ..DeviceConfig::defaults(backend.bdf(), BackendKind::Vfio)
        };
        ManagedDevice::adopt(config, backend)
    })
    .await;
    let failed = |e: &DeviceError| failure(e);
    let (dev, rx) = match joined {
        Ok(Ok(opened)) => opened,
        Ok(Err(e)) => return Err(failed(&e)),
        Err(e) => {
            return Err(Response::error(
                ErrorKind::Failed,
                format!("taking the device fd over could not run: {e}"),
            ))
        }
    };
    if let Err(e) = daemon.list(&dev, rx) {
        let response = failed(&e);
        let devs = vec![dev];
        let _ = tokio::task::spawn_blocking(move || service::hand_back(devs)).await;
        return Err(response);
    }
    Ok(dev)
}

pub(crate) fn not_owned(bdf: Bdf) -> Response {
    Response::error(
        ErrorKind::NotFound,
        format!("{bdf}: not a device this daemon owns"),
    )
}

/// The supplementary groups of process `pid` (empty if unreadable).
fn supplementary_groups(pid: i32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Groups:")).map(|g| {
                g.split_whitespace()
                    .filter_map(|n| n.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Whether a peer is in `group`: its primary group from SO_PEERCRED, or a
/// supplementary group from its /proc status.
fn in_group(group: Option<u32>, gid: u32, pid: Option<i32>) -> bool {
    group.is_some_and(|group| {
        gid == group || pid.is_some_and(|pid| supplementary_groups(pid).contains(&group))
    })
}

impl Daemon {
    /// Root, the daemon's own uid, and members of the socket group or the
    /// admin group.
    pub(crate) fn authorized(&self, uid: u32, gid: u32, pid: Option<i32>) -> bool {
        self.operator(uid, gid, pid) || in_group(self.group, gid, pid)
    }

    /// Operators: root, the daemon's own uid, and members of the admin
    /// group. Everyone else allowed in is a VMM.
    pub(crate) fn operator(&self, uid: u32, gid: u32, pid: Option<i32>) -> bool {
        uid == 0 || uid == self.euid || in_group(self.admin_group, gid, pid)
    }
}
