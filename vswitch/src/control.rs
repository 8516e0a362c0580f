//! The control socket: what flowctl and the CNI plugin say to vswitchd.
//!
//! Owns the protocol — one JSON request per line, one JSON response per line, over
//! a unix socket only root can open (mode 0600) — and the client side. The daemon
//! side turns requests into `Switch` calls.

use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Where vswitchd listens unless configured otherwise.
pub const DEFAULT_SOCKET: &str = "/run/vswitch/vswitchd.sock";

/// A request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Attach the existing persistent TAP device `ifname`, found in network
    /// namespace `netns` (a path; the host namespace when absent), as pod `pod`
    /// (`namespace/name`).
    Attach {
        pod: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        netns: Option<String>,
        ifname: String,
        mac: String,
        ips: Vec<IpAddr>,
    },
    /// Detach a pod (its TAP device is left for the caller to delete).
    Detach { pod: String },
    /// The attached ports.
    Ports,
    /// Trace a new connection: `src`/`dst` are `namespace/pod` or an IP address,
    /// `protocol` tcp, udp, sctp or icmp.
    Trace {
        src: String,
        dst: String,
        protocol: String,
        #[serde(default)]
        port: Option<u16>,
    },
    /// Flows with counters and the rule each comes from.
    DumpFlows,
    /// Tracked connections, optionally of one zone and matching `filter`
    /// (comma-separated `proto=`, `src=`, `dst=`, `ip=` (either end), `port=`
    /// (either end), `sport=`, `dport=`, `state=`).
    DumpConntrack {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        zone: Option<u16>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        filter: Option<String>,
    },
    /// Datapath and control-plane counters.
    Stats,
    /// Readiness: whether the cluster state has been synced and enforced.
    Health,
    /// Add a manual flow (ovs-ofctl syntax); kept until deleted or restart.
    AddFlow { flow: String },
    /// Change the actions of a manual flow.
    ModFlows { flow: String },
    /// Delete the manual flow with this table, priority and match, or all.
    DelFlows {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        flow: Option<String>,
    },
}

/// A response: `{"ok": true, "data": ...}` or `{"ok": false, "error": "..."}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub data: Value,
}

impl Response {
    pub fn ok(data: Value) -> Response {
        Response {
            ok: true,
            error: None,
            data,
        }
    }

    pub fn err(message: impl Into<String>) -> Response {
        Response {
            ok: false,
            error: Some(message.into()),
            data: Value::Null,
        }
    }
}

/// Control-socket failures, as a client sees them.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot reach vswitchd at {path}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket i/o failed")]
    Io(#[source] std::io::Error),
    #[error("vswitchd sent an unreadable response")]
    Protocol(#[source] serde_json::Error),
    #[error("vswitchd: {0}")]
    Refused(String),
}

/// Sends one request and waits (up to 10 s) for its response.
///
/// Fails when the socket cannot be reached, on i/o or protocol errors, and when
/// vswitchd answers with an error (its message is kept).
pub fn request(socket: &Path, req: &Request) -> Result<Value, ControlError> {
    let mut stream = UnixStream::connect(socket).map_err(|source| ControlError::Connect {
        path: socket.display().to_string(),
        source,
    })?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(ControlError::Io)?;
    let mut line = serde_json::to_string(req).map_err(ControlError::Protocol)?;
    line.push('\n');
    stream
        .write_all(line.as_bytes())
        .map_err(ControlError::Io)?;
    let mut reader = BufReader::new(stream);
    let mut answer = String::new();
    reader.read_line(&mut answer).map_err(ControlError::Io)?;
    let resp: Response = serde_json::from_str(&answer).map_err(ControlError::Protocol)?;
    if resp.ok {
        Ok(resp.data)
    } else {
        Err(ControlError::Refused(resp.error.unwrap_or_default()))
    }
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    Some(mac)
}

pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_reject_unknown_fields() {
        let r = Request::Attach {
            pod: "ns/p".into(),
            netns: Some("/var/run/netns/x".into()),
            ifname: "eth0".into(),
            mac: "0a:58:00:00:00:01".into(),
            ips: vec!["10.0.0.1".parse().unwrap()],
        };
        let text = serde_json::to_string(&r).unwrap();
        assert!(text.starts_with(r#"{"op":"attach""#), "{text}");
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), r);
        assert!(
            serde_json::from_str::<Request>(r#"{"op":"detach","pod":"a/b","extra":1}"#).is_err()
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"frobnicate"}"#).is_err());
        assert_eq!(
            parse_mac("0a:58:00:00:00:01"),
            Some([0x0a, 0x58, 0, 0, 0, 1])
        );
        assert_eq!(parse_mac("0a:58:00"), None);
    }
}
