//! A TCP forwarder from the test process's loopback into a network namespace: how the test
//! itself (its client, kubectl) reaches an API server that listens inside the control
//! plane's namespace, without giving the host a route to it.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::backends::accept_until;
use crate::netns::Netns;

/// Listens on 127.0.0.1 (a free port) and forwards each connection to `target` inside a
/// namespace; stops on drop.
pub struct Forwarder {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl Forwarder {
    /// Forwards 127.0.0.1:<free port> of the test process to `target` in `ns`.
    pub fn start(ns: &Netns, target: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("bind forwarder")?;
        let addr = listener.local_addr()?;
        let ns_fd: Arc<OwnedFd> = Arc::new(
            std::fs::File::open(format!("/run/netns/{}", ns.name()))
                .with_context(|| format!("open namespace {}", ns.name()))?
                .into(),
        );
        let stop = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                accept_until(&listener, &stop, |client, _| {
                    let ns_fd = ns_fd.clone();
                    std::thread::spawn(move || {
                        if let Ok(upstream) = connect_in(&ns_fd, target) {
                            splice(client, upstream);
                        }
                    });
                });
            })
        };
        Ok(Forwarder {
            addr,
            stop,
            acceptor: Some(acceptor),
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

/// Connects to `target` from a thread that entered the namespace `ns_fd`.
fn connect_in(ns_fd: &Arc<OwnedFd>, target: SocketAddr) -> std::io::Result<TcpStream> {
    let fd = ns_fd.clone();
    std::thread::spawn(move || {
        // SAFETY: setns on a valid namespace fd changes only this thread's namespace.
        if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        TcpStream::connect_timeout(&target, Duration::from_secs(5))
    })
    .join()
    .unwrap_or_else(|_| Err(std::io::Error::other("connect thread panicked")))
}

/// Copies both ways until both directions are closed.
fn splice(a: TcpStream, b: TcpStream) {
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else {
        return;
    };
    let one = std::thread::spawn(move || copy(a, b));
    copy(b2, a2);
    let _ = one.join();
}

fn copy(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}
