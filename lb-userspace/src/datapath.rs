//! The eBPF side as seen from userspace: loading the embedded programs with their maps pinned
//! under one directory, attaching them to an interface through pinned links (so they keep
//! running when the agent exits), the maps themselves, and tearing it all down.
//!
//! Pin layout under the pin directory (default `/sys/fs/bpf/lb`):
//! - one file per map, named as in [`lb_common::map_names`];
//! - `links/xdp_ingress@<interface>` and `links/tc_egress@<interface>`.

use std::{
    io,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, Map, MapData, MapError, PerCpuArray, PerCpuValues},
    programs::{
        ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, LinkError},
    },
};
use lb_common::{
    Backend4, Frontend4, RevNat4, Service, ServiceStats, SlotKey, capacity, map_names,
    program_names,
};
use thiserror::Error;
use tracing::{info, warn};

use crate::{
    sync::{DatapathMaps, MapContents, MapOpError},
    sys,
};

/// The default pin directory.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/lb";

/// Errors of loading, attaching and opening the datapath.
#[derive(Debug, Error)]
pub enum DatapathError {
    /// The pin directory could not be prepared.
    #[error("pin directory {path}: {source}")]
    PinDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The embedded object could not be loaded (maps created, programs parsed).
    #[error("loading the eBPF object (maps pinned in {pin_dir}): {source}")]
    Load {
        /// The pin directory.
        pin_dir: PathBuf,
        /// Why.
        #[source]
        source: Box<aya::EbpfError>,
    },
    /// A program is missing from the object or failed verification.
    #[error("program {name}: {source}")]
    Program {
        /// The program.
        name: &'static str,
        /// Why.
        #[source]
        source: Box<ProgramError>,
    },
    /// No such network interface.
    #[error("interface {name:?} does not exist in this network namespace")]
    UnknownInterface {
        /// The name given.
        name: String,
    },
    /// Attaching failed.
    #[error("attaching {program} to {interface}: {source}")]
    Attach {
        /// The program.
        program: &'static str,
        /// The interface.
        interface: String,
        /// Why.
        #[source]
        source: Box<ProgramError>,
    },
    /// A link could not be pinned.
    #[error("pinning link {path}: {source}")]
    PinLink {
        /// Where.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A map is missing from the object or the pin directory, or has the wrong type.
    #[error("map {name}: {source}")]
    Map {
        /// The map.
        name: &'static str,
        /// Why.
        #[source]
        source: Box<MapError>,
    },
    /// The pin directory holds no datapath.
    #[error("nothing is pinned in {0}: is the agent running with this --pin-path?")]
    NotPinned(PathBuf),
}

/// How many entries the maps hold. Applied when the maps are created: maps already pinned
/// keep the size they were created with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// Frontends: the services and reverse-NAT maps; service ids (and their stats) run
    /// from 1 to this number.
    pub services: u32,
    /// Backends (distinct address, port, protocol).
    pub backends: u32,
    /// Selection slots, summed over frontends.
    pub slots: u32,
    /// Conntrack entries (two per flow).
    pub conntrack: u32,
}

impl Default for Capacity {
    /// [`lb_common::capacity`]: room for 10,000 Services with 10 endpoints each.
    fn default() -> Self {
        Capacity {
            services: capacity::SERVICES,
            backends: capacity::BACKENDS,
            slots: capacity::SLOTS,
            conntrack: capacity::CONNTRACK,
        }
    }
}

impl Capacity {
    /// `max_entries` of every map this sizes.
    fn map_sizes(&self) -> [(&'static str, u32); 6] {
        [
            (map_names::SERVICES, self.services),
            (map_names::REV_NAT, self.services),
            // Indexed by service id; id 0 is never used.
            (map_names::SERVICE_STATS, self.services.saturating_add(1)),
            (map_names::BACKENDS, self.backends),
            (map_names::SLOTS, self.slots),
            (map_names::CONNTRACK, self.conntrack),
        ]
    }
}

/// How a program came to be attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkOutcome {
    /// A pinned link existed: its program was replaced atomically with the one just loaded.
    Replaced,
    /// There was no (live) pinned link: the program was attached and its link pinned.
    Created,
}

