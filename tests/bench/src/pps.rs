//! Packets per second through a node, with a real generator, side by side for this
//! datapath, kube-proxy's rules and plain routing.
//!
//! The bed (network namespaces; one veth pair is the node's NIC, one a pod's interface):
//!
//! ```text
//! tester ns                      node ns ("node A")
//!  w (generator) <────────────> n 10.200.0.1/24      route 10.245.0.0/16 via 10.200.0.3
//!  q (generator) <────────────> p 10.244.1.1/24      (node B: a static neighbour on the wire)
//! ```
//!
//! - The generator ([`lb_common::pktgen`]) is an XDP program on `w` (the wire: the node's
//!   peer, where frames to node B arrive) and on `q` (the local pod's interface). It counts
//!   each frame that arrives translated as expected (the sink), writes the next client
//!   frame over it — 60 bytes from the client 10.200.0.2, outside the cluster CIDR, to the
//!   frontend, the source port of the next of `flows` flows — and sends it back into the
//!   node's `n` (a redirect to `w`, also from `w` itself: a veth wakes its peer for
//!   XDP_TX frames only when the peer runs XDP). A few hundred frames, seeded once
//!   through a packet socket, circulate: the node's receive queue stays full, and every
//!   frame the node receives is an XDP frame arriving in the driver's (veth's) NAPI poll,
//!   where native XDP runs, as from a NIC. (BPF_PROG_TEST_RUN with
//!   BPF_F_TEST_XDP_LIVE_FRAMES, which xdp-trafficgen uses, fails with EPERM on this
//!   machine, whatever the program, interface or namespace: even a two-instruction program
//!   returning XDP_DROP, while the same call without the flag runs.) The loop is closed:
//!   the generator offers a frame each time one arrives, so the rate measured is the node's
//!   (its thread busy near 100%, reported), never more than it forwards.
//! - The sink is the same program: it counts a frame only when it is IPv4, of the
//!   protocol, to the backend's address and port (the translated destination), and the
//!   source address of the last one counted is checked (the client's, or the node's where
//!   the mode source-NATs); every other frame is counted apart and reported.
//! - The node's work: `n`'s NAPI is threaded (`/sys/class/net/n/threaded`), so the whole
//!   receive path of the node — the driver poll, XDP, and for the kernel's modes GRO, the
//!   netfilter hooks, routing and the transmit into the next veth — runs in one kernel
//!   thread, pinned to its own CPU, real-time (SCHED_FIFO) as softirq work effectively is. Its CPU time (`/proc/<tid>/schedstat`, nanoseconds)
//!   over the window, divided by the frames that arrived as expected, is the node's CPU
//!   cost per packet: exactly the node's softirq work, nothing of the generator's (whose
//!   NAPI threads are pinned to another CPU).
//!
//! Each mode has its own bed at each number of Services, built and programmed one after
//! the other; then the modes are measured in turns, [`PpsPlan::runs`] times, so that they
//! share the machine's background load; the report gives the median of the runs and their
//! spread.

use std::net::Ipv4Addr;
use std::os::fd::FromRawFd;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use aya::maps::{Array, MapData, PerCpuArray};
use aya::programs::{Xdp, XdpMode};
use etherparse::PacketBuilder;
use lb_common::pktgen::{self, FRAME_LEN, PktgenConfig, PktgenStats};
use lb_common::program_names;
use lb_userspace::model::Protocol;
use serde::{Deserialize, Serialize};

use super::cluster::{self, BenchPort, BenchService, TARGET_PORT};
use super::e2e::{LbMode, program_in};
use super::kubeproxy;
use super::stats::median;
use super::{ScratchDir, SyncLog};
use lb_testbed::agent::{Agent, lb_bin};
use lb_testbed::netns::Netns;

/// What the packets-per-second benchmark runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PpsPlan {
    /// Numbers of Services.
    pub levels: Vec<usize>,
    /// Measurements of each (mode, backend, protocol, level), in turns with the other modes.
    pub runs: usize,
    /// Seconds of each measurement window.
    pub seconds: f64,
    /// Seconds the generator runs before each window (every flow's first packet, and the
    /// queues filling).
    pub warmup: f64,
    /// Flows: consecutive source ports, sent in turn.
    pub flows: u32,
    /// Frames seeded into the circulation (fewer than a veth's queue of 256, so that no
    /// frame is dropped for want of room and every frame the node forwards is counted).
    pub seeds: u32,
}

impl PpsPlan {
    /// The full plan, or a smaller one with `quick`.
    pub fn new(quick: bool) -> Self {
        PpsPlan {
            levels: if quick {
                vec![1, 1_000]
            } else {
                vec![1, 1_000, 10_000]
            },
            runs: 3,
            seconds: if quick { 0.4 } else { 1.5 },
            warmup: if quick { 0.3 } else { 0.5 },
            flows: 1_024,
            seeds: 192,
        }
    }
}

