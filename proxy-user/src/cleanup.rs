//! `kpr cleanup-kube-proxy`: removes what kube-proxy left in the node's
//! netfilter rules when it is replaced, as `kube-proxy --cleanup` does —
//! its iptables chains (and the jumps to them from the built-in chains) and
//! its nftables table — and nothing else: chains other components own under
//! a KUBE- name (the kubelet's KUBE-FIREWALL, KUBE-KUBELET-CANARY) and
//! everyone else's rules stay. The iptables part is one `iptables-restore
//! --noflush` of deletions, so rules other programs add meanwhile are kept.
use std::{
    collections::BTreeSet,
    io::Write,
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

/// Whether kube-proxy creates (and so may remove) the chain `name`: its
/// fixed chains and its per-service and per-endpoint ones.
pub fn is_kube_proxy_chain(name: &str) -> bool {
    const FIXED: [&str; 10] = [
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
        "KUBE-FORWARD",
        "KUBE-PROXY-FIREWALL",
        "KUBE-PROXY-CANARY",
        "KUBE-LOAD-BALANCER",
        "KUBE-MARK-DROP-PROXY",
    ];
    const PER_SERVICE: [&str; 6] = [
        "KUBE-SVC-",
        "KUBE-SVL-",
        "KUBE-SEP-",
        "KUBE-EXT-",
        "KUBE-FW-",
        "KUBE-XLB-",
    ];
    FIXED.contains(&name) || PER_SERVICE.iter().any(|p| name.starts_with(p))
}

/// The target of an `-A` rule (`-j X` or `-g X`), if any.
fn jump_target(rule: &str) -> Option<&str> {
    let mut words = rule.split_whitespace();
    while let Some(word) = words.next() {
        if word == "-j" || word == "-g" {
            return words.next();
        }
    }
    None
}

/// From `iptables-save` output, the `iptables-restore --noflush` input that
/// removes kube-proxy's chains: per table, the rules of other chains that
/// jump to them, then the chains' rules (flush), then the chains. `None`
/// when there is nothing of kube-proxy's.
pub fn iptables_cleanup(saved: &str) -> Option<String> {
    let mut out = String::new();
    let mut table: Option<&str> = None;
    let (mut deletes, mut chains) = (Vec::new(), BTreeSet::new());
    for line in saved.lines() {
        if let Some(name) = line.strip_prefix('*') {
            table = Some(name);
        } else if line == "COMMIT" {
            if let Some(table) = table.take() {
                emit(table, &mut deletes, &mut chains, &mut out);
            }
        } else if let Some(declaration) = line.strip_prefix(':') {
            let chain = declaration.split_whitespace().next().unwrap_or_default();
            if is_kube_proxy_chain(chain) {
                chains.insert(chain.to_string());
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let chain = rule.split_whitespace().next().unwrap_or_default();
            // Rules inside kube-proxy's chains go with the flush; a rule of
            // another chain that leads into one is deleted by its text.
            if !is_kube_proxy_chain(chain) && jump_target(rule).is_some_and(is_kube_proxy_chain) {
                deletes.push(format!("-D {rule}"));
            }
        }
    }
    (!out.is_empty()).then_some(out)
}

/// One table's deletions, jumps first, then the chains' rules, then the
/// chains.
fn emit(table: &str, deletes: &mut Vec<String>, chains: &mut BTreeSet<String>, out: &mut String) {
    if deletes.is_empty() && chains.is_empty() {
        return;
    }
    out.push_str(&format!("*{table}\n"));
    for rule in deletes.drain(..) {
        out.push_str(&format!("{rule}\n"));
    }
    for chain in chains.iter() {
        out.push_str(&format!("-F {chain}\n"));
    }
    for chain in std::mem::take(chains) {
        out.push_str(&format!("-X {chain}\n"));
    }
    out.push_str("COMMIT\n");
}

fn run(program: &str, args: &[&str], input: Option<&str>) -> Result<String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {program} (is it installed?)"))?;
    if let Some(input) = input {
        child.stdin.take().expect("piped").write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What was removed.
#[derive(Debug, Default)]
pub struct Report {
    pub iptables_chains: usize,
    pub nftables_tables: Vec<String>,
}

/// The iptables front-ends kube-proxy may have written its rules with, by
/// family: the nftables-backed one and the legacy one (kube-proxy's image
/// picks whichever the node already uses, and a node may hold both), for
/// IPv4 and IPv6 (dual-stack). The plain name is the fallback where neither
/// variant is installed.
const IPTABLES_FAMILIES: [[&str; 3]; 2] = [
    ["iptables-nft", "iptables-legacy", "iptables"],
    ["ip6tables-nft", "ip6tables-legacy", "ip6tables"],
];

/// Removes kube-proxy's iptables chains and nftables tables from the
/// current network namespace.
pub fn cleanup_kube_proxy() -> Result<Report> {
    let mut report = Report::default();
    for (family, [nft, legacy, plain]) in IPTABLES_FAMILIES.into_iter().enumerate() {
        // A variant that is not installed, or whose tables this kernel
        // lacks, holds nothing of kube-proxy's.
        let saved: Vec<(&str, String)> = [nft, legacy]
            .into_iter()
            .filter_map(|tool| Some((tool, run(&format!("{tool}-save"), &[], None).ok()?)))
            .collect();
        let saved = match (saved.is_empty(), run(&format!("{plain}-save"), &[], None)) {
            (false, _) => saved,
            (true, Ok(text)) => vec![(plain, text)],
            // Without any IPv6 tool there are no IPv6 rules to remove.
            (true, Err(_)) if family > 0 => continue,
            (true, Err(e)) => return Err(e),
        };
        for (tool, text) in saved {
            if let Some(script) = iptables_cleanup(&text) {
                report.iptables_chains += script.lines().filter(|l| l.starts_with("-X ")).count();
                run(&format!("{tool}-restore"), &["--noflush"], Some(&script))
                    .with_context(|| format!("removing kube-proxy's chains with {tool}"))?;
            }
        }
    }
    // nft is optional: a node without it has no nftables kube-proxy either.
    if let Ok(tables) = run("nft", &["list", "tables"], None) {
        for family in ["ip", "ip6"] {
            if tables.lines().any(|l| l.trim() == format!("table {family} kube-proxy")) {
                run("nft", &["delete", "table", family, "kube-proxy"], None)?;
                report.nftables_tables.push(format!("{family} kube-proxy"));
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_kube_proxys_chains_are_its_own() {
        for (chain, own) in [
            ("KUBE-SERVICES", true),
            ("KUBE-SVC-ABCDEF0123456789", true),
            ("KUBE-SEP-ABCDEF0123456789", true),
            ("KUBE-EXT-ABCDEF0123456789", true),
            ("KUBE-NODEPORTS", true),
            ("KUBE-MARK-MASQ", true),
            ("KUBE-PROXY-FIREWALL", true),
            // The kubelet's.
            ("KUBE-FIREWALL", false),
            ("KUBE-KUBELET-CANARY", false),
            ("KUBE-MARK-DROP", false),
            ("CILIUM_POST_nat", false),
            ("POSTROUTING", false),
        ] {
            assert_eq!(is_kube_proxy_chain(chain), own, "{chain}");
        }
    }

    #[test]
    fn the_cleanup_deletes_kube_proxys_chains_and_the_jumps_to_them_only() {
        let saved = "\
# Generated by iptables-save
*nat
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-AAAA - [0:0]
:KUBE-SEP-BBBB - [0:0]
:KUBE-POSTROUTING - [0:0]
:CNI-NAT - [0:0]
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A PREROUTING -j CNI-NAT
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING
-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -j KUBE-SVC-AAAA
-A KUBE-SVC-AAAA -j KUBE-SEP-BBBB
-A KUBE-SEP-BBBB -p tcp -j DNAT --to-destination 10.244.0.5:8080
-A CNI-NAT -s 10.244.0.0/16 -j MASQUERADE
COMMIT
*filter
:INPUT ACCEPT [0:0]
:KUBE-FIREWALL - [0:0]
-A INPUT -j KUBE-FIREWALL
-A KUBE-FIREWALL -m mark --mark 0x8000/0x8000 -j DROP
COMMIT
";
        let script = iptables_cleanup(saved).unwrap();
        assert_eq!(
            script,
            "*nat\n\
             -D PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             -D POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
             -F KUBE-POSTROUTING\n-F KUBE-SEP-BBBB\n-F KUBE-SERVICES\n-F KUBE-SVC-AAAA\n\
             -X KUBE-POSTROUTING\n-X KUBE-SEP-BBBB\n-X KUBE-SERVICES\n-X KUBE-SVC-AAAA\n\
             COMMIT\n"
        );
        // Nothing of kube-proxy's: nothing to do.
        assert_eq!(iptables_cleanup("*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n"), None);
    }
}
