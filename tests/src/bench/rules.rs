//! kube-proxy's own rule layouts, to compare against on the same machine in
//! the same run: the iptables mode's chains (KUBE-SERVICES -> KUBE-SVC-* ->
//! KUBE-SEP-*, random probabilities, DNAT) as `iptables-restore` input, and
//! the nftables mode's table (a service-ips verdict map, per-service chains
//! with `numgen random`, per-endpoint chains with `dnat`) as `nft -f` input.
//! NodePorts as kube-proxy writes them: behind every ClusterIP rule in
//! iptables (KUBE-NODEPORTS -> KUBE-EXT-*, with KUBE-SVL-* for an
//! externalTrafficPolicy Local), in a `service-nodeports` map in nftables;
//! loadBalancerSourceRanges as its firewall chains (KUBE-FW-* / `firewall-*`).
use std::{fmt::Write, net::Ipv4Addr};

pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
pub const SERVICE_CIDR: &str = "10.96.0.0/12";

pub struct RuleService {
    pub name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    /// "tcp" or "udp".
    pub protocol: &'static str,
    pub endpoints: Vec<(Ipv4Addr, u16)>,
    pub node_port: Option<u16>,
    /// externalTrafficPolicy Local: the endpoints on this node.
    pub local_endpoints: Option<Vec<(Ipv4Addr, u16)>>,
    pub load_balancer_ip: Option<Ipv4Addr>,
    /// loadBalancerSourceRanges (CIDRs), for the load balancer IP.
    pub source_ranges: Vec<String>,
}

impl RuleService {
    /// A TCP ClusterIP service, reached from inside only.
    pub fn cluster_ip(name: String, vip: Ipv4Addr, port: u16, endpoints: Vec<(Ipv4Addr, u16)>) -> Self {
        RuleService {
            name,
            vip,
            port,
            protocol: "tcp",
            endpoints,
            node_port: None,
            local_endpoints: None,
            load_balancer_ip: None,
            source_ranges: Vec::new(),
        }
    }
}

/// A 16-character chain-name hash in kube-proxy's alphabet (base32).
fn hash16(text: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut h: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    for b in text.bytes() {
        h ^= b as u128;
        h = h.wrapping_mul(0x0000_0000_0100_0000_0000_0000_0000_013b);
    }
    (0..16)
        .map(|i| ALPHABET[((h >> (i * 5)) & 31) as usize] as char)
        .collect()
}

/// A chain's endpoints, picked at random with kube-proxy's probabilities
/// (1/n, then 1/(n-1), ...), each to its KUBE-SEP chain.
fn iptables_endpoint_jumps(rules: &mut String, chain: &str, port_name: &str, seps: &[(String, Ipv4Addr, u16)]) {
    let n = seps.len();
    for (i, (sep, ip, port)) in seps.iter().enumerate() {
        let comment = format!("-m comment --comment \"{port_name} -> {ip}:{port}\"");
        if i + 1 < n {
            let probability = 1.0 / (n - i) as f64;
            let _ = writeln!(
                rules,
                "-A {chain} {comment} -m statistic --mode random --probability {probability:.11} -j {sep}"
            );
        } else {
            let _ = writeln!(rules, "-A {chain} {comment} -j {sep}");
        }
    }
}

