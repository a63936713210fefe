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

/// What the control-plane benchmark runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ControlPlan {
    /// Services in the cluster.
    pub services: usize,
    /// Endpoints of each.
    pub endpoints: usize,
    /// EndpointSlice changes timed.
    pub changes: usize,
}

impl ControlPlan {
    /// The full plan, or a smaller one with `quick`.
    pub fn new(quick: bool) -> Self {
        ControlPlan {
            services: 10_000,
            endpoints: 10,
            changes: if quick { 20 } else { 100 },
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
            &["--resync-secs", "3600"],
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
}

/// VmHWM of a process, MiB.
fn peak_rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmHWM:")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .context("no VmHWM")?;
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
    Ok(SourceResult {
        source: source.name().to_owned(),
        services: plan.services,
        endpoints: plan.endpoints,
        full_sync_seconds,
        agent_sync_seconds: synced.agent_seconds,
        peak_rss_mib: peak_rss,
        peak_rss_after_changes_mib: peak_rss_mib(agent.pid())?,
        change_ms,
        change_agent_ms,
        change_timed: format!(
            "from {} to the first look at the pinned services map (every 0.1 ms) that shows the \
             Service entry with the new backend count (the last of the ordered writes)",
            source.change_event()
        ),
    })
}
