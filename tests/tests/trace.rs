//! `kpr trace` against a running daemon: its answers are checked against
//! what real traffic then does, and the live data path is checked to be
//! untouched by it (no flow recorded, no round-robin turn taken).
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
};

use kpr_testbed::{
    cluster::{node_ip, POD_PORT},
    manifests::Exposure,
    pod::connect,
    Cluster, ClusterSpec,
};
use serde_json::Value;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 94);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 95);
const NODE_PORT: u16 = 30095;

fn trace(cluster: &Cluster, args: &[&str]) -> Value {
    let mut all = vec!["trace"];
    all.extend_from_slice(args);
    cluster.kpr_json(&all).unwrap()
}

fn leaves(traced: &Value) -> (String, String) {
    let after = &traced["after"];
    (
        after["src"].as_str().unwrap().to_string(),
        after["dst"].as_str().unwrap().to_string(),
    )
}

fn flows_from(cluster: &Cluster, client: Ipv4Addr) -> usize {
    let flows = cluster.kpr_json(&["conntrack", "--client", &client.to_string()]);
    flows.unwrap().as_array().unwrap().len()
}

#[test]
fn trace_tells_what_the_data_path_does_without_changing_it() {
    let mut spec = ClusterSpec::pods("web", 3);
    spec.pods.push("client".into());
    let cluster = Cluster::start(spec).unwrap();
    let exposure = Exposure {
        type_: Some("NodePort"),
        node_ports: &[NODE_PORT, 30096],
        ..Exposure::default()
    };
    let backends = cluster.serve_web(VIP, &exposure, &["web-0", "web-1", "web-2"]).unwrap();
    cluster.serve_nothing("empty", EMPTY_VIP).unwrap();
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

    // By the interface it arrives on: the programs attached there decide
    // (`--xdp auto` leaves veths to TC).
    let programs = |traced: &Value| -> Vec<String> {
        traced["stages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["program"].as_str().unwrap().to_string())
            .collect()
    };
    let via_external = trace(
        &cluster,
        &["--src", outside, "--dst", &node_port, "--interface", "eth0"],
    );
    assert_eq!(programs(&via_external), ["kpr_tc_external"], "{via_external:#}");
    assert_eq!(via_external["verdict"], "new_flow");
    let via_pod = trace(&cluster, &["--src", &src, "--dst", &vip, "--interface", "vpod0"]);
    assert_eq!(programs(&via_pod), ["kpr_tc"], "{via_pod:#}");
    let nowhere = cluster.kpr(&["trace", "--src", &src, "--dst", &vip, "--interface", "lo"]);
    let said = format!("{:#}", nowhere.unwrap_err());
    assert!(
        said.contains("no program at the ingress of lo") && said.contains("eth0"),
        "{said}"
    );

    // The table says the same.
    let table = cluster
        .kpr(&[
            "trace", "--src", outside, "--dst", &node_port, "--from", "outside", "--xdp",
        ])
        .unwrap();
    assert!(
        table.contains("kpr_xdp") && table.contains("[new_flow]") && table.contains("because"),
        "{table}"
    );
}
