//! The agent restarted and upgraded under load: long-lived connections and a steady stream of
//! new connections flow through a ClusterIP while the real `lb` agent is killed with SIGKILL
//! and started again, or replaced by a newer version on the same pins. No request fails, no
//! connection is reset, every long-lived connection keeps its backend. Needs root and the
//! `lb` binary (`LB_BIN`); the upgrade also needs the older `lb` that `cargo xtask test`
//! builds from the git history.

use lb_userspace::datapath::Pins;
use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use aya::programs::links::{FdLink, PinnedLink};

use lb_common::{
    Frontend4, PROTO_TCP, SERVICE_F_TABLE_B, flow_hash, legacy, maglev, map_names, prefilter,
};
use lb_testbed::{
    Agent, CLIENT_IP, Churn, ChurnCounts, ClusterIpService, Condition, ConnPool, ConnRecord,
    Folder, NODE_IF, Pod, ServiceInfo, Topology,
    agent::{metric, ops},
    client::http_get,
    conns::{FailureKind, failures, first_backends},
};
use lb_userspace::{
    datapath::{
        BpfMaps,
        maps::{DatapathMaps as _, MapContents},
    },
    plan::desired::FrontendKey,
};

/// Long-lived connections opened before the agent goes.
const LONG_LIVED: usize = 100;
/// Long-lived connections opened after it is back.
const LONG_LIVED_AFTER: usize = 20;

/// Long-lived connections kept busy and a stream of new connections, to one frontend.
struct Load<'a> {
    pool: ConnPool<'a>,
    churn: Churn,
}

impl<'a> Load<'a> {
    /// Opens [`LONG_LIVED`] connections (source ports from `first_port`), keeps them busy,
    /// and starts the stream of new connections.
    fn start(topology: &'a Topology, target: SocketAddrV4, first_port: u16) -> Self {
        let mut pool = ConnPool::new(&topology.client, CLIENT_IP, target, first_port);
        pool.open(LONG_LIVED, "before").unwrap();
        pool.start_traffic();
        let churn = Churn::start(&topology.client, target).unwrap();
        let load = Load { pool, churn };
        load.settle();
        load
    }

    /// Waits until every long-lived connection has sent a few requests and a few new
    /// connections went through.
    fn settle(&self) {
        self.pool.wait_rounds(3).unwrap();
        self.churn
            .wait_requests(20, Duration::from_secs(30))
            .unwrap();
    }

    /// Stops the traffic, prints the counts under `title`, and panics unless nothing failed
    /// and every long-lived connection kept its backend.
    fn finish(mut self, title: &str, phases: &[(&str, ChurnCounts)]) -> Vec<ConnRecord> {
        self.pool.stop_traffic();
        let churn = self.churn.stop().unwrap();
        let records = self.pool.records();
        let answered: usize = records.iter().map(ConnRecord::answered).sum();
        let failed = failures(&records);
        let moved = records.iter().filter(|r| !r.kept_its_backend()).count();
        let resets = |kinds: &std::collections::BTreeMap<FailureKind, usize>| {
            kinds.get(&FailureKind::Reset).copied().unwrap_or(0)
        };
        eprintln!("== {title}");
        eprintln!(
            "long-lived connections: {} ({} opened after), {answered} requests answered, {} \
             failed ({} resets), {moved} changed backend; first backends {:?}",
            records.len(),
            records.iter().filter(|r| r.opened != "before").count(),
            failed.values().sum::<usize>(),
            resets(&failed),
            first_backends(&records),
        );
        eprintln!(
            "new connections (connect, one request, close): {} answered, {} failed ({} \
             resets); by backend {:?}",
            churn.ok,
            churn.failures(),
            resets(&churn.failed),
            churn.served
        );
        for (phase, counts) in phases {
            eprintln!(
                "  {phase}: {} answered, {} failed",
                counts.ok,
                counts.failures()
            );
        }
        let broken: Vec<&ConnRecord> = records.iter().filter(|r| r.failure.is_some()).collect();
        assert!(
            broken.is_empty(),
            "{title}: {} long-lived connections failed ({failed:?}), e.g. {:#?}",
            broken.len(),
            &broken[..broken.len().min(3)]
        );
        assert_eq!(
            churn.failures(),
            0,
            "{title}: new connections failed: {churn:?}"
        );
        assert_eq!(moved, 0, "{title}: connections changed backend");
        records
    }
}

