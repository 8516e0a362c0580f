//! The Kubernetes source: Namespaces, Pods, Nodes, NetworkPolicies and
//! ClusterNetworkPolicies from the API server, into the same cluster model as
//! the manifest directory; with `services = "switch"`, Services and
//! EndpointSlices too (into the realiser's Service set).
//!
//! Owns the watchers (kube-runtime: list, then watch from the list's
//! resourceVersion; relists after a dropped watch that cannot resume or a 410
//! Gone; retries with backoff while the API server is unreachable), the mirror
//! of what was last applied (so a relist becomes a diff, deletions included),
//! and readiness: ready once every kind has been listed and that state compiled
//! and published. While the API server is unreachable the last known state stays
//! in force. Objects the API server hands us that fail validation are reported
//! and their last good version stays in force.
//!
//! ClusterNetworkPolicy is a CRD (upstream's release installs it). Without it
//! the API server answers 404: that means "no admin policy", reported once,
//! and the watcher keeps trying, so installing it later takes effect. Each
//! ClusterNetworkPolicy's realisation is written to its `status.conditions`
//! (`vswitch.io/Accepted`: accepted, accepted with rules that fail closed, or
//! rejected with the reason), the same on every node.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use futures_util::{FutureExt, StreamExt, stream::BoxStream};
use k8s_openapi::api::core::v1::{
    Namespace as ApiNamespace, Node as ApiNode, Pod as ApiPod, Service as ApiService,
};
use k8s_openapi::api::discovery::v1::EndpointSlice as ApiSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::Api;
use kube::runtime::{WatchStreamExt, watcher};
use policy::cnp::ClusterPolicy;
use policy::compile::Change;
use policy::model::{Namespace, Node, ObjectKey, Pod, Policy};

use control::error_chain as chain;

use crate::config::Config;

mod client;
mod objects;

use crate::gateway::own_node;
use crate::realiser::Realiser;
use client::client;
pub use client::own_pod_cidrs;
use objects::Objects;

/// ClusterNetworkPolicy as the API server serves it. The spec stays raw JSON
/// here: [`policy::cnp::ClusterPolicy::from_value`] validates it strictly,
/// naming fields, and fails closed on peers it does not understand, which a
/// typed spec would silently drop.
#[derive(kube::CustomResource, serde::Deserialize, serde::Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "policy.networking.k8s.io",
    version = "v1alpha2",
    kind = "ClusterNetworkPolicy",
    plural = "clusternetworkpolicies",
    status = "ClusterNetworkPolicyStatus",
    schema = "disabled"
)]
pub struct ClusterNetworkPolicySpec {
    #[serde(flatten)]
    pub fields: serde_json::Map<String, serde_json::Value>,
}

/// What the switch reports on a ClusterNetworkPolicy.
#[derive(serde::Deserialize, serde::Serialize, Clone, Debug, Default, PartialEq)]
pub struct ClusterNetworkPolicyStatus {
    #[serde(default)]
    pub conditions: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
}

/// The condition type vswitchd writes.
pub const CONDITION: &str = "vswitch.io/Accepted";

/// One event from any of the watchers (boxed: API objects are large).
enum Event {
    Namespace(Box<watcher::Result<watcher::Event<ApiNamespace>>>),
    Pod(Box<watcher::Result<watcher::Event<ApiPod>>>),
    Node(Box<watcher::Result<watcher::Event<ApiNode>>>),
    Policy(Box<watcher::Result<watcher::Event<NetworkPolicy>>>),
    ClusterPolicy(Box<watcher::Result<watcher::Event<ClusterNetworkPolicy>>>),
    Service(Box<watcher::Result<watcher::Event<ApiService>>>),
    Slice(Box<watcher::Result<watcher::Event<ApiSlice>>>),
}

