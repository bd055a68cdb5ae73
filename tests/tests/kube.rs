//! The daemon against the test API server (real list/watch over HTTP,
//! reached through kube-rs and a kubeconfig), driving the real dataplane.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use kpr_testbed::{
    apiserver::Kind,
    cluster::POD_PORT,
    manifests::{ready, service, service_with_endpoints, tcp, udp, Endpoint},
    pod::{connect, Conn, Datagrams, Reply},
    Cluster, ClusterSpec,
};
use proxy_common::{IPPROTO_TCP, IPPROTO_UDP};
use proxy_user::{
    dataplane::maps::{FlowMaps, ServiceMaps},
    sync::ServiceTable,
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

fn vip(port: u16) -> SocketAddr {
    SocketAddr::from((VIP, port))
}

fn backends(cluster: &Cluster, pods: &[usize]) -> Vec<SocketAddr> {
    pods.iter()
        .map(|&i| SocketAddr::from((cluster.pods[i].ip, POD_PORT)))
        .collect()
}

/// Three `web` pods and a client, the daemon watching the API.
fn cluster() -> Cluster {
    let mut spec = ClusterSpec::pods("web", 3).with_api_server();
    spec.pods.push("client".into());
    Cluster::start(spec).expect("cluster")
}

fn web_objects(cluster: &Cluster, pods: &[usize], http_port: u16) -> String {
    let ips: Vec<Ipv4Addr> = pods.iter().map(|&i| cluster.pods[i].ip).collect();
    service_with_endpoints(
        "web",
        VIP,
        &[tcp("http", http_port), udp("dns", 53)],
        POD_PORT,
        &ready(&ips),
    )
}

fn tally(replies: impl IntoIterator<Item = Reply>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for r in replies {
        *counts.entry(r.pod).or_default() += 1;
    }
    counts
}

/// `n` new connections, kept open so no source port repeats.
fn connections(cluster: &Cluster, to: SocketAddr, n: usize, keep: &mut Vec<Conn>) -> BTreeMap<String, usize> {
    tally((0..n).map(|_| {
        let mut c = connect(&cluster.pod("client").ns, to).unwrap();
        let r = c.request().unwrap();
        keep.push(c);
        r
    }))
}

fn even(pods: &[usize], n: usize) -> BTreeMap<String, usize> {
    pods.iter().map(|i| (format!("web-{i}"), n)).collect()
}

#[test]
fn services_and_slices_from_the_api_are_programmed_and_follow_changes() {
    let cluster = cluster();
    let api = cluster.api();
    let mut keep = Vec::new();

    api.apply(&web_objects(&cluster, &[0, 1, 2], 80)).unwrap();
    cluster
        .wait_for_backends(vip(80), IPPROTO_TCP, &backends(&cluster, &[0, 1, 2]))
        .unwrap();
    cluster
        .wait_for_backends(vip(53), IPPROTO_UDP, &backends(&cluster, &[0, 1, 2]))
        .unwrap();
    assert_eq!(connections(&cluster, vip(80), 9, &mut keep), even(&[0, 1, 2], 3));
    let udp: Vec<Datagrams> = (0..3)
        .map(|_| Datagrams::open(&cluster.pod("client").ns).unwrap())
        .collect();
    assert_eq!(
        tally(udp.iter().map(|s| s.request(vip(53)).unwrap())),
        even(&[0, 1, 2], 1)
    );

    // Scale down, then up.
    api.apply(&web_objects(&cluster, &[0], 80)).unwrap();
    cluster
        .wait_for_backends(vip(80), IPPROTO_TCP, &backends(&cluster, &[0]))
        .unwrap();
    assert_eq!(connections(&cluster, vip(80), 3, &mut keep), even(&[0], 3));
    api.apply(&web_objects(&cluster, &[0, 2], 80)).unwrap();
    cluster
        .wait_for_backends(vip(80), IPPROTO_TCP, &backends(&cluster, &[0, 2]))
        .unwrap();
    assert_eq!(connections(&cluster, vip(80), 4, &mut keep), even(&[0, 2], 2));

    // Change the service port: the old frontend goes, the new one works.
    api.apply(&web_objects(&cluster, &[0, 2], 8000)).unwrap();
    cluster
        .wait_for_backends(vip(8000), IPPROTO_TCP, &backends(&cluster, &[0, 2]))
        .unwrap();
    cluster
        .wait_until("port 80 to be gone", || {
            Ok(cluster.programmed(vip(80), IPPROTO_TCP)?.is_none())
        })
        .unwrap();
    assert_eq!(connections(&cluster, vip(8000), 2, &mut keep), even(&[0, 2], 1));

    // Delete the service and its slice: nothing is left in the service maps,
    // and its UDP flows are forgotten (TCP ones finish, as with kube-proxy).
    let udp_flows = || {
        let flows = FlowMaps::open(&cluster.pin_dir).unwrap();
        flows
            .entries()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.proto == IPPROTO_UDP)
            .count()
    };
    assert!(udp_flows() >= 6, "three UDP flows, two entries each");
    api.delete(Kind::Service, "default", "web").unwrap();
    api.delete(Kind::EndpointSlice, "default", "web-abc12").unwrap();
    cluster
        .wait_until("every map entry to be gone", || {
            let maps = ServiceMaps::open(&cluster.pin_dir)?;
            Ok(maps.frontends()?.is_empty() && maps.backend_slots()? == 0)
        })
        .unwrap();
    assert_eq!(udp_flows(), 0);
}

