//! What is programmed, read back from the maps: for `lb services`.

use std::collections::HashMap;

use lb_common::{
    BACKEND_REMOVED, BACKEND_TERMINATING, SERVICE_F_EXTERNAL, SERVICE_F_RANDOM,
    SERVICE_F_SOURCE_RANGES, ServiceStats,
};
use serde::Serialize;

use crate::{desired::Frontend, sync::MapContents};

/// One programmed frontend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceRow {
    /// `address:port/PROTO`.
    pub frontend: String,
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
    /// Counters, summed over CPUs.
    pub packets: u64,
    /// Bytes translated.
    pub bytes: u64,
    /// Flows created.
    pub new_flows: u64,
}

/// The rows of every programmed frontend, sorted by frontend.
pub fn service_rows(
    contents: &MapContents,
    stats: impl Fn(u32) -> ServiceStats,
) -> Vec<ServiceRow> {
    let tables: HashMap<u32, _> = contents.tables.iter().map(|(id, t)| (*id, t)).collect();
    let backends: HashMap<u32, _> = contents.backends.iter().copied().collect();
    let mut services = contents.services.clone();
    services.sort_by_key(|(k, _)| Frontend::from_key(k).map(|f| (f.addr, f.port, f.proto)));
    services
        .iter()
        .map(|(key, svc)| {
            let frontend =
                Frontend::from_key(key).map_or_else(|| format!("{key:?}"), |f| f.to_string());
            let backends = match tables.get(&svc.id) {
                None if svc.backend_count > 0 => vec!["-".to_owned()],
                None => Vec::new(),
                Some(table) => table
                    .backends
                    .iter()
                    .map(|id| match backends.get(id) {
                        None => format!("?{id}"),
                        Some(b) => {
                            let addr = std::net::Ipv4Addr::from(b.octets());
                            let state = match b.state {
                                BACKEND_TERMINATING => " (terminating)",
                                BACKEND_REMOVED => " (removed)",
                                _ => "",
                            };
                            format!("{addr}:{}{state}", b.port())
                        }
                    })
                    .collect(),
            };
            let s = stats(svc.id);
            ServiceRow {
                frontend,
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
                packets: s.packets,
                bytes: s.bytes,
                new_flows: s.new_flows,
            }
        })
        .collect()
}

/// A plain-text table of the rows.
pub fn services_table(rows: &[ServiceRow]) -> String {
    let mut out = format!(
        "{:<24} {:>5} {:<8} {:>8} {:>8}  {}\n",
        "FRONTEND", "ID", "SCOPE", "PACKETS", "FLOWS", "BACKENDS"
    );
    for r in rows {
        let backends = if r.backends.is_empty() {
            "(none: dropped)".to_owned()
        } else {
            r.backends.join(", ")
        };
        out.push_str(&format!(
            "{:<24} {:>5} {:<8} {:>8} {:>8}  {}\n",
            r.frontend,
            r.service_id,
            if r.external { "external" } else { "cluster" },
            r.packets,
            r.new_flows,
            backends
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use lb_common::{BACKEND_ACTIVE, Backend4, Frontend4, PROTO_TCP, Service};

    use super::*;
    use crate::sync::table_info;

    #[test]
    fn rows_follow_the_tables_and_show_what_is_missing() {
        let contents = MapContents {
            services: vec![(
                Frontend4::new([10, 96, 0, 10], 8080, PROTO_TCP),
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
                    Backend4::new([10, 244, 1, 2], 80, PROTO_TCP, BACKEND_ACTIVE),
                ),
                (
                    9,
                    Backend4::new([10, 244, 1, 3], 80, PROTO_TCP, BACKEND_TERMINATING),
                ),
            ],
            rev_nat: vec![],
            source_ranges: vec![],
        };
        let rows = service_rows(&contents, |id| ServiceStats {
            packets: id as u64 * 10,
            bytes: 0,
            new_flows: 2,
        });
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].frontend, "10.96.0.10:8080/TCP");
        assert_eq!(
            rows[0].backends,
            ["10.244.1.2:80", "?8", "10.244.1.3:80 (terminating)"]
        );
        assert_eq!(rows[0].packets, 30);
        let table = services_table(&rows);
        assert!(table.contains("10.96.0.10:8080/TCP"), "{table}");
        assert!(
            table.contains("10.244.1.2:80, ?8, 10.244.1.3:80 (terminating)"),
            "{table}"
        );
        // A service entry with backends but no table shows the gap.
        let mut no_table = contents.clone();
        no_table.tables.clear();
        let rows = service_rows(&no_table, |_| ServiceStats::default());
        assert_eq!(rows[0].backends, ["-"]);
    }
}
