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

use control::error_chain as chain;

use crate::config::Config;
use crate::gateway::own_node;
use crate::realiser::Realiser;

/// One event from any of the four watchers (boxed: API objects are large).
enum Event {
    Namespace(Box<watcher::Result<watcher::Event<ApiNamespace>>>),
    Pod(Box<watcher::Result<watcher::Event<ApiPod>>>),
    Node(Box<watcher::Result<watcher::Event<ApiNode>>>),
    Policy(Box<watcher::Result<watcher::Event<NetworkPolicy>>>),
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

/// Folds one watcher event of a kind into its mirror and `out`: `conv` turns an
/// API object into (key, model object or `None` when rejected), `fill` may add
/// to a completed relist before it is applied.
#[allow(clippy::too_many_arguments)]
fn fold<A, K: Ord + Clone, V: PartialEq + Clone>(
    kind: &mut Kind<K, V>,
    synced: &mut bool,
    event: watcher::Event<A>,
    conv: impl Fn(&A) -> (K, Option<V>),
    fill: impl FnOnce(&mut BTreeMap<K, V>),
    upsert: impl Fn(V) -> Change,
    delete: impl Fn(K) -> Change,
    out: &mut Vec<Change>,
) {
    use watcher::Event as W;
    match event {
        W::Init => kind.init(),
        W::InitApply(o) => {
            let (k, v) = conv(&o);
            kind.init_apply(k, v)
        }
        W::InitDone => {
            if let Some(buf) = kind.relist.as_mut() {
                fill(buf);
            }
            kind.init_done(upsert, delete, out);
            *synced = true;
        }
        W::Apply(o) => {
            if let (k, Some(v)) = conv(&o) {
                kind.apply(k, v, upsert, out)
            }
        }
        W::Delete(o) => kind.delete(conv(&o).0, delete, out),
    }
}

impl Mirror {
    /// Folds one watcher event into `out`.
    fn handle(&mut self, config: &Config, event: Event, out: &mut Vec<Change>) {
        let [ns_synced, pods_synced, nodes_synced, policies_synced] = &mut self.synced;
        match event {
            Event::Namespace(e) => match *e {
                Ok(e) => fold(
                    &mut self.namespaces,
                    ns_synced,
                    e,
                    |o: &ApiNamespace| {
                        let name = o.metadata.name.clone().unwrap_or_default();
                        let v = checked("Namespace", &name, Namespace::from_api(o));
                        (name, v)
                    },
                    |_| {},
                    Change::Namespace,
                    Change::NamespaceDeleted,
                    out,
                ),
                Err(e) => watch_error(KINDS[0], &e),
            },
            Event::Pod(e) => match *e {
                Ok(e) => fold(
                    &mut self.pods,
                    pods_synced,
                    e,
                    |o: &ApiPod| {
                        let key = key_of(&o.metadata);
                        let v = checked("Pod", &key.to_string(), Pod::from_api(o));
                        (key, v)
                    },
                    |_| {},
                    Change::Pod,
                    Change::PodDeleted,
                    out,
                ),
                Err(e) => watch_error(KINDS[1], &e),
            },
            Event::Node(e) => match *e {
                // This node never leaves the model: its gateway is still there.
                Ok(watcher::Event::Delete(o))
                    if o.metadata.name.as_deref() == Some(config.node_name.as_str()) =>
                {
                    self.nodes.apply(
                        config.node_name.clone(),
                        own_node(config, None),
                        Change::Node,
                        out,
                    );
                }
                Ok(e) => fold(
                    &mut self.nodes,
                    nodes_synced,
                    e,
                    |o: &ApiNode| {
                        let name = o.metadata.name.clone().unwrap_or_default();
                        // This node also carries the gateway: own-node traffic.
                        let node = checked("Node", &name, Node::from_api(o)).map(|n| {
                            if n.name == config.node_name {
                                own_node(config, Some(n))
                            } else {
                                n
                            }
                        });
                        (name, node)
                    },
                    |relisted| {
                        relisted
                            .entry(config.node_name.clone())
                            .or_insert_with(|| own_node(config, None));
                    },
                    Change::Node,
                    Change::NodeDeleted,
                    out,
                ),
                Err(e) => watch_error(KINDS[2], &e),
            },
            Event::Policy(e) => match *e {
                Ok(e) => fold(
                    &mut self.policies,
                    policies_synced,
                    e,
                    |o: &NetworkPolicy| {
                        let key = key_of(&o.metadata);
                        let v = checked("NetworkPolicy", &key.to_string(), Policy::from_api(o));
                        (key, v)
                    },
                    |_| {},
                    Change::Policy,
                    Change::PolicyDeleted,
                    out,
                ),
                Err(e) => watch_error(KINDS[3], &e),
            },
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

/// Watches the API server forever, applying changes to `realiser`; once the
/// first full sync of every kind is compiled and published, unseals the switch
/// (it forwards nothing before) and sets `ready`.
///
/// Fails only when no client can be built (bad kubeconfig); connection
/// failures are retried.
pub fn run(realiser: Arc<Realiser>, config: Config, ready: Arc<AtomicBool>) -> anyhow::Result<()> {
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
                match realiser.apply_all(changes) {
                    Ok(generation) => tracing::info!(changes = n, generation, "applied"),
                    Err(e) => tracing::error!(error = %chain(&e), "cannot install flows"),
                }
            }
            if !ready.load(Relaxed) && mirror.synced.iter().all(|s| *s) {
                match realiser.set_sealed(false) {
                    Ok(_) => {
                        ready.store(true, Relaxed);
                        tracing::info!("first full sync compiled and published: ready");
                    }
                    Err(e) => tracing::error!(error = %chain(&e), "cannot unseal"),
                }
            }
        }
        Ok(())
    })
}
