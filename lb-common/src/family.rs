//! The two address families as types. [`V4`] and [`V6`] name, through [`Family`], the key
//! and value types of every map that has one twin per family (the maps keyed by id alone
//! are shared), so that code written once over `F: Family` compiles to one body per
//! family, with the families' own types.
//!
//! The twins have the same fields under the same names (only the address type and the
//! padding differ); the small traits here ([`FlowKey`], [`CtValue`], [`BackendValue`],
//! [`NatValue`]) give generic code those fields, and [`Family`]'s functions build the keys
//! and values it only writes.

use crate::{
    Addr6, Affinity6Key, AffinityKey, Backend4, Backend6, Ct4Key, Ct6Entry, Ct6Key, CtEntry,
    Frontend4, Frontend6, HAIRPIN_ADDR, HAIRPIN_ADDR6, Nat4Entry, Nat4Key, Nat6Entry, Nat6Key,
    RevNat4, RevNat6, Sock6Entry, Sock6Key, SockEntry, SockKey, SourceRange4, SourceRange6,
    flow_hash, flow_hash6, prefilter,
};

/// An address family: its address type and the types of its maps' keys and values.
pub trait Family: Copy + 'static {
    /// An address, network byte order: `u32` or [`Addr6`].
    type Addr: Copy + PartialEq;
    /// Key of the services map ([`Frontend4`], [`Frontend6`]).
    type Frontend: Copy;
    /// Value of the backends map ([`Backend4`], [`Backend6`]).
    type Backend: BackendValue<Addr = Self::Addr>;
    /// Key of conntrack ([`Ct4Key`], [`Ct6Key`]).
    type CtKey: FlowKey<Addr = Self::Addr>;
    /// Value of conntrack ([`CtEntry`], [`Ct6Entry`]).
    type CtEntry: CtValue<Addr = Self::Addr>;
    /// Value of the reverse NAT map ([`RevNat4`], [`RevNat6`]).
    type RevNat: Copy;
    /// Key of the affinity map ([`AffinityKey`], [`Affinity6Key`]).
    type AffinityKey: Copy;
    /// Data of the source ranges' LPM key ([`SourceRange4`], [`SourceRange6`]).
    type SourceRange: Copy;
    /// Key of the NAT table ([`Nat4Key`], [`Nat6Key`]).
    type NatKey: FlowKey<Addr = Self::Addr>;
    /// Value of the NAT table ([`Nat4Entry`], [`Nat6Entry`]).
    type NatEntry: NatValue<Addr = Self::Addr>;
    /// Key of the socket hooks' map ([`SockKey`], [`Sock6Key`]).
    type SockKey: Copy;
    /// Value of the socket hooks' map ([`SockEntry`], [`Sock6Entry`]).
    type SockEntry: Copy;

    /// Bits in an address (a source range's prefix length counts
    /// [`crate::SOURCE_RANGE_ID_BITS`] and then these).
    const ADDR_BITS: u32;
    /// The all-zero address: "not recorded" in a conntrack entry.
    const UNSPECIFIED: Self::Addr;
    /// [`HAIRPIN_ADDR`] or [`HAIRPIN_ADDR6`].
    const HAIRPIN: Self::Addr;

    /// A frontend (address and port in network byte order).
    fn frontend(addr: Self::Addr, port: u16, proto: u8) -> Self::Frontend;
    /// A reverse NAT value: the frontend replies come from.
    fn rev_nat(addr: Self::Addr, port: u16) -> Self::RevNat;
    /// A reverse NAT value's address and port.
    fn rev_nat_target(rev_nat: &Self::RevNat) -> (Self::Addr, u16);
    /// A client of a service.
    fn affinity_key(service_id: u32, client: Self::Addr) -> Self::AffinityKey;
    /// A source (or network) of a service's source ranges.
    fn source_range(service_id: u32, addr: Self::Addr) -> Self::SourceRange;
    /// A socket hooks' key.
    fn sock_key(cookie: u64, addr: Self::Addr, port: u16, proto: u8, dir: u8) -> Self::SockKey;
    /// A socket hooks' entry.
    fn sock_entry(backend_id: u32, service_id: u32, addr: Self::Addr, port: u16)
    -> Self::SockEntry;
    /// A socket hooks' entry's backend id, service id, address and port.
    fn sock_entry_fields(entry: &Self::SockEntry) -> (u32, u32, Self::Addr, u16);
    /// [`flow_hash`] or [`flow_hash6`] of a forward 5-tuple.
    fn flow_hash(saddr: Self::Addr, daddr: Self::Addr, sport: u16, dport: u16, proto: u8) -> u32;
    /// [`Family::flow_hash`] of a flow's forward conntrack key.
    #[inline(always)]
    fn key_hash(key: &Self::CtKey) -> u32 {
        Self::flow_hash(
            key.saddr(),
            key.daddr(),
            key.sport(),
            key.dport(),
            key.proto(),
        )
    }
    /// The pre-filter bucket of a frontend ([`prefilter::bucket`], [`prefilter::bucket6`]).
    fn prefilter_bucket(addr: Self::Addr, port: u16, proto: u8) -> u32;
    /// The address as one word (the socket hooks' flow hash).
    fn fold(addr: Self::Addr) -> u32;
}

