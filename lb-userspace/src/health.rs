//! kube-proxy's two health servers, which cloud load balancers probe: replacing kube-proxy
//! without them would blackhole traffic.
//!
//! - The proxy health server ([`ProxyHealth`], kube-proxy's `--healthz-bind-address`,
//!   default `0.0.0.0:10256`): `/livez` answers 200 while the programmed state is current
//!   and 503 when it is stale: an update of the source has waited longer than the timeout to
//!   be programmed (kube-proxy's `QueuedUpdate` and `Updated`: healthy while starting up,
//!   while nothing is pending, or while the oldest pending update is younger than the
//!   timeout; kube-proxy v1.21 measured from the latest update instead, so that a steady
//!   stream of updates hid a stuck proxy, which later releases fixed). `/healthz` is the same
//!   and also fails while this node is being deleted (current kube-proxy's `nodeEligible`).
//!   Bodies as kube-proxy's: `{"lastUpdated": "...","currentTime": "..."}` (with
//!   `, "nodeEligible": true` for `/healthz`).
//! - The service health server ([`ServiceHealth`]): for each LoadBalancer Service with
//!   externalTrafficPolicy Local, on its `healthCheckNodePort` on this node's addresses of
//!   the Service's families, any path answers 200 while this node has a ready endpoint of
//!   the Service (of the address's family) and the proxy is healthy, 503 otherwise, with
//!   kube-proxy's body (`{"service": {"namespace": ..., "name": ...}, "localEndpoints": N,
//!   "serviceProxyHealthy": ...}`, tab-indented as kube-proxy prints it).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use hyper::{Method, StatusCode};
use tokio::{net::TcpListener, task::JoinHandle};
use tracing::{info, warn};

use crate::{
    http::{self, Reply},
    model::{IpFamily, ObjectRef},
    plan::desired::HealthCheck,
};

/// kube-proxy's default `--healthz-bind-address`.
pub const DEFAULT_PROXY_HEALTH_ADDR: &str = "0.0.0.0:10256";
/// How long an update may wait to be programmed before the proxy counts as unhealthy
/// (kube-proxy's: twice the iptables sync period of 30 s).
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(60);

/// The state behind the proxy health server.
#[derive(Debug)]
pub struct ProxyHealth {
    timeout: Duration,
    state: Mutex<ProxyState>,
}

#[derive(Debug)]
struct ProxyState {
    /// When the oldest update not programmed yet arrived.
    oldest_pending: Option<Instant>,
    /// When the last update was programmed.
    last_updated: Option<SystemTime>,
    node_eligible: bool,
}

