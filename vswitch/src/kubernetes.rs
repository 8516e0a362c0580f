//! The Kubernetes source: Namespaces, Pods, Nodes and NetworkPolicies from the
//! API server, into the same cluster model as the manifest directory.
//!
//! Owns the watchers (kube-runtime: list, then watch from the list's
//! resourceVersion; relists after a dropped watch that cannot resume or a 410
//! Gone; retries with backoff while the API server is unreachable), the mirror
//! of what was last applied (so a relist becomes a diff, deletions included),
//! and readiness: ready once every kind has been listed and that state compiled
//! and published. While the API server is unreachable the last known state stays
//! in force. Objects the API server hands us that fail validation are reported
//! and their last good version stays in force.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use futures_util::{FutureExt, StreamExt, stream::BoxStream};
use k8s_openapi::api::core::v1::{Namespace as ApiNamespace, Node as ApiNode, Pod as ApiPod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use policy::compile::Change;
use policy::model::{Namespace, Node, ObjectKey, Pod, Policy};

use crate::config::Config;
use crate::daemon::{chain, own_node};
use crate::switch::Switch;

/// One event from any of the four watchers (boxed: API objects are large).
enum Event {
    Namespace(Box<watcher::Result<watcher::Event<ApiNamespace>>>),
    Pod(Box<watcher::Result<watcher::Event<ApiPod>>>),
    Node(Box<watcher::Result<watcher::Event<ApiNode>>>),
    Policy(Box<watcher::Result<watcher::Event<NetworkPolicy>>>),
}

/// An event moved out of its box to be matched; lives on the stack briefly.
#[allow(clippy::large_enum_variant)]
enum Unboxed {
    Namespace(watcher::Result<watcher::Event<ApiNamespace>>),
    Pod(watcher::Result<watcher::Event<ApiPod>>),
    Node(watcher::Result<watcher::Event<ApiNode>>),
    Policy(watcher::Result<watcher::Event<NetworkPolicy>>),
}

/// The kinds, in the order of `Mirror::synced`.
const KINDS: [&str; 4] = ["Namespace", "Pod", "Node", "NetworkPolicy"];

/// Objects of one kind as applied, plus the buffer of a relist in progress.
#[derive(Debug)]
struct Kind<K, V> {
    applied: BTreeMap<K, V>,
    relist: Option<BTreeMap<K, V>>,
}

impl<K: Ord + Clone, V: PartialEq + Clone> Kind<K, V> {
    fn new() -> Self {
        Kind {
            applied: BTreeMap::new(),
            relist: None,
        }
    }

    /// A relist starts.
    fn init(&mut self) {
        self.relist = Some(BTreeMap::new());
    }

    /// An object of the relist (`None`: rejected, keep what was applied).
    fn init_apply(&mut self, key: K, value: Option<V>) {
        let keep = value.or_else(|| self.applied.get(&key).cloned());
        if let (Some(buf), Some(v)) = (self.relist.as_mut(), keep) {
            buf.insert(key, v);
        }
    }

    /// The relist is complete: the changes that make `applied` equal to it.
    fn init_done(
        &mut self,
        upsert: impl Fn(V) -> Change,
        delete: impl Fn(K) -> Change,
        out: &mut Vec<Change>,
    ) {
        let Some(fresh) = self.relist.take() else {
            return;
        };
        for (k, v) in &fresh {
            if self.applied.get(k) != Some(v) {
                out.push(upsert(v.clone()));
            }
        }
        for k in self.applied.keys() {
            if !fresh.contains_key(k) {
                out.push(delete(k.clone()));
            }
        }
        self.applied = fresh;
    }

    fn apply(&mut self, key: K, value: V, upsert: impl Fn(V) -> Change, out: &mut Vec<Change>) {
        if self.applied.get(&key) != Some(&value) {
            self.applied.insert(key, value.clone());
            out.push(upsert(value));
        }
    }

    fn delete(&mut self, key: K, delete: impl Fn(K) -> Change, out: &mut Vec<Change>) {
        if self.applied.remove(&key).is_some() {
            out.push(delete(key));
        }
    }
}

/// What the API server said, as applied to the switch.
struct Mirror {
    namespaces: Kind<String, Namespace>,
    pods: Kind<ObjectKey, Pod>,
    nodes: Kind<String, Node>,
    policies: Kind<ObjectKey, Policy>,
    synced: [bool; 4],
}

fn key_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ObjectKey {
    ObjectKey::new(
        meta.namespace.as_deref().unwrap_or(""),
        meta.name.as_deref().unwrap_or(""),
    )
}

/// Converts, reporting (not failing on) an object that does not validate.
fn checked<T>(kind: &str, name: &str, r: Result<T, policy::error::Error>) -> Option<T> {
    r.inspect_err(|e| {
        tracing::warn!(kind, object = name, error = %chain(e), "rejected; its last good version stays in force");
    })
    .ok()
}

impl Mirror {
    /// Folds one watcher event into `out`.
    fn handle(&mut self, config: &Config, event: Event, out: &mut Vec<Change>) {
        use watcher::Event as W;
        let event = match event {
            Event::Namespace(e) => Unboxed::Namespace(*e),
            Event::Pod(e) => Unboxed::Pod(*e),
            Event::Node(e) => Unboxed::Node(*e),
            Event::Policy(e) => Unboxed::Policy(*e),
        };
        match event {
            Unboxed::Namespace(Ok(e)) => {
                let (up, del) = (Change::Namespace, Change::NamespaceDeleted);
                let conv = |o: &ApiNamespace| {
                    let name = o.metadata.name.clone().unwrap_or_default();
                    (
                        name.clone(),
                        checked("Namespace", &name, Namespace::from_api(o)),
                    )
                };
                match e {
                    W::Init => self.namespaces.init(),
                    W::InitApply(o) => {
                        let (k, v) = conv(&o);
                        self.namespaces.init_apply(k, v)
                    }
                    W::InitDone => {
                        self.namespaces.init_done(up, del, out);
                        self.synced[0] = true;
                    }
                    W::Apply(o) => {
                        if let (k, Some(v)) = conv(&o) {
                            self.namespaces.apply(k, v, up, out)
                        }
                    }
                    W::Delete(o) => self.namespaces.delete(conv(&o).0, del, out),
                }
            }
            Unboxed::Pod(Ok(e)) => {
                let (up, del) = (Change::Pod, Change::PodDeleted);
                let conv = |o: &ApiPod| {
                    let key = key_of(&o.metadata);
                    (
                        key.clone(),
                        checked("Pod", &key.to_string(), Pod::from_api(o)),
                    )
                };
                match e {
                    W::Init => self.pods.init(),
                    W::InitApply(o) => {
                        let (k, v) = conv(&o);
                        self.pods.init_apply(k, v)
                    }
                    W::InitDone => {
                        self.pods.init_done(up, del, out);
                        self.synced[1] = true;
                    }
                    W::Apply(o) => {
                        if let (k, Some(v)) = conv(&o) {
                            self.pods.apply(k, v, up, out)
                        }
                    }
                    W::Delete(o) => self.pods.delete(conv(&o).0, del, out),
                }
            }
            Unboxed::Node(Ok(e)) => {
                let (up, del) = (Change::Node, Change::NodeDeleted);
                // This node also carries the gateway: own-node traffic.
                let conv = |o: &ApiNode| {
                    let name = o.metadata.name.clone().unwrap_or_default();
                    let node = checked("Node", &name, Node::from_api(o)).map(|n| {
                        if n.name == config.node_name {
                            own_node(config, Some(n))
                        } else {
                            n
                        }
                    });
                    (name, node)
                };
                match e {
                    W::Init => self.nodes.init(),
                    W::InitApply(o) => {
                        let (k, v) = conv(&o);
                        self.nodes.init_apply(k, v)
                    }
                    W::InitDone => {
                        // The own node never disappears from the model: the
                        // gateway is still there.
                        if let Some(buf) = self.nodes.relist.as_mut() {
                            buf.entry(config.node_name.clone())
                                .or_insert_with(|| own_node(config, None));
                        }
                        self.nodes.init_done(up, del, out);
                        self.synced[2] = true;
                    }
                    W::Apply(o) => {
                        if let (k, Some(v)) = conv(&o) {
                            self.nodes.apply(k, v, up, out)
                        }
                    }
                    W::Delete(o) => {
                        let name = conv(&o).0;
                        if name == config.node_name {
                            self.nodes.apply(name, own_node(config, None), up, out);
                        } else {
                            self.nodes.delete(name, del, out);
                        }
                    }
                }
            }
            Unboxed::Policy(Ok(e)) => {
                let (up, del) = (Change::Policy, Change::PolicyDeleted);
                let conv = |o: &NetworkPolicy| {
                    let key = key_of(&o.metadata);
                    (
                        key.clone(),
                        checked("NetworkPolicy", &key.to_string(), Policy::from_api(o)),
                    )
                };
                match e {
                    W::Init => self.policies.init(),
                    W::InitApply(o) => {
                        let (k, v) = conv(&o);
                        self.policies.init_apply(k, v)
                    }
                    W::InitDone => {
                        self.policies.init_done(up, del, out);
                        self.synced[3] = true;
                    }
                    W::Apply(o) => {
                        if let (k, Some(v)) = conv(&o) {
                            self.policies.apply(k, v, up, out)
                        }
                    }
                    W::Delete(o) => self.policies.delete(conv(&o).0, del, out),
                }
            }
            Unboxed::Namespace(Err(e)) => watch_error(KINDS[0], &e),
            Unboxed::Pod(Err(e)) => watch_error(KINDS[1], &e),
            Unboxed::Node(Err(e)) => watch_error(KINDS[2], &e),
            Unboxed::Policy(Err(e)) => watch_error(KINDS[3], &e),
        }
    }
}

fn watch_error(kind: &str, e: &watcher::Error) {
    tracing::warn!(
        kind,
        error = %chain(e),
        "API server: watch failed; retrying with backoff, the last known state stays in force"
    );
}

/// The API client: the configured kubeconfig, else in-cluster or the default
/// kubeconfig.
async fn client(config: &Config) -> anyhow::Result<Client> {
    let kube_config = match &config.kubernetes.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| anyhow::anyhow!("cannot read kubeconfig {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| anyhow::anyhow!("bad kubeconfig {}: {e}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| anyhow::anyhow!("no in-cluster config or kubeconfig: {e}"))?,
    };
    Client::try_from(kube_config).map_err(|e| anyhow::anyhow!("cannot build the API client: {e}"))
}

