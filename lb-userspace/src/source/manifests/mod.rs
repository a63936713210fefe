//! The manifests source: a folder of Kubernetes manifests ([`load`]), read whole
//! at start and every `resync`, and file by file as files change in between.
//!
//! inotify names the file behind each event. A file is read again as soon as it is
//! complete: closed after writing, renamed into the folder, or removed; one only created or
//! modified is read [`SETTLE`] after its first event (a writer that keeps it open). Only the
//! changed file is read and translated again ([`Folder::reread`]); anything else (the
//! folder itself, a `..data` symlink swap as in a mounted ConfigMap, an event queue
//! overflow, an object also defined in another file) reads the whole folder.
//!
//! Each read is a complete view of what the folder holds. When the folder cannot be read,
//! the view stays as it was (the error is logged and the source reported down) until it can
//! be read again.

pub mod allocate;
pub mod load;

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::OsStr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use notify::{
    EventKind, Watcher as _,
    event::{AccessKind, AccessMode, ModifyKind},
};
use tokio::{
    sync::{mpsc, oneshot},
    time::Interval,
};
use tracing::{debug, error, info, warn};

use self::allocate::Ranges;
use self::load::{Folder, LoadDirError, ManifestNote, ManifestSet};
use super::sleep_until;
use super::{Changes, NodeFacts, Source};
use crate::{metrics::Metrics, model::ClusterState};

/// How long a file that is created or modified but not closed may take before it is read.
const SETTLE: Duration = Duration::from_millis(100);

/// What is to be read again.
#[derive(Debug, Default)]
struct Pending {
    /// The whole folder, since this moment.
    all: Option<Instant>,
    /// These files: the first event, and whether the file is complete.
    files: BTreeMap<PathBuf, (Instant, bool)>,
}

impl Pending {
    /// Takes in one file event.
    fn note(&mut self, dir: &Path, event: notify::Event, at: Instant) {
        if event.need_rescan() {
            self.all.get_or_insert(at);
            return;
        }
        if matches!(event.kind, EventKind::Access(a) if a != AccessKind::Close(AccessMode::Write)) {
            // Opened or read (by this source too): nothing changed.
            return;
        }
        let complete = matches!(
            event.kind,
            EventKind::Access(AccessKind::Close(AccessMode::Write))
                | EventKind::Modify(ModifyKind::Name(_))
                | EventKind::Remove(_)
        );
        for path in event.paths {
            let name = path.file_name().and_then(OsStr::to_str).unwrap_or_default();
            if path.parent() != Some(dir) || name.starts_with("..") {
                // The folder itself, or what a ConfigMap volume swaps to update its files.
                self.all.get_or_insert(at);
            } else if load::is_manifest_name(name) {
                let entry = self.files.entry(path).or_insert((at, complete));
                entry.1 = complete;
            }
        }
    }

    /// When the next read is due; `None` when nothing is pending. A whole read pending
    /// covers the files.
    fn due(&self) -> Option<Instant> {
        if let Some(first) = self.all {
            return Some(first + SETTLE);
        }
        self.files
            .values()
            .map(|&(first, complete)| if complete { first } else { first + SETTLE })
            .min()
    }
}

/// A folder of manifests as a [`Source`].
pub struct ManifestsSource {
    dir: PathBuf,
    state: ClusterState,
    /// `None` until the first complete read.
    folder: Option<Folder>,
    pending: Pending,
    events: mpsc::UnboundedReceiver<notify::Event>,
    // Kept alive: dropping it stops the notifications.
    _watcher: notify::RecommendedWatcher,
    resync: Interval,
    metrics: Arc<Metrics>,
    /// The first whole read, started by [`ManifestsSource::new`] on a thread of its own so
    /// that it overlaps what the agent does before it asks for the first view (loading the
    /// datapath: creating the maps and verifying the programs). Taken by that first ask.
    first: Option<(Instant, oneshot::Receiver<FolderRead>)>,
    /// Where allocated values come from.
    ranges: Ranges,
    /// The notes logged: each is logged once (a whole read notes everything again).
    notes_logged: BTreeSet<String>,
    /// This node's name: its Node, if the folder has one, is [`Source::node`].
    node_name: String,
}

