//! What is programmed, read back from the maps: for `lb services` and `lb stats`.

use crate::datapath::Pins;
use std::collections::{BTreeMap, HashMap};

use lb_common::{
    BACKEND_REMOVED, BACKEND_TERMINATING, SERVICE_F_DSR, SERVICE_F_EXTERNAL, SERVICE_F_RANDOM,
    SERVICE_F_REJECT, SERVICE_F_SOURCE_RANGES, ServiceStats,
};
use serde::Serialize;

use crate::{
    datapath::maps::{BackendEntry, DatapathMaps as _, MapContents, MapOpError},
    datapath::{
        BpfMaps, ConntrackStats, Counters, DatapathError, FrontendLabel, Names, TableFill,
        explain::state_name,
    },
    plan::desired::{Frontend, FrontendKey, FrontendKind},
};

/// One programmed frontend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceRow {
    /// `address:port/PROTO`.
    pub frontend: String,
    /// The Service port it serves, `namespace/name[:port-name]`, when the agent named it
    /// ([`super::names`]).
    pub service: Option<String>,
    /// ClusterIp, NodePort, ExternalIp or LoadBalancer, when the agent named it.
    pub kind: Option<FrontendKind>,
    /// The service id.
    pub service_id: u32,
    /// Whether the frontend is node-external (NodePort, LoadBalancer, externalIP).
    pub external: bool,
    /// How many backends new flows choose from.
    pub backend_count: u32,
    /// `address:port` of each backend in the frontend's Maglev table, by backend id; `?<id>`
    /// for an id whose backend is missing, `-` for a missing table.
    pub backends: Vec<String>,
    /// `maglev` or `random`.
    pub selection: &'static str,
    /// sessionAffinity ClientIP timeout in seconds, 0 when off.
    pub affinity_timeout_secs: u32,
    /// Whether only loadBalancerSourceRanges may use it.
    pub source_ranges: bool,
    /// Whether its new flows are rejected (no endpoint anywhere: ICMP port unreachable).
    pub reject: bool,
    /// Whether flows from outside reach its backends on other nodes by direct server
    /// return (forwarding `dsr`), not source NAT.
    pub dsr: bool,
    /// Counters, summed over CPUs.
    pub packets: u64,
    /// Bytes translated.
    pub bytes: u64,
    /// Flows created.
    pub new_flows: u64,
}

/// The backends of both maps by id (one id space).
fn backend_views(contents: &MapContents) -> HashMap<u32, BackendEntry> {
    contents.backends.iter().copied().collect()
}

/// The service entries of both families, IPv4 first, each sorted by frontend.
fn service_entries(contents: &MapContents) -> Vec<(FrontendKey, lb_common::Service)> {
    let mut services = contents.services.clone();
    services.sort_by_key(|(k, _)| (Frontend::from_key(k).map(|f| (f.addr, f.port, f.proto)), *k));
    services
}

