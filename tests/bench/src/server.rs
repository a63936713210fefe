//! A backend for load: the same HTTP/1.1 answers as [`crate::HttpServer`] (the pod's name),
//! from a fixed pool of threads that each accept and serve one connection at a time, so no
//! thread is started per connection while the benchmark runs.

use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use anyhow::{Context, Result};

use lb_testbed::backends::serve;
use lb_testbed::netns::Netns;

/// `threads` threads answering HTTP on `0.0.0.0:port` of a namespace; stopped on drop.
pub struct PooledHttpServer {
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    /// The connection each thread is serving, to shut it down on drop.
    serving: Arc<Mutex<Vec<Option<TcpStream>>>>,
    threads: Vec<JoinHandle<()>>,
}

impl PooledHttpServer {
    /// Listens on `port` in `ns`; every response body is `name`.
    pub fn start(ns: &Netns, port: u16, name: &str, threads: usize) -> Result<Self> {
        let listener = ns
            .run(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)))?
            .with_context(|| format!("{name}: bind port {port}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let serving: Arc<Mutex<Vec<Option<TcpStream>>>> =
            Arc::new(Mutex::new((0..threads).map(|_| None).collect()));
        let threads = (0..threads)
            .map(|k| {
                let listener = listener.try_clone()?;
                let (stop, serving, name) = (stop.clone(), serving.clone(), name.to_owned());
                Ok(std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        // Shutting the listener down (on drop) wakes this with an error.
                        let Ok((stream, _)) = listener.accept() else {
                            continue;
                        };
                        let _ = stream.set_nodelay(true);
                        serving.lock().unwrap()[k] = stream.try_clone().ok();
                        if let Err(e) = serve(&stream, &name)
                            && !stop.load(Ordering::Relaxed)
                        {
                            eprintln!("{name}: {e:#}");
                        }
                        let _ = stream.shutdown(Shutdown::Both);
                        serving.lock().unwrap()[k] = None;
                    }
                }))
            })
            .collect::<std::io::Result<_>>()?;
        Ok(PooledHttpServer {
            listener,
            stop,
            serving,
            threads,
        })
    }
}

impl Drop for PooledHttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // SAFETY: shutdown(2) on a socket we own; it wakes every thread blocked in accept.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        for stream in self.serving.lock().unwrap().iter().flatten() {
            let _ = stream.shutdown(Shutdown::Both);
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}
