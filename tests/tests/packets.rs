//! The classifier on crafted packets through BPF_PROG_TEST_RUN: each
//! fixture gives an input frame, the verdict, the exact output frame (every
//! checksum recomputed from scratch by the builder) and the counter it bumps.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use kpr_testbed::{
    dataplane::{monotonic_secs, Loaded, TC_ACT_SHOT, TC_ACT_UNSPEC},
    packet::{
        self, checksum, ethernet, flow_key, hex, icmp_error, Ipv4, ETH_P_ARP, ETH_P_IPV6, ICMP_FRAGMENTATION_NEEDED,
        ICMP_PORT_UNREACHABLE, ICMP_TTL_EXCEEDED, L4, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
    },
};
use proxy_common::{
    NatEntry, Stat, FLOW_TCP_CLOSED_SECS, FLOW_TCP_IDLE_SECS, FLOW_TCP_UNREPLIED_SECS, FLOW_UDP_SECS,
    FLOW_UDP_STREAM_SECS, IPPROTO_TCP, IPPROTO_UDP, NAT_REPLY, TC_PROGRAM,
};
use proxy_user::{
    dataplane::maps::{FlowMaps, ServiceMaps},
    model::{
        objects::{ObjectName, Protocol},
        BackendAddr, DesiredState, Frontend, FrontendKind, FrontendState,
    },
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 50);
const OTHER: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 99);

fn backend(i: u8) -> BackendAddr {
    BackendAddr {
        ip: Ipv4Addr::new(10, 244, 0, 10 + i),
        port: 8080,
        local: false,
        terminating: false,
    }
}

fn frontend(ip: Ipv4Addr, port: u16, protocol: Protocol, backends: &[BackendAddr]) -> (Frontend, FrontendState) {
    (
        Frontend { ip, port, protocol },
        FrontendState {
            service: ObjectName {
                namespace: "default".into(),
                name: "web".into(),
            },
            kind: FrontendKind::ClusterIp,
            backends: backends.iter().copied().collect(),
            external_local: None,
            affinity_timeout: None,
            source_ranges: Vec::new(),
            reject: false,
        },
    )
}

fn desired(entries: Vec<(Frontend, FrontendState)>) -> DesiredState {
    DesiredState {
        frontends: entries.into_iter().collect(),
        conflicts: vec![],
    }
}

/// VIP:80/TCP and VIP:53/UDP over three backends, EMPTY_VIP:80 with none.
fn loaded() -> Loaded {
    let mut dp = Loaded::new().expect("load the programs");
    let three = [backend(0), backend(1), backend(2)];
    dp.program(&desired(vec![
        frontend(VIP, 80, Protocol::Tcp, &three),
        frontend(VIP, 53, Protocol::Udp, &three),
        frontend(EMPTY_VIP, 80, Protocol::Tcp, &[]),
    ]))
    .unwrap();
    dp
}

fn stats(dp: &Loaded) -> BTreeMap<&'static str, u64> {
    dp.stats().unwrap().into_iter().map(|(s, n)| (s.name(), n)).collect()
}

/// Runs one packet through the pod-facing program and checks verdict,
/// output and that exactly `stat` moved.
fn expect(dp: &Loaded, name: &str, input: &[u8], verdict: i32, output: &[u8], stat: Stat) {
    dp.expect_from(TC_PROGRAM, name, input, verdict, output, stat);
}

/// A backend's reply must come out with the service address as its source.
fn expect_reverse_nat(dp: &Loaded, name: &str, reply: Ipv4, service: (Ipv4Addr, u16)) {
    let expected = reply.clone().with_src(service).frame();
    expect(dp, name, &reply.frame(), TC_ACT_UNSPEC, &expected, Stat::Reply);
}

/// Which backend a translated request went to.
fn backend_of(frame: &[u8]) -> (Ipv4Addr, u16) {
    packet::endpoints_of(frame).1
}

fn with_dst(p: Ipv4, dst: BackendAddr) -> Ipv4 {
    p.with_dst((dst.ip, dst.port))
}

#[test]
fn tcp_flow_is_translated_both_ways_with_exact_checksums() {
    let dp = loaded();
    let syn = packet::tcp((CLIENT, 40000), (VIP, 80), TCP_SYN);
    let first = dp.run(&syn.frame()).unwrap();
    let (ip, port) = backend_of(&first.frame);
    let chosen = BackendAddr {
        ip,
        port,
        local: false,
        terminating: false,
    };
    assert!([backend(0), backend(1), backend(2)].contains(&chosen));
    assert_eq!(first.verdict, TC_ACT_UNSPEC);
    assert_eq!(hex(&first.frame), hex(&with_dst(syn, chosen).frame()), "SYN after DNAT");

    // Later packets of the flow: same backend, checksums still exact.
    let ack = packet::tcp((CLIENT, 40000), (VIP, 80), TCP_ACK);
    expect(
        &dp,
        "established ACK",
        &ack.frame(),
        TC_ACT_UNSPEC,
        &with_dst(ack.clone(), chosen).frame(),
        Stat::Established,
    );

    // The backend's reply gets the service address back.
    let reply = packet::tcp((chosen.ip, chosen.port), (CLIENT, 40000), TCP_SYN | TCP_ACK);
    expect_reverse_nat(&dp, "reply", reply, (VIP, 80));
}

#[test]
fn a_service_keeping_its_port_translates_only_the_address_with_exact_checksums() {
    let mut dp = Loaded::new().expect("load the programs");
    let same_port = BackendAddr {
        ip: Ipv4Addr::new(10, 244, 0, 20),
        port: 80,
        local: false,
        terminating: false,
    };
    dp.program(&desired(vec![
        frontend(VIP, 80, Protocol::Tcp, &[same_port]),
        frontend(VIP, 80, Protocol::Udp, &[same_port]),
    ]))
    .unwrap();
    for (flags, stat) in [(TCP_SYN, Stat::NewFlow), (TCP_ACK, Stat::Established)] {
        let request = packet::tcp((CLIENT, 40001), (VIP, 80), flags);
        let expected = with_dst(request.clone(), same_port).frame();
        expect(&dp, "TCP request", &request.frame(), TC_ACT_UNSPEC, &expected, stat);
    }
    let reply = packet::tcp((same_port.ip, 80), (CLIENT, 40001), TCP_SYN | TCP_ACK);
    expect_reverse_nat(&dp, "TCP reply", reply, (VIP, 80));

    let datagram = packet::udp((CLIENT, 40002), (VIP, 80));
    let expected = with_dst(datagram.clone(), same_port).frame();
    expect(
        &dp,
        "UDP request",
        &datagram.frame(),
        TC_ACT_UNSPEC,
        &expected,
        Stat::NewFlow,
    );
    let answer = packet::udp((same_port.ip, 80), (CLIENT, 40002));
    expect_reverse_nat(&dp, "UDP reply", answer, (VIP, 80));
}

