//! Long-running child processes (etcd, the Kubernetes components, containerd) that die with
//! the test process however it ends.
//!
//! Each is started with `PR_SET_PDEATHSIG(SIGKILL)`. The kernel sends that signal when the
//! *thread* that forked the child exits, and libtest runs every test on a thread of its own,
//! so the children are forked by one thread that lives as long as the process
//! ([`spawn`]): a control plane shared by several tests outlives the test that started it,
//! and a test process killed with SIGKILL takes its children with it.

use std::fs::File;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

type Request = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Spawns `cmd` from the process-long spawner thread, with SIGKILL as its parent-death signal.
fn spawn(mut cmd: Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("lb-tests-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("spawn the spawner thread");
        Mutex::new(tx)
    });
    // SAFETY: prctl(2) with integer arguments, async-signal-safe, between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (reply, answer) = mpsc::channel();
    spawner
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((cmd, reply))
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?;
    answer
        .recv()
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?
}

/// A child process whose output goes to a log file; stopped (SIGTERM, then SIGKILL after
/// its grace period) on drop.
pub struct Process {
    name: String,
    child: Option<Child>,
    log: PathBuf,
    grace: Duration,
}

impl Process {
    /// Starts `cmd` (named `name` in messages), its stdout and stderr appended to `log`.
    pub fn start(name: &str, mut cmd: Command, log: &Path) -> Result<Self> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("open {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let shown = format!("{:?}", cmd.get_program());
        let child = spawn(cmd).with_context(|| {
            format!("start {name} ({shown}; is it installed? `cargo xtask setup`)")
        })?;
        Ok(Process {
            name: name.to_owned(),
            child: Some(child),
            log: log.to_owned(),
            grace: Duration::from_secs(10),
        })
    }

    /// How long [`Process::stop`] waits after SIGTERM before SIGKILL (default 10 s).
    pub fn set_grace(&mut self, grace: Duration) {
        self.grace = grace;
    }

    /// The process's name in messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Fails, with the end of its log, if it has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        let child = self
            .child
            .as_mut()
            .ok_or_else(|| anyhow!("{} was stopped", self.name))?;
        if let Some(status) = child.try_wait()? {
            bail!(
                "{} exited ({status}); the end of its log ({}):\n{}",
                self.name,
                self.log.display(),
                self.log_tail(40)
            );
        }
        Ok(())
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Its log file.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Sends `signal` and waits for it to exit; SIGKILL after the grace period.
    pub fn stop_with(&mut self, signal: i32) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if child.try_wait()?.is_none() {
            // SAFETY: kill(2) on our own child, not reaped yet.
            unsafe { libc::kill(child.id() as i32, signal) };
            let deadline = Instant::now() + self.grace;
            while child.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    eprintln!("{} did not exit on signal {signal}; killing it", self.name);
                    child.kill()?;
                    child.wait()?;
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// SIGTERM, then SIGKILL after the grace period.
    pub fn stop(&mut self) -> Result<()> {
        self.stop_with(libc::SIGTERM)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("cleanup: stop {}: {e:#}", self.name);
        }
    }
}
