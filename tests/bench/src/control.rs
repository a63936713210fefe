//! The control plane: how long the agent takes to program 10,000 Services with 10 endpoints
//! each from a cold start, how much memory it needs for that, and how long one EndpointSlice
//! change takes to reach the maps.
//!
//! Each source of cluster state the agent has is one [`Source`]; [`sources`] lists them: the
//! manifests folder, and the fake Kubernetes API server (tests/bed/src/fakeapi.rs) that `lb agent
//! --kubeconfig` watches with the real kube-rs client. Both serve the same Services and
//! EndpointSlices and apply the same changes; everything else here is shared.

use lb_userspace::datapath::Pins;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lb_userspace::datapath::BpfMaps;
use lb_userspace::datapath::maps::DatapathMaps as _;
use serde::{Deserialize, Serialize};

use super::cluster::{self, BenchService, Endpoint};
use super::stats::quantile;
use super::{ScratchDir, SyncLog};
use lb_testbed::agent::{Agent, lb_bin};
use lb_testbed::fakeapi::FakeApiServer;
use lb_testbed::topology::{NODE_IF, NODE_IP, Topology};

/// How long the agent may take for the full sync.
const SYNC_TIMEOUT: Duration = Duration::from_secs(300);
/// How long one change may take to reach the maps.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(30);
/// The pause between one change's sync and the next change.
pub const CHANGE_INTERVAL: Duration = Duration::from_millis(50);
/// The drain period of the agent the churn run goes through (`--drain-secs`): removed
/// backends are deleted this long after they left, so the end state is reached soon.
pub const CHURN_DRAIN_SECS: u64 = 2;
/// How long the maps may take to hold the last state after the churn's last change.
const CHURN_SETTLE_TIMEOUT: Duration = Duration::from_secs(120);

/// What the control-plane benchmark runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ControlPlan {
    /// Services in the cluster.
    pub services: usize,
    /// Endpoints of each.
    pub endpoints: usize,
    /// EndpointSlice changes timed.
    pub changes: usize,
    /// EndpointSlice changes of the churn run, through the API server (not timed each).
    #[serde(default)]
    pub churn: usize,
}

impl ControlPlan {
    /// The full plan, or a smaller one with `quick`.
    pub fn new(quick: bool) -> Self {
        ControlPlan {
            services: 10_000,
            endpoints: 10,
            changes: if quick { 20 } else { 100 },
            churn: if quick { 10_000 } else { 100_000 },
        }
    }
}

/// What one source measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SourceResult {
    /// The source.
    pub source: String,
    /// Services.
    pub services: usize,
    /// Endpoints each.
    pub endpoints: usize,
    /// Seconds from spawning the agent to its `synced` line for every frontend.
    pub full_sync_seconds: f64,
    /// The agent's own translate-and-write time of that sync, in seconds.
    pub agent_sync_seconds: Option<f64>,
    /// Peak resident memory of the agent after the full sync (VmHWM), MiB.
    pub peak_rss_mib: f64,
    /// Peak resident memory after the changes too, MiB.
    pub peak_rss_after_changes_mib: f64,
    /// Each change's latency to the map, milliseconds.
    pub change_ms: Vec<f64>,
    /// For each change, the translate-and-write time the agent logged, milliseconds.
    #[serde(default)]
    pub change_agent_ms: Vec<f64>,
    /// What a change's latency is timed from and to.
    pub change_timed: String,
    /// The churn run, for sources that have one.
    #[serde(default)]
    pub churn: Option<ChurnResult>,
}

/// What the churn run measured: many EndpointSlice changes over every Service, then the
/// agent's memory and the maps against the last state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChurnResult {
    /// EndpointSlice changes made.
    pub changes: usize,
    /// Seconds the source took to take them all.
    pub seconds: f64,
    /// Seconds from the last change until the maps held exactly the last state (the drain
    /// of the removed backends included).
    pub settle_seconds: f64,
    /// The agent's resident memory (VmRSS) after the first full sync, MiB.
    pub rss_after_sync_mib: f64,
    /// Its resident memory once the maps held the last state, MiB.
    pub rss_after_mib: f64,
    /// Backend entries, backend ids, service ids and Maglev tables in the maps at the end,
    /// and what the last state needs of each, as `what: found/needed`.
    pub counted: Vec<(String, usize, usize)>,
}

