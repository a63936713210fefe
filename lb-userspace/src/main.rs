//! `lb`: the load balancer's agent and its inspection commands.

/// mimalloc: reading a folder of manifests allocates and frees millions of small YAML values;
/// glibc's malloc and free were a third of the time of a 10,000-Service folder.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::{
    io::IsTerminal as _,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use lb_userspace::{
    agent::{self, AgentConfig, SourceConfig},
    datapath::{
        BpfMaps, Capacity, Counters, DEFAULT_PIN_DIR, Pins,
        eastwest::SocketHooks,
        explain::{Explainer, Flow, monotonic_ns},
        inspect,
        maps::DatapathMaps as _,
    },
    health, metrics,
    model::{Forwarding, IpCidr, NodeInfo, NodeTopology, Protocol, Selection},
    plan::{maglev, render::Plan, translate},
    source::{
        kube::KubeConfig,
        manifests::{
            allocate::{self, Ranges},
            load as manifest,
        },
    },
    sync::SyncConfig,
};

#[derive(Parser)]
#[command(
    name = "lb",
    version,
    about = "Kubernetes Service load balancer with an eBPF datapath"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attach the datapath to an interface and keep it programmed from a source: a manifests
    /// folder (--manifests), the Kubernetes API with a kubeconfig (--kubeconfig), or else the
    /// Kubernetes API from inside a pod (in-cluster configuration).
    Agent {
        /// Folder of Kubernetes YAML manifests (Services, EndpointSlices, Endpoints).
        #[arg(long, conflicts_with = "kubeconfig")]
        manifests: Option<PathBuf>,
        /// kubeconfig file for the Kubernetes API.
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// The Kubernetes API server's address (`https://HOST:PORT`), in place of the
        /// kubeconfig's or, in a pod, of the in-cluster one (KUBERNETES_SERVICE_HOST: the
        /// `kubernetes` Service's ClusterIP, which nothing translates on a node without
        /// kube-proxy until lb has programmed it). In a pod the service account still
        /// authenticates. Empty: not set.
        #[arg(long, env = "LB_API_SERVER")]
        api_server: Option<String>,
        /// An external interface of the node (repeatable): XDP translates frontends arriving
        /// there, TC translates the replies leaving there. Default: the interfaces that hold
        /// the node's addresses (--node-ip, else the Node object's), else those of the
        /// default routes; followed as interfaces, addresses and routes come and go.
        #[arg(long = "interface")]
        interfaces: Vec<String>,
        /// Where maps and links are pinned, on a bpffs that outlives the agent (the host's:
        /// mounted at /sys/fs/bpf if missing, only in the host's mount namespace).
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_path: PathBuf,
        /// Node address for NodePort frontends, IPv4 or IPv6 (repeatable); default: the Node
        /// object's InternalIP and ExternalIP addresses (Kubernetes), else the external
        /// interfaces'.
        #[arg(long = "node-ip")]
        node_ips: Vec<IpAddr>,
        /// This node's name, as in EndpointSlice nodeName and the Node object; default: the
        /// host name.
        #[arg(long)]
        node_name: Option<String>,
        #[command(flatten)]
        topology: Box<TopologyArgs>,
        /// Seconds between full resyncs, besides the updates changes trigger.
        #[arg(long, default_value_t = 60)]
        resync_secs: u64,
        #[command(flatten)]
        ranges: RangeArgs,
        /// Address for /metrics, /healthz and /readyz.
        #[arg(long, default_value = metrics::DEFAULT_ADDR)]
        metrics_addr: SocketAddr,
        #[command(flatten)]
        health: Box<HealthArgs>,
        /// Kubernetes: the longest wait, in seconds, for the initial lists before the first
        /// sync (after it the agent goes on without the Node, never without Services or
        /// EndpointSlices).
        #[arg(long, default_value_t = 30)]
        initial_sync_timeout_secs: u64,
        /// Kubernetes: milliseconds without events that end a batch of changes (0: a batch
        /// is what has arrived when the agent is free; no wait).
        #[arg(long, default_value_t = 0)]
        debounce_ms: u64,
        /// The largest Maglev table, in entries: a prime. Each Service's table gets at least
        /// 100 entries per backend up to this size (251 for 1-2 backends, 1021 for up to
        /// 10, ...), which keeps its backends' loads within 1% of each other; the default
        /// does so for Services of up to 163 backends.
        #[arg(long, default_value_t = maglev::DEFAULT_TABLE_SIZE, value_parser = parse_table_size)]
        maglev_table_size: u32,
        /// How new flows choose a backend when the Service does not say (annotation
        /// lb.kube-lb.io/selection): maglev (consistent hashing) or random.
        #[arg(long, default_value_t = Selection::Maglev)]
        selection: Selection,
        /// How flows from outside reach backends on other nodes when the Service does not
        /// say (annotation lb.kube-lb.io/forwarding): snat (source NAT to this node, the
        /// replies come back through it; kube-proxy's way) or dsr (direct server return:
        /// carried to the backend's node in Geneve over UDP port 6081, whose lb sends the
        /// replies straight to the client; needs lb on every node, and a network that lets
        /// nodes send packets from the frontend's address).
        #[arg(long, default_value_t = Forwarding::Snat)]
        forwarding: Forwarding,
        /// Seconds a backend that left the EndpointSlices keeps serving its established
        /// TCP connections before its entry is deleted.
        #[arg(long, default_value_t = 60)]
        drain_secs: u64,
        /// Seconds that frontends found pinned at start which the first complete view of the
        /// source lacks (orphans, e.g. of a Service deleted while the agent was down) keep
        /// working before they are removed.
        #[arg(long, default_value_t = 60)]
        orphan_grace_secs: u64,
        #[command(flatten)]
        east_west: Box<EastWestArgs>,
        #[command(flatten)]
        capacity: CapacityArgs,
    },
    /// Print the frontends and backends a manifests folder translates to, without touching
    /// the kernel (the agent's own translation). Exits with an error after printing when some
    /// objects could not be read.
    Plan {
        /// Folder of Kubernetes YAML manifests (Services, EndpointSlices, Endpoints).
        #[arg(long)]
        manifests: PathBuf,
        /// This node's name, as in EndpointSlice nodeName (for the Local traffic policies).
        #[arg(long)]
        node_name: String,
        /// Node address for NodePort frontends, IPv4 or IPv6 (repeatable); none means no
        /// NodePort frontends.
        #[arg(long = "node-ip")]
        node_ips: Vec<IpAddr>,
        #[command(flatten)]
        topology: TopologyArgs,
        #[command(flatten)]
        ranges: RangeArgs,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Show the programmed frontends and their backends, read from the pinned maps.
    Services {
        /// Where the agent pinned the maps.
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_path: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Packets, bytes and new flows per frontend and per backend, conntrack occupancy and
    /// evictions, and the drop and decision counters, read from the pinned maps.
    Stats {
        /// Where the agent pinned the maps.
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_path: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Which frontend a flow hits, which backend it gets and why (conntrack, affinity,
    /// the Maglev entry of its hash, or random), from the pinned maps and the datapath's hash.
    Explain {
        /// Client address and port (IPv4 or IPv6, the family of `--dst`).
        #[arg(long)]
        src: SocketAddr,
        /// Frontend address and port (IPv4, or IPv6 as `[address]:port`).
        #[arg(long)]
        dst: SocketAddr,
        /// Protocol.
        #[arg(long, value_enum)]
        proto: Proto,
        /// Explain a TCP SYN (a new connection on that port) instead of a packet of an
        /// established connection.
        #[arg(long)]
        syn: bool,
        /// Where the agent pinned the maps.
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_path: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Detach the programs and remove every pinned map and link.
    Teardown {
        /// Where the agent pinned the maps.
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_path: PathBuf,
    },
}

/// This node's topology labels, over those of its Node object (Kubernetes: the Node's;
/// manifests: a Node of that name in the folder, if any, whose kubernetes.io/hostname is the
/// node's name unless it says otherwise).
#[derive(clap::Args)]
struct TopologyArgs {
    /// This node's zone (label topology.kubernetes.io/zone), for topology hints and
    /// spec.topologyKeys.
    #[arg(long)]
    zone: Option<String>,
    /// This node's region (label topology.kubernetes.io/region), for spec.topologyKeys.
    #[arg(long)]
    region: Option<String>,
}

impl TopologyArgs {
    fn topology(self, manifests: bool) -> NodeTopology {
        NodeTopology {
            zone: self.zone,
            region: self.region,
            hostname_is_name: manifests,
        }
    }
}

/// Manifests: the ranges of the API server's allocators, for what Services leave out.
#[derive(clap::Args)]
struct RangeArgs {
    /// Manifests: the range (CIDR) a Service without clusterIP gets one from, as the API
    /// server's --service-cluster-ip-range; repeat it for a second family (the first is the
    /// primary). Give every node the same ranges: the allocation is a function of the folder
    /// and the ranges. Default: 10.96.0.0/12.
    #[arg(long = "service-cidr")]
    service_cidrs: Vec<IpCidr>,
    /// Manifests: the range a NodePort or LoadBalancer Service's ports without nodePort,
    /// and a healthCheckNodePort, get one from.
    #[arg(long, default_value = "30000-32767", value_parser = allocate::parse_node_ports)]
    service_node_port_range: std::ops::RangeInclusive<u16>,
}

impl RangeArgs {
    fn ranges(self) -> anyhow::Result<Ranges> {
        let cidrs = if self.service_cidrs.is_empty() {
            vec![
                allocate::DEFAULT_SERVICE_CIDR
                    .parse()
                    .map_err(anyhow::Error::msg)?,
            ]
        } else {
            self.service_cidrs
        };
        Ok(Ranges::new(cidrs, self.service_node_port_range)?)
    }
}

/// East-west: pods and host processes to ClusterIPs.
#[derive(clap::Args)]
struct EastWestArgs {
    /// The cgroup2 directory whose processes (and their children's) get socket-level
    /// east-west translation to ClusterIPs; default: the root of the cgroup2 hierarchy
    /// (from /proc/mounts, mounted at /run/lb/cgroup2 if missing), i.e. every process.
    #[arg(long, conflicts_with = "no_cgroup")]
    cgroup: Option<PathBuf>,
    /// No socket-level translation (and remove the socket hooks an earlier agent left).
    #[arg(long)]
    no_cgroup: bool,
    /// Name pattern of the pods' host-side interfaces (`*` and `?`, e.g. `veth*`, `lxc*`;
    /// repeatable): they get a TC program that translates what pods send to frontends
    /// outside the socket hooks, and the replies. The agent follows interfaces as they come
    /// and go.
    #[arg(long = "pod-interfaces")]
    pod_interfaces: Vec<String>,
}

/// Map sizes, used when the maps are created (pinned maps keep theirs). The defaults hold
/// 10,000 Services with 10 endpoints each.
#[derive(clap::Args)]
struct CapacityArgs {
    /// Frontends (a Service has one per ClusterIP, node address and external address).
    #[arg(long, default_value_t = Capacity::default().services)]
    max_services: u32,
    /// Backends (distinct endpoint address, port and protocol).
    #[arg(long, default_value_t = Capacity::default().backends)]
    max_backends: u32,
    /// Conntrack entries (two per flow).
    #[arg(long, default_value_t = Capacity::default().conntrack)]
    max_conntrack: u32,
    /// sessionAffinity ClientIP entries (Service, client address).
    #[arg(long, default_value_t = Capacity::default().affinity)]
    max_affinity: u32,
}

#[derive(Clone, Copy, ValueEnum)]
enum Proto {
    Tcp,
    Udp,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, `: `-separated, leaving out a cause whose text the message
/// before it already contains (aya's errors print their source in their own message).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    let mut previous = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !previous.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
        previous = text;
    }
    out
}

/// kube-proxy's proxy health server.
#[derive(clap::Args)]
struct HealthArgs {
    /// Address of kube-proxy's proxy health server (/healthz, /livez), which cloud load
    /// balancers probe (kube-proxy's flag and default); empty: none.
    #[arg(long, default_value = health::DEFAULT_PROXY_HEALTH_ADDR)]
    healthz_bind_address: OptionalAddr,
    /// Seconds an update of the source may wait to be programmed before the proxy health
    /// server answers 503 (kube-proxy: twice its sync period).
    #[arg(long, default_value_t = health::DEFAULT_HEALTH_TIMEOUT.as_secs())]
    healthz_timeout_secs: u64,
}

/// An address, or none (the empty string).
#[derive(Clone, Copy, Debug)]
struct OptionalAddr(Option<SocketAddr>);

impl std::str::FromStr for OptionalAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Ok(OptionalAddr(None));
        }
        s.parse()
            .map(|a| OptionalAddr(Some(a)))
            .map_err(|e| format!("{s:?}: {e} (an address:port, or empty for none)"))
    }
}