pub fn iptables_restore(services: &[RuleService]) -> String {
    let mut chains = String::new();
    let mut rules = String::new();
    // Behind every ClusterIP rule, as kube-proxy orders them.
    let mut nodeports = String::new();
    let mut firewall = String::new();
    for svc in services {
        let proto = svc.protocol;
        let port_name = format!("default/{}:http", svc.name);
        let hash = hash16(&format!("{port_name}{proto}"));
        let svc_chain = format!("KUBE-SVC-{hash}");
        let _ = writeln!(chains, ":{svc_chain} - [0:0]");
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -d {}/32 -p {proto} -m comment --comment \"{port_name} cluster IP\" -m {proto} --dport {} -j {svc_chain}",
            svc.vip, svc.port
        );
        let _ = writeln!(
            rules,
            "-A {svc_chain} ! -s {CLUSTER_CIDR} -d {}/32 -p {proto} -m comment --comment \"{port_name} cluster IP\" -m {proto} --dport {} -j KUBE-MARK-MASQ",
            svc.vip, svc.port
        );
        let mut seps = Vec::new();
        for &(ip, port) in &svc.endpoints {
            let sep = format!("KUBE-SEP-{}", hash16(&format!("{port_name}{proto}{ip}:{port}")));
            let _ = writeln!(chains, ":{sep} - [0:0]");
            let _ = writeln!(
                rules,
                "-A {sep} -s {ip}/32 -m comment --comment \"{port_name}\" -j KUBE-MARK-MASQ"
            );
            let _ = writeln!(
                rules,
                "-A {sep} -p {proto} -m comment --comment \"{port_name}\" -m {proto} -j DNAT --to-destination {ip}:{port}"
            );
            seps.push((sep, ip, port));
        }
        iptables_endpoint_jumps(&mut rules, &svc_chain, &port_name, &seps);
        if svc.node_port.is_none() && svc.load_balancer_ip.is_none() {
            continue;
        }
        // Traffic from outside: KUBE-EXT, which masquerades (Cluster) or
        // keeps to this node's endpoints (Local).
        let ext_chain = format!("KUBE-EXT-{hash}");
        let _ = writeln!(chains, ":{ext_chain} - [0:0]");
        match &svc.local_endpoints {
            None => {
                let _ = writeln!(
                    rules,
                    "-A {ext_chain} -m comment --comment \"masquerade traffic for {port_name} external destinations\" -j KUBE-MARK-MASQ"
                );
                let _ = writeln!(rules, "-A {ext_chain} -j {svc_chain}");
            }
            Some(local) => {
                let svl_chain = format!("KUBE-SVL-{hash}");
                let _ = writeln!(chains, ":{svl_chain} - [0:0]");
                let _ = writeln!(
                    rules,
                    "-A {ext_chain} -s {CLUSTER_CIDR} -m comment --comment \"pod traffic for {port_name} external destinations\" -j {svc_chain}"
                );
                let _ = writeln!(
                    rules,
                    "-A {ext_chain} -m comment --comment \"masquerade LOCAL traffic for {port_name} external destinations\" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ"
                );
                let _ = writeln!(
                    rules,
                    "-A {ext_chain} -m comment --comment \"route LOCAL traffic for {port_name} external destinations\" -m addrtype --src-type LOCAL -j {svc_chain}"
                );
                let _ = writeln!(rules, "-A {ext_chain} -j {svl_chain}");
                let local_seps: Vec<_> = seps
                    .iter()
                    .filter(|(_, ip, port)| local.contains(&(*ip, *port)))
                    .cloned()
                    .collect();
                iptables_endpoint_jumps(&mut rules, &svl_chain, &port_name, &local_seps);
            }
        }
        if let Some(node_port) = svc.node_port {
            let _ = writeln!(
                nodeports,
                "-A KUBE-NODEPORTS -p {proto} -m comment --comment \"{port_name}\" -m {proto} --dport {node_port} -j {ext_chain}"
            );
        }
        if let Some(lb) = svc.load_balancer_ip {
            // With source ranges, the load balancer IP's traffic goes
            // through KUBE-FW, which sends the admitted sources on to
            // KUBE-EXT (DNAT); the rest keeps the load balancer IP as its
            // destination and meets the filter table's DROP.
            let target = if svc.source_ranges.is_empty() {
                ext_chain.clone()
            } else {
                format!("KUBE-FW-{hash}")
            };
            let _ = writeln!(
                rules,
                "-A KUBE-SERVICES -d {lb}/32 -p {proto} -m comment --comment \"{port_name} loadbalancer IP\" -m {proto} --dport {} -j {target}",
                svc.port
            );
            if !svc.source_ranges.is_empty() {
                let _ = writeln!(chains, ":{target} - [0:0]");
                for range in &svc.source_ranges {
                    let _ = writeln!(
                        rules,
                        "-A {target} -s {range} -m comment --comment \"{port_name} loadbalancer IP\" -j {ext_chain}"
                    );
                }
                let _ = writeln!(
                    firewall,
                    "-A KUBE-PROXY-FIREWALL -m comment --comment \"{port_name} traffic not accepted by {target}\" -m {proto} -p {proto} -d {lb}/32 --dport {} -j DROP",
                    svc.port
                );
            }
        }
    }
    format!(
        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-FORWARD - [0:0]\n:KUBE-PROXY-FIREWALL - [0:0]\n\
         -A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
         -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
         -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
         -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
         {firewall}\
         COMMIT\n\
         *nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n\
         :KUBE-SERVICES - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n:KUBE-NODEPORTS - [0:0]\n{chains}\
         -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n\
         {rules}\
         -A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n\
         {nodeports}\
         COMMIT\n"
    )
}