fn api_objects(cluster: &Cluster) -> String {
    let other = Ipv4Addr::new(10, 96, 0, 20);
    service_with_endpoints(
        "api",
        other,
        &[tcp("http", 80)],
        POD_PORT,
        &ready(&[cluster.pods[1].ip]),
    )
}

/// `web` on all three pods and `api` on web-1, both programmed; api's frontend.
fn web_and_api(cluster: &Cluster) -> SocketAddr {
    cluster.api().apply(&web_objects(cluster, &[0, 1, 2], 80)).unwrap();
    cluster.api().apply(&api_objects(cluster)).unwrap();
    let api_vip = SocketAddr::from((Ipv4Addr::new(10, 96, 0, 20), 80));
    cluster
        .wait_for_backends(vip(80), IPPROTO_TCP, &backends(cluster, &[0, 1, 2]))
        .unwrap();
    cluster
        .wait_for_backends(api_vip, IPPROTO_TCP, &backends(cluster, &[1]))
        .unwrap();
    api_vip
}

#[test]
fn an_api_outage_keeps_traffic_flowing_and_the_state_converges_after_it() {
    let mut cluster = cluster();
    let api_vip = web_and_api(&cluster);
    let mut long = connect(&cluster.pod("client").ns, vip(80)).unwrap();
    let owner = long.request().unwrap().pod;

    // The API server goes away.
    cluster.api_mut().stop();
    std::thread::sleep(Duration::from_millis(1500));
    let mut keep = Vec::new();
    assert_eq!(
        connections(&cluster, vip(80), 6, &mut keep),
        even(&[0, 1, 2], 2),
        "traffic keeps flowing"
    );
    assert_eq!(long.request().unwrap().pod, owner);
    let (status, _) =
        kpr_testbed::pod::http_get(cluster.node(), "127.0.0.1:10256".parse().unwrap(), "/healthz").unwrap();
    assert_eq!(
        status, 200,
        "no change is pending: the proxy is healthy while the API is away"
    );

    // While it is away: web scales down, api is deleted, and the history the
    // daemon would resume from is compacted, so it must re-list.
    cluster.api().apply(&web_objects(&cluster, &[0, 2], 80)).unwrap();
    cluster.api().delete(Kind::Service, "default", "api").unwrap();
    cluster
        .api()
        .delete(Kind::EndpointSlice, "default", "api-abc12")
        .unwrap();
    cluster.api().compact();
    assert!(cluster.log().contains("watch failed"), "{}", cluster.log());

    cluster.api_mut().restart().unwrap();
    let (lists_before, _) = cluster.api().requests();
    cluster
        .wait_until_within(
            "the daemon to converge after the outage",
            Duration::from_secs(20),
            || {
                Ok(cluster.programmed(api_vip, IPPROTO_TCP)?.is_none()
                    && cluster.programmed(vip(80), IPPROTO_TCP)?.map(|b| b.len()) == Some(2))
            },
        )
        .unwrap();
    assert!(
        cluster.api().requests().0 > lists_before,
        "a 410 must lead to a re-list"
    );
    assert_eq!(
        long.request().unwrap().pod,
        owner,
        "the long connection survived the outage"
    );
    assert_eq!(connections(&cluster, vip(80), 4, &mut keep), even(&[0, 2], 2));
    assert!(cluster.log().contains("watch recovered"));
}

