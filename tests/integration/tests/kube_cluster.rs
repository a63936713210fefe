//! The real `lb agent` with its Kubernetes source against a real control plane (etcd,
//! kube-apiserver v1.21, kube-controller-manager: `lb_testbed::k8s`), in the test topology. The
//! test makes Services, Nodes and pods bound to the Node, and sets the pods' status (running,
//! ready or not, deleted with a grace period: terminating); the real EndpointSlice controller
//! writes the EndpointSlices. The agent runs as deploy/rbac.yaml's ServiceAccount.
//!
//! The maps follow Services, EndpointSlices and the Node; a real API server outage (the
//! agent's API server killed and started again while the cluster changes through another)
//! never flushes them; /metrics, /healthz and /readyz say what is going on; real traffic
//! follows an EndpointSlice change. Faults a real server cannot produce on demand are in
//! `kube.rs`, against the fake API server.
//!
//! Every test but the outages shares one control plane (one test at a time); the outage tests
//! start their own, with a second API server.

use lb_userspace::datapath::Pins;
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use lb_testbed::agent::{
    Agent, ServiceInfo, at80, backends_of, has_backends, metric, ops, sorted_backends,
};
use lb_testbed::client::{http_get, http_tally};
use lb_testbed::conns::{ConnPool, ConnRecord, failures};
use lb_testbed::k8s::objects::{self, delete_pod, set_pod_ready, terminate_pod};
use lb_testbed::k8s::{self, API_IP, API_PORT, Attachment, Config, ControlPlane, TestControlPlane};
use lb_testbed::topology::{CLIENT_IP, NODE_IF, NODE_IP, Topology};
use lb_userspace::datapath::BpfMaps;
use lb_userspace::datapath::maps::{DatapathMaps as _, MapContents};
use serde_json::json;

const NODE: &str = "node-1";
/// Another node, for endpoints elsewhere.
const NODE2: &str = "node-2";
/// The Node's ExternalIP: only the Node object names it (the interface has NODE_IP only).
const NODE_EXTERNAL_IP: &str = "10.200.0.100";
const WEB: &str = "10.96.0.10:8080/TCP";
const WEB_NODE_PORT: &str = "10.200.0.100:30080/TCP";
const WEB_NODE_PORT_INTERNAL: &str = "10.200.0.1:30080/TCP";
/// The `kubernetes` Service, which the API server makes: its frontend and backend.
const KUBERNETES: &str = "10.96.0.1:443/TCP";

/// The topology, its link to the control plane, and the agent watching it. Dropped in field
/// order: the agent stops first, the control plane (a lease: its objects deleted) goes last.
struct Cluster {
    agent: Agent,
    _link: Attachment,
    topology: Topology,
    cp: TestControlPlane,
}

impl Cluster {
    /// The shared control plane, the Node, `setup`'s objects, then the agent.
    fn start(setup: impl FnOnce(&Cluster0)) -> Self {
        Self::start_on(
            TestControlPlane::Shared(k8s::shared().expect("control plane")),
            2,
            setup,
        )
    }

    /// A control plane of its own with a second API server for the agent, to stop.
    fn start_with_outages(setup: impl FnOnce(&Cluster0)) -> Self {
        let config = Config {
            agent_apiserver: true,
            ..Config::default()
        };
        let cp = ControlPlane::start(config).expect("control plane");
        Self::start_on(TestControlPlane::Own(Box::new(cp)), 2, setup)
    }

    fn start_on(cp: TestControlPlane, pods: usize, setup: impl FnOnce(&Cluster0)) -> Self {
        let topology = Topology::new(pods).expect("topology");
        let link = cp.attach(&topology.node).expect("link to the API server");
        let c0 = Cluster0 {
            cp: &cp,
            topology: &topology,
        };
        c0.node(NODE_EXTERNAL_IP);
        setup(&c0);
        let kubeconfig = cp.agent_kubeconfig().expect("agent kubeconfig");
        let agent =
            Agent::start_kube(&topology.node, &kubeconfig, NODE, NODE_IF, &[]).expect("agent");
        Cluster {
            agent,
            _link: link,
            topology,
            cp,
        }
    }

