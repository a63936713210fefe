//! The eBPF side as seen from userspace: loading the embedded programs with their maps pinned
//! under one directory and attaching them through pinned links, so that they keep running when
//! the agent exits ([`load`]); the pinned maps the control plane writes, behind the
//! family-polymorphic [`maps::DatapathMaps`] ([`bpf`]); the counters ([`counters`], and as
//! metrics [`collector`]); the east-west hooks ([`eastwest`]); the conversion of pinned maps
//! across layout changes ([`migrate`]); reading it all back for the CLI ([`inspect`],
//! [`explain`]); and the pin directory with every name pinned in it ([`Pins`]).

mod bpf;
pub mod collector;
mod counters;
pub mod eastwest;
pub mod explain;
pub mod external;
#[cfg(test)]
pub mod fake;
pub mod inspect;
mod load;
pub mod maps;
pub mod migrate;
pub mod names;
pub mod netlink;
#[cfg(test)]
mod object;
pub mod pins;
pub mod sys;

use std::{io, path::PathBuf};

use aya::{maps::MapError, programs::ProgramError};
pub use lb_common::Capacity;
use lb_common::{
    map_names,
    schema::{Entries, Sizing},
};
use thiserror::Error;

pub(crate) use self::load::typed_program;
use self::{bpf::map_err, maps::MapOpError};
pub use self::{
    bpf::{BpfMaps, TableSlot},
    counters::{ConntrackStats, Counters, TableFill},
    load::{
        Datapath, LinkOutcome, SysctlOutcome, accept_local_sysctl, ensure_sysctl, interface_index,
    },
    names::{FrontendLabel, Names},
    pins::Pins,
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
    /// A map could not be created (usually: the agent's memory cgroup cannot hold it).
    #[error(
        "cannot create map {name} ({}{}): {source}{}",
        entries.map_or("its size".to_owned(), |e| format!("{e} entries")),
        bytes.map_or(String::new(), |b| format!(", about {} MiB", b.div_ceil(1 << 20))),
        map_create_advice(source, *flag)
    )]
    MapCreate {
        /// The map.
        name: String,
        /// Its size.
        entries: Option<u32>,
        /// About how much memory it takes at creation.
        bytes: Option<u64>,
        /// The `lb agent` flag that sizes it.
        flag: Option<&'static str>,
        /// Why.
        #[source]
        source: io::Error,
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
    /// A sysctl could not be read, or not written (a read-only /proc/sys).
    #[error("sysctl {path}: {source}")]
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

/// `max_entries` of every map the agent sizes ([`lb_common::schema::Entries::Sized`]), by
/// `capacity`.
fn map_sizes(capacity: &Capacity) -> impl Iterator<Item = (&'static str, u32)> + '_ {
    map_names::ALL.iter().filter_map(|m| match m.entries {
        Entries::Sized(sizing) => Some((m.name, capacity.entries(sizing))),
        Entries::Fixed(_) => None,
    })
}

/// What to do about a map that could not be created for `source`, sized by `flag`.
fn map_create_advice(source: &io::Error, flag: Option<&str>) -> String {
    if source.kind() != io::ErrorKind::OutOfMemory {
        return String::new();
    }
    let smaller = flag.map_or(String::new(), |f| {
        format!(", or make the map smaller with {f} (deploy/README.md: sizing)")
    });
    format!(
        ": BPF maps are charged to the memory cgroup of the agent that creates them: raise \
         the agent's memory limit (deploy/daemonset.yaml){smaller}"
    )
}

/// The `lb agent` flag that sizes `map` (see [`Capacity`]), if one does.
pub fn capacity_flag(map: &str) -> Option<&'static str> {
    match map_names::spec(map)?.entries {
        Entries::Sized(Sizing::Services | Sizing::MaglevTables | Sizing::ServiceIds) => {
            Some("--max-services")
        }
        Entries::Sized(Sizing::Backends | Sizing::BackendSlots) => Some("--max-backends"),
        Entries::Sized(Sizing::Conntrack) => Some("--max-conntrack"),
        Entries::Sized(Sizing::Affinity) => Some("--max-affinity"),
        Entries::Fixed(_) => None,
    }
}
