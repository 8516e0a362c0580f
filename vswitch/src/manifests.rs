//! The manifest directory as a source of cluster state (standalone mode).
//!
//! Owns watching a directory of YAML manifests (inotify, with a rescan
//! timeout), turning edits into cluster changes applied as one generation,
//! and keeping the last good version of every file and object: an invalid
//! file or object is reported and its last good version stays in force, also
//! across restarts (copies in `state_dir/last-good/`).

use std::collections::{BTreeMap, HashMap};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use control::error_chain;
use policy::cnp::ClusterPolicy;
use policy::compile::Change;
use policy::error::Error as PolicyError;
use policy::manifest::{Manifests, files, load_str};
use policy::model::{Namespace, Node, ObjectKey, Pod, Policy};

use crate::realiser::Realiser;

fn log(msg: impl std::fmt::Display) {
    tracing::warn!("{msg}");
}

/// Applies changes as one generation, logging (not failing) when flows cannot
/// be installed.
pub fn apply(realiser: &Realiser, changes: Vec<Change>) {
    if changes.is_empty() {
        return;
    }
    if let Err(e) = realiser.apply_all(changes) {
        log(error_chain(&e));
    }
}

/// The objects of one manifest file that are in force.
#[derive(Debug, Default, Clone)]
struct FileObjects {
    namespaces: BTreeMap<String, Namespace>,
    pods: BTreeMap<ObjectKey, Pod>,
    nodes: BTreeMap<String, Node>,
    policies: BTreeMap<ObjectKey, Policy>,
    cluster_policies: BTreeMap<String, ClusterPolicy>,
    services: policy::services::Services,
}

impl From<&Manifests> for FileObjects {
    fn from(m: &Manifests) -> FileObjects {
        FileObjects {
            namespaces: m
                .namespaces
                .iter()
                .map(|n| (n.name.clone(), n.clone()))
                .collect(),
            pods: m.pods.iter().map(|p| (p.key.clone(), p.clone())).collect(),
            nodes: m
                .nodes
                .iter()
                .map(|n| (n.name.clone(), n.clone()))
                .collect(),
            policies: m
                .policies
                .iter()
                .map(|p| (p.key.clone(), p.clone()))
                .collect(),
            cluster_policies: m
                .cluster_policies
                .iter()
                .map(|p| (p.name.clone(), p.clone()))
                .collect(),
            services: m.services.clone(),
        }
    }
}

/// (kind, object) of an object a manifest error rejected, when it names one.
fn rejected(e: &PolicyError) -> Option<(&'static str, String)> {
    match e {
        PolicyError::InFile { source, .. } => rejected(source),
        PolicyError::Invalid { kind, object, .. } => Some((kind, object.clone())),
        _ => None,
    }
}

/// Watches a manifest directory and turns its edits into changes.
#[derive(Debug)]
pub struct ManifestWatch {
    dir: PathBuf,
    /// Copies of the last version of each file that loaded cleanly, so that a
    /// restarted daemon keeps enforcing them when a file has since gone bad.
    last_good: Option<PathBuf>,
    signature: Vec<(PathBuf, Option<SystemTime>, u64)>,
    files: HashMap<PathBuf, FileObjects>,
    applied: FileObjects,
    /// What the last scan rejected (shown by `flowctl dump-policies`).
    rejected: policy::status::Rejections,
}

impl ManifestWatch {
    /// Watches `dir`; with `state_dir`, remembers the last good version of every
    /// file across restarts.
    pub fn new(dir: &Path, state_dir: Option<&Path>) -> ManifestWatch {
        let last_good = state_dir.map(|d| d.join("last-good"));
        let mut files = HashMap::new();
        if let Some(store) = &last_good {
            for path in policy::manifest::files(dir).unwrap_or_default() {
                if let Ok(text) = std::fs::read_to_string(store.join(Self::store_name(&path))) {
                    let mut m = Manifests::default();
                    load_str(&mut m, &path, &text);
                    files.insert(path, FileObjects::from(&m));
                }
            }
        }
        ManifestWatch {
            dir: dir.to_path_buf(),
            last_good,
            signature: Vec::new(),
            files,
            applied: FileObjects::default(),
            rejected: policy::status::Rejections::new(),
        }
    }