/// The rows of every programmed frontend, sorted by frontend, named by `names`.
pub fn service_rows(
    contents: &MapContents,
    names: &BTreeMap<FrontendKey, FrontendLabel>,
    stats: impl Fn(u32) -> ServiceStats,
) -> Vec<ServiceRow> {
    let tables: HashMap<u32, _> = contents.tables.iter().map(|(id, t)| (*id, t)).collect();
    let backends = backend_views(contents);
    let services = service_entries(contents);
    services
        .iter()
        .map(|(key, svc)| {
            let frontend =
                Frontend::from_key(key).map_or_else(|| format!("{key:?}"), |f| f.to_string());
            let backends = match tables.get(&lb_common::maglev::table_key(svc.id, svc.flags)) {
                None if svc.backend_count > 0 => vec!["-".to_owned()],
                None => Vec::new(),
                Some(table) => table
                    .backends
                    .iter()
                    .map(|id| match backends.get(id) {
                        None => format!("?{id}"),
                        Some(b) => {
                            let state = match b.state() {
                                BACKEND_TERMINATING => " (terminating)",
                                BACKEND_REMOVED => " (removed)",
                                _ => "",
                            };
                            let remote = if b.flags() & lb_common::BACKEND_F_REMOTE != 0 {
                                " (remote)"
                            } else {
                                ""
                            };
                            format!("{}{state}{remote}", b.addr())
                        }
                    })
                    .collect(),
            };
            let s = stats(svc.id);
            let label = names.get(key);
            ServiceRow {
                frontend,
                service: label.map(|l| l.service.clone()),
                kind: label.and_then(|l| l.kind),
                service_id: svc.id,
                external: svc.flags & SERVICE_F_EXTERNAL != 0,
                backend_count: svc.backend_count,
                backends,
                selection: if svc.flags & SERVICE_F_RANDOM != 0 {
                    "random"
                } else {
                    "maglev"
                },
                affinity_timeout_secs: svc.affinity_timeout_secs,
                source_ranges: svc.flags & SERVICE_F_SOURCE_RANGES != 0,
                reject: svc.flags & SERVICE_F_REJECT != 0,
                dsr: svc.flags & SERVICE_F_DSR != 0,
                packets: s.packets,
                bytes: s.bytes,
                new_flows: s.new_flows,
            }
        })
        .collect()
}

/// A plain-text table of the rows.
pub fn services_table(rows: &[ServiceRow]) -> String {
    let width = |f: fn(&ServiceRow) -> usize, header: &str| {
        rows.iter().map(f).max().unwrap_or(0).max(header.len())
    };
    let fw = width(|r| r.frontend.len(), "FRONTEND");
    let sw = width(|r| r.service.as_deref().map_or(1, str::len), "SERVICE");
    let mut out = format!(
        "{:<fw$}  {:<sw$}  {:<12} {:>5} {:>8} {:>8}  {}\n",
        "FRONTEND", "SERVICE", "KIND", "ID", "PACKETS", "FLOWS", "BACKENDS"
    );
    for r in rows {
        let backends = if r.reject {
            "(none anywhere: rejected)".to_owned()
        } else if r.backends.is_empty() {
            "(none here: dropped)".to_owned()
        } else if r.dsr {
            format!("{}  forwarding=dsr", r.backends.join(", "))
        } else {
            r.backends.join(", ")
        };
        out.push_str(&format!(
            "{:<fw$}  {:<sw$}  {:<12} {:>5} {:>8} {:>8}  {}\n",
            r.frontend,
            r.service.as_deref().unwrap_or("-"),
            kind_name(r),
            r.service_id,
            r.packets,
            r.new_flows,
            backends
        ));
    }
    out
}

/// The frontend's kind as named by the agent, else its scope as the service entry says.
fn kind_name(r: &ServiceRow) -> String {
    match (r.kind, r.external) {
        (Some(kind), _) => kind.to_string(),
        (None, true) => "external".into(),
        (None, false) => "cluster".into(),
    }
}

/// One backend in `lb stats` with its totals, over every frontend that sends to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackendStatsRow {
    /// Backend id.
    pub id: u32,
    /// `address:port`, or `?` when the id has no backend entry.
    pub backend: String,
    /// `active`, `terminating` or `removed`.
    pub state: &'static str,
    /// Packets sent to it.
    pub packets: u64,
    /// Bytes sent to it.
    pub bytes: u64,
    /// Flows given to it.
    pub new_flows: u64,
}

/// One backend under one frontend in `lb stats`: the flows that frontend gave it
/// (ipvsadm's Conns of a real server under its virtual server). Its packets and bytes are
/// counted per backend only ([`StatsReport::backends`]): the datapath counts a pair when a
/// flow is created, so that an established flow's packets look up no per-pair counter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PairStatsRow {
    /// Backend id.
    pub id: u32,
    /// `address:port`, or `?` when the id has no backend entry.
    pub backend: String,
    /// `active`, `terminating` or `removed`.
    pub state: &'static str,
    /// Flows this frontend gave it; `None` when the pinned maps have no per-pair counters
    /// (an older agent's).
    pub new_flows: Option<u64>,
}

