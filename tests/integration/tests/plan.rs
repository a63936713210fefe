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
