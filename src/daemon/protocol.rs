//! The control protocol: frames of a 4-byte big-endian length followed by
//! that many bytes of JSON, at most [`MAX_FRAME`] bytes each. A client sends
//! a [`Request`] and receives one [`Response`]; descriptors travel with the
//! request's bytes as `SCM_RIGHTS` (sessions).
//!
//! The decoder is synchronous and pure so that it can be fuzzed without a
//! socket.
//!
//! PCI addresses travel as their sysfs string (`"0000:01:00.0"`) and are
//! [`Bdf`]s on both sides: a request naming a bad address is refused when
//! it is decoded, with [`BdfError`](crate::pci::BdfError)'s bounded message.

use serde::{Deserialize, Serialize};

use crate::daemon::config::BackendKind;
use crate::daemon::metrics::DeviceStats;
use crate::pci::sharing::LineSharing;
use crate::pci::Bdf;

/// Largest frame body accepted, in bytes (1 MiB).
pub const MAX_FRAME: usize = 1 << 20;
/// Size of the length prefix.
pub const HEADER: usize = 4;

/// Why a frame could not be decoded or encoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The length prefix announces more than [`MAX_FRAME`] bytes.
    #[error("frame of {len} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge {
        /// The announced length.
        len: usize,
    },
    /// The body is not a valid message.
    #[error("malformed message")]
    Json(#[source] serde_json::Error),
}

/// Splits a byte stream into frames.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered and not yet returned as a frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete frame's body, `None` if more bytes are needed.
    /// An oversized length is an error as soon as the prefix is complete,
    /// before its body is read.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        let Some(header) = self.buf.get(..HEADER) else {
            return Ok(None);
        };
        let mut len = [0u8; HEADER];
        len.copy_from_slice(header);
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_FRAME {
            return Err(FrameError::TooLarge { len });
        }
        if self.buf.len() < HEADER + len {
            return Ok(None);
        }
        let body = self.buf[HEADER..HEADER + len].to_vec();
        self.buf.drain(..HEADER + len);
        Ok(Some(body))
    }
}

/// Encodes `message` as one frame.
pub fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, FrameError> {
    let body = serde_json::to_vec(message).map_err(FrameError::Json)?;
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge { len: body.len() });
    }
    let mut frame = Vec::with_capacity(HEADER + body.len());
    // At most MAX_FRAME, so it fits in 32 bits.
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Decodes a frame body.
pub fn decode<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, FrameError> {
    serde_json::from_slice(body).map_err(FrameError::Json)
}

/// A [`Bdf`] on the wire: its sysfs string. Decoding accepts what
/// `Bdf::from_str` accepts and fails with its bounded message otherwise.
mod bdf_wire {
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::pci::Bdf;

    pub(super) fn serialize<S: Serializer>(bdf: &Bdf, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(bdf)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Bdf, D::Error> {
        String::deserialize(d)?.parse().map_err(D::Error::custom)
    }
}

/// An optional [`Bdf`] on the wire: the string, or `null`.
mod opt_bdf_wire {
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::pci::Bdf;

