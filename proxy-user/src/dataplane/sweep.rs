//! The flow table's garbage collection, as netfilter's: which tracked flows
//! have outlived their timeout (`proxy_common::FLOW_*`, by protocol and
//! state) and go, judged on both directions of each flow together. The
//! LRU alone would keep expired flows (a DNS query's pair of entries) until
//! the table filled, and then evict by age of use, not by whether a flow is
//! over.
use std::collections::HashMap;

use proxy_common::{FlowKey, NatEntry, NAT_REPLY};

/// What a sweep decided for the entries it saw.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Judgement {
    /// Entries of expired flows (both directions of each, where present).
    pub expired: Vec<FlowKey>,
    /// Entries of flows recorded by a version that kept no times: they are
    /// given one now, and judged from then on.
    pub untimed: Vec<FlowKey>,
    /// Directions lost (evicted) of live flows, restored from the other:
    /// the data path does that itself for UDP within a second; a TCP
    /// connection, whose entries both stay in use, waits for the sweep.
    pub restore: Vec<(FlowKey, NatEntry)>,
}

/// The entry of the other direction of `entry`'s flow, if it is there and
/// belongs to the same flow (points back at `key`).
pub(crate) fn partner<'a>(
    entries: &'a HashMap<FlowKey, NatEntry>,
    key: &FlowKey,
    entry: &NatEntry,
) -> Option<&'a NatEntry> {
    let other = entry.other_direction(key);
    entries
        .get(&other)
        .filter(|e| e.other_direction(&other) == *key && (e.flags ^ entry.flags) & NAT_REPLY != 0)
}

/// Judges every entry of a snapshot of the table at `now` (seconds of the
/// monotonic clock the data path stamps entries with).
pub fn judge(entries: &HashMap<FlowKey, NatEntry>, now: u32) -> Judgement {
    let mut judgement = Judgement::default();
    for (key, entry) in entries {
        let other = partner(entries, key, entry);
        let (request, reply) = if entry.flags & NAT_REPLY != 0 {
            (other, Some(entry))
        } else {
            (Some(entry), other)
        };
        match (request, reply) {
            // A request entry always gets a time when it is recorded.
            (Some(r), _) if r.last_seen == 0 => judgement.untimed.push(*key),
            // A reply entry alone that never carried a packet: its request
            // is gone and nothing can bring it back.
            (None, Some(r)) if r.last_seen == 0 => judgement.expired.push(*key),
            _ if NatEntry::flow_expired(request, reply, key.proto, now) => judgement.expired.push(*key),
            _ if other.is_none() => judgement.restore.push(entry.partner(key)),
            _ => {}
        }
    }
    judgement.expired.sort_by_key(sort_key);
    judgement.untimed.sort_by_key(sort_key);
    judgement.restore.sort_by_key(|(k, _)| sort_key(k));
    judgement
}

