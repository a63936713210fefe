//! The node's external interfaces: where XDP translates what arrives for a frontend and TC
//! egress the replies that leave. They are the ones `--interface` names (repeatable), else
//! those that hold the node's addresses (the `--node-ip` flags', else the Node object's),
//! else those of the default routes (one per family); several at once, followed as
//! interfaces, addresses and routes come and go ([`super::netlink::Notifications`]).
//!
//! Pins: `links/xdp_ingress@<interface>` and `links/tc_egress@<interface>`. At start the
//! agent replaces the programs of the links pinned for interfaces that are still there, so
//! that no packet sees no program across a restart, and attaches anew only once it knows
//! the node's addresses (its first complete view); the links of interfaces no longer chosen
//! are removed then.

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::CStr,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use tracing::{debug, info, warn};

use super::{
    Datapath, LinkOutcome,
    eastwest::{self, EastWestError},
};

/// The pin-name prefixes of an external interface's links, each followed by its name.
pub const PIN_PREFIXES: [&str; 2] = ["xdp_ingress@", "tc_egress@"];

/// Why the interfaces were chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// `--interface` names them.
    Named,
    /// They hold the node's addresses.
    NodeAddresses,
    /// The default routes go out of them.
    DefaultRoutes,
}

/// The external interfaces, by the rules of the [module](self), among the interfaces
/// `present` (name -> the addresses each holds), with the node's `addresses` and the
/// interfaces of the default routes.
pub fn choose(
    named: &[String],
    addresses: &[IpAddr],
    present: &BTreeMap<String, Vec<IpAddr>>,
    default_routes: &BTreeSet<String>,
) -> (BTreeSet<String>, Why) {
    if !named.is_empty() {
        let chosen = named
            .iter()
            .filter(|n| present.contains_key(*n))
            .cloned()
            .collect();
        return (chosen, Why::Named);
    }
    let holding: BTreeSet<String> = present
        .iter()
        .filter(|(name, held)| *name != "lo" && held.iter().any(|a| addresses.contains(a)))
        .map(|(name, _)| name.clone())
        .collect();
    if !holding.is_empty() {
        return (holding, Why::NodeAddresses);
    }
    let routes = default_routes
        .iter()
        .filter(|n| *n != "lo" && present.contains_key(*n))
        .cloned()
        .collect();
    (routes, Why::DefaultRoutes)
}

/// Every interface of this network namespace with the addresses it holds (an interface
/// without addresses too), from getifaddrs(3).
pub fn addresses() -> io::Result<BTreeMap<String, Vec<IpAddr>>> {
    let mut found: BTreeMap<String, Vec<IpAddr>> = eastwest::interfaces()?
        .into_keys()
        .map(|name| (name, Vec::new()))
        .collect();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list that freeifaddrs releases below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut cursor = list;
    while !cursor.is_null() {
        // SAFETY: cursor is a node of the list getifaddrs returned.
        let ifa = unsafe { &*cursor };
        cursor = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a C string; ifa_addr points to a sockaddr of its family.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        let addr: IpAddr = match i32::from(unsafe { (*ifa.ifa_addr).sa_family }) {
            libc::AF_INET => {
                // SAFETY: an AF_INET address is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)).into()
            }
            libc::AF_INET6 => {
                // SAFETY: an AF_INET6 address is a sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                Ipv6Addr::from(sin6.sin6_addr.s6_addr).into()
            }
            _ => continue,
        };
        found.entry(name).or_default().push(addr);
    }
    // SAFETY: list came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    Ok(found)
}

/// The addresses of `interfaces` that NodePorts get when nothing else names the node's: IPv4
/// first, then IPv6 but link-local (which kube-proxy gives no NodePorts either).
pub fn node_port_addresses(
    interfaces: &BTreeSet<String>,
    present: &BTreeMap<String, Vec<IpAddr>>,
) -> Vec<IpAddr> {
    let mut found: Vec<IpAddr> = interfaces
        .iter()
        .filter_map(|name| present.get(name))
        .flatten()
        .filter(|a| match a {
            IpAddr::V4(_) => true,
            IpAddr::V6(v6) => !v6.is_unicast_link_local(),
        })
        .copied()
        .collect();
    // IPv4 first, each family in the interfaces' order.
    found.sort_by_key(IpAddr::is_ipv6);
    found.dedup();
    found
}

