//! An earlier build of the data path, loaded beside the current one so that
//! its per-packet cost is sampled in the same run, packet for packet
//! (`--baseline-object`): a before/after comparison that the machine's drift
//! between runs cannot blur.
//!
//! Only what every build since the ClusterIP data path has in common is
//! used: `kpr_tc`, `kpr_noop`, and the layouts of the first version of
//! `SERVICES` (id, backend count, affinity timeout, flags; zero-extended
//! where a build's value is longer), `BACKENDS` and `FILTER` (whose
//! frontend /24 and exact bits are computed as they always were, and the
//! /24-and-port bits where the build's halves hold them).
use std::net::Ipv4Addr;

use anyhow::{Context, Result};
use aya::{
    maps::{Array, HashMap, Map, MapData},
    programs::SchedClassifier,
    Ebpf, EbpfLoader,
};
use proxy_common::{
    filter_bits, map_name, BackendKey, ServiceKey, FILTER_HALF_WORDS, FRONTEND_HALF, IPPROTO_TCP, NOOP_PROGRAM,
    TC_PROGRAM,
};

use crate::{
    bpffs::BpffsMount,
    dataplane::{Loaded, RunResult},
};

/// `SERVICES`' value as the first builds laid it out.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FirstServiceValue {
    id: u32,
    backend_count: u32,
    affinity_timeout: u32,
    flags: u32,
}

/// `BACKENDS`' value, the same in every build (address, port, 16 bits).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FirstBackend {
    addr: u32,
    port: u16,
    flags: u16,
}

/// `SERVICES`' value since the external-traffic issue: the first layout,
/// then two fields that are zero for a ClusterIP service (cluster slots
/// start at 0; no local-only slots).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct ExtendedServiceValue {
    first: FirstServiceValue,
    cluster_start: u32,
    local_count: u32,
}

// SAFETY: plain #[repr(C)] integers without padding.
unsafe impl aya::Pod for FirstServiceValue {}
unsafe impl aya::Pod for ExtendedServiceValue {}
unsafe impl aya::Pod for FirstBackend {}

pub struct Baseline {
    ebpf: Ebpf,
    // Last: unmounted after the maps and programs are closed.
    _bpffs: BpffsMount,
}

impl Baseline {
    /// Loads the object at `path`; maps an older build declares pinned are
    /// pinned in a bpffs of its own, never the host's.
    pub fn load(path: &std::path::Path) -> Result<Self> {
        let object = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let bpffs = BpffsMount::new()?;
        let pin_dir = bpffs.path.join("baseline");
        std::fs::create_dir_all(&pin_dir)?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&pin_dir)
            .load(&object)
            .context("loading the baseline object")?;
        for name in [TC_PROGRAM, NOOP_PROGRAM] {
            let program: &mut SchedClassifier = ebpf
                .program_mut(name)
                .with_context(|| format!("the baseline has no {name}"))?
                .try_into()?;
            program
                .load()
                .with_context(|| format!("loading the baseline's {name}"))?;
        }
        Ok(Baseline { ebpf, _bpffs: bpffs })
    }

    /// One of the object's maps, as loaded (maps of a build with BTF map
    /// definitions carry no pinning, so they are not found by pin).
    fn map(&mut self, name: &str) -> Result<&mut Map> {
        self.ebpf
            .map_mut(name)
            .with_context(|| format!("the baseline has no map {name}"))
    }

    /// `n` ClusterIP services on port 80 (`super::service_vip`) over
    /// `backends`, as the daemon of that build would write them.
    pub fn program(&mut self, n: usize, backends: &[(Ipv4Addr, u16)]) -> Result<()> {
        let mut slots: HashMap<&mut MapData, BackendKey, FirstBackend> =
            HashMap::try_from(self.map(map_name::BACKENDS)?)?;
        for slot in 0..backends.len() as u32 {
            let (addr, port) = backends[slot as usize];
            let backend = FirstBackend {
                addr: proxy_common::addr_to_map(addr),
                port: port.to_be(),
                flags: 0,
            };
            for id in 0..n as u32 {
                slots.insert(BackendKey { service_id: id, slot }, backend, 0)?;
            }
        }
        let extended = match self.map(map_name::SERVICES)? {
            Map::HashMap(data) => data.info()?.value_size() as usize == size_of::<ExtendedServiceValue>(),
            _ => anyhow::bail!("the baseline's {} is not a hash map", map_name::SERVICES),
        };
        let keys = (0..n).map(|id| ServiceKey::new(super::service_vip(id), 80, IPPROTO_TCP));
        let first = |id: usize| FirstServiceValue {
            id: id as u32,
            backend_count: backends.len() as u32,
            ..Default::default()
        };
        let values = keys.clone().enumerate();
        if extended {
            let extend = |(id, key)| {
                let first = first(id);
                (
                    key,
                    ExtendedServiceValue {
                        first,
                        ..Default::default()
                    },
                )
            };
            self.insert_services(values.map(extend))?;
        } else {
            self.insert_services(values.map(|(id, key)| (key, first(id))))?;
        }
        // The /24 and exact bits sit where every build has them; the
        // /24-and-port bitmap, after them, only in builds whose halves are
        // long enough to hold it.
        let with_port_bits = match self.map(map_name::FILTER)? {
            Map::Array(data) => data.info()?.max_entries() >= 2 * FILTER_HALF_WORDS,
            _ => anyhow::bail!("the baseline's {} is not an array", map_name::FILTER),
        };
        let mut words: std::collections::BTreeMap<u32, u64> = std::collections::BTreeMap::new();
        for key in keys {
            let [network, network_port, exact] = filter_bits(key.addr, key.port, key.proto);
            let bits = [network, exact]
                .into_iter()
                .chain(with_port_bits.then_some(network_port));
            for bit in bits {
                *words.entry(FRONTEND_HALF + (bit >> 6)).or_default() |= 1u64 << (bit & 63);
            }
        }
        let mut filter: Array<&mut MapData, u64> = Array::try_from(self.map(map_name::FILTER)?)?;
        for (index, word) in words {
            filter.set(index, word, 0)?;
        }
        Ok(())
    }

    /// Writes `SERVICES` entries in the value layout `V` the build has.
    fn insert_services<V: aya::Pod>(&mut self, entries: impl Iterator<Item = (ServiceKey, V)>) -> Result<()> {
        let mut services: HashMap<&mut MapData, ServiceKey, V> = HashMap::try_from(self.map(map_name::SERVICES)?)?;
        for (key, value) in entries {
            services.insert(key, value, 0)?;
        }
        Ok(())
    }

    pub fn run_program(&self, name: &str, frame: &[u8]) -> Result<RunResult> {
        Loaded::run_in(&self.ebpf, name, frame, 1)
    }
}
