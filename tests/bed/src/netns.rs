//! Network namespaces with RAII cleanup, and running code or commands inside them.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail};

/// Every name this process creates (namespaces, pin directories) starts with this prefix,
/// followed by the pid, so that stale ones from a killed run can be recognised.
pub const PREFIX: &str = "lbt";

/// A name that no other test thread of this process, and no other process, will use:
/// `lbt-<pid>-<counter>-<what>`.
pub fn unique_name(what: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{PREFIX}-{}-{n}-{what}", std::process::id())
}

/// Runs a command to completion and fails, with its output, unless it exits successfully.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {shown} (is it installed? `cargo xtask setup`)"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(out)
}

/// Runs `ip ARGS...` in the current namespace.
pub fn ip(args: &[&str]) -> Result<Output> {
    run(Command::new("ip").args(args))
}

/// A named network namespace (`/run/netns/<name>`), deleted on drop.
///
/// Deleting the namespace removes its interfaces; sockets created in it keep it alive until
/// they are closed, so drop servers before the namespace they live in.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace with a unique name built from `what`, with loopback up.
    pub fn new(what: &str) -> Result<Self> {
        let ns = Netns {
            name: unique_name(what),
        };
        ip(&["netns", "add", &ns.name])?;
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name, as `ip netns list` shows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip ARGS...` inside this namespace (`ip -n NAME ...`).
    pub fn ip(&self, args: &[&str]) -> Result<Output> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// Creates a veth pair: `dev` in this namespace, `peer_dev` in `peer`.
    pub fn veth(&self, dev: &str, peer: &Netns, peer_dev: &str) -> Result<()> {
        self.ip(&[
            "link", "add", dev, "type", "veth", "peer", "name", peer_dev, "netns", &peer.name,
        ])?;
        Ok(())
    }

    /// Adds `addr` (CIDR notation) to `dev` and sets it up.
    pub fn addr(&self, dev: &str, cidr: &str) -> Result<()> {
        self.ip(&["addr", "add", cidr, "dev", dev])?;
        self.ip(&["link", "set", dev, "up"])?;
        Ok(())
    }

    /// Adds a default route via `gateway`.
    pub fn default_route(&self, gateway: &str) -> Result<()> {
        self.ip(&["route", "add", "default", "via", gateway])?;
        Ok(())
    }

    /// Writes a sysctl of this namespace, e.g. `("net/ipv4/ip_forward", "1")`.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        // /proc/sys/net resolves to the network namespace of the thread that opens it.
        let path = format!("/proc/sys/{key}");
        self.run(|| std::fs::write(&path, value))?
            .with_context(|| format!("cannot write {value} to {path} in {}", self.name))
    }

    /// Turns off transmit checksum offload on `dev`, so the kernel sends full checksums as a
    /// real wire would (XDP cannot complete CHECKSUM_PARTIAL packets from a veth).
    pub fn tx_checksum_off(&self, dev: &str) -> Result<()> {
        run(self.command("ethtool").args(["-K", dev, "tx", "off"]))?;
        Ok(())
    }

    /// A command that will run in this namespace: the child enters it with `setns` before
    /// `exec`. Unlike `ip netns exec` this leaves the mount namespace, and so the bpffs at
    /// /sys/fs/bpf, as it is.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        // If the namespace cannot be opened, setns fails with EBADF and so does the spawn.
        let fd = self.open().ok();
        // SAFETY: between fork and exec the closure only calls setns(2), which is
        // async-signal-safe, on an fd opened before the fork; it does not allocate.
        unsafe {
            cmd.pre_exec(move || {
                let raw = fd.as_ref().map_or(-1, |fd| fd.as_raw_fd());
                if libc::setns(raw, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    /// Runs `f` on a new thread that has entered this namespace, and returns its result.
    /// Sockets created by `f` belong to this namespace for their whole life and can be used
    /// from any thread afterwards. A panic in `f` is propagated.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let fd = self.open()?;
        std::thread::scope(|s| {
            let thread = s.spawn(move || {
                // SAFETY: setns on a valid namespace fd only changes this thread's namespace.
                if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error())
                        .with_context(|| format!("setns into {}", self.name));
                }
                Ok(f())
            });
            match thread.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Spawns a thread that enters this namespace and runs `f` (for work that runs in the
    /// background, e.g. traffic); the thread's result is `f`'s, or why it could not enter.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<std::thread::JoinHandle<Result<T>>> {
        let fd = self.open()?;
        let name = self.name.clone();
        Ok(std::thread::spawn(move || {
            // SAFETY: setns on a valid namespace fd only changes this thread's namespace.
            if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("setns into {name}"));
            }
            drop(fd);
            Ok(f())
        }))
    }

    fn open(&self) -> std::io::Result<OwnedFd> {
        File::open(format!("/run/netns/{}", self.name)).map(OwnedFd::from)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "delete", &self.name]) {
            eprintln!("cleanup: {e:#}");
        }
    }
}

/// For a child between fork and exec: a mount namespace of its own, private (nothing it
/// mounts propagates to the machine's). Only system calls: async-signal-safe.
pub fn unshare_mounts() -> std::io::Result<()> {
    // SAFETY: unshare(2) and mount(2) with C string literals and null data.
    unsafe {
        syscall_ok(libc::unshare(libc::CLONE_NEWNS))?;
        syscall_ok(libc::mount(
            c"none".as_ptr(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ))
    }
}

/// For a child between fork and exec: mounts a file system of type `kind` (with `source`),
/// or with `kind` `None` bind-mounts `source`, at `target`. Only a system call.
pub fn mount(
    source: &std::ffi::CStr,
    target: &std::ffi::CStr,
    kind: Option<&std::ffi::CStr>,
) -> std::io::Result<()> {
    let (kind, flags) = match kind {
        Some(kind) => (kind.as_ptr(), 0),
        None => (std::ptr::null(), libc::MS_BIND),
    };
    // SAFETY: mount(2) on C strings that outlive the call, with null data.
    syscall_ok(unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            kind,
            flags,
            std::ptr::null(),
        )
    })
}

/// `Ok` for a system call's 0, else the OS error.
fn syscall_ok(rc: libc::c_int) -> std::io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Names of all named network namespaces (`ip netns list`).
pub fn list() -> Result<Vec<String>> {
    let out = ip(&["netns", "list"])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// Whether `name` was made by a process of ours (see [`unique_name`]) that no longer runs.
pub fn is_stale(name: &str) -> bool {
    let Some(rest) = name.strip_prefix(PREFIX).and_then(|r| r.strip_prefix('-')) else {
        return false;
    };
    match rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) {
        Some(pid) => !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        None => false,
    }
}

/// Deletes namespaces left behind by killed runs (their process is gone, so no Drop ran).
pub fn remove_stale() -> Result<()> {
    for name in list()?.into_iter().filter(|n| is_stale(n)) {
        eprintln!("removing stale namespace {name}");
        ip(&["netns", "delete", &name])?;
    }
    Ok(())
}
