//! Long-lived TCP connections with known 5-tuples, kept busy while the backends change.
//!
//! A [`ConnPool`] opens connections from a namespace to a frontend, each bound to an explicit
//! source port before it connects, so the flow's 5-tuple is known (for `lb explain`). Every
//! connection sends `GET /` again and again on the same kept-alive connection and records
//! which pod answered ([`crate::HttpServer`] answers with its pod name), and the first error,
//! classified as a reset, a timeout or an end of stream. Traffic runs in rounds: one request
//! on every live connection (all sent first, then all answers read), either when the test
//! asks ([`ConnPool::round`]) or continuously on a background thread
//! ([`ConnPool::start_traffic`]).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufReader, ErrorKind, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::client::{TIMEOUT, read_response};
use crate::netns::Netns;

/// The pause between two rounds of background traffic.
const ROUND_PAUSE: Duration = Duration::from_millis(20);

/// What broke a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FailureKind {
    /// Reset by the peer (ECONNRESET, EPIPE, ECONNABORTED, or ECONNREFUSED on connect: an
    /// RST either way).
    Reset,
    /// No answer (or no handshake) within [`TIMEOUT`].
    Timeout,
    /// The stream ended (FIN) before a whole answer.
    Eof,
    /// Anything else, e.g. a response that is not `200 OK`.
    Other,
}

impl FailureKind {
    /// The kind of an I/O error from a connect, read or write.
    pub fn of(error: &std::io::Error) -> Self {
        match error.kind() {
            ErrorKind::ConnectionReset
            | ErrorKind::BrokenPipe
            | ErrorKind::ConnectionAborted
            | ErrorKind::ConnectionRefused => FailureKind::Reset,
            ErrorKind::WouldBlock | ErrorKind::TimedOut => FailureKind::Timeout,
            ErrorKind::UnexpectedEof => FailureKind::Eof,
            _ => FailureKind::Other,
        }
    }
}

/// The error that ended a connection.
#[derive(Debug, Clone)]
pub struct Failure {
    /// Its kind.
    pub kind: FailureKind,
    /// Which request failed: 0 for the connect, n for the n-th request.
    pub request: usize,
    /// The error's text.
    pub error: String,
}

/// What happened on one connection.
#[derive(Debug, Clone)]
pub struct ConnRecord {
    /// The source port (the source address is the pool's).
    pub sport: u16,
    /// The label given when it was opened (e.g. the test step).
    pub opened: String,
    /// Every answer in order, as runs of (pod name, consecutive answers from it).
    pub answers: Vec<(String, usize)>,
    /// The error that ended it, if any.
    pub failure: Option<Failure>,
}

impl ConnRecord {
    /// The backend that answered the first request.
    pub fn first(&self) -> Option<&str> {
        self.answers.first().map(|(pod, _)| pod.as_str())
    }

    /// How many requests were answered.
    pub fn answered(&self) -> usize {
        self.answers.iter().map(|(_, n)| n).sum()
    }

    /// Whether every answer came from the same backend.
    pub fn kept_its_backend(&self) -> bool {
        self.answers.len() <= 1
    }

    fn answer(&mut self, pod: String) {
        match self.answers.last_mut() {
            Some((last, n)) if *last == pod => *n += 1,
            _ => self.answers.push((pod, 1)),
        }
    }
}

/// One connection: its record and, while it works, its stream.
struct Conn {
    record: ConnRecord,
    stream: Option<BufReader<TcpStream>>,
}

impl Conn {
    /// Records `error` as the failure of the next request and closes the stream.
    fn fail(&mut self, error: &std::io::Error) {
        self.fail_at(self.record.answered() + 1, error);
    }

    fn fail_at(&mut self, request: usize, error: &std::io::Error) {
        self.record.failure = Some(Failure {
            kind: FailureKind::of(error),
            request,
            error: error.to_string(),
        });
        self.stream = None;
    }
}

/// Long-lived connections from one source address to one frontend.
pub struct ConnPool<'a> {
    ns: &'a Netns,
    source: Ipv4Addr,
    target: SocketAddrV4,
    next_port: u32,
    conns: Arc<Mutex<Vec<Conn>>>,
    rounds: Arc<AtomicU64>,
    traffic: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
}

