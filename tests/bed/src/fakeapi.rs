//! A fake Kubernetes API server that speaks the list/watch protocol kube-rs uses, over plain
//! HTTP/1.1 on 127.0.0.1, for testing the agent's Kubernetes source with the real client.
//!
//! Served:
//! - `GET /api/v1/<plural>`, `/apis/<group>/<version>/<plural>` and their
//!   `/namespaces/<ns>/` forms: a JSON `<Kind>List` with `metadata.resourceVersion`, paged
//!   with `limit` and `continue` (a continue token of a compacted snapshot gets 410 Expired).
//! - The same with `watch=true&resourceVersion=RV`: a chunked stream of JSON lines
//!   `{"type":"ADDED"|"MODIFIED"|"DELETED"|"BOOKMARK"|"ERROR","object":..}` with every
//!   change after RV, then the changes as they happen; `BOOKMARK`s with the current
//!   resourceVersion every [`FakeApiServer::set_bookmark_interval`] when
//!   `allowWatchBookmarks=true`; an `ERROR` event with a 410 `Expired` Status when RV is older
//!   than the last compaction; the stream ends after `timeoutSeconds`. An object that stops
//!   (starts) matching the selectors is `DELETED` (`ADDED`), as the real API server does.
//! - `labelSelector` with `key`, `!key`, `key=value`, `key==value` and `key!=value`
//!   requirements; `fieldSelector` on `metadata.name` and `metadata.namespace` with `=`, `==`
//!   and `!=`. Anything else is answered 400.
//! - `GET /version`.
//!
//! The test drives it: [`FakeApiServer::apply`] and [`FakeApiServer::delete`] change objects
//! (k8s-openapi types) with a new resourceVersion each, [`FakeApiServer::cut_connections`]
//! breaks every open connection, [`FakeApiServer::compact`] expires every resourceVersion
//! handed out so far, and [`FakeApiServer::stop`] / [`FakeApiServer::restart`] take it away
//! and bring it back on the same port, with the same objects.
//!
//! Where it listens: the agent under test runs in a network namespace whose loopback is not
//! the test process's, so the listening socket is created in that namespace
//! ([`FakeApiServer::start`] binds on a thread that entered it; the socket stays there) and
//! served from the test process. The generated kubeconfig names `http://127.0.0.1:<port>`.

use std::any::TypeId;
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::{Metadata, NamespaceResourceScope, Resource};
use serde::Serialize;
use serde_json::{Value, json};

use crate::backends::accept_until;
use crate::netns::{Netns, unique_name};

/// How often the acceptor looks at its stop flag, and watches at their deadlines.
const TICK: Duration = Duration::from_millis(100);

/// One resource type: where it is served and what its objects are.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct ResourceType {
    /// `v1` or `<group>/<version>`.
    api_version: String,
    /// The plural name in URLs, e.g. `services`.
    plural: String,
}

/// Namespace ("" for cluster-scoped objects) and name.
type ObjectKey = (String, String);

/// One change: the object before and after (`None`: did not exist / deleted).
#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    resource: ResourceType,
    old: Option<Value>,
    new: Option<Value>,
}

/// Requests served, for assertions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Requests {
    /// List requests (each page counts), by plural.
    pub lists: BTreeMap<String, usize>,
    /// Watch requests, by plural.
    pub watches: BTreeMap<String, usize>,
    /// Watches answered with 410 Expired, by plural.
    pub expired: BTreeMap<String, usize>,
    /// Bookmarks sent, by plural: each one means a watch of that resource is open and has
    /// been told the cluster's resourceVersion.
    pub bookmarks: BTreeMap<String, usize>,
    /// Every request line's target (path and query), in order.
    pub targets: Vec<String>,
}

#[derive(Debug)]
struct State {
    rv: u64,
    /// Watches from a resourceVersion below this get 410.
    compacted: u64,
    objects: BTreeMap<ResourceType, BTreeMap<ObjectKey, Value>>,
    kinds: HashMap<ResourceType, String>,
    history: Vec<Change>,
    /// Pages of lists in progress: id -> (resourceVersion, items).
    snapshots: HashMap<u64, (u64, Arc<Vec<Value>>)>,
    next_snapshot: u64,
    /// Bumped by [`FakeApiServer::cut_connections`] and stop: watches of an older epoch end.
    epoch: u64,
    bookmark_interval: Duration,
    list_delays: HashMap<String, Duration>,
    requests: Requests,
}

