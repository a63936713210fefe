//! The Kubernetes source: kube-runtime watchers on Services, EndpointSlices
//! (discovery.k8s.io/v1) and this node's Node object, each into a store of the objects'
//! models (converted as they arrive; the objects themselves are not kept).
//!
//! - Each watcher lists, then watches from the list's resourceVersion with bookmarks on;
//!   after a broken connection it resumes from the last resourceVersion it saw, and after
//!   410 Gone it lists again. Errors are retried with kube-runtime's default backoff.
//! - The store of a resource changes, as kube-runtime's reflector store does, only by complete steps: one object per watch
//!   event, and after a relist the whole store at once (at `InitDone`). So the view read from
//!   the stores is always complete; a broken watch leaves the last good view in place.
//! - Each object is converted once, as it arrives (with [`model::Service::from_k8s`] and
//!   [`model::EndpointSlice::from_k8s`]); the events say which objects changed, and only the
//!   ones whose model changed are reported. A bad object is logged by namespace and name and
//!   left out of the view; the rest is used.
//! - The first view waits for the initial lists of all three (the grace period), so Services
//!   are never programmed without their EndpointSlices. After `initial_timeout` it goes on
//!   without the Node (node addresses and zone then come from the flags or the interface),
//!   never without Services or EndpointSlices: until both are listed the pinned state stays.
//! - Events are batched: a batch takes every event that has already arrived, then waits
//!   until none came for `debounce` (0 by default: no wait), and goes out at the latest
//!   max(20 × `debounce`, 20 ms) after its first event. A burst that arrives while the agent
//!   writes the previous batch becomes one batch.
//! - While a watch fails, the source is reported down; it is reported up again when an event
//!   arrives or when the API server answers a version probe (sent once a second while down).
//! - Failed lists and watches are retried with kube-runtime's default backoff (800 ms doubling
//!   to 30 s, with jitter), cut short when the probe finds the API server answering again:
//!   after a long outage the watchers would otherwise wait out up to 30 s, then meet 410
//!   Gone and wait out up to 30 s more before they list again.
//!
//! Services and EndpointSlices are watched with kube-proxy's label selector: objects labelled
//! `service.kubernetes.io/service-proxy-name` belong to another proxy, and those labelled
//! `service.kubernetes.io/headless` get no frontends.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Debug,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use futures::{StreamExt as _, stream::BoxStream};
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{
    Api, Client, Config, ResourceExt,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{utils::Backoff as _, watcher},
};
use serde::de::DeserializeOwned;
use tracing::{debug, error, info, trace, warn};

use super::{Changes, NodeFacts, Source, sleep_until};
use crate::{
    metrics::{Metrics, ResourceLabel},
    model::{self, ClusterState, ObjectRef},
};

/// kube-proxy's label selector for Services and EndpointSlices.
pub const PROXY_LABEL_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";
/// The longest a batch of events waits for more (with a debounce of 0: under a flood of
/// events that are always ready).
const MIN_BATCH_MAX: Duration = Duration::from_millis(20);
/// The Node label with the node's zone.
pub const ZONE_LABEL: &str = model::LABEL_ZONE;

/// How the Kubernetes source connects and paces itself.
#[derive(Clone, Debug)]
pub struct KubeConfig {
    /// A kubeconfig file; `None`: the in-cluster configuration (service account).
    pub kubeconfig: Option<PathBuf>,
    /// The API server's address, in place of the kubeconfig's or the in-cluster one (see
    /// [`api_server_url`]).
    pub api_server: Option<String>,
    /// This node's name (the Node object watched).
    pub node_name: String,
    /// The longest wait for the initial lists before the first view (see the module docs).
    pub initial_timeout: Duration,
    /// The quiet time that ends a batch of events (0: take what has arrived, do not wait).
    pub debounce: Duration,
}

/// The URL of `--api-server` (`LB_API_SERVER`): `https://HOST:PORT`, or `HOST:PORT` (HTTPS
/// implied).
pub fn api_server_url(address: &str) -> anyhow::Result<http::Uri> {
    let address = address.trim();
    let url = if address.contains("://") {
        address.to_owned()
    } else {
        format!("https://{address}")
    };
    let bad = |why: &str| {
        anyhow::anyhow!(
            "--api-server (LB_API_SERVER, `api-server` in the ConfigMap lb-config) {address:?}: \
             {why}; give the API server's address, e.g. https://10.0.0.1:6443"
        )
    };
    let uri: http::Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
    match uri.scheme_str() {
        Some("https" | "http") => {}
        _ => return Err(bad("not an http(s) URL")),
    }
    let (Some(host), Some(authority)) = (uri.host().filter(|h| !h.is_empty()), uri.authority())
    else {
        return Err(bad("no host"));
    };
    // What follows the host, if anything, is `:PORT`.
    let rest = authority
        .as_str()
        .rsplit_once(host)
        .map_or("", |(_, rest)| rest);
    if !rest.is_empty()
        && rest
            .strip_prefix(':')
            .and_then(|p| p.parse::<u16>().ok())
            .is_none()
    {
        return Err(bad("not a port"));
    }
    Ok(uri)
}