/// The kinds, in the order of `Mirror::synced`.
const KINDS: [&str; 5] = [
    "Namespace",
    "Pod",
    "Node",
    "NetworkPolicy",
    "ClusterNetworkPolicy",
];

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
    cluster_policies: Kind<String, ClusterPolicy>,
    synced: [bool; 5],
    /// Objects rejected now, for `flowctl dump-policies`.
    rejected: policy::status::Rejections,
    /// The status each ClusterNetworkPolicy should show: (accepted, reason,
    /// message), by name, with the generation it was computed for.
    status: BTreeMap<String, (Option<i64>, Condition)>,
    /// The CRD was missing at the last list (reported once).
    crd_missing: bool,
    /// Services and EndpointSlices (watched with `services = "switch"`).
    services: Objects<policy::services::Service>,
    slices: Objects<policy::services::Slice>,
    /// Whether they are watched.
    load_balance: bool,
    /// They changed since the realiser last got them.
    services_changed: bool,
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
    mut conv: impl FnMut(&A) -> (K, Option<V>),
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
    /// Whether every watched kind has been listed.
    fn synced(&self) -> bool {
        self.synced.iter().all(|s| *s)
            && (!self.load_balance || (self.services.synced && self.slices.synced))
    }

    /// The Service set as applied.
    fn service_set(&self) -> policy::services::Services {
        policy::services::Services {
            services: self.services.applied.clone(),
            slices: self.slices.applied.clone(),
        }
    }

    fn handle(&mut self, config: &Config, event: Event, out: &mut Vec<Change>) {
        let [
            ns_synced,
            pods_synced,
            nodes_synced,
            policies_synced,
            cluster_synced,
        ] = &mut self.synced;
        let rejected = &mut self.rejected;
        match event {
            Event::Service(e) => match *e {
                Ok(e) => {
                    self.services_changed |= self.services.event(e, |o: &ApiService| {
                        let key = key_of(&o.metadata);
                        let r = policy::services::Service::from_api(o);
                        note(rejected, "Service", &key.to_string(), r.as_ref().err());
                        let v = checked("Service", &key.to_string(), r).ok_or(());
                        (key, v)
                    })
                }
                Err(e) => watch_error("Service", &e),
            },
            Event::Slice(e) => match *e {
                Ok(e) => {
                    self.services_changed |= self.slices.event(e, |o: &ApiSlice| {
                        let key = key_of(&o.metadata);
                        let r = policy::services::Slice::from_api(o);
                        note(
                            rejected,
                            "EndpointSlice",
                            &key.to_string(),
                            r.as_ref().err(),
                        );
                        let v = checked("EndpointSlice", &key.to_string(), r)
                            .map(Some)
                            .ok_or(());
                        (key, v)
                    })
                }
                Err(e) => watch_error("EndpointSlice", &e),
            },
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
                        let r = Policy::from_api(o);
                        note(
                            rejected,
                            "NetworkPolicy",
                            &key.to_string(),
                            r.as_ref().err(),
                        );
                        let v = checked("NetworkPolicy", &key.to_string(), r);
                        (key, v)
                    },
                    |_| {},
                    Change::Policy,
                    Change::PolicyDeleted,
                    out,
                ),
                Err(e) => watch_error(KINDS[3], &e),
            },
            Event::ClusterPolicy(e) => match *e {
                Ok(e) => {
                    let status = &mut self.status;
                    if matches!(e, watcher::Event::InitDone) && self.crd_missing {
                        tracing::info!("ClusterNetworkPolicy CRD found: admin tiers enforced");
                        self.crd_missing = false;
                    }
                    if let watcher::Event::Delete(o) = &e {
                        let name = o.metadata.name.clone().unwrap_or_default();
                        status.remove(&name);
                        rejected.remove(&(policy::cnp::KIND.to_string(), name));
                    }
                    fold(
                        &mut self.cluster_policies,
                        cluster_synced,
                        e,
                        |o: &ClusterNetworkPolicy| {
                            let name = o.metadata.name.clone().unwrap_or_default();
                            let r = serde_json::to_value(o)
                                .map_err(|e| policy::error::Error::Invalid {
                                    kind: policy::cnp::KIND,
                                    object: name.clone(),
                                    source: policy::error::FieldError::new(
                                        "(object)",
                                        e.to_string(),
                                    ),
                                })
                                .and_then(|v| ClusterPolicy::from_value(&v));
                            note(rejected, policy::cnp::KIND, &name, r.as_ref().err());
                            status.insert(
                                name.clone(),
                                (o.metadata.generation, condition_for(o, r.as_ref())),
                            );
                            if let Ok(p) = &r {
                                for w in &p.warnings {
                                    tracing::warn!(object = %name, warning = %w, "ClusterNetworkPolicy: fails closed");
                                }
                            }
                            (name.clone(), checked(policy::cnp::KIND, &name, r))
                        },
                        |_| {},
                        Change::ClusterPolicy,
                        Change::ClusterPolicyDeleted,
                        out,
                    )
                }
                // No CRD: no admin policy. Whatever was applied is gone (the
                // API server deletes a CRD's objects with it); keep watching.
                Err(
                    watcher::Error::InitialListFailed(kube::Error::Api(s))
                    | watcher::Error::WatchStartFailed(kube::Error::Api(s)),
                ) if s.code == 404 => {
                    if !self.crd_missing {
                        tracing::warn!(
                            "the ClusterNetworkPolicy CRD (policy.networking.k8s.io/v1alpha2) is not installed: no admin tiers until it is (see the README)"
                        );
                        self.crd_missing = true;
                    }
                    self.cluster_policies.init();
                    self.cluster_policies.init_done(
                        Change::ClusterPolicy,
                        Change::ClusterPolicyDeleted,
                        out,
                    );
                    self.status.clear();
                    *cluster_synced = true;
                }
                Err(e) => watch_error(KINDS[4], &e),
            },
        }
    }
}