/// One frontend in `lb stats`, with the backends of its Maglev table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FrontendStatsRow {
    /// `address:port/PROTO`.
    pub frontend: String,
    /// The Service port it serves, when the agent named it.
    pub service: Option<String>,
    /// Its kind, when the agent named it.
    pub kind: Option<FrontendKind>,
    /// The service id.
    pub service_id: u32,
    /// `maglev` or `random`.
    pub selection: &'static str,
    /// Packets translated.
    pub packets: u64,
    /// Bytes translated.
    pub bytes: u64,
    /// Flows created.
    pub new_flows: u64,
    /// The backends new flows choose from, with the flows it gave each.
    pub backends: Vec<PairStatsRow>,
}

/// Everything `lb stats` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatsReport {
    /// Every frontend, sorted.
    pub frontends: Vec<FrontendStatsRow>,
    /// Every backend in the maps with its totals, by id.
    pub backends: Vec<BackendStatsRow>,
    /// Backends in no table: terminating or removed ones that drain (also in `backends`).
    pub draining: Vec<BackendStatsRow>,
    /// Conntrack occupancy, inserts, deletes and evictions.
    pub conntrack: ConntrackStats,
    /// Reasons and events that are not zero, by name.
    pub counters: Vec<(&'static str, u64)>,
    /// How full the LRU tables the datapath fills are (conntrack, sessionAffinity).
    pub tables: Vec<TableFill>,
}

/// Why the pinned maps could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Opening the pinned maps or reading counters failed.
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    /// Reading the maps' contents failed.
    #[error(transparent)]
    Maps(#[from] MapOpError),
}

/// Reads the `lb stats` report from the pinned maps and counters.
pub fn read_stats(pins: &Pins) -> Result<StatsReport, ReadError> {
    let maps = BpfMaps::open_pinned(pins)?;
    let counters = Counters::open_pinned(pins)?;
    let contents = maps.read_all()?;
    let named = |names: &'static [&'static str], values: Vec<u64>| {
        names.iter().copied().zip(values).filter(|(_, v)| *v != 0)
    };
    let nonzero = named(lb_common::Reason::NAMES, counters.reasons()?)
        .chain(named(lb_common::Event::NAMES, counters.events()?))
        .chain(named(lb_common::NatEvent::NAMES, counters.nat_events()?))
        .collect();
    let mut report = stats_report(
        &contents,
        &read_names(pins)?,
        |id| counters.service(id).unwrap_or_default(),
        |service, id| counters.pair_flows(service, id).ok().flatten(),
        |id| counters.backend(id).ok(),
        counters.conntrack()?,
        nonzero,
    );
    report.tables = counters.tables(&report.conntrack)?;
    Ok(report)
}

/// The names of the frontends pinned in `pins`; none when the agent has pinned no names map
/// (an older agent).
pub fn read_names(pins: &Pins) -> Result<BTreeMap<FrontendKey, FrontendLabel>, DatapathError> {
    Ok(Names::open(pins)?.map(|n| n.read()).unwrap_or_default())
}