/// The control-plane maps pinned in `pin_dir`, in a fixed order: equal before and after
/// means that ids, entries and even the Maglev tables (by kernel map id) are the same.
fn snapshot(pin_dir: &Path) -> MapContents {
    let mut c = BpfMaps::open_pinned(&Pins::new(pin_dir))
        .unwrap()
        .read_all()
        .unwrap();
    c.services.sort_by_key(|(k, _)| *k);
    c.backends.sort_by_key(|(id, _)| *id);
    c.rev_nat.sort_by_key(|(id, _)| *id);
    c.tables.sort_by_key(|(id, _)| *id);
    c.source_ranges.sort();
    c
}

/// Polls `GET path` on the agent's operations endpoint until it answers `200`.
fn wait_ops(topology: &Topology, agent: &Agent, path: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        agent.ensure_running().unwrap();
        if let Ok((200, body)) = ops(&topology.node, path) {
            return body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{path} never answered 200; agent log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn pods<'t>(topology: &'t Topology, indices: &[usize]) -> Vec<(&'t Pod, Condition)> {
    indices
        .iter()
        .map(|&i| (&topology.pods[i], Condition::Ready))
        .collect()
}

/// Stops `agent` (SIGTERM, as a rolling update does), runs `meanwhile` while no agent runs
/// and lets `load` settle, then starts the `lb` of `LB_BIN` on the same pins and waits until
/// it is ready and `ready` returns. The counts of the new connections at the stop, at the
/// start and when the agent was ready.
fn replace_agent(
    agent: &mut Agent,
    topology: &Topology,
    load: &Load,
    meanwhile: impl FnOnce(),
    ready: impl FnOnce(&Agent),
) -> [ChurnCounts; 3] {
    let at_stop = load.churn.counts();
    agent.stop().unwrap();
    meanwhile();
    load.settle();
    let at_start = load.churn.counts();
    agent
        .restart(&topology.node, &lb_testbed::lb_bin(), &[])
        .unwrap();
    wait_ops(topology, agent, "/readyz");
    ready(agent);
    [at_stop, at_start, load.churn.counts()]
}

/// Waits until `svc` selects exactly the pods `indices`.
fn wait_selecting(agent: &Agent, topology: &Topology, svc: &ClusterIpService, indices: &[usize]) {
    let want: std::collections::BTreeSet<String> = indices
        .iter()
        .map(|&i| svc.backend(&topology.pods[i]))
        .collect();
    let frontend = svc.frontend();
    agent
        .wait_until(&format!("{frontend} selecting {want:?}"), |s| {
            ServiceInfo::find(s, &frontend).is_some_and(|s| s.selectable() == want)
        })
        .unwrap_or_else(|e| panic!("{e:#}"));
}

/// `kill -9` of the agent while long-lived and new connections flow: the datapath keeps
/// serving without an agent; the agent started again on the same pins adopts the maps
/// (the same service and backend ids, the same Maglev tables, both tables of a frontend
/// whose endpoints changed and whose entry selects its second one) and writes nothing, keeps
/// a frontend whose Service was deleted meanwhile for the orphan grace period, then removes
/// it.
#[test]
fn kill_9_under_load_fails_no_request_and_the_restarted_agent_rewrites_nothing() {
    const GRACE_SECS: u64 = 4;
    let topology = Topology::new(3).expect("topology");
    let folder = Folder::new().unwrap();
    let svc = ClusterIpService::http("restart", [10, 96, 0, 30], 8080);
    let gone = ClusterIpService::http("deleted-while-down", [10, 96, 0, 31], 8080);
    svc.write(&folder, &pods(&topology, &[0, 1])).unwrap();
    gone.write(&folder, &pods(&topology, &[0])).unwrap();
    let mut agent = Agent::start(&topology.node, folder.path(), NODE_IF).expect("agent");
    wait_selecting(&agent, &topology, &svc, &[0, 1]);
    wait_selecting(&agent, &topology, &gone, &[0]);
    // An endpoint change: the new table goes under the second key and the entry selects it.
    svc.write(&folder, &pods(&topology, &[0, 1, 2])).unwrap();
    wait_selecting(&agent, &topology, &svc, &[0, 1, 2]);
    let target = SocketAddrV4::new(svc.cluster_ip, svc.port);

    let load = Load::start(&topology, target, 22000);
    let before = snapshot(agent.pin_path());
    let frontend = Frontend4::new(svc.cluster_ip.octets(), svc.port, PROTO_TCP);
    let (_, service) = before
        .services
        .iter()
        .find(|(k, _)| *k == FrontendKey::V4(frontend))
        .unwrap();
    assert_ne!(service.flags & SERVICE_F_TABLE_B, 0, "{before:#?}");
    let keys = [service.id, service.id | maglev::KEY_TABLE_B];
    let tables: Vec<_> = before
        .tables
        .iter()
        .filter(|(key, _)| keys.contains(key))
        .map(|(_, t)| t.backends.len())
        .collect();
    assert_eq!(tables, [2, 3], "both tables of {frontend:?}: {before:#?}");
    let at_kill = load.churn.counts();
    agent.kill().unwrap();
    // Without an agent, `lb services` still names each frontend (from the pinned names).
    let named: Vec<(String, Option<String>, Option<String>)> = agent
        .services()
        .unwrap()
        .into_iter()
        .map(|s| (s.frontend, s.service, s.kind))
        .collect();
    let cluster_ip = || Some("ClusterIp".to_owned());
    assert_eq!(
        named,
        [
            (
                svc.frontend(),
                Some("default/restart:http".into()),
                cluster_ip()
            ),
            (
                gone.frontend(),
                Some("default/deleted-while-down:http".into()),
                cluster_ip()
            ),
        ]
    );
    // No agent: the datapath serves on its own. Meanwhile a Service is deleted.
    folder.remove(&format!("{}.yaml", gone.name)).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    load.settle();
    let at_restart = load.churn.counts();
    agent
        .restart(
            &topology.node,
            &lb_testbed::lb_bin(),
            &["--orphan-grace-secs", &GRACE_SECS.to_string()],
        )
        .unwrap();
    wait_ops(&topology, &agent, "/readyz");
    let at_ready = load.churn.counts();

    // The first view is programmed: nothing was written, everything adopted as it was, and
    // the deleted Service's frontend is an orphan that still serves.
    let metrics = wait_ops(&topology, &agent, "/metrics");
    assert_eq!(
        metric(&metrics, "lb_map_writes_total"),
        Some(0.0),
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "lb_orphan_frontends"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        snapshot(agent.pin_path()),
        before,
        "the maps after the restart"
    );
    let (pod, _) = http_get(&topology.client, gone.cluster_ip, gone.port).unwrap();
    assert_eq!(
        pod, topology.pods[0].name,
        "the orphan serves during its grace"
    );
    // The orphan keeps its name: the restarted agent took the names over as they were.
    let services = agent.services().unwrap();
    let orphan = ServiceInfo::find(&services, &gone.frontend()).unwrap();
    assert_eq!(
        orphan.service.as_deref(),
        Some("default/deleted-while-down:http")
    );

    // New long-lived connections, and traffic for a while.
    let mut load = load;
    load.pool.open(LONG_LIVED_AFTER, "after").unwrap();
    load.settle();
    // After the grace period the orphan goes, and only it.
    agent
        .wait_until_within(
            Duration::from_secs(GRACE_SECS + 10),
            "the orphan to be removed",
            |s| ServiceInfo::find(s, &gone.frontend()).is_none(),
        )
        .unwrap();
    // (The metrics follow the map writes.)
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while metric(
        &wait_ops(&topology, &agent, "/metrics"),
        "lb_orphan_frontends",
    ) != Some(0.0)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "lb_orphan_frontends stays above 0"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        agent
            .services()
            .unwrap()
            .iter()
            .map(|s| s.frontend.clone())
            .collect::<Vec<_>>(),
        [svc.frontend()]
    );
    load.settle();
    let end = load.churn.counts();
    let records = load.finish(
        "kill -9 of the agent under load, 2 s without it, restart on the same pins",
        &[
            (
                "new connections while no agent ran",
                at_restart.since(&at_kill),
            ),
            (
                "until the restarted agent was ready",
                at_ready.since(&at_restart),
            ),
            ("after it was ready", end.since(&at_ready)),
        ],
    );
    assert!(
        at_restart.since(&at_kill).ok > 0,
        "no new connection went through while no agent ran"
    );
    let spread = first_backends(&records);
    assert_eq!(spread.len(), 3, "all three pods serve: {spread:?}");
}