/// A flow's key in both directions' tables: conntrack's and the NAT table's (the same
/// fields: addresses, ports, protocol, direction).
pub trait FlowKey: Copy + 'static {
    /// The family's address.
    type Addr: Copy;
    /// A key from its fields (addresses and ports in network byte order).
    fn new(
        saddr: Self::Addr,
        daddr: Self::Addr,
        sport: u16,
        dport: u16,
        proto: u8,
        dir: u8,
    ) -> Self;
    /// The source address.
    fn saddr(&self) -> Self::Addr;
    /// The destination address.
    fn daddr(&self) -> Self::Addr;
    /// The source port.
    fn sport(&self) -> u16;
    /// The destination port.
    fn dport(&self) -> u16;
    /// The protocol.
    fn proto(&self) -> u8;
    /// Sets the destination port.
    fn set_dport(&mut self, port: u16);
}

/// A conntrack entry ([`CtEntry`], [`Ct6Entry`]).
pub trait CtValue: Copy + 'static {
    /// The family's address.
    type Addr: Copy;
    /// An entry from its fields.
    fn new(
        backend_id: u32,
        service_id: u32,
        last_seen_ns: u64,
        flags: u32,
        backend_gen: u32,
        nat_addr: Self::Addr,
        nat_port: u16,
    ) -> Self;
    /// [`CtEntry::backend_id`].
    fn backend_id(&self) -> u32;
    /// [`CtEntry::service_id`].
    fn service_id(&self) -> u32;
    /// [`CtEntry::last_seen_ns`].
    fn last_seen_ns_mut(&mut self) -> &mut u64;
    /// [`CtEntry::flags`].
    fn flags_mut(&mut self) -> &mut u32;
    /// [`CtEntry::backend_gen`].
    fn backend_gen_mut(&mut self) -> &mut u32;
    /// [`CtEntry::nat_addr`] and [`CtEntry::nat_port`].
    fn nat(&self) -> (Self::Addr, u16);
    /// Sets [`CtEntry::nat_addr`] and [`CtEntry::nat_port`].
    fn set_nat(&mut self, addr: Self::Addr, port: u16);
}

/// A backend ([`Backend4`], [`Backend6`]).
pub trait BackendValue: Copy + 'static {
    /// The family's address.
    type Addr: Copy + PartialEq;
    /// All zero: no backend's (id 0 is never a backend's either).
    const NONE: Self;
    /// The backend's address and port, network byte order.
    fn target(&self) -> (Self::Addr, u16);
    /// `BACKEND_ACTIVE`, ...
    fn state(&self) -> u8;
    /// `BACKEND_F_*` bits.
    fn flags(&self) -> u8;
}

