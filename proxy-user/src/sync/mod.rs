//! The syncer: makes the service maps equal to the desired state by writing
//! only what differs. It remembers exactly what it has written, so a failed
//! write (a full map, say) is retried by the next sync and touches nothing
//! else.
use std::collections::{BTreeMap, BTreeSet};

use proxy_common::{
    Backend, BackendKey, ServiceKey, ServiceValue, MAX_SERVICES, SVC_EXTERNAL_LOCAL, SVC_REJECT, SVC_SOURCE_RANGES,
};

use crate::model::{
    objects::{Cidr, Protocol},
    BackendAddr, DesiredState, Frontend, FrontendState,
};

/// A failed map operation, named for the operator.
#[derive(Debug, thiserror::Error)]
#[error("{op}: {reason}")]
pub struct TableError {
    pub op: String,
    pub reason: String,
}

/// The two maps that describe services: what the syncer reads and writes.
pub trait ServiceTable {
    fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, TableError>;
    fn backends(&self) -> Result<Vec<(BackendKey, Backend)>, TableError>;
    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), TableError>;
    fn remove_service(&mut self, key: &ServiceKey) -> Result<(), TableError>;
    fn put_backend(&mut self, key: &BackendKey, value: &Backend) -> Result<(), TableError>;
    fn remove_backend(&mut self, key: &BackendKey) -> Result<(), TableError>;
    /// Lets the data path's pre-filter pass packets addressed to this
    /// frontend. Must precede the frontend's entry; never undone while the
    /// daemon runs (flows of a deleted service may still need translating).
    /// (Backends need no mark: the data path marks a backend itself when it
    /// translates a flow to it.)
    fn mark_frontend(&mut self, key: &ServiceKey) -> Result<(), TableError>;
    /// Every source range of every service, by service id.
    fn source_ranges(&self) -> Result<Vec<(u32, Cidr)>, TableError>;
    fn put_source_range(&mut self, service_id: u32, range: &Cidr) -> Result<(), TableError>;
    fn remove_source_range(&mut self, service_id: u32, range: &Cidr) -> Result<(), TableError>;

    /// Writes entries in order; on failure, how many were written first.
    fn put_backends(&mut self, entries: &[(BackendKey, Backend)]) -> Result<(), (usize, TableError)> {
        put_each(entries, |k, v| self.put_backend(k, v))
    }

    /// As `put_backends`, for SERVICES.
    fn put_services(&mut self, entries: &[(ServiceKey, ServiceValue)]) -> Result<(), (usize, TableError)> {
        put_each(entries, |k, v| self.put_service(k, v))
    }
}

/// Writes entries one at a time; on failure, how many were written first.
fn put_each<K, V>(
    entries: &[(K, V)],
    mut put: impl FnMut(&K, &V) -> Result<(), TableError>,
) -> Result<(), (usize, TableError)> {
    for (i, (key, value)) in entries.iter().enumerate() {
        put(key, value).map_err(|e| (i, e))?;
    }
    Ok(())
}

/// What is in the maps for one frontend, as far as the syncer knows.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Applied {
    id: u32,
    /// The service entry's backend count and affinity, once written.
    value: Option<ServiceValue>,
    /// Slot contents; `None` for a slot not (or no longer) written.
    slots: Vec<Option<Backend>>,
    /// Source ranges written under the service's id.
    ranges: BTreeSet<Cidr>,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
    /// Ids of the services removed, whose flow state can be forgotten.
    pub removed_ids: Vec<u32>,
    /// Frontends that could not be (fully) programmed; retried next sync.
    pub failures: Vec<String>,
}

/// A frontend about to be added, its id allocated by `add_in_bulk`.
struct Staged {
    frontend: Frontend,
    key: ServiceKey,
    value: ServiceValue,
    backends: Vec<Backend>,
}

/// How a frontend is laid out in the maps: its service entry (id still to
/// be set) and its backends in slot groups, in slot order (see
/// `ServiceValue`: local-only, both, cluster-only).
struct Layout {
    value: ServiceValue,
    groups: [Vec<Backend>; 3],
    ranges: BTreeSet<Cidr>,
}

