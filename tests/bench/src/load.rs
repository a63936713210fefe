//! The load generator: HTTP/1.1 clients on a fixed number of threads in the client
//! namespace, each loop bounded in time and in count. Every response is checked (status 200,
//! a body naming a pod); failures are counted, never hidden.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};

use lb_testbed::client::content_length;
use lb_testbed::netns::Netns;

/// How long a client waits to connect, and then for each read or write.
pub const TIMEOUT: Duration = Duration::from_secs(3);
/// No loop sends more than this many requests, whatever its time budget.
pub const MAX_REQUESTS: u64 = 10_000_000;

/// What a rate measurement counted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rate {
    /// Client threads.
    pub threads: usize,
    /// Requests answered correctly.
    pub ok: u64,
    /// Requests that failed (connect, timeout, wrong answer).
    pub errors: u64,
    /// Wall time of the measurement, in seconds.
    pub seconds: f64,
    /// The first failure, if any.
    pub first_error: Option<String>,
}

impl Rate {
    /// Correct answers per second.
    pub fn per_sec(&self) -> f64 {
        self.ok as f64 / self.seconds
    }
}

/// Reads one response from `stream` into `buf` and checks it: `200 OK`, a Content-Length
/// body naming a pod. With `to_eof`, reads until the server closes.
fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>, to_eof: bool) -> Result<()> {
    buf.clear();
    let mut chunk = [0u8; 1024];
    let (head_end, length) = loop {
        let n = stream.read(&mut chunk).context("read response")?;
        ensure!(n > 0, "connection closed before a full response");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buf[..end]).context("response head is not UTF-8")?;
            ensure!(
                head.starts_with("HTTP/1.1 200 "),
                "unexpected response {head:?}"
            );
            let length =
                content_length(head).with_context(|| format!("no Content-Length in {head:?}"))?;
            break (end + 4, length);
        }
        ensure!(buf.len() < 64 * 1024, "response head too long");
    };
    while buf.len() < head_end + length {
        let n = stream.read(&mut chunk).context("read body")?;
        ensure!(n > 0, "connection closed inside the body");
        buf.extend_from_slice(&chunk[..n]);
    }
    ensure!(
        buf[head_end..head_end + length].starts_with(b"pod"),
        "body {:?} names no pod",
        String::from_utf8_lossy(&buf[head_end..])
    );
    if to_eof {
        let n = stream.read(&mut chunk).context("read to close")?;
        ensure!(n == 0, "data after the response");
    }
    Ok(())
}

fn connect(target: SocketAddr) -> Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&target, TIMEOUT)
        .with_context(|| format!("connect to {target}"))?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A new connection, one `GET /` with `Connection: close`, the whole answer, close.
pub fn one_connection(target: SocketAddr, buf: &mut Vec<u8>) -> Result<()> {
    let mut stream = connect(target)?;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .context("send request")?;
    read_response(&mut stream, buf, true)
}

/// Latencies of `n` first requests, one after the other from one thread in `ns`: each from
/// the start of connect() to the end of the response on a new connection. Fails on the first
/// failed request.
pub fn first_request_latencies(ns: &Netns, target: SocketAddr, n: usize) -> Result<Vec<Duration>> {
    ns.run(|| {
        let mut buf = Vec::new();
        (0..n)
            .map(|i| {
                let start = Instant::now();
                one_connection(target, &mut buf)
                    .with_context(|| format!("first request {i} of {n} to {target}"))?;
                Ok(start.elapsed())
            })
            .collect()
    })?
}

/// Runs `work` on `threads` threads in `ns` for `duration`; `work` returns whether one
/// request succeeded, and gets the thread's scratch state.
fn rate<S>(
    ns: &Netns,
    threads: usize,
    duration: Duration,
    init: impl Fn() -> S + Sync,
    work: impl Fn(&mut S) -> Result<()> + Sync,
) -> Result<Rate> {
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    let per_thread = ns.run(|| {
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    scope.spawn(|| {
                        let mut state = init();
                        let (mut ok, mut errors, mut first_error) = (0u64, 0u64, None);
                        while !stop.load(Ordering::Relaxed) && ok + errors < MAX_REQUESTS {
                            match work(&mut state) {
                                Ok(()) => ok += 1,
                                Err(e) => {
                                    errors += 1;
                                    first_error.get_or_insert_with(|| format!("{e:#}"));
                                }
                            }
                        }
                        (ok, errors, first_error)
                    })
                })
                .collect();
            std::thread::sleep(duration);
            stop.store(true, Ordering::Relaxed);
            handles
                .into_iter()
                .map(|h| h.join().expect("a load thread panicked"))
                .collect::<Vec<_>>()
        })
    })?;
    let seconds = start.elapsed().as_secs_f64();
    let mut rate = Rate {
        threads,
        ok: 0,
        errors: 0,
        seconds,
        first_error: None,
    };
    for (ok, errors, first_error) in per_thread {
        rate.ok += ok;
        rate.errors += errors;
        if rate.first_error.is_none() {
            rate.first_error = first_error;
        }
    }
    Ok(rate)
}

/// Connections per second: each thread opens a connection, sends one request, reads the
/// answer and closes, for `duration`.
pub fn connection_rate(
    ns: &Netns,
    target: SocketAddr,
    threads: usize,
    duration: Duration,
) -> Result<Rate> {
    rate(ns, threads, duration, Vec::new, |buf| {
        one_connection(target, buf)
    })
}

/// Requests per second on kept-alive connections: each thread keeps one connection and sends
/// a request as soon as the previous answer is read, for `duration`. A failed connection is
/// replaced.
pub fn request_rate(
    ns: &Netns,
    target: SocketAddr,
    threads: usize,
    duration: Duration,
) -> Result<Rate> {
    let init = || (None::<TcpStream>, Vec::new());
    rate(ns, threads, duration, init, |(stream, buf)| {
        let result = (|| {
            if stream.is_none() {
                *stream = Some(connect(target)?);
            }
            let Some(s) = stream.as_mut() else {
                bail!("no connection")
            };
            s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
                .context("send request")?;
            read_response(s, buf, false)
        })();
        if result.is_err() {
            *stream = None;
        }
        result
    })
}
