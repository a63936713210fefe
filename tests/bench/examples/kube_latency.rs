//! Measures the agent's Kubernetes path: the time from an EndpointSlice change on the API
//! server to the map write that carries it, with many Services programmed.
//!
//! ```text
//! cargo build --release -p lb-userspace
//! LB_BIN=target/release/lb cargo run --release -p lb-tests --example kube_latency -- [SERVICES] [ENDPOINTS] [CHANGES]
//! ```
//! (as root; defaults 10000 Services x 10 endpoints, 500 changes).
//!
//! Setup: the test topology's node namespace, the fake API server in it with SERVICES
//! ClusterIP Services of ENDPOINTS endpoints each (one EndpointSlice per Service), and the
//! real `lb agent` watching it. It reports how long the first complete sync took.
//!
//! Each change: one EndpointSlice of a random Service loses (or gets back) its last endpoint.
//! The clock starts just before the fake API server takes the change (it writes the watch
//! event to the agent's connection at once) and stops when a poll of the pinned services
//! map (every 50 µs) shows the Service's new backend count: the service entry is the last
//! write of an update. So each sample covers the watch event on the wire, the kube client's
//! decoding, the reflector, the debounce, translation, and the map writes. Changes are 20 ms
//! apart, so that each is its own batch.
//!
//! Endpoint addresses repeat every 50,000 (backends are shared between Services): the
//! backends map holds 65,536 entries.

use lb_userspace::datapath::Pins;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::{core::v1 as core, discovery::v1 as discovery};
use lb_common::Frontend4;
use lb_testbed::{
    agent::{Agent, metric, ops},
    fakeapi::FakeApiServer,
    topology::{NODE_IF, NODE_IP, Topology},
};
use lb_userspace::datapath::BpfMaps;
use serde_json::json;

const TCP: u8 = 6;
/// Distinct endpoint addresses (backends map capacity 65,536).
const DISTINCT_ENDPOINTS: u32 = 50_000;

fn cluster_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i)
}

fn service(i: u32) -> core::Service {
    serde_json::from_value(json!({
        "metadata": {"name": format!("svc-{i}"), "namespace": "bench"},
        "spec": {"clusterIP": cluster_ip(i).to_string(), "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    }))
    .expect("a valid Service")
}

fn slice(i: u32, endpoints: u32, per_service: u32) -> discovery::EndpointSlice {
    let endpoints: Vec<_> = (0..endpoints)
        .map(|j| {
            let n = (i * per_service + j) % DISTINCT_ENDPOINTS;
            let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + n);
            json!({"addresses": [ip.to_string()], "conditions": {"ready": true}})
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {
            "name": format!("svc-{i}-1"), "namespace": "bench",
            "labels": {"kubernetes.io/service-name": format!("svc-{i}")},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    }))
    .expect("a valid EndpointSlice")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() -> Result<()> {
    let args: Vec<u32> = std::env::args()
        .skip(1)
        .map(|a| a.parse().context("arguments: SERVICES ENDPOINTS CHANGES"))
        .collect::<Result<_>>()?;
    let services = args.first().copied().unwrap_or(10_000);
    let endpoints = args.get(1).copied().unwrap_or(10).max(2);
    let changes = args.get(2).copied().unwrap_or(500);

    let topology = Topology::new(1)?;
    let api = FakeApiServer::start(&topology.node)?;
    api.apply(&serde_json::from_value::<core::Node>(json!({
        "metadata": {"name": "bench-node"},
        "status": {"addresses": [{"type": "InternalIP", "address": NODE_IP.to_string()}]},
    }))?)?;
    for i in 0..services {
        api.apply(&service(i))?;
        api.apply(&slice(i, endpoints, endpoints))?;
    }
    eprintln!("{services} Services x {endpoints} endpoints on the fake API server");

    let started = Instant::now();
    let agent = Agent::start_kube(&topology.node, api.kubeconfig(), "bench-node", NODE_IF, &[])?;
    loop {
        let programmed = ops(&topology.node, "/metrics")
            .ok()
            .and_then(|(_, m)| metric(&m, "lb_frontends"));
        if programmed == Some(f64::from(services)) {
            break;
        }
        if started.elapsed() > Duration::from_secs(300) {
            bail!(
                "not programmed after 300 s: {programmed:?}\n{}",
                agent.log()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let first_sync = started.elapsed();
    let maps = BpfMaps::open_pinned(&Pins::new(agent.pin_path()))?;

    // A fixed pseudo-random sequence of Services (xorshift32).
    let mut seed = 0x2545_f491_u32;
    let mut short = vec![false; services as usize];
    let mut samples = Vec::with_capacity(changes as usize);
    for _ in 0..changes {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        let i = seed % services;
        let now_short = !short[i as usize];
        short[i as usize] = now_short;
        let want = if now_short { endpoints - 1 } else { endpoints };
        let key = Frontend4::new(cluster_ip(i).octets(), 80, TCP);
        let t0 = Instant::now();
        api.apply(&slice(i, want, endpoints))?;
        loop {
            if maps
                .services
                .get(&key, 0)
                .is_ok_and(|s| s.backend_count == want)
            {
                break;
            }
            if t0.elapsed() > Duration::from_secs(10) {
                bail!("svc-{i} not updated within 10 s\n{}", agent.log());
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        samples.push(t0.elapsed());
        std::thread::sleep(Duration::from_millis(20));
    }
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "first sync of {services} Services x {endpoints} endpoints: {:.0} ms (from agent start)",
        ms(first_sync)
    );
    println!(
        "EndpointSlice change -> map write, {} changes: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        samples.len(),
        ms(percentile(&samples, 0.5)),
        ms(percentile(&samples, 0.9)),
        ms(percentile(&samples, 0.99)),
        ms(samples[samples.len() - 1]),
    );
    let (_, m) = ops(&topology.node, "/metrics")?;
    if let (Some(sum), Some(count)) = (
        metric(&m, "lb_event_to_sync_seconds_sum"),
        metric(&m, "lb_event_to_sync_seconds_count"),
    ) {
        println!(
            "agent's own lb_event_to_sync_seconds (event received -> writes done, first sync included): \
             {count} syncs, mean {:.2} ms",
            sum / count * 1e3
        );
    }
    for line in m
        .lines()
        .filter(|l| l.starts_with("lb_event_to_sync_seconds_bucket"))
    {
        println!("  {line}");
    }
    Ok(())
}
