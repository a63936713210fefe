//! What a pod gives the agent's in-cluster configuration, outside a pod: the service
//! account's files at `/var/run/secrets/kubernetes.io/serviceaccount` (a token of
//! deploy/rbac.yaml's ServiceAccount, the cluster's CA, the namespace), in a mount namespace
//! of the agent's own, and the `kubernetes` Service's address in `KUBERNETES_SERVICE_HOST`
//! and `KUBERNETES_SERVICE_PORT`, as the kubelet sets them.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::process::CommandExt as _;
use std::process::Command;

use anyhow::{Context, Result};

use super::{ControlPlane, ScratchDir};
use crate::netns::unique_name;

/// A pod's view of the cluster for a command: see the [module](self). Its files are
/// removed on drop.
pub struct InPod {
    /// Mounted on `/run` in the command's mount namespace (`/var/run` is a link to it), so
    /// that it holds `secrets/kubernetes.io/serviceaccount`.
    run: ScratchDir,
    /// `KUBERNETES_SERVICE_HOST`: the `kubernetes` Service's ClusterIP.
    service_host: String,
}

impl InPod {
    /// The agents' ServiceAccount token of `cp`, its CA and the namespace `kube-system`;
    /// `service_host` is the `kubernetes` Service's ClusterIP (port 443).
    pub fn new(cp: &ControlPlane, service_host: &str) -> Result<Self> {
        let run = ScratchDir::new(&super::run_dir().join(unique_name("pod-run")))?;
        let account = run.path().join("secrets/kubernetes.io/serviceaccount");
        std::fs::create_dir_all(&account)
            .with_context(|| format!("mkdir {}", account.display()))?;
        let ca = cp.pki().ca_cert();
        std::fs::copy(&ca, account.join("ca.crt"))
            .with_context(|| format!("copy {}", ca.display()))?;
        std::fs::write(account.join("token"), cp.agent_token()?).context("write the token")?;
        std::fs::write(account.join("namespace"), "kube-system").context("write the namespace")?;
        Ok(InPod {
            run,
            service_host: service_host.to_owned(),
        })
    }

    /// Makes `cmd` run as in a pod: the environment, and, before `exec`, a mount namespace
    /// of its own (private: nothing propagates to the machine's) whose `/run` is this one's.
    /// The rest of the file system, /sys/fs/bpf included, is the machine's.
    pub fn configure(&self, cmd: &mut Command) -> Result<()> {
        cmd.env("KUBERNETES_SERVICE_HOST", &self.service_host)
            .env("KUBERNETES_SERVICE_PORT", "443");
        let run = CString::new(self.run.path().as_os_str().as_bytes())
            .context("the scratch directory's path")?;
        // SAFETY: between fork and exec the closure only makes system calls (unshare(2),
        // mount(2)) on C strings made before the fork; it does not allocate.
        unsafe {
            cmd.pre_exec(move || {
                crate::netns::unshare_mounts()?;
                crate::netns::mount(&run, c"/run", None)
            });
        }
        Ok(())
    }
}
