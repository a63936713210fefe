//! The manifests source: a folder of Kubernetes manifests ([`crate::manifest`]), read again
//! whenever a file in it changes, and every `resync` in any case.
//!
//! Each read is a complete view. When the folder cannot be read, the view stays as it was
//! (the error is logged and the source reported down) until it can be read again.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use notify::Watcher as _;
use tokio::{sync::mpsc, time::Interval};
use tracing::{debug, error, warn};

use super::{Changes, NodeFacts, Source};
use crate::{manifest, metrics::Metrics, model::ClusterState};

/// How long a burst of file events (an editor, `cp -r`) may take before the folder is read.
const SETTLE: Duration = Duration::from_millis(100);

/// A folder of manifests as a [`Source`].
pub struct ManifestsSource {
    dir: PathBuf,
    state: ClusterState,
    loaded: bool,
    /// When the first unread file event arrived.
    pending: Option<Instant>,
    events: mpsc::Receiver<()>,
    // Kept alive: dropping it stops the notifications.
    _watcher: notify::RecommendedWatcher,
    resync: Interval,
    metrics: Arc<Metrics>,
}

impl ManifestsSource {
    /// Watches `dir` (which must be readable) and reads it again every `resync`.
    pub fn new(dir: &Path, resync: Duration, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        std::fs::read_dir(dir).with_context(|| format!("manifests folder {}", dir.display()))?;
        let (tx, events) = mpsc::channel::<()>(1);
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                match event {
                    // A full channel already means "read again".
                    Ok(_) => drop(tx.try_send(())),
                    Err(e) => warn!("watching the manifests folder: {e}"),
                }
            })
            .context("creating a file watcher")?;
        watcher
            .watch(dir, notify::RecursiveMode::NonRecursive)
            .with_context(|| format!("watching {}", dir.display()))?;
        let mut resync = tokio::time::interval(resync);
        resync.reset();
        Ok(ManifestsSource {
            dir: dir.to_owned(),
            state: ClusterState::default(),
            loaded: false,
            pending: None,
            events,
            _watcher: watcher,
            resync,
            metrics,
        })
    }

    /// Reads the folder; the changes against the current view, or `None` when it cannot be
    /// read.
    fn load(&mut self, since: Instant) -> Option<Changes> {
        match manifest::load_dir(&self.dir) {
            Ok(set) => {
                for e in &set.errors {
                    error!("{e}");
                }
                self.metrics.connected();
                let changes = Changes::between(&self.state, &set.state, since);
                self.state = set.state;
                self.loaded = true;
                Some(changes)
            }
            Err(e) => {
                let e = format!("{:#}", anyhow::Error::from(e));
                error!("{e}; keeping the programmed state");
                self.metrics.disconnected(e);
                None
            }
        }
    }
}

impl Source for ManifestsSource {
    async fn changed(&mut self) -> anyhow::Result<Changes> {
        if !self.loaded {
            // The first view must be complete: an unreadable folder at start is an error.
            let since = Instant::now();
            return self
                .load(since)
                .with_context(|| format!("reading {}", self.dir.display()));
        }
        loop {
            let since = match self.pending {
                Some(first) => {
                    tokio::time::sleep_until((first + SETTLE).into()).await;
                    while self.events.try_recv().is_ok() {}
                    debug!("manifests changed");
                    first
                }
                None => tokio::select! {
                    Some(()) = self.events.recv() => {
                        self.pending = Some(Instant::now());
                        continue;
                    }
                    _ = self.resync.tick() => {
                        debug!("periodic resync");
                        Instant::now()
                    }
                },
            };
            self.pending = None;
            if let Some(changes) = self.load(since)
                && !changes.is_empty()
            {
                return Ok(changes);
            }
        }
    }

    fn state(&self) -> &ClusterState {
        &self.state
    }

    fn node(&self) -> Option<&NodeFacts> {
        None
    }
}