/// What to say when the in-cluster address of the API server (`server`) cannot be reached.
fn in_cluster_hint(server: &str) -> String {
    format!(
        "{server} is the in-cluster address (KUBERNETES_SERVICE_HOST), the `kubernetes` \
         Service's ClusterIP, which nothing translates on a node without kube-proxy until lb \
         has programmed it: set `api-server` in the ConfigMap lb-config (the agent's \
         LB_API_SERVER, or --api-server) to the API server's real address, e.g. \
         https://10.0.0.1:6443"
    )
}

/// How often an API server that has never answered is reported in the log.
const UNREACHED_LOG_EVERY: Duration = Duration::from_secs(30);

/// Whether the API server has answered yet, and what to say while it has not.
#[derive(Debug, Default)]
struct Unreached {
    /// The API server's URL.
    server: String,
    /// Why it may not answer and what to set ([`in_cluster_hint`]), when the address is the
    /// in-cluster one.
    hint: Option<String>,
    /// It has answered (a list or a watch event arrived).
    reached: bool,
    /// When a failure to reach it was last logged.
    logged: Option<Instant>,
}

impl Unreached {
    /// The reason for a failure `e` (with the hint while the server never answered), and
    /// whether to log it now.
    fn failed(&mut self, e: &str) -> (String, bool) {
        if self.reached {
            return (e.to_owned(), false);
        }
        let reason = match &self.hint {
            Some(hint) => format!(
                "cannot reach the API server at {}: {e}; {hint}",
                self.server
            ),
            None => format!("cannot reach the API server at {}: {e}", self.server),
        };
        let log = self
            .logged
            .is_none_or(|t| t.elapsed() >= UNREACHED_LOG_EVERY);
        if log {
            self.logged = Some(Instant::now());
        }
        (reason, log)
    }
}

/// The resources watched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Services,
    EndpointSlices,
    Nodes,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Services => "services",
            Kind::EndpointSlices => "endpointslices",
            Kind::Nodes => "nodes",
        }
    }
}

/// What a watcher event means for the view.
#[derive(Debug)]
enum What {
    /// This object was applied or deleted: the store has its new state.
    Touched(ObjectRef),
    /// A (re)list started.
    Init,
    /// An object of a list arrived (the store takes the list in at `Listed`).
    Listing,
    /// The list is complete: the store holds exactly its objects.
    Listed,
    /// A list or watch failed.
    Failed(String),
}

struct Signal {
    kind: Kind,
    what: What,
}

/// The model key of an object: namespace (`default` when absent) and name.
fn key_of<K: ResourceExt>(obj: &K) -> ObjectRef {
    let namespace = obj
        .namespace()
        .unwrap_or_else(|| model::DEFAULT_NAMESPACE.into());
    ObjectRef::new(namespace, obj.name_any())
}

/// The models of one resource's objects that changed since the view last took them in,
/// converted as the objects arrive (the objects themselves are not kept: holding them, as
/// kube-runtime's reflector store does, took 170 MiB for 10,000 Services and their
/// EndpointSlices). Like the reflector's store, it changes only by complete steps: one
/// object per watch event, and a (re)list all at once at `InitDone`, so the view it updates
/// is always complete.
#[derive(Debug)]
struct Converted<M> {
    /// A complete list that arrived since the last flush: it replaces the view.
    relisted: Option<BTreeMap<ObjectRef, Result<M, String>>>,
    /// Watch events since the list (or the last flush): the new model, or why there is
    /// none; `None` for a deleted object.
    changed: BTreeMap<ObjectRef, Option<Result<M, String>>>,
    /// The list under way, from `Init` to `InitDone`.
    listing: Option<BTreeMap<ObjectRef, Result<M, String>>>,
}

impl<M> Default for Converted<M> {
    fn default() -> Self {
        Converted {
            relisted: None,
            changed: BTreeMap::new(),
            listing: None,
        }
    }
}

impl<M: PartialEq> Converted<M> {
    /// Takes in one watcher event, converting its object; what it means for the view.
    fn apply<K: ResourceExt>(
        &mut self,
        event: Result<watcher::Event<K>, watcher::Error>,
        convert: impl Fn(&K) -> Result<M, String>,
    ) -> What {
        match event {
            Ok(watcher::Event::Apply(obj)) => {
                let key = key_of(&obj);
                self.changed.insert(key.clone(), Some(convert(&obj)));
                What::Touched(key)
            }
            Ok(watcher::Event::Delete(obj)) => {
                let key = key_of(&obj);
                self.changed.insert(key.clone(), None);
                What::Touched(key)
            }
            Ok(watcher::Event::Init) => {
                self.listing = Some(BTreeMap::new());
                What::Init
            }
            Ok(watcher::Event::InitApply(obj)) => {
                if let Some(listing) = &mut self.listing {
                    listing.insert(key_of(&obj), convert(&obj));
                }
                What::Listing
            }
            Ok(watcher::Event::InitDone) => {
                if let Some(listing) = self.listing.take() {
                    // Newer than every event before it.
                    self.relisted = Some(listing);
                    self.changed.clear();
                }
                What::Listed
            }
            Err(e) => What::Failed(error_chain(&e)),
        }
    }

