//! The manifests source: a folder of Kubernetes YAML/JSON manifests, for running without a
//! cluster.
//!
//! [`load_dir`] reads every `*.yaml`, `*.yml` and `*.json` file directly in the folder (not in
//! subfolders; names starting with `.` skipped, symlinks followed, so a mounted ConfigMap
//! works), in name order. A file holds one or more documents separated by `---` lines (JSON
//! files: one or more concatenated values); a document is one object or a `List` (`kind: List`,
//! or `ServiceList`/`EndpointSliceList`/`EndpointsList`) with `items`. Read are Service (v1),
//! EndpointSlice (discovery.k8s.io/v1) and Endpoints (v1, converted as the mirroring controller
//! does, see [`EndpointSlice::from_k8s_endpoints`]); an object without namespace is in
//! `default`. Objects of other kinds (an application's Deployment, ConfigMap, ...) are
//! skipped with a note ([`ManifestSet::notes`]), so that an application's folder works as it
//! is; a kind read here in another apiVersion (EndpointSlice discovery.k8s.io/v1beta1) is an
//! error.
//!
//! What an API server would fill in, a folder read whole ([`load_dir`], [`Folder`]) gets from
//! the allocators of [`super::allocate`]: cluster IPs, node ports and health check node
//! ports, each noted.
//!
//! Only an unreadable folder fails the whole load. Everything else is reported per object in
//! [`ManifestSet::errors`], each naming the file, the document, its first line and (when known)
//! kind, namespace and name; every valid object is still loaded. Two objects with the same
//! kind, namespace and name: the later one (file order, then document order) wins, and an
//! error names both places. An object that fails validation does not replace a valid one.
//!
//! Loading is a pure function of the folder's contents: the agent calls it again whenever the
//! folder changes and diffs the result.

#![deny(missing_docs)]

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt, fs, io,
    path::{Path, PathBuf},
};

use k8s_openapi::api::{core::v1 as core, discovery::v1 as discovery};
use serde::de::DeserializeOwned;
use serde_yaml_ng::{Mapping, Value};

use super::allocate::{self, Allocator, Ranges};
use crate::model::{
    ClusterState, DEFAULT_NAMESPACE, EndpointSlice, NodeFacts, ObjectRef, Service, ValidationError,
};

/// What a folder of manifests holds: the valid objects, and what was wrong with the rest.
#[derive(Debug, Default)]
pub struct ManifestSet {
    /// The Services and EndpointSlices read.
    pub state: ClusterState,
    /// One entry per object (or file, or document) that could not be used.
    pub errors: Vec<ManifestError>,
    /// Objects skipped on purpose, and what was allocated.
    pub notes: Vec<ManifestNote>,
}

/// Something the folder's reader did that is no error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ManifestNote {
    /// An object of a kind this source does not read was skipped.
    Skipped {
        /// Where.
        location: Location,
        /// Its apiVersion.
        api_version: String,
        /// Its kind.
        kind: String,
    },
    /// What the allocators did for a Service.
    Allocation(allocate::Note),
}

impl fmt::Display for ManifestNote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ManifestNote::Skipped {
                location,
                api_version,
                kind,
            } => write!(
                f,
                "{location}: skipped: lb reads Service (v1), EndpointSlice (discovery.k8s.io/v1), \
                 Endpoints (v1) and Node (v1), not {kind} ({api_version})"
            ),
            ManifestNote::Allocation(note) => note.fmt(f),
        }
    }
}

/// The folder itself cannot be listed.
#[derive(Debug, thiserror::Error)]
#[error("cannot read manifests folder {}", dir.display())]
pub struct LoadDirError {
    /// The folder.
    pub dir: PathBuf,
    /// Why.
    #[source]
    pub source: io::Error,
}

/// Kind, namespace and name of an object in a manifest.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ObjectId {
    /// kind.
    pub kind: String,
    /// metadata.namespace, `default` when absent.
    pub namespace: String,
    /// metadata.name; empty when absent.
    pub name: String,
}

/// Where an object (or a document, or a file) is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    /// The file.
    pub file: PathBuf,
    /// 1-based position of the document among the non-empty documents of the file; `None` for
    /// a problem with the whole file.
    pub document: Option<usize>,
    /// 1-based line where the document starts.
    pub line: Option<usize>,
    /// 0-based index in the `items` of a List.
    pub item: Option<usize>,
    /// The object, as far as it could be read.
    pub object: Option<ObjectId>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(d) = self.document {
            write!(f, " document {d}")?;
        }
        if let Some(l) = self.line {
            write!(f, " (line {l})")?;
        }
        if let Some(i) = self.item {
            write!(f, " items[{i}]")?;
        }
        if let Some(o) = &self.object {
            write!(f, " {} {}/{}", o.kind, o.namespace, o.name)?;
        }
        Ok(())
    }
}

/// An object, document or file of the folder that could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{location}: {kind}")]
pub struct ManifestError {
    /// Where.
    pub location: Location,
    /// What.
    #[source]
    pub kind: ManifestErrorKind,
}

