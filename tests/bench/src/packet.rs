//! The cost of one packet through the real programs, run by the kernel with
//! BPF_PROG_TEST_RUN, against programs that do nothing (the floor), with 1 to 100,000
//! Services of 10 backends each programmed through `Syncer::apply`.
//!
//! With `repeat > 1` the kernel runs the program again on the packet it has just rewritten,
//! so each measurement is built so that every repetition takes the path it is named after,
//! and checked with the datapath's own counters or output:
//!
//! - not a frontend: the packet is passed untouched, so every repetition is the same;
//!   the `not_frontend` reason counter must grow by exactly the number of repetitions.
//! - established flow: the measured Service has two frontends, F1 (a ClusterIP) and F2 (a
//!   NodePort), and both are among its own backends. A source port is searched for whose
//!   flow to F1 was given backend F2 and whose flow to F2 was given backend F1. The packet
//!   then alternates F1 -> F2 -> F1 ...: every repetition is a conntrack hit and a real
//!   rewrite. Checked: the two frontends' packet counters grow by the repetitions in all,
//!   their new-flow counters by 0, and the output is the input (an even repeat count).
//! - reply: the backend's reply from F2 is translated to come from F1, which is the reply of
//!   the other flow, translated back to F2: every repetition is a translation. Checked: one
//!   run gives the packet from F1, two runs give the input back, and so does every measured
//!   run (even repeat counts).
//! - new flow: cannot repeat (the second run would find the first run's flow), so it is
//!   measured with `repeat = 1`, many runs, each from a new source address and port, taking
//!   the duration the kernel reports for each. The new-flow counter must grow by the number
//!   of runs. The floor and every other path are measured the same way too, so that the
//!   new flow has a floor taken under the same conditions (a single run includes the
//!   kernel's timer overhead, which a long repeat spreads out).

use lb_testbed::packet::test_run;
use lb_userspace::datapath::Pins;
use lb_userspace::model::Protocol;
use std::net::Ipv4Addr;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use aya::EbpfLoader;
use aya::programs::{SchedClassifier, TestRun, TestRunOptions, TestRunResult, Xdp};
use etherparse::PacketBuilder;
use lb_common::{Reason, program_names};
use lb_userspace::datapath::{BpfMaps, Capacity, Counters, Datapath};
use lb_userspace::plan::desired::{DesiredState, Frontend, FrontendKind};
use lb_userspace::sync::Syncer;
use serde::{Deserialize, Serialize};

use super::cluster::{self, Endpoint};
use super::profile;
use super::stats::median;
use lb_testbed::agent::PinDir;

/// What the per-packet benchmark runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PacketPlan {
    /// Numbers of Services (10 backends each) to measure at.
    pub levels: Vec<usize>,
    /// Repetitions per run for the repeatable paths.
    pub repeat: u32,
    /// Runs per repeatable measurement (the median is reported).
    pub runs: usize,
    /// Single runs (`repeat = 1`) per measurement.
    pub single_runs: usize,
    /// Whole measurements of every path at each level, one after the other: a cell is the
    /// median of the rounds' medians, and the rounds' spread is reported beside it, so that
    /// noise is told apart from a change. 1 in results from before there were rounds.
    #[serde(default = "one")]
    pub rounds: usize,
    /// New flows run while the new-flow path is profiled (see [`profile`]).
    #[serde(default)]
    pub profile_flows: usize,
    /// Seconds each repeatable path runs while it is profiled.
    #[serde(default)]
    pub profile_seconds: f64,
}

fn one() -> usize {
    1
}

impl PacketPlan {
    /// The full plan, or a smaller one with `quick`.
    pub fn new(quick: bool) -> Self {
        PacketPlan {
            levels: vec![1, 1_000, 10_000, 100_000],
            repeat: if quick { 20_000 } else { 200_000 },
            runs: if quick { 11 } else { 31 },
            single_runs: if quick { 2_000 } else { 20_000 },
            rounds: 3,
            profile_flows: 50_000,
            profile_seconds: if quick { 1.0 } else { 3.0 },
        }
    }
}