impl State {
    /// The objects of `resource` that the selectors (and the namespace, if any) select.
    fn matching<'a>(
        &'a self,
        resource: &ResourceType,
        selectors: &'a Selectors,
        namespace: Option<&'a str>,
    ) -> impl Iterator<Item = &'a Value> {
        self.objects
            .get(resource)
            .into_iter()
            .flat_map(|o| o.values())
            .filter(move |o| selectors.matches(o, namespace))
    }

    fn compact(&mut self) {
        self.rv += 1;
        self.compacted = self.rv;
        let compacted = self.compacted;
        self.history.retain(|c| c.rv >= compacted);
        self.snapshots.clear();
    }
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    /// Open connections (a handle to shut each down).
    connections: Mutex<Vec<TcpStream>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The fake API server; stopped, and its kubeconfig removed, on drop.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    kubeconfig: PathBuf,
    running: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
}

impl FakeApiServer {
    /// Listens on 127.0.0.1 (a free port) inside `ns`, and writes a kubeconfig for it.
    pub fn start(ns: &Netns) -> Result<Self> {
        let listener = bind_in(ns, 0)?;
        let addr = listener.local_addr()?;
        let kubeconfig = std::env::temp_dir().join(format!("{}.yaml", unique_name("kubeconfig")));
        std::fs::write(&kubeconfig, kubeconfig_yaml(addr))
            .with_context(|| format!("write {}", kubeconfig.display()))?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rv: 1,
                compacted: 0,
                objects: BTreeMap::new(),
                kinds: HashMap::new(),
                history: Vec::new(),
                snapshots: HashMap::new(),
                next_snapshot: 1,
                epoch: 0,
                bookmark_interval: Duration::from_secs(1),
                list_delays: HashMap::new(),
                requests: Requests::default(),
            }),
            changed: Condvar::new(),
            connections: Mutex::new(Vec::new()),
        });
        let mut server = FakeApiServer {
            shared,
            addr,
            kubeconfig,
            running: None,
        };
        server.serve(listener);
        Ok(server)
    }

    /// The kubeconfig file that points at this server.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// Where it listens (in the namespace it was started in).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Creates or replaces an object (namespaced objects without a namespace go to
    /// `default`); returns its new resourceVersion.
    pub fn apply<K>(&self, object: &K) -> Result<u64>
    where
        K: Resource<Scope: 'static>
            + Metadata<Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>,
        K: Serialize,
    {
        let resource = resource_type::<K>();
        let meta = object.metadata();
        let name = meta
            .name
            .clone()
            .context("the object has no metadata.name")?;
        let namespace = namespace_of::<K>(meta.namespace.as_deref());
        let mut value = serde_json::to_value(object)?;
        let mut state = self.shared.lock();
        state.rv += 1;
        let rv = state.rv;
        state.kinds.insert(resource.clone(), K::KIND.to_owned());
        let key = (namespace.clone(), name);
        let old = state
            .objects
            .get(&resource)
            .and_then(|o| o.get(&key))
            .cloned();
        let uid = old
            .as_ref()
            .and_then(|o| o.pointer("/metadata/uid").cloned())
            .unwrap_or_else(|| json!(format!("uid-{rv}")));
        let metadata = value
            .get_mut("metadata")
            .and_then(Value::as_object_mut)
            .context("the object has no metadata")?;
        metadata.insert("resourceVersion".into(), json!(rv.to_string()));
        metadata.insert("uid".into(), uid);
        if !namespace.is_empty() {
            metadata.insert("namespace".into(), json!(namespace));
        }
        state
            .objects
            .entry(resource.clone())
            .or_default()
            .insert(key, value.clone());
        state.history.push(Change {
            rv,
            resource,
            old,
            new: Some(value),
        });
        drop(state);
        self.shared.changed.notify_all();
        Ok(rv)
    }

    /// Deletes an object; whether it existed.
    pub fn delete<K: Resource<Scope: 'static>>(&self, namespace: &str, name: &str) -> bool {
        let resource = resource_type::<K>();
        let key = (namespace_of::<K>(Some(namespace)), name.to_owned());
        let mut state = self.shared.lock();
        let Some(mut old) = state
            .objects
            .get_mut(&resource)
            .and_then(|o| o.remove(&key))
        else {
            return false;
        };
        state.rv += 1;
        let rv = state.rv;
        // A deleted object carries the resourceVersion of its deletion.
        if let Some(meta) = old.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("resourceVersion".into(), json!(rv.to_string()));
        }
        state.history.push(Change {
            rv,
            resource,
            old: Some(old),
            new: None,
        });
        drop(state);
        self.shared.changed.notify_all();
        true
    }

    /// Breaks every open connection (watches included), as a network blip would.
    pub fn cut_connections(&self) {
        self.shared.lock().epoch += 1;
        self.shared.changed.notify_all();
        let connections = std::mem::take(
            &mut *self
                .shared
                .connections
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        for c in connections {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    /// Expires every resourceVersion handed out so far: a watch from any of them gets 410
    /// Expired (and the client must list again).
    pub fn compact(&self) {
        self.shared.lock().compact();
    }

    /// [`FakeApiServer::compact`] and [`FakeApiServer::cut_connections`] at once, so that no
    /// watch gets a bookmark in between: every watcher resumes with an expired
    /// resourceVersion, gets 410 and lists again.
    pub fn expire(&self) {
        {
            let mut state = self.shared.lock();
            state.epoch += 1;
            state.compact();
        }
        self.cut_connections();
    }

    /// Delays every list of `plural` (e.g. `endpointslices`) by `delay` from now on.
    pub fn set_list_delay(&self, plural: &str, delay: Duration) {
        self.shared
            .lock()
            .list_delays
            .insert(plural.to_owned(), delay);
    }

    /// How often watches with bookmarks get one (default 1 s).
    pub fn set_bookmark_interval(&self, interval: Duration) {
        self.shared.lock().bookmark_interval = interval;
    }

    /// The requests served so far.
    pub fn requests(&self) -> Requests {
        self.shared.lock().requests.clone()
    }

    /// Stops listening and breaks every connection; the objects stay.
    pub fn stop(&mut self) {
        if let Some((stop, acceptor)) = self.running.take() {
            stop.store(true, Ordering::Relaxed);
            let _ = acceptor.join();
        }
        self.cut_connections();
    }

    /// Listens again on the same port, in `ns` (the namespace it was started in).
    pub fn restart(&mut self, ns: &Netns) -> Result<()> {
        if self.running.is_some() {
            bail!("the fake API server is running");
        }
        let listener = bind_in(ns, self.addr.port())?;
        self.serve(listener);
        Ok(())
    }

    fn serve(&mut self, listener: TcpListener) {
        let stop = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let (stop, shared) = (stop.clone(), self.shared.clone());
            std::thread::spawn(move || accept_loop(&listener, &stop, &shared))
        };
        self.running = Some((stop, acceptor));
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}

fn bind_in(ns: &Netns, port: u16) -> Result<TcpListener> {
    ns.run(|| TcpListener::bind((Ipv4Addr::LOCALHOST, port)))?
        .with_context(|| format!("fake API server: bind 127.0.0.1:{port} in {}", ns.name()))
}

fn kubeconfig_yaml(addr: SocketAddr) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{addr}\n\
         users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    \
         user: fake\ncurrent-context: fake\n"
    )
}

