//! The harness's only `unsafe`: starting the service the way systemd's
//! executor does (`fork`, then in the child only async-signal-safe calls:
//! its own pid into `LISTEN_PID=`, the stored fds onto 3, 4, …, `execve`),
//! taking ownership of descriptors the kernel hands over (`SCM_RIGHTS`,
//! `F_DUPFD_CLOEXEC`), comparing two descriptors with `kcmp(2)`, and
//! `waitpid(2)`.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

/// Room for a pid's decimal digits after `NAME=` in a pid slot.
const PID_DIGITS: usize = 20;

/// One environment entry the child completes with its own pid
/// (`LISTEN_PID=`, `WATCHDOG_PID=`): the parent cannot know the pid
/// before `fork`, and the child must not allocate after it.
pub(super) struct PidSlot {
    /// `NAME=` followed by [`PID_DIGITS`] + 1 NUL bytes.
    buf: Vec<u8>,
    prefix: usize,
}

impl PidSlot {
    pub(super) fn new(name: &str) -> Self {
        let mut buf = format!("{name}=").into_bytes();
        let prefix = buf.len();
        buf.resize(prefix + PID_DIGITS + 1, 0);
        Self { buf, prefix }
    }
}

/// Everything the child needs, prepared before `fork`.
pub(super) struct SpawnPlan {
    /// The program, resolved to a path.
    pub(super) path: CString,
    pub(super) argv: Vec<CString>,
    pub(super) envp: Vec<CString>,
    pub(super) pid_slots: Vec<PidSlot>,
    pub(super) stdout: Option<OwnedFd>,
    pub(super) stderr: Option<OwnedFd>,
    /// The descriptors the child gets as 3, 4, …: open for the whole
    /// call (the caller holds the store's lock).
    pub(super) fds: Vec<RawFd>,
}

/// Duplicates `fd` close-on-exec onto the lowest free number `>= min`.
pub(super) fn dup_above(fd: RawFd, min: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC only reads `fd` (a descriptor the caller
    // holds open) and creates a new one; it touches no memory.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, min) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `new` was just created by fcntl and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Takes ownership of a descriptor `recvmsg` installed (`SCM_RIGHTS`).
pub(super) fn own_received(fd: RawFd) -> OwnedFd {
    // SAFETY: the kernel installed `fd` in this process for this message
    // only; the caller hands each received number here exactly once, so
    // nothing else owns or closes it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Whether `a` and `b` are the same open file description (systemd's
/// `same_fd()`): `kcmp(KCMP_FILE)`, and where the kernel lacks it, the
/// same inode, not a device node, and the same status flags.
pub(super) fn same_file(a: RawFd, b: RawFd) -> io::Result<bool> {
    const KCMP_FILE: libc::c_long = 0;
    // SAFETY: getpid cannot fail and touches no memory.
    let pid = libc::c_long::from(unsafe { libc::getpid() });
    // SAFETY: kcmp compares two descriptors of this process by number; it
    // reads no user memory.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid,
            pid,
            KCMP_FILE,
            libc::c_long::from(a),
            libc::c_long::from(b),
        )
    };
    if r >= 0 {
        return Ok(r == 0);
    }
    let e = io::Error::last_os_error();
    if !matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EPERM)) {
        return Err(e);
    }
    let sa = nix::sys::stat::fstat(a)?;
    let sb = nix::sys::stat::fstat(b)?;
    if (sa.st_dev, sa.st_ino) != (sb.st_dev, sb.st_ino) {
        return Ok(false);
    }
    let kind = sa.st_mode & libc::S_IFMT;
    if kind == libc::S_IFCHR || kind == libc::S_IFBLK {
        return Ok(false);
    }
    let fa = nix::fcntl::fcntl(a, nix::fcntl::FcntlArg::F_GETFL)?;
    let fb = nix::fcntl::fcntl(b, nix::fcntl::FcntlArg::F_GETFL)?;
    Ok(fa == fb)
}

/// Reaps `pid` if it has exited (`WNOHANG`).
pub(super) fn try_wait(pid: libc::pid_t) -> io::Result<Option<ExitStatus>> {
    let mut status = 0;
    // SAFETY: `status` is a live c_int the kernel writes; `pid` is a child
    // of this process that the harness alone reaps.
    let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    match r {
        0 => Ok(None),
        r if r == pid => Ok(Some(ExitStatus::from_raw(status))),
        _ => Err(io::Error::last_os_error()),
    }
}

/// Writes `n` in decimal at `dst` (room for [`PID_DIGITS`] bytes, NUL
/// after them already there). No allocation: runs in the forked child.
fn write_decimal(dst: &mut [u8], mut n: u64) {
    let mut digits = [0u8; PID_DIGITS];
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 || len == PID_DIGITS {
            break;
        }
    }
    for (i, d) in digits[..len].iter().rev().enumerate() {
        if let Some(slot) = dst.get_mut(i) {
            *slot = *d;
        }
    }
}

