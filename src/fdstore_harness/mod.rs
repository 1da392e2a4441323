//! A test-owned service manager with systemd's file-descriptor store
//! (features `testkit` and `daemon`): it starts a program as systemd
//! starts a `Type=notify` service's main process, reads its `NOTIFY_SOCKET`
//! and keeps what it stores, and restarts it with the store, so tests,
//! the tier-3 guest and the benchmarks can restart the daemon exactly as
//! `systemctl restart` or a crash with `Restart=` would.
//!
//! What it honours, read from systemd's `src/core/service.c` and
//! `src/core/manager.c` (not guessed):
//!
//! - The child's environment: `NOTIFY_SOCKET`, `FDSTORE=<max>` when
//!   `FileDescriptorStoreMax=` is not 0 (systemd 254+), and with stored
//!   fds `LISTEN_FDS=n`, `LISTEN_FDNAMES=a:b:…` and `LISTEN_PID=<the
//!   child's own pid>`, the fds as 3, 4, … (not close-on-exec), nothing
//!   else of the test process's open; `WATCHDOG_USEC`/`WATCHDOG_PID` with
//!   [`StoreOptions::watchdog`]. `LISTEN_PID`/`WATCHDOG_PID` are written by
//!   the child between `fork` and `execve`, as systemd's executor does:
//!   the only way the value is the pid of the process that reads it
//!   (`std::process::Command` builds its environment before `fork`, and a
//!   `sh -c 'LISTEN_PID=$$ exec …'` wrapper adds an exec and a shell).
//! - Datagrams need `SCM_CREDENTIALS` (the socket has `SO_PASSCRED`); with
//!   [`NotifyAccess::Main`] only the main pid's count; one with a NUL byte
//!   or truncated (over 4096 bytes) is ignored. Descriptors of an ignored
//!   message, or of one without `FDSTORE=1`, are closed.
//! - `FDSTORE=1` stores every fd of the message under `FDNAME=` (the first
//!   one); no name, or an invalid one (over 255 bytes, not printable
//!   ASCII, a `:`), gives the name `stored` — systemd logs a warning and
//!   still stores the fd, it does not refuse it. Entries with the same
//!   name are all kept; an fd that is the same open file description as a
//!   stored one is suppressed (closed), whatever its name. Past
//!   `FileDescriptorStoreMax=` the rest of the message's fds are closed.
//! - `FDSTOREREMOVE=1` with a valid `FDNAME=` removes (closes) every entry
//!   of that name; it wins over `FDSTORE=1` in the same message.
//! - Stored fds are polled; POLLHUP or POLLERR drops one, unless it came
//!   with `FDPOLL=0`. Fds that cannot be polled (regular files) are kept.
//! - Order on the next start: systemd prepends each new entry to its list
//!   and passes the list from the head, so the MOST RECENTLY stored fd is
//!   fd 3. A service must find its fds by name, never by position.
//! - A stop ([`Supervisor::stop`]) releases the store
//!   (`FileDescriptorStorePreserve=restart`, the default); a restart,
//!   whether the process was signalled or killed, keeps it. Datagrams the
//!   old process queued before it died are processed before the restart,
//!   still as the main pid's (systemd dispatches the notify socket before
//!   SIGCHLD).
//!
//! Cross-checked against a real systemd 252 user manager (`systemd --user`
//! with `systemd-run -p Type=notify -p FileDescriptorStoreMax=4 -p
//! Restart=always`): a service storing `state`, `irqfd`, `state`, `conn`
//! got `LISTEN_FDNAMES=conn:state:irqfd:state` and `LISTEN_PID=<its pid>`
//! after `systemctl restart` and after `kill -9`, and `systemctl stop` left
//! `NFileDescriptorStore=0`. (252 predates `$FDSTORE`, which 254 added.)
//! Note for a service: `systemctl restart` and `systemctl stop` send the
//! same KillSignal= (SIGTERM); the signal alone does not say which.
//!
//! `STATUS=`, `READY=1`, `RELOADING=1`, `STOPPING=1`, `WATCHDOG=1`,
//! `MAINPID=`, `EXTEND_TIMEOUT_USEC=` and the rest are recorded
//! ([`Supervisor::notifications`]); `MAINPID=` does not change the main pid
//! here.
//!
//! ```no_run
//! use std::time::Duration;
//! use vfio_intx::fdstore_harness::{ServiceCommand, StoreOptions, Supervisor};
//!
//! let cmd = ServiceCommand::new("/usr/bin/vfio-intx").args(["daemon", "--config", "/etc/x.toml"]);
//! let mut s = Supervisor::start(cmd, StoreOptions::default().with_max(64))?;
//! let up = s.wait_ready(Duration::from_secs(10))?;
//! println!("exec to READY=1: {up:?}; stored: {:?}", s.store_names());
//! s.kill9_and_restart(Duration::from_secs(5))?;
//! s.wait_ready(Duration::from_secs(10))?;
//! s.stop(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(10))?;
//! # Ok::<(), vfio_intx::fdstore_harness::HarnessError>(())
//! ```