fn parse_table_size(s: &str) -> Result<u32, String> {
    let size: u32 = s.parse().map_err(|e| format!("{e}"))?;
    maglev::check_table_size(size).map_err(|e| e.to_string())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Agent {
            manifests,
            kubeconfig,
            api_server,
            interfaces,
            pin_path,
            node_ips,
            node_name,
            topology,
            resync_secs,
            ranges,
            metrics_addr,
            health,
            initial_sync_timeout_secs,
            debounce_ms,
            maglev_table_size,
            selection,
            forwarding,
            drain_secs,
            east_west,
            orphan_grace_secs,
            capacity,
        } => {
            let EastWestArgs {
                cgroup,
                no_cgroup,
                pod_interfaces,
            } = *east_west;
            let node_name = node_name.unwrap_or_else(agent::hostname);
            // The DaemonSet sets LB_API_SERVER from the ConfigMap, empty by default.
            let api_server = api_server.filter(|a| !a.trim().is_empty());
            if let (Some(_), Some(a)) = (&manifests, &api_server) {
                anyhow::bail!(
                    "--api-server (LB_API_SERVER) {a:?} is for the Kubernetes source: not with \
                     --manifests"
                );
            }
            let topology = topology.topology(manifests.is_some());
            let source = match manifests {
                Some(dir) => SourceConfig::Manifests(dir, ranges.ranges()?),
                None => SourceConfig::Kube(KubeConfig {
                    kubeconfig,
                    api_server,
                    node_name: node_name.clone(),
                    initial_timeout: Duration::from_secs(initial_sync_timeout_secs),
                    debounce: Duration::from_millis(debounce_ms),
                }),
            };
            let config = AgentConfig {
                source,
                interfaces,
                pins: Pins::new(pin_path),
                node_ips,
                node_name,
                topology,
                resync: Duration::from_secs(resync_secs.max(1)),
                metrics_addr,
                healthz_addr: health.healthz_bind_address.0,
                health_timeout: Duration::from_secs(health.healthz_timeout_secs),
                sync: SyncConfig {
                    table_size: maglev_table_size,
                    drain: Duration::from_secs(drain_secs),
                    selection,
                    forwarding,
                    orphan_grace: Duration::from_secs(orphan_grace_secs),
                },
                capacity: Capacity {
                    services: capacity.max_services,
                    backends: capacity.max_backends,
                    conntrack: capacity.max_conntrack,
                    affinity: capacity.max_affinity,
                },
                socket_hooks: match (no_cgroup, cgroup) {
                    (true, _) => SocketHooks::Off,
                    (false, Some(path)) => SocketHooks::At(path),
                    (false, None) => SocketHooks::Root,
                },
                pod_interfaces,
            };
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the runtime")?
                .block_on(agent::run(config))
        }
        Command::Plan {
            manifests,
            node_name,
            node_ips,
            topology,
            ranges,
            output,
        } => {
            let set = manifest::load_dir_with(&manifests, &ranges.ranges()?)?;
            let facts = set.state.nodes.get(&node_name);
            let node = NodeInfo::new(node_name.clone(), node_ips, facts, &topology.topology(true));
            let translation = translate::translate(&set.state, &node);
            let plan = Plan::new(&set, &translation);
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&plan)?),
                Output::Table => {
                    print!("{}", plan.table());
                    for n in &plan.notes {
                        eprintln!("note: {n}");
                    }
                    for w in &plan.warnings {
                        eprintln!("warning: {w}");
                    }
                    for e in &plan.errors {
                        eprintln!("error: {e}");
                    }
                }
            }
            if !plan.errors.is_empty() {
                anyhow::bail!(
                    "{} object(s) in {} could not be read; they are not in the plan",
                    plan.errors.len(),
                    manifests.display()
                );
            }
            Ok(())
        }
        Command::Services { pin_path, output } => {
            let pins = Pins::new(pin_path);
            let maps = BpfMaps::open_pinned(&pins)?;
            let counters = Counters::open_pinned(&pins)?;
            let contents = maps.read_all()?;
            let names = inspect::read_names(&pins)?;
            let rows = inspect::service_rows(&contents, &names, |id| {
                counters.service(id).unwrap_or_default()
            });
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
                Output::Table => print!("{}", inspect::services_table(&rows)),
            }
            Ok(())
        }
        Command::Stats { pin_path, output } => {
            let report = inspect::read_stats(&Pins::new(pin_path))?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
                Output::Table => print!("{}", inspect::stats_table(&report)),
            }
            Ok(())
        }
        Command::Explain {
            src,
            dst,
            proto,
            syn,
            pin_path,
            output,
        } => {
            let proto = match proto {
                Proto::Tcp => Protocol::Tcp,
                Proto::Udp => Protocol::Udp,
            };
            if src.is_ipv6() != dst.is_ipv6() {
                anyhow::bail!(
                    "--src {src} and --dst {dst} are of different families: a flow is IPv4 \
                     or IPv6"
                );
            }
            let flow = Flow {
                src,
                dst,
                proto,
                syn,
            };
            let explanation =
                Explainer::open_pinned(&Pins::new(pin_path))?.explain(&flow, monotonic_ns())?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&explanation)?),
                Output::Table => {
                    for step in &explanation.steps {
                        println!("{step}");
                    }
                }
            }
            Ok(())
        }
        Command::Teardown { pin_path } => {
            let removed = Pins::new(&pin_path)
                .teardown()
                .with_context(|| format!("removing {}", pin_path.display()))?;
            if removed.is_empty() {
                println!("nothing pinned at {}", pin_path.display());
            } else {
                println!(
                    "removed {} pinned objects from {}",
                    removed.len(),
                    pin_path.display()
                );
            }
            Ok(())
        }
    }
}