impl SourceResult {
    /// A percentile of the change latencies, milliseconds.
    pub fn change_quantile(&self, q: f64) -> Option<f64> {
        quantile(&self.change_ms, q)
    }
}

/// Everything the control-plane benchmark measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ControlResults {
    /// One per source.
    pub sources: Vec<SourceResult>,
    /// Sources that failed, with why.
    pub failures: Vec<(String, String)>,
}

/// A source of cluster state for the agent.
pub trait Source {
    /// Its name in the report.
    fn name(&self) -> &'static str;
    /// Makes `services` (with their EndpointSlices) available, then starts the agent on the
    /// node in `topology` reading them.
    fn start(&mut self, topology: &Topology, services: &[BenchService]) -> Result<Agent>;
    /// Replaces the endpoints of the EndpointSlice of `service` with `endpoints`; returns the
    /// moment the change became visible to the agent.
    fn set_endpoints(&mut self, service: &BenchService, endpoints: &[Endpoint]) -> Result<Instant>;
    /// What [`Source::set_endpoints`]'s moment is, for the report.
    fn change_event(&self) -> &'static str;
    /// Whether the churn run goes through this source.
    fn churns(&self) -> bool {
        false
    }
}

/// Every source the agent can read.
pub fn sources() -> Result<Vec<Box<dyn Source>>> {
    Ok(vec![
        Box::new(ManifestsSource::new()?),
        Box::new(KubeApiSource { api: None }),
    ])
}

/// The manifests folder: `services.yaml` with every Service and every EndpointSlice but the
/// measured Service's, which is alone in `measured-slice.yaml` and is rewritten on a change.
pub struct ManifestsSource {
    folder: ScratchDir,
    staging: ScratchDir,
}

impl ManifestsSource {
    /// Empty folders.
    pub fn new() -> Result<Self> {
        Ok(ManifestsSource {
            folder: ScratchDir::new("manifests")?,
            staging: ScratchDir::new("staging")?,
        })
    }

    const SLICE: &str = "measured-slice.yaml";

    /// Writes `name` in a staging folder, then renames it into the folder; returns the moment
    /// just before the rename.
    fn replace(&self, name: &str, text: &str) -> Result<Instant> {
        let staged: PathBuf = self.staging.path().join(name);
        std::fs::write(&staged, text).with_context(|| format!("write {}", staged.display()))?;
        let at = Instant::now();
        std::fs::rename(&staged, self.folder.path().join(name))
            .with_context(|| format!("rename {} into the folder", staged.display()))?;
        Ok(at)
    }
}

impl Source for ManifestsSource {
    fn name(&self) -> &'static str {
        "manifests folder"
    }

    fn start(&mut self, topology: &Topology, services: &[BenchService]) -> Result<Agent> {
        let last = services.len() - 1;
        self.replace(
            "services.yaml",
            &cluster::manifests_yaml(services, |i| i == last),
        )?;
        let measured = &services[last];
        self.replace(
            Self::SLICE,
            &cluster::slice_yaml(measured, &measured.endpoints),
        )?;
        Agent::start_with_args(
            &lb_bin(),
            &topology.node,
            self.folder.path(),
            NODE_IF,
            &["--resync-secs", "3600"],
        )
    }

    fn set_endpoints(&mut self, service: &BenchService, endpoints: &[Endpoint]) -> Result<Instant> {
        self.replace(Self::SLICE, &cluster::slice_yaml(service, endpoints))
    }

    fn change_event(&self) -> &'static str {
        "the rename(2) that replaces the EndpointSlice's file in the folder"
    }
}

/// The fake Kubernetes API server in the node's namespace, holding the Node, every Service
/// and every EndpointSlice before the agent starts; a change replaces the measured Service's
/// EndpointSlice, which the server writes to the agent's watch at once.
pub struct KubeApiSource {
    api: Option<FakeApiServer>,
}

impl KubeApiSource {
    /// The node's name.
    const NODE: &str = "bench-node";
}

