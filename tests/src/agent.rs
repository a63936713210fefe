//! Running the real `lb` binary: the agent in a namespace, and its CLI.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::netns::{self, Netns, unique_name};

/// Where bpffs is mounted.
pub const BPFFS: &str = "/sys/fs/bpf";
/// How long to wait for the agent to program the expected frontends.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// The workspace's root directory.
pub fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
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
}

/// `LB services --pin-path PIN --output json`, where LB is the `lb` binary.
pub fn services(lb: &Path, pin_path: &Path) -> Result<Vec<ServiceInfo>> {
    let out = netns::run(
        Command::new(lb)
            .args(["services", "--output", "json", "--pin-path"])
            .arg(pin_path),
    )?;
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "lb services printed {:?}",
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
    child: Child,
    lb: PathBuf,
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
    pub fn start_with_args(
        lb: &Path,
        ns: &Netns,
        manifests: &Path,
        interface: &str,
        args: &[&str],
    ) -> Result<Self> {
        let mut pins = PinDir::new()?;
        pins.lb = Some(lb.to_owned());
        let log = std::env::temp_dir().join(format!("{}.log", unique_name("agent")));
        let out = File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let child = ns
            .command(lb)
            .arg("agent")
            .arg("--manifests")
            .arg(manifests)
            .args(["--interface", interface])
            .arg("--pin-path")
            .arg(pins.path())
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("spawn {} agent in {}", lb.display(), ns.name()))?;
        Ok(Agent {
            child,
            lb: lb.to_owned(),
            log,
            pins,
        })
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails with the agent's log if it has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
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

    /// Waits (up to [`READY_TIMEOUT`]) until every frontend in `frontends` (as
    /// `address:port/PROTOCOL`) is programmed with `backends` backends. The error carries the
    /// last state seen and the agent's log.
    pub fn wait_for(&mut self, frontends: &[&str], backends: u32) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            self.ensure_running()?;
            let last = self.services();
            if let Ok(services) = &last {
                let ready = |f: &&str| {
                    services
                        .iter()
                        .any(|s| s.frontend == *f && s.backend_count == backends)
                };
                if frontends.iter().all(ready) {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "lb agent did not program {frontends:?} with {backends} backends each within \
                     {READY_TIMEOUT:?}; lb services: {last:#?}\nagent log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if matches!(self.child.try_wait(), Ok(None)) {
            eprintln!("lb agent did not exit on SIGTERM; killing it");
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("lb agent log:\n{}", self.log());
        }
        let _ = std::fs::remove_file(&self.log);
        // `self.pins` is dropped after this: lb teardown, then the directory is removed.
    }
}
