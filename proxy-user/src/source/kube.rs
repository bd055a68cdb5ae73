//! The Kubernetes API as a source: watchers on Services, EndpointSlices and
//! Nodes apply every event to the shared [`ClusterState`] and tell the sync
//! loop when. A failed list or watch never touches the dataplane: the maps
//! keep the last known state while the watcher retries with backoff, and a
//! re-list (after `410 Gone`) replaces the state, so nothing stale survives.
use std::{
    fmt::Debug,
    path::Path,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::api::{core::v1::Node, core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        utils::Backoff,
        watcher::{self, Event},
        WatchStreamExt,
    },
    Api, Client, Config, Resource, ResourceExt,
};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc::UnboundedSender;

use super::state::{ClusterState, Notice};
use crate::model::objects::ObjectName;
use crate::telemetry::{labels, Telemetry};

/// A client from `--kubeconfig`, else `KUBECONFIG` or `~/.kube/config`, else
/// the in-cluster service account (`KUBERNETES_SERVICE_HOST`/`PORT`, which
/// the DaemonSet points at the API server's real address: a kube-proxy
/// replacement cannot reach it through a ClusterIP it has not programmed).
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig =
                Kubeconfig::read_from(path).with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?
        }
        None => Config::infer()
            .await
            .context("no kubeconfig and not running in a cluster")?,
    };
    tracing::info!(server = %config.cluster_url, "using the Kubernetes API");
    Ok(Client::try_from(config)?)
}

/// Retry delays after a failed list or watch: 0.5 s doubling to 5 s, with
/// ±20% jitter so that every node does not come back at once. kube-rs's
/// default (client-go's 0.8 s .. 30 s) would leave a node up to 30 s behind
/// after an API server outage; a proxy wants to converge sooner.
pub struct WatchBackoff {
    next: Duration,
    seed: u64,
}

const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

impl Default for WatchBackoff {
    fn default() -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        WatchBackoff {
            next: BACKOFF_MIN,
            seed: seed | 1,
        }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let jitter = 0.8 + (self.seed % 1000) as f64 / 2500.0; // 0.8 .. 1.2
        let delay = self.next.mul_f64(jitter);
        self.next = (self.next * 2).min(BACKOFF_MAX);
        Some(delay)
    }
}

impl Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }
}

/// How a watched kind changes the cluster state.
trait Watched: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static {
    const RESOURCE: &'static str;
    fn apply(state: &mut ClusterState, obj: &Self) -> Vec<Notice>;
    fn delete(state: &mut ClusterState, obj: &Self);
    fn replace(state: &mut ClusterState, all: &[Self]) -> Vec<Notice>;
}

impl Watched for Service {
    const RESOURCE: &'static str = "services";
    fn apply(state: &mut ClusterState, obj: &Self) -> Vec<Notice> {
        state.apply_service(obj)
    }
    fn delete(state: &mut ClusterState, obj: &Self) {
        state.delete_service(&ObjectName::of(&obj.metadata));
    }
    fn replace(state: &mut ClusterState, all: &[Self]) -> Vec<Notice> {
        state.replace_services(all)
    }
}

impl Watched for EndpointSlice {
    const RESOURCE: &'static str = "endpointslices";
    fn apply(state: &mut ClusterState, obj: &Self) -> Vec<Notice> {
        state.apply_slice(obj)
    }
    fn delete(state: &mut ClusterState, obj: &Self) {
        state.delete_slice(&ObjectName::of(&obj.metadata));
    }
    fn replace(state: &mut ClusterState, all: &[Self]) -> Vec<Notice> {
        state.replace_slices(all)
    }
}

impl Watched for Node {
    const RESOURCE: &'static str = "nodes";
    fn apply(state: &mut ClusterState, obj: &Self) -> Vec<Notice> {
        state.apply_node(obj);
        Vec::new()
    }
    fn delete(state: &mut ClusterState, obj: &Self) {
        state.delete_node(&obj.name_any());
    }
    fn replace(state: &mut ClusterState, all: &[Self]) -> Vec<Notice> {
        state.replace_nodes(all);
        Vec::new()
    }
}

/// Watches the three kinds until the process ends. Nothing is synced until
/// every kind has been listed once: a Service listed before its slices
/// would otherwise be programmed without backends, and a restarted daemon
/// would drop new connections until the slices arrive (kube-proxy waits the
/// same way).
pub fn spawn_watchers(
    client: Client,
    state: Arc<Mutex<ClusterState>>,
    changed: UnboundedSender<Instant>,
    telemetry: Arc<Telemetry>,
) {
    let unlisted = Arc::new(AtomicUsize::new(3));
    let shared = Shared {
        state,
        changed,
        telemetry,
        unlisted,
    };
    tokio::spawn(watch::<Service>(Api::all(client.clone()), shared.clone()));
    tokio::spawn(watch::<EndpointSlice>(Api::all(client.clone()), shared.clone()));
    tokio::spawn(watch::<Node>(Api::all(client), shared));
}