    /// Moves what changed into `view`; returns the keys whose model changed. Objects that
    /// could not be converted are logged (`what` names their kind) and left out.
    fn flush(&mut self, view: &mut BTreeMap<ObjectRef, M>, what: &str) -> BTreeSet<ObjectRef> {
        let relisted = self.relisted.take();
        // The objects a new list no longer has.
        let gone: Vec<ObjectRef> = relisted.as_ref().map_or_else(Vec::new, |list| {
            view.keys()
                .filter(|k| !list.contains_key(*k))
                .cloned()
                .collect()
        });
        let mut changed = BTreeSet::new();
        let mut update = |key: ObjectRef, new: Option<Result<M, String>>| {
            let new = match new {
                Some(Ok(m)) => Some(m),
                Some(Err(e)) => {
                    error!("{what} {key}: {e}; left out");
                    None
                }
                None => None,
            };
            if view.get(&key) != new.as_ref() {
                match new {
                    Some(m) => view.insert(key.clone(), m),
                    None => view.remove(&key),
                };
                changed.insert(key);
            }
        };
        for key in gone {
            update(key, None);
        }
        for (key, new) in relisted.into_iter().flatten() {
            update(key, Some(new));
        }
        for (key, new) in std::mem::take(&mut self.changed) {
            update(key, new);
        }
        changed
    }
}

type Store<M> = Arc<std::sync::Mutex<Converted<M>>>;

fn lock<M>(store: &Store<M>) -> std::sync::MutexGuard<'_, Converted<M>> {
    // The lock is only held to apply one event or read: a panic in between leaves a
    // consistent map.
    store.lock().unwrap_or_else(|e| e.into_inner())
}

/// Watches `api` into a store of models (see [`Converted`]); the stream says what each
/// event changed. Errors are retried after a backoff that a message on `wake` cuts short.
fn watch<K, M>(
    api: Api<K>,
    config: watcher::Config,
    kind: Kind,
    wake: tokio::sync::watch::Receiver<()>,
    convert: fn(&K) -> Result<M, model::ValidationError>,
) -> (Store<M>, BoxStream<'static, Signal>)
where
    K: kube::Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    M: PartialEq + Send + 'static,
{
    let store: Store<M> = Arc::default();
    let writer = store.clone();
    let stream = with_backoff(watcher(api, config).boxed(), wake)
        .map(move |event| {
            let what = lock(&writer).apply(event, |obj| convert(obj).map_err(|e| e.to_string()));
            Signal { kind, what }
        })
        .boxed();
    (store, stream)
}

/// `stream` paused after each error for kube-runtime's default backoff (reset by every
/// item that is not an error), or until a message on `wake` (then with at most a second of
/// jitter, so that the agents of many nodes do not all list at the same instant).
fn with_backoff<T, E>(
    stream: BoxStream<'static, Result<T, E>>,
    wake: tokio::sync::watch::Receiver<()>,
) -> impl futures::Stream<Item = Result<T, E>> + Send + 'static
where
    T: Send + 'static,
    E: Send + 'static,
{
    let backoff = watcher::DefaultBackoff::default();
    futures::stream::unfold(
        (stream, backoff, None, wake),
        |(mut stream, mut backoff, pause, mut wake): (_, _, Option<Duration>, _)| async move {
            if let Some(pause) = pause {
                wake.borrow_and_update();
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    Ok(()) = wake.changed() => {
                        backoff.reset();
                        tokio::time::sleep(pause.min(jitter(Duration::from_secs(1)))).await;
                    }
                }
            }
            let item = stream.next().await?;
            let pause = match &item {
                Ok(_) => {
                    backoff.reset();
                    None
                }
                Err(_) => backoff.next(),
            };
            Some((item, (stream, backoff, pause, wake)))
        },
    )
}

/// A duration in `0..max`, different from one process (and moment) to the next.
fn jitter(max: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    let seed = u64::from(nanos) ^ u64::from(std::process::id()).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    max.mul_f64((seed % 1000) as f64 / 1000.0)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text += &format!(": {s}");
        source = s.source();
    }
    text
}

/// The objects of one resource that changed since the view was last updated from its store.
#[derive(Debug, Default)]
struct Dirty {
    /// The first complete list has arrived.
    listed: bool,
    /// Lists started (the first one is not a restart).
    lists: u64,
    keys: BTreeSet<ObjectRef>,
    /// A relist replaced the store: every object may have changed.
    all: bool,
}

impl Dirty {
    /// Takes in one event; whether it may have changed the store.
    fn note(&mut self, what: &What) -> bool {
        match what {
            What::Touched(key) => {
                self.keys.insert(key.clone());
                true
            }
            What::Init => {
                self.lists += 1;
                false
            }
            What::Listed => {
                self.listed = true;
                self.all = true;
                true
            }
            What::Listing | What::Failed(_) => false,
        }
    }

