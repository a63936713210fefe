//! etcd, kube-apiserver, kube-controller-manager and (when asked) kube-scheduler, in a network
//! namespace of their own.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{Node, Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde::Deserialize;
use serde_json::json;

use super::ScratchDir;
use super::binaries::{self, KUBE_APISERVER, KUBE_CONTROLLER_MANAGER, KUBE_SCHEDULER};
use super::client::Kube;
use super::forward::Forwarder;
use super::pki::{CertFiles, Pki};
use super::process::Process;
use crate::netns::{Netns, unique_name};

/// Where the API server the agents use listens, inside the control plane's namespace; a
/// namespace [`ControlPlane::attach`]es reaches it over a veth.
pub const API_IP: Ipv4Addr = Ipv4Addr::new(10, 255, 255, 1);
/// The second API server of [`Config::agent_apiserver`]: the one the controllers and the
/// test use while the agents' is stopped.
pub const ADMIN_API_IP: Ipv4Addr = Ipv4Addr::new(10, 255, 255, 2);
/// The API servers' port.
pub const API_PORT: u16 = 6443;
/// The feature gates of every component: the EndpointSlice controller's `serving` and
/// `terminating` conditions, and the alpha features of topology-aware routing and internal
/// traffic policy.
pub const FEATURE_GATES: &str = "EndpointSliceTerminatingCondition=true,ServiceTopology=true,\
     TopologyAwareHints=true,ServiceInternalTrafficPolicy=true";
/// The ServiceAccount the agents run as (deploy/rbac.yaml's), and so their user name.
pub const AGENT_USER: &str = "system:serviceaccount:kube-system:lb";
/// The links [`ControlPlane::attach`] makes: 10.254.0.0/16, a /30 each.
const LINK_BASE: [u8; 2] = [10, 254];

/// What to run.
#[derive(Clone, Debug)]
pub struct Config {
    /// The Service ClusterIP ranges (one per family), `--service-cluster-ip-range`.
    pub service_cidrs: Vec<String>,
    /// The pod ranges (one per family), `--cluster-cidr`; made unreachable in the
    /// namespaces attached.
    pub pod_cidrs: Vec<String>,
    /// Whether the controller-manager gives each Node a podCIDR from `pod_cidrs` (/24, /64).
    pub allocate_node_cidrs: bool,
    /// Whether kube-scheduler runs (pods without `spec.nodeName` need it).
    pub scheduler: bool,
    /// Whether the node lifecycle controller runs: real nodes need it (it lifts the
    /// not-ready taint the kubelet registers with); Node objects without a kubelet must not
    /// have it (they would go NotReady after 40 s, and their pods with them).
    pub node_lifecycle: bool,
    /// A second API server for the agents alone ([`API_IP`]), which the test can stop and
    /// start while the controllers and the test's own client go on through the other
    /// ([`ADMIN_API_IP`]): an outage the agent sees while the cluster changes.
    pub agent_apiserver: bool,
}

impl Default for Config {
    /// Dual stack: Services 10.96.0.0/12 and fd00:96::/108, pods 10.244.0.0/16 and
    /// fd00:244::/56 (the test topologies' addresses); no scheduler, one API server.
    fn default() -> Self {
        Config {
            service_cidrs: vec!["10.96.0.0/12".into(), "fd00:96::/108".into()],
            pod_cidrs: vec!["10.244.0.0/16".into(), "fd00:244::/56".into()],
            allocate_node_cidrs: false,
            scheduler: false,
            node_lifecycle: false,
            agent_apiserver: false,
        }
    }
}

/// One API server process, where it listens, and the test's admin client of it (through a
/// [`Forwarder`], which outlives restarts).
struct ApiServer {
    kube: Kube,
    process: Option<Process>,
    ip: Ipv4Addr,
    args: Vec<String>,
    log: PathBuf,
    kubeconfig: PathBuf,
    _forwarder: Forwarder,
}

/// A running control plane; stopped, its namespace and its data removed, on drop (also when
/// the test panics). See the [module](super) for the addresses.
pub struct ControlPlane {
    // Dropped in this order: the processes (controllers before API servers before etcd),
    // the namespace, the files.
    scheduler: Option<Process>,
    controller_manager: Process,
    agent_apiserver: Option<ApiServer>,
    apiserver: ApiServer,
    etcd: Process,
    ns: Netns,
    pki: Pki,
    config: Config,
    links: AtomicU32,
    _etcd_dir: ScratchDir,
    dir: ScratchDir,
}