/// Records (or clears) why an object was rejected.
fn note(
    rejected: &mut policy::status::Rejections,
    kind: &str,
    name: &str,
    error: Option<&policy::error::Error>,
) {
    let key = (kind.to_string(), name.to_string());
    match error {
        Some(e) => {
            rejected.insert(key, chain(e));
        }
        None => {
            rejected.remove(&key);
        }
    }
}

/// The condition a ClusterNetworkPolicy should carry after validation.
fn condition_for(
    o: &ClusterNetworkPolicy,
    r: Result<&ClusterPolicy, &policy::error::Error>,
) -> Condition {
    let (status, reason, message) = match r {
        Ok(p) if p.staged => (
            "True",
            "Staged",
            format!(
                "evaluated by vswitch on new connections, not enforced (vswitch.io/mode: audit){}",
                p.warnings
                    .iter()
                    .map(|w| format!("; {w}"))
                    .collect::<String>()
            ),
        ),
        Ok(p) if p.warnings.is_empty() => ("True", "Accepted", "enforced by vswitch".to_string()),
        Ok(p) => (
            "True",
            "FailsClosed",
            format!("enforced by vswitch; {}", p.warnings.join("; ")),
        ),
        Err(e) => (
            "False",
            "Invalid",
            format!("{} (the last good version stays in force)", chain(e)),
        ),
    };
    let previous = o
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == CONDITION));
    let since = match previous {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => {
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now())
        }
    };
    Condition {
        type_: CONDITION.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: o.metadata.generation,
        last_transition_time: since,
    }
}

/// Whether the object already shows `want` (its time aside).
fn shows(o: Option<&ClusterNetworkPolicyStatus>, want: &Condition) -> bool {
    o.and_then(|s| s.conditions.iter().find(|c| c.type_ == CONDITION))
        .is_some_and(|c| {
            c.status == want.status
                && c.reason == want.reason
                && c.message == want.message
                && c.observed_generation == want.observed_generation
        })
}

