//! `cargo xtask demo`: the test bed (client, node, two pods in network namespaces), the real
//! `lb agent` on the node serving examples/, and real traffic through three frontends.

use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::{Result, bail};
use lb_testbed::{NODE_IP, Tally, Testbed, ensure_all_served, http_tally, udp_tally};

const REQUESTS: usize = 100;

enum Proto {
    Http,
    Udp,
}

const FRONTENDS: &[(&str, Ipv4Addr, u16, Proto)] = &[
    ("ClusterIP", Ipv4Addr::new(10, 96, 0, 10), 8080, Proto::Http),
    ("NodePort", NODE_IP, 30080, Proto::Http),
    ("ClusterIP", Ipv4Addr::new(10, 96, 0, 12), 5353, Proto::Udp),
];

pub fn run(lb: &Path) -> Result<()> {
    // SAFETY: no other thread runs yet; lb_testbed finds the binary through LB_BIN.
    unsafe { std::env::set_var("LB_BIN", lb) };
    let names: Vec<String> = FRONTENDS.iter().map(frontend_name).collect();
    println!("Building the namespaces (client, node, pod1, pod2) and starting lb agent...");
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let bed = Testbed::start(&names)?;
    let pods = bed.topology.pod_names();
    println!(
        "lb agent programmed {} frontends from examples/.\n",
        bed.agent.services()?.len()
    );

    let mut failures = Vec::new();
    println!(
        "{:<10} {:<22} {:>8}{}",
        "kind",
        "frontend",
        "requests",
        pods.iter().map(|p| format!(" {p:>6}")).collect::<String>()
    );
    for ((kind, addr, port, proto), name) in FRONTENDS.iter().zip(&names) {
        let client = &bed.topology.client;
        let result = match proto {
            Proto::Http => http_tally(client, *addr, *port, REQUESTS),
            Proto::Udp => udp_tally(client, *addr, *port, REQUESTS),
        };
        let tally: Tally = match result {
            Ok(tally) => tally,
            Err(e) => {
                println!("{kind:<10} {name:<22} FAILED: {e:#}");
                failures.push(format!("{name}: {e:#}"));
                continue;
            }
        };
        let counts: String = pods
            .iter()
            .map(|p| format!(" {:>6}", tally.get(p).unwrap_or(&0)))
            .collect();
        println!("{kind:<10} {name:<22} {REQUESTS:>8}{counts}");
        if let Err(e) = ensure_all_served(&tally, &pods) {
            failures.push(format!("{name}: {e:#}"));
        }
    }
    drop(bed);
    println!("\nRemoved the namespaces and lb's pins.");
    if !failures.is_empty() {
        bail!("the demo failed:\n  {}", failures.join("\n  "));
    }
    Ok(())
}

fn frontend_name((_, addr, port, proto): &(&str, Ipv4Addr, u16, Proto)) -> String {
    let proto = match proto {
        Proto::Http => "TCP",
        Proto::Udp => "UDP",
    };
    format!("{addr}:{port}/{proto}")
}
