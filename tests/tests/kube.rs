//! The real `lb agent` with its Kubernetes source (the real kube-rs client) against the fake
//! API server, in the test topology: the maps follow Services, EndpointSlices and the Node;
//! broken watches, expired resourceVersions and outages never flush them; /metrics, /healthz
//! and /readyz say what is going on; real traffic follows an EndpointSlice change.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use k8s_openapi::api::{core::v1 as core, discovery::v1 as discovery};
use lb_tests::{
    agent::{Agent, ServiceInfo, backends_of, metric, ops},
    client::{http_get, http_tally},
    conns::{ConnPool, ConnRecord, failures},
    fakeapi::FakeApiServer,
    topology::{CLIENT_IP, NODE_IF, NODE_IP, Topology},
};
use lb_userspace::datapath::BpfMaps;
use lb_userspace::datapath::maps::{DatapathMaps as _, MapContents};
use serde_json::json;

const NODE: &str = "node-1";
/// The Node's ExternalIP: only the Node object names it (the interface has NODE_IP only).
const NODE_EXTERNAL_IP: &str = "10.200.0.100";
const WEB: &str = "10.96.0.10:8080/TCP";
const WEB_NODE_PORT: &str = "10.200.0.100:30080/TCP";
const WEB_NODE_PORT_INTERNAL: &str = "10.200.0.1:30080/TCP";

fn service(name: &str, cluster_ip: &str, extra: serde_json::Value) -> core::Service {
    let mut spec = json!({
        "clusterIP": cluster_ip,
        "ports": [{"name": "http", "port": 8080, "targetPort": 80, "protocol": "TCP"}],
    });
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    }))
    .unwrap()
}

/// An endpoint: address and state.
#[derive(Clone, Copy)]
enum Ep {
    Ready(Ipv4Addr),
    /// Serving and terminating (a pod being deleted that still answers).
    Terminating(Ipv4Addr),
}

fn slice(name: &str, service: &str, endpoints: &[Ep]) -> discovery::EndpointSlice {
    let endpoints: Vec<serde_json::Value> = endpoints
        .iter()
        .map(|ep| match ep {
            Ep::Ready(ip) => json!({
                "addresses": [ip.to_string()], "nodeName": NODE,
                "conditions": {"ready": true, "serving": true, "terminating": false},
            }),
            Ep::Terminating(ip) => json!({
                "addresses": [ip.to_string()], "nodeName": NODE,
                "conditions": {"ready": false, "serving": true, "terminating": true},
            }),
        })
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": name, "namespace": "default",
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
        "endpoints": endpoints,
    }))
    .unwrap()
}

fn node(external_ip: &str) -> core::Node {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": NODE, "labels": {"topology.kubernetes.io/zone": "zone-a"}},
        "status": {"addresses": [
            {"type": "InternalIP", "address": NODE_IP.to_string()},
            {"type": "ExternalIP", "address": external_ip},
            {"type": "Hostname", "address": NODE},
        ]},
    }))
    .unwrap()
}

/// The topology, the fake API server in its node namespace, and the agent watching it.
/// Dropped in field order: the agent stops first, the namespaces go last.
struct Cluster {
    agent: Agent,
    api: FakeApiServer,
    topology: Topology,
}

impl Cluster {
    /// Starts the API server with the Node and `setup`'s objects, then the agent.
    fn start(setup: impl FnOnce(&FakeApiServer)) -> Self {
        let topology = Topology::new(2).expect("topology");
        let api = FakeApiServer::start(&topology.node).expect("fake API server");
        api.apply(&node(NODE_EXTERNAL_IP)).unwrap();
        setup(&api);
        let agent =
            Agent::start_kube(&topology.node, api.kubeconfig(), NODE, NODE_IF, &[]).expect("agent");
        Cluster {
            agent,
            api,
            topology,
        }
    }

    fn pod(&self, i: usize) -> Ipv4Addr {
        self.topology.pods[i].ip
    }

    fn wait(&self, what: &str, check: impl Fn(&[ServiceInfo]) -> bool) -> Vec<ServiceInfo> {
        self.agent.wait_until(what, check).unwrap()
    }

