//! Policy preview on real traffic: `flowctl what-if --manifests DIR`.
//!
//! Owns replaying the connections the switch has seen recently ([`Recent`])
//! against another policy set: the live cluster (pods, namespaces, nodes,
//! learned DNS names) with its policies replaced by the proposed ones,
//! compiled into the switch's full pipeline over the live topology, each
//! tuple's latest first packet traced through it and through the live tables,
//! and every tuple whose verdict differs listed, grouped by the change and the
//! rule that decides it. Nothing here touches what is enforced: the proposed
//! tables are built on the control thread and thrown away.

use std::collections::BTreeMap;
use std::path::Path;

use control::ManifestFile;
use control::view::{TupleView, WhatIfGroup, WhatIfView};
use datapath::trace::trace_new;
use policy::compile::Compiler;
use policy::manifest::{Manifests, load_str};
use policy::staging;

use crate::realiser::Realiser;
use crate::recent::Recent;

/// Replays the recent connections against the policies in `files`.
///
/// Fails when a file does not parse or an object in it is invalid (naming
/// the file, document and field), or when the proposed flows cannot be
/// built.
pub fn what_if(
    realiser: &Realiser,
    recent: &Recent,
    files: &[ManifestFile],
) -> Result<WhatIfView, String> {
    let mut m = Manifests::default();
    for f in files {
        load_str(&mut m, Path::new(&f.path), &f.text);
    }
    if !m.errors.is_empty() {
        let errors: Vec<String> = m.errors.iter().map(|e| control::error_chain(e)).collect();
        return Err(format!(
            "the proposed policy set has errors:\n  {}",
            errors.join("\n  ")
        ));
    }
    let (live, topology) = realiser.model();
    // Staged policies in the proposal are what they would be once applied:
    // evaluated, not enforced.
    let proposed = staging::enforced_cluster(&live.with_policies(&m.policies, &m.cluster_policies));
    let compiler = Compiler::from_cluster(proposed);
    let tables = policy::pipeline::tables(&topology, &compiler)
        .map_err(|e| format!("cannot build the proposed tables: {e}"))?;
    let keys = recent.keys();
    let mut groups: BTreeMap<(String, String, String), WhatIfGroup> = BTreeMap::new();
    let mut connections = 0;
    for (key, tuple) in &keys {
        connections += tuple.allowed + tuple.denied;
        let now = realiser.explain_new(key).verdict;
        let then = policy::explain::explain(&compiler, &trace_new(&tables, key));
        if now.allowed == then.allowed {
            continue;
        }
        let change = format!("{} -> {}", verdict(now.allowed), verdict(then.allowed));
        let g = groups
            .entry((change.clone(), then.rule.clone(), now.rule.clone()))
            .or_insert_with(|| WhatIfGroup {
                change,
                rule: then.rule.clone(),
                was: now.rule.clone(),
                connections: 0,
                tuples: Vec::new(),
            });
        g.connections += tuple.allowed + tuple.denied;
        g.tuples.push(TupleView {
            verdict: verdict(now.allowed).into(),
            rule: now.rule,
            ..tuple.clone()
        });
    }
    let mut changes: Vec<WhatIfGroup> = groups.into_values().collect();
    changes.sort_by_key(|g| std::cmp::Reverse(g.connections));
    Ok(WhatIfView {
        tuples: keys.len(),
        connections,
        window_secs: recent.config().window_secs,
        policies: m.policies.len(),
        cluster_policies: m.cluster_policies.len(),
        changes,
    })
}

fn verdict(allowed: bool) -> &'static str {
    if allowed { "allow" } else { "deny" }
}
