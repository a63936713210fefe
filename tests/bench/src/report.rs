//! BENCHMARKS.md and its charts, written from a run's [`Results`] only.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::Results;
use super::e2e::{E2eResults, Mode};
use super::packet::{Method, PacketResults, PathKind};
use super::pps::{BackendKind, L4, PpsMode, PpsResults, PpsRow};
use super::svg::{BarChart, short};

/// Where the charts and the raw numbers go, relative to BENCHMARKS.md.
pub const ASSETS: &str = "benchmarks";

/// One of the targets, measured.
#[derive(Debug, Clone)]
pub struct Target {
    /// The target as the issue states it.
    pub target: &'static str,
    /// What was measured.
    pub measured: String,
    /// Met, missed, or not measured in this run.
    pub met: Option<bool>,
}

/// "1,000" for 1000.
pub fn count(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// "1 Service", "1,000 Services".
fn services(n: usize) -> String {
    format!("{} Service{}", count(n), if n == 1 { "" } else { "s" })
}

/// The ratio of the path's cost to the floor's, both by `method` at `services`.
fn ratio(p: &PacketResults, path: PathKind, method: Method, services: usize) -> Option<f64> {
    Some(p.get(path, method, services)?.ns / p.floor(method, services)?)
}

/// How each measured path is measured in the main table.
fn main_method(path: PathKind) -> Method {
    if path == PathKind::NewFlow {
        Method::Single
    } else {
        Method::Repeat
    }
}

/// The largest deviation, in percent, of a path's cost at any level from its cost at the
/// fewest Services.
fn spread(p: &PacketResults, levels: &[usize], path: PathKind) -> Option<f64> {
    let method = main_method(path);
    let base = p.get(path, method, *levels.first()?)?.ns;
    levels
        .iter()
        .filter_map(|&l| p.get(path, method, l))
        .map(|m| 100.0 * (m.ns - base).abs() / base)
        .reduce(f64::max)
}

const MEASURED_PATHS: [PathKind; 4] = [
    PathKind::NotFrontend,
    PathKind::NewFlow,
    PathKind::Established,
    PathKind::Reply,
];

/// How long kube-proxy's own command took to program: ("≥ " and the time it was stopped
/// at) when it did not finish, else ("", its time).
fn kube_proxy_seconds(row: &super::e2e::E2eRow) -> (&'static str, f64) {
    match row.program_stopped_after {
        Some(stopped) => ("≥ ", stopped),
        None => ("", row.program_seconds),
    }
}

/// A mode's packets per second over iptables' (nf_tables), same backend, protocol and N.
fn pps_ratio(p: &PpsResults, row: &PpsRow) -> Option<f64> {
    let iptables = p.get(PpsMode::Iptables, row.backend, row.proto, row.services)?;
    Some(row.median(|r| r.sink_mpps) / iptables.median(|r| r.sink_mpps))
}

/// lb's XDP forwarding (remote backend) against iptables at 10,000 Services, both protocols.
fn pps_target(p: Option<&PpsResults>) -> Target {
    let ratios: Vec<(L4, f64)> = p
        .map(|p| {
            L4::ALL
                .iter()
                .filter_map(|&proto| {
                    let lb = p.get(PpsMode::Lb, BackendKind::Remote, proto, 10_000)?;
                    Some((proto, pps_ratio(p, lb)?))
                })
                .collect()
        })
        .unwrap_or_default();
    Target {
        target: "At 10,000 Services, lb's XDP forwarding (remote backend) carries ≥ 5× the packets per second of iptables",
        measured: if ratios.is_empty() {
            "not measured".into()
        } else {
            ratios
                .iter()
                .map(|(proto, x)| format!("{proto} {x:.2}×"))
                .collect::<Vec<_>>()
                .join(", ")
        },
        met: (ratios.len() == L4::ALL.len()).then(|| ratios.iter().all(|(_, x)| *x >= 5.0)),
    }
}

/// What lb adds to the direct latency against what iptables adds (p50 and p99), at 10,000.
fn added_latency_target(
    direct: Option<&super::e2e::E2eRow>,
    lb: Option<&super::e2e::E2eRow>,
    iptables: Option<&super::e2e::E2eRow>,
) -> Target {
    let target = "At 10,000 Services, lb adds ≤ 1/5 of the latency iptables adds over a direct \
                  connection to the pod (p50 and p99)";
    let (Some(direct), Some(lb), Some(iptables)) = (direct, lb, iptables) else {
        return Target {
            target,
            measured: "not measured".into(),
            met: None,
        };
    };
    let adds = |value: fn(&super::e2e::E2eRow) -> f64| {
        (value(lb) - value(direct), value(iptables) - value(direct))
    };
    let (p50, p99) = (adds(|r| r.p50_us), adds(|r| r.p99_us));
    Target {
        target,
        measured: format!(
            "p50: lb adds {:.0} µs, iptables {:.0} µs; p99: lb adds {:.0} µs, iptables {:.0} µs",
            p50.0, p50.1, p99.0, p99.1
        ),
        met: Some(
            [p50, p99]
                .iter()
                .all(|(ours, theirs)| *ours <= theirs / 5.0),
        ),
    }
}

/// Every target of the issue against the run's numbers.
pub fn targets(r: &Results) -> Vec<Target> {
    let mut out = Vec::new();
    let levels = &r.plan.packet.levels;
    let packet = r.packet.as_ref();
    let worst_established = packet.and_then(|p| {
        levels
            .iter()
            .filter_map(|&l| ratio(p, PathKind::Established, Method::Repeat, l))
            .reduce(f64::max)
    });
    out.push(Target {
        target: "An established flow costs ≤ 4× the no-op floor",
        measured: worst_established.map_or("not measured".into(), |w| {
            format!(
                "{w:.2}× at worst over 1 to {} Services",
                count(*levels.last().unwrap_or(&0))
            )
        }),
        met: worst_established.map(|w| w <= 4.0),
    });
    let spreads: Vec<(PathKind, f64)> = packet
        .map(|p| {
            MEASURED_PATHS
                .iter()
                .filter_map(|&path| Some((path, spread(p, levels, path)?)))
                .collect()
        })
        .unwrap_or_default();
    let worst = spreads
        .iter()
        .copied()
        .reduce(|a, b| if b.1 > a.1 { b } else { a });
    out.push(Target {
        target: "The per-packet cost is flat (±15%) from 1 to 100,000 services",
        measured: worst.map_or("not measured".into(), |(path, s)| {
            format!(
                "largest deviation from the 1-Service cost: {s:.1}% ({}); {}",
                path.label(),
                spreads
                    .iter()
                    .map(|(p, s)| format!("{} {s:.1}%", p.label()))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }),
        met: worst.map(|(_, s)| s <= 15.0),
    });
    out.push(pps_target(r.pps.as_ref()));
    let e2e = r.e2e.as_ref();
    let at = |mode| e2e.and_then(|e| e.get(mode, 10_000));
    let lb = at(Mode::Lb);
    let iptables: Vec<_> = [Mode::Iptables, Mode::IptablesLegacy]
        .into_iter()
        .filter_map(|m| Some((m, at(m)?)))
        .collect();
    let nft = at(Mode::Nftables);
    let measured = lb.is_some() && nft.is_some() && iptables.len() == 2;
    out.push(Target {
        target: "At 10,000 services, our first-request p99 is ≤ 1/5 of iptables' and ≤ nftables'",
        measured: match (lb, nft) {
            (Some(lb), Some(nft)) if measured => {
                let mut parts = vec![format!("lb p99 {:.0} µs", lb.p99_us)];
                for (mode, row) in iptables.iter().chain([(Mode::Nftables, nft)].iter()) {
                    parts.push(format!(
                        "{} {:.0} µs (lb is {:.2}× of it)",
                        mode.label(),
                        row.p99_us,
                        lb.p99_us / row.p99_us
                    ));
                }
                parts.join("; ")
            }
            _ => "not measured".into(),
        },
        met: match (lb, nft) {
            (Some(lb), Some(nft)) if measured => Some(
                iptables.iter().all(|(_, r)| lb.p99_us <= r.p99_us / 5.0)
                    && lb.p99_us <= nft.p99_us,
            ),
            _ => None,
        },
    });
    out.push(added_latency_target(
        at(Mode::Direct),
        lb,
        at(Mode::Iptables),
    ));
    out.push(Target {
        target: "Programming 10,000 services is ≥ 50× faster than iptables-restore of the same services",
        measured: match lb {
            Some(lb) if measured => {
                let mut parts = vec![format!("lb {:.3} s", lb.program_seconds)];
                for (mode, row) in &iptables {
                    let (at_least, seconds) = kube_proxy_seconds(row);
                    parts.push(format!(
                        "{} {at_least}{seconds:.3} s ({at_least}{:.1}× lb's)",
                        mode.label(),
                        seconds / lb.program_seconds
                    ));
                }
                parts.join("; ")
            }
            _ => "not measured".into(),
        },
        met: match lb {
            Some(lb) if measured => Some(
                iptables
                    .iter()
                    .all(|(_, r)| kube_proxy_seconds(r).1 / lb.program_seconds >= 50.0),
            ),
            _ => None,
        },
    });
    let sources: &[super::control::SourceResult] =
        r.control.as_ref().map_or(&[], |c| &c.sources[..]);
    let measured_all = |text: &dyn Fn(&super::control::SourceResult) -> Option<String>| {
        let parts: Option<Vec<String>> = sources.iter().map(text).collect();
        match parts {
            Some(parts) if !parts.is_empty() => parts.join("; "),
            _ => "not measured".into(),
        }
    };
    let met_all = |ok: &dyn Fn(&super::control::SourceResult) -> Option<bool>| {
        let oks: Option<Vec<bool>> = sources.iter().map(ok).collect();
        oks.filter(|o| !o.is_empty())
            .map(|o| o.into_iter().all(|ok| ok))
    };
    let mb = |s: &super::control::SourceResult| s.peak_rss_mib * 1.048_576;
    out.push(Target {
        target: "A full sync of 10,000 × 10 takes ≤ 2 s and ≤ 150 MB RSS",
        measured: measured_all(&|c| {
            Some(format!(
                "{}: {:.3} s and {:.0} MB peak RSS ({} × {})",
                c.source,
                c.full_sync_seconds,
                mb(c),
                count(c.services),
                c.endpoints
            ))
        }),
        met: met_all(&|c| Some(c.full_sync_seconds <= 2.0 && mb(c) <= 150.0)),
    });
    out.push(Target {
        target: "One endpoint change reaches the map in p99 ≤ 10 ms",
        measured: measured_all(&|c| {
            Some(format!(
                "{}: p50 {:.1} ms, p99 {:.1} ms over {} changes",
                c.source,
                c.change_quantile(0.5)?,
                c.change_quantile(0.99)?,
                c.change_ms.len(),
            ))
        }),
        met: met_all(&|c| Some(c.change_quantile(0.99)? <= 10.0)),
    });
    let churned: Vec<(&str, &super::control::ChurnResult)> = (sources.iter())
        .filter_map(|s| Some((s.source.as_str(), s.churn.as_ref()?)))
        .collect();
    out.push(Target {
        target: "After 100,000 EndpointSlice changes through the API server the agent's RSS is \
                 within 5% of what it was after the first sync, and the maps hold exactly what \
                 the last state needs",
        measured: if churned.is_empty() {
            "not measured".into()
        } else {
            (churned.iter())
                .map(|(source, c)| {
                    format!(
                        "{source}: {} changes; RSS {:.1} MiB after the first sync, {:.1} MiB \
                         after ({:+.1}%); maps exactly the last state {:.1} s after the last \
                         change",
                        count(c.changes),
                        c.rss_after_sync_mib,
                        c.rss_after_mib,
                        churn_growth(c),
                        c.settle_seconds
                    ) + if c.changes < 100_000 {
                        " (fewer changes than the target's: not judged)"
                    } else {
                        ""
                    }
                })
                .collect::<Vec<_>>()
                .join("; ")
        },
        // Judged on the full run's 100,000 changes only (a quick run makes fewer).
        met: (!churned.is_empty() && churned.iter().all(|(_, c)| c.changes >= 100_000))
            .then(|| churned.iter().all(|(_, c)| churn_growth(c) <= 5.0)),
    });
    out
}

/// How much the agent's RSS grew over the churn, percent.
fn churn_growth(c: &super::control::ChurnResult) -> f64 {
    (c.rss_after_mib / c.rss_after_sync_mib - 1.0) * 100.0
}

/// Writes BENCHMARKS.md into `dir`, the charts and results.json into `dir/benchmarks/`;
/// returns the Markdown file's path.
pub fn write(r: &Results, dir: &Path) -> Result<PathBuf> {
    let assets = dir.join(ASSETS);
    std::fs::create_dir_all(&assets).with_context(|| format!("mkdir {}", assets.display()))?;
    let mut charts = Vec::new();
    if let Some(p) = &r.packet {
        charts.push(("per-packet.svg", packet_chart(r, p)));
    }
    if let Some(p) = &r.pps {
        charts.push(("pps.svg", pps_chart(p)));
    }
    if let Some(e) = &r.e2e {
        charts.push((
            "e2e-latency.svg",
            e2e_chart(r, e, &Mode::ALL, "first-request p99", "µs", |row| {
                row.p99_us
            }),
        ));
        charts.push((
            "programming.svg",
            e2e_chart(
                r,
                e,
                &Mode::SERVICES,
                "time to program N Services (a stopped command: its time when stopped)",
                "seconds",
                |row| kube_proxy_seconds(row).1,
            ),
        ));
    }
    for (name, chart) in &charts {
        std::fs::write(assets.join(name), chart.render())?;
    }
    std::fs::write(
        assets.join("results.json"),
        serde_json::to_string_pretty(r)?,
    )?;
    let path = dir.join("BENCHMARKS.md");
    let mut md = markdown(r);
    // The hand-written notes below the generated part are kept.
    match std::fs::read_to_string(&path) {
        Ok(old) => md.push_str(hand_written(&old).unwrap_or_default()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    }
    std::fs::write(&path, md)?;
    Ok(path)
}

/// The line after which BENCHMARKS.md is written by hand: a run replaces what is above it
/// and keeps the rest.
pub const HAND_WRITTEN: &str = "<!-- Written by hand from here on: the benchmark run keeps it. -->";

/// The hand-written part of a BENCHMARKS.md (from [`HAND_WRITTEN`] on), if it has one.
pub fn hand_written(md: &str) -> Option<&str> {
    md.find(HAND_WRITTEN).map(|at| &md[at..])
}

fn packet_chart(r: &Results, p: &PacketResults) -> BarChart {
    let levels = &r.plan.packet.levels;
    let paths = [
        PathKind::FloorXdp,
        PathKind::NotFrontend,
        PathKind::NewFlow,
        PathKind::Established,
        PathKind::Reply,
    ];
    BarChart {
        title: "Per-packet cost (BPF_PROG_TEST_RUN, median)".into(),
        unit: "ns per packet".into(),
        groups: levels.iter().map(|l| services(*l)).collect(),
        series: paths
            .iter()
            .map(|&path| {
                let name = if path == PathKind::NewFlow {
                    format!("{} [repeat=1]", path.label())
                } else {
                    path.label().to_owned()
                };
                let values = levels
                    .iter()
                    .map(|&l| p.get(path, main_method(path), l).map(|m| m.ns))
                    .collect();
                (name, values)
            })
            .collect(),
        log: true,
    }
}

/// The numbers of Services of the pps part (the plan's, absent in older runs: the rows').
fn pps_levels(p: &PpsResults) -> Vec<usize> {
    let mut levels: Vec<usize> = p.rows.iter().map(|r| r.services).collect();
    levels.sort_unstable();
    levels.dedup();
    levels
}

fn pps_chart(p: &PpsResults) -> BarChart {
    let levels = pps_levels(p);
    BarChart {
        title: "Packets per second at the sink, TCP, remote backend (median of the runs)".into(),
        unit: "Mpps".into(),
        groups: levels.iter().map(|l| services(*l)).collect(),
        series: PpsMode::ALL
            .iter()
            .map(|&mode| {
                let values = levels
                    .iter()
                    .map(|&l| {
                        p.get(mode, BackendKind::Remote, L4::Tcp, l)
                            .map(|r| r.median(|r| r.sink_mpps))
                    })
                    .collect();
                (mode.label(BackendKind::Remote).to_owned(), values)
            })
            .collect(),
        log: false,
    }
}

fn pps_section(md: &mut String, r: &Results, p: &PpsResults) {
    let _ = writeln!(md, "## Packets per second\n");
    let runs = r.plan.pps.as_ref().map_or(0, |plan| plan.runs);
    let how = r.plan.pps.as_ref().map_or(String::new(), |plan| {
        format!(
            "{} flows (consecutive source ports, sent in turn), 60-byte frames, {} frames \
             circulating; each window {} s after {} s of warm-up (every flow's first packet \
             through).",
            count(plan.flows as usize),
            plan.seeds,
            plan.seconds,
            plan.warmup
        )
    });
    let _ = writeln!(
        md,
        "A node in a network namespace: its NIC is a veth whose peer is the wire, a local pod \
         behind another veth; node B (the remote pods' node) is a neighbour on the wire. The \
         generator is ours (`lb-ebpf/src/pktgen.rs`, an XDP program on the peers of the \
         node's interfaces): each frame that arrives from the node is counted, rewritten into \
         the next client frame and redirected back into the node's NIC, so a fixed number of \
         frames circulates and every frame the node receives arrives in its driver's NAPI poll \
         as from a NIC. The sink is the same program: it counts a frame only if it is IPv4, \
         of the protocol, to the backend's address and port, and the source of what arrived is \
         checked (the client's, or the node's address where the mode masquerades). {how} \
         The node's receive path runs in one threaded-NAPI kernel thread pinned to CPU {node} \
         (the generator's on CPU {generator}); \"ns/packet\" is that thread's CPU time over the \
         window divided by the frames counted. BPF_PROG_TEST_RUN with \
         BPF_F_TEST_XDP_LIVE_FRAMES (what xdp-trafficgen does) fails with EPERM on this \
         machine, hence the circulating frames. Each mode has its own bed at each N; the \
         modes are measured in turns, {runs} times. Every cell is the median of the runs, \
         with ± the largest deviation of a run from it; \"vs iptables\" is the mode's Mpps \
         over iptables' (nf_tables backend) for the same backend, protocol and N.\n",
        node = p.node_cpu,
        generator = p.generator_cpu,
    );
    let _ = writeln!(
        md,
        "| Services | Backend | Mode | TCP Mpps | ns/packet | vs iptables | UDP Mpps | ns/packet | vs iptables | node busy |"
    );
    let _ = writeln!(
        md,
        "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for level in pps_levels(p) {
        for kind in BackendKind::ALL {
            for mode in PpsMode::ALL {
                let rows: Vec<Option<&PpsRow>> = L4::ALL
                    .iter()
                    .map(|&l| p.get(mode, kind, l, level))
                    .collect();
                if rows.iter().all(Option::is_none) {
                    continue;
                }
                let mut cells = Vec::new();
                let mut busy = Vec::new();
                for row in &rows {
                    match row {
                        Some(row) => {
                            cells.push(format!(
                                "{:.3} ±{:.0}%",
                                row.median(|r| r.sink_mpps),
                                row.spread(|r| r.sink_mpps)
                            ));
                            cells.push(format!(
                                "{:.0} ±{:.0}%",
                                row.median(|r| r.node_ns),
                                row.spread(|r| r.node_ns)
                            ));
                            cells
                                .push(pps_ratio(p, row).map_or("–".into(), |x| format!("{x:.2}×")));
                            busy.push(format!("{:.0}%", 100.0 * row.median(|r| r.node_busy)));
                        }
                        None => cells.extend(["–".to_owned(), "–".to_owned(), "–".to_owned()]),
                    }
                }
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} |",
                    count(level),
                    kind.label(),
                    mode.label(kind),
                    cells.join(" | "),
                    busy.join(", ")
                );
            }
        }
    }
    for f in &p.failures {
        let _ = writeln!(
            md,
            "\n**{} ({}) at {} Services failed:** `{}`",
            f.mode.label(f.backend),
            f.backend.label(),
            count(f.services),
            f.error.lines().next().unwrap_or_default()
        );
    }
    let _ = writeln!(
        md,
        "\n\"node busy\" is the node thread's share of its CPU (TCP, UDP): near 100% the node \
         is the bottleneck and the rate is its capacity. What the sink checked:\n"
    );
    let mut checked: Vec<&str> = p.rows.iter().map(|r| r.checked.as_str()).collect();
    checked.sort_unstable();
    checked.dedup();
    for c in checked {
        let _ = writeln!(md, "- {c}");
    }
    let lost: u64 = p
        .rows
        .iter()
        .flat_map(|r| &r.runs)
        .map(|run| run.other)
        .sum();
    let _ = writeln!(
        md,
        "\nOther frames at the sink over all windows (not counted as forwarded): {lost}.\n"
    );
    let _ = writeln!(md, "![packets per second]({ASSETS}/pps.svg)\n");
}

fn e2e_chart(
    r: &Results,
    e: &E2eResults,
    modes: &[Mode],
    what: &str,
    unit: &str,
    value: impl Fn(&super::e2e::E2eRow) -> f64,
) -> BarChart {
    let levels = &r.plan.e2e.levels;
    BarChart {
        title: format!("End to end: {what}"),
        unit: unit.into(),
        groups: levels.iter().map(|l| services(*l)).collect(),
        series: modes
            .iter()
            .map(|&mode| {
                let values = levels.iter().map(|&l| e.get(mode, l).map(&value)).collect();
                (mode.label().to_owned(), values)
            })
            .collect(),
        log: true,
    }
}

/// The whole BENCHMARKS.md.
pub fn markdown(r: &Results) -> String {
    let mut md = String::new();
    let m = &r.machine;
    let _ = writeln!(md, "# Benchmarks\n");
    let _ = writeln!(
        md,
        "Written by `{}`{} — every number, table and chart here comes from that run; nothing is \
         typed by hand, except the notes below the generated part, which a run keeps. Run it \
         again to replace them.{}\n",
        r.command,
        r.commit
            .as_ref()
            .map(|c| format!(" at commit `{c}`"))
            .unwrap_or_default(),
        if r.plan.quick {
            " This is a `--quick` run: the same measurements, smaller."
        } else {
            ""
        }
    );
    let _ = writeln!(md, "## Machine\n");
    let _ = writeln!(md, "| | |\n| --- | --- |");
    let _ = writeln!(md, "| CPU | {} |", m.cpu_model);
    let _ = writeln!(md, "| Cores | {} |", m.cores);
    let _ = writeln!(md, "| Kernel | {} |", m.kernel);
    let _ = writeln!(md, "| Memory | {:.1} GiB |", m.memory_gib);
    let _ = writeln!(md, "| iptables | {} |", m.iptables);
    let _ = writeln!(md, "| nft | {} |", m.nft);
    let _ = writeln!(
        md,
        "| Load average (1, 5, 15 min) at start | {} |",
        m.loadavg_start
    );
    let _ = writeln!(md, "| Load average at end | {} |", m.loadavg_end);
    let _ = writeln!(
        md,
        "| CPU busy during the run | {:.0}% of all cores, of which this benchmark and its children {:.0}%, \
         other work on the machine {:.0}% |\n",
        m.busy_percent,
        m.own_percent,
        (m.busy_percent - m.own_percent).max(0.0)
    );

    let _ = writeln!(md, "## Targets\n");
    let _ = writeln!(md, "| Target | Measured | |\n| --- | --- | --- |");
    for t in targets(r) {
        let verdict = match t.met {
            Some(true) => "met",
            Some(false) => "**missed**",
            None => "not measured",
        };
        let _ = writeln!(md, "| {} | {} | {verdict} |", t.target, t.measured);
    }
    md.push('\n');

    if let Some(p) = &r.packet {
        packet_section(&mut md, r, p);
    }
    if let Some(p) = &r.pps {
        pps_section(&mut md, r, p);
    }
    if let Some(e) = &r.e2e {
        e2e_section(&mut md, r, e);
    }
    if let Some(c) = &r.control {
        control_section(&mut md, c);
    }
    md
}

fn packet_section(md: &mut String, r: &Results, p: &PacketResults) {
    let plan = &r.plan.packet;
    let levels = &plan.levels;
    let _ = writeln!(md, "## Per-packet cost\n");
    let _ = writeln!(
        md,
        "The real XDP and TC programs run by the kernel through BPF_PROG_TEST_RUN on one packet, \
         with N Services of 10 backends each programmed through `Syncer::apply` (the agent's map \
         writer). Nanoseconds per packet: every path is measured in {rounds} rounds, one after \
         the other, and a cell is the median of the rounds', each the median of {runs} runs of \
         {repeat} repetitions; in parentheses the ratio to the no-op XDP program measured the \
         same way at the same N. The first packet of a new flow cannot be repeated (the second run would find \
         the flow), so it is the median of {singles} single runs (`repeat=1`), each from a new \
         source, and its ratio is to the floor measured with single runs too (a single run \
         includes the kernel's timer overhead; see the second table).\n",
        rounds = plan.rounds,
        runs = plan.runs,
        repeat = count(plan.repeat as usize),
        singles = count(plan.single_runs),
    );
    let header: Vec<String> = levels.iter().map(|l| services(*l)).collect();
    let _ = writeln!(md, "| Path | {} | spread | rounds |", header.join(" | "));
    let _ = writeln!(md, "| --- |{} --- | --- |", " ---: |".repeat(levels.len()));
    for path in PathKind::ALL {
        let method = main_method(path);
        let cells: Vec<String> = levels
            .iter()
            .map(
                |&l| match (p.get(path, method, l), ratio(p, path, method, l)) {
                    (Some(m), Some(x)) if path != PathKind::FloorXdp => {
                        format!("{} ({x:.2}×)", short(m.ns))
                    }
                    (Some(m), _) => short(m.ns),
                    _ => "–".into(),
                },
            )
            .collect();
        let spread = spread(p, levels, path).map_or("–".into(), |s| format!("{s:.1}%"));
        let rounds = levels
            .iter()
            .filter_map(|&l| p.round_spread(path, method, l))
            .reduce(f64::max)
            .map_or("–".into(), |s| format!("±{s:.1}%"));
        let label = if method == Method::Single {
            format!("{} [repeat=1]", path.label())
        } else {
            path.label().to_owned()
        };
        let _ = writeln!(
            md,
            "| {label} | {} | {spread} | {rounds} |",
            cells.join(" | ")
        );
    }
    let _ = writeln!(
        md,
        "\n\"spread\" is the largest deviation from the cost at {}, judged on the medians of the \
         rounds (the flatness target); \"rounds\" is the largest deviation of one round from its \
         cell's median, at any N: the noise of this run. BPF_PROG_TEST_RUN reports \
         whole nanoseconds per repetition, so a few-nanosecond cost is only known to ±1 ns.\n",
        services(levels[0])
    );
    let _ = writeln!(md, "![per-packet cost]({ASSETS}/per-packet.svg)\n");
    let _ = writeln!(
        md,
        "Every path measured with single runs (`repeat=1`, median of {} runs; ratio to the no-op \
         XDP program's single run):\n",
        count(plan.single_runs)
    );
    let _ = writeln!(md, "| Path | {} |", header.join(" | "));
    let _ = writeln!(md, "| --- |{}", " ---: |".repeat(levels.len()));
    for path in PathKind::ALL {
        let cells: Vec<String> = levels
            .iter()
            .map(|&l| match p.get(path, Method::Single, l) {
                Some(m) => format!(
                    "{} ({:.2}×)",
                    short(m.ns),
                    ratio(p, path, Method::Single, l).unwrap_or(f64::NAN)
                ),
                None => "–".into(),
            })
            .collect();
        let _ = writeln!(md, "| {} | {} |", path.label(), cells.join(" | "));
    }
    let _ = writeln!(
        md,
        "\nWhat was checked for every measurement (else the run fails):\n"
    );
    for path in MEASURED_PATHS {
        if let Some(m) = p
            .measurements
            .iter()
            .find(|m| m.path == path && m.method == main_method(path))
        {
            let _ = writeln!(md, "- {}: {}", path.label(), m.checked);
        }
    }
    let _ = writeln!(
        md,
        "\nHow: the established flow and the reply use a measured Service with two frontends \
         (a ClusterIP F1 and a NodePort F2) that are among its own backends, and a client port \
         whose flow to F1 got backend F2 and whose flow to F2 got backend F1; the packet then \
         alternates between the two flows, each repetition a conntrack hit and a real rewrite, \
         and the reply alternates between the two reverse translations. The other N − 1 \
         Services are ClusterIPs with 10 backends each.\n"
    );
    let _ = writeln!(md, "Program sizes (after verification):\n");
    let _ = writeln!(
        md,
        "| Program | xlated instructions | JIT bytes | instructions verified |"
    );
    let _ = writeln!(md, "| --- | ---: | ---: | ---: |");
    for s in &p.programs {
        let _ = writeln!(
            md,
            "| `{}` | {} | {} | {} |",
            s.name, s.xlated_insns, s.jited_bytes, s.verified_insns
        );
    }
    let fills: Vec<String> = p
        .fill_seconds
        .iter()
        .map(|(l, s)| format!("{} {s:.2} s", services(*l)))
        .collect();
    let _ = writeln!(
        md,
        "\nGrowing the maps with `Syncer::apply` (each step adds the difference): {}.\n",
        fills.join(", ")
    );
    profile_section(md, p);
}

/// Where each path's time goes, from its profile (`super::profile`).
fn profile_section(md: &mut String, p: &PacketResults) {
    let _ = writeln!(
        md,
        "### Where the time goes
"
    );
    if let Some(why) = &p.profile_missing {
        let _ = writeln!(md, "No profile: {why}.\n");
        return;
    }
    let _ = writeln!(
        md,
        "`perf {}` of the benchmark's thread while it runs one path over and over; each sample \
         inside BPF_PROG_TEST_RUN is the program's own instructions, or the kernel function it \
         called (with whatever that called; in brackets the functions the samples were taken \
         in), or the test-run loop around it. Nanoseconds: the share of those samples times the \
         path's cost measured above at the same N.\n",
        super::profile::command_line()
    );
    for prof in &p.profiles {
        let b = &prof.breakdown;
        let total = b.in_program() + b.outside;
        let measured = p
            .get(prof.path, main_method(prof.path), prof.services)
            .map(|m| m.ns);
        if total == 0 {
            continue;
        }
        let row = |md: &mut String, what: &str, samples: u64| {
            let share = samples as f64 / total as f64;
            let ns = measured.map_or("–".into(), |ns| format!("{:.0}", share * ns));
            let _ = writeln!(md, "| {what} | {:.0}% | {ns} |", share * 100.0);
        };
        let _ = writeln!(
            md,
            "{} at {} (`{}`, {}; {} samples, {} taken under an interrupt left out):\n",
            prof.path.label(),
            services(prof.services),
            prof.program,
            prof.how,
            count(total as usize),
            b.interrupted
        );
        let _ = writeln!(md, "| Where | samples | ns |\n| --- | ---: | ---: |");
        row(md, "the program's own instructions", b.program);
        for c in &b.callees {
            let leaves: Vec<String> = c
                .leaves
                .iter()
                .take(3)
                .map(|(name, n)| format!("{name} {n}"))
                .collect();
            row(
                md,
                &format!("`{}` [{}]", c.name, leaves.join(", ")),
                c.samples,
            );
        }
        row(md, "the test-run loop", b.outside);
        md.push('\n');
    }
}

fn e2e_section(md: &mut String, r: &Results, e: &E2eResults) {
    let plan = &r.plan.e2e;
    let _ = writeln!(md, "## End to end\n");
    let _ = writeln!(
        md,
        "Network namespaces: a client, a node and {pods} pods (veth pairs; the node routes). \
         The measured Service is the last one kube-proxy matches (the last KUBE-SERVICES rule); \
         its {pods} endpoints are the pods, each answering HTTP/1.1 from a pool of threads. The \
         other Services have 10 endpoints each at addresses that receive no traffic. The \
         client is outside the cluster CIDR, so kube-proxy's rules masquerade it, as kube-proxy \
         does. Load generator: ours (Rust, `tests/bench/src/load.rs`), {threads} client threads \
         for the rates, {secs} s per mode in {rounds} rounds; latency: {samples} first requests \
         one after the other (connect, `GET /`, whole response, close), after {warmup} untimed \
         ones. Every response is checked. Each mode has its own copy of the topology at each N, \
         programmed alone (timed), and then the modes are measured in turns — latency samples \
         alternate between them, each rate round gives each mode its slice — so that they share \
         the machine's background load.\n",
        pods = plan.pods,
        threads = plan.threads,
        secs = plan.seconds,
        rounds = plan.rounds,
        samples = count(plan.latency_samples),
        warmup = plan.warmup,
    );
    let _ = writeln!(md, "Programming time means:\n");
    for mode in Mode::ALL {
        let _ = writeln!(md, "- {}: {}.", mode.label(), mode.programming());
    }
    md.push('\n');
    let _ = writeln!(
        md,
        "| Services | Mode | Programming | First request p50 | p99 | p50 added | p99 added | p99 vs lb | Connections/s | vs lb | Requests/s (kept alive) | vs lb | Errors |"
    );
    let _ = writeln!(
        md,
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for &n in &plan.levels {
        let lb = e.get(Mode::Lb, n);
        let direct = e.get(Mode::Direct, n);
        for mode in Mode::ALL {
            let Some(row) = e.get(mode, n) else {
                continue;
            };
            let vs = |ours: Option<f64>, theirs: f64| {
                ours.map_or("–".into(), |o| format!("{:.2}×", theirs / o))
            };
            let added = |value: fn(&super::e2e::E2eRow) -> f64| match direct {
                Some(d) if mode != Mode::Direct => format!("{:+.0} µs", value(row) - value(d)),
                _ => "–".into(),
            };
            let programming = match (row.agent_seconds, row.program_stopped_after) {
                _ if mode == Mode::Direct => "–".into(),
                (Some(agent), _) => format!("{:.3} s (agent: {:.3} s)", row.program_seconds, agent),
                (None, Some(stopped)) => format!(
                    "> {stopped:.0} s: stopped unfinished (the same rules without --noflush: {:.3} s)",
                    row.program_seconds
                ),
                (None, None) => format!("{:.3} s", row.program_seconds),
            };
            let _ = writeln!(
                md,
                "| {} | {} | {programming} | {:.0} µs | {:.0} µs | {} | {} | {} | {:.0} | {} | {:.0} | {} | {} |",
                count(n),
                mode.label(),
                row.p50_us,
                row.p99_us,
                added(|r| r.p50_us),
                added(|r| r.p99_us),
                vs(lb.map(|l| l.p99_us), row.p99_us),
                row.connections.per_sec(),
                vs(
                    lb.map(|l| l.connections.per_sec()),
                    row.connections.per_sec()
                ),
                row.requests.per_sec(),
                vs(lb.map(|l| l.requests.per_sec()), row.requests.per_sec()),
                row.connections.errors + row.requests.errors,
            );
        }
    }
    for f in &e.failures {
        let _ = writeln!(
            md,
            "\n**{} at {} Services failed:** `{}`",
            f.mode.label(),
            count(f.services),
            f.error.lines().next().unwrap_or_default()
        );
    }
    let _ = writeln!(
        md,
        "\n\"added\" is the mode's latency minus the direct one's at the same N (the direct \
         client connects to the measured Service's first pod, whose address it knows; the \
         rates of that row all go to that one pod). \"vs lb\" is the mode's value divided by \
         lb's at the same N, from the same run. On a \
         shared machine the p99 of a sub-millisecond request mostly measures scheduling delays \
         (see how busy the machine was, under Machine); the p50 shows the path itself.\n"
    );
    let _ = writeln!(md, "![first-request p99]({ASSETS}/e2e-latency.svg)\n");
    let _ = writeln!(md, "![programming time]({ASSETS}/programming.svg)\n");
}

fn control_section(md: &mut String, c: &super::control::ControlResults) {
    let _ = writeln!(md, "## Control plane\n");
    let _ = writeln!(
        md,
        "| Source | Services × endpoints | Full sync | of which translate + map writes | Peak RSS (VmHWM) | after the changes | Change → map p50 | p99 | max | changes | of a change: translate + map writes (median) |"
    );
    let _ = writeln!(
        md,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for s in &c.sources {
        let _ = writeln!(
            md,
            "| {} | {} × {} | {:.3} s | {} | {:.1} MiB | {:.1} MiB | {:.1} ms | {:.1} ms | {:.1} ms | {} | {} |",
            s.source,
            count(s.services),
            s.endpoints,
            s.full_sync_seconds,
            s.agent_sync_seconds
                .map_or("–".into(), |a| format!("{a:.3} s")),
            s.peak_rss_mib,
            s.peak_rss_after_changes_mib,
            s.change_quantile(0.5).unwrap_or(f64::NAN),
            s.change_quantile(0.99).unwrap_or(f64::NAN),
            s.change_quantile(1.0).unwrap_or(f64::NAN),
            s.change_ms.len(),
            super::stats::median(&s.change_agent_ms).map_or("–".into(), |m| format!("{m:.1} ms"))
        );
    }
    for (source, error) in &c.failures {
        let _ = writeln!(
            md,
            "\n**{source} failed:** `{}`",
            error.lines().next().unwrap_or_default()
        );
    }
    let _ = writeln!(
        md,
        "\nFull sync: from spawning `lb agent` (on a folder already holding every manifest, or \
         against a fake API server already holding every object) to its `synced` log line for \
         every frontend: process start, loading and verifying the programs, attaching, reading \
         (or listing and decoding) and translating every object, and every map write."
    );
    for s in &c.sources {
        if let Some(churn) = &s.churn {
            let _ = writeln!(
                md,
                "\nChurn through the {}: {} EndpointSlice changes over the other {} Services, \
                 each replacing, dropping or adding one endpoint (at a new address each time), \
                 made as fast as the source took them, in {:.1} s; the agent runs with \
                 `--drain-secs {}`. The maps held exactly the last state {:.1} s after the last \
                 change (every frontend's table naming its endpoints). RSS (VmRSS) after the \
                 first full sync {:.1} MiB, after the churn {:.1} MiB ({:+.1}%).\n",
                s.source,
                count(churn.changes),
                count(s.services - 1),
                churn.seconds,
                super::control::CHURN_DRAIN_SECS,
                churn.settle_seconds,
                churn.rss_after_sync_mib,
                churn.rss_after_mib,
                churn_growth(churn)
            );
            let _ = writeln!(
                md,
                "| In the maps after the churn | found | the last state needs |"
            );
            let _ = writeln!(md, "| --- | ---: | ---: |");
            for (what, found, needed) in &churn.counted {
                let _ = writeln!(md, "| {what} | {} | {} |", count(*found), count(*needed));
            }
            md.push('\n');
        }
    }
    for s in &c.sources {
        let _ = writeln!(
            md,
            "{}: a change gives the measured Service alternately one endpoint fewer and all of \
             them again, from a window moving along a pool of two endpoints more (so no change \
             returns to the set of the change before), {} ms after the sync of the change before; \
             its latency is timed {}.",
            s.source,
            super::control::CHANGE_INTERVAL.as_millis(),
            s.change_timed
        );
    }
    md.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hand_written_part_is_what_follows_its_marker() {
        let md = format!("# Benchmarks\n\n| a | b |\n\n{HAND_WRITTEN}\n\n## Notes\n\ntext\n");
        assert_eq!(
            hand_written(&md),
            Some(format!("{HAND_WRITTEN}\n\n## Notes\n\ntext\n").as_str())
        );
        assert_eq!(hand_written("# Benchmarks\n\n| a | b |\n"), None);
    }
}
