//! A small Kubernetes API server for tests: the real list/watch protocol for
//! Namespaces, Pods, Nodes, NetworkPolicies, Services, EndpointSlices and
//! ClusterNetworkPolicies (a CRD: 404 until installed), and status patches,
//! over plain HTTP/1.1.
//!
//! Lists are JSON `…List` objects with `metadata.resourceVersion`; `?watch=1`
//! streams `ADDED`/`MODIFIED`/`DELETED`/`BOOKMARK` events (chunked, one JSON
//! object per line) from the requested resourceVersion. The test can drop every
//! open watch, compact the history (a watch from before it gets an `ERROR`
//! event with a 410 Gone status, forcing a relist, as the real server does), and
//! take the server down (connections refused) and up again.

#![allow(dead_code)] // each test binary uses a different part

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Namespace,
    Pod,
    Node,
    NetworkPolicy,
    ClusterNetworkPolicy,
    Service,
    EndpointSlice,
}

impl Kind {
    fn of_path(path: &str) -> Option<Kind> {
        match path {
            "/api/v1/namespaces" => Some(Kind::Namespace),
            "/api/v1/pods" => Some(Kind::Pod),
            "/api/v1/nodes" => Some(Kind::Node),
            "/apis/networking.k8s.io/v1/networkpolicies" => Some(Kind::NetworkPolicy),
            "/apis/policy.networking.k8s.io/v1alpha2/clusternetworkpolicies" => {
                Some(Kind::ClusterNetworkPolicy)
            }
            "/api/v1/services" => Some(Kind::Service),
            "/apis/discovery.k8s.io/v1/endpointslices" => Some(Kind::EndpointSlice),
            _ => None,
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::NetworkPolicy => "networking.k8s.io/v1",
            Kind::ClusterNetworkPolicy => "policy.networking.k8s.io/v1alpha2",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            _ => "v1",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Pod => "Pod",
            Kind::Node => "Node",
            Kind::NetworkPolicy => "NetworkPolicy",
            Kind::ClusterNetworkPolicy => "ClusterNetworkPolicy",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
        }
    }
}

#[derive(Default)]
struct State {
    rv: u64,
    objects: BTreeMap<(Kind, String), Value>,
    /// (resourceVersion, kind, event type, object)
    events: Vec<(u64, Kind, &'static str, Value)>,
    /// Watches from before this resourceVersion get 410 Gone.
    oldest: u64,
    /// Bumped to end every open watch.
    epoch: u64,
    /// Requests served, by kind and whether a watch.
    pub lists: u64,
    pub watches: u64,
    /// Lists of these kinds are answered this much later.
    list_delay: BTreeMap<Kind, Duration>,
    /// Lists of these kinds fail (500).
    list_fail: std::collections::BTreeSet<Kind>,
    /// The ClusterNetworkPolicy CRD is not installed: its paths are 404.
    no_crd: bool,
    /// Status patches received: (object, body).
    pub status_patches: Vec<(String, Value)>,
}

/// The server; stops listening when dropped.
pub struct ApiServer {
    pub addr: SocketAddr,
    state: Arc<(Mutex<State>, Condvar)>,
    down: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        self.drop_watches();
    }
}

