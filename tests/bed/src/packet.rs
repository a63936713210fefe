//! The packet-test bed: the real programs, run by the kernel through BPF_PROG_TEST_RUN on
//! hand-built packets, with maps filled by hand through the agent's map operations. Expected
//! output packets are built independently by etherparse (which computes its own checksums),
//! and the expected backend of a new flow is computed here from the Maglev builder and the
//! flow hash, not read back from the maps.
//!
//! Needs root and bpffs (mounted if missing). Each bed pins its maps in its own directory
//! under /sys/fs/bpf, removed on drop, also when the test fails.

use lb_userspace::datapath::Pins;
use std::{collections::HashMap as StdHashMap, path::PathBuf};

use crate::PinDir;
use aya::{
    maps::{HashMap, Map, MapData},
    programs::{SchedClassifier, TestRun, TestRunOptions, TestRunResult, Xdp},
};
use etherparse::{Ethernet2Header, IpHeaders, PacketBuilder, PacketBuilderStep};
use lb_common::{
    Affinity6Key, AffinityEntry, AffinityKey, BACKEND_ACTIVE, Backend4, Backend6, Ct4Key, Ct6Entry,
    Ct6Key, CtEntry, Frontend4, Frontend6, RevNat4, RevNat6, Service, addr6, flow_hash, flow_hash6,
    map_names, prefilter, program_names,
};
use lb_userspace::{
    datapath::{
        BpfMaps, Counters, Datapath,
        maps::{BackendEntry, DatapathMaps, RevNatEntry, TableRef},
    },
    model::{IpCidr, IpFamily, Ipv4Cidr, Ipv6Cidr},
    plan::{desired::FrontendKey, maglev},
};

/// The XDP verdicts and the TC action the programs return.
pub const XDP_DROP: u32 = 1;
/// See [`XDP_DROP`].
pub const XDP_PASS: u32 = 2;
/// See [`XDP_DROP`].
pub const TC_ACT_OK: u32 = 0;

/// The client the packets come from, and the MAC addresses of their Ethernet header.
pub const CLIENT: [u8; 4] = [10, 200, 0, 2];
/// See [`CLIENT`].
pub const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
/// See [`CLIENT`].
pub const NODE_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
/// Pod addresses the tests use as backends.
pub const POD1: [u8; 4] = [10, 244, 1, 2];
/// See [`POD1`].
pub const POD2: [u8; 4] = [10, 244, 2, 2];
/// See [`POD1`].
pub const POD3: [u8; 4] = [10, 244, 3, 2];

/// The table size the bed programs: the agent's default.
pub const TABLE_SIZE: u32 = maglev::DEFAULT_TABLE_SIZE;

/// A loaded datapath with its own pin directory, removed on drop.
pub struct Bed {
    /// The loaded programs.
    pub dp: Datapath,
    /// Its maps, which the tests fill.
    pub maps: BpfMaps,
    /// Its pin directory.
    pub pin: PathBuf,
    next_backend_id: u32,
    /// Each backend id's backend, as programmed.
    pub backends: StdHashMap<u32, Backend4>,
    /// Each IPv6 backend id's backend, as programmed (the ids are shared with `backends`).
    pub backends6: StdHashMap<u32, Backend6>,
    /// Each service id's table, as programmed (backend ids).
    pub tables: StdHashMap<u32, Vec<u32>>,
    // Last: torn down after the maps are closed.
    _pins: PinDir,
}

impl Default for Bed {
    fn default() -> Self {
        Self::new()
    }
}

impl Bed {
    /// Loads the datapath into a new pin directory, with its programs verified.
    pub fn new() -> Self {
        // Removed on drop, also when a panic below leaves no Bed (the maps are pinned first).
        let pins = PinDir::new().expect("a pin directory");
        let pin = pins.path().to_owned();
        let mut dp = Datapath::load(&Pins::new(&pin))
            .unwrap_or_else(|e| panic!("loading the datapath: {e}"));
        dp.load_programs()
            .unwrap_or_else(|e| panic!("verifying the programs: {e:?}"));
        let maps = dp.take_maps().expect("maps");
        Bed {
            dp,
            maps,
            pin,
            next_backend_id: 1,
            backends: StdHashMap::new(),
            backends6: StdHashMap::new(),
            tables: StdHashMap::new(),
            _pins: pins,
        }
    }

    /// Writes `backend` under a new id.
    pub fn backend(&mut self, backend: Backend4) -> u32 {
        let id = self.next_backend_id;
        self.next_backend_id += 1;
        self.new_backend(id, backend);
        id
    }

