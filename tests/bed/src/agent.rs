//! Running the real `lb` binary: the agent in a namespace, and its CLI.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::net::SocketAddrV4;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::netns::{self, Netns, unique_name};
use crate::topology::NODE_NAME;

/// The agent's operations endpoint (its default `--metrics-addr`), in its namespace.
pub const OPS_ADDR: &str = "127.0.0.1:9464";

/// Where bpffs is mounted.
pub const BPFFS: &str = "/sys/fs/bpf";
/// How long to wait for the agent to program the expected frontends.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// The workspace's root directory.
pub fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("this crate is tests/bed in the workspace")
        .to_owned()
}

/// The example manifests (`examples/`), which describe [`crate::Topology`] with two pods.
pub fn examples_dir() -> PathBuf {
    workspace_dir().join("examples")
}

/// The `lb` binary: `$LB_BIN` (set by `cargo xtask test`), else target/release/lb, else
/// target/debug/lb. Panics when none exists.
pub fn lb_bin() -> PathBuf {
    find_lb_bin().unwrap_or_else(|| {
        panic!(
            "no lb binary (LB_BIN is not set and there is none in {}/target): build it with \
             cargo build -p lb-userspace, or run cargo xtask test",
            workspace_dir().display()
        )
    })
}

/// [`lb_bin`] without the panic.
pub fn find_lb_bin() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("LB_BIN") {
        return Some(bin.into());
    }
    let target = workspace_dir().join("target");
    ["release", "debug"]
        .iter()
        .map(|profile| target.join(profile).join("lb"))
        .find(|bin| bin.is_file())
}

/// The older release the upgrade test starts from: a commit of this repository's history,
/// which `cargo xtask build-old` (and `cargo xtask test`) builds as `target/release/lb-<commit>`.
pub const OLD_RELEASE: &str = "a899f91";

/// The older release's `lb` binary: `$LB_OLD_BIN` (set by `cargo xtask test`), else
/// `target/release/lb-<OLD_RELEASE>`. Panics, saying how to build it, when there is none.
pub fn old_lb_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("LB_OLD_BIN") {
        return bin.into();
    }
    let bin = workspace_dir()
        .join("target/release")
        .join(format!("lb-{OLD_RELEASE}"));
    assert!(
        bin.is_file(),
        "no lb of the older release {OLD_RELEASE} (LB_OLD_BIN is not set and there is no {}):          build it from the git history with cargo xtask build-old, or run cargo xtask test",
        bin.display()
    );
    bin
}

/// Mounts bpffs at /sys/fs/bpf unless it is mounted already (a fresh machine has a plain
/// sysfs directory there). Pins live only as long as the bpffs they are in.
pub fn ensure_bpffs() -> Result<()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let path = c"/sys/fs/bpf";
    let bpf = c"bpf";
    // SAFETY: statfs writes into a zeroed struct we own; path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(path.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error()).context(format!("statfs {BPFFS}"));
    }
    if st.f_type == libc::BPF_FS_MAGIC {
        return Ok(());
    }
    // SAFETY: all strings are NUL-terminated; no data argument.
    let mounted = unsafe {
        libc::mount(
            bpf.as_ptr(),
            path.as_ptr(),
            bpf.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if mounted != 0 {
        return Err(std::io::Error::last_os_error()).context(format!("mount bpffs at {BPFFS}"));
    }
    eprintln!("mounted bpffs at {BPFFS}");
    Ok(())
}

/// One programmed frontend, as `lb services --output json` prints it.
#[derive(Debug, Clone, Deserialize)]
pub struct ServiceInfo {
    /// `address:port/PROTOCOL`, e.g. `10.96.0.10:8080/TCP`.
    pub frontend: String,
    /// The service's id in the maps.
    pub service_id: u32,
    /// How many backends the frontend selects from.
    pub backend_count: u32,
    /// The backends, `address:port`.
    #[serde(default)]
    pub backends: Vec<String>,
    /// How new flows choose a backend: `maglev` or `random`.
    #[serde(default)]
    pub selection: String,
    /// Flows from outside reach its backends on other nodes by direct server return.
    #[serde(default)]
    pub dsr: bool,
    /// The Service port it serves, `namespace/name[:port-name]`, as the agent named it.
    #[serde(default)]
    pub service: Option<String>,
    /// Its kind (`ClusterIp`, `NodePort`, `ExternalIp`, `LoadBalancer`), as the agent
    /// named it.
    #[serde(default)]
    pub kind: Option<String>,
}

impl ServiceInfo {
    /// The distinct backends in the selection (`address:port`, without the state note such as
    /// ` (terminating)` that `lb services` may append): what new flows are spread over.
    pub fn selectable(&self) -> BTreeSet<String> {
        self.backends
            .iter()
            .map(|b| {
                b.split_once(' ')
                    .map_or(b.as_str(), |(addr, _)| addr)
                    .to_owned()
            })
            .collect()
    }

    /// The row of `frontend` (`address:port/PROTOCOL`) among `services`.
    pub fn find<'a>(services: &'a [ServiceInfo], frontend: &str) -> Option<&'a ServiceInfo> {
        services.iter().find(|s| s.frontend == frontend)
    }
}

