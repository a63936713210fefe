//! kube-proxy's two health servers, as cloud load balancers probe them, from the client
//! namespace: a LoadBalancer Service's health check (externalTrafficPolicy Local) on its
//! healthCheckNodePort on the node's address, answering 200 while the node has a ready
//! endpoint of it and 503 when not, as the endpoints move; and the proxy health server
//! (`/healthz`, `/livez` on port 10256), 503 once an update has waited too long to be
//! programmed (a full services map), 200 again when it is.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lb_testbed::agent::Agent;
use lb_testbed::client::http_request;
use lb_testbed::manifests::Folder;
use lb_testbed::topology::{NODE_IF, NODE_IP, NODE_NAME, Pod, Topology};

const HEALTH_PORT: u16 = 32100;

/// A LoadBalancer Service `lb-local` with externalTrafficPolicy Local and healthCheckNodePort
/// [`HEALTH_PORT`], over `endpoints` (pod, node name, ready).
fn service(endpoints: &[(&Pod, &str, bool)]) -> String {
    let mut yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: lb-local}\nspec: {type: \
                    LoadBalancer, clusterIP: 10.96.5.1, externalTrafficPolicy: Local, \
                    healthCheckNodePort: 32100, ports: [{port: 80, nodePort: 30500}]}\n\
                    status: {loadBalancer: {ingress: [{ip: 10.98.5.1}]}}\n---\n\
                    apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: \
                    lb-local-1, labels: {kubernetes.io/service-name: lb-local}}\naddressType: \
                    IPv4\nports: [{port: 80}]\nendpoints:\n"
        .to_owned();
    for (pod, node, ready) in endpoints {
        yaml += &format!(
            "- {{addresses: [{}], nodeName: {node}, conditions: {{ready: {ready}}}}}\n",
            pod.ip
        );
    }
    yaml
}

/// The topology with two pods, and a folder with the Service over both, ready, local.
fn both_pods_local() -> (Topology, Folder) {
    let topology = Topology::new(2).unwrap();
    let folder = Folder::new().unwrap();
    let (p1, p2) = (&topology.pods[0], &topology.pods[1]);
    let yaml = service(&[(p1, NODE_NAME, true), (p2, NODE_NAME, true)]);
    folder.write("lb.yaml", &yaml).unwrap();
    (topology, folder)
}

/// GET `path` on the node's address at `port`, from the client: status and body.
fn get(topology: &Topology, port: u16, path: &str) -> (u16, String) {
    let (status, body, _) = http_request(
        &topology.client,
        SocketAddr::new(NODE_IP.into(), port),
        path,
    )
    .unwrap();
    (status, body)
}

/// Polls `port`'s `path` until `check` holds for its status and body, for up to 20 s.
fn wait_for(
    agent: &Agent,
    topology: &Topology,
    port: u16,
    path: &str,
    what: &str,
    check: impl Fn(u16, &serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answer = http_request(
            &topology.client,
            SocketAddr::new(NODE_IP.into(), port),
            path,
        );
        let last = match answer {
            Ok((status, body, _)) => match serde_json::from_str::<serde_json::Value>(&body) {
                Ok(json) if check(status, &json) => return json,
                Ok(json) => format!("{status} {json}"),
                Err(e) => format!("{status} {body:?}: {e}"),
            },
            Err(e) => format!("{e:#}"),
        };
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: last {last}\nagent log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_health_check_node_port_follows_the_local_endpoints() {
    let (topology, folder) = both_pods_local();
    let (p1, p2) = (&topology.pods[0], &topology.pods[1]);
    let agent = Agent::start(&topology.node, folder.path(), NODE_IF).unwrap();
    let health = |what: &str, want: (u16, u64)| {
        wait_for(&agent, &topology, HEALTH_PORT, "/", what, |status, json| {
            (status, json["localEndpoints"].as_u64().unwrap_or(99)) == want
        })
    };
    let json = health("two local endpoints", (200, 2));
    assert_eq!(json["service"]["namespace"], "default");
    assert_eq!(json["service"]["name"], "lb-local");
    assert_eq!(json["serviceProxyHealthy"], true);
    // Any path, as kube-proxy's.
    assert_eq!(get(&topology, HEALTH_PORT, "/healthz").0, 200);
    // kube-proxy's body, byte for byte.
    let (_, body) = get(&topology, HEALTH_PORT, "/");
    assert_eq!(
        body,
        "{\n\t\"service\": {\n\t\t\"namespace\": \"default\",\n\t\t\"name\": \"lb-local\"\n\t},\n\t\
         \"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
    );

    // The endpoints move to another node: 503, the cloud load balancer stops sending here.
    folder
        .write(
            "lb.yaml",
            &service(&[(p1, "elsewhere", true), (p2, "elsewhere", true)]),
        )
        .unwrap();
    health("no local endpoint", (503, 0));
    // One comes back, one is here but not ready: 200 with one.
    folder
        .write(
            "lb.yaml",
            &service(&[(p1, NODE_NAME, true), (p2, NODE_NAME, false)]),
        )
        .unwrap();
    health("one ready local endpoint", (200, 1));

    // The Service goes: so does its health check.
    folder.remove("lb.yaml").unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_request(
        &topology.client,
        SocketAddr::new(NODE_IP.into(), HEALTH_PORT),
        "/",
    )
    .is_ok()
    {
        assert!(Instant::now() < deadline, "{}", agent.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_proxy_health_server_reports_stale_programming() {
    let (topology, folder) = both_pods_local();
    // Three frontends fit (the Service's cluster IP, node port and ingress IP), no more.
    let agent = Agent::start_with_args(
        &lb_testbed::lb_bin(),
        &topology.node,
        folder.path(),
        NODE_IF,
        &["--max-services", "3", "--healthz-timeout-secs", "2"],
    )
    .unwrap();
    for path in ["/healthz", "/livez"] {
        let json = wait_for(&agent, &topology, 10256, path, "healthy", |status, _| {
            status == 200
        });
        assert_eq!(json["lastUpdated"], json["currentTime"], "{json}");
        assert_eq!(
            json.get("nodeEligible").is_some(),
            path == "/healthz",
            "{json}"
        );
    }
    let answers = |port: u16, path: &str, what: &str, want: u16| {
        wait_for(&agent, &topology, port, path, what, |s, _| s == want)
    };
    answers(HEALTH_PORT, "/", "the health check", 200);

    // One frontend too many: the update cannot be programmed; after the timeout both health
    // servers say so (the Service's health check too, though it has local endpoints).
    folder
        .write(
            "more.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: more}\nspec: {clusterIP: 10.96.5.2, \
             ports: [{port: 80}]}\n",
        )
        .unwrap();
    let started = Instant::now();
    let stale = answers(10256, "/livez", "stale", 503);
    assert!(started.elapsed() >= Duration::from_secs(1), "{stale}");
    assert_eq!(get(&topology, 10256, "/healthz").0, 503);
    let json = answers(HEALTH_PORT, "/", "unhealthy proxy", 503);
    assert_eq!(json["serviceProxyHealthy"], false);
    assert_eq!(json["localEndpoints"], 2);

    // Room again: healthy again.
    folder.remove("more.yaml").unwrap();
    answers(10256, "/livez", "healthy again", 200);
    answers(HEALTH_PORT, "/", "the health check", 200);
}
