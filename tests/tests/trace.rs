//! `kpr trace` against a running daemon: its answers are checked against
//! what real traffic then does, and the live data path is checked to be
//! untouched by it (no flow recorded, no round-robin turn taken).
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    process::Command,
};

use kpr_testbed::{
    cluster::{kpr_binary, node_ip, POD_PORT},
    manifests::{exposed_service_with_endpoints, tcp, web, Endpoint, Exposure},
    pod::connect,
    Cluster, ClusterSpec,
};
use proxy_common::IPPROTO_TCP;
use serde_json::Value;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 94);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 95);
const NODE_PORT: u16 = 30095;

fn trace(cluster: &Cluster, args: &[&str]) -> Value {
    let out = Command::new(kpr_binary().unwrap())
        .arg("--pin-dir")
        .arg(&cluster.pin_dir)
        .args(["-o", "json", "trace"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kpr trace {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn leaves(traced: &Value) -> (String, String) {
    let after = &traced["after"];
    (
        after["src"].as_str().unwrap().to_string(),
        after["dst"].as_str().unwrap().to_string(),
    )
}

fn flows_from(cluster: &Cluster, client: Ipv4Addr) -> usize {
    let out = Command::new(kpr_binary().unwrap())
        .arg("--pin-dir")
        .arg(&cluster.pin_dir)
        .args(["-o", "json", "conntrack", "--client", &client.to_string()])
        .output()
        .unwrap();
    serde_json::from_slice::<Vec<Value>>(&out.stdout).unwrap().len()
}

#[test]
fn trace_tells_what_the_data_path_does_without_changing_it() {
    let mut spec = ClusterSpec::pods("web", 3);
    spec.pods.push("client".into());
    let cluster = Cluster::start(spec).unwrap();
    let pods = ["web-0", "web-1", "web-2"];
    let endpoints: Vec<Endpoint> = pods
        .iter()
        .map(|p| Endpoint::ready(cluster.pod(p).ip).on("node0"))
        .collect();
    let exposure = Exposure {
        type_: Some("NodePort"),
        node_ports: &[NODE_PORT, 30096],
        ..Exposure::default()
    };
    cluster
        .write_manifest("web.yaml", &web(VIP, &exposure, &endpoints))
        .unwrap();
    let empty = exposed_service_with_endpoints(
        "empty",
        EMPTY_VIP,
        &[tcp("http", 80)],
        &Exposure::default(),
        POD_PORT,
        &[],
    );
    cluster.write_manifest("empty.yaml", &empty).unwrap();
    let backends: Vec<SocketAddr> = pods
        .iter()
        .map(|p| SocketAddr::from((cluster.pod(p).ip, POD_PORT)))
        .collect();
    cluster
        .wait_for_backends(SocketAddr::from((VIP, 80)), IPPROTO_TCP, &backends)
        .unwrap();
    cluster
        .wait_for_backends(SocketAddr::from((EMPTY_VIP, 80)), IPPROTO_TCP, &[])
        .unwrap();
    let backend_names: BTreeSet<String> = backends.iter().map(|b| b.to_string()).collect();
    let client = cluster.pod("client").ip;
    let vip = format!("{VIP}:80");

    // A new connection from a pod: the backend round-robin gives next.
    let src = format!("{client}:40000");
    let first = trace(&cluster, &["--src", &src, "--dst", &vip]);
    assert_eq!(first["verdict"], "new_flow", "{first:#}");
    assert_eq!(first["same_programs_as_live"], true);
    assert_eq!(first["stages"][0]["program"], "kpr_tc");
    let (from, predicted) = leaves(&first);
    assert_eq!(from, src, "a pod's flow keeps its source");
    assert!(backend_names.contains(&predicted), "{predicted}");
    let because = first["because"].to_string();
    assert!(
        because.contains("round-robin") && because.contains("ClusterIP"),
        "{because}"
    );
    // Tracing took no turn and recorded nothing: the same answer again, and
    // no flow of that client in the live table.
    let again = trace(&cluster, &["--src", &src, "--dst", &vip]);
    assert_eq!(leaves(&again).1, predicted);
    assert_eq!(flows_from(&cluster, client), 0, "the trace recorded no flow");

    // The next real connection goes where the trace said.
    let mut conn = connect(&cluster.pod("client").ns, SocketAddr::from((VIP, 80))).unwrap();
    let answered = conn.request().unwrap().pod;
    assert_eq!(
        SocketAddr::from((cluster.pod(&answered).ip, POD_PORT)).to_string(),
        predicted,
        "the real connection went where the trace said"
    );

    // Its later packets: the tracked flow; its backend's replies: reverse NAT.
    let tuple = conn.local_addr().to_string();
    let later = trace(&cluster, &["--src", &tuple, "--dst", &vip, "--flags", "ack"]);
    assert_eq!(later["verdict"], "established", "{later:#}");
    assert_eq!(leaves(&later).1, predicted);
    let reply = trace(&cluster, &["--src", &predicted, "--dst", &tuple, "--flags", "syn,ack"]);
    assert_eq!(reply["verdict"], "reply", "{reply:#}");
    assert_eq!(leaves(&reply), (vip.clone(), tuple.clone()));

    // A TCP packet of no flow is dropped, not balanced.
    let lost = trace(
        &cluster,
        &["--src", &format!("{client}:40001"), "--dst", &vip, "--flags", "ack"],
    );
    assert_eq!(lost["verdict"], "no_flow");
    assert_eq!(lost["after"], Value::Null, "dropped");
    // No frontend: untouched.
    let other = trace(&cluster, &["--src", &src, "--dst", &format!("{VIP}:81")]);
    assert_eq!(other["verdict"], "no_match");
    assert_eq!(leaves(&other), (src.clone(), format!("{VIP}:81")));
    // No endpoint anywhere: refused.
    let refused = trace(&cluster, &["--src", &src, "--dst", &format!("{EMPTY_VIP}:80")]);
    assert_eq!(refused["verdict"], "rejected", "{refused:#}");

    // From outside, to the NodePort, through TC and through XDP: a pod of
    // this node, the client's address kept.
    let node_port = format!("{}:{NODE_PORT}", node_ip(0));
    let outside = "198.51.100.7:50000";
    for xdp in [false, true] {
        let mut args = vec!["--src", outside, "--dst", &node_port, "--from", "outside"];
        if xdp {
            args.push("--xdp");
        }
        let traced = trace(&cluster, &args);
        assert_eq!(traced["verdict"], "new_flow", "{traced:#}");
        let program = if xdp { "kpr_xdp" } else { "kpr_tc_external" };
        assert_eq!(traced["stages"][0]["program"], program);
        let (from, to) = leaves(&traced);
        assert_eq!(from, outside);
        assert!(backend_names.contains(&to), "{to}");
    }
    assert_eq!(flows_from(&cluster, "198.51.100.7".parse().unwrap()), 0);

    // The table says the same.
    let out = Command::new(kpr_binary().unwrap())
        .arg("--pin-dir")
        .arg(&cluster.pin_dir)
        .args([
            "trace", "--src", outside, "--dst", &node_port, "--from", "outside", "--xdp",
        ])
        .output()
        .unwrap();
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(
        table.contains("kpr_xdp") && table.contains("[new_flow]") && table.contains("because"),
        "{table}"
    );
}
