//! `lb plan` (the real binary) prints the translation of a folder without touching the kernel:
//! the examples give exactly the example frontends, and a bad object is named and fails the
//! command while the rest is still planned.

use std::collections::BTreeSet;
use std::process::Command;

use lb_tests::{EXAMPLE_FRONTENDS, NODE_IP, examples_dir, lb_bin};

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
    let dir = std::env::temp_dir().join(lb_tests::netns::unique_name("plan"));
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
