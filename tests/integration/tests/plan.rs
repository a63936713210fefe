//! `lb plan` (the real binary) prints the translation of a folder without touching the kernel:
//! the examples give exactly the example frontends, and a bad object is named and fails the
//! command while the rest is still planned.

use std::collections::BTreeSet;
use std::process::Command;

use lb_testbed::{EXAMPLE_FRONTENDS, NODE_IP, examples_dir, lb_bin};

fn plan(dir: &std::path::Path, output: &str) -> std::process::Output {
    Command::new(lb_bin())
        .args(["plan", "--node-name", "node", "--output", output])
        .arg("--manifests")
        .arg(dir)
        .args(["--node-ip", &NODE_IP.to_string()])
        .output()
        .expect("run lb plan")
}

#[test]
fn plan_of_the_examples_lists_every_example_frontend_with_both_pods() {
    let out = plan(&examples_dir(), "json");
    assert!(out.status.success(), "{out:?}");
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let rows = plan["frontends"].as_array().expect("frontends");
    let frontends: BTreeSet<&str> = rows
        .iter()
        .map(|r| r["frontend"].as_str().unwrap())
        .collect();
    assert_eq!(frontends, EXAMPLE_FRONTENDS.iter().copied().collect());
    for row in rows {
        let backends: Vec<&str> = row["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_str().unwrap())
            .collect();
        assert_eq!(backends.len(), 2, "{row}");
        assert!(backends[0].starts_with("10.244.1.2:"), "{row}");
        assert!(backends[1].starts_with("10.244.2.2:"), "{row}");
    }
    assert_eq!(plan["errors"].as_array().unwrap().len(), 0, "{plan}");
}

#[test]
fn a_bad_object_is_named_and_fails_the_plan_but_the_rest_is_planned() {
    let dir = std::env::temp_dir().join(lb_testbed::netns::unique_name("plan"));
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(examples_dir()).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    std::fs::write(
        dir.join("broken.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: broken}\nspec: {ports: [{port: 0}]}\n",
    )
    .unwrap();
    let out = plan(&dir, "table");
    std::fs::remove_dir_all(&dir).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stdout}{stderr}");
    assert!(stderr.contains("broken.yaml"), "{stderr}");
    assert!(stderr.contains("default/broken"), "{stderr}");
    for frontend in EXAMPLE_FRONTENDS {
        assert!(
            stdout.contains(frontend),
            "{frontend} missing from\n{stdout}"
        );
    }
}

/// The dual-stack fixture folder (not in examples/, which the IPv4 demo and tests use).
fn dual_stack_dir() -> std::path::PathBuf {
    lb_testbed::agent::workspace_dir().join("tests/fixtures/dual-stack")
}

#[test]
fn plan_of_a_dual_stack_folder_gives_each_family_its_frontends_and_backends() {
    let out = Command::new(lb_bin())
        .args(["plan", "--node-name", "node", "--output", "json"])
        .arg("--manifests")
        .arg(dual_stack_dir())
        .args([
            "--node-ip",
            &NODE_IP.to_string(),
            "--node-ip",
            "fd00:200::1",
        ])
        .output()
        .expect("run lb plan");
    assert!(out.status.success(), "{out:?}");
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(plan["errors"].as_array().unwrap().len(), 0, "{plan}");
    let rows: Vec<(String, Vec<String>, Vec<String>)> = plan["frontends"]
        .as_array()
        .expect("frontends")
        .iter()
        .map(|r| {
            let strings = |v: &serde_json::Value| -> Vec<String> {
                v.as_array()
                    .unwrap()
                    .iter()
                    .map(|s| s.as_str().unwrap().to_owned())
                    .collect()
            };
            (
                r["frontend"].as_str().unwrap().to_owned(),
                strings(&r["backends"]),
                strings(&r["source_ranges"]),
            )
        })
        .collect();
    let v4 = |ips: &[&str], port| -> Vec<String> {
        ips.iter().map(|ip| format!("{ip}:{port}")).collect()
    };
    let both4 = v4(&["10.244.1.2", "10.244.2.2"], 80);
    let both6 = vec![
        "[fd00:244:1::2]:80".to_owned(),
        "[fd00:244:2::2]:80".to_owned(),
    ];
    let lb6 = vec![
        "[fd00:244:1::2]:80".to_owned(),
        "[fd00:244:3::2]:80 (terminating)".to_owned(),
    ];
    let echo6 = vec![
        "[fd00:244:1::2]:5353".to_owned(),
        "[fd00:244:2::2]:5353".to_owned(),
    ];
    let one4 = v4(&["10.244.1.2"], 80);
    let row = |f: &str, b: &[String], r: &[&str]| {
        (
            f.to_owned(),
            b.to_vec(),
            r.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        )
    };
    assert_eq!(
        rows,
        [
            row("10.96.0.20:8080/TCP", &both4, &[]),
            row("10.96.0.22:80/TCP", &one4, &[]),
            row("10.98.0.2:80/TCP", &one4, &["10.1.0.0/16"]),
            row("10.200.0.1:30090/TCP", &both4, &[]),
            row("10.200.0.1:30091/TCP", &one4, &[]),
            row("[fd00:96::20]:8080/TCP", &both6, &[]),
            row("[fd00:96::21]:5353/UDP", &echo6, &[]),
            row("[fd00:96::22]:80/TCP", &lb6, &[]),
            row("[fd00:97::1]:5353/UDP", &echo6, &[]),
            row("[fd00:98::2]:80/TCP", &lb6, &["fd00:1::/64"]),
            row("[fd00:200::1]:30090/TCP", &both6, &[]),
            row("[fd00:200::1]:30091/TCP", &lb6, &[]),
        ],
        "each family's frontends, none for the IPv4 externalIP of the IPv6-only echo-v6"
    );
}

/// The documentation's application folder, as it is: the Deployment `httpd`, the Service
/// `httpd-svc` (NodePort 8080 -> 80, no clusterIP, no nodePort) and the EndpointSlice the
/// control plane would write (`tests/fixtures/httpd-app/`).
fn httpd_app_dir() -> std::path::PathBuf {
    lb_testbed::agent::workspace_dir().join("tests/fixtures/httpd-app")
}

/// The plan of a folder as JSON, with `extra` arguments; it must succeed.
fn plan_json(dir: &std::path::Path, extra: &[&str]) -> serde_json::Value {
    let out = Command::new(lb_bin())
        .args([
            "plan",
            "--node-name",
            "node",
            "--output",
            "json",
            "--manifests",
        ])
        .arg(dir)
        .args(extra)
        .output()
        .expect("run lb plan");
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).expect("JSON")
}

