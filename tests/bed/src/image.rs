//! Container images without Docker or a registry: a docker-archive tar (manifest.json, a
//! config, one layer) of a root filesystem, which `docker load` and `ctr images import`
//! both read. Used by `cargo xtask image` (the agent) and by the real node's test images.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use crate::netns::run;

/// Writes the image `tag` of the root filesystem in `rootfs`, with this entrypoint, to
/// `out`. The same files give the same bytes (sorted, owned by root, dated 1970).
pub fn docker_archive(rootfs: &Path, tag: &str, entrypoint: &[&str], out: &Path) -> Result<()> {
    let work = out.with_extension("d");
    if work.exists() {
        std::fs::remove_dir_all(&work)?;
    }
    std::fs::create_dir_all(&work)?;
    let layer = work.join("layer.tar");
    tar(&layer, rootfs, &["."])?;
    let layer_sha = sha256(&std::fs::read(&layer)?);
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": entrypoint, "Env": ["PATH=/usr/local/bin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_sha}")]},
        "history": [{"created_by": "lb-tests image::docker_archive"}],
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
    Ok(())
}

/// Copies `bin` to `dest` in `rootfs` with the shared libraries `ldd` names for it (the
/// loader included) at their paths: the binary runs in an image of nothing else.
pub fn add_binary(rootfs: &Path, bin: &Path, dest: &str) -> Result<()> {
    let target = rootfs.join(dest.trim_start_matches('/'));
    std::fs::create_dir_all(target.parent().context("binary directory")?)?;
    std::fs::copy(bin, &target).with_context(|| format!("copy {}", bin.display()))?;
    for lib in libraries(bin)? {
        let dest = rootfs.join(lib.strip_prefix("/").context("absolute library path")?);
        std::fs::create_dir_all(dest.parent().context("library directory")?)?;
        // The file itself, under the name the loader looks for (ldd may name a symlink).
        std::fs::copy(&lib, &dest).with_context(|| format!("copy {}", lib.display()))?;
    }
    Ok(())
}

/// Writes the tar `out` of `entries` in `dir`, the same bytes for the same files.
fn tar(out: &Path, dir: &Path, entries: &[&str]) -> Result<()> {
    run(Command::new("tar")
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
        .args(entries))?;
    Ok(())
}

/// The shared libraries `ldd` lists for `bin`, the loader included; none for a static one.
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
    for line in said.lines() {
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)`, or the loader
        // `/lib64/ld-linux-x86-64.so.2 (0x...)`; linux-vdso has no file.
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(path));
        }
    }
    if !libs
        .iter()
        .any(|l| l.to_string_lossy().contains("ld-linux"))
    {
        bail!("ldd named no loader for {}: {said}", bin.display());
    }
    Ok(libs)
}

fn sha256(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
