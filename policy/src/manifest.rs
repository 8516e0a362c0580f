//! Manifests: YAML files of Namespace, Pod, Node, NetworkPolicy,
//! ClusterNetworkPolicy, Service and EndpointSlice objects.
//!
//! Owns reading a directory of manifests into validated model objects. Each file
//! may hold several documents (and `List` objects). A bad file or object is
//! reported with the file, the document, the object and the field; everything else
//! still loads. This is the only module of the crate that touches the filesystem.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{
    Namespace as ApiNamespace, Node as ApiNode, Pod as ApiPod, Service as ApiService,
};
use k8s_openapi::api::discovery::v1::EndpointSlice as ApiSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::cluster::Cluster;
use crate::cnp::{self, ClusterPolicy};
use crate::error::{Error, FieldError};
use crate::model::{Namespace, Node, Pod, Policy};
use crate::services::{Service, Services, Slice};

/// Objects loaded from manifests, and what failed.
#[derive(Debug, Default)]
pub struct Manifests {
    pub namespaces: Vec<Namespace>,
    pub pods: Vec<Pod>,
    pub nodes: Vec<Node>,
    pub policies: Vec<Policy>,
    pub cluster_policies: Vec<ClusterPolicy>,
    /// Services (those the switch load-balances) and EndpointSlices.
    pub services: Services,
    pub errors: Vec<Error>,
    /// (kind, namespace/name) -> where it was first defined, to report duplicates.
    seen: HashMap<(String, String), String>,
}

impl Manifests {
    /// Builds the cluster model.
    pub fn to_cluster(&self) -> Cluster {
        let mut c = Cluster::default();
        for n in &self.namespaces {
            c.upsert_namespace(n.clone());
        }
        for p in &self.pods {
            c.upsert_pod(p.clone());
        }
        for n in &self.nodes {
            c.upsert_node(n.clone());
        }
        for p in &self.policies {
            c.upsert_policy(p.clone());
        }
        for p in &self.cluster_policies {
            c.upsert_cluster_policy(p.clone());
        }
        c
    }
}