#[derive(Clone)]
struct Shared {
    state: Arc<Mutex<ClusterState>>,
    changed: UnboundedSender<Instant>,
    telemetry: Arc<Telemetry>,
    /// Kinds not listed yet.
    unlisted: Arc<AtomicUsize>,
}

async fn watch<K: Watched>(api: Api<K>, shared: Shared) {
    let Shared {
        state,
        changed,
        telemetry,
        unlisted,
    } = shared;
    let mut listed = false;
    // Lists at resourceVersion=0, as client-go's reflectors (so kube-proxy)
    // make them: the API server answers from its watch cache in one piece
    // instead of paging through etcd.
    let mut events = watcher::watcher(api, watcher::Config::default().any_semantic())
        // Nothing here reads them, and on a real cluster they are most of an object.
        .modify(|obj| obj.meta_mut().managed_fields = None)
        .backoff(WatchBackoff::default())
        .boxed();
    // A (re-)list arrives as Init, InitApply..., InitDone: applied at once
    // at InitDone, so the maps never see a half-listed cluster.
    let mut listing: Vec<K> = Vec::new();
    let mut failing = false;
    while let Some(event) = events.next().await {
        let observed = Instant::now();
        let (notices, seen) = match event {
            Ok(Event::Init) => {
                listing.clear();
                continue;
            }
            Ok(Event::InitApply(obj)) => {
                listing.push(obj);
                continue;
            }
            Ok(Event::InitDone) => {
                tracing::info!(resource = K::RESOURCE, objects = listing.len(), "listed");
                let mut locked = state.lock().expect("state lock");
                let notices = K::replace(&mut locked, &listing);
                if !listed {
                    listed = true;
                    unlisted.fetch_sub(1, Ordering::SeqCst);
                }
                // The cluster is whole once every kind is listed: the model
                // is computed here, on this worker, while the daemon may
                // still be loading its programs, instead of in the first sync.
                if unlisted.load(Ordering::SeqCst) == 0 {
                    locked.recompute();
                }
                drop(locked);
                let seen = listing.len();
                // Freeing a large listing takes tens of milliseconds that the
                // first sync need not wait for.
                let applied = std::mem::take(&mut listing);
                tokio::task::spawn_blocking(move || {
                    drop(applied);
                    crate::memory::release_freed_memory();
                });
                (notices, seen)
            }
            Ok(Event::Apply(obj)) => (K::apply(&mut state.lock().expect("state lock"), &obj), 1),
            Ok(Event::Delete(obj)) => {
                K::delete(&mut state.lock().expect("state lock"), &obj);
                (Vec::new(), 1)
            }
            Err(e) => {
                telemetry
                    .metrics
                    .watch_errors
                    .get_or_create(&labels(&[("resource", K::RESOURCE)]))
                    .inc();
                // Logged when a failure starts; a retry loop is counted, not repeated in the log.
                if !failing {
                    tracing::warn!(resource = K::RESOURCE, error = %e, "watch failed; the dataplane keeps its last state, retrying with backoff");
                }
                failing = true;
                continue;
            }
        };
        if failing {
            tracing::info!(resource = K::RESOURCE, "watch recovered");
            failing = false;
        }
        report(&notices, &telemetry);
        count_changes(K::RESOURCE, seen, &state.lock().expect("state lock"), &telemetry);
        if unlisted.load(Ordering::SeqCst) == 0 {
            // The receiver only goes away when the daemon is stopping.
            let _ = changed.send(observed);
        }
    }
}

/// kube-proxy's change tracker metrics: every Service and EndpointSlice
/// change seen, and the Services with changes waiting for a sync.
fn count_changes(resource: &str, seen: usize, state: &ClusterState, telemetry: &Telemetry) {
    let metrics = &telemetry.metrics;
    let changes = match resource {
        "services" => Some(&metrics.service_changes),
        "endpointslices" => Some(&metrics.endpoint_changes),
        _ => None,
    };
    if let Some(changes) = changes {
        changes.inc_by(seen as u64);
    }
    let (services, endpoints) = state.pending_changes();
    metrics.service_changes_pending.set(services as i64);
    metrics.endpoint_changes_pending.set(endpoints as i64);
}

/// Logs each notice once (the state only returns new ones) and counts it.
pub fn report(notices: &[Notice], telemetry: &Telemetry) {
    for notice in notices {
        match notice {
            Notice::Rejected { kind, field, message } => {
                telemetry
                    .metrics
                    .rejections
                    .get_or_create(&labels(&[("kind", kind), ("field", field)]))
                    .inc();
                tracing::warn!("rejected: {message}");
            }
            Notice::Unsupported(message) => tracing::warn!("unsupported: {message}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_with_bounded_jitter_and_resets() {
        let mut b = WatchBackoff::default();
        let delays: Vec<Duration> = (0..8).map(|_| b.next().unwrap()).collect();
        let nominal = [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0, 5.0];
        for (d, n) in delays.iter().zip(nominal) {
            let s = d.as_secs_f64();
            assert!(s >= n * 0.8 - 1e-9 && s <= n * 1.2 + 1e-9, "{delays:?}");
        }
        b.reset();
        assert!(b.next().unwrap() <= Duration::from_millis(600));
    }
}
