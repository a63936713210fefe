//! The datapath's counters as Prometheus metrics (the figures of `lb stats`), read from the
//! pinned maps at each scrape; the agent registers it with [`crate::metrics::Metrics`].

use crate::datapath::Pins;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};
use tracing::debug;

use super::{
    TableFill,
    inspect::{BackendStatsRow, FrontendStatsRow},
};

/// A counter of `lb stats` rows: metric name, help, and the row's value.
type Column<Row> = (&'static str, &'static str, fn(&Row) -> u64);

/// The datapath's per-CPU counters, summed, at each scrape: per frontend, per backend,
/// conntrack occupancy and evictions, and every non-zero reason and event.
#[derive(Debug)]
pub struct DatapathCollector {
    pins: Pins,
}

impl DatapathCollector {
    /// Reads the maps pinned in `pins`.
    pub fn new(pins: Pins) -> Self {
        Self { pins }
    }
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let report = match super::inspect::read_stats(&self.pins) {
            Ok(report) => report,
            // Before the first load there is nothing pinned to read.
            Err(e) => {
                debug!("datapath metrics: {e}");
                return Ok(());
            }
        };
        let frontend_counters: [Column<FrontendStatsRow>; 3] = [
            (
                "lb_frontend_packets",
                "Packets translated, by frontend",
                |r| r.packets,
            ),
            ("lb_frontend_bytes", "Bytes translated, by frontend", |r| {
                r.bytes
            }),
            ("lb_frontend_new_flows", "Flows created, by frontend", |r| {
                r.new_flows
            }),
        ];
        for (name, help, value) in frontend_counters {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for row in &report.frontends {
                let labels = [("frontend", row.frontend.as_str())];
                ConstCounter::new(value(row)).encode(family.encode_family(&labels)?)?;
            }
        }
        let backend_counters: [Column<BackendStatsRow>; 3] = [
            ("lb_backend_packets", "Packets sent to a backend", |r| {
                r.packets
            }),
            ("lb_backend_bytes", "Bytes sent to a backend", |r| r.bytes),
            ("lb_backend_new_flows", "Flows given to a backend", |r| {
                r.new_flows
            }),
        ];
        for (name, help, value) in backend_counters {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for row in &report.backends {
                let labels = [("backend", row.backend.as_str()), ("state", row.state)];
                ConstCounter::new(value(row)).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "lb_frontend_backend_new_flows",
            "Flows a frontend gave a backend (ipvsadm's Conns of a real server under its \
             virtual server)",
            None,
            MetricType::Counter,
        )?;
        for f in &report.frontends {
            for b in &f.backends {
                if let Some(flows) = b.new_flows {
                    let labels = [("frontend", f.frontend.as_str()), ("backend", &b.backend)];
                    ConstCounter::new(flows).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        let ct = &report.conntrack;
        ConstGauge::new(ct.entries as i64).encode(encoder.encode_descriptor(
            "lb_conntrack_entries",
            "Conntrack entries now (two per flow)",
            None,
            MetricType::Gauge,
        )?)?;
        ConstCounter::new(ct.evictions).encode(encoder.encode_descriptor(
            "lb_conntrack_evictions",
            "Conntrack entries the kernel evicted to make room (LRU)",
            None,
            MetricType::Counter,
        )?)?;
        let table_gauges: [Column<TableFill>; 2] = [
            (
                "lb_table_entries",
                "Entries in an LRU table the datapath fills, by map",
                |t| t.entries,
            ),
            (
                "lb_table_capacity",
                "Size of an LRU table the datapath fills, by map (its --max-* flag)",
                |t| t.capacity.into(),
            ),
        ];
        for (name, help, value) in table_gauges {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for t in &report.tables {
                let gauge = ConstGauge::new(i64::try_from(value(t)).unwrap_or(i64::MAX));
                gauge.encode(family.encode_family(&[("map", t.map)])?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "lb_table_evictions",
            "Entries the kernel evicted from a full LRU table to make room, by map",
            None,
            MetricType::Counter,
        )?;
        for t in &report.tables {
            ConstCounter::new(t.evictions).encode(family.encode_family(&[("map", t.map)])?)?;
        }
        let mut family = encoder.encode_descriptor(
            "lb_datapath_events",
            "Packets counted by reason or flow decision (see lb stats)",
            None,
            MetricType::Counter,
        )?;
        for (name, value) in &report.counters {
            ConstCounter::new(*value).encode(family.encode_family(&[("event", *name)])?)?;
        }
        Ok(())
    }
}
