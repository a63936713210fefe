//! The agent's operations endpoint: Prometheus metrics (`/metrics`, OpenMetrics text), liveness
//! (`/healthz`) and readiness (`/readyz`), served on one local address.
//!
//! Readiness: ready once the first complete view is programmed, and not ready (503, with the
//! reason in the body) while the source is disconnected. Liveness: 200 while the agent runs.

#![deny(missing_docs)]

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, atomic::AtomicU64},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use hyper::{Method, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::http::{self, Reply};

/// Where the operations endpoint listens unless told otherwise.
pub const DEFAULT_ADDR: &str = "127.0.0.1:9464";

/// The label of per-resource metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabel {
    /// `services`, `endpointslices`, `nodes` or `manifests`.
    pub resource: &'static str,
}

/// The label of per-map metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabel {
    /// The map's pinned name, e.g. `LB_BACKEND4_V1`.
    pub map: &'static str,
}

/// Every metric of the agent, and the state behind /readyz.
pub struct Metrics {
    registry: Registry,
    /// Programmed frontends.
    pub frontends: Gauge,
    /// Programmed backends.
    pub backends: Gauge,
    /// How long translating and writing one update took.
    pub sync_duration: Histogram,
    /// From the first source event of an update to the end of its map writes.
    pub event_to_sync: Histogram,
    /// Syncs done.
    pub syncs: Counter,
    /// Watches restarted with a new list (relists), by resource.
    pub watch_restarts: Family<ResourceLabel, Counter>,
    /// Watch and list errors, by resource.
    pub watch_errors: Family<ResourceLabel, Counter>,
    /// Map operations that failed, by map.
    pub map_write_errors: Family<MapLabel, Counter>,
    /// Wanted frontends the last sync could not program (or update), e.g. for a full map.
    pub frontends_unprogrammed: Gauge,
    /// Map writes and deletes issued.
    pub map_writes: Counter,
    /// Frontends found pinned at start that no view has listed, kept for their grace period.
    pub orphans: Gauge,
    /// Unix time of the last sync without errors.
    pub last_sync_seconds: Gauge<f64, AtomicU64>,
    /// 1 while the source is reachable (kube: the API server; manifests: the folder).
    pub source_up: Gauge,
    health: Mutex<Health>,
}

