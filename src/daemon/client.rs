//! A synchronous client of the control socket, for the CLI, tests and
//! VMMs (no async runtime needed).

use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};

use crate::daemon::protocol::{self, FrameError, Request, Response, HEADER, MAX_FRAME};

/// Why talking to the daemon failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// Nobody listens on the socket (the daemon is not running).
    #[error("{}: the vfio-intx daemon is not running", .path.display())]
    NotRunning {
        /// The socket.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Connecting failed otherwise (e.g. permission denied).
    #[error("{}: connecting to the vfio-intx daemon failed", .path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Sending or receiving failed.
    #[error("talking to the vfio-intx daemon failed")]
    Io(#[from] io::Error),
    /// The daemon's answer could not be decoded.
    #[error("the vfio-intx daemon's answer could not be decoded")]
    Frame(#[from] FrameError),
    /// The daemon accepted the connection but did not answer in time (hung
    /// or stalled).
    #[error("{}: the vfio-intx daemon is not answering (nothing within {timeout:?})", .path.display())]
    NotAnswering {
        /// The socket.
        path: PathBuf,
        /// How long the client waited.
        timeout: Duration,
    },
    /// The daemon closed the connection without answering.
    #[error("the vfio-intx daemon closed the connection without answering")]
    Closed,
}

/// A connection to the daemon.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    path: PathBuf,
    timeout: Duration,
}

impl Client {
    /// Connects to the socket at `path`; requests time out after `timeout`.
    /// A daemon whose backlog is full (it stopped accepting) is
    /// [`ClientError::NotAnswering`] after `timeout`, too.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, ClientError> {
        let stream = connect_within(path, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(Self {
            stream,
            path: path.to_owned(),
            timeout,
        })
    }

    /// Waits for answers without a time limit (sessions).
    pub fn without_timeout(&self) -> io::Result<()> {
        self.stream.set_read_timeout(None)
    }

    /// Sends `request` and waits for the answer.
    pub fn request(&mut self, request: &Request) -> Result<Response, ClientError> {
        self.request_with_fds(request, &[])
    }

    /// Sends `request` with the descriptors `fds` attached (`SCM_RIGHTS`;
    /// the daemon receives duplicates) and waits for the answer.
    pub fn request_with_fds(
        &mut self,
        request: &Request,
        fds: &[RawFd],
    ) -> Result<Response, ClientError> {
        let frame = protocol::encode(request)?;
        if let Err(e) = self.send_frame(&frame, fds) {
            if timed_out(&e) {
                return Err(self.not_answering());
            }
            // The daemon may have answered and closed before reading (a
            // refused peer): its answer says more than EPIPE.
            return self.read_response().map_err(|_| ClientError::Io(e));
        }
        self.read_response()
    }

    fn not_answering(&self) -> ClientError {
        ClientError::NotAnswering {
            path: self.path.clone(),
            timeout: self.timeout,
        }
    }

    /// An I/O error that is the socket's timeout expiring.
    fn io(&self, e: io::Error) -> ClientError {
        if timed_out(&e) {
            self.not_answering()
        } else {
            ClientError::Io(e)
        }
    }

    fn send_frame(&mut self, frame: &[u8], fds: &[RawFd]) -> io::Result<()> {
        if fds.is_empty() {
            self.stream.write_all(frame)?;
        } else {
            let cmsg = [ControlMessage::ScmRights(fds)];
            let sent = sendmsg::<()>(
                self.stream.as_raw_fd(),
                &[IoSlice::new(frame)],
                &cmsg,
                MsgFlags::empty(),
                None,
            )
            .map_err(io::Error::from)?;
            self.stream.write_all(frame.get(sent..).unwrap_or(&[]))?;
        }
        Ok(())
    }

    /// Sends raw bytes (tests of malformed frames).
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        Ok(self.stream.write_all(bytes)?)
    }

    /// Sends `json` as one frame and reads the answer (tests of requests
    /// the typed API cannot express); a transport error becomes a
    /// [`Response::Error`].
    pub fn request_raw_json(&mut self, json: &[u8]) -> Response {
        let mut frame = Vec::with_capacity(HEADER + json.len());
        frame.extend_from_slice(&(json.len() as u32).to_be_bytes());
        frame.extend_from_slice(json);
        match self.send_raw(&frame).and_then(|()| self.read_response()) {
            Ok(r) => r,
            Err(e) => Response::error(
                crate::daemon::protocol::ErrorKind::Failed,
                crate::error_chain(&e),
            ),
        }
    }

    /// Closes the sending side (the daemon sees the end of the stream).
    pub fn shutdown_write(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
    }

    /// Reads one answer.
    pub fn read_response(&mut self) -> Result<Response, ClientError> {
        let mut header = [0u8; HEADER];
        if let Err(e) = self.stream.read_exact(&mut header) {
            return Err(if e.kind() == io::ErrorKind::UnexpectedEof {
                ClientError::Closed
            } else {
                self.io(e)
            });
        }
        let len = u32::from_be_bytes(header) as usize;
        if len > MAX_FRAME {
            return Err(FrameError::TooLarge { len }.into());
        }
        let mut body = vec![0; len];
        self.stream.read_exact(&mut body).map_err(|e| self.io(e))?;
        Ok(protocol::decode(&body)?)
    }

    /// Blocks until the daemon closes the connection (a session ends when
    /// either side closes).
    pub fn wait_closed(&mut self) -> io::Result<()> {
        let mut buf = [0u8; 256];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Ends the session on this connection and waits until the daemon has
    /// let go: it closes the connection only after detaching the session
    /// and, for a VMM's own device fd, disarming INTx and closing its copy
    /// of the fd. After this returns the VMM may set the device's INTx up
    /// itself. (Closing the connection also ends the session, without
    /// waiting.)
    pub fn end_session(mut self) -> io::Result<()> {
        self.shutdown_write();
        self.wait_closed()
    }

    /// The underlying stream.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }
}

/// Whether `e` is a socket timeout expiring (`SO_RCVTIMEO`/`SO_SNDTIMEO`
/// report EAGAIN).
fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Connects without blocking in connect(2): a Unix socket whose backlog
/// is full answers EAGAIN to a non-blocking connect, retried until
/// `timeout`.
fn connect_within(path: &Path, timeout: Duration) -> Result<UnixStream, ClientError> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let failed = |source: io::Error| {
        if matches!(
            source.kind(),
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
        ) {
            ClientError::NotRunning {
                path: path.to_owned(),
                source,
            }
        } else {
            ClientError::Connect {
                path: path.to_owned(),
                source,
            }
        }
    };
    let addr = UnixAddr::new(path).map_err(|e| failed(e.into()))?;
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(|e| failed(e.into()))?;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match connect(fd.as_raw_fd(), &addr) {
            Ok(()) => break,
            Err(nix::errno::Errno::EINTR) => {}
            Err(nix::errno::Errno::EAGAIN) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(nix::errno::Errno::EAGAIN) => {
                return Err(ClientError::NotAnswering {
                    path: path.to_owned(),
                    timeout,
                })
            }
            Err(e) => return Err(failed(e.into())),
        }
    }
    let stream = UnixStream::from(fd);
    stream.set_nonblocking(false)?;
    Ok(stream)
}