/// What attaching a program gave: a link to pin, or why not.
type Attached = Result<Result<FdLink, LinkError>, ProgramError>;

/// The loaded object: programs and the maps, pinned under `pin_dir`.
pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
}

/// Makes sure `pin_dir` is inside a bpf filesystem, mounting bpffs at /sys/fs/bpf when the
/// pin directory is under it and nothing is mounted there yet.
pub fn prepare_pin_dir(pin_dir: &Path) -> Result<(), DatapathError> {
    let err = |source| DatapathError::PinDir {
        path: pin_dir.to_owned(),
        source,
    };
    let default_root = Path::new("/sys/fs/bpf");
    if pin_dir.starts_with(default_root) && sys::ensure_bpffs(default_root).map_err(err)? {
        info!("mounted bpffs at {}", default_root.display());
    }
    std::fs::create_dir_all(pin_dir.join("links")).map_err(err)?;
    if !sys::is_bpffs(pin_dir).map_err(err)? {
        return Err(err(io::Error::other("not on a bpf filesystem")));
    }
    Ok(())
}

impl Datapath {
    /// Loads the embedded programs. Maps already pinned in `pin_dir` are reused with their
    /// contents (conntrack included); missing ones are created, with the default
    /// [`Capacity`], and pinned.
    pub fn load(pin_dir: &Path) -> Result<Self, DatapathError> {
        Self::load_with(pin_dir, &Capacity::default())
    }

    /// [`Datapath::load`], creating missing maps with `capacity`.
    pub fn load_with(pin_dir: &Path, capacity: &Capacity) -> Result<Self, DatapathError> {
        prepare_pin_dir(pin_dir)?;
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(pin_dir);
        for (name, size) in capacity.map_sizes() {
            loader.map_max_entries(name, size);
        }
        let ebpf = loader
            .load(crate::EBPF_OBJECT)
            .map_err(|source| DatapathError::Load {
                pin_dir: pin_dir.to_owned(),
                source: Box::new(source),
            })?;
        Ok(Self {
            ebpf,
            pin_dir: pin_dir.to_owned(),
        })
    }

    /// The pin directory.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The loaded object, for tests that run the programs directly.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// Verifies and loads both programs into the kernel (without attaching them).
    pub fn load_programs(&mut self) -> Result<(), DatapathError> {
        let prog_err = |name| {
            move |source| DatapathError::Program {
                name,
                source: Box::new(source),
            }
        };
        self.xdp()?
            .load()
            .map_err(prog_err(program_names::XDP_INGRESS))?;
        self.tc()?
            .load()
            .map_err(prog_err(program_names::TC_EGRESS))?;
        Ok(())
    }

    fn xdp(&mut self) -> Result<&mut Xdp, DatapathError> {
        typed_program(&mut self.ebpf, program_names::XDP_INGRESS)
    }

    fn tc(&mut self) -> Result<&mut SchedClassifier, DatapathError> {
        typed_program(&mut self.ebpf, program_names::TC_EGRESS)
    }

