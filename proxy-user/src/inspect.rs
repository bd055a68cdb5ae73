//! What the CLI shows of the pinned maps, for operators: the tracked flows
//! (both directions' entries paired into one flow, with state and expiry)
//! and the remembered ClientIP affinities (with their expiry and whether
//! the data path would still honour them). Pure over snapshots of the maps,
//! so the judgements are tested on tables; `main` reads the maps and prints.
use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::{Ipv4Addr, SocketAddrV4},
    str::FromStr,
};

use proxy_common::{
    addr_from_map, AffinityKey, AffinityValue, Backend, BackendKey, FlowKey, NatEntry, ServiceCounterKey, ServiceKey,
    ServiceValue, Stat, AFFINITY_NETNS, FLOW_TCP_CLOSED_SECS, IPPROTO_TCP, IPPROTO_UDP, NAT_REPLY, NAT_SNAT,
    SVC_EXTERNAL_LOCAL, SVC_REJECT, SVC_SOURCE_RANGES,
};
use serde::Serialize;

use crate::{dataplane::sweep, telemetry::NamedFrontend};

fn endpoint(addr: u32, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(addr_from_map(addr), u16::from_be(port))
}

fn protocol_name(proto: u8) -> String {
    match proto {
        IPPROTO_TCP => "TCP".into(),
        IPPROTO_UDP => "UDP".into(),
        other => other.to_string(),
    }
}

/// One programmed frontend and its backends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceView {
    /// The Service (`namespace/name`) as the daemon named the frontend;
    /// none when the daemon could not be asked (the maps hold only ids).
    pub service: Option<String>,
    pub frontend: SocketAddrV4,
    pub protocol: String,
    /// ClusterIP, NodePort, LoadBalancer or externalIP.
    pub kind: &'static str,
    pub id: u32,
    /// externalTrafficPolicy Local: traffic from outside goes to local
    /// endpoints only (and is dropped without one).
    pub external_local: bool,
    /// loadBalancerSourceRanges apply to it.
    pub source_ranges: bool,
    /// ClientIP affinity timeout in seconds; none without affinity.
    pub affinity_timeout_secs: Option<u32>,
    /// No usable endpoint anywhere: new connections are refused (REJECT,
    /// as kube-proxy). No backend here without it: a local-only policy's
    /// traffic, dropped.
    pub rejecting: bool,
    pub backends: Vec<BackendView>,
    /// New flows refused or dropped, by verdict (`kpr stats`' names):
    /// `rejected`, `no_local_backend`, `source_denied`, ...
    pub refused_or_dropped: BTreeMap<&'static str, u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackendView {
    pub address: SocketAddrV4,
    pub slot: u32,
    /// The endpoint runs on this node.
    pub local: bool,
    /// `ready`, or `terminating` (still serving, used because there is no
    /// ready endpoint: kube-proxy's fallback).
    pub state: &'static str,
    /// Under externalTrafficPolicy Local, which traffic may reach it:
    /// `local` (every origin), `outside only` or `inside only`.
    pub set: Option<&'static str>,
    /// New flows (TCP connections, UDP flows) sent to it by this node, on
    /// both paths, since it became a backend of the service.
    pub new_flows: u64,
}