    fn c0(&self) -> Cluster0<'_> {
        Cluster0 {
            cp: &self.cp,
            topology: &self.topology,
        }
    }

    fn pod(&self, i: usize) -> Ipv4Addr {
        self.topology.pods[i].ip
    }

    fn kube(&self) -> &k8s::Kube {
        self.cp.kube()
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
        self.agent.wait_ops(&self.topology.node, path, what, check);
    }
}

/// What the setup of a [`Cluster`] works with, before the agent starts.
struct Cluster0<'a> {
    cp: &'a ControlPlane,
    topology: &'a Topology,
}

impl Cluster0<'_> {
    fn kube(&self) -> &k8s::Kube {
        self.cp.kube()
    }

    /// The Node: the interface's address as InternalIP, `external_ip` as ExternalIP.
    fn node(&self, external_ip: &str) {
        objects::node(
            self.kube(),
            NODE,
            json!({"topology.kubernetes.io/zone": "zone-a"}),
            &[
                ("InternalIP", NODE_IP.to_string()),
                ("ExternalIP", external_ip.to_owned()),
                ("Hostname", NODE.to_owned()),
            ],
        )
        .unwrap();
    }

    /// A Service selecting `app: <name>`, 8080 → 80.
    fn service(&self, name: &str, cluster_ip: &str, extra: serde_json::Value) {
        let mut extra = extra;
        extra["clusterIP"] = cluster_ip.into();
        objects::service(self.kube(), name, name, extra).unwrap();
    }

    /// A Service selecting `app: <name>`, 8080 → 80, with `spec.topologyKeys` `keys`.
    fn service_json(&self, name: &str, cluster_ip: &str, keys: serde_json::Value) {
        let stored = self
            .kube()
            .apply_json::<core::Service>(json!({
                "metadata": {"name": name, "namespace": "default"},
                "spec": {"selector": {"app": name}, "clusterIP": cluster_ip,
                         "topologyKeys": keys,
                         "ports": [{"name": "http", "port": 8080, "targetPort": 80, "protocol": "TCP"}]},
            }))
            .unwrap();
        assert_eq!(
            stored["spec"]["topologyKeys"], keys,
            "the API server keeps them"
        );
    }

    /// A ready pod of `app` on the Node with this address.
    fn ready_pod(&self, name: &str, app: &str, ip: Ipv4Addr) {
        objects::pod(self.kube(), name, app, NODE, &[ip.into()], true).unwrap();
    }

    /// Pod `i` of the topology as a ready pod of `app`.
    fn topology_pod(&self, name: &str, app: &str, i: usize) {
        self.ready_pod(name, app, self.topology.pods[i].ip);
    }
}

/// The `kubernetes` Service's backends: the API servers.
fn kubernetes_backends(cp: &ControlPlane) -> Vec<String> {
    let mut ips = vec![API_IP];
    if cp.config().agent_apiserver {
        ips.push(k8s::ADMIN_API_IP);
    }
    let mut v: Vec<String> = ips.iter().map(|ip| format!("{ip}:{API_PORT}")).collect();
    v.sort();
    v
}

