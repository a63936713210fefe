//! `cargo xtask setup`: installs only what is missing, and says what it skips.

use std::process::{Command, Stdio};

use anyhow::Result;

use crate::run_checked;

/// Debian packages: LLVM for bpf-linker, and the tools of the tests, the demo and the
/// benchmarks (iptables and nftables for kube-proxy's modes, perf for the per-packet
/// profiles), and what the real-cluster tests run beside the Kubernetes binaries of
/// `LB_K8S_DIR`: etcd, xz to unpack the binaries, and for a node with real pods containerd,
/// runc, the reference CNI plugins and busybox (the test images' shell and HTTP server).
const PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "iproute2",
    "ethtool",
    "bpftool",
    "iptables",
    "nftables",
    "linux-perf",
    "xz-utils",
    "etcd-server",
    "containerd",
    "runc",
    "containernetworking-plugins",
    "busybox-static",
];
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// The nightly toolchain that builds lb-ebpf (`-Z build-std=core`), pinned to one whose
/// LLVM is bpf-linker's (22); lb-userspace's build script reads the same file.
pub const EBPF_TOOLCHAIN: &str = include_str!("../../lb-ebpf/toolchain").trim_ascii();
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Everything: the build toolchain, and bpffs for running the datapath.
pub fn run() -> Result<()> {
    toolchain()?;
    bpffs()
}

/// What building `lb` needs (no privileges beyond installing packages, so that it also works
/// in a container build).
pub fn toolchain() -> Result<()> {
    ebpf_toolchain()?;
    debian_packages()?;
    kubectl()?;
    bpf_linker()
}

/// What running the datapath needs: bpffs mounted at /sys/fs/bpf.
pub fn bpffs() -> Result<()> {
    lb_testbed::ensure_bpffs()?;
    eprintln!("setup: bpffs is mounted at {}", lb_testbed::agent::BPFFS);
    Ok(())
}

/// Whether a command runs and exits successfully (its output is discarded).
fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn ebpf_toolchain() -> Result<()> {
    let installed = Command::new("rustup")
        .args([
            "component",
            "list",
            "--installed",
            "--toolchain",
            EBPF_TOOLCHAIN,
        ])
        .output()
        .is_ok_and(|o| {
            o.status.success()
                && ["rust-src", "clippy"].iter().all(|component| {
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .any(|l| l.starts_with(component))
                })
        });
    if installed {
        eprintln!("setup: skip {EBPF_TOOLCHAIN} with rust-src and clippy (installed)");
        return Ok(());
    }
    // Installs the toolchain too when it is missing.
    run_checked(Command::new("rustup").args([
        "toolchain",
        "install",
        EBPF_TOOLCHAIN,
        "--profile",
        "minimal",
        "--component",
        "rust-src",
        // `cargo xtask test` lints lb-ebpf for its own target with this toolchain's clippy.
        "--component",
        "clippy",
    ]))
}

fn debian_packages() -> Result<()> {
    let (present, missing): (Vec<&str>, Vec<&str>) = PACKAGES.iter().partition(|p| {
        Command::new("dpkg-query")
            .args(["-W", "-f=${Status}", p])
            .output()
            .is_ok_and(|o| o.stdout == b"install ok installed")
    });
    if !present.is_empty() {
        eprintln!("setup: skip {} (installed)", present.join(" "));
    }
    if missing.is_empty() {
        return Ok(());
    }
    run_checked(Command::new("apt-get").arg("update"))?;
    run_checked(
        Command::new("apt-get")
            .args(["install", "-y"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null()),
    )
}

/// kubectl, for the real node test (`kubectl apply -k deploy/`, `kubectl rollout restart`):
/// any that runs (one may come with the machine), else Debian's kubernetes-client (1.20, with
/// kustomize built in).
fn kubectl() -> Result<()> {
    if succeeds(Command::new("kubectl").args(["version", "--client"])) {
        eprintln!("setup: skip kubectl (installed)");
        return Ok(());
    }
    run_checked(
        Command::new("apt-get")
            .args(["install", "-y", "kubernetes-client"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null()),
    )
}

fn bpf_linker() -> Result<()> {
    if succeeds(Command::new("bpf-linker").arg("--version")) {
        eprintln!("setup: skip bpf-linker (installed)");
        return Ok(());
    }
    // bpf-linker 0.13 reads LLVM_PREFIX; llvm-sys reads LLVM_SYS_221_PREFIX. Without them it
    // looks for LLVM in /usr/lib64 and fails to link -lLLVM.
    run_checked(
        crate::cargo()
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--locked", "--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX),
    )
}
