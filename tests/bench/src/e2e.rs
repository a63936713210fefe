//! End to end: real TCP connections from the client namespace through the node to pods, with
//! N Services programmed by each mode on the same topology:
//!
//! - `lb`: this datapath, the real `lb agent` on the node with a manifests folder;
//! - `iptables`: kube-proxy's iptables-mode rules, loaded with `iptables-restore`;
//! - `nftables`: kube-proxy's nftables-mode rules, loaded with `nft -f`.
//!
//! The measured Service is the last one kube-proxy matches (the last rule of KUBE-SERVICES);
//! its 10 endpoints are the 10 pods, each serving HTTP on port 8080 from a pool of threads.
//! Each mode gets its own copy of the topology at each N, so nothing (conntrack entries,
//! rules, pinned maps) carries over from one measurement to another, and the modes are
//! measured in turns (see [`run`]) so that they share the machine's background load.

use std::fs::File;
use std::net::{SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde::{Deserialize, Serialize};

use super::cluster::{self, BenchService, TARGET_PORT};
use super::kubeproxy;
use super::load::{self, Rate};
use super::server::PooledHttpServer;
use super::stats::quantile;
use super::{ScratchDir, SyncLog};
use lb_testbed::agent::{Agent, lb_bin};
use lb_testbed::netns::Netns;
use lb_testbed::topology::{NODE_IF, Topology};

/// How long the agent may take to program the Services.
const PROGRAM_TIMEOUT: Duration = Duration::from_secs(120);

/// What the end-to-end benchmark runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct E2ePlan {
    /// Numbers of Services.
    pub levels: Vec<usize>,
    /// Pods, and endpoints of the measured Service.
    pub pods: usize,
    /// Client threads of the rate measurements.
    pub threads: usize,
    /// Seconds of each rate measurement, per mode.
    pub seconds: f64,
    /// Rounds the rate measurements are split in (the modes take turns); 1 in runs written
    /// before there were rounds.
    #[serde(default = "one")]
    pub rounds: usize,
    /// First requests timed for the latency percentiles (one after the other).
    pub latency_samples: usize,
    /// Untimed requests before measuring.
    pub warmup: usize,
}

fn one() -> usize {
    1
}

impl E2ePlan {
    /// The full plan, or a smaller one with `quick`.
    pub fn new(quick: bool) -> Self {
        E2ePlan {
            // iptables-restore (nf_tables backend) takes minutes at 10,000 Services.
            levels: if quick {
                vec![10, 1_000]
            } else {
                vec![10, 1_000, 10_000]
            },
            pods: 10,
            threads: 4,
            seconds: if quick { 1.0 } else { 6.0 },
            rounds: if quick { 2 } else { 6 },
            latency_samples: if quick { 200 } else { 2_000 },
            warmup: 20,
        }
    }
}

/// A way of programming Services on the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    /// No Service: the client connects to a pod's address, the node only routes (the
    /// floor each mode's added latency is measured against).
    Direct,
    /// This datapath (`lb agent`).
    Lb,
    /// kube-proxy's iptables mode, with the machine's `iptables` (nf_tables backend here).
    Iptables,
    /// kube-proxy's iptables mode with the legacy (xtables) backend.
    IptablesLegacy,
    /// kube-proxy's nftables mode.
    Nftables,
}

impl Mode {
    /// Every mode, in report order.
    pub const ALL: [Mode; 5] = [
        Mode::Direct,
        Mode::Lb,
        Mode::Iptables,
        Mode::IptablesLegacy,
        Mode::Nftables,
    ];

    /// The modes that program Services (all but [`Mode::Direct`]).
    pub const SERVICES: [Mode; 4] = [
        Mode::Lb,
        Mode::Iptables,
        Mode::IptablesLegacy,
        Mode::Nftables,
    ];

