//! Manifests and API objects fuzzed with proptest (bounded runs; failing inputs are kept in
//! `manifest_fuzz.regressions`): mutated example files, and Services and EndpointSlices built
//! from random field values, through the same path as the agent (parse, validate, translate).
//!
//! What must hold: nothing panics; every error names its file and says where; whatever was
//! accepted translates to frontends with a real port and sorted, distinct backends.

use std::{net::Ipv4Addr, path::Path};

use lb_userspace::{
    model::NodeInfo,
    plan::translate,
    source::manifests::load::{self as manifest, ManifestSet},
};
use proptest::{prelude::*, strategy::ValueTree, test_runner::Config};

const FILE: &str = "fuzzed.yaml";

fn node() -> NodeInfo {
    NodeInfo {
        name: "node".into(),
        addresses: vec![Ipv4Addr::new(10, 200, 0, 1).into()],
        zone: Some("a".into()),
        labels: Default::default(),
    }
}

/// Parses and translates `text` as the agent would, and checks the invariants.
fn check(text: &str) -> Result<ManifestSet, TestCaseError> {
    let set = manifest::load_str(Path::new(FILE), text);
    for e in &set.errors {
        let shown = e.to_string();
        prop_assert!(shown.starts_with(FILE), "error without its file: {}", shown);
    }
    let translation = translate::translate(&set.state, &node());
    for (frontend, plan) in &translation.desired.frontends {
        prop_assert!(frontend.port != 0, "frontend {} has port 0", frontend);
        prop_assert!(
            plan.backends.windows(2).all(|w| w[0] < w[1]),
            "backends of {} not sorted and distinct: {:?}",
            frontend,
            plan.backends
        );
        prop_assert!(
            plan.backends.iter().all(|b| b.port != 0),
            "{:?}",
            plan.backends
        );
    }
    Ok(set)
}

fn examples() -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut texts: Vec<String> = std::fs::read_dir(&dir)
        .expect("examples/")
        .map(|e| std::fs::read_to_string(e.expect("entry").path()).expect("example text"))
        .collect();
    texts.sort();
    texts
}

/// Tokens that tend to break things where a value is expected.
const TOKENS: &[&str] = &[
    "-1",
    "0",
    "65536",
    "70000",
    "2147483648",
    "null",
    "~",
    "[",
    "]",
    "{",
    "}",
    "'",
    "\"",
    ": ",
    "- ",
    "\n",
    "\t",
    "IPv6",
    "FQDN",
    "SCTP",
    "None",
    "Local",
    "ClientIP",
    "999.1.1.1",
    "10.96.0.10/33",
    "::1",
    "true",
    "&a",
    "*a",
    "!!binary",
    "---",
    "\u{feff}",
    "é",
];

/// An example file with a few edits: a token inserted, a span deleted, or a line duplicated.
fn mutated_example() -> impl Strategy<Value = String> {
    let examples = examples();
    let edit = prop_oneof![
        (any::<prop::sample::Index>(), prop::sample::select(TOKENS)).prop_map(|(at, token)| (
            at,
            0usize,
            token.to_owned()
        )),
        (any::<prop::sample::Index>(), 1usize..40).prop_map(|(at, len)| (at, len, String::new())),
        (any::<prop::sample::Index>(), "[ -~]{0,12}").prop_map(|(at, text)| (at, 0usize, text)),
    ];
    (
        prop::sample::select(examples),
        prop::collection::vec(edit, 1..4),
    )
        .prop_map(|(mut text, edits)| {
            for (at, delete, insert) in edits {
                let mut start = at.index(text.len() + 1);
                while !text.is_char_boundary(start) {
                    start -= 1;
                }
                let mut end = (start + delete).min(text.len());
                while !text.is_char_boundary(end) {
                    end += 1;
                }
                text.replace_range(start..end, &insert);
            }
            text
        })
}

/// A field value: mostly a valid port number, sometimes anything.
fn scalar() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => (1u32..65536).prop_map(|n| n.to_string()),
        1 => any::<i64>().prop_map(|n| n.to_string()),
        1 => prop::sample::select(TOKENS).prop_map(|t| format!("{t:?}")),
        1 => "[a-z][a-z0-9-]{0,8}",
    ]
}

fn address() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (0u8..3, 1u8..4).prop_map(|(a, b)| format!("10.244.{a}.{b}")),
        1 => prop::sample::select(vec!["None", "", "::1", "10.96.0.300", "x"]).prop_map(String::from),
        1 => any::<[u8; 4]>().prop_map(|o| Ipv4Addr::from(o).to_string()),
    ]
}

