//! The packet description `flowctl trace` takes: `tcp,src=x/a,dst=y/b,tp_dst=80`.
//!
//! Owns parsing it, with errors that quote the bad token. `src` and `dst` are a
//! pod (`namespace/name`) or an IP address (outside the cluster unless a pod has
//! it). The protocol defaults to tcp; `tp_dst` is required for tcp, udp and sctp.

use std::net::IpAddr;

use policy::probe::{Endpoint, L4};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    pub src: Endpoint,
    pub dst: Endpoint,
    pub l4: L4,
}

fn endpoint(token: &str, v: &str) -> Result<Endpoint, String> {
    if let Ok(ip) = v.parse::<IpAddr>() {
        return Ok(Endpoint::Ip(ip));
    }
    v.parse()
        .map(Endpoint::Pod)
        .map_err(|_| format!("`{token}`: {v:?} is neither namespace/pod nor an IP address"))
}

/// Parses a trace spec.
pub fn parse(s: &str) -> Result<Spec, String> {
    let mut proto = "tcp";
    let (mut src, mut dst, mut port) = (None, None, None);
    for token in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        match token.split_once('=') {
            None => match token {
                "tcp" | "udp" | "sctp" | "icmp" => proto = token,
                _ => {
                    return Err(format!(
                        "`{token}`: unknown protocol (tcp, udp, sctp, icmp)"
                    ));
                }
            },
            Some(("src", v)) => src = Some(endpoint(token, v)?),
            Some(("dst", v)) => dst = Some(endpoint(token, v)?),
            Some(("tp_dst" | "port" | "dport", v)) => {
                let p: u16 = v
                    .parse()
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| format!("`{token}`: port must be 1-65535"))?;
                port = Some(p);
            }
            Some((k, _)) => {
                return Err(format!("`{token}`: unknown field {k:?} (src, dst, tp_dst)"));
            }
        }
    }
    let src = src.ok_or("missing src=namespace/pod or src=IP")?;
    let dst = dst.ok_or("missing dst=namespace/pod or dst=IP")?;
    let need_port = || port.ok_or_else(|| format!("{proto} needs tp_dst=PORT"));
    let l4 = match proto {
        "tcp" => L4::Tcp(need_port()?),
        "udp" => L4::Udp(need_port()?),
        "sctp" => L4::Sctp(need_port()?),
        _ => L4::Icmp,
    };
    Ok(Spec { src, dst, l4 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let s = parse("tcp,src=x/a,dst=10.0.0.1,tp_dst=80").unwrap();
        assert_eq!(s.src, Endpoint::Pod("x/a".parse().unwrap()));
        assert_eq!(s.dst, Endpoint::Ip("10.0.0.1".parse().unwrap()));
        assert_eq!(s.l4, L4::Tcp(80));
        assert_eq!(parse("icmp,src=x/a,dst=y/b").unwrap().l4, L4::Icmp);
        assert!(
            parse("tcp,src=x/a,dst=y/b")
                .unwrap_err()
                .contains("needs tp_dst")
        );
        assert!(parse("gre,src=x/a,dst=y/b").unwrap_err().contains("`gre`"));
        assert!(
            parse("tcp,src=nope,dst=y/b,tp_dst=1")
                .unwrap_err()
                .contains("`src=nope`")
        );
        assert!(
            parse("tcp,src=x/a,dst=y/b,tp_dst=0")
                .unwrap_err()
                .contains("1-65535")
        );
    }
}