    /// Writes backend `id` as the agent writes a new one: its counters' slot zeroed first.
    pub fn new_backend(&mut self, id: u32, backend: Backend4) {
        self.maps.reset_backend_stats(id).unwrap();
        self.set_backend(id, backend);
    }

    /// Writes (or rewrites) backend `id`.
    pub fn set_backend(&mut self, id: u32, backend: Backend4) {
        self.maps
            .put_backend(id, &BackendEntry::V4(backend))
            .unwrap();
        self.backends.insert(id, backend);
    }

    /// Rewrites the state of backend `id`.
    pub fn set_state(&mut self, id: u32, state: u8) {
        let backend = Backend4 {
            state,
            ..self.backends[&id]
        };
        self.set_backend(id, backend);
    }

    /// Deletes backend `id` (its drain is over).
    pub fn delete_backend(&mut self, id: u32) {
        self.maps.delete_backend(id, IpFamily::V4).unwrap();
        self.backends.remove(&id);
    }

    /// Programs `frontend` as service `id` whose new flows choose among `table` (backend
    /// ids, already written): a Maglev table built here, then reverse NAT, then the entry.
    pub fn program(
        &mut self,
        id: u32,
        frontend: Frontend4,
        table: &[u32],
        flags: u32,
        affinity: u32,
    ) {
        if !table.is_empty() {
            let identities: Vec<_> = table
                .iter()
                .map(|b| BackendEntry::V4(self.backends[b]).identity())
                .collect();
            let built = maglev::build(&identities, TABLE_SIZE).unwrap();
            let entries: Vec<u32> = built.entries().iter().map(|&i| table[i as usize]).collect();
            self.table(id, &entries, table.len() as u32);
        }
        self.maps
            .put_rev_nat(id, &RevNatEntry::V4(RevNat4::of(&frontend)))
            .unwrap();
        let svc = Service {
            id,
            backend_count: table.len() as u32,
            flags,
            affinity_timeout_secs: affinity,
        };
        self.set_prefilter(&frontend, true);
        self.maps.services.insert(frontend, svc, 0).unwrap();
    }

    /// The word and bit of `frontend`'s pre-filter bucket.
    fn prefilter_bit(frontend: &Frontend4) -> (u32, u64) {
        prefilter::position(prefilter::bucket(
            frontend.addr,
            frontend.port,
            frontend.proto,
        ))
    }

    /// Sets (or clears) the pre-filter bit of `frontend`'s bucket.
    pub fn set_prefilter(&mut self, frontend: &Frontend4, on: bool) {
        let (index, bit) = Self::prefilter_bit(frontend);
        let word = self.maps.prefilter.get(&index, 0).unwrap();
        let word = if on { word | bit } else { word & !bit };
        self.maps.put_prefilter_word(index, word).unwrap();
    }

    /// Whether the pre-filter bit of `frontend`'s bucket is set.
    pub fn prefilter(&self, frontend: &Frontend4) -> bool {
        let (index, bit) = Self::prefilter_bit(frontend);
        self.maps.prefilter.get(&index, 0).unwrap() & bit != 0
    }

    /// Points service `id` at a new table holding `entries` (backend ids).
    pub fn table(&mut self, id: u32, entries: &[u32], backends: u32) {
        let (_, table) = self.maps.build_table(entries, backends).unwrap();
        self.maps
            .put_tables(&[(id, TableRef::Built(&table))])
            .unwrap();
        self.tables.insert(id, entries.to_vec());
    }

    /// Writes `backends` under new ids and programs `frontend` with all of them; returns
    /// the ids.
    pub fn service(
        &mut self,
        id: u32,
        frontend: Frontend4,
        backends: &[Backend4],
        flags: u32,
    ) -> Vec<u32> {
        let ids: Vec<u32> = backends.iter().map(|b| self.backend(*b)).collect();
        self.program(id, frontend, &ids, flags, 0);
        ids
    }

    /// Allows `range` as a source of service `id`.
    pub fn source_range(&mut self, id: u32, range: Ipv4Cidr) {
        self.maps.put_source_range(id, IpCidr::V4(range)).unwrap();
    }

    /// The backend id the table of service `id` gives a new flow, computed here.
    pub fn maglev_pick(
        &self,
        id: u32,
        src: [u8; 4],
        sport: u16,
        dst: [u8; 4],
        dport: u16,
        proto: u8,
    ) -> u32 {
        let table = &self.tables[&id];
        table[(hash(src, sport, dst, dport, proto) % table.len() as u32) as usize]
    }

