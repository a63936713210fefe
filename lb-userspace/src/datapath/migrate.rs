//! Migration of pinned maps across a layout change.
//!
//! Pinned maps outlive the agent and its programs, so a map whose key or value layout changes
//! gets a new name: the version suffix goes up (`LB_CT4_V1` -> `LB_CT4_V2`), and the old
//! layout stays in [`lb_common::legacy`]. When an agent starts on a pin directory where its
//! map is not pinned but an older version of it is, the entries are carried over:
//!
//! 1. [`Migration::plan`], before the programs are loaded: which older pins to convert (the
//!    current map is not pinned yet, or an earlier migration was interrupted), and which to
//!    drop (older versions without a [`Conversion`], e.g. counters that start again);
//! 2. the programs are loaded, which creates and pins the current map, empty;
//! 3. [`Migration::copy`]: every old entry is converted and written to the new map, where
//!    the key is not there yet;
//! 4. the new programs replace the old ones through the pinned links (one atomic
//!    `BPF_LINK_UPDATE` each): from then on nothing writes the old map;
//! 5. [`Migration::finish`]: a second copy takes what the old programs wrote between 3 and
//!    4 (entries the new programs made meanwhile are kept), then the old pins are removed.
//!
//! Maps whose layout did not change keep their name and are reused as they are. A pin newer
//! than the agent's own version (a downgrade) is left alone: the agent runs on a fresh map of
//! its version, and the newer one is still there when the newer agent comes back. A map
//! pinned under a former name of a current map ([`lb_common::legacy::RENAMED`]) is an older
//! version of it, as a lower `_V` suffix is.
//!
//! Adding a conversion when a layout changes is one entry in [`conversions`]: the old and new
//! names and a function from the old key and value to the new ones.

use crate::datapath::Pins;
use std::{
    io,
    path::{Path, PathBuf},
};

use aya::{
    Pod,
    maps::{HashMap, HashOfMaps, Map, MapData, MapError},
};
use lb_common::{Backend4, Ct4Key, CtEntry, legacy, map_names};
use thiserror::Error;

/// Errors of a migration.
#[derive(Debug, Error)]
pub enum MigrateError {
    /// The pin directory could not be read, or an old pin removed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A map could not be opened or read, or has another layout than the conversion's.
    #[error("migrating {from} to {to}: {source}")]
    Map {
        /// The old map.
        from: &'static str,
        /// The new map.
        to: &'static str,
        /// Why.
        #[source]
        source: Box<MapError>,
    },
}

/// A pinned map's name split into its base and its version: `LB_CT4_V2` -> (`LB_CT4`, 2).
pub fn versioned(name: &str) -> Option<(&str, u32)> {
    let (base, version) = name.rsplit_once("_V")?;
    let version: u32 = version.parse().ok().filter(|v| *v > 0)?;
    (!base.is_empty() && version.to_string().len() == name.len() - base.len() - 2)
        .then_some((base, version))
}

/// What one copy did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Copied {
    /// Entries converted and written to the new map.
    pub written: usize,
    /// Entries whose key the new map had already (from an earlier copy, or written by the
    /// new programs): kept as they are.
    pub present: usize,
    /// Entries the conversion drops.
    pub dropped: usize,
    /// Entries that could not be written (the new map is full).
    pub failed: usize,
}

impl std::ops::AddAssign for Copied {
    fn add_assign(&mut self, other: Self) {
        self.written += other.written;
        self.present += other.present;
        self.dropped += other.dropped;
        self.failed += other.failed;
    }
}

type CopyFn = dyn Fn(&Map, &mut Map) -> Result<Copied, MapError> + Send + Sync;

/// How the entries of an older version of a map become entries of its current version.
pub struct Conversion {
    /// The older map's name.
    pub from: &'static str,
    /// The current map's name.
    pub to: &'static str,
    copy: Box<CopyFn>,
}

impl std::fmt::Debug for Conversion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} -> {}", self.from, self.to)
    }
}

/// `BPF_NOEXIST`: write only a key that is not there.
const BPF_NOEXIST: u64 = 1;

