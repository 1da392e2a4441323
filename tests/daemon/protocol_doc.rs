//! docs/protocol.md stays true: every JSON example in it goes through the
//! real protocol types, the documented requests are sent to a real daemon
//! on a simulated device, and every op, error kind and exit code is
//! documented.
//!
//! The examples are the fenced blocks whose info string starts with `json
//! request` or `json reply` (the marker the page defines).

use std::collections::BTreeSet;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use vfio_intx::daemon::metrics::DeviceStats;
use vfio_intx::daemon::protocol::{
    AckReply, HoldReply, MetricsReply, PingReply, ProbeReport, RaiseReply, ResetReply,
    RestartReply, SessionReport,
};

use super::*;

const DOC: &str = include_str!("../../docs/protocol.md");

/// One fenced example.
struct Example {
    /// The info string's words after `json`.
    words: Vec<String>,
    body: String,
    /// Where it starts in the page (1-based), for messages.
    line: usize,
}

impl Example {
    fn attr(&self, key: &str) -> Option<&str> {
        self.words
            .iter()
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
    }

    fn fds(&self) -> usize {
        self.attr("fds").map_or(0, |n| n.parse().unwrap())
    }

    fn value(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("protocol.md:{}: not JSON: {e}\n{}", self.line, self.body))
    }
}

fn examples(kind: &str) -> Vec<Example> {
    let mut out = Vec::new();
    let mut lines = DOC.lines().enumerate();
    while let Some((n, line)) = lines.next() {
        let Some(info) = line.trim().strip_prefix("```json ") else {
            continue;
        };
        let words: Vec<String> = info.split_whitespace().map(str::to_owned).collect();
        let mut body = String::new();
        for (_, l) in lines.by_ref() {
            if l.trim() == "```" {
                break;
            }
            body.push_str(l);
            body.push('\n');
        }
        if words.first().map(String::as_str) == Some(kind) {
            out.push(Example {
                words: words[1..].to_vec(),
                body,
                line: n + 1,
            });
        }
    }
    out
}

/// The op's name on the wire, for every request there is (a new variant
/// fails to compile here until it is named, and then until documented).
fn op(r: &Request) -> &'static str {
    match r {
        Request::Ping => "ping",
        Request::Status => "status",
        Request::Stats { .. } => "stats",
        Request::Metrics => "metrics",
        Request::Reset { .. } => "reset",
        Request::Mask { .. } => "mask",
        Request::Unmask { .. } => "unmask",
        Request::Probe { .. } => "probe",
        Request::Session { .. } => "session",
        Request::SimRaise { .. } => "sim-raise",
        Request::SimAck { .. } => "sim-ack",
        Request::Restart => "restart",
    }
}

const OPS: [&str; 12] = [
    "ping",
    "status",
    "stats",
    "metrics",
    "reset",
    "mask",
    "unmask",
    "probe",
    "session",
    "sim-raise",
    "sim-ack",
    "restart",
];

/// Every error kind (a new one fails to compile until listed).
fn every_kind() -> Vec<ErrorKind> {
    let all = [
        ErrorKind::BadRequest,
        ErrorKind::FrameTooLarge,
        ErrorKind::NotFound,
        ErrorKind::PermissionDenied,
        ErrorKind::Busy,
        ErrorKind::Unsupported,
        ErrorKind::TooManyClients,
        ErrorKind::Timeout,
        ErrorKind::OutOfDescriptors,
        ErrorKind::Failed,
    ];
    for k in all {
        match k {
            ErrorKind::BadRequest
            | ErrorKind::FrameTooLarge
            | ErrorKind::NotFound
            | ErrorKind::PermissionDenied
            | ErrorKind::Busy
            | ErrorKind::Unsupported
            | ErrorKind::TooManyClients
            | ErrorKind::Timeout
            | ErrorKind::OutOfDescriptors
            | ErrorKind::Failed => {}
        }
    }
    all.to_vec()
}

fn kind_name(k: ErrorKind) -> String {
    serde_json::to_value(k)
        .unwrap()
        .as_str()
        .unwrap()
        .to_owned()
}

/// Decodes `data` as `T` and checks that `T` re-encodes it exactly: every
/// field shown is one `T` has, and `T` has no field not shown.
fn exact<T: DeserializeOwned + Serialize>(data: &Value, what: &str) {
    let typed: T = serde_json::from_value(data.clone())
        .unwrap_or_else(|e| panic!("{what}: does not decode: {e}\n{data:#}"));
    let again = serde_json::to_value(&typed).unwrap();
    assert_eq!(&again, data, "{what}: does not re-encode to the same JSON");
}

/// Checks `data` against the reply type named `ty`.
fn check_type(ty: &str, data: &Value, what: &str) {
    match ty {
        "PingReply" => exact::<PingReply>(data, what),
        "DaemonStatus" => exact::<DaemonStatus>(data, what),
        "DeviceStats[]" => exact::<Vec<DeviceStats>>(data, what),
        "MetricsReply" => exact::<MetricsReply>(data, what),
        "ProbeReport" => exact::<ProbeReport>(data, what),
        "ResetReply" => exact::<ResetReply>(data, what),
        "HoldReply" => exact::<HoldReply>(data, what),
        "SessionReport" => exact::<SessionReport>(data, what),
        "RaiseReply" => exact::<RaiseReply>(data, what),
        "AckReply" => exact::<AckReply>(data, what),
        "RestartReply" => exact::<RestartReply>(data, what),
        other => panic!("{what}: unknown reply type {other:?}"),
    }
}