    pub(super) fn serialize<S: Serializer>(bdf: &Option<Bdf>, s: S) -> Result<S::Ok, S::Error> {
        match bdf {
            Some(bdf) => s.collect_str(bdf),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Bdf>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|text| text.parse().map_err(D::Error::custom))
            .transpose()
    }
}

/// A request to the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Is the daemon alive?
    Ping,
    /// The daemon's state and every device's.
    Status,
    /// Per-device statistics (one device or all).
    Stats {
        /// The device; all when absent.
        #[serde(default, with = "opt_bdf_wire")]
        bdf: Option<Bdf>,
    },
    /// Every device's metrics in the Prometheus text format.
    Metrics,
    /// Resets a device through its gate.
    Reset {
        /// The device.
        #[serde(with = "bdf_wire")]
        bdf: Bdf,
    },
    /// Masks a device's INTx and holds it masked (operator hold).
    Mask {
        /// The device.
        #[serde(with = "bdf_wire")]
        bdf: Bdf,
    },
    /// Lifts an operator hold.
    Unmask {
        /// The device.
        #[serde(with = "bdf_wire")]
        bdf: Bdf,
    },
    /// Reports whether PCI 2.3 INTx masking works on a device.
    Probe {
        /// The device.
        #[serde(with = "bdf_wire")]
        bdf: Bdf,
    },
    /// Starts a VMM session. The connection is the session: it ends when
    /// the VMM closes it or dies.
    ///
    /// - On a device the daemon owns: `bdf`, and two descriptors: KVM's
    ///   irqfd (trigger) and resample eventfd.
    /// - On the VMM's own VFIO device: `vfio-device-fd = true` (implied
    ///   when `bdf` is absent) and three descriptors: the VFIO device fd,
    ///   then the irqfd and the resample eventfd. `bdf` names the device;
    ///   it may be left out where the kernel names a device fd's device
    ///   (Linux 6.18+). The daemon services the device's INTx through that
    ///   fd for the session and releases it when the session ends; the VMM
    ///   keeps its container and group, and must not set INTx up itself
    ///   meanwhile.
    Session {
        /// The device.
        #[serde(default, with = "opt_bdf_wire")]
        bdf: Option<Bdf>,
        /// The first descriptor is the VMM's VFIO device fd.
        #[serde(default, rename = "vfio-device-fd")]
        vfio_device_fd: bool,
        /// The EOI path on the VMM's own device (the daemon's configuration
        /// decides it for devices the daemon owns); `auto` when absent.
        #[serde(default)]
        path: Option<crate::daemon::config::PathSetting>,
    },
    /// Test hook of simulated devices (and of an edu with
    /// `edu-test-hooks`): the device raises `count` interrupts.
    #[serde(alias = "test-raise")]
    SimRaise {
        /// The device.
        #[serde(with = "bdf_wire")]
        bdf: Bdf,
        /// How many.
        #[serde(default = "one")]
        count: u64,
    },
    /// Test hook of simulated devices (and of an edu with
    /// `edu-test-hooks`): the driver acknowledges one interrupt (what a
    /// guest ISR's BAR write does).
    #[serde(alias = "test-ack")]
    SimAck {
        /// The device.
        #[serde(with = "bdf_wire")]
        bdf: Bdf,
    },
    /// Operators only: restart the daemon keeping every device and session
    /// (an upgrade): the daemon checks that systemd's fd store holds what
    /// it needs, answers, and exits with status 75 (EX_TEMPFAIL), handing
    /// nothing back; the service manager starts it again with the store.
    Restart,
}

fn one() -> u64 {
    1
}

impl Request {
    /// A session on a device the daemon owns (send the irqfd and the
    /// resample eventfd with it).
    pub fn session(bdf: Bdf) -> Self {
        Request::Session {
            bdf: Some(bdf),
            vfio_device_fd: false,
            path: None,
        }
    }

    /// The device a request changes (mask, unmask, reset, the test
    /// hooks): an operator may name any, a VMM only its own session's.
    pub fn acts_on(&self) -> Option<Bdf> {
        match self {
            Request::Reset { bdf }
            | Request::Mask { bdf }
            | Request::Unmask { bdf }
            | Request::SimRaise { bdf, .. }
            | Request::SimAck { bdf } => Some(*bdf),
            Request::Ping
            | Request::Status
            | Request::Stats { .. }
            | Request::Metrics
            | Request::Probe { .. }
            | Request::Session { .. }
            | Request::Restart => None,
        }
    }

    /// A session on the VMM's own VFIO device (send the device fd, the
    /// irqfd and the resample eventfd with it). `bdf` may be `None` where
    /// the kernel names a device fd's device (Linux 6.18+).
    pub fn device_fd_session(
        bdf: Option<Bdf>,
        path: Option<crate::daemon::config::PathSetting>,
    ) -> Self {
        Request::Session {
            bdf,
            vfio_device_fd: true,
            path,
        }
    }

    /// How many descriptors must accompany the request (at most
    /// [`MAX_FDS`]).
    pub fn fds_expected(&self) -> usize {
        match self {
            Request::Session {
                bdf: Some(_),
                vfio_device_fd: false,
                ..
            } => 2,
            Request::Session { .. } => 3,
            _ => 0,
        }
    }
}

/// The most descriptors any request carries (a session with the VMM's own
/// device fd: device, irqfd, resample eventfd).
pub const MAX_FDS: usize = 3;

/// What kind of failure a [`Response::Error`] reports; the CLI maps each to
/// an exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// Not a valid request (bad JSON, wrong descriptors, bad argument).
    BadRequest,
    /// The frame exceeded [`MAX_FRAME`].
    FrameTooLarge,
    /// The device is not one the daemon owns.
    NotFound,
    /// The peer may not use the daemon.
    PermissionDenied,
    /// The device is busy (a reset did not get through in time); retry.
    Busy,
    /// The request is valid but not supported.
    Unsupported,
    /// Too many clients are connected.
    TooManyClients,
    /// The client took too long to send its request.
    Timeout,
    /// The daemon is out of file descriptors (`EMFILE`/`ENFILE`): the
    /// descriptors a request carried could not be received. Transient;
    /// retry.
    OutOfDescriptors,
    /// The operation failed.
    Failed,
}