mod store;
mod sys;

pub use store::{fdname_is_valid, FdKind, FDNAME_MAX};

use std::ffi::{CString, OsStr, OsString};
use std::io::{self, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::sys::socket::{self, sockopt, ControlMessageOwned, MsgFlags};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use store::{Entry, Store};

/// systemd's `NOTIFY_BUFFER_MAX` (`PIPE_BUF`): a longer datagram is
/// truncated and ignored.
pub const NOTIFY_BUFFER_MAX: usize = 4096;

/// systemd's `NOTIFY_RCVBUF_SIZE`.
const NOTIFY_RCVBUF_SIZE: usize = 8 * 1024 * 1024;

/// The most descriptors one datagram carries (the kernel's `SCM_MAX_FD`).
const SCM_MAX_FD: usize = 253;

/// The epoll key of the notify socket (stored fds use their entry id).
const SOCKET_KEY: u64 = u64::MAX;

/// An error of the harness.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// A system call failed.
    #[error("fd-store harness: {op} failed")]
    Io {
        /// What the harness was doing.
        op: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Something did not happen in time.
    #[error("fd-store harness: {what}: nothing after {after:?}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        after: Duration,
    },
    /// The main process exited while the harness waited for something else.
    #[error("fd-store harness: the service exited ({status}) while waiting for {what}")]
    Exited {
        /// What was awaited.
        what: String,
        /// How it exited.
        status: ExitStatus,
    },
    /// The operation needs a running main process.
    #[error("fd-store harness: {0}: the service is not running")]
    NotRunning(&'static str),
    /// The operation needs the main process gone.
    #[error("fd-store harness: {0}: the service is still running")]
    Running(&'static str),
}

fn io_err(op: impl Into<String>) -> impl FnOnce(io::Error) -> HarnessError {
    let op = op.into();
    move |source| HarnessError::Io { op, source }
}

/// Who may notify (`NotifyAccess=`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum NotifyAccess {
    /// Only the main process (`NotifyAccess=main`, what the unit uses).
    #[default]
    Main,
    /// Any process that can reach the socket (`NotifyAccess=all`; systemd
    /// would also require the sender to be in the unit's cgroup).
    All,
}

/// The unit's settings the harness honours.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct StoreOptions {
    /// `FileDescriptorStoreMax=` (systemd's default is 0: no store).
    pub max: usize,
    /// `NotifyAccess=`.
    pub notify_access: NotifyAccess,
    /// `WatchdogSec=`: sets `WATCHDOG_USEC` and `WATCHDOG_PID` (the
    /// harness records WATCHDOG=1 but does not enforce it).
    pub watchdog: Option<Duration>,
}

with_setters!(StoreOptions {
    max: usize => with_max,
    notify_access: NotifyAccess => with_notify_access,
    watchdog: Option<Duration> => with_watchdog,
});

/// The service's command line and environment (`ExecStart=`,
/// `Environment=`), started afresh on every (re)start. The child inherits
/// the test process's environment, changed by [`env`](Self::env) and
/// [`env_remove`](Self::env_remove); the variables the manager sets
/// (`NOTIFY_SOCKET`, `LISTEN_*`, `FDSTORE`, `WATCHDOG_*`) are always its own.
#[derive(Debug)]
pub struct ServiceCommand {
    program: OsString,
    args: Vec<OsString>,
    env: Vec<(OsString, Option<OsString>)>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
}

