//! DNS snooping: what names resolve to, for ClusterNetworkPolicy `domainNames`.
//!
//! Owns learning from DNS answers the switch delivers to pods (the datapath
//! copies UDP answers from port 53, in connections the pod opened, when some
//! policy has `domainNames` peers): each address an answer gives for a name
//! (through its CNAME chain) is remembered until the answer's TTL runs out
//! (never less than `min_ttl`, and while a tracked connection still uses it),
//! and the policy compiler is told each time a name's set of addresses changes.
//!
//! Only answers from trusted servers count: pods labelled `k8s-app=kube-dns`
//! (CoreDNS, kube-dns) and the addresses in `[dns] servers` (the cluster DNS
//! Service's ClusterIP). A pod answering its own queries, or any other server
//! a pod asks, teaches the switch nothing: otherwise a pod could map an allowed
//! name to any address it likes.
//!
//! The parser is our own, deliberately small: it reads only the question and
//! the A, AAAA and CNAME answers of untrusted bytes, with every length and
//! compression pointer bounded (no allocation beyond the names, no loops).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use control::view::{DnsAddress, DnsView};
use ipnet::IpNet;
use serde::Deserialize;

/// `[dns]` in the configuration.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// Answers from these addresses are trusted, besides pods labelled
    /// `k8s-app=kube-dns`: the cluster DNS Service (e.g. `10.96.0.10/32`).
    #[serde(default)]
    pub servers: Vec<IpNet>,
    /// A learned address is kept at least this long (seconds), whatever the
    /// answer's TTL.
    #[serde(default = "default_min_ttl")]
    pub min_ttl: u32,
    /// Most names remembered at once (memory bound); answers for new names
    /// beyond it are ignored, and counted.
    #[serde(default = "default_max_names")]
    pub max_names: usize,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            servers: vec![],
            min_ttl: default_min_ttl(),
            max_names: default_max_names(),
        }
    }
}

fn default_min_ttl() -> u32 {
    30
}

fn default_max_names() -> usize {
    10_000
}

/// The label of cluster DNS pods (CoreDNS and kube-dns both carry it).
pub const DNS_POD_LABEL: (&str, &str) = ("k8s-app", "kube-dns");

/// A DNS answer, as far as snooping cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Who answered (the IP source of the frame).
    pub server: IpAddr,
    /// Every name of the chain (the question, then CNAME targets), lower
    /// case, without the trailing dot.
    pub names: Vec<String>,
    /// The addresses at the end of the chain, each with its TTL.
    pub addresses: Vec<(IpAddr, u32)>,
}

/// Reads a DNS answer out of an Ethernet frame (IPv4 or IPv6, UDP from port
/// 53); `None` for anything else, or malformed.
pub fn parse_frame(frame: &[u8]) -> Option<Answer> {
    let ether = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let ip = frame.get(14..)?;
    let (server, udp) = match ether {
        0x0800 => {
            let ihl = usize::from(ip.first()? & 0x0f) * 4;
            if ip.get(9)? != &17 || ihl < 20 {
                return None;
            }
            let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
            (IpAddr::V4(src), ip.get(ihl..)?)
        }
        0x86dd => {
            if ip.get(6)? != &17 {
                return None;
            }
            let src: [u8; 16] = ip.get(8..24)?.try_into().ok()?;
            (IpAddr::V6(Ipv6Addr::from(src)), ip.get(40..)?)
        }
        _ => return None,
    };
    if u16::from_be_bytes([*udp.first()?, *udp.get(1)?]) != 53 {
        return None;
    }
    let mut answer = parse_message(udp.get(8..)?)?;
    answer.server = server;
    Some(answer)
}

