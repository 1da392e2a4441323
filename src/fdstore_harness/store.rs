//! The file-descriptor store itself, as systemd's `src/core/service.c`
//! keeps it (`service_add_fd_store`, `service_remove_fd_store`, the FD
//! store part of `service_notify_message`, `service_collect_fds`): no I/O
//! but `fstat`/`kcmp` and `readlink` on the fds it is given.

use std::fmt;
use std::os::fd::{AsRawFd, OwnedFd};

use super::sys;

/// systemd's `FDNAME_MAX`.
pub const FDNAME_MAX: usize = 255;

/// Whether systemd accepts `name` as an fd name (`fdname_is_valid()`):
/// at most 255 bytes, printable ASCII (0x20..=0x7e), no `:` (the
/// separator of `LISTEN_FDNAMES`). The empty name is valid.
pub fn fdname_is_valid(name: &str) -> bool {
    name.len() <= FDNAME_MAX && name.bytes().all(|b| (b' '..0x7f).contains(&b) && b != b':')
}

/// What a stored descriptor is, from `readlink /proc/self/fd/N`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FdKind {
    /// `anon_inode:[eventfd]`.
    EventFd,
    /// `socket:[…]`.
    Socket,
    /// `/memfd:…`.
    Memfd,
    /// `pipe:[…]`.
    Pipe,
    /// A VFIO device fd, `anon_inode:[vfio-device]`.
    VfioDevice,
    /// `/dev/vfio/vfio`.
    VfioContainer,
    /// `/dev/vfio/N`.
    VfioGroup,
    /// `/dev/uioN`.
    Uio,
    /// Anything else: the link's target.
    Other(String),
}

impl FdKind {
    /// Classifies the target of a `/proc/self/fd/N` link.
    pub fn from_link(target: &str) -> Self {
        match target {
            "anon_inode:[eventfd]" => Self::EventFd,
            "anon_inode:[vfio-device]" => Self::VfioDevice,
            "/dev/vfio/vfio" => Self::VfioContainer,
            t if t.starts_with("socket:[") => Self::Socket,
            t if t.starts_with("pipe:[") => Self::Pipe,
            t if t.starts_with("/memfd:") => Self::Memfd,
            t if t.starts_with("/dev/vfio/") => Self::VfioGroup,
            t if t.starts_with("/dev/uio") => Self::Uio,
            t => Self::Other(t.to_string()),
        }
    }

    /// The kind of `fd`, an open descriptor of this process.
    pub fn of(fd: &impl AsRawFd) -> Self {
        match std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())) {
            Ok(t) => Self::from_link(&t.to_string_lossy()),
            Err(e) => Self::Other(format!("unknown ({e})")),
        }
    }
}

impl fmt::Display for FdKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::EventFd => f.write_str("eventfd"),
            Self::Socket => f.write_str("socket"),
            Self::Memfd => f.write_str("memfd"),
            Self::Pipe => f.write_str("pipe"),
            Self::VfioDevice => f.write_str("vfio-device"),
            Self::VfioContainer => f.write_str("vfio-container"),
            Self::VfioGroup => f.write_str("vfio-group"),
            Self::Uio => f.write_str("uio"),
            Self::Other(t) => f.write_str(t),
        }
    }
}

/// One stored descriptor.
#[derive(Debug)]
pub(super) struct Entry {
    /// Unique for the harness's life (the poller's key).
    pub(super) id: u64,
    pub(super) name: String,
    pub(super) fd: OwnedFd,
    /// Polled for POLLHUP/POLLERR (not sent with FDPOLL=0).
    pub(super) poll: bool,
    pub(super) kind: FdKind,
}

/// What one message changed.
#[derive(Debug, Default)]
pub(super) struct Changes {
    /// Entries added with `poll` set: the caller starts polling them.
    pub(super) to_poll: Vec<(u64, std::os::fd::RawFd)>,
    /// Entries removed: the caller stops polling them, then drops them
    /// (which closes the fd).
    pub(super) removed: Vec<Entry>,
}