/// The frontends as programmed, with their backends by slot, the new flows
/// each was sent and the new flows refused or dropped (`counts`, from
/// `SERVICE_COUNTERS`), named after their Service where the daemon said
/// (`names`: a name counts only for the id and frontend it was given for,
/// so a frontend reprogrammed in between is not misnamed).
pub fn services(
    frontends: &[(ServiceKey, ServiceValue, Vec<Backend>)],
    counts: &HashMap<ServiceCounterKey, u64>,
    names: &[NamedFrontend],
) -> Vec<ServiceView> {
    let names: HashMap<(u32, &str), &str> = names
        .iter()
        .map(|n| ((n.id, n.labels.frontend.as_str()), n.labels.service.as_str()))
        .collect();
    frontends
        .iter()
        .map(|(key, value, backends)| {
            let external_local = value.flags & SVC_EXTERNAL_LOCAL != 0;
            let frontend = SocketAddrV4::new(key.ip(), key.port());
            let protocol = protocol_name(key.proto);
            let described = format!("{frontend}/{protocol}");
            ServiceView {
                service: names.get(&(value.id, described.as_str())).map(|s| s.to_string()),
                frontend,
                protocol,
                kind: value.kind().name(),
                id: value.id,
                external_local,
                source_ranges: value.flags & SVC_SOURCE_RANGES != 0,
                affinity_timeout_secs: (value.affinity_timeout != 0).then_some(value.affinity_timeout),
                rejecting: value.flags & SVC_REJECT != 0,
                backends: backends
                    .iter()
                    .zip(0u32..)
                    .map(|(b, slot)| BackendView {
                        address: SocketAddrV4::new(b.ip(), b.port()),
                        slot,
                        local: b.is_local(),
                        state: if b.is_terminating() { "terminating" } else { "ready" },
                        set: external_local.then_some(match slot {
                            s if s < value.cluster_start => "outside only",
                            s if s < value.local_count => "local",
                            _ => "inside only",
                        }),
                        new_flows: counts
                            .get(&ServiceCounterKey {
                                service_id: value.id,
                                addr: b.addr,
                                port: b.port,
                                stat: Stat::NewFlow as u16,
                            })
                            .copied()
                            .unwrap_or(0),
                    })
                    .collect(),
                refused_or_dropped: counts
                    .iter()
                    .filter(|(k, _)| k.service_id == value.id && k.stat != Stat::NewFlow as u16)
                    .filter_map(|(k, n)| Some((Stat::from_index(k.stat as u32)?.name(), *n)))
                    .collect(),
            }
        })
        .collect()
}

/// One tracked flow, as its client sees it and as its backend does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FlowView {
    pub protocol: String,
    pub client: SocketAddrV4,
    /// The service address the client dialled.
    pub frontend: SocketAddrV4,
    pub backend: SocketAddrV4,
    /// The source the backend sees instead of the client (this node and a
    /// NAT port), when the flow is source-NATed.
    pub source_nat: Option<SocketAddrV4>,
    pub service_id: u32,
    pub slot: u32,
    /// `unanswered`, `established`, `closed` (TCP); `unanswered`,
    /// `answered`, `stream` (UDP): what decides the timeout.
    pub state: &'static str,
    /// Seconds since either direction's last packet; none for a flow
    /// recorded by a version that kept no times (the sweep stamps it).
    pub idle_secs: Option<u32>,
    /// Seconds left before the sweep removes it unless a packet comes.
    pub expires_in_secs: Option<u32>,
    /// The direction whose entry is gone (evicted), if one is: the flow's
    /// next packet, or the sweep, restores it.
    pub missing: Option<&'static str>,
}