fn resource_type<K: Resource>() -> ResourceType {
    ResourceType {
        api_version: K::API_VERSION.to_owned(),
        plural: K::URL_PATH_SEGMENT.to_owned(),
    }
}

fn namespace_of<K: Resource<Scope: 'static>>(namespace: Option<&str>) -> String {
    let namespaced = TypeId::of::<K::Scope>() == TypeId::of::<NamespaceResourceScope>();
    match namespace {
        _ if !namespaced => String::new(),
        None | Some("") => "default".to_owned(),
        Some(ns) => ns.to_owned(),
    }
}

fn accept_loop(listener: &TcpListener, stop: &AtomicBool, shared: &Arc<Shared>) {
    accept_until(listener, stop, |stream, handle| {
        shared
            .connections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(handle);
        let shared = shared.clone();
        // Watch events go out as soon as they are written, as from a real API server.
        let _ = stream.set_nodelay(true);
        std::thread::spawn(move || {
            let _ = serve_connection(&stream, &shared);
            let _ = stream.shutdown(Shutdown::Both);
        });
    });
}

/// One parsed request.
struct Request {
    path: String,
    query: HashMap<String, String>,
}

fn read_request(reader: &mut impl BufRead) -> Result<Option<Request>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        bail!("bad request line {line:?}");
    };
    let mut content_length = 0usize;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 {
            return Ok(None);
        }
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((k, v)) = header.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            content_length = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; content_length];
    reader.read_exact(&mut body)?;
    if method != "GET" {
        bail!("only GET is served, not {method}");
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let query = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    Ok(Some(Request {
        path: path.to_owned(),
        query,
    }))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok());
        match (escaped, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 3;
                continue;
            }
            (None, b'+') => out.push(b' '),
            (None, b) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn serve_connection(stream: &TcpStream, shared: &Shared) -> Result<()> {
    let mut reader = BufReader::new(stream);
    let mut writer = stream;
    while let Some(request) = read_request(&mut reader)? {
        let target = if request.query.is_empty() {
            request.path.clone()
        } else {
            let mut q: Vec<String> = request
                .query
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            q.sort();
            format!("{}?{}", request.path, q.join("&"))
        };
        shared.lock().requests.targets.push(target);
        if request.path == "/version" {
            respond(&mut writer, 200, &version())?;
            continue;
        }
        let Some((resource, namespace)) = parse_path(&request.path) else {
            respond(&mut writer, 404, &status(404, "NotFound", "no such path"))?;
            continue;
        };
        let selectors = match Selectors::parse(&request.query) {
            Ok(s) => s,
            Err(e) => {
                respond(&mut writer, 400, &status(400, "BadRequest", &e))?;
                continue;
            }
        };
        if request
            .query
            .get("watch")
            .is_some_and(|w| w == "true" || w == "1")
        {
            watch(
                &mut writer,
                shared,
                &resource,
                namespace.as_deref(),
                &selectors,
                &request,
            )?;
        } else {
            let delay = shared.lock().list_delays.get(&resource.plural).copied();
            if let Some(delay) = delay {
                std::thread::sleep(delay);
            }
            let (code, body) = list(
                shared,
                &resource,
                namespace.as_deref(),
                &selectors,
                &request,
            );
            respond(&mut writer, code, &body)?;
        }
    }
    Ok(())
}

