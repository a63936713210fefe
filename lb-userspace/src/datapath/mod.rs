//! The eBPF side as seen from userspace: loading the embedded programs with their maps pinned
//! under one directory, attaching them to an interface through pinned links (so they keep
//! running when the agent exits), the maps themselves, and tearing it all down.
//!
//! Pin layout under the pin directory (default `/sys/fs/bpf/lb`):
//! - one file per map, named as in [`lb_common::map_names`];
//! - `links/xdp_ingress@<interface>` and `links/tc_egress@<interface>`;
//! - the socket hooks' and pod interfaces' links (see [`crate::datapath::eastwest`]).

pub mod collector;
pub mod eastwest;
pub mod explain;
#[cfg(test)]
pub mod fake;
pub mod inspect;
pub mod maps;
pub mod migrate;
pub mod sys;

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex},
    time::Instant,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, HashOfMaps, IterableMap as _, LpmTrie, Map, MapData, MapError, PerCpuArray,
        PerCpuValues, ProgramArray, lpm_trie,
    },
    programs::{
        ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, LinkError},
    },
};
use lb_common::{
    Affinity6Key, AffinityEntry, AffinityKey, BACKEND_ACTIVE, BACKEND_STATS_MASK_GLOBAL, Backend4,
    Backend6, Ct4Key, Ct6Entry, Ct6Key, CtEntry, Event, Frontend4, Frontend6, MaglevCell, RevNat4,
    RevNat6, SOURCE_RANGE_ID_BITS, Service, ServiceStats, SockAffinityKey, SourceRange4,
    SourceRange6, TableEvent, addr6, backend_stats_slot, backend_stats_slots, capacity, maglev,
    map_names, octets6, prog_slot, program_names,
};
use thiserror::Error;
use tracing::{info, warn};

use self::maps::{
    BackendEntry, BatchError, DatapathMaps, MapContents, MapOpError, RevNatEntry, TableId,
    TableInfo, TableRef,
};
use crate::{
    model::{IpCidr, IpFamily, Ipv4Cidr, Ipv6Cidr},
    plan::desired::FrontendKey,
};

