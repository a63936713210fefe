//! The agent: attaches the datapath, then keeps the maps equal to the translation of its
//! source (here, a folder of manifests) for as long as it runs.
//!
//! It never flushes on trouble: when the folder cannot be read, the last good state stays
//! programmed until a complete new view can be read. On SIGTERM or SIGINT it exits and leaves
//! the programs and maps pinned, so traffic keeps flowing; `lb teardown` removes them.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use notify::Watcher as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{debug, error, info, warn};

use crate::{
    datapath::{Capacity, Datapath, interface_index},
    manifest,
    model::NodeInfo,
    sync::{DatapathMaps, Syncer},
    translate,
};

/// How the agent is set up.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The manifests folder.
    pub manifests: PathBuf,
    /// The node's external interface.
    pub interface: String,
    /// Where maps and links are pinned.
    pub pin_dir: PathBuf,
    /// Node addresses for NodePort frontends; the interface's when empty.
    pub node_ips: Vec<Ipv4Addr>,
    /// This node's name (for externalTrafficPolicy/internalTrafficPolicy Local).
    pub node_name: String,
    /// This node's zone (for topology-aware routing).
    pub zone: Option<String>,
    /// A full resync this often, even without a change notification.
    pub resync: Duration,
    /// Map sizes, for maps that are not pinned yet.
    pub capacity: Capacity,
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(config: AgentConfig) -> anyhow::Result<()> {
    // Bad arguments fail before anything is created or pinned.
    interface_index(&config.interface)?;
    std::fs::read_dir(&config.manifests)
        .with_context(|| format!("manifests folder {}", config.manifests.display()))?;
    let mut datapath = Datapath::load_with(&config.pin_dir, &config.capacity)?;
    for (program, outcome) in datapath.attach(&config.interface)? {
        info!(program, interface = %config.interface, ?outcome, "attached");
    }
    let maps = datapath.take_maps()?;
    let mut syncer = Syncer::adopt(maps).context("adopting the pinned maps")?;

    let addresses = if config.node_ips.is_empty() {
        interface_ipv4_addresses(&config.interface)?
    } else {
        config.node_ips.clone()
    };
    if addresses.is_empty() {
        warn!(interface = %config.interface, "no IPv4 address: NodePort frontends get none");
    }
    let node = NodeInfo {
        name: config.node_name.clone(),
        addresses,
        zone: config.zone.clone(),
    };
    info!(node = %node.name, addresses = ?node.addresses, "node");

    // The first view must be complete: an unreadable folder at start is an error.
    let set = manifest::load_dir(&config.manifests)?;
    apply(&set, &node, &mut syncer);

    let (tx, mut changes) = mpsc::channel::<()>(1);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        match event {
            // A full channel already means "resync pending".
            Ok(_) => drop(tx.try_send(())),
            Err(e) => warn!("watching the manifests folder: {e}"),
        }
    })
    .context("creating a file watcher")?;
    watcher
        .watch(&config.manifests, notify::RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {}", config.manifests.display()))?;

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut resync = tokio::time::interval(config.resync);
    resync.tick().await;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            Some(()) = changes.recv() => {
                // Let a burst of writes (an editor, `cp -r`) settle before reading.
                tokio::time::sleep(Duration::from_millis(100)).await;
                while changes.try_recv().is_ok() {}
                debug!("manifests changed");
            }
            _ = resync.tick() => debug!("periodic resync"),
        }
        match manifest::load_dir(&config.manifests) {
            Ok(set) => apply(&set, &node, &mut syncer),
            Err(e) => error!("{e}; keeping the programmed state"),
        }
    }
    info!("exiting; the datapath stays attached (`lb teardown` removes it)");
    Ok(())
}

/// Translates one complete view and applies it, reporting every problem.
fn apply<M: DatapathMaps>(set: &manifest::ManifestSet, node: &NodeInfo, syncer: &mut Syncer<M>) {
    let started = Instant::now();
    for e in &set.errors {
        error!("{e}");
    }
    let translation = translate::translate(&set.state, node);
    for w in &translation.warnings {
        warn!("{w}");
    }
    for (frontend, plan) in &translation.desired.frontends {
        if !plan.source_ranges.is_empty() {
            warn!(
                %frontend, service = %plan.service,
                "loadBalancerSourceRanges are not enforced by this datapath yet: every source is allowed"
            );
        }
    }
    let report = syncer.apply(&translation.desired);
    for e in &report.errors {
        error!("{e}");
    }
    info!(
        frontends = report.frontends,
        backends = report.backends,
        map_ops = report.map_ops,
        errors = report.errors.len() + set.errors.len(),
        elapsed = ?started.elapsed(),
        "synced"
    );
}

/// The IPv4 addresses of an interface.
pub fn interface_ipv4_addresses(interface: &str) -> anyhow::Result<Vec<Ipv4Addr>> {
    let mut addrs: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list that freeifaddrs releases below.
    if unsafe { libc::getifaddrs(&mut addrs) } != 0 {
        bail!("getifaddrs: {}", std::io::Error::last_os_error());
    }
    let mut found = Vec::new();
    let mut cursor = addrs;
    while !cursor.is_null() {
        // SAFETY: cursor is a node of the list getifaddrs returned.
        let ifa = unsafe { &*cursor };
        cursor = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a C string; ifa_addr points to a sockaddr of its family.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
        if name.to_bytes() != interface.as_bytes()
            || i32::from(unsafe { (*ifa.ifa_addr).sa_family }) != libc::AF_INET
        {
            continue;
        }
        let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
        found.push(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
    }
    // SAFETY: addrs came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(addrs) };
    Ok(found)
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