/// `/api/v1[/namespaces/NS]/PLURAL` or `/apis/GROUP/VERSION[/namespaces/NS]/PLURAL`.
fn parse_path(path: &str) -> Option<(ResourceType, Option<String>)> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (api_version, rest) = match segments.as_slice() {
        ["api", version, rest @ ..] => ((*version).to_owned(), rest),
        ["apis", group, version, rest @ ..] => (format!("{group}/{version}"), rest),
        _ => return None,
    };
    let (namespace, plural) = match rest {
        [plural] => (None, *plural),
        ["namespaces", ns, plural] => (Some((*ns).to_owned()), *plural),
        _ => return None,
    };
    Some((
        ResourceType {
            api_version,
            plural: plural.to_owned(),
        },
        namespace,
    ))
}

/// Label and field selectors of a request.
#[derive(Debug, Default)]
struct Selectors {
    labels: Vec<Requirement>,
    fields: Vec<Requirement>,
}

#[derive(Debug)]
enum Requirement {
    Exists(String),
    NotExists(String),
    Equals(String, String),
    NotEquals(String, String),
}

impl Requirement {
    fn parse(text: &str, fields: bool) -> Result<Self, String> {
        let text = text.trim();
        if let Some((k, v)) = text.split_once("!=") {
            return Ok(Requirement::NotEquals(k.trim().into(), v.trim().into()));
        }
        if let Some((k, v)) = text.split_once("==").or_else(|| text.split_once('=')) {
            return Ok(Requirement::Equals(k.trim().into(), v.trim().into()));
        }
        if fields {
            return Err(format!(
                "field selector {text:?}: only =, == and != are served"
            ));
        }
        if text.contains(' ') || text.contains('(') {
            return Err(format!(
                "label selector {text:?}: set-based requirements are not served"
            ));
        }
        match text.strip_prefix('!') {
            Some(k) => Ok(Requirement::NotExists(k.into())),
            None => Ok(Requirement::Exists(text.into())),
        }
    }

