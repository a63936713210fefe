//! The IPv6 maps' keys and values (see the crate's rules: `#[repr(C)]`, explicit padding,
//! network byte order, sizes asserted).
//!
//! An IPv6 address is stored as [`Addr6`]: its 16 octets in memory order, read as four
//! `u32` (`addr6(ip.octets())`), which is how it sits in the packet.
//!
//! The two families share one id space and every map keyed by id alone: service ids (the
//! Maglev tables, [`crate::map_names::SERVICE_STATS`]), backend ids
//! ([`crate::map_names::BACKEND_STATS`]; a v6 service's Maglev table names v6 backend ids,
//! which are keys of [`crate::map_names::BACKENDS6`]), the backend generation, the reason
//! and event counters and the pre-filter bitmap ([`crate::prefilter::bucket6`]). The maps
//! keyed by an address have a v6 twin.

use crate::{CtEntry, Service};

/// An IPv6 address: the 16 octets in memory order, as four `u32` (network byte order).
pub type Addr6 = [u32; 4];

/// The [`Addr6`] of an address's octets.
#[inline(always)]
pub const fn addr6(octets: [u8; 16]) -> Addr6 {
    let o = octets;
    [
        u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
        u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
        u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
        u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
    ]
}

/// The octets of an [`Addr6`].
#[inline(always)]
pub const fn octets6(addr: Addr6) -> [u8; 16] {
    let [a, b, c, d] = [
        addr[0].to_ne_bytes(),
        addr[1].to_ne_bytes(),
        addr[2].to_ne_bytes(),
        addr[3].to_ne_bytes(),
    ];
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

/// The source address a pod sees on an IPv6 flow to a frontend that was given the pod
/// itself as its backend (hairpin), as [`crate::HAIRPIN_ADDR`] for IPv4: the pod
/// interfaces' TC program puts it in place of the pod's own address, and puts the pod's
/// address back into the replies. `fd6c:6268:6169::1`: a unique local address (RFC 4193) of
/// a global ID chosen for this (the octets spell "lbhai"), so that it is in no cluster's
/// pod or Service range and is routed by the pod to its default gateway, the node.
pub const HAIRPIN_ADDR6: Addr6 = addr6([
    0xfd, 0x6c, 0x62, 0x68, 0x61, 0x69, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
]);

/// Key of [`crate::map_names::SERVICES6`]: one IPv6 frontend. The value is a [`Service`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend6 {
    /// Frontend IPv6 address, network byte order.
    pub addr: Addr6,
    /// Frontend port, network byte order.
    pub port: u16,
    /// [`crate::PROTO_TCP`] or [`crate::PROTO_UDP`].
    pub proto: u8,
    /// Always 0.
    pub _pad: u8,
}

/// Value of [`crate::map_names::BACKENDS6`]: [`crate::Backend4`] with an IPv6 address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Backend6 {
    /// Backend (pod) IPv6 address, network byte order.
    pub addr: Addr6,
    /// Backend port, network byte order.
    pub port: u16,
    /// [`crate::PROTO_TCP`] or [`crate::PROTO_UDP`].
    pub proto: u8,
    /// [`crate::BACKEND_ACTIVE`], [`crate::BACKEND_TERMINATING`] or
    /// [`crate::BACKEND_REMOVED`].
    pub state: u8,
    /// `BACKEND_F_*` bits.
    pub flags: u8,
    /// Always 0.
    pub _pad: [u8; 3],
}

/// Key of [`crate::map_names::CONNTRACK6`]: [`crate::Ct4Key`] with IPv6 addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ct6Key {
    /// Source IPv6 address, network byte order.
    pub saddr: Addr6,
    /// Destination IPv6 address, network byte order.
    pub daddr: Addr6,
    /// Source port, network byte order.
    pub sport: u16,
    /// Destination port, network byte order.
    pub dport: u16,
    /// [`crate::PROTO_TCP`] or [`crate::PROTO_UDP`].
    pub proto: u8,
    /// [`crate::CT_FORWARD`] or [`crate::CT_REPLY`].
    pub dir: u8,
    /// Always 0.
    pub _pad: [u8; 2],
}

/// Value of [`crate::map_names::CONNTRACK6`]: the fields of [`CtEntry`], with an IPv6
/// translation address. `nat_addr` all zero means "not recorded".
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ct6Entry {
    /// The backend this flow was given.
    pub backend_id: u32,
    /// The service (frontend) the flow was addressed to.
    pub service_id: u32,
    /// As [`CtEntry::last_seen_ns`].
    pub last_seen_ns: u64,
    /// `CT_F_*` bits.
    pub flags: u32,
    /// As [`CtEntry::backend_gen`].
    pub backend_gen: u32,
    /// Forward: the backend's IPv6 address; reply: the frontend's. Network byte order.
    pub nat_addr: Addr6,
    /// Forward: the backend's port; reply: the frontend's. Network byte order.
    pub nat_port: u16,
    /// Always 0.
    pub _pad: [u16; 3],
}

