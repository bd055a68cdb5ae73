//! deploy/: every manifest (and every kustomize rendering) is a valid
//! Kubernetes object with no field the API would drop, the RBAC only reads,
//! and the capabilities the DaemonSet gives the daemon instead of
//! `privileged` are enough to run it: the daemon is started with exactly
//! those and serves every path.
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, Container, Probe, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use kpr_testbed::{
    cluster::node_ip,
    manifests::Exposure,
    netns::Netns,
    pod::{connect, http_get},
    Cluster, ClusterSpec,
};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// The YAML files of deploy/ that hold Kubernetes objects: all but the
/// kustomizations and kind's own cluster configuration.
fn manifest_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            manifest_files(&path, found);
        } else if path.extension().is_some_and(|e| e == "yaml")
            && path.file_name().is_some_and(|n| n != "kustomization.yaml")
            && !path.ends_with("kind/cluster.yaml")
        {
            found.push(path);
        }
    }
}

fn kustomize(dir: &str) -> String {
    let out = Command::new("kubectl")
        .args(["kustomize"])
        .arg(deploy_dir().join(dir))
        .output()
        .expect("kubectl");
    assert!(
        out.status.success(),
        "kubectl kustomize deploy/{dir}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `doc` as a `T`, failing on any field `T` does not have: the typed value,
/// written back, must be the document itself.
fn strict<T: DeserializeOwned + Serialize>(doc: &Value, origin: &str) -> T {
    let typed: T = serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{origin}: {e}"));
    let back = serde_json::to_value(&typed).unwrap();
    if let Some(path) = first_difference(doc, &back, String::new()) {
        panic!("{origin}: {path}: a field the object's type does not have (or a value it reads otherwise)");
    }
    typed
}

/// Where `written` and `parsed` first differ, as a path of keys.
fn first_difference(written: &Value, parsed: &Value, path: String) -> Option<String> {
    match (written, parsed) {
        (Value::Object(w), Value::Object(p)) => {
            let keys: BTreeSet<&String> = w.keys().chain(p.keys()).collect();
            keys.into_iter().find_map(|k| match (w.get(k), p.get(k)) {
                (Some(a), Some(b)) => first_difference(a, b, format!("{path}.{k}")),
                _ => Some(format!("{path}.{k}")),
            })
        }
        (Value::Array(w), Value::Array(p)) if w.len() == p.len() => w
            .iter()
            .zip(p)
            .enumerate()
            .find_map(|(i, (a, b))| first_difference(a, b, format!("{path}[{i}]"))),
        _ => (written != parsed).then_some(path),
    }
}

#[derive(Default)]
struct Objects {
    daemonsets: Vec<(String, DaemonSet)>,
    cluster_roles: Vec<(String, ClusterRole)>,
    config_maps: Vec<(String, ConfigMap)>,
    /// `deploy/uninstall`'s DaemonSet.
    uninstallers: Vec<(String, DaemonSet)>,
}

fn parse_all(text: &str, origin: &str, objects: &mut Objects) {
    for doc in serde_yaml::Deserializer::from_str(text) {
        let yaml = serde_yaml::Value::deserialize(doc).unwrap_or_else(|e| panic!("{origin}: {e}"));
        if yaml.is_null() {
            continue;
        }
        let doc: Value = serde_json::to_value(yaml).unwrap();
        let kind = doc["kind"].as_str().unwrap_or_else(|| panic!("{origin}: no kind"));
        let origin = format!("{origin} ({kind} {})", doc["metadata"]["name"]);
        match kind {
            "ServiceAccount" => drop(strict::<ServiceAccount>(&doc, &origin)),
            "ClusterRoleBinding" => drop(strict::<ClusterRoleBinding>(&doc, &origin)),
            "ClusterRole" => objects.cluster_roles.push((origin.clone(), strict(&doc, &origin))),
            "ConfigMap" => objects.config_maps.push((origin.clone(), strict(&doc, &origin))),
            "DaemonSet" if doc["metadata"]["name"] == "kpr-uninstall" => {
                objects.uninstallers.push((origin.clone(), strict(&doc, &origin)))
            }
            "DaemonSet" => objects.daemonsets.push((origin.clone(), strict(&doc, &origin))),
            other => panic!("{origin}: unexpected kind {other}"),
        }
    }
}

fn daemon_container(daemonset: &DaemonSet) -> &Container {
    let spec = daemonset.spec.template.spec.as_ref().unwrap();
    spec.containers
        .iter()
        .find(|c| c.name == "kpr")
        .expect("a kpr container")
}

/// The capabilities the base DaemonSet gives the daemon.
fn daemon_capabilities() -> Vec<String> {
    let text = std::fs::read_to_string(deploy_dir().join("base/daemonset.yaml")).unwrap();
    let mut objects = Objects::default();
    parse_all(&text, "base/daemonset.yaml", &mut objects);
    let container = daemon_container(&objects.daemonsets[0].1);
    let security = container.security_context.as_ref().unwrap();
    assert_eq!(security.privileged, Some(false));
    let capabilities = security.capabilities.as_ref().unwrap();
    assert_eq!(
        capabilities.drop,
        Some(vec!["ALL".to_string()]),
        "everything else dropped"
    );
    capabilities.add.clone().unwrap()
}

#[test]
fn every_manifest_is_a_valid_object_and_the_rbac_only_reads() {
    let mut objects = Objects::default();
    let mut files = Vec::new();
    manifest_files(&deploy_dir(), &mut files);
    assert!(files.len() >= 4, "{files:?}");
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        parse_all(&text, &file.display().to_string(), &mut objects);
    }
    for overlay in ["", "kind", "privileged", "replace-kube-proxy", "uninstall"] {
        parse_all(
            &kustomize(overlay),
            &format!("kubectl kustomize deploy/{overlay}"),
            &mut objects,
        );
    }
    // Every source and rendering has its DaemonSet.
    assert_eq!(
        objects.daemonsets.len(),
        1 + 4,
        "{:?}",
        objects.daemonsets.iter().map(|d| &d.0).collect::<Vec<_>>()
    );

    let reads: BTreeSet<&str> = ["get", "list", "watch"].into();
    for (origin, role) in &objects.cluster_roles {
        for rule in role.rules.as_deref().unwrap_or_default() {
            let events_only = rule
                .resources
                .as_deref()
                .is_some_and(|r| r.iter().all(|r| r == "events"));
            for verb in &rule.verbs {
                let allowed = reads.contains(verb.as_str()) || (events_only && (verb == "create" || verb == "patch"));
                assert!(allowed, "{origin}: verb {verb} on {:?}", rule.resources);
            }
        }
    }

    for (origin, daemonset) in &objects.daemonsets {
        let spec = daemonset.spec.template.spec.as_ref().unwrap();
        assert_eq!(spec.host_network, Some(true), "{origin}");
        assert_eq!(
            spec.priority_class_name.as_deref(),
            Some("system-node-critical"),
            "{origin}"
        );
        let container = daemon_container(daemonset);
        let probe_path = |p: &Option<Probe>| {
            p.as_ref()
                .and_then(|p| p.http_get.as_ref())
                .and_then(|h| h.path.clone())
        };
        assert_eq!(
            probe_path(&container.readiness_probe).as_deref(),
            Some("/healthz"),
            "{origin}"
        );
        assert_eq!(
            probe_path(&container.liveness_probe).as_deref(),
            Some("/livez"),
            "{origin}"
        );
        let resources = container.resources.as_ref().unwrap();
        assert!(resources.requests.is_some() && resources.limits.is_some(), "{origin}");
        // kube-proxy's rules are removed only where asked, and by the
        // daemon once it has taken over their connections: never before it
        // runs (an init container), which would drop them.
        let cleans_up = container.args.iter().flatten().any(|a| a == "--cleanup-kube-proxy");
        assert_eq!(cleans_up, origin.contains("replace-kube-proxy"), "{origin}");
        assert!(
            !spec
                .init_containers
                .iter()
                .flatten()
                .any(|c| c.args.iter().flatten().any(|a| a.contains("cleanup"))),
            "{origin}: no cleanup before the daemon runs"
        );
        let adds = |cap: &str| {
            container
                .security_context
                .as_ref()
                .and_then(|s| s.capabilities.as_ref())
                .and_then(|c| c.add.as_ref())
                .is_some_and(|a| a.iter().any(|c| c == cap))
        };
        if cleans_up {
            assert!(
                adds("NET_ADMIN") && adds("NET_RAW"),
                "{origin}: iptables-restore and nft need them"
            );
        }
        let privileged = container.security_context.as_ref().and_then(|s| s.privileged);
        assert_eq!(
            privileged,
            Some(origin.contains("privileged")),
            "{origin}: privileged only in the privileged overlay"
        );
    }
    // The kind overlay points the daemon at kind's API server.
    let kind_host: Vec<&str> = objects
        .config_maps
        .iter()
        .filter(|(origin, _)| origin.contains("deploy/kind"))
        .filter_map(|(_, c)| c.data.as_ref()?.get("KUBERNETES_SERVICE_HOST").map(String::as_str))
        .collect();
    assert_eq!(kind_host, vec!["kind-control-plane"]);

    // deploy/uninstall: on every node, `kpr uninstall` on the pin directory
    // the daemon uses, unprivileged.
    assert_eq!(objects.uninstallers.len(), 2, "the file and its rendering");
    let daemon_pin_dir = daemon_container(&objects.daemonsets[0].1)
        .args
        .iter()
        .flatten()
        .find(|a| a.starts_with("--pin-dir="))
        .cloned()
        .unwrap();
    for (origin, daemonset) in &objects.uninstallers {
        let spec = daemonset.spec.template.spec.as_ref().unwrap();
        assert!(
            spec.tolerations
                .iter()
                .flatten()
                .any(|t| t.operator.as_deref() == Some("Exists")),
            "{origin}: every node, tainted or not"
        );
        let init = &spec.init_containers.as_ref().unwrap()[0];
        assert_eq!(
            init.args.clone().unwrap(),
            vec![daemon_pin_dir.clone(), "uninstall".to_string()],
            "{origin}"
        );
        for c in spec.containers.iter().chain(spec.init_containers.iter().flatten()) {
            let security = c.security_context.as_ref().unwrap();
            assert_ne!(security.privileged, Some(true), "{origin}");
            let dropped = security.capabilities.as_ref().and_then(|c| c.drop.clone());
            assert_eq!(dropped, Some(vec!["ALL".to_string()]), "{origin}");
        }
    }
}

/// `cargo xtask kind-test` cannot run here (no Docker), but what it
/// deploys is checked as the manifests above: valid objects, no unknown
/// field, and the Services its checks address.
#[test]
fn the_kind_tests_workload_is_valid() {
    use k8s_openapi::api::{
        apps::v1::Deployment,
        core::v1::{Namespace, Pod, Service},
    };
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("kind/workload.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut services = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let doc: Value = serde_json::to_value(serde_yaml::Value::deserialize(doc).unwrap()).unwrap();
        let origin = format!("{} ({} {})", path.display(), doc["kind"], doc["metadata"]["name"]);
        match doc["kind"].as_str().unwrap() {
            "Namespace" => drop(strict::<Namespace>(&doc, &origin)),
            "Deployment" => drop(strict::<Deployment>(&doc, &origin)),
            "Pod" => drop(strict::<Pod>(&doc, &origin)),
            "Service" => services.push(strict::<Service>(&doc, &origin)),
            other => panic!("{origin}: unexpected kind {other}"),
        }
    }
    let shape: BTreeSet<String> = services
        .iter()
        .map(|s| {
            let spec = s.spec.as_ref().unwrap();
            format!(
                "{} type={} nodePort={} eTP={} affinity={}",
                s.metadata.name.as_deref().unwrap(),
                spec.type_.as_deref().unwrap_or("-"),
                spec.ports.as_ref().unwrap()[0].node_port.unwrap_or(0),
                spec.external_traffic_policy.as_deref().unwrap_or("-"),
                spec.session_affinity.as_deref().unwrap_or("-"),
            )
        })
        .collect();
    let want: BTreeSet<String> = [
        "web type=- nodePort=0 eTP=- affinity=-",
        "web-nodeport type=NodePort nodePort=30080 eTP=- affinity=-",
        "web-lb type=LoadBalancer nodePort=30082 eTP=- affinity=-",
        "web-sticky type=- nodePort=0 eTP=- affinity=ClientIP",
        "web-local type=NodePort nodePort=30081 eTP=Local affinity=-",
    ]
    .map(String::from)
    .into();
    assert_eq!(shape, want, "the Services xtask/src/kind.rs addresses");
}

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 93);
const NODE_PORT: u16 = 30093;