    fn matches(&self, value: impl Fn(&str) -> Option<String>) -> bool {
        match self {
            Requirement::Exists(k) => value(k).is_some(),
            Requirement::NotExists(k) => value(k).is_none(),
            Requirement::Equals(k, v) => value(k).as_deref() == Some(v),
            Requirement::NotEquals(k, v) => value(k).as_deref() != Some(v),
        }
    }
}

impl Selectors {
    fn parse(query: &HashMap<String, String>) -> Result<Self, String> {
        let split = |key: &str, fields: bool| -> Result<Vec<Requirement>, String> {
            query
                .get(key)
                .map(|s| {
                    s.split(',')
                        .filter(|r| !r.trim().is_empty())
                        .map(|r| Requirement::parse(r, fields))
                        .collect()
                })
                .unwrap_or(Ok(Vec::new()))
        };
        let selectors = Selectors {
            labels: split("labelSelector", false)?,
            fields: split("fieldSelector", true)?,
        };
        for f in &selectors.fields {
            let (Requirement::Equals(k, _) | Requirement::NotEquals(k, _)) = f else {
                continue;
            };
            if k != "metadata.name" && k != "metadata.namespace" {
                return Err(format!("field {k:?} is not served"));
            }
        }
        Ok(selectors)
    }

    fn matches(&self, object: &Value, namespace: Option<&str>) -> bool {
        if let Some(ns) = namespace
            && object
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                != Some(ns)
        {
            return false;
        }
        let label = |k: &str| {
            object
                .pointer("/metadata/labels")
                .and_then(|l| l.get(k))
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        let field = |k: &str| {
            let pointer = format!("/{}", k.replace('.', "/"));
            Some(
                object
                    .pointer(&pointer)
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned(),
            )
        };
        self.labels.iter().all(|r| r.matches(label)) && self.fields.iter().all(|r| r.matches(field))
    }
}

fn list(
    shared: &Shared,
    resource: &ResourceType,
    namespace: Option<&str>,
    selectors: &Selectors,
    request: &Request,
) -> (u16, Value) {
    let mut state = shared.lock();
    *state
        .requests
        .lists
        .entry(resource.plural.clone())
        .or_default() += 1;
    // A continue token is `snap-<snapshot id>-<offset>`.
    let token = request.query.get("continue").filter(|c| !c.is_empty());
    let (id, rv, items, offset) = match token {
        Some(token) => {
            let parsed = token
                .strip_prefix("snap-")
                .and_then(|t| t.split_once('-'))
                .and_then(|(id, off)| Some((id.parse::<u64>().ok()?, off.parse::<usize>().ok()?)));
            match parsed.and_then(|(id, off)| Some((id, state.snapshots.get(&id)?, off))) {
                Some((id, (rv, items), off)) => (Some(id), *rv, items.clone(), off),
                None => {
                    return (
                        410,
                        status(410, "Expired", "the provided continue parameter is too old"),
                    );
                }
            }
        }
        None => {
            let items: Vec<Value> = state
                .matching(resource, selectors, namespace)
                .cloned()
                .collect();
            (None, state.rv, Arc::new(items), 0)
        }
    };
    let limit = request
        .query
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|&l| l > 0)
        .unwrap_or(usize::MAX);
    let end = offset.saturating_add(limit).min(items.len());
    let page: Vec<Value> = items.get(offset..end).unwrap_or_default().to_vec();
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if end < items.len() {
        let id = id.unwrap_or_else(|| {
            let id = state.next_snapshot;
            state.next_snapshot += 1;
            state.snapshots.insert(id, (rv, items.clone()));
            id
        });
        metadata["continue"] = json!(format!("snap-{id}-{end}"));
        metadata["remainingItemCount"] = json!(items.len() - end);
    }
    let kind = state
        .kinds
        .get(resource)
        .cloned()
        .unwrap_or_else(|| "Unknown".into());
    (
        200,
        json!({
            "apiVersion": resource.api_version,
            "kind": format!("{kind}List"),
            "metadata": metadata,
            "items": page,
        }),
    )
}

/// The watch event of `change` for a watcher with these selectors, if it sees one.
fn event_for(change: &Change, selectors: &Selectors, namespace: Option<&str>) -> Option<Value> {
    let old = change
        .old
        .as_ref()
        .filter(|o| selectors.matches(o, namespace));
    let new = change.new.as_ref();
    let new_matches = new.filter(|o| selectors.matches(o, namespace));
    let (kind, object) = match (old, new, new_matches) {
        (Some(_), Some(_), Some(n)) => ("MODIFIED", n),
        (None, Some(_), Some(n)) => ("ADDED", n),
        (Some(_), Some(n), None) => ("DELETED", n),
        (Some(o), None, _) => ("DELETED", o),
        _ => return None,
    };
    let mut object = object.clone();
    object["metadata"]["resourceVersion"] = json!(change.rv.to_string());
    Some(json!({"type": kind, "object": object}))
}

