//! Where a path's time goes: `perf record` (the `cpu-clock` software event, kernel call
//! chains) of this thread while it runs one path through BPF_PROG_TEST_RUN over and over,
//! each sample inside the kernel's test-run loop attributed to the program's own
//! instructions or to the helper or map operation it was in (with everything that one
//! called).
//!
//! The samples of the measured program are found by its JIT symbol, `bpf_prog_<tag>_<name>`,
//! the outermost under the test run (its subprograms have symbols of their own, named by
//! their functions); a sample taken while an interrupt or a softirq ran on top of the test
//! run is counted apart (it is the machine's noise, not the path's cost; and the only way
//! another copy of the program, attached elsewhere on the machine, shows up). perf must be
//! installed (Debian's `linux-perf`); without it the profile is left out and the report says
//! why.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read as _, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};

/// Samples per second of the thread's CPU time.
pub const FREQUENCY: u32 = 20_000;

/// The perf command line the profiles are taken with (after `perf`), for the report.
pub fn command_line() -> String {
    format!("record -e cpu-clock -F {FREQUENCY} -g -t <bench thread> -D -1 --control fifo:...")
}

/// The samples of one path, by where they were taken.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Breakdown {
    /// Samples in the program's own instructions (map lookups the verifier inlines, packet
    /// access, checksums computed in the program, the per-CPU counters).
    pub program: u64,
    /// Samples in a function the program called (a helper or a map operation, with whatever
    /// that called), by function: most samples first.
    pub callees: Vec<Callee>,
    /// Samples in the test-run loop outside the program (its timer, its loop).
    pub outside: u64,
    /// Samples taken while an interrupt or a softirq ran on top of the test run.
    pub interrupted: u64,
}

/// A function the program called, and where its samples were taken.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Callee {
    /// The function.
    pub name: String,
    /// Its samples, with whatever it called.
    pub samples: u64,
    /// Its samples by the function they were taken in (itself or one it called): most
    /// samples first.
    pub leaves: Vec<(String, u64)>,
}

impl Breakdown {
    /// Samples in the program and what it called.
    pub fn in_program(&self) -> u64 {
        self.program + self.callees.iter().map(|c| c.samples).sum::<u64>()
    }
}

/// Sorted by samples, most first, then by name.
fn by_samples(counts: BTreeMap<String, u64>) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = counts.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v
}

/// A `perf record` of this thread, started disabled and enabled around the work.
pub struct Recording {
    perf: Child,
    data: PathBuf,
    ctl: File,
    ack: BufReader<File>,
}