/// Value of [`crate::map_names::REV_NAT6`] (keyed by service id): the IPv6 frontend
/// replies must come from.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RevNat6 {
    /// Frontend IPv6 address, network byte order.
    pub addr: Addr6,
    /// Frontend port, network byte order.
    pub port: u16,
    /// Always 0.
    pub _pad: u16,
}

/// Key of [`crate::map_names::AFFINITY6`]: an IPv6 client of a service. The value is an
/// [`crate::AffinityEntry`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Affinity6Key {
    /// [`Service::id`].
    pub service_id: u32,
    /// Client IPv6 address, network byte order.
    pub client: Addr6,
}

/// Key of [`crate::map_names::SOCKETS6`]: [`crate::SockKey`] with an IPv6 address (a socket
/// and an address it exchanged data with).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Sock6Key {
    /// The socket's cookie (`bpf_get_socket_cookie`).
    pub cookie: u64,
    /// IPv6 address, network byte order: [`crate::CT_FORWARD`] a frontend,
    /// [`crate::CT_REPLY`] a backend.
    pub addr: Addr6,
    /// Port, network byte order.
    pub port: u16,
    /// [`crate::PROTO_TCP`] or [`crate::PROTO_UDP`].
    pub proto: u8,
    /// [`crate::CT_FORWARD`] or [`crate::CT_REPLY`].
    pub dir: u8,
    /// Always 0.
    pub _pad: u32,
}

/// Value of [`crate::map_names::SOCKETS6`]: [`crate::SockEntry`] with an IPv6 address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Sock6Entry {
    /// The backend the socket was given.
    pub backend_id: u32,
    /// The service (frontend) it addressed.
    pub service_id: u32,
    /// [`crate::CT_REPLY`] entries: the frontend's IPv6 address, network byte order; else
    /// the backend's.
    pub addr: Addr6,
    /// [`crate::CT_REPLY`] entries: the frontend's port, network byte order; else the
    /// backend's.
    pub port: u16,
    /// Always 0.
    pub _pad: u16,
}

/// The data of a [`crate::map_names::SOURCE_RANGES6`] key, as [`crate::SourceRange4`]:
/// the prefix length counts [`crate::SOURCE_RANGE_ID_BITS`] plus the network's.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRange6 {
    /// [`Service::id`].
    pub service_id: u32,
    /// Source IPv6 address or network, network byte order.
    pub addr: Addr6,
}

/// Key of [`crate::map_names::NAT6`]: [`crate::Nat4Key`] with IPv6 addresses, in the same
/// two directions ([`crate::NAT_OUT`]: client, frontend; [`crate::NAT_IN`]: backend, NAT
/// address, backend port, NAT port).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Nat6Key {
    /// Source IPv6 address, network byte order.
    pub saddr: Addr6,
    /// Destination IPv6 address, network byte order.
    pub daddr: Addr6,
    /// Source port, network byte order.
    pub sport: u16,
    /// Destination port, network byte order.
    pub dport: u16,
    /// [`crate::PROTO_TCP`] or [`crate::PROTO_UDP`].
    pub proto: u8,
    /// [`crate::NAT_OUT`] or [`crate::NAT_IN`].
    pub dir: u8,
    /// Always 0.
    pub _pad: [u8; 2],
}

/// Value of [`crate::map_names::NAT6`]: the fields of [`crate::Nat4Entry`], with IPv6
/// addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Nat6Entry {
    /// [`crate::NAT_OUT`]: the NAT (source) address the flow leaves with;
    /// [`crate::NAT_IN`]: the client's address. Network byte order.
    pub addr: Addr6,
    /// [`crate::NAT_OUT`]: the NAT port; [`crate::NAT_IN`]: the client's port. Network
    /// byte order.
    pub port: u16,
    /// `NAT_F_*` bits.
    pub flags: u16,
    /// [`crate::NAT_IN`]: the frontend address the client addressed; [`crate::NAT_OUT`]:
    /// the backend address. Network byte order.
    pub peer_addr: Addr6,
    /// [`crate::NAT_IN`]: the frontend port; [`crate::NAT_OUT`]: the backend port. Network
    /// byte order.
    pub peer_port: u16,
    /// Always 0.
    pub _pad: u16,
    /// `bpf_ktime_get_ns()` of the last packet of the flow in this direction.
    pub last_seen_ns: u64,
}

/// Value of [`crate::map_names::NAT6_PENDING`]: the packet the IPv6 NAT program is
/// tail-called for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Nat6Pending {
    /// [`NAT6_FORWARD`]: the flow's forward conntrack key (client, frontend); the packet's
    /// destination is already the backend.
    pub key: Ct6Key,
    /// [`NAT6_FORWARD`]: the remote backend's address, network byte order.
    pub backend_addr: Addr6,
    /// [`NAT6_FORWARD`]: the remote backend's port, network byte order.
    pub backend_port: u16,
    /// [`NAT6_FORWARD`]: the packet is a TCP FIN or RST.
    pub closing: u8,
    /// [`NAT6_FORWARD`], [`NAT6_REPLY`], [`NAT6_DSR`] or [`NAT6_DECAP`].
    pub kind: u8,
    /// Always 0.
    pub _pad: [u8; 4],
}