impl ProxyHealth {
    /// Healthy, nothing pending, the node eligible.
    pub fn new(timeout: Duration) -> Self {
        ProxyHealth {
            timeout,
            state: Mutex::new(ProxyState {
                oldest_pending: None,
                last_updated: None,
                node_eligible: true,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ProxyState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An update arrived at `at` (kube-proxy's `QueuedUpdate`).
    pub fn queued(&self, at: Instant) {
        let mut state = self.lock();
        state.oldest_pending = Some(state.oldest_pending.map_or(at, |t| t.min(at)));
    }

    /// Everything that arrived is programmed (kube-proxy's `Updated`).
    pub fn updated(&self) {
        let mut state = self.lock();
        state.oldest_pending = None;
        state.last_updated = Some(SystemTime::now());
    }

    /// Whether this node is eligible for load balancer traffic (not being deleted).
    pub fn set_node_eligible(&self, eligible: bool) {
        let mut state = self.lock();
        if state.node_eligible != eligible {
            info!(eligible, "node eligibility for load balancer traffic");
        }
        state.node_eligible = eligible;
    }

    /// Whether the programmed state is current at `now`.
    pub fn is_healthy(&self, now: Instant) -> bool {
        self.lock()
            .oldest_pending
            .is_none_or(|t| now.saturating_duration_since(t) < self.timeout)
    }

    /// The reply to `path`: `/healthz` or `/livez`.
    fn reply(&self, method: &Method, path: &str) -> Reply {
        if method != Method::GET {
            return Reply::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain; charset=utf-8",
                "only GET is served\n",
            );
        }
        let healthy = self.is_healthy(Instant::now());
        let (last_updated, eligible) = {
            let state = self.lock();
            (state.last_updated, state.node_eligible)
        };
        let now = SystemTime::now();
        // As kube-proxy: a healthy proxy says it was updated now.
        let last_updated = if healthy { Some(now) } else { last_updated };
        let times = format!(
            "{{\"lastUpdated\": \"{}\",\"currentTime\": \"{}\"",
            go_time(last_updated),
            go_time(Some(now))
        );
        let (ok, body) = match path {
            "/healthz" => (
                healthy && eligible,
                format!("{times}, \"nodeEligible\": {eligible}}}"),
            ),
            "/livez" => (healthy, format!("{times}}}")),
            _ => {
                return Reply::new(
                    StatusCode::NOT_FOUND,
                    "text/plain; charset=utf-8",
                    "404 page not found\n",
                );
            }
        };
        json_reply(ok, body)
    }
}

/// A JSON reply, 200 when `ok`, else 503, with kube-proxy's headers.
fn json_reply(ok: bool, body: String) -> Reply {
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut reply = Reply::new(status, "application/json", body);
    reply.headers.push(("x-content-type-options", "nosniff"));
    reply
}

/// A time as Go prints a `time.Time` in UTC (what kube-proxy's bodies hold): `2006-01-02
/// 15:04:05.999999999 +0000 UTC`; `None` is Go's zero time.
fn go_time(time: Option<SystemTime>) -> String {
    let Some(since) = time.and_then(|t| t.duration_since(UNIX_EPOCH).ok()) else {
        return "0001-01-01 00:00:00 +0000 UTC".into();
    };
    let secs = since.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Days to a civil date (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut fraction = format!(".{:09}", since.subsec_nanos());
    while fraction.ends_with('0') {
        fraction.pop();
    }
    if fraction == "." {
        fraction.clear();
    }
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}{fraction} +0000 UTC",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// Binds `addr` and serves the proxy health server on it until the runtime stops. An
/// unspecified IPv4 address (`0.0.0.0`) serves both families, as kube-proxy's does.
pub async fn serve_proxy_health(
    addr: SocketAddr,
    health: Arc<ProxyHealth>,
) -> std::io::Result<SocketAddr> {
    let listener = match addr {
        SocketAddr::V4(v4) if v4.ip().is_unspecified() => {
            let both = SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), addr.port());
            listen(both, false).or_else(|_| listen(addr, false))?
        }
        _ => listen(addr, false)?,
    };
    let local = listener.local_addr()?;
    http::spawn(
        listener,
        "proxy health server",
        Arc::new(move |method, path| health.reply(method, path)),
    );
    Ok(local)
}

/// A listening socket on `addr`, dual-stack when it is IPv6's unspecified address; with
/// `freebind`, `addr` need not be on an interface (yet).
fn listen(addr: SocketAddr, freebind: bool) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    match addr {
        SocketAddr::V4(_) if freebind => socket.set_freebind_v4(true)?,
        SocketAddr::V6(v6) => {
            socket.set_only_v6(!v6.ip().is_unspecified())?;
            if freebind {
                socket.set_freebind_v6(true)?;
            }
        }
        SocketAddr::V4(_) => {}
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// The service health server: one listener per Service and node address.
pub struct ServiceHealth {
    proxy: Arc<ProxyHealth>,
    /// The local endpoints of each Service, by family, as the handlers read them.
    counts: Arc<Mutex<BTreeMap<ObjectRef, BTreeMap<IpFamily, usize>>>>,
    /// Each listener: the Service it answers for, and its task.
    listeners: BTreeMap<SocketAddr, (ObjectRef, JoinHandle<()>)>,
    /// Listeners that failed, with why: logged once each, tried again at every sync.
    failed: BTreeMap<SocketAddr, String>,
}

impl ServiceHealth {
    /// No health checks yet; they answer for `proxy` too.
    pub fn new(proxy: Arc<ProxyHealth>) -> Self {
        ServiceHealth {
            proxy,
            counts: Arc::default(),
            listeners: BTreeMap::new(),
            failed: BTreeMap::new(),
        }
    }

    /// Serves exactly `checks`, on `node_addresses` of each Service's families: closes the
    /// listeners no longer wanted, opens the new ones, and takes in the endpoint counts.
    /// Must run inside the agent's runtime.
    pub fn sync(&mut self, checks: &BTreeMap<ObjectRef, HealthCheck>, node_addresses: &[IpAddr]) {
        let mut wanted: BTreeMap<SocketAddr, &ObjectRef> = BTreeMap::new();
        for (service, check) in checks {
            for &ip in node_addresses {
                if !check.local_endpoints.contains_key(&IpFamily::of(&ip)) {
                    continue;
                }
                let addr = SocketAddr::new(ip, check.port);
                if let Some(other) = wanted.insert(addr, service) {
                    // Two Services with one port: the first (by name) keeps it.
                    wanted.insert(addr, other);
                    warn!(
                        "{service}: healthCheckNodePort {} is {other}'s too; {other} keeps it",
                        check.port
                    );
                }
            }
        }
        {
            let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
            *counts = checks
                .iter()
                .map(|(s, c)| (s.clone(), c.local_endpoints.clone()))
                .collect();
        }
        let stale: Vec<SocketAddr> = self
            .listeners
            .iter()
            .filter(|(addr, (service, _))| wanted.get(addr) != Some(&service))
            .map(|(addr, _)| *addr)
            .collect();
        for addr in stale {
            if let Some((service, task)) = self.listeners.remove(&addr) {
                task.abort();
                info!(%addr, %service, "health check closed");
            }
        }
        self.failed.retain(|addr, _| wanted.contains_key(addr));
        for (addr, service) in wanted {
            if self.listeners.contains_key(&addr) {
                continue;
            }
            match listen(addr, true) {
                Ok(listener) => {
                    let respond = self.responder(service.clone(), IpFamily::of(&addr.ip()));
                    let task = http::spawn(listener, "service health check", respond);
                    info!(%addr, %service, "serving the health check");
                    self.failed.remove(&addr);
                    self.listeners.insert(addr, (service.clone(), task));
                }
                Err(e) => {
                    let e = e.to_string();
                    if self.failed.get(&addr) != Some(&e) {
                        warn!(%addr, %service, "cannot serve the health check: {e}");
                        self.failed.insert(addr, e);
                    }
                }
            }
        }
    }

    /// The addresses health checks are served on.
    pub fn addresses(&self) -> BTreeSet<SocketAddr> {
        self.listeners.keys().copied().collect()
    }

    /// What the health check of `service` on an address of `family` answers.
    fn responder(&self, service: ObjectRef, family: IpFamily) -> http::Respond {
        let counts = self.counts.clone();
        let proxy = self.proxy.clone();
        Arc::new(move |_, _| {
            let count = counts
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&service)
                .and_then(|c| c.get(&family).copied());
            let Some(count) = count else {
                return Reply::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain; charset=utf-8",
                    "health check closed\n",
                );
            };
            service_reply(&service, count, proxy.is_healthy(Instant::now()))
        })
    }
}

impl Drop for ServiceHealth {
    fn drop(&mut self) {
        for (_, task) in self.listeners.values() {
            task.abort();
        }
    }
}

/// kube-proxy's reply for a Service's health check.
fn service_reply(service: &ObjectRef, local_endpoints: usize, proxy_healthy: bool) -> Reply {
    let body = format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {:?},\n\t\t\"name\": {:?}\n\t}},\n\t\
         \"localEndpoints\": {local_endpoints},\n\t\"serviceProxyHealthy\": {proxy_healthy}\n}}",
        service.namespace, service.name
    );
    json_reply(local_endpoints > 0 && proxy_healthy, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_proxy_is_healthy_unless_an_update_waits_longer_than_the_timeout() {
        let health = ProxyHealth::new(Duration::from_secs(60));
        let t0 = Instant::now();
        let later = |s: u64| t0 + Duration::from_secs(s);
        // kube-proxy's proxier health cases, in its words.
        assert!(
            health.is_healthy(t0),
            "the proxy is healthy while it's starting up"
        );
        health.queued(later(10));
        assert!(
            health.is_healthy(later(69)),
            "there's an unprocessed update queued, but it's not late yet"
        );
        health.queued(later(30));
        assert!(
            !health.is_healthy(later(70)),
            "the oldest pending update is late (a later one does not hide it)"
        );
        health.updated();
        assert!(health.is_healthy(later(200)), "the proxy is fully synced");
        health.queued(later(300));
        assert!(!health.is_healthy(later(360)));
        assert!(health.is_healthy(later(359)));
    }

    fn reply_of(health: &ProxyHealth, path: &str) -> (u16, String) {
        let r = health.reply(&Method::GET, path);
        (r.status.as_u16(), r.body)
    }

    #[test]
    fn healthz_and_livez_answer_as_kube_proxy() {
        let health = ProxyHealth::new(Duration::from_secs(60));
        let (status, body) = reply_of(&health, "/healthz");
        assert_eq!(status, 200);
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["nodeEligible"], true);
        assert_eq!(json["lastUpdated"], json["currentTime"], "{body}");
        assert!(
            json["currentTime"]
                .as_str()
                .unwrap()
                .ends_with(" +0000 UTC"),
            "{body}"
        );
        let (status, body) = reply_of(&health, "/livez");
        assert_eq!(status, 200);
        assert!(!body.contains("nodeEligible"), "{body}");

        // A node being deleted: /healthz fails, /livez does not.
        health.set_node_eligible(false);
        assert_eq!(reply_of(&health, "/healthz").0, 503);
        assert!(
            reply_of(&health, "/healthz")
                .1
                .contains("\"nodeEligible\": false")
        );
        assert_eq!(reply_of(&health, "/livez").0, 200);
        health.set_node_eligible(true);

        // Stale: both fail, and lastUpdated is the last update (here: never).
        health.queued(Instant::now() - Duration::from_secs(61));
        let (status, body) = reply_of(&health, "/livez");
        assert_eq!(status, 503);
        assert!(
            body.starts_with(
                "{\"lastUpdated\": \"0001-01-01 00:00:00 +0000 UTC\",\"currentTime\": \""
            ),
            "{body}"
        );
        assert_eq!(reply_of(&health, "/healthz").0, 503);
        assert_eq!(reply_of(&health, "/other").0, 404);
        let r = health.reply(&Method::GET, "/healthz");
        assert_eq!(r.content_type, "application/json");
        assert_eq!(r.headers, [("x-content-type-options", "nosniff")]);
    }

    #[test]
    fn times_print_as_go_prints_them() {
        let at = |secs: u64, nanos: u32| Some(UNIX_EPOCH + Duration::new(secs, nanos));
        assert_eq!(go_time(at(0, 0)), "1970-01-01 00:00:00 +0000 UTC");
        assert_eq!(
            go_time(at(1_700_000_000, 120_000_000)),
            "2023-11-14 22:13:20.12 +0000 UTC"
        );
        assert_eq!(
            go_time(at(951_782_400, 1)),
            "2000-02-29 00:00:00.000000001 +0000 UTC"
        );
        assert_eq!(go_time(None), "0001-01-01 00:00:00 +0000 UTC");
    }

    #[test]
    fn a_service_s_health_check_answers_as_kube_proxy() {
        let service = ObjectRef::new("shop", "web");
        let r = service_reply(&service, 2, true);
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(
            r.body,
            "{\n\t\"service\": {\n\t\t\"namespace\": \"shop\",\n\t\t\"name\": \"web\"\n\t},\n\t\
             \"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
        );
        let json: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(json["service"]["name"], "web");
        assert_eq!(
            service_reply(&service, 0, true).status,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            service_reply(&service, 3, false).status,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