/// The daemon's answer to one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Response {
    /// Done; `data` depends on the request.
    Ok {
        /// The answer.
        #[serde(default)]
        data: serde_json::Value,
    },
    /// Refused or failed.
    Error {
        /// What kind of failure.
        kind: ErrorKind,
        /// The whole error chain, sentence style.
        message: String,
    },
}

impl Response {
    /// A success carrying `data`.
    pub fn ok(data: impl Serialize) -> Self {
        match serde_json::to_value(data) {
            Ok(data) => Response::Ok { data },
            Err(e) => Response::error(ErrorKind::Failed, format!("encoding the answer: {e}")),
        }
    }

    /// A failure.
    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Self {
        Response::Error {
            kind,
            message: message.into(),
        }
    }
}

/// The example guest's counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExampleGuestStatus {
    /// The device assigned to it.
    #[serde(with = "bdf_wire")]
    pub bdf: Bdf,
    /// Interrupts the device raised.
    pub raised: u64,
    /// ISR runs that acknowledged a device interrupt.
    pub acked: u64,
    /// ISR runs in all.
    pub isr_runs: u64,
}

/// The daemon's state as `status` reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DaemonStatus {
    /// The daemon's process id.
    pub pid: u32,
    /// Its version.
    pub version: String,
    /// Milliseconds since it started.
    pub uptime_ms: u64,
    /// The configuration file.
    pub config: String,
    /// The control socket.
    pub socket: String,
    /// Every device, by address.
    pub devices: Vec<DeviceStatus>,
    /// The built-in example guest, if it runs.
    pub example_guest: Option<ExampleGuestStatus>,
}

/// What `probe` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeReport {
    /// The device.
    #[serde(with = "bdf_wire")]
    pub bdf: Bdf,
    /// Whether PCI 2.3 INTx masking can be relied on; `None` for a device
    /// the daemon owns without having probed it (`probe = false`).
    pub supported: Option<bool>,
    /// Why, in words.
    pub verdict: String,
    /// Which evidence decided ([`Source::evidence`](crate::pci::sysfs::Source::evidence):
    /// `toggle-test` only where no driver was bound); `None` when not probed.
    #[serde(default)]
    pub evidence: Option<String>,
    /// Whether the daemon owns the device (the verdict is then the one from
    /// its start: nothing is toggled under a device in service).
    pub owned: bool,
    /// Who shares the device's host INTx line; `None` for a simulated
    /// device.
    #[serde(default)]
    pub line: Option<LineReport>,
}

/// A device's host INTx line and who shares it
/// ([`LineSharing`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineReport {
    /// The sysfs `irq`; `None` without one (or when it could not be read).
    pub irq: Option<u32>,
    /// `routed` (the device is enabled: the line its handlers use) or
    /// `firmware` (not enabled yet: the firmware's number, which enabling
    /// may change).
    pub irq_source: String,
    /// Every other PCI device with the same `irq`.
    pub sharers: Vec<SharerReport>,
    /// The handler names `/proc/interrupts` lists for `irq`.
    pub handlers: Vec<String>,
    /// `alone`, `shared-safe`, `shared-unsafe`, `unknown` or `no-irq`.
    pub verdict: String,
    /// What to do, for `shared-unsafe` and `unknown`.
    pub advice: Option<String>,
    /// All of it in one sentence.
    pub summary: String,
}

/// Another PCI device on a line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharerReport {
    /// The device.
    #[serde(with = "bdf_wire")]
    pub bdf: Bdf,
    /// Its driver.
    pub driver: Option<String>,
    /// Its read-only masking verdict; `None` when it could not be read.
    pub masking: Option<bool>,
}

impl From<&LineSharing> for LineReport {
    fn from(l: &LineSharing) -> Self {
        let advice = l.advice();
        LineReport {
            irq: l.irq,
            irq_source: l.source.name().to_owned(),
            sharers: l
                .sharers
                .iter()
                .map(|s| SharerReport {
                    bdf: s.bdf,
                    driver: s.driver.clone(),
                    masking: s.masking,
                })
                .collect(),
            handlers: l.handlers.clone(),
            verdict: l.verdict.name().to_owned(),
            advice: (!advice.is_empty()).then_some(advice),
            summary: l.to_string(),
        }
    }
}

