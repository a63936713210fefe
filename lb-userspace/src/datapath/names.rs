//! The name of each programmed frontend: the Service port it serves and its kind
//! ([`map_names::NAMES`]), for `lb services` and `lb stats`.
//!
//! The datapath keys frontends by address, port and protocol and knows no Service. The agent
//! keeps the names beside the maps, in a pinned hash map of its own (created by the agent,
//! not by the programs' object): it survives restarts of the agent with the other pins (a
//! restarted agent reads it back and writes only what changed), goes with `lb teardown`,
//! and whoever can read the maps (`lb services` needs the same rights) can read it. After
//! each write the agent names every programmed frontend: by the desired state, or, for an
//! orphan kept for its grace period, by the name it had.

use std::collections::BTreeMap;

use aya::maps::{HashMap, Map, MapData, MapError};
use lb_common::{
    Frontend4, Frontend6,
    names::{FrontendName, NameKey, kind},
};
use tracing::warn;

use super::{DatapathError, Pins, map_err, sys};
use crate::plan::desired::{FrontendKey, FrontendKind};

/// The map's name.
const NAME: &str = lb_common::map_names::NAMES;

/// What a frontend is named.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct FrontendLabel {
    /// `namespace/name` or `namespace/name:port-name`.
    pub service: String,
    /// The kind of frontend, when known.
    pub kind: Option<FrontendKind>,
}

/// The pinned names map, and what this agent wrote to it.
pub struct Names {
    map: HashMap<MapData, NameKey, FrontendName>,
    written: BTreeMap<FrontendKey, FrontendLabel>,
}

impl Names {
    /// The pinned map, created and pinned with room for `max_entries` names when missing;
    /// what it holds is taken as written.
    pub fn open_or_create(pins: &Pins, max_entries: u32) -> Result<Self, DatapathError> {
        let path = pins.map(NAME);
        if !path.exists() {
            let create = sys::create_hash_map(
                NAME,
                size_of::<NameKey>() as u32,
                size_of::<FrontendName>() as u32,
                max_entries.max(1),
            )
            .and_then(|fd| {
                use std::os::fd::AsFd as _;
                sys::obj_pin(fd.as_fd(), &path)
            });
            create.map_err(|e| map_err(NAME)(MapError::SyscallError(syscall("create", e))))?;
        }
        let mut names = Self::from_pin(pins)?;
        names.written = names.read();
        Ok(names)
    }

    /// The pinned map, if the agent has pinned one (an agent older than it has not).
    pub fn open(pins: &Pins) -> Result<Option<Self>, DatapathError> {
        if !pins.has_map(NAME) {
            return Ok(None);
        }
        Self::from_pin(pins).map(Some)
    }

    fn from_pin(pins: &Pins) -> Result<Self, DatapathError> {
        let map = pins.open_map(NAME, Map::HashMap)?;
        let map = HashMap::try_from(map).map_err(map_err(NAME))?;
        Ok(Names {
            map,
            written: BTreeMap::new(),
        })
    }

    /// Every valid name in the map, by frontend.
    pub fn read(&self) -> BTreeMap<FrontendKey, FrontendLabel> {
        self.map
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(key, name)| Some((frontend_key(&key)?, label(&name)?)))
            .collect()
    }

    /// Makes the map hold exactly `wanted`: writes the names that changed, deletes the
    /// others. A name that cannot be written (a full map) is logged and left out; the
    /// names are for people, nothing depends on them.
    pub fn sync(&mut self, wanted: &BTreeMap<FrontendKey, FrontendLabel>) {
        let stale: Vec<FrontendKey> = self
            .written
            .keys()
            .filter(|k| !wanted.contains_key(k))
            .copied()
            .collect();
        self.remove(stale);
        self.write(wanted);
    }

    /// Removes the names of `keys`.
    fn remove(&mut self, keys: impl IntoIterator<Item = FrontendKey>) {
        for key in keys {
            match self.map.remove(&name_key(&key)) {
                Ok(()) | Err(MapError::KeyNotFound) => {
                    self.written.remove(&key);
                }
                Err(e) => warn!("removing the name of a frontend from {NAME}: {e}"),
            }
        }
    }

    /// Writes the names of `wanted` that differ from what is written.
    fn write(&mut self, wanted: &BTreeMap<FrontendKey, FrontendLabel>) {
        let mut failed = 0;
        for (key, label) in wanted {
            if self.written.get(key) == Some(label) {
                continue;
            }
            let code = label.kind.map_or(kind::UNKNOWN, kind_code);
            let written = FrontendName::new(code, &label.service)
                .ok_or(MapError::InvalidName {
                    name: label.service.clone(),
                })
                .and_then(|name| self.map.insert(name_key(key), name, 0));
            match written {
                Ok(()) => {
                    self.written.insert(*key, label.clone());
                }
                Err(e) => {
                    if failed == 0 {
                        warn!("naming frontends in {NAME}: {e}");
                    }
                    failed += 1;
                }
            }
        }
        if failed > 1 {
            warn!("{failed} frontends not named in {NAME}");
        }
    }

    /// Names the frontend `key` `label`, or removes its name (`None`); as [`Names::sync`]
    /// for one frontend.
    pub fn set(&mut self, key: FrontendKey, label: Option<FrontendLabel>) {
        match label {
            Some(label) => {
                let wanted = BTreeMap::from([(key, label)]);
                self.write(&wanted);
            }
            None => self.remove([key]),
        }
    }

    /// What this agent has written (and found) in the map.
    pub fn written(&self) -> &BTreeMap<FrontendKey, FrontendLabel> {
        &self.written
    }
}