/// A NAT table entry ([`Nat4Entry`], [`Nat6Entry`]).
pub trait NatValue: Copy + 'static {
    /// The family's address.
    type Addr: Copy + PartialEq;
    /// An entry from its fields.
    fn new(
        addr: Self::Addr,
        port: u16,
        flags: u16,
        peer_addr: Self::Addr,
        peer_port: u16,
        last_seen_ns: u64,
    ) -> Self;
    /// `addr` and `port`.
    fn own(&self) -> (Self::Addr, u16);
    /// `peer_addr` and `peer_port`.
    fn peer(&self) -> (Self::Addr, u16);
    /// `flags`.
    fn flags_mut(&mut self) -> &mut u16;
    /// `last_seen_ns`.
    fn last_seen_mut(&mut self) -> &mut u64;
    /// Sets `port`.
    fn set_port(&mut self, port: u16);
}

/// IPv4.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct V4;

/// IPv6.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct V6;

/// [`FlowKey`] of a key with the fields `saddr`, `daddr`, `sport`, `dport`, `proto`, `dir`.
macro_rules! flow_key {
    ($key:ty, $addr:ty) => {
        impl FlowKey for $key {
            type Addr = $addr;
            #[inline(always)]
            fn new(saddr: $addr, daddr: $addr, sport: u16, dport: u16, proto: u8, dir: u8) -> Self {
                Self {
                    saddr,
                    daddr,
                    sport,
                    dport,
                    proto,
                    dir,
                    _pad: [0; 2],
                }
            }
            #[inline(always)]
            fn saddr(&self) -> $addr {
                self.saddr
            }
            #[inline(always)]
            fn daddr(&self) -> $addr {
                self.daddr
            }
            #[inline(always)]
            fn sport(&self) -> u16 {
                self.sport
            }
            #[inline(always)]
            fn dport(&self) -> u16 {
                self.dport
            }
            #[inline(always)]
            fn proto(&self) -> u8 {
                self.proto
            }
            #[inline(always)]
            fn set_dport(&mut self, port: u16) {
                self.dport = port;
            }
        }
    };
}

