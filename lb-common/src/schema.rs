//! The schema of the object: what each map is ([`MapSpec`]: its kind, key and value sizes,
//! entries and flags) and what each program is ([`ProgramSpec`]: its section). The lists are
//! [`crate::map_names::ALL`] and [`crate::program_names::ALL`]; lb-userspace's tests check
//! them against the compiled object (each map and program there, nothing else, every name
//! short enough for the kernel), and this crate's tests check the layouts against a golden
//! table, so that a layout that changes under an old name fails a test.

/// Longest name the kernel keeps for a map or a program (`BPF_OBJ_NAME_LEN` - 1): a longer
/// one is cut short in `bpftool` and in the kernel's map and program info.
pub const MAX_NAME_LEN: usize = 15;

/// The type of a map (its `BPF_MAP_TYPE_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapKind {
    /// `BPF_MAP_TYPE_HASH`.
    Hash,
    /// `BPF_MAP_TYPE_ARRAY`.
    Array,
    /// `BPF_MAP_TYPE_PROG_ARRAY`: its values are programs (of one program type).
    ProgramArray,
    /// `BPF_MAP_TYPE_PERCPU_ARRAY`.
    PerCpuArray,
    /// `BPF_MAP_TYPE_LRU_HASH`.
    LruHash,
    /// `BPF_MAP_TYPE_LRU_PERCPU_HASH`.
    LruPerCpuHash,
    /// `BPF_MAP_TYPE_LPM_TRIE`: its key is a prefix length (`u32`) and then the data.
    LpmTrie,
    /// `BPF_MAP_TYPE_HASH_OF_MAPS` (a BTF map, which the agent pins by path): its values
    /// are maps like the one given.
    HashOfMaps(&'static MapSpec),
}

impl MapKind {
    /// The kernel's `BPF_MAP_TYPE_*` number.
    pub const fn bpf_type(self) -> u32 {
        match self {
            MapKind::Hash => 1,
            MapKind::Array => 2,
            MapKind::ProgramArray => 3,
            MapKind::PerCpuArray => 6,
            MapKind::LruHash => 9,
            MapKind::LruPerCpuHash => 10,
            MapKind::LpmTrie => 11,
            MapKind::HashOfMaps(_) => 13,
        }
    }
}

/// The agent's sizes of the maps it sizes (`lb agent --max-services` and so on). Applied
/// when the maps are created: maps already pinned keep the size they were created with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// Frontends: the services and reverse-NAT maps, and the Maglev map (twice: two tables
    /// each); service ids (and their stats) run from 1 to this number.
    pub services: u32,
    /// Backends (distinct address, port, protocol), and their counters.
    pub backends: u32,
    /// Conntrack entries (two per flow); the NAT and socket tables are as large.
    pub conntrack: u32,
    /// sessionAffinity ClientIP entries (Service, client address).
    pub affinity: u32,
}

impl Capacity {
    /// [`crate::capacity`]: room for 10,000 Services with 10 endpoints each. The object
    /// declares its maps with these sizes.
    pub const DEFAULT: Self = Capacity {
        services: crate::capacity::SERVICES,
        backends: crate::capacity::BACKENDS,
        conntrack: crate::capacity::CONNTRACK,
        affinity: crate::capacity::AFFINITY,
    };

    /// The entries of a map sized by `sizing`.
    pub const fn entries(&self, sizing: Sizing) -> u32 {
        match sizing {
            Sizing::Services => self.services,
            Sizing::MaglevTables => self.services.saturating_mul(2),
            Sizing::ServiceIds => self.services.saturating_add(1),
            Sizing::Backends => self.backends,
            Sizing::BackendSlots => crate::backend_stats_slots(self.backends),
            Sizing::Conntrack => self.conntrack,
            Sizing::Affinity => self.affinity,
        }
    }
}

impl Default for Capacity {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Which of the agent's [`Capacity`] sizes a map, and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sizing {
    /// One entry per frontend.
    Services,
    /// Two entries per frontend (its two Maglev tables, `maglev::KEY_TABLE_B`).
    MaglevTables,
    /// Indexed by service id, which runs from 1 to [`Capacity::services`].
    ServiceIds,
    /// One entry per backend.
    Backends,
    /// [`crate::backend_stats_slots`] of the backends: a power of two.
    BackendSlots,
    /// As large as conntrack.
    Conntrack,
    /// One entry per sessionAffinity client.
    Affinity,
}

