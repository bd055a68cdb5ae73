//! Typed access to the pinned maps, for the daemon's syncer and for the CLI.
use std::{
    path::Path,
    sync::atomic::{AtomicU64, Ordering},
};

use anyhow::{Context, Result};
use std::collections::BTreeSet;

use aya::maps::{
    lpm_trie::{Key, LpmTrie},
    Array, HashMap, IterableMap, Map, MapData, PerCpuArray, PerCpuHashMap,
};
use proxy_common::{
    addr_from_map, addr_to_map, filter_bits, map_name, AffinityKey, AffinityValue, Backend, BackendKey, FlowKey,
    NatEntry, NodeConfig, ServiceCounterKey, ServiceKey, ServiceValue, SourceRange, Stat, BACKEND_HALF,
    FILTER_HALF_WORDS, FRONTEND_HALF, IPPROTO_TCP, IPPROTO_UDP, NAT_REDIRECT, NAT_REPLY, NAT_REPLY_REDIRECT, NAT_SNAT,
};

use super::{netfilter, sys};
use crate::{
    model::objects::Cidr,
    sync::{ServiceTable, TableError},
};

pub(crate) fn open(pin_dir: &Path, name: &str) -> Result<MapData> {
    let path = pin_dir.join(name);
    MapData::from_pin(&path).with_context(|| {
        format!(
            "opening map {} (is the daemon running with this pin directory?)",
            path.display()
        )
    })
}

/// Sets a tuple's bits in `half` (one half's words).
fn add_tuple(half: &mut [u64], addr: u32, port: u16, proto: u8) {
    for bit in filter_bits(addr, port, proto) {
        half[(bit >> 6) as usize] |= 1u64 << (bit & 63);
    }
}

/// SERVICES and BACKENDS, and the pre-filter in front of them.
pub struct ServiceMaps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, BackendKey, Backend>,
    /// The filter, shared with the data path: the daemon alone writes the
    /// frontend half, the data path sets backend bits.
    filter: sys::SharedWords,
    source_ranges: LpmTrie<MapData, SourceRange, u8>,
    node: Array<MapData, NodeConfig>,
}

fn range_key(service_id: u32, range: &Cidr) -> Key<SourceRange> {
    Key::new(
        32 + range.prefix as u32,
        SourceRange {
            service_id,
            addr: addr_to_map(range.network()),
        },
    )
}

impl ServiceMaps {
    pub fn open(pin_dir: &Path) -> Result<Self> {
        let filter = open(pin_dir, map_name::FILTER)?;
        let filter = sys::SharedWords::map(filter.fd(), 2 * FILTER_HALF_WORDS as usize).with_context(|| {
            format!(
                "mapping {} into memory (pinned by an older kpr? `kpr uninstall` removes it)",
                map_name::FILTER
            )
        })?;
        Ok(Self {
            services: HashMap::try_from(Map::HashMap(open(pin_dir, map_name::SERVICES)?))?,
            backends: HashMap::try_from(Map::HashMap(open(pin_dir, map_name::BACKENDS)?))?,
            filter,
            source_ranges: LpmTrie::try_from(Map::LpmTrie(open(pin_dir, map_name::SOURCE_RANGES)?))?,
            node: Array::try_from(Map::Array(open(pin_dir, map_name::NODE)?))?,
        })
    }

    /// The address flows are source-NATed to (none: nothing is NATed).
    pub fn set_snat_addr(&mut self, addr: Option<std::net::Ipv4Addr>) -> Result<()> {
        let config = NodeConfig {
            snat_addr: addr.map_or(0, addr_to_map),
            ..self.node.get(&0, 0)?
        };
        Ok(self.node.set(0, config, 0)?)
    }

    /// Draining (`NODE_DRAINING`): new flows are left alone, tracked ones
    /// still translated.
    pub fn set_draining(&mut self, draining: bool) -> Result<()> {
        let mut config = self.node.get(&0, 0)?;
        if draining {
            config.flags |= proxy_common::NODE_DRAINING;
        } else {
            config.flags &= !proxy_common::NODE_DRAINING;
        }
        Ok(self.node.set(0, config, 0)?)
    }