/// A path through the programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PathKind {
    /// The no-op XDP program.
    FloorXdp,
    /// The no-op TC program.
    FloorTc,
    /// XDP, a packet to no frontend.
    NotFrontend,
    /// XDP, the first packet of a new flow.
    NewFlow,
    /// XDP, a packet of an established flow.
    Established,
    /// TC, a backend's reply translated back.
    Reply,
}

impl PathKind {
    /// Every path, in report order.
    pub const ALL: [PathKind; 6] = [
        PathKind::FloorXdp,
        PathKind::FloorTc,
        PathKind::NotFrontend,
        PathKind::NewFlow,
        PathKind::Established,
        PathKind::Reply,
    ];

    /// How the report names it.
    pub fn label(self) -> &'static str {
        match self {
            PathKind::FloorXdp => "no-op XDP (floor)",
            PathKind::FloorTc => "no-op TC",
            PathKind::NotFrontend => "not a frontend (XDP)",
            PathKind::NewFlow => "new flow, first packet (XDP)",
            PathKind::Established => "established flow (XDP)",
            PathKind::Reply => "reply translated (TC)",
        }
    }
}

/// How a measurement was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Method {
    /// `repeat` repetitions per run; the median of the runs' per-repetition durations.
    Repeat,
    /// One repetition per run; the median of the runs' durations.
    Single,
}

/// One measured path at one number of Services.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measurement {
    /// The path.
    pub path: PathKind,
    /// How.
    pub method: Method,
    /// Services programmed.
    pub services: usize,
    /// Median nanoseconds per packet: the median of [`Measurement::rounds`].
    pub ns: f64,
    /// Each round's median nanoseconds per packet ([`PacketPlan::rounds`]); empty in results
    /// from before there were rounds.
    #[serde(default)]
    pub rounds: Vec<f64>,
    /// What was checked to hold for every repetition.
    pub checked: String,
}

/// Size of a loaded program.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProgramSize {
    /// Program name.
    pub name: String,
    /// Instructions after the verifier's rewrites (`xlated`).
    pub xlated_insns: u32,
    /// Bytes of JIT-compiled code.
    pub jited_bytes: u32,
    /// Instructions the verifier processed.
    pub verified_insns: u32,
}

/// Everything the per-packet benchmark measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PacketResults {
    /// Every measurement.
    pub measurements: Vec<Measurement>,
    /// Program sizes.
    pub programs: Vec<ProgramSize>,
    /// Seconds `Syncer::apply` took to grow the maps to each level (Services, seconds).
    pub fill_seconds: Vec<(usize, f64)>,
    /// Where the time of each path goes, at the last level (see [`profile`]); empty when
    /// perf could not be run (`profile_missing` says why).
    #[serde(default)]
    pub profiles: Vec<PathProfile>,
    /// Why there is no profile, when there is none.
    #[serde(default)]
    pub profile_missing: Option<String>,
}

/// The profile of one path (see [`profile`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PathProfile {
    /// The path.
    pub path: PathKind,
    /// Services programmed.
    pub services: usize,
    /// The program's name.
    pub program: String,
    /// How the path was run while sampled.
    pub how: String,
    /// The samples.
    pub breakdown: profile::Breakdown,
}

impl PacketResults {
    /// The measurement of `path` by `method` at `services`.
    pub fn get(&self, path: PathKind, method: Method, services: usize) -> Option<&Measurement> {
        self.measurements
            .iter()
            .find(|m| m.path == path && m.method == method && m.services == services)
    }

    /// The largest deviation, in percent, of a round of `path` (by `method`, at `services`)
    /// from the rounds' median; `None` without rounds.
    pub fn round_spread(&self, path: PathKind, method: Method, services: usize) -> Option<f64> {
        let m = self.get(path, method, services)?;
        m.rounds
            .iter()
            .map(|r| 100.0 * (r - m.ns).abs() / m.ns)
            .reduce(f64::max)
    }