    /// How the report names it.
    pub fn label(self) -> &'static str {
        match self {
            Mode::Direct => "direct to a pod (no Service, the floor)",
            Mode::Lb => "lb (this datapath)",
            Mode::Iptables => "kube-proxy iptables",
            Mode::IptablesLegacy => "kube-proxy iptables (legacy)",
            Mode::Nftables => "kube-proxy nftables",
        }
    }

    /// What "programming" means in this mode.
    pub fn programming(self) -> &'static str {
        match self {
            Mode::Direct => "nothing (no Service is programmed; the node routes)",
            Mode::Lb => {
                "the running agent (on an empty folder) from the rename of the manifests file into \
                 its folder to its `synced` log line (maps complete)"
            }
            Mode::Iptables => {
                "`iptables-restore -w 5 --noflush --counters` (the machine's iptables: see Machine) \
                 of the full rule set, run to exit"
            }
            Mode::IptablesLegacy => "the same with `iptables-legacy-restore`",
            Mode::Nftables => "`nft -f` of the full transaction, run to exit",
        }
    }
}

/// One mode at one number of Services.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct E2eRow {
    /// The mode.
    pub mode: Mode,
    /// Services programmed.
    pub services: usize,
    /// Seconds to program them (see [`Mode::programming`]).
    pub program_seconds: f64,
    /// When kube-proxy's own command was stopped unfinished: after how many seconds
    /// (`program_seconds` is then the fallback's time).
    pub program_stopped_after: Option<f64>,
    /// For `lb`: the translate-and-write time the agent itself logged, in seconds.
    pub agent_seconds: Option<f64>,
    /// Median first-request latency, microseconds.
    pub p50_us: f64,
    /// 99th percentile first-request latency, microseconds.
    pub p99_us: f64,
    /// New connections (one request each).
    pub connections: Rate,
    /// Requests on kept-alive connections.
    pub requests: Rate,
}

/// One failed (mode, N) measurement.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct E2eFailure {
    /// The mode.
    pub mode: Mode,
    /// Services.
    pub services: usize,
    /// What went wrong.
    pub error: String,
}

/// Everything the end-to-end benchmark measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct E2eResults {
    /// The measurements.
    pub rows: Vec<E2eRow>,
    /// Measurements that failed.
    pub failures: Vec<E2eFailure>,
}

impl E2eResults {
    /// The row of `mode` at `services`.
    pub fn get(&self, mode: Mode, services: usize) -> Option<&E2eRow> {
        self.rows
            .iter()
            .find(|r| r.mode == mode && r.services == services)
    }
}

/// Runs the end-to-end benchmark: at each level, every mode in its own copy of the topology,
/// programmed one after the other (timed alone), then measured in turns so that every mode
/// sees the same background load: latency samples alternate between the modes, and the rate
/// measurements run in [`E2ePlan::rounds`] rounds, each mode once per round.
pub fn run(plan: &E2ePlan) -> Result<E2eResults> {
    let mut results = E2eResults {
        rows: Vec::new(),
        failures: Vec::new(),
    };
    for &services in &plan.levels {
        let mut beds = Vec::new();
        for mode in Mode::ALL {
            match prepare(plan, mode, services) {
                Ok(bed) => {
                    eprintln!(
                        "e2e: {} at {services} Services: programmed in {:.3} s",
                        mode.label(),
                        bed.programmed.seconds
                    );
                    beds.push(bed);
                }
                Err(e) => results.failures.push(failure(mode, services, e)),
            }
        }
        for bed in measure(plan, services, beds, &mut results.failures) {
            let row = bed.row(services)?;
            eprintln!(
                "e2e: {} at {services} Services: p50 {:.0} µs p99 {:.0} µs, {:.0} conn/s, {:.0} req/s",
                row.mode.label(),
                row.p50_us,
                row.p99_us,
                row.connections.per_sec(),
                row.requests.per_sec()
            );
            results.rows.push(row);
        }
    }
    Ok(results)
}