#[test]
fn a_dropped_watch_resumes_without_a_relist_and_misses_nothing() {
    let cluster = cluster();
    cluster.api().apply(&web_objects(&cluster, &[0, 1, 2], 80)).unwrap();
    cluster
        .wait_for_backends(vip(80), IPPROTO_TCP, &backends(&cluster, &[0, 1, 2]))
        .unwrap();
    let (lists, watches) = cluster.api().requests();
    for pods in [&[0, 1][..], &[1][..], &[1, 2][..]] {
        cluster.api().drop_watches();
        cluster.api().apply(&web_objects(&cluster, pods, 80)).unwrap();
        cluster
            .wait_for_backends(vip(80), IPPROTO_TCP, &backends(&cluster, pods))
            .unwrap();
    }
    let (lists_after, watches_after) = cluster.api().requests();
    assert_eq!(lists_after, lists, "resuming a watch needs no list");
    assert!(watches_after >= watches + 3, "each dropped watch was resumed");
}

#[test]
fn a_restarted_daemon_reconciles_the_maps_without_dropping_connections() {
    let mut cluster = cluster();
    let api_vip = web_and_api(&cluster);
    let mut conns: Vec<Conn> = (0..3)
        .map(|_| connect(&cluster.pod("client").ns, vip(80)).unwrap())
        .collect();
    let owners: Vec<String> = conns.iter_mut().map(|c| c.request().unwrap().pod).collect();

    cluster.stop_daemon().unwrap();
    // Changes the daemon does not see while it is down.
    cluster.api().delete(Kind::Service, "default", "api").unwrap();
    cluster
        .api()
        .delete(Kind::EndpointSlice, "default", "api-abc12")
        .unwrap();
    let not_ready_web2 = service_with_endpoints(
        "web",
        VIP,
        &[tcp("http", 80), udp("dns", 53)],
        POD_PORT,
        &[
            Endpoint::ready(cluster.pods[0].ip),
            Endpoint::ready(cluster.pods[1].ip),
            Endpoint::ready(cluster.pods[2].ip).not_ready(),
        ],
    );
    cluster.api().apply(&not_ready_web2).unwrap();
    for (c, o) in conns.iter_mut().zip(&owners) {
        assert_eq!(&c.request().unwrap().pod, o);
    }

    cluster.start_daemon().unwrap();
    // Its first sync is a complete one: nothing of what changed while it was
    // down is left for a periodic resync to find.
    assert!(
        cluster.programmed(api_vip, IPPROTO_TCP).unwrap().is_none(),
        "the deleted service still answers after the first sync"
    );
    assert_eq!(
        cluster.programmed(vip(80), IPPROTO_TCP).unwrap().map(|mut b| {
            b.sort();
            b
        }),
        Some(backends(&cluster, &[0, 1])),
        "the endpoint that stopped being ready still receives new connections"
    );
    let maps = ServiceMaps::open(&cluster.pin_dir).unwrap();
    let slots: usize = maps
        .frontends()
        .unwrap()
        .iter()
        .map(|(_, v, _)| v.backend_count as usize)
        .sum();
    assert_eq!(maps.backend_slots().unwrap(), slots, "no stale backend slot remains");
    // Established connections, including the one to the now not-ready pod, keep working.
    for (c, o) in conns.iter_mut().zip(&owners) {
        assert_eq!(&c.request().unwrap().pod, o, "a connection broke across the restart");
    }
}

