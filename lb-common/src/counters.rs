//! The indexes of the datapath's counter arrays, as typed enums: [`Reason`]
//! ([`crate::map_names::REASON_STATS`]), [`Event`] ([`crate::map_names::EVENTS`]),
//! [`NatEvent`] ([`crate::map_names::NAT_EVENTS`]) and [`TableEvent`]
//! ([`crate::map_names::TABLE_EVENTS`]).
//!
//! Each enum is declared by the `counters!` macro with every counter's index and its name (for `lb stats` and the metrics) in one place, so that a counter cannot exist
//! without its name. The indexes are fixed: the arrays are pinned and outlive upgrades, so a
//! counter keeps its index for good and a new one takes the next.

/// Declares a counter array's indexes: an enum whose variants are the indexes
/// `0..COUNT`, in order (checked at compile time), each with its name. The enum gets `ALL`
/// (every counter, by index), `COUNT` (the size of the array), `NAMES` (each name, by
/// index), `index`, `name` and `from_index`.
macro_rules! counters {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $(
                $(#[$variant_meta:meta])*
                $variant:ident = $index:literal => $label:literal,
            )*
        }
    ) => {
        $(#[$meta])*
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $(
                $(#[$variant_meta])*
                $variant = $index,
            )*
        }

        impl $name {
            /// Every counter, by index.
            pub const ALL: &'static [Self] = &[$(Self::$variant),*];
            /// Number of counters: the size of the array.
            pub const COUNT: u32 = Self::ALL.len() as u32;
            /// The name of each counter, by index, for `lb stats` and the metrics.
            pub const NAMES: &'static [&'static str] = &[$($label),*];

            /// The counter's index in its array.
            #[inline(always)]
            pub const fn index(self) -> u32 {
                self as u32
            }

            /// The counter's name.
            pub const fn name(self) -> &'static str {
                Self::NAMES[self as usize]
            }

            /// The counter at `index`, if there is one.
            pub const fn from_index(index: u32) -> Option<Self> {
                if (index as usize) < Self::ALL.len() {
                    Some(Self::ALL[index as usize])
                } else {
                    None
                }
            }
        }

        // The indexes are 0..COUNT in order, so ALL and NAMES are indexed by them.
        const _: () = {
            let mut i = 0;
            while i < $name::ALL.len() {
                assert!($name::ALL[i] as usize == i);
                i += 1;
            }
        };
    };
}

counters! {
    /// Indexes of [`crate::map_names::REASON_STATS`]: why a packet was not translated, or
    /// why it was dropped. The datapath passes everything it cannot prove is for a frontend
    /// (the kernel then handles it as if we were not there) and drops only frontend packets
    /// it cannot serve.
    pub enum Reason {
        /// Passed: neither IPv4 nor IPv6 (ARP, VLAN-tagged, ...).
        NotIp = 0 => "not_ip",
        /// Passed: shorter than an Ethernet header.
        ShortEthernet = 1 => "short_ethernet",
        /// Passed: shorter than an IPv4 header.
        ShortIpv4 = 2 => "short_ipv4",
        /// Passed: IPv4 version field is not 4 or IHL < 5.
        BadIpv4Header = 3 => "bad_ipv4_header",
        /// Passed: IPv4 options present (IHL > 5); we do not translate them.
        Ipv4Options = 4 => "ipv4_options",
        /// Passed: a fragment (MF set or offset > 0); only whole datagrams are translated.
        Ipv4Fragment = 5 => "ipv4_fragment",
        /// Passed: total length is below the header length or beyond the received bytes.
        BadIpv4Length = 6 => "bad_ipv4_length",
        /// Passed: neither TCP nor UDP.
        NotTcpUdp = 7 => "not_tcp_udp",
        /// Passed: the TCP or UDP header is cut short.
        ShortL4 = 8 => "short_l4",
        /// Passed: not addressed to a frontend.
        NotFrontend = 9 => "not_frontend",
        /// Dropped: the frontend has no backend while its Service has endpoints (a Local
        /// policy whose endpoints are all on other nodes; kube-proxy drops these too).
        NoBackend = 10 => "no_backend",
        /// Dropped: a slot names a backend id that is not in the backends map.
        BackendMissing = 11 => "backend_missing",
        /// Translated, but the conntrack entry could not be written.
        CtInsertFailed = 12 => "ct_insert_failed",
        /// Egress, passed: a reply whose conntrack entry does not carry its frontend
        /// (migrated from V1) and whose service has no reverse-NAT entry any more.
        RevNatMissing = 13 => "rev_nat_missing",
        /// TC, dropped: a packet that could not be rewritten (skb helper failed): a reply on
        /// the external interface, or either direction on a pod interface.
        ReplyRewriteFailed = 14 => "reply_rewrite_failed",
        /// Dropped: a new flow from a source outside the frontend's
        /// loadBalancerSourceRanges.
        SourceRangeDenied = 15 => "source_range_denied",
        /// Passed: shorter than an IPv6 header.
        ShortIpv6 = 16 => "short_ipv6",
        /// Passed: an IPv6 ethertype whose header's version field is not 6.
        BadIpv6Header = 17 => "bad_ipv6_header",
        /// Passed: the IPv6 payload length is beyond the received bytes or shorter than the
        /// TCP or UDP header (a jumbogram's 0 included).
        BadIpv6Length = 18 => "bad_ipv6_length",
        /// Passed: an IPv6 extension header (hop-by-hop, routing, fragment, destination
        /// options, AH, ...) follows the fixed header; only TCP or UDP right after it is
        /// translated.
        Ipv6Extension = 19 => "ipv6_extension",
        /// Passed: an IPv6 UDP datagram with checksum 0, which IPv6 forbids (RFC 8200 8.1).
        Ipv6UdpZeroChecksum = 20 => "ipv6_udp_zero_checksum",
        /// Dropped: an IPv6 packet to a remote backend (or passed: a reply to a NAT port, an
        /// ICMPv6 error) while the slot of the IPv6 NAT program (or of the ICMPv6 one) in
        /// [`crate::map_names::PROGRAMS`] is empty (the tail call returned); and the same for
        /// the direct server return programs of either family (the name is older than they).
        Nat6ProgramMissing = 21 => "nat6_program_missing",
        /// Passed: an IPv6 frame while the IPv6 program's slot of
        /// [`crate::map_names::PROGRAMS`] (XDP) or [`crate::map_names::TC_PROGRAMS`] (the
        /// pod interfaces' TC program) is empty (the tail call returned).
        Ipv6ProgramMissing = 22 => "ipv6_program_missing",
        /// Answered: a new flow to a frontend whose Service has no usable endpoint anywhere
        /// ([`crate::SERVICE_F_REJECT`]) got ICMP (ICMPv6) port unreachable, sent back out
        /// of the interface it came in by (or dropped, when the frame could not be turned
        /// into one).
        Rejected = 23 => "rejected_no_endpoints",
    }
}