impl ControlPlane {
    /// Starts everything and waits until the API server is ready, the controllers run and
    /// deploy/rbac.yaml is applied.
    pub fn start(config: Config) -> Result<Self> {
        let started = Instant::now();
        // Before anything is made: fails, saying what is missing, without the binaries.
        for binary in [KUBE_APISERVER, KUBE_CONTROLLER_MANAGER, KUBE_SCHEDULER] {
            binaries::path(binary)?;
        }
        crate::netns::remove_stale().context("removing stale namespaces")?;
        super::remove_stale_dirs();
        let dir = ScratchDir::new(&super::run_dir().join(unique_name("cp")))?;
        // etcd fsyncs every write: on tmpfs that costs nothing.
        let etcd_dir = ScratchDir::new(&Path::new("/dev/shm").join(unique_name("etcd")))?;
        let ns = Netns::new("k8s-cp")?;
        ns.ip(&["addr", "add", &format!("{API_IP}/32"), "dev", "lo"])?;
        ns.ip(&["addr", "add", &format!("{ADMIN_API_IP}/32"), "dev", "lo"])?;

        let pki = Pki::new(&dir.path().join("pki"))?;
        let mut ips: Vec<IpAddr> = vec![
            API_IP.into(),
            ADMIN_API_IP.into(),
            Ipv4Addr::LOCALHOST.into(),
        ];
        for cidr in &config.service_cidrs {
            ips.push(first_address(cidr)?);
        }
        let serving = pki.serving(
            "apiserver",
            &ips,
            &[
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ],
        )?;

        let etcd = Process::start(
            "etcd",
            {
                let mut cmd = ns.command("etcd");
                cmd.args(["--name", "cp", "--data-dir"])
                    .arg(etcd_dir.path())
                    .args([
                        "--listen-client-urls=http://127.0.0.1:2379",
                        "--advertise-client-urls=http://127.0.0.1:2379",
                        "--listen-peer-urls=http://127.0.0.1:2380",
                        "--initial-advertise-peer-urls=http://127.0.0.1:2380",
                        "--initial-cluster=cp=http://127.0.0.1:2380",
                    ]);
                cmd
            },
            &dir.path().join("etcd.log"),
        )?;

        let audit_policy = dir.path().join("audit-policy.yaml");
        std::fs::write(
            &audit_policy,
            format!(
                // Every stage: a watch shows at RequestReceived (only), when it starts.
                "apiVersion: audit.k8s.io/v1\nkind: Policy\n\
                 rules:\n- level: Metadata\n  users: [\"{AGENT_USER}\"]\n- level: None\n"
            ),
        )?;
        let kubelet_client = pki.client(
            "apiserver-kubelet-client",
            "kube-apiserver",
            &["system:masters"],
        )?;
        let front_proxy = pki.front_proxy_client()?;
        let common: Vec<String> = [
            "--etcd-servers=http://127.0.0.1:2379".to_owned(),
            format!("--secure-port={API_PORT}"),
            format!("--tls-cert-file={}", serving.cert.display()),
            format!("--tls-private-key-file={}", serving.key.display()),
            format!("--client-ca-file={}", pki.ca_cert().display()),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-account-key-file={}", pki.sa_pub().display()),
            format!(
                "--service-account-signing-key-file={}",
                pki.sa_key().display()
            ),
            format!(
                "--service-cluster-ip-range={}",
                config.service_cidrs.join(",")
            ),
            "--authorization-mode=Node,RBAC".into(),
            format!("--feature-gates={FEATURE_GATES}"),
            // Never resolve node names through the machine's DNS.
            "--kubelet-preferred-address-types=InternalIP".into(),
            format!(
                "--kubelet-client-certificate={}",
                kubelet_client.cert.display()
            ),
            format!("--kubelet-client-key={}", kubelet_client.key.display()),
            format!(
                "--requestheader-client-ca-file={}",
                pki.front_proxy_ca_cert().display()
            ),
            "--requestheader-allowed-names=front-proxy-client".into(),
            "--requestheader-username-headers=X-Remote-User".into(),
            "--requestheader-group-headers=X-Remote-Group".into(),
            "--requestheader-extra-headers-prefix=X-Remote-Extra-".into(),
            format!("--proxy-client-cert-file={}", front_proxy.cert.display()),
            format!("--proxy-client-key-file={}", front_proxy.key.display()),
            format!("--audit-policy-file={}", audit_policy.display()),
            "--profiling=false".into(),
        ]
        .into();
        let admin_ip = if config.agent_apiserver {
            ADMIN_API_IP
        } else {
            API_IP
        };
        let admin = pki.client("admin", "lb-tests-admin", &["system:masters"])?;
        let mut apiserver =
            ApiServer::new(&dir, &ns, &pki, &admin, "apiserver", admin_ip, &common)?;
        apiserver.start(&ns)?;
        let mut agent_apiserver = if config.agent_apiserver {
            let mut server =
                ApiServer::new(&dir, &ns, &pki, &admin, "agent-apiserver", API_IP, &common)?;
            server.start(&ns)?;
            Some(server)
        } else {
            None
        };
        wait_ready(&mut apiserver, "the API server")?;
        if let Some(server) = agent_apiserver.as_mut() {
            wait_ready(server, "the agents' API server")?;
        }

        let cm_cert = pki.client("controller-manager", "system:kube-controller-manager", &[])?;
        let cm_kubeconfig = dir.path().join("controller-manager.kubeconfig");
        let in_ns = format!("https://{admin_ip}:{API_PORT}");
        write_kubeconfig(
            &cm_kubeconfig,
            &in_ns,
            &pki.ca_cert(),
            &User::Cert(&cm_cert),
        )?;
        let controller_manager = Process::start(
            "kube-controller-manager",
            {
                let mut cmd = ns.command(binaries::path(KUBE_CONTROLLER_MANAGER)?);
                cmd.arg(format!("--kubeconfig={}", cm_kubeconfig.display()))
                    .args([
                        "--secure-port=0",
                        "--port=0",
                        "--leader-elect=false",
                        // Each controller as its own ServiceAccount, with the bootstrap
                        // roles' permissions (the EndpointSlice controller's writes).
                        "--use-service-account-credentials=true",
                        "--kube-api-qps=100",
                        "--kube-api-burst=200",
                    ])
                    .arg(if config.node_lifecycle {
                        "--controllers=*"
                    } else {
                        "--controllers=*,-nodelifecycle"
                    })
                    .arg(format!("--feature-gates={FEATURE_GATES}"))
                    .arg(format!(
                        "--service-account-private-key-file={}",
                        pki.sa_key().display()
                    ))
                    .arg(format!("--root-ca-file={}", pki.ca_cert().display()))
                    .arg(format!(
                        "--service-cluster-ip-range={}",
                        config.service_cidrs.join(",")
                    ))
                    .arg(format!("--cluster-cidr={}", config.pod_cidrs.join(",")))
                    .arg(format!(
                        "--allocate-node-cidrs={}",
                        config.allocate_node_cidrs
                    ))
                    .args(node_cidr_masks(&config.pod_cidrs));
                cmd
            },
            &dir.path().join("controller-manager.log"),
        )?;
        let scheduler = if config.scheduler {
            let cert = pki.client("scheduler", "system:kube-scheduler", &[])?;
            let kubeconfig = dir.path().join("scheduler.kubeconfig");
            write_kubeconfig(&kubeconfig, &in_ns, &pki.ca_cert(), &User::Cert(&cert))?;
            let mut cmd = ns.command(binaries::path(KUBE_SCHEDULER)?);
            cmd.arg(format!("--kubeconfig={}", kubeconfig.display()))
                .args(["--secure-port=0", "--port=0", "--leader-elect=false"])
                .arg(format!("--feature-gates={FEATURE_GATES}"));
            Some(Process::start(
                "kube-scheduler",
                cmd,
                &dir.path().join("scheduler.log"),
            )?)
        } else {
            None
        };

        let cp = ControlPlane {
            scheduler,
            controller_manager,
            agent_apiserver,
            apiserver,
            etcd,
            ns,
            pki,
            config,
            links: AtomicU32::new(0),
            _etcd_dir: etcd_dir,
            dir,
        };
        cp.apply_rbac()?;
        // The ServiceAccount controller makes `default` (pods are refused before it exists).
        let mut cp = cp;
        let deadline = Instant::now() + Duration::from_secs(60);
        while cp
            .kube()
            .get::<ServiceAccount>(Some("default"), "default")?
            .is_none()
        {
            cp.ensure_running()?;
            if Instant::now() > deadline {
                bail!(
                    "no default ServiceAccount after 60 s; the controller-manager's log:\n{}",
                    cp.controller_manager.log_tail(20)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("control plane ready in {:?}", started.elapsed());
        Ok(cp)
    }

    /// The test's client (admin), of the API server the controllers use.
    pub fn kube(&self) -> &Kube {
        &self.apiserver.kube
    }

    /// The admin kubeconfig of that API server, for kubectl in the test process.
    pub fn admin_kubeconfig(&self) -> &Path {
        &self.apiserver.kubeconfig
    }

    /// The control plane's namespace.
    pub fn netns(&self) -> &Netns {
        &self.ns
    }

    /// The cluster's certificates.
    pub fn pki(&self) -> &Pki {
        &self.pki
    }

    /// What it runs.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Its directory (logs, certificates, kubeconfigs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Fails, with the end of its log, if a component has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        self.etcd.ensure_running()?;
        if let Some(p) = self.apiserver.process.as_mut() {
            p.ensure_running()?;
        }
        self.controller_manager.ensure_running()?;
        if let Some(s) = self.scheduler.as_mut() {
            s.ensure_running()?;
        }
        Ok(())
    }

    /// Gives `ns` a route to the agents' API server ([`API_IP`]) over a veth (`k8s-api` in
    /// `ns`), and unreachable routes for the Service and pod ranges, so that a frontend
    /// nothing translates fails there and never leaves the machine. The link goes with
    /// `ns`, or with the returned guard.
    pub fn attach(&self, ns: &Netns) -> Result<Attachment> {
        let n = self.links.fetch_add(1, Ordering::Relaxed);
        if n >= 16_384 {
            bail!("more than 16,384 links to the control plane");
        }
        let base = n * 4;
        let addr = |host: u32| {
            let v = base + host;
            Ipv4Addr::new(LINK_BASE[0], LINK_BASE[1], (v >> 8) as u8, v as u8)
        };
        let cp_side = format!("n{n}");
        self.ns.veth(&cp_side, ns, "k8s-api")?;
        self.ns.addr(&cp_side, &format!("{}/30", addr(1)))?;
        ns.addr("k8s-api", &format!("{}/30", addr(2)))?;
        ns.ip(&[
            "route",
            "add",
            &format!("{API_IP}/32"),
            "via",
            &addr(1).to_string(),
        ])?;
        for cidr in self
            .config
            .service_cidrs
            .iter()
            .chain(&self.config.pod_cidrs)
        {
            let family = if cidr.contains(':') { "-6" } else { "-4" };
            ns.ip(&[family, "route", "add", "unreachable", cidr])?;
        }
        Ok(Attachment {
            cp: self.ns.name().to_owned(),
            dev: cp_side,
            peer: addr(2),
        })
    }

    /// A kubeconfig for the agent running in a namespace [`ControlPlane::attach`]ed: its
    /// ServiceAccount's token (deploy/rbac.yaml's permissions, nothing more) and the agents'
    /// API server.
    pub fn agent_kubeconfig(&self) -> Result<PathBuf> {
        let token = self.agent_token()?;
        let path = self
            .dir
            .path()
            .join(format!("{}.kubeconfig", unique_name("agent")));
        write_kubeconfig(
            &path,
            &format!("https://{API_IP}:{API_PORT}"),
            &self.pki.ca_cert(),
            &User::Token(&token),
        )?;
        Ok(path)
    }

    /// A token of the agents' ServiceAccount (kube-system/lb), valid for a day.
    pub fn agent_token(&self) -> Result<String> {
        let request: TokenRequest = serde_json::from_value(json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {"expirationSeconds": 86_400},
        }))?;
        let sa: kube::Api<ServiceAccount> =
            kube::Api::namespaced(self.kube().client(), "kube-system");
        self.kube()
            .block_on(sa.create_token_request("lb", &Default::default(), &request))
            .context("a token for kube-system/lb")?
            .status
            .context("the TokenRequest has no status")?
            .token
            .context("the TokenRequest has no token")
    }

