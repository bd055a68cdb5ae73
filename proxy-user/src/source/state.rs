//! The validated cluster state a source maintains and the model reads.
//!
//! The API watch source applies each event here; the manifest source
//! replaces the whole snapshot when its directory changes. An object that
//! cannot be used is reported once (when it first appears or its reason
//! changes), and its last valid version stays, so one bad update never takes
//! a working service down.
use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::{core::v1::Node, core::v1::Service, discovery::v1::EndpointSlice};

use super::Snapshot;
use crate::model::{
    self,
    desired::DesiredTracker,
    objects::{EndpointSliceInfo, ObjectName, Rejection, ServiceInfo},
    topology::NodeTopology,
    DesiredState, Frontend, FrontendState,
};

/// A notable change of an object, to be logged once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    /// The object cannot be used (and whether its last valid version stays).
    Rejected {
        kind: &'static str,
        field: String,
        message: String,
    },
    /// Usable, but part of it is not supported by this dataplane.
    Unsupported(String),
}

/// What changed since the last sync: the frontends to (re)program (`None`:
/// remove) and the conflicts among them.
#[derive(Debug, Default)]
pub struct Changes {
    pub frontends: Vec<(Frontend, Option<FrontendState>)>,
    pub conflicts: Vec<Rejection>,
}

#[derive(Default)]
pub struct ClusterState {
    snapshot: Snapshot,
    /// Slices by the Service they belong to.
    slices_of: BTreeMap<ObjectName, BTreeSet<ObjectName>>,
    desired: DesiredTracker,
    /// Services whose frontends must be recomputed.
    dirty: BTreeSet<ObjectName>,
    /// Why each currently rejected object is rejected.
    rejected: BTreeMap<(&'static str, ObjectName), String>,
    /// What of each service is unsupported, as last reported.
    unsupported: BTreeMap<ObjectName, Vec<String>>,
    /// Slices of address types not programmed (IPv6, FQDN), by name.
    ignored_slices: BTreeMap<ObjectName, String>,
    /// This node, with its zone once its Node object is seen.
    node: NodeTopology,
}

/// The node label topology hints refer to.
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

impl ClusterState {
    pub fn new(node_name: String) -> Self {
        ClusterState {
            node: NodeTopology {
                name: node_name,
                zone: None,
            },
            ..Default::default()
        }
    }

    /// Standalone mode: the manifest source validated the whole snapshot.
    pub fn replace_snapshot(&mut self, snapshot: Snapshot) {
        self.snapshot = snapshot;
        self.slices_of.clear();
        for (name, slice) in &self.snapshot.slices {
            let service = service_of(name, slice);
            self.slices_of.entry(service).or_default().insert(name.clone());
        }
        self.mark_all_dirty();
    }

    /// Every Service now known, and every one that still has frontends
    /// (and so must lose them if it is gone).
    fn mark_all_dirty(&mut self) {
        self.dirty.extend(self.snapshot.services.keys().cloned());
        self.dirty.extend(self.desired.services().cloned());
    }

    /// Recomputes the dirty Services; the frontends they touched.
    fn flush(&mut self) -> BTreeSet<Frontend> {
        let mut changed = BTreeSet::new();
        for service in std::mem::take(&mut self.dirty) {
            let claims = match self.snapshot.services.get(&service) {
                Some(info) => {
                    let slices: Vec<&EndpointSliceInfo> = self
                        .slices_of
                        .get(&service)
                        .into_iter()
                        .flatten()
                        .filter_map(|n| self.snapshot.slices.get(n))
                        .collect();
                    model::service_frontends(info, &slices, &self.node)
                }
                None => Vec::new(),
            };
            self.desired.set_service(&service, claims, &mut changed);
        }
        changed
    }

    /// What to program since the last call: only the frontends of the
    /// Services that changed, so a sync costs what changed.
    pub fn take_changes(&mut self) -> Changes {
        let changed = self.flush();
        let mut changes = Changes::default();
        for frontend in changed {
            changes.conflicts.extend(self.desired.conflicts_at(&frontend));
            changes
                .frontends
                .push((frontend, self.desired.winner(&frontend).cloned()));
        }
        changes
    }