    /// Attaches XDP (ingress) and TC (egress) to `interface`. A live pinned link from an
    /// earlier agent is kept and its program replaced in place, so traffic never runs
    /// without a program; otherwise the program is attached and its link pinned.
    pub fn attach(
        &mut self,
        interface: &str,
    ) -> Result<[(&'static str, LinkOutcome); 2], DatapathError> {
        interface_index(interface)?;
        self.load_programs()?;
        let xdp = self.attach_one(
            program_names::XDP_INGRESS,
            &format!("xdp_ingress@{interface}"),
            interface,
            |dp| {
                let prog = dp.xdp()?;
                let id = prog.attach(interface, XdpMode::default());
                Ok(id.and_then(|id| prog.take_link(id)).map(FdLink::try_from))
            },
        )?;
        let tc = self.attach_one(
            program_names::TC_EGRESS,
            &format!("tc_egress@{interface}"),
            interface,
            |dp| {
                // TCX (a bpf_link) on kernels >= 6.6; only a link can be pinned.
                let prog = dp.tc()?;
                let id = prog.attach(interface, TcAttachType::Egress);
                Ok(id.and_then(|id| prog.take_link(id)).map(FdLink::try_from))
            },
        )?;
        Ok([
            (program_names::XDP_INGRESS, xdp),
            (program_names::TC_EGRESS, tc),
        ])
    }

    /// Keeps the live link pinned at `links/<pin_name>` (replacing its program), or attaches
    /// with `attach` and pins the new link there.
    fn attach_one(
        &mut self,
        program: &'static str,
        pin_name: &str,
        interface: &str,
        attach: impl FnOnce(&mut Self) -> Result<Attached, DatapathError>,
    ) -> Result<LinkOutcome, DatapathError> {
        let path = self.pin_dir.join("links").join(pin_name);
        if let Some(outcome) = self.replace_pinned(&path, program)? {
            return Ok(outcome);
        }
        let link = attach(self)?.map_err(|source| DatapathError::Attach {
            program,
            interface: interface.to_owned(),
            source: Box::new(source),
        })?;
        pin_link(link, &path)?;
        Ok(LinkOutcome::Created)
    }

    /// Replaces the program of the link pinned at `path`; `None` when there is no live link
    /// there (a stale pin, whose interface is gone, is removed).
    fn replace_pinned(
        &mut self,
        path: &Path,
        name: &'static str,
    ) -> Result<Option<LinkOutcome>, DatapathError> {
        if !path.exists() {
            return Ok(None);
        }
        let prog = program(&mut self.ebpf, name)?;
        let prog_fd = prog.fd().map_err(|source| DatapathError::Program {
            name,
            source: Box::new(source),
        })?;
        let result =
            sys::obj_get(path).and_then(|link| sys::link_update(link.as_fd(), prog_fd.as_fd()));
        match result {
            Ok(()) => Ok(Some(LinkOutcome::Replaced)),
            Err(error) => {
                warn!(
                    "pinned link {} is stale ({error}); attaching anew",
                    path.display()
                );
                std::fs::remove_file(path).map_err(|source| DatapathError::PinDir {
                    path: path.to_owned(),
                    source,
                })?;
                Ok(None)
            }
        }
    }

    /// Takes the maps the agent writes.
    pub fn take_maps(&mut self) -> Result<BpfMaps, DatapathError> {
        let mut take = |name: &'static str| {
            self.ebpf.take_map(name).ok_or(DatapathError::Map {
                name,
                source: Box::new(MapError::InvalidName {
                    name: name.to_owned(),
                }),
            })
        };
        let maps = [
            take(map_names::SERVICES)?,
            take(map_names::BACKENDS)?,
            take(map_names::SLOTS)?,
            take(map_names::REV_NAT)?,
        ];
        BpfMaps::from_maps(maps, service_id_limit(&self.pin_dir)?)
    }
}

/// The size of the pinned service stats array, which service ids index.
fn service_id_limit(pin_dir: &Path) -> Result<u32, DatapathError> {
    let name = map_names::SERVICE_STATS;
    let path = pin_dir.join(name);
    if !path.exists() {
        return Err(DatapathError::NotPinned(pin_dir.to_owned()));
    }
    let info = MapData::from_pin(&path).and_then(|map| map.info());
    Ok(info.map_err(map_err(name))?.max_entries())
}

/// The index of a network interface in this network namespace.
pub fn interface_index(name: &str) -> Result<u32, DatapathError> {
    let unknown = || DatapathError::UnknownInterface {
        name: name.to_owned(),
    };
    let c_name = std::ffi::CString::new(name).map_err(|_| unknown())?;
    // SAFETY: c_name is a valid C string.
    match unsafe { libc::if_nametoindex(c_name.as_ptr()) } {
        0 => Err(unknown()),
        index => Ok(index),
    }
}

fn program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut aya::programs::Program, DatapathError> {
    ebpf.program_mut(name).ok_or(DatapathError::Program {
        name,
        source: Box::new(ProgramError::UnexpectedProgramType),
    })
}

/// The program `name`, as the program type `P` it must be.
fn typed_program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, DatapathError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    program(ebpf, name)?
        .try_into()
        .map_err(|source| DatapathError::Program {
            name,
            source: Box::new(source),
        })
}

