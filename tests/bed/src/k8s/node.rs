//! A real node without kube-proxy: containerd (Debian's 1.6) and the kubelet in a network
//! namespace of their own (the node's "host network"), the reference bridge CNI with
//! host-local addresses from the node's podCIDR, portmap and loopback, and an outside client
//! namespace on the node's external interface.
//!
//! ```text
//! client ns: eth0 <client_ip>/24, default via the node ──veth── node ns: <interface> <node_ip>/24
//! node ns: containerd, kubelet, hostNetwork pods; cni0 <podCIDR .1> ── pods (their own ns)
//!          k8s-api ──veth── the control plane (routes: API server; unreachable Service and
//!          pod ranges)
//! ```
//!
//! What is the machine's and not the namespace's, and how it is put back on drop:
//! - cgroups: the kubelet's `cgroupRoot` is `/lbt-<pid>-<n>-node` in every hierarchy,
//!   removed after every process in it is killed;
//! - the kernel settings the kubelet insists on (`vm.overcommit_memory=1`,
//!   `kernel.panic=10`, `kernel.panic_on_oops=1`, ...): set before it starts (it runs with
//!   `protectKernelDefaults`, so it only checks them) and restored;
//! - mounts under the node's directory (pod volumes, sandboxes' network namespaces, with
//!   `netns_mounts_under_state_dir`): unmounted;
//! - `/var/log/pods` and `/var/log/containers` entries of this node's pods: removed;
//! - the DaemonSet's pins (`/sys/fs/bpf/lb`): `lb teardown`.
//!
//! Never touched: the machine's own interfaces and routes (nothing is attached to the
//! uplink), its containerd (another socket, root and state).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Node as NodeObject;

use super::control_plane::{Attachment, ControlPlane, User, write_kubeconfig};
use super::images;
use super::process::Process;
use super::{ScratchDir, binaries};
use crate::netns::{Netns, run, unique_name};

/// The kernel settings the v1.21 kubelet requires (`setupKernelTunables`).
const KERNEL_TUNABLES: &[(&str, &str)] = &[
    ("vm/overcommit_memory", "1"),
    ("vm/panic_on_oom", "0"),
    ("kernel/panic", "10"),
    ("kernel/panic_on_oops", "1"),
    ("kernel/keys/root_maxkeys", "1000000"),
    ("kernel/keys/root_maxbytes", "25000000"),
];

/// Where the node is.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// The Node's name.
    pub name: String,
    /// The node's external interface (in the node namespace).
    pub interface: String,
    /// Its address (/24): the Node's InternalIP, the NodePort address.
    pub node_ip: Ipv4Addr,
    /// The outside client's address, in the same /24.
    pub client_ip: Ipv4Addr,
}

/// A running node; everything it made is removed on drop.
pub struct Node {
    kubelet: Option<Process>,
    containerd: Option<Process>,
    config: NodeConfig,
    socket: PathBuf,
    cgroup_root: String,
    saved_tunables: Vec<(String, String)>,
    pod_logs_before: Vec<PathBuf>,
    /// The outside client.
    pub client: Netns,
    _link: Attachment,
    /// The node's network namespace (its "host network").
    pub ns: Netns,
    dir: ScratchDir,
}