    /// The address of backend `id`.
    pub fn addr(&self, id: u32) -> [u8; 4] {
        self.backends[&id].octets()
    }

    /// Writes IPv6 `backend` under a new id.
    pub fn backend6(&mut self, backend: Backend6) -> u32 {
        let id = self.next_backend_id;
        self.next_backend_id += 1;
        self.set_backend6(id, backend);
        id
    }

    /// Writes (or rewrites) IPv6 backend `id`.
    pub fn set_backend6(&mut self, id: u32, backend: Backend6) {
        self.maps
            .put_backend(id, &BackendEntry::V6(backend))
            .unwrap();
        self.backends6.insert(id, backend);
    }

    /// [`Bed::program`] for an IPv6 frontend, whose table holds IPv6 backend ids.
    pub fn program6(
        &mut self,
        id: u32,
        frontend: Frontend6,
        table: &[u32],
        flags: u32,
        affinity: u32,
    ) {
        if !table.is_empty() {
            let identities: Vec<_> = table
                .iter()
                .map(|b| BackendEntry::V6(self.backends6[b]).identity())
                .collect();
            let built = maglev::build(&identities, TABLE_SIZE).unwrap();
            let entries: Vec<u32> = built.entries().iter().map(|&i| table[i as usize]).collect();
            self.table(id, &entries, table.len() as u32);
        }
        let rev = RevNat6 {
            addr: frontend.addr,
            port: frontend.port,
            _pad: 0,
        };
        self.maps.put_rev_nat(id, &RevNatEntry::V6(rev)).unwrap();
        let svc = Service {
            id,
            backend_count: table.len() as u32,
            flags,
            affinity_timeout_secs: affinity,
        };
        let (index, bit) = prefilter::position(prefilter::bucket6(
            frontend.addr,
            frontend.port,
            frontend.proto,
        ));
        let word = self.maps.prefilter.get(&index, 0).unwrap();
        self.maps.put_prefilter_word(index, word | bit).unwrap();
        self.maps
            .put_service(&FrontendKey::V6(frontend), &svc)
            .unwrap();
    }

    /// [`Bed::service`] for an IPv6 frontend.
    pub fn service6(
        &mut self,
        id: u32,
        frontend: Frontend6,
        backends: &[Backend6],
        flags: u32,
    ) -> Vec<u32> {
        let ids: Vec<u32> = backends.iter().map(|b| self.backend6(*b)).collect();
        self.program6(id, frontend, &ids, flags, 0);
        ids
    }

    /// Allows IPv6 `range` as a source of service `id`.
    pub fn source_range6(&mut self, id: u32, range: Ipv6Cidr) {
        self.maps.put_source_range(id, IpCidr::V6(range)).unwrap();
    }

    /// [`Bed::maglev_pick`] of an IPv6 flow.
    pub fn maglev_pick6(
        &self,
        id: u32,
        src: [u8; 16],
        sport: u16,
        dst: [u8; 16],
        dport: u16,
        proto: u8,
    ) -> u32 {
        let table = &self.tables[&id];
        let hash = flow_hash6(addr6(src), addr6(dst), sport.to_be(), dport.to_be(), proto);
        table[(hash % table.len() as u32) as usize]
    }

    /// The address of IPv6 backend `id`.
    pub fn addr6(&self, id: u32) -> [u8; 16] {
        self.backends6[&id].octets()
    }

    /// The IPv6 conntrack entry of `key`, read from the pinned map.
    pub fn conntrack6(&self, key: &Ct6Key) -> Option<Ct6Entry> {
        let data = MapData::from_pin(self.pin.join(map_names::CONNTRACK6)).unwrap();
        let map: HashMap<_, Ct6Key, Ct6Entry> = HashMap::try_from(Map::LruHashMap(data)).unwrap();
        map.get(key, 0).ok()
    }

    /// The pinned IPv6 affinity map.
    pub fn affinity6(&self) -> HashMap<MapData, Affinity6Key, AffinityEntry> {
        let data = MapData::from_pin(self.pin.join(map_names::AFFINITY6)).unwrap();
        HashMap::try_from(Map::LruHashMap(data)).unwrap()
    }

    fn xdp_program(&mut self) -> &Xdp {
        self.dp
            .ebpf_mut()
            .program(program_names::XDP_INGRESS)
            .unwrap()
            .try_into()
            .unwrap()
    }

