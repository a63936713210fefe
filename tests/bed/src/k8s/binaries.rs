//! The Kubernetes server binaries: unpacked once from the folder `LB_K8S_DIR` names into the
//! build tree, each checked against the SHA-256 it must have.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use crate::netns::{run, unique_name};

/// The environment variable that names the folder of the binaries.
pub const K8S_DIR_ENV: &str = "LB_K8S_DIR";

/// One binary: its name, and the SHA-256 of the unpacked file (Kubernetes v1.21.2, built from
/// k3s' `v1.21.2+k3s1` source: `../shared/k8s/README.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Binary {
    /// The file name, e.g. `kube-apiserver` (`kube-apiserver.xz` in the folder).
    pub name: &'static str,
    sha256: &'static str,
}

/// kube-apiserver.
pub const KUBE_APISERVER: Binary = Binary {
    name: "kube-apiserver",
    sha256: "b2752cadc45b71554997458f7b4c521d698dd0f56ad769b47f42daffee98944a",
};
/// kube-controller-manager.
pub const KUBE_CONTROLLER_MANAGER: Binary = Binary {
    name: "kube-controller-manager",
    sha256: "1870b61f65b08835856a9a30b48129de7d1be424ad91bf712dce4df3e386553f",
};
/// kube-scheduler.
pub const KUBE_SCHEDULER: Binary = Binary {
    name: "kube-scheduler",
    sha256: "c58ad51aa8bd9fd7c3650ca28aab09e48f50e91ad6d64296ac90f6d042724a09",
};
/// kubelet.
pub const KUBELET: Binary = Binary {
    name: "kubelet",
    sha256: "ee24854085a5577d88a68db5429e0bdda2e34db1bd9b54ea1c035dc0d253776e",
};
/// Every binary the tests use.
pub const ALL: [Binary; 4] = [
    KUBE_APISERVER,
    KUBE_CONTROLLER_MANAGER,
    KUBE_SCHEDULER,
    KUBELET,
];

/// What to put where, for the error messages.
fn wanted() -> String {
    let files: Vec<String> = ALL.iter().map(|b| format!("{}.xz", b.name)).collect();
    format!(
        "set {K8S_DIR_ENV} to a folder holding {} (the Kubernetes v1.21.2 server binaries, \
         xz-compressed; `.ci/run` uses ../shared/k8s, whose README.md says where they come \
         from)",
        files.join(", ")
    )
}

/// The folder of compressed binaries, or why there is none.
pub fn source_dir() -> Result<PathBuf> {
    let Some(dir) = std::env::var_os(K8S_DIR_ENV) else {
        bail!(
            "the real-cluster tests need the Kubernetes binaries: {}",
            wanted()
        );
    };
    let dir = PathBuf::from(dir);
    if !dir.is_dir() {
        bail!(
            "{K8S_DIR_ENV}={} is not a folder: {}",
            dir.display(),
            wanted()
        );
    }
    Ok(dir)
}

/// Where binaries are unpacked: `<target>/k8s/bin` (`CARGO_TARGET_DIR`, else the
/// workspace's `target/`).
fn unpack_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(
            || crate::agent::workspace_dir().join("target"),
            PathBuf::from,
        )
        .join("k8s/bin")
}

/// The path of `binary`, unpacked from `$LB_K8S_DIR/<name>.xz` on first use (by this or an
/// earlier run) and checked against its SHA-256 each time a process first asks for it. Fails
/// when `LB_K8S_DIR` is unset or lacks the file, even if an earlier run unpacked it.
pub fn path(binary: Binary) -> Result<PathBuf> {
    static UNPACKED: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());
    let source = source_dir()?.join(format!("{}.xz", binary.name));
    if !source.is_file() {
        bail!("{} is missing: {}", source.display(), wanted());
    }
    let mut unpacked = UNPACKED.lock().unwrap_or_else(|e| e.into_inner());
    let dest = unpack_dir().join(binary.name);
    if unpacked.contains(&binary.name) {
        return Ok(dest);
    }
    if !(dest.is_file() && sha256(&dest)? == binary.sha256) {
        unpack(&source, binary, &dest)?;
    }
    unpacked.push(binary.name);
    Ok(dest)
}

fn unpack(source: &Path, binary: Binary, dest: &Path) -> Result<()> {
    let dir = dest.parent().context("unpack directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("mkdir {}", dir.display()))?;
    // Unpacked beside and renamed into place, so that a concurrent run never sees half a file.
    let partial = dir.join(unique_name(binary.name));
    let out =
        std::fs::File::create(&partial).with_context(|| format!("create {}", partial.display()))?;
    let result = run(Command::new("xz").arg("-dc").arg(source).stdout(out))
        .with_context(|| format!("unpack {} (xz is in Debian's xz-utils)", source.display()))
        .and_then(|_| {
            let got = sha256(&partial)?;
            if got != binary.sha256 {
                bail!(
                    "{} unpacks to a file with SHA-256 {got}, not {}: {}",
                    source.display(),
                    binary.sha256,
                    wanted()
                );
            }
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o755))?;
            std::fs::rename(&partial, dest)
                .with_context(|| format!("rename into {}", dest.display()))
        });
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}

fn sha256(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        use std::io::Read as _;
        let n = file
            .read(&mut buf)
            .with_context(|| format!("read {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}