#[test]
fn health_metrics_and_rejections_are_reported() {
    let cluster = cluster();
    cluster.api().apply(&web_objects(&cluster, &[0, 1, 2], 80)).unwrap();
    // The test server does not validate, so an impossible object gets through to the daemon.
    let bad = service("broken", Ipv4Addr::new(10, 96, 0, 30), &[tcp("http", 80)]).replace("port: 80", "port: 0");
    cluster.api().apply(&bad).unwrap();
    let sctp = service("sig", Ipv4Addr::new(10, 96, 0, 31), &[tcp("http", 80)])
        + "  - name: diameter\n    port: 3868\n    protocol: SCTP\n";
    cluster.api().apply(&sctp).unwrap();
    cluster
        .wait_for_backends(vip(80), IPPROTO_TCP, &backends(&cluster, &[0, 1, 2]))
        .unwrap();
    cluster
        .wait_for_backends(SocketAddr::from((Ipv4Addr::new(10, 96, 0, 31), 80)), IPPROTO_TCP, &[])
        .unwrap();
    let mut keep = Vec::new();
    connections(&cluster, vip(80), 3, &mut keep);
    // More syncs: the rejection must still be logged only once.
    cluster.api().apply(&web_objects(&cluster, &[0, 1], 80)).unwrap();
    cluster
        .wait_for_backends(vip(80), IPPROTO_TCP, &backends(&cluster, &[0, 1]))
        .unwrap();

    let node = cluster.node();
    let (status, body) = kpr_testbed::pod::http_get(node, "127.0.0.1:10256".parse().unwrap(), "/healthz").unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"lastUpdated\":\"20"), "{body}");
    let (status, metrics) = kpr_testbed::pod::http_get(node, "127.0.0.1:10249".parse().unwrap(), "/metrics").unwrap();
    assert_eq!(status, 200);
    for line in [
        "kpr_programmed_frontends 3",
        "kpr_programmed_endpoints 4",
        "kpr_programmed_services 2",
        "kpr_rejected_objects 1",
        "kpr_object_rejections_total{kind=\"Service\",field=\"spec.ports[].port\"} 1",
        "kpr_unsupported_service_ports{protocol=\"SCTP\"} 1",
        "kpr_datapath_packets_total{verdict=\"new_flow\"} 3",
    ] {
        assert!(metrics.lines().any(|l| l == line), "missing {line:?} in\n{metrics}");
    }
    for name in [
        "kubeproxy_sync_proxy_rules_duration_seconds_count",
        // From the slices' trigger times (the test stamps them as the
        // EndpointSlice controller does).
        "kubeproxy_network_programming_duration_seconds_count",
        "kpr_change_programming_duration_seconds_count",
    ] {
        let count: u64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().parse().unwrap()))
            .unwrap_or_else(|| panic!("no {name} in\n{metrics}"));
        assert!(count >= 2, "{name} = {count}");
    }
    let log = cluster.log();
    let rejected = "rejected: Service default/broken: spec.ports[0].port: port 0 is out of range 1-65535";
    assert_eq!(log.matches(rejected).count(), 1, "logged once:\n{log}");
    assert_eq!(
        log.matches("unsupported: Service default/sig: spec.ports[1]: SCTP")
            .count(),
        1,
        "{log}"
    );
}

#[test]
fn a_burst_of_changes_is_coalesced_into_few_syncs() {
    let cluster = cluster();
    cluster.api().apply(&web_objects(&cluster, &[0, 1, 2], 80)).unwrap();
    cluster
        .wait_for_backends(vip(80), IPPROTO_TCP, &backends(&cluster, &[0, 1, 2]))
        .unwrap();
    let syncs_before = cluster.log().matches("synced").count();
    let rounds = [&[0][..], &[1], &[2], &[0, 1], &[1, 2]];
    for i in 0..50 {
        cluster
            .api()
            .apply(&web_objects(&cluster, rounds[i % rounds.len()], 80))
            .unwrap();
    }
    // The last update wins...
    cluster
        .wait_for_backends(vip(80), IPPROTO_TCP, &backends(&cluster, &[1, 2]))
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // ...and 50 events took far fewer syncs than 50.
    let syncs = cluster.log().matches("synced").count() - syncs_before;
    assert!(syncs < 25, "{syncs} syncs for a burst of 50 changes");
}