counters! {
    /// Indexes of [`crate::map_names::EVENTS`]: how flows got their backend, and the
    /// conntrack writes, counted per packet (or per entry) for `lb stats` and `lb explain`.
    ///
    /// Conntrack semantics (the datapath implements exactly these):
    /// - a conntrack hit on an ACTIVE or TERMINATING backend keeps it (established flows
    ///   keep their backend while others come and go; terminating backends drain);
    /// - a TCP SYN whose entry points at a backend that is not ACTIVE (or is missing)
    ///   selects again and overwrites the entries ([`Event::ReselectSyn`]: port reuse);
    /// - any UDP packet whose entry points at a REMOVED or missing backend selects again
    ///   ([`Event::ReselectUdp`]);
    /// - an established TCP packet whose backend is REMOVED keeps going to it during the
    ///   drain ([`Event::DrainRemoved`]); once the entry is gone it selects again
    ///   ([`Event::ReselectGone`]), so the new backend answers RST and the client fails
    ///   fast instead of hanging.
    ///
    /// Conntrack evictions are not counted by the kernel; they follow from these counters:
    /// `evictions = CtInserts - CtDeletes - occupancy` (the datapath is the only writer and
    /// only the agent's teardown deletes otherwise).
    pub enum Event {
        /// Conntrack entries created (new keys only; overwrites are not counted).
        CtInserts = 0 => "ct_inserts",
        /// Conntrack entries the datapath deleted (the old reply entry of a re-selected
        /// flow).
        CtDeletes = 1 => "ct_deletes",
        /// New flows whose backend came from the Maglev table entry of their flow hash.
        SelectMaglev = 2 => "select_maglev",
        /// New flows whose backend came from a random Maglev table entry.
        SelectRandom = 3 => "select_random",
        /// New flows whose backend came from the client's fresh affinity entry.
        SelectAffinity = 4 => "select_affinity",
        /// Affinity entries ignored because they expired.
        AffinityExpired = 5 => "affinity_expired",
        /// Affinity entries ignored because their backend is not ACTIVE (or is gone).
        AffinityNotActive = 6 => "affinity_not_active",
        /// TCP SYNs of a known flow whose backend is not ACTIVE or is gone: selected again.
        ReselectSyn = 7 => "reselect_syn",
        /// UDP packets of a known flow whose backend is REMOVED or gone: selected again.
        ReselectUdp = 8 => "reselect_udp",
        /// Established TCP packets whose backend entry is gone (after the drain): selected
        /// again.
        ReselectGone = 9 => "reselect_gone",
        /// Established TCP packets sent on to a REMOVED backend during its drain.
        DrainRemoved = 10 => "drain_removed",
    }
}

