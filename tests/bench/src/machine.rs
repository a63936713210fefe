//! The machine the numbers come from, and how busy it was while they were taken.

use std::process::Command;

use serde::{Deserialize, Serialize};

/// What BENCHMARKS.md says about the machine.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Machine {
    /// `model name` of /proc/cpuinfo.
    pub cpu_model: String,
    /// Online CPUs.
    pub cores: usize,
    /// `uname -r`.
    pub kernel: String,
    /// MemTotal, in GiB.
    pub memory_gib: f64,
    /// `iptables --version` (which also says nf_tables or legacy).
    pub iptables: String,
    /// `nft --version`.
    pub nft: String,
    /// /proc/loadavg when the run started.
    pub loadavg_start: String,
    /// /proc/loadavg when it ended.
    pub loadavg_end: String,
    /// Share of all CPU time during the run that was busy, in percent.
    pub busy_percent: f64,
    /// Share of all CPU time during the run used by this benchmark and the children it waited
    /// for (agent, iptables-restore, nft), in percent; the rest of `busy_percent` was other
    /// work on the machine.
    pub own_percent: f64,
}

fn first_line(cmd: &str, arg: &str) -> String {
    Command::new(cmd)
        .arg(arg)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_owned))
        .unwrap_or_else(|| format!("({cmd} not found)"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// CPU counters at one moment: (busy, total) jiffies of the whole machine, and this
/// process's own (with waited-for children).
#[derive(Debug, Clone, Copy)]
pub struct CpuSample {
    busy: u64,
    total: u64,
    own: u64,
}

impl CpuSample {
    /// Reads /proc/stat and /proc/self/stat.
    pub fn now() -> Self {
        let stat = read("/proc/stat");
        let fields: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .filter_map(|f| f.parse().ok())
            .collect();
        let total: u64 = fields.iter().take(8).sum();
        // idle and iowait.
        let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
        let own_stat = read("/proc/self/stat");
        // Fields after the command name (which is in parentheses): utime is the 14th field
        // of the line, so the 12th after ") ".
        let own: u64 = own_stat
            .rsplit_once(") ")
            .map(|(_, rest)| {
                rest.split_whitespace()
                    .skip(11)
                    .take(4)
                    .filter_map(|f| f.parse::<u64>().ok())
                    .sum()
            })
            .unwrap_or(0);
        CpuSample {
            busy: total.saturating_sub(idle),
            total,
            own,
        }
    }
}

impl Machine {
    /// Describes this machine, with the load average now.
    pub fn describe() -> Self {
        let cpuinfo = read("/proc/cpuinfo");
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")?
                    .split_once(':')
                    .map(|(_, v)| v.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".to_owned());
        let memory_kib: f64 = read("/proc/meminfo")
            .lines()
            .find_map(|l| {
                l.strip_prefix("MemTotal:")?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap_or(0.0);
        Machine {
            cpu_model,
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            kernel: first_line("uname", "-r"),
            memory_gib: memory_kib / (1024.0 * 1024.0),
            iptables: first_line("iptables", "--version"),
            nft: first_line("nft", "--version"),
            loadavg_start: read("/proc/loadavg").trim().to_owned(),
            ..Default::default()
        }
    }

    /// Records how busy the machine was between `start` and now.
    pub fn finish(&mut self, start: CpuSample) {
        let end = CpuSample::now();
        let total = end.total.saturating_sub(start.total).max(1) as f64;
        self.busy_percent = 100.0 * end.busy.saturating_sub(start.busy) as f64 / total;
        // /proc/self/stat counts per thread-second; /proc/stat counts all CPUs.
        self.own_percent = 100.0 * end.own.saturating_sub(start.own) as f64 / total;
        self.loadavg_end = read("/proc/loadavg").trim().to_owned();
    }
}
