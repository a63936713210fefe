//! Notifications of the kernel's network configuration: interfaces, their addresses and the
//! routes coming and going (a netlink route socket). The agent follows the pods' interfaces
//! ([`super::eastwest::PodInterfaces`]) and the node's external ones
//! ([`super::external::ExternalInterfaces`]) by looking again at every interface after
//! each batch: no message is parsed, so none can be misread, and lost ones (ENOBUFS) cost
//! nothing but that look.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

use tokio::io::unix::AsyncFd;

/// How long a batch of notifications gathers after its first (an interface that comes up
/// brings its addresses and routes right after).
const SETTLE: Duration = Duration::from_millis(50);

/// Link, address and route notifications of this network namespace.
pub struct Notifications {
    socket: AsyncFd<OwnedFd>,
}

impl Notifications {
    /// Subscribes to the notifications of links, IPv4 and IPv6 addresses and routes.
    pub fn new() -> io::Result<Self> {
        let groups = libc::RTMGRP_LINK
            | libc::RTMGRP_IPV4_IFADDR
            | libc::RTMGRP_IPV6_IFADDR
            | libc::RTMGRP_IPV4_ROUTE
            | libc::RTMGRP_IPV6_ROUTE;
        // SAFETY: an OwnedFd keeps its descriptor open, unchanged, for its whole life.
        let socket = unsafe { AsyncFd::register(route_socket(groups as u32)?) }?;
        Ok(Self { socket })
    }

    /// Waits for the next notification, then for [`SETTLE`], and drains what came.
    pub async fn changed(&mut self) -> io::Result<()> {
        loop {
            let mut guard = self.socket.readable().await?;
            let got = drain(guard.get_inner())?;
            guard.clear_ready();
            if got {
                tokio::time::sleep(SETTLE).await;
                drain(self.socket.get_ref())?;
                return Ok(());
            }
        }
    }
}

/// Reads every queued message; whether there was any (or some were lost).
fn drain(socket: &OwnedFd) -> io::Result<bool> {
    let mut got = false;
    let mut buf = [0u8; 8192];
    loop {
        // SAFETY: buf is writable for its length.
        let n = unsafe {
            libc::recv(
                socket.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            got = true;
            continue;
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) => return Ok(got),
            // Notifications were lost: the agent looks at everything again anyway.
            Some(libc::ENOBUFS) => got = true,
            Some(libc::EINTR) => {}
            _ => return Err(e),
        }
    }
}

/// A non-blocking netlink route socket subscribed to the multicast `groups`.
fn route_socket(groups: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a new socket that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: a zeroed sockaddr_nl is valid; bind reads size_of of it.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    addr.nl_groups = groups;
    // SAFETY: bind(2) with a sockaddr_nl of the size given.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}