/// Where the measured Service's backend is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BackendKind {
    /// A pod on node B, reached through the node's NIC (the wire): lb source-NATs and sends
    /// it back out by XDP_TX; the kernel's modes forward it out of the same interface.
    Remote,
    /// A pod on this node, behind its veth: lb translates in XDP and the kernel forwards.
    Local,
}

impl BackendKind {
    /// Both, in report order.
    pub const ALL: [BackendKind; 2] = [BackendKind::Remote, BackendKind::Local];

    /// How the report names it.
    pub fn label(self) -> &'static str {
        match self {
            BackendKind::Remote => "remote backend (on node B, through the NIC)",
            BackendKind::Local => "local backend (a pod on the node)",
        }
    }

    /// The backend pod's address.
    pub fn backend(self) -> Ipv4Addr {
        match self {
            BackendKind::Remote => REMOTE_POD,
            BackendKind::Local => LOCAL_POD,
        }
    }
}

/// A way of forwarding on the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PpsMode {
    /// The client sends to the pod's address; the kernel routes it: no translation.
    Routing,
    /// This datapath (`lb agent`).
    Lb,
    /// kube-proxy's iptables rules with the machine's `iptables-restore` (nf_tables backend).
    Iptables,
    /// The same with `iptables-legacy-restore`.
    IptablesLegacy,
    /// kube-proxy's nftables rules, as this benchmark writes them.
    Nftables,
}

impl PpsMode {
    /// Every mode, in report order.
    pub const ALL: [PpsMode; 5] = [
        PpsMode::Routing,
        PpsMode::Lb,
        PpsMode::Iptables,
        PpsMode::IptablesLegacy,
        PpsMode::Nftables,
    ];

    /// How the report names it, with `kind` of backend.
    pub fn label(self, kind: BackendKind) -> &'static str {
        match (self, kind) {
            (PpsMode::Routing, _) => "routing, no translation (floor)",
            (PpsMode::Lb, BackendKind::Remote) => "lb (XDP: DNAT + SNAT, XDP_TX)",
            (PpsMode::Lb, BackendKind::Local) => "lb (XDP DNAT, the kernel forwards)",
            (PpsMode::Iptables, _) => "kube-proxy iptables",
            (PpsMode::IptablesLegacy, _) => "kube-proxy iptables (legacy)",
            (PpsMode::Nftables, _) => "kube-proxy nftables (emulation)",
        }
    }
}

/// The protocol of the generated flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum L4 {
    /// TCP segments (ACK and PSH, 6 bytes of data).
    Tcp,
    /// UDP datagrams (18 bytes of data).
    Udp,
}

impl L4 {
    /// Both, in report order.
    pub const ALL: [L4; 2] = [L4::Tcp, L4::Udp];

    /// The Service protocol.
    pub fn protocol(self) -> Protocol {
        match self {
            L4::Tcp => Protocol::Tcp,
            L4::Udp => Protocol::Udp,
        }
    }
}

impl std::fmt::Display for L4 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.protocol().fmt(f)
    }
}

/// One measurement window.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PpsRun {
    /// Expected frames that arrived per second (millions): what the node forwarded.
    pub sink_mpps: f64,
    /// The node's CPU nanoseconds per forwarded frame.
    pub node_ns: f64,
    /// The node thread's busy share of its CPU (0 to 1).
    pub node_busy: f64,
    /// The generator's NAPI threads' busy share of their CPU (0 to 1).
    pub generator_busy: f64,
    /// Frames at the generator that were not the expected ones.
    pub other: u64,
    /// Frames still circulating when the window ended (of [`PpsPlan::seeds`]).
    pub circulating: u64,
    /// Seconds of the window.
    pub seconds: f64,
}

/// One (mode, backend, protocol, level), its runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PpsRow {
    /// The mode.
    pub mode: PpsMode,
    /// The backend.
    pub backend: BackendKind,
    /// TCP or UDP.
    pub proto: L4,
    /// Services programmed.
    pub services: usize,
    /// The measurements, in the order taken.
    pub runs: Vec<PpsRun>,
    /// What the sink saw and was checked: destination and source of the frames.
    pub checked: String,
}

impl PpsRow {
    /// The median over the runs of `value`.
    pub fn median(&self, value: impl Fn(&PpsRun) -> f64) -> f64 {
        let values: Vec<f64> = self.runs.iter().map(value).collect();
        median(&values).unwrap_or(f64::NAN)
    }

    /// The largest deviation of a run's `value` from the median, in percent of it.
    pub fn spread(&self, value: impl Fn(&PpsRun) -> f64) -> f64 {
        let m = self.median(&value);
        self.runs
            .iter()
            .map(|r| 100.0 * (value(r) - m).abs() / m)
            .fold(0.0, f64::max)
    }
}

/// A (mode, backend, level) that could not be measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PpsFailure {
    /// The mode.
    pub mode: PpsMode,
    /// The backend.
    pub backend: BackendKind,
    /// Services.
    pub services: usize,
    /// Why.
    pub error: String,
}