    /// The whole desired state (for a full resync).
    pub fn desired(&mut self) -> DesiredState {
        self.flush();
        self.desired.state()
    }

    /// Programmed services, frontends and endpoints, as the model has them.
    pub fn counts(&self) -> (usize, usize, usize) {
        (
            self.desired.service_count(),
            self.desired.frontend_count(),
            self.desired.endpoint_count(),
        )
    }

    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// An added or modified Service.
    pub fn apply_service(&mut self, svc: &Service) -> Vec<Notice> {
        let name = object_name(&svc.metadata);
        match ServiceInfo::from_k8s(svc) {
            Ok(Ok(info)) => {
                self.rejected.remove(&("Service", name.clone()));
                let mut notices = Vec::new();
                let unsupported = info.unsupported_notes();
                if self.unsupported.get(&name) != Some(&unsupported) {
                    notices.extend(unsupported.iter().cloned().map(Notice::Unsupported));
                }
                if unsupported.is_empty() {
                    self.unsupported.remove(&name);
                } else {
                    self.unsupported.insert(name.clone(), unsupported);
                }
                self.dirty.insert(name.clone());
                self.snapshot.services.insert(name, info);
                notices
            }
            // Headless, ExternalName, another proxy's: not ours (any more).
            Ok(Err(_skipped)) => {
                self.delete_service(&name);
                Vec::new()
            }
            Err(rejection) => {
                let kept = self.snapshot.services.contains_key(&name);
                self.reject("Service", name, rejection, kept)
            }
        }
    }

    pub fn delete_service(&mut self, name: &ObjectName) {
        self.dirty.insert(name.clone());
        self.snapshot.services.remove(name);
        self.rejected.remove(&("Service", name.clone()));
        self.unsupported.remove(name);
    }

    /// An added or modified EndpointSlice.
    pub fn apply_slice(&mut self, slice: &EndpointSlice) -> Vec<Notice> {
        let name = object_name(&slice.metadata);
        match EndpointSliceInfo::from_k8s(slice) {
            Ok(Some(info)) => {
                self.rejected.remove(&("EndpointSlice", name.clone()));
                self.ignored_slices.remove(&name);
                self.unlink_slice(&name);
                let service = service_of(&name, &info);
                self.slices_of.entry(service.clone()).or_default().insert(name.clone());
                self.dirty.insert(service);
                self.snapshot.slices.insert(name, info);
                Vec::new()
            }
            Ok(None) => {
                self.delete_slice(&name);
                self.ignored_slices.insert(name, slice.address_type.clone());
                Vec::new()
            }
            Err(rejection) => {
                let kept = self.snapshot.slices.contains_key(&name);
                self.reject("EndpointSlice", name, rejection, kept)
            }
        }
    }

    pub fn delete_slice(&mut self, name: &ObjectName) {
        self.unlink_slice(name);
        self.snapshot.slices.remove(name);
        self.rejected.remove(&("EndpointSlice", name.clone()));
        self.ignored_slices.remove(name);
    }

    /// Forgets which Service a slice belonged to (marking that one dirty).
    fn unlink_slice(&mut self, name: &ObjectName) {
        let Some(old) = self.snapshot.slices.get(name) else {
            return;
        };
        let service = service_of(name, old);
        if let Some(set) = self.slices_of.get_mut(&service) {
            set.remove(name);
            if set.is_empty() {
                self.slices_of.remove(&service);
            }
        }
        self.dirty.insert(service);
    }

    /// Of Nodes, only this node's zone matters (for topology hints).
    pub fn apply_node(&mut self, node: &Node) {
        if node.metadata.name.as_deref() == Some(self.node.name.as_str()) {
            self.set_zone(node.metadata.labels.as_ref().and_then(|l| l.get(ZONE_LABEL)).cloned());
        }
    }