/// Reads a DNS message: a response, no error, one question.
pub fn parse_message(m: &[u8]) -> Option<Answer> {
    if m.len() < 12 {
        return None;
    }
    let flags = u16::from_be_bytes([m[2], m[3]]);
    let (response, rcode) = (flags & 0x8000 != 0, flags & 0x000f);
    let qd = u16::from_be_bytes([m[4], m[5]]);
    let an = u16::from_be_bytes([m[6], m[7]]);
    if !response || rcode != 0 || qd != 1 {
        return None;
    }
    let (question, mut at) = read_name(m, 12)?;
    at = at.checked_add(4)?; // qtype, qclass
    let mut cnames: BTreeMap<String, String> = BTreeMap::new();
    let mut records: Vec<(String, IpAddr, u32)> = Vec::new();
    for _ in 0..an.min(64) {
        let (owner, next) = read_name(m, at)?;
        let fixed = m.get(next..next.checked_add(10)?)?;
        let rtype = u16::from_be_bytes([fixed[0], fixed[1]]);
        let class = u16::from_be_bytes([fixed[2], fixed[3]]);
        let ttl = u32::from_be_bytes([fixed[4], fixed[5], fixed[6], fixed[7]]);
        let len = usize::from(u16::from_be_bytes([fixed[8], fixed[9]]));
        let data_at = next + 10;
        let data = m.get(data_at..data_at.checked_add(len)?)?;
        at = data_at + len;
        if class != 1 {
            continue;
        }
        match (rtype, len) {
            (1, 4) => records.push((
                owner,
                IpAddr::V4(Ipv4Addr::new(data[0], data[1], data[2], data[3])),
                ttl,
            )),
            (28, 16) => {
                let a: [u8; 16] = data.try_into().ok()?;
                records.push((owner, IpAddr::V6(Ipv6Addr::from(a)), ttl));
            }
            (5, _) => {
                let (target, _) = read_name(m, data_at)?;
                cnames.insert(owner, target);
            }
            _ => {}
        }
    }
    // Follow the chain from the question (bounded: no loops).
    let mut names = vec![question];
    while names.len() < 16 {
        let Some(next) = cnames.get(names.last()?) else {
            break;
        };
        if names.contains(next) {
            break;
        }
        names.push(next.clone());
    }
    let addresses = records
        .into_iter()
        .filter(|(owner, _, _)| names.contains(owner))
        .map(|(_, ip, ttl)| (ip, ttl))
        .collect();
    Some(Answer {
        server: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        names,
        addresses,
    })
}

/// A (possibly compressed) name at `at`: (name, offset after it in place).
fn read_name(m: &[u8], mut at: usize) -> Option<(String, usize)> {
    let mut name = String::new();
    let mut end = None;
    for _ in 0..128 {
        let len = *m.get(at)?;
        match len {
            0 => {
                return Some((name, end.unwrap_or(at + 1)));
            }
            l if l & 0xc0 == 0xc0 => {
                let ptr = usize::from(u16::from_be_bytes([l & 0x3f, *m.get(at + 1)?]));
                end.get_or_insert(at + 2);
                // Pointers only go backwards: no loops.
                if ptr >= at {
                    return None;
                }
                at = ptr;
            }
            l if l < 64 => {
                let label = m.get(at + 1..at + 1 + usize::from(l))?;
                if !name.is_empty() {
                    name.push('.');
                }
                for &b in label {
                    name.push(char::from(b.to_ascii_lowercase()));
                }
                if name.len() > 255 {
                    return None;
                }
                at += 1 + usize::from(l);
            }
            _ => return None,
        }
    }
    None
}

/// What the switch has learned: name -> address -> expiry.
#[derive(Debug, Default)]
pub struct Learned {
    names: BTreeMap<String, BTreeMap<IpAddr, Instant>>,
    /// Answers ignored: untrusted server, or too many names.
    pub ignored: u64,
}

impl Learned {
    /// Takes in an answer; returns the names whose address sets changed.
    pub fn learn(&mut self, a: &Answer, now: Instant, min_ttl: u32, max: usize) -> Vec<String> {
        let mut changed = Vec::new();
        if a.addresses.is_empty() {
            return changed;
        }
        let ttl = a
            .addresses
            .iter()
            .map(|(_, t)| *t)
            .min()
            .unwrap_or(0)
            .max(min_ttl);
        let until = now + Duration::from_secs(u64::from(ttl));
        for name in &a.names {
            if !self.names.contains_key(name) && self.names.len() >= max {
                self.ignored += 1;
                continue;
            }
            let entry = self.names.entry(name.clone()).or_default();
            let mut grew = false;
            for (ip, _) in &a.addresses {
                let e = entry.entry(*ip).or_insert_with(|| {
                    grew = true;
                    until
                });
                *e = (*e).max(until);
            }
            if grew {
                changed.push(name.clone());
            }
        }
        changed
    }

    /// Whether some address has expired (what makes [`Learned::expire`]
    /// worth its look at conntrack).
    pub fn due(&self, now: Instant) -> bool {
        self.names
            .values()
            .flat_map(|a| a.values())
            .any(|until| *until <= now)
    }

    /// Forgets expired addresses, except those `in_use` says a tracked
    /// connection still reaches (kept `grace` longer); returns the names
    /// whose sets changed.
    pub fn expire(
        &mut self,
        now: Instant,
        in_use: &BTreeSet<IpAddr>,
        grace: Duration,
    ) -> Vec<String> {
        let mut changed = Vec::new();
        self.names.retain(|name, addrs| {
            let before = addrs.len();
            addrs.retain(|ip, until| {
                if *until > now {
                    return true;
                }
                if in_use.contains(ip) {
                    *until = now + grace;
                    return true;
                }
                false
            });
            if addrs.len() != before {
                changed.push(name.clone());
            }
            !addrs.is_empty()
        });
        changed
    }

    pub fn addresses(&self, name: &str) -> BTreeSet<IpAddr> {
        self.names
            .get(name)
            .map(|a| a.keys().copied().collect())
            .unwrap_or_default()
    }