/// Pairs the table's entries into flows, as of `now` (seconds of the
/// monotonic clock the data path stamps entries with), ordered by frontend
/// then client.
pub fn flows(entries: &HashMap<FlowKey, NatEntry>, now: u32) -> Vec<FlowView> {
    let mut views = Vec::new();
    for (key, entry) in entries {
        let other = sweep::partner(entries, key, entry);
        let (request_key, request, reply, missing) = if entry.flags & NAT_REPLY == 0 {
            (*key, *entry, other.copied(), other.is_none().then_some("reply"))
        } else if other.is_some() {
            // Shown from its request entry.
            continue;
        } else {
            let (request_key, request) = entry.partner(key);
            (request_key, request, Some(*entry), Some("request"))
        };
        let present_request = (missing != Some("request")).then_some(&request);
        let state = NatEntry::flow_state(present_request, reply.as_ref(), request_key.proto);
        let last = NatEntry::flow_last_seen(present_request, reply.as_ref());
        let idle = (last != 0).then(|| now.saturating_sub(last));
        views.push(FlowView {
            protocol: protocol_name(request_key.proto),
            client: endpoint(request_key.src_addr, request_key.src_port),
            frontend: endpoint(request_key.dst_addr, request_key.dst_port),
            backend: endpoint(request.addr, request.port),
            source_nat: (request.flags & NAT_SNAT != 0).then(|| endpoint(request.nat_addr, request.nat_port)),
            service_id: request.service_id,
            slot: request.slot,
            state: state.name(),
            idle_secs: idle,
            expires_in_secs: idle.map(|idle| state.timeout(FLOW_TCP_CLOSED_SECS).saturating_sub(idle)),
            missing,
        });
    }
    views.sort_by_key(|v| (*v.frontend.ip(), v.frontend.port(), *v.client.ip(), v.client.port()));
    views
}

/// An address, with or without a port, that a filter matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddrFilter {
    pub ip: Ipv4Addr,
    pub port: Option<u16>,
}

impl AddrFilter {
    pub fn matches(&self, at: SocketAddrV4) -> bool {
        *at.ip() == self.ip && self.port.is_none_or(|p| p == at.port())
    }
}

impl FromStr for AddrFilter {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if let Ok(at) = text.parse::<SocketAddrV4>() {
            return Ok(AddrFilter {
                ip: *at.ip(),
                port: Some(at.port()),
            });
        }
        text.parse::<Ipv4Addr>()
            .map(|ip| AddrFilter { ip, port: None })
            .map_err(|_| format!("{text:?} is not an IPv4 address or address:port"))
    }
}

impl fmt::Display for AddrFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(port) => write!(f, "{}:{port}", self.ip),
            None => write!(f, "{}", self.ip),
        }
    }
}

/// Which flows or affinities to show: all of those matching every filter
/// given.
#[derive(Clone, Debug, Default)]
pub struct Filters {
    /// The frontend: its address (and port).
    pub service: Option<AddrFilter>,
    pub client: Option<Ipv4Addr>,
    pub backend: Option<AddrFilter>,
}

impl Filters {
    pub fn keep_flow(&self, flow: &FlowView) -> bool {
        self.service.is_none_or(|f| f.matches(flow.frontend))
            && self.client.is_none_or(|c| *flow.client.ip() == c)
            && self.backend.is_none_or(|f| f.matches(flow.backend))
    }
}

/// One remembered ClientIP affinity: a client of a service and the backend
/// its new connections go to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AffinityView {
    pub service_id: u32,
    /// The frontends of that service (address:port/protocol); affinity is
    /// remembered per frontend address's service id.
    pub frontends: Vec<String>,
    /// The client's address (per-packet path), or `netns:<cookie>` for a
    /// pod balanced at `connect()` (its network namespace).
    pub client: String,
    pub backend: SocketAddrV4,
    pub slot: u32,
    /// Seconds since the client's last new connection.
    pub idle_secs: u32,
    /// Seconds left of `timeoutSeconds`; none once the service no longer
    /// has affinity.
    pub expires_in_secs: Option<u32>,
    /// Whether the next connection would get this backend: within the
    /// timeout and the backend still in its slot. Otherwise the next one
    /// is balanced afresh and remembered in its place.
    pub in_force: bool,
}

