//! The map operations the syncer needs ([`DatapathMaps`]), one per operation for both IP
//! families: the key or value says its family ([`FrontendKey`], [`BackendEntry`],
//! [`RevNatEntry`], [`IpCidr`]) and the implementation picks that family's map. Implemented on
//! the pinned BPF maps ([`super::BpfMaps`]) and, for the syncer's tests, in memory.
//!
//! Service ids, backend ids, the Maglev tables and the pre-filter are shared by the families;
//! an id is in one of the two backends maps.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Instant,
};

use lb_common::{Backend4, Backend6, MAX_SERVICES, RevNat4, RevNat6, Service};
use thiserror::Error;

use crate::{
    model::{self, IpCidr, IpFamily},
    plan::{desired::FrontendKey, maglev::BackendIdentity},
};

/// Why one map operation failed.
#[derive(Debug, Error)]
pub enum MapOpError {
    /// The map has no room for another entry.
    #[error("map {map} is full ({max_entries} entries){}", raise_hint(map))]
    Full {
        /// The map.
        map: &'static str,
        /// Its size.
        max_entries: u32,
    },
    /// Any other failure of the bpf syscall (or of the in-memory stand-in).
    #[error("map {map}: {source}")]
    Os {
        /// The map.
        map: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl MapOpError {
    /// The map the operation was on.
    pub fn map(&self) -> &'static str {
        match self {
            MapOpError::Full { map, .. } | MapOpError::Os { map, .. } => map,
        }
    }
}

/// How to make room in a full map: the `lb agent` flag that sizes it.
pub(crate) fn raise_hint(map: &str) -> String {
    match super::capacity_flag(map) {
        Some(flag) => format!(": raise {flag} (pinned maps keep their size: `lb teardown` first)"),
        None => String::new(),
    }
}

/// Where a Maglev table is: the id of its inner map (for BPF, the kernel's map id).
pub type TableId = u32;

/// A Maglev table as read back: which table, its size, and the distinct backend ids in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableInfo {
    /// The table.
    pub id: TableId,
    /// Its number of entries.
    pub size: u32,
    /// The backend ids its entries name, sorted, each once.
    pub backends: Vec<u32>,
}

/// Everything in the control-plane maps, as read back for adoption, both families'
/// entries together.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MapContents {
    /// Services map entries (IPv4, then IPv6).
    pub services: Vec<(FrontendKey, Service)>,
    /// Backends map entries (IPv4, then IPv6).
    pub backends: Vec<(u32, BackendEntry)>,
    /// Reverse-NAT map entries (IPv4, then IPv6).
    pub rev_nat: Vec<(u32, RevNatEntry)>,
    /// The Maglev tables, by their key in the Maglev map (`lb_common::maglev::table_key`).
    pub tables: Vec<(u32, TableInfo)>,
    /// Source ranges, by service id (IPv4, then IPv6).
    pub source_ranges: Vec<(u32, IpCidr)>,
    /// The pre-filter bitmap's non-zero words, by index.
    pub prefilter: Vec<(u32, u64)>,
    /// Short-circuit entries: external frontend's service id -> its cluster frontend's.
    pub short_circuits: Vec<(u32, u32)>,
}

/// A table to point a service at in [`DatapathMaps::put_tables`].
#[derive(Debug)]
pub enum TableRef<'a, T> {
    /// One just built by [`DatapathMaps::build_table`].
    Built(&'a T),
    /// One that services point at already.
    Existing(TableId),
}

/// A batch of writes that stopped at an error: the first `done` were applied.
#[derive(Debug, Error)]
#[error("{error}")]
pub struct BatchError {
    /// How many writes were applied (the first ones, in order).
    pub done: usize,
    /// Why the next one failed.
    #[source]
    pub error: MapOpError,
}

/// A backend as its family's backends map holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendEntry {
    /// In the IPv4 backends map.
    V4(Backend4),
    /// In the IPv6 backends map.
    V6(Backend6),
}