#[test]
fn udp_is_translated_and_a_zero_checksum_stays_zero() {
    let dp = loaded();
    let query = packet::udp((CLIENT, 5000), (VIP, 53));
    let out = dp.run(&query.frame()).unwrap();
    let (ip, port) = backend_of(&out.frame);
    let chosen = BackendAddr {
        ip,
        port,
        local: false,
        terminating: false,
    };
    assert_eq!(hex(&out.frame), hex(&with_dst(query, chosen).frame()));

    let mut bare = packet::udp((CLIENT, 5001), (VIP, 53));
    if let L4::Udp { no_checksum, .. } = &mut bare.l4 {
        *no_checksum = true;
    }
    let out = dp.run(&bare.frame()).unwrap();
    let chosen = {
        let (ip, port) = backend_of(&out.frame);
        BackendAddr {
            ip,
            port,
            local: false,
            terminating: false,
        }
    };
    let expected = with_dst(bare, chosen).frame();
    assert_eq!(
        hex(&out.frame),
        hex(&expected),
        "UDP without checksum must keep checksum 0"
    );
    assert_eq!(&out.frame[14 + 20 + 6..14 + 20 + 8], &[0, 0]);

    let reply = packet::udp((chosen.ip, chosen.port), (CLIENT, 5001));
    expect_reverse_nat(&dp, "UDP reply", reply, (VIP, 53));
}

#[test]
fn ip_options_are_skipped_and_kept() {
    let dp = loaded();
    let mut syn = packet::tcp((CLIENT, 41000), (VIP, 80), TCP_SYN);
    // Router alert (RFC 2113), 4 bytes: IHL 6.
    syn.options = vec![0x94, 0x04, 0x00, 0x00];
    let out = dp.run(&syn.frame()).unwrap();
    assert_eq!(out.verdict, TC_ACT_UNSPEC);
    let (ip, port) = backend_of(&out.frame);
    assert_eq!(
        hex(&out.frame),
        hex(&with_dst(
            syn,
            BackendAddr {
                ip,
                port,
                local: false,
                terminating: false
            }
        )
        .frame())
    );
}

#[test]
fn fixtures_that_pass_untouched_or_drop() {
    let dp = loaded();
    let to_vip = packet::tcp((CLIENT, 42000), (VIP, 80), TCP_SYN);

    let mut later_fragment = packet::udp((CLIENT, 42001), (VIP, 53));
    later_fragment.frag = 185; // offset 1480 bytes
    let icmp = Ipv4 {
        src: CLIENT,
        dst: VIP,
        frag: 0,
        options: vec![],
        l4: L4::Raw {
            proto: 1,
            payload: vec![8, 0, 0xf7, 0xff, 0, 0, 0, 0],
        },
    };
    let full = to_vip.frame();
    let mut bad_ihl = full.clone();
    bad_ihl[14] = 0x44; // IHL 4: shorter than the minimum header
    let mut lying_length = full.clone();
    lying_length[16..18].copy_from_slice(&20u16.to_be_bytes()); // total length: no room for TCP
    let mut arp = vec![0u8; 28];
    arp[..8].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);

    let untouched: Vec<(&str, Vec<u8>, Stat)> = vec![
        (
            "no service at that address",
            packet::tcp((CLIENT, 42002), (OTHER, 80), TCP_SYN).frame(),
            Stat::NoMatch,
        ),
        (
            "service address, other port",
            packet::tcp((CLIENT, 42003), (VIP, 81), TCP_SYN).frame(),
            Stat::NoMatch,
        ),
        (
            "service port, other protocol",
            packet::udp((CLIENT, 42004), (VIP, 80)).frame(),
            Stat::NoMatch,
        ),
        ("ICMP echo to a service address", icmp.frame(), Stat::NoMatch),
        (
            "ICMP error about no tracked flow",
            packet::icmp_error(
                OTHER,
                CLIENT,
                ICMP_PORT_UNREACHABLE,
                0,
                &packet::udp((CLIENT, 42006), (OTHER, 53)),
                28,
            )
            .frame(),
            Stat::NoMatch,
        ),
        ("ARP", ethernet(ETH_P_ARP, &arp), Stat::NotIpv4),
        ("IPv6", ethernet(ETH_P_IPV6, &[0x60; 60]), Stat::NotIpv4),
        (
            "IPv4 ethertype, version 6 inside",
            {
                let mut f = full.clone();
                f[14] = 0x65;
                f
            },
            Stat::NotIpv4,
        ),
        (
            "a later fragment whose first was not seen",
            later_fragment.frame(),
            Stat::Fragment,
        ),
        // (An IPv4 frame with under 20 bytes of header cannot be fed in: the kernel's
        // BPF_PROG_TEST_RUN itself refuses to build such an skb.)
        (
            "IHL claims options past the end",
            {
                let mut f = full[..14 + 20].to_vec();
                f[14] = 0x4f;
                f[16..18].copy_from_slice(&60u16.to_be_bytes());
                f
            },
            Stat::Truncated,
        ),
        ("TCP header cut short", full[..14 + 20 + 10].to_vec(), Stat::Truncated),
        ("IHL below 5", bad_ihl, Stat::Truncated),
        ("total length leaves no room for TCP", lying_length, Stat::Truncated),
    ];
    for (name, frame, stat) in untouched {
        expect(&dp, name, &frame, TC_ACT_UNSPEC, &frame, stat);
    }

    let no_backend = packet::tcp((CLIENT, 42005), (EMPTY_VIP, 80), TCP_SYN).frame();
    let before = stats(&dp);
    assert_eq!(
        dp.run(&no_backend).unwrap().verdict,
        TC_ACT_SHOT,
        "an empty endpoint set that is not a refusal (a local-only policy's) drops"
    );
    assert_eq!(stats(&dp)["no_backend"], before["no_backend"] + 1);
}