fn layout(state: &FrontendState) -> Layout {
    let cluster: BTreeSet<Backend> = state.backends.iter().map(backend).collect();
    let mut flags = state.kind as u32;
    let groups = match &state.external_local {
        Some(local) => {
            flags |= SVC_EXTERNAL_LOCAL;
            let local: BTreeSet<Backend> = local.iter().map(backend).collect();
            [
                local.difference(&cluster).copied().collect(),
                local.intersection(&cluster).copied().collect(),
                cluster.difference(&local).copied().collect(),
            ]
        }
        None => [Vec::new(), Vec::new(), cluster.into_iter().collect()],
    };
    if !state.source_ranges.is_empty() {
        flags |= SVC_SOURCE_RANGES;
    }
    if state.reject {
        flags |= SVC_REJECT;
    }
    let [only_local, both, only_cluster] = &groups;
    Layout {
        value: ServiceValue {
            id: 0,
            backend_count: (only_local.len() + both.len() + only_cluster.len()) as u32,
            affinity_timeout: state.affinity_timeout.unwrap_or(0),
            flags,
            cluster_start: only_local.len() as u32,
            local_count: (only_local.len() + both.len()) as u32,
        },
        groups,
        ranges: state.source_ranges.iter().copied().collect(),
    }
}

#[derive(Default)]
pub struct Syncer {
    applied: BTreeMap<ServiceKey, Applied>,
    free_ids: Vec<u32>,
    next_id: u32,
}

pub fn service_key(f: &Frontend) -> ServiceKey {
    ServiceKey::new(f.ip, f.port, f.protocol.ip_proto())
}

pub fn frontend(key: &ServiceKey) -> Option<Frontend> {
    Some(Frontend {
        ip: key.ip(),
        port: key.port(),
        protocol: Protocol::from_ip_proto(key.proto)?,
    })
}

fn backend(b: &BackendAddr) -> Backend {
    Backend::new(b.ip, b.port, b.local).with_terminating(b.terminating)
}

impl Syncer {
    /// The service id the frontend has in the maps, once programmed.
    pub fn id_of(&self, frontend: &Frontend) -> Option<u32> {
        self.applied.get(&service_key(frontend)).map(|a| a.id)
    }

    /// Takes over whatever a previous daemon left in the maps, keeping its
    /// service ids (and so the round-robin cursors and tracked flows).
    /// Backends of no service are removed.
    pub fn recover(table: &mut impl ServiceTable) -> Result<Self, TableError> {
        let mut syncer = Syncer::default();
        let mut by_id: BTreeMap<u32, ServiceKey> = BTreeMap::new();
        for (key, value) in table.services()? {
            by_id.insert(value.id, key);
            syncer.applied.insert(
                key,
                Applied {
                    id: value.id,
                    value: Some(value),
                    slots: Vec::new(),
                    ranges: BTreeSet::new(),
                },
            );
        }
        for (id, range) in table.source_ranges()? {
            match by_id.get(&id).and_then(|k| syncer.applied.get_mut(k)) {
                Some(applied) => {
                    applied.ranges.insert(range);
                }
                None => table.remove_source_range(id, &range)?,
            }
        }
        for (key, b) in table.backends()? {
            let Some(applied) = by_id.get(&key.service_id).and_then(|k| syncer.applied.get_mut(k)) else {
                table.remove_backend(&key)?;
                continue;
            };
            let slot = key.slot as usize;
            if applied.slots.len() <= slot {
                applied.slots.resize(slot + 1, None);
            }
            applied.slots[slot] = Some(b);
        }
        syncer.next_id = by_id.keys().next_back().map_or(0, |id| id + 1);
        syncer.free_ids = (0..syncer.next_id).filter(|id| !by_id.contains_key(id)).rev().collect();
        Ok(syncer)
    }

    /// Makes the maps equal `desired` (removing what it does not have).
    pub fn sync(&mut self, desired: &DesiredState, table: &mut impl ServiceTable) -> SyncReport {
        let mut changes: Vec<(Frontend, Option<&FrontendState>)> =
            desired.frontends.iter().map(|(f, s)| (*f, Some(s))).collect();
        let stale: Vec<Frontend> = self
            .applied
            .keys()
            .filter_map(frontend)
            .filter(|f| !desired.frontends.contains_key(f))
            .collect();
        changes.extend(stale.into_iter().map(|f| (f, None)));
        // Keys no frontend can describe (written by someone else): remove.
        let foreign: Vec<ServiceKey> = self.applied.keys().filter(|k| frontend(k).is_none()).copied().collect();
        let mut report = self.sync_changes(&changes, table);
        for key in foreign {
            let id = self.applied[&key].id;
            match self.remove(&key, table) {
                Ok(()) => {
                    report.removed += 1;
                    report.removed_ids.push(id);
                }
                Err(e) => report.failures.push(format!("removing {}: {e}", describe(&key))),
            }
        }
        report
    }