fn failure(mode: Mode, services: usize, e: anyhow::Error) -> E2eFailure {
    eprintln!("e2e: {} at {services} Services FAILED: {e:#}", mode.label());
    E2eFailure {
        mode,
        services,
        error: format!("{e:#}"),
    }
}

/// One mode, programmed in its own topology, and what has been measured of it.
struct ModeBed {
    /// Declared first: the agent stops before its topology goes.
    _lb: Option<LbMode>,
    bed: Bed,
    mode: Mode,
    target: SocketAddr,
    programmed: Programmed,
    agent_seconds: Option<f64>,
    micros: Vec<f64>,
    connections: Option<Rate>,
    requests: Option<Rate>,
}

impl ModeBed {
    fn row(&self, services: usize) -> Result<E2eRow> {
        Ok(E2eRow {
            mode: self.mode,
            services,
            program_seconds: self.programmed.seconds,
            program_stopped_after: self.programmed.stopped_after,
            agent_seconds: self.agent_seconds,
            p50_us: quantile(&self.micros, 0.5).context("no samples")?,
            p99_us: quantile(&self.micros, 0.99).context("no samples")?,
            connections: self.connections.clone().context("no connection rate")?,
            requests: self.requests.clone().context("no request rate")?,
        })
    }
}

fn add(total: &mut Option<Rate>, part: Rate) {
    match total {
        None => *total = Some(part),
        Some(t) => {
            t.ok += part.ok;
            t.errors += part.errors;
            t.seconds += part.seconds;
            if t.first_error.is_none() {
                t.first_error = part.first_error;
            }
        }
    }
}

/// A topology with `mode` programming `n` Services, warmed up.
fn prepare(plan: &E2ePlan, mode: Mode, n: usize) -> Result<ModeBed> {
    let bed = Bed::new(plan.pods, plan.threads + 2)?;
    let services = bed.services(n);
    let measured = services.last().context("no Services")?;
    let target = match mode {
        Mode::Direct => {
            let (pod, port) = *measured.endpoints.first().context("no endpoints")?;
            SocketAddr::V4(SocketAddrV4::new(pod, port))
        }
        _ => SocketAddr::V4(SocketAddrV4::new(measured.cluster_ip, measured.port())),
    };
    let mut lb = None;
    let (programmed, agent_seconds) = match mode {
        Mode::Direct => (
            Programmed {
                seconds: 0.0,
                stopped_after: None,
            },
            None,
        ),
        Mode::Lb => {
            let programmed = program_lb(&bed, &services)?;
            let times = (
                Programmed {
                    seconds: programmed.program_seconds,
                    stopped_after: None,
                },
                programmed.agent_seconds,
            );
            lb = Some(programmed);
            times
        }
        Mode::Iptables => (program_iptables(&bed, "iptables-restore", &services)?, None),
        Mode::IptablesLegacy => (
            program_iptables(&bed, "iptables-legacy-restore", &services)?,
            None,
        ),
        Mode::Nftables => (program_nftables(&bed, &services)?, None),
    };
    load::first_request_latencies(&bed.topology.client, target, plan.warmup).context("warm-up")?;
    Ok(ModeBed {
        _lb: lb,
        bed,
        mode,
        target,
        programmed,
        agent_seconds,
        micros: Vec::with_capacity(plan.latency_samples),
        connections: None,
        requests: None,
    })
}