impl Node {
    /// Brings the node up on `cp` (which must allocate node CIDRs and run the scheduler),
    /// imports the test images, and waits until the Node is Ready.
    pub fn start(cp: &ControlPlane, config: NodeConfig) -> Result<Self> {
        let started = Instant::now();
        let c = cp.config();
        if !(c.allocate_node_cidrs && c.scheduler && c.node_lifecycle) {
            bail!(
                "a real node needs a control plane with allocate_node_cidrs, scheduler and \
                 node_lifecycle"
            );
        }
        let kubelet_bin = binaries::path(binaries::KUBELET)?;
        let images = images::all()?;
        let dir = ScratchDir::new(&super::run_dir().join(unique_name("node")))?;
        let ns = Netns::new("k8s-node")?;
        let client = Netns::new("k8s-client")?;
        ns.veth(&config.interface, &client, "eth0")?;
        ns.addr(&config.interface, &format!("{}/24", config.node_ip))?;
        ns.sysctl("net/ipv4/ip_forward", "1")?;
        client.addr("eth0", &format!("{}/24", config.client_ip))?;
        client.default_route(&config.node_ip.to_string())?;
        let link = cp.attach(&ns)?;
        // The API server reaches the kubelet (logs, exec) at the Node's InternalIP.
        link.route_from_control_plane(&format!("{}/32", config.node_ip))?;

        let mut node = Node {
            kubelet: None,
            containerd: None,
            socket: dir.path().join("containerd.sock"),
            cgroup_root: unique_name("node"),
            saved_tunables: Vec::new(),
            pod_logs_before: pod_log_entries(),
            config,
            client,
            _link: link,
            ns,
            dir,
        };
        node.create_cgroup_root()?;
        node.set_kernel_tunables()?;
        node.start_containerd()?;
        for image in &images {
            run(Command::new("ctr")
                .arg("--address")
                .arg(&node.socket)
                .args(["-n", "k8s.io", "images", "import"])
                .arg(image))
            .with_context(|| format!("import {}", image.display()))?;
        }
        node.start_kubelet(cp, &kubelet_bin)?;
        let name = node.config.name.clone();
        cp.kube()
            .wait_for("the Node Ready", Duration::from_secs(90), |k| {
                let Some(n) = k.get::<NodeObject>(None, &name)? else {
                    return Ok(None);
                };
                let ready = n
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
                let cidr = n.spec.as_ref().and_then(|s| s.pod_cidr.clone());
                Ok((ready && cidr.is_some()).then_some(()))
            })?;
        eprintln!("node {} ready in {:?}", node.config.name, started.elapsed());
        Ok(node)
    }

    /// Where it is.
    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// containerd's socket.
    pub fn containerd_socket(&self) -> &Path {
        &self.socket
    }

    /// The kubelet's cgroup root, e.g. `lbt-1-2-node` (pods under `<it>/kubepods/...` of each
    /// v1 hierarchy).
    pub fn cgroup_root(&self) -> &str {
        &self.cgroup_root
    }