/// `LB services --pin-path PIN --output json`, where LB is the `lb` binary.
pub fn services(lb: &Path, pin_path: &Path) -> Result<Vec<ServiceInfo>> {
    lb_json(lb, pin_path, &["services"])
}

/// What `lb explain --output json` says about a flow.
#[derive(Debug, Clone, Deserialize)]
pub struct Explanation {
    /// How the backend is decided: `conntrack`, `affinity`, `maglev`, `random`,
    /// `not_frontend`, `no_backend`, `rejected` or `source_denied`.
    pub decision: String,
    /// The backend, `address:port`, when the decision names one.
    pub backend: Option<String>,
    /// Each step, for humans.
    #[serde(default)]
    pub steps: Vec<String>,
}

/// `LB explain --src SRC --dst DST --proto tcp [--syn] --pin-path PIN --output json`: what
/// the datapath does with the next packet of this TCP flow, or with a SYN when `syn`.
pub fn explain(
    lb: &Path,
    pin_path: &Path,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    syn: bool,
) -> Result<Explanation> {
    let (src, dst) = (src.to_string(), dst.to_string());
    let mut args = vec!["explain", "--src", &src, "--dst", &dst, "--proto", "tcp"];
    if syn {
        args.push("--syn");
    }
    lb_json(lb, pin_path, &args)
}

/// Runs `LB ARGS... --pin-path PIN --output json` and parses what it prints.
fn lb_json<T: DeserializeOwned>(lb: &Path, pin_path: &Path, args: &[&str]) -> Result<T> {
    let start = Instant::now();
    let out = netns::run(
        Command::new(lb)
            .args(args)
            .args(["--output", "json", "--pin-path"])
            .arg(pin_path),
    )?;
    if start.elapsed() > Duration::from_secs(1) {
        // Not an error (the machine may be loaded), but it explains a slow test.
        eprintln!("lb {} took {:?}", args.join(" "), start.elapsed());
    }
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "lb {} printed {:?}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// A unique pin directory under bpffs (`/sys/fs/bpf/lbt-<pid>-<n>-pins`). On drop, runs
/// `lb teardown` on it (detaching whatever is pinned there) if there is an `lb` binary, and
/// removes it.
#[derive(Debug)]
pub struct PinDir {
    path: PathBuf,
    lb: Option<PathBuf>,
}

impl PinDir {
    /// Mounts bpffs if needed, removes pin directories of killed runs, and creates a new one.
    pub fn new() -> Result<Self> {
        ensure_bpffs()?;
        remove_stale_pin_dirs();
        let path = Path::new(BPFFS).join(unique_name("pins"));
        std::fs::create_dir(&path).with_context(|| format!("mkdir {}", path.display()))?;
        Ok(PinDir {
            path,
            lb: find_lb_bin(),
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        teardown(self.lb.as_deref(), &self.path);
    }
}

/// `LB teardown --pin-path PATH`, then removes PATH; reports failures without panicking.
fn teardown(lb: Option<&Path>, path: &Path) {
    if let Some(lb) = lb {
        let result = netns::run(Command::new(lb).arg("teardown").arg("--pin-path").arg(path));
        if let Err(e) = result {
            eprintln!("cleanup: {e:#}");
        }
    }
    if path.exists()
        && let Err(e) = std::fs::remove_dir_all(path)
    {
        eprintln!("cleanup: remove {}: {e}", path.display());
    }
}

fn remove_stale_pin_dirs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let Ok(entries) = std::fs::read_dir(BPFFS) else {
            return;
        };
        for entry in entries.flatten() {
            if netns::is_stale(&entry.file_name().to_string_lossy()) {
                eprintln!("removing stale pin directory {}", entry.path().display());
                teardown(find_lb_bin().as_deref(), &entry.path());
            }
        }
    });
}

