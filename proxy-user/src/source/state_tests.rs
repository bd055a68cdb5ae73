//! Property test: random sequences of Service and EndpointSlice events,
//! applied one by one with a sync after each, leave the maps exactly as a
//! from-scratch sync of the final objects does.
use std::collections::BTreeMap;

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde_json::json;

use super::state::ClusterState;
use crate::sync::{mem_table::MemTable, Syncer};

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

fn random_service(rng: &mut Rng, i: u64) -> Service {
    let mut ports = Vec::new();
    if rng.chance(80) {
        ports.push(json!({"name": "http", "port": 80 + rng.below(2), "protocol": "TCP"}));
    }
    if rng.chance(50) {
        ports.push(json!({"name": "dns", "port": 53, "protocol": "UDP"}));
    }
    let headless = rng.chance(10);
    // Sometimes a shared address: two Services claim the same frontends.
    let ip = if rng.chance(15) {
        "10.96.0.100".to_string()
    } else {
        format!("10.96.0.{}", i + 1)
    };
    let mut spec = json!({
        "clusterIP": if headless { "None".to_string() } else { ip },
        "ports": ports,
    });
    if rng.chance(30) {
        spec["sessionAffinity"] = json!("ClientIP");
    }
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": format!("svc{i}"), "namespace": "default"},
        "spec": spec,
    }))
    .unwrap()
}

fn random_slice(rng: &mut Rng, j: u64) -> EndpointSlice {
    let service = format!("svc{}", rng.below(4));
    let mut ports = vec![json!({"name": "http", "port": 8080 + rng.below(2), "protocol": "TCP"})];
    if rng.chance(50) {
        ports.push(json!({"name": "dns", "port": 5353, "protocol": "UDP"}));
    }
    let endpoints: Vec<_> = (0..rng.below(4))
        .map(|_| {
            json!({
                "addresses": [format!("10.244.0.{}", 10 + rng.below(8))],
                "conditions": {"ready": rng.chance(70), "serving": rng.chance(80), "terminating": rng.chance(30)},
            })
        })
        .collect();
    let address_type = if rng.chance(10) { "IPv6" } else { "IPv4" };
    let endpoints = if address_type == "IPv6" { vec![] } else { endpoints };
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": address_type,
        "metadata": {"name": format!("slice{j}"), "namespace": "default",
                     "labels": {"kubernetes.io/service-name": service}},
        "ports": ports, "endpoints": endpoints,
    }))
    .unwrap()
}

/// What the daemon does on a change: program only the changed frontends.
fn incremental_sync(state: &mut ClusterState, syncer: &mut Syncer, table: &mut MemTable) {
    let changes = state.take_changes();
    let frontends: Vec<_> = changes.frontends.iter().map(|(f, s)| (*f, s.as_ref())).collect();
    let report = syncer.sync_changes(&frontends, table);
    assert!(report.failures.is_empty());
}