/// Builds the `lb stats` report from the maps and counters.
pub fn stats_report(
    contents: &MapContents,
    names: &BTreeMap<FrontendKey, FrontendLabel>,
    service_stats: impl Fn(u32) -> ServiceStats,
    pair_flows: impl Fn(u32, u32) -> Option<u64>,
    backend_stats: impl Fn(u32) -> Option<ServiceStats>,
    conntrack: ConntrackStats,
    counters: Vec<(&'static str, u64)>,
) -> StatsReport {
    let backends = backend_views(contents);
    let named = |id: u32| match backends.get(&id) {
        Some(b) => (b.addr().to_string(), state_name(b.state())),
        None => ("?".to_owned(), "missing"),
    };
    let row = |id: u32| {
        let s = backend_stats(id).unwrap_or_default();
        let (backend, state) = named(id);
        BackendStatsRow {
            id,
            backend,
            state,
            packets: s.packets,
            bytes: s.bytes,
            new_flows: s.new_flows,
        }
    };
    let tables: HashMap<u32, _> = contents.tables.iter().map(|(key, t)| (*key, t)).collect();
    // The table each service id uses.
    let keys: HashMap<u32, u32> = (contents.services.iter().map(|(_, s)| s))
        .map(|s| (s.id, lb_common::maglev::table_key(s.id, s.flags)))
        .collect();
    let mut in_tables = std::collections::BTreeSet::new();
    let frontends = service_rows(contents, names, &service_stats)
        .into_iter()
        .map(|r| {
            let ids = keys
                .get(&r.service_id)
                .and_then(|key| tables.get(key))
                .map(|t| t.backends.clone())
                .unwrap_or_default();
            in_tables.extend(ids.iter().copied());
            FrontendStatsRow {
                frontend: r.frontend,
                service: r.service,
                kind: r.kind,
                service_id: r.service_id,
                selection: r.selection,
                packets: r.packets,
                bytes: r.bytes,
                new_flows: r.new_flows,
                // Under a frontend, the flows it gave each backend (ipvsadm's real server
                // under its virtual server), not the backend's totals over frontends.
                backends: (ids.into_iter())
                    .map(|id| {
                        let (backend, state) = named(id);
                        PairStatsRow {
                            id,
                            backend,
                            state,
                            new_flows: pair_flows(r.service_id, id),
                        }
                    })
                    .collect(),
            }
        })
        .collect();
    let mut draining: Vec<u32> = backends
        .keys()
        .filter(|id| !in_tables.contains(id))
        .copied()
        .collect();
    draining.sort_unstable();
    StatsReport {
        frontends,
        backends: {
            let mut ids: Vec<u32> = backends.keys().copied().collect();
            ids.sort_unstable();
            ids.into_iter().map(row).collect()
        },
        draining: draining.into_iter().map(row).collect(),
        conntrack,
        counters,
        tables: Vec::new(),
    }
}

/// `lb stats` as text, in the manner of `ipvsadm -L --stats`.
pub fn stats_table(report: &StatsReport) -> String {
    let line = |a: &str, b: &str, c: &str, s: (u64, u64, u64)| {
        format!(
            "{a:<5}{b:<28} {c:<12} {:>10} {:>12} {:>14}\n",
            s.0, s.1, s.2
        )
    };
    let backend = |b: &BackendStatsRow| {
        line(
            "  -> ",
            &b.backend,
            b.state,
            (b.new_flows, b.packets, b.bytes),
        )
    };
    let mut out = format!(
        "{:<5}{:<28} {:<12} {:>10} {:>12} {:>14}  {}\n{:<5}{:<28} {:<12} {:>10}\n",
        "",
        "Frontend",
        "Selection",
        "Conns",
        "Packets",
        "Bytes",
        "Service",
        "  -> ",
        "Backend",
        "State",
        "Conns"
    );
    for f in &report.frontends {
        let mut head = line(
            "",
            &f.frontend,
            f.selection,
            (f.new_flows, f.packets, f.bytes),
        );
        if let Some(service) = &f.service {
            head.insert_str(head.len() - 1, &format!("  {service}"));
            if let Some(kind) = f.kind {
                head.insert_str(head.len() - 1, &format!(" ({kind})"));
            }
        }
        out += &head;
        for b in &f.backends {
            let conns = b.new_flows.map_or("-".to_owned(), |n| n.to_string());
            out += &format!("  -> {:<28} {:<12} {conns:>10}\n", b.backend, b.state);
        }
    }
    if !report.backends.is_empty() {
        out += "backends, over every frontend:\n";
        for b in &report.backends {
            out += &backend(b);
        }
    }
    if !report.draining.is_empty() {
        out += "draining (in no table):\n";
        for b in &report.draining {
            out += &backend(b);
        }
    }
    let ct = &report.conntrack;
    out += &format!(
        "conntrack: {} entries, {} inserted, {} deleted, {} evicted\n",
        ct.entries, ct.inserts, ct.deletes, ct.evictions
    );
    for t in &report.tables {
        out += &format!(
            "{}: {} of {} entries, {} evicted\n",
            t.map, t.entries, t.capacity, t.evictions
        );
    }
    for (name, count) in &report.counters {
        out += &format!("{name}: {count}\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use lb_common::{BACKEND_ACTIVE, Backend4, Frontend4, PROTO_TCP, Service};

    use super::*;
    use crate::datapath::maps::table_info;

    #[test]
    fn ipv6_frontends_and_backends_show_in_rfc_5952_form_after_the_ipv4_ones() {
        let v6 = |s: &str| s.parse::<std::net::Ipv6Addr>().unwrap().octets();
        let svc = |id| Service {
            id,
            backend_count: 1,
            flags: 0,
            affinity_timeout_secs: 0,
        };
        let contents = MapContents {
            services: vec![
                (
                    FrontendKey::V4(Frontend4::new([10, 96, 0, 10], 80, PROTO_TCP)),
                    svc(1),
                ),
                (
                    FrontendKey::V6(lb_common::Frontend6::new(
                        v6("fd00:0:0:0::a"),
                        80,
                        PROTO_TCP,
                    )),
                    svc(2),
                ),
            ],
            tables: vec![(1, table_info(1, &[5, 5])), (2, table_info(2, &[6, 6]))],
            backends: vec![
                (
                    5,
                    BackendEntry::V4(Backend4::new(
                        [10, 244, 1, 2],
                        80,
                        PROTO_TCP,
                        BACKEND_ACTIVE,
                    )),
                ),
                (
                    6,
                    BackendEntry::V6(lb_common::Backend6::new(
                        v6("fd00:10::2"),
                        8080,
                        PROTO_TCP,
                        BACKEND_TERMINATING,
                    )),
                ),
            ],
            ..MapContents::default()
        };
        let rows = service_rows(&contents, &BTreeMap::new(), |_| ServiceStats::default());
        let shown: Vec<(&str, &[String])> = rows
            .iter()
            .map(|r| (r.frontend.as_str(), r.backends.as_slice()))
            .collect();
        assert_eq!(
            shown,
            [
                ("10.96.0.10:80/TCP", &["10.244.1.2:80".to_owned()][..]),
                (
                    "[fd00::a]:80/TCP",
                    &["[fd00:10::2]:8080 (terminating)".to_owned()][..]
                ),
            ]
        );
        let report = stats_report(
            &contents,
            &BTreeMap::new(),
            |_| ServiceStats::default(),
            |_, _| None,
            |_| None,
            ConntrackStats::default(),
            Vec::new(),
        );
        assert_eq!(report.frontends[1].backends[0].backend, "[fd00:10::2]:8080");
        assert!(report.draining.is_empty());
    }

    #[test]
    fn rows_follow_the_tables_and_show_what_is_missing() {
        let contents = MapContents {
            services: vec![(
                FrontendKey::V4(Frontend4::new([10, 96, 0, 10], 8080, PROTO_TCP)),
                Service {
                    id: 3,
                    backend_count: 3,
                    flags: 0,
                    affinity_timeout_secs: 0,
                },
            )],
            tables: vec![(3, table_info(1, &[7, 8, 7, 9, 9]))],
            backends: vec![
                (
                    7,
                    BackendEntry::V4(Backend4::new(
                        [10, 244, 1, 2],
                        80,
                        PROTO_TCP,
                        BACKEND_ACTIVE,
                    )),
                ),
                (
                    9,
                    BackendEntry::V4(Backend4::new(
                        [10, 244, 1, 3],
                        80,
                        PROTO_TCP,
                        BACKEND_TERMINATING,
                    )),
                ),
            ],
            rev_nat: vec![],
            source_ranges: vec![],
            prefilter: vec![],
            short_circuits: vec![],
        };
        let key = contents.services[0].0;
        let names = BTreeMap::from([(
            key,
            FrontendLabel {
                service: "shop/web:http".into(),
                kind: Some(FrontendKind::ClusterIp),
            },
        )]);
        let rows = service_rows(&contents, &names, |id| ServiceStats {
            packets: id as u64 * 10,
            bytes: 0,
            new_flows: 2,
        });
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].frontend, "10.96.0.10:8080/TCP");
        assert_eq!(rows[0].service.as_deref(), Some("shop/web:http"));
        assert_eq!(
            rows[0].backends,
            ["10.244.1.2:80", "?8", "10.244.1.3:80 (terminating)"]
        );
        assert_eq!(rows[0].packets, 30);
        let table = services_table(&rows);
        let line = table.lines().nth(1).unwrap();
        assert!(
            line.starts_with("10.96.0.10:8080/TCP  shop/web:http  ClusterIP"),
            "{table}"
        );
        assert!(
            table.contains("10.244.1.2:80, ?8, 10.244.1.3:80 (terminating)"),
            "{table}"
        );
        // A service entry with backends but no table shows the gap.
        let mut no_table = contents.clone();
        no_table.tables.clear();
        let rows = service_rows(&no_table, &BTreeMap::new(), |_| ServiceStats::default());
        assert_eq!(rows[0].backends, ["-"]);
        // Not named (an older agent): the scope of the service entry, no name.
        assert_eq!(rows[0].service, None);
        assert!(
            services_table(&rows)
                .lines()
                .nth(1)
                .unwrap()
                .contains(" -  "),
            "{table}"
        );

        // lb stats: the table's backends under the frontend, the others as draining.
        let mut with_removed = contents.clone();
        with_removed.backends.push((
            4,
            BackendEntry::V4(Backend4::new(
                [10, 244, 1, 9],
                80,
                PROTO_TCP,
                lb_common::BACKEND_REMOVED,
            )),
        ));
        let counts = |id: u32| ServiceStats {
            packets: u64::from(id) * 2,
            bytes: u64::from(id) * 100,
            new_flows: u64::from(id),
        };
        let report = stats_report(
            &with_removed,
            &names,
            counts,
            // A backend's flows under a frontend are the pair's, not its totals.
            |service, id| (id != 8).then(|| u64::from(id + 100 * service)),
            |id| (id != 8).then(|| counts(id)),
            ConntrackStats {
                entries: 4,
                inserts: 10,
                deletes: 2,
                evictions: 4,
            },
            vec![("drain_removed", 3)],
        );
        let ids: Vec<u32> = report.frontends[0].backends.iter().map(|b| b.id).collect();
        assert_eq!(ids, [7, 8, 9]);
        assert_eq!(report.frontends[0].backends[1].state, "missing");
        let service = report.frontends[0].service_id;
        assert_eq!(
            report.frontends[0].backends[0].new_flows,
            Some(u64::from(7 + 100 * service)),
            "the pair's flows under the frontend"
        );
        assert_eq!(report.frontends[0].backends[1].new_flows, None);
        // Each backend once with its totals, by id (8 has no entry: not a backend).
        let totals: Vec<(u32, u64, u64)> = (report.backends.iter())
            .map(|b| (b.id, b.packets, b.new_flows))
            .collect();
        assert_eq!(totals, [(4, 8, 4), (7, 14, 7), (9, 18, 9)]);
        assert_eq!(report.draining.len(), 1);
        assert_eq!(
            (report.draining[0].state, report.draining[0].new_flows),
            ("removed", 4)
        );
        let text = stats_table(&report);
        for want in [
            "10.96.0.10:8080/TCP",
            "shop/web:http (ClusterIP)",
            "maglev",
            "-> 10.244.1.2:80",
            "active",
            "draining (in no table):",
            "backends, over every frontend:",
            "10.244.1.9:80",
            "conntrack: 4 entries, 10 inserted, 2 deleted, 4 evicted",
            "drain_removed: 3",
        ] {
            assert!(text.contains(want), "{want:?} in\n{text}");
        }
    }
}