    /// The floor for `path` measured by `method` at `services`: the no-op XDP program.
    pub fn floor(&self, method: Method, services: usize) -> Option<f64> {
        Some(self.get(PathKind::FloorXdp, method, services)?.ns)
    }
}

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
const NODE: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
const NODE_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
/// The measured Service's ClusterIP frontend, F1.
const F1: Endpoint = (Ipv4Addr::new(10, 95, 0, 1), 80);
/// The measured Service's NodePort frontend, F2.
const F2: Endpoint = (NODE, 30080);
const XDP_PASS: u32 = 2;
const TC_ACT_OK: u32 = 0;

/// A TCP packet (ACK, no payload) from `src` to `dst`.
fn tcp(src: Endpoint, dst: Endpoint) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv4(src.0.octets(), dst.0.octets(), 64)
        .tcp(src.1, dst.1, 1000, 64240)
        .ack(1);
    let mut out = Vec::new();
    builder
        .write(&mut out, &[])
        .expect("writing to a Vec cannot fail");
    out
}

/// The IPv4 source and destination (address, port) of a TCP packet built by [`tcp`].
fn addresses(packet: &[u8]) -> Result<(Endpoint, Endpoint)> {
    ensure!(
        packet.len() >= 14 + 20 + 4,
        "packet of {} bytes",
        packet.len()
    );
    let ip = &packet[14..];
    let addr = |at: usize| Ipv4Addr::new(ip[at], ip[at + 1], ip[at + 2], ip[at + 3]);
    let port = |at: usize| u16::from_be_bytes([ip[20 + at], ip[20 + at + 1]]);
    Ok(((addr(12), port(0)), (addr(16), port(2))))
}

/// The backends of the measured Service: its two frontends and 8 others.
fn measured_backends() -> Vec<Endpoint> {
    let mut backends = vec![F1, F2];
    backends.extend((1..=8).map(|j| (Ipv4Addr::new(10, 95, 1, j), cluster::TARGET_PORT)));
    backends
}

/// The desired state at `services` Services: the measured one (two frontends, F1 and F2,
/// with both among its 10 backends) and `services - 1` ClusterIP Services.
fn desired(services: usize) -> DesiredState {
    let mut state = cluster::desired(&cluster::services(services, 10, &[])[..services - 1]);
    let backends = measured_backends();
    for (frontend, kind) in [(F1, FrontendKind::ClusterIp), (F2, FrontendKind::NodePort)] {
        let key = Frontend {
            addr: frontend.0.into(),
            port: frontend.1,
            proto: Protocol::Tcp,
        };
        state
            .frontends
            .insert(key, cluster::plan("measured", kind, &backends));
    }
    state
}

/// `runs` runs of `repeat` repetitions; the median nanoseconds per repetition. `check` sees
/// each run's output and return value.
fn measure<P>(
    prog: &P,
    packet: &[u8],
    repeat: u32,
    runs: usize,
    mut check: impl FnMut(u32, &[u8]) -> Result<()>,
) -> Result<f64>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let (result, out) = test_run(prog, packet, repeat).context("BPF_PROG_TEST_RUN")?;
        check(result.return_value, &out)?;
        samples.push(result.duration.as_nanos() as f64);
    }
    median(&samples).context("no runs")
}

/// `work` run under `perf record`, its samples attributed to the program named `symbol`.
fn sampled(work: impl FnOnce() -> Result<()>, symbol: &str) -> Result<profile::Breakdown> {
    let scratch = super::ScratchDir::new("perf")?;
    let mut recording = profile::Recording::start(scratch.path())?;
    recording.run(work)?;
    let chains = recording.finish()?;
    Ok(profile::attribute(&chains, symbol))
}

/// 1,000 for 1000.
fn report_count(n: usize) -> String {
    super::report::count(n)
}

/// A fresh (client address, port) for each new flow: 10.201.0.0/16 and ports from 1024.
struct FreshSources(u32);

impl FreshSources {
    fn next(&mut self) -> Endpoint {
        let n = self.0;
        self.0 += 1;
        let per_addr = 65_536 - 1_024;
        (
            cluster::offset(Ipv4Addr::new(10, 201, 0, 0), (n / per_addr) as usize),
            (1_024 + n % per_addr) as u16,
        )
    }
}

