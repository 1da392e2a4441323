//! systemd's file-descriptor store: what the daemon needs to resume after
//! its own restart or crash, kept by the service manager (`FDSTORE=1` with
//! `FDNAME=` and `FDPOLL=0`, `FDSTOREREMOVE=1`; see sd_notify(3)) and
//! handed back at the next start (`LISTEN_FDS`, `LISTEN_PID`,
//! `LISTEN_FDNAMES`; see sd_listen_fds(3)).
//!
//! The store is used only when the manager offers one (`FDSTORE=<max>`
//! beside `NOTIFY_SOCKET`, [`enabled`]). Each entry is named per device and
//! role ([`name`]): a BDF has colons,
//! which systemd refuses in a name, so `0000:00:04.0` is `0000-00-04.0`.
//! An entry is stored when what it holds comes into being (a device
//! brought up, a session attached, the control socket bound) and removed
//! when it ends. Every message is sent without blocking, like the rest of
//! `systemd.rs`: a message the manager's full queue refuses waits, in
//! order, in a queue of its own that a thread retries every few
//! milliseconds (never dropped; each retry counted, the first logged), so
//! that a manager that stops reading never freezes the daemon and a
//! removal never overtakes its store. [`flush`] waits for that queue to
//! empty (a restart does, before it exits).
//!
//! `FDPOLL=0` goes with every entry: systemd would otherwise drop an entry
//! when it reports POLLHUP or POLLERR, and a session whose VMM hung up
//! while the daemon was away is something the daemon must see and end
//! itself.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::pci::Bdf;

/// The listening control socket's entry.
pub(crate) const CONTROL_SOCKET: &str = "control-socket";

/// The roles of a device's entries.
pub(crate) mod role {
    /// The simulated device's state (a memfd).
    pub(crate) const SIM_STATE: &str = "sim-state";
    /// What reached the session's irqfd (a memfd: the sink's ledger).
    pub(crate) const DELIVERY: &str = "delivery";
    /// The VFIO container.
    pub(crate) const VFIO_CONTAINER: &str = "vfio-container";
    /// The VFIO group.
    pub(crate) const VFIO_GROUP: &str = "vfio-group";
    /// The VFIO device.
    pub(crate) const VFIO_DEVICE: &str = "vfio-device";
    /// The uio device (`/dev/uioN`).
    pub(crate) const UIO: &str = "uio";
    /// The device's sysfs `config`, uio_pci_generic's config access.
    pub(crate) const UIO_CONFIG: &str = "uio-config";
    /// The engine's own trigger eventfd (user-space path).
    pub(crate) const TRIGGER: &str = "trigger";
    /// The session's KVM irqfd.
    pub(crate) const SESSION_IRQFD: &str = "session-irqfd";
    /// The session's KVM resample eventfd.
    pub(crate) const SESSION_RESAMPLE: &str = "session-resample";
    /// The session's connection.
    pub(crate) const SESSION_CONN: &str = "session-conn";
}

/// The store name of `bdf`'s entry for `role`: `0000-00-04.0.trigger`.
pub(crate) fn name(bdf: Bdf, role: &str) -> String {
    format!("{}.{role}", bdf.to_string().replace(':', "-"))
}

/// Splits a store name into the device's address and the role; `None` for
/// a name that is not a device's.
pub(crate) fn parse(name: &str) -> Option<(Bdf, &str)> {
    let mut parts = name.splitn(3, '.');
    let (dbs, function, role) = (parts.next()?, parts.next()?, parts.next()?);
    let bdf = format!("{}.{function}", dbs.replace('-', ":"))
        .parse()
        .ok()?;
    Some((bdf, role))
}

enum Message {
    Store { name: String, fd: OwnedFd },
    Remove { name: String },
}

impl Message {
    fn text(&self) -> String {
        match self {
            Message::Store { name, .. } => format!("FDSTORE=1\nFDNAME={name}\nFDPOLL=0\n"),
            Message::Remove { name } => format!("FDSTOREREMOVE=1\nFDNAME={name}\n"),
        }
    }
}

struct Queue {
    messages: Mutex<VecDeque<Message>>,
    changed: Condvar,
    flusher: AtomicBool,
}