    fn is_empty(&self) -> bool {
        self.keys.is_empty() && !self.all
    }

    /// Updates `view` from `store`; returns the keys whose model changed.
    fn flush<M: PartialEq>(
        &mut self,
        store: &Store<M>,
        view: &mut BTreeMap<ObjectRef, M>,
        what: &str,
    ) -> BTreeSet<ObjectRef> {
        self.keys.clear();
        self.all = false;
        lock(store).flush(view, what)
    }
}

/// A Service as the API server sends it, with `spec.topologyKeys`, which k8s-openapi's
/// Service (of Kubernetes 1.22 and later, which removed the field) does not have: a v1.17 to
/// v1.21 API server with the feature gate ServiceTopology sends it.
#[derive(Clone, Debug)]
pub struct ServiceObject {
    /// The Service.
    pub service: core::Service,
    /// Its `spec.topologyKeys`.
    pub topology_keys: Vec<String>,
}

impl<'de> serde::Deserialize<'de> for ServiceObject {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        struct Spec {
            #[serde(rename = "topologyKeys", default)]
            topology_keys: Option<Vec<String>>,
            #[serde(flatten)]
            spec: core::ServiceSpec,
        }
        #[derive(serde::Deserialize)]
        struct Object {
            #[serde(default)]
            metadata: ObjectMeta,
            spec: Option<Spec>,
            status: Option<core::ServiceStatus>,
        }
        let object = Object::deserialize(deserializer)?;
        let (spec, topology_keys) = match object.spec {
            Some(s) => (Some(s.spec), s.topology_keys.unwrap_or_default()),
            None => (None, Vec::new()),
        };
        Ok(ServiceObject {
            service: core::Service {
                metadata: object.metadata,
                spec,
                status: object.status,
            },
            topology_keys,
        })
    }
}

impl kube::Resource for ServiceObject {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(dt: &()) -> std::borrow::Cow<'_, str> {
        core::Service::kind(dt)
    }

    fn group(dt: &()) -> std::borrow::Cow<'_, str> {
        core::Service::group(dt)
    }

    fn version(dt: &()) -> std::borrow::Cow<'_, str> {
        core::Service::version(dt)
    }

    fn plural(dt: &()) -> std::borrow::Cow<'_, str> {
        core::Service::plural(dt)
    }

    fn meta(&self) -> &ObjectMeta {
        &self.service.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.service.metadata
    }
}

/// What the Node object says about this node.
pub fn node_facts(node: &core::Node) -> NodeFacts {
    NodeFacts::from_k8s(node)
}

/// The Kubernetes API as a [`Source`].
pub struct KubeSource {
    client: Client,
    events: BoxStream<'static, Signal>,
    services: (Store<model::Service>, Dirty),
    slices: (Store<model::EndpointSlice>, Dirty),
    nodes: (Store<NodeFacts>, Dirty),
    /// What the watched Node objects say (the watch selects this node's).
    node_objects: BTreeMap<ObjectRef, NodeFacts>,
    state: ClusterState,
    node: Option<NodeFacts>,
    config: KubeConfig,
    metrics: Arc<Metrics>,
    started: Instant,
    /// A view has been handed out.
    delivered: bool,
    /// The first event not handed out yet.
    since: Option<Instant>,
    /// The last event of the current batch.
    last_event: Instant,
    /// The lists still missing when the initial timeout was last reported: reported again
    /// when that changes (lists that arrive late leave only the Nodes missing, say).
    timeout_reported: Option<Vec<&'static str>>,
    probe: tokio::time::Interval,
    /// Wakes the watchers from their backoff when the probe finds the API server back.
    wake: tokio::sync::watch::Sender<()>,
    /// Until the API server first answers: what to say when it does not.
    unreached: Unreached,
}

impl KubeSource {
    /// Connects with `config` (a kubeconfig file, or the in-cluster configuration) and
    /// starts the watches.
    pub async fn connect(config: KubeConfig, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        let api_server = config
            .api_server
            .as_deref()
            .map(api_server_url)
            .transpose()?;
        let mut client_config = match (&config.kubeconfig, &api_server) {
            (Some(path), _) => {
                let kubeconfig = Kubeconfig::read_from(path)
                    .with_context(|| format!("reading kubeconfig {}", path.display()))?;
                Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                    .await
                    .with_context(|| format!("kubeconfig {}", path.display()))?
            }
            // The service account's token and CA, without KUBERNETES_SERVICE_HOST.
            (None, Some(_)) => Config::incluster_dns().context(
                "in-cluster configuration (the service account's token and CA) for \
                 --api-server (give --kubeconfig or --manifests outside a pod)",
            )?,
            (None, None) => Config::incluster().context(
                "in-cluster configuration (give --kubeconfig or --manifests outside a pod)",
            )?,
        };
        let in_cluster_address = config.kubeconfig.is_none() && api_server.is_none();
        if let Some(url) = api_server {
            client_config.cluster_url = url;
        }
        info!(server = %client_config.cluster_url, node = %config.node_name, "Kubernetes source");
        let server = client_config.cluster_url.to_string();
        let client = Client::try_from(client_config).context("creating the Kubernetes client")?;
        let mut source = Self::with_client(client, config, metrics);
        source.unreached.hint = in_cluster_address.then(|| in_cluster_hint(&server));
        source.unreached.server = server;
        Ok(source)
    }