/// The loaded programs and maps, and what is programmed.
struct Bench {
    dp: Datapath,
    noop: aya::Ebpf,
    syncer: Syncer<BpfMaps>,
    counters: Counters,
    plan: PacketPlan,
    sources: FreshSources,
    next_port: u16,
    measurements: Vec<Measurement>,
    _pins: PinDir,
}

/// Runs the per-packet benchmark.
pub fn run(plan: &PacketPlan) -> Result<PacketResults> {
    let max = plan.levels.iter().copied().max().context("no levels")?;
    let pins = PinDir::new()?;
    let entries = |n: usize| (n as u32).next_power_of_two();
    let capacity = Capacity {
        services: entries(max + 2),
        backends: entries(max * 10 + 10),
        // Room for every flow the run creates twice over (two entries each), and for the
        // profile's new flows (two entries each), which must not evict the crossed flows.
        conntrack: entries(
            4 * plan.single_runs * plan.rounds.max(1) * plan.levels.len()
                + 2 * plan.profile_flows
                + 100_000,
        ),
        affinity: 1024,
    };
    let mut dp = Datapath::load_with(&Pins::new(pins.path()), &capacity)?;
    dp.load_programs()?;
    let syncer = Syncer::adopt(dp.take_maps()?).context("adopting the maps")?;
    let counters = Counters::open_pinned(&Pins::new(pins.path()))?;
    let mut noop = EbpfLoader::new()
        .load(lb_userspace::NOOP_OBJECT)
        .context("loading the no-op programs")?;
    let xdp: &mut Xdp = program(&mut noop, program_names::NOOP_XDP)?;
    xdp.load().context("loading the no-op XDP program")?;
    let tc: &mut SchedClassifier = program(&mut noop, program_names::NOOP_TC)?;
    tc.load().context("loading the no-op TC program")?;
    let mut bench = Bench {
        dp,
        noop,
        syncer,
        counters,
        plan: plan.clone(),
        sources: FreshSources(0),
        next_port: 1_024,
        measurements: Vec::new(),
        _pins: pins,
    };
    let mut fill_seconds = Vec::new();
    let mut last = None;
    for &level in &plan.levels {
        let state = desired(level);
        let start = Instant::now();
        let report = bench.syncer.apply(&state);
        fill_seconds.push((level, start.elapsed().as_secs_f64()));
        if let Some(e) = report.errors.first() {
            bail!(
                "programming {level} Services: {e} ({} errors)",
                report.errors.len()
            );
        }
        ensure!(
            report.frontends == level + 1,
            "{} frontends programmed",
            report.frontends
        );
        let mut port = 0;
        for round in 1..=plan.rounds.max(1) {
            port = bench
                .level(level)
                .with_context(|| format!("at {level} Services, round {round}"))?;
        }
        eprintln!("packet: {level} Services measured");
        last = Some((level, port));
    }
    let measurements = merge_rounds(bench.measurements.drain(..))?;
    // After every measurement, so that the profile's flows are in no measured map.
    let (mut profiles, mut profile_missing) = (Vec::new(), None);
    if let Some((level, port)) = last {
        if profile::available() {
            profiles = bench
                .profile(level, port)
                .with_context(|| format!("profiling at {level} Services"))?;
            eprintln!("packet: {level} Services profiled");
        } else {
            profile_missing = Some("perf is not installed (Debian: linux-perf)".to_owned());
        }
    }
    let programs = bench.program_sizes()?;
    Ok(PacketResults {
        measurements,
        programs,
        fill_seconds,
        profiles,
        profile_missing,
    })
}

/// One measurement per path, method and level from the rounds' (in the order first
/// measured): the median of the rounds' values, with each round's kept.
fn merge_rounds(rounds: impl IntoIterator<Item = Measurement>) -> Result<Vec<Measurement>> {
    let mut merged: Vec<Measurement> = Vec::new();
    for m in rounds {
        match merged
            .iter_mut()
            .find(|o| (o.path, o.method, o.services) == (m.path, m.method, m.services))
        {
            Some(o) => o.rounds.push(m.ns),
            None => merged.push(Measurement {
                rounds: vec![m.ns],
                ..m
            }),
        }
    }
    for m in &mut merged {
        m.ns = median(&m.rounds).context("no rounds")?;
    }
    Ok(merged)
}