impl<'a> ConnPool<'a> {
    /// A pool of connections from `source` (an address of `ns`) to `target`, with source
    /// ports counting up from `first_port`. A port is never used twice, so every connection
    /// is a new flow to the datapath.
    pub fn new(ns: &'a Netns, source: Ipv4Addr, target: SocketAddrV4, first_port: u16) -> Self {
        ConnPool {
            ns,
            source,
            target,
            next_port: first_port.into(),
            conns: Arc::default(),
            rounds: Arc::default(),
            traffic: None,
        }
    }

    /// The frontend the connections go to.
    pub fn target(&self) -> SocketAddrV4 {
        self.target
    }

    /// The source addresses (and so the flows) of the next `n` connections [`ConnPool::open`]
    /// opens (fewer if the ports run out).
    pub fn next_sources(&self, n: usize) -> Vec<SocketAddrV4> {
        (self.next_port..1 << 16)
            .take(n)
            .map(|port| SocketAddrV4::new(self.source, port as u16))
            .collect()
    }

    /// The source address of every connection.
    pub fn source(&self) -> Ipv4Addr {
        self.source
    }

    /// Opens `n` connections (handshakes in parallel, up to [`TIMEOUT`]) labelled `label`,
    /// sends each its first request, adds them to the pool and returns their indices. A
    /// connection that fails is recorded as failed, not returned as an error; the error is
    /// for what is not the connection's fault (no such namespace, no ports left).
    pub fn open(&mut self, n: usize, label: &str) -> Result<Range<usize>> {
        let (first, end) = (self.next_port, self.next_port + u32::try_from(n)?);
        ensure!(end <= 1 << 16, "no {n} source ports left after {first}");
        let ports: Vec<u16> = (first..end).map(|p| p as u16).collect();
        self.next_port = end;
        let (source, target) = (self.source, self.target);
        let mut conns = self
            .ns
            .run(|| connect_all(source, target, &ports, label))??;
        round(&mut conns, &request(target));
        let mut pool = self.lock();
        let start = pool.len();
        pool.extend(conns);
        Ok(start..pool.len())
    }

    /// Sends one request on every live connection and reads the answers.
    pub fn round(&self) {
        round(&mut self.lock(), &request(self.target));
    }

    /// Starts sending rounds continuously on a background thread (a short pause between
    /// rounds), until [`ConnPool::stop_traffic`] or drop.
    pub fn start_traffic(&mut self) {
        if self.traffic.is_some() {
            return;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (stop, conns, rounds) = (stop.clone(), self.conns.clone(), self.rounds.clone());
            let request = request(self.target);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    round(&mut lock(&conns), &request);
                    rounds.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(ROUND_PAUSE);
                }
            })
        };
        self.traffic = Some((stop, thread));
    }

    /// Stops the background traffic and waits for its last round.
    pub fn stop_traffic(&mut self) {
        if let Some((stop, thread)) = self.traffic.take() {
            stop.store(true, Ordering::Relaxed);
            if let Err(panic) = thread.join() {
                std::panic::resume_unwind(panic);
            }
        }
    }

    /// Waits until the background traffic has completed `n` more rounds (each begun after
    /// this call), so that every live connection has sent `n` requests since.
    pub fn wait_rounds(&self, n: u64) -> Result<()> {
        ensure!(self.traffic.is_some(), "no background traffic is running");
        // The round running now may have passed some connections already.
        let target = self.rounds.load(Ordering::Relaxed) + n + 1;
        let deadline = Instant::now() + Duration::from_secs(30) + TIMEOUT * n as u32;
        while self.rounds.load(Ordering::Relaxed) < target {
            if Instant::now() > deadline {
                bail!("{n} rounds of traffic did not complete by {deadline:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// The records of every connection, in the order they were opened.
    pub fn records(&self) -> Vec<ConnRecord> {
        self.lock().iter().map(|c| c.record.clone()).collect()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Conn>> {
        lock(&self.conns)
    }
}

impl Drop for ConnPool<'_> {
    fn drop(&mut self) {
        if let Some((stop, thread)) = self.traffic.take() {
            stop.store(true, Ordering::Relaxed);
            let _ = thread.join();
        }
    }
}

/// How many connections each backend got first, by pod name.
pub fn first_backends<'r>(
    records: impl IntoIterator<Item = &'r ConnRecord>,
) -> BTreeMap<String, usize> {
    let mut spread = BTreeMap::new();
    for r in records {
        if let Some(first) = r.first() {
            *spread.entry(first.to_owned()).or_default() += 1;
        }
    }
    spread
}

/// The failures among `records`, counted by kind.
pub fn failures<'r>(
    records: impl IntoIterator<Item = &'r ConnRecord>,
) -> BTreeMap<FailureKind, usize> {
    let mut kinds = BTreeMap::new();
    for f in records.into_iter().filter_map(|r| r.failure.as_ref()) {
        *kinds.entry(f.kind).or_default() += 1;
    }
    kinds
}

/// The distinct backends that answered any of `records`.
pub fn answering<'r>(records: impl IntoIterator<Item = &'r ConnRecord>) -> BTreeSet<String> {
    records
        .into_iter()
        .flat_map(|r| r.answers.iter().map(|(pod, _)| pod.clone()))
        .collect()
}