static QUEUE: OnceLock<Queue> = OnceLock::new();
/// Messages the manager's full queue refused at first, retried.
static RETRIED: AtomicU64 = AtomicU64::new(0);
/// Messages the manager refused for good (an error other than a full queue).
static FAILED: AtomicU64 = AtomicU64::new(0);

fn queue() -> &'static Queue {
    QUEUE.get_or_init(|| Queue {
        messages: Mutex::new(VecDeque::new()),
        changed: Condvar::new(),
        flusher: AtomicBool::new(false),
    })
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Whether a service manager keeps descriptors for the daemon: it says so
/// with `FDSTORE=<max>` (systemd 254+ sets it when the unit has
/// `FileDescriptorStoreMax=`; the shipped unit also sets it for older
/// ones) beside `NOTIFY_SOCKET`. A manager without a store would close
/// what it is sent, or (a plain socket) keep it forever.
pub(crate) fn enabled() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
        && std::env::var("FDSTORE")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .is_some_and(|max| max > 0)
}

/// The entries in the store now, as far as this process knows: the ones
/// it stored and the ones it kept from the previous instance.
static STORED: Mutex<std::collections::BTreeSet<String>> =
    Mutex::new(std::collections::BTreeSet::new());

/// Stores a duplicate of `fd` as `name`.
pub(crate) fn store(name: String, fd: BorrowedFd<'_>) {
    if !enabled() {
        return;
    }
    lock(&STORED).insert(name.clone());
    match fd.try_clone_to_owned() {
        Ok(fd) => send(Message::Store { name, fd }),
        Err(e) => {
            FAILED.fetch_add(1, Ordering::Relaxed);
            warn!(%name, error = %e, "duplicating a descriptor for the fd store failed; a restart cannot resume it");
        }
    }
}

/// Removes the entry `name` (it is gone).
pub(crate) fn remove(name: String) {
    if enabled() {
        lock(&STORED).remove(&name);
        send(Message::Remove { name });
    }
}

/// Notes that the store still holds `name` from the previous instance
/// (systemd keeps what it passes at start).
pub(crate) fn kept(name: &str) {
    if enabled() {
        lock(&STORED).insert(name.to_owned());
    }
}

/// Removes every entry this process knows of (a stop: nothing is to be
/// resumed).
pub(crate) fn remove_all() {
    let names = std::mem::take(&mut *lock(&STORED));
    for name in names {
        send(Message::Remove { name });
    }
}

/// How many store messages had to wait for room, and how many failed.
pub(crate) fn counts() -> (u64, u64) {
    (
        RETRIED.load(Ordering::Relaxed),
        FAILED.load(Ordering::Relaxed),
    )
}

fn send(message: Message) {
    let q = queue();
    let mut messages = lock(&q.messages);
    if messages.is_empty() {
        match send_now(&message) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => {
                refused(&message, &e);
                return;
            }
        }
    }
    if RETRIED.fetch_add(1, Ordering::Relaxed) == 0 {
        warn!(
            "the service manager's notify socket is full; fd store messages wait and are retried"
        );
    }
    messages.push_back(message);
    if !q.flusher.swap(true, Ordering::SeqCst) {
        let spawned = std::thread::Builder::new()
            .name("vfio-intx-fdstore".into())
            .stack_size(128 * 1024)
            .spawn(|| flusher(queue()));
        if let Err(e) = spawned {
            q.flusher.store(false, Ordering::SeqCst);
            warn!(error = %e, "starting the fd store's retry thread failed; retried at the next message");
        }
    }
    q.changed.notify_all();
}

fn refused(message: &Message, e: &io::Error) {
    FAILED.fetch_add(1, Ordering::Relaxed);
    let name = match message {
        Message::Store { name, .. } | Message::Remove { name } => name,
    };
    warn!(%name, error = %e, "the service manager refused an fd store message");
}