fn program<'a, P>(ebpf: &'a mut aya::Ebpf, name: &str) -> Result<&'a mut P>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .with_context(|| format!("no program {name}"))?
        .try_into()
        .with_context(|| format!("program {name} has another type"))
}

fn program_ref<'a, P>(ebpf: &'a aya::Ebpf, name: &str) -> Result<&'a P>
where
    &'a P: TryFrom<&'a aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program(name)
        .with_context(|| format!("no program {name}"))?
        .try_into()
        .with_context(|| format!("program {name} has another type"))
}

impl Bench {
    fn record(&mut self, path: PathKind, method: Method, services: usize, ns: f64, checked: &str) {
        self.measurements.push(Measurement {
            path,
            method,
            services,
            ns,
            rounds: Vec::new(),
            checked: checked.to_owned(),
        });
    }

    fn service_id(&self, frontend: Endpoint) -> Result<u32> {
        let key = lb_userspace::plan::desired::FrontendKey::V4(lb_common::Frontend4::new(
            frontend.0.octets(),
            frontend.1,
            lb_common::PROTO_TCP,
        ));
        self.syncer
            .service_ids()
            .find(|(k, _)| *k == key)
            .map(|(_, id)| id)
            .with_context(|| format!("{}:{} is not programmed", frontend.0, frontend.1))
    }

    /// (packets, new flows) of the two measured frontends together.
    fn measured_counts(&self) -> Result<(u64, u64)> {
        let mut total = (0, 0);
        for f in [F1, F2] {
            let stats = self.counters.service(self.service_id(f)?)?;
            total.0 += stats.packets;
            total.1 += stats.new_flows;
        }
        Ok(total)
    }

    fn not_frontend_count(&self) -> Result<u64> {
        Ok(self.counters.reasons()?[Reason::NotFrontend as usize])
    }

    /// A source port whose flow to F1 has backend F2 and whose flow to F2 has backend F1.
    fn crossed_flows(&mut self) -> Result<u16> {
        let xdp: &Xdp = program_ref(self.dp.ebpf_mut(), program_names::XDP_INGRESS)?;
        for _ in 0..20_000 {
            let port = self.next_port;
            self.next_port = self
                .next_port
                .checked_add(1)
                .context("out of source ports")?;
            let (_, out) =
                test_run(xdp, &tcp((CLIENT, port), F1), 1).context("BPF_PROG_TEST_RUN")?;
            if addresses(&out)?.1 != F2 {
                continue;
            }
            let (_, out) =
                test_run(xdp, &tcp((CLIENT, port), F2), 1).context("BPF_PROG_TEST_RUN")?;
            if addresses(&out)?.1 == F1 {
                return Ok(port);
            }
        }
        bail!("no source port gives the crossed flows F1 -> F2 and F2 -> F1")
    }