    pub fn views(&self, now: Instant) -> Vec<DnsView> {
        self.names
            .iter()
            .map(|(name, a)| DnsView {
                name: name.clone(),
                addresses: a
                    .iter()
                    .map(|(ip, until)| DnsAddress {
                        address: *ip,
                        expires_in_s: until.saturating_duration_since(now).as_secs(),
                    })
                    .collect(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A response: question `q`, CNAME q -> `alias` when given, then A/AAAA
    /// records on the last name, compressed as servers do.
    fn response(q: &str, alias: Option<&str>, ips: &[(IpAddr, u32)]) -> Vec<u8> {
        let mut m = vec![0x12, 0x34, 0x81, 0x80, 0, 1, 0, 0, 0, 0, 0, 0];
        let name = |s: &str| {
            let mut out = Vec::new();
            for l in s.split('.') {
                out.push(l.len() as u8);
                out.extend(l.as_bytes());
            }
            out.push(0);
            out
        };
        m.extend(name(q));
        m.extend([0, 1, 0, 1]);
        let mut an = 0u16;
        let mut last = vec![0xc0, 12]; // pointer to the question's name
        if let Some(a) = alias {
            m.extend(&last);
            let target = name(a);
            m.extend([0, 5, 0, 1, 0, 0, 0, 60]);
            m.extend((target.len() as u16).to_be_bytes());
            let at = m.len();
            m.extend(target);
            last = vec![0xc0, at as u8];
            an += 1;
        }
        for (ip, ttl) in ips {
            m.extend(&last);
            match ip {
                IpAddr::V4(a) => {
                    m.extend([0, 1, 0, 1]);
                    m.extend(ttl.to_be_bytes());
                    m.extend([0, 4]);
                    m.extend(a.octets());
                }
                IpAddr::V6(a) => {
                    m.extend([0, 28, 0, 1]);
                    m.extend(ttl.to_be_bytes());
                    m.extend([0, 16]);
                    m.extend(a.octets());
                }
            }
            an += 1;
        }
        m[6..8].copy_from_slice(&an.to_be_bytes());
        m
    }

    #[test]
    fn answers_with_cname_chains_and_compression() {
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let ip6: IpAddr = "2001:db8::7".parse().unwrap();
        let a = parse_message(&response(
            "WWW.Example.com",
            Some("edge.cdn.net"),
            &[(ip, 300), (ip6, 60)],
        ))
        .unwrap();
        assert_eq!(a.names, vec!["www.example.com", "edge.cdn.net"]);
        assert_eq!(a.addresses, vec![(ip, 300), (ip6, 60)]);
    }

    #[test]
    fn malformed_and_hostile_messages_are_refused() {
        let good = response("a.example.com", None, &[("192.0.2.1".parse().unwrap(), 5)]);
        // Every truncation is refused or parsed without panicking.
        for n in 0..good.len() {
            let _ = parse_message(&good[..n]);
        }
        // A query (not a response), an error answer.
        let mut q = good.clone();
        q[2] &= 0x7f;
        assert!(parse_message(&q).is_none());
        let mut err = good.clone();
        err[3] |= 3;
        assert!(parse_message(&err).is_none());
        // A compression pointer to itself or forwards (a loop) is refused.
        let mut looped = good.clone();
        let at = 12 + "a.example.com".len() + 2 + 4;
        looped[at] = 0xc0;
        looped[at + 1] = at as u8;
        assert!(parse_message(&looped).is_none());
    }

    #[test]
    fn learned_addresses_expire_unless_in_use() {
        let ip: IpAddr = "192.0.2.9".parse().unwrap();
        let a = Answer {
            server: ip,
            names: vec!["x.example.com".into()],
            addresses: vec![(ip, 1)],
        };
        let mut l = Learned::default();
        let t0 = Instant::now();
        assert_eq!(l.learn(&a, t0, 2, 10), vec!["x.example.com".to_string()]);
        assert!(l.learn(&a, t0, 2, 10).is_empty(), "nothing new");
        let later = t0 + Duration::from_secs(3);
        let busy: BTreeSet<IpAddr> = [ip].into();
        assert!(
            l.expire(later, &busy, Duration::from_secs(5)).is_empty(),
            "in use: kept"
        );
        let much_later = later + Duration::from_secs(6);
        assert_eq!(
            l.expire(much_later, &BTreeSet::new(), Duration::ZERO).len(),
            1
        );
        assert!(l.addresses("x.example.com").is_empty());
        // The memory bound.
        let mut l = Learned::default();
        for i in 0..5 {
            let mut a = a.clone();
            a.names = vec![format!("n{i}.example.com")];
            l.learn(&a, t0, 2, 3);
        }
        assert_eq!(l.views(t0).len(), 3);
        assert_eq!(l.ignored, 2);
    }
}