/// CAP_* bits as /proc/<pid>/status shows them.
fn capability_bit(name: &str) -> u64 {
    let bit = match name {
        "NET_ADMIN" => 12,
        "SYS_ADMIN" => 21,
        "PERFMON" => 38,
        "BPF" => 39,
        other => panic!("capability {other} not known to this test"),
    };
    1 << bit
}

fn effective_capabilities(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("CapEff:")).unwrap();
    u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
}

#[test]
fn the_daemonsets_capabilities_are_all_the_daemon_needs() {
    let capabilities = daemon_capabilities();
    let bounding = std::iter::once("-all".to_string())
        .chain(capabilities.iter().map(|c| format!("+{}", c.to_lowercase())))
        .collect::<Vec<_>>()
        .join(",");
    let mut spec = ClusterSpec::pods("web", 2);
    spec.pods.push("client".into());
    spec.daemon = false;
    let mut cluster = Cluster::start(spec).unwrap();
    // Root with only these capabilities: none inherited, none beyond the
    // bounding set.
    cluster.daemon_wrapper = ["setpriv", "--inh-caps=-all", "--bounding-set", &bounding]
        .map(String::from)
        .to_vec();
    cluster.start_daemon_on(0, &[]).unwrap();
    let pid = cluster.daemon_pid().unwrap();
    let want: u64 = capabilities.iter().map(|c| capability_bit(c)).sum();
    assert_eq!(
        effective_capabilities(pid),
        want,
        "the daemon runs with exactly {capabilities:?}"
    );

    let exposure = Exposure {
        type_: Some("NodePort"),
        node_ports: &[NODE_PORT, 30094],
        ..Exposure::default()
    };
    cluster.serve_web(VIP, &exposure, &["web-0", "web-1"]).unwrap();
    // Per packet, from a pod; from outside, through the NodePort; and at
    // connect(), from processes of the node's cgroup.
    answered(&cluster.pod("client").ns, SocketAddr::from((VIP, 80)));
    answered(cluster.outside(), SocketAddr::from((node_ip(0), NODE_PORT)));
    let socket: BTreeSet<String> = cluster
        .socket_clients(&cluster.pod("client").ns, SocketAddr::from((VIP, 80)), 4)
        .unwrap()
        .into_iter()
        .map(|r| r.unwrap().0.pod)
        .collect();
    assert_eq!(socket, pods_set(&["web-0", "web-1"]), "at connect()");
    // The probes' endpoints answer.
    for path in ["/healthz", "/livez"] {
        let (status, _) = http_get(cluster.node(), "127.0.0.1:10256".parse().unwrap(), path).unwrap();
        assert_eq!(status, 200, "{path}");
    }
    let log = cluster.nodes[0].log();
    assert!(!log.contains("ERROR"), "{log}");
}