    /// Measures every path at `services`; returns the client port of the crossed flows.
    fn level(&mut self, services: usize) -> Result<u16> {
        let (repeat, runs, singles) = (self.plan.repeat, self.plan.runs, self.plan.single_runs);
        ensure!(repeat.is_multiple_of(2), "the repeat count must be even");
        let any = tcp((CLIENT, 40_000), (NODE, 22));

        // The floors.
        for (path, method) in [
            (PathKind::FloorXdp, Method::Repeat),
            (PathKind::FloorXdp, Method::Single),
            (PathKind::FloorTc, Method::Repeat),
            (PathKind::FloorTc, Method::Single),
        ] {
            let (r, n) = match method {
                Method::Repeat => (repeat, runs),
                Method::Single => (1, singles),
            };
            let untouched = |ret: u32, out: &[u8], pass: u32| {
                ensure!(
                    ret == pass && out == any.as_slice(),
                    "the no-op program changed something"
                );
                Ok(())
            };
            let ns = if path == PathKind::FloorXdp {
                let prog: &Xdp = program_ref(&self.noop, program_names::NOOP_XDP)?;
                measure(prog, &any, r, n, |ret, out| untouched(ret, out, XDP_PASS))?
            } else {
                let prog: &SchedClassifier = program_ref(&self.noop, program_names::NOOP_TC)?;
                measure(prog, &any, r, n, |ret, out| untouched(ret, out, TC_ACT_OK))?
            };
            self.record(path, method, services, ns, "output = input");
        }

        // Not a frontend.
        for method in [Method::Repeat, Method::Single] {
            let (r, n) = match method {
                Method::Repeat => (repeat, runs),
                Method::Single => (1, singles),
            };
            let before = self.not_frontend_count()?;
            let xdp: &Xdp = program_ref(self.dp.ebpf_mut(), program_names::XDP_INGRESS)?;
            let ns = measure(xdp, &any, r, n, |ret, out| {
                ensure!(
                    ret == XDP_PASS && out == any.as_slice(),
                    "a non-frontend packet was changed"
                );
                Ok(())
            })?;
            let counted = self.not_frontend_count()? - before;
            let expected = u64::from(r) * n as u64;
            ensure!(
                counted == expected,
                "not_frontend counted {counted}, expected {expected}"
            );
            self.record(
                PathKind::NotFrontend,
                method,
                services,
                ns,
                &format!("not_frontend counter +{expected} (= repetitions); output = input"),
            );
        }

        // New flows: one run each, each from a fresh source.
        let (_, new_before) = self.measured_counts()?;
        let packets: Vec<Vec<u8>> = (0..singles).map(|_| tcp(self.sources.next(), F1)).collect();
        let backends = measured_backends();
        let xdp: &Xdp = program_ref(self.dp.ebpf_mut(), program_names::XDP_INGRESS)?;
        let mut samples = Vec::with_capacity(singles);
        for packet in &packets {
            let (result, out) = test_run(xdp, packet, 1).context("BPF_PROG_TEST_RUN")?;
            let dst = addresses(&out)?.1;
            ensure!(
                result.return_value == XDP_PASS && backends.contains(&dst),
                "a new flow was not translated to a backend"
            );
            samples.push(result.duration.as_nanos() as f64);
        }
        let (_, new_after) = self.measured_counts()?;
        ensure!(
            new_after - new_before == singles as u64,
            "new flows counted {}, expected {singles}",
            new_after - new_before
        );
        let ns = median(&samples).context("no runs")?;
        self.record(
            PathKind::NewFlow,
            Method::Single,
            services,
            ns,
            &format!("new-flow counter +{singles} (= runs); every output translated"),
        );

        // Established flows, alternating between the two crossed flows.
        let port = self.crossed_flows()?;
        let forward = tcp((CLIENT, port), F1);
        let forward_once = tcp((CLIENT, port), F2);
        for method in [Method::Repeat, Method::Single] {
            let (r, n) = match method {
                Method::Repeat => (repeat, runs),
                Method::Single => (1, singles),
            };
            let expected_out = if r.is_multiple_of(2) {
                &forward
            } else {
                &forward_once
            };
            let (packets_before, new_before) = self.measured_counts()?;
            let xdp: &Xdp = program_ref(self.dp.ebpf_mut(), program_names::XDP_INGRESS)?;
            let ns = measure(xdp, &forward, r, n, |ret, out| {
                ensure!(ret == XDP_PASS, "XDP returned {ret}");
                ensure!(
                    addresses(out)? == addresses(expected_out)?,
                    "an established flow did not alternate between F1 and F2"
                );
                Ok(())
            })?;
            let (packets_after, new_after) = self.measured_counts()?;
            let expected = u64::from(r) * n as u64;
            ensure!(
                packets_after - packets_before == expected && new_after == new_before,
                "translated {} packets and {} new flows, expected {expected} and 0",
                packets_after - packets_before,
                new_after - new_before
            );
            self.record(
                PathKind::Established,
                method,
                services,
                ns,
                &format!("packet counters +{expected} (= repetitions), new-flow counters +0"),
            );
        }

        // Replies: from F2 (the backend of the flow to F1) to the client, and back.
        let reply = tcp(F2, (CLIENT, port));
        let reply_once = tcp(F1, (CLIENT, port));
        let tc: &SchedClassifier = program_ref(self.dp.ebpf_mut(), program_names::TC_EGRESS)?;
        for (r, expected) in [(1, &reply_once), (2, &reply)] {
            let (result, out) = test_run(tc, &reply, r).context("BPF_PROG_TEST_RUN")?;
            ensure!(
                result.return_value == TC_ACT_OK && addresses(&out)? == addresses(expected)?,
                "{r} run(s) of the reply did not give the reply from {:?}",
                addresses(expected)?.0
            );
        }
        for method in [Method::Repeat, Method::Single] {
            let (r, n) = match method {
                Method::Repeat => (repeat, runs),
                Method::Single => (1, singles),
            };
            let expected_out = if r.is_multiple_of(2) {
                &reply
            } else {
                &reply_once
            };
            let tc: &SchedClassifier = program_ref(self.dp.ebpf_mut(), program_names::TC_EGRESS)?;
            let ns = measure(tc, &reply, r, n, |ret, out| {
                ensure!(ret == TC_ACT_OK, "TC returned {ret}");
                ensure!(
                    addresses(out)? == addresses(expected_out)?,
                    "a reply was not translated on every repetition"
                );
                Ok(())
            })?;
            self.record(
                PathKind::Reply,
                method,
                services,
                ns,
                "1 run translates F2 -> F1, 2 runs give the input back; every run's output as expected",
            );
        }
        Ok(port)
    }

