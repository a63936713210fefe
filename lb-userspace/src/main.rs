//! `lb`: the load balancer's agent and its inspection commands.

use std::{io::IsTerminal as _, net::Ipv4Addr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use lb_userspace::{
    agent::{self, AgentConfig},
    datapath::{BpfMaps, Capacity, Counters, DEFAULT_PIN_DIR, teardown},
    inspect,
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
    /// Attach the datapath to an interface and keep it programmed from a manifests folder.
    Agent {
        /// Folder of Kubernetes YAML manifests (Services, EndpointSlices, Endpoints).
        #[arg(long)]
        manifests: PathBuf,
        /// The node's external interface: XDP translates frontends arriving there, TC
        /// translates the replies leaving there.
        #[arg(long)]
        interface: String,
        /// Where maps and links are pinned (on bpffs, mounted if missing).
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_path: PathBuf,
        /// Node address for NodePort frontends (repeatable); default: the interface's IPv4
        /// addresses.
        #[arg(long = "node-ip")]
        node_ips: Vec<Ipv4Addr>,
        /// This node's name, as in EndpointSlice nodeName; default: the host name.
        #[arg(long)]
        node_name: Option<String>,
        /// This node's zone, for topology-aware routing.
        #[arg(long)]
        zone: Option<String>,
        /// Seconds between full resyncs, besides the ones a change triggers.
        #[arg(long, default_value_t = 60)]
        resync_secs: u64,
        #[command(flatten)]
        capacity: CapacityArgs,
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
    /// Selection slots, summed over frontends.
    #[arg(long, default_value_t = Capacity::default().slots)]
    max_slots: u32,
    /// Conntrack entries (two per flow).
    #[arg(long, default_value_t = Capacity::default().conntrack)]
    max_conntrack: u32,
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
            interface,
            pin_path,
            node_ips,
            node_name,
            zone,
            resync_secs,
            capacity,
        } => {
            let config = AgentConfig {
                manifests,
                interface,
                pin_dir: pin_path,
                node_ips,
                node_name: node_name.unwrap_or_else(agent::hostname),
                zone,
                resync: Duration::from_secs(resync_secs.max(1)),
                capacity: Capacity {
                    services: capacity.max_services,
                    backends: capacity.max_backends,
                    slots: capacity.max_slots,
                    conntrack: capacity.max_conntrack,
                },
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