    fn store_name(path: &Path) -> String {
        path.to_string_lossy().replace(['/', '\\'], "%")
    }

    fn remember(&self, path: &Path, text: &str) {
        if let Some(store) = &self.last_good {
            let _ = std::fs::create_dir_all(store);
            let _ = std::fs::write(store.join(Self::store_name(path)), text);
        }
    }

    fn current_signature(&self) -> Vec<(PathBuf, Option<SystemTime>, u64)> {
        files(&self.dir)
            .unwrap_or_default()
            .into_iter()
            .map(|p| {
                let meta = std::fs::metadata(&p).ok();
                let (mtime, len) = meta.map_or((None, 0), |m| (m.modified().ok(), m.len()));
                (p, mtime, len)
            })
            .collect()
    }

    /// The changes since the last call (all objects on the first call); reports
    /// rejected files and objects, whose last good versions stay in force.
    pub fn poll(&mut self) -> Vec<Change> {
        let sig = self.current_signature();
        if sig == self.signature {
            return vec![];
        }
        self.signature = sig;
        let mut next_files = HashMap::new();
        self.rejected.clear();
        for (path, _, _) in &self.signature {
            let previous = self.files.get(path).cloned().unwrap_or_default();
            let mut m = Manifests::default();
            match std::fs::read_to_string(path) {
                Ok(text) => {
                    load_str(&mut m, path, &text);
                    if m.errors.is_empty() {
                        self.remember(path, &text);
                    }
                }
                Err(e) => {
                    log(format!(
                        "cannot read {}: {e}; keeping its last good objects",
                        path.display()
                    ));
                    next_files.insert(path.clone(), previous);
                    continue;
                }
            }
            let whole_file_failed = m
                .errors
                .iter()
                .any(|e| matches!(e, PolicyError::Yaml { .. }));
            for e in &m.errors {
                log(format!(
                    "{} (last good version stays in force)",
                    error_chain(e)
                ));
            }
            if whole_file_failed {
                next_files.insert(path.clone(), previous);
                continue;
            }
            for p in &m.cluster_policies {
                for w in &p.warnings {
                    log(format!(
                        "{}: ClusterNetworkPolicy {}: {w}",
                        path.display(),
                        p.name
                    ));
                }
            }
            let mut objs = FileObjects::from(&m);
            for e in &m.errors {
                if let Some((kind, object)) = rejected(e) {
                    self.rejected
                        .insert((kind.to_string(), object), error_chain(e));
                }
            }
            for (kind, object) in m.errors.iter().filter_map(rejected) {
                match kind {
                    "NetworkPolicy" => {
                        if let Ok(k) = object.parse::<ObjectKey>()
                            && let Some(p) = previous.policies.get(&k)
                        {
                            objs.policies.insert(k, p.clone());
                        }
                    }
                    "Pod" => {
                        if let Ok(k) = object.parse::<ObjectKey>()
                            && let Some(p) = previous.pods.get(&k)
                        {
                            objs.pods.insert(k, p.clone());
                        }
                    }
                    policy::cnp::KIND => {
                        if let Some(p) = previous.cluster_policies.get(&object) {
                            objs.cluster_policies.insert(object.clone(), p.clone());
                        }
                    }
                    "Namespace" => {
                        if let Some(n) = previous.namespaces.get(&object) {
                            objs.namespaces.insert(object.clone(), n.clone());
                        }
                    }
                    _ => {
                        if let Some(n) = previous.nodes.get(&object) {
                            objs.nodes.insert(object.clone(), n.clone());
                        }
                    }
                }
            }
            next_files.insert(path.clone(), objs);
        }
        self.files = next_files;
        let mut want = FileObjects::default();
        for f in self.files.values() {
            want.namespaces.extend(f.namespaces.clone());
            want.pods.extend(f.pods.clone());
            want.nodes.extend(f.nodes.clone());
            want.policies.extend(f.policies.clone());
            want.cluster_policies.extend(f.cluster_policies.clone());
            want.services.services.extend(f.services.services.clone());
            want.services.slices.extend(f.services.slices.clone());
        }
        let mut changes = Vec::new();
        diff(
            &self.applied.namespaces,
            &want.namespaces,
            &mut changes,
            Change::Namespace,
            Change::NamespaceDeleted,
        );
        diff(
            &self.applied.nodes,
            &want.nodes,
            &mut changes,
            Change::Node,
            Change::NodeDeleted,
        );
        diff(
            &self.applied.pods,
            &want.pods,
            &mut changes,
            Change::Pod,
            Change::PodDeleted,
        );
        diff(
            &self.applied.policies,
            &want.policies,
            &mut changes,
            Change::Policy,
            Change::PolicyDeleted,
        );
        diff(
            &self.applied.cluster_policies,
            &want.cluster_policies,
            &mut changes,
            Change::ClusterPolicy,
            Change::ClusterPolicyDeleted,
        );
        self.applied = want;
        changes
    }