/// The reply type of each op, as the page's request table says.
fn reply_type(op: &str) -> &'static str {
    match op {
        "ping" => "PingReply",
        "status" => "DaemonStatus",
        "stats" => "DeviceStats[]",
        "metrics" => "MetricsReply",
        "probe" => "ProbeReport",
        "reset" => "ResetReply",
        "mask" | "unmask" => "HoldReply",
        "session" => "SessionReport",
        "sim-raise" => "RaiseReply",
        "sim-ack" => "AckReply",
        "restart" => "RestartReply",
        other => panic!("no reply type for {other}"),
    }
}

#[test]
fn every_documented_request_parses_carries_its_fds_and_round_trips() {
    let requests = examples("request");
    assert!(requests.len() >= OPS.len(), "too few request examples");
    let mut documented = BTreeSet::new();
    for ex in &requests {
        let what = format!("protocol.md:{}", ex.line);
        let r: Request = protocol::decode(ex.body.as_bytes())
            .unwrap_or_else(|e| panic!("{what}: not a request: {e}\n{}", ex.body));
        assert_eq!(r.fds_expected(), ex.fds(), "{what}: descriptors");
        let bytes = serde_json::to_vec(&r).unwrap();
        assert_eq!(protocol::decode::<Request>(&bytes).unwrap(), r, "{what}");
        // The op named in the JSON is the variant it parsed to.
        assert_eq!(ex.value()["op"], op(&r), "{what}");
        documented.insert(op(&r));
    }
    for op in OPS {
        assert!(documented.contains(op), "no example of {op:?}");
        assert!(
            DOC.contains(&format!("| `{op}` ")),
            "{op:?} missing in the request table"
        );
    }
}

/// The versioning rules the page states: unknown fields in a request are
/// ignored, unknown ops refused.
#[test]
fn the_documented_versioning_rules_hold() {
    let r: Request =
        protocol::decode(br#"{"op":"reset","bdf":"0000:00:04.0","from-v2":1}"#).unwrap();
    assert_eq!(
        r,
        Request::Reset {
            bdf: "0000:00:04.0".parse().unwrap()
        }
    );
    assert!(protocol::decode::<Request>(br#"{"op":"reset-all"}"#).is_err());
}

#[test]
fn every_documented_reply_decodes_into_its_type_field_for_field() {
    let replies = examples("reply");
    let mut types = BTreeSet::new();
    for ex in &replies {
        let what = format!("protocol.md:{}", ex.line);
        let value = ex.value();
        let response: Response = protocol::decode(ex.body.as_bytes())
            .unwrap_or_else(|e| panic!("{what}: not a reply: {e}\n{}", ex.body));
        let ty = ex.words.first().map(String::as_str).unwrap_or_default();
        match (&response, ty) {
            (Response::Error { .. }, "error") => {
                assert_eq!(serde_json::to_value(&response).unwrap(), value, "{what}");
            }
            (Response::Ok { data }, ty) if ty != "error" => {
                check_type(ty, data, &what);
                types.insert(ty.to_owned());
            }
            _ => panic!("{what}: marked {ty:?} but is {response:?}"),
        }
    }
    for op in OPS {
        assert!(
            types.contains(reply_type(op)),
            "no reply example of {}",
            reply_type(op)
        );
    }
}

#[test]
fn every_error_kind_and_exit_code_is_documented() {
    for k in every_kind() {
        let name = kind_name(k);
        assert!(
            DOC.contains(&format!("| `{name}` |")),
            "error kind {name:?} missing in the table"
        );
    }
    for code in [
        exit::OK,
        exit::FAILED,
        exit::USAGE,
        exit::RUNTIME,
        exit::CONFIG,
        exit::NOT_FOUND,
        exit::PERMISSION,
        exit::UNREACHABLE,
        exit::BUSY,
        exit::RESTART,
    ] {
        assert!(
            DOC.contains(&format!("\n| {code} | ")),
            "exit code {code} missing in the table"
        );
    }
}

#[test]
fn documented_requests_get_the_documented_answers_from_a_real_daemon() {
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
    let d = Daemon::start(&device(A, ""));
    let mut sent = 0;
    for ex in examples("request") {
        let Some(expect) = ex.attr("expect") else {
            continue;
        };
        let what = format!("protocol.md:{}", ex.line);
        let r: Request = protocol::decode(ex.body.as_bytes()).unwrap();
        let mut client = d.client();
        let response = match ex.fds() {
            0 => client.request_raw_json(ex.body.trim().as_bytes()),
            2 => {
                let irqfd = EventFd::new(EFD_NONBLOCK).unwrap();
                let resample = EventFd::new(EFD_NONBLOCK).unwrap();
                client
                    .request_with_fds(&r, &[irqfd.as_raw_fd(), resample.as_raw_fd()])
                    .unwrap()
            }
            n => panic!("{what}: cannot send {n} descriptors in this test"),
        };
        match (&response, expect) {
            (Response::Ok { data }, "ok") => check_type(reply_type(op(&r)), data, &what),
            (Response::Error { kind, .. }, kind_expected) if kind_name(*kind) == kind_expected => {}
            _ => panic!("{what}: expected {expect}, the daemon answered {response:?}"),
        }
        if op(&r) == "session" {
            // End it and wait until the daemon has let go.
            let _ = client.end_session();
        }
        sent += 1;
    }
    assert!(sent >= 12, "only {sent} examples were sent");
    eprintln!("protocol.md: {sent} documented requests answered as documented");
}