    /// Programs only these frontends (`None`: remove it): what an
    /// incremental sync writes.
    pub fn sync_changes(
        &mut self,
        changes: &[(Frontend, Option<&FrontendState>)],
        table: &mut impl ServiceTable,
    ) -> SyncReport {
        let mut report = SyncReport::default();
        // Removals first: they free ids and map room for what is added.
        for (f, _) in changes.iter().filter(|(_, s)| s.is_none()) {
            let key = service_key(f);
            let Some(applied) = self.applied.get(&key) else {
                continue;
            };
            let id = applied.id;
            match self.remove(&key, table) {
                Ok(()) => {
                    report.removed += 1;
                    report.removed_ids.push(id);
                }
                Err(e) => report.failures.push(format!("removing {f}: {e}")),
            }
        }
        let mut new = Vec::new();
        for (f, state) in changes {
            let Some(state) = state else { continue };
            let key = service_key(f);
            let layout = layout(state);
            // Frontends with source ranges are few, and their ranges must be
            // written before their entry: they take the one-by-one path.
            if !self.applied.contains_key(&key) && layout.ranges.is_empty() {
                new.push(Staged {
                    frontend: *f,
                    key,
                    value: layout.value,
                    backends: layout.groups.concat(),
                });
                continue;
            }
            match self.apply(&key, &layout, table) {
                Ok(false) => {}
                Ok(true) => report.updated += 1,
                Err(e) => report.failures.push(format!("programming {f}: {e}")),
            }
        }
        self.add_in_bulk(new, table, &mut report);
        report
    }

    /// Adds frontends the maps do not have yet in three bulk writes (the
    /// filter bits, every backend slot, every service entry, in that order,
    /// so that no service is visible before its backends). Whatever a bulk
    /// write leaves out goes through `apply`, which retries it and reports
    /// the error if it fails again.
    fn add_in_bulk(&mut self, new: Vec<Staged>, table: &mut impl ServiceTable, report: &mut SyncReport) {
        let mut staged = Vec::with_capacity(new.len());
        for mut s in new {
            match self.allocate_id() {
                Some(id) => {
                    s.value.id = id;
                    staged.push(s);
                }
                None => report.failures.push(format!(
                    "programming {}: allocating a service id: all {MAX_SERVICES} are in use",
                    s.frontend
                )),
            }
        }
        let slots: Vec<(BackendKey, Backend)> = staged
            .iter()
            .flat_map(|s| {
                s.backends.iter().enumerate().map(|(slot, b)| {
                    (
                        BackendKey {
                            service_id: s.value.id,
                            slot: slot as u32,
                        },
                        *b,
                    )
                })
            })
            .collect();
        // Nothing is written unless every filter bit is set first.
        let marked = staged.iter().try_for_each(|s| table.mark_frontend(&s.key)).is_ok();
        let slots_written = if marked {
            table.put_backends(&slots).map_or_else(|(n, _)| n, |()| slots.len())
        } else {
            0
        };
        let mut first_slot = 0;
        let complete: Vec<(ServiceKey, ServiceValue)> = staged
            .iter()
            .take_while(|s| {
                first_slot += s.backends.len();
                first_slot <= slots_written
            })
            .map(|s| (s.key, s.value))
            .collect();
        let services_written = if marked {
            table
                .put_services(&complete)
                .map_or_else(|(n, _)| n, |()| complete.len())
        } else {
            0
        };
        let mut first_slot = 0;
        for (i, s) in staged.into_iter().enumerate() {
            let written = slots_written.saturating_sub(first_slot).min(s.backends.len());
            first_slot += s.backends.len();
            self.applied.insert(
                s.key,
                Applied {
                    id: s.value.id,
                    value: (i < services_written).then_some(s.value),
                    slots: s.backends[..written].iter().copied().map(Some).collect(),
                    ranges: BTreeSet::new(),
                },
            );
            if i < services_written {
                report.added += 1;
                continue;
            }
            let layout = Layout {
                value: s.value,
                groups: [Vec::new(), Vec::new(), s.backends],
                ranges: BTreeSet::new(),
            };
            match self.apply(&s.key, &layout, table) {
                Ok(_) => report.added += 1,
                Err(e) => report.failures.push(format!("programming {}: {e}", s.frontend)),
            }
        }
    }

