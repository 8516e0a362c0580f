//! The control protocol: what flowctl and vswitch-cni say to vswitchd.
//!
//! Owns the wire format and its types, nothing else: one JSON object per line
//! each way over a unix socket. A connection opens with [`Request::Hello`]
//! carrying the protocol version; then each [`Request`] gets one answer,
//! `{"ok": true, "data": ...}` with the request's typed view ([`view`]), or
//! `{"ok": false, "error": "..."}`. The client side ([`Client`]) lives here;
//! the daemon side decodes with [`decode`] and answers with [`encode_answer`].
//! Also what both ends show people the same way: the trace packet syntax
//! ([`spec`]) and the text of a trace ([`text`]).
//! No threads, no async runtime, no Kubernetes client: flowctl links this.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub mod spec;
pub mod text;
pub mod view;

pub use policy::probe::{Endpoint, L4};

/// The protocol version this build speaks. A client and a daemon of different
/// versions refuse each other in the handshake, naming both.
pub const PROTOCOL: u32 = 1;

/// Where vswitchd listens unless configured otherwise.
pub const DEFAULT_SOCKET: &str = "/run/vswitch/vswitchd.sock";

/// The longest request line the daemon reads (a request is small, except
/// `what-if`, which carries a policy set; a larger one is refused rather
/// than buffered).
pub const MAX_REQUEST_BYTES: usize = 16 << 20;

/// A manifest file sent with a request: its name (for errors) and text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestFile {
    pub path: String,
    pub text: String,
}

/// A request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// The first line of every connection: the client's protocol version.
    Hello { protocol: u32, client: String },
    /// Attach the existing persistent TAP device `ifname`, found in network
    /// namespace `netns` (a path; the host namespace when absent), as `pod`.
    Attach(Attach),
    /// Detach a pod (its TAP device is left for the caller to delete).
    Detach { pod: policy::model::ObjectKey },
    /// The ports: [`view::PortView`]s.
    Ports,
    /// Trace a new connection against the live tables: [`policy::explain::TraceView`].
    Trace {
        src: Endpoint,
        dst: Endpoint,
        l4: L4,
    },
    /// Flows with counters and the rule each comes from: [`view::FlowView`]s.
    DumpFlows,
    /// Names learned from DNS answers, with their addresses and expiry:
    /// [`view::DnsView`]s.
    DumpDns,
    /// Service frontends the switch load-balances, with their backends and
    /// the connections to each: [`view::ServiceView`]s.
    DumpServices,
    /// The datapath's select groups in ovs-ofctl syntax (strings).
    DumpGroups,
    /// The recent-connections summary: [`view::RecentView`].
    Recent,
    /// Replay the recent connections against another policy set (the
    /// NetworkPolicies and ClusterNetworkPolicies in `files`, manifest
    /// text; the live pods, namespaces and nodes): [`view::WhatIfView`].
    WhatIf { files: Vec<ManifestFile> },
    /// Every policy (NetworkPolicy, ClusterNetworkPolicy) in force or
    /// rejected, with its tier, rules and flow counts: [`view::PolicyView`]s.
    DumpPolicies,
    /// Tracked connections, optionally of one zone, that pass `filter`:
    /// [`view::ConnView`]s.
    DumpConntrack {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        zone: Option<u16>,
        #[serde(default)]
        filter: ConnFilter,
    },
    /// Datapath and control-plane counters: [`view::StatsView`].
    Stats,
    /// Readiness: [`view::HealthView`].
    Health,
    /// Add a manual flow (ovs-ofctl syntax); kept until deleted or restart.
    AddFlow { flow: String },
    /// Change the actions of a manual flow.
    ModFlows { flow: String },
    /// Delete the manual flow with this table, priority and match, or all:
    /// [`view::Deleted`].
    DelFlows {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        flow: Option<String>,
    },
}

/// What `attach` carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attach {
    pub pod: policy::model::ObjectKey,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    pub ifname: String,
    pub mac: Mac,
    pub ips: Vec<IpAddr>,
}

/// A MAC address, `aa:bb:cc:dd:ee:ff` on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mac(pub [u8; 6]);

impl std::fmt::Display for Mac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl std::str::FromStr for Mac {
    type Err = String;

    /// Parses `aa:bb:cc:dd:ee:ff`.
    fn from_str(s: &str) -> Result<Mac, String> {
        let bad = || format!("{s:?} is not a MAC address (aa:bb:cc:dd:ee:ff)");
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut mac {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Mac(mac))
    }
}