/// Measures the modes in turns; returns those that measured without failing.
fn measure(
    plan: &E2ePlan,
    services: usize,
    beds: Vec<ModeBed>,
    failures: &mut Vec<E2eFailure>,
) -> Vec<ModeBed> {
    let mut beds: Vec<Option<ModeBed>> = beds.into_iter().map(Some).collect();
    let mut step = |beds: &mut Vec<Option<ModeBed>>, work: &dyn Fn(&mut ModeBed) -> Result<()>| {
        for slot in beds.iter_mut() {
            if let Some(bed) = slot
                && let Err(e) = work(bed)
            {
                failures.push(failure(bed.mode, services, e));
                *slot = None;
            }
        }
    };
    for _ in 0..plan.latency_samples {
        step(&mut beds, &|b| {
            let latency = load::first_request_latencies(&b.bed.topology.client, b.target, 1)?;
            b.micros
                .extend(latency.iter().map(|d| d.as_secs_f64() * 1e6));
            Ok(())
        });
    }
    let slice = Duration::from_secs_f64(plan.seconds / plan.rounds as f64);
    for _ in 0..plan.rounds {
        step(&mut beds, &|b| {
            let rate =
                load::connection_rate(&b.bed.topology.client, b.target, plan.threads, slice)?;
            ensure!(
                rate.ok > 0,
                "no connection succeeded: {}",
                rate.first_error.as_deref().unwrap_or("?")
            );
            add(&mut b.connections, rate);
            Ok(())
        });
    }
    for _ in 0..plan.rounds {
        step(&mut beds, &|b| {
            let rate = load::request_rate(&b.bed.topology.client, b.target, plan.threads, slice)?;
            ensure!(
                rate.ok > 0,
                "no request succeeded: {}",
                rate.first_error.as_deref().unwrap_or("?")
            );
            add(&mut b.requests, rate);
            Ok(())
        });
    }
    beds.into_iter().flatten().collect()
}

/// The topology with a pooled HTTP server on [`TARGET_PORT`] in every pod.
pub struct Bed {
    /// Declared first: stopped before the namespaces go.
    _servers: Vec<PooledHttpServer>,
    /// The namespaces.
    pub topology: Topology,
}

impl Bed {
    /// `pods` pods, each serving with `threads` threads.
    pub fn new(pods: usize, threads: usize) -> Result<Self> {
        let topology = Topology::new(pods)?;
        let servers = topology
            .pods
            .iter()
            .map(|p| PooledHttpServer::start(&p.ns, TARGET_PORT, &p.name, threads))
            .collect::<Result<_>>()?;
        Ok(Bed {
            _servers: servers,
            topology,
        })
    }

    /// `n` Services whose last one has the pods as endpoints.
    pub fn services(&self, n: usize) -> Vec<BenchService> {
        let pods: Vec<_> = self
            .topology
            .pods
            .iter()
            .map(|p| (p.ip, TARGET_PORT))
            .collect();
        cluster::services(n, 10, &pods)
    }

    /// Runs `program` with `input` as its standard input in the node namespace, timed to
    /// its exit; `Ok(None)` if it had not exited after `timeout` (it is killed).
    pub fn program_with(
        &self,
        program: &str,
        args: &[&str],
        input: &str,
        timeout: Duration,
    ) -> Result<Option<f64>> {
        program_in(&self.topology.node, program, args, input, timeout)
    }
}

