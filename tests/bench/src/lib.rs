//! `cargo xtask bench`: the datapath measured beside kube-proxy's iptables and nftables modes
//! on this machine, in one run, and written up as BENCHMARKS.md with SVG charts.
//!
//! - [`packet`]: the cost of one packet through the real programs (BPF_PROG_TEST_RUN),
//!   against programs that do nothing (the floor), at 1 to 100,000 Services.
//! - [`e2e`]: real TCP connections in network namespaces through this datapath (the real `lb
//!   agent`), through kube-proxy-format iptables rules and through kube-proxy-format nftables
//!   rules ([`kubeproxy`]), with our load generator ([`load`]) against pooled backend servers
//!   ([`server`]).
//! - [`pps`]: packets per second through a node from a real generator (XDP frames that
//!   circulate through the node), for this datapath, kube-proxy's rules and plain routing,
//!   with the node's CPU time per packet.
//! - [`control`]: the agent's full sync of 10,000 Services and the latency from an
//!   EndpointSlice change to the map write.
//! - [`report`]: the Markdown and the charts ([`svg`]), from the numbers only.
//!
//! Only the datapath's public API fills the maps: `Datapath::load_with` and `Syncer::apply`,
//! or the `lb` binary with a manifests folder.

pub mod cluster;
pub mod control;
pub mod e2e;
pub mod kubeproxy;
pub mod load;
pub mod machine;
pub mod packet;
pub mod pps;
pub mod profile;
pub mod report;
pub mod server;
pub mod stats;
pub mod svg;

use serde::{Deserialize, Serialize};

/// How big a run is: `--quick` (about two minutes) or the full one.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    /// `true` for `--quick`.
    pub quick: bool,
    /// Per-packet measurements.
    pub packet: packet::PacketPlan,
    /// End-to-end measurements.
    pub e2e: e2e::E2ePlan,
    /// Control-plane measurements.
    pub control: control::ControlPlan,
    /// Packets per second through a node (absent in runs written before it existed).
    #[serde(default)]
    pub pps: Option<pps::PpsPlan>,
}

impl Plan {
    /// The full run, or the same measurements smaller with `quick`.
    pub fn new(quick: bool) -> Self {
        Plan {
            quick,
            packet: packet::PacketPlan::new(quick),
            e2e: e2e::E2ePlan::new(quick),
            control: control::ControlPlan::new(quick),
            pps: Some(pps::PpsPlan::new(quick)),
        }
    }
}

/// Everything one run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    /// The command that produced these results, as the user typed it.
    pub command: String,
    /// The git commit measured (`git describe`), when known.
    pub commit: Option<String>,
    /// What was run.
    pub plan: Plan,
    /// The machine, and how busy it was during the run.
    pub machine: machine::Machine,
    /// Per-packet costs; `None` when not run.
    pub packet: Option<packet::PacketResults>,
    /// End to end; `None` when not run.
    pub e2e: Option<e2e::E2eResults>,
    /// Control plane; `None` when not run.
    pub control: Option<control::ControlResults>,
    /// Packets per second; `None` when not run.
    #[serde(default)]
    pub pps: Option<pps::PpsResults>,
}

/// A scratch directory under the temporary directory, removed on drop.
#[derive(Debug)]
pub struct ScratchDir(std::path::PathBuf);

impl ScratchDir {
    /// Creates `$TMPDIR/lbt-<pid>-<n>-<what>`.
    pub fn new(what: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(lb_testbed::netns::unique_name(what));
        std::fs::create_dir_all(&dir)
            .map_err(|e| anyhow::anyhow!("mkdir {}: {e}", dir.display()))?;
        Ok(ScratchDir(dir))
    }

    /// The directory.
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("cleanup: remove {}: {e}", self.0.display());
        }
    }
}

/// Follows the agent's `synced` log lines (one per applied view of its source).
#[derive(Debug, Default)]
pub struct SyncLog {
    seen: usize,
}

/// One `synced` line of the agent.
#[derive(Debug, Clone, Copy)]
pub struct Synced {
    /// When this process saw the line.
    pub seen_at: std::time::Instant,
    /// The `elapsed` the agent reported (translate and map writes), in seconds.
    pub agent_seconds: Option<f64>,
}

impl SyncLog {
    /// Waits (polling the log every 2 ms, up to `timeout`) for the next `synced` line that
    /// reports `frontends` frontends; fails if the agent exits, reports errors, or time runs
    /// out.
    pub fn wait(
        &mut self,
        agent: &mut lb_testbed::Agent,
        frontends: usize,
        timeout: std::time::Duration,
    ) -> anyhow::Result<Synced> {
        let deadline = std::time::Instant::now() + timeout;
        let wanted = format!("frontends={frontends} ");
        loop {
            let log = agent.log();
            let synced: Vec<&str> = log.lines().filter(|l| l.contains(" synced ")).collect();
            for (i, line) in synced.iter().enumerate().skip(self.seen) {
                self.seen = i + 1;
                if line.contains(&wanted) {
                    let seen_at = std::time::Instant::now();
                    anyhow::ensure!(
                        line.contains("errors=0"),
                        "the agent reported errors: {line}\n{log}"
                    );
                    return Ok(Synced {
                        seen_at,
                        agent_seconds: field(line, "elapsed=").and_then(parse_duration),
                    });
                }
            }
            agent.ensure_running()?;
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the agent did not log `synced {wanted}` within {timeout:?}; its log:\n{log}"
            );
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }
}

/// The value after `key` up to the next space.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let rest = &line[line.find(key)? + key.len()..];
    Some(rest.split_whitespace().next().unwrap_or(rest))
}

/// Seconds in a `Duration`'s Debug form: `1.5s`, `12.3ms`, `4µs`, `7ns`.
fn parse_duration(text: &str) -> Option<f64> {
    let (number, scale) = [("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9), ("s", 1.0)]
        .iter()
        .find_map(|(unit, scale)| Some((text.strip_suffix(unit)?, *scale)))?;
    Some(number.parse::<f64>().ok()? * scale)
}

#[cfg(test)]
mod tests {
    use crate::*;

    #[test]
    fn agent_log_fields() {
        let line = "2025-01-01T00:00:00Z  INFO lb_userspace::agent: synced frontends=3 \
                    backends=2 map_ops=10 errors=0 elapsed=1.5ms";
        assert_eq!(field(line, "frontends="), Some("3"));
        assert_eq!(
            field(line, "elapsed=").and_then(parse_duration),
            Some(1.5e-3)
        );
        assert_eq!(parse_duration("2.25s"), Some(2.25));
        assert_eq!(
            parse_duration("40µs").map(|s| (s * 1e6).round()),
            Some(40.0)
        );
        assert_eq!(parse_duration("soon"), None);
    }
}