/// A whole read of the folder.
type FolderRead = Result<(Folder, ManifestSet), LoadDirError>;

impl ManifestsSource {
    /// Watches `dir` (which must be readable) and reads it again every `resync`; what
    /// Services lack comes from `ranges`; this node is the Node named `node_name`.
    pub fn new(
        dir: &Path,
        resync: Duration,
        metrics: Arc<Metrics>,
        ranges: Ranges,
        node_name: String,
    ) -> anyhow::Result<Self> {
        std::fs::read_dir(dir).with_context(|| format!("manifests folder {}", dir.display()))?;
        // inotify names paths under the folder as it is given here.
        let (tx, events) = mpsc::unbounded_channel();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
                Ok(event) => drop(tx.send(event)),
                Err(e) => warn!("watching the manifests folder: {e}"),
            })
            .context("creating a file watcher")?;
        watcher
            .watch(dir, notify::RecursiveMode::NonRecursive)
            .with_context(|| format!("watching {}", dir.display()))?;
        let mut resync = tokio::time::interval(resync);
        resync.reset();
        // After the watch: a change during the read is an event, read again afterwards.
        let (tx, rx) = oneshot::channel();
        let folder = dir.to_owned();
        let first_ranges = ranges.clone();
        std::thread::Builder::new()
            .name("manifests-read".into())
            .spawn(move || drop(tx.send(Folder::read_with(&folder, &first_ranges))))
            .context("starting the first read of the manifests folder")?;
        Ok(ManifestsSource {
            first: Some((Instant::now(), rx)),
            dir: dir.to_owned(),
            state: ClusterState::default(),
            folder: None,
            pending: Pending::default(),
            events,
            _watcher: watcher,
            resync,
            metrics,
            ranges,
            notes_logged: BTreeSet::new(),
            node_name,
        })
    }

    /// Logs the notes not logged before.
    fn log_notes<'a>(&mut self, notes: impl IntoIterator<Item = &'a ManifestNote>) {
        for note in notes {
            let text = note.to_string();
            if !self.notes_logged.contains(&text) {
                info!("{text}");
                self.notes_logged.insert(text);
            }
        }
    }

    /// Reads the whole folder; the changes against the current view, or `None` when it
    /// cannot be read.
    fn load(&mut self, since: Instant) -> Option<Changes> {
        let read = Folder::read_with(&self.dir, &self.ranges);
        self.absorb(since, read)
    }

    /// Takes in a whole read of the folder: the changes against the current view, or `None`
    /// when it failed.
    fn absorb(&mut self, since: Instant, read: FolderRead) -> Option<Changes> {
        match read {
            Ok((folder, set)) => {
                for e in &set.errors {
                    error!("{e}");
                }
                self.log_notes(&set.notes);
                self.metrics.connected();
                let mut changes = Changes::between(&self.state, &set.state, since);
                changes.node =
                    self.state.nodes.get(&self.node_name) != set.state.nodes.get(&self.node_name);
                self.state = set.state;
                self.folder = Some(folder);
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

    /// Reads what is due at `now`: the whole folder, or the files that are.
    fn read_due(&mut self, now: Instant) -> Option<Changes> {
        if let Some(first) = self.pending.all {
            if now < first + SETTLE {
                return None;
            }
            let since = self
                .pending
                .files
                .values()
                .map(|f| f.0)
                .fold(first, Instant::min);
            self.pending = Pending::default();
            debug!("manifests folder changed");
            return self.load(since);
        }
        let due: Vec<(PathBuf, Instant)> = self
            .pending
            .files
            .iter()
            .filter(|(_, (first, complete))| *complete || now >= *first + SETTLE)
            .map(|(path, (first, _))| (path.clone(), *first))
            .collect();
        let since = due.iter().map(|d| d.1).min()?;
        let mut changes = Changes::none(since);
        for (path, _) in due {
            self.pending.files.remove(&path);
            debug!(file = %path.display(), "manifest changed");
            let reread = match &mut self.folder {
                Some(folder) => folder.reread(&path, &mut self.state),
                None => None,
            };
            match reread {
                Some(file) => {
                    for e in &file.errors {
                        error!("{e}");
                    }
                    self.log_notes(&file.notes);
                    changes.services.extend(file.services);
                    changes.slices.extend(file.slices);
                    changes.node |= file.nodes.contains(&self.node_name);
                }
                None => {
                    debug!(
                        file = %path.display(),
                        "defines what another file does: reading the whole folder"
                    );
                    if let Some(whole) = self.load(since) {
                        changes.services.extend(whole.services);
                        changes.slices.extend(whole.slices);
                        changes.node |= whole.node;
                    }
                }
            }
        }
        Some(changes)
    }
}

impl Source for ManifestsSource {
    async fn changed(&mut self) -> anyhow::Result<Changes> {
        if self.folder.is_none() {
            // The first view must be complete: an unreadable folder at start is an error.
            let (since, read) = match self.first.take() {
                Some((since, first)) => match first.await {
                    Ok(read) => (since, read),
                    // The reading thread is gone without an answer: read here.
                    Err(_) => (since, Folder::read_with(&self.dir, &self.ranges)),
                },
                None => (Instant::now(), Folder::read_with(&self.dir, &self.ranges)),
            };
            return self
                .absorb(since, read)
                .with_context(|| format!("reading {}", self.dir.display()));
        }
        loop {
            while let Ok(event) = self.events.try_recv() {
                self.pending.note(&self.dir, event, Instant::now());
            }
            let now = Instant::now();
            if self.pending.due().is_some_and(|due| due <= now) {
                if let Some(changes) = self.read_due(now)
                    && !changes.is_empty()
                {
                    return Ok(changes);
                }
                continue;
            }
            let due = self.pending.due();
            tokio::select! {
                Some(event) = self.events.recv() => {
                    self.pending.note(&self.dir, event, Instant::now());
                }
                _ = sleep_until(due) => {}
                _ = self.resync.tick() => {
                    debug!("periodic resync");
                    self.pending.all = Some(Instant::now() - SETTLE);
                }
            }
        }
    }

    fn state(&self) -> &ClusterState {
        &self.state
    }

    fn node(&self) -> Option<&NodeFacts> {
        self.state.nodes.get(&self.node_name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.0.0.1, ports: [{port: 80}]}\n";

    fn slice(address: &str) -> String {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-1, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nendpoints: [{{addresses: [{address}]}}]\n"
        )
    }

    #[tokio::test]
    async fn a_file_renamed_into_the_folder_is_read_alone_at_once() {
        let root = std::env::temp_dir().join(format!("lb-manifests-source-{}", std::process::id()));
        let (dir, staging) = (root.join("dir"), root.join("staging"));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::create_dir_all(&staging).unwrap();
        std::fs::write(dir.join("a.yaml"), SERVICE).unwrap();
        std::fs::write(dir.join("b.yaml"), slice("10.1.0.1")).unwrap();
        let mut source = ManifestsSource::new(
            &dir,
            Duration::from_secs(3600),
            Arc::new(Metrics::new()),
            Ranges::default(),
            "node".into(),
        )
        .unwrap();
        let first = source.changed().await.unwrap();
        assert_eq!((first.services.len(), first.slices.len()), (1, 1));

        std::fs::write(staging.join("b.yaml"), slice("10.1.0.2")).unwrap();
        let at = Instant::now();
        std::fs::rename(staging.join("b.yaml"), dir.join("b.yaml")).unwrap();
        let changes = tokio::time::timeout(Duration::from_secs(5), source.changed())
            .await
            .unwrap()
            .unwrap();
        assert!(at.elapsed() < SETTLE, "read at once: {:?}", at.elapsed());
        assert!(changes.services.is_empty(), "{changes:?}");
        assert_eq!(changes.slices.len(), 1);
        let folder = source.folder.as_ref().unwrap();
        assert_eq!(folder.dir(), dir);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