/// Manifest files in `dir` (recursively), sorted: `*.yaml`, `*.yml`, `*.json`.
///
/// Fails when `dir` cannot be read.
pub fn files(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).map_err(|source| Error::Read {
            path: d.clone(),
            source,
        })?;
        for e in entries {
            let e = e.map_err(|source| Error::Read {
                path: d.clone(),
                source,
            })?;
            let path = e.path();
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with('.') {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
            } else if name.ends_with(".yaml") || name.ends_with(".yml") || name.ends_with(".json") {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Loads every manifest under `dir` (or the single file `dir`).
///
/// Fails only when the path cannot be read at all; per-file and per-object
/// problems are collected in [`Manifests::errors`].
pub fn load(dir: &Path) -> Result<Manifests, Error> {
    let mut m = Manifests::default();
    let paths = if dir.is_file() {
        vec![dir.to_path_buf()]
    } else {
        files(dir)?
    };
    for path in paths {
        match std::fs::read_to_string(&path) {
            Ok(text) => load_str(&mut m, &path, &text),
            Err(source) => m.errors.push(Error::Read { path, source }),
        }
    }
    Ok(m)
}

/// Loads the documents of one file's text into `m`.
pub fn load_str(m: &mut Manifests, path: &Path, text: &str) {
    let docs: Vec<Value> = match serde_saphyr::from_multiple(text) {
        Ok(d) => d,
        Err(source) => {
            m.errors.push(Error::Yaml {
                path: path.to_path_buf(),
                source: Box::new(source),
            });
            return;
        }
    };
    for (i, doc) in docs.into_iter().enumerate() {
        load_value(m, path, i + 1, doc);
    }
}

fn load_value(m: &mut Manifests, path: &Path, index: usize, doc: Value) {
    let doc_err = |message: String| Error::Document {
        path: path.to_path_buf(),
        index,
        message,
    };
    if doc.is_null() {
        return;
    }
    let Some(kind) = doc.get("kind").and_then(Value::as_str).map(str::to_string) else {
        m.errors.push(doc_err("has no `kind`".into()));
        return;
    };
    let in_file = |e: Error| Error::InFile {
        path: path.to_path_buf(),
        index,
        source: Box::new(e),
    };
    let meta = |key: &str| {
        doc.pointer(&format!("/metadata/{key}"))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let object = match (meta("namespace"), meta("name")) {
        (_, None) => "(unnamed)".to_string(),
        (Some(ns), Some(n)) => format!("{ns}/{n}"),
        (None, Some(n)) if matches!(kind.as_str(), "Namespace" | "Node" | cnp::KIND) => n,
        (None, Some(n)) => format!("default/{n}"),
    };
    let here = format!("{}:{index}", path.display());
    let mut first_time = |kind: &str, object: &str| -> Result<(), Error> {
        match m.seen.get(&(kind.to_string(), object.to_string())) {
            Some(first) => Err(Error::Invalid {
                kind: static_kind(kind),
                object: object.to_string(),
                source: FieldError::new(
                    "metadata.name",
                    format!("duplicate: already defined at {first}"),
                ),
            }),
            None => {
                m.seen
                    .insert((kind.to_string(), object.to_string()), here.clone());
                Ok(())
            }
        }
    };
    let result: Result<(), Error> = match kind.as_str() {
        "List"
        | "NamespaceList"
        | "PodList"
        | "NodeList"
        | "NetworkPolicyList"
        | "ServiceList"
        | "EndpointSliceList"
        | "ClusterNetworkPolicyList" => {
            let items = doc
                .get("items")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            for item in items {
                load_value(m, path, index, item);
            }
            Ok(())
        }
        "Namespace" => typed::<ApiNamespace>(&kind, &object, &doc)
            .and_then(|o| Namespace::from_api(&o))
            .and_then(|n| first_time(&kind, &object).map(|_| m.namespaces.push(n))),
        "Pod" => typed::<ApiPod>(&kind, &object, &doc)
            .and_then(|o| Pod::from_api(&o))
            .and_then(|p| first_time(&kind, &object).map(|_| m.pods.push(p))),
        "Node" => typed::<ApiNode>(&kind, &object, &doc)
            .and_then(|o| Node::from_api(&o))
            .and_then(|n| first_time(&kind, &object).map(|_| m.nodes.push(n))),
        "NetworkPolicy" => typed::<NetworkPolicy>(&kind, &object, &doc)
            .and_then(|o| Policy::from_api(&o))
            .and_then(|p| first_time(&kind, &object).map(|_| m.policies.push(p))),
        "Service" => typed::<ApiService>(&kind, &object, &doc)
            .and_then(|o| Service::from_api(&o))
            .and_then(|s| {
                first_time(&kind, &object).map(|_| {
                    if let Some(s) = s {
                        m.services.upsert_service(s);
                    }
                })
            }),
        "EndpointSlice" => typed::<ApiSlice>(&kind, &object, &doc)
            .and_then(|o| Slice::from_api(&o))
            .and_then(|s| first_time(&kind, &object).map(|_| m.services.upsert_slice(s))),
        cnp::KIND => check_api_version(&doc, cnp::API_VERSION)
            .map_err(|source| Error::Invalid {
                kind: cnp::KIND,
                object: object.clone(),
                source,
            })
            .and_then(|_| ClusterPolicy::from_value(&doc))
            .and_then(|p| first_time(&kind, &object).map(|_| m.cluster_policies.push(p))),
        other => Err(doc_err(format!(
            "unsupported kind {other:?} ({object}); expected Namespace, Pod, Node, NetworkPolicy, ClusterNetworkPolicy, Service or EndpointSlice"
        ))),
    };
    if let Err(e) = result {
        m.errors.push(match e {
            e @ Error::Document { .. } => e,
            e => in_file(e),
        });
    }
}

/// A ClusterNetworkPolicy of another API version may mean something else:
/// rejected rather than guessed at (AdminNetworkPolicy's v1alpha1 is a
/// different API).
fn check_api_version(doc: &Value, want: &str) -> Result<(), FieldError> {
    match doc.get("apiVersion").and_then(Value::as_str) {
        Some(v) if v == want => Ok(()),
        Some(v) => Err(FieldError::new(
            "apiVersion",
            format!("{v:?} is not supported: this switch reads {want}"),
        )),
        None => Err(FieldError::new(
            "apiVersion",
            format!("is required ({want})"),
        )),
    }
}

fn static_kind(kind: &str) -> &'static str {
    match kind {
        "Namespace" => "Namespace",
        "Pod" => "Pod",
        "Node" => "Node",
        "Service" => "Service",
        "EndpointSlice" => "EndpointSlice",
        cnp::KIND => cnp::KIND,
        _ => "NetworkPolicy",
    }
}

/// Deserializes into an API type, naming the field that does not fit. A field
/// the API type does not have is an error too, as kubectl's strict field
/// validation makes it: a misspelled `podSelectr` would otherwise be dropped
/// and the policy would select every pod of its namespace.
fn typed<T: DeserializeOwned + serde::Serialize>(
    kind: &str,
    object: &str,
    v: &Value,
) -> Result<T, Error> {
    let invalid = |path: String, message: String| Error::Invalid {
        kind: static_kind(kind),
        object: object.to_string(),
        source: FieldError::new(
            if path == "." || path.is_empty() {
                "(document)".into()
            } else {
                path
            },
            message,
        ),
    };
    let typed: T = serde_path_to_error::deserialize(v)
        .map_err(|e| invalid(e.path().to_string(), e.inner().to_string()))?;
    let known = serde_json::to_value(&typed).unwrap_or(Value::Null);
    if let Some(path) = crate::strict::unknown_field(v, &known, String::new()) {
        return Err(invalid(
            path,
            "unknown field (is it misspelled?): the object is rejected rather than read without it"
                .into(),
        ));
    }
    Ok(typed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &str) -> Manifests {
        let mut m = Manifests::default();
        load_str(&mut m, Path::new("test.yaml"), text);
        m
    }

    #[test]
    fn a_misspelled_field_rejects_the_object_instead_of_widening_it() {
        for (text, field) in [
            (
                "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelectr: {matchLabels: {app: db}}\n  policyTypes: [Ingress]\n",
                "spec.podSelectr",
            ),
            (
                "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabel: {app: db}}\n  policyTypes: [Ingress]\n",
                "spec.podSelector.matchLabel",
            ),
            (
                "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {}\n  ingress: [{from: [{podSelector: {}}], prots: [{port: 80}]}]\n",
                "spec.ingress[0].prots",
            ),
            (
                "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: x, lables: {app: db}}\n",
                "metadata.lables",
            ),
        ] {
            let m = load_text(text);
            assert!(
                m.policies.is_empty() && m.pods.is_empty(),
                "{field}: not loaded"
            );
            let e = chain(&m.errors[0]);
            assert!(
                e.contains("test.yaml") && e.contains("document 1") && e.contains(field),
                "{e}"
            );
        }
        // Every field the API has is fine, nulls included.
        let m = load_text(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x, labels: null, annotations: {a: b}}\nspec:\n  podSelector: {matchLabels: {app: db}, matchExpressions: []}\n  policyTypes: [Ingress, Egress]\n  ingress: [{from: [{namespaceSelector: {}, podSelector: {matchLabels: {a: b}}}, {ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}}], ports: [{protocol: TCP, port: 80, endPort: 90}, {port: http}]}]\n  egress: [{}]\n",
        );
        assert!(m.errors.is_empty(), "{:?}", m.errors);
        assert_eq!(m.policies.len(), 1);
    }

    fn chain(e: &Error) -> String {
        let mut out = e.to_string();
        let mut src = std::error::Error::source(e);
        while let Some(s) = src {
            out.push_str(": ");
            out.push_str(&s.to_string());
            src = s.source();
        }
        out
    }

    #[test]
    fn multi_document_and_errors_name_file_object_field() {
        let m = load_text(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: x, labels: {team: a}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x, labels: {pod: a}}\n\
             spec: {nodeName: n1, containers: [{name: c, ports: [{name: http, containerPort: 80}]}]}\n\
             status: {podIP: 10.0.0.1}\n---\n\
             apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: bad, namespace: x}\n\
             spec: {podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/16]}}]}]}\n---\n\
             apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: typo, namespace: x}\n\
             spec: {podSelector: {}, ingress: [{ports: [{port: [1]}]}]}\n---\n\
             apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: s}\n",
        );
        assert_eq!(m.namespaces.len(), 1);
        assert_eq!(
            m.namespaces[0]
                .labels
                .get("kubernetes.io/metadata.name")
                .unwrap(),
            "x"
        );
        assert_eq!(m.pods.len(), 1);
        assert_eq!(m.pods[0].resolve("http", crate::Protocol::Tcp), Some(80));
        assert_eq!(m.errors.len(), 3, "{:#?}", m.errors);
        let e0 = chain(&m.errors[0]);
        assert!(e0.contains("test.yaml: document 3"), "{e0}");
        assert!(e0.contains("NetworkPolicy x/bad"), "{e0}");
        assert!(
            e0.contains("spec.ingress[0].from[0].ipBlock.except[0]"),
            "{e0}"
        );
        let e1 = chain(&m.errors[1]);
        assert!(e1.contains("spec.ingress[0].ports[0].port"), "{e1}");
        assert!(chain(&m.errors[2]).contains("unsupported kind \"Deployment\""));
    }

    #[test]
    fn malformed_yaml_and_duplicates() {
        let m = load_text("kind: Namespace\nmetadata: {name: [unclosed\n");
        assert!(matches!(m.errors[0], Error::Yaml { .. }));
        let m = load_text(
            "kind: Namespace\nmetadata: {name: x}\n---\nkind: Namespace\nmetadata: {name: x}\n",
        );
        assert_eq!(m.namespaces.len(), 1);
        assert!(chain(&m.errors[0]).contains("duplicate: already defined at test.yaml:1"));
    }
}