/// Everything the packets-per-second benchmark measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PpsResults {
    /// The measurements.
    pub rows: Vec<PpsRow>,
    /// What failed.
    pub failures: Vec<PpsFailure>,
    /// The CPU the node's receive thread ran on.
    pub node_cpu: usize,
    /// The CPU the generator and the sinks ran on.
    pub generator_cpu: usize,
}

impl PpsResults {
    /// The row of (`mode`, `backend`, `proto`, `services`).
    pub fn get(
        &self,
        mode: PpsMode,
        backend: BackendKind,
        proto: L4,
        services: usize,
    ) -> Option<&PpsRow> {
        self.rows.iter().find(|r| {
            r.mode == mode && r.backend == backend && r.proto == proto && r.services == services
        })
    }
}

/// The client's address (outside the cluster CIDR: kube-proxy's rules masquerade it).
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
/// The node's address on its NIC.
const NODE: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
/// Node B, the remote pods' node: a neighbour on the wire.
const NODE_B: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 3);
/// The pod on node B that is the remote backend.
const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 245, 1, 2);
/// The node's side of the pod's veth.
const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
/// The pod on this node that is the local backend.
const LOCAL_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
/// The client's MAC address: the wire's `w`.
const WIRE_MAC: &str = "02:00:00:00:01:02";
/// The node's NIC, `n`.
const NODE_MAC: &str = "02:00:00:00:01:01";
/// Node B's, a static neighbour entry on the node (the frames to it arrive at `w`).
const NODE_B_MAC: &str = "02:00:00:00:01:03";
/// The local pod's interface, `q`.
const POD_MAC: &str = "02:00:00:00:01:04";
const NODE_NAME: &str = "node-a";
/// The first source port of the generated flows.
const FIRST_SPORT: u16 = 10_000;
/// How long the agent may take to program the Services.
const PROGRAM_TIMEOUT: Duration = Duration::from_secs(300);

fn mac(text: &str) -> [u8; 6] {
    let mut out = [0u8; 6];
    for (o, part) in out.iter_mut().zip(text.split(':')) {
        *o = u8::from_str_radix(part, 16).expect("a constant MAC address");
    }
    out
}

/// The measured Service: the last of `n`, with a TCP and a UDP port 80 and one endpoint, the
/// `kind` backend (on node B for a remote one, this node for a local one).
pub fn services(n: usize, kind: BackendKind) -> Vec<BenchService> {
    let mut services = cluster::services(n, 10, &[(kind.backend(), TARGET_PORT)]);
    let measured = services.last_mut().expect("n >= 1");
    measured.ports = vec![
        BenchPort {
            name: "tcp".to_owned(),
            protocol: Protocol::Tcp,
            port: cluster::SERVICE_PORT,
        },
        BenchPort {
            name: "udp".to_owned(),
            protocol: Protocol::Udp,
            port: cluster::SERVICE_PORT,
        },
    ];
    measured.node = Some(match kind {
        BackendKind::Remote => "node-b".to_owned(),
        BackendKind::Local => NODE_NAME.to_owned(),
    });
    services
}

/// A 60-byte frame of the client from `sport` to `dst`: TCP (ACK and PSH, 6 bytes of data)
/// or UDP (18 bytes of data), checksums filled in.
pub fn frame(proto: L4, sport: u16, dst: (Ipv4Addr, u16)) -> Result<Vec<u8>> {
    let ip = PacketBuilder::ethernet2(mac(WIRE_MAC), mac(NODE_MAC)).ipv4(
        CLIENT.octets(),
        dst.0.octets(),
        64,
    );
    let mut out = Vec::with_capacity(FRAME_LEN);
    match proto {
        L4::Tcp => ip
            .tcp(sport, dst.1, 1_000, 64_240)
            .ack(1)
            .psh()
            .write(&mut out, &[0x55; 6])?,
        L4::Udp => ip.udp(sport, dst.1).write(&mut out, &[0x55; 18])?,
    }
    ensure!(out.len() == FRAME_LEN, "a frame of {} bytes", out.len());
    Ok(out)
}

/// The generator's object, its maps taken out.
struct Pktgen {
    ebpf: aya::Ebpf,
    config: Array<MapData, PktgenConfig>,
    stats: PerCpuArray<MapData, PktgenStats>,
}

