use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use proxy_common::{Backend, BackendKey, ServiceKey};

use super::{mem_table::MemTable, Syncer};
use crate::model::{
    objects::{ObjectName, Protocol},
    BackendAddr, DesiredState, Frontend, FrontendKind, FrontendState,
};

fn frontend(n: u8, port: u16) -> Frontend {
    Frontend {
        ip: Ipv4Addr::new(10, 96, 0, n),
        port,
        protocol: Protocol::Tcp,
    }
}

fn backends(ids: &[u8]) -> BTreeSet<BackendAddr> {
    ids.iter()
        .map(|&i| BackendAddr {
            ip: Ipv4Addr::new(10, 244, 0, i),
            port: 8080,
            local: false,
            terminating: false,
        })
        .collect()
}

fn desired(entries: &[(Frontend, &[u8])]) -> DesiredState {
    DesiredState {
        frontends: entries
            .iter()
            .map(|(f, ids)| {
                (
                    *f,
                    FrontendState {
                        service: ObjectName {
                            namespace: "default".into(),
                            name: format!("svc{}", f.ip),
                        },
                        kind: FrontendKind::ClusterIp,
                        backends: backends(ids),
                        external_local: None,
                        affinity_timeout: None,
                        source_ranges: Vec::new(),
                        reject: false,
                    },
                )
            })
            .collect(),
        conflicts: vec![],
    }
}

/// The view a from-scratch sync of `state` gives.
fn scratch_view(state: &DesiredState) -> BTreeMap<ServiceKey, (u32, BTreeSet<Backend>)> {
    let mut table = MemTable::default();
    let report = Syncer::default().sync(state, &mut table);
    assert!(report.failures.is_empty());
    as_sets(&table)
}

fn as_sets(table: &MemTable) -> BTreeMap<ServiceKey, (u32, BTreeSet<Backend>)> {
    table.as_sets()
}

#[test]
fn programs_exactly_the_desired_state_and_then_writes_nothing() {
    let state = desired(&[
        (frontend(1, 80), &[1, 2, 3]),
        (frontend(2, 53), &[]),
        (frontend(3, 443), &[4]),
    ]);
    let mut table = MemTable::default();
    let mut syncer = Syncer::default();
    let report = syncer.sync(&state, &mut table);
    assert_eq!((report.added, report.updated, report.removed), (3, 0, 0));
    assert_eq!(as_sets(&table), scratch_view(&state));
    assert_eq!(table.view()[&super::service_key(&frontend(1, 80))].1.len(), 3);

    let writes = table.writes;
    let report = syncer.sync(&state, &mut table);
    assert_eq!((report.added, report.updated, report.removed), (0, 0, 0));
    assert_eq!(table.writes, writes, "an unchanged state must not write");
}

#[test]
fn surviving_backends_keep_their_slots() {
    let f = frontend(1, 80);
    let key = super::service_key(&f);
    let mut table = MemTable::default();
    let mut syncer = Syncer::default();
    syncer.sync(&desired(&[(f, &[1, 2, 3, 4])]), &mut table);
    let before = table.view()[&key].1.clone();

    // Remove the second backend and add a new one: only one slot changes.
    syncer.sync(&desired(&[(f, &[1, 3, 4, 5])]), &mut table);
    let after = table.view()[&key].1.clone();
    let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
    assert_eq!(moved, 1, "{before:?} -> {after:?}");
    assert_eq!(after[1], Backend::new(Ipv4Addr::new(10, 244, 0, 5), 8080, false));

    // Shrink: the backend in the last slot moves into the hole.
    syncer.sync(&desired(&[(f, &[1, 3, 5])]), &mut table);
    let shrunk = table.view()[&key].1.clone();
    assert_eq!(shrunk.len(), 3);
    assert_eq!(shrunk[0], after[0]);
    assert_eq!(shrunk[1], after[1]);
}

