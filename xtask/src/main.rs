//! `cargo xtask <command>`: set up the machine, build, run the demo, run all checks.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

mod demo;
mod image;
mod old;
mod setup;

#[derive(Parser)]
#[command(about = "Set up, build, demo and test the load balancer (run as root)")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing: the pinned nightly with rust-src, Debian packages, bpf-linker; mount bpffs.
    Setup,
    /// Install the build toolchain if missing, then build the `lb` binary (release).
    Build,
    /// Build, then send traffic through lb in network namespaces and show who served it.
    Demo,
    /// Build, then cargo fmt --check, clippy -D warnings (the host crates, and lb-ebpf for its
    /// target), and all tests against the built lb (the upgrade test also against the older
    /// release that build-old builds).
    Test,
    /// Build, then write the agent's container image (a docker-archive tar for `docker load`
    /// or `ctr images import`) from the release binary, without Docker.
    Image {
        /// The image's name and tag.
        #[arg(long, default_value = "ghcr.io/example/lb:latest")]
        tag: String,
        /// Where to write it (default: target/lb-image.tar).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Build the older release of lb that the upgrade test starts from, from the git history.
    BuildOld,
    /// Build, then measure the datapath beside kube-proxy's iptables and nftables modes and
    /// write BENCHMARKS.md with its charts (about 30 minutes; --quick: about 4).
    Bench {
        /// The same measurements, smaller; written to target/bench/ instead.
        #[arg(long)]
        quick: bool,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Setup => setup::run(),
        Cmd::Build => build().map(drop),
        Cmd::Demo => {
            let lb = build()?;
            setup::bpffs()?;
            demo::run(&lb)
        }
        Cmd::Test => {
            let lb = build()?;
            let old = old::build(&target_dir())?;
            setup::bpffs()?;
            test(&lb, &old)
        }
        Cmd::Image { tag, out } => {
            let lb = build()?;
            let out = out.unwrap_or_else(|| target_dir().join("lb-image.tar"));
            let image = image::build(&lb, &tag, &out)?;
            println!("{} ({tag})", image.display());
            Ok(())
        }
        Cmd::BuildOld => {
            setup::toolchain()?;
            let old = old::build(&target_dir())?;
            println!("{}", old.display());
            Ok(())
        }
        Cmd::Bench { quick } => {
            let lb = build()?;
            setup::bpffs()?;
            bench(&lb, quick)
        }
    }
}

/// The workspace root.
pub fn root() -> PathBuf {
    lb_testbed::agent::workspace_dir()
}

/// Prints and runs a command in the workspace root; fails unless it succeeds.
pub fn run_checked(cmd: &mut Command) -> Result<()> {
    cmd.current_dir(root());
    eprintln!("+ {}", shown(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {}", shown(cmd)))?;
    if !status.success() {
        bail!("{} failed ({status})", shown(cmd));
    }
    Ok(())
}

/// A command as a shell line, with its environment additions.
fn shown(cmd: &Command) -> String {
    let env = cmd
        .get_envs()
        .filter_map(|(k, v)| Some(format!("{}={}", k.to_string_lossy(), v?.to_string_lossy())));
    let program = Path::new(cmd.get_program());
    let args = std::iter::once(program.file_name().unwrap_or(program.as_os_str()))
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned());
    env.chain(args).collect::<Vec<_>>().join(" ")
}

pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Installs the toolchain if missing, then builds `lb` in release mode; returns its path.
fn build() -> Result<PathBuf> {
    setup::toolchain()?;
    run_checked(cargo().args(["build", "--release", "--locked", "-p", "lb-userspace"]))?;
    let bin = target_dir().join("release/lb");
    if !bin.is_file() {
        bail!("the build succeeded but {} does not exist", bin.display());
    }
    Ok(bin)
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from)
}

/// The host crates: lb-ebpf builds only for bpfel-unknown-none (lb-userspace's build script
/// builds it, with its own toolchain and target).
const HOST_CRATES: &[&str] = &["--workspace", "--exclude", "lb-ebpf", "--locked"];

fn test(lb: &Path, old: &Path) -> Result<()> {
    run_checked(cargo().args(["fmt", "--all", "--check"]))?;
    run_checked(cargo().arg("clippy").args(HOST_CRATES).args([
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    clippy_ebpf()?;
    run_checked(
        cargo()
            .args(["test", "--no-fail-fast"])
            .args(HOST_CRATES)
            .env("LB_BIN", lb)
            .env("LB_OLD_BIN", old),
    )?;
    eprintln!("all checks passed");
    Ok(())
}

/// Clippy over lb-ebpf for its own target, as lb-userspace's build script builds it (the
/// pinned nightly, `-Z build-std=core`, release), with `-D warnings`. The host's compiler
/// settings are left out, as aya-build leaves them out: they are not the eBPF target's.
fn clippy_ebpf() -> Result<()> {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", setup::EBPF_TOOLCHAIN, "cargo", "clippy"])
        .args(["--package", "lb-ebpf", "--bins", "--release", "--locked"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .args(["--", "-D", "warnings"]);
    for key in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
    ] {
        cmd.env_remove(key);
    }
    run_checked(&mut cmd)
}

/// Builds `lb-bench` (tests/bench) and runs it against the built `lb`.
fn bench(lb: &Path, quick: bool) -> Result<()> {
    run_checked(cargo().args([
        "build",
        "--release",
        "--locked",
        "-p",
        "lb-bench",
        "--bin",
        "lb-bench",
    ]))?;
    let (command, out) = if quick {
        ("cargo xtask bench --quick", target_dir().join("bench"))
    } else {
        ("cargo xtask bench", root())
    };
    let mut cmd = Command::new(target_dir().join("release/lb-bench"));
    cmd.args(["--command", command, "--out"])
        .arg(&out)
        .env("LB_BIN", lb);
    if quick {
        cmd.arg("--quick");
    }
    run_checked(&mut cmd)
}