impl ServiceCommand {
    /// `program` (a path, or a name looked up in `PATH`).
    pub fn new(program: impl AsRef<OsStr>) -> Self {
        Self {
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            env: Vec::new(),
            stdout: None,
            stderr: None,
        }
    }

    /// Adds an argument.
    #[must_use]
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// Adds arguments.
    #[must_use]
    pub fn args<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(mut self, args: I) -> Self {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Sets a variable (for the next start, when called through
    /// [`Supervisor::command_mut`]).
    pub fn set_env(&mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) {
        let key = key.as_ref().to_owned();
        self.env.retain(|(k, _)| *k != key);
        self.env.push((key, Some(value.as_ref().to_owned())));
    }

    /// Sets a variable.
    #[must_use]
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.set_env(key, value);
        self
    }

    /// Removes an inherited variable.
    #[must_use]
    pub fn env_remove(mut self, key: impl AsRef<OsStr>) -> Self {
        let key = key.as_ref().to_owned();
        self.env.retain(|(k, _)| *k != key);
        self.env.push((key, None));
        self
    }

    /// The child's stdout (default: the test process's).
    #[must_use]
    pub fn stdout(mut self, fd: impl Into<OwnedFd>) -> Self {
        self.stdout = Some(fd.into());
        self
    }

    /// The child's stderr (default: the test process's).
    #[must_use]
    pub fn stderr(mut self, fd: impl Into<OwnedFd>) -> Self {
        self.stderr = Some(fd.into());
        self
    }

    fn resolve(&self) -> io::Result<PathBuf> {
        let p = Path::new(&self.program);
        if self.program.as_bytes().contains(&b'/') {
            return Ok(p.to_path_buf());
        }
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .map(|d| d.join(p))
            .find(|c| c.is_file())
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "program not found in PATH"))
    }
}

/// One datagram received on the notify socket.
#[derive(Debug, Clone)]
pub struct Notification {
    /// The sender's pid (`SCM_CREDENTIALS`; 0 without credentials).
    pub pid: i32,
    /// The sender's uid.
    pub uid: u32,
    /// Its `KEY=VALUE` lines.
    pub lines: Vec<String>,
    /// How many descriptors came with it.
    pub fds: usize,
    /// Whether it was processed (from the main pid, with credentials).
    pub accepted: bool,
    /// When it was received.
    pub at: Instant,
}

impl Notification {
    /// The value of the first `KEY=` line.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.lines
            .iter()
            .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
    }

    /// Whether it has exactly the line `line` (`READY=1`).
    pub fn has(&self, line: &str) -> bool {
        self.lines.iter().any(|l| l == line)
    }
}

/// A copy of one stored descriptor.
#[derive(Debug)]
pub struct StoredFd {
    /// Its name (`FDNAME=`, or `stored`).
    pub name: String,
    /// What it is.
    pub kind: FdKind,
    /// Whether it is polled for POLLHUP/POLLERR.
    pub polled: bool,
    /// A duplicate (the same open file description as the stored one).
    pub fd: OwnedFd,
}

/// How a restart went.
#[derive(Debug, Clone, Copy)]
pub struct Restart {
    /// How the previous process exited.
    pub exit: ExitStatus,
    /// From the signal to the new process's exec.
    pub down: Duration,
}