pub fn nft_script(services: &[RuleService]) -> String {
    let mut out = String::from(
        "add table ip kube-proxy { comment \"rules for kube-proxy\" ; }\n\
         add chain ip kube-proxy mark-for-masquerade\n\
         add rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000\n\
         add chain ip kube-proxy masquerading\n\
         add rule ip kube-proxy masquerading mark and 0x4000 == 0 return\n\
         add rule ip kube-proxy masquerading mark set mark xor 0x4000\n\
         add rule ip kube-proxy masquerading masquerade fully-random\n\
         add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }\n\
         add map ip kube-proxy service-nodeports { type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }\n\
         add map ip kube-proxy no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict ; }\n\
         add map ip kube-proxy firewall-ips { type ipv4_addr . inet_proto . inet_service : verdict ; }\n\
         add set ip kube-proxy cluster-ips { type ipv4_addr ; comment \"Active ClusterIPs\" ; }\n\
         add chain ip kube-proxy services\n\
         add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips\n\
         add rule ip kube-proxy services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports\n\
         add chain ip kube-proxy firewall-check\n\
         add rule ip kube-proxy firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips\n\
         add chain ip kube-proxy service-endpoints-check\n\
         add rule ip kube-proxy service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services\n\
         add chain ip kube-proxy cluster-ips-check\n\
         add rule ip kube-proxy cluster-ips-check ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\"\n",
    );
    let _ = writeln!(out, "add rule ip kube-proxy cluster-ips-check ip daddr {SERVICE_CIDR} drop comment \"Drop traffic to unallocated ClusterIPs\"");
    out.push_str(
        "add chain ip kube-proxy filter-prerouting { type filter hook prerouting priority -110 ; }\n\
         add rule ip kube-proxy filter-prerouting ct state new jump firewall-check\n\
         add chain ip kube-proxy filter-forward { type filter hook forward priority -110 ; }\n\
         add rule ip kube-proxy filter-forward ct state new jump service-endpoints-check\n\
         add rule ip kube-proxy filter-forward ct state new jump cluster-ips-check\n\
         add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }\n\
         add rule ip kube-proxy nat-prerouting jump services\n\
         add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }\n\
         add rule ip kube-proxy nat-output jump services\n\
         add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority 100 ; }\n\
         add rule ip kube-proxy nat-postrouting jump masquerading\n",
    );
    for svc in services {
        let proto = svc.protocol;
        let id = format!("default/{}/{proto}/http", svc.name);
        let hash = &hash16(&id)[..8];
        let chain = format!("service-{hash}-{id}");
        let _ = writeln!(out, "add chain ip kube-proxy {chain}");
        let _ = writeln!(
            out,
            "add rule ip kube-proxy {chain} ip daddr {} {proto} dport {} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
            svc.vip, svc.port
        );
        let mut endpoint_chains = Vec::new();
        for &(ip, port) in &svc.endpoints {
            let ep = format!(
                "endpoint-{}-{id}__{ip}/{port}",
                &hash16(&format!("{id}{ip}{port}"))[..8]
            );
            let _ = writeln!(out, "add chain ip kube-proxy {ep}");
            let _ = writeln!(
                out,
                "add rule ip kube-proxy {ep} ip saddr {ip} jump mark-for-masquerade"
            );
            let _ = writeln!(
                out,
                "add rule ip kube-proxy {ep} meta l4proto {proto} dnat to {ip}:{port}"
            );
            endpoint_chains.push((ep, ip, port));
        }
        let random_vmap = |chains: &[&(String, Ipv4Addr, u16)]| {
            let choices: Vec<String> = chains
                .iter()
                .enumerate()
                .map(|(i, (ep, _, _))| format!("{i} : goto {ep}"))
                .collect();
            format!("numgen random mod {} vmap {{ {} }}", choices.len(), choices.join(" , "))
        };
        let all: Vec<_> = endpoint_chains.iter().collect();
        let _ = writeln!(out, "add rule ip kube-proxy {chain} {}", random_vmap(&all));
        let _ = writeln!(out, "add element ip kube-proxy cluster-ips {{ {} }}", svc.vip);
        let _ = writeln!(
            out,
            "add element ip kube-proxy service-ips {{ {} . {proto} . {} : goto {chain} }}",
            svc.vip, svc.port
        );
        if svc.node_port.is_none() && svc.load_balancer_ip.is_none() {
            continue;
        }
        let external = format!("external-{hash}-{id}");
        let _ = writeln!(out, "add chain ip kube-proxy {external}");
        match &svc.local_endpoints {
            None => {
                let _ = writeln!(out, "add rule ip kube-proxy {external} jump mark-for-masquerade");
                let _ = writeln!(out, "add rule ip kube-proxy {external} goto {chain}");
            }
            Some(local) => {
                let _ = writeln!(
                    out,
                    "add rule ip kube-proxy {external} ip saddr {CLUSTER_CIDR} goto {chain} comment \"short-circuit pod traffic\""
                );
                let _ = writeln!(
                    out,
                    "add rule ip kube-proxy {external} fib saddr type local jump mark-for-masquerade comment \"masquerade local traffic\""
                );
                let _ = writeln!(
                    out,
                    "add rule ip kube-proxy {external} fib saddr type local goto {chain} comment \"short-circuit local traffic\""
                );
                let local_chains: Vec<_> = endpoint_chains
                    .iter()
                    .filter(|(_, ip, port)| local.contains(&(*ip, *port)))
                    .collect();
                let _ = writeln!(out, "add rule ip kube-proxy {external} {}", random_vmap(&local_chains));
            }
        }
        if let Some(node_port) = svc.node_port {
            let _ = writeln!(
                out,
                "add element ip kube-proxy service-nodeports {{ {proto} . {node_port} : goto {external} }}"
            );
        }
        if let Some(lb) = svc.load_balancer_ip {
            let _ = writeln!(
                out,
                "add element ip kube-proxy service-ips {{ {lb} . {proto} . {} : goto {external} }}",
                svc.port
            );
            if !svc.source_ranges.is_empty() {
                let firewall = format!("firewall-{hash}-{id}");
                let _ = writeln!(out, "add chain ip kube-proxy {firewall}");
                let _ = writeln!(
                    out,
                    "add rule ip kube-proxy {firewall} ip saddr != {{ {} }} drop",
                    svc.source_ranges.join(", ")
                );
                let _ = writeln!(
                    out,
                    "add element ip kube-proxy firewall-ips {{ {lb} . {proto} . {} : goto {firewall} }}",
                    svc.port
                );
            }
        }
    }
    out
}