/// [`Nat6Pending::kind`]: a packet to source-NAT and send on to its remote backend.
pub const NAT6_FORWARD: u8 = 1;
/// [`Nat6Pending::kind`]: a packet to a NAT port, maybe a remote backend's reply (only the
/// kind is set).
pub const NAT6_REPLY: u8 = 2;
/// [`Nat6Pending::kind`]: a packet of a direct server return flow to wrap in a
/// [`crate::dsr`] carrier and send to its remote backend (`key`, `backend_*`, `closing` set
/// as for [`NAT6_FORWARD`]; the packet is not translated yet).
pub const NAT6_DSR: u8 = 3;
/// [`Nat6Pending::kind`]: a packet to [`crate::dsr::PORT`], maybe a [`crate::dsr`] carrier to
/// unwrap (only the kind is set).
pub const NAT6_DECAP: u8 = 4;

impl Frontend6 {
    /// A frontend from host-order values.
    pub const fn new(octets: [u8; 16], port: u16, proto: u8) -> Self {
        Self {
            addr: addr6(octets),
            port: port.to_be(),
            proto,
            _pad: 0,
        }
    }
    /// The address's octets.
    pub const fn octets(&self) -> [u8; 16] {
        octets6(self.addr)
    }
    /// The port in host byte order.
    pub const fn port(&self) -> u16 {
        u16::from_be(self.port)
    }
}

impl Backend6 {
    /// A backend from host-order values, with no flags.
    pub const fn new(octets: [u8; 16], port: u16, proto: u8, state: u8) -> Self {
        Self {
            addr: addr6(octets),
            port: port.to_be(),
            proto,
            state,
            flags: 0,
            _pad: [0; 3],
        }
    }
    /// The address's octets.
    pub const fn octets(&self) -> [u8; 16] {
        octets6(self.addr)
    }
    /// The port in host byte order.
    pub const fn port(&self) -> u16 {
        u16::from_be(self.port)
    }
}

const _: () = {
    assert!(core::mem::size_of::<Frontend6>() == 20);
    assert!(core::mem::size_of::<Backend6>() == 24);
    assert!(core::mem::size_of::<Ct6Key>() == 40);
    assert!(core::mem::size_of::<Ct6Entry>() == 48);
    assert!(core::mem::align_of::<Ct6Entry>() == 8);
    assert!(core::mem::size_of::<Ct6Entry>() == core::mem::size_of::<CtEntry>() + 16);
    assert!(core::mem::size_of::<RevNat6>() == 20);
    assert!(core::mem::size_of::<Affinity6Key>() == 20);
    assert!(core::mem::size_of::<SourceRange6>() == 20);
    assert!(core::mem::size_of::<Service>() == 16);
    assert!(core::mem::size_of::<Sock6Key>() == 32);
    assert!(core::mem::align_of::<Sock6Key>() == 8);
    assert!(core::mem::size_of::<Sock6Entry>() == 28);
    assert!(core::mem::size_of::<Nat6Key>() == 40);
    assert!(core::mem::size_of::<Nat6Pending>() == 64);
    assert!(core::mem::size_of::<Nat6Entry>() == 48);
    assert!(core::mem::align_of::<Nat6Entry>() == 8);
    assert!(core::mem::offset_of!(Nat6Entry, peer_addr) == 20);
    assert!(core::mem::offset_of!(Nat6Entry, last_seen_ns) == 40);
};

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: #[repr(C)], explicit padding, integer fields only (sizes asserted above).
    unsafe impl aya::Pod for Frontend6 {}
    unsafe impl aya::Pod for Backend6 {}
    unsafe impl aya::Pod for Ct6Key {}
    unsafe impl aya::Pod for Ct6Entry {}
    unsafe impl aya::Pod for RevNat6 {}
    unsafe impl aya::Pod for Affinity6Key {}
    unsafe impl aya::Pod for SourceRange6 {}
    unsafe impl aya::Pod for Sock6Key {}
    unsafe impl aya::Pod for Sock6Entry {}
    unsafe impl aya::Pod for Nat6Key {}
    unsafe impl aya::Pod for Nat6Entry {}
    unsafe impl aya::Pod for Nat6Pending {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addr6_keeps_the_octets_in_memory_order() {
        let octets = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x12, 0x34];
        let a = addr6(octets);
        assert_eq!(octets6(a), octets);
        // In memory exactly as in the packet.
        let bytes: [u8; 16] = unsafe { core::mem::transmute(a) };
        assert_eq!(bytes, octets);
        let f = Frontend6::new(octets, 8080, crate::PROTO_TCP);
        assert_eq!((f.octets(), f.port()), (octets, 8080));
    }
}