impl ApiServer {
    pub fn start() -> ApiServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let state: Arc<(Mutex<State>, Condvar)> = Arc::default();
        let down = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, dn, sp) = (state.clone(), down.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if sp.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                if dn.load(Ordering::SeqCst) {
                    // Unreachable: the connection is closed without an answer.
                    drop(conn);
                    continue;
                }
                let st = st.clone();
                std::thread::spawn(move || serve(conn, &st));
            }
        });
        ApiServer {
            addr,
            state,
            down,
            stop,
        }
    }

    /// A kubeconfig pointing at this server.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: 'http://{}'}}\n\
             users:\n- name: fake\n  user: {{token: test}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: fake}}\n\
             current-context: fake\n",
            self.addr
        )
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let (m, cv) = &*self.state;
        let out = f(&mut m.lock().unwrap());
        cv.notify_all();
        out
    }

    /// Creates or replaces an object (`metadata.name`, and `metadata.namespace`
    /// for namespaced kinds, identify it).
    pub fn apply(&self, kind: Kind, mut obj: Value) {
        self.with(|s| {
            s.rv += 1;
            let rv = s.rv;
            obj["apiVersion"] = json!(kind.api_version());
            obj["kind"] = json!(kind.name());
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            let id = object_id(&obj);
            obj["metadata"]["uid"] = json!(format!("uid-{}", id.replace('/', "-")));
            // The status subresource is not written through the object, and
            // the generation counts spec changes.
            let generation = match s.objects.get(&(kind, id.clone())) {
                Some(old) => {
                    if kind == Kind::ClusterNetworkPolicy {
                        obj["status"] = old["status"].clone();
                    }
                    let g = old["metadata"]["generation"].as_i64().unwrap_or(1);
                    if old["spec"] != obj["spec"] { g + 1 } else { g }
                }
                None => 1,
            };
            obj["metadata"]["generation"] = json!(generation);
            let ty = if s.objects.contains_key(&(kind, id.clone())) {
                "MODIFIED"
            } else {
                "ADDED"
            };
            s.objects.insert((kind, id), obj.clone());
            s.events.push((rv, kind, ty, obj));
        });
    }

    /// Deletes an object by `namespace/name` (or `name`).
    pub fn delete(&self, kind: Kind, id: &str) {
        self.with(|s| {
            if let Some(mut obj) = s.objects.remove(&(kind, id.to_string())) {
                s.rv += 1;
                obj["metadata"]["resourceVersion"] = json!(s.rv.to_string());
                s.events.push((s.rv, kind, "DELETED", obj));
            }
        });
    }

    /// Ends every open watch (clients re-watch from their last resourceVersion).
    pub fn drop_watches(&self) {
        self.with(|s| s.epoch += 1);
    }

    /// Forgets the event history: a watch from an older resourceVersion gets
    /// 410 Gone and the client must relist.
    pub fn compact(&self) {
        self.with(|s| {
            s.oldest = s.rv + 1;
            s.events.clear();
        });
    }

    /// Unreachable (`true`): connections are closed unanswered, open watches end.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
        if down {
            self.drop_watches();
        }
    }

    /// Answers lists of `kind` `delay` late (zero: at once), as a slow API
    /// server does with a large collection.
    pub fn delay_lists(&self, kind: Kind, delay: Duration) {
        self.with(|s| s.list_delay.insert(kind, delay));
    }

    /// Lists of `kind` fail with 500 Internal Server Error while `fail`.
    pub fn fail_lists(&self, kind: Kind, fail: bool) {
        self.with(|s| {
            if fail {
                s.list_fail.insert(kind);
            } else {
                s.list_fail.remove(&kind);
            }
        });
    }

    /// Installs (`true`) or removes the ClusterNetworkPolicy CRD; removing it
    /// deletes its objects, as the real API server does.
    pub fn set_crd(&self, installed: bool) {
        if installed {
            self.with(|s| s.no_crd = false);
            return;
        }
        let names: Vec<String> = self.with(|s| {
            s.objects
                .keys()
                .filter(|(k, _)| *k == Kind::ClusterNetworkPolicy)
                .map(|(_, n)| n.clone())
                .collect()
        });
        for n in names {
            self.delete(Kind::ClusterNetworkPolicy, &n);
        }
        self.with(|s| s.no_crd = true);
        self.drop_watches();
    }

    /// The status patches received so far: (name, patch body).
    pub fn status_patches(&self) -> Vec<(String, Value)> {
        self.with(|s| s.status_patches.clone())
    }

    /// The stored object `id` of `kind`.
    pub fn get(&self, kind: Kind, id: &str) -> Option<Value> {
        self.with(|s| s.objects.get(&(kind, id.to_string())).cloned())
    }

    /// (lists, watches) served so far.
    pub fn requests(&self) -> (u64, u64) {
        self.with(|s| (s.lists, s.watches))
    }
}

fn object_id(obj: &Value) -> String {
    let name = obj["metadata"]["name"].as_str().unwrap_or_default();
    match obj["metadata"]["namespace"].as_str() {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_string(),
    }
}