impl Pktgen {
    fn load() -> Result<Self> {
        let mut ebpf = aya::EbpfLoader::new()
            .load(lb_userspace::PKTGEN_OBJECT)
            .context("loading the packet generator")?;
        let prog: &mut Xdp = ebpf
            .program_mut(program_names::PKTGEN_XDP)
            .context("no generator program")?
            .try_into()?;
        prog.load().context("loading the generator program")?;
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .with_context(|| format!("no map {name}"))
        };
        let config = Array::try_from(take(pktgen::map_names::CONFIG)?)?;
        let stats = PerCpuArray::try_from(take(pktgen::map_names::STATS)?)?;
        Ok(Pktgen {
            ebpf,
            config,
            stats,
        })
    }

    /// Attaches the generator to `dev` in `ns` (native XDP).
    fn attach(&mut self, ns: &Netns, dev: &str) -> Result<()> {
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(program_names::PKTGEN_XDP)
            .context("no generator program")?
            .try_into()?;
        ns.run(|| prog.attach(dev, XdpMode::Driver))?
            .with_context(|| format!("attaching the generator to {dev} in {}", ns.name()))?;
        Ok(())
    }

    /// (expected frames, other frames) counted so far.
    fn counts(&self) -> Result<(u64, u64)> {
        let (mut matched, mut other) = (0, 0);
        for s in self.stats.get(&0, 0)?.iter() {
            matched += s.matched;
            other += s.other;
        }
        Ok((matched, other))
    }

    /// Expected frames that arrived while the generator was stopped, on every CPU.
    fn drained(&self) -> Result<u64> {
        Ok(self.stats.get(&0, 0)?.iter().map(|s| s.drained).sum())
    }

    /// The source address of the last expected frame on a CPU that counted one.
    fn last_source(&self) -> Result<Option<Ipv4Addr>> {
        Ok(self
            .stats
            .get(&0, 0)?
            .iter()
            .find(|s| s.matched > 0)
            .map(|s| Ipv4Addr::from(s.last_saddr.to_ne_bytes())))
    }
}

/// Interface names of one bed, unique on the machine (NAPI threads are named after them).
struct Names {
    wire: String,
    node: String,
    pod_host: String,
    pod: String,
}

impl Names {
    fn new() -> Self {
        use std::sync::atomic::AtomicU32;
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{:x}g{n:x}", std::process::id());
        Names {
            wire: format!("w{tag}"),
            node: format!("n{tag}"),
            pod_host: format!("p{tag}"),
            pod: format!("q{tag}"),
        }
    }
}

/// The NAPI threads the bed measures.
#[derive(Debug, Clone)]
struct Threads {
    /// The node's NIC's.
    node: u32,
    /// The generator's (`w`, `q`).
    generator: Vec<u32>,
}

/// One mode's bed at one number of Services, programmed.
struct PpsBed {
    /// Declared first: stopped before the namespaces go.
    _lb: Option<LbMode>,
    pktgen: Pktgen,
    mode: PpsMode,
    kind: BackendKind,
    services: Vec<BenchService>,
    names: Names,
    threads: Threads,
    tester: Netns,
    /// Held for its life: the namespace goes on drop.
    _node: Netns,
}

/// CPUs: the node's receive thread on the last, the generator and the sinks on the first.
fn cpus() -> (usize, usize) {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    (n - 1, 0)
}

/// Pins thread `tid` (0: the calling thread) to `cpu`.
fn pin(tid: u32, cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET and sched_setaffinity get a valid
    // pointer to it and its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(tid as i32, std::mem::size_of_val(&set), &set) != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("pinning thread {tid} to CPU {cpu}"));
        }
    }
    Ok(())
}

/// Thread ids of the kernel's NAPI threads (`napi/<dev>-<id>`).
fn napi_threads() -> Result<Vec<u32>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").context("read /proc")? {
        let Ok(pid) = entry?.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.starts_with("napi/") {
            out.push(pid);
        }
    }
    Ok(out)
}

/// The real-time priority of the NAPI threads: softirq work preempts ordinary tasks at
/// once, and so must the threads that do it here, on a machine where other work runs.
const NAPI_PRIORITY: i32 = 50;

/// Makes `dev`'s NAPI threaded and returns its thread (the one that appeared), pinned to
/// `cpu`, SCHED_FIFO at [`NAPI_PRIORITY`].
fn threaded_napi(ns: &Netns, dev: &str, cpu: usize) -> Result<u32> {
    let before = napi_threads()?;
    // sysfs shows the devices of the namespace it was mounted in: `ip netns exec` mounts one.
    lb_testbed::netns::run(
        std::process::Command::new("ip")
            .args(["netns", "exec", ns.name(), "sh", "-c"])
            .arg(format!("echo 1 > /sys/class/net/{dev}/threaded")),
    )?;
    let new: Vec<u32> = napi_threads()?
        .into_iter()
        .filter(|t| !before.contains(t))
        .collect();
    let comm = |t: &u32| std::fs::read_to_string(format!("/proc/{t}/comm")).unwrap_or_default();
    // The name is cut at 15 bytes.
    let want: String = format!("napi/{dev}-").chars().take(15).collect();
    let ours: Vec<u32> = new
        .into_iter()
        .filter(|t| comm(t).starts_with(&want))
        .collect();
    let [thread] = ours[..] else {
        bail!(
            "{dev} in {}: NAPI threads {ours:?} appeared (wanted one)",
            ns.name()
        );
    };
    pin(thread, cpu)?;
    let param = libc::sched_param {
        sched_priority: NAPI_PRIORITY,
    };
    // SAFETY: sched_setscheduler(2) reads `param`, valid for the call.
    if unsafe { libc::sched_setscheduler(thread as i32, libc::SCHED_FIFO, &param) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("SCHED_FIFO for NAPI thread {thread} of {dev}"));
    }
    Ok(thread)
}