/// A family: its [`Family`] implementation and the accessors of its types, whose fields
/// are the same in both families (only the address type, the padding and a few functions
/// differ, given here).
macro_rules! family {
    (
        $family:ident {
            addr: $addr:ty = $zero:expr,
            bits: $bits:expr,
            hairpin: $hairpin:expr,
            frontend: $frontend:ident,
            backend: $backend:ident,
            ct_key: $ct_key:ident,
            ct_entry: $ct_entry:ident { _pad: $ct_pad:expr },
            rev_nat: $rev_nat:ident,
            affinity_key: $affinity_key:ident,
            source_range: $source_range:ident,
            nat_key: $nat_key:ident,
            nat_entry: $nat_entry:ident,
            sock_key: $sock_key:ident { $($sock_pad:ident: $sock_pad_value:expr),* },
            sock_entry: $sock_entry:ident,
            flow_hash: $flow_hash:path,
            bucket: $bucket:path,
            fold: |$fold_addr:ident| $fold:expr,
        }
    ) => {
        impl Family for $family {
            type Addr = $addr;
            type Frontend = $frontend;
            type Backend = $backend;
            type CtKey = $ct_key;
            type CtEntry = $ct_entry;
            type RevNat = $rev_nat;
            type AffinityKey = $affinity_key;
            type SourceRange = $source_range;
            type NatKey = $nat_key;
            type NatEntry = $nat_entry;
            type SockKey = $sock_key;
            type SockEntry = $sock_entry;

            const ADDR_BITS: u32 = $bits;
            const UNSPECIFIED: $addr = $zero;
            const HAIRPIN: $addr = $hairpin;

            #[inline(always)]
            fn frontend(addr: $addr, port: u16, proto: u8) -> $frontend {
                $frontend {
                    addr,
                    port,
                    proto,
                    _pad: 0,
                }
            }
            #[inline(always)]
            fn rev_nat(addr: $addr, port: u16) -> $rev_nat {
                $rev_nat {
                    addr,
                    port,
                    _pad: 0,
                }
            }
            #[inline(always)]
            fn rev_nat_target(rev_nat: &$rev_nat) -> ($addr, u16) {
                (rev_nat.addr, rev_nat.port)
            }
            #[inline(always)]
            fn affinity_key(service_id: u32, client: $addr) -> $affinity_key {
                $affinity_key { service_id, client }
            }
            #[inline(always)]
            fn source_range(service_id: u32, addr: $addr) -> $source_range {
                $source_range { service_id, addr }
            }
            #[inline(always)]
            fn sock_key(cookie: u64, addr: $addr, port: u16, proto: u8, dir: u8) -> $sock_key {
                $sock_key {
                    cookie,
                    addr,
                    port,
                    proto,
                    dir,
                    $($sock_pad: $sock_pad_value,)*
                }
            }
            #[inline(always)]
            fn sock_entry(backend_id: u32, service_id: u32, addr: $addr, port: u16) -> $sock_entry {
                $sock_entry {
                    backend_id,
                    service_id,
                    addr,
                    port,
                    _pad: 0,
                }
            }
            #[inline(always)]
            fn sock_entry_fields(entry: &$sock_entry) -> (u32, u32, $addr, u16) {
                (entry.backend_id, entry.service_id, entry.addr, entry.port)
            }
            #[inline(always)]
            fn flow_hash(saddr: $addr, daddr: $addr, sport: u16, dport: u16, proto: u8) -> u32 {
                $flow_hash(saddr, daddr, sport, dport, proto)
            }
            #[inline(always)]
            fn prefilter_bucket(addr: $addr, port: u16, proto: u8) -> u32 {
                $bucket(addr, port, proto)
            }
            #[inline(always)]
            fn fold($fold_addr: $addr) -> u32 {
                $fold
            }
        }

        flow_key!($ct_key, $addr);
        flow_key!($nat_key, $addr);

        impl CtValue for $ct_entry {
            type Addr = $addr;
            #[inline(always)]
            fn new(
                backend_id: u32,
                service_id: u32,
                last_seen_ns: u64,
                flags: u32,
                backend_gen: u32,
                nat_addr: $addr,
                nat_port: u16,
            ) -> Self {
                Self {
                    backend_id,
                    service_id,
                    last_seen_ns,
                    flags,
                    backend_gen,
                    nat_addr,
                    nat_port,
                    _pad: $ct_pad,
                }
            }
            #[inline(always)]
            fn backend_id(&self) -> u32 {
                self.backend_id
            }
            #[inline(always)]
            fn service_id(&self) -> u32 {
                self.service_id
            }
            #[inline(always)]
            fn last_seen_ns_mut(&mut self) -> &mut u64 {
                &mut self.last_seen_ns
            }
            #[inline(always)]
            fn flags_mut(&mut self) -> &mut u32 {
                &mut self.flags
            }
            #[inline(always)]
            fn backend_gen_mut(&mut self) -> &mut u32 {
                &mut self.backend_gen
            }
            #[inline(always)]
            fn nat(&self) -> ($addr, u16) {
                (self.nat_addr, self.nat_port)
            }
            #[inline(always)]
            fn set_nat(&mut self, addr: $addr, port: u16) {
                self.nat_addr = addr;
                self.nat_port = port;
            }
        }

        impl BackendValue for $backend {
            type Addr = $addr;
            const NONE: Self = Self {
                addr: $zero,
                port: 0,
                proto: 0,
                state: 0,
                flags: 0,
                _pad: [0; 3],
            };
            #[inline(always)]
            fn target(&self) -> ($addr, u16) {
                (self.addr, self.port)
            }
            #[inline(always)]
            fn state(&self) -> u8 {
                self.state
            }
            #[inline(always)]
            fn flags(&self) -> u8 {
                self.flags
            }
        }

        impl NatValue for $nat_entry {
            type Addr = $addr;
            #[inline(always)]
            fn new(
                addr: $addr,
                port: u16,
                flags: u16,
                peer_addr: $addr,
                peer_port: u16,
                last_seen_ns: u64,
            ) -> Self {
                Self {
                    addr,
                    port,
                    flags,
                    peer_addr,
                    peer_port,
                    _pad: 0,
                    last_seen_ns,
                }
            }
            #[inline(always)]
            fn own(&self) -> ($addr, u16) {
                (self.addr, self.port)
            }
            #[inline(always)]
            fn peer(&self) -> ($addr, u16) {
                (self.peer_addr, self.peer_port)
            }
            #[inline(always)]
            fn flags_mut(&mut self) -> &mut u16 {
                &mut self.flags
            }
            #[inline(always)]
            fn last_seen_mut(&mut self) -> &mut u64 {
                &mut self.last_seen_ns
            }
            #[inline(always)]
            fn set_port(&mut self, port: u16) {
                self.port = port;
            }
        }
    };
}

