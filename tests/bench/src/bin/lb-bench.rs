//! `lb-bench`: runs the benchmarks and writes BENCHMARKS.md (run it through
//! `cargo xtask bench [--quick]`, which builds `lb` and this, and says where the file went).
//!
//! Usage: `lb-bench [--quick] [--out DIR] [--only packet,pps,e2e,control] [--levels 1,1000]
//! [--command TEXT]` (`--levels`: the per-packet and packets-per-second parts' numbers of Services), or
//! `lb-bench --rewrite [--out DIR]` to write the Markdown and charts again from the
//! `benchmarks/results.json` of an earlier run (after a change of the report's form).

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};
use lb_bench::machine::{CpuSample, Machine};
use lb_bench::{Plan, Results, control, e2e, packet, pps, report};
use lb_testbed::agent::workspace_dir;

struct Args {
    quick: bool,
    rewrite: bool,
    out: PathBuf,
    only: Vec<String>,
    levels: Option<Vec<usize>>,
    command: String,
}

const PARTS: [&str; 4] = ["packet", "pps", "e2e", "control"];

fn args() -> Result<Args> {
    let mut args = Args {
        quick: false,
        rewrite: false,
        out: workspace_dir(),
        only: PARTS.iter().map(|p| p.to_string()).collect(),
        levels: None,
        command: "lb-bench".to_owned(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => args.quick = true,
            "--rewrite" => args.rewrite = true,
            "--out" => args.out = it.next().context("--out needs a directory")?.into(),
            "--command" => args.command = it.next().context("--command needs a text")?,
            "--only" => {
                let parts = it.next().context("--only needs a list")?;
                args.only = parts.split(',').map(str::to_owned).collect();
                if let Some(bad) = args.only.iter().find(|p| !PARTS.contains(&p.as_str())) {
                    bail!("--only: unknown part {bad:?} (known: {})", PARTS.join(", "));
                }
            }
            "--levels" => {
                let levels = it.next().context("--levels needs a list")?;
                let levels = levels
                    .split(',')
                    .map(|n| match n.parse::<usize>() {
                        Ok(n) if n > 0 => Ok(n),
                        _ => bail!("--levels: {n:?} is not a positive number of Services"),
                    })
                    .collect::<Result<_>>()?;
                args.levels = Some(levels);
            }
            other => bail!(
                "unknown argument {other:?}; usage: lb-bench [--quick] [--out DIR] \
                 [--only packet,pps,e2e,control] [--levels 1,1000] [--command TEXT] | \
                 lb-bench --rewrite [--out DIR]"
            ),
        }
    }
    Ok(args)
}

fn commit() -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(workspace_dir())
        .args(["describe", "--always", "--dirty"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn run() -> Result<PathBuf> {
    let args = args()?;
    if args.rewrite {
        let path = args.out.join(report::ASSETS).join("results.json");
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
        let results: Results =
            serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
        return report::write(&results, &args.out);
    }
    let mut plan = Plan::new(args.quick);
    if let Some(levels) = args.levels {
        if let Some(pps) = &mut plan.pps {
            pps.levels = levels.clone();
        }
        plan.packet.levels = levels;
    }
    let wants = |part: &str| args.only.iter().any(|p| p == part);
    let mut machine = Machine::describe();
    let cpu = CpuSample::now();
    let packet = if wants("packet") {
        Some(packet::run(&plan.packet).context("per-packet benchmark")?)
    } else {
        None
    };
    let pps = match (&plan.pps, wants("pps")) {
        (Some(p), true) => Some(pps::run(p).context("packets-per-second benchmark")?),
        _ => None,
    };
    let e2e = if wants("e2e") {
        Some(e2e::run(&plan.e2e).context("end-to-end benchmark")?)
    } else {
        None
    };
    let control = if wants("control") {
        Some(control::run(&plan.control).context("control-plane benchmark")?)
    } else {
        None
    };
    machine.finish(cpu);
    let results = Results {
        command: args.command,
        commit: commit(),
        plan,
        machine,
        packet,
        e2e,
        control,
        pps,
    };
    std::fs::create_dir_all(&args.out)?;
    report::write(&results, &args.out)
}

fn main() -> ExitCode {
    match run() {
        Ok(path) => {
            println!("wrote {}", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("lb-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