#[test]
fn the_periodic_resync_repairs_drift_in_the_maps() {
    let cluster = cluster();
    cluster.api().apply(&web_objects(&cluster, &[0, 1, 2], 80)).unwrap();
    cluster
        .wait_for_backends(vip(80), IPPROTO_TCP, &backends(&cluster, &[0, 1, 2]))
        .unwrap();
    cluster
        .wait_for_backends(vip(53), IPPROTO_UDP, &backends(&cluster, &[0, 1, 2]))
        .unwrap();

    // Someone edits the maps behind the daemon's back (bpftool, a crash).
    let mut maps = ServiceMaps::open(&cluster.pin_dir).unwrap();
    let (udp_key, _, _) = maps
        .frontends()
        .unwrap()
        .into_iter()
        .find(|(k, _, _)| k.proto == IPPROTO_UDP)
        .unwrap();
    maps.remove_service(&udp_key).unwrap();
    let (tcp_key, mut tcp_value, _) = maps
        .frontends()
        .unwrap()
        .into_iter()
        .find(|(k, _, _)| k.proto == IPPROTO_TCP)
        .unwrap();
    tcp_value.backend_count = 1;
    maps.put_service(&tcp_key, &tcp_value).unwrap();
    let bogus = proxy_common::ServiceKey::new(Ipv4Addr::new(10, 96, 9, 9), 99, IPPROTO_TCP);
    maps.put_service(
        &bogus,
        &proxy_common::ServiceValue {
            id: 999,
            ..Default::default()
        },
    )
    .unwrap();

    // The harness runs the daemon with a 5 s sync period.
    cluster
        .wait_until_within("the resync to repair the maps", Duration::from_secs(15), || {
            let all = ServiceMaps::open(&cluster.pin_dir)?.frontends()?;
            Ok(all.len() == 2 && all.iter().all(|(_, v, b)| v.backend_count == 3 && b.len() == 3))
        })
        .unwrap();
    let mut keep = Vec::new();
    assert_eq!(connections(&cluster, vip(80), 3, &mut keep), even(&[0, 1, 2], 1));
}

#[test]
fn internal_traffic_policy_local_and_zone_hints_follow_this_node() {
    let cluster = cluster();
    let api = cluster.api();
    // This node (node0) is in zone-a; web-2 is said to run on another node.
    api.apply(&format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {}\n  labels:\n    topology.kubernetes.io/zone: zone-a\n",
        kpr_testbed::cluster::NODE_NAME
    ))
    .unwrap();
    let ip = |i: usize| cluster.pods[i].ip;
    let local_vip = Ipv4Addr::new(10, 96, 0, 40);
    let local = [
        Endpoint::ready(ip(0)).on("node0"),
        Endpoint::ready(ip(1)).on("node0"),
        Endpoint::ready(ip(2)).on("node1"),
    ];
    let local_objects = service_with_endpoints("local", local_vip, &[tcp("http", 80)], POD_PORT, &local);
    api.apply(&local_objects.replace("  ports:", "  internalTrafficPolicy: Local\n  ports:"))
        .unwrap();
    let zoned_vip = Ipv4Addr::new(10, 96, 0, 41);
    let zoned = [
        Endpoint::ready(ip(0)).for_zone("zone-b"),
        Endpoint::ready(ip(1)).for_zone("zone-a"),
        Endpoint::ready(ip(2)).for_zone("zone-a"),
    ];
    api.apply(&service_with_endpoints(
        "zoned",
        zoned_vip,
        &[tcp("http", 80)],
        POD_PORT,
        &zoned,
    ))
    .unwrap();
    // internalTrafficPolicy Local: this node's endpoints; zone hints: this zone's.
    let mut keep = Vec::new();
    for (vip, pods) in [(local_vip, [0, 1]), (zoned_vip, [1, 2])] {
        let frontend = SocketAddr::from((vip, 80));
        cluster
            .wait_for_backends(frontend, IPPROTO_TCP, &backends(&cluster, &pods))
            .unwrap();
        assert_eq!(connections(&cluster, frontend, 4, &mut keep), even(&pods, 2), "{vip}");
    }
}

