//! The desired frontends, maintained incrementally: a Service's claims are
//! replaced when it (or one of its slices) changes, and only the frontends
//! whose outcome changed are reported, so a sync costs what changed, not
//! what exists (kube-proxy's change tracking).
use std::collections::{BTreeMap, BTreeSet};

use super::{objects::ObjectName, objects::Rejection, Claim, DesiredState, Frontend, FrontendState};

/// Which of several Services claiming one frontend gets it: the one
/// created first (the later claim is the mistake), then the first by
/// namespace/name (objects without a creation time, as in a manifest
/// directory, come after those with one). Whatever the order of events,
/// so an incremental result always equals a from-scratch one.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Precedence {
    created: i64,
    service: ObjectName,
}

/// Who asks for each frontend.
#[derive(Default)]
pub struct DesiredTracker {
    claims: BTreeMap<Frontend, BTreeMap<Precedence, (String, FrontendState)>>,
    by_service: BTreeMap<ObjectName, (Precedence, Vec<Frontend>)>,
    endpoints: usize,
}

impl DesiredTracker {
    /// Replaces everything `service` asks for with `claims` (empty: the
    /// Service is gone). Frontends whose programmed state may change are
    /// added to `changed`; returns whether any did change (a Service that
    /// claims its frontends again as they were changes nothing).
    /// `created`: the Service's creation time in seconds, when known.
    pub fn set_service(
        &mut self,
        service: &ObjectName,
        created: Option<i64>,
        claims: Vec<Claim>,
        changed: &mut BTreeSet<Frontend>,
    ) -> bool {
        let (old, frontends) = self.by_service.remove(service).unwrap_or_else(|| {
            let none = Precedence {
                created: i64::MAX,
                service: service.clone(),
            };
            (none, Vec::new())
        });
        // What each touched frontend had, to tell which changed.
        let mut before: BTreeMap<Frontend, Option<FrontendState>> = BTreeMap::new();
        for frontend in frontends.iter().chain(claims.iter().map(|c| &c.frontend)) {
            before
                .entry(*frontend)
                .or_insert_with(|| self.winner(frontend).cloned());
        }
        for frontend in frontends {
            let winner_before = self.winner(&frontend).map(|s| s.backends.len());
            if let Some(claimants) = self.claims.get_mut(&frontend) {
                claimants.remove(&old);
                if claimants.is_empty() {
                    self.claims.remove(&frontend);
                }
            }
            self.endpoints -= winner_before.unwrap_or(0);
            self.endpoints += self.winner(&frontend).map_or(0, |s| s.backends.len());
        }
        let precedence = Precedence {
            created: created.unwrap_or(i64::MAX),
            service: service.clone(),
        };
        let mut frontends = Vec::with_capacity(claims.len());
        for claim in claims {
            let before_count = self.winner(&claim.frontend).map_or(0, |s| s.backends.len());
            self.claims
                .entry(claim.frontend)
                .or_default()
                .insert(precedence.clone(), (claim.field, claim.state));
            self.endpoints -= before_count;
            self.endpoints += self.winner(&claim.frontend).map_or(0, |s| s.backends.len());
            frontends.push(claim.frontend);
        }
        if !frontends.is_empty() {
            self.by_service.insert(service.clone(), (precedence, frontends));
        }
        let mut effective = false;
        for (frontend, was) in before {
            effective |= self.winner(&frontend) != was.as_ref();
            changed.insert(frontend);
        }
        effective
    }

    /// The state the dataplane should have for `frontend`.
    pub fn winner(&self, frontend: &Frontend) -> Option<&FrontendState> {
        self.claims
            .get(frontend)
            .and_then(|c| c.values().next())
            .map(|(_, s)| s)
    }

    /// The Services that lose `frontend` to another one.
    pub fn conflicts_at(&self, frontend: &Frontend) -> Vec<Rejection> {
        let Some(claimants) = self.claims.get(frontend) else {
            return Vec::new();
        };
        let mut iter = claimants.iter();
        let Some((owner, _)) = iter.next() else {
            return Vec::new();
        };
        iter.map(|(loser, (field, _))| Rejection {
            kind: "Service",
            object: loser.service.clone(),
            field: field.clone(),
            reason: format!("{frontend} is already served for Service {}", owner.service),
        })
        .collect()
    }

    pub fn frontend_count(&self) -> usize {
        self.claims.len()
    }

    pub fn endpoint_count(&self) -> usize {
        self.endpoints
    }

    /// Services that ask for at least one frontend.
    pub fn services(&self) -> impl Iterator<Item = &ObjectName> {
        self.by_service.keys()
    }

    pub fn service_count(&self) -> usize {
        self.by_service.len()
    }

    /// Everything, materialized (for full resyncs and tests).
    pub fn state(&self) -> DesiredState {
        let mut state = DesiredState::default();
        for frontend in self.claims.keys() {
            if let Some(winner) = self.winner(frontend) {
                state.frontends.insert(*frontend, winner.clone());
            }
            state.conflicts.extend(self.conflicts_at(frontend));
        }
        state
    }
}
