//! What the switch has seen, and what another policy set would make of it:
//! `flowctl recent` and `flowctl what-if --manifests DIR` (both live).

use std::fmt::Write;
use std::path::Path;

use anyhow::{Context, Result};
use control::ManifestFile;
use control::view::{RecentView, TupleView, WhatIfView};
use policy::manifest;

use crate::live::table;
use crate::render::{BOLD, paint};

/// The manifest files of `dir` (or the one file), with their text, for a
/// what-if request. Objects that do not validate are printed and make the
/// whole proposal fail: a preview of a policy set that cannot be applied
/// would mislead.
///
/// Fails when the files cannot be read or hold invalid objects.
pub fn proposal(dir: &Path) -> Result<Vec<ManifestFile>> {
    let m = manifest::load(dir)
        .with_context(|| format!("failed to load manifests from {}", dir.display()))?;
    if !m.errors.is_empty() {
        for e in &m.errors {
            eprintln!("flowctl: {}", control::error_chain(e));
        }
        anyhow::bail!(
            "{} error(s) in {}: fix them to preview this policy set",
            m.errors.len(),
            dir.display()
        );
    }
    let paths = if dir.is_file() {
        vec![dir.to_path_buf()]
    } else {
        manifest::files(dir).with_context(|| format!("cannot list {}", dir.display()))?
    };
    paths
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p)
                .with_context(|| format!("cannot read {}", p.display()))?;
            Ok(ManifestFile {
                path: p.display().to_string(),
                text,
            })
        })
        .collect()
}

fn endpoint(ip: &std::net::IpAddr, pod: Option<&String>) -> String {
    match pod {
        Some(p) => format!("{p} ({ip})"),
        None => ip.to_string(),
    }
}

fn service(t: &TupleView) -> String {
    match t.dst_port {
        Some(p) => format!("{}/{p}", t.protocol),
        None => t.protocol.clone(),
    }
}

/// The recent-connections summary as a table.
pub fn recent_text(v: &RecentView, color: bool) -> String {
    let rows: Vec<Vec<String>> = v
        .tuples
        .iter()
        .map(|t| {
            vec![
                endpoint(&t.src_ip, t.src_pod.as_ref()),
                endpoint(&t.dst_ip, t.dst_pod.as_ref()),
                service(t),
                t.allowed.to_string(),
                t.denied.to_string(),
                t.verdict.clone(),
                t.staged
                    .as_ref()
                    .map_or("-".into(), |s| format!("{} by {}", s.verdict, s.rule)),
                t.last_seen.clone(),
            ]
        })
        .collect();
    let mut out = table(
        color,
        &[
            "SOURCE",
            "DESTINATION",
            "SERVICE",
            "ALLOWED",
            "DENIED",
            "NOW",
            "STAGED",
            "LAST SEEN",
        ],
        &rows,
    );
    let _ = writeln!(
        out,
        "{} tuple(s) seen in the last {} s (at most {}; {} forgotten to stay within it)",
        v.tuples.len(),
        v.window_secs,
        v.max_tuples,
        v.evicted
    );
    out
}

/// A what-if answer: every change, grouped by rule, with counts.
pub fn what_if_text(v: &WhatIfView, color: bool) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "replayed {} connection(s) in {} tuple(s) seen in the last {} s against {} NetworkPolicy(ies) and {} ClusterNetworkPolicy(ies)",
        v.connections, v.tuples, v.window_secs, v.policies, v.cluster_policies
    );
    if v.changes.is_empty() {
        let _ = writeln!(out, "no verdict would change");
        return out;
    }
    for g in &v.changes {
        let _ = writeln!(
            out,
            "\n{} by {}: {} connection(s) in {} tuple(s) (now: {})",
            paint(color, BOLD, &g.change),
            g.rule,
            g.connections,
            g.tuples.len(),
            g.was
        );
        for t in &g.tuples {
            let _ = writeln!(
                out,
                "  {} -> {} {}  ({} connection(s), last {})",
                endpoint(&t.src_ip, t.src_pod.as_ref()),
                endpoint(&t.dst_ip, t.dst_pod.as_ref()),
                service(t),
                t.allowed + t.denied,
                t.last_seen
            );
        }
    }
    out
}