/// The manager's view of the service, behind one lock.
struct State {
    store: Store,
    access: NotifyAccess,
    main_pid: Option<i32>,
    started_at: Option<Instant>,
    ready_at: Option<Instant>,
    notifications: Vec<Notification>,
    /// What the manager decided (systemd's log lines, in its words).
    log: Vec<String>,
    /// The harness's own failures (its thread never panics).
    errors: Vec<String>,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    socket: UnixDatagram,
    epoll: Epoll,
    stop: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means a test thread panicked holding it;
        // the state is still consistent (every update is a push or a
        // whole-value assignment).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts polling stored fds for POLLHUP/POLLERR (EPERM: not pollable,
    /// kept unpolled, as systemd does).
    fn poll_add(&self, st: &mut State, fds: &[(u64, RawFd)]) {
        for (id, fd) in fds {
            let ev = EpollEvent::new(EventSet::HANG_UP | EventSet::ERROR, *id);
            if let Err(e) = self.epoll.ctl(ControlOperation::Add, *fd, ev) {
                if e.raw_os_error() != Some(libc::EPERM) {
                    st.errors
                        .push(format!("polling stored fd {fd} failed: {e}"));
                }
            }
        }
    }

    /// Stops polling `entries` and closes them.
    fn drop_entries(&self, entries: Vec<Entry>) {
        for e in entries {
            if e.poll {
                // Epoll keys on the open file description, which the child
                // still holds: without DEL the entry would outlive our fd.
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    e.fd.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
            drop(e);
        }
    }

    /// Receives and processes every queued datagram.
    fn drain(&self, st: &mut State) {
        loop {
            match self.recv_one() {
                Ok(Some(msg)) => self.process(st, msg),
                Ok(None) => break,
                Err(e) => {
                    st.errors
                        .push(format!("receiving a notification failed: {e}"));
                    break;
                }
            }
        }
        self.changed.notify_all();
    }

    fn recv_one(&self) -> io::Result<Option<Received>> {
        let mut buf = vec![0u8; NOTIFY_BUFFER_MAX];
        let mut cmsg = nix::cmsg_space!(libc::ucred, [RawFd; SCM_MAX_FD]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let r = socket::recvmsg::<()>(
            self.socket.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
        );
        let r = match r {
            Ok(r) => r,
            Err(nix::errno::Errno::EAGAIN) => return Ok(None),
            Err(nix::errno::Errno::EINTR) => return self.recv_one(),
            Err(e) => return Err(e.into()),
        };
        let mut msg = Received {
            bytes: r.bytes,
            truncated: r.flags.contains(MsgFlags::MSG_TRUNC),
            creds: None,
            fds: Vec::new(),
            ctrunc: false,
            data: Vec::new(),
        };
        match r.cmsgs() {
            Ok(cmsgs) => {
                for c in cmsgs {
                    match c {
                        ControlMessageOwned::ScmRights(fds) => {
                            msg.fds.extend(fds.into_iter().map(sys::own_received));
                        }
                        ControlMessageOwned::ScmCredentials(c) => {
                            msg.creds = Some((c.pid(), c.uid()));
                        }
                        _ => {}
                    }
                }
            }
            // Only when this process is out of descriptors: the ones that
            // did arrive cannot be found safely and stay open.
            Err(_) => msg.ctrunc = true,
        }
        let bytes = msg.bytes.min(NOTIFY_BUFFER_MAX);
        msg.data = buf[..bytes].to_vec();
        Ok(Some(msg))
    }

    /// `manager_dispatch_notify_fd` + `service_notify_message`.
    fn process(&self, st: &mut State, msg: Received) {
        let at = Instant::now();
        if msg.ctrunc {
            st.errors
                .push("a notification's control data was truncated: descriptors lost".into());
        }
        let text = String::from_utf8_lossy(&msg.data).into_owned();
        let lines: Vec<String> = text
            .split('\n')
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect();
        let (pid, uid) = msg.creds.unwrap_or((0, 0));
        let n_fds = msg.fds.len();
        let mut accepted = false;
        if msg.creds.is_none() {
            st.log
                .push("received notify message without credentials, ignoring".into());
        } else if msg.truncated {
            st.log.push(format!(
                "got truncated notify message from pid {pid}, ignoring"
            ));
        } else if msg.data.contains(&0) {
            st.log.push(format!(
                "received notify message from pid {pid} with embedded NUL bytes, ignoring"
            ));
        } else if st.main_pid.is_none() {
            st.log.push(format!(
                "got notification message from pid {pid}, but no main pid is known, ignoring"
            ));
        } else if st.access == NotifyAccess::Main && st.main_pid != Some(pid) {
            st.log.push(format!(
                "got notification message from pid {pid}, but reception only permitted for main pid {}",
                st.main_pid.unwrap_or(0)
            ));
        } else {
            accepted = true;
        }
        st.notifications.push(Notification {
            pid,
            uid,
            lines: lines.clone(),
            fds: n_fds,
            accepted,
            at,
        });
        if !accepted {
            if n_fds > 0 {
                st.log
                    .push(format!("closing {n_fds} fd(s) of an ignored notification"));
            }
            return;
        }
        if lines.iter().any(|l| l == "READY=1") && st.ready_at.is_none() {
            st.ready_at = Some(at);
        }
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        let mut log = std::mem::take(&mut st.log);
        let changes = st.store.apply(&refs, msg.fds, &mut log);
        st.log = log;
        self.poll_add(st, &changes.to_poll);
        self.drop_entries(changes.removed);
    }

    /// A stored fd hung up.
    fn hung_up(&self, id: u64, events: EventSet) {
        let mut st = self.lock();
        if let Some(e) = st.store.take(id) {
            let what = if events.contains(EventSet::ERROR) {
                "POLLERR"
            } else {
                "POLLHUP"
            };
            st.log.push(format!(
                "received {what} on stored fd ({}), closing",
                e.name
            ));
            self.drop_entries(vec![e]);
            self.changed.notify_all();
        }
    }
}

struct Received {
    bytes: usize,
    truncated: bool,
    ctrunc: bool,
    creds: Option<(i32, u32)>,
    fds: Vec<OwnedFd>,
    data: Vec<u8>,
}

/// The reader: the notify socket and the stored fds' hang-ups.
fn run(shared: &Shared) {
    let mut events = vec![EpollEvent::default(); 64];
    while !shared.stop.load(Ordering::Relaxed) {
        let n = match shared.epoll.wait(100, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                shared.lock().errors.push(format!("epoll_wait failed: {e}"));
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        for ev in &events[..n] {
            if ev.data() == SOCKET_KEY {
                let mut st = shared.lock();
                shared.drain(&mut st);
            } else {
                shared.hung_up(ev.data(), ev.event_set());
            }
        }
    }
}

static NEXT_DIR: AtomicU64 = AtomicU64::new(0);

/// A service under a test-owned manager with an fd store. Dropping it
/// kills the service (SIGKILL) and releases the store.
pub struct Supervisor {
    shared: Arc<Shared>,
    command: ServiceCommand,
    options: StoreOptions,
    dir: PathBuf,
    socket_path: PathBuf,
    reader: Option<JoinHandle<()>>,
    last_exit: Option<ExitStatus>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("socket", &self.socket_path)
            .field("pid", &self.pid())
            .finish_non_exhaustive()
    }
}

impl Supervisor {
    /// Creates the notify socket (in a new directory under the temporary
    /// directory) and starts `command` with an empty store.
    pub fn start(command: ServiceCommand, options: StoreOptions) -> Result<Self, HarnessError> {
        let dir = std::env::temp_dir().join(format!(
            "vfio-intx-fdstore-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
        let socket_path = dir.join("notify");
        let socket = UnixDatagram::bind(&socket_path)
            .map_err(io_err(format!("binding {}", socket_path.display())))?;
        socket::setsockopt(&socket, sockopt::PassCred, &true)
            .map_err(|e| io_err("setting SO_PASSCRED")(e.into()))?;
        // systemd's NOTIFY_RCVBUF_SIZE (8 MiB), forced where permitted.
        // The queue's length stays net.unix.max_dgram_qlen (10 by
        // default): a sender that does not block gets EAGAIN past it.
        if socket::setsockopt(&socket, sockopt::RcvBufForce, &NOTIFY_RCVBUF_SIZE).is_err() {
            let _ = socket::setsockopt(&socket, sockopt::RcvBuf, &NOTIFY_RCVBUF_SIZE);
        }
        socket
            .set_nonblocking(true)
            .map_err(io_err("O_NONBLOCK on the notify socket"))?;
        let epoll = Epoll::new().map_err(io_err("epoll_create"))?;
        epoll
            .ctl(
                ControlOperation::Add,
                socket.as_raw_fd(),
                EpollEvent::new(EventSet::IN, SOCKET_KEY),
            )
            .map_err(io_err("polling the notify socket"))?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                store: Store::new(options.max),
                access: options.notify_access,
                main_pid: None,
                started_at: None,
                ready_at: None,
                notifications: Vec::new(),
                log: Vec::new(),
                errors: Vec::new(),
            }),
            changed: Condvar::new(),
            socket,
            epoll,
            stop: AtomicBool::new(false),
        });
        let reader = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("fdstore-manager".into())
                .spawn(move || run(&shared))
                .map_err(io_err("starting the manager thread"))?
        };
        let mut s = Self {
            shared,
            command,
            options,
            dir,
            socket_path,
            reader: Some(reader),
            last_exit: None,
        };
        s.spawn()?;
        Ok(s)
    }

    /// Starts the main process with the store (the lock is held across
    /// `fork`, so no message of the new process is judged before its pid
    /// is the main pid).
    fn spawn(&mut self) -> Result<(), HarnessError> {
        let shared = self.shared.clone();
        let mut st = shared.lock();
        if st.main_pid.is_some() {
            return Err(HarnessError::Running("start"));
        }
        let path = self.command.resolve().map_err(io_err(format!(
            "finding {}",
            Path::new(&self.command.program).display()
        )))?;
        let cstr = |s: &[u8], what: &str| {
            CString::new(s).map_err(|_| HarnessError::Io {
                op: format!("passing {what}"),
                source: io::Error::new(io::ErrorKind::InvalidInput, "NUL byte"),
            })
        };
        let mut argv = vec![cstr(self.command.program.as_bytes(), "the program")?];
        for a in &self.command.args {
            argv.push(cstr(a.as_bytes(), "an argument")?);
        }
        const OURS: [&str; 8] = [
            "NOTIFY_SOCKET",
            "LISTEN_PID",
            "LISTEN_FDS",
            "LISTEN_FDNAMES",
            "FDSTORE",
            "WATCHDOG_PID",
            "WATCHDOG_USEC",
            "MAINPID",
        ];
        let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
            .filter(|(k, _)| !OURS.iter().any(|o| OsStr::new(o) == k))
            .collect();
        for (k, v) in &self.command.env {
            env.retain(|(ek, _)| ek != k);
            if let Some(v) = v {
                env.push((k.clone(), v.clone()));
            }
        }
        env.push(("NOTIFY_SOCKET".into(), self.socket_path.clone().into()));
        if self.options.max > 0 {
            env.push(("FDSTORE".into(), self.options.max.to_string().into()));
        }
        let n = st.store.entries.len();
        let mut pid_slots = Vec::new();
        if n > 0 {
            env.push(("LISTEN_FDS".into(), n.to_string().into()));
            let names: Vec<&str> = st.store.entries.iter().map(|e| e.name.as_str()).collect();
            env.push(("LISTEN_FDNAMES".into(), names.join(":").into()));
            pid_slots.push(sys::PidSlot::new("LISTEN_PID"));
        }
        if let Some(w) = self.options.watchdog {
            env.push(("WATCHDOG_USEC".into(), w.as_micros().to_string().into()));
            pid_slots.push(sys::PidSlot::new("WATCHDOG_PID"));
        }
        let mut envp = Vec::with_capacity(env.len());
        for (k, v) in &env {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            envp.push(cstr(&kv, "the environment")?);
        }
        let dup = |fd: &Option<OwnedFd>, what: &str| -> Result<Option<OwnedFd>, HarnessError> {
            fd.as_ref()
                .map(|f| f.try_clone())
                .transpose()
                .map_err(io_err(format!("duplicating the child's {what}")))
        };
        let plan = sys::SpawnPlan {
            path: cstr(path.as_os_str().as_bytes(), "the program")?,
            argv,
            envp,
            pid_slots,
            stdout: dup(&self.command.stdout, "stdout")?,
            stderr: dup(&self.command.stderr, "stderr")?,
            fds: st.store.entries.iter().map(|e| e.fd.as_raw_fd()).collect(),
        };
        let started = Instant::now();
        let pid = sys::spawn(plan).map_err(io_err(format!("starting {}", path.display())))?;
        st.main_pid = Some(pid);
        st.started_at = Some(started);
        st.ready_at = None;
        Ok(())
    }

    /// Waits for READY=1 from the current main process; returns the time
    /// from its start (fork + exec) to READY=1.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<Duration, HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let st = self.shared.lock();
                if let (Some(s), Some(r)) = (st.started_at, st.ready_at) {
                    return Ok(r.saturating_duration_since(s));
                }
                if st.main_pid.is_none() {
                    return Err(HarnessError::NotRunning("waiting for READY=1"));
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(HarnessError::Timeout {
                        what: "READY=1".into(),
                        after: timeout,
                    });
                }
                let _ = self
                    .shared
                    .changed
                    .wait_timeout(st, left.min(Duration::from_millis(5)));
            }
            if let Some(status) = self.reap()? {
                return Err(HarnessError::Exited {
                    what: "READY=1".into(),
                    status,
                });
            }
        }
    }

    /// Waits for an accepted notification that `pred` matches, among
    /// those received from index `since` of [`notifications`](Self::notifications).
    pub fn wait_notification(
        &self,
        since: usize,
        timeout: Duration,
        pred: impl Fn(&Notification) -> bool,
    ) -> Result<Notification, HarnessError> {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        loop {
            if let Some(n) = st
                .notifications
                .iter()
                .skip(since)
                .find(|n| n.accepted && pred(n))
            {
                return Ok(n.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(HarnessError::Timeout {
                    what: "a matching notification".into(),
                    after: timeout,
                });
            }
            st = match self.shared.changed.wait_timeout(st, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// Reaps the main process if it exited: first processes what it
    /// queued on the notify socket (as the main pid's), then forgets it.
    fn reap(&mut self) -> Result<Option<ExitStatus>, HarnessError> {
        let shared = self.shared.clone();
        let mut st = shared.lock();
        let Some(pid) = st.main_pid else {
            return Ok(None);
        };
        match sys::try_wait(pid).map_err(io_err(format!("waitpid {pid}")))? {
            Some(status) => {
                shared.drain(&mut st);
                st.main_pid = None;
                st.log.push(format!("main process {pid} exited: {status}"));
                self.last_exit = Some(status);
                shared.changed.notify_all();
                Ok(Some(status))
            }
            None => Ok(None),
        }
    }

    /// Sends `sig` to the main process.
    pub fn signal(&self, sig: Signal) -> Result<(), HarnessError> {
        let pid = self.pid().ok_or(HarnessError::NotRunning("signal"))?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig)
            .map_err(|e| io_err(format!("kill({pid}, {sig})"))(e.into()))
    }

    /// Waits for the main process to exit (the store is kept).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.pid().is_none() {
                return self.last_exit.ok_or(HarnessError::NotRunning("wait_exit"));
            }
            if let Some(status) = self.reap()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::Timeout {
                    what: "the main process's exit".into(),
                    after: timeout,
                });
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    }

    /// Starts the main process again with the store (it must have exited).
    pub fn restart(&mut self) -> Result<(), HarnessError> {
        if self.pid().is_some() {
            self.reap()?;
        }
        self.spawn()
    }

    /// `systemctl restart`: `sig` (systemd's KillSignal=, SIGTERM), wait
    /// up to `timeout` for the exit, start again with the store.
    pub fn stop_and_restart(
        &mut self,
        sig: Signal,
        timeout: Duration,
    ) -> Result<Restart, HarnessError> {
        let t0 = Instant::now();
        self.signal(sig)?;
        let exit = self.wait_exit(timeout)?;
        self.spawn()?;
        Ok(Restart {
            exit,
            down: t0.elapsed(),
        })
    }

    /// A crash with `Restart=`: SIGKILL, wait, start again with the store.
    pub fn kill9_and_restart(&mut self, timeout: Duration) -> Result<Restart, HarnessError> {
        self.stop_and_restart(Signal::SIGKILL, timeout)
    }

    /// `systemctl stop`: `sig`, wait up to `timeout` (then SIGKILL, as
    /// systemd's TimeoutStopSec= does), and release the store: every
    /// stored fd is closed.
    pub fn stop(&mut self, sig: Signal, timeout: Duration) -> Result<ExitStatus, HarnessError> {
        let status = match self.pid() {
            None => self.last_exit.ok_or(HarnessError::NotRunning("stop"))?,
            Some(_) => {
                self.signal(sig)?;
                match self.wait_exit(timeout) {
                    Ok(s) => s,
                    Err(HarnessError::Timeout { .. }) => {
                        self.signal(Signal::SIGKILL)?;
                        self.wait_exit(Duration::from_secs(10))?
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        self.release_store();
        Ok(status)
    }

    /// Closes every stored fd.
    pub fn release_store(&self) {
        let mut st = self.shared.lock();
        let entries = st.store.release();
        if !entries.is_empty() {
            st.log
                .push(format!("releasing all {} stored fds", entries.len()));
        }
        self.shared.drop_entries(entries);
    }

    /// The store, in the order of the next start (fd 3 first): copies.
    pub fn store(&self) -> Result<Vec<StoredFd>, HarnessError> {
        let st = self.shared.lock();
        st.store
            .entries
            .iter()
            .map(|e| {
                Ok(StoredFd {
                    name: e.name.clone(),
                    kind: e.kind.clone(),
                    polled: e.poll,
                    fd: e
                        .fd
                        .as_fd()
                        .try_clone_to_owned()
                        .map_err(io_err("duplicating a stored fd"))?,
                })
            })
            .collect()
    }

    /// Waits until the stored fds' names (in the order of the next start)
    /// satisfy `pred`; returns them.
    pub fn wait_store(
        &self,
        timeout: Duration,
        pred: impl Fn(&[String]) -> bool,
    ) -> Result<Vec<String>, HarnessError> {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        loop {
            let names: Vec<String> = st.store.entries.iter().map(|e| e.name.clone()).collect();
            if pred(&names) {
                return Ok(names);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(HarnessError::Timeout {
                    what: format!("the fd store (now {names:?})"),
                    after: timeout,
                });
            }
            st = match self.shared.changed.wait_timeout(st, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// The stored fds' names, in the order of the next start.
    pub fn store_names(&self) -> Vec<String> {
        self.shared
            .lock()
            .store
            .entries
            .iter()
            .map(|e| e.name.clone())
            .collect()
    }

    /// Puts `fd` in the store as `name` without any check (a bad-input
    /// test's wrong fd, or a name systemd would not accept); not polled.
    pub fn inject(&mut self, name: &str, fd: OwnedFd) {
        let mut st = self.shared.lock();
        st.log
            .push(format!("injected fd ({name}) into the fd store"));
        st.store.inject(fd, name);
    }

    /// Every datagram received, in order.
    pub fn notifications(&self) -> Vec<Notification> {
        self.shared.lock().notifications.clone()
    }

    /// Every line of the accepted notifications, in order.
    pub fn lines(&self) -> Vec<String> {
        self.shared
            .lock()
            .notifications
            .iter()
            .filter(|n| n.accepted)
            .flat_map(|n| n.lines.iter().cloned())
            .collect()
    }

    /// What the manager decided (refusals, removals, hang-ups, exits), in
    /// systemd's words.
    pub fn log(&self) -> Vec<String> {
        self.shared.lock().log.clone()
    }

    /// The harness's own failures (empty when all went well).
    pub fn errors(&self) -> Vec<String> {
        self.shared.lock().errors.clone()
    }

    /// The main pid, while the main process runs.
    pub fn pid(&self) -> Option<i32> {
        self.shared.lock().main_pid
    }

    /// The `NOTIFY_SOCKET` path.
    pub fn notify_socket(&self) -> &Path {
        &self.socket_path
    }

    /// The command, to change for the next start.
    pub fn command_mut(&mut self) -> &mut ServiceCommand {
        &mut self.command
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        if self.pid().is_some() {
            let _ = self.signal(Signal::SIGKILL);
            let _ = self.wait_exit(Duration::from_secs(10));
        }
        self.release_store();
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