    /// Fails, with the end of its log, if containerd or the kubelet has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        for p in [&mut self.containerd, &mut self.kubelet]
            .into_iter()
            .flatten()
        {
            p.ensure_running()?;
        }
        Ok(())
    }

    fn create_cgroup_root(&self) -> Result<()> {
        for hierarchy in hierarchies()? {
            let path = hierarchy.join(&self.cgroup_root);
            std::fs::create_dir_all(&path).with_context(|| format!("mkdir {}", path.display()))?;
            if hierarchy.ends_with("cpuset") {
                for file in ["cpuset.cpus", "cpuset.mems"] {
                    let value = std::fs::read_to_string(hierarchy.join(file))?;
                    std::fs::write(path.join(file), value.trim())?;
                }
            }
        }
        Ok(())
    }

    fn set_kernel_tunables(&mut self) -> Result<()> {
        for (key, value) in KERNEL_TUNABLES {
            let path = format!("/proc/sys/{key}");
            let old = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
            if old.trim() != *value {
                std::fs::write(&path, value).with_context(|| format!("write {path}"))?;
                self.saved_tunables.push((path, old.trim().to_owned()));
            }
        }
        Ok(())
    }

    fn start_containerd(&mut self) -> Result<()> {
        let d = self.dir.path();
        let cni_conf = d.join("cni/net.d");
        std::fs::create_dir_all(&cni_conf)?;
        let config = d.join("containerd.toml");
        std::fs::write(
            &config,
            format!(
                r#"version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{socket}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  # Root here lacks CAP_SYS_RESOURCE: runc cannot set the negative oom_score_adj the
  # kubelet asks for, and every sandbox would fail.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  disable_tcp_service = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni_conf}"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{state}/runc"
"#,
                root = d.join("containerd-root").display(),
                state = d.join("containerd-state").display(),
                socket = self.socket.display(),
                pause = images::PAUSE,
                cni_conf = cni_conf.display(),
            ),
        )?;
        let mut cmd = self.ns.command("containerd");
        cmd.arg("--config").arg(&config);
        self.containerd = Some(Process::start(
            "containerd",
            cmd,
            &d.join("containerd.log"),
        )?);
        let deadline = Instant::now() + Duration::from_secs(30);
        while run(Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .arg("version"))
        .is_err()
        {
            if let Some(c) = self.containerd.as_mut() {
                c.ensure_running()?;
            }
            if Instant::now() > deadline {
                bail!(
                    "containerd did not answer on {} in 30 s",
                    self.socket.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Writes the CNI configuration once the Node has its podCIDR.
    fn write_cni_config(&self, pod_cidr: &str) -> Result<()> {
        let conf = serde_json::json!({
            "cniVersion": "0.4.0",
            "name": "lb-tests",
            "plugins": [
                {
                    "type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": true,
                    "hairpinMode": true,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": pod_cidr}]],
                        // The pods' default route, via cni0 (isGateway gives cni0 the
                        // gateway address, not the pods a route to it).
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": self.dir.path().join("cni/ipam"),
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": true}},
            ],
        });
        let path = self.dir.path().join("cni/net.d/10-lb-tests.conflist");
        std::fs::write(&path, serde_json::to_vec_pretty(&conf)?)?;
        Ok(())
    }

    fn start_kubelet(&mut self, cp: &ControlPlane, kubelet_bin: &Path) -> Result<()> {
        let d = self.dir.path().to_owned();
        let name = self.config.name.clone();
        let pki = cp.pki();
        let client = pki.client(
            &format!("kubelet-{name}"),
            &format!("system:node:{name}"),
            &["system:nodes"],
        )?;
        let serving = pki.serving(
            &format!("kubelet-serving-{name}"),
            &[self.config.node_ip.into()],
            &[name.as_str()],
        )?;
        let kubeconfig = d.join("kubelet.kubeconfig");
        write_kubeconfig(
            &kubeconfig,
            &format!("https://{}:{}", super::API_IP, super::API_PORT),
            &pki.ca_cert(),
            &User::Cert(&client),
        )?;
        // Pods resolve nothing outside the machine.
        let resolv = d.join("resolv.conf");
        std::fs::write(&resolv, "nameserver 127.0.0.1\n")?;
        let config = d.join("kubelet.yaml");
        std::fs::write(
            &config,
            format!(
                "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\n\
                 authentication:\n  anonymous: {{enabled: false}}\n  webhook: {{enabled: true}}\n  \
                 x509: {{clientCAFile: {ca}}}\nauthorization: {{mode: Webhook}}\n\
                 cgroupDriver: cgroupfs\ncgroupRoot: /{cgroup}\nfailSwapOn: false\n\
                 protectKernelDefaults: true\nresolvConf: {resolv}\n\
                 tlsCertFile: {cert}\ntlsPrivateKeyFile: {key}\n\
                 address: {ip}\nreadOnlyPort: 0\nhealthzBindAddress: 127.0.0.1\n\
                 clusterDomain: cluster.local\nserializeImagePulls: false\n\
                 imageGCHighThresholdPercent: 100\nimageGCLowThresholdPercent: 99\n\
                 evictionHard: {{memory.available: 50Mi, nodefs.available: 1%, imagefs.available: 1%}}\n\
                 featureGates: {{{gates}}}\n",
                ca = pki.ca_cert().display(),
                cgroup = self.cgroup_root,
                resolv = resolv.display(),
                cert = serving.cert.display(),
                key = serving.key.display(),
                ip = self.config.node_ip,
                gates = super::FEATURE_GATES.replace('=', ": "),
            ),
        )?;
        let mut cmd = self.ns.command(kubelet_bin);
        cmd.arg(format!("--config={}", config.display()))
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!("--root-dir={}", d.join("kubelet").display()))
            .arg(format!("--node-ip={}", self.config.node_ip))
            .arg(format!("--hostname-override={name}"))
            .arg("--container-runtime=remote")
            .arg(format!(
                "--container-runtime-endpoint=unix://{}",
                self.socket.display()
            ))
            .arg(format!("--pod-infra-container-image={}", images::PAUSE));
        self.kubelet = Some(Process::start("kubelet", cmd, &d.join("kubelet.log"))?);
        // The podCIDR comes with the Node object, which the kubelet registers.
        let pod_cidr = cp
            .kube()
            .wait_for("the Node's podCIDR", Duration::from_secs(60), |k| {
                if let Some(kubelet) = self.kubelet.as_mut() {
                    kubelet.ensure_running()?;
                }
                Ok(k.get::<NodeObject>(None, &name)?
                    .and_then(|n| n.spec.and_then(|s| s.pod_cidr)))
            })?;
        self.write_cni_config(&pod_cidr)
    }

    /// Stops everything and puts the machine back; errors are reported, not returned.
    fn teardown(&mut self) {
        if let Some(mut kubelet) = self.kubelet.take() {
            let _ = kubelet.stop();
        }
        // Every container and sandbox: kill and delete through containerd, so that the
        // shims exit too.
        if self.containerd.is_some() {
            let ctr = |args: &[&str]| {
                run(Command::new("ctr")
                    .arg("--address")
                    .arg(&self.socket)
                    .args(["-n", "k8s.io"])
                    .args(args))
            };
            if let Ok(out) = ctr(&["tasks", "ls", "-q"]) {
                for id in String::from_utf8_lossy(&out.stdout).lines() {
                    let _ = ctr(&["tasks", "kill", "-s", "SIGKILL", id]);
                    let deadline = Instant::now() + Duration::from_secs(5);
                    while ctr(&["tasks", "delete", id]).is_err() && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
            if let Ok(out) = ctr(&["containers", "ls", "-q"]) {
                for id in String::from_utf8_lossy(&out.stdout).lines() {
                    let _ = ctr(&["containers", "delete", id]);
                }
            }
        }
        if let Some(mut containerd) = self.containerd.take() {
            let _ = containerd.stop();
        }
        // Anything still in the kubelet's cgroups, then the cgroups.
        if let Ok(hierarchies) = hierarchies() {
            for h in &hierarchies {
                kill_cgroup_tree(&h.join(&self.cgroup_root));
            }
            for h in &hierarchies {
                remove_cgroup_tree(&h.join(&self.cgroup_root));
            }
        }
        unmount_under(self.dir.path());
        for (path, value) in self.saved_tunables.drain(..) {
            if let Err(e) = std::fs::write(&path, &value) {
                eprintln!("cleanup: restore {path} to {value}: {e}");
            }
        }
        for entry in pod_log_entries() {
            if !self.pod_logs_before.contains(&entry) {
                let _ = std::fs::remove_dir_all(&entry).or_else(|_| std::fs::remove_file(&entry));
            }
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Every mounted cgroup hierarchy (v1 controllers, named ones such as systemd's, and the
/// cgroup2 of a hybrid layout): the kubelet wants its cgroup root in each.
fn hierarchies() -> Result<Vec<PathBuf>> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    Ok(mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, path, kind) = (f.next()?, f.next()?, f.next()?);
            (kind == "cgroup" || kind == "cgroup2").then(|| PathBuf::from(path))
        })
        .collect())
}

/// SIGKILLs every process in the cgroup `dir` and below.
fn kill_cgroup_tree(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            kill_cgroup_tree(&entry.path());
        }
    }
    if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        for pid in procs.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
            // SAFETY: kill(2) of a process of this node's pods, found in its cgroup.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Removes the cgroup `dir` and its children, deepest first, waiting for their processes
/// to be gone.
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Err(e) = std::fs::remove_dir(dir) {
        if e.kind() == std::io::ErrorKind::NotFound {
            return;
        }
        if Instant::now() > deadline {
            eprintln!("cleanup: rmdir {}: {e}", dir.display());
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Unmounts (lazily) every mount at or below `dir`, deepest first.
fn unmount_under(dir: &Path) {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(PathBuf::from))
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else {
            continue;
        };
        // SAFETY: umount2 on a NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            eprintln!(
                "cleanup: umount {}: {}",
                p.display(),
                std::io::Error::last_os_error()
            );
        }
    }
}

/// The entries of /var/log/pods and /var/log/containers (the kubelet 1.21 writes pod logs
/// there, whatever its root directory).
fn pod_log_entries() -> Vec<PathBuf> {
    ["/var/log/pods", "/var/log/containers"]
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flat_map(|e| e.flatten().map(|e| e.path()))
        .collect()
}