impl BackendEntry {
    /// Its family (the map it is in).
    pub const fn family(&self) -> IpFamily {
        match self {
            BackendEntry::V4(_) => IpFamily::V4,
            BackendEntry::V6(_) => IpFamily::V6,
        }
    }

    /// `BACKEND_ACTIVE`, `BACKEND_TERMINATING` or `BACKEND_REMOVED`.
    pub const fn state(&self) -> u8 {
        match self {
            BackendEntry::V4(b) => b.state,
            BackendEntry::V6(b) => b.state,
        }
    }

    /// The same backend in another state.
    pub fn with_state(self, state: u8) -> Self {
        match self {
            BackendEntry::V4(b) => BackendEntry::V4(Backend4 { state, ..b }),
            BackendEntry::V6(b) => BackendEntry::V6(Backend6 { state, ..b }),
        }
    }

    /// Its address and port.
    pub fn addr(&self) -> SocketAddr {
        match self {
            BackendEntry::V4(b) => SocketAddr::new(Ipv4Addr::from(b.octets()).into(), b.port()),
            BackendEntry::V6(b) => SocketAddr::new(Ipv6Addr::from(b.octets()).into(), b.port()),
        }
    }

    /// `BACKEND_F_REMOTE`, ...
    pub const fn flags(&self) -> u8 {
        match self {
            BackendEntry::V4(b) => b.flags,
            BackendEntry::V6(b) => b.flags,
        }
    }

    /// Its protocol number (`lb_common::PROTO_TCP`, `PROTO_UDP`).
    pub const fn proto(&self) -> u8 {
        match self {
            BackendEntry::V4(b) => b.proto,
            BackendEntry::V6(b) => b.proto,
        }
    }

    /// The stable identity its place in a Maglev table derives from.
    pub fn identity(&self) -> BackendIdentity {
        let proto = if self.proto() == lb_common::PROTO_UDP {
            model::Protocol::Udp
        } else {
            model::Protocol::Tcp
        };
        BackendIdentity::new(self.addr(), proto)
    }
}

/// A reverse-NAT entry (the frontend a service id's replies come from) as its family's map
/// holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevNatEntry {
    /// In the IPv4 reverse-NAT map.
    V4(RevNat4),
    /// In the IPv6 reverse-NAT map.
    V6(RevNat6),
}

impl RevNatEntry {
    /// The entry of a frontend.
    pub fn of(key: &FrontendKey) -> Self {
        match key {
            FrontendKey::V4(k) => RevNatEntry::V4(RevNat4::of(k)),
            FrontendKey::V6(k) => RevNatEntry::V6(RevNat6 {
                addr: k.addr,
                port: k.port,
                _pad: 0,
            }),
        }
    }

    /// Its family (the map it is in).
    pub const fn family(&self) -> IpFamily {
        match self {
            RevNatEntry::V4(_) => IpFamily::V4,
            RevNatEntry::V6(_) => IpFamily::V6,
        }
    }

    /// The frontend's address.
    pub fn addr(&self) -> IpAddr {
        match self {
            RevNatEntry::V4(r) => Ipv4Addr::from(r.addr.to_ne_bytes()).into(),
            RevNatEntry::V6(r) => Ipv6Addr::from(lb_common::octets6(r.addr)).into(),
        }
    }
}