#[derive(Default)]
struct Health {
    synced: bool,
    waiting: String,
    disconnected: Option<String>,
    /// Why frontends are not programmed (shown by /readyz, which stays ready).
    degraded: Option<String>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// All metrics at zero; not ready.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            frontends: Gauge::default(),
            backends: Gauge::default(),
            // 50 µs .. ~0.8 s.
            sync_duration: Histogram::new(exponential_buckets(50e-6, 2.0, 15)),
            event_to_sync: Histogram::new(exponential_buckets(50e-6, 2.0, 15)),
            syncs: Counter::default(),
            watch_restarts: Family::default(),
            watch_errors: Family::default(),
            map_write_errors: Family::default(),
            frontends_unprogrammed: Gauge::default(),
            map_writes: Counter::default(),
            orphans: Gauge::default(),
            last_sync_seconds: Gauge::default(),
            source_up: Gauge::default(),
            health: Mutex::new(Health {
                waiting: "waiting for the first complete view of the source".into(),
                ..Health::default()
            }),
            registry: Registry::default(),
        };
        registry.register(
            "lb_frontends",
            "Frontends programmed in the datapath",
            m.frontends.clone(),
        );
        registry.register(
            "lb_backends",
            "Backends programmed in the datapath",
            m.backends.clone(),
        );
        registry.register(
            "lb_sync_duration_seconds",
            "Time to translate one update and write it to the maps",
            m.sync_duration.clone(),
        );
        registry.register(
            "lb_event_to_sync_seconds",
            "Time from the first source event of an update to the end of its map writes",
            m.event_to_sync.clone(),
        );
        registry.register("lb_syncs", "Updates applied to the maps", m.syncs.clone());
        registry.register(
            "lb_watch_restarts",
            "Watches that started over with a full list (after 410 Gone, or at start)",
            m.watch_restarts.clone(),
        );
        registry.register(
            "lb_watch_errors",
            "Failed lists and watches",
            m.watch_errors.clone(),
        );
        registry.register(
            "lb_map_write_errors",
            "Map writes or deletes that failed, by map (a full map among them)",
            m.map_write_errors.clone(),
        );
        registry.register(
            "lb_frontends_unprogrammed",
            "Wanted frontends the last sync could not program or update (see the log; a full map \
             names the flag that sizes it)",
            m.frontends_unprogrammed.clone(),
        );
        registry.register(
            "lb_map_writes",
            "Map writes and deletes issued (a restarted agent that finds the maps right issues none)",
            m.map_writes.clone(),
        );
        registry.register(
            "lb_orphan_frontends",
            "Frontends found pinned at start that no view of the source has listed, kept for --orphan-grace-secs",
            m.orphans.clone(),
        );
        registry.register(
            "lb_last_sync_timestamp_seconds",
            "Unix time of the last sync that wrote everything it had to",
            m.last_sync_seconds.clone(),
        );
        registry.register(
            "lb_source_up",
            "1 while the source (API server or manifests folder) answers",
            m.source_up.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Adds metrics that a collector reads at each scrape (the datapath's counters:
    /// `crate::datapath::collector::DatapathCollector`).
    pub fn register_collector(&mut self, collector: Box<dyn Collector>) {
        self.registry.register_collector(collector);
    }

    /// The metrics in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// Records a sync: its duration, the time since the source's first event, and the state
    /// programmed after it.
    pub fn synced(&self, duration: Duration, since_event: Duration, report: &SyncOutcome) {
        self.sync_duration.observe(duration.as_secs_f64());
        self.event_to_sync.observe(since_event.as_secs_f64());
        self.syncs.inc();
        self.frontends.set(report.frontends as i64);
        self.backends.set(report.backends as i64);
        self.frontends_unprogrammed.set(report.unprogrammed as i64);
        for map in &report.failed_maps {
            self.map_write_errors.get_or_create(&MapLabel { map }).inc();
        }
        self.map_writes.inc_by(report.map_ops as u64);
        self.orphans.set(report.orphans as i64);
        if report.failed_maps.is_empty() {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            self.last_sync_seconds.set(now.as_secs_f64());
        }
        let mut health = self.lock_health();
        if !health.synced {
            info!("first complete view programmed: ready");
            health.synced = true;
        }
        health.degraded = (report.unprogrammed > 0).then(|| {
            format!(
                "{} wanted frontends are not programmed: {}",
                report.unprogrammed,
                report.first_error.as_deref().unwrap_or("see the log")
            )
        });
    }

    /// Says what the agent waits for before its first sync (shown by /readyz).
    pub fn waiting_for(&self, what: String) {
        self.lock_health().waiting = what;
    }

    /// The source is being connected to: not up yet, not an error either.
    pub fn connecting(&self) {
        self.source_up.set(0);
        self.lock_health().disconnected = Some("connecting".into());
    }

    /// The source is reachable.
    pub fn connected(&self) {
        self.source_up.set(1);
        let mut health = self.lock_health();
        if let Some(reason) = health.disconnected.take() {
            info!("source reachable (was: {reason})");
        }
    }

    /// The source cannot be reached, for `reason`.
    pub fn disconnected(&self, reason: String) {
        self.source_up.set(0);
        let mut health = self.lock_health();
        if health.disconnected.is_none() {
            warn!("source unreachable: {reason}; keeping the programmed state");
        }
        health.disconnected = Some(reason);
    }

    /// Whether the source is reachable.
    pub fn is_connected(&self) -> bool {
        self.lock_health().disconnected.is_none()
    }

    /// `Ok` when ready (with a note when some frontends could not be programmed: the
    /// others are served), else why not.
    pub fn readiness(&self) -> Result<Option<String>, String> {
        let health = self.lock_health();
        if let Some(reason) = &health.disconnected {
            return Err(format!("source disconnected: {reason}"));
        }
        if !health.synced {
            return Err(health.waiting.clone());
        }
        Ok(health.degraded.clone())
    }

    fn lock_health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What one sync left programmed, for [`Metrics::synced`].
#[derive(Clone, Debug, Default)]
pub struct SyncOutcome {
    /// Frontends programmed.
    pub frontends: usize,
    /// Backends programmed.
    pub backends: usize,
    /// Wanted frontends not programmed as wanted.
    pub unprogrammed: usize,
    /// The map of each map operation that failed.
    pub failed_maps: Vec<&'static str>,
    /// The first error, for /readyz.
    pub first_error: Option<String>,
    /// Map writes and deletes issued.
    pub map_ops: usize,
    /// Orphaned frontends kept for their grace period.
    pub orphans: usize,
}

/// Binds `addr` and serves /metrics, /healthz and /readyz on it until the runtime stops.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    http::spawn(
        listener,
        "metrics endpoint",
        Arc::new(move |method, path| respond(method, path, &metrics)),
    );
    Ok(local)
}