impl Sizing {
    /// The entries the object declares: [`Capacity::DEFAULT`]'s.
    pub const fn default_entries(self) -> u32 {
        Capacity::DEFAULT.entries(self)
    }
}

/// How many entries a map has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entries {
    /// Always this many: an index space (counters, program slots, the pre-filter's words).
    Fixed(u32),
    /// As many as the agent's [`Capacity`] gives it.
    Sized(Sizing),
}

impl Entries {
    /// The entries the object declares.
    pub const fn default_entries(self) -> u32 {
        match self {
            Entries::Fixed(n) => n,
            Entries::Sized(sizing) => sizing.default_entries(),
        }
    }
}

/// One map of the object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSpec {
    /// Its name, as pinned ([`crate::map_names`]).
    pub name: &'static str,
    /// Its type.
    pub kind: MapKind,
    /// Bytes of a key, as the kernel sees it.
    pub key_size: u32,
    /// Bytes of a value, as the kernel sees it (a map's or a program's id in a map of maps
    /// or a program array).
    pub value_size: u32,
    /// Its number of entries.
    pub entries: Entries,
    /// Its `BPF_F_*` flags.
    pub flags: u32,
}

/// `BPF_F_NO_PREALLOC`: LPM tries must have it (aya-ebpf adds it to theirs).
pub const BPF_F_NO_PREALLOC: u32 = 1;

/// Bytes of `T`, as a map's key or value size.
const fn size<T>() -> u32 {
    core::mem::size_of::<T>() as u32
}

impl MapSpec {
    /// A map of `kind` with keys `K` and values `V`.
    pub const fn new<K, V>(name: &'static str, kind: MapKind, entries: Entries) -> Self {
        MapSpec {
            name,
            kind,
            key_size: size::<K>(),
            value_size: size::<V>(),
            entries,
            flags: 0,
        }
    }

    /// An LPM trie whose keys hold a `K` after the prefix length.
    pub const fn lpm_trie<K, V>(name: &'static str, entries: Entries) -> Self {
        MapSpec {
            key_size: size::<u32>() + size::<K>(),
            flags: BPF_F_NO_PREALLOC,
            ..Self::new::<K, V>(name, MapKind::LpmTrie, entries)
        }
    }

    /// A program array of `slots`.
    pub const fn program_array(name: &'static str, slots: u32) -> Self {
        Self::new::<u32, u32>(name, MapKind::ProgramArray, Entries::Fixed(slots))
    }

    /// A hash map of maps keyed by `K`, whose values are maps like `inner`.
    pub const fn hash_of_maps<K>(
        name: &'static str,
        inner: &'static MapSpec,
        entries: Entries,
    ) -> Self {
        Self::new::<K, u32>(name, MapKind::HashOfMaps(inner), entries)
    }

    /// The same map with `BPF_F_*` `flags`.
    pub const fn with_flags(self, flags: u32) -> Self {
        MapSpec { flags, ..self }
    }
}

/// The hook a program is for: the section of the object it is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgramKind {
    /// XDP on an interface (section `xdp`).
    Xdp,
    /// A TC classifier (section `classifier`).
    Classifier,
    /// A cgroup socket-address hook, of the attach type given (section `cgroup/<type>`:
    /// `connect4`, `sendmsg6`, `getpeername4`, ...).
    CgroupSockAddr(&'static str),
}