    /// Polls and applies the changes to `realiser` as one generation, with
    /// what was rejected (for `flowctl dump-policies`).
    pub fn poll_into(&mut self, realiser: &Realiser) {
        apply(realiser, self.poll());
        if let Err(e) = realiser.set_services(self.applied.services.clone()) {
            log(error_chain(&e));
        }
        realiser.set_rejections("manifests", self.rejected.clone());
    }

    /// Watches forever, applying changes to `realiser` as one generation each time.
    /// Edits wake it through inotify (a change is enforced within milliseconds);
    /// the directory is also rescanned every `every`, which is all there is when
    /// inotify is not available.
    pub fn run(mut self, realiser: Arc<Realiser>, every: Duration) {
        let notify = crate::sys::inotify_init()
            .inspect_err(|e| {
                log(format!(
                    "inotify unavailable ({e}); polling every {every:?}"
                ))
            })
            .ok();
        let mut buf = [0u8; 4096];
        loop {
            match &notify {
                Some(fd) => {
                    // Watch every directory (new ones too); re-adding is a no-op.
                    let mut dirs = vec![self.dir.clone()];
                    while let Some(d) = dirs.pop() {
                        let _ = crate::sys::inotify_watch_dir(fd.as_fd(), &d);
                        if let Ok(entries) = std::fs::read_dir(&d) {
                            dirs.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
                        }
                    }
                    let mut ready = Vec::new();
                    let woke = crate::sys::poll_readable(
                        &[fd.as_fd()],
                        &mut ready,
                        every.as_millis().min(i32::MAX as u128) as i32,
                    )
                    .unwrap_or(0)
                        > 0;
                    if woke {
                        // Let a burst of writes (an editor saving) settle, then drain.
                        std::thread::sleep(Duration::from_millis(2));
                        while matches!(crate::sys::read(fd.as_fd(), &mut buf), Ok(n) if n > 0) {}
                    }
                }
                None => std::thread::sleep(every),
            }
            self.poll_into(&realiser);
        }
    }
}

fn diff<K: Ord + Clone, V: PartialEq + Clone>(
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
    out: &mut Vec<Change>,
    upsert: impl Fn(V) -> Change,
    delete: impl Fn(K) -> Change,
) {
    for (k, v) in new {
        if old.get(k) != Some(v) {
            out.push(upsert(v.clone()));
        }
    }
    for k in old.keys() {
        if !new.contains_key(k) {
            out.push(delete(k.clone()));
        }
    }
}