#[test]
fn new_flows_rotate_exactly_over_the_backends() {
    let dp = loaded();
    let mut order = Vec::new();
    for sport in 0..30u16 {
        let out = dp
            .run(&packet::tcp((CLIENT, 30000 + sport), (VIP, 80), TCP_SYN).frame())
            .unwrap();
        order.push(backend_of(&out.frame).0);
    }
    let distinct: BTreeSet<_> = order[..3].iter().collect();
    assert_eq!(distinct.len(), 3, "the first three flows take three backends");
    for (i, ip) in order.iter().enumerate() {
        assert_eq!(*ip, order[i % 3], "flow {i} broke the rotation: {order:?}");
    }
}

#[test]
fn a_reused_tuple_whose_backend_left_is_balanced_again() {
    let mut dp = loaded();
    let syn = packet::tcp((CLIENT, 43000), (VIP, 80), TCP_SYN);
    let (gone, _) = backend_of(&dp.run(&syn.frame()).unwrap().frame);
    let survivors: Vec<BackendAddr> = (0..3).map(backend).filter(|b| b.ip != gone).collect();
    dp.program(&desired(vec![frontend(VIP, 80, Protocol::Tcp, &survivors)]))
        .unwrap();

    // Established packets of the old flow still go where they went.
    let ack = packet::tcp((CLIENT, 43000), (VIP, 80), TCP_ACK);
    assert_eq!(backend_of(&dp.run(&ack.frame()).unwrap().frame).0, gone);
    // A new connection on the same tuple does not.
    let (again, _) = backend_of(&dp.run(&syn.frame()).unwrap().frame);
    assert!(
        survivors.iter().any(|b| b.ip == again),
        "{again} is not a current backend"
    );
    // A retransmitted SYN of a flow whose backend stays keeps it.
    let syn2 = packet::tcp((CLIENT, 43001), (VIP, 80), TCP_SYN);
    let (first, _) = backend_of(&dp.run(&syn2.frame()).unwrap().frame);
    let (retransmit, _) = backend_of(&dp.run(&syn2.frame()).unwrap().frame);
    assert_eq!(first, retransmit);
}

#[test]
fn the_checksum_helper_agrees_with_a_known_header() {
    // RFC 1071 example header (checksum field zeroed): 0xb1e6.
    let header = [
        0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0, 0, 0xc0, 0xa8, 0x00, 0x01, 0xc0, 0xa8, 0x00,
        0xc7,
    ];
    assert_eq!(checksum(&header, 0), 0xb861);
}

#[test]
fn a_direct_connection_reusing_a_service_flows_port_is_not_reverse_translated() {
    let dp = loaded();
    // A service flow from port 44000 lands on some backend...
    let syn = packet::tcp((CLIENT, 44000), (VIP, 80), TCP_SYN);
    let (backend_ip, backend_port) = backend_of(&dp.run(&syn.frame()).unwrap().frame);
    // ...and later the same client port connects to that backend directly.
    let direct = packet::tcp((CLIENT, 44000), (backend_ip, backend_port), TCP_SYN).frame();
    expect(&dp, "direct SYN", &direct, TC_ACT_UNSPEC, &direct, Stat::NoMatch);
    // Its replies are the backend's own, not the service's.
    let reply = packet::tcp((backend_ip, backend_port), (CLIENT, 44000), TCP_SYN | TCP_ACK).frame();
    expect(
        &dp,
        "reply to the direct connection",
        &reply,
        TC_ACT_UNSPEC,
        &reply,
        Stat::NoMatch,
    );
    // The port goes back to the service: its replies are the service's again.
    let syn = packet::tcp((CLIENT, 44000), (VIP, 80), TCP_SYN);
    let (ip, port) = backend_of(&dp.run(&syn.frame()).unwrap().frame);
    let reply = packet::tcp((ip, port), (CLIENT, 44000), TCP_SYN | TCP_ACK);
    expect_reverse_nat(&dp, "reply to the service again", reply, (VIP, 80));
    // The same holds for UDP.
    let query = packet::udp((CLIENT, 5300), (VIP, 53));
    let (ip, port) = backend_of(&dp.run(&query.frame()).unwrap().frame);
    let direct = packet::udp((CLIENT, 5300), (ip, port)).frame();
    expect(&dp, "direct UDP", &direct, TC_ACT_UNSPEC, &direct, Stat::NoMatch);
    let answer = packet::udp((ip, port), (CLIENT, 5300)).frame();
    expect(
        &dp,
        "answer to direct UDP",
        &answer,
        TC_ACT_UNSPEC,
        &answer,
        Stat::NoMatch,
    );
}

#[test]
fn a_syn_reusing_a_tracked_tuple_restores_a_lost_reply_entry() {
    let dp = loaded();
    let syn = packet::tcp((CLIENT, 45000), (VIP, 80), TCP_SYN);
    let (ip, port) = backend_of(&dp.run(&syn.frame()).unwrap().frame);
    // The LRU evicted the reply side only (simulated).
    let mut flows = FlowMaps::open(&dp.pin_dir).unwrap();
    assert!(flows
        .remove(&flow_key((ip, port), (CLIENT, 45000), IPPROTO_TCP))
        .unwrap());
    // A new connection on the same tuple (port reuse, or the SYN retransmitted).
    let out = dp.run(&syn.frame()).unwrap();
    assert_eq!(backend_of(&out.frame), (ip, port));
    let reply = packet::tcp((ip, port), (CLIENT, 45000), TCP_SYN | TCP_ACK);
    expect_reverse_nat(&dp, "reply", reply, (VIP, 80));
}