    /// Stops the agents' API server (SIGKILL: a crash, not a drain).
    pub fn stop_agent_apiserver(&mut self) -> Result<()> {
        let server = self
            .agent_apiserver
            .as_mut()
            .context("this control plane has no API server of the agents' own")?;
        if let Some(mut p) = server.process.take() {
            p.stop_with(libc::SIGKILL)?;
        }
        Ok(())
    }

    /// Starts the agents' API server again and waits until it is ready.
    pub fn start_agent_apiserver(&mut self) -> Result<()> {
        let mut server = self
            .agent_apiserver
            .take()
            .context("this control plane has no API server of the agents' own")?;
        let result = server
            .start(&self.ns)
            .and_then(|()| wait_ready(&mut server, "the agents' API server"));
        self.agent_apiserver = Some(server);
        result
    }

    /// What the agents asked the API servers, in order: the request URIs of
    /// [`AGENT_USER`]'s requests from the audit logs, percent-decoded.
    pub fn agent_requests(&self) -> Result<Vec<String>> {
        #[derive(Deserialize)]
        struct Event {
            #[serde(rename = "requestURI")]
            request_uri: String,
            stage: String,
            user: User,
        }
        #[derive(Deserialize)]
        struct User {
            username: String,
        }
        let mut uris = Vec::new();
        for server in std::iter::once(&self.apiserver).chain(&self.agent_apiserver) {
            let path = server.audit_log();
            let text = match std::fs::read_to_string(&path) {
                Ok(text) => text,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e).context(format!("read {}", path.display())),
            };
            for line in text.lines() {
                let event: Event = serde_json::from_str(line)
                    .with_context(|| format!("an audit event in {}: {line}", path.display()))?;
                if event.user.username == AGENT_USER && event.stage == "RequestReceived" {
                    uris.push(percent_decode(&event.request_uri));
                }
            }
        }
        Ok(uris)
    }

    /// Deletes every object a test made (Services but `kubernetes`, EndpointSlices but its,
    /// Pods, Nodes) and waits until they are gone.
    pub fn reset(&self) -> Result<()> {
        let k = self.kube();
        let is_kubernetes =
            |ns: Option<&str>, name: &str| ns == Some("default") && name == "kubernetes";
        for s in k.list::<Service>(None)? {
            let (ns, name) = (
                s.metadata.namespace.as_deref(),
                s.metadata.name.as_deref().unwrap_or(""),
            );
            if !is_kubernetes(ns, name) {
                k.delete::<Service>(ns, name, None)?;
            }
        }
        for p in k.list::<Pod>(None)? {
            k.delete::<Pod>(
                p.metadata.namespace.as_deref(),
                p.metadata.name.as_deref().unwrap_or(""),
                Some(0),
            )?;
        }
        for n in k.list::<Node>(None)? {
            k.delete::<Node>(None, n.metadata.name.as_deref().unwrap_or(""), None)?;
        }
        let leftover_slices = |k: &Kube| -> Result<Vec<EndpointSlice>> {
            Ok(k.list::<EndpointSlice>(None)?
                .into_iter()
                .filter(|s| {
                    let service = s
                        .metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get("kubernetes.io/service-name"));
                    !(s.metadata.namespace.as_deref() == Some("default")
                        && service.map(String::as_str) == Some("kubernetes"))
                })
                .collect())
        };
        for s in leftover_slices(k)? {
            k.delete::<EndpointSlice>(
                s.metadata.namespace.as_deref(),
                s.metadata.name.as_deref().unwrap_or(""),
                None,
            )?;
        }
        k.wait_for(
            "a cluster without the last test's objects",
            Duration::from_secs(30),
            |k| {
                let services = k.list::<Service>(None)?.len();
                let rest = k.list::<Pod>(None)?.len()
                    + k.list::<Node>(None)?.len()
                    + leftover_slices(k)?.len();
                Ok((services == 1 && rest == 0).then_some(()))
            },
        )
    }

    fn apply_rbac(&self) -> Result<()> {
        let path = crate::agent::workspace_dir().join("deploy/rbac.yaml");
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let value = serde_json::Value::deserialize(doc)
                .with_context(|| format!("YAML in {}", path.display()))?;
            match value["kind"].as_str() {
                Some("ServiceAccount") => drop(
                    self.kube()
                        .apply(&serde_json::from_value::<ServiceAccount>(value)?)?,
                ),
                Some("ClusterRole") => drop(
                    self.kube()
                        .apply(&serde_json::from_value::<ClusterRole>(value)?)?,
                ),
                Some("ClusterRoleBinding") => drop(
                    self.kube()
                        .apply(&serde_json::from_value::<ClusterRoleBinding>(value)?)?,
                ),
                other => bail!("{}: unexpected kind {other:?}", path.display()),
            }
        }
        Ok(())
    }
}