impl Source for KubeApiSource {
    fn name(&self) -> &'static str {
        "Kubernetes API (fake server)"
    }

    fn start(&mut self, topology: &Topology, services: &[BenchService]) -> Result<Agent> {
        let api = FakeApiServer::start(&topology.node)?;
        api.apply(&serde_json::from_value::<k8s_openapi::api::core::v1::Node>(
            serde_json::json!({
                "metadata": {"name": Self::NODE},
                "status": {"addresses": [{"type": "InternalIP", "address": NODE_IP.to_string()}]},
            }),
        )?)?;
        for s in services {
            api.apply(&cluster::service_object(s)?)?;
            api.apply(&cluster::slice_object(s, &s.endpoints)?)?;
        }
        let agent = Agent::start_kube(
            &topology.node,
            api.kubeconfig(),
            Self::NODE,
            NODE_IF,
            &[
                "--resync-secs",
                "3600",
                "--drain-secs",
                &CHURN_DRAIN_SECS.to_string(),
            ],
        )?;
        self.api = Some(api);
        Ok(agent)
    }

    fn set_endpoints(&mut self, service: &BenchService, endpoints: &[Endpoint]) -> Result<Instant> {
        let api = self
            .api
            .as_ref()
            .context("the fake API server is not started")?;
        let slice = cluster::slice_object(service, endpoints)?;
        let at = Instant::now();
        api.apply(&slice)?;
        Ok(at)
    }

    fn change_event(&self) -> &'static str {
        "the fake API server's update of the EndpointSlice (it writes the watch event to the \
         agent's open watch at once)"
    }

    fn churns(&self) -> bool {
        true
    }
}

/// VmHWM of a process, MiB.
fn peak_rss_mib(pid: u32) -> Result<f64> {
    status_mib(pid, "VmHWM:")
}

/// A memory field of /proc/PID/status (`VmHWM:`, `VmRSS:`), MiB.
fn status_mib(pid: u32, field: &str) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
    Ok(kib / 1024.0)
}

/// Runs the control-plane benchmark for every source.
pub fn run(plan: &ControlPlan) -> Result<ControlResults> {
    let mut results = ControlResults {
        sources: Vec::new(),
        failures: Vec::new(),
    };
    for mut source in sources()? {
        let name = source.name();
        match measure(plan, source.as_mut()) {
            Ok(result) => {
                eprintln!(
                    "control: {name}: full sync {:.3} s, peak RSS {:.1} MiB, change p50 {:.1} ms p99 {:.1} ms",
                    result.full_sync_seconds,
                    result.peak_rss_mib,
                    result.change_quantile(0.5).unwrap_or(f64::NAN),
                    result.change_quantile(0.99).unwrap_or(f64::NAN),
                );
                results.sources.push(result);
            }
            Err(e) => {
                eprintln!("control: {name} FAILED: {e:#}");
                results.failures.push((name.to_owned(), format!("{e:#}")));
            }
        }
    }
    Ok(results)
}

