//! The agent: attaches the datapath, then keeps the maps equal to the translation of its
//! source (a folder of manifests, or the Kubernetes API) for as long as it runs.
//!
//! One loop for every source: the source hands out complete views and says which objects
//! changed ([`Source::changed`]); the [`Translator`] re-translates the Services concerned and
//! the [`Syncer`] writes the frontends whose plan changed. The first view, and a full resync
//! every `resync` (or one second after a sync with errors), translate and write everything,
//! which also repairs anything changed behind the agent's back.
//!
//! It never flushes on trouble: when the source cannot be read, the last good state stays
//! programmed until a complete new view arrives. On SIGTERM or SIGINT it exits and leaves
//! the programs and maps pinned, so traffic keeps flowing; `lb teardown` removes them.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{debug, error, info, trace, warn};

use crate::{
    datapath::{
        Capacity, Counters, Datapath, DatapathError, FrontendLabel, Names, Pins, TableFill,
        collector::DatapathCollector,
        eastwest::{PodInterfaces, SocketHooks},
        external::ExternalInterfaces,
        interface_index,
        maps::DatapathMaps,
        migrate::Migration,
        netlink::Notifications,
    },
    health::{self, ProxyHealth, ServiceHealth},
    metrics::{self, Metrics, SyncOutcome},
    model::{NodeInfo, NodeTopology, ObjectRef},
    plan::{
        desired::{Frontend, FrontendKey},
        translate::{Changed, Translator, Warning},
    },
    source::{
        Changes, NodeFacts, Source,
        kube::{KubeConfig, KubeSource},
        manifests::{ManifestsSource, allocate::Ranges},
        sleep_until,
    },
    sync::{SyncConfig, SyncError, Syncer},
};

/// The errors of one sync that are logged one by one; the rest are counted.
const LOGGED_ERRORS: usize = 10;

/// The first retry after a sync with errors; each retry that fails again doubles the wait, up
/// to the resync period.
const FIRST_RETRY: Duration = Duration::from_secs(1);

/// Where the cluster state comes from.
#[derive(Debug, Clone)]
pub enum SourceConfig {
    /// A folder of manifests, and the ranges values the Services lack come from.
    Manifests(PathBuf, Ranges),
    /// The Kubernetes API.
    Kube(KubeConfig),
}

/// How the agent is set up.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The source of the cluster state.
    pub source: SourceConfig,
    /// The node's external interfaces (`--interface`); empty: those the agent finds
    /// ([`crate::datapath::external`]).
    pub interfaces: Vec<String>,
    /// Where maps and links are pinned.
    pub pins: Pins,
    /// Node addresses for NodePort frontends; when empty, the Node's (kube source), else the
    /// external interfaces'.
    pub node_ips: Vec<IpAddr>,
    /// This node's name (for externalTrafficPolicy/internalTrafficPolicy Local).
    pub node_name: String,
    /// This node's zone and region (for topology-aware routing and `spec.topologyKeys`)
    /// over its Node object's labels.
    pub topology: NodeTopology,
    /// A full resync this often, even without a change.
    pub resync: Duration,
    /// Where /metrics, /healthz and /readyz are served.
    pub metrics_addr: SocketAddr,
    /// Where kube-proxy's proxy health server (`/healthz`, `/livez`) is served; `None`: not.
    pub healthz_addr: Option<SocketAddr>,
    /// How long an update of the source may wait to be programmed before the proxy health
    /// server reports the proxy unhealthy.
    pub health_timeout: Duration,
    /// Maglev table size, default selection and drain period.
    pub sync: SyncConfig,
    /// Map sizes, for maps that are not pinned yet.
    pub capacity: Capacity,
    /// Where the socket hooks (east-west translation at connect/sendmsg) are attached.
    pub socket_hooks: SocketHooks,
    /// Name patterns (`*`, `?`) of the pods' host-side interfaces, which get the TC program.
    pub pod_interfaces: Vec<String>,
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(config: AgentConfig) -> anyhow::Result<()> {
    // Bad arguments fail before anything is created or pinned.
    for interface in &config.interfaces {
        interface_index(interface)?;
    }
    let mut metrics = Metrics::new();
    metrics.register_collector(Box::new(DatapathCollector::new(config.pins.clone())));
    let metrics = Arc::new(metrics);
    let served = metrics::serve(config.metrics_addr, metrics.clone())
        .await
        .with_context(|| format!("serving metrics on {}", config.metrics_addr))?;
    info!(address = %served, "serving /metrics, /healthz and /readyz");
    let proxy_health = Arc::new(ProxyHealth::new(config.health_timeout));
    if let Some(addr) = config.healthz_addr {
        let served = health::serve_proxy_health(addr, proxy_health.clone())
            .await
            .with_context(|| format!("serving the proxy health check on {addr}"))?;
        info!(address = %served, "serving kube-proxy's /healthz and /livez");
    }
    let health = (metrics, proxy_health);
    match &config.source {
        SourceConfig::Manifests(dir, ranges) => {
            let source = ManifestsSource::new(
                dir,
                config.resync,
                health.0.clone(),
                ranges.clone(),
                config.node_name.clone(),
            )?;
            serve(source, &config, health).await
        }
        SourceConfig::Kube(kube) => {
            let source = KubeSource::connect(kube.clone(), health.0.clone()).await?;
            serve(source, &config, health).await
        }
    }
}

