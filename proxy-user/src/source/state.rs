//! The validated cluster state a source maintains and the model reads.
//!
//! The API watch source applies each event here; the manifest source
//! replaces the whole snapshot when its directory changes. An object that
//! cannot be used is reported once (when it first appears or its reason
//! changes), and its last valid version stays, so one bad update never takes
//! a working service down.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    ops::RangeInclusive,
    time::SystemTime,
};

use k8s_openapi::api::{core::v1::Node, core::v1::Service, discovery::v1::EndpointSlice};

use super::Snapshot;
use crate::model::{
    self,
    desired::DesiredTracker,
    objects::{EndpointSliceInfo, NodeInfo, ObjectName, Rejection, ServiceInfo},
    topology::{NodePortAddresses, NodeTopology},
    DesiredState, Frontend, FrontendState, HealthCheck, NoLocalEndpoints,
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
    /// The changed frontends and what each should now do (none if gone);
    /// left empty by `take_changes_for_whole_sync`.
    pub frontends: Vec<(Frontend, Option<FrontendState>)>,
    pub conflicts: Vec<Rejection>,
    /// What of the changed Services this node does not serve as asked,
    /// reported once.
    pub notes: Vec<String>,
    /// When the changes behind these frontends were triggered in the
    /// cluster (the EndpointSlices' `endpoints.kubernetes.io/
    /// last-change-trigger-time`): kube-proxy's start of network
    /// programming. Only of slice changes that changed a frontend.
    pub trigger_times: Vec<SystemTime>,
}

/// The annotation the EndpointSlice controller sets to the time of the
/// last Pod or Service change that led to the slice's update.
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// A slice's trigger time, if it has a readable one.
fn trigger_time(slice: &EndpointSlice) -> Option<SystemTime> {
    let text = slice.metadata.annotations.as_ref()?.get(TRIGGER_TIME_ANNOTATION)?;
    let at: k8s_openapi::jiff::Timestamp = text.parse().ok()?;
    Some(SystemTime::from(at))
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
    /// This node as the model sees it: zone and NodePort addresses.
    node: NodeTopology,
    /// This node's Node object, once seen.
    node_info: NodeInfo,
    /// The addresses of the node's interfaces (for `--nodeport-addresses`).
    interface_addrs: Vec<Ipv4Addr>,
    nodeport_addresses: NodePortAddresses,
    /// What of each service the model reported as not served, last time.
    model_notes: BTreeMap<ObjectName, Vec<String>>,
    pending_notes: Vec<String>,
    /// The health checks Services ask of this node, kept current as dirty
    /// Services are recomputed.
    health_checks: BTreeMap<ObjectName, HealthCheck>,
    /// Trigger times of the slice changes applied since the last
    /// `take_changes`, by Service.
    trigger_times: BTreeMap<ObjectName, Vec<SystemTime>>,
    /// Trigger times before this are not this daemon's to measure (a
    /// (re)start lists slices changed long ago), as kube-proxy ignores
    /// those before its tracker started.
    measuring_since: Option<SystemTime>,
    /// Services whose recomputation changed what a frontend should do since
    /// the last `take_changes`.
    effective: BTreeSet<ObjectName>,
    /// Frontends touched by a recomputation ahead of a sync (`recompute`),
    /// for the next `take_changes`.
    recomputed: BTreeSet<Frontend>,
    /// Services whose Service object, and whose slices, changed since the
    /// last sync took the changes: kube-proxy's pending service and
    /// endpoint changes.
    service_changes: BTreeSet<ObjectName>,
    endpoint_changes: BTreeSet<ObjectName>,
    /// Per Service, its ports whose Local policy finds no endpoint here;
    /// and the sum over all of them.
    no_local: BTreeMap<ObjectName, NoLocalEndpoints>,
    no_local_total: NoLocalEndpoints,
    /// This node's Node object has been seen (so its absence now means it
    /// was deleted).
    node_seen: bool,
}

impl ClusterState {
    pub fn new(node_name: String) -> Self {
        Self::with_node_settings(
            node_name,
            NodePortAddresses::Primary,
            crate::model::topology::DEFAULT_NODE_PORT_RANGE,
        )
    }

    pub fn with_node_settings(
        node_name: String,
        nodeport_addresses: NodePortAddresses,
        node_port_range: RangeInclusive<u16>,
    ) -> Self {
        ClusterState {
            node: NodeTopology {
                name: node_name.clone(),
                node_port_range,
                ..Default::default()
            },
            node_info: NodeInfo {
                name: node_name,
                ..Default::default()
            },
            nodeport_addresses,
            measuring_since: Some(SystemTime::now()),
            ..Default::default()
        }
    }

    /// The node's interface addresses changed (or were read for the first
    /// time): NodePorts follow them when they depend on them.
    pub fn set_interface_addresses(&mut self, mut addrs: Vec<Ipv4Addr>) {
        addrs.sort();
        if addrs != self.interface_addrs {
            self.interface_addrs = addrs;
            self.update_node();
        }
    }