#[test]
fn the_maps_follow_services_endpoint_slices_and_the_node() {
    let c = Cluster::start(|c| {
        // With a nodePort chosen by the test (the API server allocates it otherwise).
        c.service(
            "web",
            "10.96.0.10",
            json!({"type": "NodePort",
                   "ports": [{"name": "http", "port": 8080, "targetPort": 80,
                              "protocol": "TCP", "nodePort": 30080}]}),
        );
        c.topology_pod("web-1", "web", 0);
        c.topology_pod("web-2", "web", 1);
    });
    let (p1, p2) = (c.pod(0), c.pod(1));
    let s = c.wait("web with both pods", has_backends(WEB, at80(&[p1, p2])));
    // NodePorts on the Node object's addresses (the ExternalIP is not on the interface).
    for frontend in [WEB_NODE_PORT, WEB_NODE_PORT_INTERNAL] {
        assert_eq!(
            sorted_backends(&s, frontend),
            Some(at80(&[p1, p2])),
            "{s:#?}"
        );
    }
    // The API server's own Service, with the API server as its backend.
    assert_eq!(
        sorted_backends(&s, KUBERNETES),
        Some(kubernetes_backends(&c.cp)),
        "{s:#?}"
    );
    // The slices the controller wrote: one, with both pods ready, serving, not terminating.
    let slices = c
        .kube()
        .list::<discovery::EndpointSlice>(Some("default"))
        .unwrap();
    let web: Vec<_> = slices
        .iter()
        .filter(|s| {
            s.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("kubernetes.io/service-name"))
                == Some(&"web".to_owned())
        })
        .collect();
    assert_eq!(web.len(), 1, "{web:#?}");
    for ep in web[0].endpoints.iter().flatten() {
        let conditions = ep.conditions.as_ref().unwrap();
        assert_eq!(
            (conditions.ready, conditions.serving, conditions.terminating),
            (Some(true), Some(true), Some(false)),
            "the controller sets serving and terminating (feature gate on): {ep:?}"
        );
    }

    // An endpoint added, one removed.
    let p3 = Ipv4Addr::new(10, 244, 9, 2);
    c.c0().ready_pod("web-3", "web", p3);
    c.wait("a third endpoint", has_backends(WEB, at80(&[p1, p2, p3])));
    assert!(delete_pod(c.kube(), "web-2").unwrap());
    c.wait("pod2 removed", has_backends(WEB, at80(&[p1, p3])));

    // A slice of the same Service written by hand (the controller leaves it alone), with a
    // duplicate of p1.
    let extra = objects::endpoint_slice("web-by-hand", "web", NODE, &[p1, p2]);
    c.kube().apply(&extra).unwrap();
    c.wait("two slices", has_backends(WEB, at80(&[p1, p2, p3])));
    assert!(
        c.kube()
            .delete::<discovery::EndpointSlice>(Some("default"), "web-by-hand", None)
            .unwrap()
    );
    c.wait("one slice again", has_backends(WEB, at80(&[p1, p3])));

    // Terminating endpoints (pods deleted with a grace period, still ready) take no new flows
    // while others are ready; with none ready, they do (kube-proxy's fallback).
    assert!(terminate_pod(c.kube(), "web-3").unwrap());
    c.wait("p3 terminating", has_backends(WEB, at80(&[p1])));
    assert!(terminate_pod(c.kube(), "web-1").unwrap());
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
    c.c0().node("10.200.0.101");
    c.wait("the NodePort on the new node address", |s| {
        backends_of(s, WEB_NODE_PORT).is_none()
            && backends_of(s, "10.200.0.101:30080/TCP").is_some()
    });

    // Another Service, with a pod at p2.
    c.c0().service("other", "10.96.0.20", json!({}));
    c.c0().ready_pod("other-1", "other", p2);
    c.wait("the other Service", |s| {
        sorted_backends(s, "10.96.0.20:8080/TCP") == Some(at80(&[p2]))
    });

    // Services deleted: their frontends go (the slices with them).
    assert!(
        c.kube()
            .delete::<core::Service>(Some("default"), "web", None)
            .unwrap()
    );
    let s = c.wait("web gone", |s| backends_of(s, WEB).is_none());
    assert!(
        s.iter().all(|i| !i.frontend.ends_with(":30080/TCP")),
        "{s:#?}"
    );
    assert!(backends_of(&s, "10.96.0.20:8080/TCP").is_some(), "{s:#?}");
    assert!(
        c.kube()
            .delete::<core::Service>(Some("default"), "other", None)
            .unwrap()
    );
    c.wait("nothing left but the kubernetes Service", |s| {
        s.len() == 1 && s[0].frontend == KUBERNETES
    });

    // What the watches asked the real API server for: kube-proxy's label selector, this
    // Node only, bookmarks.
    let requests = c.cp.agent_requests().unwrap();
    for wanted in [
        "labelSelector=!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless",
        "fieldSelector=metadata.name=node-1",
        "allowWatchBookmarks=true",
    ] {
        assert!(
            requests.iter().any(|t| t.contains(wanted)),
            "a request with {wanted}: {requests:#?}"
        );
    }
}