/// Attaches the datapath and keeps it equal to the translation of `source`; reports into
/// the metrics and the proxy's health.
async fn serve<S: Source>(
    mut source: S,
    config: &AgentConfig,
    (metrics, proxy_health): (Arc<Metrics>, Arc<ProxyHealth>),
) -> anyhow::Result<()> {
    // Maps of an older layout are converted into the new maps between the load and the
    // attach, and once more after it (see `migrate`).
    let mut migration =
        Migration::plan(&config.pins).context("looking for pinned maps of older versions")?;
    let mut datapath = Datapath::load_with(&config.pins, &config.capacity)?;
    for (from, to) in migration.conversions() {
        info!(from, to, "converting a pinned map of an older version");
    }
    migration.copy().context("converting pinned maps")?;
    // Adopted before the programs are attached (or replaced): adoption fills maps the new
    // programs read and the old ones did not have (the pre-filter after an upgrade).
    let maps = datapath.take_maps()?;
    let syncer = Syncer::adopt_with(maps, config.sync).context("adopting the pinned maps")?;
    // The frontends' names, for `lb services` and `lb stats`; nothing depends on them.
    let names = match Names::open_or_create(&config.pins, config.capacity.services) {
        Ok(names) => Some(names),
        Err(e) => {
            warn!("frontends will not be named for lb services: {e}");
            None
        }
    };
    // The programs of the links pinned for interfaces that are still there are replaced now;
    // the interfaces are chosen once the node's addresses are known (the first view).
    let mut externals = ExternalInterfaces::new(config.interfaces.clone());
    for (interface, program, outcome) in externals.keep_pinned(&mut datapath)? {
        info!(program, %interface, ?outcome, "attached");
    }
    for m in migration.finish().context("converting pinned maps")? {
        let c = m.copied;
        match m.to {
            Some(to) => info!(
                from = m.from,
                to,
                written = c.written,
                present = c.present,
                dropped = c.dropped,
                failed = c.failed,
                "converted; the old map is unpinned"
            ),
            None => info!(from = m.from, "not carried over; the old map is unpinned"),
        }
    }
    let cgroup = config.socket_hooks.cgroup()?;
    for (program, outcome) in datapath.attach_cgroup(cgroup.as_deref())? {
        info!(program, cgroup = %cgroup.as_deref().unwrap_or(Path::new("")).display(), ?outcome, "attached");
    }
    watch_tables(&config.pins)?;
    let pods = PodInterfaces::new(config.pod_interfaces.clone())?;
    for e in pods.attach_pods_at_start(&mut datapath) {
        warn!("{e}");
    }
    let mut notifications = Notifications::new().context("netlink notifications")?;
    let mut agent = Agent {
        syncer,
        names,
        translator: None,
        config,
        externals,
        metrics,
        orphans_logged: false,
        deprecations_logged: BTreeSet::new(),
        service_health: ServiceHealth::new(proxy_health.clone()),
        proxy_health,
    };

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut resync = tokio::time::interval(config.resync);
    resync.reset();
    // The wait before the next retry while syncs fail (a full map fails until it is made
    // larger or services go away: the retries slow down).
    let mut retry: Option<Duration> = None;
    let failed = |ok: bool, last: Option<Duration>| {
        (!ok).then(|| last.map_or(FIRST_RETRY, |d| (d * 2).min(config.resync)))
    };
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            changed = notifications.changed() => {
                changed.context("netlink notifications")?;
                for e in pods.reconcile(&mut datapath) {
                    warn!("{e}");
                }
                if agent.translator.is_some() && agent.follow_interfaces(&mut datapath, source.node()) {
                    retry = failed(agent.resync(&source), retry);
                }
            }
            changes = source.changed() => {
                let changes = changes?;
                // Before the view is translated: the node's addresses may come from the
                // interfaces chosen.
                agent.follow_interfaces(&mut datapath, source.node());
                let ok = agent.apply(&source, &changes);
                retry = failed(ok, None);
            }
            _ = resync.tick() => {
                debug!("periodic resync");
                retry = failed(agent.resync(&source), retry);
            }
            _ = tokio::time::sleep(retry.unwrap_or_default()), if retry.is_some() => {
                info!("retrying after errors");
                retry = failed(agent.resync(&source), retry);
            }
            // Removed backends are deleted by the first apply after their drain ends, and
            // orphans after their grace period.
            _ = sleep_until(agent.syncer.next_deadline()) => {
                debug!("a drain or grace period ended");
                let now = Instant::now();
                retry = failed(agent.write(Some(&BTreeSet::new()), now, now), retry);
            }
        }
    }
    info!("exiting; the datapath stays attached (`lb teardown` removes it)");
    Ok(())
}