fn respond(method: &Method, path: &str, metrics: &Metrics) -> Reply {
    let text = "text/plain; charset=utf-8";
    match (method, path) {
        (&Method::GET, "/metrics") => Reply::new(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        ),
        (&Method::GET, "/healthz") => Reply::new(StatusCode::OK, text, "ok\n"),
        (&Method::GET, "/readyz") => match metrics.readiness() {
            Ok(None) => Reply::new(StatusCode::OK, text, "ok\n"),
            Ok(Some(note)) => Reply::new(StatusCode::OK, text, format!("ok; {note}\n")),
            Err(reason) => Reply::new(StatusCode::SERVICE_UNAVAILABLE, text, format!("{reason}\n")),
        },
        (&Method::GET, _) => Reply::new(StatusCode::NOT_FOUND, text, "not found\n"),
        _ => Reply::new(StatusCode::METHOD_NOT_ALLOWED, text, "only GET is served\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_needs_a_first_sync_and_a_connected_source() {
        let m = Metrics::new();
        assert!(m.readiness().unwrap_err().contains("first complete view"));
        m.waiting_for("initial list of endpointslices".into());
        assert_eq!(m.readiness().unwrap_err(), "initial list of endpointslices");
        m.synced(
            Duration::from_millis(1),
            Duration::from_millis(2),
            &SyncOutcome {
                frontends: 3,
                backends: 5,
                ..SyncOutcome::default()
            },
        );
        assert_eq!(m.readiness(), Ok(None));
        m.disconnected("connection refused".into());
        assert_eq!(
            m.readiness().unwrap_err(),
            "source disconnected: connection refused"
        );
        m.connected();
        assert_eq!(m.readiness(), Ok(None));
        // Frontends that do not fit: still ready (the others are served), and said so.
        m.synced(
            Duration::from_millis(1),
            Duration::from_millis(2),
            &SyncOutcome {
                frontends: 3,
                backends: 5,
                unprogrammed: 2,
                failed_maps: vec!["LB_BACKEND4_V1"; 2],
                first_error: Some("map LB_BACKEND4_V1 is full".into()),
                ..SyncOutcome::default()
            },
        );
        assert_eq!(
            m.readiness(),
            Ok(Some(
                "2 wanted frontends are not programmed: map LB_BACKEND4_V1 is full".into()
            ))
        );
    }

    #[test]
    fn the_text_format_names_every_metric() {
        let m = Metrics::new();
        m.watch_errors
            .get_or_create(&ResourceLabel {
                resource: "services",
            })
            .inc();
        m.synced(
            Duration::from_millis(1),
            Duration::from_millis(2),
            &SyncOutcome {
                frontends: 3,
                backends: 5,
                unprogrammed: 1,
                failed_maps: vec!["LB_BACKEND4_V1"],
                first_error: None,
                map_ops: 7,
                orphans: 2,
            },
        );
        let text = m.encode();
        for line in [
            "lb_frontends 3",
            "lb_backends 5",
            "lb_map_write_errors_total{map=\"LB_BACKEND4_V1\"} 1",
            "lb_frontends_unprogrammed 1",
            "lb_map_writes_total 7",
            "lb_orphan_frontends 2",
            "lb_watch_errors_total{resource=\"services\"} 1",
            "lb_sync_duration_seconds_count 1",
            "lb_event_to_sync_seconds_count 1",
            "lb_syncs_total 1",
            "lb_last_sync_timestamp_seconds 0.0",
            "lb_source_up 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} in:\n{text}");
        }
    }
}