impl LineReport {
    /// The line of `bdf` on the host (blocking: scans sysfs); a line that
    /// could not be read is reported `unknown`, with the error.
    pub fn of(bdf: Bdf) -> LineReport {
        match crate::pci::sharing::line_sharing(&crate::pci::sysfs::PciSysfs::default(), bdf) {
            Ok(l) => LineReport::from(&l),
            Err(e) => LineReport {
                irq: None,
                irq_source: "firmware".to_owned(),
                sharers: Vec::new(),
                handlers: Vec::new(),
                verdict: "unknown".to_owned(),
                advice: None,
                summary: format!("line unknown: {}", crate::error_chain(&e)),
            },
        }
    }
}

/// What a successful session request answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionReport {
    /// The device.
    #[serde(with = "bdf_wire")]
    pub bdf: Bdf,
    /// The EOI path.
    pub path: String,
    /// On a VMM's own device fd: how the daemon established its address.
    #[serde(default)]
    pub identity: Option<String>,
}

/// A device's state for `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStatus {
    /// The device.
    #[serde(with = "bdf_wire")]
    pub bdf: Bdf,
    /// Its backend.
    pub backend: BackendKind,
    /// The EOI path sessions use.
    pub path: String,
    /// The masking probe's verdict at start.
    pub masking: String,
    /// Whether a VMM session (or the example guest) is attached.
    pub session: bool,
    /// Why the line is held masked by the daemon, if it is.
    pub held: Option<String>,
    /// COMMAND as found before arming.
    pub found_command: u16,
    /// Whether the daemon bound the driver (and restores it at shutdown).
    pub bound_by_daemon: bool,
    /// Whether a reset holds the device right now.
    pub in_reset: bool,
    /// For a VMM's own device fd, handed over for its session: how its
    /// address was established. `None` for devices the daemon opened.
    #[serde(default)]
    pub handed_over: Option<String>,
    /// Who shares the host INTx line; `None` for a simulated device.
    #[serde(default)]
    pub line: Option<LineReport>,
    /// Counters.
    pub stats: DeviceStats,
}

/// What `ping` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PingReply {
    /// The daemon's process id.
    pub pid: u32,
}

/// What `metrics` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricsReply {
    /// Every device's metrics in the Prometheus text format.
    pub text: String,
}

/// What `reset` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetReply {
    /// The device.
    #[serde(with = "bdf_wire")]
    pub bdf: Bdf,
    /// Always true: the reset went through the device's gate.
    pub reset: bool,
}

/// What `mask` and `unmask` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldReply {
    /// The device.
    #[serde(with = "bdf_wire")]
    pub bdf: Bdf,
    /// Whether the operator now holds the line masked.
    pub held: bool,
}

/// What `sim-raise` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaiseReply {
    /// Interrupts raised.
    pub raised: u64,
    /// A simulated device's totals after the raise (`count = 0` asks for
    /// them alone): whether a raise or an acknowledgement whose answer was
    /// lost took effect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub totals: Option<SimTotals>,
}

/// A simulated device's interrupt totals (they survive the daemon's
/// restart with the device's state).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimTotals {
    /// Interrupts the device raised in all.
    pub raised_total: u64,
    /// Interrupts the driver acknowledged in all.
    pub acked_total: u64,
}

/// What `restart` answers (before the daemon exits with status 75).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartReply {
    /// The process that is about to exit.
    pub pid: u32,
    /// Devices kept for the next process.
    pub devices: usize,
    /// Sessions kept for the next process.
    pub sessions: usize,
}