/// How often [`watch_tables`] looks at the LRU tables the datapath fills.
const TABLE_CHECK: Duration = Duration::from_secs(10);

/// Warns, from a thread of its own (a pass over a full conntrack table takes a while), when
/// a table the datapath fills is full: the kernel then evicts its least recently used
/// entries to make room, without a trace but the counts (`lb_table_evictions_total`).
fn watch_tables(pins: &Pins) -> anyhow::Result<()> {
    let counters = Counters::open_pinned(pins)?;
    let read = move || -> Result<Vec<TableFill>, DatapathError> {
        counters.tables(&counters.conntrack()?)
    };
    let mut last: BTreeMap<&'static str, u64> =
        read()?.into_iter().map(|t| (t.map, t.evictions)).collect();
    std::thread::Builder::new()
        .name("table-watch".into())
        .spawn(move || {
            loop {
                std::thread::sleep(TABLE_CHECK);
                let tables = match read() {
                    Ok(tables) => tables,
                    Err(e) => {
                        warn!("reading the datapath's tables: {e}");
                        continue;
                    }
                };
                for t in tables {
                    let before = last.insert(t.map, t.evictions).unwrap_or(0);
                    if t.evictions > before {
                        warn!(
                            "map {} is full ({} of {} entries): {} least recently used entries \
                             evicted in {} s; raise {}",
                            t.map,
                            t.entries,
                            t.capacity,
                            t.evictions - before,
                            TABLE_CHECK.as_secs(),
                            t.flag()
                        );
                    }
                }
            }
        })?;
    Ok(())
}