/// CPU nanoseconds thread `tid` has run (`/proc/<tid>/schedstat`).
fn runtime_ns(tid: u32) -> Result<u64> {
    let path = format!("/proc/{tid}/schedstat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    text.split_whitespace()
        .next()
        .and_then(|f| f.parse().ok())
        .with_context(|| format!("{path}: {text:?}"))
}

impl PpsBed {
    /// Builds the bed and programs `services` (the measured one last) in `mode`.
    fn new(mode: PpsMode, kind: BackendKind, services: Vec<BenchService>) -> Result<Self> {
        let names = Names::new();
        let tester = Netns::new("pps-tester")?;
        let node = Netns::new("pps-node")?;
        node.veth(&names.node, &tester, &names.wire)?;
        node.veth(&names.pod_host, &tester, &names.pod)?;
        node.ip(&["link", "set", &names.node, "address", NODE_MAC])?;
        tester.ip(&["link", "set", &names.wire, "address", WIRE_MAC])?;
        tester.ip(&["link", "set", &names.pod, "address", POD_MAC])?;
        node.addr(&names.node, &format!("{NODE}/24"))?;
        node.addr(&names.pod_host, &format!("{POD_GATEWAY}/24"))?;
        for dev in [&names.wire, &names.pod] {
            tester.ip(&["link", "set", dev, "up"])?;
        }
        for (addr, lladdr, dev) in [
            (CLIENT, WIRE_MAC, &names.node),
            (NODE_B, NODE_B_MAC, &names.node),
            (LOCAL_POD, POD_MAC, &names.pod_host),
        ] {
            node.ip(&[
                "neigh",
                "replace",
                &addr.to_string(),
                "lladdr",
                lladdr,
                "nud",
                "permanent",
                "dev",
                dev,
            ])?;
        }
        node.ip(&["route", "add", "10.245.0.0/16", "via", &NODE_B.to_string()])?;
        node.sysctl("net/ipv4/ip_forward", "1")?;
        // The remote backend is reached through the interface the packet came in by; a
        // router would send the client an ICMP redirect for each (lb does not).
        for conf in ["all", &names.node] {
            node.sysctl(&format!("net/ipv4/conf/{conf}/send_redirects"), "0")?;
        }
        // GRO on the node's NIC, as on a physical one (and a veth receives XDP frames only
        // with it or an XDP program).
        lb_testbed::netns::run(
            node.command("ethtool")
                .args(["-K", &names.node, "gro", "on"]),
        )?;

        let mut pktgen = Pktgen::load()?;
        pktgen.attach(&tester, &names.wire)?;
        pktgen.attach(&tester, &names.pod)?;

        let lb = match mode {
            PpsMode::Routing => None,
            PpsMode::Lb => Some(program_lb(&node, &names.node, &services)?),
            PpsMode::Iptables | PpsMode::IptablesLegacy => {
                let restore = if mode == PpsMode::Iptables {
                    "iptables-restore"
                } else {
                    "iptables-legacy-restore"
                };
                let rules = kubeproxy::iptables_restore(&services);
                program_in(&node, restore, &["-w", "5"], &rules, RULES_TIMEOUT)?
                    .with_context(|| format!("{restore} took over {RULES_TIMEOUT:?}"))?;
                None
            }
            PpsMode::Nftables => {
                let rules = kubeproxy::nft_ruleset(&services);
                program_in(&node, "nft", &["-f", "-"], &rules, RULES_TIMEOUT)?
                    .with_context(|| format!("nft -f took over {RULES_TIMEOUT:?}"))?;
                None
            }
        };

        let (node_cpu, generator_cpu) = cpus();
        let threads = Threads {
            node: threaded_napi(&node, &names.node, node_cpu)?,
            generator: vec![
                threaded_napi(&tester, &names.wire, generator_cpu)?,
                threaded_napi(&tester, &names.pod, generator_cpu)?,
            ],
        };
        Ok(PpsBed {
            _lb: lb,
            pktgen,
            mode,
            kind,
            services,
            names,
            threads,
            tester,
            _node: node,
        })
    }

    /// Where the generator sends `proto` frames, and where they must arrive.
    fn destinations(&self, proto: L4) -> Result<((Ipv4Addr, u16), (Ipv4Addr, u16))> {
        let backend = (self.kind.backend(), TARGET_PORT);
        if self.mode == PpsMode::Routing {
            return Ok((backend, backend));
        }
        let measured = self.services.last().context("no Services")?;
        let port = measured
            .ports
            .iter()
            .find(|p| p.protocol == proto.protocol())
            .with_context(|| format!("the measured Service has no {proto} port"))?;
        Ok(((measured.cluster_ip, port.port), backend))
    }

    /// The source address the frames must have when they arrive: the client's when nothing
    /// source-NATs them, else the node's address on the way out.
    fn expected_source(&self) -> Ipv4Addr {
        match (self.mode, self.kind) {
            (PpsMode::Routing, _) | (PpsMode::Lb, BackendKind::Local) => CLIENT,
            (_, BackendKind::Remote) => NODE,
            (_, BackendKind::Local) => POD_GATEWAY,
        }
    }

    /// (CPU nanoseconds of the node's thread, of the generator's threads) so far.
    fn runtimes(&self) -> Result<(u64, u64)> {
        let mut generator = 0;
        for &t in &self.threads.generator {
            generator += runtime_ns(t)?;
        }
        Ok((runtime_ns(self.threads.node)?, generator))
    }

    /// One measurement window of `proto` traffic; on failure, with the datapath's counters
    /// when lb forwards.
    fn measure(&mut self, plan: &PpsPlan, proto: L4) -> Result<(PpsRun, String)> {
        self.measure_once(plan, proto).map_err(|e| match &self._lb {
            Some(lb) => {
                let stats = std::process::Command::new(lb.agent.lb())
                    .arg("stats")
                    .arg("--pin-path")
                    .arg(lb.agent.pin_path())
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_else(|e| format!("(lb stats: {e})"));
                e.context(format!("lb stats:\n{stats}"))
            }
            None => e,
        })
    }

    fn measure_once(&mut self, plan: &PpsPlan, proto: L4) -> Result<(PpsRun, String)> {
        let (dst, arrive) = self.destinations(proto)?;
        let template = frame(proto, FIRST_SPORT, dst)?;
        let wire = self.names.wire.clone();
        let tx_ifindex = self.tester.run(|| ifindex(&wire))??;
        let mut config = PktgenConfig {
            frame: [0; FRAME_LEN],
            sport: FIRST_SPORT.to_be(),
            proto: proto.protocol().number(),
            active: 1,
            flows: plan.flows,
            tx_ifindex,
            expect_daddr: u32::from_ne_bytes(arrive.0.octets()),
            expect_dport: arrive.1.to_be(),
            _pad: 0,
        };
        config.frame.copy_from_slice(&template);
        self.pktgen.config.set(0, config, 0)?;
        let measured = (|| {
            let seeds: Vec<Vec<u8>> = (0..plan.seeds)
                .map(|i| frame(proto, FIRST_SPORT.wrapping_add(i as u16), dst))
                .collect::<Result<_>>()?;
            self.tester.run(|| send_frames(&wire, &seeds))??;
            let warm_until = Instant::now() + Duration::from_secs_f64(plan.warmup);
            std::thread::sleep(Duration::from_secs_f64(plan.warmup));
            // Every flow's first packet through, at least twice over.
            loop {
                let (matched, other) = self.pktgen.counts()?;
                if matched >= 2 * u64::from(plan.flows) {
                    break;
                }
                ensure!(
                    Instant::now() < warm_until + Duration::from_secs(10),
                    "{matched} frames arrived as expected in {:.1} s ({other} other frames): \
                     the node did not forward {} seeded frames to {}:{}",
                    plan.warmup + 10.0,
                    plan.seeds,
                    arrive.0,
                    arrive.1
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            let (t0, c0, r0) = (Instant::now(), self.pktgen.counts()?, self.runtimes()?);
            std::thread::sleep(Duration::from_secs_f64(plan.seconds));
            let (t1, c1, r1) = (Instant::now(), self.pktgen.counts()?, self.runtimes()?);
            Ok((
                (t1 - t0).as_secs_f64(),
                c1.0 - c0.0,
                c1.1 - c0.1,
                r1.0 - r0.0,
                r1.1 - r0.1,
            ))
        })();
        // Stop the circulation, and count the frames still in it: each arrives once more and
        // the generator counts it as drained. (Matched counts read after the stop would race
        // the node's real-time NAPI threads, which may deliver every frame before this thread
        // reads: 0 circulating, 2 runs in 3 on a busy machine.)
        let drained_before = self.pktgen.drained()?;
        config.active = 0;
        self.pktgen.config.set(0, config, 0)?;
        std::thread::sleep(Duration::from_millis(100));
        let circulating = self.pktgen.drained()? - drained_before;
        let (seconds, matched, other, node_ns, generator_ns): (f64, u64, u64, u64, u64) = measured?;
        ensure!(matched > 0, "no frame arrived in the window");
        let source = self.pktgen.last_source()?.context("no frame arrived")?;
        ensure!(
            source == self.expected_source(),
            "frames arrived from {source}, expected from {}",
            self.expected_source()
        );
        let checked = format!(
            "{proto} to {}:{} arrive at {}:{} from {source}",
            dst.0, dst.1, arrive.0, arrive.1,
        );
        Ok((
            PpsRun {
                sink_mpps: matched as f64 / seconds / 1e6,
                node_ns: node_ns as f64 / matched as f64,
                node_busy: node_ns as f64 / 1e9 / seconds,
                generator_busy: generator_ns as f64 / 1e9 / seconds,
                other,
                circulating,
                seconds,
            },
            checked,
        ))
    }
}

/// How long iptables-restore and nft may take.
const RULES_TIMEOUT: Duration = Duration::from_secs(600);

/// The index of `dev` in the calling thread's namespace.
fn ifindex(dev: &str) -> Result<u32> {
    let name = std::ffi::CString::new(dev)?;
    // SAFETY: if_nametoindex reads a NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    ensure!(index != 0, "no interface {dev}");
    Ok(index)
}

/// Sends `frames` out of `dev` (in the calling thread's namespace) through a packet socket.
fn send_frames(dev: &str, frames: &[Vec<u8>]) -> Result<()> {
    let index = ifindex(dev)?;
    // SAFETY: socket(2) with constant arguments; the descriptor is owned by `fd` from here.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("packet socket");
    }
    // SAFETY: `fd` is a descriptor we just opened and own.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero sockaddr_ll is valid; its fields are set below.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = index as i32;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&mac(NODE_MAC));
    for frame in frames {
        // SAFETY: sendto(2) reads `frame` and `addr`, both valid for the lengths given.
        let sent = unsafe {
            libc::sendto(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if sent < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("sending a frame out of {dev}"));
        }
    }
    Ok(())
}

/// The agent on the node, on `dev`, with `services` programmed.
fn program_lb(node: &Netns, dev: &str, services: &[BenchService]) -> Result<LbMode> {
    let folder = ScratchDir::new("pps-manifests")?;
    std::fs::write(
        folder.path().join("cluster.yaml"),
        cluster::manifests_yaml(services, |_| false),
    )?;
    let start = Instant::now();
    let mut agent = Agent::start_on_node(
        &lb_bin(),
        node,
        folder.path(),
        dev,
        NODE_NAME,
        &["--resync-secs", "3600"],
    )?;
    let frontends = services.iter().map(|s| s.ports.len()).sum();
    let synced = SyncLog::default().wait(&mut agent, frontends, PROGRAM_TIMEOUT)?;
    Ok(LbMode {
        program_seconds: (synced.seen_at - start).as_secs_f64(),
        agent_seconds: synced.agent_seconds,
        agent,
        folder,
    })
}

/// Runs the benchmark: at each level, every mode's bed for each kind of backend, then the
/// measurements in turns.
pub fn run(plan: &PpsPlan) -> Result<PpsResults> {
    let (node_cpu, generator_cpu) = cpus();
    let mut results = PpsResults {
        rows: Vec::new(),
        failures: Vec::new(),
        node_cpu,
        generator_cpu,
    };
    let protos = L4::ALL;
    for &level in &plan.levels {
        for kind in BackendKind::ALL {
            let mut beds = Vec::new();
            for mode in PpsMode::ALL {
                let start = Instant::now();
                match PpsBed::new(mode, kind, services(level, kind)) {
                    Ok(bed) => {
                        eprintln!(
                            "pps: {} ({}) at {level} Services: ready in {:.1} s",
                            mode.label(kind),
                            kind.label(),
                            start.elapsed().as_secs_f64()
                        );
                        beds.push(bed);
                    }
                    Err(e) => results.failures.push(failure(mode, kind, level, e)),
                }
            }
            let mut rows: Vec<Option<PpsRow>> = Vec::new();
            for _ in 0..plan.runs {
                for (b, bed) in beds.iter_mut().enumerate() {
                    for (p, &proto) in protos.iter().enumerate() {
                        let slot = b * protos.len() + p;
                        if rows.len() <= slot {
                            rows.resize(slot + 1, None);
                            rows[slot] = Some(PpsRow {
                                mode: bed.mode,
                                backend: kind,
                                proto,
                                services: level,
                                runs: Vec::new(),
                                checked: String::new(),
                            });
                        }
                        let Some(row) = rows[slot].as_mut() else {
                            continue;
                        };
                        match bed.measure(plan, proto) {
                            Ok((run, checked)) => {
                                row.runs.push(run);
                                row.checked = checked;
                            }
                            Err(e) => {
                                results.failures.push(failure(bed.mode, kind, level, e));
                                rows[slot] = None;
                            }
                        }
                    }
                }
            }
            for row in rows.into_iter().flatten() {
                eprintln!(
                    "pps: {} {} at {level} Services: {:.3} Mpps, {:.0} ns per packet, node busy {:.0}%, generator busy {:.0}%",
                    row.mode.label(kind),
                    row.proto,
                    row.median(|r| r.sink_mpps),
                    row.median(|r| r.node_ns),
                    100.0 * row.median(|r| r.node_busy),
                    100.0 * row.median(|r| r.generator_busy),
                );
                results.rows.push(row);
            }
        }
    }
    Ok(results)
}

fn failure(mode: PpsMode, backend: BackendKind, services: usize, e: anyhow::Error) -> PpsFailure {
    eprintln!(
        "pps: {} ({}) at {services} Services FAILED: {e:#}",
        mode.label(backend),
        backend.label()
    );
    PpsFailure {
        mode,
        backend,
        services,
        error: format!("{e:#}"),
    }
}

/// One bed of `mode` with `kind` of backend and `n` Services, one measurement window of
/// `proto`: the run's (what the sink counted, what it checked). The integration test's.
pub fn measure_one(
    plan: &PpsPlan,
    mode: PpsMode,
    kind: BackendKind,
    n: usize,
    proto: L4,
) -> Result<(PpsRun, String)> {
    let mut bed = PpsBed::new(mode, kind, services(n, kind))?;
    bed.measure(plan, proto)
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{SlicedPacket, TransportSlice};

    fn checks(frame: &[u8]) -> (u16, u16) {
        let packet = SlicedPacket::from_ethernet(frame).expect("a frame");
        match packet.transport {
            Some(TransportSlice::Tcp(t)) => (t.source_port(), t.checksum()),
            Some(TransportSlice::Udp(u)) => (u.source_port(), u.checksum()),
            other => panic!("not TCP or UDP: {other:?}"),
        }
    }

    /// The generator writes flow k's frame as the template with another source port and the
    /// checksum [`pktgen::sport_check`] gives: the same bytes as a frame built for that port.
    #[test]
    fn the_generators_frames_are_the_frames_built_for_their_port() {
        let dst = (Ipv4Addr::new(10, 96, 0, 1), 80);
        for proto in L4::ALL {
            let template = frame(proto, FIRST_SPORT, dst).unwrap();
            assert_eq!(template.len(), FRAME_LEN);
            let check_at = match proto {
                L4::Tcp => pktgen::TCP_CHECK_OFF,
                L4::Udp => pktgen::UDP_CHECK_OFF,
            };
            assert_eq!(
                checks(&template).1.to_be_bytes(),
                template[check_at..check_at + 2]
            );
            for flow in [1u16, 2, 255, 256, 1_023, 55_535] {
                let sport = FIRST_SPORT.wrapping_add(flow);
                let mut generated = template.clone();
                generated[pktgen::SPORT_OFF..pktgen::SPORT_OFF + 2]
                    .copy_from_slice(&sport.to_be_bytes());
                let old = u16::from_ne_bytes([template[check_at], template[check_at + 1]]);
                let new = pktgen::sport_check(
                    proto.protocol().number(),
                    old,
                    FIRST_SPORT.to_be(),
                    sport.to_be(),
                );
                generated[check_at..check_at + 2].copy_from_slice(&new.to_ne_bytes());
                let built = frame(proto, sport, dst).unwrap();
                assert_eq!(generated, built, "{proto} flow {flow}");
                assert_eq!(checks(&generated).0, sport);
            }
        }
    }

    #[test]
    fn a_udp_datagram_without_checksum_keeps_none_and_zero_is_sent_as_ones() {
        let udp = lb_common::PROTO_UDP;
        assert_eq!(pktgen::sport_check(udp, 0, 1, 2), 0);
        // An unchanged port leaves the checksum as it was; one that would become 0 is sent
        // as all ones (UDP only).
        let check = lb_common::csum::replace2(0x1234, 7, 7);
        assert_eq!(pktgen::sport_check(udp, check, 7, 7), check);
        let zero_after = (0u16..=u16::MAX)
            .find(|&c| c != 0 && lb_common::csum::replace2(c, 0x0100, 0x0200) == 0)
            .expect("some checksum becomes 0");
        assert_eq!(pktgen::sport_check(udp, zero_after, 0x0100, 0x0200), 0xffff);
        assert_eq!(
            pktgen::sport_check(lb_common::PROTO_TCP, zero_after, 0x0100, 0x0200),
            0
        );
    }

    #[test]
    fn the_measured_service_is_the_last_with_a_tcp_and_a_udp_port_on_its_node() {
        for kind in BackendKind::ALL {
            let all = services(20, kind);
            assert_eq!(all.len(), 20);
            let measured = all.last().unwrap();
            let protocols: Vec<Protocol> = measured.ports.iter().map(|p| p.protocol).collect();
            assert_eq!(protocols, [Protocol::Tcp, Protocol::Udp]);
            assert_eq!(measured.endpoints, [(kind.backend(), TARGET_PORT)]);
            assert!(all[..19].iter().all(|s| s.ports.len() == 1));
        }
    }

    #[test]
    fn spread_is_the_largest_deviation_from_the_median() {
        let run = |mpps| PpsRun {
            sink_mpps: mpps,
            node_ns: 1.0,
            node_busy: 1.0,
            generator_busy: 0.5,
            other: 0,
            circulating: 0,
            seconds: 1.0,
        };
        let row = PpsRow {
            mode: PpsMode::Lb,
            backend: BackendKind::Remote,
            proto: L4::Tcp,
            services: 1,
            runs: vec![run(1.0), run(2.0), run(1.5)],
            checked: String::new(),
        };
        assert_eq!(row.median(|r| r.sink_mpps), 1.5);
        assert!((row.spread(|r| r.sink_mpps) - 100.0 / 3.0).abs() < 1e-9);
    }
}