family! {
    V4 {
        addr: u32 = 0,
        bits: 32,
        hairpin: HAIRPIN_ADDR,
        frontend: Frontend4,
        backend: Backend4,
        ct_key: Ct4Key,
        ct_entry: CtEntry { _pad: 0 },
        rev_nat: RevNat4,
        affinity_key: AffinityKey,
        source_range: SourceRange4,
        nat_key: Nat4Key,
        nat_entry: Nat4Entry,
        sock_key: SockKey {},
        sock_entry: SockEntry,
        flow_hash: flow_hash,
        bucket: prefilter::bucket,
        fold: |addr| addr,
    }
}

family! {
    V6 {
        addr: Addr6 = [0; 4],
        bits: 128,
        hairpin: HAIRPIN_ADDR6,
        frontend: Frontend6,
        backend: Backend6,
        ct_key: Ct6Key,
        ct_entry: Ct6Entry { _pad: [0; 3] },
        rev_nat: RevNat6,
        affinity_key: Affinity6Key,
        source_range: SourceRange6,
        nat_key: Nat6Key,
        nat_entry: Nat6Entry,
        sock_key: Sock6Key { _pad: 0 },
        sock_entry: Sock6Entry,
        flow_hash: flow_hash6,
        bucket: prefilter::bucket6,
        fold: |addr| addr[0] ^ addr[1] ^ addr[2] ^ addr[3],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BACKEND_ACTIVE, CT_REPLY, NAT_IN, PROTO_TCP};

    /// Generic code sees the same values as the fields, in both families.
    fn round_trip<F: Family>(a: F::Addr, b: F::Addr) {
        let mut key = F::CtKey::new(a, b, 1, 2, PROTO_TCP, CT_REPLY);
        assert!(key.saddr() == a && key.daddr() == b);
        assert_eq!((key.sport(), key.dport(), key.proto()), (1, 2, PROTO_TCP));
        key.set_dport(3);
        assert_eq!(key.dport(), 3);
        let mut entry = F::CtEntry::new(4, 5, 6, 7, 8, a, 9);
        assert_eq!((entry.backend_id(), entry.service_id()), (4, 5));
        assert_eq!(
            (
                *entry.last_seen_ns_mut(),
                *entry.flags_mut(),
                *entry.backend_gen_mut()
            ),
            (6, 7, 8)
        );
        entry.set_nat(b, 10);
        assert!(entry.nat() == (b, 10));
        let nat = F::NatEntry::new(a, 1, 2, b, 3, 4);
        assert!(nat.own() == (a, 1) && nat.peer() == (b, 3));
        let none = F::Backend::NONE;
        assert!(none.target() == (F::UNSPECIFIED, 0));
        assert_eq!((none.state(), none.flags()), (BACKEND_ACTIVE, 0));
        let (_, _, addr, port) = F::sock_entry_fields(&F::sock_entry(1, 2, a, 3));
        assert!(addr == a && port == 3);
        assert!(F::rev_nat_target(&F::rev_nat(b, 4)) == (b, 4));
        let _ = F::NatKey::new(a, b, 1, 2, PROTO_TCP, NAT_IN);
    }

    #[test]
    fn accessors_read_and_write_the_fields() {
        round_trip::<V4>(1, 2);
        round_trip::<V6>([1, 2, 3, 4], [5, 6, 7, 8]);
        let key = <V6 as Family>::CtKey::new([1, 2, 3, 4], [5; 4], 1, 2, 6, CT_REPLY);
        assert_eq!(key.saddr, [1, 2, 3, 4]);
        assert_eq!(V4::fold(7), 7);
        assert_eq!(V6::fold([1, 2, 4, 8]), 15);
        assert_eq!(V4::ADDR_BITS + V6::ADDR_BITS, 160);
    }
}
