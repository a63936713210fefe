//! `cargo xtask image`: the agent's container image, built from the release binary without
//! Docker (`lb_testbed::image`): a docker-archive tar that `docker load` and
//! `ctr images import` read.
//!
//! The layer holds `/usr/local/bin/lb` and the shared libraries `ldd` names for it (glibc's
//! loader, libc, libm, libgcc_s), at the same paths. Why copied libraries rather than a
//! static (musl) build: the image then carries the very binary `cargo xtask test` tested,
//! with no second build, no musl toolchain and no C cross-compiler for ring; the four
//! libraries are under 3 MB. The image has nothing else: no shell, no package manager.

use std::path::{Path, PathBuf};

use anyhow::Result;

/// Builds the image of `lb` tagged `tag` into `out`; returns `out`.
pub fn build(lb: &Path, tag: &str, out: &Path) -> Result<PathBuf> {
    let rootfs = out.with_extension("rootfs");
    if rootfs.exists() {
        std::fs::remove_dir_all(&rootfs)?;
    }
    lb_testbed::image::add_binary(&rootfs, lb, "/usr/local/bin/lb")?;
    // The mount points of the DaemonSet's volumes are made by the runtime, and the root
    // filesystem is read-only: nothing else is needed.
    lb_testbed::image::docker_archive(&rootfs, tag, &["/usr/local/bin/lb"], out)?;
    std::fs::remove_dir_all(&rootfs)?;
    Ok(out.to_owned())
}
