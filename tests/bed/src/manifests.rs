//! A manifests folder that tests rewrite under a running agent, and the YAML of a ClusterIP
//! Service with its EndpointSlice for a chosen set of pods and endpoint conditions.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::agent::examples_dir;
use crate::netns::unique_name;
use crate::topology::{HTTP_PORT, Pod};

/// A scratch manifests folder (`$TMPDIR/lbt-<pid>-<n>-manifests`), removed on drop.
#[derive(Debug)]
pub struct Folder(PathBuf);

impl Folder {
    /// An empty folder.
    pub fn new() -> Result<Self> {
        let dir = std::env::temp_dir().join(unique_name("manifests"));
        std::fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        Ok(Folder(dir))
    }

    /// A folder holding a copy of the YAML files of `examples/`.
    pub fn copy_of_examples() -> Result<Self> {
        let folder = Self::new()?;
        let examples = examples_dir();
        for entry in
            std::fs::read_dir(&examples).with_context(|| format!("read {}", examples.display()))?
        {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "yaml") {
                let name = path.file_name().context("a file name")?;
                std::fs::copy(&path, folder.0.join(name))
                    .with_context(|| format!("copy {}", path.display()))?;
            }
        }
        Ok(folder)
    }

    /// A new folder with the files of `dir` (not its subfolders).
    pub fn copy_of(dir: &Path) -> Result<Self> {
        let folder = Self::new()?;
        for entry in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
            let path = entry?.path();
            if path.is_file() {
                let name = path.file_name().context("a file name")?;
                std::fs::copy(&path, folder.0.join(name))
                    .with_context(|| format!("copy {}", path.display()))?;
            }
        }
        Ok(folder)
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `name` atomically (a temporary file renamed over it), as editors and ConfigMap
    /// mounts do, so the agent never reads half a file.
    pub fn write(&self, name: &str, text: &str) -> Result<()> {
        let tmp = self.0.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).with_context(|| format!("write {}", tmp.display()))?;
        let path = self.0.join(name);
        std::fs::rename(&tmp, &path).with_context(|| format!("rename to {}", path.display()))
    }

    /// The text of `name`.
    pub fn read(&self, name: &str) -> Result<String> {
        let path = self.0.join(name);
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))
    }

    /// Removes `name`.
    pub fn remove(&self, name: &str) -> Result<()> {
        let path = self.0.join(name);
        std::fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))
    }
}

impl Drop for Folder {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("cleanup: remove {}: {e}", self.0.display());
        }
    }
}

/// The conditions of one EndpointSlice endpoint, as the EndpointSlice controller sets them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// A running pod: ready, serving, not terminating.
    Ready,
    /// A pod being deleted that still serves: not ready, serving, terminating.
    Terminating,
}

/// A ClusterIP Service over the pods' HTTP servers, one TCP port, written to a [`Folder`]
/// as one file holding the Service and its EndpointSlice.
#[derive(Debug, Clone)]
pub struct ClusterIpService {
    /// The Service's name (namespace `default`); the file is `<name>.yaml`.
    pub name: String,
    /// The ClusterIP.
    pub cluster_ip: Ipv4Addr,
    /// The Service port.
    pub port: u16,
    /// The pods' port (the EndpointSlice port).
    pub target_port: u16,
    /// sessionAffinity ClientIP with this timeoutSeconds; `None` for no affinity.
    pub affinity_timeout_secs: Option<u32>,
}

impl ClusterIpService {
    /// `name` at `cluster_ip:port` over the pods' HTTP servers ([`HTTP_PORT`]), without
    /// affinity.
    pub fn http(name: &str, cluster_ip: impl Into<Ipv4Addr>, port: u16) -> Self {
        ClusterIpService {
            name: name.to_owned(),
            cluster_ip: cluster_ip.into(),
            port,
            target_port: HTTP_PORT,
            affinity_timeout_secs: None,
        }
    }

    /// The frontend as `lb services` names it, `address:port/TCP`.
    pub fn frontend(&self) -> String {
        format!("{}:{}/TCP", self.cluster_ip, self.port)
    }

    /// The backend address of `pod`, as `lb services` names it, `address:port`.
    pub fn backend(&self, pod: &Pod) -> String {
        format!("{}:{}", pod.ip, self.target_port)
    }

    /// The Service and an EndpointSlice listing `endpoints`, as YAML.
    pub fn yaml(&self, endpoints: &[(&Pod, Condition)]) -> String {
        let affinity = match self.affinity_timeout_secs {
            None => String::new(),
            Some(secs) => format!(
                "  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      \
                 timeoutSeconds: {secs}\n"
            ),
        };
        let mut text = format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\n\
             spec:\n  type: ClusterIP\n  clusterIP: {ip}\n  clusterIPs: [{ip}]\n{affinity}  \
             ports:\n    - name: http\n      protocol: TCP\n      port: {port}\n      \
             targetPort: {target}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata:\n  name: {name}-slice\n  namespace: default\n  labels:\n    \
             kubernetes.io/service-name: {name}\naddressType: IPv4\nports:\n  - name: http\n    \
             protocol: TCP\n    port: {target}\nendpoints:{empty}\n",
            name = self.name,
            ip = self.cluster_ip,
            port = self.port,
            target = self.target_port,
            empty = if endpoints.is_empty() { " []" } else { "" },
        );
        for (pod, condition) in endpoints {
            let (ready, terminating) = match condition {
                Condition::Ready => (true, false),
                Condition::Terminating => (false, true),
            };
            write!(
                text,
                "  - addresses: [{ip}]\n    conditions:\n      ready: {ready}\n      \
                 serving: true\n      terminating: {terminating}\n    targetRef:\n      \
                 kind: Pod\n      namespace: default\n      name: {name}\n",
                ip = pod.ip,
                name = pod.name,
            )
            .expect("writing to a String");
        }
        text
    }

    /// Writes [`ClusterIpService::yaml`] to `<name>.yaml` in `folder`.
    pub fn write(&self, folder: &Folder, endpoints: &[(&Pod, Condition)]) -> Result<()> {
        folder.write(&format!("{}.yaml", self.name), &self.yaml(endpoints))
    }
}
