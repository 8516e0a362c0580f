//! The JSON the web view polls: the node's pods by namespace with the
//! recent connections between them, the live feed of new connections, rule
//! counters, the reachability matrix and traces (the same trace `flowctl
//! trace` shows).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;

use control::view::TupleView;
use policy::explain::{StagedView, TraceView};
use policy::model::ObjectKey;
use policy::probe::{Endpoint, L4};
use serde::Serialize;

use super::Web;
use crate::realiser::PortRole;
use crate::recent::{FeedItem, RuleCount};

/// The most pods a reachability matrix has (n² traces).
pub const MAX_MATRIX_PODS: usize = 60;

/// The most recent tuples a summary carries (the most recently seen).
const SUMMARY_TUPLES: usize = 500;

#[derive(Debug, Serialize)]
pub struct Summary {
    node: String,
    ready: bool,
    generation: u64,
    namespaces: Vec<NamespaceView>,
    tuples: Vec<TupleView>,
    rules: Vec<RuleCount>,
}

#[derive(Debug, Serialize)]
struct NamespaceView {
    name: String,
    pods: Vec<PodView>,
}

#[derive(Debug, Serialize)]
struct PodView {
    /// `namespace/name`.
    key: String,
    name: String,
    port: u32,
    ips: Vec<std::net::IpAddr>,
    labels: BTreeMap<String, String>,
}

/// The pods attached here, by namespace.
fn local_pods(web: &Web) -> Vec<(ObjectKey, u32)> {
    web.realiser
        .ports()
        .into_iter()
        .filter_map(|p| match p.role {
            PortRole::Pod(k) => Some((k, p.no.0)),
            _ => None,
        })
        .collect()
}

pub fn summary(web: &Web) -> Summary {
    let pods = local_pods(web);
    let mut namespaces: BTreeMap<String, Vec<PodView>> = BTreeMap::new();
    web.realiser.with_compiler(|c| {
        for (key, port) in &pods {
            let pod = c.cluster().pod(key);
            namespaces
                .entry(key.namespace.clone())
                .or_default()
                .push(PodView {
                    key: key.to_string(),
                    name: key.name.clone(),
                    port: *port,
                    ips: pod.map(|p| p.ips.clone()).unwrap_or_default(),
                    labels: pod
                        .map(|p| {
                            p.labels
                                .iter()
                                .map(|(k, v)| (k.clone(), v.clone()))
                                .collect()
                        })
                        .unwrap_or_default(),
                });
        }
    });
    let tuples = web.recent.view(SUMMARY_TUPLES).tuples;
    Summary {
        node: web.node.clone(),
        ready: web.ready.load(Relaxed),
        generation: web.realiser.realisation().generation,
        namespaces: namespaces
            .into_iter()
            .map(|(name, mut pods)| {
                pods.sort_by(|a, b| a.name.cmp(&b.name));
                NamespaceView { name, pods }
            })
            .collect(),
        tuples,
        rules: web.recent.rules(),
    }
}

#[derive(Debug, Serialize)]
pub struct Feed {
    items: Vec<FeedItem>,
    /// The last item's sequence number (ask for items after it next).
    last: Option<u64>,
}

/// New connections after `after=N` (all kept, without it).
pub fn feed(web: &Web, query: &str) -> Feed {
    let after = param(query, "after").and_then(|s| s.parse().ok());
    let items = web.recent.feed_after(after);
    Feed {
        last: items.last().map(|i| i.seq).or(after),
        items,
    }
}

#[derive(Debug, Serialize)]
pub struct Matrix {
    protocol: String,
    port: u16,
    pods: Vec<String>,
    /// Pods attached here beyond [`MAX_MATRIX_PODS`], left out.
    omitted: usize,
    cells: Vec<Cell>,
}

#[derive(Debug, Serialize)]
struct Cell {
    from: String,
    to: String,
    verdict: &'static str,
    rule: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    staged: Option<StagedView>,
}

/// Every pod attached here to every other, new connections on
/// `protocol=tcp|udp|sctp` and `port=N` (default tcp/80).
///
/// Fails on an unknown protocol or a bad port.
pub fn reachability(web: &Web, query: &str) -> Result<Matrix, String> {
    let protocol = param(query, "protocol").unwrap_or_else(|| "tcp".into());
    let port: u16 = match param(query, "port") {
        None => 80,
        Some(p) => p
            .parse()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("port {p:?} is not 1-65535"))?,
    };
    let l4 = match protocol.as_str() {
        "tcp" => L4::Tcp(port),
        "udp" => L4::Udp(port),
        "sctp" => L4::Sctp(port),
        other => return Err(format!("protocol {other:?} is not tcp, udp or sctp")),
    };
    let mut pods: Vec<ObjectKey> = local_pods(web).into_iter().map(|(k, _)| k).collect();
    pods.sort();
    let omitted = pods.len().saturating_sub(MAX_MATRIX_PODS);
    pods.truncate(MAX_MATRIX_PODS);
    let mut cells = Vec::new();
    for from in &pods {
        for to in &pods {
            if from == to {
                continue;
            }
            let (src, dst) = (Endpoint::Pod(from.clone()), Endpoint::Pod(to.clone()));
            let Ok(e) = web.realiser.explain_probe(&src, &dst, l4) else {
                continue;
            };
            cells.push(Cell {
                from: from.to_string(),
                to: to.to_string(),
                verdict: if e.verdict.allowed { "allow" } else { "deny" },
                staged: e
                    .staged
                    .as_ref()
                    .and_then(|s| StagedView::of(&e.verdict, s)),
                rule: e.verdict.rule,
            });
        }
    }
    Ok(Matrix {
        protocol,
        port,
        pods: pods.iter().map(ToString::to_string).collect(),
        omitted,
        cells,
    })
}

/// `spec=tcp,src=NS/POD,dst=NS/POD,tp_dst=80`: the trace `flowctl trace`
/// shows, against the live tables.
///
/// Fails on a bad spec or unknown endpoints, saying which.
pub fn trace(web: &Web, query: &str) -> Result<Trace, String> {
    let spec =
        param(query, "spec").ok_or("spec= is missing (e.g. tcp,src=ns/a,dst=ns/b,tp_dst=80)")?;
    let spec = control::spec::parse(&spec).map_err(|e| format!("bad trace spec: {e}"))?;
    let view = web
        .realiser
        .trace(&spec.src, &spec.dst, spec.l4)
        .map_err(|e| format!("cannot trace: {e}"))?;
    Ok(Trace {
        text: control::text::trace(&view, false),
        view,
    })
}

/// A trace: its text exactly as `flowctl trace` prints it, and its data.
#[derive(Debug, Serialize)]
pub struct Trace {
    text: String,
    view: TraceView,
}

/// The value of `name` in a query string, percent-decoded.
fn param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (decode(k) == name).then(|| decode(v))
    })
}

/// Percent-decoding (and `+` as space) of a query component; invalid
/// escapes are kept as they are.
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_are_percent_decoded() {
        let q = "spec=tcp%2Csrc%3Dns%2Fa%2Cdst%3D10.0.0.1%2Ctp_dst%3D80&after=7";
        assert_eq!(
            param(q, "spec").unwrap(),
            "tcp,src=ns/a,dst=10.0.0.1,tp_dst=80"
        );
        assert_eq!(param(q, "after").unwrap(), "7");
        assert_eq!(param(q, "missing"), None);
        assert_eq!(decode("a+b%zz%4"), "a b%zz%4");
        assert_eq!(decode("%41"), "A");
    }
}