#[test]
fn established_connections_of_a_deleted_service_keep_working() {
    let mut dp = loaded();
    let syn = packet::tcp((CLIENT, 46000), (VIP, 80), TCP_SYN);
    let (ip, port) = backend_of(&dp.run(&syn.frame()).unwrap().frame);
    dp.program(&desired(vec![])).unwrap();
    // As with kube-proxy's conntrack: the open connection keeps its translation...
    let ack = packet::tcp((CLIENT, 46000), (VIP, 80), TCP_ACK);
    expect(
        &dp,
        "request",
        &ack.frame(),
        TC_ACT_UNSPEC,
        &with_dst(
            ack.clone(),
            BackendAddr {
                ip,
                port,
                local: false,
                terminating: false,
            },
        )
        .frame(),
        Stat::Established,
    );
    let reply = packet::tcp((ip, port), (CLIENT, 46000), TCP_ACK);
    expect_reverse_nat(&dp, "reply", reply, (VIP, 80));
    // ...while a new connection to the deleted service is not translated.
    let new = packet::tcp((CLIENT, 46001), (VIP, 80), TCP_SYN).frame();
    expect(&dp, "new connection", &new, TC_ACT_UNSPEC, &new, Stat::NoMatch);
}

fn backend_marked(dp: &Loaded, b: (Ipv4Addr, u16)) -> bool {
    ServiceMaps::open(&dp.pin_dir)
        .unwrap()
        .backend_marked(proxy_common::addr_to_map(b.0), b.1.to_be(), 6)
}

fn rebuild_filter(dp: &Loaded) {
    let flows = FlowMaps::open(&dp.pin_dir).unwrap();
    ServiceMaps::open(&dp.pin_dir).unwrap().rebuild_filter(&flows).unwrap();
}

#[test]
fn replies_are_looked_up_only_from_backends_that_translated_flows_reach() {
    let dp = loaded();
    let all: Vec<(Ipv4Addr, u16)> = (0..3).map(backend).map(|b| (b.ip, b.port)).collect();
    // Programming services marks no backend: packets from a backend that
    // only ever answers connections made straight to it (or balanced at
    // the socket) skip the conntrack table.
    assert!(
        all.iter().all(|&b| !backend_marked(&dp, b)),
        "no backend marked before any flow"
    );
    let syn = packet::tcp((CLIENT, 47000), (VIP, 80), TCP_SYN);
    let chosen = backend_of(&dp.run(&syn.frame()).unwrap().frame);
    assert!(backend_marked(&dp, chosen), "translating a flow marks its backend");
    for &b in all.iter().filter(|&&b| b != chosen) {
        assert!(!backend_marked(&dp, b), "{b:?} received no flow yet");
    }
    // Its replies are reverse-translated from the first one on.
    let reply = packet::tcp(chosen, (CLIENT, 47000), TCP_SYN | TCP_ACK);
    expect_reverse_nat(&dp, "first reply", reply, (VIP, 80));
    // A pod in the marked backend's /24, from a port of its own, to no
    // service: passed as it is (the /24-and-port bits rule it out).
    let beside = packet::tcp((CLIENT, 47001), (OTHER, 80), TCP_ACK).frame();
    expect(
        &dp,
        "a packet from beside a marked backend",
        &beside,
        TC_ACT_UNSPEC,
        &beside,
        Stat::NoMatch,
    );
}

fn forget_all_flows(dp: &Loaded) {
    let mut flows = FlowMaps::open(&dp.pin_dir).unwrap();
    for (key, _) in flows.entries().unwrap() {
        flows.remove(&key).unwrap();
    }
}

#[test]
fn a_restart_keeps_the_marks_flows_need_and_drops_the_rest() {
    let mut dp = loaded();
    let syn = packet::tcp((CLIENT, 48000), (VIP, 80), TCP_SYN);
    let chosen = backend_of(&dp.run(&syn.frame()).unwrap().frame);
    // A backend still in service keeps its mark with no flow tracked: the
    // data path may be marking it again at this very moment.
    forget_all_flows(&dp);
    rebuild_filter(&dp);
    assert!(backend_marked(&dp, chosen), "mark of a current backend");
    // One whose service is gone keeps it while a flow to it is tracked.
    let syn = packet::tcp((CLIENT, 48001), (VIP, 80), TCP_SYN);
    let chosen = backend_of(&dp.run(&syn.frame()).unwrap().frame);
    dp.program(&desired(vec![])).unwrap();
    rebuild_filter(&dp);
    assert!(backend_marked(&dp, chosen), "mark of a backend with a tracked flow");
    let reply = packet::tcp(chosen, (CLIENT, 48001), TCP_ACK);
    expect_reverse_nat(&dp, "reply after the rebuild", reply, (VIP, 80));
    // Once nothing can reach it any more, the mark goes.
    forget_all_flows(&dp);
    rebuild_filter(&dp);
    assert!(!backend_marked(&dp, chosen), "mark of a backend nothing reaches");
}

/// Filters earlier builds pinned: (entries, mappable). The first one; and
/// the one before the /24-and-port bitmaps, whose halves are shorter.
const OLDER_FILTERS: [(u32, bool); 2] = [(32_768, false), (2 * (16_384 + 1_024), true)];

#[test]
fn an_upgrade_replaces_a_filter_of_an_older_layout_and_keeps_flows_working() {
    for (entries, mappable) in OLDER_FILTERS {
        upgrade_from_filter(entries, mappable);
    }
}