/// Starts `plan` as systemd starts a service's main process and returns
/// its pid once it has called `execve` (an `execve` that fails is an
/// error here, its errno reported through a close-on-exec pipe).
pub(super) fn spawn(mut plan: SpawnPlan) -> io::Result<libc::pid_t> {
    let n = plan.fds.len() as RawFd;
    // Everything the child moves or keeps is numbered at or above
    // `3 + n + 1`, so no dup2 onto 0..=3+n clobbers a source.
    let floor = 3 + n + 1;
    let (err_read, err_write_low) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let err_write = dup_above(err_write_low.as_raw_fd(), floor)?;
    drop(err_write_low);
    let stdout = match &plan.stdout {
        Some(fd) => Some(dup_above(fd.as_raw_fd(), floor)?),
        None => None,
    };
    let stderr = match &plan.stderr {
        Some(fd) => Some(dup_above(fd.as_raw_fd(), floor)?),
        None => None,
    };
    let mut fds = Vec::with_capacity(plan.fds.len());
    for fd in &plan.fds {
        fds.push(dup_above(*fd, floor)?);
    }
    let fd_nums: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let slot_ptrs: Vec<(*mut u8, usize)> = plan
        .pid_slots
        .iter_mut()
        .map(|s| {
            let prefix = s.prefix;
            // SAFETY: `prefix < buf.len()` (the buffer holds PID_DIGITS + 1
            // bytes after it).
            (unsafe { s.buf.as_mut_ptr().add(prefix) }, PID_DIGITS)
        })
        .collect();
    let mut envp: Vec<*const libc::c_char> = plan.envp.iter().map(|c| c.as_ptr()).collect();
    envp.extend(plan.pid_slots.iter().map(|s| s.buf.as_ptr().cast()));
    envp.push(std::ptr::null());
    let mut argv: Vec<*const libc::c_char> = plan.argv.iter().map(|c| c.as_ptr()).collect();
    argv.push(std::ptr::null());
    let path = plan.path.as_ptr();
    let out_raw = stdout.as_ref().map(|f| f.as_raw_fd());
    let err_raw = stderr.as_ref().map(|f| f.as_raw_fd());
    let errw = err_write.as_raw_fd();

    // SAFETY: fork duplicates this process; the child below calls only
    // async-signal-safe functions (getpid, signal, sigprocmask, setsid,
    // dup2, fcntl, close_range, execve, write, _exit) on memory prepared
    // before the fork, so no lock another thread held can deadlock it.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: (the child) see the fork above; each pointer is into a
        // buffer of the parent's, copied into this address space by fork
        // and live until execve replaces it.
        unsafe {
            let me = libc::getpid() as u64;
            for (ptr, len) in &slot_ptrs {
                write_decimal(std::slice::from_raw_parts_mut(*ptr, *len), me);
            }
            for sig in 1..32 {
                if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                    libc::signal(sig, libc::SIG_DFL);
                }
            }
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            libc::setsid();
            let mut ok = true;
            if let Some(fd) = out_raw {
                ok &= libc::dup2(fd, 1) == 1;
            }
            if let Some(fd) = err_raw {
                ok &= libc::dup2(fd, 2) == 2;
            }
            for (i, fd) in fd_nums.iter().enumerate() {
                let target = 3 + i as RawFd;
                ok &= libc::dup2(*fd, target) == target;
            }
            // The error pipe right after the stored fds, close-on-exec;
            // everything else the test process had open is closed (systemd
            // passes a service nothing but its fds and stdio).
            let errfd = 3 + n;
            ok &= libc::dup2(errw, errfd) == errfd;
            ok &= libc::fcntl(errfd, libc::F_SETFD, libc::FD_CLOEXEC) == 0;
            libc::syscall(
                libc::SYS_close_range,
                (errfd + 1) as libc::c_uint,
                libc::c_uint::MAX,
                0 as libc::c_uint,
            );
            if ok {
                libc::execve(path, argv.as_ptr(), envp.as_ptr());
            }
            let errno = *libc::__errno_location();
            let bytes = errno.to_ne_bytes();
            libc::write(errfd, bytes.as_ptr().cast(), bytes.len());
            libc::_exit(127);
        }
    }
    drop(err_write);
    drop(fds);
    drop(stdout);
    drop(stderr);
    let mut buf = [0u8; 4];
    let mut got = 0;
    loop {
        match nix::unistd::read(err_read.as_raw_fd(), &mut buf[got..]) {
            Ok(0) => break,
            Ok(k) => {
                got += k;
                if got == buf.len() {
                    break;
                }
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    if got == 0 {
        return Ok(pid);
    }
    // The exec failed: reap the child, report its errno.
    let mut status = 0;
    // SAFETY: `pid` is the child just forked, which is exiting.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    Err(io::Error::from_raw_os_error(i32::from_ne_bytes(buf)))
}