/// The map operations sync needs: implemented on the pinned BPF maps and in memory. Each
/// operation takes a key or value of either family and goes to that family's map.
pub trait DatapathMaps {
    /// A Maglev table built whole that nothing points at yet (for BPF, its inner map, which
    /// the kernel frees when the handle is dropped and no service points at it).
    type Table;
    /// Writes (creates or replaces) a backend in its family's map. Its id is not in the
    /// other family's.
    fn put_backend(&mut self, id: u32, backend: &BackendEntry) -> Result<(), MapOpError>;
    /// Deletes a backend from the map of `family`.
    fn delete_backend(&mut self, id: u32, family: IpFamily) -> Result<(), MapOpError>;
    /// Builds a new Maglev table, whole, holding `entries` (backend ids, one per table
    /// entry; `backends` distinct ones). Returns its id and a handle for [`Self::put_tables`].
    fn build_table(
        &mut self,
        entries: &[u32],
        backends: u32,
    ) -> Result<(TableId, Self::Table), MapOpError>;
    /// Puts each table under its key in the Maglev map (`lb_common::maglev::table_key`):
    /// one write per key, all in one system call (a map-of-maps write waits for running
    /// programs, once per call). Applied in order; an error stops the batch.
    fn put_tables(&mut self, writes: &[(u32, TableRef<'_, Self::Table>)])
    -> Result<(), BatchError>;
    /// Removes the tables under these keys (a table goes when nothing points at it), in
    /// one system call, in order; an error stops the batch.
    fn delete_tables(&mut self, keys: &[u32]) -> Result<(), BatchError>;
    /// Rewrites the existing table `id` in place, whole, with `entries` (as
    /// [`Self::build_table`]; same size). No program may be reading it: no service entry
    /// selects it, and a grace period has passed since one last did.
    fn fill_table(&mut self, id: TableId, entries: &[u32], backends: u32)
    -> Result<(), MapOpError>;
    /// The start of the latest grace period that has ended: every program that was running
    /// at that moment has finished since. `None` before the first.
    fn grace_since(&self) -> Option<Instant>;
    /// Asks for a grace period to start now, without waiting for it.
    fn request_grace(&mut self);
    /// Allows `range` as a source of `service_id` (in the source-range map of its family).
    fn put_source_range(&mut self, service_id: u32, range: IpCidr) -> Result<(), MapOpError>;
    /// Removes `range` from the sources of `service_id`.
    fn delete_source_range(&mut self, service_id: u32, range: IpCidr) -> Result<(), MapOpError>;
    /// Writes a reverse-NAT entry.
    fn put_rev_nat(&mut self, id: u32, entry: &RevNatEntry) -> Result<(), MapOpError>;
    /// Deletes a reverse-NAT entry from the map of `family`.
    fn delete_rev_nat(&mut self, id: u32, family: IpFamily) -> Result<(), MapOpError>;
    /// Writes the short-circuit entry of service `id`: its cluster frontend's id
    /// ([`lb_common::map_names::SHORT_CIRCUIT`]).
    fn put_short_circuit(&mut self, id: u32, cluster_id: u32) -> Result<(), MapOpError>;
    /// Deletes the short-circuit entry of service `id`.
    fn delete_short_circuit(&mut self, id: u32) -> Result<(), MapOpError>;
    /// Writes a service entry.
    fn put_service(&mut self, key: &FrontendKey, value: &Service) -> Result<(), MapOpError>;
    /// Deletes a service entry.
    fn delete_service(&mut self, key: &FrontendKey) -> Result<(), MapOpError>;
    /// Writes word `index` of the destination pre-filter bitmap.
    fn put_prefilter_word(&mut self, index: u32, word: u64) -> Result<(), MapOpError>;
    /// Reads everything back.
    fn read_all(&self) -> Result<MapContents, MapOpError>;
    /// Service ids are `1..service_id_limit()` (they index the per-service stats).
    fn service_id_limit(&self) -> u32 {
        MAX_SERVICES
    }
    /// The slots of the backends' counters (a power of two): live backends have ids of
    /// distinct slots (`lb_common::backend_stats_slot`).
    fn backend_stats_slots(&self) -> u32 {
        lb_common::backend_stats_slots(lb_common::capacity::BACKENDS)
    }
    /// Zeroes the counters of a new backend id's slot, before the backend is written.
    fn reset_backend_stats(&mut self, _id: u32) -> Result<(), MapOpError> {
        Ok(())
    }
}

/// What a table holds, from its entries.
pub fn table_info(id: TableId, entries: &[u32]) -> TableInfo {
    let backends: BTreeSet<u32> = entries.iter().copied().collect();
    TableInfo {
        id,
        size: entries.len() as u32,
        backends: backends.into_iter().collect(),
    }
}