/// Runs `program` with `input` as its standard input in `ns`, timed to its exit; `Ok(None)`
/// if it had not exited after `timeout` (it is killed).
pub fn program_in(
    ns: &Netns,
    program: &str,
    args: &[&str],
    input: &str,
    timeout: Duration,
) -> Result<Option<f64>> {
    let scratch = ScratchDir::new("rules")?;
    let path = scratch.path().join("rules");
    std::fs::write(&path, input).with_context(|| format!("write {}", path.display()))?;
    let log = scratch.path().join("output");
    let mut cmd = ns.command(program);
    cmd.args(args)
        .stdin(File::open(&path)?)
        .stdout(File::create(&log)?)
        .stderr(File::create(&log)?);
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot run {program}"))?;
    loop {
        if let Some(status) = child.try_wait()? {
            let seconds = start.elapsed().as_secs_f64();
            ensure!(
                status.success(),
                "{program} {args:?} failed ({status}): {}",
                std::fs::read_to_string(&log).unwrap_or_default().trim()
            );
            return Ok(Some(seconds));
        }
        if start.elapsed() > timeout {
            child.kill()?;
            child.wait()?;
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// How long iptables-restore and nft may take before they are stopped.
pub const RULES_TIMEOUT: Duration = Duration::from_secs(300);

/// How long a mode took to program the Services.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Programmed {
    /// Seconds, or, when the kube-proxy command was stopped at [`RULES_TIMEOUT`], the time of
    /// the fallback that loaded the same rules for the traffic measurements.
    pub seconds: f64,
    /// The kube-proxy command was stopped after this many seconds without finishing.
    pub stopped_after: Option<f64>,
}

/// Loads kube-proxy's iptables rules for `services` in the node namespace with `restore`
/// (`iptables-restore` or `iptables-legacy-restore`) and kube-proxy's arguments. If that
/// takes longer than [`RULES_TIMEOUT`] (iptables-nft with `--noflush` is superlinear), it is
/// stopped and the same rules are loaded without `--noflush` (equivalent in a fresh
/// namespace), timed as the fallback.
pub fn program_iptables(bed: &Bed, restore: &str, services: &[BenchService]) -> Result<Programmed> {
    let rules = kubeproxy::iptables_restore(services);
    if let Some(seconds) = bed.program_with(
        restore,
        kubeproxy::IPTABLES_RESTORE_ARGS,
        &rules,
        RULES_TIMEOUT,
    )? {
        return Ok(Programmed {
            seconds,
            stopped_after: None,
        });
    }
    // The stopped restore committed nothing (it is one transaction).
    let fallback = bed
        .program_with(restore, &["-w", "5"], &rules, RULES_TIMEOUT)?
        .with_context(|| format!("{restore} without --noflush took over {RULES_TIMEOUT:?} too"))?;
    Ok(Programmed {
        seconds: fallback,
        stopped_after: Some(RULES_TIMEOUT.as_secs_f64()),
    })
}

/// Loads kube-proxy's nftables rules for `services` in the node namespace.
pub fn program_nftables(bed: &Bed, services: &[BenchService]) -> Result<Programmed> {
    let seconds = bed
        .program_with(
            "nft",
            &["-f", "-"],
            &kubeproxy::nft_ruleset(services),
            RULES_TIMEOUT,
        )?
        .with_context(|| format!("nft -f took over {RULES_TIMEOUT:?}"))?;
    Ok(Programmed {
        seconds,
        stopped_after: None,
    })
}

/// The agent running on the node with `services` programmed from its manifests folder.
pub struct LbMode {
    /// Declared first: stopped before its folder goes.
    pub agent: Agent,
    /// The manifests folder.
    pub folder: ScratchDir,
    /// Seconds from the rename to the `synced` line.
    pub program_seconds: f64,
    /// What the agent logged as its own time.
    pub agent_seconds: Option<f64>,
}

/// Starts the agent on an empty folder, then moves a file with `services` into the folder and
/// times it until the agent has written them all.
pub fn program_lb(bed: &Bed, services: &[BenchService]) -> Result<LbMode> {
    let folder = ScratchDir::new("manifests")?;
    let staging = ScratchDir::new("staging")?;
    let mut agent = Agent::start_with_args(
        &lb_bin(),
        &bed.topology.node,
        folder.path(),
        NODE_IF,
        &["--resync-secs", "3600"],
    )?;
    let mut log = SyncLog::default();
    log.wait(&mut agent, 0, PROGRAM_TIMEOUT)?;
    let staged = staging.path().join("cluster.yaml");
    std::fs::write(&staged, cluster::manifests_yaml(services, |_| false))?;
    let start = Instant::now();
    std::fs::rename(&staged, folder.path().join("cluster.yaml"))
        .context("rename into the folder")?;
    let synced = log.wait(&mut agent, services.len(), PROGRAM_TIMEOUT)?;
    Ok(LbMode {
        program_seconds: (synced.seen_at - start).as_secs_f64(),
        agent_seconds: synced.agent_seconds,
        agent,
        folder,
    })
}