    pub fn draining(&self) -> Result<bool> {
        Ok(self.node.get(&0, 0)?.flags & proxy_common::NODE_DRAINING != 0)
    }

    pub fn snat_addr(&self) -> Result<Option<std::net::Ipv4Addr>> {
        let config = self.node.get(&0, 0)?;
        Ok((config.snat_addr != 0).then(|| addr_from_map(config.snat_addr)))
    }

    /// The words of the half starting at `start`.
    fn half(&self, start: u32) -> &[AtomicU64] {
        &self.filter.words()[start as usize..(start + FILTER_HALF_WORDS) as usize]
    }

    /// Recomputes the pre-filter from what is programmed and what conntrack
    /// still translates, dropping the bits of everything else (so that
    /// churn does not fill it up across restarts).
    ///
    /// The backend half is the data path's: it sets a backend's bit when it
    /// translates a flow to it. Only bits no current backend and no tracked
    /// flow hashes to are cleared, atomically, so a bit the data path sets
    /// meanwhile (it can only pick current backends) survives; bits of
    /// tracked flows are set, should the filter be newer than conntrack.
    pub fn rebuild_filter(&mut self, flows: &FlowMaps) -> Result<()> {
        let (mut frontends, replies) = tracked_tuples(flows)?;
        let mut keep = vec![0u64; FILTER_HALF_WORDS as usize];
        let services = self.services()?;
        let proto_of: std::collections::BTreeMap<u32, u8> = services.iter().map(|(k, v)| (v.id, k.proto)).collect();
        for (key, _) in &services {
            add_tuple(&mut frontends, key.addr, key.port, key.proto);
        }
        for (key, b) in self.backends()? {
            // A slot whose service entry is gone can still be reached through
            // a tracked flow's service id: keep it under either protocol.
            let protos = match proto_of.get(&key.service_id) {
                Some(proto) => std::slice::from_ref(proto),
                None => &[IPPROTO_TCP, IPPROTO_UDP][..],
            };
            for &proto in protos {
                add_tuple(&mut keep, b.addr, b.port, proto);
            }
        }
        for (word, new) in self.half(FRONTEND_HALF).iter().zip(&frontends) {
            word.store(*new, Ordering::SeqCst);
        }
        for ((word, keep), replies) in self.half(BACKEND_HALF).iter().zip(&keep).zip(&replies) {
            word.fetch_and(keep | replies, Ordering::SeqCst);
            word.fetch_or(*replies, Ordering::SeqCst);
        }
        Ok(())
    }

    /// Marks the backend of every flow conntrack tracks. Only ORs, so it may
    /// run beside the data path: after new programs took over from ones
    /// that marked another filter (one of an older layout, replaced), for
    /// the flows those created meanwhile.
    pub fn mark_tracked_backends(&mut self, flows: &FlowMaps) -> Result<()> {
        let (_, replies) = tracked_tuples(flows)?;
        for (word, replies) in self.half(BACKEND_HALF).iter().zip(&replies) {
            if *replies != 0 {
                word.fetch_or(*replies, Ordering::SeqCst);
            }
        }
        Ok(())
    }

    /// Whether the data path looks up replies from this tuple (it has
    /// translated a flow to it, or a bit it shares).
    pub fn backend_marked(&self, addr: u32, port: u16, proto: u8) -> bool {
        let half = self.half(BACKEND_HALF);
        filter_bits(addr, port, proto)
            .into_iter()
            .all(|bit| half[(bit >> 6) as usize].load(Ordering::SeqCst) & (1u64 << (bit & 63)) != 0)
    }

