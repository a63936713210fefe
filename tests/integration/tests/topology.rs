//! The test bed itself, without lb: namespaces, routing through the node, the backend servers,
//! the clients, and cleanup (also after a panic). Needs root.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;

use lb_testbed::{
    HTTP_PORT, PinDir, Topology, UDP_PORT, ensure_all_served, http_get, http_tally, netns,
    udp_request, udp_tally,
};

#[test]
fn client_reaches_pods_through_the_node() {
    let topology = Topology::new(3).expect("build topology");
    for pod in &topology.pods {
        let (body, peer) = http_get(&topology.client, pod.ip, HTTP_PORT).expect("HTTP to pod");
        assert_eq!(body, pod.name);
        assert_eq!(peer, (pod.ip, HTTP_PORT).into());
        let reply = udp_request(&topology.client, pod.ip, UDP_PORT, "hello").expect("UDP to pod");
        assert_eq!(reply, format!("{}:hello", pod.name));
    }
    let pods = topology.pod_names();
    let tally = http_tally(&topology.client, topology.pods[1].ip, HTTP_PORT, 5).expect("HTTP");
    ensure_all_served(&tally, &pods[1..2]).expect("only pod2 answers for its own address");
    let tally = udp_tally(&topology.client, topology.pods[2].ip, UDP_PORT, 5).expect("UDP");
    assert_eq!(tally.get("pod3"), Some(&5), "{tally:?}");
}

#[test]
fn http_server_keeps_connections_alive() {
    let topology = Topology::new(1).expect("build topology");
    let pod = &topology.pods[0];
    let stream = topology
        .client
        .run(|| TcpStream::connect((pod.ip, HTTP_PORT)))
        .expect("enter client namespace")
        .expect("connect to pod1");
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(3)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    for request in 0..3 {
        let close = request == 2;
        let connection = if close { "close" } else { "keep-alive" };
        write!(
            writer,
            "POST / HTTP/1.1\r\nHost: pod\r\nContent-Length: 4\r\nConnection: {connection}\r\n\r\nbody"
        )
        .unwrap();
        let mut length = None;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).expect("read header");
            if let Some(v) = line.strip_prefix("Content-Length: ") {
                length = Some(v.trim().parse::<usize>().unwrap());
            }
            if line == "\r\n" {
                break;
            }
        }
        let mut body = vec![0; length.expect("Content-Length")];
        reader.read_exact(&mut body).expect("read body");
        assert_eq!(body, b"pod1", "response {request}");
    }
    let mut rest = Vec::new();
    reader.read_to_end(&mut rest).expect("server closes");
    assert!(rest.is_empty(), "after Connection: close: {rest:?}");
}

#[test]
fn namespaces_and_pin_dir_are_removed_even_after_a_panic() {
    let mut names = Vec::new();
    let mut pin_dir = PathBuf::new();
    let result = catch_unwind(AssertUnwindSafe(|| {
        let topology = Topology::new(2).expect("build topology");
        let pins = PinDir::new().expect("create pin dir");
        names = topology.namespace_names();
        pin_dir = pins.path().to_owned();
        std::fs::create_dir(pin_dir.join("sub")).expect("mkdir in pin dir");
        let live = netns::list().expect("ip netns list");
        assert!(
            names.iter().all(|n| live.contains(n)),
            "{names:?} in {live:?}"
        );
        panic!("deliberate failure");
    }));
    assert!(result.is_err());
    assert_eq!(names.len(), 4);
    let live = netns::list().expect("ip netns list");
    for name in &names {
        assert!(!live.contains(name), "{name} left behind: {live:?}");
    }
    assert!(!pin_dir.exists(), "{} left behind", pin_dir.display());
}