    /// Runs the external interface's XDP program on `packet`: its verdict and output.
    pub fn xdp(&mut self, packet: &[u8]) -> (u32, Vec<u8>) {
        run(self.xdp_program(), packet)
    }

    /// Runs XDP on `packet` as if it arrived on interface `ifindex` of `ns`, from a thread in
    /// `ns` (the program's FIB lookups see that namespace's routes and neighbours).
    pub fn xdp_in(&mut self, ns: &crate::Netns, ifindex: u32, packet: &[u8]) -> (u32, Vec<u8>) {
        let prog = self.xdp_program();
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex.
        let md: Vec<u8> = [0, packet.len() as u32, 0, ifindex, 0, 0]
            .iter()
            .flat_map(|v| v.to_ne_bytes())
            .collect();
        let (result, out) = ns
            .run(|| test_run_in(prog, packet, 1, Some(&md)))
            .unwrap()
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN: {e:?}"));
        (result.return_value, out)
    }

    /// Runs the TC egress program on `packet`: its action and output.
    pub fn tc(&mut self, packet: &[u8]) -> (u32, Vec<u8>) {
        let prog: &SchedClassifier = self
            .dp
            .ebpf_mut()
            .program(program_names::TC_EGRESS)
            .unwrap()
            .try_into()
            .unwrap();
        run(prog, packet)
    }

    /// Runs the pod interfaces' program (loaded first, with the programs it tail-calls in
    /// their slots, as the agent does).
    pub fn pod(&mut self, packet: &[u8]) -> (u32, Vec<u8>) {
        self.dp.load_pod_programs().unwrap();
        let prog: &SchedClassifier = self
            .dp
            .ebpf_mut()
            .program(program_names::TC_POD_INGRESS)
            .unwrap()
            .try_into()
            .unwrap();
        run(prog, packet)
    }

    /// The pinned counters.
    pub fn counters(&self) -> Counters {
        Counters::open_pinned(&Pins::new(&self.pin)).unwrap()
    }

    /// The packets counted by reason (`lb_common::Reason`), summed over CPUs.
    pub fn reasons(&self) -> Vec<u64> {
        self.counters().reasons().unwrap()
    }

    /// The flow decisions counted by event (`lb_common::Event`), summed over CPUs.
    pub fn events(&self) -> Vec<u64> {
        self.counters().events().unwrap()
    }

    /// The conntrack entry of `key`, read from the pinned map.
    pub fn conntrack(&self, key: &Ct4Key) -> Option<CtEntry> {
        let data = MapData::from_pin(self.pin.join(map_names::CONNTRACK)).unwrap();
        let map: HashMap<_, Ct4Key, CtEntry> = HashMap::try_from(Map::LruHashMap(data)).unwrap();
        map.get(key, 0).ok()
    }

    /// The pinned affinity map.
    pub fn affinity(&self) -> HashMap<MapData, AffinityKey, AffinityEntry> {
        let data = MapData::from_pin(self.pin.join(map_names::AFFINITY)).unwrap();
        HashMap::try_from(Map::LruHashMap(data)).unwrap()
    }
}

/// Runs `prog` once on `packet`: its return value and output (panics when the kernel refuses).
pub fn run<P>(prog: &P, packet: &[u8]) -> (u32, Vec<u8>)
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let (result, out) =
        test_run(prog, packet, 1).unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN: {e:?}"));
    (result.return_value, out)
}

/// The flow hash of a forward 5-tuple given in host order.
pub fn hash(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, proto: u8) -> u32 {
    flow_hash(
        u32::from_ne_bytes(src),
        u32::from_ne_bytes(dst),
        sport.to_be(),
        dport.to_be(),
        proto,
    )
}

/// A frontend key; the port in host order.
pub fn frontend(addr: [u8; 4], port: u16, proto: u8) -> Frontend4 {
    Frontend4::new(addr, port, proto)
}

/// An ACTIVE backend; the port in host order.
pub fn backend(addr: [u8; 4], port: u16, proto: u8) -> Backend4 {
    Backend4::new(addr, port, proto, BACKEND_ACTIVE)
}

/// The forward conntrack key of a flow given in host order.
pub fn ct_key(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, proto: u8) -> Ct4Key {
    Ct4Key {
        saddr: u32::from_ne_bytes(src),
        daddr: u32::from_ne_bytes(dst),
        sport: sport.to_be(),
        dport: dport.to_be(),
        proto,
        dir: lb_common::CT_FORWARD,
        _pad: [0; 2],
    }
}