    /// Starts the watches with `client`.
    pub fn with_client(client: Client, config: KubeConfig, metrics: Arc<Metrics>) -> Self {
        let proxy = watcher::Config::default().labels(PROXY_LABEL_SELECTOR);
        let (wake, woken) = tokio::sync::watch::channel(());
        let (services, s) = watch(
            Api::all(client.clone()),
            proxy.clone(),
            Kind::Services,
            woken.clone(),
            |svc: &ServiceObject| {
                model::Service::from_k8s_with_topology_keys(&svc.service, &svc.topology_keys)
            },
        );
        let (slices, e) = watch(
            Api::all(client.clone()),
            proxy,
            Kind::EndpointSlices,
            woken.clone(),
            model::EndpointSlice::from_k8s,
        );
        let (nodes, n) = watch(
            Api::all(client.clone()),
            watcher::Config::default().fields(&format!("metadata.name={}", config.node_name)),
            Kind::Nodes,
            woken,
            |node: &core::Node| Ok(node_facts(node)),
        );
        metrics.connecting();
        for kind in [Kind::Services, Kind::EndpointSlices, Kind::Nodes] {
            // Every series from the start, at 0.
            let label = ResourceLabel {
                resource: kind.name(),
            };
            let _ = metrics.watch_restarts.get_or_create(&label);
            let _ = metrics.watch_errors.get_or_create(&label);
        }
        let mut probe = tokio::time::interval(Duration::from_secs(1));
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        KubeSource {
            client,
            events: futures::stream::select_all([s, e, n]).boxed(),
            services: (services, Dirty::default()),
            slices: (slices, Dirty::default()),
            nodes: (nodes, Dirty::default()),
            node_objects: BTreeMap::new(),
            state: ClusterState::default(),
            node: None,
            config,
            metrics,
            started: Instant::now(),
            delivered: false,
            since: None,
            last_event: Instant::now(),
            timeout_reported: None,
            probe,
            wake,
            unreached: Unreached::default(),
        }
    }

    fn dirty(&mut self, kind: Kind) -> &mut Dirty {
        match kind {
            Kind::Services => &mut self.services.1,
            Kind::EndpointSlices => &mut self.slices.1,
            Kind::Nodes => &mut self.nodes.1,
        }
    }

    fn handle(&mut self, signal: Signal) {
        trace!(resource = signal.kind.name(), what = ?signal.what, "event");
        let label = ResourceLabel {
            resource: signal.kind.name(),
        };
        match &signal.what {
            What::Failed(e) => {
                self.metrics.watch_errors.get_or_create(&label).inc();
                let (reason, log) = self.unreached.failed(e);
                if log {
                    error!("{}: {reason}", signal.kind.name());
                }
                self.metrics
                    .disconnected(format!("{}: {reason}", signal.kind.name()));
            }
            What::Init => {
                if self.dirty(signal.kind).lists > 0 {
                    info!(resource = signal.kind.name(), "listing again");
                    self.metrics.watch_restarts.get_or_create(&label).inc();
                }
            }
            What::Touched(_) | What::Listing | What::Listed => {
                self.unreached.reached = true;
                self.metrics.connected();
            }
        }
        if matches!(signal.what, What::Listed) {
            debug!(resource = signal.kind.name(), "listed");
        }
        if self.dirty(signal.kind).note(&signal.what) {
            let now = Instant::now();
            self.since.get_or_insert(now);
            self.last_event = now;
        }
    }

    /// The lists the first view still waits for.
    fn unlisted(&self) -> Vec<&'static str> {
        [
            (Kind::Services, &self.services.1),
            (Kind::EndpointSlices, &self.slices.1),
            (Kind::Nodes, &self.nodes.1),
        ]
        .into_iter()
        .filter(|(_, d)| !d.listed)
        .map(|(k, _)| k.name())
        .collect()
    }

    /// Whether a view may be handed out.
    fn may_deliver(&self) -> bool {
        if self.delivered {
            return true;
        }
        let unlisted = self.unlisted();
        unlisted.is_empty()
            || (unlisted == ["nodes"] && self.started.elapsed() >= self.config.initial_timeout)
    }

    /// Updates the view from the stores.
    fn flush(&mut self) -> Changes {
        let since = self.since.take().unwrap_or_else(Instant::now);
        let mut changes = Changes::none(since);
        changes.services =
            self.services
                .1
                .flush(&self.services.0, &mut self.state.services, "Service");
        changes.slices =
            self.slices
                .1
                .flush(&self.slices.0, &mut self.state.slices, "EndpointSlice");
        if !self.nodes.1.is_empty() {
            self.nodes
                .1
                .flush(&self.nodes.0, &mut self.node_objects, "Node");
            let node = self
                .node_objects
                .iter()
                .find(|(key, _)| key.name == self.config.node_name)
                .map(|(_, facts)| facts.clone());
            if node.is_none() {
                warn!(node = %self.config.node_name, "no such Node object");
            }
            changes.node = node != self.node;
            self.node = node;
        }
        changes
    }

    /// Reports the lists the first view waits for (for /readyz and, after the timeout, the
    /// log).
    fn report_waiting(&mut self) {
        let unlisted = self.unlisted();
        if unlisted.is_empty() {
            return;
        }
        self.metrics.waiting_for(format!(
            "waiting for the initial lists of {}",
            unlisted.join(", ")
        ));
        if self.started.elapsed() >= self.config.initial_timeout
            && self.timeout_reported.as_ref() != Some(&unlisted)
        {
            self.timeout_reported = Some(unlisted.clone());
            if unlisted == ["nodes"] {
                warn!(
                    "no list of Nodes after {:?}: going on with the node addresses and zone of the \
                     flags or the interface",
                    self.config.initial_timeout
                );
            } else {
                error!(
                    "no complete list of {} after {:?}; nothing is programmed (the pinned state \
                     stays) until there is",
                    unlisted.join(", "),
                    self.config.initial_timeout
                );
            }
        }
    }
}

