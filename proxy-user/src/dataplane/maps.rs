//! Typed access to the pinned maps, for the daemon's syncer and for the CLI.
use std::path::Path;

use anyhow::{Context, Result};
use std::collections::BTreeSet;

use aya::maps::{Array, HashMap, IterableMap, Map, MapData, PerCpuArray};
use proxy_common::{
    filter_bit, map_name, Backend, BackendKey, FlowKey, NatEntry, ServiceKey, ServiceValue, Stat, FILTER_WORDS,
    IPPROTO_UDP, NAT_REPLY,
};

use super::sys;
use crate::sync::{ServiceTable, TableError};

fn open(pin_dir: &Path, name: &str) -> Result<MapData> {
    let path = pin_dir.join(name);
    MapData::from_pin(&path).with_context(|| {
        format!(
            "opening map {} (is the daemon running with this pin directory?)",
            path.display()
        )
    })
}

/// Sets filter bit `bit` of the bitmap starting at word `base`.
fn add_bit(words: &mut [u64], base: u32, bit: u32) {
    words[(base + (bit >> 6)) as usize] |= 1u64 << (bit & 63);
}

/// SERVICES and BACKENDS, and the pre-filter in front of them.
pub struct ServiceMaps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, BackendKey, Backend>,
    filter: Array<MapData, u64>,
    /// What the filter holds, so a mark costs a write only when it adds a bit.
    words: Vec<u64>,
}

impl ServiceMaps {
    pub fn open(pin_dir: &Path) -> Result<Self> {
        let filter: Array<MapData, u64> = Array::try_from(Map::Array(open(pin_dir, map_name::FILTER)?))?;
        let words = filter.iter().collect::<Result<Vec<u64>, _>>()?;
        Ok(Self {
            services: HashMap::try_from(Map::HashMap(open(pin_dir, map_name::SERVICES)?))?,
            backends: HashMap::try_from(Map::HashMap(open(pin_dir, map_name::BACKENDS)?))?,
            filter,
            words,
        })
    }

    /// Makes the filter hold `words`, writing the changed ones in one batch.
    /// The cache follows what was written, also when only part of it was.
    fn store_words(&mut self, words: &[u64]) -> std::io::Result<()> {
        let (indices, values): (Vec<u32>, Vec<u64>) = words
            .iter()
            .enumerate()
            .filter(|(i, w)| **w != self.words[*i])
            .map(|(i, w)| (i as u32, *w))
            .unzip();
        let result = sys::update_batch(self.filter.map().fd(), &indices, &values);
        let written = result.as_ref().map_or_else(|(n, _)| *n, |()| indices.len());
        for (index, word) in indices.iter().zip(&values).take(written) {
            self.words[*index as usize] = *word;
        }
        result.map_err(|(_, e)| e)
    }

    fn set_bit(&mut self, base: u32, bit: u32) -> Result<(), aya::maps::MapError> {
        let index = (base + (bit >> 6)) as usize;
        let word = self.words[index] | (1u64 << (bit & 63));
        if word != self.words[index] {
            self.filter.set(index as u32, word, 0)?;
            self.words[index] = word;
        }
        Ok(())
    }

    /// Recomputes the pre-filter from what is programmed and what conntrack
    /// still translates, dropping the bits of everything else (so that
    /// churn does not fill it up across restarts).
    pub fn rebuild_filter(&mut self, flows: &FlowMaps) -> Result<()> {
        let mut words = vec![0u64; 2 * FILTER_WORDS as usize];
        let mut set = |base: u32, bit: u32| add_bit(&mut words, base, bit);
        let services = self.services()?;
        let proto_of: std::collections::BTreeMap<u32, u8> = services.iter().map(|(k, v)| (v.id, k.proto)).collect();
        for (key, _) in &services {
            set(0, filter_bit(key.addr, key.port, key.proto));
        }
        for (key, b) in self.backends()? {
            if let Some(&proto) = proto_of.get(&key.service_id) {
                set(FILTER_WORDS, filter_bit(b.addr, b.port, proto));
            }
        }
        for (key, entry) in flows.entries()? {
            if entry.flags & NAT_REPLY != 0 {
                set(FILTER_WORDS, filter_bit(key.src_addr, key.src_port, key.proto));
            } else {
                set(0, filter_bit(key.dst_addr, key.dst_port, key.proto));
            }
        }
        self.store_words(&words).context("writing FILTER")
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
        self.set_bit(0, filter_bit(key.addr, key.port, key.proto))
            .map_err(table_err("writing FILTER"))
    }

    fn mark_backend(&mut self, backend: &Backend, proto: u8) -> Result<(), TableError> {
        self.set_bit(FILTER_WORDS, filter_bit(backend.addr, backend.port, proto))
            .map_err(table_err("writing FILTER"))
    }

    fn mark_all(&mut self, frontends: &[ServiceKey], backends: &[(Backend, u8)]) -> Result<(), TableError> {
        let mut words = self.words.clone();
        let mut set = |base: u32, bit: u32| add_bit(&mut words, base, bit);
        for key in frontends {
            set(0, filter_bit(key.addr, key.port, key.proto));
        }
        for (b, proto) in backends {
            set(FILTER_WORDS, filter_bit(b.addr, b.port, *proto));
        }
        self.store_words(&words).map_err(|e| TableError {
            op: "writing FILTER".into(),
            reason: e.to_string(),
        })
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

/// CONNTRACK and RR_CURSORS: the data path's own per-flow and per-service state.
pub struct FlowMaps {
    conntrack: HashMap<MapData, FlowKey, NatEntry>,
    cursors: Array<MapData, u64>,
}

impl FlowMaps {
    pub fn open(pin_dir: &Path) -> Result<Self> {
        Ok(Self {
            conntrack: HashMap::try_from(Map::LruHashMap(open(pin_dir, map_name::CONNTRACK)?))?,
            cursors: Array::try_from(Map::Array(open(pin_dir, map_name::RR_CURSORS)?))?,
        })
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

    /// Forgets what the data path kept for services that are gone: their
    /// UDP flows (as kube-proxy clears UDP conntrack entries of a deleted
    /// service; established TCP connections are left to finish, as with
    /// kube-proxy) and their round-robin cursors. Returns the flows removed.
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
        Ok(stale.len())
    }
}
