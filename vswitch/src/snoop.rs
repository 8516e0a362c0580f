//! The DNS learner thread: frames the datapath copies (DNS answers to pods)
//! in, trusted answers learned (see `dns`), expiries run, and the policy
//! compiler told each time a name's addresses change.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use policy::compile::Change;

use crate::dns::{DNS_POD_LABEL, DnsConfig, parse_frame};
use crate::realiser::Realiser;

/// Learns from the frames the packet threads copy, until `rx` closes.
pub fn run(realiser: Arc<Realiser>, config: DnsConfig, rx: Receiver<Vec<u8>>) {
    let mut next_expiry = Instant::now() + Duration::from_secs(1);
    loop {
        let wait = next_expiry.saturating_duration_since(Instant::now());
        let frame = match rx.recv_timeout(wait) {
            Ok(f) => Some(f),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let now = Instant::now();
        let mut changed = Vec::new();
        if let Some(answer) = frame.as_deref().and_then(parse_frame) {
            if trusted(&realiser, &config, answer.server) {
                changed = realiser
                    .with_learned(|l| l.learn(&answer, now, config.min_ttl, config.max_names));
            } else {
                realiser.with_learned(|l| l.ignored += 1);
                tracing::debug!(server = %answer.server, "DNS answer from an untrusted server ignored");
            }
        }
        // Once a second; conntrack is read only when an address has expired:
        // which of them live connections still use (not ones closing).
        let tick = now >= next_expiry;
        if tick {
            next_expiry = now + Duration::from_secs(1);
        }
        if tick && realiser.with_learned(|l| l.due(now)) {
            use datapath::conntrack::ConnState as S;
            let in_use: BTreeSet<IpAddr> = realiser
                .datapath()
                .conntrack
                .dump(realiser.now(), None)
                .iter()
                .filter(|c| matches!(c.state, S::TcpEstablished | S::SctpEstablished | S::Replied))
                .map(|c| datapath::key::wide_to_ip(c.orig.dst))
                .collect();
            changed
                .extend(realiser.with_learned(|l| l.expire(now, &in_use, Duration::from_secs(10))));
        }
        if changed.is_empty() {
            continue;
        }
        changed.sort();
        changed.dedup();
        let changes: Vec<Change> = changed
            .into_iter()
            .map(|name| Change::Resolved {
                addresses: realiser.with_learned(|l| l.addresses(&name)),
                name,
            })
            .collect();
        if let Err(e) = realiser.apply_all(changes) {
            tracing::error!(error = %control::error_chain(&e), "cannot install flows for learned DNS names");
        }
    }
}

/// Whether answers from `server` are trusted.
fn trusted(realiser: &Realiser, config: &DnsConfig, server: IpAddr) -> bool {
    config.servers.iter().any(|n| n.contains(&server))
        || realiser.with_compiler(|c| {
            c.cluster().pod_by_ip(server).is_some_and(|p| {
                p.labels.get(DNS_POD_LABEL.0).map(String::as_str) == Some(DNS_POD_LABEL.1)
            })
        })
}