#[test]
fn an_api_server_outage_keeps_the_maps_and_is_reported() {
    let mut c = Cluster::start_with_outages(|c| {
        c.service("web", "10.96.0.10", json!({}));
        c.topology_pod("web-1", "web", 0);
        c.topology_pod("web-2", "web", 1);
    });
    let (p1, p2) = (c.pod(0), c.pod(1));
    c.wait("both pods", has_backends(WEB, at80(&[p1, p2])));
    c.wait_ops("/readyz", "ready", |status, _| status == 200);
    let programmed = c.agent.services().unwrap();
    let (_, m) = c.ops("/metrics");
    let restarts = |m: &str| -> f64 {
        ["services", "endpointslices", "nodes"]
            .iter()
            .filter_map(|r| metric(m, &format!("lb_watch_restarts_total{{resource=\"{r}\"}}")))
            .sum()
    };
    let restarts_before = restarts(&m);

    c.cp.stop_agent_apiserver().unwrap();
    // The change happens while the agent cannot see it: pod1 goes not ready, and the
    // controller (on the other API server) takes it out of the slice.
    set_pod_ready(c.kube(), "web-1", false).unwrap();
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

    // Back: a new API server process, with a new watch cache; the watchers converge.
    c.cp.start_agent_apiserver().unwrap();
    c.agent
        .wait_until_within(
            Duration::from_secs(45),
            "the change made during the outage",
            has_backends(WEB, at80(&[p2])),
        )
        .unwrap();
    c.wait_ops("/readyz", "ready again", |status, _| status == 200);
    let (_, m) = c.ops("/metrics");
    assert!(
        restarts(&m) > restarts_before,
        "the watchers started again after the outage:\n{m}"
    );
    assert!(c.agent.is_running());
}