/// Asks the API server for its version; when it answers, reports the source up and wakes
/// the watchers waiting out a backoff.
async fn probe_api_server(
    client: Client,
    metrics: Arc<Metrics>,
    wake: &tokio::sync::watch::Sender<()>,
) {
    let probe = tokio::time::timeout(Duration::from_secs(2), client.apiserver_version());
    if let Ok(Ok(_)) = probe.await {
        metrics.connected();
        wake.send_replace(());
    }
}

impl Source for KubeSource {
    async fn changed(&mut self) -> anyhow::Result<Changes> {
        let batch_max = (self.config.debounce * 20).max(MIN_BATCH_MAX);
        loop {
            self.report_waiting();
            let (flush_at, overdue) = match self.since {
                Some(first) if self.may_deliver() => (
                    Some((self.last_event + self.config.debounce).min(first + batch_max)),
                    first.elapsed() >= batch_max,
                ),
                _ => (None, false),
            };
            if !overdue {
                let timeout_at = (!self.delivered && self.timeout_reported.is_none())
                    .then(|| self.started + self.config.initial_timeout);
                let connected = self.metrics.is_connected();
                tokio::select! {
                    // Events that are already there go into this batch first.
                    biased;
                    signal = self.events.next() => {
                        match signal {
                            Some(signal) => self.handle(signal),
                            None => anyhow::bail!("the Kubernetes watches ended"),
                        }
                        continue;
                    }
                    _ = sleep_until(flush_at), if flush_at.is_some() => {}
                    _ = sleep_until(timeout_at), if timeout_at.is_some() => {
                        // The next pass reports it; a view without the Node may go out now.
                        self.since.get_or_insert_with(Instant::now);
                        continue;
                    }
                    _ = self.probe.tick(), if !connected => {
                        probe_api_server(self.client.clone(), self.metrics.clone(), &self.wake).await;
                        continue;
                    }
                }
            }
            let changes = self.flush();
            if !changes.is_empty() || !self.delivered {
                self.delivered = true;
                return Ok(changes);
            }
        }
    }

    fn state(&self) -> &ClusterState {
        &self.state
    }