    /// Profiles the new flow, the established flow and the reply at `services` (`port`: the
    /// crossed flows' client port, see [`Bench::level`]), each as it is measured.
    fn profile(&mut self, services: usize, port: u16) -> Result<Vec<PathProfile>> {
        let mut out = Vec::new();
        let (repeat, flows, seconds) = (
            self.plan.repeat,
            self.plan.profile_flows,
            self.plan.profile_seconds,
        );
        let xdp_symbol = program_names::XDP_INGRESS.to_owned();
        let tc_symbol = program_names::TC_EGRESS.to_owned();
        let backends = measured_backends();

        // New flows: single runs, each from a fresh source, as measured.
        let packets: Vec<Vec<u8>> = (0..flows).map(|_| tcp(self.sources.next(), F1)).collect();
        let xdp: &Xdp = program_ref(self.dp.ebpf_mut(), program_names::XDP_INGRESS)?;
        let breakdown = sampled(
            || {
                for packet in &packets {
                    let (result, out) = test_run(xdp, packet, 1).context("BPF_PROG_TEST_RUN")?;
                    ensure!(
                        result.return_value == XDP_PASS && backends.contains(&addresses(&out)?.1),
                        "a new flow was not translated to a backend"
                    );
                }
                Ok(())
            },
            &xdp_symbol,
        )?;
        out.push(PathProfile {
            path: PathKind::NewFlow,
            services,
            program: xdp_symbol.clone(),
            how: format!("{} single runs, each a new flow", report_count(flows)),
            breakdown,
        });

        // The established flow and the reply: runs of `repeat` repetitions for `seconds`.
        let forward = tcp((CLIENT, port), F1);
        let reply = tcp(F2, (CLIENT, port));
        for (path, packet, symbol) in [
            (PathKind::Established, &forward, &xdp_symbol),
            (PathKind::Reply, &reply, &tc_symbol),
        ] {
            let ebpf = self.dp.ebpf_mut();
            let run_once = |ebpf: &aya::Ebpf| -> Result<()> {
                let (ret, out) = if path == PathKind::Reply {
                    let tc: &SchedClassifier = program_ref(ebpf, program_names::TC_EGRESS)?;
                    let (r, out) = test_run(tc, packet, repeat).context("BPF_PROG_TEST_RUN")?;
                    (r.return_value == TC_ACT_OK, out)
                } else {
                    let xdp: &Xdp = program_ref(ebpf, program_names::XDP_INGRESS)?;
                    let (r, out) = test_run(xdp, packet, repeat).context("BPF_PROG_TEST_RUN")?;
                    (r.return_value == XDP_PASS, out)
                };
                ensure!(
                    ret && &out == packet,
                    "{} changed under the profile",
                    path.label()
                );
                Ok(())
            };
            let mut runs = 0;
            let breakdown = sampled(
                || {
                    let start = Instant::now();
                    while start.elapsed().as_secs_f64() < seconds {
                        run_once(ebpf)?;
                        runs += 1;
                    }
                    Ok(())
                },
                symbol,
            )?;
            out.push(PathProfile {
                path,
                services,
                program: symbol.clone(),
                how: format!(
                    "{runs} runs of {} repetitions",
                    report_count(repeat as usize)
                ),
                breakdown,
            });
        }
        Ok(out)
    }