fn pin_link(link: Result<FdLink, LinkError>, path: &Path) -> Result<(), DatapathError> {
    let err = |source: Box<dyn std::error::Error + Send + Sync>| DatapathError::PinLink {
        path: path.to_owned(),
        source,
    };
    let link = link.map_err(|e| err(Box::new(e)))?;
    link.pin(path).map_err(|e| err(Box::new(e)))?;
    Ok(())
}

/// The maps the control plane writes: services, backends, slots and reverse NAT.
pub struct BpfMaps {
    /// [`map_names::SERVICES`].
    pub services: HashMap<MapData, Frontend4, Service>,
    /// [`map_names::BACKENDS`].
    pub backends: HashMap<MapData, u32, Backend4>,
    /// [`map_names::SLOTS`].
    pub slots: HashMap<MapData, SlotKey, u32>,
    /// [`map_names::REV_NAT`].
    pub rev_nat: HashMap<MapData, u32, RevNat4>,
    /// Service ids are below this: the size of [`map_names::SERVICE_STATS`].
    pub service_id_limit: u32,
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> DatapathError {
    move |source| DatapathError::Map {
        name,
        source: Box::new(source),
    }
}

impl BpfMaps {
    fn from_maps(
        [services, backends, slots, rev_nat]: [Map; 4],
        service_id_limit: u32,
    ) -> Result<Self, DatapathError> {
        Ok(Self {
            service_id_limit,
            services: HashMap::try_from(services).map_err(map_err(map_names::SERVICES))?,
            backends: HashMap::try_from(backends).map_err(map_err(map_names::BACKENDS))?,
            slots: HashMap::try_from(slots).map_err(map_err(map_names::SLOTS))?,
            rev_nat: HashMap::try_from(rev_nat).map_err(map_err(map_names::REV_NAT))?,
        })
    }

    /// Opens the maps pinned in `pin_dir` (for the CLI, and for an agent that did not load
    /// the object itself).
    pub fn open_pinned(pin_dir: &Path) -> Result<Self, DatapathError> {
        let open = |name: &'static str| open_pinned_map(pin_dir, name, Map::HashMap);
        let maps = [
            open(map_names::SERVICES)?,
            open(map_names::BACKENDS)?,
            open(map_names::SLOTS)?,
            open(map_names::REV_NAT)?,
        ];
        Self::from_maps(maps, service_id_limit(pin_dir)?)
    }
}

fn open_pinned_map(
    pin_dir: &Path,
    name: &'static str,
    kind: fn(MapData) -> Map,
) -> Result<Map, DatapathError> {
    let path = pin_dir.join(name);
    if !path.exists() {
        return Err(DatapathError::NotPinned(pin_dir.to_owned()));
    }
    Ok(kind(MapData::from_pin(&path).map_err(map_err(name))?))
}

fn op_err(map: &'static str) -> impl Fn(MapError) -> MapOpError {
    move |error| match error {
        MapError::SyscallError(aya::sys::SyscallError { io_error, .. })
            if io_error.raw_os_error() == Some(libc::E2BIG) =>
        {
            MapOpError::Full { map }
        }
        MapError::SyscallError(aya::sys::SyscallError { io_error, .. }) => MapOpError::Os {
            map,
            source: io_error,
        },
        other => MapOpError::Os {
            map,
            source: std::io::Error::other(other),
        },
    }
}

/// Deleting a key that is not there succeeds: the caller wanted it gone.
fn delete_result(map: &'static str, result: Result<(), MapError>) -> Result<(), MapOpError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        other => other.map_err(op_err(map)),
    }
}

fn read<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<Vec<(K, V)>, MapOpError> {
    map.iter().collect::<Result<_, _>>().map_err(op_err(name))
}