/// The remembered affinities as of `now`, with the services' frontends and
/// backends as programmed, ordered by service then client.
pub fn affinities(
    remembered: &[(AffinityKey, AffinityValue)],
    frontends: &[(ServiceKey, ServiceValue)],
    backends: &HashMap<BackendKey, Backend>,
    now: u32,
) -> Vec<AffinityView> {
    let mut by_id: BTreeMap<u32, (Vec<String>, u32)> = BTreeMap::new();
    for (key, value) in frontends {
        let entry = by_id.entry(value.id).or_default();
        entry
            .0
            .push(format!("{}:{}/{}", key.ip(), key.port(), protocol_name(key.proto)));
        entry.1 = value.affinity_timeout;
    }
    let mut views: Vec<AffinityView> = remembered
        .iter()
        .map(|(key, value)| {
            let (frontends, timeout) = by_id.get(&key.service_id).cloned().unwrap_or_default();
            let idle = now.wrapping_sub(value.last_used);
            let expires_in = (timeout != 0).then(|| timeout.saturating_sub(idle));
            let in_slot = backends.get(&BackendKey {
                service_id: key.service_id,
                slot: value.slot,
            }) == Some(&value.backend);
            AffinityView {
                service_id: key.service_id,
                frontends,
                client: client_name(key.client),
                backend: endpoint(value.backend.addr, value.backend.port),
                slot: value.slot,
                idle_secs: idle,
                expires_in_secs: expires_in,
                // As the data path judges it: not more than the timeout.
                in_force: timeout != 0 && idle <= timeout && in_slot,
            }
        })
        .collect();
    views.sort_by(|a, b| (a.service_id, &a.client).cmp(&(b.service_id, &b.client)));
    views
}

fn client_name(client: u64) -> String {
    if client & AFFINITY_NETNS != 0 {
        format!("netns:{}", client & !AFFINITY_NETNS)
    } else {
        addr_from_map(client as u32).to_string()
    }
}

#[cfg(test)]
mod tests {
    use proxy_common::{addr_to_map, NAT_REDIRECT, SEEN_FIN, SEEN_STREAM};

    use super::*;
    use crate::telemetry::FrontendLabels;

    const NOW: u32 = 1_000;

    fn at(ip: [u8; 4], port: u16) -> (u32, u16) {
        (addr_to_map(Ipv4Addr::from(ip)), port.to_be())
    }

    fn key(src: (u32, u16), dst: (u32, u16), proto: u8) -> FlowKey {
        FlowKey::new(src.0, src.1, dst.0, dst.1, proto)
    }

    /// Both entries of a flow from `client` to `frontend` sent to
    /// `backend`, source-NATed to `nat` when given.
    fn flow(
        client: (u32, u16),
        frontend: (u32, u16),
        backend: (u32, u16),
        nat: Option<(u32, u16)>,
        proto: u8,
    ) -> [(FlowKey, NatEntry); 2] {
        let source = nat.unwrap_or(client);
        let snat = if nat.is_some() { NAT_SNAT } else { 0 };
        let request = NatEntry {
            addr: backend.0,
            port: backend.1,
            flags: snat | if nat.is_some() { NAT_REDIRECT } else { 0 },
            service_id: 7,
            slot: 2,
            nat_addr: source.0,
            nat_port: source.1,
            last_seen: NOW - 5,
            ..NatEntry::default()
        };
        let reply = NatEntry {
            addr: frontend.0,
            port: frontend.1,
            flags: NAT_REPLY | snat,
            service_id: 7,
            slot: 2,
            nat_addr: client.0,
            nat_port: client.1,
            last_seen: NOW - 3,
            ..NatEntry::default()
        };
        [
            (key(client, frontend, proto), request),
            (key(backend, source, proto), reply),
        ]
    }

    #[test]
    fn a_flows_two_entries_are_one_row_with_its_state_and_expiry() {
        let (client, vip, pod) = (
            at([10, 0, 0, 9], 40000),
            at([10, 96, 0, 1], 80),
            at([10, 1, 0, 5], 8080),
        );
        let entries: HashMap<_, _> = flow(client, vip, pod, None, IPPROTO_TCP).into_iter().collect();
        let views = flows(&entries, NOW);
        assert_eq!(
            views,
            vec![FlowView {
                protocol: "TCP".into(),
                client: "10.0.0.9:40000".parse().unwrap(),
                frontend: "10.96.0.1:80".parse().unwrap(),
                backend: "10.1.0.5:8080".parse().unwrap(),
                source_nat: None,
                service_id: 7,
                slot: 2,
                state: "established",
                idle_secs: Some(3),
                expires_in_secs: Some(proxy_common::FLOW_TCP_IDLE_SECS - 3),
                missing: None,
            }]
        );
    }