    fn program_sizes(&mut self) -> Result<Vec<ProgramSize>> {
        self.dp
            .load_pod_programs()
            .context("loading the pod interfaces' programs")?;
        let mut sizes = Vec::new();
        let names = [
            (program_names::XDP_INGRESS, false),
            // Tail-called by XDP_INGRESS for IPv6 frames (not measured per packet here).
            (program_names::XDP_INGRESS6, false),
            // Tail-called by XDP_INGRESS6 for IPv6 remote backends.
            (program_names::XDP_NAT6, false),
            (program_names::XDP_ICMP6, false),
            (program_names::XDP_DSR6, false),
            (program_names::XDP_DSR4, false),
            (program_names::TC_EGRESS, false),
            // On the pods' host-side interfaces; TC_POD_INGRESS6 is tail-called by
            // TC_POD_INGRESS for IPv6 frames (neither is measured per packet here).
            (program_names::TC_POD_INGRESS, false),
            (program_names::TC_POD_INGRESS6, false),
            (program_names::NOOP_XDP, true),
            (program_names::NOOP_TC, true),
        ];
        for (name, noop) in names {
            let ebpf = if noop {
                &self.noop
            } else {
                &*self.dp.ebpf_mut()
            };
            let prog = ebpf
                .program(name)
                .with_context(|| format!("no program {name}"))?;
            let info = prog.info().with_context(|| format!("info of {name}"))?;
            sizes.push(ProgramSize {
                name: name.to_owned(),
                xlated_insns: info.size_translated().unwrap_or(0) / 8,
                jited_bytes: info.size_jitted(),
                verified_insns: info.verified_instruction_count().unwrap_or(0),
            });
        }
        Ok(sizes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(path: PathKind, services: usize, ns: f64) -> Measurement {
        Measurement {
            path,
            method: Method::Repeat,
            services,
            ns,
            rounds: Vec::new(),
            checked: String::new(),
        }
    }

    #[test]
    fn rounds_merge_into_their_median_and_keep_their_spread() {
        let measured = [
            at(PathKind::Established, 1, 90.0),
            at(PathKind::Reply, 1, 300.0),
            at(PathKind::Established, 1, 110.0),
            at(PathKind::Reply, 1, 310.0),
            at(PathKind::Established, 1, 100.0),
            at(PathKind::Reply, 1, 305.0),
            at(PathKind::Established, 10, 95.0),
        ];
        let merged = merge_rounds(measured).unwrap();
        let cells: Vec<_> = merged
            .iter()
            .map(|m| (m.path, m.services, m.ns, m.rounds.clone()))
            .collect();
        assert_eq!(
            cells,
            [
                (PathKind::Established, 1, 100.0, vec![90.0, 110.0, 100.0]),
                (PathKind::Reply, 1, 305.0, vec![300.0, 310.0, 305.0]),
                (PathKind::Established, 10, 95.0, vec![95.0]),
            ]
        );
        let results = PacketResults {
            measurements: merged,
            programs: Vec::new(),
            fill_seconds: Vec::new(),
            profiles: Vec::new(),
            profile_missing: None,
        };
        let spread = results.round_spread(PathKind::Established, Method::Repeat, 1);
        assert_eq!(spread, Some(10.0));
        assert_eq!(
            results.round_spread(PathKind::Established, Method::Repeat, 10),
            Some(0.0)
        );
        assert_eq!(
            results.round_spread(PathKind::NewFlow, Method::Single, 1),
            None
        );
    }
}