#[test]
fn a_removed_service_leaves_nothing_and_its_id_is_reused() {
    let mut table = MemTable::default();
    let mut syncer = Syncer::default();
    syncer.sync(
        &desired(&[(frontend(1, 80), &[1, 2]), (frontend(2, 80), &[3])]),
        &mut table,
    );
    let gone = table.services[&super::service_key(&frontend(1, 80))].id;
    let report = syncer.sync(&desired(&[(frontend(2, 80), &[3])]), &mut table);
    assert_eq!(report.removed, 1);
    assert_eq!(report.removed_ids, vec![gone]);
    assert_eq!(table.services.len(), 1);
    assert_eq!(table.backends.len(), 1);
    let freed: BTreeSet<u32> = (0..2)
        .collect::<BTreeSet<_>>()
        .difference(&table.services.values().map(|v| v.id).collect())
        .copied()
        .collect();
    syncer.sync(
        &desired(&[(frontend(2, 80), &[3]), (frontend(4, 80), &[1])]),
        &mut table,
    );
    let new_id = table.services[&super::service_key(&frontend(4, 80))].id;
    assert!(
        freed.contains(&new_id),
        "id {new_id} should reuse a freed one {freed:?}"
    );
}

#[test]
fn a_failed_write_is_reported_and_retried_and_leaves_the_rest_working() {
    let good = desired(&[(frontend(1, 80), &[1, 2])]);
    let mut table = MemTable::default();
    let mut syncer = Syncer::default();
    syncer.sync(&good, &mut table);
    let working = table.view();

    // The map fills up while a new service is added and another grows.
    table.fail_after = Some(table.writes + 2);
    let next = desired(&[(frontend(1, 80), &[1, 2, 3, 4]), (frontend(2, 80), &[5, 6, 7])]);
    let report = syncer.sync(&next, &mut table);
    assert!(!report.failures.is_empty());
    assert!(
        report.failures.iter().all(|f| f.contains("map is full")),
        "{:?}",
        report.failures
    );
    // Whatever was written, the data path sees consistent services, and the
    // existing one still has (at least) its working backends.
    let partial = table.view();
    let key = super::service_key(&frontend(1, 80));
    assert!(working[&key].1.iter().all(|b| partial[&key].1.contains(b)));

    // Room again: the next sync converges to the desired state.
    table.fail_after = None;
    let report = syncer.sync(&next, &mut table);
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert_eq!(as_sets(&table), scratch_view(&next));
}

#[test]
fn recovers_from_the_maps_of_a_previous_run() {
    let state = desired(&[(frontend(1, 80), &[1, 2]), (frontend(2, 80), &[3])]);
    let mut table = MemTable::default();
    Syncer::default().sync(&state, &mut table);
    // A stray slot of no service, as a crash mid-removal could leave.
    table.backends.insert(
        BackendKey {
            service_id: 77,
            slot: 0,
        },
        Backend::new(Ipv4Addr::new(1, 2, 3, 4), 1, false),
    );
    let ids_before: Vec<u32> = table.services.values().map(|v| v.id).collect();

    let mut syncer = Syncer::recover(&mut table).unwrap();
    assert!(
        !table.backends.keys().any(|k| k.service_id == 77),
        "orphan slots are removed"
    );
    let writes = table.writes;
    let report = syncer.sync(&state, &mut table);
    assert_eq!((report.added, report.updated, report.removed), (0, 0, 0));
    assert_eq!(
        table.writes, writes,
        "taking over an up-to-date dataplane writes nothing"
    );
    assert_eq!(
        table.services.values().map(|v| v.id).collect::<Vec<_>>(),
        ids_before,
        "ids survive a restart"
    );

    // New services never take an id still in use.
    syncer.sync(
        &desired(&[
            (frontend(1, 80), &[1, 2]),
            (frontend(2, 80), &[3]),
            (frontend(3, 80), &[4]),
        ]),
        &mut table,
    );
    table.view();
}

/// Random sequences of changes: incremental syncs always end where a
/// from-scratch sync of the final state does.
#[test]
fn incremental_syncs_equal_a_sync_from_scratch() {
    let mut rng = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    for _round in 0..50 {
        let mut table = MemTable::default();
        let mut syncer = Syncer::default();
        let mut state: BTreeMap<Frontend, Vec<u8>> = BTreeMap::new();
        for _step in 0..20 {
            let f = frontend(next(6) as u8, 80 + next(2) as u16);
            match next(4) {
                0 => {
                    state.remove(&f);
                }
                _ => {
                    let n = next(6) as usize;
                    state.insert(f, (0..n).map(|_| next(10) as u8).collect());
                }
            }
            let entries: Vec<(Frontend, &[u8])> = state.iter().map(|(f, b)| (*f, b.as_slice())).collect();
            let d = desired(&entries);
            let report = syncer.sync(&d, &mut table);
            assert!(report.failures.is_empty());
            assert_eq!(as_sets(&table), scratch_view(&d));
        }
    }
}