/// An address as the maps hold it.
fn frontend_addr(ip: std::net::Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// The (link id, program id) of the link pinned at `path`.
fn link_ids(path: &Path) -> Result<(u32, u32), String> {
    let link = PinnedLink::from_pin(path).map_err(|e| format!("open: {e}"))?;
    let info = FdLink::from(link)
        .info()
        .map_err(|e| format!("info: {e}"))?;
    Ok((info.id(), info.program_id()))
}

/// What one link was seen to hold, each state once in order.
type Seen = Vec<Result<(u32, u32), String>>;

/// What the pinned links held, polled every millisecond on a thread: per link, each
/// distinct (link id, program id) in the order seen, or why it could not be read.
struct LinkWatch {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<Seen>>>,
}

impl LinkWatch {
    fn start(paths: Vec<PathBuf>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut seen: Vec<Seen> = vec![Vec::new(); paths.len()];
                while !stop.load(Ordering::Relaxed) {
                    for (path, seen) in paths.iter().zip(&mut seen) {
                        let now = link_ids(path);
                        if seen.last() != Some(&now) {
                            seen.push(now);
                        }
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                seen
            })
        };
        LinkWatch {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> Vec<Seen> {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread.take().unwrap();
        thread.join().unwrap()
    }
}

impl Drop for LinkWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The upgrade of a DaemonSet: the older release's agent (built from the git history) runs
/// with long-lived and new connections flowing; it is stopped, the Service gains two
/// backends meanwhile, and the current agent starts on the same pins. Its programs replace
/// the old ones through the same pinned links (the links never change, their programs change
/// once, and a watcher polling every millisecond never finds a link without a program); the
/// conntrack map, whose layout changed (LB_CT4_V1 -> LB_CT4_V2), is converted, so the
/// long-lived connections that Maglev would now send to the new backends keep theirs; the
/// Maglev map (LB_MAGLEV_V1 -> V2) is converted too.
#[test]
fn an_upgrade_from_the_older_release_under_load_replaces_the_programs_and_keeps_conntrack() {
    let old = lb_testbed::agent::old_lb_bin();
    let topology = Topology::new(4).expect("topology");
    let folder = Folder::new().unwrap();
    let svc = ClusterIpService::http("upgrade", [10, 96, 0, 40], 8080);
    svc.write(&folder, &pods(&topology, &[0, 1])).unwrap();
    let mut agent =
        Agent::start_with(&old, &topology.node, folder.path(), NODE_IF).expect("old agent");
    wait_selecting(&agent, &topology, &svc, &[0, 1]);
    let target = SocketAddrV4::new(svc.cluster_ip, svc.port);
    let pins = agent.pin_path().to_owned();
    assert!(
        pins.join(legacy::CONNTRACK_V1).exists() && !pins.join(map_names::CONNTRACK).exists(),
        "the older release pins {}",
        legacy::CONNTRACK_V1
    );

    let mut load = Load::start(&topology, target, 23000);
    let links: Vec<PathBuf> = ["xdp_ingress", "tc_egress"]
        .iter()
        .map(|p| pins.join("links").join(format!("{p}@{NODE_IF}")))
        .collect();
    let before: Vec<(u32, u32)> = links.iter().map(|l| link_ids(l).unwrap()).collect();
    let watch = LinkWatch::start(links.clone());
    let [at_stop, at_start, at_ready] = replace_agent(
        &mut agent,
        &topology,
        &load,
        // While no agent runs, the Service gains two backends: Maglev sends about half of
        // the flows to them now; only conntrack keeps the established ones where they are.
        || svc.write(&folder, &pods(&topology, &[0, 1, 2, 3])).unwrap(),
        |agent| wait_selecting(agent, &topology, &svc, &[0, 1, 2, 3]),
    );
    load.pool.open(LONG_LIVED_AFTER, "after").unwrap();
    load.settle();

    // The links are the same and their programs were replaced once; never without one.
    let seen = watch.stop();
    let after: Vec<(u32, u32)> = links.iter().map(|l| link_ids(l).unwrap()).collect();
    for ((link, seen), (before, after)) in links.iter().zip(&seen).zip(before.iter().zip(&after)) {
        eprintln!(
            "{}: link {} program {} -> link {} program {}; seen {seen:?}",
            link.display(),
            before.0,
            before.1,
            after.0,
            after.1
        );
        assert_eq!(
            before.0,
            after.0,
            "{}: the link is the same",
            link.display()
        );
        assert_ne!(
            before.1,
            after.1,
            "{}: the program was replaced",
            link.display()
        );
        assert_eq!(
            seen,
            &[Ok(*before), Ok(*after)],
            "{}: polled every millisecond, the link held the old program, then the new one",
            link.display()
        );
    }
    // Conntrack was converted, and the old map unpinned.
    assert!(!pins.join(legacy::CONNTRACK_V1).exists(), "{}", agent.log());
    assert!(pins.join(map_names::CONNTRACK).exists());
    let log = agent.log();
    let converted: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("converted") && l.contains(legacy::CONNTRACK_V1))
        .collect();
    assert_eq!(converted.len(), 1, "one conversion of conntrack:\n{log}");
    eprintln!("{}", converted[0]);
    // So was the Maglev map (two tables per service since V2): its tables carried over, so
    // new flows had one between the attach and the first apply.
    assert!(!pins.join(legacy::MAGLEV_V1).exists(), "{log}");
    assert!(pins.join(map_names::MAGLEV).exists());
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("converted") && l.contains(legacy::MAGLEV_V1))
            .count(),
        1,
        "one conversion of the Maglev map:\n{log}"
    );

    // How many of the connections opened before would go elsewhere as new flows now: those
    // are the ones that conntrack kept on their backend.
    let records = load.pool.records();
    let maps = BpfMaps::open_pinned(&Pins::new(&pins)).unwrap();
    let programmed = maps.read_all().unwrap();
    let frontend = Frontend4::new(svc.cluster_ip.octets(), svc.port, PROTO_TCP);
    let (_, service) = programmed
        .services
        .iter()
        .find(|(k, _)| *k == FrontendKey::V4(frontend))
        .unwrap();
    // The backend the Maglev table gives the flow's hash: what it would get without its
    // conntrack entry.
    let maglev = |sport: u16| {
        let hash = flow_hash(
            frontend_addr(CLIENT_IP),
            frontend.addr,
            sport.to_be(),
            frontend.port,
            PROTO_TCP,
        );
        let slot = maps
            .table_entry(maglev::table_key(service.id, service.flags), hash)
            .unwrap()
            .unwrap();
        let (_, b) = programmed
            .backends
            .iter()
            .find(|(id, _)| *id == slot.backend_id)
            .unwrap();
        b.addr().to_string()
    };
    let mut kept_by_conntrack = 0;
    for r in records.iter().filter(|r| r.opened == "before") {
        let src = SocketAddrV4::new(CLIENT_IP, r.sport);
        let new_flow = maglev(r.sport);
        let established = agent.explain(src, target, false).unwrap();
        assert_eq!(established.decision, "conntrack", "{src}: {established:?}");
        let pod = r.first().unwrap();
        let backend_of = |b: Option<&str>| {
            topology
                .pods
                .iter()
                .find(|p| Some(svc.backend(p).as_str()) == b)
                .map(|p| p.name.clone())
        };
        assert_eq!(
            backend_of(established.backend.as_deref()).as_deref(),
            Some(pod),
            "{src}: conntrack names the backend that answered"
        );
        if backend_of(Some(&new_flow)).as_deref() != Some(pod) {
            kept_by_conntrack += 1;
        }
    }
    let end = load.churn.counts();
    load.finish(
        "upgrade from the older release under load (SIGTERM, two more backends, the new \
         agent on the same pins)",
        &[
            (
                "new connections while no agent ran",
                at_start.since(&at_stop),
            ),
            ("until the new agent was ready", at_ready.since(&at_start)),
            ("after it was ready", end.since(&at_ready)),
        ],
    );
    eprintln!(
        "{kept_by_conntrack} of {LONG_LIVED} long-lived connections would go to another backend \
         as new flows after the upgrade: conntrack (converted to V2) kept them"
    );
    assert!(kept_by_conntrack > 0, "the test moved no flow");
    let served_after = end.since(&at_ready).served;
    for pod in &topology.pods {
        assert!(
            served_after.contains_key(&pod.name),
            "{} serves new connections after the upgrade: {served_after:?}",
            pod.name
        );
    }
}

