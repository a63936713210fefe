//! Packet tests of the flow decisions: Maglev selection, the conntrack rules (keep, drain,
//! select again), sessionAffinity ClientIP, loadBalancerSourceRanges and random selection.
//! Each runs the real XDP program through BPF_PROG_TEST_RUN and compares every output packet
//! byte for byte with one etherparse builds (with its own checksums) for the backend the
//! decision must give; the rules are documented on `lb_common::Event`.

use lb_common::{
    AffinityEntry, AffinityKey, BACKEND_REMOVED, BACKEND_TERMINATING, CT_REPLY, Ct4Key, Event,
    PROTO_TCP, PROTO_UDP, Reason, SERVICE_F_EXTERNAL, SERVICE_F_RANDOM, SERVICE_F_SOURCE_RANGES,
    ServiceStats, backend_stats_slots, capacity,
};
use lb_testbed::packet::*;
use lb_userspace::datapath::Pins;
use std::net::SocketAddrV4;

use lb_userspace::{
    datapath::explain::{Decision, Explainer, Explanation, Flow, monotonic_ns},
    model::Ipv4Cidr,
    model::Protocol,
};

const VIP: [u8; 4] = [10, 96, 0, 10];
const PORT: u16 = 8080;

/// Runs `input` through XDP and checks that it leaves for backend `id`, translated.
fn expect_to(bed: &mut Bed, input: &[u8], id: u32, what: &str) {
    let b = bed.backends[&id];
    let (action, out) = bed.xdp(input);
    assert_eq!(action, XDP_PASS, "{what}");
    assert_eq!(
        out,
        rewritten(input, Some((b.octets(), b.port())), None),
        "{what}: expected backend {id} ({:?})",
        b.octets()
    );
}

/// Sends a SYN from `CLIENT:sport` to service 1 and checks that it goes to the Maglev
/// choice; returns that backend.
fn expect_maglev(bed: &mut Bed, sport: u16, what: &str) -> u32 {
    let pick = bed.maglev_pick(1, CLIENT, sport, VIP, PORT, PROTO_TCP);
    expect_to(bed, &tcp(CLIENT, sport, VIP, PORT, b""), pick, what);
    pick
}

/// The backend id a translated packet went to.
fn went_to(bed: &Bed, out: &[u8]) -> u32 {
    let dst: [u8; 4] = out[30..34].try_into().unwrap();
    *bed.backends
        .iter()
        .find(|(_, b)| b.octets() == dst)
        .unwrap_or_else(|| panic!("{dst:?} is no backend"))
        .0
}

/// The event counters that changed, by name, since `before`.
fn events_since(bed: &Bed, before: &[u64]) -> Vec<(&'static str, u64)> {
    changed(Event::NAMES, before, &bed.events())
}

/// Three TCP backends on port 80 programmed for VIP:PORT as service 1; their ids.
fn three_backends(bed: &mut Bed, flags: u32, affinity: u32) -> [u32; 3] {
    let ids = [POD1, POD2, POD3].map(|a| bed.backend(backend(a, 80, PROTO_TCP)));
    bed.program(1, frontend(VIP, PORT, PROTO_TCP), &ids, flags, affinity);
    ids
}

/// A source port whose Maglev choice for service 1 is (or, with `equal` false, is not)
/// backend `id`.
fn sport_where(bed: &Bed, client: [u8; 4], id: u32, equal: bool, from: u16) -> u16 {
    (from..u16::MAX)
        .find(|&s| (bed.maglev_pick(1, client, s, VIP, PORT, PROTO_TCP) == id) == equal)
        .unwrap()
}