fn syscall(call: &'static str, io_error: std::io::Error) -> aya::sys::SyscallError {
    aya::sys::SyscallError { call, io_error }
}

/// The names map's key of a frontend.
fn name_key(key: &FrontendKey) -> NameKey {
    match key {
        FrontendKey::V4(k) => NameKey::v4(k.octets(), k.port(), k.proto),
        FrontendKey::V6(k) => NameKey::v6(k.octets(), k.port(), k.proto),
    }
}

/// The frontend of a names map key; `None` for a malformed one.
fn frontend_key(key: &NameKey) -> Option<FrontendKey> {
    let port = u16::from_be(key.port);
    match key.family {
        4 => {
            let octets: [u8; 4] = key.addr[..4].try_into().ok()?;
            Some(FrontendKey::V4(Frontend4::new(octets, port, key.proto)))
        }
        6 => Some(FrontendKey::V6(Frontend6::new(key.addr, port, key.proto))),
        _ => None,
    }
}

fn kind_code(kind: FrontendKind) -> u8 {
    match kind {
        FrontendKind::ClusterIp => kind::CLUSTER_IP,
        FrontendKind::NodePort => kind::NODE_PORT,
        FrontendKind::ExternalIp => kind::EXTERNAL_IP,
        FrontendKind::LoadBalancer => kind::LOAD_BALANCER,
    }
}

/// The label of a names map value; `None` for a malformed one.
fn label(name: &FrontendName) -> Option<FrontendLabel> {
    let kind = match name.kind {
        kind::CLUSTER_IP => Some(FrontendKind::ClusterIp),
        kind::NODE_PORT => Some(FrontendKind::NodePort),
        kind::EXTERNAL_IP => Some(FrontendKind::ExternalIp),
        kind::LOAD_BALANCER => Some(FrontendKind::LoadBalancer),
        _ => None,
    };
    Some(FrontendLabel {
        service: name.name()?.to_owned(),
        kind,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;
    use crate::plan::desired::Frontend;

    #[test]
    fn keys_and_labels_round_trip_for_both_families() {
        for frontend in [
            Frontend::v4([10, 96, 0, 10].into(), 8080, Protocol::Tcp),
            Frontend {
                addr: "fd00::a".parse().unwrap(),
                port: 53,
                proto: Protocol::Udp,
            },
        ] {
            let key = frontend.key();
            assert_eq!(frontend_key(&name_key(&key)), Some(key));
        }
        for kind in [
            FrontendKind::ClusterIp,
            FrontendKind::NodePort,
            FrontendKind::ExternalIp,
            FrontendKind::LoadBalancer,
        ] {
            let name = FrontendName::new(kind_code(kind), "shop/web:http").unwrap();
            assert_eq!(
                label(&name),
                Some(FrontendLabel {
                    service: "shop/web:http".into(),
                    kind: Some(kind)
                })
            );
        }
        let mut odd = NameKey::v4([1, 2, 3, 4], 1, 6);
        odd.family = 5;
        assert_eq!(frontend_key(&odd), None);
    }
}
