//! A real Kubernetes control plane for the tests: etcd (Debian's etcd-server), the v1.21
//! kube-apiserver, kube-controller-manager (the real EndpointSlice controller, with
//! `EndpointSliceTerminatingCondition` on) and, when asked, kube-scheduler, from the folder
//! `LB_K8S_DIR` names ([`binaries`]; the tests fail, saying what to put there, without it).
//!
//! Where things are:
//!
//! ```text
//! control plane namespace (k8s-cp)            a test's node namespace (the agent's)
//!   etcd 127.0.0.1:2379                         k8s-api 10.254.x.y/30 ── n<k> (veth)
//!   kube-apiserver 10.255.255.1:6443 (lo)       route 10.255.255.1 via the veth
//!   [2nd kube-apiserver 10.255.255.2:6443]      unreachable: Service and pod ranges
//!   controllers -> the (2nd) API server
//! test process: 127.0.0.1:<port> ─forwarder─> the API server (the test's client, kubectl)
//! ```
//!
//! Nothing in the control plane's namespace routes anywhere else, so no traffic leaves the
//! machine: the API server never resolves node names (`--kubelet-preferred-address-types=
//! InternalIP`), and a namespace [`ControlPlane::attach`]es gets unreachable routes for the
//! Service and pod ranges (a ClusterIP that nothing translates fails there). Fixed ports in a
//! namespace of its own never collide with another test run on the machine.
//!
//! The agent authenticates as deploy/rbac.yaml's ServiceAccount (a TokenRequest token), so
//! the tests also prove that its read-only ClusterRole is enough; the API servers write an
//! audit log of that user's requests ([`ControlPlane::agent_requests`]).
//!
//! Cost: a control plane is ready in about 6 s (measured on the 2-core VM); the tests of one
//! process share one ([`shared`]), one test at a time, each seeing only its own objects;
//! tests that stop an API server start their own with [`Config::agent_apiserver`].
//!
//! What the fake API server ([`crate::fakeapi`]) still does: faults a real server cannot
//! produce on demand — slow lists, watches cut at a chosen moment, resourceVersions expired
//! (410) on demand, bookmarks at a chosen interval — and objects a real server refuses to
//! store (a ClusterIP of 10.96.1.300, an IPv6 address in an IPv4 EndpointSlice).
//!
//! Caution: these binaries (Go 1.19 with json-iterator's reflect2 1.0.1) crash when they
//! encode *pretty* JSON (`?pretty`, or a `curl`, `Wget` or browser User-Agent): never ask
//! them with curl. kube-rs and kubectl ask for plain JSON, which works.

pub mod binaries;
pub mod client;
pub mod control_plane;
pub mod forward;
pub mod images;
pub mod in_pod;
pub mod node;
pub mod objects;
pub mod pki;
pub mod process;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

pub use client::Kube;
pub use control_plane::{
    ADMIN_API_IP, AGENT_USER, API_IP, API_PORT, Attachment, Config, ControlPlane, FEATURE_GATES,
    Lease, TestControlPlane, shared,
};

/// Where control planes (and nodes) keep their files: `<target>/k8s/run`.
pub fn run_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(
            || crate::agent::workspace_dir().join("target"),
            PathBuf::from,
        )
        .join("k8s/run")
}

/// A directory removed with everything in it on drop.
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// Creates `path` (and its parents).
    pub fn new(path: &Path) -> Result<Self> {
        std::fs::create_dir_all(path).with_context(|| format!("mkdir {}", path.display()))?;
        Ok(ScratchDir {
            path: path.to_owned(),
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("cleanup: remove {}: {e}", self.path.display());
        }
    }
}

/// Removes the directories of killed runs (named by [`crate::netns::unique_name`], their
/// process gone), once per process.
pub fn remove_stale_dirs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for parent in [run_dir(), PathBuf::from("/dev/shm")] {
            let Ok(entries) = std::fs::read_dir(&parent) else {
                continue;
            };
            for entry in entries.flatten() {
                if crate::netns::is_stale(&entry.file_name().to_string_lossy()) {
                    eprintln!("removing stale {}", entry.path().display());
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
    });
}