#[test]
fn new_flows_take_the_maglev_entry_of_their_hash_and_keep_their_backend_when_it_changes() {
    let mut bed = Bed::new();
    let ids = three_backends(&mut bed, 0, 0);
    let sports: Vec<u16> = (20000..20096).collect();
    let mut first = Vec::new();
    for &s in &sports {
        first.push(expect_maglev(&mut bed, s, "new flow"));
    }
    for id in ids {
        assert!(first.contains(&id), "every backend gets flows: {first:?}");
    }
    // A fourth backend: a new table is swapped in. Established flows keep their backend,
    // though the new table sends some of their hashes elsewhere.
    let pod4 = bed.backend(backend([10, 244, 4, 2], 80, PROTO_TCP));
    bed.program(
        1,
        frontend(VIP, PORT, PROTO_TCP),
        &[ids[0], ids[1], ids[2], pod4],
        0,
        0,
    );
    let mut moved = 0;
    for (&s, &was) in sports.iter().zip(&first) {
        if bed.maglev_pick(1, CLIENT, s, VIP, PORT, PROTO_TCP) != was {
            moved += 1;
        }
        expect_to(
            &mut bed,
            &tcp_ack(CLIENT, s, VIP, PORT, b"more"),
            was,
            "established",
        );
    }
    // About a quarter of the hashes move to the new backend, and few others.
    assert!(
        (10..=40).contains(&moved),
        "{moved} of {} moved",
        sports.len()
    );
    // New flows follow the new table.
    for s in 30000..30032 {
        expect_maglev(&mut bed, s, "new flow, new table");
    }
}

#[test]
fn terminating_backends_take_no_new_flows_but_keep_theirs() {
    let mut bed = Bed::new();
    let ids = three_backends(&mut bed, 0, 0);
    let udp_ids = [POD1, POD2, POD3].map(|a| bed.backend(backend(a, 5353, PROTO_UDP)));
    bed.program(2, frontend(VIP, 53, PROTO_UDP), &udp_ids, 0, 0);
    let draining = ids[1];
    let tcp_sport = sport_where(&bed, CLIENT, draining, true, 21000);
    expect_to(
        &mut bed,
        &tcp(CLIENT, tcp_sport, VIP, PORT, b""),
        draining,
        "SYN",
    );
    let udp_sport = (21000..)
        .find(|&s| bed.maglev_pick(2, CLIENT, s, VIP, 53, PROTO_UDP) == udp_ids[1])
        .unwrap();
    expect_to(
        &mut bed,
        &udp(CLIENT, udp_sport, VIP, 53, b"q"),
        udp_ids[1],
        "UDP",
    );

    // The agent marks it terminating and swaps in a table without it.
    bed.set_state(draining, BACKEND_TERMINATING);
    bed.set_state(udp_ids[1], BACKEND_TERMINATING);
    bed.program(1, frontend(VIP, PORT, PROTO_TCP), &[ids[0], ids[2]], 0, 0);
    bed.program(
        2,
        frontend(VIP, 53, PROTO_UDP),
        &[udp_ids[0], udp_ids[2]],
        0,
        0,
    );
    let before = bed.events();
    // Its flows go on: established TCP and UDP alike.
    let ack = tcp_ack(CLIENT, tcp_sport, VIP, PORT, b"data");
    expect_to(
        &mut bed,
        &ack,
        draining,
        "established TCP to a terminating backend",
    );
    let more = udp(CLIENT, udp_sport, VIP, 53, b"again");
    expect_to(&mut bed, &more, udp_ids[1], "UDP to a terminating backend");
    assert_eq!(events_since(&bed, &before), [], "kept, nothing else");
    // New flows never go there.
    for s in 40000..40064 {
        assert_ne!(expect_maglev(&mut bed, s, "new flow"), draining);
    }

    // Only terminating backends left: the agent puts them in the table (kube-proxy's
    // fallback), and new flows use them.
    bed.program(1, frontend(VIP, PORT, PROTO_TCP), &[draining], 0, 0);
    expect_to(
        &mut bed,
        &tcp(CLIENT, 41000, VIP, PORT, b""),
        draining,
        "fallback",
    );
}

