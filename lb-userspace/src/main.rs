//! `lb`: the load balancer's agent and its inspection commands.

use std::{
    io::IsTerminal as _,
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use lb_userspace::{
    agent::{self, AgentConfig},
    datapath::{BpfMaps, Counters, DEFAULT_PIN_DIR, teardown},
    desired::{Protocol, Selection},
    explain::{Explainer, Flow, monotonic_ns},
    inspect, maglev,
    sync::{DatapathMaps as _, SyncConfig},
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
        /// Entries of each Service's Maglev table: a prime. The default keeps the load of
        /// the backends of a Service with up to 163 of them within 1% of each other.
        #[arg(long, default_value_t = maglev::DEFAULT_TABLE_SIZE, value_parser = parse_table_size)]
        maglev_table_size: u32,
        /// How new flows choose a backend when the Service does not say (annotation
        /// lb.example.io/selection): maglev (consistent hashing) or random.
        #[arg(long, default_value_t = Selection::Maglev)]
        selection: Selection,
        /// Seconds a backend that left the EndpointSlices keeps serving its established
        /// TCP connections before its entry is deleted.
        #[arg(long, default_value_t = 60)]
        drain_secs: u64,
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
        /// Client address and port.
        #[arg(long)]
        src: SocketAddrV4,
        /// Frontend address and port.
        #[arg(long)]
        dst: SocketAddrV4,
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
            eprintln!("lb: {e:#}");
            ExitCode::FAILURE
        }
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
            interface,
            pin_path,
            node_ips,
            node_name,
            zone,
            resync_secs,
            maglev_table_size,
            selection,
            drain_secs,
        } => {
            let config = AgentConfig {
                manifests,
                interface,
                pin_dir: pin_path,
                node_ips,
                node_name: node_name.unwrap_or_else(agent::hostname),
                zone,
                resync: Duration::from_secs(resync_secs.max(1)),
                sync: SyncConfig {
                    table_size: maglev_table_size,
                    drain: Duration::from_secs(drain_secs),
                    selection,
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
        Command::Stats { pin_path, output } => {
            let maps = BpfMaps::open_pinned(&pin_path)?;
            let counters = Counters::open_pinned(&pin_path)?;
            let contents = maps.read_all()?;
            let named = |names: &'static [&'static str], values: Vec<u64>| {
                names.iter().copied().zip(values).filter(|(_, v)| *v != 0)
            };
            let nonzero = named(&lb_common::reason::NAMES, counters.reasons()?)
                .chain(named(&lb_common::event::NAMES, counters.events()?))
                .collect();
            let report = inspect::stats_report(
                &contents,
                |id| counters.service(id).unwrap_or_default(),
                |id| counters.backend(id).ok().flatten(),
                counters.conntrack()?,
                nonzero,
            );
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
            let flow = Flow {
                src,
                dst,
                proto,
                syn,
            };
            let explanation = Explainer::open_pinned(&pin_path)?.explain(&flow, monotonic_ns())?;
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
