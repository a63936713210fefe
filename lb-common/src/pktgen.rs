//! The benchmark's packet generator (`lb-pktgen`, embedded as `lb_userspace::PKTGEN_OBJECT`):
//! what it shares with `lb-bench`. Not part of the datapath.
//!
//! The generator is an XDP program on the interfaces that receive what the measured node
//! forwards (its peer on the wire, the pod's interface). It counts every frame that arrives
//! translated as expected ([`PktgenConfig`]'s destination), writes the next client frame
//! over it — the template [`PktgenConfig::frame`] with the next flow's source port — and
//! redirects it to the wire, back into the node. The frames circulate:
//! a few hundred seeded once keep the node's receive queue full, and every frame the node
//! receives is an XDP frame, as from a NIC. Frames that are not the expected ones are
//! counted apart and dropped.

/// Bytes of every generated frame: the shortest Ethernet frame (64 bytes on the wire with
/// the frame check sequence, which a veth does not carry).
pub const FRAME_LEN: usize = 60;
/// Offset of the IPv4 header (after an Ethernet header without VLAN tag).
pub const IP_OFF: usize = 14;
/// Offset of the L4 source port (IPv4 header of 20 bytes).
pub const SPORT_OFF: usize = 34;
/// Offset of the L4 destination port.
pub const DPORT_OFF: usize = 36;
/// Offset of the TCP checksum.
pub const TCP_CHECK_OFF: usize = 50;
/// Offset of the UDP checksum.
pub const UDP_CHECK_OFF: usize = 40;

/// Names of the maps of the generator's object (not pinned), and their schema.
pub mod map_names {
    use crate::schema::{Entries, MapKind, MapSpec};

    /// Array of one [`super::PktgenConfig`].
    pub const CONFIG: &str = "LB_PKTGEN_CFG";
    /// Per-CPU array of one `u64`: frames generated (the next flow's index).
    pub const SEQ: &str = "LB_PKTGEN_SEQ";
    /// Per-CPU array of one [`super::PktgenStats`].
    pub const STATS: &str = "LB_PKTGEN_STATS";

    /// Every map of the generator's object, as lb_userspace's object test holds it to.
    pub const ALL: [MapSpec; 3] = [
        MapSpec::new::<u32, super::PktgenConfig>(CONFIG, MapKind::Array, Entries::Fixed(1)),
        MapSpec::new::<u32, u64>(SEQ, MapKind::PerCpuArray, Entries::Fixed(1)),
        MapSpec::new::<u32, super::PktgenStats>(STATS, MapKind::PerCpuArray, Entries::Fixed(1)),
    ];
}

/// What the generator expects and sends. Frame `n` it generates is [`Self::frame`] with
/// source port `sport + n % flows` and its L4 checksum updated to match.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PktgenConfig {
    /// The frame of flow 0: Ethernet, IPv4 (20-byte header), TCP or UDP, checksums correct.
    pub frame: [u8; FRAME_LEN],
    /// The source port of flow 0, network byte order (as in `frame`).
    pub sport: u16,
    /// [`crate::PROTO_TCP`] or [`crate::PROTO_UDP`], of the frames sent and expected.
    pub proto: u8,
    /// 0: count and drop every frame (the circulation stops); else count and send on.
    pub active: u8,
    /// Flows (consecutive source ports, at most 65,536); 0 drops every frame.
    pub flows: u32,
    /// The interface generated frames leave by (a redirect).
    pub tx_ifindex: u32,
    /// Destination address of the expected frames, network byte order.
    pub expect_daddr: u32,
    /// Their destination port, network byte order.
    pub expect_dport: u16,
    /// Always 0.
    pub _pad: u16,
}

/// What the generator counted (one per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PktgenStats {
    /// Expected frames that arrived: IPv4 with a 20-byte header, of the protocol, to the
    /// destination address and port of [`PktgenConfig`].
    pub matched: u64,
    /// Every other frame that arrived.
    pub other: u64,
    /// Expected frames that arrived while [`PktgenConfig::active`] was 0 (also in `matched`):
    /// after a stop, the frames that were still circulating, each counted once as it comes
    /// back, however late the stopping thread reads the counters.
    pub drained: u64,
    /// Source address of the last matched frame, network byte order.
    pub last_saddr: u32,
    /// Source port of the last matched frame, network byte order.
    pub last_sport: u16,
    /// Always 0.
    pub _pad: u16,
}

/// The L4 checksum of a generated frame whose source port changed from `old` to `new` (both
/// in network byte order, as in the frame), `check` the template's checksum: a UDP datagram
/// sent without a checksum (0) keeps none, and a UDP checksum that comes out as 0 is sent as
/// all ones (RFC 768).
#[inline(always)]
pub const fn sport_check(proto: u8, check: u16, old: u16, new: u16) -> u16 {
    if proto == crate::PROTO_UDP && check == 0 {
        return 0;
    }
    let sum = crate::csum::replace2(check, old, new);
    if proto == crate::PROTO_UDP && sum == 0 {
        0xffff
    } else {
        sum
    }
}

const _: () = {
    assert!(core::mem::size_of::<PktgenConfig>() == 80);
    assert!(core::mem::size_of::<PktgenStats>() == 32);
    assert!(TCP_CHECK_OFF + 2 <= FRAME_LEN && UDP_CHECK_OFF + 2 <= FRAME_LEN);
};

#[cfg(feature = "user")]
mod user {
    // SAFETY: #[repr(C)], explicit padding, only integer fields: every bit pattern is valid
    // and there are no implicit padding bytes.
    unsafe impl aya::Pod for super::PktgenConfig {}
    unsafe impl aya::Pod for super::PktgenStats {}
}