/// The interfaces of the default routes of both families: of each, the one with the lowest
/// metric (several when they tie), from /proc/net/route and /proc/net/ipv6_route.
pub fn default_routes() -> io::Result<BTreeSet<String>> {
    let read = |path: &str| match std::fs::read_to_string(path) {
        Ok(text) => Ok(text),
        // A kernel without IPv6 has no IPv6 routes.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(e),
    };
    let mut found = best(default_routes4(&read("/proc/net/route")?));
    found.extend(best(default_routes6(&read("/proc/net/ipv6_route")?)));
    Ok(found)
}

/// The interfaces of the lowest metric among `routes` (interface, metric).
fn best(routes: Vec<(String, u32)>) -> BTreeSet<String> {
    let lowest = routes.iter().map(|(_, m)| *m).min();
    routes
        .into_iter()
        .filter(|(_, m)| Some(*m) == lowest)
        .map(|(name, _)| name)
        .collect()
}

/// `RTF_UP`: the route is usable.
const RTF_UP: u32 = 0x1;
/// `RTF_REJECT`: an unreachable or prohibit route.
const RTF_REJECT: u32 = 0x200;

/// The default routes of /proc/net/route (`Iface Destination Gateway Flags RefCnt Use Metric
/// Mask ...`, hexadecimal): interface and metric.
fn default_routes4(text: &str) -> Vec<(String, u32)> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let hex = |i: usize| f.get(i).and_then(|v| u32::from_str_radix(v, 16).ok());
            let (flags, metric) = (hex(3)?, f.get(6)?.parse::<u32>().ok()?);
            let default = hex(1)? == 0 && hex(7)? == 0;
            (default && flags & RTF_UP != 0 && flags & RTF_REJECT == 0)
                .then(|| (f[0].to_owned(), metric))
        })
        .collect()
}

/// The default routes of /proc/net/ipv6_route (`destination prefix-length source
/// prefix-length next-hop metric refcnt use flags interface`, hexadecimal): interface and
/// metric.
fn default_routes6(text: &str) -> Vec<(String, u32)> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let hex = |i: usize| f.get(i).and_then(|v| u32::from_str_radix(v, 16).ok());
            let (prefix, metric, flags) = (hex(1)?, hex(5)?, hex(8)?);
            let (destination, interface) = (f.first()?, f.get(9)?);
            let default = destination.bytes().all(|b| b == b'0') && prefix == 0;
            (default && flags & RTF_UP != 0 && flags & RTF_REJECT == 0)
                .then(|| (interface.to_string(), metric))
        })
        .collect()
}

/// The external interfaces the agent has attached to, followed by the rules of the
/// [module](self).
pub struct ExternalInterfaces {
    /// `--interface`.
    named: Vec<String>,
    /// The interfaces attached, with the index each had then (one that comes back under
    /// the same name is a new interface).
    attached: BTreeMap<String, u32>,
    /// The addresses the chosen interfaces hold, for NodePorts when nothing else names the
    /// node's.
    addresses: Vec<IpAddr>,
    /// What was last logged about the choice.
    logged: Option<(BTreeSet<String>, Why)>,
}

impl ExternalInterfaces {
    /// Follows `named` (`--interface`), or, when none is named, the interfaces the rules
    /// choose.
    pub fn new(named: Vec<String>) -> Self {
        Self {
            named,
            attached: BTreeMap::new(),
            addresses: Vec::new(),
            logged: None,
        }
    }

    /// The addresses the chosen interfaces hold (IPv4 first, no link-local).
    pub fn addresses(&self) -> &[IpAddr] {
        &self.addresses
    }