    /// The addresses NodePorts answer on.
    pub fn nodeport_addresses(&self) -> &[Ipv4Addr] {
        &self.node.nodeport_addresses
    }

    /// Every address of the node: its InternalIPs and NodePort addresses.
    pub fn node_addresses(&self) -> Vec<Ipv4Addr> {
        let mut addrs = self.node_info.internal_ips.clone();
        addrs.extend(&self.node.nodeport_addresses);
        addrs.sort();
        addrs.dedup();
        addrs
    }

    /// The address source-NATed flows leave with: the node's primary
    /// InternalIP, else its first NodePort address.
    pub fn snat_addr(&self) -> Option<Ipv4Addr> {
        self.node_info
            .internal_ips
            .first()
            .or(self.node.nodeport_addresses.first())
            .copied()
    }

    /// Every health check server this node must run, with its answer, as of
    /// the last computation of the changes.
    pub fn health_checks(&self) -> Vec<HealthCheck> {
        self.health_checks.values().cloned().collect()
    }

    fn slices_of_service(&self, service: &ObjectName) -> Vec<&EndpointSliceInfo> {
        self.slices_of
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|n| self.snapshot.slices.get(n))
            .collect()
    }

    /// The Node object of this node (`None`: not known, or deleted).
    fn set_node_info(&mut self, info: Option<NodeInfo>) {
        let seen = info.is_some();
        self.node_info = info.unwrap_or_else(|| NodeInfo {
            name: self.node.name.clone(),
            // Seen once and gone now: deleted.
            leaving: self.node_seen,
            ..Default::default()
        });
        self.node_seen |= seen;
        self.update_node();
    }

    /// kube-proxy's node eligibility: whether load balancers should send
    /// this node new traffic, `false` once its Node is being deleted (or
    /// is gone, or the cluster autoscaler has marked it for deletion). A
    /// node never seen (manifests without Nodes) is eligible.
    pub fn node_eligible(&self) -> bool {
        !self.node_info.leaving
    }

    /// Services with Service changes, and with endpoint changes, not yet
    /// taken by a sync.
    pub fn pending_changes(&self) -> (usize, usize) {
        (self.service_changes.len(), self.endpoint_changes.len())
    }

    /// Ports whose Local traffic policy finds no endpoint on this node, as
    /// of the last recomputation.
    pub fn no_local_endpoints(&self) -> NoLocalEndpoints {
        self.no_local_total
    }

    fn set_no_local(&mut self, service: &ObjectName, counts: NoLocalEndpoints) {
        let old = if counts == NoLocalEndpoints::default() {
            self.no_local.remove(service)
        } else {
            self.no_local.insert(service.clone(), counts)
        }
        .unwrap_or_default();
        let total = &mut self.no_local_total;
        total.internal = total.internal + counts.internal - old.internal;
        total.external = total.external + counts.external - old.external;
    }

    /// Zone and NodePort addresses from what is known of the node; a change
    /// changes every Service.
    fn update_node(&mut self) {
        let addresses = self
            .nodeport_addresses
            .resolve(&self.node_info.internal_ips, &self.interface_addrs);
        if self.node.zone != self.node_info.zone || self.node.nodeport_addresses != addresses {
            self.node.zone = self.node_info.zone.clone();
            self.node.nodeport_addresses = addresses;
            self.mark_all_dirty();
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
        let node = self.snapshot.nodes.get(&self.node.name).cloned();
        self.set_node_info(node);
    }

    /// Every Service now known, and every one that still has frontends
    /// (and so must lose them if it is gone).
    fn mark_all_dirty(&mut self) {
        self.dirty.extend(self.snapshot.services.keys().cloned());
        self.dirty.extend(self.desired.services().cloned());
    }

    /// Recomputes the dirty Services now, so that the next sync finds the
    /// work done: called after a whole listing, which at a start arrives
    /// while the daemon is still loading its programs (then the model's
    /// work, most of a first sync at scale, costs the start nothing). The
    /// frontends touched wait for `take_changes`.
    pub fn recompute(&mut self) {
        let changed = self.recompute_dirty();
        self.recomputed.extend(changed);
    }

    /// For a sync: recomputes the dirty Services; every frontend touched
    /// since the last sync.
    fn flush(&mut self) -> BTreeSet<Frontend> {
        self.service_changes.clear();
        self.endpoint_changes.clear();
        let mut changed = std::mem::take(&mut self.recomputed);
        changed.extend(self.recompute_dirty());
        changed
    }

    /// Recomputes the dirty Services; the frontends they touched.
    fn recompute_dirty(&mut self) -> BTreeSet<Frontend> {
        let mut changed = BTreeSet::new();
        for service in std::mem::take(&mut self.dirty) {
            let (claims, notes, health_check, no_local) = match self.snapshot.services.get(&service) {
                Some(info) => {
                    let slices = self.slices_of_service(&service);
                    let notes: Vec<String> = model::service_notes(info, &self.node)
                        .into_iter()
                        .map(|(field, why)| format!("Service {service}: {field}: {why}"))
                        .collect();
                    let health_check = model::health_check(info, &slices, &self.node);
                    let no_local = model::no_local_endpoints(info, &slices, &self.node);
                    let claims = model::service_frontends(info, &slices, &self.node);
                    (claims, notes, health_check, no_local)
                }
                None => (Vec::new(), Vec::new(), None, NoLocalEndpoints::default()),
            };
            self.set_no_local(&service, no_local);
            match health_check {
                Some(check) => self.health_checks.insert(service.clone(), check),
                None => self.health_checks.remove(&service),
            };
            let created = self.snapshot.services.get(&service).and_then(|s| s.created);
            if self.desired.set_service(&service, created, claims, &mut changed) {
                self.effective.insert(service.clone());
            }
            if self
                .model_notes
                .get(&service)
                .map_or(!notes.is_empty(), |old| *old != notes)
            {
                self.pending_notes.extend(notes.iter().cloned());
            }
            if notes.is_empty() {
                self.model_notes.remove(&service);
            } else {
                self.model_notes.insert(service, notes);
            }
        }
        changed
    }

    /// What to program since the last call: only the frontends of the
    /// Services that changed, so a sync costs what changed.
    pub fn take_changes(&mut self) -> Changes {
        self.take(true)
    }

    /// The same, for a sync that programs the whole desired state (read
    /// with `desired`): the changed frontends' states are not copied out,
    /// which at a start means every frontend.
    pub fn take_changes_for_whole_sync(&mut self) -> Changes {
        self.take(false)
    }

    fn take(&mut self, with_frontends: bool) -> Changes {
        let changed = self.flush();
        let mut changes = Changes {
            notes: std::mem::take(&mut self.pending_notes),
            ..Default::default()
        };
        // A slice change that changed no frontend never reaches the data
        // path: its time is dropped, as kube-proxy does.
        let mut triggers = std::mem::take(&mut self.trigger_times);
        for service in std::mem::take(&mut self.effective) {
            changes
                .trigger_times
                .extend(triggers.remove(&service).unwrap_or_default());
        }
        // A slice may come before its Service: its change reaches the data
        // path when the Service does.
        triggers.retain(|service, _| !self.snapshot.services.contains_key(service));
        self.trigger_times = triggers;
        for frontend in changed {
            changes.conflicts.extend(self.desired.conflicts_at(&frontend));
            if with_frontends {
                changes
                    .frontends
                    .push((frontend, self.desired.winner(&frontend).cloned()));
            }
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
        let name = ObjectName::of(&svc.metadata);
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
                self.service_changes.insert(name.clone());
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
        self.service_changes.insert(name.clone());
        self.snapshot.services.remove(name);
        self.rejected.remove(&("Service", name.clone()));
        self.unsupported.remove(name);
    }

    /// An added or modified EndpointSlice.
    pub fn apply_slice(&mut self, slice: &EndpointSlice) -> Vec<Notice> {
        let name = ObjectName::of(&slice.metadata);
        match EndpointSliceInfo::from_k8s(slice) {
            Ok(Some(info)) => {
                self.rejected.remove(&("EndpointSlice", name.clone()));
                self.ignored_slices.remove(&name);
                self.unlink_slice(&name);
                let service = service_of(&name, &info);
                self.slices_of.entry(service.clone()).or_default().insert(name.clone());
                if let Some(at) = trigger_time(slice).filter(|at| self.measuring_since.is_none_or(|s| *at >= s)) {
                    self.trigger_times.entry(service.clone()).or_default().push(at);
                }
                self.endpoint_changes.insert(service.clone());
                self.dirty.insert(service);
                self.snapshot.slices.insert(name, info);
                Vec::new()
            }
            Ok(None) => {
                self.delete_slice(&name);
                let why = if slice
                    .metadata
                    .labels
                    .as_ref()
                    .is_some_and(|l| l.contains_key(crate::model::objects::SERVICE_NAME_LABEL))
                {
                    slice.address_type.clone()
                } else {
                    "NoServiceName".to_owned()
                };
                self.ignored_slices.insert(name, why);
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
        self.endpoint_changes.insert(service.clone());
        self.dirty.insert(service);
    }

    /// Of Nodes, only this node matters: its zone (for topology hints) and
    /// its addresses.
    pub fn apply_node(&mut self, node: &Node) {
        if node.metadata.name.as_deref() == Some(self.node.name.as_str()) {
            self.set_node_info(Some(NodeInfo::from_k8s(node)));
        }
    }

    pub fn delete_node(&mut self, name: &str) {
        if name == self.node.name {
            self.set_node_info(None);
        }
    }

    /// After a (re-)list: exactly these Services exist.
    pub fn replace_services(&mut self, services: &[Service]) -> Vec<Notice> {
        let listed: BTreeSet<ObjectName> = services.iter().map(|s| ObjectName::of(&s.metadata)).collect();
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
        let listed: BTreeSet<ObjectName> = slices.iter().map(|s| ObjectName::of(&s.metadata)).collect();
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
        let ours = nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(self.node.name.as_str()));
        self.set_node_info(ours.map(NodeInfo::from_k8s));
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
