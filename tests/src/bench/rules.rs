//! kube-proxy's own rule layouts, to compare against on the same machine in
//! the same run: the iptables mode's chains (KUBE-SERVICES -> KUBE-SVC-* ->
//! KUBE-SEP-*, random probabilities, DNAT) as `iptables-restore` input, and
//! the nftables mode's table (a service-ips verdict map, per-service chains
//! with `numgen random`, per-endpoint chains with `dnat`) as `nft -f` input.
use std::{fmt::Write, net::Ipv4Addr};

pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
pub const SERVICE_CIDR: &str = "10.96.0.0/12";

pub struct RuleService {
    pub name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub endpoints: Vec<(Ipv4Addr, u16)>,
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

pub fn iptables_restore(services: &[RuleService]) -> String {
    let mut chains = String::new();
    let mut rules = String::new();
    for svc in services {
        let port_name = format!("default/{}:http", svc.name);
        let svc_chain = format!("KUBE-SVC-{}", hash16(&format!("{port_name}tcp")));
        let _ = writeln!(chains, ":{svc_chain} - [0:0]");
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"{port_name} cluster IP\" -m tcp --dport {} -j {svc_chain}",
            svc.vip, svc.port
        );
        let _ = writeln!(
            rules,
            "-A {svc_chain} ! -s {CLUSTER_CIDR} -d {}/32 -p tcp -m comment --comment \"{port_name} cluster IP\" -m tcp --dport {} -j KUBE-MARK-MASQ",
            svc.vip, svc.port
        );
        let n = svc.endpoints.len();
        for (i, (ip, port)) in svc.endpoints.iter().enumerate() {
            let sep = format!("KUBE-SEP-{}", hash16(&format!("{port_name}tcp{ip}:{port}")));
            let _ = writeln!(chains, ":{sep} - [0:0]");
            let comment = format!("-m comment --comment \"{port_name} -> {ip}:{port}\"");
            if i + 1 < n {
                let probability = 1.0 / (n - i) as f64;
                let _ = writeln!(
                    rules,
                    "-A {svc_chain} {comment} -m statistic --mode random --probability {probability:.11} -j {sep}"
                );
            } else {
                let _ = writeln!(rules, "-A {svc_chain} {comment} -j {sep}");
            }
            let _ = writeln!(
                rules,
                "-A {sep} -s {ip}/32 -m comment --comment \"{port_name}\" -j KUBE-MARK-MASQ"
            );
            let _ = writeln!(
                rules,
                "-A {sep} -p tcp -m comment --comment \"{port_name}\" -m tcp -j DNAT --to-destination {ip}:{port}"
            );
        }
    }
    format!(
        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-FORWARD - [0:0]\n\
         -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
         -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
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
        let id = format!("default/{}/tcp/http", svc.name);
        let chain = format!("service-{}-{id}", &hash16(&id)[..8]);
        let _ = writeln!(out, "add chain ip kube-proxy {chain}");
        let _ = writeln!(
            out,
            "add rule ip kube-proxy {chain} ip daddr {} tcp dport {} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
            svc.vip, svc.port
        );
        let mut vmap = Vec::new();
        for (i, (ip, port)) in svc.endpoints.iter().enumerate() {
            let ep = format!(
                "endpoint-{}-{id}__{ip}/{port}",
                &hash16(&format!("{id}{ip}{port}"))[..8]
            );
            let _ = writeln!(out, "add chain ip kube-proxy {ep}");
            let _ = writeln!(
                out,
                "add rule ip kube-proxy {ep} ip saddr {ip} jump mark-for-masquerade"
            );
            let _ = writeln!(out, "add rule ip kube-proxy {ep} meta l4proto tcp dnat to {ip}:{port}");
            vmap.push(format!("{i} : goto {ep}"));
        }
        let _ = writeln!(
            out,
            "add rule ip kube-proxy {chain} numgen random mod {} vmap {{ {} }}",
            vmap.len(),
            vmap.join(" , ")
        );
        let _ = writeln!(out, "add element ip kube-proxy cluster-ips {{ {} }}", svc.vip);
        let _ = writeln!(
            out,
            "add element ip kube-proxy service-ips {{ {} . tcp . {} : goto {chain} }}",
            svc.vip, svc.port
        );
    }
    out
}
