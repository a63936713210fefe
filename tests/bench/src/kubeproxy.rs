//! kube-proxy's rules for a set of ClusterIP Services, written as kube-proxy writes them, for
//! the comparison modes of the end-to-end benchmark:
//!
//! - iptables mode: the `iptables-restore` input of a full sync (KUBE-SERVICES ->
//!   KUBE-SVC-<hash> with `statistic --mode random --probability` -> KUBE-SEP-<hash> DNAT, the
//!   KUBE-MARK-MASQ / KUBE-POSTROUTING masquerade marks, and the KUBE-FORWARD rules), chain
//!   names hashed as kube-proxy hashes them;
//! - nftables mode: the `nft -f` transaction of a full sync (table `ip kube-proxy`, the
//!   `service-ips` verdict map on `ip daddr . meta l4proto . th dport`, per-service chains
//!   with `numgen random mod N vmap` to per-endpoint chains that DNAT).
//!
//! Both use a cluster CIDR ([`super::cluster::CLUSTER_CIDR`]) as kube-proxy's local-traffic
//! detector: traffic to a ClusterIP from outside it is masqueraded, as kube-proxy does.

use std::fmt::Write as _;

use sha2::{Digest, Sha256};

use super::cluster::{BenchPort, BenchService, CLUSTER_CIDR};

/// RFC 4648 base32 (the alphabet of Go's `base32.StdEncoding`) of `bytes`, without padding.
fn base32(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(bytes.len().div_ceil(5) * 8);
    let (mut buffer, mut bits) = (0u64, 0u32);
    for &b in bytes {
        buffer = (buffer << 8) | u64::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((buffer >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((buffer << (5 - bits)) & 31) as usize] as char);
    }
    out
}

/// The first `n` characters of base32(sha256(`input`)), kube-proxy's chain-name hash.
fn hash(input: &str, n: usize) -> String {
    let mut encoded = base32(&Sha256::digest(input.as_bytes()));
    encoded.truncate(n);
    encoded
}

/// `KUBE-SVC-...` of a Service port (kube-proxy's `servicePortPolicyClusterChain`).
pub fn svc_chain(s: &BenchService, port: &BenchPort) -> String {
    let name = s.port_name(port);
    format!("KUBE-SVC-{}", hash(&format!("{name}{}", port.proto()), 16))
}

/// `KUBE-SEP-...` of an endpoint of a Service port (`servicePortEndpointChainName`).
pub fn sep_chain(s: &BenchService, port: &BenchPort, endpoint: &str) -> String {
    let name = s.port_name(port);
    format!(
        "KUBE-SEP-{}",
        hash(&format!("{name}{}{endpoint}", port.proto()), 16)
    )
}

/// The `iptables-restore --noflush` input of kube-proxy's full sync of `services`: a new
/// network namespace gets exactly kube-proxy's nat and filter rules, the jumps from the
/// built-in chains included.
pub fn iptables_restore(services: &[BenchService]) -> String {
    let mut chains = String::new();
    let mut rules = String::new();
    for (s, p) in services
        .iter()
        .flat_map(|s| s.ports.iter().map(move |p| (s, p)))
    {
        let svc = svc_chain(s, p);
        let name = s.port_name(p);
        let proto = p.proto();
        let _ = writeln!(chains, ":{svc} - [0:0]");
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -m comment --comment \"{name} cluster IP\" -m {proto} -p {proto} -d {ip} \
             --dport {port} -j {svc}",
            ip = s.cluster_ip,
            port = p.port
        );
        let _ = writeln!(
            rules,
            "-A {svc} -m comment --comment \"{name} cluster IP\" -m {proto} -p {proto} -d {ip} --dport \
             {port} ! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ",
            ip = s.cluster_ip,
            port = p.port
        );
        let n = s.endpoints.len();
        for (i, (addr, port)) in s.endpoints.iter().enumerate() {
            let endpoint = format!("{addr}:{port}");
            let sep = sep_chain(s, p, &endpoint);
            let _ = writeln!(chains, ":{sep} - [0:0]");
            let statistic = if i + 1 < n {
                format!(
                    " -m statistic --mode random --probability {:.10}",
                    1.0 / (n - i) as f64
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                rules,
                "-A {svc} -m comment --comment \"{name} -> {endpoint}\"{statistic} -j {sep}"
            );
            let _ = writeln!(
                rules,
                "-A {sep} -m comment --comment {name} -s {addr}/32 -j KUBE-MARK-MASQ"
            );
            let _ = writeln!(
                rules,
                "-A {sep} -m comment --comment {name} -m {proto} -p {proto} -j DNAT \
                 --to-destination {endpoint}"
            );
        }
    }
    format!(
        "*filter\n\
         :INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
         :KUBE-SERVICES - [0:0]\n:KUBE-FORWARD - [0:0]\n\
         -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
         -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
         COMMIT\n\
         *nat\n\
         :PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n\
         :KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n\
         {chains}\
         -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n\
         {rules}\
         -A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n\
         COMMIT\n"
    )
}

/// The arguments kube-proxy runs `iptables-restore` with.
pub const IPTABLES_RESTORE_ARGS: &[&str] = &["-w", "5", "--noflush", "--counters"];

/// `iptables-restore` input that empties the nat and filter tables (removing every chain).
pub const IPTABLES_FLUSH: &str = "*filter\nCOMMIT\n*nat\nCOMMIT\n";