fn watch(
    writer: &mut &TcpStream,
    shared: &Shared,
    resource: &ResourceType,
    namespace: Option<&str>,
    selectors: &Selectors,
    request: &Request,
) -> Result<()> {
    let bookmarks = request
        .query
        .get("allowWatchBookmarks")
        .is_some_and(|b| b == "true");
    let deadline = request
        .query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(|t| Instant::now() + Duration::from_secs(t));
    let from = request
        .query
        .get("resourceVersion")
        .cloned()
        .unwrap_or_default();
    write!(
        writer,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )?;
    let (mut seen, epoch, kind) = {
        let mut state = shared.lock();
        *state
            .requests
            .watches
            .entry(resource.plural.clone())
            .or_default() += 1;
        let kind = state
            .kinds
            .get(resource)
            .cloned()
            .unwrap_or_else(|| "Unknown".into());
        match from.parse::<u64>() {
            Ok(rv) if rv > 0 && rv < state.compacted => {
                *state
                    .requests
                    .expired
                    .entry(resource.plural.clone())
                    .or_default() += 1;
                let message = format!("too old resource version: {rv} ({})", state.compacted);
                drop(state);
                let event = json!({"type": "ERROR", "object": status(410, "Expired", &message)});
                write_chunk(writer, &event)?;
                return end_chunks(writer);
            }
            Ok(rv) if rv > 0 => (rv, state.epoch, kind),
            // "" or "0": the current objects first, as ADDED.
            _ => {
                let current: Vec<Value> = state
                    .matching(resource, selectors, namespace)
                    .map(|o| json!({"type": "ADDED", "object": o}))
                    .collect();
                let rv = state.rv;
                let epoch = state.epoch;
                drop(state);
                for event in &current {
                    write_chunk(writer, event)?;
                }
                (rv, epoch, kind)
            }
        }
    };
    let mut next_bookmark = Instant::now();
    loop {
        let (events, bookmark) = {
            let mut state = shared.lock();
            loop {
                if state.epoch != epoch {
                    // Cut: the connection is shut down under us.
                    return Ok(());
                }
                let start = state.history.partition_point(|c| c.rv <= seen);
                let pending: Vec<Value> = state.history[start..]
                    .iter()
                    .filter(|c| &c.resource == resource)
                    .filter_map(|c| event_for(c, selectors, namespace))
                    .collect();
                let last = state.history.last().map_or(seen, |c| c.rv.max(seen));
                let now = Instant::now();
                let bookmark_due = bookmarks && now >= next_bookmark;
                if !pending.is_empty() || bookmark_due || deadline.is_some_and(|d| now >= d) {
                    seen = last.max(seen);
                    let bookmark = bookmark_due.then(|| state.rv);
                    if bookmark_due {
                        next_bookmark = now + state.bookmark_interval;
                        *state
                            .requests
                            .bookmarks
                            .entry(resource.plural.clone())
                            .or_default() += 1;
                    }
                    break (pending, bookmark);
                }
                let wait = [Some(next_bookmark).filter(|_| bookmarks), deadline]
                    .into_iter()
                    .flatten()
                    .map(|t| t.saturating_duration_since(now))
                    .min()
                    .unwrap_or(TICK)
                    .min(TICK);
                state = shared
                    .changed
                    .wait_timeout(state, wait)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        };
        for event in &events {
            write_chunk(writer, event)?;
        }
        if let Some(rv) = bookmark {
            let event = json!({"type": "BOOKMARK", "object": {
                "apiVersion": resource.api_version,
                "kind": kind,
                "metadata": {"resourceVersion": rv.to_string()},
            }});
            write_chunk(writer, &event)?;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return end_chunks(writer);
        }
    }
}

/// Writes one JSON line as one chunk, in one write (no Nagle delay between its parts).
fn write_chunk(writer: &mut &TcpStream, value: &Value) -> Result<()> {
    let line = serde_json::to_vec(value)?;
    let mut chunk = format!("{:x}\r\n", line.len() + 1).into_bytes();
    chunk.extend_from_slice(&line);
    chunk.extend_from_slice(b"\n\r\n");
    writer.write_all(&chunk)?;
    writer.flush()?;
    Ok(())
}

fn end_chunks(writer: &mut &TcpStream) -> Result<()> {
    writer.write_all(b"0\r\n\r\n")?;
    writer.flush()?;
    Ok(())
}

fn respond(writer: &mut &TcpStream, code: u16, body: &Value) -> Result<()> {
    let body = serde_json::to_vec(body)?;
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        410 => "Gone",
        _ => "Error",
    };
    write!(
        writer,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )?;
    writer.write_all(&body)?;
    writer.flush()?;
    Ok(())
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn version() -> Value {
    json!({
        "major": "1",
        "minor": "34",
        "gitVersion": "v1.34.0-fake",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "go1.24",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(name: &str, labels: Value) -> Value {
        json!({"metadata": {"name": name, "namespace": "default", "labels": labels}})
    }

    fn selectors(labels: &str, fields: &str) -> Selectors {
        let query = HashMap::from([
            ("labelSelector".to_owned(), labels.to_owned()),
            ("fieldSelector".to_owned(), fields.to_owned()),
        ]);
        Selectors::parse(&query).unwrap()
    }

    #[test]
    fn selectors_match_as_the_api_server_does() {
        let proxy = selectors(
            "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless",
            "",
        );
        assert!(proxy.matches(&obj("a", json!({"app": "x"})), None));
        assert!(!proxy.matches(
            &obj("a", json!({"service.kubernetes.io/headless": ""})),
            None
        ));
        let eq = selectors("app=x,tier!=db", "metadata.name=a");
        assert!(eq.matches(&obj("a", json!({"app": "x"})), None));
        assert!(!eq.matches(&obj("b", json!({"app": "x"})), None));
        assert!(!eq.matches(&obj("a", json!({"app": "x", "tier": "db"})), None));
        assert!(!eq.matches(&obj("a", json!({"app": "x"})), Some("other")));
        let query = HashMap::from([("labelSelector".to_owned(), "app in (a,b)".to_owned())]);
        assert!(Selectors::parse(&query).is_err());
    }

    #[test]
    fn objects_leaving_a_selector_are_deleted_for_its_watchers() {
        let watcher = selectors("!skip", "");
        let change = |old: Option<Value>, new: Option<Value>| Change {
            rv: 7,
            resource: ResourceType {
                api_version: "v1".into(),
                plural: "services".into(),
            },
            old,
            new,
        };
        let kind = |c: &Change| event_for(c, &watcher, None).map(|e| e["type"].clone());
        let plain = obj("a", json!({}));
        let skipped = obj("a", json!({"skip": "yes"}));
        assert_eq!(
            kind(&change(None, Some(plain.clone()))),
            Some(json!("ADDED"))
        );
        assert_eq!(
            kind(&change(Some(plain.clone()), Some(plain.clone()))),
            Some(json!("MODIFIED"))
        );
        assert_eq!(
            kind(&change(Some(plain.clone()), Some(skipped.clone()))),
            Some(json!("DELETED"))
        );
        assert_eq!(
            kind(&change(Some(skipped.clone()), Some(plain.clone()))),
            Some(json!("ADDED"))
        );
        assert_eq!(kind(&change(Some(skipped), None)), None);
        let deleted = event_for(&change(Some(plain), None), &watcher, None).unwrap();
        assert_eq!(deleted["type"], "DELETED");
        assert_eq!(deleted["object"]["metadata"]["resourceVersion"], "7");
    }

    #[test]
    fn paths_name_the_resource_and_namespace() {
        assert_eq!(
            parse_path("/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices"),
            Some((
                ResourceType {
                    api_version: "discovery.k8s.io/v1".into(),
                    plural: "endpointslices".into()
                },
                Some("shop".into())
            ))
        );
        assert_eq!(
            parse_path("/api/v1/nodes").map(|(r, ns)| (r.plural, ns)),
            Some(("nodes".into(), None))
        );
        assert_eq!(parse_path("/healthz"), None);
        assert_eq!(
            percent_decode("metadata.name%3Dnode%2D1"),
            "metadata.name=node-1"
        );
    }
}