    /// Brings one frontend to `layout`; `Ok(true)` when anything was
    /// written.
    fn apply(&mut self, key: &ServiceKey, layout: &Layout, table: &mut impl ServiceTable) -> Result<bool, TableError> {
        let mut value = layout.value;
        if !self.applied.contains_key(key) {
            let id = self.allocate_id().ok_or_else(|| TableError {
                op: "allocating a service id".into(),
                reason: format!("all {MAX_SERVICES} are in use"),
            })?;
            self.applied.insert(
                *key,
                Applied {
                    id,
                    value: None,
                    slots: Vec::new(),
                    ranges: BTreeSet::new(),
                },
            );
        }
        let applied = self.applied.get_mut(key).expect("inserted above");
        value.id = applied.id;
        let mut target = Vec::with_capacity(value.backend_count as usize);
        for group in &layout.groups {
            let current = applied.slots.get(target.len()..).unwrap_or_default();
            target.extend(place(current, group));
        }
        let mut wrote = false;
        // New ranges before the entry that may turn the check on; stale
        // ones after it, so no client in both is ever refused.
        for range in layout.ranges.difference(&applied.ranges.clone()) {
            table.put_source_range(value.id, range)?;
            applied.ranges.insert(*range);
            wrote = true;
        }

        // Fill slots before the count grows and shrink the count before
        // slots go, so the data path never picks an empty slot.
        for (slot, b) in target.iter().enumerate() {
            if applied.slots.get(slot).copied().flatten() != Some(*b) {
                table.put_backend(
                    &BackendKey {
                        service_id: value.id,
                        slot: slot as u32,
                    },
                    b,
                )?;
                if applied.slots.len() <= slot {
                    applied.slots.resize(slot + 1, None);
                }
                applied.slots[slot] = Some(*b);
                wrote = true;
            }
        }
        if applied.value != Some(value) {
            if applied.value.is_none() {
                table.mark_frontend(key)?;
            }
            table.put_service(key, &value)?;
            applied.value = Some(value);
            wrote = true;
        }
        for range in applied.ranges.difference(&layout.ranges).copied().collect::<Vec<_>>() {
            table.remove_source_range(value.id, &range)?;
            applied.ranges.remove(&range);
            wrote = true;
        }
        while applied.slots.len() > target.len() {
            let slot = applied.slots.len() - 1;
            if applied.slots[slot].is_some() {
                table.remove_backend(&BackendKey {
                    service_id: value.id,
                    slot: slot as u32,
                })?;
                wrote = true;
            }
            applied.slots.pop();
        }
        Ok(wrote)
    }

    fn remove(&mut self, key: &ServiceKey, table: &mut impl ServiceTable) -> Result<(), TableError> {
        let applied = self.applied.get_mut(key).expect("called for applied keys");
        if applied.value.is_some() {
            table.remove_service(key)?;
            applied.value = None;
        }
        for range in std::mem::take(&mut applied.ranges) {
            if let Err(e) = table.remove_source_range(applied.id, &range) {
                applied.ranges.insert(range);
                return Err(e);
            }
        }
        while let Some(last) = applied.slots.last().copied() {
            if last.is_some() {
                let slot = applied.slots.len() as u32 - 1;
                table.remove_backend(&BackendKey {
                    service_id: applied.id,
                    slot,
                })?;
            }
            applied.slots.pop();
        }
        let id = applied.id;
        self.applied.remove(key);
        self.free_ids.push(id);
        Ok(())
    }

    fn allocate_id(&mut self) -> Option<u32> {
        if let Some(id) = self.free_ids.pop() {
            return Some(id);
        }
        if self.next_id >= MAX_SERVICES {
            return None;
        }
        self.next_id += 1;
        Some(self.next_id - 1)
    }

    pub fn frontend_count(&self) -> usize {
        self.applied.len()
    }
}

fn describe(key: &ServiceKey) -> String {
    frontend(key).map_or_else(
        || format!("{}:{}/{}", key.ip(), key.port(), key.proto),
        |f| f.to_string(),
    )
}

/// Slot layout for `backends` that moves as few backends as possible: a
/// backend keeps its slot when it stays and the slot still exists, so flows
/// tracked to it keep validating against their slot.
fn place(current: &[Option<Backend>], backends: &[Backend]) -> Vec<Backend> {
    let wanted: BTreeSet<Backend> = backends.iter().copied().collect();
    let mut slots: Vec<Option<Backend>> = (0..backends.len())
        .map(|i| current.get(i).copied().flatten().filter(|b| wanted.contains(b)))
        .collect();
    let placed: BTreeSet<Backend> = slots.iter().flatten().copied().collect();
    let mut rest = backends.iter().filter(|b| !placed.contains(b));
    for slot in slots.iter_mut().filter(|s| s.is_none()) {
        *slot = rest.next().copied();
    }
    slots
        .into_iter()
        .map(|s| s.expect("as many slots as backends"))
        .collect()
}

#[cfg(test)]
pub(crate) mod mem_table;
#[cfg(test)]
mod tests;
