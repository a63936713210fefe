//! Backend servers that say who they are: an HTTP/1.1 server answering every request with its
//! pod name, and a UDP echo server replying `<pod>:<payload>`. Both stop and join on drop.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::netns::Netns;

/// How often the server threads look at their stop flag.
const TICK: Duration = Duration::from_millis(100);

/// Open connections: a handle to shut each down, and the thread serving it.
type Connections = Mutex<Vec<(TcpStream, JoinHandle<()>)>>;

/// An HTTP/1.1 server on `0.0.0.0:port` (or another address) of a namespace; every response
/// body is its name.
pub struct HttpServer {
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
    connections: Arc<Connections>,
}

impl HttpServer {
    /// Listens on `port` in `ns` and answers with `name`.
    pub fn start(ns: &Netns, port: u16, name: &str) -> Result<Self> {
        Self::start_on(ns, Ipv4Addr::UNSPECIFIED.into(), port, name)
    }

    /// [`HttpServer::start`] on `addr` (e.g. a pod's IPv6 address).
    pub fn start_on(ns: &Netns, addr: IpAddr, port: u16, name: &str) -> Result<Self> {
        let listener = ns
            .run(|| TcpListener::bind((addr, port)))?
            .with_context(|| format!("HTTP server {name}: bind {addr} port {port}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(Mutex::new(Vec::new()));
        let acceptor = {
            let (stop, connections, name) = (stop.clone(), connections.clone(), name.to_owned());
            std::thread::spawn(move || accept_loop(&listener, &stop, &connections, &name))
        };
        Ok(HttpServer {
            stop,
            acceptor: Some(acceptor),
            connections,
        })
    }
}

fn accept_loop(listener: &TcpListener, stop: &AtomicBool, connections: &Connections, name: &str) {
    accept_until(listener, stop, |stream, handle| {
        let name = name.to_owned();
        let thread = std::thread::spawn(move || {
            if let Err(e) = serve(&stream, &name) {
                eprintln!("HTTP server {name}: {e:#}");
            }
            // The server keeps a clone of the stream (to stop it), so dropping is not enough.
            let _ = stream.shutdown(Shutdown::Both);
        });
        let mut connections = connections.lock().unwrap();
        connections.retain(|(_, t)| !t.is_finished());
        connections.push((handle, thread));
    });
}

/// Accepts connections on `listener` until `stop` is set (looking at it every [`TICK`]), and
/// hands each to `accepted` with a clone of it (a handle to shut it down).
pub(crate) fn accept_until(
    listener: &TcpListener,
    stop: &AtomicBool,
    mut accepted: impl FnMut(TcpStream, TcpStream),
) {
    while !stop.load(Ordering::Relaxed) {
        if !readable(listener.as_raw_fd(), TICK) {
            continue;
        }
        let Ok((stream, _)) = listener.accept() else {
            continue;
        };
        let Ok(handle) = stream.try_clone() else {
            continue;
        };
        accepted(stream, handle);
    }
}

/// Waits up to `timeout` for `fd` to become readable.
fn readable(fd: i32, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
    n > 0
}

/// How long a kept-alive connection may stay idle before the server closes it: long enough
/// for tests that hold connections open across backend changes on a loaded machine.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Answers requests on one connection until the client closes it or asks to; every response
/// body is `name`, but for `GET /peer`: `name` and the client's address as the server sees
/// it (`pod1 10.200.0.2:40000`).
pub fn serve(stream: &TcpStream, name: &str) -> Result<()> {
    stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
    let peer = format!("{name} {}", stream.peer_addr()?);
    let mut reader = BufReader::new(stream);
    let mut writer = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let mut keep_alive = !request_line.trim_end().ends_with("HTTP/1.0");
        let body = match request_line.split_whitespace().nth(1) {
            Some("/peer") => peer.as_str(),
            _ => name,
        };
        let mut content_length = 0usize;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if key.eq_ignore_ascii_case("content-length") {
                content_length = value.parse().context("bad Content-Length")?;
            } else if key.eq_ignore_ascii_case("connection") {
                keep_alive = !value.eq_ignore_ascii_case("close")
                    && (keep_alive || value.eq_ignore_ascii_case("keep-alive"));
            }
        }
        std::io::copy(
            &mut (&mut reader).take(content_length as u64),
            &mut std::io::sink(),
        )?;
        let connection = if keep_alive { "keep-alive" } else { "close" };
        write!(
            writer,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
             Connection: {connection}\r\n\r\n{body}",
            body.len()
        )?;
        writer.flush()?;
        if !keep_alive {
            return Ok(());
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        for (stream, thread) in self.connections.lock().unwrap().drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
            let _ = thread.join();
        }
    }
}

/// A UDP server on `0.0.0.0:port` (or another address) of a namespace that replies
/// `<name>:<payload>`.
pub struct UdpEchoServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpEchoServer {
    /// Binds `port` in `ns` and answers with `name`.
    pub fn start(ns: &Netns, port: u16, name: &str) -> Result<Self> {
        Self::start_on(ns, Ipv4Addr::UNSPECIFIED.into(), port, name)
    }

    /// [`UdpEchoServer::start`] on `addr` (e.g. a pod's IPv6 address).
    pub fn start_on(ns: &Netns, addr: IpAddr, port: u16, name: &str) -> Result<Self> {
        let socket = ns
            .run(|| UdpSocket::bind((addr, port)))?
            .with_context(|| format!("UDP server {name}: bind {addr} port {port}"))?;
        socket.set_read_timeout(Some(TICK))?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (stop, name) = (stop.clone(), name.to_owned());
            std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = socket.recv_from(&mut buf) else {
                        continue;
                    };
                    let mut reply = format!("{name}:").into_bytes();
                    reply.extend_from_slice(&buf[..n]);
                    if let Err(e) = socket.send_to(&reply, from) {
                        eprintln!("UDP server {name}: reply to {from}: {e}");
                    }
                }
            })
        };
        Ok(UdpEchoServer {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for UdpEchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