#[test]
fn a_syn_whose_flow_points_at_a_backend_that_is_not_active_selects_again() {
    for state in [BACKEND_TERMINATING, BACKEND_REMOVED] {
        let mut bed = Bed::new();
        let ids = three_backends(&mut bed, 0, 0);
        let old = ids[0];
        let sport = sport_where(&bed, CLIENT, old, true, 22000);
        let syn = tcp(CLIENT, sport, VIP, PORT, b"");
        expect_to(&mut bed, &syn, old, "first connection");
        // A retransmitted SYN while the backend is ACTIVE keeps it.
        expect_to(&mut bed, &syn, old, "retransmitted SYN");

        bed.set_state(old, state);
        bed.program(1, frontend(VIP, PORT, PROTO_TCP), &ids[1..], 0, 0);
        let before = bed.events();
        // The client reuses the port for a new connection: it gets a backend from the table.
        let new = bed.maglev_pick(1, CLIENT, sport, VIP, PORT, PROTO_TCP);
        expect_to(&mut bed, &syn, new, "SYN on a reused port");
        assert_eq!(
            events_since(&bed, &before),
            [
                ("ct_inserts", 1),
                ("ct_deletes", 1),
                ("select_maglev", 1),
                ("reselect_syn", 1)
            ],
            "state {state}"
        );
        // Both entries point at the new backend; the old reply entry is gone.
        let key = ct_key(CLIENT, sport, VIP, PORT, PROTO_TCP);
        assert_eq!(bed.conntrack(&key).unwrap().backend_id, new);
        let reply = |id: u32| Ct4Key {
            saddr: u32::from_ne_bytes(bed.addr(id)),
            daddr: key.saddr,
            sport: 80u16.to_be(),
            dport: key.sport,
            proto: PROTO_TCP,
            dir: CT_REPLY,
            _pad: [0; 2],
        };
        assert_eq!(bed.conntrack(&reply(new)).unwrap().backend_id, new);
        assert_eq!(bed.conntrack(&reply(old)), None);
        // The rest of the connection stays there.
        expect_to(
            &mut bed,
            &tcp_ack(CLIENT, sport, VIP, PORT, b"x"),
            new,
            "established",
        );
        let ct = bed.counters().conntrack().unwrap();
        assert_eq!(
            (ct.entries, ct.inserts, ct.deletes, ct.evictions),
            (2, 3, 1, 0)
        );
    }
}

#[test]
fn udp_flows_never_stay_on_a_removed_or_deleted_backend() {
    let mut bed = Bed::new();
    let ids = [POD1, POD2, POD3].map(|a| bed.backend(backend(a, 5353, PROTO_UDP)));
    let fe = frontend(VIP, 53, PROTO_UDP);
    bed.program(1, fe, &ids, 0, 0);
    let pick = |bed: &Bed, s| bed.maglev_pick(1, CLIENT, s, VIP, 53, PROTO_UDP);
    let s1 = (23000..).find(|&s| pick(&bed, s) == ids[0]).unwrap();
    let s2 = (s1 + 1..).find(|&s| pick(&bed, s) == ids[1]).unwrap();
    expect_to(&mut bed, &udp(CLIENT, s1, VIP, 53, b"a"), ids[0], "flow 1");
    expect_to(&mut bed, &udp(CLIENT, s2, VIP, 53, b"b"), ids[1], "flow 2");

    // ids[0] leaves the EndpointSlices: REMOVED, out of the table.
    bed.set_state(ids[0], BACKEND_REMOVED);
    bed.program(1, fe, &ids[1..], 0, 0);
    let before = bed.events();
    let to = pick(&bed, s1);
    expect_to(
        &mut bed,
        &udp(CLIENT, s1, VIP, 53, b"a2"),
        to,
        "UDP on a REMOVED backend",
    );
    assert_eq!(
        events_since(&bed, &before),
        [
            ("ct_inserts", 1),
            ("ct_deletes", 1),
            ("select_maglev", 1),
            ("reselect_udp", 1)
        ]
    );
    // ids[1]'s entry is deleted outright (no drain): its flow is selected again too.
    bed.delete_backend(ids[1]);
    bed.program(1, fe, &ids[2..], 0, 0);
    let before = bed.events();
    expect_to(
        &mut bed,
        &udp(CLIENT, s2, VIP, 53, b"b2"),
        ids[2],
        "UDP on a deleted backend",
    );
    let events = events_since(&bed, &before);
    assert!(events.contains(&("reselect_udp", 1)), "{events:?}");
    // The old reply entry of a deleted backend cannot be found (its address is gone): it
    // stays until the LRU evicts it, and is not counted as deleted.
    assert!(
        !events.iter().any(|(name, _)| *name == "ct_deletes"),
        "{events:?}"
    );
}