fn serve(conn: TcpStream, state: &Arc<(Mutex<State>, Condvar)>) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    // The headers: only the body's length matters.
    let mut length = 0usize;
    loop {
        let mut h = String::new();
        match reader.read_line(&mut h) {
            Ok(0) | Err(_) => return,
            Ok(_) if h == "\r\n" => break,
            Ok(_) => {
                if let Some((k, v)) = h.split_once(':')
                    && k.eq_ignore_ascii_case("content-length")
                {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
        }
    }
    let target = line.split_whitespace().nth(1).unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let params: BTreeMap<&str, &str> = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .collect();
    let mut out = conn;
    let reply = |out: &mut TcpStream, status: &str, body: String| {
        let _ = write!(
            out,
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    };
    let not_found = || {
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}).to_string()
    };
    if path.starts_with("/apis/policy.networking.k8s.io/") && state.0.lock().unwrap().no_crd {
        reply(&mut out, "404 Not Found", not_found());
        return;
    }
    // PATCH of a status: `<collection>/<name>/status` (server-side apply of
    // `status.conditions`, merged by type).
    if line.starts_with("PATCH ")
        && let Some(rest) = path.strip_suffix("/status")
        && let Some((collection, name)) = rest.rsplit_once('/')
        && let Some(kind) = Kind::of_path(collection)
    {
        let mut body = vec![0u8; length];
        if std::io::Read::read_exact(&mut reader, &mut body).is_err() {
            return;
        }
        let patch: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let (m, cv) = &**state;
        let mut s = m.lock().unwrap();
        s.status_patches.push((name.to_string(), patch.clone()));
        let Some(mut obj) = s.objects.get(&(kind, name.to_string())).cloned() else {
            drop(s);
            reply(&mut out, "404 Not Found", not_found());
            return;
        };
        let mut conditions: Vec<Value> = obj["status"]["conditions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for c in patch["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
        {
            conditions.retain(|x| x["type"] != c["type"]);
            conditions.push(c.clone());
        }
        obj["status"] = json!({"conditions": conditions});
        s.rv += 1;
        let rv = s.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        s.objects.insert((kind, name.to_string()), obj.clone());
        s.events.push((rv, kind, "MODIFIED", obj.clone()));
        drop(s);
        cv.notify_all();
        reply(&mut out, "200 OK", obj.to_string());
        return;
    }
    // GET of one object: `<collection>/<name>`.
    if Kind::of_path(path).is_none()
        && let Some((collection, name)) = path.rsplit_once('/')
        && let Some(kind) = Kind::of_path(collection)
    {
        let found = state
            .0
            .lock()
            .unwrap()
            .objects
            .get(&(kind, name.to_string()))
            .cloned();
        let (status, body) = match found {
            Some(obj) => ("200 OK", obj.to_string()),
            None => (
                "404 Not Found",
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404,
                       "message": format!("{} {name:?} not found", kind.name())})
                .to_string(),
            ),
        };
        let _ = write!(
            out,
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        return;
    }
    let Some(kind) = Kind::of_path(path) else {
        let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}).to_string();
        let _ = write!(
            out,
            "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        return;
    };
    let watch = matches!(params.get("watch"), Some(&"true") | Some(&"1"));
    if !watch {
        let (delay, fail) = {
            let s = state.0.lock().unwrap();
            (
                s.list_delay.get(&kind).copied().unwrap_or_default(),
                s.list_fail.contains(&kind),
            )
        };
        std::thread::sleep(delay);
        if fail {
            let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "InternalError", "code": 500,
                "message": "etcdserver: request timed out"}).to_string();
            let _ = write!(
                out,
                "HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            return;
        }
        let body = {
            let mut s = state.0.lock().unwrap();
            s.lists += 1;
            let items: Vec<&Value> = s
                .objects
                .iter()
                .filter(|((k, _), _)| *k == kind)
                .map(|(_, v)| v)
                .collect();
            json!({
                "apiVersion": kind.api_version(),
                "kind": format!("{}List", kind.name()),
                "metadata": {"resourceVersion": s.rv.to_string()},
                "items": items,
            })
            .to_string()
        };
        let _ = write!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        return;
    }
    let from: u64 = params
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let timeout = params
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .map_or(Duration::from_secs(290), Duration::from_secs);
    if write!(
        out,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .is_err()
    {
        return;
    }
    let chunk = |out: &mut TcpStream, v: &Value| {
        let data = format!("{v}\n");
        write!(out, "{:x}\r\n{data}\r\n", data.len()).and_then(|_| out.flush())
    };
    let (m, cv) = &**state;
    let mut s = m.lock().unwrap();
    s.watches += 1;
    if from < s.oldest {
        let gone = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": format!("too old resource version: {from} ({})", s.oldest), "reason": "Expired", "code": 410}});
        drop(s);
        let _ = chunk(&mut out, &gone);
        let _ = write!(out, "0\r\n\r\n");
        return;
    }
    let epoch = s.epoch;
    let mut sent = from;
    let started = Instant::now();
    let mut last_bookmark = Instant::now();
    loop {
        let pending: Vec<Value> = s
            .events
            .iter()
            .filter(|(rv, k, _, _)| *rv > sent && *k == kind)
            .map(|(_, _, ty, obj)| json!({"type": ty, "object": obj}))
            .collect();
        let bookmark = last_bookmark.elapsed() > Duration::from_millis(500);
        let rv = s.rv;
        drop(s);
        for e in &pending {
            if chunk(&mut out, e).is_err() {
                return;
            }
        }
        sent = rv;
        if bookmark {
            last_bookmark = Instant::now();
            let b = json!({"type": "BOOKMARK", "object": {"apiVersion": kind.api_version(), "kind": kind.name(),
                "metadata": {"resourceVersion": rv.to_string()}}});
            if chunk(&mut out, &b).is_err() {
                return;
            }
        }
        s = m.lock().unwrap();
        if s.epoch != epoch || started.elapsed() > timeout {
            drop(s);
            let _ = write!(out, "0\r\n\r\n");
            return;
        }
        if s.rv == sent {
            s = cv.wait_timeout(s, Duration::from_millis(200)).unwrap().0;
            if s.epoch != epoch {
                drop(s);
                let _ = write!(out, "0\r\n\r\n");
                return;
            }
        }
    }
}