/// The release before the renames pinned the pre-filter as `LB_PREFILTER4_V1` and the LRU
/// tables' counters as `LB_TABLEEVENT_V1` (16 characters, which the kernel cut short): the
/// same maps under their former names, as this test leaves them by renaming the pins of a
/// stopped agent while its programs keep running on them. The agent that starts on them
/// creates the maps under their new names, fills the new pre-filter with the bit of every
/// frontend before its programs replace the old ones (a packet to a frontend whose bit were
/// missing would pass untranslated), and unpins the former names; no request fails.
#[test]
fn an_upgrade_from_the_former_map_names_under_load_fills_the_prefilter_before_the_programs() {
    let topology = Topology::new(2).expect("topology");
    let folder = Folder::new().unwrap();
    let svc = ClusterIpService::http("renamed", [10, 96, 0, 41], 8080);
    svc.write(&folder, &pods(&topology, &[0, 1])).unwrap();
    let mut agent = Agent::start(&topology.node, folder.path(), NODE_IF).expect("agent");
    wait_selecting(&agent, &topology, &svc, &[0, 1]);
    let target = SocketAddrV4::new(svc.cluster_ip, svc.port);
    let pins = agent.pin_path().to_owned();
    let load = Load::start(&topology, target, 24000);

    let rename_back = || {
        for (former, current) in legacy::RENAMED {
            std::fs::rename(pins.join(current), pins.join(former)).unwrap();
        }
    };
    let [at_stop, at_start, at_ready] =
        replace_agent(&mut agent, &topology, &load, rename_back, |_| {});
    load.settle();

    let log = agent.log();
    for (former, current) in legacy::RENAMED {
        assert!(!pins.join(former).exists(), "{former} is unpinned:\n{log}");
        assert!(pins.join(current).exists(), "{current} is pinned:\n{log}");
        assert_eq!(
            log.lines()
                .filter(|l| l.contains("not carried over") && l.contains(former))
                .count(),
            1,
            "{former} dropped once:\n{log}"
        );
    }
    // The new pre-filter has the bit of every frontend, and no other.
    let programmed = BpfMaps::open_pinned(&Pins::new(&pins))
        .unwrap()
        .read_all()
        .unwrap();
    let mut want = std::collections::BTreeMap::<u32, u64>::new();
    for (key, _) in &programmed.services {
        let (word, bit) = prefilter::position(key.prefilter_bucket());
        *want.entry(word).or_default() |= bit;
    }
    let mut found = programmed.prefilter.clone();
    found.sort();
    assert!(!want.is_empty());
    assert_eq!(found, want.into_iter().collect::<Vec<_>>());

    let end = load.churn.counts();
    load.finish(
        "an upgrade from the former map names under load (SIGTERM, the pins renamed back, \
         the agent started again on them)",
        &[
            ("while no agent ran", at_start.since(&at_stop)),
            ("until the agent was ready", at_ready.since(&at_start)),
            ("after it was ready", end.since(&at_ready)),
        ],
    );
}