/// A Service and an EndpointSlice built from random field values (some valid, some not).
fn service_and_slice() -> impl Strategy<Value = String> {
    let types = prop::sample::select(vec![
        "ClusterIP",
        "NodePort",
        "LoadBalancer",
        "ExternalName",
        "Weird",
    ]);
    let protocols = prop::sample::select(vec!["TCP", "UDP", "SCTP", "ICMP"]);
    let port = (
        scalar(),
        scalar(),
        scalar(),
        protocols.clone(),
        "[a-z]{0,3}",
    );
    let endpoint = (
        address(),
        any::<Option<bool>>(),
        any::<Option<bool>>(),
        any::<Option<bool>>(),
        prop::sample::select(vec!["node", "other"]),
    );
    (
        types,
        address(),
        prop::collection::vec(port, 0..3),
        prop::sample::select(vec!["Cluster", "Local", "Nope"]),
        prop::option::of(scalar()),
        prop::collection::vec(prop::sample::select(vec!["192.0.2.0/24", "0.0.0.0/0", "1.2.3.4/40", "x"]), 0..2),
        prop::collection::vec(endpoint, 0..4),
        prop::collection::vec((scalar(), "[a-z]{0,3}", protocols), 0..3),
        prop::sample::select(vec!["IPv4", "IPv6", "FQDN", "Other"]),
    )
        .prop_map(|(type_, cluster_ip, ports, policy, affinity, ranges, endpoints, slice_ports, address_type)| {
            let mut y = format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: svc, namespace: fuzz}}\nspec:\n  type: {type_}\n  clusterIP: {cluster_ip:?}\n  externalTrafficPolicy: {policy}\n  internalTrafficPolicy: {policy}\n  loadBalancerSourceRanges: {ranges:?}\n  externalIPs: [\"10.97.0.1\"]\n"
            );
            if let Some(timeout) = affinity {
                y += &format!("  sessionAffinity: ClientIP\n  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {timeout}}}}}\n");
            }
            y += "  ports:\n";
            for (port, target, node_port, proto, name) in ports {
                y += &format!("  - {{name: {name:?}, port: {port}, targetPort: {target}, nodePort: {node_port}, protocol: {proto}}}\n");
            }
            y += "status: {loadBalancer: {ingress: [{ip: 10.98.0.1}]}}\n---\n";
            y += &format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: svc-1\n  namespace: fuzz\n  labels: {{kubernetes.io/service-name: svc}}\naddressType: {address_type}\nports:\n"
            );
            for (port, name, proto) in slice_ports {
                y += &format!("- {{name: {name:?}, port: {port}, protocol: {proto}}}\n");
            }
            y += "endpoints:\n";
            for (addr, ready, serving, terminating, node) in endpoints {
                let cond = |name: &str, v: Option<bool>| v.map_or(String::new(), |v| format!("{name}: {v}, "));
                y += &format!(
                    "- addresses: [{addr:?}]\n  nodeName: {node}\n  conditions: {{{}{}{}}}\n",
                    cond("ready", ready),
                    cond("serving", serving),
                    cond("terminating", terminating)
                );
            }
            y
        })
}

proptest! {
    #![proptest_config(Config { cases: 1500, ..Config::default() })]

    #[test]
    fn mutated_examples_never_panic_and_errors_name_their_file(text in mutated_example()) {
        check(&text)?;
    }

    #[test]
    fn random_objects_never_panic_and_errors_name_the_object(text in service_and_slice()) {
        let set = check(&text)?;
        for e in &set.errors {
            let shown = e.to_string();
            prop_assert!(
                shown.contains("fuzz/svc") || shown.contains("document"),
                "error names neither the object nor the document: {}", shown
            );
        }
    }
}

#[test]
fn the_generated_objects_are_often_valid() {
    // The checks above prove little if every generated object is rejected.
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = service_and_slice();
    let mut accepted = 0;
    for _ in 0..300 {
        let text = strategy.new_tree(&mut runner).expect("value").current();
        let set = manifest::load_str(Path::new(FILE), &text);
        if !set.state.services.is_empty() {
            accepted += 1;
        }
    }
    eprintln!("{accepted} of 300 generated Services were valid");
    assert!(
        accepted > 15,
        "only {accepted} of 300 generated Services were valid"
    );
}