    /// Takes over netfilter's translated connections to frontends kpr
    /// serves (kube-proxy's, made before kpr started): each becomes a flow
    /// of kpr's to the backend netfilter chose, both directions recorded as
    /// the data path records them, so it keeps its backend whatever becomes
    /// of kube-proxy's rules and of netfilter's NAT state (which netfilter
    /// drops with its NAT hooks). A tuple kpr tracks already stays kpr's.
    /// Returns how many were taken over.
    pub fn adopt_netfilter(
        &mut self,
        flows: &mut FlowMaps,
        connections: &[netfilter::Connection],
        now: u32,
    ) -> Result<usize> {
        let mut adopted = 0;
        for c in connections.iter().filter(|c| c.destination_translated()) {
            let (o, r) = (&c.original, &c.reply);
            let Some(svc) = self.service(&ServiceKey::new(o.dst, o.dst_port, o.proto))? else {
                continue;
            };
            let backend = (addr_to_map(r.src), r.src_port.to_be());
            let slot = (0..svc.backend_count)
                .find(|&slot| {
                    let key = BackendKey {
                        service_id: svc.id,
                        slot,
                    };
                    self.backend(&key)
                        .ok()
                        .flatten()
                        .is_some_and(|b| (b.addr, b.port) == backend)
                })
                .unwrap_or(u32::MAX);
            let client = (addr_to_map(o.src), o.src_port.to_be());
            let frontend = (addr_to_map(o.dst), o.dst_port.to_be());
            // Masqueraded: the backend answers the node's address and port.
            let source = (addr_to_map(r.dst), r.dst_port.to_be());
            let snat = source != client;
            let redirect_replies = snat || svc.kind() == proxy_common::FrontendKind::NodePort;
            let mut request_flags = 0;
            let mut reply_flags = NAT_REPLY;
            if snat {
                request_flags |= NAT_SNAT | NAT_REDIRECT;
                reply_flags |= NAT_SNAT;
            }
            if redirect_replies {
                request_flags |= NAT_REPLY_REDIRECT;
                reply_flags |= NAT_REDIRECT;
            }
            let request = NatEntry {
                addr: backend.0,
                port: backend.1,
                flags: request_flags,
                service_id: svc.id,
                slot,
                nat_addr: source.0,
                nat_port: source.1,
                last_seen: now,
                ..NatEntry::default()
            };
            let reply = NatEntry {
                addr: frontend.0,
                port: frontend.1,
                flags: reply_flags,
                service_id: svc.id,
                slot,
                nat_addr: client.0,
                nat_port: client.1,
                last_seen: now,
                ..NatEntry::default()
            };
            let request_key = FlowKey::new(client.0, client.1, frontend.0, frontend.1, o.proto);
            let reply_key = FlowKey::new(backend.0, backend.1, source.0, source.1, o.proto);
            if !flows.insert_new(&reply_key, &reply) {
                continue;
            }
            if !flows.insert_new(&request_key, &request) {
                flows.remove(&reply_key)?;
                continue;
            }
            adopted += 1;
        }
        if adopted > 0 {
            // Their replies are looked up from now on.
            self.mark_tracked_backends(flows)?;
        }
        Ok(adopted)
    }

    pub fn service(&self, key: &ServiceKey) -> Result<Option<ServiceValue>> {
        lookup(self.services.get(key, 0))
    }

    pub fn backend(&self, key: &BackendKey) -> Result<Option<Backend>> {
        lookup(self.backends.get(key, 0))
    }

    /// How many backend slots exist over all services.
    pub fn backend_slots(&self) -> Result<usize> {
        Ok(self.backends.keys().count())
    }

    /// Every frontend with its backends in slot order.
    pub fn frontends(&self) -> Result<Vec<(ServiceKey, ServiceValue, Vec<Backend>)>> {
        let mut out = Vec::new();
        for (key, value) in self.services()? {
            let backends = (0..value.backend_count)
                .filter_map(|slot| {
                    self.backends
                        .get(
                            &BackendKey {
                                service_id: value.id,
                                slot,
                            },
                            0,
                        )
                        .ok()
                })
                .collect();
            out.push((key, value, backends));
        }
        out.sort_by_key(|(k, _, _)| (k.ip(), k.port(), k.proto));
        Ok(out)
    }
}