fn upgrade_from_filter(entries: u32, mappable: bool) {
    let mut dp = loaded();
    let syn = packet::tcp((CLIENT, 49000), (VIP, 80), TCP_SYN);
    let chosen = backend_of(&dp.run(&syn.frame()).unwrap().frame);
    // A load by the same build takes every pinned map as it is.
    let inode = |name: &str| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(dp.pin_dir.join(name)).unwrap());
    let names = [
        proxy_common::map_name::FILTER,
        proxy_common::map_name::CONNTRACK,
        proxy_common::map_name::SERVICES,
    ];
    let before: Vec<u64> = names.iter().map(|n| inode(n)).collect();
    let again = proxy_user::dataplane::loader::load(&dp.pin_dir).unwrap();
    drop(again);
    assert_eq!(
        names.iter().map(|n| inode(n)).collect::<Vec<_>>(),
        before,
        "no map replaced"
    );
    // What an earlier build pinned: a smaller filter.
    let older = kpr_testbed::bpffs::OlderMap {
        name: "FILTER",
        kind: "array",
        key_size: 4,
        value_size: 8,
        entries,
        flags: if mappable { 1024 } else { 0 },
    };
    older.pin(&dp.pin_dir.join(proxy_common::map_name::FILTER)).unwrap();
    assert!(
        ServiceMaps::open(&dp.pin_dir).is_err(),
        "the old layout ({entries} entries) cannot be used"
    );
    // The next daemon's load replaces it; its rebuild refills it from what
    // is programmed and tracked.
    dp.ebpf = proxy_user::dataplane::loader::load(&dp.pin_dir).unwrap();
    rebuild_filter(&dp);
    assert!(backend_marked(&dp, chosen), "the tracked flow's backend");
    let reply = packet::tcp(chosen, (CLIENT, 49000), TCP_ACK);
    expect_reverse_nat(&dp, "reply of a flow from before the upgrade", reply, (VIP, 80));
    let ack = packet::tcp((CLIENT, 49000), (VIP, 80), TCP_ACK);
    let expected = with_dst(
        ack.clone(),
        BackendAddr {
            ip: chosen.0,
            port: chosen.1,
            local: false,
            terminating: false,
        },
    )
    .frame();
    expect(
        &dp,
        "request of that flow",
        &ack.frame(),
        TC_ACT_UNSPEC,
        &expected,
        Stat::Established,
    );
    let new = packet::tcp((CLIENT, 49001), (VIP, 80), TCP_SYN);
    assert_eq!(
        dp.run(&new.frame()).unwrap().verdict,
        TC_ACT_UNSPEC,
        "a new flow to the service"
    );
}

#[test]
fn client_ip_affinity_keeps_a_client_on_its_backend_until_it_expires_or_leaves() {
    let mut dp = Loaded::new().expect("load the programs");
    let three = [backend(0), backend(1), backend(2)];
    let mut web = frontend(VIP, 80, Protocol::Tcp, &three);
    web.1.affinity_timeout = Some(60);
    dp.program(&desired(vec![web.clone()])).unwrap();
    let first_choice = |dp: &Loaded, client: Ipv4Addr, sport: u16| {
        let out = dp
            .run(&packet::tcp((client, sport), (VIP, 80), TCP_SYN).frame())
            .unwrap();
        backend_of(&out.frame)
    };
    let a = first_choice(&dp, CLIENT, 46000);
    for sport in 46001..46006 {
        assert_eq!(
            first_choice(&dp, CLIENT, sport),
            a,
            "new connection from the same client"
        );
    }
    let b = first_choice(&dp, OTHER, 46000);
    assert_ne!(a, b, "another client is balanced as usual");

    // Expired: the client's last new connection is older than the timeout.
    let mut flows = FlowMaps::open(&dp.pin_dir).unwrap();
    let (key, mut remembered) = flows
        .affinities()
        .unwrap()
        .into_iter()
        .find(|(k, _)| k.client == u32::from_ne_bytes(CLIENT.octets()) as u64)
        .expect("the client's choice is remembered");
    remembered.last_used -= 61;
    flows.remember(&key, &remembered).unwrap();
    let fresh = first_choice(&dp, CLIENT, 46010);
    assert_ne!(fresh, a, "expired: the next in the rotation");
    assert_eq!(first_choice(&dp, CLIENT, 46011), fresh, "and that one is remembered");

    // The remembered backend leaves: the client moves at once.
    let survivors: Vec<BackendAddr> = three.iter().copied().filter(|b| b.ip != fresh.0).collect();
    web.1.backends = survivors.iter().copied().collect();
    dp.program(&desired(vec![web])).unwrap();
    let moved = first_choice(&dp, CLIENT, 46012);
    assert!(
        survivors.iter().any(|b| b.ip == moved.0),
        "{moved:?} is not a current backend"
    );
    assert_eq!(first_choice(&dp, CLIENT, 46013), moved);
}

#[test]
fn a_syn_on_the_tuple_of_a_closed_connection_is_balanced_afresh() {
    let dp = loaded();
    let ack = |flags| packet::tcp((CLIENT, 48000), (VIP, 80), flags);
    let syn = || dp.run(&ack(TCP_SYN).frame()).unwrap();
    let first = backend_of(&syn().frame);
    // Retransmitted while nothing closed: the same backend.
    assert_eq!(backend_of(&syn().frame), first);
    // A FIN each way: the connection is over; the next SYN takes the next slot.
    dp.run(&ack(TCP_ACK | TCP_FIN).frame()).unwrap();
    dp.run(&packet::tcp(first, (CLIENT, 48000), TCP_ACK | TCP_FIN).frame())
        .unwrap();
    let second = backend_of(&syn().frame);
    assert_ne!(second, first, "closed with FINs: balanced afresh");
    // A RST from the backend ends it too.
    dp.run(&packet::tcp(second, (CLIENT, 48000), TCP_RST).frame()).unwrap();
    let third = backend_of(&syn().frame);
    assert!(
        third != second && third != first,
        "closed with a RST: the rotation goes on"
    );
    // Its reply direction is the new backend's.
    let reply = packet::tcp(third, (CLIENT, 48000), TCP_SYN | TCP_ACK);
    expect_reverse_nat(&dp, "reply of the new connection", reply, (VIP, 80));
}

#[test]
fn a_tcp_packet_of_no_tracked_flow_is_not_sent_to_a_backend_chosen_anew() {
    let dp = loaded();
    let stray = packet::tcp((CLIENT, 49400), (VIP, 80), TCP_ACK).frame();
    expect(&dp, "ACK of no tracked flow", &stray, TC_ACT_SHOT, &stray, Stat::NoFlow);
}