impl Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Mac, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Which tracked connections a dump shows: every field that is set must match.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConnFilter {
    /// `tcp`, `udp`, `sctp`, `icmp`, `icmp6`, or `protoN`.
    pub proto: Option<String>,
    pub src: Option<IpAddr>,
    pub dst: Option<IpAddr>,
    /// Either end.
    pub ip: Option<IpAddr>,
    pub sport: Option<u16>,
    pub dport: Option<u16>,
    /// Either end.
    pub port: Option<u16>,
    /// A state name as dumps show it (`ESTABLISHED`, `TIME_WAIT`, ...).
    pub state: Option<String>,
}

impl ConnFilter {
    /// Parses `proto=tcp,ip=10.0.0.1,port=80,state=ESTABLISHED` (also `src=`,
    /// `dst=`, `sport=`, `dport=`); fails naming the term that is wrong.
    pub fn parse(text: &str) -> Result<ConnFilter, String> {
        let mut f = ConnFilter::default();
        for term in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (k, v) = term
                .split_once('=')
                .ok_or_else(|| format!("filter term {term:?} is not key=value"))?;
            let ip = || {
                v.parse::<IpAddr>()
                    .map_err(|_| format!("filter {k}={v}: not an IP address"))
            };
            let port = || {
                v.parse::<u16>()
                    .map_err(|_| format!("filter {k}={v}: not a port number"))
            };
            match k {
                "proto" => f.proto = Some(v.to_ascii_lowercase()),
                "src" => f.src = Some(ip()?),
                "dst" => f.dst = Some(ip()?),
                "ip" => f.ip = Some(ip()?),
                "sport" => f.sport = Some(port()?),
                "dport" => f.dport = Some(port()?),
                "port" => f.port = Some(port()?),
                "state" => f.state = Some(v.to_ascii_uppercase()),
                other => {
                    return Err(format!(
                        "unknown filter key {other:?} (proto, src, dst, ip, sport, dport, port, state)"
                    ));
                }
            }
        }
        Ok(f)
    }
}

/// The names of the requests, as `op` spells them (for error messages).
pub const OPS: &[&str] = &[
    "hello",
    "attach",
    "detach",
    "ports",
    "trace",
    "dump-flows",
    "dump-conntrack",
    "stats",
    "health",
    "add-flow",
    "mod-flows",
    "del-flows",
];

/// Decodes one request line; the error says what is wrong in words an operator
/// can act on (an unknown request names the ones this daemon knows).
pub fn decode(line: &str) -> Result<Request, String> {
    serde_json::from_str::<Request>(line).map_err(|e| {
        let op = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v.get("op").and_then(|o| o.as_str()).map(str::to_string));
        match op {
            Some(op) if !OPS.contains(&op.as_str()) => format!(
                "unknown request {op:?}: this vswitchd speaks control protocol {PROTOCOL} ({})",
                OPS.join(", ")
            ),
            _ => format!("bad request: {e}"),
        }
    })
}

/// The answer line for a request's outcome.
pub fn encode_answer<T: Serialize>(outcome: Result<T, String>) -> String {
    let value = match outcome {
        Ok(data) => match serde_json::to_value(data) {
            Ok(data) => serde_json::json!({"ok": true, "data": data}),
            Err(e) => {
                serde_json::json!({"ok": false, "error": format!("cannot encode the answer: {e}")})
            }
        },
        Err(error) => serde_json::json!({"ok": false, "error": error}),
    };
    let mut line = value.to_string();
    line.push('\n');
    line
}