impl ApiServer {
    /// Prepares (does not start) the API server `name` on `ip`, with an admin client.
    fn new(
        dir: &ScratchDir,
        ns: &Netns,
        pki: &Pki,
        admin: &CertFiles,
        name: &str,
        ip: Ipv4Addr,
        common: &[String],
    ) -> Result<Self> {
        let forwarder = Forwarder::start(ns, SocketAddr::new(ip.into(), API_PORT))?;
        let kubeconfig = dir.path().join(format!("{name}-admin.kubeconfig"));
        write_kubeconfig(
            &kubeconfig,
            &format!("https://{}", forwarder.addr()),
            &pki.ca_cert(),
            &User::Cert(admin),
        )?;
        let mut args = common.to_vec();
        args.push(format!("--bind-address={ip}"));
        args.push(format!("--advertise-address={ip}"));
        let cert_dir = dir.path().join(name);
        std::fs::create_dir_all(&cert_dir)
            .with_context(|| format!("mkdir {}", cert_dir.display()))?;
        args.push(format!("--cert-dir={}", cert_dir.display()));
        args.push(format!(
            "--audit-log-path={}",
            dir.path().join(format!("{name}-audit.log")).display()
        ));
        Ok(ApiServer {
            kube: Kube::new(&kubeconfig)?,
            process: None,
            ip,
            args,
            log: dir.path().join(format!("{name}.log")),
            kubeconfig,
            _forwarder: forwarder,
        })
    }