/// One pass over conntrack: the bits of the tuples its flows are addressed
/// by (frontend half) and answered from (backend half).
fn tracked_tuples(flows: &FlowMaps) -> Result<(Vec<u64>, Vec<u64>)> {
    let mut frontends = vec![0u64; FILTER_HALF_WORDS as usize];
    let mut replies = vec![0u64; FILTER_HALF_WORDS as usize];
    for (key, entry) in flows.entries()? {
        if entry.flags & NAT_REPLY != 0 {
            add_tuple(&mut replies, key.src_addr, key.src_port, key.proto);
        } else {
            add_tuple(&mut frontends, key.dst_addr, key.dst_port, key.proto);
        }
    }
    Ok((frontends, replies))
}

/// A lookup where "no such key" is an answer, not an error.
fn lookup<V>(result: Result<V, aya::maps::MapError>) -> Result<Option<V>> {
    match result {
        Ok(v) => Ok(Some(v)),
        Err(aya::maps::MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn table_err(op: impl Into<String>) -> impl FnOnce(aya::maps::MapError) -> TableError {
    let op = op.into();
    move |e| TableError {
        op,
        reason: e.to_string(),
    }
}

impl ServiceTable for ServiceMaps {
    fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, TableError> {
        self.services
            .iter()
            .collect::<Result<_, _>>()
            .map_err(table_err("reading SERVICES"))
    }

    fn backends(&self) -> Result<Vec<(BackendKey, Backend)>, TableError> {
        self.backends
            .iter()
            .collect::<Result<_, _>>()
            .map_err(table_err("reading BACKENDS"))
    }

    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), TableError> {
        self.services
            .insert(key, value, 0)
            .map_err(table_err("writing SERVICES"))
    }

    fn remove_service(&mut self, key: &ServiceKey) -> Result<(), TableError> {
        self.services.remove(key).map_err(table_err("deleting from SERVICES"))
    }

    fn put_backend(&mut self, key: &BackendKey, value: &Backend) -> Result<(), TableError> {
        self.backends
            .insert(key, value, 0)
            .map_err(table_err("writing BACKENDS"))
    }

    fn remove_backend(&mut self, key: &BackendKey) -> Result<(), TableError> {
        self.backends.remove(key).map_err(table_err("deleting from BACKENDS"))
    }

    fn mark_frontend(&mut self, key: &ServiceKey) -> Result<(), TableError> {
        let half = self.half(FRONTEND_HALF);
        for bit in filter_bits(key.addr, key.port, key.proto) {
            half[(bit >> 6) as usize].fetch_or(1u64 << (bit & 63), Ordering::SeqCst);
        }
        Ok(())
    }

    fn source_ranges(&self) -> Result<Vec<(u32, Cidr)>, TableError> {
        let mut out = Vec::new();
        for entry in self.source_ranges.iter() {
            let (key, _) = entry.map_err(table_err("reading SOURCE_RANGES"))?;
            let data = key.data();
            out.push((
                data.service_id,
                Cidr {
                    addr: addr_from_map(data.addr),
                    prefix: key.prefix_len().saturating_sub(32) as u8,
                },
            ));
        }
        Ok(out)
    }

    fn put_source_range(&mut self, service_id: u32, range: &Cidr) -> Result<(), TableError> {
        self.source_ranges
            .insert(&range_key(service_id, range), 1, 0)
            .map_err(table_err("writing SOURCE_RANGES"))
    }

    fn remove_source_range(&mut self, service_id: u32, range: &Cidr) -> Result<(), TableError> {
        match self.source_ranges.remove(&range_key(service_id, range)) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(table_err("deleting from SOURCE_RANGES")(e)),
        }
    }

    fn put_backends(&mut self, entries: &[(BackendKey, Backend)]) -> Result<(), (usize, TableError)> {
        write_batch(self.backends.map(), entries, "writing BACKENDS")
    }

    fn put_services(&mut self, entries: &[(ServiceKey, ServiceValue)]) -> Result<(), (usize, TableError)> {
        write_batch(self.services.map(), entries, "writing SERVICES")
    }
}

/// `entries` in one batched write; on failure, how many were written first.
fn write_batch<K: aya::Pod, V: aya::Pod>(
    map: &MapData,
    entries: &[(K, V)],
    op: &str,
) -> Result<(), (usize, TableError)> {
    let (keys, values): (Vec<K>, Vec<V>) = entries.iter().copied().unzip();
    sys::update_batch(map.fd(), &keys, &values).map_err(|(written, e)| {
        (
            written,
            TableError {
                op: op.into(),
                reason: e.to_string(),
            },
        )
    })
}

/// The per-CPU packet counters, summed.
pub fn read_stats(pin_dir: &Path) -> Result<Vec<(Stat, u64)>> {
    let stats: PerCpuArray<MapData, u64> = PerCpuArray::try_from(Map::PerCpuArray(open(pin_dir, map_name::STATS)?))?;
    Stat::ALL
        .iter()
        .map(|&s| Ok((s, stats.get(&(s as u32), 0)?.iter().sum())))
        .collect()
}

/// Entries read per `BPF_MAP_LOOKUP_BATCH` call.
const SWEEP_BATCH: usize = 4096;

/// What one sweep of the flow table did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SweepReport {
    /// Entries left in the table.
    pub entries: usize,
    /// Entries of expired flows removed.
    pub removed: usize,
    /// Entries recorded without a time, given one.
    pub stamped: usize,
    /// Lost directions of live flows, restored from the other.
    pub restored: usize,
}