/// The forward conntrack key of an IPv6 flow given in host order.
pub fn ct6_key(src: [u8; 16], sport: u16, dst: [u8; 16], dport: u16, proto: u8) -> Ct6Key {
    Ct6Key {
        saddr: addr6(src),
        daddr: addr6(dst),
        sport: sport.to_be(),
        dport: dport.to_be(),
        proto,
        dir: lb_common::CT_FORWARD,
        _pad: [0; 2],
    }
}

/// A TCP SYN over IPv6, as etherparse writes it.
pub fn tcp6(src: [u8; 16], sport: u16, dst: [u8; 16], dport: u16, payload: &[u8]) -> Vec<u8> {
    syn_over(ethernet().ipv6(src, dst, 64), sport, dport, payload)
}

/// An established-connection TCP segment (ACK, PSH) over IPv6.
pub fn tcp6_ack(src: [u8; 16], sport: u16, dst: [u8; 16], dport: u16, payload: &[u8]) -> Vec<u8> {
    ack_over(ethernet().ipv6(src, dst, 64), sport, dport, payload)
}

/// A UDP datagram over IPv6, with its checksum.
pub fn udp6(src: [u8; 16], sport: u16, dst: [u8; 16], dport: u16, payload: &[u8]) -> Vec<u8> {
    udp_over(ethernet().ipv6(src, dst, 64), sport, dport, payload)
}

/// [`rewritten`] of an IPv6 packet: the transport checksum recomputed from scratch by
/// etherparse over the new pseudo-header.
pub fn rewritten6(
    packet: &[u8],
    dst: Option<([u8; 16], u16)>,
    src: Option<([u8; 16], u16)>,
) -> Vec<u8> {
    let parsed = etherparse::PacketHeaders::from_ethernet_slice(packet).unwrap();
    let Some(etherparse::NetHeaders::Ipv6(mut ip, _)) = parsed.net else {
        panic!("not IPv6")
    };
    let payload = parsed.payload.slice();
    if let Some((addr, _)) = dst {
        ip.destination = addr;
    }
    if let Some((addr, _)) = src {
        ip.source = addr;
    }
    let mut out = Vec::new();
    parsed.link.unwrap().write(&mut out).unwrap();
    ip.write(&mut out).unwrap();
    let ports = (dst.map(|(_, port)| port), src.map(|(_, port)| port));
    write_transport(
        &mut out,
        parsed.transport.unwrap(),
        ports,
        |tcp| tcp.calc_checksum_ipv6(&ip, payload).unwrap(),
        |udp| Some(udp.calc_checksum_ipv6(&ip, payload).unwrap()),
    );
    out.extend_from_slice(payload);
    out
}

/// A TCP SYN from `src:sport` to `dst:dport`, with a payload, as etherparse writes it.
pub fn tcp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, payload: &[u8]) -> Vec<u8> {
    syn_over(ethernet().ipv4(src, dst, 64), sport, dport, payload)
}

/// An established-connection TCP segment (ACK, PSH) from `src:sport` to `dst:dport`.
pub fn tcp_ack(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, payload: &[u8]) -> Vec<u8> {
    ack_over(ethernet().ipv4(src, dst, 64), sport, dport, payload)
}

/// A UDP datagram from `src:sport` to `dst:dport`.
pub fn udp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, payload: &[u8]) -> Vec<u8> {
    udp_over(ethernet().ipv4(src, dst, 64), sport, dport, payload)
}

/// The packet with its IPv4 destination and TCP/UDP destination port replaced, every checksum
/// recomputed from scratch by etherparse.
pub fn rewritten(
    packet: &[u8],
    dst: Option<([u8; 4], u16)>,
    src: Option<([u8; 4], u16)>,
) -> Vec<u8> {
    let parsed = etherparse::PacketHeaders::from_ethernet_slice(packet).unwrap();
    let Some(etherparse::NetHeaders::Ipv4(mut ip, _)) = parsed.net else {
        panic!("not IPv4")
    };
    let payload = parsed.payload.slice();
    if let Some((addr, _)) = dst {
        ip.destination = addr;
    }
    if let Some((addr, _)) = src {
        ip.source = addr;
    }
    ip.header_checksum = ip.calc_header_checksum();
    let mut out = Vec::new();
    parsed.link.unwrap().write(&mut out).unwrap();
    ip.write(&mut out).unwrap();
    let ports = (dst.map(|(_, port)| port), src.map(|(_, port)| port));
    write_transport(
        &mut out,
        parsed.transport.unwrap(),
        ports,
        |tcp| tcp.calc_checksum_ipv4(&ip, payload).unwrap(),
        // A UDP checksum of 0 ("none") stays 0.
        |udp| (udp.checksum != 0).then(|| udp.calc_checksum_ipv4(&ip, payload).unwrap()),
    );
    out.extend_from_slice(payload);
    out
}