#[test]
fn incremental_event_syncs_equal_a_sync_from_scratch() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for _run in 0..40 {
        let mut state = ClusterState::default();
        let mut table = MemTable::default();
        let mut syncer = Syncer::default();
        // The objects that exist, as the API server would list them.
        let mut services: BTreeMap<u64, Service> = BTreeMap::new();
        let mut slices: BTreeMap<u64, EndpointSlice> = BTreeMap::new();
        for _event in 0..60 {
            match rng.below(5) {
                0 | 1 => {
                    let i = rng.below(4);
                    let svc = random_service(&mut rng, i);
                    state.apply_service(&svc);
                    services.insert(i, svc);
                }
                2 => {
                    let i = rng.below(4);
                    if let Some(svc) = services.remove(&i) {
                        state.delete_service(&crate::model::objects::ObjectName::of(&svc.metadata));
                    }
                }
                3 => {
                    let j = rng.below(6);
                    let slice = random_slice(&mut rng, j);
                    state.apply_slice(&slice);
                    slices.insert(j, slice);
                }
                _ => {
                    let j = rng.below(6);
                    if let Some(slice) = slices.remove(&j) {
                        state.delete_slice(&crate::model::objects::ObjectName::of(&slice.metadata));
                    }
                }
            }
            // Sometimes the model is recomputed ahead of the sync (as the
            // watchers do after a listing): what it touched must still
            // reach the sync.
            if rng.chance(30) {
                state.recompute();
            }
            // Not every event is followed by a sync: the loop coalesces.
            if rng.chance(60) {
                incremental_sync(&mut state, &mut syncer, &mut table);
            }
        }
        incremental_sync(&mut state, &mut syncer, &mut table);

        let mut scratch_state = ClusterState::default();
        scratch_state.replace_services(&services.values().cloned().collect::<Vec<_>>());
        scratch_state.replace_slices(&slices.values().cloned().collect::<Vec<_>>());
        assert_eq!(
            state.desired(),
            scratch_state.desired(),
            "the state after events equals a fresh list"
        );
        let mut scratch = MemTable::default();
        Syncer::default().sync(&scratch_state.desired(), &mut scratch);
        assert_eq!(
            table.as_sets(),
            scratch.as_sets(),
            "the maps after incremental syncs equal a from-scratch sync"
        );

        // And a re-list into the same state (as after 410 Gone) changes nothing.
        let writes = table.writes;
        state.replace_services(&services.values().cloned().collect::<Vec<_>>());
        state.replace_slices(&slices.values().cloned().collect::<Vec<_>>());
        incremental_sync(&mut state, &mut syncer, &mut table);
        assert_eq!(table.writes, writes);
        // A full sync over the incremental result writes nothing either.
        syncer.sync(&state.desired(), &mut table);
        assert_eq!(table.writes, writes);
    }
}

#[test]
fn a_relist_drops_what_was_deleted_meanwhile() {
    let mut rng = Rng(7);
    let mut state = ClusterState::default();
    let a = random_service(&mut rng, 0);
    let b = random_service(&mut rng, 1);
    state.apply_service(&a);
    state.apply_service(&b);
    state.apply_slice(&random_slice(&mut rng, 0));
    state.replace_services(std::slice::from_ref(&b));
    state.replace_slices(&[]);
    assert_eq!(
        state
            .snapshot()
            .services
            .keys()
            .map(|n| n.name.clone())
            .collect::<Vec<_>>(),
        vec!["svc1"]
    );
    assert!(state.snapshot().slices.is_empty());
}

/// kube-proxy's network programming latency starts at the slice's trigger
/// time, and only changes that reach the data path count; slices changed
/// before the daemon started are not its to measure.
#[test]
fn trigger_times_count_only_for_changes_that_reach_the_data_path() {
    let mut state = ClusterState::new("node0".into());
    let service: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"clusterIP": "10.96.0.1", "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
    }))
    .unwrap();
    let slice = |address: &str, triggered: &str| -> EndpointSlice {
        serde_json::from_value(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {
                "name": "web-abc", "namespace": "default",
                "labels": {"kubernetes.io/service-name": "web"},
                "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": triggered},
            },
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [address], "conditions": {"ready": true}}],
        }))
        .unwrap()
    };
    let now = k8s_openapi::jiff::Timestamp::now();
    let later = (now + k8s_openapi::jiff::SignedDuration::from_secs(1)).to_string();
    // The slice before its Service (watch events race): measured when the
    // Service comes and the backend reaches the data path.
    state.apply_slice(&slice("10.1.0.1", &later));
    assert!(state.take_changes().trigger_times.is_empty());
    state.apply_service(&service);
    let changes = state.take_changes();
    assert_eq!(changes.trigger_times.len(), 1, "a new backend reaches the data path");
    // The same slice again (a relist, or a change to nothing served): no
    // frontend changes, no latency recorded.
    state.apply_slice(&slice("10.1.0.1", &later));
    assert!(state.take_changes().trigger_times.is_empty());
    // A change triggered before the daemon started: not measured.
    state.apply_slice(&slice("10.1.0.2", "2020-01-01T00:00:00Z"));
    let changes = state.take_changes();
    assert!(!changes.frontends.is_empty() && changes.trigger_times.is_empty());
    // A readable time with fractions, as the controller writes it.
    let fractional = (now + k8s_openapi::jiff::SignedDuration::from_millis(1500)).to_string();
    state.apply_slice(&slice("10.1.0.3", &fractional));
    assert_eq!(state.take_changes().trigger_times.len(), 1);
}