    pub fn delete_node(&mut self, name: &str) {
        if name == self.node.name {
            self.set_zone(None);
        }
    }

    /// Topology hints depend on the zone: a new zone changes every Service.
    fn set_zone(&mut self, zone: Option<String>) {
        if self.node.zone != zone {
            self.node.zone = zone;
            self.mark_all_dirty();
        }
    }

    /// After a (re-)list: exactly these Services exist.
    pub fn replace_services(&mut self, services: &[Service]) -> Vec<Notice> {
        let listed: BTreeSet<ObjectName> = services.iter().map(|s| object_name(&s.metadata)).collect();
        let known: Vec<ObjectName> = self
            .snapshot
            .services
            .keys()
            .chain(self.rejected.keys().filter(|(k, _)| *k == "Service").map(|(_, n)| n))
            .cloned()
            .collect();
        for name in known.iter().filter(|n| !listed.contains(n)) {
            self.delete_service(name);
        }
        services.iter().flat_map(|s| self.apply_service(s)).collect()
    }

    /// After a (re-)list: exactly these EndpointSlices exist.
    pub fn replace_slices(&mut self, slices: &[EndpointSlice]) -> Vec<Notice> {
        let listed: BTreeSet<ObjectName> = slices.iter().map(|s| object_name(&s.metadata)).collect();
        let known: Vec<ObjectName> = self
            .snapshot
            .slices
            .keys()
            .chain(self.ignored_slices.keys())
            .chain(
                self.rejected
                    .keys()
                    .filter(|(k, _)| *k == "EndpointSlice")
                    .map(|(_, n)| n),
            )
            .cloned()
            .collect();
        for name in known.iter().filter(|n| !listed.contains(n)) {
            self.delete_slice(name);
        }
        slices.iter().flat_map(|s| self.apply_slice(s)).collect()
    }

    pub fn replace_nodes(&mut self, nodes: &[Node]) {
        if !nodes
            .iter()
            .any(|n| n.metadata.name.as_deref() == Some(self.node.name.as_str()))
        {
            self.set_zone(None);
        }
        for node in nodes {
            self.apply_node(node);
        }
    }

    fn reject(&mut self, kind: &'static str, name: ObjectName, rejection: Rejection, kept: bool) -> Vec<Notice> {
        let note = if kept { "; keeping its last valid version" } else { "" };
        let message = format!("{rejection}{note}");
        if self.rejected.get(&(kind, name.clone())) == Some(&message) {
            return Vec::new();
        }
        self.rejected.insert((kind, name), message.clone());
        vec![Notice::Rejected {
            kind,
            field: generic_field(&rejection.field),
            message,
        }]
    }

    pub fn rejected_count(&self) -> usize {
        self.rejected.len()
    }

    /// Ignored slices by address type.
    pub fn ignored_slices(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for kind in self.ignored_slices.values() {
            *counts.entry(kind.clone()).or_default() += 1;
        }
        counts
    }

    /// Unsupported service ports by protocol (only SCTP today).
    pub fn unsupported_ports(&self) -> usize {
        self.unsupported.values().map(Vec::len).sum()
    }
}

/// `spec.ports[3].port` -> `spec.ports[].port`: a metric label with few values.
fn generic_field(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut in_index = false;
    for c in field.chars() {
        match c {
            '[' => {
                in_index = true;
                out.push('[');
            }
            ']' => {
                in_index = false;
                out.push(']');
            }
            _ if in_index && c.is_ascii_digit() => {}
            _ if in_index => {
                // A label key in brackets, keep as is.
                out.push(c);
            }
            _ => out.push(c),
        }
    }
    out
}

fn service_of(slice: &ObjectName, info: &EndpointSliceInfo) -> ObjectName {
    ObjectName {
        namespace: slice.namespace.clone(),
        name: info.service.clone(),
    }
}

pub fn object_name(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ObjectName {
    ObjectName {
        namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
        name: meta.name.clone().unwrap_or_default(),
    }
}