fn strings(value: &serde_json::Value) -> Vec<String> {
    value
        .as_array()
        .expect("an array")
        .iter()
        .map(|v| v.as_str().expect("a string").to_owned())
        .collect()
}

#[test]
fn an_application_folder_plans_as_it_is_with_allocated_cluster_ip_and_node_port() {
    let dir = httpd_app_dir();
    let plan = plan_json(&dir, &["--node-ip", &NODE_IP.to_string()]);
    assert_eq!(strings(&plan["errors"]), Vec::<String>::new(), "{plan}");
    let notes = strings(&plan["notes"]);
    assert!(
        notes[0].ends_with(
            "httpd.yml document 1 (line 1) Deployment default/httpd: skipped: lb reads \
             Service (v1), EndpointSlice (discovery.k8s.io/v1), Endpoints (v1) and Node (v1), not \
             Deployment (apps/v1)"
        ),
        "{notes:?}"
    );
    let rows = plan["frontends"].as_array().unwrap();
    let frontends: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| (r["frontend"].as_str().unwrap(), r["kind"].as_str().unwrap()))
        .collect();
    assert_eq!(frontends.len(), 2, "{plan}");
    let (cluster_ip, node_port) = (frontends[0].0, frontends[1].0);
    assert_eq!((frontends[0].1, frontends[1].1), ("ClusterIp", "NodePort"));
    // From Kubernetes' default ranges, the upper (dynamic) bands: 10.96.1.0 and up in
    // 10.96.0.0/12, 30086 and up in 30000-32767; said in the notes.
    let ip: std::net::Ipv4Addr = cluster_ip
        .strip_suffix(":8080/TCP")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (u32::from(std::net::Ipv4Addr::new(10, 96, 1, 0))
            ..u32::from(std::net::Ipv4Addr::new(10, 112, 0, 0)))
            .contains(&u32::from(ip)),
        "{ip}"
    );
    let port: u16 = node_port
        .strip_prefix(&format!("{NODE_IP}:"))
        .and_then(|p| p.strip_suffix("/TCP"))
        .unwrap()
        .parse()
        .unwrap();
    assert!((30086..=32767).contains(&port), "{port}");
    assert_eq!(
        notes[1..],
        [
            format!("default/httpd-svc: spec.clusterIPs[0] {ip} allocated from 10.96.0.0/12"),
            format!("default/httpd-svc: spec.ports[0].nodePort {port} allocated from 30000-32767"),
        ]
    );
    for row in rows {
        assert_eq!(
            strings(&row["backends"]),
            ["10.244.1.2:80", "10.244.2.2:80"],
            "{row}"
        );
    }

    // Another node (another name and address) gets the same values.
    let other = plan_json(&dir, &["--node-ip", "10.200.0.3"]);
    assert_eq!(other["frontends"][0]["frontend"], cluster_ip);
    assert_eq!(
        other["frontends"][1]["frontend"],
        format!("10.200.0.3:{port}/TCP")
    );

    // Other ranges: from them.
    let other = plan_json(
        &dir,
        &[
            "--service-cidr",
            "10.100.0.0/16",
            "--service-node-port-range",
            "40000-40999",
            "--node-ip",
            "10.200.0.3",
        ],
    );
    let notes = strings(&other["notes"]);
    assert!(
        notes[1].contains("allocated from 10.100.0.0/16"),
        "{notes:?}"
    );
    assert!(notes[2].contains("allocated from 40000-40999"), "{notes:?}");
}

#[test]
fn bad_ranges_are_refused() {
    for (args, error) in [
        (
            &["--service-cidr", "10.0.0.0/8"][..],
            "--service-cidr 10.0.0.0/8: too large",
        ),
        (&["--service-cidr", "10.0.0.0"][..], "is not a CIDR"),
        (
            &["--service-node-port-range", "40000-30000"][..],
            "is not a port range",
        ),
    ] {
        let out = Command::new(lb_bin())
            .args(["plan", "--node-name", "node", "--manifests"])
            .arg(httpd_app_dir())
            .args(args)
            .output()
            .expect("run lb plan");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr.contains(error), "{args:?}: {stderr}");
    }
}