/// `lb agent` running in a namespace with its own pin directory. On drop: SIGTERM, wait,
/// `lb teardown`, remove the pin directory and the log; if the thread is panicking, print the
/// agent's log first.
pub struct Agent {
    // A mutex so that the waits, which take `&self`, can notice that the agent exited.
    child: std::sync::Mutex<Child>,
    lb: PathBuf,
    /// The arguments of `lb agent` but `--pin-path` and those given to a restart.
    args: Vec<OsString>,
    log: PathBuf,
    // Dropped after `child` is stopped (see Drop).
    pins: PinDir,
}

impl Agent {
    /// Starts `lb agent --manifests DIR --interface IF --pin-path <unique>` in `ns`, with its
    /// stdout and stderr going to a log file. The binary is [`lb_bin`].
    pub fn start(ns: &Netns, manifests: &Path, interface: &str) -> Result<Self> {
        Self::start_with(&lb_bin(), ns, manifests, interface)
    }

    /// [`Agent::start`] with the binary `lb` (for every `lb` command the guard runs).
    pub fn start_with(lb: &Path, ns: &Netns, manifests: &Path, interface: &str) -> Result<Self> {
        Self::start_with_args(lb, ns, manifests, interface, &[])
    }

    /// [`Agent::start_with`], with more arguments for `lb agent` (e.g. `--max-services N`).
    /// The node is named [`NODE_NAME`], as in the examples' EndpointSlices.
    pub fn start_with_args(
        lb: &Path,
        ns: &Netns,
        manifests: &Path,
        interface: &str,
        args: &[&str],
    ) -> Result<Self> {
        Self::start_on_node(lb, ns, manifests, interface, NODE_NAME, args)
    }

    /// [`Agent::start_with_args`] on the node named `node_name` (`--node-name`).
    pub fn start_on_node(
        lb: &Path,
        ns: &Netns,
        manifests: &Path,
        interface: &str,
        node_name: &str,
        args: &[&str],
    ) -> Result<Self> {
        let all = manifests_args(manifests, interface, node_name, args);
        Self::spawn(lb, ns, &all, |_| {})
    }

    /// `lb agent --manifests DIR --interface IF --node-name NODE_NAME ARGS...` in `ns`, with
    /// `configure` adjusting the command first (see [`Agent::start_configured`]).
    pub fn start_manifests_configured(
        ns: &Netns,
        manifests: &Path,
        interface: &str,
        args: &[&str],
        configure: impl FnOnce(&mut Command),
    ) -> Result<Self> {
        let all = manifests_args(manifests, interface, NODE_NAME, args);
        Self::spawn(&lb_bin(), ns, &all, configure)
    }

    /// [`Agent::start`] with `extra` arguments and only the capabilities `keep` (numbers,
    /// e.g. [`CAP_NET_ADMIN`]): every other one is dropped from the bounding set before
    /// `exec`, so the agent (root) gets exactly these, permitted and effective.
    pub fn start_with_capabilities(
        ns: &Netns,
        manifests: &Path,
        interface: &str,
        extra: &[&str],
        keep: &[u32],
    ) -> Result<Self> {
        let mut args: Vec<OsString> = vec![
            "--manifests".into(),
            manifests.into(),
            "--interface".into(),
            interface.into(),
        ];
        args.extend(extra.iter().map(OsString::from));
        let mask = keep.iter().fold(0u64, |m, cap| m | 1 << cap);
        let last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .context("read cap_last_cap")?
            .trim()
            .parse::<u32>()
            .context("parse cap_last_cap")?;
        Self::spawn(&lb_bin(), ns, &args, |cmd| {
            // SAFETY: between fork and exec the closure makes only prctl(2) and capset(2)
            // system calls on values computed before the fork; it does not allocate.
            unsafe {
                cmd.pre_exec(move || restrict_capabilities(mask, last));
            }
        })
    }

    /// Starts `lb agent --kubeconfig FILE --node-name NODE --interface IF --pin-path
    /// <unique> ARGS...` in `ns` (see [`Agent::start`]).
    pub fn start_kube(
        ns: &Netns,
        kubeconfig: &Path,
        node_name: &str,
        interface: &str,
        args: &[&str],
    ) -> Result<Self> {
        let mut all: Vec<OsString> = vec![
            "--kubeconfig".into(),
            kubeconfig.into(),
            "--node-name".into(),
            node_name.into(),
            "--interface".into(),
            interface.into(),
        ];
        all.extend(args.iter().map(OsString::from));
        Self::spawn(&lb_bin(), ns, &all, |_| {})
    }