    fn audit_log(&self) -> PathBuf {
        self.log.with_file_name(format!(
            "{}-audit.log",
            self.log
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("apiserver")
        ))
    }

    fn start(&mut self, ns: &Netns) -> Result<()> {
        let mut cmd = ns.command(binaries::path(KUBE_APISERVER)?);
        cmd.args(&self.args);
        let mut process = Process::start(&format!("kube-apiserver ({})", self.ip), cmd, &self.log)?;
        process.set_grace(Duration::from_secs(5));
        self.process = Some(process);
        Ok(())
    }
}

/// Waits until `server` answers `/readyz` with `ok`, failing at once if it exits.
fn wait_ready(server: &mut ApiServer, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let process = server.process.as_mut().context("not started")?;
        process.ensure_running()?;
        let request = http::Request::get("/readyz").body(Vec::new())?;
        let kube = &server.kube;
        if kube
            .block_on(kube.client().request_text(request))
            .is_ok_and(|t| t == "ok")
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{what} not ready after 90 s; its log:\n{}",
                process.log_tail(40)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A link made by [`ControlPlane::attach`]; removed on drop (if its namespace still exists).
pub struct Attachment {
    cp: String,
    dev: String,
    /// The attached namespace's end of the link.
    peer: Ipv4Addr,
}

impl Attachment {
    /// Routes `cidr` from the control plane's namespace to the attached one (e.g. the node
    /// address where the API server reaches a kubelet).
    pub fn route_from_control_plane(&self, cidr: &str) -> Result<()> {
        crate::netns::ip(&[
            "-n",
            &self.cp,
            "route",
            "add",
            cidr,
            "via",
            &self.peer.to_string(),
        ])?;
        Ok(())
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        // Gone already when the other end's namespace was deleted first.
        let _ = std::process::Command::new("ip")
            .args(["-n", &self.cp, "link", "del", &self.dev])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// How a kubeconfig's user authenticates.
pub enum User<'a> {
    /// A client certificate.
    Cert(&'a CertFiles),
    /// A bearer token.
    Token(&'a str),
}

/// Writes a kubeconfig for `server` (an `https://` URL) with this CA and user.
pub fn write_kubeconfig(path: &Path, server: &str, ca: &Path, user: &User<'_>) -> Result<()> {
    let mut text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: lb-tests\n  cluster:\n    server: {server}\n    \
         certificate-authority: {}\nusers:\n- name: user\n  user:\n",
        ca.display()
    );
    match user {
        User::Cert(files) => writeln!(
            text,
            "    client-certificate: {}\n    client-key: {}",
            files.cert.display(),
            files.key.display()
        )?,
        User::Token(token) => writeln!(text, "    token: {token}")?,
    }
    text.push_str(
        "contexts:\n- name: lb-tests\n  context:\n    cluster: lb-tests\n    user: user\n\
         current-context: lb-tests\n",
    );
    std::fs::write(path, text).with_context(|| format!("write {}", path.display()))
}

/// The controller-manager's podCIDR sizes: a /24 per node for IPv4, a /64 for IPv6 (the
/// per-family flags are refused in a single-stack cluster).
fn node_cidr_masks(pod_cidrs: &[String]) -> Vec<&'static str> {
    match pod_cidrs {
        [one] if one.contains(':') => vec!["--node-cidr-mask-size=64"],
        [_] => vec!["--node-cidr-mask-size=24"],
        _ => vec![
            "--node-cidr-mask-size-ipv4=24",
            "--node-cidr-mask-size-ipv6=64",
        ],
    }
}

/// The first address of a CIDR (the `kubernetes` Service's ClusterIP in a Service range).
fn first_address(cidr: &str) -> Result<IpAddr> {
    let (addr, _) = cidr
        .split_once('/')
        .with_context(|| format!("not a CIDR: {cidr}"))?;
    Ok(
        match addr
            .parse::<IpAddr>()
            .with_context(|| format!("not a CIDR: {cidr}"))?
        {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) + 1)),
            IpAddr::V6(a) => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(a) + 1)),
        },
    )
}