/// CONNTRACK, RR_CURSORS and AFFINITY: the data path's own per-flow and
/// per-service state.
pub struct FlowMaps {
    conntrack: HashMap<MapData, FlowKey, NatEntry>,
    cursors: Array<MapData, u64>,
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    service_counters: PerCpuHashMap<MapData, ServiceCounterKey, u64>,
}

impl FlowMaps {
    pub fn open(pin_dir: &Path) -> Result<Self> {
        Ok(Self {
            conntrack: HashMap::try_from(Map::LruHashMap(open(pin_dir, map_name::CONNTRACK)?))?,
            cursors: Array::try_from(Map::Array(open(pin_dir, map_name::RR_CURSORS)?))?,
            affinity: HashMap::try_from(Map::LruHashMap(open(pin_dir, map_name::AFFINITY)?))?,
            service_counters: PerCpuHashMap::try_from(Map::PerCpuLruHashMap(open(
                pin_dir,
                map_name::SERVICE_COUNTERS,
            )?))?,
        })
    }

    /// Adds or replaces one entry (for tests of what the data path does
    /// with state it finds).
    pub fn insert(&mut self, key: &FlowKey, entry: &NatEntry) -> Result<()> {
        Ok(self.conntrack.insert(key, entry, 0)?)
    }

    /// Removes one entry; `false` when there was none.
    pub fn remove(&mut self, key: &FlowKey) -> Result<bool> {
        match self.conntrack.remove(key) {
            Ok(()) => Ok(true),
            Err(aya::maps::MapError::KeyNotFound) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    pub fn entries(&self) -> Result<Vec<(FlowKey, NatEntry)>> {
        Ok(self.conntrack.iter().collect::<Result<_, _>>()?)
    }

    /// Removes the flows that have expired by `now` (seconds of the
    /// monotonic clock; see `sweep`), gives a time to flows recorded
    /// without one, and restores a lost direction of a live flow. The table is read in batches; an entry the data path
    /// changed since (a packet, a new flow on the tuple) is left for the
    /// next sweep.
    pub fn sweep(&mut self, now: u32) -> Result<SweepReport> {
        let entries: std::collections::HashMap<FlowKey, NatEntry> =
            sys::lookup_batch::<FlowKey, NatEntry>(self.conntrack.map().fd(), SWEEP_BATCH)
                .context("reading CONNTRACK")?
                .into_iter()
                .collect();
        let judgement = super::sweep::judge(&entries, now);
        let unchanged = |maps: &Self, key: &FlowKey| maps.conntrack.get(key, 0).ok() == entries.get(key).copied();
        let mut stamped = 0;
        for key in &judgement.untimed {
            if !unchanged(self, key) {
                continue;
            }
            let entry = NatEntry {
                last_seen: now,
                ..entries[key]
            };
            // BPF_EXIST: only while it is still there.
            if self.conntrack.insert(key, entry, 2).is_ok() {
                stamped += 1;
            }
        }
        let expired: Vec<FlowKey> = judgement
            .expired
            .into_iter()
            .filter(|key| unchanged(self, key))
            .collect();
        let removed = sys::delete_batch(self.conntrack.map().fd(), &expired).context("removing expired flows")?;
        let mut restored = 0;
        for (key, entry) in &judgement.restore {
            // BPF_NOEXIST: a flow that took the tuple meanwhile keeps it.
            if self.conntrack.insert(key, entry, 1).is_ok() {
                restored += 1;
            }
        }
        Ok(SweepReport {
            entries: entries.len() - removed + restored,
            removed,
            stamped,
            restored,
        })
    }

    /// What became of each service's new flows (`ServiceCounterKey`),
    /// summed over CPUs.
    pub fn service_counters(&self) -> Result<std::collections::HashMap<ServiceCounterKey, u64>> {
        self.service_counters
            .iter()
            .map(|entry| {
                let (key, per_cpu) = entry?;
                Ok((key, per_cpu.iter().sum()))
            })
            .collect()
    }

    /// Records `entry` under `key` unless the tuple is tracked already.
    pub fn insert_new(&mut self, key: &FlowKey, entry: &NatEntry) -> bool {
        // BPF_NOEXIST
        self.conntrack.insert(key, entry, 1).is_ok()
    }

    /// The remembered choices of ClientIP affinity.
    pub fn affinities(&self) -> Result<Vec<(AffinityKey, AffinityValue)>> {
        Ok(self.affinity.iter().collect::<Result<_, _>>()?)
    }

    /// Adds or replaces one remembered choice (for tests of what the data
    /// path does with state it finds).
    pub fn remember(&mut self, key: &AffinityKey, value: &AffinityValue) -> Result<()> {
        Ok(self.affinity.insert(key, value, 0)?)
    }

    /// Forgets what the data path kept for services that are gone: their
    /// UDP flows (as kube-proxy clears UDP conntrack entries of a deleted
    /// service; established TCP connections are left to finish, as with
    /// kube-proxy), their round-robin cursors and their clients' affinity
    /// (so a service that gets the id next starts afresh). Returns the flows
    /// removed.
    pub fn forget_services(&mut self, ids: &BTreeSet<u32>) -> Result<usize> {
        if ids.is_empty() {
            return Ok(0);
        }
        let stale: Vec<FlowKey> = self
            .entries()?
            .into_iter()
            .filter(|(k, v)| k.proto == IPPROTO_UDP && ids.contains(&v.service_id))
            .map(|(k, _)| k)
            .collect();
        for key in &stale {
            // Already evicted by the LRU: nothing to do.
            let _ = self.conntrack.remove(key);
        }
        for &id in ids {
            self.cursors.set(id, 0, 0)?;
        }
        let clients: Vec<AffinityKey> = self
            .affinities()?
            .into_iter()
            .filter(|(k, _)| ids.contains(&k.service_id))
            .map(|(k, _)| k)
            .collect();
        for key in &clients {
            let _ = self.affinity.remove(key);
        }
        // A service that gets the id next counts from zero.
        let counted: Vec<ServiceCounterKey> = self
            .service_counters
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| ids.contains(&k.service_id))
            .collect();
        for key in &counted {
            let _ = self.service_counters.remove(key);
        }
        Ok(stale.len())
    }
}