    /// Starts `lb agent ARGS... --pin-path <unique>` in `ns`, with `configure` adjusting the
    /// command first (its environment, say).
    pub fn start_configured(
        ns: &Netns,
        args: &[&str],
        configure: impl FnOnce(&mut Command),
    ) -> Result<Self> {
        let args: Vec<OsString> = args.iter().map(OsString::from).collect();
        Self::spawn(&lb_bin(), ns, &args, configure)
    }

    fn spawn(
        lb: &Path,
        ns: &Netns,
        args: &[OsString],
        configure: impl FnOnce(&mut Command),
    ) -> Result<Self> {
        let mut pins = PinDir::new()?;
        pins.lb = Some(lb.to_owned());
        let log = std::env::temp_dir().join(format!("{}.log", unique_name("agent")));
        let child = spawn_agent(lb, ns, args, pins.path(), &log, configure)?;
        Ok(Agent {
            child: std::sync::Mutex::new(child),
            lb: lb.to_owned(),
            args: args.to_vec(),
            log,
            pins,
        })
    }

    /// Kills the agent with SIGKILL (no chance to clean up, as `kill -9` or an OOM kill) and
    /// waits for it; its programs and maps stay pinned.
    pub fn kill(&self) -> Result<()> {
        self.signal(libc::SIGKILL)
    }

    /// Stops the agent with SIGTERM (as a rolling update does) and waits for it to exit.
    pub fn stop(&self) -> Result<()> {
        self.signal(libc::SIGTERM)
    }