/// Four new connections from `ns` to `to` reach both pods.
fn answered(ns: &Netns, to: SocketAddr) {
    let pods: BTreeSet<String> = (0..4)
        .map(|_| connect(ns, to).unwrap().request().unwrap().pod)
        .collect();
    assert_eq!(pods, pods_set(&["web-0", "web-1"]), "to {to}");
}

fn pods_set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| n.to_string()).collect()
}

/// The DaemonSet's optional init step (`kpr cleanup-kube-proxy`) on a node
/// holding kube-proxy's rules in both layouts beside the kubelet's chain
/// and a CNI's rules: kube-proxy's chains, the jumps to them and its
/// nftables table go; everything else stays.
#[test]
fn cleanup_removes_kube_proxys_rules_and_nothing_else() {
    use kpr_testbed::bench::rules::{iptables_restore, nft_script, RuleService};
    let ns = Netns::new(&kpr_testbed::unique_id()).unwrap();
    let mut nodeport = RuleService::cluster_ip(
        "web".into(),
        Ipv4Addr::new(10, 96, 0, 10),
        80,
        vec![
            (Ipv4Addr::new(10, 244, 0, 5), 8080),
            (Ipv4Addr::new(10, 244, 1, 5), 8080),
        ],
    );
    nodeport.node_port = Some(30080);
    nodeport.load_balancer_ip = Some(Ipv4Addr::new(203, 0, 113, 10));
    nodeport.source_ranges = vec!["198.51.100.0/24".into()];
    let services = [
        RuleService::cluster_ip(
            "dns".into(),
            Ipv4Addr::new(10, 96, 0, 53),
            53,
            vec![(Ipv4Addr::new(10, 244, 0, 9), 53)],
        ),
        nodeport,
    ];
    ns.exec("iptables-restore", &[], &iptables_restore(&services)).unwrap();
    ns.exec("nft", &["-f", "-"], &nft_script(&services)).unwrap();
    // Others' rules: the kubelet's chain, a CNI's masquerade, a plain rule.
    let others = "*filter\n:KUBE-FIREWALL - [0:0]\n-A INPUT -j KUBE-FIREWALL\n-A KUBE-FIREWALL -m mark --mark 0x8000/0x8000 -j DROP\n-A INPUT -p tcp --dport 22 -j ACCEPT\nCOMMIT\n*nat\n:CNI-NAT - [0:0]\n-A POSTROUTING -j CNI-NAT\n-A CNI-NAT -s 10.244.0.0/16 ! -d 10.244.0.0/16 -j MASQUERADE\nCOMMIT\n";
    ns.exec("iptables-restore", &["--noflush"], others).unwrap();
    // A node may also hold rules of the other iptables front-end (legacy),
    // and IPv6 ones (dual-stack): kube-proxy's go there too, others stay.
    let legacy = "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-LEGACY - [0:0]\n:LEGACY-OTHER - [0:0]\n-A PREROUTING -j KUBE-SERVICES\n-A KUBE-SERVICES -d 10.96.0.11/32 -p tcp -j KUBE-SVC-LEGACY\n-A PREROUTING -j LEGACY-OTHER\nCOMMIT\n";
    ns.exec("iptables-legacy-restore", &["--noflush"], legacy).unwrap();
    let six = "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-SIX - [0:0]\n-A PREROUTING -j KUBE-SERVICES\n-A KUBE-SERVICES -d fd00::10/128 -p tcp -j KUBE-SVC-SIX\nCOMMIT\n";
    ns.exec("ip6tables-restore", &["--noflush"], six).unwrap();
    let before = ns.exec("iptables-save", &[], "").unwrap();
    assert!(
        before.contains("KUBE-SVC-") && before.contains("KUBE-NODEPORTS"),
        "{before}"
    );

    let kpr = kpr_testbed::cluster::kpr_binary().unwrap();
    let kpr = kpr.to_str().unwrap();
    let report = ns.exec(kpr, &["cleanup-kube-proxy"], "").unwrap();
    assert!(report.contains("ip kube-proxy"), "{report}");

    let after = ns.exec("iptables-save", &[], "").unwrap();
    let kube_proxys: Vec<&str> = after
        .lines()
        .filter(|l| l.contains("KUBE-") && !l.contains("KUBE-FIREWALL"))
        .collect();
    assert!(kube_proxys.is_empty(), "left: {kube_proxys:?}\n{after}");
    for kept in [
        "-A INPUT -j KUBE-FIREWALL",
        "-A KUBE-FIREWALL -m mark --mark 0x8000/0x8000 -j DROP",
        "-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT",
        "-A POSTROUTING -j CNI-NAT",
        "-A CNI-NAT -s 10.244.0.0/16 ! -d 10.244.0.0/16 -j MASQUERADE",
    ] {
        assert!(after.lines().any(|l| l == kept), "{kept} kept:\n{after}");
    }
    let legacy_after = ns.exec("iptables-legacy-save", &[], "").unwrap();
    assert!(!legacy_after.contains("KUBE-"), "{legacy_after}");
    assert!(legacy_after.contains("-A PREROUTING -j LEGACY-OTHER"), "{legacy_after}");
    let six_after = ns.exec("ip6tables-save", &[], "").unwrap();
    assert!(!six_after.contains("KUBE-"), "{six_after}");
    let tables = ns.exec("nft", &["list", "tables"], "").unwrap();
    assert!(!tables.contains("kube-proxy"), "{tables}");
    // Run again: nothing left to do, and no error.
    let again = ns.exec(kpr, &["cleanup-kube-proxy"], "").unwrap();
    assert!(again.contains("removed 0 iptables chains"), "{again}");
}