fn sort_key(key: &FlowKey) -> (u32, u16, u32, u16, u8) {
    (key.src_addr, key.src_port, key.dst_addr, key.dst_port, key.proto)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use proxy_common::{
        addr_to_map, FLOW_TCP_CLOSED_SECS, FLOW_UDP_SECS, IPPROTO_TCP, IPPROTO_UDP, NAT_SNAT, SEEN_FIN, SEEN_RST,
    };

    use super::*;

    const NOW: u32 = 100_000;
    const SERVICE: (u32, u16) = (0x0100_600a, 0x5000);

    fn key(src: (u32, u16), dst: (u32, u16), proto: u8) -> FlowKey {
        FlowKey::new(src.0, src.1, dst.0, dst.1, proto)
    }

    fn endpoint(last: u8, port: u16) -> (u32, u16) {
        (addr_to_map(Ipv4Addr::new(10, 0, 0, last)), port.to_be())
    }

    /// Both entries of a flow from `client` to SERVICE and on to `backend`,
    /// each direction with its `seen` and `last_seen`.
    fn flow(
        client: (u32, u16),
        backend: (u32, u16),
        proto: u8,
        request: (u8, u32),
        reply: (u8, u32),
    ) -> [(FlowKey, NatEntry); 2] {
        [
            (
                key(client, SERVICE, proto),
                NatEntry {
                    addr: backend.0,
                    port: backend.1,
                    seen: request.0,
                    last_seen: request.1,
                    ..Default::default()
                },
            ),
            (
                key(backend, client, proto),
                NatEntry {
                    addr: SERVICE.0,
                    port: SERVICE.1,
                    flags: NAT_REPLY,
                    seen: reply.0,
                    last_seen: reply.1,
                    ..Default::default()
                },
            ),
        ]
    }

    fn table(flows: &[[(FlowKey, NatEntry); 2]]) -> HashMap<FlowKey, NatEntry> {
        flows.iter().flatten().copied().collect()
    }

    fn keys(flow: &[(FlowKey, NatEntry); 2]) -> Vec<FlowKey> {
        let mut keys: Vec<FlowKey> = flow.iter().map(|(k, _)| *k).collect();
        keys.sort_by_key(sort_key);
        keys
    }

    #[test]
    fn expired_flows_go_with_both_directions_and_live_ones_stay() {
        let backend = endpoint(5, 8080);
        let live = flow(endpoint(1, 40000), backend, IPPROTO_TCP, (0, NOW - 5), (0, NOW - 5));
        let closed = flow(
            endpoint(1, 40001),
            backend,
            IPPROTO_TCP,
            (SEEN_FIN, NOW - FLOW_TCP_CLOSED_SECS),
            (SEEN_FIN, NOW - FLOW_TCP_CLOSED_SECS),
        );
        let closing = flow(
            endpoint(1, 40002),
            backend,
            IPPROTO_TCP,
            (SEEN_RST, NOW - 1),
            (0, NOW - 1),
        );
        let query = flow(
            endpoint(2, 5353),
            backend,
            IPPROTO_UDP,
            (0, NOW - FLOW_UDP_SECS),
            (0, NOW - FLOW_UDP_SECS),
        );
        let judgement = judge(&table(&[live, closed, closing, query]), NOW);
        let mut expected = [keys(&closed), keys(&query)].concat();
        expected.sort_by_key(sort_key);
        assert_eq!(judgement.expired, expected);
        assert!(judgement.untimed.is_empty());
    }

    #[test]
    fn a_direction_alone_is_judged_by_itself() {
        let backend = endpoint(5, 8080);
        let [request, _] = flow(endpoint(1, 40000), backend, IPPROTO_TCP, (0, NOW - 100), (0, 0));
        let [_, reset] = flow(
            endpoint(1, 40001),
            backend,
            IPPROTO_TCP,
            (0, 0),
            (SEEN_RST, NOW - FLOW_TCP_CLOSED_SECS),
        );
        let [_, unanswered] = flow(endpoint(1, 40002), backend, IPPROTO_TCP, (0, NOW), (0, 0));
        let judgement = judge(&[request, reset, unanswered].into_iter().collect(), NOW);
        // The request whose reply entry was evicted lives on, and gets its
        // reply entry back; the reset reply goes, and so does a reply entry
        // that never saw a packet and has no request.
        let mut expected = vec![reset.0, unanswered.0];
        expected.sort_by_key(sort_key);
        assert_eq!(judgement.expired, expected);
        assert_eq!(judgement.restore, vec![request.1.partner(&request.0)]);
    }

    #[test]
    fn an_entry_of_another_flow_on_the_partner_tuple_is_not_its_partner() {
        let backend = endpoint(5, 8080);
        // Reply entry on the tuple is source-NATed: another flow's (its
        // client is someone else), so this request is alone: a request
        // without its reply is judged as live.
        let [request, _] = flow(
            endpoint(1, 40000),
            backend,
            IPPROTO_TCP,
            (0, NOW - FLOW_TCP_CLOSED_SECS),
            (0, 0),
        );
        let foreign = (
            key(backend, endpoint(1, 40000), IPPROTO_TCP),
            NatEntry {
                addr: SERVICE.0,
                port: SERVICE.1,
                flags: NAT_REPLY | NAT_SNAT,
                nat_addr: endpoint(9, 1).0,
                nat_port: endpoint(9, 1).1,
                seen: SEEN_RST,
                last_seen: NOW - FLOW_TCP_CLOSED_SECS,
                ..Default::default()
            },
        );
        let judgement = judge(&[request, foreign].into_iter().collect(), NOW);
        assert_eq!(judgement.expired, vec![foreign.0], "the foreign flow reset long ago");
    }

    #[test]
    fn flows_without_times_are_given_one() {
        let old = flow(endpoint(1, 40000), endpoint(5, 8080), IPPROTO_TCP, (0, 0), (0, 0));
        let judgement = judge(&table(&[old]), NOW);
        assert_eq!(judgement.untimed, keys(&old), "both directions");
        assert!(judgement.expired.is_empty());
    }
}
