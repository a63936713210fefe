//! A cgroup2 directory of the test's own, for the socket hooks: `lbt-<pid>-<n>-cgroup` under
//! the cgroup2 root, never the root itself (other tests use the same ClusterIPs at the same
//! time), removed on drop and, for killed runs, by the next test that makes one.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::netns::{self, Netns, unique_name};

/// A child cgroup of the cgroup2 root, removed on drop (once its processes are gone).
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates `lbt-<pid>-<n>-cgroup` under the cgroup2 root (removing those of killed runs
    /// first).
    pub fn new() -> Result<Self> {
        let root = lb_userspace::datapath::eastwest::cgroup2_root().context("find cgroup2")?;
        remove_stale_cgroups(&root);
        let path = root.join(unique_name("cgroup"));
        std::fs::create_dir(&path).with_context(|| format!("mkdir {}", path.display()))?;
        Ok(Cgroup { path })
    }

    /// The directory, for `lb agent --cgroup` (the cgroup2 root and the test's name are
    /// UTF-8).
    pub fn path(&self) -> &str {
        self.path.to_str().unwrap_or_default()
    }

    /// A command that runs in `ns` and in this cgroup: the child writes "0" (itself) to
    /// cgroup.procs before exec, so every socket it opens is hooked.
    pub fn command(&self, ns: &Netns, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
        let mut cmd = ns.command(program);
        join_before_exec(&mut cmd, &self.path)?;
        Ok(cmd)
    }
}

/// Makes `cmd` run in the cgroup `dir`: the child writes "0" (itself) to its cgroup.procs
/// before exec.
fn join_before_exec(cmd: &mut Command, dir: &Path) -> Result<()> {
    let procs = dir.join("cgroup.procs");
    let procs = File::options()
        .write(true)
        .open(&procs)
        .with_context(|| format!("open {}", procs.display()))?;
    // SAFETY: between fork and exec the closure only calls write(2), which is
    // async-signal-safe, on an fd opened before the fork; it does not allocate.
    unsafe {
        cmd.pre_exec(move || {
            if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// A directory laid out, for one command, as /sys/fs/cgroup is on hybrid hosts (cgroup v1's
/// tmpfs, with the cgroup2 hierarchy at `unified`), whose `unified` is a [`Cgroup`]: what the
/// DaemonSet's hostPath of the host's /sys/fs/cgroup shows the agent on such a host. The
/// command gets a mount namespace of its own (the machine sees an empty directory, removed on
/// drop).
pub struct HybridLayout {
    dir: PathBuf,
    dir_c: CString,
    unified_c: CString,
    cgroup_c: CString,
}

impl HybridLayout {
    /// An empty directory, `cgroup` at its `unified` for the commands [`Self::configure`]s.
    pub fn new(cgroup: &Cgroup) -> Result<Self> {
        let dir = std::env::temp_dir().join(unique_name("hybrid-cgroup"));
        std::fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).context("a path with NUL");
        Ok(HybridLayout {
            dir_c: c(&dir)?,
            unified_c: c(&dir.join("unified"))?,
            cgroup_c: c(&cgroup.path)?,
            dir,
        })
    }

    /// The directory, for `lb agent --cgroup`.
    pub fn path(&self) -> &str {
        self.dir.to_str().unwrap_or_default()
    }

    /// Before `exec`, `cmd` enters a mount namespace of its own (private: nothing propagates
    /// to the machine's) where the directory is a tmpfs with the cgroup bind-mounted at
    /// `unified`.
    pub fn configure(&self, cmd: &mut Command) {
        let (dir, unified, cgroup) = (
            self.dir_c.clone(),
            self.unified_c.clone(),
            self.cgroup_c.clone(),
        );
        // SAFETY: between fork and exec the closure only makes system calls (unshare(2),
        // mount(2), mkdir(2)) on C strings made before the fork; it does not allocate.
        unsafe {
            cmd.pre_exec(move || {
                netns::unshare_mounts()?;
                netns::mount(c"tmpfs", &dir, Some(c"tmpfs"))?;
                if libc::mkdir(unified.as_ptr(), 0o755) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                netns::mount(&cgroup, &unified, None)
            });
        }
    }
}

impl Drop for HybridLayout {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir(&self.dir) {
            eprintln!("cleanup: rmdir {}: {e}", self.dir.display());
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        remove_cgroup(&self.path);
    }
}

/// Removes a cgroup directory, waiting (up to 5 s) for its last processes to be reaped.
fn remove_cgroup(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match std::fs::remove_dir(path) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) if Instant::now() > deadline => {
                eprintln!("cleanup: rmdir {}: {e}", path.display());
                return;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Removes the cgroups of killed test runs (`lbt-<pid>-...` whose process is gone).
fn remove_stale_cgroups(root: &Path) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
            if netns::is_stale(&entry.file_name().to_string_lossy()) {
                eprintln!("removing stale cgroup {}", entry.path().display());
                remove_cgroup(&entry.path());
            }
        }
    });
}