/// The store: entries in systemd's list order, which is also the order of
/// the fds on the next start. systemd `LIST_PREPEND`s each new entry and
/// passes the list from its head, so the most recently stored fd comes
/// first (fd 3).
#[derive(Debug, Default)]
pub(super) struct Store {
    pub(super) entries: Vec<Entry>,
    /// FileDescriptorStoreMax=.
    pub(super) max: usize,
    next_id: u64,
}

impl Store {
    pub(super) fn new(max: usize) -> Self {
        Self {
            entries: Vec::new(),
            max,
            next_id: 1,
        }
    }

    /// `service_add_fd_store` below the limit (the caller checks it):
    /// suppresses (closes) one that is already stored (the same
    /// open file description, whatever its name), else prepends it.
    fn add(&mut self, fd: OwnedFd, name: &str, poll: bool, log: &mut Vec<String>) -> Option<u64> {
        for e in &self.entries {
            match sys::same_file(e.fd.as_raw_fd(), fd.as_raw_fd()) {
                Ok(true) => {
                    log.push(format!(
                        "suppressing duplicate fd ({name}): already stored as {}",
                        e.name
                    ));
                    return None;
                }
                Ok(false) => {}
                Err(err) => {
                    log.push(format!("comparing fds failed, closing fd ({name}): {err}"));
                    return None;
                }
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        let kind = FdKind::of(&fd);
        log.push(format!("added fd ({name}, {kind}) to the fd store"));
        self.entries.insert(
            0,
            Entry {
                id,
                name: name.to_string(),
                fd,
                poll,
                kind,
            },
        );
        Some(id)
    }

    /// Adds `fd` as `FDSTORE=1` would, without the checks (a test's
    /// injection of a bad entry).
    pub(super) fn inject(&mut self, fd: OwnedFd, name: &str) {
        let id = self.next_id;
        self.next_id += 1;
        let kind = FdKind::of(&fd);
        self.entries.insert(
            0,
            Entry {
                id,
                name: name.to_string(),
                fd,
                poll: false,
                kind,
            },
        );
    }

    /// Removes the entry `id` (its fd hung up).
    pub(super) fn take(&mut self, id: u64) -> Option<Entry> {
        let i = self.entries.iter().position(|e| e.id == id)?;
        Some(self.entries.remove(i))
    }

    /// Releases every entry (a stop: the store is flushed).
    pub(super) fn release(&mut self) -> Vec<Entry> {
        std::mem::take(&mut self.entries)
    }

    /// The fd-store part of `service_notify_message` for an accepted
    /// message: `lines` are its `KEY=VALUE` lines, `fds` what came with it.
    /// Descriptors not stored are dropped (closed) here, as the manager
    /// closes the ones a message left over.
    pub(super) fn apply(
        &mut self,
        lines: &[&str],
        fds: Vec<OwnedFd>,
        log: &mut Vec<String>,
    ) -> Changes {
        let mut changes = Changes::default();
        let has = |l: &str| lines.contains(&l);
        // strv_find_startswith: the first line with the prefix.
        let fdname = lines.iter().find_map(|l| l.strip_prefix("FDNAME="));
        let n_fds = fds.len();
        if has("FDSTOREREMOVE=1") {
            match fdname {
                Some(name) if fdname_is_valid(name) => {
                    let mut kept = Vec::with_capacity(self.entries.len());
                    for e in std::mem::take(&mut self.entries) {
                        if e.name == name {
                            log.push(format!("removed fd ({name}) from the fd store on request"));
                            changes.removed.push(e);
                        } else {
                            kept.push(e);
                        }
                    }
                    self.entries = kept;
                }
                _ => log.push(
                    "FDSTOREREMOVE=1 requested, but no valid file descriptor name passed, ignoring"
                        .to_string(),
                ),
            }
            if n_fds > 0 {
                log.push(format!("closing {n_fds} fd(s) sent with FDSTOREREMOVE=1"));
            }
        } else if has("FDSTORE=1") {
            let name = match fdname {
                Some(n) if fdname_is_valid(n) => n,
                Some(n) => {
                    log.push(format!(
                        "passed FDNAME= name is invalid, ignoring (storing as \"stored\"): {:?}",
                        n.chars().take(40).collect::<String>()
                    ));
                    "stored"
                }
                None => "stored",
            };
            let poll = !has("FDPOLL=0");
            let mut fds = fds.into_iter();
            while let Some(fd) = fds.next() {
                if self.entries.len() >= self.max {
                    // service_add_fd_store_set: EXFULL closes the rest.
                    log.push(format!(
                        "cannot store more fds than FileDescriptorStoreMax={}, closing {} fd(s) ({name})",
                        self.max,
                        1 + fds.count()
                    ));
                    break;
                }
                let raw = fd.as_raw_fd();
                if let Some(id) = self.add(fd, name, poll, log) {
                    if poll {
                        changes.to_poll.push((id, raw));
                    }
                }
            }
        } else if n_fds > 0 {
            log.push(format!("got {n_fds} fd(s) without FDSTORE=1, closing"));
        }
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fd_names_are_validated_as_systemd_does() {
        assert!(fdname_is_valid(""));
        assert!(fdname_is_valid(
            "dev-0000:00:04.0".replace(':', "_").as_str()
        ));
        assert!(fdname_is_valid(&"x".repeat(255)));
        assert!(!fdname_is_valid(&"x".repeat(256)));
        assert!(!fdname_is_valid("a:b"));
        assert!(!fdname_is_valid("tab\there"));
        assert!(!fdname_is_valid("del\x7f"));
        assert!(!fdname_is_valid("é"));
    }

    #[test]
    fn links_are_classified() {
        assert_eq!(FdKind::from_link("anon_inode:[eventfd]"), FdKind::EventFd);
        assert_eq!(FdKind::from_link("socket:[1234]"), FdKind::Socket);
        assert_eq!(FdKind::from_link("/memfd:state (deleted)"), FdKind::Memfd);
        assert_eq!(
            FdKind::from_link("anon_inode:[vfio-device]"),
            FdKind::VfioDevice
        );
        assert_eq!(FdKind::from_link("/dev/vfio/vfio"), FdKind::VfioContainer);
        assert_eq!(FdKind::from_link("/dev/vfio/7"), FdKind::VfioGroup);
        assert_eq!(FdKind::from_link("/dev/uio0"), FdKind::Uio);
    }

    fn sock() -> OwnedFd {
        std::os::unix::net::UnixDatagram::unbound().unwrap().into()
    }

    #[test]
    fn newest_first_duplicates_kept_by_name_suppressed_by_object() {
        let mut s = Store::new(8);
        let mut log = Vec::new();
        s.apply(&["FDSTORE=1", "FDNAME=a"], vec![sock()], &mut log);
        s.apply(&["FDSTORE=1", "FDNAME=b"], vec![sock(), sock()], &mut log);
        let a = s.entries.last().unwrap().fd.try_clone().unwrap();
        // The same open file description again, under another name.
        s.apply(&["FDSTORE=1", "FDNAME=c"], vec![a], &mut log);
        s.apply(&["FDSTORE=1"], vec![sock()], &mut log);
        let names: Vec<_> = s.entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["stored", "b", "b", "a"], "{log:?}");
        let ch = s.apply(&["FDSTOREREMOVE=1", "FDNAME=b"], vec![], &mut log);
        assert_eq!(ch.removed.len(), 2);
        let names: Vec<_> = s.entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["stored", "a"]);
    }

    #[test]
    fn invalid_names_store_as_stored_and_the_limit_closes_the_rest() {
        let mut s = Store::new(2);
        let mut log = Vec::new();
        s.apply(&["FDSTORE=1", "FDNAME=a:b"], vec![sock()], &mut log);
        assert_eq!(s.entries[0].name, "stored");
        s.apply(
            &["FDSTORE=1", "FDNAME=x"],
            vec![sock(), sock(), sock()],
            &mut log,
        );
        assert_eq!(s.entries.len(), 2, "{log:?}");
        assert!(
            log.iter().any(|l| l.contains("FileDescriptorStoreMax=2")),
            "{log:?}"
        );
        // FDSTOREREMOVE with an invalid name is ignored.
        s.apply(&["FDSTOREREMOVE=1", "FDNAME=a:b"], vec![], &mut log);
        assert_eq!(s.entries.len(), 2);
        // Fds without FDSTORE=1 are not stored.
        s.apply(&["STATUS=x"], vec![sock()], &mut log);
        assert_eq!(s.entries.len(), 2);
    }
}