#[test]
fn established_tcp_to_a_removed_backend_drains_then_is_selected_again() {
    let mut bed = Bed::new();
    let ids = three_backends(&mut bed, 0, 0);
    let old = ids[2];
    let sport = sport_where(&bed, CLIENT, old, true, 24000);
    expect_to(&mut bed, &tcp(CLIENT, sport, VIP, PORT, b""), old, "SYN");

    bed.set_state(old, BACKEND_REMOVED);
    bed.program(1, frontend(VIP, PORT, PROTO_TCP), &ids[..2], 0, 0);
    let before = bed.events();
    for i in 0..3u8 {
        let ack = tcp_ack(CLIENT, sport, VIP, PORT, &[i]);
        expect_to(&mut bed, &ack, old, "established TCP during the drain");
    }
    assert_eq!(events_since(&bed, &before), [("drain_removed", 3)]);

    // The drain is over: the entry is deleted. The next segment is sent to a live backend
    // (which answers RST: the client fails fast instead of hanging).
    bed.delete_backend(old);
    let before = bed.events();
    let new = bed.maglev_pick(1, CLIENT, sport, VIP, PORT, PROTO_TCP);
    let ack = tcp_ack(CLIENT, sport, VIP, PORT, b"late");
    expect_to(&mut bed, &ack, new, "established TCP after the drain");
    let events = events_since(&bed, &before);
    assert!(events.contains(&("reselect_gone", 1)), "{events:?}");
    assert!(events.contains(&("select_maglev", 1)), "{events:?}");
}

#[test]
fn client_ip_affinity_keeps_a_client_on_its_backend_until_it_expires() {
    let mut bed = Bed::new();
    let ids = three_backends(&mut bed, 0, 60);
    let first = 25000;
    let chosen = bed.maglev_pick(1, CLIENT, first, VIP, PORT, PROTO_TCP);
    expect_to(
        &mut bed,
        &tcp(CLIENT, first, VIP, PORT, b""),
        chosen,
        "first flow",
    );
    // Later flows of the client go to the same backend, also those Maglev sends elsewhere.
    let elsewhere = sport_where(&bed, CLIENT, chosen, false, first + 1);
    let before = bed.events();
    for s in elsewhere..elsewhere + 4 {
        expect_to(
            &mut bed,
            &tcp(CLIENT, s, VIP, PORT, b""),
            chosen,
            "affinity",
        );
    }
    assert_eq!(
        events_since(&bed, &before),
        [("ct_inserts", 8), ("select_affinity", 4)]
    );
    // Another client has its own.
    let other = [10, 200, 0, 3];
    let theirs = bed.maglev_pick(1, other, elsewhere, VIP, PORT, PROTO_TCP);
    expect_to(
        &mut bed,
        &tcp(other, elsewhere, VIP, PORT, b""),
        theirs,
        "other client",
    );

    // The entry expires: the next flow is Maglev's, and the entry is renewed with it.
    let key = AffinityKey {
        service_id: 1,
        client: u32::from_ne_bytes(CLIENT),
    };
    let expired = AffinityEntry {
        backend_id: chosen,
        _pad: 0,
        last_used_ns: monotonic_ns() - 61_000_000_000,
    };
    bed.affinity().insert(key, expired, 0).unwrap();
    let s = sport_where(&bed, CLIENT, chosen, false, elsewhere + 4);
    let before = bed.events();
    let now_maglev = expect_maglev(&mut bed, s, "after expiry");
    let events = events_since(&bed, &before);
    assert!(events.contains(&("affinity_expired", 1)), "{events:?}");
    let renewed = bed.affinity().get(&key, 0).unwrap();
    assert_eq!(renewed.backend_id, now_maglev);
    assert!(monotonic_ns() - renewed.last_used_ns < 10_000_000_000);
    expect_to(
        &mut bed,
        &tcp(CLIENT, s + 1, VIP, PORT, b""),
        now_maglev,
        "renewed",
    );

    // A terminating backend takes no new affinity clients: the client moves.
    bed.set_state(now_maglev, BACKEND_TERMINATING);
    let rest: Vec<u32> = ids.into_iter().filter(|&i| i != now_maglev).collect();
    bed.program(1, frontend(VIP, PORT, PROTO_TCP), &rest, 0, 60);
    let before = bed.events();
    let moved = expect_maglev(&mut bed, s + 2, "affinity on terminating");
    let events = events_since(&bed, &before);
    assert!(events.contains(&("affinity_not_active", 1)), "{events:?}");
    assert_eq!(bed.affinity().get(&key, 0).unwrap().backend_id, moved);
}

