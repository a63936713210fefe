//! `cargo xtask image`: the agent's container image, built from the release binary without
//! Docker: a docker-archive tar (manifest.json, a config, one layer) that both
//! `docker load` and `ctr images import` read.
//!
//! The layer holds `/usr/local/bin/lb` and the shared libraries `ldd` names for it (glibc's
//! loader, libc, libm, libgcc_s), at the same paths. Why copied libraries rather than a
//! static (musl) build: the image then carries the very binary `cargo xtask test` tested,
//! with no second build, no musl toolchain and no C cross-compiler for ring; the four
//! libraries are under 3 MB. The image has nothing else: no shell, no package manager.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

/// Builds the image of `lb` tagged `tag` into `out`; returns `out`.
pub fn build(lb: &Path, tag: &str, out: &Path) -> Result<PathBuf> {
    let work = out.with_extension("d");
    if work.exists() {
        std::fs::remove_dir_all(&work)?;
    }
    let rootfs = work.join("rootfs");
    let bin = rootfs.join("usr/local/bin/lb");
    std::fs::create_dir_all(bin.parent().context("bin dir")?)?;
    std::fs::copy(lb, &bin).with_context(|| format!("copy {}", lb.display()))?;
    for lib in libraries(lb)? {
        let dest = rootfs.join(lib.strip_prefix("/").context("absolute library path")?);
        std::fs::create_dir_all(dest.parent().context("library dir")?)?;
        // The file itself, under the name the loader looks for (ldd may name a symlink).
        std::fs::copy(&lib, &dest).with_context(|| format!("copy {}", lib.display()))?;
    }
    // Mount points of the DaemonSet's volumes exist in any case (runc makes them), and the
    // root filesystem is read-only: nothing else is needed.
    let layer = work.join("layer.tar");
    tar(&layer, &rootfs, &["."])?;
    let layer_sha = sha256(&std::fs::read(&layer)?);
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": ["/usr/local/bin/lb"], "Env": ["PATH=/usr/local/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_sha}")]},
        "history": [{"created_by": "cargo xtask image"}],
    });
    let config = serde_json::to_vec(&config)?;
    let config_name = format!("{}.json", sha256(&config));
    std::fs::write(work.join(&config_name), &config)?;
    let layer_name = format!("{layer_sha}/layer.tar");
    std::fs::create_dir_all(work.join(&layer_sha))?;
    std::fs::rename(&layer, work.join(&layer_name))?;
    let manifest = serde_json::json!([{
        "Config": config_name,
        "RepoTags": [tag],
        "Layers": [layer_name],
    }]);
    std::fs::write(work.join("manifest.json"), serde_json::to_vec(&manifest)?)?;
    tar(out, &work, &["manifest.json", &config_name, &layer_name])?;
    std::fs::remove_dir_all(&work)?;
    Ok(out.to_owned())
}

/// Writes the tar `out` of `entries` in `dir`, the same bytes for the same files: sorted,
/// owned by root, dated 1970.
fn tar(out: &Path, dir: &Path, entries: &[&str]) -> Result<()> {
    crate::run_checked(
        Command::new("tar")
            .args([
                "--sort=name",
                "--mtime=@0",
                "--owner=0",
                "--group=0",
                "--numeric-owner",
            ])
            .arg("-cf")
            .arg(out)
            .arg("-C")
            .arg(dir)
            .args(entries),
    )
}

/// The shared libraries `ldd` lists for `bin`, the loader included.
fn libraries(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .context("run ldd (Debian's libc-bin)")?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if said.contains("not a dynamic executable") || said.contains("statically linked") {
        return Ok(Vec::new());
    }
    if !out.status.success() {
        bail!("ldd {} failed: {said}", bin.display());
    }
    let mut libs = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)`, or the loader
        // `/lib64/ld-linux-x86-64.so.2 (0x...)`; linux-vdso has no file.
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/')),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(path));
        }
    }
    if !libs
        .iter()
        .any(|l| l.to_string_lossy().contains("ld-linux"))
    {
        bail!(
            "ldd named no loader for {}: is it a static binary? {libs:?}",
            bin.display()
        );
    }
    Ok(libs)
}

fn sha256(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