/// Idle garbage (a DNS query per pair of entries) far beyond the table's
/// size must not push out a long-lived connection that keeps talking: the
/// LRU keeps what is used.
#[test]
fn a_long_lived_connection_survives_far_more_idle_flows_than_the_table_holds() {
    let dp = loaded();
    let syn = packet::tcp((CLIENT, 49500), (VIP, 80), TCP_SYN);
    let backend = backend_of(&dp.run(&syn.frame()).unwrap().frame);
    let ack = packet::tcp((CLIENT, 49500), (VIP, 80), TCP_ACK);
    let translated = ack.clone().with_dst(backend).frame();
    // Twice the table's size in entries (each flow takes two).
    let flows = proxy_common::MAX_CONNTRACK as usize;
    for i in 0..flows {
        let client = Ipv4Addr::from(0x0AFA_0000 + (i / 1000) as u32);
        let query = packet::udp((client, 10_000 + (i % 1000) as u16), (VIP, 53));
        dp.run(&query.frame()).unwrap();
        if i % 2000 == 0 {
            // A request and its answer: the connection talks both ways.
            let out = dp.run(&ack.frame()).unwrap();
            assert_eq!(
                hex(&out.frame),
                hex(&translated),
                "the connection lost its flow after {i} idle ones"
            );
            let answer = packet::tcp(backend, (CLIENT, 49500), TCP_ACK);
            let out = dp.run(&answer.frame()).unwrap();
            assert_eq!(
                hex(&out.frame),
                hex(&answer.with_src((VIP, 80)).frame()),
                "the connection's answers lost their flow after {i} idle ones"
            );
        }
    }
    let out = dp.run(&ack.frame()).unwrap();
    assert_eq!(hex(&out.frame), hex(&translated));
    let reply = packet::tcp(backend, (CLIENT, 49500), TCP_ACK);
    expect_reverse_nat(&dp, "its reply", reply, (VIP, 80));
}

/// One client port reaching two services that share a backend: the second
/// flow's source port is remapped, so each reply is taken for its own flow.
#[test]
fn two_flows_never_share_a_translated_tuple() {
    let mut dp = Loaded::new().expect("load the programs");
    let other_vip = Ipv4Addr::new(10, 96, 0, 13);
    let shared = [backend(0)];
    dp.program(&desired(vec![
        frontend(VIP, 80, Protocol::Tcp, &shared),
        frontend(other_vip, 80, Protocol::Tcp, &shared),
    ]))
    .unwrap();
    let b = (backend(0).ip, backend(0).port);
    let first = packet::tcp((CLIENT, 50000), (VIP, 80), TCP_SYN);
    expect(
        &dp,
        "first flow",
        &first.frame(),
        TC_ACT_UNSPEC,
        &first.clone().with_dst(b).frame(),
        Stat::NewFlow,
    );
    let second = packet::tcp((CLIENT, 50000), (other_vip, 80), TCP_SYN);
    let out = dp.run(&second.frame()).unwrap();
    let ((src, port), dst) = packet::endpoints_of(&out.frame);
    assert_eq!((src, dst), (CLIENT, b), "the second flow keeps its address");
    assert!(proxy_common::is_nat_port(port), "its source port is remapped: {port}");
    assert_eq!(
        hex(&out.frame),
        hex(&second.with_src((CLIENT, port)).with_dst(b).frame())
    );
    // Each reply goes to its own flow.
    expect_reverse_nat(
        &dp,
        "reply of the first",
        packet::tcp(b, (CLIENT, 50000), TCP_SYN | TCP_ACK),
        (VIP, 80),
    );
    let reply = packet::tcp(b, (CLIENT, port), TCP_SYN | TCP_ACK);
    let restored = reply
        .clone()
        .with_src((other_vip, 80))
        .with_dst((CLIENT, 50000))
        .frame();
    expect(
        &dp,
        "reply of the second",
        &reply.frame(),
        TC_ACT_UNSPEC,
        &restored,
        Stat::Reply,
    );
}

