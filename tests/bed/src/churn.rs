//! A steady stream of new connections, each with one request: connect, `GET /` with
//! `Connection: close`, read the answer, close. It runs on a background thread in the
//! client's namespace until stopped, and counts what it saw, so that a test can tell how
//! many requests failed (and how) while something happened to the agent.

use std::collections::BTreeMap;
use std::io::{BufReader, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::client::{TIMEOUT, read_response};
use crate::conns::FailureKind;
use crate::netns::Netns;

/// The pause between two connections.
const PAUSE: Duration = Duration::from_millis(5);

/// What the stream of connections saw so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChurnCounts {
    /// Requests answered `200 OK`.
    pub ok: usize,
    /// Requests that failed, by kind.
    pub failed: BTreeMap<FailureKind, usize>,
    /// The first few failures, for the report.
    pub examples: Vec<String>,
    /// Answers by backend (pod name).
    pub served: BTreeMap<String, usize>,
}

impl ChurnCounts {
    /// Requests that failed.
    pub fn failures(&self) -> usize {
        self.failed.values().sum()
    }

    /// What happened after `earlier` (a snapshot of the same stream).
    pub fn since(&self, earlier: &ChurnCounts) -> ChurnCounts {
        fn minus<K: Ord + Clone>(
            now: &BTreeMap<K, usize>,
            then: &BTreeMap<K, usize>,
        ) -> BTreeMap<K, usize> {
            now.iter()
                .map(|(k, n)| (k.clone(), n - then.get(k).copied().unwrap_or(0)))
                .filter(|(_, n)| *n > 0)
                .collect()
        }
        ChurnCounts {
            ok: self.ok - earlier.ok,
            failed: minus(&self.failed, &earlier.failed),
            examples: self.examples[earlier.examples.len()..].to_vec(),
            served: minus(&self.served, &earlier.served),
        }
    }
}

/// New connections to one frontend, one after another, on a background thread.
pub struct Churn {
    stop: Arc<AtomicBool>,
    counts: Arc<Mutex<ChurnCounts>>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Churn {
    /// Starts opening connections from `ns` to `target`.
    pub fn start(ns: &Netns, target: SocketAddrV4) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(Mutex::new(ChurnCounts::default()));
        let thread = {
            let (stop, counts) = (stop.clone(), counts.clone());
            ns.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let answer = one_request(target);
                    let mut c = counts.lock().unwrap_or_else(|e| e.into_inner());
                    match answer {
                        Ok(pod) => {
                            c.ok += 1;
                            *c.served.entry(pod).or_default() += 1;
                        }
                        Err(e) => {
                            *c.failed.entry(FailureKind::of(&e)).or_default() += 1;
                            if c.examples.len() < 5 {
                                c.examples.push(e.to_string());
                            }
                        }
                    }
                    drop(c);
                    std::thread::sleep(PAUSE);
                }
            })?
        };
        Ok(Churn {
            stop,
            counts,
            thread: Some(thread),
        })
    }

    /// What it saw so far.
    pub fn counts(&self) -> ChurnCounts {
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until `n` more requests have been answered (or failed), for up to `timeout`.
    pub fn wait_requests(&self, n: usize, timeout: Duration) -> Result<()> {
        let total = |c: &ChurnCounts| c.ok + c.failures();
        let target = total(&self.counts()) + n;
        let deadline = std::time::Instant::now() + timeout;
        while total(&self.counts()) < target {
            if std::time::Instant::now() > deadline {
                bail!("{n} requests did not complete within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Stops after the request in flight and returns the counts.
    pub fn stop(mut self) -> Result<ChurnCounts> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            match thread.join() {
                Ok(result) => result.context("the connection stream")?,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        Ok(self.counts())
    }
}

impl Drop for Churn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One connection with one request; the pod that answered. I/O errors keep their kind.
fn one_request(target: SocketAddrV4) -> std::io::Result<String> {
    let stream = TcpStream::connect_timeout(&SocketAddr::V4(target), TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    (&stream).write_all(
        format!("GET / HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    read_response(&mut BufReader::new(&stream))
}