/// Whether `perf` can be run here.
pub fn available() -> bool {
    Command::new("perf")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn mkfifo(path: &Path) -> Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: a valid NUL-terminated path.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        bail!(
            "mkfifo {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

impl Recording {
    /// Starts `perf record` of the calling thread into `dir`, with its events disabled until
    /// [`Recording::run`].
    pub fn start(dir: &Path) -> Result<Self> {
        let (ctl_path, ack_path) = (dir.join("ctl"), dir.join("ack"));
        mkfifo(&ctl_path)?;
        mkfifo(&ack_path)?;
        let data = dir.join("perf.data");
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        let mut perf = Command::new("perf")
            .args(["record", "-q", "-e", "cpu-clock", "-F"])
            .arg(FREQUENCY.to_string())
            .args(["-g", "-D", "-1", "-t"])
            .arg(tid.to_string())
            .arg("--control")
            .arg(format!(
                "fifo:{},{}",
                ctl_path.display(),
                ack_path.display()
            ))
            .arg("-o")
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("running perf record")?;
        // perf opens both fifos as it starts. A blocking open would wait for ever if perf
        // failed first: the control fifo is opened without blocking (which fails until perf
        // has it open), perf's exit watched meanwhile.
        let deadline = Instant::now() + Duration::from_secs(30);
        let ctl = loop {
            match File::options()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&ctl_path)
            {
                Ok(ctl) => break ctl,
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {}
                Err(e) => return Err(e).context("opening perf's control fifo"),
            }
            if let Some(status) = perf.try_wait()? {
                let mut stderr = String::new();
                if let Some(mut err) = perf.stderr.take() {
                    let _ = err.read_to_string(&mut stderr);
                }
                bail!("perf record exited ({status}) before it started: {stderr}");
            }
            if Instant::now() > deadline {
                let _ = perf.kill();
                let _ = perf.wait();
                bail!("perf record did not open its control fifo within 30 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let ack = BufReader::new(File::open(&ack_path).context("opening perf's ack fifo")?);
        Ok(Recording {
            perf,
            data,
            ctl,
            ack,
        })
    }

    fn command(&mut self, what: &str) -> Result<()> {
        writeln!(self.ctl, "{what}").context("writing to perf's control fifo")?;
        let mut line = String::new();
        self.ack
            .read_line(&mut line)
            .context("reading perf's ack")?;
        // perf writes "ack\n" with its terminating NUL, which starts the next line read.
        let answer = line.trim_matches(|c: char| c == '\0' || c.is_whitespace());
        ensure!(answer == "ack", "perf answered {line:?} to {what}");
        Ok(())
    }

    /// Runs `work` with the sampling on.
    pub fn run<T>(&mut self, work: impl FnOnce() -> Result<T>) -> Result<T> {
        self.command("enable")?;
        let out = work();
        self.command("disable")?;
        out
    }

    /// Stops perf and returns the call chains of its samples, leaf first.
    pub fn finish(self) -> Result<Vec<Vec<String>>> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.perf.id() as i32, libc::SIGINT) };
        let out = self.perf.wait_with_output().context("waiting for perf")?;
        ensure!(
            out.status.success() || out.status.code() == Some(130) || out.status.code().is_none(),
            "perf record failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let script = Command::new("perf")
            .args(["script", "-F", "ip,sym", "-i"])
            .arg(&self.data)
            .output()
            .context("running perf script")?;
        ensure!(
            script.status.success(),
            "perf script failed: {}",
            String::from_utf8_lossy(&script.stderr)
        );
        Ok(chains(&String::from_utf8_lossy(&script.stdout)))
    }
}

/// The call chains of `perf script -F ip,sym` output: blocks of `address symbol` lines,
/// leaf first, separated by blank lines.
pub fn chains(script: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut chain = Vec::new();
    for line in script.lines() {
        let mut fields = line.split_whitespace();
        match (fields.next(), fields.next()) {
            (Some(_address), Some(symbol)) => chain.push(symbol.to_owned()),
            _ => {
                if !chain.is_empty() {
                    out.push(std::mem::take(&mut chain));
                }
            }
        }
    }
    if !chain.is_empty() {
        out.push(chain);
    }
    out
}

/// The kernel function that runs a program under BPF_PROG_TEST_RUN (its timed loop).
const TEST_RUN: &str = "bpf_test_run";

/// Frames of interrupt and softirq handling: a sample below one of them was taken while
/// something else ran on top of the test run.
fn interrupt_frame(symbol: &str) -> bool {
    [
        "asm_sysvec_",
        "asm_common_interrupt",
        "asm_exc_",
        "handle_softirqs",
        "__do_softirq",
    ]
    .iter()
    .any(|p| symbol.starts_with(p))
}

/// Whether `symbol` is a JIT-compiled BPF function: `bpf_prog_<tag>_<name>` (a program, or
/// one of its subprograms, named by its own function).
fn jited(symbol: &str) -> bool {
    symbol.strip_prefix("bpf_prog_").is_some_and(|rest| {
        rest.len() > 17
            && rest.as_bytes()[16] == b'_'
            && rest[..16].bytes().all(|b| b.is_ascii_hexdigit())
    })
}

/// Attributes the samples in the test-run loop of program `name` (see the module doc): the
/// program is the outermost JIT-compiled function under the test run, named `name`; its
/// subprograms count as its own instructions.
pub fn attribute(chains: &[Vec<String>], name: &str) -> Breakdown {
    let suffix = format!("_{name}");
    let mut b = Breakdown::default();
    let mut callees = BTreeMap::<String, BTreeMap<String, u64>>::new();
    for chain in chains {
        let Some(top) = chain.iter().position(|f| f == TEST_RUN) else {
            continue;
        };
        let inner = &chain[..top];
        if inner.iter().any(|f| interrupt_frame(f)) {
            b.interrupted += 1;
            continue;
        }
        let ours = inner
            .iter()
            .rposition(|f| jited(f))
            .filter(|&i| inner[i].ends_with(&suffix));
        match (ours, inner.iter().position(|f| jited(f))) {
            (Some(_), Some(0)) => b.program += 1,
            (Some(_), Some(i)) => {
                let leaves = callees.entry(inner[i - 1].clone()).or_default();
                *leaves.entry(inner[0].clone()).or_default() += 1;
            }
            _ => b.outside += 1,
        }
    }
    b.callees = callees
        .into_iter()
        .map(|(name, leaves)| Callee {
            name,
            samples: leaves.values().sum(),
            leaves: by_samples(leaves),
        })
        .collect();
    b.callees
        .sort_by(|a, b| b.samples.cmp(&a.samples).then_with(|| a.name.cmp(&b.name)));
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_attributed_to_the_program_or_its_callee() {
        let prog = "bpf_prog_aeb0c1f55d226c72_lb_tc_egress";
        let sub = "bpf_prog_0123456789abcdef_forward";
        let script = format!(
            "\tffffffffc0038d53 {prog}\n\tffffffff81f56881 bpf_test_run\n\tffffffff81f57b49 bpf_prog_test_run_skb\n\n\
             \tffffffff81ee2a2e bpf_l4_csum_replace\n\tffffffffc0038d11 {prog}\n\tffffffff81f56881 bpf_test_run\n\n\
             \tffffffff81533bd1 lookup_nulls_elem_raw\n\tffffffff81533bd1 __htab_map_lookup_elem\n\tffffffffc0038d11 {prog}\n\tffffffff81f56881 bpf_test_run\n\n\
             \tffffffff81eae1ea bpf_prog_90727f8d5b6d797c_lb_tc_egress\n\tffffffff81369c4d handle_softirqs\n\tffffffff81f56807 bpf_test_run\n\n\
             \tffffffff81f56470 bpf_test_timer_continue\n\tffffffff81f56807 bpf_test_run\n\n\
             \tffffffffc0038d53 {sub}\n\tffffffffc0038d53 {prog}\n\tffffffff81f56881 bpf_test_run\n\n\
             \tffffffff81ee2a2e bpf_prog_inc\n\tffffffffc0038d53 {sub}\n\tffffffffc0038d53 {prog}\n\tffffffff81f56881 bpf_test_run\n\n\
             \tffffffff81f56470 do_syscall_64\n\n"
        );
        let chains = chains(&script);
        assert_eq!(chains.len(), 8);
        let b = attribute(&chains, "lb_tc_egress");
        assert_eq!(b.program, 2);
        let callee = |name: &str, leaf: &str| Callee {
            name: name.to_owned(),
            samples: 1,
            leaves: vec![(leaf.to_owned(), 1)],
        };
        assert_eq!(
            b.callees,
            vec![
                callee("__htab_map_lookup_elem", "lookup_nulls_elem_raw"),
                callee("bpf_l4_csum_replace", "bpf_l4_csum_replace"),
                callee("bpf_prog_inc", "bpf_prog_inc"),
            ]
        );
        assert_eq!((b.outside, b.interrupted, b.in_program()), (1, 1, 5));
    }
}