#[test]
fn metrics_health_and_readiness() {
    let c = Cluster::start(|c| {
        c.service("web", "10.96.0.10", json!({}));
        c.service("api", "10.96.0.11", json!({}));
        c.topology_pod("web-1", "web", 0);
        c.topology_pod("web-2", "web", 1);
        c.topology_pod("api-1", "api", 0);
    });
    let (p1, p2) = (c.pod(0), c.pod(1));
    c.wait("both Services", |s| {
        sorted_backends(s, WEB) == Some(at80(&[p1, p2]))
            && sorted_backends(s, "10.96.0.11:8080/TCP") == Some(at80(&[p1]))
    });
    c.wait_ops("/readyz", "ready", |status, body| {
        status == 200 && body.trim() == "ok"
    });
    assert_eq!(c.ops("/healthz"), (200, "ok\n".to_owned()));
    assert_eq!(c.ops("/nope").0, 404);

    // web, api and the API server's own `kubernetes`; p1, p2 and the API server.
    c.wait_ops("/metrics", "the gauges of the programmed state", |_, m| {
        metric(m, "lb_frontends") == Some(3.0) && metric(m, "lb_backends") == Some(3.0)
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
    let c = Cluster::start(|c| {
        c.service("web", "10.96.0.10", json!({}));
        c.topology_pod("web-1", "web", 0);
    });
    let (p1, p2) = (c.pod(0), c.pod(1));
    c.wait("pod1 only", has_backends(WEB, at80(&[p1])));
    let cluster_ip = Ipv4Addr::new(10, 96, 0, 10);
    let tally = http_tally(&c.topology.client, cluster_ip, 8080, 10).unwrap();
    assert_eq!(tally.keys().collect::<Vec<_>>(), ["pod1"], "{tally:?}");

    // pod2 ready, pod1 not: the controller swaps them in the slice.
    c.c0().topology_pod("web-2", "web", 1);
    set_pod_ready(c.kube(), "web-1", false).unwrap();
    c.wait("pod2 only", has_backends(WEB, at80(&[p2])));
    let tally = http_tally(&c.topology.client, cluster_ip, 8080, 10).unwrap();
    assert_eq!(tally.keys().collect::<Vec<_>>(), ["pod2"], "{tally:?}");
}

/// What the agent programmed, read from its pins (the counters aside).
fn pinned(agent: &Agent) -> MapContents {
    BpfMaps::open_pinned(&Pins::new(agent.pin_path()))
        .unwrap()
        .read_all()
        .unwrap()
}

#[test]
fn a_minute_without_the_api_server_changes_nothing_and_the_agent_converges_after() {
    const OUTAGE: Duration = Duration::from_secs(60);
    let mut c = Cluster::start_with_outages(|c| {
        c.service("web", "10.96.0.10", json!({}));
        c.service("old", "10.96.0.20", json!({}));
        c.topology_pod("web-1", "web", 0);
        c.topology_pod("web-2", "web", 1);
        c.topology_pod("old-1", "old", 0);
    });
    let (p1, p2) = (c.pod(0), c.pod(1));
    c.wait("web and old", |s| {
        sorted_backends(s, WEB) == Some(at80(&[p1, p2]))
            && sorted_backends(s, "10.96.0.20:8080/TCP") == Some(at80(&[p1]))
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
    c.cp.stop_agent_apiserver().unwrap();
    // What changes while the agent cannot see it: a Service added, one deleted.
    c.c0().service("api", "10.96.0.11", json!({}));
    c.c0().topology_pod("api-1", "api", 1);
    assert!(
        c.kube()
            .delete::<core::Service>(Some("default"), "old", None)
            .unwrap()
    );

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

    // Back (a new process, a new watch cache), with the new state.
    c.cp.start_agent_apiserver().unwrap();
    let back = Instant::now();
    c.agent
        .wait_until_within(
            Duration::from_secs(60),
            "the changes made during the outage",
            |s| {
                sorted_backends(s, "10.96.0.11:8080/TCP") == Some(at80(&[p2]))
                    && sorted_backends(s, "10.96.0.20:8080/TCP").is_none()
                    && sorted_backends(s, WEB) == Some(at80(&[p1, p2]))
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
    let v6 = |s: &str| -> IpAddr { s.parse().unwrap() };
    let c = Cluster::start(|c| {
        objects::node(
            c.kube(),
            NODE,
            json!({}),
            &[
                ("InternalIP", NODE_IP.to_string()),
                ("InternalIP", "fd00:200::1".to_owned()),
            ],
        )
        .unwrap();
        objects::service(
            c.kube(),
            "ds",
            "ds",
            json!({"type": "NodePort", "clusterIP": "10.96.0.30",
                   "clusterIPs": ["10.96.0.30", "fd00:96::30"],
                   "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack",
                   "ports": [{"name": "http", "port": 8080, "targetPort": 80,
                              "protocol": "TCP", "nodePort": 30095}]}),
        )
        .unwrap();
        // A dual-stack pod (the topology's pod1) and an IPv6-only one.
        let kube = c.kube();
        objects::pod(
            kube,
            "ds-1",
            "ds",
            NODE,
            &[c.topology.pods[0].ip.into(), v6("fd00:244:1::2")],
            true,
        )
        .unwrap();
        objects::pod(kube, "ds-2", "ds", NODE, &[v6("fd00:244:2::2")], true).unwrap();
    });
    let pod = c.pod(0);
    let both6 = vec![
        "[fd00:244:1::2]:80".to_owned(),
        "[fd00:244:2::2]:80".to_owned(),
    ];
    let s = c.wait("the dual-stack Service", |s| {
        [
            ("10.96.0.30:8080/TCP", at80(&[pod])),
            ("10.200.0.1:30095/TCP", at80(&[pod])),
            ("[fd00:96::30]:8080/TCP", both6.clone()),
            ("[fd00:200::1]:30095/TCP", both6.clone()),
        ]
        .iter()
        .all(|(f, want)| sorted_backends(s, f).as_ref() == Some(want))
    });
    // Those four, and the `kubernetes` Service.
    assert_eq!(s.len(), 5, "{s:#?}");
    // The controller wrote one slice per family.
    let families: Vec<String> = c
        .kube()
        .list::<discovery::EndpointSlice>(Some("default"))
        .unwrap()
        .into_iter()
        .filter(|s| {
            s.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("kubernetes.io/service-name"))
                == Some(&"ds".to_owned())
        })
        .map(|s| s.address_type)
        .collect();
    assert_eq!(families.len(), 2, "{families:?}");
    assert!(families.contains(&"IPv4".to_owned()) && families.contains(&"IPv6".to_owned()));
}

/// In a pod, on a node without kube-proxy: the in-cluster address (KUBERNETES_SERVICE_HOST,
/// the `kubernetes` Service's ClusterIP) leads nowhere until lb has programmed it. With
/// deploy/'s `api-server` setting (LB_API_SERVER) the agent dials the API server there and
/// authenticates with the pod's service account; without it (the ConfigMap's default, empty)
/// it says which setting to make, in its log and in /readyz.
#[test]
fn in_a_pod_the_agent_dials_the_api_server_setting_and_names_it_when_unset() {
    let cp = k8s::shared().expect("control plane");
    let topology = Topology::new(1).expect("topology");
    let _link = cp.attach(&topology.node).expect("link to the API server");
    // Unreachable in the node's namespace, as on a node where nothing translates it yet.
    let pod = k8s::in_pod::InPod::new(&cp, "10.96.0.1").expect("the pod's files");
    let args = ["--node-name", NODE, "--interface", NODE_IF];
    let api_server = format!("https://{API_IP}:{API_PORT}");
    let agent = Agent::start_configured(&topology.node, &args, |cmd| {
        pod.configure(cmd).unwrap();
        cmd.env("LB_API_SERVER", &api_server);
    })
    .expect("agent");
    let s = agent
        .wait_until("the kubernetes Service", |s| {
            ServiceInfo::find(s, KUBERNETES).is_some()
        })
        .unwrap();
    assert_eq!(
        sorted_backends(&s, KUBERNETES),
        Some(kubernetes_backends(&cp))
    );
    agent.wait_ops(&topology.node, "/readyz", "ready", |status, _| {
        status == 200
    });
    drop(agent);

    let agent = Agent::start_configured(&topology.node, &args, |cmd| {
        pod.configure(cmd).unwrap();
        cmd.env("LB_API_SERVER", "");
    })
    .expect("agent");
    let names_the_setting = |text: &str| {
        text.contains("10.96.0.1")
            && text.contains("`api-server` in the ConfigMap lb-config")
            && text.contains("LB_API_SERVER")
    };
    agent.wait_ops(
        &topology.node,
        "/readyz",
        "not ready, naming the setting",
        |status, body| status == 503 && names_the_setting(body),
    );
    let log = agent.log();
    assert!(
        log.lines()
            .any(|l| l.contains("ERROR") && names_the_setting(l)),
        "an error in the log names the setting:\n{log}"
    );
    assert!(agent.services().unwrap().is_empty());
}

/// `spec.topologyKeys` on a real v1.21 cluster (feature gate ServiceTopology): the API
/// server keeps the field, the EndpointSlice controller writes each endpoint's nodeName and
/// the zone of its Node, the agent reads the keys through its watch and this node's labels
/// from its Node object. The API server refuses the combination lb refuses too.
#[test]
fn topology_keys_on_a_v1_21_cluster() {
    const NEAR: &str = "10.96.0.20:8080/TCP";
    const ZONAL: &str = "10.96.0.21:8080/TCP";
    let far = Ipv4Addr::new(10, 244, 9, 2);
    let c = Cluster::start(|c| {
        // This node as the kubelet labels it, and a second one in another zone.
        for (name, zone, ip) in [
            (NODE, "zone-a", NODE_IP),
            (NODE2, "zone-b", Ipv4Addr::new(10, 200, 0, 50)),
        ] {
            objects::node(
                c.kube(),
                name,
                json!({"kubernetes.io/hostname": name, "topology.kubernetes.io/zone": zone}),
                &[("InternalIP", ip.to_string())],
            )
            .unwrap();
        }
        c.service_json("near", "10.96.0.20", json!(["kubernetes.io/hostname", "*"]));
        c.service_json(
            "zonal",
            "10.96.0.21",
            json!(["topology.kubernetes.io/zone"]),
        );
        c.topology_pod("near-1", "near", 0);
        objects::pod(c.kube(), "near-2", "near", NODE2, &[far.into()], true).unwrap();
        c.topology_pod("zonal-1", "zonal", 1);
        objects::pod(
            c.kube(),
            "zonal-2",
            "zonal",
            NODE2,
            &[Ipv4Addr::new(10, 244, 9, 3).into()],
            true,
        )
        .unwrap();
    });
    let (p1, p2) = (c.pod(0), c.pod(1));
    c.wait("near: this node's pod", has_backends(NEAR, at80(&[p1])));
    c.wait("zonal: this zone's pod", has_backends(ZONAL, at80(&[p2])));
    let tally = http_tally(&c.topology.client, Ipv4Addr::new(10, 96, 0, 20), 8080, 10).unwrap();
    assert_eq!(
        tally.keys().collect::<Vec<_>>(),
        [&c.topology.pods[0].name],
        "{tally:?}"
    );

    // No endpoint on this node any more: "*", the other node's.
    assert!(delete_pod(c.kube(), "near-1").unwrap());
    c.wait(
        "near: any endpoint",
        has_backends(NEAR, vec![format!("{far}:80 (remote)")]),
    );
    // This node moves to zone-b (its label changes): the zonal Service follows.
    objects::node(
        c.kube(),
        NODE,
        json!({"kubernetes.io/hostname": NODE, "topology.kubernetes.io/zone": "zone-b"}),
        &[("InternalIP", NODE_IP.to_string())],
    )
    .unwrap();
    c.wait(
        "zonal: zone-b's pod",
        has_backends(ZONAL, vec!["10.244.9.3:80 (remote)".to_owned()]),
    );

    // What lb refuses, the v1.21 API server refuses, in the same words.
    let refused = c.kube().apply_json::<core::Service>(json!({
        "metadata": {"name": "local", "namespace": "default"},
        "spec": {"type": "NodePort", "externalTrafficPolicy": "Local",
                 "topologyKeys": ["kubernetes.io/hostname"],
                 "ports": [{"port": 80, "protocol": "TCP"}]},
    }));
    let error = format!("{:#}", refused.unwrap_err());
    assert!(
        error.contains(
            "spec.topologyKeys: Forbidden: may not be specified when `externalTrafficPolicy=Local`"
        ),
        "{error}"
    );
}

/// A LoadBalancer Service with externalTrafficPolicy Local on a real cluster: the API server
/// allocates its healthCheckNodePort, the agent serves kube-proxy's health check there on
/// the node's address, and it follows the pods' readiness through the real EndpointSlice
/// controller: 200 with the count of ready local endpoints, 503 at none.
#[test]
fn the_health_check_node_port_on_a_v1_21_cluster() {
    let c = Cluster::start(|c| {
        c.service(
            "lb",
            "10.96.0.30",
            json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local"}),
        );
        c.topology_pod("lb-1", "lb", 0);
        c.topology_pod("lb-2", "lb", 1);
    });
    let svc = c
        .kube()
        .get::<core::Service>(Some("default"), "lb")
        .unwrap()
        .unwrap();
    let port = svc.spec.unwrap().health_check_node_port.expect("allocated") as u16;
    let target = std::net::SocketAddr::new(NODE_IP.into(), port);
    let wait = |what: &str, want: (u16, i64)| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = lb_testbed::client::http_request(&c.topology.client, target, "/").map(
                |(status, body, _)| {
                    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
                    (status, json["localEndpoints"].as_i64().unwrap(), json)
                },
            );
            match &got {
                Ok((status, count, json)) if (*status, *count) == want => {
                    assert_eq!(json["service"]["name"], "lb");
                    return;
                }
                _ if Instant::now() > deadline => {
                    panic!("{what}: {got:?}; agent log:\n{}", c.agent.log())
                }
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    };
    wait("two ready local endpoints", (200, 2));
    set_pod_ready(c.kube(), "lb-1", false).unwrap();
    wait("one", (200, 1));
    set_pod_ready(c.kube(), "lb-2", false).unwrap();
    wait("none ready", (503, 0));
    set_pod_ready(c.kube(), "lb-1", true).unwrap();
    wait("one again", (200, 1));
    // kube-proxy's proxy health server beside it.
    let (status, body, _) = lb_testbed::client::http_request(
        &c.topology.client,
        std::net::SocketAddr::new(NODE_IP.into(), 10256),
        "/healthz",
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"nodeEligible\": true"), "{body}");

    // The cluster autoscaler marks the node for deletion: /healthz fails (load balancers
    // drain it), /livez does not.
    c.kube()
        .patch::<core::Node>(
            None,
            NODE,
            json!({"spec": {"taints": [{"key": "ToBeDeletedByClusterAutoscaler",
                                         "effect": "NoSchedule"}]}}),
        )
        .unwrap();
    let proxy = |path: &str| {
        lb_testbed::client::http_request(
            &c.topology.client,
            std::net::SocketAddr::new(NODE_IP.into(), 10256),
            path,
        )
        .unwrap()
        .0
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while proxy("/healthz") != 503 {
        assert!(Instant::now() < deadline, "{}", c.agent.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(proxy("/livez"), 200);
}