#[test]
fn source_ranges_admit_listed_sources_and_drop_the_others() {
    let mut bed = Bed::new();
    let lb_vip = [198, 51, 100, 1];
    let ids = [POD1, POD2].map(|a| bed.backend(backend(a, 80, PROTO_TCP)));
    let flags = SERVICE_F_EXTERNAL | SERVICE_F_SOURCE_RANGES;
    bed.program(1, frontend(lb_vip, 80, PROTO_TCP), &ids, flags, 0);
    let cidr = |a: [u8; 4], len| Ipv4Cidr::new(a.into(), len).unwrap();
    bed.source_range(1, cidr([10, 200, 0, 0], 24));
    bed.source_range(1, cidr([192, 0, 2, 7], 32));
    // Another frontend with other ranges: ranges are per service.
    bed.program(2, frontend(lb_vip, 443, PROTO_TCP), &ids, flags, 0);
    bed.source_range(2, cidr([203, 0, 113, 0], 24));

    for src in [CLIENT, [10, 200, 0, 250], [192, 0, 2, 7]] {
        let input = tcp(src, 26000, lb_vip, 80, b"");
        let (action, out) = bed.xdp(&input);
        assert_eq!(action, XDP_PASS, "{src:?} is allowed");
        let to = went_to(&bed, &out);
        assert_eq!(out, rewritten(&input, Some((bed.addr(to), 80)), None));
    }
    for (src, port) in [([192, 0, 2, 8], 80), ([10, 200, 1, 2], 80), (CLIENT, 443)] {
        let before = bed.reasons();
        let input = tcp(src, 26001, lb_vip, port, b"");
        assert_eq!(
            bed.xdp(&input),
            (XDP_DROP, input.clone()),
            "{src:?} to {port}"
        );
        assert_eq!(
            changed(Reason::NAMES, &before, &bed.reasons()),
            [("source_range_denied", 1)]
        );
        let key = ct_key(src, 26001, lb_vip, port, PROTO_TCP);
        assert_eq!(bed.conntrack(&key), None, "no flow for a denied source");
    }
    let input = tcp([203, 0, 113, 9], 26002, lb_vip, 443, b"");
    assert_eq!(bed.xdp(&input).0, XDP_PASS);
}

#[test]
fn random_selection_spreads_new_flows_and_conntrack_keeps_them() {
    let mut bed = Bed::new();
    let ids = three_backends(&mut bed, SERVICE_F_RANDOM, 0);
    let mut chosen = Vec::new();
    for s in 27000..27200 {
        let input = tcp(CLIENT, s, VIP, PORT, b"");
        let (action, out) = bed.xdp(&input);
        assert_eq!(action, XDP_PASS);
        let to = went_to(&bed, &out);
        assert_eq!(out, rewritten(&input, Some((bed.addr(to), 80)), None));
        chosen.push(to);
    }
    for id in ids {
        let n = chosen.iter().filter(|&&c| c == id).count();
        // 200 flows over 3 backends: about 67 each (a count below 30 has odds < 1e-9).
        assert!(n >= 30, "backend {id}: {n} of 200");
    }
    let differs = (27000..27200)
        .zip(&chosen)
        .filter(|(s, c)| bed.maglev_pick(1, CLIENT, *s, VIP, PORT, PROTO_TCP) != **c)
        .count();
    assert!(
        differs > 50,
        "not the flow hash's entry: {differs} of 200 differ"
    );
    assert_eq!(bed.events()[Event::SelectRandom as usize], 200);
    assert_eq!(bed.events()[Event::SelectMaglev as usize], 0);
    // Every later packet of a flow stays on its backend.
    for (s, &to) in (27000..27200).zip(&chosen) {
        expect_to(
            &mut bed,
            &tcp_ack(CLIENT, s, VIP, PORT, b"d"),
            to,
            "established",
        );
    }
}