/// Decodes `%XX` escapes.
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The control plane the tests of one process share ([`shared`]), one test at a time.
static SHARED: Mutex<Option<ControlPlane>> = Mutex::new(None);

/// Exclusive use of the shared control plane for one test: the test sees only its own
/// objects. On drop, they are deleted ([`ControlPlane::reset`]); if that fails, the control
/// plane is stopped and the next test starts a new one.
pub struct Lease {
    guard: MutexGuard<'static, Option<ControlPlane>>,
}

/// Waits for the control plane this process's tests share, starting it ([`Config::default`])
/// on first use; it runs until the process exits.
pub fn shared() -> Result<Lease> {
    static AT_EXIT: OnceLock<()> = OnceLock::new();
    let mut guard = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(cp) = guard.as_mut()
        && let Err(e) = cp.ensure_running()
    {
        eprintln!("the shared control plane broke; starting another: {e:#}");
        *guard = None;
    }
    if guard.is_none() {
        *guard = Some(ControlPlane::start(Config::default())?);
        AT_EXIT.get_or_init(|| {
            // SAFETY: registers a plain function, run once at exit.
            unsafe { libc::atexit(stop_shared) };
        });
    }
    Ok(Lease { guard })
}

extern "C" fn stop_shared() {
    // A test still running at exit holds the lock: its processes die with us anyway
    // (their parent-death signal), only the files would stay, for the next run to remove.
    let guard = match SHARED.try_lock() {
        Ok(guard) => Some(guard),
        // A test that failed while it held the lease.
        Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    };
    if let Some(mut guard) = guard {
        guard.take();
    }
}

