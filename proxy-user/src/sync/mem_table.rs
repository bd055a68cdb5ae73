//! The service maps in memory, for tests of the syncer and its callers.
use std::collections::{BTreeMap, BTreeSet};

use proxy_common::{Backend, BackendKey, ServiceKey, ServiceValue};

use super::{ServiceTable, TableError};
use crate::model::objects::Cidr;

/// The maps in memory; `fail_after` makes every write past that many fail,
/// like a full map.
#[derive(Default, Clone)]
pub struct MemTable {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub backends: BTreeMap<BackendKey, Backend>,
    pub writes: usize,
    pub fail_after: Option<usize>,
    pub frontend_marks: BTreeSet<ServiceKey>,
    pub source_ranges: BTreeSet<(u32, Cidr)>,
}

impl MemTable {
    fn write(&mut self) -> Result<(), TableError> {
        self.writes += 1;
        match self.fail_after {
            Some(n) if self.writes > n => Err(TableError {
                op: "writing".into(),
                reason: "map is full".into(),
            }),
            _ => Ok(()),
        }
    }

    /// What the data path would see: frontend -> (affinity, backends by
    /// slot). Checks what the data path relies on at every moment: unique
    /// ids, and every slot below a service's count present.
    pub fn view(&self) -> BTreeMap<ServiceKey, (u32, Vec<Backend>)> {
        let ids: BTreeSet<u32> = self.services.values().map(|v| v.id).collect();
        assert_eq!(ids.len(), self.services.len(), "service ids must be unique");
        for (key, value) in &self.services {
            assert!(
                self.frontend_marks.contains(key),
                "frontend {key:?} not in the pre-filter"
            );
            for slot in 0..value.backend_count {
                assert!(
                    self.backends.contains_key(&BackendKey {
                        service_id: value.id,
                        slot,
                    }),
                    "slot {slot} of {key:?} missing"
                );
            }
        }
        self.services
            .iter()
            .map(|(k, v)| {
                let slots = (0..v.backend_count)
                    .map(|slot| self.backends[&BackendKey { service_id: v.id, slot }])
                    .collect();
                (*k, (v.affinity_timeout, slots))
            })
            .collect()
    }

    /// After a sync that succeeded, nothing else is left either.
    pub fn assert_tidy(&self) {
        let slots: usize = self.services.values().map(|v| v.backend_count as usize).sum();
        assert_eq!(self.backends.len(), slots, "no backend slot outside a service's count");
    }

    /// The view with backends as sets (slot order depends on history).
    pub fn as_sets(&self) -> BTreeMap<ServiceKey, (u32, BTreeSet<Backend>)> {
        self.assert_tidy();
        self.view()
            .into_iter()
            .map(|(k, (a, slots))| (k, (a, slots.into_iter().collect())))
            .collect()
    }
}

impl ServiceTable for MemTable {
    fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, TableError> {
        Ok(self.services.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn backends(&self) -> Result<Vec<(BackendKey, Backend)>, TableError> {
        Ok(self.backends.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), TableError> {
        self.write()?;
        self.services.insert(*key, *value);
        Ok(())
    }
    fn remove_service(&mut self, key: &ServiceKey) -> Result<(), TableError> {
        self.write()?;
        self.services.remove(key);
        Ok(())
    }
    fn put_backend(&mut self, key: &BackendKey, value: &Backend) -> Result<(), TableError> {
        self.write()?;
        self.backends.insert(*key, *value);
        Ok(())
    }
    fn remove_backend(&mut self, key: &BackendKey) -> Result<(), TableError> {
        self.write()?;
        self.backends.remove(key);
        Ok(())
    }
    fn mark_frontend(&mut self, key: &ServiceKey) -> Result<(), TableError> {
        self.frontend_marks.insert(*key);
        Ok(())
    }
    fn source_ranges(&self) -> Result<Vec<(u32, Cidr)>, TableError> {
        Ok(self.source_ranges.iter().copied().collect())
    }
    fn put_source_range(&mut self, service_id: u32, range: &Cidr) -> Result<(), TableError> {
        self.write()?;
        self.source_ranges.insert((service_id, *range));
        Ok(())
    }
    fn remove_source_range(&mut self, service_id: u32, range: &Cidr) -> Result<(), TableError> {
        self.write()?;
        self.source_ranges.remove(&(service_id, *range));
        Ok(())
    }
}