impl Conversion {
    /// A conversion between hash maps (plain or LRU, either way): every entry `K1 -> V1` of
    /// `from` becomes `convert(key, value)` in `to`, or is dropped when it gives `None`.
    /// The sizes of `K1` and `V1` are checked against the pinned map's.
    pub fn hash<K1: Pod, V1: Pod, K2: Pod, V2: Pod>(
        from: &'static str,
        to: &'static str,
        convert: fn(K1, V1) -> Option<(K2, V2)>,
    ) -> Self {
        let copy = move |old: &Map, new: &mut Map| -> Result<Copied, MapError> {
            let old = HashMap::<&MapData, K1, V1>::try_from(old)?;
            let mut new = HashMap::<&mut MapData, K2, V2>::try_from(new)?;
            let mut copied = Copied::default();
            for entry in old.iter() {
                let (key, value) = match entry {
                    Ok(entry) => entry,
                    // Evicted (LRU) or deleted while the keys are walked.
                    Err(MapError::KeyNotFound) => continue,
                    Err(e) => return Err(e),
                };
                let Some((key, value)) = convert(key, value) else {
                    copied.dropped += 1;
                    continue;
                };
                copied.count(new.insert(key, value, BPF_NOEXIST))?;
            }
            Ok(copied)
        };
        Conversion {
            from,
            to,
            copy: Box::new(copy),
        }
    }

    /// A conversion between hash maps of maps: every key `K1` of `from` becomes
    /// `convert(key)` in `to`, pointing at the same inner map (which is shared, not copied),
    /// or is dropped when it gives `None`.
    pub fn map_of_maps<K1: Pod, K2: Pod>(
        from: &'static str,
        to: &'static str,
        convert: fn(K1) -> Option<K2>,
    ) -> Self {
        let copy = move |old: &Map, new: &mut Map| -> Result<Copied, MapError> {
            let old = HashOfMaps::<&MapData, K1, MapData>::try_from(old)?;
            let mut new = HashOfMaps::<&mut MapData, K2, MapData>::try_from(new)?;
            let mut copied = Copied::default();
            for key in old.keys() {
                let key = match key {
                    Ok(key) => key,
                    Err(MapError::KeyNotFound) => continue,
                    Err(e) => return Err(e),
                };
                let inner = match old.get(&key, 0) {
                    Ok(inner) => inner,
                    // Deleted while the keys are walked.
                    Err(MapError::KeyNotFound) => continue,
                    Err(e) => return Err(e),
                };
                let Some(key) = convert(key) else {
                    copied.dropped += 1;
                    continue;
                };
                copied.count(new.insert(key, &inner, BPF_NOEXIST))?;
            }
            Ok(copied)
        };
        Conversion {
            from,
            to,
            copy: Box::new(copy),
        }
    }
}

impl Copied {
    /// Counts the result of one write of a new key: written, already there, or no room.
    fn count(&mut self, result: Result<(), MapError>) -> Result<(), MapError> {
        match result {
            Ok(()) => self.written += 1,
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {
                self.present += 1
            }
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::E2BIG) => {
                self.failed += 1
            }
            Err(e) => return Err(e),
        }
        Ok(())
    }
}

/// Every conversion this version knows, from the layouts in [`lb_common::legacy`].
pub fn conversions() -> Vec<Conversion> {
    vec![
        // V2 adds the translation to each entry; V1 entries get none recorded (the datapath
        // reads the backend or the reverse NAT for them, as V1 did).
        Conversion::hash(
            legacy::CONNTRACK_V1,
            map_names::CONNTRACK,
            |key: Ct4Key, v1: legacy::CtEntryV1| Some((key, CtEntry::from(v1))),
        ),
        // V2 adds the backend's flags (remote); a V1 backend was local.
        Conversion::hash(
            legacy::BACKENDS_V1,
            map_names::BACKENDS,
            |id: u32, v1: legacy::Backend4V1| Some((id, Backend4::from(v1))),
        ),
        // V2 has a second table per service (key `id | KEY_TABLE_B`), which V1 service
        // entries never select: each V1 table is the first table of its service.
        Conversion::map_of_maps(legacy::MAGLEV_V1, map_names::MAGLEV, |id: u32| {
            (id & lb_common::maglev::KEY_TABLE_B == 0).then_some(id)
        }),
    ]
}

/// Current maps whose older versions are not carried over: counters, which start again
/// from zero; the program array, whose slots every start writes; and the pre-filter, whose
/// bits adoption writes for every service entry before the programs that read it are
/// attached (`sync::Syncer::adopt_with`).
pub const STARTS_EMPTY: &[&str] = &[
    map_names::REASON_STATS,
    map_names::BACKEND_STATS,
    map_names::PAIR_STATS,
    map_names::NAT_EVENTS,
    map_names::PROGRAMS,
    map_names::TABLE_EVENTS,
    map_names::PREFILTER,
];

/// One older pin to convert.
struct Step {
    conversion: Conversion,
    old_path: PathBuf,
    old: Map,
    copied: Copied,
}

/// What a migration did to one older map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migrated {
    /// The older map, whose pin is gone now.
    pub from: String,
    /// The current map its entries went to; `None` when they were not carried over.
    pub to: Option<&'static str>,
    /// What the copies did (both passes).
    pub copied: Copied,
}