    /// At start: replaces the programs of the links an earlier agent pinned for interfaces
    /// that are still there, so that they never run without one. The choice waits for
    /// [`ExternalInterfaces::reconcile`].
    pub fn keep_pinned(
        &mut self,
        datapath: &mut Datapath,
    ) -> Result<Vec<(String, &'static str, LinkOutcome)>, EastWestError> {
        let present = eastwest::interfaces().map_err(EastWestError::Interfaces)?;
        let mut done = Vec::new();
        for name in pinned_interfaces(datapath)? {
            if let Some(&index) = present.get(&name) {
                for (program, outcome) in datapath.attach(&name)? {
                    done.push((name.clone(), program, outcome));
                }
                accept_local_sources(&name);
                self.attached.insert(name, index);
            }
        }
        Ok(done)
    }

    /// Chooses the interfaces for the node's `addresses` (the flags', else the Node
    /// object's; empty when neither names any), attaches the programs to those that do not
    /// have them and removes the links of the others. Errors are per interface: the others
    /// are still done. Returns whether the chosen interfaces' addresses changed.
    pub fn reconcile(
        &mut self,
        datapath: &mut Datapath,
        addresses: &[IpAddr],
    ) -> (bool, Vec<EastWestError>) {
        let mut errors = Vec::new();
        let present = match (self::addresses(), eastwest::interfaces()) {
            (Ok(held), Ok(indexes)) => held
                .into_iter()
                .filter_map(|(name, held)| indexes.get(&name).map(|&i| (name, (i, held))))
                .collect::<BTreeMap<_, _>>(),
            (Err(e), _) | (_, Err(e)) => return (false, vec![EastWestError::Interfaces(e)]),
        };
        let held: BTreeMap<String, Vec<IpAddr>> = present
            .iter()
            .map(|(name, (_, held))| (name.clone(), held.clone()))
            .collect();
        let routes = default_routes().unwrap_or_else(|e| {
            errors.push(EastWestError::Interfaces(e));
            BTreeSet::new()
        });
        let (chosen, why) = choose(&self.named, addresses, &held, &routes);
        self.log_choice(&chosen, why);
        for name in &chosen {
            let index = present[name].0;
            if self.attached.get(name) == Some(&index) {
                continue;
            }
            match datapath.attach(name) {
                Ok(outcomes) => {
                    for (program, outcome) in outcomes {
                        info!(program, interface = %name, ?outcome, "attached");
                    }
                    accept_local_sources(name);
                    self.attached.insert(name.clone(), index);
                }
                Err(e) => {
                    warn!(interface = %name, "attaching: {e}");
                    errors.push(e.into());
                }
            }
        }
        match pinned_interfaces(datapath) {
            Ok(pinned) => {
                let links = datapath.pins().links();
                for gone in pinned.difference(&chosen) {
                    info!(interface = %gone, "no longer an external interface: removing its links");
                    for prefix in PIN_PREFIXES {
                        if let Err(e) = eastwest::unpin(&links, &format!("{prefix}{gone}")) {
                            errors.push(e);
                        }
                    }
                    self.attached.remove(gone);
                }
            }
            Err(e) => errors.push(e),
        }
        self.attached.retain(|name, _| chosen.contains(name));
        let addresses = node_port_addresses(&chosen, &held);
        let changed = addresses != self.addresses;
        self.addresses = addresses;
        (changed, errors)
    }

    fn log_choice(&mut self, chosen: &BTreeSet<String>, why: Why) {
        let now = Some((chosen.clone(), why));
        if self.logged == now {
            return;
        }
        self.logged = now;
        if chosen.is_empty() {
            warn!(
                ?why,
                "no external interface: nothing translates what arrives from outside the node \
                 (give --interface, or --node-ip with an address the node holds)"
            );
        } else {
            info!(interfaces = ?chosen, ?why, "external interfaces");
        }
    }
}

/// `net.ipv4.conf.<interface>.accept_local=1` ([`super::accept_local_sysctl`]), written only
/// when it is not set already. When it cannot be (a read-only /proc/sys, as container
/// runtimes mount it), the agent does without it and says what it costs and which host
/// setting gives it: only a flow source-NATed to a backend on another node whose next hop's
/// neighbour entry is unresolved needs it.
fn accept_local_sources(interface: &str) {
    let path = super::accept_local_sysctl(interface);
    match super::ensure_sysctl(&path, "1") {
        Ok(outcome) => debug!(%interface, ?outcome, "accept_local"),
        Err(e) => warn!(
            %interface,
            "{e}: without net.ipv4.conf.{interface}.accept_local=1, a flow to a backend on \
             another node fails while the node has not resolved its next hop's MAC address \
             (set it on the host: sysctl -w net.ipv4.conf.{interface}.accept_local=1)"
        ),
    }
}