/// A LoadBalancer Service from the API: its nodePort answers on the Node's
/// InternalIP, and its ingress IP is programmed when the load balancer
/// writes it into the status, and dropped when it goes; externally
/// reachable from the outside host.
#[test]
fn a_load_balancer_service_from_the_api_follows_its_status_and_the_node() {
    use kpr_testbed::{
        cluster::{node_ip, OUTSIDE_IP},
        manifests::{exposed_service_with_endpoints, Exposure},
    };
    let cluster = cluster();
    let lb_ip = Ipv4Addr::new(203, 0, 113, 40);
    cluster.route_from_outside(lb_ip, 0).unwrap();
    let objects = |ingress: &[Ipv4Addr]| {
        let on_node0: Vec<Endpoint> = cluster.pods[..3]
            .iter()
            .map(|p| Endpoint::ready(p.ip).on("node0"))
            .collect();
        exposed_service_with_endpoints(
            "web",
            VIP,
            &[tcp("http", 80)],
            &Exposure {
                type_: Some("LoadBalancer"),
                node_ports: &[30080],
                ingress_ips: ingress,
                ..Exposure::default()
            },
            POD_PORT,
            &on_node0,
        )
    };
    let api = cluster.api();
    api.apply(&objects(&[])).unwrap();
    let node_port = SocketAddr::from((node_ip(0), 30080));
    cluster
        .wait_for_backends(node_port, IPPROTO_TCP, &backends(&cluster, &[0, 1, 2]))
        .unwrap();
    let reply = connect(cluster.outside(), node_port).unwrap().request().unwrap();
    assert_eq!(
        reply.peer.ip(),
        std::net::IpAddr::V4(OUTSIDE_IP),
        "a local backend sees the client"
    );
    assert!(cluster
        .programmed(SocketAddr::from((lb_ip, 80)), IPPROTO_TCP)
        .unwrap()
        .is_none());

    // The load balancer assigns its address.
    api.apply(&objects(&[lb_ip])).unwrap();
    cluster
        .wait_for_backends(
            SocketAddr::from((lb_ip, 80)),
            IPPROTO_TCP,
            &backends(&cluster, &[0, 1, 2]),
        )
        .unwrap();
    let mut keep = Vec::new();
    let replies: Vec<Reply> = (0..3)
        .map(|_| {
            let mut c = connect(cluster.outside(), SocketAddr::from((lb_ip, 80))).unwrap();
            let r = c.request().unwrap();
            keep.push(c);
            r
        })
        .collect();
    assert_eq!(tally(replies), even(&[0, 1, 2], 1));

    // ... and takes it back.
    api.apply(&objects(&[])).unwrap();
    cluster
        .wait_until("the ingress IP to be gone", || {
            Ok(cluster
                .programmed(SocketAddr::from((lb_ip, 80)), IPPROTO_TCP)?
                .is_none())
        })
        .unwrap();
}