/// The older pins of one pin directory and what becomes of them.
pub struct Migration {
    pins: Pins,
    steps: Vec<Step>,
    /// Older versions without a conversion: removed at the end.
    dropped: Vec<PathBuf>,
}

impl std::fmt::Debug for Migration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let steps: Vec<&Conversion> = self.steps.iter().map(|s| &s.conversion).collect();
        f.debug_struct("Migration")
            .field("pins", &self.pins)
            .field("steps", &steps)
            .field("dropped", &self.dropped)
            .finish()
    }
}

impl Migration {
    /// [`Migration::plan_with`] the agent's maps ([`map_names::ALL`]), their former names
    /// ([`legacy::RENAMED`]) and [`conversions`].
    pub fn plan(pins: &Pins) -> Result<Self, MigrateError> {
        let current = map_names::ALL.map(|m| m.name);
        Self::plan_with(pins, &current, &legacy::RENAMED, conversions())
    }

    /// Looks at the pins before the programs are loaded: an older version of one of the
    /// `current` maps (a lower version, or a name in `renamed`: `(former, current)`) is
    /// converted when a conversion goes from it to the current map, and dropped otherwise.
    /// Pins that are not older versions of `current` maps are left alone (newer versions
    /// with a warning).
    pub fn plan_with(
        pins: &Pins,
        current: &[&'static str],
        renamed: &[(&str, &'static str)],
        conversions: Vec<Conversion>,
    ) -> Result<Self, MigrateError> {
        let mut migration = Migration {
            pins: pins.clone(),
            steps: Vec::new(),
            dropped: Vec::new(),
        };
        let io_err = |source| MigrateError::Io {
            path: pins.dir().to_owned(),
            source,
        };
        let entries = match std::fs::read_dir(pins.dir()) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(migration),
            Err(e) => return Err(io_err(e)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err)?;
            if !entry.file_type().map_err(io_err)?.is_dir() {
                names.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        names.sort();
        let mut conversions = conversions;
        for name in names {
            let Some(to) = older_version_of(&name, current, renamed) else {
                continue;
            };
            let old_path = pins.map(&name);
            let found = conversions
                .iter()
                .position(|c| c.from == name && c.to == to);
            let Some(index) = found else {
                migration.dropped.push(old_path);
                continue;
            };
            let conversion = conversions.swap_remove(index);
            let old = MapData::from_pin(&old_path)
                .and_then(Map::from_map_data)
                .map_err(|source| MigrateError::Map {
                    from: conversion.from,
                    to: conversion.to,
                    source: Box::new(source),
                })?;
            migration.steps.push(Step {
                conversion,
                old_path,
                old,
                copied: Copied::default(),
            });
        }
        Ok(migration)
    }

    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty() && self.dropped.is_empty()
    }

    /// The older maps that will be converted, as `(from, to)`.
    pub fn conversions(&self) -> impl Iterator<Item = (&'static str, &'static str)> + '_ {
        self.steps
            .iter()
            .map(|s| (s.conversion.from, s.conversion.to))
    }

    /// Converts every entry of the older maps into the current ones, which the programs'
    /// load has pinned; keys the current maps have already are kept. Returns what this pass
    /// did.
    pub fn copy(&mut self) -> Result<Copied, MigrateError> {
        let mut total = Copied::default();
        for step in &mut self.steps {
            let (from, to) = (step.conversion.from, step.conversion.to);
            let map_err = |source| MigrateError::Map {
                from,
                to,
                source: Box::new(source),
            };
            let mut new = MapData::from_pin(self.pins.map(to))
                .and_then(Map::from_map_data)
                .map_err(map_err)?;
            let copied = (step.conversion.copy)(&step.old, &mut new).map_err(map_err)?;
            step.copied += copied;
            total += copied;
        }
        Ok(total)
    }

    /// After the new programs are attached (nothing writes the older maps any more): copies
    /// once more what the old programs wrote since [`Migration::copy`], then removes the
    /// older pins (a map goes when no program holds it).
    pub fn finish(mut self) -> Result<Vec<Migrated>, MigrateError> {
        self.copy()?;
        let mut done = Vec::new();
        for step in self.steps {
            remove(&step.old_path)?;
            done.push(Migrated {
                from: step.conversion.from.to_owned(),
                to: Some(step.conversion.to),
                copied: step.copied,
            });
        }
        for path in self.dropped {
            remove(&path)?;
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            done.push(Migrated {
                from: name.unwrap_or_default(),
                to: None,
                copied: Copied::default(),
            });
        }
        Ok(done)
    }
}

/// The current map whose older version `name` is, if it is one of them: a former name of
/// a current map, or a lower version of one. Warns of a higher version.
fn older_version_of(
    name: &str,
    current: &[&'static str],
    renamed: &[(&str, &'static str)],
) -> Option<&'static str> {
    if let Some((_, to)) = renamed.iter().find(|(former, _)| *former == name) {
        return current.contains(to).then_some(*to);
    }
    let (base, version) = versioned(name)?;
    let (to, want) = current.iter().find_map(|c| {
        versioned(c)
            .filter(|(b, _)| *b == base)
            .map(|(_, v)| (*c, v))
    })?;
    if version > want {
        tracing::warn!(
            pinned = %name,
            current = to,
            "a newer version of a map is pinned (a downgrade?): left alone; this agent uses \
             its own version"
        );
    }
    (version < want).then_some(to)
}

fn remove(path: &Path) -> Result<(), MigrateError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(MigrateError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_split_into_base_and_version() {
        assert_eq!(versioned("LB_CT4_V1"), Some(("LB_CT4", 1)));
        assert_eq!(versioned("LB_REASON_V12"), Some(("LB_REASON", 12)));
        for not in [
            "LB_CT4",
            "LB_CT4_V",
            "LB_CT4_V0",
            "LB_CT4_Vx",
            "_V1",
            "LB_CT4_V+1",
        ] {
            assert_eq!(versioned(not), None, "{not}");
        }
        for map in map_names::ALL {
            assert!(
                versioned(map.name).is_some(),
                "{} has a version suffix",
                map.name
            );
        }
    }

    /// A map whose version went up, or whose name changed, either has a conversion from
    /// the version before, or says that it starts empty: a layout change cannot silently
    /// drop pinned state.
    #[test]
    fn every_map_past_its_first_version_is_converted_or_starts_empty() {
        let conversions = conversions();
        let current = map_names::ALL.map(|m| m.name);
        for (former, name) in legacy::RENAMED {
            assert!(current.contains(&name), "{name}: not a current map");
            assert!(
                STARTS_EMPTY.contains(&name)
                    || conversions.iter().any(|c| c.from == former && c.to == name),
                "{name}: no conversion from its former name {former} (add one to \
                 migrate::conversions, or list {name} in STARTS_EMPTY)"
            );
        }
        for name in current {
            let (base, version) = versioned(name).unwrap();
            if version == 1 || STARTS_EMPTY.contains(&name) {
                continue;
            }
            let previous = format!("{base}_V{}", version - 1);
            assert!(
                conversions
                    .iter()
                    .any(|c| c.from == previous && c.to == name),
                "{name}: no conversion from {previous} (add one to migrate::conversions, \
                 or list {name} in STARTS_EMPTY)"
            );
        }
        for c in &conversions {
            let (from, to) = (versioned(c.from).unwrap(), versioned(c.to).unwrap());
            let renamed = legacy::RENAMED.contains(&(c.from, c.to));
            assert!(renamed || (from.0 == to.0 && from.1 < to.1), "{c:?}");
            assert!(current.contains(&c.to), "{c:?}: not a current map");
        }
    }

    #[test]
    fn the_conntrack_conversion_keeps_the_flow_and_records_no_translation() {
        let v1 = legacy::CtEntryV1 {
            backend_id: 7,
            service_id: 3,
            last_seen_ns: 123_456,
            flags: lb_common::CT_F_CLOSING,
            _pad: 0,
        };
        let v2 = CtEntry::from(v1);
        assert_eq!(
            (v2.backend_id, v2.service_id, v2.last_seen_ns, v2.flags),
            (7, 3, 123_456, lb_common::CT_F_CLOSING)
        );
        assert_eq!((v2.nat_addr, v2.nat_port, v2.backend_gen), (0, 0, 0));
    }

    #[test]
    fn former_names_and_lower_versions_are_older_versions_of_a_current_map() {
        let current = ["LB_A_V2", "LB_B_V1", "LB_C_V1"];
        let renamed = [("LB_BB_V1", "LB_B_V1"), ("LB_GONE_V1", "LB_GONE2_V1")];
        let older = |name| older_version_of(name, &current, &renamed);
        assert_eq!(older("LB_A_V1"), Some("LB_A_V2"));
        assert_eq!(older("LB_BB_V1"), Some("LB_B_V1"));
        // The current version, a newer one, one of no current map, a former name of a map
        // that is not current, and what is not versioned at all.
        for not in ["LB_A_V2", "LB_A_V3", "LB_D_V1", "LB_GONE_V1", "links"] {
            assert_eq!(older(not), None, "{not}");
        }
    }

    #[test]
    fn planning_on_a_missing_directory_is_nothing_to_do() {
        let m = Migration::plan(&Pins::new("/nonexistent/lb-pins")).unwrap();
        assert!(m.is_empty());
    }
}