/// The interfaces that have an external link pinned.
fn pinned_interfaces(datapath: &Datapath) -> Result<BTreeSet<String>, EastWestError> {
    let links = datapath.pins().links();
    let mut found = BTreeSet::new();
    for prefix in PIN_PREFIXES {
        for name in eastwest::pinned_with_prefix(&links, prefix)? {
            found.insert(name[prefix.len()..].to_owned());
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn present(list: &[(&str, &[&str])]) -> BTreeMap<String, Vec<IpAddr>> {
        list.iter()
            .map(|(name, addrs)| {
                (
                    (*name).to_owned(),
                    addrs.iter().map(|a| a.parse().unwrap()).collect(),
                )
            })
            .collect()
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    #[test]
    fn the_interfaces_holding_the_node_addresses_else_the_default_routes_else_the_named() {
        let present = present(&[
            ("lo", &["127.0.0.1", "::1"]),
            ("eth0", &["10.0.0.5", "fe80::1"]),
            ("eth1", &["192.168.1.5", "fd00::5"]),
            ("cni0", &["10.244.0.1"]),
            ("eth2", &[]),
        ]);
        let routes = set(&["eth0"]);
        let node = |a: &[&str]| -> Vec<IpAddr> { a.iter().map(|a| a.parse().unwrap()).collect() };
        // Those holding the node's addresses, several at once, either family.
        assert_eq!(
            choose(&[], &node(&["10.0.0.5", "fd00::5"]), &present, &routes),
            (set(&["eth0", "eth1"]), Why::NodeAddresses)
        );
        // An address no interface holds (a cloud's ExternalIP) does not count.
        assert_eq!(
            choose(
                &[],
                &node(&["203.0.113.7", "192.168.1.5"]),
                &present,
                &routes
            ),
            (set(&["eth1"]), Why::NodeAddresses)
        );
        // None held, or none known: the default routes' interfaces.
        for addresses in [node(&["203.0.113.7"]), Vec::new(), node(&["127.0.0.1"])] {
            assert_eq!(
                choose(&[], &addresses, &present, &routes),
                (set(&["eth0"]), Why::DefaultRoutes),
                "{addresses:?}"
            );
        }
        // Named: those, when they are there, whatever the addresses.
        let named = vec!["eth2".to_owned(), "gone0".to_owned()];
        assert_eq!(
            choose(&named, &node(&["10.0.0.5"]), &present, &routes),
            (set(&["eth2"]), Why::Named)
        );
        // No default route and nothing held: none.
        assert_eq!(
            choose(&[], &[], &present, &BTreeSet::new()),
            (BTreeSet::new(), Why::DefaultRoutes)
        );
        // NodePorts get the chosen interfaces' addresses, IPv4 first, no link-local.
        assert_eq!(
            node_port_addresses(&set(&["eth0", "eth1"]), &present),
            node(&["10.0.0.5", "192.168.1.5", "fd00::5"])
        );
    }

    #[test]
    fn the_default_routes_come_from_proc_net() {
        let route = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
             eth0\t00000000\t0100000A\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
             eth0\t0000000A\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\n\
             eth1\t00000000\t0101A8C0\t0003\t0\t0\t200\t00000000\t0\t0\t0\n\
             wg0\t00000000\t00000000\t0001\t0\t0\t100\t00000080\t0\t0\t0\n";
        assert_eq!(
            default_routes4(route),
            vec![("eth0".to_owned(), 100), ("eth1".to_owned(), 200)]
        );
        assert_eq!(best(default_routes4(route)), set(&["eth0"]));
        let route6 = "\
            00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003     eth1\n\
            fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth1\n\
            00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo\n";
        assert_eq!(default_routes6(route6), vec![("eth1".to_owned(), 0x400)]);
        assert!(default_routes4("Iface\tDestination\n").is_empty());
        assert!(default_routes6("").is_empty());
    }
}