/// kube-proxy's health semantics for a node on its way out, and its
/// change-tracker and no-local-endpoints metrics: `/healthz` turns load
/// balancers away (503, `nodeEligible: false`) once the Node is being
/// deleted while `/livez` stays 200; a Local policy with endpoints only on
/// other nodes is counted.
#[test]
fn a_node_being_deleted_fails_healthz_not_livez_and_local_policy_gaps_are_counted() {
    let cluster = cluster();
    let api = cluster.api();
    let node_name = kpr_testbed::cluster::NODE_NAME;
    let ip = |i: usize| cluster.pods[i].ip;
    let elsewhere = [Endpoint::ready(ip(0)).on("node1"), Endpoint::ready(ip(1)).on("node1")];
    let local_vip = Ipv4Addr::new(10, 96, 0, 42);
    let objects = service_with_endpoints("elsewhere", local_vip, &[tcp("http", 80)], POD_PORT, &elsewhere);
    api.apply(&objects.replace("  ports:", "  internalTrafficPolicy: Local\n  ports:"))
        .unwrap();
    api.apply(&format!("apiVersion: v1\nkind: Node\nmetadata:\n  name: {node_name}\n"))
        .unwrap();
    cluster
        .wait_for_backends(SocketAddr::from((local_vip, 80)), IPPROTO_TCP, &[])
        .unwrap();
    let node = cluster.node();
    let get = |addr: &str, path: &str| kpr_testbed::pod::http_get(node, addr.parse().unwrap(), path).unwrap();
    let metric = |name: &str| -> Option<f64> {
        let (_, metrics) = get("127.0.0.1:10249", "/metrics");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
            .map(|v| v.parse().unwrap())
    };
    cluster
        .wait_until("the iTP Local service without a local endpoint to be counted", || {
            Ok(metric("kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy=\"internal\"}") == Some(1.0))
        })
        .unwrap();
    assert_eq!(
        metric("kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy=\"external\"}"),
        Some(0.0)
    );
    assert_eq!(
        metric("kubeproxy_sync_proxy_rules_service_changes_pending"),
        Some(0.0),
        "all synced"
    );
    assert_eq!(metric("kubeproxy_sync_proxy_rules_endpoint_changes_pending"), Some(0.0));
    assert!(metric("kubeproxy_sync_proxy_rules_service_changes_total").unwrap() >= 1.0);
    assert!(metric("kubeproxy_sync_proxy_rules_endpoint_changes_total").unwrap() >= 1.0);
    let (status, body) = get("127.0.0.1:10256", "/healthz");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"nodeEligible\":true"), "{body}");
    // The health address listens on every interface: health alone there,
    // as kube-proxy's; counters and Service names on the metrics address.
    for path in ["/metrics", "/frontends"] {
        assert_eq!(get("127.0.0.1:10256", path).0, 404, "{path} on the health address");
        assert_eq!(get("127.0.0.1:10249", path).0, 200, "{path} on the metrics address");
    }

    // An endpoint comes to this node: nothing left to count.
    let with_local = [Endpoint::ready(ip(0)).on(node_name), Endpoint::ready(ip(1)).on("node1")];
    let objects = service_with_endpoints("elsewhere", local_vip, &[tcp("http", 80)], POD_PORT, &with_local);
    api.apply(&objects.replace("  ports:", "  internalTrafficPolicy: Local\n  ports:"))
        .unwrap();
    cluster
        .wait_until("the gap to close", || {
            Ok(metric("kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy=\"internal\"}") == Some(0.0))
        })
        .unwrap();

    // The node is being deleted: not eligible for new traffic, still alive.
    api.apply(&format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {node_name}\n  deletionTimestamp: \"2026-01-01T00:00:00Z\"\n"
    ))
    .unwrap();
    cluster
        .wait_until("/healthz to turn the node away", || {
            Ok(get("127.0.0.1:10256", "/healthz").0 == 503)
        })
        .unwrap();
    let (_, body) = get("127.0.0.1:10256", "/healthz");
    assert!(body.contains("\"nodeEligible\":false"), "{body}");
    let (status, body) = get("127.0.0.1:10256", "/livez");
    assert_eq!(
        status, 200,
        "a node being deleted is no reason to restart its proxy: {body}"
    );
    assert!(!body.contains("nodeEligible"), "{body}");
    // Its services still answer meanwhile (kube-proxy keeps forwarding too).
    let mut keep = Vec::new();
    assert_eq!(
        connections(&cluster, SocketAddr::from((local_vip, 80)), 2, &mut keep)
            .values()
            .sum::<usize>(),
        2
    );
    // The deletion is called off (the object is recreated): eligible again.
    api.apply(&format!("apiVersion: v1\nkind: Node\nmetadata:\n  name: {node_name}\n"))
        .unwrap();
    cluster
        .wait_until("/healthz to take the node back", || {
            Ok(get("127.0.0.1:10256", "/healthz").0 == 200)
        })
        .unwrap();
}