/// A memory cgroup of the test's own with a limit, as the kubelet makes one for a pod: cgroup
/// v1's memory hierarchy where it is mounted (the hybrid layout of these machines), else
/// cgroup2's memory controller. `lbt-<pid>-<n>-memory` at the hierarchy's root, removed on
/// drop (once its processes are gone).
pub struct MemoryCgroup {
    path: PathBuf,
    v1: bool,
}

/// cgroup v1's memory hierarchy, where the hybrid layout mounts it.
const MEMORY_V1: &str = "/sys/fs/cgroup/memory";

impl MemoryCgroup {
    /// A new memory cgroup whose processes may use `limit` bytes (kernel memory, BPF maps
    /// included).
    pub fn new(limit: u64) -> Result<Self> {
        let v1 = Path::new(MEMORY_V1).join("memory.limit_in_bytes").exists();
        let root = if v1 {
            PathBuf::from(MEMORY_V1)
        } else {
            let root = lb_userspace::datapath::eastwest::cgroup2_root().context("find cgroup2")?;
            let controllers = std::fs::read_to_string(root.join("cgroup.subtree_control"))
                .context("read cgroup.subtree_control")?;
            anyhow::ensure!(
                controllers.split_whitespace().any(|c| c == "memory"),
                "no memory controller: not in cgroup v1 ({MEMORY_V1}) nor enabled in {}'s \
                 cgroup.subtree_control",
                root.display()
            );
            root
        };
        remove_stale_cgroups(&root);
        let path = root.join(unique_name("memory"));
        std::fs::create_dir(&path).with_context(|| format!("mkdir {}", path.display()))?;
        let cgroup = MemoryCgroup { path, v1 };
        let file = if v1 {
            "memory.limit_in_bytes"
        } else {
            "memory.max"
        };
        cgroup.write(file, &limit.to_string())?;
        Ok(cgroup)
    }

    fn write(&self, file: &str, value: &str) -> Result<()> {
        let path = self.path.join(file);
        std::fs::write(&path, value).with_context(|| format!("write {value} to {}", path.display()))
    }

    fn read(&self, file: &str) -> Result<u64> {
        let path = self.path.join(file);
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
        text.trim()
            .parse()
            .with_context(|| format!("{}: {text:?}", path.display()))
    }

    /// The most memory its processes have used at once, in bytes.
    pub fn peak(&self) -> Result<u64> {
        self.read(if self.v1 {
            "memory.max_usage_in_bytes"
        } else {
            "memory.peak"
        })
    }

    /// Makes `cmd` run in this cgroup: the child writes "0" (itself) to cgroup.procs before
    /// exec, so everything it allocates, its maps included, is charged here.
    pub fn configure(&self, cmd: &mut Command) -> Result<()> {
        join_before_exec(cmd, &self.path)
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        remove_cgroup(&self.path);
    }
}