/// kube-proxy's pending-change gauges, no-local-endpoints gauge and node
/// eligibility, as the state keeps them across events and syncs.
#[test]
fn pending_changes_no_local_endpoints_and_node_eligibility() {
    let mut state = ClusterState::new("node0".into());
    let service = |policy: &str| -> Service {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.1", "type": "NodePort", "externalTrafficPolicy": policy,
                     "ports": [{"name": "http", "port": 80, "nodePort": 30080, "protocol": "TCP"}]},
        }))
        .unwrap()
    };
    let slice = |name: &str, node: &str| -> EndpointSlice {
        serde_json::from_value(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": name, "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["10.1.0.1"], "nodeName": node, "conditions": {"ready": true}}],
        }))
        .unwrap()
    };
    state.apply_service(&service("Local"));
    state.apply_slice(&slice("web-a", "node1"));
    state.apply_slice(&slice("web-b", "node1"));
    assert_eq!(
        state.pending_changes(),
        (1, 1),
        "counted by Service, as kube-proxy's trackers"
    );
    state.take_changes();
    assert_eq!(state.pending_changes(), (0, 0));
    assert_eq!(
        (state.no_local_endpoints().internal, state.no_local_endpoints().external),
        (0, 1),
        "eTP Local with endpoints only on another node"
    );
    state.apply_slice(&slice("web-b", "node0"));
    assert_eq!(state.pending_changes(), (0, 1));
    state.take_changes();
    assert_eq!(state.no_local_endpoints().external, 0, "a local endpoint came");
    state.apply_service(&service("Cluster"));
    state.apply_slice(&slice("web-b", "node1"));
    state.take_changes();
    assert_eq!(state.no_local_endpoints().external, 0, "Cluster policy");
    state.apply_service(&service("Local"));
    state.take_changes();
    assert_eq!(state.no_local_endpoints().external, 1);
    state.delete_service(&crate::model::objects::ObjectName {
        namespace: "default".into(),
        name: "web".into(),
    });
    state.take_changes();
    assert_eq!(
        state.no_local_endpoints().external,
        0,
        "a deleted Service counts no more"
    );

    let node = |json: serde_json::Value| -> k8s_openapi::api::core::v1::Node { serde_json::from_value(json).unwrap() };
    assert!(state.node_eligible(), "a node never seen is eligible");
    state.apply_node(&node(json!({"metadata": {"name": "node0"}})));
    assert!(state.node_eligible());
    state.apply_node(&node(json!({"metadata": {"name": "node0"}, "spec": {"taints": [
        {"key": "ToBeDeletedByClusterAutoscaler", "value": "1700000000", "effect": "NoSchedule"}]}})));
    assert!(!state.node_eligible(), "the cluster autoscaler is deleting it");
    state.apply_node(&node(json!({"metadata": {"name": "node0"}})));
    assert!(state.node_eligible(), "the autoscaler changed its mind");
    state.apply_node(&node(
        json!({"metadata": {"name": "node1", "deletionTimestamp": "2026-01-01T00:00:00Z"}}),
    ));
    assert!(state.node_eligible(), "another node's deletion is not ours");
    state.apply_node(&node(
        json!({"metadata": {"name": "node0", "deletionTimestamp": "2026-01-01T00:00:00Z"}}),
    ));
    assert!(!state.node_eligible(), "being deleted");
    state.delete_node("node0");
    assert!(!state.node_eligible(), "deleted");
    state.replace_nodes(&[node(json!({"metadata": {"name": "node0"}}))]);
    assert!(state.node_eligible(), "created again");
}