fn watch_error(kind: &str, e: &watcher::Error) {
    tracing::warn!(
        kind,
        error = %chain(e),
        "API server: watch failed; retrying with backoff, the last known state stays in force"
    );
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
        let load_balance = config.services == crate::config::ServicesMode::Switch;
        let mut streams: Vec<BoxStream<'static, Event>> = vec![
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
            watcher(Api::<NetworkPolicy>::all(client.clone()), wc.clone())
                .default_backoff()
                .map(|e| Event::Policy(Box::new(e)))
                .boxed(),
            watcher(Api::<ClusterNetworkPolicy>::all(client.clone()), wc.clone())
                .default_backoff()
                .map(|e| Event::ClusterPolicy(Box::new(e)))
                .boxed(),
        ];
        if load_balance {
            streams.push(
                watcher(Api::<ApiService>::all(client.clone()), wc.clone())
                    .default_backoff()
                    .map(|e| Event::Service(Box::new(e)))
                    .boxed(),
            );
            streams.push(
                watcher(Api::<ApiSlice>::all(client.clone()), wc)
                    .default_backoff()
                    .map(|e| Event::Slice(Box::new(e)))
                    .boxed(),
            );
        }
        let cnps = Api::<ClusterNetworkPolicy>::all(client);
        let mut events = futures_util::stream::select_all(streams);
        let mut mirror = Mirror {
            namespaces: Kind::new(),
            pods: Kind::new(),
            nodes: Kind::new(),
            policies: Kind::new(),
            cluster_policies: Kind::new(),
            synced: [false; 5],
            rejected: policy::status::Rejections::new(),
            status: BTreeMap::new(),
            crd_missing: false,
            services: Objects::new(),
            slices: Objects::new(),
            load_balance,
            services_changed: false,
        };
        // What each ClusterNetworkPolicy shows, as last seen from the API server.
        let mut shown: BTreeMap<String, Option<ClusterNetworkPolicyStatus>> = BTreeMap::new();
        let mut status_forbidden = false;
        while let Some(first) = events.next().await {
            // Take what else is already waiting, so a relist (or a burst of
            // edits) is compiled and published as one generation.
            let mut changes = Vec::new();
            let mut seen = |e: &Event| {
                if let Event::ClusterPolicy(r) = e {
                    match r.as_ref() {
                        Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                            shown.insert(o.metadata.name.clone().unwrap_or_default(), o.status.clone());
                        }
                        Ok(watcher::Event::Delete(o)) => {
                            shown.remove(o.metadata.name.as_deref().unwrap_or_default());
                        }
                        _ => {}
                    }
                }
            };
            seen(&first);
            mirror.handle(&config, first, &mut changes);
            for _ in 0..4096 {
                match events.next().now_or_never() {
                    Some(Some(e)) => {
                        seen(&e);
                        mirror.handle(&config, e, &mut changes)
                    }
                    _ => break,
                }
            }
            realiser.set_rejections("kubernetes", mirror.rejected.clone());
            if mirror.services_changed {
                mirror.services_changed = false;
                if let Err(e) = realiser.set_services(mirror.service_set()) {
                    tracing::error!(error = %chain(&e), "cannot install Service flows");
                }
            }
            if !changes.is_empty() {
                let n = changes.len();
                match realiser.apply_all(changes) {
                    Ok(generation) => tracing::info!(changes = n, generation, "applied"),
                    Err(e) => tracing::error!(error = %chain(&e), "cannot install flows"),
                }
            }
            // Status: only where the object does not show it yet (every node
            // computes the same; the write is idempotent).
            for (name, (_, want)) in &mirror.status {
                let Some(current) = shown.get(name) else {
                    continue;
                };
                if status_forbidden || shows(current.as_ref(), want) {
                    continue;
                }
                let patch = serde_json::json!({
                    "apiVersion": policy::cnp::API_VERSION,
                    "kind": policy::cnp::KIND,
                    "status": {"conditions": [want]},
                });
                let params = kube::api::PatchParams::apply("vswitchd").force();
                match cnps
                    .patch_status(name, &params, &kube::api::Patch::Apply(&patch))
                    .await
                {
                    Ok(o) => {
                        shown.insert(name.clone(), o.status);
                    }
                    Err(kube::Error::Api(s)) if s.code == 403 => {
                        tracing::warn!(
                            "not allowed to write ClusterNetworkPolicy status (RBAC: patch clusternetworkpolicies/status); realisation stays visible in flowctl dump-policies"
                        );
                        status_forbidden = true;
                    }
                    Err(e) => {
                        tracing::warn!(object = %name, error = %chain(&e), "cannot write ClusterNetworkPolicy status; retried on the next change");
                    }
                }
            }
            if !ready.load(Relaxed) && mirror.synced() {
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