fn measure(plan: &ControlPlan, source: &mut dyn Source) -> Result<SourceResult> {
    let topology = Topology::new(1)?;
    let mut services = cluster::services(plan.services, plan.endpoints, &[]);
    // Endpoint addresses of the measured Service: its own, like every other Service's, from
    // a pool of two more than it has, so that each change gives a set of endpoints it had
    // not had for at least two changes (not a flap back to the set before).
    let pool: Vec<Endpoint> = (0..plan.endpoints + 2)
        .map(|j| (Ipv4Addr::new(10, 250, 0, j as u8 + 1), cluster::TARGET_PORT))
        .collect();
    let last = services.len() - 1;
    services[last].endpoints = pool[..plan.endpoints].to_vec();
    let measured = services[last].clone();

    let start = Instant::now();
    let mut agent = source.start(&topology, &services)?;
    let mut log = SyncLog::default();
    let synced = log.wait(&mut agent, services.len(), SYNC_TIMEOUT)?;
    let full_sync_seconds = (synced.seen_at - start).as_secs_f64();
    let peak_rss = peak_rss_mib(agent.pid())?;
    let rss_after_sync = status_mib(agent.pid(), "VmRSS:")?;

    let maps = BpfMaps::open_pinned(&Pins::new(agent.pin_path()))?;
    let (frontend, _) = measured
        .frontends()
        .next()
        .context("the measured Service has no port")?;
    let lb_userspace::plan::desired::FrontendKey::V4(key) = frontend.key() else {
        anyhow::bail!("the measured frontend is not IPv4");
    };
    let backend_count = || -> Result<u32> {
        Ok(maps
            .services
            .get(&key, 0)
            .context("the measured frontend is not in the services map")?
            .backend_count)
    };
    anyhow::ensure!(
        backend_count()? == plan.endpoints as u32,
        "the measured Service is not fully programmed"
    );
    // The agent starts watching its folder only after its first sync: a change made before
    // then waits for the periodic resync. Give it time to set the watch up.
    std::thread::sleep(Duration::from_secs(1));
    let mut change_ms = Vec::with_capacity(plan.changes);
    let mut change_agent_ms = Vec::with_capacity(plan.changes);
    for k in 0..plan.changes {
        // Alternately one endpoint fewer and all of them, from a window that moves along
        // the pool.
        let n = if k % 2 == 0 {
            plan.endpoints - 1
        } else {
            plan.endpoints
        };
        let endpoints: Vec<Endpoint> = (0..n).map(|i| pool[(k + i) % pool.len()]).collect();
        let at = source.set_endpoints(&measured, &endpoints)?;
        services[last].endpoints.clone_from(&endpoints);
        let deadline = at + CHANGE_TIMEOUT;
        loop {
            if backend_count()? == n as u32 {
                change_ms.push(at.elapsed().as_secs_f64() * 1e3);
                break;
            }
            if Instant::now() > deadline {
                agent.ensure_running()?;
                bail!(
                    "change {k} ({n} endpoints) did not reach the map within {CHANGE_TIMEOUT:?} \
                     (backend count {}); the agent's log:\n{}",
                    backend_count()?,
                    agent.log()
                );
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        // Let the agent finish the sync (its log line) before the next change, which comes
        // a while later: a change at once after another to the same Service is a burst.
        let synced = log.wait(&mut agent, services.len(), CHANGE_TIMEOUT)?;
        change_agent_ms.extend(synced.agent_seconds.map(|s| s * 1e3));
        std::thread::sleep(CHANGE_INTERVAL);
    }
    let peak_rss_after_changes = peak_rss_mib(agent.pid())?;
    let churn = if source.churns() && plan.churn > 0 {
        let result = churn(
            plan,
            source,
            &mut agent,
            &maps,
            &mut services,
            rss_after_sync,
        )?;
        eprintln!(
            "control: {}: churn of {} changes in {:.1} s, settled in {:.1} s, RSS {:.1} -> {:.1} MiB",
            source.name(),
            result.changes,
            result.seconds,
            result.settle_seconds,
            result.rss_after_sync_mib,
            result.rss_after_mib
        );
        Some(result)
    } else {
        None
    };
    Ok(SourceResult {
        source: source.name().to_owned(),
        services: plan.services,
        endpoints: plan.endpoints,
        full_sync_seconds,
        agent_sync_seconds: synced.agent_seconds,
        peak_rss_mib: peak_rss,
        peak_rss_after_changes_mib: peak_rss_after_changes,
        change_ms,
        change_agent_ms,
        change_timed: format!(
            "from {} to the first look at the pinned services map (every 0.1 ms) that shows the \
             Service entry with the new backend count (the last of the ordered writes)",
            source.change_event()
        ),
        churn,
    })
}

/// The churn run: `plan.churn` EndpointSlice changes over every Service but the measured
/// one, each replacing, dropping or adding one endpoint (new addresses, never seen before,
/// so that backend ids are taken and freed throughout), made as fast as the source takes
/// them; then waits until the maps hold exactly the last state: every frontend's table
/// names its endpoints, no backend entry, backend id, service id or table more than it needs.
fn churn(
    plan: &ControlPlan,
    source: &mut dyn Source,
    agent: &mut Agent,
    maps: &BpfMaps,
    services: &mut [BenchService],
    rss_after_sync_mib: f64,
) -> Result<ChurnResult> {
    // Service k's changes walk the others in a stride prime to their number.
    let others = services.len() - 1;
    anyhow::ensure!(
        others > 0,
        "the churn needs a Service besides the measured one"
    );
    let start = Instant::now();
    for k in 0..plan.churn {
        let service = &mut services[(k * 7_919) % others];
        let fresh = (
            cluster::offset(Ipv4Addr::new(10, 160, 0, 0), k),
            cluster::TARGET_PORT,
        );
        let at = k / 3 % service.endpoints.len().max(1);
        match k % 3 {
            0 if service.endpoints.len() > 1 => {
                service.endpoints.remove(at);
            }
            1 if service.endpoints.len() < plan.endpoints => service.endpoints.push(fresh),
            _ if service.endpoints.is_empty() => service.endpoints.push(fresh),
            _ => service.endpoints[at] = fresh,
        }
        source.set_endpoints(service, &service.endpoints)?;
    }
    let seconds = start.elapsed().as_secs_f64();
    let last_change = Instant::now();
    let mut last_problems;
    loop {
        agent.ensure_running()?;
        let contents = maps.read_all()?;
        let (problems, counted) = against_last_state(&contents, services);
        if problems.is_empty() {
            return Ok(ChurnResult {
                changes: plan.churn,
                seconds,
                settle_seconds: last_change.elapsed().as_secs_f64(),
                rss_after_sync_mib,
                rss_after_mib: status_mib(agent.pid(), "VmRSS:")?,
                counted,
            });
        }
        last_problems = problems;
        if last_change.elapsed() > CHURN_SETTLE_TIMEOUT {
            bail!(
                "{CHURN_SETTLE_TIMEOUT:?} after the churn's last change the maps do not hold the \
                 last state: {}",
                last_problems.join("; ")
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// What in `contents` differs from what `services` need (empty: exactly what they need),
/// and the counts compared.
fn against_last_state(
    contents: &lb_userspace::datapath::maps::MapContents,
    services: &[BenchService],
) -> (Vec<String>, Vec<(String, usize, usize)>) {
    use std::collections::{BTreeSet, HashMap};
    let mut problems = Vec::new();
    let backends: HashMap<u32, std::net::SocketAddr> = (contents.backends.iter())
        .map(|(id, b)| (*id, b.addr()))
        .collect();
    let tables: HashMap<u32, &lb_userspace::datapath::maps::TableInfo> =
        contents.tables.iter().map(|(key, t)| (*key, t)).collect();
    let programmed: HashMap<_, _> = contents.services.iter().copied().collect();
    let mut needed_backends = BTreeSet::new();
    let mut service_ids = BTreeSet::new();
    for s in services {
        let want: BTreeSet<std::net::SocketAddr> = (s.endpoints.iter())
            .map(|&(ip, port)| std::net::SocketAddr::from((ip, port)))
            .collect();
        needed_backends.extend(want.iter().copied());
        for (frontend, _) in s.frontends() {
            let Some(entry) = programmed.get(&frontend.key()) else {
                problems.push(format!("{}: no service entry", s.name));
                continue;
            };
            service_ids.insert(entry.id);
            let key = lb_common::maglev::table_key(entry.id, entry.flags);
            let got: BTreeSet<std::net::SocketAddr> = (tables.get(&key))
                .map(|t| t.backends.iter())
                .into_iter()
                .flatten()
                .filter_map(|id| backends.get(id).copied())
                .collect();
            if got != want || entry.backend_count as usize != want.len() {
                problems.push(format!(
                    "{}: table {got:?} (count {}), endpoints {want:?}",
                    s.name, entry.backend_count
                ));
            }
        }
    }
    let frontends = service_ids.len();
    // A table key belongs to a live frontend: as a frontend has two keys (the table in use
    // and the one before), that also bounds them to two per frontend.
    let table_keys_ok = (contents.tables.iter())
        .all(|(key, _)| service_ids.contains(&(key & !lb_common::maglev::KEY_TABLE_B)));
    if !table_keys_ok {
        problems.push("a Maglev table of no frontend".into());
    }
    // Every needed address has its entry (the tables above name them all), so as many
    // entries as needed means no other.
    let exact = [
        ("backend entries", backends.len(), needed_backends.len()),
        ("service entries", contents.services.len(), frontends),
        ("reverse-NAT entries", contents.rev_nat.len(), frontends),
    ];
    for (what, found, needed) in exact {
        if found != needed {
            problems.push(format!("{what}: {found}, needed {needed}"));
        }
    }
    let maglev = (
        "Maglev keys (at most 2 per frontend)",
        contents.tables.len(),
        2 * frontends,
    );
    let counted = (exact.into_iter().chain([maglev]))
        .map(|(what, found, needed)| (what.to_owned(), found, needed))
        .collect();
    (problems, counted)
}