impl DatapathMaps for BpfMaps {
    fn put_backend(&mut self, id: u32, backend: &Backend4) -> Result<(), MapOpError> {
        (self.backends.insert(id, backend, 0)).map_err(op_err(map_names::BACKENDS))
    }
    fn delete_backend(&mut self, id: u32) -> Result<(), MapOpError> {
        delete_result(map_names::BACKENDS, self.backends.remove(&id))
    }
    fn put_slot(&mut self, key: SlotKey, backend_id: u32) -> Result<(), MapOpError> {
        (self.slots.insert(key, backend_id, 0)).map_err(op_err(map_names::SLOTS))
    }
    fn delete_slot(&mut self, key: SlotKey) -> Result<(), MapOpError> {
        delete_result(map_names::SLOTS, self.slots.remove(&key))
    }
    fn put_rev_nat(&mut self, id: u32, value: &RevNat4) -> Result<(), MapOpError> {
        (self.rev_nat.insert(id, value, 0)).map_err(op_err(map_names::REV_NAT))
    }
    fn delete_rev_nat(&mut self, id: u32) -> Result<(), MapOpError> {
        delete_result(map_names::REV_NAT, self.rev_nat.remove(&id))
    }
    fn put_service(&mut self, key: &Frontend4, value: &Service) -> Result<(), MapOpError> {
        (self.services.insert(key, value, 0)).map_err(op_err(map_names::SERVICES))
    }
    fn delete_service(&mut self, key: &Frontend4) -> Result<(), MapOpError> {
        delete_result(map_names::SERVICES, self.services.remove(key))
    }
    fn service_id_limit(&self) -> u32 {
        self.service_id_limit
    }
    fn read_all(&self) -> Result<MapContents, MapOpError> {
        Ok(MapContents {
            services: read(&self.services, map_names::SERVICES)?,
            slots: read(&self.slots, map_names::SLOTS)?,
            backends: read(&self.backends, map_names::BACKENDS)?,
            rev_nat: read(&self.rev_nat, map_names::REV_NAT)?,
        })
    }
}

/// The per-CPU counters, read from the pins and summed over CPUs.
pub struct Counters {
    services: PerCpuArray<MapData, ServiceStats>,
    reasons: PerCpuArray<MapData, u64>,
}

impl Counters {
    /// Opens the counters pinned in `pin_dir`.
    pub fn open_pinned(pin_dir: &Path) -> Result<Self, DatapathError> {
        let services = open_pinned_map(pin_dir, map_names::SERVICE_STATS, Map::PerCpuArray)?;
        let reasons = open_pinned_map(pin_dir, map_names::REASON_STATS, Map::PerCpuArray)?;
        Ok(Self {
            services: PerCpuArray::try_from(services).map_err(map_err(map_names::SERVICE_STATS))?,
            reasons: PerCpuArray::try_from(reasons).map_err(map_err(map_names::REASON_STATS))?,
        })
    }

    /// The counters of one service id, summed over CPUs.
    pub fn service(&self, id: u32) -> Result<ServiceStats, DatapathError> {
        let values: PerCpuValues<ServiceStats> = self
            .services
            .get(&id, 0)
            .map_err(map_err(map_names::SERVICE_STATS))?;
        Ok(values
            .iter()
            .fold(ServiceStats::default(), |a, v| ServiceStats {
                packets: a.packets + v.packets,
                bytes: a.bytes + v.bytes,
                new_flows: a.new_flows + v.new_flows,
            }))
    }

    /// Every reason counter (index = `lb_common::reason`), summed over CPUs.
    pub fn reasons(&self) -> Result<Vec<u64>, DatapathError> {
        (0..lb_common::reason::COUNT)
            .map(|i| {
                let values = self
                    .reasons
                    .get(&i, 0)
                    .map_err(map_err(map_names::REASON_STATS))?;
                Ok(values.iter().sum())
            })
            .collect()
    }
}

/// Removes everything pinned under `pin_dir`: links first (which detaches the programs once
/// no agent holds them), then maps, then the directories. Returns the paths removed.
pub fn teardown(pin_dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    if !pin_dir.exists() {
        return Ok(removed);
    }
    let links = pin_dir.join("links");
    for dir in [&links, &pin_dir.to_path_buf()] {
        if !dir.exists() {
            continue;
        }
        let mut entries: Vec<_> = std::fs::read_dir(dir)?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
        entries.sort();
        for path in entries {
            if path.is_dir() {
                continue;
            }
            std::fs::remove_file(&path)?;
            removed.push(path);
        }
    }
    if links.exists() {
        std::fs::remove_dir(&links)?;
    }
    std::fs::remove_dir(pin_dir)?;
    removed.push(pin_dir.to_owned());
    Ok(removed)
}