fn lock(conns: &Mutex<Vec<Conn>>) -> MutexGuard<'_, Vec<Conn>> {
    // A panic while holding the lock leaves the records as they were: still worth reading.
    conns.lock().unwrap_or_else(|e| e.into_inner())
}

fn request(target: SocketAddrV4) -> Vec<u8> {
    format!("GET / HTTP/1.1\r\nHost: {target}\r\n\r\n").into_bytes()
}

/// One request on every live connection: all are sent, then every answer is read, each
/// within [`TIMEOUT`] of the last send.
fn round(conns: &mut [Conn], request: &[u8]) {
    let mut sent = Vec::with_capacity(conns.len());
    for (i, conn) in conns.iter_mut().enumerate() {
        let Some(stream) = conn.stream.as_mut() else {
            continue;
        };
        match stream.get_mut().write_all(request) {
            Ok(()) => sent.push(i),
            Err(e) => conn.fail(&e),
        }
    }
    let deadline = Instant::now() + TIMEOUT;
    for i in sent {
        let conn = &mut conns[i];
        let Some(stream) = conn.stream.as_mut() else {
            continue;
        };
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        let answer = stream
            .get_ref()
            .set_read_timeout(Some(left))
            .and_then(|()| read_response(stream));
        match answer {
            Ok(pod) => conn.record.answer(pod),
            Err(e) => conn.fail(&e),
        }
    }
}

/// Connects one socket per port from `source:port` to `target`, all handshakes in flight at
/// once, and waits up to [`TIMEOUT`] for them. Must run in the client's namespace.
fn connect_all(
    source: Ipv4Addr,
    target: SocketAddrV4,
    ports: &[u16],
    label: &str,
) -> Result<Vec<Conn>> {
    let target_addr = SockAddr::from(SocketAddr::V4(target));
    let mut conns = Vec::with_capacity(ports.len());
    let mut pending = Vec::new();
    for &sport in ports {
        let mut conn = Conn {
            record: ConnRecord {
                sport,
                opened: label.to_owned(),
                answers: Vec::new(),
                failure: None,
            },
            stream: None,
        };
        let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.bind(&SockAddr::from(SocketAddrV4::new(source, sport)))?;
        socket.set_nonblocking(true)?;
        match socket.connect(&target_addr) {
            Ok(()) => pending.push((conns.len(), socket)),
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {
                pending.push((conns.len(), socket))
            }
            Err(e) => conn.fail_at(0, &e),
        }
        conns.push(conn);
    }
    let deadline = Instant::now() + TIMEOUT;
    while !pending.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let timeout = std::io::Error::new(ErrorKind::TimedOut, "no handshake");
            for (i, _) in pending.drain(..) {
                conns[i].fail_at(0, &timeout);
            }
            break;
        }
        let mut fds: Vec<libc::pollfd> = pending
            .iter()
            .map(|(_, s)| libc::pollfd {
                fd: s.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a valid array of pollfds for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as _, left.as_millis() as i32) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(e.into());
        }
        let mut still = Vec::with_capacity(pending.len());
        for ((i, socket), fd) in pending.into_iter().zip(&fds) {
            if fd.revents == 0 {
                still.push((i, socket));
                continue;
            }
            match socket.take_error()? {
                Some(e) => conns[i].fail_at(0, &e),
                None => {
                    socket.set_nonblocking(false)?;
                    let stream = TcpStream::from(socket);
                    stream.set_write_timeout(Some(TIMEOUT))?;
                    conns[i].stream = Some(BufReader::new(stream));
                }
            }
        }
        pending = still;
    }
    Ok(conns)
}