/// The name of kube-proxy's nftables table (in family `ip`).
pub const NFT_TABLE: &str = "kube-proxy";

/// `service-...` chain of a Service port (nftables mode's `servicePortChainNameBase`).
pub fn nft_service_chain(s: &BenchService, port: &BenchPort) -> String {
    let name = format!(
        "{}/{}/{}/{}",
        super::cluster::NAMESPACE,
        s.name,
        port.proto(),
        port.name
    );
    format!("service-{}-{name}", hash(&name, 8))
}

/// `endpoint-...` chain of an endpoint of a Service port (`servicePortEndpointChainNameBase`).
pub fn nft_endpoint_chain(s: &BenchService, port: &BenchPort, addr: &str, target: u16) -> String {
    let name = format!(
        "{}/{}/{}/{}__{addr}/{target}",
        super::cluster::NAMESPACE,
        s.name,
        port.proto(),
        port.name
    );
    format!("endpoint-{}-{name}", hash(&name, 8))
}

/// The `nft -f` transaction of kube-proxy's (nftables mode) full sync of `services`.
pub fn nft_ruleset(services: &[BenchService]) -> String {
    let t = format!("ip {NFT_TABLE}");
    let mut out = format!(
        "add table {t} {{ comment \"rules for kube-proxy\" ; }}\n\
         add chain {t} mark-for-masquerade\n\
         add rule {t} mark-for-masquerade mark set mark or 0x4000\n\
         add chain {t} masquerading\n\
         add rule {t} masquerading mark and 0x4000 == 0 return\n\
         add rule {t} masquerading mark set mark xor 0x4000\n\
         add rule {t} masquerading masquerade fully-random\n\
         add map {t} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}\n\
         add map {t} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }}\n\
         add chain {t} services\n\
         add rule {t} services ip daddr . meta l4proto . th dport vmap @service-ips\n\
         add chain {t} service-endpoints-check\n\
         add rule {t} service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services\n\
         add chain {t} nat-prerouting {{ type nat hook prerouting priority -100 ; }}\n\
         add rule {t} nat-prerouting jump services\n\
         add chain {t} nat-output {{ type nat hook output priority -100 ; }}\n\
         add rule {t} nat-output jump services\n\
         add chain {t} nat-postrouting {{ type nat hook postrouting priority 100 ; }}\n\
         add rule {t} nat-postrouting jump masquerading\n\
         add chain {t} filter-forward {{ type filter hook forward priority -110 ; }}\n\
         add rule {t} filter-forward ct state new jump service-endpoints-check\n"
    );
    let mut elements = String::new();
    for (s, p) in services
        .iter()
        .flat_map(|s| s.ports.iter().map(move |p| (s, p)))
    {
        let chain = nft_service_chain(s, p);
        let proto = p.proto();
        let _ = writeln!(out, "add chain {t} {chain}");
        let _ = writeln!(
            out,
            "add rule {t} {chain} ip daddr {ip} {proto} dport {port} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
            ip = s.cluster_ip,
            port = p.port
        );
        let mut vmap = Vec::new();
        for (i, (addr, port)) in s.endpoints.iter().enumerate() {
            let endpoint = nft_endpoint_chain(s, p, &addr.to_string(), *port);
            let _ = writeln!(out, "add chain {t} {endpoint}");
            let _ = writeln!(
                out,
                "add rule {t} {endpoint} ip saddr {addr} jump mark-for-masquerade"
            );
            let _ = writeln!(
                out,
                "add rule {t} {endpoint} meta l4proto {proto} dnat to {addr}:{port}"
            );
            vmap.push(format!("{i} : goto {endpoint}"));
        }
        let _ = writeln!(
            out,
            "add rule {t} {chain} numgen random mod {} vmap {{ {} }}",
            s.endpoints.len(),
            vmap.join(" , ")
        );
        let _ = writeln!(
            elements,
            "add element {t} service-ips {{ {ip} . {proto} . {port} : goto {chain} }}",
            ip = s.cluster_ip,
            port = p.port
        );
    }
    out.push_str(&elements);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base32_matches_rfc_4648() {
        // RFC 4648 section 10 test vectors, padding removed.
        for (input, expected) in [
            ("", ""),
            ("f", "MY"),
            ("fo", "MZXQ"),
            ("foo", "MZXW6"),
            ("foob", "MZXW6YQ"),
            ("fooba", "MZXW6YTB"),
            ("foobar", "MZXW6YTBOI"),
        ] {
            assert_eq!(base32(input.as_bytes()), expected, "{input:?}");
        }
    }

    #[test]
    fn chain_names_are_kube_proxys() {
        // kube-proxy's own test data (pkg/proxy/iptables and nftables proxier tests):
        // "ns1/svc1:p80" + "tcp" and the endpoint 10.180.0.1:80.
        assert_eq!(hash("ns1/svc1:p80tcp", 16), "XPGD46QRK7WJZT7O");
        assert_eq!(hash("ns1/svc1:p80tcp10.180.0.1:80", 16), "SXIVWICOYRO3J4NJ");
        assert_eq!(hash("ns1/svc1/tcp/p80", 8), "ULMVA6XW");
        assert_eq!(hash("ns1/svc1/tcp/p80__10.180.0.1/80", 8), "5OJB2KTY");
    }
}
