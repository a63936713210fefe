//! The real node's images, built locally (no registry is reachable): a static `pause` (the
//! sandbox image, a few lines of C), and busybox (Debian's busybox-static: `httpd` for the
//! HTTP server pods, `sh` and `nc` for a client pod; its `wget` crashes). Written once per
//! process under `<target>/k8s/images`, as docker-archive tars for `ctr images import`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use anyhow::{Context, Result};

use crate::image::{add_binary, docker_archive};
use crate::netns::{run, unique_name};

/// The sandbox image (containerd's `sandbox_image`).
pub const PAUSE: &str = "lb-tests/pause:1";
/// busybox: `sh`, `httpd`, `nc`, `hostname`, `sleep`.
pub const BUSYBOX: &str = "lb-tests/busybox:1";

const PAUSE_C: &str = r#"
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>
static void reap(int s) { (void)s; while (waitpid(-1, NULL, WNOHANG) > 0) {} }
static void quit(int s) { (void)s; _exit(0); }
int main(void) {
    signal(SIGINT, quit);
    signal(SIGTERM, quit);
    signal(SIGCHLD, reap);
    for (;;) pause();
}
"#;

/// The image tars of [`PAUSE`] and [`BUSYBOX`], built on first use in this process.
pub fn all() -> Result<Vec<PathBuf>> {
    static BUILT: Mutex<Option<Vec<PathBuf>>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(images) = built.as_ref() {
        return Ok(images.clone());
    }
    let dir = super::run_dir().parent().context("run dir")?.join("images");
    std::fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
    let images = vec![pause(&dir)?, busybox(&dir)?];
    *built = Some(images.clone());
    Ok(images)
}

fn pause(dir: &Path) -> Result<PathBuf> {
    let work = dir.join(unique_name("pause"));
    std::fs::create_dir_all(work.join("rootfs"))?;
    let source = work.join("pause.c");
    std::fs::write(&source, PAUSE_C)?;
    let bin = work.join("rootfs/pause");
    run(Command::new("gcc")
        .args(["-static", "-Os", "-o"])
        .arg(&bin)
        .arg(&source))
    .context("build the pause image's binary (gcc -static)")?;
    std::fs::remove_file(&source)?;
    let out = dir.join("pause.tar");
    docker_archive(&work.join("rootfs"), PAUSE, &["/pause"], &out)?;
    std::fs::remove_dir_all(&work)?;
    Ok(out)
}

fn busybox(dir: &Path) -> Result<PathBuf> {
    let work = dir.join(unique_name("busybox"));
    let rootfs = work.join("rootfs");
    add_binary(&rootfs, Path::new("/bin/busybox"), "/bin/busybox")
        .context("busybox (Debian's busybox-static)")?;
    for applet in [
        "sh", "httpd", "nc", "hostname", "sleep", "cat", "echo", "mkdir", "printf",
    ] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))?;
    }
    std::fs::create_dir_all(rootfs.join("tmp"))?;
    let out = dir.join("busybox.tar");
    docker_archive(&rootfs, BUSYBOX, &["/bin/sh"], &out)?;
    std::fs::remove_dir_all(&work)?;
    Ok(out)
}
