//! The older release of `lb` that the upgrade test starts from, built from the git history.
//!
//! The release's source is taken with `git archive` into `target/upgrade/<commit>/` and built
//! with the same target directory as the workspace, so it reuses the compiled dependencies.
//! Its build script is given the pinned eBPF toolchain (`crate::setup::EBPF_TOOLCHAIN`).
//! Two changes to its manifests keep its own crates apart from the workspace's (cargo names
//! the artifacts of path crates by their path relative to the workspace, which is the same
//! in both): its crates get a pre-release version, and its binary is `lb-<commit>`, so
//! neither overwrites the other.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use lb_testbed::agent::OLD_RELEASE;

use crate::{cargo, root, run_checked};

/// Builds `lb` as of [`OLD_RELEASE`] (once; later calls find it built) and returns its path.
pub fn build(target_dir: &Path) -> Result<PathBuf> {
    let rev = OLD_RELEASE;
    let commit = format!("{rev}^{{commit}}");
    let found = Command::new("git")
        .arg("-C")
        .arg(root())
        .args(["rev-parse", "--verify", "--quiet", &commit])
        .output()
        .context("cannot run git (the upgrade test builds lb from the git history)")?;
    if !found.status.success() {
        bail!(
            "the upgrade test starts from lb at commit {rev}, which is not in the git history \
             of {} (a shallow clone? `git fetch --unshallow`)",
            root().display()
        );
    }
    let src = target_dir.join("upgrade").join(rev);
    if !src.join("Cargo.toml").is_file() {
        extract(rev, &src)?;
    }
    let bin_name = format!("lb-{rev}");
    run_checked(
        cargo()
            .args([
                "build",
                "--release",
                "-p",
                "lb-userspace",
                "--bin",
                &bin_name,
            ])
            .arg("--manifest-path")
            .arg(src.join("Cargo.toml"))
            .env("CARGO_TARGET_DIR", target_dir),
    )?;
    let bin = target_dir.join("release").join(bin_name);
    if !bin.is_file() {
        bail!("the build succeeded but {} does not exist", bin.display());
    }
    Ok(bin)
}

/// Writes the source of `rev` to `dest`, with the manifests changed as the module says.
fn extract(rev: &str, dest: &Path) -> Result<()> {
    let tmp = dest.with_extension("tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("remove {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("mkdir {}", tmp.display()))?;
    let tar = tmp.join("source.tar");
    run_checked(
        Command::new("git")
            .args(["archive", "--format=tar", "-o"])
            .arg(&tar)
            .arg(rev),
    )?;
    run_checked(Command::new("tar").arg("-xf").arg(&tar).arg("-C").arg(&tmp))?;
    std::fs::remove_file(&tar)?;
    let version = "\nversion = \"0.1.0\"\n";
    let old_version = format!("\nversion = \"0.1.0-old.{rev}\"\n");
    for krate in ["lb-common", "lb-ebpf", "lb-userspace"] {
        patch(&tmp.join(krate).join("Cargo.toml"), version, &old_version)?;
    }
    // Its build script asks for the floating nightly, whose LLVM bpf-linker may not read.
    patch(
        &tmp.join("lb-userspace/build.rs"),
        "aya_build::Toolchain::default()",
        &format!(
            "aya_build::Toolchain::Custom({:?})",
            crate::setup::EBPF_TOOLCHAIN
        ),
    )?;
    patch(
        &tmp.join("lb-userspace/Cargo.toml"),
        "name = \"lb\"\n",
        &format!("name = \"lb-{rev}\"\n"),
    )?;
    std::fs::rename(&tmp, dest).with_context(|| format!("rename to {}", dest.display()))
}

/// Replaces the first `from` in the file at `path` by `to`; fails if there is none.
fn patch(path: &Path, from: &str, to: &str) -> Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    if !text.contains(from) {
        bail!("{} has no {from:?} to change", path.display());
    }
    std::fs::write(path, text.replacen(from, to, 1))
        .with_context(|| format!("write {}", path.display()))
}