impl Deref for Lease {
    type Target = ControlPlane;
    fn deref(&self) -> &ControlPlane {
        self.guard.as_ref().expect("a lease holds a control plane")
    }
}

impl DerefMut for Lease {
    fn deref_mut(&mut self) -> &mut ControlPlane {
        self.guard.as_mut().expect("a lease holds a control plane")
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let reset = match self.guard.as_mut() {
            Some(cp) => cp.ensure_running().and_then(|()| cp.reset()),
            None => Ok(()),
        };
        if let Err(e) = reset {
            eprintln!("the shared control plane could not be reset; stopping it: {e:#}");
            self.guard.take();
        }
    }
}

/// The control plane of one test: the shared one, leased, or one of its own.
pub enum TestControlPlane {
    /// [`shared`].
    Shared(Lease),
    /// Started for this test alone (e.g. to stop its API server).
    Own(Box<ControlPlane>),
}

impl Deref for TestControlPlane {
    type Target = ControlPlane;
    fn deref(&self) -> &ControlPlane {
        match self {
            TestControlPlane::Shared(lease) => lease,
            TestControlPlane::Own(cp) => cp,
        }
    }
}

impl DerefMut for TestControlPlane {
    fn deref_mut(&mut self) -> &mut ControlPlane {
        match self {
            TestControlPlane::Shared(lease) => lease,
            TestControlPlane::Own(cp) => cp,
        }
    }
}