/// Writes `transport` with its ports replaced (destination, source: `None` keeps one) and
/// its checksum recomputed, over the ports written, by `tcp_sum` or `udp_sum` (`None`: a UDP
/// checksum kept as it is).
fn write_transport(
    out: &mut Vec<u8>,
    transport: etherparse::TransportHeader,
    (dst, src): (Option<u16>, Option<u16>),
    tcp_sum: impl Fn(&etherparse::TcpHeader) -> u16,
    udp_sum: impl Fn(&etherparse::UdpHeader) -> Option<u16>,
) {
    match transport {
        etherparse::TransportHeader::Tcp(mut tcp) => {
            tcp.destination_port = dst.unwrap_or(tcp.destination_port);
            tcp.source_port = src.unwrap_or(tcp.source_port);
            tcp.checksum = tcp_sum(&tcp);
            tcp.write(out).unwrap();
        }
        etherparse::TransportHeader::Udp(mut udp) => {
            udp.destination_port = dst.unwrap_or(udp.destination_port);
            udp.source_port = src.unwrap_or(udp.source_port);
            udp.checksum = udp_sum(&udp).unwrap_or(udp.checksum);
            udp.write(out).unwrap();
        }
        other => panic!("unexpected transport {other:?}"),
    }
}

/// The client's frames to the node.
fn ethernet() -> PacketBuilderStep<Ethernet2Header> {
    PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
}

/// A TCP SYN over the IP header of `ip`.
fn syn_over(ip: PacketBuilderStep<IpHeaders>, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let builder = ip.tcp(sport, dport, 1000, 64240).syn();
    let mut out = Vec::new();
    builder.write(&mut out, payload).unwrap();
    out
}

/// An established-connection TCP segment (ACK, PSH) over the IP header of `ip`.
fn ack_over(ip: PacketBuilderStep<IpHeaders>, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let builder = ip.tcp(sport, dport, 1001, 64240).ack(5000).psh();
    let mut out = Vec::new();
    builder.write(&mut out, payload).unwrap();
    out
}

/// A UDP datagram, with its checksum, over the IP header of `ip`.
fn udp_over(ip: PacketBuilderStep<IpHeaders>, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let builder = ip.udp(sport, dport);
    let mut out = Vec::new();
    builder.write(&mut out, payload).unwrap();
    out
}

/// The packet an ICMP error quotes, over the IP header of `ip` (no Ethernet): a UDP
/// question or a TCP SYN.
pub fn quoted_over(ip: PacketBuilderStep<IpHeaders>, proto: u8, sport: u16, dport: u16) -> Vec<u8> {
    if proto == lb_common::PROTO_UDP {
        udp_over(ip, sport, dport, b"question")
    } else {
        syn_over(ip, sport, dport, b"")
    }
}

/// The names of the counters that differ between two readings.
pub fn changed(names: &[&'static str], before: &[u64], after: &[u64]) -> Vec<(&'static str, u64)> {
    (0..before.len())
        .filter(|&i| before[i] != after[i])
        .map(|i| (names[i], after[i] - before[i]))
        .collect()
}

/// Runs `prog` on `packet` `repeat` times through BPF_PROG_TEST_RUN; returns the kernel's
/// result and the output packet. The packet tests and the benchmarks share it.
pub fn test_run<P>(
    prog: &P,
    packet: &[u8],
    repeat: u32,
) -> Result<(TestRunResult, Vec<u8>), aya::programs::ProgramError>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    test_run_in(prog, packet, repeat, None)
}

/// [`test_run`] with an input context (for XDP, an `xdp_md` naming the interface the packet
/// arrived on, which the program's FIB lookups start from).
pub fn test_run_in<P>(
    prog: &P,
    packet: &[u8],
    repeat: u32,
    ctx_in: Option<&[u8]>,
) -> Result<(TestRunResult, Vec<u8>), aya::programs::ProgramError>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let mut out = vec![0u8; packet.len() + 256];
    let result = prog.test_run(TestRunOptions {
        data_in: Some(packet),
        data_out: Some(&mut out),
        ctx_in,
        repeat,
        ..Default::default()
    })?;
    out.truncate(result.data_size_out as usize);
    Ok((result, out))
}