    fn signal(&self, signal: i32) -> Result<()> {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        if child.try_wait()?.is_none() {
            // SAFETY: kill(2) on our own child's pid, which has not been reaped.
            if unsafe { libc::kill(child.id() as i32, signal) } != 0 {
                return Err(std::io::Error::last_os_error()).context("kill");
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                bail!("lb agent did not exit on signal {signal}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Starts the agent again, after it exited, on the same pin directory with the same
    /// arguments plus `args`, with the binary `lb` (another version for an upgrade). Its
    /// output goes on in the same log; `lb` runs every `lb` command from now on.
    pub fn restart(&mut self, ns: &Netns, lb: &Path, args: &[&str]) -> Result<()> {
        self.restart_configured(ns, lb, args, |_| {})
    }

    /// [`Agent::restart`], with `configure` adjusting the command first (see
    /// [`Agent::start_configured`]).
    pub fn restart_configured(
        &mut self,
        ns: &Netns,
        lb: &Path,
        args: &[&str],
        configure: impl FnOnce(&mut Command),
    ) -> Result<()> {
        if let Some(status) = self.exit_status() {
            let mut log = std::fs::OpenOptions::new().append(true).open(&self.log)?;
            use std::io::Write as _;
            writeln!(log, "--- exited ({status}); starting {} ---", lb.display())?;
        } else {
            bail!("lb agent {} is still running", self.pid());
        }
        let mut all = self.args.clone();
        all.extend(args.iter().map(OsString::from));
        let child = spawn_agent(lb, ns, &all, self.pins.path(), &self.log, configure)?;
        *self.child.get_mut().unwrap_or_else(|e| e.into_inner()) = child;
        self.lb = lb.to_owned();
        self.pins.lb = Some(lb.to_owned());
        Ok(())
    }

    /// The `lb` binary the agent runs.
    pub fn lb(&self) -> &Path {
        &self.lb
    }

    /// Whether the agent is still running.
    pub fn is_running(&self) -> bool {
        self.exit_status().is_none()
    }

    /// How the agent exited, if it has.
    fn exit_status(&self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        child.try_wait().ok().flatten()
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.lock().unwrap_or_else(|e| e.into_inner()).id()
    }

    /// Fails with the agent's log if it has exited.
    pub fn ensure_running(&self) -> Result<()> {
        if let Some(status) = self.exit_status() {
            bail!("lb agent exited ({status}); its log:\n{}", self.log());
        }
        Ok(())
    }

    /// The agent's pin directory.
    pub fn pin_path(&self) -> &Path {
        self.pins.path()
    }

    /// What the agent has printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_else(|e| format!("(no log: {e})"))
    }

    /// What `lb services` shows for this agent's pins.
    pub fn services(&self) -> Result<Vec<ServiceInfo>> {
        services(&self.lb, self.pin_path())
    }

    /// What `lb stats --output json` shows for this agent's pins.
    pub fn stats(&self) -> Result<serde_json::Value> {
        lb_json(&self.lb, self.pin_path(), &["stats"])
    }

    /// What `lb explain` says about the TCP flow `src` -> `dst` (see [`explain`]).
    pub fn explain(&self, src: SocketAddrV4, dst: SocketAddrV4, syn: bool) -> Result<Explanation> {
        explain(&self.lb, self.pin_path(), src, dst, syn)
    }

    /// Waits (up to [`READY_TIMEOUT`]) until every frontend in `frontends` (as
    /// `address:port/PROTOCOL`) is programmed with `backends` backends. The error carries the
    /// last state seen and the agent's log.
    pub fn wait_for(&self, frontends: &[&str], backends: u32) -> Result<()> {
        let what = format!("{frontends:?} with {backends} backends each");
        self.wait_until(&what, |services| {
            frontends.iter().all(|f| {
                services
                    .iter()
                    .any(|s| s.frontend == *f && s.backend_count == backends)
            })
        })
        .map(drop)
    }
}

impl Agent {
    /// Polls `lb services` until `check` holds, for up to [`READY_TIMEOUT`]; returns what it
    /// saw last. Fails at once if the agent exits; the error carries the last state seen and
    /// the agent's log.
    pub fn wait_until(
        &self,
        what: &str,
        check: impl Fn(&[ServiceInfo]) -> bool,
    ) -> Result<Vec<ServiceInfo>> {
        self.wait_until_within(READY_TIMEOUT, what, check)
    }

    /// [`Agent::wait_until`] for up to `timeout`.
    pub fn wait_until_within(
        &self,
        timeout: Duration,
        what: &str,
        check: impl Fn(&[ServiceInfo]) -> bool,
    ) -> Result<Vec<ServiceInfo>> {
        let deadline = Instant::now() + timeout;
        loop {
            self.ensure_running()?;
            let services = self.services().unwrap_or_default();
            if check(&services) {
                return Ok(services);
            }
            if Instant::now() > deadline {
                bail!(
                    "timed out waiting for {what}; lb services: {services:#?}\nagent log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Agent {
    /// Waits until `check` holds for the status and body of `path` on the operations
    /// endpoint of this agent, which runs in `ns`, for up to 30 s (an agent that has just
    /// started may not answer yet); panics with the last answer and the agent's log.
    pub fn wait_ops(&self, ns: &Netns, path: &str, what: &str, check: impl Fn(u16, &str) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let answer = ops(ns, path);
            if let Ok((status, body)) = &answer
                && check(*status, body)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {path} answered {answer:?}\nagent log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// `--manifests DIR --interface IF --node-name NODE ARGS...`.
fn manifests_args(
    manifests: &Path,
    interface: &str,
    node_name: &str,
    args: &[&str],
) -> Vec<OsString> {
    let mut all: Vec<OsString> = vec![
        "--manifests".into(),
        manifests.into(),
        "--interface".into(),
        interface.into(),
        "--node-name".into(),
        node_name.into(),
    ];
    all.extend(args.iter().map(OsString::from));
    all
}

/// Runs `LB agent ARGS... --pin-path PINS` in `ns`, its stdout and stderr appended to `log`.
/// `configure` adjusts the command first (e.g. the capabilities it runs with).
fn spawn_agent(
    lb: &Path,
    ns: &Netns,
    args: &[OsString],
    pins: &Path,
    log: &Path,
    configure: impl FnOnce(&mut Command),
) -> Result<Child> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("open {}", log.display()))?;
    // This version's agent (not the older release's, which has no socket hooks) gets
    // `--no-cgroup` unless ARGS choose (`--cgroup`): tests never attach the socket hooks to
    // the machine's cgroup2 root, where they would translate every process's connections.
    let current = lb.file_name() == Some("lb".as_ref());
    let hooks = args.iter().any(|a| a == "--cgroup" || a == "--no-cgroup");
    let mut command = ns.command(lb);
    configure(&mut command);
    command
        .arg("agent")
        .args(args)
        .arg("--pin-path")
        .arg(pins)
        .args((current && !hooks).then_some("--no-cgroup"))
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("spawn {} agent in {}", lb.display(), ns.name()))
}

/// The backends `lb services` lists for `frontend` (`address:port/PROTOCOL`), if it is
/// programmed.
pub fn backends_of<'a>(services: &'a [ServiceInfo], frontend: &str) -> Option<&'a [String]> {
    ServiceInfo::find(services, frontend).map(|s| s.backends.as_slice())
}

/// The backends of `frontend`, sorted, as `address:port[ (terminating)]`.
pub fn sorted_backends(services: &[ServiceInfo], frontend: &str) -> Option<Vec<String>> {
    backends_of(services, frontend).map(|b| {
        let mut b = b.to_vec();
        b.sort();
        b
    })
}

/// A check for [`Agent::wait_until`]: `frontend` has exactly the backends `want` (sorted, as
/// [`sorted_backends`] gives them).
pub fn has_backends(frontend: &'static str, want: Vec<String>) -> impl Fn(&[ServiceInfo]) -> bool {
    move |s| sorted_backends(s, frontend).as_ref() == Some(&want)
}

/// `address:80` for each address, sorted.
pub fn at80(ips: &[std::net::Ipv4Addr]) -> Vec<String> {
    let mut v: Vec<String> = ips.iter().map(|ip| format!("{ip}:80")).collect();
    v.sort();
    v
}

/// `GET path` on the operations endpoint of the agent running in `ns`: status and body.
pub fn ops(ns: &Netns, path: &str) -> Result<(u16, String)> {
    let target = OPS_ADDR.parse().context("OPS_ADDR")?;
    let (status, body, _) = crate::client::http_request(ns, target, path)?;
    Ok((status, body))
}

/// The value of the metric `name` (with its labels, as printed) in a /metrics text.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let value = l.strip_prefix(name)?.strip_prefix(' ')?;
        value.split_whitespace().next()?.parse().ok()
    })
}

/// CAP_NET_ADMIN: attaching XDP and TC programs.
pub const CAP_NET_ADMIN: u32 = 12;
/// CAP_PERFMON: what the verifier allows programs beyond CAP_BPF (pointer arithmetic).
pub const CAP_PERFMON: u32 = 38;
/// CAP_BPF: maps, programs, pins.
pub const CAP_BPF: u32 = 39;

/// In a child before `exec`: drops every capability not in `mask` (up to `last`) from the
/// bounding set and the ambient set, and keeps `mask` as permitted, effective and
/// inheritable. A root process gets its bounding set at `exec`: exactly `mask`.
fn restrict_capabilities(mask: u64, last: u32) -> std::io::Result<()> {
    let check = |r: libc::c_long| {
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    for cap in 0..=last {
        if mask & 1 << cap == 0 {
            // SAFETY: prctl with integer arguments.
            check(
                unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) }.into(),
            )?;
        }
    }
    // SAFETY: prctl with integer arguments.
    check(
        unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
                0,
                0,
                0,
            )
        }
        .into(),
    )?;
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let header = Header {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let half = |shift: u32| {
        let bits = (mask >> shift) as u32;
        Data {
            effective: bits,
            permitted: bits,
            inheritable: bits,
        }
    };
    let data = [half(0), half(32)];
    // SAFETY: capset with a version-3 header and its two data structs.
    check(unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) })
}