    /// GET on the agent's operations endpoint: status and body.
    fn ops(&self, path: &str) -> (u16, String) {
        ops(&self.topology.node, path).unwrap()
    }

    /// Waits until `check` holds for the body of `path` (any status), for up to 30 s.
    fn wait_ops(&self, path: &str, what: &str, check: impl Fn(u16, &str) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, body) = self.ops(path);
            if check(status, &body) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {path} answered {status}:\n{body}\nagent log:\n{}",
                self.agent.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The backends of `frontend`, sorted, as `address:port[ (terminating)]`.
fn backends(services: &[ServiceInfo], frontend: &str) -> Option<Vec<String>> {
    backends_of(services, frontend).map(|b| {
        let mut b = b.to_vec();
        b.sort();
        b
    })
}

fn has_backends(frontend: &'static str, want: Vec<String>) -> impl Fn(&[ServiceInfo]) -> bool {
    move |s| backends(s, frontend).as_ref() == Some(&want)
}

fn at80(ips: &[Ipv4Addr]) -> Vec<String> {
    let mut v: Vec<String> = ips.iter().map(|ip| format!("{ip}:80")).collect();
    v.sort();
    v
}

#[test]
fn the_maps_follow_services_endpoint_slices_and_the_node() {
    let c = Cluster::start(|api| {
        // With the nodePort the API server would have allocated.
        let mut web = service("web", "10.96.0.10", json!({"type": "NodePort"}));
        web.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].node_port = Some(30080);
        api.apply(&web).unwrap();
    });
    let (p1, p2) = (c.pod(0), c.pod(1));
    c.api
        .apply(&slice("web-1", "web", &[Ep::Ready(p1), Ep::Ready(p2)]))
        .unwrap();
    let s = c.wait("web with both pods", has_backends(WEB, at80(&[p1, p2])));
    // NodePorts on the Node object's addresses (the ExternalIP is not on the interface).
    for frontend in [WEB_NODE_PORT, WEB_NODE_PORT_INTERNAL] {
        assert_eq!(backends(&s, frontend), Some(at80(&[p1, p2])), "{s:#?}");
    }

    // An endpoint added, one removed.
    let p3 = Ipv4Addr::new(10, 244, 9, 2);
    c.api
        .apply(&slice(
            "web-1",
            "web",
            &[Ep::Ready(p1), Ep::Ready(p2), Ep::Ready(p3)],
        ))
        .unwrap();
    c.wait("a third endpoint", has_backends(WEB, at80(&[p1, p2, p3])));
    c.api
        .apply(&slice("web-1", "web", &[Ep::Ready(p1), Ep::Ready(p3)]))
        .unwrap();
    c.wait("pod2 removed", has_backends(WEB, at80(&[p1, p3])));

    // A second slice of the same Service, with a duplicate of p1.
    c.api
        .apply(&slice("web-2", "web", &[Ep::Ready(p1), Ep::Ready(p2)]))
        .unwrap();
    c.wait("two slices", has_backends(WEB, at80(&[p1, p2, p3])));
    assert!(c.api.delete::<discovery::EndpointSlice>("default", "web-2"));
    c.wait("one slice again", has_backends(WEB, at80(&[p1, p3])));

    // Terminating endpoints take no new flows while others are ready; with none ready,
    // they do (kube-proxy's fallback).
    c.api
        .apply(&slice(
            "web-1",
            "web",
            &[Ep::Ready(p1), Ep::Terminating(p3)],
        ))
        .unwrap();
    c.wait("p3 terminating", has_backends(WEB, at80(&[p1])));
    c.api
        .apply(&slice(
            "web-1",
            "web",
            &[Ep::Terminating(p1), Ep::Terminating(p3)],
        ))
        .unwrap();
    c.wait(
        "only terminating endpoints",
        has_backends(
            WEB,
            at80(&[p1, p3])
                .into_iter()
                .map(|b| format!("{b} (terminating)"))
                .collect(),
        ),
    );

