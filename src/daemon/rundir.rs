//! The runtime directory: the control socket's directory, checked before
//! the daemon uses it (owned by the daemon's uid — root in production —
//! and writable by nobody else, so that no one else can put a symbolic
//! link or a file where the daemon creates, changes or removes its
//! socket), and the instance lock in it, taken before any device is
//! touched and held for the process's life.

use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::daemon::DaemonError;

/// The socket's directory, opened without following a symbolic link and
/// checked: owned by `euid`, not writable by group or others. Created
/// (0755) when missing.
pub(crate) fn open_dir(socket: &Path, euid: u32) -> Result<File, DaemonError> {
    let dir = socket.parent().unwrap_or(Path::new("/"));
    let fail = |op: &'static str| {
        let path = dir.to_owned();
        move |source| DaemonError::Socket { path, op, source }
    };
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(fail("creating the socket's directory"))?;
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(dir)
        .map_err(fail("opening the socket's directory"))?;
    let meta = file
        .metadata()
        .map_err(fail("reading the socket's directory's owner and mode"))?;
    let mode = meta.mode() & 0o7777;
    let why = if meta.uid() != euid {
        Some(format!("owned by uid {}", meta.uid()))
    } else if mode & 0o022 != 0 {
        Some(format!("mode {mode:#o}, writable by others"))
    } else {
        None
    };
    match why {
        None => Ok(file),
        Some(why) => Err(DaemonError::UnsafeDirectory {
            dir: dir.to_owned(),
            why,
            euid,
        }),
    }
}

/// The exclusive instance lock, `<socket>.lock` next to the socket: held
/// (with the holder's pid written in it) until the process exits.
#[derive(Debug)]
pub(crate) struct InstanceLock {
    _file: nix::fcntl::Flock<File>,
}

/// Takes the instance lock for `socket` (checking its directory first,
/// and what is at the socket path after, unless `own_listener`: the fd
/// store kept this daemon's listening socket there, which answers
/// connections); another daemon holding it is [`DaemonError::Locked`],
/// naming its pid when the lock file says it.
pub(crate) fn lock(
    socket: &Path,
    euid: u32,
    own_listener: bool,
) -> Result<InstanceLock, DaemonError> {
    let dir = open_dir(socket, euid)?;
    let path = lock_path(socket);
    let fail = |op: &'static str| {
        let path = path.clone();
        move |source| DaemonError::Socket { path, op, source }
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(fail("opening the instance lock"))?;
    let mut file = match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
    {
        Ok(locked) => locked,
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            return Err(DaemonError::Locked {
                pid: text.trim().parse().ok(),
                lock: path,
            });
        }
        Err((_, e)) => return Err(fail("taking the instance lock")(e.into())),
    };
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| writeln!(file, "{}", std::process::id()))
        .map_err(fail("writing the daemon's pid in the instance lock"))?;
    // What is at the socket path is refused now too, before any device
    // is brought up; binding checks again.
    if !own_listener {
        remove_stale(&dir, socket)?;
    }
    Ok(InstanceLock { _file: file })
}

fn lock_path(socket: &Path) -> PathBuf {
    let mut name = socket.file_name().unwrap_or_default().to_owned();
    name.push(".lock");
    socket.with_file_name(name)
}

/// Removes what is at `socket` if it is a stale socket (one nobody
/// listens on); refuses anything else, and a socket another daemon
/// answers on. `dir` is the socket's checked directory.
pub(crate) fn remove_stale(dir: &File, socket: &Path) -> Result<(), DaemonError> {
    use std::os::fd::AsRawFd;
    let fail = |op: &'static str| {
        let path = socket.to_owned();
        move |source| DaemonError::Socket { path, op, source }
    };
    let meta = match std::fs::symlink_metadata(socket) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(fail("looking at the socket path")(e)),
    };
    if !std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) {
        let what = if meta.file_type().is_symlink() {
            "a symbolic link"
        } else if meta.is_dir() {
            "a directory"
        } else if meta.is_file() {
            "a regular file"
        } else {
            "a special file"
        };
        return Err(DaemonError::NotASocket {
            path: socket.to_owned(),
            what,
        });
    }
    match std::os::unix::net::UnixStream::connect(socket) {
        Ok(_) => Err(DaemonError::AlreadyRunning {
            path: socket.to_owned(),
        }),
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
            let name = socket.file_name().unwrap_or_default();
            nix::unistd::unlinkat(
                Some(dir.as_raw_fd()),
                name,
                nix::unistd::UnlinkatFlags::NoRemoveDir,
            )
            .map_err(|e| fail("removing a stale socket")(e.into()))
        }
        Err(e) => Err(fail("checking whether a daemon listens on the socket")(e)),
    }
}

/// Sets the socket's group and mode by name in `dir`, never following a
/// symbolic link.
pub(crate) fn set_owner_and_mode(
    dir: &File,
    socket: &Path,
    mode: u32,
    group: Option<u32>,
) -> Result<(), DaemonError> {
    use std::os::fd::AsRawFd;
    let fail = |op: &'static str| {
        let path = socket.to_owned();
        move |e: nix::Error| DaemonError::Socket {
            path,
            op,
            source: e.into(),
        }
    };
    let name = socket.file_name().unwrap_or_default();
    if let Some(gid) = group {
        nix::unistd::fchownat(
            Some(dir.as_raw_fd()),
            name,
            None,
            Some(nix::unistd::Gid::from_raw(gid)),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(fail("setting the socket's group"))?;
    }
    nix::sys::stat::fchmodat(
        Some(dir.as_raw_fd()),
        name,
        nix::sys::stat::Mode::from_bits_truncate(mode),
        nix::sys::stat::FchmodatFlags::NoFollowSymlink,
    )
    .map_err(fail("setting the socket's mode"))
}