    fn node(&self) -> Option<&NodeFacts> {
        self.node.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn service(name: &str, ip: &str, resource_version: &str) -> core::Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "default", "resourceVersion": resource_version},
            "spec": {"clusterIP": ip, "ports": [{"port": 80}]}
        }))
        .unwrap()
    }

    fn touched(svc: &core::Service) -> What {
        What::Touched(key_of(svc))
    }

    #[test]
    fn the_api_server_setting_is_a_url_with_https_implied() {
        for (given, url) in [
            ("https://10.0.0.1:6443", "https://10.0.0.1:6443/"),
            ("10.0.0.1:6443", "https://10.0.0.1:6443/"),
            (" api.example:443 ", "https://api.example:443/"),
            ("https://[fd00::1]:6443", "https://[fd00::1]:6443/"),
            ("http://127.0.0.1:8080", "http://127.0.0.1:8080/"),
        ] {
            assert_eq!(api_server_url(given).unwrap().to_string(), url, "{given}");
        }
        for bad in ["ftp://10.0.0.1", "https://", "10.0.0.1:port", "https://a b"] {
            let e = api_server_url(bad).unwrap_err().to_string();
            assert!(
                e.contains("LB_API_SERVER") && e.contains("lb-config"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn an_in_cluster_address_never_reached_is_reported_with_the_setting_to_make() {
        let mut unreached = Unreached {
            server: "https://10.96.0.1/".into(),
            hint: Some(in_cluster_hint("https://10.96.0.1/")),
            ..Unreached::default()
        };
        let (reason, log) = unreached.failed("No route to host");
        assert!(log);
        assert!(
            reason.starts_with("cannot reach the API server at https://10.96.0.1/: No route")
                && reason.contains("`api-server` in the ConfigMap lb-config")
                && reason.contains("LB_API_SERVER"),
            "{reason}"
        );
        // Logged again only after a while; the reason stays for /readyz.
        let (again, log) = unreached.failed("No route to host");
        assert!(!log);
        assert_eq!(again, reason);
        // Once the server has answered, a failure is an outage: no hint.
        unreached.reached = true;
        assert_eq!(
            unreached.failed("timed out"),
            ("timed out".to_owned(), false)
        );
        // A configured address gets no hint.
        let mut configured = Unreached {
            server: "https://10.0.0.1:6443/".into(),
            ..Unreached::default()
        };
        let (reason, _) = configured.failed("connection refused");
        assert_eq!(
            reason,
            "cannot reach the API server at https://10.0.0.1:6443/: connection refused"
        );
    }

    #[test]
    fn dual_stack_services_and_ipv6_slices_come_through_the_watch_and_bad_ones_stay_out() {
        let services: Store<model::Service> = Arc::default();
        let slices: Store<model::EndpointSlice> = Arc::default();
        let service = |name: &str, spec: serde_json::Value| -> core::Service {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": "default", "resourceVersion": "1"},
                "spec": spec
            }))
            .unwrap()
        };
        let slice = |name: &str,
                     family: &str,
                     ip: &str|
         -> k8s_openapi::api::discovery::v1::EndpointSlice {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": "default", "resourceVersion": "1",
                             "labels": {model::LABEL_SERVICE_NAME: "ds"}},
                "addressType": family,
                "endpoints": [{"addresses": [ip]}],
                "ports": [{"port": 80}]
            }))
            .unwrap()
        };
        for svc in [
            service(
                "ds",
                serde_json::json!({"clusterIPs": ["10.96.0.1", "fd00::1"],
                    "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack",
                    "ports": [{"port": 80}]}),
            ),
            service(
                "bad",
                serde_json::json!({"clusterIPs": ["10.96.0.2"], "ipFamilies": ["IPv6"],
                    "ports": [{"port": 80}]}),
            ),
        ] {
            lock(&services).apply(Ok(watcher::Event::Apply(svc)), |s| {
                model::Service::from_k8s(s).map_err(|e| e.to_string())
            });
        }
        for s in [
            slice("ds-v6", "IPv6", "fd00:1::1"),
            slice("ds-v4", "IPv4", "10.1.0.1"),
            slice("ds-bad", "IPv4", "fd00:1::2"),
        ] {
            lock(&slices).apply(Ok(watcher::Event::Apply(s)), |s| {
                model::EndpointSlice::from_k8s(s).map_err(|e| e.to_string())
            });
        }
        let mut state = ClusterState::default();
        let changed = Dirty::default().flush(&services, &mut state.services, "Service");
        assert_eq!(changed.len(), 1, "the bad one is logged and left out");
        Dirty::default().flush(&slices, &mut state.slices, "EndpointSlice");
        let keys: Vec<String> = state.services.keys().map(ToString::to_string).collect();
        assert_eq!(keys, ["default/ds"]);
        let keys: Vec<String> = state.slices.keys().map(ToString::to_string).collect();
        assert_eq!(keys, ["default/ds-v4", "default/ds-v6"]);
        let node = model::NodeInfo::default();
        let frontends: Vec<String> = crate::plan::translate::translate(&state, &node)
            .desired
            .frontends
            .iter()
            .map(|(f, p)| format!("{f} -> {}", p.backends[0]))
            .collect();
        assert_eq!(
            frontends,
            [
                "10.96.0.1:80/TCP -> 10.1.0.1:80",
                "[fd00::1]:80/TCP -> [fd00:1::1]:80"
            ]
        );
    }

    #[test]
    fn only_changed_models_are_reported_and_bad_objects_are_left_out() {
        let store: Store<model::Service> = Arc::default();
        // The watcher's events, as the stream of `watch` takes them in.
        let apply = |event: watcher::Event<core::Service>| {
            lock(&store).apply(Ok(event), |s| {
                model::Service::from_k8s(s).map_err(|e| e.to_string())
            })
        };
        let mut dirty = Dirty::default();
        let mut view = BTreeMap::new();
        let flush = |dirty: &mut Dirty, view: &mut BTreeMap<ObjectRef, model::Service>| {
            dirty
                .flush(&store, view, "Service")
                .into_iter()
                .map(|k| k.to_string())
                .collect::<Vec<_>>()
        };

        let (a, b) = (
            service("a", "10.96.0.1", "1"),
            service("b", "10.96.0.2", "2"),
        );
        for event in [
            watcher::Event::Init,
            watcher::Event::InitApply(a.clone()),
            watcher::Event::InitApply(b.clone()),
        ] {
            apply(event);
        }
        // Until the list is done the store (and so the view) is unchanged.
        assert!(!dirty.note(&What::Listing));
        assert!(dirty.is_empty());
        apply(watcher::Event::InitDone);
        assert!(dirty.note(&What::Listed));
        assert_eq!(flush(&mut dirty, &mut view), ["default/a", "default/b"]);
        assert!(dirty.is_empty());

        // A new resourceVersion with the same spec is no change.
        let a2 = service("a", "10.96.0.1", "3");
        apply(watcher::Event::Apply(a2.clone()));
        dirty.note(&touched(&a2));
        assert!(flush(&mut dirty, &mut view).is_empty());

        // A bad update leaves the object out (logged), the rest stays.
        let bad = service("a", "10.96.0.300", "4");
        apply(watcher::Event::Apply(bad.clone()));
        dirty.note(&touched(&bad));
        assert_eq!(flush(&mut dirty, &mut view), ["default/a"]);
        assert_eq!(
            view.keys().map(ToString::to_string).collect::<Vec<_>>(),
            ["default/b"]
        );

        // A relist without b and with a good a: both change, at InitDone only.
        let a5 = service("a", "10.96.0.5", "5");
        apply(watcher::Event::Init);
        apply(watcher::Event::InitApply(a5));
        assert!(!dirty.note(&What::Init));
        assert!(dirty.is_empty(), "nothing before the relist is complete");
        apply(watcher::Event::InitDone);
        dirty.note(&What::Listed);
        assert_eq!(flush(&mut dirty, &mut view), ["default/a", "default/b"]);
        assert_eq!(
            view.values()
                .map(|s| format!("{:?}", s.cluster_ip))
                .collect::<Vec<_>>(),
            ["Assigned(ClusterIps { v4: Some(10.96.0.5), v6: None })"]
        );
        assert_eq!(dirty.lists, 1);
    }

    #[test]
    fn a_service_s_topology_keys_come_with_it() {
        let json = serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "shop", "resourceVersion": "7"},
            "spec": {"clusterIP": "10.96.0.9", "ports": [{"name": "http", "port": 80}],
                     "topologyKeys": ["kubernetes.io/hostname", "*"], "type": "NodePort"},
            "status": {"loadBalancer": {}},
        });
        let object: ServiceObject = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(object.topology_keys, ["kubernetes.io/hostname", "*"]);
        // Everything else is the Service as k8s-openapi reads it.
        let plain: core::Service = serde_json::from_value(json).unwrap();
        assert_eq!(object.service, plain);
        let model =
            model::Service::from_k8s_with_topology_keys(&object.service, &object.topology_keys)
                .unwrap();
        assert_eq!(model.topology_keys, object.topology_keys);
        assert_eq!(model.ports[0].port, 80);

        let without: ServiceObject = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "a"}, "spec": {"ports": [{"port": 80}]},
        }))
        .unwrap();
        assert!(without.topology_keys.is_empty());
        let bare: ServiceObject =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "a"}})).unwrap();
        assert_eq!(bare.service.spec, None);
        assert_eq!(key_of(&bare), ObjectRef::new("default", "a"));
    }

    #[tokio::test]
    async fn an_https_client_builds_with_the_compiled_in_crypto_provider() {
        // As in a pod: TLS with the cluster's CA (here none: the platform verifier).
        let config = Config::new("https://10.96.0.1:443".parse().unwrap());
        assert!(Client::try_from(config).is_ok());
    }

    #[test]
    fn node_facts_take_internal_then_external_addresses_of_both_families_and_the_zone() {
        let node: core::Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n1", "labels": {ZONE_LABEL: "zone-b"}},
            "status": {"addresses": [
                {"type": "Hostname", "address": "n1"},
                {"type": "ExternalIP", "address": "203.0.113.7"},
                {"type": "InternalIP", "address": "fd00::7"},
                {"type": "InternalIP", "address": "10.0.0.7"},
                {"type": "ExternalIP", "address": "10.0.0.7"},
            ]}
        }))
        .unwrap();
        assert_eq!(
            node_facts(&node),
            NodeFacts {
                addresses: vec![
                    "fd00::7".parse::<std::net::IpAddr>().unwrap(),
                    std::net::Ipv4Addr::new(10, 0, 0, 7).into(),
                    std::net::Ipv4Addr::new(203, 0, 113, 7).into()
                ],
                zone: Some("zone-b".into()),
                labels: [(ZONE_LABEL.to_owned(), "zone-b".to_owned())].into(),
                being_deleted: false,
            }
        );
        // Being deleted, or about to be by the cluster autoscaler.
        for extra in [
            serde_json::json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}}),
            serde_json::json!({"spec": {"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]}}),
        ] {
            let mut json = serde_json::json!({"metadata": {"name": "n3"}});
            for (k, v) in extra.as_object().unwrap() {
                for (k2, v2) in v.as_object().unwrap() {
                    json[k][k2] = v2.clone();
                }
            }
            let node: core::Node = serde_json::from_value(json).unwrap();
            assert!(node_facts(&node).being_deleted, "{node:?}");
        }
        let bare = core::Node {
            metadata: ObjectMeta {
                name: Some("n2".into()),
                ..ObjectMeta::default()
            },
            ..core::Node::default()
        };
        assert_eq!(node_facts(&bare), NodeFacts::default());
    }
}