#[test]
fn per_backend_counters_count_packets_bytes_and_new_flows() {
    let mut bed = Bed::new();
    let ids = three_backends(&mut bed, 0, 0);
    let mut want = std::collections::HashMap::new();
    for s in 28000..28030 {
        let syn = tcp(CLIENT, s, VIP, PORT, b"");
        let ack = tcp_ack(CLIENT, s, VIP, PORT, b"payload");
        let (_, out) = bed.xdp(&syn);
        bed.xdp(&ack);
        let e = want
            .entry(went_to(&bed, &out))
            .or_insert((0u64, 0u64, 0u64));
        *e = (e.0 + 2, e.1 + (syn.len() + ack.len()) as u64, e.2 + 1);
    }
    let counters = bed.counters();
    for id in ids {
        let got = counters.backend(id).unwrap();
        let w = want.get(&id).copied().unwrap_or_default();
        assert_eq!((got.packets, got.bytes, got.new_flows), w, "backend {id}");
    }
    let service = counters.service(1).unwrap();
    assert_eq!((service.packets, service.new_flows), (60, 30));
    // A new backend whose id has the slot of a deleted one counts from zero.
    let old = counters.backend(ids[0]).unwrap();
    assert_ne!(old, ServiceStats::default(), "the first backend got flows");
    bed.delete_backend(ids[0]);
    let same_slot = ids[0] + backend_stats_slots(capacity::BACKENDS);
    bed.new_backend(same_slot, backend([10, 244, 9, 9], 80, PROTO_TCP));
    assert_eq!(
        bed.counters().backend(same_slot).unwrap(),
        ServiceStats::default()
    );
    let ct = counters.conntrack().unwrap();
    assert_eq!((ct.entries, ct.inserts, ct.evictions), (60, 60, 0));
}

/// `lb explain`'s answer for a flow from `src:sport` to `dst:dport`.
fn explain(
    bed: &Bed,
    src: [u8; 4],
    sport: u16,
    dst: [u8; 4],
    dport: u16,
    syn: bool,
) -> Explanation {
    let flow = Flow {
        src: SocketAddrV4::new(src.into(), sport).into(),
        dst: SocketAddrV4::new(dst.into(), dport).into(),
        proto: Protocol::Tcp,
        syn,
    };
    Explainer::open_pinned(&Pins::new(&bed.pin))
        .unwrap()
        .explain(&flow, monotonic_ns())
        .unwrap()
}