/// What `sim-ack` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckReply {
    /// Whether an interrupt was pending to acknowledge.
    pub acked: bool,
    /// A simulated device's totals after the acknowledgement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub totals: Option<SimTotals>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bdf(text: &str) -> Bdf {
        text.parse().unwrap()
    }

    #[test]
    fn frames_split_across_reads_are_reassembled() {
        let frame = encode(&Request::Status).unwrap();
        let mut d = FrameDecoder::new();
        for b in &frame[..frame.len() - 1] {
            d.push(std::slice::from_ref(b));
            assert!(d.next_frame().unwrap().is_none());
        }
        d.push(&frame[frame.len() - 1..]);
        let body = d.next_frame().unwrap().unwrap();
        assert_eq!(decode::<Request>(&body).unwrap(), Request::Status);
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn an_oversized_prefix_fails_before_the_body() {
        let mut d = FrameDecoder::new();
        d.push(&((MAX_FRAME + 1) as u32).to_be_bytes());
        assert!(matches!(d.next_frame(), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn requests_are_kebab_case_json() {
        let r: Request = decode(br#"{"op":"sim-raise","bdf":"0000:00:04.0"}"#).unwrap();
        assert_eq!(
            r,
            Request::SimRaise {
                bdf: bdf("0000:00:04.0"),
                count: 1
            }
        );
        assert!(decode::<Request>(br#"{"op":"format-disk"}"#).is_err());
    }

    #[test]
    fn a_bad_address_is_refused_at_decode_naming_it_once() {
        let long = "0".repeat(600_000);
        for bad in [
            r#"{"op":"reset","bdf":"0000:01:00.8"}"#.to_owned(),
            r#"{"op":"stats","bdf":"zz"}"#.to_owned(),
            r#"{"op":"session","bdf":"01:00"}"#.to_owned(),
            format!(r#"{{"op":"mask","bdf":"{long}"}}"#),
        ] {
            let e = match decode::<Request>(bad.as_bytes()) {
                Ok(r) => panic!("{bad:.80} decoded as {r:?}"),
                Err(e) => crate::error_chain(&e),
            };
            assert_eq!(e.matches("invalid PCI address").count(), 1, "{e}");
            assert!(e.len() < 512, "{} bytes: {e:.300}", e.len());
        }
        // What `Bdf::from_str` accepts, the wire accepts, and answers in
        // the sysfs form.
        let r: Request = decode(br#"{"op":"reset","bdf":"3a:1f.7"}"#).unwrap();
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"op":"reset","bdf":"0000:3a:1f.7"}"#
        );
    }

    #[test]
    fn sessions_name_their_descriptors() {
        use crate::daemon::config::PathSetting;
        // A device the daemon owns: irqfd and resample eventfd.
        let owned: Request = decode(br#"{"op":"session","bdf":"0000:01:00.0"}"#).unwrap();
        assert_eq!(owned, Request::session(bdf("0000:01:00.0")));
        assert_eq!(owned.fds_expected(), 2);
        // A VMM's own device: its device fd first.
        let handed: Request = decode(
            br#"{"op":"session","vfio-device-fd":true,"bdf":"0000:01:00.0","path":"userspace"}"#,
        )
        .unwrap();
        assert_eq!(
            handed,
            Request::device_fd_session(Some(bdf("0000:01:00.0")), Some(PathSetting::Userspace))
        );
        assert_eq!(handed.fds_expected(), 3);
        // Without an address the first descriptor can only be a device fd.
        let unnamed: Request = decode(br#"{"op":"session"}"#).unwrap();
        assert_eq!(unnamed.fds_expected(), 3);
        // The wire form round-trips.
        let bytes = serde_json::to_vec(&handed).unwrap();
        assert_eq!(decode::<Request>(&bytes).unwrap(), handed);
        assert!(decode::<Request>(br#"{"op":"session","path":"sideways"}"#).is_err());
    }

    #[test]
    fn typed_replies_are_byte_for_byte_the_former_json() {
        let same = |typed: String, former: serde_json::Value| {
            assert_eq!(typed, former.to_string());
        };
        let enc = |v: &dyn erased::Ser| v.json();
        same(
            enc(&HoldReply {
                bdf: bdf("0000:00:04.0"),
                held: true,
            }),
            serde_json::json!({ "bdf": "0000:00:04.0", "held": true }),
        );
        same(
            enc(&ResetReply {
                bdf: bdf("0000:00:04.0"),
                reset: true,
            }),
            serde_json::json!({ "bdf": "0000:00:04.0", "reset": true }),
        );
        same(enc(&PingReply { pid: 7 }), serde_json::json!({ "pid": 7 }));
        same(
            enc(&MetricsReply { text: "x".into() }),
            serde_json::json!({ "text": "x" }),
        );
        same(
            enc(&RaiseReply {
                raised: 3,
                totals: None,
            }),
            serde_json::json!({ "raised": 3 }),
        );
        same(
            enc(&AckReply {
                acked: false,
                totals: None,
            }),
            serde_json::json!({ "acked": false }),
        );
    }

    mod erased {
        pub(super) trait Ser {
            fn json(&self) -> String;
        }
        impl<T: serde::Serialize> Ser for T {
            fn json(&self) -> String {
                serde_json::to_string(self).unwrap_or_default()
            }
        }
    }
}
