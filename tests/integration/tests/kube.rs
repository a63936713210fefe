//! The real `lb agent` with its Kubernetes source (the real kube-rs client) against the fake
//! API server (`lb_testbed::fakeapi`), for what a real API server cannot do on demand: lists
//! that take their time (the first sync waits for the EndpointSlices; without a Node list it
//! goes on after its timeout), watches cut at a chosen moment, resourceVersions expired (410)
//! and bookmarks at a chosen interval (the agent converges without a flush), and objects a
//! real server refuses to store (the agent names them and programs the rest). Everything a
//! real server can do is tested against one in `kube_cluster.rs`.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use k8s_openapi::api::{core::v1 as core, discovery::v1 as discovery};
use lb_testbed::{
    agent::{Agent, ServiceInfo, at80, backends_of, has_backends, metric, ops, sorted_backends},
    fakeapi::FakeApiServer,
    topology::{NODE_IF, NODE_IP, Topology},
};
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

/// A slice of `service` with these endpoints, ready.
fn slice(name: &str, service: &str, ready: &[Ipv4Addr]) -> discovery::EndpointSlice {
    lb_testbed::k8s::objects::endpoint_slice(name, service, NODE, ready)
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

    /// Waits until `check` holds for the body of `path` (any status), for up to 30 s.
    fn wait_ops(&self, path: &str, what: &str, check: impl Fn(u16, &str) -> bool) {
        self.agent.wait_ops(&self.topology.node, path, what, check);
    }
}

#[test]
fn the_first_sync_waits_for_the_endpoint_slices() {
    let topology = Topology::new(1).expect("topology");
    let api = FakeApiServer::start(&topology.node).expect("fake API server");
    api.apply(&node(NODE_EXTERNAL_IP)).unwrap();
    api.apply(&service("web", "10.96.0.10", json!({}))).unwrap();
    api.apply(&slice("web-1", "web", &[topology.pods[0].ip]))
        .unwrap();
    api.set_list_delay("endpointslices", Duration::from_secs(2));
    let agent =
        Agent::start_kube(&topology.node, api.kubeconfig(), NODE, NODE_IF, &[]).expect("agent");
    // Until the slices are listed, nothing is programmed (not web without backends).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut waited = false;
    loop {
        let s = agent.services().unwrap_or_default();
        if let Some(b) = sorted_backends(&s, WEB) {
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
    api.apply(&slice("web-1", "web", &[topology.pods[0].ip]))
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
    c.api.apply(&slice("web-1", "web", &[p.0, p.1])).unwrap();
    c.wait("both pods", has_backends(WEB, at80(&[p.0, p.1])));

    // 1. Watches cut: they resume from their resourceVersion, no relist, no flush.
    let before = c.api.requests();
    c.api.cut_connections();
    c.api.apply(&slice("web-1", "web", &[p.0])).unwrap();
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
    c.api.apply(&slice("web-1", "web", &[p.1])).unwrap();
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
    c.api.apply(&slice("web-1", "web", &[p.0, p.1])).unwrap();
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
        let now = sorted_backends(&s, WEB);
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
fn objects_a_real_server_refuses_are_named_and_the_rest_is_programmed() {
    let c = Cluster::start(|api| {
        api.apply(&service("web", "10.96.0.10", json!({}))).unwrap();
        // A ClusterIP that is no address.
        api.apply(&service("bad", "10.96.1.300", json!({})))
            .unwrap();
    });
    let p1 = c.pod(0);
    c.api.apply(&slice("web-1", "web", &[p1])).unwrap();
    // An IPv6 address in an IPv4 slice.
    let mut bad = slice("web-bad", "web", &[p1]);
    if let Some(endpoints) = bad.endpoints.as_mut() {
        endpoints[0].addresses = vec!["fd00:244:9::9".into()];
    }
    c.api.apply(&bad).unwrap();
    c.wait(
        "the good Service next to the bad objects",
        has_backends(WEB, at80(&[p1])),
    );
    let log = c.agent.log();
    assert!(
        log.contains("default/bad") && log.contains("10.96.1.300"),
        "the log names the bad Service:\n{log}"
    );
    assert!(
        log.contains("web-bad") && log.contains("fd00:244:9::9"),
        "the log names the bad slice:\n{log}"
    );
}