counters! {
    /// Indexes of [`crate::map_names::NAT_EVENTS`]: what the source NAT, the forwarding of
    /// translated packets and the ICMP translation did, counted per packet (or per entry).
    pub enum NatEvent {
        /// NAT ports allocated to new flows.
        Allocated = 0 => "nat_allocated",
        /// Allocations that took over an expired entry.
        ReusedExpired = 1 => "nat_reused_expired",
        /// Ports found taken (by a live entry) while allocating.
        PortTaken = 2 => "nat_port_taken",
        /// Dropped: no free port after [`crate::nat::TRIES`] tries.
        Exhausted = 3 => "nat_exhausted",
        /// Flows whose NAT port had been taken over: given a new one.
        PortLost = 4 => "nat_port_lost",
        /// Replies from a remote backend translated back (NAT and frontend undone).
        Replies = 5 => "nat_replies",
        /// Translated packets sent out of the interface they came in by (XDP_TX).
        Tx = 6 => "fwd_tx",
        /// Translated packets redirected to another interface (XDP), and replies a pod's
        /// interface translated sent out of the route's interface (TC, route.rs).
        Redirect = 7 => "fwd_redirect",
        /// Translated packets handed to the kernel to forward, because the next hop's
        /// neighbour entry is not resolved yet (the kernel resolves it; the next packets go
        /// by XDP).
        NoNeigh = 8 => "fwd_no_neigh",
        /// Dropped: no route towards the backend or the client (or forwarding is off).
        NoRoute = 9 => "fwd_no_route",
        /// ICMP errors about a NATed flow translated back for the client (XDP).
        IcmpNat = 10 => "icmp_nat",
        /// ICMP and ICMPv6 errors about a flow to a local backend translated back for the
        /// client (TC).
        IcmpLocal = 11 => "icmp_local",
        /// Packets of direct server return flows sent to their remote backend in a carrier
        /// (XDP; `lb_common::dsr`).
        DsrSent = 12 => "dsr_sent",
        /// Carriers unwrapped here: their packet passed on to its backend, its flow's reply
        /// entry recorded (XDP).
        DsrReceived = 13 => "dsr_received",
        /// Packets of direct server return flows too large for the carrier on the route's MTU:
        /// answered with ICMP fragmentation needed (ICMPv6 packet too big) and the MTU left
        /// for them, or dropped when an IPv4 packet may be fragmented (XDP).
        DsrTooBig = 14 => "dsr_too_big",
        /// Dropped: carriers to this node whose carried packet is not one lb translates (not
        /// TCP or UDP, options, not addressed to the carrier's destination).
        DsrInvalid = 15 => "dsr_invalid",
    }
}

counters! {
    /// Indexes of [`crate::map_names::TABLE_EVENTS`]: new keys the datapath inserted into
    /// its LRU tables. Only the datapath inserts and nothing deletes, so
    /// `evictions = inserts - entries` (the kernel evicts the least recently used entries
    /// of a full LRU map without a trace).
    pub enum TableEvent {
        /// New sessionAffinity entries in [`crate::map_names::AFFINITY`] and
        /// [`crate::map_names::AFFINITY6`] (XDP and TC).
        AffinityInserts = 0 => "affinity_inserts",
        /// New sessionAffinity entries in [`crate::map_names::SOCK_AFFINITY`] (socket
        /// hooks).
        SockAffinityInserts = 1 => "sock_affinity_inserts",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_match_the_indexes() {
        for names in [
            Reason::NAMES,
            Event::NAMES,
            NatEvent::NAMES,
            TableEvent::NAMES,
        ] {
            for (i, a) in names.iter().enumerate() {
                for b in &names[i + 1..] {
                    assert_ne!(a, b);
                }
            }
        }
        // Pinned arrays outlive upgrades: these indexes never change.
        // (Adding one grows the array: its map's version goes up, LB_REASON_V4.)
        assert_eq!(Reason::COUNT, 24);
        assert_eq!(Reason::NotFrontend as u32, 9);
        assert_eq!(Reason::NotFrontend.name(), "not_frontend");
        assert_eq!(Reason::from_index(22), Some(Reason::Ipv6ProgramMissing));
        assert_eq!(Reason::from_index(23), Some(Reason::Rejected));
        assert_eq!(Reason::from_index(24), None);
        assert_eq!(Event::COUNT, 11);
        assert_eq!(Event::DrainRemoved.index(), 10);
        assert_eq!(NatEvent::COUNT, 16);
        assert_eq!(NatEvent::IcmpLocal.name(), "icmp_local");
        assert_eq!(TableEvent::COUNT, 2);
        assert_eq!(TableEvent::SockAffinityInserts.index(), 1);
    }
}