fn flusher(q: &Queue) {
    let mut messages = lock(&q.messages);
    loop {
        let Some(front) = messages.front() else {
            q.changed.notify_all();
            messages = q
                .changed
                .wait(messages)
                .unwrap_or_else(PoisonError::into_inner);
            continue;
        };
        match send_now(front) {
            Ok(()) => {
                messages.pop_front();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                drop(messages);
                std::thread::sleep(Duration::from_millis(5));
                messages = lock(&q.messages);
            }
            Err(e) => {
                if let Some(m) = messages.pop_front() {
                    refused(&m, &e);
                }
            }
        }
        if messages.is_empty() {
            q.changed.notify_all();
        }
    }
}

/// Waits up to `timeout` for every queued message to reach the service
/// manager; whether they all did.
pub(crate) fn flush(timeout: Duration) -> bool {
    let q = queue();
    let deadline = Instant::now() + timeout;
    let mut messages = lock(&q.messages);
    while !messages.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        messages = q
            .changed
            .wait_timeout(messages, left.min(Duration::from_millis(10)))
            .unwrap_or_else(PoisonError::into_inner)
            .0;
    }
    true
}

/// One datagram with `MSG_DONTWAIT`: `WouldBlock` while the manager's
/// queue is full.
fn send_now(message: &Message) -> io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(());
    };
    let addr = match path.as_encoded_bytes().strip_prefix(b"@") {
        Some(name) => UnixAddr::new_abstract(name)?,
        None => UnixAddr::new(path.as_os_str())?,
    };
    let sock = std::os::unix::net::UnixDatagram::unbound()?;
    let text = message.text();
    let iov = [IoSlice::new(text.as_bytes())];
    let raw;
    let cmsgs: &[ControlMessage<'_>] = match message {
        Message::Store { fd, .. } => {
            raw = [fd.as_raw_fd()];
            &[ControlMessage::ScmRights(&raw)]
        }
        Message::Remove { .. } => &[],
    };
    let sent = sendmsg(
        sock.as_fd().as_raw_fd(),
        &iov,
        cmsgs,
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        Some(&addr),
    )?;
    if sent == text.len() {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "incomplete notification",
        ))
    }
}

/// Descriptors the service manager passed at exec, by name, in order:
/// `LISTEN_FDS` descriptors from 3 when `LISTEN_PID` is this process,
/// named by `LISTEN_FDNAMES` (colon-separated; `unknown` when missing).
/// The variables are removed so that no child inherits them.
pub(crate) fn take_passed() -> Vec<(String, OwnedFd)> {
    let pid = std::env::var("LISTEN_PID").ok();
    let count = std::env::var("LISTEN_FDS").ok();
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    let (Some(pid), Some(count)) = (pid, count) else {
        return Vec::new();
    };
    if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
        info!(
            listen_pid = %pid,
            "LISTEN_FDS are for another process (LISTEN_PID); ignored"
        );
        return Vec::new();
    }
    let Ok(count) = count.trim().parse::<i32>() else {
        warn!(listen_fds = %count, "LISTEN_FDS is not a number; no descriptors taken");
        return Vec::new();
    };
    let mut names = names.split(':');
    let mut out = Vec::new();
    for raw in 3..3i32.saturating_add(count.clamp(0, 4096)) {
        let name = names.next().unwrap_or("unknown").to_owned();
        match crate::daemon::sys::own_passed_fd(raw) {
            Ok(fd) => out.push((name, fd)),
            Err(e) => {
                warn!(fd = raw, %name, error = %e, "a descriptor LISTEN_FDS names is not open")
            }
        }
    }
    out
}

/// What kind of file a descriptor is, from its /proc link and `fstat`:
/// what a stored entry is checked against before it is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FdKind {
    /// An eventfd.
    EventFd,
    /// A memfd.
    Memfd,
    /// A Unix stream socket that listens.
    Listener,
    /// A connected Unix stream socket.
    Connection,
    /// The VFIO container (`/dev/vfio/vfio`).
    VfioContainer,
    /// A VFIO group (`/dev/vfio/N`).
    VfioGroup,
    /// A VFIO device fd.
    VfioDevice,
    /// A uio device (`/dev/uioN`).
    Uio,
    /// A PCI device's sysfs `config`.
    SysfsConfig,
    /// Anything else.
    Other,
}