#[test]
fn explain_names_the_backend_the_datapath_gives_and_why() {
    let mut bed = Bed::new();
    let ids = three_backends(&mut bed, 0, 0);
    for s in 29000..29016 {
        // A new flow: the Maglev entry of its hash, which is where the packet goes.
        let before = explain(&bed, CLIENT, s, VIP, PORT, true);
        assert_eq!(before.decision, Decision::Maglev, "{:?}", before.steps);
        let id = before.backend_id.unwrap();
        expect_to(&mut bed, &tcp(CLIENT, s, VIP, PORT, b""), id, "explained");
        let b = bed.backends[&id];
        assert_eq!(
            before.backend,
            Some(SocketAddrV4::new(b.octets().into(), 80).into())
        );
        // Then conntrack decides.
        let after = explain(&bed, CLIENT, s, VIP, PORT, false);
        assert_eq!(
            (after.decision, after.backend_id),
            (Decision::Conntrack, Some(id))
        );
    }
    // A SYN on a port whose backend is now terminating is selected again: explain says
    // where it goes, and it goes there.
    let s = sport_where(&bed, CLIENT, ids[0], true, 29100);
    expect_to(&mut bed, &tcp(CLIENT, s, VIP, PORT, b""), ids[0], "SYN");
    bed.set_state(ids[0], BACKEND_TERMINATING);
    bed.program(1, frontend(VIP, PORT, PROTO_TCP), &ids[1..], 0, 0);
    let established = explain(&bed, CLIENT, s, VIP, PORT, false);
    assert_eq!(established.decision, Decision::Conntrack);
    let syn = explain(&bed, CLIENT, s, VIP, PORT, true);
    assert_eq!(syn.decision, Decision::Maglev, "{:?}", syn.steps);
    assert!(syn.steps[1].contains("selected again"), "{:?}", syn.steps);
    let to = syn.backend_id.unwrap();
    expect_to(
        &mut bed,
        &tcp(CLIENT, s, VIP, PORT, b""),
        to,
        "SYN, re-selected",
    );

    // Not a frontend; a denied source; affinity; random.
    assert_eq!(
        explain(&bed, CLIENT, 1, VIP, 9999, true).decision,
        Decision::NotFrontend
    );
    let lb_vip = [198, 51, 100, 1];
    let flags = SERVICE_F_SOURCE_RANGES | SERVICE_F_RANDOM;
    bed.program(2, frontend(lb_vip, 80, PROTO_TCP), &ids[1..], flags, 0);
    bed.source_range(2, Ipv4Cidr::new([10, 200, 0, 0].into(), 24).unwrap());
    assert_eq!(
        explain(&bed, [192, 0, 2, 1], 1, lb_vip, 80, true).decision,
        Decision::SourceDenied
    );
    assert_eq!(
        explain(&bed, CLIENT, 1, lb_vip, 80, true).decision,
        Decision::Random
    );
    let affinity_vip = [10, 96, 0, 11];
    bed.program(3, frontend(affinity_vip, 80, PROTO_TCP), &ids[1..], 0, 300);
    let (_, out) = bed.xdp(&tcp(CLIENT, 29200, affinity_vip, 80, b""));
    let first = went_to(&bed, &out);
    let next = explain(&bed, CLIENT, 29201, affinity_vip, 80, true);
    assert_eq!(
        (next.decision, next.backend_id),
        (Decision::Affinity, Some(first))
    );
}

/// A conntrack entry vouches for its backend without the frontend being read, until the
/// agent deletes something: after the frontend is deleted, its established flows are not
/// ours any more (passed untouched, as any packet to no frontend); when it comes back as
/// another service, they are new flows of that service.
#[test]
fn established_flows_of_a_deleted_frontend_are_passed_untouched() {
    use lb_userspace::{datapath::maps::DatapathMaps as _, plan::desired::FrontendKey};
    let mut bed = Bed::new();
    let ids = three_backends(&mut bed, 0, 0);
    let sport = 41000;
    let first = expect_maglev(&mut bed, sport, "new flow");
    let ack = tcp_ack(CLIENT, sport, VIP, PORT, b"data");
    expect_to(&mut bed, &ack, first, "established");

    let fe = frontend(VIP, PORT, PROTO_TCP);
    bed.maps.delete_service(&FrontendKey::V4(fe)).unwrap();
    let before = bed.reasons();
    assert_eq!(bed.xdp(&ack), (XDP_PASS, ack.clone()), "passed untouched");
    assert_eq!(
        changed(Reason::NAMES, &before, &bed.reasons()),
        [("not_frontend", 1)]
    );

    bed.program(2, fe, &ids, 0, 0);
    let before = bed.counters().service(2).unwrap();
    let (action, out) = bed.xdp(&ack);
    assert_eq!(action, XDP_PASS);
    assert!(ids.contains(&went_to(&bed, &out)), "translated again");
    let after = bed.counters().service(2).unwrap();
    assert_eq!(
        after.new_flows - before.new_flows,
        1,
        "a new flow of service 2"
    );
}
