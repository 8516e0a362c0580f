//! The manifest directory as a source of cluster state (standalone mode).
//!
//! Owns watching a directory of YAML manifests (inotify, with a rescan
//! timeout), turning edits into cluster changes applied as one generation,
//! and keeping the last good version of every file and object: an invalid
//! file or object is reported and its last good version stays in force, also
//! across restarts (copies in `state_dir/last-good/`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
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

/// With inotify, how often the directory is rescanned all the same.
const RESCAN: Duration = Duration::from_secs(10);

/// An object a manifest file rejected: ((kind, object), why).
type Rejected = ((String, String), String);

/// The objects of one manifest file that are in force.
#[derive(Debug, Default, Clone)]
/// Objects are shared (`Arc`) between a file's scans and what is applied:
/// an unchanged object compares equal by address, without a deep compare.
struct FileObjects {
    namespaces: BTreeMap<String, Arc<Namespace>>,
    pods: BTreeMap<ObjectKey, Arc<Pod>>,
    nodes: BTreeMap<String, Arc<Node>>,
    policies: BTreeMap<ObjectKey, Arc<Policy>>,
    cluster_policies: BTreeMap<String, Arc<ClusterPolicy>>,
    services: policy::services::Services,
}

impl From<&Manifests> for FileObjects {
    fn from(m: &Manifests) -> FileObjects {
        FileObjects {
            namespaces: m
                .namespaces
                .iter()
                .map(|n| (n.name.clone(), Arc::new(n.clone())))
                .collect(),
            pods: m
                .pods
                .iter()
                .map(|p| (p.key.clone(), Arc::new(p.clone())))
                .collect(),
            nodes: m
                .nodes
                .iter()
                .map(|n| (n.name.clone(), Arc::new(n.clone())))
                .collect(),
            policies: m
                .policies
                .iter()
                .map(|p| (p.key.clone(), Arc::new(p.clone())))
                .collect(),
            cluster_policies: m
                .cluster_policies
                .iter()
                .map(|p| (p.name.clone(), Arc::new(p.clone())))
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
    store: Option<PathBuf>,
    /// The last version of each file that loaded cleanly (text).
    good: BTreeMap<PathBuf, String>,
    good_changed: bool,
    /// The thread writing `good` to `store` (started on the first change).
    writer: Option<std::sync::mpsc::Sender<Arc<BTreeMap<PathBuf, String>>>>,
    signature: Vec<(PathBuf, Option<SystemTime>, u64)>,
    files: BTreeMap<PathBuf, FileObjects>,
    applied: FileObjects,
    /// What the last scan of each file rejected.
    file_rejections: HashMap<PathBuf, Vec<Rejected>>,
    /// What is rejected now, all files (shown by `flowctl dump-policies`).
    rejected: policy::status::Rejections,
    /// Whether the last poll scanned (Services and rejections to republish).
    scanned: bool,
}

impl ManifestWatch {
    /// Watches `dir`; with `state_dir`, remembers the last good version of every
    /// file across restarts (`state_dir/last-good.json`).
    pub fn new(dir: &Path, state_dir: Option<&Path>) -> ManifestWatch {
        let store = state_dir.map(|d| d.join("last-good.json"));
        let good = store
            .as_deref()
            .map(|store| {
                let legacy = store.with_file_name("last-good");
                read_store(store).unwrap_or_else(|| read_legacy_store(dir, &legacy))
            })
            .unwrap_or_default();
        ManifestWatch {
            dir: dir.to_path_buf(),
            store,
            good,
            good_changed: false,
            writer: None,
            signature: Vec::new(),
            files: BTreeMap::new(),
            applied: FileObjects::default(),
            file_rejections: HashMap::new(),
            scanned: false,
            rejected: policy::status::Rejections::new(),
        }
    }

    /// The objects of the last good version of `path`, as this or an
    /// earlier run kept it (parsed only when a file has gone bad).
    fn last_good(&self, path: &Path) -> FileObjects {
        if let Some(f) = self.files.get(path) {
            return f.clone();
        }
        let Some(text) = self.good.get(path) else {
            return FileObjects::default();
        };
        let mut m = Manifests::default();
        load_str(&mut m, path, text);
        FileObjects::from(&m)
    }

    /// Writes the last good versions, when they changed, by a thread of its
    /// own (the newest snapshot wins; the disk never holds up a scan).
    fn keep_good(&mut self) {
        let Some(store) = &self.store else {
            return;
        };
        if !std::mem::take(&mut self.good_changed) {
            return;
        }
        let writer = self.writer.get_or_insert_with(|| {
            let (tx, rx) = std::sync::mpsc::channel::<Arc<BTreeMap<PathBuf, String>>>();
            let store = store.clone();
            let spawned = std::thread::Builder::new()
                .name("last-good".into())
                .spawn(move || {
                    while let Ok(mut good) = rx.recv() {
                        while let Ok(newer) = rx.try_recv() {
                            good = newer;
                        }
                        if let Err(e) = write_store(&store, &good) {
                            log(format!("cannot keep {}: {e}", store.display()));
                        }
                    }
                });
            if let Err(e) = spawned {
                log(format!("cannot start the last-good writer: {e}"));
            }
            tx
        });
        let _ = writer.send(Arc::new(self.good.clone()));
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
    /// Only files whose size or modification time changed are read again
    /// (in parallel): one edit in a large directory costs that file alone.
    pub fn poll(&mut self) -> Vec<Change> {
        let t = std::time::Instant::now();
        let sig = self.current_signature();
        if sig == self.signature {
            return vec![];
        }
        let before: HashMap<&PathBuf, (Option<SystemTime>, u64)> = self
            .signature
            .iter()
            .map(|(p, m, l)| (p, (*m, *l)))
            .collect();
        let changed: Vec<PathBuf> = sig
            .iter()
            .filter(|(p, m, l)| before.get(p) != Some(&(*m, *l)))
            .map(|(p, _, _)| p.clone())
            .collect();
        let present: std::collections::HashSet<&PathBuf> = sig.iter().map(|(p, _, _)| p).collect();
        // Only objects of files read again or gone can change.
        let mut touched = Touched::default();
        for (_, gone) in self.files.iter().filter(|(p, _)| !present.contains(p)) {
            touched.add(gone);
        }
        self.files.retain(|p, _| present.contains(p));
        let before = self.good.len();
        self.good.retain(|p, _| present.contains(p));
        self.good_changed |= self.good.len() != before;
        self.file_rejections.retain(|p, _| present.contains(p));
        for (path, read) in read_all(&changed) {
            let (objs, rejections) = match read {
                Ok((text, m)) => {
                    let previous = || self.last_good(&path);
                    let kept = scanned(&path, m, previous);
                    if let Some(text) = text {
                        self.good_changed |= self.good.get(&path) != Some(&text);
                        self.good.insert(path.clone(), text);
                    }
                    kept
                }
                Err(e) => {
                    log(format!(
                        "cannot read {}: {e}; keeping its last good objects",
                        path.display()
                    ));
                    (self.last_good(&path), Vec::new())
                }
            };
            touched.add(&objs);
            if let Some(old) = self.files.insert(path.clone(), objs) {
                touched.add(&old);
            }
            self.file_rejections.insert(path, rejections);
        }
        self.signature = sig;
        self.keep_good();
        self.rejected = self.file_rejections.values().flatten().cloned().collect();
        let mut services = policy::services::Services::default();
        for f in self.files.values() {
            services.services.extend(f.services.services.clone());
            services.slices.extend(f.services.slices.clone());
        }
        self.applied.services = services;
        let files: Vec<&FileObjects> = self.files.values().collect();
        let (a, k) = (&mut self.applied, &touched);
        let mut changes = Vec::new();
        let out = &mut changes;
        let n = files.len();
        let (ns, nodes) = (Change::Namespace, Change::Node);
        sync(
            &mut a.namespaces,
            &k.namespaces,
            |i| &files[i].namespaces,
            n,
            out,
            ns,
            Change::NamespaceDeleted,
        );
        sync(
            &mut a.nodes,
            &k.nodes,
            |i| &files[i].nodes,
            n,
            out,
            nodes,
            Change::NodeDeleted,
        );
        sync(
            &mut a.pods,
            &k.pods,
            |i| &files[i].pods,
            n,
            out,
            Change::Pod,
            Change::PodDeleted,
        );
        let (np, npd) = (Change::Policy, Change::PolicyDeleted);
        sync(
            &mut a.policies,
            &k.policies,
            |i| &files[i].policies,
            n,
            out,
            np,
            npd,
        );
        let (cnp, cnpd) = (Change::ClusterPolicy, Change::ClusterPolicyDeleted);
        sync(
            &mut a.cluster_policies,
            &k.cluster_policies,
            |i| &files[i].cluster_policies,
            n,
            out,
            cnp,
            cnpd,
        );
        self.scanned = true;
        tracing::debug!(
            files = self.signature.len(),
            read = changed.len(),
            changes = changes.len(),
            took_us = t.elapsed().as_micros() as u64,
            "manifests scanned"
        );
        changes
    }

    /// Polls and applies the changes to `realiser` as one generation, with
    /// what was rejected (for `flowctl dump-policies`).
    pub fn poll_into(&mut self, realiser: &Realiser) {
        apply(realiser, self.poll());
        if std::mem::take(&mut self.scanned) {
            if let Err(e) = realiser.set_services(self.applied.services.clone()) {
                log(error_chain(&e));
            }
            realiser.set_rejections("manifests", self.rejected.clone());
        }
    }

    /// Watches forever, applying changes to `realiser` as one generation each time.
    /// Edits wake it through inotify (a change is enforced within milliseconds),
    /// and the directory is rescanned every [`RESCAN`] as a safety net; without
    /// inotify it is rescanned every `every`. Idle, it costs nothing: a scan
    /// stats every file, which for thousands of files is not free.
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
                    let timeout = RESCAN.max(every).as_millis().min(i32::MAX as u128) as i32;
                    let woke = crate::sys::poll_readable(&[fd.as_fd()], &mut ready, timeout)
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

/// The last good versions kept by an earlier run, when there are.
fn read_store(store: &Path) -> Option<BTreeMap<PathBuf, String>> {
    let text = std::fs::read_to_string(store).ok()?;
    serde_json::from_str(&text)
        .inspect_err(|e| log(format!("ignoring {}: {e}", store.display())))
        .ok()
}

/// Last good versions as earlier releases kept them: a copy per file in
/// `dir` (`/` spelled `%`).
fn read_legacy_store(manifests: &Path, dir: &Path) -> BTreeMap<PathBuf, String> {
    policy::manifest::files(manifests)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|path| {
            let name = path.to_string_lossy().replace(['/', '\\'], "%");
            let text = std::fs::read_to_string(dir.join(name)).ok()?;
            Some((path, text))
        })
        .collect()
}

/// Replaces `store` with `good`, atomically (a crash leaves the old one).
fn write_store(store: &Path, good: &BTreeMap<PathBuf, String>) -> std::io::Result<()> {
    let tmp = store.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(good)?)?;
    std::fs::rename(&tmp, store)
}

/// Reads and parses `paths`, spread over the cores (a cold start reads
/// thousands of files).
/// A file read and parsed: its text when it loaded cleanly (a last good
/// version), and what it holds.
type Read = std::io::Result<(Option<String>, Manifests)>;

fn read_all(paths: &[PathBuf]) -> Vec<(PathBuf, Read)> {
    let read = |path: &PathBuf| {
        let text = std::fs::read_to_string(path).map(|text| {
            let mut m = Manifests::default();
            load_str(&mut m, path, &text);
            (m.errors.is_empty().then_some(text), m)
        });
        (path.clone(), text)
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
    if paths.len() < 16 || threads == 1 {
        return paths.iter().map(read).collect();
    }
    let chunk = paths.len().div_ceil(threads);
    std::thread::scope(|s| {
        let workers: Vec<_> = paths
            .chunks(chunk)
            .map(|part| s.spawn(move || part.iter().map(read).collect::<Vec<_>>()))
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_default())
            .collect()
    })
}

/// A file's objects in force after a scan (`previous`: its last good ones,
/// kept for what failed), and what was rejected, logged.
fn scanned(
    path: &Path,
    m: Manifests,
    previous: impl FnOnce() -> FileObjects,
) -> (FileObjects, Vec<Rejected>) {
    if m.errors.is_empty() {
        return (FileObjects::from(&m), Vec::new());
    }
    let previous = previous();
    for e in &m.errors {
        log(format!(
            "{} (last good version stays in force)",
            error_chain(e)
        ));
    }
    if m.errors
        .iter()
        .any(|e| matches!(e, PolicyError::Yaml { .. }))
    {
        return (previous, Vec::new());
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
    let rejections = m
        .errors
        .iter()
        .filter_map(|e| {
            rejected(e).map(|(kind, object)| ((kind.to_string(), object), error_chain(e)))
        })
        .collect();
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
    (objs, rejections)
}

/// The keys of the objects a scan may have changed, by kind.
#[derive(Default)]
struct Touched {
    namespaces: BTreeSet<String>,
    pods: BTreeSet<ObjectKey>,
    nodes: BTreeSet<String>,
    policies: BTreeSet<ObjectKey>,
    cluster_policies: BTreeSet<String>,
}

impl Touched {
    fn add(&mut self, f: &FileObjects) {
        self.namespaces.extend(f.namespaces.keys().cloned());
        self.pods.extend(f.pods.keys().cloned());
        self.nodes.extend(f.nodes.keys().cloned());
        self.policies.extend(f.policies.keys().cloned());
        self.cluster_policies
            .extend(f.cluster_policies.keys().cloned());
    }
}

/// Brings the `keys` of `applied` to what the files (`file(0..files)`, in
/// path order: the last defining a key wins) say, pushing a change for each
/// object that differs. An object of a file not read again is the very one
/// applied: it compares by address.
fn sync<'a, K: Ord + Clone + 'a, V: PartialEq + Clone + 'a>(
    applied: &mut BTreeMap<K, Arc<V>>,
    keys: &BTreeSet<K>,
    file: impl Fn(usize) -> &'a BTreeMap<K, Arc<V>>,
    files: usize,
    out: &mut Vec<Change>,
    upsert: impl Fn(V) -> Change,
    delete: impl Fn(K) -> Change,
) {
    for k in keys {
        let want = (0..files).rev().find_map(|i| file(i).get(k));
        match (applied.get(k), want) {
            (Some(a), Some(v)) if Arc::ptr_eq(a, v) => {}
            // Read again, the same: applied from now on by this address.
            (Some(a), Some(v)) if a == v => {
                applied.insert(k.clone(), Arc::clone(v));
            }
            (_, Some(v)) => {
                out.push(upsert(V::clone(v)));
                applied.insert(k.clone(), Arc::clone(v));
            }
            (Some(_), None) => {
                applied.remove(k);
                out.push(delete(k.clone()));
            }
            (None, None) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n";

    fn policy(port: u16) -> String {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: db, namespace: shop}}\nspec:\n  podSelector: {{}}\n  ingress: [{{ports: [{{port: {port}}}]}}]\n"
        )
    }

    /// A fresh directory under the system's temporary one, removed on drop.
    struct Dir(PathBuf);

    impl Dir {
        fn new(tag: &str) -> Dir {
            let d = std::env::temp_dir()
                .join(format!("vswitch-manifests-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(d.join("m")).unwrap();
            std::fs::create_dir_all(d.join("state")).unwrap();
            Dir(d)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn policies(changes: &[Change]) -> Vec<String> {
        changes
            .iter()
            .filter_map(|c| match c {
                Change::Policy(p) => Some(format!("{:?}", p.ingress)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn only_the_objects_of_an_edited_file_change() {
        let d = Dir::new("edit");
        let m = d.0.join("m");
        std::fs::write(m.join("ns.yaml"), NS).unwrap();
        std::fs::write(m.join("policy.yaml"), policy(80)).unwrap();
        let mut w = ManifestWatch::new(&m, None);
        assert_eq!(w.poll().len(), 2, "the namespace and the policy");
        assert!(w.poll().is_empty(), "nothing changed");
        std::fs::write(m.join("policy.yaml"), policy(8080)).unwrap();
        let changes = w.poll();
        assert_eq!(changes.len(), 1, "{changes:?}");
        assert!(policies(&changes)[0].contains("8080"));
        std::fs::remove_file(m.join("policy.yaml")).unwrap();
        let changes = w.poll();
        assert!(
            matches!(&changes[..], [Change::PolicyDeleted(k)] if k.name == "db"),
            "{changes:?}"
        );
    }

    #[test]
    fn a_broken_file_falls_back_on_the_last_good_version_of_an_earlier_run() {
        for legacy in [false, true] {
            let d = Dir::new(if legacy { "legacy" } else { "store" });
            let (m, state) = (d.0.join("m"), d.0.join("state"));
            let path = m.join("policy.yaml");
            if legacy {
                // As releases before last-good.json kept it: a copy per file.
                let copies = state.join("last-good");
                std::fs::create_dir_all(&copies).unwrap();
                let name = path.to_string_lossy().replace('/', "%");
                std::fs::write(copies.join(name), policy(443)).unwrap();
            } else {
                std::fs::write(&path, policy(443)).unwrap();
                let mut first = ManifestWatch::new(&m, Some(&state));
                assert_eq!(first.poll().len(), 1);
                let store = state.join("last-good.json");
                let deadline = std::time::Instant::now() + Duration::from_secs(5);
                while !std::fs::read_to_string(&store).is_ok_and(|t| t.contains("443")) {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "last good version written"
                    );
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            // The next run finds the file broken: the last good policy is in force.
            std::fs::write(&path, "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: db, namespace: shop}\nspec: {podSelector: {}, ingress: [{ports: [{port: 0}]}]}\n").unwrap();
            let mut next = ManifestWatch::new(&m, Some(&state));
            let changes = next.poll();
            assert_eq!(policies(&changes).len(), 1, "legacy {legacy}: {changes:?}");
            assert!(policies(&changes)[0].contains("443"), "legacy {legacy}");
            assert!(!next.rejected.is_empty(), "the broken version is reported");
        }
    }
}