/// What the daemon says to a hello: its version, when they match.
pub fn check_hello(req: &Request) -> Result<view::HelloView, String> {
    match req {
        Request::Hello { protocol, .. } if *protocol == PROTOCOL => Ok(view::HelloView {
            protocol: PROTOCOL,
            server: concat!("vswitchd ", env!("CARGO_PKG_VERSION")).to_string(),
        }),
        Request::Hello { protocol, client } => Err(format!(
            "{client} speaks control protocol {protocol}, this vswitchd speaks {PROTOCOL}: upgrade the older one"
        )),
        _ => Err(format!(
            "the first request must be hello with the protocol version (this vswitchd speaks {PROTOCOL})"
        )),
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
    #[error("vswitchd sent an unreadable answer")]
    Protocol(#[source] serde_json::Error),
    #[error("vswitchd closed the connection")]
    Closed,
    #[error("vswitchd: {0}")]
    Refused(String),
}

/// One answer on the wire.
#[derive(Debug, Deserialize)]
struct Answer {
    ok: bool,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    data: serde_json::Value,
}

/// A connection to vswitchd, handshake done.
#[derive(Debug)]
pub struct Client {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Client {
    /// Connects and says hello as `client` (e.g. `flowctl`).
    ///
    /// Fails when the socket cannot be reached, or vswitchd speaks another
    /// protocol version (the error names both).
    pub fn connect(socket: &Path, client: &str) -> Result<Client, ControlError> {
        let stream = UnixStream::connect(socket).map_err(|source| ControlError::Connect {
            path: socket.display().to_string(),
            source,
        })?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(ControlError::Io)?;
        let reader = BufReader::new(stream.try_clone().map_err(ControlError::Io)?);
        let mut c = Client {
            writer: stream,
            reader,
        };
        c.call::<view::HelloView>(&Request::Hello {
            protocol: PROTOCOL,
            client: client.to_string(),
        })?;
        Ok(c)
    }

    /// Sends one request and waits (up to 10 s) for its answer, as `T`.
    ///
    /// Fails on i/o or protocol errors, and when vswitchd answers with an
    /// error (its message is kept).
    pub fn call<T: DeserializeOwned>(&mut self, req: &Request) -> Result<T, ControlError> {
        let mut line = serde_json::to_string(req).map_err(ControlError::Protocol)?;
        line.push('\n');
        // A daemon that refuses the connection says why and closes it: the
        // write may fail, the reason is still there to read.
        let written = self.writer.write_all(line.as_bytes());
        let mut answer = String::new();
        let n = (&mut self.reader)
            .take(64 << 20)
            .read_line(&mut answer)
            .map_err(ControlError::Io)?;
        if n == 0 {
            return Err(written.err().map_or(ControlError::Closed, ControlError::Io));
        }
        let a: Answer = serde_json::from_str(&answer).map_err(ControlError::Protocol)?;
        if !a.ok {
            return Err(ControlError::Refused(a.error.unwrap_or_default()));
        }
        serde_json::from_value(a.data).map_err(ControlError::Protocol)
    }
}

/// Connects, says hello and sends one request.
///
/// Fails as [`Client::connect`] and [`Client::call`] do.
pub fn request<T: DeserializeOwned>(
    socket: &Path,
    client: &str,
    req: &Request,
) -> Result<T, ControlError> {
    Client::connect(socket, client)?.call(req)
}

/// An error and its causes, `a: b: c`: how errors are put into words for
/// operators, on the wire and on stderr.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_reject_unknown_fields() {
        let r = Request::Attach(Attach {
            pod: "ns/p".parse().unwrap(),
            netns: Some("/var/run/netns/x".into()),
            ifname: "eth0".into(),
            mac: "0a:58:00:00:00:01".parse().unwrap(),
            ips: vec!["10.0.0.1".parse().unwrap()],
        });
        let text = serde_json::to_string(&r).unwrap();
        assert!(text.starts_with(r#"{"op":"attach""#), "{text}");
        assert!(text.contains(r#""mac":"0a:58:00:00:00:01""#), "{text}");
        assert_eq!(decode(&text).unwrap(), r);
        let t = Request::Trace {
            src: Endpoint::Pod("a/b".parse().unwrap()),
            dst: Endpoint::Ip("10.0.0.1".parse().unwrap()),
            l4: L4::Tcp(80),
        };
        assert_eq!(decode(&serde_json::to_string(&t).unwrap()).unwrap(), t);
        let e = decode(r#"{"op":"detach","pod":"a/b","extra":1}"#).unwrap_err();
        assert!(e.contains("extra"), "{e}");
        let e = decode(r#"{"op":"frobnicate"}"#).unwrap_err();
        assert!(
            e.contains("unknown request \"frobnicate\"") && e.contains("dump-flows"),
            "{e}"
        );
        let e = decode(r#"{"op":"detach","pod":"nope"}"#).unwrap_err();
        assert!(e.contains("namespace/name"), "{e}");
        assert!("0a:58:00".parse::<Mac>().is_err());
        assert!("0a:58:00:00:00:01:02".parse::<Mac>().is_err());
    }

    #[test]
    fn the_handshake_names_both_versions() {
        let hello = |protocol| Request::Hello {
            protocol,
            client: "flowctl".into(),
        };
        assert_eq!(check_hello(&hello(PROTOCOL)).unwrap().protocol, PROTOCOL);
        let e = check_hello(&hello(PROTOCOL + 1)).unwrap_err();
        assert!(e.contains(&format!("protocol {}", PROTOCOL + 1)), "{e}");
        assert!(check_hello(&Request::Ports).unwrap_err().contains("hello"));
    }

    #[test]
    fn conntrack_filters() {
        let f = ConnFilter::parse("proto=TCP,ip=10.0.0.1,port=80,state=established").unwrap();
        assert_eq!(f.proto.as_deref(), Some("tcp"));
        assert_eq!(f.state.as_deref(), Some("ESTABLISHED"));
        let e = ConnFilter::parse("ip=10.0.0").unwrap_err();
        assert!(e.contains("ip=10.0.0") && e.contains("IP address"), "{e}");
        let e = ConnFilter::parse("colour=red").unwrap_err();
        assert!(e.contains("colour"), "{e}");
        assert!(ConnFilter::parse("port").unwrap_err().contains("key=value"));
    }
}