/// One program of the object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProgramSpec {
    /// Its name ([`crate::program_names`]): its function's name in lb-ebpf.
    pub name: &'static str,
    /// Its hook.
    pub kind: ProgramKind,
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{format, vec::Vec};

    use super::*;
    use crate::{map_names, program_names};

    /// What a pinned map is, to an agent that finds it pinned: kind, key bytes, value
    /// bytes, entries (when fixed: an index space the programs rely on) and flags. Sized
    /// entries are not part of it: the agent keeps the size a pinned map was created with.
    type Layout = (MapKind, u32, u32, Option<u32>, u32);

    fn layout(m: &MapSpec) -> Layout {
        let fixed = match m.entries {
            Entries::Fixed(n) => Some(n),
            Entries::Sized(_) => None,
        };
        // Whether a hash map the agent writes is preallocated is how its memory is taken at
        // creation, not how its entries read: an agent that finds one pinned with the other
        // choice reuses it as it is (the upgrade tests start from preallocated ones).
        let flags = match m.kind {
            MapKind::Hash | MapKind::HashOfMaps(_) => m.flags & !BPF_F_NO_PREALLOC,
            _ => m.flags,
        };
        (m.kind, m.key_size, m.value_size, fixed, flags)
    }

    const fn map(kind: MapKind, key: u32, value: u32, fixed: Option<u32>, flags: u32) -> Layout {
        (kind, key, value, fixed, flags)
    }

    use MapKind::*;
    const HASH: MapKind = Hash;
    const LRU: MapKind = LruHash;
    const PERCPU: MapKind = PerCpuArray;

    /// The layout of every map as the released agents pin it. A map's layout never changes
    /// under its name: an agent that finds the map pinned reuses it, and the new programs
    /// would read the old entries with the new layout. A change gets a new name instead
    /// (see the message of the test below).
    const GOLDEN: [(&str, Layout); 32] = [
        ("LB_SVC4_V1", map(HASH, 8, 16, None, 0)),
        ("LB_BACKEND4_V2", map(HASH, 4, 12, None, 0)),
        (
            "LB_MAGLEV_V2",
            map(HashOfMaps(&crate::maglev::INNER), 4, 4, None, 0),
        ),
        ("LB_CT4_V2", map(LRU, 16, 32, None, 0)),
        ("LB_REVNAT4_V1", map(HASH, 4, 8, None, 0)),
        ("LB_SVCSTAT_V1", map(PERCPU, 4, 24, None, 0)),
        ("LB_REASON_V4", map(PERCPU, 4, 8, Some(24), 0)),
        ("LB_BESTAT_V2", map(PERCPU, 4, 24, None, 0)),
        ("LB_PAIRSTAT_V2", map(LruPerCpuHash, 8, 8, None, 0)),
        ("LB_EVENT_V1", map(PERCPU, 4, 8, Some(11), 0)),
        ("LB_AFFINITY4_V1", map(LRU, 8, 16, None, 0)),
        (
            "LB_SRCRANGE4_V1",
            map(LpmTrie, 12, 1, Some(16_384), BPF_F_NO_PREALLOC),
        ),
        ("LB_BEGEN_V1", map(Array, 4, 4, Some(1), 0)),
        ("LB_PREFILTER_V1", map(Array, 4, 8, Some(16_384), 1 << 10)),
        ("LB_NAT4_V1", map(LRU, 16, 24, None, 0)),
        ("LB_NATEVENT_V2", map(PERCPU, 4, 8, Some(16), 0)),
        ("LB_SOCK4_V1", map(LRU, 16, 16, None, 0)),
        ("LB_SOCKAFF4_V1", map(LRU, 16, 16, None, 0)),
        ("LB_TBLEVENT_V1", map(PERCPU, 4, 8, Some(2), 0)),
        ("LB_SHORTCIRC_V1", map(HASH, 4, 4, None, 0)),
        ("LB_SVC6_V1", map(HASH, 20, 16, None, 0)),
        ("LB_BACKEND6_V1", map(HASH, 4, 24, None, 0)),
        ("LB_CT6_V1", map(LRU, 40, 48, None, 0)),
        ("LB_REVNAT6_V1", map(HASH, 4, 20, None, 0)),
        ("LB_AFFINITY6_V1", map(LRU, 20, 16, None, 0)),
        (
            "LB_SRCRANGE6_V1",
            map(LpmTrie, 24, 1, Some(16_384), BPF_F_NO_PREALLOC),
        ),
        ("LB_SOCK6_V1", map(LRU, 32, 28, None, 0)),
        ("LB_NAT6_V1", map(LRU, 40, 48, None, 0)),
        ("LB_NAT6PEND_V1", map(PERCPU, 4, 64, Some(1), 0)),
        ("LB_FIBSCR_V1", map(PERCPU, 4, 64, Some(1), 0)),
        ("LB_PROGS_V3", map(ProgramArray, 4, 4, Some(5), 0)),
        ("LB_TCPROGS_V1", map(ProgramArray, 4, 4, Some(2), 0)),
    ];

    /// The inner maps of `LB_MAGLEV_V2`: arrays of two `u32`, one element declared.
    const GOLDEN_MAGLEV_INNER: Layout = map(Array, 4, 8, Some(1), (1 << 12) | (1 << 10));

    /// The counters' indexes, by the array that holds them: a new counter needs a larger
    /// array, which a pinned array is not.
    const GOLDEN_COUNTERS: [(&str, &str, u32); 4] = [
        ("Reason", "LB_REASON_V4", 24),
        ("Event", "LB_EVENT_V1", 11),
        ("NatEvent", "LB_NATEVENT_V2", 16),
        ("TableEvent", "LB_TBLEVENT_V1", 2),
    ];

    const BUMP: &str = "pinned maps outlive upgrades, and an agent reuses a map it finds pinned \
        under its name: give the map a new name (its _V suffix one up) in lb_common::map_names, \
        keep the old layout in lb_common::legacy and add a conversion from the old version to \
        lb-userspace's datapath::migrate::conversions (or list the map in STARTS_EMPTY there \
        when its entries may start again, as counters do); then record the new name and layout \
        here";

    #[test]
    fn every_layout_is_the_golden_one_of_its_name() {
        let mut errors = Vec::new();
        for m in map_names::ALL {
            match GOLDEN.iter().find(|(name, _)| *name == m.name) {
                Some((_, golden)) if *golden == layout(&m) => {}
                Some((_, golden)) => errors.push(format!(
                    "{}: the layout changed from {golden:?} to {:?}: {BUMP}",
                    m.name,
                    layout(&m)
                )),
                None => errors.push(format!(
                    "{}: a map without a golden layout: a new map (add its row), or a new \
                     version of a map (then also: {BUMP})",
                    m.name
                )),
            }
        }
        for (name, _) in GOLDEN {
            if map_names::spec(name).is_none() {
                errors.push(format!("{name}: no longer a map: remove its golden row"));
            }
        }
        if layout(&crate::maglev::INNER) != GOLDEN_MAGLEV_INNER {
            errors.push(format!(
                "{}'s inner maps: the layout changed from {GOLDEN_MAGLEV_INNER:?} to {:?}: {BUMP}",
                map_names::MAGLEV,
                layout(&crate::maglev::INNER)
            ));
        }
        let counts = [
            crate::Reason::COUNT,
            crate::Event::COUNT,
            crate::NatEvent::COUNT,
            crate::TableEvent::COUNT,
        ];
        for ((counter, array, golden), count) in GOLDEN_COUNTERS.iter().zip(counts) {
            if count != *golden {
                errors.push(format!(
                    "{counter}::COUNT is {count}, and the pinned {array} has room for {golden}: \
                     {BUMP}"
                ));
            }
            let spec = map_names::spec(array).map(|m| m.entries);
            if spec != Some(Entries::Fixed(count)) {
                errors.push(format!("{array} is not the array of {counter}: {spec:?}"));
            }
        }
        assert!(errors.is_empty(), "{}", errors.join("\n"));
    }

    #[test]
    fn names_are_unique_and_fit_the_kernel() {
        let maps = (map_names::ALL.iter().chain(&crate::pktgen::map_names::ALL)).map(|m| m.name);
        let programs = (program_names::ALL.iter())
            .chain(&program_names::NOOP)
            .chain(&program_names::PKTGEN)
            .map(|p| p.name);
        let names: Vec<&str> = maps.chain(programs).collect();
        for (i, name) in names.iter().enumerate() {
            assert!(
                !name.is_empty() && name.len() <= MAX_NAME_LEN,
                "{name:?}: the kernel keeps {MAX_NAME_LEN} characters of a name"
            );
            assert!(!names[..i].contains(name), "{name} twice");
        }
        // Former names are not current ones.
        for (former, current) in crate::legacy::RENAMED {
            assert!(map_names::spec(current).is_some(), "{current}");
            assert!(!names.contains(&former), "{former}");
        }
    }
}
