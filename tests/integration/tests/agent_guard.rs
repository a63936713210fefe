//! The `Agent` guard, checked against a fake `lb` (a shell script), so that it is known to
//! work before the real agent exists: it runs in the node namespace with bpffs visible, its
//! `lb services` output is parsed and waited for, and drop sends SIGTERM, runs `lb teardown`
//! and removes the pin directory. Needs root.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use lb_testbed::{Agent, NODE_NAME, Netns, examples_dir};

const FAKE_LB: &str = r#"#!/bin/sh
# Records every call in $0.calls; `agent` runs until SIGTERM; `services` shows one
# frontend once the agent is ready.
echo "$@" >> "$0.calls"
case "$1" in
agent)
    echo "netns $(readlink /proc/self/ns/net)" >> "$0.calls"
    prev=; for arg; do [ "$prev" = --pin-path ] && pins=$arg; prev=$arg; done
    [ -d "$pins" ] && echo "pin dir visible" >> "$0.calls"
    trap 'echo TERM >> "$0.calls"; exit 0' TERM
    touch "$0.ready"
    while :; do sleep 0.05; done ;;
services)
    [ -e "$0.ready" ] || { echo '[]'; exit 0; }
    echo '[{"frontend":"10.96.0.10:8080/TCP","service_id":1,"backend_count":2,"backends":["10.244.1.2:80","10.244.2.2:80"]}]' ;;
esac
"#;

#[test]
fn agent_guard_runs_in_the_namespace_and_cleans_up() {
    let ns = Netns::new("guard").expect("create namespace");
    let dir = TempDir::new();
    let lb = dir.0.join("lb");
    std::fs::write(&lb, FAKE_LB).unwrap();
    std::fs::set_permissions(&lb, std::fs::Permissions::from_mode(0o755)).unwrap();

    let agent = Agent::start_with(&lb, &ns, &examples_dir(), "eth0").expect("start agent");
    let pins = agent.pin_path().to_owned();
    agent
        .wait_for(&["10.96.0.10:8080/TCP"], 2)
        .expect("fake frontends");
    let services = agent.services().expect("services");
    assert_eq!(services[0].backends, ["10.244.1.2:80", "10.244.2.2:80"]);
    drop(agent);

    assert!(!pins.exists(), "{} left behind", pins.display());
    let calls = std::fs::read_to_string(dir.0.join("lb.calls")).unwrap();
    let ns_inode = std::fs::metadata(Path::new("/run/netns").join(ns.name()))
        .unwrap()
        .ino();
    let expected_agent = format!(
        "agent --manifests {} --interface eth0 --node-name {NODE_NAME} --pin-path {} --no-cgroup",
        examples_dir().display(),
        pins.display()
    );
    // `lb services` calls interleave with the agent's lines.
    let lines: Vec<&str> = calls.lines().collect();
    let netns = format!("netns net:[{ns_inode}]");
    for line in [&expected_agent, &netns, "pin dir visible"] {
        assert!(lines.contains(&line), "no {line:?} in {calls}");
    }
    let term = lines.iter().position(|l| *l == "TERM").expect(&calls);
    let teardown = format!("teardown --pin-path {}", pins.display());
    let torn = lines.iter().position(|l| *l == teardown).expect(&calls);
    assert!(
        term < torn,
        "teardown only after the agent stopped: {calls}"
    );
}

/// A directory under /tmp, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(lb_testbed::netns::unique_name("fake-lb"));
        std::fs::create_dir(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