/// The agent's state between views.
struct Agent<'a, M> {
    syncer: Syncer<M>,
    /// The names of the programmed frontends, when the map could be opened.
    names: Option<Names>,
    /// Created at the first view.
    translator: Option<Translator>,
    config: &'a AgentConfig,
    externals: ExternalInterfaces,
    metrics: Arc<Metrics>,
    /// Whether the orphans kept at the first view have been logged.
    orphans_logged: bool,
    /// The deprecated annotations already logged, by Service: each is logged once.
    deprecations_logged: BTreeSet<(ObjectRef, &'static str)>,
    /// kube-proxy's proxy health: told of each update and of each complete write.
    proxy_health: Arc<ProxyHealth>,
    /// The health checks of LoadBalancer Services with externalTrafficPolicy Local.
    service_health: ServiceHealth,
}

impl<M: DatapathMaps> Agent<'_, M> {
    /// The node's addresses as the flags name them, else as the source knows them; empty
    /// when neither does.
    fn known_addresses(&self, facts: Option<&NodeFacts>) -> Vec<IpAddr> {
        if !self.config.node_ips.is_empty() {
            self.config.node_ips.clone()
        } else {
            facts.map(|f| f.addresses.clone()).unwrap_or_default()
        }
    }

    /// This node: the flags first, then what the source knows, then the external
    /// interfaces.
    fn node_info(&self, facts: Option<&NodeFacts>) -> NodeInfo {
        let mut addresses = self.known_addresses(facts);
        if addresses.is_empty() {
            addresses = self.externals.addresses().to_vec();
        }
        self.proxy_health
            .set_node_eligible(!facts.is_some_and(|f| f.being_deleted));
        NodeInfo::new(
            self.config.node_name.clone(),
            addresses,
            facts,
            &self.config.topology,
        )
    }

    /// Chooses the external interfaces again for what the node's addresses now are, and
    /// attaches or detaches the programs accordingly; whether the node's addresses changed
    /// with them (when they are the interfaces' own: then the view must be translated again).
    fn follow_interfaces(&mut self, datapath: &mut Datapath, facts: Option<&NodeFacts>) -> bool {
        let known = self.known_addresses(facts);
        let (changed, errors) = self.externals.reconcile(datapath, &known);
        for e in errors {
            warn!("external interfaces: {e}");
        }
        changed && known.is_empty()
    }

    /// Applies a new view; whether everything was written.
    fn apply(&mut self, source: &impl Source, changes: &Changes) -> bool {
        let started = Instant::now();
        self.proxy_health.queued(changes.since);
        let state = source.state();
        let node = self.node_info(source.node());
        let (changed, full) = match &mut self.translator {
            None => {
                log_node(&node);
                let mut translator = Translator::new(node);
                let changed = translator.update(state, state.services.keys(), state.slices.keys());
                self.translator = Some(translator);
                (changed, true)
            }
            Some(translator) => {
                let mut changed = Changed::default();
                if translator.node() != &node {
                    log_node(&node);
                    changed = translator.set_node(state, node);
                }
                let more = translator.update(state, &changes.services, &changes.slices);
                changed.frontends.extend(more.frontends);
                changed.warnings.extend(more.warnings);
                (changed, false)
            }
        };
        self.log_warnings(&changed.warnings);
        self.write(
            Some(&changed.frontends).filter(|_| !full),
            started,
            changes.since,
        )
    }

    /// Writes everything again; whether everything was written.
    fn resync(&mut self, source: &impl Source) -> bool {
        let node = self.node_info(source.node());
        let Some(translator) = &mut self.translator else {
            return true;
        };
        if translator.node() != &node {
            log_node(&node);
            let warnings = translator.set_node(source.state(), node).warnings;
            self.log_warnings(&warnings);
        }
        let now = Instant::now();
        self.write(None, now, now)
    }

    /// Logs translation warnings; a deprecated annotation once per Service (it is reported
    /// whenever the Service is translated again).
    fn log_warnings(&mut self, warnings: &[Warning]) {
        for w in warnings {
            if let Warning::DeprecatedAnnotation {
                service,
                annotation,
            } = w
                && !self
                    .deprecations_logged
                    .insert((service.clone(), annotation.key))
            {
                continue;
            }
            warn!("{w}");
        }
    }

    /// Writes the frontends `only` (all when `None`) as the translator has them; whether
    /// every wanted frontend is programmed.
    fn write(
        &mut self,
        only: Option<&BTreeSet<Frontend>>,
        started: Instant,
        since: Instant,
    ) -> bool {
        let Some(translator) = &self.translator else {
            return true;
        };
        let desired = translator.desired();
        let report = match only {
            Some(frontends) => self
                .syncer
                .apply_changed(desired, frontends, Instant::now()),
            None => self.syncer.apply(desired),
        };
        // A full map fails every frontend that does not fit, at every retry: the first
        // errors are enough to say which map and which flag.
        for e in report.errors.iter().take(LOGGED_ERRORS) {
            error!("{e}");
        }
        if report.errors.len() > LOGGED_ERRORS {
            error!(
                "and {} more errors ({} wanted frontends not programmed)",
                report.errors.len() - LOGGED_ERRORS,
                report.unprogrammed
            );
        }
        self.metrics.synced(
            started.elapsed(),
            since.elapsed(),
            &SyncOutcome {
                frontends: report.frontends,
                backends: report.backends,
                unprogrammed: report.unprogrammed,
                failed_maps: report.errors.iter().filter_map(SyncError::map).collect(),
                first_error: report.errors.first().map(ToString::to_string),
                map_ops: report.map_ops,
                orphans: report.orphans,
            },
        );
        trace!(map_ops = report.map_ops, "written");
        if report.orphans_pruned > 0 {
            info!(
                orphans = report.orphans_pruned,
                "removed the pinned frontends that no view listed, after their grace period"
            );
        }
        if report.orphans > 0 && !self.orphans_logged {
            self.orphans_logged = true;
            warn!(
                orphans = report.orphans,
                grace = ?self.config.sync.orphan_grace,
                "pinned frontends the first complete view lacks: kept for the grace period"
            );
        }
        let summary = (report.map_ops, report.errors.len());
        if only.is_none() || summary != (0, 0) {
            info!(
                frontends = report.frontends,
                backends = report.backends,
                map_ops = report.map_ops,
                errors = report.errors.len(),
                elapsed = ?started.elapsed(),
                "synced"
            );
        }
        self.service_health
            .sync(translator.health_checks(), &translator.node().addresses);
        if let Some(names) = &mut self.names {
            // Every programmed frontend: as the desired state names it, an orphan as it was.
            // After an update, only the frontends it changed (unless orphans went).
            let label = |key: &FrontendKey, names: &Names| {
                let plan = Frontend::from_key(key).and_then(|f| desired.frontends.get(&f));
                match plan {
                    Some(plan) => Some(FrontendLabel {
                        service: plan.service.to_string(),
                        kind: Some(plan.kind),
                    }),
                    None => names.written().get(key).cloned(),
                }
            };
            match only.filter(|_| report.orphans_pruned == 0) {
                Some(frontends) => {
                    for frontend in frontends {
                        let key = frontend.key();
                        let wanted = self
                            .syncer
                            .is_programmed(&key)
                            .then(|| label(&key, names))
                            .flatten();
                        names.set(key, wanted);
                    }
                }
                None => {
                    let wanted = self
                        .syncer
                        .service_ids()
                        .filter_map(|(key, _)| Some((key, label(&key, names)?)))
                        .collect();
                    names.sync(&wanted);
                }
            }
        }
        // Frontends that did not fit are retried (a full map may have room again).
        let complete = report.errors.is_empty() && report.unprogrammed == 0;
        if complete {
            self.proxy_health.updated();
        }
        complete
    }
}

fn log_node(node: &NodeInfo) {
    if node.addresses.is_empty() {
        warn!(node = %node.name, "no node address: NodePort frontends get none");
    }
    info!(node = %node.name, addresses = ?node.addresses, zone = ?node.zone, "node");
}

/// Default node name: the host name.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: buf is writable for its length.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } != 0 {
        return "localhost".to_owned();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}
