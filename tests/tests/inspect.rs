//! The inspection commands against a running daemon: what `kpr services`,
//! `kpr conntrack` and `kpr affinity` print (as JSON, and as tables) is
//! compared with what the test programmed and sent.
use std::{
    collections::{BTreeMap, BTreeSet},
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use kpr_testbed::{
    cluster::POD_PORT,
    manifests::Exposure,
    pod::{connect, http_get, Conn, Datagrams},
    Cluster, ClusterSpec,
};
use serde_json::Value;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 91);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 92);
const AFFINITY_SECS: u32 = 600;

fn at(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

fn kpr(cluster: &Cluster, args: &[&str]) -> String {
    cluster.kpr(args).unwrap()
}

/// A JSON list.
fn kpr_json(cluster: &Cluster, args: &[&str]) -> Vec<Value> {
    serde_json::from_value(cluster.kpr_json(args).unwrap()).unwrap()
}

fn field(value: &Value, name: &str) -> String {
    match &value[name] {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `n` TCP connections from the pod `client` to the service, each having
/// answered once: (client address, backend address) per connection, and
/// the connections, open.
fn open(cluster: &Cluster, client: &str, n: usize) -> (BTreeSet<(String, String)>, Vec<Conn>) {
    let mut sent = BTreeSet::new();
    let mut conns = Vec::new();
    for _ in 0..n {
        let mut conn = connect(&cluster.pod(client).ns, at(VIP, 80)).unwrap();
        let pod = conn.request().unwrap().pod;
        let backend = at(cluster.pod(&pod).ip, POD_PORT);
        sent.insert((conn.local_addr().to_string(), backend.to_string()));
        conns.push(conn);
    }
    (sent, conns)
}

fn tcp_flows(cluster: &Cluster, filter: &[&str]) -> Vec<Value> {
    let mut args = vec!["conntrack", "--service", "10.96.0.91:80"];
    args.extend_from_slice(filter);
    kpr_json(cluster, &args)
        .into_iter()
        .filter(|f| f["protocol"] == "TCP")
        .collect()
}

fn pairs(flows: &[Value]) -> BTreeSet<(String, String)> {
    flows
        .iter()
        .map(|f| (field(f, "client"), field(f, "backend")))
        .collect()
}

#[test]
fn the_inspection_commands_show_what_was_programmed_and_sent() {
    let mut spec = ClusterSpec::pods("web", 3);
    spec.pods.extend(["client-a".into(), "client-b".into()]);
    spec.daemon = false;
    let mut cluster = Cluster::start(spec).unwrap();
    cluster.start_daemon_on(0, &["--metrics-per-backend"]).unwrap();
    let exposure = Exposure {
        affinity_timeout: Some(AFFINITY_SECS),
        ..Exposure::default()
    };
    let backends = cluster.serve_web(VIP, &exposure, &["web-0", "web-1", "web-2"]).unwrap();
    // And a service without endpoints, which refuses new connections.
    cluster.serve_nothing("empty", EMPTY_VIP).unwrap();

    // services: the frontend as the manifest has it.
    let services = kpr_json(&cluster, &["services", "--service", "10.96.0.91:80"]);
    assert_eq!(services.len(), 1, "{services:?}");
    let service = &services[0];
    assert_eq!(service["kind"], "ClusterIP");
    assert_eq!(service["protocol"], "TCP");
    assert_eq!(service["affinity_timeout_secs"], AFFINITY_SECS);
    assert_eq!(service["rejecting"], false, "it has endpoints");
    let shown: BTreeSet<String> = service["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| field(b, "address"))
        .collect();
    let want: BTreeSet<String> = backends.iter().map(|b| b.to_string()).collect();
    assert_eq!(shown, want);
    for backend in service["backends"].as_array().unwrap() {
        assert_eq!(backend["state"], "ready", "{backend}");
        assert_eq!(backend["local"], true, "the pods run on this node: {backend}");
    }
    assert!(
        kpr(&cluster, &["services"]).contains("10.96.0.91:80"),
        "the table lists the frontend"
    );

    // By Service name, as the daemon named each frontend.
    assert_eq!(service["service"], "default/web");
    let frontends_of = |args: &[&str]| -> BTreeSet<String> {
        let mut all = vec!["services"];
        all.extend_from_slice(args);
        kpr_json(&cluster, &all)
            .iter()
            .map(|s| {
                format!(
                    "{} {}/{}",
                    field(s, "service"),
                    field(s, "frontend"),
                    field(s, "protocol")
                )
            })
            .collect()
    };
    let web: BTreeSet<String> = [
        "default/web 10.96.0.91:80/TCP".to_string(),
        "default/web 10.96.0.91:53/UDP".into(),
    ]
    .into();
    assert_eq!(frontends_of(&["web"]), web);
    assert_eq!(frontends_of(&["-n", "default", "web"]), web);
    assert_eq!(
        frontends_of(&["-n", "default"]),
        web.iter()
            .cloned()
            .chain(["default/empty 10.96.0.92:80/TCP".to_string()])
            .collect()
    );
    assert!(frontends_of(&["-n", "kube-system"]).is_empty());
    assert!(frontends_of(&["web-0"]).is_empty(), "a name is matched whole");
    let named_table = kpr(&cluster, &["services", "empty"]);
    assert!(
        named_table
            .lines()
            .any(|l| l.starts_with("default/empty ") && l.contains("10.96.0.92:80")),
        "{named_table}"
    );
    // Without the daemon's answer, names cannot be filtered on: said, not guessed.
    let unreachable = cluster.kpr(&["services", "--daemon-address", "127.0.0.1:9", "web"]);
    let err = format!("{:#}", unreachable.unwrap_err());
    assert!(
        err.contains("cannot filter by Service") && err.contains("127.0.0.1:9"),
        "{err}"
    );
    let unnamed = kpr_json(&cluster, &["services", "--daemon-address", "127.0.0.1:9"]);
    assert!(!unnamed.is_empty() && unnamed.iter().all(|s| s["service"].is_null()));

    // conntrack: exactly the connections sent, each to the backend that
    // answered it.
    let (sent_a, _keep_a) = open(&cluster, "client-a", 3);
    let (sent_b, conns_b) = open(&cluster, "client-b", 3);
    let flows = tcp_flows(&cluster, &[]);
    assert_eq!(pairs(&flows), sent_a.union(&sent_b).cloned().collect());
    for flow in &flows {
        assert_eq!(flow["frontend"], "10.96.0.91:80");
        assert_eq!(flow["state"], "established", "{flow}");
        assert_eq!(flow["source_nat"], Value::Null, "a pod's flow keeps its source");
        assert_eq!(flow["missing"], Value::Null);
        let expires = flow["expires_in_secs"].as_u64().unwrap();
        assert!(expires > 400_000, "an established connection lasts days: {flow}");
    }
    let client_b = cluster.pod("client-b").ip.to_string();
    assert_eq!(pairs(&tcp_flows(&cluster, &["--client", &client_b])), sent_b);

    // services again: each backend with the new connections it was sent.
    let services = kpr_json(&cluster, &["services", "--service", "10.96.0.91:80"]);
    let counted: BTreeMap<String, u64> = services[0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (field(b, "address"), b["new_flows"].as_u64().unwrap()))
        .collect();
    let mut per_backend: BTreeMap<String, u64> = backends.iter().map(|b| (b.to_string(), 0)).collect();
    for (_, backend) in sent_a.union(&sent_b) {
        *per_backend.get_mut(backend).unwrap() += 1;
    }
    assert_eq!(counted, per_backend, "new connections per backend");
    let table = kpr(&cluster, &["services"]);
    for (backend, n) in &per_backend {
        assert!(
            table.contains(&format!("{backend} (this node) [{n}]")),
            "{backend}'s count in:\n{table}"
        );
    }
    let (_, one_backend) = sent_a.iter().next().unwrap().clone();
    let to_backend = tcp_flows(&cluster, &["--backend", &one_backend]);
    assert!(to_backend.iter().all(|f| field(f, "backend") == one_backend));
    let want_there = sent_a.union(&sent_b).filter(|(_, b)| *b == one_backend).count();
    assert_eq!(to_backend.len(), want_there);
    let table = kpr(&cluster, &["conntrack", "--client", &client_b]);
    for (client, _) in &sent_b {
        assert!(table.contains(client.as_str()), "{client} in the table:\n{table}");
    }

    // A UDP exchange: one answered flow.
    let datagrams = Datagrams::open(&cluster.pod("client-a").ns).unwrap();
    let udp_pod = datagrams.request(at(VIP, 53)).unwrap().pod;
    let udp = kpr_json(&cluster, &["conntrack", "--service", "10.96.0.91:53"]);
    assert_eq!(udp.len(), 1, "{udp:?}");
    // The socket is bound to any address: the pod's is its source.
    let udp_client = at(cluster.pod("client-a").ip, datagrams.local_addr().port());
    assert_eq!(field(&udp[0], "client"), udp_client.to_string());
    assert_eq!(
        field(&udp[0], "backend"),
        at(cluster.pod(&udp_pod).ip, POD_PORT).to_string()
    );
    assert_eq!(udp[0]["state"], "answered");

    // Closed connections are shown closed, expiring within seconds.
    drop(conns_b);
    cluster
        .wait_until("client-b's connections to show closed", || {
            let flows = tcp_flows(&cluster, &["--client", &client_b]);
            Ok(flows.len() == 3 && flows.iter().all(|f| f["state"] == "closed"))
        })
        .unwrap();
    for flow in tcp_flows(&cluster, &["--client", &client_b]) {
        assert!(flow["expires_in_secs"].as_u64().unwrap() <= 10, "{flow}");
    }

    // affinity: each client with the backend all its connections got.
    let client_a = cluster.pod("client-a").ip.to_string();
    let remembered = kpr_json(&cluster, &["affinity", "--service", "10.96.0.91:80"]);
    let shown: BTreeSet<(String, String)> = remembered
        .iter()
        .map(|r| (field(r, "client"), field(r, "backend")))
        .collect();
    let backend_of = |sent: &BTreeSet<(String, String)>| {
        let backends: BTreeSet<&String> = sent.iter().map(|(_, b)| b).collect();
        assert_eq!(backends.len(), 1, "affinity kept one backend: {sent:?}");
        backends.into_iter().next().unwrap().clone()
    };
    let want: BTreeSet<(String, String)> = [
        (client_a.clone(), backend_of(&sent_a)),
        (client_b.clone(), backend_of(&sent_b)),
    ]
    .into();
    assert_eq!(shown, want);
    for entry in &remembered {
        assert_eq!(entry["in_force"], true, "{entry}");
        let expires = entry["expires_in_secs"].as_u64().unwrap();
        assert!(
            (AFFINITY_SECS as u64 - 30..=AFFINITY_SECS as u64).contains(&expires),
            "{entry}"
        );
        assert!(entry["frontends"]
            .as_array()
            .unwrap()
            .contains(&Value::from("10.96.0.91:80/TCP")));
    }
    let only_a = kpr_json(&cluster, &["affinity", "--client", &client_a]);
    assert!(only_a.iter().all(|r| field(r, "client") == client_a) && !only_a.is_empty());

    // Refusals are counted for the service that refused them.
    for _ in 0..2 {
        let refused = cluster
            .pod("client-a")
            .ns
            .run(|| std::net::TcpStream::connect_timeout(&at(EMPTY_VIP, 80), Duration::from_secs(2)))
            .unwrap();
        assert_eq!(refused.unwrap_err().kind(), ErrorKind::ConnectionRefused);
    }
    let empty = kpr_json(&cluster, &["services", "--service", "10.96.0.92:80"]);
    assert_eq!(empty[0]["rejecting"], true);
    assert_eq!(empty[0]["refused_or_dropped"], serde_json::json!({"rejected": 2}));

    // kpr stats: the data path's own counters tell the same story: the six
    // TCP connections and the UDP flow, the two refusals.
    let stats = cluster.kpr_json(&["stats"]).unwrap();
    assert_eq!(stats["new_flow"], (sent_a.len() + sent_b.len() + 1) as u64, "{stats:#}");
    assert_eq!(stats["rejected"], 2, "{stats:#}");
    let table = kpr(&cluster, &["stats"]);
    assert!(
        table
            .lines()
            .any(|l| l.contains("new_flow") && l.contains(&(sent_a.len() + sent_b.len() + 1).to_string())),
        "{table}"
    );

    // The same counters on /metrics, labelled by service.
    let (_, metrics) = http_get(cluster.node(), "127.0.0.1:10249".parse().unwrap(), "/metrics").unwrap();
    let web = "service=\"default/web\",frontend=\"10.96.0.91:80/TCP\",kind=\"ClusterIP\"";
    let empty = "service=\"default/empty\",frontend=\"10.96.0.92:80/TCP\",kind=\"ClusterIP\"";
    let sent = sent_a.len() + sent_b.len();
    for line in [
        format!("kpr_service_new_flows_total{{{web}}} {sent}"),
        format!("kpr_service_refused_or_dropped_total{{{empty},verdict=\"rejected\"}} 2"),
    ]
    .into_iter()
    .chain(
        per_backend
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(backend, n)| format!("kpr_backend_new_flows_total{{{web},backend=\"{backend}\"}} {n}")),
    ) {
        assert!(metrics.lines().any(|l| l == line), "{line} in:\n{metrics}");
    }
}