/// What went wrong with a manifest.
#[derive(Debug, thiserror::Error)]
pub enum ManifestErrorKind {
    /// The file cannot be read.
    #[error("cannot read file: {0}")]
    Read(#[source] io::Error),
    /// The file is not UTF-8 text.
    #[error("not UTF-8 text")]
    NotUtf8,
    /// YAML syntax error (its line numbers count from the start of the file).
    #[error("invalid YAML: {0}")]
    Yaml(#[source] serde_yaml_ng::Error),
    /// JSON syntax error; the rest of the file is not read.
    #[error("invalid JSON: {0}")]
    Json(#[source] serde_json::Error),
    /// The document is not a mapping.
    #[error("not a Kubernetes object (expected a mapping with apiVersion and kind)")]
    NotAnObject,
    /// apiVersion or kind is missing or not a string.
    #[error("missing {field}")]
    MissingTypeField {
        /// `apiVersion` or `kind`.
        field: &'static str,
    },
    /// A kind this source reads, in an apiVersion it does not.
    #[error(
        "kind {kind} ({api_version}) is not read here; read are Service (v1), EndpointSlice \
         (discovery.k8s.io/v1), Endpoints (v1), Node (v1) and their Lists"
    )]
    UnsupportedKind {
        /// apiVersion.
        api_version: String,
        /// kind.
        kind: String,
    },
    /// A List inside a List.
    #[error("a List inside a List is not read")]
    NestedList,
    /// A List whose `items` is not a sequence.
    #[error("items: expected a sequence")]
    BadItems,
    /// The object does not have the shape of its kind.
    #[error("{path}: {message}")]
    Decode {
        /// Path of the offending field.
        path: String,
        /// What is wrong with it.
        message: String,
    },
    /// The object is well-formed but not valid.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// The same kind/namespace/name was defined before; this later definition replaces it.
    #[error("also defined at {previous}; this later definition is used")]
    Duplicate {
        /// Where the replaced definition is.
        previous: Box<Location>,
    },
}

/// Reads the manifests folder `dir`, allocating from Kubernetes' default ranges. See the
/// module documentation.
pub fn load_dir(dir: &Path) -> Result<ManifestSet, LoadDirError> {
    load_dir_with(dir, &Ranges::default())
}

/// Reads the manifests folder `dir`, allocating from `ranges`.
pub fn load_dir_with(dir: &Path, ranges: &Ranges) -> Result<ManifestSet, LoadDirError> {
    Folder::read_with(dir, ranges).map(|(_, set)| set)
}

/// Whether a file name is one of a manifest (`*.yaml`, `*.yml`, `*.json`, not hidden).
pub fn is_manifest_name(name: &str) -> bool {
    let ext = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
    !name.starts_with('.') && matches!(ext.as_deref(), Some("yaml" | "yml" | "json"))
}

/// Whether `path` is a manifest: its name is one, and it is not a folder (symlinks are
/// followed: ConfigMap volumes are symlinks to `..data/`).
fn is_manifest(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(is_manifest_name)
        && !fs::metadata(path).is_ok_and(|m| m.is_dir())
}

/// The manifests directly in `dir`, in name order.
fn manifest_files(dir: &Path) -> Result<Vec<PathBuf>, LoadDirError> {
    let err = |source| LoadDirError {
        dir: dir.to_owned(),
        source,
    };
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(err)? {
        let path = entry.map_err(err)?.path();
        if is_manifest(&path) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// A manifests folder read whole once ([`Folder::read`]), then file by file
/// ([`Folder::reread`]): it remembers which objects each file defines, so that a changed
/// file is read again alone and only its objects are replaced in the state.
///
/// The result equals [`load_dir`]'s whenever no object is defined in two files; when a
/// changed file holds (or held) an object that another file defines too, which one wins
/// depends on the other files, and [`Folder::reread`] asks for a whole read instead.
#[derive(Debug, Default)]
pub struct Folder {
    dir: PathBuf,
    /// The valid objects each file defines.
    files: BTreeMap<PathBuf, BTreeSet<ObjectId>>,
    /// Each defined object: in how many files, and what it put in the state.
    objects: BTreeMap<ObjectId, Defined>,
    /// What the Services that lack values got.
    allocator: Allocator,
}

#[derive(Debug)]
struct Defined {
    files: u32,
    /// The Service, or the EndpointSlices (an Endpoints object converts to several; their
    /// names cannot collide with an EndpointSlice's, see
    /// [`EndpointSlice::from_k8s_endpoints`]), of the definition that is in the state.
    produced: Produced,
}

#[derive(Debug, Clone)]
enum Produced {
    Service(ObjectRef),
    Slices(Vec<ObjectRef>),
    Node(String),
}

impl Parsed {
    fn produced(&self) -> Produced {
        match self {
            Parsed::Service(s) => Produced::Service(s.id.clone()),
            Parsed::Slices(slices) => {
                Produced::Slices(slices.iter().map(|s| s.id.clone()).collect())
            }
            Parsed::Node(name, _) => Produced::Node(name.clone()),
        }
    }
}

/// What [`Folder::reread`] changed in the state.
#[derive(Debug, Default)]
pub struct FileChanges {
    /// Services added, modified or removed.
    pub services: BTreeSet<ObjectRef>,
    /// EndpointSlices added, modified or removed.
    pub slices: BTreeSet<ObjectRef>,
    /// Nodes added, modified or removed.
    pub nodes: BTreeSet<String>,
    /// What was wrong in the file.
    pub errors: Vec<ManifestError>,
    /// Objects of the file skipped, and what was allocated anew (for any Service).
    pub notes: Vec<ManifestNote>,
}

impl Folder {
    /// Reads every manifest of `dir` (as [`load_dir`]) and remembers where each object is.
    pub fn read(dir: &Path) -> Result<(Folder, ManifestSet), LoadDirError> {
        Self::read_with(dir, &Ranges::default())
    }

    /// [`Folder::read`], allocating from `ranges`.
    pub fn read_with(dir: &Path, ranges: &Ranges) -> Result<(Folder, ManifestSet), LoadDirError> {
        let mut loader = Loader::default();
        for file in &manifest_files(dir)? {
            loader.read(file);
        }
        let mut objects: BTreeMap<ObjectId, Defined> = loader
            .objects
            .iter()
            .map(|(id, (_, parsed))| {
                let produced = parsed.produced();
                (id.clone(), Defined { files: 0, produced })
            })
            .collect();
        for id in loader.defined.values().flatten() {
            if let Some(defined) = objects.get_mut(id) {
                defined.files += 1;
            }
        }
        let mut folder = Folder {
            dir: dir.to_owned(),
            files: std::mem::take(&mut loader.defined),
            objects,
            allocator: Allocator::new(ranges.clone()),
        };
        let mut set = loader.finish();
        let services: Vec<ObjectRef> = set.state.services.keys().cloned().collect();
        let allocated = folder.allocator.update(&mut set.state, &services);
        set.notes
            .extend(allocated.notes.into_iter().map(ManifestNote::Allocation));
        Ok((folder, set))
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads `file` of the folder again (gone, or no longer a manifest: it defines nothing)
    /// and puts what it defines now in `state` in place of what it defined before. `None`
    /// (nothing changed) when an object it defines, now or before, is defined in another
    /// file too: then only a whole read gets the result right.
    pub fn reread(&mut self, file: &Path, state: &mut ClusterState) -> Option<FileChanges> {
        let mut loader = Loader::default();
        if is_manifest(file) {
            loader.read(file);
        }
        let before = self.files.get(file).cloned().unwrap_or_default();
        let after: BTreeSet<ObjectId> = loader.objects.keys().cloned().collect();
        let elsewhere = |id: &ObjectId| {
            self.objects
                .get(id)
                .is_some_and(|d| d.files > u32::from(before.contains(id)))
        };
        if before.iter().chain(&after).any(elsewhere) {
            return None;
        }
        let mut changes = FileChanges::default();
        let mut old_services = BTreeMap::new();
        let mut old_slices = BTreeMap::new();
        let mut old_nodes = BTreeMap::new();
        for id in &before {
            match self.objects.remove(id).map(|d| d.produced) {
                Some(Produced::Service(r)) => {
                    old_services.extend(state.services.remove_entry(&r));
                    changes.services.insert(r);
                }
                Some(Produced::Slices(refs)) => {
                    for r in refs {
                        old_slices.extend(state.slices.remove_entry(&r));
                        changes.slices.insert(r);
                    }
                }
                Some(Produced::Node(name)) => {
                    old_nodes.extend(state.nodes.remove_entry(&name));
                    changes.nodes.insert(name);
                }
                None => {}
            }
        }
        for (id, (_, parsed)) in loader.objects {
            let produced = parsed.produced();
            match parsed {
                Parsed::Service(s) => {
                    changes.services.insert(s.id.clone());
                    state.insert_service(*s);
                }
                Parsed::Slices(slices) => {
                    for s in slices {
                        changes.slices.insert(s.id.clone());
                        state.insert_slice(s);
                    }
                }
                Parsed::Node(name, facts) => {
                    changes.nodes.insert(name.clone());
                    state.nodes.insert(name, facts);
                }
            }
            self.objects.insert(id, Defined { files: 1, produced });
        }
        // What the changed Services lack, and what other Services' allocations that moves.
        let allocated = self.allocator.update(state, &changes.services);
        changes.services.extend(allocated.moved.keys().cloned());
        old_services.extend(allocated.moved);
        changes.notes = loader.notes;
        changes
            .notes
            .extend(allocated.notes.into_iter().map(ManifestNote::Allocation));
        changes
            .services
            .retain(|r| old_services.get(r) != state.services.get(r));
        changes
            .slices
            .retain(|r| old_slices.get(r) != state.slices.get(r));
        changes
            .nodes
            .retain(|n| old_nodes.get(n) != state.nodes.get(n));
        if after.is_empty() {
            self.files.remove(file);
        } else {
            self.files.insert(file.to_owned(), after);
        }
        changes.errors = loader.errors;
        Some(changes)
    }
}

/// Documents of a file with more than this many are parsed on several threads.
const PARALLEL_DOCUMENTS: usize = 256;
/// Documents parsed together (on several threads) before they are read.
const PARALLEL_BATCH: usize = 1024;

/// Parses each document, in order; a large file's on as many threads as there are CPUs
/// (each a contiguous run of documents): the YAML parse is most of the time of reading a
/// folder of thousands of Services.
fn parse_documents(chunks: &[(usize, &str)]) -> Vec<Result<Value, serde_yaml_ng::Error>> {
    let parse = |run: &[(usize, &str)]| -> Vec<Result<Value, serde_yaml_ng::Error>> {
        run.iter()
            .map(|(_, c)| serde_yaml_ng::from_str(c))
            .collect()
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if threads < 2 || chunks.len() <= PARALLEL_DOCUMENTS {
        return parse(chunks);
    }
    let per_thread = chunks.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = chunks
            .chunks(per_thread)
            .map(|run| scope.spawn(move || parse(run)))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| {
                // A panic in the parser is a bug; it propagates as if parsed here.
                h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
            })
            .collect()
    })
}

/// Reads manifests from text, as if it were the file `file` (for stdin, tests and tools).
pub fn load_str(file: &Path, text: &str) -> ManifestSet {
    let mut loader = Loader::default();
    loader.file(file, text.as_bytes());
    loader.finish()
}

impl Location {
    fn file(file: &Path) -> Self {
        Location {
            file: file.to_owned(),
            document: None,
            line: None,
            item: None,
            object: None,
        }
    }
}

/// A usable object, keyed for duplicate detection.
enum Parsed {
    Service(Box<Service>),
    Slices(Vec<EndpointSlice>),
    Node(String, NodeFacts),
}

#[derive(Default)]
struct Loader {
    objects: BTreeMap<ObjectId, (Location, Parsed)>,
    /// The objects each file defines validly.
    defined: BTreeMap<PathBuf, BTreeSet<ObjectId>>,
    errors: Vec<ManifestError>,
    notes: Vec<ManifestNote>,
}

impl Loader {
    /// Reads one file (an unreadable one is an error and defines nothing).
    fn read(&mut self, file: &Path) {
        match fs::read(file) {
            Ok(bytes) => self.file(file, &bytes),
            // Removed since the folder was listed: it defines nothing.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => self.error(Location::file(file), ManifestErrorKind::Read(e)),
        }
    }

    fn error(&mut self, location: Location, kind: ManifestErrorKind) {
        self.errors.push(ManifestError { location, kind });
    }

    fn file(&mut self, file: &Path, bytes: &[u8]) {
        let Ok(text) = std::str::from_utf8(bytes) else {
            return self.error(Location::file(file), ManifestErrorKind::NotUtf8);
        };
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let is_json = file
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("json"));
        if is_json {
            self.json_file(file, text)
        } else {
            self.yaml_file(file, text)
        }
    }

    fn yaml_file(&mut self, file: &Path, text: &str) {
        let mut document = 0;
        let chunks = split_yaml_documents(text);
        // In batches, so that only one batch of parsed documents is held at a time.
        let parsed = chunks
            .chunks(PARALLEL_BATCH)
            .flat_map(|batch| batch.iter().copied().zip(parse_documents(batch)));
        for ((line, chunk), parsed) in parsed {
            let value: Value = match parsed {
                Ok(v) => v,
                Err(first) => {
                    document += 1;
                    let location = Location {
                        document: Some(document),
                        line: Some(line),
                        ..Location::file(file)
                    };
                    // Parse again with the lines before the document blanked out, so that the
                    // error's line numbers count from the start of the file. Errors are rare;
                    // the parse that succeeds does not pay for this.
                    let padded = "\n".repeat(line - 1) + chunk;
                    let err = serde_yaml_ng::from_str::<Value>(&padded)
                        .err()
                        .unwrap_or(first);
                    self.error(location, ManifestErrorKind::Yaml(err));
                    continue;
                }
            };
            if value.is_null() {
                continue; // empty document, comments only
            }
            document += 1;
            let location = Location {
                document: Some(document),
                line: Some(line),
                ..Location::file(file)
            };
            self.document(location, value);
        }
    }

    fn json_file(&mut self, file: &Path, text: &str) {
        let mut document = 0;
        let mut stream = serde_json::Deserializer::from_str(text).into_iter::<serde_json::Value>();
        let (mut counted, mut line) = (0, 1);
        loop {
            // The line of the next value: skip the whitespace before it, counting newlines.
            let start = stream.byte_offset();
            let ws = text[start..].len() - text[start..].trim_start().len();
            line += text[counted..start + ws].matches('\n').count();
            counted = start + ws;
            let Some(next) = stream.next() else { break };
            document += 1;
            let location = Location {
                document: Some(document),
                line: Some(line),
                ..Location::file(file)
            };
            match next.map(serde_yaml_ng::to_value) {
                Ok(Ok(value)) => self.document(location, value),
                Ok(Err(e)) => self.error(location, ManifestErrorKind::Yaml(e)),
                Err(e) => return self.error(location, ManifestErrorKind::Json(e)),
            }
        }
    }

    /// One document: an object or a List.
    fn document(&mut self, location: Location, value: Value) {
        let Value::Mapping(mut map) = value else {
            return self.error(location, ManifestErrorKind::NotAnObject);
        };
        let (api_version, kind) = match type_meta(&map) {
            Ok(tm) => tm,
            Err(e) => return self.error(location, e),
        };
        if !is_list_kind(&kind) {
            return self.object(location, map, &api_version, &kind);
        }
        // "ServiceList" -> "Service"; None for a plain List.
        let item_kind = kind.strip_suffix("List").filter(|k| !k.is_empty());
        let items = match map.remove("items") {
            None | Some(Value::Null) => return, // an empty List
            Some(Value::Sequence(items)) => items,
            Some(_) => return self.error(location, ManifestErrorKind::BadItems),
        };
        for (i, item) in items.into_iter().enumerate() {
            let location = Location {
                item: Some(i),
                ..location.clone()
            };
            let Value::Mapping(mut item) = item else {
                self.error(location, ManifestErrorKind::NotAnObject);
                continue;
            };
            // Items of a typed List (as the API returns them) may leave out apiVersion and kind.
            if let Some(k) = item_kind {
                item.entry("apiVersion".into())
                    .or_insert_with(|| api_version.as_str().into());
                item.entry("kind".into()).or_insert_with(|| k.into());
            }
            match type_meta(&item) {
                Ok((_, k)) if is_list_kind(&k) => {
                    self.error(location, ManifestErrorKind::NestedList)
                }
                Ok((v, k)) => self.object(location, item, &v, &k),
                Err(e) => self.error(location, e),
            }
        }
    }

    /// One object.
    fn object(&mut self, mut location: Location, map: Mapping, api_version: &str, kind: &str) {
        let meta = map.get("metadata");
        let meta_str = |key: &str| {
            meta.and_then(|m| m.get(key))
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
        };
        let id = ObjectId {
            kind: kind.to_owned(),
            namespace: meta_str("namespace")
                .unwrap_or(DEFAULT_NAMESPACE)
                .to_owned(),
            name: meta_str("name").unwrap_or_default().to_owned(),
        };
        location.object = Some(id.clone());
        let value = Value::Mapping(map);
        let parsed = match (api_version, kind) {
            ("v1", "Service") => topology_keys(&value).and_then(|keys| {
                let s = decode::<core::Service>(value)?;
                let s = Service::from_k8s_with_topology_keys(&s, &keys)?;
                Ok(Parsed::Service(Box::new(s)))
            }),
            ("discovery.k8s.io/v1", "EndpointSlice") => decode::<discovery::EndpointSlice>(value)
                .and_then(|s| Ok(Parsed::Slices(vec![EndpointSlice::from_k8s(&s)?]))),
            ("v1", "Endpoints") => decode::<core::Endpoints>(value)
                .and_then(|e| Ok(Parsed::Slices(EndpointSlice::from_k8s_endpoints(&e)?))),
            ("v1", "Node") => decode::<core::Node>(value).and_then(|n| {
                Ok(Parsed::Node(
                    NodeFacts::name_of(&n)?,
                    NodeFacts::from_k8s(&n),
                ))
            }),
            (_, "Service" | "EndpointSlice" | "Endpoints" | "Node") => {
                Err(ManifestErrorKind::UnsupportedKind {
                    api_version: api_version.into(),
                    kind: kind.into(),
                })
            }
            _ => {
                self.notes.push(ManifestNote::Skipped {
                    location,
                    api_version: api_version.into(),
                    kind: kind.into(),
                });
                return;
            }
        };
        match parsed {
            Err(e) => self.error(location, e),
            Ok(parsed) => {
                self.defined
                    .entry(location.file.clone())
                    .or_default()
                    .insert(id.clone());
                if let Some((previous, _)) = self.objects.insert(id, (location.clone(), parsed)) {
                    self.error(
                        location,
                        ManifestErrorKind::Duplicate {
                            previous: Box::new(previous),
                        },
                    );
                }
            }
        }
    }

    fn finish(self) -> ManifestSet {
        let mut state = ClusterState::default();
        for (_, parsed) in self.objects.into_values() {
            match parsed {
                Parsed::Service(s) => state.insert_service(*s),
                Parsed::Slices(slices) => slices.into_iter().for_each(|s| state.insert_slice(s)),
                Parsed::Node(name, facts) => {
                    state.nodes.insert(name, facts);
                }
            }
        }
        ManifestSet {
            state,
            errors: self.errors,
            notes: self.notes,
        }
    }
}

/// `spec.topologyKeys` of a Service (which k8s-openapi's Service, of Kubernetes 1.22 and
/// later, does not have).
fn topology_keys(service: &Value) -> Result<Vec<String>, ManifestErrorKind> {
    let keys = service
        .get("spec")
        .and_then(|spec| spec.get("topologyKeys"));
    let bad = || ManifestErrorKind::Decode {
        path: "spec.topologyKeys".into(),
        message: "expected a sequence of strings".into(),
    };
    match keys {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Sequence(keys)) => keys
            .iter()
            .map(|k| k.as_str().map(str::to_owned).ok_or_else(bad))
            .collect(),
        Some(_) => Err(bad()),
    }
}