/// Waits for the data path's clock (whole seconds) to move on.
fn next_second() {
    let now = monotonic_secs();
    while monotonic_secs() == now {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A flow whose entry for one direction was lost (evicted) gets it back:
/// a UDP flow from the other direction's next packet in a later second (its
/// answers are translated again), a TCP connection from the daemon's sweep
/// (its packets reach the same backend instead of being dropped).
#[test]
fn a_flow_that_lost_one_direction_heals() {
    let dp = loaded();
    let mut flows = FlowMaps::open(&dp.pin_dir).unwrap();

    let query = packet::udp((CLIENT, 5300), (VIP, 53));
    let backend = backend_of(&dp.run(&query.frame()).unwrap().frame);
    assert!(flows.remove(&flow_key(backend, (CLIENT, 5300), IPPROTO_UDP)).unwrap());
    next_second();
    let translated = query.clone().with_dst(backend).frame();
    expect(
        &dp,
        "the next query",
        &query.frame(),
        TC_ACT_UNSPEC,
        &translated,
        Stat::Established,
    );
    expect_reverse_nat(&dp, "its answer", packet::udp(backend, (CLIENT, 5300)), (VIP, 53));

    let syn = packet::tcp((CLIENT, 45100), (VIP, 80), TCP_SYN);
    let backend = backend_of(&dp.run(&syn.frame()).unwrap().frame);
    let answer = packet::tcp(backend, (CLIENT, 45100), TCP_SYN | TCP_ACK);
    expect_reverse_nat(&dp, "the answer", answer, (VIP, 80));
    assert!(flows
        .remove(&flow_key((CLIENT, 45100), (VIP, 80), IPPROTO_TCP))
        .unwrap());
    let ack = packet::tcp((CLIENT, 45100), (VIP, 80), TCP_ACK);
    expect(&dp, "lost", &ack.frame(), TC_ACT_SHOT, &ack.frame(), Stat::NoFlow);
    let report = flows.sweep(monotonic_secs()).unwrap();
    assert_eq!(report.restored, 1, "the sweep restores the request entry");
    let translated = ack.clone().with_dst(backend).frame();
    expect(
        &dp,
        "restored",
        &ack.frame(),
        TC_ACT_UNSPEC,
        &translated,
        Stat::Established,
    );
}

/// Client ports of the flows in the table, each with both its entries.
fn tracked_client_ports(flows: &FlowMaps) -> BTreeSet<u16> {
    let mut entries: BTreeMap<u16, usize> = BTreeMap::new();
    for (key, entry) in flows.entries().unwrap() {
        let port = if entry.flags & NAT_REPLY != 0 {
            key.dst_port
        } else {
            key.src_port
        };
        *entries.entry(u16::from_be(port)).or_default() += 1;
    }
    for (port, n) in &entries {
        assert_eq!(*n, 2, "flow from port {port}: both directions or neither");
    }
    entries.into_keys().collect()
}

/// Runs a TCP exchange: `(from the client, flags)` per packet.
fn tcp_exchange(dp: &Loaded, port: u16, packets: &[(bool, u8)]) {
    let syn = packet::tcp((CLIENT, port), (VIP, 80), TCP_SYN);
    let backend = backend_of(&dp.run(&syn.frame()).unwrap().frame);
    for &(from_client, flags) in packets {
        let frame = if from_client {
            packet::tcp((CLIENT, port), (VIP, 80), flags).frame()
        } else {
            packet::tcp(backend, (CLIENT, port), flags).frame()
        };
        dp.run(&frame).unwrap();
    }
}

/// Runs UDP queries from `port`, each answered, `seconds` apart (0: one).
fn udp_exchanges(dp: &Loaded, port: u16, seconds: usize) {
    for i in 0..=seconds {
        if i > 0 {
            next_second();
        }
        let query = packet::udp((CLIENT, port), (VIP, 53));
        let backend = backend_of(&dp.run(&query.frame()).unwrap().frame);
        dp.run(&packet::udp(backend, (CLIENT, port)).frame()).unwrap();
    }
}

/// The daemon's sweep, judged at later and later times: each kind of flow
/// goes when its timeout has passed, both directions together, and not
/// before.
#[test]
fn the_sweep_removes_each_flow_when_its_timeout_has_passed() {
    let dp = loaded();
    let (open, reset, finished, unanswered, exchange, stream) = (46001, 46002, 46003, 46004, 5301, 5302);
    tcp_exchange(&dp, open, &[(false, TCP_SYN | TCP_ACK), (true, TCP_ACK)]);
    tcp_exchange(&dp, reset, &[(false, TCP_SYN | TCP_ACK), (true, TCP_RST)]);
    tcp_exchange(
        &dp,
        finished,
        &[
            (false, TCP_SYN | TCP_ACK),
            (true, TCP_FIN | TCP_ACK),
            (false, TCP_FIN | TCP_ACK),
            (true, TCP_ACK),
        ],
    );
    tcp_exchange(&dp, unanswered, &[]);
    udp_exchanges(&dp, exchange, 0);
    udp_exchanges(&dp, stream, 1);
    let now = monotonic_secs();

    let mut flows = FlowMaps::open(&dp.pin_dir).unwrap();
    let mut left: BTreeSet<u16> = [open, reset, finished, unanswered, exchange, stream].into();
    assert_eq!(tracked_client_ports(&flows), left);
    let steps = [
        (0, vec![]),
        (FLOW_TCP_CLOSED_SECS, vec![reset, finished]),
        (FLOW_UDP_SECS, vec![exchange]),
        (FLOW_TCP_UNREPLIED_SECS, vec![unanswered]),
        (FLOW_UDP_STREAM_SECS, vec![stream]),
        (FLOW_TCP_IDLE_SECS, vec![open]),
    ];
    for (after, gone) in steps {
        let report = flows.sweep(now + after).unwrap();
        for port in &gone {
            left.remove(port);
        }
        assert_eq!(tracked_client_ports(&flows), left, "{after} s later");
        assert_eq!(report.removed, 2 * gone.len(), "{after} s later: entries removed");
        assert_eq!(report.entries, 2 * left.len(), "{after} s later: entries left");
    }
}

/// Flows recorded by a version that kept no times are not taken for
/// expired: the sweep gives them the time it runs at, and judges them from
/// there.
#[test]
fn the_sweep_gives_flows_without_times_one() {
    let dp = loaded();
    tcp_exchange(&dp, 46010, &[(false, TCP_SYN | TCP_ACK), (true, TCP_ACK)]);
    let mut flows = FlowMaps::open(&dp.pin_dir).unwrap();
    for (key, entry) in flows.entries().unwrap() {
        flows.insert(&key, &NatEntry { last_seen: 0, ..entry }).unwrap();
    }
    let later = monotonic_secs() + FLOW_TCP_IDLE_SECS;
    let report = flows.sweep(later).unwrap();
    assert_eq!((report.removed, report.stamped), (0, 2));
    assert!(flows.entries().unwrap().iter().all(|(_, e)| e.last_seen == later));
    let report = flows.sweep(later + FLOW_TCP_IDLE_SECS).unwrap();
    assert_eq!((report.removed, report.entries), (2, 0));
}

/// A router on the way to the backends.
const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);

/// ICMP errors about a translated flow reach the socket they are meant
/// for translated like the flow's packets, the packet they quote included,
/// every checksum recomputed by the builder: from the backend itself (its
/// port unreachable comes from the service), from a router on the way
/// (fragmentation needed, TTL exceeded: still from the router), and from
/// the client about a reply (to the backend).
#[test]
fn icmp_errors_about_translated_flows_are_translated_back() {
    let dp = loaded();
    let query = packet::udp((CLIENT, 5400), (VIP, 53));
    let backend = backend_of(&dp.run(&query.frame()).unwrap().frame);
    let sent = query.clone().with_dst(backend);
    let expect_error = |name: &str, error: Ipv4, restored: Ipv4| {
        expect(
            &dp,
            name,
            &error.frame(),
            TC_ACT_UNSPEC,
            &restored.frame(),
            Stat::IcmpError,
        );
    };
    // The whole datagram quoted, as Linux does.
    expect_error(
        "the backend's port unreachable",
        icmp_error(backend.0, CLIENT, ICMP_PORT_UNREACHABLE, 0, &sent, 576),
        icmp_error(VIP, CLIENT, ICMP_PORT_UNREACHABLE, 0, &query, 576),
    );
    // The header and 8 bytes, as RFC 792 asks: the UDP checksum is in them.
    expect_error(
        "a router's TTL exceeded",
        icmp_error(ROUTER, CLIENT, ICMP_TTL_EXCEEDED, 0, &sent, 28),
        icmp_error(ROUTER, CLIENT, ICMP_TTL_EXCEEDED, 0, &query, 28),
    );

    let syn = packet::tcp((CLIENT, 45200), (VIP, 80), TCP_SYN);
    let backend = backend_of(&dp.run(&syn.frame()).unwrap().frame);
    let sent = syn.clone().with_dst(backend);
    for quoted in [28, 576] {
        expect_error(
            &format!("a router's fragmentation needed, {quoted} bytes quoted"),
            icmp_error(ROUTER, CLIENT, ICMP_FRAGMENTATION_NEEDED, 1400, &sent, quoted),
            icmp_error(ROUTER, CLIENT, ICMP_FRAGMENTATION_NEEDED, 1400, &syn, quoted),
        );
    }

    // The client's socket is gone when the backend's answer arrives: its
    // port unreachable, about the answer as it saw it, goes to the backend
    // about the answer as the backend sent it.
    let query_backend = {
        let q = packet::udp((CLIENT, 5401), (VIP, 53));
        backend_of(&dp.run(&q.frame()).unwrap().frame)
    };
    let answer = packet::udp(query_backend, (CLIENT, 5401));
    let seen = answer.clone().with_src((VIP, 53));
    expect_error(
        "the client's port unreachable about an answer",
        icmp_error(CLIENT, VIP, ICMP_PORT_UNREACHABLE, 0, &seen, 576),
        icmp_error(CLIENT, query_backend.0, ICMP_PORT_UNREACHABLE, 0, &answer, 576),
    );
}

/// A UDP datagram in fragments: the first one carries the ports and is
/// translated as a whole packet would be (its checksum covers the whole
/// datagram); the later one follows it; both ways.
#[test]
fn fragments_of_a_translated_datagram_follow_the_first() {
    let dp = loaded();
    let mut query = packet::udp((CLIENT, 5500), (VIP, 53));
    if let L4::Udp { payload, .. } = &mut query.l4 {
        *payload = vec![7; 100];
    }
    let [first, later] = query.fragmented(16);
    let out = dp.run(&first.frame()).unwrap();
    let backend = backend_of(&out.frame);
    let [first_sent, later_sent] = query.clone().with_dst(backend).fragmented(16);
    assert_eq!(hex(&out.frame), hex(&first_sent.frame()), "the first fragment");
    expect(
        &dp,
        "the later fragment",
        &later.frame(),
        TC_ACT_UNSPEC,
        &later_sent.frame(),
        Stat::Established,
    );

    let mut answer = packet::udp(backend, (CLIENT, 5500));
    if let L4::Udp { payload, .. } = &mut answer.l4 {
        *payload = vec![9; 100];
    }
    let restored = answer.clone().with_src((VIP, 53));
    for (i, (part, expected)) in answer.fragmented(24).iter().zip(restored.fragmented(24)).enumerate() {
        expect(
            &dp,
            &format!("answer fragment {i}"),
            &part.frame(),
            TC_ACT_UNSPEC,
            &expected.frame(),
            Stat::Reply,
        );
    }
}

/// The per-service counters (`SERVICE_COUNTERS`): a new flow counts for the
/// backend it went to, and only once (not its later packets); a drop for
/// the service whose new flow it ended. And the drain flag: a new flow is then left
/// untouched, while a tracked one is still translated.
#[test]
fn new_flows_and_refusals_are_counted_per_service_and_draining_leaves_new_flows_alone() {
    let mut dp = loaded();
    let syn = packet::tcp((CLIENT, 43000), (VIP, 80), TCP_SYN);
    let first = dp.run(&syn.frame()).unwrap();
    let chosen = backend_of(&first.frame);
    for _ in 0..3 {
        dp.run(&packet::tcp((CLIENT, 43000), (VIP, 80), TCP_ACK).frame())
            .unwrap();
    }
    // EMPTY_VIP has no endpoint here and no REJECT: dropped.
    let dropped = dp
        .run(&packet::tcp((CLIENT, 43001), (EMPTY_VIP, 80), TCP_SYN).frame())
        .unwrap();
    assert_eq!(dropped.verdict, TC_ACT_SHOT);

    let maps = ServiceMaps::open(&dp.pin_dir).unwrap();
    let id = |vip, port| {
        maps.service(&proxy_common::ServiceKey::new(vip, port, IPPROTO_TCP))
            .unwrap()
            .unwrap()
            .id
    };
    let counters = FlowMaps::open(&dp.pin_dir).unwrap().service_counters().unwrap();
    let mut counted: Vec<(u32, Ipv4Addr, u16, &str, u64)> = counters
        .iter()
        .map(|(k, n)| {
            let stat = Stat::from_index(k.stat as u32).unwrap().name();
            (
                k.service_id,
                proxy_common::addr_from_map(k.addr),
                u16::from_be(k.port),
                stat,
                *n,
            )
        })
        .collect();
    counted.sort();
    let mut want = vec![
        (id(VIP, 80), chosen.0, chosen.1, "new_flow", 1),
        (id(EMPTY_VIP, 80), Ipv4Addr::UNSPECIFIED, 0, "no_backend", 1),
    ];
    want.sort();
    assert_eq!(counted, want);

    // Draining: a new connection goes on untouched; the tracked one is
    // still sent to its backend.
    dp.set_draining(true).unwrap();
    let new = packet::tcp((CLIENT, 43002), (VIP, 80), TCP_SYN);
    expect(
        &dp,
        "new flow while draining",
        &new.frame(),
        TC_ACT_UNSPEC,
        &new.frame(),
        Stat::NoMatch,
    );
    let ack = packet::tcp((CLIENT, 43000), (VIP, 80), TCP_ACK);
    let translated = ack.clone().with_dst(chosen).frame();
    expect(
        &dp,
        "tracked flow while draining",
        &ack.frame(),
        TC_ACT_UNSPEC,
        &translated,
        Stat::Established,
    );
}