impl Drop for Agent {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|e| e.into_inner());
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if matches!(child.try_wait(), Ok(None)) {
            eprintln!("lb agent did not exit on SIGTERM; killing it");
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("lb agent log:\n{}", self.log());
        }
        let _ = std::fs::remove_file(&self.log);
        // `self.pins` is dropped after this: lb teardown, then the directory is removed.
    }
}

/// For [`Agent::start_configured`]: the agent runs in a mount namespace of its own where
/// /proc/sys is read-only, as container runtimes mount it in a non-privileged container
/// (the rest of the mounts, bpffs among them, are the host's).
pub fn read_only_proc_sys(cmd: &mut Command) {
    // SAFETY: between fork and exec the closure only calls unshare(2) and mount(2) on
    // static C strings; it does not allocate.
    unsafe {
        cmd.pre_exec(|| {
            let check = |r: libc::c_int| {
                if r != 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(())
                }
            };
            let none = std::ptr::null();
            check(libc::unshare(libc::CLONE_NEWNS))?;
            check(libc::mount(
                none,
                c"/".as_ptr(),
                none,
                libc::MS_REC | libc::MS_PRIVATE,
                none.cast(),
            ))?;
            let sys = c"/proc/sys".as_ptr();
            check(libc::mount(sys, sys, none, libc::MS_BIND, none.cast()))?;
            check(libc::mount(
                none,
                sys,
                none,
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                none.cast(),
            ))
        });
    }
}