/// apiVersion and kind.
fn type_meta(map: &Mapping) -> Result<(String, String), ManifestErrorKind> {
    let field = |field: &'static str| {
        map.get(field)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .ok_or(ManifestErrorKind::MissingTypeField { field })
    };
    Ok((field("apiVersion")?, field("kind")?))
}

fn is_list_kind(kind: &str) -> bool {
    matches!(
        kind,
        "List" | "ServiceList" | "EndpointsList" | "EndpointSliceList"
    )
}

fn decode<T: DeserializeOwned>(value: Value) -> Result<T, ManifestErrorKind> {
    serde_path_to_error::deserialize(value).map_err(|e| ManifestErrorKind::Decode {
        path: e.path().to_string(),
        message: e.into_inner().to_string(),
    })
}

/// Splits YAML text at document markers (`---` at the start of a line, possibly followed by
/// content; `...` ends a document). Returns each document with the 1-based line it starts on.
fn split_yaml_documents(text: &str) -> Vec<(usize, &str)> {
    let mut docs = Vec::new();
    let mut start = 0; // byte offset of the current document
    let mut start_line = 1;
    let mut offset = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let content = line.trim_end_matches(['\n', '\r']);
        let is_start = content
            .strip_prefix("---")
            .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t']));
        let is_end = content.trim_end() == "...";
        if is_start || is_end {
            docs.push((start_line, &text[start..offset]));
            // Content after `--- ` belongs to the next document.
            start = if is_start {
                offset + 3
            } else {
                offset + line.len()
            };
            start_line = i + 1;
            if is_end {
                start_line += 1;
            }
        }
        offset += line.len();
    }
    docs.push((start_line, &text[start..]));
    docs
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use std::time::Instant;

    use super::*;
    use crate::model::ClusterIp;

    const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.0.0.1, ports: [{port: 80}]}\n";
    const SLICE: &str = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nendpoints: [{addresses: [10.1.0.1]}]\nports: [{port: 8080}]\n";

    fn load(text: &str) -> ManifestSet {
        load_str(Path::new("in.yaml"), text)
    }

    fn messages(set: &ManifestSet) -> Vec<String> {
        set.errors.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn splits_documents() {
        let text = "a: 1\n---\nb: 2\n--- {c: 3}\n...\n---\n---x: 1\n";
        let docs = split_yaml_documents(text);
        assert_eq!(
            docs,
            vec![
                (1, "a: 1\n"),
                (2, "\nb: 2\n"),
                (4, " {c: 3}\n"),
                (6, ""),
                (6, "\n---x: 1\n")
            ]
        );
    }

    #[test]
    fn reads_objects_with_defaults() {
        let set = load(&format!("---\n{SERVICE}---\n# comment only\n---\n{SLICE}"));
        assert!(set.errors.is_empty(), "{:?}", messages(&set));
        let svc = &set.state.services[&ObjectRef::new("default", "web")];
        assert_eq!(
            svc.cluster_ip,
            ClusterIp::Assigned(crate::model::ClusterIps {
                v4: Some(Ipv4Addr::new(10, 0, 0, 1)),
                v6: None
            })
        );
        let slice = &set.state.slices[&ObjectRef::new("default", "web-1")];
        assert_eq!(slice.endpoints[0].address, Ipv4Addr::new(10, 1, 0, 1));
    }

    #[test]
    fn reads_lists() {
        let text = format!(
            "apiVersion: v1\nkind: List\nitems:\n- {}\n- {{apiVersion: apps/v1, kind: Deployment, metadata: {{name: d}}}}\n- 5\n- {{apiVersion: v1, kind: List}}\n\
             - {{apiVersion: discovery.k8s.io/v1beta1, kind: EndpointSlice, metadata: {{name: e}}}}\n",
            serde_json::to_string(&serde_yaml_ng::from_str::<serde_json::Value>(SERVICE).unwrap())
                .unwrap()
        );
        let set = load(&text);
        assert_eq!(set.state.services.len(), 1);
        assert_eq!(
            messages(&set),
            vec![
                "in.yaml document 1 (line 1) items[2]: not a Kubernetes object (expected a mapping with apiVersion and kind)",
                "in.yaml document 1 (line 1) items[3]: a List inside a List is not read",
                "in.yaml document 1 (line 1) items[4] EndpointSlice default/e: kind EndpointSlice (discovery.k8s.io/v1beta1) is not read here; read are Service (v1), EndpointSlice (discovery.k8s.io/v1), Endpoints (v1), Node (v1) and their Lists",
            ]
        );
        // Kinds lb does not read are skipped, with a note.
        assert_eq!(
            set.notes
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            [
                "in.yaml document 1 (line 1) items[1] Deployment default/d: skipped: lb reads Service (v1), EndpointSlice (discovery.k8s.io/v1), Endpoints (v1) and Node (v1), not Deployment (apps/v1)"
            ]
        );
        // Items of a typed list may omit apiVersion and kind.
        let set = load(
            "apiVersion: v1\nkind: ServiceList\nitems: [{metadata: {name: a}}, {metadata: {name: b}}]\n",
        );
        assert!(set.errors.is_empty(), "{:?}", messages(&set));
        assert_eq!(set.state.services.len(), 2);
    }

    #[test]
    fn topology_keys_and_nodes_are_read() {
        let set = load(
            "apiVersion: v1\nkind: Service\nmetadata: {name: t}\n\
             spec: {clusterIP: 10.0.0.1, topologyKeys: [kubernetes.io/hostname, '*'], ports: [{port: 80}]}\n\
             ---\napiVersion: v1\nkind: Service\nmetadata: {name: bad}\nspec: {topologyKeys: nope}\n\
             ---\napiVersion: v1\nkind: Service\nmetadata: {name: local}\n\
             spec: {type: NodePort, externalTrafficPolicy: Local, topologyKeys: ['*'], ports: [{port: 80}]}\n\
             ---\napiVersion: v1\nkind: Node\nmetadata: {name: n1, labels: {topology.kubernetes.io/region: r1}}\n\
             status: {addresses: [{type: InternalIP, address: 10.200.0.1}]}\n",
        );
        let t = &set.state.services[&ObjectRef::new("default", "t")];
        assert_eq!(t.topology_keys, ["kubernetes.io/hostname", "*"]);
        assert_eq!(
            messages(&set),
            [
                "in.yaml document 2 (line 5) Service default/bad: spec.topologyKeys: expected a sequence of strings",
                "in.yaml document 3 (line 10) Service default/local: spec.topologyKeys: Forbidden: may not be specified when `externalTrafficPolicy=Local`",
            ]
        );
        let n1 = &set.state.nodes["n1"];
        assert_eq!(n1.labels["topology.kubernetes.io/region"], "r1");
        assert_eq!(n1.addresses, [IpAddr::from(Ipv4Addr::new(10, 200, 0, 1))]);
    }

    #[test]
    fn per_object_errors_keep_the_rest() {
        let text = format!(
            "{SERVICE}---\nkind: Service\nmetadata: {{name: x}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: bad, namespace: shop}}\nspec: {{ports: [{{port: 70000}}]}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: worse}}\nspec: {{ports: [{{port: eighty}}]}}\n---\nkey: [unclosed\n---\n{SLICE}"
        );
        let set = load(&text);
        assert_eq!(set.state.services.len(), 1);
        assert_eq!(set.state.slices.len(), 1);
        assert_eq!(
            messages(&set),
            vec![
                "in.yaml document 2 (line 5): missing apiVersion",
                "in.yaml document 3 (line 8) Service shop/bad: spec.ports[0].port: 70000 is out of range 1-65535",
                "in.yaml document 4 (line 13) Service default/worse: spec.ports[0].port: invalid type: string \"eighty\", expected i32",
                "in.yaml document 5 (line 18): invalid YAML: did not find expected ',' or ']' at line 20 column 1, while parsing a flow sequence at line 19 column 6",
            ]
        );
        assert!(matches!(
            &set.errors[1].kind,
            ManifestErrorKind::Invalid(ValidationError::OutOfRange { value: 70000, .. })
        ));
    }

    #[test]
    fn a_large_file_is_read_on_threads_with_the_same_result_and_locations() {
        // More documents than PARALLEL_DOCUMENTS and more than one PARALLEL_BATCH, with an
        // invalid document in the second batch.
        let n = PARALLEL_BATCH + 300;
        let bad = PARALLEL_BATCH + 100;
        let mut text = String::new();
        for i in 0..n {
            if i == bad {
                text += "---\nkey: [unclosed\n";
            } else {
                text += &format!(
                    "---\n{}",
                    SERVICE.replace("name: web", &format!("name: web{i}"))
                );
            }
        }
        let set = load(&text);
        assert_eq!(set.state.services.len(), n - 1);
        assert!(
            set.state
                .services
                .contains_key(&ObjectRef::new("default", format!("web{}", n - 1)))
        );
        // Each Service document is 5 lines (its `---` and four), so document k starts at
        // line 5(k - 1) + 1.
        let line = 5 * bad + 1;
        assert_eq!(
            messages(&set),
            vec![format!(
                "in.yaml document {} (line {line}): invalid YAML: did not find expected ',' or ']' at line {} column 1, while parsing a flow sequence at line {} column 6",
                bad + 1,
                line + 2,
                line + 1
            )]
        );
    }

    #[test]
    fn duplicates_later_wins() {
        let dir = tempdir("dup");
        fs::write(dir.join("a.yaml"), SERVICE).unwrap();
        fs::write(dir.join("b.yml"), SERVICE.replace("10.0.0.1", "10.0.0.2")).unwrap();
        let set = load_dir(&dir).unwrap();
        let svc = &set.state.services[&ObjectRef::new("default", "web")];
        assert_eq!(
            svc.cluster_ip,
            ClusterIp::Assigned(crate::model::ClusterIps {
                v4: Some(Ipv4Addr::new(10, 0, 0, 2)),
                v6: None
            })
        );
        let d = dir.display();
        assert_eq!(
            messages(&set),
            vec![format!(
                "{d}/b.yml document 1 (line 1) Service default/web: also defined at {d}/a.yaml document 1 \
                 (line 1) Service default/web; this later definition is used"
            )]
        );
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn folder_rules() {
        let dir = tempdir("folder");
        fs::write(dir.join("b.yaml"), SLICE).unwrap();
        fs::write(
            dir.join("a.JSON"),
            serde_json::to_string(&serde_yaml_ng::from_str::<serde_json::Value>(SERVICE).unwrap())
                .unwrap(),
        )
        .unwrap();
        fs::write(dir.join(".hidden.yaml"), "garbage: [").unwrap();
        fs::write(dir.join("notes.txt"), "garbage: [").unwrap();
        fs::create_dir(dir.join("sub.yaml")).unwrap();
        fs::write(dir.join("sub.yaml/c.yaml"), SERVICE).unwrap();
        let set = load_dir(&dir).unwrap();
        assert!(set.errors.is_empty(), "{:?}", messages(&set));
        assert_eq!(set.state.services.len(), 1);
        assert_eq!(set.state.slices.len(), 1);

        let missing = dir.join("missing");
        let err = load_dir(&missing).unwrap_err();
        assert_eq!(err.source.kind(), io::ErrorKind::NotFound);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn json_streams() {
        let set = load_str(
            Path::new("x.json"),
            "{\"apiVersion\": \"v1\", \"kind\": \"Service\", \"metadata\": {\"name\": \"a\"}}\n\n{\"apiVersion\": \"v1\", \"kind\": \"Service\", \"metadata\": {\"name\": \"b\"}} {oops",
        );
        assert_eq!(set.state.services.len(), 2);
        assert_eq!(
            messages(&set),
            vec![
                "x.json document 3 (line 3): invalid JSON: key must be a string at line 3 column 69"
            ]
        );
    }

    #[test]
    fn never_panics_on_garbage() {
        let long_nesting = "[".repeat(10_000);
        let deep_map = "a:\n".to_owned()
            + &(1..200)
                .map(|i| format!("{}a:\n", " ".repeat(i)))
                .collect::<String>();
        let inputs: Vec<String> = vec![
            String::new(),
            "---".into(),
            "---\n---\n...\n".into(),
            "\u{feff}".into(),
            "\0\0\0".into(),
            "\t\tkey: value".into(),
            long_nesting.clone(),
            deep_map,
            "&a [*a]".into(),
            "a: &x 1\nb: *y\n".into(),
            "apiVersion: v1\nkind: Service\n".into(),
            "apiVersion: v1\nkind: Service\nmetadata: 5\n".into(),
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: [1, 2]\n".into(),
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {ports: {port: 1}}\n".into(),
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 99999999999}]}\n".into(),
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nstatus: {loadBalancer: {ingress: [{ip: [1]}]}}\n".into(),
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: a}\nendpoints: 7\n".into(),
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: a}\naddressType: IPv4\nendpoints: [{addresses: [1.2.3.4], conditions: {ready: maybe}}]\n".into(),
            "apiVersion: v1\nkind: Endpoints\nmetadata: {name: a}\nsubsets: [{addresses: [{ip: 1.2.3.4}], ports: [{port: -5}]}]\n".into(),
            "apiVersion: 1\nkind: true\n".into(),
            "apiVersion: v1\nkind: List\nitems: 5\n".into(),
            "apiVersion: v1\nkind: List\nitems: [[], null, {kind: Service}]\n".into(),
            "? [a, b]\n: c\n".into(),
            "!!binary aGVsbG8=".into(),
            "x: !custom {a: 1}".into(),
            "%YAML 1.2\n---\na: 1\n".into(),
        ];
        for input in &inputs {
            let set = load(input);
            assert!(
                set.state.services.is_empty() && set.state.slices.is_empty(),
                "{input:?}"
            );
            let _ = messages(&set);
        }
        // Binary junk: not UTF-8, and UTF-8 control characters.
        let dir = tempdir("junk");
        fs::write(dir.join("junk.yaml"), [0xff, 0xfe, 0x00, 0x81, b'\n', 0xc3]).unwrap();
        fs::write(dir.join("junk.json"), "\u{1}\u{2}{\"a\":").unwrap();
        fs::write(dir.join("nest.json"), &long_nesting).unwrap();
        let set = load_dir(&dir).unwrap();
        assert_eq!(set.errors.len(), 3);
        assert!(matches!(set.errors[0].kind, ManifestErrorKind::Json(_)));
        assert!(matches!(set.errors[1].kind, ManifestErrorKind::NotUtf8));
        assert!(matches!(set.errors[2].kind, ManifestErrorKind::Json(_)));
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn rereading_one_file_equals_reading_the_folder() {
        // A fixed pseudo-random walk: files hold Services and EndpointSlices (valid or not,
        // sometimes one defined in two files), are rewritten and removed; after each step
        // the file alone is read again, or the whole folder when it says so.
        let dir = tempdir("reread");
        let mut next = crate::testutil::walk(0x1234_5678);
        let object = |kind: u32, name: u32, variant: u32| match kind {
            0 => format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: s{name}}}\n\
                 spec: {{clusterIP: 10.0.0.{name}, ports: [{{port: {}}}]}}\n",
                80 + variant
            ),
            1 => format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{name}-1, \
                 labels: {{kubernetes.io/service-name: s{name}}}}}\naddressType: IPv4\n\
                 endpoints: [{{addresses: [10.1.0.{variant}]}}]\n"
            ),
            2 => format!(
                "apiVersion: v1\nkind: Endpoints\nmetadata: {{name: e{name}}}\n\
                 subsets: [{{addresses: [{{ip: 10.2.0.{variant}}}], ports: [{{port: 80}}]}}]\n"
            ),
            // Without a cluster IP or node port: allocated, from ranges with room for 6.
            3 => format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: s{name}}}\n\
                 spec: {{type: NodePort, ports: [{{port: {}}}]}}\n",
                80 + variant
            ),
            _ => format!("apiVersion: v1\nkind: Service\nmetadata: {{name: s{name}}}\nspec: 5\n"),
        };
        let ranges = Ranges::new(vec!["10.0.0.0/29".parse().unwrap()], 30000..=30005).unwrap();
        let (mut folder, set) = Folder::read_with(&dir, &ranges).unwrap();
        let mut state = set.state;
        let (mut whole_reads, mut allocated) = (0, 0);
        for step in 0..400 {
            let file = dir.join(format!("f{}.yaml", next(5)));
            if next(6) == 0 {
                let _ = fs::remove_file(&file);
            } else {
                let docs: Vec<String> = (0..next(4))
                    .map(|_| object(next(5), next(12), next(3)))
                    .collect();
                fs::write(&file, docs.join("---\n")).unwrap();
            }
            let whole = load_dir_with(&dir, &ranges).unwrap().state;
            let before = state.clone();
            match folder.reread(&file, &mut state) {
                Some(changes) => {
                    let want = crate::source::Changes::between(&before, &whole, Instant::now());
                    assert_eq!(changes.services, want.services, "step {step}");
                    assert_eq!(changes.slices, want.slices, "step {step}");
                }
                None => {
                    whole_reads += 1;
                    let (f, set) = Folder::read_with(&dir, &ranges).unwrap();
                    (folder, state) = (f, set.state);
                }
            }
            assert_eq!(state.services, whole.services, "step {step}");
            assert_eq!(state.slices, whole.slices, "step {step}");
            let net = "10.0.0.0/29".parse::<crate::model::IpCidr>().unwrap();
            allocated += state
                .services
                .values()
                .filter(|s| matches!(s.cluster_ip, ClusterIp::Assigned(ips) if ips.v4.is_some_and(|ip| net.contains(ip.into()))))
                .count();
        }
        assert!((1..200).contains(&whole_reads), "{whole_reads} whole reads");
        assert!(
            allocated > 400,
            "the walk allocated ({allocated} allocated Services seen)"
        );
        fs::remove_dir_all(dir).unwrap();
    }

    fn tempdir(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("lb-manifest-test-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }
}