impl std::fmt::Display for FdKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FdKind::EventFd => "an eventfd",
            FdKind::Memfd => "a memfd",
            FdKind::Listener => "a listening socket",
            FdKind::Connection => "a connected socket",
            FdKind::VfioContainer => "a VFIO container",
            FdKind::VfioGroup => "a VFIO group",
            FdKind::VfioDevice => "a VFIO device",
            FdKind::Uio => "a uio device",
            FdKind::SysfsConfig => "a sysfs config file",
            FdKind::Other => "something else",
        })
    }
}

/// The kind a role's entry must be.
pub(crate) fn expected_kind(role: &str) -> Option<FdKind> {
    Some(match role {
        role::SIM_STATE | role::DELIVERY => FdKind::Memfd,
        role::VFIO_CONTAINER => FdKind::VfioContainer,
        role::VFIO_GROUP => FdKind::VfioGroup,
        role::VFIO_DEVICE => FdKind::VfioDevice,
        role::UIO => FdKind::Uio,
        role::UIO_CONFIG => FdKind::SysfsConfig,
        role::TRIGGER | role::SESSION_IRQFD | role::SESSION_RESAMPLE => FdKind::EventFd,
        role::SESSION_CONN => FdKind::Connection,
        _ => return None,
    })
}

/// What `fd` is.
pub(crate) fn kind_of(fd: BorrowedFd<'_>) -> FdKind {
    use nix::sys::socket::{getsockopt, sockopt};
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map(|l| l.to_string_lossy().into_owned())
        .unwrap_or_default();
    if link.starts_with("socket:[") {
        let unix_stream = getsockopt(&fd, sockopt::SockType)
            .is_ok_and(|t| t == nix::sys::socket::SockType::Stream);
        if !unix_stream {
            return FdKind::Other;
        }
        return match getsockopt(&fd, sockopt::AcceptConn) {
            Ok(true) => FdKind::Listener,
            Ok(false) => FdKind::Connection,
            Err(_) => FdKind::Other,
        };
    }
    match link.as_str() {
        "anon_inode:[eventfd]" => FdKind::EventFd,
        "anon_inode:[vfio-device]" => FdKind::VfioDevice,
        "/dev/vfio/vfio" => FdKind::VfioContainer,
        l if l.starts_with("/memfd:") => FdKind::Memfd,
        l if l.starts_with("/dev/vfio/") => FdKind::VfioGroup,
        l if l.starts_with("/dev/uio") => FdKind::Uio,
        l if l.starts_with("/sys/") && l.ends_with("/config") => FdKind::SysfsConfig,
        _ => FdKind::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_no_colon_and_parse_back() {
        let bdf: Bdf = "0000:00:04.0".parse().unwrap_or_else(|_| unreachable!());
        let n = name(bdf, role::SESSION_IRQFD);
        assert_eq!(n, "0000-00-04.0.session-irqfd");
        assert!(!n.contains(':') && n.len() <= 255 && n.is_ascii());
        assert_eq!(parse(&n), Some((bdf, role::SESSION_IRQFD)));
        assert_eq!(parse(CONTROL_SOCKET), None);
        assert_eq!(parse("0000-00-04.0"), None);
    }

    #[test]
    fn kinds_are_told_apart() {
        let efd = vmm_sys_util::eventfd::EventFd::new(0).unwrap_or_else(|e| unreachable!("{e}"));
        let efd = crate::daemon::sys::dup(&efd).unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(kind_of(efd.as_fd()), FdKind::EventFd);
        let m = crate::daemon::sys::memfd("x").unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(kind_of(m.as_fd()), FdKind::Memfd);
        let (a, _b) =
            std::os::unix::net::UnixStream::pair().unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(kind_of(a.as_fd()), FdKind::Connection);
        let dir = tempfile::tempdir().unwrap_or_else(|e| unreachable!("{e}"));
        let l = std::os::unix::net::UnixListener::bind(dir.path().join("s"))
            .unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(kind_of(l.as_fd()), FdKind::Listener);
        let (p, _q) = nix::unistd::pipe().unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(kind_of(p.as_fd()), FdKind::Other);
    }
}
