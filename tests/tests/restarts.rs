//! Restarts and upgrades are non-events: the daemon stopped (SIGTERM) or
//! killed (SIGKILL) and started again, ten times in a row, while 100
//! established connections keep talking and a client keeps opening new
//! ones; and a rolling update (each new pod ready before an old one
//! terminates) while a client keeps connecting. Nothing is reset, nothing
//! fails, nothing stalls past a bound.
use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use kpr_testbed::{
    cluster::POD_PORT,
    manifests::{service_with_endpoints, tcp, Endpoint},
    netns::Netns,
    pod::{connect, Conn},
    Cluster, ClusterSpec,
};
use proxy_common::IPPROTO_TCP;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 97);
const FRONTEND: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(VIP), 80);

fn program(cluster: &Cluster, endpoints: Vec<Endpoint>) {
    let want: Vec<SocketAddr> = endpoints
        .iter()
        .filter(|e| e.ready)
        .map(|e| SocketAddr::from((e.ip, POD_PORT)))
        .collect();
    let yaml = service_with_endpoints("web", VIP, &[tcp("http", 80)], POD_PORT, &endpoints);
    cluster.write_manifest("web.yaml", &yaml).unwrap();
    cluster.wait_for_backends(FRONTEND, IPPROTO_TCP, &want).unwrap();
}

/// New connections (one request each) from `ns`, one after the other,
/// until stopped: how many, which failed and why, and the slowest.
struct Churn {
    stop: Arc<AtomicBool>,
    results: Arc<Mutex<(usize, Vec<String>, Duration)>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Churn {
    fn start(ns: &Netns) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let results = Arc::new(Mutex::new((0, Vec::new(), Duration::ZERO)));
        let ns = ns.handle();
        let (stop2, results2) = (stop.clone(), results.clone());
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                let started = Instant::now();
                let outcome = connect(&ns, FRONTEND).and_then(|mut c| c.request());
                let took = started.elapsed();
                let mut r = results2.lock().unwrap();
                r.0 += 1;
                if let Err(e) = outcome {
                    r.1.push(format!("{e:#}"));
                }
                r.2 = r.2.max(took);
            }
        });
        Churn {
            stop,
            results,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> (usize, Vec<String>, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        self.results.lock().unwrap().clone()
    }
}

/// TCP segments the namespace's stack has retransmitted (a stall: a SYN or
/// request that got no answer in time), from its own /proc/net/snmp.
fn retransmitted(ns: &Netns) -> u64 {
    let snmp = ns
        .run(|| std::fs::read_to_string("/proc/thread-self/net/snmp"))
        .unwrap()
        .unwrap();
    let tcp: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Tcp:")).collect();
    let (names, values) = (tcp[0].split_whitespace(), tcp[1].split_whitespace());
    names
        .zip(values)
        .find(|(n, _)| *n == "RetransSegs")
        .map(|(_, v)| v.parse().unwrap())
        .expect("RetransSegs in /proc/net/snmp")
}

#[test]
fn ten_restarts_under_load_reset_nothing() {
    let mut spec = ClusterSpec::pods("web", 3);
    spec.pods.push("client".into());
    let mut cluster = Cluster::start(spec).unwrap();
    program(
        &cluster,
        cluster.pods[..3]
            .iter()
            .map(|p| Endpoint::ready(p.ip).on("node0"))
            .collect(),
    );
    let client = &cluster.pod("client").ns;
    let mut established: Vec<(Conn, String)> = (0..100)
        .map(|_| {
            let mut c = connect(client, FRONTEND).unwrap();
            let pod = c.request().unwrap().pod;
            (c, pod)
        })
        .collect();
    let retransmitted_before = retransmitted(client);
    let churn = Churn::start(client);
    let mut slowest_restart = Duration::ZERO;
    for round in 0..10 {
        let started = Instant::now();
        if round % 2 == 0 {
            cluster.stop_daemon().unwrap();
        } else {
            cluster.kill_daemon().unwrap();
        }
        cluster.start_daemon().unwrap();
        slowest_restart = slowest_restart.max(started.elapsed());
        for (i, (conn, pod)) in established.iter_mut().enumerate() {
            let answer = conn
                .request()
                .unwrap_or_else(|e| panic!("connection {i} broke in restart {round}: {e:#}"));
            assert_eq!(&answer.pod, pod, "connection {i} moved in restart {round}");
        }
    }
    let (made, failed, slowest) = churn.finish();
    let stalls = retransmitted(&cluster.pod("client").ns) - retransmitted_before;
    println!(
        "10 restarts (5 SIGTERM, 5 SIGKILL), slowest restart {slowest_restart:?}: 100 established connections all kept; {made} new connections meanwhile, {} failed, slowest {slowest:?}, {stalls} TCP segments retransmitted",
        failed.len()
    );
    assert!(failed.is_empty(), "new connections failed: {failed:?}");
    assert!(made >= 100, "the client kept connecting throughout: {made}");
    // A stall is a segment that went unanswered until the client sent it
    // again: counted by the client's stack, not timed by the test.
    assert_eq!(
        stalls, 0,
        "the client had to retransmit (slowest connection {slowest:?})"
    );
}

#[test]
fn a_rolling_update_fails_no_connection() {
    // web-0..2 are replaced by web-3..5, one at a time.
    let mut spec = ClusterSpec::pods("web", 6);
    spec.pods.push("client".into());
    let cluster = Cluster::start(spec).unwrap();
    let ip = |i: usize| cluster.pods[i].ip;
    let endpoints = |ready: &[usize], terminating: &[usize]| -> Vec<Endpoint> {
        ready
            .iter()
            .map(|&i| Endpoint::ready(ip(i)).on("node0"))
            .chain(
                terminating
                    .iter()
                    .map(|&i| Endpoint::ready(ip(i)).on("node0").terminating()),
            )
            .collect()
    };
    program(&cluster, endpoints(&[0, 1, 2], &[]));
    let churn = Churn::start(&cluster.pod("client").ns);
    let mut current = vec![0, 1, 2];
    for (old, new) in [(0, 3), (1, 4), (2, 5)] {
        // The new pod is ready...
        current.push(new);
        program(&cluster, endpoints(&current, &[]));
        std::thread::sleep(Duration::from_millis(300));
        // ...then the old one terminates: it stops being ready, still
        // serving what it has, and leaves.
        current.retain(|&i| i != old);
        program(&cluster, endpoints(&current, &[old]));
        std::thread::sleep(Duration::from_millis(300));
        program(&cluster, endpoints(&current, &[]));
    }
    let (made, failed, slowest) = churn.finish();
    println!(
        "rolling update of 3 pods: {made} new connections, {} failed, slowest {slowest:?}",
        failed.len()
    );
    assert!(failed.is_empty(), "connections failed: {failed:?}");
    assert!(made >= 50, "the client kept connecting throughout: {made}");
}