    #[test]
    fn states_nat_and_lost_directions_are_shown_as_the_sweep_judges_them() {
        let (vip, pod, node) = (
            at([10, 96, 0, 1], 53),
            at([10, 1, 0, 5], 53),
            at([192, 168, 0, 2], 1030),
        );
        let mut entries: HashMap<FlowKey, NatEntry> = HashMap::new();
        // A UDP stream, source-NATed.
        let [request, mut reply] = flow(at([172, 16, 0, 1], 5000), vip, pod, Some(node), IPPROTO_UDP);
        reply.1.seen = SEEN_STREAM;
        entries.extend([request, reply]);
        // A closed TCP connection.
        let [mut request, mut reply] = flow(at([10, 0, 0, 2], 41000), vip, pod, None, IPPROTO_TCP);
        request.1.seen = SEEN_FIN;
        reply.1.seen = SEEN_FIN;
        entries.extend([request, reply]);
        // A TCP connection never answered, whose reply entry is gone.
        let [request, _] = flow(at([10, 0, 0, 3], 42000), vip, pod, None, IPPROTO_TCP);
        entries.extend([(
            request.0,
            NatEntry {
                last_seen: NOW - 100,
                ..request.1
            },
        )]);
        // A UDP flow whose request entry is gone.
        let [_, reply] = flow(at([10, 0, 0, 4], 43000), vip, pod, None, IPPROTO_UDP);
        entries.extend([reply]);

        let views = flows(&entries, NOW);
        // Client, state, expiry, lost direction, source NAT.
        type Row<'a> = (String, &'a str, Option<u32>, Option<&'a str>, Option<String>);
        let summary: Vec<Row> = views
            .iter()
            .map(|v| {
                (
                    v.client.to_string(),
                    v.state,
                    v.expires_in_secs,
                    v.missing,
                    v.source_nat.map(|s| s.to_string()),
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                (
                    "10.0.0.2:41000".into(),
                    "closed",
                    Some(FLOW_TCP_CLOSED_SECS - 3),
                    None,
                    None
                ),
                // Reply entry gone: judged as a live flow, as the sweep does.
                (
                    "10.0.0.3:42000".into(),
                    "established",
                    Some(proxy_common::FLOW_TCP_IDLE_SECS - 100),
                    Some("reply"),
                    None
                ),
                (
                    "10.0.0.4:43000".into(),
                    "answered",
                    Some(proxy_common::FLOW_UDP_SECS - 3),
                    Some("request"),
                    None
                ),
                (
                    "172.16.0.1:5000".into(),
                    "stream",
                    Some(proxy_common::FLOW_UDP_STREAM_SECS - 3),
                    None,
                    Some("192.168.0.2:1030".into())
                ),
            ]
        );
        let only_udp = Filters {
            client: Some(Ipv4Addr::new(172, 16, 0, 1)),
            ..Filters::default()
        };
        assert_eq!(views.iter().filter(|v| only_udp.keep_flow(v)).count(), 1);
        let by_backend = Filters {
            backend: Some("10.1.0.5:53".parse().unwrap()),
            service: Some("10.96.0.1".parse().unwrap()),
            ..Filters::default()
        };
        assert_eq!(views.iter().filter(|v| by_backend.keep_flow(v)).count(), 4);
        let other_port = Filters {
            backend: Some("10.1.0.5:54".parse().unwrap()),
            ..Filters::default()
        };
        assert_eq!(views.iter().filter(|v| other_port.keep_flow(v)).count(), 0);
    }

    #[test]
    fn an_affinity_is_in_force_within_its_timeout_while_its_backend_holds_its_slot() {
        let pod = Backend::new(Ipv4Addr::new(10, 1, 0, 5), 8080, true);
        let other = Backend::new(Ipv4Addr::new(10, 1, 0, 6), 8080, true);
        let frontend = |timeout| {
            (
                ServiceKey::new(Ipv4Addr::new(10, 96, 0, 1), 80, IPPROTO_TCP),
                ServiceValue {
                    id: 3,
                    affinity_timeout: timeout,
                    ..ServiceValue::default()
                },
            )
        };
        let backends: HashMap<BackendKey, Backend> = [(BackendKey { service_id: 3, slot: 1 }, pod)].into();
        let remembered = |client: u64, backend: Backend, last_used: u32| {
            (
                AffinityKey {
                    service_id: 3,
                    _pad: 0,
                    client,
                },
                AffinityValue {
                    backend,
                    slot: 1,
                    last_used,
                },
            )
        };
        let client = addr_to_map(Ipv4Addr::new(10, 0, 0, 9)) as u64;
        let table = [
            remembered(client, pod, NOW - 10),
            remembered(AFFINITY_NETNS | 4026531840, pod, NOW - 11),
            remembered(client + 1, other, NOW),
        ];
        let views = affinities(&table, &[frontend(10)], &backends, NOW);
        let summary: Vec<(&str, Option<u32>, bool)> = views
            .iter()
            .map(|v| (v.client.as_str(), v.expires_in_secs, v.in_force))
            .collect();
        assert_eq!(
            summary,
            vec![
                // Exactly the timeout: still kept (not more than it).
                ("10.0.0.9", Some(0), true),
                // A different backend than the slot holds now.
                ("11.0.0.9", Some(10), false),
                // One second past.
                ("netns:4026531840", Some(0), false),
            ]
        );
        assert_eq!(views[0].frontends, vec!["10.96.0.1:80/TCP".to_string()]);
        // Affinity turned off: nothing is in force, nothing expires.
        let off = affinities(&table, &[frontend(0)], &backends, NOW);
        assert!(off.iter().all(|v| !v.in_force && v.expires_in_secs.is_none()));
    }

    #[test]
    fn services_are_named_by_id_and_frontend_and_show_backend_locality_and_state() {
        let key = ServiceKey::new(Ipv4Addr::new(10, 96, 0, 1), 80, IPPROTO_TCP);
        let value = ServiceValue {
            id: 7,
            backend_count: 2,
            ..ServiceValue::default()
        };
        let here = Backend::new(Ipv4Addr::new(10, 1, 0, 5), 8080, true);
        let elsewhere = Backend::new(Ipv4Addr::new(10, 2, 0, 5), 8080, false).with_terminating(true);
        let frontends = [(key, value, vec![here, elsewhere])];
        let named = |id, frontend: &str| NamedFrontend {
            id,
            labels: FrontendLabels {
                service: "shop/web".into(),
                frontend: frontend.into(),
                kind: "ClusterIP".into(),
            },
        };
        let views = services(&frontends, &HashMap::new(), &[named(7, "10.96.0.1:80/TCP")]);
        assert_eq!(views[0].service.as_deref(), Some("shop/web"));
        let shown: Vec<(String, bool, &str)> = views[0]
            .backends
            .iter()
            .map(|b| (b.address.to_string(), b.local, b.state))
            .collect();
        assert_eq!(
            shown,
            vec![
                ("10.1.0.5:8080".to_string(), true, "ready"),
                ("10.2.0.5:8080".to_string(), false, "terminating"),
            ]
        );
        // A name given for another id, or another frontend, is not this one's.
        for stale in [named(8, "10.96.0.1:80/TCP"), named(7, "10.96.0.1:80/UDP")] {
            assert_eq!(services(&frontends, &HashMap::new(), &[stale])[0].service, None);
        }
    }
}