    // The Node's ExternalIP changes: the NodePort moves with it.
    c.api.apply(&node("10.200.0.101")).unwrap();
    c.wait("the NodePort on the new node address", |s| {
        backends_of(s, WEB_NODE_PORT).is_none()
            && backends_of(s, "10.200.0.101:30080/TCP").is_some()
    });

    // A bad Service is logged by name and left out; the others stay.
    c.api
        .apply(&service("bad", "10.96.1.300", json!({})))
        .unwrap();
    c.api
        .apply(&service("other", "10.96.0.20", json!({})))
        .unwrap();
    c.api
        .apply(&slice("other-1", "other", &[Ep::Ready(p2)]))
        .unwrap();
    c.wait("the good Service next to the bad one", |s| {
        backends(s, "10.96.0.20:8080/TCP") == Some(at80(&[p2]))
    });
    let log = c.agent.log();
    assert!(
        log.contains("default/bad") && log.contains("10.96.1.300"),
        "the log names the bad Service:\n{log}"
    );

    // Services deleted: their frontends go.
    assert!(c.api.delete::<core::Service>("default", "web"));
    let s = c.wait("web gone", |s| backends_of(s, WEB).is_none());
    assert!(
        s.iter().all(|i| !i.frontend.ends_with(":30080/TCP")),
        "{s:#?}"
    );
    assert!(backends_of(&s, "10.96.0.20:8080/TCP").is_some(), "{s:#?}");
    assert!(c.api.delete::<core::Service>("default", "other"));
    c.wait("nothing left", <[ServiceInfo]>::is_empty);

    // What the watches asked for: kube-proxy's label selector, this Node only, bookmarks.
    let targets = c.api.requests().targets;
    for wanted in [
        "labelSelector=!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless",
        "fieldSelector=metadata.name=node-1",
        "allowWatchBookmarks=true",
    ] {
        assert!(
            targets.iter().any(|t| t.contains(wanted)),
            "a request with {wanted}: {targets:#?}"
        );
    }
}