/// This node's pod CIDR (`spec.podCIDR` of its Node object), retried until the
/// API server answers: until then nothing can be forwarded anyway.
///
/// Fails when no client can be built or the Node has no pod CIDR.
pub fn own_pod_cidr(config: &Config) -> anyhow::Result<ipnet::IpNet> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let client = client(config).await?;
        let nodes = Api::<ApiNode>::all(client);
        let mut delay = std::time::Duration::from_millis(200);
        loop {
            match nodes.get(&config.node_name).await {
                Ok(node) => {
                    let cidr = node
                        .spec
                        .and_then(|s| s.pod_cidr)
                        .ok_or_else(|| anyhow::anyhow!("node {} has no spec.podCIDR", config.node_name))?;
                    return cidr
                        .parse()
                        .map_err(|e| anyhow::anyhow!("node {}: bad podCIDR {cidr:?}: {e}", config.node_name));
                }
                Err(e) => {
                    tracing::warn!(node = %config.node_name, error = %e, "cannot read this node's pod CIDR yet");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(std::time::Duration::from_secs(10));
                }
            }
        }
    })
}

/// Watches the API server forever, applying changes to `switch`; sets `ready`
/// once the first full sync of every kind is compiled and published.
///
/// Fails only when no client can be built (bad kubeconfig); connection
/// failures are retried.
pub fn run(switch: Arc<Switch>, config: Config, ready: Arc<AtomicBool>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let client = client(&config).await?;
        let wc = watcher::Config::default();
        let streams: Vec<BoxStream<'static, Event>> = vec![
            watcher(Api::<ApiNamespace>::all(client.clone()), wc.clone())
                .default_backoff()
                .map(|e| Event::Namespace(Box::new(e)))
                .boxed(),
            watcher(Api::<ApiPod>::all(client.clone()), wc.clone())
                .default_backoff()
                .map(|e| Event::Pod(Box::new(e)))
                .boxed(),
            watcher(Api::<ApiNode>::all(client.clone()), wc.clone())
                .default_backoff()
                .map(|e| Event::Node(Box::new(e)))
                .boxed(),
            watcher(Api::<NetworkPolicy>::all(client), wc)
                .default_backoff()
                .map(|e| Event::Policy(Box::new(e)))
                .boxed(),
        ];
        let mut events = futures_util::stream::select_all(streams);
        let mut mirror = Mirror {
            namespaces: Kind::new(),
            pods: Kind::new(),
            nodes: Kind::new(),
            policies: Kind::new(),
            synced: [false; 4],
        };
        while let Some(first) = events.next().await {
            // Take what else is already waiting, so a relist (or a burst of
            // edits) is compiled and published as one generation.
            let mut changes = Vec::new();
            mirror.handle(&config, first, &mut changes);
            for _ in 0..4096 {
                match events.next().now_or_never() {
                    Some(Some(e)) => mirror.handle(&config, e, &mut changes),
                    _ => break,
                }
            }
            if !changes.is_empty() {
                let n = changes.len();
                match switch.apply_all(changes) {
                    Ok(generation) => tracing::info!(changes = n, generation, "applied"),
                    Err(e) => tracing::error!(error = %chain(&e), "cannot install flows"),
                }
            }
            if !ready.load(Relaxed) && mirror.synced.iter().all(|s| *s) {
                ready.store(true, Relaxed);
                tracing::info!("first full sync compiled and published: ready");
            }
        }
        Ok(())
    })
}
