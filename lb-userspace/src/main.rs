//! `lb`: the load balancer's agent and its inspection commands.

use std::{
    io::IsTerminal as _,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use lb_userspace::{
    agent::{self, AgentConfig, SourceConfig},
    datapath::{BpfMaps, Counters, DEFAULT_PIN_DIR, teardown},
    inspect, metrics,
    source::kube::KubeConfig,
    sync::DatapathMaps as _,
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
        /// The node's external interface: XDP translates frontends arriving there, TC
        /// translates the replies leaving there.
        #[arg(long)]
        interface: String,
        /// Where maps and links are pinned (on bpffs, mounted if missing).
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_path: PathBuf,
        /// Node address for NodePort frontends (repeatable); default: the Node object's IPv4
        /// InternalIP and ExternalIP addresses (Kubernetes), else the interface's.
        #[arg(long = "node-ip")]
        node_ips: Vec<Ipv4Addr>,
        /// This node's name, as in EndpointSlice nodeName and the Node object; default: the
        /// host name.
        #[arg(long)]
        node_name: Option<String>,
        /// This node's zone, for topology-aware routing; default: the Node's
        /// topology.kubernetes.io/zone label (Kubernetes).
        #[arg(long)]
        zone: Option<String>,
        /// Seconds between full resyncs, besides the updates changes trigger.
        #[arg(long, default_value_t = 60)]
        resync_secs: u64,
        /// Address for /metrics, /healthz and /readyz.
        #[arg(long, default_value = metrics::DEFAULT_ADDR)]
        metrics_addr: SocketAddr,
        /// Kubernetes: the longest wait, in seconds, for the initial lists before the first
        /// sync (after it the agent goes on without the Node, never without Services or
        /// EndpointSlices).
        #[arg(long, default_value_t = 30)]
        initial_sync_timeout_secs: u64,
        /// Kubernetes: milliseconds without events that end a batch of changes (0: a batch
        /// is what has arrived when the agent is free; no wait).
        #[arg(long, default_value_t = 0)]
        debounce_ms: u64,
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
    /// Detach the programs and remove every pinned map and link.
    Teardown {
        /// Where the agent pinned the maps.
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_path: PathBuf,
    },
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
            eprintln!("lb: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Agent {
            manifests,
            kubeconfig,
            interface,
            pin_path,
            node_ips,
            node_name,
            zone,
            resync_secs,
            metrics_addr,
            initial_sync_timeout_secs,
            debounce_ms,
        } => {
            let node_name = node_name.unwrap_or_else(agent::hostname);
            let source = match manifests {
                Some(dir) => SourceConfig::Manifests(dir),
                None => SourceConfig::Kube(KubeConfig {
                    kubeconfig,
                    node_name: node_name.clone(),
                    initial_timeout: Duration::from_secs(initial_sync_timeout_secs),
                    debounce: Duration::from_millis(debounce_ms),
                }),
            };
            let config = AgentConfig {
                source,
                interface,
                pin_dir: pin_path,
                node_ips,
                node_name,
                zone,
                resync: Duration::from_secs(resync_secs.max(1)),
                metrics_addr,
            };
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the runtime")?
                .block_on(agent::run(config))
        }
        Command::Services { pin_path, output } => {
            let maps = BpfMaps::open_pinned(&pin_path)?;
            let counters = Counters::open_pinned(&pin_path)?;
            let contents = maps.read_all()?;
            let rows =
                inspect::service_rows(&contents, |id| counters.service(id).unwrap_or_default());
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
                Output::Table => print!("{}", inspect::services_table(&rows)),
            }
            Ok(())
        }
        Command::Teardown { pin_path } => {
            let removed =
                teardown(&pin_path).with_context(|| format!("removing {}", pin_path.display()))?;
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