#[test]
fn the_first_sync_waits_for_the_endpoint_slices() {
    let topology = Topology::new(1).expect("topology");
    let api = FakeApiServer::start(&topology.node).expect("fake API server");
    api.apply(&node(NODE_EXTERNAL_IP)).unwrap();
    api.apply(&service("web", "10.96.0.10", json!({}))).unwrap();
    api.apply(&slice("web-1", "web", &[Ep::Ready(topology.pods[0].ip)]))
        .unwrap();
    api.set_list_delay("endpointslices", Duration::from_secs(2));
    let agent =
        Agent::start_kube(&topology.node, api.kubeconfig(), NODE, NODE_IF, &[]).expect("agent");
    // Until the slices are listed, nothing is programmed (not web without backends).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut waited = false;
    loop {
        let s = agent.services().unwrap_or_default();
        if let Some(b) = backends(&s, WEB) {
            assert_eq!(b, at80(&[topology.pods[0].ip]), "{s:#?}");
            break;
        }
        assert!(
            s.is_empty(),
            "programmed before the slices were listed: {s:#?}"
        );
        // (Refused until the agent listens.)
        if matches!(ops(&topology.node, "/readyz"), Ok((503, _))) {
            waited = true;
        }
        assert!(
            Instant::now() < deadline,
            "never programmed:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(waited, "/readyz said not ready while waiting for the lists");
    let (status, body) = ops(&topology.node, "/readyz").unwrap();
    assert_eq!((status, body.trim()), (200, "ok"));
}

#[test]
fn without_a_node_list_the_first_sync_goes_on_after_the_timeout() {
    let topology = Topology::new(1).expect("topology");
    let api = FakeApiServer::start(&topology.node).expect("fake API server");
    api.apply(&node(NODE_EXTERNAL_IP)).unwrap();
    let mut web = service("web", "10.96.0.10", json!({"type": "NodePort"}));
    web.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].node_port = Some(30080);
    api.apply(&web).unwrap();
    api.apply(&slice("web-1", "web", &[Ep::Ready(topology.pods[0].ip)]))
        .unwrap();
    api.set_list_delay("nodes", Duration::from_secs(4));
    let args = ["--initial-sync-timeout-secs", "1"];
    let agent =
        Agent::start_kube(&topology.node, api.kubeconfig(), NODE, NODE_IF, &args).expect("agent");
    // First without the Node: NodePorts on the interface's address only.
    let s = agent
        .wait_until("programmed without the Node", |s| {
            backends_of(s, WEB).is_some()
        })
        .unwrap();
    assert!(backends_of(&s, WEB_NODE_PORT_INTERNAL).is_some(), "{s:#?}");
    assert!(backends_of(&s, WEB_NODE_PORT).is_none(), "{s:#?}");
    // Then the Node's addresses, once it is listed.
    agent
        .wait_until("the NodePort on the Node's ExternalIP", |s| {
            backends_of(s, WEB_NODE_PORT).is_some()
        })
        .unwrap();
    assert!(
        agent.log().contains("no list of Nodes after"),
        "{}",
        agent.log()
    );
}

#[test]
fn cut_watches_and_expired_resource_versions_converge_without_a_flush() {
    let c = Cluster::start(|api| {
        api.apply(&service("web", "10.96.0.10", json!({}))).unwrap();
        api.set_bookmark_interval(Duration::from_millis(200));
    });
    let p = (c.pod(0), c.pod(1));
    c.api
        .apply(&slice("web-1", "web", &[Ep::Ready(p.0), Ep::Ready(p.1)]))
        .unwrap();
    c.wait("both pods", has_backends(WEB, at80(&[p.0, p.1])));

    // 1. Watches cut: they resume from their resourceVersion, no relist, no flush.
    let before = c.api.requests();
    c.api.cut_connections();
    c.api
        .apply(&slice("web-1", "web", &[Ep::Ready(p.0)]))
        .unwrap();
    watch_convergence(&c, at80(&[p.0, p.1]), at80(&[p.0]));
    let after = c.api.requests();
    assert_eq!(
        after.lists, before.lists,
        "a cut watch resumes without a list"
    );
    assert!(
        after.watches["endpointslices"] > before.watches["endpointslices"],
        "{after:?}"
    );

    // 2. Expired resourceVersions (410 Gone): the watchers list again, and the relist
    //    replaces the view only once complete.
    c.api.expire();
    c.api
        .apply(&slice("web-1", "web", &[Ep::Ready(p.1)]))
        .unwrap();
    watch_convergence(&c, at80(&[p.0]), at80(&[p.1]));
    let expired = c.api.requests();
    assert!(
        expired.expired.get("endpointslices").copied().unwrap_or(0) >= 1,
        "{expired:?}"
    );
    assert!(expired.lists["endpointslices"] > after.lists["endpointslices"]);
    c.wait_ops("/metrics", "relists counted", |_, m| {
        metric(m, "lb_watch_restarts_total{resource=\"endpointslices\"}").unwrap_or(0.0) >= 1.0
    });

    // 3. With bookmarks, a watcher's resourceVersion moves with the cluster's even when its
    //    own objects do not change: after a compaction and a bookmark it resumes without 410.
    //    Every watcher first has a watch open again (a bookmark since part 2; one still
    //    between its relist and its watch would get 410 from the compaction), and each gets
    //    a bookmark after the compaction before the cut.
    wait_bookmarks(&c, "every watch open again after the relists");
    c.api.compact();
    wait_bookmarks(&c, "a bookmark after the compaction");
    let before = c.api.requests();
    c.api.cut_connections();
    c.api
        .apply(&slice("web-1", "web", &[Ep::Ready(p.0), Ep::Ready(p.1)]))
        .unwrap();
    watch_convergence(&c, at80(&[p.1]), at80(&[p.0, p.1]));
    let after = c.api.requests();
    assert_eq!(
        after.expired, before.expired,
        "bookmarks kept the watches current"
    );
    assert_eq!(after.lists, before.lists);
}

/// Waits until a watch of each of the three resources has sent a bookmark since now.
fn wait_bookmarks(c: &Cluster, what: &str) {
    let since = c.api.requests().bookmarks;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = c.api.requests().bookmarks;
        let fresh = ["services", "endpointslices", "nodes"]
            .iter()
            .all(|r| now.get(*r).copied().unwrap_or(0) > since.get(*r).copied().unwrap_or(0));
        if fresh {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: bookmarks {since:?} -> {now:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls until `WEB` has `new` backends. Nothing is flushed on the way: every state seen has
/// backends, each of them old or new (a sync rewrites slots in place, so a poll may catch a
/// mix of both).
fn watch_convergence(c: &Cluster, old: Vec<String>, new: Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = c.agent.services().unwrap();
        let now = backends(&s, WEB);
        if now.as_ref() == Some(&new) {
            return;
        }
        assert!(
            now.as_ref().is_some_and(
                |b| !b.is_empty() && b.iter().all(|b| old.contains(b) || new.contains(b))
            ),
            "{WEB} has {now:?}, not {old:?}, {new:?} or a mix of both:\n{}",
            c.agent.log()
        );
        assert!(
            Instant::now() < deadline,
            "never converged to {new:?}:\n{}",
            c.agent.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn an_api_server_outage_keeps_the_maps_and_is_reported() {
    let mut c = Cluster::start(|api| {
        api.apply(&service("web", "10.96.0.10", json!({}))).unwrap();
    });
    let (p1, p2) = (c.pod(0), c.pod(1));
    c.api
        .apply(&slice("web-1", "web", &[Ep::Ready(p1), Ep::Ready(p2)]))
        .unwrap();
    c.wait("both pods", has_backends(WEB, at80(&[p1, p2])));
    c.wait_ops("/readyz", "ready", |status, _| status == 200);
    let programmed = c.agent.services().unwrap();

    c.api.stop();
    // The change happens while the agent cannot see it (as in etcd behind a dead apiserver).
    c.api
        .apply(&slice("web-1", "web", &[Ep::Ready(p2)]))
        .unwrap();
    c.wait_ops("/readyz", "not ready while disconnected", |status, body| {
        status == 503 && body.contains("disconnected")
    });
    c.wait_ops("/metrics", "watch errors and the source down", |_, m| {
        metric(m, "lb_source_up") == Some(0.0)
            && ["services", "endpointslices", "nodes"].iter().any(|r| {
                metric(m, &format!("lb_watch_errors_total{{resource=\"{r}\"}}")).unwrap_or(0.0)
                    >= 1.0
            })
    });
    let (status, _) = c.ops("/healthz");
    assert_eq!(status, 200, "alive while the API server is away");
    // The maps stay as they were for as long as the API server is away.
    for _ in 0..20 {
        let now = c.agent.services().unwrap();
        assert_eq!(
            now.iter()
                .map(|s| (&s.frontend, &s.backends))
                .collect::<Vec<_>>(),
            programmed
                .iter()
                .map(|s| (&s.frontend, &s.backends))
                .collect::<Vec<_>>(),
            "nothing changes during the outage"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Back, with its history compacted: the watchers list again and converge.
    c.api.compact();
    c.api.restart(&c.topology.node).expect("restart");
    // The watchers are woken from their backoff once the API server answers a probe.
    c.agent
        .wait_until_within(
            Duration::from_secs(45),
            "the change made during the outage",
            has_backends(WEB, at80(&[p2])),
        )
        .unwrap();
    c.wait_ops("/readyz", "ready again", |status, _| status == 200);
    assert!(c.api.requests().expired.values().sum::<usize>() >= 1);
    assert!(c.agent.is_running());
}

#[test]
fn metrics_health_and_readiness() {
    let c = Cluster::start(|api| {
        api.apply(&service("web", "10.96.0.10", json!({}))).unwrap();
        api.apply(&service("api", "10.96.0.11", json!({}))).unwrap();
    });
    let (p1, p2) = (c.pod(0), c.pod(1));
    c.api
        .apply(&slice("web-1", "web", &[Ep::Ready(p1), Ep::Ready(p2)]))
        .unwrap();
    c.api
        .apply(&slice("api-1", "api", &[Ep::Ready(p1)]))
        .unwrap();
    c.wait("both Services", |s| {
        backends(s, WEB) == Some(at80(&[p1, p2]))
            && backends(s, "10.96.0.11:8080/TCP") == Some(at80(&[p1]))
    });
    c.wait_ops("/readyz", "ready", |status, body| {
        status == 200 && body.trim() == "ok"
    });
    assert_eq!(c.ops("/healthz"), (200, "ok\n".to_owned()));
    assert_eq!(c.ops("/nope").0, 404);

    c.wait_ops("/metrics", "the gauges of the programmed state", |_, m| {
        metric(m, "lb_frontends") == Some(2.0) && metric(m, "lb_backends") == Some(2.0)
    });
    let (status, m) = c.ops("/metrics");
    assert_eq!(status, 200);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let last = metric(&m, "lb_last_sync_timestamp_seconds").unwrap();
    assert!((now - 600.0..=now + 1.0).contains(&last), "{last} vs {now}");
    assert_eq!(metric(&m, "lb_source_up"), Some(1.0));
    assert_eq!(metric(&m, "lb_frontends_unprogrammed"), Some(0.0));
    assert!(!m.contains("lb_map_write_errors_total{"), "{m}");
    let syncs = metric(&m, "lb_syncs_total").unwrap();
    assert!(syncs >= 1.0, "{m}");
    assert_eq!(metric(&m, "lb_sync_duration_seconds_count"), Some(syncs));
    assert_eq!(metric(&m, "lb_event_to_sync_seconds_count"), Some(syncs));
    let total = metric(&m, "lb_sync_duration_seconds_sum").unwrap();
    assert!(
        total > 0.0 && total < syncs * 5.0,
        "{total} s for {syncs} syncs"
    );
    for resource in ["services", "endpointslices", "nodes"] {
        for counter in ["lb_watch_restarts_total", "lb_watch_errors_total"] {
            let line = format!("{counter}{{resource=\"{resource}\"}}");
            assert_eq!(metric(&m, &line), Some(0.0), "{line} in:\n{m}");
        }
    }
    assert!(m.trim_end().ends_with("# EOF"), "{m}");
}

#[test]
fn traffic_follows_an_endpoint_slice_change() {
    let c = Cluster::start(|api| {
        api.apply(&service("web", "10.96.0.10", json!({}))).unwrap();
    });
    let (p1, p2) = (c.pod(0), c.pod(1));
    c.api
        .apply(&slice("web-1", "web", &[Ep::Ready(p1)]))
        .unwrap();
    c.wait("pod1 only", has_backends(WEB, at80(&[p1])));
    let cluster_ip = Ipv4Addr::new(10, 96, 0, 10);
    let tally = http_tally(&c.topology.client, cluster_ip, 8080, 10).unwrap();
    assert_eq!(tally.keys().collect::<Vec<_>>(), ["pod1"], "{tally:?}");

    c.api
        .apply(&slice("web-1", "web", &[Ep::Ready(p2)]))
        .unwrap();
    c.wait("pod2 only", has_backends(WEB, at80(&[p2])));
    let tally = http_tally(&c.topology.client, cluster_ip, 8080, 10).unwrap();
    assert_eq!(tally.keys().collect::<Vec<_>>(), ["pod2"], "{tally:?}");
}

/// What the agent programmed, read from its pins (the counters aside).
fn pinned(agent: &Agent) -> MapContents {
    BpfMaps::open_pinned(agent.pin_path())
        .unwrap()
        .read_all()
        .unwrap()
}

#[test]
fn a_minute_without_the_api_server_changes_nothing_and_the_agent_converges_after() {
    const OUTAGE: Duration = Duration::from_secs(60);
    let mut c = Cluster::start(|api| {
        api.apply(&service("web", "10.96.0.10", json!({}))).unwrap();
        api.apply(&service("old", "10.96.0.20", json!({}))).unwrap();
    });
    let (p1, p2) = (c.pod(0), c.pod(1));
    c.api
        .apply(&slice("web-1", "web", &[Ep::Ready(p1), Ep::Ready(p2)]))
        .unwrap();
    c.api
        .apply(&slice("old-1", "old", &[Ep::Ready(p1)]))
        .unwrap();
    c.wait("web and old", |s| {
        backends(s, WEB) == Some(at80(&[p1, p2]))
            && backends(s, "10.96.0.20:8080/TCP") == Some(at80(&[p1]))
    });
    c.wait_ops("/readyz", "ready", |status, _| status == 200);
    // Traffic through web the whole time: kept-alive connections in rounds, and a new
    // connection every half second.
    let web_ip = Ipv4Addr::new(10, 96, 0, 10);
    let mut pool = ConnPool::new(
        &c.topology.client,
        CLIENT_IP,
        SocketAddrV4::new(web_ip, 8080),
        21_000,
    );
    pool.open(20, "before the outage").unwrap();
    pool.start_traffic();
    let before = pinned(&c.agent);

    let stopped = Instant::now();
    c.api.stop();
    // What changes while the agent cannot see it: a Service added, one deleted.
    c.api
        .apply(&service("api", "10.96.0.11", json!({})))
        .unwrap();
    c.api
        .apply(&slice("api-1", "api", &[Ep::Ready(p2)]))
        .unwrap();
    assert!(c.api.delete::<core::Service>("default", "old"));

    let watch_errors = |m: &str| -> f64 {
        ["services", "endpointslices", "nodes"]
            .iter()
            .filter_map(|r| metric(m, &format!("lb_watch_errors_total{{resource=\"{r}\"}}")))
            .sum()
    };
    let mut not_ready = None;
    let mut errors_seen = Vec::new();
    let mut new_connections = 0;
    while stopped.elapsed() < OUTAGE {
        let (body, _) = http_get(&c.topology.client, web_ip, 8080)
            .unwrap_or_else(|e| panic!("a new connection at {:?}: {e:#}", stopped.elapsed()));
        assert!(body == "pod1" || body == "pod2", "{body}");
        new_connections += 1;
        let (status, body) = c.ops("/readyz");
        if status == 503 {
            assert!(body.contains("source disconnected"), "{body}");
            not_ready.get_or_insert(stopped.elapsed());
        } else {
            assert!(
                not_ready.is_none(),
                "ready again at {:?} with the API server away: {body}",
                stopped.elapsed()
            );
        }
        if not_ready.is_some() {
            let (_, m) = c.ops("/metrics");
            assert_eq!(metric(&m, "lb_source_up"), Some(0.0), "{m}");
            errors_seen.push(watch_errors(&m));
        }
        assert!(
            pinned(&c.agent) == before,
            "the maps changed at {:?} during the outage",
            stopped.elapsed()
        );
        assert_eq!(c.ops("/healthz").0, 200);
        std::thread::sleep(Duration::from_millis(500));
    }
    let not_ready = not_ready.expect("/readyz said 503 during the outage");
    let (first, last) = (errors_seen[0], errors_seen[errors_seen.len() - 1]);
    assert!(
        first >= 1.0 && last > first,
        "watch errors grow during the outage: {errors_seen:?}"
    );
    let (_, m) = c.ops("/metrics");
    let restarts = |m: &str| metric(m, "lb_watch_restarts_total{resource=\"services\"}").unwrap();
    let restarts_during = restarts(&m);

    // Back, with its history compacted (the watchers must list again) and the new state.
    c.api.compact();
    c.api.restart(&c.topology.node).expect("restart");
    let back = Instant::now();
    c.agent
        .wait_until_within(
            Duration::from_secs(60),
            "the changes made during the outage",
            |s| {
                backends(s, "10.96.0.11:8080/TCP") == Some(at80(&[p2]))
                    && backends(s, "10.96.0.20:8080/TCP").is_none()
                    && backends(s, WEB) == Some(at80(&[p1, p2]))
            },
        )
        .unwrap();
    let converged = back.elapsed();
    c.wait_ops("/readyz", "ready again", |status, _| status == 200);
    let ready_again = back.elapsed();
    pool.stop_traffic();

    let records = pool.records();
    assert!(
        failures(&records).is_empty(),
        "kept-alive connections failed: {:?}",
        records
            .iter()
            .filter(|r| r.failure.is_some())
            .collect::<Vec<_>>()
    );
    let least = records.iter().map(ConnRecord::answered).min().unwrap();
    assert!(least >= 10, "every connection was busy: {least} answers");
    let (_, m) = c.ops("/metrics");
    assert!(
        restarts(&m) > restarts_during,
        "the watchers listed again:\n{m}"
    );
    assert_eq!(metric(&m, "lb_source_up"), Some(1.0));
    let (body, _) = http_get(&c.topology.client, Ipv4Addr::new(10, 96, 0, 11), 8080).unwrap();
    assert_eq!(body, "pod2");
    eprintln!(
        "API server away {OUTAGE:?}: /readyz 503 after {not_ready:?}; {new_connections} new \
         connections and {} kept-alive requests on {} connections, none failed; watch errors \
         {first} -> {last}; after its return: converged in {converged:?}, ready in {ready_again:?}",
        records.iter().map(ConnRecord::answered).sum::<usize>(),
        records.len(),
    );
}

#[test]
fn dual_stack_services_ipv6_slices_and_node_addresses_come_through_the_watch() {
    let slice6 = |name: &str, ips: &[&str]| -> discovery::EndpointSlice {
        let endpoints: Vec<serde_json::Value> = ips
            .iter()
            .map(|ip| json!({"addresses": [ip], "nodeName": NODE, "conditions": {"ready": true}}))
            .collect();
        serde_json::from_value(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "ds"}},
            "addressType": "IPv6",
            "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
            "endpoints": endpoints,
        }))
        .unwrap()
    };
    let topology = Topology::new(2).expect("topology");
    let api = FakeApiServer::start(&topology.node).expect("fake API server");
    let node: core::Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": NODE},
        "status": {"addresses": [
            {"type": "InternalIP", "address": NODE_IP.to_string()},
            {"type": "InternalIP", "address": "fd00:200::1"},
        ]},
    }))
    .unwrap();
    api.apply(&node).unwrap();
    api.apply(&service(
        "ds",
        "10.96.0.30",
        json!({"type": "NodePort", "clusterIPs": ["10.96.0.30", "fd00:96::30"],
               "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack",
               "ports": [{"name": "http", "port": 8080, "targetPort": 80,
                          "protocol": "TCP", "nodePort": 30095}]}),
    ))
    .unwrap();
    let pod = topology.pods[0].ip;
    api.apply(&slice("ds-v4", "ds", &[Ep::Ready(pod)])).unwrap();
    api.apply(&slice6("ds-v6", &["fd00:244:1::2", "fd00:244:2::2"]))
        .unwrap();
    // An IPv6 address in an IPv4 slice: named in the log, the rest still programs.
    let mut bad = slice("ds-bad", "ds", &[Ep::Ready(pod)]);
    if let Some(endpoints) = bad.endpoints.as_mut() {
        endpoints[0].addresses = vec!["fd00:244:9::9".into()];
    }
    api.apply(&bad).unwrap();
    let agent =
        Agent::start_kube(&topology.node, api.kubeconfig(), NODE, NODE_IF, &[]).expect("agent");
    let both6 = vec![
        "[fd00:244:1::2]:80".to_owned(),
        "[fd00:244:2::2]:80".to_owned(),
    ];
    let s = agent
        .wait_until("the dual-stack Service", |s| {
            [
                ("10.96.0.30:8080/TCP", at80(&[pod])),
                ("10.200.0.1:30095/TCP", at80(&[pod])),
                ("[fd00:96::30]:8080/TCP", both6.clone()),
                ("[fd00:200::1]:30095/TCP", both6.clone()),
            ]
            .iter()
            .all(|(f, want)| backends(s, f).as_ref() == Some(want))
        })
        .unwrap();
    assert_eq!(s.len(), 4, "{s:#?}");
    let log = agent.log();
    assert!(
        log.contains("ds-bad") && log.contains("fd00:244:9::9"),
        "the bad slice is named:\n{log}"
    );
}