/// The default pin directory.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/lb";
/// Where bpffs is mounted, by convention.
const BPFFS_ROOT: &str = "/sys/fs/bpf";

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
    /// /sys/fs/bpf is not a bpffs, and one the agent mounted would die with it.
    #[error(
        "{BPFFS_ROOT} is not a bpf filesystem here, and the agent will not mount one that \
         would die with it ({why}): every map and link it pins would go when it exits, and \
         the traffic with them, and a restarted agent would start from nothing. `ip netns \
         exec` does this (it gives the command a fresh /sys): run the agent in the host's \
         mount namespace instead (`nsenter --net=/run/netns/NAME lb agent ...`) after mounting \
         bpffs on the host (`mount -t bpf bpf {BPFFS_ROOT}`), or give --pin-path a directory \
         on a bpffs the host has mounted; in a pod, mount the host's {BPFFS_ROOT} into it (a \
         hostPath volume, as deploy/daemonset.yaml does)"
    )]
    PrivateBpffs {
        /// Why a mount would die with the agent.
        why: String,
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
    /// A sysctl of the interface could not be written.
    #[error("writing {path}: {source}")]
    Sysctl {
        /// The sysctl's file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
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
    /// Reading a Maglev table failed.
    #[error("reading a Maglev table: {0}")]
    Table(#[source] Box<MapOpError>),
    /// The pin directory holds no datapath.
    #[error("nothing is pinned in {0}: is the agent running with this --pin-path?")]
    NotPinned(PathBuf),
    /// A pinned map is not one this agent can use (`lb teardown` removes it).
    #[error("pinned map {name}: {reason}")]
    BadPinnedMap {
        /// The map.
        name: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// How many entries the maps hold. Applied when the maps are created: maps already pinned
/// keep the size they were created with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// Frontends: the services and reverse-NAT maps, and the Maglev map (twice: two tables
    /// each); service ids (and their stats) run from 1 to this number.
    pub services: u32,
    /// Backends (distinct address, port, protocol), and their counters.
    pub backends: u32,
    /// Conntrack entries (two per flow).
    pub conntrack: u32,
    /// sessionAffinity ClientIP entries (Service, client address).
    pub affinity: u32,
}

impl Default for Capacity {
    /// [`lb_common::capacity`]: room for 10,000 Services with 10 endpoints each.
    fn default() -> Self {
        Capacity {
            services: capacity::SERVICES,
            backends: capacity::BACKENDS,
            conntrack: capacity::CONNTRACK,
            affinity: capacity::AFFINITY,
        }
    }
}

impl Capacity {
    /// `max_entries` of every map this sizes.
    fn map_sizes(&self) -> [(&'static str, u32); 18] {
        [
            (map_names::SERVICES, self.services),
            (map_names::SERVICES6, self.services),
            (map_names::REV_NAT, self.services),
            (map_names::REV_NAT6, self.services),
            // Two tables per frontend (`lb_common::maglev::KEY_TABLE_B`).
            (map_names::MAGLEV, self.services.saturating_mul(2)),
            // Indexed by service id; id 0 is never used.
            (map_names::SERVICE_STATS, self.services.saturating_add(1)),
            (map_names::BACKENDS, self.backends),
            (map_names::BACKENDS6, self.backends),
            // A power of two: slots are backend ids masked (`lb_common::backend_stats_slot`).
            (map_names::BACKEND_STATS, backend_stats_slots(self.backends)),
            (map_names::CONNTRACK, self.conntrack),
            (map_names::CONNTRACK6, self.conntrack),
            // Two entries per flow to a remote backend, as conntrack has per flow.
            (map_names::NAT, self.conntrack),
            (map_names::NAT6, self.conntrack),
            (map_names::AFFINITY, self.affinity),
            (map_names::AFFINITY6, self.affinity),
            // The socket hooks' flows (two entries per socket and frontend) and clients.
            (map_names::SOCKETS, self.conntrack),
            (map_names::SOCKETS6, self.conntrack),
            (map_names::SOCK_AFFINITY, self.affinity),
        ]
    }
}

/// The `lb agent` flag that sizes `map` (see [`Capacity`]), if one does.
pub fn capacity_flag(map: &str) -> Option<&'static str> {
    match map {
        map_names::SERVICES
        | map_names::SERVICES6
        | map_names::REV_NAT
        | map_names::REV_NAT6
        | map_names::MAGLEV
        | map_names::SERVICE_STATS => Some("--max-services"),
        map_names::BACKENDS | map_names::BACKENDS6 | map_names::BACKEND_STATS => {
            Some("--max-backends")
        }
        map_names::CONNTRACK
        | map_names::CONNTRACK6
        | map_names::NAT
        | map_names::NAT6
        | map_names::SOCKETS
        | map_names::SOCKETS6 => Some("--max-conntrack"),
        map_names::AFFINITY | map_names::AFFINITY6 | map_names::SOCK_AFFINITY => {
            Some("--max-affinity")
        }
        _ => None,
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
pub(crate) type Attached = Result<Result<FdLink, LinkError>, ProgramError>;

/// The loaded object: programs and the maps, pinned under `pin_dir`.
pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
}

/// Makes sure `pin_dir` is inside a bpf filesystem, mounting bpffs at /sys/fs/bpf when the
/// pin directory is under it and nothing is mounted there yet, but only where the mount
/// outlives the agent (the host's mount namespace): pins in a bpffs that dies with the agent
/// would take the datapath with them, and the restart guarantee.
pub fn prepare_pin_dir(pin_dir: &Path) -> Result<(), DatapathError> {
    let err = |source| DatapathError::PinDir {
        path: pin_dir.to_owned(),
        source,
    };
    let default_root = Path::new(BPFFS_ROOT);
    if pin_dir.starts_with(default_root) {
        std::fs::create_dir_all(default_root).map_err(err)?;
        if !sys::is_bpffs(default_root).map_err(err)? {
            if let Some(why) = sys::private_mount_namespace() {
                return Err(DatapathError::PrivateBpffs { why });
            }
            sys::mount(c"bpf", default_root).map_err(err)?;
            info!("mounted bpffs at {}", default_root.display());
        }
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
        let maglev_pin = pin_dir.join(map_names::MAGLEV);
        let mut loader = EbpfLoader::new();
        loader
            .default_map_pin_directory(pin_dir)
            // BTF maps have no pinning attribute: pin the map-of-maps by path.
            .map_pin_path(map_names::MAGLEV, maglev_pin.as_path());
        for (name, size) in capacity.map_sizes() {
            loader.map_max_entries(name, size);
        }
        // The datapath masks backend ids with the size of the counters' array: the pinned
        // one's when it exists (the loader reuses it), else the one about to be created.
        let stats_slots = match pinned_max_entries(pin_dir, map_names::BACKEND_STATS) {
            Ok(slots) => slots,
            Err(DatapathError::NotPinned(_)) => backend_stats_slots(capacity.backends),
            Err(e) => return Err(e),
        };
        if !stats_slots.is_power_of_two() {
            return Err(DatapathError::BadPinnedMap {
                name: map_names::BACKEND_STATS,
                reason: format!("{stats_slots} entries, not a power of two"),
            });
        }
        let stats_mask = stats_slots - 1;
        loader.override_global(BACKEND_STATS_MASK_GLOBAL, &stats_mask, true);
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

    /// Verifies and loads the programs of the external interface into the kernel (without
    /// attaching them), and puts the ones that are tail-called into their slots of
    /// [`map_names::PROGRAMS`].
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
        // The pod interfaces' program may have loaded it already (it tail-calls it).
        let tc = self.tc()?;
        if tc.fd().is_err() {
            tc.load().map_err(prog_err(program_names::TC_EGRESS))?;
        }
        for name in [
            program_names::XDP_INGRESS6,
            program_names::XDP_NAT6,
            program_names::XDP_ICMP6,
        ] {
            let prog: &mut Xdp = typed_program(&mut self.ebpf, name)?;
            prog.load().map_err(prog_err(name))?;
        }
        self.fill_program_slots()
    }

    /// Writes each tail-called program into its slot of the pinned program array. On every
    /// start: an earlier agent's slots hold its own programs, and the XDP program the
    /// pinned link now runs (this agent's) must tail-call this agent's programs.
    fn fill_program_slots(&mut self) -> Result<(), DatapathError> {
        for (slot, name) in [
            (prog_slot::XDP_INGRESS6, program_names::XDP_INGRESS6),
            (prog_slot::XDP_NAT6, program_names::XDP_NAT6),
            (prog_slot::XDP_ICMP6, program_names::XDP_ICMP6),
        ] {
            self.fill_slot(map_names::PROGRAMS, slot, name)?;
        }
        Ok(())
    }

    /// Writes the loaded program `name` into `slot` of the pinned program array `map`.
    pub(crate) fn fill_slot(
        &mut self,
        map: &'static str,
        slot: u32,
        name: &'static str,
    ) -> Result<(), DatapathError> {
        let prog_err = |source| DatapathError::Program {
            name,
            source: Box::new(source),
        };
        let fd = program(&mut self.ebpf, name)?.fd().map_err(prog_err)?;
        let fd = fd
            .try_clone()
            .map_err(|e| prog_err(ProgramError::from(e)))?;
        let slots = self.ebpf.map_mut(map).ok_or(DatapathError::Map {
            name: map,
            source: Box::new(MapError::InvalidName {
                name: map.to_owned(),
            }),
        })?;
        let mut slots = ProgramArray::try_from(slots).map_err(map_err(map))?;
        slots.set(slot, &fd, 0).map_err(map_err(map))?;
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
    pub(crate) fn attach_one(
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
            take(map_names::REV_NAT)?,
            take(map_names::MAGLEV)?,
            take(map_names::SOURCE_RANGES)?,
            take(map_names::BACKEND_STATS)?,
            take(map_names::BACKEND_GEN)?,
            take(map_names::PREFILTER)?,
            take(map_names::SERVICES6)?,
            take(map_names::BACKENDS6)?,
            take(map_names::REV_NAT6)?,
            take(map_names::SOURCE_RANGES6)?,
        ];
        BpfMaps::from_maps(maps, &self.pin_dir)
    }
}

/// The size of a pinned map.
fn pinned_max_entries(pin_dir: &Path, name: &'static str) -> Result<u32, DatapathError> {
    let path = pin_dir.join(name);
    if !path.exists() {
        return Err(DatapathError::NotPinned(pin_dir.to_owned()));
    }
    let info = MapData::from_pin(&path).and_then(|map| map.info());
    Ok(info.map_err(map_err(name))?.max_entries())
}

/// Sets `net.ipv4.conf.<interface>.accept_local` to 1. XDP hands a source-NATed packet
/// (whose source is this node's address) to the kernel to forward while the next hop's
/// neighbour entry is unresolved, so that the kernel resolves it; without this sysctl the
/// kernel drops such a packet as a martian. (Once resolved, XDP sends the packets itself.)
pub fn accept_local_sources(interface: &str) -> Result<(), DatapathError> {
    interface_index(interface)?;
    let path = PathBuf::from(format!("/proc/sys/net/ipv4/conf/{interface}/accept_local"));
    std::fs::write(&path, "1").map_err(|source| DatapathError::Sysctl { path, source })
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
pub(crate) fn typed_program<'a, P>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut P, DatapathError>
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

/// The maps the control plane writes: services, backends, reverse NAT, Maglev tables,
/// source ranges, and the backends' counters (created and deleted with the backends).
pub struct BpfMaps {
    /// [`map_names::SERVICES`].
    pub services: HashMap<MapData, Frontend4, Service>,
    /// [`map_names::BACKENDS`].
    pub backends: HashMap<MapData, u32, Backend4>,
    /// [`map_names::REV_NAT`].
    pub rev_nat: HashMap<MapData, u32, RevNat4>,
    /// [`map_names::MAGLEV`].
    pub maglev: HashOfMaps<MapData, u32, MapData>,
    /// The same map, for the batch writes aya does not offer.
    maglev_fd: std::os::fd::OwnedFd,
    /// [`map_names::SOURCE_RANGES`].
    pub source_ranges: LpmTrie<MapData, SourceRange4, u8>,
    /// [`map_names::SERVICES6`].
    pub services6: HashMap<MapData, Frontend6, Service>,
    /// [`map_names::BACKENDS6`].
    pub backends6: HashMap<MapData, u32, Backend6>,
    /// [`map_names::REV_NAT6`].
    pub rev_nat6: HashMap<MapData, u32, RevNat6>,
    /// [`map_names::SOURCE_RANGES6`].
    pub source_ranges6: LpmTrie<MapData, SourceRange6, u8>,
    /// [`map_names::BACKEND_STATS`], of `backend_stats_mask + 1` slots.
    pub backend_stats: PerCpuArray<MapData, ServiceStats>,
    backend_stats_mask: u32,
    /// [`map_names::BACKEND_GEN`]: bumped after a backend leaves ACTIVE or a frontend goes.
    pub backend_gen: Array<MapData, u32>,
    /// [`map_names::PREFILTER`].
    pub prefilter: Array<MapData, u64>,
    /// The same map, to read it whole through a mapping.
    prefilter_fd: std::os::fd::OwnedFd,
    /// Service ids are below this: the size of [`map_names::SERVICE_STATS`].
    pub service_id_limit: u32,
    /// The size of each map written, for the error that says a map is full.
    sizes: [(&'static str, u32); 10],
    grace: GraceClock,
}

/// Grace periods on request, each on a thread of its own ([`sys::GracePeriods::wait`]
/// blocks for one, about 7.5 ms here): the syncer asks for one after a service entry stops
/// using a table, and rewrites that table in place only once one that started later has
/// ended. Only one runs at a time; requests during one are served by the next.
#[derive(Default)]
struct GraceClock {
    shared: Arc<(Mutex<GraceState>, Condvar)>,
}

#[derive(Default)]
struct GraceState {
    /// A grace period is asked for.
    wanted: bool,
    /// The thread runs.
    running: bool,
    /// The clock is dropped: the thread ends.
    stop: bool,
    /// The start of the latest grace period that has ended.
    since: Option<Instant>,
}

impl GraceClock {
    fn lock(shared: &(Mutex<GraceState>, Condvar)) -> std::sync::MutexGuard<'_, GraceState> {
        shared
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn since(&self) -> Option<Instant> {
        Self::lock(&self.shared).since
    }

    fn request(&self) {
        let mut state = Self::lock(&self.shared);
        state.wanted = true;
        if state.running {
            self.shared.1.notify_one();
            return;
        }
        let periods = match sys::GracePeriods::new() {
            Ok(periods) => periods,
            Err(e) => {
                // Tables are then never rewritten in place: each change puts a new one.
                warn!("cannot wait for grace periods: {e}");
                return;
            }
        };
        state.running = true;
        let shared = self.shared.clone();
        let spawned = std::thread::Builder::new()
            .name("grace".into())
            .spawn(move || {
                loop {
                    let mut state = Self::lock(&shared);
                    while !state.wanted && !state.stop {
                        state = shared
                            .1
                            .wait(state)
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                    }
                    if state.stop {
                        return;
                    }
                    state.wanted = false;
                    drop(state);
                    let start = Instant::now();
                    match periods.wait() {
                        Ok(()) => Self::lock(&shared).since = Some(start),
                        Err(e) => warn!("waiting for a grace period: {e}"),
                    }
                }
            });
        if let Err(e) = spawned {
            warn!("cannot start the grace period thread: {e}");
            state.running = false;
        }
    }
}

impl Drop for GraceClock {
    fn drop(&mut self) {
        Self::lock(&self.shared).stop = true;
        self.shared.1.notify_one();
    }
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> DatapathError {
    move |source| DatapathError::Map {
        name,
        source: Box::new(source),
    }
}

impl BpfMaps {
    fn from_maps(
        [
            services,
            backends,
            rev_nat,
            maglev,
            source_ranges,
            backend_stats,
            backend_gen,
            prefilter,
            services6,
            backends6,
            rev_nat6,
            source_ranges6,
        ]: [Map; 12],
        pin_dir: &Path,
    ) -> Result<Self, DatapathError> {
        let mut sizes = [
            (map_names::SERVICES, 0),
            (map_names::BACKENDS, 0),
            (map_names::REV_NAT, 0),
            (map_names::MAGLEV, 0),
            (map_names::SOURCE_RANGES, 0),
            (map_names::BACKEND_STATS, 0),
            (map_names::SERVICES6, 0),
            (map_names::BACKENDS6, 0),
            (map_names::REV_NAT6, 0),
            (map_names::SOURCE_RANGES6, 0),
        ];
        for (name, size) in &mut sizes {
            *size = pinned_max_entries(pin_dir, name)?;
        }
        let dup = |name: &'static str, data: Option<&MapData>| {
            data.ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))
                .and_then(|data| data.fd().as_fd().try_clone_to_owned())
                .map_err(|io_error| {
                    map_err(name)(MapError::SyscallError(aya::sys::SyscallError {
                        call: "dup",
                        io_error,
                    }))
                })
        };
        let maglev_fd = dup(
            map_names::MAGLEV,
            match &maglev {
                Map::HashOfMaps(data) => Some(data),
                _ => None,
            },
        )?;
        let prefilter_fd = dup(
            map_names::PREFILTER,
            match &prefilter {
                Map::Array(data) => Some(data),
                _ => None,
            },
        )?;
        Ok(Self {
            service_id_limit: pinned_max_entries(pin_dir, map_names::SERVICE_STATS)?,
            sizes,
            grace: GraceClock::default(),
            maglev_fd,
            prefilter_fd,
            services: HashMap::try_from(services).map_err(map_err(map_names::SERVICES))?,
            backends: HashMap::try_from(backends).map_err(map_err(map_names::BACKENDS))?,
            rev_nat: HashMap::try_from(rev_nat).map_err(map_err(map_names::REV_NAT))?,
            maglev: HashOfMaps::try_from(maglev).map_err(map_err(map_names::MAGLEV))?,
            source_ranges: LpmTrie::try_from(source_ranges)
                .map_err(map_err(map_names::SOURCE_RANGES))?,
            backend_stats: PerCpuArray::try_from(backend_stats)
                .map_err(map_err(map_names::BACKEND_STATS))?,
            backend_stats_mask: pinned_max_entries(pin_dir, map_names::BACKEND_STATS)?
                .wrapping_sub(1),
            backend_gen: Array::try_from(backend_gen).map_err(map_err(map_names::BACKEND_GEN))?,
            prefilter: Array::try_from(prefilter).map_err(map_err(map_names::PREFILTER))?,
            services6: HashMap::try_from(services6).map_err(map_err(map_names::SERVICES6))?,
            backends6: HashMap::try_from(backends6).map_err(map_err(map_names::BACKENDS6))?,
            rev_nat6: HashMap::try_from(rev_nat6).map_err(map_err(map_names::REV_NAT6))?,
            source_ranges6: LpmTrie::try_from(source_ranges6)
                .map_err(map_err(map_names::SOURCE_RANGES6))?,
        })
    }

    /// Opens the maps pinned in `pin_dir` (for the CLI, and for an agent that did not load
    /// the object itself).
    pub fn open_pinned(pin_dir: &Path) -> Result<Self, DatapathError> {
        let open = |name: &'static str, kind| open_pinned_map(pin_dir, name, kind);
        Self::from_maps(
            [
                open(map_names::SERVICES, Map::HashMap)?,
                open(map_names::BACKENDS, Map::HashMap)?,
                open(map_names::REV_NAT, Map::HashMap)?,
                open(map_names::MAGLEV, Map::HashOfMaps)?,
                open(map_names::SOURCE_RANGES, Map::LpmTrie)?,
                open(map_names::BACKEND_STATS, Map::PerCpuArray)?,
                open(map_names::BACKEND_GEN, Map::Array)?,
                open(map_names::PREFILTER, Map::Array)?,
                open(map_names::SERVICES6, Map::HashMap)?,
                open(map_names::BACKENDS6, Map::HashMap)?,
                open(map_names::REV_NAT6, Map::HashMap)?,
                open(map_names::SOURCE_RANGES6, Map::LpmTrie)?,
            ],
            pin_dir,
        )
    }

    /// One entry of the table under `key` (`lb_common::maglev::table_key` of a service
    /// entry): what the datapath reads for a flow hash (`lb explain`). `None` when there is
    /// no table.
    pub fn table_entry(&self, key: u32, hash: u32) -> Result<Option<TableSlot>, MapOpError> {
        let table = match self.maglev.get(&key, 0) {
            Ok(table) => table,
            Err(MapError::KeyNotFound) => return Ok(None),
            Err(e) => return Err(op_err(map_names::MAGLEV)(e)),
        };
        let cells: Array<MapData, MaglevCell> =
            Array::try_from(Map::Array(table)).map_err(op_err(map_names::MAGLEV))?;
        let [size, _] = cells.get(&0, 0).map_err(op_err(map_names::MAGLEV))?;
        if size == 0 {
            return Ok(None);
        }
        let index = hash % size;
        let (element, half) = maglev::position(index);
        let cell = cells.get(&element, 0).map_err(op_err(map_names::MAGLEV))?;
        Ok(Some(TableSlot {
            size,
            index,
            backend_id: cell[half],
        }))
    }
}

/// A Maglev table entry, as `lb explain` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableSlot {
    /// The table size.
    pub size: u32,
    /// The entry: the flow hash modulo the size.
    pub index: u32,
    /// The backend id in it.
    pub backend_id: u32,
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

fn source_range_key(service_id: u32, range: Ipv4Cidr) -> lpm_trie::Key<SourceRange4> {
    lpm_trie::Key::new(
        SOURCE_RANGE_ID_BITS + u32::from(range.prefix_len),
        SourceRange4 {
            service_id,
            addr: u32::from_ne_bytes(range.addr.octets()),
        },
    )
}

fn source_range6_key(service_id: u32, range: Ipv6Cidr) -> lpm_trie::Key<SourceRange6> {
    lpm_trie::Key::new(
        SOURCE_RANGE_ID_BITS + u32::from(range.prefix_len),
        SourceRange6 {
            service_id,
            addr: addr6(range.addr.octets()),
        },
    )
}

impl BpfMaps {
    /// Zeroes the counters in backend `id`'s slot.
    fn zero_backend_stats(&mut self, id: u32) -> Result<(), MapOpError> {
        let zero = aya::util::nr_cpus()
            .map_err(|(_, source)| MapOpError::Os {
                map: map_names::BACKEND_STATS,
                source,
            })
            .and_then(|cpus| {
                PerCpuValues::try_from(vec![ServiceStats::default(); cpus]).map_err(|source| {
                    MapOpError::Os {
                        map: map_names::BACKEND_STATS,
                        source,
                    }
                })
            })?;
        let slot = backend_stats_slot(id, self.backend_stats_mask);
        (self.backend_stats.set(slot, zero, 0)).map_err(self.write_err(map_names::BACKEND_STATS))
    }

    /// The error of a failed write of `map`: [`MapOpError::Full`] with its size for E2BIG.
    fn os_err(&self, map: &'static str, source: io::Error) -> MapOpError {
        if source.raw_os_error() == Some(libc::E2BIG) {
            let max_entries = self
                .sizes
                .iter()
                .find(|(n, _)| *n == map)
                .map_or(0, |s| s.1);
            MapOpError::Full { map, max_entries }
        } else {
            MapOpError::Os { map, source }
        }
    }

    /// [`BpfMaps::os_err`] for aya's errors.
    fn write_err(&self, map: &'static str) -> impl Fn(MapError) -> MapOpError + '_ {
        move |error| match error {
            MapError::SyscallError(aya::sys::SyscallError { io_error, .. }) => {
                self.os_err(map, io_error)
            }
            other => op_err(map)(other),
        }
    }

    /// Adds one to [`map_names::BACKEND_GEN`], after a write that takes a backend out of
    /// ACTIVE or deletes a frontend: conntrack entries stop vouching for their backend, so
    /// the next packet of each flow reads its backend and frontend again.
    fn bump_backend_gen(&mut self) -> Result<(), MapOpError> {
        let err = op_err(map_names::BACKEND_GEN);
        let generation = self.backend_gen.get(&0, 0).map_err(&err)?;
        self.backend_gen
            .set(0, generation.wrapping_add(1), 0)
            .map_err(&err)
    }
}

impl DatapathMaps for BpfMaps {
    /// The inner map (closed on drop: the kernel frees it unless a service points at it).
    type Table = Array<MapData, MaglevCell>;
    fn put_backend(&mut self, id: u32, backend: &BackendEntry) -> Result<(), MapOpError> {
        match backend {
            BackendEntry::V4(b) => {
                let result = self.backends.insert(id, b, 0);
                result.map_err(self.write_err(map_names::BACKENDS))?;
            }
            BackendEntry::V6(b) => {
                let result = self.backends6.insert(id, b, 0);
                result.map_err(self.write_err(map_names::BACKENDS6))?;
            }
        }
        if backend.state() != BACKEND_ACTIVE {
            self.bump_backend_gen()?;
        }
        Ok(())
    }
    fn delete_backend(&mut self, id: u32, family: IpFamily) -> Result<(), MapOpError> {
        match family {
            IpFamily::V4 => delete_result(map_names::BACKENDS, self.backends.remove(&id))?,
            IpFamily::V6 => delete_result(map_names::BACKENDS6, self.backends6.remove(&id))?,
        }
        self.bump_backend_gen()
    }
    fn build_table(
        &mut self,
        entries: &[u32],
        backends: u32,
    ) -> Result<(TableId, Self::Table), MapOpError> {
        let err = op_err(map_names::MAGLEV);
        let cells = table_cells(entries, backends);
        let table: Array<MapData, MaglevCell> =
            Array::create(cells.len() as u32, maglev::INNER_MAP_FLAGS).map_err(&err)?;
        let inner = table.map();
        sys::mmap_write(inner.fd().as_fd(), &cells).map_err(|source| MapOpError::Os {
            map: map_names::MAGLEV,
            source,
        })?;
        let id = inner.info().map_err(&err)?.id();
        Ok((id, table))
    }
    fn put_tables(
        &mut self,
        writes: &[(u32, TableRef<'_, Self::Table>)],
    ) -> Result<(), BatchError> {
        // An existing table is opened by its id for its fd; the batch stops before the
        // first one that cannot be (it is gone: nothing pointed at it any more).
        let mut opened = Vec::new();
        let mut fds = Vec::with_capacity(writes.len());
        let mut open_error = None;
        for (_, table) in writes {
            let fd = match table {
                TableRef::Built(table) => table.map().fd().as_fd().as_raw_fd(),
                TableRef::Existing(id) => match MapData::from_id(*id) {
                    Ok(data) => {
                        let fd = data.fd().as_fd().as_raw_fd();
                        opened.push(data);
                        fd
                    }
                    Err(e) => {
                        open_error = Some(op_err(map_names::MAGLEV)(e));
                        break;
                    }
                },
            };
            fds.push(fd as u32);
        }
        let keys: Vec<u32> = writes[..fds.len()].iter().map(|(id, _)| *id).collect();
        // The swaps: one write each, one wait for running programs for all.
        sys::map_update_batch(self.maglev_fd.as_fd(), &keys, &fds).map_err(|(done, e)| {
            BatchError {
                done,
                error: self.os_err(map_names::MAGLEV, e),
            }
        })?;
        match open_error {
            None => Ok(()),
            Some(error) => Err(BatchError {
                done: fds.len(),
                error,
            }),
        }
    }
    fn fill_table(
        &mut self,
        id: TableId,
        entries: &[u32],
        backends: u32,
    ) -> Result<(), MapOpError> {
        let table = MapData::from_id(id).map_err(op_err(map_names::MAGLEV))?;
        let info = table.info().map_err(op_err(map_names::MAGLEV))?;
        let cells = table_cells(entries, backends);
        if info.max_entries() as usize != cells.len() {
            return Err(MapOpError::Os {
                map: map_names::MAGLEV,
                source: io::Error::from_raw_os_error(libc::EINVAL),
            });
        }
        sys::mmap_write(table.fd().as_fd(), &cells).map_err(|source| MapOpError::Os {
            map: map_names::MAGLEV,
            source,
        })
    }
    fn grace_since(&self) -> Option<Instant> {
        self.grace.since()
    }
    fn request_grace(&mut self) {
        self.grace.request();
    }
    fn delete_tables(&mut self, keys: &[u32]) -> Result<(), BatchError> {
        let mut start = 0;
        while start < keys.len() {
            match sys::map_delete_batch(self.maglev_fd.as_fd(), &keys[start..]) {
                Ok(()) => return Ok(()),
                // Deleting what is not there succeeds: go on after it.
                Err((done, e)) if e.raw_os_error() == Some(libc::ENOENT) => start += done + 1,
                Err((done, e)) => {
                    return Err(BatchError {
                        done: start + done,
                        error: self.os_err(map_names::MAGLEV, e),
                    });
                }
            }
        }
        Ok(())
    }
    fn put_source_range(&mut self, service_id: u32, range: IpCidr) -> Result<(), MapOpError> {
        match range {
            IpCidr::V4(range) => {
                let key = source_range_key(service_id, range);
                let result = self.source_ranges.insert(&key, 1, 0);
                result.map_err(self.write_err(map_names::SOURCE_RANGES))
            }
            IpCidr::V6(range) => {
                let key = source_range6_key(service_id, range);
                let result = self.source_ranges6.insert(&key, 1, 0);
                result.map_err(self.write_err(map_names::SOURCE_RANGES6))
            }
        }
    }
    fn delete_source_range(&mut self, service_id: u32, range: IpCidr) -> Result<(), MapOpError> {
        match range {
            IpCidr::V4(range) => {
                let key = source_range_key(service_id, range);
                delete_result(map_names::SOURCE_RANGES, self.source_ranges.remove(&key))
            }
            IpCidr::V6(range) => {
                let key = source_range6_key(service_id, range);
                delete_result(map_names::SOURCE_RANGES6, self.source_ranges6.remove(&key))
            }
        }
    }
    fn put_rev_nat(&mut self, id: u32, entry: &RevNatEntry) -> Result<(), MapOpError> {
        match entry {
            RevNatEntry::V4(r) => {
                let result = self.rev_nat.insert(id, r, 0);
                result.map_err(self.write_err(map_names::REV_NAT))
            }
            RevNatEntry::V6(r) => {
                let result = self.rev_nat6.insert(id, r, 0);
                result.map_err(self.write_err(map_names::REV_NAT6))
            }
        }
    }
    fn delete_rev_nat(&mut self, id: u32, family: IpFamily) -> Result<(), MapOpError> {
        match family {
            IpFamily::V4 => delete_result(map_names::REV_NAT, self.rev_nat.remove(&id)),
            IpFamily::V6 => delete_result(map_names::REV_NAT6, self.rev_nat6.remove(&id)),
        }
    }
    fn put_service(&mut self, key: &FrontendKey, value: &Service) -> Result<(), MapOpError> {
        match key {
            FrontendKey::V4(k) => {
                let result = self.services.insert(k, value, 0);
                result.map_err(self.write_err(map_names::SERVICES))
            }
            FrontendKey::V6(k) => {
                let result = self.services6.insert(k, value, 0);
                result.map_err(self.write_err(map_names::SERVICES6))
            }
        }
    }
    /// Bumps the backend generation (`lb_common::map_names::BACKEND_GEN`): conntrack
    /// entries of the frontend's flows no longer vouch for their backend.
    fn delete_service(&mut self, key: &FrontendKey) -> Result<(), MapOpError> {
        match key {
            FrontendKey::V4(k) => delete_result(map_names::SERVICES, self.services.remove(k))?,
            FrontendKey::V6(k) => delete_result(map_names::SERVICES6, self.services6.remove(k))?,
        }
        self.bump_backend_gen()
    }
    fn put_prefilter_word(&mut self, index: u32, word: u64) -> Result<(), MapOpError> {
        (self.prefilter.set(index, word, 0)).map_err(op_err(map_names::PREFILTER))
    }
    fn service_id_limit(&self) -> u32 {
        self.service_id_limit
    }
    fn backend_stats_slots(&self) -> u32 {
        self.backend_stats_mask.wrapping_add(1)
    }
    fn reset_backend_stats(&mut self, id: u32) -> Result<(), MapOpError> {
        self.zero_backend_stats(id)
    }
    fn read_all(&self) -> Result<MapContents, MapOpError> {
        let err = op_err(map_names::MAGLEV);
        let mut tables = Vec::new();
        // Each distinct table is read once (frontends with the same backends share one).
        let mut read_tables: BTreeMap<TableId, TableInfo> = BTreeMap::new();
        for service_id in self.maglev.keys() {
            let service_id = service_id.map_err(&err)?;
            let inner = match self.maglev.get(&service_id, 0) {
                Ok(inner) => inner,
                // Removed since the keys were listed.
                Err(MapError::KeyNotFound) => continue,
                Err(e) => return Err(err(e)),
            };
            let info = inner.info().map_err(&err)?;
            let table = match read_tables.entry(info.id()) {
                std::collections::btree_map::Entry::Occupied(table) => table.into_mut(),
                std::collections::btree_map::Entry::Vacant(slot) => {
                    let cells: Vec<MaglevCell> =
                        sys::mmap_read(inner.fd().as_fd(), info.max_entries() as usize).map_err(
                            |source| MapOpError::Os {
                                map: map_names::MAGLEV,
                                source,
                            },
                        )?;
                    slot.insert(table_info_of_cells(info.id(), &cells))
                }
            };
            tables.push((service_id, table.clone()));
        }
        let mut source_ranges = Vec::new();
        for key in self.source_ranges.keys() {
            let key = key.map_err(op_err(map_names::SOURCE_RANGES))?;
            let data = key.data();
            let prefix_len = key.prefix_len().saturating_sub(SOURCE_RANGE_ID_BITS);
            let range = u8::try_from(prefix_len)
                .ok()
                .and_then(|len| Ipv4Cidr::new(Ipv4Addr::from(data.addr.to_ne_bytes()), len));
            if let Some(range) = range {
                source_ranges.push((data.service_id, IpCidr::V4(range)));
            }
        }
        for key in self.source_ranges6.keys() {
            let key = key.map_err(op_err(map_names::SOURCE_RANGES6))?;
            let data = key.data();
            let prefix_len = key.prefix_len().saturating_sub(SOURCE_RANGE_ID_BITS);
            let range = u8::try_from(prefix_len)
                .ok()
                .and_then(|len| Ipv6Cidr::new(Ipv6Addr::from(octets6(data.addr)), len));
            if let Some(range) = range {
                source_ranges.push((data.service_id, IpCidr::V6(range)));
            }
        }
        let services4 = read(&self.services, map_names::SERVICES)?;
        let services6 = read(&self.services6, map_names::SERVICES6)?;
        let backends4 = read(&self.backends, map_names::BACKENDS)?;
        let backends6 = read(&self.backends6, map_names::BACKENDS6)?;
        let rev_nat4 = read(&self.rev_nat, map_names::REV_NAT)?;
        let rev_nat6 = read(&self.rev_nat6, map_names::REV_NAT6)?;
        let services4 = services4.into_iter().map(|(k, v)| (FrontendKey::V4(k), v));
        let services6 = services6.into_iter().map(|(k, v)| (FrontendKey::V6(k), v));
        let backends4 = backends4.into_iter().map(|(k, v)| (k, BackendEntry::V4(v)));
        let backends6 = backends6.into_iter().map(|(k, v)| (k, BackendEntry::V6(v)));
        let rev_nat4 = rev_nat4.into_iter().map(|(k, v)| (k, RevNatEntry::V4(v)));
        let rev_nat6 = rev_nat6.into_iter().map(|(k, v)| (k, RevNatEntry::V6(v)));
        Ok(MapContents {
            services: services4.chain(services6).collect(),
            backends: backends4.chain(backends6).collect(),
            rev_nat: rev_nat4.chain(rev_nat6).collect(),
            tables,
            source_ranges,
            prefilter: prefilter_words(&self.prefilter_fd, self.prefilter.len())?,
        })
    }
}

/// A table's inner array: the header `[size, backends]`, then the entries in pairs.
fn table_cells(entries: &[u32], backends: u32) -> Vec<MaglevCell> {
    let size = entries.len() as u32;
    let mut cells: Vec<MaglevCell> = vec![[0; 2]; maglev::elements(size) as usize];
    cells[0] = [size, backends];
    for (index, &backend_id) in entries.iter().enumerate() {
        let (element, half) = maglev::position(index as u32);
        cells[element as usize][half] = backend_id;
    }
    cells
}

/// The non-zero words of the pre-filter bitmap, by index, read through one mapping.
fn prefilter_words(fd: &std::os::fd::OwnedFd, len: u32) -> Result<Vec<(u32, u64)>, MapOpError> {
    let words: Vec<u64> =
        sys::mmap_read(fd.as_fd(), len as usize).map_err(|source| MapOpError::Os {
            map: map_names::PREFILTER,
            source,
        })?;
    Ok((0..len).zip(words).filter(|(_, w)| *w != 0).collect())
}

/// What a table's inner array holds: the header `[size, backends]`, then the entries in
/// pairs.
fn table_info_of_cells(id: TableId, cells: &[MaglevCell]) -> TableInfo {
    let size = cells.first().map_or(0, |h| h[0]);
    let backends: BTreeSet<u32> = (0..size)
        .filter_map(|index| {
            let (element, half) = maglev::position(index);
            cells.get(element as usize).map(|c| c[half])
        })
        .collect();
    TableInfo {
        id,
        size,
        backends: backends.into_iter().collect(),
    }
}

/// The per-CPU counters, read from the pins and summed over CPUs, and the conntrack
/// occupancy they are compared with.
pub struct Counters {
    services: PerCpuArray<MapData, ServiceStats>,
    reasons: PerCpuArray<MapData, u64>,
    events: PerCpuArray<MapData, u64>,
    nat_events: PerCpuArray<MapData, u64>,
    backends: PerCpuArray<MapData, ServiceStats>,
    /// The size of `backends` less one.
    backend_mask: u32,
    conntrack: HashMap<MapData, Ct4Key, CtEntry>,
    /// [`map_names::CONNTRACK6`]: its inserts are counted with IPv4's, so its entries are
    /// too. `None` when pinned by an agent without it.
    conntrack6: Option<HashMap<MapData, Ct6Key, Ct6Entry>>,
    /// The affinity tables with their insert counters; `None` when pinned by an agent
    /// older than the counters (until the current one starts).
    affinity: Option<AffinityTables>,
}

struct AffinityTables {
    inserts: PerCpuArray<MapData, u64>,
    datapath: HashMap<MapData, AffinityKey, AffinityEntry>,
    /// [`map_names::AFFINITY6`], counted with [`map_names::AFFINITY`] (one insert counter).
    datapath6: Option<HashMap<MapData, Affinity6Key, AffinityEntry>>,
    sockets: HashMap<MapData, SockAffinityKey, AffinityEntry>,
}

/// How full an LRU table of the datapath is. The datapath adds entries itself; when the
/// table is full the kernel evicts the least recently used ones to make room, silently:
/// the evictions follow from the datapath's insert counters.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TableFill {
    /// The map.
    pub map: &'static str,
    /// Entries in it now.
    pub entries: u64,
    /// Its `max_entries`.
    pub capacity: u32,
    /// Entries evicted to make room: inserts - deletes - entries.
    pub evictions: u64,
}

impl TableFill {
    /// The `lb agent` flag that sizes the table.
    pub fn flag(&self) -> &'static str {
        capacity_flag(self.map).unwrap_or("--max-*")
    }
}

/// [`occupancy`] of a map that may not be pinned: none.
fn occupancy6<K: aya::Pod, V: aya::Pod>(
    map: Option<&HashMap<MapData, K, V>>,
    name: &'static str,
) -> Result<(u64, u32), DatapathError> {
    map.map_or(Ok((0, 0)), |map| occupancy(map, name))
}

/// The entries of an LRU hash map (one pass over the keys) and its `max_entries`.
fn occupancy<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<(u64, u32), DatapathError> {
    let mut entries = 0u64;
    for key in map.keys() {
        match key {
            Ok(_) => entries += 1,
            // An entry evicted while the keys are walked.
            Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err(name)(e)),
        }
    }
    let capacity = map.map().info().map_err(map_err(name))?.max_entries();
    Ok((entries, capacity))
}

/// Conntrack figures: entries now, and what came and went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ConntrackStats {
    /// Entries in the map now (two per flow).
    pub entries: u64,
    /// Entries the datapath created.
    pub inserts: u64,
    /// Entries the datapath deleted.
    pub deletes: u64,
    /// Entries the kernel evicted to make room (LRU): `inserts - deletes - entries`.
    pub evictions: u64,
}

fn sum_stats(values: &PerCpuValues<ServiceStats>) -> ServiceStats {
    values
        .iter()
        .fold(ServiceStats::default(), |a, v| ServiceStats {
            packets: a.packets + v.packets,
            bytes: a.bytes + v.bytes,
            new_flows: a.new_flows + v.new_flows,
        })
}

impl Counters {
    /// Opens the counters pinned in `pin_dir`.
    pub fn open_pinned(pin_dir: &Path) -> Result<Self, DatapathError> {
        let open = |name: &'static str, kind| open_pinned_map(pin_dir, name, kind);
        let services = open(map_names::SERVICE_STATS, Map::PerCpuArray)?;
        let reasons = open(map_names::REASON_STATS, Map::PerCpuArray)?;
        let events = open(map_names::EVENTS, Map::PerCpuArray)?;
        let nat_events = open(map_names::NAT_EVENTS, Map::PerCpuArray)?;
        let backends = open(map_names::BACKEND_STATS, Map::PerCpuArray)?;
        let backend_mask = pinned_max_entries(pin_dir, map_names::BACKEND_STATS)?.wrapping_sub(1);
        let conntrack = open(map_names::CONNTRACK, Map::LruHashMap)?;
        // The IPv6 twins, when pinned.
        let lru6 = |name: &'static str| -> Result<Option<Map>, DatapathError> {
            if pin_dir.join(name).exists() {
                Ok(Some(open(name, Map::LruHashMap)?))
            } else {
                Ok(None)
            }
        };
        let conntrack6 = lru6(map_names::CONNTRACK6)?
            .map(|m| HashMap::try_from(m).map_err(map_err(map_names::CONNTRACK6)))
            .transpose()?;
        let affinity = if pin_dir.join(map_names::TABLE_EVENTS).exists() {
            let inserts = open(map_names::TABLE_EVENTS, Map::PerCpuArray)?;
            let datapath = open(map_names::AFFINITY, Map::LruHashMap)?;
            let sockets = open(map_names::SOCK_AFFINITY, Map::LruHashMap)?;
            Some(AffinityTables {
                inserts: PerCpuArray::try_from(inserts)
                    .map_err(map_err(map_names::TABLE_EVENTS))?,
                datapath: HashMap::try_from(datapath).map_err(map_err(map_names::AFFINITY))?,
                datapath6: lru6(map_names::AFFINITY6)?
                    .map(|m| HashMap::try_from(m).map_err(map_err(map_names::AFFINITY6)))
                    .transpose()?,
                sockets: HashMap::try_from(sockets).map_err(map_err(map_names::SOCK_AFFINITY))?,
            })
        } else {
            None
        };
        Ok(Self {
            affinity,
            services: PerCpuArray::try_from(services).map_err(map_err(map_names::SERVICE_STATS))?,
            reasons: PerCpuArray::try_from(reasons).map_err(map_err(map_names::REASON_STATS))?,
            events: PerCpuArray::try_from(events).map_err(map_err(map_names::EVENTS))?,
            nat_events: PerCpuArray::try_from(nat_events)
                .map_err(map_err(map_names::NAT_EVENTS))?,
            backends: PerCpuArray::try_from(backends).map_err(map_err(map_names::BACKEND_STATS))?,
            backend_mask,
            conntrack: HashMap::try_from(conntrack).map_err(map_err(map_names::CONNTRACK))?,
            conntrack6,
        })
    }

    /// The counters of one service id, summed over CPUs.
    pub fn service(&self, id: u32) -> Result<ServiceStats, DatapathError> {
        let values = self
            .services
            .get(&id, 0)
            .map_err(map_err(map_names::SERVICE_STATS))?;
        Ok(sum_stats(&values))
    }

    /// The counters of one (programmed) backend id, summed over CPUs.
    pub fn backend(&self, id: u32) -> Result<ServiceStats, DatapathError> {
        let slot = backend_stats_slot(id, self.backend_mask);
        let values = (self.backends.get(&slot, 0)).map_err(map_err(map_names::BACKEND_STATS))?;
        Ok(sum_stats(&values))
    }

    fn sums(
        array: &PerCpuArray<MapData, u64>,
        name: &'static str,
        count: u32,
    ) -> Result<Vec<u64>, DatapathError> {
        (0..count)
            .map(|i| {
                let values = array.get(&i, 0).map_err(map_err(name))?;
                Ok(values.iter().sum())
            })
            .collect()
    }

    /// Every reason counter (index = `lb_common::Reason`), summed over CPUs.
    pub fn reasons(&self) -> Result<Vec<u64>, DatapathError> {
        Self::sums(
            &self.reasons,
            map_names::REASON_STATS,
            lb_common::Reason::COUNT,
        )
    }

    /// Every event counter (index = `lb_common::Event`), summed over CPUs.
    pub fn events(&self) -> Result<Vec<u64>, DatapathError> {
        Self::sums(&self.events, map_names::EVENTS, Event::COUNT)
    }

    /// Every source NAT, forwarding and ICMP counter (index = `lb_common::NatEvent`), summed
    /// over CPUs.
    pub fn nat_events(&self) -> Result<Vec<u64>, DatapathError> {
        Self::sums(
            &self.nat_events,
            map_names::NAT_EVENTS,
            lb_common::NatEvent::COUNT,
        )
    }

    /// Conntrack occupancy (one pass over the keys), both families (they share the insert
    /// and delete counters), and the evictions derived from it.
    pub fn conntrack(&self) -> Result<ConntrackStats, DatapathError> {
        let (entries, _) = occupancy(&self.conntrack, map_names::CONNTRACK)?;
        let (entries6, _) = occupancy6(self.conntrack6.as_ref(), map_names::CONNTRACK6)?;
        let entries = entries + entries6;
        let events = self.events()?;
        let inserts = events[Event::CtInserts as usize];
        let deletes = events[Event::CtDeletes as usize];
        Ok(ConntrackStats {
            entries,
            inserts,
            deletes,
            evictions: inserts.saturating_sub(deletes).saturating_sub(entries),
        })
    }
}

impl Counters {
    /// How full the tables the datapath fills are: conntrack (from `conntrack`, read
    /// before) and the two sessionAffinity tables (one pass over each). A table of IPv4's
    /// and its IPv6 twin share their insert counter, so they make one row, named after the
    /// IPv4 table, with the entries and capacity of both.
    pub fn tables(&self, conntrack: &ConntrackStats) -> Result<Vec<TableFill>, DatapathError> {
        let capacity6 = match &self.conntrack6 {
            Some(map) => map
                .map()
                .info()
                .map_err(map_err(map_names::CONNTRACK6))?
                .max_entries(),
            None => 0,
        };
        let capacity = self
            .conntrack
            .map()
            .info()
            .map_err(map_err(map_names::CONNTRACK))?
            .max_entries()
            + capacity6;
        let mut tables = vec![TableFill {
            map: map_names::CONNTRACK,
            entries: conntrack.entries,
            capacity,
            evictions: conntrack.evictions,
        }];
        if let Some(affinity) = &self.affinity {
            let inserts = Self::sums(
                &affinity.inserts,
                map_names::TABLE_EVENTS,
                TableEvent::COUNT,
            )?;
            let datapath = occupancy(&affinity.datapath, map_names::AFFINITY)?;
            let datapath6 = occupancy6(affinity.datapath6.as_ref(), map_names::AFFINITY6)?;
            let datapath = (datapath.0 + datapath6.0, datapath.1 + datapath6.1);
            let sockets = occupancy(&affinity.sockets, map_names::SOCK_AFFINITY)?;
            for (map, (entries, capacity), inserted) in [
                (
                    map_names::AFFINITY,
                    datapath,
                    inserts[TableEvent::AffinityInserts as usize],
                ),
                (
                    map_names::SOCK_AFFINITY,
                    sockets,
                    inserts[TableEvent::SockAffinityInserts as usize],
                ),
            ] {
                tables.push(TableFill {
                    map,
                    entries,
                    capacity,
                    evictions: inserted.saturating_sub(entries),
                });
            }
        }
        Ok(tables)
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
